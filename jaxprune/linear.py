"""Linear-regression theory of stochastic pruning masks (notes: papers/pft-pac-bayes.md §3 and §6).

Setting: data X (n x d), labels y (n), frozen weights w (d), keep probabilities p (d) or logits s
with p = sigmoid(s); mask m_i ~ Bernoulli(p_i) independently, predictor x -> <m * w, x>. Moments:
Sigma = X^T X / n, c = X^T y / n (feature-label alignment). Everything is a pure single-instance
function: callers jit and `jax.vmap` over problem instances. Integer step counts are static.

Input checks: shapes (and n > 0) are checked always, also under jit / vmap (shapes are static
there); value checks (p in [0, 1], q in (0, 1], eta and t >= 0) run only on concrete inputs and
are skipped for traced values under jit, where they cannot be evaluated.
"""

from __future__ import annotations

import itertools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = jax.typing.ArrayLike


# ----------------------------------------------------------------------------- input checks


def _concrete(x: ArrayLike) -> np.ndarray | None:
    """x as numpy when it is a concrete value, None when traced (jit / vmap / grad)."""
    if isinstance(x, jax.core.Tracer):
        return None
    return np.asarray(x)


def _check_data(X: ArrayLike, y: ArrayLike, name: str = "") -> tuple[jax.Array, jax.Array]:
    X, y = jnp.asarray(X), jnp.asarray(y)
    if X.ndim != 2:
        raise ValueError(f"X{name} must be a matrix (n, d), got shape {X.shape}")
    if y.ndim != 1 or y.shape[0] != X.shape[0]:
        raise ValueError(
            f"y{name} must have shape ({X.shape[0]},) to match X{name} {X.shape}, got {y.shape}"
        )
    if X.shape[0] == 0:
        raise ValueError(
            f"X{name} has n = 0 rows: the empirical loss (1/n)||y - X b||^2 is undefined"
        )
    if X.shape[1] == 0:
        raise ValueError(f"X{name} has d = 0 features")
    return X, y


def _check_vec(v: ArrayLike, d: int, arg: str) -> jax.Array:
    v = jnp.asarray(v)
    if v.shape != (d,):
        raise ValueError(f"{arg} must have shape ({d},) (one entry per column of X), got {v.shape}")
    return v


def _check_range(v: ArrayLike, arg: str, lo: float, hi: float, lo_open: bool = False) -> None:
    c = _concrete(v)
    if c is None:
        return
    bad = (c <= lo if lo_open else c < lo) | (c > hi) | np.isnan(c)
    if np.any(bad):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{arg} must lie in {bracket}{lo}, {hi}], got values {c[bad][:5]}")


def _check_nonneg(v: ArrayLike, arg: str) -> None:
    _check_range(v, arg, 0.0, np.inf)


