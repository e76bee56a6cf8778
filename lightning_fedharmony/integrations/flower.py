"""Run the library's federation on Flower (``flwr`` 1.42, Message API): a Strategy and a ClientApp factory.

The :class:`FedHarmonyStrategy` does no math of its own: every round it asks the library's
:class:`~lightning_fedharmony.aggregators.Aggregator` what to send each client (``configure_round``) and how to combine
the replies (``aggregate_round``), so FedAvg, FedProx and FedHarmony (Kou et al., CVPR 2026,
https://arxiv.org/abs/2604.28024) run on Flower exactly as in :class:`~lightning_fedharmony.orchestrator.Federation`.
The ClientApp built by :func:`make_client_app` runs the same
:func:`~lightning_fedharmony.orchestrator.train_client` step with the same seed, so for one seed, partition and
number of rounds both runners reach the same model.

What travels is the client protocol (:class:`~lightning_fedharmony.protocol.Instruction`,
:class:`~lightning_fedharmony.protocol.Update`): their array form (``to_arrays`` / ``from_arrays``, the same one the
folder transport writes) mapped onto Flower's records, arrays into ``ArrayRecord``, scalars into ``ConfigRecord`` /
``MetricRecord``, under kebab-case keys defined once (:class:`Key`); each message is validated by the protocol alone,
and a malformed one raises :class:`~lightning_fedharmony.protocol.ProtocolError` naming the client and the entry.

- server -> client, one fresh :class:`~flwr.app.RecordDict` per message: ``arrays`` (global weights),
  ``config`` (the instruction's settings: round, seed, local epochs, loss weights; and the ``client-id`` it is for)
  and, for FedHarmony after round 1, ``teacher`` (that client's leave-one-out consensus ``teacher`` and ``mask``);
- client -> server: ``arrays`` (its weights), ``metrics`` (``num-examples``, ``train-loss``,
  ``trainer-setup-seconds``), ``client`` (its ``client-id``) and, for FedHarmony, ``stats``: the raw float64 sums of
  its predictions, so the server's pooled statistics are exact.

Clients are identified by their partition id (``node_config["partition-id"]``, set by the simulation engine or by
``flower-supernode --node-config "partition-id=0 num-partitions=2"``): the strategy asks new nodes for it with a
``query`` message and selects clients among partition ids with the rule of ``Federation.select_clients``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from logging import INFO, WARNING
from typing import Any, ClassVar

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.faults import UpdateCollector
from lightning_fedharmony.orchestrator import (
    CLIENT_TRAINER_DEFAULTS,
    FederationError,
    FederationResult,
    RoundRecord,
    client_round_metrics,
    derive_seed,
    evaluate_weights,
    named_pairs,
    quiet_lightning,
    select_clients,
    train_client,
)
from lightning_fedharmony.protocol import SETTINGS as INSTRUCTION_SETTINGS
from lightning_fedharmony.protocol import Instruction, ProtocolError, Update
from lightning_fedharmony.stats import STATS_FIELDS

try:
    import flwr  # noqa: F401  (first, so that a missing or blocked flwr fails here)
    from flwr.app import (
        Array,
        ArrayRecord,
        ConfigRecord,
        Context,
        Message,
        MessageType,
        MetricRecord,
        RecordDict,
    )
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.serverapp.strategy import Result, Strategy
    from flwr.supercore import log
except ModuleNotFoundError as err:  # pragma: no cover - exercised by simulating the missing extra
    if err.name is not None and err.name.split(".")[0] != "flwr":
        raise
    raise ModuleNotFoundError(
        "`lightning_fedharmony.integrations.flower` needs Flower (`flwr`), which is not installed."
        " HINT: pip install 'lightning-fedharmony[flower]'",
        name="flwr",
    ) from err

__all__ = [
    "FedHarmonyStrategy",
    "Key",
    "arrays_to_weights",
    "instruction_from_records",
    "instruction_to_records",
    "make_client_app",
    "make_evaluate_fn",
    "partition_id",
    "update_from_records",
    "update_to_records",
    "weights_to_arrays",
]


def _wire_name(name: str) -> str:
    """A library name (snake_case) as a key on Flower's wire (kebab-case)."""
    return name.replace("_", "-")


