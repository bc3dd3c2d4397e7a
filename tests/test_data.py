"""Tests for dpbp.data: sources, label rules, validation, split, scaling, batch plan."""

from __future__ import annotations

import gzip
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from dpbp.data import (
    Dataset,
    Normalizer,
    batch_bounds,
    builtin_names,
    epoch_permutation,
    gather_rows,
    load_source,
    num_batches,
    shard_bounds,
    split_validation,
    validate,
)
from dpbp.errors import CheckpointError, DataError

MNIST = Path("/work/shared/data/mnist")


def _ds(x, y, source="test"):
    return Dataset(np.ascontiguousarray(x), np.asarray(y), source)


def _idx_bytes(arr: np.ndarray) -> bytes:
    """An IDX file for a uint8 array (magic 0x000008NN, big-endian dims)."""
    head = struct.pack(">I", 0x0800 | arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def _write_idx(tmp_path, images, labels, gz):
    pi, pl = tmp_path / "img.idx", tmp_path / "lab.idx"
    opener = gzip.open if gz else open
    with opener(pi, "wb") as f:
        f.write(_idx_bytes(images))
    with opener(pl, "wb") as f:
        f.write(_idx_bytes(labels))
    return pi, pl


# --------------------------------------------------------------------------- built-ins

def test_builtin_names():
    assert builtin_names() == ["highdim", "spirals", "xor"]


def test_xor_points_and_repeat():
    ds = load_source("xor")
    np.testing.assert_array_equal(ds.x, [[0, 0], [0, 1], [1, 0], [1, 1]])
    np.testing.assert_array_equal(ds.y, [[0], [1], [1], [0]])
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.float64  # y as generated: its meaning is the task's
    big = load_source("xor:repeat=3", dtype="float64")
    assert big.x.shape == (12, 2) and big.y.shape == (12, 1) and big.x.dtype == np.float64
    np.testing.assert_array_equal(big.y[4:8], ds.y)


def test_spirals_shape_balance_range():
    ds = load_source("spirals")
    assert (ds.n_samples, ds.n_features) == (3000, 2)
    assert ds.y.dtype == np.int64 and ds.x.flags.c_contiguous
    np.testing.assert_array_equal(np.bincount(ds.y), [1000, 1000, 1000])
    assert np.abs(ds.x).max() <= 1.0
    five = load_source("spirals:n=1000,classes=5,noise=0.1")
    assert five.x.shape == (1000, 2)
    np.testing.assert_array_equal(np.bincount(five.y), [200] * 5)


def test_highdim_shape_and_default_size():
    ds = load_source("highdim")
    assert ds.x.shape == (60000, 100) and ds.x.dtype == np.float32
    counts = np.bincount(ds.y)
    assert len(counts) == 10 and counts.min() > 5000  # roughly balanced
    small = load_source("highdim:n=500,d=20,classes=4")
    assert small.x.shape == (500, 20) and set(np.unique(small.y)) == {0, 1, 2, 3}


@pytest.mark.parametrize("src", ["spirals:n=300", "highdim:n=300,d=12,classes=3"])
def test_builtins_deterministic_per_seed(src):
    a, b = load_source(src, seed=7), load_source(src, seed=7)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    c = load_source(src, seed=8)
    assert not np.array_equal(a.x, c.x)
    wide = load_source(src, seed=7, dtype="float64")
    np.testing.assert_array_equal(wide.y, a.y)  # labels never depend on dtype
    np.testing.assert_allclose(wide.x, a.x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("src, words", [
    ("spiral", ["spiral", "built-in", "spirals", "x.npy,y.npy"]),
    ("spiral:n=3", ["unknown built-in 'spiral'", "spirals"]),
    ("spirals:m=3", ["unknown parameter 'm'", "classes", "noise"]),
    ("spirals:n=abc", ["n must be an integer", "'abc'"]),
    ("spirals:classes=1", ["classes must be >= 2"]),
    ("xor:repeat", ["name=value"]),
])
def test_bad_builtin(src, words):
    with pytest.raises(DataError) as e:
        load_source(src)
    for w in words:
        assert w in str(e.value)


# --------------------------------------------------------------------------- npz / npy

def test_npz_round_trip_with_int_labels(tmp_path):
    x = np.arange(12.0).reshape(4, 3)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=np.array([0, 2, 1, 2], dtype=np.uint8))
    ds = load_source(str(p), dtype="float64")
    np.testing.assert_array_equal(ds.x, x)
    assert ds.y.dtype == np.int64 and ds.y.tolist() == [0, 2, 1, 2]
    assert ds.source == str(p)


def test_npz_missing_key_names_keys_found(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((2, 2)), labels=np.zeros(2))
    with pytest.raises(DataError, match=r"missing \['y'\].*\['labels', 'x'\]"):
        load_source(str(p))


def test_npz_object_array_refused_without_pickle(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((2, 2)), y=np.array([{}, {}], dtype=object))
    with pytest.raises(DataError, match="cannot read"):
        load_source(str(p))


def test_corrupt_npz(tmp_path):
    p = tmp_path / "d.npz"
    p.write_bytes(b"PK\x03\x04 this is not really a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_source(str(p))


def test_npy_pair_round_trip_and_image_flattening(tmp_path):
    x = np.random.default_rng(0).random((5, 2, 3))
    y = np.array([[0.5, 0.5], [1, 0], [0, 1], [0.2, 0.8], [1, 0]])
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    ds = load_source(f"{tmp_path / 'x.npy'}, {tmp_path / 'y.npy'}")
    assert ds.x.shape == (5, 6) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, x.reshape(5, 6).astype(np.float32))
    assert ds.y.shape == (5, 2) and ds.y.dtype == np.float64  # y as stored


def test_npy_pair_with_foreign_file(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((3, 2)))
    (tmp_path / "y.bin").write_bytes(b"not numpy at all")
    with pytest.raises(DataError, match="y.bin: expected a NumPy .npy or .npz file"):
        load_source(f"{tmp_path / 'x.npy'},{tmp_path / 'y.bin'}")


def test_npy_pair_row_mismatch(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    np.save(tmp_path / "y.npy", np.zeros(4, dtype=np.int64))
    with pytest.raises(DataError, match=r"shape \(5,\).*found y of shape \(4,\)"):
        load_source(f"{tmp_path / 'x.npy'},{tmp_path / 'y.npy'}")


@pytest.mark.parametrize("y, dtype", [
    (np.array([0.0, 1.0, 2.0, 1.0]), np.float64),  # y is kept as stored: what it means is the model's task
    (np.array([0.5, 1.0, 2.0, 1.0], np.float32), np.float32),
    (np.array([True, False, True, True]), np.int64),
    (np.array([3, 1, 2, 1], np.uint8), np.int64),
    (np.array(["b", "a", "c", "a"]), np.dtype("<U1")),
    (np.array([b"b", b"a", b"c", b"a"]), np.dtype("<U1")),
])
def test_y_is_kept_as_stored(tmp_path, y, dtype):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.ones((4, 2)), y=y)
    ds = load_source(str(p))
    assert ds.y.dtype == dtype and ds.y.shape == (4,)
    assert ds.y.tolist() == [v.decode() if isinstance(v, bytes) else v for v in y.tolist()]


def test_missing_file_and_empty_set(tmp_path):
    with pytest.raises(DataError, match="file not found: .*nope.npz"):
        load_source(str(tmp_path / "nope.npz"))
    with pytest.raises(DataError, match="file not found: .*b.npy"):
        np.save(tmp_path / "a.npy", np.zeros((2, 2)))
        load_source(f"{tmp_path / 'a.npy'},{tmp_path / 'b.npy'}")
    p = tmp_path / "e.npz"
    np.savez(p, x=np.zeros((0, 3)), y=np.zeros(0))
    with pytest.raises(DataError, match="non-empty"):
        load_source(str(p))


# --------------------------------------------------------------------------- tables

def test_csv_without_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,2,0\n3,4,1\n\n5,6,1\n")
    ds = load_source(str(p), dtype="float64")
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4], [5, 6]])
    assert ds.y.tolist() == [0, 1, 1] and ds.y.dtype == np.float64  # numbers: the task decides what they are


