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
  * "canonical": `lax.conv_general_dilated` forward with a custom VJP: dx and dW are themselves forward
               convs on operands transposed to NHWC / HWIO (`_canonical_dx`, `_canonical_dw`), the
               form XLA CPU runs with Eigen. Autodiff's own backward convs (permuted dimension
               numbers) are as fast in a lone jit but hit XLA CPU's naive loop emitter inside
               `lax.scan` (jax issue #12868): small_cnn on 32x32x3, batch 128, 32 s per scanned step.
               Values equal "xla" (bitwise, in our tests). Under vmap with both operands batched
               (seeds) it runs one conv per seed (unrolled in groups of 8) instead of a grouped
               conv; forward-mode derivatives (Hessian-vector products) use the "shifts" form.
  * "auto":    on the CPU backend, per layer: "canonical" for stride-1 convs with 8 <= C_in < 64 on
               maps larger than 2x2, where im2col's data movement dominates a small matmul (single
               seed, in a scan: small_cnn 14x14 / 32x32 1.22x, ResNet20 14x14 / 32x32 1.36x / 1.42x
               faster than all-"shifts", docs/speed.md), and "shifts" elsewhere (strided convs, first
               layers, wide layers: even or slower as "canonical"; 2x2 maps: 75x slower). Elsewhere
               "patches" on maps with H*W <= 4 and "xla" otherwise.
Pool implementations (`pool_impl`): "reshape" (reshape + max, about 8x faster gradient on CPU) or
"xla" (`nn.max_pool`). Both are VALID 2x2 / stride-2 pools: odd trailing rows and columns are dropped.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

PyTree = Any
Padding = str | Sequence[tuple[int, int]]

CONV_IMPLS = ("auto", "xla", "patches", "shifts", "canonical")
POOL_IMPLS = ("reshape", "xla")
SMALL_MAP_PIXELS = 4  # "auto" uses patches when prod(spatial) <= this (maps <= 2x2).
CANONICAL_CHANNELS = (8, 64)  # "auto" on CPU: "canonical" for lo <= C_in < hi (docstring)

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


def _explicit_pads(x: jax.Array, window: Sequence[int], strides: Sequence[int],
                   padding: Padding) -> tuple[tuple[int, int], ...]:
    """((lo, hi), ...) per spatial dim: "SAME" / "VALID" resolved as `lax.conv` resolves them."""
    if isinstance(padding, str):
        padding = jax.lax.padtype_to_pads(x.shape[1:-1], window, strides, padding)
    return tuple((int(lo), int(hi)) for lo, hi in padding)


def conv_shifts(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """Shifted-slice im2col: y[n, p, o] = sum_{k, c} x_pad[n, s p + k, c] W[k, c, o] (window-major)."""
    nd = kernel.ndim - 2
    window = kernel.shape[:nd]
    strides = tuple(strides)
    pads = _explicit_pads(x, window, strides, padding)
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


def _vjp_pads(
    in_size: Sequence[int], window: Sequence[int], out: Sequence[int], strides: Sequence[int],
    pads: Sequence[tuple[int, int]],
) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]]:
    """Paddings of the two backward convs of y = x * W (stride s, pads (lo, hi), window K, out n).

    dx: the transposed conv, g dilated by s and correlated with the flipped kernel, padded by
    (K - 1 - lo, in + K - 1 - ((n - 1) s + 1) - (K - 1 - lo)) (as `lax.conv_transpose`).
    dW: the input correlated with g dilated by s, padded by (lo, hi - r) where r = in + lo + hi - K -
    (n - 1) s >= 0 is what the forward conv's last window leaves unread; a negative hi - r becomes a
    crop of the input (`crop`), so no conv sees a negative padding.
    """
    dx_pads, dw_pads, crop = [], [], []
    for n_in, k, n_out, s, (lo, hi) in zip(in_size, window, out, strides, pads):
        before = k - 1 - lo
        dx_pads.append((before, n_in + k - 1 - ((n_out - 1) * s + 1) - before))
        unread = n_in + lo + hi - k - (n_out - 1) * s
        dw_pads.append((lo, max(hi - unread, 0)))
        crop.append(max(unread - hi, 0))
    return dx_pads, dw_pads, crop


