"""A named data set split over clients in one call, and a DataModule for one client that YAML can configure.

Every party that runs the same call with the same arguments gets the same split, which is how separate processes
(a LightningCLI client, a Flower SuperNode) agree on their partitions without exchanging data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import lightning.pytorch as pl
import numpy as np
from torch.utils.data import DataLoader

from lightning_fedharmony.data.datamodule import ClientDataModule, TestDataModule, client_datamodules
from lightning_fedharmony.data.loaders import MultilabelDataset, load_dataset, load_yeast_from_river
from lightning_fedharmony.data.partition import (
    Partition,
    feature_kmeans,
    iid,
    label_set_dirichlet,
    label_space_masking,
)

PARTITIONS = ("dirichlet", "kmeans", "masking", "iid")


@dataclass(frozen=True, eq=False)
class FederatedData:
    """Training data split over clients, plus held-out data.

    Attributes:
        train: the training data (features standardised if asked).
        test: the test data.
        val: validation data carved from the training data, or ``None``.
        partition: the clients' sample indices into ``train`` (and the labels each observes).
        client_val_fraction: share of each client's samples its datamodule holds out from training as the client's
            own validation split (``val_dataloader``), seeded per client; 0 = none.
    """

    train: MultilabelDataset
    test: MultilabelDataset
    val: MultilabelDataset | None
    partition: Partition
    client_val_fraction: float = 0.0

    def client(self, index: int, batch_size: int = 64, seed: int = 0) -> ClientDataModule:
        """The datamodule of client ``index``."""
        if not 0 <= index < self.partition.num_clients:
            raise ValueError(f"Expected a client index in [0, {self.partition.num_clients}), but got {index!r}.")
        observed = None if self.partition.observed is None else self.partition.observed[index]
        rows = self.partition.client_indices[index]
        return ClientDataModule.from_dataset(
            self.train,
            rows,
            observed=observed,
            batch_size=batch_size,
            val_fraction=self.client_val_fraction,
            seed=seed + index,
        )

    def clients(self, batch_size: int = 64, seed: int = 0) -> dict[str, ClientDataModule]:
        """Every client's datamodule, ids ``"0"``..``"K-1"``."""
        modules = client_datamodules(
            self.train, self.partition, batch_size=batch_size, val_fraction=self.client_val_fraction, seed=seed
        )
        return {str(k): module for k, module in enumerate(modules)}

    def test_loader(self, batch_size: int = 1024) -> DataLoader:
        """Batches ``(x, y)`` of the test set, in order."""
        return TestDataModule.from_dataset(self.test, batch_size=batch_size).test_dataloader()


def load_federated_data(
    name: str = "river:yeast",
    *,
    data_dir: str | None = None,
    test_size: float = 0.3,
    val_fraction: float = 0.0,
    client_val_fraction: float = 0.0,
    standardize: bool = True,
    top_labels: int = 0,
    partition: str = "dirichlet",
    num_clients: int = 10,
    alpha: float = 0.1,
    min_samples: int = 10,
    observed_fraction: Sequence[float] = (0.5, 0.7),
    seed: int = 0,
) -> FederatedData:
    """Load a data set, split it, standardise it and partition its training part over clients.

    Args:
        name: ``"river:yeast"``, a folder name in ``data_dir``, or a path (see
            :func:`~lightning_fedharmony.data.load_dataset`).
        data_dir: folder of named data sets.
        test_size: test share when the data has no official split.
        val_fraction: share of the training data held out for validation (before partitioning: a global split).
        client_val_fraction: share of each client's samples held out from its training as that client's own
            validation split (after partitioning; see :attr:`FederatedData.client_val_fraction`); 0 = none.
        standardize: z-score features with the training set's statistics.
        top_labels: keep the most frequent labels only (0 = all).
        partition: ``"dirichlet"``, ``"kmeans"``, ``"masking"`` or ``"iid"``.
        num_clients: number of clients.
        alpha: Dirichlet concentration.
        min_samples: fewest samples per client (Dirichlet, k-means).
        observed_fraction: ``(low, high)`` share of labels each client observes (masking).
        seed: seeds the split and the partition.

    Raises:
        ValueError: on an unknown ``partition`` or a ``client_val_fraction`` outside ``[0, 1)``, or as the loaders
            and partitioners.
    """
    if partition not in PARTITIONS:
        raise ValueError(f"Expected argument `partition` to be one of {PARTITIONS}, but got {partition!r}.")
    if isinstance(client_val_fraction, bool) or not (
        isinstance(client_val_fraction, (int, float)) and 0 <= client_val_fraction < 1
    ):
        raise ValueError(
            f"Expected argument `client_val_fraction` to be a float in [0, 1), but got {client_val_fraction!r}."
        )
    train, test = _load(name, data_dir, test_size, seed)
    if top_labels:
        keep = np.sort(np.argsort(-train.Y.sum(0), kind="stable")[:top_labels])
        train, test = _select_labels(train, keep), _select_labels(test, keep)
    val = None
    if val_fraction > 0:
        train, val = train.random_split(test_size=val_fraction, seed=seed)
    if standardize:
        mean = train.X.mean(0)
        std = train.X.std(0)
        std[std == 0] = 1.0
        train, test = _scaled(train, mean, std), _scaled(test, mean, std)
        val = None if val is None else _scaled(val, mean, std)
    if partition == "dirichlet":
        split = label_set_dirichlet(train.Y, num_clients, alpha, seed, min_samples=min_samples)
    elif partition == "kmeans":
        split = feature_kmeans(train.X, num_clients, seed, min_samples=min_samples).with_summary(train.Y)
    elif partition == "masking":
        low, high = observed_fraction
        split = label_space_masking(train.Y, num_clients, (float(low), float(high)), seed)
    else:
        split = iid(train.num_samples, num_clients, seed, Y=train.Y)
    if client_val_fraction > 0:
        _check_client_val_split(split, float(client_val_fraction))
    return FederatedData(train, test, val, split, float(client_val_fraction))


