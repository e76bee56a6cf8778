"""From a :class:`~lightning_fedharmony.config.RunConfig` to results: data, partition, clients, methods, tables."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.aggregators.fedharmony import FedHarmony
from lightning_fedharmony.checkpoint import CHECKPOINT_NAME
from lightning_fedharmony.config import ConfigError, instantiate, to_yaml, trainer_kwargs
from lightning_fedharmony.data.federated import FederatedData, load_federated_data
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.results import FederationResult
from lightning_fedharmony.transports.folder import FolderTransport

log = logging.getLogger(__name__)

#: Columns of the comparison table: (result key, header).
TABLE_COLUMNS = (
    ("final_map", "final mAP"),
    ("best_map", "best mAP"),
    ("micro_f1", "micro-F1"),
    ("macro_f1", "macro-F1"),
    ("hamming_loss", "Hamming loss"),
    ("seconds", "seconds"),
)


def prepare_data(cfg: DictConfig) -> FederatedData:
    """Load, split, standardise and partition the data of a run configuration."""
    data, part = cfg.data, cfg.partition
    try:
        return load_federated_data(
            data.name,
            data_dir=data.data_dir,
            test_size=data.test_size,
            val_fraction=data.val_fraction,
            client_val_fraction=data.client_val_fraction,
            standardize=data.standardize,
            top_labels=data.top_labels,
            partition=part.kind,
            num_clients=part.num_clients,
            alpha=part.alpha,
            min_samples=part.min_samples,
            observed_fraction=tuple(part.observed_fraction),
            seed=cfg.seed,
        )
    except FileNotFoundError as err:
        raise ConfigError(f"data.name: {' '.join(str(err).split())}") from None
    except ValueError as err:  # e.g. more clients than the data can fill: name the key the message is about
        message = " ".join(str(err).split())
        named = re.findall(r"`(\w+)", message)
        key = next((_DATA_KEYS[n] for n in named if n in _DATA_KEYS), "data.name")
        raise ConfigError(f"{key}: {message}") from None


#: Arguments of :func:`load_federated_data` -> the configuration key that sets them.
_DATA_KEYS = {
    **{name: f"partition.{name}" for name in ("num_clients", "min_samples", "alpha", "observed_fraction")},
    **{name: f"data.{name}" for name in ("data_dir", "test_size", "val_fraction", "client_val_fraction", "top_labels")},
    "num_labels": "data.top_labels",
    "partition": "partition.kind",
}


def build_model(cfg: DictConfig, prepared: FederatedData) -> pl.LightningModule:
    """The configured model, with ``num_features``/``num_labels`` from the data; weights seeded by ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    return instantiate(
        cfg.model,
        pl.LightningModule,
        "model",
        num_features=prepared.train.num_features,
        num_labels=prepared.train.num_labels,
    )


def run_fingerprint(cfg: DictConfig, method: str) -> dict[str, Any]:
    """The configuration sections that decide a method's result, for the checkpoint's fingerprint.

    The federation fingerprints its own settings (rounds, seed, ...); this adds the data, partition, model, the
    method, the client Trainer overrides and the batch size, under the keys a user writes them with. Settings that
    only say where or how fast things run (``out_dir``, ``plots``, ``checkpoint_dir``, ``client_timeout``,
    ``round_retries``, ``num_threads``) are left out, so that changing them keeps a checkpoint usable.
    """
    sections = {
        "data": cfg.data,
        "partition": cfg.partition,
        "model": cfg.model,
        f"methods.{method}": cfg.methods[method],
        "trainer": cfg.trainer,
    }
    extra = {key: OmegaConf.to_container(value, resolve=True) for key, value in sections.items()}
    extra["federation.batch_size"] = cfg.federation.batch_size
    return extra


