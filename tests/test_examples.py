"""The examples: the two-line change, its federation script, and a user's own LightningCLI script."""

from __future__ import annotations

import difflib
import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType

import pytest
import torch

from lightning_fedharmony import DirectoryExchange

REPO = Path(__file__).resolve().parents[1]
TWO_LINE = REPO / "examples" / "two_line_change"
LIGHTNING_CLI = REPO / "examples" / "lightning_cli"
MIXIN_IMPORT = "from lightning_fedharmony import FedHarmonyMixin"


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_import(line: str) -> bool:
    return line.startswith(("import ", "from "))


def test_two_line_change_is_two_lines():
    plain = (TWO_LINE / "model.py").read_text().splitlines()
    fed = (TWO_LINE / "model_fedharmony.py").read_text().splitlines()
    removed: list[str] = []
    added: list[str] = []
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=plain, b=fed, autojunk=False).get_opcodes():
        if tag in ("replace", "delete"):
            removed += plain[i1:i2]
        if tag in ("replace", "insert"):
            added += fed[j1:j2]
    added_imports = [line for line in added if _is_import(line)]
    assert added_imports == [MIXIN_IMPORT]
    # BCE now comes from the mixin: the functional import it used goes
    assert [line for line in removed if _is_import(line)] == ["import torch.nn.functional as F"]
    changed_old = [line for line in removed if line.strip() and not _is_import(line)]
    changed_new = [line for line in added if line.strip() and not _is_import(line)]
    assert len(changed_old) == len(changed_new) == 2, (changed_old, changed_new)
    assert changed_old[0].startswith("class TagClassifier(pl.LightningModule)")
    assert changed_new[0].startswith("class TagClassifier(FedHarmonyMixin, pl.LightningModule)")
    assert "binary_cross_entropy_with_logits" in changed_old[1]
    assert changed_new[1].strip() == "loss = self.fedharmony_loss(self(x), y)"
    # apart from the import block (one import swapped, one blank line), nothing else moved
    assert len(fed) - len(plain) in (0, 1)


def test_fedharmony_module_equals_plain_module_without_teacher():
    plain_cls = _load(TWO_LINE / "model.py", "two_line_model").TagClassifier
    fed_cls = _load(TWO_LINE / "model_fedharmony.py", "two_line_model_fedharmony").TagClassifier
    torch.manual_seed(0)
    plain = plain_cls(num_features=6, num_labels=4, hidden=8)
    torch.manual_seed(0)
    fed = fed_cls(num_features=6, num_labels=4, hidden=8)
    assert not fed.fedharmony_has_teacher
    for (name, a), (_, b) in zip(plain.named_parameters(), fed.named_parameters()):
        assert torch.equal(a, b), name
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=generator)
    y = (torch.rand(16, 4, generator=generator) < 0.4).float()
    with warnings.catch_warnings():  # `self.log` outside a Trainer only warns
        warnings.simplefilter("ignore")
        plain_loss = plain.training_step((x, y), 0)
        fed_loss = fed.training_step((x, y), 0)
    torch.testing.assert_close(fed_loss, plain_loss, rtol=0, atol=0)
    plain_loss.backward()
    fed_loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), fed.named_parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=name)


def _run(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done


def test_federate_script_runs_one_round():
    pytest.importorskip("river", reason="the example federates yeast as shipped with river")
    done = _run([str(TWO_LINE / "federate.py"), "--rounds", "1"], cwd=REPO)
    assert "round   1/1" in done.stdout
    final = [line for line in done.stdout.splitlines() if line.startswith("final mAP")]
    assert len(final) == 1
    assert 0.0 < float(final[0].split()[-1]) <= 1.0


def test_lightning_cli_example_exports_statistics(tmp_path):
    pytest.importorskip("river", reason="the example's client reads yeast as shipped with river")
    config = (LIGHTNING_CLI / "config.yaml").read_text()
    # the callback's `exchange` (typed `Exchange | str | None`) is a plain folder path in the YAML
    assert "exchange: fedharmony_runs/exchange" in config
    exchange = tmp_path / "exchange"
    local = tmp_path / "client.yaml"
    local.write_text(config.replace("exchange: fedharmony_runs/exchange", f"exchange: {exchange}"))
    args = [str(LIGHTNING_CLI / "train.py"), "fit", "--config", str(local)]
    args += [
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        f"--trainer.default_root_dir={tmp_path / 'root'}",
    ]
    _run(args, cwd=REPO)
    assert (exchange / "stats" / "client-0.npz").is_file()
    payload = DirectoryExchange(exchange).read_stats("client-0")
    assert payload is not None and payload.version == 1  # one epoch, one export
    assert payload.stats.num_labels == 14
    assert float(payload.stats.num_samples) > 0
    assert (tmp_path / "root" / "config.yaml").is_file()  # LightningCLI's saved copy of the configuration
