"""Publication figures from a run store: every function reads a :class:`~landscape.store.Run`.

Each plot function takes the run (and options) and ``ax: Axes | None = None``, draws into ``ax``
(a new figure when ``None``) and returns the Axes; it never shows or saves. The multi-panel
figures (:func:`landscape_line_panels`, :func:`coordinate_smoothness_grid`) take ``fig`` and return
their Axes. Wrap calls in :func:`paper_style` for paper-sized fonts and embedded TrueType fonts;
:func:`save_figures` does, and writes a one-line caption beside every figure.

Which directions (``directions=``, ``landscape plot --directions``): by default the update
directions of Pan & Li 2023 (SGD, normalized SGD, signSGD, Adam, Adafactor, Lion and their clipped
variants), the trained optimizer's own step and any recipe of your own; ``"all"`` adds the other
works' recipes; names and shell patterns (``"adam*"``) pick. Every direction keeps one style in every
figure of a run (:func:`recipe_style`): a family shares a colour, a clipped variant is drawn at a lower
opacity with a line style of its own (as in the paper's Fig. 2), the trained direction is black.
Directions that are one direction in the data (cos ≈ 1 at every measured step and the same
sharpness: ``adam`` and ``adam (trained)`` when Adam trains) are drawn once and named together,
``adam ≡ adam (trained)`` (``≈`` when equal only to the tolerance, as ``smoothed_signsgd ≈
adam_valueclip``, equal up to the factor 1/(1 − β₁ᵗ)); ``merge=False`` draws each.

A figure whose data is missing raises :class:`~landscape.store.NoDataError` naming what is missing
(and, for a step, the measured steps).

Example:
    >>> from landscape.store import load_run
    >>> import landscape.plots as lp
    >>> run = load_run("runs/tiny")                                    # doctest: +SKIP
    >>> with lp.paper_style():                                         # doctest: +SKIP
    ...     axes = lp.landscape_line_panels(run)                       # one panel per family
    ...     axes[0].figure.savefig("lines.pdf")
    >>> lp.save_figures(run, "runs/tiny/figures", fmt="pdf")           # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape import _directions as dirs
from landscape._names import CURVATURE_FIGURE_NAMES, FIGURE_FORMATS, FIGURE_NAMES, FIGURE_WIDTHS
from landscape._style import COLUMN_WIDTH, TEXT_WIDTH, figsize, paper_style, recipe_style, run_styles
from landscape._style import split_recipe as split_recipe
from landscape.curvature_plots import save_curvature_figures
from landscape.store import NoDataError, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "FIGURE_FORMATS",
    "FIGURE_NAMES",
    "COLUMN_WIDTH",
    "TEXT_WIDTH",
    "paper_style",
    "recipe_style",
    "split_recipe",
    "landscape_lines",
    "landscape_line_panels",
    "sharpness_ratio",
    "sharpness_over_time",
    "update_histograms",
    "cosine_heatmap",
    "training_loss",
    "smoothness_scatter",
    "coordinate_smoothness",
    "coordinate_smoothness_grid",
    "default_layers",
    "layer_kind",
    "LAYER_KINDS",
    "smooth_curve",
    "compare_ratios",
    "figure_caption",
    "save_figures",
]


_NEGATIVE_LABEL = "< 0 (|value| shown)"
_SHIFTED_LABEL = r"$\delta$-shifted $\hat u^\top \nabla^2 f(x - \delta \hat u)\,\hat u$"
_UNDEFINED_LABEL = r"ratio undefined: SGD sharpness $\leq 0$"
_BEST_LABEL = "lowest measured loss"
_POINTS_LABEL = "measured points"


# -- helpers ---------------------------------------------------------------------------------------


def _axes(ax: Axes | None, width: str | float = "single", aspect: float = 0.75) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize(width, aspect), layout="constrained")
    return ax


def _figure(fig: Figure | None, width: str | float, aspect: float) -> Figure:
    if fig is not None:
        return fig
    import matplotlib.pyplot as plt

    return plt.figure(figsize=figsize(width, aspect), layout="constrained")


def _pick_step(run: Run, table: str, step: int | None) -> int:
    steps = run.steps(table)
    if not steps:
        raise NoDataError(f"run {run.path} has no rows in table {table!r}")
    if step is None:
        return steps[-1]
    if step not in steps:
        shown = ", ".join(map(str, steps[:20])) + (", ..." if len(steps) > 20 else "")
        raise NoDataError(f"step {step} has no rows in table {table!r} of run {run.path}; measured steps: {shown}")
    return int(step)


def _sorted_directions(run: Run, present: Sequence[str]) -> list[str]:
    order = run.directions
    rank = {d: i for i, d in enumerate(order)}
    return sorted(dict.fromkeys(present), key=lambda d: (rank.get(d, len(rank)), d))


def _order(run: Run, present: Sequence[str], directions: str | Sequence[str] | None) -> list[str]:
    """The directions to draw (see :func:`landscape._directions.select`), as a NoDataError when a
    name matches nothing."""
    try:
        return dirs.select(_sorted_directions(run, present), directions, trained=run.trained_direction,
                           where=f"run {run.path}")
    except LookupError as e:
        raise NoDataError(str(e)) from None


def _style(run: Run, name: str) -> dict[str, Any]:
    names = run.directions
    if name not in names:
        names = names + [name]
    return run_styles(names, run.trained_direction)[name]


def _line_kw(style: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in style.items() if k in ("color", "linestyle", "alpha", "zorder", "linewidth")}


@dataclass(frozen=True)
class _Entry:
    """One drawn curve: the representative direction and the directions it stands for."""

    name: str
    members: tuple[str, ...]
    label: str


def _entries(run: Run, names: list[str], steps: Sequence[int] | None, merge: bool) -> list[_Entry]:
    """``names`` with equivalent directions (:func:`landscape._directions.equivalent_groups`)
    merged into one entry each, in the order of ``names``."""
    groups = []
    if merge and len(names) > 1 and run.has("cosine"):
        wanted = None if steps is None else set(steps)
        cos = [r for r in run.rows("cosine") if wanted is None or r["step"] in wanted]
        sharp = run.rows("sharpness") if run.has("sharpness") else []
        groups = dirs.equivalent_groups(names, cos, sharp, steps=steps)
    of = {m: g for g in groups for m in g.members}
    out, done = [], set()
    for n in names:
        if n in done:
            continue
        g = of.get(n)
        if g is None:
            out.append(_Entry(n, (n,), n))
        else:
            out.append(_Entry(g.members[0], g.members, g.label))
            done.update(g.members)
    return out


def _legend(ax: Axes, n: int, *, outside: bool | None = None, **kw: Any) -> None:
    """Inside the axes for a few entries; outside, to the right, for many (18 entries would hide
    the data)."""
    if not n:
        return
    if outside is None:
        outside = n > 8
    if not outside:
        ax.legend(loc=kw.pop("loc", "best"), handlelength=2.2, **kw)
    elif ax.figure.get_figwidth() < 4.5:  # one paper column: below the axes, in two columns
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), borderaxespad=0.0, handlelength=2.2, ncol=2,
                  **kw)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, handlelength=2.2,
                  ncol=1 if n <= 16 else 2, **kw)


def _robust_k(n: int) -> int:
    """Samples the plotted envelopes may leave above them: none of a few (< 20), else one, or 1% of
    many, so that a single outlier does not set the envelope."""
    return 0 if n < 20 else max(1, int(0.01 * n))


def _fit_envelope(x: np.ndarray, y: np.ndarray, k: int = 0):
    """The (L0, L1) envelope from :func:`landscape.smoothness.fit_l0_l1` leaving ``k`` samples
    above it, or None if unavailable."""
    try:
        from landscape.smoothness import fit_l0_l1
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_l0_l1(x, y, outliers=(k + 0.5) / len(x) if k else 0.0)
    l0, l1 = float(fit.l0), float(fit.l1)
    return (l0, l1) if np.isfinite(l0) and np.isfinite(l1) else None


def _draw_envelope(ax: Axes, x: np.ndarray, y: np.ndarray, log: bool, robust: bool = True,
                   label: bool = True) -> tuple[float, float, int] | None:
    """Draw the (L0, L1) envelope (``gid="envelope"``); returns ``(L0, L1, samples left above)``."""
    ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0)
    if ok.sum() < 2:
        return None
    k = _robust_k(int(ok.sum())) if robust else 0
    fit = _fit_envelope(x[ok], y[ok], k)
    if fit is None:
        return None
    l0, l1 = fit
    lo, hi = x[ok].min(), x[ok].max()
    xs = np.geomspace(max(lo, hi * 1e-12), hi, 100) if log and hi > 0 else np.linspace(lo, hi, 100)
    above = f", {k} sample{'s' * (k > 1)} above" if k else ""
    ax.plot(xs, l0 + l1 * xs, color="black", linestyle="--", linewidth=0.9, zorder=4, gid="envelope",
            label=f"$L_0 + L_1 x$ ($L_0$={l0:.3g}, $L_1$={l1:.3g}{above})" if label else "_envelope")
    return l0, l1, k


# -- smooth drawing through measured points --------------------------------------------------------


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Derivatives of the monotone piecewise-cubic Hermite interpolant (Fritsch & Carlson 1980, as
    scipy's PchipInterpolator): no overshoot, a local minimum only where the data has one."""
    h = np.diff(x)
    d = np.diff(y) / h
    m = np.zeros_like(y)
    if x.size == 2:
        m[:] = d[0]
        return m
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same = (np.sign(d[:-1]) * np.sign(d[1:])) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        inner = (w1 + w2) / (w1 / d[:-1] + w2 / d[1:])
    m[1:-1] = np.where(same, inner, 0.0)

    def edge(h0: float, h1: float, d0: float, d1: float) -> float:
        e = ((2 * h0 + h1) * d0 - h0 * d1) / (h0 + h1)
        if np.sign(e) != np.sign(d0):
            return 0.0
        if np.sign(d0) != np.sign(d1) and abs(e) > abs(3 * d0):
            return 3 * d0
        return e

    m[0] = edge(h[0], h[1], d[0], d[1])
    m[-1] = edge(h[-1], h[-2], d[-1], d[-2])
    return m