def _inputs(
    X: ArrayLike, y: ArrayLike, w: ArrayLike, p: ArrayLike, parg: str = "p"
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    X, y = _check_data(X, y)
    d = X.shape[1]
    return X, y, _check_vec(w, d, "w"), _check_vec(p, d, parg)


# ----------------------------------------------------------------------------- moments


class Moments(NamedTuple):
    sigma: jax.Array  # (d, d) X^T X / n
    c: jax.Array  # (d,) X^T y / n, feature-label alignment
    yy: jax.Array  # () ||y||^2 / n


def moments(X: ArrayLike, y: ArrayLike) -> Moments:
    """Sufficient statistics of the squared loss: Sigma = X^T X/n, c = X^T y/n, ||y||^2/n."""
    X, y = _check_data(X, y)
    n = X.shape[0]
    return Moments(X.T @ X / n, X.T @ y / n, jnp.dot(y, y) / n)


def alignment(X: ArrayLike, y: ArrayLike) -> jax.Array:
    """c = X^T y / n (§3.1)."""
    return moments(X, y).c


def orthogonal_design(key: jax.Array, n: int, d: int) -> jax.Array:
    """Random X (n, d) with X^T X / n = I exactly (sqrt(n) times the Q factor of a Gaussian)."""
    if not 0 < d <= n:
        raise ValueError(f"an orthogonal design needs 0 < d <= n, got n = {n}, d = {d}")
    q, r = jnp.linalg.qr(jax.random.normal(key, (n, d)))
    # Sign fix makes Q a deterministic function of the Gaussian draw (Haar-distributed).
    return jnp.sqrt(n) * q * jnp.sign(jnp.diagonal(r))[None]


def correlated_design(key: jax.Array, n: int, d: int, rho: ArrayLike) -> jax.Array:
    """Gaussian rows with equicorrelated covariance (1 - rho) I + rho 11^T, rho in [0, 1]."""
    if n <= 0 or d <= 0:
        raise ValueError(f"need n > 0 and d > 0, got n = {n}, d = {d}")
    _check_range(rho, "rho", 0.0, 1.0)
    # One draw for the independent and the shared factor (each random call site costs a compile).
    z = jax.random.normal(key, (n, d + 1))
    return jnp.sqrt(1 - rho) * z[:, :d] + jnp.sqrt(rho) * z[:, d:]


# ----------------------------------------------------------------------------- expected loss


def expected_loss(X: ArrayLike, y: ArrayLike, w: ArrayLike, p: ArrayLike) -> jax.Array:
    """E_{m~Bern(p)} (1/n)||y - X(m*w)||^2 = (1/n)||y - X(p*w)||^2 + sum_i p_i(1-p_i) w_i^2 Sigma_ii
    (§3.1): mean-predictor loss plus the variance of the masked predictor."""
    X, y, w, p = _inputs(X, y, w, p)
    _check_range(p, "p", 0.0, 1.0)
    sd = jnp.mean(X * X, axis=0)
    return jnp.mean(jnp.square(y - X @ (p * w))) + jnp.sum(sd * w * w * p * (1 - p))


def expected_loss_logits(X: ArrayLike, y: ArrayLike, w: ArrayLike, s: ArrayLike) -> jax.Array:
    """expected_loss at p = sigmoid(s)."""
    return expected_loss(X, y, w, jax.nn.sigmoid(jnp.asarray(s)))


def _grad_p_moments(m: Moments, w: jax.Array, p: jax.Array) -> jax.Array:
    sd = jnp.diagonal(m.sigma)
    beta = p * w
    r = m.c - (m.sigma @ beta - sd * beta)
    return w * (sd * w - 2 * r)


def partial_residual_alignment(X: ArrayLike, y: ArrayLike, w: ArrayLike, p: ArrayLike) -> jax.Array:
    """r_i = (1/n) X_i^T (y - sum_{k != i} p_k w_k X_k) = c_i - sum_{k != i} Sigma_ik p_k w_k
    (§3.3)."""
    X, y, w, p = _inputs(X, y, w, p)
    _check_range(p, "p", 0.0, 1.0)
    beta = p * w
    n = X.shape[0]
    return X.T @ (y - X @ beta) / n + jnp.mean(X * X, axis=0) * beta


def expected_loss_grad(X: ArrayLike, y: ArrayLike, w: ArrayLike, p: ArrayLike) -> jax.Array:
    """dL/dp_i = a_i = w_i (Sigma_ii w_i - 2 r_i) (§3.3); a_i does not depend on p_i."""
    r = partial_residual_alignment(X, y, w, p)
    sd = jnp.mean(jnp.square(jnp.asarray(X)), axis=0)
    w = jnp.asarray(w)
    return w * (sd * w - 2 * r)


def expected_loss_grad_logits(X: ArrayLike, y: ArrayLike, w: ArrayLike, s: ArrayLike) -> jax.Array:
    """dL/ds_i = p_i (1 - p_i) a_i with p = sigmoid(s) (chain rule through sigma' = p(1-p))."""
    p = jax.nn.sigmoid(jnp.asarray(s))
    return p * (1 - p) * expected_loss_grad(X, y, w, p)


# ------------------------------------------------------------------------ L1 vs L2 decompositions


class PFTDecomposition(NamedTuple):
    mean_loss: jax.Array  # (1/n)||y - X beta||^2, beta = p * w
    l1: jax.Array  # sum_i Sigma_ii |w_i| |beta_i|   (data-adaptive L1 on beta)
    diag_quad: jax.Array  # sum_i Sigma_ii beta_i^2      (subtracted)
    total: jax.Array  # mean_loss + l1 - diag_quad = expected_loss


def pft_decomposition(X: ArrayLike, y: ArrayLike, w: ArrayLike, p: ArrayLike) -> PFTDecomposition:
    """Frozen w, trained p:
    L = (1/n)||y - X beta||^2 + sum_i lambda_i |beta_i| - sum_i Sigma_ii beta_i^2,
    lambda_i = Sigma_ii |w_i| (§3.2; p(1-p) w^2 = |w||beta| - beta^2 since |beta| <= |w|)."""
    X, y, w, p = _inputs(X, y, w, p)
    _check_range(p, "p", 0.0, 1.0)
    sd = jnp.mean(X * X, axis=0)
    beta = p * w
    mean_loss = jnp.mean(jnp.square(y - X @ beta))
    l1 = jnp.sum(sd * jnp.abs(w) * jnp.abs(beta))
    quad = jnp.sum(sd * beta * beta)
    return PFTDecomposition(mean_loss, l1, quad, mean_loss + l1 - quad)


class DropoutDecomposition(NamedTuple):
    mean_loss: jax.Array  # (1/n)||y - X w||^2 (inverted dropout: the mean predictor is w)
    l2: jax.Array  # ((1-q)/q) sum_i Sigma_ii w_i^2  (data-adaptive L2 / ridge)
    total: jax.Array  # = E_{m~Bern(q)} (1/n)||y - X(m*w/q)||^2


def dropout_decomposition(
    X: ArrayLike, y: ArrayLike, w: ArrayLike, q: ArrayLike
) -> DropoutDecomposition:
    """Inverted dropout with one keep probability q and trained w (§3.2, Wager et al. 2013):
    E (1/n)||y - X(m*w/q)||^2 = (1/n)||y - Xw||^2 + ((1-q)/q) sum_i Sigma_ii w_i^2."""
    X, y = _check_data(X, y)
    w = _check_vec(w, X.shape[1], "w")
    q = jnp.asarray(q)
    if q.ndim != 0:
        raise ValueError(f"dropout keep probability q must be a scalar, got shape {q.shape}")
    _check_range(q, "q", 0.0, 1.0, lo_open=True)
    sd = jnp.mean(X * X, axis=0)
    mean_loss = jnp.mean(jnp.square(y - X @ w))
    l2 = (1 - q) / q * jnp.sum(sd * w * w)
    return DropoutDecomposition(mean_loss, l2, mean_loss + l2)


def dropout_solution(X: ArrayLike, y: ArrayLike, q: ArrayLike) -> jax.Array:
    """argmin_w of the dropout loss: (Sigma + ((1-q)/q) Diag Sigma)^{-1} c (generalised ridge)."""
    mom = moments(X, y)
    q = jnp.asarray(q)
    _check_range(q, "q", 0.0, 1.0, lo_open=True)
    a = mom.sigma + (1 - q) / q * jnp.diag(jnp.diagonal(mom.sigma))
    return jnp.linalg.solve(a, mom.c)


def dropout_gd(
    X: ArrayLike, y: ArrayLike, w0: ArrayLike, q: ArrayLike, lr: ArrayLike, num_steps: int
) -> jax.Array:
    """Gradient descent on w for the dropout loss; returns the (num_steps + 1, d) trajectory."""
    mom = moments(X, y)
    w0 = _check_vec(w0, mom.c.shape[0], "w0")
    _check_range(jnp.asarray(q), "q", 0.0, 1.0, lo_open=True)
    _check_nonneg(lr, "lr")
    lam = (1 - q) / q * jnp.diagonal(mom.sigma)

    def step(w, _):
        w = w - lr * 2 * (mom.sigma @ w - mom.c + lam * w)
        return w, w

    _, ws = jax.lax.scan(step, w0, None, length=num_steps)
    return jnp.concatenate([w0[None], ws])


# ----------------------------------------------------------------------------- keep rules


def alignment_score(X: ArrayLike, y: ArrayLike, w: ArrayLike) -> jax.Array:
    """2 w_i c_i / (Sigma_ii w_i^2): > 1 iff weight i alone lowers the squared loss (§3.3)."""
    X, y = _check_data(X, y)
    w = _check_vec(w, X.shape[1], "w")
    mom = moments(X, y)
    return 2 * w * mom.c / (jnp.diagonal(mom.sigma) * w * w)


def keep_rule(X: ArrayLike, y: ArrayLike, w: ArrayLike) -> jax.Array:
    """Orthogonal-design minimiser over [0,1]^d: keep i iff 2 w_i c_i > Sigma_ii w_i^2 (§3.3)."""
    X, y = _check_data(X, y)
    w = _check_vec(w, X.shape[1], "w")
    mom = moments(X, y)
    return 2 * w * mom.c > jnp.diagonal(mom.sigma) * w * w


def coordinate_keep_rule(
    X: ArrayLike, y: ArrayLike, w: ArrayLike, m0: ArrayLike | None = None, max_sweeps: int = 100
) -> jax.Array:
    """Vertex minimiser by the coordinate-wise rule, any design: sweep i = 1..d setting
    m_i = [2 w_i r_i(m) > Sigma_ii w_i^2] (L is affine in each p_i, §3.2-3.3), until a sweep changes
    nothing. Each change strictly lowers L, so it stops at a vertex no single flip improves;
    the global minimiser over [0,1]^d (a vertex) is such a fixed point. Starts from `keep_rule`
    unless m0 is given.
    """
    X, y = _check_data(X, y)
    d = X.shape[1]
    w = _check_vec(w, d, "w")
    mom = moments(X, y)
    sd = jnp.diagonal(mom.sigma)
    m = keep_rule(X, y, w) if m0 is None else _check_vec(m0, d, "m0").astype(bool)

    def coord(i, m):
        beta = m * w
        r_i = mom.c[i] - (mom.sigma[i] @ beta - sd[i] * beta[i])
        return m.at[i].set(2 * w[i] * r_i > sd[i] * w[i] * w[i])

    def sweep(state):
        m, _, k = state
        new = jax.lax.fori_loop(0, d, coord, m)
        return new, jnp.any(new != m), k + 1

    m, _, _ = jax.lax.while_loop(
        lambda s: s[1] & (s[2] < max_sweeps), sweep, (m, jnp.array(True), 0)
    )
    return m


def all_vertices(d: int) -> np.ndarray:
    """All 2^d masks as a (2^d, d) float array (row k = binary digits of k)."""
    if not 0 < d <= 20:
        raise ValueError(f"enumerating 2^d masks needs 0 < d <= 20, got d = {d}")
    return np.array(list(itertools.product([0.0, 1.0], repeat=d)))


def vertex_losses(X: ArrayLike, y: ArrayLike, w: ArrayLike) -> jax.Array:
    """(1/n)||y - X(m*w)||^2 for every mask m of `all_vertices(d)` (one vectorised call), from the
    moments: ||y||^2/n - 2 b.c + b^T Sigma b with b = m * w (O(2^d d^2), independent of n)."""
    X, y = _check_data(X, y)
    w = _check_vec(w, X.shape[1], "w")
    mom = moments(X, y)
    b = jnp.asarray(all_vertices(X.shape[1]), X.dtype) * w[None]
    return mom.yy - 2 * b @ mom.c + jnp.sum((b @ mom.sigma) * b, axis=1)


def best_vertex(X: ArrayLike, y: ArrayLike, w: ArrayLike) -> jax.Array:
    """Brute-force minimiser of the expected loss over [0,1]^d (a vertex, §3.2), d <= 20."""
    X = jnp.asarray(X)
    ms = jnp.asarray(all_vertices(X.shape[1] if X.ndim == 2 else 1))
    return ms[jnp.argmin(vertex_losses(X, y, w))].astype(bool)


# ----------------------------------------------------------------------------- gradient flow


def flow_potential(s: ArrayLike) -> jax.Array:
    """G(s) = e^s - e^-s + 2s, with G' = 1/sigmoid'(s) (§3.4)."""
    s = jnp.asarray(s)
    return 2 * jnp.sinh(s) + 2 * s


def flow_potential_inverse(v: ArrayLike, num_iters: int = 60) -> jax.Array:
    """G^{-1}(v) by Newton's method from s = asinh(|v|/2) >= G^{-1}(|v|); G is odd and convex on
    s >= 0, so the iterates decrease monotonically to the root (no overshoot)."""
    v = jnp.asarray(v)
    a = jnp.abs(v)

    def newton(_, s):
        return s - (2 * jnp.sinh(s) + 2 * s - a) / (2 * jnp.cosh(s) + 2)

    return jnp.sign(v) * jax.lax.fori_loop(0, num_iters, newton, jnp.arcsinh(a / 2))


def flow_closed_form(a: ArrayLike, s0: ArrayLike, eta: ArrayLike, t: ArrayLike) -> jax.Array:
    """s(t) for ds/dt = -eta sigma'(s) a with constant a: G(s(t)) = G(s(0)) - eta a t (§3.4)."""
    _check_nonneg(eta, "eta")
    _check_nonneg(t, "t")
    return flow_potential_inverse(flow_potential(s0) - eta * jnp.asarray(a) * t)


def orthogonal_drift(X: ArrayLike, y: ArrayLike, w: ArrayLike) -> jax.Array:
    """a_i = Sigma_ii w_i^2 - 2 w_i c_i: dL/dp_i when Sigma is diagonal (then constant in p)."""
    X, y = _check_data(X, y)
    w = _check_vec(w, X.shape[1], "w")
    mom = moments(X, y)
    return jnp.diagonal(mom.sigma) * w * w - 2 * w * mom.c


def orthogonal_flow(
    X: ArrayLike, y: ArrayLike, w: ArrayLike, s0: ArrayLike, eta: ArrayLike, t: ArrayLike
) -> jax.Array:
    """Closed-form logits s(t) of the gradient flow ds/dt = -eta dL/ds. Exact when X^T X/n is
    diagonal; for other designs it is the flow of the diagonal part only (off-diagonals ignored)."""
    X, y = _check_data(X, y)
    s0 = _check_vec(jnp.broadcast_to(s0, (X.shape[1],)), X.shape[1], "s0")
    return flow_closed_form(orthogonal_drift(X, y, w), s0, eta, t)


def logit_flow(
    X: ArrayLike,
    y: ArrayLike,
    w: ArrayLike,
    s0: ArrayLike,
    eta: ArrayLike,
    t: ArrayLike,
    num_steps: int,
) -> jax.Array:
    """Gradient flow ds/dt = -eta p(1-p) a(p) for any design, by RK4 with num_steps steps of t /
    num_steps (lax.scan); returns the (num_steps + 1, d) trajectory s(k t / num_steps)."""
    mom = moments(X, y)
    d = mom.c.shape[0]
    w = _check_vec(w, d, "w")
    s0 = _check_vec(jnp.broadcast_to(s0, (d,)), d, "s0")
    _check_nonneg(eta, "eta")
    _check_nonneg(t, "t")
    h = jnp.asarray(t) / num_steps

    def f(s):
        p = jax.nn.sigmoid(s)
        return -eta * p * (1 - p) * _grad_p_moments(mom, w, p)

    def step(s, _):
        k1 = f(s)
        k2 = f(s + h / 2 * k1)
        k3 = f(s + h / 2 * k2)
        k4 = f(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return s, s

    _, ss = jax.lax.scan(step, s0, None, length=num_steps)
    return jnp.concatenate([s0[None], ss])


def projected_gd(
    X: ArrayLike,
    y: ArrayLike,
    w: ArrayLike,
    p0: ArrayLike,
    lr: ArrayLike,
    num_steps: int,
    eps: float = 0.0,
) -> jax.Array:
    """Gradient descent on p directly, projected onto [eps, 1 - eps]^d after each step (§1.3):
    reaches the vertex in finite time. Returns the (num_steps + 1, d) trajectory."""
    mom = moments(X, y)
    d = mom.c.shape[0]
    w, p0 = _check_vec(w, d, "w"), _check_vec(p0, d, "p0")
    _check_range(p0, "p0", 0.0, 1.0)
    _check_nonneg(lr, "lr")
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"eps must lie in [0, 0.5), got {eps}")

    def step(p, _):
        p = jnp.clip(p - lr * _grad_p_moments(mom, w, p), eps, 1 - eps)
        return p, p

    _, ps = jax.lax.scan(step, p0, None, length=num_steps)
    return jnp.concatenate([p0[None], ps])


# ----------------------------------------------------------------------------- PAC-Bayes (§6)


def bernoulli_kl_logits(u: ArrayLike, v: ArrayLike) -> jax.Array:
    """KL(Bern(sigmoid(u)) || Bern(sigmoid(v))) summed over coordinates, in the stable Bregman form
    log1p(q expm1(v - u)) - q (v - u), q = sigmoid(u) (softplus Bregman divergence, §6)."""
    u, v = jnp.asarray(u), jnp.asarray(v)
    if u.shape != v.shape:
        raise ValueError(
            f"posterior and prior logits must have the same shape, got {u.shape}, {v.shape}"
        )
    q, delta = jax.nn.sigmoid(u), v - u
    # log1p(q expm1(delta)) overflows for large delta; there softplus(v) - softplus(u) is accurate.
    big = jnp.abs(delta) > 20
    direct = jax.nn.softplus(v) - jax.nn.softplus(u)
    stable = jnp.log1p(q * jnp.expm1(jnp.where(big, 0.0, delta)))
    return jnp.sum(jnp.where(big, direct, stable) - q * delta)


class FlowKL(NamedTuple):
    s_posterior: jax.Array  # (d,) logits after flow on the posterior data
    s_prior: jax.Array  # (d,) logits after flow on the prior data
    kl: jax.Array  # KL(Q || P), exact
    bound: jax.Array  # (eta^2 t^2 / 128) sum_i (a_i^Q - a_i^P)^2
    alignment_change: jax.Array  # sum_i w_i^2 (c_i^Q - c_i^P)^2
    matched_bound: (
        jax.Array
    )  # (eta^2 t^2 / 32) * alignment_change; valid when diag Sigma^Q = diag Sigma^P


def flow_kl(
    Xq: ArrayLike,
    yq: ArrayLike,
    Xp: ArrayLike,
    yp: ArrayLike,
    w: ArrayLike,
    s0: ArrayLike,
    eta: ArrayLike,
    t: ArrayLike,
) -> FlowKL:
    """KL between the mask posterior Q (closed-form flow for time t on (Xq, yq)) and prior P (same
    flow on (Xp, yp)), same w and s(0), orthogonal designs (§6).
    |s^Q - s^P| <= eta t |a^Q - a^P| / 4
    (G' >= 4) and KL(Bern(sigmoid u) || Bern(sigmoid v)) <= (u - v)^2 / 8 give
    KL(Q||P) <= (eta^2 t^2 / 128) sum_i (a_i^Q - a_i^P)^2."""
    Xq, yq = _check_data(Xq, yq, "q")
    Xp, yp = _check_data(Xp, yp, "p")
    if Xq.shape[1] != Xp.shape[1]:
        raise ValueError(
            f"posterior and prior data need the same d, got {Xq.shape[1]} and {Xp.shape[1]}"
        )
    d = Xq.shape[1]
    w = _check_vec(w, d, "w")
    s0 = _check_vec(jnp.broadcast_to(s0, (d,)), d, "s0")
    aq, ap = orthogonal_drift(Xq, yq, w), orthogonal_drift(Xp, yp, w)
    sq, sp = flow_closed_form(aq, s0, eta, t), flow_closed_form(ap, s0, eta, t)
    scale = jnp.square(eta * jnp.asarray(t))
    change = jnp.sum(w * w * jnp.square(alignment(Xq, yq) - alignment(Xp, yp)))
    return FlowKL(
        sq,
        sp,
        bernoulli_kl_logits(sq, sp),
        scale / 128 * jnp.sum(jnp.square(aq - ap)),
        change,
        scale / 32 * change,
    )


def _kl_bernoulli_scalar(q: jax.Array, p: jax.Array) -> jax.Array:
    q = jnp.clip(q, 0.0, 1.0)
    t1 = jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1.0) / p), 0.0)
    t2 = jnp.where(q < 1, (1 - q) * jnp.log(jnp.where(q < 1, 1 - q, 1.0) / (1 - p)), 0.0)
    return t1 + t2


