"""PAC-Bayes maths against independent references: scipy root finding, exact binomial enumeration,
Monte Carlo KL estimates and simulated certificates with a known true risk."""

import hashlib
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize, special
from scipy import stats as sps

from jaxprune import pac_bayes as pb


def _kl_ref(q: float, p: float) -> float:
    return float(special.rel_entr(q, p) + special.rel_entr(1 - q, 1 - p))


def _kl_inv_ref(q: float, c: float) -> float:
    """Independent kl^-1: brentq on [q, largest float below 1]; 1 if the root is closer to 1."""
    top = np.nextafter(1.0, 0.0)
    if q >= 1.0 or _kl_ref(q, top) <= c:
        return 1.0
    if c == 0.0:
        return q
    return optimize.brentq(
        lambda p: _kl_ref(q, p) - c, q, top, xtol=1e-16, rtol=4 * np.finfo(float).eps
    )


Q_GRID = np.array([0.0, 1e-6, 1e-3, 0.02, 0.1, 0.3, 0.5, 0.77, 0.95, 0.999, 1.0])
C_GRID = np.array([0.0, 1e-8, 1e-4, 1e-2, 0.05, 0.3, 1.0, 3.0, 20.0])


# ------------------------------------------------------------------------------------ kl and kl^-1


def test_binary_kl_matches_scipy_rel_entr():
    q, p = np.meshgrid(Q_GRID, np.array([1e-9, 0.01, 0.2, 0.5, 0.9, 1 - 1e-9]), indexing="ij")
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(pb.binary_kl)(q, p))
        edge = np.asarray(
            jax.jit(pb.binary_kl)(np.array([0.0, 1.0, 0.3, 0.3]), np.array([0.0, 1.0, 0.0, 1.0]))
        )
    ref = np.vectorize(_kl_ref)(q, p)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(edge, [0.0, 0.0, np.inf, np.inf])


