"""Self-bounded learning: train a stochastic masked network by minimising a PAC-Bayes bound, then
certify it (shared/papers/pft-pac-bayes.md §5, §5.4; issue 5 §2).

Data-dependent prior (§5.4). The training set S is split once, from a seed, into a prior set S_α
(a fraction α) and a bound set S_{1-α}. The prior P is built from S_α only: weights w_P trained on
S_α, then PFT keep-probabilities p_P on S_α, smoothed to [ε, 1-ε] (`pac_bayes.smooth_prior`) so
every KL is finite. N counts bound-set points only, and the certificate evaluates the posterior on
the bound set only (`certify` checks that the two index sets are disjoint).

Posteriors Q = Π Bern(m_i; σ(s_i)) · N(w; μ, diag σ²) on θ = m ⊙ w, three variants (§5.3):

    "mask"   train the mask logits s; weights fixed to w_P          KL = KL_Bern(s‖s_P)
    "gauss"  train μ, log σ; mask law fixed to the prior's Bern(p_P)  KL = KL_N(μ, σ‖w_P, σ_P)
    "both"   train s, μ and log σ                                   KL = KL_Bern + KL_N

Training loss: the surrogate l = min(CE, C)/C ∈ [0, 1] with C = log(1/p_min) (cross-entropy with the
predicted probability clamped at p_min, rescaled; PBB's choice). The certificate uses the 0-1 error.
Objective: BOUNDS[name](L̂_surrogate, KL, N, δ/K) for any name in `pac_bayes.BOUNDS` (the kl bound
through the differentiable kl⁻¹), K the size of the hyperparameter grid looked at (union bound).
Gradients: ∂bound/∂L̂ times the estimator's gradient of L̂ (mask logits through
`jaxprune.estimators`, Gaussian weights through the reparametrisation w = μ + σ ε), plus the exact
gradient of the KL path. The objective is chosen by a traced index (`objective_index`), so one
compiled program serves every bound and vmaps over seeds, prior grids and objectives.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from jaxprune import data as data_lib
from jaxprune import estimators as est_lib
from jaxprune import masks, pac_bayes, train

PyTree = Any

VARIANTS = ("mask", "gauss", "both")
OBJECTIVES = tuple(pac_bayes.BOUNDS)  # ("classic", "kl", "quad", "lambda", "catoni")


# ------------------------------------------------------------------------------------ the split


class PriorBoundSplit(NamedTuple):
    """Disjoint sorted indices into the training set: S_α builds the prior, the rest bounds."""

    prior_idx: np.ndarray
    bound_idx: np.ndarray
    prior_hash: str  # pac_bayes.split_hash(prior_idx)
    bound_hash: str  # pac_bayes.split_hash(bound_idx)


def split_prior_bound(num_examples: int, alpha: float, seed: int) -> PriorBoundSplit:
    """S = S_α ⊔ S_{1-α}, |S_α| = round(α n), from one permutation drawn from `seed` only."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1) (both sets non-empty), got {alpha}")
    parts = data_lib.split_indices(num_examples, {"prior": alpha, "bound": 1.0 - alpha}, seed)
    prior, bound = parts["prior"], parts["bound"]
    pac_bayes.check_split(bound, prior)
    return PriorBoundSplit(prior, bound, pac_bayes.split_hash(prior), pac_bayes.split_hash(bound))


def prior_dataset(ds: data_lib.Dataset, split: PriorBoundSplit) -> data_lib.Dataset:
    """The dataset the prior may see: train = S_α only (test kept for monitoring)."""
    return ds._replace(train=data_lib.take(ds.train, split.prior_idx))


def bound_set(ds: data_lib.Dataset, split: PriorBoundSplit) -> data_lib.Split:
    """S_{1-α}: the only points the bound's empirical risk and N may use."""
    return data_lib.take(ds.train, split.bound_idx)


# ------------------------------------------------------------------------------------ prior, posterior


class Prior(NamedTuple):
    """P = Π Bern(σ(s_P)) · N(w_P, σ_P² I); `log_std` is one scalar (the prior scale)."""

    mask_logits: PyTree
    mean: PyTree
    log_std: jax.Array


