"""Lightning DataModules over in-memory arrays: one per client, and one for the global test set.

Both hold float32 tensors in a ``TensorDataset`` (no per-sample Python work, cheap to pickle and to build) and use
``num_workers=0`` and no persistent workers by default: a federated run builds one per client and round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedharmony.data.loaders import MultilabelDataset, load_dataset
from lightning_fedharmony.data.partition import Partition

ArrayLike = np.ndarray | Tensor


def _as_tensor(value: ArrayLike | Sequence[Any], name: str, dtype: torch.dtype) -> Tensor:
    try:
        tensor = torch.as_tensor(np.asarray(value) if not isinstance(value, Tensor) else value)
    except (TypeError, ValueError) as err:
        raise TypeError(f"Expected argument `{name}` to be a numpy array or tensor, but got {type(value)}.") from err
    return tensor.detach().cpu().to(dtype)


def _features_and_labels(X: ArrayLike, Y: ArrayLike) -> tuple[Tensor, Tensor]:
    x = _as_tensor(X, "X", torch.float32)
    y = _as_tensor(Y, "Y", torch.float32)
    if x.ndim != 2 or y.ndim != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            "Expected arguments `X` of shape (N, D) and `Y` of shape (N, L) with the same N >= 1, but got shapes"
            f" {tuple(x.shape)} and {tuple(y.shape)}."
        )
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("Expected argument `Y` to hold only 0 and 1, but found other values.")
    return x, y


def _check_batch_size(batch_size: int) -> None:
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"Expected argument `batch_size` to be a positive int, but got {batch_size!r}.")


def _check_num_workers(num_workers: int) -> None:
    if not (isinstance(num_workers, int) and not isinstance(num_workers, bool) and num_workers >= 0):
        raise ValueError(f"Expected argument `num_workers` to be a non-negative int, but got {num_workers!r}.")


class ClientDataModule(pl.LightningDataModule):
    """One client's local data.

    Batches are ``(x, y)`` with ``x`` float32 ``(B, D)`` and ``y`` float32 ``(B, L)`` in {0, 1}; with ``observed``
    they are ``(x, y, observed_mask)`` where ``observed_mask`` is bool ``(B, L)``: the client's ``(L,)`` mask
    broadcast to every sample (or the per-sample ``(N, L)`` mask). ``y`` is set to 0 where the label is not observed,
    so a client cannot leak labels it does not have; those zeros are unknowns, not negatives, and must be masked out
    of the loss and the statistics.

    ``train_dataloader`` shuffles (with the global torch RNG, so ``seed_everything`` fixes the order);
    ``val_dataloader`` holds ``val_fraction`` of the samples, split off with ``seed`` (an empty list when
    ``val_fraction == 0``, so Lightning skips validation); ``predict_dataloader`` walks the training samples in order,
    unshuffled (e.g. to compute the client's statistics with the trained model).

    Args:
        X: ``(N, D)`` features.
        Y: ``(N, L)`` 0/1 labels.
        observed: ``(L,)`` or ``(N, L)`` bool mask of the observed labels, or ``None`` (all observed).
        batch_size: training batch size.
        val_fraction: share of the samples held out for validation, in ``[0, 1)``.
        seed: seed of the validation split.
        num_workers: ``DataLoader`` workers.
        drop_last: drop the last incomplete training batch.

    Raises:
        ValueError: on shapes that do not fit, labels other than 0/1 or a bad option.

    Example:
        >>> import numpy as np
        >>> dm = ClientDataModule(np.zeros((10, 3)), np.ones((10, 2)), observed=np.array([True, False]), batch_size=4)
        >>> x, y, mask = next(iter(dm.train_dataloader()))
        >>> tuple(x.shape), y[0].tolist(), mask[0].tolist()
        ((4, 3), [1.0, 0.0], [True, False])
    """

    def __init__(
        self,
        X: ArrayLike,
        Y: ArrayLike,
        *,
        observed: ArrayLike | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__()
        x, y = _features_and_labels(X, Y)
        _check_batch_size(batch_size)
        _check_num_workers(num_workers)
        if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
            raise ValueError(f"Expected argument `val_fraction` to be a float in [0, 1), but got {val_fraction!r}.")
        num_samples, num_labels = y.shape
        mask: Tensor | None = None
        if observed is not None:
            mask = _as_tensor(observed, "observed", torch.bool)
            if mask.shape not in ((num_labels,), (num_samples, num_labels)):
                raise ValueError(
                    f"Expected argument `observed` to have shape ({num_labels},) or ({num_samples}, {num_labels}), but"
                    f" got {tuple(mask.shape)}."
                )
            # a stride-0 view: the (L,) mask is not copied N times
            mask = mask.expand(num_samples, num_labels)
            y = y * mask
        num_val = round(val_fraction * num_samples)
        if val_fraction > 0 and not 1 <= num_val < num_samples:
            raise ValueError(
                f"Expected argument `val_fraction` to leave at least one sample in each of the training and validation"
                f" parts of the {num_samples} samples, but got {val_fraction}."
            )
        tensors = (x, y) if mask is None else (x, y, mask)
        self.train_dataset, self.val_dataset = TensorDataset(*tensors), None
        if num_val:  # no permutation without a split: a population builds thousands of these
            perm = torch.randperm(num_samples, generator=torch.Generator().manual_seed(int(seed)))
            val_idx, train_idx = perm[:num_val].sort().values, perm[num_val:].sort().values
            self.train_dataset = TensorDataset(*(t[train_idx] for t in tensors))
            self.val_dataset = TensorDataset(*(t[val_idx] for t in tensors))
        self.num_features = int(x.shape[1])
        self.num_labels = int(num_labels)
        self.has_observed = mask is not None
        self.batch_size = batch_size
        self.val_fraction = float(val_fraction)
        self.seed = seed
        self.num_workers = num_workers
        self.drop_last = drop_last

    @property
    def num_samples(self) -> int:
        """Number of training samples ``n_k`` (the client's weight in aggregation)."""
        return len(self.train_dataset)

    @property
    def num_val_samples(self) -> int:
        """Number of validation samples."""
        return 0 if self.val_dataset is None else len(self.val_dataset)

    @classmethod
    def from_dataset(
        cls,
        dataset: MultilabelDataset,
        indices: np.ndarray | Sequence[int] | None = None,
        *,
        observed: ArrayLike | None = None,
        batch_size: int = 64,
        val_fraction: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
        drop_last: bool = False,
    ) -> ClientDataModule:
        """The rows ``indices`` (all when ``None``) of a :class:`MultilabelDataset`; other arguments as ``__init__``."""
        if indices is None:
            x, y = dataset.X, dataset.Y
        else:
            idx = np.asarray(indices, dtype=np.int64)
            x, y = dataset.X[idx], dataset.Y[idx]
        return cls(
            x,
            y,
            observed=observed,
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed,
            num_workers=num_workers,
            drop_last=drop_last,
        )

    def _loader(self, dataset: TensorDataset, shuffle: bool, drop_last: bool = False) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            drop_last=drop_last,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader(self.train_dataset, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """Validation batches in order; an empty list when ``val_fraction == 0``."""
        return [] if self.val_dataset is None else self._loader(self.val_dataset, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """The training samples in order, unshuffled."""
        return self._loader(self.train_dataset, shuffle=False)


def client_datamodules(
    dataset: MultilabelDataset,
    partition: Partition,
    *,
    batch_size: int = 64,
    val_fraction: float = 0.0,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = False,
) -> list[ClientDataModule]:
    """One :class:`ClientDataModule` per client of ``partition`` (with its label mask when the partition has one).

    Args:
        dataset: the (training) data the partition indexes.
        partition: the split over clients.
        batch_size: training batch size.
        val_fraction: share of each client's samples held out for validation.
        seed: seed of the validation splits (client ``k`` uses ``seed + k``).
        num_workers: ``DataLoader`` workers.
        drop_last: drop the last incomplete training batch.

    Returns:
        The data modules, in client order.

    Raises:
        ValueError: if the partition indexes rows the data set does not have, or as :class:`ClientDataModule`.
    """
    if partition.observed is not None and partition.observed.shape != (partition.num_clients, dataset.num_labels):
        raise ValueError(
            f"Expected the partition's `observed` to have shape {(partition.num_clients, dataset.num_labels)}, but got"
            f" {partition.observed.shape}."
        )
    top = max((int(idx.max()) for idx in partition.client_indices if idx.size), default=-1)
    if top >= dataset.num_samples:
        raise ValueError(
            f"Expected the partition to index the {dataset.num_samples} samples of the data set, but it holds index"
            f" {top}. HINT: partition the same (training) data you pass here."
        )
    return [
        ClientDataModule.from_dataset(
            dataset,
            idx,
            observed=None if partition.observed is None else partition.observed[k],
            batch_size=batch_size,
            val_fraction=val_fraction,
            seed=seed + k,
            num_workers=num_workers,
            drop_last=drop_last,
        )
        for k, idx in enumerate(partition.client_indices)
    ]


class TestDataModule(pl.LightningDataModule):
    """The global test set: ``test_dataloader``, ``val_dataloader`` and ``predict_dataloader`` all walk it in order.

    Batches are ``(x, y)``: float32 ``(B, D)`` and float32 ``(B, L)``.

    Args:
        X: ``(N, D)`` features.
        Y: ``(N, L)`` 0/1 labels.
        batch_size: evaluation batch size.
        num_workers: ``DataLoader`` workers.

    Raises:
        ValueError: on shapes that do not fit, labels other than 0/1 or a bad option.

    Example:
        >>> import numpy as np
        >>> dm = TestDataModule(np.zeros((5, 3)), np.ones((5, 2)), batch_size=2)
        >>> [tuple(x.shape) for x, _ in dm.test_dataloader()]
        [(2, 3), (2, 3), (1, 3)]
    """

    __test__ = False  # not a pytest test class despite the name

    def __init__(self, X: ArrayLike, Y: ArrayLike, *, batch_size: int = 256, num_workers: int = 0) -> None:
        super().__init__()
        x, y = _features_and_labels(X, Y)
        _check_batch_size(batch_size)
        _check_num_workers(num_workers)
        self.dataset = TensorDataset(x, y)
        self.num_features = int(x.shape[1])
        self.num_labels = int(y.shape[1])
        self.batch_size = batch_size
        self.num_workers = num_workers

    @property
    def num_samples(self) -> int:
        """Number of test samples."""
        return len(self.dataset)

    @classmethod
    def from_dataset(cls, dataset: MultilabelDataset, *, batch_size: int = 256, num_workers: int = 0) -> TestDataModule:
        """All rows of a :class:`MultilabelDataset`."""
        return cls(dataset.X, dataset.Y, batch_size=batch_size, num_workers=num_workers)

    @classmethod
    def from_name(
        cls,
        name_or_path: str,
        data_dir: str | None = None,
        *,
        test_size: float = 0.3,
        seed: int = 0,
        batch_size: int = 256,
        num_workers: int = 0,
    ) -> TestDataModule:
        """The test part of :func:`~lightning_fedharmony.data.load_dataset` (CLI-friendly: strings and numbers only)."""
        _, test = load_dataset(name_or_path, data_dir=data_dir, test_size=test_size, seed=seed)
        return cls.from_dataset(test, batch_size=batch_size, num_workers=num_workers)

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def test_dataloader(self) -> DataLoader:
        """Test batches in order."""
        return self._loader()

    def val_dataloader(self) -> DataLoader:
        """The same batches, for validating on the global test set during ``fit``."""
        return self._loader()

    def predict_dataloader(self) -> DataLoader:
        """The same batches, for ``Trainer.predict``."""
        return self._loader()
