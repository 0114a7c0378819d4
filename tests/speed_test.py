"""The fast CPU convs equal nn.Conv: "shifts" alone and vmapped over seeds, "canonical" under every
transform (tiny shapes); "auto"'s per-layer choice (read off the jaxpr) follows README's table;
smoke tests of the speed benchmarks."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from pathlib import Path

import chex
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import layers

CASES = [  # spatial input, kernel, strides, padding, C_in, C_out
    ((2, 2), (3, 3), (1, 1), "SAME", 3, 4),
    ((5, 6), (3, 3), (2, 2), ((1, 1), (1, 1)), 3, 5),
    ((5, 5), (3, 3), (2, 2), "SAME", 2, 3),  # SAME with stride 2: lax puts the odd pad after
    ((6, 6), (1, 1), (2, 2), "VALID", 4, 6),
    ((40,), (5,), (2,), ((1, 1),), 1, 7),
]


@pytest.mark.parametrize("spatial,ksize,strides,padding,cin,cout", CASES)
def test_shifts_conv_matches_flax_conv_and_vmaps(spatial, ksize, strides, padding, cin, cout) -> None:
    s = 3  # seeds
    x_key, k_key = jax.random.split(jax.random.key(0))
    x_S = jax.random.normal(x_key, (s, 2, *spatial, cin))
    ref = nn.Conv(cout, ksize, strides, padding, use_bias=False)
    ours = layers.Conv(cout, ksize, strides, padding, use_bias=False, impl="shifts")
    abstract = jax.eval_shape(ref.init, jax.random.key(1), x_S[0])
    chex.assert_trees_all_equal_shapes(abstract, jax.eval_shape(ours.init, jax.random.key(1), x_S[0]))
    kernel_S = jax.random.normal(k_key, (s, *ksize, cin, cout))

    def loss(module: nn.Module, kernel: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = module.apply({"params": {"kernel": kernel}}, x)
        return jnp.sum(jnp.sin(y)), y

    def grads(module: nn.Module):
        return jax.value_and_grad(functools.partial(loss, module), (0, 1), has_aux=True)

    (_, y_ref), g_ref = jax.jit(jax.vmap(grads(ref)))(kernel_S, x_S)  # XLA's grouped conv
    (_, y), g = jax.jit(jax.vmap(grads(ours)))(kernel_S, x_S)  # batched matmul
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)
    (_, y0), g0 = jax.jit(grads(ours))(kernel_S[0], x_S[0])  # no vmap: seed 0 alone
    np.testing.assert_allclose(y0, y[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g0, jax.tree.map(lambda v: v[0], g), rtol=1e-5, atol=1e-6)


# The last case's stride-3 windows leave two rows of the padded input unread (the dW conv crops them).
CANONICAL_CASES = [*CASES, ((7, 6), (3, 2), (3, 2), ((1, 4), (0, 2)), 2, 3)]


@pytest.mark.parametrize("spatial,ksize,strides,padding,cin,cout", CANONICAL_CASES)
def test_canonical_conv_equals_autodiff_of_xla_under_every_transform(
        spatial, ksize, strides, padding, cin, cout) -> None:
    s = 3  # seeds
    x_key, k_key, v_key = jax.random.split(jax.random.key(0), 3)
    x_S = jax.random.normal(x_key, (s, 8, *spatial, cin))  # 8 rows: one conv per seed under vmap
    kernel_S = jax.random.normal(k_key, (s, *ksize, cin, cout)) / np.sqrt(math.prod(ksize) * cin)
    v = jax.random.normal(v_key, kernel_S.shape[1:])

    def loss(impl: str, kernel: jax.Array, x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(layers.conv(x, kernel, strides, padding, impl)))

    def each(impl: str) -> dict:
        g = jax.grad(functools.partial(loss, impl), (0, 1))
        gk = lambda k, x: g(k, x)[0]  # noqa: E731
        hvp = lambda k, x: jax.jvp(lambda k: gk(k, x), (k,), (v,))[1]  # noqa: E731
        k0, x0 = kernel_S[0], x_S[0]
        return {
            "value": jax.jit(functools.partial(loss, impl))(k0, x0),
            "grad": jax.jit(g)(k0, x0),
            "vmap seeds": jax.jit(jax.vmap(g))(kernel_S, x_S),
            "vmap 11 seeds": jax.jit(jax.vmap(g))(  # a group of 8 unrolled seeds, then 3
                jnp.concatenate([kernel_S] * 4)[:11], jnp.concatenate([x_S] * 4)[:11]),
            "vmap seeds, 2 rows": jax.jit(jax.vmap(g))(kernel_S, x_S[:, :2]),  # the shifts path
            "vmap seeds, shared x": jax.jit(jax.vmap(g, (0, None)))(kernel_S, x0),
            "grad of vmap": jax.jit(jax.grad(lambda k: jax.vmap(functools.partial(loss, impl))(
                k, x_S).sum()))(kernel_S),
            "hvp": jax.jit(hvp)(k0, x0),
            "vmap hvp": jax.jit(jax.vmap(hvp))(kernel_S, x_S),
            "grad of grad": jax.jit(jax.grad(lambda k: jnp.sum(gk(k, x0) * v)))(k0),
            "scan": jax.jit(lambda k: jax.lax.scan(lambda k, _: (k - 0.1 * gk(k, x0), None), k, None,
                                                   length=2)[0])(k0),
        }

    ours, ref = each("canonical"), each("xla")
    for name in ref:
        chex.assert_trees_all_close(ours[name], ref[name], rtol=1e-4, atol=1e-5, custom_message=name)


def _convs(fn: Callable, *args: jax.Array) -> list:
    """dimension_numbers of every conv_general_dilated in fn's jaxpr (sub-jaxprs included)."""
    found = []

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "conv_general_dilated":
                found.append(eqn.params["dimension_numbers"])
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def test_canonical_backward_convs_keep_the_forward_layout() -> None:
    """The point of "canonical": no conv with permuted dimension numbers in the gradient (jaxpr)."""
    x, k = jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 4))
    canonical = jax.lax.conv_dimension_numbers(x.shape, k.shape, ("NHWC", "HWIO", "NHWC"))

    def layouts(impl: str) -> set:
        loss = lambda x, k: jnp.sum(layers.conv(x, k, (2, 2), "SAME", impl) ** 2)  # noqa: E731
        return set(_convs(jax.grad(loss, (0, 1)), x, k))

    assert layouts("canonical") == {canonical}
    assert layouts("xla") - {canonical}  # autodiff's dW conv is permuted


