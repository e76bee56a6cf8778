"""The server's side of a round: what to send each client, and how to combine what comes back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_fedharmony.functional.aggregation import weighted_average
from lightning_fedharmony.stats import CorrelationStats


class InconsistentClientUpdates(ValueError):
    """Client updates that disagree with each other or with the global model (names the client and the field)."""

    def __init__(self, client_id: str, field: str, message: str) -> None:
        self.client_id = client_id
        self.field = field
        super().__init__(f"Client {client_id!r}, field `{field}`: {message}")


@dataclass
class ClientUpdate:
    """What a client returns after local training.

    Attributes:
        client_id: the client's name.
        weights: its model weights (:func:`~lightning_fedharmony.mixin.model_weights`).
        num_samples: number of training samples it used (``n_k``).
        stats: its prediction statistics (FedHarmony), or ``None``.
        metrics: scalars it reports (losses, timings).
    """

    client_id: str
    weights: dict[str, Tensor]
    num_samples: int
    stats: CorrelationStats | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientInstructions:
    """What the server sends one selected client for a round.

    Attributes:
        weights: the global weights to start from.
        teacher: ``(L, L)`` consensus of the other clients, or ``None`` (no alignment this round).
        mask: ``(L, L)`` bool pairs to align, or ``None``.
        alignment_weight: ``lambda`` for this round, or ``None`` to keep the module's own.
        proximal_mu: FedProx's ``mu`` (0 = off).
        corr_normalization: the teacher's soft phi normalisation; the client's batch correlation must use the same
            scale, so it follows the server's (``None`` keeps the module's own).
        corr_eps: the teacher's soft phi ``eps``, followed by the client for the same reason (``None``: the
            module's own).
        detach_marginals: whether the client's batch correlation stops gradients through its variances (``None``:
            the module's own).
        corr_momentum: the client's running-moment momentum for the batch correlation (``None``: the module's own).
    """

    weights: dict[str, Tensor]
    teacher: Tensor | None = None
    mask: Tensor | None = None
    alignment_weight: float | None = None
    proximal_mu: float = 0.0
    corr_normalization: str | None = None
    corr_eps: float | None = None
    detach_marginals: bool | None = None
    corr_momentum: float | None = None


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


def validate_updates(updates: Sequence[ClientUpdate], reference: Mapping[str, Tensor] | None = None) -> None:
    """Check that client updates agree with each other and with the reference (global) weights.

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
            raise InconsistentClientUpdates(cid, "client_id", "sent more than one update this round.")
        seen.add(cid)
        n = update.num_samples
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise InconsistentClientUpdates(cid, "num_samples", f"expected a positive int, but got {n!r}.")
        if set(update.weights) != set(ref):
            missing = sorted(set(ref) - set(update.weights))
            extra = sorted(set(update.weights) - set(ref))
            raise InconsistentClientUpdates(
                cid, "weights", f"parameter names differ: missing {missing}, extra {extra}."
            )
        for name, tensor in update.weights.items():
            expected = ref[name]
            if tensor.shape != expected.shape:
                raise InconsistentClientUpdates(
                    cid, f"weights.{name}", f"expected shape {tuple(expected.shape)}, but got {tuple(tensor.shape)}."
                )
            if tensor.dtype != expected.dtype:
                raise InconsistentClientUpdates(
                    cid, f"weights.{name}", f"expected dtype {expected.dtype}, but got {tensor.dtype}."
                )
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise InconsistentClientUpdates(cid, f"weights.{name}", "holds NaN or inf.")
        if update.stats is not None:
            if ref_labels is None:
                ref_labels = update.stats.num_labels
            elif update.stats.num_labels != ref_labels:
                raise InconsistentClientUpdates(
                    cid, "stats.num_labels", f"expected {ref_labels} labels, but got {update.stats.num_labels}."
                )


class Aggregator(ABC):
    """Base of the server strategies: ``configure_round`` then ``aggregate_round``, rounds counted from 1.

    Subclasses keep their cross-round state in plain tensors and Python values so that :meth:`state_dict` can be
    saved with ``torch.save`` and loaded with ``weights_only=True``.
    """

    num_rounds: int | None = None
    local_epochs: int = 1

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
        """Instructions for one client; the global weights, by default."""
        return ClientInstructions(weights=dict(global_weights))

    def aggregate_round(
        self,
        server_round: int,
        updates: Sequence[ClientUpdate],
        global_weights: Mapping[str, Tensor] | None = None,
    ) -> AggregationResult:
        """Validate the updates, then combine them into new global weights."""
        _check_round(server_round)
        validate_updates(updates, global_weights)
        client_weights, metrics = self.client_weights(server_round, updates)
        client_metrics, client_pairs = self.client_report()
        return AggregationResult(
            weights=weighted_average([u.weights for u in updates], client_weights),
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

    def state_dict(self) -> dict[str, Any]:
        """Cross-round state (plain tensors and values)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""


def _check_round(server_round: int) -> None:
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise ValueError(f"Expected argument `server_round` to be an int >= 1, but got {server_round!r}.")


def sample_weights(updates: Sequence[ClientUpdate]) -> Tensor:
    """``n_k / sum n``: FedAvg's weights."""
    n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    return n / n.sum()
