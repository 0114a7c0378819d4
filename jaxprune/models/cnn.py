"""Small conv nets: a 1-D conv net for mnist1d and a small 2-D CNN (ENV.md section 2.1)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxprune.models.layers import Conv, ConvUnit, batch_norm, check_impl, he_fan_out, max_pool


class Conv1DNet(nn.Module):
    """mnist1d conv net (Greydanus 2020 style): 3 x [conv k=5, stride 2, pad 1, ReLU], dense head.

    Input (N, L, C), e.g. (N, 40, 1) for mnist1d; lengths 40 -> 19 -> 9 -> 4. Params `conv1..3`
    (kernel WIO, bias) and `head`. No BatchNorm: `init` returns only {"params": ...}.
    """

    num_classes: int
    channels: Sequence[int] = (32, 32, 32)
    kernel_size: int = 5
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train
        check_impl(self.conv_impl)
        if x.ndim == 2:  # (N, L) signals: add the channel axis
            x = x[..., None]
        for i, c in enumerate(self.channels):
            x = Conv(c, (self.kernel_size,), (2,), ((1, 1),), kernel_init=he_fan_out,
                     impl=self.conv_impl, name=f"conv{i + 1}")(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)

    @nn.nowrap
    def conv_unit_list(self) -> list[ConvUnit]:
        return [ConvUnit(f"conv{i + 1}", (f"conv{i + 1}", "kernel"), None)
                for i in range(len(self.channels))]


class SmallCNN(nn.Module):
    """conv 32-32-pool-64-64-pool, dense 128, dense `num_classes` (3x3 SAME convs, ReLU).

    591,274 params on 32x32x3 inputs without BatchNorm. With `batch_norm=True` each conv is followed
    by BatchNorm (`bn1..4`) before the ReLU (the CPU default of the generalization-stability study) and
    `init` also returns "batch_stats"; without it, only {"params": ...}.
    """

    num_classes: int
    channels: Sequence[int] = (32, 32, 64, 64)
    dense: int = 128
    batch_norm: bool = False
    conv_impl: str = "auto"
    pool_impl: str = "reshape"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_impl(self.conv_impl, self.pool_impl)
        if len(self.channels) % 2:
            raise ValueError(f"channels={self.channels}: need pairs of convs (pool after each pair)")
        for i, c in enumerate(self.channels):
            x = Conv(c, (3, 3), padding="SAME", kernel_init=he_fan_out, impl=self.conv_impl,
                     name=f"conv{i + 1}")(x)
            if self.batch_norm:
                x = batch_norm(train, f"bn{i + 1}")(x)
            x = nn.relu(x)
            if i % 2 == 1:
                if min(x.shape[1:-1]) < 2:
                    raise ValueError(f"input map {x.shape[1:-1]} before pool {i // 2 + 1} is too small "
                                     f"for the {len(self.channels) // 2} 2x2 pools of channels="
                                     f"{tuple(self.channels)}")
                x = max_pool(x, self.pool_impl)
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense, name="dense1")(x))
        return nn.Dense(self.num_classes, name="head")(x)

    @nn.nowrap
    def conv_unit_list(self) -> list[ConvUnit]:
        return [ConvUnit(f"conv{i + 1}", (f"conv{i + 1}", "kernel"),
                         (f"bn{i + 1}",) if self.batch_norm else None)
                for i in range(len(self.channels))]