def test_batched_seed_convs_switches_vmapped_canonical_convs_to_matmuls() -> None:
    x, k = jnp.ones((3, 8, 6, 6, 8)), jnp.ones((3, 3, 3, 8, 4))  # 3 seeds

    def f() -> Callable:  # a new function per trace: jax caches traces per function
        return jax.vmap(lambda x, k: layers.conv(x, k, (1, 1), "VALID", "canonical"))

    assert len(_convs(f(), x, k)) == 3  # one conv per seed
    with layers.batched_seed_convs():  # what sharding.map_seeds_sharded traces under
        assert not _convs(f(), x, k)
        np.testing.assert_allclose(jax.jit(f())(x, k), 72.0)  # 3 x 3 x 8 ones
    assert len(_convs(f(), x, k)) == 3


def test_auto_picks_canonical_only_where_it_measured_faster() -> None:
    assert jax.default_backend() == "cpu"
    assert layers.auto_impl((64, 14, 14, 8), (1, 1)) == "canonical"
    assert layers.auto_impl((64, 3, 3, 32), (1, 1)) == "canonical"
    assert layers.auto_impl((64, 14, 14, 8), (2, 2)) == "shifts"  # strided
    assert layers.auto_impl((64, 14, 14, 3), (1, 1)) == "shifts"  # first layer
    assert layers.auto_impl((64, 8, 8, 64), (1, 1)) == "shifts"  # wide
    assert layers.auto_impl((64, 2, 2, 32), (1, 1)) == "shifts"  # 2x2 map
    assert layers.auto_impl((64, 40, 16), (1,)) == "canonical"  # 1-D


def _impl_traced(x_shape: tuple, strides: tuple) -> str:
    """Which implementation layers.conv(..., "auto") traced to, read off its jaxpr."""
    x = jnp.ones(x_shape)
    k = jnp.ones((*(3,) * len(strides), x_shape[-1], 4))
    prims: set[str] = set()

    def walk(jaxpr) -> None:
        for eqn in jaxpr.eqns:
            prims.add(eqn.primitive.name)
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(lambda x, k: layers.conv(x, k, strides, "SAME", "auto"))(x, k).jaxpr)
    if "custom_vjp_call" in prims:
        return "canonical"
    # "shifts": slices and a matmul; "patches": the patches conv and a matmul; "xla": one conv.
    return {(False, True): "shifts", (True, True): "patches", (True, False): "xla"}[
        ("conv_general_dilated" in prims, "dot_general" in prims)]