def smooth_curve(s: np.ndarray, loss: np.ndarray, n: int = 240) -> tuple[np.ndarray, np.ndarray]:
    """A smooth drawing of the measured points ``(s, loss)``: the monotone cubic (PCHIP)
    interpolant on a dense grid that contains every measured point, with a gap (NaN) where the loss
    is not finite. Only the drawing is interpolated; the measured points are not changed."""
    s = np.asarray(s, dtype=float)
    loss = np.asarray(loss, dtype=float)
    order = np.argsort(s, kind="stable")
    s, loss = s[order], loss[order]
    keep = np.concatenate([[True], np.diff(s) > 0])  # one value per s
    s, loss = s[keep], loss[keep]
    finite = np.isfinite(s) & np.isfinite(loss)
    xs_out: list[np.ndarray] = []
    ys_out: list[np.ndarray] = []
    idx = np.flatnonzero(finite)
    if not idx.size:
        return s, loss
    runs = np.split(idx, np.flatnonzero(np.diff(idx) > 1) + 1)
    span = s[finite].max() - s[finite].min() if idx.size > 1 else 0.0
    for run_idx in runs:
        x, y = s[run_idx], loss[run_idx]
        if x.size == 1:
            xs, ys = x, y
        else:
            m = _pchip_slopes(x, y)
            k = max(2, int(np.ceil(n * (x[-1] - x[0]) / span))) if span > 0 else 2
            grid = np.union1d(np.linspace(x[0], x[-1], k), x)
            j = np.clip(np.searchsorted(x, grid, side="right") - 1, 0, x.size - 2)
            hh = x[j + 1] - x[j]
            t = (grid - x[j]) / hh
            h00, h10 = (1 + 2 * t) * (1 - t) ** 2, t * (1 - t) ** 2
            h01, h11 = t**2 * (3 - 2 * t), t**2 * (t - 1)
            ys = h00 * y[j] + h10 * hh * m[j] + h01 * y[j + 1] + h11 * hh * m[j + 1]
            ys[np.isin(grid, x)] = y  # exactly the measured values at the measured points
            xs = grid
        if xs_out:
            xs_out.append(np.array([np.nan]))
            ys_out.append(np.array([np.nan]))
        xs_out.append(xs)
        ys_out.append(ys)
    return np.concatenate(xs_out), np.concatenate(ys_out)


# -- landscape lines (Pan & Li 2023, Figs. 2-4) ----------------------------------------------------

_X_LABELS = {
    "s": r"step size $s$ (along $-u/\|u\|_2$)",
    "best": r"$s / s^\ast$ (step over the measured best step)",
}


def landscape_lines(
    run: Run,
    step: int | None = None,
    ax: Axes | None = None,
    directions: str | Sequence[str] | None = None,
    *,
    relative: bool = False,
    clip_y: bool = True,
    legend: bool = True,
    x: str = "s",
    merge: bool = True,
    points: bool = True,
    title: str | None = None,
    explain: bool = True,
) -> Axes:
    """Loss along each update direction, ℓ(s) = f(x − s·u/‖u‖₂), against the normalised step s.

    Pan & Li 2023 (Figs. 2-4) plot the loss against the learning rate normalised by the update's
    ℓ2 norm, which is s: every direction starts from the same point f(x) at s = 0 and the depth of a
    curve's minimum reads as a loss. Each curve is drawn smoothly through the measured points (a
    monotone cubic, which adds no minimum the points do not have; :func:`smooth_curve`); the points
    themselves are small dots, and each curve's lowest measured point (``best_step``, ``best_loss``)
    a larger dot, explained in the legend. The x axis spans the part of the curves inside the y
    range. Draws whatever points the ``lines`` table holds (a dense grid or a line search).

    Args:
        run: the run.
        step: measured step (default: the last one with lines).
        ax: where to draw (default: a new two-column-wide figure).
        directions: which directions (see the module docstring; default: the paper's).
        relative: plot ℓ(s) − ℓ(0).
        clip_y: cap the y axis at ℓ(0) + (ℓ(0) − min ℓ) so that directions whose loss explodes
            (SGD's, typically) do not squash the others; the data are not altered.
        legend: draw a legend.
        x: ``"s"`` (the normalised step, default) or ``"best"`` (s divided by each curve's measured
            best step: every minimum at 1, one scale for all directions; a curve whose best step
            is 0 is left out).
        merge: draw equivalent directions once (see the module docstring).
        points: mark the measured points.
        title: the title (default ``"step N"``).
        explain: add the legend entries explaining the markers.

    Returns:
        The Axes. Per curve: a Line2D labelled with the direction (or the merged name) whose data
        are the smooth drawing, ``"_points <label>"`` with the measured (s, loss) exactly and
        ``"_best <label>"`` with the best measured point.
    """
    if x not in _X_LABELS:
        raise ValueError(f"x must be one of {', '.join(_X_LABELS)}, got {x!r}")
    step = _pick_step(run, "lines", step)
    rows = {r["direction"]: r for r in run.rows("lines", step=step)}
    names = _order(run, list(rows), directions)
    entries = _entries(run, names, [step], merge)
    ax = _axes(ax, "double", 0.45)
    drawn = 0
    missing = 0
    for e in entries:
        r = rows[e.name]
        s, loss = np.asarray(r["s"], float), np.asarray(r["loss"], float)
        if r.get("undefined") or not s.size:
            # Not measured at this step (a direction with norm 0, say): named in the legend, with why.
            why = r.get("undefined") or "no points"
            ax.plot([], [], linestyle="none", marker="x", color=_line_kw(_style(run, e.name))["color"],
                    label=f"{e.label}: undefined ({why})")
            missing += 1
            continue
        at0 = np.flatnonzero(s == 0)
        l0 = loss[at0[0]] if at0.size else loss[np.argmin(s)] if s.size else np.nan
        offset = l0 if relative else 0.0
        best_s = float(r["best_step"])
        scale = 1.0
        if x == "best":
            if not (best_s > 0 and math.isfinite(best_s)):
                continue
            scale = best_s
        style = _line_kw(_style(run, e.name))
        xs, ys = smooth_curve(s / scale, loss - offset)
        ax.plot(xs, ys, label=e.label, gid="curve", **style)
        if points:
            ax.plot(s / scale, loss - offset, marker="o", markersize=1.3, linestyle="none", color=style["color"],
                    alpha=style.get("alpha", 1.0), zorder=style["zorder"] + 1, label=f"_points {e.label}")
        ax.plot([best_s / scale], [r["best_loss"] - offset], marker="o", linestyle="none", color=style["color"],
                alpha=style.get("alpha", 1.0), markersize=4.5, markeredgecolor="black", markeredgewidth=0.6,
                zorder=style["zorder"] + 2, label=f"_best {e.label}")
        drawn += 1
    if not drawn and not missing:
        raise NoDataError(f"no direction of run {run.path} has a positive best step at step {step} (x='best')")
    if clip_y:
        _clip_lines(ax)
    ax.set_xlabel(_X_LABELS[x])
    ax.set_ylabel(r"loss $-$ loss(0)" if relative else "loss")
    ax.set_title(f"step {step}" if title is None else title)
    if explain:
        ax.plot([], [], marker="o", markersize=4.5, linestyle="none", color="0.6", markeredgecolor="black",
                markeredgewidth=0.6, label=_BEST_LABEL)
        if points:
            ax.plot([], [], marker="o", markersize=1.3, linestyle="none", color="0.35", label=_POINTS_LABEL)
    if legend:
        _legend(ax, drawn + missing + explain * (1 + points))
    return ax


