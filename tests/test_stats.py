"""CorrelationStats: exact accumulation and merging, validity, state dicts and their validation."""

from __future__ import annotations

import pytest
import torch
from helpers.models import random_preds

from lightning_fedharmony import CorrelationStats
from lightning_fedharmony.functional import phi_from_moments, soft_phi
from lightning_fedharmony.stats import STATS_FIELDS, validate_stats_state


def _one_pass(preds: torch.Tensor, target: torch.Tensor | None = None) -> CorrelationStats:
    stats = CorrelationStats(preds.shape[1])
    stats.update(preds, target)
    return stats


def _assert_same_stats(got: CorrelationStats, expected: CorrelationStats) -> None:
    for name in STATS_FIELDS:
        assert getattr(got, name).dtype == torch.float64
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-12, atol=1e-12)


def test_sums_are_the_moments_of_the_predictions() -> None:
    preds = random_preds(37, seed=1)
    target = (preds > 0.5).double()
    stats = _one_pass(preds, target)
    assert float(stats.num_samples) == 37
    torch.testing.assert_close(stats.sum_preds, preds.sum(0), rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.sum_outer, preds.T @ preds, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.target_positives, target.sum(0), rtol=0, atol=0)
    torch.testing.assert_close(stats.observed_count, torch.full((5,), 37.0, dtype=torch.float64), rtol=0, atol=0)
    torch.testing.assert_close(stats.compute(), soft_phi(preds), rtol=0, atol=1e-12)
    torch.testing.assert_close(
        stats.compute(normalization="pearson"), soft_phi(preds, normalization="pearson"), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("batch_size", [1, 7, 50])
def test_batch_accumulated_equals_one_pass(batch_size: int) -> None:
    preds = random_preds(103, seed=2)
    target = (random_preds(103, seed=3) > 0.5).double()
    accumulated = CorrelationStats(5)
    for start in range(0, 103, batch_size):
        accumulated.update(preds[start : start + batch_size], target[start : start + batch_size])
    _assert_same_stats(accumulated, _one_pass(preds, target))
    torch.testing.assert_close(accumulated.compute(), _one_pass(preds).compute(), rtol=0, atol=1e-12)


def test_float32_batches_are_accumulated_in_float64() -> None:
    preds = random_preds(64, seed=4)
    stats = CorrelationStats(5)
    stats.update(preds.float())
    assert stats.sum_outer.dtype == torch.float64
    torch.testing.assert_close(stats.sum_outer, preds.float().double().T @ preds.float().double(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("num_clients", [2, 5])
def test_merged_clients_equal_one_pass_over_the_union(num_clients: int) -> None:
    parts = [random_preds(10 + 7 * k, seed=10 + k) for k in range(num_clients)]
    targets = [(p > 0.4).double() for p in parts]
    merged = CorrelationStats(5)
    for preds, target in zip(parts, targets):
        merged.merge(_one_pass(preds, target))
    union = _one_pass(torch.cat(parts), torch.cat(targets))
    _assert_same_stats(merged, union)
    torch.testing.assert_close(merged.compute(), union.compute(), rtol=0, atol=1e-12)
    torch.testing.assert_close(merged.compute(), soft_phi(torch.cat(parts)), rtol=0, atol=1e-12)


def test_merge_returns_self_and_checks_labels() -> None:
    stats = _one_pass(random_preds(5, seed=0))
    assert stats.merge(CorrelationStats(5)) is stats
    with pytest.raises(ValueError, match="Expected statistics over 5 labels to merge, but got 3 labels"):
        stats.merge(CorrelationStats(3))


def test_reset_forgets_everything() -> None:
    stats = _one_pass(random_preds(9, seed=0))
    stats.reset()
    assert float(stats.num_samples) == 0
    assert not stats.valid_labels().any()
    torch.testing.assert_close(stats.compute(), torch.eye(5, dtype=torch.float64), rtol=0, atol=0)


def test_valid_labels_never_positive_unobserved_and_rate() -> None:
    preds = random_preds(40, seed=5)
    target = torch.ones_like(preds)
    target[:, 1] = 0  # label 1 never positive
    observed = torch.ones(5, dtype=torch.bool)
    observed[3] = False  # label 3 never observed
    preds[:, 4] = 1e-5  # label 4 predicted below min_label_rate
    stats = CorrelationStats(5, min_label_rate=1e-3)
    stats.update(preds, target, observed)
    assert stats.valid_labels().tolist() == [True, False, True, False, False]
    assert stats.target_positives[3] == 0 and stats.observed_count[3] == 0
    assert stats.observed_count[0] == 40


def test_valid_labels_rate_bounds_both_sides() -> None:
    preds = torch.full((10, 3), 0.5, dtype=torch.float64)
    preds[:, 1] = 0.995  # above 1 - min_label_rate
    preds[:, 2] = 0.02
    target = torch.ones(10, 3)
    stats = CorrelationStats(3, min_label_rate=0.01)
    stats.update(preds, target)
    assert stats.valid_labels().tolist() == [True, False, True]
    strict = CorrelationStats(3, min_label_rate=0.03)
    strict.update(preds, target)
    assert strict.valid_labels().tolist() == [True, False, False]


def test_elementwise_observed_mask_counts_only_observed_entries() -> None:
    preds = random_preds(6, num_labels=2, seed=6)
    target = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [0, 0], [1, 0]])
    observed = torch.tensor([[1, 1], [0, 1], [1, 0], [1, 1], [1, 1], [0, 1]], dtype=torch.bool)
    stats = CorrelationStats(2)
    stats.update(preds, target, observed)
    assert stats.observed_count.tolist() == [4.0, 5.0]
    assert stats.target_positives.tolist() == [2.0, 2.0]


def test_without_target_only_observation_counts() -> None:
    stats = CorrelationStats(3)
    stats.update(random_preds(4, num_labels=3), observed=torch.tensor([True, False, True]))
    assert stats.target_positives.tolist() == [4.0, 0.0, 4.0]
    assert stats.valid_labels().tolist() == [True, False, True]


def test_state_dict_round_trip() -> None:
    stats = _one_pass(random_preds(21, seed=7), (random_preds(21, seed=8) > 0.5).double())
    state = stats.state_dict()
    assert set(state) == set(STATS_FIELDS)
    assert all(v.dtype == torch.float64 for v in state.values())
    state["sum_preds"].zero_()  # a copy: the statistics are untouched
    assert stats.sum_preds.abs().sum() > 0
    restored = CorrelationStats(5)
    restored.load_state_dict(stats.state_dict())
    _assert_same_stats(restored, stats)
    rebuilt = CorrelationStats.from_state_dict(stats.state_dict(), min_label_rate=0.2)
    _assert_same_stats(rebuilt, stats)
    assert rebuilt.num_labels == 5 and rebuilt.min_label_rate == 0.2
    assert repr(rebuilt) == "CorrelationStats(num_labels=5, num_samples=21)"


def test_state_dict_survives_torch_save_weights_only(tmp_path: pytest.TempPathFactory) -> None:
    stats = _one_pass(random_preds(12, seed=9))
    path = f"{tmp_path}/stats.pt"
    torch.save(stats.state_dict(), path)
    loaded = CorrelationStats.from_state_dict(torch.load(path, weights_only=True))
    _assert_same_stats(loaded, stats)


def _good_state() -> dict[str, torch.Tensor]:
    preds = random_preds(10, num_labels=3, seed=11)
    return _one_pass(preds, (preds > 0.5).double()).state_dict()


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.pop("sum_outer"), r"\['sum_outer'\] are missing"),
        (lambda s: s.update(sum_preds=[1.0, 2.0, 3.0]), "entry `sum_preds` to be a tensor, but got list"),
        (lambda s: s.update(sum_outer=torch.zeros(3, 2, dtype=torch.float64)), r"`sum_outer` to have shape \(3, 3\)"),
        (lambda s: s.update(num_samples=torch.zeros(1, dtype=torch.float64)), r"`num_samples` to have shape \(\)"),
        (lambda s: s.update(observed_count=torch.zeros(4, dtype=torch.float64)), r"`observed_count` to have shape"),
        (lambda s: s.update(target_positives=torch.zeros(3, dtype=torch.long)), "to be floating point"),
        (lambda s: s["sum_outer"].__setitem__((0, 1), float("nan")), "`sum_outer` to be finite"),
        (lambda s: s["sum_preds"].__setitem__(0, float("inf")), "`sum_preds` to be finite"),
        (lambda s: s.update(num_samples=torch.tensor(-1.0, dtype=torch.float64)), "`num_samples` to be non-negative"),
        (lambda s: s["sum_preds"].__setitem__(0, -0.5), r"`sum_preds` to lie in \[0, num_samples\]"),
        (lambda s: s["sum_outer"].__setitem__((1, 2), 11.0), r"`sum_outer` to lie in \[0, num_samples\]"),
        (lambda s: s["target_positives"].__setitem__(2, 10.5), r"`target_positives` to lie in \[0, num_samples\]"),
        (lambda s: s["observed_count"].__setitem__(2, -1.0), r"`observed_count` to lie in \[0, num_samples\]"),
    ],
)
def test_validate_stats_state_errors(edit, match: str) -> None:  # type: ignore[no-untyped-def]
    state = _good_state()
    assert validate_stats_state(state) == 3
    edit(state)
    with pytest.raises(ValueError, match=match):
        validate_stats_state(state)
    with pytest.raises(ValueError, match=match):
        CorrelationStats(3).load_state_dict(state)


