"""Mergeable sufficient statistics of a client's predictions."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_fedharmony.functional.correlation import Normalization, phi_from_moments

#: Tensors that make up the statistics, in the order they travel; all float64.
STATS_FIELDS = ("num_samples", "sum_preds", "sum_outer", "target_positives", "observed_count")


def _check_num_labels(num_labels: int) -> None:
    if not (isinstance(num_labels, int) and not isinstance(num_labels, bool) and num_labels >= 1):
        raise ValueError(f"Expected argument `num_labels` to be a positive int, but got {num_labels!r}.")


class CorrelationStats:
    """Sufficient statistics ``(N, sum_n F_n, sum_n F_n^T F_n)`` of predictions, plus per-label support counts.

    Sums are exact in float64, so statistics merged over batches, epochs or clients give exactly the correlation of
    the pooled predictions (METHOD.md section 1).

    Args:
        num_labels: number of labels ``L``.
        min_label_rate: a label whose mean prediction is below this rate (or above ``1 - min_label_rate``) is invalid:
            its correlations carry no information.
        clip: scale each sample's prediction vector to L2 norm at most this before adding it (bounds one sample's
            influence for :func:`~lightning_fedharmony.privacy.privatize_stats`); ``None``: no clipping.

    Example:
        >>> import torch
        >>> stats = CorrelationStats(num_labels=2)
        >>> stats.update(torch.tensor([[0.9, 0.8], [0.1, 0.2]]), target=torch.tensor([[1, 1], [0, 0]]))
        >>> stats.compute()[0, 1].item()
        0.47999...
        >>> stats.valid_labels().tolist()
        [True, True]
    """

    def __init__(self, num_labels: int, *, min_label_rate: float = 1e-3, clip: float | None = None) -> None:
        _check_num_labels(num_labels)
        if not 0.0 <= min_label_rate < 0.5:
            raise ValueError(f"Expected argument `min_label_rate` to be in [0, 0.5), but got {min_label_rate!r}.")
        if clip is not None and not clip > 0:
            raise ValueError(f"Expected argument `stats_clip` to be None or > 0, but got {clip!r}.")
        self.num_labels = num_labels
        self.min_label_rate = min_label_rate
        self.clip = clip
        self.reset()

    def reset(self) -> None:
        """Forget every update."""
        num_labels = self.num_labels
        self.num_samples = torch.zeros((), dtype=torch.float64)
        self.sum_preds = torch.zeros(num_labels, dtype=torch.float64)
        self.sum_outer = torch.zeros(num_labels, num_labels, dtype=torch.float64)
        self.target_positives = torch.zeros(num_labels, dtype=torch.float64)
        self.observed_count = torch.zeros(num_labels, dtype=torch.float64)

    @torch.no_grad()
    def update(self, preds: Tensor, target: Tensor | None = None, observed: Tensor | None = None) -> None:
        """Add a batch.

        Args:
            preds: ``(N, L)`` probabilities.
            target: optional ``(N, L)`` 0/1 targets; counts positives per label (a label never positive is invalid).
            observed: optional ``(N, L)`` or ``(L,)`` bool, which label entries the client observes; unobserved
                entries count neither as positives nor as observations.
        """
        if preds.ndim != 2 or preds.shape[1] != self.num_labels:
            raise ValueError(
                f"Expected argument `preds` to have shape (N, {self.num_labels}), but got {tuple(preds.shape)}."
            )
        if target is not None and target.shape != preds.shape:
            raise ValueError(
                f"Expected argument `target` to have the shape of `preds` {tuple(preds.shape)},"
                f" but got {tuple(target.shape)}."
            )
        p = preds.detach().to(device="cpu", dtype=torch.float64)
        if self.clip is not None:
            norms = p.norm(dim=1, keepdim=True)
            p = p * (self.clip / norms.clamp_min(self.clip)).clamp_max(1.0)
        obs = torch.ones_like(p, dtype=torch.bool) if observed is None else observed.detach().cpu().bool()
        obs = torch.broadcast_to(obs, p.shape)
        self.num_samples += p.shape[0]
        self.sum_preds += p.sum(0)
        self.sum_outer += p.T @ p
        self.observed_count += obs.sum(0, dtype=torch.float64)
        if target is None:
            self.target_positives += obs.sum(0, dtype=torch.float64)  # no targets: only observation counts
        else:
            self.target_positives += ((target.detach().cpu() > 0.5) & obs).sum(0, dtype=torch.float64)

    def merge(self, other: CorrelationStats) -> CorrelationStats:
        """Add another set of statistics of the same labels in place and return ``self``."""
        if other.num_labels != self.num_labels:
            raise ValueError(
                f"Expected statistics over {self.num_labels} labels to merge, but got {other.num_labels} labels."
            )
        for name in STATS_FIELDS:
            getattr(self, name).add_(getattr(other, name))
        return self

    def compute(
        self, eps: float = 1e-6, normalization: Normalization = "bernoulli", *, out: Tensor | None = None
    ) -> Tensor:
        """``(L, L)`` float64 soft phi correlation of everything seen (written into ``out`` when given)."""
        return phi_from_moments(
            self.num_samples, self.sum_preds, self.sum_outer, eps=eps, normalization=normalization, out=out
        )

    def valid_labels(self, min_label_rate: float | None = None) -> Tensor:
        """``(L,)`` bool: labels observed, with at least one positive, and a mean prediction inside the valid rate
        (``min_label_rate`` overrides the statistics' own for this call)."""
        threshold = self.min_label_rate if min_label_rate is None else min_label_rate
        rate = self.sum_preds / self.num_samples.clamp_min(1.0)
        confident = (rate >= threshold) & (rate <= 1.0 - threshold)
        return (self.observed_count > 0) & (self.target_positives > 0) & confident & (self.num_samples > 0)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors (``torch.load(..., weights_only=True)`` safe)."""
        return {name: getattr(self, name).clone() for name in STATS_FIELDS}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Load what :meth:`state_dict` returned, validating names, shapes and values."""
        validate_stats_state(state, self.num_labels)
        for name in STATS_FIELDS:
            setattr(self, name, state[name].detach().to(device="cpu", dtype=torch.float64).clone())

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Tensor], *, min_label_rate: float = 1e-3) -> CorrelationStats:
        """Build statistics from a state dict, inferring ``L``."""
        if "sum_preds" not in state or getattr(state["sum_preds"], "ndim", None) != 1:
            raise ValueError(
                "Expected statistics with a `sum_preds` entry of shape (L,), but it is missing or not 1-D."
            )
        stats = cls(int(state["sum_preds"].shape[0]), min_label_rate=min_label_rate)
        stats.load_state_dict(state)
        return stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_labels={self.num_labels}, num_samples={int(self.num_samples)})"


