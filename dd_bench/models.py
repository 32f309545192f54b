"""Networks used to distil and to evaluate, with the dataset-distillation definitions.

These are the DC/MTT definitions (PROTOCOL.md §1.1, §1.2), not the torchvision ones: the
ConvNet has no hidden FC and no global pooling, VGG11 and ResNet18 use instance norm by
default, ResNet18 has a 3x3 stride-1 stem and no max-pool, AlexNet has no norm.

Each registry entry is a factory ``(channels, num_classes, image_size, **overrides) -> nn.Module``;
``create_model`` is the public way in. Two departures from the original code, both deliberate:

- Nets never reseed the global RNG (the original ``get_network`` reseeds from the clock):
  the harness seeds once per cell and each net draws from the current RNG state.
- Feature sizes are computed from ``image_size`` instead of hard-coded for 32 px, so sizes
  the original does not support (e.g. ResNet18 at 64 px) build instead of crashing. For
  28x28 and 32x32 every net is the original, parameter for parameter.

The "28 -> 32" treatment (first conv pads by 3, AlexNet's by 4, LeNet's by 2) is keyed on
1-channel 28x28 input, the MNIST/FashionMNIST case; the original keys it on channel == 1
alone, which only differs for 1-channel inputs of other sizes.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn

from dd_bench.errors import ConfigError
from dd_bench.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model", ("dd_bench.models",))
register_model = MODELS.register

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLS = ("avgpooling", "maxpooling", "none")


# -- public API --------------------------------------------------------------------------
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
    return factory(int(channels), int(num_classes), _size2(image_size), **overrides)


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a glob (case-insensitive), e.g. ``list_models("resnet*")``."""
    return MODELS.names(pattern)


