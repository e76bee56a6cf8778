"""Each client seen round by round: per-client history, its validation split, named label pairs, pictures, summary."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from helpers.models import NUM_LABELS, TinyMLP, make_loader, multilabel_data, paired_label_data

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.data.federated import load_federated_data
from lightning_fedharmony.experiment import disagreement_lines
from lightning_fedharmony.metrics import REPORT_KEYS, evaluate_multilabel
from lightning_fedharmony.orchestrator import (
    Federation,
    FederationResult,
    RoundRecord,
    client_val_loader,
    evaluate_weights,
    label_name,
)

NAMES = [f"tag{i}" for i in range(NUM_LABELS)]


def drifting_clients(val_fraction: float = 0.25) -> list[ClientDataModule]:
    """Three clients, the last with anti-correlated label pairs: a clear disagreement for FedHarmony to report."""
    clients = []
    for k, (n, anti) in enumerate(((48, False), (40, False), (44, True))):
        x, y = paired_label_data(n, anti=anti, seed=20 + k)
        y = torch.cat([y, (x[:, -1:] > 0).float()], 1)  # a fifth label, so the model's L matches NUM_LABELS
        clients.append(ClientDataModule(x, y, batch_size=16, val_fraction=val_fraction, seed=k))
    return clients


def run(aggregator=None, clients=None, **kwargs) -> Federation:
    torch.manual_seed(0)
    kwargs.setdefault("num_rounds", 2)
    fed = Federation(
        TinyMLP(alignment_weight=0.0),
        clients if clients is not None else drifting_clients(),
        aggregator if aggregator is not None else FedHarmony(),
        verbose=False,
        **kwargs,
    )
    fed.fit()
    return fed


@pytest.fixture(scope="module")
def harmony() -> Federation:
    return run(label_names=NAMES)


# ---------------------------------------------------------------------------- the record
def test_round_records_hold_every_contributing_client(harmony):
    for record in harmony.result.rounds:
        assert set(record.client_metrics) == {"0", "1", "2"}
        for cid, values in record.client_metrics.items():
            own = {f"val_{key}" for key in REPORT_KEYS} | {"val_num_samples"}
            assert set(values) == {"num_samples", "weight", "discrepancy", "sampling_discrepancy", "quality"} | own
            assert values["weight"] == record.client_weights[cid]
            assert values["num_samples"] == harmony.clients[cid].num_samples
            assert 0 < values["quality"] <= 1 and values["discrepancy"] >= 0 and values["sampling_discrepancy"] >= 0
            assert 0 < values["val_map"] <= 1
    sizes = [harmony.result.final.client_metrics[c]["num_samples"] for c in "012"]
    assert sizes == [36, 30, 33]  # 75% of 48, 40, 44 train; the rest is each client's validation split


def test_client_map_is_the_global_model_on_the_clients_val_loader(harmony):
    model = TinyMLP(alignment_weight=0.0)
    for cid, dm in harmony.clients.items():
        by_hand = evaluate_weights(model, harmony.global_weights, dm.val_dataloader())["map"]
        assert harmony.result.final.client_metrics[cid]["val_map"] == pytest.approx(by_hand, abs=1e-7)


def test_pairs_are_named_and_ordered_by_gap(harmony):
    pairs = harmony.result.final.client_pairs
    assert set(pairs) == {"0", "1", "2"}
    for listed in pairs.values():
        assert 1 <= len(listed) <= 5
        for a, b, client_corr, teacher_corr in listed:
            assert a in NAMES and b in NAMES and a != b
            assert -1 <= client_corr <= 1 and -1 <= teacher_corr <= 1
        gaps = [abs(c - t) for _, _, c, t in listed]
        assert gaps == sorted(gaps, reverse=True)
    # the anti-correlated client departs most on the pairs it flipped
    assert {pairs["2"][0][:2]} <= {("tag0", "tag1"), ("tag2", "tag3")}


def test_pairs_fall_back_to_label_index_names():
    fed = run(num_rounds=1)
    names = {name for pairs in fed.result.final.client_pairs.values() for a, b, *_ in pairs for name in (a, b)}
    assert names and all(name.startswith("label_") for name in names)
    assert label_name(3) == "label_3" and label_name(1, ["x", "y"]) == "y"


def test_fedavg_records_size_weight_and_the_clients_own_metrics_only():
    fed = run(FedAvg(), num_rounds=1)
    values = fed.result.final.client_metrics["1"]
    assert set(values) == {"num_samples", "weight"} | {f"val_{key}" for key in REPORT_KEYS} | {"val_num_samples"}
    assert fed.result.final.client_pairs == {}


def test_without_client_validation_there_is_no_client_map():
    fed = run(FedAvg(), clients=drifting_clients(val_fraction=0.0), num_rounds=1)
    assert all("val_map" not in v for v in fed.result.final.client_metrics.values())
    assert client_val_loader(fed.clients["0"]) is None


def test_clients_are_scored_on_evaluated_rounds_only():
    fed = run(FedAvg(), num_rounds=3, eval_every=2)
    has_map = [all("val_map" in v for v in r.client_metrics.values()) for r in fed.result.rounds]
    assert has_map == [False, True, True]


def test_label_names_are_checked():
    with pytest.raises(TypeError, match=r"Expected argument `label_names` to be None or a sequence of str"):
        Federation(TinyMLP(), drifting_clients(), FedAvg(), label_names="abc")
    with pytest.raises(ValueError, match=r"Expected argument `label_names` to name every label of the model"):
        run(label_names=["only", "two"], num_rounds=1)


# ---------------------------------------------------------------------------- JSON, CSV, checkpoints
def test_history_json_round_trip_keeps_client_fields(harmony, tmp_path):
    harmony.result.to_json(tmp_path / "history.json")
    loaded = FederationResult.from_json(tmp_path / "history.json")
    assert loaded.rounds == harmony.result.rounds
    assert isinstance(loaded.final.client_pairs["2"][0], tuple)


def test_old_history_json_without_client_fields_still_loads(harmony, tmp_path):
    data = harmony.result.to_dict()
    for r in data["rounds"]:
        del r["client_metrics"], r["client_pairs"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    loaded = FederationResult.from_json(tmp_path / "old.json")
    assert [r.client_metrics for r in loaded.rounds] == [{}, {}]
    assert loaded.final.client_weights == harmony.result.final.client_weights


def test_nan_client_value_survives_strict_json(tmp_path):
    record = RoundRecord(
        1, ["0"], {}, {"0": 1.0}, 0.5, {}, {}, {"total": 1.0}, client_metrics={"0": {"val_map": math.nan}}
    )
    FederationResult([record]).to_json(tmp_path / "h.json")
    assert "NaN" not in (tmp_path / "h.json").read_text()
    assert math.isnan(FederationResult.from_json(tmp_path / "h.json").final.client_metrics["0"]["val_map"])


def test_checkpoint_with_old_history_resumes(tmp_path):
    torch.manual_seed(0)
    fed = Federation(TinyMLP(), drifting_clients(), FedAvg(), 2, checkpoint_dir=tmp_path, verbose=False)
    fed.aggregator.setup(2)
    fed.run_round(1)  # a checkpoint after round 1 of 2
    state = torch.load(fed.checkpoint_path, weights_only=True)
    state["history"] = fed.result.to_dict()  # a whole history, as checkpoints held before the per-client log
    for r in state["history"]["rounds"]:
        del r["client_metrics"], r["client_pairs"]
    torch.save(state, fed.checkpoint_path)
    resumed = run(FedAvg(), num_rounds=2, checkpoint_dir=tmp_path)
    assert resumed.result.rounds[0].client_metrics == {}
    assert set(resumed.result.rounds[1].client_metrics) == {"0", "1", "2"}


def test_clients_csv_is_long_format(harmony, tmp_path):
    harmony.result.clients_to_csv(tmp_path / "clients.csv")
    with open(tmp_path / "clients.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 3
    assert list(rows[0])[:10] == [
        "round",
        "client",
        "num_samples",
        "weight",
        "discrepancy",
        "sampling_discrepancy",
        "excess_discrepancy",
        "quality",
        "val_map",
        "top_pairs",
    ]
    assert [(r["round"], r["client"]) for r in rows] == [(str(t), c) for t in (1, 2) for c in "012"]
    last = rows[-1]
    values = harmony.result.final.client_metrics["2"]
    assert int(last["num_samples"]) == 33
    assert float(last["excess_discrepancy"]) == pytest.approx(values["discrepancy"] - values["sampling_discrepancy"])
    a, b, rk, rt = harmony.result.final.client_pairs["2"][0]
    assert last["top_pairs"].startswith(f"{a}/{b} {rk:.4f} vs {rt:.4f}")


def test_clients_csv_of_fedavg_has_no_empty_score_columns(tmp_path):
    fed = run(FedAvg(), num_rounds=1)
    fed.result.clients_to_csv(tmp_path / "clients.csv")
    header = (tmp_path / "clients.csv").read_text().splitlines()[0]
    own = ",".join(f"val_{key}" for key in (*REPORT_KEYS, "num_samples"))
    assert header == f"round,client,num_samples,weight,{own}"


# ---------------------------------------------------------------------------- the client validation split
def test_federated_data_client_split_checks_its_fraction():
    with pytest.raises(ValueError, match=r"`client_val_fraction` to be a float in \[0, 1\), but got 1.5"):
        load_federated_data("river:yeast", client_val_fraction=1.5)


def test_federated_data_client_split_on_river_yeast():
    pytest.importorskip("river")
    off = load_federated_data("river:yeast", num_clients=4, partition="iid")
    assert off.client_val_fraction == 0.0
    assert all(dm.num_val_samples == 0 for dm in off.clients().values())
    on = load_federated_data("river:yeast", num_clients=4, partition="iid", client_val_fraction=0.2)
    modules = on.clients(seed=1)
    for k, dm in modules.items():
        total = len(on.partition.client_indices[int(k)])
        assert dm.num_val_samples == round(0.2 * total) and dm.num_samples == total - dm.num_val_samples
    again = on.clients(seed=1)
    assert torch.equal(modules["2"].val_dataset.tensors[1], again["2"].val_dataset.tensors[1])
    assert on.client(2, seed=1).num_val_samples == modules["2"].num_val_samples
    with pytest.raises(
        ValueError, match=r"`client_val_fraction` to leave at least one sample .* client of \d+ samples"
    ):
        load_federated_data("river:yeast", num_clients=4, partition="iid", client_val_fraction=0.0001)


def test_masked_client_validation_ignores_unobserved_labels():
    x, y = multilabel_data(40, seed=1)
    observed = torch.tensor([True, True, False, True, False])
    dm = ClientDataModule(x, y, observed=observed, val_fraction=0.5, seed=0)
    model = TinyMLP()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    loader = client_val_loader(dm)
    assert loader is not None
    report = evaluate_weights(model, weights, loader)
    xv, yv, mask = dm.val_dataset.tensors
    with torch.no_grad():
        preds = torch.sigmoid(model(xv))
    assert report == pytest.approx(evaluate_multilabel(preds, yv, mask))
    # without the mask the zeros of unobserved labels would count as negatives
    assert report["hamming_loss"] != pytest.approx(
        evaluate_weights(model, weights, make_loader(xv, yv))["hamming_loss"]
    )


# ---------------------------------------------------------------------------- summary and pictures
def test_disagreement_lines_name_the_most_disagreeing_client(harmony):
    lines = disagreement_lines("fedharmony", harmony.result)
    final = harmony.result.final.client_metrics
    excess = {c: v["discrepancy"] - v["sampling_discrepancy"] for c, v in final.items()}
    top = max(excess, key=lambda c: excess[c])
    assert lines[0] == "fedharmony, round 2: clients that disagree most with their teachers"
    assert lines[1].startswith(f"  client {top} disagrees most: s={final[top]['discrepancy']:.3g}")
    assert f"(sampling {final[top]['sampling_discrepancy']:.3g}), weight {final[top]['weight']:.3g}" in lines[1]
    a, b, rk, rt = harmony.result.final.client_pairs[top][0]
    assert f"pairs: ({a}, {b}) {rk:.2f} vs teacher {rt:.2f}" in lines[1]
    assert 2 <= len(lines) <= 4


def test_disagreement_lines_without_scores_or_beyond_noise():
    assert disagreement_lines("fedavg", run(FedAvg(), num_rounds=1).result) == []
    assert disagreement_lines("x", FederationResult()) == []
    scores = {"0": {"discrepancy": 0.01, "sampling_discrepancy": 0.02, "weight": 0.5, "num_samples": 10.0}}
    record = RoundRecord(3, ["0"], {}, {"0": 1.0}, 0.5, {}, {}, {"total": 1.0}, client_metrics=scores)
    lines = disagreement_lines("fh", FederationResult([record]))
    assert lines == [
        "fh, round 3: clients that disagree most with their teachers",
        "  no client beyond its sampling baseline; closest: client 0, s=0.01 (sampling 0.02)",
    ]


def _synthetic_result(num_clients: int, num_rounds: int, fraction: float = 1.0) -> FederationResult:
    rng = np.random.default_rng(0)
    rounds = []
    for t in range(1, num_rounds + 1):
        chosen = [str(k) for k in range(num_clients) if rng.random() < fraction]
        metrics = {
            cid: {
                "num_samples": 10.0,
                "weight": 1.0 / len(chosen),
                "discrepancy": float(rng.random() * 0.02),
                "sampling_discrepancy": 0.01,
                "quality": 0.9,
                "val_map": float(0.3 + 0.01 * t + rng.random() * 0.05),
            }
            for cid in chosen
        }
        rounds.append(RoundRecord(t, chosen, {}, {}, 0.5, {}, {}, {"total": 1.0}, client_metrics=metrics))
    return FederationResult(rounds)


@pytest.mark.parametrize(("num_clients", "fraction"), [(3, 1.0), (100, 0.3)])
def test_client_pictures_are_written(tmp_path, num_clients, fraction):
    plots = pytest.importorskip("lightning_fedharmony.plots")
    result = _synthetic_result(num_clients, 6, fraction)
    for path in (
        plots.plot_client_heatmap(result, tmp_path / "heat.png", title="fh"),
        plots.plot_client_heatmap(result, tmp_path / "raw.png", value="discrepancy"),
        plots.plot_client_curves(result, "val_map", tmp_path / "curves.png", title="fh"),
    ):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_write_outputs_draws_client_pictures(harmony, tmp_path):
    pytest.importorskip("matplotlib")
    from lightning_fedharmony.experiment import write_pictures

    written = write_pictures(tmp_path, {"fh": harmony, "avg": run(FedAvg(), num_rounds=1)})
    names = sorted(p.rsplit("/", 1)[-1] for p in written)
    assert "clients_discrepancy_fh.png" in names and "clients_map_fh.png" in names
    assert "clients_map_avg.png" in names and "clients_discrepancy_avg.png" not in names


def test_record_as_dict_has_the_new_fields(harmony):
    data = asdict(harmony.result.final)
    assert {"client_metrics", "client_pairs"} <= set(data)
