"""Extreme eigenvalues of a curvature matrix by the Lanczos method (Lanczos 1950; Golub & Van Loan,
*Matrix Computations*, §10.1), top-k and bottom-k from one Krylov space, with residuals.

From a random unit vector q₁ the three-term recurrence ``A qⱼ = βⱼ₋₁ qⱼ₋₁ + αⱼ qⱼ + βⱼ qⱼ₊₁`` builds an
orthonormal basis ``Q_m`` of the Krylov space and the tridiagonal ``T_m = Q_mᵀ A Q_m``, one product per
step. An eigenpair ``(θ, s)`` of ``T_m`` gives the Ritz pair ``(θ, y = Q_m s)`` with residual

    ‖A y − θ y‖₂ = β_m |s_m|,

read off for free at every step. Each Ritz value lies within its residual of an eigenvalue of ``A``
(for a symmetric matrix), so stopping when ``‖A y − θ y‖ ≤ tol·‖A‖`` bounds the eigenvalue error by
``tol·‖A‖`` (and, for an eigenvalue separated by a gap δ, by ``tol²‖A‖²/δ``: far smaller). The
largest and the most negative eigenvalues converge from the same basis, so one call gives both.

The basis is kept (full re-orthogonalisation, classical Gram–Schmidt with a second pass where the
first cancelled, against the loss of orthogonality that otherwise produces spurious copies of
converged eigenvalues): memory is ``(steps + 1) · d`` numbers in the parameters' dtype. For the top
eigenvalue alone of a large model it is not (three vectors), see :func:`eigenvalues`. When the Krylov space becomes invariant
(``β ≈ 0``: an exactly repeated or isolated eigenvalue) the recurrence restarts from a fresh random
vector orthogonal to the basis, so repeated eigenvalues are found with their multiplicity.

Unlike power iteration (PyHessian), which needs ``O(log(1/ε) / log(λ₁/λ₂))`` products, Lanczos
converges at the rate of a Chebyshev polynomial in ``sqrt(gap)``; ``benchmarks/curvature_cost.py``
compares the two in products and time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.linalg import eigh_tridiagonal
from torch import Tensor

from landscape.linops import Blocks, FlatView, group_names, operator_of

__all__ = ["DEFAULT_TOL", "Eigenpairs", "LanczosRun", "eigenvalues", "lanczos"]

#: Below this many coordinates the Lanczos basis is always kept (cheap); above it, only when more than
#: one eigenvalue (or an eigenvector) is asked for.
_SMALL = 200_000

#: Default relative residual: ``‖Av − λv‖ ≤ 1e-4·‖A‖``, four significant digits of the top
#: eigenvalue, more than the curves of Cohen et al. (2021, sharpness against 2/η) or Pan & Li 2023's
#: Table 8 (robust smoothness, three digits) print.
DEFAULT_TOL = 1e-4


@dataclass
class LanczosRun:
    """What a Lanczos run produced: the tridiagonal ``T`` (``alpha`` diagonal, ``beta`` off-diagonal,
    a zero where it restarted), the basis (when kept), the product count and the last ``β``."""

    alpha: list[float]
    beta: list[float]
    basis: Tensor | None
    n_products: int
    last_beta: float
    restarts: int = 0

    def ritz(self) -> tuple[np.ndarray, np.ndarray]:
        """Eigenvalues (ascending) and eigenvectors of ``T``."""
        a = np.asarray(self.alpha, dtype=np.float64)
        if a.size == 1:
            return a.copy(), np.ones((1, 1))
        return eigh_tridiagonal(a, np.asarray(self.beta[: a.size - 1], dtype=np.float64))


_BLOCK = 4096


def _dots(q: Tensor, w: Tensor) -> Tensor:
    """``q @ w`` (``q`` of shape (m, d)) accumulated in float64: float32 partial sums over blocks of
    4,096 coordinates, then a float64 sum over the blocks. A float32 BLAS dot over the millions of
    coordinates of a network accumulates an error of order √d·ε ≈ 3e-4 at d = 2e7, enough to move a
    Ritz value by as much (measured on all-MiniLM-L6-v2); this keeps it at √4096·ε plus float64's."""
    if q.dtype == torch.float64:
        return q @ w
    m, d = q.shape
    nb = d // _BLOCK
    head = nb * _BLOCK
    out = torch.zeros(m, dtype=torch.float64, device=q.device)
    if nb:
        part = torch.matmul(q[:, :head].reshape(m, nb, _BLOCK).transpose(0, 1), w[:head].reshape(nb, _BLOCK, 1))
        out += part.reshape(nb, m).sum(0, dtype=torch.float64)
    if head < d:
        out += (q[:, head:] @ w[head:]).double()
    return out


