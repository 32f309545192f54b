"""FRePo's own ConvNet (``Conv`` in yongchao97/FRePo ``lib/models/networks.py``; PROTOCOL §1.1).

It differs from DC's ConvNet in three ways:

- the width doubles per block: 128 -> 256 -> 512, so 32 px input ends at 512x4x4 = 8192 features;
- the norm comes *before* the conv of every block but the first, and never after the last;
- FRePo distils with BatchNorm (``--normalization=batch``) and evaluates with no norm at all
  (``script/eval.py`` swaps 'batch' for 'identity'): ``FRePoConvNet`` is the evaluation net,
  ``FRePoConvNetBN`` the distillation net.

1-channel input pads the first conv by 3 (kernel 3 -> 1 + 2), so 28 px grey behaves like 32 px.
Weights start as Flax's defaults, which FRePo uses: LeCun normal kernels (a normal truncated
at two standard deviations, rescaled to variance 1/fan_in) and zero biases; PyTorch's own
default (Kaiming uniform with a = sqrt 5, uniform biases) would be a different net.

Norm layers follow Flax's definitions, not PyTorch's defaults:

- BatchNorm: FRePo passes Flax ``momentum=0.1``, and Flax's momentum is the weight of the OLD
  running average (``ra = m * ra + (1 - m) * batch``), so the batch statistics get weight 0.9:
  PyTorch ``momentum=0.9``. eps 1e-5 as FRePo sets it. One difference stays: Flax keeps the
  biased batch variance in the running variance, PyTorch the unbiased one (a factor
  n / (n - 1) with n = batch x height x width, under 1.001 for any batch of images here).
- LayerNorm and instance norm (GroupNorm with one channel per group): Flax's eps 1e-6.

Flax flattens the last feature map in (H, W, C) order and PyTorch in (C, H, W) order: the same
features permuted, which neither the linear kernel nor a freshly initialised classifier sees.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from dd_bench.nets.layers import Classifier, check_spatial, choice
from dd_bench.nets.registry import build_with_options, register_model, size2

FREPO_NORMS = ("none", "batchnorm", "layernorm", "instancenorm")
FREPO_OPTIONS = ("width", "depth", "norm")
# Flax's truncated normal keeps |z| < 2 and rescales by this std of the truncated N(0, 1).
_TRUNCATED_STD = 0.87962566103423978
#: PyTorch's BatchNorm momentum for Flax's ``momentum=0.1`` (weights are swapped between the two).
BN_MOMENTUM = 0.9
FLAX_NORM_EPS = 1e-6  # Flax's default eps of LayerNorm and GroupNorm


def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """Flax's ``lecun_normal``: variance 1/fan_in from a normal truncated at ±2 std."""
    fan_in = weight[0].numel()
    std = math.sqrt(1.0 / fan_in) / _TRUNCATED_STD
    with torch.no_grad():
        return nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-2 * std, b=2 * std)


def _norm(norm: str, channels: int, spatial: tuple[int, int]) -> nn.Module:
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels, eps=1e-5, momentum=BN_MOMENTUM)
    if norm == "layernorm":  # Flax's LayerNorm normalises the last axis only: the channels
        return _ChannelLayerNorm(channels)
    if norm == "instancenorm":
        return nn.GroupNorm(channels, channels, eps=FLAX_NORM_EPS)
    return nn.Identity()


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis at every pixel (Flax's ``nn.LayerNorm`` on NHWC)."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, eps=FLAX_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class FRePoConvNet(Classifier):
    """``depth`` blocks of [norm (not in block 1) -> Conv3x3(width * 2**i) -> ReLU -> AvgPool 2x2], one Linear."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32), width: int = 128,
                 depth: int = 3, norm: str = "none"):
        super().__init__()
        height, width_px = size2(image_size)
        self.norm = choice("norm", norm, FREPO_NORMS)
        layers: list[nn.Module] = []
        in_channels = channels
        for i in range(int(depth)):
            if i != 0 and self.norm != "none":
                layers.append(_norm(self.norm, in_channels, (height, width_px)))
            padding = 3 if i == 0 and channels == 1 else 1
            out_channels = int(width) * 2**i
            layers += [nn.Conv2d(in_channels, out_channels, 3, padding=padding), nn.ReLU(), nn.AvgPool2d(2, 2)]
            height, width_px = (height + 2 * padding - 2) // 2, (width_px + 2 * padding - 2) // 2
            in_channels = out_channels
        check_spatial(f"FRePoConvNet depth {depth}", (height, width_px), size2(image_size))
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_channels * height * width_px
        self.classifier = nn.Linear(self.feature_dim, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                lecun_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The flattened last feature map (FRePo's ``feat_fc``)."""
        return self.features(x).flatten(1)


@register_model("FRePoConvNet", "frepo_conv")
def frepo_convnet(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """FRePo's ConvNet without normalisation: its evaluation net (PROTOCOL §1.1, §7)."""
    return build_with_options("FRePoConvNet", FRePoConvNet, channels, num_classes, image_size, {}, overrides,
                              FREPO_OPTIONS)


@register_model("FRePoConvNetBN")
def frepo_convnet_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """FRePo's ConvNet with BatchNorm before blocks 2 and 3: its distillation net (PROTOCOL §7)."""
    return build_with_options("FRePoConvNetBN", FRePoConvNet, channels, num_classes, image_size,
                              {"norm": "batchnorm"}, overrides, FREPO_OPTIONS)