def _canonical_dx(g: jax.Array, kernel: jax.Array, in_size: tuple[int, ...], strides: tuple[int, ...],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """dx[n, i, c] = sum_{p, k: s p + k = i + lo} g[n, p, o] W[k, c, o] for y = x * W.

    A stride-1 conv of g, dilated by s, with the flipped kernel and I, O swapped: NHWC / HWIO like the
    forward conv, which XLA CPU runs with its fast (Eigen) conv, inside loops too.
    """
    nd = kernel.ndim - 2
    dx_pads, _, _ = _vjp_pads(in_size, kernel.shape[:nd], g.shape[1:-1], strides, pads)
    flipped = jnp.swapaxes(jnp.flip(kernel, tuple(range(nd))), -1, -2)
    return jax.lax.conv_general_dilated(g, flipped, (1,) * nd, dx_pads, lhs_dilation=strides,
                                        dimension_numbers=_dimension_numbers(nd))


def _canonical_dw(x: jax.Array, g: jax.Array, window: tuple[int, ...], strides: tuple[int, ...],
                  pads: tuple[tuple[int, int], ...]) -> jax.Array:
    """dW[k, c, o] = sum_{n, p} x_pad[n, s p + k, c] g[n, p, o] for y = x * W.

    A stride-1 conv whose batch is c, whose features are n and whose kernel is g (dilated by s), on
    explicitly transposed operands. Autodiff writes this conv with permuted dimension numbers instead,
    which XLA CPU runs on its naive loop emitter inside `lax.scan` (jax issue #12868; 0.8-3.2 s instead
    of 7-21 ms per call at 128 x 32x32 x 16 and 128 x 16x16 x 64 channels, docs/speed.md).
    """
    nd = len(window)
    spatial = tuple(range(1, nd + 1))
    _, dw_pads, crop = _vjp_pads(x.shape[1:-1], window, g.shape[1:-1], strides, pads)
    if any(crop):
        x = x[(slice(None), *(slice(0, n - c) for n, c in zip(x.shape[1:-1], crop)), slice(None))]
    xt = jnp.transpose(x, (nd + 1, *spatial, 0))  # (C, *spatial, N)
    gt = jnp.transpose(g, (*spatial, 0, nd + 1))  # (*out, N, O)
    dw = jax.lax.conv_general_dilated(xt, gt, (1,) * nd, dw_pads, rhs_dilation=strides,
                                      dimension_numbers=_dimension_numbers(nd))  # (C, *window, O)
    return jnp.transpose(dw, (*spatial, 0, nd + 1))


# Under vmap with both operands batched (S seeds), a conv becomes a grouped conv, which XLA CPU runs
# 2-5x slower than S convs (ENV.md). The "canonical" ops then run one conv per seed, unrolled in
# groups of UNROLL_SEEDS so that XLA can overlap them (small CNN and ResNet20, S = 4 and 8: vmap
# 0.89-1.07x of "sequential" unrolled, 0.84-0.94x as a lax.map loop; ResNet20 at S = 32 compiles in
# 18 s fully unrolled against 4.5 s looped). When each element is tiny (one example of per-example
# gradients) they fall back to the "shifts" form, a batched matmul, instead of S 1-row convs.
MAP_MIN_ROWS = 8
UNROLL_SEEDS = 8
_PER_SEED_CONVS = contextvars.ContextVar("jaxprune_per_seed_convs", default=True)


@contextlib.contextmanager
def batched_seed_convs() -> Iterator[None]:
    """Convs called in this block (at trace time) take the batched "shifts" form when vmapped.

    For a seed axis sharded over devices (`sharding.map_seeds_sharded`): one conv per seed slices
    the sharded axis, and XLA's SPMD partitioner then moves data (14x14 CNN, S = 4 on 2 host
    devices: 140 seed-steps/s against 307 with the batched form), while a batched matmul splits
    along the seeds like any other op. Read when a conv is traced: a function that jax traced
    before, outside the block, keeps the form it was traced with (jax caches traces).
    """
    token = _PER_SEED_CONVS.set(False)
    try:
        yield
    finally:
        _PER_SEED_CONVS.reset(token)


def _bilinear(canonical: Callable, shifts: Callable, per_seed: bool) -> Callable:
    """op(a, b), linear in each argument, as a custom_vmap (the rule above) wrapped in a custom_jvp.
    The first argument is always an (N, *spatial, C) activation or cotangent: N rows.

    The custom_jvp gives forward mode, d op = shifts(da, b) + shifts(a, db) (Hessian-vector
    products, also vmapped), without differentiating the custom_vmap: jax 0.10.2 fails to batch a
    custom_vmap's JVP here. The tangent is plain jnp code, so reverse-over-reverse works too.
    """

    @jax.custom_batching.custom_vmap
    def batched(a, b):
        return canonical(a, b)

    @batched.def_vmap
    def _(axis_size, in_batched, a, b):
        if all(in_batched) and per_seed and a.shape[1] >= MAP_MIN_ROWS:  # a: (S, N, ...)
            if axis_size <= UNROLL_SEEDS:
                return jnp.stack([canonical(a[i], b[i]) for i in range(axis_size)]), True
            # Groups of UNROLL_SEEDS in a loop: lax.map vmaps `batched` over each group (this rule).
            return jax.lax.map(lambda ab: batched(*ab), (a, b), batch_size=UNROLL_SEEDS), True
        if all(in_batched):
            return jax.vmap(shifts)(a, b), True
        if not any(in_batched):  # reached from the batched JVP: nothing to batch
            return canonical(a, b), False
        # One operand batched: jax's own rule folds the batch into N, C or O (no grouped conv).
        return jax.vmap(canonical, tuple(0 if v else None for v in in_batched))(a, b), True

    @jax.custom_jvp
    def op(a, b):
        return batched(a, b)

    def op_jvp(primals, tangents):
        a, b = primals
        da, db = tangents
        terms = [shifts(da, b)] if not isinstance(da, SymbolicZero) else []
        if not isinstance(db, SymbolicZero):
            terms.append(shifts(a, db))
        return op(a, b), functools.reduce(jnp.add, terms)

    op.defjvp(op_jvp, symbolic_zeros=True)
    return op


@functools.lru_cache(maxsize=None)
def _canonical_conv(in_size: tuple[int, ...], window: tuple[int, ...], strides: tuple[int, ...],
                    pads: tuple[tuple[int, int], ...], per_seed: bool) -> Callable:
    """conv(x, kernel) of one geometry: `conv_xla` forward, custom VJP of two canonical convs.

    One function per `per_seed` (the vmap rule it gets), not one reading the flag when batched:
    jax caches batched jaxprs, so a rule traced once would serve both.
    """

    def shifts_fwd(x, k):
        return conv_shifts(x, k, strides, pads)

    def shifts_dx(g, k):  # conv_shifts is linear in x: its VJP at x = 0 is the VJP
        zero = jnp.zeros((g.shape[0], *in_size, k.shape[-2]), g.dtype)
        return jax.vjp(lambda x: conv_shifts(x, k, strides, pads), zero)[1](g)[0]

    def shifts_dw(x, g):
        zero = jnp.zeros((*window, x.shape[-1], g.shape[-1]), g.dtype)
        return jax.vjp(lambda k: conv_shifts(x, k, strides, pads), zero)[1](g)[0]

    forward = _bilinear(lambda x, k: conv_xla(x, k, strides, pads), shifts_fwd, per_seed)
    dx = _bilinear(lambda g, k: _canonical_dx(g, k, in_size, strides, pads), shifts_dx, per_seed)
    dw = _bilinear(lambda x, g: _canonical_dw(x, g, window, strides, pads), shifts_dw, per_seed)

    @jax.custom_vjp
    def conv(x, kernel):
        return forward(x, kernel)

    conv.defvjp(lambda x, kernel: (forward(x, kernel), (x, kernel)),
                lambda res, g: (dx(g, res[1]), dw(res[0], g)))
    return conv


def conv_canonical(
    x: jax.Array, kernel: jax.Array, strides: Sequence[int], padding: Padding
) -> jax.Array:
    """y = x * kernel by `lax.conv_general_dilated`, with a custom VJP whose two backward passes are
    forward convs on canonically laid-out operands (`_canonical_dx`, `_canonical_dw`); identical
    values to autodiff of "xla", and fast on XLA CPU inside `lax.scan`, where autodiff's are not."""
    nd = kernel.ndim - 2
    strides = tuple(int(s) for s in strides)
    pads = _explicit_pads(x, kernel.shape[:nd], strides, padding)
    conv = _canonical_conv(tuple(x.shape[1:-1]), tuple(kernel.shape[:nd]), strides, pads,
                           _PER_SEED_CONVS.get())
    return conv(x, kernel)


def auto_impl(x_shape: Sequence[int], strides: Sequence[int]) -> str:
    """What "auto" runs for one conv layer with input shape (N, *spatial, C) (module docstring)."""
    pixels = math.prod(x_shape[1:-1])
    if jax.default_backend() != "cpu":
        return "patches" if pixels <= SMALL_MAP_PIXELS else "xla"
    lo, hi = CANONICAL_CHANNELS
    if all(s == 1 for s in strides) and lo <= x_shape[-1] < hi and pixels > SMALL_MAP_PIXELS:
        return "canonical"
    return "shifts"


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
        impl = auto_impl(x.shape, strides)
    if impl == "patches":
        return conv_patches(x, kernel, strides, padding)
    if impl == "shifts":
        return conv_shifts(x, kernel, strides, padding)
    if impl == "canonical":
        return conv_canonical(x, kernel, strides, padding)
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
    """PyTorch BatchNorm2d defaults: running = 0.9 running + 0.1 batch, eps = 1e-5, gamma=1, beta=0.

    One difference kept from flax: the running variance averages the biased batch variance, where
    PyTorch's averages the unbiased one (a factor n / (n - 1), n = examples x pixels per channel).
    """
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)