def _dot(a: Tensor, b: Tensor) -> float:
    """``aᵀb`` accumulated in float64 (see :func:`_dots`)."""
    return float(_dots(a.reshape(1, -1), b)[0])


class _Basis:
    """Lanczos vectors in one growing buffer (capacity doubled when full)."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, cap: int) -> None:
        self.buf = torch.empty((max(cap, 1), n), dtype=dtype, device=device)
        self.m = 0

    def append(self, q: Tensor) -> Tensor:
        """Store ``q``; returns the stored row (a view: use it in place of ``q``)."""
        if self.m == self.buf.shape[0]:
            new = torch.empty((2 * self.m, self.buf.shape[1]), dtype=self.buf.dtype, device=self.buf.device)
            new[: self.m] = self.buf
            self.buf = new
        self.buf[self.m] = q
        self.m += 1
        return self.buf[self.m - 1]

    @property
    def q(self) -> Tensor:
        return self.buf[: self.m]

    def orthogonalize_(self, w: Tensor) -> Tensor:
        """``w ← (I − QQᵀ) w`` in place (one classical Gram–Schmidt pass: two passes over the basis;
        the projections Qᵀw accumulated in float64, see :func:`_dots`)."""
        q = self.q
        w.addmv_(q.T, _dots(q, w).to(q.dtype), alpha=-1.0)
        return w


def lanczos(
    matvec: Callable[[Tensor], Tensor],
    n: int,
    *,
    steps: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    v0: Tensor | None = None,
    generator: torch.Generator | None = None,
    reorthogonalize: bool = True,
    restart: bool = True,
    converged: Callable[[LanczosRun], bool] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LanczosRun:
    """Run up to ``steps`` Lanczos steps on the symmetric ``matvec`` (flat vectors of length ``n``).

    Args:
        matvec: ``x ↦ A x``.
        n: the dimension.
        steps: at most this many products.
        dtype, device: of the vectors.
        v0: the start vector (normalised here); default a Gaussian one from ``generator``.
        generator: draws the start vector and restart vectors.
        reorthogonalize: keep the basis and re-orthogonalise every new vector against it (needed for
            restarts and eigenvectors; without it memory is three vectors).
        restart: on an invariant subspace (``β ≈ 0``) continue from a fresh vector orthogonal to the
            basis (eigenvalues); ``False`` stops there (quadrature: the Krylov space of the start
            vector is exhausted and its Gauss rule is exact).
        converged: ``converged(run) -> bool`` checked after every step (stop early when true).
        progress: ``progress(step, steps)``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    draw_dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float64

    def draw() -> Tensor:
        return torch.randn(n, generator=gen, dtype=draw_dtype).to(dtype=dtype, device=device)

    q = (v0.to(dtype=dtype, device=device) if v0 is not None else draw()).clone()
    q.div_(math.sqrt(_dot(q, q)))
    basis = _Basis(n, dtype, torch.device(device), min(steps, 32) + 1) if reorthogonalize else None
    if basis is not None:
        q = basis.append(q)
    run = LanczosRun([], [], None, 0, math.inf)
    prev: Tensor | None = None
    prev_beta = 0.0
    scale = 0.0
    for j in range(steps):
        w = matvec(q)
        if w.data_ptr() in (q.data_ptr(), prev.data_ptr() if prev is not None else -1):
            w = w.clone()  # the updates below are in place
        run.n_products += 1
        a = _dot(w, q)
        run.alpha.append(a)
        w.add_(q, alpha=-a)  # the three-term recurrence ...
        if prev is not None and prev_beta:
            w.add_(prev, alpha=-prev_beta)
        b = math.sqrt(_dot(w, w))
        if basis is not None:  # ... then full re-orthogonalisation, a second pass when it cancelled
            for _ in range(2):  # (Daniel, Gragg, Kaufman & Stewart 1976)
                before = b
                basis.orthogonalize_(w)
                b = math.sqrt(_dot(w, w))
                if b > 0.717 * before:
                    break
        scale = max(scale, abs(a) + b + prev_beta)
        run.last_beta = b
        if progress is not None:
            progress(j + 1, steps)
        invariant = b <= 1e-10 * max(scale, 1e-300)
        if j + 1 >= n or (converged is not None and not (invariant and restart and basis is not None)
                          and converged(run)):
            break
        if invariant:
            # An invariant subspace: restart from a fresh vector orthogonal to the basis.
            if basis is None or not restart:
                break
            w = basis.orthogonalize_(basis.orthogonalize_(draw()))
            nw = math.sqrt(_dot(w, w))
            if nw <= 1e-10 * math.sqrt(n):
                break
            run.beta.append(0.0)
            run.restarts += 1
            prev, prev_beta = None, 0.0
            w.div_(nw)
        else:
            run.beta.append(b)
            prev, prev_beta = q, b
            w.div_(b)
        q = basis.append(w) if basis is not None else w
    if basis is not None:
        run.basis = basis.q[: len(run.alpha)]
    return run


