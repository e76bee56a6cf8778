"""Resume after a kill, client faults, hostile statistics, privacy noise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.resume import assert_same_weights, run_interrupted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedharmony import CorrelationStats, DirectoryExchange, FedAvg, FedHarmony, PayloadError
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    CLIENT_LOG_NAME,
    CLIENT_STATE_NAME,
    CheckpointMismatchError,
    load_checkpoint,
)
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.faults import ClientTimeoutError, screen_update, time_limit
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation, FederationError
from lightning_fedharmony.privacy import privatize_stats

REPO = Path(__file__).resolve().parents[1]


def _data(seed: int = 0, n: int = 240, d: int = 6, labels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = (x @ torch.randn(d, labels, generator=generator) > 0.3).float()
    return x, y


def _clients(num: int = 3) -> list[ClientDataModule]:
    x, y = _data()
    return [ClientDataModule(x[i::num], y[i::num], batch_size=32) for i in range(num)]


def _model() -> MultilabelMLP:
    torch.manual_seed(0)
    return MultilabelMLP(6, 4, hidden=(16,))


class _Failing(ClientDataModule):
    def train_dataloader(self) -> DataLoader:
        raise OSError("disk went away")


class _Hanging(ClientDataModule):
    def train_dataloader(self) -> DataLoader:
        time.sleep(30)
        raise AssertionError("the time limit should have stopped this client")


def _nan_client() -> ClientDataModule:
    x, y = _data(1, n=80)
    x[0, 0] = float("nan")
    return ClientDataModule(x, y, batch_size=80)


# ---------------------------------------------------------------- resume after SIGKILL
def _run_cli(tmp: Path, ckpt: Path, rounds: int, extra: tuple[str, ...] = ()) -> subprocess.Popen:
    args = [
        sys.executable,
        "-m",
        "lightning_fedharmony.cli",
        "run",
        "--methods",
        "fedharmony",
        "partition.num_clients=3",
        f"federation.num_rounds={rounds}",
        "federation.local_epochs=4",
        f"federation.checkpoint_dir={ckpt}",
        f"out_dir={tmp / 'out'}",
        "plots=false",
        *extra,
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# the sums-only server: the in-process clients' own terms are saved with the server's sums and come back with them
CLIENT_TERMS = ("methods.fedharmony.init_args.leave_one_out=client", "federation.fraction_fit=0.67")


@pytest.mark.parametrize("extra", [(), CLIENT_TERMS], ids=["server", "client-terms"])
def test_resume_after_sigkill_gives_bit_identical_weights(tmp_path: Path, extra: tuple[str, ...]) -> None:
    rounds = 4
    straight = _run_cli(tmp_path / "a", tmp_path / "a" / "ckpt", rounds, extra)
    assert straight.wait(timeout=300) == 0, straight.stdout.read() if straight.stdout else ""

    ckpt_dir = tmp_path / "b" / "ckpt"
    ckpt_file = ckpt_dir / "fedharmony" / "federation.ckpt"
    killed = _run_cli(tmp_path / "b", ckpt_dir, rounds, extra)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if ckpt_file.exists() and load_checkpoint(ckpt_file)["server_round"] >= 1:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # into the next round's local training
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=30)
    assert killed.returncode == -signal.SIGKILL
    finished_before_kill = load_checkpoint(ckpt_file)["server_round"]
    assert 1 <= finished_before_kill < rounds

    # the clients' terms are kept next to the checkpoint, one file per client
    assert (load_checkpoint(ckpt_file).get("client_state") == CLIENT_STATE_NAME) == bool(extra)
    assert any((ckpt_file.parent / CLIENT_STATE_NAME).glob("*.pt")) == bool(extra)
    resumed = _run_cli(tmp_path / "b", ckpt_dir, rounds, extra)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resumed from {ckpt_file} after round {finished_before_kill}" in output

    a = load_checkpoint(tmp_path / "a" / "ckpt" / "fedharmony" / "federation.ckpt")
    b = load_checkpoint(ckpt_file)
    assert a["server_round"] == b["server_round"] == rounds
    assert a["global_weights"].keys() == b["global_weights"].keys()
    for key, value in a["global_weights"].items():
        assert torch.equal(value, b["global_weights"][key]), key
    assert [r["metrics"] for r in a["history"]["rounds"]] == [r["metrics"] for r in b["history"]["rounds"]]


def test_checkpoint_of_another_setup_is_refused(tmp_path: Path) -> None:
    Federation(_model(), _clients(), FedAvg(), 1, checkpoint_dir=tmp_path, verbose=False).fit()
    other = Federation(_model(), _clients(), FedAvg(), 2, checkpoint_dir=tmp_path, verbose=False)
    with pytest.raises(CheckpointMismatchError, match="`num_rounds` differs: saved 1, now 2"):
        other.fit()


def test_resume_in_process_matches_uninterrupted(tmp_path: Path) -> None:
    def make(**kwargs: object) -> Federation:
        return Federation(_model(), _clients(), FedHarmony(), 3, verbose=False, **kwargs)  # type: ignore[arg-type]

    full, second = run_interrupted(make, tmp_path, 1)
    assert [r.server_round for r in second.result.rounds] == [1, 2, 3]
    assert_same_weights(full.global_weights, second.global_weights)


# ---------------------------------------------------------------- client faults
def test_exception_nan_and_hang_are_recorded_and_the_round_goes_on() -> None:
    x, y = _data()
    clients = {
        "ok-0": ClientDataModule(x[:80], y[:80], batch_size=32),
        "ok-1": ClientDataModule(x[80:160], y[80:160], batch_size=32),
        "raises": _Failing(x[:10], y[:10]),
        "nan": _nan_client(),
        "hangs": _Hanging(x[:10], y[:10]),
    }
    fed = Federation(_model(), clients, FedHarmony(), 2, min_clients=2, client_timeout=1.0, verbose=False)
    result = fed.fit()
    for record in result.rounds:
        assert set(record.failures) == {"raises", "nan", "hangs"}
        assert "OSError: disk went away" in record.failures["raises"]
        assert "non-finite" in record.failures["nan"]
        assert "ClientTimeoutError" in record.failures["hangs"]
        assert set(record.client_weights) == {"ok-0", "ok-1"}
    assert all(torch.isfinite(v).all() for v in fed.global_weights.values() if v.is_floating_point())


def test_too_few_updates_keeps_the_last_good_model_on_disk(tmp_path: Path) -> None:
    x, y = _data()
    clients = {"ok": ClientDataModule(x[:80], y[:80], batch_size=32), "raises": _Failing(x[:10], y[:10])}
    fed = Federation(_model(), clients, FedAvg(), 3, min_clients=1, checkpoint_dir=tmp_path, verbose=False)
    fed.aggregator.setup(3)
    fed.run_round(1)
    good = {k: v.clone() for k, v in fed.global_weights.items()}
    fed.min_clients = 2
    with pytest.raises(FederationError, match=r"Round 2: 1 of 2 clients .* in each of 2 attempt\(s\)") as err:
        fed.round_retries = 1
        fed.run_round(2)
    assert "federation.ckpt" in str(err.value)
    on_disk = load_checkpoint(tmp_path / "federation.ckpt")
    assert on_disk["server_round"] == 1
    for key, value in good.items():
        assert torch.equal(fed.global_weights[key], value)
        assert torch.equal(on_disk["global_weights"][key], value)


def test_time_limit_interrupts_python_code() -> None:
    started = time.perf_counter()
    with (
        pytest.raises(ClientTimeoutError, match=r"client 'slow' exceeded its time limit of 0\.2 s"),
        time_limit(0.2, "slow"),
    ):
        time.sleep(5)
    assert time.perf_counter() - started < 2
    with time_limit(None):
        pass


def test_constructor_rejects_bad_reliability_settings() -> None:
    with pytest.raises(ValueError, match="`client_timeout` to be None or > 0, but got 0"):
        Federation(_model(), _clients(), FedAvg(), client_timeout=0)
    with pytest.raises(ValueError, match="`round_retries` to be an int >= 0, but got -1"):
        Federation(_model(), _clients(), FedAvg(), round_retries=-1)
    with pytest.raises(ValueError, match="`stats_noise_multiplier` to be a float >= 0, but got -1"):
        Federation(_model(), _clients(), FedAvg(), stats_noise_multiplier=-1)


# ---------------------------------------------------------------- hostile statistics
def _stats(labels: int = 4, seed: int = 0) -> CorrelationStats:
    generator = torch.Generator().manual_seed(seed)
    stats = CorrelationStats(labels)
    stats.update(torch.rand(50, labels, generator=generator), torch.randint(0, 2, (50, labels), generator=generator))
    return stats


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("sum_outer", float("nan"), "`sum_outer` to be finite"),
        ("sum_preds", float("inf"), "`sum_preds` to be finite"),
        ("sum_preds", -5.0, r"`sum_preds` to lie in \[0, num_samples\]"),
        ("num_samples", -1.0, "`num_samples` to be non-negative"),
        ("target_positives", 1e9, r"`target_positives` to lie in \[0, num_samples\]"),
    ],
)
def test_screen_update_rejects_broken_statistics(field: str, value: float, match: str) -> None:
    from lightning_fedharmony.aggregators import ClientUpdate

    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("fedharmony_")}
    stats = _stats()
    tensor = getattr(stats, field)
    if tensor.ndim:
        tensor[0] = value
    else:
        setattr(stats, field, torch.tensor(value, dtype=torch.float64))
    reason = screen_update(ClientUpdate("mallory", weights, 10, stats), weights)
    assert reason is not None and reason.startswith("rejected statistics")
    assert pytest.importorskip("re").search(match, reason), reason


def test_screen_update_rejects_label_count_and_weights() -> None:
    from lightning_fedharmony.aggregators import ClientUpdate

    weights = {k: v for k, v in _model().state_dict().items() if not k.startswith("fedharmony_")}
    reason = screen_update(ClientUpdate("c", weights, 10, _stats(5)), weights, num_labels=4)
    assert reason == "rejected statistics: expected 4 labels, but got 5."
    bad = {**weights, "net.0.weight": torch.zeros(3, 3)}
    reason = screen_update(ClientUpdate("c", bad, 10), weights)
    assert reason is not None and "Client 'c', field `weights.net.0.weight`: expected shape" in reason


def test_federation_continues_without_a_hostile_client(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning_fedharmony import client

    real = client.train_client

    def poisoned(module, datamodule, client_id, instructions, **kwargs):  # type: ignore[no-untyped-def]
        update, loss, setup = real(module, datamodule, client_id, instructions, **kwargs)
        if client_id == "1" and update.stats is not None:
            update.stats.sum_outer[0, 1] = float("nan")
        return update, loss, setup

    monkeypatch.setattr(client, "train_client", poisoned)
    fed = Federation(_model(), _clients(), FedHarmony(), 2, verbose=False)
    result = fed.fit()
    for record in result.rounds:
        assert list(record.failures) == ["1"]
        assert "`sum_outer` to be finite" in record.failures["1"]
        assert set(record.client_weights) == {"0", "2"}


@settings(max_examples=60, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
@given(
    num_labels=st.integers(1, 5),
    data=st.data(),
    dtype=st.sampled_from([np.float64, np.float32, np.int64]),
    drop=st.sampled_from([None, "sum_outer", "num_samples"]),
)
def test_exchange_accepts_valid_statistics_and_rejects_everything_else(
    tmp_path_factory: pytest.TempPathFactory, num_labels: int, data: st.DataObject, dtype: type, drop: str | None
) -> None:
    root = tmp_path_factory.mktemp("exchange")
    exchange = DirectoryExchange(root)
    if dtype == np.int64:
        anything: st.SearchStrategy = st.integers(-10, 10**6)
        small: st.SearchStrategy = st.integers(-2, 100)
    else:
        anything = st.floats(allow_nan=True, allow_infinity=True, width=32)
        small = st.floats(-2, 100, width=32)
    payload = {
        "num_samples": data.draw(arrays(dtype, (), elements=anything), label="num_samples"),
        "sum_preds": data.draw(arrays(dtype, (num_labels,), elements=small), label="sum_preds"),
        "sum_outer": data.draw(arrays(dtype, (num_labels, num_labels), elements=anything), label="sum_outer"),
        "target_positives": np.zeros(num_labels, dtype),
        "observed_count": np.zeros(num_labels, dtype),
    }
    if drop:
        payload.pop(drop)
    exchange._write("stats", "c", payload, 1)
    try:
        result = exchange.read_stats("c")
    except PayloadError as err:
        assert str(root) in str(err)
        return
    assert result is not None
    assert dtype == np.float64 and drop is None
    corr = result.stats.compute()
    assert torch.isfinite(corr).all()


def test_truncated_statistics_file_is_rejected_naming_it(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    exchange.publish_stats("c", _stats())
    path = exchange.path("stats", "c")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PayloadError, match=r"c\.npz: not a readable payload"):
        exchange.read_stats("c")


# ---------------------------------------------------------------- privacy
def test_noise_off_changes_nothing() -> None:
    stats = _stats()
    same = privatize_stats(stats, 0.0)
    for key, value in stats.state_dict().items():
        assert torch.equal(value, same.state_dict()[key])


def test_noise_scale_matches_the_setting() -> None:
    labels, sigma, clip = 4, 2.0, 1.5
    base = CorrelationStats(labels, clip=clip)
    base.update(torch.full((5000, labels), 0.5))  # large counts: clamping to the valid range never triggers
    generator = torch.Generator().manual_seed(0)
    draws = [privatize_stats(base, sigma, clip, generator) for _ in range(400)]
    preds_noise = torch.stack([d.sum_preds - base.sum_preds for d in draws])
    outer_noise = torch.stack([d.sum_outer - base.sum_outer for d in draws])
    count_noise = torch.stack([d.num_samples - base.num_samples for d in draws])
    assert preds_noise.std().item() == pytest.approx(sigma * clip, rel=0.1)
    assert outer_noise.std().item() == pytest.approx(sigma * clip**2, rel=0.1)
    assert count_noise.std().item() == pytest.approx(sigma, rel=0.15)
    assert torch.equal(outer_noise, outer_noise.transpose(1, 2))


def test_clipping_bounds_each_sample() -> None:
    stats = CorrelationStats(4, clip=0.5)
    stats.update(torch.ones(3, 4))  # each row has norm 2: scaled to 0.5, so every entry becomes 0.25
    assert torch.allclose(stats.sum_preds, torch.full((4,), 0.75, dtype=torch.float64))


def test_federation_with_noisy_statistics_runs() -> None:
    fed = Federation(_model(), _clients(), FedHarmony(), 2, stats_noise_multiplier=0.5, verbose=False)
    result = fed.fit()
    assert len(result.rounds) == 2 and not result.final.failures


def test_noise_reaches_the_exported_statistics() -> None:
    import lightning.pytorch as pl

    from lightning_fedharmony import CorrelationExchange

    callback = CorrelationExchange(client_id="c", stats_noise_multiplier=1.0, noise_seed=3)
    trainer = pl.Trainer(
        max_epochs=1,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    x, y = _data()
    trainer.fit(_model(), DataLoader(TensorDataset(x, y), batch_size=60))
    assert callback.stats is not None and callback.published_stats is not None
    assert not torch.equal(callback.stats.sum_outer, callback.published_stats.sum_outer)
    read = callback.exchange.read_stats("c")
    assert read is not None and torch.equal(read.stats.sum_outer, callback.published_stats.sum_outer)


# ---------------------------------------------------------------- resume after SIGKILL at each point of a round
@pytest.fixture(scope="module")
def uninterrupted() -> Federation:
    from helpers.kill_driver import build

    federation = build(None)
    federation.verbose = False
    federation.fit()
    return federation


@pytest.mark.parametrize("point", ["checkpoint", "aggregate", "evaluate"])
def test_sigkill_at_each_point_of_a_round_resumes_to_bit_identical_weights(
    tmp_path: Path, uninterrupted: Federation, point: str
) -> None:
    from helpers.kill_driver import KILL_ROUND, build

    ckpt = tmp_path / "ckpt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    driver = subprocess.run(
        [sys.executable, str(REPO / "tests" / "helpers" / "kill_driver.py"), str(ckpt), point],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert driver.returncode == -signal.SIGKILL, driver.stdout + driver.stderr
    assert load_checkpoint(ckpt / "federation.ckpt")["server_round"] == KILL_ROUND - 1
    if point == "checkpoint":  # the torn write stayed in its temporary file (beside the per-client log)
        others = [p.name for p in ckpt.iterdir() if p.name not in (CHECKPOINT_NAME, CLIENT_LOG_NAME)]
        assert len(others) == 1 and others[0].endswith(".tmp"), others

    resumed = build(ckpt)
    resumed.verbose = False
    result = resumed.fit()
    assert [r.server_round for r in result.rounds] == [1, 2, 3]
    for key, value in uninterrupted.global_weights.items():
        assert torch.equal(value, resumed.global_weights[key]), key
    assert [r.metrics for r in result.rounds] == [r.metrics for r in uninterrupted.result.rounds]
    assert [r.client_metrics for r in result.rounds] == [r.client_metrics for r in uninterrupted.result.rounds]
