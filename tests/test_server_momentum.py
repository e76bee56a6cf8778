"""Server momentum (FedAvgM): the step against hand-computed numbers, the agreement scaling, every aggregator's
paths, checkpoints and argument checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.models import multilabel_data
from helpers.resume import assert_same_weights, run_interrupted

from lightning_fedharmony import CorrelationStats, FedAvg, FedHarmony, FedProx
from lightning_fedharmony.aggregators import ClientUpdate
from lightning_fedharmony.client_terms import ConsensusMemory
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.functional import server_momentum_step
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation


def _w(*values: float) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=torch.float64), "count": torch.tensor(7)}


def test_step_matches_hand_computation_and_reports_the_factor() -> None:
    # round 1: no momentum yet, the average itself; factor 0
    weights, momentum, kept = server_momentum_step(_w(0.0, 0.0), _w(1.0, 3.0), None, 0.5)
    assert weights["w"].tolist() == [1.0, 3.0] and kept == 0.0
    assert torch.equal(momentum["w"], torch.tensor([1.0, 3.0], dtype=torch.float64))
    # round 2: update (1, -1) against momentum (1, 3): cos = -2 / (sqrt(2) sqrt(10)) < 0, momentum dropped
    weights, momentum, kept = server_momentum_step(weights, _w(2.0, 2.0), momentum, 0.5)
    assert kept == 0.0 and weights["w"].tolist() == [2.0, 2.0]
    weights, momentum, kept = server_momentum_step(weights, _w(3.0, 1.0), momentum, 0.5)
    assert kept == pytest.approx(0.5)  # update (1, -1) equals the momentum (1, -1): cos = 1
    assert weights["w"].tolist() == pytest.approx([3.5, 0.5])  # w + (1, -1) + 0.5 (1, -1)
    # entries that are not floating point come from the average untouched
    assert weights["count"].item() == 7


def test_partial_agreement_scales_the_momentum_by_the_cosine() -> None:
    momentum = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    weights, new, kept = server_momentum_step(_w(0.0, 0.0), _w(1.0, 1.0), momentum, 0.8)
    assert kept == pytest.approx(0.8 * 2**-0.5)
    assert new["w"].tolist() == pytest.approx([1.0 + kept, 1.0])
    assert weights["w"].tolist() == pytest.approx([1.0 + kept, 1.0])  # from a zero global model
    fixed, _, kept_fixed = server_momentum_step(_w(0.0, 0.0), _w(1.0, 1.0), momentum, 0.8, adaptive=False)
    assert kept_fixed == 0.8 and fixed["w"].tolist() == pytest.approx([1.8, 1.0])


def test_zero_momentum_returns_the_average_and_keeps_dtypes() -> None:
    averaged = {"w": torch.tensor([1.0, 2.0], dtype=torch.float16)}
    weights, momentum, kept = server_momentum_step({"w": torch.zeros(2, dtype=torch.float16)}, averaged, None, 0.0)
    assert weights["w"] is averaged["w"] and momentum == {} and kept == 0.0
    weights, momentum, _ = server_momentum_step({"w": torch.zeros(2, dtype=torch.float16)}, averaged, None, 0.3)
    assert weights["w"].dtype == torch.float16 and momentum["w"].dtype == torch.float64


@pytest.mark.parametrize("beta", [-0.1, 1.0, True, "0.5"])
def test_step_rejects_bad_beta(beta: object) -> None:
    with pytest.raises(ValueError, match=r"`beta` to be a float in \[0, 1\)"):
        server_momentum_step(_w(0.0), _w(1.0), None, beta)  # type: ignore[arg-type]


def test_step_names_a_missing_or_misshapen_global_entry() -> None:
    with pytest.raises(ValueError, match="entry 'w' of shape \\(2,\\), but got no such entry"):
        server_momentum_step({}, _w(1.0, 2.0), None, 0.5)
    with pytest.raises(ValueError, match="entry 'w' of shape \\(2,\\), but got \\(3,\\)"):
        server_momentum_step(_w(0.0, 0.0, 0.0), _w(1.0, 2.0), None, 0.5)


@pytest.mark.parametrize("cls", [FedAvg, FedProx, FedHarmony])
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"server_momentum": 1.0}, ValueError, r"`server_momentum` to be a float in \[0, 1\), but got 1.0"),
        ({"server_momentum": -0.5}, ValueError, r"`server_momentum` to be a float in \[0, 1\), but got -0.5"),
        ({"server_momentum": True}, ValueError, r"`server_momentum` to be a float in \[0, 1\), but got True"),
        ({"server_momentum_adaptive": "yes"}, TypeError, r"`server_momentum_adaptive` to be a bool, but got 'yes'"),
    ],
)
def test_constructors_reject_bad_settings(cls: type, kwargs: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cls(**kwargs)


def _stats(seed: int, samples: int) -> CorrelationStats:
    generator = torch.Generator().manual_seed(seed)
    preds = torch.rand(samples, 4, generator=generator, dtype=torch.float64)
    stats = CorrelationStats(4)
    stats.update(preds, (torch.rand(samples, 4, generator=generator, dtype=torch.float64) < preds).double())
    return stats


def _model_weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + seed)
    return {"layer.weight": torch.randn(4, 3, generator=generator), "layer.bias": torch.randn(4, generator=generator)}


SAMPLES = {"a": 40, "b": 25, "c": 60}


def _round_updates(aggregator, server_round: int, global_weights: dict, memories: dict) -> list[ClientUpdate]:
    """Three clients' updates of one round: each moves the model part of the way towards its own target, plus noise;
    with ``leave_one_out="client"`` completed by its consensus memory."""
    sent = aggregator.configure_round(server_round, list(SAMPLES), global_weights)
    updates = []
    for i, cid in enumerate(SAMPLES):
        stats = _stats(10 * server_round + i, SAMPLES[cid])
        target, noise = _model_weights(i + 1), _model_weights(50 + 10 * server_round + i)
        moved = {k: v + 0.3 * (target[k] - v) + 0.05 * noise[k] for k, v in global_weights.items()}
        update = ClientUpdate(cid, moved, SAMPLES[cid], stats)
        if getattr(aggregator, "leave_one_out", "server") == "client":
            memories[cid].resolve(sent[cid], cid)
            update = memories[cid].complete(
                update, stats, server_round, eps=aggregator.corr_eps, normalization=aggregator.corr_normalization
            )
        updates.append(update)
    return updates


def _rounds(aggregator, num_rounds: int = 4) -> list[dict[str, torch.Tensor]]:
    """Each round's global weights (and the reported momentum factor, -1 when none) over a few rounds."""
    memories = {cid: ConsensusMemory() for cid in SAMPLES}
    global_weights = _model_weights(0)
    out = []
    for server_round in range(1, num_rounds + 1):
        updates = _round_updates(aggregator, server_round, global_weights, memories)
        result = aggregator.aggregate_round(server_round, updates, global_weights)
        global_weights = result.weights
        out.append({**global_weights, "_factor": torch.tensor(result.metrics.get("server_momentum", -1.0))})
    return out


