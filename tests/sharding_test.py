"""Seeds sharded over 4 fake CPU devices give the single-device numbers (run in a subprocess, since
XLA_FLAGS must be set before jax starts and this pytest process has already imported jax)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import launch
from jaxprune import sharding, train

SCRIPT = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np
from jaxprune import models, sharding, train

assert jax.device_count() == 4, jax.devices()
# SGD: Adam's g / sqrt(v) would amplify float reassociation of near-zero gradients.
tx = train.make_optimizer(train.TrainConfig(optimizer="sgd", learning_rate=0.1))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.normal(size=(32, 8, 8, 3)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, size=32), jnp.int32)
out = {"strategy": train.default_strategy("small_cnn"), "mlp_strategy": train.default_strategy("mlp")}
CASES = {4: models.get_model("small_cnn", 10, channels=(4, 4, 8, 8), dense=16, batch_norm=True,
                             conv_impl="shifts"),
         6: models.get_model("mlp", 10, widths=(8,))}  # S = 6 on 4 devices: a 3-device mesh
for s, model in CASES.items():
    # Params from numpy: compiling model.init (threefry) is slow on CPU; values do not matter.
    abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
    leaf = lambda v: jnp.asarray(0.3 * rng.normal(size=(s, *v.shape)), jnp.float32)
    params = jax.tree.map(leaf, abstract["params"])
    bs = jax.tree.map(lambda v: jnp.zeros((s, *v.shape)), abstract.get("batch_stats", {}))
    states = jax.vmap(functools.partial(train.state_from_params, tx=tx))(
        train.seed_keys(0, s), params, bs)
    # Batch 16, not 8: with batch 8 one seed's second step sits next to a max-pool/ReLU switch, so
    # a 5e-6 reassociation difference after step 1 flips it and moves a BN-scale gradient by 0.04
    # (measured on one CPU, not on another); the kink is the model's, not the sharding's.
    epoch = functools.partial(train.train_epoch, model=model, tx=tx, batch_size=16, steps=2)
    keys = train.seed_keys(1, s)
    ref, m_ref = train.map_seeds(epoch, (0, None, None, 0), "vmap")(states, x, y, keys)
    got, m_got = train.map_seeds(epoch, (0, None, None, 0), "sharded")(states, x, y, keys)
    # The same single-seed program per device: bitwise the one-device "sequential" result, also
    # when its seed-sharded outputs are fed back in; typed keys and scalars come back stacked.
    fk = lambda st, x, y, k: (epoch(st, x, y, k), jax.random.fold_in(k, 3), jnp.int32(7))
    seq = train.map_seeds(fk, (0, None, None, 0), "sequential")
    sseq = train.map_seeds(fk, (0, None, None, 0), "sharded_sequential")
    a1 = seq(states, x, y, keys)
    b1 = sseq(states, x, y, keys)
    a2, b2 = seq(a1[0][0], x, y, keys), sseq(b1[0][0], x, y, keys)
    raw = lambda t: [np.asarray(jax.random.key_data(v) if jnp.issubdtype(v.dtype, jax.dtypes.prng_key)
                                else v) for v in jax.tree.leaves(t)]
    same = all(np.array_equal(u, v) for u, v in zip(raw((a1, a2)), raw((b1, b2))))
    sseq_devices = len(b2[0][0].params["head"]["kernel"].sharding.device_set)
    diff = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
               for a, b in zip(jax.tree.leaves((ref, m_ref)), jax.tree.leaves((got, m_got))))
    devices = len(got.params["head"]["kernel"].sharding.device_set)
    out[s] = {"diff": diff, "devices": devices, "loss": np.asarray(m_got["loss"]).tolist(),
              "sseq_same": same, "sseq_devices": sseq_devices, "sseq_key": str(b1[1].dtype),
              "ref_devices": len(ref.params["head"]["kernel"].sharding.device_set)}
# Data parallelism inside each seed: S = 2 seeds x 2 batch shards on the 4 devices (BN model).
model = CASES[4]
abstract = jax.eval_shape(model.init, jax.random.key(0), x[:1])
params = jax.tree.map(lambda v: jnp.asarray(0.3 * rng.normal(size=(2, *v.shape)), jnp.float32),
                      abstract["params"])
bs = jax.tree.map(lambda v: jnp.zeros((2, *v.shape)), abstract["batch_stats"])
states = jax.vmap(functools.partial(train.state_from_params, tx=tx))(train.seed_keys(0, 2), params, bs)
epoch = functools.partial(train.train_epoch, model=model, tx=tx, batch_size=16, steps=2)
ref = train.map_seeds(epoch, (0, None, None, 0), "vmap")(states, x, y, train.seed_keys(1, 2))
got = train.map_seeds(epoch, (0, None, None, 0), "sharded", batch_shards=2)(
    states, x, y, train.seed_keys(1, 2))
mesh = sharding.seed_mesh(2, batch_shards=2)
with jax.set_mesh(mesh):
    spec = jax.jit(train.constrain_batch)(x).sharding.spec
out["batch"] = {"diff": max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                            for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got))),
                "mesh": dict(mesh.shape), "spec_is_batch": spec == jax.sharding.PartitionSpec("batch"),
                "no_mesh_spec": str(jax.jit(train.constrain_batch)(x).sharding),
                "devices": len(got[0].params["head"]["kernel"].sharding.device_set)}
print("RESULT", json.dumps(out))
"""


