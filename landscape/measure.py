"""One measurement at one point of a trajectory: what the probe and ``landscape analyze`` record.

Given the objective (probe batch), the point ``x_t``, optionally the next point ``x_{t+1}`` of the
real trajectory, and named update directions, :func:`measure_step` returns the rows of every store
table for that step: directional sharpness (seed 002 §3), landscape lines (Figs. 2–4), update
histograms (Fig. 1), cosine similarities, and local / coordinate-wise / robust smoothness (seed 001
§5.2, Fig. 3; seed 002 App. D).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import tree
from landscape._ratio import ratio_to_reference
from landscape.curvature import SharpnessMeter
from landscape.curvature_measure import CurvatureSettings
from landscape.objective import Objective

__all__ = [
    "DirectionSource", "MeasureSettings", "adaptive_line", "bracketed_line", "cosine_matrix", "direction_problem", "log_histogram",
    "measure_step", "pseudo_source", "ratio_to_reference",
]


@dataclass
class MeasureSettings:
    """What each measurement computes (all part of a run's settings).

    Attributes:
        shift: sharpness shift policy (``"never"``, ``"negative"``, ``"always"``).
        delta: δ of the shifted sharpness ûᵀ∇²f(x − δû)û, a distance ≥ 0 toward the step.
        lines: measure the landscape line of every direction.
        line_points: points of the first evaluation of a line (≥ 2: the quadratic model's best step
            s* = G/S, 2.5·s* and evenly spaced ones between; :func:`bracketed_line`).
        line_min_before: points are added until at least this many lie before the loss first rises
            above its start.
        line_max_points: hard cap on points per line (s = 0 included).
        line_tol: relative tolerance of the bracketing search for a line's best step.
        line_batch: points of a line evaluated in one batched forward (``torch.func.vmap`` over the
            stacked parameters: that many copies of the parameters and forwards' activations at once;
            1: one forward per point; 0, the default: 4 on a GPU, 1 on a CPU, where a batched forward
            is no faster). Not part of a run's settings (the numbers agree to float rounding).
        hist_bins: bins of the log10|u_i| histograms.
        cosine: measure the cosine similarity between every pair of directions.
        smoothness: measure L̂_t along the real step (needs the next point).
        gammas: the γ of L̂_t.
        coord_per_layer: sampled coordinates per parameter tensor for the coordinate-wise smoothness
            (0: off).
        robust_every: robust smoothness every this many measurements (0: off; it costs ~100 HVPs).
        robust_samples: Rademacher vectors for the Hessian row norms.
        robust_curvature: the matrix of the robust smoothness: ``"hessian"`` (default) or ``"ggn"``, the
            Gauss–Newton matrix seed 002 App. D uses (then its spectral norm, as there).
        seed: seeds the coordinate samples and robust-smoothness probes.
        method: the sharpness engine: ``"auto"`` (the Taylor sweep where the loss supports it, else
            Hessian-vector products), ``"taylor"`` or ``"hvp"`` (see :func:`~landscape.directional_sharpness`).
            Not part of a run's settings: both engines measure the same numbers (up to rounding).
        merge_tol: directions whose cosine with an earlier direction is at least ``1 − merge_tol`` are
            the same direction to float rounding (at the first step Lion, signSGD and the smoothed
            signSGD all move along sign(g), SGD and normalised SGD along g; a clipping threshold that
            clips nothing leaves a recipe equal to its unclipped one): they are measured once and
            their rows say so (``measured_as``), with their own ``update_norm`` and histogram. The
            default 1e-10 is an angle of 1.4e-5 rad, where float32 directions that differ only by
            rounding sit (measured: 1 − cos ≤ 3e-12), while the nearest distinct pair seen was
            4e-7 (Adam and its value-clipped variant). 0: measure every direction. Needs the cosine
            matrix (``cosine=True``).
        chunk: directions measured at a time (sharpness, lines, histograms, cosine pairs): peak memory
            is about two chunks of directions. Not part of a run's settings (the numbers do not depend
            on it).
        curvature: eigenvalues, traces, spectral densities, preconditioned sharpness and per-layer
            sharpness decompositions at their own cadence
            (:class:`~landscape.curvature_measure.CurvatureSettings`; ``None``, the default: none).
    """

    shift: str = "negative"
    delta: float = 0.01
    lines: bool = True
    line_points: int = 2
    line_min_before: int = 1
    line_max_points: int = 10
    line_tol: float = 0.02
    line_batch: int = 0
    hist_bins: int = 60
    cosine: bool = True
    smoothness: bool = True
    gammas: tuple[float, ...] = (1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6)
    coord_per_layer: int = 16
    robust_every: int = 0
    robust_samples: int = 16
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    method: str = "auto"
    curvature: CurvatureSettings | None = None
    robust_curvature: str = "hessian"
    chunk: int = 4
    merge_tol: float = 1e-10

    def __post_init__(self) -> None:
        from landscape.curvature import SHIFT_POLICIES, _check_delta

        if self.shift not in SHIFT_POLICIES:
            raise ValueError(f"shift must be one of {SHIFT_POLICIES}, got {self.shift!r}")
        _check_delta(self.delta)
        if self.method not in ("auto", "taylor", "hvp"):
            raise ValueError(f"method must be 'auto', 'taylor' or 'hvp', got {self.method!r}")
        if self.robust_curvature not in ("hessian", "ggn"):
            raise ValueError(f"robust_curvature must be 'hessian' or 'ggn', got {self.robust_curvature!r}")
        if isinstance(self.line_batch, bool) or not isinstance(self.line_batch, int) or self.line_batch < 0:
            raise ValueError(f"line_batch must be a number of points >= 0 (0: automatic), got {self.line_batch!r}")
        if not (isinstance(self.line_tol, (int, float)) and 0 < self.line_tol < 1):
            raise ValueError(f"line_tol must be a fraction in (0, 1), got {self.line_tol!r}")
        if self.line_points < 2:
            raise ValueError(f"line_points must be at least 2, got {self.line_points!r}")
        if isinstance(self.merge_tol, bool) or not isinstance(self.merge_tol, (int, float)) or not (
                0 <= self.merge_tol < 1):
            raise ValueError(f"merge_tol must be a number in [0, 1), got {self.merge_tol!r}")
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 1:
            raise ValueError(f"chunk must be a positive number of directions, got {self.chunk!r}")
        if self.curvature is not None and not isinstance(self.curvature, CurvatureSettings):
            raise TypeError(f"curvature must be a CurvatureSettings or None, got {type(self.curvature).__name__}")

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["gammas"] = [float(g) for g in self.gammas]
        d.pop("method")  # how, not what: a run may resume with the other engine
        d.pop("chunk")  # how (memory), not what
        d.pop("line_batch")
        if d.get("curvature") is None:
            d.pop("curvature")  # absent, so that runs recorded before it existed still resume
        if d.get("merge_tol") == 1e-10:
            d.pop("merge_tol")  # the default, absent so that runs recorded before it existed still resume
        if d.get("robust_curvature") == "hessian":
            d.pop("robust_curvature")  # likewise
        return d


def adaptive_line(
    loss_at: Callable[[np.ndarray], np.ndarray],
    f0: float,
    scale: float,
    *,
    points: int = 8,
    min_before: int = 6,
    max_points: int = 28,
) -> tuple[np.ndarray, np.ndarray]:
    """A grid of ``s ≥ 0`` for ``ℓ(s)`` that extends until the loss rises above ``ℓ(0) = f0`` and
    refines when too few points fall before that.

    Args:
        loss_at: evaluates ``ℓ`` on an array of steps.
        f0: ``ℓ(0)``.
        scale: the first grid spans ``(0, scale]`` (e.g. twice the quadratic model's best step).
        points: points of the first grid.
        min_before: refine until at least this many points lie in ``(0, s_rise)``.
        max_points: cap on evaluations.

    Returns:
        ``(s, loss)`` sorted by ``s``, ``s[0] = 0``.
    """
    if not (scale > 0 and math.isfinite(scale)):
        scale = 1.0
    s_all = [0.0]
    l_all = [f0]

    def add(steps: np.ndarray) -> None:
        steps = np.asarray([s for s in steps if s > 0], dtype=np.float64)
        if steps.size:
            s_all.extend(steps.tolist())
            l_all.extend(np.asarray(loss_at(steps), dtype=np.float64).tolist())

    add(np.linspace(scale / points, scale, points))
    # the loss rises at once (an ascent direction or a far too large scale): shrink towards 0
    shrinks = 0
    while min(l_all[1:]) > f0 and shrinks < 6 and len(s_all) < max_points:
        scale /= 8
        add(np.linspace(scale / 4, scale, 4))
        shrinks += 1
    # extend until the loss rises above its start
    hi = max(s_all)
    while l_all[int(np.argmax(s_all))] <= f0 and len(s_all) + 4 <= max_points:
        add(np.linspace(hi * 1.5, hi * 4, 4))
        hi = max(s_all)
    # refine before the first rise
    order = np.argsort(s_all)
    s_sorted = np.asarray(s_all)[order]
    l_sorted = np.asarray(l_all)[order]
    above = np.nonzero(l_sorted[1:] > f0)[0]
    s_rise = s_sorted[1 + above[0]] if above.size else s_sorted[-1]
    before = int(np.sum((s_sorted > 0) & (s_sorted < s_rise)))
    if before < min_before:
        room = max_points - len(s_all)
        n = min(room, 2 * min_before - before)
        if n > 0:
            add(np.linspace(s_rise / (n + 1), s_rise * n / (n + 1), n))
    order = np.argsort(s_all)
    return np.asarray(s_all)[order], np.asarray(l_all)[order]


def bracketed_line(
    loss_at: Callable[[np.ndarray], np.ndarray],
    f0: float,
    slope: float,
    curvature: float,
    *,
    points: int = 2,
    min_before: int = 1,
    max_points: int = 10,
    tol: float = 0.02,
    stretch: float = 2.5,
    batch: int = 1,
    far: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The landscape line ``ℓ(s) = f(x − s·û)``, ``s ≥ 0``, placed from the quadratic model and refined
    toward its minimum by a bracketing search: a few forward passes instead of a dense grid.

    The quadratic model ``ℓ(s) ≈ f0 − G·s + S·s²/2`` (``G = ∇f·û`` the slope, ``S = ûᵀ∇²f û`` the
    sharpness, both known from the sharpness pass) has its minimum at ``s* = G/S`` and climbs back
    to ``f0`` at ``2s*``. So:

    1. the first points are ``s*`` and ``stretch·s*`` (``stretch`` = 2.5, where the model is already
       above ``f0``), plus ``points − 2`` evenly spaced in between, evaluated ``batch`` at a time
       (one batched forward where memory allows), nearest first, until one is above ``f0``. Along a
       descent direction with no quadratic minimum (``S ≤ 0``) the search starts at ``far·s0``
       (``far`` = 3; ``s0 = f0/G``, where the linear model reaches zero loss: on the demo's LM at
       its first step, where every direction has negative curvature, the minima lay 3–10 × s0 out);
    2. until the loss at the farthest point rises above ``f0``, the farthest point is tripled (the
       loss is flatter than its model); if every point is above ``f0`` (the loss rose before ``s*``),
       the search moves toward 0 using the slope at 0;
    3. the minimum is refined by successive parabolic interpolation through the lowest point and its
       neighbours, or the cubic with the known slope at 0 (Brent's safeguards: a golden-section step
       where the models are not trusted or stop converging), and the search stops when every model
       puts the minimum within ``tol`` (relative) of the lowest point *and* that point was itself a
       model's estimate (a lowest point that only bracketing produced is tested once more: a wide,
       lopsided bracket can put a parabola's vertex on its middle point by chance);
    4. points are added evenly before the first rise until ``min_before`` lie there.

    The stored line therefore always shows where the loss rises above its start (unless
    ``max_points`` is reached first) and a lowest point within about ``tol`` of the minimum of a smooth
    line. Where ``S ≤ 0`` or ``G ≤ 0`` the scale is ``|G|/|S|`` (or 1; for ``G > 0`` and ``f0 > 0`` at
    least ``f0/G``, where the linear model reaches zero loss) and a line that rises at once
    (``G ≤ 0``, an ascent direction) stops as soon as that is seen: its best step is 0.

    Args:
        loss_at: evaluates ``ℓ`` on an array of steps (several at once where it can).
        f0: ``ℓ(0)``.
        slope: ``G = ∇f(x)·û`` (``ℓ'(0) = −G``).
        curvature: ``S``, the directional sharpness (``ℓ''(0)``, or the shifted value).
        points: points of the first evaluation (≥ 2).
        min_before: at least this many points in ``(0, s_rise)``.
        max_points: cap on points (``s = 0`` included).
        tol: relative tolerance on the best step.
        stretch: the first grid spans ``(0, stretch·s*]``.
        batch: points of the first grid evaluated together (``loss_at`` gets them in one call).
        far: the first point along a descent direction with no quadratic minimum, in units of ``s0``.

    Returns:
        ``(s, loss)`` sorted by ``s``, ``s[0] = 0``.
    """
    points = max(2, int(points))
    max_points = max(points + 1, int(max_points))
    g, S = float(slope), float(curvature)
    if g > 0 and S > 0:
        s0 = g / S
    elif g != 0 and S != 0 and math.isfinite(g) and math.isfinite(S):
        s0 = abs(g) / abs(S)
        if g > 0 and f0 > 0:
            # no quadratic minimum: the step where the linear model reaches zero loss
            s0 = f0 / g
    else:
        s0 = 1.0
    if not (0 < s0 < float("inf")):
        s0 = 1.0
    pts: dict[float, float] = {0.0: float(f0)}

    def add(steps: Iterable[float]) -> None:
        new = sorted({float(t) for t in steps if t > 0 and math.isfinite(t) and t not in pts})
        new = new[: max(0, max_points - len(pts))]
        if new:
            for t, v in zip(new, np.asarray(loss_at(np.asarray(new, dtype=np.float64)), dtype=np.float64).tolist()):
                pts[t] = v if math.isfinite(v) else math.inf

    def room() -> int:
        return max_points - len(pts)

    golden = 0.381966
    top = stretch * s0
    quad = g > 0 and S > 0
    predicted = {s0} if quad else set()  # points a model put at the minimum
    if quad or g <= 0 or not f0 > 0:
        first = sorted({s0, top, *np.linspace(top / (points - 1), top * (points - 2) / (points - 1), points - 2).tolist()})
    else:
        # descent without a quadratic minimum: geometric steps from `far`·s0
        first = [far * s0 * 3.0 ** i for i in range(points - 1)]
    # evaluated `batch` at a time, nearest first: once the loss is above its start the rest is not needed
    for i in range(0, len(first), max(1, int(batch))):
        add(first[i:i + max(1, int(batch))])
        if max(pts.values()) > f0:
            break
    # 2a. the loss rises before s*: move toward 0 (the parabola through f0, the slope at 0 and the
    # nearest point, kept within a factor 4 of it: the loss is then steeper than its model)
    shrinks = 0
    while g > 0 and min(v for t, v in pts.items() if t > 0) > f0 and room() > 0 and shrinks < 8:
        s1 = min(t for t in pts if t > 0)
        rise = pts[s1] - f0 + g * s1
        guess = g * s1 * s1 / (2 * rise) if rise > 0 and math.isfinite(rise) else s1 / 4
        add([min(max(guess, s1 / 4), s1 / 2)])
        shrinks += 1
    # 2b. extend until the loss rises above its start
    while pts[max(pts)] <= f0 and room() > 0:
        add([3 * max(pts)])
    # 3. the minimum: first a bracket a < m < c within a factor `ratio` on each side (geometric
    # steps: the lines' scales differ from their quadratic models by factors, not offsets), then
    # successive parabolic interpolation through the bracket (Brent's method without its bookkeeping)
    ratio = 3.0
    parabolic = 0
    moves: list[float] = []
    while room() > 0:
        s_sorted = sorted(pts)
        values = [pts[t] for t in s_sorted]
        b = int(np.argmin(values))
        if b == 0 or b == len(s_sorted) - 1:
            break  # best at 0 (the loss rose at once) or at the farthest point (max_points reached)
        a, m, c = s_sorted[b - 1], s_sorted[b], s_sorted[b + 1]
        fa, fm, fc = values[b - 1], values[b], values[b + 1]
        if c / m > ratio and (a == 0 or c / m >= m / a):
            add([math.sqrt(m * c)])
            continue
        if a > 0 and m / a > ratio:
            add([math.sqrt(a * m)])
            continue
        if parabolic >= 5:
            break
        den = (m - a) * (fm - fc) - (m - c) * (fm - fa)
        num = (m - a) ** 2 * (fm - fc) - (m - c) ** 2 * (fm - fa)
        u_par = m - 0.5 * num / den if den != 0 and math.isfinite(fa + fc) else math.nan
        u_cub = _cubic_min(f0, g, m, fm, c, fc) if a == 0 and g > 0 else math.nan
        lo, hi = a + 0.1 * (m - a), c - 0.1 * (c - m)
        inside = [u for u in (u_cub, u_par) if lo < u < hi]
        if m in predicted and inside and all(abs(u - m) <= tol * m for u in inside) and len(inside) == len(
                [u for u in (u_cub, u_par) if math.isfinite(u)]):
            break  # every model of the bracket puts the minimum at the lowest point
        model_step = [u for u in inside if abs(u - m) > tol * m]
        if model_step and len(moves) >= 2 and abs(model_step[0] - m) > 0.5 * moves[-2]:
            model_step = []  # the models are not converging (Brent's test): a golden-section step
            inside = []
        if model_step:
            u = model_step[0]  # the cubic (slope at 0 known) first, else the parabola
        elif inside and m not in predicted:
            u = inside[0]  # the models agree with the lowest point, which no model proposed: test them
            model_step = [u]
            if abs(u - m) < 1e-3 * m:
                predicted.add(m)
                continue
        else:
            # golden-section step into the larger side
            u = m + golden * (c - m) if c - m > m - a else m - golden * (m - a)
        parabolic += 1
        if model_step:
            predicted.add(u)
        moves.append(abs(u - m))
        add([u])
    # 4. enough points before the rise
    s_sorted = sorted(pts)
    above = [t for t in s_sorted if t > 0 and pts[t] > f0]
    s_rise = above[0] if above else s_sorted[-1]
    before = sum(1 for t in s_sorted if 0 < t < s_rise)
    if before < min_before and room() > 0:
        n = min(room(), min_before - before)
        gaps = [t for t in s_sorted if t <= s_rise]
        # split the widest gaps before the rise
        new = []
        for _ in range(n):
            cand = sorted(gaps + new)
            widths = [(cand[i + 1] - cand[i], i) for i in range(len(cand) - 1)]
            w, i = max(widths)
            new.append(cand[i] + w / 2)
        add(new)
    order = sorted(pts)
    return np.asarray(order, dtype=np.float64), np.asarray([pts[t] for t in order], dtype=np.float64)


def _cubic_min(f0: float, g: float, m: float, fm: float, c: float, fc: float) -> float:
    """The local minimum in ``(0, c)`` of the cubic through ``(0, f0)`` with slope ``−g`` there and
    through ``(m, fm)``, ``(c, fc)`` (NaN when it has none): the slope at 0 is known exactly from the
    sharpness pass, so a line bracketed by ``0 < m < c`` is refined with it."""
    if not all(math.isfinite(v) for v in (fm, fc)):
        return math.nan
    # ℓ(s) − f0 + g·s = A s² + B s³ at m and c
    rm, rc = fm - f0 + g * m, fc - f0 + g * c
    det = m * m * c ** 3 - c * c * m ** 3
    if det == 0:
        return math.nan
    A = (rm * c ** 3 - rc * m ** 3) / det
    B = (m * m * rc - c * c * rm) / det
    # ℓ'(s) = −g + 2A s + 3B s² = 0
    if abs(B) < 1e-12 * max(abs(A), 1e-300):
        return g / (2 * A) if A > 0 else math.nan
    disc = 4 * A * A + 12 * B * g
    if disc < 0:
        return math.nan
    root = (-2 * A + math.sqrt(disc)) / (6 * B)  # the root where ℓ'' = 2A + 6Bs > 0
    return root if 0 < root < c else math.nan


def log_histogram(u: Mapping[str, Tensor], bins: int = 60) -> dict[str, Any]:
    """Histogram of ``log10 |u_i|`` over all coordinates (seed 002 Fig. 1), exact zeros counted apart.

    Sparsity: the fraction of coordinates with ``|u_i| < 1e-3 · max_j |u_j|`` (exact zeros included).
    """
    mags = torch.cat([v.detach().reshape(-1).abs().float() for v in u.values()])
    zeros = int((mags == 0).sum())
    peak = float(mags.max()) if mags.numel() else 0.0
    sparsity = float((mags < 1e-3 * peak).float().mean()) if peak > 0 else 1.0
    nz = mags[mags > 0]
    if nz.numel() == 0:
        return {"edges": np.zeros(bins + 1), "counts": np.zeros(bins, dtype=np.int64), "sparsity": sparsity, "zeros": zeros}
    logs = torch.log10(nz)
    lo, hi = float(logs.min()), float(logs.max())
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(logs, bins=bins, min=lo, max=hi)
    return {
        "edges": np.linspace(lo, hi, bins + 1),
        "counts": counts.to(torch.int64).numpy(),
        "sparsity": sparsity,
        "zeros": zeros,
    }


def cosine_matrix(directions: Mapping[str, Mapping[str, Tensor]]) -> tuple[list[str], np.ndarray]:
    """Cosine similarity between every pair of directions, accumulated one parameter tensor at a time
    (memory: K copies of the largest tensor, not K copies of the model)."""
    names = list(directions)
    k = len(names)
    gram = torch.zeros(k, k, dtype=torch.float64)
    keys = list(next(iter(directions.values()))) if k else []
    for key in keys:
        block = torch.stack([directions[n][key].detach().reshape(-1).double() for n in names])
        gram += (block @ block.T).cpu()
    norms = gram.diag().sqrt()
    cos = gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)
    return names, cos.numpy()


