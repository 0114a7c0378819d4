"""Shared machinery of the generalization-stability experiments (Bartoldson et al. 2020).

Used by `experiments/stability.py` and `experiments/noise_injection.py`. One *run* = one seed of one
configuration; every per-run hyperparameter (the (E, L) count table that encodes the rate, the target
S/R/L, the noise mode) is an array VALUE with a leading run axis R, so all configurations and seeds are
one compiled program mapped with `train.map_seeds` ("vmap" on a GPU, "sequential" for conv nets on CPU).

Per-run state is the plain pytree `RunState`: the `train.TrainState` (params, BN statistics, Adam
state, the param mask, step, data key) plus the channel bookkeeping (`alive` vectors) and the noise
window, so an orbax checkpoint of the stacked states covers masks, alive vectors and windows.

Epoch protocol (notes §1.1): train one epoch (a jitted `lax.scan` over batches) -> test accuracy
t_pre -> pruning event (mask update from the count table) -> test accuracy t_post. Nothing happens
between the two evaluations (no training, no BN update), so instability = (t_pre - t_post) / t_pre.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from ml_collections import config_dict

from experiments import common
from jaxprune import data as data_lib
from jaxprune import masks, models, schedules, scoring, sharding, train

PyTree = Any

NOISE_NONE, NOISE_ZERO, NOISE_GAUSSIAN = 0, 1, 2
SCORINGS = ("l2", "l1", "ebn", "ebn_signed")


class RunState(struct.PyTreeNode):
    """One run's state; stacked runs carry a leading axis R on every leaf."""

    train: train.TrainState
    alive: dict[str, jax.Array]  # (O,) bool per pruned unit: not yet selected by an event
    targeted: dict[str, jax.Array]  # (O,) bool: channels in the open noise window
    saved: dict[str, PyTree]  # layer values and BN statistics saved when the window opened
    remaining: dict[str, jax.Array]  # () int32: training batches left in the window


class RunSpec(struct.PyTreeNode):
    """Per-run values (leading axis R when stacked)."""

    target: jax.Array  # () int32: scoring.SMALLEST / RANDOM / LARGEST
    permanent: jax.Array  # () bool: events mask the selected filters for good
    noise: jax.Array  # () int32: NOISE_NONE / NOISE_ZERO / NOISE_GAUSSIAN on the selected filters
    restore: jax.Array  # () bool: zeroing ends at the saved values (else at zero)
    cumulative: jax.Array  # () bool: a window targets every filter selected so far (else the new)
    window: jax.Array  # () int32: noise window length in training batches


def make_spec(target: int = scoring.SMALLEST, permanent: bool = True, noise: int = NOISE_NONE,
              restore: bool = False, cumulative: bool = False, window: int = 0) -> RunSpec:
    return RunSpec(jnp.int32(target), jnp.bool_(permanent), jnp.int32(noise), jnp.bool_(restore),
                   jnp.bool_(cumulative), jnp.int32(window))


def stack(trees: Sequence[PyTree]) -> PyTree:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# ----------------------------------------------------------------------------- data, model, schedule


