"""Trace estimators: Hutchinson and Hutch++ converge to the exact trace (dense float64), Hutch++
faster on a decaying spectrum, with standard errors that describe their spread."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import landscape as ls
from tests._models import CASES, Quadratic, cached_dense, call_loss, classification_loss


def decaying_quadratic(d=60, power=2.0, seed=0):
    """f(x) = xᵀAx with A = Q diag(k^-power) Qᵀ: H = 2A, a spectrum that decays like a network's."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    lam = torch.arange(1, d + 1, dtype=torch.float64) ** -power
    A = q @ torch.diag(lam) @ q.T
    obj = ls.Objective(Quadratic(A, torch.zeros(d, dtype=torch.float64)), call_loss, None)
    return obj, float(2 * lam.sum())


def test_hutchpp_converges_faster_than_hutchinson_on_a_decaying_spectrum():
    obj, true = decaying_quadratic()
    budgets = (12, 48)
    seeds = range(24)
    rmse = {}
    with ls.HessianOperator(obj) as op:
        for name, fn in (("hutchinson", ls.hutchinson_trace), ("hutch++", ls.hutchpp_trace)):
            for m in budgets:
                errs = [fn(op, m, seed=s).mean - true for s in seeds]
                rmse[name, m] = math.sqrt(float(np.mean(np.square(errs))))
    for m in budgets:  # better at every budget ...
        assert rmse["hutch++", m] < 0.5 * rmse["hutchinson", m], rmse
    # ... and it improves faster with the budget: ~1/m against Hutchinson's 1/√m
    gain_pp = rmse["hutch++", 12] / rmse["hutch++", 48]
    gain_h = rmse["hutchinson", 12] / rmse["hutchinson", 48]
    assert gain_h == pytest.approx(2.0, rel=0.5)
    assert gain_pp > 1.5 * gain_h, rmse


def test_hutchpp_is_exact_when_the_sketch_spans_the_matrix():
    """With ⌊n/3⌋ ≥ d the sketch Q spans R^d: tr(QᵀAQ) is the trace and the residual term vanishes."""
    for curvature in ("hessian", "ggn"):
        model, batch, _, _ = CASES["mlp"]()
        obj = ls.Objective(model, classification_loss, batch)
        A = cached_dense("mlp", curvature)
        est = ls.hutchpp_trace(obj, 3 * A.shape[0], curvature=curvature, seed=3)
        assert est.mean == pytest.approx(float(torch.trace(A)), rel=1e-9, abs=1e-12)
        assert est.sketch == pytest.approx(float(torch.trace(A)), rel=1e-9, abs=1e-12)
        assert np.abs(est.samples).max() < 1e-9 and est.method == "hutch++" and est.curvature == curvature


def test_hutchinson_standard_error_describes_its_spread():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    for curvature in ("hessian", "ggn"):
        A = cached_dense("mlp", curvature)
        true = float(torch.trace(A))
        with ls.curvature_operator(obj, curvature) as op:
            ests = [ls.hutchinson_trace(op, 40, seed=s) for s in range(30)]
        means = np.array([e.mean for e in ests])
        stderr = np.mean([e.stderr for e in ests])
        # Rademacher: Var(zᵀAz) = 2 Σ_{i≠j} A_ij²
        off = A - torch.diag(torch.diag(A))
        assert stderr == pytest.approx(math.sqrt(2 * float((off**2).sum()) / 40), rel=0.2)
        assert means.std(ddof=1) == pytest.approx(stderr, rel=0.4)
        assert abs(means.mean() - true) < 4 * stderr / math.sqrt(len(ests))
        assert ests[0].n_products == 40 and ests[0].curvature == curvature
    with pytest.raises(ValueError, match="at least 3"):
        ls.hutchpp_trace(obj, 2)
    with pytest.raises(ValueError, match="distribution"):
        ls.hutchinson_trace(obj, 4, distribution="uniform")
