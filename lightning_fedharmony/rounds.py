"""The pieces of a round that every runner shares, so that they pick, seed and evaluate alike: seeds, client
selection, a client's validation batches and the evaluation of global weights (:class:`~lightning_fedharmony.Federation`
and the Flower strategy)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.metrics import MultilabelReport
from lightning_fedharmony.mixin import load_model_weights


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (the federation's seed, the round, the client index)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


def select_clients(
    client_ids: Sequence[str], server_round: int, *, fraction_fit: float = 1.0, min_clients: int = 1, seed: int = 0
) -> list[str]:
    """The clients of a round: all, or a sample of ``max(min_clients, ceil(fraction_fit * K))`` seeded by the round.

    The same rule wherever the server runs (:class:`Federation`, the Flower strategy), so both pick the same clients.
    """
    ids = list(client_ids)
    count = min(len(ids), max(min_clients, math.ceil(fraction_fit * len(ids))))
    if count == len(ids):
        return ids
    rng = np.random.default_rng([seed, server_round])
    chosen = np.sort(rng.choice(len(ids), size=count, replace=False))
    return [ids[i] for i in chosen]


def client_val_loader(datamodule: pl.LightningDataModule) -> DataLoader | None:
    """A client's validation batches: its datamodule's ``val_dataloader`` (the first, when it returns several), or
    ``None`` when it has none (not implemented, an empty list, or an empty data set)."""
    if not is_overridden("val_dataloader", datamodule, pl.LightningDataModule):
        return None
    loader = datamodule.val_dataloader()
    if isinstance(loader, (list, tuple)):
        if not loader:
            return None
        loader = loader[0]
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
        return None
    return loader


@torch.no_grad()
def evaluate_weights(
    module: pl.LightningModule, weights: Mapping[str, Tensor], dataloader: DataLoader
) -> dict[str, float]:
    """Load ``weights`` into ``module`` and compute the :class:`~lightning_fedharmony.metrics.MultilabelReport` on
    ``dataloader``'s ``(x, y)`` batches (or ``(x, y, observed)``: unobserved labels are then left out of every
    metric); the same evaluation wherever the server runs.

    Raises:
        ValueError: if the dataloader yields no batch.
    """
    load_model_weights(module, weights)
    was_training = module.training
    module.eval()
    report: MultilabelReport | None = None
    for batch in dataloader:
        x, y = batch[0], batch[1]
        preds = torch.sigmoid(module(x.to(module.device))).float().cpu()
        if report is None:
            report = MultilabelReport(num_labels=preds.shape[1])
        observed = batch[2].cpu().bool() if len(batch) > 2 else None
        report.update(preds, y.cpu(), observed)
    module.train(was_training)
    if report is None:
        raise ValueError("Expected the evaluation dataloader to yield batches, but it is empty.")
    return {k: float(v) for k, v in report.compute().items()}
