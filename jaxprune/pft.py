"""Probabilistic fine-tuning (PFT) of a baseline pruning mask (Hayou, He & Dziugaite 2021).

Keep probabilities p = sigmoid(s) start from a baseline mask M0 (s = +s0 where M0 = 1, -s0 where M0 = 0,
so p is never exactly 0 or 1), and s is trained on the expected loss

    J(s) = E_{m ~ Bern(sigmoid(s))} (1/B) sum_j l(f(x_j; m * w), y_j)           (pft-pac-bayes.md 1.2)

with any estimator of `jaxprune.estimators` and Optax; w is frozen (BatchNorm in eval mode) unless
`joint=True`. An optional budget term  lambda * relu(mean_i p_i - d)^2  (d = target density) keeps the
expected density at the baseline's, so the stochastic network is compared at equal expected sparsity.
Afterwards the stochastic network is evaluated by its mean error over sampled masks and by its ensemble,
and thresholded back to a deterministic mask: top-k by p at exactly the baseline's sparsity, and p > 1/2.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxprune import data as data_lib
from jaxprune import estimators as est_lib
from jaxprune import masks, sharding, train

PyTree = Any


@dataclasses.dataclass(frozen=True)
class PFTConfig:
    estimator: str = "concrete"  # a name in jaxprune.estimators.ESTIMATORS
    estimator_options: tuple[tuple[str, Any], ...] = ()  # e.g. (("tau", 0.5),)
    num_samples: int = 4  # K masks per step (DisARM: K antithetic pairs)
    s0: float = 3.0  # initial |logit|: p0 = sigmoid(3) = 0.953 for kept, 0.047 for pruned weights
    learning_rate: float = 0.05  # Adam on the logits
    steps: int = 300
    batch_size: int = 128
    joint: bool = False  # also train the weights (Adam, weight_lr) on the expected loss
    weight_lr: float = 1e-4
    budget_weight: float = 0.0  # lambda of the expected-density budget term; 0 disables it

    def get_estimator(self) -> est_lib.Estimator:
        return est_lib.get_estimator(self.estimator, **dict(self.estimator_options))


class PFTState(struct.PyTreeNode):
    """One seed's PFT state (leading seed axis S for many seeds). `key` is raw key data."""

    logits: PyTree
    params: PyTree
    batch_stats: PyTree
    opt_state: optax.OptState
    est_state: Any
    step: jax.Array
    key: jax.Array


def logits_from_mask(mask: PyTree, s0: float) -> PyTree:
    """s = s0 (2 M0 - 1): +s0 on kept, -s0 on pruned entries; p = sigmoid(s) lies strictly in (0, 1)."""
    if not s0 > 0:
        raise ValueError(f"s0 must be > 0 (p must stay inside (0, 1)), got {s0}")
    masks.check_probs(mask)
    return jax.tree.map(lambda m: s0 * (2.0 * m.astype(jnp.float32) - 1.0), mask)


def density(logits: PyTree, prunable: PyTree) -> jax.Array:
    """Expected fraction of prunable weights kept, mean_i p_i."""
    leaves = masks._prunable_leaves(logits, prunable)
    total = sum(int(np.size(s)) for _, s in leaves)
    return sum(jnp.sum(jax.nn.sigmoid(s)) for _, s in leaves) / total


def _optimizers(cfg: PFTConfig) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
    return optax.adam(cfg.learning_rate), optax.adam(cfg.weight_lr)


def init(key: jax.Array, params: PyTree, batch_stats: PyTree, mask: PyTree, cfg: PFTConfig) -> PFTState:
    """PFT state starting from a baseline `mask` on (trained) `params`."""
    masks.check_same_structure(params, mask)
    logits = logits_from_mask(mask, cfg.s0)
    tx_s, tx_w = _optimizers(cfg)
    opt_state = (tx_s.init(logits), tx_w.init(params) if cfg.joint else optax.EmptyState())
    return PFTState(logits, params, batch_stats, opt_state, cfg.get_estimator().init(logits),
                    jnp.zeros((), jnp.int32), jax.random.key_data(key))


