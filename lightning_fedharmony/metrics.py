"""Multi-label evaluation of the global model: the paper's metric table plus label correlation drift.

FedHarmony (Kou et al., CVPR 2026, https://arxiv.org/abs/2604.28024) reports mAP, O-mAP, CP, CR, CF1, OP, OR, OF1
and Hamming loss. :class:`MultilabelReport` computes all of them, macro- and micro-F1, and the correlation drift
between the model's predictions and the labels, from state that is summed (counts, float64 moments) or concatenated
(scores for the exact average precision). Metrics over several clients' data merged with ``Metric.merge_state``
therefore equal one pass over the union: global scores are never averages of per-client scores.

Following torchmetrics, the math is split into ``_multilabel_report_arg_validation`` / ``_tensor_validation`` /
``_format`` / ``_update`` / ``_compute``, reused by both the class and :func:`evaluate_multilabel`.

Conventions (so that no result is ever NaN):

- A prediction is positive when ``preds > threshold`` (as in torchmetrics).
- A ratio with a zero denominator is 0: precision without predicted positives, recall without positives, F1 when
  precision and recall are both 0, Hamming loss without observed entries, AP when no label has a positive.
- ``cp``, ``cr`` and ``macro_f1`` average the per-label scores over all ``L`` labels (torchmetrics' and ML-GCN's
  macro average); ``cf1 = 2 cp cr / (cp + cr)`` (the F1 of the averages) differs from ``macro_f1`` (the average of
  the F1s). ``micro_f1`` is ``of1``.
- ``map`` averages the per-label AP over the labels with at least one observed positive only; the others are
  counted in ``labels_without_positives``. ``micro_map`` is the AP of all observed (sample, label) pairs flattened.
  AP is torchmetrics' exact (non-binned) average precision; tied scores form one threshold (as in scikit-learn).
- With an ``observed`` mask, unobserved entries are ignored by every metric. The correlation of a label pair is then
  taken over the samples where both labels are observed (pairwise-complete moments); pairs never observed together
  are left out of the drift.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision, multilabel_average_precision
from torchmetrics.utilities.data import dim_zero_cat

from lightning_fedharmony.functional.correlation import phi_from_moments

__all__ = ["REPORT_KEYS", "MultilabelReport", "evaluate_multilabel"]

#: Keys of the report, in order.
REPORT_KEYS = (
    "map",
    "micro_map",
    "cp",
    "cr",
    "cf1",
    "op",
    "or",
    "of1",
    "macro_f1",
    "micro_f1",
    "hamming_loss",
    "correlation_drift",
    "labels_without_positives",
)

#: Summed states: per-label counts ``(L,)`` and float64 pairwise-complete moments ``(L, L)``.
_SUM_STATES = (
    "num_samples",
    "tp",
    "fp",
    "fn",
    "pair_count",
    "pred_sum_pair",
    "pred_outer",
    "target_sum_pair",
    "target_outer",
)

#: Target value of unobserved entries in the concatenated state (torchmetrics' ``ignore_index``).
_IGNORE = -1


def _multilabel_report_arg_validation(num_labels: int, threshold: float, eps: float) -> None:
    """Validate the configuration."""
    if not (isinstance(num_labels, int) and not isinstance(num_labels, bool) and num_labels > 1):
        raise ValueError(f"Expected argument `num_labels` to be an int larger than 1, but got {num_labels!r}.")
    if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and 0.0 <= threshold <= 1.0):
        raise ValueError(f"Expected argument `threshold` to be a float in the [0, 1] range, but got {threshold!r}.")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"Expected argument `eps` to be a positive float, but got {eps!r}.")


def _multilabel_report_tensor_validation(
    preds: Tensor, target: Tensor, num_labels: int | None, observed: Tensor | None = None
) -> None:
    """Validate one batch: shapes ``(N, L)``, probabilities in ``[0, 1]``, 0/1 targets where observed."""
    for name, value in (("preds", preds), ("target", target), ("observed", observed)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"Expected argument `{name}` to be a torch.Tensor, but got {type(value).__name__}.")
    if preds.ndim != 2:
        raise ValueError(f"Expected argument `preds` to be of shape (N, L), but got shape {tuple(preds.shape)}.")
    if num_labels is not None and preds.shape[1] != num_labels:
        raise ValueError(
            f"Expected `preds.shape[1]` to be equal to the number of labels {num_labels}, but got {preds.shape[1]}."
        )
    if target.shape != preds.shape:
        raise ValueError(
            "Expected `preds` and `target` to have the same shape, but got"
            f" {tuple(preds.shape)} and {tuple(target.shape)}."
        )
    if observed is not None:
        if observed.dtype != torch.bool:
            raise ValueError(f"Expected argument `observed` to be a bool tensor, but got dtype {observed.dtype}.")
        if observed.shape != preds.shape:
            raise ValueError(
                "Expected `observed` to have the shape of `preds`, but got"
                f" {tuple(observed.shape)} and {tuple(preds.shape)}."
            )
    if not preds.is_floating_point():
        raise ValueError(f"Expected argument `preds` to be a floating point tensor, but got dtype {preds.dtype}.")
    if preds.numel() and not bool(((preds >= 0) & (preds <= 1)).all()):
        low, high = preds.min().item(), preds.max().item()
        raise ValueError(
            f"Expected argument `preds` to hold probabilities in [0, 1], but got values in [{low}, {high}]."
            " HINT: apply `torch.sigmoid` to logits first."
        )
    if target.is_complex():
        raise ValueError(f"Expected argument `target` to be a real tensor, but got dtype {target.dtype}.")
    checked = target if observed is None else target[observed]
    bad = (checked != 0) & (checked != 1)
    if bool(bad.any()):
        values = torch.unique(checked[bad]).tolist()[:5]
        raise ValueError(
            f"Detected the following values in `target` where observed: {values}, but expected only 0 and 1."
            " HINT: mark missing labels with `observed` instead of a special value."
        )


def _multilabel_report_format(
    preds: Tensor, target: Tensor, observed: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Detach, and encode unobserved targets as ``-1``.

    Returns:
        ``preds`` ``(N, L)`` float, ``target`` ``(N, L)`` int8 in ``{-1, 0, 1}``, ``observed`` ``(N, L)`` bool.
    """
    preds = preds.detach()
    if observed is None:
        observed = torch.ones_like(preds, dtype=torch.bool)
    target = torch.where(observed, target.detach(), torch.zeros((), dtype=target.dtype, device=target.device))
    target = target.to(torch.int8).masked_fill(~observed, _IGNORE)
    return preds, target, observed


