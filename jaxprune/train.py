"""Masked training of many seeds at once.

Write init and step for ONE seed; `map_seeds` runs S seeds either as one vmapped program or as S
calls of one compiled single-seed program (`strategy="sequential"`), or either of them with the
seeds split over devices ("sharded", "sharded_sequential"): all give the same numbers up to float
reassociation. XLA on CPU runs a vmapped convolution 4-5x slower than the seeds one after another
(shared/ENV.md), and even as batched matmuls (conv_impl "shifts": 0.75-0.98x of separate runs on 2
cores) or as one conv per seed ("canonical": 0.89-1.07x of "sequential") vmapped conv seeds are
no faster than sequential ones here (README, "Speed and scale"), so `default_strategy` picks
sequential for conv nets on CPU and vmap elsewhere.

Masked weights stay exactly zero: the gradient is masked and the mask re-applied after every update.
`fit` is the host loop: an epoch is one jitted `lax.scan` over batches; between epochs it evaluates,
shows progress, and checkpoints with orbax, so a killed run restarted with the same arguments resumes
and ends bit-identical to an uninterrupted one (each epoch's data order is a function of the run key
and the epoch number only).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxprune import data as data_lib
from jaxprune import masks

PyTree = Any


class TrainState(struct.PyTreeNode):
    """One seed's training state; with a leading seed axis S on every leaf for many seeds.

    `key` holds raw key data (`jax.random.key_data`, uint32) so orbax and vmap need nothing special;
    `jax.random.wrap_key_data(state.key)` gives the typed key.
    """

    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    mask: PyTree
    step: jax.Array
    key: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "adam"  # "adam", "adamw" or "sgd"
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0  # adamw only (decoupled)
    batch_size: int = 128
    epochs: int = 10
    steps_per_epoch: int = 0  # 0: num_train // batch_size
    eval_batch_size: int = 1000
    seed_strategy: str = "auto"  # "auto" or one of STRATEGIES ("sharded*": several devices)
    batch_shards: int = 1  # "sharded" only: split each seed's training batch over this many devices
    checkpoint_every: int = 1  # epochs; 0 disables checkpoints

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        d = dict(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown train config fields {sorted(unknown)}; known: {sorted(names)}")
        return cls(**d)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    if cfg.weight_decay and cfg.optimizer != "adamw":  # it would be ignored, silently
        raise ValueError(f"weight_decay={cfg.weight_decay} applies to optimizer 'adamw' only, "
                         f"got optimizer={cfg.optimizer!r}")
    if cfg.optimizer == "adam":
        return optax.adam(cfg.learning_rate)
    if cfg.optimizer == "adamw":
        return optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return optax.sgd(cfg.learning_rate, momentum=cfg.momentum or None)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}; known: adam, adamw, sgd")


def init_variables(key: jax.Array, model: nn.Module, sample_x: jax.Array) -> tuple[PyTree, PyTree]:
    """(params, batch_stats) of a fresh model; batch_stats is {} for models without BatchNorm."""
    variables = model.init(key, sample_x, train=False)
    return variables["params"], variables.get("batch_stats", {})


def init_state(
    key: jax.Array,
    model: nn.Module,
    sample_x: jax.Array,
    tx: optax.GradientTransformation,
    mask: PyTree | None = None,
) -> TrainState:
    params_key, state_key = jax.random.split(key)
    params, batch_stats = init_variables(params_key, model, sample_x)
    return state_from_params(state_key, params, batch_stats, tx, mask)


def state_from_params(
    key: jax.Array,
    params: PyTree,
    batch_stats: PyTree,
    tx: optax.GradientTransformation,
    mask: PyTree | None = None,
) -> TrainState:
    """A fresh optimiser on given (e.g. trained, then pruned) params; pruned weights are zeroed."""
    mask = masks.ones_like(params) if mask is None else mask
    params = masks.apply(params, mask)
    return TrainState(
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        mask=mask,
        step=jnp.zeros((), jnp.int32),
        key=jax.random.key_data(key),
    )


def forward(
    model: nn.Module, params: PyTree, batch_stats: PyTree, mask: PyTree | None, x: jax.Array, train: bool
) -> tuple[jax.Array, PyTree]:
    """Logits of the masked network m * w and the updated BatchNorm statistics (train mode)."""
    p = params if mask is None else masks.apply(params, mask)
    variables = {"params": p}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    if train and batch_stats:
        logits, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        return logits, updates["batch_stats"]
    return model.apply(variables, x, train=train), batch_stats


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def error_rate(logits: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, -1) != y)


def train_step(
    state: TrainState, x: jax.Array, y: jax.Array, *, model: nn.Module, tx: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimiser step on the masked network; the gradient is masked and the mask re-applied."""

    def loss_fn(params):
        logits, bs = forward(model, params, state.batch_stats, state.mask, x, train=True)
        return cross_entropy(logits, y), (logits, bs)

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = masks.apply(grads, state.mask)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = masks.apply(optax.apply_updates(state.params, updates), state.mask)
    new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state, step=state.step + 1)
    return new, {"loss": loss, "error": error_rate(logits, y)}


