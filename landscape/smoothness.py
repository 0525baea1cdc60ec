"""Smoothness along the training trajectory: the local estimate L̂_t, the (L0, L1) envelope fit, its
coordinate-wise form, and the "robust smoothness" left after removing a few bad coordinates.

Four measurements, each a function of an :class:`~landscape.objective.Objective` ``f`` (a loss on a
fixed probe batch as a function of the parameters ``x``, a ``dict[str, Tensor]``):

* :func:`local_smoothness` -- Crawshaw et al. (Crawshaw et al. 2022, §5.2, Fig. 1): along the real step
  ``d = x_{t+1} − x_t``, ``L̂_t = max_γ ‖∇f(x_t + γd) − ∇f(x_t)‖₂ / ‖γd‖₂``, γ ∈ {1/6, …, 5/6}.
* :func:`fit_l0_l1` -- the pair (L0, L1) ≥ 0 of the relaxed smoothness ``‖∇²f‖ ≤ L0 + L1‖∇f‖``
  (Crawshaw et al. 2022, Eq. 1) fitted as an *upper envelope* of the samples (L̂_t, ‖∇f(x_t)‖).
* :func:`coordinate_smoothness` / :func:`fit_per_layer` -- the coordinate-wise scatter of Crawshaw et al. 2022,
  Fig. 3 (and Assumption 2): ``|∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}|`` against
  ``min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|)`` for sampled coordinates of every parameter tensor.
* :func:`robust_smoothness` -- Pan & Li (Pan & Li 2023, §4.2, App. D, Table 8): the top eigenvalue L of the
  Hessian, and ℓ, the top eigenvalue of the Hessian restricted to the coordinates left after
  removing those with the largest Hessian row norms ``‖H_{j,:}‖₂``.

Every function is quiet and pure: the model is never modified (all evaluation goes through the
objective), and every random choice is seeded.

Example:
    >>> import torch, landscape as ls
    >>> from landscape.smoothness import local_smoothness, fit_l0_l1
    >>> model = torch.nn.Linear(3, 1).double()
    >>> batch = (torch.randn(16, 3, dtype=torch.float64), torch.randn(16, 1, dtype=torch.float64))
    >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batch)
    >>> x0 = obj.params()
    >>> x1 = {k: v - 0.1 * g for (k, v), g in zip(x0.items(), obj.grad().values())}
    >>> res = local_smoothness(obj, x0, x1)   # a quadratic: L̂ = ‖Hd‖/‖d‖ for every γ
    >>> bool(abs(res.per_gamma - res.l_hat).max() < 1e-8)
    True
"""

from __future__ import annotations

import contextlib
import math
import warnings
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import scipy.sparse.linalg
import scipy.stats
import torch
from torch import Tensor

from landscape import tree

__all__ = [
    "DEFAULT_GAMMAS",
    "CoordinateSamples",
    "L0L1Fit",
    "LocalSmoothness",
    "RobustSmoothness",
    "coordinate_smoothness",
    "fit_l0_l1",
    "fit_per_layer",
    "local_smoothness",
    "robust_smoothness",
]

Tree = dict[str, Tensor]

#: The sample locations of Crawshaw et al. 2022, §5.2: γ ∈ {1/6, 2/6, 3/6, 4/6, 5/6}.
DEFAULT_GAMMAS: tuple[float, ...] = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)

#: Below this many coordinates an eigenvalue is computed densely (n matrix-vector products and
#: ``numpy.linalg.eigvalsh``) instead of by ARPACK, which needs a dimension well above its Krylov size.
_DENSE_MAX = 32

#: ``row_norms="exact"`` costs one HVP per coordinate; refuse it beyond this many coordinates.
_EXACT_MAX = 20_000


class _ObjectiveLike(Protocol):
    """The part of :class:`landscape.objective.Objective` this module uses."""

    names: tuple[str, ...]

    def params(self) -> dict[str, Tensor]: ...

    def grad(self, at: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]: ...

    def hvps(
        self, vs: Sequence[Mapping[str, Tensor]], at: Mapping[str, Tensor] | None = None
    ) -> list[dict[str, Tensor]]: ...


Progress = Callable[[str, int, "int | None"], None]


# ---------------------------------------------------------------------------------------------- helpers
def _check_point(objective: _ObjectiveLike, x: Mapping[str, Tensor], what: str) -> None:
    """Every measured parameter present and finite. Extra keys (e.g. parameters the objective does
    not measure) are ignored: only ``objective.names`` are read."""
    names = tuple(objective.names)
    missing = [n for n in names if n not in x]
    if missing:
        raise KeyError(f"{what} lacks the measured parameters {missing} (keys must cover objective.names)")
    bad = [n for n in names if not bool(torch.isfinite(x[n]).all())]
    if bad:
        raise ValueError(f"{what} holds NaN or infinite values in {bad}")


def _restrict(objective: _ObjectiveLike, x: Mapping[str, Tensor]) -> Tree:
    """``x`` in ``objective.names`` order, detached, cast to the objective's dtype when it has one."""
    dtype = getattr(objective, "dtype", None)
    return {n: (x[n].detach().to(dtype) if dtype is not None else x[n].detach()) for n in objective.names}


def _float(t: Tensor | float) -> float:
    return float(t.item()) if isinstance(t, Tensor) else float(t)


