"""Baseline pruners on hand-built trees with exact expected masks."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks, pruners


def _params():
    return {
        "l1": {"kernel": jnp.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]]), "bias": jnp.ones(3)},
        "l2": {"kernel": jnp.array([[0.5], [-0.1], [9.0]]), "bias": jnp.ones(1)},
    }


def test_magnitude_global_and_layerwise(key):
    p = _params()
    flags = masks.prunable_tree(p)
    m = pruners.get_pruner("magnitude")(key, p, 4 / 9, flags)
    # |w| sorted: 0.1, 0.5, 1, 2 pruned.
    np.testing.assert_array_equal(m["l1"]["kernel"], [[0, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(m["l2"]["kernel"], [[0], [0], [1]])
    np.testing.assert_array_equal(m["l1"]["bias"], 1)
    ml = pruners.get_pruner("magnitude_layer")(key, p, 1 / 3, flags)
    np.testing.assert_array_equal(ml["l1"]["kernel"], [[0, 0, 1], [1, 1, 1]])
    np.testing.assert_array_equal(ml["l2"]["kernel"], [[1], [0], [1]])


def test_random_uniform_exact_per_layer_and_key_dependent(key):
    p = {"a": {"kernel": jnp.ones((20, 10))}, "b": {"kernel": jnp.ones((10, 5))}}
    flags = masks.prunable_tree(p)
    m1 = pruners.random_uniform(key, p, 0.8, flags)
    m2 = pruners.random_uniform(jax.random.key(1), p, 0.8, flags)
    assert int(m1["a"]["kernel"].sum()) == 40 and int(m1["b"]["kernel"].sum()) == 10
    assert not np.array_equal(m1["a"]["kernel"], m2["a"]["kernel"])


def test_erk_densities_match_budget_and_formula(key):
    p = {"c": {"kernel": jnp.ones((3, 3, 4, 8))}, "d": {"kernel": jnp.ones((72, 10))}, "e": {"kernel": jnp.ones((10, 2))}}
    flags = masks.prunable_tree(p)
    sizes = {"c/kernel": 288, "d/kernel": 720, "e/kernel": 20}
    # At 50% the small last layer would exceed density 1: it is made dense, the rest re-scaled.
    half = pruners.erk_densities(p, 0.5, flags)
    assert half["e/kernel"] == 1.0
    assert sum(half[k] * sizes[k] for k in sizes) == pytest.approx(0.5 * 1028, rel=1e-9)
    dens = pruners.erk_densities(p, 0.9, flags)
    assert dens["e/kernel"] == pytest.approx(0.5507142857, rel=1e-9)  # (12/20) * eps, below 1
    kept = sum(dens[k] * sizes[k] for k in sizes)
    assert kept == pytest.approx(0.1 * 1028, rel=1e-9)
    ratio = dens["c/kernel"] / dens["d/kernel"]
    assert ratio == pytest.approx((18 / 288) / (82 / 720), rel=1e-9)
    m = pruners.random_erk(key, p, 0.9, flags)
    assert int(m["c"]["kernel"].sum()) == round(dens["c/kernel"] * 288)


@pytest.mark.parametrize("sparsity", [0.5, 0.9])
def test_random_erk_keeps_the_erk_count_in_every_layer(key, sparsity):
    """ERK (Evci et al. 2020): d_l = eps * sum(shape_l) / prod(shape_l), eps set so the prunable layers
    keep (1 - s) * 1028 weights; a layer with eps * raw > 1 is dense and eps re-solved over the rest.
    Each layer keeps exactly size - floor((1 - d_l) * size + 1/2); non-prunable leaves are all ones."""
    p = {
        "c": {"kernel": jnp.ones((3, 3, 4, 8)), "bias": jnp.ones(8)},  # raw 18/288, raw * size 18
        "d": {"kernel": jnp.ones((72, 10)), "bias": jnp.ones(10)},  # raw 82/720, raw * size 82
        "e": {"kernel": jnp.ones((10, 2)), "bias": jnp.ones(2)},  # raw 12/20, raw * size 12
        "f": {"kernel": jnp.ones((4, 4))},  # a kernel excluded from pruning (and from the budget)
    }
    flags = masks.prunable_tree(p)
    flags["f"]["kernel"] = False
    sizes = {"c": 288, "d": 720, "e": 20}
    eps = 0.1 * 1028 / (18 + 82 + 12)  # s = 0.9: every eps * raw < 1 (e: 0.55)
    dens = {"c": eps * 18 / 288, "d": eps * 82 / 720, "e": eps * 12 / 20}
    if sparsity == 0.5:
        assert 0.5 * 1028 / 112 * 12 / 20 > 1  # e would exceed density 1: dense, eps re-solved
        eps = (0.5 * 1028 - 20) / (18 + 82)  # 4.94
        dens = {"c": eps * 18 / 288, "d": eps * 82 / 720, "e": 1.0}
    kept = {k: sizes[k] - math.floor((1 - dens[k]) * sizes[k] + 0.5) for k in sizes}
    assert kept == ({"c": 89, "d": 405, "e": 20} if sparsity == 0.5 else {"c": 17, "d": 75, "e": 11})
    m = jax.jit(lambda k: pruners.random_erk(k, p, sparsity, flags))(key)
    chex.assert_trees_all_equal_shapes(m, p)
    for name, leaf in jax.tree_util.tree_leaves_with_path(m):
        assert leaf.dtype == jnp.float32 and set(np.unique(leaf)) <= {0.0, 1.0}, name
    assert {k: int(m[k]["kernel"].sum()) for k in sizes} == kept
    for k in ("c", "d", "e"):
        np.testing.assert_array_equal(m[k]["bias"], 1.0)
    np.testing.assert_array_equal(m["f"]["kernel"], 1.0)
    # A fresh key, a fresh draw at the same per-layer counts.
    m2 = pruners.random_erk(jax.random.key(7), p, sparsity, flags)
    assert int(m2["c"]["kernel"].sum()) == kept["c"]
    assert not np.array_equal(m["c"]["kernel"], m2["c"]["kernel"])


def test_erk_densities_at_sparsity_zero_are_all_dense():
    # One (7, 28, 22, 8) kernel: eps = n / (raw * n) evaluates to 1 + 1 ulp; marking that layer dense
    # used to leave no free layer and divide by zero.
    p = {"a": {"kernel": jnp.ones((7, 28, 22, 8))}}
    assert pruners.erk_densities(p, 0.0, masks.prunable_tree(p)) == {"a/kernel": 1.0}
    # Several layers, random shapes: every density is 1 (to rounding); random_erk keeps all.
    rng = np.random.default_rng(0)
    for _ in range(50):
        q = {f"l{i}": {"kernel": jnp.zeros(tuple(rng.integers(1, 30, size=rng.integers(2, 5))))}
             for i in range(rng.integers(1, 5))}
        dens = pruners.erk_densities(q, 0.0, masks.prunable_tree(q))
        np.testing.assert_allclose(list(dens.values()), 1.0, rtol=0, atol=1e-12)
    m = pruners.random_erk(jax.random.key(0), p, 0.0, masks.prunable_tree(p))
    assert bool(jnp.all(m["a"]["kernel"] == 1))


def test_snip_scores_equal_grad_times_weight(key):
    p = _params()
    x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])

    def loss_fn(params):
        h = jnp.tanh(x @ params["l1"]["kernel"] + params["l1"]["bias"][None])
        return jnp.sum((h @ params["l2"]["kernel"]) ** 2)

    scores = pruners.snip_scores(p, loss_fn)
    # SNIP's |dL/dm| at m = 1 equals |g * w|.
    dmask = jax.grad(lambda m: loss_fn(masks.apply(p, m)))(masks.ones_like(p))
    np.testing.assert_allclose(scores["l1"]["kernel"], jnp.abs(dmask["l1"]["kernel"]), rtol=1e-6)
    m = pruners.snip(key, p, 0.5, masks.prunable_tree(p), loss_fn=loss_fn)
    assert int(masks.count(m, masks.prunable_tree(p))[0]) == 4
    with pytest.raises(ValueError, match="loss_fn"):
        pruners.snip(key, p, 0.5, masks.prunable_tree(p))


def test_unknown_pruner_and_polynomial_schedule():
    with pytest.raises(ValueError, match="known"):
        pruners.get_pruner("nope")
    s = jax.jit(lambda t: pruners.polynomial_sparsity(t, 0.9, 10, 110))
    assert float(s(0)) == 0.0 and float(s(110)) == pytest.approx(0.9) and float(s(500)) == pytest.approx(0.9)
    assert float(s(60)) == pytest.approx(0.9 - 0.9 * 0.5**3)
