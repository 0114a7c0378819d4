"""One study as P processes on this host, joined by `jax.distributed` (one process per core group).

  python -m experiments.launch --processes=2 -- experiments.pft --config.num_seeds=4
  python -m experiments.launch --processes=2 --pin=False -- experiments.stability --workdir=w

Process i runs `python -m MODULE ARGS...` with JAX_COORDINATOR_ADDRESS (a free loopback port),
JAX_NUM_PROCESSES = P and JAX_PROCESS_ID = i, which the study's `common.init_devices` reads; its
seeds are then split over the processes (`seed_strategy="auto"`: "sharded_sequential" for conv nets
on CPU, "sharded" otherwise). With `--pin` (default), process i is restricted to the i-th of P equal
blocks of this process's cores before it starts, so XLA sizes its CPU thread pool to that block.
JAX_PLATFORMS defaults to cpu: on an accelerator host one process already sees every device.

Process 0 writes to this terminal (it alone draws the progress bars); process i > 0 writes to
`--logdir`/process_i.log. When a process fails, the others are stopped (they would otherwise wait
in a collective for ever), the end of its log is printed, and its exit status is returned.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from absl import app, flags

STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
LOG_TAIL_LINES = 30
# The child: pins itself to its cores before anything imports JAX (whose CPU client sizes its
# thread pool from them), then runs the module as `python -m` would. (A `preexec_fn` would run
# Python between fork and exec in a parent that may hold JAX's threads.)
_BOOT = """import os, runpy, sys
if sys.argv[1]:
    os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
sys.argv = sys.argv[2:]
runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""
# Variables that would make a child join another cluster than the one launched here.
CLUSTER_VARIABLES = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS",
                     "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def core_blocks(cores: Sequence[int], processes: int) -> list[list[int]]:
    """`cores` split into `processes` contiguous blocks whose sizes differ by at most one."""
    if processes < 1:
        raise ValueError(f"need at least one process, got {processes}")
    if processes > len(cores):
        raise ValueError(f"{processes} pinned processes but only {len(cores)} cores "
                         f"({sorted(cores)}); use fewer processes or --pin=False")
    cores = sorted(cores)
    q, r = divmod(len(cores), processes)
    starts = [i * q + min(i, r) for i in range(processes + 1)]
    return [cores[starts[i]:starts[i + 1]] for i in range(processes)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_envs(processes: int, port: int, base: dict[str, str]) -> list[dict[str, str]]:
    env = {k: v for k, v in base.items() if k not in CLUSTER_VARIABLES}
    env.setdefault("JAX_PLATFORMS", "cpu")
    env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(processes))
    return [{**env, "JAX_PROCESS_ID": str(i)} for i in range(processes)]


def _stop(procs: Sequence[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def launch(module: str, args: Sequence[str], processes: int, pin: bool = True,
           logdir: str | None = None, poll_s: float = 0.2) -> int:
    """Runs `python -m module *args` as `processes` jax.distributed processes; their exit status
    (0 when all succeed, else that of the lowest-numbered process seen failed, 128 + n for
    signal n)."""
    if processes < 1:
        raise ValueError(f"need at least one process, got {processes}")
    if importlib.util.find_spec(module) is None:
        raise ValueError(f"no module named {module!r} (give a module, e.g. experiments.pft)")
    blocks = core_blocks(sorted(os.sched_getaffinity(0)), processes) if pin else [None] * processes
    logs = Path(logdir or tempfile.mkdtemp(prefix="jaxprune-launch-"))
    logs.mkdir(parents=True, exist_ok=True)
    envs = child_envs(processes, free_port(), dict(os.environ))
    print(f"# launch: {processes} process(es) of {module}" + (f", cores {blocks}" if pin else "")
          + (f"; logs of processes 1-{processes - 1} in {logs}" if processes > 1 else ""),
          file=sys.stderr, flush=True)
    procs: list[subprocess.Popen] = []
    files = []
    try:
        for i in range(processes):
            out = None
            if i > 0:
                out = open(logs / f"process_{i}.log", "w")
                files.append(out)
            cores = ",".join(map(str, blocks[i])) if blocks[i] is not None else ""
            procs.append(subprocess.Popen([sys.executable, "-c", _BOOT, cores, module, *args],
                                          env=envs[i], stdout=out,
                                          stderr=subprocess.STDOUT if out else None))
        while True:
            codes = [p.poll() for p in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                _stop(procs)
                for i in failed:  # several can end within one poll: show each
                    print(f"# launch: process {i} exited with status {codes[i]}"
                          + ("" if i == 0 else f"; the end of {logs / f'process_{i}.log'}:"),
                          file=sys.stderr)
                    if i > 0:
                        print(_tail(logs / f"process_{i}.log"), file=sys.stderr)
                print("# launch: stopped the other processes", file=sys.stderr, flush=True)
                code = codes[failed[0]]
                return code if code > 0 else 128 - code  # killed by signal n: 128 + n
            if all(c == 0 for c in codes):
                return 0
            time.sleep(poll_s)
    except KeyboardInterrupt:
        _stop(procs)
        return 130
    finally:
        for f in files:
            f.close()


def main(argv: Sequence[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError("give the study after '--': python -m experiments.launch "
                             "--processes=2 -- experiments.pft --config.num_seeds=4")
    try:
        code = launch(argv[1], argv[2:], _PROCESSES.value, _PIN.value, _LOGDIR.value)
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    sys.exit(code)


if __name__ == "__main__":
    _PROCESSES = flags.DEFINE_integer("processes", 2, "Number of processes (P).")
    _PIN = flags.DEFINE_boolean("pin", True, "Give process i the i-th of P equal blocks of the cores.")
    _LOGDIR = flags.DEFINE_string("logdir", None, "Logs of processes 1..P-1 (default: a new temp dir).")
    app.run(main)