def _curves(ax: Axes) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float))
            for line in ax.lines if line.get_gid() == "curve"]


def _y_range(ax: Axes) -> tuple[float, float, float] | None:
    """(lowest, start, highest) of the drawn curves: the loss at s = 0 is the start of every curve."""
    lows, starts, highs = [], [], []
    for _xs, ys in _curves(ax):
        fin = np.isfinite(ys)
        if fin.any():
            lows.append(ys[fin].min())
            highs.append(ys[fin].max())
            starts.append(ys[fin][0])
    if not lows:
        return None
    return min(lows), float(np.median(starts)), max(highs)


def _clip_lines(ax: Axes, limits: tuple[float, float] | None = None) -> None:
    """Cap the y axis at start + (start − lowest) (or ``limits``) and end the x axis where every
    curve has left that range (the data are not altered)."""
    if limits is None:
        rng = _y_range(ax)
        if rng is None:
            return
        lo, start, hi = rng
        if not (np.isfinite(start) and start > lo):
            return
        top = start + (start - lo)
        if hi <= top:
            return
        pad = 0.05 * (top - lo)
        limits = (lo - pad, top + pad)
    ax.set_ylim(*limits)
    top = limits[1]
    right = 0.0
    for xs, ys in _curves(ax):
        inside = np.isfinite(xs) & np.isfinite(ys) & (ys <= top)
        if inside.any():
            right = max(right, xs[inside].max())
    bests = [np.nanmax(line.get_xdata()) for line in ax.lines if line.get_label().startswith("_best ")]
    right = max([right] + [1.3 * b for b in bests if np.isfinite(b)])
    if right > 0:
        ax.set_xlim(-0.02 * right, 1.04 * right)


def _families(run: Run, names: Sequence[str], groups: Sequence[_Entry]) -> list[tuple[str, list[str]]]:
    """``[(family, directions)]`` in panel order: the known families first, then the others."""
    optimizer = run.meta.get("optimizer")
    opt_class = optimizer.get("class") if isinstance(optimizer, dict) else None
    trained = run.trained_direction
    rep = {m: e.name for e in groups for m in e.members}
    fams: dict[str, list[str]] = {}
    for n in names:
        if rep.get(n, n) != n:
            continue  # drawn with the representative of its group
        fam = dirs.family(n, trained=trained, optimizer_class=opt_class)
        fams.setdefault(fam, []).append(n)
    order = list(dirs.FAMILY_NAMES)
    return sorted(fams.items(), key=lambda kv: (order.index(kv[0]) if kv[0] in order else len(order),
                                                names.index(kv[1][0])))


def landscape_line_panels(
    run: Run,
    step: int | None = None,
    fig: Figure | None = None,
    directions: str | Sequence[str] | None = None,
    *,
    ncols: int | None = None,
    x: str = "s",
    relative: bool = False,
    merge: bool = True,
    sharey: bool = True,
) -> list[Axes]:
    """The landscape lines as Pan & Li 2023 draw them (Figs. 2-4): one panel per optimizer family,
    the clipped and unclipped variants of a family in one colour at different opacities.

    Each panel is :func:`landscape_lines` of one family's directions (the trained direction joins
    the family of the trained optimizer, or is merged with the recipe it equals). Every panel has
    its own x axis, so that SGD's curve (often 10-100× shorter in s than Adam's) is as readable as
    the others; the y axis is shared (``sharey``) so that the depths compare across panels.

    Args:
        run: the run.
        step: measured step (default: the last one with lines).
        fig: the figure to draw into (default: a new two-column-wide one).
        directions: which directions (default: the paper's).
        ncols: panels per row (default: 3 on a wide figure, 2 on a narrow one).
        x, relative, merge: as in :func:`landscape_lines`.
        sharey: one y range for every panel.

    Returns:
        The panels' Axes, in family order (their titles name the family).
    """
    step = _pick_step(run, "lines", step)
    present = [r["direction"] for r in run.rows("lines", step=step)]
    names = _order(run, present, directions)
    entries = _entries(run, names, [step], merge)
    families = _families(run, names, entries)
    n = len(families)
    fig = _figure(fig, "double", 0.3 * math.ceil(n / 3) + 0.05)
    if ncols is None:
        ncols = 3 if fig.get_figwidth() > 4.5 else 2
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    members = {e.name: e.members for e in entries}
    used = []
    for ax, (fam, fam_names) in zip(axes, families):
        wanted = [m for d in fam_names for m in members.get(d, (d,))]
        landscape_lines(run, step, ax=ax, directions=wanted, relative=relative, clip_y=False, x=x, merge=merge,
                        title=dirs.family_label(fam), explain=False, legend=False)
        used.append(ax)
    if sharey:
        ranges = [r for r in (_y_range(ax) for ax in used) if r is not None]
        if ranges:
            lo = min(r[0] for r in ranges)
            start = float(np.median([r[1] for r in ranges]))
            hi = max(r[2] for r in ranges)
            top = start + (start - lo) if start > lo else hi
            top = min(top, hi) if hi > lo else top
            pad = 0.05 * (top - lo) if top > lo else 0.01 * abs(lo) or 0.01
            for ax in used:
                _clip_lines(ax, (lo - pad, top + pad))
    else:
        for ax in used:
            _clip_lines(ax)
    narrow = fig.get_figwidth() < 4.5
    for i, ax in enumerate(used):
        handles = [h for h in ax.lines if not h.get_label().startswith("_")]
        ax.legend(handles=handles, loc="best", handlelength=1.6 if narrow else 2.2, fontsize=5 if narrow else 5.5,
                  borderaxespad=0.3, labelspacing=0.3)
        if i % ncols:
            ax.set_ylabel("")
        if i < len(used) - ncols:
            ax.set_xlabel("")
        elif x == "s":
            ax.set_xlabel(r"step size $s$")
    from matplotlib.lines import Line2D

    markers = [Line2D([], [], marker="o", markersize=4.5, linestyle="none", color="0.6", markeredgecolor="black",
                      markeredgewidth=0.6),
               Line2D([], [], marker="o", markersize=1.3, linestyle="-", linewidth=0.8, color="0.35")]
    fig.legend(markers, [_BEST_LABEL, "measured points (joined smoothly)"], loc="outside lower center",
               ncol=2, fontsize=6, handlelength=1.8)
    fig.suptitle(f"loss along each update direction, step {step}", fontsize=8)
    return used


# -- sharpness over training -----------------------------------------------------------------------


def _over_steps(
    run: Run, column: str, ax: Axes | None, directions: str | Sequence[str] | None, exclude: Sequence[str] = (),
    merge: bool = True,
) -> tuple[Axes, list[str], list[int]]:
    """Draw ``|column|`` of each direction over the measured steps on a log axis, marking negative
    values (open circles) and δ-shifted ones (triangles); returns the Axes, the directions drawn and
    the steps where the ratio to SGD is undefined (for ``column == "ratio_to_sgd"``)."""
    from landscape.report import REFERENCE, sharpness_records

    records = sharpness_records(run)  # applies the ratio rule, also to runs written before it
    if not records:
        raise NoDataError(f"run {run.path} has no rows in table 'sharpness'")
    present = list(dict.fromkeys(r["direction"] for r in records))
    if directions is None:
        present = [d for d in present if d not in exclude]
    names = _order(run, present, directions)
    ratio = column == "ratio_to_sgd"
    ref_shifted = {r["step"]: bool(r["shifted"]) for r in records if r["direction"] == REFERENCE}
    undefined = sorted({r["step"] for r in records if r["direction"] == REFERENCE and r["ratio_to_sgd"] is None})
    ax = _axes(ax)
    any_negative = any_shifted = False
    drawn = 0
    for entry in _entries(run, names, None, merge):
        name = entry.name
        rs = sorted((r for r in records if r["direction"] == name), key=lambda r: r["step"])
        steps = np.array([r["step"] for r in rs])
        value = np.array([np.nan if r[column] is None else r[column] for r in rs], dtype=float)
        shifted = np.array([bool(r["shifted"]) or (ratio and ref_shifted.get(r["step"], False)) for r in rs])
        if not np.isfinite(value).any():
            continue
        y = np.abs(value)
        y[value == 0] = np.nan  # not representable on a log axis
        style = _line_kw(_style(run, name))
        label = entry.label
        ax.plot(steps, y, marker="o", markersize=2.5, label=label, **style)
        neg = (value < 0) & ~shifted
        if neg.any():
            any_negative = True
            ax.plot(steps[neg], y[neg], marker="o", markersize=3.5, linestyle="none", color=style["color"],
                    markerfacecolor="white", zorder=style["zorder"] + 1, label=f"_negative {label}")
        sh = shifted & np.isfinite(y)
        if sh.any():
            any_shifted = True
            # filled: positive after the shift; open: still negative
            for mask, face, tag in ((sh & (value > 0), style["color"], "_shifted"),
                                    (sh & (value < 0), "white", "_shifted negative")):
                if mask.any():
                    any_negative |= tag.endswith("negative")
                    ax.plot(steps[mask], y[mask], marker="^", markersize=4.5, linestyle="none", color=style["color"],
                            markerfacecolor=face, zorder=style["zorder"] + 2, label=f"{tag} {label}")
        drawn += 1
    if not drawn:
        raise NoDataError(f"run {run.path} has no finite {column!r} values for {', '.join(names) or 'any direction'}")
    if any_negative:  # legend entries explaining the markers
        ax.plot([], [], marker="o", markersize=3.5, linestyle="none", color="0.4", markerfacecolor="white",
                label=_NEGATIVE_LABEL)
    if any_shifted:
        ax.plot([], [], marker="^", markersize=4.5, linestyle="none", color="0.4", label=_SHIFTED_LABEL)
    if ratio and undefined:
        for i, step in enumerate(undefined):
            ax.axvline(step, color="0.6", linestyle=(0, (1, 2)), linewidth=0.8, zorder=0,
                       label=_UNDEFINED_LABEL if i == 0 else f"_undefined {step}")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    return ax, names, undefined