@pytest.mark.parametrize(
    "make",
    [
        lambda m: FedAvg(server_momentum=m),
        lambda m: FedProx(server_momentum=m),
        lambda m: FedHarmony(server_momentum=m),
        lambda m: FedHarmony(server_momentum=m, leave_one_out="client", gamma=3.0),
    ],
    ids=["fedavg", "fedprox", "fedharmony", "fedharmony-client-side"],
)
def test_aggregators_apply_the_step_to_their_plain_average(make) -> None:
    with_momentum = _rounds(make(0.6))
    # the same rounds replayed: a momentum-free twin averages the same updates, the step is applied by hand
    reference, memories = make(0.0), {cid: ConsensusMemory() for cid in SAMPLES}
    global_weights, momentum = _model_weights(0), None
    for server_round, got in enumerate(with_momentum, start=1):
        updates = _round_updates(reference, server_round, global_weights, memories)
        averaged = reference.aggregate_round(server_round, updates, global_weights)
        assert "server_momentum" not in averaged.metrics
        expected, momentum, kept = server_momentum_step(global_weights, averaged.weights, momentum, 0.6)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=f"round {server_round} {key}")
        assert got["_factor"].item() == pytest.approx(kept)
        global_weights = expected
    assert any(r["_factor"].item() > 0 for r in with_momentum[1:])


