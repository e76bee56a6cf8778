"""The Flower integration: reply validation, per-client messages, the ClientApp, parity with ``Federation``, and real
``flwr run`` runs in simulation and on a loopback deployment (SuperLink + 2 SuperNodes on 127.0.0.1, insecure)."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers.processes import descendants

flwr = pytest.importorskip("flwr")

from flwr.app import (  # noqa: E402
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)

from lightning_fedharmony import FedAvg, FedHarmony, FedProx  # noqa: E402
from lightning_fedharmony.aggregators import ClientUpdate  # noqa: E402
from lightning_fedharmony.data.datamodule import ClientDataModule  # noqa: E402
from lightning_fedharmony.integrations.flower import (  # noqa: E402
    FedHarmonyStrategy,
    Key,
    arrays_to_weights,
    instruction_from_records,
    make_client_app,
    make_evaluate_fn,
    update_from_records,
    update_to_records,
    weights_to_arrays,
)
from lightning_fedharmony.mixin import model_weights  # noqa: E402
from lightning_fedharmony.models import MultilabelMLP  # noqa: E402
from lightning_fedharmony.orchestrator import (  # noqa: E402
    CLIENT_TRAINER_DEFAULTS,
    Federation,
    FederationError,
    derive_seed,
    select_clients,
    train_client,
)
from lightning_fedharmony.protocol import ProtocolError  # noqa: E402
from lightning_fedharmony.stats import CorrelationStats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "flower_app"
BIN = Path(sys.executable).parent
NUM_LABELS = 4


# ---------------------------------------------------------------------------------------------- helpers
class FakeGrid:
    """A Grid whose nodes answer the partition-id query; train messages are answered by the test."""

    def __init__(self, partitions: dict[int, int]) -> None:
        self.partitions = partitions  # node id -> partition id
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        return list(self.partitions)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            self.queries += 1
            cid = str(self.partitions[msg.metadata.dst_node_id])
            replies.append(Message(RecordDict({Key.CLIENT: ConfigRecord({Key.CLIENT_ID: cid})}), reply_to=msg))
        return replies


def _weights(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return model_weights(torch.nn.Linear(3, NUM_LABELS))


def _stats(seed: int, n: int = 20) -> CorrelationStats:
    gen = torch.Generator().manual_seed(seed)
    preds = torch.rand(n, NUM_LABELS, generator=gen)
    stats = CorrelationStats(NUM_LABELS)
    stats.update(preds, (preds > 0.5).long() | torch.eye(NUM_LABELS, dtype=torch.long).repeat(n // NUM_LABELS, 1))
    return stats


def _reply(msg: Message, update: ClientUpdate, *, drop: str | None = None, **overrides: object) -> Message:
    """The reply a well-behaved ClientApp sends; ``drop`` removes one record, ``overrides`` replace records."""
    content = RecordDict(
        {
            Key.ARRAYS: weights_to_arrays(update.weights),
            Key.METRICS: MetricRecord({Key.NUM_EXAMPLES: update.num_samples, Key.TRAIN_LOSS: 0.5}),
            Key.CLIENT: ConfigRecord({Key.CLIENT_ID: update.client_id}),
        }
    )
    if update.stats is not None:
        state = update.stats.state_dict()
        content[Key.STATS] = ArrayRecord({Key.STATS_FIELDS[k]: Array(v.numpy()) for k, v in state.items()})
    for key, record in overrides.items():
        content[key.replace("_", "-")] = record  # type: ignore[assignment]
    if drop is not None:
        del content[drop]
    return Message(content, reply_to=msg)


def _updates(client_ids: list[str], round_seed: int) -> dict[str, ClientUpdate]:
    return {
        cid: ClientUpdate(
            cid, _weights(100 * round_seed + int(cid)), 10 + int(cid), _stats(100 * round_seed + int(cid))
        )
        for cid in client_ids
    }


def _run_round(strategy: FedHarmonyStrategy, grid: FakeGrid, server_round: int, arrays: ArrayRecord):
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    cids = [str(m.content[Key.CONFIG][Key.CLIENT_ID]) for m in messages]
    updates = _updates(cids, server_round)
    replies = [_reply(m, updates[c]) for m, c in zip(messages, cids)]
    return messages, updates, strategy.aggregate_train(server_round, replies)


# ---------------------------------------------------------------------------------------------- the import gate
def test_missing_extra_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flwr", None)  # what `import flwr` sees without the extra
    monkeypatch.delitem(sys.modules, "lightning_fedharmony.integrations.flower")
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-fedharmony\[flower\]'") as info:
        importlib.import_module("lightning_fedharmony.integrations.flower")
    assert info.value.name == "flwr"


# ---------------------------------------------------------------------------------------------- the strategy
def test_strategy_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="Expected argument `aggregator` to be an Aggregator"):
        FedHarmonyStrategy("fedavg")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"Expected argument `fraction_fit` to be in \(0, 1\], but got 0"):
        FedHarmonyStrategy(FedAvg(), 0.0)
    with pytest.raises(ValueError, match="Expected argument `min_clients` to be an int >= 1, but got 0"):
        FedHarmonyStrategy(FedAvg(), min_clients=0)


def test_selection_seeds_and_identity_follow_federation(task_identity: None) -> None:
    # node ids are arbitrary and unordered; clients are the partition ids
    grid = FakeGrid({907: 2, 13: 0, 555: 3, 42: 1})
    strategy = FedHarmonyStrategy(FedAvg(), 0.5, min_available_clients=4, seed=7)
    strategy.aggregator.setup(3)
    arrays = weights_to_arrays(_weights(0))
    for server_round in (1, 2, 3):
        messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
        expected = select_clients(["0", "1", "2", "3"], server_round, fraction_fit=0.5, seed=7)
        assert [m.content[Key.CONFIG][Key.CLIENT_ID] for m in messages] == expected
        for msg in messages:
            cid = str(msg.content[Key.CONFIG][Key.CLIENT_ID])
            assert grid.partitions[msg.metadata.dst_node_id] == int(cid)
            assert msg.content[Key.CONFIG][Key.SEED] == derive_seed(7, server_round, int(cid))
            assert msg.content[Key.CONFIG][Key.SERVER_ROUND] == server_round
    assert grid.queries == 4  # each node is asked its partition id once
    assert strategy.client_nodes == {"0": 13, "1": 42, "2": 907, "3": 555}


def test_fedharmony_sends_each_client_its_own_teacher_and_delegates_the_math(task_identity: None) -> None:
    grid = FakeGrid({10: 0, 11: 1, 12: 2})
    strategy = FedHarmonyStrategy(FedHarmony.paper(seed=0), min_available_clients=3)
    strategy.aggregator.setup(2)
    initial = weights_to_arrays(_weights(0))
    first, updates, (arrays, metrics) = _run_round(strategy, grid, 1, initial)
    assert all(Key.TEACHER not in m.content for m in first)  # no statistics yet: no teacher in round 1

    reference = FedHarmony.paper(seed=0)
    reference.setup(2)
    expected = reference.aggregate_round(1, [updates[c] for c in ("0", "1", "2")], _weights(0))
    for name, tensor in arrays_to_weights(arrays).items():
        assert torch.equal(tensor, expected.weights[name])
    assert metrics is not None and metrics["num-blocks"] == expected.metrics["num_blocks"]
    assert all("_" not in key for key in metrics)  # kebab-case on Flower's records

    second = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))  # type: ignore[arg-type]
    assert len({id(m.content) for m in second}) == len(second)  # a fresh RecordDict per message
    teachers = {}
    for msg in second:
        cid = str(msg.content[Key.CONFIG][Key.CLIENT_ID])
        record = msg.content[Key.TEACHER]
        teacher, mask = reference.teacher(cid)
        assert torch.equal(torch.from_numpy(record[Key.TEACHER].numpy()), teacher)
        assert torch.equal(torch.from_numpy(record[Key.MASK].numpy()), mask)
        assert msg.content[Key.CONFIG][Key.ALIGNMENT_WEIGHT] == 1.0
        assert msg.content[Key.CONFIG][Key.CORR_NORMALIZATION] == "bernoulli"  # the client follows the server's scale
        assert msg.content[Key.CONFIG][Key.CORR_EPS] == reference.corr_eps
        teachers[cid] = teacher
    assert not torch.equal(teachers["0"], teachers["1"])  # leave-one-out: each client has its own


def test_fedprox_sends_mu_and_no_statistics_are_asked(task_identity: None) -> None:
    grid = FakeGrid({10: 0, 11: 1})
    strategy = FedHarmonyStrategy(FedProx(proximal_mu=0.25), min_available_clients=2)
    messages = list(strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), grid))  # type: ignore[arg-type]
    assert [m.content[Key.CONFIG][Key.PROXIMAL_MU] for m in messages] == [0.25, 0.25]
    assert [m.content[Key.CONFIG][Key.COLLECT_STATS] for m in messages] == [False, False]


def test_statistics_travel_as_exact_float64_sums(task_identity: None) -> None:
    grid = FakeGrid({10: 0})
    strategy = FedHarmonyStrategy(FedHarmony(), min_available_clients=1)
    (msg,) = strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), grid)  # type: ignore[arg-type]
    update = ClientUpdate("0", _weights(1), 20, _stats(3))
    parsed, loss, _ = strategy.parse_reply(_reply(msg, update), "0")
    assert loss == 0.5
    assert parsed.stats is not None and update.stats is not None
    for name, tensor in update.stats.state_dict().items():
        assert tensor.dtype == torch.float64
        assert torch.equal(parsed.stats.state_dict()[name], tensor)


@pytest.mark.parametrize(
    ("drop", "overrides", "match"),
    [
        (Key.ARRAYS, {}, r"Client '1', field `arrays`: expected `weights.<name>` entries, but got none"),
        (Key.METRICS, {}, r"Client '1', field `metrics.num-examples`: expected an entry, but it is missing"),
        (None, {"metrics": MetricRecord({Key.NUM_EXAMPLES: 0})}, r"Client '1', field `metrics.num-examples`: .*got 0"),
        (None, {"metrics": MetricRecord({Key.NUM_EXAMPLES: 2.5})}, r"field `metrics.num-examples`: .*got 2.5"),
        (Key.CLIENT, {}, r"Client '1', field `client.client-id`: expected an entry, but it is missing"),
        (None, {"client": ConfigRecord({Key.CLIENT_ID: "0"})}, r"Client '1', field `client.client-id`: .*'0'"),
        (Key.STATS, {}, r"Client '1', field `stats`: expected an ArrayRecord `stats`.*HINT"),
        (
            None,
            {"stats": ArrayRecord({Key.STATS_FIELDS["num_samples"]: Array(torch.ones(()).double().numpy())})},
            r"Client '1', field `stats.sum-preds`: expected an entry, but it is missing",
        ),
        (
            None,
            {
                "stats": ArrayRecord(
                    {Key.STATS_FIELDS[k]: Array(v.float().numpy()) for k, v in _stats(0).state_dict().items()}
                )
            },
            r"Client '1', field `stats.num-samples`: expected float64, but got float32",
        ),
        (
            None,
            {
                "stats": ArrayRecord(
                    {
                        Key.STATS_FIELDS[k]: Array((v if k != "sum_preds" else v * float("nan")).numpy())
                        for k, v in _stats(0).state_dict().items()
                    }
                )
            },
            r"Client '1', field `stats`: Expected statistics entry `sum_preds` to be finite",
        ),
    ],
)
def test_malformed_replies_are_rejected_naming_the_client_and_the_field(
    task_identity: None, drop: str | None, overrides: dict[str, object], match: str
) -> None:
    """A reply that is no valid update raises ProtocolError naming the client and the entry on Flower's wire; the
    round records it as that client's failure, as ``fedharmony serve`` does."""
    grid = FakeGrid({10: 0, 11: 1})
    strategy = FedHarmonyStrategy(FedHarmony(), min_available_clients=2)
    strategy.aggregator.setup(1)
    messages = list(strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), grid))  # type: ignore[arg-type]
    updates = _updates(["0", "1"], 1)
    good = _reply(messages[0], updates["0"])
    bad = _reply(messages[1], updates["1"], drop=drop, **overrides)
    with pytest.raises(ProtocolError, match=match) as info:
        strategy.parse_reply(bad, "1")
    assert (info.value.client_id, info.value.field) == ("1", re.search(r"field `([^`]+)`", match).group(1))  # type: ignore[union-attr]
    strategy.aggregate_train(1, [good, bad])
    assert strategy.result.final.client_weights == {"0": 1.0}
    assert re.search(match, strategy.result.final.failures["1"])
    assert strategy.result.final.failures["1"].startswith("rejected update: ")