def test_kl_inv_matches_brentq_to_1e9():
    q, c = (x.ravel() for x in np.meshgrid(Q_GRID, C_GRID, indexing="ij"))
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(pb.kl_inv)(q, c))
        kl_at = np.asarray(jax.jit(pb.binary_kl)(q, got))
    ref = np.array([_kl_inv_ref(a, b) for a, b in zip(q, c)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-9)
    assert (got >= q).all() and (got <= 1).all()
    # The bracket's upper end: never below the root, so kl(q||p) >= c unless p saturates at 1.
    assert np.all((kl_at >= c * (1 - 1e-12)) | (got == 1.0))
    assert got[(q == 0.3) & (c == 0.05)] == pytest.approx(0.45459683, abs=1e-8)


def test_kl_inv_gradient_matches_finite_differences():
    q, c = (
        x.ravel()
        for x in np.meshgrid([1e-3, 0.05, 0.3, 0.6, 0.9], [1e-3, 0.05, 0.5, 2.0], indexing="ij")
    )
    q, c = np.append(q, [0.0, 0.4, 1.0]), np.append(c, [0.0, 0.0, 1.0])  # last 3: edges (clamped)
    h = 1e-7
    with jax.enable_x64(True):
        f = jax.jit(pb.kl_inv)
        grad_q, grad_c = jax.jit(jax.grad(lambda a, b: jnp.sum(pb.kl_inv(a, b)), argnums=(0, 1)))(
            q, c
        )
        fd_q = (f(q + h, c) - f(q - h, c)) / (2 * h)
        fd_c = (f(q, c + h) - f(q, c - h)) / (2 * h)
        grad_q, grad_c, fd_q, fd_c = map(np.asarray, (grad_q, grad_c, fd_q, fd_c))
    np.testing.assert_allclose(grad_q[:-3], fd_q[:-3], rtol=2e-6, atol=1e-9)
    np.testing.assert_allclose(grad_c[:-3], fd_c[:-3], rtol=2e-6, atol=1e-9)
    assert np.isfinite(grad_q).all() and np.isfinite(grad_c).all()
    assert grad_q[-1] == grad_c[-1] == 0.0  # q = 1: kl^-1 = 1 whatever c


def test_kl_bound_is_a_differentiable_objective_in_mask_logits():
    """Training use: grad of kl^-1(L, B(KL(Q(s)||P))) in posterior logits s, vmapped over seeds."""
    n, delta = 1000, 0.05
    prior = {"a": jnp.zeros((3,)), "b": jnp.full((2,), -1.0)}

    def objective(s_a: jax.Array, emp: jax.Array) -> jax.Array:
        kl = pb.kl_bernoulli_logits({"a": s_a, "b": jnp.array([0.5, -2.0])}, prior)
        return pb.kl_bound(emp, kl, n, delta)

    s = np.array([[0.3, -1.0, 2.0], [1.0, 0.0, -0.5]])
    emp = np.array([0.1, 0.2])
    with jax.enable_x64(True):
        grads = jax.jit(jax.vmap(jax.grad(objective)))(s, emp)
        f = jax.jit(jax.vmap(objective))
        fd = np.stack([(f(s + h, emp) - f(s - h, emp)) / 2e-6 for h in np.eye(3) * 1e-6], axis=1)
    np.testing.assert_allclose(grads, fd, rtol=1e-6)


# ---------------------------------------------------------------------------------- KL divergences


# Monte Carlo references use numpy draws: independent of the code under test, and no PRNG compiles.
RNG = np.random.default_rng(0)


def _mc_check(log_ratio: np.ndarray, exact: float) -> None:
    """|MC mean - exact| < 5 standard errors, and the SE is small enough to mean something."""
    mean, se = float(np.mean(log_ratio)), float(np.std(log_ratio) / math.sqrt(log_ratio.shape[0]))
    assert se < 0.02 * max(exact, 0.1)
    assert abs(mean - exact) < 5 * se, (mean, exact, se)


Q_TREE = {"a": jnp.array([[0.9, 0.2, 0.5], [0.05, 0.7, 0.99]]), "b": jnp.array([0.3, 0.6])}
P_TREE = {"a": jnp.array([[0.5, 0.5, 0.1], [0.2, 0.7, 0.9]]), "b": jnp.array([0.8, 0.01])}


def test_kl_bernoulli_exact_logits_and_monte_carlo():
    q = np.concatenate([np.ravel(x) for x in jax.tree.leaves(Q_TREE)])
    p = np.concatenate([np.ravel(x) for x in jax.tree.leaves(P_TREE)])
    exact = sum(_kl_ref(a, b) for a, b in zip(q, p))
    to_logit = lambda t: jax.tree.map(lambda x: jnp.log(x) - jnp.log1p(-x), t)
    kls = jax.jit(
        lambda qt, pt: (
            pb.kl_bernoulli(qt, pt),
            pb.kl_bernoulli_logits(to_logit(qt), to_logit(pt)),
            pb.kl_bernoulli(qt, 0.5),
        )
    )(Q_TREE, P_TREE)
    kl, kl_logits, kl_uniform = map(float, kls)
    assert kl == pytest.approx(exact, rel=1e-5) and kl_logits == pytest.approx(exact, rel=1e-5)
    assert kl_uniform == pytest.approx(sum(_kl_ref(a, 0.5) for a in q), rel=1e-5)  # scalar prior
    m = RNG.random((200_000, q.size)) < q  # masks drawn from Q (numpy: an independent reference)
    _mc_check(np.sum(np.where(m, np.log(q / p), np.log((1 - q) / (1 - p))), axis=1), exact)


def test_kl_bernoulli_logits_stable_for_large_logits():
    a, b = np.array([30.0, -40.0, 12.0, 80.0]), np.array([31.0, -38.0, -12.0, 80.0])
    got = np.asarray(
        jax.jit(jax.vmap(pb.kl_bernoulli_logits))(a.astype(np.float32), b.astype(np.float32))
    )
    ls = special.log_expit  # float64 log-sigmoid from scipy
    ref = special.expit(a) * (ls(a) - ls(b)) + special.expit(-a) * (ls(-a) - ls(-b))
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    assert ref[0] == pytest.approx(3.442477108469501e-14, rel=1e-9) and got[3] == 0.0
    # Infinite logits on both sides (never-pruned leaves) give exactly 0 and finite gradients.
    inf = jnp.array([jnp.inf, -jnp.inf, 0.0])
    value, grad = jax.jit(jax.value_and_grad(pb.kl_bernoulli_logits))(inf, inf)
    assert float(value) == 0.0 and np.isfinite(grad).all()


def test_kl_gaussian_exact_and_monte_carlo():
    mq = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.3)}
    sq = {"w": jnp.array([0.4, 1.0, 0.1]), "b": jnp.array(0.2)}
    mp, sp = {"w": jnp.zeros(3), "b": jnp.array(0.0)}, 0.5  # shared scalar prior scale
    exact = sum(
        0.5 * (s**2 / 0.25 + m**2 / 0.25 - 1 + math.log(0.25 / s**2))
        for m, s in zip([0.5, -1.0, 2.0, 0.3], [0.4, 1.0, 0.1, 0.2])
    )
    kl, kl_log = map(
        float,
        jax.jit(
            lambda *a: (
                pb.kl_gaussian(*a),
                pb.kl_gaussian_log_std(a[0], jax.tree.map(jnp.log, a[1]), a[2], jnp.log(a[3])),
            )
        )(mq, sq, mp, sp),
    )
    assert kl == pytest.approx(exact, rel=1e-5) and kl_log == pytest.approx(exact, rel=1e-5)
    mu, sd = np.array([0.5, -1.0, 2.0, 0.3]), np.array([0.4, 1.0, 0.1, 0.2])
    w = mu + sd * RNG.standard_normal((200_000, 4))
    _mc_check(np.sum(sps.norm.logpdf(w, mu, sd) - sps.norm.logpdf(w, 0.0, 0.5), axis=1), exact)


