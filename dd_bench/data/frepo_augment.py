"""FRePo's evaluation augmentation, in PyTorch (PROTOCOL §7, "Evaluation").

FRePo trains its evaluation nets with ``get_aug_by_name(strategy, res)`` from its vendored
augmax (``lib/dataset/augmax/export.py``): for every mini-batch ONE family is drawn uniformly
from the strategy, and every image of the batch gets its OWN parameters for that family (not
Siamese). The families and their rules, read from augmax (``geometric.py``,
``imagelevel.py``, ``utils.py``), with H x W the image size:

- ``color`` (``NormalizedColorJitter(0.25, 0.25, 0.25, p=1)``), in this order:
  brightness ``x + b``, b ~ U(-0.25, 0.25);
  contrast ``(x - m) * c + m``, m the image mean over (C, H, W), c = exp(U(-0.25, 0.25));
  saturation ``(x - m_c) * s + m_c``, m_c the per-pixel mean over channels, s = exp(U(-0.25, 0.25))
  (a no-op on one channel);
- ``crop`` (``RandomSizedCrop(res, res, zoom_range=(0.8, 1.25))``): zoom z log-uniform on
  [0.8, 1.25], centre offset (oy, ox) ~ U(-|H z - H| / 2, +|H z - H| / 2) per axis; the output
  pixel p (relative to the image centre) samples the input at ``(p + o) / z``, so the view
  never leaves the image (z > 1 zooms in, z < 1 zooms out around the whole image);
- ``translate`` (``RandomTranslate(0.125)``): continuous shift d ~ U(-0.125 H, 0.125 H) per
  axis; output pixel p samples the input at ``p - d``;
- ``cutout`` (``Cutout(1, res // 4, res // 4, fill 0, p=1)``): one hole of exactly
  (H // 4) x (W // 4) pixels set to 0, top-left corner uniform over the integer positions that
  keep it inside the image;
- ``flip`` (``HorizontalFlip(0.5)``): mirror left-right with probability 0.5;
- ``rotate`` (``Rotate((-15, 15), p=1)``): angle U(-15°, 15°) about the image centre.

Geometric families resample bilinearly around the pixel-grid centre ((H - 1) / 2, (W - 1) / 2)
and fill outside the image with the nearest edge pixel (augmax: ``map_coordinates(order=1,
mode='nearest')``; here ``grid_sample(..., padding_mode='border', align_corners=True)``, the
same function). Images are in the normalised (and ZCA) space, as in FRePo.

Departures, none of which changes the distribution of transforms on square images:

- every draw comes from an explicit ``torch.Generator`` instead of JAX keys;
- augmax sizes the crop output and the cutout hole from one resolution ``res`` (the height);
  here height and width are used per axis, the same on square images;
- augmax's ``Cutout`` passes its (x, y) corner to an HWC slice update, so the x draw lands on
  rows and the y draw on columns; on square images with a square hole that is the same
  distribution as drawing rows and columns directly, which is what this file does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from dd_bench.errors import ConfigError

#: Families known to FRePo's ``get_aug_by_name``.
FAMILIES: tuple[str, ...] = ("color", "crop", "translate", "cutout", "flip", "rotate")
#: FRePo's strategies (``script/distill.py``, ``script/eval.py``).
STRATEGY_NO_FLIP = "color_crop_rotate_translate_cutout"
STRATEGY_WITH_FLIP = "flip_color_crop_rotate_translate_cutout"

BRIGHTNESS = 0.25
CONTRAST = 0.25  # the log of the largest contrast factor
SATURATION = 0.25  # the log of the largest saturation factor
ZOOM_RANGE = (0.8, 1.25)
TRANSLATE_RATIO = 0.125
CUTOUT_DIVISOR = 4
FLIP_PROB = 0.5
ROTATE_DEGREES = 15.0


def frepo_strategy(channels: int, dataset_name: str) -> str:
    """FRePo's evaluation strategy for a dataset: no flip for MNIST-like data.

    FRePo drops flip for 'mnist' and 'fashion_mnist', its only grey datasets; here any dataset
    whose name contains "mnist" (mnist, mnist_sample, fashion_mnist, ...) or that has one
    channel counts as MNIST-like.
    """
    if "mnist" in dataset_name.lower() or int(channels) == 1:
        return STRATEGY_NO_FLIP
    return STRATEGY_WITH_FLIP


def strategy_families(strategy: str) -> tuple[str, ...]:
    """The families of an underscore-joined strategy; an unknown or repeated one is a ConfigError."""
    families = tuple(strategy.strip().split("_")) if strategy.strip() else ()
    if not families:
        raise ConfigError(f"frepo augmentation strategy {strategy!r} names no family (known: {', '.join(FAMILIES)})")
    for family in families:
        if family not in FAMILIES:
            raise ConfigError(f"frepo augmentation strategy {strategy!r}: unknown family {family!r} "
                              f"(known: {', '.join(FAMILIES)})")
    repeated = sorted({f for f in families if families.count(f) > 1})
    if repeated:  # a repeat would silently reweight the uniform choice of family
        raise ConfigError(f"frepo augmentation strategy {strategy!r} repeats {', '.join(repeated)}")
    return families


@dataclass(frozen=True)
class FRePoDraw:
    """One batch's draw: the family and its per-image parameter tensors (leading size B)."""

    family: str
    params: dict[str, Tensor] = field(default_factory=dict)