def test_csv_header_named_and_indexed_label(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("# comment line\nlabel,a,b\n2,1.5,2.5\n0,3.5,4.5\n")
    for lc in ("label", "first", 0, "0", -3, "-3"):
        ds = load_source(str(p), label_column=lc)
        np.testing.assert_array_equal(ds.x, [[1.5, 2.5], [3.5, 4.5]])
        assert ds.y.tolist() == [2, 0]
    mid = load_source(str(p), label_column="a")
    np.testing.assert_array_equal(mid.y, [1.5, 3.5])
    np.testing.assert_array_equal(mid.x, [[2, 2.5], [0, 4.5]])


@pytest.mark.parametrize("name, text", [
    ("t.tsv", "a\tb\ty\n1\t2\t0\n3\t4\t1\n"),
    ("t.txt", "1 2 0\n3  4 1\n"),
    ("t.txt", "1;2;0\n3;4;1\n"),
])
def test_table_delimiters(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    ds = load_source(str(p))
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4]])
    assert ds.y.tolist() == [0, 1]


def test_csv_non_numeric_cell_names_row_and_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("a,b,y\n1,2,0\n3,oops,1\n")
    with pytest.raises(DataError, match=r"t.csv: line 3 \(data row 2\), column 2 \('b'\).*'oops'"):
        load_source(str(p))


