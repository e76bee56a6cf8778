"""A LightningModule mixin that adds FedHarmony's correlation-aware loss terms to any multi-label module.

FedHarmony (Kou et al., CVPR 2026, https://arxiv.org/abs/2604.28024): each client adds to its multi-label loss
``lambda * mean_{(c,c') in M} (R_batch - R*_k)^2``, the in-block discrepancy between the soft phi correlation of the
current batch's predictions and the consensus of the other clients (the teacher).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_fedharmony.functional.blocks import BLOCK_KERNEL_MIN_LABELS, block_layout
from lightning_fedharmony.functional.consensus import pair_validity
from lightning_fedharmony.functional.correlation import (
    Normalization,
    _check_normalization,
    block_soft_phi,
    phi_from_means,
)
from lightning_fedharmony.functional.losses import (
    CLIENT_PROXIMAL_SCALINGS,
    check_label_pull,
    check_reference_labels,
    drift_proximal_scale,
    label_count_proximal_scale,
    label_proximal_scale,
    masked_mean_square,
    parameter_distance,
    proximal_term,
    row_proximal_term,
    soft_phi_alignment_loss,
)

#: State-dict keys owned by FedHarmony: they travel with checkpoints but never with the averaged weights.
FEDHARMONY_PREFIX = "fedharmony_"
_TEACHER, _MASK = "fedharmony_teacher", "fedharmony_mask"

LossFn = Callable[[Tensor, Tensor], Tensor]


def model_weights(module: nn.Module) -> dict[str, Tensor]:
    """The module's state dict without FedHarmony's own buffers: the weights that clients and server average."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if not k.startswith(FEDHARMONY_PREFIX)}


def load_model_weights(module: nn.Module, weights: Mapping[str, Tensor]) -> None:
    """Load averaged weights, leaving FedHarmony's own buffers alone.

    Raises:
        RuntimeError: if a weight is missing or unexpected (other than FedHarmony's buffers).
    """
    result = module.load_state_dict(dict(weights), strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(FEDHARMONY_PREFIX)]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"Expected the weights to match the module's state dict, but {missing} are missing and"
            f" {list(result.unexpected_keys)} are unexpected."
        )


