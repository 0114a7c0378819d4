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


@pytest.fixture
def probe(tmp_path, monkeypatch):
    install_module("jaxprune_probe", PROBE, tmp_path, monkeypatch)
    out = tmp_path / "out"
    out.mkdir()
    return out


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