def test_momentum_needs_the_global_weights() -> None:
    updates = [ClientUpdate("a", _model_weights(1), 10, _stats(1, 10))]
    for aggregator in (FedAvg(server_momentum=0.5), FedHarmony(server_momentum=0.5, leave_one_out="client", gamma=3)):
        with pytest.raises(ValueError, match=r"`global_weights` to be .* with `server_momentum=0.5`\), but got None"):
            aggregator.aggregate_round(1, updates)
    assert FedAvg().aggregate_round(1, updates).weights.keys() == updates[0].weights.keys()


@pytest.mark.parametrize("make", [lambda: FedAvg(server_momentum=0.5), lambda: FedHarmony(server_momentum=0.5)])
def test_state_dict_carries_the_momentum(make) -> None:
    first = make()
    _rounds(first, num_rounds=2)
    state = first.state_dict()
    assert set(state["server_momentum_buffer"]) == {"layer.weight", "layer.bias"}
    fresh = make()
    assert "server_momentum_buffer" not in fresh.state_dict()
    fresh.load_state_dict(state)
    for key, value in state["server_momentum_buffer"].items():
        assert torch.equal(fresh.state_dict()["server_momentum_buffer"][key], value)


def _clients() -> list[ClientDataModule]:
    x, y = multilabel_data(180, 6, 4)
    return [ClientDataModule(x[i::3], y[i::3], batch_size=32) for i in range(3)]


def _model() -> MultilabelMLP:
    torch.manual_seed(0)
    return MultilabelMLP(6, 4, hidden=(8,))


@pytest.mark.parametrize(
    "aggregator",
    [
        lambda: FedHarmony(server_momentum=0.5),
        lambda: FedHarmony(server_momentum=0.5, leave_one_out="client"),
        lambda: FedAvg(server_momentum=0.5),
        lambda: FedProx(server_momentum=0.5),
    ],
    ids=["fedharmony", "fedharmony-client-side", "fedavg", "fedprox"],
)
def test_resume_with_momentum_matches_the_uninterrupted_run(tmp_path: Path, aggregator) -> None:
    def make(**kwargs: object) -> Federation:
        return Federation(_model(), _clients(), aggregator(), 3, verbose=False, **kwargs)  # type: ignore[arg-type]

    full, second = run_interrupted(make, tmp_path, 2)
    assert all(0 <= r.server_metrics["server_momentum"] < 0.5 + 1e-12 for r in full.result.rounds)
    assert [r.server_round for r in second.result.rounds] == [1, 2, 3]
    assert_same_weights(full.global_weights, second.global_weights)
    plain = aggregator()
    plain.server_momentum = 0.0
    without = Federation(_model(), _clients(), plain, 3, verbose=False)
    without.fit()
    assert not torch.equal(without.global_weights["net.0.weight"], full.global_weights["net.0.weight"])


def test_a_new_run_starts_without_the_last_runs_momentum() -> None:
    aggregator = FedAvg(server_momentum=0.5)
    first = _rounds(aggregator)
    assert aggregator.state_dict()["server_momentum_buffer"]
    again = _rounds(aggregator)  # the same aggregator, from round 1 again
    for a, b in zip(first, again):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_run_config_builds_an_aggregator_with_momentum() -> None:
    from lightning_fedharmony.aggregators import Aggregator
    from lightning_fedharmony.config import instantiate, load_config

    cfg = load_config(overrides=["methods.fedharmony.init_args.server_momentum=0.5"])
    aggregator = instantiate(cfg.methods.fedharmony, Aggregator, "methods.fedharmony")
    assert isinstance(aggregator, FedHarmony) and aggregator.server_momentum == 0.5
    assert aggregator.server_momentum_adaptive is True
