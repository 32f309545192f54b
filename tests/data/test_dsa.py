"""Tests for dd_bench.data.dsa: DSA families, Siamese sharing, per-image mode (PROTOCOL §4)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from dd_bench.data.dsa import DEFAULT_STRATEGY, DSA, FAMILIES, AugmentDraw, DSAParams, strategy_tokens
from dd_bench.errors import ConfigError

RANDOM_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
SHAPES = [(1, 28, 28), (3, 32, 32)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, *shape, generator=gen(seed))


# ------------------------------------------------------------------ strategy and config
def test_strategy_tokens_default_and_identity() -> None:
    assert strategy_tokens(DEFAULT_STRATEGY) == list(FAMILIES)
    assert strategy_tokens("color_crop_cutout_scale_rotate") == ["color", "crop", "cutout", "scale", "rotate"]
    for identity in ("none", "None", ""):
        assert strategy_tokens(identity) == []


@pytest.mark.parametrize(
    "strategy, named", [("colour_crop", "'colour'"), ("crop_Flip", "'Flip'"), ("crop__flip", "''"), ("crop_crop", "crop")]
)
def test_bad_strategy_raises_config_error_naming_token(strategy: str, named: str) -> None:
    with pytest.raises(ConfigError) as info:
        DSA(strategy)
    assert named in str(info.value)


def test_unknown_mode_and_bad_params() -> None:
    with pytest.raises(ConfigError, match="mode"):
        DSA("crop", mode="X")
    with pytest.raises(ConfigError, match="scale_ratio"):
        DSAParams(scale_ratio=0.8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        DSAParams().flip_prob = 1.0  # type: ignore[misc]


def test_paper_defaults() -> None:
    p = DSAParams()
    assert (p.scale_ratio, p.rotate_degrees, p.flip_prob) == (1.2, 15.0, 0.5)
    assert (p.brightness, p.saturation, p.contrast) == (1.0, 2.0, 0.5)
    assert (p.crop_ratio, p.cutout_ratio) == (0.125, 0.5)


@pytest.mark.parametrize("strategy", ["none", ""])
def test_identity_strategy(strategy: str) -> None:
    x = images(4, (3, 32, 32))
    dsa = DSA(strategy)
    assert torch.equal(dsa(x, gen(0)), x)
    real, syn = dsa.siamese(x, x[:1], gen(0))
    assert torch.equal(real, x) and torch.equal(syn, x[:1])
    assert dsa.draw(4, (32, 32), gen(0)).family == "none"


# ------------------------------------------------------------------ Siamese semantics
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("strategy", list(RANDOM_FAMILIES) + [DEFAULT_STRATEGY])
def test_siamese_same_transform_for_real_and_synthetic(strategy: str, shape: tuple[int, int, int]) -> None:
    dsa = DSA(strategy)
    shared = images(1, shape, seed=99)
    for seed in range(6):  # several seeds so flip takes both branches and several families occur
        real = images(7, shape, seed=2 * seed + 1)
        syn = images(3, shape, seed=2 * seed + 2)
        real[4], syn[1] = shared[0], shared[0]
        real_aug, syn_aug = dsa.siamese(real, syn, gen(seed))
        assert real_aug.shape == real.shape and syn_aug.shape == syn.shape
        assert torch.equal(real_aug[4], syn_aug[1])
        # ...and the whole batch shares the transform: the same draw applied alone agrees.
        draw = dsa.draw(1, shape[1:], gen(seed), siamese=True)
        assert torch.equal(dsa.apply(shared, draw)[0], syn_aug[1])


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_siamese_call_gives_identical_images_identical_outputs(family: str) -> None:
    x = images(1, (3, 32, 32)).expand(12, -1, -1, -1).contiguous()
    out = DSA(family)(x, gen(3), siamese=True)
    torch.testing.assert_close(out, out[:1].expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_per_image_mode_gives_identical_images_different_transforms(family: str) -> None:
    x = images(1, (3, 32, 32)).expand(32, -1, -1, -1).contiguous()
    out = DSA(family)(x, gen(5), siamese=False)
    differs = [not torch.equal(o, out[0]) for o in out[1:]]
    assert sum(differs) >= 8  # flip keeps about half the images as they were
    draw = DSA(family).draw(32, (32, 32), gen(5))
    assert all(v.shape[0] == 32 for v in draw.params.values()) and not draw.shared


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", RANDOM_FAMILIES)
@pytest.mark.parametrize("siamese", [False, True])
def test_every_family_passes_gradient_to_pixels(family: str, shape: tuple[int, int, int], siamese: bool) -> None:
    x = images(4, shape).requires_grad_(True)
    weights = images(4, shape, seed=1)
    for seed in range(3):
        x.grad = None
        (DSA(family)(x, gen(seed), siamese=siamese) * weights).sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        assert all(g.abs().sum() > 0 for g in x.grad)  # every image receives gradient


def test_siamese_pair_gradient_reaches_synthetic_images() -> None:
    real = images(16, (3, 32, 32))
    syn = images(2, (3, 32, 32), seed=1).requires_grad_(True)
    for seed in range(6):
        syn.grad = None
        real_aug, syn_aug = DSA().siamese(real, syn, gen(seed))
        ((syn_aug.mean(0) - real_aug.mean(0)) ** 2).sum().backward()
        assert syn.grad is not None and syn.grad.abs().sum() > 0


# ------------------------------------------------------------------ reproducibility
def test_same_seed_same_output_different_seed_differs() -> None:
    x = images(16, (3, 32, 32))
    dsa = DSA()
    torch.manual_seed(123)
    first = dsa(x, gen(7))
    torch.manual_seed(456)  # the global RNG must not matter when a generator is passed
    assert torch.equal(first, dsa(x, gen(7)))
    assert not torch.equal(first, dsa(x, gen(8)))
    pair_a, pair_b = dsa.siamese(x, x[:3], gen(11)), dsa.siamese(x, x[:3], gen(11))
    assert torch.equal(pair_a[0], pair_b[0]) and torch.equal(pair_a[1], pair_b[1])


def test_generator_leaves_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    DSA()(images(8, (1, 28, 28)), gen(0))
    DSA().siamese(images(8, (1, 28, 28)), images(2, (1, 28, 28)), gen(0))
    assert torch.equal(state, torch.get_rng_state())


# ------------------------------------------------------------------ parameter ranges
def test_parameter_ranges() -> None:
    n = 20_000
    draw = DSA("color_crop_cutout_flip_scale_rotate", mode="M").draw(n, (32, 32), gen(0))
    p = draw.params
    assert draw.families == tuple(FAMILIES)
    assert p["brightness_shift"].min() >= -0.5 and p["brightness_shift"].max() < 0.5
    assert p["saturation_factor"].min() >= 0.0 and p["saturation_factor"].max() < 2.0
    assert p["contrast_factor"].min() >= 0.5 and p["contrast_factor"].max() < 1.5
    for key in ("scale_x", "scale_y"):
        assert p[key].min() >= 1 / 1.2 - 1e-6 and p[key].max() <= 1.2 + 1e-6
    assert not torch.equal(p["scale_x"], p["scale_y"])  # independent draws
    assert p["angle_rad"].abs().max() <= math.radians(15) + 1e-6
    assert abs(p["flip"].float().mean().item() - 0.5) < 0.02
    for key in ("shift_y", "shift_x"):  # s = round(0.125 * 32) = 4, both ends reachable
        assert set(p[key].unique().tolist()) == set(range(-4, 5))
    for key in ("cut_center_y", "cut_center_x"):  # even side 16: centre in [0, 32]
        assert set(p[key].unique().tolist()) == set(range(0, 33))
    small = DSA("crop").draw(5000, (28, 28), gen(1)).params  # 28 * 0.125 = 3.5 rounds up to 4
    assert small["shift_y"].abs().max() == 4


def test_crop_is_integer_shift_with_zero_fill() -> None:
    x = images(1, (1, 32, 32)) + 10.0  # no pixel is zero
    draw = AugmentDraw(("crop",), {"shift_y": torch.tensor([2]), "shift_x": torch.tensor([-3])}, 1, (32, 32))
    out = DSA("crop").apply(x, draw)
    torch.testing.assert_close(out[0, 0, :30, 3:], x[0, 0, 2:, :29], rtol=0, atol=0)
    assert (out[0, 0, 30:] == 0).all() and (out[0, 0, :, :3] == 0).all()


@pytest.mark.parametrize("size, side", [(32, 16), (28, 14)])
def test_cutout_zeroes_one_square(size: int, side: int) -> None:
    x = images(1, (1, size, size)) + 10.0
    centre = torch.tensor([size // 2])
    draw = AugmentDraw(("cutout",), {"cut_center_y": centre, "cut_center_x": centre}, 1, (size, size))
    zeros = DSA("cutout").apply(x, draw)[0, 0] == 0
    assert zeros.sum() == side * side
    rows, cols = zeros.nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side


# ------------------------------------------------------------------ mode S
def test_flip_only_strategy_gives_x_or_mirror_per_image() -> None:
    x = images(64, (3, 32, 32))
    out = DSA("flip")(x, gen(0))
    flipped = [torch.equal(o, m) for o, m in zip(out, x.flip(-1))]
    kept = [torch.equal(o, i) for o, i in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)


def test_mode_s_draws_one_family_uniformly() -> None:
    dsa = DSA()
    counts = {f: 0 for f in FAMILIES}
    for seed in range(600):
        draw = dsa.draw(2, (32, 32), gen(seed), siamese=seed % 2 == 0)
        assert len(draw.families) == 1
        counts[draw.family] += 1
    assert all(60 < c < 140 for c in counts.values()), counts


# ------------------------------------------------------------------ shapes and devices
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", RANDOM_FAMILIES)
def test_batch_of_one_and_both_image_shapes(family: str, shape: tuple[int, int, int]) -> None:
    x = images(1, shape)
    dsa = DSA(family)
    assert dsa(x, gen(0)).shape == x.shape
    assert dsa(x, gen(0), siamese=True).shape == x.shape


def test_apply_rejects_mismatched_draw() -> None:
    dsa = DSA("crop")
    with pytest.raises(ValueError, match="per-image"):
        dsa.apply(images(4, (3, 32, 32)), dsa.draw(3, (32, 32), gen(0)))
    with pytest.raises(ValueError, match="image"):
        dsa.apply(images(3, (3, 32, 32)), dsa.draw(3, (28, 28), gen(0)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    x = images(8, (3, 32, 32))
    for family in RANDOM_FAMILIES:
        dsa = DSA(family)
        for siamese in (False, True):
            cpu = dsa(x, gen(4), siamese=siamese)
            gpu = dsa(x.cuda(), gen(4), siamese=siamese)
            assert gpu.device.type == "cuda"
            torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-4, atol=1e-4)
