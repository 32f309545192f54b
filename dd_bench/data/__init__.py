"""Data: datasets as normalised class-indexed tensors, ZCA whitening, and the augmentations the
papers train and evaluate with (DSA on Kornia, DC's own).

``load_dataset(name, ...)`` and the ``DATASETS`` registry are the public surface; importing
this package registers the built-in loaders.
"""

from dd_bench.data import loaders  # noqa: F401  (registers the built-in datasets)
from dd_bench.data.dataset import DATASETS, Dataset, RawSplits, clear_cache, load_dataset, register_dataset
from dd_bench.data.zca import ZCA

__all__ = ["DATASETS", "Dataset", "RawSplits", "ZCA", "clear_cache", "load_dataset", "register_dataset"]
