"""Publication figures from a run store: every function reads a :class:`~landscape.store.Run`.

Each plot function takes the run (and options) and ``ax: Axes | None = None``, draws into ``ax``
(a new one-column figure when ``None``) and returns the Axes; it never shows or saves. Colours come
from :func:`recipe_style`: a base recipe and its clipped variants share a hue (variants lighter and
dashed, as in seed 002 Fig. 2), the trained optimizer's own direction is black. Wrap calls in
:func:`paper_style` for paper-sized fonts and embedded TrueType fonts; :func:`save_figures` does.

A figure whose data is missing raises :class:`~landscape.store.NoDataError` naming what is missing
(and, for a step, the measured steps).

Example:
    >>> from landscape.store import load_run
    >>> import landscape.plots as lp
    >>> run = load_run("runs/tiny")                                    # doctest: +SKIP
    >>> with lp.paper_style():                                         # doctest: +SKIP
    ...     ax = lp.landscape_lines(run)                               # the last measured step
    ...     ax.figure.savefig("lines.pdf")
    >>> lp.save_figures(run, "runs/tiny/figures", fmt="pdf")           # doctest: +SKIP
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape._style import COLUMN_WIDTH, TEXT_WIDTH, figsize, paper_style, recipe_style, split_recipe
from landscape.curvature_plots import CURVATURE_FIGURE_NAMES, save_curvature_figures
from landscape.store import NoDataError, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "FIGURE_FORMATS",
    "FIGURE_NAMES",
    "COLUMN_WIDTH",
    "TEXT_WIDTH",
    "paper_style",
    "recipe_style",
    "split_recipe",
    "landscape_lines",
    "sharpness_ratio",
    "sharpness_over_time",
    "update_histograms",
    "cosine_heatmap",
    "training_loss",
    "smoothness_scatter",
    "coordinate_smoothness",
    "save_figures",
]

#: File formats :func:`save_figures` writes.
FIGURE_FORMATS = ("png", "pdf", "svg")
#: Figures :func:`save_figures` writes (file stems), in order.
FIGURE_NAMES = ("training_loss", "sharpness_over_time", "sharpness_ratio", "landscape_lines", "update_histograms",
                "cosine_heatmap", "smoothness", "coordinate_smoothness")
# ... and the curvature figures (landscape.curvature_plots), when the run measured curvature
FIGURE_NAMES = FIGURE_NAMES + CURVATURE_FIGURE_NAMES

_NEGATIVE_LABEL = "< 0 (|value| shown)"
_SHIFTED_LABEL = r"$\delta$-shifted $\hat u^\top \nabla^2 f(x - \delta \hat u)\,\hat u$"
_UNDEFINED_LABEL = r"ratio undefined: SGD sharpness $\leq 0$"


# -- helpers ---------------------------------------------------------------------------------------


def _axes(ax: Axes | None, width: str | float = "single", aspect: float = 0.75) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize(width, aspect), layout="constrained")
    return ax


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


def _order(run: Run, present: Sequence[str], directions: Sequence[str] | None) -> list[str]:
    """``directions`` (validated), or every present direction in the run's direction order."""
    present_set = set(present)
    if directions is not None:
        unknown = [d for d in directions if d not in present_set]
        if unknown:
            raise NoDataError(
                f"direction(s) {', '.join(map(repr, unknown))} not in run {run.path}; "
                f"available: {', '.join(_sorted_directions(run, present))}"
            )
        return list(directions)
    return _sorted_directions(run, present)


def _sorted_directions(run: Run, present: Sequence[str]) -> list[str]:
    order = run.directions
    rank = {d: i for i, d in enumerate(order)}
    return sorted(dict.fromkeys(present), key=lambda d: (rank.get(d, len(rank)), d))


def _style(run: Run, name: str) -> dict[str, Any]:
    trained = run.trained_direction
    return recipe_style(name, trained=(name == trained) if trained else None)