def test_kl_mask_gaussian_is_the_sum_and_matches_monte_carlo():
    post = pb.MaskGaussian(jnp.array([1.5, -0.5]), jnp.array([0.2, -0.3]), jnp.array([-1.0, -2.0]))
    prior = pb.MaskGaussian(jnp.array([0.0, 1.0]), jnp.zeros(2), jnp.array(-0.5))
    kl, kl_m, kl_w = map(
        float,
        jax.jit(
            lambda po, pr: (
                pb.kl_mask_gaussian(po, pr),
                pb.kl_bernoulli_logits(po.mask_logits, pr.mask_logits),
                pb.kl_gaussian_log_std(po.mean, po.log_std, pr.mean, pr.log_std),
            )
        )(post, prior),
    )
    assert kl == pytest.approx(kl_m + kl_w, rel=1e-6)
    q, p = special.expit(np.asarray(post.mask_logits)), special.expit(np.asarray(prior.mask_logits))
    mu, sd_q, sd_p = np.asarray(post.mean), np.exp(np.asarray(post.log_std)), math.exp(-0.5)
    m = RNG.random((200_000, 2)) < q  # (m, w) ~ Q, independent
    w = mu + sd_q * RNG.standard_normal((200_000, 2))
    log_q = np.where(m, np.log(q), np.log1p(-q)) + sps.norm.logpdf(w, mu, sd_q)
    log_p = np.where(m, np.log(p), np.log1p(-p)) + sps.norm.logpdf(w, 0.0, sd_p)
    _mc_check(np.sum(log_q - log_p, axis=1), kl)


def test_deterministic_prior_raises_and_smoothing_fixes_it():
    q = {"k": jnp.array([0.9, 0.2, 1.0]), "bias": jnp.ones(2)}
    p = {"k": jnp.array([1.0, 0.0, 1.0]), "bias": jnp.ones(2)}  # a hard baseline mask
    with pytest.raises(ValueError, match=r"'k'.*2 entries.*must be smoothed"):
        pb.kl_bernoulli(q, p)
    with pytest.raises(ValueError, match="must be smoothed"):
        pb.kl_bernoulli_logits({"k": jnp.array([0.0])}, {"k": jnp.array([-jnp.inf])})
    assert float(jax.jit(pb.kl_bernoulli)(q, p)) == np.inf  # under jit: no raise, +inf
    prunable = {"k": True, "bias": False}
    smooth = pb.smooth_prior(p, 0.01, prunable)
    np.testing.assert_allclose(smooth["k"], [0.99, 0.01, 0.99])
    np.testing.assert_array_equal(smooth["bias"], [1.0, 1.0])  # never-pruned leaves stay exact
    expected = _kl_ref(0.9, 0.99) + _kl_ref(0.2, 0.01) + _kl_ref(1.0, 0.99)
    assert float(pb.kl_bernoulli(q, smooth)) == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------ bounds


def test_maurer_xi_is_below_2_sqrt_n_for_all_n():
    """Maurer's xi(n) = sup_L E exp(n kl(L_hat||L)) = sum_k Binom(k; n, k/n) <= 2 sqrt(n): the
    log(2 sqrt(n)/delta) term is valid for every n >= 1 (proved for n >= 8; equality at n = 1)."""
    for n in range(1, 301):
        k = np.arange(n + 1)
        assert sps.binom.pmf(k, n, k / n).sum() <= 2 * math.sqrt(n) + 1e-12