def test_a_second_reply_from_one_client_is_an_error(task_identity: None) -> None:
    grid = FakeGrid({10: 0})
    strategy = FedHarmonyStrategy(FedAvg(), min_available_clients=1)
    strategy.aggregator.setup(1)
    (msg,) = strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), grid)  # type: ignore[arg-type]
    reply = _reply(msg, ClientUpdate("0", _weights(1), 10))
    with pytest.raises(ProtocolError, match=r"Client '0', field `client-id`: sent more than one reply this round"):
        strategy.aggregate_train(1, [reply, reply])


def test_instructions_travel_as_the_protocol_array_form(task_identity: None) -> None:
    """Flower's records are the protocol's array form, regrouped: decoding gives back the same instruction."""
    grid = FakeGrid({10: 0, 11: 1})
    strategy = FedHarmonyStrategy(FedHarmony.paper(seed=0), min_available_clients=2, local_epochs=3, seed=5)
    strategy.aggregator.setup(2)
    _, _, (arrays, _) = _run_round(strategy, grid, 1, weights_to_arrays(_weights(0)))
    for msg in strategy.configure_train(2, arrays, ConfigRecord({"user-entry": 1}), grid):  # type: ignore[arg-type]
        cid = str(msg.content[Key.CONFIG][Key.CLIENT_ID])
        decoded = instruction_from_records(msg.content, cid)
        sent = strategy.aggregator.client_instructions(2, cid, arrays_to_weights(arrays))
        assert decoded.local_epochs == 3 and decoded.server_round == 2 and decoded.seed == derive_seed(5, 2, int(cid))
        assert decoded.collect_stats is True and decoded.alignment_weight == sent.alignment_weight
        assert decoded.teacher is not None and sent.teacher is not None and torch.equal(decoded.teacher, sent.teacher)
        assert msg.content[Key.CONFIG]["user-entry"] == 1  # the user's own entries travel along
    weights = {**_weights(1), "num_batches_tracked": torch.tensor(3)}  # 0-d entries keep their shape
    update = ClientUpdate("0", weights, 20, _stats(3), metrics={"train_loss": 0.25})
    decoded_update = update_from_records(update_to_records(update), "0")
    assert decoded_update.metrics == {"train_loss": 0.25} and decoded_update.num_samples == 20
    assert all(torch.equal(decoded_update.weights[k], v) for k, v in weights.items())
    assert set(update_to_records(update)) == {Key.ARRAYS, Key.STATS, Key.METRICS, Key.CLIENT}


