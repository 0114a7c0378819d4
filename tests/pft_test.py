"""PFT: logits from masks, thresholding, convergence to the known best mask, seeds, quick preset."""

import functools
import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprune import data, masks, pft, train


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2, use_bias=False, name="w")(x)


class _Affine(nn.Module):
    """_Linear with a bias: a non-prunable leaf next to the prunable kernel."""

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2, name="w")(x)


# Asymmetric kernel logits (p = 0.88, 0.27, 0.62, 0.95, 0.12, 0.73; mean 0.596) and bias logits that
# would change the density by a lot if the non-prunable bias were counted.
_KERNEL_LOGITS = np.array([[2.0, -1.0], [0.5, 3.0], [-2.0, 1.0]], np.float32)
_BIAS_LOGITS = np.array([-0.5, 0.8], np.float32)
_ALL_MASKS_6 = np.array(list(itertools.product([0.0, 1.0], repeat=6)), np.float32)  # (64, 6)


def _first_adam_grads(opt_state):
    """g of Adam's first update: mu = (1 - b1) g + b1 * 0 with optax's default b1 = 0.9."""
    return jax.tree.map(lambda mu: mu / 0.1, optax.tree_utils.tree_get(opt_state, "mu"))


def _with_test_logits(state):
    kernel, bias = jnp.asarray(_KERNEL_LOGITS), jnp.asarray(_BIAS_LOGITS)
    return state.replace(logits={"w": {"kernel": kernel, "bias": bias}})


def _affine_problem():
    """_problem's data and kernel plus a bias; the first 16 examples as one batch."""
    ds, params = _problem()
    params = {"w": {**params["w"], "bias": jnp.array([0.2, -0.1])}}
    x, y = jnp.asarray(ds.train.x[:16]), jnp.asarray(ds.train.y[:16])
    return params, masks.prunable_tree(params), x, y