def _library_name(key: str) -> str:
    """A key on Flower's wire as the library's name."""
    return key.replace("-", "_")


class Key:
    """Record and entry names on Flower's wire (kebab-case), shared by the strategy and the ClientApp."""

    # records of a message
    ARRAYS = "arrays"
    CONFIG = "config"
    TEACHER = "teacher"
    MASK = "mask"
    METRICS = "metrics"
    CLIENT = "client"
    STATS = "stats"
    # the envelope: which client a message is for (`config`) or from (`client`)
    CLIENT_ID = "client-id"
    # entries of `metrics` (client -> server)
    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = _wire_name("train_loss")
    TRAINER_SETUP_SECONDS = _wire_name("trainer_setup_seconds")
    # node configuration (simulation engine, `flower-supernode --node-config`) and client state
    PARTITION_ID = "partition-id"
    CLIENT_STATE = "fedharmony-client"
    ROUNDS_TRAINED = "rounds-trained"
    LAST_ROUND = "last-round"

    #: instruction setting (snake_case in the library) -> entry of the ``config`` record
    SETTINGS: ClassVar[dict[str, str]] = {name: _wire_name(name) for name in INSTRUCTION_SETTINGS}
    #: statistics field (snake_case in the library) -> entry of the ``stats`` record
    STATS_FIELDS: ClassVar[dict[str, str]] = {name: _wire_name(name) for name in STATS_FIELDS}
    # the settings the tests and examples name most, spelled through SETTINGS so that they cannot drift
    SERVER_ROUND = SETTINGS["server_round"]
    SEED = SETTINGS["seed"]
    LOCAL_EPOCHS = SETTINGS["local_epochs"]
    PROXIMAL_MU = SETTINGS["proximal_mu"]
    ALIGNMENT_WEIGHT = SETTINGS["alignment_weight"]
    CORR_NORMALIZATION = SETTINGS["corr_normalization"]
    CORR_EPS = SETTINGS["corr_eps"]
    CORR_MOMENTUM = SETTINGS["corr_momentum"]
    DETACH_MARGINALS = SETTINGS["detach_marginals"]
    COLLECT_STATS = SETTINGS["collect_stats"]


# ---------------------------------------------------------------------------------------------- records <-> protocol
@dataclass(frozen=True)
class _Slot:
    """Where entries of a message's array form (``to_arrays``) travel: one entry, or every entry under a prefix
    (``entry`` ending in ``.``), goes to record ``record`` under ``key`` (or the rest of its name)."""

    entry: str
    record: str
    key: str | None = None
    kebab: bool = True

    def wire_key(self, entry: str) -> str | None:
        """The key of ``entry`` in :attr:`record`, or ``None`` if this slot does not hold it."""
        if self.key is not None:
            return self.key if entry == self.entry else None
        if not entry.startswith(self.entry):
            return None
        rest = entry[len(self.entry) :]
        return _wire_name(rest) if self.kebab else rest

    def entry_of(self, key: str) -> str | None:
        """The array-form entry of ``key`` of :attr:`record`, or ``None`` if this slot does not hold it."""
        if self.key is not None:
            return self.entry if key == self.key else None
        return self.entry + (_library_name(key) if self.kebab else key)


_INSTRUCTION_SLOTS = (
    _Slot("weights.", Key.ARRAYS, kebab=False),
    _Slot("teacher", Key.TEACHER, Key.TEACHER),
    _Slot("mask", Key.TEACHER, Key.MASK),
    *(_Slot(name, Key.CONFIG, key) for name, key in Key.SETTINGS.items()),
)
_UPDATE_SLOTS = (
    _Slot("client_id", Key.CLIENT, Key.CLIENT_ID),
    _Slot("num_samples", Key.METRICS, Key.NUM_EXAMPLES),
    _Slot("weights.", Key.ARRAYS, kebab=False),
    _Slot("stats.", Key.STATS),
    _Slot("metrics.", Key.METRICS),
)
_ARRAY_RECORDS = (Key.ARRAYS, Key.TEACHER, Key.STATS)


