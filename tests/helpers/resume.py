"""Stop a federation after some rounds, resume it in a fresh one, and compare with a run straight through."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from lightning_fedharmony.orchestrator import Federation


def run_interrupted(
    make: Callable[..., Federation],
    folder: Path,
    stop_after: int,
    interrupt: Callable[[Federation], Any] | None = None,
) -> tuple[Federation, Federation]:
    """``make()`` fitted straight through, and ``make(checkpoint_dir=folder)`` stopped after ``stop_after`` rounds
    (then ``interrupt(stopped)``, e.g. to damage what it left on disk) and fitted to the end by a fresh
    ``make(checkpoint_dir=folder)``.

    Returns:
        The straight run and the resumed one.
    """
    straight = make()
    straight.fit()
    stopped = make(checkpoint_dir=folder)
    stopped.aggregator.setup(stopped.num_rounds)
    for server_round in range(1, stop_after + 1):
        stopped.run_round(server_round)
    if interrupt is not None:
        interrupt(stopped)
    resumed = make(checkpoint_dir=folder)
    resumed.fit()
    return straight, resumed


def assert_same_weights(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> None:
    """Every entry of ``expected`` equal, bit for bit, in ``got``."""
    for key, value in expected.items():
        assert torch.equal(value, got[key]), key