@pytest.mark.parametrize("min_clients", [1, 2])
def test_failed_clients_are_recorded_and_too_few_updates_end_the_round(task_identity: None, min_clients: int) -> None:
    grid = FakeGrid({10: 0, 11: 1, 12: 2})
    strategy = FedHarmonyStrategy(FedAvg(), min_clients=min_clients, min_available_clients=3)
    strategy.aggregator.setup(2)
    messages = list(strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), grid))  # type: ignore[arg-type]
    updates = _updates(["0", "1", "2"], 1)
    nan_weights = {k: v * float("nan") for k, v in updates["2"].weights.items()}
    replies = [
        _reply(messages[2], ClientUpdate("2", nan_weights, 12)),  # replies arrive in any order
        Message(Error(code=0, reason="out of memory"), reply_to=messages[1]),
        _reply(messages[0], updates["0"]),
    ]
    if min_clients == 2:
        with pytest.raises(FederationError, match=r"Round 1: 1 of 3 clients returned usable updates.*out of memory"):
            strategy.aggregate_train(1, replies)
        return
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and metrics is not None and metrics["num-failures"] == 2
    for name, tensor in arrays_to_weights(arrays).items():
        assert torch.equal(tensor, updates["0"].weights[name])
    record = strategy.result.final
    assert record.client_weights == {"0": 1.0}
    assert "out of memory" in record.failures["1"] and "NaN or inf" in record.failures["2"]


