"""The ``fedharmony`` command.

``fedharmony run [--config FILE] [key=value ...]`` runs every configured method on one partition and seed and prints
a comparison table; with no arguments it runs the built-in default (yeast, 10 clients, label-set Dirichlet 0.1, an
MLP, FedAvg vs FedProx vs FedHarmony) and ends with the clients that disagree most with their teachers.
``fedharmony compare`` does the same over several seeds and reports mean +- std. Results, the resolved config and
pictures go to ``out_dir``. ``fedharmony drift [--config FILE] [--out FILE] [key=value ...]`` loads the same data and
partition and measures, before any training, how far each client's label correlations depart from the other
clients' beyond sampling noise, with a verdict on whether FedHarmony's correlation terms are likely to matter.
``fedharmony serve --root FOLDER [--config FILE] [--method NAME] [key=value ...]`` is the server of client processes
(any ``trainer.fit`` with :class:`~lightning_fedharmony.FederatedClient`) that share ``FOLDER``: the same rounds,
selection, fault handling, checkpoints and results as ``run``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from lightning_fedharmony.checkpoint import CheckpointError, CheckpointMismatchError
from lightning_fedharmony.config import ConfigError, load_config
from lightning_fedharmony.drift import drift_summary, drift_table, label_drift
from lightning_fedharmony.experiment import (
    TABLE_COLUMNS,
    check_serve_settings,
    disagreement_lines,
    prepare_data,
    run_methods,
    serve_method,
    summarize,
    write_outputs,
)
from lightning_fedharmony.orchestrator import FederationError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedharmony", description="Federated multi-label learning with FedHarmony.")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the configured methods on one partition and seed")
    compare = commands.add_parser("compare", help="run the configured methods over several seeds")
    for sub in (run, compare):
        sub.add_argument("--config", help="YAML file merged over the defaults")
        sub.add_argument("--methods", help="comma-separated subset of the configured methods")
        sub.add_argument("--quiet", action="store_true", help="no per-round progress lines")
        sub.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.num_rounds=5")
    compare.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    serve = commands.add_parser(
        "serve", help="serve one configured method to client processes (FederatedClient) sharing a folder"
    )
    serve.add_argument("--config", help="YAML file merged over the defaults")
    serve.add_argument("--root", required=True, help="the folder shared with the clients")
    serve.add_argument("--method", help="the configured method to serve (needed when several are configured)")
    serve.add_argument("--quiet", action="store_true", help="no per-round progress lines")
    serve.add_argument("overrides", nargs="*", help="dotted overrides, e.g. federation.client_timeout=60")
    drift = commands.add_parser(
        "drift", help="measure the partition's label-correlation drift from the clients' labels, before training"
    )
    drift.add_argument("--config", help="YAML file merged over the defaults")
    drift.add_argument("--out", help="also write the figures as JSON to this file")
    drift.add_argument("overrides", nargs="*", help="dotted overrides, e.g. partition.kind=kmeans")
    return parser


def _methods(cfg: Any, option: str | None) -> list[str] | None:
    if option is None:
        return None
    names = [m.strip() for m in option.split(",") if m.strip()]
    unknown = [m for m in names if m not in cfg.methods]
    if unknown or not names:
        raise ConfigError(f"--methods: expected names among {list(cfg.methods)}, but got {option!r}.")
    return names


def run_command(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    methods = _methods(cfg, args.methods)
    prepared = prepare_data(cfg)
    federations = run_methods(cfg, prepared, methods, verbose=not args.quiet)
    report = write_outputs(cfg, prepared, federations)
    print()
    print(report["table"])
    summary = [line for name, fed in federations.items() for line in disagreement_lines(name, fed.result)]
    if summary:
        print()
        print("\n".join(summary))
    part = prepared.partition
    # the partition's label-correlation drift, from the labels alone: whether FedHarmony's terms had a reason to matter
    print("\nLabel-correlation drift of this partition (`fedharmony drift` for the per-client table):")
    print(drift_summary(label_drift(prepared.train.Y, part.client_indices, part.observed)))
    print(f"\nResults in {cfg.out_dir}/ (results.json, results.md, history_*.csv, clients_*.csv, config.yaml)")
    return report


def serve_command(args: argparse.Namespace) -> dict[str, Any]:
    """Serve one method through a shared folder, then write and print the same results as ``run``."""
    cfg = load_config(args.config, args.overrides)
    check_serve_settings(cfg)  # before loading the data
    prepared = prepare_data(cfg)
    name, fed = serve_method(cfg, args.root, args.method, prepared, verbose=not args.quiet)
    report = write_outputs(cfg, prepared, {name: fed})
    print()
    print(report["table"])
    summary = disagreement_lines(name, fed.result)
    if summary:
        print()
        print("\n".join(summary))
    print(f"\nResults in {cfg.out_dir}/ (results.json, results.md, history_*.csv, clients_*.csv, config.yaml)")
    return report


def compare_command(args: argparse.Namespace) -> dict[str, Any]:
    cfg = load_config(args.config, args.overrides)
    methods = _methods(cfg, args.methods)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated ints, but got {args.seeds!r}.") from None
    if not seeds:
        raise ConfigError(f"--seeds: expected at least one seed, but got {args.seeds!r}.")
    root = Path(cfg.out_dir)
    per_seed: dict[str, list[dict[str, float]]] = {}
    for seed in seeds:
        per_seed_dirs: dict[str, Any] = {"seed": seed, "out_dir": str(root / f"seed_{seed}")}
        if cfg.federation.checkpoint_dir is not None:  # one checkpoint per seed: a seed must not resume another's
            per_seed_dirs["federation"] = {"checkpoint_dir": str(Path(cfg.federation.checkpoint_dir) / f"seed_{seed}")}
        seed_cfg = OmegaConf.merge(cfg, per_seed_dirs)
        print(f"==== seed {seed}", flush=True)
        prepared = prepare_data(seed_cfg)  # type: ignore[arg-type]
        federations = run_methods(seed_cfg, prepared, methods, verbose=not args.quiet)  # type: ignore[arg-type]
        write_outputs(seed_cfg, prepared, federations)  # type: ignore[arg-type]
        for name, fed in federations.items():
            per_seed.setdefault(name, []).append(summarize(fed.result))
    aggregate = {
        name: {
            key: {"mean": statistics.fmean(r[key] for r in rows), "std": _std([r[key] for r in rows])}
            for key in rows[0]
        }
        for name, rows in per_seed.items()
    }
    root.mkdir(parents=True, exist_ok=True)
    table = _mean_std_table(aggregate, len(seeds))
    (root / "compare.json").write_text(json.dumps({"seeds": seeds, "methods": aggregate, "runs": per_seed}, indent=2))
    (root / "compare.md").write_text(table + "\n")
    print()
    print(table)
    print(f"\nResults in {root}/ (compare.json, compare.md, seed_*/)")
    return aggregate


def drift_command(args: argparse.Namespace) -> dict[str, Any]:
    """Load the data and build the partition of a run configuration, then print its label-correlation drift."""
    cfg = load_config(args.config, args.overrides)
    prepared = prepare_data(cfg)
    part = prepared.partition
    drift = label_drift(prepared.train.Y, part.client_indices, part.observed)
    setting = f"{cfg.data.name}, partition {cfg.partition.kind}"
    if cfg.partition.kind == "dirichlet":
        setting += f" (alpha {cfg.partition.alpha:g})"
    print(f"Label-correlation drift of {setting}, {part.num_clients} clients, seed {cfg.seed}:")
    print(f"{prepared.train.num_samples} training samples, {prepared.train.num_labels} labels\n")
    print(drift_table(drift))
    print()
    print(drift_summary(drift))
    report = {
        "dataset": cfg.data.name,
        "partition": OmegaConf.to_container(cfg.partition, resolve=True),
        "seed": cfg.seed,
        "num_labels": prepared.train.num_labels,
        **drift.as_dict(),
    }
    if args.out:
        path = Path(args.out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2))
        print(f"\nFigures in {path}")
    return report


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _mean_std_table(aggregate: dict[str, dict[str, dict[str, float]]], num_seeds: int) -> str:
    header = f"| method ({num_seeds} seeds) | " + " | ".join(title for _, title in TABLE_COLUMNS) + " |"
    lines = [header, "|---|" + "---:|" * len(TABLE_COLUMNS)]
    for name, stats in aggregate.items():
        cells = []
        for key, _ in TABLE_COLUMNS:
            digits = 1 if key == "seconds" else 4
            cells.append(f"{stats[key]['mean']:.{digits}f} ± {stats[key]['std']:.{digits}f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedharmony`` command; returns the exit code."""
    parser = _parser()
    # dotted overrides may stand before or after options such as --quiet: argparse leaves the later ones over
    args, extra = parser.parse_known_args(argv)
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    try:
        if args.command == "run":
            run_command(args)
        elif args.command == "serve":
            serve_command(args)
        elif args.command == "drift":
            drift_command(args)
        else:
            compare_command(args)
    except ConfigError as err:
        print(f"fedharmony: error: {err}", file=sys.stderr)
        return 2
    except (ModuleNotFoundError, CheckpointMismatchError, CheckpointError) as err:
        print(f"fedharmony: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except FederationError as err:
        print(f"fedharmony: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