def load_data(c: config_dict.ConfigDict) -> data_lib.Dataset:
    """Dataset of a config block (name, data_dir, num_train, num_test, downsample, fallback).

    `downsample` = d averages d x d pixel blocks (28x28 Fashion-MNIST -> 14x14 for d = 2), a 4x
    cheaper CPU model. If the files are missing and `fallback` names a dataset, that one is loaded
    instead, at its own resolution, with a message saying so.
    """
    try:
        ds = common.load_data(c)
    except data_lib.DatasetNotFoundError as e:
        if not c.get("fallback"):
            raise
        print(f"[gst] dataset {c.name!r} not found ({e}); FALLING BACK to {c.fallback!r} "
              "(not downsampled)", flush=True)
        return data_lib.load_dataset(c.fallback)  # downsample is meant for c.name's resolution
    d = int(c.get("downsample") or 1)
    if d > 1 and ds.train.x.shape[1] >= 4 * d:

        def pool(s: data_lib.Split) -> data_lib.Split:
            n, h, w, ch = s.x.shape
            x = s.x[:, : h - h % d, : w - w % d].reshape(n, h // d, d, w // d, d, ch).mean((2, 4))
            return data_lib.Split(np.ascontiguousarray(x, np.float32), s.y)

        ds = ds._replace(train=pool(ds.train), test=pool(ds.test))
    return ds


def layer_schedules(c: config_dict.ConfigDict, units: Sequence[models.ConvUnit], params: PyTree,
                    period: int) -> list[schedules.LayerSchedule]:
    """LayerSchedules of the pruned layers (config block `layers`) with retrain period `period`."""
    by_name = {u.name: u for u in units}
    names = common.parse_list(c.names)
    fr, st, en = (common.parse_list(c.fractions, float), common.parse_list(c.starts, int),
                  common.parse_list(c.ends, int))
    if not len(names) == len(fr) == len(st) == len(en):
        raise ValueError(f"layers: names/fractions/starts/ends differ in length: {names}, {fr}, {st}, {en}")
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"layers.names {missing} are not conv units; known: {sorted(by_name)}")
    return [schedules.LayerSchedule(int(masks.get_path(params, by_name[n].kernel_path).shape[-1]),
                                    f, s, e, period, n)
            for n, f, s, e in zip(names, fr, st, en)]


def pruned_units(units: Sequence[models.ConvUnit], names: Sequence[str]) -> tuple[models.ConvUnit, ...]:
    by_name = {u.name: u for u in units}
    return tuple(by_name[n] for n in names)


def make_tx(c: config_dict.ConfigDict, steps_per_epoch: int) -> optax.GradientTransformation:
    """Adam (or SGD) with MultiStepLR: lr x 0.1 at each epoch in `lr_milestones` (notes §5.3)."""
    bounds = {int(m) * steps_per_epoch: 0.1 for m in common.parse_list(c.lr_milestones, int)}
    lr = optax.piecewise_constant_schedule(c.learning_rate, bounds)
    if c.optimizer == "adam":
        return optax.adam(lr)
    if c.optimizer == "sgd":
        return optax.sgd(lr, momentum=c.momentum or None)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {c.optimizer!r}")


# ----------------------------------------------------------------------------- per-run functions


def _layer(params: PyTree, u: models.ConvUnit) -> dict[str, jax.Array]:
    """The channels-last leaves of one pruned unit: kernel and (if any) its BN scale and bias."""
    out = {"kernel": masks.get_path(params, u.kernel_path)}
    if u.bn_path:
        bn = masks.get_path(params, u.bn_path)
        out.update(scale=bn["scale"], bias=bn["bias"])
    return out


def _set_layer(params: PyTree, u: models.ConvUnit, layer: dict[str, jax.Array]) -> PyTree:
    params = masks.set_path(params, u.kernel_path, layer["kernel"])
    if u.bn_path:
        bn = dict(masks.get_path(params, u.bn_path))
        bn.update(scale=layer["scale"], bias=layer["bias"])
        params = masks.set_path(params, u.bn_path, bn)
    return params


def _stats(batch_stats: PyTree, u: models.ConvUnit) -> dict[str, jax.Array]:
    """The unit's BatchNorm running mean and variance (channels last), or {} without BN."""
    return dict(masks.get_path(batch_stats, u.bn_path)) if u.bn_path else {}


def _saved(state: train.TrainState, u: models.ConvUnit) -> dict[str, jax.Array]:
    """What a restore window saves (notes §3, `cumu_N_zeroing_restore`): kernel, BN scale and bias,
    and BN running mean and variance."""
    return {**_layer(state.params, u), **_stats(state.batch_stats, u)}


def _set_saved(state: train.TrainState, u: models.ConvUnit, values: dict[str, jax.Array]
               ) -> train.TrainState:
    """The inverse of `_saved`: writes kernel, BN scale and bias, and BN running statistics."""
    stats = state.batch_stats
    if u.bn_path:
        stats = masks.set_path(stats, u.bn_path, {**masks.get_path(stats, u.bn_path),
                                                  "mean": values["mean"], "var": values["var"]})
    return state.replace(params=_set_layer(state.params, u, values), batch_stats=stats)


