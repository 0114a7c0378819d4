"""PAC-Bayes bound mathematics for stochastic masks (and Gaussian weights); the final certificate.

Notation (shared/papers/pft-pac-bayes.md §5): loss in [0, 1], n i.i.d. bound-set points not used
to build the prior P, posterior Q, emp = L̂_S(Q), KL = KL(Q‖P), and the PAC-Bayes-kl right-hand side

    B = (KL + log(2√n/δ)) / n                                   (Maurer 2004, Thm 5; Seeger 2002)

Every divergence, kl⁻¹ and bound is a pure jnp function: it jits, vmaps over seeds and grids and is
differentiable (kl⁻¹ through an implicit-function-theorem JVP), so a bound can be a training
objective.
Input checks raise ValueError on concrete inputs only; under jit an infinite KL comes back as +inf.
`certificate` is the host-side end point: it checks the split and the confidence budget and
evaluates the bound in float64.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxprune import masks

PyTree = Any
ArrayLike = jax.typing.ArrayLike

_KL_INV_ITERS = 64  # bisection steps: 2^-64 is below the float64 spacing anywhere in [0, 1]


# ------------------------------------------------------------------------------------ input checks


def _concrete(*xs: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def _check_interval(name: str, x: ArrayLike, lo: float, hi: float, closed: str = "()") -> None:
    """ValueError unless every entry of a concrete `x` lies in the interval (`closed` e.g. '[)')."""
    if not _concrete(x):
        return
    a = np.asarray(x, np.float64)
    ok = (a >= lo if closed[0] == "[" else a > lo) & (a <= hi if closed[1] == "]" else a < hi)
    if not np.all(ok):  # NaN fails both comparisons
        raise ValueError(
            f"{name} must lie in {closed[0]}{lo}, {hi}{closed[1]}, got {a[~ok].ravel()[:3]}"
        )


def _check_count(name: str, x: Any, minimum: int = 1) -> None:
    if not _concrete(x):
        return
    a = np.asarray(x)
    if not np.all(a >= minimum) or not np.all(a == np.floor(a)):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {a.ravel()[:3]}")


def _pair(post: PyTree, prior: PyTree, names: tuple[str, str]) -> tuple[list[str], list, list]:
    """Leaf paths and aligned leaves; a bare scalar prior is broadcast to every posterior leaf."""
    with_path = jax.tree_util.tree_leaves_with_path(post)
    paths = [masks.path_str(p) or "<root>" for p, _ in with_path]
    post_leaves = [x for _, x in with_path]
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(prior)) and jnp.ndim(prior) == 0:
        return paths, post_leaves, [prior] * len(post_leaves)
    masks.check_same_structure(post, prior, names, shapes=False)
    prior_leaves = jax.tree.leaves(prior)
    for path, a, b in zip(paths, post_leaves, prior_leaves):
        if jnp.shape(b) not in ((), jnp.shape(a)):
            raise ValueError(
                f"leaf {path!r}: {names[1]} shape {jnp.shape(b)} must be () or {names[0]} shape "
                f"{jnp.shape(a)}"
            )
    return paths, post_leaves, prior_leaves


def _raise_infinite(path: str, count: int, what: str) -> None:
    raise ValueError(
        f"leaf {path!r}: the prior is deterministic ({what}) at {count} entries where the "
        "posterior differs, so KL(Q‖P) is infinite. The prior must be smoothed, e.g. "
        "smooth_prior(p, eps=1e-3), which clips p to [eps, 1 - eps]."
    )


# ------------------------------------------------------------------------------------ divergences


def _xlog_ratio(x: jax.Array, y: jax.Array) -> jax.Array:
    """x log(x / y) with 0 log(0 / y) = 0; double `where` keeps gradients finite at x = 0."""
    ok = x > 0
    xs, ys = jnp.where(ok, x, 1.0), jnp.where(ok, y, 1.0)
    return jnp.where(ok, xs * jnp.log(xs / ys), 0.0)


def binary_kl(q: ArrayLike, p: ArrayLike) -> jax.Array:
    """kl(q‖p) = q log(q/p) + (1-q) log((1-q)/(1-p)), elementwise; +inf if p ∈ {0,1} and q ≠ p."""
    q, p = jnp.asarray(q), jnp.asarray(p)
    return _xlog_ratio(q, p) + _xlog_ratio(1.0 - q, 1.0 - p)


def _bernoulli_kl_logits(a: jax.Array, b: jax.Array) -> jax.Array:
    """KL(Bern(σ(a))‖Bern(σ(b))) from logits: σ(a)(logσ(a) - logσ(b)) + σ(-a)(logσ(-a) - logσ(-b)).

    Log-sigmoids never round 1 - σ to 0, so the KL stays accurate for |logits| ≫ 1 (unlike
    binary_kl on probabilities). a == b (including ±inf on both sides) gives exactly 0.
    """
    eq = a == b
    a, b = jnp.where(eq, 0.0, a), jnp.where(eq, 0.0, b)
    q, q_bar = jax.nn.sigmoid(a), jax.nn.sigmoid(-a)
    t1 = jnp.where(q > 0, q * (jax.nn.log_sigmoid(a) - jax.nn.log_sigmoid(b)), 0.0)
    t0 = jnp.where(q_bar > 0, q_bar * (jax.nn.log_sigmoid(-a) - jax.nn.log_sigmoid(-b)), 0.0)
    return jnp.where(eq, 0.0, t1 + t0)


def kl_bernoulli(q: PyTree, p: PyTree) -> jax.Array:
    """KL(Bern(q)‖Bern(p)) = Σ_i kl(q_i‖p_i) over all leaves of probability trees (notes §5.2).

    `p` has q's structure or is one scalar for every entry. Raises ValueError (concrete inputs) if
    some p_i ∈ {0, 1} with q_i ≠ p_i: a deterministic prior mask must be smoothed (smooth_prior).
    """
    paths, qs, ps = _pair(q, p, ("posterior", "prior"))
    masks.check_probs(q)
    masks.check_probs(p)
    if _concrete(qs, ps):
        for path, a, b in zip(paths, qs, ps):
            a, b = np.asarray(a), np.broadcast_to(np.asarray(b), np.shape(a))
            bad = ((b == 0) | (b == 1)) & (a != b)
            if bad.any():
                _raise_infinite(path, int(bad.sum()), "p = 0 or 1")
    return sum((jnp.sum(binary_kl(a, b)) for a, b in zip(qs, ps)), jnp.zeros(()))


def kl_bernoulli_logits(q_logits: PyTree, p_logits: PyTree) -> jax.Array:
    """KL(Bern(σ(s_Q))‖Bern(σ(s_P))) from logit trees; the stable form for training mask logits."""
    paths, qs, ps = _pair(q_logits, p_logits, ("posterior logits", "prior logits"))
    if _concrete(qs, ps):
        for path, a, b in zip(paths, qs, ps):
            a, b = np.asarray(a), np.broadcast_to(np.asarray(b), np.shape(a))
            if np.isnan(a).any() or np.isnan(b).any():
                raise ValueError(f"leaf {path!r}: logits contain NaN")
            bad = np.isinf(b) & (a != b)
            if bad.any():
                _raise_infinite(path, int(bad.sum()), "logit ±inf")
    return sum(
        (jnp.sum(_bernoulli_kl_logits(jnp.asarray(a), jnp.asarray(b))) for a, b in zip(qs, ps)),
        jnp.zeros(()),
    )


def smooth_prior(p: PyTree, eps: ArrayLike, prunable: PyTree | None = None) -> PyTree:
    """p ↦ clip(p, eps, 1 - eps) (on `prunable` leaves only, if given): {0, 1} ↦ {eps, 1 - eps}.

    Interior probabilities are unchanged. Choosing eps by looking at the bound needs a union bound.
    """
    _check_interval("eps", eps, 0.0, 0.5, "(]")
    masks.check_probs(p)
    if prunable is None:
        return jax.tree.map(lambda x: jnp.clip(x, eps, 1.0 - eps), p)
    masks.check_same_structure(p, prunable, ("prior", "prunable"), shapes=False)
    return jax.tree.map(lambda x, f: jnp.clip(x, eps, 1.0 - eps) if f else x, p, prunable)


def _gaussian_kl_log_std(mq: jax.Array, lq: jax.Array, mp: jax.Array, lp: jax.Array) -> jax.Array:
    # ½[σ_Q²/σ_P² - 1 - log(σ_Q²/σ_P²) + (μ_Q-μ_P)²/σ_P²], with d = log σ_Q - log σ_P and
    # σ_Q²/σ_P² - 1 = expm1(2d) (accurate when the scales are close).
    d = lq - lp
    return 0.5 * (jnp.expm1(2.0 * d) - 2.0 * d + jnp.square(mq - mp) * jnp.exp(-2.0 * lp))


def kl_gaussian_log_std(
    mean_q: PyTree, log_std_q: PyTree, mean_p: PyTree, log_std_p: PyTree
) -> jax.Array:
    """KL(N(μ_Q, diag σ_Q²)‖N(μ_P, diag σ_P²)) = ½ Σ_i [σ_Qi²/σ_Pi² + (μ_Qi-μ_Pi)²/σ_Pi² - 1
    + log(σ_Pi²/σ_Qi²)] (notes §5.2), from log-std trees; the last three may each be one scalar."""
    paths, mq, mp = _pair(mean_q, mean_p, ("posterior mean", "prior mean"))
    _, _, lq = _pair(mean_q, log_std_q, ("posterior mean", "posterior log-std"))
    _, _, lp = _pair(mean_q, log_std_p, ("posterior mean", "prior log-std"))
    if _concrete(mq, mp, lq, lp):
        for path, *xs in zip(paths, mq, mp, lq, lp):
            if not all(np.isfinite(np.asarray(x)).all() for x in xs):
                raise ValueError(
                    f"leaf {path!r}: means and log-stds must be finite (log σ = -inf is a point "
                    "mass, which makes the KL infinite or undefined)"
                )
    terms = (_gaussian_kl_log_std(*map(jnp.asarray, xs)) for xs in zip(mq, lq, mp, lp))
    return sum(
        (jnp.sum(jnp.broadcast_to(t, jnp.shape(m))) for t, m in zip(terms, mq)), jnp.zeros(())
    )


def kl_gaussian(mean_q: PyTree, std_q: PyTree, mean_p: PyTree, std_p: PyTree) -> jax.Array:
    """kl_gaussian_log_std with standard deviations (every std must be > 0)."""
    for name, s in (("posterior std", std_q), ("prior std", std_p)):
        for path, x in jax.tree_util.tree_leaves_with_path(s):
            if _concrete(x) and not (np.asarray(x) > 0).all():
                raise ValueError(f"{name} leaf {masks.path_str(path) or '<root>'!r} must be > 0")
    return kl_gaussian_log_std(
        mean_q, jax.tree.map(jnp.log, std_q), mean_p, jax.tree.map(jnp.log, std_p)
    )


class MaskGaussian(NamedTuple):
    """Q(m, w) = Π Bern(m_i; σ(s_i)) · N(w_i; μ_i, σ_i²), all trees with the params' structure."""

    mask_logits: PyTree
    mean: PyTree
    log_std: PyTree  # a tree, or one scalar (a shared prior scale)


