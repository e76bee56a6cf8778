"""The Flower runner keeps ``Federation``'s promises: resume after SIGKILL to the same weights, retries with fresh
seeds, time limits, failures recorded with the node and the reason, checkpoints of other runs or damaged ones refused.

The kill and fault tests run the Flower simulation (Ray backend) as a script (``helpers/flower_sim.py``) in a
subprocess; the others drive the strategy with a fake Grid whose clients answer in this process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.processes import descendants

flwr = pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict  # noqa: E402

from lightning_fedharmony import FedAvg, FedHarmony  # noqa: E402
from lightning_fedharmony.checkpoint import (  # noqa: E402
    CHECKPOINT_NAME,
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
)
from lightning_fedharmony.client import evaluate_client  # noqa: E402
from lightning_fedharmony.data import ClientDataModule  # noqa: E402
from lightning_fedharmony.integrations.flower import (  # noqa: E402
    FedHarmonyStrategy,
    Key,
    evaluation_to_records,
    instruction_from_records,
    update_to_records,
    weights_to_arrays,
)
from lightning_fedharmony.mixin import model_weights  # noqa: E402
from lightning_fedharmony.models import MultilabelMLP  # noqa: E402
from lightning_fedharmony.orchestrator import Federation, FederationError  # noqa: E402
from lightning_fedharmony.protocol import Update  # noqa: E402
from lightning_fedharmony.results import FederationResult  # noqa: E402
from lightning_fedharmony.rounds import client_seed  # noqa: E402
from lightning_fedharmony.stats import CorrelationStats  # noqa: E402

SIM = Path(__file__).resolve().parent / "helpers" / "flower_sim.py"
NUM_LABELS = 4


# ---------------------------------------------------------------------------------------------- the simulation
def _simulate(out: Path, *args: str) -> subprocess.Popen:
    """``helpers/flower_sim.py`` in its own session, its log in ``out.log``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_TELEMETRY_ENABLED": "0"}
    with open(out.with_suffix(".log"), "w") as log:
        return subprocess.Popen(
            [sys.executable, str(SIM), str(out), *args], env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _finish(process: subprocess.Popen, out: Path, timeout: float = 240) -> None:
    try:
        process.wait(timeout=timeout)
    finally:
        _kill(process)
    assert process.returncode == 0, out.with_suffix(".log").read_text()[-3000:]


def _kill(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started (Ray's raylet, GCS and actors)."""
    for pid in [process.pid, *descendants(process.pid)]:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    process.wait(timeout=30)


def test_sigkill_after_round_1_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path: Path) -> None:
    straight = _simulate(tmp_path / "straight", "--rounds", "3")
    killed = _simulate(tmp_path / "resumed", "--rounds", "3", "--checkpoint-dir", str(tmp_path / "ckpt"),
                       "--stall-round", "2")  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (tmp_path / "resumed" / "stalled").exists():  # round 2's clients are training
            assert killed.poll() is None and time.monotonic() < deadline, (tmp_path / "resumed.log").read_text()
            time.sleep(0.2)
    finally:
        _kill(killed)
    assert killed.returncode == -signal.SIGKILL
    checkpoint = tmp_path / "ckpt" / CHECKPOINT_NAME
    assert load_checkpoint(checkpoint)["server_round"] == 1
    resumed = _simulate(tmp_path / "resumed", "--rounds", "3", "--checkpoint-dir", str(tmp_path / "ckpt"))
    _finish(resumed, tmp_path / "resumed")
    _finish(straight, tmp_path / "straight")

    assert f"Resumed from {checkpoint} after round 1" in (tmp_path / "resumed.log").read_text()
    a = torch.load(tmp_path / "straight" / "weights.pt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "weights.pt", weights_only=True)
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    history_a = FederationResult.from_json(tmp_path / "straight" / "history.json")
    history_b = FederationResult.from_json(tmp_path / "resumed" / "history.json")
    assert [r.server_round for r in history_b.rounds] == [1, 2, 3]
    assert [r.metrics for r in history_a.rounds] == [r.metrics for r in history_b.rounds]
    assert [r.client_metrics for r in history_a.rounds] == [r.client_metrics for r in history_b.rounds]


def test_a_client_that_raises_and_one_that_hangs_are_recorded_and_the_rounds_go_on(tmp_path: Path) -> None:
    out = tmp_path / "faults"  # two Ray actors: the others train while one hangs
    run = _simulate(out, "--rounds", "2", "--fail", "2", "--hang", "3", "--client-timeout", "4", "--min-clients", "2",
                    "--actors", "2")  # fmt: skip
    _finish(run, out)
    history = json.loads((out / "history.json").read_text())
    assert [r["server_round"] for r in history["rounds"]] == [1, 2]
    for record in history["rounds"]:
        assert record["clients"] == ["0", "1", "2", "3"]
        assert set(record["client_weights"]) == {"0", "1"}
        assert set(record["failures"]) == {"2", "3"}
        assert record["failures"]["2"].startswith("ClientAppError: disk went away (node ")
        assert record["failures"]["3"].startswith("no reply within client_timeout=4 s (node ")
        assert 0.0 < record["metrics"]["map"] <= 1.0
    FederationResult.from_json(out / "history.json").to_csv(tmp_path / "history.csv")  # the same tables as any run


# ---------------------------------------------------------------------------------------------- a fake Grid
class TrainingGrid:
    """A Grid of nodes ``100 + partition`` whose clients "train" in this process: the reply's weights are the
    global ones moved by a step drawn from the instruction's seed, so a wrong seed, round or model shows in them.
    Evaluation requests are answered for real, on a small held-out split per client (:attr:`sent` holds the training
    messages, :attr:`evaluated` the evaluation requests).
    ``fail(partition, server_round, attempt)`` says whether a client's ClientApp fails instead; ``crash_round`` stops
    the ServerApp when that round's messages are sent."""

    def __init__(
        self, num_clients: int, fail=lambda partition, server_round, attempt: False, crash_round: int = 0
    ) -> None:
        self.partitions = {100 + k: k for k in range(num_clients)}
        self.fail = fail
        self.crash_round = crash_round
        self.sent: list[Message] = []
        self.evaluated: list[Message] = []
        self._attempts: dict[int, int] = {}

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            cid = str(self.partitions[msg.metadata.dst_node_id])
            if msg.metadata.message_type == MessageType.QUERY:
                replies.append(Message(RecordDict({Key.CLIENT: ConfigRecord({Key.CLIENT_ID: cid})}), reply_to=msg))
                continue
            if msg.metadata.message_type == MessageType.EVALUATE:
                self.evaluated.append(msg)
                request = instruction_from_records(msg.content, cid)
                evaluation = evaluate_client(MultilabelMLP(3, NUM_LABELS, hidden=(8,)), _held_out(cid), cid, request)
                replies.append(Message(evaluation_to_records(evaluation), reply_to=msg))
                continue
            self.sent.append(msg)
            instruction = instruction_from_records(msg.content, cid)
            server_round = int(instruction.server_round or 0)
            if server_round == self.crash_round:
                raise KeyboardInterrupt
            attempt = self._attempts[server_round] = self._attempts.get(server_round, -1) + (cid == "0")
            if self.fail(int(cid), server_round, attempt):
                replies.append(Message(Error(code=0, reason="out of memory"), reply_to=msg))
                continue
            gen = torch.Generator().manual_seed(int(instruction.seed or 0))
            weights = {k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in instruction.weights.items()}
            stats = CorrelationStats(NUM_LABELS)
            preds = torch.rand(8, NUM_LABELS, generator=gen)
            stats.update(preds, (preds > 0.5).long() | torch.eye(NUM_LABELS, dtype=torch.long).repeat(2, 1))
            update = Update(cid, weights, 10 + int(cid), stats if instruction.collect_stats else None)
            replies.append(Message(update_to_records(update), reply_to=msg))
        return replies


def _held_out(cid: str) -> ClientDataModule:
    gen = torch.Generator().manual_seed(int(cid))
    x = torch.randn(16, 3, generator=gen)
    return ClientDataModule(x, (x[:, :1] + torch.randn(16, NUM_LABELS, generator=gen) > 0).float(), val_fraction=0.5)


def _initial() -> ArrayRecord:
    torch.manual_seed(0)
    return weights_to_arrays(model_weights(MultilabelMLP(3, NUM_LABELS, hidden=(8,))))


def _strategy(checkpoint_dir: Path | None = None, aggregator=None, **kwargs) -> FedHarmonyStrategy:
    args = {"min_available_clients": 3, "checkpoint_dir": checkpoint_dir, "fingerprint_extra": {"data": {"alpha": 0.1}}}
    return FedHarmonyStrategy(aggregator or FedHarmony(seed=0), **{**args, **kwargs})


# ---------------------------------------------------------------------------------------------- retries and resume
def test_a_round_with_too_few_replies_is_sent_again_with_fresh_seeds(task_identity: None) -> None:
    grid = TrainingGrid(3, fail=lambda partition, server_round, attempt: attempt == 0 and partition > 0)
    strategy = _strategy(min_clients=2, round_retries=1, seed=4)
    strategy.start(grid, _initial(), num_rounds=1)  # type: ignore[arg-type]
    record = strategy.result.final
    assert record.attempts == 2 and record.failures == {} and set(record.client_weights) == {"0", "1", "2"}
    seeds = [(m.content[Key.CONFIG][Key.CLIENT_ID], m.content[Key.CONFIG][Key.SEED]) for m in grid.sent]
    assert seeds == [(cid, client_seed(4, 1, int(cid), attempt)) for attempt in (0, 1) for cid in ("0", "1", "2")]

    grid = TrainingGrid(3, fail=lambda partition, server_round, attempt: partition > 0)
    with pytest.raises(FederationError, match=r"Round 1: 1 of 3 clients .* each of 2 attempt\(s\).*out of memory"):
        _strategy(min_clients=2, round_retries=1).start(grid, _initial(), num_rounds=1)  # type: ignore[arg-type]


def test_failures_name_the_node(task_identity: None) -> None:
    grid = TrainingGrid(3, fail=lambda partition, server_round, attempt: partition == 2)
    strategy = _strategy()
    strategy.start(grid, _initial(), num_rounds=1)  # type: ignore[arg-type]
    assert strategy.result.final.failures == {"2": "ClientAppError: out of memory (node 102)"}


@pytest.mark.parametrize("momentum", [0.0, 0.5], ids=["plain", "server-momentum"])
def test_resume_in_process_gives_the_weights_of_an_uninterrupted_run(
    task_identity: None, tmp_path: Path, momentum: float
) -> None:
    def strategy(checkpoint_dir: Path | None = None) -> FedHarmonyStrategy:
        return _strategy(checkpoint_dir, FedHarmony(seed=0, server_momentum=momentum))

    straight = strategy()
    straight.start(TrainingGrid(3), _initial(), num_rounds=3)  # type: ignore[arg-type]
    assert ("server_momentum" in straight.result.rounds[-1].server_metrics) == (momentum > 0)
    with pytest.raises(KeyboardInterrupt):  # the ServerApp stops while round 2's clients train
        strategy(tmp_path).start(TrainingGrid(3, crash_round=2), _initial(), num_rounds=3)  # type: ignore[arg-type]
    saved = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    assert saved["server_round"] == 1
    assert ("server_momentum_buffer" in saved["aggregator"]) == (momentum > 0)  # the momentum travels with it
    resumed = strategy(tmp_path)
    grid = TrainingGrid(3)
    resumed.start(grid, _initial(), num_rounds=3)  # type: ignore[arg-type]
    assert {int(m.content[Key.CONFIG][Key.SERVER_ROUND]) for m in grid.sent} == {2, 3}
    assert [r.server_round for r in resumed.result.rounds] == [1, 2, 3]
    assert [r.client_weights for r in resumed.result.rounds] == [r.client_weights for r in straight.result.rounds]
    # the federated evaluation of round 1 ran before its checkpoint: the resumed history is complete
    assert {int(m.content[Key.CONFIG][Key.SERVER_ROUND]) for m in grid.evaluated} == {2, 3}
    assert [r.metrics for r in resumed.result.rounds] == [r.metrics for r in straight.result.rounds]
    assert [r.client_metrics for r in resumed.result.rounds] == [r.client_metrics for r in straight.result.rounds]
    assert all("fed_map" in r.metrics and not r.eval_failures for r in resumed.result.rounds)
    for name, tensor in straight.global_weights.items():
        assert torch.equal(tensor, resumed.global_weights[name]), name


# ---------------------------------------------------------------------------------------------- refused checkpoints
@pytest.fixture
def finished(task_identity: None, tmp_path: Path) -> Path:
    """A checkpoint dir holding a finished one-round run."""
    _strategy(tmp_path).start(TrainingGrid(3), _initial(), num_rounds=1)  # type: ignore[arg-type]
    return tmp_path


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"seed": 1}, "`seed` differs: saved 0, now 1"),
        ({"fingerprint_extra": {"data": {"alpha": 0.5}}}, "`data.alpha` differs: saved 0.1, now 0.5"),
        ({"min_available_clients": 2}, "`min_available_clients` differs: saved 3, now 2"),
        ({"aggregator": FedAvg()}, "`aggregator` differs"),
    ],
)
def test_a_checkpoint_of_other_settings_is_refused_naming_the_setting(finished: Path, change: dict, match: str) -> None:
    strategy = _strategy(finished, **change)
    with pytest.raises(CheckpointMismatchError, match=rf"federation\.ckpt: Expected .*{match}.*HINT"):
        strategy.start(TrainingGrid(3), _initial(), num_rounds=1)  # type: ignore[arg-type]
    with pytest.raises(CheckpointMismatchError, match="`num_rounds` differs: saved 1, now 2"):
        _strategy(finished).start(TrainingGrid(3), _initial(), num_rounds=2)  # type: ignore[arg-type]


