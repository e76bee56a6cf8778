"""The client's side of a round, wherever the client runs.

- :func:`install` puts an :class:`~lightning_fedharmony.protocol.Instruction` into a module: weights, teacher and mask,
  every setting, the round's seed. Nothing else writes them.
- :func:`train_client` is one round of a client trained in this process (a fresh Trainer per round):
  :class:`~lightning_fedharmony.orchestrator.Federation` and the Flower ClientApp use it.
- :func:`evaluate_client` answers an evaluation request: the global model's metric state on the client's held-out
  split, wherever the client runs (in memory, :class:`FederatedClient`, the Flower ClientApp).
- :class:`FederatedClient` makes any ``trainer.fit`` (a LightningCLI run included) a client of ``fedharmony serve``
  over a shared folder, for as many rounds as the server asks.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_fedharmony.callback import CorrelationExchange
from lightning_fedharmony.client_terms import ConsensusMemory
from lightning_fedharmony.exchange import check_client_id
from lightning_fedharmony.mixin import FedHarmonyMixin, load_model_weights, model_weights
from lightning_fedharmony.privacy import check_privacy_args
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError, Update
from lightning_fedharmony.rounds import client_val_loader, evaluate_report
from lightning_fedharmony.transports.folder import EVALUATE, STOP, FolderMailbox

log = logging.getLogger(__name__)

_QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
#: Trainer settings every client gets unless ``trainer_kwargs`` overrides them: no loggers, bars or checkpoints.
CLIENT_TRAINER_DEFAULTS: dict[str, Any] = {
    "accelerator": "cpu",
    "devices": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
    "limit_val_batches": 0,
}


@functools.cache
def _callback_factories(group: str) -> tuple[Any, ...]:
    return tuple(entry.load() for entry in importlib.metadata.entry_points(group=group))


def _cached_external_callbacks(group: str) -> list[Any]:
    """Lightning's external-callback lookup with the entry-point scan done once per process.

    Every ``Trainer(...)`` scans the installed packages' entry points for callback factories (about 7 ms here, a
    third of a small client's whole fit). The factories cannot change while the process runs; they are still called
    for every Trainer, so each one gets fresh callbacks as before.
    """
    callbacks: list[Any] = []
    for factory in _callback_factories(group):
        made = factory()
        callbacks.extend(made if isinstance(made, list) else [made])
    return callbacks


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Silence Lightning's per-fit info lines and hints, and skip its repeated entry-point scans, while many short
    client fits run."""
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    connector = sys.modules.get("lightning.pytorch.trainer.connectors.callback_connector")
    original = getattr(connector, "_load_external_callbacks", None)
    if original is not None:
        connector._load_external_callbacks = _cached_external_callbacks  # type: ignore[union-attr]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=r".*number of training batches.*")
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r".*litlogger.*")
        warnings.filterwarnings("ignore", message=r".*`val_dataloader` but have no `validation_step`.*")
        warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`.*")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if original is not None:
                connector._load_external_callbacks = original  # type: ignore[union-attr]


def install(module: pl.LightningModule, instruction: Instruction) -> None:
    """Put an instruction into a module: the one place a client's weights, teacher, mask and settings are written.

    Loads the weights; on a :class:`~lightning_fedharmony.FedHarmonyMixin` module installs the teacher and mask (or
    removes them), forgets the running moments and loss means, applies every setting that is not ``None`` and, with
    a proximal term, takes the loaded weights as its anchor; finally seeds torch with the instruction's ``seed``.

    Raises:
        TypeError: if the instruction asks for a teacher or a proximal term and the module has no mixin.
    """
    load_model_weights(module, instruction.weights)
    if isinstance(module, FedHarmonyMixin):
        module.fedharmony_set_teacher(instruction.teacher, instruction.mask)
        module.fedharmony_reset_running()
        module.fedharmony_configure(
            alignment_weight=instruction.alignment_weight,
            proximal_mu=instruction.proximal_mu,
            proximal_scaling=instruction.proximal_scaling,
            proximal_rows=instruction.proximal_rows,
            proximal_full_at=instruction.proximal_full_at,
            proximal_absent=instruction.proximal_absent,
            proximal_reference_labels=instruction.proximal_reference_labels,
            corr_normalization=instruction.corr_normalization,
            corr_eps=instruction.corr_eps,
            corr_momentum=instruction.corr_momentum,
            detach_marginals=instruction.detach_marginals,
        )
        if module.fedharmony_proximal_mu > 0:
            module.fedharmony_set_anchor()
    elif instruction.teacher is not None or (instruction.proximal_mu or 0.0) > 0:
        raise TypeError(
            f"Expected a model with FedHarmonyMixin to follow a teacher or a proximal term, but got"
            f" {type(module).__name__}. HINT: declare `class MyModel(FedHarmonyMixin, L.LightningModule)`."
        )
    if instruction.seed is not None:
        manual_seed(instruction.seed)


@functools.cache
def _accelerator_present() -> bool:
    try:
        return (
            torch.cuda.is_available()
            or torch.xpu.is_available()
            or torch.backends.mps.is_available()
            or torch.mtia.is_available()
            or torch._C._get_privateuse1_backend_name() != "privateuseone"
        )
    except AttributeError:  # a torch without one of these: seed as torch.manual_seed does
        return True


def manual_seed(seed: int) -> None:
    """``torch.manual_seed(seed)``: the same CPU generator state, without queueing seeds for accelerators this
    process does not have.

    For each accelerator not yet initialised, ``torch.manual_seed`` queues a lazy call and records the caller's
    stack for it (about 0.2-0.4 ms per call on a CPU-only machine, a tenth of a small client's whole fit). With an
    accelerator present (or a custom backend registered) it calls ``torch.manual_seed`` as before.
    """
    if _accelerator_present():
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(int(seed))


def train_client(
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    client_id: str,
    instructions: Instruction,
    *,
    trainer_kwargs: Mapping[str, Any],
    seed: int | None = None,
    collect_stats: bool | None = None,
    stats_noise_multiplier: float = 0.0,
    stats_clip: float | None = None,
    memory: ConsensusMemory | None = None,
) -> tuple[Update, float, float]:
    """One client's local training for a round in this process, with a fresh Trainer built from ``trainer_kwargs``.

    Args:
        module: the client's module.
        datamodule: its data.
        client_id: its name.
        instructions: what the server sent (``local_epochs`` overrides ``trainer_kwargs["max_epochs"]``).
        trainer_kwargs: the Trainer's arguments; its ``callbacks`` (one or a list) join the client's own.
        seed: overrides the instruction's ``seed``.
        collect_stats: overrides the instruction's ``collect_stats`` (``None`` in both: no statistics).
        stats_noise_multiplier: Gaussian noise on the statistics (see :mod:`lightning_fedharmony.privacy`).
        stats_clip: per-sample L2 bound of the statistics' prediction vectors.
        memory: the client's terms in a sums-only server's consensus (FedHarmony ``leave_one_out="client"``): the
            instruction's share becomes a teacher through it, and the update carries a term in place of statistics.
            ``None`` with a share: a fresh memory, which works only while the server holds no term of this client.

    Returns:
        The update (``metrics["train_loss"]`` included), the final task loss (``nan`` if not logged) and the seconds
        spent building the Trainer.
    """
    if seed is not None or collect_stats is not None:
        instructions = replace(
            instructions,
            seed=instructions.seed if seed is None else seed,
            collect_stats=instructions.collect_stats if collect_stats is None else collect_stats,
        )
    share = instructions.consensus
    if share is not None:
        memory = memory if memory is not None else ConsensusMemory()
        instructions = memory.resolve(instructions, client_id)
    install(module, instructions)
    callbacks: list[pl.Callback] = []
    log_parts = True
    exchange: CorrelationExchange | None = None
    if isinstance(module, FedHarmonyMixin):
        # nobody reads a client's logs here: skip Lightning's per-step logging (several ms per fit) and read the
        # mixin's own running means instead
        log_parts, module.fedharmony_log_loss_parts = module.fedharmony_log_loss_parts, False
        if instructions.collect_stats or share is not None:
            exchange = CorrelationExchange(
                client_id=client_id,
                stats_noise_multiplier=stats_noise_multiplier,
                stats_clip=stats_clip,
                noise_seed=instructions.seed,
            )
            callbacks.append(exchange)
    kwargs = dict(trainer_kwargs)
    if instructions.local_epochs is not None:
        kwargs["max_epochs"] = instructions.local_epochs
    # the caller's own callbacks (one or a list) run first, then the statistics' export
    own = kwargs.pop("callbacks", None) or []
    callbacks = [*(own if isinstance(own, (list, tuple)) else [own]), *callbacks]
    started = time.perf_counter()
    trainer = pl.Trainer(**kwargs, callbacks=callbacks)
    setup = time.perf_counter() - started
    try:
        trainer.fit(module, datamodule=datamodule)
    finally:
        # Lightning leaves the Trainer attached to the datamodule; with many clients that keeps one Trainer (its
        # loops, logged metrics and data loaders) alive per client, and memory grows until every client was seen
        datamodule.trainer = None
        if isinstance(module, FedHarmonyMixin):
            module.fedharmony_log_loss_parts = log_parts
    loss = _train_loss(module)
    update = Update(
        client_id=client_id,
        weights=model_weights(module),
        num_samples=num_train_samples(trainer),
        stats=None if exchange is None else exchange.published_stats,
        metrics={"train_loss": loss},
    )
    if share is not None and memory is not None:
        update = complete_term(module, update, memory, instructions, client_id)
    return update, loss, setup


def evaluate_client(
    module: pl.LightningModule, datamodule: pl.LightningDataModule | None, client_id: str, request: Instruction
) -> Evaluation:
    """Evaluate the request's global weights on the client's held-out split (its datamodule's ``val_dataloader``,
    e.g. :class:`~lightning_fedharmony.data.ClientDataModule`'s seeded ``val_fraction``).

    The answer holds the :class:`~lightning_fedharmony.metrics.MultilabelReport` state (exact scores, or binned counts
    with the request's ``eval_bins``), never finished metrics, so that the server merges the clients' states exactly.
    The module's weights and training mode and torch's random state are put back afterwards: evaluating never
    changes what the client trains next.

    Returns:
        The evaluation; ``num_samples`` 0 and no report when the client has no held-out split.
    """
    started = time.perf_counter()
    loader = None if datamodule is None else client_val_loader(datamodule)
    if loader is None:
        return Evaluation(client_id=client_id, num_samples=0, metrics={"seconds": time.perf_counter() - started})
    previous = model_weights(module)
    try:
        with torch.random.fork_rng(devices=[]):  # a DataLoader iterator draws its base seed from torch's generator
            report = evaluate_report(module, request.weights, loader, bins=request.eval_bins)
    finally:
        load_model_weights(module, previous)
    state = report.export_state()
    return Evaluation(
        client_id=client_id,
        num_samples=int(state["num_samples"]),
        report=state,
        metrics={"seconds": time.perf_counter() - started},
    )


def complete_term(
    module: pl.LightningModule, update: Update, memory: ConsensusMemory, instruction: Instruction, client_id: str
) -> Update:
    """The update with its statistics replaced by its consensus term (the module's soft phi settings, which the
    instruction set).

    Raises:
        ProtocolError: if the update holds no statistics to build the term from.
    """
    if update.stats is None or not isinstance(module, FedHarmonyMixin):
        raise ProtocolError(
            client_id,
            "term",
            "a consensus share needs the client's prediction statistics, but none were collected."
            " HINT: the module must use FedHarmonyMixin.",
        )
    return memory.complete(
        update,
        update.stats,
        instruction.server_round or 0,
        eps=module.fedharmony_corr_eps,
        normalization=module.fedharmony_corr_normalization,
    )


def num_train_samples(trainer: pl.Trainer) -> int:
    """Samples in the trainer's training data set (``n_k``).

    Raises:
        RuntimeError: if the train dataloader's data set has no length.
    """
    loader = trainer.train_dataloader
    dataset = getattr(loader, "dataset", None)
    if dataset is not None and hasattr(dataset, "__len__"):
        return len(dataset)
    raise RuntimeError(
        f"Expected the client's train dataloader to have a sized dataset, but got {type(loader).__name__}."
        " HINT: clients need a sample count for weighting."
    )


def _train_loss(module: pl.LightningModule) -> float:
    loss = module.fedharmony_running_means().get("task_loss") if isinstance(module, FedHarmonyMixin) else None
    return float(loss) if loss is not None else float("nan")


class FederatedClient(Callback):
    """Makes ``trainer.fit`` a federated client of ``fedharmony serve`` over a shared folder.

    Each round, at the start of a training epoch, it waits for the server's instruction for ``client_id``
    (:class:`~lightning_fedharmony.transports.FolderMailbox`), installs it (:func:`install`: weights, teacher, mask,
    every setting, the round's seed), resets the optimizers and schedulers to their state before the first step (so
    each round starts as a fresh Trainer would, as in :class:`~lightning_fedharmony.orchestrator.Federation`), trains
    the instructed ``local_epochs`` epochs and writes its update (weights, sample count, the prediction statistics of
    the last epoch when the server asks for them, ``train_loss``) atomically. Between rounds it answers the server's
    evaluation requests (:func:`evaluate_client` on the datamodule's ``val_dataloader``; torch's random state is kept,
    so training is unchanged). When the server says the run is over it
    loads the final global weights and stops the fit. ``max_epochs`` of the Trainer is ignored: the server decides.

    Args:
        root: the folder shared with the server.
        client_id: this client's name (letters, digits, ``_``, ``.``, ``-``); ``fedharmony serve`` names its clients
            ``"0"`` .. ``"K-1"``.
        local_epochs: epochs per round when the instruction does not say.
        poll_interval: seconds between looks at the folder.
        timeout: seconds to wait for an instruction before giving up (``None``: for ever).
        reset_optimizer: restore the optimizers' and schedulers' initial state at each round's start; ``False``
            carries Adam's moments across rounds (results then differ from ``Federation``'s).
        min_label_rate: labels predicted at a rate below this are invalid in the exported statistics.
        stats_noise_multiplier: Gaussian noise on the exported statistics (see :mod:`lightning_fedharmony.privacy`).
        stats_clip: per-sample L2 bound of the statistics' prediction vectors (``None``: ``sqrt(L)``).

    Example (LightningCLI YAML)::

        trainer:
          callbacks:
            - class_path: lightning_fedharmony.FederatedClient
              init_args: {root: /shared/fedharmony, client_id: "0"}
    """

    def __init__(
        self,
        root: str,
        client_id: str = "0",
        *,
        local_epochs: int = 1,
        poll_interval: float = 0.1,
        timeout: float | None = 3600.0,
        reset_optimizer: bool = True,
        min_label_rate: float = 1e-3,
        stats_noise_multiplier: float = 0.0,
        stats_clip: float | None = None,
    ) -> None:
        self.client_id = check_client_id(client_id)
        if isinstance(local_epochs, bool) or not isinstance(local_epochs, int) or local_epochs < 1:
            raise ValueError(f"Expected argument `local_epochs` to be an int >= 1, but got {local_epochs!r}.")
        if not poll_interval > 0:
            raise ValueError(f"Expected argument `poll_interval` to be > 0, but got {poll_interval!r}.")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"Expected argument `timeout` to be None or > 0, but got {timeout!r}.")
        check_privacy_args(stats_noise_multiplier, stats_clip)
        self.root = os.fspath(root)
        self.mailbox = FolderMailbox(root)
        self.local_epochs = local_epochs
        self.poll_interval = float(poll_interval)
        self.timeout = timeout
        self.reset_optimizer = reset_optimizer
        self.min_label_rate = min_label_rate
        self.stats_noise_multiplier = stats_noise_multiplier
        self.stats_clip = stats_clip
        #: id of the last instruction answered; one answered again after a restart gives the same update
        self.answered: str | None = None
        #: id of the last evaluation request answered
        self.evaluated: str | None = None
        self.rounds_done = 0
        #: the terms this client contributed to a sums-only server's consensus (FedHarmony ``leave_one_out="client"``)
        self.memory = ConsensusMemory()
        self.stopped = False
        self._current: tuple[str, Instruction] | None = None
        self._epochs_left = 0
        self._stats: CorrelationExchange | None = None
        self._initial: tuple[list[dict[str, Any]], list[dict[str, Any]]] | None = None
        self._started = 0.0

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(client_id=self.client_id)

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            trainer.fit_loop.max_epochs = -1  # the server decides when the run ends

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        optimizers = [copy.deepcopy(opt.state_dict()) for opt in trainer.optimizers]
        schedulers = [copy.deepcopy(cfg.scheduler.state_dict()) for cfg in trainer.lr_scheduler_configs]
        self._initial = (optimizers, schedulers)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epochs_left == 0:
            message = self._wait(trainer, pl_module)
            if message is None:  # SIGTERM while waiting: end the fit as Lightning would
                trainer.should_stop = True
                self._current = None
                return
            kind, ident, instruction = message
            if kind == STOP:
                load_model_weights(pl_module, instruction.weights)
                self.stopped = True
                self._current = None
                trainer.should_stop = True
                log.info("client %s: the server ended the run after %d rounds", self.client_id, self.rounds_done)
                return
            self._start_round(trainer, pl_module, ident, instruction)
        if self._stats is not None:
            self._stats.on_train_epoch_start(trainer, pl_module)

    def _wait(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[str, str, Instruction] | None:
        deadline = math.inf if self.timeout is None else time.monotonic() + self.timeout
        while True:
            if trainer.received_sigterm:
                log.info("client %s: SIGTERM while waiting for an instruction; stopping", self.client_id)
                return None
            message = self.mailbox.read_instruction(self.client_id)
            if message is not None and message[0] == EVALUATE:
                if message[1] != self.evaluated:
                    self._evaluate(trainer, pl_module, message[1], message[2])
                    deadline = math.inf if self.timeout is None else time.monotonic() + self.timeout
            elif message is not None and (message[0] == STOP or message[1] != self.answered):
                return message
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Client {self.client_id!r}: no new instruction in {self.root} within {self.timeout:g} s."
                    " HINT: is `fedharmony serve` running on the same folder?"
                )
            time.sleep(self.poll_interval)

    def _evaluate(self, trainer: pl.Trainer, pl_module: pl.LightningModule, ident: str, request: Instruction) -> None:
        """Answer an evaluation request between rounds: the global model on the datamodule's held-out split."""
        datamodule = getattr(trainer, "datamodule", None)  # set by `fit(datamodule=...)`
        evaluation = evaluate_client(pl_module, datamodule, self.client_id, request)
        self.mailbox.send_evaluation(evaluation, answers=ident)
        self.evaluated = ident
        log.info("client %s: sent the evaluation of round %s", self.client_id, request.server_round)

    @staticmethod
    def _replay_fresh_fit(trainer: pl.Trainer) -> None:
        # A single-process DataLoader iterator draws its base seed from torch's global generator when it is created.
        # A fresh Trainer creates the first epoch's iterator while setting up, after the runner seeded torch; the
        # epoch loop creates the next ones itself at each epoch's start, after this hook. In the first epoch of this
        # fit the iterator was made before the round's seed was installed: replay its draw, so that every round
        # trains on the same batches as a fresh Trainer under `Federation` (bit for bit).
        if trainer.current_epoch > 0 and not trainer.fit_loop.is_resuming:
            return
        loaders = trainer.train_dataloader
        for loader in loaders if isinstance(loaders, (list, tuple)) else [loaders]:
            if isinstance(loader, DataLoader) and loader.num_workers == 0:
                iter(loader)

    def _start_round(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ident: str, instruction: Instruction
    ) -> None:
        instruction = self.memory.resolve(instruction, self.client_id)
        install(pl_module, instruction)
        if instruction.seed is not None:
            self._replay_fresh_fit(trainer)
        if self.reset_optimizer and self._initial is not None:
            optimizers, schedulers = self._initial
            for opt, state in zip(trainer.optimizers, optimizers):
                opt.load_state_dict(copy.deepcopy(state))
            for cfg, state in zip(trainer.lr_scheduler_configs, schedulers):
                cfg.scheduler.load_state_dict(copy.deepcopy(state))
        collect = instruction.collect_stats or instruction.consensus is not None
        if instruction.collect_stats is None and instruction.consensus is None:
            collect = isinstance(pl_module, FedHarmonyMixin)
        self._stats = None
        if collect:
            self._stats = CorrelationExchange(
                client_id=self.client_id,
                min_label_rate=self.min_label_rate,
                stats_noise_multiplier=self.stats_noise_multiplier,
                stats_clip=self.stats_clip,
                noise_seed=instruction.seed,
            )
        self._current = (ident, instruction)
        self._epochs_left = instruction.local_epochs or self.local_epochs
        self._started = time.perf_counter()
        log.info("client %s: round %s, %d local epochs", self.client_id, instruction.server_round, self._epochs_left)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._stats is not None and self._current is not None:
            self._stats.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._current is None or self._epochs_left == 0:
            return
        if self._stats is not None:
            self._stats.on_train_epoch_end(trainer, pl_module)
        self._epochs_left -= 1
        if self._epochs_left > 0:
            return
        ident, instruction = self._current
        update = Update(
            client_id=self.client_id,
            weights=model_weights(pl_module),
            num_samples=num_train_samples(trainer),
            stats=None if self._stats is None else self._stats.published_stats,
            metrics={"train_loss": _train_loss(pl_module), "seconds": time.perf_counter() - self._started},
        )
        if instruction.consensus is not None:
            update = complete_term(pl_module, update, self.memory, instruction, self.client_id)
        self.mailbox.send_update(update, answers=ident)
        self.answered = ident
        self.rounds_done += 1
        self._current = None
        log.info("client %s: sent the update of round %s", self.client_id, instruction.server_round)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "client_id": self.client_id,
            "answered": self.answered,
            "evaluated": self.evaluated,
            "rounds_done": self.rounds_done,
            "consensus_memory": self.memory.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.answered = state_dict.get("answered")
        self.evaluated = state_dict.get("evaluated")
        self.rounds_done = int(state_dict.get("rounds_done", 0))
        if "consensus_memory" in state_dict:
            self.memory.load_state_dict(state_dict["consensus_memory"])
