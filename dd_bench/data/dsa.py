"""Differentiable Siamese Augmentation (DSA) on Kornia (PROTOCOL §4).

Six families -- color (brightness, saturation, contrast), crop, cutout, flip, scale, rotate --
with the DSA parameter ranges of the DC repository's ``ParamDiffAug``. Randomness is split from
the transform so Siamese sharing is exact: :meth:`DSA.draw` samples one family and its
parameters from a ``torch.Generator``; :meth:`DSA.apply` is a pure, differentiable function of
the pixels and that draw. A Siamese draw holds ONE parameter set (batch dimension 1) that
broadcasts over any batch, so a real batch of 256 and a synthetic batch of 10 get the same
transform -- what the official code obtains by reseeding and overwriting with element 0.

Departures from the official code (none changes the distribution of transforms):
- parameters come from an explicit generator instead of ``torch.manual_seed`` on the global RNG;
- a Siamese draw samples one parameter set directly instead of B sets and keeping element 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F
from kornia.enhance import adjust_brightness
from kornia.geometry.conversions import denormalize_homography
from kornia.geometry.transform import hflip, warp_affine

from dd_bench.errors import ConfigError

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"
#: Families known to DSA, in the order the official ``AUGMENT_FNS`` lists them.
FAMILIES: tuple[str, ...] = ("color", "crop", "cutout", "flip", "scale", "rotate")
_IDENTITY_STRATEGIES = ("", "none")
Device = Union[torch.device, str, None]


@dataclass(frozen=True)
class DSAParams:
    """DSA magnitudes, defaults from PROTOCOL §4 (official ``ParamDiffAug``).

    ``align_corners`` follows DC, which calls ``affine_grid``/``grid_sample`` with PyTorch's
    default (False); MTT passes True, so an MTT port should set it.
    """

    scale_ratio: float = 1.2  # sx, sy ~ U[1/r, r] independently
    rotate_degrees: float = 15.0  # theta ~ U[-d, d]
    flip_prob: float = 0.5  # horizontal flip
    brightness: float = 1.0  # x + (u - 0.5) * b
    saturation: float = 2.0  # (x - mean_c) * (u * s) + mean_c
    contrast: float = 0.5  # (x - mean_chw) * (u + c) + mean_chw
    crop_ratio: float = 0.125  # integer shift in [-s, s], s = round(ratio * H)
    cutout_ratio: float = 0.5  # zeroed square of side round(ratio * H)
    align_corners: bool = False

    def __post_init__(self) -> None:
        if self.scale_ratio < 1.0:
            raise ConfigError(f"DSAParams.scale_ratio must be >= 1, got {self.scale_ratio}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ConfigError(f"DSAParams.flip_prob must be in [0, 1], got {self.flip_prob}")
        for name in ("rotate_degrees", "brightness", "saturation", "contrast", "crop_ratio"):
            if getattr(self, name) < 0:
                raise ConfigError(f"DSAParams.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.cutout_ratio <= 1.0:
            raise ConfigError(f"DSAParams.cutout_ratio must be in [0, 1], got {self.cutout_ratio}")


def strategy_tokens(strategy: str) -> list[str]:
    """Split a DSA strategy string such as ``"color_crop_cutout_flip_scale_rotate"`` (PROTOCOL §4).

    ``""`` and ``"none"`` (any case) mean identity and give ``[]``. An unknown or repeated token
    raises :class:`ConfigError` naming it (a repeat would silently reweight mode 'S').
    """
    if strategy.strip().lower() in _IDENTITY_STRATEGIES:
        return []
    tokens = strategy.strip().split("_")
    for token in tokens:
        if token not in FAMILIES:
            raise ConfigError(
                f"Unknown DSA augmentation {token!r} in strategy {strategy!r}. "
                f"Available: {', '.join(FAMILIES)}"
            )
    repeated = sorted({t for t in tokens if tokens.count(t) > 1})
    if repeated:
        raise ConfigError(f"DSA strategy {strategy!r} repeats {', '.join(repeated)}")
    return tokens


def _round_half_up(value: float) -> int:
    # The official code sizes crop and cutout with int(v + 0.5); Python's round() would send
    # 28 * 0.125 = 3.5 to 4 but e.g. 2.5 to 2, so spell the rule out.
    return int(value + 0.5)


@dataclass(frozen=True)
class AugmentDraw:
    """One sampled augmentation: the families to apply and their parameter tensors.

    Every parameter tensor has leading size ``batch_size``: 1 for a Siamese (shared) draw, which
    broadcasts over any batch, or the batch size for a per-image draw.
    """

    families: tuple[str, ...]
    params: Mapping[str, torch.Tensor] = field(default_factory=dict)
    batch_size: int = 1
    image_size: tuple[int, int] = (0, 0)
    shared: bool = True

    @property
    def family(self) -> str:
        """The single family of a mode-'S' draw ("none" for identity)."""
        return "_".join(self.families) if self.families else "none"

    def to(self, device: Device) -> AugmentDraw:
        """The same draw with its parameter tensors on ``device``."""
        moved = {name: value.to(device) for name, value in self.params.items()}
        return AugmentDraw(self.families, moved, self.batch_size, self.image_size, self.shared)


class DSA:
    """Differentiable Siamese Augmentation (PROTOCOL §4).

    Args:
        strategy: families joined by ``_``; ``"none"`` or ``""`` is identity.
        params: magnitudes; defaults are the paper's.
        mode: ``'S'`` (default) draws one family uniformly per call and applies only it;
            ``'M'`` applies every family of the strategy in order, each with its own draw.
    """

    def __init__(self, strategy: str = DEFAULT_STRATEGY, params: Optional[DSAParams] = None,
                 mode: str = "S") -> None:
        if mode not in ("S", "M"):
            raise ConfigError(f"Unknown DSA mode {mode!r}. Available: S, M")
        self.strategy = strategy
        self.tokens = strategy_tokens(strategy)
        self.params = params if params is not None else DSAParams()
        self.mode = mode

    def __repr__(self) -> str:
        return f"DSA(strategy={self.strategy!r}, mode={self.mode!r}, params={self.params})"

    # ----------------------------------------------------------------- sampling
    def draw(self, batch_size: int, image_size: tuple[int, int],
             generator: Optional[torch.Generator] = None, siamese: bool = False,
             device: Device = None) -> AugmentDraw:
        """Sample the family (mode 'S') and its parameters for a batch of ``image_size`` images.

        ``siamese=True`` samples one parameter set for the whole batch (and for any other batch
        it is applied to); otherwise each of the ``batch_size`` images gets its own. All numbers
        come from ``generator`` (the global RNG when None), on the generator's device, then move
        to ``device``, so a seed reproduces the draw exactly on any device.
        """
        height, width = int(image_size[0]), int(image_size[1])
        n = 1 if siamese else int(batch_size)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        if not self.tokens:
            families: tuple[str, ...] = ()
        elif self.mode == "S":
            pick = torch.randint(len(self.tokens), (1,), generator=generator, device=gen_device)
            families = (self.tokens[int(pick.item())],)
        else:
            families = tuple(self.tokens)

        def uniform() -> torch.Tensor:
            return torch.rand(n, generator=generator, device=gen_device)

        def integers(low: int, high_inclusive: int) -> torch.Tensor:
            return torch.randint(low, high_inclusive + 1, (n,), generator=generator,
                                 device=gen_device)

        p = self.params
        drawn: dict[str, torch.Tensor] = {}
        for family in families:
            if family == "color":  # three separate draws, as the official code reseeds for each
                drawn["brightness_shift"] = (uniform() - 0.5) * p.brightness
                drawn["saturation_factor"] = uniform() * p.saturation
                drawn["contrast_factor"] = uniform() + p.contrast
            elif family == "scale":
                low = 1.0 / p.scale_ratio
                drawn["scale_x"] = uniform() * (p.scale_ratio - low) + low
                drawn["scale_y"] = uniform() * (p.scale_ratio - low) + low
            elif family == "rotate":
                drawn["angle_rad"] = (uniform() - 0.5) * 2.0 * math.radians(p.rotate_degrees)
            elif family == "flip":
                drawn["flip"] = uniform() < p.flip_prob
            elif family == "crop":
                # Official order: the row shift (dim 2) first, then the column shift (dim 3).
                drawn["shift_y"] = integers(-_round_half_up(height * p.crop_ratio),
                                            _round_half_up(height * p.crop_ratio))
                drawn["shift_x"] = integers(-_round_half_up(width * p.crop_ratio),
                                            _round_half_up(width * p.crop_ratio))
            elif family == "cutout":
                size_y, size_x = self._cutout_size(height, width)
                # An even side may centre on the far edge, as in the official code (H + 1 - s % 2).
                drawn["cut_center_y"] = integers(0, height - size_y % 2)
                drawn["cut_center_x"] = integers(0, width - size_x % 2)
        draw = AugmentDraw(families, drawn, n, (height, width), siamese)
        return draw.to(device) if device is not None else draw

    # ---------------------------------------------------------------- transform
    def apply(self, x: torch.Tensor, draw: AugmentDraw) -> torch.Tensor:
        """Apply ``draw`` to ``x`` (B, C, H, W); differentiable w.r.t. ``x`` for every family."""
        if x.dim() != 4:
            raise ValueError(f"DSA expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
        if draw.families and draw.batch_size not in (1, x.shape[0]):
            raise ValueError(f"A per-image draw for {draw.batch_size} images cannot be applied "
                             f"to a batch of {x.shape[0]}")
        if draw.families and tuple(x.shape[-2:]) != draw.image_size:
            raise ValueError(f"Draw made for {draw.image_size} images, got {tuple(x.shape[-2:])}")
        prm = {name: value.to(x.device) for name, value in draw.params.items()}
        for family in draw.families:
            x = getattr(self, f"_apply_{family}")(x, prm)
        return x

    def __call__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                 siamese: bool = False) -> torch.Tensor:
        """Draw and apply in one go: per-image parameters, or one shared set if ``siamese``."""
        draw = self.draw(x.shape[0], (x.shape[-2], x.shape[-1]), generator, siamese)
        return self.apply(x, draw)

    def siamese(self, real: torch.Tensor, syn: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The same family and the same parameters applied to a real and a synthetic batch.

        Batch sizes may differ; image sizes must agree (PROTOCOL §4, Siamese).
        """
        if real.shape[-2:] != syn.shape[-2:]:
            raise ValueError(f"Siamese batches need one image size, got {tuple(real.shape[-2:])} "
                             f"and {tuple(syn.shape[-2:])}")
        draw = self.draw(1, (real.shape[-2], real.shape[-1]), generator, siamese=True)
        return self.apply(real, draw), self.apply(syn, draw)

    # ------------------------------------------------------------------ families
    @staticmethod
    def _per_image(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return value.to(x.dtype).view(-1, 1, 1, 1)

    def _apply_color(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Brightness: kornia's adjust_brightness is exactly x + shift once its [0, 1] clamp is off
        # (DSA works on normalized tensors, which are not in [0, 1]).
        x = adjust_brightness(x, self._per_image(prm["brightness_shift"], x), clip_output=False)
        # Saturation and contrast are written out: kornia's saturation works in HSV and its
        # contrast uses a grayscale mean and clamps, while DSA mixes with the channel mean
        # (saturation) and the per-image C,H,W mean (contrast), unclamped.
        mean_c = x.mean(dim=1, keepdim=True)
        x = (x - mean_c) * self._per_image(prm["saturation_factor"], x) + mean_c
        mean_chw = x.mean(dim=(1, 2, 3), keepdim=True)
        return (x - mean_chw) * self._per_image(prm["contrast_factor"], x) + mean_chw

    def _apply_flip(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # torch.where routes each image's gradient through whichever branch it took.
        return torch.where(prm["flip"].view(-1, 1, 1, 1), hflip(x), x)

    def _apply_scale(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # DSA's theta diag(sx, sy) maps output to input normalized coordinates; kornia wants the
        # input-to-output map, its inverse.
        inv_x, inv_y = 1.0 / prm["scale_x"], 1.0 / prm["scale_y"]
        zero = torch.zeros_like(inv_x)
        return self._warp(x, torch.stack([inv_x, zero, zero, inv_y], dim=-1))

    def _apply_rotate(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # DSA's theta [[cos, -sin], [sin, cos]] maps output to input; kornia wants the inverse,
        # the transpose. Positive angles turn the image anticlockwise, as in the official code.
        cos, sin = torch.cos(prm["angle_rad"]), torch.sin(prm["angle_rad"])
        return self._warp(x, torch.stack([cos, sin, -sin, cos], dim=-1))

    def _warp(self, x: torch.Tensor, linear: torch.Tensor) -> torch.Tensor:
        """Bilinear warp, zero padding, by a linear map given in normalized coordinates.

        DSA defines scale and rotate on affine_grid's [-1, 1] frame; converting that matrix to
        pixels with kornia's denormalize_homography (same align_corners as the sampler) keeps
        the warp identical to DSA for any image shape, square or not.
        """
        height, width = x.shape[-2:]
        dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision inputs: fp32 matrix
        norm = torch.zeros(linear.shape[0], 3, 3, dtype=dtype, device=x.device)
        norm[:, :2, :2] = linear.to(dtype).view(-1, 2, 2)
        norm[:, 2, 2] = 1.0
        pixel = denormalize_homography(norm, (height, width), (height, width),
                                       align_corners=self.params.align_corners)
        # A (1, 2, 3) matrix broadcasts over the batch inside warp_affine (Siamese draws).
        return warp_affine(x, pixel[:, :2, :].to(x.dtype), (height, width), mode="bilinear",
                           padding_mode="zeros", align_corners=self.params.align_corners)

    def _apply_crop(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Written in torch: DSA's crop is an integer translation with zero fill; kornia's
        # translate resamples bilinearly, which is exact only up to rounding of the grid.
        batch, _, height, width = x.shape
        pad_y = _round_half_up(height * self.params.crop_ratio)
        pad_x = _round_half_up(width * self.params.crop_ratio)
        padded = F.pad(x, (pad_x, pad_x, pad_y, pad_y))  # zeros stand in for off-image pixels
        shift_y = prm["shift_y"].expand(batch)
        shift_x = prm["shift_x"].expand(batch)
        rows = torch.arange(height, device=x.device) + pad_y + shift_y[:, None]  # (B, H)
        cols = torch.arange(width, device=x.device) + pad_x + shift_x[:, None]  # (B, W)
        images = torch.arange(batch, device=x.device)[:, None, None]
        # Advanced indexing keeps the gradient; output[h, w] = input[h + shift_y, w + shift_x].
        out = padded.permute(0, 2, 3, 1)[images, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2)

    def _cutout_size(self, height: int, width: int) -> tuple[int, int]:
        return (_round_half_up(height * self.params.cutout_ratio),
                _round_half_up(width * self.params.cutout_ratio))

    def _apply_cutout(self, x: torch.Tensor, prm: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Written in torch: kornia's RandomErasing draws area and aspect ratio, DSA zeroes one
        # fixed-size square (clipped at the border). A multiplicative mask keeps the gradient.
        height, width = x.shape[-2:]
        size_y, size_x = self._cutout_size(height, width)
        top = (prm["cut_center_y"] - size_y // 2)[:, None]
        left = (prm["cut_center_x"] - size_x // 2)[:, None]
        rows = torch.arange(height, device=x.device)[None, :]
        cols = torch.arange(width, device=x.device)[None, :]
        cut_rows = (rows >= top) & (rows < top + size_y)  # (n, H)
        cut_cols = (cols >= left) & (cols < left + size_x)  # (n, W)
        keep = ~(cut_rows[:, :, None] & cut_cols[:, None, :])
        return x * keep[:, None].to(x.dtype)


DiffSiameseAugment = DSA