def test_sharded_seeds_equal_single_device(on_4_devices) -> None:
    out = on_4_devices(SCRIPT, timeout=120)
    # Automatic with more than one device: conv nets on CPU sequentially per device.
    assert out["strategy"] == "sharded_sequential" and out["mlp_strategy"] == "sharded"
    for s, devices in (("4", 4), ("6", 3)):  # S = 6 on 4 devices: 3 devices, 2 seeds each
        assert out[s]["devices"] == devices
        assert out[s]["ref_devices"] == 1
        assert out[s]["diff"] <= 1e-4, out[s]  # float reassociation across device groups
        assert len(out[s]["loss"]) == int(s)
        assert out[s]["sseq_same"] and out[s]["sseq_devices"] == devices
        assert out[s]["sseq_key"].startswith("key")
    # batch_shards = 2: each seed's batch split over 2 devices (constrain_batch gives P("batch")
    # under the mesh, nothing without one); the all-reduced gradient and BN moments match one device.
    b = out["batch"]
    assert b["mesh"] == {"seeds": 2, "batch": 2} and b["devices"] == 4
    assert b["spec_is_batch"] and "SingleDeviceSharding" in b["no_mesh_spec"]
    assert b["diff"] <= 1e-4, b


def test_seed_mesh_and_errors_on_one_device() -> None:
    mesh = sharding.seed_mesh(num_seeds=3)
    assert dict(mesh.shape) == {sharding.SEEDS: 1, sharding.BATCH: 1}
    with pytest.raises(ValueError, match="batch_shards"):
        sharding.seed_mesh(batch_shards=3 * jax.device_count() + 1)
    with pytest.raises(ValueError, match="num_seeds"):
        sharding.seed_mesh(num_seeds=0)
    with pytest.raises(ValueError, match="in_axes"):
        sharding.map_seeds_sharded(lambda a: a, (1,))
    with pytest.raises(ValueError, match="seed strategy"):
        train.resolve_strategy("pmap", "mlp")
    from experiments import gst

    with pytest.raises(ValueError, match="batch_shards=2 needs seed strategy 'sharded'"):
        train.map_seeds(lambda a: a, (0,), "vmap", batch_shards=2)
    with pytest.raises(ValueError, match="batch_shards=2 needs seed strategy 'sharded'"):
        gst.Runner("sequential", 4, batch_shards=2)
    # Without a mesh whose "batch" axis is > 1, constrain_batch is the identity.
    x = jax.numpy.ones((4, 2))
    assert train.constrain_batch(x) is x
    # One device: sharded == vmap, numbers identical.
    f = lambda a, b: (a * b).sum()  # noqa: E731
    a = jax.numpy.arange(6.0).reshape(3, 2)
    b = jax.numpy.arange(2.0)
    assert sharding.map_seeds_sharded(f, (0, None))(a, b).tolist() == [1.0, 3.0, 5.0]


def test_initialize_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for v in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
              "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    assert sharding.initialize_from_env() is False  # single process: nothing to start
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES"):
        sharding.initialize_from_env()


