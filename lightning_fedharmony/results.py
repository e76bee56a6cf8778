"""What a federation leaves behind: one :class:`RoundRecord` per round and the :class:`FederationResult` history,
written as JSON and CSV in the same form by every runner (``Federation``, ``fedharmony serve``, the Flower strategy)."""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from lightning_fedharmony.protocol import Update

if TYPE_CHECKING:
    from lightning_fedharmony.aggregators.base import AggregationResult
    from lightning_fedharmony.faults import UpdateCollector


@dataclass
class RoundRecord:
    """What happened in one round.

    Attributes:
        server_round: the round, counted from 1.
        clients: the selected clients.
        failures: client id -> reason, for clients that returned no usable update.
        client_weights: aggregation weight of each client that contributed.
        train_loss: clients' task loss over their local training, weighted by sample counts (``nan`` without the
            mixin).
        metrics: the global model's evaluation metrics after aggregation (empty if not evaluated this round): on the
            server's test data under the report's keys (``map``, ...), and the federated ones, merged from every
            client's held-out split, as ``fed_<key>`` (``fed_map``, ..., ``fed_num_samples``).
        server_metrics: the aggregator's scalars (e.g. number of label blocks).
        seconds: wall time of the round's phases: ``clients``, ``trainer_setup``, ``server``, ``eval``, ``total``.
        attempts: how many times the clients were trained this round (more than 1 after retries).
        client_metrics: per client that contributed: ``num_samples`` and ``weight`` (its aggregation weight); with
            FedHarmony also ``discrepancy`` (``s_k``, its correlation's mean squared gap to its leave-one-out
            teacher), ``sampling_discrepancy`` (what sampling noise alone would give) and ``quality`` (``q_k``); and
            ``val_map``, the mAP of this round's global model on the client's own validation split, on evaluated
            rounds when the client has one (absent otherwise); with federated evaluation every client that evaluated
            has its own metrics of the global model on its held-out split as ``val_<key>`` (``val_map``,
            ``val_micro_f1``, ..., ``val_num_samples``), contributor this round or not.
        client_pairs: per client that contributed (FedHarmony), up to five label pairs where its correlation departs
            most from its teacher, largest gap first: ``(label_a, label_b, client_corr, teacher_corr)`` with labels
            by name.
        eval_failures: client id -> reason, for clients whose federated evaluation failed this round.
    """

    server_round: int
    clients: list[str]
    failures: dict[str, str]
    client_weights: dict[str, float]
    train_loss: float
    metrics: dict[str, float]
    server_metrics: dict[str, float]
    seconds: dict[str, float]
    attempts: int = 1
    # newer fields keep defaults, so that histories and checkpoints written before them still load
    client_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    client_pairs: dict[str, list[tuple[str, str, float, float]]] = field(default_factory=dict)
    eval_failures: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoundRecord:
        """A record from :func:`dataclasses.asdict` output or its JSON (``null`` read back as ``nan``)."""
        fields = dict(data)
        if fields.get("train_loss") is None:
            fields["train_loss"] = float("nan")
        fields["client_metrics"] = {
            cid: {k: float("nan") if v is None else v for k, v in values.items()}
            for cid, values in fields.get("client_metrics", {}).items()
        }
        fields["client_pairs"] = {
            cid: [tuple(pair) for pair in pairs] for cid, pairs in fields.get("client_pairs", {}).items()
        }
        return cls(**fields)


#: The per-client detail of a :class:`RoundRecord` (scores and label pairs of each trained client): the bulk of what a
#: history gains per round x client (who trained and their weights stay with the round's summary).
CLIENT_FIELDS = ("client_metrics", "client_pairs")


