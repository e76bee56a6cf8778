"""Atomic save and safe load of a federation's state between rounds."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch

#: Layout version of federation checkpoints; a reader rejects any other.
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "federation.ckpt"
#: The per-client part of a federation's history, one JSON line per round, next to :data:`CHECKPOINT_NAME`.
CLIENT_LOG_NAME = "federation.clients.jsonl"


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
