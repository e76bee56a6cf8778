"""Atomic save and safe load of a federation's state between rounds."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

#: Layout version of federation checkpoints; a reader rejects any other.
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "federation.ckpt"
#: Entries a federation checkpoint must hold (every runner writes the same ones).
STATE_KEYS = ("server_round", "global_weights", "aggregator", "history", "fingerprint")
#: Plain values that a fingerprint may hold (with lists and str-keyed dicts of them).
_PLAIN = (type(None), bool, int, float, str)
#: The per-client part of a federation's history, one JSON line per round, next to :data:`CHECKPOINT_NAME`.
CLIENT_LOG_NAME = "federation.clients.jsonl"
#: The in-process clients' own state (their consensus memories with FedHarmony ``leave_one_out="client"``), one file
#: per client in a folder next to :data:`CHECKPOINT_NAME`, rewritten only for the clients a round touched.
CLIENT_STATE_NAME = "federation.client_state"
#: Characters a client's file name keeps as they are (:func:`client_file_name`).
_FILE_SAFE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


#: What a user does about a checkpoint that cannot be used.
CHECKPOINT_HINT = "HINT: delete it to start over, or use another `checkpoint_dir`."


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a federation with other settings than the one asked to resume from it."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: truncated, not a torch file, another layout, missing entries."""


