"""Spectral density by stochastic Lanczos quadrature (SLQ): Ghorbani, Krishnan & Xiao, "An
Investigation into Neural Net Optimization via Hessian Eigenvalue Density" (ICML 2019, §2), after
Golub & Welsch (1969) and Lin, Saad & Yang (2016); Papyan (2019, 2020) uses the same estimator.

The density of the eigenvalues ``λ₁..λ_d`` of ``A``, smoothed by a Gaussian kernel ``g_σ``,

    φ_σ(t) = (1/d) Σᵢ g_σ(t − λᵢ) = (1/d) tr g_σ(t − A),

is estimated from ``n_v`` random unit vectors ``v``: ``E[vᵀ g(A) v] = tr g(A) / d``, and
``vᵀ g(A) v ≈ Σⱼ τⱼ g(θⱼ)`` is the ``m``-point Gauss quadrature of the spectral measure of ``v``,
read off the Lanczos tridiagonal ``T_m`` (nodes θⱼ its eigenvalues, weights τⱼ the squared first
components of its eigenvectors). The rule is exact for polynomials of degree ``2m − 1``: the first
moment ``d·Σⱼ τⱼ θⱼ = d·vᵀAv`` is Hutchinson's trace sample for every ``m``.

The nodes and weights are the result (stored as they are, so a figure can choose its kernel);
:meth:`SpectralDensity.density` smooths them. Ghorbani et al. use ``m = 90`` steps with full
re-orthogonalisation and σ² = 1e-5 on the spectrum rescaled to [−1, 1], the defaults here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape.eigen.lanczos import lanczos
from landscape.linops import operator_of

__all__ = ["SpectralDensity", "spectral_density"]

#: Ghorbani et al.'s kernel width on the spectrum rescaled to [−1, 1]: σ² = 1e-5.
GHORBANI_SIGMA = math.sqrt(1e-5)


@dataclass(frozen=True)
class SpectralDensity:
    """Gauss quadrature nodes and weights of the spectral measure of a curvature matrix.

    Attributes:
        nodes: Ritz values of every run, concatenated.
        weights: their weights ``τⱼ / n_vectors`` (summing to 1).
        run: which run each node comes from.
        n_vectors: Lanczos runs (random start vectors).
        steps: Lanczos steps per run (fewer when a run's Krylov space was exhausted).
        size: the dimension ``d``.
        curvature: ``"hessian"``, ``"ggn"``, ...
        n_products: products spent.
    """

    nodes: np.ndarray
    weights: np.ndarray
    run: np.ndarray = field(repr=False)
    n_vectors: int
    steps: int
    size: int
    curvature: str
    n_products: int

    @property
    def support(self) -> tuple[float, float]:
        """The smallest and largest node (estimates of λ_min and λ_max)."""
        return float(self.nodes.min()), float(self.nodes.max())

    def default_sigma(self) -> float:
        """Ghorbani et al.'s width, σ = √1e-5 on [−1, 1], in the spectrum's own units."""
        lo, hi = self.support
        return GHORBANI_SIGMA * max(hi - lo, 1e-12) / 2

    def grid(self, points: int = 1000, pad: float = 0.05) -> np.ndarray:
        lo, hi = self.support
        span = max(hi - lo, 1e-12)
        return np.linspace(lo - pad * span, hi + pad * span, points)

    def density(self, t: np.ndarray | None = None, sigma: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(t, φ_σ(t))``: the nodes smoothed by a Gaussian kernel (default grid and σ above);
        integrates to one over the real line."""
        t = self.grid() if t is None else np.asarray(t, dtype=np.float64)
        s = self.default_sigma() if sigma is None else float(sigma)
        if not s > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        z = (t[:, None] - self.nodes[None, :]) / s
        return t, (np.exp(-0.5 * z * z) / (s * math.sqrt(2 * math.pi))) @ self.weights

    def moment(self, p: int = 1) -> float:
        """``Σ τⱼ θⱼᵖ``: the estimate of ``(1/d) tr Aᵖ`` (exact in expectation for ``p ≤ 2m − 1``)."""
        return float(np.sum(self.weights * self.nodes**p))

    @property
    def trace(self) -> float:
        """``d · Σ τⱼ θⱼ``: the trace estimate (the mean of Hutchinson samples with the start vectors)."""
        return self.size * self.moment(1)


def spectral_density(
    source: Any,
    *,
    n_vectors: int = 1,
    steps: int = 90,
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    seed: int = 0,
    start: Sequence[Mapping[str, Tensor]] | None = None,
    reorthogonalize: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> SpectralDensity:
    """The SLQ spectral density of a curvature matrix (Ghorbani et al. 2019).

    Args:
        source: an :class:`~landscape.Objective` or a :class:`~landscape.linops.CurvatureOperator`.
        n_vectors: independent runs (Ghorbani et al. use 1 on ImageNet-scale models; more reduce the
            variance of the weights).
        steps: Lanczos steps per run, ``m`` (default 90, as Ghorbani et al.); memory ``m·d`` numbers
            with re-orthogonalisation.
        curvature: ``"hessian"`` or ``"ggn"`` (when ``source`` is an objective).
        at: the point (when ``source`` is an objective).
        seed: seeds the start vectors.
        start: explicit start vectors (keyed like the parameters) instead of random ones, one run each.
        reorthogonalize: full re-orthogonalisation (default, as Ghorbani et al.); without it memory is
            three vectors but ghost copies of converged eigenvalues appear.
        progress: ``progress(done, total)`` in products.

    Returns:
        A :class:`SpectralDensity`; plot it with :func:`landscape.curvature_plots.spectral_density_plot`.
    """
    if start is None and (not isinstance(n_vectors, int) or n_vectors < 1):
        raise ValueError(f"n_vectors must be a positive integer, got {n_vectors!r}")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    gen = torch.Generator().manual_seed(int(seed))
    with operator_of(source, curvature, at) as op:
        view = op.flat()
        runs = len(start) if start is not None else n_vectors
        total = runs * min(steps, view.n)
        nodes, weights, which = [], [], []
        n_products = 0
        longest = 0
        for r in range(runs):
            if start is not None:
                v0 = view.flatten({n: start[r][n] for n in view.names})
            else:
                v0 = torch.randn(view.n, generator=gen, dtype=torch.float64).to(dtype=view.dtype, device=view.device)
            if not float(v0.norm()) > 0:
                raise ValueError(f"start vector {r} is zero")
            done0 = n_products

            def prog(i: int, m: int, done0: int = done0) -> None:
                if progress is not None:
                    progress(done0 + i, total)

            run = lanczos(view.mv, view.n, steps=min(steps, view.n), dtype=view.dtype, device=view.device, v0=v0,
                          generator=gen, reorthogonalize=reorthogonalize, restart=False, progress=prog)
            theta, s = run.ritz()
            tau = s[0, :] ** 2
            nodes.append(theta)
            weights.append(tau / tau.sum() / runs)
            which.append(np.full(theta.size, r))
            n_products += run.n_products
            longest = max(longest, theta.size)
        return SpectralDensity(
            nodes=np.concatenate(nodes), weights=np.concatenate(weights), run=np.concatenate(which), n_vectors=runs,
            steps=longest, size=view.n, curvature=op.curvature, n_products=n_products,
        )