def test_experiments_init_devices_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from experiments import common

    for v in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(v, raising=False)
    info = common.init_devices(verbose=False)
    assert info["distributed"] is False and info["process_count"] == 1
    assert info["device_count"] == jax.device_count() and info["platform"] == jax.default_backend()
    assert common.init_devices(verbose=False) == info  # safe to call twice


STABILITY_SCRIPT = r"""
import json, os, tempfile
import jax
from experiments import gst, stability
from jaxprune import sharding

assert jax.device_count() == 4, jax.devices()
placed = {"sharded": set(), "sequential": set(), "sharded_sequential": set()}
_orig = sharding.map_seeds_sharded
def _recording(*a, **k):
    f = _orig(*a, **k)
    def g(*args):
        out = f(*args)
        placed["sharded"].add(len(jax.tree.leaves(out)[0].sharding.device_set))
        return out
    return g
gst.sharding.map_seeds_sharded = _recording
_wrap = gst.Runner.wrap
def _wrap_recording(self, states):
    out = _wrap(self, states)
    if isinstance(out, list):
        placed[self.strategy].add(len({d for s in out for d in jax.tree.leaves(s)[0].devices()}))
    return out
gst.Runner.wrap = _wrap_recording
out = {}
for strategy in ("vmap", "sharded", "sequential", "sharded_sequential", "sharded_batch2"):
    c = stability.get_config()
    c.quick = True
    c.train.seed_strategy = strategy.replace("_batch2", "")
    c.train.batch_shards = 2 if strategy.endswith("_batch2") else 1
    with tempfile.TemporaryDirectory() as d:
        runs = stability.run(c, d)["runs"]
        with open(os.path.join(d, "history.jsonl")) as f:
            hist = [json.loads(l) for l in f]
    out[strategy] = {"kept": [[r["config"], r["seed"], r["kept_conv3"], r["kept_conv4"]] for r in runs],
                     "loss": [e["train_loss"] for e in hist], "test": [e["t_post"] for e in hist]}
out["devices"] = {k: sorted(v) for k, v in placed.items()}
print("RESULT", json.dumps(out))
"""


def test_stability_sharded_over_devices_equals_one_device(on_4_devices) -> None:
    """experiments/stability.py (gst.Runner) on 4 fake devices; its 10 runs split over 2 devices (the
    largest divisor of 10 that fits; with batch_shards = 2, 2 runs x 2 batch shards). "sharded_sequential" (the same single-run programs on two
    devices) equals "sequential" exactly. "sharded" (vmap per device) equals one-device "vmap" up
    to float reassociation: losses to 1e-5, test accuracy within two of the 360 examples. The quick
    nets sit near chance with many near-ties, and the two sum differently: on a sharded seed axis
    the vmapped convs are batched matmuls, on one device one XLA conv per seed (models/layers.py,
    `batched_seed_convs`); jax 0.12 moved two cells by two examples, jax 0.10.2 none by more than
    one."""
    out = on_4_devices(STABILITY_SCRIPT, timeout=400)
    # "sharded" outputs span 2 devices, and 4 with batch_shards = 2 (2 run rows x 2 batch devices).
    assert out["devices"] == {"sharded": [2, 4], "sequential": [1], "sharded_sequential": [2]}
    assert out["sharded_sequential"] == out["sequential"]
    ref, got = out["vmap"], out["sharded"]
    assert got["kept"] == ref["kept"] and len(ref["kept"]) == 10
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5)
    assert np.asarray(ref["loss"]).shape == (4, 10)  # 4 epochs x 10 runs
    np.testing.assert_allclose(got["test"], ref["test"], atol=2.01 / 360)
    # Each run's batch also split over 2 devices (a (2 runs, 2 batch) mesh): the gradient and BN
    # moments are all-reduced. Losses as "sharded"; the quick nets sit near chance (10-18 % test
    # accuracy, many near-ties), and one cell moved by two of the 360 examples here.
    got = out["sharded_batch2"]
    assert got["kept"] == ref["kept"]
    np.testing.assert_allclose(got["loss"], ref["loss"], atol=1e-5)
    np.testing.assert_allclose(got["test"], ref["test"], atol=2.01 / 360)


