"""Guards around a client's local training: time limits and screening of what comes back."""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from types import FrameType

import torch
from torch import Tensor

from lightning_fedharmony.aggregators.base import (
    ClientUpdate,
    InconsistentClientUpdates,
    RoundAggregation,
    validate_updates,
)


class ClientTimeoutError(RuntimeError):
    """A client's local training ran past its time limit."""


@contextlib.contextmanager
def time_limit(seconds: float | None, client_id: str = "") -> Iterator[None]:
    """Raise :class:`ClientTimeoutError` in the calling code once ``seconds`` have passed.

    Uses ``SIGALRM``, which interrupts Python code even inside an endless loop or a ``time.sleep``; it cannot
    interrupt a C call that never returns to Python. Off the main thread (or on systems without ``SIGALRM``) no
    limit is applied.
    """
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if seconds is None or not usable:
        yield
        return

    def _expired(signum: int, frame: FrameType | None) -> None:
        raise ClientTimeoutError(f"client {client_id!r} exceeded its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, _expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def screen_update(update: ClientUpdate, reference: Mapping[str, Tensor], num_labels: int | None = None) -> str | None:
    """Why an update cannot be aggregated (``None`` if it can): wrong names, shapes or dtypes, non-finite weights,
    malformed statistics (shape, dtype, NaN/inf, values out of range) or a label count unlike the others'."""
    try:
        validate_updates([update], reference)  # validates the statistics' values too, once
    except InconsistentClientUpdates as err:
        return f"rejected {'statistics' if err.field.startswith('stats') else 'update'}: {err}"
    if update.stats is not None and num_labels is not None and update.stats.num_labels != num_labels:
        return f"rejected statistics: expected {num_labels} labels, but got {update.stats.num_labels}."
    return None


def unusable_weights(update: ClientUpdate) -> str | None:
    """Why an update's weights cannot be used (non-finite: the client diverged), or ``None``."""
    for name, tensor in update.weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"non-finite weights in `{name}` (diverged or NaN loss)"
    return None


class UpdateCollector:
    """Screens a round's client updates as they arrive and keeps the usable ones, by the same rules wherever the
    clients ran (here or on Flower): non-finite weights, malformed statistics or a label count unlike the others'
    become a failure with the reason.

    Args:
        reference: the global weights the clients started from.
        sink: the round's aggregation (:meth:`~lightning_fedharmony.aggregators.Aggregator.begin_round`): each usable
            update is handed to it as it arrives and kept here without its weights, statistics or term, so that the
            server holds one update at a time; one the aggregation refuses is recorded as a failure. ``None``: the
            updates are kept whole.
    """

    def __init__(self, reference: Mapping[str, Tensor], sink: RoundAggregation | None = None) -> None:
        self.reference = reference
        self.sink = sink
        self.updates: list[ClientUpdate] = []
        self.failures: dict[str, str] = {}
        self.setup_seconds = 0.0
        self._losses: list[tuple[float, int]] = []
        self._num_labels: int | None = None

    def fail(self, client_id: str, reason: str) -> None:
        """Record a client that returned nothing usable."""
        self.failures[client_id] = reason

    def add(self, update: ClientUpdate, loss: float, setup_seconds: float = 0.0) -> None:
        """Screen one update; keep it, or record why not."""
        self.setup_seconds += setup_seconds
        reason = unusable_weights(update) or screen_update(update, self.reference, self._num_labels)
        if reason:
            self.fail(update.client_id, reason)
            return
        if self.sink is not None:
            try:
                self.sink.add(update)
            except InconsistentClientUpdates as err:
                self.fail(update.client_id, f"rejected update: {err}")
                return
        if update.stats is not None:
            self._num_labels = update.stats.num_labels
        if self.sink is not None:
            update = replace(update, weights={}, stats=None, term=None)
        self.updates.append(update)
        if math.isfinite(loss):
            self._losses.append((loss, update.num_samples))

    @property
    def train_loss(self) -> float:
        """The kept clients' training loss weighted by sample counts (``nan`` if none reported one)."""
        total = sum(n for _, n in self._losses)
        return sum(loss * n for loss, n in self._losses) / total if total else float("nan")