def batch_loss_fn(model: nn.Module, batch_stats: PyTree, x: jax.Array, y: jax.Array) -> Callable[..., jax.Array]:
    """(mask, params) -> cross-entropy of f(x; mask * params) on one batch, BatchNorm in eval mode."""

    def loss_fn(mask: PyTree, params: PyTree) -> jax.Array:
        return train.cross_entropy(train.forward(model, params, batch_stats, mask, x, train=False)[0], y)

    return loss_fn


def step(
    state: PFTState,
    x: jax.Array,
    y: jax.Array,
    *,
    model: nn.Module,
    cfg: PFTConfig,
    prunable: PyTree,
    target_density: float | jax.Array = 1.0,
) -> tuple[PFTState, dict[str, jax.Array]]:
    """One Optax step on the logits (and the weights if cfg.joint) with K mask samples."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    loss_fn = batch_loss_fn(model, state.batch_stats, x, y)
    estimator = cfg.get_estimator()
    if cfg.joint:
        est = estimator(loss_fn, state.logits, key, cfg.num_samples, state.est_state, params=state.params,
                        prunable=prunable)
    else:
        est = estimator(lambda m: loss_fn(m, state.params), state.logits, key, cfg.num_samples,
                        state.est_state, prunable=prunable)
    grads = est.grads
    dens = density(state.logits, prunable)
    if cfg.budget_weight:
        # Exact gradient of lambda * relu(density - d)^2; zero on non-prunable leaves via the flags.
        budget_grad = jax.grad(
            lambda s: cfg.budget_weight * jax.nn.relu(density(s, prunable) - target_density) ** 2
        )(state.logits)
        grads = jax.tree.map(jnp.add, grads, budget_grad)
    tx_s, tx_w = _optimizers(cfg)
    upd, opt_s = tx_s.update(grads, state.opt_state[0], state.logits)
    logits = optax.apply_updates(state.logits, upd)
    params, opt_w = state.params, state.opt_state[1]
    if cfg.joint:
        upd_w, opt_w = tx_w.update(est.param_grads, opt_w, params)
        params = optax.apply_updates(params, upd_w)
    new = state.replace(logits=logits, params=params, opt_state=(opt_s, opt_w), est_state=est.state,
                        step=state.step + 1)
    return new, {"loss": est.value, "density": dens}


def train_chunk(
    state: PFTState,
    x: jax.Array,
    y: jax.Array,
    key: jax.Array,
    *,
    model: nn.Module,
    cfg: PFTConfig,
    prunable: PyTree,
    steps: int,
    target_density: float | jax.Array = 1.0,
) -> tuple[PFTState, dict[str, jax.Array]]:
    """`steps` PFT steps in one scan; batch order is a function of `key` only."""
    idx = data_lib.batch_indices(key, x.shape[0], cfg.batch_size, steps)

    def body(s, idx_b):
        return step(s, *train.minibatch(x, y, idx_b), model=model, cfg=cfg, prunable=prunable,
                    target_density=target_density)

    return jax.lax.scan(body, state, idx)


def evaluate_stochastic(
    model: nn.Module,
    params: PyTree,
    batch_stats: PyTree,
    logits: PyTree,
    prunable: PyTree,
    key: jax.Array,
    x: jax.Array,
    y: jax.Array,
    num_masks: int = 16,
    batch_size: int = 1000,
) -> dict[str, jax.Array]:
    """Test error of the stochastic network: mean over `num_masks` sampled masks, and the ensemble
    (argmax of the mean softmax over the same masks)."""
    probs = masks.logits_to_probs(logits)
    flags = prunable

    def one(k):
        m = jax.tree.map(lambda mm, f: mm if f else jnp.ones_like(mm), masks.sample(k, probs), flags)
        out = train.predict(model, params, batch_stats, m, x, batch_size)
        return train.error_rate(out, y), jax.nn.softmax(out)

    errors, soft = jax.lax.map(one, jax.random.split(key, num_masks))
    ensemble = jnp.mean(jnp.argmax(soft.mean(0), -1) != y)
    return {"mean_error": errors.mean(), "errors": errors, "ensemble_error": ensemble}


def threshold_topk(logits: PyTree, prunable: PyTree, sparsity: float, scope: str = "global") -> PyTree:
    """Deterministic mask keeping the top-k entries by p (equivalently by s) at exactly `sparsity`."""
    return masks.topk(logits, sparsity, prunable, scope=scope)


def threshold_half(logits: PyTree, prunable: PyTree) -> PyTree:
    """1[p > 1/2] = 1[s > 0] on prunable leaves; its sparsity is whatever PFT learned."""
    return jax.tree.map(
        lambda s, f: (s > 0).astype(jnp.float32) if f else jnp.ones(jnp.shape(s), jnp.float32), logits, prunable
    )


@functools.lru_cache(maxsize=16)
def _compiled_chunk(model: nn.Module, cfg: PFTConfig, prunable_items: tuple, treedef: Any, steps: int, strategy: str,
                    batch_shards: int):
    prunable = jax.tree.unflatten(treedef, list(prunable_items))
    fn = functools.partial(train_chunk, model=model, cfg=cfg, prunable=prunable, steps=steps)
    return train.map_seeds(lambda s, x, y, k, d: fn(s, x, y, k, target_density=d), (0, None, None, 0, 0), strategy,
                           batch_shards, returns_state=True)


def fit(
    model: nn.Module,
    cfg: PFTConfig,
    states: PFTState,
    dataset: data_lib.Dataset,
    run_keys: jax.Array,
    prunable: PyTree,
    target_density: jax.Array,
    *,
    strategy: str = "vmap",
    batch_shards: int = 1,
    chunk_steps: int = 50,
    checkpoint_dir: str | None = None,
    desc: str = "pft",
    progress: bool = True,
) -> tuple[PFTState, list[dict[str, Any]]]:
    """cfg.steps PFT steps for S seeds (leading axis), in jitted chunks of `chunk_steps` steps.

    `target_density` is (S,): each seed's baseline density (used by the budget term). Checkpoints after
    every chunk when `checkpoint_dir` is given, and resumes from it. Returns states and a per-chunk
    history (mean loss, expected density, wall seconds per step). `batch_shards` > 1 (strategy
    "sharded") splits each seed's batch over that many devices (`train.map_seeds`).
    """
    import time

    if cfg.steps % chunk_steps:
        chunk_steps = int(np.gcd(cfg.steps, chunk_steps))
    n_chunks = cfg.steps // chunk_steps
    flat, treedef = jax.tree.flatten(prunable)
    chunk_fn = _compiled_chunk(model, cfg, tuple(flat), treedef, chunk_steps, strategy, batch_shards)
    x, y = jnp.asarray(dataset.train.x), jnp.asarray(dataset.train.y)
    history: list[dict[str, Any]] = []
    start = 0
    if checkpoint_dir:
        restored = train.restore_checkpoint(checkpoint_dir, states)
        if restored is not None:
            start, states, meta = restored
            history = list(meta["history"])
    bar = train.progress_bar(range(start, n_chunks), desc=desc, disable=not progress,
                             initial=start, total=n_chunks)
    for c in bar:
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(run_keys, c)
        t0 = time.perf_counter()
        states, m = chunk_fn(states, x, y, keys, target_density)
        jax.block_until_ready(states)
        rec = {"chunk": c + 1, "step": (c + 1) * chunk_steps,
               "loss": np.asarray(m["loss"].mean(-1)).tolist(),
               "density": np.asarray(m["density"][:, -1]).tolist(),
               "seconds_per_step": (time.perf_counter() - t0) / chunk_steps}
        history.append(rec)
        bar.set_postfix(loss=f"{np.mean(rec['loss']):.4f}", density=f"{np.mean(rec['density']):.3f}")
        if checkpoint_dir:
            train.save_checkpoint(checkpoint_dir, c + 1, states, {"history": history})
    return sharding.readable(states), history
