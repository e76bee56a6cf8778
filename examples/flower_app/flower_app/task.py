"""What the ServerApp and the ClientApp share: the data, the model and the aggregator, built from the run config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_fedharmony import FedAvg, FedHarmony, FedProx
from lightning_fedharmony.aggregators import Aggregator
from lightning_fedharmony.data.federated import FederatedData, PartitionedDataModule, load_federated_data
from lightning_fedharmony.models import MultilabelMLP

METHODS = ("fedavg", "fedprox", "fedharmony", "fedharmony_paper")


def load_data(config: Mapping[str, Any], num_partitions: int) -> FederatedData:
    """The data set split over ``num_partitions`` clients; every node computes the same split."""
    return load_federated_data(
        str(config["dataset"]),
        data_dir=str(config["data-dir"]) or None,
        partition=str(config["partition"]),
        num_clients=num_partitions,
        alpha=float(config["alpha"]),
        seed=int(config["seed"]),
    )


def datamodule(config: Mapping[str, Any], partition_id: int, num_partitions: int) -> PartitionedDataModule:
    """The data of one node: its training split and its held-out split (``client-val-fraction``), on which it
    evaluates the global model for federated evaluation."""
    return PartitionedDataModule(
        client=partition_id,
        name=str(config["dataset"]),
        data_dir=str(config["data-dir"]) or None,
        partition=str(config["partition"]),
        num_clients=num_partitions,
        alpha=float(config["alpha"]),
        batch_size=int(config["batch-size"]),
        seed=int(config["seed"]),
        val_fraction=float(config.get("client-val-fraction", 0.0)),
    )


def model(config: Mapping[str, Any], num_features: int, num_labels: int) -> pl.LightningModule:
    """The MLP, its initial weights seeded by ``seed`` (only the server's initial weights matter)."""
    torch.manual_seed(int(config["seed"]))
    return MultilabelMLP(
        num_features,
        num_labels,
        hidden=(int(config["hidden"]),),
        lr=float(config["lr"]),
        alignment_weight=float(config["alignment-weight"]),
    )


def aggregator(config: Mapping[str, Any]) -> Aggregator:
    """The server strategy named by ``method``."""
    method = str(config["method"])
    if method == "fedavg":
        return FedAvg()
    if method == "fedprox":
        return FedProx(proximal_mu=float(config["proximal-mu"]))
    if method == "fedharmony":
        return FedHarmony(alignment_weight=float(config["alignment-weight"]), seed=int(config["seed"]))
    if method == "fedharmony_paper":
        return FedHarmony.paper(seed=int(config["seed"]))
    raise ValueError(f"Expected run config `method` to be one of {METHODS}, but got {method!r}.")
