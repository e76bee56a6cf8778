"""Federated evaluation: clients evaluate the global model on their held-out split, the server merges the states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_fedharmony import FedAvg, FedHarmony
from lightning_fedharmony.client import evaluate_client
from lightning_fedharmony.data import ClientDataModule
from lightning_fedharmony.metrics import MultilabelReport, validate_report_state
from lightning_fedharmony.mixin import model_weights
from lightning_fedharmony.models import MultilabelMLP
from lightning_fedharmony.orchestrator import Federation
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError
from lightning_fedharmony.rounds import evaluate_report, evaluate_weights, evaluation_clients, merge_evaluations


def _data(n: int = 240, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=generator)
    y = (x @ torch.randn(6, 4, generator=generator) > 0.3).float()
    return x, y


def _clients(val_fraction: float = 0.25, num: int = 3) -> list[ClientDataModule]:
    x, y = _data()
    return [
        ClientDataModule(x[i::num], y[i::num], batch_size=32, val_fraction=val_fraction, seed=i) for i in range(num)
    ]


def _model() -> MultilabelMLP:
    torch.manual_seed(0)
    return MultilabelMLP(6, 4, hidden=(16,))


def _union_loader(clients: list[ClientDataModule]) -> DataLoader:
    batches = [batch for dm in clients for batch in dm.val_dataloader()]
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    return DataLoader(TensorDataset(x, y), batch_size=17)


@pytest.mark.parametrize("aggregator", [FedAvg(), FedHarmony()], ids=["fedavg", "fedharmony"])
def test_federated_metrics_equal_central_evaluation_on_the_union(aggregator) -> None:
    clients = _clients()
    fed = Federation(_model(), clients, aggregator, 2, verbose=False)
    result = fed.fit()
    central = evaluate_weights(fed.global_model(), fed.global_weights, _union_loader(clients))
    final = result.final.metrics
    assert final["fed_num_samples"] == sum(dm.num_val_samples for dm in clients)
    for key, value in central.items():
        assert final[f"fed_{key}"] == pytest.approx(value, abs=1e-6), key
    for cid, dm in zip("012", clients):
        own = evaluate_weights(fed.global_model(), fed.global_weights, dm.val_dataloader())
        assert result.final.client_metrics[cid]["val_map"] == pytest.approx(own["map"], abs=1e-6)
        assert result.final.client_metrics[cid]["val_num_samples"] == dm.num_val_samples
    assert all("fed_map" in r.metrics for r in result.rounds)


def test_a_fraction_of_the_clients_evaluates_and_the_metrics_cover_their_union() -> None:
    clients = _clients(num=6)
    fed = Federation(_model(), clients, FedAvg(), 2, fraction_evaluate=0.5, seed=3, verbose=False)
    result = fed.fit()
    for record in result.rounds:
        asked = evaluation_clients([str(k) for k in range(6)], record.server_round, 0.5, seed=3)
        assert len(asked) == 3 and asked == evaluation_clients([str(k) for k in range(6)], record.server_round, 0.5, 3)
        assert sorted(c for c, m in record.client_metrics.items() if "val_map" in m) == sorted(asked)
    asked = evaluation_clients([str(k) for k in range(6)], 2, 0.5, seed=3)
    union = _union_loader([clients[int(c)] for c in asked])
    central = evaluate_weights(fed.global_model(), fed.global_weights, union)
    assert result.final.metrics["fed_map"] == pytest.approx(central["map"], abs=1e-6)
    assert evaluation_clients(["0", "1"], 1, 1.0) == ["0", "1"]
    with pytest.raises(ValueError, match=r"`fraction_evaluate` to be in \(0, 1\], but got 0"):
        Federation(_model(), clients, FedAvg(), 1, fraction_evaluate=0, verbose=False)


def test_federated_evaluation_changes_no_training_number() -> None:
    on = Federation(_model(), _clients(), FedHarmony(), 2, verbose=False)
    off = Federation(_model(), _clients(), FedHarmony(), 2, federated_eval="none", verbose=False)
    on.fit(), off.fit()
    for key, value in off.global_weights.items():
        assert torch.equal(value, on.global_weights[key]), key
    assert "fed_map" not in off.result.final.metrics


def test_binned_evaluation_is_close_to_exact_and_holds_no_scores() -> None:
    clients = _clients()
    exact = Federation(_model(), clients, FedAvg(), 1, verbose=False).fit().final.metrics
    fed = Federation(_model(), clients, FedAvg(), 1, federated_eval="binned", eval_bins=100, verbose=False)
    binned = fed.fit().final.metrics
    assert binned["fed_map"] == pytest.approx(exact["fed_map"], abs=0.02)
    assert binned["fed_of1"] == pytest.approx(exact["fed_of1"], abs=1e-6)  # counts at the threshold are exact
    request = Instruction(weights=fed.global_weights, server_round=1, eval_bins=100)
    evaluation = evaluate_client(fed.model, clients[0], "0", request)
    assert evaluation.report is not None and "preds" not in evaluation.report
    assert evaluation.report["ap_positives"].shape == (100, 4)


def test_binned_report_equals_torchmetrics_binned_ap() -> None:
    from torchmetrics.functional.classification import multilabel_average_precision

    generator = torch.Generator().manual_seed(1)
    preds = torch.rand(200, 5, generator=generator)
    target = (torch.rand(200, 5, generator=generator) < preds).long()
    parts = [MultilabelReport(5, bins=30) for _ in range(3)]
    for part, idx in zip(parts, torch.arange(200).chunk(3)):
        part.update(preds[idx], target[idx])
    merged = MultilabelReport(5, bins=30)
    for part in parts:
        merged.merge_state(part.export_state())
    reference = multilabel_average_precision(preds, target, num_labels=5, thresholds=30)
    assert merged.compute()["map"].item() == pytest.approx(reference.item(), abs=1e-6)


def test_evaluation_round_trips_through_arrays_and_is_validated() -> None:
    clients = _clients()
    request = Instruction(weights=_model().state_dict(), server_round=1)
    evaluation = evaluate_client(_model(), clients[0], "c", request)
    again = Evaluation.from_arrays(evaluation.to_arrays(), client_id="c")
    assert again.num_samples == evaluation.num_samples == clients[0].num_val_samples
    for key, value in evaluation.report.items():
        assert torch.equal(value, again.report[key]), key
    with pytest.raises(ProtocolError, match=r"Client 'c', field `report`: expected a report with eval_bins=10"):
        Evaluation.from_arrays(evaluation.to_arrays(), client_id="c", bins=10)
    arrays = evaluation.to_arrays()
    arrays["report.preds"] = arrays["report.preds"] + 2.0
    with pytest.raises(ProtocolError, match=r"field `report`: Expected `preds` to hold probabilities in \[0, 1\]"):
        Evaluation.from_arrays(arrays, client_id="c")
    arrays = evaluation.to_arrays()
    arrays["report.tp"] = -arrays["report.tp"] - 1
    with pytest.raises(ProtocolError, match=r"counts in `tp` to lie in \[0, num_samples\]"):
        Evaluation.from_arrays(arrays, client_id="c")
    with pytest.raises(ProtocolError, match=r"field `num_samples`: expected an int >= 0, but got -1"):
        Evaluation("c", -1).validate()
    none = evaluate_client(_model(), _clients(val_fraction=0.0)[0], "c", request)
    assert none.num_samples == 0 and none.report is None
    assert Evaluation.from_arrays(none.to_arrays()).report is None


def test_report_state_validation_names_the_entry() -> None:
    report = MultilabelReport(3)
    report.update(torch.rand(4, 3), torch.randint(0, 2, (4, 3)))
    state = report.export_state()
    validate_report_state(state)
    with pytest.raises(ValueError, match=r"Expected `pair_count` of shape \(3, 3\) and dtype torch.float64"):
        validate_report_state({**state, "pair_count": torch.zeros(2, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="unknown `extra`"):
        validate_report_state({**state, "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"`bins` to be None \(exact\) or an int >= 2, but got 1"):
        MultilabelReport(3, bins=1)
    with pytest.raises(ValueError, match=r"Expected a report state with bins=None to merge.*HINT"):
        MultilabelReport(3).merge_state(MultilabelReport(3, bins=5).export_state())


def test_evaluation_keeps_the_module_and_the_random_state() -> None:
    model, dm = _model(), _clients()[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = {k: torch.zeros_like(v) for k, v in before.items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    evaluate_client(model, dm, "0", Instruction(weights=other, server_round=1))
    assert torch.equal(torch.rand(3), expected)
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_federation_rejects_a_bad_federated_eval_setting() -> None:
    with pytest.raises(ValueError, match=r"`federated_eval` to be one of \('exact', 'binned', 'none'\), but got 'yes'"):
        Federation(_model(), _clients(), FedAvg(), federated_eval="yes")
    with pytest.raises(ValueError, match="`bins` to be None"):
        Federation(_model(), _clients(), FedAvg(), eval_bins=0)


def test_merge_skips_clients_without_held_out_data() -> None:
    x, y = _data()
    report = evaluate_report(_model(), _model().state_dict(), DataLoader(TensorDataset(x, y), batch_size=50))
    state = report.export_state()
    federated, own = merge_evaluations([Evaluation("a", int(state["num_samples"]), state), Evaluation("b", 0)])
    assert set(own) == {"a"} and federated["fed_num_samples"] == 240
    assert np.isclose(federated["fed_map"], own["a"]["val_map"])


def _flower_datamodule(partition: int) -> ClientDataModule:
    x, y = _data(seed=partition + 1, n=60)
    return ClientDataModule(x, y, batch_size=16, val_fraction=0.25, seed=partition)


class _InProcessGrid:
    """A Flower Grid in this process: nodes answer the partition-id query, and every other message goes to ``app``
    (the real ClientApp, one Context per node); ``sent`` records ``(round, message type)`` of those."""

    def __init__(self, nodes: dict[int, int], app=None) -> None:
        from flwr.app import Context, RecordDict

        self.nodes, self.app = nodes, app  # node id -> partition id
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config={"partition-id": p}, state=RecordDict(), run_config={})
            for node, p in nodes.items()
        }
        self.sent: list[tuple[int, str]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import ConfigRecord, Message, MessageType, RecordDict

        from lightning_fedharmony.integrations.flower import Key

        replies = []
        for msg in messages:
            node, kind = msg.metadata.dst_node_id, msg.metadata.message_type
            if kind == MessageType.QUERY:
                cid = str(self.nodes[node])
                replies.append(Message(RecordDict({Key.CLIENT: ConfigRecord({Key.CLIENT_ID: cid})}), reply_to=msg))
                continue
            assert self.app is not None, f"unexpected {kind} message"
            self.sent.append((int(msg.metadata.group_id), kind))
            replies.append(self.app(msg, self.contexts[node]))
        return replies


@pytest.mark.parametrize("mode", ["exact", "binned"])
def test_flower_evaluate_messages_merge_to_central_evaluation(task_identity: None, mode: str) -> None:
    from flwr.app import ConfigRecord, MessageType

    from lightning_fedharmony.integrations.flower import FedHarmonyStrategy, make_client_app, weights_to_arrays
    from lightning_fedharmony.results import RoundRecord

    app = make_client_app(lambda context: _model(), lambda partition, context: _flower_datamodule(partition))
    grid = _InProcessGrid({7: 0, 8: 1}, app)
    strategy = FedHarmonyStrategy(FedAvg(), min_available_clients=2, federated_eval=mode, eval_bins=50)
    weights = _model().state_dict()
    strategy.discover_clients(grid)  # type: ignore[arg-type]
    strategy._global = weights
    strategy.result.rounds.append(RoundRecord(1, ["0", "1"], {}, {}, 0.0, {}, {}, {"total": 0.0}))
    messages = list(strategy.configure_evaluate(1, weights_to_arrays(weights), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert [m.metadata.message_type for m in messages] == [MessageType.EVALUATE] * 2
    replies = grid.send_and_receive(messages)
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics is not None
    clients = [_flower_datamodule(p) for p in (0, 1)]
    central = evaluate_report(_model(), weights, _union_loader(clients), bins=50 if mode == "binned" else None)
    expected = central.compute()
    record = strategy.result.final
    for key in ("map", "micro_map", "of1", "hamming_loss"):
        assert metrics[f"fed-{key.replace('_', '-')}"] == pytest.approx(float(expected[key]), abs=1e-6), key
        assert record.metrics[f"fed_{key}"] == pytest.approx(float(expected[key]), abs=1e-6), key
    assert set(record.client_metrics) == {"0", "1"} and not record.eval_failures
    assert record.client_metrics["1"]["val_num_samples"] == clients[1].num_val_samples


def test_flower_evaluates_every_eval_every_rounds_and_after_the_last(task_identity: None) -> None:
    from flwr.app import MessageType, MetricRecord

    from lightning_fedharmony.integrations.flower import FedHarmonyStrategy, make_client_app, weights_to_arrays

    app = make_client_app(lambda context: _model(), lambda partition, context: _flower_datamodule(partition))
    grid = _InProcessGrid({7: 0, 8: 1}, app)

    with pytest.raises(ValueError, match="Expected argument `eval_every` to be an int >= 1, but got 0"):
        FedHarmonyStrategy(FedAvg(), eval_every=0)
    server_rounds: list[int] = []

    def evaluate_fn(server_round, arrays):
        server_rounds.append(server_round)
        return MetricRecord({"map": 0.5})

    strategy = FedHarmonyStrategy(FedAvg(), min_available_clients=2, eval_every=2)
    initial = weights_to_arrays(model_weights(_model()))
    strategy.start(grid, initial, num_rounds=5, evaluate_fn=evaluate_fn)  # type: ignore[arg-type]
    assert server_rounds == [0, 2, 4, 5]
    assert sorted({r for r, kind in grid.sent if kind == MessageType.EVALUATE}) == [2, 4, 5]
    assert len([r for r, kind in grid.sent if kind == MessageType.TRAIN]) == 10  # both clients, every round
    evaluated = [("fed_map" in record.metrics, "map" in record.metrics) for record in strategy.result.rounds]
    assert evaluated == [(False, False), (True, True), (False, False), (True, True), (True, True)]
