"""FRePo's evaluation augmentation (PROTOCOL §7): families, ranges, per-image draws, determinism.

The geometric families are checked against an independent reference: SciPy's
``map_coordinates(order=1, mode='nearest')`` at augmax's sampling coordinates
``A (p - c) + t + c``, which is how augmax itself resamples.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from dd_bench.data.frepo_augment import (FAMILIES, STRATEGY_NO_FLIP, STRATEGY_WITH_FLIP, FRePoAugment, FRePoDraw,
                                         frepo_strategy)
from dd_bench.errors import ConfigError

SIZE = (28, 28)
BATCH = 2000


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _draw_family(family: str, batch: int = BATCH, seed: int = 0) -> FRePoDraw:
    draw = FRePoAugment(family, SIZE).draw(batch, _generator(seed))
    assert draw.family == family
    return draw


def _images(batch: int = 8, channels: int = 3, size: tuple[int, int] = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, *size, generator=_generator(seed))


# -- strategies ----------------------------------------------------------------------------
@pytest.mark.parametrize("channels,name,expected", [
    (1, "mnist", STRATEGY_NO_FLIP), (1, "fashion_mnist", STRATEGY_NO_FLIP), (1, "mnist_sample", STRATEGY_NO_FLIP),
    (3, "cifar10", STRATEGY_WITH_FLIP), (3, "svhn", STRATEGY_WITH_FLIP), (1, "some_grey_set", STRATEGY_NO_FLIP),
])
def test_strategy_drops_flip_for_mnist_like_data_only(channels, name, expected):
    assert frepo_strategy(channels, name) == expected
    assert STRATEGY_NO_FLIP == "color_crop_rotate_translate_cutout"
    assert STRATEGY_WITH_FLIP == "flip_color_crop_rotate_translate_cutout"


@pytest.mark.parametrize("strategy", ["", "color_zoom", "flip_flip", "scale"])
def test_bad_strategies_are_config_errors(strategy):
    with pytest.raises(ConfigError):
        FRePoAugment(strategy, SIZE)


def test_one_family_per_batch_chosen_uniformly():
    augment = FRePoAugment(STRATEGY_WITH_FLIP, SIZE)
    generator = _generator(5)
    counts = {family: 0 for family in FAMILIES}
    for _ in range(1200):
        counts[augment.draw(4, generator).family] += 1
    # 200 expected per family; 5 binomial std devs is about 65.
    assert all(130 < count < 270 for count in counts.values()), counts
    no_flip = FRePoAugment(STRATEGY_NO_FLIP, SIZE)
    assert {no_flip.draw(4, generator).family for _ in range(200)} == set(STRATEGY_NO_FLIP.split("_"))


# -- parameter ranges (seeded) -------------------------------------------------------------
def test_color_ranges():
    params = _draw_family("color").params
    assert params["brightness"].min() >= -0.25 and params["brightness"].max() <= 0.25
    for name in ("contrast", "saturation"):
        logs = params[name].log()
        assert logs.min() >= -0.25 - 1e-6 and logs.max() <= 0.25 + 1e-6
        assert logs.min() < -0.24 and logs.max() > 0.24  # the whole range is used
    assert params["brightness"].min() < -0.24 and params["brightness"].max() > 0.24


def test_crop_zoom_is_log_uniform_and_the_view_stays_inside_the_image():
    params = _draw_family("crop").params
    zoom = params["zoom"]
    assert zoom.min() >= 0.8 - 1e-6 and zoom.max() <= 1.25 + 1e-6
    # log-uniform: half of the mass on each side of zoom 1 (log 0.8 = -log 1.25).
    assert abs(float((zoom < 1).float().mean()) - 0.5) < 0.05
    limit = (28 * zoom - 28).abs() / 2
    for axis in ("offset_y", "offset_x"):
        assert (params[axis].abs() <= limit + 1e-5).all()
        assert (params[axis].abs() > 0.9 * limit).any()


def test_translate_is_a_continuous_shift_up_to_an_eighth():
    params = _draw_family("translate").params
    for axis in ("shift_y", "shift_x"):
        shift = params[axis]
        assert shift.abs().max() <= 3.5 + 1e-6 and shift.abs().max() > 3.4
        assert not torch.equal(shift, shift.round())


def test_cutout_hole_is_a_quarter_side_and_inside_the_image():
    params = _draw_family("cutout").params
    for axis in ("top", "left"):
        assert params[axis].min() == 0 and params[axis].max() == 28 - 7
    x = _images(batch=64, channels=1) + 10.0  # no pixel is 0 before the cutout
    draw = _draw_family("cutout", batch=64)
    out = FRePoAugment("cutout", SIZE).apply(x, draw)
    assert ((out == 0).sum(dim=(1, 2, 3)) == 49).all()
    for i in range(64):
        top, left = int(draw.params["top"][i]), int(draw.params["left"][i])
        assert (out[i, :, top:top + 7, left:left + 7] == 0).all()


def test_flip_mirrors_about_half_the_images():
    draw = _draw_family("flip")
    assert abs(float(draw.params["flip"].float().mean()) - 0.5) < 0.05
    x = _images(batch=200)
    draw = _draw_family("flip", batch=200)
    out = FRePoAugment("flip", SIZE).apply(x, draw)
    flipped = draw.params["flip"]
    assert torch.equal(out[flipped], x[flipped].flip(-1))
    assert torch.equal(out[~flipped], x[~flipped])


def test_rotate_angles_within_fifteen_degrees():
    angle = _draw_family("rotate").params["angle"]
    assert angle.abs().max() <= math.radians(15) + 1e-6 and angle.abs().max() > math.radians(14.9)


# -- the transforms --------------------------------------------------------------------------
def test_color_matches_the_rule_on_rgb_and_saturation_is_a_no_op_on_grey():
    x = _images(batch=6, channels=3)
    draw = _draw_family("color", batch=6)
    out = FRePoAugment("color", SIZE).apply(x, draw)
    b, c, s = (draw.params[k].view(-1, 1, 1, 1) for k in ("brightness", "contrast", "saturation"))
    y = x + b
    y = (y - y.mean(dim=(1, 2, 3), keepdim=True)) * c + y.mean(dim=(1, 2, 3), keepdim=True)
    y = (y - y.mean(dim=1, keepdim=True)) * s + y.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, y)
    grey = _images(batch=6, channels=1)
    grey_out = FRePoAugment("color", SIZE).apply(grey, draw)
    z = grey + b
    z = (z - z.mean(dim=(1, 2, 3), keepdim=True)) * c + z.mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(grey_out, z)


def _augmax_reference(image: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """augmax's resampling: input coordinates A (p - c) + t + c, bilinear, edge replication."""
    channels, height, width = image.shape
    centre = np.array([height / 2 - 0.5, width / 2 - 0.5]).reshape(2, 1, 1)
    grid = np.mgrid[0:height, 0:width].astype(np.float64) - centre
    coords = np.tensordot(matrix, grid, axes=1) + offset.reshape(2, 1, 1) + centre
    return np.stack([map_coordinates(image[k], coords, order=1, mode="nearest") for k in range(channels)])