def _to_records(arrays: Mapping[str, np.ndarray], slots: tuple[_Slot, ...]) -> RecordDict:
    """A message's array form as Flower records: arrays in ArrayRecords, scalars in Config- and MetricRecords."""
    grouped: dict[str, dict[str, np.ndarray]] = {}
    for entry, array in arrays.items():
        record, key = _locate(entry, slots)
        grouped.setdefault(record, {})[key] = array
    content = RecordDict()
    for record, entries in grouped.items():
        if record in _ARRAY_RECORDS:
            content[record] = ArrayRecord({k: Array(np.require(v, requirements="C")) for k, v in entries.items()})
        elif record == Key.METRICS:
            content[record] = MetricRecord({k: v.item() for k, v in entries.items()})
        else:
            content[record] = ConfigRecord({k: v.item() for k, v in entries.items()})
    return content


def _from_records(content: RecordDict, slots: tuple[_Slot, ...]) -> dict[str, Any]:
    """The array form held by Flower records; entries no slot holds (the envelope, the user's own) are skipped."""
    arrays: dict[str, Any] = {}
    for record in {slot.record for slot in slots} & set(content):
        values = content[record]
        held = [slot for slot in slots if slot.record == record]
        for key in values:
            entry = next((e for slot in held if (e := slot.entry_of(key)) is not None), None)
            if entry is not None:
                value = values[key]
                arrays[entry] = value.numpy() if isinstance(value, Array) else value
    return arrays


def _locate(entry: str, slots: tuple[_Slot, ...]) -> tuple[str, str]:
    for slot in slots:
        key = slot.wire_key(entry)
        if key is not None:
            return slot.record, key
    raise KeyError(f"No record holds entry {entry!r}.")  # pragma: no cover - the slots cover the protocol


def _on_wire(err: ProtocolError, slots: tuple[_Slot, ...]) -> ProtocolError:
    """The same error, naming the field as it travels on Flower's wire (``record.key``)."""
    whole = {slot.entry.rstrip("."): slot.record for slot in slots if slot.key is None}
    if err.field in whole:
        return ProtocolError(err.client_id, whole[err.field], err.message)
    try:
        record, key = _locate(err.field, slots)
    except KeyError:
        return err
    return ProtocolError(err.client_id, f"{record}.{key}", err.message)


def instruction_to_records(
    instruction: Instruction,
    client_id: str,
    *,
    arrays: ArrayRecord | None = None,
    config: ConfigRecord | None = None,
) -> RecordDict:
    """One fresh :class:`~flwr.app.RecordDict` for a client's instruction, addressed to ``client_id``.

    Args:
        instruction: what the client gets.
        client_id: the client it is for (``config["client-id"]``).
        arrays: the instruction's weights already as a record (the global weights, encoded once per round).
        config: the user's own ``config`` entries, sent along.
    """
    flat = (instruction if arrays is None else replace(instruction, weights={})).to_arrays()
    content = _to_records(flat, _INSTRUCTION_SLOTS)
    if arrays is not None:
        content[Key.ARRAYS] = arrays
    settings = content.config_records.get(Key.CONFIG, ConfigRecord())
    content[Key.CONFIG] = ConfigRecord({**dict(config or {}), **dict(settings), Key.CLIENT_ID: client_id})
    return content


def instruction_from_records(content: RecordDict, client_id: str) -> Instruction:
    """The instruction a message holds, validated.

    Raises:
        ProtocolError: naming ``client_id`` and the record entry that is missing or malformed.
    """
    try:
        return Instruction.from_arrays(_from_records(content, _INSTRUCTION_SLOTS), client_id)
    except ProtocolError as err:
        raise _on_wire(err, _INSTRUCTION_SLOTS) from None


