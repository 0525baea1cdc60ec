"""The landscape lines' bracketing search: a few forward passes, and the best step of a dense grid.

And the cost counter the measurement benchmark uses (``landscape.cost``): FLOPs in forward+backward
passes, checked against the points the lines hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.cost import MeasurementCost
from landscape.measure import MeasureSettings, bracketed_line, measure_step
from tests._models import MLP, Quadratic, call_loss


def _line(loss_at, f0, g, S, **kw):
    calls = []

    def counted(steps):
        calls.append(len(steps))
        return loss_at(np.asarray(steps))

    s, loss = bracketed_line(counted, f0, g, S, **kw)
    return s, loss, sum(calls)


def test_a_quadratic_line_costs_two_forwards_and_finds_its_closed_form_minimiser():
    # ℓ(s) = f0 − g s + S s²/2: minimum at g/S exactly, back at f0 at 2g/S
    f0, g, S = 3.0, 0.7, 2.3
    s, loss, n = _line(lambda t: f0 - g * t + 0.5 * S * t * t, f0, g, S)
    best = s[np.argmin(loss)]
    assert best == pytest.approx(g / S, rel=1e-12)
    assert n == 2 and loss.max() > f0 and s[0] == 0 and loss[0] == f0


@pytest.mark.parametrize("c3, c4", [(0.4, 0.0), (-0.3, 0.5), (1.5, 2.0), (0.0, 6.0)])
def test_a_smooth_non_quadratic_line_matches_the_dense_grid_best_step(c3, c4):
    # the quadratic model (slope and curvature at 0) is off by the cubic and quartic terms
    f0, g, S = 1.0, 1.0, 1.0

    def ell(t):
        return f0 - g * t + 0.5 * S * t ** 2 + c3 * t ** 3 + c4 * t ** 4

    s, loss, n = _line(ell, f0, g, S)
    dense = np.linspace(0, s.max(), 400)
    ref = dense[np.argmin(ell(dense))]
    assert abs(s[np.argmin(loss)] - ref) <= 0.05 * ref
    assert loss.max() > f0 and n <= 9


def test_lines_on_a_tiny_model_match_a_dense_grid_and_show_the_rise():
    torch.manual_seed(0)
    model = MLP(3, 8, 2).double()
    x = torch.randn(32, 3, dtype=torch.float64)
    y = torch.randn(32, 2, dtype=torch.float64)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    p = obj.params()
    gen = torch.Generator().manual_seed(3)
    g = obj.grad()
    dirs = {"sgd": g, "sign": {k: v.sign() for k, v in g.items()}}
    for i in range(4):  # random directions, turned toward descent
        r = tree.randn_like(p, gen)
        dirs[f"r{i}"] = tree.axpy(1.0, r, tree.scale(g, 3 * float(tree.norm(r)) / float(tree.norm(g))))
    rows = measure_step(obj, 0, p, dirs, settings=MeasureSettings(cosine=False, smoothness=False))
    for r in rows["lines"]:
        u = dirs[r["direction"]]
        uhat = tree.scale(u, 1 / float(tree.norm(u)))
        dense = np.linspace(0, r["s"].max(), 400)
        ref_loss = obj.losses_along(uhat, dense, p)
        ref = dense[np.argmin(ref_loss)]
        assert abs(r["best_step"] - ref) <= 0.05 * ref, (r["direction"], r["best_step"], ref)
        assert r["loss"].max() > r["loss"][0]  # where the loss rises above its start
        assert len(r["s"]) - 1 <= 9


def test_an_ascent_direction_stops_once_the_rise_is_seen():
    s, loss, n = _line(lambda t: 1.0 + 0.5 * t + t * t, 1.0, -0.5, 2.0)
    assert s[np.argmin(loss)] == 0 and n == 2  # the first point, and one before it (line_min_before=1)


def test_batched_line_points_equal_one_at_a_time():
    torch.manual_seed(0)
    model = MLP(3, 8, 2).double()
    x, y = torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    u = tree.normalize(obj.grad())[0]
    steps = [0.0, 0.1, 0.3, 0.7, 1.1]
    one = obj.losses_along(u, steps, batch=1)
    many = obj.losses_along(u, steps, batch=4)
    assert obj._vmap_lines is True
    np.testing.assert_allclose(many, one, rtol=1e-13)


def test_the_cost_counter_counts_each_line_point_as_one_forward():
    torch.manual_seed(0)
    model = MLP(4, 16, 3)
    x, y = torch.randn(64, 4), torch.randn(64, 3)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    p = obj.params()
    gen = torch.Generator().manual_seed(1)
    g = obj.grad()
    dirs = {"sgd": g, **{f"r{i}": tree.axpy(1.0, tree.randn_like(p, gen), tree.scale(g, 10.0)) for i in range(3)}}
    x_next = tree.axpy(-0.1, g, p)
    st = MeasureSettings(coord_per_layer=2)
    obj.taylor_support()  # trace once, outside the count
    with MeasurementCost(obj, at=p) as cost:
        rows = measure_step(obj, 0, p, dirs, x_next=x_next, settings=st, progress=cost.progress)
    # forward: the products 4·16 + 16·3 per sample; backward: ∂W1 (4·16) and ∂W2, ∂h (2·16·3), no ∂x
    assert cost.forward_ratio == pytest.approx((64 + 48) / (64 + 48 + 64 + 96), rel=1e-12)
    points = sum(len(r["s"]) - 1 for r in rows["lines"])
    assert cost.phases["lines"] == pytest.approx(points * cost.forward_ratio, rel=1e-12)
    assert cost.phases["smoothness"] == pytest.approx(len(st.gammas) + 1, rel=1e-12)  # ∇f(x_t) reused
    assert cost.calls["no_grad"] >= points and math.isfinite(cost.total)


def test_quadratic_model_lines_in_a_measurement_cost_two_points():
    A = torch.diag(torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64))
    model = Quadratic(A, torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    obj = ls.Objective(model, call_loss, None)
    p = obj.params()
    g = obj.grad()
    rows = measure_step(obj, 0, p, {"sgd": g, "e": {"x": torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)}},
                        settings=MeasureSettings(cosine=False, smoothness=False))
    for r in rows["lines"]:
        sh = {q["direction"]: q for q in rows["sharpness"]}[r["direction"]]
        # f(x − sû) = f(x) − s·2xᵀAû + s²·ûᵀAû: the closed-form minimiser
        u = g["x"] if r["direction"] == "sgd" else torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)
        u = u / u.norm()
        xs = p["x"]
        closed = float(2 * xs @ A @ u / (2 * u @ A @ u))
        assert r["best_step"] == pytest.approx(closed, rel=1e-9)
        assert sh["best_step"] == pytest.approx(closed, rel=1e-9)
        assert len(r["s"]) == 3


@pytest.mark.parametrize("G, negS, q", [(1.0, 0.5, 0.01), (0.3, 2.0, 0.2), (2.0, 0.05, 0.0005)])
def test_a_descent_line_with_negative_curvature_matches_the_dense_grid(G, negS, q):
    # ℓ(s) = f0 − G s − |S| s²/2 + q s³: no quadratic minimum at 0, a minimum farther out
    f0 = 4.0

    def ell(t):
        return f0 - G * t - 0.5 * negS * t ** 2 + q * t ** 3

    s, loss, n = _line(ell, f0, G, -negS)
    dense = np.linspace(0, s.max(), 4000)
    ref = dense[np.argmin(ell(dense))]
    assert abs(s[np.argmin(loss)] - ref) <= 0.05 * ref
    assert loss.max() > f0 and n <= 9


@pytest.mark.parametrize("w, k, S", [(0.05, 0.01, -0.3), (0.2, 0.01, -2.0), (1.0, 0.002, -2.0), (3.0, 0.0005, None)])
def test_a_line_that_flattens_fast_matches_the_dense_grid(w, k, S):
    # the shape of a language model's lines at its first step: steep at 0, flat long before the
    # minimum (ℓ(s) = f0 − G·w·log(1 + s/w) + k s²), reported with a negative (shifted) curvature or
    # its true one (None). The search of the previous release missed these minima by 5–15%.
    f0, G = 4.3, 1.2
    S = G / w + 2 * k if S is None else S

    def ell(t):
        return f0 - G * w * np.log1p(t / w) + k * t ** 2

    s, loss, n = _line(ell, f0, G, S)
    dense = np.geomspace(1e-4, max(s.max(), 1e3), 40000)
    ref = dense[np.argmin(ell(dense))]
    assert abs(s[np.argmin(loss)] - ref) <= 0.05 * ref
    assert loss.max() > f0 and n <= 9