class DirectionSource:
    """Named update directions produced on demand, a few at a time.

    A measurement asks :meth:`get` for a chunk of directions (``MeasureSettings.chunk``), measures
    them and lets them go, so it never holds every direction at once: for a model of P parameters
    and K directions, peak memory is about two chunks of directions (the cosine matrix pairs two
    chunks) instead of K·P numbers. A plain mapping ``{name: u}`` is a source whose directions are
    all alive already (:meth:`of`).

    Args:
        names: the directions, in measurement order.
        get: ``get(list_of_names) -> {name: u}``, fresh trees for the names asked for.
    """

    def __init__(self, names: Iterable[str], get: Callable[[list[str]], Mapping[str, Mapping[str, Tensor]]]) -> None:
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"direction names must be unique, got {self.names}")
        self._get = get

    @classmethod
    def of(cls, directions: Mapping[str, Mapping[str, Tensor]] | DirectionSource) -> DirectionSource:
        """``directions`` itself when it is a source, else a source over the mapping."""
        if isinstance(directions, DirectionSource):
            return directions
        if not isinstance(directions, Mapping):
            raise TypeError(f"directions must be a mapping {{name: u}} or a DirectionSource, got {type(directions).__name__}")
        return cls(list(directions), lambda names: {n: directions[n] for n in names})

    def get(self, names: Iterable[str]) -> dict[str, Mapping[str, Tensor]]:
        """``{name: u}`` for ``names`` (in that order)."""
        names = list(names)
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise KeyError(f"unknown directions {unknown}; this source has {self.names}")
        got = self._get(names)
        return {n: got[n] for n in names}

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __repr__(self) -> str:
        return f"DirectionSource({len(self.names)} directions: {', '.join(self.names[:6])}{' ...' if len(self.names) > 6 else ''})"


