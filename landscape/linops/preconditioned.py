"""A diagonally preconditioned curvature matrix ``P^{-1/2} A P^{-1/2}``.

Its eigenvalues are those of ``P⁻¹A``: the *preconditioned sharpness* ``λ_max(P⁻¹H)`` of Cohen et al.,
"Adaptive Gradient Methods at the Edge of Stability" (2022, §3), whose stability threshold for Adam
is ``(2 + 2β₁) / ((1 − β₁) η)`` = 38/η at β₁ = 0.9 (see :mod:`landscape.stability`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from landscape.linops._base import CurvatureOperator

__all__ = ["PreconditionedOperator"]


class PreconditionedOperator(CurvatureOperator):
    """``P^{-1/2} A P^{-1/2}`` for a positive diagonal ``P`` and any curvature operator ``A``.

    Args:
        base: the operator ``A`` (its session, point and product count are shared).
        diag: the diagonal of ``P``, keyed like ``base.names``, every entry positive and finite.

    Raises:
        KeyError / ValueError: a missing, misshapen, non-positive or non-finite entry.
    """

    def __init__(self, base: CurvatureOperator, diag: Mapping[str, Tensor]) -> None:
        self.base = base
        self.objective = base.objective
        self.point = base.point
        self.names = base.names
        self.n_products = 0
        self._closed = False
        self.curvature = f"preconditioned {base.curvature}"
        inv_sqrt = {}
        for n in self.names:
            if n not in diag:
                raise KeyError(f"preconditioner lacks parameter {n!r}")
            d = diag[n].detach()
            if d.shape != self.point[n].shape:
                raise ValueError(f"preconditioner[{n!r}] has shape {tuple(d.shape)}, the parameter's is "
                                 f"{tuple(self.point[n].shape)}")
            if not bool(torch.isfinite(d).all()) or not bool((d > 0).all()):
                raise ValueError(f"preconditioner[{n!r}] must be positive and finite (add ε to √v̂)")
            inv_sqrt[n] = d.to(dtype=self.point[n].dtype, device=self.point[n].device).rsqrt()
        self.inv_sqrt = inv_sqrt

    def _products(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[dict[str, Tensor]]:
        scaled = [{n: v[n] * self.inv_sqrt[n] for n in names} for v in vs]
        out = self.base.matvecs(scaled, names)
        return [{n: av[n] * self.inv_sqrt[n] for n in names} for av in out]

    def _quadratic_forms(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[float]:
        return self.base.quadratic_forms([{n: v[n] * self.inv_sqrt[n] for n in names} for v in vs], names)

    def loss_and_grad(self) -> tuple[float, dict[str, Tensor]]:
        return self.base.loss_and_grad()  # type: ignore[attr-defined]

    def _release(self) -> None:
        """The base operator keeps its own session: close it (or use it as a context manager)."""