@dataclass(frozen=True)
class Eigenpairs:
    """Extreme eigenvalues of one block of a curvature matrix.

    Attributes:
        block: the block's name (``"all"`` for the whole matrix).
        curvature: ``"hessian"``, ``"ggn"``, ...
        top: the ``k`` largest eigenvalues, descending.
        top_residuals: ``‖A v − λ v‖₂`` of each (``v`` unit).
        bottom: the ``bottom`` smallest (most negative) eigenvalues, ascending.
        bottom_residuals: their residuals.
        tol: the asked relative residual (relative to ``norm``).
        norm: the spectral-norm estimate ``max |θ|`` the residuals were compared with.
        converged: every requested residual (or error estimate, ``criterion="gap"``) ≤ ``tol·norm``.
        steps: Lanczos steps (= products, plus ``verify``'s).
        n_products: products spent.
        size: the block's dimension.
        top_vectors, bottom_vectors: the eigenvectors (dicts keyed like the block's parameters) when
            asked for.
    """

    block: str
    curvature: str
    top: np.ndarray
    top_residuals: np.ndarray
    bottom: np.ndarray
    bottom_residuals: np.ndarray
    tol: float
    norm: float
    converged: bool
    steps: int
    n_products: int
    size: int
    top_vectors: list[dict[str, Tensor]] | None = field(default=None, repr=False)
    bottom_vectors: list[dict[str, Tensor]] | None = field(default=None, repr=False)

    @property
    def max_relative_residual(self) -> float:
        """The worst ``‖Av − λv‖ / ‖A‖`` over the returned eigenvalues (the achieved tolerance)."""
        r = np.concatenate([self.top_residuals, self.bottom_residuals])
        return float(r.max() / self.norm) if r.size and self.norm > 0 else 0.0