def pseudo_source(
    pseudo: Any,
    extra: Mapping[str, Mapping[str, Tensor]] | None = None,
    names: Iterable[str] | None = None,
) -> DirectionSource:
    """A :class:`DirectionSource` over a :class:`~landscape.optim.PseudoUpdates`' recipes (computed
    from their states when asked for, :meth:`~landscape.optim.PseudoUpdates.directions`), followed by
    directions already materialised in ``extra`` (e.g. the trained optimizer's own step).

    Args:
        pseudo: the recipes' states.
        extra: more directions ``{name: u}``, after the recipes.
        names: only these recipes (default: all of ``pseudo.names``).
    """
    recipes = list(pseudo.names) if names is None else list(names)
    extra = dict(extra or {})
    clash = [n for n in extra if n in recipes]
    if clash:
        raise ValueError(f"extra directions {clash} have the names of recipes")

    def get(wanted: list[str]) -> dict[str, Mapping[str, Tensor]]:
        from_pseudo = [n for n in wanted if n not in extra]
        out: dict[str, Mapping[str, Tensor]] = dict(pseudo.directions(from_pseudo)) if from_pseudo else {}
        out.update({n: extra[n] for n in wanted if n in extra})
        return out

    return DirectionSource(recipes + list(extra), get)


def direction_problem(u: Mapping[str, Tensor]) -> str | None:
    """Why ``u`` has no direction (``None`` when it has one): non-finite entries, or norm 0."""
    bad = tree.nonfinite_names(u)
    if bad:
        return f"direction has non-finite entries (in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''})"
    n = float(tree.norm(u))
    if n == 0:
        return "direction has norm 0 (all coordinates zero)"
    if not math.isfinite(n):
        return f"direction norm is not finite ({n!r}: entries too large for the dtype)"
    return None


