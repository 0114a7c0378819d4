"""Achieved FLOP/s of masked train steps against a large matmul measured in the same run.

  python -m experiments.benchmarks.roofline    # MLP + small CNN, ~20 min on 2 busy CPUs (scan trap)
  python -m experiments.benchmarks.roofline --models=mlp --matmul_n=4096 --steps=50
  python -m experiments.benchmarks.roofline --models=small_cnn --conv_impl=shifts
  python -m experiments.benchmarks.roofline --models=small_cnn --profile   # + op-kind breakdown

For each model: one masked Adam step (`jaxprune.train.train_step`, 50% random mask, cross-entropy)
on a synthetic batch (MLP: 28x28x1, LeNet-300-100; small CNN: 32x32x3), timed as `steps` jitted
calls in a Python loop ("step") and as one jitted `lax.scan` over `steps` steps ("scan", no
per-step dispatch). FLOPs per step are counted two ways and both printed:
  xla    `jax.jit(step).lower(...).compile().cost_analysis()["flops"]`: XLA's count of the whole
         compiled step (matmuls, convs and elementwise work: masks, Adam, softmax);
  jaxpr  2 x multiply-adds of every dot_general and conv_general_dilated in the step's jaxpr
         (forward and backward; taps on the zeros of a strided conv's dilated input gradient not
         counted): the analytic "model FLOPs", no elementwise work.
The ceiling is an n x n x n float32 matmul (2 n^3 FLOPs) timed in the same process; the printed
"fraction" is achieved FLOP/s over that matmul's. Not a test: numbers depend on the machine and its
load (printed in the header). On XLA CPU a conv net's step inside `lax.scan` can be far slower than
the same step jitted alone (measured: small CNN 15-25x with conv_impl "xla", none with "shifts");
the "scan" row shows it. `--profile` adds, per model, where the jitted step's time goes: the XLA
ops' thread-time per step grouped by op kind (`op_breakdown`, from a `jax.profiler` trace). The
helpers here (`machine`, `time_calls`, `cost_flops`, `jaxpr_flops`, `op_breakdown`, `matmul_peak`,
`masked_states`, `synthetic_batch`, `one_seed_setup`) are shared by the other speed benchmarks.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import re
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks, models, pruners, train

PyTree = Any

# Input shape (H, W, C) each benchmarked model is built for.
INPUT_SHAPES: dict[str, tuple[int, ...]] = {
    "mlp": (28, 28, 1),  # LeNet-300-100 (the default MLP widths): 266,610 params
    "lenet300_100": (28, 28, 1),
    "small_cnn": (32, 32, 3),  # 591,274 params
    "resnet20": (32, 32, 3),
    "vgg11_bn": (32, 32, 3),
}


def machine() -> str:
    """One line: jax version, backend, devices, CPU model, cores and the 1-minute load average."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    kinds = sorted({d.device_kind for d in jax.devices()})
    return (
        f"jax {jax.__version__}, {jax.default_backend()}, "
        f"{jax.device_count()} x {'/'.join(kinds)}, "
        f"host CPU {cpu}, {os.cpu_count()} cores, load {load:.1f}"
    )


def cost_flops(fn: Callable[..., Any], *args: Any) -> float:
    """XLA's FLOP count of the compiled `jit(fn)(*args)` (a loop body counts once, not per trip)."""
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def _sub_jaxprs(params: dict[str, Any]) -> list[Any]:
    out = []
    for v in params.values():
        for item in v if isinstance(v, (tuple, list)) else (v,):
            if hasattr(item, "eqns"):
                out.append(item)
            elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                out.append(item.jaxpr)
    return out


