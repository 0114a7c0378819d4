"""Tests for jaxprune.models: shapes, parameter counts, conv units, fast layers == reference layers."""

from __future__ import annotations

import itertools
import math
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks, models
from jaxprune.models import layers

PyTree = Any

# name, kwargs, input shape (batch 2), exact param count with 10 classes
CASES = [
    ("mlp", {}, (2, 28, 28, 1), 266_610),
    ("lenet300_100", {}, (2, 784), 266_610),
    ("mlp", {"widths": (32,)}, (2, 8, 8), 64 * 32 + 32 + 32 * 10 + 10),
    ("conv1d", {}, (2, 40, 1), 11_786),
    ("small_cnn", {}, (2, 32, 32, 3), 591_274),
    ("small_cnn", {"batch_norm": True}, (2, 32, 32, 3), 591_274 + 2 * (32 + 32 + 64 + 64)),
    ("vgg11_bn", {}, (2, 32, 32, 3), 9_231_114),
    ("resnet18", {}, (2, 32, 32, 3), 11_173_962),
    ("resnet20", {}, (2, 32, 32, 3), 269_722),
    ("resnet20", {"shortcut": "B"}, (2, 32, 32, 3), 272_474),
    ("resnet56", {}, (2, 32, 32, 3), 853_018),
]
HAS_BN = {"vgg11_bn", "resnet18", "resnet20", "resnet56"}
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for n, kw, _, _ in CASES]


def _abstract(name: str, kwargs: dict, shape: tuple[int, ...]) -> tuple[nn.Module, PyTree]:
    model = models.get_model(name, 10, **kwargs)
    return model, jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def _count(tree: PyTree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name,kwargs,shape,count", CASES, ids=IDS)
def test_param_count_and_output_shape(name: str, kwargs: dict, shape: tuple, count: int) -> None:
    model, variables = _abstract(name, kwargs, shape)
    assert _count(variables["params"]) == count
    has_bn = name in HAS_BN or kwargs.get("batch_norm", False)
    assert set(variables) == ({"params", "batch_stats"} if has_bn else {"params"})
    for train in (False, True):
        out, new = jax.eval_shape(
            lambda v, x, t=train: model.apply(v, x, train=t, mutable=["batch_stats"]),
            variables, jnp.zeros(shape),
        )
        assert out.shape == (2, 10) and out.dtype == jnp.float32
        if has_bn:
            chex.assert_trees_all_equal_shapes(new["batch_stats"], variables["batch_stats"])


def test_issue_param_counts_are_close_to_the_papers() -> None:
    expected_m = {"resnet20": 0.27, "resnet56": 0.85, "resnet18": 11.2, "vgg11_bn": 9.2}
    for name, millions in expected_m.items():
        _, variables = _abstract(name, {}, (2, 32, 32, 3))
        assert abs(_count(variables["params"]) / 1e6 - millions) / millions < 0.01, name


def test_unknown_model_raises_listing_names() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg19'.*resnet20"):
        models.get_model("vgg19", 10)


@pytest.mark.parametrize("kwargs", [{"conv_impl": "fast"}, {"pool_impl": "avg"}])
def test_bad_impl_raises(kwargs: dict) -> None:
    model = models.get_model("small_cnn", 10, **kwargs)
    with pytest.raises(ValueError, match="impl"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((2, 8, 8, 1)))


def test_small_cnn_input_too_small_for_its_pools_raises() -> None:
    # 3 pools on 8x8: 4x4, 2x2, 1x1 fits; on 4x4 the third pool would see a 1x1 map (a 0-size
    # dense input and a ZeroDivisionError in its init, before this check).
    model = models.get_model("small_cnn", 10, channels=(2, 2, 2, 2, 2, 2), dense=4)
    assert jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
    with pytest.raises(ValueError, match=r"\(1, 1\) before pool 3 is too small"):
        jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4, 4, 1)))


def _forward_conv_paths(model: nn.Module, variables: PyTree, shape: tuple) -> list[tuple[str, ...]]:
    """Kernel paths of the convs in the order the forward pass calls them (recorded by tracing)."""
    calls: list[tuple[str, ...]] = []

    def record(next_fn, args, kwargs, context):  # noqa: ANN001, ANN202
        if isinstance(context.module, layers.Conv) and context.method_name == "__call__":
            calls.append((*context.module.path, "kernel"))
        return next_fn(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda v, x: model.apply(v, x), variables, jnp.zeros(shape))
    return calls