def _same_directions(names: Sequence[str], index: Mapping[str, int], cos: Tensor | None,
                     tol: float) -> dict[str, str]:
    """``{name: earlier name}`` for each direction whose cosine with an earlier one (in ``names``'
    order, so the reference SGD, first, is always measured) is at least ``1 − tol``: the same
    direction to float rounding, measured once. Empty without a cosine matrix or with ``tol = 0``."""
    if cos is None or tol <= 0:
        return {}
    same: dict[str, str] = {}
    reps: list[str] = []
    for n in names:
        for r in reps:
            c = float(cos[index[r], index[n]])
            if math.isfinite(c) and c >= 1.0 - tol:
                same[n] = r
                break
        else:
            reps.append(n)
    return same


def _chunks(names: list[str], size: int) -> list[list[str]]:
    size = max(1, int(size))
    return [names[i:i + size] for i in range(0, len(names), size)]


def _gram_block(a: Mapping[str, Mapping[str, Tensor]], b: Mapping[str, Mapping[str, Tensor]],
                keys: Sequence[str]) -> Tensor:
    """``⟨u_a, u_b⟩`` for every pair of a chunk ``a`` and a chunk ``b``, in float64, one parameter
    tensor at a time."""
    out = torch.zeros(len(a), len(b), dtype=torch.float64)
    piece = 1 << 22  # float64 copies of at most this many coordinates per direction at a time
    for key in keys:
        n = next(iter(a.values()))[key].numel()
        for lo in range(0, n, piece):
            ba = torch.stack([u[key].detach().reshape(-1)[lo:lo + piece].double() for u in a.values()])
            bb = ba if a is b else torch.stack([u[key].detach().reshape(-1)[lo:lo + piece].double() for u in b.values()])
            out += (ba @ bb.T).cpu()
            del ba, bb
    return out