PAC_BAYES_SCRIPT = r"""
import json, sys, tempfile
import jax
from experiments import pac_bayes
from jaxprune import sharding, train

assert jax.device_count() == 4, jax.devices()
devices, names = [], []
_orig = sharding.map_seeds_sharded
def _recording(*a, **k):
    f = _orig(*a, **k)
    def g(*args):
        out = f(*args)
        devices.append(len(jax.tree.leaves(out)[0].sharding.device_set))
        names.append(getattr(getattr(a[0], "func", a[0]), "__name__", "?"))
        return out
    return g
sharding.map_seeds_sharded = _recording
split = set()  # functions whose batches were split over the "batch" mesh axis
_constrain = train.constrain_batch
def _constrain_recording(x):
    y = _constrain(x)
    if y is not x:  # recorded: the scanned body that took the minibatch (train.minibatch's caller)
        f = sys._getframe(1)
        split.add((f.f_back if f.f_code.co_name == "minibatch" else f).f_code.co_qualname)
    return y
train.constrain_batch = _constrain_recording
out = {}
for strategy in ("vmap", "sharded", "sharded_batch2"):
    c = pac_bayes.get_config()
    c.quick = True
    c.train.seed_strategy = strategy.replace("_batch2", "")
    c.train.batch_shards = 2 if strategy.endswith("_batch2") else 1
    with tempfile.TemporaryDirectory() as d:
        r = pac_bayes.run(c, d)["results"][0]
    out[strategy] = {k: r[k] for k in ("certificate", "kl", "mc_risk", "stochastic_test_error",
                                       "threshold_test_error", "final_objective", "selected_grid")}
out["devices"], out["names"], out["split"] = devices, names, sorted(split)
print("RESULT", json.dumps(out))
"""


def test_pac_bayes_sharded_over_devices_equals_one_device(on_4_devices) -> None:
    """experiments/pac_bayes.py quick preset (2 seeds) on 4 fake devices: prior training, PFT, the
    bound optimisation, KL, the Monte Carlo certificate and the test errors all run seed-sharded
    (2 devices, one seed each: every mapped call is recorded) and give the one-device "vmap"
    certificates (bitwise here); with batch_shards = 2 the dense, PFT and bound-optimisation
    minibatches are also split."""
    out = on_4_devices(PAC_BAYES_SCRIPT, timeout=300)
    assert set(out["devices"]) == {2, 4}  # 4: outputs of the batch-sharded dense and PFT epochs
    # Prior training and PFT, then the bound optimisation, the Monte Carlo certificate and the test
    # errors: every seed-mapped stage went through the mesh.
    assert {"train_epoch", "init", "fit_bound", "per_example_errors", "sampled_errors",
            "threshold_error"} <= set(out["names"]), out["names"]
    ref, got = out["vmap"], out["sharded"]
    assert got["selected_grid"] == ref["selected_grid"]
    # Bitwise equal on the hosts we ran it on; the tolerance (about two of the ~900 bound-set
    # examples) leaves room for a float reassociation that flips a near-tie prediction elsewhere.
    for k in ("certificate", "kl", "mc_risk", "stochastic_test_error", "threshold_test_error",
              "final_objective"):
        np.testing.assert_allclose(got[k], ref[k], atol=2.5e-3, err_msg=k)
    assert len(ref["certificate"]) == 2 and all(0 < v <= 1 for v in out["vmap"]["certificate"])
    # Dense, PFT and bound-fit minibatches also split over 2 devices per seed (the rest as
    # "sharded"). Measured: certificates within 4.4e-11, KL within 1.5e-8, error rates identical.
    assert out["split"] == ["fit.<locals>.body", "train_chunk.<locals>.body",
                            "train_epoch.<locals>.body"], out["split"]
    got = out["sharded_batch2"]
    assert got["selected_grid"] == ref["selected_grid"]
    for k in ("certificate", "kl", "mc_risk", "stochastic_test_error", "threshold_test_error",
              "final_objective"):
        np.testing.assert_allclose(got[k], ref[k], atol=2.5e-3, err_msg=k)


