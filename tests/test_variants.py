"""Switch-guarded FedHarmony variants used by the quality benchmark: a switch at its default changes nothing."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lightning_fedharmony import CorrelationStats, FedHarmony
from lightning_fedharmony.aggregators import ClientUpdate

NUM_LABELS = 6


def _update(cid: str, seed: int, num_samples: int = 200) -> ClientUpdate:
    """Two label blocks ({0, 1, 2} strongly, {3, 4, 5} weakly correlated) whose strength varies by client."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, num_samples, 1, generator=generator, dtype=torch.float64)
    logits = 0.6 * torch.randn(num_samples, NUM_LABELS, generator=generator, dtype=torch.float64)
    logits[:, :3] += (2.0 + 0.3 * seed) * first
    logits[:, 3:] += 0.15 * second
    preds = torch.sigmoid(logits)
    target = (torch.rand(num_samples, NUM_LABELS, generator=generator, dtype=torch.float64) < preds).double()
    stats = CorrelationStats(NUM_LABELS)
    stats.update(preds, target)
    weights = {"w": torch.randn(2, 2, generator=generator)}
    return ClientUpdate(cid, weights, num_samples, stats)


def _aggregated(**kwargs: float | bool) -> FedHarmony:
    aggregator = FedHarmony(block_alignment=False, t0=2.0, corr_normalization="pearson", **kwargs)
    aggregator.aggregate_round(1, [_update("a", 1), _update("b", 2), _update("c", 3)], {"w": torch.zeros(2, 2)})
    return aggregator


def _teacher_and_mask(aggregator: FedHarmony, cid: str = "a") -> tuple[Tensor, Tensor]:
    return aggregator.teacher(cid)


def test_align_threshold_default_keeps_every_pair() -> None:
    teacher, mask = _teacher_and_mask(_aggregated())
    assert FedHarmony().align_threshold == 0.0
    assert torch.equal(mask, ~torch.eye(NUM_LABELS, dtype=torch.bool))
    # the strong block is above the thresholds used below, the weak one below: the test can tell them apart
    assert teacher[0, 1].abs() > 0.5 and teacher[3, 4].abs() < 0.2


@pytest.mark.parametrize("threshold", [0.3, 0.5])
def test_align_threshold_keeps_only_confident_teacher_pairs(threshold: float) -> None:
    full_teacher, full_mask = _teacher_and_mask(_aggregated())
    teacher, mask = _teacher_and_mask(_aggregated(align_threshold=threshold))
    torch.testing.assert_close(teacher, full_teacher)  # the teacher itself is untouched
    assert torch.equal(mask, full_mask & (full_teacher.abs() >= threshold))
    assert mask[0, 1] and not mask[3, 4]


def test_align_threshold_also_restricts_the_quality_score() -> None:
    # with only the confident block scored, the clients' discrepancies (and so their quality weights) change
    plain = _aggregated(quality_aggregation=True)
    thresholded = _aggregated(quality_aggregation=True, align_threshold=0.5)
    round2 = [_update("a", 4), _update("b", 5), _update("c", 6)]
    r_plain = plain.aggregate_round(2, round2, {"w": torch.zeros(2, 2)})
    r_thr = thresholded.aggregate_round(2, round2, {"w": torch.zeros(2, 2)})
    w_plain, w_thr = r_plain.client_weights, r_thr.client_weights
    assert w_plain.keys() == w_thr.keys()
    assert any(abs(w_plain[k] - w_thr[k]) > 1e-6 for k in w_plain)
    s_plain, s_thr = r_plain.client_metrics, r_thr.client_metrics
    assert any(abs(s_plain[k]["discrepancy"] - s_thr[k]["discrepancy"]) > 1e-6 for k in s_plain)


def test_align_threshold_applies_to_a_client_without_statistics() -> None:
    teacher, mask = _teacher_and_mask(_aggregated(align_threshold=0.5), cid="new")
    assert not (mask & (teacher.abs() < 0.5)).any() and mask.any()


@pytest.mark.parametrize("bad", [-0.1, 1.0, True, "0.2"])
def test_align_threshold_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError, match=r"Expected argument `align_threshold` to be in \[0, 1\), but got"):
        FedHarmony(align_threshold=bad)  # type: ignore[arg-type]
