"""The cross-architecture nets of PROTOCOL §1.2 (MLP, LeNet, AlexNet, VGG11, ResNet18 and their
BN / avg-pool variants), as the distillation papers define them. See ``dd_bench.nets.convnet``
for the departures shared with ConvNet.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from dd_bench.nets.layers import Classifier, check_spatial, choice, is_28_grey, norm2d
from dd_bench.nets.registry import build_with_options, register_model, size2


class MLP(Classifier):
    """flatten -> Linear(C*H*W, 128) -> ReLU -> Linear(128, 128) -> ReLU -> Linear(128, K); no norm."""

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        height, width = size2(image_size)
        self.body = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU()
        )
        self.feature_dim = 128
        self.classifier = nn.Linear(128, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LeNet(Classifier):
    """Conv5(6) -> ReLU -> MaxPool -> Conv5(16) -> ReLU -> MaxPool -> FC 120 -> 84 -> K; no norm.

    The first conv pads by 2 on 28x28 grey input so the map is 16x5x5 = 400 as at 32 px.
    ``embed`` is the 84-d output of the last hidden FC.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32)):
        super().__init__()
        image_size = size2(image_size)
        padding = 2 if is_28_grey(channels, image_size) else 0
        height, width = (((s + 2 * padding - 4) // 2 - 4) // 2 for s in image_size)
        check_spatial("LeNet", (height, width), image_size)
        # fmt: off
        self.features = nn.Sequential(
            nn.Conv2d(channels, 6, kernel_size=5, padding=padding), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2, 2),
            nn.Flatten(),
            nn.Linear(16 * height * width, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
        )
        # fmt: on
        self.feature_dim = 84
        self.classifier = nn.Linear(84, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class AlexNet(Classifier):
    """DC's AlexNet: five convs (128, 192, 256, 192, 192), three max-pools, one Linear.

    No norm by default; ``norm="batchnorm"`` (AlexNetBN) adds BatchNorm2d after every conv.
    The first conv (5x5) pads by 4 on 28x28 grey input, else 2, so both end at 192x4x4.
    """

    def __init__(self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32), norm: str = "none"):
        super().__init__()
        image_size = size2(image_size)
        self.norm = choice("norm", norm, ("none", "batchnorm"))
        spec = [  # (out channels, kernel, padding, max-pool after)
            (128, 5, 4 if is_28_grey(channels, image_size) else 2, True),
            (192, 5, 2, True),
            (256, 3, 1, False),
            (192, 3, 1, False),
            (192, 3, 1, True),
        ]
        layers: list[nn.Module] = []
        in_channels, (height, width) = channels, image_size
        for out_channels, kernel, padding, pool in spec:
            layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=kernel, padding=padding))
            if self.norm == "batchnorm":
                layers.append(nn.BatchNorm2d(out_channels))
            layers.append(nn.ReLU())
            height, width = height + 2 * padding - kernel + 1, width + 2 * padding - kernel + 1
            if pool:
                layers.append(nn.MaxPool2d(2, 2))
                height, width = height // 2, width // 2
            in_channels = out_channels
        check_spatial("AlexNet", (height, width), image_size)
        self.features = nn.Sequential(*layers)
        self.feature_dim = 192 * height * width
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


_VGG11_CFG: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


class VGG11(Classifier):
    """VGG11 as in DC: 3x3 conv -> norm -> ReLU per entry, max-pool at "M", then Linear(512, K).

    Norm is instance norm (GroupNorm(C, C)) by default, BatchNorm2d for VGG11BN. The first conv
    pads by 3 on 28x28 grey input (28 -> 32), so five pools end at 512x1x1 in both cases. The
    original's trailing AvgPool2d(1) is a no-op and is left out (it has no parameters).
    """

    def __init__(
        self, channels: int, num_classes: int, image_size: tuple[int, int] = (32, 32), norm: str = "instancenorm"
    ):
        super().__init__()
        image_size = size2(image_size)
        self.norm = choice("norm", norm, ("instancenorm", "batchnorm"))
        layers: list[nn.Module] = []
        in_channels, (height, width) = channels, image_size
        for index, entry in enumerate(_VGG11_CFG):
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                height, width = height // 2, width // 2
                continue
            padding = 3 if index == 0 and is_28_grey(channels, image_size) else 1
            layers += [nn.Conv2d(in_channels, int(entry), kernel_size=3, padding=padding)]
            layers += [norm2d(self.norm, int(entry), (height, width)), nn.ReLU()]
            height, width = height + 2 * padding - 2, width + 2 * padding - 2
            in_channels = int(entry)
        check_spatial("VGG11", (height, width), image_size)
        self.features = nn.Sequential(*layers)
        self.feature_dim = 512 * height * width
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)