def test_bound_closed_forms_and_orderings():
    emp, kl, n, delta = 0.03, 2000.0, 30000, 0.025
    b = (kl + math.log(2 * math.sqrt(n) / delta)) / n
    with jax.enable_x64(True):
        got = {name: float(f(emp, kl, n, delta)) for name, f in pb.BOUNDS.items()}
        lam_grid = np.linspace(0.01, 1.99, 199)
        lam_vals = np.asarray(pb.lambda_bound(emp, kl, n, delta, lam=lam_grid))
        cat_vals = np.asarray(pb.catoni_bound(emp, kl, n, delta, c=np.linspace(0.01, 20.0, 20_000)))
        kl_catoni = float(pb.kl_inv(emp, (kl + math.log(1 / delta)) / n))
    assert got["classic"] == pytest.approx(emp + math.sqrt(b / 2), rel=1e-12)
    assert got["quad"] == pytest.approx((math.sqrt(emp + b / 2) + math.sqrt(b / 2)) ** 2, rel=1e-12)
    assert got["kl"] == pytest.approx(_kl_inv_ref(emp, b), abs=1e-9)
    assert got["catoni"] == pytest.approx(
        (1 - math.exp(-emp - (kl + math.log(1 / delta)) / n)) / (1 - math.exp(-1)), rel=1e-12
    )
    assert got["kl"] < got["quad"] < got["classic"]  # Pinsker and refined Pinsker relaxations
    assert got["lambda"] == pytest.approx(got["quad"], rel=1e-12)  # lambda* recovers quad
    assert lam_vals.min() >= got["quad"] * (1 - 1e-12)
    assert kl_catoni <= cat_vals.min() <= kl_catoni + 1e-6  # inf over C of Catoni = kl^-1
    np.testing.assert_allclose(  # pinned numbers quoted in README (PAC-Bayes tests, closed forms)
        [got[k] for k in ("classic", "kl", "quad", "lambda", "catoni")],
        [
            0.21300894800368808,
            0.13608498095673024,
            0.1892125445358429,
            0.1892125445358429,
            0.14594217719385727,
        ],
        rtol=1e-9,
    )


@jax.jit
def _bounds_at_kl0(emp: jax.Array, n: jax.Array, delta: jax.Array) -> dict[str, jax.Array]:
    out = {name: f(emp, 0.0, n, delta) for name, f in pb.BOUNDS.items()}
    out["mc (delta')"] = pb.mc_upper_bound(emp, n, delta)  # the same test with M = n draws
    return out


@pytest.mark.parametrize("delta", [0.05, 0.3])
def test_every_bound_covers_a_single_classifier_exactly(delta):
    """KL = 0 (Q = P = one classifier): P(bound(k/n) >= r) summed exactly over k ~ Binom(n, r)."""
    n = 60
    k = np.arange(n + 1)
    r = np.linspace(0.005, 0.995, 199)
    pmf = sps.binom.pmf(k[None, :], n, r[:, None])  # (R, K)
    with jax.enable_x64(True):
        vals = _bounds_at_kl0(k / n, np.float64(n), np.float64(delta))
    for name, v in vals.items():
        coverage = (pmf * (np.asarray(v)[None, :] >= r[:, None])).sum(axis=1)
        assert coverage.min() >= 1 - delta, (name, coverage.min())
    # Power: the bare empirical risk fails coverage.
    assert (pmf * (k / n >= r[:, None])).sum(axis=1).min() < 1 - delta


# 8 classifiers h_m indexed by a 3-bit mask m; h_m errs on a point iff u < R_TRUE[m], u ~ U(0, 1).
R_TRUE = jnp.array([0.30, 0.32, 0.34, 0.36, 0.38, 0.40, 0.42, 0.44])
BITS = (jnp.arange(8)[:, None] >> jnp.arange(3)[None, :]) & 1  # (8, 3)
N_SIM, M_SIM, DELTA, DELTA_PRIME = 40, 100, 0.1, 0.05