def _multilabel_report_update(
    preds: Tensor, target: Tensor, observed: Tensor, threshold: float = 0.5
) -> dict[str, Tensor]:
    """Summable statistics of one batch (keys :data:`_SUM_STATES`).

    Args:
        preds: ``(N, L)`` probabilities.
        target: ``(N, L)`` in ``{-1, 0, 1}`` (``-1`` unobserved), from :func:`_multilabel_report_format`.
        observed: ``(N, L)`` bool.
        threshold: a prediction above it is positive.

    Returns:
        ``num_samples`` (scalar), ``tp``/``fp``/``fn`` ``(L,)`` long over observed entries, and float64 ``(L, L)``
        pairwise-complete moments: ``pair_count[c, d]`` samples with both labels observed, ``*_sum_pair[c, d]`` the
        sum of label ``c``'s value over them, ``*_outer[c, d]`` the sum of the products.
    """
    hard = preds > threshold
    positive = target == 1
    negative = target == 0
    obs = observed.to(torch.float64)
    soft = torch.where(observed, preds.to(torch.float64), 0.0)
    labels = positive.to(torch.float64)
    return {
        "num_samples": torch.tensor(preds.shape[0], dtype=torch.long, device=preds.device),
        "tp": (hard & positive).sum(0),
        "fp": (hard & negative).sum(0),
        "fn": (~hard & positive).sum(0),
        "pair_count": obs.T @ obs,
        "pred_sum_pair": soft.T @ obs,
        "pred_outer": soft.T @ soft,
        "target_sum_pair": labels.T @ obs,
        "target_outer": labels.T @ labels,
    }


