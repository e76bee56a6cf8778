"""The in-block kernel: same alignment term as the dense computation, at a fraction of the work."""

from __future__ import annotations

import pytest
import torch
from helpers.models import TinyMLP

from lightning_fedharmony.functional import (
    alignment_loss,
    block_layout,
    block_mask,
    block_soft_phi,
    mask_components,
    pair_validity,
    soft_phi,
)


def _setup(num_labels: int = 30, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    cluster = torch.randperm(num_labels, generator=generator) % 5  # five blocks of six labels
    support = torch.rand(num_labels, num_labels, generator=generator) > 0.2
    mask = block_mask(cluster) & support & support.T
    teacher = torch.rand(num_labels, num_labels, generator=generator) * 2 - 1
    teacher = (teacher + teacher.T) / 2
    teacher.fill_diagonal_(1.0)
    preds = torch.rand(64, num_labels, generator=generator, dtype=torch.float64)
    return preds, teacher, mask


@pytest.mark.parametrize("normalization", ["bernoulli", "pearson"])
def test_block_soft_phi_equals_the_gathered_dense_phi(normalization: str) -> None:
    preds, _, mask = _setup()
    layout = block_layout(mask)
    assert layout is not None
    index, valid = layout
    blocks = block_soft_phi(preds, index, normalization=normalization)  # type: ignore[arg-type]
    dense = soft_phi(preds, normalization=normalization)  # type: ignore[arg-type]
    expected = dense[index[:, :, None], index[:, None, :]]
    pairs = valid[:, :, None] & valid[:, None, :]
    torch.testing.assert_close(blocks[pairs], expected[pairs], atol=1e-12, rtol=0)


def test_mask_components_and_layout() -> None:
    cluster = torch.tensor([0, 1, 0, 2, 1, 0])
    component = mask_components(block_mask(cluster))
    assert component.tolist() == [0, 1, 0, 3, 1, 0]
    index, valid = block_layout(block_mask(cluster))  # type: ignore[misc]
    assert index.tolist() == [[0, 2, 5], [1, 4, 0]]
    assert valid.tolist() == [[True, True, True], [True, True, False]]
    all_pairs = ~torch.eye(6, dtype=torch.bool)
    assert block_layout(all_pairs) is None  # one block: the dense path is as cheap
    assert block_layout(torch.zeros(6, 6, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match=r"`mask` to have shape \(L, L\)"):
        mask_components(torch.zeros(3, 2, dtype=torch.bool))


@pytest.mark.parametrize("observed", [False, True])
def test_mixin_block_path_matches_dense_loss_and_gradients(observed: bool) -> None:
    preds, teacher, mask = _setup(num_labels=300)
    preds = preds.float()
    labels = torch.rand(300, generator=torch.Generator().manual_seed(1)) > 0.3 if observed else None
    model = TinyMLP(num_labels=300)
    model.fedharmony_set_teacher(teacher, mask)
    assert model._fedharmony_block_layout() is not None

    block_input = preds.clone().requires_grad_(True)
    block = model._fedharmony_alignment(block_input, labels)
    block.backward()

    dense_input = preds.clone().requires_grad_(True)
    dense_mask = mask if labels is None else mask & pair_validity(labels)
    dense = alignment_loss(soft_phi(dense_input), model.fedharmony_teacher, dense_mask)
    dense.backward()

    assert block.item() > 0
    torch.testing.assert_close(block, dense, atol=1e-6, rtol=1e-5)
    assert block_input.grad is not None and dense_input.grad is not None
    torch.testing.assert_close(block_input.grad, dense_input.grad, atol=1e-6, rtol=1e-4)


def test_layout_cache_follows_the_teacher() -> None:
    _, teacher, mask = _setup(num_labels=300)
    model = TinyMLP(num_labels=300)
    model.fedharmony_set_teacher(teacher, mask)
    first = model._fedharmony_block_layout()
    model.fedharmony_set_teacher(teacher, ~torch.eye(300, dtype=torch.bool))
    assert first is not None and model._fedharmony_block_layout() is None


def test_few_labels_use_the_dense_path() -> None:
    _, teacher, mask = _setup(num_labels=30)  # blocks would be no faster than one (30, 30) product
    model = TinyMLP(num_labels=30)
    model.fedharmony_set_teacher(teacher, mask)
    assert block_layout(mask) is not None and model._fedharmony_block_layout() is None


@pytest.mark.parametrize("detach", [False, True])
def test_mixin_block_path_with_running_moments_matches_the_dense_one(detach: bool) -> None:
    preds, teacher, mask = _setup(num_labels=300)
    batches = [preds[:32].float(), preds[32:].float()]
    kwargs = {"corr_momentum": 0.9, "corr_normalization": "pearson", "detach_marginals": detach}
    blocks, dense = TinyMLP(num_labels=300, **kwargs), TinyMLP(num_labels=300, **kwargs)
    blocks.fedharmony_set_teacher(teacher, mask)
    dense.fedharmony_set_teacher(teacher, mask)
    dense._fedharmony_layout_key, dense._fedharmony_layout = (  # force the dense path for the reference
        (dense.fedharmony_teacher.data_ptr(), dense.fedharmony_mask.data_ptr(), dense.fedharmony_teacher.device),
        None,
    )
    for batch in batches:  # the second step mixes the first step's running moments in
        block_input, dense_input = batch.clone().requires_grad_(True), batch.clone().requires_grad_(True)
        block_loss = blocks._fedharmony_alignment(block_input, None)
        dense_loss = dense._fedharmony_alignment(dense_input, None)
        block_loss.backward()
        dense_loss.backward()
        assert blocks._fedharmony_running is not None and blocks._fedharmony_running[2] is not None
        torch.testing.assert_close(block_loss, dense_loss, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(block_input.grad, dense_input.grad, atol=1e-6, rtol=1e-4)
    # other blocks (a new teacher's) start their running moments afresh
    _, _, other_mask = _setup(num_labels=300, seed=1)
    blocks.fedharmony_set_teacher(teacher, other_mask)
    fresh = TinyMLP(num_labels=300, **kwargs)
    fresh.fedharmony_set_teacher(teacher, other_mask)
    torch.testing.assert_close(
        blocks._fedharmony_alignment(batches[0], None), fresh._fedharmony_alignment(batches[0], None)
    )