def test_validate_stats_state_label_count() -> None:
    state = _good_state()
    assert validate_stats_state(state, num_labels=3) == 3
    with pytest.raises(ValueError, match=r"Expected statistics over 4 labels, but got shape \(3,\)"):
        validate_stats_state(state, num_labels=4)
    with pytest.raises(ValueError, match=r"Expected statistics over 4 labels"):
        CorrelationStats(4).load_state_dict(state)
    state["sum_preds"] = torch.zeros(3, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"Expected statistics entry `sum_preds` to have shape \(L,\)"):
        validate_stats_state(state)
    with pytest.raises(ValueError, match="a `sum_preds` entry of shape \\(L,\\), but it is missing or not 1-D"):
        CorrelationStats.from_state_dict(state)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_labels": 0}, "Expected argument `num_labels` to be a positive int, but got 0"),
        ({"num_labels": 2.0}, "Expected argument `num_labels` to be a positive int, but got 2.0"),
        ({"num_labels": True}, "Expected argument `num_labels` to be a positive int, but got True"),
        ({"num_labels": 3, "min_label_rate": 0.5}, r"`min_label_rate` to be in \[0, 0.5\), but got 0.5"),
        ({"num_labels": 3, "min_label_rate": -0.1}, r"`min_label_rate` to be in \[0, 0.5\)"),
    ],
)
def test_constructor_errors(kwargs: dict, match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=match):
        CorrelationStats(**kwargs)


def test_update_shape_errors() -> None:
    stats = CorrelationStats(3)
    with pytest.raises(ValueError, match=r"`preds` to have shape \(N, 3\), but got \(4, 2\)"):
        stats.update(torch.rand(4, 2))
    with pytest.raises(ValueError, match=r"`preds` to have shape \(N, 3\), but got \(3,\)"):
        stats.update(torch.rand(3))
    with pytest.raises(ValueError, match=r"`target` to have the shape of `preds` \(4, 3\), but got \(4, 2\)"):
        stats.update(torch.rand(4, 3), torch.ones(4, 2))
    assert float(stats.num_samples) == 0


def test_compute_matches_phi_from_moments() -> None:
    preds = random_preds(30, seed=12)
    stats = _one_pass(preds)
    expected = phi_from_moments(30, preds.sum(0), preds.T @ preds, eps=1e-3)
    torch.testing.assert_close(stats.compute(eps=1e-3), expected, rtol=0, atol=1e-12)
