"""Hutch++ (Meyer, Musco, Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation",
SOSA 2021, Algorithm 1).

With a budget of ``m`` products: ``s = ⌊m/3⌋`` products sketch the range, ``Q = orth(A S)`` for a
Rademacher ``S ∈ R^{d×s}``; the top of the spectrum is then counted exactly, ``tr(QᵀAQ)`` (``s``
quadratic forms), and Hutchinson estimates the rest, ``tr((I−QQᵀ) A (I−QQᵀ))``, with the remaining
``m − 2s`` Rademacher probes projected off ``Q``:

    tr A ≈ tr(QᵀAQ) + (1/(m−2s)) Σᵢ gᵢᵀ (I−QQᵀ) A (I−QQᵀ) gᵢ.

For a matrix whose eigenvalues decay (a neural network's Hessian: a few outliers and a bulk),
deflating the top ``s`` directions removes most of the Hutchinson variance: the error falls as
``1/m`` instead of ``1/√m`` (Theorem 1 there, for PSD matrices). The standard error reported is the
residual term's, conditional on the sketch. Memory: ``2s`` vectors of length ``d``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape.linops import operator_of
from landscape.linops._base import rademacher, stderr
from landscape.trace._estimate import TraceEstimate

__all__ = ["hutchpp_trace"]


def hutchpp_trace(
    source: Any,
    n: int = 100,
    *,
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TraceEstimate:
    """The Hutch++ estimate of the trace of a curvature matrix, from ``n`` products.

    Args:
        source: an :class:`~landscape.Objective` or a :class:`~landscape.linops.CurvatureOperator`.
        n: the product budget (at least 3): ``⌊n/3⌋`` for the sketch, as many for its exact trace,
            the rest for Hutchinson on the deflated matrix.
        curvature: ``"hessian"`` or ``"ggn"`` (when ``source`` is an objective).
        at: the point (when ``source`` is an objective).
        seed: seeds ``S`` and the probes.
        batch: vectors per operator call.
        progress: ``progress(done, n)``.

    Returns:
        A :class:`~landscape.trace.TraceEstimate` (``method="hutch++"``, ``sketch = tr(QᵀAQ)``).
    """
    if not isinstance(n, int) or n < 3:
        raise ValueError(f"n must be an integer of at least 3 (Hutch++ splits it in three), got {n!r}")
    s = n // 3
    r = n - 2 * s
    gen = torch.Generator().manual_seed(int(seed))
    with operator_of(source, curvature, at) as op:
        view = op.flat()
        done = 0

        def tick(k: int) -> None:
            nonlocal done
            done += k
            if progress is not None:
                progress(done, n)

        sketch = []
        for i in range(0, s, batch):
            cols = [rademacher(view.n, gen, view.dtype, view.device) for _ in range(min(batch, s - i))]
            sketch.extend(view.mvs(cols))
            tick(len(cols))
        y = torch.stack(sketch, dim=1)
        q, rr = torch.linalg.qr(y.double() if y.dtype != torch.float64 and y.numel() <= 2**26 else y)
        keep = rr.diagonal().abs() > 1e-12 * max(float(rr.diagonal().abs().max()), 1e-300)
        q = q[:, keep].to(view.dtype)
        del y, sketch
        exact = 0.0
        cols = [q[:, j].contiguous() for j in range(q.shape[1])]
        for i in range(0, len(cols), batch):
            exact += float(sum(view.quadratic_forms(cols[i:i + batch])))
        tick(s)  # budgeted even when the sketch had lower rank
        samples: list[float] = []
        while len(samples) < r:
            gs = []
            for _ in range(min(batch, r - len(samples))):
                g = rademacher(view.n, gen, view.dtype, view.device)
                g = g - q @ (q.T @ g)
                gs.append(g)
            samples.extend(view.quadratic_forms(gs))
            tick(len(gs))
        arr = np.asarray(samples, dtype=np.float64)
        return TraceEstimate(
            mean=exact + float(arr.mean()), stderr=stderr(samples) if r > 1 else math.nan, n=r, samples=arr,
            method="hutch++", n_products=s + q.shape[1] + r, curvature=op.curvature, sketch=exact,
        )
