"""A Flower simulation of a client population: many virtual SuperNodes, a few percent of them trained per round.

``--nodes`` virtual SuperNodes (Flower's Ray simulation engine) hold the data set split by label-set Dirichlet (at
least one sample each); the ServerApp runs :class:`~lightning_fedharmony.integrations.flower.FedHarmonyStrategy`
with ``--fraction`` of the nodes per round, drawn uniformly or in proportion to their sizes. Records the seconds of
every round (round 1 includes asking every node its partition id, and its size with ``--client-sampling size``),
the server process's resident memory after every round and that of the whole process tree (Ray's workers
included). Writes JSON and a markdown table.

    python benchmarks/flower_population.py --nodes 1000 --fraction 0.03 --rounds 3 --out results/flower_population
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA_DIR = ROOT.parent / "shared" / "data"
#: The run's data settings; Ray's workers read them from the environment (they import this module by name).
ENV = "FEDHARMONY_FLOWER_POPULATION"


def settings() -> dict[str, Any]:
    return json.loads(os.environ[ENV])


@lru_cache(maxsize=1)
def federated_data(num_partitions: int) -> Any:
    """The split every node and the server compute alike (once per process)."""
    from lightning_fedharmony.data.federated import load_federated_data

    config = settings()
    return load_federated_data(
        config["data"],
        data_dir=config["data_dir"],
        partition="dirichlet",
        num_clients=num_partitions,
        alpha=config["alpha"],
        min_samples=1,
        seed=config["seed"],
    )


def build_model(num_partitions: int) -> Any:
    import torch

    from lightning_fedharmony.models import MultilabelMLP

    data = federated_data(num_partitions)
    torch.manual_seed(settings()["seed"])
    return MultilabelMLP(data.train.num_features, data.train.num_labels, hidden=(256,))


def model_fn(context: Any) -> Any:
    return build_model(int(context.node_config["num-partitions"]))


def datamodule_fn(partition: int, context: Any) -> Any:
    return federated_data(int(context.node_config["num-partitions"])).client(partition, batch_size=64)


def _tree_rss_mib() -> tuple[float, float]:
    """This process's RSS and that of it with all its descendants (Ray's raylet, GCS and workers), MiB."""
    import psutil

    me = psutil.Process()
    total = me.memory_info().rss
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += child.memory_info().rss
    return me.memory_info().rss / 2**20, total / 2**20


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from lightning_fedharmony import FedAvg, FedHarmony
    from lightning_fedharmony.integrations.flower import (
        FedHarmonyStrategy,
        make_client_app,
        make_evaluate_fn,
        weights_to_arrays,
    )
    from lightning_fedharmony.mixin import model_weights

    started = time.perf_counter()
    data = federated_data(args.nodes)
    strategy = FedHarmonyStrategy(
        FedHarmony() if args.method == "fedharmony" else FedAvg(),
        args.fraction,
        min_available_clients=args.nodes,
        seed=args.seed,
        client_sampling=args.client_sampling,
        fraction_evaluate=args.fraction,  # a population evaluates a sample, as it trains one
    )
    marks: list[dict[str, float]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Any, context: Any) -> None:
        model = build_model(args.nodes)
        evaluate = make_evaluate_fn(model, data.test_loader())

        def evaluate_and_measure(server_round: int, arrays: Any) -> Any:
            metrics = evaluate(server_round, arrays)
            server_mib, tree_mib = _tree_rss_mib()
            marks.append({"round": server_round, "time": time.perf_counter(), "server_mib": server_mib,
                          "tree_mib": tree_mib})  # fmt: skip
            print(
                f"round {server_round}: server RSS {server_mib:.0f} MiB, all processes {tree_mib:.0f} MiB", flush=True
            )
            return metrics

        strategy.start(
            grid, weights_to_arrays(model_weights(model)), num_rounds=args.rounds, evaluate_fn=evaluate_and_measure
        )

    client_app = make_client_app(model_fn, datamodule_fn)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_simulation(
            server_app,
            client_app,
            num_supernodes=args.nodes,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"num_cpus": args.workers},
            },
        )
    finally:
        torch.set_num_threads(threads)
    finished = time.perf_counter()

    rounds = strategy.result.rounds
    if len(rounds) != args.rounds:
        raise RuntimeError(f"Expected {args.rounds} finished rounds, but the simulation finished {len(rounds)}.")
    # the wall time of round t: from the end of round t-1's evaluation to the end of round t's
    round_seconds = [marks[i]["time"] - marks[i - 1]["time"] for i in range(1, len(marks))]
    report = {
        "data": args.data,
        "method": args.method,
        "nodes": args.nodes,
        "fraction_fit": args.fraction,
        "clients_per_round": [len(r.clients) for r in rounds],
        "client_sampling": args.client_sampling,
        "rounds": args.rounds,
        "ray_workers": args.workers,
        "wall_seconds": finished - started,
        "round_seconds": round_seconds,
        "round_seconds_after_first": sum(round_seconds[1:]) / max(len(round_seconds) - 1, 1),
        "strategy_seconds": [r.seconds for r in rounds],
        "failures": sum(len(r.failures) for r in rounds),
        "server_rss_mib": [m["server_mib"] for m in marks],
        "all_processes_rss_mib": [m["tree_mib"] for m in marks],
        "final_map": rounds[-1].metrics.get("map"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
    }
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="tmc2007-500")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--fraction", type=float, default=0.03)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-sampling", choices=("uniform", "size"), default="size")
    parser.add_argument("--method", choices=("fedharmony", "fedavg"), default="fedharmony")
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--workers", type=int, default=2, help="CPUs given to Ray (one ClientApp each)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/flower_population")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ[ENV] = json.dumps({"data": args.data, "data_dir": args.data_dir, "alpha": args.alpha, "seed": args.seed})
    # Ray's workers rebuild the ClientApp's functions by importing this module and the package
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [str(HERE), str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    )
    report = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "flower_population.json").write_text(json.dumps(report, indent=2))
    rows = [
        "| data | method | nodes | per round | sampling | rounds | round 1 s (with discovery) | later rounds s"
        " | server RSS first/last (MiB) | all processes RSS first/last (MiB) | wall s |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
        f"| {args.data} (dirichlet) | {args.method} | {args.nodes} | {report['clients_per_round'][0]}"
        f" | {args.client_sampling} | {args.rounds} | {report['round_seconds'][0]:.1f}"
        f" | {report['round_seconds_after_first']:.1f}"
        f" | {report['server_rss_mib'][0]:.0f} / {report['server_rss_mib'][-1]:.0f}"
        f" | {report['all_processes_rss_mib'][0]:.0f} / {report['all_processes_rss_mib'][-1]:.0f}"
        f" | {report['wall_seconds']:.0f} |",
    ]
    (out / "flower_population.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return report


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(ROOT)]
    import flower_population  # the functions Ray pickles must live in an importable module, not in __main__

    flower_population.main()
