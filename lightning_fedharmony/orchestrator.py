"""A lightweight federation on one machine: Lightning Trainers as clients, an aggregator between rounds."""

from __future__ import annotations

import contextlib
import copy
import ctypes
import ctypes.util
import functools
import gc
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader

from lightning_fedharmony.aggregators.base import Aggregator, RoundAggregation
from lightning_fedharmony.checkpoint import (
    CHECKPOINT_NAME,
    CLIENT_LOG_NAME,
    CLIENT_STATE_NAME,
    append_client_log,
    check_fingerprint,
    check_fingerprint_extra,
    constructor_settings,
    plain_items,
    restore_checkpoint,
    save_checkpoint,
    sweep_client_states,
    write_client_states,
)
from lightning_fedharmony.client import (  # noqa: F401 - re-exported: their home was here
    CLIENT_TRAINER_DEFAULTS,
    quiet_lightning,
    train_client,
)
from lightning_fedharmony.client_terms import ConsensusMemory
from lightning_fedharmony.exchange import check_client_id
from lightning_fedharmony.faults import UpdateCollector
from lightning_fedharmony.metrics import check_bins
from lightning_fedharmony.mixin import FedHarmonyMixin, load_model_weights, model_weights
from lightning_fedharmony.privacy import check_privacy_args
from lightning_fedharmony.protocol import Instruction
from lightning_fedharmony.results import (  # noqa: F401 - re-exported: their home was here
    CLIENT_FIELDS,
    FederationResult,
    RoundRecord,
    client_round_metrics,
    label_name,
    named_pairs,
    round_record,
)
from lightning_fedharmony.rounds import (  # noqa: F401 - FederationError, client_val_loader, derive_seed re-exported
    FEDERATED_EVAL,
    FederationError,
    check_client_sampling,
    check_client_sizes,
    client_seed,
    client_val_loader,
    collect_with_retries,
    complete_instruction,
    derive_seed,
    evaluate_weights,
    evaluation_clients,
    merge_evaluations,
    select_clients,
)
from lightning_fedharmony.transports.base import Transport
from lightning_fedharmony.transports.memory import InMemoryTransport

log = logging.getLogger(__name__)

#: Layout of :meth:`Federation._fingerprint`; checkpoints with an older one cannot show which run wrote them.
FINGERPRINT_VERSION = 2


class _ProgressHandler(logging.StreamHandler):
    """Plain lines to ``stream``, or to whatever ``sys.stdout`` is when the line is written (pytest and notebooks
    replace it)."""

    def __init__(self, stream: TextIO | None) -> None:
        super().__init__(stream or sys.stdout)
        self._target = stream
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = self._target or sys.stdout
        super().emit(record)