def measure_step(
    objective: Objective,
    step: int,
    x_t: Mapping[str, Tensor],
    directions: Mapping[str, Mapping[str, Tensor]] | DirectionSource,
    *,
    x_next: Mapping[str, Tensor] | None = None,
    settings: MeasureSettings | None = None,
    reference: str = "sgd",
    measurement_index: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    preconditioners: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Measure every direction at ``x_t`` and return the store rows, keyed by table.

    Args:
        objective: the probe-batch objective.
        step: the step number written in every row.
        x_t: the point (keyed like ``objective.names``).
        directions: ``{name: u}`` (``x`` moves to ``x − η·u``), or a :class:`DirectionSource` that
            produces them a chunk at a time (:func:`pseudo_source`): then at most about two chunks of
            ``settings.chunk`` directions are alive at once.
        x_next: the next point of the real trajectory (for the smoothness tables).
        settings: what to compute.
        reference: the direction whose sharpness the ratios divide by.
        measurement_index: counts measurements (for ``robust_every`` and the curvature cadences).
        progress: called as ``progress(phase, done, total)`` while measuring (``"sharpness"``,
            ``"lines"`` per direction, ``"histograms"``, ``"smoothness"``, ``"robust smoothness"``).
        preconditioners: ``{name: P}`` for the preconditioned sharpness (``settings.curvature``).

    A direction with norm 0 or non-finite entries is not measured: its ``sharpness`` and ``lines``
    rows say why in ``undefined`` (the sharpness row's ``ratio_note`` too), with NaN values, and its
    cosines are NaN; the other directions are measured as usual.

    Besides the tables' rows, ``"_events"`` lists ``{"step", "message"}`` of curvature quantities that
    could not be measured, and of undefined directions (for the run's events).
    """
    from landscape import smoothness as sm

    st = settings or MeasureSettings()
    names = list(objective.names)
    source = DirectionSource.of(directions)
    all_names = list(source.names)
    chunks = _chunks(all_names, st.chunk)
    rows: dict[str, list[dict[str, Any]]] = {}
    timings: dict[str, float] = {"sharpness": 0.0, "lines": 0.0, "geometry": 0.0}
    events: list[dict[str, Any]] = []

    def tell(phase: str, done: int = 0, total: int = 0) -> None:
        if progress is not None:
            progress(phase, done, total)

    def fetch(chunk: list[str]) -> dict[str, dict[str, Tensor]]:
        got = source.get(chunk)
        out = {}
        for k, u in got.items():
            missing = [n for n in names if n not in u]
            if missing:
                raise KeyError(f"direction {k!r} lacks measured parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
            out[k] = {n: u[n] for n in names}
        return out

    undefined: dict[str, str] = {}
    norms: dict[str, float] = {}
    sharp: dict[str, Any] = {}
    hist_rows: dict[str, dict[str, Any]] = {}
    line_rows: dict[str, dict[str, Any]] = {}
    gram = torch.full((len(all_names), len(all_names)), math.nan, dtype=torch.float64)
    index = {n: i for i, n in enumerate(all_names)}
    want_cos = st.cosine and len(all_names) > 1
    t_start = time.perf_counter()
    # 1. Geometry first (no forward pass): which directions are defined, their histograms and the
    # cosine matrix, one chunk (and one pair of chunks) at a time.
    t0 = time.perf_counter()
    tell("histograms and cosines")
    for ci, chunk in enumerate(chunks):
        if len(chunks) > 1:
            tell("histograms and cosines", ci + 1, len(chunks))
        dirs = fetch(chunk)
        for k, u in dirs.items():
            why = direction_problem(u)
            if why is not None:
                undefined[k] = why
            norms[k] = float(tree.norm(u)) if why is None or "non-finite" not in why else math.nan
        for name, u in dirs.items():
            if name in undefined and "non-finite" in undefined[name]:
                continue
            hist_rows[name] = {"step": step, "direction": name, **log_histogram(u, st.hist_bins)}
        defined = {k: u for k, u in dirs.items() if k not in undefined}
        if want_cos and defined:
            keys = list(names)
            ids = [index[k] for k in defined]
            block = _gram_block(defined, defined, keys)
            gram[np.ix_(ids, ids)] = block
            for later in chunks[ci + 1:]:
                other = {k: u for k, u in fetch(later).items() if direction_problem(u) is None}
                if other:
                    jds = [index[k] for k in other]
                    cross = _gram_block(defined, other, keys)
                    gram[np.ix_(ids, jds)] = cross
                    gram[np.ix_(jds, ids)] = cross.T
                del other
        del dirs, defined
    cos = None
    if want_cos:
        norms_g = gram.diag().sqrt()
        cos = gram / (norms_g[:, None] * norms_g[None, :]).clamp_min(1e-300)
    # Directions that are the same direction to float rounding (at the first step Lion, signSGD and
    # the smoothed signSGD all move along sign(g); SGD and normalised SGD along g) are measured once:
    # every measured number but ‖u‖ is a function of û alone.
    same_as = _same_directions([n for n in all_names if n not in undefined], index, cos, st.merge_tol)
    measured = [n for n in all_names if n not in undefined and n not in same_as]
    timings["geometry"] += time.perf_counter() - t0
    # 2. Sharpness and lines of each distinct direction.
    done_lines = 0
    with SharpnessMeter(objective, at=x_t, shift=st.shift, delta=st.delta, method=st.method) as meter:
        tell("sharpness")
        loss, grad = meter.ensure_grad()
        m_chunks = _chunks(measured, st.chunk)
        for ci, chunk in enumerate(m_chunks):
            dirs = fetch(chunk)
            t0 = time.perf_counter()
            if ci:
                tell("sharpness", sum(len(c) for c in m_chunks[:ci]), len(measured))
            sharp.update(meter.measure(dirs))
            timings["sharpness"] += time.perf_counter() - t0
            if st.lines:
                t0 = time.perf_counter()
                for name, u in dirs.items():
                    done_lines += 1
                    tell("lines", done_lines, len(measured))
                    line_rows[name] = _line_row(objective, step, name, u, sharp[name], loss, x_t, st)
                timings["lines"] += time.perf_counter() - t0
            del dirs
    for name, rep in same_as.items():
        # the representative's numbers; ‖u‖ is this direction's own (from the Gram matrix)
        sharp[name] = dataclasses.replace(sharp[rep], update_norm=norms[name])
        if st.lines:
            line_rows[name] = {**line_rows[rep], "direction": name}
    assert loss is not None and grad is not None
    ref = sharp.get(reference)
    rows["sharpness"] = []
    for name in all_names:
        if name in undefined:
            why = undefined[name]
            rows["sharpness"].append(
                {"step": step, "direction": name, "sharpness": math.nan, "raw": math.nan, "shifted_value": None,
                 "shifted": False, "ratio_to_sgd": None, "ratio_note": why, "grad_correlation": math.nan,
                 "update_norm": norms.get(name, math.nan), "best_step": None, "predicted_reduction": None,
                 "loss": loss, "undefined": why}
            )
            events.append({"step": step, "message": f"direction {name!r} not measured at step {step}: {why}"})
            continue
        s = sharp[name]
        ratio, note = ratio_to_reference(s.value, ref.value if ref is not None else None, reference)
        if ref is None and reference in undefined:
            note = f"{reference} is undefined at this step: {undefined[reference]}"
        rows["sharpness"].append(
            {
                "step": step,
                "direction": name,
                "sharpness": s.value,
                "raw": s.raw,
                "shifted_value": s.shifted_value,
                "shifted": s.shifted,
                "ratio_to_sgd": ratio,
                "ratio_note": note,
                "grad_correlation": s.grad_correlation,
                "update_norm": s.update_norm,
                "best_step": s.best_step,
                "predicted_reduction": s.predicted_reduction,
                "loss": s.loss,
                **({"measured_as": same_as[name]} if name in same_as else {}),
            }
        )
    if st.lines:
        rows["lines"] = []
        for name in all_names:
            if name in undefined:
                rows["lines"].append({"step": step, "direction": name, "s": np.zeros(0), "loss": np.zeros(0),
                                      "best_step": math.nan, "best_loss": math.nan, "reduction": math.nan,
                                      "undefined": undefined[name]})
            else:
                rows["lines"].append({**line_rows[name], **({"measured_as": same_as[name]} if name in same_as else {})})
    rows["histograms"] = [hist_rows[n] for n in all_names if n in hist_rows]
    if cos is not None:
        rows["cosine"] = [
            {"step": step, "a": a, "b": b, "cosine": float(cos[i, j])}
            for i, a in enumerate(all_names)
            for j, b in enumerate(all_names)
            if i < j
        ]
    timings["directions"] = time.perf_counter() - t_start
    if x_next is not None and st.smoothness:
        tell("smoothness")
        t0 = time.perf_counter()
        xn = {n: x_next[n] for n in names}
        if float(tree.norm(tree.sub(xn, {n: x_t[n] for n in names}))) > 0:
            ls_ = sm.local_smoothness(objective, x_t, xn, gammas=st.gammas, grad_t=grad)
            rows["smoothness"] = [
                {
                    "step": step,
                    "l_hat": ls_.l_hat,
                    "grad_norm": ls_.grad_norm,
                    "step_norm": ls_.step_norm,
                    "per_gamma": dict(zip([float(g) for g in ls_.gammas], [float(v) for v in ls_.per_gamma])),
                }
            ]
            if st.coord_per_layer > 0:
                cs = sm.coordinate_smoothness(objective, x_t, xn, per_layer=st.coord_per_layer, seed=st.seed, grad_t=grad)
                rows["coord_smoothness"] = [
                    {"step": step, "layer": layer, "ratio": c.ratio, "min_grad": c.min_grad} for layer, c in cs.items()
                ]
        timings["smoothness"] = time.perf_counter() - t0
    if st.robust_every and measurement_index % st.robust_every == 0:
        tell("robust smoothness")
        t0 = time.perf_counter()
        # seed 002 App. D measures the spectral norm of the Gauss–Newton matrix (its top eigenvalue: PSD)
        rb = sm.robust_smoothness(objective, at=x_t, n_samples=st.robust_samples, seed=st.seed,
                                  curvature=st.robust_curvature,
                                  spectrum="norm" if st.robust_curvature == "ggn" else "top")
        rows["robust"] = [
            {
                "step": step,
                "curvature": st.robust_curvature,
                "top_eig": rb.top_eig,
                "l_robust": rb.l_robust,
                "ratio": rb.ratio,
                "eps": rb.eps,
                "n_removed": rb.n_removed,
                "n_samples": rb.n_samples,
            }
        ]
        timings["robust"] = time.perf_counter() - t0
    if st.curvature is not None:
        from landscape.curvature_measure import measure_curvature

        # The per-layer decomposition needs every (defined) direction at once.
        wanted = [n for n in all_names if n not in undefined]
        cdirs = fetch(wanted) if st.curvature.due("layers", measurement_index) else {}
        crows, cevents, ctimes = measure_curvature(objective, step, x_t, cdirs, st.curvature,
                                                   measurement_index=measurement_index, preconditioners=preconditioners)
        del cdirs
        rows.update(crows)
        timings.update(ctimes)
        events.extend({"step": step, "message": m} for m in cevents)
    if events:
        rows["_events"] = events
    rows["_timings"] = [timings]  # type: ignore[list-item]
    rows["_grad"] = [{"grad": grad, "loss": loss}]  # type: ignore[list-item]
    rows["_engine"] = [_sharpness_engine(objective, x_t, st.method)]  # type: ignore[list-item]
    return rows


def _line_row(objective: Objective, step: int, name: str, u: Mapping[str, Tensor], s: Any, loss: float,
              x_t: Mapping[str, Tensor], st: MeasureSettings) -> dict[str, Any]:
    """The ``lines`` row of one direction: ``ℓ(s) = f(x − s·û)`` around the quadratic model's step."""
    uhat = tree.scale(u, 1.0 / s.update_norm)
    batch = st.line_batch or (4 if next(iter(uhat.values())).is_cuda else 1)
    grid, losses = bracketed_line(
        lambda steps, uhat=uhat: objective.losses_along(uhat, steps, x_t, batch=batch),
        loss,
        s.grad_correlation,
        s.value,
        points=st.line_points,
        min_before=st.line_min_before,
        max_points=st.line_max_points,
        tol=st.line_tol,
        batch=batch,
    )
    losses = np.where(np.isfinite(losses), losses, np.nan)
    i = int(np.nanargmin(losses))
    return {
        "step": step,
        "direction": name,
        "s": grid,
        "loss": losses,
        "best_step": float(grid[i]),
        "best_loss": float(losses[i]),
        "reduction": float(loss - losses[i]),
    }


def _sharpness_engine(objective: Objective, at: Mapping[str, Tensor] | None = None, method: str = "auto") -> dict[str, str]:
    """The engine directional sharpness uses at ``at`` with ``method``, for the run store's events.

    Returns:
        ``{"engine": "taylor" | "hvp", "message": ...}``; when ``"auto"`` falls back to Hessian-vector
        products the message names the reason (:meth:`Objective.taylor_support`).
    """
    if method == "hvp":
        return {"engine": "hvp", "message": "sharpness engine: hvp (Hessian-vector products, as asked)"}
    reason = objective.taylor_support(at)
    if reason is None:
        return {"engine": "taylor", "message": "sharpness engine: taylor (the second-order Taylor sweep)"}
    return {
        "engine": "hvp",
        "message": f"sharpness engine: hvp (Hessian-vector products, about twice the cost): the Taylor sweep "
        f"cannot be used for this loss: {reason}",
    }
