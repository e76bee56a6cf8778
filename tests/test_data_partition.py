"""Partitioners: disjoint covers, determinism, skew properties, label masks, summaries and argument checks."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest
from helpers.data import clustered_labels, data_file

from lightning_fedharmony.data import (
    Partition,
    feature_kmeans,
    iid,
    label_set_dirichlet,
    label_space_masking,
    load_npz,
    natural,
    partition_summary,
)
from lightning_fedharmony.data.partition import _label_set_groups


@pytest.fixture(scope="module")
def yeast_train():
    ds = load_npz(data_file("yeast", "yeast.npz"))
    assert ds.X_train is not None and ds.Y_train is not None
    return ds.X_train, ds.Y_train


def _assert_disjoint_cover(partition: Partition, num_samples: int) -> None:
    every = np.concatenate(partition.client_indices)
    assert every.dtype == np.int64
    np.testing.assert_array_equal(np.sort(every), np.arange(num_samples))
    for idx in partition.client_indices:
        np.testing.assert_array_equal(idx, np.sort(idx))


def _features(Y: np.ndarray) -> np.ndarray:
    """Features that follow the labels, so k-means has structure to find."""
    rng = np.random.default_rng(0)
    return Y.astype(np.float64) @ rng.normal(size=(Y.shape[1], 5)) + 0.1 * rng.normal(size=(Y.shape[0], 5))


PARTITIONERS: dict[str, Callable[[np.ndarray, int], Partition]] = {
    "iid": lambda Y, seed: iid(Y.shape[0], 7, seed, Y=Y),
    "dirichlet": lambda Y, seed: label_set_dirichlet(Y, 7, 0.3, seed, min_samples=5),
    "kmeans": lambda Y, seed: feature_kmeans(_features(Y) + seed, 7, seed, min_samples=5, Y=Y),
    "masking": lambda Y, seed: label_space_masking(Y, 7, (0.5, 0.7), seed),
}


@pytest.mark.parametrize("name", sorted(PARTITIONERS))
def test_disjoint_cover_and_determinism(name):
    Y = clustered_labels()
    make = PARTITIONERS[name]
    first, again = make(Y, 0), make(Y, 0)
    _assert_disjoint_cover(first, Y.shape[0])
    assert first.num_clients == 7 and first.sizes.sum() == Y.shape[0]
    for a, b in zip(first.client_indices, again.client_indices):
        np.testing.assert_array_equal(a, b)
    other = make(Y, 1)
    assert any(
        a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first.client_indices, other.client_indices)
    ) or not np.array_equal(first.observed, other.observed)
    assert first.summary is not None
    np.testing.assert_array_equal(first.summary.sizes, first.sizes)
    assert np.isfinite(first.summary.phi_drift).all()


def test_iid_sizes_and_no_summary_without_labels():
    p = iid(103, 10, seed=4)
    _assert_disjoint_cover(p, 103)
    assert p.summary is None and p.observed is None
    assert p.sizes.max() - p.sizes.min() <= 1


def test_natural_orders_clients_by_id():
    ids = np.array(["b", "a", "c", "a", "b", "b"])
    Y = np.array([[1, 0], [0, 1], [1, 1], [1, 1], [0, 0], [1, 0]])
    p = natural(ids, Y=Y)
    assert [idx.tolist() for idx in p.client_indices] == [[1, 3], [0, 4, 5], [2]]
    assert p.summary is not None and p.summary.sizes.tolist() == [2, 3, 1]
    # the one-sample client has no non-constant label: no phi, no NaN
    assert p.summary.num_valid_pairs[2] == 0 and p.summary.phi_drift[2] == 0.0
    assert p.summary.absent_labels[2].tolist() == []
    assert p.summary.absent_labels[1].tolist() == [1]


def test_summary_matches_a_pearson_reference():
    Y = clustered_labels(num_samples=300, num_labels=6, seed=2)
    p = label_set_dirichlet(Y, 4, 0.5, seed=0, min_samples=20)
    assert p.summary is not None
    phi_global = np.corrcoef(Y.T.astype(np.float64))
    for k, idx in enumerate(p.client_indices):
        sub = Y[idx]
        valid = (sub.sum(0) > 0) & (sub.sum(0) < len(idx))
        pairs = valid[:, None] & valid[None, :] & ~np.eye(6, dtype=bool)
        ref = np.abs(np.corrcoef(sub.T.astype(np.float64)) - phi_global)[pairs].mean() if pairs.any() else 0.0
        assert p.summary.phi_drift[k] == pytest.approx(ref, abs=1e-4)
        assert p.summary.num_valid_pairs[k] == pairs.sum()
    assert p.summary.mean_phi_drift == pytest.approx(p.summary.phi_drift[p.summary.num_valid_pairs > 0].mean())
    json.dumps(p.summary.as_dict())


def test_dirichlet_small_alpha_drifts_more_than_iid(yeast_train):
    _, Y = yeast_train
    drift_iid = iid(len(Y), 10, seed=0, Y=Y).summary.mean_phi_drift  # type: ignore[union-attr]
    skewed = label_set_dirichlet(Y, 10, alpha=0.1, seed=0)
    near_iid = label_set_dirichlet(Y, 10, alpha=100.0, seed=0)
    assert skewed.summary is not None and near_iid.summary is not None
    assert skewed.summary.mean_phi_drift > 2 * drift_iid
    assert near_iid.summary.mean_phi_drift < 0.5 * skewed.summary.mean_phi_drift
    # skew also shows in the clients' label rates
    rates = [np.array([Y[idx].mean(0) for idx in p.client_indices]) for p in (skewed, near_iid)]
    assert rates[0].std(0).mean() > 3 * rates[1].std(0).mean()


@pytest.mark.parametrize("alpha", [1e-4, 0.05])
def test_dirichlet_min_samples_is_respected(yeast_train, alpha):
    _, Y = yeast_train
    p = label_set_dirichlet(Y, 20, alpha=alpha, seed=1, min_samples=40)
    _assert_disjoint_cover(p, len(Y))
    assert p.sizes.min() >= 40


def test_rare_label_sets_join_the_nearest_frequent_set():
    frequent_a, frequent_b, rare = [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]
    Y = np.array([frequent_a] * 5 + [frequent_b] * 4 + [rare], dtype=np.int8)
    groups = _label_set_groups(Y, max_groups=2)
    assert groups.tolist() == [0] * 5 + [1] * 4 + [1]
    assert _label_set_groups(Y, max_groups=3).tolist() == [0] * 5 + [1] * 4 + [2]


def test_feature_kmeans_finds_separated_clusters_and_fills_empty_clients():
    rng = np.random.default_rng(0)
    X = np.vstack([rng.normal(0, 0.1, (30, 2)), rng.normal(10, 0.1, (20, 2))])
    p = feature_kmeans(X, 2, seed=0)
    assert sorted(idx.tolist() for idx in p.client_indices) == [list(range(30)), list(range(30, 50))]
    # four identical points cannot make five non-empty clusters: rebalancing fills them
    dup = np.repeat(np.eye(4), 5, axis=0)
    p = feature_kmeans(dup, 5, seed=0, min_samples=2)
    _assert_disjoint_cover(p, 20)
    assert p.sizes.min() >= 2


def test_feature_kmeans_on_yeast_is_skewed(yeast_train):
    X, Y = yeast_train
    p = feature_kmeans(X, 5, seed=0, Y=Y)
    _assert_disjoint_cover(p, len(Y))
    assert p.sizes.min() >= 10
    drift_iid = iid(len(Y), 5, seed=0, Y=Y).summary.mean_phi_drift  # type: ignore[union-attr]
    assert p.summary is not None and p.summary.mean_phi_drift > drift_iid


@pytest.mark.parametrize("seed", range(5))
def test_masking_fractions_in_range_and_every_label_observed(yeast_train, seed):
    _, Y = yeast_train
    p = label_space_masking(Y, 6, observed_fraction=(0.5, 0.7), seed=seed)
    assert p.observed is not None and p.observed.shape == (6, 14) and p.observed.dtype == bool
    fractions = p.observed.mean(1)
    assert ((fractions >= 0.5) & (fractions <= 0.7)).all()
    assert p.observed.any(0).all()
    assert p.summary is not None
    for k in range(6):
        # unobserved labels count as absent, and the drift ignores them
        assert set(np.flatnonzero(~p.observed[k])) <= set(p.summary.absent_labels[k].tolist())
        assert p.summary.num_valid_pairs[k] <= p.observed[k].sum() * (p.observed[k].sum() - 1)


def test_masking_coverage_needs_swaps():
    # two clients each observing exactly half of 14 labels must observe complementary halves
    Y = clustered_labels(num_samples=100, num_labels=14)
    for seed in range(10):
        p = label_space_masking(Y, 2, observed_fraction=0.5, seed=seed)
        assert p.observed is not None
        assert p.observed.sum(1).tolist() == [7, 7]
        np.testing.assert_array_equal(p.observed[0], ~p.observed[1])


def test_masking_on_a_given_base():
    Y = clustered_labels()
    base = label_set_dirichlet(Y, 4, 0.2, seed=0, min_samples=10)
    p = label_space_masking(Y, 4, (0.6, 0.9), seed=0, base=base)
    for a, b in zip(p.client_indices, base.client_indices):
        np.testing.assert_array_equal(a, b)
    assert p.observed is not None
    with pytest.raises(ValueError, match=r"`base` to be a partition without a label mask, but it has one"):
        label_space_masking(Y, 4, seed=0, base=p)
    with pytest.raises(ValueError, match=r"`base` to have 5 clients \(`num_clients`\), but it has 4"):
        label_space_masking(Y, 5, seed=0, base=base)
    with pytest.raises(ValueError, match=r"`base` to be one of \('iid',\) or a `Partition`, but got 'dirichlet'"):
        label_space_masking(Y, 4, seed=0, base="dirichlet")


def test_with_summary_and_summary_shape_check():
    Y = clustered_labels(num_samples=50)
    p = iid(50, 3, seed=0)
    assert p.with_summary(Y).summary is not None
    with pytest.raises(ValueError, match=r"`observed` to have shape \(3, 8\), but got \(3, 2\)"):
        partition_summary(Y, p.client_indices, np.ones((3, 2), dtype=bool))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda Y: iid(10, 0), r"`num_clients` to be an int in \[1, 10\] \(the number of samples\), but got 0"),
        (lambda Y: iid(10, 11), r"`num_clients` to be an int in \[1, 10\].*but got 11"),
        (lambda Y: iid(10, 2.0), r"`num_clients` to be an int in \[1, 10\].*but got 2\.0"),
        (lambda Y: iid(10, True), r"`num_clients` to be an int.*but got True"),
        (lambda Y: iid(0, 1), r"`num_samples` to be a positive int, but got 0"),
        (lambda Y: iid(5, 2, Y=Y), r"`Y` to have 5 rows, but got shape \(40, 8\)"),
        (lambda Y: natural(np.zeros((2, 2))), r"`client_ids` to be a non-empty 1-D array, but got shape \(2, 2\)"),
        (lambda Y: label_set_dirichlet(Y, 2, alpha=0.0), r"`alpha` to be a positive float, but got 0\.0"),
        (lambda Y: label_set_dirichlet(Y, 2, alpha=float("nan")), r"`alpha` to be a positive float, but got nan"),
        (lambda Y: label_set_dirichlet(Y, 2, min_samples=0), r"`min_samples` to be a positive int, but got 0"),
        (
            lambda Y: label_set_dirichlet(Y, 5, min_samples=10),
            r"`num_clients \* min_samples` to be at most the 40.*HINT",
        ),
        (lambda Y: label_set_dirichlet(Y, 2, max_groups=0), r"`max_groups` to be a positive int, but got 0"),
        (lambda Y: label_set_dirichlet(Y + 1, 2), r"`Y` to hold only 0 and 1, but found other values"),
        (lambda Y: label_set_dirichlet(Y[:, 0], 2), r"`Y` to be a 0/1 array of shape \(N, L\), but got shape \(40,\)"),
        (lambda Y: feature_kmeans(np.full((4, 2), np.nan), 2), r"`X` to hold only finite values"),
        (
            lambda Y: feature_kmeans(np.zeros(4), 2),
            r"`X` to be a numeric array of shape \(N, D\), but got shape \(4,\)",
        ),
        (lambda Y: feature_kmeans(np.zeros((40, 2)), 2, max_iter=0), r"`max_iter` to be a positive int, but got 0"),
        (lambda Y: feature_kmeans(np.zeros((40, 2)), 2, num_init=0), r"`num_init` to be a positive int, but got 0"),
        (
            lambda Y: label_space_masking(Y, 2, (0.0, 0.5)),
            r"`observed_fraction` to be a float or a pair.*\(0\.0, 0\.5\)",
        ),
        (lambda Y: label_space_masking(Y, 2, (0.7, 0.5)), r"0 < low <= high <= 1, but got \(0\.7, 0\.5\)"),
        (lambda Y: label_space_masking(Y, 2, 1.5), r"`observed_fraction` to be a float or a pair.*but got 1\.5"),
        (lambda Y: label_space_masking(Y, 2, "half"), r"`observed_fraction`.*but got 'half'"),
        (lambda Y: label_space_masking(Y, 1, 0.5), r"cover all 8 labels, but 1 clients observe at most 4 labels.*HINT"),
    ],
)
def test_argument_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(clustered_labels(num_samples=40))
