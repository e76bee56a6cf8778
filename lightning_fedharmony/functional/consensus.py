"""The Correlation Expert: consensus of the clients' label correlations.

FedHarmony (https://arxiv.org/abs/2604.28024) teaches each client with the consensus of the *other* clients'
correlations (leave-one-out), so that a client never teaches itself. Per label pair, the consensus is the weighted
mean over the clients that have support for both labels.
"""

from __future__ import annotations

import torch
from torch import Tensor


def pair_validity(valid: Tensor) -> Tensor:
    """Pairs of labels that are both valid: ``(..., L)`` -> ``(..., L, L)`` bool."""
    valid = valid.bool()
    return valid[..., :, None] & valid[..., None, :]


def _check_consensus_args(correlations: Tensor, weights: Tensor, valid: Tensor | None) -> None:
    if correlations.ndim != 3 or correlations.shape[1] != correlations.shape[2]:
        raise ValueError(
            f"Expected argument `correlations` to have shape (K, L, L), but got {tuple(correlations.shape)}."
        )
    num_clients, num_labels = correlations.shape[:2]
    if weights.shape != (num_clients,):
        raise ValueError(f"Expected argument `weights` to have shape ({num_clients},), but got {tuple(weights.shape)}.")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"Expected argument `weights` to be finite and non-negative, but got {weights.tolist()}.")
    if valid is not None and valid.shape != (num_clients, num_labels):
        raise ValueError(
            f"Expected argument `valid` to have shape ({num_clients}, {num_labels}), but got {tuple(valid.shape)}."
        )


def consensus_sums(correlations: Tensor, weights: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Weighted sums behind every consensus: ``(sum_j w_j V_j R_j, sum_j w_j V_j)``, each ``(L, L)`` float64.

    Sums can be built incrementally (add one client at a time) and a client's leave-one-out teacher is the total
    minus its own term, which is what keeps the server step at ``O(K L^2)`` time and ``O(L^2)`` extra memory.
    """
    _check_consensus_args(correlations, weights, valid)
    w = weights.to(torch.float64)
    if valid is None:
        support = w[:, None, None].expand(correlations.shape)
    else:
        support = pair_validity(valid).to(torch.float64) * w[:, None, None]
    numerator = torch.einsum("kij,kij->ij", support, correlations.to(torch.float64))
    return numerator, support.sum(0)


def consensus_from_sums(numerator: Tensor, denominator: Tensor) -> Tensor:
    """Weighted mean from :func:`consensus_sums`; pairs without support get 0, the diagonal gets 1."""
    has_support = denominator > 0
    mean = torch.where(has_support, numerator / denominator.clamp_min(torch.finfo(denominator.dtype).tiny), 0.0)
    eye = torch.eye(mean.shape[-1], dtype=torch.bool, device=mean.device)
    return mean.clamp(-1.0, 1.0).masked_fill(eye, 1.0)


def global_consensus(correlations: Tensor, weights: Tensor, valid: Tensor | None = None) -> Tensor:
    """Global consensus ``R*``: weighted mean of all clients' correlations per label pair.

    Args:
        correlations: ``(K, L, L)`` client correlations.
        weights: ``(K,)`` non-negative client weights (e.g. sample counts).
        valid: optional ``(K, L)`` bool, labels each client has support for; a pair counts for a client only when
            both its labels are valid.

    Returns:
        ``(L, L)`` consensus in the dtype of ``correlations``; pairs that no client supports are 0, diagonal 1.
    """
    numerator, denominator = consensus_sums(correlations, weights, valid)
    return consensus_from_sums(numerator, denominator).to(correlations.dtype)


def leave_one_out_consensus(correlations: Tensor, weights: Tensor, valid: Tensor | None = None) -> Tensor:
    """Teacher of every client from all the others: ``R*_k = sum_{j != k} w_j V_j R_j / sum_{j != k} w_j V_j``.

    Computed as total minus own term in float64, ``O(K L^2)``.

    Args:
        correlations: ``(K, L, L)`` client correlations.
        weights: ``(K,)`` non-negative client weights (e.g. sample counts).
        valid: optional ``(K, L)`` bool, labels each client has support for.

    Returns:
        ``(K, L, L)`` teachers in the dtype of ``correlations``. A pair that no other client supports is 0 in that
        client's teacher (use :func:`leave_one_out_support` to mask it out); the diagonal is 1.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[[1.0, 0.2], [0.2, 1.0]], [[1.0, 0.6], [0.6, 1.0]], [[1.0, 0.4], [0.4, 1.0]]])
        >>> leave_one_out_consensus(corr, torch.tensor([1.0, 1.0, 2.0]))[:, 0, 1]
        tensor([0.4667, 0.3333, 0.4000])
    """
    numerator, denominator = consensus_sums(correlations, weights, valid)
    loo_num, loo_den = leave_one_out_sums(numerator, denominator, correlations, weights, valid)
    return consensus_from_sums(loo_num, loo_den).to(correlations.dtype)


def leave_one_out_sums(
    numerator: Tensor, denominator: Tensor, correlations: Tensor, weights: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Remove clients' own terms from the sums of :func:`consensus_sums`.

    Broadcasts over leading dimensions: ``correlations`` ``(..., L, L)``, ``weights`` ``(...)``, ``valid``
    ``(..., L)``; a server can compute one client's teacher at a time in ``O(L^2)`` memory. A denominator left
    with only rounding error is set to 0 (no support).

    Returns:
        ``(numerator, denominator)`` without the given clients, in the sums' dtype (float32 sums halve a server's
        memory traffic; their relative error after removing one of K clients stays near ``K * 6e-8``).
    """
    dtype = numerator.dtype
    w = weights.to(dtype)[..., None, None]
    own_support = w if valid is None else pair_validity(valid).to(dtype) * w
    loo_num = numerator - own_support * correlations.to(dtype)
    loo_den = denominator - own_support
    # cancellation can leave rounding residue where no other client has support: a few ulps of the total
    residue = 16 * torch.finfo(dtype).eps * denominator
    loo_den = torch.where(loo_den > residue, loo_den, 0.0)
    return loo_num, loo_den


def leave_one_out_support(weights: Tensor, valid: Tensor | None, num_labels: int) -> Tensor:
    """``(K, L, L)`` bool: pairs for which at least one *other* client with positive weight has support."""
    num_clients = weights.shape[0]
    if valid is None:
        valid = torch.ones(num_clients, num_labels, dtype=torch.bool, device=weights.device)
    support = pair_validity(valid) & (weights > 0)[:, None, None]
    count = support.sum(0, dtype=torch.int64)
    return (count - support.long()) > 0