def test_csv_ragged_row_and_bad_label_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,2,0\n3,4\n")
    with pytest.raises(DataError, match="line 2.*expected 3 cells, found 2"):
        load_source(str(p))
    p.write_text("1,2,0\n3,4,1\n")
    with pytest.raises(DataError, match="no header row"):
        load_source(str(p), label_column="y")
    with pytest.raises(DataError, match=r"\[-3, 2\], found 3"):
        load_source(str(p), label_column=3)
    p.write_text("a,b,y\n")
    with pytest.raises(DataError, match="no(ne| data rows)"):
        load_source(str(p))


# --------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path, gz):
    images = np.random.default_rng(1).integers(0, 256, (6, 3, 4), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 7], dtype=np.uint8)
    pi, pl = _write_idx(tmp_path, images, labels, gz)
    assert (pi.read_bytes()[:2] == b"\x1f\x8b") == gz
    ds = load_source(f"{pi},{pl}")
    assert ds.x.shape == (6, 12) and ds.x.dtype == np.float32
    np.testing.assert_allclose(ds.x, images.reshape(6, 12) / 255, rtol=1e-6)
    assert ds.y.dtype == np.int64 and ds.y.tolist() == labels.tolist()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_truncated(tmp_path, gz):
    images = np.zeros((4, 2, 2), dtype=np.uint8)
    pi, pl = _write_idx(tmp_path, images, np.zeros(4, dtype=np.uint8), gz)
    raw = _idx_bytes(images)[:-3]
    with (gzip.open if gz else open)(pi, "wb") as f:
        f.write(raw)
    with pytest.raises(DataError, match=r"img.idx: IDX file truncated: header says 4 x 2 x 2 = 16"):
        load_source(f"{pi},{pl}")


def test_idx_swapped_pair_and_count_mismatch(tmp_path):
    pi, pl = _write_idx(tmp_path, np.zeros((3, 2, 2)), np.zeros(2), gz=False)
    with pytest.raises(DataError, match="expected an IDX images file .*0x00000801.*'images,labels'"):
        load_source(f"{pl},{pi}")
    with pytest.raises(DataError, match="3 images and 2 labels"):
        load_source(f"{pi},{pl}")


def test_idx_broken_gzip(tmp_path):
    pi, pl = _write_idx(tmp_path, np.zeros((3, 2, 2)), np.zeros(3), gz=True)
    pi.write_bytes(pi.read_bytes()[:20])
    with pytest.raises(DataError, match="cannot read .*img.idx"):
        load_source(f"{pi},{pl}")


