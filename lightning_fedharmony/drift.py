"""Label-correlation drift of a partition, measured from the clients' labels before any training.

FedHarmony (https://arxiv.org/abs/2604.28024) pays off when the clients' label correlations disagree: its teachers
pull each client towards the other clients' consensus and its weights favour clients that agree. This module asks,
from the labels alone, whether a partition has such disagreement beyond what sampling noise gives. Per client:

- ``R_k``: the correlation (phi) of its 0/1 labels (:class:`~lightning_fedharmony.stats.CorrelationStats` with the
  labels as predictions; labels it does not observe or that are constant on it are invalid);
- ``R*_k``: its leave-one-out consensus from the other clients, sample-weighted
  (:func:`~lightning_fedharmony.functional.consensus_sums`,
  :func:`~lightning_fedharmony.functional.leave_one_out_teacher`);
- ``s_k``: the mean squared gap over the pairs both sides support
  (:func:`~lightning_fedharmony.functional.correlation_discrepancy`), and ``b_k``, what sampling noise alone would
  give (:func:`~lightning_fedharmony.functional.aggregation.sampling_discrepancy`); ``s_k - b_k`` is the drift.

The thresholds of the verdict are module constants, set from ``benchmarks/drift.py`` against
``benchmarks/quality.py``'s results.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lightning_fedharmony.functional.aggregation import correlation_discrepancy, sampling_discrepancy
from lightning_fedharmony.functional.consensus import consensus_sums, leave_one_out_teacher, pair_validity
from lightning_fedharmony.stats import CorrelationStats

#: A client is *beyond noise* when its discrepancy is at least this many times its sampling baseline.
BEYOND_NOISE_RATIO = 2.0
#: Verdict "likely to matter": the sample-weighted mean excess discrepancy ``s_k - b_k`` is at least this
#: (``0.01`` is a root-mean-square gap of 0.1 in phi beyond noise) ...
LIKELY_EXCESS = 0.01
#: ... and at least this share of the clients is beyond noise.
LIKELY_SHARE = 0.5
#: Verdict "unlikely to matter": the weighted mean excess discrepancy is below this (an RMS gap of about 0.03).
UNLIKELY_EXCESS = 0.001
#: Client sizes this many times apart (largest / smallest) get a note on size imbalance in the verdict.
SIZE_RATIO_NOTE = 10.0

VERDICTS = ("likely", "possible", "unlikely")


@dataclass(frozen=True, eq=False)
class LabelDrift:
    """Label-correlation drift of a partition (see the module docstring).

    Attributes:
        num_samples: ``(K,)`` samples per client.
        num_valid_labels: ``(K,)`` labels with support on each client (observed, not constant).
        num_pairs: ``(K,)`` label pairs each client's discrepancy averages over.
        discrepancy: ``(K,)`` ``s_k``.
        sampling_discrepancy: ``(K,)`` ``b_k``.
        excess: ``(K,)`` ``s_k - b_k`` (negative when a client agrees better than its sample size predicts).
        beyond_noise: ``(K,)`` bool, ``s_k >= BEYOND_NOISE_RATIO * b_k`` on at least one pair.
        weighted_excess: sample-weighted mean of ``s_k - b_k`` over the clients with a scored pair (about 0 when the
            clients differ by sampling noise only).
        share_beyond_noise: share of the clients with a scored pair that are beyond noise.
        size_ratio: largest / smallest client size (``inf`` with an empty client).
        mean_abs_phi: mean ``|phi|`` over the distinct label pairs of the pooled labels (how correlated they are).
        verdict: ``"likely"``, ``"possible"`` or ``"unlikely"``: whether FedHarmony's correlation terms are likely
            to matter on this partition.
    """

    num_samples: np.ndarray
    num_valid_labels: np.ndarray
    num_pairs: np.ndarray
    discrepancy: np.ndarray
    sampling_discrepancy: np.ndarray
    excess: np.ndarray
    beyond_noise: np.ndarray
    weighted_excess: float
    share_beyond_noise: float
    size_ratio: float
    mean_abs_phi: float
    verdict: str

    @property
    def num_clients(self) -> int:
        """Number of clients ``K``."""
        return int(self.num_samples.shape[0])

    def verdict_line(self) -> str:
        """One sentence: the verdict, the figures behind it and, with very unequal clients, a note on sizes."""
        scored = int((self.num_pairs > 0).sum())
        beyond = int(self.beyond_noise.sum())
        rms = math.sqrt(max(self.weighted_excess, 0.0))
        figures = (
            f"{beyond} of {scored} clients beyond sampling noise, weighted excess discrepancy"
            f" {self.weighted_excess:.4g} (an RMS phi gap of {rms:.3f} beyond noise)"
        )
        if self.verdict == "likely":
            line = f"FedHarmony's correlation terms are likely to matter: {figures}."
        elif self.verdict == "unlikely":
            line = (
                f"FedHarmony's correlation terms are unlikely to matter: {figures}; the clients' label correlations"
                " agree up to sampling noise, so expect results close to FedAvg's."
            )
        else:
            line = f"FedHarmony's correlation terms may matter: {figures}."
        if self.size_ratio >= SIZE_RATIO_NOTE:
            line += (
                f" Client sizes are up to {self.size_ratio:.0f}x apart: keep client size in the aggregation weights"
                ' (FedHarmony\'s defaults do; with `quality_aggregation=True` keep `quality_weighting="product"`).'
            )
        return line

    def as_dict(self) -> dict[str, Any]:
        """Plain Python values, for JSON."""
        return {
            "num_samples": self.num_samples.tolist(),
            "num_valid_labels": self.num_valid_labels.tolist(),
            "num_pairs": self.num_pairs.tolist(),
            "discrepancy": self.discrepancy.tolist(),
            "sampling_discrepancy": self.sampling_discrepancy.tolist(),
            "excess": self.excess.tolist(),
            "beyond_noise": self.beyond_noise.tolist(),
            "weighted_excess": self.weighted_excess,
            "share_beyond_noise": self.share_beyond_noise,
            "size_ratio": self.size_ratio if math.isfinite(self.size_ratio) else None,
            "mean_abs_phi": self.mean_abs_phi,
            "verdict": self.verdict,
            "verdict_line": self.verdict_line(),
        }


def drift_verdict(weighted_excess: float, share_beyond_noise: float) -> str:
    """``"likely"`` / ``"possible"`` / ``"unlikely"`` from the two summary figures and the module thresholds."""
    if weighted_excess >= LIKELY_EXCESS and share_beyond_noise >= LIKELY_SHARE:
        return "likely"
    if weighted_excess < UNLIKELY_EXCESS:
        return "unlikely"
    return "possible"


def label_drift(
    Y: np.ndarray | torch.Tensor,
    client_indices: Sequence[np.ndarray | Sequence[int]],
    observed: np.ndarray | torch.Tensor | None = None,
    *,
    min_label_rate: float = 1e-3,
    eps: float = 1e-6,
) -> LabelDrift:
    """Each client's label-correlation discrepancy from the other clients' consensus, and its sampling baseline.

    Args:
        Y: ``(N, L)`` 0/1 labels.
        client_indices: per client, its row indices into ``Y``.
        observed: ``(K, L)`` bool, the labels each client observes (``None``: all).
        min_label_rate: a label whose rate on a client is below this (or above ``1 - min_label_rate``) is invalid
            there (:meth:`~lightning_fedharmony.stats.CorrelationStats.valid_labels`).
        eps: the phi denominator's ``eps``.

    Returns:
        The :class:`LabelDrift`. A client with no scored pair (no two valid labels that another client supports
        too) has ``s_k = b_k = 0``, is not beyond noise and is left out of the summary figures.

    Raises:
        ValueError: on labels other than 0/1, no client, indices outside ``Y`` or an ``observed`` of the wrong
            shape.

    Example:
        >>> import numpy as np
        >>> Y = np.array([[1, 1], [0, 0]] * 50 + [[1, 0], [0, 1]] * 50)
        >>> drift = label_drift(Y, [np.arange(100), np.arange(100, 200)])
        >>> drift.discrepancy.round(2).tolist(), drift.verdict
        ([4.0, 4.0], 'likely')
    """
    labels = torch.as_tensor(np.asarray(Y), dtype=torch.float64)
    if labels.ndim != 2 or not bool(((labels == 0) | (labels == 1)).all()):
        raise ValueError(
            f"Expected argument `Y` to be an (N, L) array of 0/1 labels, but got shape {tuple(labels.shape)}."
        )
    num_rows, num_labels = labels.shape
    num_clients = len(client_indices)
    if num_clients == 0:
        raise ValueError("Expected argument `client_indices` to hold at least one client, but it is empty.")
    rows = [torch.as_tensor(np.asarray(idx, dtype=np.int64)) for idx in client_indices]
    for k, idx in enumerate(rows):
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= num_rows):
            raise ValueError(f"Expected client {k}'s indices to lie in [0, {num_rows}), but got {idx.tolist()[:5]}...")
    obs = torch.ones(num_clients, num_labels, dtype=torch.bool)
    if observed is not None:
        obs = torch.as_tensor(np.asarray(observed), dtype=torch.bool)
        if obs.shape != (num_clients, num_labels):
            raise ValueError(
                f"Expected argument `observed` to have shape {(num_clients, num_labels)}, but got {tuple(obs.shape)}."
            )

    corrs, valid, sizes = [], [], []
    for k, idx in enumerate(rows):
        stats = CorrelationStats(num_labels, min_label_rate=min_label_rate)
        if idx.numel():
            y = labels[idx] * obs[k]  # a client sees no value of a label it does not observe
            stats.update(y, target=y, observed=obs[k])
        # on 0/1 columns the Pearson and Bernoulli scales agree; Pearson is FedHarmony's default
        corrs.append(stats.compute(eps=eps, normalization="pearson"))
        valid.append(stats.valid_labels())
        sizes.append(float(idx.numel()))
    n = torch.tensor(sizes, dtype=torch.float64)
    valid_t = torch.stack(valid)
    numerator, denominator = consensus_sums(corrs, n, valid_t)
    off_diagonal = ~torch.eye(num_labels, dtype=torch.bool)

    discrepancy = np.zeros(num_clients)
    baseline = np.zeros(num_clients)
    num_pairs = np.zeros(num_clients, dtype=np.int64)
    for k in range(num_clients):
        teacher, support = leave_one_out_teacher(numerator, denominator, corrs[k], float(n[k]), valid_t[k])
        mask = support & pair_validity(valid_t[k]) & off_diagonal
        num_pairs[k] = int(mask.sum()) // 2
        if not num_pairs[k]:
            continue
        discrepancy[k] = float(correlation_discrepancy(corrs[k][None], teacher[None], mask)[0])
        # samples behind each pair of the teacher: the other clients that support it (fewer where labels are absent
        # or unobserved on some clients, which makes that pair's teacher noisier)
        teacher_samples = torch.addr(denominator, valid_t[k].double(), valid_t[k].double(), alpha=-float(n[k]))
        baseline[k] = _sampling_baseline(corrs[k], teacher, mask, float(n[k]), teacher_samples)
    excess = discrepancy - baseline
    scored = num_pairs > 0
    beyond = scored & (discrepancy >= BEYOND_NOISE_RATIO * baseline)
    weights = n.numpy() * scored
    weighted_excess = float(np.average(excess, weights=weights)) if weights.sum() > 0 else 0.0
    share = float(beyond[scored].mean()) if scored.any() else 0.0
    size_arr = n.numpy().astype(np.int64)
    size_ratio = float(size_arr.max() / size_arr.min()) if size_arr.min() > 0 else math.inf

    # context, not part of the verdict: how correlated the labels are at all, over every client's rows
    pooled = CorrelationStats(num_labels, min_label_rate=min_label_rate)
    union = labels[torch.cat(rows)]
    pooled.update(union, target=union)
    pooled_pairs = pair_validity(pooled.valid_labels()) & off_diagonal
    phi = pooled.compute(eps=eps, normalization="pearson")
    mean_abs_phi = float(phi.abs()[pooled_pairs].mean()) if bool(pooled_pairs.any()) else 0.0

    return LabelDrift(
        num_samples=size_arr,
        num_valid_labels=valid_t.sum(1).numpy().astype(np.int64),
        num_pairs=num_pairs,
        discrepancy=discrepancy,
        sampling_discrepancy=baseline,
        excess=excess,
        beyond_noise=beyond,
        weighted_excess=weighted_excess,
        share_beyond_noise=share,
        size_ratio=size_ratio,
        mean_abs_phi=mean_abs_phi,
        verdict=drift_verdict(weighted_excess, share),
    )


#: Most groups of pairs with distinct teacher sample counts the baseline is computed over; more are binned.
_MAX_GROUPS = 64


def _sampling_baseline(
    corr: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, n: float, teacher_samples: torch.Tensor
) -> float:
    """:func:`sampling_discrepancy` with a teacher sample count per pair: pairs grouped by that count (binned on a
    log scale, with the harmonic mean of the bin, when there are more than ``_MAX_GROUPS`` counts), one call per
    group, averaged with the groups' pair counts as weights."""
    counts = teacher_samples[mask]
    values = torch.unique(counts)
    if values.numel() > _MAX_GROUPS:
        edges = torch.logspace(
            math.log10(float(values.min())), math.log10(float(values.max())) + 1e-9, _MAX_GROUPS + 1, dtype=counts.dtype
        )
        bins = torch.bucketize(teacher_samples, edges).masked_fill_(~mask, -1)
    else:
        bins = torch.bucketize(teacher_samples, values).masked_fill_(~mask, -1)
    total, pairs = 0.0, 0
    for group in torch.unique(bins[mask]).tolist():
        in_group = bins == group
        size = int(in_group.sum())
        effective = float(1.0 / (1.0 / teacher_samples[in_group]).mean())  # harmonic mean: exact for one count
        base = sampling_discrepancy(corr[None], teacher[None], in_group, torch.tensor([n]), torch.tensor([effective]))
        total += float(base[0]) * size
        pairs += size
    return total / max(pairs, 1)


