"""Datasets as class-indexed, normalised in-memory tensors (PROTOCOL §2.2), optionally ZCA-whitened.

Every method consumes a :class:`Dataset`: train and test tensors in the normalised space
(PROTOCOL §2.2), optionally ZCA-whitened (PROTOCOL §2.3), with per-class indices and the
augmentation strategies the papers use for that dataset (DSA's, PROTOCOL §4; DC's own,
PROTOCOL §2.1). Loaders are registered in ``DATASETS`` (built-in ones in
``dd_bench.data.loaders``; others through the entry-point group ``dd_bench.datasets``) and
return raw images (:class:`RawSplits`); ``load_dataset`` does the rest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from torch import Tensor

from dd_bench.data.zca import ZCA
from dd_bench.errors import ConfigError
from dd_bench.registry import Registry

log = logging.getLogger(__name__)

Loader = Callable[[Path, bool], "RawSplits"]
DATASETS: Registry[Loader] = Registry("dataset", ("dd_bench.data.loaders",), entry_point_group="dd_bench.datasets")
register_dataset = DATASETS.register

# PROTOCOL §4: flip is left out for digits, where a mirrored digit is another (or no) digit.
DSA_NO_FLIP = "color_crop_cutout_scale_rotate"
DSA_WITH_FLIP = "color_crop_cutout_flip_scale_rotate"


@dataclass
class RawSplits:
    """What a registered loader returns: images (N, C, H, W) as uint8 or floats in [0, 1].

    ``mean``/``std`` are the channel-wise normalisation constants (PROTOCOL §2.2); when None,
    ``load_dataset`` computes them from the train split (for plugin datasets).
    ``dsa_strategy`` is the DSA strategy the papers use for the dataset (PROTOCOL §4);
    ``dc_strategy`` the strategy of DC's own evaluation augmentation (``get_daparam``:
    'crop_scale_rotate' for MNIST, else 'none').
    """

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    class_names: list[str]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dsa_strategy: str = DSA_WITH_FLIP
    dc_strategy: str = "none"


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
    dc_strategy: str = "none"
    zca: ZCA | None = None
    variant: str = "full"

    @cached_property
    def indices_by_class(self) -> list[Tensor]:
        """Train indices of each class, on the device of the images, computed once."""
        labels = self.train_labels.to(self.train_images.device)
        return [torch.nonzero(labels == c, as_tuple=True)[0] for c in range(self.num_classes)]

    def class_images(self, c: int) -> Tensor:
        return self.train_images[self.indices_by_class[c]]

    def class_count(self, c: int) -> int:
        return int(self.indices_by_class[c].numel())

    def sample_real(self, c: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` random train images of class ``c``; without replacement unless ``n`` exceeds the count."""
        indices = self.indices_by_class[c]
        count = indices.numel()
        if count == 0:
            raise ValueError(f"class {c} of dataset '{self.name}' has no train images")
        device = generator.device if generator is not None else torch.device("cpu")
        if n <= count:
            picks = torch.randperm(count, generator=generator, device=device)[:n]
        else:
            picks = torch.randint(count, (n,), generator=generator, device=device)
        # With a generator on the images' device (CUDA) this stays on the device: no host round trip.
        return self.train_images[indices[picks.to(indices.device)]]

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
    with a ZCA fit on the train split (PROTOCOL §2.3). Cached in-process.

    ``zca_mode="trace"`` (FRePo, RFAD) whitens after the mean/std normalisation;
    ``zca_mode="kornia"`` (MTT) whitens the raw [0, 1] pixels, as MTT's ``get_dataset`` does
    (ToTensor only, no Normalize, when ZCA is on): the dataset's mean/std are then 0 and 1.
    """
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
    if zca and zca_mode == "kornia":
        mean, std = (0.0,) * channels, (1.0,) * channels
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
        dc_strategy=raw.dc_strategy,
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