@pytest.mark.skipif(not MNIST.is_dir(), reason=f"real MNIST not present at {MNIST}")
def test_real_mnist_test_set():
    ds = load_source(f"{MNIST}/t10k-images-idx3-ubyte.gz,{MNIST}/t10k-labels-idx1-ubyte.gz")
    assert ds.x.shape == (10000, 784) and 0 <= ds.x.min() and ds.x.max() == 1
    assert np.bincount(ds.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


# --------------------------------------------------------------------------- validate

def test_validate_accepts_prepared_data():
    validate(_ds(np.zeros((3, 2)), np.array([0, 2, 1])), n_in=2, n_out=3)
    validate(_ds(np.zeros((2, 2)), np.array([[0.3, 0.7], [1.0, 0.0]])), n_in=2, n_out=2)
    validate(_ds(np.zeros((2, 2), np.float32), np.array([[-7.5], [1e6]], np.float32)), n_in=2, n_out=1)


@pytest.mark.parametrize("x, y, kw, pattern", [
    (np.array([[0.0, 1], [np.nan, 1], [np.inf, np.nan]]), np.zeros(3, np.int64), {},
     r"^val data \(src\): x has 3 NaN/Inf values, first at row 1"),
    (np.zeros((2, 784)), np.zeros(2, np.int64), {}, "has 784 features but the model takes 2"),
    (np.zeros((3, 2)), np.array([0, 3, -1]), {}, r"class ids must lie in \[0, 2\].*found min -1 and max 3"),
    (np.zeros((2, 2)), np.array([0.0, 1.0]), {}, "expected 1-D y to hold integer class ids"),
    (np.zeros((2, 2)), np.zeros((2, 2)), {}, "has 2 target columns but the model has 3 outputs"),
    (np.zeros((2, 2)), np.array([[0.5], [np.nan]]), {"n_out": 1}, "y has 1 NaN/Inf values, first at row 1"),
])
def test_validate_errors(x, y, kw, pattern):
    args = {"n_in": 2, "n_out": 3, **kw}
    with pytest.raises(DataError, match=pattern):
        validate(_ds(x, y, "src"), role="val", **args)


# --------------------------------------------------------------------------- split

def test_split_validation_deterministic_disjoint_complete():
    ds = _ds(np.arange(100.0).reshape(50, 2), np.arange(50))
    tr, va = split_validation(ds, 0.2, seed=3)
    tr2, va2 = split_validation(ds, 0.2, seed=3)
    np.testing.assert_array_equal(va.y, va2.y)
    np.testing.assert_array_equal(tr.x, tr2.x)
    assert va.n_samples == 10 and tr.n_samples == 40
    assert sorted(np.concatenate([tr.y, va.y]).tolist()) == list(range(50))
    assert np.all(np.diff(tr.y) > 0) and np.all(np.diff(va.y) > 0)  # original order kept
    np.testing.assert_array_equal(tr.x[:, 0], 2 * tr.y)  # rows stay paired with labels
    assert not np.array_equal(split_validation(ds, 0.2, seed=4)[1].y, va.y)


def test_split_validation_edges():
    ds = _ds(np.zeros((3, 1)), np.arange(3))
    assert split_validation(ds, 0.0, 0) == (ds, None)
    assert split_validation(ds, 0.01, 0)[1].n_samples == 1  # at least one
    assert split_validation(ds, 0.99, 0)[0].n_samples == 1  # train keeps one
    with pytest.raises(ValueError):
        split_validation(ds, 1.0, 0)


# --------------------------------------------------------------------------- normalizer

def test_standard_normalizer_float32():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((500, 3)) * [1, 10, 100] + [5, -3, 1000]).astype(np.float32)
    x[:, 1] = 7.0  # constant column
    nm = Normalizer.fit("standard", x)
    assert nm.shift.dtype == nm.scale.dtype == np.float64  # statistics in float64, whatever x is
    z = nm.apply(x)
    assert z.dtype == np.float32 and z is not x
    np.testing.assert_allclose(z[:, [0, 2]].mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(z[:, [0, 2]].std(axis=0), 1, atol=1e-4)
    assert nm.scale[1] == 1 and np.all(z[:, 1] == 0)


def test_minmax_and_float64_stats_do_not_leak():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 2.0]], dtype=np.float32)
    nm = Normalizer.fit("minmax", x)
    z = nm.apply(x)
    np.testing.assert_allclose(z, [[0, 0], [0.5, 1], [1, 0.5]])
    wide = Normalizer("standard", np.zeros(2), np.ones(2))  # float64 stats
    assert wide.apply(x).dtype == np.float32
    assert Normalizer("none").apply(x).dtype == np.float32


def test_normalizer_arrays_round_trip_and_errors():
    x = np.random.default_rng(1).random((20, 4))
    nm = Normalizer.fit("standard", x)
    arrays = nm.to_arrays()
    assert set(arrays) == {"norm_shift", "norm_scale"}
    back = Normalizer.from_arrays("standard", arrays)
    np.testing.assert_array_equal(back.apply(x), nm.apply(x))
    assert Normalizer("none").to_arrays() == {}
    with pytest.raises(ValueError, match="none"):
        Normalizer.fit("zscore", x)
    with pytest.raises(CheckpointError, match="norm_scale"):
        Normalizer.from_arrays("minmax", {"norm_shift": np.zeros(4)})
    with pytest.raises(DataError, match="fitted on 4 features, data has 3"):
        nm.apply(x[:, :3])


# --------------------------------------------------------------------------- batch plan

def test_shard_bounds_cover_exactly_once():
    for n_rows in range(41):
        for size in range(1, 10):
            bounds = [shard_bounds(n_rows, size, r) for r in range(size)]
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == n_rows
            assert all(bounds[r][1] == bounds[r + 1][0] for r in range(size - 1))
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 0
            assert sizes == sorted(sizes, reverse=True)  # extras go to the first ranks
    with pytest.raises(ValueError):
        shard_bounds(5, 2, 2)