class FRePoAugment:
    """FRePo's evaluation augmentation: one family per batch, per-image parameters.

    ``augment(x, generator)`` takes a (B, C, H, W) float batch and returns an augmented batch of
    the same shape, dtype and device; every random number comes from ``generator`` (drawn on
    its device, then moved to ``x``'s), so a seed reproduces the batch exactly.
    """

    def __init__(self, strategy: str, image_size: tuple[int, int]):
        self.strategy = strategy
        self.families = strategy_families(strategy)
        height, width = int(image_size[0]), int(image_size[1])
        if height < CUTOUT_DIVISOR or width < CUTOUT_DIVISOR:
            raise ConfigError(f"frepo augmentation image_size {image_size!r}: needs at least "
                              f"{CUTOUT_DIVISOR}x{CUTOUT_DIVISOR} pixels")
        self.image_size = (height, width)

    def __repr__(self) -> str:
        return f"FRePoAugment(strategy={self.strategy!r}, image_size={self.image_size})"

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.draw(x.shape[0], generator))

    # ----------------------------------------------------------------- sampling
    def draw(self, batch_size: int, generator: torch.Generator) -> FRePoDraw:
        """Pick the batch's family uniformly, then its parameters for each of ``batch_size`` images."""
        device = generator.device
        pick = int(torch.randint(len(self.families), (1,), generator=generator, device=device).item())
        family = self.families[pick]
        n = int(batch_size)
        height, width = self.image_size

        def uniform(low: float | Tensor, high: float | Tensor) -> Tensor:
            return low + (high - low) * torch.rand(n, generator=generator, device=device)

        params: dict[str, Tensor] = {}
        if family == "color":
            params["brightness"] = uniform(-BRIGHTNESS, BRIGHTNESS)
            params["contrast"] = uniform(-CONTRAST, CONTRAST).exp()
            params["saturation"] = uniform(-SATURATION, SATURATION).exp()
        elif family == "crop":
            zoom = uniform(math.log(ZOOM_RANGE[0]), math.log(ZOOM_RANGE[1])).exp()
            limit_y = (height * zoom - height).abs() / 2
            limit_x = (width * zoom - width).abs() / 2
            params["zoom"] = zoom
            params["offset_y"] = uniform(-limit_y, limit_y)
            params["offset_x"] = uniform(-limit_x, limit_x)
        elif family == "translate":
            params["shift_y"] = uniform(-TRANSLATE_RATIO * height, TRANSLATE_RATIO * height)
            params["shift_x"] = uniform(-TRANSLATE_RATIO * width, TRANSLATE_RATIO * width)
        elif family == "cutout":
            hole_y, hole_x = height // CUTOUT_DIVISOR, width // CUTOUT_DIVISOR
            params["top"] = torch.randint(0, height - hole_y + 1, (n,), generator=generator, device=device)
            params["left"] = torch.randint(0, width - hole_x + 1, (n,), generator=generator, device=device)
        elif family == "flip":
            params["flip"] = torch.rand(n, generator=generator, device=device) < FLIP_PROB
        elif family == "rotate":
            params["angle"] = uniform(-math.radians(ROTATE_DEGREES), math.radians(ROTATE_DEGREES))
        return FRePoDraw(family, params)

    # ---------------------------------------------------------------- transform
    def apply(self, x: Tensor, draw: FRePoDraw) -> Tensor:
        """``x`` transformed by ``draw`` (a pure function of both)."""
        if x.ndim != 4 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"FRePoAugment for {self.image_size} images got a batch of shape {tuple(x.shape)}")
        params = {name: value.to(x.device) for name, value in draw.params.items()}
        if draw.family == "color":
            return _color(x, params)
        if draw.family == "cutout":
            return _cutout(x, params["top"], params["left"])
        if draw.family == "flip":
            return torch.where(params["flip"].view(-1, 1, 1, 1), x.flip(-1), x)
        matrix, offset = _geometry(draw.family, params, x.dtype)
        return _resample(x, matrix, offset)


