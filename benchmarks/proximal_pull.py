"""How hard FedProx's pull works against the loss, per layer, at the end of each client's local training.

The proximal term adds ``mu (w - w_global)`` to every parameter's gradient. Adam divides each coordinate's gradient by
its running RMS, so what decides whether the pull dominates is its size next to the loss gradient's RMS, which differs
by data set: where a model's loss gradients are small (many rare labels) a fixed ``mu`` holds the weights far more
firmly than where they are large. For one cell (data set, partition) this runs FedProx and, after every client's local
training, compares the pull with the RMS of the loss gradient over ``--batches`` of the client's training batches:

- ``hidden_ratio`` / ``output_ratio``: ``||mu (w - w_global)|| / ||RMS of the loss gradient||`` over the hidden
  layers / the output layer (the last weight and bias);
- ``output_rows_pulled``: the share of output rows (one per label) whose pull is larger than their loss gradient's
  RMS, i.e. labels whose local learning the pull outweighs.

Per round: the sample-weighted mean over the clients, and the test mAP. Same split, partition and model as
``benchmarks/quality.py`` (15% validation carved out first, 10 clients, MLP d-256-L, Adam 1e-3, batch 64, delicious
on its 100 most frequent labels).

    python benchmarks/proximal_pull.py --data corel16k001 --partition kmeans --rounds 6 --out results/pull/corel_km.json

Writes ``--out`` (JSON) and a markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
FIGURES = ("hidden_ratio", "output_ratio", "output_rows_pulled")


class PullProbe(pl.Callback):
    """After each client's local training: the pull against the loss gradient's RMS (the figures above)."""

    def __init__(self, mu: float, batches: int) -> None:
        self.mu = mu
        self.batches = batches
        self.rows: list[dict[str, float]] = []
        self._start: list[torch.Tensor] = []

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a client's fit starts from the round's global weights
        self._start = [p.detach().clone() for p in pl_module.parameters() if p.requires_grad]

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        squares = [torch.zeros_like(p) for p in params]
        seen = 0
        with torch.enable_grad():
            for batch in trainer.train_dataloader:  # type: ignore[union-attr]
                x, y = batch[0], batch[1]
                if len(batch) > 2:  # label masking: only the observed entries carry a loss
                    loss = F.binary_cross_entropy_with_logits(pl_module(x), y, weight=batch[2].float())
                else:
                    loss = F.binary_cross_entropy_with_logits(pl_module(x), y)
                for square, grad in zip(squares, torch.autograd.grad(loss, params)):
                    square += grad.square()
                seen += 1
                if seen == self.batches:
                    break
        rms = [(square / seen).sqrt() for square in squares]
        pull = [self.mu * (p.detach() - start) for p, start in zip(params, self._start)]
        hidden, output = slice(0, len(params) - 2), slice(len(params) - 2, len(params))

        def ratio(part: slice) -> float:
            numerator = torch.cat([t.flatten() for t in pull[part]]).norm()
            return float(numerator / torch.cat([t.flatten() for t in rms[part]]).norm().clamp_min(1e-30))

        rows_pulled = pull[-2].norm(dim=1) > rms[-2].norm(dim=1)  # the output weight: one row per label
        self.rows.append(
            {
                "hidden_ratio": ratio(hidden),
                "output_ratio": ratio(output),
                "output_rows_pulled": float(rows_pulled.float().mean()),
                "samples": float(trainer.datamodule.num_samples),  # type: ignore[union-attr]
            }
        )


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run FedProx on the cell with the probe; per round, the sample-weighted means of the figures and the test mAP."""
    from lightning_fedharmony import FedProx
    from lightning_fedharmony.data.federated import load_federated_data
    from lightning_fedharmony.models import MultilabelMLP
    from lightning_fedharmony.orchestrator import Federation

    kind, _, alpha = args.partition.partition(":")
    top = args.top_labels if args.top_labels >= 0 else (100 if Path(args.data).name.startswith("delicious") else 0)
    data = load_federated_data(
        args.data,
        data_dir=args.data_dir,
        val_fraction=0.15,
        top_labels=top,
        partition=kind,
        num_clients=args.clients,
        alpha=float(alpha) if alpha else 0.1,
        seed=args.seed,
    )
    torch.manual_seed(args.seed)
    model = MultilabelMLP(data.train.num_features, data.train.num_labels, hidden=(256,), lr=1e-3)
    probe = PullProbe(args.mu, args.batches)
    federation = Federation(
        model,
        data.clients(batch_size=64, seed=args.seed),
        FedProx(proximal_mu=args.mu),
        args.rounds,
        seed=args.seed,
        eval_dataloader=data.test_loader(),
        trainer_kwargs={"callbacks": [probe]},
        num_threads=1,
        verbose=False,
    )
    federation.aggregator.setup(args.rounds, 1)
    rounds = []
    for server_round in range(1, args.rounds + 1):
        probe.rows.clear()
        record = federation.run_round(server_round)
        total = sum(row["samples"] for row in probe.rows)
        means = {name: sum(row[name] * row["samples"] for row in probe.rows) / total for name in FIGURES}
        rounds.append({"round": server_round, **means, "test_map": record.metrics["map"]})
        print(
            f"round {server_round}: "
            + ", ".join(f"{name} {value:.3f}" for name, value in rounds[-1].items() if name != "round"),
            flush=True,
        )
    return rounds


def markdown(args: argparse.Namespace, rounds: list[dict[str, Any]]) -> str:
    """The per-round table."""
    lines = [
        f"{args.data}, {args.partition}, FedProx mu = {args.mu}, seed {args.seed} (sample-weighted means over clients)",
        "",
        "| round | pull / loss-gradient RMS, hidden | output | output rows pulled | test mAP |",
        "|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['round']} | {r['hidden_ratio']:.3f} | {r['output_ratio']:.3f} | {r['output_rows_pulled']:.0%}"
        f" | {100 * r['test_map']:.2f} |"
        for r in rounds
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse the arguments, measure, write the JSON and the markdown; return the report."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a name in --data-dir, a path, or river:yeast")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--partition", default="dirichlet:0.1", help="kind, or dirichlet:ALPHA")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--mu", type=float, default=0.01)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batches", type=int, default=8, help="training batches per client for the gradient's RMS")
    parser.add_argument("--top-labels", type=int, default=-1, help="-1: 100 for delicious, all labels otherwise")
    parser.add_argument("--out", default="results/pull/pull.json")
    args = parser.parse_args(argv)
    for name in ("rounds", "clients", "batches"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if not args.mu > 0:
        parser.error(f"--mu must be positive, got {args.mu}")
    started = time.perf_counter()
    rounds = measure(args)
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k != "out"},
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "torch": torch.__version__,
            "machine": platform.machine(),
            "wall_seconds": time.perf_counter() - started,
        },
        "rounds": rounds,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(args, rounds) + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
