"""A small fixed federation whose final weights are pinned by digest: behaviour must not drift unnoticed."""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.orchestrator import Federation

from .models import TinyMLP, multilabel_data, paired_label_data

NUM_LABELS_PINNED = 12


def pinned_federation(
    aggregator: Aggregator, num_rounds: int = 4, local_epochs: int = 1, **model_kwargs: Any
) -> Federation:
    """Five clients of different sizes, two with anti-correlated label pairs; a 12-label TinyMLP, seed 0."""
    clients = []
    for k, n in enumerate((24, 64, 40, 32, 48)):
        x, y = multilabel_data(n, num_labels=NUM_LABELS_PINNED, seed=10 + k)
        if k >= 3:  # two clients whose first four labels move against each other
            _, pairs = paired_label_data(n, anti=True, seed=20 + k)
            y[:, :4] = pairs
        clients.append(ClientDataModule(x, y, batch_size=16))
    torch.manual_seed(0)
    model = TinyMLP(num_labels=NUM_LABELS_PINNED, log_loss_parts=False, **model_kwargs)
    return Federation(
        model, clients, aggregator, num_rounds=num_rounds, local_epochs=local_epochs, verbose=False, seed=0
    )


def weights_digest(weights: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights' bytes, in key order."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
