"""The vmap-friendly conv ("shifts") equals nn.Conv, alone and vmapped over seeds (tiny shapes)."""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxprune.models import layers

CASES = [  # spatial input, kernel, strides, padding, C_in, C_out
    ((2, 2), (3, 3), (1, 1), "SAME", 3, 4),
    ((5, 6), (3, 3), (2, 2), ((1, 1), (1, 1)), 3, 5),
    ((5, 5), (3, 3), (2, 2), "SAME", 2, 3),  # SAME with stride 2: lax puts the odd pad after
    ((6, 6), (1, 1), (2, 2), "VALID", 4, 6),
    ((40,), (5,), (2,), ((1, 1),), 1, 7),
]


@pytest.mark.parametrize("spatial,ksize,strides,padding,cin,cout", CASES)
def test_shifts_conv_matches_flax_conv_and_vmaps(spatial, ksize, strides, padding, cin, cout) -> None:
    s = 3  # seeds
    x_key, k_key = jax.random.split(jax.random.key(0))
    x_S = jax.random.normal(x_key, (s, 2, *spatial, cin))
    ref = nn.Conv(cout, ksize, strides, padding, use_bias=False)
    ours = layers.Conv(cout, ksize, strides, padding, use_bias=False, impl="shifts")
    abstract = jax.eval_shape(ref.init, jax.random.key(1), x_S[0])
    chex.assert_trees_all_equal_shapes(abstract, jax.eval_shape(ours.init, jax.random.key(1), x_S[0]))
    kernel_S = jax.random.normal(k_key, (s, *ksize, cin, cout))

    def loss(module: nn.Module, kernel: jax.Array, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        y = module.apply({"params": {"kernel": kernel}}, x)
        return jnp.sum(jnp.sin(y)), y

    def grads(module: nn.Module):
        return jax.value_and_grad(functools.partial(loss, module), (0, 1), has_aux=True)

    (_, y_ref), g_ref = jax.jit(jax.vmap(grads(ref)))(kernel_S, x_S)  # XLA's grouped conv
    (_, y), g = jax.jit(jax.vmap(grads(ours)))(kernel_S, x_S)  # batched matmul
    chex.assert_trees_all_close(y, y_ref, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(g, g_ref, rtol=1e-4, atol=1e-5)
    (_, y0), g0 = jax.jit(grads(ours))(kernel_S[0], x_S[0])  # no vmap: seed 0 alone
    np.testing.assert_allclose(y0, y[0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(g0, jax.tree.map(lambda v: v[0], g), rtol=1e-5, atol=1e-6)


def test_shifts_is_a_conv_impl() -> None:
    assert "shifts" in layers.CONV_IMPLS
    with pytest.raises(ValueError, match="conv_impl"):
        layers.check_impl("shift")