def restore_runs(ckpt_dir: str, target: RunState, units: tuple[models.ConvUnit, ...]
                 ) -> tuple[int, RunState, dict[str, Any]] | None:
    """`train.restore_checkpoint` for stacked RunStates, also reading checkpoints written before
    stop 23, whose `saved` held no BN statistics: those are filled with the checkpoint's own running
    statistics, as if saved then (exact for a state with no restore window open, e.g. a finished
    study; a window open in such a checkpoint closes without restoring them, as the old code did)."""
    stored = train.checkpoint_tree(ckpt_dir)
    if stored is None:
        return None
    saved = stored.get("saved", {}) if isinstance(stored, dict) else {}
    old_format = all(u.name in saved for u in units) and any(
        u.bn_path and "mean" not in saved[u.name] for u in units)
    if not old_format:  # current, or foreign (orbax's error then says what differs)
        return train.restore_checkpoint(ckpt_dir, target)
    old = target.replace(saved={n: {k: v for k, v in layer.items() if k not in ("mean", "var")}
                                for n, layer in target.saved.items()})
    step, state, meta = train.restore_checkpoint(ckpt_dir, old)
    warnings.warn(f"{ckpt_dir}: a checkpoint from before stop 23 (no BN statistics in the restore "
                  "windows' saved values); they are taken from the checkpoint's running statistics")
    saved = {u.name: {**state.saved[u.name], **_stats(state.train.batch_stats, u)} for u in units}
    return step, state.replace(saved=saved), meta


def init_run(key: jax.Array, *, model, sample_x: jax.Array, tx: optax.GradientTransformation,
             units: tuple[models.ConvUnit, ...]) -> RunState:
    st = train.init_state(key, model, sample_x, tx)
    alive = {u.name: jnp.ones((masks.get_path(st.params, u.kernel_path).shape[-1],), bool) for u in units}
    saved = {u.name: jax.tree.map(jnp.zeros_like, _saved(st, u)) for u in units}
    return RunState(st, alive, {n: jnp.zeros_like(a) for n, a in alive.items()}, saved,
                    {n: jnp.zeros((), jnp.int32) for n in alive})


def filter_scores(params: PyTree, u: models.ConvUnit, scoring_name: str) -> jax.Array:
    layer = _layer(params, u)
    if scoring_name == "l2":
        return scoring.l2_score(layer["kernel"])
    if scoring_name == "l1":
        return scoring.l1_score(layer["kernel"])
    if scoring_name in ("ebn", "ebn_signed"):
        if "scale" not in layer:
            raise ValueError(f"scoring {scoring_name!r} needs a BatchNorm after {u.name}")
        return scoring.ebn_score(layer["scale"], layer["bias"], signed=scoring_name == "ebn_signed")
    raise ValueError(f"scoring must be one of {SCORINGS}, got {scoring_name!r}")


def prune_event(state: RunState, key: jax.Array, k: jax.Array, spec: RunSpec, *,
                units: tuple[models.ConvUnit, ...], scoring_name: str) -> tuple[RunState, jax.Array]:
    """One pruning epoch: select k[l] filters of layer l among the alive ones (target = a value).

    Permanent runs mask the kernel, BN scale/bias (and projection shortcut) of the selected channels
    and zero their stored weights; BN running statistics are untouched. Noise runs keep the mask and
    open a window of `spec.window` batches on the new (or, if cumulative, all) selected filters,
    saving their layer values and BN statistics (`_saved`) for a restore.
    Returns the new state and the number pruned per layer (L,).
    """
    params = state.train.params
    alive, targeted, saved, remaining, npruned = {}, {}, {}, {}, []
    for j, u in enumerate(units):
        sel = scoring.select(jax.random.fold_in(key, j), filter_scores(params, u, scoring_name),
                             state.alive[u.name], k[j], spec.target)
        alive[u.name] = sel.alive
        npruned.append(jnp.sum(sel.pruned))
        new_window = jnp.any(sel.pruned) & ~spec.permanent & (spec.noise != NOISE_NONE)
        tgt = jnp.where(spec.cumulative, ~sel.alive, sel.pruned)
        targeted[u.name] = jnp.where(new_window, tgt, state.targeted[u.name])
        saved[u.name] = jax.tree.map(lambda a, b: jnp.where(new_window, a, b),
                                     _saved(state.train, u), state.saved[u.name])
        remaining[u.name] = jnp.where(new_window, spec.window, state.remaining[u.name])
    perm_mask = masks.channel_to_param_mask(
        params, {u.name: alive[u.name] for u in units}, units)
    mask = jax.tree.map(lambda a, b: jnp.where(spec.permanent, a, b), perm_mask, state.train.mask)
    # The reference zeroes the stored weights of pruned filters at the event (notes §1.1).
    tstate = state.train.replace(params=masks.apply(params, mask), mask=mask)
    new = state.replace(train=tstate, alive=alive, targeted=targeted, saved=saved, remaining=remaining)
    return new, jnp.stack(npruned)


