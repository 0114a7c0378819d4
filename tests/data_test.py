"""jaxprune.data: every dataset name loads; sub-splits, batch order, normalisation, errors."""

import functools
import gzip
import json
import os
import random
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from jaxprune import data

_TFDS_NAME = "jaxprune_test_digits"


class JaxpruneTestDigits(tfds.core.GeneratorBasedBuilder):
    """A tiny real (non-mock) tfds dataset: image i is filled with value i, label i % 10."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "image": tfds.features.Image(shape=(4, 4, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples(0, 30), "test": self._generate_examples(30, 42)}

    def _generate_examples(self, lo, hi):
        for i in range(lo, hi):  # PIL images: numpy images would need TF to encode.
            yield i, {"image": PIL.Image.fromarray(np.full((4, 4), i, np.uint8)), "label": i % 10}


def write_idx(path: str, array: np.ndarray) -> None:
    """IDX: 0, 0, dtype code, ndim, big-endian uint32 sizes, big-endian data."""
    codes = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D,
             np.float64: 0x0E}
    code = codes[array.dtype.type]
    raw = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(array.dtype.newbyteorder(">")).tobytes()
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(raw)


def _write_idx_dir(d: str, gz: bool, dotted: bool = False) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(0)
    arrays = (rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6, dtype=np.uint8),
              rng.integers(0, 256, (3, 28, 28), dtype=np.uint8), np.array([7, 8, 9], np.uint8))
    sep = "." if dotted else "-"
    names = (f"train-images{sep}idx3-ubyte", f"train-labels{sep}idx1-ubyte",
             f"t10k-images{sep}idx3-ubyte", f"t10k-labels{sep}idx1-ubyte")
    for name, a in zip(names, arrays):
        write_idx(os.path.join(d, name + (".gz" if gz else "")), a)
    return arrays


# ---------------------------------------------------------------------------------------------
# Every name loads.


def test_digits_shapes_split_and_raw_range():
    ds = data.load_dataset("digits", normalize=False)
    assert (ds.name, ds.num_classes) == ("digits", 10)
    assert ds.train.x.shape == (1437, 8, 8, 1) and ds.test.x.shape == (360, 8, 8, 1)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
    assert ds.train.x.min() == 0.0 and ds.train.x.max() == 1.0
    # The fixed split is disjoint and covers all 1797: class counts add up to sklearn's.
    counts = np.bincount(ds.train.y, minlength=10) + np.bincount(ds.test.y, minlength=10)
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    again = data.load_dataset("digits", normalize=False)
    np.testing.assert_array_equal(again.test.x, ds.test.x)


def test_mnist1d_small_and_no_global_rng_side_effect():
    np.random.seed(123)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()
    np.random.seed(123)
    random.seed(123)
    ds = data.load_dataset("mnist1d", num_samples=200, normalize=False)
    assert (np.random.random(), random.random()) == (expected_np, expected_py)
    assert ds.train.x.shape == (160, 40, 1) and ds.test.x.shape == (40, 40, 1)
    assert ds.train.x.dtype == np.float32 and ds.test.y.dtype == np.int32
    # The generator standardises all 200 signals together to mean 0, sd 1.
    x_all = np.concatenate([ds.train.x, ds.test.x])
    np.testing.assert_allclose([x_all.mean(), x_all.std()], [0.0, 1.0], atol=1e-5)
    np.testing.assert_array_equal(np.bincount(np.concatenate([ds.train.y, ds.test.y])), [20] * 10)
    # The generator output is cached; callers get copies.
    expected = ds.train.x.copy()
    ds.train.x[:] = 0.0
    again = data.load_dataset("mnist1d", num_samples=200, normalize=False)
    np.testing.assert_array_equal(again.train.x, expected)


@pytest.mark.parametrize("name,gz,dotted", [("mnist", True, False), ("fashion_mnist", False, True)])
def test_idx_directory(tmp_path, name, gz, dotted):
    x_tr, y_tr, x_te, y_te = _write_idx_dir(str(tmp_path), gz, dotted)
    ds = data.load_dataset(name, data_dir=str(tmp_path), normalize=False)
    assert ds.train.x.shape == (6, 28, 28, 1) and ds.test.x.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.x[..., 0], x_tr.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.test.x[..., 0], x_te.astype(np.float32) / 255)
    np.testing.assert_array_equal(ds.train.y, y_tr)
    np.testing.assert_array_equal(ds.test.y, [7, 8, 9])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, dtype):
    a = (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8 else \
        np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(str(tmp_path / "a.gz"), a)
    b = data.read_idx(str(tmp_path / "a.gz"))
    assert b.dtype == dtype and b.shape == (2, 3, 4)
    np.testing.assert_array_equal(b, a)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x01\x02")
    with pytest.raises(ValueError, match="data bytes"):
        data.read_idx(str(tmp_path / "short"))


@pytest.mark.skipif(not os.path.isdir(data.FASHION_MNIST_DIR), reason="no dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian_package():
    ds = data.load_dataset("fashion_mnist", normalize=False)
    assert ds.train.x.shape == (60000, 28, 28, 1) and ds.test.x.shape == (10000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ds.train.y), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.y), [1000] * 10)
    np.testing.assert_array_equal(ds.train.y[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])  # official order
    assert ds.train.x[0].sum() * 255 == 76247.0


@pytest.mark.parametrize(
    "name,shape,num_classes",
    [("tfds:mnist", (28, 28, 1), 10), ("tfds:fashion_mnist", (28, 28, 1), 10),
     ("tfds:cifar10", (32, 32, 3), 10), ("tfds:cifar100", (32, 32, 3), 100)],
)
def test_tfds_names_under_mock_data(name, shape, num_classes):
    with tfds.testing.mock_data(num_examples=12):
        ds = data.load_dataset(name, num_test=5)
    assert (ds.name, ds.num_classes) == (name, num_classes)
    assert ds.train.x.shape == (12, *shape) and ds.test.x.shape == (5, *shape)
    assert ds.train.x.dtype == np.float32 and ds.train.y.dtype == np.int32
    assert 0 <= ds.train.y.min() and ds.train.y.max() < num_classes
    mean, std = data.channel_stats(ds.train.x)
    np.testing.assert_allclose(mean, 0.0, atol=1e-5)
    np.testing.assert_allclose(std, 1.0, atol=1e-5)


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory) -> str:
    """JaxpruneTestDigits prepared as array_record (no TF), registered under a tfds: name."""
    d = str(tmp_path_factory.mktemp("tfds"))
    JaxpruneTestDigits(data_dir=d, file_format="array_record").download_and_prepare()
    return d


@pytest.fixture
def tfds_test_name(monkeypatch) -> str:
    name = f"tfds:{_TFDS_NAME}"
    spec = data.DatasetSpec(functools.partial(data._load_tfds, _TFDS_NAME), "test")
    monkeypatch.setitem(data.DATASETS, name, spec)
    return name


def test_tfds_real_array_record_data_dir(tfds_dir, tfds_test_name):
    full = data.load_dataset(tfds_test_name, data_dir=tfds_dir, normalize=False)
    assert full.train.x.shape == (30, 4, 4, 1) and full.test.x.shape == (12, 4, 4, 1)
    # tfds shuffles records when preparing; each image still carries its index i, label i % 10.
    values = np.rint(full.train.x[:, 0, 0, 0] * 255).astype(int)
    np.testing.assert_array_equal(np.sort(values), np.arange(30))
    np.testing.assert_array_equal(full.train.y, values % 10)
    np.testing.assert_array_equal(np.sort(full.test.x[:, 1, 2, 0] * 255), np.arange(30, 42))
    # Subsampling at the source reads the same examples as subsampling in memory.
    sub = data.load_dataset(tfds_test_name, data_dir=tfds_dir, num_train=7, seed=3, normalize=False)
    idx = data._subsample_indices(30, 7, seed=3, stream=0)
    np.testing.assert_array_equal(sub.train.x, full.train.x[idx])
    np.testing.assert_array_equal(sub.train.y, full.train.y[idx])


def test_tfds_tfrecord_without_tensorflow(tmp_path, tfds_dir, tfds_test_name, monkeypatch):
    # Same files, but the metadata says tfrecord: readable only through tfds.load (TF).
    src = os.path.join(tfds_dir, _TFDS_NAME, "1.0.0")
    dst = tmp_path / _TFDS_NAME / "1.0.0"
    dst.mkdir(parents=True)
    for f in os.listdir(src):
        (dst / f).write_bytes(open(os.path.join(src, f), "rb").read())
    info = json.loads((dst / "dataset_info.json").read_text())
    (dst / "dataset_info.json").write_text(json.dumps({**info, "fileFormat": "tfrecord"}))
    monkeypatch.setattr(data, "_tf_available", lambda: False)
    with pytest.raises(data.DatasetNotFoundError, match=r"needs TensorFlow.*jaxprune\[tf\]"):
        data.load_dataset(tfds_test_name, data_dir=str(tmp_path))
    # With TF importable the tfds.load path is taken (faked here: TF is not installed).
    fake = data.Split(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), np.arange(10))
    monkeypatch.setattr(data, "_tf_available", lambda: True)
    monkeypatch.setattr(data, "_load_tfds_with_tf", lambda name, d, splits: (fake, fake))
    ds = data.load_dataset(tfds_test_name, data_dir=str(tmp_path), num_train=4, normalize=False)
    np.testing.assert_array_equal(ds.train.y, data._subsample_indices(10, 4, seed=0, stream=0))
    assert ds.test.y.shape == (10,) and ds.num_classes == 10


# ---------------------------------------------------------------------------------------------
# Errors.


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown dataset 'cifar'.*'digits'.*'tfds:cifar10'"):
        data.load_dataset("cifar")


def test_missing_data_errors(tmp_path):
    with pytest.raises(data.DatasetNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_dataset("fashion_mnist", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="tfds:mnist.*'digits', 'mnist1d'"):
        data.load_dataset("mnist")
    with pytest.raises(data.DatasetNotFoundError, match="tfds build cifar10 .*array_record"):
        data.load_dataset("tfds:cifar10", data_dir=str(tmp_path))


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown kwargs.*'foo'"):
        data.load_dataset("mnist1d", foo=1)
    with pytest.raises(ValueError, match="unknown kwargs.*'num_samples'"):
        data.load_dataset("digits", num_samples=3)
    with pytest.raises(ValueError, match="0 < k <= 360"):
        data.load_dataset("digits", num_test=361)


# ---------------------------------------------------------------------------------------------
# Subsampling and normalisation.


def test_subsample_deterministic_and_nested():
    full = data.load_dataset("digits", normalize=False)
    a = data.load_dataset("digits", num_train=40, num_test=10, seed=5, normalize=False)
    b = data.load_dataset("digits", num_train=80, num_test=10, seed=5, normalize=False)
    c = data.load_dataset("digits", num_train=40, num_test=10, seed=6, normalize=False)
    assert a.train.x.shape == (40, 8, 8, 1) and a.test.x.shape == (10, 8, 8, 1)
    np.testing.assert_array_equal(a.test.x, b.test.x)  # test subsample independent of num_train
    assert not np.array_equal(a.train.x, c.train.x)
    idx40, idx80 = (data._subsample_indices(1437, k, 5, 0) for k in (40, 80))
    assert set(idx40) <= set(idx80)
    np.testing.assert_array_equal(a.train.x, full.train.x[idx40])


def test_normalize_matches_train_statistics():
    x = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
    x[..., 1] = 4.0  # constant channel: centred, not divided by zero
    ds = data.Dataset(data.Split(x, np.zeros(2, np.int32)),
                      data.Split(x[:1] + 1, np.zeros(1, np.int32)), 10, "toy")
    out = data.normalize(ds)
    c0 = x[..., 0]
    mean0, std0 = c0.mean(), c0.std()
    np.testing.assert_allclose(out.train.x[..., 0], (c0 - mean0) / std0, rtol=1e-6)
    np.testing.assert_allclose(out.test.x[..., 0], (x[:1, ..., 0] + 1 - mean0) / std0, rtol=1e-6)
    np.testing.assert_array_equal(out.train.x[..., 1], 0.0)
    np.testing.assert_array_equal(out.test.x[..., 1], 1.0)
    mean, std = data.channel_stats(x)
    np.testing.assert_allclose(mean, [mean0, 4.0])
    np.testing.assert_allclose(std, [std0, 0.0])


def test_load_normalize_equals_normalize_of_raw():
    raw = data.load_dataset("digits", num_train=100, num_test=50, normalize=False)
    ds = data.load_dataset("digits", num_train=100, num_test=50)
    expected = data.normalize(raw)
    np.testing.assert_array_equal(ds.train.x, expected.train.x)
    np.testing.assert_array_equal(ds.test.x, expected.test.x)
    assert ds.train.x.dtype == np.float32


# ---------------------------------------------------------------------------------------------
# Sub-splits.


def test_split_deterministic_disjoint_covering():
    s = data.Split(np.arange(10, dtype=np.float32)[:, None] * 10, np.arange(10, dtype=np.int32))
    fr = {"prior": 0.5, "bound": 0.3, "val": 0.2}
    parts = data.split(s, fr, seed=1)
    idx = data.split_indices(10, fr, seed=1)
    assert list(parts) == ["prior", "bound", "val"]
    assert [len(parts[k].y) for k in parts] == [5, 3, 2]
    np.testing.assert_array_equal(np.sort(np.concatenate(list(idx.values()))), np.arange(10))
    for k in fr:
        np.testing.assert_array_equal(parts[k].y, idx[k])  # y == index here
        np.testing.assert_array_equal(parts[k].x[:, 0], idx[k] * 10)
        np.testing.assert_array_equal(idx[k], np.sort(idx[k]))
    again = data.split_indices(10, fr, seed=1)
    assert all(data.indices_digest(idx[k]) == data.indices_digest(again[k]) for k in fr)
    other = data.split_indices(10, fr, seed=2)
    assert any(not np.array_equal(idx[k], other[k]) for k in fr)


def test_split_partial_fractions_and_errors():
    idx = data.split_indices(100, {"a": 0.25, "b": 0.25}, seed=0)
    assert len(idx["a"]) == 25 and len(idx["b"]) == 25
    assert not set(idx["a"]) & set(idx["b"])
    assert data.indices_digest(np.array([0, 1])) != data.indices_digest(np.array([1, 0]))
    with pytest.raises(ValueError, match="sum to"):
        data.split_indices(10, {"a": 0.7, "b": 0.7}, seed=0)
    with pytest.raises(ValueError, match="'b'.*outside"):
        data.split_indices(10, {"a": 0.5, "b": 0.0}, seed=0)
    with pytest.raises(ValueError, match="'b'.*empty"):
        data.split_indices(10, {"a": 0.9, "b": 0.01}, seed=0)


# ---------------------------------------------------------------------------------------------
# Batch order.


# Callers jit; so do the tests (eager op-by-op dispatch compiles every op separately).
_batch_indices = jax.jit(data.batch_indices, static_argnums=(1, 2, 3, 4))


def test_batch_indices_epochs_are_permutations(key):
    n, b = 10, 4  # 4 does not divide 10: batch 2 straddles epochs 0 and 1
    idx = _batch_indices(key, n, b, 9)
    chex.assert_shape(idx, (9, b))
    assert idx.dtype == jnp.int32
    flat = np.asarray(idx).reshape(-1)
    for e in range(len(flat) // n):  # epoch e fills flat positions [e n, (e + 1) n)
        np.testing.assert_array_equal(np.sort(flat[e * n : (e + 1) * n]), np.arange(n))
    assert not np.array_equal(flat[:n], flat[n : 2 * n])  # each epoch reshuffled


def test_batch_indices_prefix_and_drop_remainder(key):
    # Fewer batches are a prefix of more (resuming mid-run reproduces the order).
    np.testing.assert_array_equal(_batch_indices(key, 10, 4, 4), _batch_indices(key, 10, 4, 9)[:4])
    idx = np.asarray(_batch_indices(key, 10, 4, 5, True))
    chex.assert_shape(idx, (5, 4))
    for e in range(2):  # 2 batches per epoch from the same epoch permutations, 2 leftovers dropped
        epoch = idx[2 * e : 2 * e + 2].reshape(-1)
        assert len(set(epoch)) == 8
    first_epoch = _batch_indices(key, 10, 4, 4)[:2]  # same epoch-0 permutation, same 8 first
    np.testing.assert_array_equal(idx[:2], first_epoch)
    with pytest.raises(ValueError, match="batch_size=11"):
        data.batch_indices(key, 10, 11, 1, drop_remainder=True)
    with pytest.raises(ValueError, match="positive"):
        data.batch_indices(key, 10, 0, 1)


def test_batch_indices_jit_vmap_depends_only_on_key():
    fn = jax.jit(jax.vmap(functools.partial(data.batch_indices, num_examples=10, batch_size=4,
                                            num_batches=9)))
    keys = jax.random.split(jax.random.key(0), 3)
    out = fn(keys)
    chex.assert_shape(out, (3, 9, 4))
    for i in range(3):  # same compiled single-key function as the permutation test
        np.testing.assert_array_equal(out[i], _batch_indices(keys[i], 10, 4, 9))
    assert not np.array_equal(out[0], out[1])
    np.testing.assert_array_equal(fn(keys), out)


# ---------------------------------------------------------------------------------------------
# Error table: checks in data.py that the tests above do not trigger.


def _idx_dir_with(d, name: str, array: np.ndarray) -> str:
    """A valid IDX directory (train 6, t10k 3 examples) with file `name` replaced by array."""
    _write_idx_dir(str(d), gz=False)
    write_idx(str(d / name), array)
    return str(d)


def _read_bytes_as_idx(d, raw: bytes) -> np.ndarray:
    (d / "x").write_bytes(raw)
    return data.read_idx(str(d / "x"))


def _case(id_, call, match):
    return pytest.param(call, match, id=id_)




@pytest.mark.parametrize(
    "call,match",
    [
        _case("mnist1d-num_samples=9", lambda d: data.load_dataset("mnist1d", num_samples=9),
              "mnist1d: num_samples=9 too small for 10 classes"),
        _case("mnist1d-no-test-split",
              lambda d: data.load_dataset("mnist1d", num_samples=200, train_split=1.0),
              "num_samples=200 too small"),
        # int(10 * 0.05) = 0 train examples: normalize=False used to return a (0, 40, 1) train
        # split, normalize=True to fail in numpy ("number sections must be larger than 0").
        _case("mnist1d-no-train-split",
              lambda d: data.load_dataset("mnist1d", num_samples=10, train_split=0.05,
                                          normalize=False),
              "too small"),
        _case("mnist1d-train_split=0",
              lambda d: data.load_dataset("mnist1d", num_samples=200, train_split=0.0,
                                          normalize=False),
              "too small"),
        _case("idx-train-labels-short",
              lambda d: data.load_dataset(
                  "mnist", data_dir=_idx_dir_with(d, "train-labels-idx1-ubyte",
                                                  np.arange(5, dtype=np.uint8))),
              r"mnist: train images \(6, 28, 28\) and labels \(5,\) do not match"),
        _case("idx-t10k-labels-long",
              lambda d: data.load_dataset(
                  "fashion_mnist", data_dir=_idx_dir_with(d, "t10k-labels-idx1-ubyte",
                                                          np.arange(4, dtype=np.uint8))),
              r"fashion_mnist: t10k images \(3, 28, 28\) and labels \(4,\) do not match"),
        _case("idx-images-2d",
              lambda d: data.load_dataset(
                  "mnist", data_dir=_idx_dir_with(d, "t10k-images-idx3-ubyte",
                                                  np.zeros((3, 784), np.uint8))),
              r"mnist: t10k images \(3, 784\) and labels \(3,\) do not match"),
        _case("idx-dtype-code",
              lambda d: _read_bytes_as_idx(d, b"\x00\x00\x0a\x01\x00\x00\x00\x01\x05"),
              "not an IDX file"),
        _case("num_train=0", lambda d: data.load_dataset("digits", num_train=0),
              "asked for 0 examples of a split with 1437"),
        _case("split-empty-fractions", lambda d: data.split_indices(10, {}, seed=0),
              "fractions is empty"),
        _case("batch_indices-num_examples=0",
              lambda d: data.batch_indices(jax.random.key(0), 0, 4, 1),
              "need positive sizes, got num_examples=0"),
    ],
)
def test_bad_arguments_table(tmp_path, call, match):
    with pytest.raises(ValueError, match=match):
        call(tmp_path)


# ---------------------------------------------------------------------------------------------
# Review additions: exact values against the documented formulas and hand-written bytes.


@pytest.mark.parametrize("n,b,num_batches", [(10, 4, 9), (3, 8, 2)])
def test_batch_indices_is_documented_fold_in_permutation(key, n, b, num_batches):
    # Catches: epoch keys from jax.random.split (or a key reused across epochs) instead of the
    # documented fold_in(key, e), which silently changes every published data order; too few
    # epochs when batch_size > num_examples (3, 8: one batch spans three epochs).
    num_epochs = -(-num_batches * b // n)
    perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n))
             for e in range(num_epochs)]
    expected = np.concatenate(perms)[: num_batches * b].reshape(num_batches, b)
    np.testing.assert_array_equal(_batch_indices(key, n, b, num_batches), expected)


def test_batch_indices_drop_remainder_is_per_epoch_prefix(key):
    # Catches: drop_remainder cutting the concatenated epochs (epoch 1 would start with epoch 0's
    # leftovers 8, 9 of its permutation) instead of each epoch's own permutation; and fewer
    # batches not being a prefix of more when drop_remainder is on.
    n, b = 10, 4
    perms = [np.asarray(jax.random.permutation(jax.random.fold_in(key, e), n)) for e in range(3)]
    expected = np.concatenate([p[:8].reshape(2, b) for p in perms])[:5]
    idx = np.asarray(_batch_indices(key, n, b, 5, True))
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_array_equal(_batch_indices(key, n, b, 3, True), idx[:3])


@pytest.mark.parametrize(
    "raw,expected",
    [
        # big-endian int16 0x0102 = 258 and 0xfffe = -2 (little-endian would give 513, -257).
        (b"\x00\x00\x0b\x01\x00\x00\x00\x02\x01\x02\xff\xfe", np.array([258, -2], np.int16)),
        # int8 (code 0x09) is not in the round-trip test; 0xff must read as -1, not 255.
        (b"\x00\x00\x09\x02\x00\x00\x00\x01\x00\x00\x00\x02\x7f\xff",
         np.array([[127, -1]], np.int8)),
        # big-endian float32 0x3f800000 = 1.0, 0xc0000000 = -2.0; sizes >= 256 need all 4 bytes.
        (b"\x00\x00\x0d\x01\x00\x00\x00\x02\x3f\x80\x00\x00\xc0\x00\x00\x00",
         np.array([1.0, -2.0], np.float32)),
    ],
    ids=["int16", "int8-2d", "float32"],
)
def test_read_idx_hand_written_bytes(tmp_path, raw, expected):
    # Independent of write_idx (a symmetric byte-order bug in both would pass the round trip).
    (tmp_path / "x").write_bytes(raw)
    out = data.read_idx(str(tmp_path / "x"))
    assert out.dtype == expected.dtype and out.dtype.isnative  # native order for JAX / numpy ops
    np.testing.assert_array_equal(out, expected)
    assert out.flags.writeable  # a copy, not a read-only view of the file's bytes


def test_read_idx_rejects_trailing_bytes_and_large_sizes(tmp_path):
    # Catches: a `<` instead of `!=` size check (extra bytes accepted), and sizes read as one
    # byte: 0x00000100 = 256 must be parsed as 256, not 0.
    (tmp_path / "long").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x05\x06")
    with pytest.raises(ValueError, match=r"long: 2 data bytes, header says shape \(1,\)"):
        data.read_idx(str(tmp_path / "long"))
    (tmp_path / "big").write_bytes(b"\x00\x00\x08\x01\x00\x00\x01\x00" + bytes(range(256)))
    np.testing.assert_array_equal(data.read_idx(str(tmp_path / "big")), np.arange(256))


def test_read_idx_truncated_header_names_the_file(tmp_path):
    # A truncated header used to raise numpy's "buffer size must be a multiple of element size",
    # or, cut on a 4-byte boundary, a negative data-byte count.
    (tmp_path / "trunc").write_bytes(b"\x00\x00\x08\x03\x00\x00")  # ndim 3, half of one size
    with pytest.raises(ValueError, match=r"trunc: 6 bytes, shorter than its 3-dimension header"):
        data.read_idx(str(tmp_path / "trunc"))
    (tmp_path / "trunc4").write_bytes(b"\x00\x00\x08\x03\x00\x00\x00\x02")
    with pytest.raises(ValueError, match=r"trunc4: 8 bytes, shorter than its 3-dimension header"):
        data.read_idx(str(tmp_path / "trunc4"))


def test_idx_partial_directory_error_names_path_and_missing_files(tmp_path):
    # Catches: a generic message (all four reported missing, or no path) when only the test
    # files are absent, e.g. after an interrupted copy.
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        write_idx(str(tmp_path / name), np.zeros((1, 28, 28) if "images" in name else (1,),
                                                  np.uint8))
    with pytest.raises(data.DatasetNotFoundError) as e:
        data.load_dataset("mnist", data_dir=str(tmp_path))
    msg = str(e.value)
    assert f"data_dir={str(tmp_path)!r}" in msg
    assert "missing ['t10k-images', 't10k-labels']" in msg


def test_tfds_split_strings_and_digits_split_seed(tfds_dir, tfds_test_name):
    # Catches: the train_split / test_split kwargs dropped or swapped on the way to tfds.
    ds = data.load_dataset(tfds_test_name, data_dir=tfds_dir, normalize=False,
                           train_split="test[:5]", test_split="train[:3]")
    full = data.load_dataset(tfds_test_name, data_dir=tfds_dir, normalize=False)
    np.testing.assert_array_equal(ds.train.x, full.test.x[:5])
    np.testing.assert_array_equal(ds.test.y, full.train.y[:3])
    # Catches: digits' split_seed ignored (a fixed split whatever the seed).
    a = data.load_dataset("digits", normalize=False, split_seed=1)
    assert a.train.x.shape == (1437, 8, 8, 1)
    assert not np.array_equal(a.test.y, data.load_dataset("digits", normalize=False).test.y)
