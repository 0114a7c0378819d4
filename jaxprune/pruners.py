"""Baseline masks at a target sparsity: magnitude, random (uniform or ERK), SNIP.

Every pruner has one signature, `pruner(key, params, sparsity, prunable, *, loss_fn=None) -> mask`, so
experiments pick one by name from `PRUNERS`. Deterministic pruners ignore the key; SNIP needs `loss_fn`,
a function of the params (closed over one or more batches) whose gradient scores the weights.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks
from jaxprune.schedules import polynomial_sparsity  # noqa: F401  (the Zhu-Gupta schedule, re-exported)

PyTree = Any


class Pruner(Protocol):
    def __call__(
        self,
        key: jax.Array,
        params: PyTree,
        sparsity: float,
        prunable: PyTree,
        *,
        loss_fn: Callable[[PyTree], jax.Array] | None = None,
    ) -> PyTree: ...


def magnitude(key, params, sparsity, prunable, *, loss_fn=None) -> PyTree:
    """Global magnitude pruning: keep the largest |w| over all prunable layers together (Han et al.)."""
    del key, loss_fn
    return masks.topk(jax.tree.map(jnp.abs, params), sparsity, prunable, scope="global")


def magnitude_layerwise(key, params, sparsity, prunable, *, loss_fn=None) -> PyTree:
    """Layerwise magnitude pruning: every prunable layer pruned to the same sparsity."""
    del key, loss_fn
    return masks.topk(jax.tree.map(jnp.abs, params), sparsity, prunable, scope="layer")


def random_uniform(key, params, sparsity, prunable, *, loss_fn=None) -> PyTree:
    """Uniform random mask: each prunable layer loses exactly round(sparsity * size) weights."""
    del loss_fn
    scores = jax.tree.map(lambda k, w: jax.random.uniform(k, jnp.shape(w)), masks.split_like(key, params), params)
    return masks.topk(scores, sparsity, prunable, scope="layer")


def erk_densities(params: PyTree, sparsity: float, prunable: PyTree, power_scale: float = 1.0) -> dict[str, float]:
    """Erdos-Renyi-Kernel layer densities (Evci et al. 2020): d_l proportional to sum(shape)/prod(shape).

    Scaled so the total number of kept weights is (1 - sparsity) * n; layers whose density would exceed 1
    are made dense and the rest re-scaled (the RigL procedure).
    """
    masks.check_sparsity(sparsity)
    shapes = {k: np.shape(x) for k, x in masks._prunable_leaves(params, prunable)}
    raw = {k: (np.sum(s) / np.prod(s)) ** power_scale for k, s in shapes.items()}
    sizes = {k: float(np.prod(s)) for k, s in shapes.items()}
    target = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    eps = 0.0
    while free := [k for k in shapes if k not in dense]:
        budget = target - sum(sizes[k] for k in dense)
        eps = budget / sum(raw[k] * sizes[k] for k in free)
        # Slack for rounding: at sparsity 0 every density is 1 up to the last ulp, and marking the
        # last free layer dense over 1 + 1e-16 left nothing to divide by.
        over = [k for k in free if eps * raw[k] > 1.0 + 1e-9]
        if not over:
            break
        dense.update(over)
    return {k: 1.0 if k in dense else min(1.0, float(eps * raw[k])) for k in shapes}


def random_erk(key, params, sparsity, prunable, *, loss_fn=None) -> PyTree:
    """Random mask with ERK layer densities (exact count per layer)."""
    del loss_fn
    dens = erk_densities(params, sparsity, prunable)
    keys = masks.split_like(key, params)
    flags = {masks.path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(prunable)}

    def one(path, k, w):
        name = masks.path_str(path)
        if not flags[name]:
            return jnp.ones(jnp.shape(w), jnp.float32)
        scores = jax.random.uniform(k, (int(np.size(w)),))
        return masks._keep_topk(scores, masks.num_to_prune(int(np.size(w)), 1.0 - dens[name])).reshape(jnp.shape(w))

    return jax.tree_util.tree_map_with_path(one, keys, params)


def snip_scores(params: PyTree, loss_fn: Callable[[PyTree], jax.Array]) -> PyTree:
    """SNIP connection sensitivity |dL/dm| at m = 1, which equals |g * w| (Lee et al. 2019, eq. 6)."""
    g = jax.grad(loss_fn)(params)
    return jax.tree.map(lambda gi, w: jnp.abs(gi * w), g, params)


def snip(key, params, sparsity, prunable, *, loss_fn=None) -> PyTree:
    """SNIP at initialisation: keep the weights with the largest |g * w| (global)."""
    del key
    if loss_fn is None:
        raise ValueError("snip needs loss_fn: a function of the params closed over one or more batches")
    return masks.topk(snip_scores(params, loss_fn), sparsity, prunable, scope="global")


PRUNERS: dict[str, Pruner] = {
    "magnitude": magnitude,
    "magnitude_layer": magnitude_layerwise,
    "random": random_uniform,
    "random_erk": random_erk,
    "snip": snip,
}


def get_pruner(name: str) -> Pruner:
    if name not in PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; known: {sorted(PRUNERS)}")
    return PRUNERS[name]
