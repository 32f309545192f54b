"""The CPU fast path of the DD ConvNet: two slow PyTorch CPU kernels swapped for equivalent ones."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# Two PyTorch CPU kernels are several times slower than equivalent formulations for these
# small nets (measured on the 2-core dev machine, side by side): oneDNN's convolution with 1-4
# input channels (PyTorch's own im2col + GEMM is ~8x faster for grey images, ~6x for RGB) and
# F.avg_pool2d (four strided adds are ~5x faster, forward and backward). Both replacements give
# the same values up to float rounding (~1e-6) and support double backward (DC needs it).
# NNPACK (Winograd) is never used: faster, but ~50x larger rounding error.
def cpu_features(features: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    x = standard_layout(x)
    for module in features:
        if isinstance(module, nn.Conv2d) and module.in_channels <= 4:
            with _native_cpu_convolution():
                x = module(x)
        elif isinstance(module, nn.AvgPool2d) and _is_plain_2x2(module):
            x = avg_pool_2x2(x)
        else:
            x = module(x)
    return x


def standard_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` with row-major (NCHW) strides. DSA's crop can return channels-last strides, and for
    one-channel images ``contiguous()`` keeps them (they already count as contiguous), so every
    conv after it would run channels-last, which is slower on the CPU."""
    expected, step = [], 1
    for size in reversed(x.shape):
        expected.append(step)
        step *= size
    if x.stride() == tuple(reversed(expected)):
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _is_plain_2x2(pool: nn.AvgPool2d) -> bool:
    def pair(v: Any) -> tuple:
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    return (pair(pool.kernel_size) == (2, 2) and pair(pool.stride) == (2, 2) and pair(pool.padding) == (0, 0)
            and not pool.ceil_mode)


def avg_pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """``F.avg_pool2d(x, 2)`` (odd edges dropped) as strided adds: same values up to rounding."""
    height, width = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2
    x = x[..., :height, :width]
    rows = x[..., 0::2, :] + x[..., 1::2, :]
    return (rows[..., 0::2] + rows[..., 1::2]) * 0.25


@contextlib.contextmanager
def _native_cpu_convolution() -> Iterator[None]:
    """Route CPU convolutions to PyTorch's im2col + GEMM (not oneDNN, not NNPACK) in this block."""
    mkldnn_was = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        with torch.backends.nnpack.flags(enabled=False):
            yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn_was
