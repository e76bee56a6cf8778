"""Soft phi and phi from moments against the numpy reference (METHOD.md section 1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reference import soft_phi_ref

from lightning_fedharmony.functional import phi_from_moments, soft_phi
from lightning_fedharmony.functional.correlation import Normalization

NORMALIZATIONS: list[Normalization] = ["bernoulli", "pearson"]


def _preds(num_samples: int, num_labels: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(num_samples, num_labels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize(("num_samples", "num_labels"), [(20, 5), (7, 3), (1, 4), (30, 1), (12, 2)])
def test_soft_phi_matches_reference(normalization: Normalization, num_samples: int, num_labels: int) -> None:
    preds = _preds(num_samples, num_labels, seed=num_samples * 10 + num_labels)
    got = soft_phi(preds, normalization=normalization)
    assert got.shape == (num_labels, num_labels)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds.numpy(), normalization=normalization), atol=1e-12)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("value", [0.0, 0.3, 1.0])
def test_soft_phi_constant_column_matches_reference(normalization: Normalization, value: float) -> None:
    preds = _preds(15, 4, seed=3)
    preds[:, 2] = value
    got = soft_phi(preds, normalization=normalization)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds.numpy(), normalization=normalization), atol=1e-9)
    # a column without variation is uncorrelated with everything
    np.testing.assert_allclose(got[2, [0, 1, 3]].numpy(), 0.0, atol=1e-9)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("num_samples", [64, 256, 1024])
def test_soft_phi_float32_saturated_column_is_uncorrelated(normalization: Normalization, num_samples: int) -> None:
    """A label the model predicts with full confidence (sigmoid saturates to exactly 1.0 in float32 from logit ~17).

    Its column has no variation, so its correlation with every other label is 0 (the float64 reference gives 0).
    """
    logits = torch.randn(num_samples, 4, generator=torch.Generator().manual_seed(num_samples))
    logits[:, 1] = 20.0
    preds = torch.sigmoid(logits)
    assert bool((preds[:, 1] == 1.0).all())
    got = soft_phi(preds, normalization=normalization)
    expected = soft_phi_ref(preds.double().numpy(), normalization=normalization)
    np.testing.assert_allclose(expected[1, [0, 2, 3]], 0.0, atol=1e-9)
    np.testing.assert_allclose(got.double().numpy(), expected, atol=1e-3)


def test_soft_phi_value_range_and_symmetry() -> None:
    preds = _preds(40, 6, seed=1)
    for normalization in NORMALIZATIONS:
        got = soft_phi(preds, normalization=normalization)
        torch.testing.assert_close(got, got.T)
        torch.testing.assert_close(torch.diagonal(got), torch.ones(6, dtype=torch.float64))
        assert bool((got.abs() <= 1.0).all())


def test_soft_phi_bernoulli_is_attenuated_pearson_is_not() -> None:
    # two identical columns: Pearson gives 1 (up to eps), the Bernoulli denominator p(1-p) exceeds the variance
    base = 0.4 + 0.2 * _preds(50, 1, seed=2)
    preds = torch.cat([base, base], dim=1)
    assert soft_phi(preds, normalization="pearson")[0, 1].item() == pytest.approx(1.0, abs=1e-3)
    bernoulli = soft_phi(preds, normalization="bernoulli")[0, 1].item()
    assert 0.0 < bernoulli < 0.1


def test_soft_phi_hard_labels_is_phi_coefficient() -> None:
    # on 0/1 labels both normalisations equal the phi coefficient (Pearson correlation of the binary columns)
    labels = (_preds(60, 4, seed=4) > 0.5).double()
    expected = np.corrcoef(labels.numpy(), rowvar=False)
    for normalization in NORMALIZATIONS:
        np.testing.assert_allclose(soft_phi(labels, normalization=normalization).numpy(), expected, atol=1e-5)


def test_soft_phi_float32_dtype_and_matches_reference() -> None:
    preds = _preds(25, 5, seed=5).float()
    got = soft_phi(preds)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds.double().numpy()), atol=1e-5)


def test_soft_phi_no_samples_is_identity() -> None:
    torch.testing.assert_close(soft_phi(torch.zeros(0, 3)), torch.eye(3))
    torch.testing.assert_close(phi_from_moments(0, torch.zeros(3), torch.zeros(3, 3)), torch.eye(3))


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_phi_from_moments_matches_reference(normalization: Normalization) -> None:
    preds = _preds(33, 6, seed=6)
    got = phi_from_moments(33, preds.sum(0), preds.T @ preds, normalization=normalization)
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds.numpy(), normalization=normalization), atol=1e-12)
    # the sample count may be a tensor
    got_tensor_n = phi_from_moments(torch.tensor(33.0), preds.sum(0), preds.T @ preds, normalization=normalization)
    torch.testing.assert_close(got_tensor_n, got)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_phi_from_moments_in_place_paths_match_the_autograd_path(normalization: Normalization) -> None:
    """Without a gradient the result is built in one buffer (``out`` when given); the values do not change."""
    preds = _preds(29, 7, seed=16)
    sum_preds, sum_outer = preds.sum(0), preds.T @ preds
    with_grad = phi_from_moments(29, sum_preds.requires_grad_(), sum_outer, normalization=normalization)
    assert with_grad.requires_grad
    no_grad = phi_from_moments(29, sum_preds.detach(), sum_outer, normalization=normalization)
    out = torch.full((7, 7), float("nan"), dtype=torch.float64)
    into = phi_from_moments(29, sum_preds.detach(), sum_outer, normalization=normalization, out=out)
    assert into.data_ptr() == out.data_ptr()
    torch.testing.assert_close(no_grad, with_grad.detach(), atol=1e-15, rtol=0)
    torch.testing.assert_close(into, with_grad.detach(), atol=1e-15, rtol=0)
    # the input moments are left as they were
    torch.testing.assert_close(sum_outer, preds.T @ preds)
    # no samples: the identity, into the buffer too
    empty = phi_from_moments(0, torch.zeros(7), torch.zeros(7, 7, dtype=torch.float64), out=out)
    torch.testing.assert_close(empty, torch.eye(7).double())
    torch.testing.assert_close(out, torch.eye(7).double())


def test_phi_from_moments_invalid_out() -> None:
    sum_preds, sum_outer = torch.ones(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"`out` to be a \(3, 3\) torch.float64 tensor, but got \(2, 2\) torch.f"):
        phi_from_moments(4, sum_preds, sum_outer, out=torch.empty(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"to be a \(3, 3\) torch.float64 tensor, but got \(3, 3\) torch.float32"):
        phi_from_moments(4, sum_preds, sum_outer, out=torch.empty(3, 3))
    with pytest.raises(ValueError, match=r"no gradient through `phi_from_moments\(..., out=...\)`, but an input needs"):
        phi_from_moments(4, sum_preds.requires_grad_(), sum_outer, out=torch.empty(3, 3, dtype=torch.float64))


@pytest.mark.parametrize("eps", [1e-3, 0.5])
def test_phi_from_moments_eps_matches_reference(eps: float) -> None:
    preds = _preds(10, 3, seed=7)
    got = phi_from_moments(10, preds.sum(0), preds.T @ preds, eps=eps)
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds.numpy(), eps=eps), atol=1e-12)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_merged_moments_equal_one_pass(normalization: Normalization) -> None:
    preds = _preds(47, 5, seed=8)
    batches = torch.split(preds, [10, 1, 17, 19])
    n = sum(b.shape[0] for b in batches)
    sum_preds = sum(b.sum(0) for b in batches)
    sum_outer = sum(b.T @ b for b in batches)
    assert isinstance(sum_preds, torch.Tensor) and isinstance(sum_outer, torch.Tensor)
    merged = phi_from_moments(n, sum_preds, sum_outer, normalization=normalization)
    torch.testing.assert_close(merged, soft_phi(preds, normalization=normalization), atol=1e-12, rtol=0)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_merged_moments_bitwise_equal_on_dyadic_predictions(normalization: Normalization) -> None:
    # multiples of 1/16: every product and sum is exact in float64, so the order of summation cannot matter
    generator = torch.Generator().manual_seed(9)
    preds = torch.randint(0, 17, (60, 4), generator=generator).double() / 16
    clients = torch.split(preds, [25, 5, 30])
    merged = phi_from_moments(
        60,
        torch.stack([c.sum(0) for c in clients]).sum(0),
        torch.stack([c.T @ c for c in clients]).sum(0),
        normalization=normalization,
    )
    one_pass = phi_from_moments(60, preds.sum(0), preds.T @ preds, normalization=normalization)
    assert torch.equal(merged, one_pass)
    # soft_phi centres before the product (stable in float32), so it agrees to rounding, not bit for bit
    torch.testing.assert_close(merged, soft_phi(preds, normalization=normalization), atol=1e-12, rtol=0)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
def test_soft_phi_gradcheck(normalization: Normalization) -> None:
    # interior predictions and a weak correlation: far from the clamp at +-1 and from zero variance
    preds = (0.2 + 0.6 * _preds(8, 3, seed=10)).requires_grad_(True)
    assert bool((soft_phi(preds, normalization=normalization).abs() < 0.99).sum() == 6)
    assert torch.autograd.gradcheck(lambda x: soft_phi(x, normalization=normalization), (preds,))


def _degenerate(case: str) -> torch.Tensor:
    preds = _preds(6, 3, seed=11)
    if case == "single_sample":
        return preds[:1].clone()
    preds[:, 2] = {"zeros": 0.0, "ones": 1.0, "constant": 0.3}[case]
    return preds


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("case", ["zeros", "ones", "constant", "single_sample"])
def test_soft_phi_gradient_finite_on_degenerate_input(normalization: Normalization, case: str) -> None:
    """A batch in which one label is predicted constantly (e.g. saturated at 0 or 1) must not poison training."""
    preds = _degenerate(case).requires_grad_(True)
    corr = soft_phi(preds, normalization=normalization)
    assert torch.isfinite(corr).all()
    target = torch.full_like(corr, 0.5)
    (corr - target).square().sum().backward()
    assert preds.grad is not None
    assert torch.isfinite(preds.grad).all(), preds.grad


def test_soft_phi_invalid_input() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `preds` to be a floating point tensor of shape \(N, L\)"):
        soft_phi(torch.rand(5))
    with pytest.raises(ValueError, match=r"but got dtype torch\.int64"):
        soft_phi(torch.ones(4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"Expected argument `eps` to be a positive float, but got 0"):
        soft_phi(torch.rand(4, 3), eps=0.0)
    with pytest.raises(ValueError, match=r"Expected argument `eps` to be a positive float, but got -1e-06"):
        soft_phi(torch.rand(4, 3), eps=-1e-6)
    with pytest.raises(ValueError, match=r"Expected argument `normalization` to be one of .*'pearson'.*'spearman'"):
        soft_phi(torch.rand(4, 3), normalization="spearman")  # type: ignore[arg-type]


def test_phi_from_moments_invalid_input() -> None:
    with pytest.raises(ValueError, match=r"Expected `sum_preds` of shape \(L,\) .* but got \(3,\) and \(3, 4\)"):
        phi_from_moments(4, torch.zeros(3), torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"but got \(1, 3\) and \(3, 3\)"):
        phi_from_moments(4, torch.zeros(1, 3), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="`eps` to be a positive float"):
        phi_from_moments(4, torch.zeros(3), torch.zeros(3, 3), eps=0)
    with pytest.raises(ValueError, match="`normalization` to be one of"):
        phi_from_moments(4, torch.zeros(3), torch.zeros(3, 3), normalization="gaussian")  # type: ignore[arg-type]


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(
    preds=arrays(
        np.float64,
        st.tuples(st.integers(1, 6), st.integers(1, 5)),
        elements=st.floats(0.0, 1.0, allow_nan=False),
    ),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_soft_phi_property_finite_and_matches_reference(preds: np.ndarray, normalization: Normalization) -> None:
    got = soft_phi(torch.from_numpy(preds), normalization=normalization)
    assert torch.isfinite(got).all()
    assert bool((got.abs() <= 1.0).all())
    np.testing.assert_allclose(got.numpy(), soft_phi_ref(preds, normalization=normalization), atol=1e-6)


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(
    preds=arrays(
        np.float32,
        st.tuples(st.integers(0, 6), st.integers(1, 5)),
        elements=st.floats(-10.0, 10.0, allow_nan=False, width=32),
    ),
    normalization=st.sampled_from(NORMALIZATIONS),
)
def test_soft_phi_property_finite_for_any_finite_input(preds: np.ndarray, normalization: Normalization) -> None:
    # even values outside [0, 1] (e.g. logits passed by mistake) give a finite result in [-1, 1]
    got = soft_phi(torch.from_numpy(preds), normalization=normalization)
    assert torch.isfinite(got).all()
    assert bool((got.abs() <= 1.0).all())


@pytest.mark.parametrize("normalization", ["bernoulli", "pearson"])
def test_phi_from_means_equals_phi_from_moments_per_group(normalization: str) -> None:
    from lightning_fedharmony.functional import phi_from_means, phi_from_moments

    generator = torch.Generator().manual_seed(3)
    preds = torch.rand(40, 2, 5, generator=generator, dtype=torch.float64)  # (N, G, S): two groups of five labels
    mean = preds.mean(0)
    second = torch.einsum("ngi,ngj->gij", preds, preds) / preds.shape[0]
    batched = phi_from_means(mean, second, normalization=normalization)  # type: ignore[arg-type]
    for group in range(2):
        cols = preds[:, group]
        expected = phi_from_moments(40, cols.sum(0), cols.T @ cols, normalization=normalization)  # type: ignore[arg-type]
        torch.testing.assert_close(batched[group], expected, atol=1e-12, rtol=0)
    with pytest.raises(ValueError, match=r"`mean` of shape \(\.\.\., S\) and `second_moment` of shape"):
        phi_from_means(mean, second[:, :4])
