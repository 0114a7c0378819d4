"""Seed-steps per second: S seeds vmapped, S seeds as one sequential program, S single-seed runs.

  python -m experiments.benchmarks.seeds                        # MLP and small CNN, S in 1,2,4,8,16
  python -m experiments.benchmarks.seeds --models=mlp --seeds=1,8,32 --steps=50

Every configuration trains masked models (50% random mask) on synthetic 28x28x1 batches of 128 with Adam,
one jitted `lax.scan` over `steps` steps per call (`jaxprune.train.train_epoch`). Strategies:
  vmap        jit(vmap(epoch)) over the S seeds: one program;
  sequential  the `map_seeds(..., "sequential")` path: one compiled single-seed program called S times;
  runs        S independent single-seed runs one after another (the usual loop over seeds): the reference.
The printed ratio is seed-steps/s of a strategy over that of `runs`, all measured in this one process.
Not a test: numbers depend on the machine (printed in the header).
"""

from __future__ import annotations

import functools
import platform

import jax
from absl import app, flags

from experiments.benchmarks.roofline import seeds_setup, time_best
from jaxprune import train


def bench(name: str, num_seeds: int, steps: int, repeats: int, batch: int) -> dict[str, float]:
    model, tx, states, x, y = seeds_setup(name, num_seeds, (28, 28, 1), 4 * batch)
    epoch = functools.partial(train.train_epoch, model=model, tx=tx, batch_size=batch, steps=steps)
    keys = train.seed_keys(1, num_seeds)
    out = {}
    for strategy in ("vmap", "sequential"):
        fn = train.map_seeds(epoch, (0, None, None, 0), strategy)
        out[strategy] = num_seeds * steps / time_best(lambda: fn(states, x, y, keys), repeats)
    single = jax.jit(epoch)
    one = [jax.tree.map(lambda v: v[i], states) for i in range(num_seeds)]

    def runs():
        return [single(one[i], x, y, keys[i]) for i in range(num_seeds)]

    out["runs"] = num_seeds * steps / time_best(runs, repeats)
    return out


def main(argv):
    del argv
    print(f"# jaxprune seeds benchmark: jax {jax.__version__}, backend {jax.default_backend()}, "
          f"devices {jax.devices()}, {platform.processor() or platform.machine()}, batch {_BATCH.value}")
    print("| model | S | steps/call | runs (seed-steps/s) | sequential | vmap | sequential / runs | vmap / runs |")
    print("|---|---|---|---|---|---|---|---|")
    for name in _MODELS.value:
        steps = _STEPS.value or (50 if name in ("mlp", "lenet300_100") else 3)
        for s in map(int, _SEEDS.value):
            r = bench(name, s, steps, _REPEATS.value, _BATCH.value)
            print(f"| {name} | {s} | {steps} | {r['runs']:.1f} | {r['sequential']:.1f} | {r['vmap']:.1f} | "
                  f"{r['sequential'] / r['runs']:.2f} | {r['vmap'] / r['runs']:.2f} |", flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that other benchmarks can import this module.
    _MODELS = flags.DEFINE_list("models", ["mlp", "small_cnn"], "Model names (jaxprune.models).")
    _SEEDS = flags.DEFINE_list("seeds", ["1", "2", "4", "8", "16"], "Numbers of seeds S.")
    _STEPS = flags.DEFINE_integer("steps", 0, "Steps per call (0: 50 for MLPs, 3 for conv nets).")
    _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per configuration (best is reported).")
    _BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
    app.run(main)
