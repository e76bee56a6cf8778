"""The ClientApp: each SuperNode trains the Lightning model on its own partition with the library's client step."""

from __future__ import annotations

import lightning.pytorch as pl
from flwr.app import Context

from flower_app import task
from lightning_fedharmony.integrations.flower import make_client_app


def _num_partitions(context: Context) -> int:
    return int(context.node_config["num-partitions"])


def _datamodule(partition_id: int, context: Context) -> pl.LightningDataModule:
    return task.datamodule(context.run_config, partition_id, _num_partitions(context))


def _model(context: Context) -> pl.LightningModule:
    data = task.load_data(context.run_config, _num_partitions(context))
    return task.model(context.run_config, data.train.num_features, data.train.num_labels)


app = make_client_app(_model, _datamodule)
