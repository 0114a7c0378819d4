"""Self-bounded learning: split hygiene (no prior point in a certificate), objective gradients,
vmap-over-seeds equivalence, and the quick experiment end to end."""

import functools
import itertools
import json
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
