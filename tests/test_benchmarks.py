"""Smoke tests of the benchmark scripts: one tiny cell of each end to end, and what they write."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
from helpers.benchmarks import load_benchmark

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", ROOT.parent / "shared" / "data"))


def _quality() -> ModuleType:
    return load_benchmark("quality")


@pytest.fixture(scope="module")
def quality() -> ModuleType:
    return _quality()


def test_quality_smoke_on_yeast(tmp_path: Path, quality: ModuleType) -> None:
    if not (DATA_DIR / "yeast").is_dir():
        pytest.skip(f"the shared yeast data is not at {DATA_DIR / 'yeast'} (set FEDHARMONY_DATA_DIR)")
    out = tmp_path / "cell.json"
    quality.main(
        [
            "--data", "yeast", "--data-dir", str(DATA_DIR), "--partition", "dirichlet", "--alpha", "0.1",
            "--rounds", "2", "--seeds", "0", "--methods", "fedavg,fedharmony,fp",
            "--grid", "fedharmony.alignment_weight=1,10", "--variant", "fp=fedprox:proximal_mu=0.1",
            "--out", str(out),
        ]
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert report["settings"]["rounds"] == 2 and report["settings"]["seeds"] == [0]
    # the grid ran on validation and its scores and choice are in the output
    choice = report["selection"]["yeast/dirichlet0.1/E1"]["fedharmony"]
    assert choice["configs"] == [{"alignment_weight": 1}, {"alignment_weight": 10}]
    assert len(choice["val_final_map"]) == 2 and choice["chosen"] in choice["configs"]
    assert choice["chosen"] == choice["configs"][max(range(2), key=lambda i: choice["val_final_map"][i])]
    # a variant's own value is not tuned over its base's grid
    assert report["selection"]["yeast/dirichlet0.1/E1"]["fp"]["configs"] == [{"proximal_mu": 0.1}]
    assert {r["method"] for r in report["grid_runs"]} == {"fedavg", "fedharmony", "fp"}
    assert all("final" not in r for r in report["grid_runs"])  # no test metric of an unchosen configuration
    # one record per (method, seed), with config, final, best and validation-stopped metrics and curves
    records = report["records"]
    assert [(r["method"], r["seed"]) for r in records] == [("fedavg", 0), ("fedharmony", 0), ("fp", 0)]
    for record in records:
        assert record["cell_settings"]["partition"] == "dirichlet" and record["cell_settings"]["alpha"] == 0.1
        for part in ("final", "best", "val_selected"):
            assert set(quality.METRICS) <= set(record[part])
            assert 0.0 < record[part]["map"] <= 1.0
        assert 1 <= record["best"]["round"] <= 2
        assert len(record["curves"]["test_map"]) == 2 and len(record["curves"]["val_map"]) == 2
        assert record["final"]["map"] == record["curves"]["test_map"][-1]
        assert record["best"]["map"] == max(record["curves"]["test_map"])
    assert records[1]["params"] == choice["chosen"]
    table = out.with_suffix(".md").read_text()
    assert "### yeast/dirichlet0.1/E1" in table and "| fedharmony | alignment_weight=" in table
    assert "Target check" in table and "± " in table
    assert (tmp_path / "cell_yeast_dirichlet0.1_E1.png").stat().st_size > 0


def test_quality_argument_parsing(quality: ModuleType) -> None:
    variants = quality.parse_variants(["fhp=fedharmony:corr_normalization=pearson,detach_marginals=true,t0=none"])
    assert variants == {"fhp": ("fedharmony", {"corr_normalization": "pearson", "detach_marginals": True, "t0": None})}
    grid = quality.parse_grid(["fedharmony.alignment_weight=0.1,1", "fhp.num_blocks=auto,2"])
    assert grid == {"fedharmony": {"alignment_weight": [0.1, 1]}, "fhp": {"num_blocks": ["auto", 2]}}
    # a variant inherits its base's grid, with its own overrides on top
    configs = quality.method_grid("fhp", "fedharmony", "small", grid)
    assert configs == [{"alignment_weight": a, "num_blocks": b} for a in (0.1, 1) for b in ("auto", 2)]
    assert quality.method_grid("fedavg", "fedavg", "small", {}) == [{}]
    # a key the variant fixes leaves the inherited grid (FedProx's mu grid), unless the variant grids it itself
    mus = [c["proximal_mu"] for c in quality.method_grid("fp", "fedprox", "small", {})]
    assert len(mus) > 1 and quality.method_grid("fp", "fedprox", "small", {}, fixed=("proximal_mu",)) == [{}]
    assert quality.method_grid("fp", "fedprox", "small", {"fp": {"proximal_mu": [0.1, 1]}}, fixed=("proximal_mu",)) == [
        {"proximal_mu": 0.1},
        {"proximal_mu": 1},
    ]
    assert quality.parse_variants(["fpm=fedprox:server_momentum=0.5"]) == {"fpm": ("fedprox", {"server_momentum": 0.5})}
    # quotes keep a value a string: the option value "none" is not Python's None
    quoted = quality.parse_variants(["fq=fedharmony:discrepancy_baseline='none',gamma=\"3\"", "fd=fedharmony:t0=none"])
    assert quoted == {
        "fq": ("fedharmony", {"discrepancy_baseline": "none", "gamma": "3"}),
        "fd": ("fedharmony", {"t0": None}),
    }
    assert quality.parse_grid(["fedharmony.proximal_scaling='none',drift"]) == {
        "fedharmony": {"proximal_scaling": ["none", "drift"]}
    }
    with pytest.raises(ValueError, match=r"Expected `--variant NAME=BASE:key=value"):
        quality.parse_variants(["x=centralized:a=1"])
    with pytest.raises(ValueError, match=r"Expected `--grid METHOD\.key=v1,v2`"):
        quality.parse_grid(["alignment_weight=1"])


@pytest.mark.parametrize("leave_one_out", ["client", "server"])
def test_speed_server_part_writes_its_figures(tmp_path: Path, leave_one_out: str) -> None:
    """benchmarks/speed.py's server part, two tiny cells in their own processes: JSON fields and the markdown rows;
    the kept state is the sums alone (client) or every client's correlation (server)."""
    import subprocess

    out = tmp_path / "speed"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "speed.py"),
            "--parts",
            "server",
            "--server-cells",
            "4x6,3x9",
            "--repeats",
            "1",
            "--leave-one-out",
            leave_one_out,
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "speed.json").read_text())
    cells = {(row["clients"], row["labels"]): row for row in report["server"]}
    assert set(cells) == {(4, 6), (3, 9)}
    for (clients, labels), row in cells.items():
        assert "error" not in row and row["leave_one_out"] == leave_one_out
        assert row["step_seconds"] > 0 and row["teacher_ms"] > 0
        if leave_one_out == "client":  # two float64 L x L sums, the blocks, three scalars per member
            state = 2 * labels * labels * 8 + labels * 8 + 3 * clients * 8
            assert row["input_stats_mib"] == 0
        else:  # a float32 correlation, valid labels, samples and weight per client
            state = clients * (labels * labels * 4 + labels + 2 * 8)
            assert row["input_stats_mib"] == pytest.approx(clients * labels * labels * 8 / 2**20)
        assert row["state_mib"] == pytest.approx(state / 2**20)
    table = (out / "speed.md").read_text()
    assert f"| {leave_one_out} | 4 | 6 |" in table and f"| {leave_one_out} | 3 | 9 |" in table


