"""Fixtures for the speed benchmarks: the papers' Fashion-MNIST setting (Debian's IDX files)."""

import pytest

from dd_bench.errors import DataMissingError


@pytest.fixture(scope="module")
def fashion_mnist():
    from dd_bench.data import load_dataset

    try:
        return load_dataset("fashion_mnist")
    except DataMissingError as error:
        pytest.skip(f"Fashion-MNIST is not installed: {error}")
