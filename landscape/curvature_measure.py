"""The curvature measurements the probe and ``landscape analyze`` record at their own cadence:
eigenvalues (top, bottom, per block), traces with standard errors, spectral densities, the
preconditioned sharpness of Adam-family optimizers, and the per-layer decomposition of every
direction's sharpness, each for the Hessian and/or the Gauss–Newton matrix.

All of it is off by default: switch it on with ``MeasureSettings(curvature=CurvatureSettings(...))``.
At a measured step every quantity that is due shares one operator per matrix (one retained graph).
A quantity that fails (a model whose output cannot be split for the Gauss–Newton matrix, say) is
skipped with an event in the run store; the step's other measurements are kept.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from torch import Tensor

from landscape.density import spectral_density
from landscape.eigen import DEFAULT_TOL, eigenvalues
from landscape.layerwise import sharpness_by_layer
from landscape.linops import CURVATURES, curvature_operator
from landscape.stability import preconditioned_sharpness
from landscape.trace import hutchinson_trace, hutchpp_trace

__all__ = ["CurvatureSettings", "TRACE_METHODS", "measure_curvature"]

TRACE_METHODS = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace}


@dataclass
class CurvatureSettings:
    """What curvature is measured, and how often (in measurements: ``every=5`` is every fifth
    measured step, the first included; 0 is off).

    Attributes:
        curvatures: the matrices of the eigenvalues, traces, densities and layer decompositions:
            ``("hessian",)``, ``("ggn",)`` or both.
        ggn_output: the submodule (dotted name) whose output splits the loss for the Gauss–Newton
            matrix (default: the model's own output).
        eig_every: eigenvalues every this many measurements.
        eig_k: how many of the largest eigenvalues.
        eig_bottom: how many of the most negative.
        eig_by: also per block: ``"layer"`` or ``"tensor"`` (``None``: the whole matrix only).
        eig_tol: relative residual of the eigenvalues (``‖Av − λv‖ ≤ tol·‖A‖``).
        trace_every: traces every this many measurements.
        trace_methods: ``"hutch++"`` and/or ``"hutchinson"``.
        trace_samples: products per trace estimate.
        density_every: SLQ spectral density every this many measurements.
        density_vectors: Lanczos runs of the density.
        density_steps: Lanczos steps per run.
        precond_every: preconditioned sharpness ``λ_max(P⁻¹H)`` every this many measurements, for each
            Adam-family recipe in ``precond_recipes`` and for the trained optimizer when it is
            ``torch.optim.Adam``/``AdamW`` (the probe only).
        precond_recipes: recipes whose second-moment state gives ``P``.
        layers_every: per-layer decomposition of every direction's sharpness every this many
            measurements (one product per direction).
        layers_by: its blocks (``"layer"`` or ``"tensor"``).
        layers_diagonal: also each block's own part ``û_bᵀ A_bb û_b`` (one product per block).
        seed: seeds the random vectors.
    """

    curvatures: tuple[str, ...] = ("hessian",)
    ggn_output: str | None = None
    eig_every: int = 0
    eig_k: int = 1
    eig_bottom: int = 1
    eig_by: str | None = None
    eig_tol: float = DEFAULT_TOL
    trace_every: int = 0
    trace_methods: tuple[str, ...] = ("hutch++",)
    trace_samples: int = 99
    density_every: int = 0
    density_vectors: int = 1
    density_steps: int = 90
    precond_every: int = 0
    precond_recipes: tuple[str, ...] = ("adam",)
    layers_every: int = 0
    layers_by: str = "layer"
    layers_diagonal: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        self.curvatures = tuple(self.curvatures)
        self.trace_methods = tuple(self.trace_methods)
        self.precond_recipes = tuple(self.precond_recipes)
        bad = [c for c in self.curvatures if c not in CURVATURES]
        if bad or not self.curvatures:
            raise ValueError(f"curvatures must be a non-empty subset of {list(CURVATURES)}, got {list(self.curvatures)}")
        bad = [m for m in self.trace_methods if m not in TRACE_METHODS]
        if bad:
            raise ValueError(f"trace_methods must be among {list(TRACE_METHODS)}, got {bad}")
        for name in ("eig_every", "trace_every", "density_every", "precond_every", "layers_every"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
        if self.eig_k < 0 or self.eig_bottom < 0 or self.eig_k + self.eig_bottom == 0:
            raise ValueError(f"eig_k and eig_bottom must be non-negative, not both zero, got {self.eig_k}, {self.eig_bottom}")
        if self.eig_by not in (None, "layer", "tensor"):
            raise ValueError(f"eig_by must be None, 'layer' or 'tensor', got {self.eig_by!r}")
        if self.layers_by not in ("layer", "tensor"):
            raise ValueError(f"layers_by must be 'layer' or 'tensor', got {self.layers_by!r}")
        if self.trace_samples < 3:
            raise ValueError(f"trace_samples must be at least 3, got {self.trace_samples}")

    def due(self, what: str, index: int) -> bool:
        every = getattr(self, f"{what}_every")
        return bool(every) and index % every == 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _eig_rows(step: int, res: Any, block: str) -> list[dict[str, Any]]:
    rows = []
    for which, vals, resid in (("top", res.top, res.top_residuals), ("bottom", res.bottom, res.bottom_residuals)):
        for rank, (v, r) in enumerate(zip(vals, resid)):
            rows.append({"step": step, "curvature": res.curvature, "block": block, "which": which, "rank": rank,
                         "value": float(v), "residual": float(r), "converged": bool(res.converged),
                         "n_products": int(res.n_products)})
    return rows


def measure_curvature(
    objective: Any,
    step: int,
    x_t: Mapping[str, Tensor],
    directions: Mapping[str, Mapping[str, Tensor]],
    settings: CurvatureSettings,
    *,
    measurement_index: int = 0,
    preconditioners: Mapping[str, Mapping[str, Tensor]] | None = None,
) -> tuple[dict[str, list[dict[str, Any]]], list[str], dict[str, float]]:
    """The rows of the curvature tables due at this measurement.

    Args:
        objective: the probe-batch objective.
        step: the step number of every row.
        x_t: the point.
        directions: ``{name: u}`` for the per-layer decomposition.
        settings: what to measure.
        measurement_index: counts measurements (for the ``*_every`` cadences).
        preconditioners: ``{name: P}`` for the preconditioned sharpness.

    Returns:
        ``(rows by table, event messages, timings)``.
    """
    st = settings
    i = measurement_index
    rows: dict[str, list[dict[str, Any]]] = {}
    events: list[str] = []
    timings: dict[str, float] = {}
    wanted = [w for w in ("eig", "trace", "density", "layers") if st.due(w, i)]
    at = {n: x_t[n] for n in objective.names}
    for curvature in st.curvatures if wanted else ():
        options = {"output": st.ggn_output} if curvature == "ggn" and st.ggn_output else {}
        try:
            op = curvature_operator(objective, curvature, at, **options)
        except (ValueError, RuntimeError, TypeError) as e:
            events.append(f"{curvature}: not measured: {e}")
            continue
        with op:
            for what in wanted:
                t0 = time.perf_counter()
                try:
                    if what == "eig":
                        res = eigenvalues(op, k=st.eig_k, bottom=st.eig_bottom, tol=st.eig_tol, seed=st.seed)
                        out = _eig_rows(step, res, "all")
                        if st.eig_by is not None:
                            for block, r in eigenvalues(op, k=st.eig_k, bottom=st.eig_bottom, by=st.eig_by,
                                                        tol=st.eig_tol, seed=st.seed).items():
                                out += _eig_rows(step, r, block)
                        rows.setdefault("eigenvalues", []).extend(out)
                    elif what == "trace":
                        for method in st.trace_methods:
                            est = TRACE_METHODS[method](op, st.trace_samples, seed=st.seed)
                            rows.setdefault("trace", []).append({
                                "step": step, "curvature": curvature, "method": method, "estimate": est.mean,
                                "stderr": est.stderr, "n_products": est.n_products})
                    elif what == "density":
                        d = spectral_density(op, n_vectors=st.density_vectors, steps=st.density_steps, seed=st.seed)
                        rows.setdefault("density", []).append({
                            "step": step, "curvature": curvature, "nodes": d.nodes, "weights": d.weights,
                            "n_vectors": d.n_vectors, "steps": d.steps, "n_params": d.size})
                    elif what == "layers" and directions:
                        dec = sharpness_by_layer(op, directions, by=st.layers_by, diagonal=st.layers_diagonal)
                        for name, r in dec.items():
                            for block, c in r.contributions.items():
                                rows.setdefault("sharpness_layers", []).append({
                                    "step": step, "direction": name, "curvature": curvature, "block": block,
                                    "contribution": c, "mass": r.mass[block],
                                    "diagonal": r.diagonal[block] if r.diagonal is not None else None})
                except (ValueError, RuntimeError, TypeError, KeyError) as e:
                    events.append(f"{curvature} {what}: not measured: {type(e).__name__}: {e}")
                timings[f"{curvature} {what}"] = time.perf_counter() - t0
    if st.due("precond", i) and preconditioners:
        t0 = time.perf_counter()
        with curvature_operator(objective, "hessian", at) as op:
            for name, P in preconditioners.items():
                try:
                    res = preconditioned_sharpness(op, P, tol=st.eig_tol, seed=st.seed)
                except (ValueError, KeyError) as e:
                    events.append(f"preconditioned sharpness of {name}: not measured: {e}")
                    continue
                rows.setdefault("preconditioned", []).append({
                    "step": step, "optimizer": name, "curvature": "hessian", "value": float(res.top[0]),
                    "residual": float(res.top_residuals[0]), "converged": bool(res.converged),
                    "n_products": int(res.n_products)})
        timings["preconditioned"] = time.perf_counter() - t0
    return rows, events, timings
