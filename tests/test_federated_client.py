"""fedharmony serve and LightningCLI clients (FederatedClient) as real processes over a shared folder.

Each test starts the server and three clients of `examples/lightning_cli/train.py` (yeast, label-set Dirichlet 0.1,
3 clients, a 16-unit MLP) and bounds every wait; leftovers are killed in `finally`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.pinned import weights_digest

from lightning_fedharmony.checkpoint import CHECKPOINT_NAME, load_checkpoint
from lightning_fedharmony.config import load_config
from lightning_fedharmony.experiment import prepare_data, run_methods

pytest.importorskip("river")

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "examples" / "lightning_cli" / "train.py"
METHOD = "fedharmony"

SERVER_YAML = """
seed: 0
data: {{name: "river:yeast", client_val_fraction: 0.0}}
partition: {{kind: dirichlet, num_clients: 3, alpha: 0.1}}
model: {{class_path: lightning_fedharmony.models.MultilabelMLP, init_args: {{hidden: [16], lr: 0.01}}}}
federation: {{num_rounds: {rounds}, local_epochs: 2, min_clients: {min_clients}, client_timeout: {timeout},
  round_retries: {retries}}}
methods: {{fedharmony: {{class_path: lightning_fedharmony.FedHarmony, init_args: {{leave_one_out: {leave_one_out}}}}}}}
plots: false
"""

CLIENT_YAML = """
seed_everything: 0
model:
  class_path: lightning_fedharmony.models.MultilabelMLP
  init_args: {{num_features: 103, num_labels: 14, hidden: [16], lr: 0.01}}
data:
  class_path: lightning_fedharmony.data.federated.PartitionedDataModule
  init_args: {{client: 0, name: "river:yeast", partition: dirichlet, num_clients: 3, alpha: 0.1, seed: 0}}
trainer:
  accelerator: cpu
  devices: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  num_sanity_val_steps: 0
  callbacks:
    - class_path: lightning_fedharmony.FederatedClient
      init_args: {{root: {root}, client_id: "0", poll_interval: 0.05, timeout: 120}}
"""


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"
    return env


class _Run:
    """A server and its client processes over ``tmp/root``."""

    def __init__(
        self,
        tmp: Path,
        rounds: int,
        min_clients: int = 3,
        timeout: float = 120,
        leave_one_out: str = "server",
        retries: int = 0,
    ) -> None:
        self.tmp, self.root = tmp, tmp / "root"
        self.server_yaml = tmp / "server.yaml"
        self.server_yaml.write_text(
            SERVER_YAML.format(
                rounds=rounds, min_clients=min_clients, timeout=timeout, leave_one_out=leave_one_out, retries=retries
            )
        )
        self.client_yaml = tmp / "client.yaml"
        self.client_yaml.write_text(CLIENT_YAML.format(root=self.root))
        self.processes: list[subprocess.Popen] = []
        self.checkpoint = self.root / "server" / METHOD / CHECKPOINT_NAME

    def server(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "lightning_fedharmony.cli", "serve", "--config", str(self.server_yaml)]
        cmd += ["--root", str(self.root), "--method", METHOD, f"out_dir={self.tmp / 'out'}"]
        return self._start(cmd, self.tmp / "server.log")

    def client(self, k: int) -> subprocess.Popen:
        cmd = [sys.executable, str(TRAIN), "fit", "--config", str(self.client_yaml), "--data.init_args.client", str(k)]
        cmd += [
            "--trainer.callbacks.init_args.client_id",
            str(k),
            "--trainer.default_root_dir",
            str(self.tmp / f"c{k}"),
        ]
        return self._start(cmd, self.tmp / f"client_{k}.log")

    def _start(self, cmd: list[str], log: Path) -> subprocess.Popen:
        handle = open(log, "ab")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=_env(), cwd=self.tmp)
        handle.close()
        self.processes.append(process)
        return process

    def rounds_done(self) -> list[dict]:
        try:
            return load_checkpoint(self.checkpoint)["history"]["rounds"] if self.checkpoint.exists() else []
        except RuntimeError:  # being replaced
            return []

    def wait_until(self, condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; logs:\n{self.logs()}")
            time.sleep(0.05)

    def finish(self, process: subprocess.Popen, seconds: float = 240) -> None:
        try:
            code = process.wait(seconds)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"process did not end in {seconds} s; logs:\n{self.logs()}") from None
        assert code == 0, f"exit code {code}; logs:\n{self.logs()}"

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def kill_all(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)

    def final_weights(self) -> dict[str, torch.Tensor]:
        return load_checkpoint(self.checkpoint)["global_weights"]


def _reference(run: _Run):
    """The same federation in one process: `fedharmony run`'s path."""
    cfg = load_config(run.server_yaml, [f"out_dir={run.tmp / 'ref'}"])
    return run_methods(cfg, prepare_data(cfg), [METHOD], verbose=False)[METHOD]


