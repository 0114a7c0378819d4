"""S seeds in one process (single-seed runs or vmap) vs the same S seeds split over P single-core processes.

  python -m experiments.benchmarks.processes                  # ~10 min on 2 cores
  python -m experiments.benchmarks.processes --cases=resnet20_14 --seeds=4,8 --seconds=30

This asks whether the CPU has idle capacity that running seeds in parallel could use: P processes,
each pinned to its own core (`sched_setaffinity` before JAX starts, so XLA sizes its thread pool to
one core), each training S / P seeds, share nothing but the machine. If they are no faster than one
process running the S seeds one after another on all cores, the cores are already busy; vmap,
sharding or threads can then only win by making the work itself cheaper (larger matmuls, fewer
passes over memory), not by overlapping it. A third one-process column splits the process into one
XLA host device per core and runs `train.map_seeds(..., "sharded_sequential")`: the in-process way
to overlap seeds. Every configuration runs in fresh child processes
(`--child`); the P children of one configuration wait at a file barrier after compiling, then each
times whole calls for `--seconds`, so their timed windows overlap (except the last call of one child
may run alone: short calls against `--seconds` keep that bias small). Throughput is the sum of the
children's seed-steps/s. Cases (model, input, batch, steps per call) are `allocators.CASES`.
Not a test: numbers depend on the machine (header).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from absl import app, flags

from experiments.benchmarks.allocators import CASES, child_result
from experiments.benchmarks.roofline import machine, one_seed_setup
from jaxprune import train

# S single-seed jitted calls, one jit(vmap) over the S seeds, or (one process split into one XLA
# host device per core) train.map_seeds "sharded_sequential": each device runs its seeds in turn.
STRATEGIES = ("runs", "vmap", "sharded_sequential")
BARRIER_TIMEOUT_S = 900.0


def wait_barrier(directory: str, index: int, parties: int, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Marks process `index` ready in `directory` and returns once all `parties` are."""
    Path(directory, f"ready_{index}").touch()
    deadline = time.monotonic() + timeout_s
    while sum(1 for p in Path(directory).iterdir() if p.name.startswith("ready_")) < parties:
        if time.monotonic() > deadline:
            raise TimeoutError(f"barrier in {directory}: not all {parties} processes became ready")
        time.sleep(0.01)


