"""An ordinary multi-label LightningModule, written without federated learning in mind."""

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_fedharmony import FedHarmonyMixin


class TagClassifier(FedHarmonyMixin, pl.LightningModule):
    def __init__(self, num_features: int, num_labels: int, hidden: int = 128, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, num_labels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.fedharmony_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
