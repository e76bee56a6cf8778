"""The Correlation Expert: consensus of the clients' label correlations.

FedHarmony (https://arxiv.org/abs/2604.28024) teaches each client with the consensus of the *other* clients'
correlations (leave-one-out), so that a client never teaches itself. Per label pair, the consensus is the weighted
mean over the clients that have support for both labels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

#: Removing a client's own term leaves rounding residue where no other client has support: a denominator within this
#: many ulps of the total counts as no support.
_RESIDUE_ULPS = 16


def pair_validity(valid: Tensor) -> Tensor:
    """Pairs of labels that are both valid: ``(..., L)`` -> ``(..., L, L)`` bool."""
    valid = valid.bool()
    return valid[..., :, None] & valid[..., None, :]


def _check_consensus_args(correlations: Tensor | Sequence[Tensor], weights: Tensor, valid: Tensor | None) -> None:
    if isinstance(correlations, Tensor):
        shape = tuple(correlations.shape)
        num_clients = shape[0] if shape else 0
    else:
        num_clients = len(correlations)
        shape = (num_clients, *correlations[0].shape) if num_clients else (0,)
        if any(tuple(c.shape) != shape[1:] for c in correlations):
            raise ValueError(
                "Expected argument `correlations` to hold (L, L) tensors of one shape, but got shapes"
                f" {sorted({tuple(c.shape) for c in correlations})}."
            )
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ValueError(f"Expected argument `correlations` to have shape (K, L, L), but got {shape}.")
    num_labels = shape[1]
    if weights.shape != (num_clients,):
        raise ValueError(f"Expected argument `weights` to have shape ({num_clients},), but got {tuple(weights.shape)}.")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError(f"Expected argument `weights` to be finite and non-negative, but got {weights.tolist()}.")
    if valid is not None and valid.shape != (num_clients, num_labels):
        raise ValueError(
            f"Expected argument `valid` to have shape ({num_clients}, {num_labels}), but got {tuple(valid.shape)}."
        )


def consensus_sums(
    correlations: Tensor | Sequence[Tensor], weights: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Weighted sums behind every consensus: ``(sum_j w_j V_j R_j, sum_j w_j V_j)``, each ``(L, L)`` float64.

    A client's leave-one-out teacher is the total minus its own term (:func:`leave_one_out_teacher`), which keeps
    the server step at ``O(K L^2)`` time and ``O(L^2)`` scratch memory: the clients are added one at a time, and
    ``correlations`` may be a sequence of ``(L, L)`` tensors, so that no ``(K, L, L)`` stack is ever built.
    """
    _check_consensus_args(correlations, weights, valid)
    w = weights.to(torch.float64)
    num_labels = correlations.shape[-1] if isinstance(correlations, Tensor) else correlations[0].shape[-1]
    device = weights.device
    rows = torch.ones(len(w), num_labels, dtype=torch.float64, device=device) if valid is None else valid.double()
    denominator = (rows * w[:, None]).T @ rows
    numerator = torch.zeros(num_labels, num_labels, dtype=torch.float64, device=device)
    for k, corr in enumerate(correlations):
        own = corr if valid is None or bool(valid[k].all()) else corr * pair_validity(valid[k])
        numerator.add_(own, alpha=float(w[k]))
    return numerator, denominator


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
    residue = _RESIDUE_ULPS * torch.finfo(dtype).eps * denominator
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


def leave_one_out_teacher(
    numerator: Tensor, denominator: Tensor, corr: Tensor, weight: float | Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One client's teacher from the sums of :func:`consensus_sums`, in ``O(L^2)`` time and memory.

    ``R*_k = (S - w_k V_k R_k) / (D - w_k V_k)``: the same values as :func:`leave_one_out_sums` followed by
    :func:`consensus_from_sums`, computed in place with a few ``(L, L)`` temporaries, for a server serving many clients.

    Args:
        numerator: ``(L, L)`` weighted sum of correlations.
        denominator: ``(L, L)`` weighted support.
        corr: ``(L, L)`` the client's own correlation, as it was added to the sums.
        weight: the client's weight in the sums.
        valid: optional ``(L,)`` bool, the client's valid labels.

    Returns:
        ``(teacher, support)``: the ``(L, L)`` teacher in the sums' dtype (0 on pairs no other client supports,
        diagonal 1) and the ``(L, L)`` bool pairs some other client supports.
    """
    dtype = numerator.dtype
    weight = float(weight)
    if valid is None or bool(valid.all()):
        own = corr
        rows = torch.ones(corr.shape[-1], dtype=dtype, device=corr.device)
    else:
        own = corr * pair_validity(valid)
        rows = valid.to(dtype)
    teacher = torch.add(numerator, own.to(dtype), alpha=-weight)
    loo_den = torch.addr(denominator, rows, rows, alpha=-weight)
    # support: D - w V > tol D (leave_one_out_sums' rule), i.e. D > w V / (1 - tol), with no (L, L) temporary
    own_share = weight / (1.0 - _RESIDUE_ULPS * torch.finfo(dtype).eps)
    support = denominator > (own_share if own is corr else torch.outer(rows, rows).mul_(own_share))
    teacher.div_(loo_den.clamp_min_(torch.finfo(dtype).tiny)).mul_(support).clamp_(-1.0, 1.0)
    torch.diagonal(teacher).fill_(1.0)
    return teacher, support


def teacher_and_mask(
    numerator: Tensor,
    denominator: Tensor,
    blocks: Tensor,
    own: tuple[Tensor, float, Tensor | None] | None = None,
    align_threshold: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """A client's teacher ``(L, L)`` and the bool pairs it aligns ``(L, L)``, from the sums of :func:`consensus_sums`.

    The teacher is the consensus without the client's own term ``own = (corr, weight, valid)``
    (:func:`leave_one_out_teacher`), or the whole consensus for a client with no term in the sums (``None``). The
    mask keeps the pairs within a label block (``blocks``), supported by some other client, valid for the client, and
    with ``|R*| >= align_threshold``. Whoever holds the client's term computes it: the server that keeps every
    correlation, or the client itself (:mod:`lightning_fedharmony.client_terms`).
    """
    if own is None:
        teacher, mask = consensus_from_sums(numerator, denominator).float(), blocks & (denominator > 0)
    else:
        corr, weight, valid = own
        teacher, support = leave_one_out_teacher(numerator, denominator, corr, weight, valid)
        mask = support.logical_and_(blocks)
        if valid is not None and not bool(valid.all()):
            mask.logical_and_(pair_validity(valid))
    if align_threshold > 0:
        mask.logical_and_(teacher.abs() >= align_threshold)
    return teacher, mask


def off_diagonal_abs_mean(matrix: Tensor) -> Tensor:
    """Mean ``|R[a, b]|`` over the pairs ``a != b`` of an ``(L, L)`` matrix (0 for ``L < 2``)."""
    num_labels = matrix.shape[0]
    if num_labels < 2:
        return matrix.new_zeros(())
    off = ~torch.eye(num_labels, dtype=torch.bool, device=matrix.device)
    return matrix.abs()[off].mean()