def _safe_ratio(numerator: Tensor, denominator: Tensor) -> Tensor:
    """``numerator / denominator`` in float64, 0 where the denominator is 0."""
    numerator, denominator = numerator.to(torch.float64), denominator.to(torch.float64)
    return torch.where(denominator > 0, numerator / denominator.clamp_min(1e-300), 0.0)


def _pairwise_phi(pair_count: Tensor, sum_pair: Tensor, outer: Tensor, eps: float) -> Tensor:
    """Bernoulli-normalised phi of each pair over the samples where both labels are observed.

    Entry ``(c, d)`` equals ``phi_from_moments`` of the two-label problem restricted to those samples; with every
    entry observed the whole matrix equals ``phi_from_moments(N, sum_preds, sum_outer)``.
    """
    safe_n = pair_count.clamp_min(1.0)
    p_row = sum_pair / safe_n
    p_col = sum_pair.T / safe_n
    cov = outer / safe_n - p_row * p_col
    std_row = (p_row * (1 - p_row)).clamp_min(0).sqrt()
    std_col = (p_col * (1 - p_col)).clamp_min(0).sqrt()
    corr = (cov / (std_row * std_col + eps)).clamp(-1.0, 1.0)
    corr = torch.where(pair_count > 0, corr, 0.0)
    return corr.fill_diagonal_(1.0)


def _correlation_drift(sums: dict[str, Tensor], eps: float) -> Tensor:
    """Mean over off-diagonal pairs observed together of ``|phi(preds) - phi(target)|``."""
    pair_count = sums["pair_count"]
    num_labels = pair_count.shape[0]
    if bool((pair_count.diagonal() == sums["num_samples"]).all()):
        # every entry observed: the moments are the usual (N, sum, outer) ones
        n = sums["num_samples"].to(torch.float64)
        phi_preds = phi_from_moments(n, sums["pred_sum_pair"].diagonal(), sums["pred_outer"], eps=eps)
        phi_target = phi_from_moments(n, sums["target_sum_pair"].diagonal(), sums["target_outer"], eps=eps)
    else:
        phi_preds = _pairwise_phi(pair_count, sums["pred_sum_pair"], sums["pred_outer"], eps)
        phi_target = _pairwise_phi(pair_count, sums["target_sum_pair"], sums["target_outer"], eps)
    off_diagonal = ~torch.eye(num_labels, dtype=torch.bool, device=pair_count.device)
    pairs = off_diagonal & (pair_count > 0)
    drift = (phi_preds - phi_target).abs()[pairs]
    return drift.mean() if drift.numel() else drift.new_zeros(())


