"""experiments/launch.py: P pinned processes joined by jax.distributed; a failure stops them all."""

from __future__ import annotations

import json
import os
import textwrap
import time

import numpy as np
import pytest

from experiments import launch

# A study stand-in: joins the cluster through common.init_devices, all-gathers the process indices,
# writes what it saw; with argv[2] = i, process i raises while the others wait in a collective.
PROBE = textwrap.dedent("""
    import json, os, sys
    from experiments import common
    import jax, jax.numpy as jnp
    from jax.experimental import multihost_utils

    info = common.init_devices(verbose=False)
    gathered = multihost_utils.process_allgather(jnp.array([jax.process_index()]))
    info.update(gathered=[int(v) for v in gathered.ravel()], cores=sorted(os.sched_getaffinity(0)),
                platforms=os.environ.get("JAX_PLATFORMS"))
    with open(os.path.join(sys.argv[1], f"probe_{jax.process_index()}.json"), "w") as f:
        json.dump(info, f)
    if len(sys.argv) > 2:
        if int(sys.argv[2]) == jax.process_index():
            raise RuntimeError("probe failure")
        multihost_utils.sync_global_devices("never reached by the failed process")
""")


def install_module(name: str, source: str, tmp_path, monkeypatch) -> None:
    """Makes `source` importable as `name` here and in the processes the launcher starts."""
    (tmp_path / f"{name}.py").write_text(source)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), repo]))
    monkeypatch.syspath_prepend(str(tmp_path))  # the launcher checks the module exists


