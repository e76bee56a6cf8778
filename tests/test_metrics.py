"""Tests of the multi-label report against a plain numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchmetrics.classification import (
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelHammingDistance,
    MultilabelPrecision,
    MultilabelRecall,
)

from lightning_fedharmony.metrics import REPORT_KEYS, MultilabelReport, evaluate_multilabel

EPS = 1e-6


# ---------------------------------------------------------------- numpy reference


def _ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mean over positives of the precision among all samples scored at least as high (ties form one rank)."""
    positives = scores[labels == 1]
    above = scores[None, :] >= positives[:, None]
    precision = (above & (labels[None, :] == 1)).sum(1) / above.sum(1)
    return float(precision.mean())


def _ratio(num: float, den: float) -> float:
    return num / den if den > 0 else 0.0


def _phi(x: np.ndarray) -> np.ndarray:
    """Bernoulli-normalised soft phi of the columns of ``x`` (METHOD.md section 1)."""
    n, num_labels = x.shape
    out = np.eye(num_labels)
    for c in range(num_labels):
        for d in range(num_labels):
            if c == d or n == 0:
                continue
            p_c, p_d = x[:, c].mean(), x[:, d].mean()
            cov = (x[:, c] * x[:, d]).mean() - p_c * p_d
            out[c, d] = np.clip(cov / (math.sqrt(p_c * (1 - p_c)) * math.sqrt(p_d * (1 - p_d)) + EPS), -1, 1)
    return out


def _pair_phi(a: np.ndarray, b: np.ndarray) -> float:
    return float(_phi(np.stack([a, b], axis=1))[0, 1]) if a.size else 0.0