def _n_legend(ax: Axes) -> int:
    return sum(not line.get_label().startswith("_") for line in ax.lines)


def sharpness_ratio(run: Run, ax: Axes | None = None, directions: str | Sequence[str] | None = None, *,
                    merge: bool = True) -> Axes:
    """Directional sharpness relative to SGD, S(u_alg)/S(u_sgd), over training (Pan & Li 2023,
    Tables 1, 4-7).

    The ratio is defined only where SGD's reported sharpness is > 0 (a ratio of two negative values
    is not "flatter"): at steps where it is not, no direction has a point, and a dotted vertical
    line marks the step (legend: "ratio undefined: SGD sharpness ≤ 0"). Log y axis of |ratio|: a
    negative ratio (this direction's curvature negative, SGD's positive) is an open circle at its
    absolute value; a ratio built on a δ-shifted value (this direction's or SGD's) is a triangle;
    both are explained in the legend. NaN and zero ratios are gaps. ``sgd`` itself (ratio 1) is the
    dotted reference line y = 1.

    Args:
        run: the run.
        ax: where to draw (default: a new one-column figure).
        directions: which directions (default: the paper's but ``sgd``, in the run's order).
        merge: draw equivalent directions once.

    Returns:
        The Axes; one Line2D per direction labelled with its name, y data = |ratio_to_sgd|.
    """
    ax, names, undefined = _over_steps(run, "ratio_to_sgd", ax, directions, exclude=("sgd",), merge=merge)
    ax.axhline(1.0, color=recipe_style("sgd")["color"], linestyle=":", linewidth=0.9, label="sgd (= 1)")
    ax.set_ylabel(r"sharpness ratio to SGD $S(u)/S(u_{\mathrm{sgd}})$")
    _legend(ax, _n_legend(ax))
    return ax


def sharpness_over_time(run: Run, ax: Axes | None = None, directions: str | Sequence[str] | None = None, *,
                        merge: bool = True) -> Axes:
    """Reported directional sharpness ûᵀHû of each direction over training.

    Log y axis of |sharpness|; negative values are open circles at their absolute value, δ-shifted
    values ûᵀ∇²f(x − δû)û are triangles (filled when positive after the shift, open when still
    negative), both explained in the legend; NaN and zeros are gaps.

    Returns:
        The Axes; one Line2D per direction labelled with its name, y data = |sharpness|.
    """
    ax, names, _ = _over_steps(run, "sharpness", ax, directions, merge=merge)
    ax.set_ylabel(r"directional sharpness $|\hat u^\top H \hat u|$")
    _legend(ax, _n_legend(ax))
    return ax


# -- update histograms (Pan & Li 2023, Fig. 1) -----------------------------------------------------

#: Directions of Pan & Li 2023, Fig. 1, plus the trained direction: the default of :func:`update_histograms`.
FIG1_DIRECTIONS = ("sgd", "adam", "adafactor")

_NORMALISE_LABELS = {
    "rms": r"$\log_{10}\,(|u_i| / \mathrm{RMS}(u))$,  $\mathrm{RMS}(u) = \|u\|_2/\sqrt{n}$",
    "l2": r"$\log_{10}\,(|u_i| / \|u\|_2)$",
    None: r"$\log_{10} |u_i|$",
}


def _fig1_directions(run: Run, step: int | None = None) -> list[str] | None:
    """Fig. 1's directions that the run has (and the trained one); None (the default) if none."""
    present = {r["direction"] for r in run.rows("histograms", step=_pick_step(run, "histograms", step))}
    chosen = [d for d in FIG1_DIRECTIONS if d in present]
    if not chosen:
        return None
    trained = run.trained_direction
    return chosen + ([trained] if trained in present else [])


def update_histograms(
    run: Run,
    step: int | None = None,
    ax: Axes | None = None,
    directions: str | Sequence[str] | None = None,
    *,
    density: bool = True,
    normalize: str | None = "rms",
    trim: float = 1e-4,
    merge: bool = True,
) -> Axes:
    """Histogram of the update's coordinates on a log scale, every direction normalised the same way
    (Pan & Li 2023, Fig. 1).

    Directions differ in scale by decades (the trained step includes the learning rate, the
    recipes do not), so each is divided by its own size before the histogram is compared:
    ``normalize="rms"`` (default) plots log10(|u_i| / RMS(u)), RMS(u) = ‖u‖₂/√n over the n measured
    coordinates (a uniform update sits at 0); ``"l2"`` plots log10(|u_i| / ‖u‖₂); ``None`` the raw
    log10|u_i|. ‖u‖₂ is the stored ``update_norm`` of the sharpness table (the same coordinates). The
    x label says which. Drawn as step outlines (``ax.stairs``); with ``density`` the height is the
    fraction of *all* coordinates (exact zeros, outside every bin, count in the total).

    Args:
        run: the run.
        step: measured step (default: the last one).
        ax: where to draw.
        directions: default: those of the paper's Fig. 1 (SGD, Adam, Adafactor) and the trained
            direction, when present; else the paper's families.
        density: heights as fractions of all coordinates (else counts).
        normalize: ``"rms"``, ``"l2"`` or ``None``.
        trim: the x axis leaves out the outer bins holding less than this fraction of any drawn
            direction's coordinates (0: every bin); the bins are drawn, only the limits change.
        merge: draw equivalent directions once.

    Returns:
        The Axes; one StepPatch per direction in ``ax.patches``, labelled with its name; its edges
        are the stored edges minus log10 of the normaliser.
    """
    if normalize not in _NORMALISE_LABELS:
        raise ValueError(f"normalize must be 'rms', 'l2' or None, got {normalize!r}")
    step = _pick_step(run, "histograms", step)
    rows = {r["direction"]: r for r in run.rows("histograms", step=step)}
    if directions is None:
        directions = _fig1_directions(run, step)
    names = _order(run, list(rows), directions)
    norms = {}
    if normalize is not None:
        if not run.has("sharpness"):
            raise NoDataError(f"run {run.path} has no sharpness rows: the update norms that normalise the "
                              "histograms are stored there (use normalize=None)")
        norms = {r["direction"]: r["update_norm"] for r in run.rows("sharpness", step=step)}
    ax = _axes(ax, "double", 0.45)
    lows, highs = [], []
    drawn = 0
    for e in _entries(run, names, [step], merge):
        r = rows[e.name]
        counts = np.asarray(r["counts"], dtype=float)
        n = counts.sum() + r["zeros"]
        edges = np.asarray(r["edges"], dtype=float)
        if normalize is not None:
            norm = norms.get(e.name)
            if norm is None or not (norm > 0 and math.isfinite(norm)) or n == 0:
                warnings.warn(f"update_histograms: {e.name} has no positive update norm at step {step}; left out",
                              stacklevel=2)
                continue
            size = norm / math.sqrt(n) if normalize == "rms" else norm
            edges = edges - math.log10(size)
        values = counts / n if density and n > 0 else counts
        style = _line_kw(_style(run, e.name))
        ax.stairs(values, edges, label=e.label, **style)
        drawn += 1
        frac = counts / n if n > 0 else counts
        shown = np.flatnonzero(frac >= trim) if trim > 0 else np.flatnonzero(counts > 0)
        if shown.size:
            lows.append(edges[shown[0]])
            highs.append(edges[shown[-1] + 1])
    if not drawn:
        raise NoDataError(f"no direction of run {run.path} could be drawn at step {step}")
    if lows:
        lo, hi = min(lows), max(highs)
        pad = 0.03 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel(_NORMALISE_LABELS[normalize])
    ax.set_ylabel("fraction of coordinates" if density else "coordinates")
    ax.set_title(f"step {step}")
    _legend(ax, drawn)
    return ax


