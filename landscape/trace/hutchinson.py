"""Hutchinson's trace estimator (Hutchinson 1989; Avron & Toledo 2011):
``tr A ≈ (1/n) Σᵢ zᵢᵀ A zᵢ`` with independent Rademacher (±1) vectors ``zᵢ``.

Unbiased, with variance ``2 Σ_{i≠j} A_ij²`` per sample for Rademacher probes (``2‖A‖_F²`` for
Gaussian ones): the standard error falls as ``1/√n``. Each sample is one quadratic form ``zᵀAz``
(for the Gauss–Newton matrix cheaper than a full product).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape.linops import operator_of
from landscape.linops._base import gaussian, rademacher, stderr
from landscape.trace._estimate import TraceEstimate

__all__ = ["hutchinson_trace"]


def hutchinson_trace(
    source: Any,
    n: int = 100,
    *,
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    distribution: str = "rademacher",
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> TraceEstimate:
    """Hutchinson's estimate of the trace of a curvature matrix, with its standard error.

    Args:
        source: an :class:`~landscape.Objective` or a :class:`~landscape.linops.CurvatureOperator`.
        n: probe vectors (products).
        curvature: ``"hessian"`` or ``"ggn"`` (when ``source`` is an objective).
        at: the point (when ``source`` is an objective).
        seed: seeds the probes.
        distribution: ``"rademacher"`` (default, lower variance) or ``"gaussian"``.
        batch: probes per operator call (with several micro-batches, they share one rebuilt graph).
        progress: ``progress(done, n)``.

    Returns:
        A :class:`~landscape.trace.TraceEstimate` (``method="hutchinson"``).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if distribution not in ("rademacher", "gaussian"):
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    draw = rademacher if distribution == "rademacher" else gaussian
    gen = torch.Generator().manual_seed(int(seed))
    with operator_of(source, curvature, at) as op:
        view = op.flat()
        samples: list[float] = []
        while len(samples) < n:
            zs = [draw(view.n, gen, view.dtype, view.device) for _ in range(min(batch, n - len(samples)))]
            samples.extend(view.quadratic_forms(zs))
            if progress is not None:
                progress(len(samples), n)
        arr = np.asarray(samples, dtype=np.float64)
        return TraceEstimate(mean=float(arr.mean()), stderr=stderr(samples) if n > 1 else math.nan, n=n, samples=arr,
                             method="hutchinson", n_products=n, curvature=op.curvature)
