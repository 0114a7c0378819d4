"""Direct tests of jaxprune/sharding.py's helpers and of what is built on them (gst.Runner,
flatness.assign_runs): exact placements and values on fake devices (in-process, with a fake host
list), on 4 fake CPU devices (one subprocess) and on 2 processes x 2 devices (`jax.distributed`,
through experiments.launch). Each check names, in a comment, the bug it catches."""

from __future__ import annotations

import dataclasses
import json
import os
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import sharding, train
from jaxprune.models import layers


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    process_index: int
    id: int


def test_seed_mesh_interleaves_hosts_and_needs_a_device_in_every_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 3 hosts x 2 devices listed host-major, as jax.devices() lists them; the Mesh is the grid.
    monkeypatch.setattr(jax, "process_count", lambda: 3)
    monkeypatch.setattr(sharding, "Mesh", lambda grid, names: grid)
    devs = [FakeDevice(p, 2 * p + i) for p in range(3) for i in range(2)]
    ids = lambda grid: [d.id for d in grid.ravel()]  # noqa: E731
    # Catches a mesh that takes devices host-major: 3 seeds would then sit on hosts 0, 0, 1.
    assert ids(sharding.seed_mesh(devices=devs)) == [0, 2, 4, 1, 3, 5]
    assert ids(sharding.seed_mesh(3, devices=devs)) == [0, 2, 4]
    assert sharding.seed_mesh(2, batch_shards=2, devices=devs).shape == (2, 2)
    assert ids(sharding.seed_mesh(1, batch_shards=3, devices=devs)) == [0, 2, 4]  # one row, 3 hosts
    # Catches a dropped check: 2 seeds on 3 processes leave process 2 unable to read its results.
    with pytest.raises(ValueError, match=r"use at least one seed per process \(a multiple of 3\)"):
        sharding.seed_mesh(2, devices=devs)
    # Uneven hosts (3 devices + 1): rank 0 of every host first, then the rest in host order.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    uneven = [FakeDevice(0, 0), FakeDevice(0, 1), FakeDevice(0, 2), FakeDevice(1, 3)]
    assert ids(sharding.seed_mesh(devices=uneven)) == [0, 3, 1, 2]


