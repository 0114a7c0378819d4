"""Why vmapped conv nets do not beat sequential seeds on CPU: the per-seed matmul of a conv, batched.

  python -m experiments.benchmarks.batched_matmul
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type= python -m experiments.benchmarks.batched_matmul

Under `vmap` over S seeds, the "shifts" conv (jaxprune.models.layers.conv_shifts) becomes one batched
matmul out[s] = P[s] @ W[s], P[s] the (M, K) im2col patches of seed s and W[s] its (K, N) kernel.
This prints, for the conv shapes of our CPU models, the time of S single-seed matmuls called one after
another (each on its own seed's operands, so no seed finds the previous seed's data in cache) against
one batched matmul over the S seeds, and their ratio (> 1: batching wins). Both sides do the same
FLOPs on the same data, in this one process. Not a test: numbers depend on the machine (header).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.roofline import machine, time_best

# (label, M = batch * output pixels, K = window * input channels, N = output channels)
SHAPES = (
    ("resnet20 stage 1, 14x14x16, batch 64", 64 * 14 * 14, 9 * 16, 16),
    ("resnet20 stage 2, 7x7x32, batch 64", 64 * 7 * 7, 9 * 32, 32),
    ("resnet20 stage 3, 4x4x64, batch 64", 64 * 4 * 4, 9 * 64, 64),
    ("small_cnn conv 2, 32x32x32, batch 128", 128 * 32 * 32, 9 * 32, 32),
    ("small_cnn conv 4, 16x16x64, batch 128", 128 * 16 * 16, 9 * 64, 64),
)


def bench(m: int, k: int, n: int, num_seeds: int, repeats: int) -> tuple[float, float]:
    """(seconds for S single matmuls in a row, seconds for one S-batched matmul)."""
    kp, kw = jax.random.split(jax.random.key(0))
    p = jax.random.normal(kp, (num_seeds, m, k), jnp.float32)
    w = jax.random.normal(kw, (num_seeds, k, n), jnp.float32)
    ps, ws = list(p), list(w)  # separate buffers per seed, sliced once outside the timing
    mm = jax.jit(jnp.matmul)  # on (S, M, K) @ (S, K, N): XLA's batched dot, what vmap emits
    t_single = time_best(lambda: [mm(ps[i], ws[i]) for i in range(num_seeds)], repeats)
    t_batched = time_best(lambda: mm(p, w), repeats)
    return t_single, t_batched


def main(argv: Sequence[str]) -> None:
    del argv
    print(f"# batched matmul benchmark: {machine()}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| conv | M x K x N | S | S single (ms) | batched (ms) | single / batched |")
    print("|---|---|---|---|---|---|")
    for label, m, k, n in SHAPES:
        for s in map(int, _SEEDS.value):
            t1, tb = bench(m, k, n, s, _REPEATS.value)
            print(f"| {label} | {m} x {k} x {n} | {s} | {1e3 * t1:.2f} | {1e3 * tb:.2f} | {t1 / tb:.2f} |",
                  flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that tests can import several benchmarks.
    _SEEDS = flags.DEFINE_list("seeds", ["4", "8"], "Numbers of seeds S.")
    _REPEATS = flags.DEFINE_integer("repeats", 10, "Timed calls per configuration (best reported).")
    app.run(main)