# x shape (N, *spatial, C_in), strides -> "auto"'s choice on CPU (README "Conv implementation on
# CPU"): "canonical" for stride-1 convs with 8 <= C_in < 64 on maps larger than 2x2.
AUTO_CPU = [
    ((2, 6, 6, 8), (1, 1), "canonical"),  # C_in = 8: catches `lo < C_in`
    ((2, 6, 6, 63), (1, 1), "canonical"),
    ((2, 6, 6, 64), (1, 1), "shifts"),  # catches `C_in <= hi`
    ((2, 6, 6, 7), (1, 1), "shifts"),
    ((2, 6, 6, 8), (1, 2), "shifts"),  # catches `any(s == 1)`: one strided dim is strided
    ((2, 6, 6, 8), (2, 1), "shifts"),
    ((2, 1, 5, 8), (1, 1), "canonical"),  # 5 pixels > 4: catches a 2-D "larger than 2x2" test
    ((2, 2, 2, 8), (1, 1), "shifts"),  # 4 pixels: 75x slower as "canonical"
    ((2, 3, 3, 3, 8), (1, 1, 1), "canonical"),  # 3-D
]


@pytest.mark.parametrize("x_shape,strides,impl", AUTO_CPU)
def test_auto_runs_canonical_exactly_where_the_table_says(x_shape, strides, impl) -> None:
    assert jax.default_backend() == "cpu"
    # Catches conv() dispatching on another shape (the kernel's) than auto_impl's rule reads.
    assert layers.auto_impl(x_shape, strides) == _impl_traced(x_shape, strides) == impl


def test_auto_off_cpu_picks_patches_on_small_maps_and_xla_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # the rule, not a real GPU
    for x_shape, strides, impl in [
            ((2, 2, 2, 32), (1, 1), "patches"), ((2, 1, 4, 8), (2, 1), "patches"),
            ((2, 3, 3, 32), (1, 1), "xla"), ((2, 6, 6, 8), (1, 1), "xla"),
            ((2, 4, 16), (1,), "patches"), ((2, 5, 16), (1,), "xla")]:
        # Catches the CPU table used on accelerators, or a `<` at the 4-pixel boundary.
        assert layers.auto_impl(x_shape, strides) == _impl_traced(x_shape, strides) == impl, x_shape


def test_conv_impls_and_unknown_names_raise() -> None:
    assert layers.CONV_IMPLS == ("auto", "xla", "patches", "shifts", "canonical")  # README's list
    assert layers.POOL_IMPLS == ("reshape", "xla")
    with pytest.raises(ValueError, match="conv_impl='shift'"):
        layers.check_impl("shift")
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 3))
    # Catches an unknown name falling through to the last branch ("xla") of conv's dispatch.
    with pytest.raises(ValueError, match="conv_impl='fast'"):
        layers.conv(x, k, (1, 1), "SAME", "fast")
    with pytest.raises(ValueError, match="conv_impl='fast'"):
        layers.Conv(3, (3, 3), impl="fast").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="pool_impl='avg'"):
        layers.max_pool(x, "avg")


def test_batched_seed_convs_restores_per_seed_convs_after_an_error() -> None:
    assert layers._PER_SEED_CONVS.get() is True
    with pytest.raises(RuntimeError, match="inside"):
        with layers.batched_seed_convs():
            assert layers._PER_SEED_CONVS.get() is False
            raise RuntimeError("inside")
    # Catches a reset skipped by the exception: every later vmapped conv would lose per-seed convs.
    assert layers._PER_SEED_CONVS.get() is True


def test_vmapped_canonical_convs_of_few_rows_take_the_batched_form() -> None:
    k = jnp.ones((3, 3, 3, 8, 4))  # 3 seeds

    def f() -> Callable:  # a new function per trace: jax caches traces per function
        return jax.vmap(lambda x, k: layers.conv(x, k, (1, 1), "VALID", "canonical"))

    # Catches the MAP_MIN_ROWS rule lost (per-example gradients: S one-row convs) or off by one.
    assert layers.MAP_MIN_ROWS == 8
    assert not _convs(f(), jnp.ones((3, 7, 6, 6, 8)), k)
    assert len(_convs(f(), jnp.ones((3, 8, 6, 6, 8)), k)) == 3


