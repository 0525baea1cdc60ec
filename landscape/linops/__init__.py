"""Curvature matrices as operators: one module per product, one registry to pick one by name.

========================  ===========================================  ============================
name                      matrix                                       module
========================  ===========================================  ============================
``"hessian"``             ``∇²f(x)``                                   :mod:`landscape.linops.hessian`
``"ggn"``                 ``Jᵀ H_ℓ J`` (generalized Gauss–Newton)      :mod:`landscape.linops.ggn`
========================  ===========================================  ============================

Every estimator (:func:`landscape.eigenvalues`, :func:`landscape.hutchinson_trace`,
:func:`landscape.hutchpp_trace`, :func:`landscape.spectral_density`,
:func:`landscape.robust_smoothness`, :func:`landscape.sharpness_by_layer`,
:func:`landscape.directional_sharpness`) takes ``curvature=`` one of these names, or an operator
built here. A new product (a Fisher matrix, say) is one new module with a
:class:`CurvatureOperator` subclass and one line in :data:`CURVATURES`.

Engines of directional sharpness share one small interface, :class:`SecondOrderEngine`: bound to an
objective and a point, ``directional_derivatives(vs) -> (f(x), [∇f·vᵢ], [vᵢᵀAvᵢ])``. Every operator
here implements it (the Hessian's is the HVP engine behind ``Objective.second_order``,
``Objective.hvp(s)`` and ``method="hvp"``); the Taylor sweep (:mod:`landscape.taylor`) computes the same
for the Hessian without products, and is chosen by ``Objective.directional_derivatives`` with
``method="auto"`` (its selection and fallback still live there; it can move behind the same interface).

Example:
    >>> import torch, landscape as ls
    >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    >>> b = (torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 2, (16,)))
    >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), b)
    >>> with ls.curvature_operator(obj, "ggn") as G:
    ...     res = ls.eigenvalues(G, k=1, bottom=1)
    >>> bool(res.bottom[0] > -1e-12)      # a Gauss–Newton matrix of a convex loss is PSD
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from landscape.linops._base import Blocks, CurvatureOperator, FlatView, SecondOrderEngine, group_names
from landscape.linops.ggn import GGNOperator
from landscape.linops.hessian import HessianOperator, SavedBytes
from landscape.linops.preconditioned import PreconditionedOperator

__all__ = [
    "CURVATURES",
    "Blocks",
    "CurvatureOperator",
    "FlatView",
    "GGNOperator",
    "HessianOperator",
    "PreconditionedOperator",
    "SavedBytes",
    "SecondOrderEngine",
    "curvature_operator",
    "group_names",
    "operator_of",
]

#: The curvature products by name.
CURVATURES: dict[str, type[CurvatureOperator]] = {"hessian": HessianOperator, "ggn": GGNOperator}


def curvature_operator(objective: Any, curvature: str = "hessian", at: Mapping[str, Tensor] | None = None,
                       **options: Any) -> CurvatureOperator:
    """Build the operator named ``curvature`` (a key of :data:`CURVATURES`) of ``objective`` at ``at``.

    ``options`` go to its constructor (``graph=``, ``output=`` and ``jvp=`` for ``"ggn"``...).
    """
    try:
        cls = CURVATURES[curvature]
    except KeyError:
        raise ValueError(f"curvature must be one of {', '.join(map(repr, CURVATURES))}, got {curvature!r}") from None
    return cls(objective, at, **options)


class _Borrowed:
    """Context manager giving an operator: the one passed in (left open), or one built and closed."""

    def __init__(self, source: Any, curvature: str, at: Mapping[str, Tensor] | None, options: dict[str, Any]):
        self.source, self.curvature, self.at, self.options = source, curvature, at, options
        self.op: CurvatureOperator | None = None
        self.owned = False

    def __enter__(self) -> CurvatureOperator:
        if isinstance(self.source, CurvatureOperator):
            if self.at is not None:
                raise ValueError("at= is given by the operator itself; build it at the point you want")
            self.op = self.source
        else:
            self.op = curvature_operator(self.source, self.curvature, self.at, **self.options)
            self.owned = True
        return self.op

    def __exit__(self, *exc: Any) -> None:
        if self.owned and self.op is not None:
            self.op.close()


def operator_of(source: Any, curvature: str = "hessian", at: Mapping[str, Tensor] | None = None,
                **options: Any) -> _Borrowed:
    """``with operator_of(objective_or_operator, curvature, at) as op:`` — the estimators' way to take
    either an :class:`~landscape.Objective` (an operator is built, and closed at the end) or an
    operator (used as is: its retained graph serves several estimators)."""
    return _Borrowed(source, curvature, at, options)
