"""A tiny Flower simulation (Ray backend) for the tests of the Flower runner's promises, run as a script so that a
test can kill it: ``python flower_sim.py OUT_DIR [options]``.

Four clients of 24 synthetic samples, FedHarmony, a small MLP. Writes the final global weights to
``OUT_DIR/weights.pt`` and the history to ``OUT_DIR/history.json``. ``--stall-round N`` makes every client of round
``N`` touch ``OUT_DIR/stalled`` and wait, so that a test can kill the run during that round's local training;
``--fail P`` makes client ``P`` raise and ``--hang P`` makes it sleep past any time limit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedharmony import FedHarmony
from lightning_fedharmony.data.datamodule import ClientDataModule
from lightning_fedharmony.integrations.flower import (
    FedHarmonyStrategy,
    Key,
    make_client_app,
    make_evaluate_fn,
    weights_to_arrays,
)
from lightning_fedharmony.mixin import model_weights
from lightning_fedharmony.models import MultilabelMLP

NUM_CLIENTS, NUM_FEATURES, NUM_LABELS = 4, 3, 4
#: how long a hanging client sleeps: past the tests' time limit of 4 s, but not forever (Ray waits for it at shutdown)
HANG_SECONDS = 8.0


def data(seed: int, n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, NUM_FEATURES, generator=gen)
    y = (torch.rand(n, NUM_LABELS, generator=gen) < 0.5).float()
    y[:NUM_LABELS] = torch.maximum(y[:NUM_LABELS], torch.eye(NUM_LABELS))  # every label seen
    return x, y


def model() -> MultilabelMLP:
    torch.manual_seed(0)
    return MultilabelMLP(NUM_FEATURES, NUM_LABELS, hidden=(8,))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--stall-round", type=int, default=0)
    parser.add_argument("--fail", type=int, default=-1)
    parser.add_argument("--hang", type=int, default=-1)
    parser.add_argument("--client-timeout", type=float, default=None)
    parser.add_argument("--min-clients", type=int, default=1)
    parser.add_argument("--alignment-weight", type=float, default=0.5)
    parser.add_argument("--actors", type=int, default=1, help="Ray actors running ClientApps (each starts torch)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def datamodule(partition: int, context: Context) -> ClientDataModule:
        server_round = context.state[Key.CLIENT_STATE][Key.LAST_ROUND]
        if server_round == args.stall_round:
            (args.out / "stalled").touch()
            time.sleep(600)
        if partition == args.fail:
            raise OSError("disk went away")
        if partition == args.hang:
            time.sleep(HANG_SECONDS)
        x, y = data(partition)
        return ClientDataModule(x.numpy(), y.numpy(), batch_size=8, seed=partition)

    strategy = FedHarmonyStrategy(
        FedHarmony(alignment_weight=args.alignment_weight, seed=0),
        min_clients=args.min_clients,
        min_available_clients=NUM_CLIENTS,
        checkpoint_dir=args.checkpoint_dir,
        client_timeout=args.client_timeout,
        fingerprint_extra={"data": {"clients": NUM_CLIENTS, "samples": 24}},
    )
    server_app = ServerApp()

    @server_app.main()
    def server(grid: Grid, context: Context) -> None:
        global_model = model()
        x, y = data(99, n=32)
        test_loader = DataLoader(TensorDataset(x, y), batch_size=32)
        strategy.start(
            grid,
            weights_to_arrays(model_weights(global_model)),
            num_rounds=args.rounds,
            evaluate_fn=make_evaluate_fn(global_model, test_loader),
        )
        torch.save(strategy.global_weights, args.out / "weights.pt")
        strategy.result.to_json(args.out / "history.json")

    run_simulation(
        server_app,
        make_client_app(lambda context: model(), datamodule),
        num_supernodes=NUM_CLIENTS,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": args.actors}},
    )


if __name__ == "__main__":
    main()
