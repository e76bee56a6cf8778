"""The callback that moves correlation statistics out of, and teachers into, a training client."""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from typing_extensions import override

from lightning_fedharmony.exchange import DirectoryExchange, Exchange, InMemoryExchange, check_client_id
from lightning_fedharmony.mixin import FedHarmonyMixin
from lightning_fedharmony.privacy import check_privacy_args, privatize_stats
from lightning_fedharmony.stats import CorrelationStats

_FLUSH_ROWS = 4096  # predictions buffered before they are added to the float64 statistics


class CorrelationExchange(Callback):
    """Exports a client's prediction statistics each epoch and imports its consensus teacher.

    - ``on_train_epoch_start``: installs the newest teacher and alignment mask the server published for this client.
    - ``on_train_batch_end``: adds the batch's predictions, which the module computed anyway in
      :meth:`~lightning_fedharmony.FedHarmonyMixin.fedharmony_loss`, to the statistics (no second pass over the data).
    - ``on_train_epoch_end``: publishes the epoch's statistics.

    Args:
        exchange: an :class:`~lightning_fedharmony.exchange.Exchange`, a folder path (a
            :class:`~lightning_fedharmony.exchange.DirectoryExchange` shared by separate processes), or ``None`` for a
            private in-memory exchange.
        client_id: this client's name in the exchange (letters, digits, ``_``, ``.``, ``-``).
        min_label_rate: labels predicted at a rate below this are invalid in the exported statistics.
        stats_noise_multiplier: Gaussian noise on the exported statistics, in units of their sensitivity (0 = off);
            see :mod:`lightning_fedharmony.privacy` for what this protects and what it does not.
        stats_clip: per-sample L2 bound of the prediction vectors (``None``: ``sqrt(L)``, no clipping needed).
        noise_seed: seed of the noise; ``None`` draws from torch's global generator.

    Example (LightningCLI YAML)::

        trainer:
          callbacks:
            - class_path: lightning_fedharmony.CorrelationExchange
              init_args: {exchange: /shared/fedharmony, client_id: hospital-3}
    """

    def __init__(
        self,
        exchange: Exchange | str | None = None,
        client_id: str = "0",
        min_label_rate: float = 1e-3,
        stats_noise_multiplier: float = 0.0,
        stats_clip: float | None = None,
        noise_seed: int | None = None,
    ) -> None:
        self.client_id = check_client_id(client_id)
        check_privacy_args(stats_noise_multiplier, stats_clip)
        if exchange is None:
            exchange = InMemoryExchange()
        elif isinstance(exchange, (str, os.PathLike)):
            exchange = DirectoryExchange(exchange)
        elif not isinstance(exchange, Exchange):
            raise TypeError(
                "Expected argument `exchange` to be an Exchange, a folder path or None, but got"
                f" {type(exchange).__name__}."
            )
        self.exchange = exchange
        self.min_label_rate = min_label_rate
        self.stats_noise_multiplier = stats_noise_multiplier
        self.stats_clip = stats_clip
        self._noise = None if noise_seed is None else torch.Generator().manual_seed(noise_seed)
        self.stats: CorrelationStats | None = None
        #: what was last exported: ``stats``, or its noised copy when ``stats_noise_multiplier > 0``
        self.published_stats: CorrelationStats | None = None
        self._pending: list[tuple[Tensor, Tensor, Tensor | None]] = []
        self._pending_rows = 0
        self.teacher_version = -1
        self.exports = 0
        self._state_key: tuple[str | None, str] | None = None  # (client id, key) it was built for

    @property
    @override
    def state_key(self) -> str:
        # Lightning formats this key around every hook call, several per step: build it once per client id
        if self._state_key is None or self._state_key[0] != self.client_id:
            self._state_key = (self.client_id, self._generate_state_key(client_id=self.client_id))
        return self._state_key[1]

    @staticmethod
    def _mixin(pl_module: pl.LightningModule) -> FedHarmonyMixin:
        if not isinstance(pl_module, FedHarmonyMixin):
            raise TypeError(
                f"Expected the LightningModule to use FedHarmonyMixin, but {type(pl_module).__name__} does not."
                " HINT: declare `class MyModel(FedHarmonyMixin, L.LightningModule)`."
            )
        return pl_module

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        module = self._mixin(pl_module)
        payload = self.exchange.read_teacher(self.client_id)
        if payload is not None:
            module.fedharmony_set_teacher(payload.teacher, payload.mask)
            self.teacher_version = payload.version
        if self.stats is not None:
            self.stats.reset()
        self._pending, self._pending_rows = [], 0
        module.fedharmony_pop_batch()

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        batch_stats = self._mixin(pl_module).fedharmony_pop_batch()
        if batch_stats is None:
            raise RuntimeError(
                "Expected `training_step` to call `self.fedharmony_loss(logits, target)`, but no predictions reached"
                " the CorrelationExchange callback in this step. HINT: compute the loss with `fedharmony_loss`."
            )
        # buffered: one float64 update per few thousand rows costs far less per step than one per batch
        self._pending.append(batch_stats)
        self._pending_rows += batch_stats[0].shape[0]
        if self._pending_rows >= _FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        batches, self._pending, self._pending_rows = self._pending, [], 0
        preds = torch.cat([b[0] for b in batches])
        target = torch.cat([b[1] for b in batches])
        masks = [b[2] for b in batches]
        observed = None
        if all(m is not None for m in masks):
            observed = torch.cat([torch.broadcast_to(m, b[0].shape) for m, b in zip(masks, batches) if m is not None])
        if self.stats is None or self.stats.num_labels != preds.shape[1]:
            self.stats = CorrelationStats(preds.shape[1], min_label_rate=self.min_label_rate, clip=self.stats_clip)
        self.stats.update(preds, target, observed)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush()
        if self.stats is None or float(self.stats.num_samples) == 0:
            return
        self.exports += 1
        published = self.stats
        if self.stats_noise_multiplier > 0:
            published = privatize_stats(self.stats, self.stats_noise_multiplier, self.stats_clip, self._noise)
        self.published_stats = published
        self.exchange.publish_stats(self.client_id, published, version=self.exports)

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "client_id": self.client_id,
            "teacher_version": self.teacher_version,
            "exports": self.exports,
            "stats": None if self.stats is None else self.stats.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.teacher_version = int(state_dict.get("teacher_version", -1))
        self.exports = int(state_dict.get("exports", 0))
        stats = state_dict.get("stats")
        self.stats = (
            None if stats is None else CorrelationStats.from_state_dict(stats, min_label_rate=self.min_label_rate)
        )
