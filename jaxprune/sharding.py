"""Seeds (and optionally batches) sharded over devices and hosts with `jax.sharding`.

Many-seed training is `jit(vmap(fn))` over a leading seed axis S (train.map_seeds). Sharding that axis
over a 1-D device mesh ("seeds") splits the S seeds into d = #devices groups of S/d, one per device;
each device runs the same vmapped program on its group, with no communication (seeds are
independent), so results equal the single-device run up to float reassociation (in practice bitwise
on CPU). Arguments without a seed axis (data, config arrays) are replicated.

A 2-D mesh ("seeds", "batch") also splits each seed's batch over devices (data parallelism inside a
seed, `map_seeds_sharded(..., batch_shards=k)`: every batch marked with `train.constrain_batch`, as
in `train.train_epoch`, is split and XLA inserts the all-reduces of the gradient and of BatchNorm's
batch moments); use it when S < #devices.

Multi-host: call `initialize_from_env()` first on every process (it wraps
`jax.distributed.initialize`; experiments do it through `experiments.common.init_devices`), run the
same program everywhere; `jax.devices()` then lists every host's devices and the mesh spans them,
hosts interleaved so that S seeds on fewer devices still use every host. Host-side inputs must be
the same on every process (they are: keys come from one integer seed). `map_seeds_sharded` returns
replicated outputs there, so host code can read them with numpy (except a fed-back state with
`returns_state=True`, which stays sharded: the loops of `train.fit`, `pft.fit` and
experiments/gst.py replicate it once, when they return, with `readable`); `to_host` gathers other
sharded arrays. Tested with 2 processes x 2 CPU devices on one machine (prune_baselines, stability,
pac_bayes, pft, fresh and resumed, and flatness quick presets give the single-process numbers,
tests/sharding_test.py); not yet on real hosts. The workdir must be shared by all processes
(orbax's checkpoints wait for process 0's directories).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprune import train
from jaxprune.models import layers

PyTree = Any

SEEDS = "seeds"
BATCH = train.BATCH_AXIS


def initialize_from_env() -> bool:
    """Starts JAX's multi-host runtime if the environment describes a cluster; True if started.

    * JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES, JAX_PROCESS_ID: explicit.
    * SLURM (SLURM_NTASKS > 1) or Open MPI (OMPI_COMM_WORLD_SIZE > 1): JAX detects
      coordinator, process count and id itself (`jax.distributed.initialize()` without arguments).
    * Otherwise (one process): does nothing. Call before any other JAX call.
    """
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]),
            process_id=int(env["JAX_PROCESS_ID"]),
        )
        return True
    if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        jax.distributed.initialize()
        return True
    return False


def seed_mesh(num_seeds: int | None = None, batch_shards: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("seeds", "batch") mesh of shape (d_s, batch_shards) over `devices` (default: all).

    With `num_seeds`, d_s is the largest count with d_s * batch_shards <= #devices dividing num_seeds,
    so any S works (S = 6 on 4 devices uses 3 of them, two seeds each); otherwise all devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if jax.process_count() > 1:  # interleave hosts, so a prefix of the devices spans every host
        local_rank: dict[jax.Device, int] = {}
        per_host: dict[int, int] = {}
        for dev in devices:
            local_rank[dev] = per_host.get(dev.process_index, 0)
            per_host[dev.process_index] = local_rank[dev] + 1
        devices.sort(key=lambda dev: (local_rank[dev], dev.process_index))
    if batch_shards < 1 or len(devices) % batch_shards:
        raise ValueError(f"batch_shards={batch_shards} must divide the {len(devices)} devices")
    d = len(devices) // batch_shards
    if num_seeds is not None:
        if num_seeds < 1:
            raise ValueError(f"num_seeds={num_seeds} must be >= 1")
        d = max(k for k in range(1, d + 1) if num_seeds % k == 0)
    grid = np.asarray(devices[: d * batch_shards], dtype=object).reshape(d, batch_shards)
    if len({dev.process_index for dev in grid.ravel()}) < jax.process_count():
        # A process without a device in the mesh could neither compute nor read its results.
        raise ValueError(f"{num_seeds} seeds x {batch_shards} batch shards leave some of the "
                         f"{jax.process_count()} processes without a device; use at least one "
                         f"seed per process (a multiple of {jax.process_count()})")
    return Mesh(grid, (SEEDS, BATCH))


def _put(leaf: Any, sharding: NamedSharding) -> jax.Array:
    if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
        return leaf
    if jax.process_count() == 1:
        return jax.device_put(leaf, sharding)
    # Multi-host: every process holds the same full host value; each fills its own shards.
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(_put(jax.random.key_data(leaf), sharding))
    # A state another mesh left seed-sharded over the processes (returns_state with batch_shards
    # > 1 feeding a call without) is gathered first: no process holds it whole.
    host = np.asarray(readable(leaf))
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx],
                                        dtype=host.dtype)


def shard_seeds(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf with its leading (seed) axis split over the mesh's "seeds" axis."""
    return jax.tree.map(lambda v: _put(v, NamedSharding(mesh, P(SEEDS))), tree)


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Places every leaf whole on every device of the mesh."""
    return jax.tree.map(lambda v: _put(v, NamedSharding(mesh, P())), tree)


def gather(tree: PyTree, mesh: Mesh) -> PyTree:
    """Seed-sharded (possibly multi-host) arrays replicated on every device of the mesh by one
    compiled all-gather, so that every process can read them (unlike `replicate`, which starts
    from host values)."""
    return _replicator(mesh)(tree)


@functools.lru_cache(maxsize=64)
def _replicator(mesh: Mesh) -> Callable[[PyTree], PyTree]:
    # One jitted identity per mesh: a fresh lambda per call was traced and lowered again every
    # time (16 ms per `readable` of one array on two processes, 3.8 ms with this cache).
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, P()))


def _split(v: Any) -> bool:
    """True for an array whose shards live on several processes and differ (not replicated)."""
    return isinstance(v, jax.Array) and not (v.is_fully_addressable or v.is_fully_replicated)


def readable(tree: PyTree) -> PyTree:
    """`tree` with arrays that span several processes replicated (one compiled all-gather over
    their mesh: they come from one call), so every process can read them; as it is when every
    array is fully addressable (one process) or already replicated."""
    split = [v for v in jax.tree.leaves(tree) if _split(v)]
    return gather(tree, split[0].sharding.mesh) if split else tree


def local_block(leaf: jax.Array, device: jax.Device) -> jax.Array:
    """The part of a placed array that lives on `device` (a seed block, or a whole replica)."""
    for shard in leaf.addressable_shards:
        if shard.device == device:
            return shard.data
    raise ValueError(f"no shard of this array lives on {device}")


def local_mesh_devices(mesh: Mesh) -> list[jax.Device]:
    """This process's devices in the mesh's first "batch" column (all its seed-axis devices when
    there are no batch shards, as for the listed strategies), in mesh order."""
    return [d for d in mesh.devices[:, 0] if d.process_index == jax.process_index()]


def from_blocks(blocks: Sequence[PyTree], mesh: Mesh) -> PyTree:
    """One seed-sharded pytree from this process's per-device seed blocks (pytrees of equal
    shapes, each on its device), in the order of `local_mesh_devices(mesh)`; on several
    processes the others hold the rest. Meshes without batch shards only."""
    if mesh.shape[BATCH] != 1:
        # With batch shards a seed block spans a row of devices, which may belong to several
        # processes: one block per seed-axis device would place half of each row.
        raise ValueError(f"from_blocks takes a mesh without batch shards, got mesh shape "
                         f"{dict(mesh.shape)} (batch_shards > 1 is for the 'sharded' strategy)")

    def one(*leaves: jax.Array) -> jax.Array:
        shape = (leaves[0].shape[0] * mesh.shape[SEEDS], *leaves[0].shape[1:])
        return jax.make_array_from_single_device_arrays(shape, NamedSharding(mesh, P(SEEDS)),
                                                        list(leaves))

    return jax.tree.map(one, *blocks)


def to_host(tree: PyTree) -> PyTree:
    """numpy copies of (possibly multi-host) sharded arrays, gathered on every process; typed PRNG
    keys come back as their raw key data (`jax.random.key_data`), which numpy can hold."""
    tree = jax.tree.map(lambda v: jax.random.key_data(v) if isinstance(v, jax.Array)
                        and jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) else v, tree)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)


def _batched_seed_convs(fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn traced under `layers.batched_seed_convs`: no per-seed convs on a sharded seed axis."""

    @functools.wraps(fn)
    def traced(*args: Any) -> Any:
        with layers.batched_seed_convs():
            return fn(*args)

    return traced


