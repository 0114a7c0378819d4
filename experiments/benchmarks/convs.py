"""Conv implementations x seed strategies on CIFAR-shaped batches; VGG11-BN fast layers vs plain flax.

  python -m experiments.benchmarks.convs                                   # ~10 min on 2 busy cores
  python -m experiments.benchmarks.convs --models=small_cnn --seeds=4 --impls=xla,shifts --vgg=false
  python -m experiments.benchmarks.convs --steps=2 --skip=xla:vmap   # the issue-8 table in README

For each model, conv_impl and S: seed-steps/s of `map_seeds(train_epoch, ..., "vmap")` and of
"sequential" (one compiled single-seed program called S times), masked Adam steps (50% random mask) on
synthetic 32x32x3 batches. Every ratio is measured side by side in this one process; each
configuration is timed `repeats` times (best reported, spread printed, since the machine is shared).
The VGG11-BN rows time one jitted train step (no scan) of conv_impl="xla", pool_impl="xla" (exactly
nn.Conv + nn.max_pool) against the reshape-max pool with "xla" / "patches" convs and the defaults
("auto": on CPU "canonical" or "shifts" per layer; VGG11's layers all get "shifts").
Not a test: numbers depend on the machine (printed in the header).
"""

from __future__ import annotations

import functools
import time

import jax
import numpy as np
from absl import app, flags

from experiments.benchmarks.roofline import machine, seeds_setup, time_calls
from jaxprune import train


def setup(name: str, num_seeds: int, batch: int, shape: tuple[int, ...] = (32, 32, 3),
          **model_kwargs):
    """(model, tx, states, x, y, keys): masked S-seed training on 2 batches of synthetic `shape` inputs."""
    model, tx, states, x, y = seeds_setup(name, num_seeds, shape, 2 * batch, **model_kwargs)
    return model, tx, states, x, y, train.seed_keys(1, num_seeds)


def spread(ts: list[float]) -> str:
    return f"{100 * (max(ts) - min(ts)) / min(ts):.0f}%"


def bench_seeds(name: str, impl: str, s: int, steps: int, repeats: int, batch: int,
                skip: tuple[str, ...] = (), shape: tuple[int, ...] = (32, 32, 3),
                **model_kwargs) -> dict:
    """{strategy: (seed-steps/s, spread)} for the strategies not in skip (as "impl:strategy")."""
    model, tx, states, x, y, keys = setup(name, s, batch, shape, conv_impl=impl, **model_kwargs)
    epoch = functools.partial(train.train_epoch, model=model, tx=tx, batch_size=batch, steps=steps)
    fns = {k: train.map_seeds(epoch, (0, None, None, 0), k) for k in ("vmap", "sequential")
           if f"{impl}:{k}" not in skip}
    for f in fns.values():  # compile both before timing either
        jax.block_until_ready(f(states, x, y, keys))
    # Interleave the strategies so load changes hit both alike.
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(f(states, x, y, keys))
            ts[k].append(time.perf_counter() - t0)
    return {k: (s * steps / min(v), spread(v)) for k, v in ts.items()}


def bench_vgg(repeats: int, batch: int) -> dict:
    out = {}
    variants = {"plain flax (xla conv + nn.max_pool)": dict(conv_impl="xla", pool_impl="xla"),
                "xla conv + reshape pool": dict(conv_impl="xla"),
                "patches + reshape pool": dict(conv_impl="patches"),
                "default (auto + reshape pool)": {}}
    for label, kw in variants.items():
        model, tx, states, x, y, keys = setup("vgg11_bn", 1, batch, **kw)
        # One jitted step, no scan: plain flax convs inside a scan hit the XLA CPU trap (README),
        # which would flatter the fast layers.
        step = jax.jit(functools.partial(train.train_step, model=model, tx=tx))
        one = jax.tree.map(lambda v: v[0], states)
        out[label] = time_calls(lambda: step(one, x[:batch], y[:batch]), repeats)
    return out


def main(argv):
    del argv
    shape = tuple(map(int, _SHAPE.value))
    print(f"# conv benchmark: {machine()}, batch {_BATCH.value}, input {shape}, steps/call "
          f"{_STEPS.value}, small_cnn channels {_CHANNELS.value or 'default'}", flush=True)
    print("| model | conv_impl | S | sequential (seed-steps/s) | vmap | vmap / sequential | spread seq, vmap |")
    print("|---|---|---|---|---|---|---|")
    best_seq: dict[tuple[str, int], float] = {}
    best_vmap: dict[tuple[str, int], float] = {}
    for name in _MODELS.value:
        for s in map(int, _SEEDS.value):
            for impl in _IMPLS.value:
                kw = ({"channels": tuple(map(int, _CHANNELS.value)), "dense": 64, "batch_norm": True}
                      if name == "small_cnn" and _CHANNELS.value else {})
                r = bench_seeds(name, impl, s, _STEPS.value, _REPEATS.value, _BATCH.value,
                                tuple(_SKIP.value), shape, **kw)
                (seq, ds), (vm, dv) = (r.get(k, (float("nan"), "-")) for k in ("sequential", "vmap"))
                print(f"| {name} | {impl} | {s} | {seq:.2f} | {vm:.2f} | {vm / seq:.2f} | {ds}, {dv} |",
                      flush=True)
                # fmax ignores NaN (a skipped strategy) unless both sides are NaN.
                best_seq[(name, s)] = np.fmax(best_seq.get((name, s), np.nan), seq)
                best_vmap[(name, s)] = np.fmax(best_vmap.get((name, s), np.nan), vm)
    if best_seq:
        print("\n| model | S | best vmap / best sequential (over conv_impl) |\n|---|---|---|")
        for (name, s), seq in best_seq.items():  # NaN where a strategy was skipped for every impl
            print(f"| {name} | {s} | {best_vmap[(name, s)] / seq:.2f} |", flush=True)
    if _VGG.value:
        r = bench_vgg(_REPEATS.value, _BATCH.value)
        base = min(next(iter(r.values())))
        print("\n| VGG11-BN, 1 seed | ms/step (best) | spread | speedup vs plain flax |\n|---|---|---|---|")
        for label, ts in r.items():
            print(f"| {label} | {1e3 * min(ts):.0f} | {spread(ts)} | {base / min(ts):.2f} |", flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that other benchmarks can import this module.
    _MODELS = flags.DEFINE_list("models", ["small_cnn", "resnet20"], "Conv models (jaxprune.models).")
    _IMPLS = flags.DEFINE_list("impls", ["xla", "shifts"], "conv_impl values to compare.")
    _SEEDS = flags.DEFINE_list("seeds", ["4", "8"], "Numbers of seeds S.")
    _STEPS = flags.DEFINE_integer("steps", 1, "Steps per call (one jitted lax.scan).")
    _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per configuration.")
    _BATCH = flags.DEFINE_integer("batch_size", 128, "Batch size.")
    _SHAPE = flags.DEFINE_list("image_shape", ["32", "32", "3"], "Input H,W,C (32,32,3: CIFAR; 14,14,1: "
                               "the stability CPU default).")
    _CHANNELS = flags.DEFINE_list("channels", [], "small_cnn conv widths (default: the model's); e.g. "
                                  "8,8,16,16,32,32 for the stability CPU default.")
    _VGG = flags.DEFINE_bool("vgg", True, "Also time one VGG11-BN step: plain flax layers vs fast.")
    _SKIP = flags.DEFINE_list("skip", [], "impl:strategy pairs not to time, e.g. xla:vmap (grouped convs "
                              "inside a scan take minutes per call on XLA CPU).")
    app.run(main)
