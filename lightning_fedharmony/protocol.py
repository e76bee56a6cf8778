"""The client protocol: what the server sends a client for a round (:class:`Instruction`) and what comes back
(:class:`Update`).

Every runner moves these two messages: :class:`~lightning_fedharmony.orchestrator.Federation` in memory, ``fedharmony
serve`` through a shared folder (:mod:`lightning_fedharmony.transports.folder`), and the Flower strategy. Each message
is validated in one place (:meth:`Instruction.validate`, :meth:`Update.validate`) with one error type,
:class:`ProtocolError`, which names the client and the field; each has one array form (``to_arrays`` /
``from_arrays``: a flat dict of numpy arrays, scalars as 0-d arrays) that a transport encodes as it likes.

Example:
    >>> import torch
    >>> instruction = Instruction(weights={"w": torch.zeros(2)}, local_epochs=2, server_round=1)
    >>> Instruction.from_arrays(instruction.to_arrays(), client_id="0").local_epochs
    2
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fedharmony.functional.correlation import _NORMALIZATIONS as NORMALIZATIONS
from lightning_fedharmony.functional.losses import CLIENT_PROXIMAL_SCALINGS, PROXIMAL_ROWS
from lightning_fedharmony.metrics import validate_report_state
from lightning_fedharmony.stats import STATS_FIELDS, CorrelationStats, validate_stats_state

#: Settings an instruction may carry besides weights, teacher and mask: name -> python type (``None`` = keep).
SETTINGS: dict[str, type] = {
    "alignment_weight": float,
    "proximal_mu": float,
    "proximal_scaling": str,
    "proximal_rows": str,
    "proximal_full_at": float,
    "proximal_absent": float,
    "proximal_reference_labels": float,
    "corr_normalization": str,
    "corr_eps": float,
    "corr_momentum": float,
    "detach_marginals": bool,
    "local_epochs": int,
    "server_round": int,
    "seed": int,
    "collect_stats": bool,
    "eval_bins": int,
}
_WEIGHTS, _STATS, _METRICS, _REPORT = "weights.", "stats.", "metrics.", "report."
_CONSENSUS, _TERM = "consensus.", "term."


class ProtocolError(ValueError):
    """A malformed instruction or update; names the client and the field.

    Attributes:
        client_id: the client the message is for, or from.
        field: the field at fault (``weights.<name>``, ``stats.<name>``, a setting's name).
        message: what is wrong with it.
    """

    def __init__(self, client_id: str, field: str, message: str) -> None:
        self.client_id = client_id
        self.field = field
        self.message = message
        super().__init__(f"Client {client_id!r}, field `{field}`: {message}")


def _tensor_field(client_id: str, name: str, value: Any, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    if not isinstance(value, Tensor) or tuple(value.shape) != shape or value.dtype != dtype:
        got = f"{tuple(value.shape)} {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
        raise ProtocolError(client_id, name, f"expected a {dtype} tensor of shape {shape}, but got {got}.")


def _finite_within(client_id: str, name: str, value: Tensor, bound: float) -> None:
    if value.numel() == 0:
        return
    low, high = torch.aminmax(value)  # one pass; NaN propagates
    if not (math.isfinite(float(low)) and math.isfinite(float(high))) or max(-float(low), float(high)) > bound:
        raise ProtocolError(
            client_id, name, f"expected finite values within [-{bound:g}, {bound:g}], but it holds others."
        )


@dataclass
class ConsensusShare:
    """The consensus a server that keeps only sums sends a client (FedHarmony with ``leave_one_out="client"``):
    the client removes its own term to get its leave-one-out teacher
    (:class:`~lightning_fedharmony.client_terms.ConsensusMemory`).

    Attributes:
        numerator: ``(L, L)`` float32 ``S = sum_j w_j V_j R_j`` over the clients in the consensus (``L = 0``: the
            server holds no sums yet, round 1).
        denominator: ``(L, L)`` float32 ``D = sum_j w_j V_j``.
        cluster_ids: ``(L,)`` int64 label blocks; pairs within a block are aligned.
        total_samples: the sample count of the clients in the consensus.
        total_weight: the sum of their weights (bounds ``|S|`` and ``D``).
        weighting: each client's weight in the sums: ``"samples"`` (``n_k``) or ``"uniform"`` (1).
        own_weight: the weight of this client's term in the sums (0: it has none there).
        own_samples: the sample count behind that term.
        own_round: the round of that term (0: none).
        replace_own: the client's next term replaces that one (the server keeps stale terms); ``False``: the
            server builds new sums from this round's terms alone.
        min_label_rate: labels predicted below this rate are invalid for the client's term.
        align_threshold: align only pairs whose teacher has ``|R*| >=`` this value.
    """

    numerator: Tensor
    denominator: Tensor
    cluster_ids: Tensor
    total_samples: float
    total_weight: float
    weighting: str = "samples"
    own_weight: float = 0.0
    own_samples: float = 0.0
    own_round: int = 0
    replace_own: bool = True
    min_label_rate: float = 1e-3
    align_threshold: float = 0.0

    @property
    def num_labels(self) -> int:
        return int(self.cluster_ids.shape[0]) if isinstance(self.cluster_ids, Tensor) else 0

    def validate(self, client_id: str, *, values: bool = True) -> None:
        """Check every field; ``values=False`` leaves the sums' ``L x L`` values unread (the server's own sums, which it
        built from screened terms: reading them again for each client's instruction would cost ``K L^2`` a round).

        Raises:
            ProtocolError: naming ``client_id`` and the first field at fault (``consensus.<name>``).
        """
        ids = self.cluster_ids
        if not isinstance(ids, Tensor) or ids.ndim != 1 or ids.dtype != torch.int64:
            got = f"{tuple(ids.shape)} {ids.dtype}" if isinstance(ids, Tensor) else type(ids).__name__
            raise ProtocolError(client_id, f"{_CONSENSUS}cluster_ids", f"expected an int64 tensor (L,), but got {got}.")
        num_labels = ids.shape[0]
        if num_labels == 0 and self.total_weight != 0:
            raise ProtocolError(
                client_id, f"{_CONSENSUS}cluster_ids", "expected labels (L >= 1) with sums of a positive weight."
            )
        if num_labels and (int(ids.min()) < 0 or int(ids.max()) >= num_labels):
            raise ProtocolError(client_id, f"{_CONSENSUS}cluster_ids", f"expected ids in [0, {num_labels}).")
        for name in ("numerator", "denominator"):
            _tensor_field(
                client_id, f"{_CONSENSUS}{name}", getattr(self, name), (num_labels, num_labels), torch.float32
            )
        if values:
            bound = float(self.total_weight) * (1 + 1e-4) + 1e-6
            _finite_within(client_id, f"{_CONSENSUS}numerator", self.numerator, bound)
            _finite_within(client_id, f"{_CONSENSUS}denominator", self.denominator, bound)
        if self.weighting not in ("samples", "uniform"):
            raise ProtocolError(
                client_id, f"{_CONSENSUS}weighting", f"expected 'samples' or 'uniform', but got {self.weighting!r}."
            )
        names = ("total_samples", "total_weight", "own_weight", "own_samples", "min_label_rate", "align_threshold")
        _check_nonnegative(client_id, _CONSENSUS, self, names)
        if isinstance(self.own_round, bool) or not isinstance(self.own_round, int) or self.own_round < 0:
            raise ProtocolError(
                client_id, f"{_CONSENSUS}own_round", f"expected an int >= 0, but got {self.own_round!r}."
            )
        if not isinstance(self.replace_own, bool):
            raise ProtocolError(
                client_id, f"{_CONSENSUS}replace_own", f"expected a bool, but got {self.replace_own!r}."
            )
        if (self.own_weight > 0) != (self.own_round > 0):
            raise ProtocolError(
                client_id, f"{_CONSENSUS}own_round", "expected a round > 0 exactly when `own_weight` > 0."
            )

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The share as ``consensus.<name>`` entries."""
        return {f"{_CONSENSUS}{f.name}": _numpy_value(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], client_id: str) -> ConsensusShare:
        """Rebuild (without validating) what :meth:`to_arrays` wrote; ``arrays`` holds the ``consensus.`` entries."""
        return cls(
            **_entries_from(cls, arrays, _CONSENSUS, client_id, tensors=("numerator", "denominator", "cluster_ids"))
        )


@dataclass
class ConsensusTerm:
    """What a client of a sums-only server returns in place of its statistics (FedHarmony with
    ``leave_one_out="client"``): the change of its term in the consensus sums, and its own score.

    Attributes:
        delta: ``(L, L)`` float32 ``w_k V_k R_k`` minus the term it replaces (``replaced_round``).
        valid: ``(L,)`` bool, the labels valid in the new term.
        weight: ``w_k``, the new term's weight in the sums.
        replaced_round: the round of the term it replaces (0: none).
        replaced_weight: the weight of the replaced term, as the server sent it (``own_weight``; 0: none).
        previous_valid: ``(L,)`` bool, the valid labels of the replaced term (all ``False`` when none).
        discrepancy: ``s_k`` of the new correlation against the teacher it trained with (0 without a teacher).
        sampling_discrepancy: what sampling alone would give for it (0 without a teacher).
        scored: whether it had a teacher to be scored against.
        pairs: ``(P, 4)`` float64 ``(a, b, R_k, R*_k)``, the pairs where it departs most from its teacher.
    """

    delta: Tensor
    valid: Tensor
    weight: float
    replaced_round: int = 0
    replaced_weight: float = 0.0
    previous_valid: Tensor | None = None
    discrepancy: float = 0.0
    sampling_discrepancy: float = 0.0
    scored: bool = False
    pairs: Tensor = field(default_factory=lambda: torch.zeros(0, 4, dtype=torch.float64))

    @property
    def num_labels(self) -> int:
        return int(self.valid.shape[0]) if isinstance(self.valid, Tensor) else 0

    def validate(self, client_id: str, *, values: bool = True) -> None:
        """Check every field; ``values=False`` leaves the ``L x L`` values to a screening already done.

        Raises:
            ProtocolError: naming ``client_id`` and the first field at fault (``term.<name>``).
        """
        valid = self.valid
        if not isinstance(valid, Tensor) or valid.ndim != 1 or valid.dtype != torch.bool or valid.numel() == 0:
            got = f"{tuple(valid.shape)} {valid.dtype}" if isinstance(valid, Tensor) else type(valid).__name__
            raise ProtocolError(client_id, f"{_TERM}valid", f"expected a non-empty bool tensor (L,), but got {got}.")
        num_labels = valid.shape[0]
        _tensor_field(client_id, f"{_TERM}delta", self.delta, (num_labels, num_labels), torch.float32)
        previous = self.previous_valid if self.previous_valid is not None else valid
        _tensor_field(client_id, f"{_TERM}previous_valid", previous, (num_labels,), torch.bool)
        _check_nonnegative(client_id, _TERM, self, ("weight", "replaced_weight", "discrepancy", "sampling_discrepancy"))
        if not self.weight > 0:
            raise ProtocolError(client_id, f"{_TERM}weight", f"expected a value > 0, but got {self.weight!r}.")
        if isinstance(self.replaced_round, bool) or not isinstance(self.replaced_round, int) or self.replaced_round < 0:
            raise ProtocolError(
                client_id, f"{_TERM}replaced_round", f"expected an int >= 0, but got {self.replaced_round!r}."
            )
        if (self.replaced_round > 0) != (self.replaced_weight > 0):
            raise ProtocolError(
                client_id, f"{_TERM}replaced_round", "expected a round > 0 exactly when `replaced_weight` > 0."
            )
        if not isinstance(self.scored, bool):
            raise ProtocolError(client_id, f"{_TERM}scored", f"expected a bool, but got {self.scored!r}.")
        pairs = self.pairs
        if not isinstance(pairs, Tensor) or pairs.ndim != 2 or pairs.shape[1] != 4 or not pairs.is_floating_point():
            got = str(tuple(pairs.shape)) if isinstance(pairs, Tensor) else type(pairs).__name__
            raise ProtocolError(client_id, f"{_TERM}pairs", f"expected a float tensor (P, 4), but got {got}.")
        if values:
            # |w V R - w' V' R'| <= w + w' for correlations in [-1, 1]
            _finite_within(client_id, f"{_TERM}delta", self.delta, (self.weight + self.replaced_weight) * (1 + 1e-5))

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The term as ``term.<name>`` entries."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        if values["previous_valid"] is None:
            values["previous_valid"] = torch.zeros_like(self.valid)
        return {f"{_TERM}{name}": _numpy_value(value) for name, value in values.items()}

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], client_id: str) -> ConsensusTerm:
        """Rebuild (without validating) what :meth:`to_arrays` wrote; ``arrays`` holds the ``term.`` entries."""
        return cls(
            **_entries_from(cls, arrays, _TERM, client_id, tensors=("delta", "valid", "previous_valid", "pairs"))
        )