def _kl_inverse(q: ArrayLike, c: ArrayLike, num_iters: int = 60) -> jax.Array:
    """sup{r in [q, 1] : kl(q || r) <= c} by bisection (kl(q||.) increases on [q, 1])."""
    q = jnp.clip(jnp.asarray(q), 0.0, 1.0)

    def body(_, lohi):
        lo, hi = lohi
        mid = (lo + hi) / 2
        ok = _kl_bernoulli_scalar(q, mid) <= c
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

    lo, _ = jax.lax.fori_loop(0, num_iters, body, (q, jnp.ones_like(q)))
    return lo


class Certificate(NamedTuple):
    risk_upper: jax.Array  # upper bound on the empirical clipped risk of Q (closed form / clip)
    kl: jax.Array  # the KL term used (exact KL or its alignment bound)
    bound: jax.Array  # with prob >= 1 - delta: clipped risk of Q <= bound


def pac_bayes_certificate(
    Xq: ArrayLike,
    yq: ArrayLike,
    w: ArrayLike,
    s_posterior: ArrayLike,
    kl: ArrayLike,
    delta: float = 0.05,
    loss_clip: float = 1.0,
) -> Certificate:
    """PAC-Bayes-kl bound (Seeger 2002 / Maurer 2004, notes §5.1) for the bounded loss
    l_B(x, y) = min((y - <m*w, x>)^2, B) / B in [0, 1], B = loss_clip:
        kl(Lhat_S(Q) || L(Q)) <= (KL(Q||P) + log(2 sqrt(N) / delta)) / N,   N = n of (Xq, yq).
    The empirical clipped risk is replaced by its upper bound min(1, expected_loss / B) (kl^{-1} is
    increasing in its first argument, so the bound stays valid and needs no Monte Carlo), and KL by
    any upper bound of it (e.g. FlowKL.bound). Valid when the prior data are independent of
    (Xq, yq)."""
    Xq, yq = _check_data(Xq, yq, "q")
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    if not loss_clip > 0.0:
        raise ValueError(f"loss_clip must be > 0, got {loss_clip}")
    _check_nonneg(kl, "kl")
    n = Xq.shape[0]
    risk = jnp.minimum(1.0, expected_loss_logits(Xq, yq, w, s_posterior) / loss_clip)
    rhs = (jnp.asarray(kl) + np.log(2 * np.sqrt(n) / delta)) / n
    return Certificate(risk, jnp.asarray(kl), _kl_inverse(risk, rhs))