def reference_report(preds, target, observed=None, threshold: float = 0.5) -> dict[str, float]:
    """Every metric from its textbook definition, label by label, over the observed entries only."""
    preds = np.asarray(preds, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    observed = np.ones(preds.shape, dtype=bool) if observed is None else np.asarray(observed)
    num_labels = preds.shape[1]
    aps, prec, rec, f1 = [], [], [], []
    tp_all = fp_all = fn_all = 0
    for c in range(num_labels):
        s, y = preds[observed[:, c], c], target[observed[:, c], c]
        if (y == 1).any():
            aps.append(_ap(s, y))
        hard = s > threshold
        tp, fp, fn = int((hard & (y == 1)).sum()), int((hard & (y == 0)).sum()), int((~hard & (y == 1)).sum())
        prec.append(_ratio(tp, tp + fp))
        rec.append(_ratio(tp, tp + fn))
        f1.append(_ratio(2 * tp, 2 * tp + fp + fn))
        tp_all, fp_all, fn_all = tp_all + tp, fp_all + fp, fn_all + fn
    cp, cr = float(np.mean(prec)), float(np.mean(rec))
    op, o_r = _ratio(tp_all, tp_all + fp_all), _ratio(tp_all, tp_all + fn_all)
    of1 = _ratio(2 * op * o_r, op + o_r)
    flat_s, flat_y = preds[observed], target[observed]
    drifts = []
    for c in range(num_labels):
        for d in range(num_labels):
            both = observed[:, c] & observed[:, d]
            if c != d and both.any():
                drifts.append(
                    abs(_pair_phi(preds[both, c], preds[both, d]) - _pair_phi(target[both, c], target[both, d]))
                )
    return {
        "map": float(np.mean(aps)) if aps else 0.0,
        "micro_map": _ap(flat_s, flat_y) if (flat_y == 1).any() else 0.0,
        "cp": cp,
        "cr": cr,
        "cf1": _ratio(2 * cp * cr, cp + cr),
        "op": op,
        "or": o_r,
        "of1": of1,
        "macro_f1": float(np.mean(f1)),
        "micro_f1": of1,
        "hamming_loss": _ratio(fp_all + fn_all, observed.sum()),
        "correlation_drift": float(np.mean(drifts)) if drifts else 0.0,
        "labels_without_positives": num_labels - len(aps),
    }


def assert_report_close(report, expected, atol: float = 2e-6) -> None:
    assert list(report) == list(REPORT_KEYS)
    for key in REPORT_KEYS:
        value = float(report[key])
        assert math.isfinite(value), key
        assert value == pytest.approx(expected[key], abs=atol), key


def _data(seed: int, n: int = 120, num_labels: int = 5, rate: float = 0.35):
    """Continuous scores (no ties) correlated with the labels, so that every metric is non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, num_labels, generator=gen) < rate).long()
    target[:, 1] = torch.where(torch.rand(n, generator=gen) < 0.8, target[:, 0], target[:, 1])  # a correlated pair
    logits = 1.5 * (2 * target - 1) + torch.randn(n, num_labels, generator=gen)
    return torch.sigmoid(logits), target


def _report(preds, target, observed=None, **kwargs):
    metric = MultilabelReport(preds.shape[1], **kwargs)
    metric.update(preds, target, observed)
    return metric.compute()


def _assert_same(a, b, atol: float = 1e-6) -> None:
    assert list(a) == list(b)
    for key in a:
        assert float(a[key]) == pytest.approx(float(b[key]), abs=atol), key


# ---------------------------------------------------------------- values


@pytest.mark.parametrize("seed", [0, 1])
def test_random_data_matches_reference(seed):
    preds, target = _data(seed)
    report = _report(preds, target)
    assert_report_close(report, reference_report(preds, target))
    assert report["labels_without_positives"].dtype == torch.long
    assert report["map"].dtype == torch.float32
    # F1 of the class averages and average of the class F1s are different numbers
    assert abs(float(report["cf1"]) - float(report["macro_f1"])) > 1e-4
    assert float(report["micro_f1"]) == float(report["of1"])


def test_matches_torchmetrics_classes():
    preds, target = _data(2)
    report = _report(preds, target)
    kwargs = {"num_labels": preds.shape[1]}
    expected = {
        "map": MultilabelAveragePrecision(**kwargs, average="macro"),
        "micro_map": MultilabelAveragePrecision(**kwargs, average="micro"),
        "cp": MultilabelPrecision(**kwargs, average="macro"),
        "cr": MultilabelRecall(**kwargs, average="macro"),
        "op": MultilabelPrecision(**kwargs, average="micro"),
        "or": MultilabelRecall(**kwargs, average="micro"),
        "macro_f1": MultilabelF1Score(**kwargs, average="macro"),
        "micro_f1": MultilabelF1Score(**kwargs, average="micro"),
        "hamming_loss": MultilabelHammingDistance(**kwargs, average="micro"),
    }
    for key, metric in expected.items():
        assert float(report[key]) == pytest.approx(float(metric(preds, target)), abs=1e-6), key


def test_ties_follow_torchmetrics_thresholds():
    # label 0: three tied scores (two positives) rank together at precision 2/3, the last positive at 3/4
    preds = torch.tensor([[0.5, 0.9], [0.5, 0.1], [0.5, 0.4], [0.2, 0.3]])
    target = torch.tensor([[1, 1], [0, 0], [1, 0], [1, 1]])
    report = _report(preds, target)
    ap0, ap1 = (2 / 3 + 2 / 3 + 3 / 4) / 3, (1 + 2 / 3) / 2
    assert float(report["map"]) == pytest.approx((ap0 + ap1) / 2, abs=1e-6)
    expected_micro = _ap(preds.numpy().ravel(), target.numpy().ravel())
    assert float(report["micro_map"]) == pytest.approx(expected_micro, abs=1e-6)
    assert float(MultilabelAveragePrecision(num_labels=2)(preds, target)) == pytest.approx((ap0 + ap1) / 2, abs=1e-6)


def test_many_ties_match_reference():
    preds, target = _data(3, n=150)
    preds = (preds * 4).round() / 4  # five distinct scores, threshold 0.5 sits on one of them
    report = _report(preds, target)
    assert_report_close(report, reference_report(preds, target))


def test_label_without_positives_is_left_out_and_counted():
    preds, target = _data(4, num_labels=6)
    target[:, 2] = 0
    target[:, 4] = 0
    report = _report(preds, target)
    assert int(report["labels_without_positives"]) == 2
    per_label = [_ap(preds[:, c].numpy(), target[:, c].numpy()) for c in (0, 1, 3, 5)]
    assert float(report["map"]) == pytest.approx(float(np.mean(per_label)), abs=1e-6)
    assert_report_close(report, reference_report(preds, target))


def test_all_zero_predictions_give_zero_precision_and_no_nan():
    _, target = _data(5)
    preds = torch.zeros(target.shape)
    report = _report(preds, target)
    for key in ("cp", "cr", "cf1", "op", "or", "of1", "macro_f1", "micro_f1"):
        assert float(report[key]) == 0.0, key
    # every score tied: AP is the rate of positives
    assert float(report["micro_map"]) == pytest.approx(target.float().mean().item(), abs=1e-6)
    assert float(report["hamming_loss"]) == pytest.approx(target.float().mean().item(), abs=1e-6)
    assert_report_close(report, reference_report(preds, target))


def test_no_positive_anywhere_and_no_update():
    report = _report(torch.full((4, 3), 0.7), torch.zeros(4, 3))
    assert int(report["labels_without_positives"]) == 3
    assert float(report["map"]) == 0.0
    assert float(report["micro_map"]) == 0.0
    assert float(report["hamming_loss"]) == 1.0
    metric = MultilabelReport(num_labels=3)
    with pytest.warns(UserWarning, match="called before the ``update``"):
        empty = metric.compute()
    assert int(empty["labels_without_positives"]) == 3
    assert all(float(empty[key]) == 0.0 for key in REPORT_KEYS if key != "labels_without_positives")


def test_correlation_drift_matches_numpy_phi():
    preds, target = _data(6, n=200, num_labels=4)
    report = _report(preds, target)
    gap = np.abs(_phi(preds.double().numpy()) - _phi(target.double().numpy()))
    expected = gap[~np.eye(4, dtype=bool)].mean()
    assert float(report["correlation_drift"]) == pytest.approx(expected, abs=1e-6)
    # perfect predictions have no drift
    assert float(_report(target.float(), target)["correlation_drift"]) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- state


def test_batch_accumulated_equals_one_pass():
    preds, target = _data(7, n=130)
    observed = torch.rand(preds.shape, generator=torch.Generator().manual_seed(0)) < 0.8
    metric = MultilabelReport(preds.shape[1])
    for start in range(0, 130, 32):
        metric.update(preds[start : start + 32], target[start : start + 32], observed[start : start + 32])
    _assert_same(metric.compute(), _report(preds, target, observed))


def test_merged_clients_equal_one_pass_over_union():
    preds, target = _data(8, n=150)
    target[:50, 3] = 0  # label 3 has no positive on client 0: its AP must come from the pooled data only
    split = [slice(0, 50), slice(50, 150)]
    clients = [MultilabelReport(preds.shape[1]) for _ in split]
    for metric, part in zip(clients, split, strict=True):
        metric.update(preds[part], target[part])
    client_maps = [float(metric.compute()["map"]) for metric in clients]
    clients[0].merge_state(clients[1])
    merged = clients[0].compute()
    union = _report(preds, target)
    _assert_same(merged, union)
    assert float(merged["map"]) != pytest.approx(float(np.mean(client_maps)), abs=1e-4)
    # merging from a plain state dict works as well
    other = MultilabelReport(preds.shape[1])
    other.update(preds[split[1]], target[split[1]])
    first = MultilabelReport(preds.shape[1])
    first.update(preds[split[0]], target[split[0]])
    first.merge_state({name: getattr(other, name) for name in other._defaults})
    _assert_same(first.compute(), union)


def test_reset_forgets_updates():
    preds, target = _data(9)
    metric = MultilabelReport(preds.shape[1])
    metric.update(torch.rand(preds.shape), 1 - target)
    metric.reset()
    metric.update(preds, target)
    _assert_same(metric.compute(), _report(preds, target))


def test_to_device_moves_states():
    preds, target = _data(10)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    metric = MultilabelReport(preds.shape[1]).to(device)
    assert metric.pair_count.device.type == device
    assert metric.pair_count.dtype == torch.float64
    metric.update(preds.to(device), target.to(device))
    report = metric.compute()
    assert report["map"].device.type == device
    _assert_same({key: value.cpu() for key, value in report.items()}, _report(preds, target), atol=1e-5)


# ---------------------------------------------------------------- observed mask


def test_observed_mask_matches_reference_on_observed_entries():
    preds, target = _data(11, n=160, num_labels=5)
    observed = torch.rand(preds.shape, generator=torch.Generator().manual_seed(1)) < 0.7
    observed[:, 4] = False
    observed[:3, 4] = True  # label 4: three observed entries, no positive among them
    target[:3, 4] = 0
    garbage = torch.where(observed, target, torch.full_like(target, -1))  # missing labels may hold any value
    report = _report(preds, garbage, observed)
    assert_report_close(report, reference_report(preds, target, observed.numpy()))
    assert int(report["labels_without_positives"]) == 1


def test_row_mask_equals_evaluating_the_observed_rows():
    preds, target = _data(12, n=140)
    keep = torch.rand(140, generator=torch.Generator().manual_seed(2)) < 0.6
    observed = keep[:, None].expand_as(preds).clone()
    _assert_same(_report(preds, target, observed), _report(preds[keep], target[keep]))
    _assert_same(_report(preds, target, torch.ones_like(observed)), _report(preds, target), atol=0.0)


def test_pairs_never_observed_together_are_left_out_of_drift():
    preds, target = _data(13, n=100, num_labels=3)
    observed = torch.ones(preds.shape, dtype=torch.bool)
    observed[:50, 0] = False
    observed[50:, 1] = False  # labels 0 and 1 are never observed together
    report = _report(preds, target, observed)
    assert_report_close(report, reference_report(preds, target, observed.numpy()))


def test_evaluate_multilabel_returns_plain_numbers():
    preds, target = _data(14)
    observed = torch.rand(preds.shape, generator=torch.Generator().manual_seed(3)) < 0.9
    result = evaluate_multilabel(preds, target, observed, threshold=0.4)
    assert list(result) == list(REPORT_KEYS)
    assert isinstance(result["labels_without_positives"], int)
    assert all(isinstance(result[key], float) for key in REPORT_KEYS if key != "labels_without_positives")
    _assert_same(result, _report(preds, target, observed, threshold=0.4))
    assert result["of1"] == pytest.approx(reference_report(preds, target, observed.numpy(), threshold=0.4)["of1"])


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_labels": 1}, "Expected argument `num_labels` to be an int larger than 1, but got 1."),
        ({"num_labels": 3.0}, "Expected argument `num_labels` to be an int larger than 1, but got 3.0."),
        ({"num_labels": 3, "threshold": 1.5}, r"Expected argument `threshold` to be a float in the \[0, 1\] range"),
        ({"num_labels": 3, "eps": 0.0}, "Expected argument `eps` to be a positive float, but got 0.0."),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultilabelReport(**kwargs)


@pytest.mark.parametrize(
    ("preds", "target", "observed", "match"),
    [
        (torch.rand(4), torch.zeros(4), None, r"Expected argument `preds` to be of shape \(N, L\), but got shape"),
        (torch.rand(4, 2), torch.zeros(4, 2), None, "Expected `preds.shape\\[1\\]` to be equal to the number of"),
        (torch.rand(4, 3), torch.zeros(5, 3), None, "Expected `preds` and `target` to have the same shape"),
        (torch.rand(4, 3), torch.zeros(4, 3), torch.ones(4, 3), "Expected argument `observed` to be a bool tensor"),
        (
            torch.rand(4, 3),
            torch.zeros(4, 3),
            torch.ones(4, 2, dtype=torch.bool),
            "Expected `observed` to have the shape of `preds`",
        ),
        (torch.ones(4, 3, dtype=torch.long), torch.zeros(4, 3), None, "to be a floating point tensor, but got"),
        (torch.full((4, 3), 2.0), torch.zeros(4, 3), None, r"probabilities in \[0, 1\].*HINT: apply `torch.sigmoid`"),
        (torch.full((4, 3), float("nan")), torch.zeros(4, 3), None, r"probabilities in \[0, 1\]"),
        (
            torch.rand(4, 3),
            torch.full((4, 3), 2),
            None,
            r"Detected the following values in `target` where observed: \[2\]",
        ),
    ],
)
def test_bad_tensors(preds, target, observed, match):
    metric = MultilabelReport(num_labels=3)
    with pytest.raises(ValueError, match=match):
        metric.update(preds, target, observed)
    if preds.ndim == 2 and preds.shape[1] != 3:
        return  # the function takes the number of labels from `preds`
    with pytest.raises(ValueError, match=match):
        evaluate_multilabel(preds, target, observed)


def test_bad_types_and_single_label():
    metric = MultilabelReport(num_labels=2)
    with pytest.raises(TypeError, match=r"Expected argument `target` to be a torch\.Tensor, but got list\."):
        metric.update(torch.rand(2, 2), [[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="Expected `preds` to have more than one label column, but got shape"):
        evaluate_multilabel(torch.rand(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="Expected argument `threshold` to be a float in the"):
        evaluate_multilabel(torch.rand(3, 2), torch.zeros(3, 2), threshold=-0.1)