@dataclass
class FederationResult:
    """Per-round history of a federation, writable as JSON and CSV."""

    rounds: list[RoundRecord] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> RoundRecord:
        """The last round."""
        if not self.rounds:
            raise RuntimeError("Expected at least one finished round, but the federation has none.")
        return self.rounds[-1]

    def best(self, metric: str = "map") -> RoundRecord:
        """The evaluated round with the highest ``metric`` (lowest for losses)."""
        scored = [r for r in self.rounds if metric in r.metrics]
        if not scored:
            raise KeyError(f"Expected a round evaluated with metric {metric!r}, but found none.")
        lower_is_better = "loss" in metric or "drift" in metric
        key = (lambda r: -r.metrics[metric]) if lower_is_better else (lambda r: r.metrics[metric])
        return max(scored, key=key)

    def curve(self, metric: str) -> list[tuple[int, float]]:
        """``(round, value)`` for every round evaluated with ``metric``."""
        return [(r.server_round, r.metrics[metric]) for r in self.rounds if metric in r.metrics]

    def to_dict(self, *, client_fields: bool = True) -> dict[str, Any]:
        """The history as plain values (a copy: what :func:`dataclasses.asdict` gives, several times faster on the
        per-client records of long runs with many clients); without ``client_fields``, the rounds leave out
        :data:`CLIENT_FIELDS`."""
        names = _RECORD_FIELDS if client_fields else tuple(n for n in _RECORD_FIELDS if n not in CLIENT_FIELDS)
        return {
            "config": _copy_plain(self.config),
            "rounds": [{name: _copy_plain(getattr(r, name)) for name in names} for r in self.rounds],
        }

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the whole history as strict JSON (a NaN, such as a loss never logged, becomes ``null``)."""
        Path(path).write_text(json.dumps(_strict(self.to_dict()), indent=2, default=_json_default, allow_nan=False))

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """One row per round: timings, train loss, evaluation and server metrics."""
        rows = []
        for r in self.rounds:
            row: dict[str, Any] = {
                "round": r.server_round,
                "num_clients": len(r.clients),
                "num_failures": len(r.failures),
                "train_loss": r.train_loss,
            }
            row.update({f"seconds_{k}": v for k, v in r.seconds.items()})
            row.update(r.metrics)
            row.update({f"server_{k}": v for k, v in r.server_metrics.items()})
            rows.append(row)
        columns: list[str] = []
        for row in rows:
            columns += [c for c in row if c not in columns]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    def clients_to_csv(self, path: str | os.PathLike[str]) -> None:
        """Long format, one row per round x contributing client: its sample count, aggregation weight, FedHarmony's
        scores (``discrepancy``, ``sampling_discrepancy``, their difference ``excess_discrepancy``, ``quality``), the
        global model's ``val_map`` on its validation split, and its top label pairs as ``a/b client vs teacher``
        (empty cells where a value does not exist)."""
        columns = ["round", "client", "num_samples", "weight"]
        rows = []
        for r in self.rounds:
            for cid, values in r.client_metrics.items():
                row: dict[str, Any] = {"round": r.server_round, "client": cid, **values}
                row["num_samples"] = int(values.get("num_samples", 0))
                if "discrepancy" in values and "sampling_discrepancy" in values:
                    row["excess_discrepancy"] = values["discrepancy"] - values["sampling_discrepancy"]
                pairs = r.client_pairs.get(cid)
                if pairs:
                    row["top_pairs"] = "; ".join(f"{a}/{b} {rk:.4f} vs {rt:.4f}" for a, b, rk, rt in pairs)
                rows.append(row)
                columns += [c for c in row if c not in columns]
        order = ("discrepancy", "sampling_discrepancy", "excess_discrepancy", "quality", "val_map", "top_pairs")
        columns = columns[:4] + [c for c in order if c in columns] + [c for c in columns[4:] if c not in order]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FederationResult:
        """The history from :meth:`to_dict` (or its JSON)."""
        return cls(rounds=[RoundRecord.from_dict(r) for r in data["rounds"]], config=dict(data.get("config", {})))

    @classmethod
    def from_json(cls, path: str | os.PathLike[str]) -> FederationResult:
        """Read what :meth:`to_json` wrote (histories written before the per-client fields load too)."""
        return cls.from_dict(json.loads(Path(path).read_text()))


_RECORD_FIELDS = tuple(f.name for f in fields(RoundRecord))


def _copy_plain(value: Any) -> Any:
    """A copy of nested dicts, lists and tuples; other values (numbers, str: immutable) are shared."""
    if isinstance(value, dict):
        return {k: _copy_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_plain(v) for v in value)
    return value


def _strict(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Tensor):
        return value.tolist()
    return str(value)


def round_record(
    server_round: int,
    clients: Sequence[str],
    collected: UpdateCollector,
    aggregated: AggregationResult,
    *,
    metrics: Mapping[str, float],
    times: tuple[float, float, float, float],
    attempts: int = 1,
    label_names: Sequence[str] | None = None,
    client_evaluations: Mapping[str, Mapping[str, float]] | None = None,
    eval_failures: Mapping[str, str] | None = None,
) -> RoundRecord:
    """The record of a finished round, built alike by every runner.

    Args:
        server_round: the round.
        clients: the selected clients.
        collected: the screened updates of the attempt that counted (failures, train loss, trainer setup time).
        aggregated: what the aggregator made of them.
        metrics: the global model's evaluation metrics (empty if not evaluated).
        times: ``perf_counter`` readings at the round's start, after the clients, after the server step and at the
            end, for :attr:`RoundRecord.seconds`.
        attempts: how many times the clients were trained this round.
        label_names: names of the labels in :attr:`RoundRecord.client_pairs` (``None``: ``label_<i>``).
        client_evaluations: each evaluating client's own metrics of the global model (``val_<key>``), joined to its
            entry of :attr:`RoundRecord.client_metrics`, contributor this round or not.
        eval_failures: client id -> reason, for clients whose federated evaluation failed.
    """
    t_start, t_clients, t_server, t_end = times
    client_metrics = client_round_metrics(collected.updates, aggregated.client_weights, aggregated.client_metrics)
    for cid, values in (client_evaluations or {}).items():
        client_metrics.setdefault(cid, {}).update(values)
    return RoundRecord(
        server_round=server_round,
        clients=list(clients),
        failures=collected.failures,
        client_weights=aggregated.client_weights,
        train_loss=collected.train_loss,
        metrics=dict(metrics),
        server_metrics=aggregated.metrics,
        seconds={
            "clients": t_clients - t_start,
            "trainer_setup": collected.setup_seconds,
            "server": t_server - t_clients,
            "eval": t_end - t_server,
            "total": t_end - t_start,
        },
        attempts=attempts,
        client_metrics=client_metrics,
        client_pairs={cid: named_pairs(pairs, label_names) for cid, pairs in aggregated.client_pairs.items()},
        eval_failures=dict(eval_failures or {}),
    )


def client_round_metrics(
    updates: Sequence[Update], weights: Mapping[str, float], scores: Mapping[str, Mapping[str, float]]
) -> dict[str, dict[str, float]]:
    """Per contributing client: ``num_samples``, ``weight`` and the aggregator's scores of it
    (:attr:`RoundRecord.client_metrics` before any evaluation); the same record wherever the server runs."""
    report: dict[str, dict[str, float]] = {}
    for update in updates:
        cid = update.client_id
        report[cid] = {"num_samples": float(update.num_samples), "weight": float(weights[cid])}
        report[cid].update({k: float(v) for k, v in scores.get(cid, {}).items() if k != "num_samples"})
    return report


def named_pairs(
    pairs: Sequence[tuple[int, int, float, float]], label_names: Sequence[str] | None = None
) -> list[tuple[str, str, float, float]]:
    """``(a, b, R_k, R*_k)`` label pairs with the labels by name (``label_<i>`` without names).

    Raises:
        ValueError: if ``label_names`` has no name for a label index in ``pairs``.
    """
    if label_names is not None and pairs:
        top = max(max(a, b) for a, b, _, _ in pairs)
        if top >= len(label_names):
            raise ValueError(
                f"Expected argument `label_names` to name every label of the model, but got {len(label_names)} names"
                f" and label index {top}."
            )
    return [(label_name(a, label_names), label_name(b, label_names), float(rk), float(rt)) for a, b, rk, rt in pairs]


def label_name(index: int, names: Sequence[str] | None = None) -> str:
    """``names[index]``, or ``label_<index>`` without names."""
    return f"label_{index}" if names is None else str(names[index])
