"""landscape: loss-landscape diagnostics for PyTorch optimizers.

Measures, on the user's own model, the directional sharpness of every optimizer's update direction
(Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers"), the (L0, L1)
local smoothness along the real training trajectory (Crawshaw et al., "Robustness to Unbounded
Smoothness of Generalized SignSGD"), and the loss along each update direction.

Names are imported on first use (PEP 562), so that ``import landscape`` and the ``landscape``
command line start without importing torch, scipy or matplotlib; ``landscape.Probe`` and
``from landscape import Probe`` work as usual.

Example:
    >>> import torch, landscape as ls
    >>> model = torch.nn.Linear(3, 1)
    >>> batch = (torch.randn(8, 3), torch.randn(8, 1))
    >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), batch)
    >>> g = obj.grad()
    >>> res = ls.directional_sharpness(obj, {"gd": g})
    >>> res["gd"].value > 0
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from landscape._version import __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from landscape import linops, optim, planes, references, smoothness, tree
    from landscape.curvature import (
        Sharpness,
        TraceEstimate,
        directional_sharpness,
        hessian_trace,
        hvp,
        loss_along,
        top_eigenvalues,
    )
    from landscape.curvature_measure import CurvatureSettings
    from landscape.density import SpectralDensity, spectral_density
    from landscape.eigen import Eigenpairs, eigenvalues
    from landscape.layerwise import LayerSharpness, sharpness_by_layer
    from landscape.linops import (
        CURVATURES,
        CurvatureOperator,
        GGNOperator,
        HessianOperator,
        PreconditionedOperator,
        curvature_operator,
    )
    from landscape.measure import MeasureSettings, measure_step
    from landscape.objective import DeterminismError, MicroBatches, NonFiniteError, Objective
    from landscape.optim import PseudoUpdates
    from landscape.planes import (
        LossGrid,
        Plane,
        filter_normalize,
        interpolation,
        load_plane,
        loss_line,
        loss_plane,
        measure_plane,
        pca_plane,
        random_direction,
        random_plane,
        update_plane,
    )
    from landscape.probe import Probe
    from landscape.sinks import MLflowSink, Sink, TensorBoardSink, WandbSink, export_tensorboard
    from landscape.smoothness import (
        CoordinateSamples,
        L0L1Fit,
        LocalSmoothness,
        RobustSmoothness,
        coordinate_smoothness,
        fit_l0_l1,
        fit_per_layer,
        local_smoothness,
        robust_smoothness,
    )
    from landscape.stability import adam_preconditioner, preconditioned_sharpness, stability_threshold
    from landscape.store import Run, RunLockedError, RunMismatchError, RunStore, load_run
    from landscape.trace import hutchinson_trace, hutchpp_trace

#: Where each public name lives: ``{name: module}`` (a module itself when the name is a submodule).
_LAZY: dict[str, str] = {
    **{n: "landscape.curvature" for n in (
        "Sharpness", "TraceEstimate", "directional_sharpness", "hessian_trace", "hvp", "loss_along",
        "top_eigenvalues")},
    "CurvatureSettings": "landscape.curvature_measure",
    **{n: "landscape.density" for n in ("SpectralDensity", "spectral_density")},
    **{n: "landscape.eigen" for n in ("Eigenpairs", "eigenvalues")},
    **{n: "landscape.layerwise" for n in ("LayerSharpness", "sharpness_by_layer")},
    **{n: "landscape.linops" for n in (
        "CURVATURES", "CurvatureOperator", "GGNOperator", "HessianOperator", "PreconditionedOperator",
        "curvature_operator")},
    **{n: "landscape.stability" for n in ("adam_preconditioner", "preconditioned_sharpness", "stability_threshold")},
    **{n: "landscape.trace" for n in ("hutchinson_trace", "hutchpp_trace")},
    **{n: "landscape.measure" for n in ("MeasureSettings", "measure_step")},
    **{n: "landscape.objective" for n in ("DeterminismError", "MicroBatches", "NonFiniteError", "Objective")},
    "PseudoUpdates": "landscape.optim",
    **{n: "landscape.planes" for n in (
        "LossGrid", "Plane", "filter_normalize", "interpolation", "load_plane", "loss_line", "loss_plane",
        "measure_plane", "pca_plane", "random_direction", "random_plane", "update_plane")},
    "Probe": "landscape.probe",
    **{n: "landscape.sinks" for n in ("MLflowSink", "Sink", "TensorBoardSink", "WandbSink", "export_tensorboard")},
    **{n: "landscape.smoothness" for n in (
        "CoordinateSamples", "L0L1Fit", "LocalSmoothness", "RobustSmoothness", "coordinate_smoothness",
        "fit_l0_l1", "fit_per_layer", "local_smoothness", "robust_smoothness")},
    **{n: "landscape.store" for n in ("Run", "RunLockedError", "RunMismatchError", "RunStore", "load_run")},
}
_SUBMODULES = ("distributed", "linops", "optim", "planes", "references", "smoothness", "tree")

__all__ = [
    "__version__",
    # the function being measured
    "Objective",
    "MicroBatches",
    "DeterminismError",
    "NonFiniteError",
    # curvature
    "hvp",
    "directional_sharpness",
    "Sharpness",
    "loss_along",
    "top_eigenvalues",
    "hessian_trace",
    "TraceEstimate",
    # curvature matrices as operators (Hessian, Gauss–Newton) and their spectra
    "linops",
    "CURVATURES",
    "curvature_operator",
    "CurvatureOperator",
    "HessianOperator",
    "GGNOperator",
    "PreconditionedOperator",
    "eigenvalues",
    "Eigenpairs",
    "hutchinson_trace",
    "hutchpp_trace",
    "spectral_density",
    "SpectralDensity",
    "sharpness_by_layer",
    "LayerSharpness",
    # edge of stability
    "preconditioned_sharpness",
    "adam_preconditioner",
    "stability_threshold",
    # smoothness
    "smoothness",
    "local_smoothness",
    "LocalSmoothness",
    "fit_l0_l1",
    "L0L1Fit",
    "coordinate_smoothness",
    "CoordinateSamples",
    "fit_per_layer",
    "robust_smoothness",
    "RobustSmoothness",
    # planes and lines (Li et al. 2018; Goodfellow et al. 2015)
    "planes",
    "loss_plane",
    "loss_line",
    "LossGrid",
    "Plane",
    "random_plane",
    "random_direction",
    "filter_normalize",
    "update_plane",
    "pca_plane",
    "interpolation",
    "measure_plane",
    "load_plane",
    # optimizers as transforms, pseudo-updates
    "optim",
    "PseudoUpdates",
    # runs
    "Probe",
    "MeasureSettings",
    "CurvatureSettings",
    "measure_step",
    "RunStore",
    "Run",
    "RunMismatchError",
    "RunLockedError",
    "load_run",
    # experiment trackers (landscape.sinks; the optimizer race is landscape.race.race)
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "MLflowSink",
    "export_tensorboard",
    # helpers
    "tree",
    "references",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"landscape.{name}")
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'landscape' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