# -- cosine heatmap --------------------------------------------------------------------------------


def cosine_heatmap(run: Run, step: int | None = None, ax: Axes | None = None,
                   directions: str | Sequence[str] | None = None, *, annotate: bool = True,
                   colorbar: bool = True) -> Axes:
    """Cosine similarity between every pair of directions at one step: the lower triangle of the
    symmetric matrix (the diagonal, all ones, is left out).

    Colours: a sequential scale from 0 to 1 (``viridis``) when every value shown is ≥ 0, else the
    diverging ``RdBu_r`` from −1 to 1. Pairs with cos ≈ 1 are the directions the other figures name
    together (``adam ≡ adam (trained)``).

    Returns:
        The Axes; ``ax.images[0].get_array()`` is the matrix with rows = tick labels on the y axis
        (directions 2..n) and columns = x tick labels (directions 1..n−1); the upper triangle and a
        pair without a stored value are NaN (blank).
    """
    step = _pick_step(run, "cosine", step)
    rows = run.rows("cosine", step=step)
    present = _sorted_directions(run, [r["a"] for r in rows] + [r["b"] for r in rows])
    names = _order(run, present, directions)
    if len(names) < 2:
        raise NoDataError(f"a cosine heatmap needs two directions; run {run.path} has {names} at step {step}")
    index = {d: i for i, d in enumerate(names)}
    n = len(names)
    full = np.full((n, n), np.nan)
    for r in rows:
        if r["a"] in index and r["b"] in index:
            i, j = index[r["a"]], index[r["b"]]
            full[i, j] = full[j, i] = r["cosine"]
    matrix = full[1:, :-1].copy()
    matrix[np.triu_indices(n - 1, k=1)] = np.nan  # row i (direction i+1) against columns j ≤ i
    finite = matrix[np.isfinite(matrix)]
    sequential = finite.size > 0 and finite.min() >= 0
    side = min(TEXT_WIDTH, max(COLUMN_WIDTH, 0.3 * n + 1.2))
    ax = _axes(ax, side, 0.85)
    cmap, lo = ("viridis", 0.0) if sequential else ("RdBu_r", -1.0)
    image = ax.imshow(matrix, cmap=cmap, vmin=lo, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n - 1), names[:-1], rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n - 1), names[1:])
    ax.grid(False)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    # cell size in points, estimated from the figure (tick labels and the colour bar take about 1.6 in)
    cell = max(ax.figure.get_figwidth() - 1.6, 0.5) / max(n - 1, 1) * 72
    size = min(6.0, cell / 2.3)
    if annotate and size >= 3.5:  # smaller is unreadable: the colours alone then
        import matplotlib as mpl

        colormap = mpl.colormaps[cmap]
        for i in range(n - 1):
            for j in range(i + 1):
                v = matrix[i, j]
                if np.isfinite(v):
                    r, g, b, _ = colormap((v - lo) / (1.0 - lo))
                    dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
                    ax.text(j, i, _short_cosine(v), ha="center", va="center", fontsize=size,
                            color="white" if dark else "black")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_title(f"step {step}")
    return ax


def _short_cosine(v: float) -> str:
    """Two decimals without the leading zero (``.55``, ``−.12``, ``1``), as heatmap cells print them."""
    text = f"{v:.2f}"
    if text in ("1.00", "-1.00"):
        return text[:-3].replace("-", "−")
    return text.replace("0.", ".", 1).replace("-", "−")


# -- training loss ---------------------------------------------------------------------------------


def training_loss(run: Run, ax: Axes | None = None) -> Axes:
    """Training loss per step (from the ``steps`` table); skipped steps are red crosses and the
    steps where directions were measured are open circles on the curve.

    Returns:
        The Axes; the Line2D labelled ``"training loss"`` holds every step's loss.
    """
    cols = run.columns("steps")
    if not cols["step"].size:
        raise NoDataError(f"run {run.path} has no rows in table 'steps'")
    order = np.argsort(cols["step"], kind="stable")
    steps, loss, status = cols["step"][order], cols["loss"][order], cols["status"][order]
    ax = _axes(ax)
    ax.plot(steps, loss, color="0.15", label="training loss")
    measured = np.isin(steps, run.steps("sharpness"))
    if measured.any():
        ax.plot(steps[measured], loss[measured], marker="o", markersize=3, linestyle="none", color="0.15",
                markerfacecolor="white", label="measured")
    skipped = status == "skipped"
    if skipped.any():
        ax.plot(steps[skipped], loss[skipped], marker="x", markersize=4, linestyle="none", color="#d62728",
                label="skipped")
    ax.set_xlabel("training step")
    ax.set_ylabel("training loss")
    if measured.any() or skipped.any():
        ax.legend(loc="best")
    return ax


# -- smoothness (Crawshaw et al. 2022, Figs. 1 and 3) ----------------------------------------------


def smoothness_scatter(run: Run, ax: Axes | None = None, *, loglog: bool = False, envelope: bool = True,
                       colorbar: bool = True, robust: bool = True) -> Axes:
    """Local smoothness L̂_t against the gradient norm ‖∇f(x_t)‖, coloured by step (Crawshaw et al.
    2022, Fig. 1).

    When :func:`landscape.smoothness.fit_l0_l1` is available (and ``envelope``), the fitted upper
    envelope L0 + L1·‖∇f‖ is drawn as a dashed black line (``gid="envelope"``); with ``robust``
    (default) it may leave one sample (1% of many) above it, so that a single outlier does not set
    it; the legend says how many.

    Returns:
        The Axes; ``ax.collections[0].get_offsets()`` are the (grad_norm, l_hat) points and its
        ``get_array()`` the steps.
    """
    cols = run.columns("smoothness")
    if not cols["step"].size:
        raise NoDataError(f"run {run.path} has no rows in table 'smoothness'")
    x, y, steps = cols["grad_norm"], cols["l_hat"], cols["step"]
    ax = _axes(ax)
    points = ax.scatter(x, y, c=steps, cmap="viridis", s=8, linewidths=0, zorder=3)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    if envelope:
        _draw_envelope(ax, x, y, loglog, robust)
        if any(line.get_gid() == "envelope" for line in ax.lines):  # above the axes: the data stay visible
            ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), borderaxespad=0.2)
    if colorbar:
        ax.figure.colorbar(points, ax=ax, label="step")
    ax.set_xlabel(r"gradient norm $\|\nabla f(x_t)\|$")
    ax.set_ylabel(r"local smoothness $\hat L_t$")
    return ax


def _layers(run: Run) -> list[str]:
    rows = run.query("SELECT layer FROM coord_smoothness GROUP BY layer ORDER BY MIN(rowid)") \
        if run.has("coord_smoothness") else []
    return [r["layer"] for r in rows]


#: Layer kinds, in panel order, with the name parts that mark them (a parent module name decides
#: before the parameter's own: ``attn.c_proj`` is attention, ``mlp.c_proj`` MLP).
_KIND_PARTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("embedding", ("tok", "pos", "wte", "wpe", "embed", "embeds", "embedding", "embeddings", "embed_tokens",
                   "word_embeddings", "position_embeddings", "token_type_embeddings", "shared", "patch_embed")),
    ("attention", ("attn", "attention", "self_attn", "cross_attn", "qkv", "c_attn", "q_proj", "k_proj", "v_proj",
                   "o_proj", "out_proj", "query", "key", "value", "in_proj_weight", "in_proj_bias", "proj",
                   "self_attention", "q", "k", "v", "o")),
    ("MLP", ("mlp", "ffn", "feed_forward", "feedforward", "fc", "fc1", "fc2", "c_fc", "up_proj", "down_proj",
             "gate_proj", "linear1", "linear2", "intermediate", "w1", "w2", "w3", "wi", "wo", "dense_h_to_4h",
             "dense_4h_to_h")),
    ("norm", ("ln", "ln1", "ln2", "ln_1", "ln_2", "ln_f", "norm", "norm1", "norm2", "layernorm", "layer_norm",
              "final_layer_norm", "input_layernorm", "post_attention_layernorm", "rmsnorm", "bn", "bn1", "bn2")),
    ("head", ("lm_head", "head", "classifier", "score", "output", "decoder", "fc_out", "pooler")),
)
LAYER_KINDS = tuple(k for k, _ in _KIND_PARTS) + ("other",)


