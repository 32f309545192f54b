"""The model registry and the one public way to build a net: ``create_model(name, ...)``.

Each entry is a factory ``(channels, num_classes, image_size, **overrides) -> nn.Module``,
registered as a small named function (``@register_model("ConvNetBN")``), as timm does. Other
packages add models through the entry-point group ``dd_bench.nets``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from dd_bench.errors import ConfigError
from dd_bench.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry(
    "model", ("dd_bench.nets.convnet", "dd_bench.nets.cross_arch", "dd_bench.nets.frepo_convnet"),
    entry_point_group="dd_bench.nets")
register_model = MODELS.register


def size2(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """``image_size`` as an (height, width) pair of ints."""
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def create_model(
    name: str, channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any
) -> nn.Module:
    """Build a fresh, randomly initialised net by registered name (any case, or an alias).

    Draws from the current torch RNG; unknown names raise ``UnknownNameError`` listing the
    available ones, unknown ``overrides`` raise ``ConfigError`` naming the key.
    """
    factory = MODELS.get(name)
    params = inspect.signature(factory).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):  # a plugin with fixed kwargs
        known = {p.name for p in params}
        for key in overrides:
            if key not in known:
                raise ConfigError(f"model '{name}' has no option '{key}'")
    return factory(int(channels), int(num_classes), size2(image_size), **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob (case-insensitive), e.g. ``list_models("resnet*")``."""
    return MODELS.names(pattern)


def build_with_options(
    name: str,
    cls: type[nn.Module],
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    preset: dict[str, Any],
    overrides: dict[str, Any],
    options: tuple[str, ...],
) -> nn.Module:
    """``cls(channels, num_classes, image_size, **preset, **overrides)``; overrides must be in ``options``."""
    for key in overrides:
        if key not in options:
            allowed = ", ".join(options) or "none"
            raise ConfigError(f"model '{name}' has no option '{key}' (options: {allowed})")
    return cls(channels, num_classes, size2(image_size), **{**preset, **overrides})
