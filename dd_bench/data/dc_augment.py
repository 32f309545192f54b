"""DC's own evaluation augmentation (``augment`` and ``get_daparam`` in VICO-UoE/DatasetCondensation
``utils.py``; PROTOCOL §2.1), used when DC's paper protocol trains evaluation nets.

Each image of a mini-batch gets ONE operation, drawn uniformly from the strategy
(``'crop_scale_rotate'`` for MNIST, ``'crop_noise'`` when the evaluation net is ConvNetBN,
``'none'`` otherwise), with the official ranges:

- **crop**: pad ``crop`` = 4 pixels on every side, filled per channel with the *mini-batch*
  channel mean, and cut the original size at a random offset ``r, c ∈ {0, …, 2·crop − 1}``: a
  shift in [−4, +3] (not symmetric, as the official ``np.random.permutation(crop*2)[0]``);
- **scale**: new height ``int(U(1 − s, 1 + s) · H)`` and width ``int(U(1 − s, 1 + s) · H)``
  (both from the height, as the official code), ``s`` = 0.2, nearest-neighbour resize
  (``F.interpolate``'s default), centred on a zero canvas, centre crop back to H × W;
- **rotate**: an integer angle in [−45, 44] (``np.random.randint(-45, 45)``),
  ``scipy.ndimage.rotate`` with its defaults (cubic spline, ``reshape=True``, constant fill)
  filled with the mean of the channel means, then a centre crop;
- **noise**: add 0.001 · N(0, 1) per pixel.

The means are taken over the current mini-batch before any image is changed, as the official
code computes them once per call. scipy does the rotation, as in the official code, so the
interpolation is the same.

Departure (none changes the distribution of transforms): every number comes from the
``torch.Generator`` passed in (the official code uses NumPy's and torch's global RNGs), so a
seed reproduces an evaluation exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import torch
import torch.nn.functional as F
from torch import Tensor

from dd_bench.errors import ConfigError

DC_OPERATIONS = ("crop", "scale", "rotate", "noise")


@dataclass(frozen=True)
class DCAugmentParams:
    """The official ``get_daparam`` magnitudes."""

    crop: int = 4
    scale: float = 0.2
    rotate: int = 45
    noise: float = 0.001


@dataclass(frozen=True)
class DCDraw:
    """The operation and parameters drawn for one image (``value`` is op-specific)."""

    operation: str
    value: tuple


def dc_strategy_tokens(strategy: str) -> list[str]:
    """``"crop_scale_rotate"`` -> ["crop", "scale", "rotate"]; "none" or "" -> []."""
    if strategy.strip().lower() in ("", "none"):
        return []
    tokens = strategy.strip().split("_")
    for token in tokens:
        if token not in DC_OPERATIONS:
            raise ConfigError(f"Unknown DC augmentation {token!r} in strategy {strategy!r}. "
                              f"Available: {', '.join(DC_OPERATIONS)}")
    return tokens


class DCAugment:
    """DC's per-image augmentation for evaluation training (see the module docstring)."""

    def __init__(self, strategy: str, params: DCAugmentParams | None = None):
        self.strategy = strategy
        self.tokens = dc_strategy_tokens(strategy)
        self.params = params or DCAugmentParams()

    def __repr__(self) -> str:
        return f"DCAugment(strategy={self.strategy!r})"

    def draw(self, count: int, height: int, generator: torch.Generator) -> list[DCDraw]:
        """One operation per image, uniformly from the strategy, and its parameters."""
        draws = []
        p = self.params
        for _ in range(count):
            operation = self.tokens[int(torch.randint(len(self.tokens), (1,), generator=generator))]
            if operation == "crop":
                offsets = torch.randint(2 * p.crop, (2,), generator=generator)
                value = (int(offsets[0]), int(offsets[1]))
            elif operation == "scale":
                factors = torch.rand(2, generator=generator, dtype=torch.float64) * 2 * p.scale + (1 - p.scale)
                value = (int(float(factors[0]) * height), int(float(factors[1]) * height))
            elif operation == "rotate":
                value = (int(torch.randint(-p.rotate, p.rotate, (1,), generator=generator)),)
            else:  # noise: the seed of this image's noise field
                value = (int(torch.randint(2**62, (1,), generator=generator)),)
            draws.append(DCDraw(operation, value))
        return draws

    def apply(self, images: Tensor, draws: list[DCDraw]) -> Tensor:
        """Apply one draw per image; returns a new tensor (the input is left as it was)."""
        if len(draws) != images.shape[0]:
            raise ValueError(f"{len(draws)} draws for {images.shape[0]} images")
        channel_means = [float(images[:, c].mean()) for c in range(images.shape[1])]
        out = images.clone()
        for i, draw in enumerate(draws):
            out[i] = getattr(self, f"_{draw.operation}")(images[i], draw.value, channel_means)
        return out

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        if not self.tokens:
            return images
        return self.apply(images, self.draw(images.shape[0], images.shape[-2], generator))

    # -- the four operations, each on one (C, H, W) image ---------------------------------------
    def _crop(self, image: Tensor, offsets: tuple, means: list[float]) -> Tensor:
        pad = self.params.crop
        channels, height, width = image.shape
        canvas = torch.tensor(means, dtype=image.dtype, device=image.device).view(channels, 1, 1)
        canvas = canvas.expand(channels, height + 2 * pad, width + 2 * pad).clone()
        canvas[:, pad : pad + height, pad : pad + width] = image
        row, col = offsets
        return canvas[:, row : row + height, col : col + width]

    def _scale(self, image: Tensor, size: tuple, means: list[float]) -> Tensor:
        channels, height, width = image.shape
        new_h, new_w = size
        resized = F.interpolate(image[None], [new_h, new_w])[0]  # nearest, F.interpolate's default
        side = max(new_h, new_w, height, width)
        canvas = torch.zeros(channels, side, side, dtype=image.dtype, device=image.device)
        top, left = int((side - new_h) / 2), int((side - new_w) / 2)
        canvas[:, top : top + new_h, left : left + new_w] = resized
        top, left = int((side - height) / 2), int((side - width) / 2)
        return canvas[:, top : top + height, left : left + width]

    def _rotate(self, image: Tensor, angle: tuple, means: list[float]) -> Tensor:
        channels, height, width = image.shape
        rotated = scipy.ndimage.rotate(image.detach().cpu().numpy(), angle=angle[0], axes=(-2, -1),
                                       cval=float(np.mean(means)))
        top, left = int((rotated.shape[-2] - height) / 2), int((rotated.shape[-1] - width) / 2)
        cropped = rotated[:, top : top + height, left : left + width]
        return torch.tensor(cropped, dtype=image.dtype, device=image.device)

    def _noise(self, image: Tensor, seed: tuple, means: list[float]) -> Tensor:
        noise_generator = torch.Generator().manual_seed(seed[0])
        noise = torch.randn(image.shape, generator=noise_generator, dtype=image.dtype)
        return image + self.params.noise * noise.to(image.device)