def _problem():
    """Two-class data; frozen weights where some entries help and some (sign-flipped) hurt."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 3)).astype(np.float32)
    y = (x @ np.array([1.5, -1.0, 0.5]) > 0).astype(np.int32)
    w = np.array([[-1.0, 1.0], [1.0, -1.0], [0.6, -0.6]], np.float32)  # row 2 is misaligned
    params = {"w": {"kernel": jnp.asarray(w)}}
    return data.Dataset(data.Split(x, y), data.Split(x, y), 2, "toy"), params


def test_logits_from_mask_keep_p_strictly_inside():
    m = {"a": {"kernel": jnp.array([[1.0, 0.0], [0.0, 1.0]])}}
    s = pft.logits_from_mask(m, 3.0)
    p = masks.logits_to_probs(s)["a"]["kernel"]
    assert float(p.min()) > 0.0 and float(p.max()) < 1.0
    np.testing.assert_allclose(p, [[0.95257413, 0.04742587], [0.04742587, 0.95257413]], rtol=1e-6)
    with pytest.raises(ValueError, match="s0"):
        pft.logits_from_mask(m, 0.0)
    with pytest.raises(ValueError, match="a/kernel"):
        pft.logits_from_mask({"a": {"kernel": jnp.array([2.0])}}, 1.0)


def test_thresholds_exact_sparsity():
    s = {"l1": {"kernel": jnp.linspace(-2, 2, 30).reshape(5, 6)}, "l1b": {"bias": jnp.zeros(6)},
         "l2": {"kernel": jnp.linspace(1, -1, 12).reshape(6, 2)}}
    flags = masks.prunable_tree(s)
    for sp in (0.5, 0.8, 0.95):
        m = jax.jit(lambda t: pft.threshold_topk(t, flags, sp))(s)
        kept, total = masks.count(m, flags)
        assert total == 42 and int(kept) == 42 - int(np.floor(sp * 42 + 0.5))
        np.testing.assert_array_equal(m["l1b"]["bias"], 1.0)
    half = pft.threshold_half(s, flags)
    assert int(masks.count(half, flags)[0]) == 15 + 6  # s > 0: 15 of l1, 6 of l2


def test_pft_finds_the_best_mask_on_a_tiny_problem():
    ds, params = _problem()
    model = _Linear()
    x, y = jnp.asarray(ds.train.x), jnp.asarray(ds.train.y)
    flags = masks.prunable_tree(params)

    def loss(m):
        return train.cross_entropy(model.apply({"params": masks.apply(params, m)}, x), y)

    # Brute force over all 2^6 masks for the best one.
    all_m = np.array(list(itertools.product([0.0, 1.0], repeat=6)), np.float32)
    losses = jax.jit(jax.vmap(lambda v: loss({"w": {"kernel": v.reshape(3, 2)}})))(all_m)
    best = all_m[int(jnp.argmin(losses))].reshape(3, 2)
    np.testing.assert_array_equal(best, [[1, 1], [1, 1], [0, 0]])  # the misaligned row is pruned
    # PFT with exact gradients from a mask that keeps everything; full-batch steps.
    cfg = pft.PFTConfig(estimator="exact", num_samples=1, s0=2.0, learning_rate=0.1, steps=300, batch_size=256)
    state = pft.init(jax.random.key(0), params, {}, masks.ones_like(params), cfg)
    state, m = jax.jit(lambda s, k: pft.train_chunk(s, x, y, k, model=model, cfg=cfg, prunable=flags,
                                                     steps=300))(state, jax.random.key(1))
    np.testing.assert_array_equal(pft.threshold_half(state.logits, flags)["w"]["kernel"], best)
    assert float(m["loss"][-1]) < float(m["loss"][0])
    assert float(m["loss"][-1]) == pytest.approx(float(losses.min()), abs=0.02)


def test_vmapped_pft_seeds_equal_sequential():
    ds, params = _problem()
    model = _Linear()
    flags = masks.prunable_tree(params)
    cfg = pft.PFTConfig(estimator="rloo", num_samples=4, steps=6, batch_size=32, budget_weight=1.0)
    keys = train.seed_keys(0, 2)
    stack = lambda t: jax.tree.map(lambda v: jnp.stack([v, v]), t)
    init = train.map_seeds(lambda k, p: pft.init(k, p, {}, masks.ones_like(p), cfg), (0, 0), "vmap")(keys, stack(params))
    dens = jnp.array([0.5, 0.5])
    out_v, _ = pft.fit(model, cfg, init, ds, keys, flags, dens, strategy="vmap", chunk_steps=3, progress=False)
    out_s, hist = pft.fit(model, cfg, init, ds, keys, flags, dens, strategy="sequential", chunk_steps=3, progress=False)
    chex.assert_trees_all_close(out_v.logits, out_s.logits, rtol=1e-5, atol=1e-6)
    assert len(hist) == 2 and not np.allclose(out_v.logits["w"]["kernel"][0], out_v.logits["w"]["kernel"][1])


def test_stochastic_evaluation_of_a_deterministic_mask_equals_plain_error():
    ds, params = _problem()
    model = _Linear()
    flags = masks.prunable_tree(params)
    mask = {"w": {"kernel": jnp.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])}}
    logits = pft.logits_from_mask(mask, 50.0)  # p = 1 or 0 in float32
    x, y = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    out = jax.jit(lambda s, k: pft.evaluate_stochastic(model, params, {}, s, flags, k, x, y, 4, 100))(
        logits, jax.random.key(0))
    plain = train.error_rate(model.apply({"params": masks.apply(params, mask)}, x), y)
    np.testing.assert_allclose(out["errors"], float(plain))
    assert float(out["ensemble_error"]) == pytest.approx(float(plain))


def test_thresholds_keep_the_largest_logits():
    # Asymmetric logits: top-k and bottom-k (or p > 1/2 and p < 1/2) give different masks; one
    # logit is exactly 0 (p = 1/2, not kept by "p > 1/2"); the non-prunable bias is partly negative.
    s = {"l1": {"kernel": jnp.array([[0.3, -1.2, 2.5], [-0.4, 0.9, -2.0]]),
                "bias": jnp.array([-3.0, -1.0, 2.0])},
         "l2": {"kernel": jnp.array([[1.7], [1.1], [0.0]])}}
    flags = masks.prunable_tree(s)
    assert flags == {"l1": {"kernel": True, "bias": False}, "l2": {"kernel": True}}
    fn = lambda t, scope: jax.jit(lambda u: pft.threshold_topk(u, flags, 0.5, scope))(t)
    # 9 prunable entries, sparsity 0.5: floor(4.5 + 0.5) = 5 pruned. Global keeps the 4 largest
    # (2.5, 1.7, 1.1, 0.9); per layer, l1 prunes 3 of 6 (keeps 2.5, 0.9, 0.3) and l2 2 of 3 (keeps
    # 1.7).
    glob = fn(s, "global")
    np.testing.assert_array_equal(glob["l1"]["kernel"], [[0, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(glob["l2"]["kernel"], [[1], [1], [0]])
    layer = fn(s, "layer")
    np.testing.assert_array_equal(layer["l1"]["kernel"], [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(layer["l2"]["kernel"], [[1], [0], [0]])
    for m in (glob, layer):
        np.testing.assert_array_equal(m["l1"]["bias"], 1.0)
    half = pft.threshold_half(s, flags)
    np.testing.assert_array_equal(half["l1"]["kernel"], [[1, 0, 1], [0, 1, 0]])
    np.testing.assert_array_equal(half["l2"]["kernel"], [[1], [1], [0]])  # s = 0 is p = 1/2: pruned
    np.testing.assert_array_equal(half["l1"]["bias"], 1.0)


def test_budget_term_gradient_is_the_closed_form():
    """lambda relu(mean_i p_i - d)^2 adds 2 lambda relu(mean p - d) p_i (1 - p_i) / N to the logit
    gradient on the N prunable entries, nothing on non-prunable leaves, nothing when mean p <= d.

    Isolated by running the same step (same estimator, key and batch) with lambda = 100 (the main
    experiment's value) and lambda = 0, and reading each step's gradient off Adam's first moment."""
    params, flags, x, y = _affine_problem()
    model, lam = _Affine(), 100.0
    grads = {}
    for w in (0.0, lam):
        cfg = pft.PFTConfig(estimator="exact", num_samples=1, budget_weight=w)
        state = pft.init(jax.random.key(0), params, {}, masks.ones_like(params), cfg)
        state = _with_test_logits(state)
        fn = jax.jit(functools.partial(pft.step, model=model, cfg=cfg, prunable=flags))
        for d in (0.25, 0.75):
            new, metrics = fn(state, x, y, target_density=jnp.float32(d))
            grads[w, d] = _first_adam_grads(new.opt_state[0])
    p = 1.0 / (1.0 + np.exp(-_KERNEL_LOGITS.astype(np.float64)))
    mean_p = p.mean()
    np.testing.assert_allclose(metrics["density"], mean_p, rtol=1e-6)  # kernel only, not the bias
    budget = jax.tree.map(jnp.subtract, grads[lam, 0.25], grads[0.0, 0.25])
    expected = 2 * lam * (mean_p - 0.25) * p * (1 - p) / p.size
    np.testing.assert_allclose(budget["w"]["kernel"], expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(budget["w"]["bias"], 0.0)
    np.testing.assert_array_equal(grads[lam, 0.25]["w"]["bias"], 0.0)
    # mean p = 0.596 <= d = 0.75: the relu is off, lambda changes nothing.
    chex.assert_trees_all_close(grads[lam, 0.75], grads[0.0, 0.75], rtol=0, atol=1e-7)


def test_joint_step_matches_gradients_of_the_enumerated_expected_loss():
    """cfg.joint: one exact-estimator step moves the weights by Adam(weight_lr) on
    grad_w E_m L(m * w) and the logits by Adam(learning_rate) on grad_s E_m L, with E_m computed
    here over all 2^6 masks."""
    params, flags, x, y = _affine_problem()
    model = _Affine()
    lr, weight_lr = 0.05, 0.01  # different, so swapped optimisers show

    def expected_loss(s_k, w):
        p = jax.nn.sigmoid(s_k).reshape(6)
        prob = jnp.prod(jnp.where(_ALL_MASKS_6 > 0, p[None], 1 - p[None]), axis=1)  # (64,)

        def loss(bits):
            m = {"w": {"kernel": bits.reshape(3, 2), "bias": jnp.ones(2)}}
            return train.cross_entropy(model.apply({"params": masks.apply(w, m)}, x), y)

        return jnp.sum(prob * jax.vmap(loss)(jnp.asarray(_ALL_MASKS_6)))

    value, (g_s, g_w) = jax.jit(jax.value_and_grad(expected_loss, argnums=(0, 1)))(
        jnp.asarray(_KERNEL_LOGITS), params)
    cfg = pft.PFTConfig(estimator="exact", num_samples=1, learning_rate=lr, joint=True,
                        weight_lr=weight_lr)
    state = pft.init(jax.random.key(0), params, {}, masks.ones_like(params), cfg)
    state = _with_test_logits(state)
    fn = jax.jit(functools.partial(pft.step, model=model, cfg=cfg, prunable=flags))
    new, metrics = fn(state, x, y)
    assert float(metrics["loss"]) == pytest.approx(float(value), rel=1e-5)
    got_w = _first_adam_grads(new.opt_state[1])
    chex.assert_trees_all_close(got_w, g_w, rtol=1e-4, atol=1e-6)
    got_s = _first_adam_grads(new.opt_state[0])
    np.testing.assert_allclose(got_s["w"]["kernel"], g_s, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got_s["w"]["bias"], 0.0)
    # Adam's first step is -lr g / (|g| + eps); every weight (bias too) moves, each by its own rate.
    adam1 = lambda g, rate: -rate * g / (jnp.abs(g) + 1e-8)
    want_w = jax.tree.map(lambda w, g: w + adam1(g, weight_lr), params, g_w)
    chex.assert_trees_all_close(new.params, want_w, rtol=0, atol=1e-6)
    np.testing.assert_allclose(new.logits["w"]["kernel"], _KERNEL_LOGITS + adam1(g_s, lr),
                               rtol=0, atol=1e-6)
    np.testing.assert_array_equal(new.logits["w"]["bias"], _BIAS_LOGITS)
    assert float(jnp.min(jnp.abs(g_w["w"]["kernel"]))) > 1e-4  # the update above is not vacuous


def test_stochastic_evaluation_with_one_coin_flip_entry():
    """One entry at p = 1/2, the rest at p in {0, 1}: each sampled mask is one of two masks whose
    errors e0 != e1 are known, so the per-mask errors, their mean and the ensemble have exact
    references."""
    ds, params = _problem()
    model, flags = _Linear(), masks.prunable_tree(params)
    x, y = jnp.asarray(ds.test.x), jnp.asarray(ds.test.y)
    base = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]], np.float32)
    s = 50.0 * (2.0 * base - 1.0)
    s[2, 0] = 0.0  # p = 1/2 on the misaligned row's first entry
    outs, errs = [], []
    for bit in (0.0, 1.0):
        m = base.copy()
        m[2, 0] = bit
        out = model.apply({"params": masks.apply(params, {"w": {"kernel": jnp.asarray(m)}})}, x)
        outs.append(out)
        errs.append(float(train.error_rate(out, y)))
    e0, e1 = errs
    assert abs(e1 - e0) > 0.01  # the two masks are distinguishable by their error
    n = 64
    res = jax.jit(lambda t, k: pft.evaluate_stochastic(
        model, params, {}, t, flags, k, x, y, n, 128))(
        {"w": {"kernel": jnp.asarray(s)}}, jax.random.key(3))
    errors = np.asarray(res["errors"])
    is1 = np.isclose(errors, e1, atol=1e-6)
    assert np.all(is1 | np.isclose(errors, e0, atol=1e-6))  # only the two possible masks are drawn
    n1 = int(is1.sum())
    assert 0 < n1 < n  # masks are drawn with different keys
    assert float(res["mean_error"]) == pytest.approx(errors.mean(), abs=1e-6)
    se = 0.5 * abs(e1 - e0) / np.sqrt(n)  # sd of the mean of n fair draws from {e0, e1}
    assert abs(float(res["mean_error"]) - (e0 + e1) / 2) <= 4 * se
    soft = ((n - n1) * jax.nn.softmax(outs[0]) + n1 * jax.nn.softmax(outs[1])) / n
    want_ensemble = float(jnp.mean(jnp.argmax(soft, -1) != y))
    assert float(res["ensemble_error"]) == pytest.approx(want_ensemble, abs=1e-6)


def test_init_rejects_a_mask_unlike_the_params():
    _, params = _problem()
    init = functools.partial(pft.init, jax.random.key(0), params, {},
                             cfg=pft.PFTConfig(estimator="exact"))
    with pytest.raises(ValueError, match="different tree structures.*w/bias"):
        init({"w": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}})  # an extra leaf
    with pytest.raises(ValueError, match="different tree structures.*v/kernel"):
        init({"v": {"kernel": jnp.ones((3, 2))}})  # a renamed leaf
    with pytest.raises(ValueError, match=r"w/kernel.*\(3, 2\).*\(2, 3\)"):
        init({"w": {"kernel": jnp.ones((2, 3))}})  # same structure, transposed shape
