"""Linear-regression theory (jaxprune/linear.py) against exact answers: enumeration over all masks,
Monte Carlo, jax.grad and finite differences, ODE integration, brute force over vertices."""

import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import linear

D = 8  # 256 masks: exact enumeration in one call


def _problem(seed: int, n: int = 40, d: int = D, rho: float = 0.3, orthogonal: bool = False):
    """One random instance (X, y, w, p) as float64 numpy (no PRNG compiles in the tests); X is an
    orthogonal design (X^T X / n = I) or equicorrelated Gaussian."""
    rng = np.random.default_rng(seed)
    if orthogonal:
        q, r = np.linalg.qr(rng.normal(size=(n, d)))
        X = np.sqrt(n) * q * np.sign(np.diagonal(r))[None]
    else:
        z = rng.normal(size=(n, d + 1))
        X = np.sqrt(1 - rho) * z[:, :d] + np.sqrt(rho) * z[:, d:]
    y = X @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    return X, y, rng.normal(size=d), rng.uniform(0.05, 0.95, size=d)


def _instances(seed: int, num: int, **kw):
    """num instances stacked on a leading axis (jnp arrays, float64 under enable_x64)."""
    parts = zip(*[_problem(seed * 1000 + i, **kw) for i in range(num)])
    return tuple(jnp.asarray(np.stack(p)) for p in parts)


def _enumerated(X, y, w, p):
    """Exact E_m over all 2^d masks: sum_m prod_i p_i^m_i (1-p_i)^(1-m_i) loss(m)."""
    ms = jnp.asarray(linear.all_vertices(X.shape[1]), X.dtype)
    probs = jnp.prod(jnp.where(ms > 0, p[None], 1 - p[None]), axis=1)
    return jnp.sum(probs * linear.vertex_losses(X, y, w))


def test_expected_loss_equals_enumeration_and_decompositions():
    with jax.enable_x64(True):
        X, y, w, p = _instances(1, 4)
        closed = jax.jit(jax.vmap(linear.expected_loss))(X, y, w, p)
        exact = jax.jit(jax.vmap(_enumerated))(X, y, w, p)
        assert closed.dtype == jnp.float64
        np.testing.assert_allclose(closed, exact, rtol=1e-10)
        dec = jax.jit(jax.vmap(linear.pft_decomposition))(X, y, w, p)
        np.testing.assert_allclose(dec.total, exact, rtol=1e-10)
        Xn, wn, pn = np.asarray(X), np.asarray(w), np.asarray(p)
        np.testing.assert_allclose(
            dec.l1 - dec.diag_quad,
            np.sum(np.mean(Xn * Xn, 1) * wn * wn * pn * (1 - pn), 1),
            rtol=1e-10,
        )
        # Dropout (inverted, keep prob q): enumeration of m * w / q with p = q everywhere.
        q = 0.7
        drop = jax.jit(jax.vmap(linear.dropout_decomposition, (0, 0, 0, None)))(X, y, w, q)
        exact_drop = jax.jit(jax.vmap(_enumerated))(X, y, w / q, jnp.full_like(p, q))
        np.testing.assert_allclose(drop.total, exact_drop, rtol=1e-10)
        np.testing.assert_allclose(drop.total, drop.mean_loss + drop.l2, rtol=1e-12)


def test_expected_loss_matches_monte_carlo():
    X, y, w, p = _problem(0)
    num = 20_000
    m = np.random.default_rng(1).uniform(size=(num, D)) < p[None]
    losses = np.mean(np.square(y[None] - (m * w[None]) @ X.T), axis=1)
    se = np.std(losses) / np.sqrt(num)
    closed = jax.jit(linear.expected_loss)(X, y, w, p)  # float32
    assert abs(float(np.mean(losses) - closed)) < 4 * float(se), (np.mean(losses), closed, se)