class BasicBlock(nn.Module):
    """ResNet basic block (bias-free 3x3 convs). ``avgpool_downsample`` is DC's "_AP" block: the
    stride-2 conv becomes stride 1 followed by AvgPool 2x2, and the shortcut is pooled too."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str, avgpool_downsample: bool):
        super().__init__()
        conv_stride = 1 if avgpool_downsample else stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=conv_stride, padding=1, bias=False)
        self.bn1 = norm2d(norm, planes, (0, 0))
        self.pool = nn.AvgPool2d(2, 2) if avgpool_downsample and stride != 1 else nn.Identity()
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = norm2d(norm, planes, (0, 0))
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            shortcut: list[nn.Module] = [nn.Conv2d(in_planes, planes, 1, stride=conv_stride, bias=False)]
            if avgpool_downsample:
                shortcut.append(nn.AvgPool2d(2, 2))
            self.shortcut = nn.Sequential(*shortcut, norm2d(norm, planes, (0, 0)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pool(F.relu(self.bn1(self.conv1(x))))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(Classifier):
    """DC's ResNet18: 3x3 stride-1 stem, no max-pool, BasicBlock [2, 2, 2, 2] (64-512), one Linear.

    Norm is instance norm (GroupNorm(C, C)) by default, BatchNorm2d for the BN variants.
    Plain: strided convs, then avg_pool(4) -> 512 features at 28 and 32 px.
    ``avgpool_downsample`` (ResNet18_AP): no final pooling, features 512x4x4 at 32 px and
    512x3x3 at 28 px (28 -> 14 -> 7 -> 3), as in the original.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        image_size: tuple[int, int] = (32, 32),
        norm: str = "instancenorm",
        avgpool_downsample: bool = False,
    ):
        super().__init__()
        image_size = size2(image_size)
        self.norm = choice("norm", norm, ("instancenorm", "batchnorm"))
        self.avgpool_downsample = bool(avgpool_downsample)
        self.conv1 = nn.Conv2d(channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = norm2d(self.norm, 64, (0, 0))
        stages, in_planes = [], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            blocks = [BasicBlock(in_planes, planes, stride, self.norm, self.avgpool_downsample)]
            blocks.append(BasicBlock(planes, planes, 1, self.norm, self.avgpool_downsample))
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if self.avgpool_downsample:  # AvgPool 2x2 floors: 28 -> 14 -> 7 -> 3
            height, width = (s // 8 for s in image_size)
        else:  # stride-2 3x3 conv with padding 1 rounds up: 28 -> 14 -> 7 -> 4, then avg_pool(4)
            height, width = ((-(-s // 8)) // 4 for s in image_size)
        check_spatial("ResNet18", (height, width), image_size)
        self.feature_dim = 512 * height * width
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if not self.avgpool_downsample:
            out = F.avg_pool2d(out, 4)
        return out.flatten(1)


def _fixed(name: str, cls: type[nn.Module], channels: int, num_classes: int, image_size: tuple[int, int],
           overrides: dict[str, Any], **preset: Any) -> nn.Module:
    """These nets take no overrides: each named variant is the whole configuration."""
    return build_with_options(name, cls, channels, num_classes, image_size, preset, overrides, ())


# -- the named nets of PROTOCOL §1.2 ---------------------------------------------------------
@register_model("MLP")
def mlp(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """MLP: two hidden layers of 128, no norm."""
    return _fixed("MLP", MLP, channels, num_classes, image_size, overrides)


@register_model("LeNet")
def lenet(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """LeNet-5 as in DC, no norm."""
    return _fixed("LeNet", LeNet, channels, num_classes, image_size, overrides)


@register_model("AlexNet")
def alexnet(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """DC's AlexNet, no norm."""
    return _fixed("AlexNet", AlexNet, channels, num_classes, image_size, overrides)


@register_model("AlexNetBN")
def alexnet_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """DC's AlexNet with BatchNorm after every conv."""
    return _fixed("AlexNetBN", AlexNet, channels, num_classes, image_size, overrides, norm="batchnorm")


@register_model("VGG11")
def vgg11(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """VGG11 with instance norm, as in DC."""
    return _fixed("VGG11", VGG11, channels, num_classes, image_size, overrides)


@register_model("VGG11BN")
def vgg11_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """VGG11 with BatchNorm."""
    return _fixed("VGG11BN", VGG11, channels, num_classes, image_size, overrides, norm="batchnorm")


@register_model("ResNet18")
def resnet18(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """DC's ResNet18 with instance norm (3x3 stride-1 stem, no max-pool)."""
    return _fixed("ResNet18", ResNet18, channels, num_classes, image_size, overrides)


@register_model("ResNet18BN")
def resnet18_bn(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """DC's ResNet18 with BatchNorm."""
    return _fixed("ResNet18BN", ResNet18, channels, num_classes, image_size, overrides, norm="batchnorm")


@register_model("ResNet18_AP")
def resnet18_ap(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """ResNet18 with average-pool downsampling, instance norm (MTT's pool)."""
    return _fixed("ResNet18_AP", ResNet18, channels, num_classes, image_size, overrides, avgpool_downsample=True)


@register_model("ResNet18BN_AP")
def resnet18_bn_ap(channels: int, num_classes: int, image_size: tuple[int, int], **overrides: Any) -> nn.Module:
    """ResNet18 with average-pool downsampling and BatchNorm."""
    return _fixed("ResNet18BN_AP", ResNet18, channels, num_classes, image_size, overrides, norm="batchnorm",
                  avgpool_downsample=True)
