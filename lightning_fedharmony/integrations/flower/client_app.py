"""The clients on Flower: :func:`make_client_app` builds a ClientApp that trains the user's LightningModule with the
library's client step, :func:`partition_id` names the node's client."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

import lightning.pytorch as pl
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from lightning_fedharmony.client import evaluate_client
from lightning_fedharmony.client_terms import ConsensusMemory
from lightning_fedharmony.integrations.flower.wire import (
    Key,
    evaluation_to_records,
    instruction_from_records,
    update_to_records,
)
from lightning_fedharmony.orchestrator import CLIENT_TRAINER_DEFAULTS, quiet_lightning, train_client
from lightning_fedharmony.protocol import Instruction, ProtocolError

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
    epochs, and replies with its weights, sample count, loss and (FedHarmony) raw prediction statistics. An
    ``evaluate`` message is answered with :func:`~lightning_fedharmony.client.evaluate_client`: the metric state of
    the global model on the datamodule's held-out split (``val_dataloader``), exact or binned as the server asks. A
    ``query`` message is answered with the node's client id, and its datamodule's ``num_samples`` when the server
    samples clients by size.

    Nothing is kept in memory between messages (a deployed SuperNode starts a fresh process for each): what the
    client remembers (its id, rounds trained, and for FedHarmony with ``leave_one_out="client"`` its terms in the
    consensus sums) lives in ``Context.state``.

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
        index = partition_id(context)
        client = ConfigRecord({Key.CLIENT_ID: str(index)})
        config = msg.content.config_records.get(Key.CONFIG)
        if config is not None and config.get(Key.REPORT_NUM_EXAMPLES):
            client[Key.NUM_EXAMPLES] = _num_examples(datamodule_fn(index, context), str(index))
        return Message(RecordDict({Key.CLIENT: client}), reply_to=msg)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        index = partition_id(context)
        client_id = str(index)
        instruction = _own_instruction(msg, client_id)
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
        memory = _consensus_memory(context) if instruction.consensus is not None else None
        with quiet_lightning():
            update, _, setup = train_client(
                module, datamodule, client_id, instruction, trainer_kwargs=kwargs, memory=memory
            )
        if memory is not None:
            context.state[Key.CONSENSUS_MEMORY] = ArrayRecord(
                {name: Array(tensor.numpy()) for name, tensor in memory.state_dict().items()}
            )
        update = replace(update, metrics={**update.metrics, "trainer_setup_seconds": setup})
        return Message(update_to_records(update), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        index = partition_id(context)
        client_id = str(index)
        request = _own_instruction(msg, client_id)
        module = model_fn(context)
        datamodule = datamodule_fn(index, context)
        evaluation = evaluate_client(module, datamodule, client_id, request)
        return Message(evaluation_to_records(evaluation), reply_to=msg)

    return app


def _num_examples(datamodule: pl.LightningDataModule, client_id: str) -> int:
    """The datamodule's ``num_samples`` (its training samples), which size sampling weighs the client by."""
    value = getattr(datamodule, "num_samples", None)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RuntimeError(
            f"Expected client {client_id!r}'s datamodule to have `num_samples`, an int >= 0, for sampling clients by"
            f" size, but got {value!r}. HINT: use `ClientDataModule` or `PartitionedDataModule`, or add the property."
        )
    return value


def _own_instruction(msg: Message, client_id: str) -> Instruction:
    """The instruction (or evaluation request) a message holds, checked to be for ``client_id``.

    Raises:
        ProtocolError: a message without the ``config`` record, or with a malformed entry.
        RuntimeError: a message for another client.
    """
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
    return instruction_from_records(msg.content, client_id)


def _consensus_memory(context: Context) -> ConsensusMemory:
    """The node's terms in a sums-only server's consensus, kept in ``Context.state`` between messages."""
    memory = ConsensusMemory()
    record = context.state.array_records.get(Key.CONSENSUS_MEMORY)
    if record is not None:
        memory.load_state_dict({name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()})
    return memory


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
