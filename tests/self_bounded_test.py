"""Self-bounded learning: split hygiene (no prior point in a certificate), objective gradients
(against the bound over all masks of a tiny MLP), KLs against closed forms, padding beyond n_bound,
vmap-over-seeds equivalence, config errors, and the quick experiment end to end."""

import functools
import itertools
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.optimize
import scipy.special

from jaxprune import data as data_lib
from jaxprune import masks, models, pac_bayes, train
from jaxprune import self_bounded as sb

pytestmark = pytest.mark.usefixtures("fast_compile")

_MODEL = models.get_model("mlp", 3, widths=(4,))
_N = 48


def _tiny():
    """48 points in R^3, labels from a linear teacher; a random (untrained) 3-4-3 MLP prior."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(_N, 3)).astype(np.float32)
    y = np.argmax(x @ rng.normal(size=(3, 3)), -1).astype(np.int32)
    params, _ = train.init_variables(jax.random.key(0), _MODEL, x[:1])
    prunable = masks.prunable_tree(params)
    logits = jax.tree.map(lambda w: jnp.full(w.shape, 2.0), params)
    return jnp.asarray(x), jnp.asarray(y), params, prunable, logits


_X, _Y, _PARAMS, _PRUNABLE, _LOGITS = _tiny()
_PRIOR = sb.make_prior(_PARAMS, _LOGITS, _PRUNABLE, 1e-3, math.log(0.1))
_CFG = sb.SBConfig(variant="both", num_samples=2, steps=24, batch_size=16, mask_lr=0.1,
                   weight_lr=0.05)
_FIT = functools.partial(sb.fit, model=_MODEL, cfg=_CFG, prunable=_PRUNABLE)


_KEYS = jax.random.split(jax.random.key(7), len(sb.OBJECTIVES))


def _one(key, objective):
    return _FIT(key, _PRIOR, _X, _Y, _N, objective)


_BATCHED = jax.jit(jax.vmap(_one))  # one compile serves both tests below (same shapes)


@functools.lru_cache(maxsize=None)
def _fit_objectives():
    """All five objectives at once, one seed each: vmap over (key, objective index)."""
    return _BATCHED(_KEYS, jnp.arange(len(sb.OBJECTIVES)))


def test_split_is_disjoint_deterministic_and_hashed():
    a = sb.split_prior_bound(100, 0.3, seed=5)
    b = sb.split_prior_bound(100, 0.3, seed=5)
    np.testing.assert_array_equal(a.bound_idx, b.bound_idx)
    assert a.prior_idx.size == 30 and a.bound_idx.size == 70
    assert np.intersect1d(a.prior_idx, a.bound_idx).size == 0
    np.testing.assert_array_equal(np.union1d(a.prior_idx, a.bound_idx), np.arange(100))
    assert a.bound_hash == pac_bayes.split_hash(a.bound_idx) != a.prior_hash
    assert sb.split_prior_bound(100, 0.3, seed=6).bound_hash != a.bound_hash
    with pytest.raises(ValueError, match="alpha"):
        sb.split_prior_bound(100, 1.0, seed=0)


def test_certificate_never_uses_prior_points():
    # Prior-set labels are all wrong for a fixed classifier that is right on every bound-set point:
    # any prior point in the bound data or in the certificate's empirical risk would show as error.
    n = 40
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 3)).astype(np.float32)
    w = {"head": {"kernel": jnp.eye(3), "bias": jnp.zeros(3)}}
    model = models.get_model("mlp", 3, widths=())
    y_true = np.argmax(x, -1).astype(np.int32)
    split = sb.split_prior_bound(n, 0.5, seed=0)
    y = y_true.copy()
    y[split.prior_idx] = (y_true[split.prior_idx] + 1) % 3
    ds = data_lib.Dataset(data_lib.Split(x, y), data_lib.Split(x, y), 3, "toy")
    prunable = masks.prunable_tree(w)
    post = sb.Posterior(jax.tree.map(lambda v: jnp.full(v.shape, 30.0), w), w,
                        jax.tree.map(lambda v: jnp.full(v.shape, -30.0), w))
    bset, pset = sb.bound_set(ds, split), sb.prior_dataset(ds, split).train
    assert len(bset.y) == 20 and len(pset.y) == 20
    err = jax.jit(functools.partial(sb.sampled_errors, model=model, prunable=prunable,
                                    variant="both", num_networks=4))
    errs_bound = err(jax.random.key(0), post, jnp.asarray(bset.x), jnp.asarray(bset.y))
    errs_prior = err(jax.random.key(0), post, jnp.asarray(pset.x), jnp.asarray(pset.y))
    np.testing.assert_array_equal(errs_bound, 0.0)
    np.testing.assert_array_equal(errs_prior, 1.0)
    cert = sb.certify(errs_bound, 0.0, split, delta=0.025, delta_prime=0.01, grid_size=1)
    assert cert.mc_risk == 0.0 and cert.n == 20
    assert cert.split_hash == split.bound_hash and cert.prior_split_hash == split.prior_hash
    leaky = split._replace(bound_idx=np.arange(n), bound_hash="")
    with pytest.raises(ValueError, match="prior"):
        sb.certify(np.zeros(4), 0.0, leaky, delta=0.025, delta_prime=0.01, grid_size=1)


def test_prior_is_smoothed_and_kl_starts_at_zero():
    hard = jax.tree.map(lambda w: jnp.where(jnp.arange(w.size).reshape(w.shape) % 2 == 0, 40.0, -40.0),
                        _PARAMS)

    @jax.jit  # one compile instead of dozens of eager ops
    def kls(hard):
        prior = sb.make_prior(_PARAMS, hard, _PRUNABLE, 1e-3, math.log(0.1))
        post = sb.init_posterior(prior)
        at_start = [sb.kl_divergence(post, prior, _PRUNABLE, v) for v in sb.VARIANTS]
        # Flip one prunable logit (costs kl(1-ε‖ε)); move a bias logit (never pruned: costs 0).
        k = post.mask_logits["dense1"]["kernel"]
        moved = post._replace(mask_logits={**post.mask_logits, "dense1": {
            "kernel": k.at[0, 0].set(-k[0, 0]), "bias": post.mask_logits["dense1"]["bias"] + 5.0}})
        return prior, jnp.stack(at_start), sb.kl_divergence(moved, prior, _PRUNABLE, "mask")

    prior, at_start, flipped = kls(hard)
    p = jax.nn.sigmoid(prior.mask_logits["dense1"]["kernel"])
    np.testing.assert_allclose(np.sort(np.unique(np.round(np.asarray(p), 6))), [1e-3, 1 - 1e-3],
                               rtol=1e-4)
    np.testing.assert_array_equal(at_start, 0.0)
    np.testing.assert_allclose(float(flipped), float(pac_bayes.binary_kl(1 - 1e-3, 1e-3)), rtol=1e-4)


def test_surrogate_loss_is_clipped_and_rescaled():
    logits = jnp.array([[10.0, 0.0, 0.0], [0.0, 0.0, 0.0], [-50.0, 0.0, 0.0]])
    y = jnp.array([0, 0, 0])
    c = math.log(1e4)
    ce = np.array([np.log1p(2 * np.exp(-10.0)), np.log(3.0), c])  # the last one clipped at C
    np.testing.assert_allclose(float(sb.surrogate_loss(logits, y, 1e-4)), ce.mean() / c, rtol=1e-5)


def test_objective_gradients_finite_and_bounds_decrease():
    state, m = _fit_objectives()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(state.posterior))
    obj = np.asarray(m["objective"])  # (objectives, steps)
    assert np.isfinite(obj).all() and np.isfinite(np.asarray(m["kl"])).all()
    assert (obj[:, -6:].mean(1) < obj[:, :6].mean(1) - 0.01).all(), obj[:, [0, -1]]
    assert (np.asarray(m["kl"])[:, -1] > 0).all()
    sur = np.asarray(m["surrogate"])
    assert ((sur >= 0) & (sur <= 1)).all()


def test_vmapped_seeds_equal_single_runs():
    # Seeds vmapped (every objective index 1 = the kl bound) against single jitted runs.
    batched = _BATCHED(_KEYS, jnp.ones(len(sb.OBJECTIVES), jnp.int32))
    single = jax.jit(_one)
    for s in (0, 3):
        state, m = single(_KEYS[s], jnp.int32(1))
        one = jax.tree.map(lambda v: v[s], batched)
        chex.assert_trees_all_close(one[0].posterior, state.posterior, rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(one[1], m, rtol=1e-4, atol=1e-5)
    assert not np.allclose(batched[1]["objective"][0], batched[1]["objective"][3])  # seeds differ


def test_quick_experiment_writes_files(tmp_path):
    from experiments import pac_bayes

    c = pac_bayes.get_config()
    c.quick = True
    out = pac_bayes.run(c, str(tmp_path))
    for f in ("config.json", "results.jsonl", "results.csv", "table.md", "certificates.png",
              "alpha.png"):
        assert os.path.getsize(tmp_path / f) > 0, f
    rows = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(rows) == len(out["results"]) == 1
    r = rows[0]
    n_train = len(data_lib.load_dataset("digits").train.y)
    assert r["n"] == n_train - round(0.5 * n_train)
    for s in range(2):
        assert r["mc_risk"][s] <= r["mc_risk_upper"][s] <= r["certificate"][s] <= 1.0
        assert 0.0 <= r["stochastic_test_error"][s] <= 1.0 and r["kl"][s] >= 0.0


def test_per_example_mc_matches_exact_gibbs_risk_by_enumeration():
    """Gibbs empirical risk of a 2-2-2 MLP under Bernoulli masks, exactly over all 2^8 masks; both MC
    schemes (M networks on all of S, and a fresh network per example) agree with it within 4 SE."""
    model = models.get_model("mlp", 2, widths=(2,))
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(32, 2)).astype(np.float32))
    y = jnp.asarray((rng.normal(size=32) > 0).astype(np.int32))
    params, _ = train.init_variables(jax.random.key(3), model, x[:1])
    prunable = masks.prunable_tree(params)
    logits = jax.tree.map(lambda w: jnp.asarray(rng.normal(size=w.shape), jnp.float32), params)
    prior = sb.make_prior(params, logits, prunable, 1e-3, math.log(0.1))
    post = sb.init_posterior(prior)
    probs = masks.logits_to_probs(post.mask_logits)
    flat, treedef = jax.tree.flatten(prunable)
    kernels = [i for i, f in enumerate(flat) if f]
    p_leaves = jax.tree.leaves(probs)
    sizes = [p_leaves[i].size for i in kernels]
    assert sum(sizes) == 8
    err_fn = jax.jit(lambda m: train.error_rate(train.predict(model, post.mean, {}, m, x), y))
    exact = 0.0
    for bits in itertools.product((0.0, 1.0), repeat=8):
        b, leaves, prob = np.asarray(bits, np.float32), [jnp.ones_like(p) for p in p_leaves], 1.0
        for i, off in zip(kernels, np.cumsum([0] + sizes[:-1])):
            m = b[off: off + p_leaves[i].size].reshape(p_leaves[i].shape)
            leaves[i] = jnp.asarray(m)
            pi = np.asarray(p_leaves[i], np.float64)
            prob *= float(np.prod(np.where(m == 1, pi, 1 - pi)))
        exact += prob * float(err_fn(jax.tree.unflatten(treedef, leaves)))
    kw = dict(model=model, prunable=prunable, variant="mask")
    per_ex = np.asarray(jax.jit(functools.partial(sb.per_example_errors, repeats=300, **kw))(
        jax.random.key(0), post, x, y))
    assert per_ex.shape == (300, 32) and set(np.unique(per_ex)) <= {0.0, 1.0}
    se = math.sqrt(exact * (1 - exact) / per_ex.size)
    assert abs(per_ex.mean() - exact) < 4 * se, (per_ex.mean(), exact, se)
    nets = np.asarray(jax.jit(functools.partial(sb.sampled_errors, num_networks=300, **kw))(
        jax.random.key(1), post, x, y))
    assert abs(nets.mean() - exact) < 4 * nets.std() / math.sqrt(nets.size) + 1e-6
    # A deterministic posterior (p = 1) reproduces the network's per-example errors exactly.
    det = post._replace(mask_logits=jax.tree.map(lambda s: jnp.full_like(s, 50.0), post.mask_logits))
    per_det = np.asarray(sb.per_example_errors(jax.random.key(2), det, x, y, **kw))
    logits_det, _ = train.forward(model, post.mean, {}, None, x, train=False)
    np.testing.assert_array_equal(per_det[0], np.asarray(jnp.argmax(logits_det, -1) != y, np.float32))
    with pytest.raises(ValueError, match="repeats"):
        sb.per_example_errors(jax.random.key(2), det, x, y, repeats=0, **kw)


# ------------------------------------------------------------------------------- objective, step


def _bound_oracle(name, e, k, n, delta):
    """The five objectives in float64 numpy from their closed forms (kl⁻¹ by scipy's brentq)."""
    b = (k + math.log(2.0 * math.sqrt(n) / delta)) / n
    if name == "classic":
        return e + math.sqrt(b / 2)
    if name in ("quad", "lambda"):  # lambda at λ* equals quad (Thiemann et al. 2017)
        return (math.sqrt(e + b / 2) + math.sqrt(b / 2)) ** 2
    if name == "catoni":  # C = 1
        return -math.expm1(-e - (k + math.log(1 / delta)) / n) / -math.expm1(-1.0)
    assert name == "kl"

    def kl_gap(p):
        return scipy.special.rel_entr(e, p) + scipy.special.rel_entr(1 - e, 1 - p) - b

    return scipy.optimize.brentq(kl_gap, e, 1 - 1e-15, xtol=1e-14) if kl_gap(1 - 1e-15) > 0 else 1.0


def test_objective_value_index_selects_each_named_bound():
    # Catches a switch branch bound to the wrong name (order, late-binding closure) or n/δ mixed up.
    e = jnp.array([0.0, 0.05, 0.3, 0.9] * 3)
    k = jnp.repeat(jnp.array([0.0, 2.0, 15.0]), 4)
    n, delta = 50, 0.01
    f = jax.jit(jax.vmap(sb.objective_value, in_axes=(None, 0, 0, None, None)))
    got = np.stack([np.asarray(f(jnp.int32(i), e, k, n, delta)) for i in range(len(sb.OBJECTIVES))])
    named = np.stack([np.asarray(jax.jit(pac_bayes.BOUNDS[name])(e, k, n, delta))
                      for name in sb.OBJECTIVES])
    oracle = np.array([[_bound_oracle(name, float(a), float(b), n, delta) for a, b in zip(e, k)]
                       for name in sb.OBJECTIVES])
    np.testing.assert_allclose(got, named, rtol=1e-6)
    np.testing.assert_allclose(got, oracle, rtol=2e-5, atol=1e-6)
    # The objectives really differ (else a swapped branch would go unseen), lambda = quad aside.
    rows = {name: oracle[i] for i, name in enumerate(sb.OBJECTIVES)}
    for a, b in itertools.combinations(("classic", "kl", "quad", "catoni"), 2):
        assert np.abs(rows[a] - rows[b]).max() > 1e-2, (a, b)


def test_fit_metrics_are_the_bound_at_reported_risk_and_kl():
    # Every step of every objective: objective = BOUNDS[name](surrogate, kl, N, δ/K), with the KL of
    # the posterior before the step (0 at Q = P). Catches wrong N, δ, index or stale metrics.
    _, m = _fit_objectives()
    sur, kl, obj = (np.asarray(m[k], np.float64) for k in ("surrogate", "kl", "objective"))
    np.testing.assert_array_equal(kl[:, 0], 0.0)
    delta = _CFG.delta / _CFG.grid_size
    for i, name in enumerate(sb.OBJECTIVES):
        want = [_bound_oracle(name, s, q, _N, delta) for s, q in zip(sur[i], kl[i])]
        np.testing.assert_allclose(obj[i], want, rtol=2e-5, err_msg=name)


def _adam_first_moment(opt_state, group):
    """mu of the Adam of multi_transform group "mask" or "weights": (1 - b1) g after one step."""
    return optax.tree_utils.tree_get(opt_state.inner_states[group], "mu")


def test_train_step_gradient_and_metrics_match_bound_by_enumeration():
    """'mask' variant, exact estimator, 2-2-2 MLP (8 prunable entries): the gradient the step feeds
    Adam is jax.grad of bound(Σ_m Q(m) L(m), KL(Q‖P), N, δ/K) over all 2^8 masks, every objective.

    Q is moved away from P, so both paths (∂b/∂L̂ · ∇L̂ and ∇ through the KL) matter; N = 200 is
    neither the batch size (32) nor 2^8, and K = 4."""
    model = models.get_model("mlp", 2, widths=(2,))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 2)).astype(np.float32)
    y = (rng.normal(size=32) > 0).astype(np.int32)
    params = jax.tree.map(np.asarray, train.init_variables(jax.random.key(5), model, x[:1])[0])
    prunable = masks.prunable_tree(params)
    flat, treedef = jax.tree.flatten(prunable)
    pft_logits, moves = (jax.tree.map(lambda w: rng.normal(size=w.shape).astype(np.float32), params)
                         for _ in range(2))
    cfg = sb.SBConfig(variant="mask", estimator="exact", estimator_options=(), num_samples=1,
                      steps=1, batch_size=32, mask_lr=0.1, p_min=0.01, delta=0.05, grid_size=4)
    n_bound, delta = 200, 0.05 / 4
    # All 2^8 masks: leaves (256, *shape), ones on the (never masked) biases.
    bits = np.array(list(itertools.product((0.0, 1.0), repeat=8)), np.float32)
    cols = iter(np.split(bits, 2, axis=1))
    all_masks = jax.tree.unflatten(treedef, [
        next(cols).reshape((256,) + w.shape) if f else np.ones((256,) + w.shape, np.float32)
        for w, f in zip(jax.tree.leaves(params), flat)])

    @jax.jit
    def run(pft_logits, moves):
        prior = sb.make_prior(params, pft_logits, prunable, 1e-3, math.log(0.1))
        post = sb.init_posterior(prior)._replace(
            mask_logits=jax.tree.map(jnp.add, prior.mask_logits, moves))
        state = sb.init_state(jax.random.key(0), prior, cfg).replace(posterior=post)
        new, m = jax.vmap(lambda i: sb.train_step(
            state, x, y, i, prior=prior, model=model, cfg=cfg, prunable=prunable,
            n_bound=n_bound))(jnp.arange(len(sb.OBJECTIVES)))
        # Brute force: Q(m) for every mask, the Bernoulli KL written out, autodiff through both.
        losses = jax.vmap(lambda mk: sb.surrogate_loss(
            train.forward(model, params, {}, mk, x, train=False)[0], y, cfg.p_min))(all_masks)

        def brute(name, s):
            log_q, kl = 0.0, 0.0
            for mk, v, u, f in zip(jax.tree.leaves(all_masks), jax.tree.leaves(s),
                                   jax.tree.leaves(prior.mask_logits), flat):
                if f:
                    lq = mk * jax.nn.log_sigmoid(v)[None] + (1 - mk) * jax.nn.log_sigmoid(-v)[None]
                    log_q = log_q + jnp.sum(lq.reshape(256, -1), 1)
                    q, p = jax.nn.sigmoid(v), jax.nn.sigmoid(u)
                    kl = kl + jnp.sum(q * jnp.log(q / p) + (1 - q) * jnp.log((1 - q) / (1 - p)))
            emp = jnp.sum(jnp.exp(log_q) * losses)
            return pac_bayes.BOUNDS[name](emp, kl, n_bound, delta), (emp, kl)

        oracle = [jax.value_and_grad(functools.partial(brute, name), has_aux=True)(
            post.mask_logits) for name in sb.OBJECTIVES]
        mu = _adam_first_moment(new.opt_state, "mask").mask_logits  # Adam: mu = (1 - b1) g
        return post, new.posterior, m, mu, oracle

    post, new, m, mu, oracle = jax.device_get(run(pft_logits, moves))
    assert m["kl"][0] > 0.1  # Q really moved away from P: the KL path is exercised
    for i, (name, ((obj, (emp, kl)), grad)) in enumerate(zip(sb.OBJECTIVES, oracle)):
        np.testing.assert_allclose(m["surrogate"][i], emp, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(m["kl"][i], kl, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(m["objective"][i], obj, rtol=1e-5, err_msg=name)
        g = jax.tree.map(lambda v, i=i: v[i] / (1 - 0.9), mu)
        chex.assert_trees_all_close(g, grad, rtol=1e-4, atol=1e-7)
        # Adam's first step is -lr sign(g): descent, on the prunable logits only.
        for new_s, old_s, gg, f in zip(jax.tree.leaves(new.mask_logits),
                                       jax.tree.leaves(post.mask_logits), jax.tree.leaves(grad),
                                       flat):
            moved = new_s[i] - old_s
            if f:
                big = np.abs(gg) > 1e-4
                assert big.any()
                np.testing.assert_allclose(moved[big], -0.1 * np.sign(gg[big]), rtol=1e-3)
            else:
                np.testing.assert_array_equal(moved, 0.0)  # biases are never masked
        # The weights stay at w_P in the "mask" variant.
        chex.assert_trees_all_equal(jax.tree.map(lambda v, i=i: v[i], new.mean), post.mean)
        chex.assert_trees_all_equal(jax.tree.map(lambda v, i=i: v[i], new.log_std), post.log_std)


def test_fit_never_draws_rows_beyond_n_bound():
    # 16 NaN padding rows after the 48 real ones, n_bound traced (as under an α-grid vmap): a run
    # that drew any padding row, or used N = 64 in the bound, would differ from the unpadded run.
    pad = 16
    x = jnp.concatenate([_X, jnp.full((pad, 3), jnp.nan)])
    y = jnp.concatenate([_Y, jnp.zeros(pad, jnp.int32)])
    fit = jax.jit(lambda k, o, n: _FIT(k, _PRIOR, x, y, n, o))  # one compile, n traced
    for s in (1, 4):  # against the unpadded vmapped runs (tolerance as in the vmap test)
        state, m = fit(_KEYS[s], jnp.int32(s), jnp.int32(_N))
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves((state.posterior, m)))
        want = jax.tree.map(lambda v, s=s: v[s], _fit_objectives())
        chex.assert_trees_all_close(m, want[1], rtol=1e-4, atol=1e-5)
        chex.assert_trees_all_close(state.posterior, want[0].posterior, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------- KL, config


def test_kl_gauss_and_both_match_closed_forms_away_from_prior():
    rng = np.random.default_rng(2)
    shift, scale, logit_shift = (
        jax.tree.map(lambda w, s=s: (s * rng.normal(size=w.shape)).astype(np.float32), _PARAMS)
        for s in (0.3, 0.5, 1.0))
    post = sb.Posterior(
        jax.tree.map(jnp.add, _PRIOR.mask_logits, logit_shift),  # bias logits move too: no cost
        jax.tree.map(jnp.add, _PRIOR.mean, shift),
        jax.tree.map(lambda s: _PRIOR.log_std + s, scale))
    got = jax.jit(lambda q: [sb.kl_divergence(q, _PRIOR, _PRUNABLE, v) for v in sb.VARIANTS])(post)
    got = dict(zip(sb.VARIANTS, np.asarray(got, np.float64)))

    def f64(tree):
        return [np.asarray(v, np.float64) for v in jax.tree.leaves(tree)]

    lp = float(_PRIOR.log_std)
    # ½ Σ [σ_Q²/σ_P² + (μ_Q - μ_P)²/σ_P² - 1 - log(σ_Q²/σ_P²)] over every weight, biases included.
    gauss = sum(0.5 * np.sum(np.exp(2 * (lq - lp)) + (mq - mp) ** 2 * np.exp(-2 * lp) - 1
                             - 2 * (lq - lp))
                for mq, mp, lq in zip(f64(post.mean), f64(_PRIOR.mean), f64(post.log_std)))
    sig = scipy.special.expit
    rel = scipy.special.rel_entr
    mask = sum(np.sum(rel(sig(a), sig(b)) + rel(sig(-a), sig(-b)))
               for a, b, f in zip(f64(post.mask_logits), f64(_PRIOR.mask_logits),
                                  jax.tree.leaves(_PRUNABLE)) if f)
    assert gauss > 1.0 and mask > 1.0
    np.testing.assert_allclose(got["gauss"], gauss, rtol=1e-5)
    np.testing.assert_allclose(got["mask"], mask, rtol=1e-5)
    np.testing.assert_allclose(got["both"], mask + gauss, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(variant="gaussian"), "unknown variant"),
    (dict(p_min=0.0), "p_min"),
    (dict(p_min=1.0), "p_min"),
    (dict(p_min=-0.5), "p_min"),
    (dict(p_min=float("nan")), "p_min"),
    (dict(steps=0), "steps.*>= 1"),
    (dict(num_samples=0), "num_samples.*>= 1"),
    (dict(batch_size=-1), "batch_size must be >= 1, got -1"),
    (dict(grid_size=0), "grid_size must be >= 1, got 0"),
    (dict(delta=1.5), r"delta must lie in \(0, 1\), got 1.5"),
    (dict(mask_lr=-0.05), "mask_lr must be > 0"),
    (dict(weight_lr=float("nan")), "weight_lr must be > 0"),
    (dict(estimator="nope"), "unknown estimator 'nope'"),
    (dict(estimator_options=(("temperature", 0.5),)), "unknown options"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sb.SBConfig(**kwargs)
