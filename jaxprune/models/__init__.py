"""Model registry and conv-layer introspection.

Every model is a `flax.linen.Module` called as `model.apply(variables, x, train=bool)`; models with
BatchNorm (vgg11_bn, resnet*, small_cnn with batch_norm=True) need `mutable=["batch_stats"]` when
`train=True`. `model.init(key, x)` returns {"params": ...} and, only for BatchNorm models,
"batch_stats"; `apply` also accepts {"params": p, "batch_stats": {}} for the others.
Masks are applied to params before `apply`; no model carries mask code. Conv and pool
implementations are selectable (`conv_impl`, `pool_impl`; see `layers.py`) and never change params.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn

from jaxprune import masks

from jaxprune.models.cnn import Conv1DNet, SmallCNN
from jaxprune.models.layers import CONV_IMPLS, POOL_IMPLS, Conv, ConvUnit, max_pool
from jaxprune.models.mlp import MLP
from jaxprune.models.resnet import ResNet, resnet18, resnet20, resnet56
from jaxprune.models.vgg import VGG, VGG11_CFG

PyTree = Any

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "lenet300_100": functools.partial(MLP, widths=(300, 100)),
    "conv1d": Conv1DNet,
    "small_cnn": SmallCNN,
    "vgg11_bn": functools.partial(VGG, cfg=VGG11_CFG),
    "resnet18": resnet18,
    "resnet20": resnet20,
    "resnet56": resnet56,
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """MODELS[name](num_classes=num_classes, **kwargs), e.g. get_model("vgg11_bn", 10, width=0.5)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes, **kwargs)


def conv_units(model: nn.Module, params: PyTree) -> list[ConvUnit]:
    """Every prunable conv of `model` in forward order, checked against `params`.

    `params` is the params tree (or the variables dict holding it under "params"). ResNet projection
    shortcuts are not units of their own: they appear in the `shortcut_paths` of the block's conv2,
    whose output channels they add onto. MLPs have none.
    """
    if not hasattr(model, "conv_unit_list"):
        raise ValueError(f"{type(model).__name__} does not list its conv units")
    if isinstance(params, Mapping) and "params" in params:
        params = params["params"]
    units = model.conv_unit_list()
    for u in units:
        kernel = masks.get_path(params, u.kernel_path)
        if getattr(kernel, "ndim", 0) < 3:
            raise ValueError(f"{'/'.join(u.kernel_path)} is not a conv kernel: {kernel!r}")
        out = kernel.shape[-1]
        for path in ([u.bn_path] if u.bn_path else []) + list(u.shortcut_paths):
            node = masks.get_path(params, path)
            leaves = node.values() if isinstance(node, Mapping) else [node]
            for leaf in leaves:
                if leaf.shape[-1] != out:
                    raise ValueError(
                        f"{'/'.join(path)} has {leaf.shape[-1]} channels, {u.name} has {out}"
                    )
    return units


__all__ = [
    "CONV_IMPLS", "MLP", "MODELS", "POOL_IMPLS", "VGG", "VGG11_CFG", "Conv", "Conv1DNet", "ConvUnit",
    "ResNet", "SmallCNN", "conv_units", "get_model", "max_pool", "resnet18", "resnet20", "resnet56",
]