def test_a_checkpoint_of_a_local_federation_is_refused(task_identity: None, tmp_path: Path) -> None:
    x, y = torch.randn(16, 3), (torch.rand(16, NUM_LABELS) < 0.5).float()
    torch.manual_seed(0)
    Federation(MultilabelMLP(3, NUM_LABELS, hidden=(8,)), [ClientDataModule(x, y, batch_size=8)], FedAvg(), 1,
               checkpoint_dir=tmp_path, verbose=False).fit()  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="`runner` differs: saved <not recorded>, now 'flower'"):
        _strategy(tmp_path).start(TrainingGrid(3), _initial(), num_rounds=1)  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_damaged_checkpoint_is_a_one_line_error_with_a_hint(finished: Path, damage: str) -> None:
    path = finished / CHECKPOINT_NAME
    content = path.read_bytes()
    path.write_bytes(b"not a checkpoint at all" if damage == "garbage" else content[: len(content) // 2])
    with pytest.raises(
        CheckpointError, match=r"federation\.ckpt: expected a readable federation checkpoint.*HINT"
    ) as info:
        _strategy(finished).start(TrainingGrid(3), _initial(), num_rounds=1)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_strategy_promise_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="Expected argument `round_retries` to be an int >= 0, but got -1"):
        FedHarmonyStrategy(FedAvg(), round_retries=-1)
    with pytest.raises(ValueError, match="Expected argument `client_timeout` to be None or > 0, but got 0"):
        FedHarmonyStrategy(FedAvg(), client_timeout=0)
    with pytest.raises(ValueError, match=r"Expected argument `fingerprint_extra` to leave .* but got \['seed'\]"):
        FedHarmonyStrategy(FedAvg(), fingerprint_extra={"seed": 1})


def test_metric_record_reports_the_attempts(task_identity: None) -> None:
    result = _strategy().start(TrainingGrid(3), _initial(), num_rounds=1)  # type: ignore[arg-type]
    assert isinstance(result.train_metrics_clientapp[1], MetricRecord)
    assert result.train_metrics_clientapp[1]["attempts"] == 1


def test_resume_is_refused_for_an_aggregator_that_keeps_state_on_the_clients(tmp_path) -> None:
    hint = r"FedHarmony\(leave_one_out=.client.\).*HINT: use FedHarmony\(leave_one_out=.server.\)"
    with pytest.raises(ValueError, match=hint):
        FedHarmonyStrategy(FedHarmony(leave_one_out="client"), checkpoint_dir=tmp_path)
    assert FedHarmonyStrategy(FedHarmony(leave_one_out="client")).checkpoint_path is None
