"""Optimizers as pure, composable transforms over ``dict[str, Tensor]`` (optax style), every
optimizer of the seeds as a named recipe, pseudo-updates on a real trajectory, and a
``torch.optim.Optimizer`` for any recipe.

Example:
    >>> import torch, landscape as ls
    >>> tx = ls.optim.chain(ls.optim.clip_top(0.1), ls.optim.trace(0.9))   # == recipe("sgd_clip")
    >>> params = {"w": torch.zeros(10)}
    >>> state = tx.init(params)
    >>> u, state = tx.update({"w": torch.arange(10.0)}, state)
    >>> u["w"].max().item()   # the top 10% (one coordinate, 9) clipped to τ = 9, times 1 − β
    0.9000000357627869
"""

from landscape.optim._atoms import (
    clip_by_block_rms,
    clip_norm,
    clip_top,
    clip_value,
    lion_momentum,
    normalize,
    normalize_rms,
    scale_by_adam,
    scale_by_factored_rms,
    scale_by_relative_step,
    scale_by_rms,
    sign,
    top_k_threshold,
    trace,
)
from landscape.optim._core import Transform, chain
from landscape.optim.pseudo import PseudoUpdates
from landscape.optim.recipes import (
    REGISTRY,
    RecipeSpec,
    describe_recipes,
    format_recipes,
    recipe,
    recipe_names,
)
from landscape.optim.torch_optimizer import RecipeOptimizer

__all__ = [
    # transforms
    "Transform",
    "chain",
    # atoms
    "trace",
    "scale_by_adam",
    "scale_by_rms",
    "scale_by_factored_rms",
    "clip_by_block_rms",
    "scale_by_relative_step",
    "lion_momentum",
    "sign",
    "normalize",
    "normalize_rms",
    "clip_top",
    "clip_value",
    "clip_norm",
    "top_k_threshold",
    # recipes
    "REGISTRY",
    "RecipeSpec",
    "recipe",
    "recipe_names",
    "describe_recipes",
    "format_recipes",
    # running them
    "PseudoUpdates",
    "RecipeOptimizer",
]
