"""Cost of the flatness primitives on the small CNN: one HVP vs one gradient; per-example gradients.

  python -m experiments.benchmarks.flatness                      # ~1-2 min on 2 CPUs
  python -m experiments.benchmarks.flatness --batch_size=512 --num_examples=128 --repeats=10

Model: `jaxprune.models.get_model("small_cnn", num_classes=10)` (conv 32-32-pool-64-64-pool, dense
128, dense 10) on synthetic 28x28x1 inputs, mean cross-entropy over a fixed batch of `batch_size`.
Timed, each jitted and compiled before timing, median of `repeats` calls:
  grad         jax.grad of the batch loss;
  hvp          `flatness.hvp` (jvp of grad, forward-over-reverse); target: <= 3x grad;
  hvp_masked   the same with a 50% random mask (D H D v);
  hvp_lin      jax.linearize(grad) once, then only the linear map per vector (amortised HVPs);
  pe_vmap      `flatness.per_example_grads` on `num_examples` examples (one vmapped program);
  pe_loop      a Python loop of one jitted single-example gradient over the same examples.
Printed as milliseconds and ratios from one run. Not a test: numbers depend on the machine and its
load.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from absl import app, flags

from experiments.benchmarks.roofline import time_calls
from jaxprune import flatness, models

PyTree = Any


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    return 1e3 * float(np.median(time_calls(fn, repeats)))  # the first, compiling call is not timed


def run(batch_size: int = 128, num_examples: int = 64, repeats: int = 5, seed: int = 0) -> dict:
    """Times the primitives; returns {name: ms} plus the ratios."""
    init_key, x_key, y_key, v_key, m_key = jax.random.split(jax.random.key(seed), 5)
    model = models.get_model("small_cnn", num_classes=10)
    xs = jax.random.normal(x_key, (batch_size, 28, 28, 1))
    ys = jax.random.randint(y_key, (batch_size,), 0, 10)
    params = model.init(init_key, xs[:1])["params"]

    def loss_fn(p: PyTree) -> jax.Array:
        logits = model.apply({"params": p}, xs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    def loss_fn_i(p: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = model.apply({"params": p}, x[None])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y[None]).mean()

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    vector = unravel(jax.random.normal(v_key, flat.shape))
    mask = unravel(jax.random.bernoulli(m_key, 0.5, flat.shape).astype(flat.dtype))

    grad = jax.jit(jax.grad(loss_fn))
    hvp = jax.jit(lambda p, v: flatness.hvp(loss_fn, p, v))
    hvp_masked = jax.jit(lambda p, v, m: flatness.hvp(loss_fn, p, v, m))
    _, lin = jax.linearize(jax.grad(loss_fn), params)
    hvp_lin = jax.jit(lin)
    pe_vmap = jax.jit(lambda p, x, y: flatness.per_example_grads(loss_fn_i, p, x, y))
    grad_i = jax.jit(jax.grad(loss_fn_i))
    xs_n, ys_n = xs[:num_examples], ys[:num_examples]

    ms = {
        "grad": _median_ms(lambda: grad(params), repeats),
        "hvp": _median_ms(lambda: hvp(params, vector), repeats),
        "hvp_masked": _median_ms(lambda: hvp_masked(params, vector, mask), repeats),
        "hvp_lin": _median_ms(lambda: hvp_lin(vector), repeats),
        "pe_vmap": _median_ms(lambda: pe_vmap(params, xs_n, ys_n), repeats),
        "pe_loop": _median_ms(
            lambda: [grad_i(params, xs_n[i], ys_n[i]) for i in range(num_examples)], repeats
        ),
    }
    ratios = {
        "hvp / grad": ms["hvp"] / ms["grad"],
        "hvp_masked / grad": ms["hvp_masked"] / ms["grad"],
        "hvp_lin / grad": ms["hvp_lin"] / ms["grad"],
        "pe_loop / pe_vmap (vmap speed-up)": ms["pe_loop"] / ms["pe_vmap"],
        "pe_vmap examples/s": 1e3 * num_examples / ms["pe_vmap"],
        "pe_loop examples/s": 1e3 * num_examples / ms["pe_loop"],
    }
    return {"num_params": int(flat.size), "ms": ms, "ratios": ratios}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError("Too many command-line arguments.")
    f = flags.FLAGS
    print(f"{platform.processor() or platform.machine()}, jax {jax.__version__}, {jax.devices()}")
    out = run(f.batch_size, f.num_examples, f.repeats, f.seed)
    print(
        f"small_cnn, {out['num_params']:,} params, batch {f.batch_size}, "
        f"{f.num_examples} per-example grads, median of {f.repeats}"
    )
    for name, value in out["ms"].items():
        print(f"  {name:<12s} {value:10.1f} ms")
    for name, value in out["ratios"].items():
        print(f"  {name:<36s} {value:8.2f}")


if __name__ == "__main__":
    flags.DEFINE_integer("batch_size", 128, "Examples in the fixed batch of the loss (grad, HVP).")
    flags.DEFINE_integer("num_examples", 64, "Examples for the per-example-gradient timing.")
    flags.DEFINE_integer("repeats", 5, "Timed calls per primitive (median reported).")
    flags.DEFINE_integer("seed", 0, "PRNG seed.")
    app.run(main)
