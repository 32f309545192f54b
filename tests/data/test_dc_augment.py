"""DC's own evaluation augmentation, checked against the official rules (PROTOCOL §2.1).

The reference functions below are written from the rules, pixel by pixel, independently of
the implementation (and of the official code).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import scipy.ndimage
import torch

from dd_bench.data.dc_augment import DCAugment, DCDraw
from dd_bench.errors import ConfigError
from dd_bench.seeding import make_generator


def _batch(seed: int = 0, n: int = 6, channels: int = 2, size: int = 12) -> torch.Tensor:
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _reference_crop(image: np.ndarray, offset: tuple[int, int], means: list[float], pad: int = 4) -> np.ndarray:
    channels, height, width = image.shape
    out = np.empty_like(image)
    for c in range(channels):
        for i in range(height):
            for j in range(width):
                src_i, src_j = i + offset[0] - pad, j + offset[1] - pad
                inside = 0 <= src_i < height and 0 <= src_j < width
                out[c, i, j] = image[c, src_i, src_j] if inside else means[c]
    return out


def _reference_scale(image: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    channels, height, width = image.shape
    resized = np.empty((channels, new_h, new_w), dtype=image.dtype)
    for i in range(new_h):  # nearest neighbour as PyTorch's default: src = floor(dst * in / out)
        for j in range(new_w):
            resized[:, i, j] = image[:, int(np.floor(i * height / new_h)), int(np.floor(j * width / new_w))]
    side = max(new_h, new_w, height, width)
    canvas = np.zeros((channels, side, side), dtype=image.dtype)
    top, left = (side - new_h) // 2, (side - new_w) // 2
    canvas[:, top : top + new_h, left : left + new_w] = resized
    top, left = (side - height) // 2, (side - width) // 2
    return canvas[:, top : top + height, left : left + width]


def test_each_operation_matches_the_rules_pixel_by_pixel():
    images = _batch()
    numpy_images = images.numpy()
    means = [float(numpy_images[:, c].mean()) for c in range(images.shape[1])]
    draws = [DCDraw("crop", (0, 7)), DCDraw("crop", (5, 2)), DCDraw("scale", (9, 14)), DCDraw("scale", (13, 10)),
             DCDraw("rotate", (-45,)), DCDraw("noise", (123,))]
    out = DCAugment("crop_scale_rotate_noise").apply(images, draws).numpy()
    np.testing.assert_allclose(out[0], _reference_crop(numpy_images[0], (0, 7), means), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[1], _reference_crop(numpy_images[1], (5, 2), means), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[2], _reference_scale(numpy_images[2], 9, 14), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out[3], _reference_scale(numpy_images[3], 13, 10), rtol=0, atol=1e-6)
    rotated = scipy.ndimage.rotate(numpy_images[4], -45, axes=(-2, -1), cval=float(np.mean(means)))  # cubic, reshape
    top, left = (rotated.shape[1] - 12) // 2, (rotated.shape[2] - 12) // 2
    np.testing.assert_allclose(out[4], rotated[:, top : top + 12, left : left + 12], rtol=0, atol=1e-5)
    noise = out[5] - numpy_images[5]
    assert 0 < np.abs(noise).max() < 0.01 and abs(noise.std() - 0.001) < 3e-4
    assert torch.equal(images, _batch()), "the input batch must be left as it was"


def test_draws_use_the_official_ranges():
    augment = DCAugment("crop_scale_rotate_noise")
    draws = augment.draw(4000, 28, make_generator(5))
    by_op: dict[str, list[tuple]] = {}
    for draw in draws:
        by_op.setdefault(draw.operation, []).append(draw.value)
    counts = Counter(d.operation for d in draws)
    assert set(counts) == {"crop", "scale", "rotate", "noise"} and min(counts.values()) > 850  # ~1000 each
    shifts = {offset - 4 for value in by_op["crop"] for offset in value}
    assert shifts == set(range(-4, 4))  # [-4, +3]: not symmetric
    angles = {value[0] for value in by_op["rotate"]}
    assert min(angles) == -45 and max(angles) == 44
    sizes = [size for value in by_op["scale"] for size in value]
    assert min(sizes) == int(0.8 * 28) and max(sizes) == int(1.2 * 28 - 1e-9) and len(set(sizes)) > 8


def test_one_operation_per_image_and_seeded():
    images = _batch(n=40)
    first = DCAugment("crop_scale_rotate")(images, make_generator(1))
    assert torch.equal(first, DCAugment("crop_scale_rotate")(images, make_generator(1)))
    assert not torch.equal(first, DCAugment("crop_scale_rotate")(images, make_generator(2)))
    draws = DCAugment("crop_scale_rotate").draw(40, 12, make_generator(1))
    assert len(draws) == 40 and all(d.operation in ("crop", "scale", "rotate") for d in draws)


def test_none_is_identity_and_unknown_ops_are_config_errors():
    images = _batch()
    assert DCAugment("none")(images, make_generator(0)) is images
    with pytest.raises(ConfigError, match="Unknown DC augmentation 'flip'"):
        DCAugment("crop_flip")