def _trial(
    u_N: jax.Array, v_Mx3: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array, jax.Array]:
    """One bound set (uniforms u) and M network draws (uniforms v). Q = Bernoulli(q) over mask bits
    with q pointing at the empirically best h (data-dependent), P = Bernoulli(0.5). The stochastic
    risk L(Q) = sum_m Q(m) R_TRUE[m] is exact."""
    emp = jnp.mean(u_N[None, :] < R_TRUE[:, None], axis=1)  # (8,) bound-set errors of every h_m
    q = jnp.where(BITS[jnp.argmin(emp)] == 1, 0.95, 0.05)
    q_m = jnp.prod(jnp.where(BITS == 1, q[None, :], 1 - q[None, :]), axis=1)  # Q(m), (8,)
    true_risk, emp_risk = q_m @ R_TRUE, q_m @ emp
    kl = pb.kl_bernoulli(q, 0.5)
    masks_M = (v_Mx3 < q[None, :]).astype(jnp.int32)  # M networks sampled from Q
    errors_M = emp[masks_M @ (2 ** jnp.arange(3))]
    _, mc_upper, cert_kl = pb.certified_risk(errors_M, kl, N_SIM, DELTA, DELTA_PRIME, bound="kl")
    out = {"cert_kl": cert_kl, "naive": emp_risk}
    for name, f in pb.BOUNDS.items():
        out[name] = f(emp_risk, kl, N_SIM, DELTA)  # with the exact L_hat_S(Q)
        if name != "kl":
            out["cert_" + name] = f(mc_upper, kl, N_SIM, DELTA)  # what certified_risk computes
    return true_risk, out, errors_M, kl


def test_certificates_cover_the_true_stochastic_risk_in_simulation():
    trials = 2000
    u, v = RNG.random((trials, N_SIM), np.float32), RNG.random((trials, M_SIM, 3), np.float32)
    true_risk, out, errors_M, kl = jax.jit(jax.vmap(_trial))(u, v)
    for name, val in out.items():
        coverage = float(jnp.mean(val >= true_risk))
        budget = DELTA + DELTA_PRIME if name.startswith("cert_") else DELTA
        if name == "naive":
            assert (
                coverage < 0.6
            )  # selection makes the empirical risk optimistic: the test has power
        else:
            assert coverage >= 1 - budget, (name, coverage)
    # The host certificate agrees with the vmapped core on one trial.
    cert = pb.certificate(
        errors_M[0],
        float(kl[0]),
        n=N_SIM,
        delta=DELTA,
        delta_prime=DELTA_PRIME,
        bound_indices=np.arange(N_SIM),
        prior_indices=np.arange(N_SIM, 2 * N_SIM),
    )
    assert cert.risk_bound == pytest.approx(float(out["cert_kl"][0]), rel=1e-5)


# ------------------------------------------------------------------------ union bound, certificate


def test_union_bound_costs_exactly_log_grid_size():
    emp, kl, n, delta = 0.08, 350.0, 5000, 0.05
    with jax.enable_x64(True):
        for k in (1, 2, 10, 1000):
            cost = n * (
                pb.complexity(kl, n, pb.union_delta(delta, k)) - pb.complexity(kl, n, delta)
            )
            assert float(cost) == pytest.approx(math.log(k), abs=1e-10)
            for name, f in pb.BOUNDS.items():  # a grid of K is the same as adding log K to the KL
                assert float(f(emp, kl, n, pb.union_delta(delta, k))) == pytest.approx(
                    float(f(emp, kl + math.log(k), n, delta)), rel=1e-12
                ), name
        j = np.arange(1, 200_001)
        assert float(jnp.sum(pb.union_delta_countable(delta, j))) == pytest.approx(delta, rel=1e-5)
        assert float(jnp.log(delta / pb.union_delta_countable(delta, 7))) == pytest.approx(
            math.log(math.pi**2 * 49 / 6), rel=1e-12
        )


