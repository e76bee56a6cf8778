"""Server-side math: correlation quality, the dynamic balance factor and weighted averaging of models.

FedHarmony (https://arxiv.org/abs/2604.28024) weights client models by a mix of data quantity and correlation
quality that moves from the former to the latter over the rounds.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

QualityWeighting = Literal["additive", "product"]
_WEIGHTINGS = ("additive", "product")


def correlation_discrepancy(corr: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """``s_k``: mean over the masked pairs of ``(R_k - R*_k)^2``.

    Args:
        corr: ``(K, L, L)`` client correlations.
        teacher: ``(K, L, L)`` their consensus teachers.
        mask: ``(L, L)`` or ``(K, L, L)`` bool pairs to score.

    Returns:
        ``(K,)`` float; 0 for a client with no masked pair.
    """
    if corr.ndim != 3 or corr.shape != teacher.shape:
        raise ValueError(
            "Expected `corr` and `teacher` to share one (K, L, L) shape, but got"
            f" {tuple(corr.shape)} and {tuple(teacher.shape)}."
        )
    if mask.shape not in (corr.shape, corr.shape[1:]):
        raise ValueError(
            f"Expected argument `mask` to have shape {tuple(corr.shape[1:])} or {tuple(corr.shape)}, but got"
            f" {tuple(mask.shape)}."
        )
    squared = (corr - teacher.to(corr.dtype)).square_().mul_(mask)
    count = torch.broadcast_to(mask, corr.shape).sum((1, 2), dtype=corr.dtype)
    return squared.sum((1, 2)) / count.clamp_min(1.0)


def sampling_discrepancy(
    corr: Tensor, teacher: Tensor, mask: Tensor, num_samples: Tensor, teacher_samples: Tensor
) -> Tensor:
    """The ``s_k`` that sampling alone would give: what a client shows even when it agrees with its teacher.

    A correlation estimated from ``n`` samples has variance about ``(1 - R^2)^2 / n`` (Pearson's large-sample
    variance), and the client's estimate and its teacher's are independent, so the expected squared gap on a pair
    is ``(1 - R_k^2)^2 / n_k + (1 - R*_k^2)^2 / n*_k``. Scoring ``s_k`` minus this baseline keeps a small honest client
    from being read as a disagreeing one only because its estimate is noisy. On the Bernoulli scale (soft phi, which
    is smaller than Pearson's) the baseline is an upper bound, so it errs on the side of keeping weight.

    Args:
        corr: ``(K, L, L)`` client correlations.
        teacher: ``(K, L, L)`` their teachers.
        mask: ``(L, L)`` or ``(K, L, L)`` bool pairs that are scored.
        num_samples: ``(K,)`` samples behind each client's correlation.
        teacher_samples: ``(K,)`` samples behind each teacher (the other clients' total).

    Returns:
        ``(K,)`` float; 0 for a client with no scored pair.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
        >>> pairs = ~torch.eye(2, dtype=torch.bool)
        >>> sampling_discrepancy(corr, corr, pairs, torch.tensor([100.0]), torch.tensor([900.0]))
        tensor([0.0111])
    """
    if corr.ndim != 3 or corr.shape != teacher.shape:
        raise ValueError(
            "Expected `corr` and `teacher` to share one (K, L, L) shape, but got"
            f" {tuple(corr.shape)} and {tuple(teacher.shape)}."
        )
    num_clients = corr.shape[0]
    for name, value in (("num_samples", num_samples), ("teacher_samples", teacher_samples)):
        if value.shape != (num_clients,):
            raise ValueError(
                f"Expected argument `{name}` to have shape ({num_clients},), but got {tuple(value.shape)}."
            )
    inv_n = 1.0 / num_samples.to(corr.dtype).clamp_min(1.0)
    inv_teacher = torch.where(teacher_samples > 0, 1.0 / teacher_samples.to(corr.dtype).clamp_min(1.0), 0.0)
    weight = torch.broadcast_to(mask, corr.shape).to(corr.dtype)
    count = weight.sum((1, 2))
    # (1 - R^2)^2 in place, then one fused masked sum per client: a few passes over L^2, no other temporaries
    own = torch.einsum("kij,kij->k", corr.square().neg_().add_(1.0).square_(), weight)
    other = torch.einsum("kij,kij->k", teacher.to(corr.dtype).square().neg_().add_(1.0).square_(), weight)
    return (own * inv_n + other * inv_teacher) / count.clamp_min(1.0)


def departing_pairs(corr: Tensor, teacher: Tensor, mask: Tensor, k: int = 5) -> list[tuple[int, int, float, float]]:
    """Up to ``k`` label pairs ``(a, b, R[a, b], R*[a, b])``, ``a < b``, where a symmetric correlation departs most
    from its teacher on the masked pairs, largest gap first.

    Each pair stands twice in a symmetric matrix, so the top ``2k`` entries hold the top ``k`` pairs, and they lie in
    the ``2k`` rows with the largest maxima: a top-k over those rows, not over all ``L^2`` entries.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[1.0, 0.9, 0.1], [0.9, 1.0, 0.2], [0.1, 0.2, 1.0]])
        >>> departing_pairs(corr, torch.eye(3), ~torch.eye(3, dtype=torch.bool), k=1)
        [(0, 1, 0.8999999761581421, 0.0)]
    """
    gap = (corr - teacher).abs_().mul_(mask)
    num_labels, wanted = corr.shape[0], 2 * k
    rows = torch.topk(gap.amax(1), min(wanted, num_labels)).indices
    candidates = gap[rows].flatten()
    top = torch.topk(candidates, min(wanted, candidates.numel()))
    pairs = []
    for value, position in zip(top.values.tolist(), top.indices.tolist()):
        a, b = int(rows[position // num_labels]), position % num_labels
        if value > 0 and a < b:
            pairs.append((a, b, float(corr[a, b]), float(teacher[a, b])))
    return pairs[:k]


def teacher_score(
    corr: Tensor, teacher: Tensor, mask: Tensor, num_samples: float, teacher_samples: float, num_pairs: int = 5
) -> tuple[float, float, list[tuple[int, int, float, float]]]:
    """One client against its teacher: ``s_k`` (:func:`correlation_discrepancy`), what sampling alone would give
    (:func:`sampling_discrepancy`, with ``n_k = num_samples`` and ``n*_k = teacher_samples``) and the ``num_pairs``
    pairs where it departs most (:func:`departing_pairs`)."""
    discrepancy = correlation_discrepancy(corr[None], teacher[None], mask)
    n = torch.tensor([num_samples], dtype=torch.float32)
    others = torch.tensor([teacher_samples], dtype=torch.float32)
    baseline = sampling_discrepancy(corr[None], teacher[None], mask, n, others)
    return float(discrepancy), float(baseline), departing_pairs(corr, teacher, mask, num_pairs)


def quality_from_discrepancy(discrepancy: Tensor, gamma: float | str = "auto") -> Tensor:
    """``q_k = exp(-gamma s_k)``; ``gamma="auto"`` is ``1 / median_k s_k`` (all ones when the median is 0)."""
    if discrepancy.ndim != 1:
        raise ValueError(f"Expected argument `discrepancy` to have shape (K,), but got {tuple(discrepancy.shape)}.")
    if gamma == "auto":
        # the usual median (mean of the two middle values), not torch.median's lower middle
        median = torch.quantile(discrepancy, 0.5) if discrepancy.numel() else discrepancy.new_tensor(0.0)
        gamma_value = torch.where(median > 0, 1.0 / median.clamp_min(1e-30), 0.0)
    elif isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and gamma >= 0:
        gamma_value = discrepancy.new_tensor(float(gamma))
    else:
        raise ValueError(f"Expected argument `gamma` to be 'auto' or a non-negative float, but got {gamma!r}.")
    return torch.exp(-gamma_value * discrepancy)


def correlation_quality(corr: Tensor, teacher: Tensor, mask: Tensor, gamma: float | str = "auto") -> Tensor:
    """Correlation quality ``q_k = exp(-gamma s_k)`` of every client against its teacher.

    Args:
        corr: ``(K, L, L)`` client correlations.
        teacher: ``(K, L, L)`` their leave-one-out teachers.
        mask: ``(L, L)`` or ``(K, L, L)`` bool in-block pairs.
        gamma: temperature, or ``"auto"`` = ``1 / median_k s_k``.

    Returns:
        ``(K,)`` qualities in ``(0, 1]``.

    Example:
        >>> import torch
        >>> corr = torch.tensor([[[1.0, 0.5], [0.5, 1.0]], [[1.0, 0.1], [0.1, 1.0]]])
        >>> teacher = torch.tensor([[[1.0, 0.1], [0.1, 1.0]], [[1.0, 0.1], [0.1, 1.0]]])
        >>> correlation_quality(corr, teacher, ~torch.eye(2, dtype=torch.bool), gamma=10.0)
        tensor([0.2019, 1.0000])
    """
    return quality_from_discrepancy(correlation_discrepancy(corr, teacher, mask), gamma)


def balance_factor(server_round: int, t0: float) -> float:
    """The dynamic balance factor ``alpha_t = max(0, 1 - t / T0)``; ``T0 <= 0`` means quality only."""
    if server_round < 1:
        raise ValueError(f"Expected argument `server_round` to be an int >= 1, but got {server_round}.")
    if t0 <= 0:
        return 0.0
    return max(0.0, 1.0 - server_round / t0)


def aggregation_weights(
    num_samples: Tensor,
    quality: Tensor,
    server_round: int,
    t0: float,
    mode: QualityWeighting = "additive",
) -> Tensor:
    """Aggregation weights from data quantity and correlation quality.

    ``"additive"`` (the paper's): ``w_k = alpha_t n_k / sum n + (1 - alpha_t) q_k / sum q``;
    ``"product"``: ``w_k`` proportional to ``n_k q_k``, which keeps client size in the weights in every round.

    Args:
        num_samples: ``(K,)`` client sample counts.
        quality: ``(K,)`` correlation qualities.
        server_round: round ``t``, counted from 1.
        t0: the round at which quantity stops counting in the additive form.
        mode: ``"additive"`` or ``"product"``.

    Returns:
        ``(K,)`` float64 weights summing to 1 (uniform if every input weight is 0).

    Example:
        >>> import torch
        >>> aggregation_weights(torch.tensor([30.0, 10.0]), torch.tensor([0.5, 1.0]), server_round=1, t0=2)
        tensor([0.5417, 0.4583], dtype=torch.float64)
    """
    if mode not in _WEIGHTINGS:
        raise ValueError(f"Expected argument `mode` to be one of {_WEIGHTINGS}, but got {mode!r}.")
    if num_samples.shape != quality.shape or num_samples.ndim != 1:
        raise ValueError(
            "Expected `num_samples` and `quality` to share one (K,) shape, but got"
            f" {tuple(num_samples.shape)} and {tuple(quality.shape)}."
        )
    n = num_samples.to(torch.float64)
    q = quality.to(torch.float64)
    if mode == "product":
        return _normalize(n * q)
    alpha = balance_factor(server_round, t0)
    return alpha * _normalize(n) + (1.0 - alpha) * _normalize(q)


def _normalize(x: Tensor) -> Tensor:
    total = x.sum()
    if total <= 0:
        return torch.full_like(x, 1.0 / max(x.numel(), 1))
    return x / total


def weighted_average(
    state_dicts: Sequence[Mapping[str, Tensor]], weights: Tensor | Sequence[float]
) -> dict[str, Tensor]:
    """Weighted average of model state dicts (``theta = sum_k w_k theta_k``).

    Floating point entries are averaged in float64 and returned in their own dtype; integer entries (counters such as
    BatchNorm's ``num_batches_tracked``) are taken from the client with the largest weight.

    Args:
        state_dicts: K state dicts with the same keys, shapes and dtypes.
        weights: ``(K,)`` non-negative weights; normalised to sum to 1.

    Returns:
        A new state dict.

    Raises:
        ValueError: on no state dicts, mismatched keys or shapes, or weights of the wrong length or sign.

    Example:
        >>> import torch
        >>> weighted_average([{"w": torch.tensor([0.0, 2.0])}, {"w": torch.tensor([4.0, 2.0])}], [3.0, 1.0])
        {'w': tensor([1., 2.])}
    """
    if not state_dicts:
        raise ValueError("Expected argument `state_dicts` to hold at least one state dict, but got none.")
    w = torch.as_tensor(weights, dtype=torch.float64).flatten()
    if w.numel() != len(state_dicts) or not torch.isfinite(w).all() or (w < 0).any():
        raise ValueError(
            f"Expected argument `weights` to hold {len(state_dicts)} finite non-negative values, but got {w.tolist()}."
        )
    w = _normalize(w)
    keys = list(state_dicts[0].keys())
    for index, state in enumerate(state_dicts[1:], start=1):
        if set(state.keys()) != set(keys):
            raise ValueError(
                f"Expected every state dict to have the keys of the first, but state dict {index} differs."
            )
    averaged: dict[str, Tensor] = {}
    top = int(torch.argmax(w))
    for key in keys:
        tensors = [state[key] for state in state_dicts]
        reference = tensors[0]
        if any(t.shape != reference.shape for t in tensors):
            raise ValueError(f"Expected entry {key!r} to have one shape in every state dict.")
        if reference.is_floating_point() or reference.is_complex():
            stacked = torch.stack([t.detach().to(torch.float64) for t in tensors])
            averaged[key] = torch.tensordot(w, stacked, dims=1).to(reference.dtype)
        else:
            averaged[key] = tensors[top].detach().clone()
    return averaged


def server_momentum_step(
    global_weights: Mapping[str, Tensor],
    averaged: Mapping[str, Tensor],
    momentum: Mapping[str, Tensor] | None,
    beta: float,
    *,
    adaptive: bool = True,
) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
    """One server momentum step (FedAvgM, Hsu et al. 2019): ``m = beta' m + (avg - w)``, ``w' = w + m``.

    With ``adaptive=True`` the momentum kept from earlier rounds is scaled by how much this round's update agrees
    with it, ``beta' = beta * max(0, cos(avg - w, m))``: rounds that keep moving the same way are accelerated, and
    momentum that the clients' updates turn against is dropped (a soft form of the adaptive restart of O'Donoghue and
    Candes, 2015). ``adaptive=False`` keeps ``beta' = beta``.

    Args:
        global_weights: the round's global weights ``w`` (what the clients started from).
        averaged: the clients' aggregated weights.
        momentum: the momentum ``m`` returned by the previous step (float64), or ``None`` in the first round.
        beta: momentum factor in ``[0, 1)``; 0 returns ``averaged`` unchanged.
        adaptive: scale the kept momentum by the agreement (see above).

    Returns:
        The new global weights (in ``averaged``'s dtypes; entries that are not real floating point, such as
        BatchNorm's counters, as in ``averaged``), the new momentum (float64) and the factor ``beta'`` used (0 in
        the first round, which has no momentum yet).

    Raises:
        ValueError: if ``beta`` is outside ``[0, 1)`` or a floating point entry of ``averaged`` is missing from
            ``global_weights`` or has another shape.

    Example:
        >>> import torch
        >>> w, m, b = server_momentum_step({"w": torch.zeros(2)}, {"w": torch.ones(2)}, None, 0.5)
        >>> w, b
        ({'w': tensor([1., 1.])}, 0.0)
        >>> w, m, b = server_momentum_step(w, {"w": torch.full((2,), 2.0)}, m, 0.5)
        >>> w, b
        ({'w': tensor([2.5000, 2.5000])}, 0.5)
    """
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and 0 <= beta < 1):
        raise ValueError(f"Expected argument `beta` to be a float in [0, 1), but got {beta!r}.")
    keys = [k for k, v in averaged.items() if v.is_floating_point()]
    for key in keys:
        if key not in global_weights or global_weights[key].shape != averaged[key].shape:
            raise ValueError(
                f"Expected argument `global_weights` to hold entry {key!r} of shape {tuple(averaged[key].shape)},"
                f" but got {tuple(global_weights[key].shape) if key in global_weights else 'no such entry'}."
            )
    if beta == 0:
        return dict(averaged), {}, 0.0
    delta = {k: averaged[k].to(torch.float64) - global_weights[k].to(torch.float64) for k in keys}
    kept = 0.0 if not momentum else beta
    if momentum and adaptive:
        dot = sum(float(torch.sum(delta[k] * momentum[k])) for k in keys if k in momentum)
        delta_sq = sum(float(delta[k].square().sum()) for k in keys)
        momentum_sq = sum(float(momentum[k].square().sum()) for k in keys if k in momentum)
        norms = (delta_sq * momentum_sq) ** 0.5
        kept = beta * max(0.0, dot / norms) if norms > 0 else 0.0
    new_momentum = {k: delta[k].add(momentum[k], alpha=kept) if momentum and k in momentum else delta[k] for k in keys}
    weights = dict(averaged)
    for key in keys:
        weights[key] = (global_weights[key].to(torch.float64) + new_momentum[key]).to(averaged[key].dtype)
    return weights, new_momentum, kept