class Posterior(NamedTuple):
    """Q = Π Bern(σ(s)) · N(μ, diag σ²); trees with the params' structure."""

    mask_logits: PyTree
    mean: PyTree
    log_std: PyTree


def make_prior(
    params: PyTree, pft_logits: PyTree, prunable: PyTree, eps: jax.typing.ArrayLike,
    log_std: jax.typing.ArrayLike,
) -> Prior:
    """Prior from S_α-trained weights and PFT logits, p_P smoothed to [ε, 1-ε] on prunable leaves.

    Non-prunable leaves (biases) are never masked: their logits are unused and excluded from the KL.
    """
    probs = pac_bayes.smooth_prior(masks.logits_to_probs(pft_logits), eps, prunable)
    logits = jax.tree.map(lambda p: jnp.log(p) - jnp.log1p(-p), probs)
    return Prior(logits, params, jnp.asarray(log_std, jnp.float32))


def init_posterior(prior: Prior) -> Posterior:
    """Q = P at the start (KL = 0); σ_Q = σ_P on every weight."""
    log_std = jax.tree.map(lambda w: jnp.full(jnp.shape(w), prior.log_std, jnp.float32), prior.mean)
    return Posterior(prior.mask_logits, prior.mean, log_std)


def _check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}")


def _prunable_only(tree: PyTree, prunable: PyTree) -> PyTree:
    # Zero logits on both sides of a never-sampled leaf contribute KL(Bern(½)‖Bern(½)) = 0.
    return jax.tree.map(lambda x, f: x if f else jnp.zeros_like(x), tree, prunable)


def kl_divergence(post: Posterior, prior: Prior, prunable: PyTree, variant: str) -> jax.Array:
    """KL(Q‖P) of the variant (module docstring); parts shared by Q and P contribute 0."""
    _check_variant(variant)
    kl = jnp.zeros(())
    if variant in ("mask", "both"):
        kl = kl + pac_bayes.kl_bernoulli_logits(
            _prunable_only(post.mask_logits, prunable), _prunable_only(prior.mask_logits, prunable)
        )
    if variant in ("gauss", "both"):
        kl = kl + pac_bayes.kl_gaussian_log_std(post.mean, post.log_std, prior.mean, prior.log_std)
    return kl


# ------------------------------------------------------------------------------------ losses, sampling


def surrogate_loss(logits: jax.Array, y: jax.Array, p_min: float) -> jax.Array:
    """mean_j min(CE_j, C)/C ∈ [0, 1], C = log(1/p_min): CE with the class probability clamped at
    p_min, rescaled (PBB's bounded cross-entropy). Zero gradient where CE > C."""
    c = math.log(1.0 / p_min)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.mean(jnp.minimum(ce, c)) / c


def _normal_like(key: jax.Array, tree: PyTree) -> PyTree:
    keys = masks.split_like(key, tree)
    return jax.tree.map(lambda k, x: jax.random.normal(k, jnp.shape(x), jnp.float32), keys, tree)


def sample_network(
    key: jax.Array, post: Posterior, prunable: PyTree, variant: str
) -> tuple[PyTree, PyTree]:
    """(m, w) ~ Q: m ~ Bern(σ(s)) on prunable leaves (ones elsewhere); w = μ + σ ε (or μ = w_P for
    the "mask" variant, whose weights are deterministic)."""
    _check_variant(variant)
    mask_key, w_key = jax.random.split(key)
    mask = jax.tree.map(lambda m: m[0], est_lib.sample_masks(mask_key, post.mask_logits, 1, prunable))
    if variant == "mask":
        return mask, post.mean
    eps = _normal_like(w_key, post.mean)
    w = jax.tree.map(lambda mu, ls, e: mu + jnp.exp(ls) * e, post.mean, post.log_std, eps)
    return mask, w