def has_batchnorm(model: nn.Module) -> bool:
    """True if any layer keeps batch statistics; DC then primes them on real data and freezes
    them before matching (PROTOCOL §1.2, "BatchNorm during DC matching")."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# -- building blocks ---------------------------------------------------------------------
def _size2(image_size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    height, width = image_size
    return (int(height), int(width))


def _is_28_grey(channels: int, image_size: tuple[int, int]) -> bool:
    """MNIST-like input, which the DD nets pad up to behave like 32x32 (PROTOCOL §1.1)."""
    return channels == 1 and tuple(image_size) == (28, 28)


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"model option {option}='{value}' is not one of: {', '.join(allowed)}")
    return value


def _norm2d(norm: str, channels: int, spatial: tuple[int, int]) -> nn.Module:
    """The DC norm layers; "instancenorm" is one GroupNorm group per channel, with affine."""
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        return nn.LayerNorm([channels, *spatial], elementwise_affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, channels, affine=True)
    return nn.Identity()


def _activation(act: str) -> nn.Module:
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if act == "swish":
        return nn.SiLU()  # x * sigmoid(x), DC's Swish
    return nn.ReLU()  # not in-place: keeps double backward (DC) and torch.func (batched eval) safe


def _check_spatial(name: str, spatial: tuple[int, int], image_size: tuple[int, int]) -> None:
    if min(spatial) < 1:
        raise ConfigError(f"{name} cannot take {image_size[0]}x{image_size[1]} input: the feature map shrinks to nothing")


class _Classifier(nn.Module):
    """Shared forward: ``embed`` gives the features the final Linear ``classifier`` sees."""

    feature_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# -- ConvNet (PROTOCOL §1.1) -------------------------------------------------------------
class ConvNet(_Classifier):
    """DC's ConvNet: ``depth`` x [Conv3x3(width) -> norm -> act -> pool], flatten, one Linear.

    Defaults (width 128, depth 3, instancenorm, relu, avgpooling) give 128x4x4 = 2048 features
    for both 32x32x3 and 28x28x1 input (the first conv pads by 3 on 28x28 grey, so 28 -> 32),
    and 320,010 parameters for CIFAR-10 (504,420 for 100 classes). Use depth 4 at 64 px and
    depth 5 at 128 px to end at 4x4 again.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int] = (32, 32),
        width: int = 128,
        depth: int = 3,
        norm: str = "instancenorm",
        act: str = "relu",
        pool: str = "avgpooling",
    ):
        super().__init__()
        image_size = _size2(image_size)
        if int(width) < 1 or int(depth) < 1:
            raise ConfigError(f"ConvNet width and depth must be positive, got width={width}, depth={depth}")
        self.width, self.depth = int(width), int(depth)
        self.norm = _choice("norm", norm, NORMS)
        self.act = _choice("act", act, ACTS)
        self.pool = _choice("pool", pool, POOLS)
        first_padding = 3 if _is_28_grey(channels, image_size) else 1
        layers: list[nn.Module] = []
        in_channels, (height, width_px) = channels, image_size
        for d in range(self.depth):
            padding = first_padding if d == 0 else 1
            height, width_px = height + 2 * padding - 2, width_px + 2 * padding - 2
            layers.append(nn.Conv2d(in_channels, self.width, kernel_size=3, padding=padding))
            if self.norm != "none":  # no Identity placeholder: keeps the original state-dict layout
                layers.append(_norm2d(self.norm, self.width, (height, width_px)))
            layers.append(_activation(self.act))
            if self.pool != "none":
                layers.append(nn.MaxPool2d(2, 2) if self.pool == "maxpooling" else nn.AvgPool2d(2, 2))
                height, width_px = height // 2, width_px // 2
            in_channels = self.width
        _check_spatial(f"ConvNet depth {self.depth}", (height, width_px), image_size)
        self.features = nn.Sequential(*layers)
        self.feature_shape = (self.width, height, width_px)
        self.feature_dim = self.width * height * width_px
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened last feature map (DM's embedding, PROTOCOL §5)."""
        # Under torch.compile the flag flips of the fast path would split the graph, and
        # inductor picks its own kernels anyway.
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return _cpu_features(self.features, x).flatten(1)
        return self.features(x).flatten(1)


# -- CPU fast path --------------------------------------------------------------------------
# Two PyTorch CPU kernels are several times slower than equivalent formulations for these
# small nets (measured on the 2-core dev machine, side by side): oneDNN's convolution with 1-4
# input channels (PyTorch's own im2col + GEMM is ~8x faster for grey images, ~6x for RGB) and
# F.avg_pool2d (four strided adds are ~5x faster, forward and backward). Both replacements give
# the same values up to float rounding (~1e-6) and support double backward (DC needs it).
# NNPACK (Winograd) is never used: faster, but ~50x larger rounding error.
def _cpu_features(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    x = standard_layout(x)
    for module in features:
        if isinstance(module, nn.Conv2d) and module.in_channels <= 4:
            with _native_cpu_convolution():
                x = module(x)
        elif isinstance(module, nn.AvgPool2d) and _is_plain_2x2(module):
            x = avg_pool_2x2(x)
        else:
            x = module(x)
    return x


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major (NCHW) strides. DSA's crop can return channels-last strides, and for
    one-channel images ``contiguous()`` keeps them (they already count as contiguous), so every
    conv after it would run channels-last, which is slower on the CPU."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if x.stride() == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _is_plain_2x2(pool: nn.AvgPool2d) -> bool:
    def pair(v: Any) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and not pool.ceil_mode)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` (odd edges dropped) as strided adds: same values up to rounding."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :height, :width]
    rows = x[..., 0::2, :] + x[..., 1::2, :]
    return (rows[..., 0::2] + rows[..., 1::2]) * 0.25


@contextlib.contextmanager
def _native_cpu_convolution() -> Iterator[None]:
    """Route CPU convolutions to PyTorch's im2col + GEMM (not oneDNN, not NNPACK) in this block."""
    mkldnn_was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn_was


# The named ConvNet variants of DC's get_network (and MTT's D5 for 128 px): name, aliases, preset.
_CONVNET_VARIANTS: list[tuple[str, tuple[str, ...], dict[str, Any]]] = [
    ("ConvNet", ("convnet3", "ConvNetD3", "ConvNetIN"), {}),
    ("ConvNetBN", (), {"norm": "batchnorm"}),
    ("ConvNetLN", (), {"norm": "layernorm"}),
    ("ConvNetGN", (), {"norm": "groupnorm"}),
    ("ConvNetNN", (), {"norm": "none"}),
    ("ConvNetMP", (), {"pool": "maxpooling"}),
    ("ConvNetNP", (), {"pool": "none"}),
    *[(f"ConvNetD{d}", (), {"depth": d}) for d in (1, 2, 4, 5)],
    *[(f"ConvNetW{w}", (), {"width": w}) for w in (32, 64, 128, 256)],
    ("ConvNetAS", (), {"act": "sigmoid"}),
    ("ConvNetAR", (), {"act": "relu"}),
    ("ConvNetAL", (), {"act": "leakyrelu"}),
    ("ConvNetASwish", (), {"act": "swish"}),
    ("ConvNetASwishBN", (), {"act": "swish", "norm": "batchnorm"}),
]


def _build(
    name: str,
    cls: type[nn.Module],
    channels: int,
    num_classes: int,
    image_size: tuple[int, int],
    preset: Mapping[str, Any],
    overrides: Mapping[str, Any],
    options: tuple[str, ...],
) -> nn.Module:
    """``cls(channels, num_classes, image_size, **preset, **overrides)``; overrides must be in ``options``."""
    for key in overrides:
        if key not in options:
            allowed = ", ".join(options) or "none"
            raise ConfigError(f"model '{name}' has no option '{key}' (options: {allowed})")
    return cls(channels, num_classes, _size2(image_size), **{**preset, **overrides})


def _convnet_factory(name: str, preset: dict[str, Any]) -> ModelFactory:
    def factory(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
        options = ("width", "depth", "norm", "act", "pool")
        return _build(name, ConvNet, channels, num_classes, image_size, preset, overrides, options)

    factory.__name__ = factory.__qualname__ = name  # a re-import re-registers an "equal" factory
    factory.__doc__ = f"ConvNet with {preset or 'the defaults'} (PROTOCOL §1.1)."
    return factory


for _name, _aliases, _preset in _CONVNET_VARIANTS:
    MODELS.add(_name, _convnet_factory(_name, _preset), *_aliases)


# The cross-architecture nets live in their own module; importing it registers them.
from dd_bench import cross_arch  # noqa: E402,F401