FLATNESS_SCRIPT = r"""
import json, os, tempfile
import jax
from ml_collections import config_dict
from experiments import flatness, stability

assert jax.device_count() == 4, jax.devices()
c = stability.get_config()  # tests/flatness_experiment_test.py's tiny study: 6 runs
c.num_seeds = 2
c.data.update(name="digits", num_train=256, num_test=0, downsample=1, fallback="")
c.model.kwargs = config_dict.create(channels=(4, 4), dense=8, batch_norm=True, pool_impl="xla")
c.layers.update(names="conv2", fractions="0.5", starts="0", ends="1")
c.targets, c.periods = "S,L", "1"
c.train.update(epochs=2, batch_size=128, lr_milestones="", checkpoint_every=2, learning_rate=1e-2)
jax.config.update("jax_disable_most_optimizations", True)
out = {"assign": {str(d.id): r for d, r in flatness.assign_runs(list(range(6))).items()}}
with tempfile.TemporaryDirectory() as d:
    stability.run(c, os.path.join(d, "stab"))
    for split in ("none", "all", "auto"):
        f = flatness.get_config()
        f.quick, f.split_runs, f.stability_workdir = True, split, os.path.join(d, "stab")
        wd = os.path.join(d, str(split))
        out["placement_" + str(split)] = flatness.run(f, wd)["placement"]
        with open(os.path.join(wd, "measures.jsonl")) as fh:
            out[str(split)] = fh.read()
print("RESULT", json.dumps(out))
"""


def test_flatness_runs_split_over_devices_equal_one_device(on_4_devices) -> None:
    """experiments/flatness.py quick preset on a 6-run stability study, 4 fake devices: runs 0-5 go
    to devices 0, 1, 2, 3, 0, 1 (one thread each) and measures.jsonl is byte-identical to measuring
    every run on one device (same single-run programs, same keys)."""
    out = on_4_devices(FLATNESS_SCRIPT, timeout=400)
    assert sorted(out["assign"].values()) == [[0, 4], [1, 5], [2], [3]]
    assert len(set(out["placement_all"].values())) == 4
    # "auto" does not split over the CPU devices of one process (slower on 2 cores, README).
    assert len(set(out["placement_none"].values())) == len(set(out["placement_auto"].values())) == 1
    assert len(out["all"].splitlines()) == 6
    assert out["all"] == out["none"] == out["auto"]


MULTIPROCESS_SCRIPT = r"""
import json, os, sys
import jax
from experiments import common, flatness, pac_bayes, pft, prune_baselines, stability
from jaxprune import sharding, train

info = common.init_devices(verbose=False)  # jax.distributed from JAX_COORDINATOR_ADDRESS etc.
info["auto_cnn"] = train.default_strategy("small_cnn")
try:  # one seed cannot be split over two processes
    sharding.seed_mesh(1)
except ValueError as e:
    info["one_seed"] = str(e)
root, strategy = sys.argv[1], sys.argv[2]
# study -> (devices, devices of this process, came in seed-sharded) of each seed-sharded input
placed, study = {}, [""]
_shard = sharding.shard_seeds
def _recording(tree, mesh):
    out = _shard(tree, mesh)
    for a, b in list(zip(jax.tree.leaves(tree), jax.tree.leaves(out)))[:1]:
        placed.setdefault(study[0], set()).add(
            (len(b.sharding.device_set), len(b.addressable_shards), a is b))
    return out
sharding.shard_seeds = _recording
out = {"info": info}
study[0] = "prune_baselines"
c = prune_baselines.get_config()
c.quick, c.train.seed_strategy = True, strategy
out["prune_baselines"] = prune_baselines.run(c, os.path.join(root, "prune_baselines"))["results"]
if strategy == "sharded":  # each seed's batches also split over 2 devices, one in each process
    study[0] = "prune_baselines_batch2"
    c.train.batch_shards = 2
    out[study[0]] = prune_baselines.run(c, os.path.join(root, study[0]))["results"]
def run_stability(name, seed_strategy):
    study[0] = name
    c = stability.get_config()
    c.quick, c.train.seed_strategy = True, seed_strategy
    runs = stability.run(c, os.path.join(root, name))["runs"]
    with open(os.path.join(root, name, "history.jsonl")) as f:
        hist = [json.loads(l) for l in f]
    out[name] = {"kept": [[r["config"], r["seed"], r["kept_conv3"], r["kept_conv4"]] for r in runs],
                 "loss": [e["train_loss"] for e in hist], "test": [e["t_post"] for e in hist]}
run_stability("stability", strategy)
# Each process runs its own devices' runs one after another (the CPU choice for conv nets);
# against "sequential" in the one-process reference.
run_stability("stability_listed", "sharded_sequential" if strategy == "sharded" else "sequential")
study[0] = "pac_bayes"
c = pac_bayes.get_config()
c.quick, c.train.seed_strategy = True, strategy
r = pac_bayes.run(c, os.path.join(root, "pac_bayes"))["results"][0]
out["pac_bayes"] = {k: v for k, v in r.items() if not k.endswith("_seconds")}
# pft twice in one workdir: the second run resumes from every checkpoint (dense, fine-tuning, PFT).
for study[0] in ("pft", "pft_resumed"):
    c = pft.get_config()
    c.quick, c.train.seed_strategy = True, strategy
    out[study[0]] = pft.run(c, os.path.join(root, "pft"))["results"]
out["placed"] = {k: sorted(v) for k, v in placed.items()}
# flatness of stability runs 0-1: "auto" splits them over the devices of both processes (hosts
# interleaved: one run each) and exchanges the rows through the workdir; "none" measures both runs
# in every process. (Fast compiles, as in the tests; the xla pool is safe there.)
jax.config.update("jax_disable_most_optimizations", True)
for split in ("auto", "none"):
    f = flatness.get_config()
    f.quick, f.runs, f.split_runs = True, "0,1", split
    f.stability_workdir = os.path.join(root, "stability")
    r = flatness.run(f, os.path.join(root, "flatness_" + split))
    out["flatness_" + split], out["placement_" + split] = r["measures"], r["placement"]
print("RESULT", json.dumps(out))
"""