# ---------------------------------------------------------------------------------------------- L̂_t
@dataclass(frozen=True)
class LocalSmoothness:
    """The local smoothness estimate of Crawshaw et al. 2022, §5.2, at one step.

    Attributes:
        l_hat: ``L̂_t = max_γ ‖∇f(x_t + γd) − ∇f(x_t)‖₂ / ‖γd‖₂`` (NaN for a zero step).
        grad_norm: ``‖∇f(x_t)‖₂``, the abscissa of Crawshaw et al. 2022, Fig. 1.
        step_norm: ``‖d‖₂ = ‖x_{t+1} − x_t‖₂``.
        per_gamma: the ratio at every γ, in the order of ``gammas``.
        gammas: the sample locations γ.
    """

    l_hat: float
    grad_norm: float
    step_norm: float
    per_gamma: np.ndarray
    gammas: np.ndarray


def local_smoothness(
    objective: _ObjectiveLike,
    x_t: Mapping[str, Tensor],
    x_next: Mapping[str, Tensor],
    gammas: Sequence[float] = DEFAULT_GAMMAS,
    grad_t: Mapping[str, Tensor] | None = None,
) -> LocalSmoothness:
    """Local gradient-Lipschitz estimate along the real training step (Crawshaw et al. 2022, §5.2, Fig. 1).

    With ``d = x_{t+1} − x_t``::

        L̂_t = max_{γ ∈ gammas} ‖∇f(x_t + γd) − ∇f(x_t)‖₂ / ‖γd‖₂

    Seed 001 follows Zhang et al. (2020, §H.3) with γ ∈ {1/6, …, 5/6}. On a quadratic ``½xᵀAx`` every
    ratio equals ``‖Ad‖/‖d‖``. Cost: ``len(gammas)`` gradients, plus one at ``x_t`` unless ``grad_t`` is
    given (pass the gradient the probe already has to save it).

    A zero step (``x_next == x_t``, e.g. a warm-up step with learning rate 0) is not an error: L̂ is
    undefined there, so ``l_hat`` and ``per_gamma`` are NaN and no gradient but ``∇f(x_t)`` is computed.
    :func:`fit_l0_l1` drops such samples. A non-finite point raises ``ValueError``.

    The gradient difference cancels catastrophically for tiny steps in float32: use an objective with
    ``dtype=torch.float64`` when steps are small relative to the parameters.

    Args:
        objective: the measured function (``landscape.Objective``).
        x_t: the parameters before the step, keyed by ``objective.names``.
        x_next: the parameters after the step.
        gammas: non-zero, finite sample locations along ``d``.
        grad_t: ``∇f(x_t)`` if already computed (keyed by ``objective.names``).

    Returns:
        A :class:`LocalSmoothness`.
    """
    gam = np.asarray(gammas, dtype=np.float64).reshape(-1)
    if gam.size == 0 or not np.all(np.isfinite(gam)) or np.any(gam == 0):
        raise ValueError(
            f"gammas must be a non-empty sequence of finite, non-zero numbers, got {list(gammas)}"
        )
    _check_point(objective, x_t, "x_t")
    _check_point(objective, x_next, "x_next")
    xt = _restrict(objective, x_t)
    d = tree.sub(_restrict(objective, x_next), xt)
    step_norm = _float(tree.norm(d))

    if grad_t is None:
        g_t = objective.grad(at=xt)
    else:
        _check_point(objective, grad_t, "grad_t")
        g_t = _restrict(objective, grad_t)
    grad_norm = _float(tree.norm(g_t))

    per_gamma = np.full(gam.size, np.nan)
    if step_norm > 0.0:
        for i, gamma in enumerate(gam):
            g = objective.grad(at=tree.axpy(float(gamma), d, xt))
            diff = tree.map(lambda a, b: a - b.to(a.dtype), g, g_t)
            per_gamma[i] = _float(tree.norm(diff)) / (abs(float(gamma)) * step_norm)
    l_hat = float(np.max(per_gamma)) if step_norm > 0.0 else math.nan
    return LocalSmoothness(
        l_hat=l_hat, grad_norm=grad_norm, step_norm=step_norm, per_gamma=per_gamma, gammas=gam
    )


# ---------------------------------------------------------------------------------------------- (L0, L1)
@dataclass(frozen=True)
class L0L1Fit:
    """An (L0, L1) upper envelope ``y ≤ L0 + L1·x`` of smoothness samples, and plain statistics.

    ``x`` is a gradient norm (or |∂_j f| for the coordinate-wise fit), ``y`` a smoothness estimate.

    Attributes:
        l0: intercept L0 ≥ 0 of the envelope (NaN when there are no finite samples).
        l1: slope L1 ≥ 0 of the envelope.
        n: finite samples used.
        n_outside: samples left above the envelope (at most ``⌊outliers·n⌋``).
        covered: fraction of the ``n`` samples on or below the envelope.
        mean_gap: mean of ``L0 + L1·x − y`` over the covered samples (the criterion; with
            ``outliers = 0`` the minimised mean gap).
        outliers: the fraction of samples the fit was allowed to leave above the envelope.
        pearson: Pearson correlation of (x, y) (NaN for n < 2 or a constant input).
        spearman: Spearman rank correlation of (x, y).
        ls_slope: ordinary least-squares slope of y on x, for comparison (not an envelope).
        ls_intercept: ordinary least-squares intercept.
        n_nonfinite: input pairs dropped because x or y was NaN or infinite.
        x_range: (min, max) of the finite x, the range over which the envelope is supported.
    """

    l0: float
    l1: float
    n: int
    n_outside: int
    covered: float
    mean_gap: float
    outliers: float
    pearson: float
    spearman: float
    ls_slope: float
    ls_intercept: float
    n_nonfinite: int
    x_range: tuple[float, float]

    def bound(self, x: float | np.ndarray) -> np.ndarray:
        """The envelope ``L0 + L1·x``."""
        return self.l0 + self.l1 * np.asarray(x, dtype=np.float64)


