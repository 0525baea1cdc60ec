"""Curvature of the objective: Hessian-vector products, directional sharpness, eigenvalues, traces.

The central quantity is the *directional sharpness* of an update direction ``u`` (Pan & Li, "Toward
Understanding Why Adam Converges Faster Than SGD for Transformers", §3):

    S(u) = ûᵀ ∇²f(x) û,    û = u / ‖u‖₂,

computed without materialising the Hessian: by a second-order Taylor sweep along ``û`` through the
traced loss (:mod:`landscape.taylor`), or by Hessian-vector products. When ``S(u) < 0`` the seed
(Appendix B.3, Eq. 4) reports a δ-shifted value instead, with δ = 0.01: the Hessian is taken a
distance δ from ``x`` toward the step ``x − η·u``,

    S_δ(u) = ûᵀ ∇²f(x − δû) û.

The side matters. The second-order term of ``f(x_{t+1})`` involves ``∇²f(ξ)`` at some ``ξ`` between
``x_t`` and ``x_{t+1} = x_t − η·u`` (Pan & Li, App. B.3), and the paper's own code stores the update
with its sign (``x_{t+1} − x_t = −η·u``) and shifts by ``δ`` along it, i.e. to ``x − δû``. The other
side, ``x + δû``, is where the step does not go.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import tree
from landscape.eigen.lanczos import DEFAULT_TOL, eigenvalues
from landscape.linops import curvature_operator
from landscape.objective import Objective
from landscape.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "SHIFT_POLICIES",
    "Sharpness",
    "SharpnessMeter",
    "TraceEstimate",
    "directional_sharpness",
    "hessian_trace",
    "hvp",
    "loss_along",
    "sharpness_and_gradient",
    "top_eigenvalues",
]

SHIFT_POLICIES = ("never", "negative", "always")
Point = Mapping[str, Tensor] | None


@dataclass(frozen=True)
class Sharpness:
    """Directional sharpness of one update direction ``u`` (where a step moves ``x`` to ``x − η·u``).

    Attributes:
        value: the reported sharpness: ``raw``, or ``shifted_value`` when the shift was used.
        raw: ``ûᵀ ∇²f(x) û``.
        shifted: whether the δ-shifted value was reported.
        shifted_value: ``ûᵀ ∇²f(x − δû) û`` (the Hessian a distance δ toward the step) when it was
            computed (``None`` otherwise).
        grad_correlation: the gradient projection ``G = ∇f(x)ᵀ û`` (positive: ``x − η·u`` descends).
            A projection onto the unit direction, not a correlation coefficient; also available as
            :attr:`grad_projection`.
        update_norm: ``‖u‖₂``.
        best_step: the quadratic model's best step ``s* = G / S`` along ``−û`` (``None`` when ``S ≤ 0``).
        predicted_reduction: the quadratic model's loss reduction ``G² / (2S)`` at ``s*`` (``None``
            when ``S ≤ 0``).
        loss: ``f(x)``.
        delta: the shift δ (a distance, ≥ 0).
        mode: the objective's mode (``"eval"`` or ``"train"``).
    """

    value: float
    raw: float
    shifted: bool
    shifted_value: float | None
    grad_correlation: float
    update_norm: float
    best_step: float | None
    predicted_reduction: float | None
    loss: float
    delta: float
    mode: str

    @property
    def grad_projection(self) -> float:
        """``∇f(x)ᵀ û``, the gradient's projection onto the unit direction (= :attr:`grad_correlation`)."""
        return self.grad_correlation

    def as_dict(self) -> dict:
        return asdict(self)


def hvp(objective: Objective, v: Mapping[str, Tensor], at: Point = None) -> dict[str, Tensor]:
    """Hessian-vector product ``∇²f(at)·v`` (``at`` defaults to the model's current parameters)."""
    return objective.hvp(v, at)


