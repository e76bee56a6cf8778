"""A client's side of the sums-only consensus (FedHarmony with ``leave_one_out="client"``).

A server that keeps only the consensus sums ``S = sum_j w_j V_j R_j`` and ``D = sum_j w_j V_j`` (memory ``O(L^2)``
whatever the number of clients) cannot subtract a client's own term from them: the client does. It remembers the
term it contributed last (its correlation ``R_k`` and valid labels ``V_k``), builds its leave-one-out teacher
``R*_k = (S - w_k V_k R_k) / (D - w_k V_k)`` from the :class:`~lightning_fedharmony.protocol.ConsensusShare` it is
sent, trains against it, and returns in place of its statistics the change of its term in the sums and its own score
against the teacher it trained with (:class:`~lightning_fedharmony.protocol.ConsensusTerm`). Kou et al., CVPR 2026,
https://arxiv.org/abs/2604.28024 (the teacher and score are the paper's; who computes them is this library's).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

from lightning_fedharmony.functional.aggregation import teacher_score
from lightning_fedharmony.functional.blocks import block_mask
from lightning_fedharmony.functional.consensus import pair_validity, teacher_and_mask
from lightning_fedharmony.protocol import ConsensusShare, ConsensusTerm, Instruction, ProtocolError, Update
from lightning_fedharmony.stats import CorrelationStats

#: How many label pairs a client reports with its score.
NUM_REPORTED_PAIRS = 5


@dataclass
class _Term:
    corr: Tensor  # (L, L) float32, as added to the sums (before validity masking)
    valid: Tensor  # (L,) bool


def share_teacher(share: ConsensusShare, own: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """A client's teacher ``(L, L)`` float32 and alignment mask ``(L, L)`` bool from the consensus sums, given its own
    term ``(corr, valid)`` in them (``None``: it has none there, and its teacher is the whole consensus).

    The same teacher and mask a server keeping every client's correlation gives it (``leave_one_out="server"``):
    both are :func:`~lightning_fedharmony.functional.teacher_and_mask`.
    """
    mine = None if own is None or share.own_weight <= 0 else (own[0], share.own_weight, own[1])
    blocks = block_mask(share.cluster_ids)
    return teacher_and_mask(share.numerator, share.denominator, blocks, mine, share.align_threshold)


class ConsensusMemory:
    """What one client keeps between rounds for a sums-only server: the terms it contributed, by round.

    It keeps at most two: the one the server last said is in its sums, and the newest (which replaces it once the
    server commits the round; a round the server dropped, e.g. a retried one, leaves the older in place). Its
    :meth:`state_dict` holds plain tensors, for a client's checkpoint or Flower's ``Context.state``.

    Example:
        >>> memory = ConsensusMemory()
        >>> memory.rounds()
        []
    """

    def __init__(self) -> None:
        self._terms: dict[int, _Term] = {}
        self._pending: tuple[ConsensusShare, Tensor | None, Tensor | None] | None = None

    def rounds(self) -> list[int]:
        """The rounds whose terms are kept."""
        return sorted(self._terms)

    def resolve(self, instruction: Instruction, client_id: str) -> Instruction:
        """The instruction with its consensus share turned into this client's teacher and mask (unchanged without a
        share, or with sums that are still empty: round 1); remembers the share for :meth:`complete`.

        Raises:
            ProtocolError: if the server counts a term of this client that it no longer has (field
                ``consensus.own_round``).
        """
        share = instruction.consensus
        self._pending = None
        if share is None:
            return instruction
        own = None
        if share.own_weight > 0:
            term = self._terms.get(share.own_round)
            if term is None:
                raise ProtocolError(
                    client_id,
                    "consensus.own_round",
                    f"the server holds this client's term of round {share.own_round}, but the client kept only"
                    f" rounds {self.rounds()}. HINT: restore the client's checkpoint (its consensus memory), or start"
                    " the run afresh.",
                )
            own = (term.corr, term.valid)
            # the server committed that round: older terms are no longer needed
            self._terms = {share.own_round: term}
        else:
            self._terms = {}
        if share.total_weight <= 0:  # no sums yet: nothing to align to, nothing to score against
            self._pending = (share, None, None)
            return instruction
        teacher, mask = share_teacher(share, own)
        self._pending = (share, teacher, mask)
        return replace(instruction, teacher=teacher, mask=mask)

    def complete(
        self, update: Update, stats: CorrelationStats, server_round: int, *, eps: float, normalization: str
    ) -> Update:
        """The update with its statistics replaced by its term (:class:`~lightning_fedharmony.protocol.ConsensusTerm`,
        scored against the teacher it trained with) and the new term remembered under ``server_round``.

        Args:
            update: the client's update (its ``stats`` are dropped).
            stats: the statistics its correlation is computed from.
            server_round: the round being answered.
            eps: ``eps`` of the soft phi (the instruction's ``corr_eps``).
            normalization: its normalisation (the instruction's ``corr_normalization``).

        Raises:
            RuntimeError: without an instruction resolved first (:meth:`resolve`).
        """
        if self._pending is None:
            raise RuntimeError("Expected an instruction with a consensus share resolved first, but there is none.")
        share, teacher, mask = self._pending
        corr = stats.compute(eps=eps, normalization=normalization).float()  # type: ignore[arg-type]
        valid = stats.valid_labels(share.min_label_rate)
        weight = 1.0 if share.weighting == "uniform" else float(update.num_samples)
        delta = (corr if bool(valid.all()) else corr * pair_validity(valid)) * weight
        term = ConsensusTerm(delta=delta, valid=valid, weight=weight, previous_valid=torch.zeros_like(valid))
        if share.replace_own and share.own_weight > 0:
            old = self._terms[share.own_round]
            delta.sub_(
                old.corr if bool(old.valid.all()) else old.corr * pair_validity(old.valid), alpha=share.own_weight
            )
            term = replace(
                term,
                replaced_round=share.own_round,
                replaced_weight=float(share.own_weight),
                previous_valid=old.valid,
            )
        if teacher is not None and mask is not None:
            term = _scored(term, corr, share, teacher, mask, update.num_samples)
        self._terms[server_round] = _Term(corr, valid)
        self._pending = None
        return replace(update, stats=None, term=term)

    def state_dict(self) -> dict[str, Any]:
        """The kept terms as plain tensors."""
        rounds = self.rounds()
        return {
            "rounds": torch.tensor(rounds, dtype=torch.int64),
            "corr": torch.stack([self._terms[r].corr for r in rounds]) if rounds else torch.zeros(0),
            "valid": torch.stack([self._terms[r].valid for r in rounds])
            if rounds
            else torch.zeros(0, dtype=torch.bool),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self._terms = {
            int(r): _Term(corr.float(), valid.bool())
            for r, corr, valid in zip(state["rounds"].tolist(), state["corr"], state["valid"])
        }
        self._pending = None


def _scored(
    term: ConsensusTerm, corr: Tensor, share: ConsensusShare, teacher: Tensor, mask: Tensor, samples: int
) -> ConsensusTerm:
    """The term with its score against the teacher the client trained with: ``s_k``, its sampling baseline and the
    pairs where it departs most."""
    others = max(share.total_samples - share.own_samples, 0.0)
    discrepancy, baseline, pairs = teacher_score(corr, teacher, mask, float(samples), others, NUM_REPORTED_PAIRS)
    return replace(
        term,
        discrepancy=discrepancy,
        sampling_discrepancy=baseline,
        scored=True,
        pairs=torch.tensor(pairs, dtype=torch.float64).reshape(-1, 4),
    )