# ---------------------------------------------------------------------------------------------- the ClientApp
def _tiny_client_app(**trainer_kwargs: object):
    def model_fn(context: Context) -> MultilabelMLP:
        return MultilabelMLP(3, NUM_LABELS, hidden=(8,))

    return make_client_app(
        model_fn, lambda partition, context: _tiny_datamodule(partition), trainer_kwargs=trainer_kwargs
    )


def _tiny_datamodule(partition: int) -> ClientDataModule:
    gen = torch.Generator().manual_seed(partition)
    x = torch.randn(24, 3, generator=gen).numpy()
    y = (torch.rand(24, NUM_LABELS, generator=gen) < 0.5).long().numpy()
    y[:NUM_LABELS] |= torch.eye(NUM_LABELS, dtype=torch.long).numpy()
    return ClientDataModule(x, y, batch_size=8, seed=partition)


def _context(node_config: dict) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_client_app_trains_like_federation_and_keeps_its_state_in_the_context(task_identity: None) -> None:
    app = _tiny_client_app()
    context = _context({"partition-id": 1, "num-partitions": 2})
    grid = FakeGrid({7: 1})
    torch.manual_seed(0)
    global_weights = model_weights(MultilabelMLP(3, NUM_LABELS, hidden=(8,)))
    strategy = FedHarmonyStrategy(FedHarmony(), min_available_clients=1, local_epochs=2, seed=3)
    strategy.aggregator.setup(2)
    (msg,) = strategy.configure_train(1, weights_to_arrays(global_weights), ConfigRecord(), grid)  # type: ignore[arg-type]
    reply = app(msg, context)
    update, loss, _ = strategy.parse_reply(reply, "1")
    assert (
        update.num_samples == 24 and update.stats is not None and int(update.stats.num_samples) == 24
    )  # the last epoch's predictions
    assert torch.isfinite(torch.tensor(loss))  # the task loss was logged

    # the same step run locally with the same seed gives the same weights
    expected, _, _ = train_client(
        MultilabelMLP(3, NUM_LABELS, hidden=(8,)),
        _tiny_datamodule(1),
        "1",
        strategy.aggregator.client_instructions(1, "1", global_weights),  # with FedHarmony's proximal term
        trainer_kwargs={**CLIENT_TRAINER_DEFAULTS, "max_epochs": 2},
        seed=derive_seed(3, 1, 1),
        collect_stats=True,
    )
    for name, tensor in expected.weights.items():
        assert torch.equal(update.weights[name], tensor)

    state = context.state[Key.CLIENT_STATE]
    assert state[Key.CLIENT_ID] == "1" and state[Key.ROUNDS_TRAINED] == 1 and state[Key.LAST_ROUND] == 1


