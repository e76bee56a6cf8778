"""Loaders for multi-label benchmark data: Mulan ARFF (dense and sparse), MEKA/LAMDA ``.mat``, numpy ``.npz``.

Every loader returns a :class:`MultilabelDataset`: ``X`` float32 ``(N, D)``, ``Y`` int8 0/1 ``(N, L)``, the names,
and the official train/test split where the source ships one. :func:`load_dataset` turns a name or a path into a
``(train, test)`` pair, using the official split when there is one and a seeded random split otherwise.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import re
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DATA_DIR_ENV = "FEDHARMONY_DATA_DIR"
_RIVER_HINT = "HINT: `pip install lightning-fedharmony[datasets]` installs it."
# river ships yeast as Mulan's test file followed by Mulan's train file (checked row by row against Mulan's ARFF)
_RIVER_YEAST_TEST_ROWS = 917
_RIVER_YEAST_ROWS = 2417

_ATTRIBUTE_RE = re.compile(
    r"""^@attribute\s+('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)\s+(.+?)\s*$""", re.IGNORECASE | re.DOTALL
)
_NUMERIC_TYPES = ("numeric", "real", "integer")
_SUFFIXES = (".arff", ".npz", ".mat")


@dataclass(frozen=True, eq=False)
class MultilabelDataset:
    """A multi-label data set held in memory.

    Args:
        X: ``(N, D)`` float32 features.
        Y: ``(N, L)`` int8 labels in ``{0, 1}``.
        label_names: ``L`` label names.
        feature_names: ``D`` feature names.
        X_train: ``(N_train, D)`` features of the official training split, or ``None``.
        Y_train: ``(N_train, L)`` labels of the official training split, or ``None``.
        X_test: ``(N_test, D)`` features of the official test split, or ``None``.
        Y_test: ``(N_test, L)`` labels of the official test split, or ``None``.
        name: a short name (the file or folder it came from).

    Example:
        >>> import numpy as np
        >>> ds = MultilabelDataset(np.zeros((3, 2), np.float32), np.eye(3, dtype=np.int8), ["a", "b", "c"], ["u", "v"])
        >>> ds.num_samples, ds.num_features, ds.num_labels, ds.has_official_split
        (3, 2, 3, False)
    """

    X: np.ndarray
    Y: np.ndarray
    label_names: list[str]
    feature_names: list[str]
    X_train: np.ndarray | None = None
    Y_train: np.ndarray | None = None
    X_test: np.ndarray | None = None
    Y_test: np.ndarray | None = None
    name: str = field(default="")

    @property
    def num_samples(self) -> int:
        """Number of samples ``N``."""
        return int(self.X.shape[0])

    @property
    def num_features(self) -> int:
        """Number of features ``D``."""
        return int(self.X.shape[1])

    @property
    def num_labels(self) -> int:
        """Number of labels ``L``."""
        return int(self.Y.shape[1])

    @property
    def has_official_split(self) -> bool:
        """Whether the source ships an official train/test split."""
        return self.X_train is not None

    def subset(self, indices: np.ndarray | Sequence[int], name: str | None = None) -> MultilabelDataset:
        """The rows ``indices`` of ``X`` and ``Y`` as a new data set without an official split."""
        idx = np.asarray(indices, dtype=np.int64)
        return MultilabelDataset(
            X=self.X[idx],
            Y=self.Y[idx],
            label_names=list(self.label_names),
            feature_names=list(self.feature_names),
            name=self.name if name is None else name,
        )

    def official_split(self) -> tuple[MultilabelDataset, MultilabelDataset]:
        """The official ``(train, test)`` pair.

        Raises:
            RuntimeError: if the data set has no official split.
        """
        if self.X_train is None or self.Y_train is None or self.X_test is None or self.Y_test is None:
            raise RuntimeError(
                f"Data set {self.name!r} has no official train/test split. HINT: use `random_split(test_size, seed)`."
            )
        labels, features = list(self.label_names), list(self.feature_names)
        train = MultilabelDataset(self.X_train, self.Y_train, labels, features, name=f"{self.name}-train")
        test = MultilabelDataset(self.X_test, self.Y_test, list(labels), list(features), name=f"{self.name}-test")
        return train, test

    def random_split(self, test_size: float = 0.3, seed: int = 0) -> tuple[MultilabelDataset, MultilabelDataset]:
        """A seeded random ``(train, test)`` split of all rows (not stratified); rows keep their file order.

        Args:
            test_size: share of the rows in the test part, in ``(0, 1)``; both parts get at least one row.
            seed: seed of the numpy generator.

        Raises:
            ValueError: if ``test_size`` is not in ``(0, 1)`` or there are fewer than 2 rows.
        """
        _check_test_size(test_size)
        n = self.num_samples
        if n < 2:
            raise ValueError(f"Expected at least 2 samples to split data set {self.name!r}, but got {n}.")
        num_test = min(max(round(test_size * n), 1), n - 1)
        perm = np.random.default_rng(seed).permutation(n)
        test_idx, train_idx = np.sort(perm[:num_test]), np.sort(perm[num_test:])
        return self.subset(train_idx, f"{self.name}-train"), self.subset(test_idx, f"{self.name}-test")


