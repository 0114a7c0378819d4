"""Masks on hand-built trees with exact expected answers."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune import masks


def _params():
    # Insertion order is forward order: dense_in -> hidden -> dense_out.
    return {
        "dense_in": {"kernel": jnp.array([[3.0, -1.0], [0.5, -4.0]]), "bias": jnp.array([1.0, 2.0])},
        "hidden": {"kernel": jnp.array([[0.1, 0.2], [-0.3, 5.0]]), "bias": jnp.zeros(2)},
        "bn": {"scale": jnp.ones(2), "bias": jnp.zeros(2)},
        "dense_out": {"kernel": jnp.array([[2.0], [-0.2]]), "bias": jnp.zeros(1)},
    }


def test_prunable_tree_default_and_exclude_first_last():
    p = _params()
    flags = masks.prunable_tree(p)
    assert flags["dense_in"]["kernel"] and flags["hidden"]["kernel"] and flags["dense_out"]["kernel"]
    assert not flags["dense_in"]["bias"] and not flags["bn"]["scale"] and not flags["bn"]["bias"]
    inner = masks.prunable_tree(p, exclude_first_last=True)
    assert not inner["dense_in"]["kernel"] and inner["hidden"]["kernel"] and not inner["dense_out"]["kernel"]
    # An explicit forward order overrides insertion order.
    order = [("dense_out", "kernel"), ("dense_in", "kernel"), ("hidden", "kernel")]
    flipped = masks.prunable_tree(p, exclude_first_last=True, layer_order=order)
    assert flipped["dense_in"]["kernel"] and not flipped["hidden"]["kernel"]


def test_topk_global_and_layer_exact():
    p = _params()
    flags = masks.prunable_tree(p)
    scores = jax.tree.map(jnp.abs, p)
    # 10 prunable weights; 50% -> prune the 5 smallest |w|: 0.1, 0.2, 0.3, 0.5, -0.2
    m = jax.jit(lambda s: masks.topk(s, 0.5, flags, "global"))(scores)
    np.testing.assert_array_equal(m["dense_in"]["kernel"], [[1, 1], [0, 1]])
    np.testing.assert_array_equal(m["hidden"]["kernel"], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(m["dense_out"]["kernel"], [[1], [0]])
    np.testing.assert_array_equal(m["bn"]["scale"], [1, 1])
    assert float(masks.sparsity(m, flags)) == pytest.approx(0.5)
    ml = masks.topk(scores, 0.5, flags, "layer")
    np.testing.assert_array_equal(ml["dense_in"]["kernel"], [[1, 0], [0, 1]])
    np.testing.assert_array_equal(ml["hidden"]["kernel"], [[0, 0], [1, 1]])
    np.testing.assert_array_equal(ml["dense_out"]["kernel"], [[1], [0]])
    for v in masks.layer_sparsity(ml, flags).values():
        assert float(v) == pytest.approx(0.5)


def test_topk_exact_count_with_ties():
    scores = {"a": {"kernel": jnp.ones((7, 9))}}
    flags = masks.prunable_tree(scores)
    for s in (0.0, 0.3, 0.9, 0.98):
        m = masks.topk(scores, s, flags)
        kept, total = masks.count(m, flags)
        assert int(kept) == total - int(np.floor(s * total + 0.5))


def test_sample_threshold_and_logits_roundtrip(key):
    probs = {"a": {"kernel": jnp.full((200, 100), 0.3)}, "b": {"bias": jnp.full((5,), 1.0)}}
    m = jax.jit(masks.sample)(key, probs)
    chex.assert_trees_all_equal_shapes(m, probs)
    assert abs(float(m["a"]["kernel"].mean()) - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 20000)
    np.testing.assert_array_equal(m["b"]["bias"], 1.0)
    # Different leaves get different keys: two leaves with the same p give different draws.
    two = masks.sample(key, {"x": jnp.full((64,), 0.5), "y": jnp.full((64,), 0.5)})
    assert not np.array_equal(two["x"], two["y"])
    logits = masks.probs_to_logits({"p": jnp.array([0.1, 0.5, 0.9])})
    chex.assert_trees_all_close(masks.logits_to_probs(logits), {"p": jnp.array([0.1, 0.5, 0.9])}, atol=1e-6)
    th = masks.threshold({"k": {"kernel": jnp.array([[0.2, 0.51], [0.5, 0.9]])}},
                         {"k": {"kernel": True}})
    np.testing.assert_array_equal(th["k"]["kernel"], [[0, 1], [0, 1]])


def test_apply_zeroes_pruned():
    p = _params()
    m = masks.topk(jax.tree.map(jnp.abs, p), 0.5, masks.prunable_tree(p))
    out = masks.apply(p, m)
    assert float(out["hidden"]["kernel"][0, 0]) == 0.0
    assert float(out["hidden"]["kernel"][1, 1]) == 5.0


def test_bad_inputs_name_the_leaf():
    p = _params()
    flags = masks.prunable_tree(p)
    bad = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), p)
    bad["hidden"]["kernel"] = bad["hidden"]["kernel"].at[0, 0].set(1.5)
    with pytest.raises(ValueError, match="hidden/kernel"):
        masks.sample(jax.random.key(0), bad)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.topk(p, 1.0, flags)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        masks.topk(p, -0.1, flags)
    wrong_shape = jax.tree.map(jnp.ones_like, p)
    wrong_shape["dense_out"]["kernel"] = jnp.ones((3, 1))
    with pytest.raises(ValueError, match="dense_out/kernel"):
        masks.apply(p, wrong_shape)
    missing = {k: v for k, v in p.items() if k != "bn"}
    with pytest.raises(ValueError, match="bn/"):
        masks.apply(p, jax.tree.map(jnp.ones_like, missing))
    with pytest.raises(ValueError, match="scope"):
        masks.topk(p, 0.5, flags, scope="nope")


_PROB_CONSUMERS = {
    "check_probs": masks.check_probs,
    "sample": lambda p: masks.sample(jax.random.key(0), p),
    "threshold": lambda p: masks.threshold(p, masks.prunable_tree(p)),
    "probs_to_logits": masks.probs_to_logits,
}


@pytest.mark.parametrize("consumer", sorted(_PROB_CONSUMERS))
@pytest.mark.parametrize(
    "bad, message",
    [(float("nan"), r"'bn/scale'.*with NaN"), (-0.25, r"'bn/scale'.*\[-0\.25, 0\.5\]"),
     (1.5, r"'bn/scale'.*\[0\.5, 1\.5\]")],
    ids=["nan", "negative", "above_one"],
)
def test_bad_probabilities_raise_naming_the_leaf(consumer, bad, message):
    """One bad entry among valid ones in a non-prunable leaf: NaN (which fails no < or > test, so
    a range check alone lets it through), below 0 or above 1. Edge values 0 and 1 are fine."""
    probs = jax.tree.map(lambda x: jnp.full(x.shape, 0.5), _params())
    probs["hidden"]["kernel"] = jnp.array([[0.0, 1.0], [0.5, 0.5]])
    _PROB_CONSUMERS[consumer](probs)  # valid: no error
    probs["bn"]["scale"] = probs["bn"]["scale"].at[1].set(bad)
    with pytest.raises(ValueError, match=message):
        _PROB_CONSUMERS[consumer](probs)


def test_channel_mask_broadcasts_to_kernel_bn_and_shortcut():
    from jaxprune.models import ConvUnit

    params = {
        "conv1": {"kernel": jnp.ones((3, 3, 2, 4))},
        "bn1": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "proj": {"kernel": jnp.ones((1, 1, 2, 4))},
        "proj_bn": {"scale": jnp.ones(4), "bias": jnp.ones(4)},
        "head": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)},
    }
    unit = ConvUnit("conv1", ("conv1", "kernel"), ("bn1",), (("proj", "kernel"), ("proj_bn",)))
    c = jnp.array([1.0, 0.0, 1.0, 0.0])
    m = masks.channel_to_param_mask(params, {"conv1": c}, [unit])
    np.testing.assert_array_equal(m["conv1"]["kernel"][1, 2, 0], c)
    np.testing.assert_array_equal(m["bn1"]["scale"], c)
    np.testing.assert_array_equal(m["bn1"]["bias"], c)
    np.testing.assert_array_equal(m["proj"]["kernel"][0, 0, 1], c)
    np.testing.assert_array_equal(m["proj_bn"]["bias"], c)
    np.testing.assert_array_equal(m["head"]["kernel"], 1.0)
    with pytest.raises(ValueError, match="unknown conv units"):
        masks.channel_to_param_mask(params, {"conv9": c}, [unit])
    with pytest.raises(ValueError, match="output channels"):
        masks.channel_to_param_mask(params, {"conv1": jnp.ones(3)}, [unit])
