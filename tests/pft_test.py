"""PFT: logits from masks, thresholding, convergence to the known best mask, seeds, quick preset."""

import itertools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import data, masks, pft, train


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(2, use_bias=False, name="w")(x)


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