def test_epoch_permutation():
    p = epoch_permutation(100, seed=1, epoch=0)
    assert p.dtype == np.int64 and sorted(p.tolist()) == list(range(100))
    np.testing.assert_array_equal(p, epoch_permutation(100, seed=1, epoch=0))
    assert not np.array_equal(p, epoch_permutation(100, seed=1, epoch=1))
    assert not np.array_equal(p, epoch_permutation(100, seed=2, epoch=0))
    np.testing.assert_array_equal(epoch_permutation(5, 1, 0, shuffle=False), np.arange(5))


def test_batches():
    assert [num_batches(n, 4) for n in (0, 1, 4, 5, 8)] == [0, 1, 1, 2, 2]
    assert [batch_bounds(10, 4, s) for s in range(3)] == [(0, 4), (4, 8), (8, 10)]
    with pytest.raises(ValueError):
        batch_bounds(10, 4, 3)


def test_gather_rows_1d_2d_and_bounds():
    src = np.arange(20.0).reshape(10, 2)
    idx = np.array([9, 0, 3])
    out = np.full((5, 2), -1.0)
    view = gather_rows(src, idx, out)
    np.testing.assert_array_equal(view, src[idx])
    assert np.shares_memory(view, out) and view.shape == (3, 2) and out[3, 0] == -1
    labels = np.arange(10)
    yout = np.empty(5, dtype=labels.dtype)
    np.testing.assert_array_equal(gather_rows(labels, idx, yout), [9, 0, 3])
    with pytest.raises(IndexError):
        gather_rows(src, np.array([10]), out)
    with pytest.raises(IndexError):
        gather_rows(src, np.array([-1]), out)
    with pytest.raises(ValueError):
        gather_rows(src, idx, out.astype(np.float32))


def test_gather_rows_does_not_allocate_a_copy():
    src = np.ones((4096, 256), dtype=np.float32)
    idx = np.arange(0, 4096, 2)
    out = np.empty((2048, 256), dtype=np.float32)  # 2 MiB
    gather_rows(src, idx, out)  # warm-up
    tracemalloc.start()
    try:
        gather_rows(src, idx, out)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < out.nbytes // 8


# --------------------------------------------------------------------------- tables with text labels

def test_text_labels_and_auto_header(tmp_path):
    p = tmp_path / "iris.csv"
    p.write_text('sepal,petal,species\n5.1,1.4,setosa\n6.3,4.9,"virginica" \n5.8,4.1,"versi, color"\n')
    ds = load_source(str(p), dtype=None, label_column="species")
    assert ds.x.dtype == np.float64 and ds.label_name == "species"
    np.testing.assert_array_equal(ds.x, [[5.1, 1.4], [6.3, 4.9], [5.8, 4.1]])
    assert ds.y.tolist() == ["setosa", "virginica", "versi, color"]  # quoted, stripped
    bare = tmp_path / "bare.csv"
    bare.write_text("5.1,1.4,setosa\n6.3,4.9,virginica\n")  # text labels in every row: no header
    ds = load_source(str(bare))
    assert ds.n_samples == 2 and ds.y.tolist() == ["setosa", "virginica"] and ds.label_name is None


