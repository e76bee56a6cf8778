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
  With ``bins`` set, AP is binned instead: summed counts of positives and negatives scoring at or above each of
  ``bins`` evenly spaced thresholds in ``[0, 1]`` (torchmetrics' ``thresholds=bins``), so a report's state holds
  no per-sample scores (the private option of federated evaluation).
- With an ``observed`` mask, unobserved entries are ignored by every metric. The correlation of a label pair is then
  taken over the samples where both labels are observed (pairwise-complete moments); pairs never observed together
  are left out of the drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_average_precision, multilabel_average_precision
from torchmetrics.functional.classification.average_precision import (
    _binary_average_precision_compute,
    _multilabel_average_precision_compute,
)
from torchmetrics.utilities.data import dim_zero_cat

from lightning_fedharmony.functional.correlation import phi_from_moments

__all__ = ["REPORT_KEYS", "MultilabelReport", "evaluate_multilabel", "validate_report_state"]

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

#: Summed states of the binned average precision: ``(bins, L)`` counts of positives / negatives scoring at or above
#: each threshold.
_BINNED_STATES = ("ap_positives", "ap_negatives")
#: Concatenated states of the exact average precision.
_CAT_STATES = ("preds", "target")

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


def _binned_ap_update(preds: Tensor, target: Tensor, bins: int) -> dict[str, Tensor]:
    """Summable counts of the binned average precision of one batch (keys :data:`_BINNED_STATES`).

    Args:
        preds: ``(N, L)`` probabilities.
        target: ``(N, L)`` in ``{-1, 0, 1}`` (``-1`` unobserved).
        bins: number of thresholds, evenly spaced in ``[0, 1]``.

    Returns:
        ``ap_positives`` and ``ap_negatives``, ``(bins, L)`` long: observed positives (negatives) with
        ``preds >= threshold``, per threshold and label.
    """
    grid = torch.linspace(0, 1, bins, device=preds.device)
    above = preds.unsqueeze(0) >= grid.view(-1, 1, 1)  # (bins, N, L)
    return {
        "ap_positives": (above & (target == 1)).sum(1),
        "ap_negatives": (above & (target == 0)).sum(1),
    }


def _exact_average_precision(preds: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(map, micro_map, labels_without_positives)`` from the concatenated scores and targets (``-1`` unobserved)."""
    has_positive = (target == 1).any(0)
    kept = has_positive.nonzero().flatten()
    if not kept.numel():
        zero = torch.zeros((), dtype=torch.float64, device=preds.device)
        return zero, zero, (~has_positive).sum()
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
    observed = target != _IGNORE
    micro_ap = binary_average_precision(preds[observed], target[observed], thresholds=None, validate_args=False)
    return per_label_ap.to(torch.float64).mean(), micro_ap, (~has_positive).sum()


def _binned_average_precision(positives: Tensor, negatives: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(map, micro_map, labels_without_positives)`` from the counts of :func:`_binned_ap_update`: torchmetrics'
    binned AP (``thresholds=bins``) of the same data."""
    bins = positives.shape[0]
    grid = torch.linspace(0, 1, bins, device=positives.device)
    has_positive = positives[0] > 0  # every score is >= the first threshold, 0
    kept = has_positive.nonzero().flatten()
    if not kept.numel():
        zero = torch.zeros((), dtype=torch.float64, device=positives.device)
        return zero, zero, (~has_positive).sum()
    tp, fp = positives[:, kept], negatives[:, kept]
    fn, tn = tp[0] - tp, fp[0] - fp
    # torchmetrics' confusion-matrix state: (bins, L, target, pred)
    confmat = torch.stack([torch.stack([tn, fp], -1), torch.stack([fn, tp], -1)], -2)
    per_label = _multilabel_average_precision_compute(confmat, int(kept.numel()), average=None, thresholds=grid)
    micro = _binary_average_precision_compute(confmat.sum(1), grid)
    return per_label.to(torch.float64).mean(), micro, (~has_positive).sum()


def _multilabel_report_compute(
    preds: Tensor,
    target: Tensor,
    sums: dict[str, Tensor],
    eps: float = 1e-6,
    *,
    ap_counts: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The report from the concatenated scores (or the binned counts) and the summed statistics.

    Args:
        preds: ``(N, L)`` probabilities of every sample seen (unused with ``ap_counts``).
        target: ``(N, L)`` in ``{-1, 0, 1}`` (``-1`` unobserved; unused with ``ap_counts``).
        sums: the statistics of :func:`_multilabel_report_update`, summed over batches (and clients).
        eps: added to the phi denominator.
        ap_counts: ``(ap_positives, ap_negatives)`` of :func:`_binned_ap_update`, summed: the binned AP instead of
            the exact one.

    Returns:
        Dict with keys :data:`REPORT_KEYS`: float32 scalars, ``labels_without_positives`` a long scalar.
    """
    tp, fp, fn = sums["tp"], sums["fp"], sums["fn"]
    if ap_counts is None:
        mean_ap, micro_ap, labels_without_positives = _exact_average_precision(preds, target)
    else:
        mean_ap, micro_ap, labels_without_positives = _binned_average_precision(*ap_counts)

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
    ``cat`` states (with ``bins``: ``(bins, L)`` count states instead, which hold no per-sample scores).
    ``merge_state`` of metrics updated on disjoint data (e.g. clients) therefore gives exactly the metrics of one pass
    over the union, and distributed sync works as for any torchmetrics metric. :meth:`export_state` is the state as
    plain tensors, the form a client sends in federated evaluation
    (:class:`~lightning_fedharmony.protocol.Evaluation`); ``merge_state`` takes it back. See the module docstring
    for the conventions on empty denominators, labels without positives and the ``observed`` mask.

    Args:
        num_labels: number of labels ``L`` (larger than 1).
        threshold: a probability above it is a positive prediction (count-based metrics).
        eps: added to the phi denominator (see :func:`~lightning_fedharmony.functional.phi_from_moments`).
        bins: ``None`` for the exact average precision; an int ``>= 2`` for the binned one over that many thresholds
            evenly spaced in ``[0, 1]`` (the state then reveals no per-sample score).
        validate_args: check every batch in ``update``; ``False`` skips the (synchronising) checks.
        kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``dist_sync_on_step``, ``process_group``).

    Raises:
        ValueError: on a bad ``num_labels``, ``threshold``, ``eps`` or ``bins``.

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
    ap_positives: Tensor
    ap_negatives: Tensor
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
        bins: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _multilabel_report_arg_validation(num_labels, threshold, eps)
        check_bins(bins)
        self.num_labels = num_labels
        self.threshold = float(threshold)
        self.eps = float(eps)
        self.bins = bins
        self.validate_args = validate_args
        if bins is None:
            self.add_state("preds", default=[], dist_reduce_fx="cat")
            self.add_state("target", default=[], dist_reduce_fx="cat")
        else:
            for name in _BINNED_STATES:
                self.add_state(name, default=torch.zeros(bins, num_labels, dtype=torch.long), dist_reduce_fx="sum")
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
        if self.bins is not None:
            sums.update(_binned_ap_update(preds, target, self.bins))
        for name, value in sums.items():
            setattr(self, name, getattr(self, name) + value)
        if self.bins is None:
            self.preds.append(preds)
            self.target.append(target)

    def export_state(self) -> dict[str, Tensor]:
        """The state as plain tensors (what :func:`validate_report_state` checks and ``merge_state`` takes back).

        Returns:
            The summed states (keys of ``metric_state`` except ``preds`` / ``target``), and ``preds`` ``(N, L)``
            float32 with ``target`` ``(N, L)`` int8 (``-1`` unobserved) in the exact mode, or ``ap_positives`` /
            ``ap_negatives`` ``(bins, L)`` long in the binned one.
        """
        state = {
            name: value.detach().clone()
            for name, value in self.metric_state.items()
            if name not in _CAT_STATES and isinstance(value, Tensor)
        }
        if self.bins is None:
            preds, target = self._concatenated()
            state["preds"], state["target"] = preds.float(), target.to(torch.int8)
        return state

    def merge_state(self, incoming_state: dict[str, Any] | Metric) -> None:
        """Add another report's state (e.g. another client's): the result equals one pass over both data sets.

        Args:
            incoming_state: a :class:`MultilabelReport`, its ``metric_state`` dict or its :meth:`export_state`.

        Raises:
            ValueError: if the incoming state is of the other mode (exact / binned) or of another number of bins.
        """
        if isinstance(incoming_state, dict):
            incoming_state = dict(incoming_state)
            binned = all(name in incoming_state for name in _BINNED_STATES)
            got = incoming_state["ap_positives"].shape[0] if binned else None
            if got != self.bins:
                raise ValueError(
                    f"Expected a report state with bins={self.bins} to merge, but got one with bins={got}."
                    " HINT: every client must evaluate with the same `bins`."
                )
            for name in _CAT_STATES:
                if isinstance(incoming_state.get(name), Tensor):
                    incoming_state[name] = [incoming_state[name]]
        elif isinstance(incoming_state, MultilabelReport) and incoming_state.bins != self.bins:
            raise ValueError(
                f"Expected a report with bins={self.bins} to merge, but got bins={incoming_state.bins}."
                " HINT: every client must evaluate with the same `bins`."
            )
        super().merge_state(incoming_state)
        self._update_count += 1  # merged data counts as updated (no "compute before update" warning)
        # torchmetrics keeps the result of an earlier `compute()` cached across `merge_state`
        self._computed = None

    def compute(self) -> dict[str, Tensor]:
        """The report over everything seen since the last reset.

        Returns:
            Dict with keys ``"map"``, ``"micro_map"``, ``"cp"``, ``"cr"``, ``"cf1"``, ``"op"``, ``"or"``, ``"of1"``,
            ``"macro_f1"``, ``"micro_f1"``, ``"hamming_loss"``, ``"correlation_drift"`` (float32 scalars) and
            ``"labels_without_positives"`` (long scalar).
        """
        sums = {name: getattr(self, name) for name in _SUM_STATES}
        if self.bins is not None:
            empty = self.tp.new_zeros(0, self.num_labels)
            counts = (self.ap_positives, self.ap_negatives)
            return _multilabel_report_compute(empty, empty, sums, self.eps, ap_counts=counts)
        preds, target = self._concatenated()
        return _multilabel_report_compute(preds, target, sums, self.eps)

    def _concatenated(self) -> tuple[Tensor, Tensor]:
        # a list until synced or merged, possibly a tensor after
        if not isinstance(self.preds, list) or self.preds:
            return dim_zero_cat(self.preds), dim_zero_cat(self.target)
        device = self.tp.device
        return (
            torch.zeros(0, self.num_labels, device=device),
            torch.zeros(0, self.num_labels, dtype=torch.int8, device=device),
        )


def check_bins(bins: Any) -> None:
    """Check a ``bins`` argument: ``None`` (exact average precision) or an int ``>= 2``.

    Raises:
        ValueError: otherwise.
    """
    if bins is not None and (isinstance(bins, bool) or not isinstance(bins, int) or bins < 2):
        raise ValueError(f"Expected argument `bins` to be None (exact) or an int >= 2, but got {bins!r}.")


def validate_report_state(state: Mapping[str, Any]) -> tuple[int, int | None]:
    """Check a :meth:`MultilabelReport.export_state` from another party before merging it.

    Returns:
        ``(num_labels, bins)`` of the state (``bins`` ``None`` for exact scores).

    Raises:
        ValueError: naming the first entry that is missing, of another shape or dtype, or holds impossible values
            (negative or inconsistent counts, non-finite moments, scores outside ``[0, 1]``, targets outside
            ``{-1, 0, 1}``).
    """
    if "tp" not in state or not isinstance(state["tp"], Tensor) or state["tp"].ndim != 1:
        raise ValueError("Expected the report state to hold `tp` of shape (L,), but it is missing or malformed.")
    num_labels = int(state["tp"].shape[0])
    binned = "ap_positives" in state
    bins = int(state["ap_positives"].shape[0]) if binned and isinstance(state["ap_positives"], Tensor) else None
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {"num_samples": ((), torch.long)}
    expected.update({name: ((num_labels,), torch.long) for name in ("tp", "fp", "fn")})
    expected.update({name: ((num_labels, num_labels), torch.float64) for name in _SUM_STATES[4:]})
    if binned:
        expected.update({name: ((bins or 0, num_labels), torch.long) for name in _BINNED_STATES})
    else:
        expected.update({"preds": ((-1, num_labels), torch.float32), "target": ((-1, num_labels), torch.int8)})
    unknown = sorted(set(state) - set(expected))
    if unknown:
        raise ValueError(f"Expected the report state's entries {sorted(expected)}, but got unknown `{unknown[0]}`.")
    for name, (shape, dtype) in expected.items():
        value = state.get(name)
        if not isinstance(value, Tensor):
            raise ValueError(f"Expected the report state to hold `{name}` as a tensor, but got {type(value).__name__}.")
        ok_shape = value.ndim == len(shape) and all(e in (-1, g) for e, g in zip(shape, value.shape))
        if not ok_shape or value.dtype != dtype:
            want = tuple("N" if e == -1 else e for e in shape)
            raise ValueError(
                f"Expected `{name}` of shape {want} and dtype {dtype}, but got {tuple(value.shape)} {value.dtype}."
            )
    n = int(state["num_samples"])
    if n < 0:
        raise ValueError(f"Expected `num_samples` to be non-negative, but got {n}.")
    for name in ("tp", "fp", "fn", *(_BINNED_STATES if binned else ())):
        if bool((state[name] < 0).any()) or bool((state[name] > n).any()):
            raise ValueError(f"Expected the counts in `{name}` to lie in [0, num_samples], but some do not.")
    for name in _SUM_STATES[4:]:
        if not bool(torch.isfinite(state[name]).all()):
            raise ValueError(f"Expected `{name}` to be finite, but it holds NaN or inf.")
    if bins is not None:
        if bins < 2:
            raise ValueError(f"Expected `ap_positives` to have at least 2 bins, but got {bins}.")
        for name in _BINNED_STATES:
            if bool((state[name][1:] > state[name][:-1]).any()):
                raise ValueError(f"Expected the counts in `{name}` to fall as the threshold rises, but some grow.")
    else:
        preds, target = state["preds"], state["target"]
        if preds.shape[0] != n or target.shape != preds.shape:
            raise ValueError(
                f"Expected `preds` and `target` to have num_samples={n} rows each, but got {tuple(preds.shape)} and"
                f" {tuple(target.shape)}."
            )
        if not bool(((preds >= 0) & (preds <= 1)).all()):
            raise ValueError("Expected `preds` to hold probabilities in [0, 1], but some are outside or NaN.")
        if not bool(((target >= -1) & (target <= 1)).all()):
            raise ValueError("Expected `target` to hold only -1 (unobserved), 0 and 1, but got other values.")
    return num_labels, bins