def _legend(ax: Axes, n: int) -> None:
    """Inside the axes for a few entries; outside, to the right, for many (18 recipes would hide
    the data)."""
    if not n:
        return
    if n <= 8:
        ax.legend(loc="best", handlelength=2.2)
    else:
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, handlelength=2.2,
                  ncol=1 if n <= 16 else 2)


def _fit_envelope(x: np.ndarray, y: np.ndarray):
    """The (L0, L1) envelope from :func:`landscape.smoothness.fit_l0_l1`, or None if unavailable."""
    try:
        from landscape.smoothness import fit_l0_l1
    except ImportError:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = fit_l0_l1(x, y)
    l0, l1 = float(fit.l0), float(fit.l1)
    return (l0, l1) if np.isfinite(l0) and np.isfinite(l1) else None


def _draw_envelope(ax: Axes, x: np.ndarray, y: np.ndarray, log: bool) -> None:
    ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0)
    if ok.sum() < 2:
        return
    fit = _fit_envelope(x[ok], y[ok])
    if fit is None:
        return
    l0, l1 = fit
    lo, hi = x[ok].min(), x[ok].max()
    xs = np.geomspace(max(lo, hi * 1e-12), hi, 100) if log and hi > 0 else np.linspace(lo, hi, 100)
    ax.plot(xs, l0 + l1 * xs, color="black", linestyle="--", linewidth=0.9, zorder=4, gid="envelope",
            label=f"$L_0 + L_1 x$ ($L_0$={l0:.3g}, $L_1$={l1:.3g})")


# -- landscape lines (seed 002 Figs. 2-4) ----------------------------------------------------------


def landscape_lines(
    run: Run,
    step: int | None = None,
    ax: Axes | None = None,
    directions: Sequence[str] | None = None,
    *,
    relative: bool = False,
    clip_y: bool = True,
    legend: bool = True,
) -> Axes:
    """Loss along each update direction, ℓ(s) = f(x − s·u/‖u‖₂), against the normalised step s.

    Seed 002 Figs. 2-4 plot the loss itself against the step size normalised by the update's ℓ2
    norm, so that is the default here: every direction starts from the same point f(x) at s = 0,
    and the depth of each curve's minimum reads directly as a loss. ``relative=True`` plots
    ℓ(s) − ℓ(0) instead. Each curve's best grid point (``best_step``, ``best_loss``) is marked with
    a dot (a Line2D labelled ``"_best <direction>"``, hidden from the legend).

    Args:
        run: the run.
        step: measured step (default: the last one with lines).
        ax: where to draw (default: a new two-column-wide figure).
        directions: which directions, in this order (default: all, in the run's order).
        relative: subtract ℓ(0) from each curve.
        clip_y: cap the y axis at ℓ(0) + (ℓ(0) − min ℓ) so that directions whose loss explodes
            (SGD's, typically) do not squash the others; the data are not altered.
        legend: draw a legend.

    Returns:
        The Axes, one Line2D per direction labelled with the direction name.
    """
    step = _pick_step(run, "lines", step)
    rows = {r["direction"]: r for r in run.rows("lines", step=step)}
    names = _order(run, list(rows), directions)
    ax = _axes(ax, "double", 0.45)
    lowest, starts, highest = [], [], []
    for name in names:
        r = rows[name]
        s, loss = np.asarray(r["s"], float), np.asarray(r["loss"], float)
        at0 = np.flatnonzero(s == 0)
        l0 = loss[at0[0]] if at0.size else loss[np.argmin(s)] if s.size else np.nan
        offset = l0 if relative else 0.0
        style = _style(run, name)
        ax.plot(s, loss - offset, label=name, **style)
        ax.plot([r["best_step"]], [r["best_loss"] - offset], marker="o", linestyle="none", color=style["color"],
                markersize=3, zorder=style["zorder"] + 1, label=f"_best {name}")
        finite = loss[np.isfinite(loss)] - offset
        if finite.size:
            lowest.append(finite.min())
            highest.append(finite.max())
        starts.append(l0 - offset)
    if clip_y and lowest:
        lo, start, hi = min(lowest), float(np.nanmedian(starts)), max(highest)
        if np.isfinite(start) and start > lo:
            top = start + (start - lo)
            if hi > top:
                pad = 0.05 * (top - lo)
                ax.set_ylim(lo - pad, top + pad)
    ax.set_xlabel(r"step size $s$ (along $-u/\|u\|_2$)")
    ax.set_ylabel(r"loss $-$ loss(0)" if relative else "loss")
    ax.set_title(f"step {step}")
    if legend:
        _legend(ax, len(names))
    return ax


