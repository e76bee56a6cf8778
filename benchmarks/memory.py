"""Memory of a long federation with many clients and partial participation: is the profile flat?

Runs FedHarmony over ``--clients`` clients with ``--fraction`` of them per round for ``--rounds`` rounds and records
the process's resident memory after every round (VmRSS) and its peak (VmHWM). Writes JSON and a markdown table.

    python benchmarks/memory.py --data tmc2007-500 --clients 200 --fraction 0.1 --rounds 50 --out results/memory
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from lightning_fedharmony import FedHarmony
from lightning_fedharmony.data.federated import load_federated_data
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line (Linux only).")


def _slope(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean_x, mean_y = (len(values) - 1) / 2, sum(values) / len(values)
    cov = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return cov / sum((i - mean_x) ** 2 for i in range(len(values)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="tmc2007-500", help="data set name in --data-dir, a path, or river:yeast")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--fraction", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args()

    data = load_federated_data(
        args.data, data_dir=args.data_dir, partition="iid", num_clients=args.clients, seed=args.seed
    )
    torch.manual_seed(args.seed)
    model = MultilabelMLP(data.train.num_features, data.train.num_labels, hidden=(256,))
    federation = Federation(
        model,
        data.clients(batch_size=64, seed=args.seed),
        FedHarmony(),
        args.rounds,
        fraction_fit=args.fraction,
        seed=args.seed,
        eval_dataloader=data.test_loader(),
        eval_every=10,
        verbose=False,
    )
    federation.aggregator.setup(args.rounds, federation.local_epochs)
    rss: list[int] = []
    started = time.perf_counter()
    for server_round in range(1, args.rounds + 1):
        federation.run_round(server_round)
        rss.append(_proc_status_kib("VmRSS"))
        if server_round % 10 == 0:
            print(f"round {server_round:>3}: RSS {rss[-1] / 1024:.1f} MiB", flush=True)
    seconds = time.perf_counter() - started

    marks = [r for r in (10, 25, args.rounds) if r <= args.rounds]
    report = {
        "data": args.data,
        "clients": args.clients,
        "fraction_fit": args.fraction,
        "rounds": args.rounds,
        "seconds": seconds,
        "rss_mib_per_round": [kib / 1024 for kib in rss],
        "rss_mib_at": {str(r): rss[r - 1] / 1024 for r in marks},
        "peak_rss_mib": _proc_status_kib("VmHWM") / 1024,
        "growth_mib_round10_to_last": (rss[-1] - rss[min(10, args.rounds) - 1]) / 1024,
        # least-squares slope from round 10 on: a leak shows as a steady positive slope, allocator noise does not
        "slope_mib_per_round": _slope([kib / 1024 for kib in rss[9:]]),
        "final_map": federation.result.final.metrics.get("map"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    rows = [
        "| data | clients | fraction | rounds | "
        + " | ".join(f"RSS round {r} (MiB)" for r in marks)
        + " | peak RSS (MiB) | growth round 10 to last (MiB) | slope (MiB/round) |",
        "|---|---:|---:|---:|" + "---:|" * len(marks) + "---:|---:|---:|",
        f"| {args.data} | {args.clients} | {args.fraction} | {args.rounds} | "
        + " | ".join(f"{report['rss_mib_at'][str(r)]:.1f}" for r in marks)
        + f" | {report['peak_rss_mib']:.1f} | {report['growth_mib_round10_to_last']:+.1f}"
        + f" | {report['slope_mib_per_round']:+.3f} |",
    ]
    (out / "memory.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
