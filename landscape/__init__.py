"""landscape: loss-landscape diagnostics for PyTorch optimizers.

Measures, on the user's own model, the directional sharpness of every optimizer's update direction
(Pan & Li, "Toward Understanding Why Adam Converges Faster Than SGD for Transformers"), the (L0, L1)
local smoothness along the real training trajectory (Crawshaw et al., "Robustness to Unbounded
Smoothness of Generalized SignSGD"), and the loss along each update direction.

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

from landscape import linops, optim, planes, smoothness, tree
from landscape._version import __version__
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
    # helpers
    "tree",
]