# -- sharpness over training -----------------------------------------------------------------------


def _over_steps(
    run: Run, column: str, ax: Axes | None, directions: Sequence[str] | None, exclude: Sequence[str] = ()
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
    for name in names:
        rs = sorted((r for r in records if r["direction"] == name), key=lambda r: r["step"])
        steps = np.array([r["step"] for r in rs])
        value = np.array([np.nan if r[column] is None else r[column] for r in rs], dtype=float)
        shifted = np.array([bool(r["shifted"]) or (ratio and ref_shifted.get(r["step"], False)) for r in rs])
        if not np.isfinite(value).any():
            continue
        y = np.abs(value)
        y[value == 0] = np.nan  # not representable on a log axis
        style = _style(run, name)
        ax.plot(steps, y, marker="o", markersize=2.5, label=name, **style)
        neg = (value < 0) & ~shifted
        if neg.any():
            any_negative = True
            ax.plot(steps[neg], y[neg], marker="o", markersize=3.5, linestyle="none", color=style["color"],
                    markerfacecolor="white", zorder=style["zorder"] + 1, label=f"_negative {name}")
        sh = shifted & np.isfinite(y)
        if sh.any():
            any_shifted = True
            # filled: positive after the shift; open: still negative
            for mask, face, tag in ((sh & (value > 0), style["color"], "_shifted"),
                                    (sh & (value < 0), "white", "_shifted negative")):
                if mask.any():
                    any_negative |= tag.endswith("negative")
                    ax.plot(steps[mask], y[mask], marker="^", markersize=4.5, linestyle="none", color=style["color"],
                            markerfacecolor=face, zorder=style["zorder"] + 2, label=f"{tag} {name}")
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


def sharpness_ratio(run: Run, ax: Axes | None = None, directions: Sequence[str] | None = None) -> Axes:
    """Directional sharpness relative to SGD, S(u_alg)/S(u_sgd), over training (seed 002 Tables 1, 4-7).

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
        directions: which directions (default: all but ``sgd``, in the run's order).

    Returns:
        The Axes; one Line2D per direction labelled with its name, y data = |ratio_to_sgd|.
    """
    ax, names, undefined = _over_steps(run, "ratio_to_sgd", ax, directions, exclude=("sgd",))
    ax.axhline(1.0, color=recipe_style("sgd")["color"], linestyle=":", linewidth=0.9, label="sgd (= 1)")
    ax.set_ylabel(r"sharpness ratio to SGD $S(u)/S(u_{\mathrm{sgd}})$")
    _legend(ax, len(names) + 1)
    return ax


def sharpness_over_time(run: Run, ax: Axes | None = None, directions: Sequence[str] | None = None) -> Axes:
    """Reported directional sharpness ûᵀHû of each direction over training.

    Log y axis of |sharpness|; negative values are open circles at their absolute value, δ-shifted
    values ûᵀ∇²f(x − δû)û are triangles (filled when positive after the shift, open when still
    negative), both explained in the legend; NaN and zeros are gaps.

    Returns:
        The Axes; one Line2D per direction labelled with its name, y data = |sharpness|.
    """
    ax, names, _ = _over_steps(run, "sharpness", ax, directions)
    ax.set_ylabel(r"directional sharpness $|\hat u^\top H \hat u|$")
    _legend(ax, len(names))
    return ax


# -- update histograms (seed 002 Fig. 1) ------------------------------------------------------------


def update_histograms(
    run: Run,
    step: int | None = None,
    ax: Axes | None = None,
    directions: Sequence[str] | None = None,
    *,
    density: bool = True,
) -> Axes:
    """Histogram of log10|u_i| over all coordinates of each update (seed 002 Fig. 1).

    Drawn as step outlines (``ax.stairs``), one per direction. With ``density`` (default) the
    height is the fraction of *all* coordinates in the bin (exact zeros, outside every bin, count in
    the total), so directions compare at equal area; otherwise raw counts.

    Returns:
        The Axes; one StepPatch per direction in ``ax.patches``, labelled with its name.
    """
    step = _pick_step(run, "histograms", step)
    rows = {r["direction"]: r for r in run.rows("histograms", step=step)}
    names = _order(run, list(rows), directions)
    ax = _axes(ax, "double", 0.45)
    for name in names:
        r = rows[name]
        counts = np.asarray(r["counts"], dtype=float)
        total = counts.sum() + r["zeros"]
        values = counts / total if density and total > 0 else counts
        style = _style(run, name)
        ax.stairs(values, r["edges"], label=name, color=style["color"], linestyle=style["linestyle"],
                  linewidth=style.get("linewidth", 1.1), zorder=style["zorder"])
    ax.set_xlabel(r"$\log_{10} |u_i|$")
    ax.set_ylabel("fraction of coordinates" if density else "coordinates")
    ax.set_title(f"step {step}")
    _legend(ax, len(names))
    return ax


# -- cosine heatmap --------------------------------------------------------------------------------


def cosine_heatmap(run: Run, step: int | None = None, ax: Axes | None = None, *, annotate: bool = True,
                   colorbar: bool = True) -> Axes:
    """Cosine similarity between every pair of directions at one step, as an annotated heatmap.

    The matrix is symmetric with ones on the diagonal; a pair without a stored value is NaN
    (blank). Colours: ``RdBu_r`` from −1 to 1.

    Returns:
        The Axes; ``ax.images[0].get_array()`` is the matrix, rows/columns in tick-label order.
    """
    step = _pick_step(run, "cosine", step)
    rows = run.rows("cosine", step=step)
    names = _sorted_directions(run, [r["a"] for r in rows] + [r["b"] for r in rows])
    index = {d: i for i, d in enumerate(names)}
    n = len(names)
    matrix = np.full((n, n), np.nan)
    np.fill_diagonal(matrix, 1.0)
    for r in rows:
        i, j = index[r["a"]], index[r["b"]]
        matrix[i, j] = matrix[j, i] = r["cosine"]
    side = min(TEXT_WIDTH, max(COLUMN_WIDTH, 0.32 * n + 1.2))
    ax = _axes(ax, side, 0.85)
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks(range(n), names, rotation=60, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), names)
    ax.grid(False)
    ax.tick_params(length=0)
    if annotate:
        size = 6 if n <= 10 else 5 if n <= 16 else 4
        for i in range(n):
            for j in range(n):
                v = matrix[i, j]
                if np.isfinite(v):
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=size,
                            color="white" if abs(v) > 0.6 else "black")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, label="cosine similarity", shrink=0.8)
    ax.set_title(f"step {step}")
    return ax


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


