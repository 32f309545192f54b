"""The official evaluation-architecture pools, usable as shorthands in a suite's ``models:``.

- ``M`` (DC's ``eval_mode 'M'``): MLP, ConvNet, LeNet, AlexNet, VGG11, ResNet18;
- ``B`` (DM's cross-architecture runs, ``eval_mode 'B'``): ConvNetBN, ConvNetASwishBN,
  AlexNetBN, VGG11BN, ResNet18BN;
- ``MTT`` (MTT's ``eval_mode 'M'``): ConvNet, AlexNet, VGG11, ResNet18_AP, ResNet18.
"""

from __future__ import annotations

MODEL_POOLS: dict[str, tuple[str, ...]] = {
    "M": ("MLP", "ConvNet", "LeNet", "AlexNet", "VGG11", "ResNet18"),
    "B": ("ConvNetBN", "ConvNetASwishBN", "AlexNetBN", "VGG11BN", "ResNet18BN"),
    "MTT": ("ConvNet", "AlexNet", "VGG11", "ResNet18_AP", "ResNet18"),
}


def expand_models(names: list[str]) -> list[str]:
    """Model names with pool shorthands replaced by their members (first occurrence kept)."""
    out: list[str] = []
    for name in names:
        out.extend(MODEL_POOLS.get(name, (name,)))
    return list(dict.fromkeys(out))
