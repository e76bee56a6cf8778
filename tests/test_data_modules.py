"""ClientDataModule / TestDataModule: batch layout, masks, validation split, pickling, Trainer integration."""

from __future__ import annotations

import pickle

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.data import clustered_labels, data_file

from lightning_fedharmony.data import (
    ClientDataModule,
    MultilabelDataset,
    TestDataModule,
    client_datamodules,
    label_space_masking,
)

TRAINER_KWARGS = {
    "accelerator": "cpu",
    "max_epochs": 2,
    "limit_train_batches": 2,
    "num_sanity_val_steps": 0,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "enable_checkpointing": False,
    "logger": False,
}


def _data(num_samples: int = 40, num_labels: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Features whose first column is the row index, so batches can be traced back to rows."""
    Y = clustered_labels(num_samples=num_samples, num_labels=num_labels)
    X = np.column_stack([np.arange(num_samples), np.random.default_rng(0).normal(size=(num_samples, 2))])
    return X.astype(np.float32), Y


def _rows(loader) -> list[int]:
    return [int(r) for batch in loader for r in batch[0][:, 0]]


def test_batches_without_mask():
    X, Y = _data()
    dm = ClientDataModule(X, Y, batch_size=16)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3) and y.shape == (16, 8)
    assert x.dtype == torch.float32 and y.dtype == torch.float32
    assert dm.num_samples == 40 and dm.num_labels == 8 and dm.num_features == 3 and not dm.has_observed
    assert _rows(dm.predict_dataloader()) == list(range(40))
    assert sorted(_rows(dm.train_dataloader())) == list(range(40))
    assert dm.val_dataloader() == []


def test_batches_with_client_mask_zero_unobserved_labels():
    X, Y = _data()
    observed = np.array([True, False] * 4)
    dm = ClientDataModule(X, Y, observed=observed, batch_size=8)
    assert dm.has_observed
    for x, y, mask in dm.predict_dataloader():
        rows = x[:, 0].long().numpy()
        assert mask.dtype == torch.bool and mask.shape == (len(rows), 8)
        assert (mask == torch.from_numpy(observed)).all()
        np.testing.assert_array_equal(y.numpy(), Y[rows] * observed)


def test_per_sample_mask():
    X, Y = _data(num_samples=10, num_labels=3)
    mask = np.random.default_rng(1).random((10, 3)) < 0.5
    dm = ClientDataModule(X, Y, observed=mask, batch_size=10)
    _, y, m = next(iter(dm.predict_dataloader()))
    np.testing.assert_array_equal(m.numpy(), mask)
    np.testing.assert_array_equal(y.numpy(), Y * mask)


def test_validation_split_is_seeded_and_disjoint():
    X, Y = _data()
    dm = ClientDataModule(X, Y, batch_size=8, val_fraction=0.25, seed=3)
    train, val = _rows(dm.predict_dataloader()), _rows(dm.val_dataloader())
    assert len(val) == 10 and dm.num_val_samples == 10 and dm.num_samples == 30
    assert sorted(train + val) == list(range(40))
    assert _rows(ClientDataModule(X, Y, val_fraction=0.25, seed=3).val_dataloader()) == val
    assert _rows(ClientDataModule(X, Y, val_fraction=0.25, seed=4).val_dataloader()) != val


def test_pickle_round_trip_keeps_batches():
    X, Y = _data()
    dm = ClientDataModule(X, Y, observed=np.ones(8, dtype=bool), batch_size=8, val_fraction=0.2)
    clone = pickle.loads(pickle.dumps(dm))
    for a, b in zip(dm.predict_dataloader(), clone.predict_dataloader()):
        for ta, tb in zip(a, b):
            assert torch.equal(ta, tb)


def test_client_datamodules_from_a_masked_partition():
    X, Y = _data(num_samples=60)
    dataset = MultilabelDataset(X, Y, [f"y{i}" for i in range(8)], ["row", "a", "b"])
    partition = label_space_masking(Y, 3, (0.5, 0.75), seed=0)
    modules = client_datamodules(dataset, partition, batch_size=4)
    assert [m.num_samples for m in modules] == partition.sizes.tolist()
    assert partition.observed is not None
    for k, dm in enumerate(modules):
        assert _rows(dm.predict_dataloader()) == partition.client_indices[k].tolist()
        _, _, mask = next(iter(dm.train_dataloader()))
        assert (mask == torch.from_numpy(partition.observed[k])).all()
    small = dataset.subset(range(30))
    with pytest.raises(ValueError, match=r"index the 30 samples of the data set, but it holds index 5\d\. HINT"):
        client_datamodules(small, partition)


def test_test_datamodule():
    X, Y = _data(num_samples=10)
    dm = TestDataModule(X, Y, batch_size=4)
    assert [len(b[0]) for b in dm.test_dataloader()] == [4, 4, 2]
    assert _rows(dm.val_dataloader()) == _rows(dm.predict_dataloader()) == list(range(10))
    assert dm.num_samples == 10 and dm.num_labels == 8


def test_test_datamodule_from_name():
    dm = TestDataModule.from_name("yeast", data_dir=str(data_file()), batch_size=512)
    assert dm.num_samples == 917 and dm.num_features == 103 and dm.num_labels == 14
    assert len(dm.test_dataloader()) == 2


class _Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 8)
        self.masked_batches = 0

    def training_step(self, batch, batch_idx):
        x, y, mask = batch
        self.masked_batches += 1
        loss = torch.nn.functional.binary_cross_entropy_with_logits(self.layer(x), y, reduction="none")
        return (loss * mask).sum() / mask.sum()

    def validation_step(self, batch, batch_idx):
        self.log("val_seen", float(len(batch[0])), reduce_fx="sum")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_trainer_fit_with_masked_batches_and_validation():
    X, Y = _data()
    dm = ClientDataModule(X, Y, observed=np.array([True] * 4 + [False] * 4), batch_size=8, val_fraction=0.25)
    model = _Tiny()
    trainer = pl.Trainer(**TRAINER_KWARGS)
    trainer.fit(model, datamodule=dm)
    assert model.masked_batches == 4
    assert trainer.callback_metrics["val_seen"] == 10


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"batch_size": 0}, ValueError, r"`batch_size` to be a positive int, but got 0"),
        ({"num_workers": -1}, ValueError, r"`num_workers` to be a non-negative int, but got -1"),
        ({"val_fraction": 1.0}, ValueError, r"`val_fraction` to be a float in \[0, 1\), but got 1\.0"),
        ({"val_fraction": 0.01}, ValueError, r"at least one sample in each of the training and validation parts"),
        (
            {"observed": np.ones(3, dtype=bool)},
            ValueError,
            r"`observed` to have shape \(8,\) or \(40, 8\), but got \(3,\)",
        ),
        ({"Y": np.full((40, 8), 2)}, ValueError, r"`Y` to hold only 0 and 1"),
        ({"Y": np.zeros((39, 8))}, ValueError, r"`X` of shape \(N, D\) and `Y` of shape \(N, L\) with the same N"),
        ({"X": "not an array"}, TypeError, r"`X` to be a numpy array or tensor, but got <class 'str'>"),
    ],
)
def test_argument_errors(kwargs, error, match):
    X, Y = _data()
    args = {"X": X, "Y": Y, **kwargs}
    with pytest.raises(error, match=match):
        ClientDataModule(args.pop("X"), args.pop("Y"), **args)


def test_test_datamodule_errors():
    X, Y = _data()
    with pytest.raises(ValueError, match=r"`batch_size` to be a positive int, but got 0"):
        TestDataModule(X, Y, batch_size=0)