def _multilabel_report_compute(
    preds: Tensor, target: Tensor, sums: dict[str, Tensor], eps: float = 1e-6
) -> dict[str, Tensor]:
    """The report from the concatenated scores and the summed statistics.

    Args:
        preds: ``(N, L)`` probabilities of every sample seen.
        target: ``(N, L)`` in ``{-1, 0, 1}`` (``-1`` unobserved).
        sums: the statistics of :func:`_multilabel_report_update`, summed over batches (and clients).
        eps: added to the phi denominator.

    Returns:
        Dict with keys :data:`REPORT_KEYS`: float32 scalars, ``labels_without_positives`` a long scalar.
    """
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    has_positive = (target == 1).any(0)
    labels_without_positives = (~has_positive).sum()
    kept = has_positive.nonzero().flatten()
    if kept.numel():
        # labels without positives get AP 0 (with a warning) from torchmetrics: leave them out beforehand
        per_label_ap = multilabel_average_precision(
            preds[:, kept],
            target[:, kept],
            num_labels=int(kept.numel()),
            average=None,
            thresholds=None,
            ignore_index=_IGNORE,
            validate_args=False,
        )
        mean_ap = per_label_ap.to(torch.float64).mean()
        observed = target != _IGNORE
        micro_ap = binary_average_precision(preds[observed], target[observed], thresholds=None, validate_args=False)
    else:
        mean_ap = micro_ap = torch.zeros((), dtype=torch.float64, device=tp.device)

    precision = _safe_ratio(tp, tp + fp)
    recall = _safe_ratio(tp, tp + fn)
    cp, cr = precision.mean(), recall.mean()
    op = _safe_ratio(tp.sum(), (tp + fp).sum())
    o_r = _safe_ratio(tp.sum(), (tp + fn).sum())
    of1 = _safe_ratio(2 * tp.sum(), (2 * tp + fp + fn).sum())
    num_observed = sums["pair_count"].diagonal().sum()
    report = {
        "map": mean_ap,
        "micro_map": micro_ap,
        "cp": cp,
        "cr": cr,
        "cf1": _safe_ratio(2 * cp * cr, cp + cr),
        "op": op,
        "or": o_r,
        "of1": of1,
        "macro_f1": _safe_ratio(2 * tp, 2 * tp + fp + fn).mean(),
        "micro_f1": of1,
        "hamming_loss": _safe_ratio((fp + fn).sum(), num_observed),
        "correlation_drift": _correlation_drift(sums, eps),
    }
    out = {key: value.to(device=tp.device, dtype=torch.float32) for key, value in report.items()}
    out["labels_without_positives"] = labels_without_positives.to(torch.long)
    return out


def evaluate_multilabel(
    preds: Tensor,
    target: Tensor,
    observed: Tensor | None = None,
    *,
    threshold: float = 0.5,
    eps: float = 1e-6,
) -> dict[str, float]:
    """Multi-label report of one set of predictions, as plain Python numbers.

    Args:
        preds: ``(N, L)`` probabilities in ``[0, 1]``.
        target: ``(N, L)`` 0/1 labels (any value where not observed).
        observed: optional ``(N, L)`` bool; unobserved entries are ignored by every metric.
        threshold: a prediction above it is positive.
        eps: added to the phi denominator of the correlation drift.

    Returns:
        Dict with the keys of :class:`MultilabelReport`; ``labels_without_positives`` is an int, the rest floats.

    Raises:
        ValueError: on a bad configuration, shape, dtype or value.
        TypeError: if an input is not a tensor.

    Example:
        >>> import torch
        >>> preds = torch.tensor([[0.9, 0.2], [0.3, 0.8], [0.6, 0.1]])
        >>> target = torch.tensor([[1, 0], [0, 1], [1, 0]])
        >>> report = evaluate_multilabel(preds, target)
        >>> report["map"], report["of1"], report["labels_without_positives"]
        (1.0, 1.0, 0)
    """
    _multilabel_report_tensor_validation(preds, target, None, observed)
    if preds.shape[1] < 2:
        raise ValueError(f"Expected `preds` to have more than one label column, but got shape {tuple(preds.shape)}.")
    _multilabel_report_arg_validation(preds.shape[1], threshold, eps)
    preds, target, observed = _multilabel_report_format(preds, target, observed)
    sums = _multilabel_report_update(preds, target, observed, threshold)
    report = _multilabel_report_compute(preds, target, sums, eps)
    return {
        key: int(value.item()) if key == "labels_without_positives" else float(value.item())
        for key, value in report.items()
    }


