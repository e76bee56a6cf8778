"""FedHarmonyMixin: the loss terms against their definitions, gradients, buffers and checkpoints, errors, logging."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers.models import NUM_LABELS, TinyMLP, ValidatedMLP, make_loader, make_trainer, multilabel_data
from torch import Tensor

from lightning_fedharmony import FedHarmonyMixin, load_model_weights, model_weights
from lightning_fedharmony.functional import alignment_loss, pair_validity, phi_from_moments, proximal_term, soft_phi

LAMBDA = 0.7


def _teacher(num_labels: int = NUM_LABELS, seed: int = 0) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    r = 2 * torch.rand(num_labels, num_labels, generator=generator) - 1
    r = 0.5 * (r + r.T)
    return r.fill_diagonal_(1.0)


def _off_diagonal(num_labels: int = NUM_LABELS) -> Tensor:
    return ~torch.eye(num_labels, dtype=torch.bool)


def _batch(num_samples: int = 32, seed: int = 0) -> tuple[Tensor, Tensor]:
    return multilabel_data(num_samples, seed=seed)


def _model(seed: int = 0, **kwargs: object) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP(**kwargs)  # type: ignore[arg-type]


def _grads(model: TinyMLP, loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, [p for p in model.parameters()]))


def _plain_bce(model: TinyMLP, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
    twin = copy.deepcopy(model)
    loss = F.binary_cross_entropy_with_logits(twin(x), y)
    return loss.detach(), _grads(twin, loss)


def _assert_equal_grads(got: list[Tensor], expected: list[Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


# ---------------------------------------------------------------------------------------------------- task loss only
def test_without_teacher_loss_and_gradients_are_plain_bce() -> None:
    model, (x, y) = _model(), _batch()
    expected_loss, expected_grads = _plain_bce(model, x, y)
    loss = model.fedharmony_loss(model(x), y)
    assert not model.fedharmony_has_teacher
    assert torch.equal(loss.detach(), expected_loss)
    _assert_equal_grads(_grads(model, loss), expected_grads)


def test_with_teacher_and_zero_alignment_weight_loss_and_gradients_are_plain_bce() -> None:
    model, (x, y) = _model(alignment_weight=0.0), _batch()
    model.fedharmony_set_teacher(_teacher())
    assert model.fedharmony_has_teacher
    expected_loss, expected_grads = _plain_bce(model, x, y)
    loss = model.fedharmony_loss(model(x), y)
    assert torch.equal(loss.detach(), expected_loss)
    _assert_equal_grads(_grads(model, loss), expected_grads)


def test_in_eval_mode_the_teacher_is_ignored() -> None:
    model, (x, y) = _model(alignment_weight=LAMBDA), _batch()
    model.fedharmony_set_teacher(_teacher())
    model.eval()
    with torch.no_grad():
        logits = model(x)
        assert torch.equal(model.fedharmony_loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))


# ---------------------------------------------------------------------------------------------------- alignment term
@pytest.mark.parametrize("normalization", ["bernoulli", "pearson"])
def test_alignment_term_is_added(normalization: str) -> None:
    model, (x, y) = _model(alignment_weight=LAMBDA, corr_normalization=normalization), _batch()
    teacher, mask = _teacher(), _off_diagonal()
    mask[0, 3] = mask[3, 0] = False
    model.fedharmony_set_teacher(teacher, mask)
    logits = model(x)
    loss = model.fedharmony_loss(logits, y)
    align = alignment_loss(soft_phi(torch.sigmoid(logits), normalization=normalization), teacher, mask)  # type: ignore[arg-type]
    assert align > 1e-3
    expected = F.binary_cross_entropy_with_logits(logits, y) + LAMBDA * align
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    # the alignment term changes the gradients
    _, bce_grads = _plain_bce(model, x, y)
    assert any(not torch.allclose(g, e) for g, e in zip(_grads(model, loss), bce_grads))


def test_default_mask_aligns_every_off_diagonal_pair() -> None:
    model = _model()
    model.fedharmony_set_teacher(_teacher())
    assert torch.equal(model.fedharmony_mask, _off_diagonal())
    assert model.fedharmony_teacher.dtype == torch.float32
    model.fedharmony_set_teacher(None)
    assert not model.fedharmony_has_teacher
    assert model.fedharmony_teacher.shape == (0, 0) and model.fedharmony_mask.shape == (0, 0)


def test_teacher_is_copied() -> None:
    model, teacher = _model(), _teacher()
    model.fedharmony_set_teacher(teacher)
    teacher.zero_()
    assert model.fedharmony_teacher[0, 0] == 1.0


def test_alignment_weight_can_be_reconfigured() -> None:
    model, (x, y) = _model(alignment_weight=LAMBDA), _batch()
    model.fedharmony_set_teacher(_teacher())
    model.fedharmony_configure(alignment_weight=3.0)
    assert model.fedharmony_alignment_weight == 3.0
    model.fedharmony_configure(proximal_mu=None, alignment_weight=None)  # keeps both
    assert model.fedharmony_alignment_weight == 3.0 and model.fedharmony_proximal_mu == 0.0
    logits = model(x)
    align = alignment_loss(soft_phi(torch.sigmoid(logits)), _teacher(), _off_diagonal())
    expected = F.binary_cross_entropy_with_logits(logits, y) + 3.0 * align
    torch.testing.assert_close(model.fedharmony_loss(logits, y), expected, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- observed mask
def test_unobserved_label_is_excluded_from_task_loss_and_alignment_pairs() -> None:
    model, (x, y) = _model(alignment_weight=LAMBDA), _batch()
    teacher = _teacher()
    model.fedharmony_set_teacher(teacher)
    observed = torch.tensor([True, True, False, True, True])
    logits = model(x)
    loss = model.fedharmony_loss(logits, y, observed)
    keep = observed.nonzero().squeeze(1)
    task = F.binary_cross_entropy_with_logits(logits[:, keep], y[:, keep])
    pairs = _off_diagonal() & pair_validity(observed)
    assert not pairs[2].any() and not pairs[:, 2].any()
    align = alignment_loss(soft_phi(torch.sigmoid(logits)), teacher, pairs)
    torch.testing.assert_close(loss, task + LAMBDA * align, rtol=1e-6, atol=1e-7)
    # nothing about label 2 reaches its logits: not through the task loss, not through an alignment pair
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad[:, 2], torch.zeros_like(grad[:, 2]))


def test_elementwise_observed_mask() -> None:
    model, (x, y) = _model(alignment_weight=0.0), _batch(8)
    observed = torch.rand(8, NUM_LABELS, generator=torch.Generator().manual_seed(3)) < 0.6
    observed[:, 4] = False  # never observed in this batch
    logits = model(x)
    loss = model.fedharmony_loss(logits, y, observed)
    elementwise = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    expected = elementwise[observed].sum() / observed.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.equal(grad[~observed], torch.zeros_like(grad[~observed]))
    # the alignment pairs lose the label nobody in the batch observes
    model.fedharmony_configure(alignment_weight=LAMBDA)
    model.fedharmony_set_teacher(_teacher())
    logits = model(x)
    align = alignment_loss(
        soft_phi(torch.sigmoid(logits)), _teacher(), _off_diagonal() & pair_validity(observed.any(0))
    )
    torch.testing.assert_close(model.fedharmony_loss(logits, y, observed), expected + LAMBDA * align)


def test_batch_of_predictions_is_kept_once() -> None:
    model, (x, y) = _model(), _batch(4)
    assert model.fedharmony_pop_batch() is None
    observed = torch.tensor([True, False, True, True, True])
    logits = model(x)
    model.fedharmony_loss(logits, y, observed)
    batch = model.fedharmony_pop_batch()
    assert batch is not None
    preds, target, obs = batch
    assert torch.equal(preds, torch.sigmoid(logits).detach()) and not preds.requires_grad
    assert torch.equal(target, y)
    assert obs is not None and obs.shape == (4, NUM_LABELS) and torch.equal(obs[0], observed)
    assert model.fedharmony_pop_batch() is None


def test_batch_without_alignment_keeps_the_logits_until_popped() -> None:
    """With no term reading the probabilities, the sigmoid runs when the batch is popped: the same values."""
    model, (x, y) = _model(), _batch(4)
    model.fedharmony_log_loss_parts = False
    logits = model(x)
    model.fedharmony_loss(logits, y)
    batch = model.fedharmony_pop_batch()
    assert batch is not None
    assert torch.equal(batch[0], torch.sigmoid(logits).detach()) and not batch[0].requires_grad


def test_cached_pair_weights_follow_the_mask() -> None:
    """The running-moment path keeps the alignment's pair weights while the mask is unchanged and rebuilds them after
    an in-place edit or a new teacher: always the value of `alignment_loss` with the current mask."""
    model, (x, _) = _model(), _batch()
    model.fedharmony_log_loss_parts = False
    model.fedharmony_configure(alignment_weight=LAMBDA, corr_momentum=0.5)

    def check(mask: Tensor) -> None:
        model.fedharmony_reset_running()
        preds = torch.sigmoid(model(x))
        got = model._fedharmony_alignment(preds, None)
        model.fedharmony_reset_running()
        corr = model._fedharmony_running_corr(preds[:, None, :], None)[0]
        assert torch.equal(got, alignment_loss(corr, _teacher(), mask))

    model.fedharmony_set_teacher(_teacher(), _off_diagonal())
    check(_off_diagonal())
    check(_off_diagonal())
    with torch.no_grad():
        model.fedharmony_mask[:, 2:] = False  # in place: the cache must notice
    edited = _off_diagonal()
    edited[:, 2:] = False
    check(edited)
    model.fedharmony_set_teacher(_teacher(), _off_diagonal())
    check(_off_diagonal())


# ---------------------------------------------------------------------------------------------------- custom loss_fn
def test_custom_scalar_loss_fn() -> None:
    model, (x, y) = _model(), _batch()

    def squared_error(logits: Tensor, target: Tensor) -> Tensor:
        return (torch.sigmoid(logits) - target).square().mean()

    logits = model(x)
    assert torch.equal(model.fedharmony_loss(logits, y, loss_fn=squared_error), squared_error(logits, y))


def test_custom_elementwise_loss_fn() -> None:
    model, (x, y) = _model(), _batch(8)
    weight = torch.linspace(0.5, 2.0, NUM_LABELS)

    def weighted_bce(logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none") * weight

    logits = model(x)
    torch.testing.assert_close(model.fedharmony_loss(logits, y, loss_fn=weighted_bce), weighted_bce(logits, y).mean())
    observed = torch.tensor([True, True, True, False, True])
    expected = weighted_bce(logits, y)[:, observed].mean()
    torch.testing.assert_close(model.fedharmony_loss(logits, y, observed, loss_fn=weighted_bce), expected)


def test_scalar_loss_fn_with_observed_raises() -> None:
    model, (x, y) = _model(), _batch(8)

    def scalar(logits: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, target)

    with pytest.raises(ValueError, match=r"element-wise losses of shape \(8, 5\) when `observed` is given.*HINT"):
        model.fedharmony_loss(model(x), y, torch.ones(NUM_LABELS, dtype=torch.bool), loss_fn=scalar)


# ---------------------------------------------------------------------------------------------------- proximal term
def test_proximal_term_after_anchor() -> None:
    model, (x, y) = _model(proximal_mu=0.5), _batch()
    logits = model(x)
    # no anchor yet: no proximal term
    assert torch.equal(model.fedharmony_loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))
    model.fedharmony_set_anchor()
    anchor = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    logits = model(x)
    loss = model.fedharmony_loss(logits, y)
    prox = proximal_term(list(model.parameters()), anchor, 0.5)
    assert prox > 0
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, y) + prox)
    # the anchor is a snapshot, and mu = 0 turns the term off
    model.fedharmony_configure(proximal_mu=0.0)
    assert torch.equal(model.fedharmony_loss(logits, y), F.binary_cross_entropy_with_logits(logits, y))


def test_proximal_term_gradient_pulls_towards_anchor() -> None:
    model, (x, y) = _model(proximal_mu=2.0), _batch()
    model.fedharmony_set_anchor()
    with torch.no_grad():
        model.net[0].bias.add_(1.0)
    loss = model.fedharmony_loss(model(x), y)
    _, bce_grads = _plain_bce(model, x, y)
    grads = _grads(model, loss)
    names = [name for name, _ in model.named_parameters()]
    index = names.index("net.0.bias")
    torch.testing.assert_close(grads[index] - bce_grads[index], torch.full_like(grads[index], 2.0))


# ---------------------------------------------------------------------------------------------------- batch correlation
def test_corr_momentum_mixes_running_moments() -> None:
    momentum = 0.6
    model = _model(alignment_weight=1.0, corr_momentum=momentum)
    teacher, mask = _teacher(), _off_diagonal()
    model.fedharmony_set_teacher(teacher, mask)
    (x1, y1), (x2, y2) = _batch(16, seed=1), _batch(16, seed=2)
    logits1 = model(x1)
    first = model.fedharmony_loss(logits1, y1) - F.binary_cross_entropy_with_logits(logits1, y1)
    p1 = torch.sigmoid(logits1)
    torch.testing.assert_close(first, alignment_loss(soft_phi(p1), teacher, mask))  # nothing to mix yet
    logits2 = model(x2)
    second = model.fedharmony_loss(logits2, y2) - F.binary_cross_entropy_with_logits(logits2, y2)
    p2 = torch.sigmoid(logits2)
    mean = momentum * p1.mean(0) + (1 - momentum) * p2.mean(0)
    outer = momentum * (p1.T @ p1 / 16) + (1 - momentum) * (p2.T @ p2 / 16)
    expected = alignment_loss(phi_from_moments(1.0, mean, outer), teacher, mask)
    torch.testing.assert_close(second, expected, rtol=1e-5, atol=1e-6)
    pure = alignment_loss(soft_phi(p2), teacher, mask)
    assert abs(float((second - pure).detach())) > 1e-4
    # the running part is detached: the first batch's logits get no gradient from the second loss
    grad_first, grad_second = torch.autograd.grad(second, [logits1, logits2], allow_unused=True)
    assert grad_first is None or not grad_first.any()
    assert grad_second is not None and grad_second.abs().sum() > 0
    # after a reset the next batch stands alone again
    model.fedharmony_reset_running()
    third = model.fedharmony_loss(logits2, y2) - F.binary_cross_entropy_with_logits(logits2, y2)
    torch.testing.assert_close(third, pure, rtol=1e-5, atol=1e-6)


def test_detach_marginals_keeps_the_value_and_changes_the_gradient() -> None:
    (x, y), teacher, mask = _batch(), _teacher(), _off_diagonal()
    losses, grads = [], []
    for detach in (False, True):
        model = _model(alignment_weight=1.0, detach_marginals=detach)
        model.fedharmony_set_teacher(teacher, mask)
        logits = model(x)
        align = model.fedharmony_loss(logits, y) - F.binary_cross_entropy_with_logits(logits, y)
        losses.append(align.detach())
        grads.append(torch.autograd.grad(align, logits)[0])
        if detach:
            # reference, by hand: the covariance keeps its gradient, the Bernoulli variances p (1 - p) do not
            ref_logits = logits.detach().requires_grad_(True)
            preds = torch.sigmoid(ref_logits)
            mean = preds.mean(0)
            cov = preds.T @ preds / preds.shape[0] - mean[:, None] * mean[None, :]
            std = (mean * (1 - mean)).detach().sqrt()
            corr = (cov / (std[:, None] * std[None, :] + 1e-6)).clamp(-1, 1).masked_fill(~mask, 1.0)
            (ref_grad,) = torch.autograd.grad(alignment_loss(corr, teacher, mask), ref_logits)
            torch.testing.assert_close(grads[-1], ref_grad, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(losses[0], losses[1])
    assert not torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------------------------------------------- buffers, weights
def test_teacher_and_mask_travel_in_state_dict_not_in_model_weights() -> None:
    model = _model()
    teacher, mask = _teacher(), _off_diagonal()
    mask[1, 2] = mask[2, 1] = False
    model.fedharmony_set_teacher(teacher, mask)
    state = model.state_dict()
    assert torch.equal(state["fedharmony_teacher"], teacher) and torch.equal(state["fedharmony_mask"], mask)
    weights = model_weights(model)
    assert set(weights) == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    fresh = _model(seed=1)
    assert fresh.fedharmony_teacher.shape == (0, 0)
    fresh.load_state_dict(state)  # resizes the empty buffers
    assert torch.equal(fresh.fedharmony_teacher, teacher) and torch.equal(fresh.fedharmony_mask, mask)
    assert fresh.fedharmony_mask.dtype == torch.bool
    assert torch.equal(fresh.net[0].weight, model.net[0].weight)
    # and back to no teacher
    fresh.load_state_dict(_model().state_dict())
    assert not fresh.fedharmony_has_teacher and fresh.fedharmony_mask.dtype == torch.bool


def test_load_model_weights_leaves_the_teacher_alone() -> None:
    model, other = _model(), _model(seed=1)
    model.fedharmony_set_teacher(_teacher())
    load_model_weights(model, model_weights(other))
    assert torch.equal(model.net[2].weight, other.net[2].weight)
    assert torch.equal(model.fedharmony_teacher, _teacher())
    weights = model_weights(other)
    weights.pop("net.0.bias")
    weights["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"\['net.0.bias'\] are missing and \['extra'\] are unexpected"):
        load_model_weights(model, weights)


def test_trainer_checkpoint_holds_the_teacher(tmp_path: pytest.TempPathFactory) -> None:
    x, y = _batch(32)
    model = _model(alignment_weight=LAMBDA)
    teacher, mask = _teacher(), _off_diagonal()
    model.fedharmony_set_teacher(teacher, mask)
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, default_root_dir=tmp_path)
    trainer.fit(model, make_loader(x, y))
    path = tmp_path / "model.ckpt"  # type: ignore[operator]
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["fedharmony_teacher"], teacher)
    assert torch.equal(checkpoint["state_dict"]["fedharmony_mask"], mask)
    restored = TinyMLP.load_from_checkpoint(path, alignment_weight=LAMBDA)
    assert torch.equal(restored.fedharmony_teacher, teacher) and torch.equal(restored.fedharmony_mask, mask)
    # logging is only attempted inside the Trainer's hooks: computing the loss after fit must work
    logits = model(x)
    expected = F.binary_cross_entropy_with_logits(logits, y) + LAMBDA * alignment_loss(
        soft_phi(torch.sigmoid(logits)), teacher, mask
    )
    torch.testing.assert_close(model.fedharmony_loss(logits, y), expected)


# ---------------------------------------------------------------------------------------------------- logging
def test_loss_parts_are_logged() -> None:
    x, y = _batch(64)
    torch.manual_seed(0)
    model = ValidatedMLP(alignment_weight=LAMBDA, proximal_mu=0.01)
    model.fedharmony_set_teacher(_teacher())
    model.fedharmony_set_anchor()
    trainer = make_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, make_loader(x, y), make_loader(x, y))
    metrics = trainer.callback_metrics
    for part in ("task_loss", "align_loss", "prox_loss", "pos_rate", "confidence"):
        assert f"train/fedharmony_{part}" in metrics
    assert "val/fedharmony_task_loss" in metrics and "val/fedharmony_align_loss" not in metrics
    steps = model.logged["train/fedharmony_align_loss"]
    assert len(steps) == 2 and all(v > 0 for v in steps)
    torch.testing.assert_close(float(metrics["train/fedharmony_align_loss"]), sum(steps) / 2, rtol=1e-5, atol=0)
    assert 0.0 <= float(metrics["train/fedharmony_pos_rate"]) <= 1.0
    assert 0.0 <= float(metrics["train/fedharmony_confidence"]) <= 1.0


def test_loss_parts_logging_can_be_turned_off() -> None:
    x, y = _batch(32)
    model = _model(log_loss_parts=False)
    trainer = make_trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(model, make_loader(x, y))
    assert not [k for k in trainer.callback_metrics if "fedharmony" in k]
    assert not model.logged


# ---------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alignment_weight": -1.0}, ValueError, "Expected argument `alignment_weight` to be >= 0, but got -1.0"),
        ({"alignment_weight": float("nan")}, ValueError, "`alignment_weight` to be >= 0, but got nan"),
        ({"proximal_mu": -0.1}, ValueError, "Expected argument `proximal_mu` to be >= 0, but got -0.1"),
        ({"corr_momentum": 1.0}, ValueError, r"Expected argument `corr_momentum` to be in \[0, 1\), but got 1.0"),
        ({"corr_momentum": -0.5}, ValueError, r"`corr_momentum` to be in \[0, 1\), but got -0.5"),
        (
            {"corr_normalization": "spearman"},
            ValueError,
            r"to be one of \('bernoulli', 'pearson'\), but got 'spearman'",
        ),
    ],
)
def test_constructor_errors(kwargs: dict, error: type[Exception], match: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(error, match=match):
        TinyMLP(**kwargs)


def test_corr_eps_must_be_positive() -> None:
    class Eps(FedHarmonyMixin, torch.nn.Module):
        pass

    with pytest.raises(ValueError, match=r"Expected argument `corr_eps` to be > 0, but got 0\.0"):
        Eps(corr_eps=0.0)


def test_configure_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match="`alignment_weight` to be >= 0, but got -2"):
        model.fedharmony_configure(alignment_weight=-2)
    with pytest.raises(ValueError, match="`proximal_mu` to be >= 0, but got -1"):
        model.fedharmony_configure(proximal_mu=-1)
    assert model.fedharmony_alignment_weight == 1.0 and model.fedharmony_proximal_mu == 0.0


def test_teacher_errors() -> None:
    model = _model()
    with pytest.raises(ValueError, match=r"`teacher` to have shape \(L, L\), but got \(5, 4\)"):
        model.fedharmony_set_teacher(torch.zeros(5, 4))
    with pytest.raises(ValueError, match=r"`teacher` to have shape \(L, L\), but got \(5,\)"):
        model.fedharmony_set_teacher(torch.zeros(5))
    with pytest.raises(ValueError, match=r"`mask` to have shape \(5, 5\), but got \(4, 4\)"):
        model.fedharmony_set_teacher(_teacher(), torch.ones(4, 4, dtype=torch.bool))
    nan_teacher = _teacher()
    nan_teacher[0, 1] = float("nan")
    with pytest.raises(ValueError, match="Expected argument `teacher` to be finite, but it holds NaN or inf"):
        model.fedharmony_set_teacher(nan_teacher)
    assert not model.fedharmony_has_teacher
    model.fedharmony_set_teacher(_teacher(num_labels=3))
    x, y = _batch(4)
    with pytest.raises(RuntimeError, match="Expected a teacher over 5 labels, but the installed one has 3"):
        model.fedharmony_loss(model(x), y)


def test_loss_shape_errors() -> None:
    model, (x, y) = _model(), _batch(4)
    logits = model(x)
    with pytest.raises(ValueError, match=r"one \(N, L\) shape, but got \(4, 5\) and \(4, 4\)"):
        model.fedharmony_loss(logits, y[:, :4])
    with pytest.raises(ValueError, match=r"one \(N, L\) shape, but got \(20,\) and \(20,\)"):
        model.fedharmony_loss(logits.flatten(), y.flatten())


def test_mixin_without_nn_module_raises_type_error() -> None:
    class NotAModule(FedHarmonyMixin):
        pass

    with pytest.raises(
        TypeError, match=r"NotAModule is not an nn.Module\. HINT: declare `class MyModel\(FedHarmonyMixin"
    ):
        NotAModule()