def objective_value(
    index: jax.Array, emp_risk: jax.Array, kl: jax.Array, n: jax.typing.ArrayLike, delta: jax.typing.ArrayLike
) -> jax.Array:
    """BOUNDS[OBJECTIVES[index]](L̂, KL, n, δ) with a traced index (lambda at λ*, Catoni at C = 1)."""
    branches = [lambda e, k, name=name: pac_bayes.BOUNDS[name](e, k, n, delta) for name in OBJECTIVES]
    return jax.lax.switch(index, branches, emp_risk, kl)


# ------------------------------------------------------------------------------------ training


@dataclasses.dataclass(frozen=True)
class SBConfig:
    variant: str = "mask"  # "mask", "gauss" or "both"
    estimator: str = "concrete"  # mask-logit gradients: a name in estimators.ESTIMATORS
    estimator_options: tuple[tuple[str, Any], ...] = (("tau", 0.5),)
    num_samples: int = 2  # K sampled networks per step
    steps: int = 500
    batch_size: int = 256
    mask_lr: float = 0.05  # Adam on the mask logits
    weight_lr: float = 1e-3  # Adam on μ and log σ
    p_min: float = 1e-4  # surrogate clamp, C = log(1/p_min)
    delta: float = 0.025  # PAC-Bayes budget before the union bound
    grid_size: int = 1  # hyperparameter values looked at: the objective uses δ/grid_size

    def __post_init__(self) -> None:
        _check_variant(self.variant)
        if not 0.0 < self.p_min < 1.0:
            raise ValueError(f"p_min must lie in (0, 1), got {self.p_min}")
        for name in ("num_samples", "steps", "batch_size", "grid_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"delta must lie in (0, 1), got {self.delta}")
        for name in ("mask_lr", "weight_lr"):
            if not getattr(self, name) > 0.0:  # a negative rate would push the bound up, silently
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        est_lib.get_estimator(self.estimator, **dict(self.estimator_options))  # unknown: raises


class SBState(struct.PyTreeNode):
    """One run's state (seed, grid point, objective); `key` is raw key data."""

    posterior: Posterior
    opt_state: optax.OptState
    est_state: Any
    step: jax.Array
    key: jax.Array


def _optimizer(cfg: SBConfig) -> optax.GradientTransformation:
    labels = Posterior("mask", "weights", "weights")
    return optax.multi_transform(
        {"mask": optax.adam(cfg.mask_lr), "weights": optax.adam(cfg.weight_lr)},
        lambda post: Posterior(*[jax.tree.map(lambda _, l=l: l, t) for t, l in zip(post, labels)]),
    )


def init_state(key: jax.Array, prior: Prior, cfg: SBConfig) -> SBState:
    post = init_posterior(prior)
    est_state = est_lib.get_estimator(cfg.estimator, **dict(cfg.estimator_options)).init(
        post.mask_logits
    )
    return SBState(post, _optimizer(cfg).init(post), est_state, jnp.zeros((), jnp.int32),
                   jax.random.key_data(key))


def _loss_grads(
    post: Posterior, est_state: Any, key: jax.Array, x: jax.Array, y: jax.Array, *,
    model: nn.Module, cfg: SBConfig, prunable: PyTree,
) -> tuple[jax.Array, Posterior, Any]:
    """(L̂, ∇L̂ as a Posterior tree, estimator state): surrogate risk of K sampled networks."""
    mask_key, w_key = jax.random.split(key)
    zeros = jax.tree.map(jnp.zeros_like, post)

    def loss(mask: PyTree, w: PyTree) -> jax.Array:
        return surrogate_loss(train.forward(model, w, {}, mask, x, train=False)[0], y, cfg.p_min)

    def weights(wp: tuple[PyTree, PyTree], eps: PyTree) -> PyTree:
        return jax.tree.map(lambda mu, ls, e: mu + jnp.exp(ls) * e, wp[0], wp[1], eps)

    if cfg.variant == "gauss":  # hard masks from the fixed law; pathwise (reparametrised) in μ, σ
        masks_K = est_lib.sample_masks(mask_key, post.mask_logits, cfg.num_samples, prunable)
        eps_K = jax.tree.map(
            lambda k, w: jax.random.normal(k, (cfg.num_samples,) + jnp.shape(w), jnp.float32),
            masks.split_like(w_key, post.mean), post.mean)

        def mean_loss(wp):
            return jnp.mean(jax.lax.map(lambda me: loss(me[0], weights(wp, me[1])), (masks_K, eps_K)))

        value, (g_mu, g_ls) = jax.value_and_grad(mean_loss)((post.mean, post.log_std))
        return value, zeros._replace(mean=g_mu, log_std=g_ls), est_state
    estimator = est_lib.get_estimator(cfg.estimator, **dict(cfg.estimator_options))
    if cfg.variant == "mask":
        est = estimator(lambda m: loss(m, post.mean), post.mask_logits, mask_key, cfg.num_samples,
                        est_state, prunable=prunable)
        return est.value, zeros._replace(mask_logits=est.grads), est.state
    eps = _normal_like(w_key, post.mean)  # one weight draw shared by the K masks of this step
    est = estimator(lambda m, wp: loss(m, weights(wp, eps)), post.mask_logits, mask_key,
                    cfg.num_samples, est_state, params=(post.mean, post.log_std), prunable=prunable)
    g_mu, g_ls = est.param_grads
    return est.value, Posterior(est.grads, g_mu, g_ls), est.state


def train_step(
    state: SBState, x: jax.Array, y: jax.Array, objective_index: jax.Array, *, prior: Prior,
    model: nn.Module, cfg: SBConfig, prunable: PyTree, n_bound: jax.typing.ArrayLike,
) -> tuple[SBState, dict[str, jax.Array]]:
    """One Optax step on bound(L̂, KL(Q‖P), N, δ/K): ∂b/∂L̂ · ĝ_L + ∇(b through KL)."""
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.step)
    post = state.posterior
    value, g_loss, est_state = _loss_grads(post, state.est_state, key, x, y, model=model, cfg=cfg,
                                           prunable=prunable)
    delta = pac_bayes.union_delta(cfg.delta, cfg.grid_size)

    def bound(emp: jax.Array, q: Posterior) -> tuple[jax.Array, jax.Array]:
        kl = kl_divergence(q, prior, prunable, cfg.variant)
        n = jnp.asarray(n_bound, jnp.float32)
        return objective_value(objective_index, emp, kl, n, delta), kl

    (obj, kl), (d_emp, g_kl) = jax.value_and_grad(bound, argnums=(0, 1), has_aux=True)(value, post)
    grads = jax.tree.map(lambda a, b: d_emp * a + b, g_loss, g_kl)
    updates, opt_state = _optimizer(cfg).update(grads, state.opt_state, post)
    new = state.replace(posterior=optax.apply_updates(post, updates), opt_state=opt_state,
                        est_state=est_state, step=state.step + 1)
    return new, {"objective": obj, "surrogate": value, "kl": kl}


