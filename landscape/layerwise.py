"""Where the sharpness of a direction lives: its exact per-layer decomposition.

For a unit direction ``û`` split into blocks ``û = (û_1, ..., û_L)`` (layers, or any grouping of the
parameters), one product ``Aû`` gives

    ûᵀ A û = Σ_b û_bᵀ (A û)_b,

each term the part of the directional sharpness that lands on block ``b``: its own curvature
``û_bᵀ A_bb û_b`` plus half of its couplings with the other blocks, ``Σ_{c≠b} û_bᵀ A_bc û_c``
(counted once in each of the two blocks, so the terms add up exactly). Asking for
``diagonal=True`` separates the two, one more (block) product per block. ``mass`` is ``‖û_b‖²``,
how much of the direction sits in the block (summing to one).

This shows *which layers* make SGD's direction sharp and Adam's flat (Pan & Li 2023's question), rather
than only that they differ.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from landscape import tree
from landscape.linops import Blocks, group_names, operator_of

__all__ = ["LayerSharpness", "sharpness_by_layer"]


@dataclass(frozen=True)
class LayerSharpness:
    """The decomposition of one direction's sharpness ``ûᵀAû`` over blocks.

    Attributes:
        total: ``ûᵀ A û``.
        contributions: ``{block: û_bᵀ (A û)_b}``, summing to ``total``.
        mass: ``{block: ‖û_b‖²}``, summing to one.
        diagonal: ``{block: û_bᵀ A_bb û_b}`` when asked for (else ``None``).
        curvature: the matrix (``"hessian"``, ``"ggn"``).
    """

    total: float
    contributions: dict[str, float]
    mass: dict[str, float]
    diagonal: dict[str, float] | None
    curvature: str

    @property
    def coupling(self) -> dict[str, float] | None:
        """``contribution − diagonal`` per block: its share of the cross-block terms."""
        if self.diagonal is None:
            return None
        return {b: self.contributions[b] - self.diagonal[b] for b in self.contributions}


def sharpness_by_layer(
    source: Any,
    directions: Mapping[str, Mapping[str, Tensor]],
    *,
    by: Blocks = "layer",
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    diagonal: bool = False,
) -> dict[str, LayerSharpness]:
    """The exact per-block decomposition ``ûᵀAû = Σ_b û_bᵀ(Aû)_b`` of each named direction.

    Args:
        source: an :class:`~landscape.Objective` or a :class:`~landscape.linops.CurvatureOperator`.
        directions: ``{name: u}`` keyed like the measured parameters (normalised here to ``û = u/‖u‖``).
        by: the blocks (:func:`~landscape.linops.group_names`: ``"layer"``, ``"tensor"``, a mapping
            covering every measured parameter once, or a function ``name -> block``).
        curvature: ``"hessian"`` or ``"ggn"`` (when ``source`` is an objective).
        at: the point (when ``source`` is an objective).
        diagonal: also compute ``û_bᵀ A_bb û_b`` (one block product per block and direction).

    Returns:
        ``{name: LayerSharpness}``. Cost: one product per direction (plus one per block with ``diagonal``).

    Raises:
        ValueError: blocks that do not cover every measured parameter; a zero or non-finite direction.
    """
    with operator_of(source, curvature, at) as op:
        blocks = group_names(op.names, by)
        covered = [n for names in blocks.values() for n in names]
        if sorted(covered) != sorted(op.names):
            missing = [n for n in op.names if n not in covered]
            raise ValueError(f"the blocks must cover every measured parameter exactly once; missing {missing[:5]}")
        out: dict[str, LayerSharpness] = {}
        for name, u in directions.items():
            missing = [n for n in op.names if n not in u]
            if missing:
                raise KeyError(f"direction {name!r} lacks measured parameters {missing[:5]}")
            sub = {n: u[n] for n in op.names}
            bad = tree.nonfinite_names(sub)
            if bad:
                raise ValueError(f"direction {name!r} has non-finite entries in {bad[:5]}")
            try:
                uhat, _ = tree.normalize(sub)
            except ValueError as e:
                raise ValueError(f"direction {name!r}: {e}") from None
            au = op.matvec(uhat)
            uhat = {n: uhat[n].to(au[n].dtype) for n in op.names}
            contributions = {b: float(tree.dot({n: uhat[n] for n in names}, {n: au[n] for n in names}))
                             for b, names in blocks.items()}
            mass = {b: float(tree.dot({n: uhat[n] for n in names}, {n: uhat[n] for n in names}))
                    for b, names in blocks.items()}
            diag = None
            if diagonal:
                diag = {b: op.quadratic_forms([{n: uhat[n] for n in names}], names)[0] for b, names in blocks.items()}
            out[name] = LayerSharpness(total=float(tree.dot(uhat, au)), contributions=contributions, mass=mass,
                                       diagonal=diag, curvature=op.curvature)
    return out
