"""A small multi-label model with the FedHarmony mixin, for the built-in runs and as a template."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

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
        proximal_rows: ``"uniform"`` or ``"labels"``; with ``proximal_full_at`` and ``proximal_absent`` (see
            :class:`~lightning_fedharmony.FedHarmonyMixin`; an aggregator may override them).
        proximal_full_at: positives of a label at which its output row gets the full ``mu``.
        proximal_absent: factor on ``mu`` for the output rows of labels without a positive.
        proximal_reference_labels: ``mu`` times ``max(1, proximal_reference_labels / num_labels)``; 0 keeps ``mu``
            (see :class:`~lightning_fedharmony.FedHarmonyMixin`; an aggregator may override it).
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
        proximal_rows: str = "uniform",
        proximal_full_at: float = 64.0,
        proximal_absent: float = 10.0,
        proximal_reference_labels: float = 0.0,
        corr_normalization: Normalization = "pearson",
        corr_momentum: float = 0.9,
        detach_marginals: bool = True,
    ) -> None:
        super().__init__(
            alignment_weight=alignment_weight,
            proximal_mu=proximal_mu,
            proximal_scaling=proximal_scaling,
            proximal_rows=proximal_rows,
            proximal_full_at=proximal_full_at,
            proximal_absent=proximal_absent,
            proximal_reference_labels=proximal_reference_labels,
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

    def fedharmony_output_parameters(self) -> list[Tensor]:
        """The output layer's weight and bias, one row per label."""
        head = cast(nn.Linear, self.net[-1])
        return [head.weight, head.bias]

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