# -- smoothness (seed 001 Figs. 1 and 3) -----------------------------------------------------------


def smoothness_scatter(run: Run, ax: Axes | None = None, *, loglog: bool = False, envelope: bool = True,
                       colorbar: bool = True) -> Axes:
    """Local smoothness L̂_t against the gradient norm ‖∇f(x_t)‖, coloured by step (seed 001 Fig. 1).

    When :func:`landscape.smoothness.fit_l0_l1` is available (and ``envelope``), the fitted upper
    envelope L0 + L1·‖∇f‖ is drawn as a dashed black line (``gid="envelope"``).

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
        _draw_envelope(ax, x, y, loglog)
        if any(line.get_gid() == "envelope" for line in ax.lines):
            ax.legend(loc="best")
    if colorbar:
        ax.figure.colorbar(points, ax=ax, label="step")
    ax.set_xlabel(r"gradient norm $\|\nabla f(x_t)\|$")
    ax.set_ylabel(r"local smoothness $\hat L_t$")
    return ax


def _layers(run: Run) -> list[str]:
    rows = run.query("SELECT layer FROM coord_smoothness GROUP BY layer ORDER BY MIN(rowid)") \
        if run.has("coord_smoothness") else []
    return [r["layer"] for r in rows]


def coordinate_smoothness(run: Run, layer: str | None = None, ax: Axes | None = None, *, loglog: bool = True,
                          envelope: bool = True, colorbar: bool = True) -> Axes:
    """Coordinate-wise smoothness of one layer (seed 001 Fig. 3): for the sampled coordinates j,
    |∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}| against min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|),
    pooled over the measured steps and coloured by step.

    On log-log axes (default) points with a non-positive or non-finite coordinate are left out.
    The (L0, L1) envelope is overlaid as in :func:`smoothness_scatter`.

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
    x = np.concatenate([np.ravel(r["min_grad"]) for r in rows])
    y = np.concatenate([np.ravel(r["ratio"]) for r in rows])
    c = np.concatenate([np.full(np.size(r["ratio"]), r["step"]) for r in rows])
    keep = np.isfinite(x) & np.isfinite(y)
    if loglog:
        keep &= (x > 0) & (y > 0)
    ax = _axes(ax)
    points = ax.scatter(x[keep], y[keep], c=c[keep], cmap="viridis", s=5, linewidths=0, zorder=3)
    if loglog:
        ax.set_xscale("log")
        ax.set_yscale("log")
    if envelope:
        _draw_envelope(ax, x[keep], y[keep], loglog)
        if any(line.get_gid() == "envelope" for line in ax.lines):
            ax.legend(loc="best")
    if colorbar:
        ax.figure.colorbar(points, ax=ax, label="step")
    ax.set_title(layer)
    ax.set_xlabel(r"$\min(|\partial_j f(x_t)|, |\partial_j f(x_{t+1})|)$")
    ax.set_ylabel(r"$|\Delta \partial_j f| / |\Delta x_j|$")
    return ax