def _check_client_val_split(split: Partition, fraction: float) -> None:
    # fail here, before any training, rather than when the smallest client's datamodule is built
    sizes = [len(idx) for idx in split.client_indices]
    smallest = min(sizes)
    if not 1 <= round(fraction * smallest) < smallest:
        raise ValueError(
            f"Expected argument `client_val_fraction` to leave at least one sample in each of the training and"
            f" validation parts of every client, but got {fraction} and a client of {smallest} samples."
            f" HINT: raise `min_samples` or the fraction, or set the fraction to 0."
        )


@lru_cache(maxsize=4)
def _load(name: str, data_dir: str | None, test_size: float, seed: int) -> tuple[MultilabelDataset, MultilabelDataset]:
    if name == "river:yeast":
        return load_yeast_from_river().official_split()
    return load_dataset(name, data_dir=data_dir, test_size=test_size, seed=seed)


class PartitionedDataModule(pl.LightningDataModule):
    """One client's share of a named data set, built from plain arguments (LightningCLI and Flower friendly).

    Every process that builds it with the same arguments sees the same partition; only ``client`` differs.
    Batches are those of :class:`~lightning_fedharmony.data.ClientDataModule`; ``test_dataloader`` gives the global
    test set.

    Args:
        client: this client's index in ``[0, num_clients)``.
        name: data set (see :func:`load_federated_data`).
        data_dir: folder of named data sets.
        partition: ``"dirichlet"``, ``"kmeans"``, ``"masking"`` or ``"iid"``.
        num_clients: number of clients.
        alpha: Dirichlet concentration.
        observed_fraction: ``(low, high)`` share of labels each client observes (masking).
        batch_size: training batch size.
        seed: seeds the split and the partition.
        val_fraction: share of this client's data held out (seeded) as its own validation split, on which it
            evaluates the global model for federated evaluation (``val_dataloader``); 0: none.
    """

    def __init__(
        self,
        client: int = 0,
        name: str = "river:yeast",
        data_dir: str | None = None,
        partition: str = "dirichlet",
        num_clients: int = 10,
        alpha: float = 0.1,
        observed_fraction: tuple[float, float] = (0.5, 0.7),
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.0,
    ) -> None:
        super().__init__()
        self.data = load_federated_data(
            name,
            data_dir=data_dir,
            partition=partition,
            num_clients=num_clients,
            alpha=alpha,
            observed_fraction=observed_fraction,
            seed=seed,
            client_val_fraction=val_fraction,
        )
        self.client_data = self.data.client(client, batch_size=batch_size, seed=seed)
        self.num_features = self.data.train.num_features
        self.num_labels = self.data.train.num_labels

    @property
    def num_samples(self) -> int:
        """Training samples of this client."""
        return self.client_data.num_samples

    def train_dataloader(self) -> DataLoader:
        return self.client_data.train_dataloader()

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """This client's held-out split (an empty list with ``val_fraction=0``)."""
        return self.client_data.val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self.data.test_loader()


def _select_labels(ds: MultilabelDataset, keep: np.ndarray) -> MultilabelDataset:
    return MultilabelDataset(ds.X, ds.Y[:, keep], [ds.label_names[i] for i in keep], ds.feature_names, name=ds.name)


def _scaled(ds: MultilabelDataset, mean: np.ndarray, std: np.ndarray) -> MultilabelDataset:
    x = ((ds.X - mean) / std).astype(np.float32)
    return MultilabelDataset(x, ds.Y, ds.label_names, ds.feature_names, name=ds.name)
