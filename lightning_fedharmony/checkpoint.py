"""Atomic save and safe load of a federation's state between rounds."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

#: Layout version of federation checkpoints; a reader rejects any other.
CHECKPOINT_VERSION = 1
CHECKPOINT_NAME = "federation.ckpt"


class CheckpointMismatchError(ValueError):
    """A checkpoint written by a federation with other settings than the one asked to resume from it."""


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


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (nothing is unpickled beyond tensors and plain values).

    Raises:
        RuntimeError: naming the file, if it cannot be read or has another layout version.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for a damaged file
        raise RuntimeError(f"{os.fspath(path)}: not a readable federation checkpoint ({err}).") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise RuntimeError(
            f"{os.fspath(path)}: expected a federation checkpoint of version {CHECKPOINT_VERSION}, but got {version!r}."
        )
    return state
