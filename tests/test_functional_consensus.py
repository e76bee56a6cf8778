"""Leave-one-out and global consensus against the numpy loop reference (METHOD.md section 2)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import (
    consensus_sums_ref,
    global_consensus_ref,
    leave_one_out_consensus_ref,
    leave_one_out_support_ref,
    pair_validity_ref,
)

from lightning_fedharmony.functional import (
    consensus_from_sums,
    consensus_sums,
    global_consensus,
    leave_one_out_consensus,
    leave_one_out_sums,
    leave_one_out_support,
    leave_one_out_teacher,
    pair_validity,
)


def _correlations(num_clients: int, num_labels: int, seed: int = 0) -> torch.Tensor:
    """Random symmetric ``(K, L, L)`` matrices in ``[-1, 1]`` with a unit diagonal."""
    generator = torch.Generator().manual_seed(seed)
    r = 2 * torch.rand(num_clients, num_labels, num_labels, generator=generator, dtype=torch.float64) - 1
    r = 0.5 * (r + r.transpose(1, 2))
    eye = torch.eye(num_labels, dtype=torch.bool)
    return r.masked_fill(eye, 1.0)


def _weights(num_clients: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 100)
    return torch.randint(1, 200, (num_clients,), generator=generator).double()


def _valid(num_clients: int, num_labels: int, seed: int = 0, rate: float = 0.7) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 200)
    return torch.rand(num_clients, num_labels, generator=generator) < rate


@pytest.mark.parametrize(("num_clients", "num_labels"), [(5, 4), (3, 6), (2, 3), (4, 1), (4, 2)])
@pytest.mark.parametrize("with_valid", [False, True])
def test_leave_one_out_consensus_matches_reference(num_clients: int, num_labels: int, with_valid: bool) -> None:
    seed = num_clients * 10 + num_labels
    corr, weights = _correlations(num_clients, num_labels, seed), _weights(num_clients, seed)
    valid = _valid(num_clients, num_labels, seed) if with_valid else None
    got = leave_one_out_consensus(corr, weights, valid)
    assert got.shape == corr.shape
    assert got.dtype == corr.dtype
    expected = leave_one_out_consensus_ref(corr.numpy(), weights.numpy(), None if valid is None else valid.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


@pytest.mark.parametrize(("num_clients", "num_labels"), [(5, 4), (1, 3), (2, 2), (3, 1)])
@pytest.mark.parametrize("with_valid", [False, True])
def test_global_consensus_matches_reference(num_clients: int, num_labels: int, with_valid: bool) -> None:
    seed = num_clients * 7 + num_labels
    corr, weights = _correlations(num_clients, num_labels, seed), _weights(num_clients, seed)
    valid = _valid(num_clients, num_labels, seed) if with_valid else None
    got = global_consensus(corr, weights, valid)
    assert got.shape == corr.shape[1:]
    expected = global_consensus_ref(corr.numpy(), weights.numpy(), None if valid is None else valid.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-12)


def test_client_that_never_sees_a_label() -> None:
    corr, weights = _correlations(4, 5, seed=1), _weights(4, seed=1)
    valid = torch.ones(4, 5, dtype=torch.bool)
    valid[2, 3] = False  # client 2 never observes label 3
    got = leave_one_out_consensus(corr, weights, valid)
    np.testing.assert_allclose(
        got.numpy(), leave_one_out_consensus_ref(corr.numpy(), weights.numpy(), valid.numpy()), atol=1e-12
    )
    # client 2's vote on pairs with label 3 is ignored: changing it changes nobody's teacher
    perturbed = corr.clone()
    perturbed[2, 3, :] = perturbed[2, :, 3] = -1.0
    perturbed[2, 3, 3] = 1.0
    torch.testing.assert_close(leave_one_out_consensus(perturbed, weights, valid), got)
    torch.testing.assert_close(global_consensus(perturbed, weights, valid), global_consensus(corr, weights, valid))


def test_label_that_no_other_client_sees_has_zero_teacher() -> None:
    corr, weights = _correlations(3, 4, seed=2), _weights(3, seed=2)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1:, 0] = False  # only client 0 sees label 0
    got = leave_one_out_consensus(corr, weights, valid)
    torch.testing.assert_close(got[0, 0, 1:], torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(got[0, 1:, 0], torch.zeros(3, dtype=torch.float64))
    assert got[0, 0, 0].item() == 1.0
    # the others learn label 0's correlations from client 0 alone
    torch.testing.assert_close(got[1, 0, 1:], corr[0, 0, 1:])
    support = leave_one_out_support(weights, valid, 4)
    assert not support[0, 0, 1:].any()
    assert support[1, 0, 1:].all()


def test_single_client_has_no_teacher() -> None:
    corr = _correlations(1, 4, seed=3)
    got = leave_one_out_consensus(corr, torch.tensor([10.0], dtype=torch.float64))
    torch.testing.assert_close(got[0], torch.eye(4, dtype=torch.float64))
    assert not leave_one_out_support(torch.tensor([10.0]), None, 4).any()
    # the global consensus of one client is that client
    torch.testing.assert_close(global_consensus(corr, torch.tensor([3.0], dtype=torch.float64)), corr[0])


def test_two_clients_teach_each_other() -> None:
    corr = _correlations(2, 3, seed=4)
    got = leave_one_out_consensus(corr, torch.tensor([5.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(got[0], corr[1])
    torch.testing.assert_close(got[1], corr[0])


def test_uniform_and_scaled_weights() -> None:
    corr = _correlations(4, 3, seed=5)
    ones = torch.ones(4, dtype=torch.float64)
    got = leave_one_out_consensus(corr, ones)
    for k in range(4):
        others = [j for j in range(4) if j != k]
        torch.testing.assert_close(got[k], corr[others].mean(0))
    # only ratios of weights matter
    weights = _weights(4, seed=5)
    torch.testing.assert_close(leave_one_out_consensus(corr, 1e-3 * weights), leave_one_out_consensus(corr, weights))


def test_zero_weight_client_does_not_vote() -> None:
    corr = _correlations(3, 3, seed=6)
    weights = torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64)
    got = leave_one_out_consensus(corr, weights)
    np.testing.assert_allclose(got.numpy(), leave_one_out_consensus_ref(corr.numpy(), weights.numpy()), atol=1e-12)
    torch.testing.assert_close(got[1], corr[2])  # client 0 has weight 0
    support = leave_one_out_support(weights, None, 3)
    np.testing.assert_array_equal(support.numpy(), leave_one_out_support_ref(weights.numpy(), None, 3))
    # K=2 with the other client at weight 0: no teacher
    two = leave_one_out_consensus(corr[:2], weights[:2])
    torch.testing.assert_close(two[1], torch.eye(3, dtype=torch.float64))


@pytest.mark.parametrize("tiny", [1e-6, 1e-10, 1e-13])
def test_leave_one_out_with_dominant_client_weight(tiny: float) -> None:
    """Weights spanning many orders of magnitude (e.g. exp(-gamma s_k) quality weights of outlier clients).

    Client 0 holds almost all the weight; its teacher is still the weighted mean of the two others, and
    :func:`leave_one_out_support` agrees that there is support.
    """
    corr = _correlations(3, 3, seed=7)
    weights = torch.tensor([1.0, tiny, 2 * tiny], dtype=torch.float64)
    got = leave_one_out_consensus(corr, weights)
    expected = leave_one_out_consensus_ref(corr.numpy(), weights.numpy())
    assert leave_one_out_support(weights, None, 3)[0].fill_diagonal_(True).all()
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-3)


@pytest.mark.parametrize("with_valid", [False, True])
def test_consensus_sums_matches_reference_and_merges(with_valid: bool) -> None:
    corr, weights = _correlations(5, 4, seed=8), _weights(5, seed=8)
    valid = _valid(5, 4, seed=8) if with_valid else None
    numerator, denominator = consensus_sums(corr, weights, valid)
    assert numerator.dtype == denominator.dtype == torch.float64
    ref_num, ref_den = consensus_sums_ref(corr.numpy(), weights.numpy(), None if valid is None else valid.numpy())
    np.testing.assert_allclose(numerator.numpy(), ref_num, rtol=1e-12)
    np.testing.assert_allclose(denominator.numpy(), ref_den, rtol=1e-12)
    # sums over two groups of clients add up to the sums over all
    first = consensus_sums(corr[:2], weights[:2], None if valid is None else valid[:2])
    second = consensus_sums(corr[2:], weights[2:], None if valid is None else valid[2:])
    torch.testing.assert_close(first[0] + second[0], numerator)
    torch.testing.assert_close(first[1] + second[1], denominator)
    torch.testing.assert_close(consensus_from_sums(numerator, denominator), global_consensus(corr, weights, valid))


def test_leave_one_out_sums_one_client_at_a_time() -> None:
    corr, weights, valid = _correlations(4, 3, seed=9), _weights(4, seed=9), _valid(4, 3, seed=9)
    numerator, denominator = consensus_sums(corr, weights, valid)
    teachers = leave_one_out_consensus(corr, weights, valid)
    for k in range(4):
        loo_num, loo_den = leave_one_out_sums(numerator, denominator, corr[k], weights[k], valid[k])
        torch.testing.assert_close(consensus_from_sums(loo_num, loo_den), teachers[k])


@pytest.mark.parametrize("case", ["all_valid", "some_invalid", "zero_weights", "dominant_weight", "float32_sums"])
def test_leave_one_out_teacher_matches_the_batched_teachers(case: str) -> None:
    """The server's one-client-at-a-time teacher equals :func:`leave_one_out_consensus` and its support."""
    corr, weights = _correlations(5, 6, seed=17), _weights(5, seed=17)
    valid = None if case in ("all_valid", "dominant_weight") else _valid(5, 6, seed=17, rate=0.6)
    if case == "zero_weights":
        weights[::2] = 0.0
    if case == "dominant_weight":
        weights = torch.tensor([1.0, 1e-9, 2e-9, 3e-9, 1e-9], dtype=torch.float64)
    teachers = leave_one_out_consensus(corr, weights, valid)
    support = leave_one_out_support(weights, valid, 6)
    numerator, denominator = consensus_sums(list(corr), weights, valid)
    if case == "float32_sums":
        numerator, denominator = numerator.float(), denominator.float()
    for k in range(5):
        teacher, has_support = leave_one_out_teacher(
            numerator, denominator, corr[k], weights[k], None if valid is None else valid[k]
        )
        assert teacher.dtype == numerator.dtype and has_support.dtype == torch.bool
        off_diagonal = ~torch.eye(6, dtype=torch.bool)
        np.testing.assert_array_equal((has_support & off_diagonal).numpy(), (support[k] & off_diagonal).numpy())
        tolerance = 1e-5 if case in ("float32_sums", "dominant_weight") else 1e-12
        torch.testing.assert_close(teacher.double(), teachers[k], atol=tolerance, rtol=0)