@dataclass
class Instruction:
    """What the server sends one selected client for a round; every setting left ``None`` keeps the module's own.

    Attributes:
        weights: the global weights to start from.
        teacher: ``(L, L)`` consensus of the other clients, or ``None`` (no alignment this round).
        mask: ``(L, L)`` bool pairs to align, or ``None``.
        alignment_weight: ``lambda`` for this round.
        proximal_mu: FedProx's ``mu`` (0 = off).
        proximal_scaling: how the client scales ``mu`` over its local epochs: ``"none"`` or ``"drift"``
            (:func:`~lightning_fedharmony.functional.drift_proximal_scale`).
        proximal_rows: ``"uniform"`` or ``"labels"`` (the output rows pulled per label,
            :func:`~lightning_fedharmony.functional.label_proximal_scale`).
        proximal_full_at: positives of a label at which its output row gets the full ``mu``.
        proximal_absent: factor on ``mu`` for the output rows of labels without a positive.
        proximal_reference_labels: a model over ``L`` labels trains with ``mu`` times ``max(1,
            proximal_reference_labels / L)``; 0 keeps ``mu``.
        corr_normalization: the teacher's soft phi normalisation; the client's batch correlation must use the same
            scale, so it follows the server's.
        corr_eps: the teacher's soft phi ``eps``, followed by the client for the same reason.
        detach_marginals: whether the client's batch correlation stops gradients through its variances.
        corr_momentum: the client's running-moment momentum for the batch correlation.
        local_epochs: epochs to train this round (``None``: the runner's or the client's own).
        server_round: the round this instruction belongs to, counted from 1.
        seed: seeds the client's training this round (``torch.manual_seed`` when installed), so that the same round
            trains the same way wherever the client runs.
        collect_stats: whether the server needs the client's prediction statistics (``None``: the client decides).
        eval_bins: in an evaluation request, the binned average precision over this many thresholds (the private
            option: the report then holds counts, no per-sample score); ``None``: exact scores.
        consensus: the consensus sums of a server that keeps no per-client state, from which the client builds its
            own teacher and mask (:class:`ConsensusShare`); ``None`` otherwise.
    """

    weights: dict[str, Tensor]
    teacher: Tensor | None = None
    mask: Tensor | None = None
    alignment_weight: float | None = None
    proximal_mu: float | None = None
    proximal_scaling: str | None = None
    proximal_rows: str | None = None
    proximal_full_at: float | None = None
    proximal_absent: float | None = None
    proximal_reference_labels: float | None = None
    corr_normalization: str | None = None
    corr_eps: float | None = None
    detach_marginals: bool | None = None
    corr_momentum: float | None = None
    local_epochs: int | None = None
    server_round: int | None = None
    seed: int | None = None
    collect_stats: bool | None = None
    eval_bins: int | None = None
    consensus: ConsensusShare | None = None

    def settings(self) -> dict[str, Any]:
        """The settings that are set (not ``None``)."""
        return {name: getattr(self, name) for name in SETTINGS if getattr(self, name) is not None}

    def validate(self, client_id: str, *, consensus_values: bool = True) -> None:
        """Check every field; the one place an instruction is checked, whichever runner sends or receives it.
        ``consensus_values=False`` leaves the consensus share's ``L x L`` values unread: for the server checking
        the instructions it made itself, once per client, from one set of sums (a client reading an instruction
        checks them).

        Raises:
            ProtocolError: naming ``client_id`` and the first field at fault.
        """
        _check_weights(client_id, self.weights)
        if (self.teacher is None) != (self.mask is None):
            raise ProtocolError(client_id, "mask", "expected `teacher` and `mask` together, but got only one.")
        if self.teacher is not None and self.mask is not None:
            teacher, mask = self.teacher, self.mask
            if not isinstance(teacher, Tensor) or teacher.ndim != 2 or teacher.shape[0] != teacher.shape[1]:
                shape = tuple(teacher.shape) if isinstance(teacher, Tensor) else type(teacher).__name__
                raise ProtocolError(client_id, "teacher", f"expected a tensor of shape (L, L), but got {shape}.")
            if not teacher.is_floating_point():
                raise ProtocolError(client_id, "teacher", f"expected a float tensor, but got {teacher.dtype}.")
            if not bool(torch.isfinite(teacher).all()) or float(teacher.abs().max()) > 1.0 + 1e-6:
                raise ProtocolError(client_id, "teacher", "expected finite values in [-1, 1], but it holds others.")
            if not isinstance(mask, Tensor) or mask.shape != teacher.shape or mask.dtype != torch.bool:
                got = f"{tuple(mask.shape)} {mask.dtype}" if isinstance(mask, Tensor) else type(mask).__name__
                raise ProtocolError(
                    client_id, "mask", f"expected a bool tensor of shape {tuple(teacher.shape)}, but got {got}."
                )
        for name, kind in SETTINGS.items():
            value = getattr(self, name)
            if value is not None:
                _check_setting(client_id, name, kind, value)
        if self.consensus is not None:
            if not isinstance(self.consensus, ConsensusShare):
                raise ProtocolError(
                    client_id,
                    "consensus",
                    f"expected a ConsensusShare or None, but got {type(self.consensus).__name__}.",
                )
            self.consensus.validate(client_id, values=consensus_values)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The instruction as a flat dict of numpy arrays: ``weights.<name>``, ``teacher``, ``mask``, each set
        setting as a 0-d array and ``consensus.<name>``."""
        arrays = {f"{_WEIGHTS}{name}": _numpy(tensor) for name, tensor in self.weights.items()}
        if self.teacher is not None and self.mask is not None:
            arrays["teacher"] = _numpy(self.teacher.to(torch.float32))
            arrays["mask"] = _numpy(self.mask.to(torch.bool))
        arrays.update({name: np.asarray(value) for name, value in self.settings().items()})
        if self.consensus is not None:
            arrays.update(self.consensus.to_arrays())
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any], client_id: str) -> Instruction:
        """Rebuild and validate what :meth:`to_arrays` wrote (0-d arrays or plain scalars both read).

        Raises:
            ProtocolError: naming ``client_id`` and the entry that is unknown, missing or malformed.
        """
        known = set(SETTINGS) | {"teacher", "mask"}
        unknown = sorted(k for k in arrays if not k.startswith((_WEIGHTS, _CONSENSUS)) and k not in known)
        if unknown:
            raise ProtocolError(
                client_id, unknown[0], f"unknown entry; expected `weights.*`, `consensus.*` or one of {sorted(known)}."
            )
        values: dict[str, Any] = {"weights": _weights_from(arrays, client_id)}
        for name in ("teacher", "mask"):
            if name in arrays:
                values[name] = _tensor_from(arrays[name], client_id, name)
        for name, kind in SETTINGS.items():
            if name in arrays:
                values[name] = _scalar_from(arrays[name], client_id, name, kind)
        if any(k.startswith(_CONSENSUS) for k in arrays):
            values["consensus"] = ConsensusShare.from_arrays(arrays, client_id)
        instruction = cls(**values)
        instruction.validate(client_id)
        return instruction


@dataclass
class Update:
    """What a client returns after local training.

    Attributes:
        client_id: the client's name.
        weights: its model weights (:func:`~lightning_fedharmony.mixin.model_weights`).
        num_samples: number of training samples it used (``n_k``).
        stats: its prediction statistics (FedHarmony), or ``None``.
        metrics: scalars it reports (``train_loss``, timings).
        term: in place of ``stats`` for a server that keeps only consensus sums: the change of the client's term in
            them and its own score (:class:`ConsensusTerm`).
    """

    client_id: str
    weights: dict[str, Tensor]
    num_samples: int
    stats: CorrelationStats | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    term: ConsensusTerm | None = None

    def validate(self, reference: Mapping[str, Tensor] | None = None, *, stats_values: bool = True) -> None:
        """Check every field, and the weights against ``reference`` (the global weights) when given.

        ``stats_values=False`` checks the statistics' type only, not their ``L x L`` values: for a server step whose
        runner already screened the update (:class:`~lightning_fedharmony.faults.UpdateCollector`), so that the
        values are read once per round, not twice.

        Raises:
            ProtocolError: naming the client and the first field at fault.
        """
        cid = _check_sender(self.client_id, self.num_samples, minimum=1)
        _check_weights(cid, self.weights, reference)
        if self.stats is not None:
            if not isinstance(self.stats, CorrelationStats):
                raise ProtocolError(
                    cid, "stats", f"expected CorrelationStats or None, but got {type(self.stats).__name__}."
                )
            if stats_values:
                try:
                    validate_stats_state(self.stats.state_dict())
                except ValueError as err:
                    raise ProtocolError(cid, "stats", str(err)) from None
        for name, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(cid, f"metrics.{name}", f"expected a float, but got {value!r}.")
        if self.term is not None:
            if not isinstance(self.term, ConsensusTerm):
                raise ProtocolError(
                    cid, "term", f"expected a ConsensusTerm or None, but got {type(self.term).__name__}."
                )
            self.term.validate(cid, values=stats_values)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The update as a flat dict of numpy arrays: ``client_id``, ``num_samples``, ``weights.<name>``,
        ``stats.<name>`` (float64 sums) and ``metrics.<name>``."""
        arrays: dict[str, np.ndarray] = {
            "client_id": np.asarray(self.client_id),
            "num_samples": np.asarray(self.num_samples),
        }
        arrays.update({f"{_WEIGHTS}{name}": _numpy(tensor) for name, tensor in self.weights.items()})
        if self.stats is not None:
            arrays.update({f"{_STATS}{name}": _numpy(t) for name, t in self.stats.state_dict().items()})
        arrays.update({f"{_METRICS}{name}": np.asarray(float(v), dtype=np.float64) for name, v in self.metrics.items()})
        if self.term is not None:
            arrays.update(self.term.to_arrays())
        return arrays

    @classmethod
    def from_arrays(
        cls,
        arrays: Mapping[str, Any],
        client_id: str | None = None,
        reference: Mapping[str, Tensor] | None = None,
        min_label_rate: float = 1e-3,
    ) -> Update:
        """Rebuild and validate what :meth:`to_arrays` wrote.

        Args:
            arrays: the flat dict.
            client_id: the client the update must come from (``None``: whichever it names).
            reference: the global weights the update must match.
            min_label_rate: of the rebuilt statistics.

        Raises:
            ProtocolError: naming the client and the entry that is missing, unknown or malformed.
        """
        named = _reply_sender(arrays, client_id, "update", (_WEIGHTS, _STATS, _METRICS, _TERM))
        stats = None
        stats_arrays = {k[len(_STATS) :]: arrays[k] for k in arrays if k.startswith(_STATS)}
        if stats_arrays:
            state = {}
            for name in STATS_FIELDS:
                if name not in stats_arrays:
                    raise ProtocolError(named, f"stats.{name}", "expected an entry, but it is missing.")
                array = np.asarray(stats_arrays[name])
                if array.dtype != np.float64:
                    raise ProtocolError(named, f"stats.{name}", f"expected float64, but got {array.dtype}.")
                state[name] = torch.from_numpy(array.copy())
            try:
                validate_stats_state(state)
            except ValueError as err:
                raise ProtocolError(named, "stats", str(err)) from None
            stats = CorrelationStats.from_state_dict(state, min_label_rate=min_label_rate)
        metrics = {
            k[len(_METRICS) :]: _scalar_from(arrays[k], named, k, float) for k in arrays if k.startswith(_METRICS)
        }
        update = cls(
            client_id=named,
            weights=_weights_from(arrays, named),
            num_samples=_scalar_from(arrays["num_samples"], named, "num_samples", int),
            stats=stats,
            metrics=metrics,
            term=ConsensusTerm.from_arrays(arrays, named) if any(k.startswith(_TERM) for k in arrays) else None,
        )
        update.validate(reference)
        return update