def drift_table(drift: LabelDrift, client_ids: Sequence[str] | None = None) -> str:
    """A markdown table, one row per client: size, valid labels, pairs, ``s_k``, ``b_k``, excess, ratio, beyond."""
    ids = list(client_ids) if client_ids is not None else [str(k) for k in range(drift.num_clients)]
    lines = [
        "| client | samples | labels | pairs | discrepancy | sampling | excess | ratio | beyond noise |",
        "|---|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for k, cid in enumerate(ids):
        s, b = drift.discrepancy[k], drift.sampling_discrepancy[k]
        ratio = f"{s / b:.2f}" if b > 0 else "-"
        lines.append(
            f"| {cid} | {drift.num_samples[k]} | {drift.num_valid_labels[k]} | {drift.num_pairs[k]} | {s:.4f} |"
            f" {b:.4f} | {drift.excess[k]:+.4f} | {ratio} | {'yes' if drift.beyond_noise[k] else 'no'} |"
        )
    return "\n".join(lines)


def drift_summary(drift: LabelDrift) -> str:
    """The overall figures in three lines, then the verdict line."""
    sizes = drift.num_samples
    ratio = f"{drift.size_ratio:.1f}x" if math.isfinite(drift.size_ratio) else "inf (an empty client)"
    return "\n".join(
        [
            f"clients {drift.num_clients}, sizes {int(sizes.min())}..{int(sizes.max())} (max/min {ratio});"
            f" mean |phi| of the pooled labels {drift.mean_abs_phi:.3f}",
            f"sample-weighted mean excess discrepancy (beyond sampling noise): {drift.weighted_excess:.4g}",
            f"clients clearly beyond noise (s >= {BEYOND_NOISE_RATIO:g} x sampling): {drift.share_beyond_noise:.0%}",
            drift.verdict_line(),
        ]
    )
