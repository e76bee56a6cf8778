"""The ``fedharmony`` command: runs, outputs, reproducibility, one-line configuration errors, the entry point.

The runs use the built-in default data set (yeast shipped inside ``river``) with 3 clients, 2 rounds and a small
MLP, so each takes a few seconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_fedharmony.cli import main
from lightning_fedharmony.config import load_config

pytest.importorskip("river", reason="the default data set (yeast) ships with the `datasets` extra (river)")

REPO = Path(__file__).resolve().parents[1]
#: The small run every test shares (overrides), and the same settings as a YAML file.
SMALL = [
    "federation.num_rounds=2",
    "federation.batch_size=256",
    "partition.num_clients=3",
    "model.init_args.hidden=[32]",
]
SMALL_YAML = """\
federation:
  num_rounds: 5          # overridden back to 2 on the command line
  batch_size: 256
partition:
  num_clients: 3
model:
  init_args:
    hidden: [32]
"""
METHODS = ["--methods", "fedavg,fedharmony", "--quiet"]


def _numbers(out_dir: Path) -> dict[str, dict[str, float]]:
    """Every method's summary from results.json, without the wall-clock seconds."""
    methods = json.loads((out_dir / "results.json").read_text())["methods"]
    return {name: {k: v for k, v in row.items() if k != "seconds"} for name, row in methods.items()}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("run") / "a"
    capture = tmp_path_factory.mktemp("stdout") / "stdout.txt"
    # module-scoped, so capsys is unavailable: redirect stdout by hand
    saved = sys.stdout
    with open(capture, "w") as handle:
        sys.stdout = handle
        try:
            code = main(["run", *METHODS, *SMALL, f"out_dir={out}"])
        finally:
            sys.stdout = saved
    assert code == 0
    return out, capture.read_text()


