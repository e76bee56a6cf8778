"""The server on Flower: :class:`FedHarmonyStrategy` runs the library's aggregators unchanged, with the promises of
:class:`~lightning_fedharmony.orchestrator.Federation` (checkpoints and resume, retries, time limits, one history), and
:func:`make_evaluate_fn` evaluates the global model on the server."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy
from flwr.serverapp.strategy.strategy_utils import log_strategy_start_info
from flwr.supercore import log
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_fedharmony.aggregators.base import Aggregator
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    check_fingerprint,
    check_fingerprint_extra,
    constructor_settings,
    restore_checkpoint,
    save_checkpoint,
)
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
from lightning_fedharmony.orchestrator import FEDERATED_EVAL, FINGERPRINT_VERSION
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError, Update
from lightning_fedharmony.results import FederationResult, RoundRecord, round_record
from lightning_fedharmony.rounds import (
    FederationError,
    check_client_sampling,
    client_seed,
    collect_with_retries,
    complete_instruction,
    evaluate_weights,
    evaluation_clients,
    merge_evaluations,
    select_clients,
)

#: The strategy's own fingerprint entries, which ``fingerprint_extra`` may not use.
_RESERVED_KEYS = frozenset(
    {
        "fingerprint_version",
        "runner",
        "num_rounds",
        "local_epochs",
        "fraction_fit",
        "min_clients",
        "min_available_clients",
        "client_sampling",
        "seed",
        "eval_every",
        "federated_eval",
        "eval_bins",
        "fraction_evaluate",
        "aggregator",
        "aggregator_args",
        "model_arrays",
    }
)


class FedHarmonyStrategy(Strategy):
    """A Flower Strategy that runs any of the library's aggregators (FedAvg, FedProx, FedHarmony) unchanged.

    Each round: ask new nodes for their partition id (a ``query`` message), select clients among the partition ids
    with ``Federation.select_clients``'s seeded rule, build one fresh message per client from
    ``aggregator.configure_round`` (global weights; for FedHarmony that client's teacher and mask), validate the
    replies, hand them to ``aggregator.aggregate_round`` in selection order and return the new global weights.
    Clients train with the seed ``derive_seed(seed, server_round, partition_id)``, as in
    :class:`~lightning_fedharmony.orchestrator.Federation`. After each evaluated round (every ``eval_every``-th and
    the last) every known client gets an ``evaluate`` message with the new global weights and answers with the metric
    state of its held-out split; the server merges the states exactly (as ``Federation`` does), into ``fed_<key>``
    metrics and each client's ``val_<key>`` in the round's record, before the checkpoint. Server-side evaluation on a
    test set runs through ``evaluate_fn`` of :meth:`start` (see :func:`make_evaluate_fn`), on the same rounds.

    :meth:`start` keeps the promises of ``Federation``, with the same meaning: a round with fewer than
    ``min_clients`` usable replies is sent again with fresh client seeds, up to ``round_retries`` times; a client
    that has not replied ``client_timeout`` seconds after its message was sent is recorded as failed; after every
    round the state is checkpointed to ``checkpoint_dir`` in ``Federation``'s format, and a ServerApp started again
    with the same settings continues after the last finished round (to the same weights as a run never stopped).

    The history of the run, in the library's own form, is :attr:`result` (a
    :class:`~lightning_fedharmony.results.FederationResult`, writable with ``to_json``/``to_csv``), the same
    :class:`~lightning_fedharmony.results.RoundRecord` per round as ``Federation`` and ``fedharmony serve`` write;
    a failure is recorded under its client id with the reason and the Flower node it ran on.

    Args:
        aggregator: the server strategy whose ``configure_round`` / ``aggregate_round`` do all the math.
        fraction_fit: share of the clients selected per round.
        min_clients: fewest clients selected, and fewest usable updates for a round to count.
        min_available_clients: nodes to wait for before each round (set it to the number of partitions for the
            same selection as a local ``Federation``).
        local_epochs: epochs each selected client trains per round.
        seed: seeds client selection and each client's training.
        client_sampling: ``"uniform"`` or ``"size"``: clients drawn in proportion to their data size (each node
            reports its ``num_samples`` once, with its partition id); the same rule as ``Federation``'s.
        wait_timeout: seconds to wait for ``min_available_clients`` nodes (and for their partition ids).
        eval_every: evaluate (federated and ``evaluate_fn``) every this many rounds, and always after the last, as
            ``Federation`` does; :meth:`start`'s ``evaluate_fn`` also scores the initial weights (round 0) of a fresh
            run, as Flower's strategies do.
        federated_eval: ``"exact"``, ``"binned"`` (no per-sample score leaves a client) or ``"none"``, as in
            ``Federation``.
        eval_bins: thresholds of the binned average precision.
        fraction_evaluate: share of the known clients asked to evaluate each round (a seeded uniform sample, the same
            as ``Federation``'s); 1: every client.
        checkpoint_dir: after every round, save what is needed to continue there (atomically, ``federation.ckpt``
            as ``Federation`` writes it); :meth:`start` resumes after the last finished round when a checkpoint is
            found. ``None``: no checkpoints.
        round_retries: times a round is sent again (with fresh client seeds) when fewer than ``min_clients`` usable
            updates arrive, before :class:`~lightning_fedharmony.orchestrator.FederationError` ends the run.
        client_timeout: seconds to wait for the replies of a round (each attempt); a client that has not replied by
            then is recorded as failed. ``None``: the ``timeout`` of :meth:`start`.
        fingerprint_extra: what else decides this run's result, as plain values (e.g. the run config's data,
            partition and model entries). It joins the checkpoint's fingerprint, which already holds the strategy's
            settings, the aggregator's class and constructor arguments, the number of rounds and the names and
            shapes of the model's arrays: a checkpoint whose fingerprint differs in any entry is refused.

    Example (a ``ServerApp``)::

        @app.main()
        def main(grid: Grid, context: Context) -> None:
            strategy = FedHarmonyStrategy(FedHarmony(), min_available_clients=10, checkpoint_dir="ckpt")
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
        client_sampling: str = "uniform",
        wait_timeout: float = 600.0,
        eval_every: int = 1,
        federated_eval: str = "exact",
        eval_bins: int = 200,
        fraction_evaluate: float = 1.0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        round_retries: int = 0,
        client_timeout: float | None = None,
        fingerprint_extra: Mapping[str, Any] | None = None,
    ) -> None:
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"Expected argument `aggregator` to be an Aggregator, but got {type(aggregator).__name__}.")
        if not 0.0 < fraction_fit <= 1.0:
            raise ValueError(f"Expected argument `fraction_fit` to be in (0, 1], but got {fraction_fit!r}.")
        for name, value, minimum in (
            ("min_clients", min_clients, 1),
            ("min_available_clients", min_available_clients, 1),
            ("local_epochs", local_epochs, 1),
            ("round_retries", round_retries, 0),
            ("eval_every", eval_every, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"Expected argument `{name}` to be an int >= {minimum}, but got {value!r}.")
        if not wait_timeout > 0:
            raise ValueError(f"Expected argument `wait_timeout` to be > 0, but got {wait_timeout!r}.")
        if client_timeout is not None and not client_timeout > 0:
            raise ValueError(f"Expected argument `client_timeout` to be None or > 0, but got {client_timeout!r}.")
        if federated_eval not in FEDERATED_EVAL:
            raise ValueError(
                f"Expected argument `federated_eval` to be one of {FEDERATED_EVAL}, but got {federated_eval!r}."
            )
        check_bins(eval_bins)
        if checkpoint_dir is not None and aggregator.relies_on_client_state:
            raise ValueError(
                f"Expected an aggregator whose state the server holds alone with `checkpoint_dir`, but"
                f" {type(aggregator).__name__} keeps part of it on the clients"
                " (FedHarmony(leave_one_out='client'): each"
                " node's own term in the consensus sums), and a Flower run started again gives every node a fresh"
                " state. HINT: use FedHarmony(leave_one_out='server') (the default) for Flower runs that resume."
            )
        self.aggregator = aggregator
        self.fraction_fit = float(fraction_fit)
        self.min_clients = min_clients
        self.min_available_clients = min_available_clients
        self.local_epochs = local_epochs
        self.seed = seed
        self.client_sampling = check_client_sampling(client_sampling)
        self.wait_timeout = float(wait_timeout)
        self.eval_every = eval_every
        self.federated_eval = federated_eval
        self.eval_bins = eval_bins
        if isinstance(fraction_evaluate, bool) or not 0.0 < fraction_evaluate <= 1.0:
            raise ValueError(f"Expected argument `fraction_evaluate` to be in (0, 1], but got {fraction_evaluate!r}.")
        self.fraction_evaluate = float(fraction_evaluate)
        self.checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        self.round_retries = round_retries
        self.client_timeout = None if client_timeout is None else float(client_timeout)
        self.fingerprint_extra = check_fingerprint_extra(fingerprint_extra, _RESERVED_KEYS)
        self.result = FederationResult()
        self.num_rounds: int | None = None  # set by `start`
        self._model_arrays: dict[str, list[int]] = {}  # name -> shape of the model's arrays, set by `start`
        self._node_of: dict[str, int] = {}  # client id -> node id
        self._size_of: dict[str, int] = {}  # client id -> data size (size sampling)
        self._global: dict[str, Tensor] = {}
        self._arrays = ArrayRecord()  # the round's input, as sent
        self._config = ConfigRecord()
        self._instructions: dict[str, Instruction] = {}
        self._pending: dict[int, str] = {}  # node id -> client id, for the round in flight
        self._eval_pending: dict[int, str] = {}  # node id -> client id, for the evaluation in flight
        self._eval_started = 0.0
        self._selected: list[str] = []
        self._round_started = 0.0
        self._replies_in = 0.0

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
            "\t├──> Sampling: %s, fraction_fit %.2f, min_clients %d, min_available_clients %d, seed %d",
            self.client_sampling,
            self.fraction_fit,
            self.min_clients,
            self.min_available_clients,
            self.seed,
        )
        log(INFO, "\t├──> Retries %d, client timeout %s", self.round_retries, self.client_timeout)
        log(INFO, "\t├──> Federated evaluation: %s, every %d rounds", self.federated_eval, self.eval_every)
        log(INFO, "\t├──> Checkpoint: %s", self.checkpoint_path)
        log(INFO, "\t└──> Local epochs: %d", self.local_epochs)

    # ------------------------------------------------------------------ the loop
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
        """Run the rounds of Flower's loop that are left, with checkpoints, retries and time limits.

        The aggregator is set up for ``num_rounds`` first; with a checkpoint in ``checkpoint_dir`` the run continues
        after its last finished round (the global weights, the aggregator's state and the history come from it, and
        ``initial_arrays`` only name the model's arrays). ``timeout`` bounds the wait for replies when
        ``client_timeout`` is ``None``.

        Raises:
            CheckpointMismatchError: the checkpoint was written by a run with other settings (names the setting).
            CheckpointError: the checkpoint is damaged or does not fit (one line, with a HINT).
            FederationError: a round got fewer than ``min_clients`` usable updates in every attempt; the checkpoint
                keeps the last finished round.
        """
        if isinstance(num_rounds, bool) or not isinstance(num_rounds, int) or num_rounds < 1:
            raise ValueError(f"Expected argument `num_rounds` to be an int >= 1, but got {num_rounds!r}.")
        log(INFO, "Starting %s strategy:", type(self).__name__)
        log_strategy_start_info(num_rounds, initial_arrays, train_config, evaluate_config)
        self.summary()
        log(INFO, "")
        train_config = ConfigRecord() if train_config is None else train_config
        evaluate_config = ConfigRecord() if evaluate_config is None else evaluate_config
        self.num_rounds = num_rounds
        self.aggregator.setup(num_rounds, self.local_epochs)
        self.result = FederationResult(config={"num_rounds": num_rounds, "aggregator": type(self.aggregator).__name__})
        self._global = arrays_to_weights(initial_arrays)
        self._model_arrays = {name: list(tensor.shape) for name, tensor in self._global.items()}
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.restore(self.checkpoint_path)
        result = Result()
        arrays = initial_arrays if not self.result.rounds else weights_to_arrays(self._global)
        result.arrays = arrays
        if evaluate_fn is not None and not self.result.rounds:
            metrics = evaluate_fn(0, arrays)
            log(INFO, "Initial global evaluation results: %s", metrics)
            if metrics is not None:
                result.evaluate_metrics_serverapp[0] = metrics
        for server_round in range(len(self.result.rounds) + 1, num_rounds + 1):
            log(INFO, "")
            log(INFO, "[ROUND %s/%s]", server_round, num_rounds)
            arrays, train_metrics = self.train_round(grid, server_round, arrays, train_config, timeout)
            result.arrays = arrays
            log(INFO, "\t└──> Aggregated MetricRecord: %s", train_metrics)
            result.train_metrics_clientapp[server_round] = train_metrics
            if server_round % self.eval_every == 0 or server_round == num_rounds:
                messages = list(self.configure_evaluate(server_round, arrays, evaluate_config, grid))
                if messages:
                    replies = grid.send_and_receive(messages, timeout=self._reply_timeout(timeout))
                    evaluated = self.aggregate_evaluate(server_round, replies)
                    if evaluated is not None:
                        result.evaluate_metrics_clientapp[server_round] = evaluated
                if evaluate_fn is not None:
                    metrics = self._evaluate(evaluate_fn, server_round, arrays)
                    log(INFO, "Global evaluation\n\t└──> MetricRecord: %s", metrics)
                    if metrics is not None:
                        result.evaluate_metrics_serverapp[server_round] = metrics
            if self.checkpoint_path is not None:
                self.save()
        return result

    def train_round(
        self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord, timeout: float = 3600
    ) -> tuple[ArrayRecord, MetricRecord]:
        """One training round: send, collect (again with fresh seeds while too few updates are usable), aggregate.

        Raises:
            FederationError: fewer than ``min_clients`` usable updates in each of ``round_retries + 1`` attempts.
        """
        first = list(self.configure_train(server_round, arrays, config, grid))
        wait = self._reply_timeout(timeout)

        def collect(attempt: int) -> UpdateCollector:
            messages = first if attempt == 0 else self.train_messages(server_round, attempt)
            replies = grid.send_and_receive(messages, timeout=wait)
            return self.collect_replies(server_round, replies, waited=self.client_timeout)

        where = "" if self.checkpoint_path is None else f" ({os.fspath(self.checkpoint_path)})"
        collected, attempts = collect_with_retries(
            collect,
            server_round,
            len(self._selected),
            min_clients=self.min_clients,
            round_retries=self.round_retries,
            kept=f" The checkpoint{where} keeps the model of round {server_round - 1}.",
        )
        return self._aggregate(server_round, collected, attempts)

    def _reply_timeout(self, timeout: float) -> float:
        return self.client_timeout if self.client_timeout is not None else timeout

    def _evaluate(
        self, evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None], server_round: int, arrays: ArrayRecord
    ) -> MetricRecord | None:
        """Server-side evaluation, recorded in the round's :attr:`RoundRecord.metrics` and its ``eval`` seconds."""
        started = time.perf_counter()
        metrics = evaluate_fn(server_round, arrays)
        if metrics is not None and self.result.rounds:
            record = self.result.rounds[-1]
            # update, not replace: the federated metrics of aggregate_evaluate are already there
            record.metrics.update(
                {library_name(k): float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            )
            _add_seconds(record, "eval", time.perf_counter() - started)
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def _fingerprint(self) -> dict[str, Any]:
        """What decides the run's result, as ``Federation`` records it: the caller's ``fingerprint_extra`` first,
        then the strategy's settings and the model's array names and shapes."""
        aggregator_cls = type(self.aggregator)
        return {
            "fingerprint_version": FINGERPRINT_VERSION,
            "runner": "flower",
            **self.fingerprint_extra,
            "num_rounds": self.num_rounds,
            "local_epochs": self.local_epochs,
            "fraction_fit": self.fraction_fit,
            "min_clients": self.min_clients,
            "min_available_clients": self.min_available_clients,
            "client_sampling": self.client_sampling,
            "seed": self.seed,
            "eval_every": self.eval_every,
            "federated_eval": self.federated_eval,
            "eval_bins": self.eval_bins,
            "fraction_evaluate": self.fraction_evaluate,
            "aggregator": f"{aggregator_cls.__module__}.{aggregator_cls.__qualname__}",
            "aggregator_args": constructor_settings(self.aggregator),
            "model_arrays": dict(self._model_arrays),
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished round, as ``Federation.state_dict`` holds it."""
        return {
            "server_round": len(self.result.rounds),
            "global_weights": dict(self._global),
            "aggregator": self.aggregator.state_dict(),
            "history": self.result.to_dict(),
            "fingerprint": self._fingerprint(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the run's settings must match the saved ones.

        Raises:
            CheckpointMismatchError: naming the first setting (dotted key) whose saved value differs.
        """
        check_fingerprint(state["fingerprint"], self._fingerprint())
        weights = state["global_weights"]
        if not isinstance(weights, Mapping) or not all(isinstance(v, Tensor) for v in weights.values()):
            raise TypeError(f"Expected `global_weights` to map names to tensors, but got {type(weights).__name__}.")
        self.aggregator.load_state_dict(state["aggregator"])
        self.result = FederationResult.from_dict(state["history"])
        self._global = dict(weights)

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the run's state atomically (default: ``checkpoint_dir``)."""
        target = path if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("Expected a path or a `checkpoint_dir` to save the strategy to, but got neither.")
        return save_checkpoint(target, self.state_dict())

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint written by :meth:`save` (call after ``aggregator.setup``, as :meth:`start`).

        Raises:
            CheckpointError: the file cannot be read, or its content does not fit this run (one line, with a HINT).
            CheckpointMismatchError: the checkpoint was written by another setup (names the setting and the file).
        """
        restore_checkpoint(path, self.load_state_dict)
        log(INFO, "Resumed from %s after round %d", os.fspath(path), len(self.result.rounds))

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
            ask = ConfigRecord({Key.REPORT_NUM_EXAMPLES: True}) if self.client_sampling == "size" else ConfigRecord()
            queries = [
                Message(RecordDict({Key.CONFIG: ask}), dst_node_id=node, message_type=MessageType.QUERY)
                for node in unknown
            ]
            for reply in grid.send_and_receive(queries, timeout=self.wait_timeout):
                node = reply.metadata.src_node_id
                if reply.has_error():
                    log(WARNING, "Node %d did not report its partition id: %s", node, reply.error.reason)
                    continue
                cid = _reply_client_id(reply.content, f"node-{node}")
                if self.client_sampling == "size":
                    self._size_of[cid] = _reply_num_examples(reply.content, cid)
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
        self._arrays, self._config = arrays, config
        client_ids = self.discover_clients(grid)
        if len(client_ids) < self.min_clients:
            raise FederationError(
                f"Round {server_round}: {len(client_ids)} clients reported their partition id, fewer than"
                f" `min_clients`={self.min_clients}."
            )
        self._selected = select_clients(
            client_ids,
            server_round,
            fraction_fit=self.fraction_fit,
            min_clients=self.min_clients,
            seed=self.seed,
            client_sampling=self.client_sampling,
            sizes=[self._size_of[cid] for cid in client_ids] if self.client_sampling == "size" else None,
        )
        self._instructions = self.aggregator.configure_round(server_round, self._selected, self._global)
        log(INFO, "configure_train: %d of %d clients: %s", len(self._selected), len(client_ids), self._selected)
        return self.train_messages(server_round)

    def train_messages(self, server_round: int, attempt: int = 0) -> list[Message]:
        """The round's messages to the selected clients for ``attempt`` (each retry with fresh client seeds, as in
        ``Federation``), after :meth:`configure_train`."""
        self._pending = {}
        messages = []
        for cid in self._selected:
            node = self._node_of[cid]
            instr = complete_instruction(
                self._instructions[cid],
                cid,
                server_round=server_round,
                local_epochs=self.local_epochs,
                seed=client_seed(self.seed, server_round, _client_index(cid), attempt),
                collect_stats=self.collect_stats,
            )
            # the global weights are the same for every client: serialise them once (records are read-only on send)
            same = instr.weights.keys() == self._global.keys() and all(
                instr.weights[k] is self._global[k] for k in self._global
            )
            content = instruction_to_records(instr, cid, arrays=self._arrays if same else None, config=self._config)
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
        if self.collect_stats and update.stats is None and update.term is None:
            raise ProtocolError(
                client_id,
                Key.STATS,
                f"expected an ArrayRecord `{Key.STATS}` with the prediction statistics, but found none."
                " HINT: build the ClientApp with `make_client_app` and a model with FedHarmonyMixin.",
            )
        loss = update.metrics.get("train_loss", float("nan"))
        setup = update.metrics.get("trainer_setup_seconds", 0.0)
        return update, loss, setup

    def collect_replies(
        self, server_round: int, replies: Iterable[Message], waited: float | None = None
    ) -> UpdateCollector:
        """Read one attempt's replies and screen the updates as ``Federation`` does.

        A client whose ClientApp failed, whose reply is not a valid update (:meth:`parse_reply` raises
        :class:`ProtocolError`), whose weights are not finite, or that did not reply (within ``waited`` seconds) is
        a failure of the round, recorded with the reason and its node.

        Raises:
            ProtocolError: a client that sent more than one reply this round.
        """
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
                failures[cid] = f"ClientAppError: {_error_reason(reply.error.reason)}"
                continue
            try:
                by_client[cid] = self.parse_reply(reply, cid)
            except ProtocolError as err:
                failures[cid] = f"rejected update: {err}"
                log(WARNING, "Round %d: %s", server_round, err)
        collected = UpdateCollector(self._global)
        for cid, reason in failures.items():
            collected.fail(cid, reason)
        missing = "no reply" if waited is None else f"no reply within client_timeout={waited:g} s"
        for cid in self._selected:  # selection order, as in Federation: the same sums in the same order
            if cid not in by_client:
                collected.failures.setdefault(cid, missing)
                continue
            collected.add(*by_client[cid])
        # which node each failed client ran on: node ids change when a SuperNode restarts
        collected.failures = {
            cid: f"{reason} (node {self._node_of[cid]})" if cid in self._node_of else reason
            for cid, reason in collected.failures.items()
        }
        if collected.failures:
            log(WARNING, "Round %d failures: %s", server_round, collected.failures)
        self._replies_in = time.perf_counter()
        return collected

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Read the replies (:meth:`collect_replies`), then ``aggregator.aggregate_round`` (one attempt; :meth:`start`
        retries through :meth:`train_round`).

        Raises:
            ProtocolError: a client that sent more than one reply this round.
            FederationError: fewer than ``min_clients`` usable updates.
        """
        collected, attempts = collect_with_retries(
            lambda attempt: self.collect_replies(server_round, replies),
            server_round,
            len(self._selected),
            min_clients=self.min_clients,
            round_retries=0,
        )
        return self._aggregate(server_round, collected, attempts)

    def _aggregate(
        self, server_round: int, collected: UpdateCollector, attempts: int
    ) -> tuple[ArrayRecord, MetricRecord]:
        aggregated = self.aggregator.aggregate_round(server_round, collected.updates, self._global)
        self._global = aggregated.weights
        t_end = time.perf_counter()
        record = round_record(
            server_round,
            self._selected,
            collected,
            aggregated,
            metrics={},
            times=(self._round_started, self._replies_in, t_end, t_end),
            attempts=attempts,
        )
        self.result.rounds.append(record)
        metrics = MetricRecord(
            {
                Key.TRAIN_LOSS: record.train_loss,
                "num-clients": len(self._selected),
                "num-failures": len(record.failures),
                "attempts": attempts,
                **{wire_name(k): float(v) for k, v in aggregated.metrics.items()},
            }
        )
        return weights_to_arrays(aggregated.weights), metrics

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Federated evaluation: one ``evaluate`` message with the new global weights per known client, or per client
        of the round's ``fraction_evaluate`` sample (none with ``federated_eval="none"``)."""
        self._eval_pending = {}
        self._eval_started = time.perf_counter()
        if self.federated_eval == "none":
            return []
        request = Instruction(weights=self._global, server_round=server_round, eval_bins=self._bins)
        messages = []
        known = sorted(self._node_of, key=_client_order)
        for cid in evaluation_clients(known, server_round, self.fraction_evaluate, self.seed):
            node = self._node_of[cid]
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
                failures[cid] = f"ClientAppError: {_error_reason(reply.error.reason)}"
                continue
            try:
                evaluations[cid] = evaluation_from_records(reply.content, cid, self._bins)
            except ProtocolError as err:
                failures[cid] = f"rejected evaluation: {err}"
        waited = self.client_timeout
        missing = "no reply" if waited is None else f"no reply within client_timeout={waited:g} s"
        failures.update({cid: missing for cid in self._eval_pending.values() if cid not in evaluations})
        failures = {cid: reason for cid, reason in failures.items() if cid not in evaluations}
        ordered = [evaluations[cid] for cid in sorted(evaluations, key=_client_order)]
        federated, own = merge_evaluations(ordered, self._bins)
        if self.result.rounds and self.result.rounds[-1].server_round == server_round:
            record = self.result.rounds[-1]
            record.metrics.update(federated)
            record.eval_failures = failures
            for cid, values in own.items():
                record.client_metrics.setdefault(cid, {}).update(values)
            _add_seconds(record, "eval", time.perf_counter() - self._eval_started)
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


def _add_seconds(record: RoundRecord, phase: str, seconds: float) -> None:
    """Count ``seconds`` of a phase that ran after the record was built in it and in the round's total."""
    for key in (phase, "total"):
        record.seconds[key] = record.seconds.get(key, 0.0) + seconds


def _error_reason(reason: str | None) -> str:
    """A ClientApp's error on one line: the simulation engine wraps the exception's message in Ray's traceback."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(reason)).split())
    if _APP_MESSAGE in text:
        text = text.rsplit(_APP_MESSAGE, 1)[1].rstrip("'\">")
    return text


_APP_MESSAGE = "occurred. Message: "


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


def _reply_num_examples(content: RecordDict, client_id: str) -> int:
    value = content.config_records[Key.CLIENT].get(Key.NUM_EXAMPLES)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ProtocolError(
            client_id,
            f"{Key.CLIENT}.{Key.NUM_EXAMPLES}",
            f"expected the node's data size (an int >= 0) for sampling clients by size, but got {value!r}."
            " HINT: build the ClientApp with `make_client_app`.",
        )
    return value