def test_initialize_from_env_starts_the_runtime_the_environment_describes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    variables = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
                 "OMPI_COMM_WORLD_SIZE")

    def run(**env: str) -> tuple[bool, list[dict]]:
        for v in variables:
            monkeypatch.delenv(v, raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        calls.clear()
        return sharding.initialize_from_env(), list(calls)

    # Catches swapped / unconverted (str) process count and id.
    explicit = {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2}
    assert run(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4",
               JAX_PROCESS_ID="2") == (True, [explicit])
    # Explicit variables win over a SLURM allocation (the launcher's children inherit one).
    assert run(JAX_COORDINATOR_ADDRESS="10.0.0.1:1234", JAX_NUM_PROCESSES="4", JAX_PROCESS_ID="2",
               SLURM_NTASKS="8") == (True, [explicit])
    # SLURM / Open MPI with several tasks: jax detects the cluster itself (no arguments).
    assert run(SLURM_NTASKS="2") == (True, [{}])
    assert run(OMPI_COMM_WORLD_SIZE="3") == (True, [{}])
    # Catches `>= 1`: one task is one process, which must not wait for a coordinator.
    assert run(SLURM_NTASKS="1", OMPI_COMM_WORLD_SIZE="1") == (False, [])
    with pytest.raises(ValueError, match=r"\['JAX_PROCESS_ID'\] are not"):
        run(JAX_COORDINATOR_ADDRESS="h:1", JAX_NUM_PROCESSES="2")
    assert calls == []


def test_map_seeds_sharded_checks_its_arguments_before_tracing() -> None:
    traced = []

    def f(a, b):
        traced.append(1)
        return a * b

    with pytest.raises(ValueError, match=r"in_axes must be 0 or None, got \(0, 2\)"):
        sharding.map_seeds_sharded(f, (0, 2))
    a, b = jnp.arange(3.0), jnp.float32(2.0)
    with pytest.raises(ValueError, match="expected 2 arguments, got 1"):
        sharding.map_seeds_sharded(f, (0, None))(a)
    with pytest.raises(ValueError, match="at least one argument with in_axes 0"):
        sharding.map_seeds_sharded(f, (None, None))(a, b)
    n = jax.device_count() + 1
    with pytest.raises(ValueError, match=f"batch_shards={n} must divide"):
        sharding.map_seeds_sharded(f, (0, None), batch_shards=n)(a, b)
    with pytest.raises(ValueError, match="batch_shards=0 must divide"):
        sharding.seed_mesh(batch_shards=0)
    assert not traced


def test_map_seeds_sharded_traces_under_batched_seed_convs_and_compiles_once() -> None:
    flags = []

    def f(a, b):
        flags.append(layers._PER_SEED_CONVS.get())  # at trace time
        return a * b + 1.0, jnp.sum(a)

    mapped = sharding.map_seeds_sharded(f, (0, None), returns_state=True)
    a, b = jnp.arange(6.0).reshape(3, 2), jnp.float32(2.0)
    for _ in range(2):
        state, aux = mapped(a, b)
    # Catches a lost `_batched_seed_convs` (per-seed convs slicing a sharded seed axis) and a
    # program traced again on every call (a fresh jit per call).
    assert flags == [False]
    assert layers._PER_SEED_CONVS.get() is True  # reset after tracing
    np.testing.assert_array_equal(state, [[1.0, 3.0], [5.0, 7.0], [9.0, 11.0]])
    np.testing.assert_array_equal(aux, [1.0, 5.0, 9.0])
    train.map_seeds(f, (0, None), "vmap")(a, b)  # plain vmap keeps per-seed convs
    assert flags == [False, True]


def test_readable_and_to_host_on_one_process() -> None:
    tree = {"a": jnp.arange(3.0), "b": (jnp.ones((2, 2), jnp.int32),)}
    assert sharding.readable(tree) is tree  # catches a gather (a collective) with nothing to gather
    host = sharding.to_host(tree)
    assert all(type(v) is np.ndarray for v in jax.tree.leaves(host))
    np.testing.assert_array_equal(host["a"], [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(host["b"][0], np.ones((2, 2)))
    # Catches np.asarray on typed keys (a TypeError): they come back as their key data.
    keys = jax.random.split(jax.random.key(0), 3)
    np.testing.assert_array_equal(sharding.to_host(keys), jax.random.key_data(keys))


def test_runner_rejects_an_unknown_strategy() -> None:
    from experiments import gst

    with pytest.raises(ValueError, match=r"strategy must be one of .*'pmap'"):
        gst.Runner("pmap", 4)


def test_flatness_splits_runs_over_devices_only_where_it_pays(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import flatness

    assert jax.default_backend() == "cpu" and jax.process_count() == 1
    assert [flatness._split(m) for m in ("auto", "all", "none")] == [False, True, False]
    monkeypatch.setattr(jax, "process_count", lambda: 2)  # several processes: each its own runs
    assert flatness._split("auto") and not flatness._split("none")
    monkeypatch.setattr(jax, "process_count", lambda: 1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # an accelerator: split
    assert flatness._split("auto")


FOUR_DEVICES = textwrap.dedent(r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from experiments import flatness, gst
    from jaxprune import sharding

    assert jax.device_count() == 4, jax.devices()
    dev = jax.devices()
    ids = lambda ds: [d.id for d in ds]
    # "seeds": split along the seed axis (spec P("seeds")), else the sharding's class name.
    layout = lambda v: ("seeds" if getattr(v.sharding, "spec", None) == jax.sharding.PartitionSpec(
        "seeds") else type(v.sharding).__name__)
    out = {}
    # seed_mesh: (num_seeds, batch_shards) -> mesh shape and device ids, row-major.
    out["meshes"] = {f"{s},{b}": [list(m.devices.shape), ids(m.devices.ravel())]
                     for s, b in ((None, 1), (6, 1), (5, 1), (4, 2), (3, 2), (None, 4))
                     for m in [sharding.seed_mesh(s, b)]}
    out["mesh_of_subset"] = ids(sharding.seed_mesh(2, devices=dev[2:]).devices.ravel())
    try:
        sharding.seed_mesh(batch_shards=3)
    except ValueError as e:
        out["three_shards"] = str(e)
    out["local_mesh_devices"] = ids(sharding.local_mesh_devices(sharding.seed_mesh(4, 2)))
    # shard_seeds / replicate / local_block / from_blocks / gather on a 3-device mesh (S = 6).
    m3 = sharding.seed_mesh(6)
    x = jnp.arange(12.0).reshape(6, 2)
    xs = sharding.shard_seeds(x, m3)
    out["blocks"] = [np.asarray(sharding.local_block(xs, d)).tolist() for d in dev[:3]]
    try:
        sharding.local_block(xs, dev[3])
    except ValueError as e:
        out["no_block"] = str(e)
    out["again_is_same"] = sharding.shard_seeds(xs, m3) is xs
    rep = sharding.replicate(x, m3)
    out["replicas"] = [np.array_equal(sharding.local_block(rep, d), x) for d in dev[:3]]
    keys = jax.random.split(jax.random.key(0), 6)
    placed = sharding.shard_seeds(keys, m3)
    out["key_block_1"] = [bool(jnp.issubdtype(placed.dtype, jax.dtypes.prng_key)),
                          np.array_equal(jax.random.key_data(sharding.local_block(placed, dev[1])),
                                         jax.random.key_data(keys)[2:4])]
    blocks = [jnp.full((2, 1), 10.0 * k) + jnp.arange(2.0)[:, None] for k in range(3)]
    blocks = [jax.device_put(b, d) for b, d in zip(blocks, sharding.local_mesh_devices(m3))]
    fb = sharding.from_blocks(blocks, m3)
    out["from_blocks"] = [np.asarray(fb).ravel().tolist(), layout(fb),
                          ids(sorted(fb.sharding.device_set, key=lambda d: d.id))]
    try:  # a (2, 2) mesh: one block per seed-axis device would place half of each row
        sharding.from_blocks(blocks[:2], sharding.seed_mesh(4, 2))
    except ValueError as e:
        out["from_blocks_batch"] = str(e)
    g = sharding.gather(xs, m3)
    out["gather"] = [g.is_fully_replicated, len(g.sharding.device_set), np.array_equal(g, x)]
    # map_seeds_sharded: S = 6 on the 3-device mesh, a replicated second argument; returns_state.
    f = lambda s, c: (s + c, jnp.sum(s) * c)
    for name, kw in (("plain", {}), ("state", {"returns_state": True}),
                     ("no_gather", {"gather_outputs": False})):
        r = sharding.map_seeds_sharded(f, (0, None), **kw)(x, jnp.float32(3.0))
        out["mapped_" + name] = [[np.asarray(v).tolist(), layout(v),
                                  len(v.sharding.device_set)] for v in jax.tree.leaves(r)]
    # gst.Runner: every strategy gives the same rows; listed runs live on device i // (R / d).
    out["runner"] = {}
    for strategy in ("vmap", "sequential", "sharded", "sharded_sequential"):
        r = gst.Runner(strategy, 6)
        ws = r.wrap({"w": jnp.arange(6.0)})
        step = r.map(lambda s, c, a: ({"w": s["w"] + c}, s["w"] * c + a), (None, 0),
                     returns_state=True, gather=False)
        new, aux = step(ws, r.replicate(jnp.float32(10.0)), r.per_run(jnp.arange(6.0) + 100.0))
        new, aux = step(new, r.replicate(jnp.float32(10.0)), r.per_run(jnp.arange(6.0) + 100.0))
        out["runner"][strategy] = {
            "aux": np.asarray(aux).tolist(), "aux_spec": layout(aux),
            "aux_devices": len(aux.sharding.device_set),
            "state": np.asarray(r.stacked(new)["w"]).tolist(),
            "run_devices": [ids(s["w"].devices()) for s in new] if isinstance(new, list) else None}
    # flatness: run idx[j] goes to device j mod 4 (its position in the list, not its number).
    out["assign"] = {str(d.id): runs for d, runs in flatness.assign_runs([5, 2, 7, 9, 4]).items()}
    print("RESULT", json.dumps(out))
""")


def test_helpers_on_4_devices(on_4_devices) -> None:
    out = on_4_devices(FOUR_DEVICES)
    # seed_mesh: the largest seed count dividing S that fits, times batch_shards; devices in order.
    # Catches d not dividing S (S = 6 on 4), batch_shards ignored, a transposed (batch, seeds) grid.
    assert out["meshes"] == {"None,1": [[4, 1], [0, 1, 2, 3]], "6,1": [[3, 1], [0, 1, 2]],
                             "5,1": [[1, 1], [0]], "4,2": [[2, 2], [0, 1, 2, 3]],
                             "3,2": [[1, 2], [0, 1]], "None,4": [[1, 4], [0, 1, 2, 3]]}
    assert out["mesh_of_subset"] == [2, 3]  # catches `devices` ignored
    assert "batch_shards=3 must divide the 4 devices" in out["three_shards"]
    assert out["local_mesh_devices"] == [0, 2]  # the "seeds" column of a (2, 2) mesh, not a row
    # Seed block k (rows 2k, 2k + 1) on device k; catches a replicated or permuted placement.
    assert out["blocks"] == [[[0.0, 1.0], [2.0, 3.0]], [[4.0, 5.0], [6.0, 7.0]],
                             [[8.0, 9.0], [10.0, 11.0]]]
    assert out["no_block"] == "no shard of this array lives on cpu:3"
    assert out["again_is_same"] and out["replicas"] == [True] * 3
    assert out["key_block_1"] == [True, True]  # typed keys stay keys, block 1 = keys 2-3
    # from_blocks: blocks in local_mesh_devices order, concatenated along the seed axis.
    assert out["from_blocks"] == [[0.0, 1.0, 10.0, 11.0, 20.0, 21.0], "seeds",
                                  [0, 1, 2]]
    # Catches from_blocks accepting a batch-sharded mesh (jax's own error named no cause).
    assert out["from_blocks_batch"].startswith("from_blocks takes a mesh without batch shards")
    assert out["gather"] == [True, 3, True]
    # Outputs stay seed-sharded on one process (gathered only over several, two-process test);
    # s + 3 and 3 * sum(s) per seed.
    rows = [[3.0, 4.0], [5.0, 6.0], [7.0, 8.0], [9.0, 10.0], [11.0, 12.0], [13.0, 14.0]]
    sums = [3.0, 15.0, 27.0, 39.0, 51.0, 63.0]
    seeded = "seeds"
    assert out["mapped_plain"] == out["mapped_no_gather"] == [[rows, seeded, 3], [sums, seeded, 3]]
    assert out["mapped_state"] == [[rows, seeded, 3], [sums, seeded, 3]]
    # Runner, two steps of w <- w + 10, aux = w * 10 + 100 + i with w of the second step = i + 10.
    aux = [100.0 + 10 * (i + 10) + i for i in range(6)]
    for strategy, got in out["runner"].items():
        assert got["aux"] == aux and got["state"] == [i + 20.0 for i in range(6)], strategy
    runner = out["runner"]
    # Catches runs placed on the wrong device (a block of R / d = 2 runs per device) or kept whole.
    assert runner["sharded_sequential"]["run_devices"] == [[0], [0], [1], [1], [2], [2]]
    assert runner["sequential"]["run_devices"] == [[0]] * 6
    assert [runner[s]["aux_devices"] for s in ("vmap", "sequential", "sharded",
                                               "sharded_sequential")] == [1, 1, 3, 3]
    assert runner["sharded"]["aux_spec"] == runner["sharded_sequential"]["aux_spec"] == seeded
    # Catches assign_runs placing run i on device i mod 4 (idx[j] must go to device j mod 4).
    assert out["assign"] == {"0": [5, 4], "1": [2], "2": [7], "3": [9]}


# Two processes x 2 CPU devices: process p writes what it saw to probe_p.json.
TWO_PROCESSES = textwrap.dedent(r"""
    import json, os, sys
    from experiments import common, gst
    import jax, jax.numpy as jnp, numpy as np
    from jaxprune import sharding

    info = common.init_devices(verbose=False)
    p = jax.process_index()
    out = {"info": [info["process_count"], info["device_count"]]}
    out["mesh_processes"] = [d.process_index for d in sharding.seed_mesh().devices.ravel()]
    try:
        sharding.seed_mesh(1)
    except ValueError as e:
        out["one_seed"] = str(e)
    mesh = sharding.seed_mesh(4)
    mine = sharding.local_mesh_devices(mesh)
    out["local"] = [[d.process_index for d in mine], len(mine)]
    x = np.arange(8.0).reshape(4, 2)  # the same host value on both processes
    xs = sharding.shard_seeds(x, mesh)
    out["my_blocks"] = [np.asarray(sharding.local_block(xs, d)).tolist() for d in mine]
    keys = sharding.shard_seeds(jax.random.split(jax.random.key(0), 4), mesh)
    out["my_keys"] = [jax.random.key_data(sharding.local_block(keys, d)).tolist() for d in mine]
    out["xs"] = [xs.is_fully_addressable, xs.is_fully_replicated,
                 sharding.shard_seeds(xs, mesh) is xs]
    r = sharding.readable({"a": xs})["a"]
    out["readable"] = [r.is_fully_replicated, np.asarray(r.addressable_data(0)).tolist()]
    out["to_host"] = sharding.to_host(xs).tolist()
    fb = sharding.from_blocks([sharding.local_block(xs, d) for d in mine], mesh)
    out["from_blocks"] = np.asarray(sharding.readable(fb).addressable_data(0)).tolist()
    f = lambda s, c: (s * c, jnp.sum(s))
    def placed(t):
        return [[v.is_fully_addressable, v.is_fully_replicated] for v in jax.tree.leaves(t)]
    for name, kw in (("gathered", {}), ("state", {"returns_state": True}),
                     ("no_gather", {"gather_outputs": False})):
        o = sharding.map_seeds_sharded(f, (0, None), **kw)(x, jnp.float32(2.0))
        out["map_" + name] = [placed(o), [np.asarray(v.addressable_data(0)).tolist()
                                          for v in jax.tree.leaves(sharding.readable(o))]]
    for strategy in ("sharded", "sharded_sequential"):
        runner = gst.Runner(strategy, 4)
        ws = runner.wrap({"w": jnp.arange(4.0)})
        step = runner.map(lambda s, c: ({"w": s["w"] + c}, s["w"] * c), (None,),
                          returns_state=True, gather=False)
        new, aux = step(ws, runner.replicate(jnp.float32(3.0)))
        gathered = runner.map(lambda s, c: s["w"] * c, (None,))(
            new, runner.replicate(jnp.float32(3.0)))
        out["runner_" + strategy] = {
            "mine": [i for i, s in enumerate(ws) if s is not None] if runner.listed else None,
            "aux": placed(aux), "aux_values": np.asarray(
                sharding.readable(aux).addressable_data(0)).tolist(),
            "gathered": placed(gathered), "gathered_values": np.asarray(gathered).tolist(),
            "state": np.asarray(runner.stacked(new)["w"].addressable_data(0)).tolist()}
    with open(os.path.join(sys.argv[1], f"probe_{p}.json"), "w") as fh:
        json.dump(out, fh)
""")


def test_helpers_on_two_processes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The multi-host paths of the helpers, which one process never takes: host values placed by
    every process, outputs gathered (or not) over the processes, and `readable` / `to_host`."""
    from experiments import launch

    (tmp_path / "jaxprune_two.py").write_text(TWO_PROCESSES)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), repo]))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    for v in launch.CLUSTER_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert launch.launch("jaxprune_two", [str(out_dir)], 2, pin=False,
                         logdir=str(tmp_path / "logs")) == 0  # else: the log tail on stderr
    p0, p1 = [json.loads((out_dir / f"probe_{i}.json").read_text()) for i in range(2)]
    x = np.arange(8.0).reshape(4, 2)
    key_data = np.asarray(jax.random.key_data(jax.random.split(jax.random.key(0), 4)))
    for p, o in enumerate((p0, p1)):
        assert o["info"] == [2, 4]
        # Hosts interleaved: seeds 0, 2 on process 0, seeds 1, 3 on process 1.
        assert o["mesh_processes"] == [0, 1, 0, 1]
        assert "use at least one seed per process (a multiple of 2)" in o["one_seed"]
        assert o["local"] == [[p, p], 2]
        # Catches a process filling its shards from the wrong rows of the host value.
        assert o["my_blocks"] == [x[[p]].tolist(), x[[p + 2]].tolist()]
        assert o["my_keys"] == [key_data[[p]].tolist(), key_data[[p + 2]].tolist()]
        # Placed once: catches placed arrays gathered and placed again (every loop step).
        assert o["xs"] == [False, False, True]
        # Catches readable / to_host / from_blocks returning only this process's part.
        assert o["readable"] == [True, x.tolist()]
        assert o["to_host"] == x.tolist() and o["from_blocks"] == x.tolist()
        values = [(2 * x).tolist(), x.sum(1).tolist()]
        # Outputs replicated over the processes (every process reads them), except a fed-back
        # state (returns_state) and everything with gather_outputs=False: catches a flag ignored.
        assert o["map_gathered"] == [[[False, True], [False, True]], values]
        assert o["map_state"] == [[[False, False], [False, True]], values]
        assert o["map_no_gather"] == [[[False, False], [False, False]], values]
        for strategy in ("sharded", "sharded_sequential"):
            r = o["runner_" + strategy]
            assert r["aux"] == [[False, False]], (strategy, r)  # gather=False: not gathered
            assert r["gathered"] == [[False, True]], (strategy, r)  # gather=True (default)
            assert r["aux_values"] == [0.0, 3.0, 6.0, 9.0]
            assert r["gathered_values"] == [9.0, 12.0, 15.0, 18.0]
            assert r["state"] == [3.0, 4.0, 5.0, 6.0]
        # "sharded_sequential": each process computes only its devices' runs.
        assert o["runner_sharded_sequential"]["mine"] == [p, p + 2]