def kl_mask_gaussian(posterior: MaskGaussian, prior: MaskGaussian) -> jax.Array:
    """KL_mask + KL_w for independent masks and weights under both Q and P (notes §5.2).

    By data processing it upper-bounds the KL between the laws of θ = m ⊙ w, so it is a valid
    complexity term for the masked network.
    """
    return kl_bernoulli_logits(posterior.mask_logits, prior.mask_logits) + kl_gaussian_log_std(
        posterior.mean, posterior.log_std, prior.mean, prior.log_std
    )


# ------------------------------------------------------------------------------------ kl inverse


def _bisect_step(_: int, carry: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    # Module-level body (no closure), so eager calls hit JAX's cache instead of retracing the loop.
    q, c, lo, hi = carry
    mid = 0.5 * (lo + hi)
    over = binary_kl(q, mid) > c
    return q, c, jnp.where(over, lo, mid), jnp.where(over, mid, hi)


def _kl_inv_bisect(q: jax.Array, c: jax.Array) -> jax.Array:
    # kl(q‖·) increases on [q, 1]; invariant: kl(q‖hi) > c or hi = 1, so hi is never below the root.
    *_, hi = jax.lax.fori_loop(0, _KL_INV_ITERS, _bisect_step, (q, c, q, jnp.ones_like(q)))
    # c = 0 exactly: the root is q, but kl's rounding floor (~eps) would leave hi ~ √eps above it.
    return jnp.where(jnp.isnan(q) | jnp.isnan(c), jnp.nan, jnp.where(c == 0, q, hi))


@jax.custom_jvp
def _kl_inv(q: jax.Array, c: jax.Array) -> jax.Array:
    return _kl_inv_bisect(q, c)


@_kl_inv.defjvp
def _kl_inv_jvp(
    primals: tuple[jax.Array, jax.Array], tangents: tuple[jax.Array, jax.Array]
) -> tuple[jax.Array, jax.Array]:
    # Implicit function theorem on F(p, q, c) = kl(q‖p) - c = 0:
    #   ∂kl/∂p = (p - q) / (p(1 - p)),  ∂kl/∂q = log(q(1 - p) / (p(1 - q))),
    #   dp/dc = p(1 - p) / (p - q),      dp/dq = log(p(1 - q) / (q(1 - p))) · p(1 - p) / (p - q).
    # Boundary conventions (true derivatives are infinite or 0 there): clamps keep them finite.
    q, c = primals
    q_dot, c_dot = tangents
    p = _kl_inv_bisect(q, c)
    tiny = jnp.finfo(p.dtype).tiny
    interior = (p < 1.0) & (p > q)
    ps, qs = jnp.where(interior, p, 0.5), jnp.where(interior, q, 0.25)
    slope = ps * (1.0 - ps) / jnp.maximum(ps - qs, tiny)
    log_ratio = jnp.log(ps / jnp.maximum(qs, tiny)) + jnp.log1p(-qs) - jnp.log1p(-ps)
    dp_dc = jnp.where(interior, slope, jnp.where(p < 1.0, 1.0 / tiny, 0.0))  # c = 0: dp/dc = +inf
    dp_dq = jnp.where(interior, log_ratio * slope, jnp.where(p < 1.0, 1.0, 0.0))
    return p, dp_dq * q_dot + dp_dc * c_dot


def kl_inv(q: ArrayLike, c: ArrayLike) -> jax.Array:
    """kl⁻¹(q, c) = sup{p ∈ [q, 1] : kl(q‖p) ≤ c}, elementwise (q ∈ [0, 1], c ≥ 0, broadcast).

    Bisection with a fixed 64 steps (jit-able) returning the upper end of the bracket, so the
    result is never below the root of kl as evaluated in the working precision. In float32 that
    root can sit below the exact one (q = 0.5, c = 1e-6: 0.5007008 against 0.5007071); in float64
    by ~1e-16, which is why `certificate` evaluates in float64. Differentiable in q and c by the
    implicit function theorem; the true dp/dc at c = 0 and dp/dq at q = 0 are infinite and are
    clamped to large finite values.
    """
    _check_interval("q (kl_inv)", q, 0.0, 1.0, "[]")
    _check_interval("c (kl_inv)", c, 0.0, math.inf, "[]")
    dtype = jnp.result_type(q, c, float)
    q, c = jnp.broadcast_arrays(jnp.asarray(q, dtype), jnp.asarray(c, dtype))
    return _kl_inv(q, c)


# ------------------------------------------------------------------------------------ bounds


def _check_bound_args(emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> None:
    _check_interval("empirical risk", emp_risk, 0.0, 1.0, "[]")
    _check_interval("kl", kl, 0.0, math.inf, "[]")
    _check_count("n", n)
    _check_interval("delta", delta, 0.0, 1.0)


def complexity(kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> jax.Array:
    """B = (KL + log(2√n/δ)) / n, the PAC-Bayes-kl right-hand side.

    Maurer's ξ(n) = Σ_k Binom(k; n, k/n) ≤ 2√n is proved for n ≥ 8 and checked exactly for n < 8.
    """
    return (kl + jnp.log(2.0 * jnp.sqrt(n) / delta)) / n


def kl_bound(emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> jax.Array:
    """PAC-Bayes-kl (Maurer-Seeger): L(Q) ≤ kl⁻¹(L̂, B), with B = (KL + log(2√n/δ))/n."""
    _check_bound_args(emp_risk, kl, n, delta)
    return kl_inv(emp_risk, complexity(kl, n, delta))


def classic_bound(emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> jax.Array:
    """McAllester/classic (PBB f_classic): L ≤ L̂ + √(B/2), PAC-Bayes-kl relaxed by Pinsker."""
    _check_bound_args(emp_risk, kl, n, delta)
    return emp_risk + jnp.sqrt(0.5 * complexity(kl, n, delta))


def quad_bound(emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> jax.Array:
    """quad (Rivasplata et al. 2019; Pérez-Ortiz et al. 2021): L ≤ (√(L̂ + B/2) + √(B/2))², from
    kl(q‖p) ≥ (p - q)²/(2p)."""
    _check_bound_args(emp_risk, kl, n, delta)
    r = 0.5 * complexity(kl, n, delta)
    return jnp.square(jnp.sqrt(emp_risk + r) + jnp.sqrt(r))


def optimal_lambda(emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike) -> jax.Array:
    """λ* = 2 / (√(2nL̂ / (KL + log(2√n/δ)) + 1) + 1) (Thiemann et al. 2017, eq. after Thm 3)."""
    return 2.0 / (jnp.sqrt(2.0 * emp_risk / complexity(kl, n, delta) + 1.0) + 1.0)


def lambda_bound(
    emp_risk: ArrayLike,
    kl: ArrayLike,
    n: ArrayLike,
    delta: ArrayLike,
    lam: ArrayLike | None = None,
) -> jax.Array:
    """lambda (Thiemann et al. 2017, Thm 3): L ≤ L̂/(1 - λ/2) + B/(λ(1 - λ/2)), λ ∈ (0, 2).

    It holds for all λ simultaneously (a relaxation of PAC-Bayes-kl), so λ may be learned or set to
    λ* (the default), where it equals the quad bound.
    """
    _check_bound_args(emp_risk, kl, n, delta)
    if lam is None:
        lam = optimal_lambda(emp_risk, kl, n, delta)
    _check_interval("lam", lam, 0.0, 2.0)
    half = 1.0 - 0.5 * lam
    return emp_risk / half + complexity(kl, n, delta) / (lam * half)


def catoni_bound(
    emp_risk: ArrayLike, kl: ArrayLike, n: ArrayLike, delta: ArrayLike, c: ArrayLike = 1.0
) -> jax.Array:
    """Catoni (2007, Thm 1.2.6): L ≤ (1 - exp(-C L̂ - (KL + log(1/δ))/n)) / (1 - exp(-C)).

    C > 0 must be fixed before seeing the bound set (default C = 1, not tuned); picking it from a
    grid of K values after looking costs δ → δ/K (union_delta). inf_C of this bound equals
    kl⁻¹(L̂, (KL + log(1/δ))/n).
    """
    _check_bound_args(emp_risk, kl, n, delta)
    _check_interval("c (Catoni)", c, 0.0, math.inf)
    return jnp.expm1(-c * emp_risk - (kl + jnp.log(1.0 / delta)) / n) / jnp.expm1(-c)


BoundFn = Callable[..., jax.Array]
BOUNDS: dict[str, BoundFn] = {
    "classic": classic_bound,
    "kl": kl_bound,
    "quad": quad_bound,
    "lambda": lambda_bound,
    "catoni": catoni_bound,
}


# ------------------------------------------------------------------------------------ MC and union


def mc_upper_bound(mc_risk: ArrayLike, m: ArrayLike, delta_prime: ArrayLike) -> jax.Array:
    """Sample-convergence bound (Langford & Caruana 2002): with h_1..h_M ~ Q i.i.d., w.p. ≥ 1 - δ'
    L̂_S(Q) ≤ kl⁻¹((1/M) Σ_k L̂_S(h_k), log(2/δ')/M)."""
    _check_count("m (number of sampled networks)", m)
    _check_interval("delta_prime", delta_prime, 0.0, 1.0)
    return kl_inv(mc_risk, jnp.log(2.0 / delta_prime) / m)


def union_delta(delta: ArrayLike, grid_size: ArrayLike) -> jax.Array:
    """δ/K for a hyperparameter picked from K grid values by looking at the bound: the complexity
    term KL + log(2√n/δ) grows by exactly log K."""
    _check_interval("delta", delta, 0.0, 1.0)
    _check_count("grid_size", grid_size)
    return delta / grid_size


def union_delta_countable(delta: ArrayLike, j: ArrayLike) -> jax.Array:
    """δ_j = 6δ/(π² j²) for the j-th point (j ≥ 1) of a countable grid, Σ_j δ_j = δ (Dziugaite & Roy
    2017's prior-variance grid): the complexity term grows by log(π² j²/6)."""
    _check_interval("delta", delta, 0.0, 1.0)
    _check_count("j", j)
    return 6.0 * delta / (math.pi**2 * jnp.square(j))


def certified_risk(
    errors_M: ArrayLike,
    kl: ArrayLike,
    n: ArrayLike,
    delta: ArrayLike,
    delta_prime: ArrayLike,
    grid_size: ArrayLike = 1,
    bound: str = "kl",
    **bound_kwargs: ArrayLike,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(mc_risk, mc_risk_upper, risk_bound): the pure, jit/vmap-able core of `certificate`.

    errors_M: bound-set errors of M networks sampled from Q. Holds w.p. ≥ 1 - δ - δ':
    L(Q) ≤ BOUNDS[bound](kl⁻¹(mc_risk, log(2/δ')/M), KL, n, δ/grid_size). Every bound is increasing
    in the empirical risk, so plugging in the MC upper bound is valid.
    """
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose from {sorted(BOUNDS)}")
    errors_M = jnp.asarray(errors_M)
    if errors_M.ndim != 1:
        raise ValueError(f"errors_M must have shape (M,), got {errors_M.shape}")
    _check_interval("errors_M", errors_M, 0.0, 1.0, "[]")
    m = errors_M.shape[0]
    mc_risk = jnp.mean(errors_M)
    mc_upper = mc_upper_bound(mc_risk, m, delta_prime)
    risk = BOUNDS[bound](mc_upper, kl, n, union_delta(delta, grid_size), **bound_kwargs)
    return mc_risk, mc_upper, risk


# ------------------------------------------------------------------------------------ certificate


class Certificate(NamedTuple):
    """W.p. ≥ `confidence` over the bound set and the M network draws, L(Q) ≤ `risk_bound`."""

    bound: str  # name in BOUNDS
    risk_bound: float  # bound on the true 0-1 risk of the stochastic network Q (≥ 1: vacuous)
    mc_risk: float  # (1/M) Σ_k L̂_S(h_k)
    mc_risk_upper: float  # kl⁻¹(mc_risk, log(2/δ')/M) ≥ L̂_S(Q) w.p. ≥ 1 - δ'
    kl: float  # KL(Q‖P) in nats
    n: int  # bound-set size (prior-set points never count)
    m: int  # number of sampled networks
    delta: float  # budget of the PAC-Bayes bound before the union bound
    delta_bound: float  # δ / grid_size, the δ the bound was evaluated at
    delta_prime: float  # budget of the MC term
    grid_size: int  # hyperparameter values looked at (union bound)
    confidence: float  # 1 - δ - δ'
    split_hash: str  # split_hash(bound-set indices)
    prior_split_hash: str  # split_hash(prior-set indices)
    bound_kwargs: dict  # e.g. {"c": 1.0} for Catoni, {"lam": ...} for lambda

    def to_dict(self) -> dict:
        return dict(self._asdict())


def split_hash(indices: ArrayLike) -> str:
    """sha256 hex digest of the sorted indices as little-endian int64 bytes (order/dtype-free)."""
    a = np.asarray(indices)
    if a.ndim != 1 or (a.size and not np.issubdtype(a.dtype, np.integer)):
        raise ValueError(
            f"indices must be a 1-D integer array, got shape {a.shape} dtype {a.dtype}"
        )
    return hashlib.sha256(np.sort(a).astype("<i8").tobytes()).hexdigest()


def check_split(bound_indices: ArrayLike, prior_indices: ArrayLike) -> None:
    """ValueError if bound-set indices repeat, are negative, or intersect the prior-set indices."""
    b, p = np.asarray(bound_indices), np.asarray(prior_indices)
    split_hash(b), split_hash(p)  # shape and dtype checks
    if b.size == 0:
        raise ValueError("bound_indices is empty")
    if (b < 0).any() or (p.size and (p < 0).any()):
        raise ValueError("indices must be non-negative")
    if np.unique(b).size != b.size:
        raise ValueError(f"bound_indices repeat {b.size - np.unique(b).size} points; need a set")
    shared = np.intersect1d(b, p)
    if shared.size:
        raise ValueError(
            f"{shared.size} bound-set indices are also prior-set indices (e.g. "
            f"{shared[:5].tolist()}): the certificate must never use points that built the prior"
        )


def certificate(
    errors: ArrayLike,
    kl: float,
    *,
    n: int,
    delta: float,
    delta_prime: float,
    bound_indices: ArrayLike,
    prior_indices: ArrayLike,
    grid_size: int = 1,
    bound: str = "kl",
    **bound_kwargs: float,
) -> Certificate:
    """Final certificate for the stochastic network Q, evaluated in float64 on the host.

    errors: (M,) bound-set 0-1 error rates of M networks h_k ~ Q, or the (M, n) per-example 0-1
    losses. kl: KL(Q‖P) (e.g. kl_bernoulli_logits). n must equal len(bound_indices); bound and prior
    indices must be disjoint. Confidence budget: δ (bound, split over grid_size values) + δ' (MC).
    """
    check_split(bound_indices, prior_indices)
    e = np.asarray(errors, np.float64)
    if e.ndim == 2:
        if e.shape[1] != n:
            raise ValueError(f"errors has {e.shape[1]} examples per network but n = {n}")
        e = e.mean(axis=1)
    if e.ndim != 1 or e.size == 0:
        raise ValueError(
            f"errors must have shape (M,) or (M, n) with M >= 1, got {np.shape(errors)}"
        )
    _check_count("n", n)
    if n != np.asarray(bound_indices).size:
        raise ValueError(
            f"n = {n} but there are {np.asarray(bound_indices).size} bound-set indices"
        )
    kl = float(kl)
    if not math.isfinite(kl):
        raise ValueError(
            f"kl = {kl} is not finite; a deterministic prior must be smoothed (smooth_prior)"
        )
    if kl < 0:
        raise ValueError(f"kl must be >= 0, got {kl}")
    _check_interval("delta", delta, 0.0, 1.0)
    _check_interval("delta_prime", delta_prime, 0.0, 1.0)
    if delta + delta_prime >= 1.0:
        raise ValueError(f"delta + delta_prime = {delta + delta_prime} must be < 1")
    _check_count("grid_size", grid_size)
    with jax.enable_x64(True):
        mc_risk, mc_upper, risk = certified_risk(
            e, kl, n, delta, delta_prime, grid_size, bound, **bound_kwargs
        )
        mc_risk, mc_upper, risk = float(mc_risk), float(mc_upper), float(risk)
    return Certificate(
        bound=bound,
        risk_bound=risk,
        mc_risk=mc_risk,
        mc_risk_upper=mc_upper,
        kl=kl,
        n=int(n),
        m=int(e.size),
        delta=float(delta),
        delta_bound=float(delta) / int(grid_size),
        delta_prime=float(delta_prime),
        grid_size=int(grid_size),
        confidence=1.0 - float(delta) - float(delta_prime),
        split_hash=split_hash(bound_indices),
        prior_split_hash=split_hash(prior_indices),
        bound_kwargs={k: float(v) for k, v in bound_kwargs.items()},
    )