def _reference_geometry(family: str, params: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    if family == "crop":
        z = float(params["zoom"][i])
        return np.eye(2) / z, np.array([float(params["offset_y"][i]), float(params["offset_x"][i])]) / z
    if family == "translate":
        return np.eye(2), -np.array([float(params["shift_y"][i]), float(params["shift_x"][i])])
    theta = float(params["angle"][i])
    return np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]]), np.zeros(2)


@pytest.mark.parametrize("family", ["crop", "translate", "rotate"])
@pytest.mark.parametrize("size", [(28, 28), (16, 24)])
def test_geometric_families_match_augmax_resampling(family, size):
    x = _images(batch=6, channels=2, size=size).double()
    draw = FRePoAugment(family, size).draw(6, _generator(3))
    out = FRePoAugment(family, size).apply(x, draw)
    for i in range(6):
        matrix, offset = _reference_geometry(family, draw.params, i)
        expected = _augmax_reference(x[i].numpy(), matrix, offset)
        np.testing.assert_allclose(out[i].numpy(), expected, rtol=1e-5, atol=1e-5)  # params are float32


def test_translate_by_whole_pixels_moves_the_content():
    x = _images(batch=1, channels=1)
    draw = FRePoDraw("translate", {"shift_y": torch.tensor([2.0]), "shift_x": torch.tensor([-3.0])})
    out = FRePoAugment("translate", SIZE).apply(x, draw)
    torch.testing.assert_close(out[0, 0, 2:, :-3], x[0, 0, :-2, 3:])
    torch.testing.assert_close(out[0, 0, :2, :-3], x[0, 0, :1, 3:].expand(2, -1))  # edge replicated


# -- batch-level properties ------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_parameters_are_drawn_per_image(family):
    draw = _draw_family(family, batch=64)
    for name, value in draw.params.items():
        assert value.shape == (64,), name
        assert value.unique().numel() > 1, name  # not one shared (Siamese) value
    x = _images(batch=1, channels=3).expand(64, -1, -1, -1).contiguous()
    out = FRePoAugment(family, SIZE).apply(x, draw)
    distinct = {tuple(o.flatten().tolist()) for o in out}
    assert len(distinct) > (1 if family == "flip" else 32)  # flip has two outcomes per image


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype_and_determinism(dtype):
    augment = FRePoAugment(STRATEGY_WITH_FLIP, SIZE)
    x = _images(batch=16).to(dtype)
    for seed in range(12):  # enough calls to meet every family
        first = augment(x, _generator(seed))
        second = augment(x, _generator(seed))
        assert first.shape == x.shape and first.dtype == dtype
        assert torch.equal(first, second)
    outs = [augment(x, _generator(seed)) for seed in range(6)]
    assert any(not torch.equal(outs[0], other) for other in outs[1:])


def test_the_input_batch_is_left_untouched():
    augment = FRePoAugment(STRATEGY_WITH_FLIP, SIZE)
    x = _images(batch=8)
    before = x.clone()
    generator = _generator(0)
    for _ in range(20):
        augment(x, generator)
    assert torch.equal(x, before)


def test_wrong_image_size_is_refused():
    with pytest.raises(ValueError):
        FRePoAugment("rotate", SIZE)(_images(size=(32, 32)), _generator())