def fit(
    key: jax.Array, prior: Prior, x: jax.Array, y: jax.Array, n_bound: jax.typing.ArrayLike,
    objective_index: jax.Array, *, model: nn.Module, cfg: SBConfig, prunable: PyTree,
) -> tuple[SBState, dict[str, jax.Array]]:
    """cfg.steps steps in one scan, from Q = P; batches and samples are functions of `key` only.

    (x, y): the bound set in its first `n_bound` rows (rows beyond are padding, never drawn), so
    bound sets of different sizes (an α grid) share one compiled program. Batches are drawn
    uniformly with replacement from the n_bound rows. Single run: vmap over (key, prior,
    objective_index) for seeds, prior grids and objectives.
    """
    data_key, run_key = jax.random.split(key)
    state = init_state(run_key, prior, cfg)
    idx = jax.random.randint(data_key, (cfg.steps, cfg.batch_size), 0, n_bound)

    def body(s, idx_b):
        # Marked for the "batch" mesh axis (identity without one): data parallelism inside a seed.
        xb, yb = train.minibatch(x, y, idx_b)
        return train_step(s, xb, yb, objective_index, prior=prior, model=model, cfg=cfg,
                          prunable=prunable, n_bound=n_bound)

    return jax.lax.scan(body, state, idx)