def test_client_app_keeps_its_consensus_terms_in_the_context(task_identity: None) -> None:
    """FedHarmony with ``leave_one_out="client"``: the node builds its teacher from the sums, replies with a term in
    place of statistics, and finds its earlier term in ``Context.state`` the next round."""
    app = _tiny_client_app()
    context = _context({"partition-id": 1, "num-partitions": 2})
    grid = FakeGrid({7: 1})
    torch.manual_seed(0)
    arrays = weights_to_arrays(model_weights(MultilabelMLP(3, NUM_LABELS, hidden=(8,))))
    strategy = FedHarmonyStrategy(FedHarmony(leave_one_out="client"), min_available_clients=1, seed=3)
    strategy.aggregator.setup(2)
    for server_round in (1, 2):
        (msg,) = strategy.configure_train(server_round, arrays, ConfigRecord(), grid)  # type: ignore[arg-type]
        assert Key.CONSENSUS in msg.content and Key.TEACHER not in msg.content
        reply = app(msg, context)
        update, _, _ = strategy.parse_reply(reply, "1")
        assert update.stats is None and update.term is not None
        assert update.term.replaced_round == server_round - 1 and update.term.scored == (server_round > 1)
        arrays, _ = strategy.aggregate_train(server_round, [reply])
        assert Key.CONSENSUS_MEMORY in context.state


