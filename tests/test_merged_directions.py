"""Directions that are the same direction to float rounding (cosine ≥ 1 − merge_tol) are measured once:
their rows repeat the first one's numbers, say so in ``measured_as``, and keep their own norm and
histogram; distinct directions, however close, are measured apart."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.cost import MeasurementCost
from landscape.measure import MeasureSettings, measure_step
from tests._models import MLP

SETTINGS = dict(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=3, hist_bins=8, chunk=2)


def _setup():
    torch.manual_seed(0)
    model = MLP(3, 5, 2).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    p = obj.params()
    g = obj.grad()
    gen = torch.Generator().manual_seed(1)
    r = tree.randn_like(p, gen)
    # "near": 1 − cos ≈ 5e-7, a distinct direction that must be measured on its own
    near = tree.axpy(1e-3 * float(tree.norm(g)) / float(tree.norm(r)), r, g)
    dirs = {"sgd": g, "rand": r, "sgd_x3": tree.scale(g, 3.0), "near": near, "rand_half": tree.scale(r, 0.5)}
    return obj, p, dirs, tree.axpy(-0.05, g, p)


def _dense_sharpness(obj, p, u):
    x, y = obj.batches[0]
    flat = torch.cat([p[n].reshape(-1) for n in obj.names])

    def f(v):
        return F.mse_loss(torch.func.functional_call(obj.model, tree.unflatten(v, p), (x,)), y)

    H = torch.func.hessian(f)(flat)
    v = torch.cat([u[n].reshape(-1) for n in obj.names])
    v = v / v.norm()
    return float(v @ H @ v)


def test_proportional_directions_are_measured_once_with_their_own_norm_and_histogram():
    obj, p, dirs, x_next = _setup()
    merged = measure_step(obj, 2, p, dirs, x_next=x_next, settings=MeasureSettings(**SETTINGS))
    apart = measure_step(obj, 2, p, dirs, x_next=x_next, settings=MeasureSettings(**SETTINGS, merge_tol=0.0))
    sm = {r["direction"]: r for r in merged["sharpness"]}
    sa = {r["direction"]: r for r in apart["sharpness"]}
    assert sm["sgd_x3"]["measured_as"] == "sgd" and sm["rand_half"]["measured_as"] == "rand"
    for name in ("sgd", "rand", "near"):
        assert sm[name].get("measured_as") is None
    assert all(r.get("measured_as") is None for r in apart["sharpness"])
    # the merged rows hold the numbers a separate measurement gives (float64: to rounding)
    for name in dirs:
        for key in ("sharpness", "raw", "grad_correlation", "ratio_to_sgd", "best_step", "predicted_reduction"):
            a, b = sm[name][key], sa[name][key]
            if a is None or b is None:
                assert a is b, (name, key)
            else:
                assert a == pytest.approx(b, rel=1e-9, abs=1e-12), (name, key)
        assert sm[name]["update_norm"] == pytest.approx(float(tree.norm(dirs[name])), rel=1e-12)
        assert sm[name]["sharpness"] == pytest.approx(_dense_sharpness(obj, p, dirs[name]), rel=1e-8)
    assert sm["sgd_x3"]["update_norm"] == pytest.approx(3 * sm["sgd"]["update_norm"], rel=1e-12)
    # the near-identical but distinct direction has its own (different) sharpness
    assert sm["near"]["sharpness"] != sm["sgd"]["sharpness"]
    # lines: the same points along û; histograms: each direction's own magnitudes
    lm = {r["direction"]: r for r in merged["lines"]}
    np.testing.assert_array_equal(lm["sgd_x3"]["s"], lm["sgd"]["s"])
    assert lm["sgd_x3"]["measured_as"] == "sgd"
    la = {r["direction"]: r for r in apart["lines"]}
    assert lm["sgd_x3"]["best_step"] == pytest.approx(la["sgd_x3"]["best_step"], rel=0.05)
    hm = {r["direction"]: r for r in merged["histograms"]}
    np.testing.assert_allclose(hm["sgd_x3"]["edges"], hm["sgd"]["edges"] + math.log10(3), atol=1e-5)  # float32 log10
    np.testing.assert_array_equal(hm["sgd_x3"]["counts"], hm["sgd"]["counts"])
    # cosines are all still reported
    assert len(merged["cosine"]) == len(dirs) * (len(dirs) - 1) // 2


def test_merging_saves_the_merged_directions_passes():
    obj, p, dirs, x_next = _setup()
    distinct = {k: dirs[k] for k in ("sgd", "rand", "near")}
    costs = {}
    for label, ds, tol in (("merged", dirs, 1e-10), ("apart", dirs, 0.0), ("distinct", distinct, 0.0)):
        with MeasurementCost(obj, at=p) as cost:
            measure_step(obj, 2, p, ds, settings=MeasureSettings(**SETTINGS, merge_tol=tol, shift="always"),
                         progress=cost.progress)
        costs[label] = cost.phases
    # five directions, two of them repeats: the passes of the three distinct ones alone
    for phase in ("sharpness", "lines"):
        assert costs["merged"][phase] == pytest.approx(costs["distinct"][phase], rel=1e-9), phase
        assert costs["merged"][phase] < costs["apart"][phase], phase


def test_merge_tol_is_checked_and_recorded_only_when_not_the_default():
    with pytest.raises(ValueError, match="merge_tol"):
        MeasureSettings(merge_tol=-1e-3)
    with pytest.raises(ValueError, match="merge_tol"):
        MeasureSettings(merge_tol=True)
    assert "merge_tol" not in MeasureSettings().as_dict()
    assert MeasureSettings(merge_tol=0.0).as_dict()["merge_tol"] == 0.0