def seed_steps_per_s(
    case: dict[str, Any], strategy: str, num_seeds: int, seconds: float,
    barrier: tuple[str, int, int] | None = None,
) -> dict[str, float]:
    """Times `strategy` on `num_seeds` seeds of `case` in this process: seed-steps/s over >= 2 calls.

    `case`: {"model", "shape", "batch", "steps", "kwargs"}. Compiles first, then waits at `barrier`
    (directory, index, parties) if given, then calls repeatedly until `seconds` have passed.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}; expected one of {STRATEGIES}")
    model, tx, one, x, y = one_seed_setup(case["model"], case["batch"], case["shape"], **case["kwargs"])
    steps = case["steps"]
    epoch = functools.partial(train.train_epoch, model=model, tx=tx, batch_size=case["batch"], steps=steps)
    keys = train.seed_keys(1, num_seeds)
    if strategy in ("vmap", "sharded_sequential"):
        states = jax.tree.map(lambda v: jnp.stack([v] * num_seeds), one)
        mapped = train.map_seeds(epoch, (0, None, None, 0), strategy)

        def call() -> Any:
            return mapped(states, x, y, keys)
    else:
        single = jax.jit(epoch)

        def call() -> Any:
            return [single(one, x, y, keys[i]) for i in range(num_seeds)]

    jax.block_until_ready(call())  # compile outside the timed window
    if barrier is not None:
        wait_barrier(*barrier)
    calls, start = 0, time.perf_counter()
    while calls < 2 or time.perf_counter() - start < seconds:
        jax.block_until_ready(call())
        calls += 1
    elapsed = time.perf_counter() - start
    return {"seed_steps_per_s": calls * num_seeds * steps / elapsed, "calls": calls, "seconds": elapsed,
            "cpus": len(os.sched_getaffinity(0)), "devices": jax.device_count()}


def measure(
    case: dict[str, Any], strategy: str, num_seeds: int, procs: int, seconds: float
) -> dict[str, Any]:
    """Total seed-steps/s of `num_seeds` seeds split evenly over `procs` children.

    procs = 1: one child on every core of this process (for "sharded_sequential" split into one
    XLA host device per core); procs > 1: child i pinned to core i.
    """
    if procs < 1 or num_seeds % procs:
        raise ValueError(f"{num_seeds} seeds cannot be split evenly over {procs} processes")
    cores = sorted(os.sched_getaffinity(0))
    if procs > len(cores):
        raise ValueError(f"{procs} processes but only {len(cores)} cores available")
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ)
    if strategy == "sharded_sequential":
        if procs > 1:
            raise ValueError("sharded_sequential is timed in one process (procs = 1)")
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                            f" --xla_force_host_platform_device_count={len(cores)}").strip()
    with tempfile.TemporaryDirectory() as barrier_dir:
        children = []
        for i in range(procs):
            core = cores[i] if procs > 1 else -1
            cmd = [sys.executable, "-m", "experiments.benchmarks.processes", "--child",
                   f"--child_case={json.dumps(case)}", f"--child_strategy={strategy}",
                   f"--child_seeds={num_seeds // procs}", f"--seconds={seconds}",
                   f"--child_barrier={barrier_dir},{i},{procs}", f"--child_core={core}"]
            children.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True, cwd=root, env=env))
        results = []
        for proc in children:
            out, err = proc.communicate()
            try:
                results.append(child_result(proc.returncode, out, err, f"{strategy} child"))
            except RuntimeError:
                for other in children:
                    other.kill()
                raise
    return {"seed_steps_per_s": sum(r["seed_steps_per_s"] for r in results), "children": results}


def case_dict(name: str) -> dict[str, Any]:
    model, shape, batch, steps, kwargs = CASES[name]
    return {"model": model, "shape": list(shape), "batch": batch, "steps": steps, "kwargs": kwargs}


def main(argv: Sequence[str]) -> None:
    del argv
    if _CHILD.value:
        if _CHILD_CORE.value >= 0:  # before JAX starts its CPU client, which sizes its thread pool
            os.sched_setaffinity(0, {_CHILD_CORE.value})
        case = json.loads(_CHILD_CASE.value)
        case["kwargs"] = {k: tuple(v) if isinstance(v, list) else v for k, v in case["kwargs"].items()}
        directory, index, parties = _CHILD_BARRIER.value.split(",")
        r = seed_steps_per_s(case, _CHILD_STRATEGY.value, _CHILD_SEEDS.value, _SECONDS.value,
                             (directory, int(index), int(parties)))
        print(json.dumps(r), flush=True)
        return
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {list(CASES)}")
    procs = _PROCS.value or len(os.sched_getaffinity(0))
    print(f"# processes benchmark: {machine()}; {procs} single-core processes vs one process; "
          f"each configuration timed for {_SECONDS.value:.0f} s in fresh processes")
    print(f"| case | S | 1 process: runs (seed-steps/s) | 1 process: vmap | 1 process, {procs} "
          f"devices: sharded_sequential | {procs} x 1 core: runs | {procs} x 1 core: vmap | "
          f"vmap / runs | sharded_sequential / runs | best of {procs} procs / runs |")
    print("|---" * 10 + "|")
    configs = [(1, st) for st in STRATEGIES] + [(procs, st) for st in ("runs", "vmap")]
    for name in _CASES.value:
        for s in map(int, _SEEDS.value):
            r = {(p, st): measure(case_dict(name), st, s, p, _SECONDS.value)["seed_steps_per_s"]
                 for p, st in configs}
            base = r[(1, "runs")]
            best_procs = max(r[(procs, "runs")], r[(procs, "vmap")])
            print(f"| {name} | {s} | {base:.2f} | {r[(1, 'vmap')]:.2f} | "
                  f"{r[(1, 'sharded_sequential')]:.2f} | {r[(procs, 'runs')]:.2f} | "
                  f"{r[(procs, 'vmap')]:.2f} | {r[(1, 'vmap')] / base:.2f} | "
                  f"{r[(1, 'sharded_sequential')] / base:.2f} | {best_procs / base:.2f} |", flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that tests can import several benchmarks.
    _CASES = flags.DEFINE_list("cases", ["small_cnn_14", "resnet20_14", "small_cnn_32"],
                               f"Cases, from {list(CASES)}.")
    _SEEDS = flags.DEFINE_list("seeds", ["4"], "Numbers of seeds S (multiples of --procs).")
    _PROCS = flags.DEFINE_integer("procs", 0, "Single-core processes (0: one per available core).")
    _SECONDS = flags.DEFINE_float("seconds", 20.0, "Timed seconds per configuration and process.")
    _CHILD = flags.DEFINE_bool("child", False, "Internal: time one configuration here, print JSON.")
    _CHILD_CASE = flags.DEFINE_string("child_case", "", "Internal: the case as JSON.")
    _CHILD_STRATEGY = flags.DEFINE_string("child_strategy", "runs", "Internal: runs or vmap.")
    _CHILD_SEEDS = flags.DEFINE_integer("child_seeds", 1, "Internal: seeds in this child.")
    _CHILD_BARRIER = flags.DEFINE_string("child_barrier", "", "Internal: directory,index,parties.")
    _CHILD_CORE = flags.DEFINE_integer("child_core", -1, "Internal: pin to this core (-1: do not).")
    app.run(main)