def _check_test_size(test_size: float) -> None:
    if not (isinstance(test_size, (int, float)) and 0 < test_size < 1):
        raise ValueError(f"Expected argument `test_size` to be a float in (0, 1), but got {test_size!r}.")


def _validated(
    X: np.ndarray,
    Y: np.ndarray,
    label_names: Sequence[str] | None,
    feature_names: Sequence[str] | None,
    source: str,
    what: str = "",
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """Check shapes and label values; return float32 ``X``, int8 ``Y`` and the names as lists."""
    where = f" {what}" if what else ""
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(
            f"Expected 2-D features and labels{where} in {source}, but got shapes {X.shape} and {Y.shape}."
        )
    if X.shape[0] != Y.shape[0]:
        raise ValueError(
            f"Expected as many label rows as feature rows{where} in {source}, but got {Y.shape[0]} and {X.shape[0]}."
        )
    if Y.shape[1] < 1:
        raise ValueError(f"Expected at least one label column{where} in {source}, but got {Y.shape[1]}.")
    if Y.size and not np.isin(Y, (0, 1)).all():
        bad = ", ".join(f"{float(v):g}" for v in np.unique(Y[~np.isin(Y, (0, 1))])[:5])
        raise ValueError(f"Expected labels{where} in {source} to be 0 or 1, but found the values [{bad}].")
    labels = [f"label{i}" for i in range(Y.shape[1])] if label_names is None else [str(s) for s in label_names]
    features = [f"f{i}" for i in range(X.shape[1])] if feature_names is None else [str(s) for s in feature_names]
    if len(labels) != Y.shape[1] or len(features) != X.shape[1]:
        raise ValueError(
            f"Expected {Y.shape[1]} label names and {X.shape[1]} feature names in {source}, but got"
            f" {len(labels)} and {len(features)}."
        )
    return np.ascontiguousarray(X, dtype=np.float32), np.ascontiguousarray(Y, dtype=np.int8), labels, features


def _require_file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"Expected a data file at {str(p)!r}, but it does not exist.")
    return p


# ---------------------------------------------------------------------------------------------------------------------
# ARFF
# ---------------------------------------------------------------------------------------------------------------------
# Own parser: scipy.io.arff.loadarff rejects sparse rows (`{index value, ...}`), the format of most Mulan text
# benchmarks (tmc2007, delicious, ...), and parses dense rows in Python one value at a time. Here the data section is
# split once and converted by numpy in a single call, which reads tmc2007-500's training file in well under a second.


def _unquote(name: str) -> str:
    if len(name) >= 2 and name[0] == name[-1] and name[0] in "'\"":
        return re.sub(r"\\(.)", r"\1", name[1:-1])
    return name


@dataclass(frozen=True)
class _ArffHeader:
    relation: str
    names: list[str]
    types: list[str]
    data_lines: list[str]


