"""Alignment loss and FedProx's proximal term against numpy (METHOD.md section 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import alignment_loss_ref, block_mask_ref, proximal_term_ref

from lightning_fedharmony.functional import (
    alignment_loss,
    block_mask,
    proximal_term,
    soft_phi,
    soft_phi_alignment_loss,
)


def _matrix(num_labels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(num_labels, num_labels, generator=generator, dtype=torch.float64) - 1


@pytest.mark.parametrize("num_labels", [1, 2, 5])
@pytest.mark.parametrize("mask_kind", ["blocks", "random", "all_off_diagonal"])
def test_alignment_loss_matches_reference(num_labels: int, mask_kind: str) -> None:
    corr, teacher = _matrix(num_labels, 1), _matrix(num_labels, 2)
    if mask_kind == "blocks":
        mask = torch.from_numpy(block_mask_ref([i % 2 for i in range(num_labels)]))
    elif mask_kind == "random":
        mask = torch.rand(num_labels, num_labels, generator=torch.Generator().manual_seed(3)) < 0.5
    else:
        mask = ~torch.eye(num_labels, dtype=torch.bool)
    got = alignment_loss(corr, teacher, mask)
    assert got.shape == ()
    expected = alignment_loss_ref(corr.numpy(), teacher.numpy(), mask.numpy())
    assert got.item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_alignment_loss_gradient_matches_reference() -> None:
    corr = _matrix(4, 4).requires_grad_(True)
    teacher = _matrix(4, 5)
    mask = block_mask(torch.tensor([0, 0, 1, 1]))
    alignment_loss(corr, teacher, mask).backward()
    assert corr.grad is not None
    m = mask.numpy()
    expected = np.where(m, 2 * (corr.detach().numpy() - teacher.numpy()) / m.sum(), 0.0)
    np.testing.assert_allclose(corr.grad.numpy(), expected, atol=1e-14)


def test_alignment_loss_empty_mask_is_zero_and_differentiable() -> None:
    preds = torch.rand(8, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64).requires_grad_(True)
    corr = soft_phi(preds)
    loss = alignment_loss(corr, torch.zeros(3, 3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.bool))
    assert loss.item() == 0.0
    assert loss.requires_grad
    loss.backward()
    assert preds.grad is not None
    torch.testing.assert_close(preds.grad, torch.zeros_like(preds))


def test_alignment_loss_of_matching_teacher_is_zero() -> None:
    corr = _matrix(4, 7)
    assert alignment_loss(corr, corr.clone(), torch.ones(4, 4, dtype=torch.bool)).item() == 0.0


def test_alignment_loss_dtypes() -> None:
    corr, teacher = _matrix(3, 8).float(), _matrix(3, 9)
    mask = ~torch.eye(3, dtype=torch.bool)
    got = alignment_loss(corr, teacher, mask)
    assert got.dtype == torch.float32
    expected = alignment_loss_ref(corr.double().numpy(), teacher.float().double().numpy(), mask.numpy())
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # an integer (0/1) mask works like a boolean one
    assert alignment_loss(corr, teacher, mask.int()).item() == pytest.approx(got.item(), rel=1e-6)


def test_alignment_loss_invalid_shapes() -> None:
    corr = _matrix(3, 10)
    mask = torch.ones(3, 3, dtype=torch.bool)
    match = (
        r"Expected `corr`, `teacher` and `mask` to share one \(L, L\) \(or batched \(\.\.\., L, L\)\) shape,"
        r" but got"
    )
    with pytest.raises(ValueError, match=match + r" \(3, 3\), \(2, 2\) and \(3, 3\)"):
        alignment_loss(corr, corr[:2, :2], mask)
    with pytest.raises(ValueError, match=match + r" \(3, 3\), \(3, 3\) and \(3, 2\)"):
        alignment_loss(corr, corr, mask[:, :2])
    with pytest.raises(ValueError, match=match):
        alignment_loss(corr[0], corr[0], mask[0])


def test_proximal_term_matches_reference() -> None:
    generator = torch.Generator().manual_seed(11)
    shapes = [(3, 4), (4,), (), (2, 2, 2)]
    params = [torch.randn(s, generator=generator) for s in shapes]
    global_params = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    for mu in (0.0, 1e-3, 0.7):
        got = proximal_term(params, global_params, mu)
        expected = proximal_term_ref([p.numpy() for p in params], [g.numpy() for g in global_params], mu)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_proximal_term_gradient() -> None:
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
    g = torch.tensor([0.0, 1.0, 0.5])
    proximal_term(iter([w]), iter([g]), mu=0.4).backward()
    assert w.grad is not None
    torch.testing.assert_close(w.grad, 0.4 * (w.detach() - g))


def test_proximal_term_bit_identical_to_the_composition() -> None:
    """The one-node term gives the value and, next to another loss on the same parameters, the gradients of the
    autograd composition bit for bit (the pinned FedProx weights depend on it)."""
    for seed in range(20):
        generator = torch.Generator().manual_seed(seed)
        shapes = [(32, 12), (32,), (5, 32), (5,)]
        base = [torch.randn(s, generator=generator) for s in shapes]
        anchors = [b + 1e-2 * torch.randn(b.shape, generator=generator) for b in base]
        x = torch.randn(8, 12, generator=generator)
        mu = (0.01, 0.7, 3.0)[seed % 3]
        fused, composed = ([b.clone().requires_grad_() for b in base] for _ in range(2))
        composition = 0.5 * mu * torch.stack([(p - g).square().sum() for p, g in zip(composed, anchors)]).sum()
        loss_fused = (x @ fused[0].T).square().mean() + proximal_term(fused, anchors, mu)
        loss_composed = (x @ composed[0].T).square().mean() + composition
        loss_fused.backward()
        loss_composed.backward()
        assert torch.equal(loss_fused, loss_composed)
        for a, b in zip(fused, composed):
            assert a.grad is not None and b.grad is not None and torch.equal(a.grad, b.grad)


def test_proximal_term_edge_cases() -> None:
    assert proximal_term([], [], mu=1.0).item() == 0.0
    w = torch.randn(5, generator=torch.Generator().manual_seed(12))
    assert proximal_term([w], [w.clone()], mu=3.0).item() == 0.0


def test_proximal_term_invalid() -> None:
    w = [torch.zeros(2)]
    with pytest.raises(ValueError, match=r"Expected argument `mu` to be non-negative, but got -0.1"):
        proximal_term(w, w, mu=-0.1)
    with pytest.raises(ValueError, match=r"Expected as many global parameters as local ones, but got 2 and 1"):
        proximal_term(w, [torch.zeros(2), torch.zeros(2)], mu=1.0)


@settings(max_examples=50, deadline=None, database=None, derandomize=True)
@given(num_labels=st.integers(1, 6), seed=st.integers(0, 2**16), density=st.sampled_from([0.0, 0.3, 1.0]))
def test_property_alignment_loss_finite(num_labels: int, seed: int, density: float) -> None:
    corr, teacher = _matrix(num_labels, seed), _matrix(num_labels, seed + 1)
    mask = torch.rand(num_labels, num_labels, generator=torch.Generator().manual_seed(seed)) < density
    got = alignment_loss(corr, teacher, mask)
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(alignment_loss_ref(corr.numpy(), teacher.numpy(), mask.numpy()), abs=1e-12)


@pytest.mark.parametrize("normalization", ["bernoulli", "pearson"])
@pytest.mark.parametrize("detach_scale", [False, True])
@pytest.mark.parametrize("case", ["symmetric", "asymmetric", "one_sample", "saturated_column", "float32", "empty_mask"])
def test_soft_phi_alignment_loss_equals_the_composition(normalization: str, detach_scale: bool, case: str) -> None:
    """The fused loss has the value and the gradient of ``alignment_loss(soft_phi(...))``."""
    generator = torch.Generator().manual_seed(3)
    num_samples = 1 if case == "one_sample" else 11
    dtype = torch.float32 if case == "float32" else torch.float64
    preds = torch.rand(num_samples, 6, generator=generator, dtype=torch.float64)
    if case == "saturated_column":
        preds[:, 2] = 1.0
    preds = preds.to(dtype).requires_grad_()
    teacher, mask = _matrix(6, 4).to(dtype), torch.rand(6, 6, generator=generator) < 0.6
    if case != "asymmetric":
        teacher, mask = 0.5 * (teacher + teacher.T), mask & mask.T
    if case == "empty_mask":
        mask = torch.zeros(6, 6, dtype=torch.bool)
    expected = alignment_loss(soft_phi(preds, 1e-6, normalization, detach_scale=detach_scale), teacher, mask)
    (expected_grad,) = torch.autograd.grad(expected, preds)
    got = soft_phi_alignment_loss(preds, teacher, mask, 1e-6, normalization, detach_scale=detach_scale)
    (got_grad,) = torch.autograd.grad(got, preds)
    # a saturated column has gradients in the thousands: compare relative to them too
    tolerance = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got.detach(), expected.detach(), atol=tolerance, rtol=tolerance)
    torch.testing.assert_close(got_grad, expected_grad, atol=tolerance, rtol=tolerance)
    assert got.dtype == dtype


@pytest.mark.parametrize("normalization", ["bernoulli", "pearson"])
def test_soft_phi_alignment_loss_gradcheck(normalization: str) -> None:
    preds = torch.rand(7, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64).requires_grad_()
    teacher, mask = _matrix(4, 6), ~torch.eye(4, dtype=torch.bool)
    teacher = 0.5 * (teacher + teacher.T)
    assert torch.autograd.gradcheck(lambda x: soft_phi_alignment_loss(x, teacher, mask, 1e-3, normalization), (preds,))


def test_soft_phi_alignment_loss_without_samples_and_bad_input() -> None:
    teacher, mask = torch.eye(3), ~torch.eye(3, dtype=torch.bool)
    torch.testing.assert_close(soft_phi_alignment_loss(torch.zeros(0, 3), teacher, mask), torch.tensor(0.0))
    with pytest.raises(ValueError, match=r"`preds` to be a floating point tensor of shape \(N, L\), but got dtype"):
        soft_phi_alignment_loss(torch.zeros(4, 3, dtype=torch.long), teacher, mask)
    with pytest.raises(ValueError, match=r"`teacher` and `mask` of shape \(3, 3\), but got \(2, 2\) and \(3, 3\)"):
        soft_phi_alignment_loss(torch.rand(4, 3), torch.eye(2), mask)
    with pytest.raises(ValueError, match="`normalization` to be one of"):
        soft_phi_alignment_loss(torch.rand(4, 3), teacher, mask, normalization="spearman")  # type: ignore[arg-type]
