"""The CPU allocator setting: freed large buffers are reused instead of mapped and faulted in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from dd_bench.run import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc only")

# Allocates and frees a 64 MiB tensor (above glibc's largest mmap threshold) 20 times, after
# ten warm-up rounds in which the heap settles, and reports the page faults that cost.
_PROBE = """
import json, resource, torch
from dd_bench.run.allocator import tune_cpu_allocator
state = tune_cpu_allocator()
for _ in range(10):
    torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(2**24)
print(json.dumps({"state": state, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_heap_only_reuses_freed_buffers_instead_of_faulting_them_in():
    tuned = _probe()
    default = _probe(DD_BENCH_MALLOC="default")
    assert tuned["state"].startswith("glibc heap-only")
    assert default["state"] == "default (DD_BENCH_MALLOC)"
    # Default glibc maps each 64 MiB buffer afresh: 16,384 first-touch faults per allocation.
    assert default["faults"] > 20 * 10_000
    assert tuned["faults"] < default["faults"] / 50


def test_worker_environment_matches_and_opt_out_empties_it(monkeypatch):
    env = allocator.allocator_env()
    assert env["MALLOC_MMAP_MAX_"] == "0" and env["MALLOC_ARENA_MAX"] == "1"
    monkeypatch.setenv("DD_BENCH_MALLOC", "default")
    assert allocator.allocator_env() == {}


def test_results_record_the_setting():
    from dd_bench.run.measure import environment

    assert environment()["cpu_allocator"] == allocator.allocator_state() != "default"


def test_a_late_thread_says_its_arena_is_excepted(monkeypatch):
    import threading

    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    seen = []
    worker = threading.Thread(target=lambda: seen.append(allocator.tune_cpu_allocator()))
    worker.start()
    worker.join()
    assert seen[0].endswith("this thread's own arena excepted")