def test_certificate_record():
    errors = np.array([0.02, 0.05, 0.03, 0.04])
    bound_idx, prior_idx = np.arange(10, 1010), np.arange(10)
    cert = pb.certificate(
        errors,
        12.5,
        n=1000,
        delta=0.025,
        delta_prime=0.01,
        bound_indices=bound_idx,
        prior_indices=prior_idx,
        grid_size=4,
    )
    with jax.enable_x64(True):
        mc_upper = float(pb.kl_inv(0.035, math.log(2 / 0.01) / 4))
        bound = float(pb.kl_bound(mc_upper, 12.5, 1000, 0.025 / 4))
    d = cert.to_dict()
    assert d["mc_risk"] == pytest.approx(0.035, abs=1e-15)
    assert d["mc_risk_upper"] == pytest.approx(mc_upper, abs=1e-12)
    assert d["risk_bound"] == pytest.approx(bound, abs=1e-12)
    assert (d["n"], d["m"], d["grid_size"], d["bound"]) == (1000, 4, 4, "kl")
    assert (d["delta"], d["delta_bound"], d["delta_prime"]) == (0.025, 0.025 / 4, 0.01)
    assert d["confidence"] == pytest.approx(0.965)
    assert d["split_hash"] == hashlib.sha256(bound_idx.astype("<i8").tobytes()).hexdigest()
    assert d["split_hash"] == pb.split_hash(
        bound_idx[::-1].astype(np.int32)
    )  # order and dtype free
    assert d["prior_split_hash"] != d["split_hash"]
    # Per-example (M, n) losses give the same record; other bounds record their parameters.
    losses = (np.arange(1000)[None, :] < (errors * 1000)[:, None]).astype(np.float32)
    same = pb.certificate(
        losses,
        12.5,
        n=1000,
        delta=0.025,
        delta_prime=0.01,
        bound_indices=bound_idx,
        prior_indices=prior_idx,
        grid_size=4,
    )
    assert same.risk_bound == pytest.approx(cert.risk_bound, abs=1e-12)
    cat = pb.certificate(
        errors,
        12.5,
        n=1000,
        delta=0.025,
        delta_prime=0.01,
        bound_indices=bound_idx,
        prior_indices=prior_idx,
        bound="catoni",
        c=2.0,
    )
    assert cat.bound_kwargs == {"c": 2.0} and cat.risk_bound == pytest.approx(
        float(pb.catoni_bound(cat.mc_risk_upper, 12.5, 1000, 0.025, c=2.0)), rel=1e-6
    )


def test_certificate_never_uses_prior_points():
    kw = {"n": 5, "delta": 0.05, "delta_prime": 0.01}
    with pytest.raises(ValueError, match=r"2 bound-set indices are also prior-set.*\[3, 4\]"):
        pb.certificate(
            np.zeros(3), 1.0, bound_indices=np.arange(5), prior_indices=np.arange(3, 8), **kw
        )
    with pytest.raises(ValueError, match="repeat"):
        pb.certificate(
            np.zeros(3),
            1.0,
            bound_indices=np.array([0, 1, 1, 2, 3]),
            prior_indices=np.arange(5, 8),
            **kw,
        )
    with pytest.raises(ValueError, match="n = 5 but there are 4"):
        pb.certificate(
            np.zeros(3), 1.0, bound_indices=np.arange(4), prior_indices=np.arange(5, 8), **kw
        )
    # An empty prior set (data-free prior) is fine.
    pb.certificate(
        np.zeros(3), 1.0, bound_indices=np.arange(5), prior_indices=np.array([], int), **kw
    )


