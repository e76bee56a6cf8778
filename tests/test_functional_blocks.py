"""Spectral label blocks and the block mask (METHOD.md section 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import block_mask_ref, eigengap_num_blocks_ref, first_appearance_ref

from lightning_fedharmony.functional import block_mask, spectral_label_blocks


def _block_consensus(sizes: list[int], seed: int, noise: float = 0.05) -> tuple[torch.Tensor, np.ndarray]:
    """A consensus that is block-diagonal up to noise, labels shuffled; returns it and the true block of each label.

    In-block correlations are strong with random signs (the affinity is ``|R*|``), cross-block ones are noise.
    """
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    num_labels = len(truth)
    r = rng.uniform(-noise, noise, (num_labels, num_labels))
    same = truth[:, None] == truth[None, :]
    strong = rng.uniform(0.5, 0.9, (num_labels, num_labels)) * rng.choice([-1.0, 1.0], (num_labels, num_labels))
    r = np.where(same, strong, r)
    r = np.triu(r, 1)
    r = r + r.T + np.eye(num_labels)
    perm = rng.permutation(num_labels)
    return torch.from_numpy(r[np.ix_(perm, perm)]), truth[perm]


def _random_symmetric(num_labels: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    r = rng.uniform(-1, 1, (num_labels, num_labels))
    r = np.triu(r, 1)
    return torch.from_numpy(r + r.T + np.eye(num_labels))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("num_blocks", ["auto", 3])
def test_recovers_shuffled_blocks(seed: int, num_blocks: int | str) -> None:
    consensus, truth = _block_consensus([4, 3, 5], seed)
    got = spectral_label_blocks(consensus, num_blocks=num_blocks, seed=seed)
    assert got.shape == (12,)
    assert got.dtype == torch.long
    np.testing.assert_array_equal(first_appearance_ref(got.numpy()), first_appearance_ref(truth))


def test_eigengap_of_blocks_is_three() -> None:
    consensus, _ = _block_consensus([4, 3, 5], seed=0)
    num_blocks, margin = eigengap_num_blocks_ref(consensus.numpy())
    assert num_blocks == 3
    assert margin > 0.5


def test_float32_input() -> None:
    consensus, truth = _block_consensus([2, 5, 3], seed=11)
    got = spectral_label_blocks(consensus.float())
    np.testing.assert_array_equal(first_appearance_ref(got.numpy()), first_appearance_ref(truth))


@pytest.mark.parametrize("seed", range(6))
def test_auto_uses_reference_eigengap(seed: int) -> None:
    num_labels = 4 + seed
    consensus = _random_symmetric(num_labels, seed)
    for max_blocks in (32, 3):
        expected, margin = eigengap_num_blocks_ref(consensus.numpy(), max_blocks=max_blocks)
        assert margin > 1e-8, "near tie of eigengaps; pick another seed"
        auto = spectral_label_blocks(consensus, num_blocks="auto", seed=seed, max_blocks=max_blocks)
        fixed = spectral_label_blocks(consensus, num_blocks=expected, seed=seed)
        assert torch.equal(auto, fixed)
        assert int(auto.max()) < expected


def test_auto_on_clear_blocks_chooses_reference_count() -> None:
    # sizes 2, 2, 3, 3: the reference eigengap says 4 blocks and so does the partition
    consensus, truth = _block_consensus([2, 2, 3, 3], seed=3, noise=0.02)
    assert eigengap_num_blocks_ref(consensus.numpy())[0] == 4
    got = spectral_label_blocks(consensus)
    assert len(torch.unique(got)) == 4
    np.testing.assert_array_equal(first_appearance_ref(got.numpy()), first_appearance_ref(truth))


def test_deterministic_for_a_seed() -> None:
    consensus = _random_symmetric(10, seed=21)
    first = spectral_label_blocks(consensus, num_blocks=3, seed=7)
    for _ in range(3):
        assert torch.equal(spectral_label_blocks(consensus, num_blocks=3, seed=7), first)
    # the input is not modified
    assert torch.equal(consensus, _random_symmetric(10, seed=21))


@pytest.mark.parametrize("seed", range(2))
def test_numbered_by_first_appearance(seed: int) -> None:
    consensus = _random_symmetric(9, seed=30 + seed)
    got = spectral_label_blocks(consensus, num_blocks=4, seed=seed).numpy()
    np.testing.assert_array_equal(got, first_appearance_ref(got))
    assert got[0] == 0


def test_single_label() -> None:
    for num_blocks in ("auto", 1):
        torch.testing.assert_close(
            spectral_label_blocks(torch.ones(1, 1), num_blocks=num_blocks), torch.zeros(1).long()
        )


def test_two_labels() -> None:
    consensus = torch.tensor([[1.0, 0.3], [0.3, 1.0]])
    # two eigenvalues give one gap, so "auto" can only choose one block
    assert eigengap_num_blocks_ref(consensus.numpy())[0] == 1
    assert torch.equal(spectral_label_blocks(consensus), torch.tensor([0, 0]))
    assert torch.equal(spectral_label_blocks(consensus, num_blocks=2), torch.tensor([0, 1]))
    assert torch.equal(spectral_label_blocks(torch.eye(2), num_blocks=2), torch.tensor([0, 1]))


def test_one_block_is_all_labels() -> None:
    consensus, _ = _block_consensus([4, 3, 5], seed=1)
    assert torch.equal(spectral_label_blocks(consensus, num_blocks=1), torch.zeros(12, dtype=torch.long))
    assert torch.equal(spectral_label_blocks(consensus, max_blocks=1), torch.zeros(12, dtype=torch.long))


def test_as_many_blocks_as_labels_separates_every_label() -> None:
    consensus = _random_symmetric(5, seed=40)
    got = spectral_label_blocks(consensus, num_blocks=5)
    assert sorted(got.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("num_blocks", ["auto", 1, 3, 6])
def test_zero_matrix_isolated_labels(num_blocks: int | str) -> None:
    got = spectral_label_blocks(torch.zeros(6, 6), num_blocks=num_blocks)
    assert got.shape == (6,)
    assert int(got.min()) >= 0
    assert int(got.max()) < (1 if num_blocks == "auto" else int(num_blocks))
    np.testing.assert_array_equal(got.numpy(), first_appearance_ref(got.numpy()))


@pytest.mark.parametrize("num_blocks", ["auto", 3])
def test_constant_matrix(num_blocks: int | str) -> None:
    got = spectral_label_blocks(torch.full((7, 7), 0.4), num_blocks=num_blocks)
    assert got.shape == (7,)
    if num_blocks == "auto":
        # a complete graph has one zero eigenvalue and the rest equal: one block
        assert eigengap_num_blocks_ref(np.full((7, 7), 0.4))[0] == 1
        assert torch.equal(got, torch.zeros(7, dtype=torch.long))
    else:
        assert int(got.max()) < 3


def test_isolated_label_among_blocks() -> None:
    consensus, _ = _block_consensus([3, 3], seed=5)
    consensus = torch.block_diag(consensus, torch.ones(1, 1))  # label 6 correlates with nothing
    got = spectral_label_blocks(consensus, num_blocks=3)
    assert got.shape == (7,)
    assert int(got.max()) <= 2


def test_nan_in_consensus_is_treated_as_zero() -> None:
    consensus, truth = _block_consensus([3, 4], seed=6)
    consensus[0, 5] = consensus[5, 0] = float("nan")
    got = spectral_label_blocks(consensus, num_blocks=2)
    np.testing.assert_array_equal(first_appearance_ref(got.numpy()), first_appearance_ref(truth))


def test_invalid_arguments() -> None:
    consensus = torch.eye(4)
    with pytest.raises(ValueError, match=r"`consensus` to have shape \(L, L\) with L >= 1, but got \(4, 3\)"):
        spectral_label_blocks(consensus[:, :3])
    with pytest.raises(ValueError, match=r"`consensus` to have shape \(L, L\) with L >= 1, but got \(4,\)"):
        spectral_label_blocks(consensus[0])
    with pytest.raises(ValueError, match=r"`consensus` to have shape \(L, L\) with L >= 1, but got \(0, 0\)"):
        spectral_label_blocks(torch.zeros(0, 0))
    for bad in (0, 5, -1, "two", 2.0):
        with pytest.raises(ValueError, match=r"Expected argument `num_blocks` to be 'auto' or an int in \[1, 4\]"):
            spectral_label_blocks(consensus, num_blocks=bad)  # type: ignore[arg-type]
    for bad_max in (0, 2.5):
        with pytest.raises(ValueError, match=r"Expected argument `max_blocks` to be a positive int, but got"):
            spectral_label_blocks(consensus, max_blocks=bad_max)  # type: ignore[arg-type]


@pytest.mark.parametrize("ids", [[0, 0, 1, 2, 1, 0], [0], [0, 1], [3, 3, 3], [2, 0, 1, 0]])
def test_block_mask_matches_reference(ids: list[int]) -> None:
    got = block_mask(torch.tensor(ids))
    assert got.dtype == torch.bool
    np.testing.assert_array_equal(got.numpy(), block_mask_ref(ids))


def test_block_mask_of_spectral_blocks() -> None:
    consensus, truth = _block_consensus([4, 3, 5], seed=2)
    mask = block_mask(spectral_label_blocks(consensus))
    np.testing.assert_array_equal(mask.numpy(), block_mask_ref(truth))
    assert int(mask.sum()) == 4 * 3 + 3 * 2 + 5 * 4


def test_block_mask_invalid() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `cluster_ids` to have shape \(L,\), but got \(2, 2\)"):
        block_mask(torch.zeros(2, 2, dtype=torch.long))


# each k-means run costs a few ms, so fewer examples here than in the other property tests
@settings(max_examples=25, deadline=None, database=None, derandomize=True)
@given(
    num_labels=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([0.0, 1e-6, 1.0]),
    data=st.data(),
)
def test_property_valid_partition(num_labels: int, seed: int, scale: float, data: st.DataObject) -> None:
    consensus = scale * _random_symmetric(num_labels, seed)
    num_blocks = data.draw(st.one_of(st.just("auto"), st.integers(1, num_labels)))
    got = spectral_label_blocks(consensus, num_blocks=num_blocks, seed=seed)
    assert got.shape == (num_labels,)
    limit = num_labels if num_blocks == "auto" else int(num_blocks)
    assert int(got.min()) >= 0 and int(got.max()) < limit
    np.testing.assert_array_equal(got.numpy(), first_appearance_ref(got.numpy()))
