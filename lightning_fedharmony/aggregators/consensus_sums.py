"""FedHarmony's server with ``O(L^2)`` state, whatever the number of clients (``leave_one_out="client"``).

The server keeps the consensus sums ``S = sum_j w_j V_j R_j`` and ``D = sum_j w_j V_j`` (float64), the label blocks,
and three scalars per client it has a term from (weight, samples, round); never a client's ``L x L`` correlation.
Each client removes its own term from the sums it is sent to get its leave-one-out teacher, and returns the change of
its term with its own score (:mod:`lightning_fedharmony.client_terms`). A round folds the updates in one at a time
(:class:`SumsRound`), so the server's peak memory is the sums, one round accumulator and one update.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lightning_fedharmony.aggregators.base import (
    AggregationResult,
    RoundAggregation,
    WeightedModelSum,
    integer_entries,
)
from lightning_fedharmony.functional.aggregation import aggregation_weights, balance_factor
from lightning_fedharmony.functional.consensus import consensus_from_sums, off_diagonal_abs_mean
from lightning_fedharmony.protocol import ConsensusShare, ProtocolError, Update

if TYPE_CHECKING:
    from lightning_fedharmony.aggregators.fedharmony import FedHarmony

#: Round terms are summed in float32 in chunks of this many, then added to the float64 sums: a quarter of the memory
#: traffic of float64 throughout, with the float32 error bounded by this many additions.
CHUNK = 32


@dataclass
class Member:
    """A client's term in the sums: its weight ``w_k``, its sample count and the round it is from."""

    weight: float
    samples: float
    round: int


