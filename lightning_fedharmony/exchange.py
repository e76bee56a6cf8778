"""Where correlation statistics and teachers travel between clients and the server.

Two exchanges share one validation path: :class:`InMemoryExchange` for clients in one process, and
:class:`DirectoryExchange` for separate processes that share a folder. Files are ``.npz`` archives written
atomically (temporary file + ``os.replace``), read with ``allow_pickle=False`` and validated (format version, kind,
names, shapes, dtypes, finiteness) before anything is used: nothing sent by another party is ever unpickled.
"""

from __future__ import annotations

import io
import json
import os
import re
import zipfile
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_fedharmony.checkpoint import atomic_write
from lightning_fedharmony.stats import STATS_FIELDS, CorrelationStats, validate_stats_state

#: Version of the payload layout; a reader rejects any other.
FORMAT_VERSION = 1
_META_KEY = "__meta__"
_CLIENT_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class PayloadError(ValueError):
    """A payload (file or in-memory record) that is malformed; the message names its source and the problem."""


@dataclass(frozen=True)
class TeacherPayload:
    """What the server sends a client: its consensus teacher and the pairs to align.

    Attributes:
        teacher: ``(L, L)`` float32 leave-one-out consensus.
        mask: ``(L, L)`` bool pairs to align (in-block, supported, valid for this client).
        version: the server round that produced it.
    """

    teacher: Tensor
    mask: Tensor
    version: int


@dataclass(frozen=True)
class StatsPayload:
    """What a client sends the server: its prediction statistics and when they were taken."""

    stats: CorrelationStats
    version: int


def check_client_id(client_id: str) -> str:
    """Client ids double as file names: letters, digits, ``_``, ``.`` and ``-``, at most 128 characters."""
    if not isinstance(client_id, str) or not _CLIENT_ID.match(client_id):
        raise ValueError(
            "Expected argument `client_id` to match [A-Za-z0-9][A-Za-z0-9_.-]* (at most 128 characters),"
            f" but got {client_id!r}."
        )
    return client_id


def encode_stats(stats: CorrelationStats) -> dict[str, np.ndarray]:
    """Statistics as plain float64 arrays."""
    return {name: tensor.numpy() for name, tensor in stats.state_dict().items()}


def decode_stats(arrays: dict[str, np.ndarray], source: str, min_label_rate: float = 1e-3) -> CorrelationStats:
    """Validate and rebuild statistics; errors name ``source``."""
    missing = [name for name in STATS_FIELDS if name not in arrays]
    if missing:
        raise PayloadError(f"{source}: expected statistics entries {list(STATS_FIELDS)}, but {missing} are missing.")
    state = {}
    for name in STATS_FIELDS:
        array = np.asarray(arrays[name])
        # check before converting: torch.from_numpy raises TypeError on string or object arrays
        if array.dtype != np.float64:
            raise PayloadError(f"{source}: expected `{name}` to be float64, but got {array.dtype}.")
        state[name] = torch.from_numpy(array)
    try:
        validate_stats_state(state)
    except ValueError as err:
        raise PayloadError(f"{source}: {err}") from None
    return CorrelationStats.from_state_dict(state, min_label_rate=min_label_rate)


def encode_teacher(teacher: Tensor, mask: Tensor) -> dict[str, np.ndarray]:
    """Teacher and mask as plain arrays, after checking they fit each other."""
    arrays = {
        "teacher": teacher.detach().cpu().to(torch.float32).numpy(),
        "mask": mask.detach().cpu().to(torch.bool).numpy(),
    }
    decode_teacher(arrays, 0, "outgoing teacher")
    return arrays


def decode_teacher(arrays: dict[str, np.ndarray], version: int, source: str) -> TeacherPayload:
    """Validate and rebuild a teacher payload; errors name ``source``."""
    for name in ("teacher", "mask"):
        if name not in arrays:
            raise PayloadError(f"{source}: expected an entry `{name}`, but it is missing.")
    teacher, mask = np.asarray(arrays["teacher"]), np.asarray(arrays["mask"])
    if teacher.ndim != 2 or teacher.shape[0] != teacher.shape[1] or teacher.shape[0] < 1:
        raise PayloadError(f"{source}: expected `teacher` of shape (L, L), but got {teacher.shape}.")
    if mask.shape != teacher.shape:
        raise PayloadError(f"{source}: expected `mask` of shape {teacher.shape}, but got {mask.shape}.")
    if teacher.dtype not in (np.float32, np.float64):
        raise PayloadError(f"{source}: expected `teacher` to be float32, but got {teacher.dtype}.")
    if mask.dtype != np.bool_:
        raise PayloadError(f"{source}: expected `mask` to be bool, but got {mask.dtype}.")
    if not np.isfinite(teacher).all() or np.abs(teacher).max() > 1.0 + 1e-6:
        raise PayloadError(f"{source}: expected `teacher` to hold finite values in [-1, 1], but it does not.")
    return TeacherPayload(torch.from_numpy(teacher.astype(np.float32)), torch.from_numpy(mask.copy()), int(version))


