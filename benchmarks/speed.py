"""What FedHarmony costs: ratios measured in one run on one machine, median of repeats.

1. ``round``: wall time per round in the orchestrator, FedHarmony vs FedAvg (same clients, seed, model).
2. ``overhead``: the orchestrator (Lightning Trainers as clients) vs a plain PyTorch loop doing the same client steps.
3. ``blocks``: local training with block-wise alignment vs all pairs (the paper reports 28-32% less time).
4. ``server``: FedHarmony's server step (consensus, blocks, quality, weights) vs clients K and labels L: time and
   peak memory, each cell in a fresh process.

Writes ``speed.json`` and ``speed.md`` to ``--out``.

    python benchmarks/speed.py --out results/speed            # everything
    python benchmarks/speed.py --parts round,overhead --repeats 5
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.aggregators import ClientUpdate
from lightning_fedharmony.data.federated import load_federated_data
from lightning_fedharmony.functional import block_mask, soft_phi, spectral_label_blocks, weighted_average
from lightning_fedharmony.mixin import load_model_weights, model_weights
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation, quiet_lightning
from lightning_fedharmony.stats import CorrelationStats

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
PARTS = ("round", "overhead", "blocks", "server")


def _model(data: Any, seed: int = 0) -> MultilabelMLP:
    torch.manual_seed(seed)
    return MultilabelMLP(data.train.num_features, data.train.num_labels, hidden=(256,))


def _round_seconds(data: Any, aggregator: Any, rounds: int) -> float:
    fed = Federation(_model(data), data.clients(), aggregator, rounds, federated_eval="none", verbose=False)
    fed.fit()
    # round 1 has no teacher yet: the steady state is rounds 2..R
    return statistics.median(r.seconds["total"] for r in fed.result.rounds[1:])


def bench_round(data: Any, repeats: int, rounds: int) -> dict[str, Any]:
    fedavg, fedharmony = [], []
    for _ in range(repeats):  # in turn, so that a slower spell of a shared machine falls on both
        fedavg.append(_round_seconds(data, FedAvg(), rounds))
        fedharmony.append(_round_seconds(data, FedHarmony(), rounds))
    return {
        "fedavg_s_per_round": statistics.median(fedavg),
        "fedharmony_s_per_round": statistics.median(fedharmony),
        "ratio": statistics.median(fedharmony) / statistics.median(fedavg),
        "target": "<= 1.10",
        "runs": {"fedavg": fedavg, "fedharmony": fedharmony},
    }


def _plain_round(model: MultilabelMLP, clients: dict[str, Any], global_weights: dict[str, torch.Tensor]) -> Any:
    """The same client steps without Lightning: load, Adam, BCE over the same shuffled batches, average."""
    states, sizes = [], []
    for index, datamodule in enumerate(clients.values()):
        load_model_weights(model, global_weights)
        torch.manual_seed(index)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        model.train()
        for x, y in datamodule.train_dataloader():
            optimizer.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            optimizer.step()
        states.append(model_weights(model))
        sizes.append(datamodule.num_samples)
    return weighted_average(states, sizes)


def bench_overhead(data: Any, repeats: int, rounds: int) -> dict[str, Any]:
    clients = data.clients()
    plain, orchestrated = [], []
    for _ in range(repeats):
        model = _model(data)
        weights = model_weights(model)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            weights = _plain_round(model, clients, weights)
            times.append(time.perf_counter() - started)
        plain.append(statistics.median(times[1:]))
        fed = Federation(_model(data), clients, FedAvg(), rounds, federated_eval="none", verbose=False)
        fed.fit()
        orchestrated.append(statistics.median(r.seconds["total"] for r in fed.result.rounds[1:]))
        setup = statistics.median(r.seconds["trainer_setup"] for r in fed.result.rounds[1:])
    steps = sum(len(dm.train_dataloader()) for dm in clients.values())
    return {
        "plain_s_per_round": statistics.median(plain),
        "orchestrator_s_per_round": statistics.median(orchestrated),
        "ratio": statistics.median(orchestrated) / statistics.median(plain),
        "trainer_construction_s_per_round": setup,
        "clients": len(clients),
        "steps_per_round": steps,
        "overhead_ms_per_client": 1000 * (statistics.median(orchestrated) - statistics.median(plain)) / len(clients),
        "target": "<= 1.3",
    }


def bench_blocks(name: str, repeats: int, num_blocks: int, epochs: int) -> dict[str, Any]:
    """One client's local epochs with the block mask vs all pairs (same teacher, same seed)."""
    data = load_federated_data(name, data_dir=str(DATA_DIR), partition="iid", num_clients=10, seed=0)
    labels = torch.from_numpy(data.train.Y).double()
    consensus = soft_phi(labels).float()  # the label correlation as a stand-in consensus teacher
    clusters = spectral_label_blocks(consensus, num_blocks=num_blocks)
    masks = {"blocks": block_mask(clusters), "all_pairs": ~torch.eye(labels.shape[1], dtype=torch.bool)}
    client = data.client(0)
    results: dict[str, Any] = {}
    for kind, mask in masks.items():
        times, aligns = [], []
        for _ in range(repeats):
            model = _model(data)
            model.fedharmony_set_teacher(consensus, mask)
            model.fedharmony_configure(alignment_weight=1.0)
            trainer_kwargs = {
                "max_epochs": epochs,
                "logger": False,
                "enable_checkpointing": False,
                "enable_progress_bar": False,
                "enable_model_summary": False,
                "accelerator": "cpu",
                "limit_val_batches": 0,
            }
            import lightning.pytorch as pl

            with quiet_lightning():
                trainer = pl.Trainer(**trainer_kwargs)
                started = time.perf_counter()
                trainer.fit(model, datamodule=client)
                times.append(time.perf_counter() - started)
            aligns.append(float(trainer.callback_metrics["train/fedharmony_align_loss"]))
        results[kind] = {"seconds": statistics.median(times), "align_loss": statistics.median(aligns)}
    sizes = torch.bincount(clusters).tolist()
    return {
        "data": name,
        "num_labels": int(labels.shape[1]),
        "num_blocks": len(sizes),
        "block_sizes": sizes,
        "in_block_pairs_share": float(masks["blocks"].sum() / masks["all_pairs"].sum()),
        "client_samples": client.num_samples,
        "epochs": epochs,
        **results,
        "time_saved": 1 - results["blocks"]["seconds"] / results["all_pairs"]["seconds"],
        "paper": "28-32% less time at equal accuracy",
    }