def _upper_hull(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices of the upper convex hull of the points' rising staircase, left to right (monotone chain)."""
    if np.any(np.diff(x) < 0):  # callers pass samples sorted by x; sort otherwise
        order = np.lexsort((y, x))
        x, y = x[order], y[order]
    xs, ys = x, y
    # only the rising staircase matters to a line of slope ≥ 0: a point with another at smaller or
    # equal x and higher or equal y lies under every such line over the latter (and the hull is short)
    rising = ys > np.maximum.accumulate(np.concatenate([[-np.inf], ys[:-1]]))
    xs, ys = xs[rising], ys[rising]
    last = np.append(xs[1:] != xs[:-1], True)  # the highest point of every distinct x
    xs, ys = xs[last], ys[last]
    hx: list[float] = []
    hy: list[float] = []
    for px, py in zip(xs.tolist(), ys.tolist()):
        while len(hx) >= 2 and (hx[-1] - hx[-2]) * (py - hy[-2]) - (hy[-1] - hy[-2]) * (px - hx[-2]) >= 0:
            hx.pop()
            hy.pop()
        hx.append(px)
        hy.append(py)
    return np.asarray(hx), np.asarray(hy)


def _envelope(x: np.ndarray, y: np.ndarray, xbar: float) -> tuple[float, float]:
    """Lowest (L0, L1) ≥ 0 with ``L0 + L1·x_i ≥ y_i`` for all i: minimise ``L0 + L1·xbar``.

    The linear program in closed form: for a slope b the least feasible intercept is
    ``a(b) = max(0, max_i(y_i − b·x_i))``, so the objective ``φ(b) = a(b) + b·xbar`` is convex and
    piecewise linear in b, with breakpoints at the slopes of the upper convex hull's edges and at the
    slope ``max_i y_i/x_i`` where ``a(b)`` reaches 0. A binary search over those candidates finds the
    smallest minimising slope (ties go to the flattest line). Exact up to rounding, unlike an LP
    solver's feasibility tolerance.
    """
    hx, hy = _upper_hull(x, y)
    if np.any((x == 0) & (y > 0)):
        b_zero = math.inf  # the intercept can never reach 0
    else:
        pos = x > 0
        b_zero = float(np.max(y[pos] / x[pos])) if pos.any() else 0.0
    slopes = np.diff(hy) / np.diff(hx) if hx.size > 1 else np.zeros(0)
    cands = np.concatenate([[0.0], slopes[(slopes > 0) & (slopes < b_zero)]])
    if math.isfinite(b_zero):
        cands = np.append(cands, b_zero)
    cands = np.unique(cands)

    def phi(b: float) -> float:
        return max(0.0, float(np.max(hy - b * hx))) + b * xbar

    lo, hi = 0, cands.size - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if phi(cands[mid]) <= phi(cands[mid + 1]):
            hi = mid
        else:
            lo = mid + 1
    b = float(cands[lo])
    a = max(0.0, float(np.max(y - b * x)))
    return a, b


def fit_l0_l1(
    grad_norms: Sequence[float] | np.ndarray,
    l_hats: Sequence[float] | np.ndarray,
    *,
    outliers: float = 0.0,
) -> L0L1Fit:
    """Fit the (L0, L1)-smoothness envelope ``L̂ ≤ L0 + L1·‖∇f‖`` (Crawshaw et al. 2022, Eq. 1 and Fig. 1).

    The relaxed smoothness condition is an *upper bound*, so the fit is an upper envelope, not a
    regression. Among all lines with ``L0 ≥ 0``, ``L1 ≥ 0`` lying on or above the samples, it takes
    the one with the smallest mean gap above them::

        minimise  (1/n) Σ_i (L0 + L1·x_i − y_i)  =  L0 + L1·x̄ − ȳ    subject to   L0 + L1·x_i ≥ y_i,

    a two-variable linear program: the line lowest at the mean gradient norm x̄, i.e. the tangent of
    the samples' upper convex hull at x̄ (clamped to L0, L1 ≥ 0), the tightest bound where the
    samples are. It is solved exactly from the hull in O(n log n) (no LP-solver tolerance). When
    several lines are optimal (every x equal, a single sample) the flattest one is taken, so samples
    that say nothing about growth with the gradient give ``L1 = 0`` and ``L0 = max y``.

    Robustness: with ``outliers = q > 0`` the line may leave up to ``k = ⌊q·n⌋`` samples above it,
    and minimises its height at the same x̄ (of all n samples). The k samples are chosen greedily:
    k times, among the samples touching the current envelope, the one whose removal lowers the
    height at x̄ most is dropped and the envelope refitted. Exact for k = 1 (only a touching sample
    can lower the line); for larger k a greedy approximation of the combinatorial optimum.

    Degenerate inputs: pairs with a NaN or infinite value are dropped (counted in ``n_nonfinite``);
    with no finite pair left every fitted number is NaN and ``n = 0``. Negative values raise
    ``ValueError`` (both are norms).

    Args:
        grad_norms: the abscissae ``x_i`` (gradient norms).
        l_hats: the ordinates ``y_i`` (smoothness estimates), same length.
        outliers: fraction in [0, 1) of samples allowed above the envelope (default 0: cover all).

    Returns:
        An :class:`L0L1Fit` with the envelope, the fraction covered, Pearson and Spearman
        correlations, and the least-squares line for comparison.
    """
    x_all = np.asarray(grad_norms, dtype=np.float64).reshape(-1)
    y_all = np.asarray(l_hats, dtype=np.float64).reshape(-1)
    if x_all.shape != y_all.shape:
        raise ValueError(f"grad_norms and l_hats differ in length: {x_all.size} vs {y_all.size}")
    if not (0.0 <= outliers < 1.0):
        raise ValueError(f"outliers must be a fraction in [0, 1), got {outliers}")
    finite = np.isfinite(x_all) & np.isfinite(y_all)
    x, y = x_all[finite], y_all[finite]
    if np.any(x < 0) or np.any(y < 0):
        raise ValueError("grad_norms and l_hats must be non-negative (they are norms)")
    n = int(x.size)
    n_nonfinite = int(x_all.size - n)
    if n == 0:
        nan = math.nan
        return L0L1Fit(nan, nan, 0, 0, nan, nan, outliers, nan, nan, nan, nan, n_nonfinite, (nan, nan))

    sx = float(x.max()) or 1.0
    sy = float(y.max()) or 1.0
    order = np.lexsort((y, x))  # sorted once: every envelope below works on sorted subsets
    xs, ys = x[order] / sx, y[order] / sy
    xbar = float(xs.mean())
    keep = np.ones(n, dtype=bool)
    a, b = _envelope(xs, ys, xbar)
    for _ in range(int(math.floor(outliers * n + 1e-9))):
        if keep.sum() <= 1:
            break
        idx = np.flatnonzero(keep)
        gap = a + b * xs[idx] - ys[idx]
        touching = idx[gap <= 1e-12]
        # at most a few samples prop up a two-parameter envelope; cap the candidates anyway
        touching = touching[np.argsort(-ys[touching], kind="stable")][:8]
        best: tuple[float, int, float, float] | None = None
        for j in touching:
            trial = keep.copy()
            trial[j] = False
            ta, tb = _envelope(xs[trial], ys[trial], xbar)
            height = ta + tb * xbar
            if best is None or height < best[0] - 1e-12:
                best = (height, int(j), ta, tb)
        if best is None:  # pragma: no cover - the optimum always touches a sample
            break
        keep[best[1]] = False
        a, b = best[2], best[3]

    l0, l1 = a * sy, b * sy / sx
    bound = l0 + l1 * x
    under = y <= bound + 1e-9 * (np.abs(bound) + sy)
    covered = float(np.mean(under))
    mean_gap = float(np.mean((bound - y)[under])) if under.any() else math.nan

    pearson = spearman = ls_slope = ls_intercept = math.nan
    if n >= 2 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        ls_slope, ls_intercept = float(slope), float(intercept)
        if np.ptp(y) > 0:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pearson = float(scipy.stats.pearsonr(x, y).statistic)
                spearman = float(scipy.stats.spearmanr(x, y).statistic)
    return L0L1Fit(
        l0=float(l0),
        l1=float(l1),
        n=n,
        n_outside=int(n - under.sum()),
        covered=covered,
        mean_gap=mean_gap,
        outliers=float(outliers),
        pearson=pearson,
        spearman=spearman,
        ls_slope=ls_slope,
        ls_intercept=ls_intercept,
        n_nonfinite=n_nonfinite,
        x_range=(float(x.min()), float(x.max())),
    )


# ---------------------------------------------------------------------------------------------- coordinate-wise
@dataclass(frozen=True)
class CoordinateSamples:
    """Coordinate-wise smoothness samples of one parameter tensor at one step (Crawshaw et al. 2022, Fig. 3).

    Arrays are aligned: entry i is about flat coordinate ``index[i]`` of the tensor. The coordinates
    depend only on (seed, parameter name, numel), so calls with the same seed follow the same
    coordinates along a run, as the seed's figure does ("a randomly picked coordinate").

    Attributes:
        index: flat indices of the sampled coordinates (sorted).
        ratio: ``|∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}|``; NaN where the step leaves the
            coordinate unchanged (0/0: nothing is measured there).
        min_grad: ``min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|)`` (Crawshaw et al. 2022 use the min because Assumption 2 is
            symmetric in x and y).
        delta_grad: ``|∂_j f(x_{t+1}) − ∂_j f(x_t)|``.
        delta_x: ``|x_{t+1,j} − x_{t,j}|``.
        step_norm: ``‖x_{t+1} − x_t‖₂`` over all measured coordinates: Assumption 2 divides
            ``delta_grad`` by this instead of ``delta_x`` (see :attr:`ratio_assumption2`).
        numel: number of coordinates of the tensor.
    """

    index: np.ndarray
    ratio: np.ndarray
    min_grad: np.ndarray
    delta_grad: np.ndarray
    delta_x: np.ndarray
    step_norm: float
    numel: int

    @property
    def ratio_assumption2(self) -> np.ndarray:
        """``|Δ∂_j f| / ‖Δx‖₂``, the left side of Crawshaw et al. 2022's Assumption 2 divided by the step norm."""
        return (
            self.delta_grad / self.step_norm if self.step_norm > 0 else np.full_like(self.delta_grad, np.nan)
        )


def _sample_indices(numel: int, k: int, seed: int, name: str) -> np.ndarray:
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(name.encode("utf-8"))])
    k = min(k, numel)
    return np.sort(rng.choice(numel, size=k, replace=False)).astype(np.int64)


