"""Federated evaluation: how far the private binned average precision is from the exact one.

Trains FedAvg on ``--clients`` IID clients of each data set (each holding out ``--val-fraction`` of its data), then
evaluates the final global model on the clients' held-out splits twice: exact (the clients send their scores) and
binned (they send, per label, counts of positives and negatives at or above each of ``bins`` thresholds). Both are
merged over the clients as every runner merges them (``rounds.merge_evaluations``). Writes ``binned_eval.json`` and
``binned_eval.md`` to ``--out``.

    python benchmarks/binned_eval.py --data yeast,scene,emotions --bins 50,100,200,1000 --out results/binned_eval
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightning_fedharmony import FedAvg
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.data.loaders import load_dataset
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.protocol import Evaluation
from lightning_fedharmony.rounds import evaluate_report, merge_evaluations

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def measure(name: str, args: argparse.Namespace, bins: list[int]) -> dict[str, Any]:
    train, _ = load_dataset(name, data_dir=args.data_dir)
    x, y = np.asarray(train.X, np.float32), np.asarray(train.Y)
    parts = np.array_split(np.random.default_rng(args.seed).permutation(len(x)), args.clients)
    clients = [
        ClientDataModule(x[p], y[p], batch_size=64, val_fraction=args.val_fraction, seed=k) for k, p in enumerate(parts)
    ]
    torch.manual_seed(args.seed)
    model = MultilabelMLP(x.shape[1], y.shape[1], hidden=(64,))
    federation = Federation(model, clients, FedAvg(), args.rounds, local_epochs=2, verbose=False)
    final = federation.fit().final.metrics
    row: dict[str, Any] = {
        "data": name,
        "held_out": int(final["fed_num_samples"]),
        "labels": int(y.shape[1]),
        "exact_map": final["fed_map"],
        "exact_micro_map": final["fed_micro_map"],
        "binned": [],
    }
    for count in bins:
        evaluations = []
        for k, datamodule in enumerate(clients):
            state = evaluate_report(
                federation.model, federation.global_weights, datamodule.val_dataloader(), bins=count
            ).export_state()
            evaluations.append(Evaluation(str(k), int(state["num_samples"]), state))
        merged, _ = merge_evaluations(evaluations, count)
        row["binned"].append(
            {
                "bins": count,
                "map": merged["fed_map"],
                "map_diff": merged["fed_map"] - final["fed_map"],
                "micro_map_diff": merged["fed_micro_map"] - final["fed_micro_map"],
            }
        )
    return row


def markdown(report: dict[str, Any]) -> str:
    bins = [b["bins"] for b in report["rows"][0]["binned"]] if report["rows"] else []
    lines = [
        f"Machine: {report['machine']}; FedAvg, {report['clients']} IID clients, {report['rounds']} rounds,"
        f" {report['val_fraction']:.0%} of each client's data held out.",
        "",
        "| data set (held-out N, L) | exact mAP | " + " | ".join(f"{b} bins" for b in bins) + " |",
        "|---|---:|" + "---:|" * len(bins),
    ]
    for row in report["rows"]:
        diffs = " | ".join(f"{b['map_diff']:+.4f}" for b in row["binned"])
        lines.append(f"| {row['data']} ({row['held_out']}, {row['labels']}) | {row['exact_map']:.4f} | {diffs} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="yeast,scene,emotions")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--bins", default="50,100,200,1000")
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/binned_eval")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bins = [int(b) for b in args.bins.split(",")]
    report = {
        "machine": f"{platform.machine()}, torch {torch.__version__}",
        "clients": args.clients,
        "rounds": args.rounds,
        "val_fraction": args.val_fraction,
        "rows": [measure(name, args, bins) for name in args.data.split(",")],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "binned_eval.json").write_text(json.dumps(report, indent=2))
    (out / "binned_eval.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