class Federation:
    """Federated training on one machine: each round, selected clients train with a Lightning Trainer.

    Round ``t``: select clients (all, or ``fraction_fit`` of them but at least ``min_clients``, seeded), get each
    one's instructions from ``aggregator.configure_round`` (global weights, and for FedHarmony its teacher and
    alignment mask), fit it for ``local_epochs`` with a fresh Trainer built from one template, collect the updates
    (weights, sample count, correlation statistics exported by :class:`~lightning_fedharmony.CorrelationExchange`),
    ``aggregator.aggregate_round``, then evaluate the new global model: on the server's ``eval_dataloader`` if given,
    and by federated evaluation: every client gets an evaluation request with the new global weights (through the
    transport, as its instructions) and answers with the :class:`~lightning_fedharmony.metrics.MultilabelReport` state
    of its held-out split (its datamodule's ``val_dataloader``, e.g.
    :class:`~lightning_fedharmony.data.ClientDataModule` with ``val_fraction > 0``); the server merges the states
    exactly, so the federated metrics (``fed_<key>`` in :attr:`RoundRecord.metrics`) equal one pass over the union
    of the clients' held-out data, and each client's own (``val_<key>``) join its entry of
    :attr:`RoundRecord.client_metrics`. Evaluation happens in the round whose model it measures, before the
    checkpoint, so every checkpointed record is complete and the last round's record holds the final model's
    federated metrics.

    One module instance serves every client in turn (weights are loaded before each fit), so memory does not grow
    with the number of clients. A round's work grows with the clients it selects, not with the registered ones: the
    client order, indices and sizes are read once, here, so a population of 10,000 clients with 1% per round costs
    what its 100 fits cost (``benchmarks/memory.py --population``). The module's ``forward(x)`` must return logits
    ``(N, L)``.

    Args:
        model: the LightningModule to federate (mix in :class:`~lightning_fedharmony.FedHarmonyMixin` for FedProx
            and FedHarmony). Its current weights are the round-0 global model.
        clients: one LightningDataModule per client, as a sequence (ids ``"0"``, ``"1"``, ...) or a mapping
            id -> datamodule; with a remote ``transport``, the client ids alone (a sequence of str).
        aggregator: the server strategy (:class:`~lightning_fedharmony.FedAvg`, ``FedProx``, ``FedHarmony``).
        num_rounds: number of rounds.
        transport: how instructions reach the clients and updates come back: ``None`` trains the datamodules here
            (:class:`~lightning_fedharmony.transports.InMemoryTransport`);
            :class:`~lightning_fedharmony.transports.FolderTransport` sends them to other processes (``fedharmony
            serve``). Everything else (selection, retries, aggregation, evaluation, checkpoints) is the same.
        local_epochs: epochs each selected client trains per round.
        fraction_fit: share of clients selected per round.
        min_clients: fewest clients selected, and fewest usable updates for a round to count.
        client_sampling: how a round's clients are drawn when not all train: ``"uniform"`` (each equally likely) or
            ``"size"`` (in proportion to their data size, without replacement, as in the paper's FLAIR setting; see
            :func:`~lightning_fedharmony.rounds.select_clients`). Seeded by ``seed`` and the round either way, and
            the same rule as the Flower strategy's.
        client_sizes: client id -> data size for ``client_sampling="size"`` (default: each datamodule's
            ``num_samples``); needed with a remote ``transport``, whose clients' datamodules live elsewhere.
        seed: seeds client selection and each client's training (``torch.manual_seed`` per fit).
        eval_dataloader: held-out data ``(x, y)`` batches for the global model; ``None`` skips evaluation.
        eval_every: evaluate every this many rounds (and always after the last).
        federated_eval: ``"exact"`` (clients send their held-out scores and targets: exact AP), ``"binned"`` (clients
            send counts over ``eval_bins`` score thresholds: no per-sample score leaves a client; AP is then an
            approximation, see the README) or ``"none"``.
        eval_bins: thresholds of the binned average precision (``federated_eval="binned"``).
        fraction_evaluate: share of the clients asked to evaluate each evaluated round (a seeded uniform sample, at
            least one; :func:`~lightning_fedharmony.rounds.evaluation_clients`): the federated metrics then cover
            the held-out data of that sample. 1: every client.
        trainer_kwargs: overrides of the client Trainer template (:data:`CLIENT_TRAINER_DEFAULTS`); ``max_epochs``
            is ``local_epochs``. ``callbacks`` (one or a list) join every client's Trainer, the same instances in
            each, so a stateful one (``EarlyStopping``) carries its state from client to client; a
            ``ModelCheckpoint`` also needs ``enable_checkpointing=True``.
        checkpoint_dir: after every round, save what is needed to continue there (atomically); :meth:`fit` resumes
            after the last finished round when a checkpoint is found. ``None``: no checkpoints.
        client_timeout: seconds a client may train per round before it is stopped and recorded as failed (with a
            folder transport: seconds to answer after its instruction was written).
        round_retries: times a round is retried (with fresh client seeds) when fewer than ``min_clients`` usable
            updates arrive, before :class:`FederationError` ends the run.
        stats_noise_multiplier: Gaussian noise on each client's exported statistics, in units of their sensitivity
            (0 = off); see :mod:`lightning_fedharmony.privacy`.
        stats_clip: per-sample L2 bound of the prediction vectors in the statistics (``None``: ``sqrt(L)``).
        label_names: the ``L`` label names, to name the label pairs in :attr:`RoundRecord.client_pairs` (``None``:
            ``label_<i>``).
        fingerprint_extra: what else decides this run's result, as plain values (str-keyed mappings, lists, str,
            numbers, bool, None): e.g. the data, partition and model configuration (``fedharmony run`` passes its
            ``data``, ``partition``, ``model``, ``methods.<name>``, ``trainer`` and ``federation.batch_size``
            sections). It joins the checkpoint's fingerprint, which already holds the federation's settings, the
            aggregator's constructor arguments, the model's class and hyperparameters and the clients' sample counts:
            a checkpoint whose fingerprint differs in any entry is refused rather than resumed.
        num_threads: torch's intra-op threads while the federation runs (put back afterwards; ``None``: leave torch's
            setting). One thread by default: client models are small, and torch's default of one thread per core
            oversubscribes a machine that runs anything else (``examples/two_line_change/federate.py`` on 2 cores
            with one other busy process: 0.47-0.89 s per round with the default, 0.14-0.15 s with one thread).
        verbose: print one progress line per round (and the resume line) to ``stream``. The lines always go through
            the ``logging`` logger of this module (level INFO); with ``verbose`` a plain handler prints them for the
            length of :meth:`fit` (or of a :meth:`run_round` called alone) and keeps them from your own handlers, so
            nothing prints twice; ``verbose=False`` leaves them to your logging configuration.
        stream: where progress lines go (``None``: ``sys.stdout`` at the time of the line).
    """

    def __init__(
        self,
        model: pl.LightningModule,
        clients: Sequence[pl.LightningDataModule] | Sequence[str] | Mapping[str, pl.LightningDataModule | None],
        aggregator: Aggregator,
        num_rounds: int = 10,
        *,
        transport: Transport | None = None,
        local_epochs: int = 1,
        fraction_fit: float = 1.0,
        min_clients: int = 1,
        client_sampling: str = "uniform",
        client_sizes: Mapping[str, int] | None = None,
        seed: int = 0,
        eval_dataloader: DataLoader | None = None,
        eval_every: int = 1,
        federated_eval: str = "exact",
        eval_bins: int = 200,
        fraction_evaluate: float = 1.0,
        trainer_kwargs: Mapping[str, Any] | None = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        client_timeout: float | None = None,
        round_retries: int = 0,
        stats_noise_multiplier: float = 0.0,
        stats_clip: float | None = None,
        label_names: Sequence[str] | None = None,
        fingerprint_extra: Mapping[str, Any] | None = None,
        num_threads: int | None = 1,
        verbose: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.clients: dict[str, pl.LightningDataModule | None]
        if isinstance(clients, Mapping):
            self.clients = dict(clients)
        elif all(isinstance(c, str) for c in clients):  # ids of remote clients
            self.clients = {check_client_id(str(c)): None for c in clients}
        else:
            self.clients = {str(i): dm for i, dm in enumerate(clients) if isinstance(dm, pl.LightningDataModule)}
            if len(self.clients) != len(clients):
                raise TypeError("Expected argument `clients` to hold only LightningDataModules or only client ids.")
        _check_int("num_rounds", num_rounds, 1)
        _check_int("local_epochs", local_epochs, 1)
        _check_int("eval_every", eval_every, 1)
        if federated_eval not in FEDERATED_EVAL:
            raise ValueError(
                f"Expected argument `federated_eval` to be one of {FEDERATED_EVAL}, but got {federated_eval!r}."
            )
        check_bins(eval_bins)
        if isinstance(fraction_evaluate, bool) or not 0.0 < fraction_evaluate <= 1.0:
            raise ValueError(f"Expected argument `fraction_evaluate` to be in (0, 1], but got {fraction_evaluate!r}.")
        _check_int("min_clients", min_clients, 1)
        _check_int("round_retries", round_retries, 0)
        if client_timeout is not None and not client_timeout > 0:
            raise ValueError(f"Expected argument `client_timeout` to be None or > 0, but got {client_timeout!r}.")
        if not self.clients:
            raise ValueError("Expected argument `clients` to hold at least one datamodule, but it is empty.")
        if min_clients > len(self.clients):
            raise ValueError(
                f"Expected argument `min_clients` to be at most the number of clients ({len(self.clients)}),"
                f" but got {min_clients}."
            )
        if not 0.0 < fraction_fit <= 1.0:
            raise ValueError(f"Expected argument `fraction_fit` to be in (0, 1], but got {fraction_fit!r}.")
        if label_names is not None and (
            isinstance(label_names, str) or not all(isinstance(name, str) for name in label_names)
        ):
            raise TypeError(
                f"Expected argument `label_names` to be None or a sequence of str, but got {label_names!r}."
            )
        if not isinstance(aggregator, Aggregator):
            raise TypeError(f"Expected argument `aggregator` to be an Aggregator, but got {type(aggregator).__name__}.")
        self.transport = transport if transport is not None else InMemoryTransport()
        if not isinstance(self.transport, Transport):
            raise TypeError(f"Expected argument `transport` to be a Transport, but got {type(transport).__name__}.")
        if not self.transport.remote:
            local = [cid for cid, dm in self.clients.items() if not isinstance(dm, pl.LightningDataModule)]
            if local:
                raise TypeError(
                    f"Expected argument `clients` to hold LightningDataModules for clients trained in this process,"
                    f" but client {local[0]!r} is {type(self.clients[local[0]]).__name__}. HINT: pass client ids only"
                    " with a remote transport such as `FolderTransport`."
                )
        needs_mixin = aggregator.requires_mixin or (getattr(aggregator, "proximal_mu", 0) or 0) > 0
        if needs_mixin and not isinstance(model, FedHarmonyMixin):
            raise TypeError(
                f"Expected a model with FedHarmonyMixin for {type(aggregator).__name__}, but got"
                f" {type(model).__name__}."
                " HINT: declare `class MyModel(FedHarmonyMixin, L.LightningModule)` and compute the loss with"
                " `self.fedharmony_loss`."
            )
        self.model = model
        self.aggregator = aggregator
        self.num_rounds = num_rounds
        self.local_epochs = local_epochs
        self.fraction_fit = fraction_fit
        self.min_clients = min_clients
        self.client_sampling = check_client_sampling(client_sampling)
        # read once: a round then touches only the clients it selects (10,000 registered, 100 per round)
        self._client_ids = list(self.clients)
        self._client_index = {cid: i for i, cid in enumerate(self._client_ids)}
        self._client_samples = {
            cid: n
            for cid, n in ((cid, getattr(dm, "num_samples", None)) for cid, dm in self.clients.items())
            if isinstance(n, int) and not isinstance(n, bool)
        }
        self.client_sizes = None if client_sizes is None else dict(client_sizes)
        self._sizes = self._sampling_sizes() if client_sampling == "size" else None
        self.seed = seed
        self.eval_dataloader = eval_dataloader
        self.eval_every = eval_every
        self.federated_eval = federated_eval
        self.eval_bins = eval_bins
        self.fraction_evaluate = float(fraction_evaluate)
        self.trainer_kwargs = {**CLIENT_TRAINER_DEFAULTS, **dict(trainer_kwargs or {}), "max_epochs": local_epochs}
        self.verbose = verbose
        self.stream = stream
        self.global_weights = model_weights(model)
        self.checkpoint_path = None if checkpoint_dir is None else Path(checkpoint_dir) / CHECKPOINT_NAME
        self.client_timeout = client_timeout
        self.round_retries = round_retries
        check_privacy_args(stats_noise_multiplier, stats_clip)
        self.stats_noise_multiplier = stats_noise_multiplier
        self.stats_clip = stats_clip
        self.label_names = None if label_names is None else list(label_names)
        self.fingerprint_extra = check_fingerprint_extra(fingerprint_extra, _RESERVED_KEYS)
        self.result = FederationResult()
        #: what the clients trained here keep of their terms in a sums-only server's consensus (FedHarmony
        #: ``leave_one_out="client"``): client state, which lives here because the clients do
        self.client_memory: dict[str, ConsensusMemory] = {}
        self._memory_touched: set[str] = set()  # handed out since the last checkpoint
        self._sweep_client_state = True  # the first checkpoint of a start or a resume clears what it no longer counts
        self._last_gc, self._gc_seconds = 0.0, 0.0
        self._aggregation: RoundAggregation | None = None
        self._printing = False
        if num_threads is not None:
            _check_int("num_threads", num_threads, 1)
        self.num_threads = num_threads

    def _sampling_sizes(self) -> np.ndarray:
        """The clients' data sizes in client order, for ``client_sampling="size"``."""
        sizes = self._client_samples if self.client_sizes is None else self.client_sizes
        missing = [cid for cid in self._client_ids if cid not in sizes]
        if missing:
            raise ValueError(
                f"Expected a data size for every client with `client_sampling='size'`, but client {missing[0]!r} has"
                " none. HINT: give each client a datamodule with `num_samples`, or pass `client_sizes` (client id ->"
                " data size), as a remote transport requires."
            )
        return check_client_sizes([sizes[cid] for cid in self._client_ids], len(self._client_ids))

    # ------------------------------------------------------------------ the loop
    def fit(self) -> FederationResult:
        """Run every remaining round and return the history (resuming from ``checkpoint_dir`` when possible)."""
        with self._threads(), self._progress_output():
            self.aggregator.setup(self.num_rounds, self.local_epochs)
            if self.checkpoint_path is not None and self.checkpoint_path.exists() and not self.result.rounds:
                self.restore(self.checkpoint_path)
            start = len(self.result.rounds) + 1
            for server_round in range(start, self.num_rounds + 1):
                self.run_round(server_round)
            self.transport.finish(self)
        return self.result

    @contextlib.contextmanager
    def _threads(self) -> Iterator[None]:
        """torch's intra-op threads set to ``num_threads`` while the federation runs, then put back."""
        previous = torch.get_num_threads()
        if self.num_threads is not None:
            torch.set_num_threads(self.num_threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    @contextlib.contextmanager
    def _progress_output(self) -> Iterator[None]:
        """With ``verbose``, print this module's log lines plainly to ``stream`` (once, even when nested)."""
        if not self.verbose or self._printing:
            yield
            return
        handler = _ProgressHandler(self.stream)
        propagate, level = log.propagate, log.level
        log.addHandler(handler)
        log.propagate = False
        if log.getEffectiveLevel() > logging.INFO:
            log.setLevel(logging.INFO)
        self._printing = True
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.propagate, self._printing = propagate, False
            log.setLevel(level)

    # ------------------------------------------------------------------ checkpoints
    def _check_fingerprint(self, state: Mapping[str, Any]) -> None:
        check_fingerprint(state["fingerprint"], self._fingerprint())

    def _fingerprint(self) -> dict[str, Any]:
        """Everything known to decide the result: the caller's ``fingerprint_extra`` first (it names the settings
        as the user wrote them), then what the federation sees itself."""
        model_cls, aggregator_cls = type(self.model), type(self.aggregator)
        hparams = getattr(self.model, "hparams", None)
        return {
            "fingerprint_version": FINGERPRINT_VERSION,
            **self.fingerprint_extra,
            # settings before what follows from them (the sample counts follow from the seed and the partition),
            # so that the first difference named is the one the user changed
            "num_rounds": self.num_rounds,
            "local_epochs": self.local_epochs,
            "fraction_fit": self.fraction_fit,
            "min_clients": self.min_clients,
            "client_sampling": self.client_sampling,
            "eval_every": self.eval_every,
            "federated_eval": self.federated_eval,
            "eval_bins": self.eval_bins,
            "fraction_evaluate": self.fraction_evaluate,
            "seed": self.seed,
            "stats_noise_multiplier": self.stats_noise_multiplier,
            "stats_clip": self.stats_clip,
            "aggregator": f"{aggregator_cls.__module__}.{aggregator_cls.__qualname__}",
            "aggregator_args": constructor_settings(self.aggregator),
            "model_class": f"{model_cls.__module__}.{model_cls.__qualname__}",
            "model_hparams": plain_items(dict(hparams)) if isinstance(hparams, Mapping) else {},
            "clients": self._client_ids,
            "client_samples": self._client_samples,
            **({} if self.client_sizes is None else {"client_sizes": self.client_sizes}),
        }

    def consensus_memory(self, client_id: str) -> ConsensusMemory:
        """The consensus memory of a client trained in this process, created on first use.

        A transport hands clients their memories through this method, not ``client_memory``: it marks the memory
        for the next checkpoint, which rewrites only the marked ones.

        Args:
            client_id: the client.

        Returns:
            The client's memory (the same object on every call).
        """
        self._memory_touched.add(client_id)
        return self.client_memory.setdefault(client_id, ConsensusMemory())

    def state_dict(self, *, history: bool = True, client_memory: bool = True) -> dict[str, Any]:
        """Everything needed to continue after the last finished round (tensors and plain values only); without
        ``history`` or ``client_memory``, all but that."""
        state: dict[str, Any] = {
            "server_round": len(self.result.rounds),
            "global_weights": self.global_weights,
            "aggregator": self.aggregator.state_dict(),
            "fingerprint": self._fingerprint(),
        }
        if client_memory:
            state["client_memory"] = {cid: m.state_dict() for cid, m in self.client_memory.items() if m.rounds()}
        if history:
            state["history"] = self.result.to_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the federation's settings must match the saved ones.

        Raises:
            CheckpointMismatchError: naming the first setting (dotted key) whose saved value differs from the
                current one, or if the checkpoint predates fingerprints of the whole run.
        """
        self._check_fingerprint(state)
        load_model_weights(self.model, state["global_weights"])
        self.global_weights = model_weights(self.model)
        self.aggregator.load_state_dict(state["aggregator"])
        self.result = FederationResult.from_dict(state["history"])
        self.client_memory = {}
        for cid, memory_state in state.get("client_memory", {}).items():
            self.client_memory[cid] = ConsensusMemory()
            self.client_memory[cid].load_state_dict(memory_state)
        # memories from elsewhere than a checkpoint's folder are all written by the next checkpoint
        from_folder = state.get("client_state") == CLIENT_STATE_NAME
        self._memory_touched = set() if from_folder else set(self.client_memory)
        self._sweep_client_state = True

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the federation's state atomically (default: ``checkpoint_dir``)."""
        target = path if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("Expected a path or a `checkpoint_dir` to save the federation to, but got neither.")
        return save_checkpoint(target, self.state_dict())

    def _save_round(self, record: RoundRecord) -> None:
        """The checkpoint after a round. What grows with the clients is written next to it, only as far as the round
        changed it: the round's per-client detail (:data:`CLIENT_FIELDS`) is appended to a log
        (:data:`CLIENT_LOG_NAME`), and the consensus memories of the clients the round trained are rewritten in a
        folder of one file per client (:data:`CLIENT_STATE_NAME`); the rest is rewritten."""
        path = self.checkpoint_path
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fresh = len(self.result.rounds) == 1
        detail = {name: getattr(record, name) for name in CLIENT_FIELDS}
        append_client_log(path.parent / CLIENT_LOG_NAME, record.server_round, detail, fresh=fresh)
        touched = sorted(self._memory_touched)
        folder = path.parent / CLIENT_STATE_NAME
        # a memory left empty loses its file only once the new checkpoint no longer counts it (below)
        emptied = [cid for cid in touched if not self.client_memory[cid].rounds()]
        write_client_states(
            folder,
            {cid: m.state_dict() for cid in touched if (m := self.client_memory[cid]).rounds()},
            fresh=fresh,
        )
        history = {**self.result.to_dict(client_fields=False), "client_log": CLIENT_LOG_NAME}
        state = {**self.state_dict(history=False, client_memory=False), "history": history}
        ids = sorted(cid for cid, m in self.client_memory.items() if m.rounds())
        if self.client_memory:
            state["client_state"] = CLIENT_STATE_NAME
            state["client_state_ids"] = ids
        save_checkpoint(path, state)
        if emptied:  # only now: until the new checkpoint is down, the old one may need these files
            write_client_states(folder, dict.fromkeys(emptied))
        self._memory_touched.difference_update(touched)  # only once written: a failed write is tried again
        if self._sweep_client_state:
            sweep_client_states(folder, ids)
            for name in (path.name, CLIENT_LOG_NAME):
                for leftover in path.parent.glob(f".{name}.*.tmp"):
                    leftover.unlink(missing_ok=True)
            self._sweep_client_state = False

    def restore(self, path: str | os.PathLike[str]) -> None:
        """Continue from a checkpoint written by :meth:`save`.

        Raises:
            CheckpointError: the file cannot be read, or its content does not fit this federation's model or
                aggregator (named, with a HINT).
            CheckpointMismatchError: the checkpoint was written by another setup (names the setting and the file).
        """
        restore_checkpoint(path, self.load_state_dict, check=self._check_fingerprint)
        if self.checkpoint_path is None or Path(path).resolve() != self.checkpoint_path.resolve():
            self._memory_touched = set(self.client_memory)  # their files are in another folder than ours
        log.info("resumed from %s after round %d", os.fspath(path), len(self.result.rounds))

    def select_clients(self, server_round: int) -> list[str]:
        """The clients of a round: all, or a seeded sample of ``max(min_clients, ceil(fraction_fit * K))``, uniform
        or in proportion to the clients' sizes (``client_sampling``)."""
        return select_clients(
            self._client_ids,
            server_round,
            fraction_fit=self.fraction_fit,
            min_clients=self.min_clients,
            seed=self.seed,
            client_sampling=self.client_sampling,
            sizes=self._sizes,
        )

    def run_round(self, server_round: int) -> RoundRecord:
        """One round: configure, train the selected clients, aggregate, evaluate, checkpoint.

        Raises:
            FederationError: if fewer than ``min_clients`` usable updates arrived in every attempt; the global model
                (and the checkpoint on disk) stay those of the last finished round.
        """
        with self._threads():
            return self._run_round(server_round)

    def _run_round(self, server_round: int) -> RoundRecord:
        t_start = time.perf_counter()
        selected = self.select_clients(server_round)
        instructions = self.aggregator.configure_round(server_round, selected, self.global_weights)

        def collect(attempt: int) -> UpdateCollector:
            sent = self.complete_instructions(server_round, instructions, attempt)
            # a fresh aggregation per attempt: one given up leaves the aggregator as it was. An aggregator that
            # overrides `aggregate_round` itself gets the round's updates in one list, as before rounds streamed.
            self._aggregation = None
            if type(self.aggregator).aggregate_round is Aggregator.aggregate_round:
                self._aggregation = self.aggregator.begin_round(server_round, self.global_weights)
            return self.transport.collect(self, server_round, sent, attempt)

        where = ""
        if self.checkpoint_path is not None:
            where = f" The last good global model is in {os.fspath(self.checkpoint_path)}."
        collected, attempts = collect_with_retries(
            collect,
            server_round,
            len(selected),
            min_clients=self.min_clients,
            round_retries=self.round_retries,
            kept=f" `Federation.global_weights` keeps the model of round {server_round - 1}.{where}",
            logger=log,
        )
        t_clients = time.perf_counter()
        if self._aggregation is not None:
            aggregated = self._aggregation.finish()
        else:
            aggregated = self.aggregator.aggregate_round(server_round, collected.updates, self.global_weights)
        self._aggregation = None
        self.global_weights = aggregated.weights
        t_server = time.perf_counter()
        metrics: dict[str, float] = {}
        evaluated = server_round % self.eval_every == 0 or server_round == self.num_rounds
        if self.eval_dataloader is not None and evaluated:
            metrics = self.evaluate()
        own: dict[str, dict[str, float]] = {}
        eval_failures: dict[str, str] = {}
        if evaluated and self.federated_eval != "none":
            federated, own, eval_failures = self.evaluate_federated(server_round)
            metrics.update(federated)
        record = round_record(
            server_round,
            selected,
            collected,
            aggregated,
            metrics=metrics,
            times=(t_start, t_clients, t_server, time.perf_counter()),
            attempts=attempts,
            label_names=self.label_names,
            client_evaluations=own,
            eval_failures=eval_failures,
        )
        self.result.rounds.append(record)
        self._collect_garbage()
        if self.checkpoint_path is not None:
            self._save_round(record)
        with self._progress_output():
            log.info("%s", self._progress_line(record))
        return record

    def complete_instructions(
        self, server_round: int, instructions: Mapping[str, Instruction], attempt: int = 0
    ) -> dict[str, Instruction]:
        """The aggregator's instructions with what the runner decides: the round, ``local_epochs``, whether
        statistics are needed, and each client's training seed (fresh for every retry); each one validated.

        Raises:
            ProtocolError: an instruction with a malformed field (names the client and the field).
        """
        index = self._client_index
        return {
            cid: complete_instruction(
                instruction,
                cid,
                server_round=server_round,
                local_epochs=self.local_epochs,
                seed=client_seed(self.seed, server_round, index[cid], attempt),
                collect_stats=self.aggregator.requires_stats,
            )
            for cid, instruction in instructions.items()
        }

    def new_collector(self) -> UpdateCollector:
        """The collector a transport screens this round's updates with: each usable one goes straight into the
        round's aggregation (:meth:`~lightning_fedharmony.aggregators.Aggregator.begin_round`)."""
        return UpdateCollector(self.global_weights, sink=self._aggregation)

    def _collect_garbage(self) -> None:
        # Every client fit leaves a Trainer behind in reference cycles, which Python's generational collector frees
        # only once enough has piled up: memory then creeps up for dozens of rounds. A full collection costs tens of
        # milliseconds on a heap holding torch and Lightning, so run one only when at least 50 times its last cost
        # has passed since: memory stays flat and the cost stays under 2% of the wall time. The heap pages the
        # collection freed then go back to the system (glibc keeps them otherwise: with long-lived small tensors among
        # the freed ones, 10,000 clients at 1% per round grew by 300 MiB in 200 rounds without this, 100 MiB with it).
        now = time.perf_counter()
        if now - self._last_gc < 50 * self._gc_seconds:
            return
        gc.collect()
        release_freed_heap()
        self._last_gc = time.perf_counter()
        self._gc_seconds = self._last_gc - now

    def evaluate_federated(
        self, server_round: int
    ) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, str]]:
        """Federated evaluation of the current global model: every client (or the round's ``fraction_evaluate`` sample)
        evaluates it on its held-out split and the server merges the metric states exactly
        (:func:`~lightning_fedharmony.rounds.merge_evaluations`).

        Returns:
            The federated metrics (``fed_<key>``), each client's own (``val_<key>``) and the clients whose evaluation
            failed, with the reason.
        """
        bins = self.eval_bins if self.federated_eval == "binned" else None
        request = Instruction(weights=self.global_weights, server_round=server_round, eval_bins=bins)
        asked = evaluation_clients(self._client_ids, server_round, self.fraction_evaluate, self.seed)
        evaluations, failures = self.transport.evaluate(self, server_round, dict.fromkeys(asked, request))
        federated, own = merge_evaluations(evaluations, bins)
        return federated, own, failures

    @torch.no_grad()
    def evaluate(self, dataloader: DataLoader | None = None) -> dict[str, float]:
        """Metrics of the global model on ``dataloader`` (default: the federation's evaluation data)."""
        loader = dataloader if dataloader is not None else self.eval_dataloader
        if loader is None:
            raise ValueError("Expected an evaluation dataloader, but the federation has none.")
        return evaluate_weights(self.model, self.global_weights, loader)

    def global_model(self) -> pl.LightningModule:
        """A copy of the model holding the current global weights."""
        module = copy.deepcopy(self.model)
        load_model_weights(module, self.global_weights)
        return module

    def _progress_line(self, record: RoundRecord) -> str:
        parts = [
            f"round {record.server_round:>3}/{self.num_rounds}",
            f"clients {len(record.clients) - len(record.failures)}/{len(record.clients)}",
            f"train_loss {record.train_loss:.4f}",
        ]
        for key in ("map", "micro_f1", "macro_f1", "hamming_loss", "fed_map"):
            if key in record.metrics:
                parts.append(f"{key} {record.metrics[key]:.4f}")
        if "num_blocks" in record.server_metrics:
            parts.append(f"blocks {int(record.server_metrics['num_blocks'])}")
        parts.append(f"{record.seconds['total']:.2f}s")
        return " | ".join(parts)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_freed_heap() -> None:
    """Give the heap pages that freed objects left back to the system (glibc's ``malloc_trim``; elsewhere nothing)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"Expected argument `{name}` to be an int >= {minimum}, but got {value!r}.")


_RESERVED_KEYS = frozenset(
    {
        "fingerprint_version",
        "clients",
        "client_samples",
        "model_class",
        "model_hparams",
        "aggregator",
        "aggregator_args",
        "num_rounds",
        "local_epochs",
        "fraction_fit",
        "min_clients",
        "client_sampling",
        "client_sizes",
        "eval_every",
        "federated_eval",
        "eval_bins",
        "fraction_evaluate",
        "seed",
        "stats_noise_multiplier",
        "stats_clip",
    }
)