def coordinate_smoothness(
    objective: _ObjectiveLike,
    x_t: Mapping[str, Tensor],
    x_next: Mapping[str, Tensor],
    *,
    per_layer: int = 16,
    seed: int = 0,
    grad_t: Mapping[str, Tensor] | None = None,
    grad_next: Mapping[str, Tensor] | None = None,
) -> dict[str, CoordinateSamples]:
    """Coordinate-wise smoothness samples along the real step (Crawshaw et al. 2022, §5.2 and Fig. 3).

    For ``per_layer`` coordinates j of every measured parameter tensor ("layer")::

        ratio_j    = |∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}|
        min_grad_j = min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|)

    Seed 001 plots ratio against min_grad per coordinate, coloured by iteration, to show that every
    layer has its own (L0, L1) pair (Assumption 2). The coordinates are drawn without replacement,
    seeded by ``(seed, parameter name)`` only, so repeated calls follow the same coordinates. A
    coordinate the step leaves unchanged gets ``ratio = NaN`` and keeps its slot (so arrays stay
    aligned across steps); :func:`fit_per_layer` drops it. For a separable f the ratio is the
    secant slope of ``∂_j f`` in ``x_j``, i.e. the second derivative at an intermediate point.

    Cost: two gradients (none if ``grad_t`` and ``grad_next`` are given).

    Args:
        objective: the measured function.
        x_t: parameters before the step, keyed by ``objective.names``.
        x_next: parameters after the step.
        per_layer: coordinates sampled per parameter tensor (all of them if the tensor is smaller).
        seed: selects the coordinates.
        grad_t: ``∇f(x_t)`` if already computed.
        grad_next: ``∇f(x_{t+1})`` if already computed.

    Returns:
        ``{parameter name: CoordinateSamples}`` in ``objective.names`` order.
    """
    if per_layer < 1:
        raise ValueError(f"per_layer must be a positive number of coordinates, got {per_layer}")
    _check_point(objective, x_t, "x_t")
    _check_point(objective, x_next, "x_next")
    xt, xn = _restrict(objective, x_t), _restrict(objective, x_next)
    if grad_t is None:
        grad_t = objective.grad(at=xt)
    else:
        _check_point(objective, grad_t, "grad_t")
    if grad_next is None:
        grad_next = objective.grad(at=xn)
    else:
        _check_point(objective, grad_next, "grad_next")
    step = tree.sub(xn, xt)
    step_norm = _float(tree.norm(step))

    out: dict[str, CoordinateSamples] = {}
    for name in objective.names:
        numel = xt[name].numel()
        idx = _sample_indices(numel, per_layer, seed, name)
        ti = torch.from_numpy(idx).to(xt[name].device)

        def pick(t: Tensor, ti: Tensor = ti) -> np.ndarray:
            return t.detach().reshape(-1).index_select(0, ti.to(t.device)).double().cpu().numpy()

        g0, g1, dx = pick(grad_t[name]), pick(grad_next[name]), np.abs(pick(step[name]))
        dg = np.abs(g1 - g0)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(dx > 0, dg / np.where(dx > 0, dx, 1.0), np.nan)
        out[name] = CoordinateSamples(
            index=idx,
            ratio=ratio,
            min_grad=np.minimum(np.abs(g0), np.abs(g1)),
            delta_grad=dg,
            delta_x=dx,
            step_norm=step_norm,
            numel=numel,
        )
    return out


