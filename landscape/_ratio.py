"""The ratio of a direction's sharpness to SGD's, and when it is defined (no torch import: the
report and the CLI use it too)."""

from __future__ import annotations

import math

__all__ = ["ratio_to_reference"]


def ratio_to_reference(value: float | None, ref: float | None, reference: str = "sgd") -> tuple[float | None, str | None]:
    """``(value / ref, None)`` where the reference direction's reported sharpness ``ref`` is > 0, else
    ``(None, reason)``.

    A ratio to SGD (Pan & Li 2023, Tables 1, 4–7) reads "this direction is k× as sharp as SGD's"; it
    means that only against a positive SGD sharpness. Two negative values give a positive ratio that
    is not "flatter", so such steps are left out of the ratio and of every median built on it. A
    negative ``value`` against a positive ``ref`` gives a negative ratio, which is kept: it says the
    direction has negative curvature where SGD's has positive.
    """
    if ref is None or (isinstance(ref, float) and math.isnan(ref)):
        return None, f"no {reference} sharpness at this step"
    if not math.isfinite(ref):
        return None, f"{reference} sharpness is not finite ({ref!r})"
    if ref <= 0:
        return None, f"{reference} sharpness ≤ 0 ({ref:.4g})"
    if value is None or not math.isfinite(value):
        return None, "sharpness not finite"
    return value / ref, None
