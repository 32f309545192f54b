"""Kernel ridge regression and least squares: primal = dual, exact fits, the trace-scaled ridge."""

from __future__ import annotations

import logging

import pytest
import torch

from dd_bench.eval import krr
from dd_bench.eval.krr import krr_predict, least_squares, linear_krr_predict


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_least_squares_recovers_an_exact_linear_map_in_both_forms():
    features = torch.randn(200, 12, generator=_generator(), dtype=torch.float64)
    weights = torch.randn(12, 5, generator=_generator(1), dtype=torch.float64)
    targets = features @ weights
    for form in ("primal", "dual"):
        torch.testing.assert_close(least_squares(features, targets, reg=1e-12, form=form), weights, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("n, d", [(50, 20), (20, 50)])
def test_primal_and_dual_give_the_same_weights(n, d):
    features = torch.randn(n, d, generator=_generator(2), dtype=torch.float64)
    targets = torch.randn(n, 3, generator=_generator(3), dtype=torch.float64)
    primal = least_squares(features, targets, reg=0.1, form="primal")
    dual = least_squares(features, targets, reg=0.1, form="dual")
    torch.testing.assert_close(primal, dual, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(least_squares(features, targets, reg=0.1), primal)


def test_krr_predict_is_the_trace_scaled_ridge_formula_and_differentiable():
    support = torch.randn(8, 6, generator=_generator(4), dtype=torch.float64, requires_grad=True)
    query = torch.randn(5, 6, generator=_generator(5), dtype=torch.float64)
    labels = torch.randn(8, 3, generator=_generator(6), dtype=torch.float64)
    k_ss = support @ support.T
    ridge = 0.01 * torch.trace(k_ss) / 8
    expected = query @ support.T @ torch.linalg.inv(k_ss + ridge * torch.eye(8, dtype=torch.float64)) @ labels
    predicted = linear_krr_predict(query, support, labels, reg=0.01)
    torch.testing.assert_close(predicted, expected)
    predicted.sum().backward()
    assert support.grad is not None and torch.isfinite(support.grad).all()


def test_an_ill_conditioned_kernel_warns_once(caplog):
    krr._warned.clear()
    rank_one = torch.ones(6, 6)
    with caplog.at_level(logging.WARNING, logger="dd_bench.eval.krr"):
        krr_predict(torch.ones(2, 6), rank_one, torch.randn(6, 2), reg=1e-12)
        krr_predict(torch.ones(2, 6), rank_one, torch.randn(6, 2), reg=1e-12)
    assert sum("ill-conditioned" in r.message or "positive definite" in r.message for r in caplog.records) == 1
