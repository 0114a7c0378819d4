"""Shared layers with selectable implementations, fast on XLA CPU (ENV.md section 2.3).

The one place where *how* a convolution or a 2x2 max-pool is computed is chosen. Every implementation
of `Conv` creates exactly the parameters of `flax.linen.Conv` (`kernel` in HWIO / WIO layout, `bias`),
so masks, checkpoints and initial values do not depend on the implementation.

Conv implementations (`impl`):
  * "xla":     `lax.conv_general_dilated` (what `nn.Conv` runs).
  * "patches": im2col, y = P(x) W with P(x) = `conv_general_dilated_patches(x)` of shape (N, *out, C k)
               (channel-major: index c * prod(k) + spatial offset) and W the kernel moved to (C, *k, O)
               and flattened. About 38x faster than "xla" for a 3x3 conv on a 2x2x512 map on CPU; a
               matmul also stays a (batched) matmul under vmap over seeds.
  * "shifts":  im2col by padding + strided slices, y = [x_{k_1} | ... | x_{k_K}] W with x_k the input
               shifted by window offset k (window-major: index k * C + c, so W is the HWIO kernel
               flattened as is). Pure data movement plus one matmul; its gradient is pads and adds.
               Under vmap over seeds it becomes a batched matmul over the seed axis (no grouped conv).
  * "auto":    on the CPU backend "shifts" everywhere: XLA CPU's native conv is slow on 2x2 maps,
               under vmap (grouped convs) and, worst, inside `lax.scan` (small_cnn on 32x32x3, batch
               128: 1.3 s per jitted step, 32 s per step inside `train_epoch`'s scan; "shifts" 0.6 s
               either way; README "Speed and scale"). Elsewhere "patches" on maps with H*W <= 4 and
               "xla" otherwise.
Pool implementations (`pool_impl`): "reshape" (reshape + max, about 8x faster gradient on CPU) or
"xla" (`nn.max_pool`). Both are VALID 2x2 / stride-2 pools: odd trailing rows and columns are dropped.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

PyTree = Any
Padding = str | Sequence[tuple[int, int]]

CONV_IMPLS = ("auto", "xla", "patches", "shifts")
POOL_IMPLS = ("reshape", "xla")
SMALL_MAP_PIXELS = 4  # "auto" uses patches when prod(spatial) <= this (maps <= 2x2).

# He et al. (2015) init, kaiming_normal_(mode="fan_out", nonlinearity="relu") as in the PyTorch code of
# the generalization-stability paper (VGG11, ResNet20/56): Var[w] = 2 / (O * kh * kw), untruncated.
he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class ConvUnit(NamedTuple):
    """One prunable conv layer, in forward order (see `jaxprune.models.conv_units`)."""

    name: str  # "_".join(kernel_path[:-1]), e.g. "conv3" or "stage2_block1_conv2"
    kernel_path: tuple[str, ...]  # into params, to the kernel (HWIO, or WIO for 1-D convs)
    bn_path: tuple[str, ...] | None  # the BatchNorm module that follows (holds scale, bias), or None
    # Params whose output channels are added onto this conv's output channels (projection-shortcut
    # kernel and its BatchNorm) in a ResNet block's last conv; empty otherwise.
    shortcut_paths: tuple[tuple[str, ...], ...] = ()


def check_impl(conv_impl: str, pool_impl: str | None = None) -> None:
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={conv_impl!r}; expected one of {CONV_IMPLS}")
    if pool_impl is not None and pool_impl not in POOL_IMPLS:
        raise ValueError(f"pool_impl={pool_impl!r}; expected one of {POOL_IMPLS}")


def _dimension_numbers(nd: int) -> tuple[str, str, str]:
    if not 1 <= nd <= 3:
        raise ValueError(f"convolutions with {nd} spatial dims are not supported (1 to 3)")
    spatial = "DHW"[-nd:]
    return ("N" + spatial + "C", spatial + "IO", "N" + spatial + "C")


def conv_xla(x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding) -> jax.Array:
    """Reference: y = x * kernel via `lax.conv_general_dilated` (what `nn.Conv` computes)."""
    nd = kernel.ndim - 2
    return jax.lax.conv_general_dilated(
        x, kernel, tuple(strides), padding, dimension_numbers=_dimension_numbers(nd)
    )


def conv_patches(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """im2col: y[n, p, o] = sum_{c, k} P(x)[n, p, c * K + k] W[c, k, o], K = prod(kernel window)."""
    nd = kernel.ndim - 2
    patches = jax.lax.conv_general_dilated_patches(
        x, kernel.shape[:nd], tuple(strides), padding, dimension_numbers=_dimension_numbers(nd)
    )
    # Patches are channel-major, so bring I in front of the window axes before flattening.
    w = jnp.moveaxis(kernel, -2, 0).reshape(-1, kernel.shape[-1])
    return jax.lax.dot_general(patches, w, (((patches.ndim - 1,), (0,)), ((), ())))


def conv_shifts(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Shifted-slice im2col: y[n, p, o] = sum_{k, c} x_pad[n, s p + k, c] W[k, c, o] (window-major)."""
    nd = kernel.ndim - 2
    window = kernel.shape[:nd]
    strides = tuple(strides)
    pads = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding) if isinstance(
        padding, str) else padding
    xp = jnp.pad(x, ((0, 0), *pads, (0, 0)))
    out = [(xp.shape[1 + d] - window[d]) // strides[d] + 1 for d in range(nd)]
    cols = []
    for offset in itertools.product(*(range(k) for k in window)):
        start = (0, *offset, 0)
        limit = (xp.shape[0], *(o + (n - 1) * s + 1 for o, n, s in zip(offset, out, strides)),
                 xp.shape[-1])
        cols.append(jax.lax.slice(xp, start, limit, (1, *strides, 1)))
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
    w = kernel.reshape(-1, kernel.shape[-1])
    return jax.lax.dot_general(patches, w, (((patches.ndim - 1,), (0,)), ((), ())))


def conv(
    x: jax.Array,
    kernel: jax.Array,
    strides: Sequence[int],
    padding: Padding,
    impl: str = "auto",
) -> jax.Array:
    """Dispatches on `impl` (module docstring); the single switch point for conv implementations."""
    check_impl(impl)
    if impl == "auto":
        if jax.default_backend() == "cpu":
            impl = "shifts"
        else:
            impl = "patches" if math.prod(x.shape[1:-1]) <= SMALL_MAP_PIXELS else "xla"
    if impl == "patches":
        return conv_patches(x, kernel, strides, padding)
    if impl == "shifts":
        return conv_shifts(x, kernel, strides, padding)
    return conv_xla(x, kernel, strides, padding)


def _canonical_padding(padding: Padding | int, nd: int) -> Padding:
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding={padding!r}; expected 'SAME', 'VALID', an int or pairs")
        return padding.upper()
    if isinstance(padding, int):
        return tuple((padding, padding) for _ in range(nd))
    pairs = tuple((int(lo), int(hi)) for lo, hi in padding)
    if len(pairs) != nd:
        raise ValueError(f"padding {padding!r} has {len(pairs)} pairs for {nd} spatial dims")
    return pairs


class Conv(nn.Module):
    """Drop-in for `nn.Conv` (same param names, shapes, init) with a selectable implementation."""

    features: int
    kernel_size: Sequence[int]
    strides: Sequence[int] | None = None
    padding: Padding | int = "SAME"
    use_bias: bool = True
    kernel_init: Any = nn.initializers.lecun_normal()  # nn.Conv's default
    bias_init: Any = nn.initializers.zeros_init()
    impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        nd = len(self.kernel_size)
        if x.ndim != nd + 2:
            raise ValueError(
                f"{self.name}: input of shape {x.shape} for a {nd}-D conv; expected (N, *spatial, C)"
            )
        strides = tuple(self.strides) if self.strides is not None else (1,) * nd
        shape = (*self.kernel_size, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, jnp.float32)
        y = conv(x, kernel, strides, _canonical_padding(self.padding, nd), self.impl)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), jnp.float32)
            y = y + bias.reshape((1,) * (y.ndim - 1) + (-1,))
        return y


def max_pool(x: jax.Array, impl: str = "reshape") -> jax.Array:
    """2x2 max-pool, stride 2, VALID: y[n, i, j, c] = max_{a, b in {0, 1}} x[n, 2i + a, 2j + b, c]."""
    check_impl("auto", impl)
    nd = x.ndim - 2
    if impl == "xla":
        return nn.max_pool(x, (2,) * nd, (2,) * nd, padding="VALID")
    sizes = [s // 2 for s in x.shape[1:-1]]
    x = x[(slice(None), *(slice(0, 2 * s) for s in sizes), slice(None))]
    split = [x.shape[0]]
    for s in sizes:
        split += [s, 2]
    x = x.reshape(*split, x.shape[-1])
    return x.max(axis=tuple(2 + 2 * i for i in range(nd)))


def batch_norm(train: bool, name: str) -> nn.BatchNorm:
    """PyTorch BatchNorm2d defaults: running = 0.9 running + 0.1 batch, eps = 1e-5, gamma=1, beta=0."""
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