def test_consensus_sums_takes_a_sequence_of_matrices() -> None:
    corr, weights, valid = _correlations(4, 3, seed=18), _weights(4, seed=18), _valid(4, 3, seed=18)
    stacked = consensus_sums(corr, weights, valid)
    listed = consensus_sums([c.float() for c in corr], weights, valid)
    torch.testing.assert_close(listed, stacked, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"`correlations` to hold \(L, L\) tensors of one shape, but got shapes"):
        consensus_sums([corr[0], corr[1, :2, :2]], weights[:2])


def test_consensus_from_sums_without_support() -> None:
    numerator = torch.tensor([[5.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    denominator = torch.zeros(2, 2, dtype=torch.float64)
    torch.testing.assert_close(consensus_from_sums(numerator, denominator), torch.eye(2, dtype=torch.float64))


def test_pair_validity_matches_reference() -> None:
    valid = _valid(3, 4, seed=10, rate=0.5)
    np.testing.assert_array_equal(pair_validity(valid).numpy(), pair_validity_ref(valid.numpy()))
    assert pair_validity(valid.int()).dtype == torch.bool


@pytest.mark.parametrize("with_valid", [False, True])
def test_leave_one_out_support_matches_reference(with_valid: bool) -> None:
    weights = torch.tensor([3.0, 0.0, 1.0, 2.0])
    valid = _valid(4, 5, seed=11, rate=0.5) if with_valid else None
    got = leave_one_out_support(weights, valid, 5)
    assert got.dtype == torch.bool
    expected = leave_one_out_support_ref(weights.numpy(), None if valid is None else valid.numpy(), 5)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_float32_input_keeps_dtype() -> None:
    corr, weights, valid = _correlations(3, 4, seed=12), _weights(3, seed=12), _valid(3, 4, seed=12)
    got = leave_one_out_consensus(corr.float(), weights.float(), valid)
    assert got.dtype == torch.float32
    expected = leave_one_out_consensus_ref(corr.float().double().numpy(), weights.numpy(), valid.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-6)
    assert global_consensus(corr.float(), weights, valid).dtype == torch.float32


def test_invalid_arguments() -> None:
    corr, weights = _correlations(3, 4), _weights(3)
    for fn in (leave_one_out_consensus, global_consensus, consensus_sums):
        with pytest.raises(ValueError, match=r"Expected argument `correlations` to have shape \(K, L, L\), but got"):
            fn(corr[0], weights)
        with pytest.raises(ValueError, match=r"`correlations` to have shape \(K, L, L\), but got \(3, 4, 3\)"):
            fn(corr[:, :, :3], weights)
        with pytest.raises(ValueError, match=r"Expected argument `weights` to have shape \(3,\), but got \(2,\)"):
            fn(corr, weights[:2])
        with pytest.raises(ValueError, match=r"`weights` to be finite and non-negative, but got \[1.0, -1.0, 2.0\]"):
            fn(corr, torch.tensor([1.0, -1.0, 2.0]))
        with pytest.raises(ValueError, match="`weights` to be finite and non-negative, but got"):
            fn(corr, torch.tensor([1.0, float("nan"), 2.0]))
        with pytest.raises(ValueError, match=r"Expected argument `valid` to have shape \(3, 4\), but got \(3, 3\)"):
            fn(corr, weights, torch.ones(3, 3, dtype=torch.bool))


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(
    num_clients=st.integers(1, 5),
    num_labels=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    rate=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    zero_weights=st.booleans(),
)
def test_property_finite_and_matches_reference(
    num_clients: int, num_labels: int, seed: int, rate: float, zero_weights: bool
) -> None:
    corr = _correlations(num_clients, num_labels, seed)
    weights = _weights(num_clients, seed)
    if zero_weights:
        weights[::2] = 0.0
    valid = _valid(num_clients, num_labels, seed, rate=rate)
    got = leave_one_out_consensus(corr, weights, valid)
    assert torch.isfinite(got).all()
    expected = leave_one_out_consensus_ref(corr.numpy(), weights.numpy(), valid.numpy())
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-10)
    glob = global_consensus(corr, weights, valid)
    assert torch.isfinite(glob).all()
    np.testing.assert_allclose(glob.numpy(), global_consensus_ref(corr.numpy(), weights.numpy(), valid.numpy()))