def atomic_write(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> Path:
    """Write a file through ``write(handle)`` atomically: readers see the old file or the new one, never a torn one
    (temporary file in the same folder, fsync, ``os.replace``)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors and plain values only) atomically."""
    return atomic_write(path, lambda handle: torch.save({"version": CHECKPOINT_VERSION, **state}, handle))


def load_checkpoint(path: str | os.PathLike[str], keys: Sequence[str] = ()) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (nothing is unpickled beyond tensors and plain values).

    Args:
        path: the checkpoint file.
        keys: entries the checkpoint must hold (besides ``version``).

    Raises:
        CheckpointError: naming the file and what is wrong with it, if it cannot be read (truncated, garbage, not a
            torch file), has another layout version, or lacks one of ``keys``.
    """
    where = os.fspath(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise CheckpointError(
            f"{where}: expected a readable federation checkpoint, but {_load_failure(err)}. {CHECKPOINT_HINT}"
        ) from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"{where}: expected a federation checkpoint of version {CHECKPOINT_VERSION}, but got {version!r}."
            f" {CHECKPOINT_HINT}"
        )
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(
            f"{where}: expected a federation checkpoint with entries {list(keys)}, but {missing} are missing."
            f" {CHECKPOINT_HINT}"
        )
    return state


def _load_failure(err: Exception) -> str:
    """One line on why ``torch.load`` failed; torch's own messages run over several paragraphs."""
    text = " ".join(str(err).split())
    marker = "WeightsUnpickler error:"
    if marker in text:  # weights_only refused it: torch's advice to load with weights_only=False is not ours to give
        detail = text.split(marker, 1)[1].split(". ")[0].strip().rstrip(".")
        return f"it is not a torch file of tensors and plain values ({detail})"
    return f"it is damaged or truncated ({text.split('. ')[0].rstrip('.') or type(err).__name__})"


def append_client_log(
    path: str | os.PathLike[str], server_round: int, detail: dict[str, Any], *, fresh: bool = False
) -> None:
    """Append one round's per-client history to the log at ``path`` (``fresh``: start a new log), durably.

    A checkpoint then writes the bulk of what grows with rounds x clients once instead of at every round. The line
    is synced before the checkpoint that counts the round replaces the previous one, so a checkpoint never counts a
    round its log lacks; the log may hold one round more, which :func:`read_client_log` drops.
    """
    line = json.dumps({"server_round": server_round, **detail}, separators=(",", ":"))
    with open(path, "w" if fresh else "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
        handle.flush()
        os.fsync(handle.fileno())


def read_client_log(path: str | os.PathLike[str], server_rounds: Sequence[int]) -> list[dict[str, Any]]:
    """The first ``len(server_rounds)`` lines of the log that :func:`append_client_log` wrote, one per round of
    ``server_rounds``; later lines (a round whose checkpoint was never written) are cut from the file, so that the
    next append follows the last round counted.

    Raises:
        CheckpointError: if the log is missing or unreadable, or a line does not hold the expected round.
    """
    where = os.fspath(path)
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise CheckpointError(
            f"{where}: expected the per-client history that the checkpoint next to it refers to, but it cannot be"
            f" read ({type(err).__name__}). {CHECKPOINT_HINT}"
        ) from None
    entries: list[dict[str, Any]] = []
    for number, expected in enumerate(server_rounds):
        try:
            entry = json.loads(lines[number])
        except (IndexError, json.JSONDecodeError):
            entry = None
        if not isinstance(entry, dict) or entry.get("server_round") != expected:
            raise CheckpointError(
                f"{where}: expected line {number + 1} to hold round {expected} of the per-client history, but it"
                f" does not. {CHECKPOINT_HINT}"
            )
        entries.append(entry)
    if len(lines) > len(entries):
        kept = "".join(f"{line}\n" for line in lines[: len(entries)]).encode()
        atomic_write(path, lambda handle: handle.write(kept))
    return entries


def client_file_name(client_id: str) -> str:
    """The file (in :data:`CLIENT_STATE_NAME`) of one client's state.

    Args:
        client_id: the client's id (any string).

    Returns:
        Up to 48 characters of the id (letters, digits, ``_`` and ``-``; anything else as ``_``) and 16 hex digits of
        its SHA-256: any id fits a file name, and distinct ids get distinct files, on case-insensitive file systems
        too.

    Example:
        >>> client_file_name("site-3")
        'site-3-c715e36f245de958.pt'
    """
    readable = "".join(c if c in _FILE_SAFE else "_" for c in client_id[:48])
    return f"{readable}-{hashlib.sha256(client_id.encode()).hexdigest()[:16]}.pt"


def write_client_states(
    folder: str | os.PathLike[str], states: Mapping[str, Mapping[str, Any] | None], *, fresh: bool = False
) -> None:
    """Write each client's state to its own file in ``folder``, atomically; ``None`` removes the client's file.

    A checkpoint then rewrites only the clients a round touched, not every client the federation has seen. The files
    are written before the checkpoint that counts the round, so a run killed in between leaves some a round ahead of
    it; what is kept there must take that (a client's consensus memory does: it keeps the term the server last
    counted next to the newest, and drops the newer one when the round is run again).

    Args:
        folder: the folder (created if missing).
        states: client id -> state (tensors and plain values), or ``None`` for a client with nothing to keep.
        fresh: first remove every client file in the folder (the first round of a new run).
    """
    target = Path(folder)
    if fresh and target.is_dir():
        for stale in target.glob("*.pt"):
            stale.unlink()
    for client_id, state in states.items():
        path = target / client_file_name(client_id)
        if state is None:
            path.unlink(missing_ok=True)
            continue
        entry = {"version": CHECKPOINT_VERSION, "client_id": client_id, "state": dict(state)}
        atomic_write(path, functools.partial(torch.save, entry))


def read_client_states(
    folder: str | os.PathLike[str], expected: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The client states that :func:`write_client_states` left in ``folder``, by client id.

    Args:
        folder: the folder.
        expected: the ids to read (those the checkpoint counts); each must have its file, and other files in the
            folder (a client's file written a round ahead of the checkpoint, leftovers of another run) are not read.
            ``None`` reads every file.

    Raises:
        CheckpointError: if the folder is missing, a file it reads is unreadable or is not the state of the client it
            is named after, or an expected client has no file (each named).
    """
    target = Path(folder)
    if not target.is_dir():
        raise CheckpointError(
            f"{os.fspath(target)}: expected the clients' state that the checkpoint next to it refers to, but the"
            f" folder is missing. {CHECKPOINT_HINT}"
        )
    if expected is None:
        paths = sorted(target.glob("*.pt"))
    else:
        paths = [target / client_file_name(cid) for cid in expected]
        missing = [cid for cid, path in zip(expected, paths) if not path.is_file()]
        if missing:
            raise CheckpointError(
                f"{os.fspath(target)}: expected the state of every client the checkpoint counts, but {len(missing)}"
                f" have no file (first: {missing[0]!r}). {CHECKPOINT_HINT}"
            )
    states: dict[str, dict[str, Any]] = {}
    for path in paths:
        entry = load_checkpoint(path, ("client_id", "state"))
        client_id, state = entry["client_id"], entry["state"]
        if not isinstance(client_id, str) or client_file_name(client_id) != path.name:
            raise CheckpointError(
                f"{os.fspath(path)}: expected the state of the client this file is named after, but it holds"
                f" client {client_id!r}. {CHECKPOINT_HINT}"
            )
        if not isinstance(state, dict):
            raise CheckpointError(
                f"{os.fspath(path)}: expected a client's state (a dict), but got {type(state).__name__}."
                f" {CHECKPOINT_HINT}"
            )
        states[client_id] = state
    return states


def sweep_client_states(folder: str | os.PathLike[str], keep: Sequence[str]) -> None:
    """Remove what a checkpoint no longer refers to from a clients' state folder: the files of clients not in
    ``keep`` (another run's, or a client's that has nothing to keep) and temporary files of interrupted writes."""
    target = Path(folder)
    if not target.is_dir():
        return
    kept = {client_file_name(cid) for cid in keep}
    for path in target.iterdir():
        leftover = path.name.startswith(".") and path.name.endswith(".tmp")
        if path.is_file() and (leftover or (path.suffix == ".pt" and path.name not in kept)):
            path.unlink(missing_ok=True)


def restore_checkpoint(
    path: str | os.PathLike[str],
    load_state_dict: Callable[[Mapping[str, Any]], None],
    check: Callable[[Mapping[str, Any]], None] | None = None,
) -> None:
    """Read the checkpoint at ``path`` and hand it to ``load_state_dict`` (a runner's), with one-line errors;
    ``check`` (e.g. the runner's fingerprint check) sees the checkpoint before the files next to it are read.

    Raises:
        CheckpointError: the file cannot be read, or its content does not fit the runner's model or aggregator
            (named, with a HINT).
        CheckpointMismatchError: the checkpoint was written by another setup (names the setting and the file).
    """
    where = os.fspath(path)
    state = load_checkpoint(path, STATE_KEYS)
    try:
        if check is not None:
            check(state)
        history = state["history"]
        if isinstance(history, Mapping) and history.get("client_log") == CLIENT_LOG_NAME:
            # a per-round checkpoint: the rounds' per-client detail is in the log next to it
            rounds = history["rounds"]
            detail = read_client_log(Path(path).parent / CLIENT_LOG_NAME, [r["server_round"] for r in rounds])
            merged = [{**r, **{k: v for k, v in d.items() if k != "server_round"}} for r, d in zip(rounds, detail)]
            state["history"] = {**history, "rounds": merged}
        if state.get("client_state") == CLIENT_STATE_NAME:
            # a per-round checkpoint of in-process clients: their state is in the folder next to it
            expected = state.get("client_state_ids")
            state["client_memory"] = read_client_states(Path(path).parent / CLIENT_STATE_NAME, expected)
        load_state_dict(state)
    except CheckpointMismatchError as err:
        raise CheckpointMismatchError(f"{where}: {err}") from None
    except CheckpointError:  # a file next to the checkpoint, named in the message already
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        reason = " ".join(f"{type(err).__name__}: {err}".split())
        raise CheckpointError(
            f"{where}: expected the checkpoint's content to fit this federation, but restoring it failed"
            f" ({reason}). {CHECKPOINT_HINT}"
        ) from None


# ---------------------------------------------------------------------------------------------- fingerprints
def check_fingerprint(saved_fingerprint: Any, current: Mapping[str, Any]) -> None:
    """Refuse a checkpoint whose fingerprint differs from the current run's in any entry.

    Raises:
        CheckpointMismatchError: naming the first setting (dotted key) whose saved value differs from the current
            one (the current fingerprint's order first), or if the checkpoint predates fingerprints of the whole run.
    """
    if not isinstance(saved_fingerprint, Mapping) or "fingerprint_version" not in saved_fingerprint:
        raise CheckpointMismatchError(
            "Expected the checkpoint to record the data, partition, model and method settings of its run, but it"
            " was written by an earlier version that recorded only the federation's, so it cannot show that it"
            " belongs to this run. HINT: use a fresh `checkpoint_dir` (or delete this checkpoint) to start over."
        )
    now = flatten(current)
    # an entry added since is filled in only where this run records it (a model without the hparam has none)
    defaults = {key: value for key, value in _FINGERPRINT_DEFAULTS.items() if key in now}
    saved = {**defaults, **flatten(saved_fingerprint)}
    for key in [k for k, v in saved.items() if isinstance(v, Mapping) and not v and k not in now]:
        # a section that was empty then and holds only entries added since (FedAvg's arguments) is those defaults
        added = [k for k in now if k.startswith(f"{key}.")]
        if added and all(k in defaults for k in added):
            del saved[key]
    for key in [*now, *(k for k in saved if k not in now)]:
        if saved.get(key, _ABSENT) != now.get(key, _ABSENT):
            raise CheckpointMismatchError(
                f"Expected the checkpoint to come from the same federation, but `{key}` differs: saved"
                f" {saved.get(key, _ABSENT)!r}, now {now.get(key, _ABSENT)!r}. HINT: use another"
                " `checkpoint_dir` for another setup."
            )


#: Fingerprint entries added since checkpoints of this layout were first written: one without them ran with these
#: (dotted keys, as :func:`check_fingerprint` flattens them). ``proximal_scaling`` did not exist, which trained as
#: ``"none"`` does: a FedAvg or FedProx run resumes, while a ``FedHarmony()`` run of the earlier defaults is refused
#: on the settings that did change (``aggregator_args.quality_aggregation``). Server momentum did not exist, which
#: is ``server_momentum=0``. The label-aware proximal term did not exist, which is ``proximal_rows="uniform"``; nor
#: did the label-count factor on ``mu``, which is ``proximal_reference_labels=0``.
_FINGERPRINT_DEFAULTS = {
    "client_sampling": "uniform",
    "eval_every": 1,  # Flower's fingerprint records it since FedHarmonyStrategy(eval_every=...)
    "model_hparams.proximal_scaling": "none",
    "aggregator_args.proximal_scaling": "none",
    "aggregator_args.server_momentum": 0.0,
    "aggregator_args.server_momentum_adaptive": True,
    "model_hparams.proximal_rows": "uniform",
    "model_hparams.proximal_full_at": 64.0,
    "model_hparams.proximal_absent": 10.0,
    "aggregator_args.proximal_rows": "uniform",
    "aggregator_args.proximal_full_at": 64.0,
    "aggregator_args.proximal_absent": 10.0,
    "model_hparams.proximal_reference_labels": 0.0,
    "aggregator_args.proximal_reference_labels": 0.0,
}


class _Absent:
    """Stands for a fingerprint entry that one side lacks (``None`` is a value)."""

    def __repr__(self) -> str:
        return "<not recorded>"


_ABSENT = _Absent()


def plain(value: Any, key: str) -> Any:
    """``value`` as plain values (tuples become lists), or ``TypeError`` naming ``key``."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (list, tuple)):
        return [plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: plain(v, f"{key}.{k}") for k, v in value.items()}
    raise TypeError(
        f"Expected argument `fingerprint_extra` to hold plain values (str-keyed mappings, lists, str, numbers, bool,"
        f" None), but `{key}` is {type(value).__name__}."
    )


def plain_items(values: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``values`` that are plain values (others, e.g. tensors or modules, are left out)."""
    kept = {}
    for key, value in values.items():
        with contextlib.suppress(TypeError):
            kept[str(key)] = plain(value, str(key))
    return kept


def constructor_settings(obj: object) -> dict[str, Any]:
    """The plain-valued attributes named like ``obj``'s constructor arguments: its settings, not its state."""
    try:
        parameters = inspect.signature(type(obj)).parameters
    except (TypeError, ValueError):  # a signature Python cannot read (some builtins)
        return {}
    names = [
        name
        for name, p in parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and not name.startswith("_") and hasattr(obj, name)
    ]
    return plain_items({name: getattr(obj, name) for name in names})


def check_fingerprint_extra(extra: Mapping[str, Any] | None, reserved: frozenset[str]) -> dict[str, Any]:
    """The caller's ``fingerprint_extra`` as plain values; it may not use the runner's own entries ``reserved``.

    Raises:
        TypeError: ``extra`` is no mapping, or holds something else than plain values.
        ValueError: ``extra`` uses one of the ``reserved`` keys.
    """
    if extra is None:
        return {}
    if not isinstance(extra, Mapping):
        raise TypeError(
            f"Expected argument `fingerprint_extra` to be None or a mapping, but got {type(extra).__name__}."
        )
    plain_extra = plain(extra, "fingerprint_extra")
    clashes = sorted(set(plain_extra) & reserved)
    if clashes:
        raise ValueError(
            f"Expected argument `fingerprint_extra` to leave the federation's own entries {sorted(reserved)} to"
            f" it, but got {clashes}."
        )
    return plain_extra


def flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (``{"partition": {"alpha": 0.1}}`` -> ``partition.alpha``)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = list(value) if isinstance(value, tuple) else value
    return flat