def layer_kind(name: str) -> str:
    """The kind of a parameter, from its name: ``"embedding"``, ``"attention"``, ``"MLP"``,
    ``"norm"``, ``"head"`` or ``"other"`` (``blocks.0.attn.c_proj.weight`` -> attention,
    ``transformer.h.3.ln_2.bias`` -> norm)."""
    parts = [p.lower() for p in name.split(".") if not p.isdigit()]
    if parts and parts[-1] in ("weight", "bias"):
        parts = parts[:-1]
    for part in parts[:-1] + parts[-1:]:  # parents first, then the module itself
        for kind, marks in _KIND_PARTS:
            if part in marks or (kind == "norm" and "norm" in part) or (kind == "embedding" and "embed" in part):
                if kind == "attention" and part == "proj" and any(p in ("mlp", "ffn") for p in parts):
                    continue
                return kind
    return "other"


def default_layers(layers: Sequence[str], per_kind: int = 2, max_panels: int = 9) -> list[str]:
    """A page-sized choice of layers: up to ``per_kind`` of each kind (:func:`layer_kind`), the
    first and the last of that kind, weights before biases, at most ``max_panels``; ordered by kind
    (embedding, attention, MLP, norm, head, other), then as in the model."""
    by_kind: dict[str, list[str]] = {}
    for name in layers:
        by_kind.setdefault(layer_kind(name), []).append(name)
    picks: list[str] = []
    rounds = [[] for _ in range(per_kind)]
    for kind in LAYER_KINDS:
        names = by_kind.get(kind, [])
        weights = [n for n in names if not n.endswith("bias")] or names
        chosen = list(dict.fromkeys([weights[0], weights[-1]] if len(weights) > 1 else weights))[:per_kind]
        for i, n in enumerate(chosen):
            rounds[i].append(n)
    for r in rounds:  # one of each kind first, then the second of each
        picks.extend(n for n in r if n not in picks)
    picks = picks[:max_panels]
    kind_rank = {k: i for i, k in enumerate(LAYER_KINDS)}
    position = {n: i for i, n in enumerate(layers)}
    return sorted(picks, key=lambda n: (kind_rank[layer_kind(n)], position[n]))


def coordinate_smoothness(run: Run, layer: str | None = None, ax: Axes | None = None, *, loglog: bool = True,
                          envelope: bool = True, colorbar: bool = True, robust: bool = True,
                          title: str | None = None) -> Axes:
    """Coordinate-wise smoothness of one layer (Crawshaw et al. 2022, Fig. 3): for the sampled
    coordinates j, |∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}| against
    min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|), pooled over the measured steps and coloured by step.

    On log-log axes (default) points with a non-positive or non-finite coordinate are left out.
    The (L0, L1) envelope is overlaid as in :func:`smoothness_scatter` (robust to one outlier).

    Args:
        layer: parameter name (default: the first stored layer).

    Returns:
        The Axes; ``ax.collections[0].get_offsets()`` are the (min_grad, ratio) points.
    """
    layers = _layers(run)
    if not layers:
        raise NoDataError(f"run {run.path} has no rows in table 'coord_smoothness'")
    if layer is None:
        layer = layers[0]
    elif layer not in layers:
        raise NoDataError(f"layer {layer!r} not in run {run.path}; layers: {', '.join(layers)}")
    rows = run.rows("coord_smoothness", layer=layer)
    return _coordinate_panel(ax, layer, rows, loglog=loglog, envelope=envelope, colorbar=colorbar, robust=robust,
                             title=title)


def _coordinate_panel(ax: Axes | None, layer: str, rows: list[dict[str, Any]], *, loglog: bool, envelope: bool,
                      colorbar: bool, robust: bool, title: str | None, norm: Any = None,
                      legend: bool = True) -> Axes:
    x = np.concatenate([np.ravel(r["min_grad"]) for r in rows])
    y = np.concatenate([np.ravel(r["ratio"]) for r in rows])
    c = np.concatenate([np.full(np.size(r["ratio"]), r["step"]) for r in rows])
    keep = np.isfinite(x) & np.isfinite(y)
    if loglog:
        keep &= (x > 0) & (y > 0)
    ax = _axes(ax)
    points = ax.scatter(x[keep], y[keep], c=c[keep], cmap="viridis", s=5, linewidths=0, zorder=3, norm=norm)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    fit = None
    if envelope:
        fit = _draw_envelope(ax, x[keep], y[keep], loglog, robust, label=legend)
        if fit is not None and legend:
            ax.legend(loc="best", fontsize=5.5)
    if colorbar:
        ax.figure.colorbar(points, ax=ax, label="step")
    title = layer if title is None else title
    if envelope and not legend and fit is not None:  # the numbers under the title; the figure's legend explains the line
        title += f"\n$L_0$ = {fit[0]:.3g}, $L_1$ = {fit[1]:.3g}"
    ax.set_title(title)
    ax.set_xlabel(r"$\min(|\partial_j f(x_t)|, |\partial_j f(x_{t+1})|)$")
    ax.set_ylabel(r"$|\Delta \partial_j f| / |\Delta x_j|$")
    return ax


