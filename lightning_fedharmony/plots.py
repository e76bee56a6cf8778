"""Pictures of a run (needs the ``plots`` extra: matplotlib)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ModuleNotFoundError as err:  # pragma: no cover - exercised only without the extra
    raise ModuleNotFoundError("Pictures need matplotlib. HINT: pip install 'lightning-fedharmony[plots]'.") from err

from lightning_fedharmony.orchestrator import FederationResult


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
