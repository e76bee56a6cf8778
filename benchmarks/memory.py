"""Memory of a long federation with many clients and partial participation: is the profile flat?

Runs a federation over ``--clients`` clients with ``--fraction`` of them per round for ``--rounds`` rounds and
records the process's resident memory after every round (VmRSS), its peak (VmHWM) and the seconds of every round.
Writes JSON and a markdown table.

    python benchmarks/memory.py --data tmc2007-500 --clients 200 --fraction 0.1 --rounds 50 --out results/memory

``--population`` is the cross-device setting: 10,000 clients over the data split by label-set Dirichlet (at least
one sample each), 1% per round drawn in proportion to their sizes, 200 rounds (each of these can still be set):

    python benchmarks/memory.py --population --out results/population
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import tempfile
import time
from pathlib import Path

import torch

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.checkpoint import CLIENT_STATE_NAME
from lightning_fedharmony.data.federated import PARTITIONS, load_federated_data
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.rounds import CLIENT_SAMPLING

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
#: What ``--population`` sets, unless the flag is given too.
POPULATION = {
    "clients": 10_000,
    "fraction": 0.01,
    "rounds": 200,
    "partition": "dirichlet",
    "client_sampling": "size",
    "min_samples": 1,
}
DEFAULTS = {
    "clients": 200,
    "fraction": 0.1,
    "rounds": 50,
    "partition": "iid",
    "client_sampling": "uniform",
    "min_samples": 10,
}


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


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="tmc2007-500", help="data set name in --data-dir, a path, or river:yeast")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--population", action="store_true", help=f"the cross-device run: {POPULATION}")
    parser.add_argument("--clients", type=int, help=f"default {DEFAULTS['clients']}")
    parser.add_argument("--fraction", type=float, help=f"default {DEFAULTS['fraction']}")
    parser.add_argument("--rounds", type=int, help=f"default {DEFAULTS['rounds']}")
    parser.add_argument("--partition", choices=PARTITIONS, help=f"default {DEFAULTS['partition']}")
    parser.add_argument("--alpha", type=float, default=0.1, help="Dirichlet concentration")
    parser.add_argument("--min-samples", type=int, help=f"fewest samples per client; default {DEFAULTS['min_samples']}")
    parser.add_argument("--client-sampling", choices=CLIENT_SAMPLING, help=f"default {DEFAULTS['client_sampling']}")
    parser.add_argument("--method", choices=("fedharmony", "fedavg"), default="fedharmony")
    parser.add_argument(
        "--stale-stats", choices=("keep", "drop"), default="keep", help="FedHarmony's `stale_stats` (its own state)"
    )
    parser.add_argument(
        "--leave-one-out",
        choices=("server", "client"),
        default="server",
        help="FedHarmony's `leave_one_out`: 'client' keeps only the consensus sums on the server",
    )
    parser.add_argument("--checkpoint", action="store_true", help="checkpoint every round; record the file's size")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/memory")
    args = parser.parse_args(argv)
    preset = POPULATION if args.population else DEFAULTS
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    rss_start = _proc_status_kib("VmRSS")
    data = load_federated_data(
        args.data,
        data_dir=args.data_dir,
        partition=args.partition,
        num_clients=args.clients,
        alpha=args.alpha,
        min_samples=args.min_samples,
        seed=args.seed,
    )
    loaded = time.perf_counter()
    clients = data.clients(batch_size=64, seed=args.seed)
    torch.manual_seed(args.seed)
    model = MultilabelMLP(data.train.num_features, data.train.num_labels, hidden=(256,))
    aggregator: Aggregator = (
        FedHarmony(stale_stats=args.stale_stats, leave_one_out=args.leave_one_out)
        if args.method == "fedharmony"
        else FedAvg()
    )
    checkpoint_dir = tempfile.TemporaryDirectory(prefix="fedharmony-memory-") if args.checkpoint else None
    federation = Federation(
        model,
        clients,
        aggregator,
        args.rounds,
        fraction_fit=args.fraction,
        client_sampling=args.client_sampling,
        seed=args.seed,
        eval_dataloader=data.test_loader(),
        eval_every=args.eval_every,
        fraction_evaluate=args.fraction,  # a population evaluates a sample, as it trains one
        checkpoint_dir=None if checkpoint_dir is None else checkpoint_dir.name,
        verbose=False,
    )
    built = time.perf_counter()
    rss_built = _proc_status_kib("VmRSS")
    federation.aggregator.setup(args.rounds, federation.local_epochs)
    rss: list[int] = []
    seconds: list[float] = []
    cpu_seconds: list[float] = []  # this process's CPU time: the figure that other jobs on the machine do not inflate
    checkpoint_kib: list[float] = []
    for server_round in range(1, args.rounds + 1):
        round_started, cpu_started = time.perf_counter(), time.process_time()
        federation.run_round(server_round)
        seconds.append(time.perf_counter() - round_started)
        cpu_seconds.append(time.process_time() - cpu_started)
        rss.append(_proc_status_kib("VmRSS"))
        if federation.checkpoint_path is not None:
            checkpoint_kib.append(federation.checkpoint_path.stat().st_size / 1024)
        if server_round % 10 == 0:
            print(
                f"round {server_round:>3}: RSS {rss[-1] / 1024:.1f} MiB, {seconds[-1]:.2f} s/round"
                f" ({cpu_seconds[-1]:.2f} s CPU)",
                flush=True,
            )
    finished = time.perf_counter()
    # the in-process clients' terms (leave_one_out="client") are kept next to the checkpoint, one file per client
    client_state_kib = None
    if checkpoint_dir is not None:
        store = Path(checkpoint_dir.name) / CLIENT_STATE_NAME
        client_state_kib = sum(p.stat().st_size for p in store.glob("*.pt")) / 1024
        checkpoint_dir.cleanup()

    sizes = data.partition.sizes
    # what legitimately grows with rounds: the history (one record per round, one entry per trained client) and the
    # aggregator's state (FedHarmony with stale_stats="keep" holds the latest statistics of every client seen)
    history_mib = len(pickle.dumps(federation.result.to_dict())) / 2**20
    state = federation.aggregator.state_dict()
    state_mib = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor)) / 2**20
    seen = len(state.get("client_ids", state.get("member_ids", ())))
    # the in-process clients' own terms (leave_one_out="client"): client state, kept here because the clients are
    client_mib = (
        sum(t.numel() * t.element_size() for m in federation.client_memory.values() for t in m.state_dict().values())
        / 2**20
    )
    marks = [r for r in (1, 10, 25, 100, args.rounds) if r <= args.rounds]
    report = {
        "data": args.data,
        "method": args.method,
        "stale_stats": args.stale_stats if args.method == "fedharmony" else None,
        "leave_one_out": args.leave_one_out if args.method == "fedharmony" else None,
        "clients": args.clients,
        "fraction_fit": args.fraction,
        "clients_per_round": len(federation.result.final.clients),
        "partition": args.partition,
        "client_sampling": args.client_sampling,
        "client_sizes": {"min": int(sizes.min()), "median": float(_median(sizes.tolist())), "max": int(sizes.max())},
        "rounds": args.rounds,
        "setup_seconds": {"data": loaded - started, "clients_and_federation": built - loaded},
        "rss_mib_before_data": rss_start / 1024,
        "rss_mib_after_setup": rss_built / 1024,
        "seconds": finished - built,
        "wall_seconds": finished - started,
        "seconds_per_round": (finished - built) / args.rounds,
        "median_seconds_per_round": _median(seconds),
        "seconds_per_round_first_last_10": [sum(seconds[:10]) / 10, sum(seconds[-10:]) / 10]
        if args.rounds >= 10
        else None,
        "seconds_per_round_list": seconds,
        "cpu_seconds_per_round": sum(cpu_seconds) / args.rounds,
        "cpu_seconds_per_round_first_last_10": [sum(cpu_seconds[:10]) / 10, sum(cpu_seconds[-10:]) / 10]
        if args.rounds >= 10
        else None,
        "cpu_seconds_per_round_list": cpu_seconds,
        "rss_mib_per_round": [kib / 1024 for kib in rss],
        "rss_mib_at": {str(r): rss[r - 1] / 1024 for r in marks},
        "peak_rss_mib": _proc_status_kib("VmHWM") / 1024,
        "growth_mib_round10_to_last": (rss[-1] - rss[min(10, args.rounds) - 1]) / 1024,
        # least-squares slope from round 10 on: a leak shows as a steady positive slope, allocator noise does not
        "slope_mib_per_round": _slope([kib / 1024 for kib in rss[9:]]),
        "checkpoint_kib_first_last": [checkpoint_kib[0], checkpoint_kib[-1]] if checkpoint_kib else None,
        "client_state_kib_last": client_state_kib,
        "history_pickled_mib": history_mib,
        "aggregator_state_tensor_mib": state_mib,
        "aggregator_clients_kept": seen,
        "client_memory_tensor_mib": client_mib,
        "final_map": federation.result.final.metrics.get("map"),
        "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(report, indent=2))
    rows = [
        "| data | method | clients | per round | sampling | rounds | "
        + " | ".join(f"RSS round {r} (MiB)" for r in marks)
        + " | peak RSS (MiB) | growth round 10 to last (MiB) | slope (MiB/round) | s/round (median) | CPU s/round |",
        "|---|---|---:|---:|---|---:|" + "---:|" * len(marks) + "---:|---:|---:|---:|---:|",
        f"| {args.data} ({args.partition}) | {args.method}"
        + (f" ({args.leave_one_out})" if args.method == "fedharmony" else "")
        + f" | {args.clients} | {report['clients_per_round']}"
        f" | {args.client_sampling} | {args.rounds} | "
        + " | ".join(f"{report['rss_mib_at'][str(r)]:.1f}" for r in marks)
        + f" | {report['peak_rss_mib']:.1f} | {report['growth_mib_round10_to_last']:+.1f}"
        + f" | {report['slope_mib_per_round']:+.3f}"
        + f" | {report['seconds_per_round']:.2f} ({report['median_seconds_per_round']:.2f})"
        + f" | {report['cpu_seconds_per_round']:.2f} |",
    ]
    (out / "memory.md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    print(
        f"setup {built - started:.1f} s (data {loaded - started:.1f} s), rounds {finished - built:.1f} s,"
        f" wall {finished - started:.1f} s"
    )
    return report


if __name__ == "__main__":
    main()