# ------------------------------------------------------------------------------------ evaluation


def sampled_errors(
    key: jax.Array, post: Posterior, x: jax.Array, y: jax.Array, *, model: nn.Module,
    prunable: PyTree, variant: str, num_networks: int, batch_size: int = 2000,
    networks_per_batch: int | None = None,
) -> jax.Array:
    """(M,) 0-1 error rates of M networks h_k ~ Q on (x, y) (the bound set for a certificate).

    `networks_per_batch` vmaps that many networks at a time (GPU); None loops (XLA CPU)."""

    def one(k: jax.Array) -> jax.Array:
        mask, w = sample_network(k, post, prunable, variant)
        return train.error_rate(train.predict(model, w, {}, mask, x, batch_size), y)

    return jax.lax.map(one, jax.random.split(key, num_networks), batch_size=networks_per_batch)


def per_example_errors(
    key: jax.Array, post: Posterior, x: jax.Array, y: jax.Array, *, model: nn.Module,
    prunable: PyTree, variant: str, repeats: int = 1, batch_size: int = 256,
) -> jax.Array:
    """(R, n) 0-1 losses 1[h_ri(x_i) != y_i], a FRESH network h_ri ~ Q for every example and repeat.

    The R n losses are independent Bernoullis whose mean is the Gibbs empirical risk
    R̂_S(Q) = (1/n) Σ_i E_{h~Q} 1[h(x_i) != y_i], so the kl-Chernoff bound (Hoeffding 1963, Thm 1,
    which allows different means) gives kl(mean || R̂_S(Q)) <= log(2/δ')/(R n) w.p. 1 - δ': the
    Monte Carlo term of `pac_bayes.certificate` with M = R n samples, for the cost of R networks on S
    (vs M networks on all of S in Dziugaite & Roy's `sampled_errors`). Each example is a
    batch-of-one forward pass with its own weights (vmapped in chunks of `batch_size`): cheap for
    MLPs, slow for convolutions on XLA CPU.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples, y has {y.shape[0]}")
    n = x.shape[0]

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        k, xi, yi = args
        mask, w = sample_network(k, post, prunable, variant)
        logits, _ = train.forward(model, w, {}, mask, xi[None], train=False)
        return (jnp.argmax(logits[0], -1) != yi).astype(jnp.float32)

    def rep(k: jax.Array) -> jax.Array:
        return jax.lax.map(one, (jax.random.split(k, n), x, y), batch_size=min(batch_size, n))

    return jax.lax.map(rep, jax.random.split(key, repeats))


def threshold_mask(post: Posterior, prunable: PyTree) -> PyTree:
    """The deterministic network's mask 1[σ(s) > 1/2] (its weights are the posterior mean)."""
    return masks.threshold(masks.logits_to_probs(post.mask_logits), prunable)


def threshold_error(
    post: Posterior, x: jax.Array, y: jax.Array, *, model: nn.Module, prunable: PyTree,
    batch_size: int = 2000,
) -> jax.Array:
    """0-1 error of the thresholded network (mask 1[p > 1/2], weights μ)."""
    mask = threshold_mask(post, prunable)
    return train.error_rate(train.predict(model, post.mean, {}, mask, x, batch_size), y)


def certify(
    errors_M: jax.typing.ArrayLike, kl: float, split: PriorBoundSplit, *, delta: float,
    delta_prime: float, grid_size: int, bound: str = "kl",
) -> pac_bayes.Certificate:
    """pac_bayes.certificate on the bound set: n = |S_{1-α}|, prior-set indices checked disjoint.

    errors_M must come from `sampled_errors` on `bound_set(ds, split)`, never on prior points."""
    return pac_bayes.certificate(
        errors_M, kl, n=int(split.bound_idx.size), delta=delta, delta_prime=delta_prime,
        bound_indices=split.bound_idx, prior_indices=split.prior_idx, grid_size=grid_size,
        bound=bound)