def federation_settings(
    cfg: DictConfig, prepared: FederatedData, method: str, verbose: bool, stream: TextIO | None
) -> dict[str, Any]:
    """The :class:`Federation` arguments a run configuration sets, the same for ``run``, ``compare`` and ``serve``."""
    fcfg = cfg.federation
    return {
        "local_epochs": fcfg.local_epochs,
        "fraction_fit": fcfg.fraction_fit,
        "min_clients": fcfg.min_clients,
        "client_sampling": fcfg.client_sampling,
        "seed": cfg.seed,
        "eval_dataloader": prepared.test_loader(),
        "eval_every": fcfg.eval_every,
        "client_timeout": fcfg.client_timeout,
        "round_retries": fcfg.round_retries,
        "federated_eval": fcfg.federated_eval,
        "eval_bins": fcfg.eval_bins,
        "fraction_evaluate": fcfg.fraction_evaluate,
        "label_names": prepared.train.label_names,
        "fingerprint_extra": run_fingerprint(cfg, method),
        "num_threads": cfg.num_threads,
        "verbose": verbose,
        "stream": stream,
    }


def run_methods(
    cfg: DictConfig,
    prepared: FederatedData | None = None,
    methods: Sequence[str] | None = None,
    verbose: bool = True,
    stream: TextIO | None = None,
) -> dict[str, Federation]:
    """Run each configured method on the same partition and seed; return the finished federations."""
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    prepared = prepared or prepare_data(cfg)
    names = list(methods or cfg.methods.keys())
    # build every object first, so a bad configuration fails before any training
    aggregators = {name: instantiate(cfg.methods[name], Aggregator, f"methods.{name}") for name in names}
    build_model(cfg, prepared)
    federations: dict[str, Federation] = {}
    clients = prepared.clients(cfg.federation.batch_size, cfg.seed)
    fcfg = cfg.federation
    for name in names:
        if verbose:
            print(f"== {name}", file=stream, flush=True)
        fed = Federation(
            build_model(cfg, prepared),
            clients,
            aggregators[name],
            fcfg.num_rounds,
            trainer_kwargs=trainer_kwargs(cfg),  # each method's own callback instances
            checkpoint_dir=None if fcfg.checkpoint_dir is None else Path(fcfg.checkpoint_dir) / name,
            stats_noise_multiplier=fcfg.stats_noise_multiplier,
            stats_clip=fcfg.stats_clip,
            **federation_settings(cfg, prepared, name, verbose, stream),
        )
        fed.fit()
        fed.result.config = {"method": name}  # its seconds are the rounds' own (`summarize`)
        federations[name] = fed
    return federations


def check_serve_settings(cfg: DictConfig) -> None:
    """Refuse the run-config keys that :func:`serve_method` cannot honour.

    The statistics are noised where they are computed: a server cannot add the noise its clients left out, so
    ``federation.stats_noise_multiplier`` and ``federation.stats_clip`` belong on each client's
    :class:`~lightning_fedharmony.FederatedClient`.

    Raises:
        ConfigError: naming the key, what ``serve`` expects and the value.
    """
    for key, off, shown in (("stats_noise_multiplier", 0.0, "0.0"), ("stats_clip", None, "null")):
        value = cfg.federation[key]
        if value != off:
            raise ConfigError(
                f"federation.{key}: expected {shown} with `fedharmony serve`, but got {value!r}. HINT: each client"
                f" noises its own statistics: set `{key}` on its `FederatedClient` callback."
            )