def _unit(objective: Objective, name: str, u: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """``(û, ‖u‖₂)`` for the measured parameters; raises as :func:`_checked` does."""
    sub, n = _checked(objective, name, u)
    return tree.scale(sub, 1.0 / n), n


def _checked(objective: Objective, name: str, u: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], float]:
    """``(u restricted to the measured parameters, ‖u‖₂)``. Raises KeyError for a missing parameter,
    ValueError for non-finite entries or a norm of 0."""
    missing = [n for n in objective.names if n not in u]
    if missing:
        raise KeyError(f"direction {name!r} lacks measured parameters {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    sub = {n: u[n] for n in objective.names}
    bad = tree.nonfinite_names(sub)
    if bad:
        raise ValueError(f"direction {name!r} has non-finite entries in {bad[:5]}")
    n = float(tree.norm(sub))
    if not math.isfinite(n) or n == 0.0:
        raise ValueError(f"direction {name!r}: cannot normalise a direction with norm {n}: it must be finite and non-zero")
    return sub, n


def _rescale(firsts: Sequence[float], seconds: Sequence[float], norms: Sequence[float]) -> tuple[list[float], list[float]]:
    """The derivatives along u turned into those along û = u/‖u‖: ∇f·u/‖u‖ and uᵀAu/‖u‖²."""
    return [float(f) / n for f, n in zip(firsts, norms)], [float(v) / (n * n) for v, n in zip(seconds, norms)]


def directional_sharpness(
    objective: Objective,
    directions: Mapping[str, Mapping[str, Tensor]],
    *,
    at: Point = None,
    shift: str = "negative",
    delta: float = 0.01,
    method: str = "auto",
    curvature: str = "hessian",
) -> dict[str, Sharpness]:
    """Directional sharpness ``ûᵀ∇²f(x)û`` of K named directions, measured together.

    Only the scalars ``ûᵀ∇²f(x)û`` and ``∇f(x)ᵀû`` are needed, so by default (``method="auto"``) they
    come from a second-order Taylor sweep through the traced loss (:mod:`landscape.taylor`): the
    forward values at ``x`` are computed once and each direction costs about 4/3 of a forward+backward
    on matmul-heavy models. ``method="hvp"`` uses Hessian-vector products instead (one ``create_graph``
    gradient, then one double-backward pass per direction through the retained graph, about 2× or
    more per direction); ``"auto"`` falls back to it when the traced loss uses an operator the sweep
    has no rule for. Both give the same numbers up to rounding (the tests check both against dense
    Hessians). A shifted value needs a fresh evaluation at ``x − δû`` (one per shifted direction).

    Args:
        objective: the function being measured.
        directions: ``{name: u}``; each ``u`` is keyed like ``objective.names`` (extra keys are ignored,
            so a pseudo-update covering more parameters can be restricted with ``include=``). Only the
            direction matters: each is normalised to ``û = u/‖u‖₂``.
        at: the parameter point (default: the model's current parameters).
        shift: ``"never"``, ``"negative"`` (the seed's rule: use ``ûᵀ∇²f(x − δû)û`` when the plain
            value is negative) or ``"always"`` (compute both, report the shifted one).
        delta: δ of the shift, a distance ≥ 0 in parameter space (seed 002, Appendix B.3, Eq. 4:
            0.01). The shifted point is ``x − δû``, on the side the step ``x − η·u`` moves to.
        method: ``"auto"``, ``"taylor"`` or ``"hvp"`` (see above).
        curvature: ``"hessian"`` (default) or ``"ggn"``: ``ûᵀGû`` of the Gauss–Newton matrix
            ``G = Jᵀ H_ℓ J`` (:mod:`landscape.linops.ggn`, computed as ``(Jû)ᵀ H_ℓ (Jû)``; ``method``
            is then ignored). The shifted value uses the same matrix at ``x − δû``.

    Returns:
        ``{name: Sharpness}`` in the order given.
    """
    return _sharpness(objective, directions, at=at, shift=shift, delta=delta, method=method, need_grad=False,
                      curvature=curvature)[0]


def sharpness_and_gradient(
    objective: Objective,
    directions: Mapping[str, Mapping[str, Tensor]],
    *,
    at: Point = None,
    shift: str = "negative",
    delta: float = 0.01,
    method: str = "auto",
    curvature: str = "hessian",
) -> tuple[dict[str, Sharpness], float, dict[str, Tensor]]:
    """:func:`directional_sharpness`, also returning the loss and the gradient at ``at`` (computed on the
    way by the HVP method, with one forward+backward by the Taylor method)."""
    out, loss, grad = _sharpness(objective, directions, at=at, shift=shift, delta=delta, method=method, need_grad=True,
                                 curvature=curvature)
    assert grad is not None
    return out, loss, grad


def _sharpness(
    objective: Objective,
    directions: Mapping[str, Mapping[str, Tensor]],
    *,
    at: Point,
    shift: str,
    delta: float,
    method: str,
    need_grad: bool,
    curvature: str = "hessian",
) -> tuple[dict[str, Sharpness], float, dict[str, Tensor] | None]:
    if not directions:
        if shift not in SHIFT_POLICIES:
            raise ValueError(f"shift must be one of {SHIFT_POLICIES}, got {shift!r}")
        _check_delta(delta)
        if method not in ("auto", "taylor", "hvp"):
            raise ValueError(f"method must be 'auto', 'taylor' or 'hvp', got {method!r}")
        if need_grad:
            loss, grad = objective.loss_and_grad(at)
            return {}, loss, grad
        return {}, objective.loss(at), None
    with SharpnessMeter(objective, at=at, shift=shift, delta=delta, method=method, curvature=curvature,
                        need_grad=need_grad) as meter:
        out = meter.measure(directions, stacklevel=5)
        return out, meter.loss, meter.grad


class SharpnessMeter:
    """Directional sharpness at one point, for directions given a chunk at a time.

    What :func:`sharpness_and_gradient` computes, with the work that does not depend on the
    directions done once: the engine is chosen once, the gradient at ``at`` is computed once (on the
    first :meth:`measure`), the Taylor sweep's primal values (one micro-batch) or the retained
    ``create_graph`` gradient are kept until :meth:`close`. A measurement that holds only a few
    directions at once (``MeasureSettings.chunk``) measures them with the same numbers as all at once.

    Args: as :func:`sharpness_and_gradient`; ``need_grad``: compute ``∇f(at)`` (:attr:`grad`).
    """

    def __init__(self, objective: Objective, *, at: Point = None, shift: str = "negative", delta: float = 0.01,
                 method: str = "auto", curvature: str = "hessian", need_grad: bool = True) -> None:
        if shift not in SHIFT_POLICIES:
            raise ValueError(f"shift must be one of {SHIFT_POLICIES}, got {shift!r}")
        _check_delta(delta)
        if method not in ("auto", "taylor", "hvp"):
            raise ValueError(f"method must be 'auto', 'taylor' or 'hvp', got {method!r}")
        self.objective = objective
        self.at = at
        self.shift = shift
        self.delta = delta
        self.method = method
        self.curvature = curvature
        self.need_grad = need_grad
        self.point = objective._point(at)
        self.loss: float | None = None
        self.grad: dict[str, Tensor] | None = None
        self.used: str | None = None
        self._operator: Any = None  # product engine (linops), kept open
        self._session: Any = None  # Taylor / HVP session (objective.DirectionalDerivatives)
        self._product = curvature != "hessian" or method == "hvp" or (
            method == "auto" and objective.taylor_support(at) is not None)

    def ensure_grad(self) -> tuple[float, dict[str, Tensor]]:
        """``(f(at), ∇f(at))`` (computed once)."""
        if self.grad is None:
            if self._product:
                loss, self.grad = self._open_operator().loss_and_grad()
            else:
                loss, self.grad = self.objective.loss_and_grad(self.at)
            if self.loss is None:
                self.loss = loss
        assert self.loss is not None
        return self.loss, self.grad

    def _open_operator(self) -> Any:
        if self._operator is None:
            self._operator = curvature_operator(self.objective, self.curvature, self.at)
        return self._operator

    def measure(self, directions: Mapping[str, Mapping[str, Tensor]], stacklevel: int = 2) -> dict[str, Sharpness]:
        """``{name: Sharpness}`` of the directions (in the order given)."""
        from landscape.objective import DirectionalDerivatives

        objective = self.objective
        names = list(directions)
        # The directions as given (no normalised copies: memory), the derivatives rescaled by ‖u‖ and ‖u‖²
        units: list[dict[str, Tensor]] = []
        norms: list[float] = []
        for name in names:
            u, n = _checked(objective, name, directions[name])
            units.append(u)
            norms.append(n)
        if not units:
            return {}
        if self._product:
            # A product engine (landscape.linops: the Hessian by double backward, or the Gauss–Newton
            # matrix); the gradient comes on the way.
            engine = self._open_operator()
            loss, g_corrs, raws = engine.directional_derivatives(units)
            g_corrs, raws = _rescale(g_corrs, raws, norms)
            if self.loss is None:
                self.loss = loss
            if self.need_grad:
                self.ensure_grad()
            used = "hvp" if self.curvature == "hessian" else self.curvature
        else:
            if self._session is None:
                self._session = DirectionalDerivatives(objective, self.at, self.method)
            loss, g_corrs, raws, used = self._session(units, stacklevel=stacklevel + 1)
            g_corrs, raws = _rescale(g_corrs, raws, norms)
            if self.loss is None:
                self.loss = loss
            if self.need_grad:
                grad = self.ensure_grad()[1]
                if used == "taylor":
                    # Free cross-check of the two engines: the sweep's ∇f·û against autograd's gradient.
                    reason = _first_order_mismatch(grad, units, g_corrs, norms)
                    if reason is not None:
                        if self.method == "taylor":
                            from landscape.taylor import UnsupportedGraph

                            raise UnsupportedGraph(reason)
                        warnings.warn(f"landscape: {reason}; using Hessian-vector products from now on",
                                      RuntimeWarning, stacklevel=stacklevel)
                        objective._disable_taylor(reason)
                        self._session.close()
                        self._session = None
                        self.method = "hvp"
                        self._product = True
                        return self.measure(directions, stacklevel=stacklevel + 1)
        self.used = used
        point = self.point
        out: dict[str, Sharpness] = {}
        for i, name in enumerate(names):
            raw = float(raws[i])
            g_corr = float(g_corrs[i])
            shifted_value = None
            if self.shift == "always" or (self.shift == "negative" and raw < 0):
                # Toward the step x − η·u (seed 002 App. B.3): x − δû.
                shifted_at = tree.axpy(-self.delta / norms[i], {n: units[i][n].to(point[n].dtype) for n in objective.names},
                                       point)
                if self.curvature != "hessian":
                    with curvature_operator(objective, self.curvature, shifted_at) as op:
                        shifted_value = float(op.quadratic_forms([units[i]])[0]) / norms[i] ** 2
                else:
                    from landscape.objective import DirectionalDerivatives

                    # the recording was checked against the model at x moments ago (the sweep above)
                    with DirectionalDerivatives(objective, shifted_at, used, _trusted=used == "taylor") as shifted:
                        _, _, (shifted_value,), _ = shifted([units[i]], stacklevel=stacklevel + 1)
                    shifted_value = float(shifted_value) / norms[i] ** 2
                del shifted_at
            use_shift = shifted_value is not None
            value = shifted_value if use_shift else raw
            best = pred = None
            if value > 0:
                best = g_corr / value
                pred = g_corr * g_corr / (2 * value)
            out[name] = Sharpness(
                value=value,
                raw=raw,
                shifted=use_shift,
                shifted_value=shifted_value,
                grad_correlation=g_corr,
                update_norm=norms[i],
                best_step=best,
                predicted_reduction=pred,
                loss=loss,
                delta=self.delta,
                mode=objective.mode,
            )
        return out

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None
        if self._operator is not None:
            self._operator.close()
            self._operator = None

    def __enter__(self) -> SharpnessMeter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _check_delta(delta: float) -> None:
    """δ is a distance: finite and ≥ 0 (the side of the shift is fixed: toward the step)."""
    if isinstance(delta, bool) or not isinstance(delta, (int, float)):
        raise TypeError(f"delta must be a number (a distance >= 0), got {type(delta).__name__}")
    if not (math.isfinite(delta) and delta >= 0):
        raise ValueError(
            f"delta must be a finite distance >= 0, got {delta!r}: the shifted sharpness is taken at x − δû, "
            "toward the step, whatever the sign"
        )


def _first_order_mismatch(grad: dict[str, Tensor], units: list[dict[str, Tensor]], g_corrs: list[float],
                          norms: list[float] | None = None) -> str | None:
    """Why the Taylor sweep's ∇f·û disagrees with autograd's gradient (``None`` when it agrees to the
    rounding of the parameters' dtype, relative to ‖∇f‖). ``units[i] / norms[i]`` is û (norms: 1)."""
    dtype = next(iter(grad.values())).dtype
    tol = max(1e-4, 100 * torch.finfo(dtype).eps) * float(tree.norm(grad)) + 1e-12
    for i, u in enumerate(units):
        ref = float(tree.dot(grad, u)) / (norms[i] if norms is not None else 1.0)
        if not abs(ref - g_corrs[i]) <= tol:
            return (
                f"the Taylor sweep's gradient projection ({g_corrs[i]!r}) disagrees with autograd's ({ref!r}): the "
                "recorded loss no longer matches the model's derivatives (a flag that changes what is detached?)"
            )
    return None


def loss_along(
    objective: Objective, direction: Mapping[str, Tensor], steps: Sequence[float] | np.ndarray, *, at: Point = None
) -> np.ndarray:
    """The landscape line ``ℓ(s) = f(x − s·û)`` for each ``s`` in ``steps``, ``û = u/‖u‖₂``.

    The step is normalised by the update's ℓ2 norm as in seed 002, Figures 2–4: ``s`` is the distance
    travelled in parameter space. Forward passes only.
    """
    uhat, _ = _unit(objective, "direction", direction)
    return objective.losses_along(uhat, np.asarray(steps, dtype=np.float64), at)


def top_eigenvalues(
    objective: Objective,
    k: int = 1,
    *,
    at: Point = None,
    tol: float = DEFAULT_TOL,
    maxiter: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    curvature: str = "hessian",
) -> np.ndarray | tuple[np.ndarray, list[dict[str, Tensor]]]:
    """The ``k`` largest (algebraic, signed) Hessian eigenvalues, by Lanczos.

    A shorthand for :func:`landscape.eigenvalues` (which also gives the most negative eigenvalues,
    residuals, and per-block spectra): every product reuses one retained ``create_graph`` gradient.

    Args:
        objective: the function.
        k: how many eigenvalues.
        at: the point (default: current parameters).
        tol: stop when every residual ``‖Hv − λv‖ ≤ tol·‖H‖`` (default 1e-4).
        maxiter: at most this many Lanczos steps (default ``max(100, 10k)``).
        seed: seeds the starting vector.
        return_vectors: also return the eigenvectors as parameter dicts.
        curvature: ``"hessian"`` or ``"ggn"``.

    Returns:
        Eigenvalues in descending order (and eigenvectors if asked for).
    """
    res = eigenvalues(objective, k=k, curvature=curvature, at=at, tol=tol, max_iter=maxiter, seed=seed,
                      return_vectors=return_vectors)
    if not return_vectors:
        return res.top
    return res.top, list(res.top_vectors or [])


def hessian_trace(
    objective: Objective,
    n: int = 32,
    *,
    at: Point = None,
    seed: int = 0,
    batch: int = 8,
    progress: Callable[[int, int], None] | None = None,
    curvature: str = "hessian",
) -> TraceEstimate:
    """Hutchinson's estimator ``tr H ≈ mean zᵀHz`` over ``n`` Rademacher vectors ``z`` (a shorthand for
    :func:`landscape.hutchinson_trace`; see :func:`landscape.hutchpp_trace` for Hutch++).

    Args:
        objective: the function.
        n: number of probe vectors.
        at: the point (default: current parameters).
        seed: seeds the probe vectors.
        batch: probes per operator call.
        progress: optional ``progress(done, total)`` callback.
        curvature: ``"hessian"`` or ``"ggn"``.
    """
    return hutchinson_trace(objective, n, curvature=curvature, at=at, seed=seed, batch=batch, progress=progress)