@dataclass
class Evaluation:
    """What a client returns for an evaluation request: the metric state of the global model on its held-out split.

    An evaluation request is an :class:`Instruction` holding the global weights, the round and ``eval_bins``. The
    client answers with the :meth:`~lightning_fedharmony.metrics.MultilabelReport.export_state` of its held-out data
    (summed counts and moments, and the exact scores or, with ``eval_bins``, binned counts), so that the server's
    ``merge_state`` of every client's report equals one pass over the union of their held-out data.

    Attributes:
        client_id: the client's name.
        num_samples: held-out samples it evaluated (0: it has no held-out split; ``report`` is then ``None``).
        report: the report's state, or ``None`` without held-out data.
        metrics: scalars it reports (``seconds``).
    """

    client_id: str
    num_samples: int
    report: dict[str, Tensor] | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    def validate(self, bins: int | None = None, *, check_bins: bool = False) -> None:
        """Check every field; with ``check_bins`` also that the report is of the requested mode (``bins``).

        Raises:
            ProtocolError: naming the client and the first field at fault.
        """
        cid = _check_sender(self.client_id, self.num_samples, minimum=0)
        n = self.num_samples
        if (self.report is None) != (n == 0):
            raise ProtocolError(cid, "report", f"expected a report exactly when num_samples > 0, but got {n} samples.")
        if self.report is not None:
            if not isinstance(self.report, Mapping):
                raise ProtocolError(cid, "report", f"expected a dict of tensors, but got {type(self.report).__name__}.")
            try:
                _, got_bins = validate_report_state(self.report)
            except ValueError as err:
                raise ProtocolError(cid, "report", str(err)) from None
            if int(self.report["num_samples"]) != n:
                raise ProtocolError(
                    cid,
                    "num_samples",
                    f"expected the report's num_samples {int(self.report['num_samples'])}, but got {n}.",
                )
            if check_bins and got_bins != bins:
                raise ProtocolError(cid, "report", f"expected a report with eval_bins={bins}, but got {got_bins}.")
        for name, value in self.metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ProtocolError(cid, f"metrics.{name}", f"expected a float, but got {value!r}.")

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The evaluation as a flat dict of numpy arrays: ``client_id``, ``num_samples``, ``report.<name>`` and
        ``metrics.<name>``."""
        arrays: dict[str, np.ndarray] = {
            "client_id": np.asarray(self.client_id),
            "num_samples": np.asarray(self.num_samples),
        }
        arrays.update({f"{_REPORT}{name}": _numpy(t) for name, t in (self.report or {}).items()})
        arrays.update({f"{_METRICS}{name}": np.asarray(float(v), dtype=np.float64) for name, v in self.metrics.items()})
        return arrays

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, Any], client_id: str | None = None, bins: int | None = None
    ) -> Evaluation:
        """Rebuild and validate what :meth:`to_arrays` wrote; the report must be of the requested mode (``bins``).

        Raises:
            ProtocolError: naming the client and the entry that is missing, unknown or malformed.
        """
        named = _reply_sender(arrays, client_id, "evaluation", (_REPORT, _METRICS))
        report = {k[len(_REPORT) :]: _tensor_from(arrays[k], named, k) for k in arrays if k.startswith(_REPORT)}
        evaluation = cls(
            client_id=named,
            num_samples=_scalar_from(arrays["num_samples"], named, "num_samples", int),
            report=report or None,
            metrics={
                k[len(_METRICS) :]: _scalar_from(arrays[k], named, k, float) for k in arrays if k.startswith(_METRICS)
            },
        )
        evaluation.validate(bins, check_bins=True)
        return evaluation


def _reply_sender(arrays: Mapping[str, Any], client_id: str | None, kind: str, prefixes: tuple[str, ...]) -> str:
    """The client a reply's arrays name, after checking that it is ``client_id`` (``None``: any), that every entry is
    ``client_id``, ``num_samples`` or under one of ``prefixes``, and that ``num_samples`` is there.

    Raises:
        ProtocolError: naming the client and the entry that is missing or unknown.
    """
    source = client_id or "?"
    if "client_id" not in arrays:
        raise ProtocolError(source, "client_id", "expected an entry, but it is missing.")
    named = _scalar_from(arrays["client_id"], source, "client_id", str)
    if client_id is not None and named != client_id:
        raise ProtocolError(client_id, "client_id", f"expected {client_id!r}, but the {kind} names {named!r}.")
    unknown = sorted(k for k in arrays if k not in ("client_id", "num_samples") and not k.startswith(prefixes))
    if unknown:
        expected = ", ".join(f"{prefix}*" for prefix in prefixes[:-1]) + f" or {prefixes[-1]}*"
        raise ProtocolError(named, unknown[0], f"unknown entry; expected client_id, num_samples, {expected}.")
    if "num_samples" not in arrays:
        raise ProtocolError(named, "num_samples", "expected an entry, but it is missing.")
    return named


def instruction_fields() -> list[str]:
    """Names of :class:`Instruction`'s fields, in order."""
    return [f.name for f in fields(Instruction)]


