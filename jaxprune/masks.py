"""Masks are pytrees with exactly the structure of the params they mask.

A mask leaf is a float array of the leaf's shape holding 0 (pruned) or 1 (kept); leaves that are never
pruned (biases, BatchNorm) hold ones. Which leaves are prunable is an explicit boolean tree (`prunable`),
so every count and sparsity is taken over prunable leaves only. Stochastic masks are trees of keep
probabilities p (or logits s, p = sigmoid(s)) of the same structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any
Path = tuple[str, ...]

_PRUNABLE_NAMES = ("kernel",)  # Dense and Conv weights; biases and BatchNorm scale/bias never.


def path_str(path: Sequence[Any]) -> str:
    """'a/b/kernel' for a jax key path or a tuple of names."""
    parts = []
    for p in path:
        for attr in ("key", "name", "idx"):
            if hasattr(p, attr):
                p = getattr(p, attr)
                break
        parts.append(str(p))
    return "/".join(parts)


def leaf_paths_in_order(tree: PyTree, prefix: Path = ()) -> list[Path]:
    """Leaf paths in insertion order (the order in which flax created the modules)."""
    if isinstance(tree, Mapping):
        out: list[Path] = []
        for k, v in tree.items():
            out.extend(leaf_paths_in_order(v, prefix + (str(k),)))
        return out
    return [prefix]


def get_path(tree: PyTree, path: Sequence[str]) -> Any:
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            raise ValueError(f"path {'/'.join(path)!r} not found in tree (missing {p!r})")
        node = node[p]
    return node


def check_same_structure(
    a: PyTree, b: PyTree, names: tuple[str, str] = ("params", "mask"), shapes: bool = True
) -> None:
    """Raises ValueError naming the first leaf path where structure (or shape) of `a` and `b` differ."""
    la = dict((path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(a))
    lb = dict((path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(b))
    if la.keys() != lb.keys():
        only_a = sorted(set(la) - set(lb))
        only_b = sorted(set(lb) - set(la))
        raise ValueError(
            f"{names[0]} and {names[1]} have different tree structures: leaves only in {names[0]}: "
            f"{only_a[:5]}, only in {names[1]}: {only_b[:5]}"
        )
    for k in la if shapes else ():
        sa, sb = np.shape(la[k]), np.shape(lb[k])
        if sa != sb:
            raise ValueError(f"leaf {k!r}: {names[0]} shape {sa} != {names[1]} shape {sb}")


def prunable_tree(
    params: PyTree,
    *,
    exclude_first_last: bool = False,
    names: Sequence[str] = _PRUNABLE_NAMES,
    layer_order: Sequence[Path] | None = None,
) -> PyTree:
    """Boolean tree: True for Dense/Conv kernels (leaf name in `names`), False elsewhere.

    With `exclude_first_last`, the first and last prunable leaf in forward order are excluded. Forward
    order is `layer_order` (kernel paths) if given, else the insertion order of `params` as returned by
    `model.init` (jax tree ops sort dict keys, so pass `layer_order` for params that went through them).
    """
    flags = jax.tree_util.tree_map_with_path(
        lambda p, x: bool(path_str(p).split("/")[-1] in names and np.ndim(x) >= 2), params
    )
    if exclude_first_last:
        order = [tuple(p) for p in (layer_order or leaf_paths_in_order(params))]
        kernels = [p for p in order if p and p[-1] in names and np.ndim(get_path(params, p)) >= 2]
        if len(kernels) < 3:
            raise ValueError(f"exclude_first_last needs >= 3 prunable layers, found {len(kernels)}")
        drop = {"/".join(kernels[0]), "/".join(kernels[-1])}
        flags = jax.tree_util.tree_map_with_path(lambda p, f: f and path_str(p) not in drop, flags)
    return flags


def ones_like(params: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.ones(jnp.shape(x), jnp.result_type(x)), params)


def apply(params: PyTree, mask: PyTree) -> PyTree:
    """m * w leaf by leaf."""
    check_same_structure(params, mask)
    return jax.tree.map(lambda w, m: w * m.astype(w.dtype), params, mask)


def _prunable_leaves(tree: PyTree, prunable: PyTree) -> list[tuple[str, jax.Array]]:
    check_same_structure(tree, prunable, ("tree", "prunable"), shapes=False)
    flags = {path_str(p): f for p, f in jax.tree_util.tree_leaves_with_path(prunable)}
    return [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree) if flags[path_str(p)]]


def count(mask: PyTree, prunable: PyTree) -> tuple[jax.Array, int]:
    """(kept, total) over prunable leaves."""
    leaves = _prunable_leaves(mask, prunable)
    kept = sum((jnp.sum(m != 0) for _, m in leaves), jnp.array(0))
    return kept, int(sum(np.size(m) for _, m in leaves))


def sparsity(mask: PyTree, prunable: PyTree) -> jax.Array:
    """Fraction of prunable weights that are pruned (global)."""
    kept, total = count(mask, prunable)
    return 1.0 - kept / total


def layer_sparsity(mask: PyTree, prunable: PyTree) -> dict[str, jax.Array]:
    return {k: 1.0 - jnp.mean(m != 0) for k, m in _prunable_leaves(mask, prunable)}


def check_probs(probs: PyTree) -> None:
    """ValueError naming the leaf if any probability is outside [0, 1] or NaN (concrete inputs only)."""
    for p, x in jax.tree_util.tree_leaves_with_path(probs):
        if isinstance(x, jax.core.Tracer):
            continue
        a = np.asarray(x)
        nan = np.isnan(a)
        if nan.any() or (a < 0).any() or (a > 1).any():
            got = ("only NaN" if nan.all() else
                   f"range [{np.nanmin(a):.4g}, {np.nanmax(a):.4g}]" + (" with NaN" if nan.any() else ""))
            raise ValueError(f"leaf {path_str(p)!r}: probabilities must lie in [0, 1], got {got}")


def check_sparsity(sparsity_: float) -> None:
    if isinstance(sparsity_, jax.core.Tracer):
        return
    if not 0.0 <= float(sparsity_) < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity_}")


def logits_to_probs(logits: PyTree) -> PyTree:
    return jax.tree.map(jax.nn.sigmoid, logits)


def probs_to_logits(probs: PyTree, eps: float = 1e-6) -> PyTree:
    """s = log p - log(1 - p), with p clipped to [eps, 1 - eps] so s stays finite."""
    check_probs(probs)
    return jax.tree.map(lambda p: jnp.log(jnp.clip(p, eps, 1 - eps)) - jnp.log1p(-jnp.clip(p, eps, 1 - eps)), probs)


def split_like(key: jax.Array, tree: PyTree) -> PyTree:
    """One independent key per leaf, laid out as `tree`."""
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def sample(key: jax.Array, probs: PyTree) -> PyTree:
    """m_i ~ Bernoulli(p_i) independently; one key per leaf. Returns a float mask tree."""
    check_probs(probs)
    keys = split_like(key, probs)
    return jax.tree.map(lambda k, p: jax.random.bernoulli(k, p).astype(jnp.result_type(p)), keys, probs)


def threshold(probs: PyTree, prunable: PyTree, level: float = 0.5) -> PyTree:
    """Deterministic mask 1[p > level] on prunable leaves, ones elsewhere."""
    check_probs(probs)
    check_same_structure(probs, prunable, ("probs", "prunable"), shapes=False)
    return jax.tree.map(
        lambda p, f: (p > level).astype(jnp.float32) if f else jnp.ones(jnp.shape(p), jnp.float32),
        probs, prunable,
    )


def _keep_topk(scores: jax.Array, num_prune: jax.Array | int) -> jax.Array:
    """1 for all but the `num_prune` lowest scores; ties broken by position, so the count is exact."""
    ranks = jnp.argsort(jnp.argsort(scores, stable=True), stable=True)
    return (ranks >= num_prune).astype(jnp.float32)


def num_to_prune(size: int, sparsity_: float | jax.Array) -> jax.Array | int:
    """floor(sparsity * size + 1/2) (halves round up): the exact number of weights pruned."""
    if isinstance(sparsity_, jax.core.Tracer):
        return jnp.floor(sparsity_ * size + 0.5).astype(jnp.int32)
    return int(np.floor(float(sparsity_) * size + 0.5))


def topk(
    scores: PyTree,
    sparsity_: float | jax.Array,
    prunable: PyTree,
    scope: Literal["global", "layer"] = "global",
) -> PyTree:
    """Keep the highest-scoring prunable weights so exactly floor(sparsity * n + 1/2) are pruned.

    scope="global" ranks all prunable weights together; scope="layer" prunes each prunable leaf to the
    same sparsity. Non-prunable leaves get all-ones masks.
    """
    check_sparsity(sparsity_)
    if scope not in ("global", "layer"):
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    check_same_structure(scores, prunable, ("scores", "prunable"), shapes=False)
    leaves, treedef = jax.tree.flatten(scores)
    flags = jax.tree.leaves(prunable)
    out: list[jax.Array] = [jnp.ones(jnp.shape(x), jnp.float32) for x in leaves]
    idx = [i for i, f in enumerate(flags) if f]
    if not idx:
        raise ValueError("no prunable leaves: nothing to threshold")
    if scope == "layer":
        for i in idx:
            x = jnp.ravel(leaves[i])
            out[i] = _keep_topk(x, num_to_prune(x.size, sparsity_)).reshape(jnp.shape(leaves[i]))
    else:
        flat = jnp.concatenate([jnp.ravel(leaves[i]).astype(jnp.float32) for i in idx])
        keep = _keep_topk(flat, num_to_prune(flat.size, sparsity_))
        offset = 0
        for i in idx:
            n = int(np.size(leaves[i]))
            out[i] = keep[offset : offset + n].reshape(jnp.shape(leaves[i]))
            offset += n
    return jax.tree.unflatten(treedef, out)


def set_path(tree: PyTree, path: Sequence[str], value: Any) -> PyTree:
    """Functional update of a nested dict at `path`."""
    if not path:
        return value
    if not isinstance(tree, Mapping) or path[0] not in tree:
        raise ValueError(f"path {'/'.join(path)!r} not found in tree")
    new = dict(tree)
    new[path[0]] = set_path(tree[path[0]], path[1:], value)
    return new


def channel_to_param_mask(
    params: PyTree,
    channel_masks: Mapping[str, jax.Array],
    units: Sequence[Any],
) -> PyTree:
    """Broadcast per-output-channel masks (one vector per conv unit) onto a params-shaped mask.

    For each unit (a `jaxprune.models.ConvUnit`) whose name is in `channel_masks`, the vector c (length O)
    masks the kernel's last axis, the following BatchNorm's scale and bias (or, with no BatchNorm,
    the conv's own bias), and every shortcut param that adds onto the same channels (projection
    kernel and its BatchNorm), so a pruned channel is exactly zero after BN and ReLU. Everything
    else gets ones.
    """
    known = {u.name for u in units}
    unknown = sorted(set(channel_masks) - known)
    if unknown:
        raise ValueError(f"unknown conv units {unknown}; known: {sorted(known)}")
    mask = ones_like(params)
    for u in units:
        if u.name not in channel_masks:
            continue
        c = jnp.asarray(channel_masks[u.name], jnp.float32)
        kernel = get_path(params, u.kernel_path)
        if c.shape != (kernel.shape[-1],):
            raise ValueError(
                f"channel mask {u.name!r} has shape {c.shape}, kernel {'/'.join(u.kernel_path)} "
                f"has {kernel.shape[-1]} output channels"
            )
        # Without a BatchNorm after it, the conv's own bias goes too (the whole conv module), or the
        # pruned channel would output relu(bias).
        own = [u.kernel_path, u.bn_path] if u.bn_path else [u.kernel_path[:-1]]
        targets = own + list(u.shortcut_paths)
        for path in targets:
            node = get_path(params, path)
            if isinstance(node, Mapping):  # a BatchNorm (or conv) module: mask each of its leaves
                sub = {
                    k: jnp.broadcast_to(c, jnp.shape(v)) if jnp.shape(v)[-1:] == c.shape else jnp.ones_like(v)
                    for k, v in node.items()
                }
                mask = set_path(mask, path, sub)
            else:
                mask = set_path(mask, path, jnp.broadcast_to(c, jnp.shape(node)).astype(jnp.float32))
    return mask
