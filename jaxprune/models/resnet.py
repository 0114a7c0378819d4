"""CIFAR ResNets: ResNet18 (kuangliu/pytorch-cifar) and ResNet20/56 (He et al. 2016, Idelbayev).

Block (He et al. 2016, eq. 1): y = relu(BN2(conv2(relu(BN1(conv1(x))))) + s(x)), where the shortcut s
is the identity when shapes agree and otherwise
  * "A": s(x) = zero-pad channels of x[:, ::2, ::2] (no params; ResNet20/56 of the paper), or
  * "B": s(x) = BN(conv1x1_stride(x)) (projection; ResNet18), params `shortcut_conv`, `shortcut_bn`.
Structured masks of a block's conv2 also mask a "B" projection (ConvUnit.shortcut_paths). Identity and
"A" shortcuts have no params, so by default a pruned conv2 channel still carries the shortcut's signal.
With `mask_shortcut=True` every block gets a param `shortcut_gate` (ones, C) and computes
y = relu(BN2(conv2(.)) + 1[g != 0] * s(x)): the gate is listed in conv2's `shortcut_paths`, so
`masks.channel_to_param_mask` zeroes it with the channel and the shortcut is then added only on kept
channels, as in Bartoldson et al.'s code (`out[:, mask] += shortcut(x)[:, mask]`). 1[g != 0] has no
gradient, so g stays 1 under any optimiser without weight decay (and never reaches exactly 0 with it).
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxprune.models.layers import Conv, ConvUnit, batch_norm, check_impl, he_fan_out

SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    features: int
    strides: int = 1
    shortcut: str = "B"
    conv_impl: str = "auto"
    mask_shortcut: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        s = (self.strides, self.strides)
        pad = ((1, 1), (1, 1))
        y = Conv(self.features, (3, 3), s, pad, use_bias=False, kernel_init=he_fan_out,
                 impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(batch_norm(train, "bn1")(y))
        y = Conv(self.features, (3, 3), (1, 1), pad, use_bias=False, kernel_init=he_fan_out,
                 impl=self.conv_impl, name="conv2")(y)
        y = batch_norm(train, "bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            if self.shortcut == "B":
                x = Conv(self.features, (1, 1), s, "VALID", use_bias=False, kernel_init=he_fan_out,
                         impl=self.conv_impl, name="shortcut_conv")(x)
                x = batch_norm(train, "shortcut_bn")(x)
            else:
                x = x[:, :: self.strides, :: self.strides, :]
                extra = self.features - x.shape[-1]
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (extra // 2, extra - extra // 2)))
        if self.mask_shortcut:
            gate = self.param("shortcut_gate", nn.initializers.ones, (self.features,))
            x = x * (gate != 0).astype(x.dtype)[None, None, None, :]
        return nn.relu(y + x)


class ResNet(nn.Module):
    """Stem conv3x3 -> BN -> ReLU, stages of BasicBlocks (first block of stage k > 1 has stride 2),
    global average pool, Dense(num_classes). Channels are round(width * c).

    Params: `stem_conv`, `stem_bn`, `stage{s}_block{b}/{conv1,bn1,conv2,bn2[,shortcut_conv,
    shortcut_bn]}`, `head` (all 1-based).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (3, 3, 3)
    stage_widths: Sequence[int] = (16, 32, 64)
    stem_width: int = 16
    shortcut: str = "A"
    width: float = 1.0
    conv_impl: str = "auto"
    mask_shortcut: bool = False  # gate every shortcut by conv2's channel mask (module docstring)

    @nn.nowrap
    def _w(self, c: int) -> int:
        return max(1, round(self.width * c))

    @nn.nowrap
    def _blocks(self) -> list[tuple[str, int, int, bool]]:
        """(name, features, stride, has_projection) per block, in forward order."""
        out, c_in = [], self._w(self.stem_width)
        for s, (n, c) in enumerate(zip(self.stage_sizes, self.stage_widths, strict=True)):
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                c_out = self._w(c)
                proj = self.shortcut == "B" and (stride != 1 or c_in != c_out)
                out.append((f"stage{s + 1}_block{b + 1}", c_out, stride, proj))
                c_in = c_out
        return out

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        check_impl(self.conv_impl)
        if self.shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={self.shortcut!r}; expected one of {SHORTCUTS}")
        x = Conv(self._w(self.stem_width), (3, 3), (1, 1), ((1, 1), (1, 1)), use_bias=False,
                 kernel_init=he_fan_out, impl=self.conv_impl, name="stem_conv")(x)
        x = nn.relu(batch_norm(train, "stem_bn")(x))
        for name, c, stride, _ in self._blocks():
            x = BasicBlock(c, stride, self.shortcut, self.conv_impl, self.mask_shortcut,
                           name=name)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)

    @nn.nowrap
    def conv_unit_list(self) -> list[ConvUnit]:
        units = [ConvUnit("stem_conv", ("stem_conv", "kernel"), ("stem_bn",))]
        for name, _, _, proj in self._blocks():
            units.append(ConvUnit(f"{name}_conv1", (name, "conv1", "kernel"), (name, "bn1")))
            sc = ((name, "shortcut_conv", "kernel"), (name, "shortcut_bn")) if proj else ()
            sc += ((name, "shortcut_gate"),) if self.mask_shortcut else ()
            units.append(ConvUnit(f"{name}_conv2", (name, "conv2", "kernel"), (name, "bn2"), sc))
        return units


def resnet18(num_classes: int, **kwargs) -> ResNet:
    """kuangliu CIFAR ResNet18: 64-stem, stages 64/128/256/512 x 2 blocks, projection shortcuts."""
    cfg = dict(stage_sizes=(2, 2, 2, 2), stage_widths=(64, 128, 256, 512), stem_width=64,
               shortcut="B")
    return ResNet(num_classes=num_classes, **{**cfg, **kwargs})


def resnet20(num_classes: int, **kwargs) -> ResNet:
    """He et al. CIFAR ResNet20: 3 stages x 3 blocks, 16/32/64, option-A shortcuts by default."""
    return ResNet(num_classes=num_classes, **{"stage_sizes": (3, 3, 3), **kwargs})


def resnet56(num_classes: int, **kwargs) -> ResNet:
    """He et al. CIFAR ResNet56: 3 stages x 9 blocks, 16/32/64, option-A shortcuts by default."""
    return ResNet(num_classes=num_classes, **{"stage_sizes": (9, 9, 9), **kwargs})
