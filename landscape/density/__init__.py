"""Spectral densities of curvature matrices: :func:`spectral_density` (stochastic Lanczos
quadrature, Ghorbani et al. 2019)."""

from landscape.density.ghorbani2019slq import SpectralDensity, spectral_density

__all__ = ["SpectralDensity", "spectral_density"]
