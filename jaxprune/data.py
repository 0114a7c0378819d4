"""Datasets as in-memory arrays; data order is a function of a PRNG key.

Every dataset is loaded once into numpy arrays: images NHWC float32 (1-D signals N x L x C), labels
int32. With `normalize=True` each channel c is standardised with the train split's statistics,
x' = (x - mu_c) / sigma_c, applied to train and test alike.

Names (`DATASETS`):

* offline, no download ever: `digits` (scikit-learn's 8x8 digits, fixed seeded 1437/360 split),
  `mnist1d` (generated with the mnist1d package, `num_samples` 5000 -> 4000/1000 by default);
* a directory of the standard IDX files (`train-images-idx3-ubyte[.gz]`, ...): `fashion_mnist`
  (default directory /usr/share/datasets/fashion-mnist, where `apt-get install
  dataset-fashion-mnist` puts them) and `mnist` (`data_dir` required);
* tensorflow-datasets with `data_dir`: `tfds:mnist`, `tfds:fashion_mnist`, `tfds:cifar10`,
  `tfds:cifar100`, read through `tfds.data_source` (array_record, no TensorFlow needed); datasets
  prepared as tfrecord fall back to `tfds.load`, which needs TensorFlow (the `tf` extra).

The `tfds:` prefix is explicit: `mnist` never silently switches to tfds. A dataset that is not there
raises `DatasetNotFoundError` (a `FileNotFoundError`) saying how to prepare it and which offline
dataset to use instead; an unknown name raises `ValueError` listing the known names.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import inspect
import os
import random
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
_OFFLINE_HINT = (
    "Offline alternatives that need no download: 'digits', 'mnist1d', and 'fashion_mnist' after "
    "`apt-get install dataset-fashion-mnist`."
)


class Split(NamedTuple):
    x: np.ndarray  # float32, (N, H, W, C) images or (N, L, C) signals
    y: np.ndarray  # int32, (N,)


class Dataset(NamedTuple):
    train: Split
    test: Split
    num_classes: int
    name: str


class DatasetNotFoundError(FileNotFoundError):
    """The dataset's files are missing or unreadable here; the message says how to prepare them."""


# A loader returns raw (train, test, num_classes); x may be uint8 or float, y any integer dtype.
# Loaders that can read a subset cheaply (tfds) subsample themselves with `_subsample_indices`,
# which is then the identity in `load_dataset`.
LoadFn = Callable[..., tuple[Split, Split, int]]


class DatasetSpec(NamedTuple):
    load_fn: LoadFn
    description: str


# ----------------------------------------------------------------------------------------------
# Offline: scikit-learn digits and generated mnist1d.


def _load_digits(*, data_dir: str | None, split_seed: int = 0) -> tuple[Split, Split, int]:
    """sklearn `load_digits`: 1797 images 8x8, values 0..16 (scaled to [0, 1]); 360 held out."""
    del data_dir
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    perm = np.random.default_rng(split_seed).permutation(len(x))
    test_idx, train_idx = np.sort(perm[:360]), np.sort(perm[360:])
    return Split(x[train_idx], d.target[train_idx]), Split(x[test_idx], d.target[test_idx]), 10


def _load_mnist1d(*, data_dir: str | None, **args: Any) -> tuple[Split, Split, int]:
    """mnist1d generated locally (`make_dataset`, never the download path); x (N, 40, 1).

    kwargs override `mnist1d.data.get_dataset_args()` (num_samples=5000, train_split=0.8, seed=42,
    ...).
    """
    del data_dir
    import mnist1d.data  # pylint: disable=g-import-not-at-top

    defaults = mnist1d.data.get_dataset_args(as_dict=True)
    bad = sorted(set(args) - (set(defaults) - {"url"}))
    if bad:
        allowed = sorted(set(defaults) - {"url"})
        raise ValueError(f"mnist1d: unknown kwargs {bad}; allowed: {allowed}")
    cfg = {**defaults, **args}
    n, frac = cfg["num_samples"], cfg["train_split"]
    # mnist1d keeps the first int(n * train_split) examples for training, the rest for testing.
    if n < 10 or int(n * frac) < 1 or n - int(n * frac) < 1:
        raise ValueError(f"mnist1d: num_samples={n} too small for 10 classes with train_split={frac} "
                         f"({int(n * frac)} train, {n - int(n * frac)} test examples)")
    train, test = _make_mnist1d(tuple(sorted((k, _hashable(v)) for k, v in cfg.items())))
    return train, test, 10  # load_dataset copies (astype), so the cached arrays stay unmodified.


