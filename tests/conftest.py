"""Shared fixtures: tiny real data (the embedded MNIST sample) and a suite-file writer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from dd_bench.run.allocator import tune_cpu_allocator
from dd_bench.data import load_dataset


@pytest.fixture(scope="session", autouse=True)
def _harness_allocator():
    # The allocator setting execute_cell applies; set once up front so every test runs under it.
    tune_cpu_allocator()


@pytest.fixture(autouse=True)
def _few_threads():
    # Tests are many small ops; two threads avoid oversubscribing the 2-core CI machine.
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def mnist_sample():
    return load_dataset("mnist_sample")


@pytest.fixture(scope="session")
def tiny_data(mnist_sample):
    """20 training and 20 test images per class: enough for real assertions, fast on CPU."""
    return mnist_sample.subset(per_class=20, test_per_class=20)


TINY_SUITE = {
    "name": "tiny",
    "datasets": ["mnist_sample"],
    "ipc": [1],
    "seeds": [0],
    "budget": {"steps": 2},
    "protocol": {"model": "ConvNet", "epochs": 2, "runs": 1, "augment": "none", "test_batch_size": 500},
    "methods": ["random"],
}


@pytest.fixture
def write_suite(tmp_path: Path):
    """Write a suite dict (TINY_SUITE with overrides) to a YAML file and return its path."""

    def write(overrides: dict | None = None, name: str = "suite.yaml", raw: str | None = None) -> Path:
        path = tmp_path / name
        if raw is not None:
            path.write_text(raw)
            return path
        suite = dict(TINY_SUITE)
        suite.update(overrides or {})
        suite = {key: value for key, value in suite.items() if value is not None}  # None: leave the key out
        path.write_text(yaml.safe_dump(suite))
        return path

    return write
