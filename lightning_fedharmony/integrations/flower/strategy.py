"""The server on Flower: :class:`FedHarmonyStrategy` runs the library's aggregators unchanged, and
:func:`make_evaluate_fn` evaluates the global model on the server."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from logging import INFO, WARNING

import lightning.pytorch as pl
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.supercore import log
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.faults import UpdateCollector
from lightning_fedharmony.integrations.flower.wire import (
    Key,
    arrays_to_weights,
    evaluation_from_records,
    instruction_to_records,
    library_name,
    update_from_records,
    weights_to_arrays,
    wire_name,
)
from lightning_fedharmony.metrics import check_bins
from lightning_fedharmony.orchestrator import FEDERATED_EVAL, FederationError
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError, Update
from lightning_fedharmony.results import FederationResult, RoundRecord, client_round_metrics, named_pairs
from lightning_fedharmony.rounds import derive_seed, evaluate_weights, merge_evaluations, select_clients


class FedHarmonyStrategy(Strategy):
    """A Flower Strategy that runs any of the library's aggregators (FedAvg, FedProx, FedHarmony) unchanged.

    Each round: ask new nodes for their partition id (a ``query`` message), select clients among the partition ids
    with ``Federation.select_clients``'s seeded rule, build one fresh message per client from
    ``aggregator.configure_round`` (global weights; for FedHarmony that client's teacher and mask), validate the
    replies, hand them to ``aggregator.aggregate_round`` in selection order and return the new global weights.
    Clients train with the seed ``derive_seed(seed, server_round, partition_id)``, as in
    :class:`~lightning_fedharmony.orchestrator.Federation`. After each round every known client gets an ``evaluate``
    message with the new global weights and answers with the metric state of its held-out split; the server merges
    the states exactly (as ``Federation`` does), into ``fed_<key>`` metrics and each client's ``val_<key>`` in the
    round's record. Server-side evaluation on a test set runs through ``evaluate_fn`` of :meth:`start` (see
    :func:`make_evaluate_fn`).

    The history of the run, in the library's own form, is :attr:`result` (a
    :class:`~lightning_fedharmony.results.FederationResult`, writable with ``to_json``/``to_csv``).

    Args:
        aggregator: the server strategy whose ``configure_round`` / ``aggregate_round`` do all the math.
        fraction_fit: share of the clients selected per round.
        min_clients: fewest clients selected, and fewest usable updates for a round to count.
        min_available_clients: nodes to wait for before each round (set it to the number of partitions for the
            same selection as a local ``Federation``).
        local_epochs: epochs each selected client trains per round.
        seed: seeds client selection and each client's training.
        wait_timeout: seconds to wait for ``min_available_clients`` nodes (and for their partition ids).
        federated_eval: ``"exact"``, ``"binned"`` (no per-sample score leaves a client) or ``"off"``, as in
            ``Federation``.
        eval_bins: thresholds of the binned average precision.

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
        federated_eval: str = "exact",
        eval_bins: int = 200,
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
        if federated_eval not in FEDERATED_EVAL:
            raise ValueError(
                f"Expected argument `federated_eval` to be one of {FEDERATED_EVAL}, but got {federated_eval!r}."
            )
        check_bins(eval_bins)
        self.federated_eval = federated_eval
        self.eval_bins = eval_bins
        self._eval_pending: dict[int, str] = {}  # node id -> client id, for the evaluation in flight
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
                    # update, not replace: the federated metrics of aggregate_evaluate are already there
                    record.metrics.update(
                        {library_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
                    )
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
                **{wire_name(k): float(v) for k, v in aggregated.metrics.items()},
            }
        )
        return weights_to_arrays(aggregated.weights), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: one ``evaluate`` message with the new global weights per known client (none with
        ``federated_eval="off"``)."""
        self._eval_pending = {}
        if self.federated_eval == "off":
            return []
        request = Instruction(weights=self._global, server_round=server_round, eval_bins=self._bins)
        messages = []
        for cid, node in sorted(self._node_of.items(), key=lambda item: _client_order(item[0])):
            content = instruction_to_records(request, cid, arrays=arrays, config=config)
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.EVALUATE, group_id=str(server_round))
            )
            self._eval_pending[node] = cid
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Merge the clients' metric states exactly into the round's record (``fed_<key>`` metrics, each client's
        ``val_<key>``, failures in ``eval_failures``) and return the federated metrics."""
        evaluations: dict[str, Evaluation] = {}
        failures: dict[str, str] = {}
        for reply in replies:
            cid = self._eval_pending.get(reply.metadata.src_node_id)
            if cid is None or cid in evaluations:
                continue
            if reply.has_error():
                failures[cid] = f"ClientAppError: {' '.join(str(reply.error.reason).split())}"
                continue
            try:
                evaluations[cid] = evaluation_from_records(reply.content, cid, self._bins)
            except ProtocolError as err:
                failures[cid] = f"rejected evaluation: {err}"
        failures.update({cid: "no reply" for cid in self._eval_pending.values() if cid not in evaluations})
        failures = {cid: reason for cid, reason in failures.items() if cid not in evaluations}
        ordered = [evaluations[cid] for cid in sorted(evaluations, key=_client_order)]
        federated, own = merge_evaluations(ordered, self._bins)
        if self.result.rounds and self.result.rounds[-1].server_round == server_round:
            record = self.result.rounds[-1]
            record.metrics.update(federated)
            record.eval_failures = failures
            for cid, values in own.items():
                record.client_metrics.setdefault(cid, {}).update(values)
        if failures:
            log(WARNING, "Round %d evaluation failures: %s", server_round, failures)
        return MetricRecord({wire_name(k): v for k, v in federated.items()}) if federated else None

    @property
    def _bins(self) -> int | None:
        return self.eval_bins if self.federated_eval == "binned" else None


def make_evaluate_fn(module: pl.LightningModule, dataloader: DataLoader) -> Callable[[int, ArrayRecord], MetricRecord]:
    """Server-side evaluation for :meth:`FedHarmonyStrategy.start`: the same metrics as ``Federation.evaluate``.

    Args:
        module: a module of the federated architecture; its weights are replaced by the global ones.
        dataloader: held-out ``(x, y)`` batches.
    """

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        metrics = evaluate_weights(module, arrays_to_weights(arrays), dataloader)
        return MetricRecord({wire_name(k): float(v) for k, v in metrics.items()})

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