def _hashable(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=4)  # ~1 s per 5000 samples; tests and sweeps reload the same args.
def _make_mnist1d(cfg_items: tuple[tuple[str, Any], ...]) -> tuple[Split, Split]:
    import mnist1d.data  # pylint: disable=g-import-not-at-top
    import mnist1d.utils  # pylint: disable=g-import-not-at-top

    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg_items}
    # make_dataset reseeds the global `random` and `np.random`; restore them so loading has no
    # side effect on other code.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = mnist1d.data.make_dataset(mnist1d.utils.ObjectView(cfg))
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    train = Split(d["x"].astype(np.float32)[..., None], d["y"])
    test = Split(d["x_test"].astype(np.float32)[..., None], d["y_test"])
    return train, test


# ----------------------------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST).

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Reads one IDX file (gzipped if the name ends in .gz).

    Format: bytes 0, 0, dtype code, ndim; then ndim big-endian uint32 sizes; then the data, C order.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file (magic bytes {data[:4]!r})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:  # e.g. a truncated download
        raise ValueError(f"{path}: {len(data)} bytes, shorter than its {ndim}-dimension header")
    shape = tuple(int(s) for s in np.frombuffer(data[4:header], ">u4"))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if len(data) - header != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"{path}: {len(data) - header} data bytes, header says shape {shape}")
    return np.frombuffer(data, dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(data_dir: str, prefix: str, kind: str) -> str | None:
    """`train-images-idx3-ubyte[.gz]` or the `train-images.idx3-ubyte` variant some mirrors use."""
    rank = 3 if kind == "images" else 1
    for stem in (f"{prefix}-{kind}-idx{rank}-ubyte", f"{prefix}-{kind}.idx{rank}-ubyte"):
        for name in (stem + ".gz", stem):
            if os.path.isfile(os.path.join(data_dir, name)):
                return os.path.join(data_dir, name)
    return None


def _load_idx_dir(data_dir: str | None, name: str, hint: str) -> tuple[Split, Split, int]:
    files = {}
    if data_dir is not None:
        for prefix in ("train", "t10k"):
            for kind in ("images", "labels"):
                files[prefix, kind] = _find_idx(data_dir, prefix, kind)
    if data_dir is None or None in files.values():
        missing = [f"{p}-{k}" for (p, k), v in files.items() if v is None] or ["all four files"]
        raise DatasetNotFoundError(
            f"{name}: IDX files not found in data_dir={data_dir!r} (missing {missing}; expected "
            f"train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            f"t10k-labels-idx1-ubyte, each optionally .gz). {hint} {_OFFLINE_HINT}"
        )
    splits = []
    for prefix in ("train", "t10k"):
        x, y = read_idx(files[prefix, "images"]), read_idx(files[prefix, "labels"])
        if x.ndim != 3 or y.shape != x.shape[:1]:
            raise ValueError(f"{name}: {prefix} images {x.shape} and labels {y.shape} do not match")
        splits.append(Split(x[..., None], y))
    return splits[0], splits[1], 10


def _load_fashion_mnist(*, data_dir: str | None) -> tuple[Split, Split, int]:
    hint = (
        "Install them with `apt-get install dataset-fashion-mnist` (-> /usr/share/datasets/"
        "fashion-mnist), pass data_dir= a directory holding them, or use 'tfds:fashion_mnist'."
    )
    return _load_idx_dir(data_dir or FASHION_MNIST_DIR, "fashion_mnist", hint)


