"""Loss landscapes in two dimensions and between checkpoints.

The pictures most of the field means by "loss landscape":

* **planes** ``f(x + α·d₁ + β·d₂)`` on a grid of ``(α, β)`` around a centre ``x`` (Li et al., 2018,
  "Visualizing the Loss Landscape of Neural Nets"), with the directions from
  - :func:`random_plane`: two filter-normalised random directions (Li et al. §4);
  - :func:`update_plane`: two optimizers' update directions at the same point (e.g. SGD's and Adam's
    pseudo-updates), orthogonalised: Pan & Li 2023's question (which direction is sharper) made visible;
  - :func:`pca_plane`: the top two principal directions of a trajectory (Li et al. §7), with the
    trajectory projected onto them and the explained variance of each axis;
* **lines** ``f(x + α·d)``, e.g. :func:`interpolation` between two checkpoints
  ``θ(α) = (1 − α)·θ_a + α·θ_b`` for ``α ∈ [−0.5, 1.5]`` (Goodfellow et al., 2015, "Qualitatively
  characterizing neural network optimization problems").

:func:`loss_plane` and :func:`loss_line` evaluate a grid through an
:class:`~landscape.objective.Objective` (functionally: the model, its modes and the RNG are
untouched). Several grid points go through one forward pass where that is faster
(``torch.func.vmap`` over the functional call, ``method="vmap"``), else one point at a time
(``method="loop"``); ``method="auto"`` (default) checks the batched values against one-at-a-time
evaluation on the first chunk and keeps whichever is faster. :func:`measure_plane` writes the grid
into a run store chunk by chunk (tables ``planes``, ``plane_losses``, ``plane_trajectory``), so an
interrupted grid resumes from its missing points; :func:`load_plane` reads it back for the figures
(:mod:`landscape.plane_plots`).

Example:
    >>> import torch, landscape as ls
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    >>> batch = (torch.randn(32, 4), torch.randn(32, 1))
    >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batch)
    >>> plane = ls.random_plane(obj, seed=0)                         # filter-normalised, biases zeroed
    >>> grid = ls.loss_plane(obj, plane.d1, plane.d2, 11)            # α, β ∈ linspace(-1, 1, 11)
    >>> grid.loss.shape, bool(abs(grid.loss[5, 5] - obj.loss()) < 1e-6)
    ((11, 11), True)
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from landscape import tree
from landscape.objective import Objective
from landscape.store import NoDataError, Run, RunMismatchError, RunStore

__all__ = [
    "BIAS_MODES",
    "INTERPOLATION_GRID",
    "METHODS",
    "LossGrid",
    "Plane",
    "PlaneError",
    "StoredPlane",
    "Trajectory",
    "filter_normalize",
    "interpolation",
    "list_planes",
    "load_plane",
    "loss_line",
    "loss_plane",
    "measure_plane",
    "pca_plane",
    "random_direction",
    "random_plane",
    "update_plane",
]

#: How :func:`filter_normalize` treats parameters with at most one dimension (biases, BatchNorm /
#: LayerNorm weights): ``"zero"`` (Li et al.'s ``--xignore biasbn``), ``"keep"`` (their code without
#: it: the direction is the parameter itself), ``"random"`` (a random direction scaled to the
#: parameter's norm, the whole tensor as one filter).
BIAS_MODES = ("zero", "keep", "random")
#: Evaluation strategies of a grid.
METHODS = ("auto", "vmap", "loop")
#: The default grid of an interpolation, ``α ∈ [−0.5, 1.5]`` (Goodfellow et al. 2015).
INTERPOLATION_GRID = np.linspace(-0.5, 1.5, 41)

#: ``progress(completed, total, description)``.
ProgressFn = Callable[[int, int, str], None]
Tree = dict[str, Tensor]


class PlaneError(ValueError):
    """The directions or points given cannot make the plane asked for (parallel directions, a
    trajectory on a line, too few points...)."""


# --------------------------------------------------------------------------------------------------
# grids


def _axis(values: Any, what: str) -> np.ndarray:
    if isinstance(values, (int, np.integer)) and not isinstance(values, bool):
        if values < 2:
            raise ValueError(f"{what}: a grid needs at least 2 points, got {values}")
        return np.linspace(-1.0, 1.0, int(values))
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{what} must be a number of points or a 1-D array of coordinates, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{what} holds non-finite coordinates")
    if arr.size > 1 and not np.all(np.diff(arr) > 0):
        raise ValueError(f"{what} must be strictly increasing")
    return arr


def _plane_axes(grid: Any) -> tuple[np.ndarray, np.ndarray]:
    """``grid``: a number of points per axis (``linspace(-1, 1, n)``), one 1-D array for both axes, or
    a pair ``(alphas, betas)``."""
    if isinstance(grid, tuple) and len(grid) == 2 and all(
        isinstance(g, (int, np.integer)) or np.ndim(g) == 1 for g in grid
    ):
        return _axis(grid[0], "alphas"), _axis(grid[1], "betas")
    axis = _axis(grid, "grid")
    return axis, axis.copy()


@dataclass(frozen=True)
class LossGrid:
    """The loss on a grid.

    Attributes:
        alphas: coordinates along the first direction.
        betas: coordinates along the second direction (``None`` for a line).
        loss: ``loss[i, j] = f(x + alphas[i]·d₁ + betas[j]·d₂)`` (shape ``(len(alphas), len(betas))``),
            or ``loss[i] = f(x + alphas[i]·d)`` for a line. NaN where not computed.
        method: how the points were evaluated (``"vmap"``, ``"loop"``, or ``"stored"``).
        note: why the batched path was not used, when it was not.
    """

    alphas: np.ndarray
    betas: np.ndarray | None
    loss: np.ndarray
    method: str = "loop"
    note: str | None = None


# --------------------------------------------------------------------------------------------------
# evaluation


def _tolerance(dtype: torch.dtype) -> float:
    return 1e-9 if dtype == torch.float64 else 1e-4 if dtype == torch.float32 else 2e-2


def _close(a: np.ndarray, b: np.ndarray, rtol: float) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b) & (np.abs(a - b) <= rtol * np.maximum(1.0, np.abs(b)))
    return bool(np.all(ok | (np.isnan(a) & np.isnan(b)) | (np.isinf(a) & (a == b))))


def _scalar(out: Any) -> Tensor:
    if not isinstance(out, Tensor) or out.numel() != 1:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise TypeError(f"loss_fn must return a scalar tensor, got {shape}")
    return out.reshape(())


class _Runner(torch.nn.Module):
    """Holds the objective's loss module, so that one ``functional_call`` can run a whole chunk of
    points: ``forward(run)`` just calls ``run()`` while the parameters are swapped."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, run: Callable[[], Any]) -> Any:
        return run()