def test_gradients_closed_form_autodiff_finite_differences():
    with jax.enable_x64(True):
        X, y, w, p = (jnp.asarray(v) for v in _problem(2))
        s = jnp.log(p / (1 - p))
        g = jax.jit(linear.expected_loss_grad)(X, y, w, p)
        np.testing.assert_allclose(
            g, jax.jit(jax.grad(linear.expected_loss, 3))(X, y, w, p), rtol=1e-10
        )
        gs = jax.jit(linear.expected_loss_grad_logits)(X, y, w, s)
        np.testing.assert_allclose(
            gs, jax.grad(linear.expected_loss_logits, 3)(X, y, w, s), rtol=1e-10
        )
        h = 1e-6
        shifts = h * jnp.eye(D)  # central differences, all coordinates in one vmapped call
        loss_at = jax.jit(jax.vmap(linear.expected_loss, (None, None, None, 0)))
        fd = (loss_at(X, y, w, p[None] + shifts) - loss_at(X, y, w, p[None] - shifts)) / (2 * h)
        np.testing.assert_allclose(g, fd, atol=1e-7)
        # a_i does not depend on p_i: the loss is affine in each coordinate (multilinear in p).
        np.testing.assert_allclose(
            jax.jit(linear.expected_loss_grad)(X, y, w, p.at[0].set(0.0))[0], g[0], rtol=1e-10
        )


def test_closed_form_flow_matches_numerical_flow():
    with jax.enable_x64(True):
        # Appendix A value: s(0) = 0.3, a = 0.7, eta t = 2 -> -0.0477308.
        np.testing.assert_allclose(
            jax.jit(linear.flow_closed_form)(0.7, 0.3, 1.0, 2.0), -0.0477308, atol=1e-7
        )
        v = jnp.array([-1e8, -50.0, -1.0, -1e-6, 0.0, 1e-6, 3.0, 1e4])
        roundtrip = jax.jit(lambda v: linear.flow_potential(linear.flow_potential_inverse(v)))
        np.testing.assert_allclose(roundtrip(v), v, rtol=1e-12, atol=1e-15)
        X, y, w, _ = _instances(3, 3, orthogonal=True)
        s0 = jnp.linspace(-1.0, 1.0, D)
        flow = jax.jit(
            jax.vmap(
                functools.partial(linear.logit_flow, num_steps=400), (0, 0, 0, None, None, None)
            )
        )
        numeric = flow(X, y, w, s0, 0.5, 4.0)[:, -1]
        closed = jax.jit(jax.vmap(linear.orthogonal_flow, (0, 0, 0, None, None, None)))(
            X, y, w, s0, 0.5, 4.0
        )
        np.testing.assert_allclose(numeric, closed, atol=1e-8)


def test_keep_rules_against_brute_force_over_vertices():
    with jax.enable_x64(True):
        best = jax.jit(jax.vmap(linear.best_vertex))
        coord = jax.jit(jax.vmap(linear.coordinate_keep_rule))
        # Orthogonal design: the alignment rule 2 w c > Sigma_ii w^2 is the exact minimiser.
        X, y, w, _ = _instances(4, 16, orthogonal=True)
        keep = jax.jit(jax.vmap(linear.keep_rule))(X, y, w)
        chex.assert_trees_all_equal(keep, best(X, y, w))
        chex.assert_trees_all_equal(coord(X, y, w), best(X, y, w))
        # Projected GD on p and the long logit flow both end at that vertex.
        pgd = jax.jit(
            jax.vmap(functools.partial(linear.projected_gd, num_steps=300), (0, 0, 0, None, None))
        )
        p_end = pgd(X, y, w, jnp.full((D,), 0.5), 0.5)[:, -1]
        a = jax.jit(jax.vmap(linear.orthogonal_drift))(X, y, w)
        done = jnp.abs(a) * 0.5 * 300 > 0.5  # reachable in 300 steps of lr 0.5 from p = 0.5
        assert float(jnp.mean(done)) > 0.9
        np.testing.assert_array_equal(jnp.where(done, p_end, keep), keep.astype(p_end.dtype))
        np.testing.assert_array_equal(p_end > 0.5, keep)  # the rest moved the right way
        s_end = jax.jit(jax.vmap(linear.orthogonal_flow, (0, 0, 0, None, None, None)))(
            X, y, w, 0.0, 1.0, 1e3
        )
        chex.assert_trees_all_equal(s_end > 0, keep)
        # Correlated design: the brute-force minimiser is a fixed point of the partial-residual
        # rule,
        # and the coordinate-wise rule ends at a vertex no single flip improves.
        X, y, w, _ = _instances(5, 16, rho=0.6)
        m_best = best(X, y, w)
        chex.assert_trees_all_equal(
            jax.jit(jax.vmap(linear.coordinate_keep_rule))(X, y, w, m_best), m_best
        )
        m = np.asarray(coord(X, y, w), np.float64)
        Xn, yn, wn = (np.asarray(v) for v in (X, y, w))

        def loss(m):
            return np.mean(np.square(yn - np.einsum("bnd,bd->bn", Xn, m * wn)), axis=1)

        base = loss(m)
        flips = m[:, None, :] != np.eye(D, dtype=bool)[None]  # all single flips
        assert np.all(
            np.stack([loss(flips[:, i].astype(np.float64)) for i in range(D)], 1)
            >= base[:, None] - 1e-12
        )
        brute = jax.jit(jax.vmap(lambda X, y, w: jnp.min(linear.vertex_losses(X, y, w))))(X, y, w)
        assert np.all(base >= brute - 1e-12)


