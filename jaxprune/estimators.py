"""Gradients of an expected loss over Bernoulli masks, J(s) = E_{m ~ Bern(sigmoid(s))} L(m).

`s` (the logits) is a pytree of arrays with the structure of the params; p = sigmoid(s) is the keep
probability of each entry (pft-pac-bayes.md, sections 1.2-1.3). Every estimator has one signature:

    estimate = fn(loss_fn, logits, key, num_samples, state=EmptyState(), *, params=None,
                  prunable=None, **options)          # -> Estimate(value, grads, state, param_grads)

* `loss_fn(mask) -> scalar`, or `loss_fn(mask, params) -> scalar` when `params` is given; then
  `param_grads` estimates grad_w E_m L(m, w) (joint training of weights and logits), else it is
  None. `mask` is a tree like `logits` (floats; relaxed estimators pass values in (0, 1)).
* `prunable`: optional tree of Python bools like `logits`; False leaves are never sampled (their
  mask is all ones) and get zero gradients (e.g. biases; see `jaxprune.masks.prunable_tree`).
* `value` is the mean loss over the masks used in the forward pass (an estimate of J).
* `state` is the estimator's state, passed in and returned: `EmptyState()` for every estimator
  except REINFORCE with a moving-average baseline. `Estimator.init(logits)` gives the initial one.
* `num_samples` (K, a Python int) is the number of mask samples; DisARM draws K antithetic *pairs*,
  i.e. 2K loss evaluations. `key` is split into one key per leaf, which draws all K samples of that
  leaf; the loss is vmapped over the K masks.

Nothing is jitted here: callers jit (and vmap over seeds). `get_estimator(name, **options)` returns
an `Estimator` with the options bound; `ESTIMATORS` lists the registered names.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks

PyTree = Any
LossFn = Callable[..., jax.Array]

BASELINES = ("none", "moving_average", "rloo")
MAX_EXACT_DIM = 16  # 2^16 = 65536 loss evaluations per call


class EmptyState(NamedTuple):
    """State of a stateless estimator (a pytree with no leaves)."""


class MovingAverageState(NamedTuple):
    """Exponential moving average of the mean sampled loss, with its step count for debiasing."""

    ema: jax.Array  # float32 scalar: sum_t (1 - decay) decay^(T - t) mean_k L(m_k^t)
    count: jax.Array  # int32 scalar: number of updates T


EstimatorState = EmptyState | MovingAverageState


class Estimate(NamedTuple):
    value: jax.Array  # mean loss over the forward-pass masks
    grads: PyTree  # like logits: estimate of grad_s J(s)
    state: EstimatorState  # the updated estimator state
    param_grads: PyTree = None  # like params: estimate of grad_w E_m L(m, w); None without params


# ----------------------------------------------------------------------------------------------
# Plumbing shared by all estimators: restriction to prunable leaves and sampling.


class _Problem(NamedTuple):
    """What an estimator sees: the prunable logit leaves (a list) and a loss on such lists."""

    logits: list[jax.Array]
    loss_fn: Callable[[list[jax.Array], PyTree], jax.Array]  # (sub_mask, params) -> scalar
    expand_mask: Callable[[list[jax.Array]], PyTree]  # sub-list of masks -> tree, ones elsewhere
    expand_grads: Callable[[list[jax.Array]], PyTree]  # sub-list of grads -> tree, zeros elsewhere


def _problem(loss_fn: LossFn, logits: PyTree, params: PyTree, prunable: PyTree | None) -> _Problem:
    leaves, treedef = jax.tree.flatten(logits)
    if not leaves:
        raise ValueError("logits has no leaves")
    for path, x in jax.tree_util.tree_leaves_with_path(logits):
        if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
            raise ValueError(
                f"logits leaf {masks.path_str(path)!r} must be floating, got {jnp.result_type(x)}"
            )
    if prunable is None:
        flags = [True] * len(leaves)
    else:
        masks.check_same_structure(logits, prunable, ("logits", "prunable"), shapes=False)
        flags = []
        for path, f in jax.tree_util.tree_leaves_with_path(prunable):
            if not isinstance(f, (bool, np.bool_)):
                name = masks.path_str(path)
                raise ValueError(
                    f"prunable leaf {name!r} must be a Python bool, got {type(f).__name__}"
                )
            flags.append(bool(f))
        if not any(flags):
            raise ValueError("prunable marks no leaf as prunable")
    sub = [x for x, f in zip(leaves, flags) if f]

    def expand(sub_leaves: list[jax.Array], fill: Callable[..., jax.Array]) -> PyTree:
        # Sample axes (if any) lead; a filled leaf gets them too so the tree stays rectangular.
        lead = jnp.shape(sub_leaves[0])[: jnp.ndim(sub_leaves[0]) - jnp.ndim(sub[0])]
        it = iter(sub_leaves)
        full = [
            next(it) if f else fill(lead + jnp.shape(x), jnp.result_type(x))
            for x, f in zip(leaves, flags)
        ]
        return jax.tree.unflatten(treedef, full)

    def sub_loss(sub_mask: list[jax.Array], p: PyTree) -> jax.Array:
        mask = expand(sub_mask, jnp.ones)
        return loss_fn(mask) if params is None else loss_fn(mask, p)

    return _Problem(sub, sub_loss, lambda m: expand(m, jnp.ones), lambda g: expand(g, jnp.zeros))


def _check_num_samples(num_samples: int, minimum: int = 1, why: str = "") -> int:
    if isinstance(num_samples, jax.core.Tracer) or int(num_samples) != num_samples:
        raise ValueError(f"num_samples must be a Python int (it sets shapes), got {num_samples!r}")
    if num_samples < minimum:
        raise ValueError(f"num_samples must be >= {minimum}{why}, got {num_samples}")
    return int(num_samples)


def _check_state(state: Any, cls: type, name: str) -> None:
    if not isinstance(state, cls):
        raise ValueError(
            f"{name} needs a {cls.__name__} (from Estimator.init), got {type(state).__name__}"
        )


def _uniforms(key: jax.Array, logits: list[jax.Array], num_samples: int) -> list[jax.Array]:
    """u ~ U[0, 1) per entry and sample; leaves (K, *shape); one key per leaf.

    One draw of shape (K, *shape) per leaf rather than a vmap over K sample keys: the same
    distribution, and half the random-number code to compile (threefry dominates XLA CPU compiles).
    """
    keys = masks.split_like(key, logits)
    return [
        jax.random.uniform(k, (num_samples,) + jnp.shape(s), jnp.result_type(s))
        for k, s in zip(keys, logits)
    ]


def _bernoulli(u: list[jax.Array], logits: list[jax.Array]) -> list[jax.Array]:
    """m = 1[u < sigmoid(s)] ~ Bern(sigmoid(s)); u has a leading sample axis."""
    return [(uu < jax.nn.sigmoid(s)[None]).astype(uu.dtype) for uu, s in zip(u, logits)]


def sample_masks(
    key: jax.Array, logits: PyTree, num_samples: int, prunable: PyTree | None = None
) -> PyTree:
    """K masks m ~ Bern(sigmoid(s)), leaves (K, *shape), ones on non-prunable leaves: exactly the
    masks that `reinforce` and `straight_through` use for the same (key, num_samples, prunable)."""
    num = _check_num_samples(num_samples)
    prob = _problem(lambda m: jnp.zeros(()), logits, None, prunable)
    return prob.expand_mask(_bernoulli(_uniforms(key, prob.logits, num), prob.logits))


def _over_samples(fn: Callable[..., Any], xs: Any, *shared: Any) -> Any:
    """fn(x_k, *shared) for each sample k (leading axis of xs), outputs stacked.

    On XLA CPU a loop (lax.map) is used: vmapping K masked networks turns every matmul into a batched
    matmul, which XLA CPU runs 3-10x slower than K plain ones (measured: K = 4 Concrete gradients of a
    256-256 MLP, 62 ms vmapped vs 19 ms looped). On accelerators the samples are vmapped.
    """
    if jax.default_backend() == "cpu":
        return jax.lax.map(lambda x: fn(x, *shared), xs)
    return jax.vmap(fn, in_axes=(0,) + (None,) * len(shared))(xs, *shared)


def _losses(
    prob: _Problem, masks_K: list[jax.Array], params: PyTree, num: int
) -> tuple[jax.Array, PyTree]:
    """L(m_k) for each sample (shape (K,)) and, with params, the mean over k of grad_w L(m_k, w)."""
    if params is None:
        losses = _over_samples(prob.loss_fn, masks_K, None)
        param_grads = None
    else:
        losses, g_K = _over_samples(jax.value_and_grad(prob.loss_fn, argnums=1), masks_K, params)
        param_grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), g_K)
    if losses.shape != (num,):
        raise ValueError(f"loss_fn must return a scalar, got shape {losses.shape[1:]}")
    return losses, param_grads


def _pathwise(
    prob: _Problem,
    relax: Callable[[list[jax.Array]], list[jax.Array]],
    logits: list[jax.Array],
    params: PyTree,
) -> tuple[jax.Array, list[jax.Array], PyTree]:
    """value and autodiff gradients of mean_k L(relax(s)_k) w.r.t. s (and w)."""

    def mean_loss(s: list[jax.Array], w: PyTree) -> jax.Array:
        losses = _over_samples(prob.loss_fn, relax(s), w)
        if losses.ndim != 1:
            raise ValueError(f"loss_fn must return a scalar, got shape {losses.shape[1:]}")
        return jnp.mean(losses)

    if params is None:
        value, grads = jax.value_and_grad(mean_loss)(logits, None)
        return value, grads, None
    value, (grads, param_grads) = jax.value_and_grad(mean_loss, argnums=(0, 1))(logits, params)
    return value, grads, param_grads


# ----------------------------------------------------------------------------------------------
# The estimators.


def moving_average_init(logits: PyTree | None = None) -> MovingAverageState:
    """Zero EMA, zero count (the first step then uses baseline 0)."""
    del logits
    return MovingAverageState(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))


def reinforce(
    loss_fn: LossFn,
    logits: PyTree,
    key: jax.Array,
    num_samples: int,
    state: EstimatorState = EmptyState(),
    *,
    params: PyTree = None,
    prunable: PyTree | None = None,
    baseline: str = "rloo",
    decay: float = 0.9,
) -> Estimate:
    """Score function (REINFORCE): g = (1/K) sum_k (L(m_k) - b_k) (m_k - p), p = sigmoid(s),
    since grad_s log Bern(m; sigmoid(s)) = m - p.

    Unbiased for any b_k independent of m_k (table in pft-pac-bayes.md section 2). Baselines:
      "none": b_k = 0;
      "moving_average": b = EMA of past mean losses, debiased as ema / (1 - decay^T) (0 at T = 0);
        state is a MovingAverageState, updated to decay * ema + (1 - decay) * mean_k L(m_k);
      "rloo": b_k = mean_{j != k} L(m_j) (leave-one-out, K >= 2), i.e.
        g = 1/(K - 1) sum_k (L(m_k) - Lbar) (m_k - p).
    """
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; known: {list(BASELINES)}")
    num = _check_num_samples(num_samples, 2 if baseline == "rloo" else 1, " for the rloo baseline")
    if baseline == "moving_average":
        _check_state(state, MovingAverageState, "reinforce with baseline='moving_average'")
    prob = _problem(loss_fn, logits, params, prunable)
    masks_K = _bernoulli(_uniforms(key, prob.logits, num), prob.logits)
    losses, param_grads = _losses(prob, masks_K, params, num)
    losses = jax.lax.stop_gradient(losses)
    value = jnp.mean(losses)
    if baseline == "none":
        weights = losses / num
    elif baseline == "rloo":
        weights = (losses - value) / (num - 1)
    else:
        debias = 1.0 - jnp.asarray(decay, jnp.float32) ** state.count.astype(jnp.float32)
        b = jnp.where(state.count > 0, state.ema / jnp.where(state.count > 0, debias, 1.0), 0.0)
        weights = (losses - b.astype(losses.dtype)) / num
        state = MovingAverageState(
            (decay * state.ema + (1.0 - decay) * value.astype(jnp.float32)).astype(jnp.float32),
            state.count + 1,
        )
    grads = [
        jnp.tensordot(weights.astype(m.dtype), m - jax.nn.sigmoid(s)[None], axes=1)
        for m, s in zip(masks_K, prob.logits)
    ]
    return Estimate(value, prob.expand_grads(grads), state, param_grads)


def relaxed_bernoulli(
    loss_fn: LossFn,
    logits: PyTree,
    key: jax.Array,
    num_samples: int,
    state: EstimatorState = EmptyState(),
    *,
    params: PyTree = None,
    prunable: PyTree | None = None,
    tau: jax.typing.ArrayLike = 0.5,
    hard: bool = False,
) -> Estimate:
    """Concrete / binary Gumbel-sigmoid: m~ = sigmoid((s + l) / tau), l ~ Logistic(0, 1), and
    g = grad_s mean_k L(m~_k) (Maddison et al. 2017; Jang et al. 2017). Biased; the bias -> 0 as
    tau -> 0 while the variance grows like 1/tau. With `hard`, the forward pass uses
    1[s + l > 0] ~ Bern(p) and the backward pass the soft m~ (straight-through Gumbel).
    `tau` may be a traced array (annealing schedules)."""
    # np.asarray first: np.min on a jax.Array calls its .min(), which a surrounding jit stages.
    if not isinstance(tau, jax.core.Tracer) and not float(np.min(np.asarray(tau))) > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    num = _check_num_samples(num_samples)
    prob = _problem(loss_fn, logits, params, prunable)

    keys = masks.split_like(key, prob.logits)
    noise_K = [
        jax.random.logistic(k, (num,) + jnp.shape(s), jnp.result_type(s))
        for k, s in zip(keys, prob.logits)
    ]

    def relax(s: list[jax.Array]) -> list[jax.Array]:
        out = []
        for x, l in zip(s, noise_K):
            z = (x[None] + l) / jnp.asarray(tau, x.dtype)
            soft = jax.nn.sigmoid(z)
            out.append(
                soft + jax.lax.stop_gradient((z > 0).astype(soft.dtype) - soft) if hard else soft
            )
        return out

    value, grads, param_grads = _pathwise(prob, relax, prob.logits, params)
    return Estimate(value, prob.expand_grads(grads), state, param_grads)


def straight_through(
    loss_fn: LossFn,
    logits: PyTree,
    key: jax.Array,
    num_samples: int,
    state: EstimatorState = EmptyState(),
    *,
    params: PyTree = None,
    prunable: PyTree | None = None,
) -> Estimate:
    """Straight-through Bernoulli (Bengio et al. 2013): forward m ~ Bern(p), backward
    g_i = mean_k dL/dm_i(m_k) * sigmoid'(s_i), via m = m_hard + p - stop_gradient(p).
    Biased (an ablation)."""
    num = _check_num_samples(num_samples)
    prob = _problem(loss_fn, logits, params, prunable)
    hard_K = _bernoulli(_uniforms(key, prob.logits, num), prob.logits)

    def relax(s: list[jax.Array]) -> list[jax.Array]:
        return [
            m + (jax.nn.sigmoid(x) - jax.lax.stop_gradient(jax.nn.sigmoid(x)))[None]
            for m, x in zip(hard_K, s)
        ]

    value, grads, param_grads = _pathwise(prob, relax, prob.logits, params)
    return Estimate(value, prob.expand_grads(grads), state, param_grads)


def disarm(
    loss_fn: LossFn,
    logits: PyTree,
    key: jax.Array,
    num_samples: int,
    state: EstimatorState = EmptyState(),
    *,
    params: PyTree = None,
    prunable: PyTree | None = None,
) -> Estimate:
    """DisARM (Dong, Mnih & Tucker 2020; factorised Bernoulli with logits s): antithetic pairs
    b = 1[u < p], b' = 1[1 - u < p] with shared u ~ U[0, 1), and
      g = (1/K) sum_k 1/2 (L(b_k) - L(b'_k)) (-1)^{b'_k} 1[b_k != b'_k] sigmoid(|s|).
    Unbiased; 2K loss evaluations. value and param_grads average over all 2K masks."""
    num = _check_num_samples(num_samples)
    prob = _problem(loss_fn, logits, params, prunable)
    u_K = _uniforms(key, prob.logits, num)
    b_K = _bernoulli(u_K, prob.logits)
    b2_K = _bernoulli([1.0 - u for u in u_K], prob.logits)
    losses, param_grads = _losses(
        prob, [jnp.concatenate([b, b2]) for b, b2 in zip(b_K, b2_K)], params, 2 * num
    )
    losses = jax.lax.stop_gradient(losses)
    half_diff = 0.5 * (losses[:num] - losses[num:]) / num  # (K,)
    grads = []
    for b, b2, s in zip(b_K, b2_K, prob.logits):
        coord = (1.0 - 2.0 * b2) * (b != b2).astype(b.dtype) * jax.nn.sigmoid(jnp.abs(s))[None]
        grads.append(jnp.tensordot(half_diff.astype(b.dtype), coord, axes=1))
    return Estimate(jnp.mean(losses), prob.expand_grads(grads), state, param_grads)


def exact(
    loss_fn: LossFn,
    logits: PyTree,
    key: jax.Array,
    num_samples: int,
    state: EstimatorState = EmptyState(),
    *,
    params: PyTree = None,
    prunable: PyTree | None = None,
    max_dim: int = MAX_EXACT_DIM,
) -> Estimate:
    """J(s) = sum over all 2^d masks of prod_i p_i^m_i (1 - p_i)^(1 - m_i) L(m), differentiated by
    autodiff (d = number of prunable entries <= max_dim). `key` and `num_samples` are ignored."""
    del key, num_samples
    prob = _problem(loss_fn, logits, params, prunable)
    sizes = [int(np.size(s)) for s in prob.logits]
    d = sum(sizes)
    if d > max_dim:
        raise ValueError(
            f"exact enumerates 2^d masks; d = {d} prunable entries > max_dim = {max_dim}"
        )
    dtype = jnp.result_type(*prob.logits)
    bits = (np.arange(2**d)[:, None] >> np.arange(d)[None, :]) & 1  # (2^d, d), host constant
    offsets = np.cumsum([0] + sizes)
    all_masks = [
        jnp.asarray(bits[:, o : o + n].reshape((2**d,) + jnp.shape(s)), dtype)
        for o, n, s in zip(offsets[:-1], sizes, prob.logits)
    ]
    losses_fn = jax.vmap(prob.loss_fn, in_axes=(0, None))

    def log_prob(m: jax.Array, s: jax.Array) -> jax.Array:
        # log P(m) summed over one leaf's entries, for each of the 2^d masks: shape (2^d,).
        lp = m * jax.nn.log_sigmoid(s)[None] + (1 - m) * jax.nn.log_sigmoid(-s)[None]
        return jnp.sum(lp.reshape(2**d, -1), axis=1)

    def expected(s: list[jax.Array], w: PyTree) -> jax.Array:
        log_p = sum(log_prob(m, x) for m, x in zip(all_masks, s))
        losses = losses_fn(all_masks, w)
        if losses.shape != (2**d,):
            raise ValueError(f"loss_fn must return a scalar, got shape {losses.shape[1:]}")
        return jnp.sum(jnp.exp(log_p) * losses)

    if params is None:
        value, grads = jax.value_and_grad(expected)(prob.logits, None)
        param_grads = None
    else:
        value, (grads, param_grads) = jax.value_and_grad(expected, argnums=(0, 1))(
            prob.logits, params
        )
    return Estimate(value, prob.expand_grads(grads), state, param_grads)


# ----------------------------------------------------------------------------------------------
# Registry.

EstimatorFn = Callable[..., Estimate]

ESTIMATORS: dict[str, tuple[EstimatorFn, dict[str, Any]]] = {
    "reinforce": (reinforce, {"baseline": "none"}),
    "reinforce_ma": (reinforce, {"baseline": "moving_average"}),
    "rloo": (reinforce, {"baseline": "rloo"}),
    "concrete": (relaxed_bernoulli, {"hard": False}),
    "concrete_st": (relaxed_bernoulli, {"hard": True}),
    "straight_through": (straight_through, {}),
    "disarm": (disarm, {}),
    "exact": (exact, {}),
}
UNBIASED = ("reinforce", "reinforce_ma", "rloo", "disarm", "exact")

_COMMON = ("loss_fn", "logits", "key", "num_samples", "state", "params", "prunable")


@dataclasses.dataclass(frozen=True)
class Estimator:
    """A registered estimator with its options bound; call it with the common signature."""

    name: str
    fn: EstimatorFn
    options: tuple[tuple[str, Any], ...] = ()

    def init(self, logits: PyTree | None = None) -> EstimatorState:
        """MovingAverageState for REINFORCE with a moving-average baseline, else EmptyState()."""
        if self.fn is reinforce and dict(self.options).get("baseline") == "moving_average":
            return moving_average_init(logits)
        return EmptyState()

    def __call__(
        self,
        loss_fn: LossFn,
        logits: PyTree,
        key: jax.Array,
        num_samples: int,
        state: EstimatorState = EmptyState(),
        *,
        params: PyTree = None,
        prunable: PyTree | None = None,
    ) -> Estimate:
        return self.fn(
            loss_fn,
            logits,
            key,
            num_samples,
            state,
            params=params,
            prunable=prunable,
            **dict(self.options),
        )


def get_estimator(name: str, **options: Any) -> Estimator:
    """ESTIMATORS[name] with `options` overriding its presets: get_estimator("concrete", tau=0.1).

    Options are the estimator's keyword arguments (baseline, decay, tau, hard, max_dim); unknown
    names or options raise ValueError.
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown estimator {name!r}; known: {sorted(ESTIMATORS)}")
    fn, presets = ESTIMATORS[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in _COMMON]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"estimator {name!r}: unknown options {unknown}; allowed: {allowed}")
    merged = {**presets, **options}
    if "baseline" in merged and merged["baseline"] not in BASELINES:
        raise ValueError(f"unknown baseline {merged['baseline']!r}; known: {list(BASELINES)}")
    if "decay" in merged and not 0.0 <= float(merged["decay"]) < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {merged['decay']}")
    if "tau" in merged and not float(np.min(merged["tau"])) > 0:
        raise ValueError(f"tau must be > 0, got {merged['tau']}")
    return Estimator(name, fn, tuple(sorted(merged.items())))