def _server_cell(num_clients: int, num_labels: int, repeats: int, leave_one_out: str = "client") -> dict[str, Any]:
    """One server step of FedHarmony with K synthetic clients over L labels (runs in its own process).

    ``leave_one_out="client"`` (the sums-only server): ``step`` is round 2 of ``aggregate_round`` over an iterator that
    makes each client's update when it is asked for (each replaces the client's round-1 term), the way updates arrive
    over a network; the terms come from a pool of 16 distinct ``L x L`` matrices, so that the inputs take no ``K L^2``
    memory and do not sit in the cache. ``teacher``: one client's teacher built on its side from the share.
    ``state``: what the aggregator keeps between rounds. ``step_peak_extra_mib``: the peak resident memory of rounds 1
    and 2 above what the process held before them (the pool included there).

    ``leave_one_out="server"`` (every client's correlation kept): ``step`` is ``aggregate_round`` over K updates with
    statistics built beforehand (``K L^2`` float64 of input); ``teacher``: one client's teacher on the server.
    """
    import resource

    from lightning_fedharmony.client_terms import share_teacher
    from lightning_fedharmony.protocol import ConsensusTerm

    generator = torch.Generator().manual_seed(0)
    weights = {"w": torch.zeros(4)}
    step_times, teacher_times = [], []
    if leave_one_out == "client":
        pool = []
        for _ in range(16):
            corr = torch.rand(num_labels, num_labels, generator=generator) * 2 - 1
            pool.append(((corr + corr.T) / 2).fill_diagonal_(1.0))
        # round 1 adds w R (w = 32); round 2 replaces it: w (R' - R), here 0.5 R
        deltas = {1: [32.0 * corr for corr in pool], 2: [0.5 * corr for corr in pool]}
        valid = torch.ones(num_labels, dtype=torch.bool)

        def updates(server_round: int):
            for k in range(num_clients):
                replaced = (1, 32.0) if server_round > 1 else (0, 0.0)
                term = ConsensusTerm(
                    delta=deltas[server_round][k % 16],
                    valid=valid,
                    weight=32.0,
                    replaced_round=replaced[0],
                    replaced_weight=replaced[1],
                    previous_valid=valid,
                    discrepancy=0.01 * (k % 7),
                    scored=server_round > 1,
                )
                yield ClientUpdate(str(k), {"w": torch.full((4,), float(k))}, 32, term=term)

        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(max(repeats, 1)):
            aggregator = FedHarmony(t0=5, leave_one_out="client")
            aggregator.aggregate_round(1, updates(1), weights)
            started = time.perf_counter()
            aggregator.aggregate_round(2, updates(2), weights)
            step_times.append(time.perf_counter() - started)
        step_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        share = aggregator.client_instructions(3, "0", weights).consensus
        own = (pool[0], valid)
        for _ in range(repeats):
            started = time.perf_counter()
            for _ in range(10):
                share_teacher(share, own)  # type: ignore[arg-type]
            teacher_times.append((time.perf_counter() - started) / 10)
    else:
        built = []
        for k in range(num_clients):
            preds = torch.rand(32, num_labels, generator=generator)
            stats = CorrelationStats(num_labels)
            stats.update(preds, (preds > 0.5).float())
            built.append(ClientUpdate(str(k), {"w": torch.full((4,), float(k))}, 32, stats))
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(max(repeats, 1)):
            aggregator = FedHarmony(t0=5, leave_one_out="server")
            started = time.perf_counter()
            aggregator.aggregate_round(1, built, weights)
            step_times.append(time.perf_counter() - started)
        step_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        sample = [u.client_id for u in built[: min(num_clients, 50)]]
        for _ in range(repeats):
            started = time.perf_counter()
            for client_id in sample:
                aggregator.teacher(client_id)
            teacher_times.append((time.perf_counter() - started) / len(sample))
    state = aggregator.state_dict()
    state_bytes = sum(v.numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return {
        "clients": num_clients,
        "labels": num_labels,
        "leave_one_out": leave_one_out,
        "step_seconds": statistics.median(step_times),
        "teacher_ms": 1000 * statistics.median(teacher_times),
        "step_peak_extra_mib": (step_peak - baseline) / 1024,
        "state_mib": state_bytes / 2**20,
        "input_stats_mib": 0.0 if leave_one_out == "client" else num_clients * num_labels * num_labels * 8 / 2**20,
    }


def bench_server(
    cells: list[tuple[int, int]], repeats: int, threads: int, leave_one_out: str = "client"
) -> list[dict[str, Any]]:
    rows = []
    for num_clients, num_labels in cells:
        here = str(Path(__file__).parent)
        code = (
            f"import json, sys, torch; torch.set_num_threads({threads}); sys.path.insert(0, {here!r});"
            " from speed import _server_cell; "
            f"print(json.dumps(_server_cell({num_clients}, {num_labels}, {repeats}, {leave_one_out!r})))"
        )
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            rows.append({"clients": num_clients, "labels": num_labels, "error": done.stderr.strip().splitlines()[-1]})
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(
            f"server ({leave_one_out}) K={num_clients} L={num_labels}: {rows[-1]['step_seconds']:.3f} s,"
            f" +{rows[-1]['step_peak_extra_mib']:.0f} MiB peak, {rows[-1]['state_mib']:.1f} MiB state",
            flush=True,
        )
    return rows


def markdown(report: dict[str, Any]) -> str:
    lines = [f"Machine: {report['machine']}", ""]
    if "round" in report:
        lines += [
            f"**Round time** (10 clients, label-set Dirichlet 0.1, 1 local epoch, median of {report['repeats']} runs):",
            "",
            "| data | FedAvg s/round | FedHarmony s/round | ratio | target |",
            "|---|---:|---:|---:|---|",
        ]
        for r in report["round"]:
            lines.append(
                f"| {r['data']} | {r['fedavg_s_per_round']:.3f} | {r['fedharmony_s_per_round']:.3f}"
                f" | {r['ratio']:.2f}x | {r['target']} |"
            )
        lines.append("")
    if "overhead" in report:
        lines += [
            "**Orchestrator overhead** (FedAvg through `Federation` vs the same client steps in a plain PyTorch loop):",
            "",
            "| data | steps/round | plain s/round | orchestrator s/round | ratio | Trainer construction s/round"
            " | overhead per client | target |",
            "|---|---:|---:|---:|---:|---:|---:|---|",
        ]
        for o in report["overhead"]:
            lines.append(
                f"| {o['data']} | {o['steps_per_round']} | {o['plain_s_per_round']:.3f}"
                f" | {o['orchestrator_s_per_round']:.3f} | {o['ratio']:.2f}x"
                f" | {o['trainer_construction_s_per_round']:.3f} | {o['overhead_ms_per_client']:.1f} ms"
                f" | {o['target']} |"
            )
        lines.append("")
    if "blocks" in report:
        lines += ["**Block-wise vs all-pairs alignment** (one client's local training, same teacher):", ""]
        lines += [
            "| data | L | blocks | in-block share of pairs | epochs | all pairs s | blocks s | time saved | paper |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for b in report["blocks"]:
            lines.append(
                f"| {b['data']} | {b['num_labels']} | {b['num_blocks']} | {b['in_block_pairs_share']:.2f}"
                f" | {b['epochs']} | {b['all_pairs']['seconds']:.2f} | {b['blocks']['seconds']:.2f}"
                f" | {100 * b['time_saved']:.0f}% | {b['paper']} |"
            )
        lines.append("")
    if "server" in report:
        lines += [
            "**Server step** (`aggregate_round` of FedHarmony: consensus, blocks, quality, weights; one process per"
            " cell. `client`: the sums-only server, updates made one at a time as they arrive, the teacher built on"
            " the client's side; `server`: every client's correlation kept, statistics built beforehand, the teacher"
            " built by the server):",
            "",
            "| leave-one-out | clients K | labels L | step s | teacher ms per client | extra MiB during the step"
            " | kept state MiB | input statistics MiB |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for s in report["server"]:
            if "error" in s:
                lines.append(f"| | {s['clients']} | {s['labels']} | failed: {s['error']} | | | | |")
                continue
            lines.append(
                f"| {s['leave_one_out']} | {s['clients']} | {s['labels']} | {s['step_seconds']:.3f}"
                f" | {s['teacher_ms']:.1f}"
                f" | {s['step_peak_extra_mib']:.0f} | {s['state_mib']:.0f} | {s['input_stats_mib']:.0f} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument(
        "--data", default="river:yeast,tmc2007-500", help="data sets of the round and overhead parts (comma-separated)"
    )
    parser.add_argument("--block-data", default="delicious,rcv1subset1", help="data sets of the blocks part")
    parser.add_argument("--num-blocks", type=int, default=16)
    parser.add_argument("--block-epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--server-cells",
        default="10x100,100x100,1000x100,10x1000,100x1000,1000x1000",
        help="KxL cells of the server part",
    )
    parser.add_argument(
        "--leave-one-out",
        default="client",
        choices=("client", "server"),
        help="server part: FedHarmony's `leave_one_out` (client: sums-only server; server: every correlation kept)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (small models: 1 is fastest)")
    parser.add_argument("--out", default="results/speed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected names among {PARTS}")

    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}",
        "repeats": args.repeats,
    }
    for name in args.data.split(","):
        if not {"round", "overhead"} & set(parts):
            break
        data = load_federated_data(name, data_dir=str(DATA_DIR), num_clients=10, seed=0)
        if "round" in parts:
            report.setdefault("round", []).append({"data": name, **bench_round(data, args.repeats, args.rounds)})
            print(f"round {name}: {report['round'][-1]['ratio']:.2f}x", flush=True)
        if "overhead" in parts:
            report.setdefault("overhead", []).append({"data": name, **bench_overhead(data, args.repeats, args.rounds)})
            print(f"overhead {name}: {report['overhead'][-1]['ratio']:.2f}x", flush=True)
    if "blocks" in parts:
        report["blocks"] = [
            bench_blocks(name, args.repeats, args.num_blocks, args.block_epochs) for name in args.block_data.split(",")
        ]
        for b in report["blocks"]:
            print(f"blocks {b['data']}: {100 * b['time_saved']:.0f}% saved", flush=True)
    if "server" in parts:
        cells = [tuple(int(v) for v in cell.split("x")) for cell in args.server_cells.split(",")]
        report["server"] = bench_server(
            cells,
            max(1, min(args.repeats, 3)),
            args.threads,
            args.leave_one_out,  # type: ignore[arg-type]
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(report, indent=2))
    (out / "speed.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
