"""Fixtures shared by the method tests: a small real problem, run single-threaded."""

import pytest
import torch

from dd_bench.data import load_dataset


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread, and on a shared 2-core machine OpenMP's
    barriers make every small op wait for a core. Function-scoped, so it runs after the
    top-level conftest's thread setting."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return load_dataset("mnist_sample").subset(per_class=40, test_per_class=30)