class MultilabelReport(Metric):
    """Multi-label metrics of the paper's table (mAP, O-mAP, CP/CR/CF1, OP/OR/OF1, Hamming), F1s and correlation drift.

    Counts and float64 correlation moments are sum states; scores and targets for the exact average precision are
    ``cat`` states. ``merge_state`` of metrics updated on disjoint data (e.g. clients) therefore gives exactly the
    metrics of one pass over the union, and distributed sync works as for any torchmetrics metric. See the module
    docstring for the conventions on empty denominators, labels without positives and the ``observed`` mask.

    Args:
        num_labels: number of labels ``L`` (larger than 1).
        threshold: a probability above it is a positive prediction (count-based metrics).
        eps: added to the phi denominator (see :func:`~lightning_fedharmony.functional.phi_from_moments`).
        validate_args: check every batch in ``update``; ``False`` skips the (synchronising) checks.
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``, ``process_group``).

    Raises:
        ValueError: on a bad ``num_labels``, ``threshold`` or ``eps``.

    Example:
        >>> import torch
        >>> metric = MultilabelReport(num_labels=3)
        >>> preds = torch.tensor([[0.9, 0.2, 0.7], [0.3, 0.8, 0.6], [0.6, 0.1, 0.2]])
        >>> target = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 0, 0]])
        >>> metric.update(preds, target)
        >>> report = metric.compute()
        >>> sorted(report)[:4]
        ['cf1', 'correlation_drift', 'cp', 'cr']
        >>> report["map"].item(), round(report["op"].item(), 4)
        (1.0, 0.8)
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    preds: list[Tensor]
    target: list[Tensor]
    num_samples: Tensor
    tp: Tensor
    fp: Tensor
    fn: Tensor
    pair_count: Tensor
    pred_sum_pair: Tensor
    pred_outer: Tensor
    target_sum_pair: Tensor
    target_outer: Tensor

    def __init__(
        self,
        num_labels: int,
        threshold: float = 0.5,
        *,
        eps: float = 1e-6,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _multilabel_report_arg_validation(num_labels, threshold, eps)
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.eps = float(eps)
        self.validate_args = validate_args
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("num_samples", default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(num_labels, dtype=torch.long), dist_reduce_fx="sum")
        for name in _SUM_STATES[4:]:
            self.add_state(name, default=torch.zeros(num_labels, num_labels, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor, observed: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            preds: ``(N, L)`` probabilities in ``[0, 1]``.
            target: ``(N, L)`` 0/1 labels (bool, int or float); any value where not observed.
            observed: optional ``(N, L)`` bool, ``False`` where the label is missing.

        Raises:
            ValueError: on a bad shape, dtype or value (with ``validate_args``).
            TypeError: if an input is not a tensor (with ``validate_args``).
        """
        if self.validate_args:
            _multilabel_report_tensor_validation(preds, target, self.num_labels, observed)
        preds, target, observed = _multilabel_report_format(preds, target, observed)
        sums = _multilabel_report_update(preds, target, observed, self.threshold)
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value)
        self.preds.append(preds)
        self.target.append(target)

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another report's state (e.g. another client's): the result equals one pass over both data sets.

        Args:
            incoming_state: a :class:`MultilabelReport` or its ``metric_state`` dict.
        """
        super().merge_state(incoming_state)
        # torchmetrics keeps the result of an earlier `compute()` cached across `merge_state`
        self._computed = None

    def compute(self) -> dict[str, Tensor]:
        """The report over everything seen since the last reset.

        Returns:
            Dict with keys ``"map"``, ``"micro_map"``, ``"cp"``, ``"cr"``, ``"cf1"``, ``"op"``, ``"or"``, ``"of1"``,
            ``"macro_f1"``, ``"micro_f1"``, ``"hamming_loss"``, ``"correlation_drift"`` (float32 scalars) and
            ``"labels_without_positives"`` (long scalar).
        """
        device = self.tp.device
        # a list until synced or merged, possibly a tensor after
        if not isinstance(self.preds, list) or self.preds:
            preds, target = dim_zero_cat(self.preds), dim_zero_cat(self.target)
        else:
            preds = torch.zeros(0, self.num_labels, device=device)
            target = torch.zeros(0, self.num_labels, dtype=torch.int8, device=device)
        sums = {name: getattr(self, name) for name in _SUM_STATES}
        return _multilabel_report_compute(preds, target, sums, self.eps)
