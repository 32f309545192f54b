"""DC's ConvNet (PROTOCOL §1.1) and its named variants.

These are the DC/MTT definitions: no hidden FC and no global pooling; "instancenorm" is
``GroupNorm(C, C)``. Two departures from the original code, both deliberate and shared by
every net in ``dd_bench.nets``:

- Nets never reseed the global RNG (the original ``get_network`` reseeds from the clock):
  the harness seeds once per cell and each net draws from the current RNG state.
- Feature sizes are computed from ``image_size`` instead of hard-coded for 32 px, so sizes
  the original does not support (e.g. ResNet18 at 64 px) build instead of crashing. For
  28x28 and 32x32 every net is the original, parameter for parameter.

The "28 -> 32" treatment (first conv pads by 3, AlexNet's by 4, LeNet's by 2) is keyed on
1-channel 28x28 input, the MNIST/FashionMNIST case; the original keys it on channel == 1
alone, which only differs for 1-channel inputs of other sizes.

Each named variant of DC's ``get_network`` is a three-line registered function, so a name is
easy to find and its preset is readable where it is registered.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dd_bench.errors import ConfigError
from dd_bench.nets.cpu_fast import cpu_features
from dd_bench.nets.layers import (ACTS, NORMS, POOLS, Classifier, activation, check_spatial, choice, is_28_grey,
                                  norm2d)
from dd_bench.nets.registry import build_with_options, register_model, size2

CONVNET_OPTIONS = ("width", "depth", "norm", "act", "pool")


class ConvNet(Classifier):
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
        image_size = size2(image_size)
        if int(width) < 1 or int(depth) < 1:
            raise ConfigError(f"ConvNet width and depth must be positive, got width={width}, depth={depth}")
        self.width, self.depth = int(width), int(depth)
        self.norm = choice("norm", norm, NORMS)
        self.act = choice("act", act, ACTS)
        self.pool = choice("pool", pool, POOLS)
        first_padding = 3 if is_28_grey(channels, image_size) else 1
        layers: list[nn.Module] = []
        in_channels, (height, width_px) = channels, image_size
        for d in range(self.depth):
            padding = first_padding if d == 0 else 1
            height, width_px = height + 2 * padding - 2, width_px + 2 * padding - 2
            layers.append(nn.Conv2d(in_channels, self.width, kernel_size=3, padding=padding))
            if self.norm != "none":  # no Identity placeholder: keeps the original state-dict layout
                layers.append(norm2d(self.norm, self.width, (height, width_px)))
            layers.append(activation(self.act))
            if self.pool != "none":
                layers.append(nn.MaxPool2d(2, 2) if self.pool == "maxpooling" else nn.AvgPool2d(2, 2))
                height, width_px = height // 2, width_px // 2
            in_channels = self.width
        check_spatial(f"ConvNet depth {self.depth}", (height, width_px), image_size)
        self.features = nn.Sequential(*layers)
        self.feature_shape = (self.width, height, width_px)
        self.feature_dim = self.width * height * width_px
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Flattened last feature map (DM's embedding, PROTOCOL §5)."""
        # Under torch.compile the flag flips of the fast path would split the graph, and
        # inductor picks its own kernels anyway.
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            return cpu_features(self.features, x).flatten(1)
        return self.features(x).flatten(1)


def _convnet(name: str, channels: int, num_classes: int, image_size: tuple[int, int], overrides: dict[str, Any],
             **preset: Any) -> ConvNet:
    return build_with_options(name, ConvNet, channels, num_classes, image_size, preset, overrides, CONVNET_OPTIONS)


# -- the named variants of DC's get_network (and MTT's D5 for 128 px) -------------------------
@register_model("ConvNet", "convnet3", "ConvNetD3", "ConvNetIN")
def convnet(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet-3: width 128, instance norm, ReLU, average pooling (PROTOCOL §1.1)."""
    return _convnet("ConvNet", channels, num_classes, image_size, overrides)


@register_model("ConvNetBN")
def convnet_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with BatchNorm."""
    return _convnet("ConvNetBN", channels, num_classes, image_size, overrides, norm="batchnorm")


@register_model("ConvNetLN")
def convnet_ln(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with LayerNorm over (C, H, W)."""
    return _convnet("ConvNetLN", channels, num_classes, image_size, overrides, norm="layernorm")


@register_model("ConvNetGN")
def convnet_gn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with GroupNorm(4 groups)."""
    return _convnet("ConvNetGN", channels, num_classes, image_size, overrides, norm="groupnorm")


@register_model("ConvNetNN")
def convnet_nn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet without normalisation."""
    return _convnet("ConvNetNN", channels, num_classes, image_size, overrides, norm="none")


@register_model("ConvNetMP")
def convnet_mp(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with max pooling."""
    return _convnet("ConvNetMP", channels, num_classes, image_size, overrides, pool="maxpooling")


@register_model("ConvNetNP")
def convnet_np(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet without pooling."""
    return _convnet("ConvNetNP", channels, num_classes, image_size, overrides, pool="none")


@register_model("ConvNetD1")
def convnet_d1(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of depth 1."""
    return _convnet("ConvNetD1", channels, num_classes, image_size, overrides, depth=1)


@register_model("ConvNetD2")
def convnet_d2(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of depth 2."""
    return _convnet("ConvNetD2", channels, num_classes, image_size, overrides, depth=2)


@register_model("ConvNetD4")
def convnet_d4(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of depth 4 (64 px input, e.g. Tiny ImageNet)."""
    return _convnet("ConvNetD4", channels, num_classes, image_size, overrides, depth=4)


@register_model("ConvNetD5")
def convnet_d5(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of depth 5 (128 px input, MTT's ImageNet subsets)."""
    return _convnet("ConvNetD5", channels, num_classes, image_size, overrides, depth=5)


@register_model("ConvNetW32")
def convnet_w32(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of width 32."""
    return _convnet("ConvNetW32", channels, num_classes, image_size, overrides, width=32)


@register_model("ConvNetW64")
def convnet_w64(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of width 64."""
    return _convnet("ConvNetW64", channels, num_classes, image_size, overrides, width=64)


@register_model("ConvNetW128")
def convnet_w128(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of width 128 (the default width)."""
    return _convnet("ConvNetW128", channels, num_classes, image_size, overrides, width=128)


@register_model("ConvNetW256")
def convnet_w256(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet of width 256."""
    return _convnet("ConvNetW256", channels, num_classes, image_size, overrides, width=256)


@register_model("ConvNetAS")
def convnet_as(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with sigmoid activations."""
    return _convnet("ConvNetAS", channels, num_classes, image_size, overrides, act="sigmoid")


@register_model("ConvNetAR")
def convnet_ar(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with ReLU (the default activation)."""
    return _convnet("ConvNetAR", channels, num_classes, image_size, overrides, act="relu")


@register_model("ConvNetAL")
def convnet_al(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with leaky ReLU (slope 0.01)."""
    return _convnet("ConvNetAL", channels, num_classes, image_size, overrides, act="leakyrelu")


@register_model("ConvNetASwish")
def convnet_aswish(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with Swish activations."""
    return _convnet("ConvNetASwish", channels, num_classes, image_size, overrides, act="swish")


@register_model("ConvNetASwishBN")
def convnet_aswish_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> ConvNet:
    """ConvNet with Swish activations and BatchNorm (in DM's BN evaluation pool)."""
    return _convnet("ConvNetASwishBN", channels, num_classes, image_size, overrides, act="swish", norm="batchnorm")
