"""Client-side loss terms: FedHarmony's consensus alignment and FedProx's proximal term."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def alignment_loss(corr: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean squared in-block discrepancy ``sum_{(c,c') in M} (R_cc' - R*_cc')^2 / |M|``.

    FedHarmony's consensus-guided correction (https://arxiv.org/abs/2604.28024), normalised by the number of pairs.

    Args:
        corr: ``(L, L)`` correlation of the current predictions (differentiable).
        teacher: ``(L, L)`` consensus of the other clients.
        mask: ``(L, L)`` bool, the pairs to align.

    Returns:
        Scalar; ``0`` (still attached to ``corr``'s graph) when the mask is empty.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[1.0, 0.5], [0.5, 1.0]])
        >>> alignment_loss(corr, torch.eye(2), ~torch.eye(2, dtype=torch.bool))
        tensor(0.2500)
    """
    if corr.shape != teacher.shape or corr.shape != mask.shape or corr.ndim < 2:
        raise ValueError(
            "Expected `corr`, `teacher` and `mask` to share one (L, L) (or batched (..., L, L)) shape, but got"
            f" {tuple(corr.shape)}, {tuple(teacher.shape)} and {tuple(mask.shape)}."
        )
    weight = mask.to(corr.dtype)
    count = weight.sum()
    squared = (corr - teacher.to(corr.dtype)).square() * weight
    return squared.sum() / count.clamp_min(1.0)


def proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` (Li et al., MLSys 2020).

    Raises:
        ValueError: if ``mu`` is negative or the two parameter lists differ in length.
    """
    if mu < 0:
        raise ValueError(f"Expected argument `mu` to be non-negative, but got {mu}.")
    params, global_params = list(params), list(global_params)
    if len(params) != len(global_params):
        raise ValueError(
            f"Expected as many global parameters as local ones, but got {len(global_params)} and {len(params)}."
        )
    if not params:
        return torch.tensor(0.0)
    total = torch.stack([(p - g.to(p)).square().sum() for p, g in zip(params, global_params)]).sum()
    return 0.5 * mu * total
