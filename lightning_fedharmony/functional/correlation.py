"""Soft phi correlation of multi-label predictions.

FedHarmony (Kou et al., CVPR 2026, https://arxiv.org/abs/2604.28024) describes each client by the label-label
correlation of its model's soft predictions. Everything here works from the sufficient statistics
``(N, sum_n F_n, sum_n F_n^T F_n)`` so that statistics merged over batches or clients give exactly the pooled result.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Normalization = Literal["bernoulli", "pearson"]
_NORMALIZATIONS = ("bernoulli", "pearson")
_ROWS = 128  # rows per slab of in-place scaling


def _check_normalization(normalization: str, name: str = "normalization") -> None:
    if normalization not in _NORMALIZATIONS:
        raise ValueError(f"Expected argument `{name}` to be one of {_NORMALIZATIONS}, but got {normalization!r}.")


def _check_eps(eps: float) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"Expected argument `eps` to be a positive float, but got {eps!r}.")


def phi_from_moments(
    num_samples: Tensor | float,
    sum_preds: Tensor,
    sum_outer: Tensor,
    eps: float = 1e-6,
    normalization: Normalization = "bernoulli",
    *,
    detach_scale: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Soft phi correlation from accumulated sufficient statistics.

    With ``p_c = sum_preds_c / N`` and ``p_cc' = sum_outer_cc' / N``:
    ``R_cc' = (p_cc' - p_c p_c') / (sqrt(v_c v_c') + eps)`` with the diagonal set to 1, where ``v_c = p_c (1 - p_c)``
    (``"bernoulli"``, the paper's form) or ``v_c = p_cc - p_c^2`` (``"pearson"``, the empirical variance of the
    predictions, which is not attenuated by low prediction confidence).

    Args:
        num_samples: number of samples ``N`` the sums were taken over (scalar, may be a float tensor).
        sum_preds: ``(L,)`` sum of the probabilities.
        sum_outer: ``(L, L)`` sum of the outer products ``F_n^T F_n``.
        eps: added to the denominator; keeps constant columns finite.
        normalization: ``"bernoulli"`` or ``"pearson"``.
        detach_scale: stop gradients through the variances in the denominator, so the correlation cannot be moved
            by changing the predictions' confidence alone (METHOD.md section 9, "flattening").
        out: optional ``(L, L)`` buffer of ``sum_outer``'s dtype to write the result into, for callers that need no
            gradient and convert many statistics in a row (a server reusing one buffer allocates nothing per client).

    Returns:
        ``(L, L)`` correlation in the dtype of ``sum_outer``, values in ``[-1, 1]``, diagonal 1. With ``N == 0`` the
        identity is returned.

    Raises:
        ValueError: on shapes that do not fit, a non-positive ``eps``, or an ``out`` that does not fit or would need a
            gradient.

    Example:
        >>> import torch
        >>> preds = torch.tensor([[0.9, 0.8], [0.1, 0.2]])
        >>> phi_from_moments(2, preds.sum(0), preds.T @ preds).round(decimals=3)
        tensor([[1.0000, 0.4800],
                [0.4800, 1.0000]])
    """
    _check_eps(eps)
    _check_normalization(normalization)
    if sum_preds.ndim != 1 or sum_outer.shape != (sum_preds.shape[0], sum_preds.shape[0]):
        raise ValueError(
            "Expected `sum_preds` of shape (L,) and `sum_outer` of shape (L, L), but got"
            f" {tuple(sum_preds.shape)} and {tuple(sum_outer.shape)}."
        )
    dtype = sum_outer.dtype if sum_outer.is_floating_point() else torch.get_default_dtype()
    n = torch.as_tensor(num_samples, dtype=dtype, device=sum_outer.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (n, sum_preds, sum_outer))
    if out is not None:
        if needs_grad:
            raise ValueError("Expected no gradient through `phi_from_moments(..., out=...)`, but an input needs one.")
        if out.shape != sum_outer.shape or out.dtype != dtype:
            raise ValueError(
                f"Expected argument `out` to be a {tuple(sum_outer.shape)} {dtype} tensor, but got"
                f" {tuple(out.shape)} {out.dtype}."
            )
    safe_n = n.clamp_min(1.0)
    p = sum_preds.to(dtype) / safe_n
    if needs_grad:
        cov = sum_outer.to(dtype) / safe_n - p[:, None] * p[None, :]
        corr = _phi_from_cov(cov, p, eps, normalization, detach_scale)
        # no samples: no evidence of any correlation
        return torch.where(n > 0, corr, torch.eye(p.shape[0], dtype=dtype, device=p.device))
    # no gradient: one buffer, updated in place (each fresh L x L temporary costs more than the arithmetic)
    if not n > 0:
        eye = torch.eye(p.shape[0], dtype=dtype, device=p.device)
        return eye if out is None else out.copy_(eye)
    cov = torch.addr(sum_outer.to(dtype), p, p, beta=1.0 / float(safe_n), alpha=-1.0, out=out)
    return _phi_from_cov(cov, p, eps, normalization, detach_scale, inplace=True)