# ----------------------------------------------------------------------------- speed benchmarks
# Smoke tests of experiments/benchmarks/{roofline,gpu,torch_compare}.py on tiny sizes (numbers are
# not checked, only that every path runs and the FLOP counts are right).


def test_jaxpr_flops_counts_matmuls_and_convs_exactly() -> None:
    from experiments.benchmarks import roofline

    x = jnp.zeros((2, 6, 6, 3))
    k = jnp.zeros((3, 3, 3, 4))
    w = jnp.zeros((4 * 9, 5))

    def f(x, k, w):  # 3x3 stride-2 SAME conv (6x6 -> 3x3), then a dense layer on the flattened map
        y = layers.conv_xla(x, k, (2, 2), "SAME")
        return y.reshape(2, -1) @ w

    conv = 2 * (2 * 3 * 3 * 4) * (3 * 9)  # 2 x outputs x (C_in x window)
    dense = 2 * 2 * 36 * 5
    assert roofline.jaxpr_flops(f, x, k, w) == conv + dense
    def scanned(x, k, w):
        return jax.lax.scan(lambda c, _: (c, f(x, k, w)), 0.0, None, length=3)[1]

    assert roofline.jaxpr_flops(scanned, x, k, w) == 3 * (conv + dense)


@pytest.mark.usefixtures("fast_compile")
def test_roofline_runs_on_a_tiny_mlp() -> None:
    from experiments.benchmarks import roofline

    out = roofline.run(("mlp",), batch=4, steps=1, matmul_n=64, repeats=1,
                       model_kwargs={"mlp": {"widths": (8,)}}, verbose=False, profile=True)
    r = out["models"][0]
    assert r["ops"] and all(t > 0 for t in r["ops"].values())
    # Forward 2B(784*8 + 8*10); backward twice that, less the input gradient of the first layer.
    assert r["jaxpr_flops"] == 3 * 2 * 4 * (784 * 8 + 8 * 10) - 2 * 4 * 784 * 8
    assert r["xla_flops"] >= r["jaxpr_flops"]  # XLA also counts masks, softmax and Adam
    assert out["matmul"]["flops"] == 2 * 64**3 == out["matmul"]["xla_flops"]
    assert 0 < r["step_fraction_jaxpr"] < np.inf and r["scan_s"] > 0


def test_op_breakdown_lists_only_xla_op_kinds() -> None:
    import re

    from experiments.benchmarks import roofline

    a = jnp.ones((64, 64))
    f = jax.jit(lambda a: jnp.concatenate([a @ a, jnp.sin(a)], 0))
    ops = roofline.op_breakdown(lambda: f(a), calls=2)
    assert ops and all(t > 0 for t in ops.values())
    assert list(ops.values()) == sorted(ops.values(), reverse=True)
    # Op kinds only: no Python frames or executor spans, numeric suffixes stripped.
    assert not [k for k in ops if k.startswith(roofline._NOT_OPS) or re.search(r"\.\d+$", k)]
    assert sum(ops.values()) < 1.0  # thread-seconds per call of a 64x64 matmul


def test_allocator_variants_find_installed_libraries() -> None:
    from experiments.benchmarks import allocators

    assert allocators.find_library("libc.so.6")  # every glibc system has it
    assert allocators.find_library("libnot-a-library.so.0") is None
    v = allocators.variants()
    assert v["glibc default"] == {} and "mmap_max=0" in v["glibc tunables"]["GLIBC_TUNABLES"]
    for name in set(v) - {"glibc default", "glibc tunables"}:  # preloads only where installed
        assert name in allocators.LIBRARIES and Path(v[name]["LD_PRELOAD"]).exists()


def test_batched_matmul_benchmark_times_both_sides() -> None:
    from experiments.benchmarks import batched_matmul

    t_single, t_batched = batched_matmul.bench(16, 8, 4, num_seeds=3, repeats=1)
    assert 0 < t_single < 10 and 0 < t_batched < 10