def test_client_app_needs_a_partition_id_and_its_own_instructions(task_identity: None) -> None:
    app = _tiny_client_app()
    strategy = FedHarmonyStrategy(FedAvg(), min_available_clients=1)
    (msg,) = strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), FakeGrid({7: 0}))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"Expected node config `partition-id` to be an int >= 0.*HINT"):
        app(msg, _context({}))
    with pytest.raises(RuntimeError, match=r"Expected instructions for client '1'.*but they are for '0'"):
        app(msg, _context({"partition-id": 1}))
    context = _context({"partition-id": 0})
    context.state[Key.CLIENT_STATE] = ConfigRecord({Key.CLIENT_ID: "5", Key.ROUNDS_TRAINED: 1, Key.LAST_ROUND: 1})
    with pytest.raises(RuntimeError, match=r"Expected this node to stay client '5' for the whole run"):
        app(msg, context)


@pytest.mark.parametrize(
    ("entries", "match"),
    [
        ({Key.SEED: "seven"}, r"Client '0', field `config.seed`: expected a int, but got 'seven'"),
        ({Key.CORR_EPS: -1.0}, r"Client '0', field `config.corr-eps`: expected a value > 0, but got -1.0"),
        ({Key.LOCAL_EPOCHS: 0}, r"Client '0', field `config.local-epochs`: expected a value >= 1"),
        ({Key.SERVER_ROUND: None}, r"Client '0', field `config.server-round`: expected an entry, but it is missing"),
        ({Key.TEACHER: ArrayRecord({Key.TEACHER: Array(torch.zeros(4, 4).numpy())})}, r"field `teacher.mask`"),
        ({Key.ARRAYS: ArrayRecord()}, r"Client '0', field `arrays`: expected `weights.<name>` entries"),
        ({Key.CONFIG: None}, r"Client '0', field `config`: expected a ConfigRecord `config`.*HINT"),
    ],
)
def test_client_app_rejects_a_malformed_instruction_naming_the_client_and_the_field(
    task_identity: None, entries: dict[str, object], match: str
) -> None:
    strategy = FedHarmonyStrategy(FedAvg(), min_available_clients=1)
    (msg,) = strategy.configure_train(1, weights_to_arrays(_weights(0)), ConfigRecord(), FakeGrid({7: 0}))  # type: ignore[arg-type]
    for key, value in entries.items():
        if key in (Key.TEACHER, Key.ARRAYS):
            msg.content[key] = value  # type: ignore[assignment]
        elif key == Key.CONFIG:
            del msg.content[Key.CONFIG]
        elif value is None:
            del msg.content[Key.CONFIG][key]
        else:
            msg.content[Key.CONFIG][key] = value  # type: ignore[assignment]
    with pytest.raises(ProtocolError, match=match) as info:
        _tiny_client_app()(msg, _context({"partition-id": 0}))
    assert info.value.client_id == "0"


# ---------------------------------------------------------------------------------------------- parity with Federation
PARITY_CONFIG = {
    "dataset": "river:yeast",
    "data-dir": "",
    "partition": "dirichlet",
    "alpha": 0.5,
    "seed": 0,
    "batch-size": 64,
    "hidden": 32,
    "lr": 1e-3,
    "alignment-weight": 1.0,
    "method": "fedharmony",
    "proximal-mu": 0.0,
}