class _Evaluator:
    """``f(x + Σₖ cₖ·dₖ)`` for rows of coefficients ``c``, through ``objective``'s functional call.

    ``"loop"``: one point per forward pass, a whole chunk inside one functional call (each point
    written into the swapped-in tensors in place: a copy and one fused add per direction).
    ``"vmap"``: ``chunk`` points per forward, ``torch.func.vmap`` over the functional call with the
    parameters stacked along a new leading dimension. ``"auto"``: vmap on the first chunk, checked
    against one-at-a-time evaluation of up to four of its points; whichever is faster per point is
    kept (any failure or disagreement: the loop).
    """

    def __init__(self, objective: Objective, at: Mapping[str, Tensor] | None,
                 directions: Sequence[Mapping[str, Tensor]], method: str = "auto", chunk: int | None = None) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
        self.obj = objective
        self.point = objective._point(at)
        self.names = objective.names
        self.base = [self.point[n] for n in self.names]
        self.dirs: list[list[Tensor]] = []
        for i, d in enumerate(directions):
            objective._check_direction(d, f"direction {i + 1}")
            self.dirs.append([d[n].detach().to(dtype=p.dtype, device=p.device) for n, p in zip(self.names, self.base)])
        self.batches = [objective._batch(i) for i in range(len(objective.batches))]
        self.weights = np.asarray(objective.batches.weights, dtype=np.float64)
        # In eval mode everything but the measured entries is the same at every point (train mode copies
        # the buffers afresh for each call, as BatchNorm updates them in place).
        self.fixed = objective._swap(self.point) if objective.mode == "eval" else None
        self.runner = _Runner(objective._wrapper)
        self.chunk = chunk if chunk is not None else self._auto_chunk()
        self.method = "loop" if method == "auto" and self.chunk < 2 else method
        self.tuned = method != "auto"
        self.forced = method == "vmap"
        self.note: str | None = None
        self.rtol = _tolerance(self.base[0].dtype)

    def _auto_chunk(self) -> int:
        nbytes = sum(t.numel() * t.element_size() for t in self.base)
        device = self.base[0].device
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget, cap = free // 4, 64
        else:
            budget, cap = 256 * 2**20, 16
        return int(max(1, min(cap, budget // max(1, 4 * nbytes))))

    def _swap(self, moved: Sequence[Tensor]) -> dict[str, Tensor]:
        swap = dict(self.fixed) if self.fixed is not None else self.obj._swap(self.point)
        swap.update(zip(self.names, moved))
        return swap

    def _loop(self, coeffs: np.ndarray) -> np.ndarray:
        if self.fixed is None:  # train mode: fresh buffers for every point, as Objective.loss does
            return self._loop_fresh(coeffs)
        # One functional call for the whole chunk: the module's parameters are swapped for tensors of
        # our own (``work``) once, and each point is written into them in place before its forward
        # pass, exactly as ``base + c₁·d₁ + c₂·d₂`` (the same fused adds as ``losses_along``).
        work = [t.clone() for t in self.base]
        swap = self._swap(work)
        inner = self.runner.inner

        def run() -> np.ndarray:
            out = np.empty(len(coeffs), dtype=np.float64)
            for k, c in enumerate(coeffs):
                torch._foreach_copy_(work, self.base)
                for ck, d in zip(c, self.dirs):
                    if ck != 0:
                        torch._foreach_add_(work, d, alpha=float(ck))
                out[k] = sum(w * float(_scalar(inner(b))) for w, b in zip(self.weights, self.batches))
            return out

        return torch.func.functional_call(self.runner, {f"inner.model.{k}": v for k, v in swap.items()}, (run,),
                                          strict=False, tie_weights=True)

    def _loop_fresh(self, coeffs: np.ndarray) -> np.ndarray:
        out = np.empty(len(coeffs), dtype=np.float64)
        for k, c in enumerate(coeffs):
            moved: list[Tensor] | None = None
            for ck, d in zip(c, self.dirs):
                if ck == 0:
                    continue
                if moved is None:
                    moved = torch._foreach_add(self.base, d, alpha=float(ck))
                else:
                    torch._foreach_add_(moved, d, alpha=float(ck))
            swap = self._swap(self.base if moved is None else moved)
            out[k] = sum(w * float(self.obj._call_swapped(swap, b)) for w, b in zip(self.weights, self.batches))
        return out

    def _vmap(self, coeffs: np.ndarray) -> np.ndarray:
        k = len(coeffs)
        stacked = []
        for j, t in enumerate(self.base):
            c = torch.as_tensor(coeffs, dtype=t.dtype, device=t.device)
            shape = (k,) + (1,) * t.dim()
            p = t.unsqueeze(0)
            for i, d in enumerate(self.dirs):
                p = p + c[:, i].view(shape) * d[j]
            stacked.append(p.expand(k, *t.shape) if p.shape[0] != k else p)

        def f(*params: Tensor) -> Tensor:
            swap = self._swap(params)
            return torch.stack([self.obj._call_swapped(swap, b) for b in self.batches])

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*performance drop.*")  # vmap's per-op fallbacks
            out = torch.func.vmap(f)(*stacked)
        return out.detach().double().cpu().numpy() @ self.weights

    def _vmap_safe(self, coeffs: np.ndarray) -> np.ndarray:
        try:
            return self._vmap(coeffs)
        except (torch.OutOfMemoryError, MemoryError):
            if len(coeffs) < 2:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.chunk = max(1, len(coeffs) // 2)
            half = len(coeffs) // 2
            return np.concatenate([self._vmap_safe(coeffs[:half]), self._vmap_safe(coeffs[half:])])

    def _tune(self, coeffs: np.ndarray) -> np.ndarray:
        """First chunk of ``"auto"``: vmap, checked against the loop on up to four of its points (which
        also times the loop); keep the faster."""
        self.tuned = True
        t0 = time.perf_counter()
        try:
            out = self._vmap_safe(coeffs)
        except Exception as e:  # noqa: BLE001 - any op vmap cannot batch: one point at a time
            self.method = "loop"
            first = str(e).splitlines()[0] if str(e) else ""
            self.note = f"batched evaluation failed ({type(e).__name__}: {first[:120]}); one point at a time"
            return self._loop(coeffs)
        per_vmap = (time.perf_counter() - t0) / len(coeffs)
        k = len(coeffs)
        check = sorted({0, k // 3, (2 * k) // 3, k - 1})
        t0 = time.perf_counter()
        direct = self._loop(coeffs[check])
        per_loop = (time.perf_counter() - t0) / len(check)
        if not _close(out[check], direct, self.rtol):
            self.method = "loop"
            self.note = (f"batched evaluation disagrees with one point at a time ({out[check].tolist()} vs "
                         f"{direct.tolist()}); one point at a time")
            return self._loop(coeffs)
        if per_vmap < per_loop:
            self.method = "vmap"
        else:
            self.method = "loop"
            self.note = (f"one point at a time was faster ({per_loop * 1e3:.3g} ms vs {per_vmap * 1e3:.3g} ms per "
                         "point batched)")
        return out

    def evaluate(self, coeffs: np.ndarray) -> np.ndarray:
        """The loss at each row of ``coeffs`` (shape ``(n, number of directions)``)."""
        coeffs = np.asarray(coeffs, dtype=np.float64).reshape(len(coeffs), len(self.dirs))
        out = np.empty(len(coeffs), dtype=np.float64)
        with self.obj._context(), torch.no_grad():
            i = 0
            while i < len(coeffs):
                if self.method == "loop":
                    out[i:] = self._loop(coeffs[i:])
                    break
                part = coeffs[i : i + self.chunk]
                if not self.tuned and len(part) >= 2:
                    out[i : i + len(part)] = self._tune(part)
                elif self.method == "auto":  # a first chunk of one point: too small to tune on
                    out[i : i + len(part)] = self._loop(part)
                else:
                    try:
                        out[i : i + len(part)] = self._vmap_safe(part)
                    except Exception as e:
                        if self.forced:
                            raise RuntimeError(
                                f"method='vmap' cannot evaluate this loss ({type(e).__name__}: {e}); "
                                "use method='loop' (or 'auto')"
                            ) from e
                        self.method = "loop"  # chosen by "auto", failed later (a larger chunk, say)
                        self.note = f"batched evaluation failed ({type(e).__name__}); one point at a time"
                        out[i : i + len(part)] = self._loop(part)
                i += len(part)
        return out


def _run_grid(evaluator: _Evaluator, coeffs: np.ndarray, commit: int, progress: ProgressFn | None,
              what: str, on_chunk: Callable[[int, np.ndarray], None] | None = None,
              todo: np.ndarray | None = None, done: int = 0, total: int | None = None) -> np.ndarray:
    """Evaluate the rows ``todo`` (default: all) of ``coeffs`` in runs of consecutive indices of at
    most ``commit`` points; ``on_chunk(start, losses)`` after each."""
    n = len(coeffs)
    out = np.full(n, np.nan)
    idx = np.arange(n) if todo is None else np.asarray(todo, dtype=np.int64)
    total = n if total is None else total
    runs: list[tuple[int, int]] = []
    if idx.size:
        breaks = np.nonzero(np.diff(idx) != 1)[0]
        starts = np.concatenate([[0], breaks + 1])
        ends = np.concatenate([breaks + 1, [idx.size]])
        for s, e in zip(starts, ends):
            first, last = int(idx[s]), int(idx[e - 1]) + 1
            for a in range(first, last, commit):
                runs.append((a, min(a + commit, last)))
    if progress is not None:
        progress(done, total, what)
    for a, b in runs:
        out[a:b] = evaluator.evaluate(coeffs[a:b])
        if on_chunk is not None:
            on_chunk(a, out[a:b])
        done += b - a
        if progress is not None:
            progress(done, total, what)
    return out


def loss_plane(
    objective: Objective,
    d1: Mapping[str, Tensor],
    d2: Mapping[str, Tensor],
    grid: Any = 41,
    *,
    at: Mapping[str, Tensor] | None = None,
    method: str = "auto",
    chunk: int | None = None,
    progress: ProgressFn | None = None,
) -> LossGrid:
    """The loss on a plane, ``loss[i, j] = f(x + αᵢ·d₁ + βⱼ·d₂)`` (Li et al. 2018, Eq. 1).

    Args:
        objective: the function (model, loss, fixed batch).
        d1, d2: the directions, keyed like ``objective.names`` (used as given: not normalised).
        grid: points per axis (``linspace(-1, 1, n)``), one increasing array for both axes, or a pair
            ``(alphas, betas)``.
        at: the centre ``x`` (default: the model's current parameters).
        method: ``"auto"`` (default), ``"vmap"`` (several points per forward pass) or ``"loop"`` (one
            point at a time); see the module docstring. The values agree to rounding.
        chunk: points per batched forward (default: from the parameter memory, at most 16 on CPU).
        progress: ``progress(completed, total, description)``.

    Returns:
        A :class:`LossGrid`.
    """
    alphas, betas = _plane_axes(grid)
    coeffs = np.stack(np.meshgrid(alphas, betas, indexing="ij"), axis=-1).reshape(-1, 2)
    ev = _Evaluator(objective, at, [d1, d2], method, chunk)
    flat = _run_grid(ev, coeffs, max(len(betas), ev.chunk), progress, "plane")
    return LossGrid(alphas, betas, flat.reshape(len(alphas), len(betas)), ev.method, ev.note)


def loss_line(
    objective: Objective,
    d: Mapping[str, Tensor],
    grid: Any = 41,
    *,
    at: Mapping[str, Tensor] | None = None,
    method: str = "auto",
    chunk: int | None = None,
    progress: ProgressFn | None = None,
) -> LossGrid:
    """The loss on a line, ``loss[i] = f(x + αᵢ·d)`` (``d`` used as given).

    With ``at = θ_a`` and ``d = θ_b − θ_a`` this is the linear interpolation of Goodfellow et al.
    (2015), ``f((1 − α)·θ_a + α·θ_b)``; see :func:`interpolation`. (:func:`~landscape.loss_along`
    is the probe's one-sided line ``f(x − s·û)`` along a normalised update instead.)

    Args:
        objective: the function.
        d: the direction, keyed like ``objective.names``.
        grid: a number of points (``linspace(-1, 1, n)``) or an increasing array of ``α``.
        at, method, chunk, progress: as in :func:`loss_plane`.
    """
    alphas = _axis(grid, "grid")
    ev = _Evaluator(objective, at, [d], method, chunk)
    flat = _run_grid(ev, alphas[:, None], max(ev.chunk, 16), progress, "line")
    return LossGrid(alphas, None, flat, ev.method, ev.note)


# --------------------------------------------------------------------------------------------------
# directions


def _weights_of(source: Objective | Mapping[str, Tensor]) -> Tree:
    if isinstance(source, Objective):
        return source.params()
    if not isinstance(source, Mapping) or not source:
        raise TypeError("pass an Objective or the parameters as a non-empty dict[str, Tensor]")
    return {n: v.detach() for n, v in source.items()}


def filter_normalize(
    direction: Mapping[str, Tensor], weights: Mapping[str, Tensor], *, biases: str = "zero"
) -> Tree:
    """Filter normalisation (Li et al. 2018, §4): each filter of the direction gets the norm of the
    matching filter of the weights, ``d_{i,j} ← d_{i,j} / ‖d_{i,j}‖ · ‖θ_{i,j}‖``.

    A filter is a slice along the first dimension of a parameter with two or more dimensions: an
    output channel of a convolution's weight, a row of a linear layer's weight or of an embedding.
    Parameters with at most one dimension (biases, BatchNorm / LayerNorm weights and biases) follow
    ``biases`` (see :data:`BIAS_MODES`): zeroed by default, as Li et al.'s ``--xignore biasbn``.

    Args:
        direction: the raw direction (e.g. Gaussian), keyed like ``weights``.
        weights: the parameters at the centre of the plane.
        biases: ``"zero"``, ``"keep"`` (the direction is the parameter itself) or ``"random"``
            (scaled to the parameter's norm as one filter).

    Returns:
        A new direction (the inputs are not modified). A filter whose weights are zero gets zero.
    """
    if biases not in BIAS_MODES:
        raise ValueError(f"biases must be one of {', '.join(BIAS_MODES)}, got {biases!r}")
    missing = [n for n in weights if n not in direction]
    if missing:
        raise KeyError(f"the direction lacks parameters {missing[:5]}")
    out: Tree = {}
    for n, w in weights.items():
        d = direction[n].detach()
        if d.shape != w.shape:
            raise ValueError(f"direction[{n!r}] has shape {tuple(d.shape)}, the parameter's is {tuple(w.shape)}")
        if w.dim() <= 1:
            if biases == "zero":
                out[n] = torch.zeros_like(w)
            elif biases == "keep":
                out[n] = w.detach().clone()
            else:
                dn, wn = float(d.double().norm()), float(w.double().norm())
                out[n] = (d.double() * (wn / dn if dn > 0 else 0.0)).to(w.dtype)
            continue
        dn = d.double().flatten(1).norm(dim=1)
        wn = w.detach().double().flatten(1).norm(dim=1)
        scale = torch.where(dn > 0, wn / torch.where(dn > 0, dn, torch.ones_like(dn)), torch.zeros_like(dn))
        out[n] = (d.double() * scale.view(-1, *([1] * (d.dim() - 1)))).to(w.dtype)
    return out


def random_direction(
    weights: Objective | Mapping[str, Tensor], *, seed: int | None = 0, generator: torch.Generator | None = None,
    biases: str = "zero",
) -> Tree:
    """A Gaussian direction, filter-normalised to ``weights`` (:func:`filter_normalize`).

    Drawn on the CPU from ``generator`` (or a fresh one seeded with ``seed``), so the global RNG is
    untouched and the same seed gives the same direction on every device.
    """
    w = _weights_of(weights)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed or 0))
    return filter_normalize(tree.randn_like(w, gen), w, biases=biases)


@dataclass
class Trajectory:
    """Points projected onto a plane (or line).

    Attributes:
        coords: ``(n, dims)`` coordinates, least-squares projections onto the plane's directions.
        residuals: distance from each point to the plane.
        steps: the step of each point (``None`` where unknown).
        labels: a name for each point.
        loss: the probe loss at each point itself, when computed.
    """

    coords: np.ndarray
    residuals: np.ndarray
    steps: list[int | None]
    labels: list[str | None]
    loss: np.ndarray | None = None


@dataclass
class Plane:
    """A plane ``x + α·d₁ + β·d₂`` (or a line, ``d2 = None``) with what is known about it.

    Attributes:
        kind: ``random``, ``updates``, ``pca``, ``interpolate`` or ``custom``.
        d1, d2: the directions (``dict[str, Tensor]``).
        center: the centre ``x`` (``None``: the objective's current parameters).
        x_label, y_label: what each coordinate measures.
        step: the step of the centre, when known.
        grid: the suggested grid (``(alphas, betas)`` or ``alphas``).
        markers: named points in plane coordinates (e.g. each update's unit step).
        trajectory: points projected onto the plane.
        explained_variance: ``pca``: the fraction of the trajectory's variance along each axis.
        config: JSON-able description of how the plane was built.
    """

    kind: str
    d1: Tree
    d2: Tree | None = None
    center: Tree | None = None
    x_label: str = "α"
    y_label: str | None = "β"
    step: int | None = None
    grid: Any = None
    markers: dict[str, list[float]] = field(default_factory=dict)
    trajectory: Trajectory | None = None
    explained_variance: np.ndarray | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return 1 if self.d2 is None else 2

    @property
    def directions(self) -> list[Tree]:
        return [self.d1] if self.d2 is None else [self.d1, self.d2]

    def project(self, points: Sequence[Mapping[str, Tensor]]) -> tuple[np.ndarray, np.ndarray]:
        """Least-squares coordinates of ``points`` in the plane (relative to the centre) and their
        distances to it: ``c = argmin ‖p − x − Σ cₖ dₖ‖``."""
        if self.center is None:
            raise PlaneError("projecting points needs the plane's centre (Plane.center is None)")
        names = list(self.d1)
        dirs = [{n: d[n] for n in names} for d in self.directions]
        gram = np.array([[float(tree.dot(a, b)) for b in dirs] for a in dirs])
        if np.linalg.matrix_rank(gram) < len(dirs):
            raise PlaneError("the plane's directions are linearly dependent")
        coords = np.zeros((len(points), len(dirs)))
        residuals = np.zeros(len(points))
        for i, p in enumerate(points):
            r = {n: p[n].detach().double().to(self.center[n].device) - self.center[n].double() for n in names}
            rhs = np.array([float(tree.dot(r, d)) for d in dirs])
            c = np.linalg.solve(gram, rhs)
            coords[i] = c
            res = 0.0
            for n in names:
                v = r[n]
                for ck, d in zip(c, dirs):
                    v = v - float(ck) * d[n].double()
                res += float((v * v).sum())
            residuals[i] = math.sqrt(res)
        return coords, residuals

    def with_trajectory(
        self,
        points: Sequence[Mapping[str, Tensor]],
        steps: Sequence[int | None] | None = None,
        labels: Sequence[str | None] | None = None,
        objective: Objective | None = None,
    ) -> Plane:
        """A copy of the plane with ``points`` projected onto it (and their loss, given ``objective``)."""
        coords, residuals = self.project(points)
        return replace(self, trajectory=_trajectory(points, coords, residuals, steps, labels, objective))


def _trajectory(points: Sequence[Mapping[str, Tensor]], coords: np.ndarray, residuals: np.ndarray,
                steps: Sequence[int | None] | None, labels: Sequence[str | None] | None,
                objective: Objective | None) -> Trajectory:
    n = len(points)
    steps_ = list(steps) if steps is not None else [None] * n
    labels_ = list(labels) if labels is not None else [None] * n
    if len(steps_) != n or len(labels_) != n:
        raise ValueError(f"{n} points but {len(steps_)} steps and {len(labels_)} labels")
    loss = None
    if objective is not None:
        loss = np.array([objective.loss(at={k: p[k] for k in objective.names}) for p in points])
    return Trajectory(coords, residuals, steps_, labels_, loss)


def random_plane(
    weights: Objective | Mapping[str, Tensor], *, seed: int = 0, biases: str = "zero", step: int | None = None,
) -> Plane:
    """Two filter-normalised Gaussian directions at ``weights`` (Li et al. 2018, §4), drawn one after
    the other from one CPU generator seeded with ``seed``. The centre is ``weights`` (copied); the
    suggested grid is ``α, β ∈ [−1, 1]`` as in the paper."""
    w = {n: v.clone() for n, v in _weights_of(weights).items()}
    gen = torch.Generator().manual_seed(int(seed))
    d1 = random_direction(w, generator=gen, biases=biases)
    d2 = random_direction(w, generator=gen, biases=biases)
    return Plane("random", d1, d2, center=w, x_label="α (random direction 1, filter-normalised)",
                 y_label="β (random direction 2, filter-normalised)", step=step, grid=41,
                 config={"seed": int(seed), "biases": biases})


def update_plane(
    u1: Mapping[str, Tensor],
    u2: Mapping[str, Tensor],
    *,
    names: tuple[str, str] = ("u1", "u2"),
    scale: str = "unit",
    center: Mapping[str, Tensor] | None = None,
    step: int | None = None,
) -> Plane:
    """The plane of two update directions at one point, orthogonalised (Gram–Schmidt).

    An update ``u`` moves ``x`` to ``x − η·u``, so the axes point along the steps: ``e₁ = −û₁`` and
    ``e₂ = (−û₂ − c·e₁) / ‖−û₂ − c·e₁‖`` with ``c = cos(u₁, u₂)``. With ``scale="unit"`` (default) the
    directions are ``e₁, e₂``: coordinates are distances in parameter space, as the store's ``lines``
    (Pan & Li 2023, Figs. 2–4), and the curvature of the contours along each axis compares the two
    directions' sharpness directly. With ``scale="norm"`` they are ``‖u₁‖·e₁, ‖u₂‖·e₂``: ``α = 1`` is
    the whole update ``x − u₁``. ``markers`` hold the step along each update in plane coordinates:
    ``names[0]`` at ``(1, 0)``, ``names[1]`` at ``(c, √(1 − c²))`` (unit scale).

    Raises:
        PlaneError: a zero or non-finite update, or two parallel updates (no plane).
    """
    if scale not in ("unit", "norm"):
        raise ValueError(f"scale must be 'unit' or 'norm', got {scale!r}")
    keys = list(u1)
    tree.check_same_keys(u1, u2, "the two updates")
    n1, n2 = float(tree.norm(u1)), float(tree.norm(u2))
    for nm, norm in zip(names, (n1, n2)):
        if not (math.isfinite(norm) and norm > 0):
            raise PlaneError(f"the update {nm!r} has norm {norm}: it must be finite and non-zero")
    e1 = {k: -u1[k].detach() / n1 for k in keys}
    v = {k: -u2[k].detach() / n2 for k in keys}
    c = float(tree.dot(v, e1))
    w = {k: v[k] - c * e1[k] for k in keys}
    s = float(tree.norm(w))
    if s < 1e-6:
        raise PlaneError(f"the updates {names[0]!r} and {names[1]!r} are parallel (cosine {c:.8f}): they span no "
                         "plane; draw a line along one of them")
    e2 = {k: w[k] / s for k in keys}
    if scale == "unit":
        d1, d2 = e1, e2
        markers = {names[0]: [1.0, 0.0], names[1]: [c, s]}
        xl, yl = f"α: step along −{names[0]} (distance)", f"β: step along −{names[1]}, orthogonalised (distance)"
    else:
        d1 = {k: t * n1 for k, t in e1.items()}
        d2 = {k: t * n2 for k, t in e2.items()}
        markers = {names[0]: [1.0, 0.0], names[1]: [c * n2 / n1, s]}
        xl, yl = (f"α: step along −{names[0]} (units of ‖{names[0]}‖)",
                  f"β: step along −{names[1]}, orthogonalised (units of ‖{names[1]}‖)")
    ctr = {k: center[k].detach().clone() for k in keys} if center is not None else None
    return Plane("updates", d1, d2, center=ctr, x_label=xl, y_label=yl, step=step, grid=41, markers=markers,
                 config={"directions": list(names), "scale": scale, "cosine": c, "norms": [n1, n2]})


def pca_plane(
    points: Sequence[Mapping[str, Tensor]],
    *,
    center: int = -1,
    names: Sequence[str] | None = None,
    steps: Sequence[int | None] | None = None,
    labels: Sequence[str | None] | None = None,
    objective: Objective | None = None,
) -> Plane:
    """The plane of a trajectory's top two principal directions (Li et al. 2018, §7).

    With ``θ₀ … θₙ`` the points and ``X`` the matrix of their deviations from their mean, the
    directions ``e₁, e₂`` are the top two right singular vectors of ``X`` (unit norm, orthogonal);
    the plane is centred at ``θ_center`` (default: the last point) and the trajectory's coordinates
    are ``αᵢ = ⟨θᵢ − θ_center, e₁⟩``, ``βᵢ = ⟨θᵢ − θ_center, e₂⟩``. ``explained_variance[k]`` is the
    fraction ``σₖ² / Σⱼ σⱼ²`` of the deviations' variance along ``eₖ``. Computed from the Gram matrix
    ``X Xᵀ`` accumulated one parameter tensor at a time in float64 (memory: the points, plus one tensor
    per point). The axes are oriented so that the first point has non-positive coordinates.

    Args:
        points: the trajectory (``dict[str, Tensor]`` each), at least three.
        center: index of the centre point.
        names: the parameters to use (default: the keys of the first point).
        steps, labels: the step and a name of each point, for the trajectory.
        objective: when given, the loss at each point is computed (``Trajectory.loss``).

    Raises:
        PlaneError: fewer than three points, identical points, or points on a line.
    """
    n = len(points)
    if n < 3:
        raise PlaneError(f"a PCA plane needs at least 3 points, got {n} (for 2, use an interpolation)")
    keys = list(names) if names is not None else list(points[0])
    if not -n <= center < n:
        raise PlaneError(f"center index {center} is out of range for {n} points")
    c_idx = center % n
    for i, p in enumerate(points):
        missing = [k for k in keys if k not in p]
        if missing:
            raise KeyError(f"point {i} lacks parameters {missing[:5]}")
    gram = np.zeros((n, n))
    scale = 0.0
    for k in keys:
        m = torch.stack([p[k].detach().double().reshape(-1).cpu() for p in points])
        scale += float((m * m).sum()) / n
        m = m - m[0]  # differences first: nearby checkpoints keep their digits
        m = m - m.mean(0, keepdim=True)
        gram += (m @ m.T).numpy()
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1]
    evals, evecs = np.clip(evals[order], 0.0, None), evecs[:, order]
    total = float(evals.sum())
    if not total > 1e-28 * max(scale, 1e-300):
        raise PlaneError("all the points are the same: there is no trajectory to project")
    if evals[1] <= 1e-12 * evals[0]:
        raise PlaneError("the points lie on a line (no variance off the first principal direction): use an "
                         "interpolation instead")
    a = evecs[:, :2] / np.sqrt(evals[:2])  # e_k = Σ_i a[i, k]·(θ_i − mean)
    coords = (gram - gram[c_idx]) @ a  # ⟨θ_i − θ_c, e_k⟩ = Σ_j (G_ij − G_cj)·a_jk
    signs = np.where(coords[0] > 0, -1.0, 1.0)
    a, coords = a * signs, coords * signs
    at = torch.from_numpy(a)
    d1: Tree = {}
    d2: Tree = {}
    center_pt: Tree = {}
    res2 = np.zeros(n)
    for k in keys:
        ref = points[0][k]
        m = torch.stack([p[k].detach().double().reshape(-1).cpu() for p in points])
        m = m - m[0]
        dev = m - m.mean(0, keepdim=True)
        e = at.T @ dev  # (2, numel)
        resid = (m - m[c_idx]) - torch.from_numpy(coords) @ e
        res2 += (resid * resid).sum(1).numpy()
        d1[k] = e[0].reshape(ref.shape).to(dtype=ref.dtype, device=ref.device)
        d2[k] = e[1].reshape(ref.shape).to(dtype=ref.dtype, device=ref.device)
        center_pt[k] = points[c_idx][k].detach().clone()
    explained = evals[:2] / total
    traj = _trajectory(points, coords, np.sqrt(res2), steps, labels, objective)
    lo, hi = coords.min(0), coords.max(0)
    pad = 0.25 * np.maximum(hi - lo, 1e-12)
    grid = (np.linspace(lo[0] - pad[0], hi[0] + pad[0], 41), np.linspace(lo[1] - pad[1], hi[1] + pad[1], 41))
    step = traj.steps[c_idx]
    return Plane("pca", d1, d2, center=center_pt,
                 x_label=f"PC1 ({100 * explained[0]:.1f}% of the variance)",
                 y_label=f"PC2 ({100 * explained[1]:.1f}% of the variance)", step=step, grid=grid,
                 trajectory=traj, explained_variance=explained,
                 config={"points": n, "center": c_idx, "steps": traj.steps})


def interpolation(
    a: Mapping[str, Tensor],
    b: Mapping[str, Tensor],
    *,
    names: Sequence[str] | None = None,
    labels: tuple[str, str] = ("a", "b"),
    steps: tuple[int | None, int | None] = (None, None),
) -> Plane:
    """The line through two points, ``θ(α) = θ_a + α·(θ_b − θ_a) = (1 − α)·θ_a + α·θ_b`` (Goodfellow et
    al. 2015): centre ``θ_a``, direction ``θ_b − θ_a``, suggested grid ``α ∈ [−0.5, 1.5]``
    (:data:`INTERPOLATION_GRID`); ``markers`` put ``labels`` at ``α = 0`` and ``α = 1``.

    Raises:
        PlaneError: the two points are equal.
    """
    keys = list(names) if names is not None else list(a)
    d = {k: b[k].detach().to(a[k].device, a[k].dtype) - a[k].detach() for k in keys}
    if float(tree.norm(d)) == 0:
        raise PlaneError(f"{labels[0]} and {labels[1]} are the same point: there is no segment between them")
    la, lb = labels
    return Plane("interpolate", d, None, center={k: a[k].detach().clone() for k in keys},
                 x_label=f"α: (1 − α)·{la} + α·{lb}", y_label=None, step=steps[0], grid=INTERPOLATION_GRID.copy(),
                 markers={la: [0.0], lb: [1.0]}, config={"from": la, "to": lb, "steps": list(steps)})


# --------------------------------------------------------------------------------------------------
# the run store


def _digest(trees: Sequence[Mapping[str, Tensor]]) -> str:
    """A short hash of tensors' values (at most 65,536 evenly strided entries and the sum of each)."""
    import hashlib

    h = hashlib.sha256()
    for t in trees:
        for k in sorted(t):
            v = t[k].detach().reshape(-1)
            stride = max(1, v.numel() // 65536)
            part = v[::stride].to("cpu", torch.float64).contiguous()
            h.update(f"{k}{tuple(t[k].shape)}{float(v.double().sum())!r}".encode())
            h.update(part.numpy().tobytes())
    return h.hexdigest()[:16]


def _fingerprint(objective: Objective) -> str:
    from landscape.probe import batch_fingerprint

    return f"{batch_fingerprint(list(objective.batches))}:{objective.mode}:{objective.dtype}"


def _json(value: Any) -> Any:
    def default(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return v.tolist()
        if isinstance(v, np.generic):
            return v.item()
        raise TypeError(f"{type(v).__name__} is not JSON serialisable")

    return json.loads(json.dumps(value, default=default, allow_nan=True))


def _diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def measure_plane(
    store: RunStore,
    name: str,
    plane: Plane,
    objectives: Objective | Mapping[str, Objective],
    grid: Any = None,
    *,
    method: str = "auto",
    chunk: int | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, LossGrid]:
    """Evaluate ``plane`` on ``grid`` for each objective into the run store, resumably.

    The plane (``planes`` table) and its trajectory (``plane_trajectory``) are written first; the
    losses go into ``plane_losses`` in chunks of consecutive grid points, one commit each. Called
    again with the same ``name``, plane and grid (say after an interrupt), only the missing points
    are evaluated; a different plane or grid under the same name, or an objective on another batch,
    is refused.

    Args:
        store: an open :class:`~landscape.store.RunStore`.
        name: the plane's name in the run.
        plane: from a builder (:func:`random_plane`, :func:`update_plane`, :func:`pca_plane`,
            :func:`interpolation`) or a :class:`Plane` of your own (``kind="custom"``).
        objectives: an objective (stored as ``"probe"``) or ``{"probe": ..., "train": ...}``.
        grid: as in :func:`loss_plane` / :func:`loss_line` (default: ``plane.grid``, else 41 points).
        method, chunk, progress: as in :func:`loss_plane`.

    Returns:
        ``{objective name: LossGrid}`` read back from the store.

    Raises:
        landscape.store.RunMismatchError: the name is taken by another plane, grid or batch.
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"a plane needs a non-empty name, got {name!r}")
    objs = {"probe": objectives} if isinstance(objectives, Objective) else dict(objectives)
    if not objs or not all(isinstance(o, Objective) for o in objs.values()):
        raise TypeError("objectives must be an Objective or a non-empty {name: Objective} dict")
    grid = plane.grid if grid is None else grid
    grid = 41 if grid is None else grid
    if plane.dims == 2:
        alphas, betas = _plane_axes(grid)
        coeffs = np.stack(np.meshgrid(alphas, betas, indexing="ij"), axis=-1).reshape(-1, 2)
    else:
        alphas, betas = _axis(grid, "grid"), None
        coeffs = alphas[:, None]
    first = next(iter(objs.values()))
    names = list(first.names)
    center = plane.center if plane.center is not None else first.params()
    digest = _digest([{n: center[n] for n in names}] + [{n: d[n] for n in names} for d in plane.directions])
    config = _json({**plane.config, "kind": plane.kind, "dims": plane.dims, "step": plane.step, "digest": digest})
    traj = plane.trajectory
    run = store.run()
    existing = run.rows("planes", name=name)
    if existing:
        old = existing[0]
        diffs = _diff(old["config"], config)
        if not np.array_equal(old["alphas"], alphas):
            diffs.append("alphas")
        if (old["betas"] is None) != (betas is None) or (betas is not None and not np.array_equal(old["betas"], betas)):
            diffs.append("betas")
        if diffs:
            raise RunMismatchError(
                f"plane {name!r} in {store.path} was computed with other settings ({', '.join(diffs)} differ); "
                "choose another name (--name) to keep both"
            )
    else:
        with store.transaction():
            store.write("planes", {
                "name": name, "kind": plane.kind, "dims": plane.dims, "step": plane.step,
                "x_label": plane.x_label, "y_label": plane.y_label if plane.dims == 2 else None,
                "alphas": alphas, "betas": betas,
                "explained_variance": plane.explained_variance, "markers": _json(plane.markers),
                "config": config, "wall": store.elapsed(),
            })
            if traj is not None:
                store.write("plane_trajectory", [
                    {"name": name, "position": i, "step": traj.steps[i], "label": traj.labels[i],
                     "alpha": float(traj.coords[i, 0]),
                     "beta": float(traj.coords[i, 1]) if traj.coords.shape[1] > 1 else None,
                     "residual": float(traj.residuals[i]),
                     "loss": float(traj.loss[i]) if traj.loss is not None else None}
                    for i in range(len(traj.coords))
                ])
    total_points = len(coeffs) * len(objs)
    done_before = 0
    plans = []
    for key, obj in objs.items():
        fp = _fingerprint(obj)
        rows = run.rows("plane_losses", name=name, objective=key)
        other = sorted({r["fingerprint"] for r in rows if r["fingerprint"] != fp})
        if other:
            raise RunMismatchError(
                f"plane {name!r} in {store.path}: its {key!r} losses were computed on another batch or mode "
                f"({other[0]} != {fp}); choose another name (--name)"
            )
        covered = np.zeros(len(coeffs), dtype=bool)
        for r in rows:
            covered[r["start"] : r["start"] + len(r["loss"])] = True
        done_before += int(covered.sum())
        plans.append((key, obj, fp, np.nonzero(~covered)[0]))
    done = done_before
    commit = len(betas) if betas is not None else 16
    for key, obj, fp, todo in plans:
        if not todo.size:
            continue
        ev = _Evaluator(obj, plane.center, plane.directions, method, chunk)

        def write(start: int, losses: np.ndarray, key: str = key, fp: str = fp) -> None:
            store.write("plane_losses", {"name": name, "objective": key, "start": int(start), "loss": losses,
                                         "fingerprint": fp})

        _run_grid(ev, coeffs, max(commit, ev.chunk), progress, f"{name}: {key}", on_chunk=write, todo=todo,
                  done=done, total=total_points)
        done += int(todo.size)
        if ev.note:
            store.log_event(plane.step, "plane", f"plane {name!r} ({key}): {ev.note}")
    stored = load_plane(store.run(), name)
    return {k: LossGrid(stored.alphas, stored.betas, v, "stored") for k, v in stored.losses.items()}


@dataclass
class StoredPlane:
    """A plane as stored in a run (what the figures draw).

    Attributes:
        name, kind, dims, step, x_label, y_label, alphas, betas, explained_variance, markers, config:
            the ``planes`` row.
        losses: ``{objective: loss array}``, shaped ``(len(alphas), len(betas))`` for a plane and
            ``(len(alphas),)`` for a line; NaN at points not computed (yet).
        trajectory: ``plane_trajectory`` columns as arrays (``None`` without a trajectory).
    """

    name: str
    kind: str
    dims: int
    step: int | None
    x_label: str
    y_label: str | None
    alphas: np.ndarray
    betas: np.ndarray | None
    losses: dict[str, np.ndarray]
    trajectory: dict[str, np.ndarray] | None
    markers: dict[str, list[float]]
    explained_variance: np.ndarray | None
    config: dict[str, Any]

    def complete(self, objective: str = "probe") -> bool:
        """Whether every grid point of ``objective`` is stored."""
        loss = self.losses.get(objective)
        return loss is not None and not np.isnan(loss).any()


def list_planes(run: Run) -> list[str]:
    """Names of the planes and lines stored in ``run``, oldest first."""
    return [r["name"] for r in sorted(run.rows("planes"), key=lambda r: r["wall"])]


def load_plane(run: Run, name: str | None = None) -> StoredPlane:
    """Read a plane back from a run (the last one stored when ``name`` is ``None``).

    Raises:
        landscape.store.NoDataError: the run has no plane of that name (the message lists those it has).
    """
    with run.snapshot():
        if name is None:
            names = list_planes(run)
            if not names:
                raise NoDataError(f"run {run.path} has no planes (landscape plane writes them)")
            name = names[-1]
        rows = run.rows("planes", name=name)
        if not rows:
            names = list_planes(run)
            raise NoDataError(f"run {run.path} has no plane {name!r}; "
                              + (f"its planes: {', '.join(names)}" if names else "it has no planes"))
        row = rows[0]
        chunks = run.rows("plane_losses", name=name)
        traj_rows = run.rows("plane_trajectory", name=name)
    alphas, betas = row["alphas"], row["betas"]
    n = len(alphas) * (len(betas) if betas is not None else 1)
    flat: dict[str, np.ndarray] = {}
    for r in chunks:
        arr = flat.setdefault(r["objective"], np.full(n, np.nan))
        arr[r["start"] : r["start"] + len(r["loss"])] = r["loss"][: max(0, n - r["start"])]
    shape = (len(alphas), len(betas)) if betas is not None else (len(alphas),)
    losses = {k: v.reshape(shape) for k, v in flat.items()}
    traj = None
    if traj_rows:
        traj = {
            "alpha": np.array([r["alpha"] for r in traj_rows], dtype=np.float64),
            "beta": np.array([np.nan if r["beta"] is None else r["beta"] for r in traj_rows], dtype=np.float64),
            "residual": np.array([r["residual"] for r in traj_rows], dtype=np.float64),
            "loss": np.array([np.nan if r["loss"] is None else r["loss"] for r in traj_rows], dtype=np.float64),
            "step": np.array([r["step"] for r in traj_rows], dtype=object),
            "label": np.array([r["label"] for r in traj_rows], dtype=object),
        }
    return StoredPlane(name=row["name"], kind=row["kind"], dims=int(row["dims"]), step=row["step"],
                       x_label=row["x_label"], y_label=row["y_label"], alphas=alphas, betas=betas, losses=losses,
                       trajectory=traj, markers=row["markers"] or {}, explained_variance=row["explained_variance"],
                       config=row["config"] or {})