def fit_per_layer(
    samples: Mapping[str, CoordinateSamples] | Iterable[Mapping[str, CoordinateSamples]],
    **fit_kwargs: Any,
) -> dict[str, L0L1Fit]:
    """(L0, L1) envelope of ``ratio`` against ``min_grad`` for every layer (Crawshaw et al. 2022, Fig. 3).

    Args:
        samples: the result of one :func:`coordinate_smoothness` call, or an iterable of them (e.g.
            one per measured step); samples of the same layer are pooled.
        **fit_kwargs: passed to :func:`fit_l0_l1` (e.g. ``outliers=0.01``).

    Returns:
        ``{layer: L0L1Fit}``. The fitted L0 is the intercept of the figure's scatter (its ratio uses
        ``|Δx_j|``); it is not the ``L0_j/√d`` of Assumption 2, whose ratio uses ``‖Δx‖₂``.
    """
    groups = [samples] if isinstance(samples, Mapping) else list(samples)
    pooled: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    for group in groups:
        for name, s in group.items():
            xs, ys = pooled.setdefault(name, ([], []))
            xs.append(np.asarray(s.min_grad, dtype=np.float64))
            ys.append(np.asarray(s.ratio, dtype=np.float64))
    return {
        name: fit_l0_l1(np.concatenate(xs), np.concatenate(ys), **fit_kwargs)
        for name, (xs, ys) in pooled.items()
    }