def test_flower_simulation_matches_the_local_federation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, partition and rounds: the Flower simulation (real Strategy, ClientApp and Messages, Ray backend)
    and ``Federation`` reach the same global metrics and weights.

    Both run the same ``train_client`` with the same seeds, in float32 on CPU, and aggregate the same updates in the
    same (selection) order, so the weights are expected to be bit-identical (measured: difference 0). Ray runs each
    client with ``OMP_NUM_THREADS = num_cpus = 1``; the local run uses one torch thread too, so no BLAS kernel splits
    its sums differently. The tolerance of 1e-6 on metrics and weights is only a margin for platforms whose kernels
    still differ between processes; a real divergence (wrong seed, client, teacher or order) moves mAP by >1e-3.
    """
    monkeypatch.syspath_prepend(str(EXAMPLE))  # Ray's workers get the driver's sys.path (flwr's Ray backend)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after flwr rewrites it
    from flower_app import task
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    num_clients, num_rounds, config = 4, 3, PARITY_CONFIG
    data = task.load_data(config, num_clients)
    dims = (data.train.num_features, data.train.num_labels)
    local = Federation(
        task.model(config, *dims),
        {str(k): task.datamodule(config, k, num_clients) for k in range(num_clients)},
        task.aggregator(config),
        num_rounds,
        fraction_fit=0.5,
        seed=0,
        eval_dataloader=data.test_loader(),
        verbose=False,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        local.fit()
    finally:
        torch.set_num_threads(threads)

    strategy = FedHarmonyStrategy(task.aggregator(config), 0.5, min_available_clients=num_clients, seed=0)
    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        model = task.model(config, *dims)
        strategy.start(
            grid,
            weights_to_arrays(model_weights(model)),
            num_rounds=num_rounds,
            evaluate_fn=make_evaluate_fn(model, data.test_loader()),
        )

    client_app = make_client_app(
        lambda context: task.model(config, *dims),
        lambda partition, context: task.datamodule(config, partition, int(context.node_config["num-partitions"])),
    )
    run_simulation(
        server_app,
        client_app,
        num_supernodes=num_clients,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )

    assert len(strategy.result.rounds) == num_rounds
    worst = 0.0
    for mine, theirs in zip(local.result.rounds, strategy.result.rounds):
        assert theirs.clients == mine.clients and not theirs.failures
        assert theirs.client_weights == pytest.approx(mine.client_weights, abs=1e-6)
        assert set(theirs.metrics) == set(mine.metrics)
        worst = max(worst, *(abs(theirs.metrics[k] - mine.metrics[k]) for k in mine.metrics))
        # the per-client record too (no client validation split here: the server's part only)
        assert set(theirs.client_metrics) == set(mine.client_metrics) == set(mine.client_weights)
        for cid, values in mine.client_metrics.items():
            assert theirs.client_metrics[cid] == pytest.approx(values, rel=1e-5, abs=1e-6)
        assert {c: len(p) for c, p in theirs.client_pairs.items()} == {c: len(p) for c, p in mine.client_pairs.items()}
    assert worst <= 1e-6
    print(f"parity: largest metric difference {worst:.3g}")
    for name, tensor in local.global_weights.items():
        torch.testing.assert_close(strategy.global_weights[name], tensor, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- `flwr run`
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{process.args[0]} exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    pytest.fail(f"nothing listened on 127.0.0.1:{port} within {timeout}s:\n{log.read_text()[-3000:]}")


class FlowerProcesses:
    """A SuperLink (and SuperNodes) on 127.0.0.1, each in its own process group, stopped on exit."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.processes: list[tuple[subprocess.Popen, Path]] = []
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
        }
        self.port = _free_port()
        home.mkdir(parents=True, exist_ok=True)
        # the CLI's connection: our SuperLink, not the auto-started `:local:` one on a fixed port
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )

    def start(self, *args: str, port: int) -> None:
        log = self.home / f"{args[0]}-{len(self.processes)}.log"
        with open(log, "w") as handle:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]],
                env=self.env,
                stdout=handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopping it stops its children too
            )
        self.processes.append((process, log))
        _wait_for_port(port, process, log)

    def stop(self) -> None:
        """SIGTERM the process group of every process started and of every descendant (Flower's SuperExec, ServerApp
        and ClientApp processes start their own sessions), then SIGKILL what is left."""
        own = os.getpgrp()
        groups: list[int] = []
        for process, _ in reversed(self.processes):
            for pid in [process.pid, *descendants(process.pid)]:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    group = os.getpgid(pid)
                    if group != own and group not in groups:
                        groups.append(group)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGTERM)
        for process, _ in self.processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, signal.SIGKILL)
        for process, _ in self.processes:
            process.wait(timeout=10)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()[-4000:]}" for _, log in self.processes)

    def flwr(self, *args: str, timeout: float = 120.0) -> dict:
        done = subprocess.run(
            [str(BIN / "flwr"), *args, "--format", "json"],
            env=self.env,
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        try:
            return json.loads(done.stdout)
        except json.JSONDecodeError:
            pytest.fail(f"`flwr {' '.join(args)}` gave no JSON (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")

    def run_app(self, run_config: str, *extra: str, timeout: float = 300.0) -> None:
        """``flwr run`` the example, then wait for the run to finish; fail unless its status is completed."""
        started = self.flwr("run", str(EXAMPLE), "test", "--run-config", run_config, *extra)
        assert started.get("success"), started
        run_id = started["run-id"]
        deadline = time.monotonic() + timeout
        status = "unknown"
        while time.monotonic() < deadline:
            listing = self.flwr("ls", "test", "--run-id", str(run_id))
            status = listing["runs"][0]["status"] if listing.get("runs") else "unknown"
            if status.startswith("finished"):
                break
            time.sleep(5.0)  # each `flwr ls` costs a CLI start-up; poll gently
        # `flwr run` exits 0 even when the ServerApp crashes: only the run's status tells
        assert status == "finished:completed", f"run {run_id} ended as {status!r}\n{self.logs()}"


@pytest.fixture
def flower(tmp_path: Path) -> Iterator[FlowerProcesses]:
    procs = FlowerProcesses(tmp_path / "flwr-home")
    try:
        yield procs
    finally:
        procs.stop()


def _check_history(path: Path, num_rounds: int, clients: list[str]) -> None:
    history = json.loads(path.read_text())
    assert [r["server_round"] for r in history["rounds"]] == list(range(1, num_rounds + 1))
    for record in history["rounds"]:
        assert record["clients"] == clients and record["failures"] == {}
        assert 0.0 < record["metrics"]["map"] <= 1.0


def test_flwr_run_simulation(flower: FlowerProcesses, tmp_path: Path) -> None:
    flower.start(
        "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(flower.port),
        port=flower.port,
    )  # fmt: skip
    result = tmp_path / "simulation.json"
    flower.run_app(
        f"num-server-rounds=2 min-available-clients=3 hidden=32 result-path='{result}'",
        "--federation-config",
        "num-supernodes=3 client-resources-num-cpus=1",
    )
    _check_history(result, 2, ["0", "1", "2"])


def test_flwr_run_loopback_deployment(flower: FlowerProcesses, tmp_path: Path) -> None:
    flower.start("flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(flower.port), port=flower.port)
    for partition in (0, 1):
        port = _free_port()
        flower.start(
            "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{flower.port}",
            "--node-config", f"partition-id={partition} num-partitions=2", "--host", "127.0.0.1", "--port", str(port),
            port=port,
        )  # fmt: skip
    result = tmp_path / "deployment.json"
    flower.run_app(f"num-server-rounds=2 min-available-clients=2 hidden=32 result-path='{result}'")
    _check_history(result, 2, ["0", "1"])