def _read_arff(path: Path) -> _ArffHeader:
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    names: list[str] = []
    types: list[str] = []
    relation = path.stem
    data_start = None
    for i, raw in enumerate(lines):
        line = raw.strip()
        if not line or line.startswith("%"):
            continue
        lower = line[:10].lower()
        if lower.startswith("@relation"):
            relation = _unquote(line[len("@relation") :].strip())
        elif lower.startswith("@attribute"):
            match = _ATTRIBUTE_RE.match(line)
            if match is None:
                raise ValueError(f"Expected `@attribute <name> <type>` on line {i + 1} of {str(path)!r}, got {line!r}.")
            names.append(_unquote(match.group(1)))
            types.append(match.group(2).strip())
        elif lower.startswith("@data"):
            data_start = i + 1
            break
        else:
            raise ValueError(f"Unexpected line {i + 1} in the header of {str(path)!r}: {line[:80]!r}.")
    if data_start is None:
        raise ValueError(f"Expected an `@data` line in {str(path)!r}, but found none. Is it an ARFF file?")
    if not names:
        raise ValueError(f"Expected `@attribute` lines in {str(path)!r}, but found none.")
    for name, typ in zip(names, types):
        low = typ.lower()
        if low in _NUMERIC_TYPES:
            continue
        if typ.startswith("{") and typ.endswith("}"):
            values = [v.strip().strip("'\"") for v in typ[1:-1].split(",")]
            try:
                [float(v) for v in values]
            except ValueError:
                pass
            else:
                continue
        raise ValueError(
            f"Expected numeric attributes or nominal attributes with numeric values in {str(path)!r}, but attribute"
            f" {name!r} has type {typ!r}."
        )
    data_lines = [ln.strip() for ln in lines[data_start:]]
    data_lines = [ln for ln in data_lines if ln and not ln.startswith("%")]
    return _ArffHeader(relation, names, types, data_lines)


def _to_float(tokens: list[str], path: Path) -> np.ndarray:
    try:
        return np.array(tokens, dtype=np.float64)
    except ValueError:
        bad = next(t for t in tokens if not _is_float(t))
        hint = " Missing values ('?') are not supported." if bad.strip() == "?" else ""
        raise ValueError(f"Expected numeric values in the data of {str(path)!r}, but found {bad!r}.{hint}") from None


