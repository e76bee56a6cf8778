"""Shared test setup."""

import pytest
import torch

# the tests train tiny models: one thread avoids oversubscribing the two cores CI has (10x faster steps here)
torch.set_num_threads(1)


@pytest.fixture
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower stamps new messages with the identity of the running task; outside a run there is none, so set one."""
    task = pytest.importorskip("flwr.supercore.task_identity").TaskIdentity
    monkeypatch.setattr(task, "_run_id", 1)
    monkeypatch.setattr(task, "_node_id", 0)
    monkeypatch.setattr(task, "_task_id", 0)