def test_kl_bound_holds_and_is_tight():
    with jax.enable_x64(True):
        Xq, yq, w, _ = _instances(6, 64, orthogonal=True)
        Xp, yp, _, _ = _instances(7, 64, orthogonal=True)
        rng = np.random.default_rng(8)
        s0 = jnp.asarray(rng.normal(size=(64, D)))
        eta_t = jnp.asarray(rng.uniform(0.1, 5.0, size=64))
        kl_fn = jax.jit(jax.vmap(linear.flow_kl, (0, 0, 0, 0, 0, 0, None, 0)))
        out = kl_fn(Xq, yq, Xp, yp, w, s0, 1.0, eta_t)
        assert np.all(out.kl > 0) and np.all(out.kl <= out.bound * (1 + 1e-9))
        # Orthogonal designs have Sigma_ii = 1 in both: the matched form equals the general one.
        np.testing.assert_allclose(out.matched_bound, out.bound, rtol=1e-10)
        # Tight when s(0) = 0 (sigma' = 1/4 there) and eta t small.
        tight = kl_fn(Xq, yq, Xp, yp, w, jnp.zeros((64, D)), 1.0, jnp.full((64,), 0.05))
        ratio = tight.kl / tight.bound
        assert np.all(ratio > 0.5) and np.all(ratio <= 1 + 1e-9), ratio.min()
        assert float(ratio.min()) > 0.95
        # Exact KL from the logits equals the textbook Bernoulli formula.
        q, p = (1 / (1 + np.exp(-np.asarray(v[0]))) for v in (out.s_posterior, out.s_prior))
        textbook = np.sum(q * np.log(q / p) + (1 - q) * np.log((1 - q) / (1 - p)))
        np.testing.assert_allclose(out.kl[0], textbook, rtol=1e-8)


def test_pac_bayes_certificate():
    with jax.enable_x64(True):
        q, c = jnp.array([0.1, 0.0, 0.6]), jnp.array([0.05, 0.3, 1e-4])
        r = jax.jit(linear._kl_inverse)(q, c)
        np.testing.assert_allclose(jax.jit(linear._kl_bernoulli_scalar)(q, r), c, rtol=1e-8)
        X, y, w, _ = (jnp.asarray(v) for v in _problem(9, n=200, orthogonal=True))
        Xp, yp, _, _ = (jnp.asarray(v) for v in _problem(10, n=200, orthogonal=True))
        fk = jax.jit(linear.flow_kl)(X, y, Xp, yp, w, 0.0, 1.0, 1.0)
        cert = jax.jit(linear.pac_bayes_certificate, static_argnames=("delta", "loss_clip"))(
            X, y, w, fk.s_posterior, fk.bound, delta=0.05, loss_clip=50.0
        )
        n = 200
        rhs = (fk.bound + np.log(2 * np.sqrt(n) / 0.05)) / n
        assert 0 < cert.risk_upper < cert.bound < 1
        np.testing.assert_allclose(
            jax.jit(linear._kl_bernoulli_scalar)(cert.risk_upper, cert.bound), rhs, rtol=1e-6
        )


def test_vmap_matches_single_instances():
    X, y, w, p = _instances(11, 3)
    batched = jax.jit(jax.vmap(linear.expected_loss_grad))(X, y, w, p)
    single = jax.jit(linear.expected_loss_grad)
    singles = jnp.stack([single(X[i], y[i], w[i], p[i]) for i in range(3)])
    np.testing.assert_allclose(batched, singles, rtol=1e-5, atol=1e-6)