# ---------------------------------------------------------------------------------------------- robust smoothness
@dataclass(frozen=True)
class RobustSmoothness:
    """Robust smoothness (Pan & Li 2023, §4.2, Theorem 1, App. D, Table 8).

    Attributes:
        top_eig: L, the top eigenvalue of the Hessian (``spectrum="norm"``: its spectral norm).
        l_robust: ℓ, the same for the Hessian restricted to the kept coordinates ``H[S, S]``.
        ratio: ``L / ℓ`` (NaN when ℓ ≤ 0).
        eps: the fraction of coordinates actually removed, ``n_removed / n_params``.
        n_removed: number of coordinates removed.
        n_samples: Rademacher probes used to estimate the row norms (0 for ``row_norms="exact"``).
        n_params: number of measured coordinates d.
        threshold: the row-norm threshold: ``c·mean`` for the c-rule, else the smallest removed row norm.
        criterion: ``"c=4"`` (remove row norms ≥ c × mean, as the seed) or ``"eps=0.02"`` (top fraction).
        row_norm_method: ``"hutchinson"`` or ``"exact"``.
        spectrum: ``"top"`` (largest algebraic eigenvalue) or ``"norm"`` (largest magnitude).
        converged: whether both eigenvalue solves converged (ARPACK); the values are the best Ritz
            values either way.
        n_hvps: Hessian-vector products spent in total.
        removed_per_layer: removed coordinates per parameter tensor.
        row_norms: the (estimated) row norms ``‖H_{j,:}‖₂``, shaped like the parameters.
    """

    top_eig: float
    l_robust: float
    ratio: float
    eps: float
    n_removed: int
    n_samples: int
    n_params: int
    threshold: float
    criterion: str
    row_norm_method: str
    spectrum: str
    converged: bool
    n_hvps: int
    removed_per_layer: dict[str, int] = field(default_factory=dict)
    row_norms: dict[str, Tensor] = field(default_factory=dict, repr=False)


def _batched(seq: range, size: int) -> Iterable[range]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def _extreme_eigenvalue(
    matvec: Callable[[np.ndarray], np.ndarray],
    n: int,
    *,
    spectrum: str,
    tol: float,
    maxiter: int | None,
    ncv: int | None,
    seed: int,
) -> tuple[float, bool]:
    """Top (``"top"``) or largest-magnitude (``"norm"``, returned as |λ|) eigenvalue of a symmetric
    operator given by ``matvec`` on R^n: dense below :data:`_DENSE_MAX`, ARPACK Lanczos above."""
    if n == 0:
        return math.nan, True
    if n <= _DENSE_MAX:
        dense = np.column_stack([matvec(e) for e in np.eye(n)])
        w = np.linalg.eigvalsh(0.5 * (dense + dense.T))
        return (float(w[-1]) if spectrum == "top" else float(np.abs(w).max())), True
    op = scipy.sparse.linalg.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    which = "LA" if spectrum == "top" else "LM"
    try:
        w = scipy.sparse.linalg.eigsh(
            op, k=1, which=which, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0, return_eigenvectors=False
        )
        converged = True
    except scipy.sparse.linalg.ArpackNoConvergence as err:
        w = np.asarray(err.eigenvalues)
        converged = False
        if w.size == 0:
            return math.nan, False
    value = float(w.max()) if spectrum == "top" else float(np.abs(w).max())
    return value, converged