def _load_mnist(*, data_dir: str | None) -> tuple[Split, Split, int]:
    hint = "Put the four MNIST IDX files in a directory and pass data_dir=, or use 'tfds:mnist'."
    return _load_idx_dir(data_dir, "mnist", hint)


# ----------------------------------------------------------------------------------------------
# tensorflow-datasets.


def _tf_available() -> bool:
    return importlib.util.find_spec("tensorflow") is not None


def _read_records(src: Any, idx: np.ndarray) -> list[dict[str, Any]]:
    """Decoded records `src[i]` for i in idx; batched reads where the source supports them."""
    out: list[dict[str, Any]] = []
    for lo in range(0, len(idx), 4096):
        chunk = [int(i) for i in idx[lo : lo + 4096]]
        try:
            out.extend(src.__getitems__(chunk))
        except TypeError:  # tfds.testing.mock_data's __getitems__ has a broken signature.
            out.extend(src[i] for i in chunk)
    return out


def _records_to_split(records: list[dict[str, Any]]) -> Split:
    if not records:
        return Split(np.zeros((0,), np.uint8), np.zeros((0,), np.int32))
    return Split(np.stack([r["image"] for r in records]), np.array([r["label"] for r in records]))


def _load_tfds_with_tf(
    tfds_name: str, data_dir: str | None, splits: tuple[str, str]
) -> tuple[Split, Split]:
    """`tfds.load` for tfrecord-prepared data; needs TensorFlow (the `tf` extra)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    tf.config.set_visible_devices([], "GPU")  # TF must not grab accelerator memory from JAX.
    out = []
    for s in splits:
        arrays = tfds.as_numpy(
            tfds.load(tfds_name, split=s, data_dir=data_dir, batch_size=-1, download=False)
        )
        out.append(Split(arrays["image"], arrays["label"]))
    return out[0], out[1]


def _load_tfds(
    tfds_name: str,
    *,
    data_dir: str | None,
    num_train: int | None = None,
    num_test: int | None = None,
    seed: int = 0,
    train_split: str = "train",
    test_split: str = "test",
) -> tuple[Split, Split, int]:
    """Reads (image, label) records of a tfds dataset prepared in `data_dir`; never downloads."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    splits = (train_split, test_split)
    try:
        sources = tfds.data_source(tfds_name, split=list(splits), data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises assorted types here; diagnose below.
        builder = tfds.builder(tfds_name, data_dir=data_dir)
        where = os.path.dirname(os.path.dirname(builder.data_dir))
        if not builder.is_prepared():
            raise DatasetNotFoundError(
                f"tfds:{tfds_name} is not prepared in data_dir={where!r}. Prepare it once where "
                f"there is network access: `tfds build {tfds_name} --data_dir={where} "
                f"--file_format=array_record` (array_record is readable without TensorFlow), then "
                f"pass data_dir=. {_OFFLINE_HINT}"
            ) from e
        if builder.info.file_format.value != "tfrecord":
            raise  # prepared in a random-access format, so the failure is something else.
        if not _tf_available():
            raise DatasetNotFoundError(
                f"tfds:{tfds_name} in {where!r} is prepared as {builder.info.file_format.value}, "
                f"which needs TensorFlow: `pip install 'jaxprune[tf]'`, or re-prepare it with "
                f"`tfds build {tfds_name} --file_format=array_record`. {_OFFLINE_HINT}"
            ) from e
        train, test = _load_tfds_with_tf(tfds_name, data_dir, splits)
        num_classes = builder.info.features["label"].num_classes
        train, test = _subsample(train, num_train, seed, 0), _subsample(test, num_test, seed, 1)
        return train, test, num_classes
    train_src, test_src = sources
    num_classes = tfds.builder(tfds_name, data_dir=data_dir).info.features["label"].num_classes
    out = []
    for src, k, stream in ((train_src, num_train, 0), (test_src, num_test, 1)):
        idx = _subsample_indices(len(src), k, seed, stream)
        out.append(_records_to_split(_read_records(src, idx)))
    return out[0], out[1], num_classes


# ----------------------------------------------------------------------------------------------
# Registry and the public loader.

DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec(_load_digits, "scikit-learn 8x8 digits, 1437/360, offline"),
    "mnist1d": DatasetSpec(_load_mnist1d, "MNIST-1D generated locally, (N, 40, 1), 4000/1000"),
    "fashion_mnist": DatasetSpec(
        _load_fashion_mnist, f"IDX files, default dir {FASHION_MNIST_DIR} (Debian package)"
    ),
    "mnist": DatasetSpec(_load_mnist, "IDX files in data_dir"),
    **{
        f"tfds:{n}": DatasetSpec(functools.partial(_load_tfds, n), f"tfds {n!r} in data_dir")
        for n in ("mnist", "fashion_mnist", "cifar10", "cifar100")
    },
}


