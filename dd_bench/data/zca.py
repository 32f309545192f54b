"""Regularised ZCA whitening of flattened images (PROTOCOL §2.3): FRePo/RFAD's trace-scaled
rule and the eigenvalue rule of Kornia's ``ZCAWhitening`` that MTT uses."""

from __future__ import annotations

import torch
from torch import Tensor

from dd_bench.errors import ConfigError


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
