"""Figures of the curvature tables (``eigenvalues``, ``trace``, ``density``, ``preconditioned``,
``sharpness_layers``): each function takes a :class:`~landscape.store.Run` and ``ax=None``, draws,
and returns the Axes (never shows or saves); :func:`save_curvature_figures` writes the files
``landscape plot`` adds.

* :func:`edge_of_stability` — sharpness ``λ_max(H)`` and the preconditioned sharpness
  ``λ_max(P⁻¹H)`` over training against the stability threshold of the recorded learning rate:
  ``2/η`` (gradient descent), ``(2 + 2β)/η`` (heavy-ball momentum β), ``38/η`` (Adam, β₁ = 0.9)
  (Cohen et al. 2021, 2022).
* :func:`spectral_density_plot` — the SLQ density on a log scale (Ghorbani et al. 2019, Fig. 1);
  :func:`density_curve` draws a :class:`~landscape.SpectralDensity` directly.
* :func:`eigenvalues_over_time` — top and most negative eigenvalues with their residuals.
* :func:`trace_over_time` — trace estimates with ±1 standard error.
* :func:`sharpness_layers_bars` — each direction's sharpness stacked by layer: where it lives.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape._style import figsize, paper_style, recipe_style
from landscape.store import NoDataError, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

    from landscape.density import SpectralDensity

__all__ = [
    "CURVATURE_FIGURE_NAMES",
    "density_curve",
    "edge_of_stability",
    "eigenvalues_over_time",
    "save_curvature_figures",
    "sharpness_layers_bars",
    "spectral_density_plot",
    "trace_over_time",
]

#: Figures :func:`save_curvature_figures` writes (file stems), in order.
from landscape._names import CURVATURE_FIGURE_NAMES  # noqa: E402 - the CLI needs it without numpy

_CURVE_STYLE = {"hessian": {"color": "#1f1f1f", "linestyle": "-"}, "ggn": {"color": "#3182bd", "linestyle": "--"}}
_CURVE_LABEL = {"hessian": "Hessian", "ggn": "Gauss–Newton"}


def _axes(ax: Axes | None, width: str | float = "single", aspect: float = 0.75) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize(width, aspect), layout="constrained")
    return ax


def _need(run: Run, table: str, **where: Any) -> list[dict[str, Any]]:
    rows = run.rows(table, **where) if run.has(table) else []
    if not rows:
        what = ", ".join(f"{k}={v!r}" for k, v in where.items())
        raise NoDataError(f"run {run.path} has no rows in table {table!r}" + (f" for {what}" if what else "")
                          + " (enable it with MeasureSettings(curvature=CurvatureSettings(...)))")
    return rows


def _pick_step(run: Run, table: str, step: int | None) -> int:
    steps = run.steps(table) if run.has(table) else []
    if not steps:
        _need(run, table)
    if step is None:
        return steps[-1]
    if step not in steps:
        raise NoDataError(f"step {step} has no rows in table {table!r}; measured steps: {steps}")
    return step


# -- edge of stability ------------------------------------------------------------------------------


def _threshold_label(c: float, quantity: str) -> str:
    if abs(c - round(c)) < 1e-9:
        return f"{int(round(c))}/η"
    return f"{c:.3g}/η"


def edge_of_stability(run: Run, ax: Axes | None = None, *, curvature: str = "hessian") -> Axes:
    """Sharpness against the stability threshold over training (Cohen et al. 2021, Fig. 1; 2022).

    Draws ``λ_max`` of the ``curvature`` matrix (table ``eigenvalues``, block ``all``), the
    preconditioned sharpness ``λ_max(P⁻¹H)`` of every optimizer in table ``preconditioned``, and, from
    the learning rate recorded at each step (table ``steps``) and the trained optimizer in the run's
    metadata, its threshold ``c/η`` as a dashed line: ``2/η`` for gradient descent, ``(2 + 2β)/η`` for
    ``torch.optim.SGD`` with momentum β, ``(2 + 2β₁)/((1 − β₁)η)`` = 38/η against the trained Adam's
    preconditioned sharpness. Log y axis.

    Returns:
        The Axes: lines labelled ``λ_max (Hessian)``, the optimizers' names, and the threshold(s).
    """
    from landscape.stability import stability_multiplier

    have_eig = run.has("eigenvalues") and bool(run.rows("eigenvalues", curvature=curvature, block="all", which="top",
                                                        rank=0))
    have_pre = run.has("preconditioned")
    if not have_eig and not have_pre:
        _need(run, "eigenvalues", curvature=curvature, block="all")
    ax = _axes(ax, "double", 0.45)
    drawn = []
    if have_eig:
        c = run.columns("eigenvalues", curvature=curvature, block="all", which="top", rank=0)
        o = np.argsort(c["step"])
        ax.plot(c["step"][o], c["value"][o], marker="o", markersize=2.5, label=f"λ_max ({_CURVE_LABEL.get(curvature, curvature)})",
                **_CURVE_STYLE.get(curvature, {"color": "0.2"}))
        drawn.append("sharpness")
    if have_pre:
        c = run.columns("preconditioned")
        for name in dict.fromkeys(c["optimizer"].tolist()):
            m = c["optimizer"] == name
            o = np.argsort(c["step"][m])
            ax.plot(c["step"][m][o], c["value"][m][o], marker="s", markersize=2.5, label=f"λ_max(P⁻¹H), {name}",
                    **recipe_style(name))
        drawn.append("preconditioned")
    opt = run.meta.get("optimizer") if isinstance(run.meta.get("optimizer"), dict) else {}
    cls, hyper = opt.get("class"), opt.get("hyperparameters") or {}
    mult = stability_multiplier(str(cls), **hyper) if cls else None
    if mult is not None and run.has("steps") and mult[1] in drawn:
        s = run.columns("steps")
        ok = np.isfinite(s["lr"]) & (s["lr"] > 0)
        if ok.any():
            o = np.argsort(s["step"][ok])
            quantity = "λ_max" if mult[1] == "sharpness" else "λ_max(P⁻¹H)"
            ax.plot(s["step"][ok][o], mult[0] / s["lr"][ok][o], color="#d62728", linestyle="--", linewidth=1.0,
                    label=f"{_threshold_label(mult[0], mult[1])} ({cls}; threshold of {quantity})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("sharpness")
    ax.legend(fontsize="small", frameon=False)
    return ax


# -- eigenvalues and traces over time ---------------------------------------------------------------


def eigenvalues_over_time(run: Run, ax: Axes | None = None, *, curvature: str = "hessian", block: str = "all") -> Axes:
    """The top (solid) and most negative (dashed) eigenvalues of one block over training, each with
    its residual ``‖Av − λv‖`` as an error bar (the true eigenvalue lies within it).

    Returns:
        The Axes: one errorbar container per (which, rank), labelled e.g. ``top 1`` / ``bottom 1``.
    """
    _need(run, "eigenvalues", curvature=curvature, block=block)
    c = run.columns("eigenvalues", curvature=curvature, block=block)
    ax = _axes(ax, "single", 0.8)
    base = _CURVE_STYLE.get(curvature, {"color": "0.2"})["color"]
    for which, ls_ in (("top", "-"), ("bottom", "--")):
        for rank in sorted(set(c["rank"][c["which"] == which].tolist())):
            m = (c["which"] == which) & (c["rank"] == rank)
            o = np.argsort(c["step"][m])
            ax.errorbar(c["step"][m][o], c["value"][m][o], yerr=c["residual"][m][o], color=base, linestyle=ls_,
                        marker="o", markersize=2.5, capsize=1.5, alpha=1.0 / (1 + 0.5 * rank),
                        label=f"{which} {rank + 1}")
    ax.axhline(0.0, color="0.6", linewidth=0.6)
    ax.set_xlabel("training step")
    title = _CURVE_LABEL.get(curvature, curvature) + ("" if block == "all" else f", block {block}")
    ax.set_ylabel(f"eigenvalue ({title})")
    ax.legend(fontsize="small", frameon=False, ncol=2)
    return ax


def trace_over_time(run: Run, ax: Axes | None = None) -> Axes:
    """Trace estimates over training with ±1 standard error (``hutch++`` solid, ``hutchinson`` dotted;
    Hessian black, Gauss–Newton blue).

    Returns:
        The Axes: one errorbar container per (curvature, method), labelled e.g. ``Hessian, hutch++``.
    """
    _need(run, "trace")
    c = run.columns("trace")
    ax = _axes(ax, "single", 0.8)
    pairs = list(dict.fromkeys(zip(c["curvature"].tolist(), c["method"].tolist())))
    for curv, method in pairs:
        m = (c["curvature"] == curv) & (c["method"] == method)
        o = np.argsort(c["step"][m])
        style = dict(_CURVE_STYLE.get(curv, {"color": "0.2"}))
        style["linestyle"] = "-" if method == "hutch++" else ":"
        ax.errorbar(c["step"][m][o], c["estimate"][m][o], yerr=np.nan_to_num(c["stderr"][m][o]), marker="o",
                    markersize=2.5, capsize=1.5, label=f"{_CURVE_LABEL.get(curv, curv)}, {method}", **style)
    ax.set_xlabel("training step")
    ax.set_ylabel("trace (± 1 s.e.)")
    ax.legend(fontsize="small", frameon=False)
    return ax


# -- spectral density -------------------------------------------------------------------------------


def _smooth(nodes: np.ndarray, weights: np.ndarray, t: np.ndarray, sigma: float) -> np.ndarray:
    z = (t[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))) @ weights


def density_curve(density: SpectralDensity, ax: Axes | None = None, *, sigma: float | None = None,
                  points: int = 2000, floor: float = 1e-8, **style: Any) -> Axes:
    """Draw a :class:`~landscape.SpectralDensity` on a log y axis (Ghorbani et al. 2019, Fig. 1).

    Args:
        density: the SLQ result.
        ax: where to draw.
        sigma: the kernel width (default: :meth:`~landscape.SpectralDensity.default_sigma`).
        points: grid points.
        floor: densities below this are clipped to it (a log axis cannot show zero).
        style: passed to ``ax.plot`` (``label=``, ``color=``...).

    Returns:
        The Axes; the density is the last Line2D.
    """
    ax = _axes(ax)
    t = density.grid(points)
    _, phi = density.density(t, sigma)
    ax.plot(t, np.maximum(phi, floor), **style)
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    return ax


def spectral_density_plot(run: Run, step: int | None = None, ax: Axes | None = None, *,
                          curvatures: Sequence[str] | None = None, sigma: float | None = None,
                          floor: float = 1e-8, points: int = 2000) -> Axes:
    """The SLQ spectral density of the Hessian (and Gauss–Newton matrix) at one measured step, on a
    log scale, as Ghorbani et al. (2019) draw it.

    Args:
        run: the run.
        step: the step (default: the last with a density).
        ax: where to draw.
        curvatures: which matrices (default: all stored at that step).
        sigma: kernel width (default: Ghorbani et al.'s σ² = 1e-5 on the spectrum rescaled to [−1, 1],
            from the widest support at the step).
        floor, points: as :func:`density_curve`.

    Returns:
        The Axes: one Line2D per matrix, labelled ``Hessian`` / ``Gauss–Newton``.
    """
    from landscape.density.ghorbani2019slq import GHORBANI_SIGMA

    s = _pick_step(run, "density", step)
    rows = [r for r in run.rows("density", step=s) if curvatures is None or r["curvature"] in curvatures]
    if not rows:
        raise NoDataError(f"step {s} has no density for {list(curvatures or [])}")
    lo = min(float(np.min(r["nodes"])) for r in rows)
    hi = max(float(np.max(r["nodes"])) for r in rows)
    span = max(hi - lo, 1e-12)
    t = np.linspace(lo - 0.05 * span, hi + 0.05 * span, points)
    sig = sigma if sigma is not None else GHORBANI_SIGMA * span / 2
    ax = _axes(ax)
    for r in rows:
        phi = _smooth(np.asarray(r["nodes"]), np.asarray(r["weights"]), t, sig)
        ax.plot(t, np.maximum(phi, floor), label=_CURVE_LABEL.get(r["curvature"], r["curvature"]),
                **_CURVE_STYLE.get(r["curvature"], {"color": "0.2"}))
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_title(f"spectral density, step {s}", fontsize="small")
    ax.legend(fontsize="small", frameon=False)
    return ax


# -- where the sharpness lives ----------------------------------------------------------------------


def sharpness_layers_bars(run: Run, step: int | None = None, ax: Axes | None = None, *, curvature: str = "hessian",
                          directions: Sequence[str] | None = None, relative: bool = False, max_blocks: int = 12) -> Axes:
    """Each direction's sharpness ``ûᵀAû`` as a stacked bar of its per-layer terms ``û_bᵀ(Aû)_b``
    (positive terms stacked up from zero, negative ones down); a black dot marks the total.

    Args:
        run: the run.
        step: the step (default: the last with a decomposition).
        ax: where to draw.
        curvature: ``"hessian"`` or ``"ggn"``.
        directions: which directions (default: all, in the run's order).
        relative: divide each direction's terms by its total (shares of the sharpness).
        max_blocks: the blocks with the largest terms get their own colour; the rest are summed as
            "other".

    Returns:
        The Axes: one ``BarContainer`` per block (labelled with the block), and the totals as a
        Line2D labelled ``total``.
    """
    s = _pick_step(run, "sharpness_layers", step)
    rows = _need(run, "sharpness_layers", step=s, curvature=curvature)
    present = list(dict.fromkeys(r["direction"] for r in rows))
    order = [d for d in run.directions if d in present] + [d for d in present if d not in run.directions]
    names = [d for d in (directions or order) if d in present]
    if not names:
        raise NoDataError(f"step {s} has no decomposition for {list(directions or [])}")
    blocks = list(dict.fromkeys(r["block"] for r in rows))
    value = {(r["direction"], r["block"]): r["contribution"] for r in rows}
    mat = np.array([[value.get((d, b), 0.0) for b in blocks] for d in names])
    totals = mat.sum(axis=1)
    if relative:
        mat = mat / np.where(totals == 0, 1.0, np.abs(totals))[:, None]
        totals = totals / np.where(totals == 0, 1.0, np.abs(totals))
    weight = np.abs(mat).sum(axis=0)
    keep = list(np.argsort(-weight)[:max_blocks])
    keep.sort()
    rest = [j for j in range(len(blocks)) if j not in keep]
    cols = [mat[:, j] for j in keep] + ([mat[:, rest].sum(axis=1)] if rest else [])
    labels = [blocks[j] for j in keep] + (["other"] if rest else [])
    import matplotlib as mpl

    cmap = mpl.colormaps["tab20"]
    ax = _axes(ax, "double", 0.5)
    x = np.arange(len(names))
    up = np.zeros(len(names))
    down = np.zeros(len(names))
    for j, (col, label) in enumerate(zip(cols, labels)):
        pos = np.where(col > 0, col, 0.0)
        neg = np.where(col < 0, col, 0.0)
        color = "0.7" if label == "other" else cmap(j % 20)
        ax.bar(x, pos, bottom=up, color=color, label=label, width=0.7)
        ax.bar(x, neg, bottom=down, color=color, width=0.7)
        up += pos
        down += neg
    ax.plot(x, totals, linestyle="none", marker="o", color="k", markersize=3, label="total")
    ax.axhline(0.0, color="0.3", linewidth=0.6)
    ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
    what = "share of " if relative else ""
    ax.set_ylabel(f"{what}ûᵀ{'H' if curvature == 'hessian' else 'G'}û by layer")
    ax.set_title(f"where the sharpness lives, step {s}", fontsize="small")
    ax.legend(fontsize="x-small", frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return ax


# -- saving -----------------------------------------------------------------------------------------


def save_curvature_figures(run: Run, out_dir: str | Path, fmt: str = "png", only: Sequence[str] | None = None,
                           *, width: str = "double", captions: bool = True, dpi: float | None = None) -> list[Path]:
    """Write the curvature figures the run has data for (names :data:`CURVATURE_FIGURE_NAMES`),
    in paper style, each with its one-line caption (``<name>.txt`` and the file's metadata, as
    :func:`landscape.plots.save_figures` does). Figures without data are skipped.

    Args:
        width: ``"double"`` (default: the wide figures span a two-column page) or ``"single"`` (every
            figure one column wide).
        captions: write the ``.txt`` caption files.
        dpi: raster resolution (PNG).

    Returns:
        The paths written.
    """
    from matplotlib.figure import Figure

    from landscape.plots import _save, figure_caption

    if width not in ("single", "double"):
        raise ValueError(f"width must be 'single' or 'double', got {width!r}")

    wanted = [n for n in CURVATURE_FIGURE_NAMES if only is None or n in only]
    out = Path(out_dir)
    specs = {
        "edge_of_stability": ("double", 0.45, lambda ax: edge_of_stability(run, ax=ax)),
        "eigenvalues": ("single", 0.8, lambda ax: eigenvalues_over_time(run, ax=ax)),
        "trace": ("single", 0.8, lambda ax: trace_over_time(run, ax=ax)),
        "spectral_density": ("single", 0.8, lambda ax: spectral_density_plot(run, ax=ax)),
        "sharpness_layers": ("double", 0.5, lambda ax: sharpness_layers_bars(run, ax=ax)),
    }
    written = []
    with paper_style():
        for name in wanted:
            span, aspect, draw = specs[name]
            if width == "single" and span == "double":
                span, aspect = "single", min(1.0, 2 * aspect)
            fig = Figure(figsize=figsize(span, aspect), layout="constrained")
            try:
                draw(fig.add_subplot())
            except NoDataError:
                continue
            out.mkdir(parents=True, exist_ok=True)
            caption = figure_caption(run, name) if captions else ""
            path = _save(fig, out / f"{name}.{fmt}", fmt, caption, dpi)
            if captions:
                path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
            written.append(path)
    return written
