"""The federation loop: Lightning Trainers as clients, selection, aggregation, failures, history."""

from __future__ import annotations

import copy
import csv
import io
import logging
import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers.models import NUM_FEATURES, NUM_LABELS, PlainMLP, TinyMLP, make_loader, multilabel_data
from torch.utils.data import DataLoader

from lightning_fedharmony import FedAvg, FedHarmony, model_weights
from lightning_fedharmony.aggregators.base import AggregationResult, ClientUpdate
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.orchestrator import (
    CLIENT_TRAINER_DEFAULTS,
    Federation,
    FederationError,
    FederationResult,
    RoundRecord,
    derive_seed,
    quiet_lightning,
)

SIZES = (24, 40, 32)


def tiny_clients(sizes: tuple[int, ...] = SIZES, batch_size: int = 16) -> list[ClientDataModule]:
    """Clients with different sample counts (so FedAvg's weights are not uniform) and the same concept."""
    clients = []
    for k, n in enumerate(sizes):
        x, y = multilabel_data(n, seed=10 + k)
        clients.append(ClientDataModule(x, y, batch_size=batch_size))
    return clients


def tiny_model(seed: int = 0) -> TinyMLP:
    torch.manual_seed(seed)
    return TinyMLP()


def eval_loader() -> DataLoader:
    x, y = multilabel_data(48, seed=99)
    return make_loader(x, y, batch_size=32)