def test_header_setting_settles_a_header_of_numbers(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("1,2,3\n0.5,1.5,0\n2.5,3.5,1\n")  # a header that looks like data
    assert load_source(str(p)).n_samples == 3  # auto: numbers, so data
    ds = load_source(str(p), header="true")
    assert ds.n_samples == 2 and ds.label_name == "3" and ds.y.tolist() == [0, 1]
    np.testing.assert_array_equal(ds.x, [[0.5, 1.5], [2.5, 3.5]])
    q = tmp_path / "q.csv"
    q.write_text("a,b,y\n1,2,0\n")
    with pytest.raises(DataError, match=r"line 1 \(data row 1\), column 1: expected a number, found 'a'"):
        load_source(str(q), header="false")
    with pytest.raises(DataError, match="no header row; .*data.header = true"):
        load_source(str(q), header="false", label_column="y")


@pytest.mark.parametrize("label_column", ["kind", 1, "1", -2])
def test_label_column_in_the_middle_by_name_or_index(tmp_path, label_column):
    p = tmp_path / "t.tsv"
    p.write_text("a\tkind\tb\n1\tcat\t2\n3\tdog\t4\n")
    ds = load_source(str(p), label_column=label_column)
    np.testing.assert_array_equal(ds.x, [[1, 2], [3, 4]])
    assert ds.y.tolist() == ["cat", "dog"]


def test_table_messages_name_line_and_column(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("# a comment\na,b,species\n1,2,setosa\n3,x,virginica\n")
    with pytest.raises(DataError, match=r"t.csv: line 4 \(data row 2\), column 2 \('b'\): expected a number, found"):
        load_source(str(p))
    p.write_text("a,b,species\n1,2,setosa\n\n3,nan,virginica\n")
    with pytest.raises(DataError, match=r"t.csv: line 4, column 2 \('b'\): the feature is nan"):
        load_source(str(p))
    p.write_text("a,b,t\n1,2,3.5\n3,4,\n")  # numeric targets: an empty one cannot be read
    with pytest.raises(DataError, match=r"line 3 \(data row 2\), column 3 \('t'\): expected a number, found ''$"):
        load_source(str(p), text_labels=False)
    p.write_text("a,b,t\n1,2,yes\n")
    with pytest.raises(DataError, match=r"found 'yes' \(this model's loss takes numeric targets; for class labels use "
                                        r"model.loss = \"cross_entropy\"\)"):
        load_source(str(p), text_labels=False)


def test_empty_and_nan_labels_of_a_table_are_named_with_their_line(tmp_path):
    from dpbp.targets import Targets

    p = tmp_path / "t.csv"
    p.write_text("# comment\na,species\n1,setosa\n2,\n3,virginica\n")
    ds = load_source(str(p))
    with pytest.raises(DataError, match="the label is empty at line 4"):
        Targets.fit("classification", ds.y, where=ds.where)
    p.write_text("a,label\n1,1\n2,2\n3,NaN\n")
    ds = load_source(str(p))
    with pytest.raises(DataError, match="the label is nan at line 4"):
        Targets.fit("classification", ds.y, where=ds.where)


def test_load_features_can_leave_the_label_column_out(tmp_path):
    from dpbp.data import load_features

    p = tmp_path / "t.csv"
    p.write_text("a,species,b\n1,setosa,2\n3,virginica,4\n")
    np.testing.assert_array_equal(load_features(str(p), dtype=None, drop_column="species"), [[1, 2], [3, 4]])
    with pytest.raises(DataError, match=r"column 2 \('species'\): expected a number, found 'setosa'"):
        load_features(str(p))


def test_normaliser_keeps_the_digits_a_large_offset_leaves():
    seconds = np.arange(0.0, 100.0, 0.5)
    x = (1.7e9 + seconds)[:, None]  # a Unix time: float32 keeps steps of 128 s there
    assert len(np.unique(x.astype(np.float32))) <= 2
    nm = Normalizer.fit("standard", x)
    z = nm.apply(x, np.float32)
    assert z.dtype == np.float32 and len(np.unique(z)) == len(seconds)
    np.testing.assert_allclose(z[:, 0], (seconds - seconds.mean()) / seconds.std(), rtol=1e-6, atol=1e-6)


def test_a_hash_inside_a_cell_is_data_not_a_comment(tmp_path):
    """Only whole lines starting with # are comments: a label C# is a class, and Excel's #N/A is refused as a
    missing value naming its line, never a row silently cut short or dropped."""
    from dpbp.targets import Targets

    p = tmp_path / "t.csv"
    p.write_text("# notes about the file\nx,key\n1,C#\n2,F#\n3,G\n4,C#\n")
    ds = load_source(str(p))
    assert list(ds.y) == ["C#", "F#", "G", "C#"]
    assert Targets.fit("classification", ds.y, where=ds.where).classes == ["C#", "F#", "G"]
    p.write_text("x,key\n1,a\n2,#N/A\n3,b\n")
    ds = load_source(str(p))
    assert ds.n_samples == 3
    with pytest.raises(DataError, match="the label is '#N/A' at line 3, a missing value"):
        Targets.fit("classification", ds.y, where=ds.where)
    p.write_text("x,key\n1,a\n# a comment among the rows\n3,b\n")
    with pytest.raises(DataError, match="line 3 .data row 2. is a comment among the data rows"):  # loud
        load_source(str(p))


def test_pandas_column_names_are_a_header(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("0,1,2,species\n5.1,3.5,1.4,setosa\n4.9,3.0,1.4,setosa\n6.3,3.3,6.0,virginica\n")
    ds = load_source(str(p))
    assert ds.n_samples == 3 and sorted(set(ds.y)) == ["setosa", "virginica"]
