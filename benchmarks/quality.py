"""Quality: FedHarmony, its ablations and the baselines on the same partitions and seeds.

Every method runs through the library (:class:`~lightning_fedharmony.orchestrator.Federation`,
:func:`~lightning_fedharmony.data.load_federated_data`, :class:`~lightning_fedharmony.models.MultilabelMLP`); the
global model is evaluated after every round on the test set and on a validation split carved from the training data
(``--val-fraction``). Hyperparameters are chosen on validation only: each method's grid runs on the selection seeds
(``--select-seeds``, default the first seed), the configuration with the highest mean final-round validation mAP
wins and runs on the remaining seeds. Test metrics of configurations that were not chosen are never written.

Methods: ``fedavg``, ``fedprox`` (grid over ``proximal_mu``), ``fedharmony`` (the library's defaults, no grid: what a
user who changes nothing gets), ``fedharmony_paper`` (``FedHarmony.paper()``, grid over ``alignment_weight``),
``fedharmony_noblocks`` (``block_alignment=False``), ``loss_only`` (``quality_aggregation=False``, the default's own
setting), ``aggregation_only`` (``alignment=False, quality_aggregation=True``), ``local_only`` (each client trains its
own model on its own data for the same epochs; metrics averaged over clients) and ``centralized`` (the pooled training
data, one client, same epochs). ``--variant`` adds named variants of the FedHarmony family, e.g.
``--variant fh_pearson=fedharmony:corr_normalization=pearson``.

One cell::

    python benchmarks/quality.py --data yeast --partition dirichlet --alpha 0.1 --clients 10 --rounds 30 \\
        --seeds 0,1,2 --methods fedavg,fedprox,fedharmony --out results/quality/yeast_dir01.json

The full grid of the benchmark issue (4 data sets x 5 partitions x 8 methods x 3 seeds x 2 epoch settings)::

    python benchmarks/quality.py --data yeast,tmc2007-500,rcv1subset1,delicious \\
        --partition dirichlet,kmeans,masking,iid --alpha 0.1,0.5 --local-epochs 1,5 --rounds 30 --seeds 0,1,2 \\
        --preset full --jobs 2 --out results/quality/full.json

Writes ``--out`` (JSON: the settings, the grids, every selection score, one record per cell x method x seed with the
chosen configuration, final-round, best-round and validation-selected-round metrics and the per-round curves), a
markdown table next to it (``.md``) and one PNG of the mean test mAP per round per cell.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", Path(__file__).resolve().parents[1].parent / "shared" / "data"))

#: The methods of the benchmark issue and the FedHarmony switches each one sets.
BASE_METHODS: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {},
    "fedharmony": {},
    "fedharmony_paper": {},
    "fedharmony_noblocks": {"block_alignment": False},
    "loss_only": {"quality_aggregation": False},
    "aggregation_only": {"alignment": False, "quality_aggregation": True},
    "local_only": {},
    "centralized": {},
}
FEDHARMONY_FAMILY = ("fedharmony", "fedharmony_paper", "fedharmony_noblocks", "loss_only", "aggregation_only")
#: the methods a `--variant` may start from (e.g. `fpm=fedprox:server_momentum=0.5`)
VARIANT_BASES = (*FEDHARMONY_FAMILY, "fedavg", "fedprox")
#: Keys that configure the client model (the mixin) too; FedHarmony also sends each of them with its teachers.
MODEL_KEYS = ("corr_normalization", "corr_momentum", "detach_marginals", "corr_eps")

#: Hyperparameter grids chosen on validation. ``small`` fits a laptop; ``full`` is the issue's search.
PRESETS: dict[str, dict[str, dict[str, list[Any]]]] = {
    "small": {
        "fedprox": {"proximal_mu": [1e-3, 1e-2, 1e-1]},
        "fedharmony_paper": {"alignment_weight": [0.1, 1.0, 10.0, 100.0]},
        "fedharmony_noblocks": {"alignment_weight": [0.1, 1.0, 10.0, 100.0]},
        "loss_only": {"alignment_weight": [0.1, 1.0, 10.0, 100.0]},
        "aggregation_only": {"t0": [None, "rounds"]},
    },
    "full": {
        "fedprox": {"proximal_mu": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1]},
        "fedharmony_paper": {
            "alignment_weight": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
            "num_blocks": ["auto", 2, 4],
            "gamma": ["auto", 1.0, 10.0],
            "t0": [None, "rounds"],
        },
        "fedharmony_noblocks": {
            "alignment_weight": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
            "gamma": ["auto", 10.0],
            "t0": [None, "rounds"],
        },
        "loss_only": {"alignment_weight": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "num_blocks": ["auto", 2, 4]},
        "aggregation_only": {"gamma": ["auto", 1.0, 10.0], "t0": [None, "rounds"], "num_blocks": ["auto", 2, 4]},
    },
}
METRICS = ("map", "micro_map", "micro_f1", "macro_f1", "hamming_loss", "correlation_drift")
TABLE_METRICS = (
    ("final", "map", "final mAP"),
    ("best", "map", "best mAP"),
    ("val_selected", "map", "val-stopped mAP"),
    ("final", "micro_map", "micro mAP"),
    ("final", "micro_f1", "micro-F1"),
    ("final", "macro_f1", "macro-F1"),
    ("final", "hamming_loss", "Hamming"),
    ("final", "correlation_drift", "corr. drift"),
)


# ---------------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Cell:
    """One data set x partition x local-epochs setting."""

    data: str
    partition: str
    alpha: float
    observed_fraction: tuple[float, float]
    local_epochs: int

    @property
    def key(self) -> str:
        name = Path(self.data).stem if os.sep in self.data else self.data
        part = self.partition
        if part == "dirichlet":
            part = f"dirichlet{self.alpha:g}"
        elif part == "masking":
            part = f"masking{self.observed_fraction[0]:g}-{self.observed_fraction[1]:g}"
        return f"{name}/{part}/E{self.local_epochs}"


@dataclass(frozen=True)
class Task:
    """One training run: a cell, a method with its configuration, a seed."""

    cell: Cell
    method: str
    base: str
    params: tuple[tuple[str, Any], ...]
    seed: int
    settings: tuple[tuple[str, Any], ...]

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


def _parse_value(text: str) -> Any:
    """``none``/``null`` -> None, ``true``/``false``, numbers; quotes keep a string as it is (``'none'``)."""
    stripped = text.strip()
    if len(stripped) >= 2 and stripped[0] == stripped[-1] and stripped[0] in "'\"":
        return stripped[1:-1]
    low = stripped.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return stripped


def _parse_list(text: str, kind: type = str) -> list[Any]:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_variants(specs: Sequence[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """``NAME=BASE:key=value,key=value`` -> ``{NAME: (BASE, {key: value})}``.

    Raises:
        ValueError: on a malformed spec or a base outside :data:`VARIANT_BASES`.
    """
    variants: dict[str, tuple[str, dict[str, Any]]] = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        base, _, assignments = rest.partition(":")
        if not name or base not in VARIANT_BASES:
            raise ValueError(
                f"Expected `--variant NAME=BASE:key=value,...` with BASE in {VARIANT_BASES}, but got {spec!r}."
            )
        params: dict[str, Any] = {}
        for item in filter(None, assignments.split(",")):
            key, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"Expected `key=value` in variant {name!r}, but got {item!r}.")
            params[key.strip()] = _parse_value(value)
        variants[name] = (base, params)
    return variants


def parse_grid(specs: Sequence[str]) -> dict[str, dict[str, list[Any]]]:
    """``METHOD.key=v1,v2`` (repeatable) -> ``{METHOD: {key: [v1, v2]}}``."""
    grid: dict[str, dict[str, list[Any]]] = {}
    for spec in specs:
        target, sep, values = spec.partition("=")
        method, dot, key = target.partition(".")
        if not (sep and dot and method and key):
            raise ValueError(f"Expected `--grid METHOD.key=v1,v2`, but got {spec!r}.")
        grid.setdefault(method, {})[key] = [_parse_value(v) for v in values.split(",")]
    return grid


def method_grid(
    method: str,
    base: str,
    preset: str,
    overrides: Mapping[str, Mapping[str, list[Any]]],
    fixed: Collection[str] = (),
) -> list[dict[str, Any]]:
    """Every configuration of a method's grid. A variant inherits its base's grid, less the keys it fixes itself
    (``fixed``: ``fp=fedprox:proximal_mu=0.1`` runs ``mu = 0.1``, not FedProx's ``mu`` grid); ``--grid`` on the
    variant itself wins."""
    inherited = dict(PRESETS[preset].get(base, {}))
    inherited.update(overrides.get(base, {}) if method != base else {})
    axes = {key: values for key, values in inherited.items() if key not in fixed}
    axes.update(overrides.get(method, {}))
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))] or [{}]


# ---------------------------------------------------------------------------------------------------- one run
_DATA_CACHE: dict[tuple[Any, ...], Any] = {}


def _federated_data(cell: Cell, seed: int, settings: Mapping[str, Any]) -> Any:
    from lightning_fedharmony.data.federated import load_federated_data

    key = (cell.data, cell.partition, cell.alpha, cell.observed_fraction, seed, tuple(sorted(settings.items())))
    if key not in _DATA_CACHE:
        name = cell.data
        top = settings["top_labels"]
        if top < 0:  # auto: the issue restricts delicious to its 100 most frequent labels
            top = 100 if Path(name).name.startswith("delicious") else 0
        _DATA_CACHE.clear()  # one data set in memory per worker
        _DATA_CACHE[key] = load_federated_data(
            name,
            data_dir=settings["data_dir"],
            val_fraction=settings["val_fraction"],
            top_labels=top,
            partition=cell.partition,
            num_clients=settings["clients"],
            alpha=cell.alpha,
            observed_fraction=cell.observed_fraction,
            seed=seed,
        )
    return _DATA_CACHE[key]


def _build(task: Task, data: Any) -> tuple[Any, Any]:
    """The model and aggregator of a task."""
    from lightning_fedharmony import FedAvg, FedHarmony, FedProx
    from lightning_fedharmony.aggregators.fedharmony import PAPER_SETTINGS
    from lightning_fedharmony.models import MultilabelMLP

    settings = dict(task.settings)
    paper = task.base == "fedharmony_paper"
    params = {**(PAPER_SETTINGS if paper else {}), **BASE_METHODS.get(task.base, {}), **task.param_dict}
    model_kwargs = {k: params[k] for k in MODEL_KEYS if k in params}
    agg_kwargs = dict(params)
    torch.manual_seed(task.seed)
    model = MultilabelMLP(
        data.train.num_features,
        data.train.num_labels,
        hidden=tuple(settings["hidden"]),
        lr=settings["lr"],
        **model_kwargs,
    )
    if task.base == "fedprox":
        aggregator: Any = FedProx(**agg_kwargs)
    elif task.base in FEDHARMONY_FAMILY:
        if agg_kwargs.get("t0") == "rounds":
            agg_kwargs["t0"] = float(settings["rounds"])
        aggregator = (FedHarmony.paper if paper else FedHarmony)(seed=task.seed, **agg_kwargs)
    else:
        aggregator = FedAvg(**agg_kwargs) if task.base == "fedavg" else FedAvg()
    return model, aggregator


def _run_federation(model: Any, clients: Mapping[str, Any], aggregator: Any, task: Task, loaders: Any) -> dict:
    from lightning_fedharmony.orchestrator import Federation

    settings = dict(task.settings)
    test_loader, val_loader = loaders
    fed = Federation(
        model,
        clients,
        aggregator,
        settings["rounds"],
        local_epochs=task.cell.local_epochs,
        seed=task.seed,
        eval_dataloader=test_loader,
        verbose=False,
    )
    fed.aggregator.setup(fed.num_rounds, fed.local_epochs)
    test_curve: list[dict[str, float]] = []
    val_curve: list[dict[str, float]] = []
    server: list[dict[str, float]] = []
    client_seconds: list[float] = []
    for server_round in range(1, fed.num_rounds + 1):
        record = fed.run_round(server_round)
        test_curve.append({k: record.metrics[k] for k in METRICS})
        val_curve.append({k: v for k, v in fed.evaluate(val_loader).items() if k in METRICS})
        server.append(dict(record.server_metrics))
        client_seconds.append(record.seconds["clients"])
    return {"test": test_curve, "val": val_curve, "server": server, "client_seconds": client_seconds}


def _mean_curves(curves: Sequence[list[dict[str, float]]]) -> list[dict[str, float]]:
    return [{k: float(np.mean([c[r][k] for c in curves])) for k in METRICS} for r in range(len(curves[0]))]


def run_task(task: Task) -> dict[str, Any]:
    """Train one task and return its record (per-round test and validation metrics, timings)."""
    from lightning_fedharmony.data import TestDataModule
    from lightning_fedharmony.data.datamodule import ClientDataModule

    settings = dict(task.settings)
    torch.set_num_threads(settings["threads"])
    started = time.perf_counter()
    data = _federated_data(task.cell, task.seed, _data_settings(settings))
    loaders = (data.test_loader(), TestDataModule.from_dataset(data.val, batch_size=1024).test_dataloader())
    batch = settings["batch_size"]
    if task.base == "local_only":
        runs = []
        for index in range(data.partition.num_clients):
            model, aggregator = _build(task, data)
            runs.append(_run_federation(model, {"0": data.client(index, batch, task.seed)}, aggregator, task, loaders))
        curves = {"test": _mean_curves([r["test"] for r in runs]), "val": _mean_curves([r["val"] for r in runs])}
        curves["server"] = []
        curves["client_seconds"] = [sum(values) for values in zip(*(r["client_seconds"] for r in runs))]
    elif task.base == "centralized":
        rows = np.concatenate(data.partition.client_indices)
        observed = None
        if data.partition.observed is not None:
            owner = np.concatenate([np.full(len(idx), k) for k, idx in enumerate(data.partition.client_indices)])
            observed = data.partition.observed[owner]
        pooled = ClientDataModule(
            data.train.X[rows], data.train.Y[rows], observed=observed, batch_size=batch, seed=task.seed
        )
        model, aggregator = _build(task, data)
        curves = _run_federation(model, {"0": pooled}, aggregator, task, loaders)
    else:
        model, aggregator = _build(task, data)
        curves = _run_federation(model, data.clients(batch, task.seed), aggregator, task, loaders)
    test, val = curves["test"], curves["val"]
    best = max(range(len(test)), key=lambda r: test[r]["map"])
    stopped = max(range(len(val)), key=lambda r: val[r]["map"])
    return {
        "cell": task.cell.key,
        "cell_settings": asdict(task.cell),
        "method": task.method,
        "base": task.base,
        "params": task.param_dict,
        "seed": task.seed,
        "final": dict(test[-1]),
        "best": {**test[best], "round": best + 1},
        "val_selected": {**test[stopped], "round": stopped + 1},
        "val_final": dict(val[-1]),
        "curves": {"test_map": [r["map"] for r in test], "val_map": [r["map"] for r in val]},
        "server": curves["server"][-1] if curves["server"] else {},
        "num_train": int(data.train.num_samples),
        "num_labels": int(data.train.num_labels),
        "seconds": time.perf_counter() - started,
        # local training of every selected client, per round (round 1 has no teacher: it is left out)
        "client_seconds_per_round": float(np.median(curves["client_seconds"][1:] or curves["client_seconds"])),
    }


def _data_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    return {k: settings[k] for k in ("data_dir", "val_fraction", "top_labels", "clients")}


# ---------------------------------------------------------------------------------------------------- the benchmark
def _execute(tasks: Sequence[Task], jobs: int, log: Any) -> list[dict[str, Any]]:
    def report(record: dict[str, Any]) -> None:
        print(
            f"  {record['cell']:<28} {record['method']:<22} seed {record['seed']} {json.dumps(record['params'])}"
            f" val {record['val_final']['map']:.4f} ({record['seconds']:.1f}s)",
            file=log,
            flush=True,
        )

    results: list[dict[str, Any]] = []
    if jobs <= 1:
        for task in tasks:
            results.append(run_task(task))
            report(results[-1])
        return results
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        for record in pool.map(run_task, tasks, chunksize=1):
            results.append(record)
            report(record)
    return results


def run_benchmark(args: argparse.Namespace, log: Any = sys.stdout) -> dict[str, Any]:
    """Select every method's configuration on validation, run the chosen ones on every seed, and summarise."""
    variants = parse_variants(args.variant)
    overrides = parse_grid(args.grid)
    methods = _parse_list(args.methods)
    for method in methods:
        if method not in BASE_METHODS and method not in variants:
            raise ValueError(f"Expected methods from {tuple(BASE_METHODS)} or a --variant name, but got {method!r}.")
    seeds = _parse_list(args.seeds, int)
    select_seeds = _parse_list(args.select_seeds, int) if args.select_seeds else seeds[:1]
    low, high = (float(v) for v in args.observed_fraction.split(","))
    cells = []
    for data, partition, epochs in itertools.product(
        _parse_list(args.data), _parse_list(args.partition), _parse_list(args.local_epochs, int)
    ):
        alphas = _parse_list(args.alpha, float) if partition == "dirichlet" else [_parse_list(args.alpha, float)[0]]
        cells += [Cell(data, partition, a, (low, high), epochs) for a in alphas]
    settings = (
        ("data_dir", args.data_dir),
        ("val_fraction", args.val_fraction),
        ("top_labels", args.top_labels),
        ("clients", args.clients),
        ("rounds", args.rounds),
        ("batch_size", args.batch_size),
        ("lr", args.lr),
        ("hidden", tuple(_parse_list(args.hidden, int))),
        ("threads", args.threads),
    )

    def base_of(method: str) -> tuple[str, dict[str, Any]]:
        return variants.get(method, (method, {}))

    grids: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        base, fixed = base_of(method)
        configs = method_grid(method, base, args.preset, overrides, fixed=tuple(fixed))
        grids[method] = [{**fixed, **config} for config in configs]

    def task(cell: Cell, method: str, config: Mapping[str, Any], seed: int) -> Task:
        return Task(cell, method, base_of(method)[0], tuple(config.items()), seed, settings)

    started = time.perf_counter()
    # phase 1: every configuration on the selection seeds; validation decides
    phase1 = [
        task(cell, m, config, seed)
        for cell in cells
        for m in methods
        for config in grids[m]
        for seed in select_seeds
        if len(grids[m]) > 1 or seed in seeds
    ]
    print(f"selection: {len(phase1)} runs", file=log, flush=True)
    selected = _execute(phase1, args.jobs, log)
    selection: dict[str, dict[str, Any]] = {}
    chosen: dict[tuple[str, str], dict[str, Any]] = {}
    for cell in cells:
        selection[cell.key] = {}
        for m in methods:
            scores = []
            for config in grids[m]:
                vals = [
                    r["val_final"]["map"]
                    for r in selected
                    if r["cell"] == cell.key and r["method"] == m and r["params"] == config
                ]
                scores.append(float(np.mean(vals)) if vals else float("nan"))
            best = int(np.nanargmax(scores)) if any(math.isfinite(s) for s in scores) else 0
            chosen[(cell.key, m)] = grids[m][best]
            selection[cell.key][m] = {
                "configs": grids[m],
                "val_final_map": scores,
                "chosen": grids[m][best],
                "selection_seeds": select_seeds if len(grids[m]) > 1 else [],
            }
    # phase 2: the chosen configuration on the seeds it has not run on yet
    records = [r for r in selected if r["seed"] in seeds and r["params"] == chosen[(r["cell"], r["method"])]]
    done = {(r["cell"], r["method"], r["seed"]) for r in records}
    phase2 = [
        task(cell, m, chosen[(cell.key, m)], seed)
        for cell in cells
        for m in methods
        for seed in seeds
        if (cell.key, m, seed) not in done
    ]
    print(f"chosen configurations on the remaining seeds: {len(phase2)} runs", file=log, flush=True)
    records += _execute(phase2, args.jobs, log)
    records.sort(key=lambda r: (r["cell"], methods.index(r["method"]), r["seed"]))
    grid_scores = [{k: r[k] for k in ("cell", "method", "params", "seed", "val_final", "seconds")} for r in selected]
    return {
        "settings": {
            **{k: (list(v) if isinstance(v, tuple) else v) for k, v in settings},
            "methods": methods,
            "variants": {k: {"base": b, "params": p} for k, (b, p) in variants.items()},
            "seeds": seeds,
            "select_seeds": select_seeds,
            "preset": args.preset,
            "grid_overrides": overrides,
            "selection_rule": "highest mean final-round validation mAP over the selection seeds",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
            "wall_seconds": time.perf_counter() - started,
        },
        "cells": [asdict(c) | {"key": c.key} for c in cells],
        "selection": selection,
        "grid_runs": grid_scores,
        "records": records,
    }


# ---------------------------------------------------------------------------------------------------- summaries
def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return float(np.mean(values)), float(statistics.stdev(values)) if len(values) > 1 else 0.0


def summarize(report: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{cell: {method: {"<part>.<metric>": (mean, std), "params": ..., "seeds": n}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for record in report["records"]:
        row = out.setdefault(record["cell"], {}).setdefault(record["method"], {"_values": {}})
        row["params"] = record["params"]
        for part in ("final", "best", "val_selected"):
            for metric in METRICS:
                row["_values"].setdefault(f"{part}.{metric}", []).append(record[part][metric])
        row["_values"].setdefault("best.round", []).append(record["best"]["round"])
    for cell in out.values():
        for row in cell.values():
            values = row.pop("_values")
            row["seeds"] = len(values["final.map"])
            row.update({k: _mean_std(v) for k, v in values.items()})
    return out


def markdown(report: Mapping[str, Any]) -> str:
    """Per-cell tables (mean +- std over seeds) and the target check against FedAvg and FedProx."""
    summary = summarize(report)
    settings = report["settings"]
    lines = [
        f"Command: `{settings['command']}`",
        "",
        f"{settings['clients']} clients, {settings['rounds']} rounds, MLP {settings['hidden']}, Adam lr"
        f" {settings['lr']}, batch {settings['batch_size']}, validation share {settings['val_fraction']};"
        f" seeds {settings['seeds']}, grids chosen on seeds {settings['select_seeds']} by"
        f" {settings['selection_rule']}. mAP = macro mAP on the test set; `best` = best test round (an oracle,"
        " reported because centralized training overfits); `val-stopped` = the round with the best validation mAP."
        f" Wall time {settings['wall_seconds'] / 60:.1f} min.",
        "",
    ]
    lines += [*compact_table(summary), ""]
    header = "| method | chosen | " + " | ".join(t for _, _, t in TABLE_METRICS) + " | final mAP - FedAvg |"
    rule = "|---|---|" + "---:|" * (len(TABLE_METRICS) + 1)
    for cell, rows in summary.items():
        lines += [f"### {cell}", "", header, rule]
        ref = rows.get("fedavg", {}).get("final.map", (float("nan"), 0.0))[0]
        for method, row in rows.items():
            cells = [f"{row[f'{p}.{m}'][0]:.4f} ± {row[f'{p}.{m}'][1]:.4f}" for p, m, _ in TABLE_METRICS]
            delta = 100 * (row["final.map"][0] - ref)
            params = ", ".join(f"{k}={v}" for k, v in row["params"].items()) or "-"
            lines.append(f"| {method} | {params} | " + " | ".join(cells) + f" | {delta:+.2f} |")
        lines.append("")
    lines += _target_lines(summary)
    return "\n".join(lines) + "\n"


def compact_table(summary: Mapping[str, Mapping[str, Mapping[str, Any]]], key: str = "final.map") -> list[str]:
    """One row per cell, one column per method: mean ± std over seeds of ``key`` (in points)."""
    methods: list[str] = []
    for rows in summary.values():
        methods += [m for m in rows if m not in methods]
    lines = [
        f"| cell | {' | '.join(methods)} |",
        "|---|" + "---:|" * len(methods),
    ]
    for cell, rows in summary.items():
        cells = [f"{100 * rows[m][key][0]:.1f} ± {100 * rows[m][key][1]:.1f}" if m in rows else "-" for m in methods]
        lines.append(f"| {cell} | " + " | ".join(cells) + " |")
    return lines


def _target_lines(summary: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> list[str]:
    """The issue's target for every FedHarmony-family method: gain over FedAvg/FedProx and share of the gap closed."""
    family = sorted(
        {m for rows in summary.values() for m in rows if m not in ("fedavg", "fedprox", "local_only", "centralized")}
    )
    if not family or not all("fedavg" in rows for rows in summary.values()):
        return []
    lines = [
        "### Target check (final-round test mAP, points, mean over seeds)",
        "",
        "| method | cell | vs FedAvg | vs FedProx | gap FedAvg -> centralized closed |",
        "|---|---|---:|---:|---:|",
    ]
    for method in family:
        deltas = []
        for cell, rows in summary.items():
            if method not in rows:
                continue
            mine, avg = rows[method]["final.map"][0], rows["fedavg"]["final.map"][0]
            prox = rows["fedprox"]["final.map"][0] if "fedprox" in rows else float("nan")
            central = rows["centralized"]["final.map"][0] if "centralized" in rows else float("nan")
            gap = central - avg
            if math.isnan(central):
                closed_text = "n/a (no centralized run)"
            elif gap > 1e-9:
                closed_text = f"{100 * (mine - avg) / gap:.0f}%"
            else:
                closed_text = "n/a (FedAvg >= centralized)"
            deltas.append((100 * (mine - avg), 100 * (mine - prox)))
            lines.append(
                f"| {method} | {cell} | {100 * (mine - avg):+.2f} | {100 * (mine - prox):+.2f} | {closed_text} |"
            )
        if deltas:
            va, vp = zip(*deltas)
            prox = [v for v in vp if math.isfinite(v)]
            prox_text = f"{np.mean(prox):+.2f} ({min(prox):+.2f})" if prox else "n/a"
            lines.append(
                f"| **{method}** | mean (min) over {len(deltas)} cells | {np.mean(va):+.2f} ({min(va):+.2f}) |"
                f" {prox_text} | |"
            )
    return [*lines, ""]


def plot(report: Mapping[str, Any], out: Path) -> list[str]:
    """One PNG per cell: mean test mAP per round per method."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return []
    written = []
    by_cell: dict[str, dict[str, list[list[float]]]] = {}
    for record in report["records"]:
        by_cell.setdefault(record["cell"], {}).setdefault(record["method"], []).append(record["curves"]["test_map"])
    for cell, methods in by_cell.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
        for method, curves in methods.items():
            mean = np.mean(np.asarray(curves), axis=0)
            ax.plot(np.arange(1, len(mean) + 1), mean, linewidth=1.3, label=method)
        ax.set_xlabel("round")
        ax.set_ylabel("test mAP (mean over seeds)")
        ax.set_title(cell)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        path = out.with_name(f"{out.stem}_{cell.replace('/', '_')}.png")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        written.append(os.fspath(path))
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="yeast", help="comma list: names in --data-dir, paths, or river:yeast")
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    parser.add_argument("--partition", default="dirichlet", help="comma list of dirichlet, kmeans, masking, iid")
    parser.add_argument("--alpha", default="0.1", help="Dirichlet concentration(s), comma list")
    parser.add_argument("--observed-fraction", default="0.5,0.7", help="masking: low,high share of observed labels")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--local-epochs", default="1", help="comma list")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--select-seeds", default="", help="seeds the grids run on (default: the first seed)")
    parser.add_argument("--methods", default=",".join(BASE_METHODS))
    parser.add_argument("--variant", action="append", default=[], help="NAME=BASE:key=value,... (repeatable)")
    parser.add_argument("--grid", action="append", default=[], help="METHOD.key=v1,v2 (repeatable)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="small")
    parser.add_argument("--val-fraction", type=float, default=0.15)
    parser.add_argument("--top-labels", type=int, default=-1, help="-1: 100 for delicious, all labels otherwise")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--hidden", default="256")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (1 is fastest for this MLP)")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes")
    parser.add_argument("--out", default="results/quality/results.json")
    parser.add_argument("--merge", nargs="+", default=[], help="join earlier reports (JSON) instead of running")
    return parser


def merge_reports(paths: Sequence[str]) -> dict[str, Any]:
    """Several reports of the same cells and seeds (e.g. a variant run later) as one: records and selections joined.

    Raises:
        ValueError: if the reports differ in a setting that changes the data or the training.
    """
    reports = [json.loads(Path(p).read_text()) for p in paths]
    first = reports[0]
    same = ("val_fraction", "top_labels", "clients", "rounds", "batch_size", "lr", "hidden")
    for path, report in zip(paths[1:], reports[1:]):
        differs = [k for k in same if report["settings"][k] != first["settings"][k]]
        if differs:
            raise ValueError(f"Expected reports with the same settings, but {path} differs in {differs}.")
    merged = {**first, "settings": dict(first["settings"]), "selection": {}, "grid_runs": [], "records": []}
    merged["settings"]["command"] = " ; ".join(r["settings"]["command"] for r in reports)
    merged["settings"]["wall_seconds"] = sum(r["settings"]["wall_seconds"] for r in reports)
    merged["settings"]["seeds"] = sorted({s for r in reports for s in r["settings"]["seeds"]})
    for report in reports:
        for cell, methods in report["selection"].items():
            merged["selection"].setdefault(cell, {}).update(methods)
        merged["grid_runs"] += report["grid_runs"]
        seen = {(r["cell"], r["method"], r["seed"]) for r in merged["records"]}
        # a method run again in a later report (e.g. FedAvg as a reference) keeps its first records
        merged["records"] += [r for r in report["records"] if (r["cell"], r["method"], r["seed"]) not in seen]
    merged["records"].sort(key=lambda r: r["cell"])
    return merged


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = merge_reports(args.merge) if args.merge else run_benchmark(args)
    out.write_text(json.dumps(report, indent=1, default=str, allow_nan=True))
    table = markdown(report)
    out.with_suffix(".md").write_text(table)
    report["pictures"] = plot(report, out)
    print(table)
    return report


if __name__ == "__main__":
    main()
