"""A tiny MLP LightningModule with :class:`~lightning_fedharmony.FedHarmonyMixin` and synthetic multi-label data.

Everything here is seeded and small enough that a ``Trainer.fit`` takes a fraction of a second on one CPU core.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedharmony import FedHarmonyMixin
from lightning_fedharmony.functional.correlation import Normalization

# Tiny tensors: one intra-op thread is faster, and on a busy 2-core machine two threads spin against other processes
# (a 16-unit MLP step measured 5-20 ms with two threads, 0.5 ms with one).


NUM_FEATURES = 8
NUM_LABELS = 5

#: Trainer settings for tests: quiet, no files, no sanity check.
TRAINER_KWARGS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}


def make_trainer(**overrides: Any) -> pl.Trainer:
    """A CPU Trainer with :data:`TRAINER_KWARGS`, updated by ``overrides``."""
    return pl.Trainer(**{**TRAINER_KWARGS, **overrides})


class TinyMLP(FedHarmonyMixin, pl.LightningModule):
    """Two-layer MLP for multi-label data whose ``training_step`` uses :meth:`fedharmony_loss`.

    Batches are ``(x, y)`` or ``(x, y, observed)``. Every value passed to ``self.log`` is also kept, per step, in
    :attr:`logged` so tests can follow a loss part through local training.

    Args:
        num_features: input width.
        num_labels: number of labels ``L``.
        hidden: hidden width.
        lr: learning rate; ``0`` keeps the weights (and so the predictions) fixed.
        optimizer: ``"adam"`` or ``"sgd"``.
        alignment_weight: the mixin's ``lambda``.
        proximal_mu: the mixin's FedProx ``mu``.
        corr_normalization: the mixin's soft phi normalisation.
        corr_momentum: the mixin's running-moment momentum.
        detach_marginals: the mixin's switch.
        log_loss_parts: the mixin's switch.
    """

    def __init__(
        self,
        num_features: int = NUM_FEATURES,
        num_labels: int = NUM_LABELS,
        hidden: int = 16,
        lr: float = 1e-2,
        optimizer: str = "adam",
        alignment_weight: float = 1.0,
        proximal_mu: float = 0.0,
        corr_normalization: Normalization = "bernoulli",
        corr_momentum: float = 0.0,
        detach_marginals: bool = False,
        log_loss_parts: bool = True,
    ) -> None:
        super().__init__(
            alignment_weight=alignment_weight,
            proximal_mu=proximal_mu,
            corr_normalization=corr_normalization,
            corr_momentum=corr_momentum,
            detach_marginals=detach_marginals,
            log_loss_parts=log_loss_parts,
        )
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.Tanh(), nn.Linear(hidden, num_labels))
        self.lr = lr
        self.optimizer_name = optimizer
        self.logged: dict[str, list[float]] = defaultdict(list)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *rest = batch
        observed = rest[0] if rest else None
        return self.fedharmony_loss(self(x), y, observed)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr)
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        self.logged[name].append(float(value))
        super().log(name, value, *args, **kwargs)


class ValidatedMLP(TinyMLP):
    """:class:`TinyMLP` with a ``validation_step`` that also uses :meth:`fedharmony_loss`."""

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *rest = batch
        return self.fedharmony_loss(self(x), y, rest[0] if rest else None)


class PlainMLP(pl.LightningModule):
    """The same MLP without the mixin (for the callback's type check)."""

    def __init__(self, num_features: int = NUM_FEATURES, num_labels: int = NUM_LABELS) -> None:
        super().__init__()
        self.net = nn.Linear(num_features, num_labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.binary_cross_entropy_with_logits(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class NoFedHarmonyLossMLP(TinyMLP):
    """Uses the mixin but forgets :meth:`fedharmony_loss` in ``training_step``."""

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        x, y, *_ = batch
        return nn.functional.binary_cross_entropy_with_logits(self(x), y)


def random_preds(num_samples: int, num_labels: int = NUM_LABELS, seed: int = 0) -> Tensor:
    """``(N, L)`` float64 probabilities with label-dependent rates and some shared structure."""
    generator = torch.Generator().manual_seed(seed)
    latent = torch.randn(num_samples, 1, generator=generator, dtype=torch.float64)
    noise = torch.randn(num_samples, num_labels, generator=generator, dtype=torch.float64)
    shift = torch.linspace(-1.0, 1.0, num_labels, dtype=torch.float64)
    return torch.sigmoid(latent + noise + shift)


def multilabel_data(
    num_samples: int,
    num_features: int = NUM_FEATURES,
    num_labels: int = NUM_LABELS,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """``x`` ``(N, F)`` float32 and 0/1 targets ``y`` ``(N, L)`` float32 from a fixed random linear concept."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, num_features, generator=generator)
    weight = torch.randn(num_features, num_labels, generator=generator)
    y = (x @ weight + 0.3 * torch.randn(num_samples, num_labels, generator=generator) > 0.5).float()
    return x, y


def paired_label_data(
    num_samples: int,
    anti: bool,
    num_features: int = NUM_FEATURES,
    num_pairs: int = 2,
    flip: float = 0.1,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """Data whose labels come in pairs that move together (``anti=False``) or against each other (``anti=True``).

    Label ``2g`` is ``x_g > 0``; label ``2g + 1`` repeats it (or its negation with ``anti=True``) with a fraction
    ``flip`` of its entries flipped (label phi ``~ +-(1 - 2 flip)``), so two clients built with different ``anti``
    have clearly different label correlations.
    """
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_samples, num_features, generator=generator)
    columns = []
    for group in range(num_pairs):
        first = (x[:, group] > 0).float()
        second = 1.0 - first if anti else first.clone()
        flipped = torch.rand(num_samples, generator=generator) < flip
        second = torch.where(flipped, 1.0 - second, second)
        columns += [first, second]
    return x, torch.stack(columns, 1)


def make_loader(*tensors: Tensor, batch_size: int = 16, shuffle: bool = False) -> DataLoader:
    """A single-process DataLoader over the tensors."""
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=shuffle)


class FitCounter(pl.Callback):
    """Counts the fits it sees, across every Trainer it is given to, and all instances' in ``FitCounter.total``
    (a config-built callback in the CLI tests)."""

    total = 0
    built = 0

    def __init__(self, label: str = "") -> None:
        self.label = label
        self.fits = 0
        FitCounter.built += 1

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fits += 1
        FitCounter.total += 1
