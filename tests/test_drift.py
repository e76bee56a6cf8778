"""Label-correlation drift from the clients' labels: the statistic against a by-hand reference, the verdict, the
``fedharmony drift`` command and the benchmark script."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from helpers.benchmarks import load_benchmark
from helpers.data import clustered_labels

import lightning_fedharmony.drift as drift_module
from lightning_fedharmony.cli import main
from lightning_fedharmony.drift import (
    LIKELY_EXCESS,
    LIKELY_SHARE,
    UNLIKELY_EXCESS,
    drift_summary,
    drift_table,
    drift_verdict,
    label_drift,
)
from lightning_fedharmony.functional import (
    correlation_discrepancy,
    leave_one_out_consensus,
    leave_one_out_support,
    pair_validity,
    phi_from_moments,
)

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDHARMONY_DATA_DIR", ROOT.parent / "shared" / "data"))


def three_clients() -> tuple[np.ndarray, list[np.ndarray]]:
    """Clustered labels over three clients; client 2 never sees label 5 and has labels 0 and 1 tied together, so
    its correlations differ and its teacher's support differs per pair."""
    Y = clustered_labels(300, num_labels=6, seed=4)
    idx = [np.arange(0, 120), np.arange(120, 220), np.arange(220, 300)]
    Y[idx[2], 5] = 0
    Y[idx[2], 1] = Y[idx[2], 0]
    return Y, idx