def _perturb(state: RunState, key: jax.Array, spec: RunSpec, units: tuple[models.ConvUnit, ...]
             ) -> RunState:
    """Before a training batch: zero (or add noise to) the targeted channels of open windows.

    Zeroing as in the reference (notes §3): the restore variant zeroes the kernel and the BN
    scale/bias (the channel is then exactly off, as if pruned); the return-at-zero variant zeroes the
    kernel only. (Zeroing and returning gamma = beta = 0 too would leave a dead channel that never
    trains again: kernel 0 gives a BN output of beta = 0 and ReLU'(0) = 0, so every gradient is 0.)
    Gaussian noise hits the kernel only, with std of the unperturbed filters' weights.
    """
    params = state.train.params
    for j, u in enumerate(units):
        layer, tgt = _layer(params, u), state.targeted[u.name]
        active = state.remaining[u.name] > 0
        zeroed = scoring.zero_channels(layer, tgt)
        zeroed = {k: jnp.where(spec.restore | (k == "kernel"), v, layer[k]) for k, v in zeroed.items()}
        std = scoring.unperturbed_std(layer["kernel"], state.alive[u.name] & ~tgt)
        noisy = dict(layer, kernel=scoring.add_channel_noise(
            jax.random.fold_in(key, j), {"k": layer["kernel"]}, tgt, std)["k"])
        pick_zero = active & (spec.noise == NOISE_ZERO)
        pick_noise = active & (spec.noise == NOISE_GAUSSIAN)
        layer = jax.tree.map(lambda z, n, o: jnp.where(pick_zero, z, jnp.where(pick_noise, n, o)),
                             zeroed, noisy, layer)
        params = _set_layer(params, u, layer)
    return state.replace(train=state.train.replace(params=params))


def _close_windows(state: RunState, spec: RunSpec, units: tuple[models.ConvUnit, ...]) -> RunState:
    """After a training batch: count the window down; a closing zeroing window returns the targeted
    channels at their saved values (restore: kernel, BN scale, bias and running statistics, as the
    reference does) or at zero (the kernel only), updates made during it discarded."""
    ts, remaining = state.train, {}
    for u in units:
        closing = (state.remaining[u.name] == 1) & (spec.noise == NOISE_ZERO)
        layer = _saved(ts, u)
        ended = scoring.end_zeroing(layer, state.saved[u.name], state.targeted[u.name], spec.restore)
        # Return at zero touches the kernel only (BN was never zeroed in that variant).
        ended = {k: jnp.where(spec.restore | (k == "kernel"), v, layer[k]) for k, v in ended.items()}
        ts = _set_saved(ts, u, jax.tree.map(lambda a, b: jnp.where(closing, a, b), ended, layer))
        remaining[u.name] = jnp.maximum(state.remaining[u.name] - 1, 0)
    return state.replace(train=ts, remaining=remaining)


