"""Building blocks shared by the DD nets: the norm and activation choices, the classifier base."""

from __future__ import annotations

import torch
from torch import nn

from dd_bench.errors import ConfigError

NORMS = ("instancenorm", "batchnorm", "layernorm", "groupnorm", "none")
ACTS = ("relu", "sigmoid", "leakyrelu", "swish")
POOLS = ("avgpooling", "maxpooling", "none")


def has_batchnorm(model: nn.Module) -> bool:
    """True if any layer keeps batch statistics; DC then primes them on real data and freezes
    them before matching (PROTOCOL §1.2, "BatchNorm during DC matching")."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def is_28_grey(channels: int, image_size: tuple[int, int]) -> bool:
    """MNIST-like input, which the DD nets pad up to behave like 32x32 (PROTOCOL §1.1)."""
    return channels == 1 and tuple(image_size) == (28, 28)


def choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"model option {option}='{value}' is not one of: {', '.join(allowed)}")
    return value


def norm2d(norm: str, channels: int, spatial: tuple[int, int]) -> nn.Module:
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


def activation(act: str) -> nn.Module:
    if act == "sigmoid":
        return nn.Sigmoid()
    if act == "leakyrelu":
        return nn.LeakyReLU(negative_slope=0.01)
    if act == "swish":
        return nn.SiLU()  # x * sigmoid(x), DC's Swish
    return nn.ReLU()  # not in-place: keeps double backward (DC) and torch.func (batched eval) safe


def check_spatial(name: str, spatial: tuple[int, int], image_size: tuple[int, int]) -> None:
    if min(spatial) < 1:
        raise ConfigError(f"{name} cannot take {image_size[0]}x{image_size[1]} input: the feature map shrinks to nothing")


class Classifier(nn.Module):
    """Shared surface of every DD net: ``embed`` gives the features the final Linear ``classifier`` sees."""

    feature_dim: int
    classifier: nn.Linear

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))
