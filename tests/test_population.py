"""Client populations: uniform or size-proportional client sampling, 10,000 registered clients per federation, and
per-round checkpoints that do not rewrite every past round's per-client detail."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.models import NUM_FEATURES, NUM_LABELS, TinyMLP

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    CLIENT_LOG_NAME,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
)
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.data.datamodule import client_datamodules
from lightning_fedharmony.data.loaders import MultilabelDataset
from lightning_fedharmony.data.partition import label_set_dirichlet
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.results import CLIENT_FIELDS
from lightning_fedharmony.rounds import select_clients, size_proportional_sample
from lightning_fedharmony.transports.base import Transport

IDS = [str(k) for k in range(10_000)]


# ---------------------------------------------------------------------------------------------- sampling rules
def test_uniform_sampling_picks_what_it_picked_before_size_sampling_existed() -> None:
    # pinned from the implementation before `client_sampling`: runs seeded with it must not change
    assert select_clients(IDS, 1, fraction_fit=0.001, seed=3) == [
        "1507", "2530", "3412", "4069", "4273", "5387", "5788", "7722", "8447", "9773",
    ]  # fmt: skip
    assert select_clients(IDS, 2, fraction_fit=0.001, seed=3, client_sampling="uniform")[:3] == ["1", "255", "1077"]
    assert select_clients(IDS[:10], 4, fraction_fit=0.3, seed=7) == ["1", "4", "7"]


def test_size_sampling_draws_one_client_in_proportion_to_its_size() -> None:
    sizes = np.arange(1, 21, dtype=np.float64)  # client k holds k + 1 samples
    ids = [str(k) for k in range(20)]
    rng = np.random.default_rng(0)
    draws = 20_000
    counts = np.bincount(np.concatenate([size_proportional_sample(sizes, 1, rng) for _ in range(draws)]), minlength=20)
    # select_clients draws the same way, seeded by the round
    for server_round in (1, 2):
        (pick,) = select_clients(ids, server_round, fraction_fit=0.05, seed=0, client_sampling="size", sizes=sizes)
        assert [pick] == [ids[i] for i in size_proportional_sample(sizes, 1, np.random.default_rng([0, server_round]))]
    expected = draws * sizes / sizes.sum()
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 43.8  # the 0.999 quantile of chi-square with 19 degrees of freedom (seeded: deterministic)
    # and not uniform: the largest client is drawn about 20 times as often as the smallest
    assert 14 < counts[-1] / counts[0] < 28


def test_size_sampling_without_replacement_favours_large_clients_in_proportion() -> None:
    rng = np.random.default_rng(0)
    sizes = np.where(np.arange(1000) < 500, 1.0, 4.0)  # half the clients hold 4 times as much data
    inclusions = np.zeros(1000)
    for _ in range(400):
        inclusions[size_proportional_sample(sizes, 10, rng)] += 1
    assert inclusions.sum() == 4000  # 10 distinct clients per draw
    ratio = inclusions[500:].mean() / inclusions[:500].mean()
    assert 3.4 < ratio < 4.6  # ~4: at 1% sampled, inclusion is close to proportional to size


def test_size_sampling_is_seeded_distinct_and_skips_empty_clients() -> None:
    sizes = np.array([5.0, 0.0, 3.0, 0.0, 8.0, 1.0])
    ids = list("abcdef")
    picks = [select_clients(ids, r, fraction_fit=0.5, seed=1, client_sampling="size", sizes=sizes) for r in range(50)]
    again = [select_clients(ids, r, fraction_fit=0.5, seed=1, client_sampling="size", sizes=sizes) for r in range(50)]
    assert picks == again
    assert all(len(p) == len(set(p)) == 3 and not {"b", "d"} & set(p) for p in picks)
    # size-0 clients only fill what the others cannot, lowest index first
    assert select_clients(ids, 1, fraction_fit=5 / 6, client_sampling="size", sizes=sizes) == list("abcef")


def test_sampling_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `client_sampling` to be one of \('uniform', 'size'\)"):
        select_clients(IDS, 1, client_sampling="random")
    with pytest.raises(ValueError, match=r"Expected the clients' sizes with `client_sampling='size'`.*HINT"):
        select_clients(IDS, 1, fraction_fit=0.1, client_sampling="size")
    for sizes in ([1.0, 2.0], [1.0, -1.0, 1.0], [0.0, 0.0, 0.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match=r"Expected the clients' sizes to be 3 finite numbers >= 0"):
            select_clients(["a", "b", "c"], 1, fraction_fit=0.5, client_sampling="size", sizes=sizes)


# ---------------------------------------------------------------------------------------------- Federation
def _clients(sizes: tuple[int, ...]) -> list[ClientDataModule]:
    gen = torch.Generator().manual_seed(0)
    return [
        ClientDataModule(
            torch.randn(n, NUM_FEATURES, generator=gen), (torch.rand(n, NUM_LABELS, generator=gen) < 0.5).float()
        )
        for n in sizes
    ]


def test_federation_samples_by_its_clients_sizes(tmp_path: Path) -> None:
    sizes = (2, 30, 4, 50, 3, 40, 1, 20)
    fed = Federation(TinyMLP(), _clients(sizes), FedAvg(), 3, fraction_fit=0.25, client_sampling="size", verbose=False)
    ids = [str(k) for k in range(len(sizes))]
    for server_round in (1, 2, 3):
        expected = select_clients(
            ids, server_round, fraction_fit=0.25, client_sampling="size", sizes=np.array(sizes, dtype=float)
        )
        assert fed.select_clients(server_round) == expected
    assert fed._fingerprint()["client_sampling"] == "size"
    with pytest.raises(ValueError, match=r"Expected argument `client_sampling` to be one of"):
        Federation(TinyMLP(), _clients(sizes), FedAvg(), 1, client_sampling="sizes")


def test_remote_clients_need_their_sizes_for_size_sampling() -> None:
    class Remote(Transport):
        remote = True

        def collect(self, federation, server_round, instructions, attempt):  # pragma: no cover - never trained
            raise NotImplementedError

    with pytest.raises(ValueError, match=r"Expected a data size for every client.*client '0' has none.*HINT"):
        Federation(TinyMLP(), ["0", "1"], FedAvg(), 1, transport=Remote(), client_sampling="size", verbose=False)
    fed = Federation(
        TinyMLP(),
        ["0", "1", "2"],
        FedAvg(),
        1,
        transport=Remote(),
        fraction_fit=0.3,
        client_sampling="size",
        client_sizes={"0": 1, "1": 0, "2": 0},
        verbose=False,
    )
    assert fed.select_clients(1) == ["0"]


def test_resuming_with_another_client_sampling_is_refused(tmp_path: Path) -> None:
    def federation(sampling: str) -> Federation:
        torch.manual_seed(0)
        return Federation(
            TinyMLP(),
            _clients((6, 9, 12)),
            FedAvg(),
            1,
            fraction_fit=0.5,
            client_sampling=sampling,
            checkpoint_dir=tmp_path,
            verbose=False,
        )

    federation("uniform").fit()
    with pytest.raises(CheckpointMismatchError, match=r"`client_sampling` differs: saved 'uniform', now 'size'"):
        federation("size").fit()
    # a checkpoint written before the setting existed ran with uniform sampling
    fed = federation("uniform")
    state = fed.state_dict()
    del state["fingerprint"]["client_sampling"]
    fed.load_state_dict(state)


def test_a_population_of_10000_clients_builds_and_runs_a_round_quickly() -> None:
    started = time.perf_counter()
    gen = np.random.default_rng(0)
    labels = (gen.random((12_000, 4)) < [0.5, 0.3, 0.2, 0.1]).astype(np.int64)
    features = gen.standard_normal((12_000, 8)).astype(np.float32)
    dataset = MultilabelDataset(
        features, labels.astype(np.int8), [f"l{i}" for i in range(4)], [f"f{i}" for i in range(8)]
    )
    partition = label_set_dirichlet(labels, 10_000, alpha=0.1, seed=0, min_samples=1)
    assert partition.sizes.min() >= 1 and partition.sizes.sum() == 12_000  # no client is left empty
    clients = client_datamodules(dataset, partition, batch_size=16)
    torch.manual_seed(0)
    fed = Federation(TinyMLP(8, 4), clients, FedAvg(), 2, fraction_fit=0.01, client_sampling="size", verbose=False)
    built = time.perf_counter()
    record = fed.run_round(1)
    finished = time.perf_counter()
    assert len(record.clients) == 100 and not record.failures
    assert set(record.client_weights) == set(record.clients)
    assert finished - started < 10.0, f"build {built - started:.1f} s, round {finished - built:.1f} s"


# ---------------------------------------------------------------------------------------------- checkpoints
def _checkpointed(tmp_path: Path, num_rounds: int) -> Federation:
    torch.manual_seed(0)
    return Federation(
        TinyMLP(),
        _clients((6, 9, 12, 7)),
        FedHarmony(),
        num_rounds,
        fraction_fit=0.5,
        client_sampling="size",
        checkpoint_dir=tmp_path,
        verbose=False,
    )


def test_per_round_checkpoints_keep_the_per_client_history_in_an_append_only_log(tmp_path: Path) -> None:
    finished = _checkpointed(tmp_path, 3)
    finished.fit()
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    # the checkpoint no longer rewrites every past round's per-client detail
    assert saved["history"]["client_log"] == CLIENT_LOG_NAME
    assert all(not set(CLIENT_FIELDS) & set(r) for r in saved["history"]["rounds"])
    assert len((tmp_path / CLIENT_LOG_NAME).read_text().splitlines()) == 3
    resumed = _checkpointed(tmp_path, 3)
    resumed.restore(tmp_path / CHECKPOINT_NAME)
    assert resumed.result.to_dict() == finished.result.to_dict()
    assert resumed.result.rounds[-1].client_metrics and resumed.result.rounds[-1].client_pairs


def test_a_round_logged_but_not_checkpointed_is_dropped_on_resume(tmp_path: Path) -> None:
    first = _checkpointed(tmp_path, 2)
    first.aggregator.setup(2)
    first.run_round(1)
    first.run_round(2)
    whole = first.result.to_dict()
    # a crash after round 3's log line and before its checkpoint: the log holds one round more
    log = tmp_path / CLIENT_LOG_NAME
    log.write_text(log.read_text() + '{"server_round":3,"clients":[]}\n')
    resumed = _checkpointed(tmp_path, 2)
    resumed.restore(tmp_path / CHECKPOINT_NAME)
    assert resumed.result.to_dict() == whole
    assert len(log.read_text().splitlines()) == 2  # cut back, so the next round's line follows round 2's


def test_a_missing_client_log_is_a_checkpoint_error(tmp_path: Path) -> None:
    _checkpointed(tmp_path, 1).fit()
    (tmp_path / CLIENT_LOG_NAME).unlink()
    with pytest.raises(CheckpointError, match=r"federation\.clients\.jsonl: expected the per-client history.*HINT"):
        _checkpointed(tmp_path, 1).fit()
