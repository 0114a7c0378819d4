"""Multi-layer perceptrons: f(x) = W_L relu(... relu(W_1 vec(x) + b_1) ...) + b_L."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax

from jaxprune.models.layers import ConvUnit


class MLP(nn.Module):
    """Dense ReLU net on the flattened input (any input shape); LeNet-300-100 is widths=(300, 100).

    Params: `dense1` ... `dense{L-1}` and `head`, each with `kernel` (in, out) and `bias`. No BatchNorm,
    so `init` returns only {"params": ...}.
    """

    num_classes: int
    widths: Sequence[int] = (300, 100)

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        del train  # no BatchNorm or dropout; kept so every model has the same signature
        x = x.reshape(x.shape[0], -1)
        for i, w in enumerate(self.widths):
            x = nn.relu(nn.Dense(w, name=f"dense{i + 1}")(x))
        return nn.Dense(self.num_classes, name="head")(x)

    @nn.nowrap
    def conv_unit_list(self) -> list[ConvUnit]:
        return []