def _subsample_indices(n: int, k: int | None, seed: int, stream: int) -> np.ndarray:
    """Sorted k of range(n), drawn from seed; nested in k (the first k of one permutation)."""
    if k is None:
        return np.arange(n)
    if not 0 < k <= n:
        raise ValueError(f"asked for {k} examples of a split with {n}; need 0 < k <= {n}")
    return np.sort(np.random.default_rng([seed, stream]).permutation(n)[:k])


def _subsample(s: Split, k: int | None, seed: int, stream: int) -> Split:
    return take(s, _subsample_indices(len(s.y), k, seed, stream))


def _to_float(s: Split) -> Split:
    x = s.x.astype(np.float32) / 255.0 if s.x.dtype == np.uint8 else s.x.astype(np.float32)
    return Split(np.ascontiguousarray(x), s.y.astype(np.int32))


def load_dataset(
    name: str,
    *,
    data_dir: str | None = None,
    num_train: int | None = None,
    num_test: int | None = None,
    normalize: bool = True,
    seed: int = 0,
    **kwargs: Any,
) -> Dataset:
    """Loads `name` (a key of DATASETS) into memory.

    Args:
      data_dir: IDX directory (`mnist`, `fashion_mnist`) or tfds data_dir (`tfds:*`).
      num_train, num_test: keep this many examples, a subset drawn from `seed` (nested in k; order
        kept). None keeps all.
      normalize: standardise per channel with train-split statistics (`normalize`); otherwise
        images are in [0, 1] (mnist1d as generated).
      **kwargs: dataset options: digits `split_seed`; mnist1d any `get_dataset_args()` field, e.g.
        `num_samples`; tfds `train_split`, `test_split` (tfds split strings).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
    load_fn = DATASETS[name].load_fn
    if name.startswith("tfds:"):  # tfds subsamples before decoding.
        kwargs = {**kwargs, "num_train": num_train, "num_test": num_test, "seed": seed}
    params = inspect.signature(load_fn).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            allowed = sorted(set(params) - {"data_dir", "num_train", "num_test", "seed"})
            raise ValueError(f"{name}: unknown kwargs {unknown}; allowed: {allowed}")
    train, test, num_classes = load_fn(data_dir=data_dir, **kwargs)
    # Identity for loaders that already subsampled (same indices by construction).
    train, test = _subsample(train, num_train, seed, 0), _subsample(test, num_test, seed, 1)
    ds = Dataset(_to_float(train), _to_float(test), num_classes, name)
    return _normalize(ds) if normalize else ds


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (last axis) mean and standard deviation over all other axes, float32."""
    x_NC = x.reshape(-1, x.shape[-1])
    mean = x_NC.mean(0, dtype=np.float64)
    # Two-pass variance in float64, in chunks: x - mean as one float64 array would be 8 bytes per
    # value (1.2 GB for CIFAR-100).
    sq = sum(((c - mean) ** 2).sum(0) for c in np.array_split(x_NC, -(-len(x_NC) // 2**20)))
    return mean.astype(np.float32), np.sqrt(sq / len(x_NC)).astype(np.float32)


def _normalize(ds: Dataset) -> Dataset:
    mean, std = channel_stats(ds.train.x)
    std = np.where(std > 0, std, np.float32(1))  # a constant channel stays centred, not inf.
    f = lambda s: Split(((s.x - mean) / std).astype(np.float32), s.y)  # noqa: E731
    return ds._replace(train=f(ds.train), test=f(ds.test))


def normalize(ds: Dataset) -> Dataset:
    """x' = (x - mu_c) / sigma_c per channel c; mu, sigma from the train split, applied to both."""
    return _normalize(ds)


# ----------------------------------------------------------------------------------------------
# Sub-splits and batch order.


def take(s: Split, idx: np.ndarray) -> Split:
    return Split(s.x[idx], s.y[idx])


def split_indices(n: int, fractions: Mapping[str, float], seed: int) -> dict[str, np.ndarray]:
    """Disjoint sorted index sets of range(n), part k of size ~ fractions[k] * n, drawn from seed.

    One permutation of range(n) is cut at round(n * cumsum(fractions)); if the fractions sum to 1
    the parts cover range(n). Depends only on (n, fractions in order, seed).
    """
    if not fractions:
        raise ValueError("fractions is empty")
    for k, f in fractions.items():
        if not 0.0 < f <= 1.0:
            raise ValueError(f"fractions[{k!r}] = {f} is outside (0, 1]")
    total = sum(fractions.values())
    if total > 1.0 + 1e-9:
        raise ValueError(f"fractions sum to {total} > 1")
    cuts = np.round(n * np.cumsum(list(fractions.values()))).astype(int)
    if abs(total - 1.0) <= 1e-9:
        cuts[-1] = n
    perm = np.random.default_rng(seed).permutation(n)
    out, lo = {}, 0
    for k, hi in zip(fractions, cuts):
        if hi <= lo:
            raise ValueError(f"part {k!r} of {n} examples would be empty (fraction {fractions[k]})")
        out[k] = np.sort(perm[lo:hi])
        lo = hi
    return out


def split(split: Split, fractions: Mapping[str, float], seed: int) -> dict[str, Split]:
    """Disjoint sub-splits, e.g. {"prior": 0.5, "bound": 0.5}; indices from `split_indices`."""
    return {k: take(split, i) for k, i in split_indices(len(split.y), fractions, seed).items()}


def indices_digest(idx: np.ndarray) -> str:
    """sha256 hex of the indices as int64: identifies a sub-split (e.g. a PAC-Bayes bound set)."""
    return hashlib.sha256(np.ascontiguousarray(idx, dtype="<i8").tobytes()).hexdigest()


def batch_indices(
    key: jax.Array,
    num_examples: int,
    batch_size: int,
    num_batches: int,
    drop_remainder: bool = False,
) -> jax.Array:
    """(num_batches, batch_size) int32 example indices, a function of `key` only.

    Epoch e is `permutation(fold_in(key, e), num_examples)`. By default the epochs are concatenated
    and cut into batches (a batch may straddle two epochs when batch_size does not divide
    num_examples); with drop_remainder each epoch gives num_examples // batch_size batches and the
    rest of its permutation is dropped. Either way, fewer batches are a prefix of more. The sizes
    are static: jit with them bound (functools.partial) and vmap over keys.
    """
    if num_examples <= 0 or batch_size <= 0 or num_batches <= 0:
        raise ValueError(
            f"need positive sizes, got num_examples={num_examples}, batch_size={batch_size}, "
            f"num_batches={num_batches}"
        )
    if drop_remainder:
        per_epoch = num_examples // batch_size
        if per_epoch == 0:
            raise ValueError(f"batch_size={batch_size} > num_examples={num_examples}")
        num_epochs = -(-num_batches // per_epoch)
    else:
        num_epochs = -(-num_batches * batch_size // num_examples)
    epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(num_epochs))
    perms = jax.vmap(jax.random.permutation, in_axes=(0, None))(epoch_keys, num_examples)
    perms = perms.astype(jnp.int32)
    if drop_remainder:
        perms = perms[:, : per_epoch * batch_size].reshape(-1, batch_size)
        return perms[:num_batches]
    return perms.reshape(-1)[: num_batches * batch_size].reshape(num_batches, batch_size)
