"""Data helpers for the tests: where the shared benchmark files live, tiny ARFF/XML writers, synthetic labels."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

#: The shared benchmark data: ``$FEDHARMONY_DATA_DIR`` or ``<repo>/../shared/data``.
DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", Path(__file__).resolve().parents[2].parent / "shared" / "data"))


def data_file(*parts: str) -> Path:
    """A path under :data:`DATA_DIR`; skips the test when it is absent."""
    path = DATA_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared benchmark data {str(path)!r} is absent (set FEDHARMONY_DATA_DIR to its folder)")
    return path


def write_xml(path: Path, labels: Sequence[str], nested: bool = False) -> Path:
    """A Mulan XML label file; ``nested`` puts the labels under a parent label (Mulan's hierarchies)."""
    items = "".join(f'<label name="{name}"></label>' for name in labels)
    if nested:
        items = f'<label name="{labels[0]}">{"".join(f"<label name={n!r}></label>" for n in labels[1:])}</label>'
    path.write_text(
        f'<?xml version="1.0" encoding="utf-8"?>\n<labels xmlns="http://mulan.sourceforge.net/labels">'
        f"{items}</labels>\n"
    )
    return path


def write_arff(
    path: Path,
    X: np.ndarray,
    Y: np.ndarray,
    *,
    sparse: bool = False,
    label_first: bool = False,
    feature_names: Sequence[str] | None = None,
    label_names: Sequence[str] | None = None,
) -> Path:
    """A Mulan-style ARFF file of features ``X`` (numeric) and 0/1 labels ``Y`` (nominal ``{0,1}``).

    ``label_first`` puts the label attributes before the features (legal in Mulan: the XML says which are labels).
    """
    features = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(X.shape[1])]
    labels = list(label_names) if label_names is not None else [f"y{i}" for i in range(Y.shape[1])]
    attrs = [f"@attribute {n} numeric" for n in features]
    label_attrs = [f"@attribute {n} {{0,1}}" for n in labels]
    values = np.hstack([Y, X]) if label_first else np.hstack([X, Y])
    header = ["@relation tiny", *(label_attrs + attrs if label_first else attrs + label_attrs), "", "@data"]
    rows = []
    for row in values:
        if sparse:
            rows.append("{" + ",".join(f"{j} {v:g}" for j, v in enumerate(row) if v != 0) + "}")
        else:
            rows.append(",".join(f"{v:g}" for v in row))
    path.write_text("\n".join(header + rows) + "\n")
    return path


def tiny_multilabel(num_samples: int = 12, num_features: int = 3, num_labels: int = 4, seed: int = 0):
    """Seeded ``(X, Y)``: float32 features with a few exact zeros (so sparse rows skip them) and int8 0/1 labels."""
    rng = np.random.default_rng(seed)
    X = np.round(rng.normal(size=(num_samples, num_features)), 3).astype(np.float32)
    X[rng.random(X.shape) < 0.3] = 0.0
    Y = (rng.random((num_samples, num_labels)) < 0.4).astype(np.int8)
    return X, Y


def clustered_labels(num_samples: int = 600, num_labels: int = 8, seed: int = 0) -> np.ndarray:
    """0/1 labels drawn from a few label sets with noise, so label sets repeat as in real multi-label data."""
    rng = np.random.default_rng(seed)
    prototypes = (rng.random((6, num_labels)) < 0.35).astype(np.int8)
    Y = prototypes[rng.integers(0, len(prototypes), num_samples)]
    flips = rng.random(Y.shape) < 0.05
    return np.where(flips, 1 - Y, Y).astype(np.int8)
