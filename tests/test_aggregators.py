"""Aggregators: FedAvg against numpy, FedProx instructions, FedHarmony's teachers, masks, weights, switches, state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.models import TinyMLP, make_loader, make_trainer, multilabel_data
from torch import Tensor

from lightning_fedharmony import CorrelationStats, FedAvg, FedHarmony, FedProx, load_model_weights, model_weights
from lightning_fedharmony.aggregators import ClientUpdate, InconsistentClientUpdates, validate_updates
from lightning_fedharmony.functional import (
    aggregation_weights,
    block_mask,
    correlation_discrepancy,
    global_consensus,
    leave_one_out_consensus,
    leave_one_out_support,
    pair_validity,
    proximal_term,
    quality_from_discrepancy,
    spectral_label_blocks,
)

NUM_LABELS = 6


def _weights(seed: int) -> dict[str, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "layer.weight": torch.randn(3, 4, generator=generator),
        "layer.bias": torch.randn(3, generator=generator, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(seed, dtype=torch.long),
    }


def _stats(seed: int, num_samples: int = 200, invalid: tuple[int, ...] = (), sign: float = 1.0) -> CorrelationStats:
    """Predictions with two label blocks ({0, 1, 2} and {3, 4, 5}) whose strength and signs vary by client."""
    generator = torch.Generator().manual_seed(seed)
    first, second = torch.randn(2, num_samples, 1, generator=generator, dtype=torch.float64)
    logits = 0.6 * torch.randn(num_samples, NUM_LABELS, generator=generator, dtype=torch.float64)
    strength = 1.0 + 0.3 * seed
    logits[:, :3] += strength * first
    logits[:, 3:] += strength * second * torch.tensor([1.0, sign, 1.0], dtype=torch.float64)
    preds = torch.sigmoid(logits)
    target = (torch.rand(num_samples, NUM_LABELS, generator=generator, dtype=torch.float64) < preds).double()
    target[:, list(invalid)] = 0.0
    stats = CorrelationStats(NUM_LABELS)
    stats.update(preds, target)
    return stats


def _update(cid: str, num_samples: int, seed: int, **stats_kwargs: Any) -> ClientUpdate:
    return ClientUpdate(cid, _weights(seed), num_samples, _stats(seed, **stats_kwargs))


def _three_clients() -> list[ClientUpdate]:
    return [
        _update("a", 100, 1),
        _update("b", 300, 2, invalid=(5,), sign=-1.0),
        _update("c", 50, 3, invalid=(4, 5)),
    ]


def _client_arrays(updates: list[ClientUpdate]) -> tuple[Tensor, Tensor, Tensor]:
    corr = torch.stack([u.stats.compute().float() for u in updates if u.stats is not None])
    valid = torch.stack([u.stats.valid_labels() for u in updates if u.stats is not None])
    n = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
    return corr, valid, n


# ---------------------------------------------------------------------------------------------------- FedAvg / FedProx
def test_fedavg_equals_numpy_average() -> None:
    updates = [ClientUpdate(c, _weights(s), n) for c, s, n in (("a", 1, 10), ("b", 2, 30), ("c", 3, 60))]
    result = FedAvg().aggregate_round(1, updates)
    n = [10, 30, 60]
    for key in ("layer.weight", "layer.bias"):
        expected = np.average(np.stack([u.weights[key].numpy() for u in updates]), axis=0, weights=n)
        assert result.weights[key].dtype == updates[0].weights[key].dtype
        np.testing.assert_allclose(result.weights[key].numpy(), expected, rtol=1e-6, atol=1e-7)
    # integer buffers come from the client with the largest weight
    assert result.weights["bn.num_batches_tracked"] == 3
    assert result.client_weights == pytest.approx({"a": 0.1, "b": 0.3, "c": 0.6}, abs=1e-12)
    assert result.metrics == {}


def test_fedavg_instructions_are_the_global_weights() -> None:
    global_weights = _weights(0)
    instructions = FedAvg().configure_round(1, ["a", "b"], global_weights)
    assert set(instructions) == {"a", "b"}
    for inst in instructions.values():
        assert inst.weights.keys() == global_weights.keys() and inst.teacher is None and inst.mask is None
        assert inst.proximal_mu == 0.0 and inst.alignment_weight is None


def test_fedprox_sends_mu_and_the_client_mixin_uses_it() -> None:
    torch.manual_seed(0)
    global_weights = model_weights(TinyMLP(lr=0.05, optimizer="sgd"))
    instructions = FedProx(proximal_mu=0.5).configure_round(1, ["a"], global_weights)["a"]
    assert instructions.proximal_mu == 0.5 and instructions.teacher is None
    # what a client does with the instructions
    model = TinyMLP(lr=0.05, optimizer="sgd")
    load_model_weights(model, instructions.weights)
    model.fedharmony_configure(alignment_weight=instructions.alignment_weight, proximal_mu=instructions.proximal_mu)
    model.fedharmony_set_anchor()
    assert model.fedharmony_proximal_mu == 0.5
    x, y = multilabel_data(64, seed=1)
    make_trainer(max_epochs=1, limit_train_batches=4).fit(model, make_loader(x, y))
    prox = model.logged["train/fedharmony_prox_loss"]
    assert len(prox) == 4 and prox[0] == 0.0 and all(v > 0 for v in prox[1:])
    # the term is FedProx's, measured from the global weights
    logits = model(x)
    anchor = [global_weights[name] for name, _ in model.named_parameters()]
    expected = F.binary_cross_entropy_with_logits(logits, y) + proximal_term(list(model.parameters()), anchor, 0.5)
    torch.testing.assert_close(model.fedharmony_loss(logits, y), expected)


def test_fedprox_constructor_error() -> None:
    with pytest.raises(ValueError, match=r"Expected argument `proximal_mu` to be >= 0, but got -1\.0"):
        FedProx(proximal_mu=-1.0)


# ---------------------------------------------------------------------------------------------------- FedHarmony
def test_round_one_instructions_have_no_teacher() -> None:
    aggregator = FedHarmony(alignment_weight=2.0, t0=2, proximal_mu=0.01)
    instructions = aggregator.configure_round(1, ["a", "b"], _weights(0))
    for inst in instructions.values():
        assert inst.teacher is None and inst.mask is None and inst.alignment_weight is None
        assert inst.proximal_mu == 0.01
    assert aggregator.consensus is None
    with pytest.raises(RuntimeError, match="Expected client statistics from an earlier round, but the server has none"):
        aggregator.teacher("a")


def test_teachers_and_masks_after_a_round() -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(alignment_weight=2.0, t0=2)
    result = aggregator.aggregate_round(1, updates, _weights(0))
    corr, valid, n = _client_arrays(updates)
    assert valid.tolist() == [[True] * 6, [True] * 5 + [False], [True] * 4 + [False] * 2]
    teachers = leave_one_out_consensus(corr, n, valid)
    support = leave_one_out_support(n, valid, NUM_LABELS)
    expected_ids = spectral_label_blocks(global_consensus(corr, n, valid))
    assert aggregator.cluster_ids is not None and torch.equal(aggregator.cluster_ids, expected_ids)
    assert aggregator.cluster_ids.tolist() == [0, 0, 0, 1, 1, 1]  # the two planted blocks
    blocks = block_mask(aggregator.cluster_ids)
    for k, cid in enumerate("abc"):
        teacher, mask = aggregator.teacher(cid)
        assert teacher.dtype == torch.float32 and mask.dtype == torch.bool
        torch.testing.assert_close(teacher, teachers[k], rtol=0, atol=1e-6)
        assert torch.equal(mask, blocks & support[k] & pair_validity(valid[k]))
    # a's pair (4, 5) is supported by nobody else; c cannot use label 4 or 5 at all
    assert not aggregator.teacher("a")[1][4, 5] and aggregator.teacher("a")[1][3, 4]
    assert not aggregator.teacher("c")[1][:, 4:].any()
    torch.testing.assert_close(aggregator.consensus, global_consensus(corr, n, valid), rtol=0, atol=1e-6)
    # round 2 instructions carry them
    instructions = aggregator.configure_round(2, ["b", "new"], result.weights)
    assert instructions["b"].alignment_weight == 2.0
    assert instructions["b"].teacher is not None and torch.equal(instructions["b"].teacher, aggregator.teacher("b")[0])
    assert instructions["b"].mask is not None and torch.equal(instructions["b"].mask, aggregator.teacher("b")[1])
    assert instructions["b"].weights.keys() == result.weights.keys()
    assert result.metrics["num_blocks"] == 2.0
    assert set(result.metrics) == {
        "num_blocks",
        "balance_factor",
        "discrepancy_mean",
        "quality_min",
        "consensus_abs_mean",
    }


def test_unseen_client_gets_the_global_consensus() -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(t0=2)
    aggregator.aggregate_round(1, updates)
    corr, valid, n = _client_arrays(updates)
    teacher, mask = aggregator.teacher("never-seen")
    torch.testing.assert_close(teacher, global_consensus(corr, n, valid), rtol=0, atol=1e-6)
    assert aggregator.cluster_ids is not None
    assert torch.equal(mask, block_mask(aggregator.cluster_ids) & pair_validity(valid).any(0))


def _expected_client_weights(aggregator: FedHarmony, updates: list[ClientUpdate]) -> tuple[Tensor, Tensor]:
    corr, _, n = _client_arrays(updates)
    teachers, masks = zip(*(aggregator.teacher(u.client_id) for u in updates))
    quality = quality_from_discrepancy(correlation_discrepancy(corr, torch.stack(teachers), torch.stack(masks)))
    return n, quality


@pytest.mark.parametrize("server_round", [1, 2, 3])
def test_additive_weights(server_round: int) -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(t0=3)
    result = aggregator.aggregate_round(server_round, updates)
    n, quality = _expected_client_weights(aggregator, updates)
    assert len(set(quality.tolist())) == 3  # the qualities differ
    expected = aggregation_weights(n, quality, server_round, 3.0)
    assert list(result.client_weights.values()) == pytest.approx(expected.tolist(), abs=1e-7)
    assert result.metrics["balance_factor"] == pytest.approx(max(0.0, 1 - server_round / 3))
    if server_round == 3:  # quantity no longer counts
        assert list(result.client_weights.values()) == pytest.approx((quality / quality.sum()).tolist(), abs=1e-7)
    for key in ("layer.weight", "layer.bias"):
        stacked = np.stack([u.weights[key].numpy() for u in updates])
        average = np.average(stacked, axis=0, weights=list(result.client_weights.values()))
        np.testing.assert_allclose(result.weights[key].numpy(), average, rtol=1e-5, atol=1e-6)


def test_product_weights() -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(t0=2, quality_weighting="product")
    result = aggregator.aggregate_round(5, updates)
    n, quality = _expected_client_weights(aggregator, updates)
    expected = n * quality / (n * quality).sum()
    assert list(result.client_weights.values()) == pytest.approx(expected.tolist(), abs=1e-7)


def test_without_quality_aggregation_weights_are_sample_shares() -> None:
    updates = _three_clients()
    result = FedHarmony(quality_aggregation=False).aggregate_round(4, updates)  # needs no t0
    assert result.client_weights == pytest.approx({"a": 100 / 450, "b": 300 / 450, "c": 50 / 450}, abs=1e-12)
    assert result.metrics["balance_factor"] == 1.0


def test_without_alignment_no_teacher_is_sent() -> None:
    aggregator = FedHarmony.paper(alignment=False, t0=2)
    aggregator.aggregate_round(1, _three_clients())
    for inst in aggregator.configure_round(2, ["a", "b"], _weights(0)).values():
        assert inst.teacher is None and inst.mask is None and inst.alignment_weight is None


def test_without_blocks_every_pair_is_aligned() -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(block_alignment=False, t0=2)
    result = aggregator.aggregate_round(1, updates)
    assert aggregator.cluster_ids is not None and aggregator.cluster_ids.tolist() == [0] * NUM_LABELS
    assert result.metrics["num_blocks"] == 1.0
    _, valid, n = _client_arrays(updates)
    support = leave_one_out_support(n, valid, NUM_LABELS)
    off_diagonal = ~torch.eye(NUM_LABELS, dtype=torch.bool)
    for k, cid in enumerate("abc"):
        assert torch.equal(aggregator.teacher(cid)[1], off_diagonal & support[k] & pair_validity(valid[k]))
    # fixing G = 1 has the same effect; G = 2 finds the planted blocks
    single = FedHarmony.paper(num_blocks=1, t0=2)
    single.aggregate_round(1, updates)
    assert single.cluster_ids is not None and single.cluster_ids.tolist() == [0] * NUM_LABELS
    two = FedHarmony.paper(num_blocks=2, t0=2)
    two.aggregate_round(1, updates)
    assert two.cluster_ids is not None and two.cluster_ids.tolist() == [0, 0, 0, 1, 1, 1]


def test_t0_from_setup_or_error() -> None:
    updates = _three_clients()
    with pytest.raises(RuntimeError, match=r"Expected `t0` or the number of rounds.*HINT: pass `FedHarmony\(t0=...\)`"):
        FedHarmony(quality_aggregation=True).aggregate_round(1, updates)
    FedHarmony().aggregate_round(1, updates)  # sample-count weights need no schedule
    aggregator = FedHarmony(quality_aggregation=True)
    aggregator.setup(num_rounds=4)  # T0 = 2
    result = aggregator.aggregate_round(1, updates)
    assert result.metrics["balance_factor"] == pytest.approx(0.5)


@pytest.mark.parametrize("consensus_weighting", ["samples", "uniform", "previous_aggregation"])
def test_consensus_weighting(consensus_weighting: str) -> None:
    updates = _three_clients()
    aggregator = FedHarmony.paper(t0=2, consensus_weighting=consensus_weighting)  # type: ignore[arg-type]
    result = aggregator.aggregate_round(1, updates)
    corr, valid, n = _client_arrays(updates)
    if consensus_weighting == "samples":
        weights = n
    elif consensus_weighting == "uniform":
        weights = torch.ones(3, dtype=torch.float64)
    else:  # the teachers of the next round use this round's aggregation weights
        weights = torch.tensor(list(result.client_weights.values()), dtype=torch.float64)
    teachers = leave_one_out_consensus(corr, weights, valid)
    for k, cid in enumerate("abc"):
        torch.testing.assert_close(aggregator.teacher(cid)[0], teachers[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(aggregator.consensus, global_consensus(corr, weights, valid), rtol=0, atol=1e-6)


def test_consensus_weightings_differ() -> None:
    updates = _three_clients()
    teachers = {}
    for weighting in ("samples", "uniform"):
        aggregator = FedHarmony.paper(t0=2, consensus_weighting=weighting)  # type: ignore[arg-type]
        aggregator.aggregate_round(1, updates)
        teachers[weighting] = aggregator.teacher("a")[0]
    assert (teachers["samples"] - teachers["uniform"]).abs().max() > 1e-3


@pytest.mark.parametrize("stale_stats", ["keep", "drop"])
def test_stale_stats_with_partial_participation(stale_stats: str) -> None:
    first = [_update("a", 100, 1), _update("b", 200, 2, sign=-1.0), _update("c", 150, 3)]
    aggregator = FedHarmony.paper(t0=2, stale_stats=stale_stats)  # type: ignore[arg-type]
    aggregator.aggregate_round(1, first)
    second = [_update("a", 100, 4), _update("b", 200, 5, sign=-1.0)]  # c sits this round out
    aggregator.aggregate_round(2, second)
    if stale_stats == "keep":
        pool = [*second, first[2]]
        ids = ["a", "b", "c"]
    else:
        pool, ids = second, ["a", "b"]
    corr, valid, n = _client_arrays(pool)
    teachers = leave_one_out_consensus(corr, n, valid)
    for k, cid in enumerate(ids):
        torch.testing.assert_close(aggregator.teacher(cid)[0], teachers[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(aggregator.consensus, global_consensus(corr, n, valid), rtol=0, atol=1e-6)
    assert aggregator.state_dict()["client_ids"] == ids
    if stale_stats == "drop":  # c is unknown again: it gets the global consensus
        torch.testing.assert_close(aggregator.teacher("c")[0], global_consensus(corr, n, valid), rtol=0, atol=1e-6)


@pytest.mark.parametrize("consensus_weighting", ["samples", "previous_aggregation"])
def test_state_dict_round_trip_through_torch_save(tmp_path: Path, consensus_weighting: str) -> None:
    kwargs: dict[str, Any] = {"t0": 3, "consensus_weighting": consensus_weighting}
    aggregator = FedHarmony(**kwargs)
    aggregator.setup(6)
    aggregator.aggregate_round(1, _three_clients())
    aggregator.aggregate_round(2, [_update("a", 100, 4), _update("b", 300, 5, sign=-1.0)])
    path = tmp_path / "server.pt"
    torch.save(aggregator.state_dict(), path)
    restored = FedHarmony(**kwargs)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.num_rounds == 6
    assert restored.cluster_ids is not None and aggregator.cluster_ids is not None
    assert torch.equal(restored.cluster_ids, aggregator.cluster_ids)
    for cid in ("a", "b", "c", "unknown"):
        teacher, mask = aggregator.teacher(cid)
        restored_teacher, restored_mask = restored.teacher(cid)
        assert torch.equal(restored_teacher, teacher) and torch.equal(restored_mask, mask)
    # and both continue identically
    updates = [_update("a", 100, 6), _update("c", 50, 7, invalid=(4, 5))]
    assert aggregator.aggregate_round(3, updates).client_weights == restored.aggregate_round(3, updates).client_weights


def test_empty_state_dict_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "server.pt"
    torch.save(FedHarmony(t0=2).state_dict(), path)
    restored = FedHarmony(t0=2)
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.consensus is None and restored.cluster_ids is None
    assert restored.configure_round(1, ["a"], _weights(0))["a"].teacher is None


# ---------------------------------------------------------------------------------------------------- validation
def _bad(edit: str) -> tuple[list[ClientUpdate], str, str]:
    updates = [_update("a", 100, 1), _update("b", 200, 2)]
    b = updates[1]
    if edit == "names":
        b.weights["extra"] = b.weights.pop("layer.bias")
        return updates, "weights", r"parameter names differ: missing \['layer.bias'\], extra \['extra'\]"
    if edit == "shape":
        b.weights["layer.weight"] = torch.zeros(4, 3)
        return updates, "weights.layer.weight", r"expected shape \(3, 4\), but got \(4, 3\)"
    if edit == "dtype":
        b.weights["layer.bias"] = b.weights["layer.bias"].float()
        return updates, "weights.layer.bias", "expected dtype torch.float64, but got torch.float32"
    if edit == "nan":
        b.weights["layer.weight"][0, 0] = float("nan")
        return updates, "weights.layer.weight", "holds NaN or inf"
    if edit == "duplicate":
        updates[1] = _update("a", 200, 2)
        return updates, "client_id", "sent more than one update this round"
    if edit in ("zero", "negative", "float", "bool"):
        b.num_samples = {"zero": 0, "negative": -5, "float": 2.5, "bool": True}[edit]  # type: ignore[assignment]
        return updates, "num_samples", f"expected a positive int, but got {b.num_samples!r}"
    if edit == "labels":
        b.stats = CorrelationStats(4)
        return updates, "stats.num_labels", "expected 6 labels, but got 4"
    raise AssertionError(edit)


VALIDATION_EDITS = ["names", "shape", "dtype", "nan", "duplicate", "zero", "negative", "float", "bool", "labels"]


@pytest.mark.parametrize("aggregator", [FedAvg(), FedProx(), FedHarmony(t0=2)], ids=["fedavg", "fedprox", "fedharmony"])
@pytest.mark.parametrize("edit", VALIDATION_EDITS)
def test_inconsistent_updates(aggregator: Any, edit: str) -> None:
    updates, field, match = _bad(edit)
    with pytest.raises(InconsistentClientUpdates, match=rf"^Client '\w+', field `{field}`: {match}") as info:
        aggregator.aggregate_round(1, updates)
    client = "a" if edit == "duplicate" else "b"
    assert info.value.client_id == client and info.value.field == field
    assert isinstance(info.value, ValueError)


def test_updates_checked_against_the_global_weights() -> None:
    reference = _weights(0)
    reference["layer.weight"] = torch.zeros(3, 5)
    with pytest.raises(
        InconsistentClientUpdates, match=r"^Client 'a', field `weights.layer.weight`: expected shape \(3, 5\)"
    ):
        FedAvg().aggregate_round(1, [_update("a", 10, 1)], reference)


def test_fedharmony_needs_stats() -> None:
    updates = [_update("a", 100, 1), ClientUpdate("b", _weights(2), 200)]
    match = r"^Client 'b', field `stats`: FedHarmony needs each client's correlation statistics.*HINT: train the client"
    with pytest.raises(InconsistentClientUpdates, match=match):
        FedHarmony(t0=2).aggregate_round(1, updates)
    FedAvg().aggregate_round(1, updates)  # FedAvg does not need them


def test_fedharmony_label_count_must_not_change_across_rounds() -> None:
    aggregator = FedHarmony(t0=2)
    aggregator.aggregate_round(1, _three_clients())
    odd = ClientUpdate("d", _weights(4), 10, CorrelationStats(4))
    with pytest.raises(
        InconsistentClientUpdates, match=r"^Client 'd', field `stats.num_labels`: expected 6 labels, but got 4"
    ):
        aggregator.aggregate_round(2, [odd])


def test_no_updates_and_bad_rounds() -> None:
    with pytest.raises(ValueError, match="Expected at least one client update to aggregate, but got none"):
        validate_updates([])
    with pytest.raises(ValueError, match="Expected at least one client update to aggregate, but got none"):
        FedAvg().aggregate_round(1, [])
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ValueError, match=rf"Expected argument `server_round` to be an int >= 1, but got {bad!r}"):
            FedAvg().configure_round(bad, ["a"], _weights(0))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=rf"Expected argument `server_round` to be an int >= 1, but got {bad!r}"):
            FedHarmony(t0=2).aggregate_round(bad, _three_clients())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"alignment_weight": -1.0}, "Expected argument `alignment_weight` to be >= 0, but got -1.0"),
        ({"num_blocks": 0}, "Expected argument `num_blocks` to be 'auto', 'eigengap' or an int >= 1, but got 0"),
        ({"num_blocks": "many"}, "`num_blocks` to be 'auto', 'eigengap' or an int >= 1, but got 'many'"),
        ({"gamma": -1.0}, "Expected argument `gamma` to be 'auto' or a float >= 0, but got -1.0"),
        ({"gamma": "median"}, "`gamma` to be 'auto' or a float >= 0, but got 'median'"),
        ({"t0": 0}, "Expected argument `t0` to be None or > 0, but got 0"),
        ({"proximal_mu": -0.1}, "Expected argument `proximal_mu` to be >= 0, but got -0.1"),
        ({"quality_weighting": "max"}, r"`quality_weighting` to be one of \('additive', 'product'\), but got 'max'"),
        (
            {"consensus_weighting": "size"},
            r"`consensus_weighting` to be one of \('samples', 'uniform', 'previous_aggregation'\), but got 'size'",
        ),
        ({"stale_stats": "forget"}, r"`stale_stats` to be one of \('keep', 'drop'\), but got 'forget'"),
        ({"corr_normalization": "cosine"}, r"to be one of \('bernoulli', 'pearson'\), but got 'cosine'"),
    ],
)
def test_fedharmony_constructor_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FedHarmony(**kwargs)
