"""Paper style for figures: rc settings sized for one or two paper columns, and direction styles.

Private helpers of :mod:`landscape.plots`; the public names are re-exported there.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import matplotlib as mpl

from landscape._directions import split_recipe

#: Width in inches of one column and of the full text width of a two-column paper.
COLUMN_WIDTH = 3.3
TEXT_WIDTH = 6.8

#: rc settings for vector-friendly paper figures (TrueType fonts embedded in PDF/PS, text kept as
#: text in SVG, font sizes that read at 100% in a 3.3 in column).
PAPER_RC: dict[str, Any] = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 6,
    "legend.title_fontsize": 7,
    "legend.frameon": False,
    "legend.handlelength": 2.0,
    "lines.linewidth": 1.1,
    "lines.markersize": 3.5,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.linewidth": 0.4,
    "grid.alpha": 0.35,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "xtick.minor.width": 0.4,
    "ytick.minor.width": 0.4,
    "figure.dpi": 150,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.02,
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "image.cmap": "viridis",
}


def figsize(width: str | float = "single", aspect: float = 0.75) -> tuple[float, float]:
    """Figure size for ``width`` = ``"single"`` (one column), ``"double"`` (text width) or inches."""
    w = {"single": COLUMN_WIDTH, "double": TEXT_WIDTH}.get(width, width)  # type: ignore[arg-type]
    if not isinstance(w, (int, float)):
        raise ValueError(f"width must be 'single', 'double' or a number of inches, got {width!r}")
    return float(w), float(w) * aspect


@contextmanager
def paper_style(**overrides: Any) -> Iterator[None]:
    """Context manager applying :data:`PAPER_RC` (plus ``overrides``) to figures drawn inside it.

    Example:
        >>> import landscape.plots as lp
        >>> with lp.paper_style():                                   # doctest: +SKIP
        ...     ax = lp.sharpness_ratio(run)
        ...     ax.figure.savefig("ratio.pdf")
    """
    with mpl.rc_context({**PAPER_RC, **overrides}):
        yield


# -- direction styles ------------------------------------------------------------------------------

#: Line style and opacity of each variant of a base recipe: the same colour as the base at a lower
#: opacity (Pan & Li 2023, Fig. 2: "clipped and unclipped variants of the same algorithm have the same
#: color with different opacity"), and a line style of its own so that variants stay apart in
#: greyscale and where two variants of one family are drawn together.
VARIANTS: dict[str, tuple[float, Any]] = {
    "_clip_update": (0.6, ":"),
    "_valueclip": (0.6, "-."),
    "_normclip": (0.6, (0, (5, 1.5, 1, 1.5, 1, 1.5))),
    "_clip": (0.6, "--"),
}

#: Colour of each base recipe (distinct hues, from the colour-blind-friendly tab10 palette).
BASE_COLORS: dict[str, str] = {
    "sgd": "#1f77b4",
    "adam": "#d62728",
    "adafactor": "#2ca02c",
    "lion": "#9467bd",
    "signsgd": "#ff7f0e",
    "normsgd": "#17becf",
    "gensignsgd": "#8c564b",
    "smoothed_signsgd": "#e377c2",
    "smoothed_normsgd": "#bcbd22",
}
_FALLBACK = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354")

TRAINED_SUFFIX = " (trained)"
TRAINED_COLOR = "#000000"


def recipe_style(name: str, *, trained: bool | None = None, color: str | None = None) -> dict[str, Any]:
    """Line style of a direction, the same in every figure.

    A base recipe and its variants (suffixes ``_clip``, ``_clip_update``, ``_valueclip``,
    ``_normclip``) share the base's colour; a variant is drawn at a lower opacity (``alpha``) with a
    line style of its own. The trained optimizer's own direction is black and drawn on top.

    Args:
        name: direction name.
        trained: whether it is the trained optimizer's direction; ``None`` detects the
            ``" (trained)"`` suffix.
        color: the base colour to use (default: :data:`BASE_COLORS`, or a stable fallback for
            other names; :func:`run_styles` picks unused ones within a run).

    Returns:
        ``{"color", "linestyle", "alpha", "zorder", "linewidth"?}``, ready for ``ax.plot(..., **style)``.
    """
    if trained is None:
        trained = name.endswith(TRAINED_SUFFIX)
    if trained:
        return {"color": TRAINED_COLOR, "linestyle": "-", "alpha": 1.0, "zorder": 5, "linewidth": 1.4}
    base, suffix = split_recipe(name)
    color = color or BASE_COLORS.get(base) or _FALLBACK[zlib.crc32(base.encode()) % len(_FALLBACK)]
    if not suffix:
        return {"color": color, "linestyle": "-", "alpha": 1.0, "zorder": 3}
    alpha, linestyle = VARIANTS[suffix]
    return {"color": color, "linestyle": linestyle, "alpha": alpha, "zorder": 2}


def run_styles(directions: list[str], trained: str | None = None) -> dict[str, dict[str, Any]]:
    """The style of every direction of a run: :func:`recipe_style`, with bases that have no colour
    of their own given distinct unused colours in the run's direction order (so two recipes of your
    own never share a colour). The same run gives the same styles in every figure."""
    used = {BASE_COLORS[split_recipe(d)[0]] for d in directions if split_recipe(d)[0] in BASE_COLORS}
    spare = [c for c in _FALLBACK if c not in used]
    extra: dict[str, str] = {}
    out = {}
    for d in directions:
        is_trained = (d == trained) if trained else None
        base = split_recipe(d)[0]
        color = None
        if not (is_trained or (is_trained is None and d.endswith(TRAINED_SUFFIX))) and base not in BASE_COLORS:
            if base not in extra:
                extra[base] = spare.pop(0) if spare else _FALLBACK[zlib.crc32(base.encode()) % len(_FALLBACK)]
            color = extra[base]
        out[d] = recipe_style(d, trained=is_trained, color=color)
    return out
