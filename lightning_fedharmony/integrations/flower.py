"""Run the library's federation on Flower (``flwr`` 1.42, Message API): a Strategy and a ClientApp factory.

The :class:`FedHarmonyStrategy` does no math of its own: every round it asks the library's
:class:`~lightning_fedharmony.aggregators.Aggregator` what to send each client (``configure_round``) and how to combine
the replies (``aggregate_round``), so FedAvg, FedProx and FedHarmony (Kou et al., CVPR 2026,
https://arxiv.org/abs/2604.28024) run on Flower exactly as in :class:`~lightning_fedharmony.orchestrator.Federation`.
The ClientApp built by :func:`make_client_app` runs the same
:func:`~lightning_fedharmony.orchestrator.train_client` step with the same seed, so for one seed, partition and
number of rounds both runners reach the same model.

What travels (keys on Flower's wire are kebab-case and defined once, in :class:`Key`):

- server -> client, one fresh :class:`~flwr.app.RecordDict` per message: ``arrays`` (global weights),
  ``config`` (round, client id, seed, local epochs, loss weights) and, for FedHarmony after round 1, ``teacher``
  (that client's leave-one-out consensus teacher and alignment mask);
- client -> server: ``arrays`` (its weights), ``metrics`` (``num-examples``, ``train-loss``), ``client``
  (its ``client-id``) and, for FedHarmony, ``stats``: the raw float64 sums of its predictions, so the server's pooled
  statistics are exact.

Clients are identified by their partition id (``node_config["partition-id"]``, set by the simulation engine or by
``flower-supernode --node-config "partition-id=0 num-partitions=2"``): the strategy asks new nodes for it with a
``query`` message and selects clients among partition ids with the rule of ``Federation.select_clients``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from typing import Any, ClassVar, TypeVar

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.aggregators.base import (
    Aggregator,
    ClientInstructions,
    ClientUpdate,
    InconsistentClientUpdates,
)
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
from lightning_fedharmony.stats import STATS_FIELDS, CorrelationStats, validate_stats_state

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
    "make_client_app",
    "make_evaluate_fn",
    "partition_id",
    "weights_to_arrays",
]


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
    # entries of `config` (server -> client)
    SERVER_ROUND = "server-round"
    CLIENT_ID = "client-id"
    SEED = "seed"
    LOCAL_EPOCHS = "local-epochs"
    PROXIMAL_MU = "proximal-mu"
    ALIGNMENT_WEIGHT = "alignment-weight"
    CORR_NORMALIZATION = "corr-normalization"
    CORR_EPS = "corr-eps"
    CORR_MOMENTUM = "corr-momentum"
    DETACH_MARGINALS = "detach-marginals"
    COLLECT_STATS = "collect-stats"
    # entries of `metrics` (client -> server)
    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = "train-loss"
    TRAINER_SETUP_SECONDS = "trainer-setup-seconds"
    # node configuration (simulation engine, `flower-supernode --node-config`) and client state
    PARTITION_ID = "partition-id"
    CLIENT_STATE = "fedharmony-client"
    ROUNDS_TRAINED = "rounds-trained"
    LAST_ROUND = "last-round"

    #: statistics field (snake_case in the library) -> entry of the ``stats`` record
    STATS_FIELDS: ClassVar[dict[str, str]] = {name: name.replace("_", "-") for name in STATS_FIELDS}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _snake(name: str) -> str:
    return name.replace("-", "_")


# ---------------------------------------------------------------------------------------------- records <-> tensors
def weights_to_arrays(weights: Mapping[str, Tensor]) -> ArrayRecord:
    """An :class:`~flwr.app.ArrayRecord` of a state dict (copies to NumPy; dtypes and shapes kept)."""
    return ArrayRecord({name: Array(tensor.detach().cpu().contiguous().numpy()) for name, tensor in weights.items()})


def arrays_to_weights(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict held by an :class:`~flwr.app.ArrayRecord` (NumPy arrays loaded without pickle)."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}


def _stats_to_arrays(stats: CorrelationStats) -> ArrayRecord:
    state = stats.state_dict()
    return ArrayRecord({Key.STATS_FIELDS[name]: Array(state[name].numpy()) for name in STATS_FIELDS})


def _stats_from_arrays(record: ArrayRecord, client_id: str) -> CorrelationStats:
    missing = [key for key in Key.STATS_FIELDS.values() if key not in record]
    if missing:
        raise InconsistentClientUpdates(
            client_id, Key.STATS, f"expected entries {list(Key.STATS_FIELDS.values())}, but {missing} are missing."
        )
    state = {name: torch.from_numpy(record[key].numpy().copy()) for name, key in Key.STATS_FIELDS.items()}
    for name, tensor in state.items():
        if tensor.dtype != torch.float64:
            raise InconsistentClientUpdates(
                client_id,
                f"{Key.STATS}.{Key.STATS_FIELDS[name]}",
                f"expected raw float64 sums (exact pooling), but got {tensor.dtype}.",
            )
    try:
        validate_stats_state(state)
    except ValueError as err:
        raise InconsistentClientUpdates(client_id, Key.STATS, str(err)) from None
    return CorrelationStats.from_state_dict(state)


def _instructions_to_content(instructions: ClientInstructions, arrays: ArrayRecord, config: ConfigRecord) -> RecordDict:
    content = RecordDict({Key.ARRAYS: arrays, Key.CONFIG: config})
    if instructions.teacher is not None:
        teacher = instructions.teacher.detach().cpu().float()
        mask = (
            instructions.mask.detach().cpu().bool()
            if instructions.mask is not None
            else ~torch.eye(teacher.shape[0], dtype=torch.bool)
        )
        content[Key.TEACHER] = ArrayRecord({Key.TEACHER: Array(teacher.numpy()), Key.MASK: Array(mask.numpy())})
    return content


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
                    record.metrics = {_snake(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
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
            instr = instructions[cid]
            instr.validate(cid)
            # the global weights are the same for every client: serialise them once (records are read-only on send)
            same = instr.weights.keys() == self._global.keys() and all(
                instr.weights[k] is self._global[k] for k in self._global
            )
            client_arrays = arrays if same else weights_to_arrays(instr.weights)
            client_config = ConfigRecord(dict(config))
            client_config[Key.SERVER_ROUND] = server_round
            client_config[Key.CLIENT_ID] = cid
            client_config[Key.SEED] = derive_seed(self.seed, server_round, _client_index(cid))
            client_config[Key.LOCAL_EPOCHS] = self.local_epochs
            if instr.proximal_mu is not None:
                client_config[Key.PROXIMAL_MU] = float(instr.proximal_mu)
            client_config[Key.COLLECT_STATS] = self.collect_stats
            if instr.alignment_weight is not None:
                client_config[Key.ALIGNMENT_WEIGHT] = float(instr.alignment_weight)
            if instr.corr_normalization is not None:
                client_config[Key.CORR_NORMALIZATION] = instr.corr_normalization
            if instr.corr_eps is not None:
                client_config[Key.CORR_EPS] = float(instr.corr_eps)
            if instr.corr_momentum is not None:
                client_config[Key.CORR_MOMENTUM] = float(instr.corr_momentum)
            if instr.detach_marginals is not None:
                client_config[Key.DETACH_MARGINALS] = bool(instr.detach_marginals)
            content = _instructions_to_content(instr, client_arrays, client_config)
            messages.append(
                Message(content, dst_node_id=node, message_type=MessageType.TRAIN, group_id=str(server_round))
            )
            self._pending[node] = cid
        return messages

    # ------------------------------------------------------------------ clients -> server
    def parse_reply(self, reply: Message, client_id: str) -> tuple[ClientUpdate, float, float]:
        """The update, final task loss and trainer setup seconds in a client's reply.

        Raises:
            InconsistentClientUpdates: naming the client and the record that is missing or malformed.
        """
        content = reply.content
        arrays = content.array_records.get(Key.ARRAYS)
        if arrays is None:
            raise InconsistentClientUpdates(
                client_id, Key.ARRAYS, f"expected an ArrayRecord `{Key.ARRAYS}` with the weights, but found none."
            )
        metrics = content.metric_records.get(Key.METRICS)
        if metrics is None or Key.NUM_EXAMPLES not in metrics:
            raise InconsistentClientUpdates(
                client_id,
                Key.METRICS,
                f"expected a MetricRecord `{Key.METRICS}` with `{Key.NUM_EXAMPLES}`, but found none.",
            )
        num_examples = metrics[Key.NUM_EXAMPLES]
        if isinstance(num_examples, bool) or not isinstance(num_examples, int) or num_examples <= 0:
            raise InconsistentClientUpdates(
                client_id, f"{Key.METRICS}.{Key.NUM_EXAMPLES}", f"expected a positive int, but got {num_examples!r}."
            )
        reported = _reply_client_id(content, client_id)
        if reported != client_id:
            raise InconsistentClientUpdates(
                client_id, f"{Key.CLIENT}.{Key.CLIENT_ID}", f"the reply comes from client {reported!r}."
            )
        stats = None
        if self.collect_stats:
            record = content.array_records.get(Key.STATS)
            if record is None:
                raise InconsistentClientUpdates(
                    client_id,
                    Key.STATS,
                    f"expected an ArrayRecord `{Key.STATS}` with the prediction statistics, but found none."
                    " HINT: build the ClientApp with `make_client_app` and a model with FedHarmonyMixin.",
                )
            stats = _stats_from_arrays(record, client_id)
        update = ClientUpdate(
            client_id=client_id,
            weights=arrays_to_weights(arrays),
            num_samples=num_examples,
            stats=stats,
            metrics={_snake(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))},
        )
        loss = metrics.get(Key.TRAIN_LOSS, float("nan"))
        setup = metrics.get(Key.TRAINER_SETUP_SECONDS, 0.0)
        loss = loss if isinstance(loss, (int, float)) else float("nan")
        setup = setup if isinstance(setup, (int, float)) else 0.0
        return update, float(loss), float(setup)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, screen the updates as ``Federation`` does, then ``aggregator.aggregate_round``.

        Raises:
            InconsistentClientUpdates: a reply whose records are missing or malformed (names the client).
            FederationError: fewer than ``min_clients`` usable updates.
        """
        t_replies = time.perf_counter()
        by_client: dict[str, tuple[ClientUpdate, float, float]] = {}
        failures: dict[str, str] = {}
        for reply in replies:
            node = reply.metadata.src_node_id
            cid = self._pending.get(node)
            if cid is None:
                log(WARNING, "Ignoring a reply from node %d, which was not asked to train this round.", node)
                continue
            if reply.has_error():
                failures[cid] = f"ClientAppError: {' '.join(str(reply.error.reason).split())}"
                continue
            if cid in by_client:
                raise InconsistentClientUpdates(cid, Key.CLIENT_ID, "sent more than one reply this round.")
            by_client[cid] = self.parse_reply(reply, cid)
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
                **{_kebab(k): float(v) for k, v in aggregated.metrics.items()},
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
        return MetricRecord({_kebab(k): float(v) for k, v in metrics.items()})

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
        raise InconsistentClientUpdates(
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
        arrays = msg.content.array_records.get(Key.ARRAYS)
        if config is None or arrays is None:
            raise RuntimeError(
                f"Expected a train message with records `{Key.ARRAYS}` and `{Key.CONFIG}`, but got"
                f" {sorted(msg.content)}. HINT: run the server with `FedHarmonyStrategy`."
            )
        if config.get(Key.CLIENT_ID) != client_id:
            raise RuntimeError(
                f"Expected instructions for client {client_id!r} (this node's partition id), but they are for"
                f" {config.get(Key.CLIENT_ID)!r}."
            )
        server_round = _number(config, Key.SERVER_ROUND, int)
        _remember(context, client_id, server_round)
        teacher = mask = None
        if Key.TEACHER in msg.content.array_records:
            record = msg.content.array_records[Key.TEACHER]
            teacher = torch.from_numpy(record[Key.TEACHER].numpy().copy())
            mask = torch.from_numpy(record[Key.MASK].numpy().copy())
        alignment = config.get(Key.ALIGNMENT_WEIGHT)
        instructions = ClientInstructions(
            weights=arrays_to_weights(arrays),
            teacher=teacher,
            mask=mask,
            alignment_weight=None if alignment is None else _number(config, Key.ALIGNMENT_WEIGHT, float),
            proximal_mu=_number(config, Key.PROXIMAL_MU, float) if Key.PROXIMAL_MU in config else None,
            corr_normalization=str(config[Key.CORR_NORMALIZATION]) if Key.CORR_NORMALIZATION in config else None,
            corr_eps=_number(config, Key.CORR_EPS, float) if Key.CORR_EPS in config else None,
            corr_momentum=_number(config, Key.CORR_MOMENTUM, float) if Key.CORR_MOMENTUM in config else None,
            detach_marginals=_flag(config, Key.DETACH_MARGINALS) if Key.DETACH_MARGINALS in config else None,
        )
        instructions.validate(client_id)
        module = model_fn(context)
        datamodule = datamodule_fn(index, context)
        kwargs = {**CLIENT_TRAINER_DEFAULTS, **overrides, "max_epochs": _number(config, Key.LOCAL_EPOCHS, int)}
        with quiet_lightning():
            update, loss, setup = train_client(
                module,
                datamodule,
                client_id,
                instructions,
                trainer_kwargs=kwargs,
                seed=_number(config, Key.SEED, int),
                collect_stats=bool(config.get(Key.COLLECT_STATS, False)),
            )
        content = RecordDict(
            {
                Key.ARRAYS: weights_to_arrays(update.weights),
                Key.METRICS: MetricRecord(
                    {Key.NUM_EXAMPLES: int(update.num_samples), Key.TRAIN_LOSS: loss, Key.TRAINER_SETUP_SECONDS: setup}
                ),
                Key.CLIENT: ConfigRecord({Key.CLIENT_ID: client_id}),
            }
        )
        if update.stats is not None:
            content[Key.STATS] = _stats_to_arrays(update.stats)
        return Message(content, reply_to=msg)

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
    state[Key.ROUNDS_TRAINED] = _number(state, Key.ROUNDS_TRAINED, int) + 1
    state[Key.LAST_ROUND] = server_round
    context.state[Key.CLIENT_STATE] = state


_N = TypeVar("_N", int, float)


def _number(record: ConfigRecord, key: str, kind: type[_N]) -> _N:
    """``record[key]`` as an int or float; a missing or non-numeric entry is a malformed message."""
    value = record.get(key)
    allowed = (int,) if kind is int else (int, float)
    if isinstance(value, bool) or not isinstance(value, allowed):
        raise RuntimeError(
            f"Expected entry `{key}` of the message to be {kind.__name__}, but got {value!r}."
            " HINT: run the server with `FedHarmonyStrategy`."
        )
    return kind(value)


def _flag(record: ConfigRecord, key: str) -> bool:
    """``record[key]`` as a bool; a missing or non-bool entry is a malformed message."""
    value = record.get(key)
    if not isinstance(value, bool):
        raise RuntimeError(
            f"Expected entry `{key}` of the message to be bool, but got {value!r}."
            " HINT: run the server with `FedHarmonyStrategy`."
        )
    return value
