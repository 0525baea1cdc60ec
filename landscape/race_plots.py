"""Figures of an optimizer race (``landscape race``): Pan & Li 2023, Fig. 6 and Crawshaw et al. 2022, Figs. 4-5.

Each function takes the race's :class:`~landscape.store.Run` and ``ax: Axes | None = None``, draws and
returns the Axes; it never shows or saves (:func:`save_race_figures` does, in paper style). Colours
are :func:`landscape.plots.recipe_style`'s: a recipe and its clipped variant share a hue, the variant
lighter and dashed (Pan & Li 2023: "the same color with different opacity").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from landscape._style import figsize, paper_style, recipe_style
from landscape.race import choose_learning_rates, race_summary
from landscape.store import NoDataError, Run

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["RACE_FIGURES", "race_curves", "race_lr_sweep", "save_race_figures", "smooth_curve"]

#: The figures :func:`save_race_figures` writes (file stems).
RACE_FIGURES = ("race_train_loss", "race_probe_loss", "race_lr_sweep")


def _axes(ax: Axes | None, width: str = "single", aspect: float = 0.75) -> Axes:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize(width, aspect), layout="constrained")
    return ax


def smooth_curve(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (the first points average what exists), NaN
    ignored: ``s_k = mean(y_{k−w+1..k})``."""
    y = np.asarray(y, dtype=np.float64)
    if window <= 1 or y.size == 0:
        return y
    ok = np.isfinite(y)
    c = np.concatenate([[0.0], np.cumsum(np.where(ok, y, 0.0))])
    n = np.concatenate([[0], np.cumsum(ok)])
    hi = np.arange(1, y.size + 1)
    lo = np.maximum(0, hi - window)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (c[hi] - c[lo]) / (n[hi] - n[lo])


def _curves(run: Run, metric: str) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """``{recipe: (steps, [values per seed])}`` at each recipe's chosen learning rate."""
    summary = race_summary(run)
    if not summary:
        raise NoDataError(f"run {run.path} has no finished race runs (table 'race_runs')")
    cols = run.columns("race_curves")
    out: dict[str, tuple[np.ndarray, list[np.ndarray]]] = {}
    for s in summary:
        if s["lr"] is None:
            continue
        per_seed = []
        steps = None
        for seed in s["seeds"]:
            m = (cols["recipe"] == s["recipe"]) & (cols["lr"] == s["lr"]) & (cols["seed"] == seed)
            st, y = cols["step"][m].astype(np.int64), cols[metric][m]
            keep = np.isfinite(y)
            st, y = st[keep], y[keep]
            steps = st if steps is None or st.size < steps.size else steps
            per_seed.append((st, y))
        if steps is None or steps.size == 0:
            continue
        out[s["recipe"]] = (steps, [np.interp(steps, st, y) for st, y in per_seed])
    return out


