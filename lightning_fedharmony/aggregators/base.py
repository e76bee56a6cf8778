"""The server's side of a round: what to send each client, and how to combine what comes back."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fedharmony.functional.aggregation import server_momentum_step, weighted_average
from lightning_fedharmony.protocol import Instruction, ProtocolError, Update

#: The one error of the client protocol (kept under its first name): names the client and the field.
InconsistentClientUpdates = ProtocolError
#: What the server sends a selected client for a round (see :class:`~lightning_fedharmony.protocol.Instruction`).
ClientInstructions = Instruction
#: What a client returns after local training (see :class:`~lightning_fedharmony.protocol.Update`).
ClientUpdate = Update


@dataclass
class AggregationResult:
    """The outcome of :meth:`Aggregator.aggregate_round`.

    Attributes:
        weights: the new global weights.
        client_weights: the weight each participating client got (sums to 1).
        metrics: server-side scalars of the round (e.g. mean correlation discrepancy, number of blocks).
        client_metrics: per participating client, the aggregator's scalars about it (FedHarmony: ``num_samples``,
            ``discrepancy``, ``sampling_discrepancy``, ``quality``); empty for aggregators that score nothing.
        client_pairs: per participating client, the label pairs where its correlation departs most from its teacher,
            as ``(label_a, label_b, client_corr, teacher_corr)``, largest gap first.
    """

    weights: dict[str, Tensor]
    client_weights: dict[str, float]
    metrics: dict[str, float] = field(default_factory=dict)
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    client_pairs: dict[str, list[tuple[int, int, float, float]]] = field(default_factory=dict)


def validate_updates(
    updates: Sequence[ClientUpdate], reference: Mapping[str, Tensor] | None = None, *, stats_values: bool = True
) -> None:
    """Check that client updates agree with each other and with the reference (global) weights; with
    ``stats_values=False`` the statistics' ``L x L`` values are left to the runner's screening.

    Raises:
        ValueError: if there is no update.
        InconsistentClientUpdates: naming the first client and field that disagree.
    """
    if not updates:
        raise ValueError("Expected at least one client update to aggregate, but got none.")
    seen: set[str] = set()
    ref = dict(reference) if reference is not None else updates[0].weights
    ref_labels: int | None = None
    for update in updates:
        cid = update.client_id
        if cid in seen:
            raise ProtocolError(cid, "client_id", "sent more than one update this round.")
        seen.add(cid)
        update.validate(ref, stats_values=stats_values)
        if update.stats is not None:
            if ref_labels is None:
                ref_labels = update.stats.num_labels
            elif update.stats.num_labels != ref_labels:
                raise ProtocolError(
                    cid, "stats.num_labels", f"expected {ref_labels} labels, but got {update.stats.num_labels}."
                )


class Aggregator(ABC):
    """Base of the server strategies: ``configure_round`` then ``aggregate_round``, rounds counted from 1.

    Subclasses keep their cross-round state in plain tensors and Python values so that :meth:`state_dict` can be
    saved with ``torch.save`` and loaded with ``weights_only=True``.
    """

    num_rounds: int | None = None
    local_epochs: int = 1
    #: whether clients must send their prediction statistics (:attr:`ClientUpdate.stats`) for :meth:`aggregate_round`
    requires_stats: bool = False
    #: whether clients' modules must use :class:`~lightning_fedharmony.FedHarmonyMixin` (teachers, proximal terms)
    requires_mixin: bool = False
    #: whether the clients keep part of the aggregator's cross-round state (a runner that restarts its clients
    #: afresh cannot resume it)
    relies_on_client_state: bool = False
    #: server momentum ``beta`` (FedAvgM; 0 = the plain average), a constructor argument of the library's aggregators
    server_momentum: float = 0.0
    #: scale the kept momentum by its agreement with the round's update (:func:`server_momentum_step`)
    server_momentum_adaptive: bool = True
    _momentum: dict[str, Tensor] | None = None

    def setup(self, num_rounds: int, local_epochs: int = 1) -> None:
        """Called once by the runner before round 1 with the planned rounds and each client's local epochs."""
        self.num_rounds = num_rounds
        self.local_epochs = local_epochs

    def configure_round(
        self, server_round: int, client_ids: Sequence[str], global_weights: Mapping[str, Tensor]
    ) -> dict[str, ClientInstructions]:
        """What to send each selected client this round."""
        _check_round(server_round)
        return {cid: self.client_instructions(server_round, cid, global_weights) for cid in client_ids}

    def client_instructions(
        self, server_round: int, client_id: str, global_weights: Mapping[str, Tensor]
    ) -> ClientInstructions:
        """Instructions for one client: the global weights and no proximal term, by default (``proximal_mu=0``:
        the plain federated average trains without one whatever the module's own setting)."""
        return ClientInstructions(weights=dict(global_weights), proximal_mu=0.0)

    def aggregate_round(
        self,
        server_round: int,
        updates: Iterable[ClientUpdate],
        global_weights: Mapping[str, Tensor] | None = None,
    ) -> AggregationResult:
        """Validate the updates, then combine them into new global weights: :meth:`begin_round`, one
        :meth:`RoundAggregation.add` per update (an iterator is consumed one update at a time), then
        :meth:`RoundAggregation.finish`.

        The statistics' ``L x L`` values are not read again here: every runner screens each update as it arrives
        (:class:`~lightning_fedharmony.faults.UpdateCollector`, with :func:`validate_updates`); call that yourself when
        you feed updates from elsewhere.
        """
        aggregation = self.begin_round(server_round, global_weights)
        for update in updates:
            aggregation.add(update)
        return aggregation.finish()

    def begin_round(self, server_round: int, global_weights: Mapping[str, Tensor] | None = None) -> RoundAggregation:
        """A round's aggregation, fed the updates one at a time; the aggregator's state changes only when it
        finishes, so a round given up (too few updates) leaves no trace. By default the updates are kept until
        :meth:`RoundAggregation.finish` calls :meth:`combine`; a streaming aggregator folds each one in as it comes."""
        _check_round(server_round)
        self.check_global_weights(global_weights)
        return BufferedRound(self, server_round, global_weights)

    def combine(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        global_weights: Mapping[str, Tensor] | None = None,
    ) -> AggregationResult:
        """All of a round's updates at once into new global weights (the default :meth:`begin_round`'s last step)."""
        _check_round(server_round)
        self.check_global_weights(global_weights)
        validate_updates(updates, global_weights, stats_values=False)
        client_weights, metrics = self.client_weights(server_round, updates)
        client_metrics, client_pairs = self.client_report()
        averaged = weighted_average([u.weights for u in updates], client_weights)
        weights = self.server_step(server_round, averaged, global_weights, metrics)
        return AggregationResult(
            weights=weights,
            client_weights={u.client_id: float(w) for u, w in zip(updates, client_weights)},
            metrics=metrics,
            client_metrics=client_metrics,
            client_pairs=client_pairs,
        )

    @abstractmethod
    def client_weights(self, server_round: int, updates: Sequence[ClientUpdate]) -> tuple[Tensor, dict[str, float]]:
        """``(K,)`` weights of the participating clients summing to 1, and server-side metrics of the round."""

    def client_report(self) -> tuple[dict[str, dict[str, float]], dict[str, list[tuple[int, int, float, float]]]]:
        """Per-client scalars and label pairs of the latest :meth:`client_weights` call (none by default)."""
        return {}, {}

    def server_step(
        self,
        server_round: int,
        averaged: dict[str, Tensor],
        global_weights: Mapping[str, Tensor] | None,
        metrics: dict[str, float],
    ) -> dict[str, Tensor]:
        """The round's new global weights from the clients' average: the average itself, or with
        ``server_momentum > 0`` one :func:`server_momentum_step` (its factor goes into ``metrics`` as
        ``server_momentum``). Round 1 starts without momentum, so an aggregator used again for a new run does not
        carry the last run's. The last step of a round's aggregation: the momentum changes only with a round that
        is taken in.

        Raises:
            ValueError: if server momentum is on and ``global_weights`` is ``None`` or lacks an entry of ``averaged``
                (or has another shape).
        """
        if not self.server_momentum:
            return averaged
        self.check_global_weights(global_weights)
        assert global_weights is not None  # checked above
        momentum = None if server_round == 1 else self._momentum
        weights, self._momentum, kept = server_momentum_step(
            global_weights, averaged, momentum, self.server_momentum, adaptive=self.server_momentum_adaptive
        )
        metrics["server_momentum"] = kept
        return weights

    def set_server_momentum(self, server_momentum: float, adaptive: bool) -> None:
        """Check and keep the constructor arguments ``server_momentum`` and ``server_momentum_adaptive``."""
        number = isinstance(server_momentum, numbers.Real) and not isinstance(server_momentum, bool)
        if not (number and 0 <= server_momentum < 1):
            raise ValueError(
                f"Expected argument `server_momentum` to be a float in [0, 1), but got {server_momentum!r}."
            )
        if not isinstance(adaptive, bool):
            raise TypeError(f"Expected argument `server_momentum_adaptive` to be a bool, but got {adaptive!r}.")
        self.server_momentum = float(server_momentum)
        self.server_momentum_adaptive = adaptive

    def check_global_weights(self, global_weights: Mapping[str, Tensor] | None) -> None:
        """Refuse a round without the weights the clients started from when server momentum needs them."""
        if self.server_momentum and global_weights is None:
            raise ValueError(
                "Expected argument `global_weights` to be the weights the clients started from (needed with"
                f" `server_momentum={self.server_momentum!r}`), but got None."
            )

    def state_dict(self) -> dict[str, Any]:
        """Cross-round state (plain tensors and values)."""
        return self.momentum_state()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.load_momentum_state(state)

    def momentum_state(self) -> dict[str, Any]:
        """The server momentum (``{}`` when there is none), for subclasses' :meth:`state_dict`."""
        return {"server_momentum_buffer": dict(self._momentum)} if self._momentum else {}

    def load_momentum_state(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`momentum_state` returned (no entry: no momentum yet)."""
        buffer = state.get("server_momentum_buffer")
        self._momentum = dict(buffer) if buffer else None


class RoundAggregation(ABC):
    """One round's aggregation in progress (:meth:`Aggregator.begin_round`): :meth:`add` each update, then
    :meth:`finish`."""

    def __init__(self) -> None:
        self.client_ids: list[str] = []

    def add(self, update: ClientUpdate) -> None:
        """Take one update; a second one from the same client is a :class:`ProtocolError`."""
        if update.client_id in self.client_ids:
            raise ProtocolError(update.client_id, "client_id", "sent more than one update this round.")
        self._add(update)
        self.client_ids.append(update.client_id)

    @abstractmethod
    def _add(self, update: ClientUpdate) -> None:
        """Fold one update in."""

    @abstractmethod
    def finish(self) -> AggregationResult:
        """The new global weights and the round's report; the aggregator's state takes the round in.

        Raises:
            ValueError: if no update was added.
        """


class BufferedRound(RoundAggregation):
    """Keeps the updates and hands them to :meth:`Aggregator.combine` at the end."""

    def __init__(
        self, aggregator: Aggregator, server_round: int, global_weights: Mapping[str, Tensor] | None = None
    ) -> None:
        super().__init__()
        self.aggregator = aggregator
        self.server_round = server_round
        self.global_weights = global_weights
        self.updates: list[ClientUpdate] = []

    def add(self, update: ClientUpdate) -> None:
        self._add(update)  # duplicates are named by `validate_updates` at the end, as they always were

    def _add(self, update: ClientUpdate) -> None:
        self.updates.append(update)
        self.client_ids.append(update.client_id)

    def finish(self) -> AggregationResult:
        return self.aggregator.combine(self.server_round, self.updates, self.global_weights)


class WeightedModelSum:
    """A running weighted sum of model state dicts, ``sum_k a_k theta_k`` (float entries in float64), fed one
    state dict at a time so that a server never holds more than one client's weights. Integer entries (BatchNorm's
    counters) are not summed: the caller keeps those of the client whose final weight is largest, as
    :func:`weighted_average` does (:func:`integer_entries`).
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.total = 0.0

    def add(self, weights: Mapping[str, Tensor], scale: float) -> None:
        """Add ``scale * weights``."""
        if not self.dtypes:
            self.dtypes = {k: v.dtype for k, v in weights.items()}
            self.sums = {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in weights.items() if _averaged(v)}
        for key, tensor in weights.items():
            if key in self.sums:
                self.sums[key].add_(tensor.detach().to(torch.float64), alpha=scale)
        self.total += scale


def _averaged(tensor: Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def integer_entries(weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copies of the entries of a state dict that weighted averaging leaves out (integer counters)."""
    return {k: v.detach().clone() for k, v in weights.items() if not _averaged(v)}


def _check_round(server_round: int) -> None:
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"Expected argument `server_round` to be an int >= 1, but got {server_round!r}.")


def sample_weights(updates: Sequence[ClientUpdate]) -> Tensor:
    """``n_k / sum n``: FedAvg's weights."""
    n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    return n / n.sum()
