"""Accelerator benchmark: conv nets x seeds (vmap vs sequential), model FLOP utilisation, and
PAC-Bayes Monte Carlo certificate throughput. Runs unchanged on one GPU in under 5 minutes.

  python -m experiments.benchmarks.gpu --out=gpu.json                 # one GPU, < 5 min
  python -m experiments.benchmarks.gpu --quick --out=/tmp/gpu_q.json  # tiny sizes, CPU, < 1 min
  python -m experiments.benchmarks.gpu --peak_tflops=67 --seeds=1,8 --models=resnet20

Training: ResNet20 and VGG11-BN on synthetic CIFAR-shaped data (32x32x3, batch 128), masked Adam
(50% random mask), `steps` steps per call in one jitted `lax.scan` (`jaxprune.train.train_epoch`),
S seeds through `train.map_seeds` "vmap" (one S-seed program) and "sequential" (one single-seed
program called S times). Printed: seed-steps/s, vmap / sequential, and model FLOP utilisation
MFU = seed-steps/s x FLOPs per seed-step / peak, with FLOPs per step from XLA's cost analysis of
one compiled train step ("xla") and from the step's matmuls and convs ("model", see roofline.py).
The peak is `--peak_tflops` if given, else an n x n float32 matmul measured in this run (on GPUs it
runs at JAX's default float32 matmul precision, as the models do).

Conv implementations: one seed of ResNet20 per `conv_impl` ("xla", "canonical", "shifts"; see
jaxprune/models/layers.py), seed-steps/s and the per-step losses against "xla"'s. "canonical" is
a CPU fix, untested on accelerators until this runs; "auto" picks "xla" there.

Certificate: the Monte Carlo part of a PAC-Bayes certificate. `jaxprune.self_bounded.sampled_errors`
(M networks sampled from Q = Bern(sigma(s)) x N(mu, sigma^2), 0-1 error of each on the bound set) and
the experiment's default `per_example_errors` (a fresh network per example, R repeats: M = R n),
for LeNet-300-100 on a synthetic bound set of n 28x28x1 examples; networks evaluated per second, for
`networks_per_batch` = 0 (a loop over networks, `lax.map`) and vmapped blocks of networks.

Every configuration is guarded: an out-of-memory or other runtime error is recorded and the run goes
on; configurations left when `--budget_s` has passed are skipped (recorded as such). `--out` writes
all numbers with the device description as JSON. Not a test; --quick is smoke-tested.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmarks import roofline
from jaxprune import masks, models, train
from jaxprune import self_bounded as sb


@dataclasses.dataclass(frozen=True)
class Settings:
    models: tuple[str, ...] = ("resnet20", "vgg11_bn")
    model_kwargs: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()  # per model name
    seeds: tuple[int, ...] = (1, 8, 32)
    batch_size: int = 128
    steps: int = 5  # train steps per timed call (one scan)
    repeats: int = 2  # timed calls per configuration (best is reported)
    peak_tflops: float = 0.0  # 0: measure an n x n matmul
    matmul_n: int = 8192
    cert_n: int = 30000  # bound-set size (Fashion-MNIST with alpha = 0.5)
    cert_networks: int = 1000  # M sampled networks per timed call
    cert_networks_per_batch: tuple[int, ...] = (0, 50, 250)  # 0: loop over networks
    cert_variants: tuple[str, ...] = ("mask", "both")
    cert_eval_batch: int = 2000  # examples per forward pass
    cert_widths: tuple[int, ...] = (300, 100)  # MLP hidden widths of the certified network
    # The experiment's default scheme: a fresh network per example (self_bounded.per_example_errors),
    # R repeats over the bound set = R n samples, vmapped in chunks of these sizes.
    cert_per_example_repeats: int = 2
    cert_per_example_chunks: tuple[int, ...] = (256, 4096)
    # One seed of ResNet20 per conv_impl: is "canonical" (a CPU fix for XLA's loop-body kernel
    # gradient) worth picking on this device too? "auto" picks "xla" off CPU.
    conv_impls: tuple[str, ...] = ("xla", "canonical", "shifts")
    budget_s: float = 270.0  # skip configurations that would start after this many seconds

    @classmethod
    def quick(cls) -> Settings:
        """Tiny sizes for a CPU smoke run (< 1 min)."""
        return cls(  # ResNet20 cut to one block per stage (ResNet8) to compile faster
            model_kwargs=(
                ("resnet20", (("width", 0.25), ("stage_sizes", (1, 1, 1)))),
                ("vgg11_bn", (("width", 0.0625),)),
            ),
            seeds=(1, 2),
            batch_size=8,
            steps=1,
            repeats=1,
            matmul_n=512,
            cert_n=256,
            cert_networks=8,
            cert_networks_per_batch=(0, 4),
            cert_variants=("mask",),
            cert_eval_batch=128,
            cert_per_example_repeats=1,
            cert_per_example_chunks=(64,),
            budget_s=300.0,
        )


def _devices() -> dict[str, Any]:
    d = jax.devices()
    return {
        "platform": d[0].platform,
        "device_kind": d[0].device_kind,
        "count": len(d),
        "devices": [str(x) for x in d],
        "process_count": jax.process_count(),
        "jax": jax.__version__,
        "machine": roofline.machine(),
    }


class _Clock:
    """Wall time since start; `over()` once the budget is spent."""

    def __init__(self, budget_s: float):
        self.t0, self.budget = time.perf_counter(), budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def over(self) -> bool:
        return self.elapsed() > self.budget


def _guarded(
    record: dict[str, Any], clock: _Clock, fn: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    if clock.over():
        return {**record, "status": "skipped (budget)"}
    try:
        return {**record, **fn(), "status": "ok"}
    except Exception as e:  # noqa: BLE001 - e.g. XlaRuntimeError RESOURCE_EXHAUSTED: record, go on
        return {**record, "status": f"error: {type(e).__name__}: {str(e)[:300]}"}


def bench_train(
    name: str, s: Settings, peak: float, clock: _Clock, say: Callable[..., None]
) -> list[dict]:
    kwargs = dict(dict(s.model_kwargs).get(name, ()))
    model = models.get_model(name, num_classes=10, **kwargs)
    tx = train.make_optimizer(train.TrainConfig(optimizer="adam", learning_rate=1e-3))
    x, y = roofline.synthetic_batch(roofline.INPUT_SHAPES[name], 2 * s.batch_size)
    one = jax.tree.map(
        lambda v: v[0], roofline.masked_states(model, tx, x[:1], train.seed_keys(0, 1))
    )
    step = functools.partial(train.train_step, model=model, tx=tx)
    xb, yb = x[: s.batch_size], y[: s.batch_size]
    flops_xla = roofline.cost_flops(step, one, xb, yb)
    flops_model = roofline.jaxpr_flops(step, one, xb, yb)
    del one
    epoch = functools.partial(
        train.train_epoch, model=model, tx=tx, batch_size=s.batch_size, steps=s.steps
    )
    rows = []
    for num in s.seeds:
        states, keys = None, train.seed_keys(1, num)
        for strategy in ("vmap", "sequential"):
            rec = {
                "model": name,
                "seeds": num,
                "strategy": strategy,
                "batch": s.batch_size,
                "steps_per_call": s.steps,
                "flops_xla": flops_xla,
                "flops_model": flops_model,
            }

            def measure(strategy: str = strategy, num: int = num, keys: jax.Array = keys) -> dict:
                nonlocal states
                if states is None:
                    states = roofline.masked_states(model, tx, x[:1], train.seed_keys(0, num))
                fn = train.map_seeds(epoch, (0, None, None, 0), strategy)
                t_compile = time.perf_counter()
                jax.block_until_ready(fn(states, x, y, keys))
                t_compile = time.perf_counter() - t_compile
                best = math.inf
                for _ in range(s.repeats):
                    t0 = time.perf_counter()
                    jax.block_until_ready(fn(states, x, y, keys))
                    best = min(best, time.perf_counter() - t0)
                rate = num * s.steps / best
                return {
                    "seed_steps_per_s": rate,
                    "first_call_s": t_compile,
                    "mfu_xla": rate * flops_xla / peak,
                    "mfu_model": rate * flops_model / peak,
                }

            rec = _guarded(rec, clock, measure)
            rows.append(rec)
            if rec["status"] == "ok":
                say(
                    f"| {name} | {num} | {strategy} | {rec['seed_steps_per_s']:.1f} | "
                    f"{rec['first_call_s']:.1f} | {100 * rec['mfu_xla']:.1f} | "
                    f"{100 * rec['mfu_model']:.1f} |",
                    flush=True,
                )
            else:
                say(f"| {name} | {num} | {strategy} | {rec['status']} | | | |", flush=True)
        del states
    return rows


def bench_conv_impls(s: Settings, clock: _Clock, say: Callable[..., None]) -> list[dict]:
    """ResNet20, one seed, one jitted `train_epoch` of `steps` steps per conv_impl: seed-steps/s and
    the largest relative difference of its per-step losses to the first impl's (same params, data
    and maths, so only float rounding differs)."""
    name = "resnet20"
    kwargs = dict(dict(s.model_kwargs).get(name, ()))
    x, y = roofline.synthetic_batch(roofline.INPUT_SHAPES[name], 2 * s.batch_size)
    tx = train.make_optimizer(train.TrainConfig(optimizer="adam", learning_rate=1e-3))
    key = train.seed_keys(1, 1)[0]
    ref: list[np.ndarray] = []
    rows = []
    for impl in s.conv_impls:
        rec = {"model": name, "conv_impl": impl, "batch": s.batch_size, "steps_per_call": s.steps}

        def measure(impl: str = impl) -> dict[str, Any]:
            model = models.get_model(name, num_classes=10, **{**kwargs, "conv_impl": impl})
            state = jax.tree.map(
                lambda v: v[0], roofline.masked_states(model, tx, x[:1], train.seed_keys(0, 1))
            )
            epoch = jax.jit(functools.partial(
                train.train_epoch, model=model, tx=tx, batch_size=s.batch_size, steps=s.steps))
            t0 = time.perf_counter()
            loss = np.asarray(jax.block_until_ready(epoch(state, x, y, key))[1]["loss"])
            first = time.perf_counter() - t0
            seconds = roofline.time_best(lambda: epoch(state, x, y, key), s.repeats)
            if not ref:
                ref.append(loss)
            diff = float(np.max(np.abs(loss - ref[0]) / np.maximum(np.abs(ref[0]), 1e-12)))
            return {"seed_steps_per_s": s.steps / seconds, "first_call_s": first,
                    "loss": loss.tolist(), "max_rel_loss_diff": diff}

        rec = _guarded(rec, clock, measure)
        rows.append(rec)
        if rec["status"] == "ok":
            say(f"| {name} | {impl} | {rec['seed_steps_per_s']:.1f} | {rec['first_call_s']:.1f} | "
                f"{rec['max_rel_loss_diff']:.1e} |", flush=True)
        else:
            say(f"| {name} | {impl} | {rec['status']} | | |", flush=True)
    return rows


def bench_certificate(
    s: Settings, peak: float, clock: _Clock, say: Callable[..., None]
) -> list[dict]:
    model = models.get_model("mlp", num_classes=10, widths=s.cert_widths)  # LeNet-300-100
    x, y = roofline.synthetic_batch(roofline.INPUT_SHAPES["mlp"], s.cert_n, seed=1)
    prunable = masks.prunable_tree(jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"])

    @jax.jit  # one compile instead of an op-by-op (slow on CPU) setup
    def posterior(key: jax.Array) -> sb.Posterior:
        params = train.init_variables(key, model, x[:1])[0]
        logits = jax.tree.map(lambda w: jnp.full(w.shape, 2.0), params)  # keep-probability 0.88
        return sb.init_posterior(sb.make_prior(params, logits, prunable, 1e-3, math.log(0.01)))

    post = posterior(jax.random.key(0))
    key = jax.random.key(2)
    rows = []
    for variant in s.cert_variants:
        for npb in s.cert_networks_per_batch:
            rec = {
                "variant": variant,
                "networks_per_batch": npb,
                "networks": s.cert_networks,
                "bound_set": s.cert_n,
            }

            def measure(variant: str = variant, npb: int = npb) -> dict[str, Any]:
                fn = functools.partial(
                    sb.sampled_errors,
                    model=model,
                    prunable=prunable,
                    variant=variant,
                    num_networks=s.cert_networks,
                    batch_size=min(s.cert_eval_batch, s.cert_n),
                    networks_per_batch=npb or None,
                )
                flops = roofline.jaxpr_flops(fn, key, post, x, y)
                jitted = jax.jit(fn)
                seconds = roofline.time_best(lambda: jitted(key, post, x, y), s.repeats)
                return {
                    "networks_per_s": s.cert_networks / seconds,
                    "examples_per_s": s.cert_networks * s.cert_n / seconds,
                    "seconds": seconds,
                    "flops": flops,
                    "mfu_model": flops / seconds / peak,
                }

            rec = _guarded(rec, clock, measure)
            rows.append(rec)
            _say_cert(say, rec, variant, npb or "loop", s.cert_networks, s.cert_n)
        for chunk in s.cert_per_example_chunks:
            samples = s.cert_per_example_repeats * s.cert_n
            rec = {"variant": variant, "scheme": "per_example", "chunk": chunk,
                   "networks": samples, "bound_set": s.cert_n}

            def measure_pe(variant: str = variant, chunk: int = chunk,
                           samples: int = samples) -> dict[str, Any]:
                fn = functools.partial(sb.per_example_errors, model=model, prunable=prunable,
                                       variant=variant, repeats=s.cert_per_example_repeats,
                                       batch_size=chunk)
                flops = roofline.jaxpr_flops(fn, key, post, x, y)
                jitted = jax.jit(fn)
                seconds = roofline.time_best(lambda: jitted(key, post, x, y), s.repeats)
                return {"networks_per_s": samples / seconds, "examples_per_s": samples / seconds,
                        "seconds": seconds, "flops": flops, "mfu_model": flops / seconds / peak}

            rec = _guarded(rec, clock, measure_pe)
            rows.append(rec)
            _say_cert(say, rec, variant, f"per-example, chunk {chunk}", samples, s.cert_n)
    return rows


def _say_cert(say: Callable[..., None], rec: dict, variant: str, label: Any, m: int,
              n: int) -> None:
    if rec["status"] == "ok":
        say(f"| {variant} | {label} | {m} | {n} | {rec['networks_per_s']:.1f} | "
            f"{rec['examples_per_s'] / 1e6:.2f} | {100 * rec['mfu_model']:.1f} |", flush=True)
    else:
        say(f"| {variant} | {label} | {rec['status']} | | | | |", flush=True)


def run(s: Settings, out: str = "", verbose: bool = True) -> dict[str, Any]:
    """Runs everything in `s`, prints tables, writes JSON to `out` if given; returns the numbers."""
    say = print if verbose else (lambda *a, **k: None)
    clock = _Clock(s.budget_s)
    dev = _devices()
    say(f"# gpu benchmark: {dev['machine']}", flush=True)
    if dev["platform"] == "cpu" and s.matmul_n > 1024:
        say(
            "# note: no accelerator; the full settings take far longer than 5 min on a CPU "
            "(use --quick)",
            flush=True,
        )
    if s.peak_tflops:
        peak = {"flop_s": 1e12 * s.peak_tflops, "source": "--peak_tflops"}
    else:
        peak = {**roofline.matmul_peak(s.matmul_n, max(3, s.repeats)), "source": "measured matmul"}
    say(
        f"# peak {peak['flop_s'] / 1e12:.2f} TFLOP/s ({peak['source']}"
        + (f", {s.matmul_n}^3 float32" if "n" in peak else "")
        + ")",
        flush=True,
    )
    say(
        "\n| certificate variant | networks/batch | M | n | networks/s | M examples/s "
        "| MFU model % |"
    )
    say("|---|---|---|---|---|---|---|")
    cert = bench_certificate(s, peak["flop_s"], clock, say)
    say(f"\n| model | conv_impl | seed-steps/s (1 seed) | first call s | loss vs "
        f"{s.conv_impls[0] if s.conv_impls else '-'} (max rel. diff) |")
    say("|---|---|---|---|---|")
    convs = bench_conv_impls(s, clock, say)
    say("\n| model | S | strategy | seed-steps/s | first call s | MFU xla % | MFU model % |")
    say("|---|---|---|---|---|---|---|")
    rows: list[dict] = []
    for name in s.models:
        rows += bench_train(name, s, peak["flop_s"], clock, say)
    ok = {
        (r["model"], r["seeds"], r["strategy"]): r["seed_steps_per_s"]
        for r in rows
        if r["status"] == "ok"
    }
    say("\n| model | S | vmap / sequential |\n|---|---|---|")
    for (name, num, strategy), rate in ok.items():
        if strategy == "vmap" and (name, num, "sequential") in ok:
            say(f"| {name} | {num} | {rate / ok[(name, num, 'sequential')]:.2f} |")
    result = {
        "devices": dev,
        "settings": dataclasses.asdict(s),
        "peak": peak,
        "train": rows,
        "conv_impls": convs,
        "certificate": cert,
        "total_s": clock.elapsed(),
    }
    say(f"# total {clock.elapsed():.1f} s", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1, default=str)
        say(f"# wrote {out}")
    return result


def main(argv: Sequence[str]) -> None:
    del argv
    s = Settings.quick() if _QUICK.value else Settings()
    if _QUICK.value:  # a smoke run: compile time dominates, and its numbers mean nothing anyway
        jax.config.update("jax_disable_most_optimizations", True)
        print("# --quick: tiny sizes, XLA optimisations off (jax_disable_most_optimizations)")
    overrides: dict[str, Any] = {}
    if _MODELS.value:
        overrides["models"] = tuple(_MODELS.value)
    if _SEEDS.value:
        overrides["seeds"] = tuple(int(v) for v in _SEEDS.value)
    if _PEAK.value:
        overrides["peak_tflops"] = _PEAK.value
    if _BUDGET.value:
        overrides["budget_s"] = _BUDGET.value
    run(dataclasses.replace(s, **overrides), _OUT.value)


if __name__ == "__main__":
    from absl import app, flags

    _QUICK = flags.DEFINE_bool(
        "quick", False, "Tiny sizes, S in {1, 2}: a CPU smoke run (< 1 min)."
    )
    _OUT = flags.DEFINE_string("out", "", "Write the numbers and device description to this JSON.")
    _MODELS = flags.DEFINE_list("models", [], "Override the models (resnet20, vgg11_bn, ...).")
    _SEEDS = flags.DEFINE_list("seeds", [], "Override the numbers of seeds S.")
    _PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s for MFU (0: measured matmul).")
    _BUDGET = flags.DEFINE_float(
        "budget_s", 0.0, "Skip configurations after this many s (0: default)."
    )
    app.run(main)
