"""Client-side loss terms: FedHarmony's consensus alignment and FedProx's proximal term."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from lightning_fedharmony.functional.correlation import Normalization, _check_eps, _check_normalization, soft_phi


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
    return masked_mean_square(corr, teacher, weight, weight.sum().clamp_min(1.0))


def masked_mean_square(corr: Tensor, teacher: Tensor, weight: Tensor, count: Tensor) -> Tensor:
    """:func:`alignment_loss` from a mask already turned into ``weight`` (``corr``'s dtype) and its pair ``count``
    (at least 1): a training step whose mask stays fixed for the round builds both once, not at every step."""
    squared = (corr - teacher.to(corr.dtype)).square() * weight
    return squared.sum() / count


def soft_phi_alignment_loss(
    preds: Tensor,
    teacher: Tensor,
    mask: Tensor,
    eps: float = 1e-6,
    normalization: Normalization = "bernoulli",
    *,
    detach_scale: bool = False,
) -> Tensor:
    """``alignment_loss(soft_phi(preds, ...), teacher, mask)`` in one autograd node, for the training step.

    The same value and gradient as the composition (tested against it, and with ``gradcheck``), in about half the
    time on small label sets: the composition is some 25 small tensor operations forward and as many backward,
    each costing more in dispatch than in arithmetic, while the closed-form backward below needs a dozen. The
    gradient ignores the ``[-1, 1]`` clamp of :func:`soft_phi`, which only acts on rounding error (``|R| < 1``
    whenever ``eps > 0``).

    Args:
        preds: ``(N, L)`` probabilities (differentiable).
        teacher: ``(L, L)`` consensus of the other clients.
        mask: ``(L, L)`` bool, the pairs to align.
        eps: added to the phi denominator.
        normalization: ``"bernoulli"`` or ``"pearson"``.
        detach_scale: stop gradients through the variances in the denominator.

    Returns:
        Scalar loss.
    """
    if preds.ndim != 2 or not preds.is_floating_point():
        raise ValueError(
            f"Expected argument `preds` to be a floating point tensor of shape (N, L), but got dtype {preds.dtype}"
            f" and shape {tuple(preds.shape)}."
        )
    num_labels = preds.shape[1]
    if teacher.shape != (num_labels, num_labels) or mask.shape != teacher.shape:
        raise ValueError(
            f"Expected `teacher` and `mask` of shape ({num_labels}, {num_labels}), but got {tuple(teacher.shape)} and"
            f" {tuple(mask.shape)}."
        )
    _check_eps(eps)
    _check_normalization(normalization)
    if preds.shape[0] == 0:  # no samples: soft_phi is the identity and nothing depends on the predictions
        return alignment_loss(soft_phi(preds, eps, normalization, detach_scale=detach_scale), teacher, mask)
    weight = mask.to(preds.dtype)
    return _SoftPhiAlignment.apply(
        preds, teacher.to(preds.dtype), weight, eps, normalization == "pearson", detach_scale
    )


class _SoftPhiAlignment(torch.autograd.Function):
    """Forward: soft phi of ``preds`` (diagonal 1) and the masked mean squared gap to the teacher.

    Backward, with ``X_c`` the centred predictions, ``C = X_c^T X_c / N``, ``s`` the standard deviations,
    ``D = s s^T + eps``, ``R = C / D`` and ``G = dL/dR = 2 W (R - T) / |M|`` (zero on the constant diagonal):
    ``Q = dL/dC = G / D`` plus, for Pearson, ``dL/dvar`` on its diagonal; ``dL/ds = -((G / D + (G / D)^T) R) s``;
    ``dL/dvar = dL/ds / (2 s)``, which reaches ``p`` through ``var = p (1 - p)`` (Bernoulli) or the diagonal of
    ``C`` (Pearson); ``dL/dX = X_c (Q + Q^T) / N + dL/dp / N`` (the mean's own path through the centring cancels
    because the centred columns sum to zero).
    """

    @staticmethod
    def forward(
        ctx: Any, preds: Tensor, teacher: Tensor, weight: Tensor, eps: float, pearson: bool, detach_scale: bool
    ) -> Tensor:
        n = preds.shape[0]
        p = preds.mean(0)
        centered = preds - p
        cov = torch.mm(centered.T, centered).div_(n)
        var = cov.diagonal().clone() if pearson else p - p * p
        floored = var <= torch.finfo(var.dtype).tiny  # as in soft_phi: no gradient through a floored variance
        std = var.clamp_min(torch.finfo(var.dtype).tiny).sqrt_()
        den = torch.outer(std, std).add_(eps)
        corr = (cov / den).clamp_(-1.0, 1.0)
        corr.diagonal().fill_(1.0)
        count = weight.sum().clamp_min(1.0)
        gap = (corr - teacher).mul_(weight)
        ctx.save_for_backward(centered, p, std, floored, den, corr, gap, count)
        ctx.pearson, ctx.detach_scale = pearson, detach_scale
        return torch.dot(gap.view(-1), gap.view(-1)) / count

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        centered, p, std, floored, den, corr, gap, count = ctx.saved_tensors
        n = centered.shape[0]
        d_corr = gap * (2 * grad / count)
        d_corr.diagonal().zero_()  # the diagonal is the constant 1
        d_cov = d_corr.div_(den)
        d_sym = d_cov + d_cov.T  # Q + Q^T
        d_p = None
        if not ctx.detach_scale:
            d_std = torch.mv(d_sym * corr, std).neg_()
            d_var = d_std.div_(2 * std).masked_fill_(floored, 0.0)
            if ctx.pearson:
                d_sym.diagonal().add_(d_var, alpha=2.0)
            else:
                d_p = d_var.mul_(1 - 2 * p)
        d_preds = torch.mm(centered, d_sym).div_(n)
        if d_p is not None:
            d_preds.add_(d_p / n)
        return d_preds, None, None, None, None, None


def proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], mu: float) -> Tensor:
    """FedProx's ``mu / 2 * sum ||w - w_global||^2`` (Li et al., MLSys 2020).

    One autograd node: the value of ``0.5 * mu * sum_i ((w_i - g_i) ** 2).sum()`` and, in backward, the gradient
    ``2 * (grad * (mu / 2)) * (w_i - g_i)`` per parameter in one multiplication. Autograd through the composition
    computes ``(grad * (mu / 2)) * (2 * (w_i - g_i))`` after a copy and a doubling of ``w_i - g_i``: the same exact
    product (doubling is exact in floating point), so the gradients are bit for bit those of the composition (tested)
    at a fraction of the passes over the parameters (the term ran at a third of a small model's step).

    Raises:
        ValueError: if ``mu`` is negative or the two parameter lists differ in length.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> proximal_term([w], [torch.zeros(2)], mu=0.5)
        tensor(1.2500, grad_fn=<_ProximalBackward>)
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
    anchors = [g.to(p) for p, g in zip(params, global_params)]
    return _Proximal.apply(0.5 * mu, len(params), *params, *anchors)


#: How a client may scale FedProx's ``mu`` within a round: ``"none"`` or ``"drift"`` (:func:`drift_proximal_scale`).
CLIENT_PROXIMAL_SCALINGS = ("none", "drift")

#: Which output rows the proximal term pulls how hard: ``"uniform"`` (FedProx's, every parameter with ``mu``) or
#: ``"labels"`` (:func:`label_proximal_scale` per label row of the output layer).
PROXIMAL_ROWS = ("uniform", "labels")


def check_label_pull(
    rows: str | None = None,
    full_at: float | None = None,
    absent: float | None = None,
    *,
    names: tuple[str, str, str] = ("proximal_rows", "proximal_full_at", "proximal_absent"),
) -> None:
    """Check the label-aware proximal term's settings (``None`` skips one); ``names`` are the arguments' names.

    Raises:
        ValueError: naming the argument, the rule and the value.
    """
    if rows is not None and rows not in PROXIMAL_ROWS:
        raise ValueError(f"Expected argument `{names[0]}` to be one of {PROXIMAL_ROWS}, but got {rows!r}.")
    _check_finite(names[1], full_at, strict=True)
    _check_finite(names[2], absent, strict=False)


def _check_finite(name: str, value: float | None, *, strict: bool) -> None:
    """``value`` is ``None`` or a finite number ``> 0`` (``strict``) or ``>= 0``; else a ``ValueError`` naming it."""
    if value is None:
        return
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not (number and (value > 0 if strict else value >= 0)):
        rule = "> 0" if strict else ">= 0"
        raise ValueError(f"Expected argument `{name}` to be a finite number {rule}, but got {value!r}.")


def label_proximal_scale(positives: Tensor, full_at: float, absent: float) -> Tensor:
    """Per-label factor on ``mu`` for the output layer's rows, from the positives a client has seen this round.

    A label without a positive gets ``absent``: the client has no evidence for its row, only negatives that push it
    down, and the row should stay near the global model's. A label with ``n > 0`` positives gets ``min(1, n /
    full_at)``: the pull grows with the evidence behind the row's update, so that a rare label, whose few positives give
    its row a gradient smaller than the pull, can still learn, and a well-supported row is held like every other
    parameter.

    Args:
        positives: ``(L,)`` positives seen per label (observed entries only; soft labels count by their value).
        full_at: positives at which a row gets the full ``mu``; ``> 0``.
        absent: factor for labels without a positive; ``>= 0``.

    Returns:
        ``(L,)`` factors in the dtype of ``positives`` (floating) or the default float dtype.

    Raises:
        ValueError: if ``full_at`` or ``absent`` breaks its rule, or ``positives`` is not ``(L,)``.

    Example:
        >>> import torch
        >>> label_proximal_scale(torch.tensor([0.0, 8.0, 64.0, 500.0]), full_at=32.0, absent=10.0)
        tensor([10.0000,  0.2500,  1.0000,  1.0000])
    """
    check_label_pull(None, full_at, absent, names=("rows", "full_at", "absent"))
    if positives.ndim != 1:
        raise ValueError(f"Expected `positives` of shape (L,), but got {tuple(positives.shape)}.")
    counts = positives if positives.is_floating_point() else positives.to(torch.get_default_dtype())
    scale = (counts / full_at).clamp(max=1.0)
    return torch.where(counts > 0, scale, torch.full_like(scale, float(absent)))


def check_reference_labels(value: float | None, name: str = "proximal_reference_labels") -> None:
    """Check a reference label count for :func:`label_count_proximal_scale` (``None`` skips it).

    Raises:
        ValueError: naming ``name``, the rule and the value.
    """
    _check_finite(name, value, strict=False)


def label_count_proximal_scale(num_labels: int, reference: float) -> float:
    """The factor on ``mu`` for a model over ``num_labels`` labels: ``max(1, reference / num_labels)``.

    A task loss averaged over the labels (the default binary cross-entropy) gives one label's output row a gradient
    that shrinks like ``1 / L``; against that gradient a ``mu`` chosen for models over ``M`` labels is ``M / L``
    times weaker on a model over ``L < M``. Below ``reference`` labels the factor restores the pull's ratio to the
    loss gradient that ``mu`` has at ``reference`` labels; at or above it ``mu`` is kept. ``reference = 0`` turns the
    factor off (always 1), as it should be for a loss summed over the labels.

    Args:
        num_labels: the model's labels ``L``; ``>= 1``.
        reference: the label count from which ``mu`` is kept; ``>= 0``.

    Raises:
        ValueError: if ``num_labels`` is not a positive int or ``reference`` is negative or not finite.

    Example:
        >>> label_count_proximal_scale(6, 22.0), label_count_proximal_scale(101, 22.0), label_count_proximal_scale(6, 0)
        (3.6666666666666665, 1.0, 1.0)
    """
    check_reference_labels(reference, "reference")
    if isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1:
        raise ValueError(f"Expected argument `num_labels` to be a positive int, but got {num_labels!r}.")
    return max(1.0, reference / num_labels)


def row_proximal_term(params: Iterable[Tensor], global_params: Iterable[Tensor], row_mu: Tensor) -> Tensor:
    """FedProx's term with one ``mu`` per label row: ``sum_j row_mu_j / 2 * ||w_j - g_j||^2``.

    Args:
        params: parameters whose first dimension is the labels' (an output layer's weight ``(L, H)`` and bias
            ``(L,)``).
        global_params: the global values of ``params``, in the same order.
        row_mu: ``(L,)`` non-negative ``mu`` per label.

    Returns:
        The scalar term (``0`` for no parameters).

    Raises:
        ValueError: if the two lists differ in length, ``row_mu`` is not ``(L,)`` and non-negative, or a parameter's
            first dimension is not ``L``.

    Example:
        >>> import torch
        >>> w = torch.ones(2, 3, requires_grad=True)
        >>> row_proximal_term([w], [torch.zeros(2, 3)], torch.tensor([1.0, 0.0]))
        tensor(1.5000, grad_fn=<MulBackward0>)
    """
    params, global_params = list(params), list(global_params)
    if len(params) != len(global_params):
        raise ValueError(
            f"Expected as many global parameters as local ones, but got {len(global_params)} and {len(params)}."
        )
    if row_mu.ndim != 1 or bool((row_mu < 0).any()):
        raise ValueError(f"Expected `row_mu` of shape (L,) and >= 0, but got shape {tuple(row_mu.shape)}.")
    num_labels = row_mu.shape[0]
    total = None
    for p, g in zip(params, global_params):
        if p.ndim == 0 or p.shape[0] != num_labels:
            raise ValueError(
                f"Expected parameters whose first dimension is the {num_labels} labels, but got {tuple(p.shape)}."
            )
        squares = (p - g.to(p)).square().reshape(num_labels, -1).sum(1)
        term = (row_mu.to(squares) * squares).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.tensor(0.0)
    return 0.5 * total


def parameter_distance(params: Iterable[Tensor], global_params: Iterable[Tensor]) -> float:
    """``||w - w_global||``, the Euclidean distance over all parameters, accumulated in float64.

    A parameter of 16 bits or fewer is widened before the subtraction: the difference of two bfloat16 values of
    opposite sign is not a bfloat16 in general, and rounding it would coarsen the distance. Wider ones subtract in
    their own dtype (exact where a weight is near its global value), which keeps float32 runs' last bits as before.

    Example:
        >>> import torch
        >>> parameter_distance([torch.tensor([3.0]), torch.tensor([0.0, 4.0])], [torch.zeros(1), torch.zeros(2)])
        5.0
    """
    params, global_params = list(params), list(global_params)
    if len(params) != len(global_params):
        raise ValueError(
            f"Expected as many global parameters as local ones, but got {len(global_params)} and {len(params)}."
        )
    total = 0.0
    with torch.no_grad():
        for p, g in zip(params, global_params):
            if p.is_floating_point() and p.element_size() <= 2:
                difference = p.detach().double() - g.to(device=p.device, dtype=torch.float64)
            else:
                difference = (p.detach() - g.to(p)).double()
            total += float(difference.square().sum())
    return math.sqrt(total)


def drift_proximal_scale(first_epoch_distance: float, distance: float) -> float:
    """The factor on ``mu`` that holds the proximal pull ``mu ||w - w_global||`` at its size after the first epoch.

    ``min(1, d_1 / d_e)`` for the local epoch after the ``e``-th, ``d_e`` being the distance from the round's global
    weights after ``e`` epochs: while local training keeps moving away from the global model (as in the first round on
    rcv1subset1) the pull stops growing with it; once the proximal term holds the drift (it stays near ``d_1``)
    ``mu`` is unchanged. ``1`` when either distance is 0.

    Example:
        >>> drift_proximal_scale(2.0, 5.0), drift_proximal_scale(2.0, 1.5), drift_proximal_scale(0.0, 3.0)
        (0.4, 1.0, 1.0)
    """
    if first_epoch_distance < 0 or distance < 0:
        raise ValueError(
            "Expected non-negative distances, but got"
            f" `first_epoch_distance`={first_epoch_distance!r} and `distance`={distance!r}."
        )
    if first_epoch_distance == 0 or distance == 0:
        return 1.0
    return min(1.0, first_epoch_distance / distance)


class _Proximal(torch.autograd.Function):
    """``scale * sum_i ((w_i - g_i) ** 2).sum()``; ``g_i`` get no gradient."""

    @staticmethod
    def forward(ctx: Any, scale: float, num: int, *tensors: Tensor) -> Tensor:
        diffs = torch._foreach_sub(tensors[:num], tensors[num:])
        ctx.save_for_backward(*diffs)
        ctx.scale, ctx.num = scale, num
        # the composition's reductions, in its order: the same value
        return scale * torch.stack([d.square().sum() for d in diffs]).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # the composition's MulBackward gives `grad * scale` to each squared sum; its PowBackward multiplies that by
        # `2 * d`: one rounding of the same exact product as `d * (2 * (grad * scale))`
        twice = 2 * (grad * ctx.scale)
        grads = torch._foreach_mul(list(ctx.saved_tensors), twice)
        return (None, None, *grads, *([None] * ctx.num))
