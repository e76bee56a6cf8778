"""Label-correlation drift: how far each partition's clients disagree about their label correlations, from labels.

For every data set x partition, the same split and partition as ``benchmarks/quality.py`` builds (its
``--val-fraction`` carved out first, 10 clients, seed 0), then :func:`~lightning_fedharmony.drift.label_drift`: per
client the phi correlation of its labels, its leave-one-out consensus from the other clients, the mean squared gap
``s_k`` and what sampling noise alone would give ``b_k``; per partition the sample-weighted mean excess
``s_k - b_k``, the share of clients with ``s_k >= 2 b_k``, the client size ratio and the verdict of ``fedharmony
drift``. No training: the whole default grid takes about 10 seconds, most of it reading the files.

    python benchmarks/drift.py --out results/drift/drift.json

Writes ``--out`` (JSON: settings, the module's thresholds, one record per cell with the per-client figures) and a
markdown table next to it (``.md``). The thresholds of the verdict
(:data:`~lightning_fedharmony.drift.LIKELY_EXCESS` and friends) are meant to be set by reading this table next to
``benchmarks/results_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
DEFAULT_DATA = "yeast,emotions,scene,tmc2007-500,rcv1subset1,delicious,corel16k001"
#: ``kind`` or ``kind:alpha`` (Dirichlet).
DEFAULT_PARTITIONS = "dirichlet:0.1,dirichlet:0.5,kmeans,masking,iid"


def parse_partitions(text: str) -> list[tuple[str, float]]:
    """``"dirichlet:0.1,kmeans"`` -> ``[("dirichlet", 0.1), ("kmeans", 0.1)]`` (alpha unused outside Dirichlet).

    Raises:
        ValueError: on an unknown kind or an alpha that is not a positive number.
    """
    from lightning_fedharmony.data.federated import PARTITIONS

    cells = []
    for item in (p.strip() for p in text.split(",") if p.strip()):
        kind, _, alpha = item.partition(":")
        if kind not in PARTITIONS:
            raise ValueError(f"Expected `--partitions` entries among {PARTITIONS} (dirichlet:ALPHA), but got {item!r}.")
        try:
            value = float(alpha) if alpha else 0.1
        except ValueError:
            value = -1.0
        if not value > 0:
            raise ValueError(f"Expected a positive Dirichlet alpha in `--partitions`, but got {item!r}.")
        cells.append((kind, value))
    if not cells:
        raise ValueError(f"Expected at least one entry in `--partitions`, but got {text!r}.")
    return cells


def cell_name(kind: str, alpha: float) -> str:
    return f"dirichlet{alpha:g}" if kind == "dirichlet" else kind


def measure(
    data: str, kind: str, alpha: float, *, data_dir: str, clients: int, seed: int, val_fraction: float, top_labels: int
) -> dict[str, Any]:
    """One cell: load and partition as the quality benchmark does, then the drift figures."""
    from lightning_fedharmony.data.federated import load_federated_data
    from lightning_fedharmony.drift import label_drift

    top = top_labels if top_labels >= 0 else (100 if Path(data).name.startswith("delicious") else 0)
    started = time.perf_counter()
    fed = load_federated_data(
        data,
        data_dir=data_dir,
        val_fraction=val_fraction,
        top_labels=top,
        partition=kind,
        num_clients=clients,
        alpha=alpha,
        seed=seed,
    )
    drift = label_drift(fed.train.Y, fed.partition.client_indices, fed.partition.observed)
    return {
        "data": data,
        "partition": cell_name(kind, alpha),
        "kind": kind,
        "alpha": alpha if kind == "dirichlet" else None,
        "num_labels": fed.train.num_labels,
        "num_train": fed.train.num_samples,
        "top_labels": top,
        "seconds": time.perf_counter() - started,
        **drift.as_dict(),
    }


def markdown(records: Sequence[dict[str, Any]], thresholds: dict[str, float]) -> str:
    lines = [
        "| data | partition | labels | mean abs phi | weighted excess | RMS gap | beyond noise | size ratio"
        " | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in records:
        ratio = "inf" if r["size_ratio"] is None else f"{r['size_ratio']:.1f}"
        rms = math.sqrt(max(r["weighted_excess"], 0.0))
        lines.append(
            f"| {r['data']} | {r['partition']} | {r['num_labels']} | {r['mean_abs_phi']:.3f} |"
            f" {r['weighted_excess']:.4f} | {rms:.3f} | {r['share_beyond_noise']:.0%} | {ratio} | {r['verdict']} |"
        )
    rules = ", ".join(f"{k} = {v:g}" for k, v in thresholds.items())
    lines += [
        "",
        "weighted excess: sample-weighted mean over clients of s_k - b_k (discrepancy of a client's label phi from"
        " its leave-one-out consensus, minus what sampling alone gives); RMS gap: its square root (phi units);"
        " beyond noise: share of clients with s_k >= BEYOND_NOISE_RATIO x b_k; size ratio: largest / smallest client.",
        f"Thresholds: {rules}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=DEFAULT_DATA, help="comma list: names in --data-dir, paths, or river:yeast")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--partitions", default=DEFAULT_PARTITIONS, help="comma list of kind or dirichlet:ALPHA")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", default="0")
    parser.add_argument(
        "--val-fraction", type=float, default=0.15, help="as benchmarks/quality.py, so partitions match"
    )
    parser.add_argument("--top-labels", type=int, default=-1, help="-1: 100 for delicious, all labels otherwise")
    parser.add_argument("--out", default="results/drift/drift.json")
    args = parser.parse_args(argv)

    import lightning_fedharmony.drift as drift_module

    cells = parse_partitions(args.partitions)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [d.strip() for d in args.data.split(",") if d.strip()]
    thresholds = {
        name: getattr(drift_module, name)
        for name in ("BEYOND_NOISE_RATIO", "LIKELY_EXCESS", "LIKELY_SHARE", "UNLIKELY_EXCESS", "SIZE_RATIO_NOTE")
    }
    started = time.perf_counter()
    records = []
    for data in names:
        for kind, alpha in cells:
            for seed in seeds:
                record = measure(
                    data,
                    kind,
                    alpha,
                    data_dir=args.data_dir,
                    clients=args.clients,
                    seed=seed,
                    val_fraction=args.val_fraction,
                    top_labels=args.top_labels,
                )
                record["seed"] = seed
                records.append(record)
                ratio = record["size_ratio"] or math.inf
                print(
                    f"{data:>12} {record['partition']:>13} seed {seed}: excess {record['weighted_excess']:+.4f},"
                    f" beyond noise {record['share_beyond_noise']:.0%}, size ratio {ratio:.1f},"
                    f" {record['verdict']} ({record['seconds']:.1f}s)",
                    flush=True,
                )
    report = {
        "settings": {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "data": names,
            "partitions": [cell_name(k, a) for k, a in cells],
            "clients": args.clients,
            "seeds": seeds,
            "val_fraction": args.val_fraction,
            "top_labels": args.top_labels,
            "python": platform.python_version(),
            "wall_seconds": time.perf_counter() - started,
        },
        "thresholds": thresholds,
        "records": records,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(records, thresholds) + "\n")
    print(f"\nwrote {out} and {out.with_suffix('.md')}")
    return report


if __name__ == "__main__":
    main()