def phi_from_means(
    mean: Tensor,
    second_moment: Tensor,
    eps: float = 1e-6,
    normalization: Normalization = "bernoulli",
    *,
    detach_scale: bool = False,
) -> Tensor:
    """Soft phi from mean moments, batched over leading dimensions and differentiable.

    ``R = (E[F F^T] - p p^T) / (sqrt(v v^T) + eps)`` with ``p = mean``: the same value as :func:`phi_from_moments`
    for ``num_samples = 1``, for one group ``(S,)``/``(S, S)`` or many ``(G, S)``/``(G, S, S)`` (label blocks).

    Args:
        mean: ``(..., S)`` mean probabilities.
        second_moment: ``(..., S, S)`` mean outer products.
        eps: added to the denominator.
        normalization: ``"bernoulli"`` or ``"pearson"``.
        detach_scale: stop gradients through the variances in the denominator.

    Returns:
        ``(..., S, S)`` correlations, diagonal 1.

    Example:
        >>> import torch
        >>> preds = torch.tensor([[0.9, 0.8], [0.1, 0.2]])
        >>> phi_from_means(preds.mean(0), preds.T @ preds / 2).round(decimals=3)
        tensor([[1.0000, 0.4800],
                [0.4800, 1.0000]])
    """
    _check_eps(eps)
    _check_normalization(normalization)
    if second_moment.shape != (*mean.shape, mean.shape[-1]):
        raise ValueError(
            "Expected `mean` of shape (..., S) and `second_moment` of shape (..., S, S), but got"
            f" {tuple(mean.shape)} and {tuple(second_moment.shape)}."
        )
    cov = second_moment - mean[..., :, None] * mean[..., None, :]
    return _phi_from_cov(cov, mean, eps, normalization, detach_scale)


def _phi_from_cov(
    cov: Tensor, p: Tensor, eps: float, normalization: str, detach_scale: bool, *, inplace: bool = False
) -> Tensor:
    # batched: p (..., L), cov (..., L, L); `inplace` (no autograd) turns `cov` itself into the result
    var = p * (1 - p) if normalization == "bernoulli" else torch.diagonal(cov, dim1=-2, dim2=-1)
    if detach_scale:
        var = var.detach()
    # sqrt has an infinite slope at 0: a constant column would turn every gradient into NaN
    tiny = torch.finfo(var.dtype).tiny
    std = torch.where(var > tiny, var, tiny).sqrt()
    if inplace:
        for start in range(0, cov.shape[-2], _ROWS):  # row slabs keep the denominator's scratch small
            rows = slice(start, start + _ROWS)
            cov[..., rows, :].div_(std[..., rows, None] * std[..., None, :] + eps)
        cov.clamp_(-1.0, 1.0)
        torch.diagonal(cov, dim1=-2, dim2=-1).fill_(1.0)
        return cov
    corr = cov / (std[..., :, None] * std[..., None, :] + eps)
    eye = torch.eye(p.shape[-1], dtype=torch.bool, device=p.device)
    return corr.clamp(-1.0, 1.0).masked_fill(eye, 1.0)


def soft_phi(
    preds: Tensor, eps: float = 1e-6, normalization: Normalization = "bernoulli", *, detach_scale: bool = False
) -> Tensor:
    """Soft phi correlation of probabilities (the paper's ``R``), differentiable in ``preds``.

    Args:
        preds: ``(N, L)`` probabilities in ``[0, 1]``.
        eps: added to the denominator; keeps constant columns finite.
        normalization: ``"bernoulli"`` (the paper's) or ``"pearson"``; see :func:`phi_from_moments`.
        detach_scale: stop gradients through the variances in the denominator.

    Returns:
        ``(L, L)`` correlation, diagonal 1.

    Raises:
        ValueError: if ``preds`` is not a 2-D floating point tensor.

    Example:
        >>> import torch
        >>> soft_phi(torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])).round(decimals=2)
        tensor([[ 1.,  1., -1.],
                [ 1.,  1., -1.],
                [-1., -1.,  1.]])
    """
    if preds.ndim != 2 or not preds.is_floating_point():
        raise ValueError(
            f"Expected argument `preds` to be a floating point tensor of shape (N, L), but got dtype {preds.dtype}"
            f" and shape {tuple(preds.shape)}."
        )
    _check_eps(eps)
    _check_normalization(normalization)
    if preds.shape[0] == 0:
        return torch.eye(preds.shape[1], dtype=preds.dtype, device=preds.device)
    p = preds.mean(0)
    # centring before the product keeps float32 exact for saturated columns (moments would cancel catastrophically)
    centered = preds - p
    cov = centered.T @ centered / preds.shape[0]
    return _phi_from_cov(cov, p, eps, normalization, detach_scale)


def block_soft_phi(
    preds: Tensor,
    index: Tensor,
    eps: float = 1e-6,
    normalization: Normalization = "bernoulli",
    *,
    detach_scale: bool = False,
) -> Tensor:
    """Soft phi inside label blocks only: ``(G, S, S)`` for the labels ``index`` ``(G, S)`` of each block.

    Entry ``[g, i, j]`` equals ``soft_phi(preds)[index[g, i], index[g, j]]``, at a cost of ``N * G * S^2`` instead
    of ``N * L^2``: with ``G`` balanced blocks the in-block correlations cost about ``1/G`` of all pairs, which is
    where block-wise alignment saves time (the paper reports 28-32% less training time).

    Args:
        preds: ``(N, L)`` probabilities.
        index: ``(G, S)`` long label indices per block (pad short blocks with any label and mask the padding out).
        eps: added to the denominator.
        normalization: ``"bernoulli"`` or ``"pearson"``.
        detach_scale: stop gradients through the variances in the denominator.
    """
    _check_eps(eps)
    _check_normalization(normalization)
    if preds.ndim != 2 or index.ndim != 2:
        raise ValueError(
            f"Expected `preds` of shape (N, L) and `index` of shape (G, S), but got {tuple(preds.shape)} and"
            f" {tuple(index.shape)}."
        )
    gathered = preds[:, index]  # (N, G, S)
    p = gathered.mean(0)
    centered = gathered - p
    cov = torch.einsum("ngi,ngj->gij", centered, centered) / max(preds.shape[0], 1)
    return _phi_from_cov(cov, p, eps, normalization, detach_scale)