def test_bad_inputs_raise():
    X, y, w, p = (jnp.asarray(v, jnp.float32) for v in _problem(12))
    with pytest.raises(ValueError, match="y must have shape"):
        linear.expected_loss(X, y[:-1], w, p)
    with pytest.raises(ValueError, match="w must have shape"):
        linear.expected_loss(X, y, w[:-1], p)
    with pytest.raises(ValueError, match="p must have shape"):
        linear.expected_loss(X, y, w, p[None])
    with pytest.raises(ValueError, match=r"p must lie in \[0.0, 1.0\]"):
        linear.expected_loss(X, y, w, p.at[0].set(1.5))
    with pytest.raises(ValueError, match="n = 0"):
        linear.expected_loss(X[:0], y[:0], w, p)
    with pytest.raises(ValueError, match="q must lie"):
        linear.dropout_decomposition(X, y, w, 0.0)
    with pytest.raises(ValueError, match="same d"):
        linear.flow_kl(X, y, X[:, :-1], y, w, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="d <= n"):
        linear.orthogonal_design(jax.random.key(0), 3, 5)  # raises before drawing anything
    # Shape checks also fire under jit; value checks are skipped for traced values.
    with pytest.raises(ValueError, match="w must have shape"):
        jax.jit(linear.expected_loss)(X, y, w[:-1], p)


# ----------------------------------------------------------------------------- dropout (§3.2)


def _dropout_brute_force_solution(X, y, q):
    """argmin_w sum_m pi(m) (1/n)||y - X(m*w/q)||^2 over all 2^d masks in numpy: the normal
    equations sum_m pi(m) D_m Sigma D_m w = sum_m pi(m) D_m c with D_m = diag(m) / q."""
    n, d = X.shape
    ms = (np.arange(2**d)[:, None] >> np.arange(d)[None]) & 1  # (2^d, d) 0/1, all masks
    pi = np.prod(np.where(ms > 0, q, 1 - q), axis=1)
    dm = ms / q  # diagonals of D_m
    sigma, c = X.T @ X / n, X.T @ y / n
    a = np.einsum("k,ki,ij,kj->ij", pi, dm, sigma, dm)
    return np.linalg.solve(a, np.einsum("k,ki,i->i", pi, dm, c))