def by_hand(Y: np.ndarray, idx: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``s_k`` and ``b_k`` with the batched functional API and a numpy sampling baseline per pair."""
    corrs, valid, sizes = [], [], []
    for rows in idx:
        y = torch.as_tensor(Y[rows], dtype=torch.float64)
        corrs.append(phi_from_moments(len(rows), y.sum(0), y.T @ y, normalization="pearson"))
        rate = y.mean(0)
        valid.append((rate >= 1e-3) & (rate <= 1 - 1e-3))
        sizes.append(float(len(rows)))
    corr, val, n = torch.stack(corrs), torch.stack(valid), torch.tensor(sizes, dtype=torch.float64)
    teachers = leave_one_out_consensus(corr, n, val)
    num_labels = Y.shape[1]
    mask = leave_one_out_support(n, val, num_labels) & pair_validity(val) & ~torch.eye(num_labels, dtype=torch.bool)
    s = correlation_discrepancy(corr, teachers, mask).numpy()
    b = np.zeros(len(idx))
    for k in range(len(idx)):
        terms = []
        for a in range(num_labels):
            for c in range(num_labels):
                if not mask[k, a, c]:
                    continue
                others = sum(sizes[j] for j in range(len(idx)) if j != k and val[j, a] and val[j, c])
                r, t = float(corr[k, a, c]), float(teachers[k, a, c])
                terms.append((1 - r**2) ** 2 / sizes[k] + (1 - t**2) ** 2 / others)
        b[k] = np.mean(terms)
    return s, b


def test_label_drift_matches_the_functional_api_by_hand():
    Y, idx = three_clients()
    drift = label_drift(Y, idx)
    s, b = by_hand(Y, idx)
    np.testing.assert_allclose(drift.discrepancy, s, rtol=1e-6)
    np.testing.assert_allclose(drift.sampling_discrepancy, b, rtol=1e-6)
    np.testing.assert_allclose(drift.excess, s - b, rtol=1e-6)
    assert drift.num_samples.tolist() == [120, 100, 80]
    assert drift.num_valid_labels.tolist() == [6, 6, 5]
    assert drift.num_pairs.tolist() == [15, 15, 10]
    assert drift.weighted_excess == pytest.approx(np.average(s - b, weights=[120, 100, 80]))
    assert drift.size_ratio == pytest.approx(1.5)
    assert drift.beyond_noise.tolist() == (s >= 2 * b).tolist()
    assert drift.beyond_noise[2]  # the client with tied labels departs clearly


def test_binned_baseline_stays_close_to_exact(monkeypatch):
    Y, idx = three_clients()
    exact = label_drift(Y, idx).sampling_discrepancy
    monkeypatch.setattr(drift_module, "_MAX_GROUPS", 1)
    np.testing.assert_allclose(label_drift(Y, idx).sampling_discrepancy, exact, rtol=0.05)


def test_iid_split_is_unlikely_and_opposite_correlations_likely():
    Y = clustered_labels(2000, num_labels=6, seed=1)
    rng = np.random.default_rng(0)
    iid = np.array_split(rng.permutation(len(Y)), 5)
    drift = label_drift(Y, iid)
    assert drift.verdict == "unlikely" and drift.share_beyond_noise == 0.0
    assert abs(drift.weighted_excess) < UNLIKELY_EXCESS
    assert "unlikely to matter" in drift.verdict_line() and "close to FedAvg" in drift.verdict_line()
    flipped = Y.copy()
    flipped[1000:, 1] = 1 - flipped[1000:, 0]
    flipped[:1000, 1] = flipped[:1000, 0]
    drift = label_drift(flipped, [np.arange(1000), np.arange(1000, 2000)])
    assert drift.verdict == "likely" and drift.beyond_noise.all()
    assert drift.verdict_line().startswith("FedHarmony's correlation terms are likely to matter: 2 of 2 clients")


@pytest.mark.parametrize(
    ("excess", "share", "verdict"),
    [
        (LIKELY_EXCESS, LIKELY_SHARE, "likely"),
        (LIKELY_EXCESS, LIKELY_SHARE - 0.01, "possible"),
        (LIKELY_EXCESS * 0.99, 1.0, "possible"),
        (UNLIKELY_EXCESS, 0.0, "possible"),
        (UNLIKELY_EXCESS * 0.99, 1.0, "unlikely"),
        (-0.01, 0.0, "unlikely"),
    ],
)
def test_verdict_thresholds(excess, share, verdict):
    assert drift_verdict(excess, share) == verdict


def test_masked_labels_and_imbalance():
    Y = clustered_labels(400, num_labels=5, seed=2)
    idx = [np.arange(0, 20), np.arange(20, 400)]
    observed = np.array([[True, True, False, True, True], [True] * 5])
    drift = label_drift(Y, idx, observed)
    assert drift.num_valid_labels[0] <= 4 and drift.num_valid_labels[1] == 5
    assert drift.size_ratio == pytest.approx(19.0)
    assert "up to 19x apart" in drift.verdict_line()
    table = drift_table(drift, ["a", "b"])
    assert table.splitlines()[0].startswith("| client | samples | labels | pairs | discrepancy | sampling |")
    assert table.splitlines()[2].startswith("| a | 20 |")
    summary = drift_summary(drift).splitlines()
    assert summary[0].startswith("clients 2, sizes 20..380 (max/min 19.0x)")
    assert summary[-1] == drift.verdict_line()
    data = drift.as_dict()
    assert json.loads(json.dumps(data)) == data and data["verdict"] == drift.verdict


def test_client_without_pairs_is_left_out():
    Y = clustered_labels(200, num_labels=4, seed=3)
    Y[:50] = 0  # client 0: every label constant
    drift = label_drift(Y, [np.arange(50), np.arange(50, 120), np.arange(120, 200)])
    assert drift.num_pairs[0] == 0 and drift.discrepancy[0] == 0 and not drift.beyond_noise[0]
    assert drift.weighted_excess == pytest.approx(np.average(drift.excess[1:], weights=drift.num_samples[1:]))


def test_label_drift_errors():
    Y = clustered_labels(20, num_labels=3)
    with pytest.raises(ValueError, match=r"Expected argument `Y` to be an \(N, L\) array of 0/1 labels, but got shape"):
        label_drift(Y * 2, [np.arange(20)])
    with pytest.raises(ValueError, match=r"Expected argument `client_indices` to hold at least one client"):
        label_drift(Y, [])
    with pytest.raises(ValueError, match=r"Expected client 1's indices to lie in \[0, 20\), but got \[25"):
        label_drift(Y, [np.arange(10), np.array([25])])
    with pytest.raises(ValueError, match=r"Expected argument `observed` to have shape \(1, 3\), but got \(1, 2\)"):
        label_drift(Y, [np.arange(20)], np.ones((1, 2), dtype=bool))


# ---------------------------------------------------------------------------- fedharmony drift
def test_drift_command_on_river_yeast(capsys, tmp_path):
    pytest.importorskip("river", reason="the default data set (yeast) ships with the `datasets` extra (river)")
    out = tmp_path / "d" / "drift.json"
    assert main(["drift", "data.name=river:yeast", "partition.kind=kmeans", "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0] == "Label-correlation drift of river:yeast, partition kmeans, 10 clients, seed 0:"
    assert "| client | samples |" in stdout and len([x for x in lines if x.startswith("| ")]) == 1 + 10
    assert any(x.startswith("FedHarmony's correlation terms ") for x in lines)
    report = json.loads(out.read_text())
    assert report["dataset"] == "river:yeast" and report["partition"]["kind"] == "kmeans"
    assert len(report["discrepancy"]) == 10 and report["verdict"] in drift_module.VERDICTS
    # the same numbers as the pure function on the same partition
    from lightning_fedharmony.config import load_config
    from lightning_fedharmony.experiment import prepare_data

    prepared = prepare_data(load_config(None, ["partition.kind=kmeans"]))
    direct = label_drift(prepared.train.Y, prepared.partition.client_indices)
    assert report["discrepancy"] == direct.discrepancy.tolist()


def test_drift_command_on_shipped_data(capsys):
    if not (DATA_DIR / "emotions").is_dir():
        pytest.skip(f"the shared emotions data is not at {DATA_DIR / 'emotions'} (set FEDHARMONY_DATA_DIR)")
    argv = ["drift", "data.name=emotions", f"data.data_dir={DATA_DIR}", "partition.kind=iid", "partition.num_clients=4"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "emotions, partition iid, 4 clients" in stdout and "391 training samples, 6 labels" in stdout
    assert stdout.splitlines()[-1].startswith("FedHarmony's correlation terms ")


@pytest.mark.parametrize(
    ("args", "start"),
    [
        (["data.name=no_such_dataset", "data.data_dir=/nonexistent"], "fedharmony: error: data.name: Expected a data"),
        (["partition.kind=random"], "fedharmony: error: partition.kind: expected one of ('dirichlet', 'kmeans',"),
        (["data.client_val_fraction=1.5"], "fedharmony: error: data.client_val_fraction: expected in [0, 1)"),
    ],
)
def test_drift_command_errors_are_one_line(args, start, capsys):
    assert main(["drift", *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), captured.err
    assert "Traceback" not in captured.err + captured.out


# ---------------------------------------------------------------------------- benchmarks/drift.py
@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return load_benchmark("drift")


def test_drift_benchmark_smoke(tmp_path, bench):
    if not (DATA_DIR / "yeast").is_dir():
        pytest.skip(f"the shared yeast data is not at {DATA_DIR / 'yeast'} (set FEDHARMONY_DATA_DIR)")
    out = tmp_path / "drift.json"
    report = bench.main(
        ["--data", "yeast", "--data-dir", str(DATA_DIR), "--partitions", "dirichlet:0.1,iid", "--out", str(out)]
    )
    saved = json.loads(out.read_text())
    assert saved["settings"]["partitions"] == ["dirichlet0.1", "iid"] == report["settings"]["partitions"]
    assert saved["thresholds"]["LIKELY_EXCESS"] == LIKELY_EXCESS
    records = {r["partition"]: r for r in saved["records"]}
    assert records["iid"]["verdict"] == "unlikely"
    assert records["dirichlet0.1"]["weighted_excess"] > records["iid"]["weighted_excess"]
    table = out.with_suffix(".md").read_text()
    assert table.startswith("| data | partition |") and "| yeast | dirichlet0.1 |" in table


def test_drift_benchmark_partition_parsing(bench):
    assert bench.parse_partitions("dirichlet:0.5, kmeans") == [("dirichlet", 0.5), ("kmeans", 0.1)]
    with pytest.raises(ValueError, match=r"Expected `--partitions` entries among .*, but got 'random'"):
        bench.parse_partitions("random")
    with pytest.raises(
        ValueError, match=r"Expected a positive Dirichlet alpha in `--partitions`, but got 'dirichlet:x'"
    ):
        bench.parse_partitions("dirichlet:x")