class FedHarmonyMixin:
    """Adds FedHarmony's loss terms to a LightningModule: ``class MyModel(FedHarmonyMixin, L.LightningModule)``.

    In ``training_step`` replace the multi-label loss by ``loss = self.fedharmony_loss(logits, target)``. Without a
    teacher (round 1, or outside any federation) this is exactly BCE with logits, gradients included. With a teacher
    (set by :class:`~lightning_fedharmony.CorrelationExchange` or the orchestrator) it adds
    ``alignment_weight * alignment_loss`` and, with ``proximal_mu > 0``, FedProx's proximal term.

    The teacher and mask are buffers (``fedharmony_teacher``, ``fedharmony_mask``): saved in checkpoints, never part
    of :func:`model_weights`, so they are not averaged.

    The correlation defaults (Pearson, detached marginals, momentum 0.9) are :class:`~lightning_fedharmony.FedHarmony`'s
    validated ones, while ``proximal_mu`` (0) and ``proximal_scaling`` (``"none"``) leave the proximal term off until a
    server asks for it; a FedHarmony server sends its own settings with every teacher and round
    (:meth:`FedHarmony.paper` sends the paper's), so these matter for a module trained without one.

    Args:
        alignment_weight: ``lambda``, the weight of the alignment term; an aggregator may override it per round.
        proximal_mu: FedProx's ``mu``; 0 turns the proximal term off. Runners set it with each round's instructions.
        proximal_scaling: ``"none"`` keeps ``mu`` for every local epoch; ``"drift"`` holds the proximal pull at its
            size after the first local epoch of a round: local epoch ``e + 1`` trains with ``mu`` times
            ``min(1, d_1 / d_e)``, with ``d_e`` the distance from the round's global weights after ``e`` epochs
            (:func:`~lightning_fedharmony.functional.drift_proximal_scale`). With one or two local epochs (or training
            by steps within one epoch) both are the same.
        proximal_rows: ``"uniform"`` pulls every parameter with ``mu`` (FedProx's); ``"labels"`` pulls each row of the
            output layer (:meth:`fedharmony_output_parameters`) with ``mu`` times
            :func:`~lightning_fedharmony.functional.label_proximal_scale` of the positives the client has seen of
            that label since the round began: ``proximal_absent`` for a label without one, ``min(1, n /
            proximal_full_at)`` otherwise; the other parameters keep ``mu``. The count grows batch by batch (a label
            counts as absent until its first positive arrives) and over the round's local epochs (each epoch's
            positives count again, so with ``E`` epochs a label reaches the full pull from ``proximal_full_at / E``
            positives on); soft labels count by their value.
        proximal_full_at: positives of a label at which its output row gets the full ``mu`` (``"labels"``).
        proximal_absent: factor on ``mu`` for the output rows of labels without a positive (``"labels"``).
        proximal_reference_labels: a model over ``L`` labels trains with ``mu`` times ``max(1,
            proximal_reference_labels / L)`` (:func:`~lightning_fedharmony.functional.label_count_proximal_scale`:
            the label-averaged loss gives each label's row a gradient that shrinks like ``1 / L``); 0 keeps ``mu``.
            With a ``loss_fn`` that sums over the labels instead of averaging, the factor does not apply: use 0.
        corr_eps: ``eps`` of the soft phi denominator.
        corr_normalization: ``"pearson"`` (scale-free; see :func:`~lightning_fedharmony.functional.phi_from_moments`)
            or ``"bernoulli"`` (the paper's soft phi).
        corr_momentum: mixes detached running moments into each batch's moments (0 = pure batch, the paper's): an
            exponential average that, at 0.9, spans about 19 batches (``(1 + m) / (1 - m)``).
        detach_marginals: stop gradients through the variances ``p_c (1 - p_c)`` that normalise the batch
            correlation, so the alignment term cannot be lowered by flattening the predictions alone (METHOD.md
            section 9).
        log_loss_parts: log ``fedharmony/*`` loss parts, positive rate and confidence with ``self.log``.
    """

    fedharmony_teacher: Tensor
    fedharmony_mask: Tensor
    fedharmony_corr_normalization: Normalization

    def __init__(
        self,
        *args: Any,
        alignment_weight: float = 0.03,
        proximal_mu: float = 0.0,
        proximal_scaling: str = "none",
        proximal_rows: str = "uniform",
        proximal_full_at: float = 64.0,
        proximal_absent: float = 10.0,
        proximal_reference_labels: float = 0.0,
        corr_eps: float = 1e-6,
        corr_normalization: Normalization = "pearson",
        corr_momentum: float = 0.9,
        detach_marginals: bool = True,
        log_loss_parts: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fedharmony_configure(
            alignment_weight=alignment_weight,
            proximal_mu=proximal_mu,
            proximal_scaling=proximal_scaling,
            proximal_rows=proximal_rows,
            proximal_full_at=proximal_full_at,
            proximal_absent=proximal_absent,
            proximal_reference_labels=proximal_reference_labels,
            corr_eps=corr_eps,
            corr_normalization=corr_normalization,
            corr_momentum=corr_momentum,
            detach_marginals=detach_marginals,
        )
        self.fedharmony_log_loss_parts = log_loss_parts
        module = self._fedharmony_module()
        module.register_buffer(_TEACHER, torch.empty(0, 0))
        module.register_buffer(_MASK, torch.empty(0, 0, dtype=torch.bool))
        self._fedharmony_running: tuple[Tensor, Tensor, Tensor | None] | None = None
        self._fedharmony_anchor: list[Tensor] | None = None
        self._fedharmony_drift: tuple[int, float, float] | None = None  # (epoch, d_1, scale) since the anchor
        self._fedharmony_anchored: list[Tensor] = []  # the parameters the anchor was taken of, in its order
        self._fedharmony_positives: Tensor | None = None  # positives per label seen since the anchor
        self._fedharmony_rows: tuple[list[int], list[int]] | None = None  # (output, other) indices into the anchor
        # (preds or logits, target, observed, whether the first entry still needs the sigmoid)
        self._fedharmony_batch: tuple[Tensor, Tensor, Tensor | None, bool] | None = None
        self._fedharmony_pair_weight: tuple[Tensor, int, torch.dtype, Tensor, Tensor] | None = None
        self._fedharmony_layout: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        self._fedharmony_sums: dict[str, tuple[Tensor | float, int]] = {}
        self._fedharmony_layout_key: tuple[int, int, torch.device] | None = None

    def _fedharmony_module(self) -> nn.Module:
        if not isinstance(self, nn.Module):
            raise TypeError(
                f"Expected `FedHarmonyMixin` to be mixed into a LightningModule, but {type(self).__name__} is not an"
                " nn.Module. HINT: declare `class MyModel(FedHarmonyMixin, L.LightningModule)`."
            )
        return self

    # ------------------------------------------------------------------ configuration by the server
    def fedharmony_configure(
        self,
        *,
        alignment_weight: float | None = None,
        proximal_mu: float | None = None,
        corr_normalization: str | None = None,
        corr_eps: float | None = None,
        corr_momentum: float | None = None,
        detach_marginals: bool | None = None,
        proximal_scaling: str | None = None,
        proximal_rows: str | None = None,
        proximal_full_at: float | None = None,
        proximal_absent: float | None = None,
        proximal_reference_labels: float | None = None,
    ) -> None:
        """Set the loss weights and the batch correlation's settings (``None`` keeps the current value)."""
        check_label_pull(proximal_rows, proximal_full_at, proximal_absent)
        check_reference_labels(proximal_reference_labels)
        if proximal_reference_labels is not None:
            self.fedharmony_proximal_reference_labels = float(proximal_reference_labels)
        if proximal_rows is not None:
            self.fedharmony_proximal_rows = proximal_rows
        if proximal_full_at is not None:
            self.fedharmony_proximal_full_at = float(proximal_full_at)
        if proximal_absent is not None:
            self.fedharmony_proximal_absent = float(proximal_absent)
        if proximal_scaling is not None:
            if proximal_scaling not in CLIENT_PROXIMAL_SCALINGS:
                raise ValueError(
                    f"Expected argument `proximal_scaling` to be one of {CLIENT_PROXIMAL_SCALINGS},"
                    f" but got {proximal_scaling!r}."
                )
            self.fedharmony_proximal_scaling = proximal_scaling
        if corr_momentum is not None:
            if isinstance(corr_momentum, bool) or not (
                isinstance(corr_momentum, (int, float)) and 0.0 <= corr_momentum < 1.0
            ):
                raise ValueError(f"Expected argument `corr_momentum` to be in [0, 1), but got {corr_momentum!r}.")
            self.fedharmony_corr_momentum = float(corr_momentum)
        if detach_marginals is not None:
            if not isinstance(detach_marginals, bool):
                raise TypeError(f"Expected argument `detach_marginals` to be a bool, but got {detach_marginals!r}.")
            self.fedharmony_detach_marginals = detach_marginals
        if corr_normalization is not None:
            _check_normalization(corr_normalization, "corr_normalization")
            self.fedharmony_corr_normalization = cast(Normalization, corr_normalization)
        if corr_eps is not None:
            if isinstance(corr_eps, bool) or not (isinstance(corr_eps, (int, float)) and corr_eps > 0):
                raise ValueError(f"Expected argument `corr_eps` to be > 0, but got {corr_eps!r}.")
            self.fedharmony_corr_eps = float(corr_eps)
        if alignment_weight is not None:
            if not alignment_weight >= 0:
                raise ValueError(f"Expected argument `alignment_weight` to be >= 0, but got {alignment_weight!r}.")
            self.fedharmony_alignment_weight = float(alignment_weight)
        if proximal_mu is not None:
            if not proximal_mu >= 0:
                raise ValueError(f"Expected argument `proximal_mu` to be >= 0, but got {proximal_mu!r}.")
            self.fedharmony_proximal_mu = float(proximal_mu)

    def fedharmony_set_teacher(self, teacher: Tensor | None, mask: Tensor | None = None) -> None:
        """Install a consensus teacher ``(L, L)`` and the bool pairs to align ``(L, L)``; ``None`` removes it."""
        module = self._fedharmony_module()
        if teacher is None:
            device = self.fedharmony_teacher.device
            module.fedharmony_teacher = torch.empty(0, 0, device=device)
            module.fedharmony_mask = torch.empty(0, 0, dtype=torch.bool, device=device)
            return
        if teacher.ndim != 2 or teacher.shape[0] != teacher.shape[1]:
            raise ValueError(f"Expected argument `teacher` to have shape (L, L), but got {tuple(teacher.shape)}.")
        if mask is None:
            mask = ~torch.eye(teacher.shape[0], dtype=torch.bool)
        if mask.shape != teacher.shape:
            raise ValueError(
                f"Expected argument `mask` to have shape {tuple(teacher.shape)}, but got {tuple(mask.shape)}."
            )
        if not torch.isfinite(teacher).all():
            raise ValueError("Expected argument `teacher` to be finite, but it holds NaN or inf.")
        device = self.fedharmony_teacher.device
        module.fedharmony_teacher = teacher.detach().to(device=device, dtype=torch.float32).clone()
        module.fedharmony_mask = mask.detach().to(device=device, dtype=torch.bool).clone()

    def fedharmony_reset_running(self) -> None:
        """Forget the running moments of ``corr_momentum`` and the running loss means (a new client or round)."""
        self._fedharmony_running = None
        self._fedharmony_sums = {}

    def fedharmony_running_means(self) -> dict[str, float]:
        """Sample-weighted means of the loss parts over training steps since :meth:`fedharmony_reset_running`.

        Kept without ``self.log``, so a runner can read them with logging off (Lightning's per-step logging costs
        several milliseconds per fit, which dominates clients with few batches).
        """
        return {name: float(total / count) for name, (total, count) in self._fedharmony_sums.items() if count > 0}

    def _fedharmony_accumulate(self, name: str, value: Tensor, count: int) -> None:
        total, seen = self._fedharmony_sums.get(name, (0.0, 0))
        self._fedharmony_sums[name] = (total + value.detach() * count, seen + count)

    @property
    def fedharmony_has_teacher(self) -> bool:
        """Whether a teacher is installed."""
        return self.fedharmony_teacher.numel() > 0

    def fedharmony_set_anchor(self) -> None:
        """Snapshot the current parameters as FedProx's global anchor (call after loading the global weights)."""
        module = self._fedharmony_module()
        self._fedharmony_anchored = [p for p in module.parameters() if p.requires_grad]
        self._fedharmony_anchor = [p.detach().clone() for p in self._fedharmony_anchored]
        self._fedharmony_drift = None
        self._fedharmony_positives = None
        self._fedharmony_rows = None

    def fedharmony_output_parameters(self) -> list[Tensor]:
        """The parameters whose first dimension is the labels' (``proximal_rows="labels"`` pulls them per row).

        Override it where the output layer is not the last ``nn.Linear`` registered, e.g.
        ``return [self.head.weight, self.head.bias]``.

        Returns:
            By default the weight and bias of the last ``nn.Linear`` registered (empty without one); the caller
            checks their first dimension against the logits.
        """
        linears = [m for m in self._fedharmony_module().modules() if isinstance(m, nn.Linear)]
        if not linears:
            return []
        head = linears[-1]
        return [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]

    def _fedharmony_proximal_params(self) -> list[Tensor]:
        # walking `parameters()` costs more than the rest of the term's Python on a small model: reuse the list the
        # anchor was taken of, unless module conversions may have replaced the Parameter objects since
        if torch.__future__.get_overwrite_module_params_on_conversion():
            return [p for p in self._fedharmony_module().parameters() if p.requires_grad]
        return self._fedharmony_anchored

    # ------------------------------------------------------------------ the loss
    def fedharmony_loss(
        self,
        logits: Tensor,
        target: Tensor,
        observed: Tensor | None = None,
        loss_fn: LossFn | None = None,
    ) -> Tensor:
        """Multi-label loss plus FedHarmony's alignment term and, if active, FedProx's proximal term.

        Args:
            logits: ``(N, L)`` raw scores.
            target: ``(N, L)`` 0/1 targets.
            observed: optional ``(N, L)`` or ``(L,)`` bool, label entries this client observes; unobserved entries
                are left out of the task loss, the alignment pairs and the exported statistics.
            loss_fn: the module's own loss ``loss_fn(logits, target)``; BCE with logits by default. With
                ``observed`` it must return element-wise ``(N, L)`` losses.

        Returns:
            Scalar loss.
        """
        if logits.ndim != 2 or target.shape != logits.shape:
            raise ValueError(
                "Expected `logits` and `target` to share one (N, L) shape, but got"
                f" {tuple(logits.shape)} and {tuple(target.shape)}."
            )
        obs = None if observed is None else torch.broadcast_to(observed.to(torch.bool), logits.shape)
        target_f = target.to(logits.dtype)
        task = self._fedharmony_task_loss(logits, target_f, obs, loss_fn)
        training = self._fedharmony_module().training
        aligning = training and self.fedharmony_has_teacher and self.fedharmony_alignment_weight > 0
        # log only inside the Trainer's hooks: after fit `_trainer` stays set but `self.log` would raise
        logging = (
            self.fedharmony_log_loss_parts
            and getattr(self, "_trainer", None) is not None
            and getattr(self, "_current_fx_name", None) is not None
        )
        # the probabilities only when a term or the log reads them; otherwise whoever pops the batch computes them
        preds = torch.sigmoid(logits) if aligning or logging else None
        kept = logits if preds is None else preds
        self._fedharmony_batch = (kept.detach(), target.detach(), None if obs is None else obs.detach(), preds is None)

        total = task
        align = None
        if aligning and preds is not None:
            if self.fedharmony_teacher.shape[0] != logits.shape[1]:
                raise RuntimeError(
                    f"Expected a teacher over {logits.shape[1]} labels, but the installed one has"
                    f" {self.fedharmony_teacher.shape[0]}."
                )
            align = self._fedharmony_alignment(preds, None if obs is None else obs.any(0))
            total = total + self.fedharmony_alignment_weight * align
        prox = None
        if training and self.fedharmony_proximal_mu > 0 and self._fedharmony_anchor is not None:
            params = self._fedharmony_proximal_params()
            mu = self.fedharmony_proximal_mu
            if self.fedharmony_proximal_reference_labels > 0:
                mu *= label_count_proximal_scale(logits.shape[1], self.fedharmony_proximal_reference_labels)
            if self.fedharmony_proximal_scaling == "drift":
                mu *= self._fedharmony_drift_scale(params, self._fedharmony_anchor)
            if self.fedharmony_proximal_rows == "labels":
                prox = self._fedharmony_label_proximal(params, mu, target, obs)
            else:
                prox = proximal_term(params, self._fedharmony_anchor, mu)
            total = total + prox

        if training:
            num = logits.shape[0]
            self._fedharmony_accumulate("task_loss", task, num)
            if align is not None:
                self._fedharmony_accumulate("align_loss", align, num)
        if logging and preds is not None:
            self._fedharmony_log(task, align, prox, preds, logits.shape[0])
        return total

    def _fedharmony_label_proximal(self, params: list[Tensor], mu: float, target: Tensor, obs: Tensor | None) -> Tensor:
        """``proximal_rows="labels"``: the output rows pulled per label by the positives seen since the anchor."""
        anchor = cast(list[Tensor], self._fedharmony_anchor)
        num_labels = target.shape[1]
        if self._fedharmony_rows is None:
            output = {id(p) for p in self.fedharmony_output_parameters()}
            rows = [i for i, p in enumerate(params) if id(p) in output]
            output_index = set(rows)
            bad = [tuple(params[i].shape) for i in rows if params[i].ndim == 0 or params[i].shape[0] != num_labels]
            if not rows or bad:
                raise ValueError(
                    f"Expected `fedharmony_output_parameters()` to return trainable parameters whose first dimension"
                    f" is the {num_labels} labels, but got shapes {bad or 'none'}. HINT: override it to return the"
                    " output layer's weight and bias."
                )
            self._fedharmony_rows = (rows, [i for i in range(len(params)) if i not in output_index])
        rows, other = self._fedharmony_rows
        with torch.no_grad():
            positive = target.detach().float().clamp(0.0, 1.0)
            if obs is not None:
                positive = positive * obs
            seen = positive.sum(0)
            self._fedharmony_positives = (
                seen if self._fedharmony_positives is None else self._fedharmony_positives + seen
            )
            scale = label_proximal_scale(
                self._fedharmony_positives, self.fedharmony_proximal_full_at, self.fedharmony_proximal_absent
            )
        prox = row_proximal_term([params[i] for i in rows], [anchor[i] for i in rows], mu * scale)
        if other:
            prox = prox + proximal_term([params[i] for i in other], [anchor[i] for i in other], mu)
        return prox

    def _fedharmony_drift_scale(self, params: list[Tensor], anchor: list[Tensor]) -> float:
        """``proximal_scaling="drift"``'s factor for the current epoch, measured once at the epoch's first step."""
        epoch = int(getattr(self, "current_epoch", 0))  # the LightningModule's: 0 without a Trainer
        state = self._fedharmony_drift
        if state is not None and state[0] == epoch:
            return state[2]
        distance = parameter_distance(params, anchor)
        # the anchor's first epoch starts at distance 0; the next one's starting distance is the reference d_1
        first = distance if state is None or state[1] == 0.0 else state[1]
        scale = drift_proximal_scale(first, distance)
        self._fedharmony_drift = (epoch, first, scale)
        return scale

    def _fedharmony_task_loss(
        self, logits: Tensor, target: Tensor, obs: Tensor | None, loss_fn: LossFn | None
    ) -> Tensor:
        if loss_fn is None and obs is None:
            return F.binary_cross_entropy_with_logits(logits, target)
        if loss_fn is None:
            elementwise = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        else:
            elementwise = loss_fn(logits, target)
        if obs is None:
            return elementwise if elementwise.ndim == 0 else elementwise.mean()
        if elementwise.shape != logits.shape:
            raise ValueError(
                f"Expected `loss_fn` to return element-wise losses of shape {tuple(logits.shape)} when `observed` is"
                f" given, but got {tuple(elementwise.shape)}. HINT: use reduction='none'."
            )
        weight = obs.to(elementwise.dtype)
        return (elementwise * weight).sum() / weight.sum().clamp_min(1.0)

    def _fedharmony_alignment(self, preds: Tensor, observed_labels: Tensor | None) -> Tensor:
        layout = self._fedharmony_block_layout()
        eps, normalization = self.fedharmony_corr_eps, self.fedharmony_corr_normalization
        detach, momentum = self.fedharmony_detach_marginals, self.fedharmony_corr_momentum
        if layout is None:
            mask = self.fedharmony_mask
            if observed_labels is not None:
                mask = mask & pair_validity(observed_labels)
            if momentum == 0:  # the batch's own correlation: one fused autograd node
                return soft_phi_alignment_loss(
                    preds, self.fedharmony_teacher, mask, eps, normalization, detach_scale=detach
                )
            corr = self._fedharmony_running_corr(preds[:, None, :], None)[0]
            return masked_mean_square(corr, self.fedharmony_teacher, *self._fedharmony_weights(mask, corr.dtype))
        # only the in-block correlations: N * G * S^2 work instead of N * L^2
        index, valid, teacher, mask = layout
        if observed_labels is not None:
            mask = mask & pair_validity(observed_labels[index] & valid)
        if momentum == 0:
            corr = block_soft_phi(preds, index, eps, normalization, detach_scale=detach)
        else:
            corr = self._fedharmony_running_corr(preds[:, index], index)
        return masked_mean_square(corr, teacher, *self._fedharmony_weights(mask, corr.dtype))

    def _fedharmony_weights(self, mask: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``mask`` as weights of ``dtype`` and their count (at least 1), kept while the same mask (same object,
        unchanged in place) comes back: the teacher's mask is fixed for a round, so this is once per round."""
        cached = self._fedharmony_pair_weight
        if cached is None or cached[0] is not mask or cached[1] != mask._version or cached[2] != dtype:
            weight = mask.to(dtype)
            cached = (mask, mask._version, dtype, weight, weight.sum().clamp_min(1.0))
            self._fedharmony_pair_weight = cached
        return cached[3], cached[4]

    def _fedharmony_block_layout(self) -> tuple[Tensor, Tensor, Tensor, Tensor] | None:
        """Teacher and mask gathered per block, cached until either changes."""
        teacher, mask = self.fedharmony_teacher, self.fedharmony_mask
        key = (teacher.data_ptr(), mask.data_ptr(), teacher.device)
        if self._fedharmony_layout_key != key:
            layout = block_layout(mask) if mask.shape[0] >= BLOCK_KERNEL_MIN_LABELS else None
            if layout is None:
                self._fedharmony_layout = None
            else:
                index, valid = layout
                rows, cols = index[:, :, None], index[:, None, :]
                pairs = mask[rows, cols] & valid[:, :, None] & valid[:, None, :]
                self._fedharmony_layout = (index, valid, teacher[rows, cols], pairs)
            self._fedharmony_layout_key = key
        return self._fedharmony_layout

    def _fedharmony_running_corr(self, gathered: Tensor, index: Tensor | None) -> Tensor:
        """``(G, S, S)`` correlations of the column groups ``gathered`` ``(N, G, S)`` (one group of all ``L`` labels
        on the dense path), from the batch's moments mixed with detached running moments (`corr_momentum` > 0)."""
        momentum = self.fedharmony_corr_momentum
        # running moments in float64: moments of saturated columns cancel catastrophically in float32
        wide = gathered.double()
        mean = wide.mean(0)
        outer = torch.einsum("ngi,ngj->gij", wide, wide) / wide.shape[0]
        running = self._fedharmony_running
        # moments of other columns (a new block layout) must not be mixed in
        same_columns = (index is None and running is not None and running[2] is None) or (
            index is not None and running is not None and running[2] is not None and torch.equal(running[2], index)
        )
        if running is not None and same_columns and running[0].shape == mean.shape:
            mean = momentum * running[0] + (1 - momentum) * mean
            outer = momentum * running[1] + (1 - momentum) * outer
        self._fedharmony_running = (mean.detach(), outer.detach(), index)
        corr = phi_from_means(
            mean,
            outer,
            self.fedharmony_corr_eps,
            self.fedharmony_corr_normalization,
            detach_scale=self.fedharmony_detach_marginals,
        )
        return corr.to(gathered.dtype)

    def _fedharmony_log(self, task: Tensor, align: Tensor | None, prox: Tensor | None, preds: Tensor, n: int) -> None:
        stage = "train" if self._fedharmony_module().training else "val"
        parts = {"task_loss": task.detach()}
        if align is not None:
            parts["align_loss"] = align.detach()
        if prox is not None:
            parts["prox_loss"] = prox.detach()
        with torch.no_grad():
            parts["pos_rate"] = (preds > 0.5).float().mean()
            parts["confidence"] = (2 * preds - 1).abs().mean()
        log = self.log  # type: ignore[attr-defined]
        for name, value in parts.items():
            log(f"{stage}/fedharmony_{name}", value, on_step=False, on_epoch=True, batch_size=n)

    def fedharmony_pop_batch(self) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The detached ``(preds, target, observed)`` of the last :meth:`fedharmony_loss` call, once."""
        batch, self._fedharmony_batch = self._fedharmony_batch, None
        if batch is None:
            return None
        kept, target, observed, needs_sigmoid = batch
        return torch.sigmoid(kept) if needs_sigmoid else kept, target, observed

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any], strict: bool, *args: Any
    ) -> None:
        # the teacher's shape is only known once one is installed: resize the buffers to what the checkpoint holds
        module = self._fedharmony_module()
        for name in (_TEACHER, _MASK):
            key = prefix + name
            if key in state_dict and isinstance(state_dict[key], Tensor):
                current = module._buffers[name]
                if current is None:
                    continue
                module._buffers[name] = torch.empty_like(state_dict[key], device=current.device, dtype=current.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, *args)  # type: ignore[misc]