_OK = {
    "n": 5,
    "delta": 0.05,
    "delta_prime": 0.01,
    "bound_indices": np.arange(5),
    "prior_indices": np.arange(5, 9),
}


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda: pb.kl_inv(1.2, 0.1), "q"),
        (lambda: pb.kl_inv(0.2, -0.1), "c"),
        (lambda: pb.kl_bound(0.1, 1.0, 100, 0.0), "delta"),
        (lambda: pb.kl_bound(0.1, 1.0, 100, 1.0), "delta"),
        (lambda: pb.classic_bound(0.1, 1.0, 0, 0.05), "n must be an integer"),
        (lambda: pb.quad_bound(0.1, 1.0, 10.5, 0.05), "n must be an integer"),
        (lambda: pb.quad_bound(0.1, -1.0, 10, 0.05), "kl"),
        (lambda: pb.quad_bound(-0.1, 1.0, 10, 0.05), "empirical risk"),
        (lambda: pb.lambda_bound(0.1, 1.0, 10, 0.05, lam=2.0), "lam"),
        (lambda: pb.catoni_bound(0.1, 1.0, 10, 0.05, c=0.0), "Catoni"),
        (lambda: pb.mc_upper_bound(0.1, 0, 0.01), "number of sampled"),
        (lambda: pb.union_delta(0.05, 0), "grid_size"),
        (lambda: pb.smooth_prior({"k": jnp.ones(2)}, 0.0), "eps"),
        (lambda: pb.kl_bernoulli({"k": jnp.array([1.5])}, 0.5), "'k'.*\\[0, 1\\]"),
        (
            lambda: pb.kl_bernoulli({"k": jnp.ones(2)}, {"j": jnp.ones(2)}),
            "different tree structures",
        ),
        (lambda: pb.kl_bernoulli({"k": jnp.ones(2)}, {"k": jnp.ones(3)}), "'k'.*shape"),
        (
            lambda: pb.kl_gaussian({"w": jnp.ones(2)}, {"w": jnp.array([1.0, 0.0])}, 0.0, 1.0),
            "'w'.*> 0",
        ),
        (lambda: pb.kl_gaussian_log_std(jnp.ones(2), -jnp.inf, 0.0, 0.0), "finite"),
        (lambda: pb.certified_risk(jnp.ones((2, 2)), 1.0, 5, 0.05, 0.01), "shape \\(M,\\)"),
        (
            lambda: pb.certified_risk(jnp.ones(2), 1.0, 5, 0.05, 0.01, bound="seeger"),
            "unknown bound",
        ),
        (lambda: pb.certificate(np.array([0.5, 1.5]), 1.0, **_OK), "errors"),
        (lambda: pb.certificate(np.zeros(2), np.inf, **_OK), "smoothed"),
        (
            lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "delta": 0.6, "delta_prime": 0.5}),
            "< 1",
        ),
        (lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "grid_size": 0}), "grid_size"),
        (lambda: pb.split_hash(np.array([0.5, 1.0])), "integer"),
    ],
)
def test_bad_inputs_raise(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_vmapped_certified_risk_matches_single_calls():
    errors = jnp.array([[0.1, 0.2, 0.15], [0.0, 0.05, 0.0]])
    kls = jnp.array([3.0, 10.0])
    fn = lambda e, k: pb.certified_risk(e, k, 200, 0.05, 0.01, grid_size=3)
    batched = jax.jit(jax.vmap(fn))(errors, kls)
    single = jax.jit(fn)
    stacked = jax.tree.map(lambda *x: jnp.stack(x), *[single(e, k) for e, k in zip(errors, kls)])
    chex.assert_trees_all_close(batched, stacked, rtol=1e-6)


# ------------------------------------------------------------- NaN, ranges and monotonicity


@pytest.mark.parametrize(
    "fn, match",
    # Catches a validator that lets NaN through (NaN fails every comparison: `x < lo` misses it).
    [
        (lambda: pb.kl_inv(np.nan, 0.1), r"q .*nan"),
        (lambda: pb.kl_inv(0.1, np.nan), r"c .*nan"),
        (lambda: pb.kl_inv(-0.1, 0.1), "q"),
        (lambda: pb.kl_bound(np.nan, 1.0, 100, 0.05), "empirical risk"),
        (lambda: pb.kl_bound(1.5, 1.0, 100, 0.05), "empirical risk"),
        (lambda: pb.kl_bound(0.1, np.nan, 100, 0.05), "kl"),
        (lambda: pb.kl_bound(0.1, 1.0, np.nan, 0.05), "n must be an integer"),
        (lambda: pb.kl_bound(0.1, 1.0, -5, 0.05), "n must be an integer"),
        (lambda: pb.kl_bound(0.1, 1.0, 100, np.nan), "delta"),
        (lambda: pb.kl_bound(0.1, 1.0, 100, np.array([0.05, np.nan])), "delta"),  # any entry
        (lambda: pb.classic_bound(0.1, 1.0, 100, -0.05), "delta"),
        (lambda: pb.catoni_bound(0.1, 1.0, 10, 0.05, c=np.nan), "Catoni"),
        (lambda: pb.catoni_bound(0.1, 1.0, 10, 0.05, c=-1.0), "Catoni"),
        (lambda: pb.lambda_bound(0.1, 1.0, 10, 0.05, lam=np.nan), "lam"),
        (lambda: pb.lambda_bound(0.1, 1.0, 10, 0.05, lam=0.0), "lam"),
        (lambda: pb.mc_upper_bound(0.1, 10, 1.0), "delta_prime"),
        (lambda: pb.mc_upper_bound(0.1, 2.5, 0.01), "number of sampled"),
        (lambda: pb.union_delta(1.0, 3), "delta"),
        (lambda: pb.union_delta_countable(0.05, 0), "j must be an integer"),
        (lambda: pb.union_delta_countable(0.05, 1.5), "j must be an integer"),
        (lambda: pb.smooth_prior({"k": jnp.ones(2)}, 0.6), "eps"),
        (lambda: pb.kl_bernoulli({"k": jnp.array([np.nan])}, 0.5), "'k'.*NaN"),
        (lambda: pb.kl_bernoulli({"k": jnp.array([0.5])}, -0.1), "probabilities"),
        (lambda: pb.kl_bernoulli_logits({"k": jnp.array([np.nan])}, 0.0), "'k'.*NaN"),
        (lambda: pb.kl_gaussian_log_std({"w": jnp.array([np.nan])}, 0.0, 0.0, 0.0), "'w'.*finite"),
        (lambda: pb.certified_risk(jnp.array([0.1, np.nan]), 1.0, 5, 0.05, 0.01), "errors_M"),
        (lambda: pb.certificate(np.zeros((2, 3)), 1.0, **_OK), "3 examples per network but n = 5"),
        (lambda: pb.certificate(np.zeros((0,)), 1.0, **_OK), "M >= 1"),
        (lambda: pb.certificate(np.zeros(2), -1.0, **_OK), "kl must be >= 0"),
        (lambda: pb.certificate(np.zeros(2), np.nan, **_OK), "not finite"),
        (lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "delta_prime": 0.0}), "delta_prime"),
        (lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "delta": np.nan}), "delta"),
        (lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "n": 5.5}), "n must be an integer"),
        (
            lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "bound_indices": np.arange(-1, 4)}),
            "non-negative",
        ),
        (
            lambda: pb.certificate(np.zeros(2), 1.0, **{**_OK, "bound_indices": np.arange(0)}),
            "empty",
        ),
    ],
)
def test_nan_and_out_of_range_arguments_raise(fn, match):
    with pytest.raises(ValueError, match=match):
        fn()