def test_two_processes_equal_one_process(tmp_path) -> None:
    """The multi-host path on one machine: two processes x 2 fake CPU devices joined by
    `jax.distributed` (loopback coordinator, `common.init_devices`), one shared workdir, seeds
    "sharded" over the 4 global devices (hosts interleaved, so 2 seeds use one device of each
    process); prune_baselines (2 seeds; again with 2 batch shards, all 4 devices), stability (10
    runs; again "sharded_sequential", against "sequential"), pac_bayes (2 seeds) and pft (2 seeds,
    then resumed from its checkpoints) quick presets,
    then flatness of two stability runs split over the processes. Both processes return the same
    rows, and they equal one process with one device and "vmap" (the tolerances of the 4-device
    tests above); the training loops keep their states seed-sharded; only process 0 draws the
    training progress bars."""
    base = {k: v for k, v in os.environ.items() if k not in launch.CLUSTER_VARIABLES}
    base["JAX_PLATFORMS"] = "cpu"
    envs = launch.child_envs(2, launch.free_port(),
                             {**base, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"})
    cmd = [sys.executable, "-c", MULTIPROCESS_SCRIPT]
    procs = [subprocess.Popen(cmd + [str(tmp_path / "shared"), "sharded"], env=envs[i],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    procs.append(subprocess.Popen(cmd + [str(tmp_path / "ref"), "vmap"], env=base,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs, bars = [], []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=600)
            assert p.returncode == 0, stderr[-3000:]
            line = next(l for l in stdout.splitlines() if l.startswith("RESULT "))
            outs.append(json.loads(line[len("RESULT "):]))
            # Progress bars drawn, by first word (flatness draws one per process: each measures
            # its own runs).
            lines = stderr.replace("\r", "\n").splitlines()
            bars.append({b.split(":")[0].split(" ")[0] for b in lines if "%|" in b})
    finally:
        for p in procs:
            p.kill()
    p0, p1, ref = outs
    # One set of training bars per job: process 0 draws them, process 1 only its flatness bar.
    assert bars[0] == bars[2] and {"dense", "stability", "pft", "flatness"} <= bars[0], bars
    assert bars[1] == {"flatness"}, bars
    assert [p0["info"]["process_index"], p1["info"]["process_index"]] == [0, 1]
    for o in (p0, p1):
        assert o["info"]["process_count"] == 2 and o["info"]["device_count"] == 4
        assert o["info"]["local_device_count"] == 2 and o["info"]["distributed"]
        assert o["info"]["auto_cnn"] == "sharded_sequential"  # conv nets on CPU devices
        assert "use at least one seed per process" in o["info"]["one_seed"]
    assert ref["info"]["process_count"] == 1 and ref["info"]["device_count"] == 1
    # 2 seeds (and 10 runs: 2 devices, 5 each) on a 2-device mesh, one device in each process.
    # The training loops (train.fit's epochs, PFT chunks, the stability steps) get their states
    # back seed-sharded (returns_state: the True entries): no process gathers every seed's state
    # at every epoch or step. With batch_shards = 2 the epochs' states span all 4 devices (first
    # placed from the host, then fed back), and the evaluation on 2 devices gathers them first.
    sharded = [[2, 1, False], [2, 1, True]]
    assert p0["placed"] == p1["placed"] == {
        "prune_baselines": sharded, "stability": sharded, "pac_bayes": sharded, "pft": sharded,
        "prune_baselines_batch2": [[2, 1, False], [4, 2, False], [4, 2, True]],
        "stability_listed": [[2, 1, False]],  # the initial states; then one run per call
        "pft_resumed": [[2, 1, False]]}, p0["placed"]  # resumed: no epoch or chunk left to run
    assert ref["placed"] == {}
    # Every process reads the same (replicated or exchanged) results and writes the same files.
    studies = ("prune_baselines", "prune_baselines_batch2", "stability", "stability_listed",
               "pac_bayes", "pft", "flatness_auto", "flatness_none")
    assert {k: p0[k] for k in studies} == {k: p1[k] for k in studies}
    ref_rows = ref["prune_baselines"]
    for name, atol in (("prune_baselines", 1.01 / 360), ("prune_baselines_batch2", 2.01 / 360)):
        rows = p0[name]
        assert len(rows) == len(ref_rows) == 12
        for a, b in zip(rows, ref_rows):
            assert [a[k] for k in ("pruner", "sparsity", "stage")] == [
                b[k] for k in ("pruner", "sparsity", "stage")]
            assert len(a["test_error"]) == 2
            np.testing.assert_allclose(a["test_error"], b["test_error"], atol=atol, err_msg=name)
    for name in ("stability", "stability_listed"):
        got, want = p0[name], ref[name]
        assert got["kept"] == want["kept"] and len(want["kept"]) == 10
        np.testing.assert_allclose(got["loss"], want["loss"], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(got["test"], want["test"], atol=2.01 / 360, err_msg=name)
    got, want = p0["pac_bayes"], ref["pac_bayes"]
    assert got["selected_grid"] == want["selected_grid"]
    for k in ("certificate", "kl", "mc_risk", "stochastic_test_error", "threshold_test_error",
              "final_objective"):
        np.testing.assert_allclose(got[k], want[k], atol=2.5e-3, err_msg=k)
    # pft, fresh and resumed from its checkpoints (the resume crashed in a gloo collective before
    # train._manager waited for the state: orbax's process sync crossed a seed-mapped call's
    # all-gather still in flight).
    assert p0["pft_resumed"] == p0["pft"] and ref["pft_resumed"] == ref["pft"]
    assert len(p0["pft"]) == len(ref["pft"]) == 20
    for a, b in zip(p0["pft"], ref["pft"]):
        assert [a[k] for k in ("pruner", "sparsity", "method")] == [
            b[k] for k in ("pruner", "sparsity", "method")]
        np.testing.assert_allclose(a["test_error"], b["test_error"], atol=1.01 / 360)
        assert ("expected_density" in a) == ("expected_density" in b)  # PFT rows only
        np.testing.assert_allclose(a.get("expected_density", 0), b.get("expected_density", 0),
                                   atol=1e-5)
    # flatness: each process measured one of the two runs (placement: run -> device id, this
    # process only) and both got both rows, equal to measuring both on one device ("none"; the
    # one-process rows differ in the last digits because the stability states do).
    assert list(p0["placement_auto"]) == ["0"] and list(p1["placement_auto"]) == ["1"]
    assert list(p1["placement_none"]) == ["0", "1"] and list(ref["placement_auto"]) == ["0", "1"]
    assert [r["index"] for r in p0["flatness_auto"]] == [0, 1]
    assert p0["flatness_auto"] == p0["flatness_none"]
