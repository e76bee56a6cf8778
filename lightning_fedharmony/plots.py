"""Pictures of a run (needs the ``plots`` extra: matplotlib)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError("Pictures need matplotlib. HINT: pip install 'lightning-fedharmony[plots]'.") from err

from lightning_fedharmony.results import FederationResult


def plot_curves(results: Mapping[str, FederationResult], metric: str, path: str | os.PathLike[str]) -> Path:
    """One line per method: ``metric`` of the global model per round."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    for name, result in results.items():
        points = result.curve(metric)
        if points:
            rounds, values = zip(*points)
            ax.plot(rounds, values, marker="o", markersize=2.5, linewidth=1.4, label=name)
    ax.set_xlabel("round")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} of the global model per round")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_consensus(consensus: Tensor, cluster_ids: Tensor, path: str | os.PathLike[str], title: str = "") -> Path:
    """Heatmap of the consensus correlation with labels ordered by block, block borders drawn."""
    order = torch.argsort(cluster_ids, stable=True)
    matrix = consensus[order][:, order].detach().cpu().double()
    # the diagonal is 1 by definition: leave it blank and scale the colours to the off-diagonal values, which the
    # paper's soft phi keeps small (prediction confidence attenuates it)
    matrix.fill_diagonal_(float("nan"))
    off = matrix[~torch.isnan(matrix)]
    scale = max(float(off.abs().max()) if off.numel() else 1.0, 1e-6)
    fig, ax = plt.subplots(figsize=(5.6, 4.8), dpi=120)
    image = ax.imshow(matrix.numpy(), cmap="RdBu_r", vmin=-scale, vmax=scale)
    sizes = torch.bincount(cluster_ids).tolist()
    edge = -0.5
    for size in sizes[:-1]:
        edge += size
        ax.axhline(edge, color="black", linewidth=0.8)
        ax.axvline(edge, color="black", linewidth=0.8)
    ax.set_title(title or "consensus label correlation")
    ax.set_xlabel(f"labels ordered by block ({len(sizes)} block{'s' if len(sizes) != 1 else ''}); diagonal blank")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _client_grid(result: FederationResult, value: str) -> tuple[list[str], list[int], np.ndarray]:
    """Clients (numeric ids in numeric order), rounds and a ``(clients, rounds)`` array of ``value`` (NaN where
    absent)."""
    seen = {cid for record in result.rounds for cid in record.client_metrics}
    clients = sorted(seen, key=lambda cid: (0, int(cid), "") if cid.isdigit() else (1, 0, cid))
    rounds = [r.server_round for r in result.rounds]
    grid = np.full((len(clients), len(rounds)), np.nan)
    row = {cid: i for i, cid in enumerate(clients)}
    for j, record in enumerate(result.rounds):
        for cid, values in record.client_metrics.items():
            if value == "excess_discrepancy":
                if "discrepancy" in values and "sampling_discrepancy" in values:
                    grid[row[cid], j] = values["discrepancy"] - values["sampling_discrepancy"]
            elif value in values:
                grid[row[cid], j] = values[value]
    return clients, rounds, grid


def _thin_ticks(count: int, most: int = 20) -> list[int]:
    step = max(1, int(np.ceil(count / most)))
    return list(range(0, count, step))


def plot_client_heatmap(
    result: FederationResult,
    path: str | os.PathLike[str],
    value: str = "excess_discrepancy",
    title: str = "",
) -> Path:
    """Clients x rounds heatmap of a per-client value; by default the discrepancy beyond its sampling baseline
    ``s_k - b_k`` (red: a client departs from its teacher more than sampling noise explains). Rounds a client sat
    out are blank; with many clients only every n-th client is labelled."""
    clients, rounds, grid = _client_grid(result, value)
    height = float(np.clip(1.2 + 0.28 * len(clients), 3.0, 9.0))
    fig, ax = plt.subplots(figsize=(max(5.0, min(12.0, 2.5 + 0.18 * len(rounds))), height), dpi=120)
    finite = grid[np.isfinite(grid)]
    scale = max(float(np.abs(finite).max()) if finite.size else 1.0, 1e-12)
    diverging = value == "excess_discrepancy"
    cmap = plt.get_cmap("RdBu_r" if diverging else "viridis").with_extremes(bad="#dddddd")
    image = ax.imshow(
        np.ma.masked_invalid(grid),
        aspect="auto",
        interpolation="nearest",
        cmap=cmap,
        vmin=-scale if diverging else None,
        vmax=scale if diverging else None,
    )
    yticks = _thin_ticks(len(clients), 25)
    ax.set_yticks(yticks, [clients[i] for i in yticks], fontsize=8 if len(clients) <= 25 else 6)
    xticks = _thin_ticks(len(rounds), 15)
    ax.set_xticks(xticks, [str(rounds[i]) for i in xticks], fontsize=8)
    ax.set_xlabel("round")
    ax.set_ylabel("client")
    label = {
        "excess_discrepancy": "discrepancy beyond sampling noise (s_k - b_k)",
        "discrepancy": "discrepancy s_k (mean squared gap to teacher)",
    }.get(value, value)
    ax.set_title(f"{title + ': ' if title else ''}{label}", fontsize=10)
    bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_client_curves(
    result: FederationResult, value: str = "val_map", path: str | os.PathLike[str] = "clients.png", title: str = ""
) -> Path:
    """One line per client: a per-client value per round (default the global model's mAP on the client's validation
    split). Up to 12 clients get a legend; with more, every client is a thin grey line under the median and the
    10-90% band over clients."""
    clients, rounds, grid = _client_grid(result, value)
    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=120)
    x = np.asarray(rounds)
    if len(clients) <= 12:
        for i, cid in enumerate(clients):
            seen = np.isfinite(grid[i])
            ax.plot(x[seen], grid[i][seen], marker="o", markersize=2.0, linewidth=1.1, label=f"client {cid}")
        if clients:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    else:
        for i in range(len(clients)):
            seen = np.isfinite(grid[i])
            ax.plot(x[seen], grid[i][seen], color="grey", alpha=0.25, linewidth=0.6)
        with warnings.catch_warnings():  # a round nobody was evaluated in gives an all-NaN column
            warnings.simplefilter("ignore", RuntimeWarning)
            low, mid, high = np.nanpercentile(grid, [10, 50, 90], axis=0)
        ax.fill_between(x, low, high, color="tab:blue", alpha=0.2, label="10-90% of clients")
        ax.plot(x, mid, color="tab:blue", linewidth=1.8, label=f"median of {len(clients)} clients")
        ax.legend(fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    label = "mAP on the client's validation split" if value == "val_map" else value
    ax.set_ylabel(label)
    ax.set_title(f"{title + ': ' if title else ''}global model, {label}, per client", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
