"""The edge of stability: sharpness against the step size's stability threshold, and the
preconditioned sharpness of adaptive methods.

Cohen et al., "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability"
(ICLR 2021): full-batch gradient descent with step size η drives the sharpness ``λ_max(∇²f)`` up to
``2/η`` and then hovers there; with heavy-ball momentum β the threshold is ``(2 + 2β)/η`` (Nesterov:
``(2 + 2β)/((1 + 2β)η)``). Cohen et al., "Adaptive Gradient Methods at the Edge of Stability"
(2022): for a preconditioned method ``x ← x − η P⁻¹ m`` the quantity is the *preconditioned
sharpness* ``λ_max(P⁻¹∇²f)``, and for Adam, whose ``m`` is an EMA with β₁, the threshold is
``(2 + 2β₁)/((1 − β₁)η)``, 38/η at β₁ = 0.9.

:func:`preconditioned_sharpness` computes ``λ_max(P^{-1/2} A P^{-1/2})`` (the same eigenvalues as
``P⁻¹A``) by Lanczos; :func:`adam_preconditioner` reads ``P`` from a ``torch.optim.Adam``/``AdamW``
state, :meth:`landscape.optim.PseudoUpdates.preconditioner` from an Adam-family recipe;
:func:`stability_threshold` gives the threshold of a recorded optimizer and learning rate, which
:func:`landscape.curvature_plots.edge_of_stability` draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from landscape.eigen.lanczos import DEFAULT_TOL, Eigenpairs, eigenvalues
from landscape.linops import PreconditionedOperator, operator_of

__all__ = ["adam_preconditioner", "preconditioned_sharpness", "stability_multiplier", "stability_threshold"]


def stability_multiplier(optimizer: str, **hyper: Any) -> tuple[float, str] | None:
    """``(c, quantity)`` with the stability threshold ``c/η`` of the optimizer's sharpness quantity
    (``"sharpness"`` = λ_max(H), ``"preconditioned"`` = λ_max(P⁻¹H)), or ``None`` when no threshold is
    known (Adagrad, Lion, ...).

    Args:
        optimizer: a ``torch.optim`` class name (``"SGD"``, ``"Adam"``, ``"AdamW"``, ...; case-insensitive)
            or ``"gd"``, ``"heavy_ball"``, ``"nesterov"``, ``"adam"``.
        hyper: its hyperparameters as recorded: ``momentum``, ``dampening``, ``nesterov`` (SGD),
            ``betas`` or ``beta1`` (Adam).
    """
    name = optimizer.lower()
    if name in ("gd", "sgd", "heavy_ball", "nesterov"):
        beta = float(hyper.get("momentum", hyper.get("beta", 0.0)) or 0.0)
        damp = float(hyper.get("dampening", 0.0) or 0.0)
        nesterov = bool(hyper.get("nesterov", name == "nesterov"))
        if beta == 0.0:
            return 2.0, "sharpness"
        # torch.optim.SGD: b ← βb + (1 − τ)g, x ← x − ηb: heavy ball with step η(1 − τ)
        c = (2 + 2 * beta) / (1 + 2 * beta) if nesterov else 2 + 2 * beta
        return c / (1.0 - damp), "sharpness"
    if name in ("adam", "adamw", "nadam", "radam"):
        betas = hyper.get("betas")
        beta1 = float(betas[0]) if betas is not None else float(hyper.get("beta1", 0.9))
        if not 0 <= beta1 < 1:
            return None
        return (2 + 2 * beta1) / (1 - beta1), "preconditioned"
    return None


def stability_threshold(lr: float, optimizer: str = "gd", **hyper: Any) -> float:
    """The stability threshold ``c/η`` (see :func:`stability_multiplier`): ``2/η`` for gradient descent,
    ``(2+2β)/η`` with heavy-ball momentum β, ``(2+2β₁)/((1−β₁)η)`` = 38/η for Adam with β₁ = 0.9.

    Raises:
        ValueError: a non-positive learning rate, or an optimizer without a known threshold.
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be positive and finite, got {lr!r}")
    m = stability_multiplier(optimizer, **hyper)
    if m is None:
        raise ValueError(f"no stability threshold is known for optimizer {optimizer!r}")
    return m[0] / lr


def adam_preconditioner(optimizer: torch.optim.Optimizer, model: nn.Module, *,
                        bias_correction: bool = True) -> dict[str, Tensor]:
    """``P = (1 − β₁ᵗ)(√(v/(1 − β₂ᵗ)) + ε)`` of every parameter of ``model`` that a
    ``torch.optim.Adam``/``AdamW`` optimizer has stepped, keyed by name (Cohen et al. 2022, §2).

    Raises:
        TypeError: not an Adam-family optimizer. ValueError: a parameter without state (never stepped).
    """
    if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        raise TypeError(f"adam_preconditioner needs torch.optim.Adam or AdamW, got {type(optimizer).__name__}")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out = {}
    for name, p in model.named_parameters():
        g = group_of.get(id(p))
        if g is None:
            continue
        st = optimizer.state.get(p, {})
        if "exp_avg_sq" not in st:
            raise ValueError(f"parameter {name!r} has no Adam state yet: step the optimizer first")
        if g.get("amsgrad") and "max_exp_avg_sq" in st:
            v = st["max_exp_avg_sq"]
        else:
            v = st["exp_avg_sq"]
        t = float(st["step"])
        b1, b2 = g["betas"]
        c1 = 1 - b1**t if bias_correction else 1.0
        c2 = 1 - b2**t if bias_correction else 1.0
        out[name] = ((v.detach() / c2).sqrt() + g["eps"]) * c1
    return out


def preconditioned_sharpness(
    source: Any,
    preconditioner: Mapping[str, Tensor],
    *,
    k: int = 1,
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
) -> Eigenpairs:
    """``λ_max(P⁻¹A)``, the preconditioned sharpness (Cohen et al. 2022), as the top eigenvalues of
    ``P^{-1/2} A P^{-1/2}`` by Lanczos, with residuals.

    Args:
        source: an :class:`~landscape.Objective` or a :class:`~landscape.linops.CurvatureOperator`.
        preconditioner: the diagonal of ``P`` keyed like the measured parameters (positive):
            :func:`adam_preconditioner` or :meth:`~landscape.optim.PseudoUpdates.preconditioner`.
        k: how many of the top eigenvalues.
        curvature: ``"hessian"`` or ``"ggn"``.
        at: the point (when ``source`` is an objective).
        tol, max_iter, seed: as :func:`~landscape.eigenvalues`.

    Returns:
        :class:`~landscape.eigen.Eigenpairs` of the preconditioned matrix (``top[0]`` is the sharpness).
    """
    with operator_of(source, curvature, at) as op:
        pre = PreconditionedOperator(op, preconditioner)
        out = eigenvalues(pre, k=k, tol=tol, max_iter=max_iter, seed=seed)
    assert isinstance(out, Eigenpairs)
    return out