def _count(jaxpr: Any) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            k = math.prod(lhs[i] for i in lhs_contract)
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * k
        elif name == "conv_general_dilated":
            # out[n, o, *p] = sum over I (per feature group) x window: rhs_spec = (O, I, *spatial).
            rhs = eqn.invars[1].aval.shape
            spec = eqn.params["dimension_numbers"].rhs_spec
            per_out = rhs[spec[1]] * math.prod(rhs[d] for d in spec[2:])
            # A strided conv's input gradient is a conv over the input dilated with zeros: only
            # about 1 / prod(lhs_dilation) of its window taps hit data.
            per_out /= math.prod(eqn.params.get("lhs_dilation") or (1,))
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * per_out
        else:
            subs = [_count(j) for j in _sub_jaxprs(eqn.params)]
            if not subs:
                continue
            if name == "cond":  # one branch runs
                total += max(subs)
            else:
                total += sum(subs) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


def jaxpr_flops(fn: Callable[..., Any], *args: Any) -> float:
    """2 x multiply-adds of all matmuls and convolutions in `fn`'s jaxpr (scans x their length)."""
    return _count(jax.make_jaxpr(fn)(*args).jaxpr)


def time_calls(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall times (s) of `repeats` calls of `fn`, after one call that compiles and warms up."""
    jax.block_until_ready(fn())
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        out.append(time.perf_counter() - t0)
    return out


def time_best(fn: Callable[[], Any], repeats: int) -> float:
    """Best wall time (s) of `repeats` calls of `fn` (`time_calls`)."""
    return min(time_calls(fn, repeats))


_NOT_OPS = ("$", "end: ", "ThunkExecutor", "ThreadpoolListener")


def op_breakdown(fn: Callable[[], Any], calls: int = 2) -> dict[str, float]:
    """{XLA op kind: thread-seconds per call} of `calls` profiled calls of `fn`, largest first.

    Op kind is the HLO instruction name without its numeric suffix ("concatenate.1" ->
    "concatenate"); times are summed over all threads, so on several cores they add up to more
    than the wall time. Works on CPU and GPU (device lines) alike, from one `jax.profiler` trace.
    """
    from jax.profiler import ProfileData

    jax.block_until_ready(fn())  # compile outside the trace
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir)
        for _ in range(calls):
            jax.block_until_ready(fn())
        jax.profiler.stop_trace()
        paths = sorted(Path(logdir).rglob("*.xplane.pb"))
        if not paths:
            raise RuntimeError(f"jax.profiler wrote no trace under {logdir}")
        data = ProfileData.from_file(str(paths[-1]))
        total: Counter[str] = Counter()
        for plane in data.planes:
            for line in plane.lines:
                if "python" in line.name:  # host-side Python frames, not XLA ops
                    continue
                for ev in line.events:
                    # Python frames ("$file:line fn"), the executor's own spans and thread-pool
                    # markers are not ops.
                    if ev.name.startswith(_NOT_OPS):
                        continue
                    total[re.sub(r"(\.\d+)+$", "", ev.name)] += ev.duration_ns
    return {k: v / 1e9 / calls for k, v in total.most_common()}


def matmul_peak(n: int, repeats: int = 5, dtype: Any = jnp.float32) -> dict[str, float]:
    """Measured FLOP/s of one n x n @ n x n matmul (2 n^3 FLOPs): the ceiling for this run."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), dtype)
    b = jax.random.normal(kb, (n, n), dtype)
    mm = jax.jit(jnp.matmul)
    seconds = time_best(lambda: mm(a, b), repeats)
    flops = 2.0 * n**3
    return {
        "n": n,
        "flops": flops,
        "xla_flops": cost_flops(jnp.matmul, a, b),
        "seconds": seconds,
        "flop_s": flops / seconds,
    }


@functools.lru_cache(maxsize=16)
def _masked_init(model: Any, tx: Any, sparsity: float) -> Callable[..., train.TrainState]:
    # Cached so that every S (and every benchmark of one model) reuses one compiled init.
    def init(key: jax.Array, sample_x: jax.Array) -> train.TrainState:
        init_key, mask_key = jax.random.split(key)
        s = train.init_state(init_key, model, sample_x, tx)
        m = pruners.random_uniform(mask_key, s.params, sparsity, masks.prunable_tree(s.params))
        return train.state_from_params(init_key, s.params, s.batch_stats, tx, m)

    return jax.jit(init)


def masked_states(
    model: Any, tx: Any, sample_x: jax.Array, keys: jax.Array, sparsity: float = 0.5
) -> train.TrainState:
    """S-stacked TrainStates (one per key) with a random `sparsity` mask on the prunable kernels."""
    init = _masked_init(model, tx, float(sparsity))
    return jax.tree.map(lambda *v: jnp.stack(v), *[init(k, sample_x) for k in keys])


def synthetic_batch(shape: Sequence[int], n: int, seed: int = 0) -> tuple[jax.Array, jax.Array]:
    """(x, y): n standard-normal inputs of `shape` and uniform labels in 0..9."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, *shape)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 10, size=(n,)).astype(np.int32))
    return x, y


def seeds_setup(
    name: str, num_seeds: int, shape: Sequence[int], examples: int, **model_kwargs: Any
) -> tuple[Any, Any, train.TrainState, jax.Array, jax.Array]:
    """(model, Adam tx, S-stacked masked TrainStates, x, y): `examples` synthetic inputs of `shape`."""
    model = models.get_model(name, num_classes=10, **model_kwargs)
    tx = train.make_optimizer(train.TrainConfig(optimizer="adam", learning_rate=1e-3))
    x, y = synthetic_batch(shape, examples)
    return model, tx, masked_states(model, tx, x[:1], train.seed_keys(0, num_seeds)), x, y


def one_seed_setup(
    name: str, batch: int, shape: Sequence[int], **model_kwargs: Any
) -> tuple[Any, Any, train.TrainState, jax.Array, jax.Array]:
    """(model, Adam tx, one masked TrainState, x, y): a synthetic batch of `batch` inputs of `shape`."""
    model, tx, states, x, y = seeds_setup(name, 1, shape, batch, **model_kwargs)
    return model, tx, jax.tree.map(lambda v: v[0], states), x, y


def bench_model(
    name: str, batch: int, steps: int, repeats: int, profile: bool = False, **model_kwargs: Any
) -> dict[str, Any]:
    """FLOPs per step (xla, jaxpr), seconds per step (Python loop of jitted steps; one scan) and,
    with `profile`, the jitted step's `op_breakdown` under "ops"."""
    model, tx, state, x, y = one_seed_setup(name, batch, INPUT_SHAPES[name], **model_kwargs)
    step = functools.partial(train.train_step, model=model, tx=tx)
    out: dict[str, Any] = {
        "model": name,
        "batch": batch,
        "steps": steps,
        "xla_flops": cost_flops(step, state, x, y),
        "jaxpr_flops": jaxpr_flops(step, state, x, y),
    }
    jstep = jax.jit(step)

    def loop() -> Any:
        s = state
        for _ in range(steps):
            s, m = jstep(s, x, y)
        return m

    epoch = jax.jit(
        functools.partial(train.train_epoch, model=model, tx=tx, batch_size=batch, steps=steps)
    )
    key = jax.random.key(1)
    out["step_s"] = time_best(loop, repeats) / steps
    out["scan_s"] = time_best(lambda: epoch(state, x, y, key), repeats) / steps
    if profile:
        out["ops"] = op_breakdown(lambda: jstep(state, x, y))
    return out


def run(
    model_names: Sequence[str] = ("mlp", "small_cnn"),
    batch: int = 128,
    steps: int = 0,
    matmul_n: int = 2048,
    repeats: int = 3,
    model_kwargs: dict[str, dict] | None = None,
    verbose: bool = True,
    profile: bool = False,
    top_ops: int = 8,
) -> dict[str, Any]:
    """Runs and prints the roofline table; returns {"machine", "matmul", "models": [...]}.

    `steps` 0 means 50 for MLPs and 3 for conv nets."""
    model_kwargs = model_kwargs or {}
    say = print if verbose else (lambda *a, **k: None)
    say(f"# roofline benchmark: {machine()}, batch {batch}", flush=True)
    peak = matmul_peak(matmul_n, repeats)
    rows = []
    say(
        "| what | FLOPs/step xla (M) | FLOPs/step jaxpr (M) | xla/jaxpr | ms/step | GFLOP/s (xla) "
        "| GFLOP/s (jaxpr) | fraction of matmul (xla, jaxpr) |"
    )
    say("|---|---|---|---|---|---|---|---|")
    say(
        f"| matmul {matmul_n}^3 f32 | {peak['xla_flops'] / 1e6:.0f} | {peak['flops'] / 1e6:.0f} | "
        f"{peak['xla_flops'] / peak['flops']:.2f} | {1e3 * peak['seconds']:.2f} | "
        f"{peak['flop_s'] / 1e9:.1f} | {peak['flop_s'] / 1e9:.1f} | 1.00 |",
        flush=True,
    )
    for name in model_names:
        n_steps = steps or (50 if name in ("mlp", "lenet300_100") else 3)
        r = bench_model(name, batch, n_steps, repeats, profile, **model_kwargs.get(name, {}))
        for how in ("step", "scan"):
            sec = r[f"{how}_s"]
            fx, fj = r["xla_flops"] / sec, r["jaxpr_flops"] / sec
            r[f"{how}_flop_s_xla"], r[f"{how}_flop_s_jaxpr"] = fx, fj
            r[f"{how}_fraction_xla"], r[f"{how}_fraction_jaxpr"] = (
                fx / peak["flop_s"],
                fj / peak["flop_s"],
            )
            say(
                f"| {name} train step ({how}, {n_steps} steps) | {r['xla_flops'] / 1e6:.1f} | "
                f"{r['jaxpr_flops'] / 1e6:.1f} | {r['xla_flops'] / r['jaxpr_flops']:.2f} | "
                f"{1e3 * sec:.2f} | {fx / 1e9:.1f} | {fj / 1e9:.1f} | "
                f"{fx / peak['flop_s']:.3f}, {fj / peak['flop_s']:.3f} |",
                flush=True,
            )
        rows.append(r)
    for r in rows if profile else ():
        total = sum(r["ops"].values())
        say(f"\n{r['model']}, one jitted step: XLA op thread-time by kind (total {1e3 * total:.0f} ms, "
            f"wall {1e3 * r['step_s']:.0f} ms)\n| op kind | ms | share |\n|---|---|---|")
        for op, sec in list(r["ops"].items())[:top_ops]:
            say(f"| {op} | {1e3 * sec:.1f} | {sec / total:.2f} |")
    return {"machine": machine(), "matmul": peak, "models": rows}


def main(argv: Sequence[str]) -> None:
    del argv
    kwargs = {n: {"conv_impl": _CONV_IMPL.value} for n in _MODELS.value if n != "mlp"}
    run(_MODELS.value, _BATCH.value, _STEPS.value, _MATMUL_N.value, _REPEATS.value,
        kwargs if _CONV_IMPL.value else None, profile=_PROFILE.value)


if __name__ == "__main__":
    from absl import app, flags

    _MODELS = flags.DEFINE_list("models", ["mlp", "small_cnn"], "Model names (jaxprune.models).")
    _BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
    _CONV_IMPL = flags.DEFINE_string("conv_impl", "", "conv_impl of the conv nets ('': default).")
    _STEPS = flags.DEFINE_integer(
        "steps", 0, "Steps per timed call (0: 50 for MLPs, 3 for conv nets)."
    )
    _MATMUL_N = flags.DEFINE_integer(
        "matmul_n", 2048, "Size n of the n x n x n float32 matmul ceiling."
    )
    _REPEATS = flags.DEFINE_integer(
        "repeats", 3, "Timed calls per configuration (best is reported)."
    )
    _PROFILE = flags.DEFINE_bool(
        "profile", False, "Also print where each model's jitted step spends its time (op kinds)."
    )
    app.run(main)