def run_step(state: RunState, x: jax.Array, y: jax.Array, idx: jax.Array, key: jax.Array,
             spec: RunSpec, *, model, tx: optax.GradientTransformation,
             units: tuple[models.ConvUnit, ...], noise: bool) -> tuple[RunState, dict[str, jax.Array]]:
    """One training batch x[idx]. With `noise` (static) it is preceded by `_perturb` and followed by
    `_close_windows`; without it this is exactly `train.train_step`."""
    if noise:
        state = _perturb(state, jax.random.fold_in(key, state.train.step), spec, units)
    ts, m = train.train_step(state.train, *train.minibatch(x, y, idx), model=model, tx=tx)
    state = state.replace(train=ts)
    if noise:
        state = _close_windows(state, spec, units)
    return state, m


def num_correct(state: RunState, x: jax.Array, y: jax.Array, *, model) -> jax.Array:
    """Eval-mode (BN running statistics) number of correct predictions of the masked network."""
    logits, _ = train.forward(model, state.train.params, state.train.batch_stats, state.train.mask,
                              x, train=False)
    return jnp.sum(jnp.argmax(logits, -1) == y)


# ----------------------------------------------------------------------------- host loop


class Runner:
    """Maps single-run functions over R runs.

    "vmap": states are one stacked pytree and each call is jit(vmap(fn)). "sharded": the same, with
    the run axis split over a ("seeds", "batch") device mesh (`sharding.map_seeds_sharded`; the
    largest divisor of R that fits the devices). "sequential": states are a list of R unstacked
    pytrees and each call runs one compiled single-run program R times; run i's slice of the
    per-run arguments is taken inside that program (eager `v[i]` slices cost ~5 % of the
    stability CPU default's time). "sharded_sequential": "sequential" with the runs split over the
    mesh's d devices in blocks of R/d (as "sharded" splits them); dispatch is asynchronous, so the
    devices run concurrently, and on several processes each runs only its own devices' runs.
    `batch_shards` > 1 ("sharded" only): each run's training batch is also split over that many
    devices (a (runs, batch) mesh; `train.constrain_batch` in `run_step`). On several processes
    the states stay with their runs' devices between steps (`returns_state`), the per-run outputs
    are gathered onto every process (unless `map(..., gather=False)`: then the caller gathers
    them with `sharding.readable`, e.g. once per epoch), and `stacked` gathers the states.
    """

    def __init__(self, strategy: str, num_runs: int, batch_shards: int = 1):
        if strategy not in train.STRATEGIES:
            raise ValueError(f"strategy must be one of {train.STRATEGIES}, got {strategy!r}")
        train.check_batch_shards(strategy, batch_shards)
        self.strategy = strategy
        self.batch_shards = batch_shards
        self.mesh = (sharding.seed_mesh(num_runs, batch_shards) if strategy.startswith("sharded")
                     else None)
        self.listed = strategy in ("sequential", "sharded_sequential")
        # "sequential" on several processes: every process runs every run on its own device.
        self.devices = (list(self.mesh.devices[:, 0]) if self.mesh is not None
                        else [jax.local_devices()[0]])
        self.local_devices = (sharding.local_mesh_devices(self.mesh) if self.mesh is not None
                              else self.devices)
        self.per_device = num_runs // len(self.devices)  # seed_mesh: a divisor of num_runs
        # The runs this process computes ("listed"), and their indices as scalars on their run's
        # device, made once (a Python int is sent every call).
        self.mine = [i for i in range(num_runs if self.listed else 0)
                     if self.device(i) in self.local_devices]
        self.ids = {i: jax.device_put(jnp.int32(i), self.device(i)) for i in self.mine}

    def device(self, i: int) -> jax.Device:
        return self.devices[i // self.per_device]

    def replicate(self, tree: Any) -> Any:
        """Inputs without a run axis (the data), placed once on every device of the mesh, so that
        calls do not copy them again each step."""
        return tree if self.mesh is None else sharding.replicate(tree, self.mesh)

    def per_run(self, tree: Any) -> Any:
        """Inputs with a leading run axis, split over the mesh once ("sharded"), else unchanged."""
        return sharding.shard_seeds(tree, self.mesh) if self.strategy == "sharded" else tree

    def wrap(self, states: RunState) -> Any:
        """The runs' states as the mapped functions take them ("listed": a list of R single-run
        states on their devices, None for the runs of other processes)."""
        if not self.listed:
            return self.per_run(states)
        one = jax.jit(lambda st, i: train.seed_slice([st], (0,), i)[0])
        # Several processes: this process's copy of the whole state (one split over the
        # processes is gathered first, so no process slices a block it mistakes for the whole).
        states = jax.tree.map(lambda v: v if v.is_fully_addressable
                              else v.addressable_shards[0].data, sharding.readable(states))
        return [jax.device_put(one(states, jnp.int32(i)), self.device(i)) if i in self.ids
                else None for i in range(train.num_seeds(states))]

    def _rows(self, per_run: Sequence[Any], gather: bool = True) -> Any:
        """Per-run pytrees of this process's runs (on their devices) as one stacked pytree over
        all R runs, seed-sharded over the mesh; with `gather`, one that every process can read."""
        if self.mesh is None:
            return stack([jax.device_put(r, self.devices[0]) for r in per_run])
        by_device = {d: [] for d in self.local_devices}
        for i, r in zip(self.mine, per_run):
            by_device[self.device(i)].append(r)
        rows = sharding.from_blocks([stack(rs) for rs in by_device.values()], self.mesh)
        return sharding.readable(rows) if gather else rows

    def stacked(self, states: Any) -> RunState:
        """One stacked RunState that every process can read (checkpoints, the caller)."""
        if not self.listed:
            # Several processes: the steps keep each process's runs on its own devices; gathered
            # here, once.
            return sharding.readable(states)
        return self._rows([states[i] for i in self.mine])

    def map(self, fn, in_axes: Sequence[int | None], returns_state: bool = False,
            gather: bool = True):
        """fn(state, *args) -> (state, aux) (`returns_state`) or aux; returns f(states, *args) ->
        same, aux stacked (and, on several processes, readable by every process if `gather`)."""
        in_axes = tuple(in_axes)
        if self.strategy == "vmap":
            return jax.jit(jax.vmap(fn, in_axes=(0,) + in_axes))
        if self.strategy == "sharded":
            return sharding.map_seeds_sharded(fn, (0,) + in_axes, self.batch_shards,
                                              devices=self.mesh.devices.ravel(),
                                              returns_state=returns_state, gather_outputs=gather)

        @jax.jit
        def single(state, i, *args):
            return fn(state, *train.seed_slice(args, in_axes, i))

        def local(a: Any, d: jax.Device) -> Any:
            # This device's replica of a replicated input; others are copied once per call here
            # rather than once per run inside the calls.
            return jax.tree.map(lambda v: sharding.local_block(v, d) if isinstance(v, jax.Array)
                                and len(v.devices()) > 1 else jax.device_put(v, d), a)

        def run(states, *args):
            per_dev = ({d: [local(a, d) for a in args] for d in self.local_devices} if self.mesh
                       else {self.devices[0]: args})
            outs = [single(states[i], self.ids[i], *per_dev[self.device(i)]) for i in self.mine]
            if not returns_state:
                return self._rows(outs, gather)
            new = [None] * len(states)
            for i, o in zip(self.mine, outs):
                new[i] = o[0]
            return new, self._rows([o[1] for o in outs], gather)

        return run


def train_runs(*, model, tx, units: tuple[models.ConvUnit, ...], scoring_name: str, states: RunState,
               specs: RunSpec, counts: np.ndarray, ds: data_lib.Dataset, data_keys: jax.Array,
               prune_keys: jax.Array, batch_size: int, eval_batch_size: int, strategy: str,
               noise: bool, ckpt_dir: str | None, checkpoint_every: int, desc: str,
               batch_shards: int = 1) -> tuple[RunState, dict[str, np.ndarray]]:
    """Trains R runs (leading axis of `states`, `specs`, `counts`) for counts.shape[1] epochs.

    An epoch is `steps` calls of the mapped jitted `run_step` from the host: on XLA CPU a conv train
    step inside `lax.scan` ran 12x slower than the same jitted step called from Python (1.1 s vs
    0.095 s, measured here), and unrolling the scan cost 70 s of compile. Returns the final stacked
    states and (R, E) arrays t_pre, t_post, train_acc, train_loss, and (R, E, L) pruned counts.
    Resumes from `ckpt_dir` (orbax, every `checkpoint_every` epochs and at the end).
    """
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    xt, yt = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    steps = x.shape[0] // batch_size
    if steps <= 0:
        raise ValueError(f"batch_size {batch_size} exceeds the {x.shape[0]} training examples")
    runner = Runner(strategy, counts.shape[0], batch_shards)
    x, y = runner.replicate((x, y))
    test_batches = [runner.replicate((xt[i:i + eval_batch_size], yt[i:i + eval_batch_size]))
                    for i in range(0, xt.shape[0], eval_batch_size)]
    specs = runner.per_run(specs)
    # Per-step and per-batch outputs stay on their runs' devices and are gathered once per epoch:
    # on several processes every gather is a collective that waits for all of them.
    step_fn = runner.map(functools.partial(run_step, model=model, tx=tx, units=units, noise=noise),
                         (None, None, 0, 0, 0), returns_state=True, gather=False)
    correct_fn = runner.map(functools.partial(num_correct, model=model), (None, None), gather=False)
    prune_fn = runner.map(functools.partial(prune_event, units=units, scoring_name=scoring_name),
                          (0, 0, 0), returns_state=True)
    sum_batches = jax.jit(lambda cs: functools.reduce(jnp.add, cs))
    stack_steps = jax.jit(lambda ms: jax.tree.map(lambda *v: jnp.stack(v, -1), *ms))
    order_fn = jax.jit(jax.vmap(functools.partial(
        data_lib.batch_indices, num_examples=x.shape[0], batch_size=batch_size, num_batches=steps)))

    def test_acc(st) -> np.ndarray:
        correct = sum_batches([correct_fn(st, xb, yb) for xb, yb in test_batches])
        return np.asarray(sharding.readable(correct)) / xt.shape[0]

    num_runs, num_epochs = counts.shape[:2]
    hist = {k: np.zeros((num_runs, num_epochs), np.float64)
            for k in ("t_pre", "t_post", "train_acc", "train_loss")}
    hist["pruned"] = np.zeros(counts.shape, np.int32)
    start = 0
    if ckpt_dir and checkpoint_every:
        restored = restore_runs(ckpt_dir, states, units)
        if restored is not None:
            start, states, meta = restored
            hist = {k: np.asarray(v, hist[k].dtype) for k, v in meta["hist"].items()}
    states = runner.wrap(states)
    bar = train.progress_bar(range(start, num_epochs), desc=desc, initial=start, total=num_epochs)
    for epoch in bar:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(data_keys, epoch)
        idx = order_fn(keys)  # (R, steps, B): each run's own order, a function of its key
        noise_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, 1 << 20)
        ms = []
        for t in range(steps):
            states, m = step_fn(states, x, y, idx[:, t], noise_keys, specs)
            ms.append(m)
        m = sharding.readable(stack_steps(ms))  # (R, steps) each
        hist["train_acc"][:, epoch] = 1.0 - np.asarray(m["error"]).mean(-1)
        hist["train_loss"][:, epoch] = np.asarray(m["loss"]).mean(-1)
        hist["t_pre"][:, epoch] = t_pre = test_acc(states)
        k_e = counts[:, epoch]
        if k_e.any():  # mask update, then t_post with nothing in between
            pk = jax.vmap(jax.random.fold_in, in_axes=(0, None))(prune_keys, epoch)
            states, npr = prune_fn(states, pk, jnp.asarray(k_e), specs)
            hist["pruned"][:, epoch] = np.asarray(npr)
            hist["t_post"][:, epoch] = test_acc(states)
        else:
            hist["t_post"][:, epoch] = t_pre
        bar.set_postfix(test=f"{hist['t_post'][:, epoch].mean():.4f}")
        done = epoch + 1
        if ckpt_dir and checkpoint_every and (done % checkpoint_every == 0 or done == num_epochs):
            train.save_checkpoint(ckpt_dir, done, runner.stacked(states),
                                  {"hist": {k: v.tolist() for k, v in hist.items()}})
    return runner.stacked(states), hist


def setup_dirs(workdir: str) -> str:
    ckpt = os.path.join(workdir, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    return ckpt