def serve_method(
    cfg: DictConfig,
    root: str | os.PathLike[str],
    method: str | None = None,
    prepared: FederatedData | None = None,
    verbose: bool = True,
    stream: TextIO | None = None,
    poll_interval: float = 0.05,
) -> tuple[str, Federation]:
    """Run one configured method as the server of clients in other processes that share the folder ``root``.

    The same :class:`~lightning_fedharmony.orchestrator.Federation` round loop as :func:`run_methods` (selection,
    retries, aggregation, evaluation on the test set, history), with a
    :class:`~lightning_fedharmony.transports.FolderTransport`: clients ``"0"`` .. ``"K-1"`` (``partition.num_clients``)
    answer through :class:`~lightning_fedharmony.FederatedClient`. The server checkpoints after every round into
    ``federation.checkpoint_dir/<method>`` (default ``<root>/server/<method>``): run the same command again after a
    crash and it resumes after the last finished round. A fresh run (no checkpoint) clears old messages in ``root``.

    Returns:
        The method's name and its finished federation.

    Raises:
        ConfigError: an unknown or ambiguous ``method``, or a configuration that cannot run.
    """
    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    names = list(cfg.methods.keys())
    if method is None:
        if len(names) != 1:
            raise ConfigError(f"--method: expected one of {names} (the configuration holds several), but got none.")
        method = names[0]
    if method not in names:
        raise ConfigError(f"--method: expected one of {names}, but got {method!r}.")
    check_serve_settings(cfg)
    aggregator = instantiate(cfg.methods[method], Aggregator, f"methods.{method}")
    prepared = prepared or prepare_data(cfg)
    fcfg = cfg.federation
    checkpoint_dir = Path(fcfg.checkpoint_dir if fcfg.checkpoint_dir is not None else Path(root) / "server") / method
    transport = FolderTransport(root, poll_interval=poll_interval)
    if not (checkpoint_dir / CHECKPOINT_NAME).exists():
        transport.mailbox.clear()
    client_ids = [str(k) for k in range(prepared.partition.num_clients)]
    log.info("serving %s to clients %s through %s", method, client_ids, os.fspath(root))
    # the clients' datamodules live in their processes: the server reads their sizes off the shared partition
    sizes = dict(zip(client_ids, prepared.partition.sizes.tolist()))
    fed = Federation(
        build_model(cfg, prepared),
        client_ids,
        aggregator,
        fcfg.num_rounds,
        transport=transport,
        checkpoint_dir=checkpoint_dir,
        client_sizes=sizes if fcfg.client_sampling == "size" else None,
        # the clients noise their own statistics (`FederatedClient(stats_noise_multiplier=...)`)
        **federation_settings(cfg, prepared, method, verbose, stream),
    )
    if verbose:
        print(
            f"== {method}: serving clients {', '.join(client_ids)} through {os.fspath(root)}", file=stream, flush=True
        )
    fed.fit()
    fed.result.config = {"method": method}
    return method, fed


def summarize(result: FederationResult) -> dict[str, float]:
    """Final and best mAP, the final round's other metrics, and the run's seconds."""
    final = result.final.metrics
    best = result.best("map")
    return {
        "final_map": final["map"],
        "best_map": best.metrics["map"],
        "best_round": float(best.server_round),
        "micro_map": final["micro_map"],
        "micro_f1": final["micro_f1"],
        "macro_f1": final["macro_f1"],
        "hamming_loss": final["hamming_loss"],
        "correlation_drift": final["correlation_drift"],
        "labels_without_positives": final["labels_without_positives"],
        "seconds": float(sum(r.seconds["total"] for r in result.rounds)),
    }


