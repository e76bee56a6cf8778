"""Exchanges: round trips, atomic files, and rejection of every malformed payload without unpickling anything."""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from helpers.models import random_preds

from lightning_fedharmony import CorrelationStats, DirectoryExchange, InMemoryExchange, PayloadError
from lightning_fedharmony.exchange import FORMAT_VERSION, Exchange, check_client_id, encode_stats, encode_teacher
from lightning_fedharmony.stats import STATS_FIELDS

UNPICKLED: list[str] = []


def _record_unpickling(tag: str) -> str:
    UNPICKLED.append(tag)
    return tag


class Booby:
    """Unpickling an instance calls :func:`_record_unpickling`: a loader that unpickles leaves a trace."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return _record_unpickling, ("unpickled",)


def _stats(seed: int = 0, num_labels: int = 4) -> CorrelationStats:
    preds = random_preds(30, num_labels=num_labels, seed=seed)
    stats = CorrelationStats(num_labels)
    stats.update(preds, (preds > 0.5).double())
    return stats


def _teacher(num_labels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    teacher = _stats(seed=5, num_labels=num_labels).compute().float()
    mask = ~torch.eye(num_labels, dtype=torch.bool)
    mask[0, 1] = mask[1, 0] = False
    return teacher, mask


@pytest.fixture(params=["memory", "directory"])
def exchange(request: pytest.FixtureRequest, tmp_path: Path) -> Exchange:
    return InMemoryExchange() if request.param == "memory" else DirectoryExchange(tmp_path / "shared")


def _write_npz(path: Path, arrays: dict[str, Any], meta: Any = None, allow_pickle: bool = False) -> None:
    """Write an archive the way an arbitrary (possibly hostile) party could."""
    entries = dict(arrays)
    if meta is not None:
        entries["__meta__"] = np.array(meta if isinstance(meta, str) else json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    if allow_pickle:
        np.savez(buffer, **entries)
    else:
        np.savez(buffer, **{k: np.asarray(v) for k, v in entries.items()})
    path.write_bytes(buffer.getvalue())


def _meta(kind: str = "stats", client_id: str = "a", version: Any = 1, **extra: Any) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "kind": kind, "client_id": client_id, "version": version, **extra}


# ---------------------------------------------------------------------------------------------------- round trips
def test_stats_round_trip(exchange: Exchange) -> None:
    assert exchange.read_stats("a") is None
    stats = _stats()
    exchange.publish_stats("a", stats, version=3)
    payload = exchange.read_stats("a")
    assert payload is not None and payload.version == 3
    for name in STATS_FIELDS:
        assert torch.equal(getattr(payload.stats, name), getattr(stats, name))
    assert torch.equal(payload.stats.compute(), stats.compute())
    assert exchange.read_stats("b") is None


def test_stats_read_with_min_label_rate(exchange: Exchange) -> None:
    exchange.publish_stats("a", _stats())
    payload = exchange.read_stats("a", min_label_rate=0.4)
    assert payload is not None and payload.stats.min_label_rate == 0.4 and payload.version == 0


def test_teacher_round_trip(exchange: Exchange) -> None:
    assert exchange.read_teacher("a") is None
    teacher, mask = _teacher()
    exchange.publish_teacher("a", teacher.double(), mask, version=2)
    payload = exchange.read_teacher("a")
    assert payload is not None and payload.version == 2
    assert payload.teacher.dtype == torch.float32 and torch.equal(payload.teacher, teacher)
    assert payload.mask.dtype == torch.bool and torch.equal(payload.mask, mask)


def test_newer_payload_replaces_older(exchange: Exchange) -> None:
    exchange.publish_stats("a", _stats(seed=1), version=1)
    exchange.publish_stats("a", _stats(seed=2), version=2)
    payload = exchange.read_stats("a")
    assert payload is not None and payload.version == 2
    assert torch.equal(payload.stats.sum_outer, _stats(seed=2).sum_outer)


def test_published_payload_is_a_copy(exchange: Exchange) -> None:
    stats = _stats()
    expected = stats.sum_preds.clone()
    exchange.publish_stats("a", stats)
    stats.sum_preds.zero_()
    first = exchange.read_stats("a")
    assert first is not None and torch.equal(first.stats.sum_preds, expected)
    first.stats.sum_preds.zero_()
    second = exchange.read_stats("a")
    assert second is not None and torch.equal(second.stats.sum_preds, expected)


def test_directory_exchange_layout_and_no_temp_files(tmp_path: Path) -> None:
    exchange = DirectoryExchange(str(tmp_path / "shared"))  # a plain string works too
    for version in range(3):
        exchange.publish_stats("client-1", _stats(seed=version), version)
        exchange.publish_teacher("client-1", *_teacher(), version=version)
    files = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["shared/stats/client-1.npz", "shared/teacher/client-1.npz"]
    assert exchange.path("stats", "client-1") == tmp_path / "shared" / "stats" / "client-1.npz"
    # another process reads the same folder
    payload = DirectoryExchange(tmp_path / "shared").read_stats("client-1")
    assert payload is not None and payload.version == 2


def test_failed_write_keeps_old_file_and_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    exchange = DirectoryExchange(tmp_path)
    exchange.publish_stats("a", _stats(seed=1), version=1)

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        exchange.publish_stats("a", _stats(seed=2), version=2)
    monkeypatch.undo()
    assert [p.name for p in (tmp_path / "stats").iterdir()] == ["a.npz"]
    payload = exchange.read_stats("a")
    assert payload is not None and payload.version == 1


# ---------------------------------------------------------------------------------------------------- damaged files
def test_corrupted_file_names_the_file(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("stats", "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not an npz archive at all")
    with pytest.raises(PayloadError, match=rf"{path}: not a readable payload"):
        exchange.read_stats("a")


def test_truncated_file_names_the_file(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    exchange.publish_stats("a", _stats())
    path = exchange.path("stats", "a")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(PayloadError, match=rf"{path}: not a readable payload"):
        exchange.read_stats("a")


def test_single_npy_array_is_not_a_payload(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("teacher", "a")
    path.parent.mkdir(parents=True)
    with path.open("wb") as handle:
        np.save(handle, np.eye(3, dtype=np.float32))
    with pytest.raises(PayloadError, match=rf"{path}: expected an .npz archive"):
        exchange.read_teacher("a")


def test_pickled_object_array_is_rejected_without_unpickling(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("stats", "a")
    arrays: dict[str, Any] = encode_stats(_stats())
    arrays["sum_outer"] = np.array([Booby(), Booby()], dtype=object)
    _write_npz(path, arrays, _meta(), allow_pickle=True)
    # the archive really holds a pickle: a careless loader would run it
    with np.load(path, allow_pickle=True) as archive:
        archive["sum_outer"]
    assert UNPICKLED == ["unpickled", "unpickled"]
    UNPICKLED.clear()
    with pytest.raises(PayloadError, match=rf"{path}: not a readable payload \(ValueError: Object arrays cannot"):
        exchange.read_stats("a")
    assert UNPICKLED == []


def test_pickled_file_is_rejected_without_unpickling(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("teacher", "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"teacher": Booby()}))
    with pytest.raises(PayloadError, match=rf"{path}: not a readable payload"):
        exchange.read_teacher("a")
    assert UNPICKLED == []


# ---------------------------------------------------------------------------------------------------- metadata
@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (None, "expected a metadata entry '__meta__', but it is missing"),
        ("{not json", "metadata is not valid JSON"),
        ([1, 2], "expected metadata to be a JSON object, but got list"),
        (_meta(format_version=2), "expected format version 1, but got 2. HINT: client and server must run compatible"),
        ({"kind": "stats", "client_id": "a", "version": 1}, "expected format version 1, but got None"),
        (_meta(kind="teacher"), "expected a 'stats' payload of client 'a', but got a 'teacher' payload of client 'a'"),
        (_meta(client_id="b"), "expected a 'stats' payload of client 'a', but got a 'stats' payload of client 'b'"),
        (_meta(version="1"), "expected an int `version` in the metadata, but got '1'"),
        (_meta(version=None), "expected an int `version` in the metadata, but got None"),
    ],
)
def test_metadata_errors(tmp_path: Path, meta: Any, match: str) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("stats", "a")
    _write_npz(path, encode_stats(_stats()), meta)
    with pytest.raises(PayloadError, match=match) as info:
        exchange.read_stats("a")
    assert str(path) in str(info.value)


def test_file_copied_to_another_client_is_rejected(tmp_path: Path) -> None:
    exchange = DirectoryExchange(tmp_path)
    exchange.publish_stats("a", _stats())
    exchange.path("stats", "b").write_bytes(exchange.path("stats", "a").read_bytes())
    with pytest.raises(PayloadError, match="expected a 'stats' payload of client 'b', but got a 'stats' payload of"):
        exchange.read_stats("b")


# ---------------------------------------------------------------------------------------------------- payload content
def _bad_stats(edit: str) -> dict[str, Any]:
    arrays: dict[str, Any] = encode_stats(_stats())
    if edit == "missing":
        del arrays["observed_count"]
    elif edit == "float32":
        arrays["sum_preds"] = arrays["sum_preds"].astype(np.float32)
    elif edit == "int":
        arrays["num_samples"] = np.array(30, dtype=np.int64)
    elif edit == "string":
        arrays["sum_preds"] = np.array(["a", "b", "c", "d"])
    elif edit == "shape":
        arrays["sum_outer"] = arrays["sum_outer"][:3]
    elif edit == "nan":
        arrays["sum_outer"] = arrays["sum_outer"].copy()
        arrays["sum_outer"][1, 2] = np.nan
    elif edit == "negative":
        arrays["target_positives"] = -arrays["target_positives"] - 1
    return arrays


STATS_ERRORS = [
    ("missing", r"\['observed_count'\] are missing"),
    ("float32", "expected `sum_preds` to be float64, but got float32"),
    ("int", "expected `num_samples` to be float64, but got int64"),
    ("string", "expected `sum_preds` to be float64, but got <U1"),
    ("shape", r"statistics entry `sum_outer` to have shape \(4, 4\), but got \(3, 4\)"),
    ("nan", "statistics entry `sum_outer` to be finite"),
    ("negative", r"`target_positives` to lie in \[0, num_samples\]"),
]


@pytest.mark.parametrize(("edit", "match"), STATS_ERRORS)
def test_bad_stats_file(tmp_path: Path, edit: str, match: str) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("stats", "a")
    _write_npz(path, _bad_stats(edit), _meta())
    with pytest.raises(PayloadError, match=rf"^{path}: .*{match}"):
        exchange.read_stats("a")


@pytest.mark.parametrize(("edit", "match"), STATS_ERRORS)
def test_bad_stats_in_memory(edit: str, match: str) -> None:
    exchange = InMemoryExchange()
    exchange._write("stats", "a", _bad_stats(edit), 1)
    with pytest.raises(PayloadError, match=rf"^in-memory stats of client 'a': .*{match}"):
        exchange.read_stats("a")


def _bad_teacher(edit: str) -> dict[str, Any]:
    teacher, mask = _teacher()
    arrays: dict[str, Any] = {"teacher": teacher.numpy().copy(), "mask": mask.numpy().copy()}
    if edit == "missing":
        del arrays["mask"]
    elif edit == "not square":
        arrays["teacher"] = arrays["teacher"][:3]
    elif edit == "empty":
        arrays["teacher"] = np.zeros((0, 0), np.float32)
        arrays["mask"] = np.zeros((0, 0), bool)
    elif edit == "mask shape":
        arrays["mask"] = arrays["mask"][:3, :3]
    elif edit == "int teacher":
        arrays["teacher"] = arrays["teacher"].astype(np.int64)
    elif edit == "float mask":
        arrays["mask"] = arrays["mask"].astype(np.float32)
    elif edit == "nan":
        arrays["teacher"][0, 2] = np.nan
    elif edit == "out of range":
        arrays["teacher"][0, 2] = 1.5
    return arrays


TEACHER_ERRORS = [
    ("missing", "expected an entry `mask`, but it is missing"),
    ("not square", r"expected `teacher` of shape \(L, L\), but got \(3, 4\)"),
    ("empty", r"expected `teacher` of shape \(L, L\), but got \(0, 0\)"),
    ("mask shape", r"expected `mask` of shape \(4, 4\), but got \(3, 3\)"),
    ("int teacher", "expected `teacher` to be float32, but got int64"),
    ("float mask", "expected `mask` to be bool, but got float32"),
    ("nan", r"expected `teacher` to hold finite values in \[-1, 1\]"),
    ("out of range", r"expected `teacher` to hold finite values in \[-1, 1\]"),
]


@pytest.mark.parametrize(("edit", "match"), TEACHER_ERRORS)
def test_bad_teacher_file(tmp_path: Path, edit: str, match: str) -> None:
    exchange = DirectoryExchange(tmp_path)
    path = exchange.path("teacher", "a")
    _write_npz(path, _bad_teacher(edit), _meta(kind="teacher"))
    with pytest.raises(PayloadError, match=rf"^{path}: {match}"):
        exchange.read_teacher("a")


@pytest.mark.parametrize(("edit", "match"), TEACHER_ERRORS)
def test_bad_teacher_in_memory(edit: str, match: str) -> None:
    exchange = InMemoryExchange()
    exchange._write("teacher", "a", _bad_teacher(edit), 1)
    with pytest.raises(PayloadError, match=rf"^in-memory teacher of client 'a': {match}"):
        exchange.read_teacher("a")


def test_outgoing_teacher_is_validated(exchange: Exchange) -> None:
    teacher, mask = _teacher()
    with pytest.raises(PayloadError, match=r"^outgoing teacher: expected `teacher` to hold finite values in \[-1, 1\]"):
        exchange.publish_teacher("a", teacher * 3, mask, version=1)
    with pytest.raises(PayloadError, match=r"^outgoing teacher: expected `mask` of shape \(4, 4\), but got \(4,\)"):
        exchange.publish_teacher("a", teacher, mask[0], version=1)
    assert exchange.read_teacher("a") is None
    # a float 0/1 mask is converted on the way out
    exchange.publish_teacher("a", teacher, mask.float(), version=1)
    payload = exchange.read_teacher("a")
    assert payload is not None and torch.equal(payload.mask, mask)
    assert encode_teacher(teacher, mask)["teacher"].dtype == np.float32


# ---------------------------------------------------------------------------------------------------- client ids
@pytest.mark.parametrize("client_id", ["", "../escape", "a/b", ".hidden", "-dash", "x" * 129, "a b", 5, None])
def test_invalid_client_id(exchange: Exchange, client_id: Any) -> None:
    match = r"Expected argument `client_id` to match \[A-Za-z0-9\]\[A-Za-z0-9_.-\]\* \(at most 128 characters\)"
    with pytest.raises(ValueError, match=match):
        exchange.publish_stats(client_id, _stats())
    with pytest.raises(ValueError, match=match):
        exchange.read_stats(client_id)
    with pytest.raises(ValueError, match=match):
        exchange.publish_teacher(client_id, *_teacher(), version=0)
    with pytest.raises(ValueError, match=match):
        exchange.read_teacher(client_id)


@pytest.mark.parametrize("client_id", ["0", "a", "hospital-3", "c.1_b", "x" * 128])
def test_valid_client_id(client_id: str) -> None:
    assert check_client_id(client_id) == client_id