def test_nan_under_jit_gives_nan_never_a_finite_bound():
    """Under jit the checks cannot run; a NaN risk or KL must come back NaN, not a number that looks
    like a certificate. Catches kl_inv's bisection turning NaN into its start bracket (hi = 1)."""
    with jax.enable_x64(True):
        for name, f in pb.BOUNDS.items():
            for emp, kl in ((np.nan, 1.0), (0.1, np.nan)):
                assert np.isnan(float(jax.jit(f)(emp, kl, 100, 0.05))), (name, emp, kl)
        q, c = np.array([np.nan, 0.2, np.nan]), np.array([0.1, np.nan, 0.0])
        inv = np.asarray(jax.jit(pb.kl_inv)(q, c))
        assert np.isnan(inv).all()
        mc = jax.jit(pb.certified_risk)(jnp.array([0.1, np.nan]), 1.0, 100, 0.05, 0.01)
        assert np.isnan(np.asarray(mc)).all()


def test_every_bound_is_monotone_in_risk_kl_n_and_delta():
    """certified_risk plugs the MC *upper* bound on L_hat into every bound, which is valid only if
    each bound is nondecreasing in L_hat (and a larger KL, smaller n or smaller delta can only
    loosen it). Catches a sign slip such as Catoni's exp(-C L_hat) written exp(+C L_hat)."""
    emp = np.linspace(0.0, 0.9, 46)
    kls = np.array([0.0, 0.5, 3.0, 40.0])
    ns = np.array([10, 100, 1000, 30000])
    deltas = np.array([0.5, 0.1, 0.01, 1e-4])
    with jax.enable_x64(True):
        for name, f in pb.BOUNDS.items():
            g = jax.jit(f)
            by_emp_kl = np.asarray(g(emp[:, None], kls[None, :], 500, 0.05))  # (46, 4)
            by_n = np.asarray(g(0.2, 5.0, ns, 0.05))
            by_delta = np.asarray(g(0.2, 5.0, 500, deltas))
            assert np.all(np.diff(by_emp_kl, axis=0) > 0), name  # strictly, in the risk
            assert np.all(np.diff(by_emp_kl, axis=1) > 0), name  # strictly, in the KL
            assert np.all(np.diff(by_n) < 0) and np.all(np.diff(by_delta) > 0), name
            assert np.all(by_emp_kl >= emp[:, None]), name  # never below the empirical risk
        inv = np.asarray(jax.jit(pb.kl_inv)(emp[:, None], kls[None, :] / 50))
        assert np.all(np.diff(inv, axis=0) > 0) and np.all(np.diff(inv, axis=1) >= 0)