def _check_layers(run: Run, layers: str | Sequence[str] | None) -> list[str]:
    """The layers ``layers`` selects (None: :func:`default_layers`), or a NoDataError naming the
    ones that match nothing."""
    stored = _layers(run)
    if not stored:
        raise NoDataError(f"run {run.path} has no rows in table 'coord_smoothness'")
    if layers is None:
        return default_layers(stored)
    if isinstance(layers, str) and layers == "all":
        return stored
    items = [layers] if isinstance(layers, str) else list(layers)
    patterns = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    unknown = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in stored)]
    if unknown:
        raise NoDataError(f"layer(s) {', '.join(map(repr, unknown))} not in run {run.path}; "
                          f"layers: {', '.join(stored)}")
    return [n for n in stored if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def coordinate_smoothness_grid(run: Run, fig: Figure | None = None, layers: str | Sequence[str] | None = None,
                               *, ncols: int | None = None, loglog: bool = True) -> list[Axes]:
    """Coordinate-wise smoothness of several layers, one panel each, with one colour bar (steps).

    Args:
        run: the run.
        fig: the figure (default: a new two-column-wide one, as tall as the panels need).
        layers: ``None``: a page-sized selection (:func:`default_layers`: a few layers of each kind,
            embedding, attention, MLP, norm, head); ``"all"``; or names and shell patterns
            (``"blocks.0.*"``).
        ncols: panels per row (default: 3 on a wide figure, 2 on a narrow one).

    Returns:
        The panels' Axes (titled ``"<kind>: <layer>"``).
    """
    chosen = _check_layers(run, layers)
    n = len(chosen)
    wide = fig is None or fig.get_figwidth() > 4.5
    if ncols is None:
        ncols = 3 if wide else 2
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig = _figure(fig, "double", 0.3 * nrows + 0.05)
    fig.set_size_inches(fig.get_figwidth(), fig.get_figwidth() / ncols * 0.78 * nrows + 0.35)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    all_rows = run.rows("coord_smoothness")
    by_layer: dict[str, list[dict[str, Any]]] = {}
    for r in all_rows:
        by_layer.setdefault(r["layer"], []).append(r)
    steps = [r["step"] for r in all_rows]
    from matplotlib.colors import Normalize
    from matplotlib.ticker import NullLocator

    norm = Normalize(min(steps), max(steps)) if steps else None
    k_max = 0
    for ax, layer in zip(axes, chosen):
        _coordinate_panel(ax, layer, by_layer[layer], loglog=loglog, envelope=True, colorbar=False, robust=True,
                          title=f"{layer_kind(layer)}: {layer}", norm=norm, legend=False)
        ax.title.set_fontsize(6.5)
        if loglog:  # minor ticks of many small log axes cost 60% of the drawing time and read as noise
            ax.xaxis.set_minor_locator(NullLocator())
            ax.yaxis.set_minor_locator(NullLocator())
        n_points = int(np.sum([np.size(r["ratio"]) for r in by_layer[layer]]))
        k_max = max(k_max, _robust_k(n_points))
    for i, ax in enumerate(axes[:n]):
        if i % ncols:
            ax.set_ylabel("")
        if i < n - ncols:
            ax.set_xlabel("")
    mappables = [c for ax in axes[:n] for c in ax.collections if c.get_array() is not None]
    if mappables:
        fig.colorbar(mappables[0], ax=list(axes[:n]), label="step", shrink=0.6, aspect=40)
    if any(line.get_gid() == "envelope" for ax in axes[:n] for line in ax.lines):
        from matplotlib.lines import Line2D

        above = f", leaving {k_max} sample{'s' * (k_max > 1)} above" if k_max else ""
        fig.legend([Line2D([], [], color="black", linestyle="--", linewidth=0.9)],
                   [f"upper envelope $L_0 + L_1 x$ of the samples{above}"], loc="outside lower center", fontsize=6)
    return list(axes[:n])


# -- comparing runs ---------------------------------------------------------------------------------

_RUN_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_RUN_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def compare_ratios(runs: Sequence[Run], ax: Axes | None = None, directions: str | Sequence[str] | None = None, *,
                   labels: Sequence[str] | None = None, step: int | None = None) -> Axes:
    """The same directions measured on different trajectories, side by side (Pan & Li 2023 compare
    the SGD trajectory with the Adam trajectory, Tables 4-7): for every direction, each run's median
    ratio to SGD over its measured steps (or the ratio at ``step``) as a marker on a log axis, with a
    bar from the run's lowest to its highest ratio over the steps.

    Args:
        runs: two or more runs.
        ax: where to draw.
        directions: default: the paper's directions present in any run (``sgd`` left out: it is 1).
        labels: one per run (default: the run folders' names).
        step: compare at this step (measured in every run) instead of the medians.

    Returns:
        The Axes; one Line2D per run labelled with its label, x data = the ratios (NaN where a run
        lacks the direction), y data = the row of each direction (tick labels, top to bottom).
    """
    from landscape.report import compare_records

    records, labels, names = compare_records(runs, directions=directions, labels=labels, step=step)
    names = [d for d in names if d != "sgd"] if directions is None else names
    if not names:
        raise NoDataError("the runs have no direction in common to compare")
    ax = _axes(ax, "single", 0.25 + 0.11 * len(names))
    ys = np.arange(len(names))[::-1]
    k = len(labels)
    offsets = (np.arange(k) - (k - 1) / 2) * min(0.6 / max(k, 1), 0.22)
    for i, label in enumerate(labels):
        xs, lo, hi = [], [], []
        for d in names:
            rec = records.get((label, d))
            xs.append(rec["ratio"] if rec and rec["ratio"] is not None else np.nan)
            lo.append(rec["min"] if rec and rec["min"] is not None else np.nan)
            hi.append(rec["max"] if rec and rec["max"] is not None else np.nan)
        xs, lo, hi = (np.abs(np.asarray(v, dtype=float)) for v in (xs, lo, hi))
        color, marker = _RUN_COLORS[i % len(_RUN_COLORS)], _RUN_MARKERS[i % len(_RUN_MARKERS)]
        if step is None:
            ax.hlines(ys + offsets[i], lo, hi, color=color, linewidth=0.8, alpha=0.6, zorder=2)
        ax.plot(xs, ys + offsets[i], marker=marker, markersize=3.5, linestyle="none", color=color, label=label,
                zorder=3)
    ax.axvline(1.0, color=recipe_style("sgd")["color"], linestyle=":", linewidth=0.9, zorder=1)
    ax.set_yticks(ys, names)
    ax.set_xscale("log")
    ax.grid(axis="y", visible=False)
    what = "median over the measured steps (bar: lowest to highest)" if step is None else f"at step {step}"
    ax.set_xlabel(r"sharpness ratio to SGD $|S(u)/S(u_{\mathrm{sgd}})|$" + f", {what}")
    ax.legend(loc="best", title="trajectory")
    return ax


# -- captions and saving ---------------------------------------------------------------------------


def _run_context(run: Run) -> str:
    meta = run.meta
    parts = [f"run {run.path.name}"]
    model = meta.get("model")
    if isinstance(model, dict) and model.get("class"):
        size = f", {model['n_params']:,} parameters" if isinstance(model.get("n_params"), int) else ""
        parts.append(f"{model['class']}{size}")
    optimizer = meta.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("class") and optimizer.get("class") != "unknown":
        parts.append(f"trained with {optimizer['class']}")
    return "; ".join(parts)


def _steps_text(steps: Sequence[int]) -> str:
    if not steps:
        return "no steps"
    if len(steps) == 1:
        return f"step {steps[0]}"
    return f"{len(steps)} measured steps ({steps[0]}–{steps[-1]})"


def _merged_text(run: Run, names: Sequence[str] | None, steps: Sequence[int] | None) -> str:
    if names is None or len(names) < 2:
        return ""
    entries = [e for e in _entries(run, list(names), steps, True) if len(e.members) > 1]
    if not entries:
        return ""
    return " Drawn once: " + "; ".join(e.label for e in entries) + " (cosine ≈ 1 and equal sharpness at every step shown)."


def figure_caption(run: Run, name: str, step: int | None = None, *, directions: str | Sequence[str] | None = None) -> str:
    """One line saying what a saved figure shows, measured on which run and step.

    Args:
        run: the run.
        name: a figure name of :data:`FIGURE_NAMES` (a ``_step<N>`` suffix is read as ``step``).
        step: the step of a per-step figure (default: the last one measured).
        directions: the figure's ``directions=``.
    """
    m = re.fullmatch(r"(.+)_step(\d+)", name)
    if m:
        name, step = m.group(1), int(m.group(2))
    ctx = _run_context(run)
    measured = run.steps("sharpness")
    present = run.directions

    def chosen(default: Any = None) -> list[str] | None:
        try:
            return _order(run, present, directions if directions is not None else default)
        except NoDataError:
            return None

    if name == "training_loss":
        n = len(run.steps("steps"))
        return f"Training loss per step ({n} steps; circles: the {len(measured)} measured steps); {ctx}."
    if name in ("sharpness_over_time", "sharpness_ratio"):
        what = ("Directional sharpness ûᵀ∇²f(x)û of each update direction relative to SGD's, S(u)/S(u_sgd) "
                "(Pan & Li 2023, Tables 1, 4–7)" if name == "sharpness_ratio" else
                "Directional sharpness ûᵀ∇²f(x)û (û = u/‖u‖₂) of each update direction on the probe batch")
        return (f"{what}, at {_steps_text(measured)}; {ctx}. Open markers: negative values (|value| shown); "
                f"triangles: δ-shifted values ûᵀ∇²f(x − δû)û.{_merged_text(run, chosen(), None)}")
    if name == "landscape_lines":
        step = step if step is not None else (run.steps("lines") or [None])[-1]
        return (f"Loss f(x − s·u/‖u‖₂) on the probe batch along each update direction at step {step}, one panel per "
                f"optimizer family, the clipped variants at a lower opacity (Pan & Li 2023, Figs. 2–4); s is the "
                f"step normalised by the update's ℓ2 norm; large dots: the lowest measured loss; the lines "
                f"interpolate the measured points (small dots); {ctx}.{_merged_text(run, chosen(), [step])}")
    if name == "update_histograms":
        step = step if step is not None else (run.steps("histograms") or [None])[-1]
        return (f"Histogram of the update coordinates log10(|u_i|/RMS(u)), each direction divided by its own "
                f"RMS ‖u‖₂/√n (Pan & Li 2023, Fig. 1), at step {step}; {ctx}.")
    if name == "cosine_heatmap":
        step = step if step is not None else (run.steps("cosine") or [None])[-1]
        return f"Cosine similarity between the update directions at step {step}; {ctx}."
    if name == "smoothness":
        n = len(run.steps("smoothness"))
        return (f"Local smoothness L̂_t along the real training step against the gradient norm ‖∇f(x_t)‖ at {n} "
                f"steps, with the fitted envelope L0 + L1·‖∇f‖ (Crawshaw et al. 2022, §5.2, Fig. 1); {ctx}.")
    if name == "coordinate_smoothness":
        return (f"Coordinate-wise smoothness |Δ∂_j f|/|Δx_j| against min(|∂_j f(x_t)|, |∂_j f(x_t+1)|) for sampled "
                f"coordinates of a selection of layers, pooled over the measured steps, with the (L0, L1) envelope "
                f"(Crawshaw et al. 2022, Fig. 3); {ctx}.")
    curvature = _curvature_caption(run, name, ctx)
    if curvature is not None:
        return curvature
    return f"{name}; {ctx}."


def _curvature_caption(run: Run, name: str, ctx: str) -> str | None:
    """Captions of the curvature figures (:mod:`landscape.curvature_plots`)."""
    def steps(table: str) -> str:
        return _steps_text(run.steps(table))

    if name == "edge_of_stability":
        return (f"Top Hessian eigenvalue λ_max over training (and λ_max(P⁻¹H) of the preconditioned recipes) against "
                f"the optimizer's stability threshold, e.g. 2/η for gradient descent (Cohen et al. 2021; 2022), at "
                f"{steps('eigenvalues')}; {ctx}.")
    if name == "eigenvalues":
        return (f"Top (solid) and most negative (dashed) eigenvalues by Lanczos iteration, whole model, at "
                f"{steps('eigenvalues')}; {ctx}.")
    if name == "trace":
        return (f"Trace estimates (Hutch++ solid, Hutchinson dotted) with ± 1 standard error, at {steps('trace')}; "
                f"{ctx}.")
    if name == "spectral_density":
        last = (run.steps("density") or [None])[-1]
        return (f"Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019), Gaussian-smoothed, log "
                f"scale, at step {last}; {ctx}.")
    if name == "sharpness_layers":
        last = (run.steps("sharpness_layers") or [None])[-1]
        return (f"Each direction's sharpness ûᵀHû split into per-layer terms û_bᵀ(Hû)_b (stacked bars; they sum to "
                f"the unshifted ûᵀHû at x) at step {last}; {ctx}.")
    return None


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _save(fig: Any, path: Path, fmt: str, caption: str = "", dpi: float | None = None) -> Path:
    title = path.stem.replace("_", " ")
    metadata = {  # reproducible files (no dates), the caption where the format has a field for it
        "pdf": {"CreationDate": None, "Title": title, "Subject": caption, "Creator": "landscape"},
        "svg": {"Date": None, "Title": title, "Description": caption, "Creator": "landscape"},
        "png": {"Title": title, "Description": caption, "Software": "landscape"},
    }[fmt]
    fig.savefig(path, format=fmt, metadata=metadata, **({"dpi": dpi} if dpi else {}))
    return path


#: Figure sizes (width, aspect) per width setting.
_SIZES: dict[str, dict[str, tuple[str, float]]] = {
    "double": {"training_loss": ("single", 0.7), "sharpness_over_time": ("double", 0.45),
               "sharpness_ratio": ("double", 0.45), "update_histograms": ("single", 0.75),
               "cosine_heatmap": ("double", 0.85), "smoothness": ("single", 0.8)},
    "single": {"training_loss": ("single", 0.7), "sharpness_over_time": ("single", 1.1),
               "sharpness_ratio": ("single", 1.1), "update_histograms": ("single", 0.75),
               "cosine_heatmap": ("single", 1.05), "smoothness": ("single", 0.8)},
}


def save_figures(run: Run, out_dir: str | Path, fmt: str = "png", *, every_step: bool = False,
                 only: Sequence[str] | None = None, directions: str | Sequence[str] | None = None,
                 layers: str | Sequence[str] | None = None, width: str = "double",
                 captions: bool = True, dpi: float | None = None) -> list[Path]:
    """Write every figure the run has data for into ``out_dir`` (created), in paper style.

    Files (``<name>.<fmt>``): ``training_loss``, ``sharpness_over_time``, ``sharpness_ratio``,
    ``landscape_lines`` (one panel per optimizer family), ``update_histograms`` (the directions of
    Pan & Li 2023, Fig. 1, SGD, Adam and Adafactor, plus the trained one, when present),
    ``cosine_heatmap`` (last measured step), ``smoothness``, ``coordinate_smoothness`` (a page-sized
    selection of layers, or ``layers``). A figure without data is skipped. With ``every_step``, also
    ``landscape_lines_step<N>``, ``update_histograms_step<N>`` and ``cosine_heatmap_step<N>``. Beside
    each figure, ``<name>.txt`` holds its one-line caption (:func:`figure_caption`: what was
    measured, on which run and step); PDF, SVG and PNG files carry it in their metadata too
    (``Subject`` / ``Description``). PDFs embed TrueType fonts (``pdf.fonttype`` 42); SVG keeps text
    as text.

    Args:
        run: the run.
        out_dir: folder to write into.
        fmt: ``"png"``, ``"pdf"`` or ``"svg"``.
        every_step: also write the per-step figures of every measured step.
        only: write only these figures (names from :data:`FIGURE_NAMES`; per-step files follow
            their figure).
        directions: the directions of every figure (default: each figure's default).
        layers: the layers of ``coordinate_smoothness`` (default: a page-sized selection).
        width: ``"double"`` (default: wide figures span the text width of a two-column paper) or
            ``"single"`` (every figure fits one column).
        captions: write the ``.txt`` caption files.
        dpi: resolution of PNG files (default: 300).

    Returns:
        The figure paths written, in the order above.
    """
    from matplotlib.figure import Figure

    if run.has("race_runs"):  # an optimizer race (landscape race) has figures of its own
        from landscape.race_plots import save_race_figures

        return save_race_figures(run, out_dir, fmt, only=only)
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    if width not in FIGURE_WIDTHS:
        raise ValueError(f"width must be one of {', '.join(FIGURE_WIDTHS)}, got {width!r}")
    wanted = set(FIGURE_NAMES if only is None else only)
    unknown = sorted(wanted - set(FIGURE_NAMES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; figures are {', '.join(FIGURE_NAMES)}")
    if directions is not None:  # a name or pattern that matches nothing is an error, not a figure to skip
        _order(run, run.directions, directions)
    if layers is not None and not (isinstance(layers, str) and layers == "all") and run.has("coord_smoothness"):
        _check_layers(run, layers)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = _SIZES[width]
    panel_width = TEXT_WIDTH if width == "double" else COLUMN_WIDTH
    d = directions

    Draw = Callable[[Any], Any]
    # (name, draw into a Figure)
    def single(fn: Callable[[Axes], Any]) -> Draw:
        return lambda fig: fn(fig.add_subplot())

    specs: list[tuple[str, str, float, Draw, int | None]] = [
        ("training_loss", *sizes["training_loss"], single(lambda ax: training_loss(run, ax=ax)), None),
        ("sharpness_over_time", *sizes["sharpness_over_time"],
         single(lambda ax: sharpness_over_time(run, ax=ax, directions=d)), None),
        ("sharpness_ratio", *sizes["sharpness_ratio"], single(lambda ax: sharpness_ratio(run, ax=ax, directions=d)),
         None),
        ("landscape_lines", "panels", 0.0, lambda fig: _panels(run, fig, None, d, panel_width), None),
        ("update_histograms", *sizes["update_histograms"],
         single(lambda ax: update_histograms(run, ax=ax, directions=d)), None),
        ("cosine_heatmap", *sizes["cosine_heatmap"], single(lambda ax: cosine_heatmap(run, ax=ax, directions=d)),
         None),
        ("smoothness", *sizes["smoothness"], single(lambda ax: smoothness_scatter(run, ax=ax)), None),
        ("coordinate_smoothness", "panels", 0.0,
         lambda fig: coordinate_smoothness_grid(run, fig, layers, ncols=3 if width == "double" else 2), None),
    ]
    specs = [spec for spec in specs if spec[0] in wanted]
    if every_step:
        per_step = (("landscape_lines", "lines", "panels", 0.0,
                     lambda s: (lambda fig: _panels(run, fig, s, d, panel_width))),
                    ("update_histograms", "histograms", *sizes["update_histograms"],
                     lambda s: single(lambda ax: update_histograms(run, s, ax=ax, directions=d))),
                    ("cosine_heatmap", "cosine", *sizes["cosine_heatmap"],
                     lambda s: single(lambda ax: cosine_heatmap(run, s, ax=ax, directions=d))))
        for name, table, w, aspect, make in per_step:
            if name not in wanted:
                continue
            for s in run.steps(table):
                specs.append((f"{name}_step{s}", w, aspect, make(s), s))

    written: list[Path] = []
    with run.snapshot(), paper_style():  # one consistent state even while the run is still writing
        for name, w, aspect, draw, step in specs:
            if w == "panels":
                fig = Figure(figsize=(panel_width, panel_width * 0.5), layout="constrained")
            else:
                size = figsize(w, aspect)
                if name.startswith("cosine_heatmap"):  # square cells: as large as the directions need
                    size = (min(size[0], panel_width), min(size[0], panel_width) * aspect)
                fig = Figure(figsize=size, layout="constrained")
            try:
                draw(fig)
            except NoDataError:
                continue
            caption = figure_caption(run, name, step, directions=d) if captions else ""
            path = _save(fig, out / f"{_safe(name)}.{fmt}", fmt, caption, dpi)
            if captions:
                path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            written.append(path)
    curvature = [n for n in CURVATURE_FIGURE_NAMES if n in wanted]
    if curvature:  # eigenvalues, traces, densities, edge of stability, per-layer bars (landscape.curvature_plots)
        written += save_curvature_figures(run, out, fmt, only=curvature, width=width, captions=captions, dpi=dpi)
    return written


def _panels(run: Run, fig: Figure, step: int | None, directions: Any, width: float) -> list[Axes]:
    """The landscape-line panels, sized: rows of 3 panels on a wide figure, 2 on a narrow one."""
    step_ = _pick_step(run, "lines", step)
    present = [r["direction"] for r in run.rows("lines", step=step_)]
    names = _order(run, present, directions)
    n = len(_families(run, names, _entries(run, names, [step_], True)))
    ncols = 3 if width > 4.5 else 2
    nrows = math.ceil(n / max(1, min(ncols, n)))
    fig.set_size_inches(width, width / ncols * 0.78 * nrows + 0.3)
    return landscape_line_panels(run, step, fig, directions, ncols=ncols)
