"""VGG with BatchNorm, CIFAR variant with a single dense head (generalization-stability paper, 5.1)."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxprune.models.layers import Conv, ConvUnit, batch_norm, check_impl, he_fan_out, max_pool

# torchvision cfg "A"; "M" = 2x2 max-pool. On 32x32 inputs the five pools leave a 1x1x512 map.
VGG11_CFG: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG(nn.Module):
    """[conv3x3 (bias) -> BN -> ReLU | maxpool]* per `cfg`, flatten, one Dense(num_classes).

    Channel counts are round(width * c) (at least 1). Params `conv{i}` / `bn{i}` (i = 1..8 for VGG11,
    1-based as in the paper's "conv5-8") and `head`. 9,231,114 params at width 1 with 10 classes
    (the paper keeps the conv biases, redundant under BN; without them it would be 9,228,362).
    Needs inputs of at least 2^(number of pools) pixels per side (32 for VGG11).
    """

    num_classes: int
    cfg: Sequence[int | str] = VGG11_CFG
    width: float = 1.0
    conv_impl: str = "auto"
    pool_impl: str = "reshape"

    @nn.nowrap
    def channels(self) -> list[int]:
        return [max(1, round(self.width * c)) for c in self.cfg if c != "M"]

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_impl(self.conv_impl, self.pool_impl)
        channels = iter(self.channels())
        i = 0
        for c in self.cfg:
            if c == "M":
                if min(x.shape[1:-1]) < 2:
                    raise ValueError(f"VGG input map {x.shape[1:-1]} too small to pool; use >= 32x32")
                x = max_pool(x, self.pool_impl)
                continue
            i += 1
            x = Conv(next(channels), (3, 3), padding=((1, 1), (1, 1)), kernel_init=he_fan_out,
                     impl=self.conv_impl, name=f"conv{i}")(x)
            x = nn.relu(batch_norm(train, f"bn{i}")(x))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.num_classes, name="head")(x)

    @nn.nowrap
    def conv_unit_list(self) -> list[ConvUnit]:
        n = len(self.channels())
        return [ConvUnit(f"conv{i}", (f"conv{i}", "kernel"), (f"bn{i}",)) for i in range(1, n + 1)]