@pytest.mark.usefixtures("fast_compile")
def test_gpu_benchmark_quick_writes_json(tmp_path) -> None:
    import dataclasses
    import json

    from experiments.benchmarks import gpu

    # The tiny MLP stands in for the conv nets (same code path, a fraction of the compile time).
    s = dataclasses.replace(gpu.Settings.quick(), models=("mlp",), seeds=(2,), matmul_n=64,
                            model_kwargs=(("mlp", (("widths", (8,)),)),), cert_widths=(8,),
                            cert_networks_per_batch=(4,), conv_impls=("xla", "canonical"))
    out = gpu.run(s, str(tmp_path / "gpu.json"), verbose=False)
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["devices"]["count"] == jax.device_count() and saved["devices"]["platform"]
    statuses = [(r["strategy"], r["status"]) for r in out["train"]]
    assert statuses == [("vmap", "ok"), ("sequential", "ok")]
    assert all(r["seed_steps_per_s"] > 0 and r["mfu_xla"] > 0 for r in out["train"])
    # One step from equal params: "canonical" differs from "xla" only in its backward, so the loss
    # of the first step is the same.
    convs = out["conv_impls"]
    assert [(r["conv_impl"], r["status"]) for r in convs] == [("xla", "ok"), ("canonical", "ok")]
    assert convs[0]["max_rel_loss_diff"] == 0 and convs[1]["max_rel_loss_diff"] < 1e-6
    cert, per_example = out["certificate"]
    assert cert["status"] == "ok" and cert["networks_per_s"] > 0
    # Forward of the 784-8-10 MLP: 2 (784*8 + 8*10) FLOPs per example and network.
    assert cert["flops"] == 2 * (784 * 8 + 8 * 10) * s.cert_n * s.cert_networks
    # Per-example scheme: one network per example, R repeats, so R n forwards of one example.
    assert per_example["status"] == "ok" and per_example["scheme"] == "per_example"
    assert per_example["networks"] == s.cert_per_example_repeats * s.cert_n
    assert per_example["flops"] == 2 * (784 * 8 + 8 * 10) * per_example["networks"]


@pytest.mark.usefixtures("fast_compile")
def test_torch_compare_same_work_and_rates() -> None:
    pytest.importorskip("torch")  # benchmark-only dependency, absent in CI
    from experiments.benchmarks import torch_compare
    from jaxprune import train

    cfg = train.TrainConfig(optimizer="sgd", learning_rate=0.05)
    # torch loop, torch.func and jax vmap against the jitted jax step: the same losses.
    diffs = torch_compare.check_same_work("mlp", 4, cfg, steps=2, widths=(8,))
    assert max(diffs.values()) < 1e-5, diffs
    rates = torch_compare.bench("mlp", 2, 4, 1, 1, cfg, ("torch loop", "torch.func"), widths=(8,))
    assert min(rates.values()) > 0


def test_processes_benchmark_pins_children_and_checks_inputs(tmp_path) -> None:
    from experiments.benchmarks import processes

    with pytest.raises(ValueError, match="evenly"):
        processes.measure({}, "runs", 3, 2, 0.1)
    with pytest.raises(ValueError, match="strategy"):
        processes.seed_steps_per_s({}, "threads", 1, 0.1)
    with pytest.raises(TimeoutError, match="not all 2"):
        processes.wait_barrier(str(tmp_path), 0, 2, timeout_s=0.05)
    processes.wait_barrier(str(tmp_path), 1, 2, timeout_s=0.05)  # now both are ready: returns

    case = {"model": "mlp", "shape": [8, 8, 1], "batch": 16, "steps": 2, "kwargs": {"widths": [8]}}
    cores = len(os.sched_getaffinity(0))
    one = processes.measure(case, "vmap", 2, 1, 0.1)
    assert [(c["cpus"], c["devices"]) for c in one["children"]] == [(cores, 1)]
    split = processes.measure(case, "sharded_sequential", 2, 1, 0.1)  # one XLA device per core
    assert [(c["cpus"], c["devices"]) for c in split["children"]] == [(cores, cores)]
    with pytest.raises(ValueError, match="one process"):
        processes.measure(case, "sharded_sequential", 2, 2, 0.1)
    if cores >= 2:
        two = processes.measure(case, "runs", 2, 2, 0.1)
        assert [c["cpus"] for c in two["children"]] == [1, 1]  # each child pinned to one core
        assert two["seed_steps_per_s"] == pytest.approx(sum(c["seed_steps_per_s"] for c in two["children"]))
        assert all(c["calls"] >= 2 and c["seed_steps_per_s"] > 0 for c in two["children"])
