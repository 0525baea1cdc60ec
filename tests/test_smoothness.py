"""Tests of landscape.smoothness against closed forms and dense float64 references.

References: a quadratic ½xᵀAx (gradient Ax, Hessian A), exp (f″ = f′), separable functions (the
coordinate-wise secant slope is the second derivative), and dense ``numpy.linalg.eigvalsh`` /
``torch.autograd.functional.hessian`` for the robust smoothness.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from landscape import tree
from landscape.objective import Objective
from landscape.smoothness import (
    DEFAULT_GAMMAS,
    CoordinateSamples,
    coordinate_smoothness,
    fit_l0_l1,
    fit_per_layer,
    local_smoothness,
    robust_smoothness,
)

F64 = torch.float64


# ---------------------------------------------------------------------------------------------- fixtures
class Quadratic(nn.Module):
    """f(x) = ½ xᵀAx."""

    def __init__(self, a: np.ndarray, x0: np.ndarray | None = None) -> None:
        super().__init__()
        self.register_buffer("a", torch.as_tensor(a, dtype=F64))
        d = a.shape[0]
        self.x = nn.Parameter(torch.as_tensor(x0 if x0 is not None else np.ones(d), dtype=F64).clone())

    def forward(self, batch: object) -> torch.Tensor:
        return 0.5 * self.x @ self.a @ self.x


class Scalar(nn.Module):
    """f(x) = fn(x) for a 1-D parameter x."""

    def __init__(self, fn, x0: float = 0.0) -> None:
        super().__init__()
        self.fn = fn
        self.x = nn.Parameter(torch.tensor([x0], dtype=F64))

    def forward(self, batch: object) -> torch.Tensor:
        return self.fn(self.x).sum()


class Separable(nn.Module):
    """f = Σ_j φ(w_j) + Σ_j φ(b_j) over two parameter tensors ("layers")."""

    def __init__(self, phi_w, phi_b, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.phi_w, self.phi_b = phi_w, phi_b
        self.w = nn.Parameter(torch.randn(3, 4, generator=g, dtype=F64))
        self.b = nn.Parameter(torch.randn(5, generator=g, dtype=F64))

    def forward(self, batch: object) -> torch.Tensor:
        return self.phi_w(self.w).sum() + self.phi_b(self.b).sum()


def objective(module: nn.Module) -> Objective:
    return Objective(module, lambda m, b: m(b), None)


def point(obj: Objective, **values: np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        n: torch.as_tensor(values[n], dtype=F64).reshape(obj.params()[n].shape).clone() for n in obj.names
    }


def random_spd(d: int, rng: np.random.Generator, lo: float = 0.5, hi: float = 2.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * rng.uniform(lo, hi, d)) @ q.T


def assert_allclose(actual, expected, rtol, atol=0.0, what=""):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    bad = ~np.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=True)
    if bad.any():
        idx = np.flatnonzero(bad.reshape(-1))[:10]
        a, e = actual.reshape(-1)[idx], np.broadcast_to(expected, actual.shape).reshape(-1)[idx]
        raise AssertionError(
            f"{what}: entries {idx.tolist()} differ: actual {a}, expected {e}, ratio {a / e}"
        )


class CountingObjective:
    """Wraps an objective and counts gradient and HVP calls."""

    def __init__(self, obj: Objective) -> None:
        self.obj, self.names, self.dtype = obj, obj.names, obj.dtype
        self.n_grad = 0
        self.n_hvp = 0

    def params(self):
        return self.obj.params()

    def grad(self, at=None):
        self.n_grad += 1
        return self.obj.grad(at=at)

    def hvps(self, vs, at=None):
        self.n_hvp += len(vs)
        return self.obj.hvps(vs, at=at)


# ---------------------------------------------------------------------------------------------- L̂_t
def test_local_smoothness_quadratic_equals_Ad_over_d_for_every_gamma():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    a = a + a.T  # indefinite on purpose: the estimator is a norm ratio, sign-free
    obj = objective(Quadratic(a))
    x_t = point(obj, x=rng.standard_normal(6))
    x_next = point(obj, x=rng.standard_normal(6))
    d = (x_next["x"] - x_t["x"]).numpy()
    res = local_smoothness(obj, x_t, x_next)
    expected = np.linalg.norm(a @ d) / np.linalg.norm(d)
    assert_allclose(res.per_gamma, np.full(5, expected), rtol=1e-12, what="per_gamma")
    assert res.l_hat == pytest.approx(expected, rel=1e-12)
    assert res.grad_norm == pytest.approx(np.linalg.norm(a @ x_t["x"].numpy()), rel=1e-12)
    assert res.step_norm == pytest.approx(np.linalg.norm(d), rel=1e-12)
    assert_allclose(res.gammas, DEFAULT_GAMMAS, rtol=0, what="gammas")


def test_local_smoothness_takes_the_max_over_gammas():
    # f = exp(x), step d > 0: the ratio e^x (e^{γd} − 1)/(γd) grows with γ, so the max is at γ = 5/6
    obj = objective(Scalar(torch.exp))
    x0, dstep = 0.3, 0.5
    res = local_smoothness(obj, point(obj, x=[x0]), point(obj, x=[x0 + dstep]))
    expected = [math.exp(x0) * math.expm1(g * dstep) / (g * dstep) for g in DEFAULT_GAMMAS]
    assert_allclose(res.per_gamma, expected, rtol=1e-12, what="per_gamma")
    assert res.l_hat == pytest.approx(expected[-1], rel=1e-12)


def test_local_smoothness_reuses_grad_t():
    rng = np.random.default_rng(1)
    obj = objective(Quadratic(random_spd(4, rng)))
    x_t, x_next = point(obj, x=rng.standard_normal(4)), point(obj, x=rng.standard_normal(4))
    counting = CountingObjective(obj)
    plain = local_smoothness(counting, x_t, x_next)
    assert counting.n_grad == 6
    counting.n_grad = 0
    reused = local_smoothness(counting, x_t, x_next, grad_t=obj.grad(at=x_t))
    assert counting.n_grad == 5
    assert_allclose(reused.per_gamma, plain.per_gamma, rtol=1e-14, what="per_gamma")


def test_local_smoothness_zero_step_is_nan_and_cheap():
    obj = objective(Quadratic(np.eye(3)))
    counting = CountingObjective(obj)
    x = point(obj, x=[1.0, 2.0, 2.0])
    res = local_smoothness(counting, x, tree.clone(x))
    assert math.isnan(res.l_hat) and np.isnan(res.per_gamma).all()
    assert res.step_norm == 0.0
    assert res.grad_norm == pytest.approx(3.0)
    assert counting.n_grad == 1


def test_local_smoothness_preconditions():
    obj = objective(Quadratic(np.eye(2)))
    x = point(obj, x=[1.0, 2.0])
    with pytest.raises(ValueError, match="gammas"):
        local_smoothness(obj, x, x, gammas=(0.0, 0.5))
    with pytest.raises(ValueError, match="gammas"):
        local_smoothness(obj, x, x, gammas=())
    with pytest.raises(KeyError, match="lacks"):
        local_smoothness(obj, {}, x)
    extra = {**x, "not_measured": torch.zeros(1)}  # ignored: only objective.names are read
    assert math.isnan(local_smoothness(obj, extra, x).l_hat)
    with pytest.raises(ValueError, match="NaN"):
        local_smoothness(obj, x, {"x": torch.tensor([1.0, math.nan], dtype=F64)})


def _trajectory_samples(obj: Objective, xs: np.ndarray, step: float | np.ndarray):
    steps = np.broadcast_to(step, xs.shape)
    out = [local_smoothness(obj, point(obj, x=[x]), point(obj, x=[x + s])) for x, s in zip(xs, steps)]
    return np.array([r.grad_norm for r in out]), np.array([r.l_hat for r in out])


def test_exp_gives_l1_one_and_l0_zero():
    # f = exp: f″ = f′, the textbook (0, 1)-smooth function. For a step δ > 0 every sample lies on
    # the ray y = κ·x with κ = (e^{5δ/6} − 1)/(5δ/6) (the max is at γ = 5/6); steps δ < 0 fall below it.
    obj = objective(Scalar(torch.exp))
    xs = np.linspace(-2.0, 2.0, 21)
    delta = 1e-3
    g, l_hat = _trajectory_samples(obj, xs, np.where(np.arange(xs.size) % 2 == 0, delta, -delta))
    fit = fit_l0_l1(g, l_hat)
    kappa = math.expm1(5 * delta / 6) / (5 * delta / 6)
    assert fit.l1 == pytest.approx(kappa, rel=1e-9)
    assert fit.l1 == pytest.approx(1.0, rel=1e-3)
    assert fit.l0 == pytest.approx(0.0, abs=1e-9)
    assert fit.covered == 1.0 and fit.n == 21
    assert fit.pearson > 0.999 and fit.spearman == pytest.approx(1.0)


def test_pure_quadratic_gives_l0_six_and_l1_zero():
    obj = objective(Scalar(lambda x: 3 * x**2))
    g, l_hat = _trajectory_samples(obj, np.linspace(-2.0, 2.0, 15), 0.05)
    assert_allclose(l_hat, 6.0, rtol=1e-12, what="L̂ of 3x²")
    fit = fit_l0_l1(g, l_hat)
    assert fit.l0 == pytest.approx(6.0, rel=1e-9)
    assert fit.l1 == pytest.approx(0.0, abs=1e-9)


def test_quadratic_fixed_direction_envelope_is_flat_at_the_max():
    # L̂ = ‖Av‖/‖v‖ for steps along one direction v, whatever x_t: the envelope is L0 = that value, L1 = 0
    rng = np.random.default_rng(2)
    a = random_spd(5, rng)
    v = rng.standard_normal(5)
    obj = objective(Quadratic(a))
    samples = [
        local_smoothness(obj, point(obj, x=x), point(obj, x=x + s * v))
        for x, s in zip(rng.standard_normal((12, 5)) * 3, rng.uniform(0.01, 0.2, 12))
    ]
    fit = fit_l0_l1([r.grad_norm for r in samples], [r.l_hat for r in samples])
    expected = np.linalg.norm(a @ v) / np.linalg.norm(v)
    assert fit.l0 == pytest.approx(expected, rel=1e-9)
    assert fit.l0 == pytest.approx(max(r.l_hat for r in samples), rel=1e-12)
    assert fit.l1 == pytest.approx(0.0, abs=1e-9)


# ---------------------------------------------------------------------------------------------- fit_l0_l1
def _best_envelope_value(x: np.ndarray, y: np.ndarray, xbar: float | None = None) -> float:
    """Brute force: the lowest height at xbar (default mean(x)) of a line with L0, L1 ≥ 0 on or above
    every point. The optimum of a 2-variable LP is a vertex: a line through two points, or through
    one point with L0 = 0 or L1 = 0."""
    xbar = x.mean() if xbar is None else xbar
    cands = [(y.max(), 0.0)] + [(0.0, yi / xi) for xi, yi in zip(x, y) if xi > 0]
    for i, j in itertools.combinations(range(x.size), 2):
        if x[i] != x[j]:
            b = (y[j] - y[i]) / (x[j] - x[i])
            cands.append((y[i] - b * x[i], b))
    best = math.inf
    for a, b in cands:
        if a >= -1e-12 and b >= -1e-12 and np.all(a + b * x >= y - 1e-9):
            best = min(best, a + b * xbar)
    return best


@pytest.mark.parametrize("seed", range(5))
def test_fit_is_the_lowest_envelope_at_the_mean(seed):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.1, 5.0, 25)
    y = rng.uniform(0.5, 1.5, 25) * (1.0 + rng.uniform(0, 2) * x)
    fit = fit_l0_l1(x, y)
    assert fit.l0 >= 0 and fit.l1 >= 0
    assert np.all(y <= fit.bound(x) * (1 + 1e-9))
    assert fit.covered == 1.0 and fit.n_outside == 0
    best = _best_envelope_value(x, y)
    assert fit.l0 + fit.l1 * x.mean() == pytest.approx(best, rel=1e-7)
    assert fit.mean_gap == pytest.approx(best - y.mean(), rel=1e-6)


def test_fit_reports_correlations_and_least_squares():
    rng = np.random.default_rng(7)
    x = rng.uniform(0, 3, 40)
    y = 1 + 2 * x + rng.uniform(0, 1, 40)
    fit = fit_l0_l1(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert fit.ls_slope == pytest.approx(slope, rel=1e-12)
    assert fit.ls_intercept == pytest.approx(intercept, rel=1e-12)
    assert fit.pearson == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    ranks = lambda v: np.argsort(np.argsort(v))  # noqa: E731 - continuous data, no ties
    assert fit.spearman == pytest.approx(np.corrcoef(ranks(x), ranks(y))[0, 1], rel=1e-12)
    assert fit.x_range == (x.min(), x.max())


def test_fit_outliers_are_left_above():
    # points under y = 2 + 3x, two of them on it at the ends, plus one wild outlier in the middle
    rng = np.random.default_rng(3)
    x = np.concatenate([[0.0, 10.0], rng.uniform(0, 10, 47), [5.0]])
    y = 2 + 3 * x - np.concatenate([[0.0, 0.0], rng.uniform(0.1, 5.0, 47), [-200.0]])
    loose = fit_l0_l1(x, y)
    assert loose.covered == 1.0 and loose.l0 + 5 * loose.l1 >= 217 - 1e-9
    robust = fit_l0_l1(x, y, outliers=0.02)  # ⌊0.02·50⌋ = 1 sample may stay above
    assert robust.l0 == pytest.approx(2.0, rel=1e-9)
    assert robust.l1 == pytest.approx(3.0, rel=1e-9)
    assert robust.n_outside == 1 and robust.covered == pytest.approx(49 / 50)
    assert robust.mean_gap < loose.mean_gap


@pytest.mark.parametrize("seed", range(4))
def test_fit_with_one_outlier_is_the_best_single_removal(seed):
    rng = np.random.default_rng(20 + seed)
    x = rng.uniform(0.0, 4.0, 20)
    y = rng.uniform(0.2, 1.0, 20) * (1 + x) + (rng.uniform(0, 1, 20) > 0.85) * rng.uniform(0, 6, 20)
    fit = fit_l0_l1(x, y, outliers=0.05)  # k = 1
    best = min(_best_envelope_value(np.delete(x, i), np.delete(y, i), x.mean()) for i in range(20))
    assert fit.l0 + fit.l1 * x.mean() == pytest.approx(best, rel=1e-9)
    assert fit.n_outside <= 1


@pytest.mark.parametrize("q", [0.05, 0.1, 0.2])
def test_fit_outlier_fraction_is_respected(q):
    rng = np.random.default_rng(11)
    x = rng.lognormal(0, 1, 60)
    y = rng.lognormal(0, 1, 60) * (1 + x)
    fit = fit_l0_l1(x, y, outliers=q)
    k = math.floor(q * 60 + 1e-9)
    assert fit.n_outside <= k
    assert fit.covered >= 1 - k / 60
    assert fit.mean_gap <= fit_l0_l1(x, y).mean_gap + 1e-12


def test_fit_degenerate_inputs():
    one = fit_l0_l1([2.0], [5.0])
    assert (one.l0, one.l1, one.n, one.covered) == (pytest.approx(5.0), pytest.approx(0.0), 1, 1.0)
    assert math.isnan(one.pearson) and math.isnan(one.ls_slope)

    same_x = fit_l0_l1([1.5, 1.5, 1.5], [1.0, 4.0, 2.0])
    assert same_x.l0 == pytest.approx(4.0) and same_x.l1 == pytest.approx(0.0, abs=1e-12)
    assert math.isnan(same_x.spearman)

    zeros = fit_l0_l1([0.0, 1.0, 2.0], [0.0, 0.0, 0.0])
    assert zeros.l0 == pytest.approx(0.0, abs=1e-12) and zeros.l1 == pytest.approx(0.0, abs=1e-12)

    with_nan = fit_l0_l1([1.0, math.nan, 2.0, 3.0, math.inf], [6.0, 1.0, math.nan, 6.0, 1.0])
    assert with_nan.n == 2 and with_nan.n_nonfinite == 3
    assert with_nan.l0 == pytest.approx(6.0) and with_nan.l1 == pytest.approx(0.0, abs=1e-12)

    for empty in (fit_l0_l1([], []), fit_l0_l1([math.nan], [1.0])):
        assert empty.n == 0 and math.isnan(empty.l0) and math.isnan(empty.l1) and math.isnan(empty.covered)

    with pytest.raises(ValueError, match="length"):
        fit_l0_l1([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        fit_l0_l1([1.0, -2.0], [1.0, 1.0])
    with pytest.raises(ValueError, match="outliers"):
        fit_l0_l1([1.0], [1.0], outliers=1.0)


def test_fit_is_scale_equivariant():
    rng = np.random.default_rng(5)
    x, y = rng.uniform(0, 1, 30), rng.uniform(0, 1, 30)
    base = fit_l0_l1(x, y)
    scaled = fit_l0_l1(1e4 * x, 1e-3 * y)
    assert scaled.l0 == pytest.approx(1e-3 * base.l0, rel=1e-7)
    assert scaled.l1 == pytest.approx(1e-7 * base.l1, rel=1e-7)


# ---------------------------------------------------------------------------------------------- coordinate-wise
def _separable_steps(obj: Objective, delta: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x_t = obj.params()
    signs = {n: torch.randint(0, 2, v.shape, generator=g).to(F64) * 2 - 1 for n, v in x_t.items()}
    return x_t, {n: x_t[n] + delta * signs[n] for n in x_t}


def test_coordinate_ratios_are_the_second_derivatives_of_a_separable_quadratic():
    a_w, a_b = 3.0, 0.5  # f = 1.5 Σ w² + 0.25 Σ b²: ∂_j f = a x_j, secant slope a exactly
    obj = objective(Separable(lambda w: 0.5 * a_w * w**2, lambda b: 0.5 * a_b * b**2))
    x_t, x_next = _separable_steps(obj, 0.3)
    out = coordinate_smoothness(obj, x_t, x_next, per_layer=5)
    assert list(out) == ["w", "b"]
    assert out["w"].index.size == 5 and out["w"].numel == 12
    assert out["b"].index.tolist() == [0, 1, 2, 3, 4]  # a tensor smaller than per_layer: all of it
    for name, a in (("w", a_w), ("b", a_b)):
        s = out[name]
        assert_allclose(s.ratio, a, rtol=1e-12, what=f"{name} ratio")
        x0 = x_t[name].reshape(-1)[s.index].numpy()
        x1 = x_next[name].reshape(-1)[s.index].numpy()
        assert_allclose(s.min_grad, np.minimum(np.abs(a * x0), np.abs(a * x1)), rtol=1e-12, what="min_grad")
        assert_allclose(s.delta_x, np.abs(x1 - x0), rtol=1e-12, what="delta_x")
        step_norm = math.sqrt(0.3**2 * 17)
        assert s.step_norm == pytest.approx(step_norm, rel=1e-12)
        assert_allclose(s.ratio_assumption2, a * 0.3 / step_norm, rtol=1e-12, what="Assumption 2 ratio")


def test_coordinate_ratios_match_second_derivative_of_a_nonquadratic_separable():
    # φ = exp: the secant slope of φ′ over a step δ is φ″(ξ), within a relative |δ| of φ″(x_t)
    delta = 1e-4
    obj = objective(Separable(torch.exp, lambda b: torch.cos(2 * b)))
    x_t, x_next = _separable_steps(obj, delta, seed=1)
    out = coordinate_smoothness(obj, x_t, x_next, per_layer=12)
    w = x_t["w"].reshape(-1)[out["w"].index].numpy()
    assert_allclose(out["w"].ratio, np.exp(w), rtol=2 * delta, what="exp″")
    b = x_t["b"].reshape(-1)[out["b"].index].numpy()
    assert_allclose(out["b"].ratio, np.abs(4 * np.cos(2 * b)), rtol=0, atol=8 * delta, what="|cos(2b)″|")


def test_coordinate_zero_steps_are_nan_in_place_and_indices_are_seeded():
    obj = objective(Separable(lambda w: w**2, lambda b: b**2))
    x_t = obj.params()
    x_next = {"w": x_t["w"].clone(), "b": x_t["b"] + 0.1}
    x_next["w"].view(-1)[:6] += 0.1  # half of w moves
    out = coordinate_smoothness(obj, x_t, x_next, per_layer=12, seed=3)
    moved = out["w"].index < 6
    assert np.isnan(out["w"].ratio[~moved]).all() and np.isfinite(out["w"].ratio[moved]).all()
    assert_allclose(out["w"].ratio[moved], 2.0, rtol=1e-12, what="ratio")
    assert out["w"].index.size == 12  # the slots stay; the fit drops the NaNs
    fits = fit_per_layer(out)
    assert fits["w"].n == 6 and fits["w"].n_nonfinite == 6

    again = coordinate_smoothness(obj, x_t, x_next, per_layer=4, seed=3)
    other = coordinate_smoothness(obj, x_t, x_next, per_layer=4, seed=4)
    assert np.array_equal(
        again["w"].index, coordinate_smoothness(obj, x_t, x_next, per_layer=4, seed=3)["w"].index
    )
    assert not np.array_equal(again["w"].index, other["w"].index)


def test_coordinate_smoothness_reuses_gradients():
    obj = objective(Separable(torch.exp, torch.exp))
    x_t, x_next = _separable_steps(obj, 0.01)
    counting = CountingObjective(obj)
    full = coordinate_smoothness(counting, x_t, x_next)
    assert counting.n_grad == 2
    counting.n_grad = 0
    reused = coordinate_smoothness(
        counting, x_t, x_next, grad_t=obj.grad(at=x_t), grad_next=obj.grad(at=x_next)
    )
    assert counting.n_grad == 0
    assert_allclose(reused["w"].ratio, full["w"].ratio, rtol=1e-14, what="ratio")
    with pytest.raises(ValueError, match="per_layer"):
        coordinate_smoothness(obj, x_t, x_next, per_layer=0)


def test_fit_per_layer_pools_steps_and_recovers_exp():
    # φ = exp with |δ| fixed: ratio / min_grad = (e^{|δ|} − 1)/|δ| for every coordinate and sign of δ
    delta = 0.02
    obj = objective(Separable(torch.exp, lambda b: torch.exp(b)))
    steps = []
    for s in range(2):
        x_t, x_next = _separable_steps(obj, delta, seed=s)
        x_t = {n: v + 0.5 * s for n, v in x_t.items()}
        x_next = {n: v + 0.5 * s for n, v in x_next.items()}
        steps.append(coordinate_smoothness(obj, x_t, x_next, per_layer=8))
    fits = fit_per_layer(steps)
    kappa = math.expm1(delta) / delta
    for name, expected_n in (("w", 16), ("b", 10)):
        assert fits[name].n == expected_n
        assert fits[name].l1 == pytest.approx(kappa, rel=1e-9)
        assert fits[name].l0 == pytest.approx(0.0, abs=1e-9)


def test_coordinate_samples_fields():
    s = CoordinateSamples(
        index=np.array([0]),
        ratio=np.array([1.0]),
        min_grad=np.array([1.0]),
        delta_grad=np.array([2.0]),
        delta_x=np.array([2.0]),
        step_norm=0.0,
        numel=1,
    )
    assert np.isnan(s.ratio_assumption2).all()


# ---------------------------------------------------------------------------------------------- robust smoothness
def bad_row_matrix(d: int, bad: list[int], rng: np.random.Generator, big: float = 60.0) -> np.ndarray:
    """Symmetric: a well-conditioned body (row norms ≈ 1) plus a few rows with a large diagonal and
    couplings, so their row norms sit far above 4 × the mean."""
    a = random_spd(d, rng, 0.5, 1.5)
    for j in bad:
        a[j, j] += big
        others = rng.choice([k for k in range(d) if k not in bad], 3, replace=False)
        a[j, others] += 2.0
        a[others, j] += 2.0
    return a


def test_robust_smoothness_matches_dense_eigvalsh_with_the_seed_rule():
    rng = np.random.default_rng(0)
    d, bad = 100, [7, 42, 77]
    a = bad_row_matrix(d, bad, rng)
    obj = objective(Quadratic(a))
    keep = np.setdiff1d(np.arange(d), bad)
    expected_l = np.linalg.eigvalsh(a)[-1]
    expected_ell = np.linalg.eigvalsh(a[np.ix_(keep, keep)])[-1]
    for method in ("exact", "hutchinson"):
        res = robust_smoothness(obj, row_norms=method, n_samples=64, tol=1e-10)
        assert res.n_removed == 3 and res.removed_per_layer == {"x": 3}
        removed = np.flatnonzero(res.row_norms["x"].numpy() >= res.threshold)
        assert removed.tolist() == bad
        assert res.top_eig == pytest.approx(expected_l, rel=1e-8)
        assert res.l_robust == pytest.approx(expected_ell, rel=1e-8)
        assert res.ratio == pytest.approx(expected_l / expected_ell, rel=1e-7)
        assert res.eps == pytest.approx(0.03) and res.n_params == d and res.converged
        assert res.criterion == "c=4" and res.row_norm_method == method
    assert res.n_samples == 64


def test_robust_smoothness_eps_rule_and_exact_row_norms():
    rng = np.random.default_rng(1)
    d = 60
    a = rng.standard_normal((d, d)) * rng.uniform(0.2, 3.0, d)  # rows of very different size
    a = a + a.T  # indefinite
    obj = objective(Quadratic(a))
    res = robust_smoothness(obj, eps=0.1, row_norms="exact", tol=1e-10)
    rows = np.linalg.norm(a, axis=1)
    assert_allclose(res.row_norms["x"].numpy(), rows, rtol=1e-12, what="exact row norms")
    top = np.argsort(-rows)[:6]
    keep = np.setdiff1d(np.arange(d), top)
    assert res.n_removed == 6 and res.eps == pytest.approx(0.1) and res.n_samples == 0
    assert res.threshold == pytest.approx(rows[top].min())
    assert res.top_eig == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-8)
    assert res.l_robust == pytest.approx(np.linalg.eigvalsh(a[np.ix_(keep, keep)])[-1], rel=1e-8)

    norm = robust_smoothness(obj, eps=0.1, row_norms="exact", spectrum="norm", tol=1e-10)
    assert norm.top_eig == pytest.approx(np.abs(np.linalg.eigvalsh(a)).max(), rel=1e-8)
    assert norm.l_robust == pytest.approx(np.abs(np.linalg.eigvalsh(a[np.ix_(keep, keep)])).max(), rel=1e-8)


def test_robust_smoothness_dense_path_for_small_problems():
    rng = np.random.default_rng(2)
    a = bad_row_matrix(20, [3], rng, big=30.0)
    res = robust_smoothness(objective(Quadratic(a)), row_norms="exact")
    keep = np.setdiff1d(np.arange(20), [3])
    assert res.n_removed == 1
    assert res.top_eig == pytest.approx(np.linalg.eigvalsh(a)[-1], rel=1e-12)
    assert res.l_robust == pytest.approx(np.linalg.eigvalsh(a[np.ix_(keep, keep)])[-1], rel=1e-12)


def test_hutchinson_row_norms_converge_to_the_exact_ones():
    rng = np.random.default_rng(3)
    d = 30
    a = rng.standard_normal((d, d))
    a = a + a.T
    obj = objective(Quadratic(a))
    exact_sq = np.linalg.norm(a, axis=1) ** 2
    errors = []
    for n in (4, 64, 1024):
        res = robust_smoothness(obj, n_samples=n, hvp_batch=64, seed=0)
        est_sq = res.row_norms["x"].numpy() ** 2
        errors.append(np.abs(est_sq / exact_sq - 1).mean())
    # relative error of the squared norms ~ sqrt(2 (1 − Σ H_jk⁴/‖H_j‖⁴) / n): ≈ 0.7, 0.17, 0.04
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.08


def test_robust_smoothness_of_a_network_matches_a_dense_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    x, y = torch.randn(16, 4, dtype=F64), torch.randn(16, 2, dtype=F64)
    obj = Objective(model, lambda m, b: nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
    names = obj.names
    p0 = obj.params()

    def flat_loss(theta):
        params = tree.unflatten(theta, p0)
        return nn.functional.mse_loss(torch.func.functional_call(model, params, (x,)), y)

    h = torch.autograd.functional.hessian(flat_loss, tree.flatten(p0, names)).numpy()
    res = robust_smoothness(obj, eps=0.05, row_norms="exact", tol=1e-10)
    rows = np.linalg.norm(h, axis=1)
    assert_allclose(
        tree.flatten(res.row_norms, names).numpy(), rows, rtol=1e-10, atol=1e-12, what="row norms"
    )
    keep = np.sort(np.argsort(-rows, kind="stable")[res.n_removed :])
    assert res.n_removed == math.floor(0.05 * h.shape[0])
    assert res.top_eig == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-7)
    assert res.l_robust == pytest.approx(np.linalg.eigvalsh(h[np.ix_(keep, keep)])[-1], rel=1e-7)
    assert sum(res.removed_per_layer.values()) == res.n_removed


def test_robust_smoothness_custom_operator_progress_and_nothing_removed():
    rng = np.random.default_rng(4)
    d = 40
    g = rng.standard_normal((d, 3))
    gn = g @ g.T  # a PSD "Gauss–Newton" operator, supplied by the caller
    obj = objective(Quadratic(np.eye(d)))
    gt = torch.as_tensor(gn)

    def hvps(vs):
        return [{"x": gt @ v["x"]} for v in vs]

    calls = []
    res = robust_smoothness(
        obj, eps=0.0, hvps=hvps, progress=lambda *a: calls.append(a), n_samples=8, hvp_batch=4
    )
    assert res.n_removed == 0 and res.eps == 0.0
    assert res.top_eig == pytest.approx(np.linalg.eigvalsh(gn)[-1], rel=1e-6)
    assert res.l_robust == res.top_eig and res.ratio == 1.0
    stages = {c[0] for c in calls}
    assert stages == {"row_norms", "top_eig"}
    assert ("row_norms", 8, 8) in calls


def test_robust_smoothness_counts_hvps_and_validates():
    obj = objective(Quadratic(np.diag(np.arange(1.0, 11.0))))
    counting = CountingObjective(obj)
    res = robust_smoothness(counting, n_samples=6, hvp_batch=4)
    assert res.n_hvps == counting.n_hvp
    assert res.n_removed == 0  # max row norm 10 < 4 × mean 5.5
    with pytest.raises(ValueError, match="c must be"):
        robust_smoothness(obj, c=1.0)
    with pytest.raises(ValueError, match="eps"):
        robust_smoothness(obj, eps=1.0)
    with pytest.raises(ValueError, match="row_norms"):
        robust_smoothness(obj, row_norms="dense")
    with pytest.raises(ValueError, match="spectrum"):
        robust_smoothness(obj, spectrum="bottom")


def test_robust_smoothness_at_a_given_point():
    # the Hessian of Σ x⁴/12 is diag(x²): its top eigenvalue follows the point
    obj = objective(Scalar(lambda x: x**4 / 12))
    res = robust_smoothness(obj, at={"x": torch.tensor([3.0], dtype=F64)}, row_norms="exact")
    assert res.top_eig == pytest.approx(9.0, rel=1e-12)