def _is_float(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def _parse_dense(lines: list[str], num_attrs: int, path: Path) -> np.ndarray:
    counts = np.fromiter((ln.count(",") + 1 for ln in lines), dtype=np.int64, count=len(lines))
    ragged = np.flatnonzero(counts != num_attrs)
    if ragged.size:
        row = int(ragged[0])
        raise ValueError(
            f"Expected {num_attrs} comma-separated values on every data row of {str(path)!r}, but row {row + 1} has"
            f" {int(counts[row])} ({ragged.size} ragged rows in all)."
        )
    if not lines:
        return np.zeros((0, num_attrs))
    values = _to_float(",".join(lines).split(","), path)
    return values.reshape(len(lines), num_attrs)


def _parse_sparse(lines: list[str], num_attrs: int, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows, columns and values of the explicit entries of sparse rows ``{index value, ...}``."""
    bodies = []
    for i, ln in enumerate(lines):
        if not (ln.startswith("{") and ln.endswith("}")):
            raise ValueError(
                f"Expected every data row of the sparse ARFF file {str(path)!r} to be `{{index value, ...}}`, but row"
                f" {i + 1} is {ln[:60]!r}."
            )
        bodies.append(ln[1:-1].strip())
    counts = np.fromiter((b.count(",") + 1 if b else 0 for b in bodies), dtype=np.int64, count=len(bodies))
    tokens = " ".join(b.replace(",", " ") for b in bodies if b).split()
    if len(tokens) != 2 * int(counts.sum()):
        pair_counts = np.fromiter((len(b.replace(",", " ").split()) for b in bodies), dtype=np.int64)
        row = int(np.flatnonzero(pair_counts != 2 * counts)[0])
        raise ValueError(
            f"Expected `index value` pairs on every sparse row of {str(path)!r}, but row {row + 1} is"
            f" {lines[row][:60]!r}."
        )
    pairs = _to_float(tokens, path).reshape(-1, 2)
    cols = pairs[:, 0]
    if pairs.size and (cols.min() < 0 or cols.max() >= num_attrs or not np.array_equal(cols, np.round(cols))):
        bad = int(np.flatnonzero((cols < 0) | (cols >= num_attrs) | (cols != np.round(cols)))[0])
        row = int(np.searchsorted(np.cumsum(counts), bad, side="right"))
        raise ValueError(
            f"Expected sparse attribute indices in [0, {num_attrs}) in {str(path)!r}, but row {row + 1} has index"
            f" {cols[bad]:g}."
        )
    rows = np.repeat(np.arange(len(bodies), dtype=np.int64), counts)
    return rows, cols.astype(np.int64), pairs[:, 1]


def read_mulan_xml(path: str | os.PathLike[str]) -> list[str]:
    """Label names from a Mulan XML label file, in document order (hierarchies are flattened).

    Args:
        path: the ``.xml`` file.

    Returns:
        The label names.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if it is not valid XML or names no label.
    """
    p = _require_file(path)
    try:
        root = ET.parse(p).getroot()
    except ET.ParseError as err:
        raise ValueError(f"Expected a Mulan XML label file at {str(p)!r}, but it is not valid XML: {err}.") from None
    names = [el.attrib["name"] for el in root.iter() if el.tag.rsplit("}", 1)[-1] == "label" and "name" in el.attrib]
    if not names:
        raise ValueError(f"Expected `<label name=...>` elements in {str(p)!r}, but found none.")
    return names


def _mulan_base(path: Path) -> str:
    stem = path.stem
    for suffix in ("-train", "-test", "_train", "_test"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def _sibling_xml(path: Path) -> Path | None:
    for candidate in (path.with_suffix(".xml"), path.with_name(_mulan_base(path) + ".xml")):
        if candidate.is_file():
            return candidate
    return None


def load_arff(
    path: str | os.PathLike[str],
    xml_path: str | os.PathLike[str] | None = None,
    num_labels: int | None = None,
) -> MultilabelDataset:
    """Load a Mulan ARFF file with dense or sparse (``{index value, ...}``) rows.

    The label attributes are those named in the Mulan XML file, kept in the order of the ARFF header (Mulan's XML may
    list them in another order); every other attribute is a feature. Without an XML file, ``num_labels`` takes the
    last ``num_labels`` attributes as labels. With neither, the XML beside the file is used (``<name>.xml`` for
    ``<name>-train.arff``).

    Args:
        path: the ``.arff`` file.
        xml_path: the Mulan XML file naming the labels.
        num_labels: the number of labels; with ``xml_path`` it must equal the number of labels the XML names.

    Returns:
        The data set, without an official split (see :func:`load_dataset` for the ``-train`` / ``-test`` pair).

    Raises:
        FileNotFoundError: if a file is missing.
        ValueError: on a malformed file, labels the ARFF does not declare, a wrong number of labels, labels other than
            0/1, ragged rows or non-numeric values. Every message names the file.

    Example:
        >>> import tempfile, pathlib
        >>> tmp = pathlib.Path(tempfile.mkdtemp()) / "tiny.arff"
        >>> _ = tmp.write_text("@relation t\\n@attribute a numeric\\n@attribute y {0,1}\\n@data\\n{0 2.5,1 1}\\n{}\\n")
        >>> ds = load_arff(tmp, num_labels=1)
        >>> ds.X.tolist(), ds.Y.tolist(), ds.label_names
        ([[2.5], [0.0]], [[1], [0]], ['y'])
    """
    p = _require_file(path)
    if num_labels is not None and not (isinstance(num_labels, int) and num_labels >= 1):
        raise ValueError(f"Expected argument `num_labels` to be a positive int or None, but got {num_labels!r}.")
    xml = Path(xml_path) if xml_path is not None else (_sibling_xml(p) if num_labels is None else None)
    if xml_path is None and num_labels is None and xml is None:
        raise ValueError(
            f"Expected a Mulan XML label file beside {str(p)!r} (tried {p.with_name(_mulan_base(p) + '.xml').name!r})"
            " to know which attributes are labels. HINT: pass `xml_path=` or `num_labels=`."
        )
    header = _read_arff(p)
    names, num_attrs = header.names, len(header.names)
    if xml is not None:
        xml_names = read_mulan_xml(xml)
        if num_labels is not None and num_labels != len(xml_names):
            raise ValueError(
                f"Expected argument `num_labels` to equal the {len(xml_names)} labels named in {str(xml)!r}, but got"
                f" {num_labels}."
            )
        position = {n: i for i, n in enumerate(names)}
        missing = [n for n in xml_names if n not in position]
        if missing:
            raise ValueError(
                f"Expected the labels named in {str(xml)!r} to be attributes of {str(p)!r}, but {len(missing)} are not"
                f" (e.g. {missing[:3]})."
            )
        label_cols = np.sort(np.array([position[n] for n in xml_names], dtype=np.int64))
    else:
        if num_labels is None or num_labels >= num_attrs:
            raise ValueError(
                f"Expected argument `num_labels` to be smaller than the {num_attrs} attributes of {str(p)!r}, but got"
                f" {num_labels}."
            )
        label_cols = np.arange(num_attrs - num_labels, num_attrs)
    is_label = np.zeros(num_attrs, dtype=bool)
    is_label[label_cols] = True
    feature_cols = np.flatnonzero(~is_label)
    n = len(header.data_lines)
    sparse = n > 0 and header.data_lines[0].startswith("{")
    if sparse:
        rows, cols, vals = _parse_sparse(header.data_lines, num_attrs, p)
        # position of every attribute inside X or Y
        slot = np.empty(num_attrs, dtype=np.int64)
        slot[feature_cols] = np.arange(feature_cols.size)
        slot[label_cols] = np.arange(label_cols.size)
        X = np.zeros((n, feature_cols.size), dtype=np.float32)
        Y = np.zeros((n, label_cols.size), dtype=np.float64)
        on_label = is_label[cols]
        X[rows[~on_label], slot[cols[~on_label]]] = vals[~on_label]
        Y[rows[on_label], slot[cols[on_label]]] = vals[on_label]
    else:
        values = _parse_dense(header.data_lines, num_attrs, p)
        X, Y = values[:, feature_cols], values[:, label_cols]
    labels = [names[i] for i in label_cols]
    features = [names[i] for i in feature_cols]
    X, Y8, labels, features = _validated(X, Y, labels, features, repr(str(p)))
    return MultilabelDataset(X, Y8, labels, features, name=header.relation)


# ---------------------------------------------------------------------------------------------------------------------
# .mat and .npz
# ---------------------------------------------------------------------------------------------------------------------


def _dense(array: Any) -> np.ndarray:
    import scipy.sparse as sp

    return np.asarray(array.toarray() if sp.issparse(array) else array)


def _mat_labels(target: np.ndarray, num_samples: int, source: str, key: str) -> np.ndarray:
    if target.ndim != 2 or target.shape[1] != num_samples:
        raise ValueError(
            f"Expected `{key}` in {source} to be labels x instances with {num_samples} instances, but got shape"
            f" {target.shape}."
        )
    values = np.unique(target)
    if values.size and not (np.isin(values, (-1, 1)).all() or np.isin(values, (0, 1)).all()):
        raise ValueError(
            f"Expected `{key}` in {source} to hold values in {{-1, 1}} or {{0, 1}}, but found {values[:5].tolist()}."
        )
    return (target.T > 0).astype(np.int8)


def load_mat(path: str | os.PathLike[str]) -> MultilabelDataset:
    """Load a MEKA/LAMDA MATLAB file: ``data`` (instances x features) and ``target`` (labels x instances).

    ``target`` may hold {-1, 1} or {0, 1}; sparse matrices are densified. When the file also holds ``train_data`` /
    ``train_target`` / ``test_data`` / ``test_target`` (LAMDA's split files), they become the official split and
    ``X`` / ``Y`` their concatenation. Label and feature names are ``label<i>`` and ``f<i>``.

    Args:
        path: the ``.mat`` file (MATLAB v5 or older; v7.3 files are HDF5 and not supported).

    Returns:
        The data set.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on missing keys, shapes that do not fit or label values outside {-1, 1} / {0, 1}.
    """
    import scipy.io

    p = _require_file(path)
    source = repr(str(p))
    try:
        mat = scipy.io.loadmat(p)
    except NotImplementedError:
        raise ValueError(
            f"Expected a MATLAB v5 file at {source}, but it is a v7.3 (HDF5) file. HINT: convert it to `.npz`."
        ) from None
    except ValueError as err:
        raise ValueError(f"Expected a MATLAB file at {source}, but scipy could not read it: {err}.") from None
    split_keys = ("train_data", "train_target", "test_data", "test_target")
    if all(k in mat for k in split_keys):
        parts = {}
        for part in ("train", "test"):
            x = _dense(mat[f"{part}_data"]).astype(np.float32)
            y = _mat_labels(_dense(mat[f"{part}_target"]), x.shape[0], source, f"{part}_target")
            parts[part] = _validated(x, y, None, None, source, f"of the {part} split")[:2]
        (x_tr, y_tr), (x_te, y_te) = parts["train"], parts["test"]
        X, Y, labels, features = _validated(np.vstack([x_tr, x_te]), np.vstack([y_tr, y_te]), None, None, source)
        return MultilabelDataset(X, Y, labels, features, x_tr, y_tr, x_te, y_te, name=p.stem)
    if "data" not in mat or "target" not in mat:
        keys = sorted(k for k in mat if not k.startswith("__"))
        raise ValueError(f"Expected the keys `data` and `target` in {source}, but found {keys}.")
    X = _dense(mat["data"]).astype(np.float32)
    if X.ndim != 2:
        raise ValueError(f"Expected `data` in {source} to be instances x features, but got shape {X.shape}.")
    Y = _mat_labels(_dense(mat["target"]), X.shape[0], source, "target")
    X, Y, labels, features = _validated(X, Y, None, None, source)
    return MultilabelDataset(X, Y, labels, features, name=p.stem)


def load_npz(path: str | os.PathLike[str]) -> MultilabelDataset:
    """Load a ``.npz`` archive (read with ``allow_pickle=False``).

    Keys: ``X`` ``(N, D)`` and ``Y`` ``(N, L)`` 0/1, optional ``label_names`` and ``feature_names``, and optional
    ``X_train`` / ``Y_train`` / ``X_test`` / ``Y_test`` (the official split). With only the four split keys, ``X`` and
    ``Y`` are train followed by test.

    Args:
        path: the ``.npz`` file.

    Returns:
        The data set.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: on missing keys, shapes that do not fit, labels other than 0/1, or an object array.
    """
    p = _require_file(path)
    source = repr(str(p))
    try:
        archive = np.load(p, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise ValueError(f"Expected a numpy `.npz` archive at {source}, but it could not be read: {err}.") from None
    with archive as npz:
        try:
            arrays = {k: npz[k] for k in npz.files}
        except ValueError as err:
            raise ValueError(f"Expected only plain arrays in {source} (no pickled objects): {err}.") from None
    split_keys = ("X_train", "Y_train", "X_test", "Y_test")
    present = [k for k in split_keys if k in arrays]
    if present and len(present) != len(split_keys):
        raise ValueError(f"Expected all of {list(split_keys)} or none in {source}, but found only {present}.")
    if "X" not in arrays or "Y" not in arrays:
        if not present:
            raise ValueError(
                f"Expected the keys `X` and `Y` (or the four split keys) in {source}, but found {sorted(arrays)}."
            )
        arrays["X"] = np.concatenate([arrays["X_train"], arrays["X_test"]])
        arrays["Y"] = np.concatenate([arrays["Y_train"], arrays["Y_test"]])
    label_names = arrays["label_names"].tolist() if "label_names" in arrays else None
    feature_names = arrays["feature_names"].tolist() if "feature_names" in arrays else None
    X, Y, labels, features = _validated(arrays["X"], arrays["Y"], label_names, feature_names, source)
    if not present:
        return MultilabelDataset(X, Y, labels, features, name=p.stem)
    x_tr, y_tr = _validated(arrays["X_train"], arrays["Y_train"], labels, features, source, "of the train split")[:2]
    x_te, y_te = _validated(arrays["X_test"], arrays["Y_test"], labels, features, source, "of the test split")[:2]
    return MultilabelDataset(X, Y, labels, features, x_tr, y_tr, x_te, y_te, name=p.stem)


# ---------------------------------------------------------------------------------------------------------------------
# river's yeast
# ---------------------------------------------------------------------------------------------------------------------


def _river_yeast_path() -> Path:
    # find_spec on a top-level name locates the package without executing river/__init__.py (which imports numpy,
    # pandas, scipy and river's compiled modules); importlib.resources.files("river.datasets") would import it
    spec = importlib.util.find_spec("river")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"Loading yeast from river requires the package `river`, which is not installed. {_RIVER_HINT}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "datasets" / "yeast.csv.gz"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"Expected river to ship `datasets/yeast.csv.gz` under {list(spec.submodule_search_locations)}, but it does"
        " not. HINT: upgrade river (`pip install -U river`)."
    )


def load_yeast_from_river() -> MultilabelDataset:
    """Yeast (Elisseeff and Weston, 2001) as shipped in the PyPI package ``river`` (``river/datasets/yeast.csv.gz``).

    The csv has a header row; columns ``Att1..Att103`` are the features and ``Class1..Class14`` (the last 14) the
    labels, as 0/1. Its 2,417 rows are Mulan's ``yeast-test.arff`` (917 rows) followed by ``yeast-train.arff``
    (1,500 rows), in Mulan's order (checked row by row), so the official split is rows ``917:`` for training and
    rows ``:917`` for testing. ``X``/``Y`` keep river's row order. river itself is not imported.

    Returns:
        The data set with Mulan's official split.

    Raises:
        ModuleNotFoundError: if river is not installed.
        FileNotFoundError: if the installed river does not ship yeast.
        ValueError: if the file does not have the expected layout.
    """
    path = _river_yeast_path()
    source = repr(str(path))
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        text = fh.read()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"Expected a csv with a header row in {source}, but it is empty.")
    header = [h.strip() for h in lines[0].split(",")]
    values = _parse_dense(lines[1:], len(header), path)
    is_label = np.array([re.fullmatch(r"Class\d+", h) is not None for h in header])
    if is_label.sum() != 14:
        raise ValueError(f"Expected 14 label columns `Class1..Class14` in {source}, but found {int(is_label.sum())}.")
    names = np.array(header)
    X, Y, labels, features = _validated(
        values[:, ~is_label], values[:, is_label], names[is_label].tolist(), names[~is_label].tolist(), source
    )
    if X.shape[0] != _RIVER_YEAST_ROWS:
        warnings.warn(
            f"Expected {_RIVER_YEAST_ROWS} rows in {source}, but found {X.shape[0]}; Mulan's official split is not"
            " applied and `load_dataset` falls back to a seeded random split.",
            stacklevel=2,
        )
        return MultilabelDataset(X, Y, labels, features, name="yeast")
    k = _RIVER_YEAST_TEST_ROWS
    return MultilabelDataset(X, Y, labels, features, X[k:], Y[k:], X[:k], Y[:k], name="yeast")


# ---------------------------------------------------------------------------------------------------------------------
# names and paths
# ---------------------------------------------------------------------------------------------------------------------


def default_data_dir() -> Path:
    """The data directory: ``$FEDHARMONY_DATA_DIR`` when set, else ``./data``."""
    return Path(os.environ.get(DATA_DIR_ENV, "data"))


def _train_test_arff(path: Path) -> tuple[Path, Path] | None:
    stem = path.stem
    for train_suffix, test_suffix in (("-train", "-test"), ("_train", "_test")):
        if stem.endswith(train_suffix):
            other = path.with_name(stem[: -len(train_suffix)] + test_suffix + path.suffix)
            return (path, other) if other.is_file() else None
        if stem.endswith(test_suffix):
            other = path.with_name(stem[: -len(test_suffix)] + train_suffix + path.suffix)
            return (other, path) if other.is_file() else None
    return None


def _load_file(path: Path) -> MultilabelDataset | tuple[MultilabelDataset, MultilabelDataset]:
    suffix = path.suffix.lower()
    if suffix == ".arff":
        pair = _train_test_arff(path)
        if pair is None:
            return load_arff(path)
        train, test = load_arff(pair[0]), load_arff(pair[1])
        if train.label_names != test.label_names or train.feature_names != test.feature_names:
            raise ValueError(f"Expected {str(pair[0])!r} and {str(pair[1])!r} to declare the same attributes.")
        return train, test
    if suffix == ".npz":
        return load_npz(path)
    if suffix == ".mat":
        return load_mat(path)
    raise ValueError(f"Expected a file ending in one of {_SUFFIXES}, but got {str(path)!r}.")


def _unique(folder: Path, pattern: str) -> Path | None:
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        raise ValueError(
            f"Expected at most one `{pattern}` file in {str(folder)!r}, but found {[f.name for f in found]}. HINT: pass"
            " the file's path instead of the folder."
        )
    return found[0] if found else None


def _resolve_folder(folder: Path) -> Path:
    """The file a data set folder is read from: ``.npz``, else the ``-train.arff`` / ``-test.arff`` pair, else one
    ``.arff``, else one ``.mat``."""
    name = folder.name
    exact = [folder / f"{name}.npz", folder / f"{name}-train.arff", folder / f"{name}.arff"]
    for candidate in exact:
        if candidate.is_file():
            return candidate
    for pattern in ("*.npz", "*-train.arff", "*.arff", "*.mat"):
        found = _unique(folder, pattern)
        if found is not None:
            return found
    raise FileNotFoundError(f"Expected a `.npz`, `.arff` or `.mat` file in {str(folder)!r}, but found none.")


def load_dataset(
    name_or_path: str | os.PathLike[str],
    data_dir: str | os.PathLike[str] | None = None,
    test_size: float = 0.3,
    seed: int = 0,
) -> tuple[MultilabelDataset, MultilabelDataset]:
    """Load a data set by name or path and return ``(train, test)``.

    ``name_or_path`` is one of:

    - a file: ``.arff`` (labels from the XML beside it; ``<name>-train.arff`` is read with its ``<name>-test.arff``
      sibling as the official split), ``.npz`` or ``.mat``;
    - a folder, or the name of a folder in ``data_dir``: read from ``<name>.npz`` when present (fastest; the shared
      ``.npz`` files hold the same arrays as the ARFF files), else the ``-train.arff`` / ``-test.arff`` pair, else a
      single ``.arff``, else a single ``.mat``;
    - ``"river:yeast"``: :func:`load_yeast_from_river`.

    The official train/test split is used when the source has one; otherwise a seeded random split (not stratified)
    with ``test_size`` of the rows in the test part.

    Args:
        name_or_path: the data set's name, folder or file.
        data_dir: the folder holding data set folders; defaults to ``$FEDHARMONY_DATA_DIR`` or ``./data``.
        test_size: share of the rows in the test part when there is no official split, in ``(0, 1)``.
        seed: seed of the random split.

    Returns:
        ``(train, test)`` data sets without official splits of their own.

    Raises:
        FileNotFoundError: if no such file or folder exists.
        ValueError: on a bad ``test_size``, an unknown suffix, or any error of the loaders.
    """
    _check_test_size(test_size)
    spec = str(name_or_path)
    if spec == "river:yeast":
        loaded: MultilabelDataset | tuple[MultilabelDataset, MultilabelDataset] = load_yeast_from_river()
    else:
        path = Path(name_or_path)
        is_name = path.parent == Path(".") and path.suffix.lower() not in _SUFFIXES
        # a bare name is looked up in `data_dir` when one is given, else in the working directory, then the default
        if is_name and (data_dir is not None or not path.exists()):
            root = Path(data_dir) if data_dir is not None else default_data_dir()
            path = root / spec
            if not path.is_dir():
                raise FileNotFoundError(
                    f"Expected a data set folder {str(path)!r} for the name {spec!r}, but it does not exist. HINT: pass"
                    f" `data_dir=` or set ${DATA_DIR_ENV}; yeast is also available as 'river:yeast'."
                )
        if not path.exists():
            raise FileNotFoundError(f"Expected a data file or folder at {str(path)!r}, but it does not exist.")
        loaded = _load_file(_resolve_folder(path) if path.is_dir() else path)
    if isinstance(loaded, tuple):
        return loaded
    if loaded.has_official_split:
        return loaded.official_split()
    return loaded.random_split(test_size=test_size, seed=seed)
