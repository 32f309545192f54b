"""Kernel ridge regression and regularised least squares, for kernel-based methods (FRePo, MGDD).

Two questions, one linear algebra:

- :func:`krr_predict` -- predict targets of query points from a support set with labels,
  ``ŷ_q = K_qs (K_ss + λ I)⁻¹ y_s`` (FRePo's meta-loss, MGDD's Eq. 1);
- :func:`least_squares` -- the weights ``W`` of ``features @ W ≈ targets`` (MGDD's Eq. 3,
  analytical labels), solved in whichever form is smaller: primal ``(FᵀF + λI)⁻¹ Fᵀ Y``
  (d×d) or dual ``Fᵀ (FFᵀ + λI)⁻¹ Y`` (n×n). The two are the same matrix for the same λ.

The ridge is trace-scaled, the convention of KIP, RFAD and FRePo: ``λ = reg · tr(K) / n`` with
``K`` the n×n Gram matrix, so ``reg`` does not depend on the feature scale. ``tr(FFᵀ) =
tr(FᵀF) = ‖F‖²``, so the primal form uses the same absolute λ and gives the same solution.

Solves go through a Cholesky factorisation (``torch.linalg.cholesky_ex``), never an explicit
inverse; both are differentiable. When the factorisation fails (the regularised matrix is not
numerically positive definite) the smallest diagonal jitter that makes it factorise is added
and a warning logged; a warning is also logged when the Cholesky factor's diagonal implies a
condition number beyond what the dtype resolves (about 1/eps). Solves run in at least float32; pass
float64 inputs for more headroom.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

_warned: set[str] = set()


def _warn_once(key: str, message: str, *args: object) -> None:
    # A solve runs every step; one warning per kind and process is enough to be noticed.
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def trace_scaled_ridge(gram: Tensor, reg: float) -> Tensor:
    """``reg · tr(gram) / n`` for an n×n Gram matrix (a 0-d tensor, differentiable)."""
    return reg * torch.diagonal(gram, dim1=-2, dim2=-1).sum(-1) / gram.shape[-1]


def solve_psd(matrix: Tensor, rhs: Tensor, ridge: Tensor | float) -> Tensor:
    """``(matrix + ridge·I)⁻¹ rhs`` for a symmetric positive semi-definite ``matrix``.

    Cholesky when the regularised matrix factorises, LU (with a warning) otherwise.
    """
    n = matrix.shape[-1]
    work_dtype = torch.promote_types(matrix.dtype, torch.float32)
    eye = torch.eye(n, dtype=work_dtype, device=matrix.device)
    regularised = matrix.to(work_dtype) + eye * (ridge if isinstance(ridge, float) else ridge.to(work_dtype))
    rhs_work = rhs.to(work_dtype)
    factor, info = torch.linalg.cholesky_ex(regularised)
    if bool((info != 0).any()):
        factor = _jittered_cholesky(regularised, eye)
    diagonal = torch.diagonal(factor, dim1=-2, dim2=-1).detach()
    condition = (diagonal.max() / diagonal.min().clamp_min(torch.finfo(work_dtype).tiny)) ** 2
    if float(condition) > 0.1 / torch.finfo(work_dtype).eps:
        _warn_once("cond", "krr: ill-conditioned %dx%d kernel (condition number about %.1e in %s); raise the ridge "
                   "`reg` or solve in float64", n, n, float(condition), str(work_dtype).replace("torch.", ""))
    return torch.cholesky_solve(rhs_work, factor).to(rhs.dtype)


def _jittered_cholesky(regularised: Tensor, eye: Tensor) -> Tensor:
    """Cholesky of a matrix that did not factorise: add the smallest jitter (growing tenfold from
    the dtype's resolution of its mean diagonal) that makes it positive definite, and say so."""
    scale = torch.diagonal(regularised, dim1=-2, dim2=-1).detach().abs().mean().clamp_min(1e-30)
    jitter = scale * torch.finfo(regularised.dtype).eps * 10
    for _ in range(12):
        factor, info = torch.linalg.cholesky_ex(regularised + eye * jitter)
        if not bool((info != 0).any()):
            _warn_once("jitter", "krr: the regularised %dx%d kernel is not numerically positive definite "
                       "(ill-conditioned); added %.2e to its diagonal (raise the ridge `reg`)", eye.shape[0],
                       eye.shape[0], float(jitter))
            return factor
        jitter = jitter * 10
    raise torch.linalg.LinAlgError(f"krr: the {eye.shape[0]}x{eye.shape[0]} kernel does not factorise even with "
                                   f"jitter {float(jitter):.2e}: it has NaN or Inf entries, or the ridge is far too small")


def krr_predict(kernel_query_support: Tensor, kernel_support: Tensor, targets_support: Tensor,
                reg: float = 1e-6) -> Tensor:
    """Kernel ridge regression: ``K_qs (K_ss + reg·tr(K_ss)/n · I)⁻¹ y_s``.

    Args:
        kernel_query_support: (q, n) kernel between query and support points.
        kernel_support: (n, n) kernel of the support set (symmetric, PSD).
        targets_support: (n, k) targets of the support points.
        reg: trace-scaled ridge (FRePo uses 1e-6).
    Returns:
        (q, k) predicted targets of the query points.
    """
    if kernel_support.shape[-1] != kernel_support.shape[-2] or kernel_support.shape[-1] != targets_support.shape[0]:
        raise ValueError(f"kernel_support {tuple(kernel_support.shape)} does not match targets "
                         f"{tuple(targets_support.shape)}")
    ridge = trace_scaled_ridge(kernel_support, reg)
    alpha = solve_psd(kernel_support, targets_support, ridge)
    return kernel_query_support.to(alpha.dtype) @ alpha


def linear_krr_predict(features_query: Tensor, features_support: Tensor, targets_support: Tensor,
                       reg: float = 1e-6) -> Tensor:
    """:func:`krr_predict` with the linear kernel of feature vectors: ``K = F Fᵀ``."""
    return krr_predict(features_query @ features_support.T, features_support @ features_support.T,
                       targets_support, reg)


def least_squares(features: Tensor, targets: Tensor, reg: float = 1e-6,
                  form: Literal["auto", "primal", "dual"] = "auto") -> Tensor:
    """Ridge least squares ``W`` (d, k) with ``features @ W ≈ targets``, trace-scaled ridge.

    ``primal`` solves the d×d system ``(FᵀF + λI) W = FᵀY``; ``dual`` the n×n system
    ``(FFᵀ + λI) A = Y`` and returns ``W = FᵀA``; ``auto`` picks the smaller one. Both use
    ``λ = reg · ‖F‖² / n`` (n samples), so they return the same ``W`` up to rounding.
    Features and targets may be large (all of a 60,000-image training set in the primal form:
    the d×d Gram matrix is accumulated as one matrix product).
    """
    n, d = features.shape
    if targets.shape[0] != n:
        raise ValueError(f"{n} feature rows but {targets.shape[0]} target rows")
    if form == "auto":
        form = "primal" if d <= n else "dual"
    ridge = reg * features.pow(2).sum() / n
    if form == "primal":
        gram = features.T @ features
        return solve_psd(gram, features.T @ targets, ridge)
    if form == "dual":
        gram = features @ features.T
        return features.T @ solve_psd(gram, targets, ridge)
    raise ValueError(f"form must be 'auto', 'primal' or 'dual', got {form!r}")
