"""Figures of loss planes and lines, read from a run store (tables ``planes``, ``plane_losses``,
``plane_trajectory``; see :mod:`landscape.planes`).

Each function takes the run (a :class:`~landscape.store.Run`, or a
:class:`~landscape.planes.StoredPlane` read from one) and the plane's name (default: the last one
stored), draws into ``ax`` (a new one-column figure when ``None``) and returns the Axes; it never
shows or saves. :func:`save_plane_figures` writes them to files under the paper style.

* :func:`plane_contour`: filled contours of the loss with labelled levels (linear or logarithmic
  colour scale), the centre, the projected trajectory and, on an update plane, each update's step;
* :func:`plane_surface`: the same loss as a 3-D surface;
* :func:`plane_lines`: a line's loss (training and probe batches), with its markers (the two ends of
  an interpolation) and the trajectory's points.

Example:
    >>> from landscape.store import load_run
    >>> import landscape.plane_plots as pp
    >>> run = load_run("runs/adam")                                    # doctest: +SKIP
    >>> ax = pp.plane_contour(run, "updates@100:sgd,adam", log=True)   # doctest: +SKIP
    >>> ax.figure.savefig("plane.pdf")                                 # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape._style import figsize, paper_style
from landscape.planes import StoredPlane, list_planes, load_plane
from landscape.store import NoDataError, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plane_contour", "plane_lines", "plane_surface", "save_plane_figures"]

_OBJECTIVE_STYLE = {"train": {"color": "#1f77b4", "linestyle": "--"}, "probe": {"color": "#d62728", "linestyle": "-"}}


def _axes(ax: Axes | None, width: str | float = "single", aspect: float = 0.8) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize(width, aspect), layout="constrained")
    return ax


def _stored(run: Run | StoredPlane, name: str | None) -> StoredPlane:
    if isinstance(run, StoredPlane):
        if name is not None and name != run.name:
            raise ValueError(f"got the stored plane {run.name!r} but name={name!r}")
        return run
    return load_plane(run, name)


def _loss(sp: StoredPlane, objective: str) -> np.ndarray:
    if objective not in sp.losses:
        have = ", ".join(sp.losses) or "none"
        raise NoDataError(f"plane {sp.name!r} has no {objective!r} losses; it has: {have}")
    return sp.losses[objective]


def _levels(z: np.ndarray, levels: int | Sequence[float], log: bool) -> tuple[np.ndarray, Any]:
    from matplotlib.colors import LogNorm
    from matplotlib.ticker import MaxNLocator

    finite = z[np.isfinite(z)]
    if log:
        finite = finite[finite > 0]
        if not finite.size:
            raise ValueError("a logarithmic colour scale needs positive losses; this plane has none (use log=False)")
    if not finite.size:
        raise NoDataError("the plane has no finite losses to draw")
    if not isinstance(levels, (int, np.integer)):
        lv = np.asarray(levels, dtype=np.float64)
        return lv, (LogNorm(lv[0], lv[-1]) if log else None)
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + max(abs(lo) * 1e-6, 1e-12)
    if log:
        return np.geomspace(lo, hi, int(levels) + 1), LogNorm(lo, hi)
    return MaxNLocator(int(levels) + 1).tick_values(lo, hi), None


def _label_format(value: float) -> str:
    return f"{value:.3g}"


def _center_label(sp: StoredPlane) -> str:
    return f"centre (step {sp.step})" if sp.step is not None else "centre"


def _arrows(sp: StoredPlane) -> dict[str, tuple[float, float]]:
    """The plane's markers as arrow tips: markers closer than 3% of the axes merged into one label, and
    all shortened by one factor when needed so the longest fits inside 85% of the axes."""
    a0, a1, b0, b1 = float(sp.alphas[0]), float(sp.alphas[-1]), float(sp.betas[0]), float(sp.betas[-1])
    wa, wb = max(a1 - a0, 1e-300), max(b1 - b0, 1e-300)
    groups: list[tuple[list[str], tuple[float, float]]] = []
    for label, xy in sp.markers.items():
        if len(xy) < 2 or not (np.isfinite(xy[0]) and np.isfinite(xy[1])):
            continue
        x, y = float(xy[0]), float(xy[1])
        for names, (gx, gy) in groups:
            if abs(gx - x) < 0.03 * wa and abs(gy - y) < 0.03 * wb:
                names.append(label)
                break
        else:
            groups.append(([label], (x, y)))
    f = 1.0
    for _, (x, y) in groups:
        for v, lo, hi in ((x, a0, a1), (y, b0, b1)):
            if v > 0 and hi > 0 and v > 0.85 * hi:
                f = min(f, 0.85 * hi / v)
            elif v < 0 and lo < 0 and v < 0.85 * lo:
                f = min(f, 0.85 * lo / v)
    return {", ".join(names): (f * x, f * y) for names, (x, y) in groups}


def plane_contour(
    run: Run | StoredPlane,
    name: str | None = None,
    ax: Axes | None = None,
    *,
    objective: str = "probe",
    log: bool = False,
    levels: int | Sequence[float] = 12,
    labels: bool = True,
    trajectory: bool = True,
    markers: bool = True,
    colorbar: bool = True,
    equal: bool | None = None,
    cmap: str | None = None,
) -> Axes:
    """Filled contours of ``f(x + α·d₁ + β·d₂)``, with labelled contour lines.

    Args:
        run: the run (or a :class:`~landscape.planes.StoredPlane`).
        name: the plane (default: the last one stored).
        ax: where to draw (default: a new one-column figure).
        objective: which losses (``"probe"``, or ``"train"`` when computed).
        log: logarithmic colour scale and geometrically spaced levels (the losses must be positive).
        levels: how many levels (or the levels themselves).
        labels: label the contour lines with their values.
        trajectory: draw the stored trajectory (projected checkpoints or saved points).
        markers: draw the stored markers (e.g. each update's step) as arrows from the centre, shortened
            by one common factor when the longest would leave the axes.
        colorbar: add a colour bar.
        equal: equal axis scales (default: on for planes whose coordinates are both distances, e.g. an
            update plane with ``scale="unit"``, so the contours' curvature compares the directions).
        cmap: colour map (default: the style's).

    Raises:
        landscape.store.NoDataError: no such plane or objective, or no finite loss.
        ValueError: the stored plane is a line (use :func:`plane_lines`).
    """
    sp = _stored(run, name)
    if sp.dims != 2 or sp.betas is None:
        raise ValueError(f"{sp.name!r} is a line, not a plane: draw it with plane_lines")
    z = _loss(sp, objective).T  # rows: β, columns: α
    lv, norm = _levels(z, levels, log)
    zm = np.ma.masked_where(~np.isfinite(z) | ((z <= 0) if log else False), z)
    ax = _axes(ax)
    a, b = np.meshgrid(sp.alphas, sp.betas)
    filled = ax.contourf(a, b, zm, levels=lv, norm=norm, cmap=cmap, extend="neither")
    lines = ax.contour(a, b, zm, levels=filled.levels, colors="k", linewidths=0.35, alpha=0.7)
    if labels:
        ax.clabel(lines, lines.levels[::2] if len(lines.levels) > 8 else lines.levels, fmt=_label_format,
                  fontsize=5.5, inline=True)
    ax.plot([0.0], [0.0], marker="*", color="white", markeredgecolor="black", markeredgewidth=0.5, markersize=8,
            linestyle="none", label=_center_label(sp), zorder=6)
    if trajectory and sp.trajectory is not None and np.isfinite(sp.trajectory["beta"]).any():
        t = sp.trajectory
        ax.plot(t["alpha"], t["beta"], marker="o", markersize=2.2, linewidth=0.8, color="white",
                markeredgecolor="black", markeredgewidth=0.3, label="trajectory", zorder=5)
        ends = (0, len(t["alpha"]) - 1)
        apart = (abs(t["alpha"][-1] - t["alpha"][0]) > 0.05 * np.ptp(sp.alphas)
                 or abs(t["beta"][-1] - t["beta"][0]) > 0.05 * np.ptp(sp.betas))
        for i in ends if apart else ():  # (a trajectory squeezed into a dot, as on a random plane: no labels)
            step = t["step"][i]
            if step is not None:
                ax.annotate(f"{step}", (t["alpha"][i], t["beta"][i]), xytext=(3, 3), textcoords="offset points",
                            fontsize=5.5, color="white", zorder=6)
    if markers:
        for label, (x, y) in _arrows(sp).items():
            ax.annotate("", xy=(x, y), xytext=(0.0, 0.0), zorder=7, gid=f"arrow:{label}",
                        arrowprops={"arrowstyle": "-|>", "color": "black", "linewidth": 0.8, "shrinkA": 0, "shrinkB": 0})
            r = float(np.hypot(x / (sp.alphas[-1] - sp.alphas[0]), y / (sp.betas[-1] - sp.betas[0]))) or 1.0
            ux, uy = x / (sp.alphas[-1] - sp.alphas[0]) / r, y / (sp.betas[-1] - sp.betas[0]) / r
            ax.annotate(label, xy=(x, y), xytext=(4 * ux, 4 * uy), textcoords="offset points", fontsize=6,
                        ha="left" if ux > 0.3 else "right" if ux < -0.3 else "center",
                        va="bottom" if uy > 0.3 else "top" if uy < -0.3 else "center", zorder=7)
    ax.set_xlim(sp.alphas[0], sp.alphas[-1])
    ax.set_ylim(sp.betas[0], sp.betas[-1])
    ax.set_xlabel(sp.x_label)
    ax.set_ylabel(sp.y_label or "β")
    ax.grid(False)
    if equal is None:
        equal = sp.kind == "updates" and sp.config.get("scale", "unit") == "unit"
    if equal:
        ax.set_aspect("equal", adjustable="box")
    if colorbar:
        bar = ax.figure.colorbar(filled, ax=ax, label=f"{objective} loss" + (" (log scale)" if log else ""), shrink=0.9)
        if log:  # plain numbers at the levels, not 2.99413×10⁰
            from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

            shown = filled.levels[:: max(1, len(filled.levels) // 6)]
            bar.ax.yaxis.set_major_locator(FixedLocator(shown))
            bar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _label_format(v)))
            bar.ax.yaxis.set_minor_formatter(NullFormatter())
    return ax


def plane_surface(
    run: Run | StoredPlane,
    name: str | None = None,
    ax: Axes | None = None,
    *,
    objective: str = "probe",
    log: bool = False,
    trajectory: bool = True,
    cmap: str | None = None,
) -> Axes:
    """The loss of a plane as a 3-D surface (``log``: the height is ``log₁₀`` of the loss).

    ``ax`` must be 3-D (``fig.add_subplot(projection="3d")``); by default a new figure is made.
    The centre is marked at its loss; the trajectory is drawn at the loss of each point itself.
    """
    sp = _stored(run, name)
    if sp.dims != 2 or sp.betas is None:
        raise ValueError(f"{sp.name!r} is a line, not a plane: draw it with plane_lines")
    z = _loss(sp, objective).T
    if log:
        if not (z[np.isfinite(z)] > 0).any():
            raise ValueError("a logarithmic scale needs positive losses; this plane has none (use log=False)")
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(z > 0, np.log10(z), np.nan)
    if not np.isfinite(z).any():
        raise NoDataError(f"plane {sp.name!r} has no finite losses to draw")
    if ax is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=figsize("single", 0.85), layout="constrained")
        ax = fig.add_subplot(projection="3d")
    elif not hasattr(ax, "plot_surface"):
        raise ValueError("plane_surface needs 3-D axes: pass fig.add_subplot(projection='3d')")
    a, b = np.meshgrid(sp.alphas, sp.betas)
    ax.plot_surface(a, b, np.ma.masked_invalid(z), cmap=cmap or "viridis", linewidth=0, antialiased=True,
                    rstride=1, cstride=1, alpha=0.9)
    i, j = int(np.argmin(np.abs(sp.alphas))), int(np.argmin(np.abs(sp.betas)))
    ax.scatter([sp.alphas[i]], [sp.betas[j]], [z[j, i]], marker="*", s=40, color="white", edgecolors="black",
               label=_center_label(sp), depthshade=False)
    t = sp.trajectory
    if trajectory and t is not None and np.isfinite(t["beta"]).any() and np.isfinite(t["loss"]).any():
        tz = np.log10(np.where(t["loss"] > 0, t["loss"], np.nan)) if log else t["loss"]
        ax.plot(t["alpha"], t["beta"], tz, marker="o", markersize=2, linewidth=0.8, color="black", label="trajectory")
    ax.set_xlabel(sp.x_label, fontsize=6)
    ax.set_ylabel(sp.y_label or "β", fontsize=6)
    ax.set_zlabel(("log₁₀ " if log else "") + f"{objective} loss", fontsize=6)
    return ax


def plane_lines(
    run: Run | StoredPlane,
    name: str | None = None,
    ax: Axes | None = None,
    *,
    objectives: Sequence[str] | None = None,
    log: bool = False,
    markers: bool = True,
    trajectory: bool = True,
) -> Axes:
    """The loss along a line (e.g. an interpolation between checkpoints), one curve per objective
    (training and probe batches).

    Args:
        run, name, ax: as in :func:`plane_contour`.
        objectives: which curves (default: every stored one, ``train`` before ``probe``).
        log: logarithmic loss axis.
        markers: mark the stored markers (the ends of an interpolation) with dotted vertical lines.
        trajectory: draw the trajectory's points at their own probe loss (off the line by their
            ``residual``).
    """
    sp = _stored(run, name)
    if sp.dims != 1:
        raise ValueError(f"{sp.name!r} is a plane, not a line: draw it with plane_contour or plane_surface")
    names = list(objectives) if objectives is not None else sorted(sp.losses, key=lambda k: (k != "train", k))
    if not names:
        raise NoDataError(f"line {sp.name!r} has no losses stored yet")
    ax = _axes(ax, aspect=0.7)
    for key in names:
        style = _OBJECTIVE_STYLE.get(key, {})
        ax.plot(sp.alphas, _loss(sp, key), label=f"{key} loss", **style)
    if markers:
        from matplotlib.transforms import blended_transform_factory

        tr = blended_transform_factory(ax.transData, ax.transAxes)
        for label, xy in sp.markers.items():
            ax.axvline(float(xy[0]), color="0.4", linestyle=":", linewidth=0.8, label="_nolegend_", gid=f"marker:{label}")
            ax.text(float(xy[0]), 1.0, label, transform=tr, ha="center", va="bottom", fontsize=6)
    t = sp.trajectory
    if trajectory and t is not None and np.isfinite(t["loss"]).any():
        ax.plot(t["alpha"], t["loss"], linestyle="none", marker="o", markersize=3, color="black",
                label="points (probe loss)", zorder=5)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel(sp.x_label)
    ax.set_ylabel("loss")
    ax.legend(loc="best")
    return ax


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "plane"


def save_plane_figures(
    run: Run,
    out_dir: str | Path,
    fmt: str = "png",
    *,
    names: Sequence[str] | None = None,
    surface: bool = False,
    log: bool = False,
) -> list[Path]:
    """Write a figure per stored plane (``plane_<name>.<fmt>``, and ``plane_<name>_surface.<fmt>`` with
    ``surface``) and per line (``line_<name>.<fmt>``) into ``out_dir``; return the paths written."""
    import matplotlib.pyplot as plt

    if fmt not in ("png", "pdf", "svg"):
        raise ValueError(f"fmt must be png, pdf or svg, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    with run.snapshot(), paper_style():
        for name in (list(names) if names is not None else list_planes(run)):
            sp = load_plane(run, name)
            draws = []
            if sp.dims == 2:
                draws.append((f"plane_{_safe(name)}", lambda ax, sp=sp: plane_contour(sp, ax=ax, log=log), False))
                if surface:
                    draws.append((f"plane_{_safe(name)}_surface", lambda ax, sp=sp: plane_surface(sp, ax=ax, log=log),
                                  True))
            else:
                draws.append((f"line_{_safe(name)}", lambda ax, sp=sp: plane_lines(sp, ax=ax, log=log), False))
            for stem, draw, three_d in draws:
                fig = plt.figure(figsize=figsize("single", 0.85 if three_d else 0.8), layout="constrained")
                try:
                    draw(fig.add_subplot(projection="3d") if three_d else fig.add_subplot())
                    path = out / f"{stem}.{fmt}"
                    fig.savefig(path, format=fmt)
                    paths.append(path)
                finally:
                    plt.close(fig)
    return paths