def test_quality_default_fedharmony_has_no_grid_and_the_paper_preset_keeps_one():
    quality = _quality()
    assert quality.method_grid("fedharmony", "fedharmony", "small", {}) == [{}]
    assert {
        c["alignment_weight"] for c in quality.method_grid("fedharmony_paper", "fedharmony_paper", "small", {})
    } == {
        0.1,
        1.0,
        10.0,
        100.0,
    }


def test_memory_benchmark_measures_the_checkpoint_and_the_clients_files(tmp_path: Path) -> None:
    """benchmarks/memory.py, a tiny sums-only population with checkpoints: the clients' files next to the checkpoint
    are measured, and the report is written."""
    memory = load_benchmark("memory")
    argv = ["--data", "river:yeast", "--clients", "30", "--fraction", "0.2", "--rounds", "3", "--eval-every", "3"]
    report = memory.main([*argv, "--leave-one-out", "client", "--checkpoint", "--out", str(tmp_path / "m")])
    first, _ = report["checkpoint_kib_first_last"]
    assert report["client_memory_tensor_mib"] > 0
    # the files hold every kept term (plus a small header each)
    assert report["client_state_kib_last"] * 1024 >= report["client_memory_tensor_mib"] * 2**20
    assert json.loads((tmp_path / "m" / "memory.json").read_text())["client_state_kib_last"] == pytest.approx(
        report["client_state_kib_last"]
    )
    assert first > 0
    plain = memory.main([*argv, "--out", str(tmp_path / "n")])
    assert plain["client_state_kib_last"] is None and plain["checkpoint_kib_first_last"] is None


def test_proximal_pull_benchmark_writes_its_figures(tmp_path: Path) -> None:
    """benchmarks/proximal_pull.py on river:yeast, 2 rounds: per-round figures in range, and the markdown table."""
    pull = load_benchmark("proximal_pull")
    out = tmp_path / "pull.json"
    report = pull.main(["--data", "river:yeast", "--rounds", "2", "--batches", "2", "--out", str(out)])
    rounds = report["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert r["hidden_ratio"] > 0 and r["output_ratio"] > 0 and 0 <= r["output_rows_pulled"] <= 1
        assert 0 < r["test_map"] <= 1
    assert json.loads(out.read_text())["rounds"] == rounds
    table = out.with_suffix(".md").read_text()
    assert "| round | pull / loss-gradient RMS, hidden |" in table and table.count("\n| ") == 3
    masked = pull.main(["--data", "river:yeast", "--partition", "masking", "--rounds", "1", "--out", str(out)])
    assert 0 < masked["rounds"][0]["test_map"] <= 1  # batches with an observed mask
    with pytest.raises(SystemExit):
        pull.main(["--data", "river:yeast", "--mu", "0"])