@pytest.mark.parametrize("name,kwargs,shape,count", CASES, ids=IDS)
def test_conv_units_paths_and_order(name: str, kwargs: dict, shape: tuple, count: int) -> None:
    del count
    model, variables = _abstract(name, kwargs, shape)
    params = variables["params"]
    units = models.conv_units(model, params)
    assert models.conv_units(model, variables) == units  # the variables dict works too
    assert len({u.name for u in units}) == len(units)
    shortcut_kernels = []
    for u in units:
        assert u.name == "_".join(u.kernel_path[:-1])
        node = params
        for p in u.kernel_path:
            node = node[p]
        assert node.ndim == (3 if name == "conv1d" else 4)
        if u.bn_path is not None:
            bn = params
            for p in u.bn_path:
                bn = bn[p]
            assert bn["scale"].shape == bn["bias"].shape == (node.shape[-1],)
        for path in u.shortcut_paths:
            leaf = params
            for p in path:
                leaf = leaf[p]
            for x in jax.tree.leaves(leaf):
                assert x.shape[-1] == node.shape[-1]
            if path[-1] == "kernel":
                shortcut_kernels.append(path)
    # Units in forward order, and every conv kernel is a unit or some unit's shortcut.
    all_kernels = _forward_conv_paths(model, variables, shape)
    unit_kernels = [u.kernel_path for u in units]
    assert unit_kernels == [p for p in all_kernels if p not in shortcut_kernels]
    assert sorted(unit_kernels + shortcut_kernels) == sorted(all_kernels)
    expected_units = {"mlp": 0, "lenet300_100": 0, "conv1d": 3, "small_cnn": 4, "vgg11_bn": 8,
                      "resnet18": 17, "resnet20": 19, "resnet56": 55}[name]
    assert len(units) == expected_units
    if name == "resnet18":
        with_shortcut = [u.name for u in units if u.shortcut_paths]
        assert with_shortcut == ["stage2_block1_conv2", "stage3_block1_conv2", "stage4_block1_conv2"]
        assert [u.name for u in units[-4:]] == [
            "stage4_block1_conv1", "stage4_block1_conv2", "stage4_block2_conv1", "stage4_block2_conv2"]
    if name == "vgg11_bn":
        assert [u.name for u in units[-4:]] == ["conv5", "conv6", "conv7", "conv8"]


def test_conv_units_rejects_foreign_params() -> None:
    model, _ = _abstract("vgg11_bn", {"width": 1 / 16}, (2, 32, 32, 3))
    _, other = _abstract("small_cnn", {}, (2, 32, 32, 3))
    with pytest.raises(ValueError, match="bn1"):
        models.conv_units(model, other["params"])


# ---- fast layers against the reference (nn.Conv / nn.max_pool), forward and gradients ----

CONV_CASES = [  # spatial input, kernel, strides, padding, C_in, C_out
    ((2, 2), (3, 3), (1, 1), "SAME", 8, 16),
    ((1, 1), (3, 3), (1, 1), ((1, 1), (1, 1)), 8, 4),
    ((5, 6), (3, 3), (2, 2), ((1, 1), (1, 1)), 3, 5),
    ((6, 6), (1, 1), (2, 2), "VALID", 4, 6),
    ((40,), (5,), (2,), ((1, 1),), 1, 7),
]


