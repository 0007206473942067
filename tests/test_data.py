"""Tests for qsparse.data and the IDX TFDS builder, on tiny files written here."""

import gzip
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qsparse import data

N_TRAIN, N_TEST = 40, 12


def write_idx(path: pathlib.Path, array: np.ndarray, *, compress: bool = True) -> None:
    """Writes `array` (uint8) as an IDX file, gzip-compressed if `compress`."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    raw = header + np.ascontiguousarray(array, np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def write_idx_dir(path: pathlib.Path, seed: int = 0, *, compress: bool = True) -> dict:
    """Writes the four IDX files of a tiny MNIST-like data set; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train_x": rng.integers(0, 256, (N_TRAIN, 28, 28), dtype=np.uint8),
        "train_y": rng.integers(0, 10, N_TRAIN, dtype=np.uint8),
        "test_x": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "test_y": rng.integers(0, 10, N_TEST, dtype=np.uint8),
    }
    names = {
        "train_x": "train-images-idx3-ubyte",
        "train_y": "train-labels-idx1-ubyte",
        "test_x": "t10k-images-idx3-ubyte",
        "test_y": "t10k-labels-idx1-ubyte",
    }
    path.mkdir(parents=True, exist_ok=True)
    for key, stem in names.items():
        write_idx(path / (stem + ".gz" if compress else stem), arrays[key], compress=compress)
    return arrays


def assert_matches(ds: data.Dataset, arrays: dict) -> None:
    for key in ("train_x", "test_x"):
        got = getattr(ds, key)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, arrays[key][..., None])
    for key in ("train_y", "test_y"):
        got = getattr(ds, key)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, arrays[key])


def test_digits_shapes_and_dtypes():
    ds = data.load("digits")
    assert ds.train_x.shape == (1437, 8, 8, 1) and ds.test_x.shape == (360, 8, 8, 1)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.int32
    assert ds.train_x.max() == 255 and ds.num_classes == 10 and ds.input_shape == (8, 8, 1)
    # Stratified: every class has 36 or 37 test examples (each class has ~180 of 1797).
    assert set(np.bincount(ds.test_y, minlength=10)) <= {35, 36, 37}
    again = data.load("digits")
    np.testing.assert_array_equal(ds.test_x, again.test_x)


@pytest.mark.parametrize(
    "name,shape", [("synthetic", (28, 28, 1)), ("synthetic_cifar10", (32, 32, 3))]
)
def test_synthetic_deterministic_and_learnable(name, shape):
    a = data.load(name, synthetic_size=(300, 100))
    b = data.load(name, synthetic_size=(300, 100))
    c = data.load(name, synthetic_size=(300, 100), seed=1)
    assert a.train_x.shape == (300, *shape) and a.test_y.shape == (100,)
    assert a.name == name and a.input_shape == shape and a.num_classes == 10
    assert a.train_x.dtype == np.uint8 and a.train_y.dtype == np.int32
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert not np.array_equal(a.train_x, c.train_x)
    # Nearest class mean must do well: the labels carry signal.
    x = a.train_x.reshape(300, -1).astype(float)
    means = np.stack([x[a.train_y == k].mean(0) for k in range(10)])
    t = a.test_x.reshape(100, -1).astype(float)
    pred = np.argmin(((t[:, None] - means[None]) ** 2).sum(-1), axis=1)
    assert (pred == a.test_y).mean() > 0.9


def test_idx_builder_round_trip_and_reuse(tmp_path, monkeypatch):
    from qsparse.idx_builder import IdxBuilder

    arrays = write_idx_dir(tmp_path / "idx")
    ds = data.load("mnist", idx_dir=tmp_path / "idx", data_dir=tmp_path / "tfds")
    assert ds.name == "mnist" and ds.num_classes == 10 and ds.input_shape == (28, 28, 1)
    assert_matches(ds, arrays)
    prepared = sorted((tmp_path / "tfds" / "idx_mnist" / "1.0.0").glob("*.array_record*"))
    assert len(prepared) == 2

    # A second load reads the prepared data: preparing again would fail here.
    def no_prepare(*args, **kwargs):
        raise AssertionError("prepared again")

    monkeypatch.setattr(IdxBuilder, "download_and_prepare", no_prepare)
    assert_matches(data.load("mnist", idx_dir=tmp_path / "idx", data_dir=tmp_path / "tfds"), arrays)
    # ...also without the IDX files, which are needed only to prepare.
    assert_matches(data.load("mnist", data_dir=tmp_path / "tfds"), arrays)
    monkeypatch.undo()

    # Other files in idx_dir: prepared again from them, not the stale data returned.
    other = write_idx_dir(tmp_path / "idx2", seed=1, compress=False)
    assert_matches(data.load("mnist", idx_dir=tmp_path / "idx2", data_dir=tmp_path / "tfds"), other)