def test_dropout_solution_is_stationary_and_matches_mask_enumeration():
    # Catches (1-q)/q replaced by q/(1-q) or (1-q), the full Sigma in place of Diag Sigma, or c
    # not scaled: each moves the solution away from the enumerated normal equations. q = 1 is
    # plain least squares.
    d = 5
    with jax.enable_x64(True):
        X, y, _, _ = _instances(13, 3, d=d, n=30)
        q = jnp.array([0.3, 0.7, 1.0])
        w_star = jax.jit(jax.vmap(linear.dropout_solution))(X, y, q)
        brute = np.stack(
            [_dropout_brute_force_solution(np.asarray(X[i]), np.asarray(y[i]), float(q[i]))
             for i in range(3)]
        )
        np.testing.assert_allclose(w_star, brute, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(
            w_star[2], np.linalg.lstsq(np.asarray(X[2]), np.asarray(y[2]), rcond=None)[0],
            rtol=1e-9,
        )
        total = lambda X, y, w, q: linear.dropout_decomposition(X, y, w, q).total
        grad = jax.jit(jax.vmap(jax.grad(total, 2)))(X, y, w_star, q)
        np.testing.assert_allclose(grad, 0.0, atol=1e-12)


def test_dropout_gd_first_step_is_gradient_step_and_converges_to_solution():
    # The first step checks the gradient's scale (a missing factor 2 or a wrong lambda still
    # converges, to the same or another point); the last iterate checks the fixed point.
    d, steps = 5, 300
    with jax.enable_x64(True):
        X, y, w0, _ = _instances(14, 3, d=d, n=30)
        q = jnp.array([0.3, 0.7, 1.0])
        # lr = 1 / (lambda_max + lambda_min) of A = Sigma + ((1-q)/q) Diag Sigma: the optimal
        # step for the gradient 2 (A w - c); contraction (kappa - 1) / (kappa + 1) per step.
        lams = []
        for i in range(3):
            sigma = np.asarray(X[i]).T @ np.asarray(X[i]) / 30
            qi = float(q[i])
            lams.append(np.linalg.eigvalsh(sigma + (1 - qi) / qi * np.diag(np.diag(sigma))))
        lams = np.array(lams)
        lr = 1.0 / (lams[:, -1] + lams[:, 0])
        assert np.max((lams[:, -1] - lams[:, 0]) / (lams[:, -1] + lams[:, 0])) ** steps < 1e-14
        gd = jax.jit(jax.vmap(functools.partial(linear.dropout_gd, num_steps=steps)))
        ws = gd(X, y, w0, q, jnp.asarray(lr))
        chex.assert_shape(ws, (3, steps + 1, d))
        np.testing.assert_array_equal(ws[:, 0], w0)
        total = lambda X, y, w, q: linear.dropout_decomposition(X, y, w, q).total
        g0 = jax.jit(jax.vmap(jax.grad(total, 2)))(X, y, w0, q)
        np.testing.assert_allclose(ws[:, 1], w0 - lr[:, None] * g0, rtol=1e-12, atol=1e-14)
        w_star = jax.jit(jax.vmap(linear.dropout_solution))(X, y, q)
        np.testing.assert_allclose(ws[:, -1], w_star, rtol=1e-9, atol=1e-10)


def test_correlated_design_has_equicorrelated_covariance():
    # Sample covariance within 4 standard errors of (1 - rho) I + rho 11^T, and every pairwise
    # correlation within 4 standard errors of rho: catches rho in place of sqrt(rho) (correlation
    # rho / (1 - rho + rho^2)), a shared factor drawn per column instead of per row, or
    # unit-variance columns lost.
    n, d = 20_000, 4
    rhos = jnp.array([0.0, 0.3, 0.8])
    draw = jax.jit(
        jax.vmap(lambda r: linear.correlated_design(jax.random.key(15), n, d, r))
    )
    X = np.asarray(draw(rhos), np.float64)
    chex.assert_shape(X, (3, n, d))
    off = ~np.eye(d, dtype=bool)
    for x, rho in zip(X, np.asarray(rhos, np.float64)):
        cov = (1 - rho) * np.eye(d) + rho
        se_cov = np.sqrt((cov**2 + np.outer(np.diag(cov), np.diag(cov))) / n)
        sample = np.cov(x, rowvar=False)
        assert np.all(np.abs(sample - cov) < 4 * se_cov), (rho, sample)
        corr = np.corrcoef(x, rowvar=False)[off]
        se_corr = (1 - rho**2) / np.sqrt(n)
        assert np.all(np.abs(corr - rho) < 4 * se_corr), (rho, corr)
        assert np.all(np.abs(x.mean(0)) < 4 / np.sqrt(n))


def test_pac_bayes_certificate_risk_is_clipped_expected_loss():
    # risk_upper = min(1, E_{m~Q} loss / loss_clip), with the expectation by enumeration over all
    # 2^8 masks at p = sigmoid(s): catches a forgotten / loss_clip, a missing or wrong clip at 1,
    # or the logits used as probabilities. At risk 1 the kl inverse is 1 as well.
    with jax.enable_x64(True):
        X, y, w, _ = (jnp.asarray(v) for v in _problem(16, n=200, orthogonal=True))
        s = jnp.linspace(-2.0, 2.0, D)
        exact = float(jax.jit(_enumerated)(X, y, w, jax.nn.sigmoid(s)))
        cert = jax.jit(linear.pac_bayes_certificate, static_argnames=("delta", "loss_clip"))
        unclipped = cert(X, y, w, s, 0.5, delta=0.05, loss_clip=4 * exact)
        np.testing.assert_allclose(unclipped.risk_upper, 0.25, rtol=1e-10)
        np.testing.assert_allclose(unclipped.kl, 0.5)
        rhs = (0.5 + np.log(2 * np.sqrt(200) / 0.05)) / 200
        np.testing.assert_allclose(
            jax.jit(linear._kl_bernoulli_scalar)(0.25, unclipped.bound), rhs, rtol=1e-6
        )
        clipped = cert(X, y, w, s, 0.5, delta=0.05, loss_clip=exact / 3)
        np.testing.assert_allclose(clipped.risk_upper, 1.0, rtol=1e-12)
        np.testing.assert_allclose(clipped.bound, 1.0, rtol=1e-12)


_KEY = jax.random.key(0)
_S = jnp.zeros((D,))


def _case(id_, call, match):
    return pytest.param(call, match, id=id_)


@pytest.mark.parametrize(
    "call,match",
    [
        _case("flow_closed_form-eta<0",
              lambda X, y, w, p: linear.flow_closed_form(0.7, 0.3, -1.0, 2.0),
              r"^eta must lie in \[0.0, inf\]"),
        _case("flow_closed_form-t<0",
              lambda X, y, w, p: linear.flow_closed_form(0.7, 0.3, 1.0, -2.0),
              r"^t must lie in \[0.0, inf\]"),
        _case("flow_closed_form-t=nan",
              lambda X, y, w, p: linear.flow_closed_form(0.7, 0.3, 1.0, np.nan), r"^t must lie"),
        _case("logit_flow-eta<0", lambda X, y, w, p: linear.logit_flow(X, y, w, 0.0, -0.5, 1.0, 4),
              r"^eta must lie"),
        _case("logit_flow-t<0", lambda X, y, w, p: linear.logit_flow(X, y, w, 0.0, 0.5, -1.0, 4),
              r"^t must lie"),
        _case("orthogonal_flow-eta<0",
              lambda X, y, w, p: linear.orthogonal_flow(X, y, w, 0.0, -0.5, 1.0), r"^eta must lie"),
        _case("certificate-delta=0",
              lambda X, y, w, p: linear.pac_bayes_certificate(X, y, w, _S, 0.1, delta=0.0),
              r"delta must lie in \(0, 1\)"),
        _case("certificate-delta=1",
              lambda X, y, w, p: linear.pac_bayes_certificate(X, y, w, _S, 0.1, delta=1.0),
              r"delta must lie in \(0, 1\)"),
        _case("certificate-loss_clip=0",
              lambda X, y, w, p: linear.pac_bayes_certificate(X, y, w, _S, 0.1, loss_clip=0.0),
              "loss_clip must be > 0"),
        _case("certificate-loss_clip=nan",
              lambda X, y, w, p: linear.pac_bayes_certificate(X, y, w, _S, 0.1, loss_clip=np.nan),
              "loss_clip must be > 0"),
        _case("certificate-kl<0",
              lambda X, y, w, p: linear.pac_bayes_certificate(X, y, w, _S, -0.1),
              r"^kl must lie in \[0.0, inf\]"),
        _case("projected_gd-eps=0.5",
              lambda X, y, w, p: linear.projected_gd(X, y, w, p, 0.1, 3, eps=0.5),
              r"eps must lie in \[0, 0.5\)"),
        _case("projected_gd-eps<0",
              lambda X, y, w, p: linear.projected_gd(X, y, w, p, 0.1, 3, eps=-0.01),
              r"eps must lie in \[0, 0.5\)"),
        _case("projected_gd-lr<0", lambda X, y, w, p: linear.projected_gd(X, y, w, p, -0.1, 3),
              r"^lr must lie"),
        _case("dropout_solution-q=0", lambda X, y, w, p: linear.dropout_solution(X, y, 0.0),
              r"^q must lie in \(0.0, 1.0\]"),
        _case("dropout_gd-q>1", lambda X, y, w, p: linear.dropout_gd(X, y, w, 1.5, 0.1, 3),
              r"^q must lie"),
        _case("dropout_gd-lr<0", lambda X, y, w, p: linear.dropout_gd(X, y, w, 0.5, -0.1, 3),
              r"^lr must lie"),
        _case("correlated_design-rho<0",
              lambda X, y, w, p: linear.correlated_design(_KEY, 4, 2, -0.1),
              r"^rho must lie in \[0.0, 1.0\]"),
        _case("correlated_design-n=0",
              lambda X, y, w, p: linear.correlated_design(_KEY, 0, 2, 0.5), "need n > 0 and d > 0"),
    ],
)
def test_bad_values_raise(call, match):
    # Value checks run on concrete inputs (eagerly); each raises before any real work.
    X, y, w, p = (jnp.asarray(v, jnp.float32) for v in _problem(12))
    with pytest.raises(ValueError, match=match):
        call(X, y, w, p)


def test_experiment_quick_preset_writes_files(tmp_path):
    from experiments import linear_theory

    c = linear_theory.get_config()
    c.quick = True
    out = linear_theory.run(c, str(tmp_path))
    for name in [
        "config.json",
        "metrics.jsonl",
        "metrics.csv",
        "table.md",
        "plotted.json",
        "trajectories.png",
        "decomposition.png",
        "kl_bound.png",
        "keep_rule.png",
    ]:
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / "plotted.json") as f:
        plotted = json.load(f)
    assert set(plotted) >= {"trajectories", "decomposition", "kl", "keep_rule"}
    assert out["orthogonal_flow_agreement"] == 1.0
    assert 0.5 < out["kl_ratio_min_tight"] <= 1.0 + 1e-9
    assert out["kl_ratio_max"] <= 1.0 + 1e-9