def race_curves(run: Run, metric: str = "train_loss", ax: Axes | None = None, *, smooth: int | None = None,
                band: bool = True, recipes: Sequence[str] | None = None, confidence: float = 0.95) -> Axes:
    """Loss against step, one line per recipe at its chosen learning rate (Pan & Li 2023, Fig. 6): the mean
    over the seeds, shaded with the Student-t confidence band of the mean (Crawshaw et al. 2022, Figs. 4-5: 95%).

    Args:
        run: a race.
        metric: ``"train_loss"`` (each step's training batch) or ``"probe_loss"`` (the fixed probe batch).
        ax: where to draw.
        smooth: trailing moving-average window of each seed's curve before the mean (default: 2% of
            the steps for the training loss, none for the probe loss).
        band: shade the confidence band (from two seeds on).
        recipes: only these recipes (default: all, in the race's order).
        confidence: the band's level.
    """
    from scipy.stats import t

    if metric not in ("train_loss", "probe_loss"):
        raise ValueError(f"metric must be 'train_loss' or 'probe_loss', got {metric!r}")
    ax = _axes(ax)
    curves = _curves(run, metric)
    chosen = {s["recipe"]: s["lr"] for s in race_summary(run)}
    names = [r for r in (recipes or list(curves)) if r in curves]
    if not names:
        raise NoDataError(f"run {run.path} has no {metric} curves for {list(recipes or [])}")
    lo, hi = np.inf, -np.inf
    for name in names:
        steps, ys = curves[name]
        window = smooth if smooth is not None else (max(1, int(steps.max()) // 50) if metric == "train_loss" else 1)
        ys = np.stack([smooth_curve(y, window) for y in ys])
        mean = np.nanmean(ys, axis=0)
        if np.isfinite(mean).any():
            lo, hi = min(lo, float(np.nanmin(mean))), max(hi, float(np.nanmax(mean)))
        style = recipe_style(name)
        ax.plot(steps, mean, label=f"{name} (η={chosen[name]:g})", **style)
        if band and ys.shape[0] > 1:
            half = t.ppf((1 + confidence) / 2, ys.shape[0] - 1) * ys.std(axis=0, ddof=1) / np.sqrt(ys.shape[0])
            ax.fill_between(steps, mean - half, mean + half, color=style["color"], alpha=0.2, linewidth=0,
                            zorder=style["zorder"] - 1)
    if np.isfinite(lo) and hi > lo:  # the means decide the limits; a wide band from few seeds is cut
        ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    n = max(len(curves[r][1]) for r in names)
    what = "training loss" if metric == "train_loss" else "probe-batch loss"
    ax.set_xlabel("step")
    ax.set_ylabel(what)
    ax.set_title(f"{what}, mean over {n} seed{'s' * (n != 1)}" + (f", {int(confidence * 100)}% CI" if band and n > 1 else ""))
    ax.legend()
    return ax


def race_lr_sweep(run: Run, ax: Axes | None = None, *, recipes: Sequence[str] | None = None) -> Axes:
    """The learning-rate sweep of the tuning seed: each recipe's score (the selection criterion) against
    its learning rate on a log axis; the chosen rate ringed, diverged rates as crosses at the top."""
    rows = run.rows("race_runs")
    if not rows:
        raise NoDataError(f"run {run.path} has no finished race runs (table 'race_runs')")
    ax = _axes(ax)
    seed = int(run.settings.get("tune_seed", min(r["seed"] for r in rows)))
    chosen = choose_learning_rates(rows, seed)
    order = [s["recipe"] for s in race_summary(run)]
    finite = [r["score"] for r in rows if r["seed"] == seed and np.isfinite(r["score"])]
    top = max(finite) if finite else 1.0
    for name in [r for r in (recipes or order) if r in chosen]:
        rs = sorted((r for r in rows if r["seed"] == seed and r["recipe"] == name), key=lambda r: r["lr"])
        style = recipe_style(name)
        ok = [r for r in rs if np.isfinite(r["score"])]
        ax.plot([r["lr"] for r in ok], [r["score"] for r in ok], marker="o", label=name, **style)
        bad = [r["lr"] for r in rs if not np.isfinite(r["score"])]
        if bad:
            ax.plot(bad, [top] * len(bad), linestyle="none", marker="x", color=style["color"])
        best = next((r for r in ok if r["lr"] == chosen[name]["lr"]), None)
        if best is not None:
            ax.plot([best["lr"]], [best["score"]], marker="o", markersize=9, markerfacecolor="none",
                    color=style["color"], linestyle="none")
    ax.set_xscale("log")
    crit = "final probe-batch loss" if run.settings.get("select") == "probe" else "final training loss"
    ax.set_xlabel(r"learning rate $\eta$")
    ax.set_ylabel(crit)
    ax.set_title(f"learning-rate sweep (seed {seed}); ringed: chosen, x: diverged")
    ax.legend()
    return ax


def save_race_figures(run: Run, out_dir: str | Path, fmt: str = "png", *,
                      only: Sequence[str] | None = None) -> list[Path]:
    """Write the race's figures (:data:`RACE_FIGURES`) into ``out_dir`` in paper style; returns the
    paths. ``only``: a subset of :data:`RACE_FIGURES`."""
    from matplotlib.figure import Figure

    from landscape.plots import FIGURE_FORMATS, _save

    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(FIGURE_FORMATS)}, got {fmt!r}")
    wanted = [f for f in RACE_FIGURES if only is None or f in only]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    draw: dict[str, Any] = {
        "race_train_loss": lambda ax: race_curves(run, "train_loss", ax=ax),
        "race_probe_loss": lambda ax: race_curves(run, "probe_loss", ax=ax),
        "race_lr_sweep": lambda ax: race_lr_sweep(run, ax=ax),
    }
    written = []
    with run.snapshot(), paper_style():
        for name in wanted:
            fig = Figure(figsize=figsize("single", 0.8), layout="constrained")
            try:
                draw[name](fig.add_subplot())
            except NoDataError:
                continue
            written.append(_save(fig, out / f"{name}.{fmt}", fmt))
    return written
