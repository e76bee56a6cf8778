"""A small multi-label model with the FedHarmony mixin, for the built-in runs and as a template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_fedharmony.functional.correlation import Normalization
from lightning_fedharmony.mixin import FedHarmonyMixin


class MultilabelMLP(FedHarmonyMixin, pl.LightningModule):
    """MLP ``d -> hidden... -> L`` trained with BCE plus FedHarmony's terms.

    Batches are ``(x, y)`` or ``(x, y, observed)`` (label-space masking: unobserved labels are left out of the loss
    and the statistics). ``forward`` returns logits.

    Args:
        num_features: input dimension ``d``.
        num_labels: number of labels ``L``.
        hidden: hidden layer widths.
        dropout: dropout after each hidden layer.
        lr: Adam's learning rate.
        weight_decay: Adam's weight decay.
        alignment_weight: FedHarmony's ``lambda`` (an aggregator may override it).
        proximal_mu: FedProx's ``mu`` (an aggregator may override it).
        proximal_scaling: ``"none"`` or ``"drift"`` (see :class:`~lightning_fedharmony.FedHarmonyMixin`; an
            aggregator may override it).
        corr_normalization: soft phi normalisation of the alignment term.
        corr_momentum: running-moment mixing of the batch correlation.
        detach_marginals: stop gradients through the label marginals in the alignment term.
    """

    def __init__(
        self,
        num_features: int,
        num_labels: int,
        hidden: Sequence[int] = (256,),
        dropout: float = 0.0,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        alignment_weight: float = 0.03,
        proximal_mu: float = 0.0,
        proximal_scaling: str = "none",
        corr_normalization: Normalization = "pearson",
        corr_momentum: float = 0.9,
        detach_marginals: bool = True,
    ) -> None:
        super().__init__(
            alignment_weight=alignment_weight,
            proximal_mu=proximal_mu,
            proximal_scaling=proximal_scaling,
            corr_normalization=corr_normalization,
            corr_momentum=corr_momentum,
            detach_marginals=detach_marginals,
        )
        for name, value in (("num_features", num_features), ("num_labels", num_labels)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"Expected argument `{name}` to be a positive int, but got {value!r}.")
        if not lr > 0:
            raise ValueError(f"Expected argument `lr` to be positive, but got {lr!r}.")
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y, *rest = batch
        return self.fedharmony_loss(self(x), y, observed=rest[0] if rest else None)

    def validation_step(self, batch: Sequence[Tensor], batch_idx: int) -> Tensor:
        x, y, *rest = batch
        loss = self.fedharmony_loss(self(x), y, observed=rest[0] if rest else None)
        self.log("val_loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"])
