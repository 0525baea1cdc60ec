"""Eigenvalues of curvature matrices: :func:`eigenvalues` (Lanczos, top-k and bottom-k with
residuals, per block)."""

from landscape.eigen.lanczos import DEFAULT_TOL, Eigenpairs, LanczosRun, eigenvalues, lanczos

__all__ = ["DEFAULT_TOL", "Eigenpairs", "LanczosRun", "eigenvalues", "lanczos"]