def robust_smoothness(
    objective: _ObjectiveLike,
    *,
    at: Mapping[str, Tensor] | None = None,
    eps: float | None = None,
    c: float = 4.0,
    row_norms: Literal["hutchinson", "exact"] = "hutchinson",
    n_samples: int = 32,
    hvp_batch: int = 8,
    seed: int = 0,
    spectrum: Literal["top", "norm"] = "top",
    tol: float = 1e-6,
    maxiter: int | None = None,
    ncv: int | None = None,
    hvps: Callable[[list[Tree]], list[Tree]] | None = None,
    progress: Progress | None = None,
    curvature: str = "hessian",
) -> RobustSmoothness:
    """Smoothness with the worst coordinates removed (Pan & Li 2023, §4.2, App. D, Table 8).

    Seed 002 conjectures that only a small fraction ε of coordinates has bad smoothness: with
    ``ℓ = ‖H[S, S]‖`` over the kept coordinates S, clipped SGD's directional sharpness is
    ``O(√ε·L + ℓ) ≪ L`` (Theorem 1). App. D measures it by removing "all the coordinates that the row
    norm is at least 4 times the mean of the row norms" (1–2.5 % of BERT's coordinates; L/ℓ ≈ 2–3).

    Steps:

    1. Row norms ``r_j = ‖H_{j,:}‖₂``. ``"hutchinson"`` (default): with Rademacher vectors z,
       ``E[(Hz)_j²] = Σ_k H_jk² = r_j²``, so ``r̂_j = sqrt(mean over n_samples of (Hz)_j²)``; the
       relative error of ``r̂_j²`` is about ``sqrt(2/n_samples)`` and vanishes as n_samples grows.
       ``"exact"``: ``r_j = ‖H e_j‖₂`` from one HVP per coordinate (tiny models and tests only).
    2. Removal: if ``eps`` is None, the seed's rule, every j with ``r_j ≥ c · mean(r)``; otherwise the
       ``⌊eps·d⌋`` coordinates with the largest row norms.
    3. ``L = λ_max(H)``; ``ℓ = λ_max(H[S, S])``, the Hessian restricted to the kept coordinates S (the
       masked operator ``P H P`` acting on S only, so removed coordinates add no spurious zero
       eigenvalues), both by Lanczos (``scipy.sparse.linalg.eigsh`` on a ``LinearOperator`` whose
       matvec is one HVP). Cauchy interlacing gives ``ℓ ≤ L``.

    The matrix: App. D approximates the Hessian by the Gauss–Newton matrix because that let the
    authors form it on BERT with k = 2 logits; their analysis (Theorem 1) and Table 8's caption are
    about the Hessian itself. Here the matrix is the true Hessian of the objective, consistent with
    every other curvature number of ``landscape``; ``curvature="ggn"`` computes it on the Gauss–Newton
    matrix as the paper does (with ``spectrum="norm"``, the paper's spectral norm, equal to the top
    eigenvalue for this positive semi-definite matrix); ``hvps`` takes any other symmetric operator.
    All products share one retained graph (:mod:`landscape.linops`). ``spectrum="top"`` (default) takes the largest algebraic
    eigenvalue; ``"norm"`` the spectral norm (largest |λ|), which is the seed's ``‖·‖₂`` and equals
    the top eigenvalue for a positive semi-definite matrix such as the Gauss–Newton.

    Cost: ``n_samples`` HVPs (``hvp_batch`` at a time, sharing one double-backward graph) plus two
    Lanczos runs of typically 20–100 HVPs each. ARPACK keeps ``ncv`` (default 20) float64 vectors of
    length d.

    Args:
        objective: the measured function.
        at: the point (default: the model's current parameters).
        eps: fraction of coordinates to remove; None uses the c × mean rule.
        c: the seed's multiple of the mean row norm (> 1); ignored when ``eps`` is given.
        row_norms: ``"hutchinson"`` (estimate) or ``"exact"`` (one HVP per coordinate).
        n_samples: Rademacher probes for the estimate.
        hvp_batch: HVPs per call of ``hvps`` (memory against speed).
        seed: seeds the probes and the Lanczos start vectors.
        spectrum: ``"top"`` or ``"norm"``, see above.
        tol: relative tolerance of the eigenvalues (ARPACK ``tol``).
        maxiter: ARPACK iteration limit (default 10·d); not converging is reported, not raised.
        ncv: Lanczos vectors kept by ARPACK (default 20).
        hvps: ``hvps(list of trees) -> list of trees``, a batched symmetric matrix-vector product
            replacing ``objective.hvps(vs, at=at)``.
        progress: called as ``progress(stage, done, total)`` with stage ``"row_norms"``,
            ``"top_eig"`` or ``"l_robust"`` (total None when unknown).
        curvature: ``"hessian"`` (default) or ``"ggn"`` (Pan & Li 2023, App. D's Gauss–Newton matrix).

    Returns:
        A :class:`RobustSmoothness`.
    """
    if row_norms not in ("hutchinson", "exact"):
        raise ValueError(f"row_norms must be 'hutchinson' or 'exact', got {row_norms!r}")
    if spectrum not in ("top", "norm"):
        raise ValueError(f"spectrum must be 'top' or 'norm', got {spectrum!r}")
    if eps is not None and not (0.0 <= eps < 1.0):
        raise ValueError(f"eps must be a fraction in [0, 1), got {eps}")
    if eps is None and not c > 1.0:
        raise ValueError(
            f"c must be > 1 (the seed uses 4): with c ≤ 1 every coordinate can be removed, got {c}"
        )
    if row_norms == "hutchinson" and n_samples < 1:
        raise ValueError(f"n_samples must be ≥ 1, got {n_samples}")
    if hvp_batch < 1:
        raise ValueError(f"hvp_batch must be ≥ 1, got {hvp_batch}")

    if at is None:
        point = objective.params()
    else:
        _check_point(objective, at, "at")
        point = _restrict(objective, at)
    like = {n: point[n] for n in objective.names}
    with contextlib.ExitStack() as stack:
        if hvps is not None:
            op = hvps
        else:
            from landscape.linops import curvature_operator
            from landscape.objective import Objective

            if isinstance(objective, Objective):
                lin = stack.enter_context(curvature_operator(objective, curvature, like))
                op = lin.matvecs
            elif curvature == "hessian":
                op = lambda vs: objective.hvps(vs, at=like)  # noqa: E731 - any object with .hvps
            else:
                raise ValueError(f"curvature={curvature!r} needs a landscape.Objective (or pass hvps=)")
        return _robust(objective, like, point, op, eps=eps, c=c, row_norms=row_norms, n_samples=n_samples,
                       hvp_batch=hvp_batch, seed=seed, spectrum=spectrum, tol=tol, maxiter=maxiter, ncv=ncv,
                       progress=progress)