def map_seeds_sharded(
    fn: Callable[..., Any],
    in_axes: Sequence[int | None],
    batch_shards: int = 1,
    devices: Sequence[jax.Device] | None = None,
    returns_state: bool = False,
    gather_outputs: bool = True,
) -> Callable[..., Any]:
    """`jit(vmap(fn))` with the seed axis of in_axes-0 arguments (and all outputs) sharded.

    Arguments with in_axes None are replicated. On several processes (multi-host) the outputs are
    replicated rather than seed-sharded (one all-gather per call), so host code reads them as on one
    host; with `returns_state` (fn returns (state, aux), and the state is fed back in) only aux is
    replicated and the state stays seed-sharded, so a loop of calls does not gather every seed's
    state onto every host at every step. `gather_outputs=False` leaves the outputs seed-sharded
    on several processes too, for a caller that gathers many calls' outputs at once (`readable`):
    every gather is a collective that waits for all processes. With `batch_shards` > 1 each
    seed's batch is split over the "batch" mesh axis wherever `fn` marks it with
    `train.constrain_batch` (`train.train_epoch` does, for every step's batch): `fn` is traced
    under the mesh (`jax.set_mesh`) and vmapped with `spmd_axis_name="seeds"`, so such a
    constraint composes with the seed sharding. Compiles once per mesh (i.e. per S modulo the
    device count).
    """
    in_axes = tuple(in_axes)
    if any(ax not in (0, None) for ax in in_axes):
        raise ValueError(f"in_axes must be 0 or None, got {in_axes}")
    compiled: dict[int, Callable[..., Any]] = {}

    def run(*args: Any) -> Any:
        mesh = seed_mesh(train.seed_count(args, in_axes), batch_shards, devices)
        placed = [shard_seeds(a, mesh) if ax == 0 else replicate(a, mesh) for a, ax in zip(args, in_axes)]
        n = mesh.shape[SEEDS]
        if n not in compiled:
            # Multi-host: outputs are gathered onto every device (one all-gather per call), so
            # every process can read them with numpy and feed them back in; a returned state
            # (returns_state) stays seed-sharded, since it only goes back in.
            gathered = gather_outputs and jax.process_count() > 1
            out = NamedSharding(mesh, P() if gathered else P(SEEDS))
            if returns_state:
                out = (NamedSharding(mesh, P(SEEDS)), out)
            compiled[n] = jax.jit(jax.vmap(_batched_seed_convs(fn), in_axes=in_axes,
                                           spmd_axis_name=SEEDS), out_shardings=out)
        with jax.set_mesh(mesh):  # the mesh that train.constrain_batch sees while tracing
            return compiled[n](*placed)

    return run