def markdown_table(rows: dict[str, dict[str, float]], columns: Sequence[tuple[str, str]] = TABLE_COLUMNS) -> str:
    """A markdown table, one row per method."""
    header = "| method | " + " | ".join(title for _, title in columns) + " |"
    rule = "|---|" + "---:|" * len(columns)
    lines = [header, rule]
    for name, row in rows.items():
        cells = [f"{row[key]:.1f}" if key == "seconds" else f"{row[key]:.4f}" for key, _ in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_outputs(cfg: DictConfig, prepared: FederatedData, federations: dict[str, Federation]) -> dict[str, Any]:
    """Write the resolved config, per-method histories (JSON, CSV), the summary (JSON, markdown) and pictures."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    summary = {name: summarize(fed.result) for name, fed in federations.items()}
    for name, fed in federations.items():
        fed.result.to_json(out / f"history_{name}.json")
        fed.result.to_csv(out / f"history_{name}.csv")
        fed.result.clients_to_csv(out / f"clients_{name}.csv")
    partition = prepared.partition.summary.as_dict() if prepared.partition.summary else {}
    report = {
        "dataset": cfg.data.name,
        "num_labels": prepared.train.num_labels,
        "num_train": prepared.train.num_samples,
        "num_test": prepared.test.num_samples,
        "partition": {"kind": cfg.partition.kind, **partition},
        "seed": cfg.seed,
        "methods": summary,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2))
    table = markdown_table(summary)
    (out / "results.md").write_text(table + "\n")
    pictures: list[str] = []
    if cfg.plots:
        pictures = write_pictures(out, federations)
    report["table"] = table
    report["pictures"] = pictures
    return report


def write_pictures(out: Path, federations: dict[str, Federation]) -> list[str]:
    """mAP per round per method, the FedHarmony consensus ordered by label block, and per method with per-client
    records a clients x rounds heatmap of the discrepancy beyond sampling noise (``clients_discrepancy_<name>.png``)
    and each client's validation mAP per round (``clients_map_<name>.png``) (PNG); [] without matplotlib."""
    try:
        from lightning_fedharmony.plots import (
            plot_client_curves,
            plot_client_heatmap,
            plot_consensus,
            plot_curves,
        )
    except ModuleNotFoundError:
        return []
    written = [plot_curves({name: fed.result for name, fed in federations.items()}, "map", out / "map_per_round.png")]
    for name, fed in federations.items():
        if any("discrepancy" in values for r in fed.result.rounds for values in r.client_metrics.values()):
            written.append(plot_client_heatmap(fed.result, out / f"clients_discrepancy_{name}.png", title=name))
        if any("val_map" in values for r in fed.result.rounds for values in r.client_metrics.values()):
            written.append(plot_client_curves(fed.result, "val_map", out / f"clients_map_{name}.png", title=name))
    for name, fed in federations.items():
        aggregator = fed.aggregator
        if (
            isinstance(aggregator, FedHarmony)
            and aggregator.consensus is not None
            and aggregator.cluster_ids is not None
        ):
            path = out / f"consensus_{name}.png"
            written.append(
                plot_consensus(aggregator.consensus, aggregator.cluster_ids, path, title=f"{name} consensus")
            )
    return [os.fspath(p) for p in written]


def disagreement_lines(name: str, result: FederationResult, top: int = 3, num_pairs: int = 3) -> list[str]:
    """A few plain lines naming the clients that disagree most with their teachers in the final round.

    Clients are ranked by their discrepancy beyond the sampling baseline (``s_k - b_k``); each line gives ``s_k``,
    the baseline, the aggregation weight and the label pairs where the client departs most from its teacher.

    Args:
        name: the method's name.
        result: its history.
        top: most clients named.
        num_pairs: most label pairs per client.

    Returns:
        The lines; empty when the final round holds no discrepancy (aggregators outside the FedHarmony family).
    """
    if not result.rounds:
        return []
    final = result.final
    scored = {cid: v for cid, v in final.client_metrics.items() if "discrepancy" in v and "sampling_discrepancy" in v}
    if not scored:
        return []
    ranked = sorted(scored, key=lambda c: scored[c]["sampling_discrepancy"] - scored[c]["discrepancy"])
    beyond = [c for c in ranked if scored[c]["discrepancy"] > scored[c]["sampling_discrepancy"]]
    lines = [f"{name}, round {final.server_round}: clients that disagree most with their teachers"]
    if not beyond:
        c = ranked[0]
        lines.append(
            f"  no client beyond its sampling baseline; closest: client {c}, s={scored[c]['discrepancy']:.3g}"
            f" (sampling {scored[c]['sampling_discrepancy']:.3g})"
        )
        return lines
    for position, cid in enumerate(beyond[:top]):
        values = scored[cid]
        lead = f"client {cid} disagrees most" if position == 0 else f"client {cid}"
        line = (
            f"  {lead}: s={values['discrepancy']:.3g} (sampling {values['sampling_discrepancy']:.3g}),"
            f" weight {values.get('weight', final.client_weights.get(cid, float('nan'))):.3g}"
        )
        pairs = final.client_pairs.get(cid, [])[:num_pairs]
        if pairs:
            line += "; pairs: " + "; ".join(f"({a}, {b}) {rk:.2f} vs teacher {rt:.2f}" for a, b, rk, rt in pairs)
        lines.append(line)
    return lines