def federation(model: pl.LightningModule | None = None, clients=None, aggregator=None, **kwargs) -> Federation:
    kwargs.setdefault("num_rounds", 2)
    kwargs.setdefault("verbose", False)
    return Federation(
        model if model is not None else tiny_model(),
        clients if clients is not None else tiny_clients(),
        aggregator if aggregator is not None else FedAvg(),
        **kwargs,
    )


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps the updates it aggregated, per round."""

    def __init__(self) -> None:
        self.seen: dict[int, list[ClientUpdate]] = {}

    def aggregate_round(self, server_round, updates, global_weights=None) -> AggregationResult:  # type: ignore[override]
        self.seen[server_round] = list(updates)
        return super().aggregate_round(server_round, updates, global_weights)


class RaisingDataModule(pl.LightningDataModule):
    """A client whose data cannot be loaded from call ``fail_from`` (counted from 1) on."""

    def __init__(self, inner: ClientDataModule, fail_from: int = 1) -> None:
        super().__init__()
        self.inner = inner
        self.fail_from = fail_from
        self.calls = 0

    def train_dataloader(self) -> DataLoader:
        self.calls += 1
        if self.calls >= self.fail_from:
            raise RuntimeError("disk on fire")
        return self.inner.train_dataloader()


def nan_client(n: int = 24) -> ClientDataModule:
    x, y = multilabel_data(n, seed=5)
    x[0, 0] = float("nan")
    return ClientDataModule(x, y, batch_size=16)


# ---------------------------------------------------------------------------- history and aggregation
def test_fit_history_fields():
    fed = federation(eval_dataloader=eval_loader(), num_rounds=2)
    result = fed.fit()
    assert [r.server_round for r in result.rounds] == [1, 2]
    for record in result.rounds:
        assert record.clients == ["0", "1", "2"]
        assert record.failures == {}
        assert set(record.client_weights) == {"0", "1", "2"}
        assert sum(record.client_weights.values()) == pytest.approx(1.0)
        assert math.isfinite(record.train_loss) and record.train_loss > 0
        assert {"map", "micro_f1", "macro_f1", "hamming_loss", "correlation_drift"} <= set(record.metrics)
        assert 0.0 <= record.metrics["map"] <= 1.0
    assert result.final is result.rounds[-1]
    # FedAvg weights by sample count
    n = np.array(SIZES, dtype=float)
    assert [result.final.client_weights[k] for k in "012"] == pytest.approx(list(n / n.sum()))


def test_fedavg_round_equals_np_average_of_the_clients_trained_weights():
    model = tiny_model()
    initial = model_weights(model)
    clients = tiny_clients()
    aggregator = RecordingFedAvg()
    fed = federation(copy.deepcopy(model), clients, aggregator, num_rounds=1, seed=3)
    fed.fit()

    # the same local training by hand: start from the global weights, seed as documented, fit a fresh Trainer
    by_hand = []
    for k, dm in enumerate(clients):
        local = copy.deepcopy(model)
        torch.manual_seed(derive_seed(3, 1, k))
        with quiet_lightning():
            trainer = pl.Trainer(**{**CLIENT_TRAINER_DEFAULTS, "max_epochs": 1})
            trainer.fit(local, datamodule=dm)
        by_hand.append(model_weights(local))
    updates = aggregator.seen[1]
    assert [u.client_id for u in updates] == ["0", "1", "2"]
    assert [u.num_samples for u in updates] == list(SIZES)
    for update, weights in zip(updates, by_hand):
        for name in initial:
            torch.testing.assert_close(update.weights[name], weights[name])
            assert not torch.equal(update.weights[name], initial[name])  # the client did train

    for name in initial:
        expected = np.average(np.stack([w[name].double().numpy() for w in by_hand]), axis=0, weights=SIZES)
        np.testing.assert_allclose(fed.global_weights[name].double().numpy(), expected, rtol=1e-5, atol=1e-6)


def test_same_seed_same_weights_different_seed_differs():
    def final_weights(seed: int) -> dict[str, torch.Tensor]:
        fed = federation(tiny_model(), tiny_clients(), num_rounds=2, seed=seed)
        fed.fit()
        return fed.global_weights

    first, again, other = final_weights(0), final_weights(0), final_weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


# ---------------------------------------------------------------------------- client selection
def test_client_seeding_gives_torch_manual_seed_state(monkeypatch):
    """A client's round seed leaves torch's CPU generator as `torch.manual_seed` does, with or without accelerators."""
    from lightning_fedharmony import client

    seed = 2**62 + 12345
    torch.manual_seed(seed)
    expected = torch.get_rng_state()
    for present in (False, True):
        monkeypatch.setattr(client, "_accelerator_present", lambda present=present: present)
        torch.manual_seed(0)
        client.manual_seed(seed)
        assert torch.equal(torch.get_rng_state(), expected)


def test_selection_seeded_sized_and_varies_by_round():
    clients = tiny_clients(sizes=(16,) * 10)
    fed = federation(clients=clients, fraction_fit=0.3, seed=7)
    picks = [fed.select_clients(t) for t in range(1, 7)]
    assert all(len(p) == 3 and len(set(p)) == 3 and set(p) <= set(fed.clients) for p in picks)
    assert picks == [federation(clients=clients, fraction_fit=0.3, seed=7).select_clients(t) for t in range(1, 7)]
    assert len({tuple(p) for p in picks}) > 1
    assert picks != [federation(clients=clients, fraction_fit=0.3, seed=8).select_clients(t) for t in range(1, 7)]
    # min_clients raises the count above ceil(fraction_fit * K)
    assert len(federation(clients=clients, fraction_fit=0.1, min_clients=4).select_clients(1)) == 4
    assert len(federation(clients=clients, fraction_fit=0.25).select_clients(1)) == 3  # ceil(2.5)
    assert federation(clients=clients).select_clients(1) == [str(k) for k in range(10)]


def test_fit_trains_the_selected_clients():
    clients = tiny_clients(sizes=(16,) * 5)
    fed = federation(clients=clients, fraction_fit=0.4, num_rounds=2, seed=2)
    result = fed.fit()
    for record in result.rounds:
        assert record.clients == fed.select_clients(record.server_round)
        assert len(record.clients) == 2
        assert set(record.client_weights) == set(record.clients)


# ---------------------------------------------------------------------------- failures
def test_raising_client_is_recorded_and_the_round_goes_on():
    clients = {"a": tiny_clients()[0], "bad": RaisingDataModule(tiny_clients()[1]), "c": tiny_clients()[2]}
    result = federation(clients=clients, num_rounds=2, min_clients=2).fit()
    for record in result.rounds:
        assert list(record.failures) == ["bad"]
        assert "RuntimeError" in record.failures["bad"] and "disk on fire" in record.failures["bad"]
        assert set(record.client_weights) == {"a", "c"}
        assert record.clients == ["a", "bad", "c"]


def test_too_few_updates_raise_and_keep_the_last_good_model():
    base = tiny_clients()
    clients = [RaisingDataModule(base[0], fail_from=2), RaisingDataModule(base[1], fail_from=2), base[2]]
    fed = federation(clients=clients, num_rounds=3, min_clients=2)
    with pytest.raises(FederationError, match=r"Round 2: 1 of 3 clients .* fewer than `min_clients`=2"):
        fed.fit()
    assert len(fed.result.rounds) == 1
    good = fed.result.rounds[0]
    assert good.failures == {}
    # the global weights are round 1's aggregate, not touched by round 2's lone update
    reference = federation(clients=tiny_clients(), num_rounds=1, min_clients=2)
    reference.fit()
    assert all(torch.equal(fed.global_weights[k], reference.global_weights[k]) for k in reference.global_weights)


def test_nan_loss_client_is_a_failure():
    clients = {"ok": tiny_clients()[0], "nan": nan_client(), "ok2": tiny_clients()[2]}
    fed = federation(clients=clients, num_rounds=1)
    record = fed.fit().final
    assert list(record.failures) == ["nan"]
    assert "non-finite" in record.failures["nan"] or "nan" in record.failures["nan"].lower()
    assert set(record.client_weights) == {"ok", "ok2"}
    assert all(torch.isfinite(w).all() for w in fed.global_weights.values())


# ---------------------------------------------------------------------------- FedHarmony
def test_fedharmony_server_metrics_and_teachers_from_round_two():
    model = tiny_model()
    fed = federation(model, aggregator=FedHarmony(alignment_weight=1.0), num_rounds=2)
    fed.aggregator.setup(fed.num_rounds)
    first = fed.run_round(1)
    assert first.server_metrics and all(math.isfinite(v) for v in first.server_metrics.values())
    assert "align_loss" not in model.fedharmony_running_means()  # round 1: no teacher yet
    assert not model.logged  # the orchestrator turns the mixin's per-step logging off for client fits
    fed.run_round(2)
    assert model.fedharmony_has_teacher
    assert model.fedharmony_teacher.shape == (NUM_LABELS, NUM_LABELS)
    # the last client of round 2 trained with an alignment term
    assert model.fedharmony_running_means()["align_loss"] > 0
    assert model.fedharmony_log_loss_parts  # restored after the fit
    assert fed.result.rounds[1].server_metrics


class FitCounter(pl.Callback):
    """Counts the client fits it took part in and the batches it saw."""

    def __init__(self) -> None:
        self.fits = 0
        self.batches = 0

    def on_fit_start(self, trainer, pl_module) -> None:
        self.fits += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.batches += 1


@pytest.mark.parametrize("as_list", [True, False], ids=["list", "one"])
def test_callbacks_in_trainer_kwargs_join_every_clients_trainer(as_list: bool):
    counter = FitCounter()
    fed = federation(
        aggregator=FedHarmony(), num_rounds=2, trainer_kwargs={"callbacks": [counter] if as_list else counter}
    )
    fed.fit()
    assert all(not r.failures for r in fed.result.rounds)
    assert counter.fits == 2 * len(SIZES)
    assert counter.batches == 2 * sum(math.ceil(n / 16) for n in SIZES)
    # the statistics' export still ran beside them: round 2's clients were scored against teachers
    assert all(math.isfinite(m["discrepancy"]) for m in fed.result.rounds[1].client_metrics.values())


def test_module_without_mixin_and_fedharmony_is_a_type_error():
    with pytest.raises(TypeError, match=r"FedHarmonyMixin for FedHarmony, but got PlainMLP\. HINT: declare"):
        federation(PlainMLP(NUM_FEATURES, NUM_LABELS), aggregator=FedHarmony())


# ---------------------------------------------------------------------------- the result object
def test_json_csv_round_trip(tmp_path):
    fed = federation(aggregator=FedHarmony(), eval_dataloader=eval_loader(), num_rounds=2)
    result = fed.fit()
    result.config = {"method": "fedharmony", "seed": 0}
    result.to_json(tmp_path / "history.json")
    loaded = FederationResult.from_json(tmp_path / "history.json")
    assert loaded == result
    result.to_csv(tmp_path / "history.csv")
    with open(tmp_path / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["round"]) for r in rows] == [1, 2]
    for row, record in zip(rows, result.rounds):
        assert int(row["num_clients"]) == 3 and int(row["num_failures"]) == 0
        assert float(row["map"]) == pytest.approx(record.metrics["map"])
        assert float(row["seconds_total"]) == pytest.approx(record.seconds["total"])
        assert float(row["train_loss"]) == pytest.approx(record.train_loss)
        assert any(k.startswith("server_") for k in row)


def _record(server_round: int, metrics: dict[str, float]) -> RoundRecord:
    return RoundRecord(server_round, ["0"], {}, {"0": 1.0}, 0.5, metrics, {}, {"total": 1.0})


def test_best_and_curve():
    result = FederationResult(
        rounds=[
            _record(1, {"map": 0.5, "hamming_loss": 0.30}),
            _record(2, {}),
            _record(3, {"map": 0.7, "hamming_loss": 0.25}),
            _record(4, {"map": 0.6, "hamming_loss": 0.20}),
        ]
    )
    assert result.best().server_round == 3
    assert result.best("hamming_loss").server_round == 4  # lower is better for losses
    assert result.curve("map") == [(1, 0.5), (3, 0.7), (4, 0.6)]
    assert result.curve("nothing") == []
    with pytest.raises(KeyError, match="evaluated with metric 'nothing'"):
        result.best("nothing")
    with pytest.raises(RuntimeError, match="at least one finished round"):
        _ = FederationResult().final


def test_eval_every_and_last_round():
    result = federation(eval_dataloader=eval_loader(), num_rounds=3, eval_every=2).fit()
    assert [t for t, _ in result.curve("map")] == [2, 3]


def test_progress_line_and_timings():
    stream = io.StringIO()
    result = federation(eval_dataloader=eval_loader(), num_rounds=2, verbose=True, stream=stream).fit()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("round   1/2") and "map" in lines[0]
    for record in result.rounds:
        assert {"clients", "trainer_setup", "server", "eval", "total"} <= set(record.seconds)
        assert all(v >= 0 for v in record.seconds.values())
        # building the Trainers is small next to the clients' training
        assert record.seconds["trainer_setup"] < record.seconds["clients"] <= record.seconds["total"]


# ---------------------------------------------------------------------------- configuration errors
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_rounds": 0}, ValueError, r"`num_rounds` to be an int >= 1, but got 0"),
        ({"local_epochs": 0}, ValueError, r"`local_epochs` to be an int >= 1, but got 0"),
        ({"fraction_fit": 0.0}, ValueError, r"`fraction_fit` to be in \(0, 1\], but got 0.0"),
        ({"fraction_fit": 1.5}, ValueError, r"`fraction_fit` to be in \(0, 1\], but got 1.5"),
        ({"min_clients": 4}, ValueError, r"`min_clients` to be at most the number of clients \(3\), but got 4"),
        ({"clients": []}, ValueError, r"`clients` to hold at least one datamodule"),
        ({"aggregator": object()}, TypeError, r"`aggregator` to be an Aggregator, but got object"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        federation(**kwargs)


def test_clients_follow_the_servers_correlation_scale():
    model = tiny_model()
    assert model.fedharmony_corr_normalization == "bernoulli" and model.fedharmony_corr_eps == 1e-6
    fed = federation(model, aggregator=FedHarmony(corr_normalization="pearson", corr_eps=1e-4), num_rounds=2)
    fed.fit()
    # the teacher is a Pearson correlation from round 2 on: the batch correlation must be one too, with its eps
    assert model.fedharmony_corr_normalization == "pearson" and model.fedharmony_corr_eps == 1e-4
    with pytest.raises(ValueError, match="`corr_normalization` to be one of"):
        model.fedharmony_configure(corr_normalization="spearman")
    with pytest.raises(ValueError, match=r"Expected argument `corr_eps` to be > 0, but got 0.0"):
        model.fedharmony_configure(corr_eps=0.0)


def test_progress_lines_go_through_logging(caplog, capsys):
    # verbose=False: the lines reach the user's logging configuration, nothing is printed
    with caplog.at_level(logging.INFO, logger="lightning_fedharmony.orchestrator"):
        federation(num_rounds=2, verbose=False).fit()
    assert [r.getMessage().split(" | ")[0] for r in caplog.records] == ["round   1/2", "round   2/2"]
    assert capsys.readouterr().out == ""
    # verbose=True: printed once to stdout, not handed to the user's handlers as well, and the logger is left as found
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning_fedharmony.orchestrator"):
        federation(num_rounds=2, verbose=True).fit()
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["round   1/2", "round   2/2"]
    assert caplog.records == []
    logger = logging.getLogger("lightning_fedharmony.orchestrator")
    assert logger.propagate and not any(type(h).__name__ == "_ProgressHandler" for h in logger.handlers)


def test_num_threads_while_the_federation_runs_then_put_back():
    seen: list[int] = []

    class Spy(FedAvg):
        def client_weights(self, server_round, updates):
            seen.append(torch.get_num_threads())
            return super().client_weights(server_round, updates)

    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        federation(aggregator=Spy(), num_rounds=2, num_threads=1).fit()
        assert seen == [1, 1] and torch.get_num_threads() == 2
        seen.clear()
        federation(aggregator=Spy(), num_rounds=1, num_threads=None).run_round(1)
        assert seen == [2]
    finally:
        torch.set_num_threads(original)
    with pytest.raises(ValueError, match=r"Expected argument `num_threads` to be an int >= 1, but got 0"):
        federation(num_threads=0)
