"""The README's runnable Python example runs as shown and returns the fields its comments name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", ROOT.parent / "shared" / "data"))


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_the_per_client_example_runs_as_shown(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not (DATA_DIR / "yeast").exists():
        pytest.skip(f"the shared yeast data is not at {DATA_DIR / 'yeast'} (set FEDHARMONY_DATA_DIR)")
    (block,) = [b for b in _python_blocks() if "load_federated_data(" in b]
    assert 'data_dir="../shared/data"' in block  # the path from the repository root, as the README's commands use
    code = block.replace('data_dir="../shared/data"', f"data_dir={os.fspath(DATA_DIR)!r}")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # the README's own example
    result = namespace["result"]
    metrics = result.final.client_metrics["3"]
    for key in ("num_samples", "weight", "discrepancy", "sampling_discrepancy", "quality", "val_map", "val_micro_f1"):
        assert key in metrics, key
    pairs = result.final.client_pairs["3"]
    assert pairs and all(isinstance(a, str) and isinstance(b, str) for a, b, *_ in pairs)
    assert all(len(pair) == 4 for pair in pairs)
    assert (tmp_path / "clients.csv").read_text().count("\n") > 30  # one row per round x client