def _error_estimates(theta: np.ndarray, res: np.ndarray, criterion: str) -> np.ndarray:
    """Per Ritz value: the residual (``"residual"``, a bound on the eigenvalue error), or
    ``min(r, r²/δ̂)`` (``"gap"``: Kahan–Parlett–Jiang, Parlett 1998 §11.7, with the gap δ̂ to the nearest
    other Ritz value less that one's residual; an estimate, since an eigenvalue Lanczos has not
    found yet may lie closer)."""
    if criterion == "residual" or theta.size < 2:
        return res
    dist = np.abs(theta[:, None] - theta[None, :]) - res[None, :]
    np.fill_diagonal(dist, np.inf)
    gap = dist.min(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        quad = np.where(gap > res, res * res / np.where(gap > 0, gap, 1.0), res)
    return np.minimum(res, quad)


def _solve(
    view: FlatView, block: str, curvature: str, k: int, bottom: int, *, tol: float, max_iter: int | None, seed: int,
    vectors: bool, verify: bool, progress: Callable[[int, int], None] | None, criterion: str = "residual",
    reorthogonalize: bool | None = None,
) -> Eigenpairs:
    n = view.n
    if k > n or bottom > n:
        raise ValueError(f"block {block!r} has {n} coordinates: cannot return k={k} / bottom={bottom} eigenvalues")
    steps = min(n, max(100, 10 * (k + bottom)) if max_iter is None else max_iter)
    need = max(k, bottom)

    def check(run: LanczosRun) -> bool:
        m = len(run.alpha)
        if m < need:
            return False
        theta, s = run.ritz()
        res = abs(run.last_beta) * np.abs(s[-1, :])
        norm = float(np.abs(theta).max())
        ok = _error_estimates(theta, res, criterion) <= tol * max(norm, 1e-300)
        return bool(ok[m - k:].all() and ok[:bottom].all())

    gen = torch.Generator().manual_seed(int(seed))
    if reorthogonalize is None:  # the basis costs (steps)·d memory and two passes over it per step
        reorthogonalize = k + bottom > 1 or n <= _SMALL
    reorthogonalize = reorthogonalize or vectors or verify
    run = lanczos(view.mv, n, steps=steps, dtype=view.dtype, device=view.device, generator=gen,
                  reorthogonalize=reorthogonalize, converged=check, progress=progress)
    theta, s = run.ritz()
    m = theta.size
    res = abs(run.last_beta) * np.abs(s[-1, :])
    norm = float(np.abs(theta).max()) if m else 0.0
    top_idx = list(range(m - 1, m - 1 - k, -1))
    bot_idx = list(range(bottom))
    n_products = run.n_products
    top_vecs = bot_vecs = None
    if vectors or verify:
        assert run.basis is not None
        basis = run.basis

        def vec(i: int) -> Tensor:  # y = Q s (no float64 copy of the basis: d·steps numbers)
            y = basis.T @ torch.from_numpy(s[:, i].copy()).to(dtype=basis.dtype, device=basis.device)
            return y / math.sqrt(_dot(y, y))

        tv = [vec(i) for i in top_idx]
        bv = [vec(i) for i in bot_idx]
        if verify:  # the true residuals, one more product each
            def true_res(i: int, y: Tensor) -> float:
                return float((view.mv(y).double() - theta[i] * y.double()).norm())

            res = res.copy()
            for i, y in zip(top_idx + bot_idx, tv + bv):
                res[i] = true_res(i, y)
            n_products += len(tv) + len(bv)
        if vectors:
            top_vecs = [view.unflatten(y) for y in tv]
            bot_vecs = [view.unflatten(y) for y in bv]
    top_res = res[top_idx]
    bot_res = res[bot_idx]
    est = _error_estimates(theta, abs(run.last_beta) * np.abs(s[-1, :]), criterion)
    conv = bool(((est[top_idx] <= tol * norm).all() and (est[bot_idx] <= tol * norm).all()) if m else False)
    return Eigenpairs(
        block=block, curvature=curvature, top=theta[top_idx].copy(), top_residuals=top_res.copy(),
        bottom=theta[bot_idx].copy(), bottom_residuals=bot_res.copy(), tol=tol, norm=norm, converged=conv,
        steps=len(run.alpha), n_products=n_products, size=n, top_vectors=top_vecs, bottom_vectors=bot_vecs,
    )


def eigenvalues(
    source: Any,
    k: int = 1,
    *,
    bottom: int = 0,
    by: Blocks = None,
    curvature: str = "hessian",
    at: Mapping[str, Tensor] | None = None,
    tol: float = DEFAULT_TOL,
    max_iter: int | None = None,
    seed: int = 0,
    return_vectors: bool = False,
    verify: bool = False,
    criterion: str = "residual",
    reorthogonalize: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Eigenpairs | dict[str, Eigenpairs]:
    """The ``k`` largest and the ``bottom`` most negative eigenvalues of a curvature matrix, by
    Lanczos, with the residual ``‖Av − λv‖`` of each; per block with ``by``.

    Args:
        source: an :class:`~landscape.Objective` (an operator of ``curvature`` is built at ``at``
            and released at the end) or a :class:`~landscape.linops.CurvatureOperator` (its
            retained graph is reused).
        k: how many of the largest (algebraic) eigenvalues (0 for none).
        bottom: how many of the smallest (algebraic, i.e. most negative) eigenvalues.
        by: ``None`` for the whole matrix; else blocks (``"layer"``, ``"tensor"``, a mapping
            ``{block: names}`` or a function ``name -> block``, see
            :func:`~landscape.linops.group_names`): the eigenvalues of each diagonal block
            ``A[B, B]``, all from one operator (one retained graph).
        curvature: ``"hessian"`` or ``"ggn"`` (when ``source`` is an objective).
        at: the point (when ``source`` is an objective; default: current parameters).
        tol: stop when every requested residual is at most ``tol·‖A‖`` (``‖A‖`` estimated by the
            largest |Ritz value|); this bounds each eigenvalue's error by ``tol·‖A‖``. Default
            :data:`DEFAULT_TOL` = 1e-4.
        max_iter: at most this many Lanczos steps per block (default ``max(100, 10(k + bottom))``,
            capped at the dimension). Not converging is reported (``converged=False``), not raised.
        seed: seeds the start vectors.
        return_vectors: also return the eigenvectors.
        verify: recompute each residual as ``‖Av − λv‖`` with one more product per eigenvalue
            instead of the Lanczos estimate ``β_m |s_m|`` (equal in exact arithmetic).
        criterion: what ``tol`` bounds: ``"residual"`` (default, rigorous: ``‖Av − λv‖ ≤ tol·‖A‖``)
            or ``"gap"``: the eigenvalue-error estimate ``min(r, r²/δ̂)`` (Parlett, *The Symmetric
            Eigenvalue Problem*, §11.7), δ̂ the distance to the nearest other Ritz value less its
            residual. It stops much earlier for an eigenvalue with a clear gap (the error of a Ritz
            value falls as the square of its residual), but it is an estimate: an eigenvalue not yet
            seen by Lanczos may sit closer than δ̂. The residuals are reported either way.
        reorthogonalize: keep the Lanczos basis and re-orthogonalise against it (memory: steps × d;
            time: two passes over it per step). ``None`` (default): kept when more than one eigenvalue
            or the eigenvectors are asked for, or below 200,000 coordinates; for the top eigenvalue
            alone of a large model, the plain three-term recurrence (three vectors) is accurate up to
            convergence (Paige 1976: orthogonality is lost only along converged Ritz vectors).
        progress: ``progress(block, step, max_steps)``.

    Returns:
        An :class:`Eigenpairs` (``by=None``), or ``{block: Eigenpairs}``.

    Example:
        >>> res = ls.eigenvalues(obj, k=3, bottom=1, by="layer")           # doctest: +SKIP
        >>> res["fc1"].top, res["fc1"].bottom, res["fc1"].top_residuals     # doctest: +SKIP
    """
    if not isinstance(k, int) or not isinstance(bottom, int) or k < 0 or bottom < 0 or k + bottom == 0:
        raise ValueError(f"k and bottom must be non-negative integers, not both zero, got k={k!r}, bottom={bottom!r}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be positive and finite, got {tol!r}")
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}")
    if criterion not in ("residual", "gap"):
        raise ValueError(f"criterion must be 'residual' or 'gap', got {criterion!r}")
    with operator_of(source, curvature, at) as op:
        blocks = group_names(op.names, by)
        out: dict[str, Eigenpairs] = {}
        for block, names in blocks.items():
            prog = None if progress is None else (lambda i, m, block=block: progress(block, i, m))
            out[block] = _solve(op.flat(names), block, op.curvature, k, bottom, tol=tol, max_iter=max_iter, seed=seed,
                                vectors=return_vectors, verify=verify, progress=prog, criterion=criterion,
                                reorthogonalize=reorthogonalize)
    return out["all"] if by is None else out
