"""Tests for dd_bench.data: the embedded MNIST sample, class indexing, ZCA, errors, Debian Fashion-MNIST."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dd_bench.data import DATASETS, ZCA, Dataset, load_dataset
from dd_bench.data.dataset import DSA_NO_FLIP, DSA_WITH_FLIP
from dd_bench.data.loaders import DEBIAN_FASHION_MNIST, PROTOCOL_CONSTANTS
from dd_bench.errors import DataMissingError, UnknownNameError


@pytest.fixture(scope="module")
def sample() -> Dataset:
    return load_dataset("mnist_sample")


def test_mnist_sample_shapes_and_split(sample: Dataset) -> None:
    assert sample.name == "mnist_sample"
    assert sample.num_classes == 10 and sample.channels == 1 and sample.image_size == (28, 28)
    assert sample.train_images.shape == (4000, 1, 28, 28) and sample.train_images.dtype == torch.float32
    assert sample.test_images.shape == (1000, 1, 28, 28)
    assert sample.train_labels.dtype == torch.int64
    assert torch.bincount(sample.train_labels, minlength=10).tolist() == [400] * 10
    assert torch.bincount(sample.test_labels, minlength=10).tolist() == [100] * 10
    assert sample.mean == (0.1307,) and sample.std == (0.3081,)
    assert sample.dsa_strategy == DSA_NO_FLIP
    assert len(sample.class_names) == 10
    assert load_dataset("MNIST5K") is sample  # alias, case-insensitive, cached


def test_mnist_sample_split_is_deterministic_and_disjoint() -> None:
    loader = DATASETS.get("mnist_sample")
    first, second = loader(Path("unused"), False), loader(Path("unused"), False)
    assert torch.equal(first.train_images, second.train_images)
    assert torch.equal(first.test_labels, second.test_labels)
    train_rows = {row.numpy().tobytes() for row in first.train_images.flatten(1)}
    overlap = sum(row.numpy().tobytes() in train_rows for row in first.test_images.flatten(1))
    assert overlap == 0


def test_normalisation_matches_protocol_constants(sample: Dataset) -> None:
    # The MNIST constants come from the full set; a 5k sample of it lands close to mean 0, std 1.
    assert abs(sample.train_images.mean().item()) < 0.05
    assert abs(sample.train_images.std().item() - 1.0) < 0.05
    assert sample.train_images.min().item() == pytest.approx(-0.1307 / 0.3081, abs=1e-5)


def test_indices_by_class_consistent(sample: Dataset) -> None:
    indices = sample.indices_by_class
    assert indices is sample.indices_by_class  # cached
    assert sum(i.numel() for i in indices) == sample.train_labels.numel()
    for c, idx in enumerate(indices):
        assert idx.dtype == torch.int64
        assert (sample.train_labels[idx] == c).all()
        assert sample.class_count(c) == idx.numel() == 400
        assert torch.equal(sample.class_images(c), sample.train_images[idx])


def test_sample_real_reproducible_and_from_class(sample: Dataset) -> None:
    a = sample.sample_real(3, 16, torch.Generator().manual_seed(7))
    b = sample.sample_real(3, 16, torch.Generator().manual_seed(7))
    c = sample.sample_real(3, 16, torch.Generator().manual_seed(8))
    assert a.shape == (16, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    class_rows = {row.numpy().tobytes() for row in sample.class_images(3).flatten(1)}
    assert all(row.numpy().tobytes() in class_rows for row in a.flatten(1))
    # Without replacement: all distinct when n <= count; with replacement beyond it.
    everything = sample.sample_real(3, 400, torch.Generator().manual_seed(0))
    assert torch.unique(everything.flatten(1), dim=0).shape[0] == torch.unique(sample.class_images(3).flatten(1), dim=0).shape[0]
    assert sample.sample_real(3, 450).shape[0] == 450


def test_subset_sizes_and_fingerprint(sample: Dataset) -> None:
    small = sample.subset(5, test_per_class=3)
    assert small.train_images.shape == (50, 1, 28, 28)
    assert torch.bincount(small.train_labels, minlength=10).tolist() == [5] * 10
    assert torch.bincount(small.test_labels, minlength=10).tolist() == [3] * 10
    assert [small.class_count(c) for c in range(10)] == [5] * 10
    assert small.subset(2).test_labels.numel() == 30  # test set kept when test_per_class is None
    assert torch.equal(sample.subset(5, 3).train_images, small.train_images)  # seeded by default
    other = sample.subset(5, 3, generator=torch.Generator().manual_seed(1))
    assert len(small.fingerprint()) == 16
    assert small.fingerprint() == sample.subset(5, 3).fingerprint()
    assert len({sample.fingerprint(), small.fingerprint(), other.fingerprint()}) == 3
    record = small.describe()
    assert record["train_size"] == 50 and record["test_size"] == 30 and record["zca"] is False


def test_denormalise_inverts_normalisation(sample: Dataset) -> None:
    raw = DATASETS.get("mnist_sample")(Path("unused"), False)
    pixels = raw.train_images[:64].float() / 255.0
    assert torch.allclose(sample.denormalise(sample.train_images[:64]), pixels, atol=1e-5)


def test_zca_dataset_whitened_and_denormalises() -> None:
    whitened = load_dataset("mnist_sample", zca=True)
    assert whitened.zca is not None and whitened.describe()["zca"] is True
    assert whitened.fingerprint() != load_dataset("mnist_sample").fingerprint()
    raw = DATASETS.get("mnist_sample")(Path("unused"), False)
    back = whitened.denormalise(whitened.test_images[:32])
    assert torch.allclose(back, raw.test_images[:32].float() / 255.0, atol=1e-3)


@pytest.mark.parametrize("mode", ["trace", "kornia"])
def test_zca_whitens_and_round_trips(mode: str) -> None:
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(12, 12, generator=generator)
    x = (torch.randn(4000, 12, generator=generator) @ mixing + 3.0).reshape(4000, 3, 2, 2)
    zca = ZCA.fit(x, reg=1e-4, mode=mode)
    white = zca.transform(x).reshape(4000, -1).double()
    cov = torch.cov(white.T)
    assert torch.allclose(cov, torch.eye(12, dtype=cov.dtype), atol=0.02)
    assert white.mean(0).abs().max() < 1e-3
    assert torch.allclose(zca.inverse(zca.transform(x)), x, atol=1e-3)
    # ZCA (unlike PCA whitening) is symmetric: the closest whitening to the identity map.
    assert torch.allclose(zca.matrix, zca.matrix.T, atol=1e-5)


def test_zca_kornia_mode_matches_kornia() -> None:
    kornia = pytest.importorskip("kornia")
    x = torch.randn(300, 2, 3, 3, generator=torch.Generator().manual_seed(1)) * torch.linspace(0.2, 2.0, 18).view(1, 2, 3, 3)
    ours = ZCA.fit(x, reg=0.1, mode="kornia")
    theirs = kornia.enhance.ZCAWhitening(eps=0.1, compute_inv=True).fit(x)
    assert torch.allclose(ours.transform(x), theirs(x), atol=1e-4)


def test_unknown_dataset_lists_available() -> None:
    with pytest.raises(UnknownNameError) as info:
        load_dataset("imagenet-9000")
    message = str(info.value)
    assert "imagenet-9000" in message
    for name in ("mnist_sample", "cifar10", "fashion_mnist", "svhn"):
        assert name in message


def test_missing_data_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(DataMissingError) as info:
        load_dataset("cifar10", root=tmp_path, download=False)
    message = str(info.value)
    assert "cifar10" in message and str(tmp_path) in message and "download" in message
    assert "\n" not in message
    assert not any(tmp_path.iterdir())  # nothing was downloaded or created


def test_missing_fashion_mnist_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dd_bench.data.loaders.DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    with pytest.raises(DataMissingError) as info:
        load_dataset("fashion_mnist", root=tmp_path / "data")
    message = str(info.value)
    assert "fashion_mnist" in message and str(tmp_path / "data") in message
    assert "apt-get install dataset-fashion-mnist" in message and "\n" not in message


def test_protocol_constants_and_dsa_strategies() -> None:
    # PROTOCOL §2.2 (DC's constants) and §4 (no flip for digits).
    assert PROTOCOL_CONSTANTS["cifar10"][1] == (0.2023, 0.1994, 0.2010)
    assert PROTOCOL_CONSTANTS["fashion_mnist"][:2] == ((0.2861,), (0.3530,))
    strategies = {name: entry[2] for name, entry in PROTOCOL_CONSTANTS.items()}
    assert strategies == {
        "mnist": "color_crop_cutout_scale_rotate",
        "svhn": "color_crop_cutout_scale_rotate",
        "fashion_mnist": "color_crop_cutout_flip_scale_rotate",
        "cifar10": "color_crop_cutout_flip_scale_rotate",
        "cifar100": "color_crop_cutout_flip_scale_rotate",
    }
    assert set(strategies) | {"mnist_sample"} == set(DATASETS.names())


@pytest.mark.skipif(not DEBIAN_FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_idx(tmp_path: Path) -> None:
    data = load_dataset("fmnist", root=tmp_path)  # empty root: must come from the Debian files
    assert data.name == "fashion_mnist" and load_dataset("FashionMNIST", root=tmp_path) is data
    assert data.train_images.shape == (60000, 1, 28, 28) and data.test_images.shape == (10000, 1, 28, 28)
    assert torch.bincount(data.train_labels, minlength=10).tolist() == [6000] * 10
    assert torch.bincount(data.test_labels, minlength=10).tolist() == [1000] * 10
    assert data.dsa_strategy == DSA_WITH_FLIP and data.class_names[0] == "T-shirt/top"
    assert abs(data.train_images.mean().item()) < 0.01 and abs(data.train_images.std().item() - 1.0) < 0.01
