"""Host memory allocator vs CPU train-step time: glibc malloc, glibc with tunables, jemalloc, tcmalloc.

  python -m experiments.benchmarks.allocators                   # ~6 min on 2 cores
  python -m experiments.benchmarks.allocators --cases=resnet20_32 --repeats=5

XLA CPU allocates every large intermediate (a conv's im2col patches: 151 MB for a 32x32x32 map at
batch 128) with the process's malloc. glibc hands such freed blocks back to the kernel (mmap'd
blocks are unmapped, per-thread arenas trimmed), so every call page-faults all of it back in
(measured: ~68 000 minor faults and as much kernel as user time per call of one such conv).
Allocators that keep freed memory avoid that. The
allocator is fixed when a process starts, so each variant runs the same cases in a child process
(`--child`) with its environment (GLIBC_TUNABLES or LD_PRELOAD); the parent prints ms per step,
kernel (sys) seconds per step and the ratio to glibc's defaults, all from this one run. Variants whose
library is not installed are skipped (Debian: `apt-get install libjemalloc2 libtcmalloc-minimal4`).
Not a test: numbers depend on the machine (header).
"""

from __future__ import annotations

import functools
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
from absl import app, flags

from experiments.benchmarks.roofline import machine, one_seed_setup, time_calls
from jaxprune import train

# name -> (model, input shape, batch, steps per call, model kwargs)
CASES = {
    "mlp": ("mlp", (28, 28, 1), 128, 50, {}),
    "small_cnn_14": ("small_cnn", (14, 14, 1), 64, 8,
                     {"channels": (8, 8, 16, 16, 32, 32), "dense": 64, "batch_norm": True}),
    "resnet20_14": ("resnet20", (14, 14, 1), 64, 4, {}),
    "small_cnn_32": ("small_cnn", (32, 32, 3), 128, 2, {}),
    "resnet20_32": ("resnet20", (32, 32, 3), 128, 1, {}),
}
GLIBC_TUNED = ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
               "glibc.malloc.trim_threshold=100000000000")
LIBRARIES = {"jemalloc": "libjemalloc.so.2", "tcmalloc": "libtcmalloc_minimal.so.4"}
ALLOCATOR_ENV = ("GLIBC_TUNABLES", "LD_PRELOAD")


def find_library(soname: str) -> str | None:
    """Path of a shared library by soname (ldconfig's cache, then the usual directories)."""
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.strip().startswith(soname + " ") and "=>" in line:
                return line.split("=>")[1].strip()
    except OSError:
        pass
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"):
        if (Path(d) / soname).exists():
            return str(Path(d) / soname)
    return None


def variants() -> dict[str, dict[str, str]]:
    """{variant: extra environment}; glibc ones always, preloaded libraries where installed."""
    out = {"glibc default": {}, "glibc tunables": {"GLIBC_TUNABLES": GLIBC_TUNED}}
    for name, soname in LIBRARIES.items():
        path = find_library(soname)
        if path:
            out[name] = {"LD_PRELOAD": path}
    return out


def time_cases(names: Sequence[str], repeats: int) -> dict[str, dict[str, float]]:
    """{case: {"ms_per_step", "sys_s_per_step"}} for one jitted `train_epoch` call per case."""
    out = {}
    for name in names:
        model_name, shape, batch, steps, kw = CASES[name]
        model, tx, one, x, y = one_seed_setup(model_name, batch, shape, **kw)
        epoch = jax.jit(functools.partial(train.train_epoch, model=model, tx=tx, batch_size=batch,
                                          steps=steps))
        key = jax.random.key(1)
        jax.block_until_ready(epoch(one, x, y, key))  # compile outside the sys-time window
        before = resource.getrusage(resource.RUSAGE_SELF).ru_stime
        ts = time_calls(lambda: epoch(one, x, y, key), repeats)
        sys_s = resource.getrusage(resource.RUSAGE_SELF).ru_stime - before
        out[name] = {"ms_per_step": 1e3 * min(ts) / steps,
                     "sys_s_per_step": sys_s / ((repeats + 1) * steps)}
    return out


def run_variant(env: dict[str, str], names: Sequence[str], repeats: int) -> dict[str, dict[str, float]]:
    cmd = [sys.executable, "-m", "experiments.benchmarks.allocators", "--child",
           f"--cases={','.join(names)}", f"--repeats={repeats}"]
    # The caller's own allocator settings would leak into every variant, "glibc default" included.
    base = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    proc = subprocess.run(cmd, env={**base, **env}, capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[2])
    return child_result(proc.returncode, proc.stdout, proc.stderr, f"child {env}")


def child_result(returncode: int, stdout: str, stderr: str, what: str) -> Any:
    """The last JSON line a benchmark child printed; RuntimeError with its stderr if it failed."""
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if returncode != 0 or not lines:
        raise RuntimeError(f"{what} failed ({returncode}): {stderr[-2000:]}")
    return json.loads(lines[-1])


def main(argv: Sequence[str]) -> None:
    del argv
    unknown = sorted(set(_CASES.value) - set(CASES))
    if unknown:
        raise app.UsageError(f"unknown cases {unknown}; choose from {list(CASES)}")
    if _CHILD.value:
        print(json.dumps(time_cases(_CASES.value, _REPEATS.value)), flush=True)
        return
    print(f"# allocator benchmark: {machine()}, best of {_REPEATS.value} calls, one process per variant")
    results = {}
    for name, env in variants().items():
        results[name] = run_variant(env, _CASES.value, _REPEATS.value)
        print(f"# {name}: {env or 'no change'}", flush=True)
    base = results["glibc default"]
    names = list(results)
    print("| case | " + " | ".join(f"{n} ms/step (sys s)" for n in names) + " | "
          + " | ".join(f"{n} speed-up" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")  # case, S times, S - 1 speed-ups
    for case in _CASES.value:
        cells = [f"{results[n][case]['ms_per_step']:.1f} ({results[n][case]['sys_s_per_step']:.2f})"
                 for n in names]
        ups = [f"{base[case]['ms_per_step'] / results[n][case]['ms_per_step']:.2f}" for n in names[1:]]
        print(f"| {case} | " + " | ".join(cells + ups) + " |", flush=True)


if __name__ == "__main__":
    # Flags are defined here, not at import, so that tests can import several benchmarks.
    _CASES = flags.DEFINE_list("cases", list(CASES), f"Cases to time, from {list(CASES)}.")
    _REPEATS = flags.DEFINE_integer("repeats", 3, "Timed calls per case (best reported).")
    _CHILD = flags.DEFINE_bool("child", False, "Internal: time the cases in this process, print JSON.")
    app.run(main)
