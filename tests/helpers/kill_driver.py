"""A small federation that SIGKILLs itself at a chosen point of round 2, for the resume tests (the kill during
local training is ``test_resume_after_sigkill_gives_bit_identical_weights``).

``python tests/helpers/kill_driver.py CHECKPOINT_DIR POINT`` with POINT one of :data:`POINTS`; without POINT it runs
to the end. The kill is a deterministic hook (a wrapped library function), not a timer.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import torch

from lightning_fedharmony import FedHarmony
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation

POINTS = ("checkpoint", "aggregate", "evaluate")
KILL_ROUND = 2
NUM_ROUNDS = 3


def build(checkpoint_dir: str | os.PathLike[str] | None) -> Federation:
    """Three clients with held-out splits, FedHarmony, three rounds, checkpoints after each round."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(180, 6, generator=generator)
    y = (x @ torch.randn(6, 4, generator=generator) > 0.3).float()
    clients = [ClientDataModule(x[i::3], y[i::3], batch_size=16, val_fraction=0.25, seed=i) for i in range(3)]
    torch.manual_seed(0)
    model = MultilabelMLP(6, 4, hidden=(16,))
    return Federation(model, clients, FedHarmony(), NUM_ROUNDS, local_epochs=2, checkpoint_dir=checkpoint_dir)


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm(federation: Federation, point: str) -> None:
    """Make ``federation`` SIGKILL its own process at ``point`` of round :data:`KILL_ROUND`."""
    from lightning_fedharmony import checkpoint

    def in_round(server_round: int) -> bool:
        return server_round == KILL_ROUND

    if point == "checkpoint":  # half the new checkpoint written to its temporary file, before the rename
        real_write = checkpoint.atomic_write

        def atomic_write(path, write):  # type: ignore[no-untyped-def]
            if not in_round(len(federation.result.rounds)):
                return real_write(path, write)

            def half(handle):  # type: ignore[no-untyped-def]
                write(handle)
                handle.truncate(handle.tell() // 2)
                handle.flush()
                os.fsync(handle.fileno())
                _die()

            return real_write(path, half)

        checkpoint.atomic_write = atomic_write
    elif point == "aggregate":  # every update folded into the round's aggregation, as it finishes
        real_begin = federation.aggregator.begin_round

        def begin_round(server_round, global_weights=None):  # type: ignore[no-untyped-def]
            aggregation = real_begin(server_round, global_weights)
            if in_round(server_round):
                aggregation.finish = _die  # type: ignore[method-assign]
            return aggregation

        federation.aggregator.begin_round = begin_round  # type: ignore[method-assign]
    elif point == "evaluate":  # after the server aggregated, during the clients' evaluation
        real_evaluate = federation.evaluate_federated

        def evaluate_federated(server_round):  # type: ignore[no-untyped-def]
            if in_round(server_round):
                _die()
            return real_evaluate(server_round)

        federation.evaluate_federated = evaluate_federated  # type: ignore[method-assign]
    else:
        raise ValueError(f"Expected a kill point in {POINTS}, but got {point!r}.")


if __name__ == "__main__":
    fed = build(Path(sys.argv[1]))
    if len(sys.argv) > 2:
        arm(fed, sys.argv[2])
    fed.fit()