def _check_sender(client_id: Any, num_samples: Any, minimum: int) -> str:
    """The client id of a reply (a non-empty str) after checking it and its sample count (an int >= ``minimum``)."""
    if not isinstance(client_id, str) or not client_id:
        raise ProtocolError(str(client_id), "client_id", f"expected a non-empty str, but got {client_id!r}.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ProtocolError(client_id, "num_samples", f"expected {rule}, but got {num_samples!r}.")
    return client_id


def _check_nonnegative(client_id: str, prefix: str, message: Any, names: tuple[str, ...]) -> None:
    """Each of the fields ``names`` of ``message`` is a finite float >= 0."""
    for name in names:
        value = getattr(message, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
            raise ProtocolError(client_id, f"{prefix}{name}", f"expected a finite float >= 0, but got {value!r}.")


def _numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy().copy()


def _numpy_value(value: Any) -> np.ndarray:
    return _numpy(value) if isinstance(value, Tensor) else np.asarray(value)


def _entries_from(
    cls: type, arrays: Mapping[str, Any], prefix: str, client_id: str, tensors: tuple[str, ...]
) -> dict[str, Any]:
    """The fields of dataclass ``cls`` from ``<prefix><name>`` entries: tensors, or scalars of the field's type."""
    kinds = {"float": float, "int": int, "bool": bool, "str": str}
    values: dict[str, Any] = {}
    for f in fields(cls):
        entry = f"{prefix}{f.name}"
        if entry not in arrays:
            raise ProtocolError(client_id, entry, "expected an entry, but it is missing.")
        if f.name in tensors:
            values[f.name] = _tensor_from(arrays[entry], client_id, entry)
        else:
            values[f.name] = _scalar_from(arrays[entry], client_id, entry, kinds[str(f.type)])
    unknown = sorted(k for k in arrays if k.startswith(prefix) and k[len(prefix) :] not in values)
    if unknown:
        raise ProtocolError(
            client_id, unknown[0], f"unknown entry; expected one of {sorted(prefix + n for n in values)}."
        )
    return values


def _check_weights(client_id: str, weights: Any, reference: Mapping[str, Tensor] | None = None) -> None:
    if not isinstance(weights, Mapping) or not weights:
        raise ProtocolError(client_id, "weights", f"expected a non-empty mapping of tensors, but got {weights!r:.60}.")
    if reference is not None and set(weights) != set(reference):
        missing = sorted(set(reference) - set(weights))
        extra = sorted(set(weights) - set(reference))
        raise ProtocolError(client_id, "weights", f"parameter names differ: missing {missing}, extra {extra}.")
    for name, tensor in weights.items():
        if not isinstance(tensor, Tensor):
            raise ProtocolError(client_id, f"weights.{name}", f"expected a tensor, but got {type(tensor).__name__}.")
        if reference is not None:
            expected = reference[name]
            if tensor.shape != expected.shape:
                raise ProtocolError(
                    client_id,
                    f"weights.{name}",
                    f"expected shape {tuple(expected.shape)}, but got {tuple(tensor.shape)}.",
                )
            if tensor.dtype != expected.dtype:
                raise ProtocolError(
                    client_id, f"weights.{name}", f"expected dtype {expected.dtype}, but got {tensor.dtype}."
                )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ProtocolError(client_id, f"weights.{name}", "holds NaN or inf.")


def _check_setting(client_id: str, name: str, kind: type, value: Any) -> None:
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, str)
    if not ok:
        raise ProtocolError(client_id, name, f"expected a {kind.__name__} or None, but got {value!r}.")
    rules: dict[str, tuple[bool, str]] = {
        "alignment_weight": (name != "alignment_weight" or value >= 0, ">= 0"),
        "proximal_mu": (name != "proximal_mu" or value >= 0, ">= 0"),
        "proximal_full_at": (name != "proximal_full_at" or value > 0, "> 0"),
        "proximal_absent": (name != "proximal_absent" or value >= 0, ">= 0"),
        "proximal_reference_labels": (name != "proximal_reference_labels" or value >= 0, ">= 0"),
        "corr_eps": (name != "corr_eps" or value > 0, "> 0"),
        "corr_momentum": (name != "corr_momentum" or 0 <= value < 1, "in [0, 1)"),
        "local_epochs": (name != "local_epochs" or value >= 1, ">= 1"),
        "server_round": (name != "server_round" or value >= 1, ">= 1"),
        "seed": (name != "seed" or value >= 0, ">= 0"),
        "eval_bins": (name != "eval_bins" or value >= 2, ">= 2"),
        "corr_normalization": (name != "corr_normalization" or value in NORMALIZATIONS, f"one of {NORMALIZATIONS}"),
        "proximal_scaling": (
            name != "proximal_scaling" or value in CLIENT_PROXIMAL_SCALINGS,
            f"one of {CLIENT_PROXIMAL_SCALINGS}",
        ),
        "proximal_rows": (name != "proximal_rows" or value in PROXIMAL_ROWS, f"one of {PROXIMAL_ROWS}"),
    }
    passed, rule = rules.get(name, (True, ""))
    if not passed:
        raise ProtocolError(client_id, name, f"expected a value {rule}, but got {value!r}.")


def _weights_from(arrays: Mapping[str, Any], client_id: str) -> dict[str, Tensor]:
    weights = {k[len(_WEIGHTS) :]: _tensor_from(v, client_id, k) for k, v in arrays.items() if k.startswith(_WEIGHTS)}
    if not weights:
        raise ProtocolError(client_id, "weights", "expected `weights.<name>` entries, but got none.")
    return weights


def _tensor_from(value: Any, client_id: str, name: str) -> Tensor:
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ProtocolError(client_id, name, f"expected a numeric or bool array, but got dtype {array.dtype}.")
    # np.array copies into C order and keeps 0-d entries (BatchNorm's `num_batches_tracked`) 0-d, where
    # np.ascontiguousarray would make them 1-d
    return torch.from_numpy(np.array(array, order="C"))


def _scalar_from(value: Any, client_id: str, name: str, kind: type) -> Any:
    array = np.asarray(value)
    if array.ndim != 0:
        raise ProtocolError(client_id, name, f"expected a scalar, but got an array of shape {array.shape}.")
    item = array.item()
    if kind is float and isinstance(item, int) and not isinstance(item, bool):
        item = float(item)
    if kind is bool and isinstance(item, (bool, np.bool_)):
        item = bool(item)
    ok = isinstance(item, kind) and (kind is bool or not isinstance(item, bool))
    if not ok:
        raise ProtocolError(client_id, name, f"expected a {kind.__name__}, but got {item!r}.")
    return item