def _robust(objective: _ObjectiveLike, like: Tree, point: Tree, op: Callable[[list[Tree]], list[Tree]], *,
            eps: float | None, c: float, row_norms: str, n_samples: int, hvp_batch: int, seed: int, spectrum: str,
            tol: float, maxiter: int | None, ncv: int | None, progress: Progress | None) -> RobustSmoothness:
    d = tree.numel(like)
    acc_dtype = torch.float64 if any(v.dtype == torch.float64 for v in like.values()) else torch.float32
    n_hvps = 0

    # 1. row norms ---------------------------------------------------------------------------------
    if row_norms == "hutchinson":
        gen = torch.Generator().manual_seed(int(seed))
        acc = {n: torch.zeros(v.shape, dtype=acc_dtype, device=v.device) for n, v in like.items()}
        for chunk in _batched(range(n_samples), hvp_batch):
            zs = [tree.rademacher_like(like, gen) for _ in chunk]
            for hz in op(zs):
                for n in acc:
                    acc[n] += hz[n].to(acc_dtype) ** 2
            n_hvps += len(chunk)
            if progress is not None:
                progress("row_norms", chunk.stop, n_samples)
        flat_sq = tree.flatten(acc, objective.names) / n_samples
        samples_used = n_samples
    else:
        if d > _EXACT_MAX:
            raise ValueError(
                f"row_norms='exact' needs one HVP per coordinate and the objective has {d} "
                f"(limit {_EXACT_MAX}); use row_norms='hutchinson'"
            )
        flat_sq = torch.empty(d, dtype=acc_dtype)
        zero = torch.zeros(d, dtype=next(iter(like.values())).dtype)
        for chunk in _batched(range(d), hvp_batch):
            es = []
            for j in chunk:
                e = zero.clone()
                e[j] = 1.0
                es.append(tree.unflatten(e, like))
            for j, he in zip(chunk, op(es)):
                flat_sq[j] = tree.norm(he) ** 2
            n_hvps += len(chunk)
            if progress is not None:
                progress("row_norms", chunk.stop, d)
        samples_used = 0
    flat_rn = flat_sq.clamp_min(0).sqrt().detach().cpu().double()

    # 2. removal -----------------------------------------------------------------------------------
    if eps is None:
        mean = float(flat_rn.mean())
        threshold = c * mean
        removed = (flat_rn >= threshold) if mean > 0 else torch.zeros(d, dtype=torch.bool)
        criterion = f"c={c:g}"
    else:
        k = int(math.floor(eps * d + 1e-9))
        removed = torch.zeros(d, dtype=torch.bool)
        if k > 0:
            top = torch.topk(flat_rn, k).indices
            removed[top] = True
        threshold = float(flat_rn[removed].min()) if k > 0 else math.nan
        criterion = f"eps={eps:g}"
    keep_idx = torch.nonzero(~removed).reshape(-1).numpy()
    n_removed = int(removed.sum())

    # 3. eigenvalues -------------------------------------------------------------------------------
    vec_dtype = next(iter(like.values())).dtype
    counter = {"top_eig": 0, "l_robust": 0}

    def full_matvec(v: np.ndarray, stage: str = "top_eig") -> np.ndarray:
        nonlocal n_hvps
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(vec_dtype)
        hv = op([tree.unflatten(t, like)])[0]
        n_hvps += 1
        counter[stage] += 1
        if progress is not None:
            progress(stage, counter[stage], None)
        return tree.flatten(hv, objective.names).detach().cpu().double().numpy()

    def kept_matvec(v: np.ndarray) -> np.ndarray:
        full = np.zeros(d)
        full[keep_idx] = np.asarray(v, dtype=np.float64).reshape(-1)
        return full_matvec(full, "l_robust")[keep_idx]

    top, conv1 = _extreme_eigenvalue(
        full_matvec, d, spectrum=spectrum, tol=tol, maxiter=maxiter, ncv=ncv, seed=seed
    )
    if n_removed == 0:
        l_rob, conv2 = top, True
    else:
        l_rob, conv2 = _extreme_eigenvalue(
            kept_matvec,
            int(keep_idx.size),
            spectrum=spectrum,
            tol=tol,
            maxiter=maxiter,
            ncv=ncv,
            seed=seed + 1,
        )

    rn_tree = tree.unflatten(flat_rn.to(acc_dtype), {n: v.cpu() for n, v in like.items()})
    rm_tree = tree.unflatten(removed, {n: torch.empty(v.shape, dtype=torch.bool) for n, v in like.items()})
    return RobustSmoothness(
        top_eig=top,
        l_robust=l_rob,
        ratio=top / l_rob if l_rob > 0 else math.nan,
        eps=n_removed / d if d else math.nan,
        n_removed=n_removed,
        n_samples=samples_used,
        n_params=d,
        threshold=float(threshold),
        criterion=criterion,
        row_norm_method=row_norms,
        spectrum=spectrum,
        converged=bool(conv1 and conv2),
        n_hvps=n_hvps,
        removed_per_layer={n: int(m.sum()) for n, m in rm_tree.items()},
        row_norms=rn_tree,
    )