class Exchange(ABC):
    """Mailboxes per client for statistics (client -> server) and teachers (server -> client)."""

    def publish_stats(self, client_id: str, stats: CorrelationStats, version: int = 0) -> None:
        """Store a client's statistics, replacing the previous ones."""
        self._write("stats", check_client_id(client_id), encode_stats(stats), version)

    def read_stats(self, client_id: str, min_label_rate: float = 1e-3) -> StatsPayload | None:
        """The client's latest statistics, or ``None`` if it has published none."""
        record = self._read("stats", check_client_id(client_id))
        if record is None:
            return None
        arrays, version, source = record
        return StatsPayload(decode_stats(arrays, source, min_label_rate=min_label_rate), version)

    def publish_teacher(self, client_id: str, teacher: Tensor, mask: Tensor, version: int) -> None:
        """Store a client's teacher and alignment mask, replacing the previous ones."""
        self._write("teacher", check_client_id(client_id), encode_teacher(teacher, mask), version)

    def read_teacher(self, client_id: str) -> TeacherPayload | None:
        """The client's latest teacher, or ``None`` if the server has sent none."""
        record = self._read("teacher", check_client_id(client_id))
        if record is None:
            return None
        arrays, version, source = record
        return decode_teacher(arrays, version, source)

    @abstractmethod
    def _write(self, kind: str, client_id: str, arrays: dict[str, np.ndarray], version: int) -> None: ...

    @abstractmethod
    def _read(self, kind: str, client_id: str) -> tuple[dict[str, np.ndarray], int, str] | None: ...


class InMemoryExchange(Exchange):
    """Exchange for clients and server in one process; stores copies, so no party sees another's tensors change."""

    def __init__(self) -> None:
        self._records: dict[tuple[str, str], tuple[dict[str, np.ndarray], int]] = {}

    def _write(self, kind: str, client_id: str, arrays: dict[str, np.ndarray], version: int) -> None:
        self._records[(kind, client_id)] = ({k: v.copy() for k, v in arrays.items()}, int(version))

    def _read(self, kind: str, client_id: str) -> tuple[dict[str, np.ndarray], int, str] | None:
        record = self._records.get((kind, client_id))
        if record is None:
            return None
        arrays, version = record
        return {k: v.copy() for k, v in arrays.items()}, version, f"in-memory {kind} of client {client_id!r}"


class DirectoryExchange(Exchange):
    """Exchange through a folder that separate processes share.

    Layout: ``<root>/<kind>/<client_id>.npz``. Writes are atomic (a reader sees the old file or the new one, never a
    torn one); every file carries its format version, kind and client id, and is checked on read.

    Args:
        root: the shared folder; created if missing.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)

    def path(self, kind: str, client_id: str) -> Path:
        """Where a client's payload of this kind lives."""
        return self.root / kind / f"{check_client_id(client_id)}.npz"

    def _write(self, kind: str, client_id: str, arrays: dict[str, np.ndarray], version: int) -> None:
        meta = {"format_version": FORMAT_VERSION, "kind": kind, "client_id": client_id, "version": int(version)}
        write_npz(self.path(kind, client_id), arrays, meta)

    def _read(self, kind: str, client_id: str) -> tuple[dict[str, np.ndarray], int, str] | None:
        path = self.path(kind, client_id)
        if not path.exists():
            return None
        source = str(path)
        arrays, meta = read_npz(path)
        if meta.get("kind") != kind or meta.get("client_id") != client_id:
            raise PayloadError(
                f"{source}: expected a {kind!r} payload of client {client_id!r}, but got a {meta.get('kind')!r}"
                f" payload of client {meta.get('client_id')!r}."
            )
        version = meta.get("version")
        if not isinstance(version, int):
            raise PayloadError(f"{source}: expected an int `version` in the metadata, but got {version!r}.")
        return arrays, version, source


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write ``arrays`` and a JSON ``meta`` entry as one ``.npz`` file, atomically."""
    buffer = io.BytesIO()
    np.savez(buffer, **{**arrays, _META_KEY: np.array(json.dumps(meta))})  # type: ignore[arg-type]
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read what :func:`write_npz` wrote without unpickling anything; checks the format version.

    Raises:
        PayloadError: naming the file, if it is not a readable archive, lacks its metadata or has another version.
    """
    source = os.fspath(path)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise PayloadError(f"{source}: expected an .npz archive, but got a single {type(loaded).__name__}.")
        with loaded as archive:
            arrays = {name: archive[name] for name in archive.files}
    except PayloadError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise PayloadError(f"{source}: not a readable payload ({type(err).__name__}: {err}).") from None
    meta = _parse_meta(arrays.pop(_META_KEY, None), source)
    if meta.get("format_version") != FORMAT_VERSION:
        raise PayloadError(
            f"{source}: expected format version {FORMAT_VERSION}, but got {meta.get('format_version')!r}."
            " HINT: client and server must run compatible versions of lightning-fedharmony."
        )
    return arrays, meta


def _parse_meta(raw: Any, source: str) -> dict[str, Any]:
    if raw is None:
        raise PayloadError(f"{source}: expected a metadata entry {_META_KEY!r}, but it is missing.")
    try:
        meta = json.loads(str(np.asarray(raw).item()))
    except (ValueError, TypeError) as err:
        raise PayloadError(f"{source}: metadata is not valid JSON ({err}).") from None
    if not isinstance(meta, dict):
        raise PayloadError(f"{source}: expected metadata to be a JSON object, but got {type(meta).__name__}.")
    return meta