class ConsensusSums:
    """The server's cross-round state: the sums, the members' scalars and the label blocks."""

    def __init__(self) -> None:
        self.numerator = torch.zeros(0, 0, dtype=torch.float64)
        self.denominator = torch.zeros(0, 0, dtype=torch.float64)
        self.cluster_ids = torch.zeros(0, dtype=torch.int64)
        self.members: dict[str, Member] = {}
        self._published: tuple[Tensor, Tensor, Tensor]
        self.publish()
        self.total_samples = 0.0  # over the members, kept as they change: no pass over every client per share
        self.total_weight = 0.0

    def set_members(self, members: dict[str, Member]) -> None:
        """Replace the members (and their totals)."""
        self.members = members
        self.total_samples = sum(m.samples for m in members.values())
        self.total_weight = sum(m.weight for m in members.values())

    def update_members(self, new: Mapping[str, Member]) -> None:
        """Add or replace members, adjusting the totals by what changed."""
        for cid, member in new.items():
            old = self.members.get(cid)
            if old is not None:
                self.total_samples -= old.samples
                self.total_weight -= old.weight
            self.members[cid] = member
            self.total_samples += member.samples
            self.total_weight += member.weight

    @property
    def num_labels(self) -> int:
        """``L``, or 0 before the first round."""
        return int(self.cluster_ids.shape[0])

    def consensus(self, dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The global consensus ``R*`` ``(L, L)``, or ``None`` before the first round."""
        if self.num_labels == 0:
            return None
        return consensus_from_sums(self.numerator, self.denominator).to(dtype)

    def publish(self) -> None:
        """Take the sums and blocks as they now stand for the next round's shares: converted to float32 once, and
        shared (read-only) by every client's share rather than copied per client."""
        self._published = (self.numerator.float(), self.denominator.float(), self.cluster_ids.clone())

    def share(
        self, client_id: str, *, weighting: str, replace_own: bool, min_label_rate: float, align_threshold: float
    ) -> ConsensusShare:
        """What client ``client_id`` is sent: the published sums (float32), the blocks and its own term's weight and
        round."""
        member = self.members.get(client_id)
        numerator, denominator, cluster_ids = self._published
        return ConsensusShare(
            numerator=numerator,
            denominator=denominator,
            cluster_ids=cluster_ids,
            total_samples=self.total_samples,
            total_weight=self.total_weight,
            weighting=weighting,
            own_weight=member.weight if member else 0.0,
            own_samples=member.samples if member else 0.0,
            own_round=member.round if member else 0,
            replace_own=replace_own,
            min_label_rate=min_label_rate,
            align_threshold=align_threshold,
        )

    def state_dict(self) -> dict[str, Any]:
        ids = list(self.members)
        return {
            "numerator": self.numerator,
            "denominator": self.denominator,
            "cluster_ids": self.cluster_ids,
            "member_ids": ids,
            "member_weight": torch.tensor([self.members[c].weight for c in ids], dtype=torch.float64),
            "member_samples": torch.tensor([self.members[c].samples for c in ids], dtype=torch.float64),
            "member_round": torch.tensor([self.members[c].round for c in ids], dtype=torch.int64),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.numerator = state["numerator"].to(torch.float64)
        self.denominator = state["denominator"].to(torch.float64)
        self.cluster_ids = state["cluster_ids"].to(torch.int64)
        self.set_members(
            {
                cid: Member(float(w), float(n), int(r))
                for cid, w, n, r in zip(
                    state["member_ids"],
                    state["member_weight"].tolist(),
                    state["member_samples"].tolist(),
                    state["member_round"].tolist(),
                )
            }
        )
        self.publish()


@dataclass
class _Scored:
    client_id: str
    num_samples: float
    discrepancy: float
    baseline: float
    quality: float
    pairs: list[tuple[int, int, float, float]]


class SumsRound(RoundAggregation):
    """One round of the sums-only server: each update's term is folded into round accumulators and its weights into
    running model sums as it arrives; :meth:`finish` weighs the models and commits the round to the sums.

    The round's weights are those of :func:`~lightning_fedharmony.functional.aggregation_weights` over the clients'
    own scores; the model is the same weighted average, as linear combinations of running sums (``sum n_k q_k
    theta_k`` for ``"product"``, ``sum n_k theta_k`` and ``sum q_k theta_k`` for ``"additive"``).
    """

    def __init__(
        self,
        aggregator: FedHarmony,
        sums: ConsensusSums,
        server_round: int,
        global_weights: Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.sums = sums
        self.server_round = server_round
        self.global_weights = global_weights
        self._num_labels = sums.num_labels or None
        self._chunk: Tensor | None = None  # float32, at most CHUNK terms
        self._chunk_count = 0
        self._numerator: Tensor | None = None  # float64
        self._rows: list[tuple[float, Tensor]] = []
        self._denominator: Tensor | None = None  # float64
        self._scored: list[_Scored] = []
        self._new: dict[str, Member] = {}
        self._by_samples = WeightedModelSum()
        self._by_quality = WeightedModelSum()
        self._by_product = WeightedModelSum()
        # each update's integer entries (BatchNorm's counters: a few scalars), taken from the largest final weight
        self._integers: list[dict[str, Tensor]] = []

    def _add(self, update: Update) -> None:
        cid, term = update.client_id, update.term
        if term is None:
            raise ProtocolError(
                cid,
                "term",
                "FedHarmony(leave_one_out='client') needs each client's consensus term, but none was sent."
                " HINT: train the client with the library's client step (train_client, FederatedClient or the Flower"
                " ClientApp), which keeps a ConsensusMemory.",
            )
        update.validate(self.global_weights, stats_values=False)
        num_labels = term.num_labels
        if self._num_labels is None:
            self._num_labels = num_labels
        elif num_labels != self._num_labels:
            raise ProtocolError(cid, "term.valid", f"expected {self._num_labels} labels, but got {num_labels}.")
        expected = 1.0 if self.aggregator.consensus_weighting == "uniform" else float(update.num_samples)
        if term.weight != expected:
            raise ProtocolError(cid, "term.weight", f"expected {expected:g}, but got {term.weight:g}.")
        member = self.sums.members.get(cid) if self.aggregator.stale_stats == "keep" else None
        replaced = (member.round, member.weight) if member is not None else (0, 0.0)
        if (term.replaced_round, term.replaced_weight) != replaced:
            raise ProtocolError(
                cid,
                "term.replaced_round",
                f"expected the term of round {replaced[0]} (weight {replaced[1]:g}) replaced, but the update replaces"
                f" round {term.replaced_round} (weight {term.replaced_weight:g}).",
            )
        self._fold(term.delta)
        self._rows.append((term.weight, term.valid))
        if term.replaced_round > 0 and term.previous_valid is not None:
            self._rows.append((-term.replaced_weight, term.previous_valid))
        if len(self._rows) >= 2 * CHUNK:
            self._flush_rows()

        quality = self._quality(term.discrepancy, term.sampling_discrepancy, term.scored)
        n = float(update.num_samples)
        self._integers.append(integer_entries(update.weights))
        self._by_samples.add(update.weights, n)
        if self.aggregator.quality_aggregation:
            if self.aggregator.quality_weighting == "product":
                self._by_product.add(update.weights, n * quality)
            else:
                self._by_quality.add(update.weights, quality)
        pairs = [(int(a), int(b), float(r), float(t)) for a, b, r, t in term.pairs.tolist()]
        self._scored.append(_Scored(cid, n, term.discrepancy, term.sampling_discrepancy, quality, pairs))
        self._new[cid] = Member(term.weight, n, self.server_round)

    def _quality(self, discrepancy: float, baseline: float, scored: bool) -> float:
        if not scored:
            return 1.0
        as_tensor = torch.tensor([discrepancy], dtype=torch.float64), torch.tensor([baseline], dtype=torch.float64)
        return float(self.aggregator.quality(*as_tensor)[0])

    def _fold(self, delta: Tensor) -> None:
        if self._chunk is None:
            self._chunk = delta.detach().to(torch.float32, copy=True)
        else:
            self._chunk.add_(delta)
        self._chunk_count += 1
        if self._chunk_count >= CHUNK:
            self._flush_chunk()

    def _flush_chunk(self) -> None:
        if self._chunk is None:
            return
        if self._numerator is None:
            self._numerator = self._chunk.to(torch.float64)
        else:
            self._numerator.add_(self._chunk)
        self._chunk, self._chunk_count = None, 0

    def _flush_rows(self) -> None:
        if not self._rows:
            return
        weights = torch.tensor([w for w, _ in self._rows], dtype=torch.float64)
        rows = torch.stack([v for _, v in self._rows]).to(torch.float64)
        block = (rows * weights[:, None]).T @ rows
        self._denominator = block if self._denominator is None else self._denominator.add_(block)
        self._rows = []

    def finish(self) -> AggregationResult:
        if not self._scored:
            raise ValueError("Expected at least one client update to aggregate, but got none.")
        self._flush_chunk()
        self._flush_rows()
        agg = self.aggregator
        n = torch.tensor([s.num_samples for s in self._scored], dtype=torch.float64)
        quality = torch.tensor([s.quality for s in self._scored], dtype=torch.float64)
        # (first sum, a, second sum, b) of the model `a S_1 / sum_1 + b S_2 / sum_2`
        mix: tuple[WeightedModelSum, float, WeightedModelSum | None, float]
        if agg.quality_aggregation and agg.quality_weighting == "product" and self._by_product.total > 0:
            weights = aggregation_weights(n, quality, self.server_round, agg._t0(), mode="product")
            mix = (self._by_product, 1.0, None, 0.0)
        elif agg.quality_aggregation and agg.quality_weighting == "additive":
            alpha = balance_factor(self.server_round, agg._t0())
            weights = aggregation_weights(n, quality, self.server_round, agg._t0(), mode="additive")
            mix = (self._by_samples, alpha, self._by_quality, 1.0 - alpha)
        else:  # sample weights (also when every quality underflowed to 0)
            weights = n / n.sum()
            mix = (self._by_samples, 1.0, None, 0.0)
        # integer entries from the largest final weight, as `weighted_average` picks them
        model = _mixed(*mix, integers=self._integers[int(torch.argmax(weights))])
        numerator = self._numerator if self._numerator is not None else torch.zeros(0, 0, dtype=torch.float64)
        denominator = self._denominator if self._denominator is not None else torch.zeros_like(numerator)
        self._commit(numerator, denominator)
        consensus = self.sums.consensus(torch.float64)
        assert consensus is not None  # committed above
        self.sums.cluster_ids = agg._label_blocks(consensus)
        self.sums.publish()
        report = {
            s.client_id: {
                "num_samples": s.num_samples,
                "discrepancy": s.discrepancy,
                "sampling_discrepancy": s.baseline,
                "quality": s.quality,
            }
            for s in self._scored
        }
        agg._report = (report, {s.client_id: s.pairs for s in self._scored})
        discrepancy = [s.discrepancy for s in self._scored]
        metrics = {
            "num_blocks": float(int(self.sums.cluster_ids.max()) + 1),
            "balance_factor": balance_factor(self.server_round, agg._t0()) if agg.quality_aggregation else 1.0,
            "discrepancy_mean": sum(discrepancy) / len(discrepancy),
            "quality_min": float(quality.min()),
            "consensus_abs_mean": float(off_diagonal_abs_mean(consensus)),
        }
        model = agg.server_step(self.server_round, model, self.global_weights, metrics)  # last: the round is in
        return AggregationResult(
            weights=model,
            client_weights={s.client_id: float(w) for s, w in zip(self._scored, weights.tolist())},
            metrics=metrics,
            client_metrics=report,
            client_pairs={s.client_id: s.pairs for s in self._scored},
        )

    def _commit(self, numerator: Tensor, denominator: Tensor) -> None:
        sums = self.sums
        if self.aggregator.stale_stats == "drop" or sums.num_labels == 0:
            sums.numerator, sums.denominator = numerator, denominator
            if self.aggregator.stale_stats == "drop":
                sums.set_members(dict(self._new))
            else:
                sums.update_members(self._new)
        else:
            sums.numerator.add_(numerator)
            sums.denominator.add_(denominator)
            sums.update_members(self._new)
        # removing the last supporter of a pair leaves rounding residue: a denominator within a few ulps of the
        # total weight of zero is no support
        tiny = 16 * torch.finfo(torch.float64).eps * max(sums.total_weight, 1.0)
        sums.denominator.masked_fill_(sums.denominator.abs() <= tiny, 0.0)
        sums.cluster_ids = torch.zeros(sums.numerator.shape[0], dtype=torch.int64)


def _mixed(
    first: WeightedModelSum, a: float, second: WeightedModelSum | None, b: float, *, integers: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``a S_1 / sum_1 + b S_2 / sum_2`` in the clients' dtypes (a zero coefficient drops its sum), with the entries
    that are not averaged (integer counters) from ``integers``."""
    out: dict[str, Tensor] = {}
    for key, dtype in first.dtypes.items():
        if key not in first.sums:
            out[key] = integers[key]
            continue
        value = first.sums[key] * (a / first.total)
        if second is not None and b > 0 and second.total > 0:
            value.add_(second.sums[key], alpha=b / second.total)
        out[key] = value.to(dtype)
    return out
