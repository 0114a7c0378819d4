"""Filter scoring, S/R/L target selection, stability bookkeeping and pruning as noise injection.

Bartoldson et al. 2020 (notes §1.3-§3). Everything works on per-layer arrays whose LAST axis is the
output channel O: a conv kernel (H, W, I, O), a Dense kernel (I, O), BatchNorm scale / bias /
running statistics (O,), and a channel vector `alive` (O,) of bools. `masks.py` broadcasts channel
vectors onto the params; this module never needs the model.

The target (S = smallest, R = random, L = largest) is an int VALUE (`SMALLEST`, `RANDOM`, `LARGEST`)
and the number of filters k may be traced, so one compiled program can `vmap` a whole sweep over
targets and rates.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import norm

PyTree = Any

# --------------------------------------------------------------------------------------------------
# Scores (notes §1.4)
# --------------------------------------------------------------------------------------------------


def _check_channel_last(x: jax.Array, name: str, min_ndim: int = 1) -> None:
    if jnp.ndim(x) < min_ndim:
        raise ValueError(
            f"{name} must have >= {min_ndim} dims with channels last, got {jnp.shape(x)}"
        )


def filter_norm(kernel: jax.Array, ord: int = 2) -> jax.Array:
    """||w_o||_ord of each output filter, flattened over all but the last axis (HWIO -> (O,)).

    ord = 2 is the paper's default (`L2`) score, ord = 1 its `L1` score; the conv bias is excluded.
    """
    _check_channel_last(kernel, "kernel", 2)
    if ord not in (1, 2):
        raise ValueError(f"ord must be 1 or 2, got {ord}")
    w = jnp.reshape(kernel, (-1, kernel.shape[-1]))
    if ord == 1:
        return jnp.sum(jnp.abs(w), axis=0)
    return jnp.sqrt(jnp.sum(jnp.square(w), axis=0))


def l2_score(kernel: jax.Array) -> jax.Array:
    return filter_norm(kernel, 2)


def l1_score(kernel: jax.Array) -> jax.Array:
    return filter_norm(kernel, 1)


class ActivationEMA(NamedTuple):
    """Moving average of per-channel activation L1 norms (the `activations` score)."""

    score: jax.Array  # (O,) float32, starts at 0
    count: jax.Array  # () int32, training forward passes seen


def activation_ema_init(num_channels: int) -> ActivationEMA:
    return ActivationEMA(jnp.zeros((num_channels,), jnp.float32), jnp.zeros((), jnp.int32))


def activation_ema_update(
    state: ActivationEMA,
    activation: jax.Array,
    momentum: jax.typing.ArrayLike = 0.9,
    every: int = 10,
) -> ActivationEMA:
    """One training forward pass: count += 1; if count % every == 0,
    s <- (1 - momentum) sum_{n,h,w} |a| + momentum s (summed, not averaged; notes §1.4).

    `activation` is (..., O), e.g. NHWC: post-BN pre-ReLU for conv1, post-shortcut-add pre-ReLU
    for a ResNet block's conv2. The first update happens on the `every`-th call (as the reference).
    """
    _check_channel_last(activation, "activation")
    if activation.shape[-1] != state.score.shape[-1]:
        raise ValueError(
            f"activation has {activation.shape[-1]} channels, EMA state has {state.score.shape[-1]}"
        )
    count = state.count + 1
    l1 = jnp.sum(jnp.abs(activation.astype(jnp.float32)), axis=tuple(range(activation.ndim - 1)))
    new = (1.0 - momentum) * l1 + momentum * state.score
    return ActivationEMA(jnp.where(count % every == 0, new, state.score), count)


def ebn_score(gamma: jax.Array, beta: jax.Array, signed: bool = False) -> jax.Array:
    """E[BN] (App. B): E[ReLU(y)] for y ~ N(beta, gamma^2),

        E[BN] = beta Phi(beta / |gamma|) + |gamma| phi(beta / |gamma|).


    With `signed` (the reference's `EBN_alt`, used for ResNet18) gamma keeps its sign:
    beta Phi(beta/gamma) + gamma phi(beta/gamma), smaller (possibly negative) for negative gamma.
    gamma = 0 gives the limit relu(beta) in both variants, as the reference's special cases do.
    """
    g = gamma if signed else jnp.abs(gamma)
    zero = g == 0
    u = beta / jnp.where(zero, 1.0, g)  # safe division; the gamma = 0 branch is replaced below
    e = beta * norm.cdf(u) + g * norm.pdf(u)
    return jnp.where(zero, jnp.maximum(beta, 0.0), e)


# --------------------------------------------------------------------------------------------------
# Targets: S / R / L among the alive filters, exactly k (notes §1.3)
# --------------------------------------------------------------------------------------------------

SMALLEST, RANDOM, LARGEST = 0, 1, 2
TARGETS = {
    "smallest": SMALLEST,
    "random": RANDOM,
    "largest": LARGEST,
    "S": SMALLEST,
    "R": RANDOM,
    "L": LARGEST,
}


def target_code(name: str | int) -> int:
    """'smallest' / 'S' -> 0, 'random' / 'R' -> 1, 'largest' / 'L' -> 2 (ints pass through)."""
    if isinstance(name, (int, np.integer)) and int(name) in (SMALLEST, RANDOM, LARGEST):
        return int(name)
    if name not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)} or 0/1/2, got {name!r}")
    return TARGETS[name]


class Selection(NamedTuple):
    alive: jax.Array  # (O,) bool, after the event
    pruned: jax.Array  # (O,) bool, pruned by this event
    mean_pruned_score: jax.Array  # () mean score of the pruned filters, NaN if none


def prune_ranks(
    key: jax.Array, scores: jax.Array, alive: jax.Array, target: jax.Array
) -> jax.Array:
    """(O,) int32 rank of each filter in pruning order (0 = pruned first); dead filters rank last.

    Order: ascending score for S, descending for L, uniform random 32-bit keys for R (so the first k
    are k uniformly random alive filters). Ties are broken by filter index (stable sort). The target
    is a value: both orders are computed and one is picked, so S/R/L can be vmapped.
    """
    target = jnp.asarray(target, jnp.int32)
    dead = ~jnp.asarray(alive, bool)  # primary sort key: alive first, whatever the scores
    by_score = jnp.lexsort((jnp.where(target == LARGEST, -scores, scores), dead))
    by_chance = jnp.lexsort((jax.random.bits(key, scores.shape, jnp.uint32), dead))
    perm = jnp.where(target == RANDOM, by_chance, by_score)
    return jnp.zeros_like(perm).at[perm].set(jnp.arange(perm.shape[0], dtype=perm.dtype))


def select(
    key: jax.Array,
    scores: jax.Array,
    alive: jax.Array,
    k: jax.typing.ArrayLike,
    target: jax.typing.ArrayLike,
) -> Selection:
    """Prune the k lowest-ranked alive filters (k clipped to the number alive); k, target traceable.

    Args:
      key: used only by the random target (a fresh key per layer and event).
      scores: (O,) filter scores; dead filters' scores are ignored.
      alive: (O,) bool, filters not yet pruned.
      k: number to prune now (int, may be traced).
      target: SMALLEST, RANDOM or LARGEST (int, may be traced).
    """
    if scores.ndim != 1 or alive.shape != scores.shape:
        raise ValueError(
            f"scores and alive must be (O,) vectors, got {scores.shape}, {alive.shape}"
        )
    alive = alive.astype(bool)
    pruned = alive & (prune_ranks(key, scores, alive, target) < k)
    n = jnp.sum(pruned)
    mean = jnp.where(n > 0, jnp.sum(jnp.where(pruned, scores, 0.0)) / jnp.maximum(n, 1), jnp.nan)
    return Selection(alive & ~pruned, pruned, mean)


def select_layers(
    key: jax.Array,
    scores: Mapping[str, jax.Array],
    alive: Mapping[str, jax.Array],
    k: Mapping[str, jax.typing.ArrayLike],
    target: jax.typing.ArrayLike,
) -> dict[str, Selection]:
    """`select` for each layer; layer j of sorted(names) gets key fold_in(key, j)."""
    if set(scores) != set(alive) or set(scores) != set(k):
        raise ValueError(
            f"scores, alive and k must name the same layers: "
            f"{sorted(scores)}, {sorted(alive)}, {sorted(k)}"
        )
    return {
        name: select(jax.random.fold_in(key, j), scores[name], alive[name], k[name], target)
        for j, name in enumerate(sorted(scores))
    }


# --------------------------------------------------------------------------------------------------
# Instability and generalisation (notes §2)
# --------------------------------------------------------------------------------------------------


def instability(t_pre: jax.typing.ArrayLike, t_post: jax.typing.ArrayLike) -> jax.Array:
    """(t_pre - t_post) / t_pre, test accuracies just before and after the mask update (Fig. 1)."""
    t_pre = jnp.asarray(t_pre, jnp.float32)
    return (t_pre - jnp.asarray(t_post, jnp.float32)) / t_pre


def mean_stability(
    t_pre: jax.typing.ArrayLike, t_post: jax.typing.ArrayLike, is_event: jax.typing.ArrayLike
) -> jax.Array:
    """100 (1 - mean instability over pruning epochs); 100 for a run that never prunes.

    t_pre, t_post, is_event: (E,) per epoch; only epochs with is_event (e.g.
    `schedules.pruning_epochs(table)`) count. Vmap over seeds for (S, E) inputs.
    """
    is_event = jnp.asarray(is_event, bool)
    inst = jnp.where(is_event, instability(jnp.where(is_event, t_pre, 1.0), t_post), 0.0)
    n = jnp.sum(is_event)
    return 100.0 * (1.0 - jnp.sum(inst) / jnp.maximum(n, 1))


class Generalization(NamedTuple):
    best_test: jax.Array  # max test accuracy over epochs >= last pruning epoch
    best_epoch: jax.Array  # its epoch (first one on ties)
    train_at_best: jax.Array
    gap: jax.Array  # train - test at best_epoch


def generalization(
    test_acc: jax.typing.ArrayLike,
    train_acc: jax.typing.ArrayLike,
    last_prune_epoch: jax.typing.ArrayLike,
) -> Generalization:
    """Best (post-pruning) test accuracy at or after the last pruning epoch, and the train-test gap.

    test_acc, train_acc: (E,). last_prune_epoch < 0 (no pruning, scratch) takes the max over all
    epochs.
    """
    test_acc = jnp.asarray(test_acc, jnp.float32)
    train_acc = jnp.asarray(train_acc, jnp.float32)
    if test_acc.shape != train_acc.shape or test_acc.ndim != 1:
        raise ValueError(
            f"test_acc and train_acc must be equal (E,) arrays, got {test_acc.shape}, "
            f"{train_acc.shape}"
        )
    epochs = jnp.arange(test_acc.shape[0])
    best_epoch = jnp.argmax(jnp.where(epochs >= last_prune_epoch, test_acc, -jnp.inf))
    best, train = test_acc[best_epoch], train_acc[best_epoch]
    return Generalization(best, best_epoch, train, train - best)


# --------------------------------------------------------------------------------------------------
# Pruning as noise injection (notes §3). `tree` is one layer's arrays, all channels-last, e.g.
# {"kernel": (H, W, I, O), "scale": (O,), "bias": (O,)}; `targeted` is an (O,) bool vector.
# --------------------------------------------------------------------------------------------------


def _channels(targeted: jax.Array, y: jax.Array) -> jax.Array:
    """targeted (O,) reshaped to broadcast explicitly over y's leading axes (no rank promotion)."""
    _check_channel_last(y, "noise-injection leaf")
    if y.shape[-1] != targeted.shape[0]:
        raise ValueError(
            f"leaf with shape {y.shape} does not have {targeted.shape[0]} channels last"
        )
    return jnp.reshape(targeted.astype(bool), (1,) * (y.ndim - 1) + targeted.shape)


def _where_channels(targeted: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """Leafwise where(targeted[channel], a, b)."""

    def f(x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.where(_channels(targeted, y), jnp.asarray(x, y.dtype), y)

    return jax.tree.map(f, a, b)


def zero_channels(tree: PyTree, targeted: jax.Array) -> PyTree:
    """Targeted channels set to 0 in every leaf (the multiplication by Bernoulli(0) of §3.3)."""
    return _where_channels(targeted, jax.tree.map(jnp.zeros_like, tree), tree)


def temporary_zero(tree: PyTree, targeted: jax.Array) -> tuple[PyTree, PyTree]:
    """(zeroed tree, saved): `saved` is what `end_zeroing` needs to restore the old values exactly.

    `saved` holds the targeted channels' values (zeros elsewhere), leaf by leaf.
    """
    saved = jax.tree.map(lambda x: jnp.where(_channels(targeted, x), x, jnp.zeros_like(x)), tree)
    return zero_channels(tree, targeted), saved


def end_zeroing(
    tree: PyTree, saved: PyTree, targeted: jax.Array, restore: jax.typing.ArrayLike
) -> PyTree:
    """Return the targeted channels at their saved values (restore=True, Fig. D2 `cumu_*_restore`,
    bit for bit; updates made during the window are discarded) or at zero (restore=False, Fig. 5
    `iter_*_zeroing`). `restore` may be traced, so the two variants can be vmapped."""
    back = jax.tree.map(
        lambda s: jnp.where(jnp.asarray(restore, bool), s, jnp.zeros_like(s)), saved
    )
    return _where_channels(targeted, back, tree)


def unperturbed_std(kernel: jax.Array, unperturbed: jax.Array) -> jax.Array:
    """Standard deviation of the weights of the unperturbed filters (alive and not targeted).

    The reference estimates it from the first unmasked filter only; pooling them all is less noisy.
    """
    _check_channel_last(kernel, "kernel", 2)
    w = jnp.reshape(kernel, (-1, kernel.shape[-1])).astype(jnp.float32)
    m = jnp.broadcast_to(unperturbed.astype(jnp.float32), w.shape)
    n = jnp.maximum(jnp.sum(m), 1.0)
    mean = jnp.sum(w * m) / n
    return jnp.sqrt(jnp.sum(jnp.square(w - mean) * m) / n)


def add_channel_noise(
    key: jax.Array, tree: PyTree, targeted: jax.Array, std: jax.typing.ArrayLike
) -> PyTree:
    """w + N(0, std^2) on the targeted channels of every leaf (one key per leaf); others unchanged.

    Applied on every batch of a window, the noise accumulates (a random walk), as in the reference.
    """
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    noisy = [
        x + jnp.asarray(std, x.dtype) * jax.random.normal(k, x.shape, x.dtype)
        for k, x in zip(keys, leaves)
    ]
    return _where_channels(targeted, jax.tree.unflatten(treedef, noisy), tree)


def permanent_prune(
    tree: PyTree, alive: jax.Array, targeted: jax.Array
) -> tuple[PyTree, jax.Array]:
    """The control: zero the targeted channels for good and drop them from `alive`."""
    return zero_channels(tree, targeted), alive.astype(bool) & ~targeted.astype(bool)


class NoiseWindow(NamedTuple):
    """A noise window over training batches: perturb `targeted` while `remaining` > 0."""

    targeted: jax.Array  # (O,) bool
    remaining: jax.Array  # () int32 batches still to perturb


def open_window(targeted: jax.Array, num_batches: jax.typing.ArrayLike) -> NoiseWindow:
    return NoiseWindow(targeted.astype(bool), jnp.asarray(num_batches, jnp.int32))


def window_tick(window: NoiseWindow) -> tuple[NoiseWindow, jax.Array, jax.Array]:
    """Per training batch: (window after the batch, active, closing).

    `active`: perturb before this batch's forward pass. `closing`: this is the last active batch, so
    call `end_zeroing` after its update (the reference restores on the first forward pass after the
    window).
    """
    active = window.remaining > 0
    return (
        window._replace(remaining=jnp.maximum(window.remaining - 1, 0)),
        active,
        window.remaining == 1,
    )