def update_to_records(update: Update) -> RecordDict:
    """A client's update as Flower records (statistics as raw float64 sums, so pooling them is exact)."""
    return _to_records(update.to_arrays(), _UPDATE_SLOTS)


def update_from_records(content: RecordDict, client_id: str) -> Update:
    """The update a reply holds, validated.

    Raises:
        ProtocolError: naming ``client_id`` and the record entry that is missing or malformed.
    """
    try:
        return Update.from_arrays(_from_records(content, _UPDATE_SLOTS), client_id=client_id)
    except ProtocolError as err:
        raise _on_wire(err, _UPDATE_SLOTS) from None


def weights_to_arrays(weights: Mapping[str, Tensor]) -> ArrayRecord:
    """An :class:`~flwr.app.ArrayRecord` of a state dict (copies to NumPy; dtypes and shapes kept)."""
    return ArrayRecord({name: Array(tensor.detach().cpu().contiguous().numpy()) for name, tensor in weights.items()})


def arrays_to_weights(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict held by an :class:`~flwr.app.ArrayRecord` (NumPy arrays loaded without pickle)."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


# ---------------------------------------------------------------------------------------------- the server
class FedHarmonyStrategy(Strategy):
    """A Flower Strategy that runs any of the library's aggregators (FedAvg, FedProx, FedHarmony) unchanged.

    Each round: ask new nodes for their partition id (a ``query`` message), select clients among the partition ids
    with ``Federation.select_clients``'s seeded rule, build one fresh message per client from
    ``aggregator.configure_round`` (global weights; for FedHarmony that client's teacher and mask), validate the
    replies, hand them to ``aggregator.aggregate_round`` in selection order and return the new global weights.
    Clients train with the seed ``derive_seed(seed, server_round, partition_id)``, as in
    :class:`~lightning_fedharmony.orchestrator.Federation`. Evaluation runs on the server through ``evaluate_fn``
    of :meth:`start` (see :func:`make_evaluate_fn`); no federated evaluation messages are sent.

    The history of the run, in the library's own form, is :attr:`result` (a
    :class:`~lightning_fedharmony.orchestrator.FederationResult`, writable with ``to_json``/``to_csv``).

    Args:
        aggregator: the server strategy whose ``configure_round`` / ``aggregate_round`` do all the math.
        fraction_fit: share of the clients selected per round.
        min_clients: fewest clients selected, and fewest usable updates for a round to count.
        min_available_clients: nodes to wait for before each round (set it to the number of partitions for the
            same selection as a local ``Federation``).
        local_epochs: epochs each selected client trains per round.
        seed: seeds client selection and each client's training.
        wait_timeout: seconds to wait for ``min_available_clients`` nodes (and for their partition ids).

    Example (a ``ServerApp``)::

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            strategy = FedHarmonyStrategy(FedHarmony(), min_available_clients=10)
            strategy.start(grid, weights_to_arrays(model_weights(model)), num_rounds=20,
                           evaluate_fn=make_evaluate_fn(model, test_loader))
    """

    def __init__(
        self,
        aggregator: Aggregator,
        fraction_fit: float = 1.0,
        *,
        min_clients: int = 1,
        min_available_clients: int = 1,
        local_epochs: int = 1,
        seed: int = 0,
        wait_timeout: float = 600.0,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"Expected argument `aggregator` to be an Aggregator, but got {type(aggregator).__name__}.")
        if not 0.0 < fraction_fit <= 1.0:
            raise ValueError(f"Expected argument `fraction_fit` to be in (0, 1], but got {fraction_fit!r}.")
        for name, value in (
            ("min_clients", min_clients),
            ("min_available_clients", min_available_clients),
            ("local_epochs", local_epochs),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Expected argument `{name}` to be an int >= 1, but got {value!r}.")
        if not wait_timeout > 0:
            raise ValueError(f"Expected argument `wait_timeout` to be > 0, but got {wait_timeout!r}.")
        self.aggregator = aggregator
        self.fraction_fit = float(fraction_fit)
        self.min_clients = min_clients
        self.min_available_clients = min_available_clients
        self.local_epochs = local_epochs
        self.seed = seed
        self.wait_timeout = float(wait_timeout)
        self.result = FederationResult()
        self._node_of: dict[str, int] = {}  # client id -> node id
        self._global: dict[str, Tensor] = {}
        self._pending: dict[int, str] = {}  # node id -> client id, for the round in flight
        self._selected: list[str] = []
        self._round_started = 0.0

    @property
    def collect_stats(self) -> bool:
        """Whether clients send their prediction statistics (FedHarmony needs them)."""
        return self.aggregator.requires_stats

    @property
    def global_weights(self) -> dict[str, Tensor]:
        """The latest global weights (after the last aggregation; the round's input while it runs)."""
        return dict(self._global)

    @property
    def client_nodes(self) -> dict[str, int]:
        """Client id -> Flower node id of every client found so far."""
        return dict(self._node_of)

    def summary(self) -> None:
        log(INFO, "\t├──> Aggregator: %s", type(self.aggregator).__name__)
        log(
            INFO,
            "\t├──> Sampling: fraction_fit %.2f, min_clients %d, min_available_clients %d, seed %d",
            self.fraction_fit,
            self.min_clients,
            self.min_available_clients,
            self.seed,
        )
        log(INFO, "\t└──> Local epochs: %d", self.local_epochs)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord,
        num_rounds: int = 3,
        timeout: float = 3600,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Run ``num_rounds`` rounds (Flower's loop); the aggregator is set up for ``num_rounds`` first."""
        self.aggregator.setup(num_rounds, self.local_epochs)
        self.result = FederationResult(config={"num_rounds": num_rounds, "aggregator": type(self.aggregator).__name__})

        recording_fn = None
        if evaluate_fn is not None:
            user_fn = evaluate_fn

            def recording_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
                started = time.perf_counter()
                metrics = user_fn(server_round, arrays)
                if metrics is not None and server_round >= 1 and self.result.rounds:
                    record = self.result.rounds[-1]
                    record.metrics = {
                        _library_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))
                    }
                    record.seconds["eval"] = time.perf_counter() - started
                    record.seconds["total"] += record.seconds["eval"]
                return metrics

        return super().start(
            grid,
            initial_arrays,
            num_rounds=num_rounds,
            timeout=timeout,
            train_config=train_config,
            evaluate_config=evaluate_config,
            evaluate_fn=recording_fn,
        )

    # ------------------------------------------------------------------ which node is which client
    def discover_clients(self, grid: Grid) -> list[str]:
        """Wait for ``min_available_clients`` nodes, ask new ones their partition id; the live client ids, sorted.

        Raises:
            RuntimeError: if too few nodes connect within ``wait_timeout`` seconds.
        """
        deadline = time.monotonic() + self.wait_timeout
        while len(node_ids := list(grid.get_node_ids())) < self.min_available_clients:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"Expected {self.min_available_clients} connected nodes, but {len(node_ids)} connected within"
                    f" {self.wait_timeout:.0f}s. HINT: start more SuperNodes or lower `min_available_clients`."
                )
            log(INFO, "Waiting for nodes: %d of %d connected.", len(node_ids), self.min_available_clients)
            time.sleep(1.0)
        live = set(node_ids)
        self._node_of = {cid: node for cid, node in self._node_of.items() if node in live}
        known = set(self._node_of.values())
        unknown = [node for node in node_ids if node not in known]
        if unknown:
            queries = [
                Message(RecordDict({Key.CONFIG: ConfigRecord()}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in unknown
            ]
            for reply in grid.send_and_receive(queries, timeout=self.wait_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(WARNING, "Node %d did not report its partition id: %s", node, reply.error.reason)
                    continue
                cid = _reply_client_id(reply.content, f"node-{node}")
                if cid in self._node_of and self._node_of[cid] != node:
                    log(WARNING, "Client %s moved from node %d to node %d.", cid, self._node_of[cid], node)
                self._node_of[cid] = node
        return sorted(self._node_of, key=_client_order)

    # ------------------------------------------------------------------ server -> clients
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One fresh message per selected client, built from ``aggregator.configure_round``."""
        self._round_started = time.perf_counter()
        self._global = arrays_to_weights(arrays)
        client_ids = self.discover_clients(grid)
        if len(client_ids) < self.min_clients:
            raise FederationError(
                f"Round {server_round}: {len(client_ids)} clients reported their partition id, fewer than"
                f" `min_clients`={self.min_clients}."
            )
        self._selected = select_clients(
            client_ids, server_round, fraction_fit=self.fraction_fit, min_clients=self.min_clients, seed=self.seed
        )
        instructions = self.aggregator.configure_round(server_round, self._selected, self._global)
        log(INFO, "configure_train: %d of %d clients: %s", len(self._selected), len(client_ids), self._selected)
        self._pending = {}
        messages = []
        for cid in self._selected:
            node = self._node_of[cid]
            instr = replace(
                instructions[cid],
                server_round=server_round,
                seed=derive_seed(self.seed, server_round, _client_index(cid)),
                local_epochs=self.local_epochs,
                collect_stats=self.collect_stats,
            )
            instr.validate(cid)
            # the global weights are the same for every client: serialise them once (records are read-only on send)
            same = instr.weights.keys() == self._global.keys() and all(
                instr.weights[k] is self._global[k] for k in self._global
            )
            content = instruction_to_records(instr, cid, arrays=arrays if same else None, config=config)
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            )
            self._pending[node] = cid
        return messages

    # ------------------------------------------------------------------ clients -> server
    def parse_reply(self, reply: Message, client_id: str) -> tuple[Update, float, float]:
        """The update, final task loss and trainer setup seconds in a client's reply.

        Raises:
            ProtocolError: naming the client and the record entry that is missing or malformed.
        """
        update = update_from_records(reply.content, client_id)
        if self.collect_stats and update.stats is None:
            raise ProtocolError(
                client_id,
                Key.STATS,
                f"expected an ArrayRecord `{Key.STATS}` with the prediction statistics, but found none."
                " HINT: build the ClientApp with `make_client_app` and a model with FedHarmonyMixin.",
            )
        loss = update.metrics.get("train_loss", float("nan"))
        setup = update.metrics.get("trainer_setup_seconds", 0.0)
        return update, loss, setup

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read the replies, screen the updates as ``Federation`` does, then ``aggregator.aggregate_round``.

        A reply that is not a valid update (:meth:`parse_reply` raises :class:`ProtocolError`) is a failure of its
        client, recorded with the error, as in ``fedharmony serve``.

        Raises:
            ProtocolError: a client that sent more than one reply this round.
            FederationError: fewer than ``min_clients`` usable updates.
        """
        t_replies = time.perf_counter()
        by_client: dict[str, tuple[Update, float, float]] = {}
        failures: dict[str, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = self._pending.get(node)
            if cid is None:
                log(WARNING, "Ignoring a reply from node %d, which was not asked to train this round.", node)
                continue
            if cid in by_client or cid in failures:
                raise ProtocolError(cid, Key.CLIENT_ID, "sent more than one reply this round.")
            if reply.has_error():
                failures[cid] = f"ClientAppError: {' '.join(str(reply.error.reason).split())}"
                continue
            try:
                by_client[cid] = self.parse_reply(reply, cid)
            except ProtocolError as err:
                failures[cid] = f"rejected update: {err}"
                log(WARNING, "Round %d: %s", server_round, err)
        collected = UpdateCollector(self._global)
        for cid, reason in failures.items():
            collected.fail(cid, reason)
        for cid in self._selected:  # selection order, as in Federation: the same sums in the same order
            if cid not in by_client:
                collected.failures.setdefault(cid, "no reply")
                continue
            collected.add(*by_client[cid])
        failures, updates = collected.failures, collected.updates
        if failures:
            log(WARNING, "Round %d failures: %s", server_round, failures)
        if len(updates) < self.min_clients:
            raise FederationError(
                f"Round {server_round}: {len(updates)} of {len(self._selected)} clients returned usable updates, fewer"
                f" than `min_clients`={self.min_clients}. Failures: {failures}."
            )
        aggregated = self.aggregator.aggregate_round(server_round, updates, self._global)
        self._global = aggregated.weights
        t_end = time.perf_counter()
        train_loss = collected.train_loss
        self.result.rounds.append(
            RoundRecord(
                server_round=server_round,
                clients=list(self._selected),
                failures=failures,
                client_weights=aggregated.client_weights,
                train_loss=train_loss,
                metrics={},
                server_metrics=aggregated.metrics,
                seconds={
                    "clients": t_replies - self._round_started,
                    "trainer_setup": collected.setup_seconds,
                    "server": t_end - t_replies,
                    "eval": 0.0,
                    "total": t_end - self._round_started,
                },
                client_metrics=client_round_metrics(updates, aggregated.client_weights, aggregated.client_metrics),
                client_pairs={cid: named_pairs(pairs) for cid, pairs in aggregated.client_pairs.items()},
            )
        )
        metrics = MetricRecord(
            {
                Key.TRAIN_LOSS: train_loss,
                "num-clients": len(self._selected),
                "num-failures": len(failures),
                **{_wire_name(k): float(v) for k, v in aggregated.metrics.items()},
            }
        )
        return weights_to_arrays(aggregated.weights), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """No federated evaluation: the global model is evaluated on the server (``evaluate_fn`` of :meth:`start`)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None


def make_evaluate_fn(module: pl.LightningModule, dataloader: DataLoader) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Server-side evaluation for :meth:`FedHarmonyStrategy.start`: the same metrics as ``Federation.evaluate``.

    Args:
        module: a module of the federated architecture; its weights are replaced by the global ones.
        dataloader: held-out ``(x, y)`` batches.
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate_weights(module, arrays_to_weights(arrays), dataloader)
        return MetricRecord({_wire_name(k): float(v) for k, v in metrics.items()})

    return evaluate


def _client_order(client_id: str) -> tuple[int, int | str]:
    return (0, int(client_id)) if client_id.isdigit() else (1, client_id)


def _client_index(client_id: str) -> int:
    if not client_id.isdigit():
        raise ValueError(f"Expected a client id that is a partition id (an int >= 0), but got {client_id!r}.")
    return int(client_id)


def _reply_client_id(content: RecordDict, name: str) -> str:
    record = content.config_records.get(Key.CLIENT)
    if record is None or not isinstance(record.get(Key.CLIENT_ID), str):
        raise ProtocolError(
            name,
            Key.CLIENT,
            f"expected a ConfigRecord `{Key.CLIENT}` with a str `{Key.CLIENT_ID}`, but found none."
            " HINT: build the ClientApp with `make_client_app`.",
        )
    return str(record[Key.CLIENT_ID])


# ---------------------------------------------------------------------------------------------- the clients
ModelFn = Callable[[Context], pl.LightningModule]
DataModuleFn = Callable[[int, Context], pl.LightningDataModule]


def partition_id(context: Context) -> int:
    """This node's partition id (``node_config["partition-id"]``).

    Raises:
        RuntimeError: if the node has none.
    """
    value = context.node_config.get(Key.PARTITION_ID)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuntimeError(
            f"Expected node config `{Key.PARTITION_ID}` to be an int >= 0, but got {value!r}."
            ' HINT: start the SuperNode with `--node-config "partition-id=0 num-partitions=2"`.'
        )
    return value


def make_client_app(
    model_fn: ModelFn,
    datamodule_fn: DataModuleFn,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
) -> ClientApp:
    """A Flower ClientApp that trains the user's LightningModule with the library's ``train_client`` step.

    For each ``train`` message it builds the module (``model_fn(context)``) and the node's data
    (``datamodule_fn(partition_id, context)``), loads the global weights, installs the teacher and mask, seeds torch
    with the seed the server sent (``derive_seed(seed, server_round, partition_id)``), fits a Trainer built from
    :data:`~lightning_fedharmony.orchestrator.CLIENT_TRAINER_DEFAULTS` and ``trainer_kwargs`` for ``local-epochs``
    epochs, and replies with its weights, sample count, loss and (FedHarmony) raw prediction statistics. A ``query``
    message is answered with the node's client id.

    Nothing is kept in memory between messages (a deployed SuperNode starts a fresh process for each): what the
    client remembers (its id, rounds trained) lives in ``Context.state``.

    Args:
        model_fn: builds the module (mix in :class:`~lightning_fedharmony.FedHarmonyMixin` for FedProx and
            FedHarmony); its initial weights are replaced by the global ones.
        datamodule_fn: builds the datamodule of partition ``partition_id``.
        trainer_kwargs: overrides of the client Trainer template (``max_epochs`` comes from the server).

    Example (``client_app.py`` of a Flower app)::

        app = make_client_app(
            lambda context: MultilabelMLP(103, 14),
            lambda partition, context: PartitionedDataModule(partition, num_clients=10),
        )
    """
    overrides = dict(trainer_kwargs or {})
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        content = RecordDict({Key.CLIENT: ConfigRecord({Key.CLIENT_ID: str(partition_id(context))})})
        return Message(content, reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        index = partition_id(context)
        client_id = str(index)
        config = msg.content.config_records.get(Key.CONFIG)
        if config is None:
            raise ProtocolError(
                client_id,
                Key.CONFIG,
                f"expected a ConfigRecord `{Key.CONFIG}`, but the message holds {sorted(msg.content)}."
                " HINT: run the server with `FedHarmonyStrategy`.",
            )
        if config.get(Key.CLIENT_ID) != client_id:
            raise RuntimeError(
                f"Expected instructions for client {client_id!r} (this node's partition id), but they are for"
                f" {config.get(Key.CLIENT_ID)!r}."
            )
        instruction = instruction_from_records(msg.content, client_id)
        kwargs = {**CLIENT_TRAINER_DEFAULTS, **overrides}
        for name in ("server_round", "local_epochs"):
            if getattr(instruction, name) is None and (name == "server_round" or "max_epochs" not in kwargs):
                raise ProtocolError(
                    client_id,
                    f"{Key.CONFIG}.{Key.SETTINGS[name]}",
                    "expected an entry, but it is missing. HINT: run the server with `FedHarmonyStrategy`.",
                )
        _remember(context, client_id, int(instruction.server_round or 0))
        module = model_fn(context)
        datamodule = datamodule_fn(index, context)
        with quiet_lightning():
            update, _, setup = train_client(module, datamodule, client_id, instruction, trainer_kwargs=kwargs)
        update = replace(update, metrics={**update.metrics, "trainer_setup_seconds": setup})
        return Message(update_to_records(update), reply_to=msg)

    return app


def _remember(context: Context, client_id: str, server_round: int) -> None:
    """Record the client's id and progress in ``Context.state``; a node must not change partition mid-run."""
    state = context.state.config_records.get(Key.CLIENT_STATE)
    if state is None:
        state = ConfigRecord({Key.CLIENT_ID: client_id, Key.ROUNDS_TRAINED: 0, Key.LAST_ROUND: 0})
    elif state.get(Key.CLIENT_ID) != client_id:
        raise RuntimeError(
            f"Expected this node to stay client {state.get(Key.CLIENT_ID)!r} for the whole run, but its partition"
            f" id is now {client_id!r}."
        )
    rounds = state.get(Key.ROUNDS_TRAINED)
    state[Key.ROUNDS_TRAINED] = (rounds if isinstance(rounds, int) else 0) + 1
    state[Key.LAST_ROUND] = server_round
    context.state[Key.CLIENT_STATE] = state
