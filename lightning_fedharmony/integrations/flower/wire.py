"""Flower's records <-> the client protocol: an :class:`~lightning_fedharmony.protocol.Instruction` or
:class:`~lightning_fedharmony.protocol.Update` travels as its array form (``to_arrays``), regrouped into records:
arrays in ``ArrayRecord``, scalars in ``ConfigRecord`` / ``MetricRecord``, under kebab-case keys defined once
(:class:`Key`, the slot tables)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from torch import Tensor

from lightning_fedharmony.protocol import SETTINGS as INSTRUCTION_SETTINGS
from lightning_fedharmony.protocol import Evaluation, Instruction, ProtocolError, Update
from lightning_fedharmony.stats import STATS_FIELDS


def wire_name(name: str) -> str:
    """A library name (snake_case) as a key on Flower's wire (kebab-case)."""
    return name.replace("_", "-")


def library_name(key: str) -> str:
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
    CONSENSUS = "consensus"
    TERM = "term"
    REPORT = "report"
    # the envelope: which client a message is for (`config`) or from (`client`)
    CLIENT_ID = "client-id"
    # entries of `metrics` (client -> server)
    NUM_EXAMPLES = "num-examples"
    TRAIN_LOSS = wire_name("train_loss")
    TRAINER_SETUP_SECONDS = wire_name("trainer_setup_seconds")
    # node configuration (simulation engine, `flower-supernode --node-config`) and client state
    PARTITION_ID = "partition-id"
    # the partition-id query: the server asks for the node's data size too (client sampling by size)
    REPORT_NUM_EXAMPLES = "report-num-examples"
    CLIENT_STATE = "fedharmony-client"
    CONSENSUS_MEMORY = "fedharmony-consensus-memory"
    ROUNDS_TRAINED = "rounds-trained"
    LAST_ROUND = "last-round"

    #: instruction setting (snake_case in the library) -> entry of the ``config`` record
    SETTINGS: ClassVar[dict[str, str]] = {name: wire_name(name) for name in INSTRUCTION_SETTINGS}
    #: statistics field (snake_case in the library) -> entry of the ``stats`` record
    STATS_FIELDS: ClassVar[dict[str, str]] = {name: wire_name(name) for name in STATS_FIELDS}
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
    EVAL_BINS = SETTINGS["eval_bins"]


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
        return wire_name(rest) if self.kebab else rest

    def entry_of(self, key: str) -> str | None:
        """The array-form entry of ``key`` of :attr:`record`, or ``None`` if this slot does not hold it."""
        if self.key is not None:
            return self.entry if key == self.key else None
        return self.entry + (library_name(key) if self.kebab else key)


_INSTRUCTION_SLOTS = (
    _Slot("weights.", Key.ARRAYS, kebab=False),
    _Slot("teacher", Key.TEACHER, Key.TEACHER),
    _Slot("mask", Key.TEACHER, Key.MASK),
    *(_Slot(name, Key.CONFIG, key) for name, key in Key.SETTINGS.items()),
    _Slot("consensus.", Key.CONSENSUS),
)
_UPDATE_SLOTS = (
    _Slot("client_id", Key.CLIENT, Key.CLIENT_ID),
    _Slot("num_samples", Key.METRICS, Key.NUM_EXAMPLES),
    _Slot("weights.", Key.ARRAYS, kebab=False),
    _Slot("stats.", Key.STATS),
    _Slot("metrics.", Key.METRICS),
    _Slot("term.", Key.TERM),
)
_EVALUATION_SLOTS = (
    _Slot("client_id", Key.CLIENT, Key.CLIENT_ID),
    _Slot("num_samples", Key.METRICS, Key.NUM_EXAMPLES),
    _Slot("report.", Key.REPORT),
    _Slot("metrics.", Key.METRICS),
)
_ARRAY_RECORDS = (Key.ARRAYS, Key.TEACHER, Key.STATS, Key.CONSENSUS, Key.TERM, Key.REPORT)


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


def evaluation_to_records(evaluation: Evaluation) -> RecordDict:
    """A client's evaluation as Flower records: its metric state in the ``report`` ArrayRecord (summed counts and
    moments; exact scores or binned counts), its held-out sample count as ``num-examples``."""
    return _to_records(evaluation.to_arrays(), _EVALUATION_SLOTS)


def evaluation_from_records(content: RecordDict, client_id: str, bins: int | None = None) -> Evaluation:
    """The evaluation a reply holds, validated (its report must be of the requested mode ``bins``).

    Raises:
        ProtocolError: naming ``client_id`` and the record entry that is missing or malformed.
    """
    try:
        return Evaluation.from_arrays(_from_records(content, _EVALUATION_SLOTS), client_id=client_id, bins=bins)
    except ProtocolError as err:
        raise _on_wire(err, _EVALUATION_SLOTS) from None


def weights_to_arrays(weights: Mapping[str, Tensor]) -> ArrayRecord:
    """An :class:`~flwr.app.ArrayRecord` of a state dict (copies to NumPy; dtypes and shapes kept)."""
    return ArrayRecord({name: Array(tensor.detach().cpu().contiguous().numpy()) for name, tensor in weights.items()})


def arrays_to_weights(record: ArrayRecord) -> dict[str, Tensor]:
    """The state dict held by an :class:`~flwr.app.ArrayRecord` (NumPy arrays loaded without pickle)."""
    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}
