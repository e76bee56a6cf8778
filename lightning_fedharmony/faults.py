"""Guards around a client's local training: time limits and screening of what comes back."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator, Mapping
from types import FrameType

from torch import Tensor

from lightning_fedharmony.aggregators.base import ClientUpdate, InconsistentClientUpdates, validate_updates
from lightning_fedharmony.stats import validate_stats_state


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
        validate_updates([update], reference)
    except InconsistentClientUpdates as err:
        return f"rejected update: {err}"
    if update.stats is not None:
        try:
            labels = validate_stats_state(update.stats.state_dict())
        except ValueError as err:
            return f"rejected statistics: {err}"
        if num_labels is not None and labels != num_labels:
            return f"rejected statistics: expected {num_labels} labels, but got {labels}."
    return None