# -- saving ----------------------------------------------------------------------------------------


#: Directions of the saved histogram figure (seed 002 Fig. 1), plus the trained direction.
FIG1_DIRECTIONS = ("sgd", "adam", "adafactor")


def _fig1_directions(run: Run, step: int | None = None) -> list[str] | None:
    """Seed 002 Fig. 1's directions that the run has (and the trained one); None (all) if none."""
    present = {r["direction"] for r in run.rows("histograms", step=_pick_step(run, "histograms", step))}
    chosen = [d for d in FIG1_DIRECTIONS if d in present]
    if not chosen:
        return None
    trained = run.trained_direction
    return chosen + ([trained] if trained in present else [])


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "x"


def _save(fig: Any, path: Path, fmt: str) -> Path:
    metadata = {"pdf": {"CreationDate": None}, "svg": {"Date": None}}.get(fmt)  # reproducible files
    fig.savefig(path, format=fmt, metadata=metadata)
    return path


def _coordinate_grid(run: Run, fig: Any) -> None:
    layers = _layers(run)
    if not layers:
        raise NoDataError(f"run {run.path} has no rows in table 'coord_smoothness'")
    ncols = min(3, len(layers))
    nrows = -(-len(layers) // ncols)
    fig.set_size_inches(TEXT_WIDTH, 2.1 * nrows + 0.2)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, layer in zip(axes, layers):
        # One shared colour bar (a bar per panel squeezes the panels of a many-layer grid to nothing).
        coordinate_smoothness(run, layer, ax=ax, colorbar=False)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    mappables = [c for ax in axes[: len(layers)] for c in ax.collections if c.get_array() is not None]
    if mappables:
        fig.colorbar(mappables[0], ax=list(axes[: len(layers)]), label="step", shrink=0.6, aspect=40)


def save_figures(run: Run, out_dir: str | Path, fmt: str = "png", *, every_step: bool = False,
                 only: Sequence[str] | None = None) -> list[Path]:
    """Write every figure the run has data for into ``out_dir`` (created), in paper style.

    Files (``<name>.<fmt>``): ``training_loss``, ``sharpness_over_time``, ``sharpness_ratio``,
    ``landscape_lines``, ``update_histograms`` (the directions of seed 002 Fig. 1, SGD, Adam and
    Adafactor, plus the trained one, when present; all otherwise), ``cosine_heatmap`` (last measured step),
    ``smoothness``, ``coordinate_smoothness`` (one panel per layer). A figure without data (no
    smoothness rows, no ``sgd`` for the ratio...) is skipped. With ``every_step``, also
    ``landscape_lines_step<N>``, ``update_histograms_step<N>`` and ``cosine_heatmap_step<N>`` for
    every measured step. PDFs embed TrueType fonts (``pdf.fonttype`` 42); SVG keeps text as text.

    Args:
        run: the run.
        out_dir: folder to write into.
        fmt: ``"png"``, ``"pdf"`` or ``"svg"``.
        every_step: also write the per-step figures of every measured step.
        only: write only these figures (names from :data:`FIGURE_NAMES`; per-step files follow
            their figure).

    Returns:
        The paths written, in the order above.
    """
    from matplotlib.figure import Figure

    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    wanted = set(FIGURE_NAMES if only is None else only)
    unknown = sorted(wanted - set(FIGURE_NAMES))
    if unknown:
        raise ValueError(f"unknown figure(s) {', '.join(unknown)}; figures are {', '.join(FIGURE_NAMES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    Draw = Callable[[Any], Any]
    specs: list[tuple[str, str | float, float, Draw]] = [
        ("training_loss", "single", 0.7, lambda ax: training_loss(run, ax=ax)),
        ("sharpness_over_time", "double", 0.45, lambda ax: sharpness_over_time(run, ax=ax)),
        ("sharpness_ratio", "double", 0.45, lambda ax: sharpness_ratio(run, ax=ax)),
        ("landscape_lines", "double", 0.45, lambda ax: landscape_lines(run, ax=ax)),
        ("update_histograms", "double", 0.45,
         lambda ax: update_histograms(run, ax=ax, directions=_fig1_directions(run))),
        ("cosine_heatmap", "double", 0.85, lambda ax: cosine_heatmap(run, ax=ax)),
        ("smoothness", "single", 0.8, lambda ax: smoothness_scatter(run, ax=ax)),
    ]
    specs = [spec for spec in specs if spec[0] in wanted]
    if every_step:
        def histograms(run: Run, step: int, ax: Axes) -> Axes:
            return update_histograms(run, step, ax=ax, directions=_fig1_directions(run, step))

        per_step = (("landscape_lines", "lines", landscape_lines, 0.45),
                    ("update_histograms", "histograms", histograms, 0.45),
                    ("cosine_heatmap", "cosine", cosine_heatmap, 0.85))
        for name, table, fn, aspect in per_step:
            if name not in wanted:
                continue
            for s in run.steps(table):
                specs.append((f"{name}_step{s}", "double", aspect,
                              lambda ax, fn=fn, s=s: fn(run, step=s, ax=ax)))

    written: list[Path] = []
    with run.snapshot(), paper_style():  # one consistent state even while the run is still writing
        for name, width, aspect, draw in specs:
            fig = Figure(figsize=figsize(width, aspect), layout="constrained")
            try:
                draw(fig.add_subplot())
            except NoDataError:
                continue
            written.append(_save(fig, out / f"{_safe(name)}.{fmt}", fmt))
        if "coordinate_smoothness" in wanted and run.has("coord_smoothness"):
            fig = Figure(layout="constrained")
            _coordinate_grid(run, fig)
            written.append(_save(fig, out / f"coordinate_smoothness.{fmt}", fmt))
        written += save_curvature_figures(run, out, fmt, only=[n for n in CURVATURE_FIGURE_NAMES if n in wanted])
    return written