BATCH_AXIS = "batch"  # the mesh axis that splits one seed's batch (jaxprune.sharding.BATCH)


def constrain_batch(x: jax.Array) -> jax.Array:
    """x split along its leading (example) axis over the "batch" mesh axis when traced under a mesh
    where that axis has size > 1 (`sharding.map_seeds_sharded` with batch_shards > 1): data
    parallelism inside a seed, XLA all-reduces the gradient and BatchNorm's batch moments. The
    identity otherwise, so single-device programs are unchanged."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or BATCH_AXIS not in mesh.axis_names or mesh.shape[BATCH_AXIS] == 1:
        return x
    return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(BATCH_AXIS))


def progress_bar(iterable: Any, *, disable: bool = False, **kwargs: Any) -> Any:
    """tqdm over `iterable`, drawn by process 0 only: on several processes (multi-host) a job shows
    one bar, not one per process."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=disable or jax.process_index() > 0, **kwargs)


def minibatch(x: jax.Array, y: jax.Array, idx: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(x[idx], y[idx]), each marked with `constrain_batch`: the minibatch every scanned training
    body takes, split over the "batch" mesh axis when there is one."""
    return constrain_batch(x[idx]), constrain_batch(y[idx])


def train_epoch(
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    batch_size: int,
    steps: int,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """`steps` masked steps in one scan; batch order is a function of `key` only."""
    idx = data_lib.batch_indices(key, x.shape[0], batch_size, steps)

    def body(s, idx_b):
        return train_step(s, *minibatch(x, y, idx_b), model=model, tx=tx)

    return jax.lax.scan(body, state, idx)


def predict(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    mask: PyTree | None,
    x: jax.Array,
    batch_size: int = 1000,
) -> jax.Array:
    """Eval-mode logits of m * w on all of x, in batches (scan), for any number of examples."""
    n = x.shape[0]
    b = min(batch_size, n)
    nb = -(-n // b)
    pad = nb * b - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x

    def body(_, xb):
        return None, forward(model, params, batch_stats, mask, xb, train=False)[0]

    _, logits = jax.lax.scan(body, None, xp.reshape((nb, b) + x.shape[1:]))
    return logits.reshape((nb * b,) + logits.shape[2:])[:n]


def evaluate(
    state: TrainState, x: jax.Array, y: jax.Array, *, model: nn.Module, batch_size: int = 1000
) -> dict[str, jax.Array]:
    logits = predict(model, state.params, state.batch_stats, state.mask, x, batch_size)
    return {"loss": cross_entropy(logits, y), "error": error_rate(logits, y)}


# ----------------------------------------------------------------------------- many seeds

STRATEGIES = ("vmap", "sequential", "sharded", "sharded_sequential")
CONV_FREE_MODELS = ("mlp", "lenet300_100")


def default_strategy(model_name: str, backend: str | None = None) -> str:
    """vmap, except conv nets on CPU, where vmapped seeds run at 0.75-0.97x of separate runs (even as
    batched matmuls, README "Speed and scale") and "sequential" is used. On several devices the
    seed axis is split over them: "sharded" (vmap per device), or for conv nets on CPU devices (a
    host split into devices, or CPU processes) "sharded_sequential" (0.95-1.24x of one device on 2
    cores, gaining only where one seed leaves a core idle; vmap per device gave 0.88-1.07x)."""
    backend = backend or jax.default_backend()
    conv_cpu = backend == "cpu" and model_name not in CONV_FREE_MODELS
    if jax.device_count() > 1:
        return "sharded_sequential" if conv_cpu else "sharded"
    return "sequential" if conv_cpu else "vmap"


def resolve_strategy(strategy: str, model_name: str) -> str:
    if strategy == "auto":
        return default_strategy(model_name)
    if strategy not in STRATEGIES:
        raise ValueError(f"seed strategy must be 'auto' or one of {STRATEGIES}, got {strategy!r}")
    return strategy


def check_batch_shards(strategy: str, batch_shards: int) -> None:
    """ValueError unless batch_shards is 1 or the strategy is "sharded" (the only one with a batch
    mesh axis)."""
    if batch_shards != 1 and strategy != "sharded":
        raise ValueError(f"batch_shards={batch_shards} needs seed strategy 'sharded', got {strategy!r}")


def num_seeds(tree: PyTree) -> int:
    return int(jax.tree.leaves(tree)[0].shape[0])


def seed_count(args: Sequence[Any], in_axes: Sequence[int | None]) -> int:
    """S, the leading axis of the in_axes-0 arguments; ValueError on a wrong argument count or when
    nothing is mapped (checked before any tracing)."""
    if len(args) != len(in_axes):
        raise ValueError(f"expected {len(in_axes)} arguments, got {len(args)}")
    mapped = [a for a, ax in zip(args, in_axes) if ax == 0]
    if not mapped:
        raise ValueError("map_seeds needs at least one argument with in_axes 0")
    return num_seeds(mapped)


def seed_slice(args: Sequence[Any], in_axes: Sequence[int | None], i: Any) -> list[Any]:
    """Seed i of the arguments with in_axes 0 (the others as they are); `i` may be traced, so one
    compiled program serves every seed."""
    return [jax.tree.map(lambda v: v[i], a) if ax == 0 else a for a, ax in zip(args, in_axes)]


def _sequential_parts(fn: Callable[..., Any], in_axes: tuple[int | None, ...]):
    """(alloc, write): zeros shaped like the S-stacked outputs, and a donated update of row i.

    Seed i is sliced inside the compiled program and its outputs written into row i of the donated
    stacked outputs: one dispatch per seed, and compile time does not grow with S. (Slicing every
    leaf eagerly cost ~0.2 ms per leaf: 0.1-0.2 s per call for 4 small-CNN states, 40-70 % of their
    step; a jitted split/stack of all seeds compiled for 15-19 s at S = 56.)
    """

    @jax.jit
    def alloc(*args):
        # fn is only traced here (once per argument shapes and devices).
        out = jax.eval_shape(lambda *a: fn(*seed_slice(a, in_axes, 0)), *args)
        s = num_seeds([a for a, ax in zip(args, in_axes) if ax == 0])
        return jax.tree.map(lambda o: jnp.zeros((s, *o.shape), o.dtype), out)

    @functools.partial(jax.jit, donate_argnums=0)
    def write(acc, i, *args):
        return jax.tree.map(lambda a, o: a.at[i].set(o), acc, fn(*seed_slice(args, in_axes, i)))

    return alloc, write


def map_seeds(fn: Callable[..., Any], in_axes: Sequence[int | None], strategy: str,
              batch_shards: int = 1, returns_state: bool = False) -> Callable[..., Any]:
    """Run a single-seed `fn` on S seeds: arguments with in_axes 0 carry a leading seed axis.

    "vmap": one compiled program `jit(vmap(fn))`. "sequential": one compiled single-seed program called
    S times, outputs stacked. "sharded": `jit(vmap(fn))` with the seed axis split over all devices
    (and hosts), see `jaxprune.sharding`. "sharded_sequential": the seed axis split over the devices
    as in "sharded", each device running its S/d seeds as in "sequential"; dispatch is asynchronous
    and interleaved over devices, so the devices run concurrently (on several processes each runs
    the seeds of its own devices). Same numbers in every case. `batch_shards` > 1 ("sharded" only)
    also splits each seed's batch, where `fn` marks it with `constrain_batch`, over that many
    devices (`sharding.map_seeds_sharded`).
    On several processes the sharded strategies return replicated outputs, so every process can
    read them, except with `returns_state` (fn returns (state, aux) and the state is fed back in):
    the state stays seed-sharded instead of being gathered onto every process; read it with
    `sharding.readable` (one gather) when the loop is done.
    """
    in_axes = tuple(in_axes)
    check_batch_shards(strategy, batch_shards)
    if strategy == "vmap":
        return jax.jit(jax.vmap(fn, in_axes=in_axes))
    if strategy == "sharded":
        from jaxprune import sharding

        return sharding.map_seeds_sharded(fn, in_axes, batch_shards, returns_state=returns_state)
    if strategy not in ("sequential", "sharded_sequential"):
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    alloc, write = _sequential_parts(fn, in_axes)
    if strategy == "sharded_sequential":
        return _sharded_sequential(alloc, write, in_axes, returns_state)

    def run(*args):
        num = seed_count(args, in_axes)  # checks the arguments before tracing fn
        out = alloc(*args)
        for i in range(num):
            out = write(out, i, *args)
        return out

    return run


def _sharded_sequential(alloc, write, in_axes: tuple[int | None, ...],
                        returns_state: bool) -> Callable[..., Any]:
    from jaxprune import sharding

    def run(*args):
        num = seed_count(args, in_axes)
        mesh = sharding.seed_mesh(num)
        placed = [sharding.shard_seeds(a, mesh) if ax == 0 else sharding.replicate(a, mesh)
                  for a, ax in zip(args, in_axes)]
        devices = sharding.local_mesh_devices(mesh)
        # Each device's block of seeds (and its copy of the rest): views of the placed arrays.
        local = [jax.tree.map(lambda v, d=d: sharding.local_block(v, d), placed) for d in devices]
        outs = [alloc(*a) for a in local]
        for i in range(num // mesh.shape[sharding.SEEDS]):
            for k, a in enumerate(local):  # interleaved, so every device has work queued
                outs[k] = write(outs[k], i, *a)
        out = sharding.from_blocks(outs, mesh)
        # Several processes: readable outputs, as "sharded" gives (a fed-back state stays split).
        if returns_state:
            return out[0], sharding.readable(out[1])
        return sharding.readable(out)

    return run


def seed_keys(seed: int, num: int) -> jax.Array:
    """S independent typed keys from one integer seed."""
    return jax.random.split(jax.random.key(seed), num)


# ----------------------------------------------------------------------------- checkpoints


@functools.lru_cache(maxsize=1)
def _handler_registry():
    """Orbax handlers for our checkpoints: the state as a PyTree whose jax.Arrays are written
    without orbax's per-process ArrayMetadata files, and the JSON metadata.

    That store is where a multi-process save lost its time: every process other than 0 waits for
    process 0 to create the metadata directory, polling every 0.25 s (orbax 0.12.8,
    `array_metadata_store.Store._maybe_create_base_dir`), so each save of a two-process run took
    288 ms against 26 ms in one process, 42-48 ms without the store (a 3 x 40 x 128 state, README
    "Devices and hosts"). We restore to a target's shapes, dtypes and shardings, so the stored
    write shapes are not needed. The file format is PyTreeCheckpointHandler's (the one
    StandardCheckpointHandler writes), and checkpoints written through StandardSave restore.
    """
    import orbax.checkpoint as ocp

    th = ocp.type_handlers
    types = th.create_type_handler_registry(
        (int, th.ScalarHandler()), (float, th.ScalarHandler()), (bytes, th.ScalarHandler()),
        (np.number, th.ScalarHandler()), (np.ndarray, th.NumpyHandler()),
        (jax.Array, th.ArrayHandler(array_metadata_store=None)), (str, th.StringHandler()))
    tree = ocp.PyTreeCheckpointHandler(type_handler_registry=types)
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add("state", ocp.args.PyTreeSave, tree)
    registry.add("state", ocp.args.PyTreeRestore, tree)
    registry.add("meta", ocp.args.JsonSave, ocp.JsonCheckpointHandler())
    registry.add("meta", ocp.args.JsonRestore, ocp.JsonCheckpointHandler())
    return registry


def _manager(directory: str, tree: PyTree):
    """Orbax's manager for `directory`, once `tree` (the state to save or the restore target) is
    computed. With several processes, creating the manager runs a collective over every device
    (orbax's process sync); one still in flight over a seed mesh (the last seed-mapped call, e.g.
    the fine-tuning start state) crossed it and killed a resumed two-process run (gloo: "Received
    data size doesn't match expected size")."""
    import orbax.checkpoint as ocp

    jax.block_until_ready(tree)
    return ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
        handler_registry=_handler_registry(),
    )