def installed_with_outdir(name: str, source: str, tmp_path, monkeypatch):
    """install_module, then an empty tmp_path/out for the study to write into."""
    install_module(name, source, tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    return out


@pytest.fixture
def probe(tmp_path, monkeypatch):
    return installed_with_outdir("jaxprune_probe", PROBE, tmp_path, monkeypatch)


def test_core_blocks_split_evenly_and_refuse_too_many() -> None:
    assert launch.core_blocks([3, 0, 1, 2, 4], 2) == [[0, 1, 2], [3, 4]]
    assert launch.core_blocks([0, 1], 2) == [[0], [1]]
    assert launch.core_blocks([5], 1) == [[5]]
    with pytest.raises(ValueError, match="3 pinned processes but only 2 cores"):
        launch.core_blocks([0, 1], 3)
    with pytest.raises(ValueError, match="at least one process"):
        launch.core_blocks([0, 1], 0)


def test_child_envs_replace_another_cluster() -> None:
    envs = launch.child_envs(2, 1234, {"SLURM_NTASKS": "8", "JAX_PROCESS_ID": "5", "KEEP": "x"})
    assert [e["JAX_PROCESS_ID"] for e in envs] == ["0", "1"]
    for e in envs:
        assert "SLURM_NTASKS" not in e and e["KEEP"] == "x" and e["JAX_PLATFORMS"] == "cpu"
        assert e["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:1234" and e["JAX_NUM_PROCESSES"] == "2"
    assert launch.child_envs(1, 1, {"JAX_PLATFORMS": "cuda"})[0]["JAX_PLATFORMS"] == "cuda"


def test_two_pinned_processes_join_one_cluster(probe, tmp_path) -> None:
    pin = len(os.sched_getaffinity(0)) >= 2
    code = launch.launch("jaxprune_probe", [str(probe)], 2, pin=pin, logdir=str(tmp_path / "logs"))
    assert code == 0
    infos = [json.loads((probe / f"probe_{i}.json").read_text()) for i in range(2)]
    for i, info in enumerate(infos):
        assert info["process_index"] == i and info["process_count"] == 2
        assert info["distributed"] and info["device_count"] == 2 and info["gathered"] == [0, 1]
        assert info["platforms"] == "cpu"
    if pin:
        assert infos[0]["cores"] == launch.core_blocks(sorted(os.sched_getaffinity(0)), 2)[0]
        assert infos[1]["cores"] == launch.core_blocks(sorted(os.sched_getaffinity(0)), 2)[1]


def test_a_failing_process_stops_the_others_at_once(probe, tmp_path, capfd) -> None:
    """Process 1 raises while process 0 waits for it in a collective. Without common.fail_fast the
    failure would surface only after jax.distributed's 300 s shutdown barrier, as an abort."""
    start = time.monotonic()
    code = launch.launch("jaxprune_probe", [str(probe), "1"], 2, pin=False,
                         logdir=str(tmp_path / "logs"))
    elapsed = time.monotonic() - start
    assert code == 1
    assert elapsed < 120, elapsed
    err = capfd.readouterr().err
    assert "process 1 exited with status 1" in err and "RuntimeError: probe failure" in err, err
    assert (probe / "probe_0.json").exists() and (probe / "probe_1.json").exists()


def test_launch_refuses_unknown_modules_and_bad_counts() -> None:
    with pytest.raises(ValueError, match="no module named 'experiments.nosuch'"):
        launch.launch("experiments.nosuch", [], 2)
    with pytest.raises(ValueError, match="at least one process"):
        launch.launch("experiments.pft", [], 0)
    with pytest.raises(ValueError, match="pinned processes but only"):
        launch.launch("experiments.pft", [], len(os.sched_getaffinity(0)) + 1)


def test_compilation_cache_dir_from_the_environment() -> None:
    from experiments import common

    home = os.path.expanduser("~")
    assert common.compilation_cache_dir({}) == os.path.join(home, ".cache", "jaxprune", "xla")
    assert common.compilation_cache_dir({"XDG_CACHE_HOME": "/c"}) == "/c/jaxprune/xla"
    assert common.compilation_cache_dir({"JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    both = {common.CACHE_ENV: "/p", "JAX_COMPILATION_CACHE_DIR": "/j"}
    assert common.compilation_cache_dir(both) == "/p"
    for off in ("off", "0", "", "None", "false"):
        assert common.compilation_cache_dir({common.CACHE_ENV: off, "XDG_CACHE_HOME": "/c"}) is None


CACHED = textwrap.dedent("""
    import json, sys
    from experiments import common
    import jax, jax.numpy as jnp
    from jax._src import monitoring

    hits = []
    monitoring.register_event_listener(
        lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
    common.init_devices(verbose=False)
    y = jax.jit(lambda a: jnp.tanh(a) * 3.0)(jnp.arange(5.0))
    print(json.dumps({"dir": jax.config.jax_compilation_cache_dir, "hits": len(hits),
                      "y": y.tolist()}))
""")


def test_init_devices_turns_on_the_compilation_cache(tmp_path) -> None:
    """A second process finds the first one's program in the cache; "off" leaves jax's default."""
    import subprocess
    import sys

    cache = tmp_path / "xla"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAXPRUNE_COMPILATION_CACHE": str(cache)}
    runs = [json.loads(subprocess.run([sys.executable, "-c", CACHED], env=env, check=True,
                                      capture_output=True, text=True).stdout.splitlines()[-1])
            for _ in range(2)]
    assert runs[0]["dir"] == runs[1]["dir"] == str(cache) and any(cache.iterdir())
    assert runs[0]["hits"] == 0 and runs[1]["hits"] >= 1
    assert runs[0]["y"] == runs[1]["y"]
    off = json.loads(subprocess.run([sys.executable, "-c", CACHED],
                                    env={**env, "JAXPRUNE_COMPILATION_CACHE": "off"}, check=True,
                                    capture_output=True, text=True).stdout.splitlines()[-1])
    assert off["dir"] is None and off["hits"] == 0


# A program on one process's device and one that spans both processes (seed-sharded input,
# replicated output), and how many programs each process loaded from the cache or compiled.
SPANNING = textwrap.dedent("""
    import json, os, sys
    from experiments import common
    import jax, jax.numpy as jnp, numpy as np
    from jax._src import monitoring
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    events = []
    monitoring.register_event_listener(lambda event, **kw: events.append(event.split("/")[-1]))
    common.init_devices(verbose=False)
    local = jax.jit(lambda a: a * 2.0 + 1.0)(np.arange(4.0))  # on this process's device only
    mesh = Mesh(np.array(jax.devices()), ("seeds",))
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("seeds")),
                                               np.arange(3.0) + 3 * jax.process_index())
    f = jax.jit(lambda a: jnp.cumsum(jnp.tanh(a)), out_shardings=NamedSharding(mesh, P()))
    y = np.asarray(f(x).addressable_data(0))
    with open(os.path.join(sys.argv[1], f"probe_{jax.process_index()}.json"), "w") as out:
        hits = events.count("cache_hits")
        json.dump({"hits": hits, "compiled": events.count("compile_requests_use_cache") - hits,
                   "y": y.tolist(), "local": np.asarray(local).tolist()}, out)
""")


def test_every_process_hits_the_compilation_cache(tmp_path, monkeypatch) -> None:
    """On CPU jax's own cache key differs between the processes of one cluster, so process 1 never
    hit and recompiled everything on every run; with `common.share_cpu_cache_between_processes`
    a second run compiles nothing on either process (the local and the spanning program both
    hit), with the same results."""
    install_module("jaxprune_spanning", SPANNING, tmp_path, monkeypatch)
    monkeypatch.setenv("JAXPRUNE_COMPILATION_CACHE", str(tmp_path / "xla"))
    runs = []
    for r in range(2):
        out = tmp_path / f"run{r}"
        out.mkdir()
        assert launch.launch("jaxprune_spanning", [str(out)], 2, pin=False,
                             logdir=str(tmp_path / f"logs{r}")) == 0
        runs.append([json.loads((out / f"probe_{i}.json").read_text()) for i in range(2)])
    assert [(p["hits"] >= 2, p["compiled"]) for p in runs[1]] == [(True, 0), (True, 0)], runs
    expected = np.cumsum(np.tanh(np.arange(6.0)))
    for run in runs:
        for p in run:
            np.testing.assert_allclose(p["y"], expected, rtol=1e-6)
            assert p["local"] == [1.0, 3.0, 5.0, 7.0]


# A study stand-in without JAX (starts in ~50 ms): records its argv, __name__, cores and cluster
# variables; argv[2] = "fail:i:code" makes process i exit with `code` ("kill": SIGKILL itself)
# while the others sleep, to be stopped by the launcher.
TINY = textwrap.dedent("""
    import json, os, signal, sys, time

    out, mode = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else "")
    i = int(os.environ["JAX_PROCESS_ID"])
    env = {k: os.environ.get(k) for k in ("JAX_PROCESS_ID", "JAX_NUM_PROCESSES",
                                          "JAX_COORDINATOR_ADDRESS", "JAX_PLATFORMS")}
    with open(os.path.join(out, f"tiny_{i}.json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "name": __name__, "pid": os.getpid(), "env": env,
                   "cores": sorted(os.sched_getaffinity(0))}, f)
    print(f"tiny process {i} says hello", flush=True)
    if mode.startswith("fail:"):
        _, who, code = mode.split(":")
        if int(who) == i:
            if code == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            sys.exit(int(code))
        time.sleep(60)
""")


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    return installed_with_outdir("jaxprune_tiny", TINY, tmp_path, monkeypatch)


def _read_tiny(out, processes: int = 2) -> list[dict]:
    return [json.loads((out / f"tiny_{i}.json").read_text()) for i in range(processes)]


def test_launch_passes_arguments_ids_and_cores_to_every_process(tiny, tmp_path,
                                                                 monkeypatch) -> None:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # the launcher's default applies
    cores = sorted(os.sched_getaffinity(0))
    pin = len(cores) >= 2
    logs = tmp_path / "logs"
    assert launch.launch("jaxprune_tiny", [str(tiny), "ok", "--flag=1"], 2, pin=pin,
                         logdir=str(logs)) == 0
    infos = _read_tiny(tiny)
    for i, info in enumerate(infos):
        # Catches an argv shifted by one (the module name or the cores passed on) and a module
        # run under its own name (its `if __name__ == "__main__"` would not run).
        assert info["argv"] == [str(tiny), "ok", "--flag=1"] and info["name"] == "__main__"
        assert info["env"]["JAX_PROCESS_ID"] == str(i) and info["env"]["JAX_NUM_PROCESSES"] == "2"
        assert info["env"]["JAX_PLATFORMS"] == "cpu"
        # Catches pinning lost on the way to the child (its XLA pool would take every core).
        assert info["cores"] == (launch.core_blocks(cores, 2)[i] if pin else cores)
    assert infos[0]["env"]["JAX_COORDINATOR_ADDRESS"] == infos[1]["env"]["JAX_COORDINATOR_ADDRESS"]
    # Process 1 writes to its log; process 0 to the terminal (no log of its own).
    assert (logs / "process_1.log").read_text() == "tiny process 1 says hello\n"
    assert sorted(p.name for p in logs.iterdir()) == ["process_1.log"]


# mode, the launcher's status, the child's status as Popen reports it (-n: killed by signal n)
@pytest.mark.parametrize("mode,code,status", [("fail:1:3", 3, 3), ("fail:1:kill", 137, -9),
                                              ("fail:0:5", 5, 5)])
def test_launch_returns_the_failed_status_and_stops_the_others(tiny, tmp_path, capfd, mode, code,
                                                               status) -> None:
    start = time.monotonic()
    got = launch.launch("jaxprune_tiny", [str(tiny), mode], 2, pin=False,
                        logdir=str(tmp_path / "logs"))
    elapsed = time.monotonic() - start
    # Catches 128 - n for a signal (-9 -> 119, not 137) and the status of the wrong process.
    assert got == code
    # Catches the others left running (they sleep 60 s) or waited for up to STOP_GRACE_S without
    # a SIGTERM first.
    assert elapsed < launch.STOP_GRACE_S / 2, elapsed
    failed = int(mode.split(":")[1])
    sleeper = _read_tiny(tiny)[1 - failed]["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(sleeper, 0)  # stopped and reaped
    err = capfd.readouterr().err
    assert f"# launch: process {failed} exited with status {status}" in err, err
    # Process 1's log tail is shown; process 0 wrote to the terminal, so there is none for it.
    assert ("tiny process 1 says hello" in err) == (failed == 1), err
    assert "# launch: stopped the other processes" in err


def test_main_parses_the_study_after_the_double_dash(tiny, tmp_path) -> None:
    import subprocess
    import sys

    def main(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "experiments.launch", *argv],
                              capture_output=True, text=True, timeout=60)

    ok = main("--processes=2", "--nopin", f"--logdir={tmp_path / 'logs'}", "--",
              "jaxprune_tiny", str(tiny), "ok")
    assert ok.returncode == 0, ok.stderr
    assert [i["argv"] for i in _read_tiny(tiny)] == [[str(tiny), "ok"]] * 2
    assert main("--processes=2", "--nopin", "--", "jaxprune_tiny", str(tiny),
                "fail:1:4").returncode == 4  # the study's status is the launcher's
    # Usage errors, not tracebacks: no study, an unknown module, too many pinned processes.
    too_many = f"--processes={len(os.sched_getaffinity(0)) + 1}"
    for argv, message in (((), "give the study after '--'"),
                          (("--", "nosuch_module"), "no module named 'nosuch_module'"),
                          ((too_many, "--", "jaxprune_tiny"), "pinned processes but only")):
        bad = main(*argv)
        assert bad.returncode == 1 and message in bad.stderr, (argv, bad.stderr)
        assert "Traceback" not in bad.stderr, bad.stderr


def test_fail_fast_exits_at_once_after_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from experiments import common

    shown, exits = [], []
    monkeypatch.setattr(sys, "excepthook", lambda *a: shown.append(a[0]))
    monkeypatch.setattr(os, "_exit", exits.append)
    common.fail_fast()
    hook = sys.excepthook
    common.fail_fast()
    assert sys.excepthook is hook  # catches a second wrap (init_devices may run twice)
    hook(RuntimeError, RuntimeError("boom"), None)
    # Catches a hook that swallows the traceback, or returns into jax.distributed's 300 s
    # shutdown barrier instead of exiting.
    assert shown == [RuntimeError] and exits == [1]


CACHE_KEYS = textwrap.dedent("""
    import hashlib, json
    import jax, numpy as np
    from jax._src import cache_key, compiler
    from experiments import common

    orig_cfg = cache_key._hash_accelerator_config
    orig_opts = cache_key._hash_serialized_compile_options
    d0, d1 = jax.devices()
    options = {d: compiler.get_compile_options(1, 1, device_assignment=np.array([[d.id]]))
               for d in (d0, d1)}

    def digest(fn, arg):
        h = hashlib.sha256()
        fn(h, arg)
        return h.hexdigest()

    def keys(cfg, opts):
        return {"d0": digest(cfg, np.array([d0])), "d1": digest(cfg, np.array([d1])),
                "both": digest(cfg, np.array([d0, d1])),
                "opts0": digest(opts, options[d0]), "opts1": digest(opts, options[d1])}

    out = {"orig": keys(orig_cfg, orig_opts)}
    common.host_cpu_signature = lambda: "cpu A"
    out["wrapped"] = common.share_cpu_cache_between_processes()
    wrapped = cache_key._hash_accelerator_config
    out["twice"] = common.share_cpu_cache_between_processes() and (
        cache_key._hash_accelerator_config is wrapped)
    out["one_process"] = keys(cache_key._hash_accelerator_config,
                              cache_key._hash_serialized_compile_options)
    jax.process_count = lambda: 2  # as a cluster's process sees it
    out["cluster_a"] = keys(cache_key._hash_accelerator_config,
                            cache_key._hash_serialized_compile_options)
    jax.default_backend = lambda: "gpu"
    out["gpu_cluster"] = keys(cache_key._hash_accelerator_config,
                              cache_key._hash_serialized_compile_options)
    jax.default_backend = lambda: "cpu"
    cache_key._hash_accelerator_config = orig_cfg  # wrap again on a host with another CPU
    cache_key._hash_serialized_compile_options = orig_opts
    common.host_cpu_signature = lambda: "cpu B"
    common.share_cpu_cache_between_processes()
    out["cluster_b"] = keys(cache_key._hash_accelerator_config,
                            cache_key._hash_serialized_compile_options)
    print(json.dumps(out))
""")


def test_cpu_cache_keys_are_shared_by_the_processes_of_a_cluster() -> None:
    """`common.share_cpu_cache_between_processes` on 2 fake CPU devices, with the process count
    faked: a CPU cluster's key ignores the device (process 1 loads process 0's programs) but not
    the host CPU; one process's keys and a GPU cluster's are jax's own."""
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([sys.executable, "-c", CACHE_KEYS], env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    orig, a, b = out["orig"], out["cluster_a"], out["cluster_b"]
    assert out["wrapped"] and out["twice"]
    # Catches keys changed where jax's own work: one process, or a GPU cluster.
    assert out["one_process"] == out["gpu_cluster"] == orig
    assert orig["opts0"] != orig["opts1"]  # jax keeps the device assignment
    # Catches a CPU cluster key with the device assignment or ids in it (process 1 never hits)...
    assert a["d0"] == a["d1"] != a["both"] and a["opts0"] == a["opts1"]
    assert a["d0"] != orig["d0"]
    # ...or without the host CPU (a host with another CPU would load foreign machine code).
    assert a["d0"] != b["d0"] and a["opts0"] == b["opts0"]