def validate_stats_state(state: Mapping[str, Tensor], num_labels: int | None = None) -> int:
    """Check a statistics state dict; return its label count.

    Raises:
        ValueError: naming the entry that is missing, of the wrong shape or dtype, or not finite and non-negative.
    """
    missing = [name for name in STATS_FIELDS if name not in state]
    if missing:
        raise ValueError(f"Expected statistics entries {list(STATS_FIELDS)}, but {missing} are missing.")
    for name in STATS_FIELDS:
        if not isinstance(state[name], Tensor):
            raise ValueError(
                f"Expected statistics entry `{name}` to be a tensor, but got {type(state[name]).__name__}."
            )
    labels = int(state["sum_preds"].shape[0]) if state["sum_preds"].ndim == 1 else -1
    if num_labels is not None and labels != num_labels:
        raise ValueError(
            f"Expected statistics over {num_labels} labels, but got shape {tuple(state['sum_preds'].shape)}."
        )
    if labels < 1:
        raise ValueError(
            f"Expected statistics entry `sum_preds` to have shape (L,) with L >= 1, but got"
            f" {tuple(state['sum_preds'].shape)}."
        )
    shapes = {
        "num_samples": (),
        "sum_preds": (labels,),
        "sum_outer": (labels, labels),
        "target_positives": (labels,),
        "observed_count": (labels,),
    }
    for name, shape in shapes.items():
        tensor = state[name]
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"Expected statistics entry `{name}` to have shape {shape}, but got {tuple(tensor.shape)}."
            )
        if not tensor.is_floating_point():
            raise ValueError(f"Expected statistics entry `{name}` to be floating point, but got {tensor.dtype}.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"Expected statistics entry `{name}` to be finite, but it holds NaN or inf.")
    n = float(state["num_samples"])
    if n < 0:
        raise ValueError(f"Expected statistics entry `num_samples` to be non-negative, but got {n}.")
    sum_preds, sum_outer = state["sum_preds"], state["sum_outer"]
    tol = 1e-6 * max(n, 1.0)
    if (sum_preds < -tol).any() or (sum_preds > n + tol).any():
        raise ValueError("Expected statistics entry `sum_preds` to lie in [0, num_samples], but it does not.")
    if (sum_outer < -tol).any() or (sum_outer > n + tol).any():
        raise ValueError("Expected statistics entry `sum_outer` to lie in [0, num_samples], but it does not.")
    for name in ("target_positives", "observed_count"):
        if (state[name] < -tol).any() or (state[name] > n + tol).any():
            raise ValueError(f"Expected statistics entry `{name}` to lie in [0, num_samples], but it does not.")
    return labels