def test_prepare_command_line(tmp_path, capsys):
    write_idx_dir(tmp_path / "idx")
    argv = ["--prepare", "kmnist", "--idx_dir", str(tmp_path / "idx")]
    data.main([*argv, "--data_dir", str(tmp_path / "tfds")])
    out = capsys.readouterr().out
    assert "kmnist" in out and str(tmp_path / "tfds" / "idx_kmnist") in out


def test_read_idx_raw_and_gz(tmp_path):
    x = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", x)
    write_idx(tmp_path / "a", x, compress=False)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a.gz"), x)
    np.testing.assert_array_equal(data.read_idx(tmp_path / "a"), x)


def test_malformed_idx_raises_naming_the_file(tmp_path):
    bad_magic = tmp_path / "bad-magic"
    bad_magic.write_bytes(b"\x12\x34\x08\x01" + bytes(8))
    with pytest.raises(ValueError, match="bad-magic.*magic number"):
        data.read_idx(bad_magic)
    truncated = tmp_path / "truncated.gz"
    raw = bytes([0, 0, 8, 2]) + np.asarray([4, 4], ">u4").tobytes() + bytes(10)
    truncated.write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match="truncated.gz.*truncated"):
        data.read_idx(truncated)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(ValueError, match="cut.gz"):
        data.read_idx(cut_gzip)
    # Through the builder, the error still names the file.
    write_idx_dir(tmp_path / "idx")
    bad_labels = tmp_path / "idx" / "t10k-labels-idx1-ubyte.gz"
    bad_labels.write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x0c" + bytes(5)))
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte.gz"):
        data.load("mnist", idx_dir=tmp_path / "idx", data_dir=tmp_path / "tfds")


def test_unknown_name_raises():
    with pytest.raises(ValueError, match="dataset='foo' is not allowed: use one of mnist"):
        data.load("foo")


def test_missing_directory_raises_with_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        data.load("fashion_mnist", idx_dir=tmp_path / "nowhere", data_dir=tmp_path / "tfds")
    assert "idx_dir" in str(e.value) and "nowhere" in str(e.value)
    (tmp_path / "half").mkdir()
    write_idx(tmp_path / "half" / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        data.load("mnist", idx_dir=tmp_path / "half", data_dir=tmp_path / "tfds")


def test_epoch_indices_permutation_and_determinism():
    idx = data.epoch_indices(jax.random.key(0), 103, 10)
    assert idx.shape == (10, 10) and idx.dtype == jnp.int32
    flat = np.asarray(idx).ravel()
    assert len(np.unique(flat)) == 100 and flat.min() >= 0 and flat.max() < 103
    np.testing.assert_array_equal(idx, data.epoch_indices(jax.random.key(0), 103, 10))
    assert not np.array_equal(idx, data.epoch_indices(jax.random.key(1), 103, 10))
    jitted = jax.jit(data.epoch_indices, static_argnums=(1, 2))(jax.random.key(0), 103, 10)
    np.testing.assert_array_equal(idx, jitted)
    with pytest.raises(ValueError, match="batch_size=200"):
        data.epoch_indices(jax.random.key(0), 103, 200)


def test_eval_batches_cover_each_example_once():
    idx, mask = data.eval_batches(23, 5)
    assert idx.shape == mask.shape == (5, 5)
    counts = np.bincount(np.asarray(idx).ravel(), weights=np.asarray(mask).ravel(), minlength=23)
    np.testing.assert_array_equal(counts, np.ones(23))
    assert float(mask.sum()) == 23


def test_device_batching():
    ds = data.load("synthetic", synthetic_size=(64, 16))
    dev = data.to_device(ds)
    assert dev["train_x"].dtype == jnp.uint8 and dev["train_y"].dtype == jnp.int32
    idx = data.epoch_indices(jax.random.key(0), 64, 8)
    x, y = jax.jit(data.get_batch)(dev["train_x"], dev["train_y"], idx[0])
    assert x.shape == (8, 28, 28, 1) and x.dtype == jnp.float32 and y.shape == (8,)
    np.testing.assert_allclose(x, ds.train_x[np.asarray(idx[0])] / 255.0, rtol=1e-6)
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0


def test_batch_gather_equals_indexing_for_any_index_shape():
    # The batch is the indexed examples in the indices' order and shape, bit for bit, first
    # and last included.
    ds = data.load("synthetic", synthetic_size=(40, 8))
    dev = data.to_device(ds)
    idx = jnp.array([[39, 0, 7], [7, 12, 39]], jnp.int32)
    x, y = jax.jit(data.get_batch)(dev["train_x"], dev["train_y"], idx)
    assert x.shape == (2, 3, 28, 28, 1) and y.shape == (2, 3)
    np.testing.assert_array_equal(x, data.normalize(dev["train_x"][idx]))
    np.testing.assert_array_equal(y, np.asarray(ds.train_y)[np.asarray(idx)])
