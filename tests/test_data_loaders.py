"""Loaders: Mulan ARFF (dense and sparse), MEKA .mat, npz, river's yeast, and load_dataset."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import scipy.io
import scipy.sparse
from helpers.data import data_file, tiny_multilabel, write_arff, write_xml

import lightning_fedharmony.data.loaders as loaders
from lightning_fedharmony.data import (
    MultilabelDataset,
    load_arff,
    load_dataset,
    load_mat,
    load_npz,
    load_yeast_from_river,
    read_mulan_xml,
)


def _same(a: MultilabelDataset, b: MultilabelDataset) -> None:
    np.testing.assert_array_equal(a.X, b.X)
    np.testing.assert_array_equal(a.Y, b.Y)
    assert a.label_names == b.label_names
    assert a.feature_names == b.feature_names


def _npz_test_part(path) -> MultilabelDataset:
    """The official test part of a shared ``.npz``, reading only the arrays it needs (the full X is large)."""
    with np.load(path, allow_pickle=False) as npz:
        return MultilabelDataset(
            npz["X_test"], npz["Y_test"], npz["label_names"].tolist(), npz["feature_names"].tolist()
        )


# ---------------------------------------------------------------------------------------------------------------------
# real files
# ---------------------------------------------------------------------------------------------------------------------


def test_yeast_arff_dense_shapes_names_and_dtypes():
    train = load_arff(data_file("yeast", "yeast-train.arff"))
    test = load_arff(data_file("yeast", "yeast-test.arff"))
    assert train.X.shape == (1500, 103) and test.X.shape == (917, 103)
    assert train.Y.shape == (1500, 14) and test.Y.shape == (917, 14)
    assert train.X.dtype == np.float32 and train.Y.dtype == np.int8
    # the XML lists Class6 before Class4; the columns keep the ARFF order
    assert train.label_names == [f"Class{i}" for i in range(1, 15)]
    assert train.feature_names[:2] == ["Att1", "Att2"] and len(train.feature_names) == 103
    assert set(np.unique(train.Y)) == {0, 1}
    assert train.X[0, 0] == pytest.approx(0.0937)
    assert train.Y.sum(1).mean() == pytest.approx(4.24, abs=0.05)  # label cardinality from the data README


def test_yeast_arff_equals_npz():
    npz = load_npz(data_file("yeast", "yeast.npz"))
    train, test = load_dataset(data_file("yeast", "yeast-train.arff"))
    assert npz.X_train is not None and npz.X_test is not None and npz.Y_train is not None and npz.Y_test is not None
    _same(train, MultilabelDataset(npz.X_train, npz.Y_train, npz.label_names, npz.feature_names))
    _same(test, MultilabelDataset(npz.X_test, npz.Y_test, npz.label_names, npz.feature_names))


def test_tmc2007_is_sparse_and_parsed_exactly():
    path = data_file("tmc2007-500", "tmc2007-500-test.arff")
    first_row = next(ln for ln in path.read_text().splitlines() if ln.startswith("{"))
    assert first_row.startswith("{19 1,36 1")
    ds = load_arff(path)
    assert ds.X.shape == (7077, 500) and ds.Y.shape == (7077, 22)
    _same(ds, _npz_test_part(data_file("tmc2007-500", "tmc2007-500.npz")))
    # features 19 and 36 are on in the first row, attribute 518 is label 518 - 500 = 18
    assert ds.X[0, 19] == 1 and ds.X[0, 36] == 1 and ds.X[0, 20] == 0
    assert ds.Y[0].tolist() == [1 if j == 18 else 0 for j in range(22)]


def test_delicious_test_file_sparse_with_983_labels():
    ds = load_arff(data_file("delicious", "delicious-test.arff"))
    assert ds.X.shape == (3185, 500) and ds.Y.shape == (3185, 983)
    _same(ds, _npz_test_part(data_file("delicious", "delicious.npz")))
    # an unquoted name with an escaped quote stays as written, as in the XML
    assert "TAG_m\\'usica" in ds.label_names


@pytest.mark.parametrize(
    ("mat", "npz"),
    [
        ("rcv1subset1/rcv1subset1_top944.mat", "rcv1subset1/rcv1subset1.npz"),
        ("corel16k001/Corel16k001.mat", "corel16k001/corel16k001.npz"),
    ],
)
def test_mat_equals_npz(mat, npz):
    # Corel16k001's target is {-1, 1}, rcv1's {0, 1}
    _same(load_mat(data_file(*mat.split("/"))), load_npz(data_file(*npz.split("/"))))


def test_npz_with_official_split():
    ds = load_npz(data_file("yeast", "yeast.npz"))
    assert ds.has_official_split and ds.X.shape == (2417, 103)
    train, test = ds.official_split()
    assert train.num_samples == 1500 and test.num_samples == 917 and train.num_labels == 14


def test_load_dataset_by_name_uses_the_official_split():
    train, test = load_dataset("yeast", data_dir=data_file())
    assert (train.num_samples, test.num_samples, train.num_features, train.num_labels) == (1500, 917, 103, 14)
    assert not train.has_official_split


def test_load_dataset_from_a_test_file_finds_the_train_file():
    train, test = load_dataset(data_file("yeast", "yeast-test.arff"))
    assert (train.num_samples, test.num_samples) == (1500, 917)


def test_load_dataset_random_split_is_seeded(monkeypatch):
    monkeypatch.setenv("FEDHARMONY_DATA_DIR", str(data_file()))
    train, test = load_dataset("rcv1subset1", test_size=0.3, seed=0)
    assert (train.num_samples, test.num_samples) == (4200, 1800)
    again, _ = load_dataset("rcv1subset1", test_size=0.3, seed=0)
    other, _ = load_dataset("rcv1subset1", test_size=0.3, seed=1)
    np.testing.assert_array_equal(train.X, again.X)
    assert not np.array_equal(train.Y, other.Y)
    from_mat, _ = load_dataset(data_file("rcv1subset1", "rcv1subset1_top944.mat"), test_size=0.3, seed=0)
    _same(train, from_mat)


def test_river_yeast_is_mulan_yeast_in_order():
    before = {m for m in sys.modules if m.split(".")[0] == "river"}
    try:
        ds = load_yeast_from_river()
    except ModuleNotFoundError:
        pytest.skip("river is not installed")
    assert {m for m in sys.modules if m.split(".")[0] == "river"} == before, "river must not be imported"
    train, test = ds.official_split()
    _same(train, load_arff(data_file("yeast", "yeast-train.arff")))
    _same(test, load_arff(data_file("yeast", "yeast-test.arff")))
    via_name, _ = load_dataset("river:yeast")
    _same(via_name, train)


def test_river_missing_names_the_extra(monkeypatch):
    monkeypatch.setattr(loaders.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install lightning-fedharmony\[datasets\]"):
        load_yeast_from_river()


# ---------------------------------------------------------------------------------------------------------------------
# synthetic ARFF
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("label_first", [False, True])
def test_sparse_and_dense_arff_agree(tmp_path, label_first):
    X, Y = tiny_multilabel()
    write_xml(tmp_path / "tiny.xml", ["y0", "y1", "y2", "y3"])
    dense = load_arff(write_arff(tmp_path / "tiny.arff", X, Y, label_first=label_first))
    sparse = load_arff(
        write_arff(tmp_path / "sp.arff", X, Y, sparse=True, label_first=label_first), tmp_path / "tiny.xml"
    )
    np.testing.assert_array_equal(dense.X, X)
    np.testing.assert_array_equal(dense.Y, Y)
    _same(dense, sparse)
    assert dense.label_names == ["y0", "y1", "y2", "y3"] and dense.feature_names == ["f0", "f1", "f2"]


def test_num_labels_takes_the_last_attributes_and_nested_xml(tmp_path):
    X, Y = tiny_multilabel()
    path = write_arff(tmp_path / "t.arff", X, Y)
    _same(load_arff(path, num_labels=4), load_arff(path, write_xml(tmp_path / "n.xml", ["y0", "y1", "y2", "y3"], True)))
    assert read_mulan_xml(tmp_path / "n.xml") == ["y0", "y1", "y2", "y3"]


def test_quoted_names_comments_and_empty_sparse_rows(tmp_path):
    path = tmp_path / "q.arff"
    path.write_text(
        "% a comment\n@RELATION 'q r'\n@ATTRIBUTE 'my feat' NUMERIC\n@attribute \"lab el\" {0,1}\n\n@DATA\n"
        "% another\n{0 1.5,1 1}\n{}\n"
    )
    ds = load_arff(path, num_labels=1)
    assert ds.feature_names == ["my feat"] and ds.label_names == ["lab el"] and ds.name == "q r"
    assert ds.X.tolist() == [[1.5], [0.0]] and ds.Y.tolist() == [[1], [0]]


def _arff(tmp_path, body: str, header: str = "@attribute a numeric\n@attribute y {0,1}\n") -> str:
    path = tmp_path / "bad.arff"
    path.write_text(f"@relation bad\n{header}@data\n{body}")
    return str(path)


@pytest.mark.parametrize(
    ("body", "header", "match"),
    [
        ("1,2\n", None, r"labels in '.*bad\.arff' to be 0 or 1, but found the values \[2\]"),
        ("1,0\n1,0,1\n", None, r"2 comma-separated values on every data row of '.*bad\.arff', but row 2 has 3"),
        ("?,1\n", None, r"numeric values in the data of '.*bad\.arff', but found '\?'\. Missing values"),
        ("{0 1,5 1}\n", None, r"indices in \[0, 2\) in '.*bad\.arff', but row 1 has index 5"),
        ("{0 1,1}\n", None, r"`index value` pairs on every sparse row of '.*bad\.arff', but row 1"),
        ("{0 1}\n1,0\n", None, r"sparse ARFF file '.*bad\.arff' to be `\{index value, \.\.\.\}`, but row 2"),
        ("1,0\n", "@attribute s string\n@attribute y {0,1}\n", r"attribute 's' has type 'string'"),
        ("1,0\n", "@attribute a numeric\n@attribute y {no,yes}\n", r"attribute 'y' has type '\{no,yes\}'"),
        ("1,0\n", "@attribute a numeric\nfoo\n", r"Unexpected line 3 in the header of '.*bad\.arff'"),
    ],
)
def test_arff_errors_name_the_file(tmp_path, body, header, match):
    path = _arff(tmp_path, body, header) if header else _arff(tmp_path, body)
    with pytest.raises(ValueError, match=match):
        load_arff(path, num_labels=1)


def test_arff_without_data_section(tmp_path):
    path = tmp_path / "nodata.arff"
    path.write_text("@relation x\n@attribute a numeric\n")
    with pytest.raises(ValueError, match=r"`@data` line in '.*nodata\.arff'"):
        load_arff(path, num_labels=1)


def test_arff_label_errors(tmp_path):
    X, Y = tiny_multilabel()
    path = write_arff(tmp_path / "t-train.arff", X, Y)
    with pytest.raises(FileNotFoundError, match=r"data file at '.*missing\.arff'"):
        load_arff(tmp_path / "missing.arff")
    with pytest.raises(ValueError, match=r"Mulan XML label file beside '.*t-train\.arff' \(tried 't\.xml'\)"):
        load_arff(path)
    xml = write_xml(tmp_path / "t.xml", ["y0", "y1", "nope"])
    with pytest.raises(ValueError, match=r"labels named in '.*t\.xml' to be attributes of '.*t-train\.arff', but 1"):
        load_arff(path)
    with pytest.raises(ValueError, match=r"`num_labels` to equal the 3 labels named in '.*t\.xml', but got 4"):
        load_arff(path, xml, num_labels=4)
    with pytest.raises(ValueError, match=r"`num_labels` to be smaller than the 7 attributes of '.*t-train\.arff'"):
        load_arff(path, num_labels=7)
    with pytest.raises(ValueError, match=r"`num_labels` to be a positive int or None, but got 0"):
        load_arff(path, num_labels=0)
    (tmp_path / "bad.xml").write_text("<labels><label name='a'>")
    with pytest.raises(ValueError, match=r"Mulan XML label file at '.*bad\.xml', but it is not valid XML"):
        read_mulan_xml(tmp_path / "bad.xml")
    (tmp_path / "empty.xml").write_text("<labels></labels>")
    with pytest.raises(ValueError, match=r"`<label name=...>` elements in '.*empty\.xml'"):
        read_mulan_xml(tmp_path / "empty.xml")


# ---------------------------------------------------------------------------------------------------------------------
# synthetic .mat and .npz
# ---------------------------------------------------------------------------------------------------------------------


def test_mat_sparse_minus_one_and_split_keys(tmp_path):
    X, Y = tiny_multilabel()
    path = tmp_path / "s.mat"
    scipy.io.savemat(path, {"data": scipy.sparse.csr_matrix(X), "target": scipy.sparse.csr_matrix(2 * Y.T - 1)})
    ds = load_mat(path)
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.Y, Y)
    split = tmp_path / "split.mat"
    scipy.io.savemat(
        split, {"train_data": X[:8], "train_target": Y[:8].T, "test_data": X[8:], "test_target": 2 * Y[8:].T - 1}
    )
    train, test = load_dataset(split)
    np.testing.assert_array_equal(train.Y, Y[:8])
    np.testing.assert_array_equal(test.Y, Y[8:])


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"data": np.zeros((3, 2)), "target": np.zeros((2, 4))}, r"`target` in '.*m\.mat' to be labels x instances"),
        ({"data": np.zeros((3, 2)), "target": np.full((2, 3), 2)}, r"values in \{-1, 1\} or \{0, 1\}, but found \[2\]"),
        ({"features": np.zeros((3, 2))}, r"keys `data` and `target` in '.*m\.mat', but found \['features'\]"),
    ],
)
def test_mat_errors(tmp_path, content, match):
    scipy.io.savemat(tmp_path / "m.mat", content)
    with pytest.raises(ValueError, match=match):
        load_mat(tmp_path / "m.mat")


def test_npz_split_only_and_errors(tmp_path):
    X, Y = tiny_multilabel()
    np.savez(tmp_path / "split.npz", X_train=X[:8], Y_train=Y[:8], X_test=X[8:], Y_test=Y[8:])
    ds = load_npz(tmp_path / "split.npz")
    np.testing.assert_array_equal(ds.X, X)
    assert ds.label_names == ["label0", "label1", "label2", "label3"]
    np.savez(tmp_path / "a.npz", X=X)
    with pytest.raises(ValueError, match=r"keys `X` and `Y` \(or the four split keys\) in '.*a\.npz'"):
        load_npz(tmp_path / "a.npz")
    np.savez(tmp_path / "b.npz", X=X, Y=Y, X_train=X)
    with pytest.raises(ValueError, match=r"or none in '.*b\.npz', but found only \['X_train'\]"):
        load_npz(tmp_path / "b.npz")
    np.savez(tmp_path / "c.npz", X=X, Y=Y + 1)
    with pytest.raises(ValueError, match=r"labels in '.*c\.npz' to be 0 or 1, but found the values \[2\]"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", X=X, Y=Y[:5])
    with pytest.raises(ValueError, match=r"as many label rows as feature rows in '.*d\.npz', but got 5 and 12"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", X=X, Y=Y, label_names=np.array(["a"]))
    with pytest.raises(ValueError, match=r"4 label names and 3 feature names in '.*e\.npz', but got 1 and 3"):
        load_npz(tmp_path / "e.npz")
    np.savez(tmp_path / "f.npz", X=X, Y=Y, label_names=np.array([object(), 1], dtype=object))
    with pytest.raises(ValueError, match=r"only plain arrays in '.*f\.npz'"):
        load_npz(tmp_path / "f.npz")


# ---------------------------------------------------------------------------------------------------------------------
# load_dataset and MultilabelDataset
# ---------------------------------------------------------------------------------------------------------------------


def test_load_dataset_folder_resolution(tmp_path):
    X, Y = tiny_multilabel(num_samples=20)
    folder = tmp_path / "toy"
    folder.mkdir()
    write_xml(folder / "toy.xml", ["y0", "y1", "y2", "y3"])
    write_arff(folder / "toy-train.arff", X[:15], Y[:15])
    write_arff(folder / "toy-test.arff", X[15:], Y[15:])
    train, test = load_dataset("toy", data_dir=tmp_path)
    assert (train.num_samples, test.num_samples) == (15, 5)
    # an npz in the folder is preferred over the ARFF files (same arrays, faster)
    np.savez(folder / "toy.npz", X=X, Y=Y)
    train, test = load_dataset(folder, test_size=0.25, seed=0)
    assert (train.num_samples, test.num_samples) == (15, 5)
    np.savez(folder / "other.npz", X=X, Y=Y)
    (folder / "toy.npz").unlink()
    for arff in folder.glob("*.arff"):
        arff.unlink()
    np.savez(folder / "third.npz", X=X, Y=Y)
    with pytest.raises(ValueError, match=r"at most one `\*\.npz` file in '.*toy', but found \['other\.npz', 'third"):
        load_dataset(folder)


def test_load_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data set folder '.*nope' for the name 'nope'.*HINT"):
        load_dataset("nope", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data file or folder at '.*missing\.npz'"):
        load_dataset(tmp_path / "missing.npz")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"file ending in one of \('\.arff', '\.npz', '\.mat'\), but got '.*x\.csv'"):
        load_dataset(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"`\.npz`, `\.arff` or `\.mat` file in '.*empty'"):
        load_dataset(tmp_path / "empty")
    with pytest.raises(ValueError, match=r"`test_size` to be a float in \(0, 1\), but got 1\.0"):
        load_dataset(tmp_path / "x.csv", test_size=1.0)


def test_dataset_split_helpers():
    X, Y = tiny_multilabel(num_samples=10)
    ds = MultilabelDataset(X, Y, [f"y{i}" for i in range(4)], ["a", "b", "c"], name="toy")
    train, test = ds.random_split(test_size=0.3, seed=3)
    assert (train.num_samples, test.num_samples) == (7, 3)
    np.testing.assert_array_equal(np.sort(np.vstack([train.X, test.X]), 0), np.sort(X, 0))
    with pytest.raises(RuntimeError, match=r"Data set 'toy' has no official train/test split\. HINT"):
        ds.official_split()
    with pytest.raises(ValueError, match=r"at least 2 samples to split data set 'toy', but got 1"):
        ds.subset([0]).random_split()
