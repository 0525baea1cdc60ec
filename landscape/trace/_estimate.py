"""The result type of every trace estimator."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["TraceEstimate"]


@dataclass(frozen=True)
class TraceEstimate:
    """An estimate of ``tr A``: ``mean`` ± ``stderr``.

    Attributes:
        mean: the estimate.
        stderr: its standard error: over the ``n`` Hutchinson samples; for Hutch++, of the residual
            Hutchinson term given the sketch (the sketch's exact part has none).
        n: random probe vectors used by the stochastic part.
        samples: the stochastic part's samples ``zᵢᵀ A zᵢ`` (Hutch++: of the deflated matrix).
        method: ``"hutchinson"`` or ``"hutch++"``.
        n_products: matrix-vector products (or quadratic forms) spent.
        curvature: ``"hessian"``, ``"ggn"``, ...
        sketch: Hutch++'s exact part ``tr(QᵀAQ)`` (NaN for Hutchinson).
    """

    mean: float
    stderr: float
    n: int
    samples: np.ndarray = field(repr=False)
    method: str = "hutchinson"
    n_products: int = 0
    curvature: str = "hessian"
    sketch: float = math.nan