@pytest.mark.parametrize("spatial,ksize,strides,padding,cin,cout", CONV_CASES)
@pytest.mark.parametrize("impl", ["patches", "auto"])
def test_conv_matches_flax_conv(spatial, ksize, strides, padding, cin, cout, impl, key) -> None:
    x = jax.random.normal(key, (2, *spatial, cin))
    ref = nn.Conv(cout, ksize, strides, padding)
    ours = layers.Conv(cout, ksize, strides, padding, impl=impl)
    abstract = jax.eval_shape(ref.init, jax.random.key(1), x)
    chex.assert_trees_all_equal_shapes(  # same names and shapes as nn.Conv
        abstract, jax.eval_shape(ours.init, jax.random.key(1), x))
    params = _numpy_init(abstract)

    def loss(module: nn.Module, p: PyTree, x: jax.Array) -> jax.Array:
        y = module.apply(p, x)
        return jnp.sum(jnp.sin(y)), y

    (_, y_ref), g_ref = jax.jit(jax.value_and_grad(lambda p, x: loss(ref, p, x), (0, 1),
                                                   has_aux=True))(params, x)
    (_, y), g = jax.jit(jax.value_and_grad(lambda p, x: loss(ours, p, x), (0, 1),
                                           has_aux=True))(params, x)
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_auto_conv_picks_shifts_on_cpu_and_xla_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    x, k = jnp.ones((1, 8, 8, 3)), jnp.ones((3, 3, 3, 4))

    def primitives() -> set[str]:
        jaxpr = jax.make_jaxpr(lambda x, k: layers.conv(x, k, (1, 1), "SAME", "auto"))(x, k)
        return {str(e.primitive) for e in jaxpr.jaxpr.eqns}

    assert jax.default_backend() == "cpu"
    assert "conv_general_dilated" not in primitives() and "dot_general" in primitives()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rule, not a real GPU
    assert "conv_general_dilated" in primitives()


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 5, 2), (2, 2, 2, 4), (2, 9, 3)])
def test_reshape_max_pool_matches_flax(shape: tuple, key) -> None:
    x = jax.random.normal(key, shape)  # continuous values: no ties, so the argmax gradient is unique
    nd = len(shape) - 2

    def ref(x: jax.Array) -> jax.Array:
        return nn.max_pool(x, (2,) * nd, (2,) * nd, padding="VALID")

    def fast(x: jax.Array) -> jax.Array:
        return layers.max_pool(x, "reshape")

    w = jax.random.normal(jax.random.key(3), ref(x).shape)
    y_ref, g_ref = jax.jit(jax.value_and_grad(lambda x: jnp.sum(w * ref(x))))(x)
    y, g = jax.jit(jax.value_and_grad(lambda x: jnp.sum(w * fast(x))))(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    np.testing.assert_array_equal(g, g_ref)
    np.testing.assert_array_equal(layers.max_pool(x, "xla"), ref(x))


# ---- tiny real forward passes, and whole models equal across implementations ----

TINY = [  # cheap to compile and run on CPU
    ("mlp", {"widths": (16, 8)}, (2, 8, 8, 1)),
    ("conv1d", {"channels": (4, 4, 4)}, (2, 40, 1)),
    ("small_cnn", {"channels": (4, 4, 8, 8), "dense": 16, "batch_norm": True}, (2, 8, 8, 3)),
    ("vgg11_bn", {"width": 1 / 16}, (2, 32, 32, 3)),
    ("resnet20", {"width": 0.25, "stage_sizes": (1, 1, 1)}, (2, 8, 8, 3)),
    # resnet18 shares the block code; its projection shortcuts are covered by the eval_shape tests
    # (a real forward costs ~30 s of compile on 2 cores).
]
REFERENCE = {"conv_impl": "xla", "pool_impl": "xla"}


def _numpy_init(variables: PyTree, seed: int = 0) -> PyTree:
    """Concrete variables for an abstract tree, drawn with numpy.

    Compiling `model.init` is slow on XLA CPU (jax 0.10.2, threefry_partitionable: about 10 s for a
    width-1/16 VGG11 on an idle machine, over a minute under load), so the forward tests skip it.
    """
    rng = np.random.default_rng(seed)

    def leaf(path: tuple, s: jax.ShapeDtypeStruct) -> jax.Array:
        name = path[-1].key
        if name == "kernel":
            x = rng.standard_normal(s.shape) / np.sqrt(math.prod(s.shape[:-1]))
        elif name in ("scale", "var"):
            x = 1.0 + 0.1 * rng.random(s.shape)
        else:  # biases, BN shifts and running means
            x = 0.1 * rng.standard_normal(s.shape)
        return jnp.asarray(x, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, variables)


def _impl_kwargs(name: str, kw: dict) -> dict:
    keys = {"mlp": (), "conv1d": ("conv_impl",), "resnet20": ("conv_impl",),
            "resnet18": ("conv_impl",)}.get(name, ("conv_impl", "pool_impl"))
    return {k: v for k, v in kw.items() if k in keys}


@pytest.mark.parametrize("name,kwargs,shape", TINY, ids=[t[0] for t in TINY])
def test_tiny_forward_and_fast_equals_reference(name: str, kwargs: dict, shape: tuple, key) -> None:
    x_key, init_key = jax.random.split(key)
    x = jax.random.normal(x_key, shape)
    fast = models.get_model(name, 10, **kwargs)
    variables = dict(_numpy_init(jax.eval_shape(fast.init, init_key, x)))
    variables.setdefault("batch_stats", {})  # documented: models without BN accept an empty dict

    def loss(model: nn.Module, v: PyTree) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        out, new = model.apply(v, x, train=True, mutable=["batch_stats"])
        return jnp.sum(out * jnp.arange(10.0)[None]), (out, new)

    grad_fn = lambda m: jax.jit(jax.grad(lambda p: loss(m, {**variables, "params": p}),
                                         has_aux=True))  # noqa: E731
    g, (out, new) = grad_fn(fast)(variables["params"])
    assert out.shape == (2, 10) and bool(jnp.all(jnp.isfinite(out)))
    if variables["batch_stats"]:  # train mode moved the running means towards the batch means
        before = jax.tree.leaves(variables["batch_stats"])
        after = jax.tree.leaves(new["batch_stats"])
        assert any(not np.allclose(a, b) for a, b in zip(before, after, strict=True))
    eval_out = jax.jit(lambda v: fast.apply(v, x, train=False))(variables)
    assert eval_out.shape == (2, 10)
    if name == "mlp":
        return
    reference = models.get_model(name, 10, **kwargs, **_impl_kwargs(name, REFERENCE))
    g2, (out2, new2) = grad_fn(reference)(variables["params"])
    chex.assert_trees_all_close(out2, out, rtol=1e-3, atol=1e-4)
    chex.assert_trees_all_close(new2, new, rtol=1e-3, atol=1e-4)
    chex.assert_trees_all_close(g2, g, rtol=1e-3, atol=1e-3)


def test_jitted_init_of_a_small_model(key) -> None:
    model = models.get_model("small_cnn", 10, channels=(2, 2, 4, 64), dense=8, batch_norm=True)
    variables = jax.jit(model.init)(key, jnp.zeros((2, 8, 8, 1)))
    chex.assert_trees_all_equal_shapes(
        variables, jax.eval_shape(model.init, key, jnp.zeros((2, 8, 8, 1))))
    np.testing.assert_array_equal(variables["params"]["bn1"]["scale"], np.ones(2))
    np.testing.assert_array_equal(variables["params"]["conv4"]["bias"], np.zeros(64))
    # He (fan_out) init: Var[w] = 2 / (O k_h k_w). conv4 has 2304 weights, fan_out 576 and fan_in
    # 36, so the sample std (relative sd 1.5%) tells the modes apart: fan_out 0.059, fan_in 0.236,
    # flax's default lecun_normal 0.167 (the old check, 0.2 < std < 0.35 on a 4-in 4-out conv,
    # passed fan_in too).
    w = np.asarray(variables["params"]["conv4"]["kernel"])
    np.testing.assert_allclose(w.std(), np.sqrt(2 / 576), rtol=0.1)
    assert abs(w.mean()) < 4 * np.sqrt(2 / 576) / np.sqrt(w.size)


# ---- whole models against numpy forwards written from the docstrings (train and eval BN) ----
#
# The fast-vs-reference test above runs the same model code twice, so it cannot see an
# architecture bug (BN after the ReLU, a missing ReLU, a pool in the wrong place, an option-A
# shortcut padded on one side, a stride on conv2 instead of conv1) or a BatchNorm with flax's
# defaults (momentum 0.99) instead of PyTorch's (0.9, eps 1e-5).


def _np_conv(x: np.ndarray, k: np.ndarray, strides: tuple, pads: tuple) -> np.ndarray:
    """sum over window offsets of the strided input slice times the kernel tap (HWIO / WIO)."""
    nd = k.ndim - 2
    xp = np.pad(x, [(0, 0), *pads, (0, 0)])
    out = [(xp.shape[1 + d] - k.shape[d]) // strides[d] + 1 for d in range(nd)]
    y = 0.0
    for off in itertools.product(*(range(n) for n in k.shape[:nd])):
        sl = tuple(slice(o, o + s * (n - 1) + 1, s) for o, s, n in zip(off, strides, out))
        y = y + np.einsum("...c,co->...o", xp[(slice(None), *sl)], k[off])
    return y


def _np_bn(x: np.ndarray, p: dict, s: dict, train: bool) -> tuple[np.ndarray, dict]:
    """PyTorch BatchNorm: batch statistics (biased variance) in train mode, updating the running
    ones with momentum 0.1; running statistics in eval mode; eps 1e-5."""
    if train:
        mean, var = x.mean(tuple(range(x.ndim - 1))), x.var(tuple(range(x.ndim - 1)))
        s = {"mean": 0.9 * s["mean"] + 0.1 * mean, "var": 0.9 * s["var"] + 0.1 * var}
    else:
        mean, var = s["mean"], s["var"]
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"], s


def _relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0.0)


def _np_pool(x: np.ndarray) -> np.ndarray:
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _dense(x: np.ndarray, p: dict) -> np.ndarray:
    return x.reshape(x.shape[0], -1) @ p["kernel"] + p["bias"]


def _np_mlp(p: dict, s: dict, x: np.ndarray, train: bool) -> tuple[np.ndarray, dict]:
    h = _relu(_dense(_relu(_dense(x, p["dense1"])), p["dense2"]))
    return _dense(h, p["head"]), s


def _np_conv1d(p: dict, s: dict, x: np.ndarray, train: bool) -> tuple[np.ndarray, dict]:
    for i in (1, 2, 3):  # k=5, stride 2, padding 1: 40 -> 19 -> 9 -> 4
        c = p[f"conv{i}"]
        x = _relu(_np_conv(x, c["kernel"], (2,), ((1, 1),)) + c["bias"])
    return _dense(x, p["head"]), s


def _np_small_cnn(p: dict, s: dict, x: np.ndarray, train: bool) -> tuple[np.ndarray, dict]:
    new = {}
    for i in (1, 2, 3, 4):  # conv -> BN -> ReLU, a pool after each pair
        c = p[f"conv{i}"]
        x, new[f"bn{i}"] = _np_bn(_np_conv(x, c["kernel"], (1, 1), ((1, 1),) * 2) + c["bias"],
                                  p[f"bn{i}"], s[f"bn{i}"], train)
        x = _relu(x)
        x = _np_pool(x) if i % 2 == 0 else x
    return _dense(_relu(_dense(x, p["dense1"])), p["head"]), new


VGG_TINY_CFG = (4, "M", 6, 6, "M")


def _np_vgg(p: dict, s: dict, x: np.ndarray, train: bool) -> tuple[np.ndarray, dict]:
    new, i = {}, 0
    for c in VGG_TINY_CFG:
        if c == "M":
            x = _np_pool(x)
            continue
        i += 1
        conv = p[f"conv{i}"]
        x, new[f"bn{i}"] = _np_bn(_np_conv(x, conv["kernel"], (1, 1), ((1, 1),) * 2) + conv["bias"],
                                  p[f"bn{i}"], s[f"bn{i}"], train)
        x = _relu(x)
    return _dense(x, p["head"]), new


def _np_resnet(p: dict, s: dict, x: np.ndarray, train: bool,
               shortcut: str) -> tuple[np.ndarray, dict]:
    """Stem (2 channels), an identity block (2 -> 2) and a stride-2 block (2 -> 4) whose shortcut is
    option A (x[::2, ::2] zero-padded by planes // 4 = 1 channel on each side, as Idelbayev's
    LambdaLayer) or B (1x1 stride-2 conv + BN)."""
    pad1 = ((1, 1), (1, 1))
    new = {}
    x, new["stem_bn"] = _np_bn(_np_conv(x, p["stem_conv"]["kernel"], (1, 1), pad1), p["stem_bn"],
                               s["stem_bn"], train)
    x = _relu(x)
    for name, stride, planes in (("stage1_block1", 1, 2), ("stage2_block1", 2, 4)):
        bp, bs, nb = p[name], s[name], {}
        y, nb["bn1"] = _np_bn(_np_conv(x, bp["conv1"]["kernel"], (stride,) * 2, pad1), bp["bn1"],
                              bs["bn1"], train)
        y, nb["bn2"] = _np_bn(_np_conv(_relu(y), bp["conv2"]["kernel"], (1, 1), pad1), bp["bn2"],
                              bs["bn2"], train)
        if stride == 1:
            sc = x
        elif shortcut == "B":
            sc, nb["shortcut_bn"] = _np_bn(
                _np_conv(x, bp["shortcut_conv"]["kernel"], (2, 2), ((0, 0), (0, 0))),
                bp["shortcut_bn"], bs["shortcut_bn"], train)
        else:
            sc = np.pad(x[:, ::2, ::2], [(0, 0)] * 3 + [(planes // 4, planes // 4)])
        x, new[name] = _relu(y + sc), nb
    return _dense(x.mean(axis=(1, 2)), p["head"]), new


RESNET_TINY = {"stage_sizes": (1, 1), "stage_widths": (2, 4), "stem_width": 2}
NUMPY_CASES = [  # id, model name, kwargs, input shape, numpy forward
    ("mlp", "mlp", {"widths": (16, 8)}, (3, 4, 4, 1), _np_mlp),
    ("conv1d", "conv1d", {"channels": (4, 4, 4)}, (3, 40, 1), _np_conv1d),
    ("small_cnn_bn", "small_cnn", {"channels": (3, 4, 5, 6), "dense": 7, "batch_norm": True},
     (3, 4, 4, 2), _np_small_cnn),
    ("vgg", "vgg11_bn", {"cfg": VGG_TINY_CFG}, (3, 4, 4, 2), _np_vgg),
    ("resnet_A", "resnet20", {**RESNET_TINY, "shortcut": "A"}, (3, 4, 4, 2),
     lambda p, s, x, t: _np_resnet(p, s, x, t, "A")),
    ("resnet_B", "resnet20", {**RESNET_TINY, "shortcut": "B"}, (3, 4, 4, 2),
     lambda p, s, x, t: _np_resnet(p, s, x, t, "B")),
]


@pytest.mark.parametrize("name,kwargs,shape,reference", [c[1:] for c in NUMPY_CASES],
                         ids=[c[0] for c in NUMPY_CASES])
def test_forward_and_batch_norm_match_numpy(name: str, kwargs: dict, shape: tuple, reference,
                                            key) -> None:
    model = models.get_model(name, 10, **kwargs)
    x = jax.random.normal(key, shape)
    variables = dict(_numpy_init(jax.eval_shape(model.init, key, x), seed=1))
    variables.setdefault("batch_stats", {})
    apply = jax.jit(lambda v, x: (model.apply(v, x, train=True, mutable=["batch_stats"]),
                                  model.apply(v, x, train=False, mutable=["batch_stats"])))
    (out_t, new_t), (out_e, new_e) = apply(variables, x)
    p64, s64 = (jax.tree.map(lambda a: np.asarray(a, np.float64), variables[k])
                for k in ("params", "batch_stats"))
    x64 = np.asarray(x, np.float64)
    want_t, want_stats = reference(p64, s64, x64, True)
    want_e, _ = reference(p64, s64, x64, False)
    np.testing.assert_allclose(out_t, want_t, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out_e, want_e, rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(dict(new_t["batch_stats"]), want_stats, rtol=1e-4, atol=1e-6)
    chex.assert_trees_all_equal(new_e["batch_stats"], variables["batch_stats"])  # eval: untouched
    if variables["batch_stats"]:  # train and eval differ (batch vs running statistics)
        assert np.abs(np.asarray(out_t) - np.asarray(out_e)).max() > 1e-2


# ---- conv_units + masks.channel_to_param_mask silence exactly the pruned channels ----

MASK_CASES = [  # id, model name, kwargs, input shape, unit to prune, layer whose output is checked
    # All three VGG convs have 4 or 6 channels, so a unit paired with the wrong BN (conv2 -> bn3)
    # would pass the shape checks of test_conv_units_paths_and_order.
    pytest.param("vgg11_bn", {"cfg": (4, "M", 6, 6, "M")}, (3, 4, 4, 2), "conv2", "bn2", id="vgg"),
    # Without BatchNorm the conv's own bias must be masked too, or the pruned channel carries
    # relu(0 * x + b) = relu(b) (it did before channel_to_param_mask masked the whole conv module).
    pytest.param("conv1d", {"channels": (4, 4, 4)}, (3, 40, 1), "conv2", "conv2", id="conv1d"),
    pytest.param("small_cnn", {"channels": (3, 4, 5, 6), "dense": 7}, (3, 4, 4, 2), "conv3",
                 "conv3", id="small_cnn_no_bn"),
]


@pytest.mark.parametrize("name,kwargs,shape,unit,layer", MASK_CASES)
def test_channel_mask_zeroes_exactly_the_pruned_channels(name: str, kwargs: dict, shape: tuple,
                                                         unit: str, layer: str, key) -> None:
    model = models.get_model(name, 10, **kwargs)
    x = jax.random.normal(key, shape)
    variables = dict(_numpy_init(jax.eval_shape(model.init, key, x), seed=2))
    variables.setdefault("batch_stats", {})
    # Trained-looking biases: positive, so relu(bias) would show through a pruned channel.
    params = jax.tree_util.tree_map_with_path(
        lambda path, v: jnp.abs(v) + 0.1 if path[-1].key == "bias" else v, variables["params"])
    units = models.conv_units(model, params)
    width = masks.get_path(params, {u.name: u for u in units}[unit].kernel_path).shape[-1]
    dead = np.zeros(width, bool)
    dead[[1, width - 1]] = True
    mask = masks.channel_to_param_mask(params, {unit: jnp.asarray(~dead, jnp.float32)}, units)

    @jax.jit
    def activations(p: PyTree) -> list[jax.Array]:
        acts = []
        for train in (True, False):
            _, state = model.apply({**variables, "params": p}, x, train=train,
                                   capture_intermediates=True,
                                   mutable=["intermediates", "batch_stats"])
            acts.append(jax.nn.relu(state["intermediates"][layer]["__call__"][0]))
        return acts

    for full, pruned in zip(activations(params), activations(masks.apply(params, mask))):
        full, pruned = np.asarray(full), np.asarray(pruned)
        positions = tuple(range(full.ndim - 1))
        assert np.abs(full[..., dead]).max(axis=positions).min() > 0  # not vacuous
        np.testing.assert_array_equal(pruned[..., dead], 0.0)
        np.testing.assert_allclose(pruned[..., ~dead], full[..., ~dead], rtol=1e-6, atol=1e-6)


# ---- bad arguments: model constructors and conv_units ----


def _kernel_2d(params: PyTree) -> PyTree:
    """small_cnn params whose conv1 kernel is a 2-D (dense-like) array."""
    kernel = jax.ShapeDtypeStruct((3, 4), jnp.float32)
    return {**params, "conv1": {**params["conv1"], "kernel": kernel}}


def _init_shape(name: str, shape: tuple, **kwargs) -> Any:
    return jax.eval_shape(models.get_model(name, 10, **kwargs).init, jax.random.key(0),
                          jnp.zeros(shape))


@pytest.mark.parametrize("call,match", [
    pytest.param(lambda: _init_shape("small_cnn", (1, 8, 8, 1), channels=(2, 2, 2)),
                 r"channels=\(2, 2, 2\): need pairs of convs", id="small_cnn-odd-channels"),
    pytest.param(lambda: _init_shape("vgg11_bn", (1, 2, 2, 1), cfg=(4, "M", 4, "M")),
                 r"VGG input map \(1, 1\) too small to pool", id="vgg-input-too-small"),
    pytest.param(lambda: _init_shape("resnet20", (1, 8, 8, 3), shortcut="C"),
                 r"shortcut='C'; expected one of \('A', 'B'\)", id="resnet-shortcut"),
    pytest.param(lambda: _init_shape("small_cnn", (2, 8, 8)),
                 r"conv1: input of shape \(2, 8, 8\) for a 2-D conv", id="conv-input-rank"),
    pytest.param(lambda: models.conv_units(nn.Dense(3), {}),
                 "Dense does not list its conv units", id="conv_units-no-list"),
    pytest.param(lambda: models.conv_units(
        models.get_model("small_cnn", 10),
        _kernel_2d(_init_shape("small_cnn", (1, 8, 8, 3))["params"])),
                 "conv1/kernel is not a conv kernel", id="conv_units-2d-kernel"),
])
def test_bad_model_arguments_raise(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