@pytest.mark.parametrize("leave_one_out", ["server", "client"])
def test_serve_and_lightning_cli_clients_match_federation(tmp_path, leave_one_out):
    """Both FedHarmony servers: with ``leave_one_out="client"`` each client process keeps its terms in the sums
    (``FederatedClient.memory``) and builds its own teachers."""
    run = _Run(tmp_path, rounds=3, leave_one_out=leave_one_out)
    try:
        server = run.server()
        clients = [run.client(k) for k in range(3)]
        run.finish(server)
        for client in clients:
            run.finish(client, 60)  # the stop message ends every client's fit
    finally:
        run.kill_all()
    reference = _reference(run)
    assert weights_digest(run.final_weights()) == weights_digest(reference.global_weights)
    served = load_checkpoint(run.checkpoint)["history"]["rounds"]
    assert [r["metrics"] for r in served] == [r.metrics for r in reference.result.rounds]
    assert (tmp_path / "out" / "results.md").exists() and (tmp_path / "out" / f"history_{METHOD}.csv").exists()


def test_server_killed_resumes_with_identical_weights(tmp_path):
    run = _Run(tmp_path, rounds=5)
    try:
        server = run.server()
        clients = [run.client(k) for k in range(3)]
        run.wait_until(lambda: len(run.rounds_done()) >= 1, 180, "round 1")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        assert len(run.rounds_done()) < 5, "the server finished before it could be killed"
        restarted = run.server()
        run.finish(restarted)
        for client in clients:
            run.finish(client, 60)
    finally:
        run.kill_all()
    assert "resumed from" in (tmp_path / "server.log").read_text()
    reference = _reference(run)
    assert weights_digest(run.final_weights()) == weights_digest(reference.global_weights)


def test_killed_client_is_failed_then_rejoins(tmp_path):
    # the 3 s limit runs from the moment an instruction is written: a round that a loaded machine's client start-up or
    # training pushes past it is sent again, so only the killed client's absence can fail the run's rounds
    run = _Run(tmp_path, rounds=12, min_clients=2, timeout=3, retries=5)
    try:
        server = run.server()
        clients = [run.client(k) for k in range(3)]
        run.wait_until(lambda: len(run.rounds_done()) >= 1, 180, "round 1")
        clients[2].kill()
        clients[2].wait(10)
        run.wait_until(lambda: any("2" in r["failures"] for r in run.rounds_done()), 60, "client 2 to fail")
        run.client(2)
        run.finish(server)
    finally:
        run.kill_all()
    rounds = load_checkpoint(run.checkpoint)["history"]["rounds"]
    failed = [r["server_round"] for r in rounds if "2" in r["failures"]]
    assert failed and all(sorted(r["client_weights"]) == ["0", "1"] for r in rounds if "2" in r["failures"])
    assert "no update within client_timeout" in rounds[failed[0] - 1]["failures"]["2"]
    rejoined = [r["server_round"] for r in rounds if "2" in r["client_weights"] and r["server_round"] > failed[0]]
    assert rejoined, f"client 2 never rejoined: failures per round {[r['failures'] for r in rounds]}"