def save_checkpoint(directory: str, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Saves the whole (seed-stacked) state plus JSON metadata (e.g. history) at `step`."""
    import orbax.checkpoint as ocp

    with _manager(directory, state) as mgr:
        mgr.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                               meta=ocp.args.JsonSave(meta)))
        mgr.wait_until_finished()


def restore_checkpoint(directory: str, target: PyTree) -> tuple[int, PyTree, dict[str, Any]] | None:
    """(step, state, meta) of the latest checkpoint in `directory`, or None. `target` gives the
    shapes, dtypes and shardings."""
    import orbax.checkpoint as ocp

    if not os.path.isdir(directory):
        return None
    with _manager(directory, target) as mgr:
        step = mgr.latest_step()
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        state = ocp.args.PyTreeRestore(
            item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
        out = mgr.restore(step, args=ocp.args.Composite(state=state, meta=ocp.args.JsonRestore()))
    return step, out["state"], out["meta"]


def checkpoint_tree(directory: str) -> Any:
    """The state's structure in the latest checkpoint of `directory` (nested dicts of orbax leaf
    metadata; read without restoring any array), or None if there is none."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory, {}) as mgr:
        step = mgr.latest_step()
        if step is None:
            return None
        meta = mgr.item_metadata(step)["state"]
    return getattr(meta, "tree", meta)