def test_run_prints_table_and_writes_outputs(first_run):
    out, stdout = first_run
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| method |"))
    assert "final mAP" in lines[header] and "Hamming loss" in lines[header]
    assert [line.split("|")[1].strip() for line in lines[header + 2 : header + 4]] == ["fedavg", "fedharmony"]
    for name in ("results.json", "results.md", "config.yaml", "history_fedavg.csv", "history_fedharmony.csv"):
        assert (out / name).is_file(), name
    assert (out / "map_per_round.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "consensus_fedharmony.png").is_file()
    report = json.loads((out / "results.json").read_text())
    assert report["dataset"] == "river:yeast" and report["num_labels"] == 14
    assert len(report["partition"]["sizes"]) == 3
    for row in report["methods"].values():
        assert 0 < row["final_map"] <= row["best_map"] <= 1
        assert row["best_round"] in (1.0, 2.0)
    assert (out / "results.md").read_text().startswith("| method |")
    csv_lines = (out / "history_fedharmony.csv").read_text().splitlines()
    assert len(csv_lines) == 3 and csv_lines[0].startswith("round,")


def test_run_reports_each_client(first_run):
    out, stdout = first_run
    lines = stdout.splitlines()
    table_end = max(i for i, line in enumerate(lines) if line.startswith("| "))
    summary = [line for line in lines[table_end + 1 :] if line.strip()]
    assert summary[0] == "fedharmony, round 2: clients that disagree most with their teachers"
    assert summary[1].startswith("  client ") and " disagrees most: s=" in summary[1]
    assert "(sampling " in summary[1] and ", weight " in summary[1] and " vs teacher " in summary[1]
    assert not any(line.startswith("fedavg, round") for line in summary)
    history = json.loads((out / "history_fedharmony.json").read_text())["rounds"][-1]
    assert set(history["client_metrics"]) == {"0", "1", "2"}
    assert all("val_map" in v and "discrepancy" in v for v in history["client_metrics"].values())
    names = {name for pairs in history["client_pairs"].values() for pair in pairs for name in pair[:2]}
    assert names and all(name.startswith("Class") for name in names)  # yeast's own label names
    for name, columns in (("fedavg", 18), ("fedharmony", 23)):  # 14 columns of each client's own report
        rows = (out / f"clients_{name}.csv").read_text().splitlines()
        assert len(rows) == 1 + 2 * 3 and len(rows[0].split(",")) == columns
    for picture in ("clients_discrepancy_fedharmony.png", "clients_map_fedharmony.png", "clients_map_fedavg.png"):
        assert (out / picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", picture


def test_federated_evaluation_follows_the_run_config(tmp_path):
    args = ["run", "--methods", "fedavg", "--quiet", *SMALL, "plots=false"]
    assert main([*args, f"out_dir={tmp_path / 'none'}", "federation.federated_eval=none"]) == 0
    assert (
        main([*args, f"out_dir={tmp_path / 'binned'}", "federation.federated_eval=binned", "federation.eval_bins=50"])
        == 0
    )
    off = json.loads((tmp_path / "none" / "history_fedavg.json").read_text())["rounds"][-1]
    binned = json.loads((tmp_path / "binned" / "history_fedavg.json").read_text())["rounds"][-1]
    assert "fed_map" not in off["metrics"] and not any("val_map" in v for v in off["client_metrics"].values())
    assert 0 < binned["metrics"]["fed_map"] <= 1 and all("val_map" in v for v in binned["client_metrics"].values())


def test_saved_config_is_the_resolved_run_config(first_run):
    out, _ = first_run
    saved = load_config(out / "config.yaml")
    assert saved == load_config(None, [*SMALL, f"out_dir={out}"])
    assert saved.federation.num_rounds == 2 and list(saved.model.init_args.hidden) == [32]


def test_same_command_twice_gives_identical_numbers(first_run, tmp_path):
    out, _ = first_run
    assert main(["run", *METHODS, *SMALL, f"out_dir={tmp_path}", "plots=false"]) == 0
    assert _numbers(tmp_path) == _numbers(out)


def test_config_file_plus_overrides_reproduces_overrides_alone(first_run, tmp_path):
    out, _ = first_run
    config = tmp_path / "small.yaml"
    config.write_text(SMALL_YAML)
    argv = ["run", "--config", str(config), *METHODS, "federation.num_rounds=2", f"out_dir={tmp_path / 'b'}"]
    assert main([*argv, "plots=false"]) == 0
    assert _numbers(tmp_path / "b") == _numbers(out)


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["federation.num_roundz=3"], "federation.num_roundz"),
        (["federation.num_rounds=abc"], "federation.num_rounds"),
        (["partition.alpha=[1, 2]"], "partition.alpha"),
        (["federation=3"], "federation"),
        (["model=[1, 2]"], "model"),
        (["--config", "does/not/exist.yaml"], "--config"),
        (["federation.min_clients=5", "partition.num_clients=4"], "federation.min_clients"),
        (["--methods", "fedavg,fedmagic"], "--methods"),
        (["partition.kind=random"], "partition.kind"),
        (["trainer.max_epoch=3"], "trainer.max_epoch"),
        (["model.init_args.lr=abc"], "model.init_args.lr"),
        (["model.init_args.hidden=abc"], "model.init_args.hidden"),
        (["methods.fedavg.class_path=no.such.Aggregator"], "methods.fedavg.class_path"),
        (["partition.num_clients=1000"], "partition.num_clients"),
        (["data.name=no_such_dataset", "data.data_dir=/nonexistent"], "data.name"),
    ],
)
def test_bad_configuration_is_one_line_naming_the_key(args, key, capsys, tmp_path):
    code = main(["run", "--quiet", f"out_dir={tmp_path}", *args])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"fedharmony: error: {key}:" if key != "--methods" else "fedharmony: error: --methods")
    assert "Traceback" not in captured.err + captured.out
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "stats_noise_multiplier=1.0",
            "federation.stats_noise_multiplier: expected 0.0 with `fedharmony serve`, but got 1.0.",
        ),
        ("stats_clip=2.0", "federation.stats_clip: expected null with `fedharmony serve`, but got 2.0."),
    ],
)
def test_serve_refuses_noise_settings_only_clients_can_apply(override, expected, capsys, tmp_path, monkeypatch):
    def no_data(cfg):
        raise AssertionError("the data was loaded before the settings were checked")

    monkeypatch.setattr("lightning_fedharmony.cli.prepare_data", no_data)
    argv = ["serve", "--quiet", "--method", "fedavg", "--root", str(tmp_path / "root"), f"federation.{override}"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2
    assert captured.err.startswith(f"fedharmony: error: {expected} HINT: each client noises its own statistics")
    assert "FederatedClient" in captured.err and "Traceback" not in captured.err
    assert not (tmp_path / "root").exists()


def test_compare_two_seeds_writes_mean_and_std(tmp_path, capsys):
    argv = ["compare", "--seeds", "0,1", "--methods", "fedavg", "--quiet", *SMALL, f"out_dir={tmp_path}", "plots=false"]
    assert main(argv) == 0
    assert "(2 seeds)" in capsys.readouterr().out
    report = json.loads((tmp_path / "compare.json").read_text())
    assert report["seeds"] == [0, 1]
    runs = report["runs"]["fedavg"]
    assert len(runs) == 2
    final_map = report["methods"]["fedavg"]["final_map"]
    values = [r["final_map"] for r in runs]
    assert final_map["mean"] == pytest.approx(sum(values) / 2)
    assert final_map["std"] == pytest.approx(abs(values[0] - values[1]) / 2**0.5)
    assert final_map["std"] > 0  # another seed: another partition and initial model
    for seed in (0, 1):
        assert (tmp_path / f"seed_{seed}" / "results.json").is_file()
    assert (tmp_path / "compare.md").read_text().startswith("| method (2 seeds) |")


def test_compare_keeps_one_checkpoint_per_seed(tmp_path, capsys):
    ckpt = tmp_path / "ck"
    argv = ["compare", "--seeds", "0,1", "--methods", "fedavg", "--quiet", *SMALL, f"out_dir={tmp_path / 'out'}"]
    argv += ["plots=false", f"federation.checkpoint_dir={ckpt}"]
    assert main(argv) == 0  # the second seed does not meet the first seed's checkpoint
    assert (ckpt / "seed_0" / "fedavg").is_dir() and (ckpt / "seed_1" / "fedavg").is_dir()
    first = json.loads((tmp_path / "out" / "compare.json").read_text())["runs"]
    capsys.readouterr()
    assert main(argv) == 0  # the same command again resumes each seed from its own checkpoint
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["runs"] == first


def test_console_script_entry_point(tmp_path):
    script = shutil.which("fedharmony", path=str(Path(sys.executable).parent))
    command = [script] if script else [sys.executable, "-m", "lightning_fedharmony.cli"]
    args = ["run", "--quiet", "--methods", "fedavg", *SMALL, "federation.num_rounds=1", "partition.num_clients=2"]
    done = subprocess.run(
        [*command, *args, f"out_dir={tmp_path}", "plots=false"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| fedavg |" in done.stdout
    assert (tmp_path / "results.json").is_file()


def test_run_ends_with_the_partitions_label_drift(first_run):
    _, stdout = first_run
    lines = stdout.splitlines()
    start = lines.index("Label-correlation drift of this partition (`fedharmony drift` for the per-client table):")
    assert lines[start + 1].startswith("clients 3, sizes ")
    assert "sample-weighted mean excess discrepancy" in lines[start + 2]
    assert lines[start + 4].startswith("FedHarmony's correlation terms are ")
    assert lines[start + 6].startswith("Results in ")


# ---------------------------------------------------------------- resume that cannot be fooled
RESUMABLE = ["run", "--methods", "fedharmony", "--quiet", *SMALL, "plots=false"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished run's folder: its checkpoints in ``ck/`` and results in ``out/``."""
    root = tmp_path_factory.mktemp("resume")
    assert main([*RESUMABLE, f"federation.checkpoint_dir={root / 'ck'}", f"out_dir={root / 'out'}"]) == 0
    return root


def _copy(checkpointed: Path, tmp_path: Path) -> Path:
    shutil.copytree(checkpointed / "ck", tmp_path / "ck")
    return tmp_path / "ck"


def test_same_command_resumes_the_finished_run(checkpointed, tmp_path, capsys):
    ck = _copy(checkpointed, tmp_path)
    argv = [*RESUMABLE, f"federation.checkpoint_dir={ck}", f"out_dir={tmp_path / 'out'}"]
    assert main([a for a in argv if a != "--quiet"]) == 0
    assert f"resumed from {ck / 'fedharmony' / 'federation.ckpt'} after round 2" in capsys.readouterr().out
    assert _numbers(tmp_path / "out") == _numbers(checkpointed / "out")


def test_checkpoint_of_another_partition_is_refused_in_one_line(checkpointed, tmp_path, capsys):
    ck = _copy(checkpointed, tmp_path)
    code = main([*RESUMABLE, "partition.alpha=0.5", f"federation.checkpoint_dir={ck}", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fedharmony: error: ") and err.count("\n") == 1, err
    assert "`partition.alpha` differs: saved 0.1, now 0.5" in err and "HINT:" in err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_is_one_line_with_a_hint(checkpointed, tmp_path, capsys, damage):
    ck = _copy(checkpointed, tmp_path)
    path = ck / "fedharmony" / "federation.ckpt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"garbage\x00" * 100)
    code = main([*RESUMABLE, f"federation.checkpoint_dir={ck}", f"out_dir={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert (
        err.startswith(f"fedharmony: error: {path}: expected a readable federation checkpoint") and err.count("\n") == 1
    ), err
    assert "HINT: delete it to start over, or use another `checkpoint_dir`." in err
    assert "Traceback" not in err


def test_run_gives_config_built_callbacks_to_every_client(tmp_path, monkeypatch):
    from helpers.models import FitCounter

    monkeypatch.setattr(FitCounter, "total", 0)
    args = ["run", "--methods", "fedavg", "--quiet", *SMALL, "plots=false", "federation.num_rounds=1"]
    assert main([*args, f"out_dir={tmp_path}", "trainer.callbacks=[helpers.models.FitCounter]"]) == 0
    assert FitCounter.total == 3  # three clients, one round