def _color(x: Tensor, params: dict[str, Tensor]) -> Tensor:
    shape = (-1, 1, 1, 1)
    x = x + params["brightness"].to(x.dtype).view(shape)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean) * params["contrast"].to(x.dtype).view(shape) + mean
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * params["saturation"].to(x.dtype).view(shape) + mean


def _cutout(x: Tensor, top: Tensor, left: Tensor) -> Tensor:
    height, width = x.shape[-2:]
    hole_y, hole_x = height // CUTOUT_DIVISOR, width // CUTOUT_DIVISOR
    rows = torch.arange(height, device=x.device).view(1, -1, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, -1)
    inside_rows = (rows >= top.view(-1, 1, 1)) & (rows < (top + hole_y).view(-1, 1, 1))
    inside_cols = (cols >= left.view(-1, 1, 1)) & (cols < (left + hole_x).view(-1, 1, 1))
    hole = (inside_rows & inside_cols).unsqueeze(1)  # (B, 1, H, W)
    return x.masked_fill(hole, 0.0)


def _geometry(family: str, params: dict[str, Tensor], dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Per-image (B, 2, 2) matrix A and (B, 2) offset t, in (row, col) pixel units about the
    image centre: output pixel p samples the input at ``A p + t`` (augmax's convention)."""
    if family == "crop":
        inverse_zoom = 1.0 / params["zoom"]
        eye = torch.eye(2, device=inverse_zoom.device, dtype=inverse_zoom.dtype)
        matrix = eye * inverse_zoom.view(-1, 1, 1)
        offset = torch.stack([params["offset_y"], params["offset_x"]], dim=1) * inverse_zoom.view(-1, 1)
    elif family == "translate":
        shift = torch.stack([params["shift_y"], params["shift_x"]], dim=1)
        matrix = torch.eye(2, device=shift.device, dtype=shift.dtype).expand(shift.shape[0], 2, 2)
        offset = -shift
    elif family == "rotate":
        cos, sin = params["angle"].cos(), params["angle"].sin()
        matrix = torch.stack([torch.stack([cos, sin], dim=1), torch.stack([-sin, cos], dim=1)], dim=1)
        offset = torch.zeros(cos.shape[0], 2, device=cos.device, dtype=cos.dtype)
    else:
        raise ValueError(f"no geometry for family {family!r}")
    return matrix.to(dtype), offset.to(dtype)


def _resample(x: Tensor, matrix: Tensor, offset: Tensor) -> Tensor:
    """Bilinear resampling at ``A p + t`` with edge replication (``grid_sample`` border mode).

    ``affine_grid`` works in (col, row) order on [-1, 1] with align_corners=True, where pixel
    index i maps to ``i / ((S - 1) / 2) - 1``; conjugating by the half extents
    D = diag((H - 1) / 2, (W - 1) / 2) turns the pixel-unit map into that frame.
    """
    height, width = x.shape[-2:]
    half = torch.tensor([(height - 1) / 2, (width - 1) / 2], dtype=x.dtype, device=x.device)
    # Pixel (row, col) relative frame -> normalised: n = p / half. Then n_in = D^-1 A D n_out + D^-1 t.
    scaled = matrix / half.view(1, 2, 1) * half.view(1, 1, 2)
    shift = offset / half.view(1, 2)
    # Reorder (row, col) -> (col, row) = (x, y), as affine_grid expects.
    order = [1, 0]
    theta = torch.cat([scaled[:, order][:, :, order], shift[:, order].unsqueeze(-1)], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


__all__ = ["FAMILIES", "FRePoAugment", "FRePoDraw", "STRATEGY_NO_FLIP", "STRATEGY_WITH_FLIP", "frepo_strategy",
           "strategy_families"]