# ----------------------------------------------------------------------------- host loop


@functools.lru_cache(maxsize=32)
def _compiled(model: nn.Module, cfg: TrainConfig, steps: int, strategy: str):
    """(epoch_fn, eval_fn) for S seeds, cached so repeated `fit` calls reuse one compilation."""
    tx = make_optimizer(cfg)
    epoch_fn = map_seeds(
        functools.partial(train_epoch, model=model, tx=tx, batch_size=cfg.batch_size, steps=steps),
        (0, None, None, 0),
        strategy,
        cfg.batch_shards,
        returns_state=True,
    )
    eval_fn = map_seeds(
        functools.partial(evaluate, model=model, batch_size=cfg.eval_batch_size), (0, None, None), strategy
    )
    return epoch_fn, eval_fn


def fit(
    model: nn.Module,
    cfg: TrainConfig,
    states: TrainState,
    dataset: data_lib.Dataset,
    run_keys: jax.Array,
    *,
    model_name: str = "",
    checkpoint_dir: str | None = None,
    desc: str = "train",
    progress: bool = True,
    after_epoch: Callable[[int, TrainState], None] | None = None,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains S seeds (leading axis of `states` and `run_keys`) for cfg.epochs epochs.

    Returns the final states and a history: one record per epoch with per-seed lists of the mean train
    loss/error over the epoch's steps and the test loss/error. With `checkpoint_dir`, the state and the
    history are saved every cfg.checkpoint_every epochs and at the end, and a later call resumes from
    the latest checkpoint.
    """
    from jaxprune import sharding

    strategy = resolve_strategy(cfg.seed_strategy, model_name)
    x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    xt, yt = jnp.asarray(dataset.test.x), jnp.asarray(dataset.test.y)
    steps = cfg.steps_per_epoch or x.shape[0] // cfg.batch_size
    if steps <= 0:
        raise ValueError(f"batch_size {cfg.batch_size} exceeds the {x.shape[0]} training examples")
    if num_seeds(states) != run_keys.shape[0]:
        raise ValueError(f"{num_seeds(states)} states but {run_keys.shape[0]} run keys")
    # Only the fields that change the compiled programs key the cache.
    epoch_fn, eval_fn = _compiled(model, dataclasses.replace(cfg, epochs=0, checkpoint_every=0), steps, strategy)

    history: list[dict[str, Any]] = []
    start = 0
    if checkpoint_dir and cfg.checkpoint_every:
        restored = restore_checkpoint(checkpoint_dir, states)
        if restored is not None:
            start, states, meta = restored
            history = list(meta["history"])
    bar = progress_bar(range(start, cfg.epochs), desc=desc, disable=not progress, initial=start,
                       total=cfg.epochs)
    for epoch in bar:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, epoch)
        states, m = epoch_fn(states, x, y, keys)
        ev = eval_fn(states, xt, yt)
        rec = {
            "epoch": epoch + 1,
            "train_loss": np.asarray(m["loss"].mean(-1)).tolist(),
            "train_error": np.asarray(m["error"].mean(-1)).tolist(),
            "test_loss": np.asarray(ev["loss"]).tolist(),
            "test_error": np.asarray(ev["error"]).tolist(),
        }
        history.append(rec)
        bar.set_postfix(test_error=f"{np.mean(rec['test_error']):.4f}")
        done = epoch + 1
        if checkpoint_dir and cfg.checkpoint_every and (done % cfg.checkpoint_every == 0 or done == cfg.epochs):
            save_checkpoint(checkpoint_dir, done, states, {"history": history})
        if after_epoch is not None:
            after_epoch(done, sharding.readable(states))
    return sharding.readable(states), history
