"""The registry of named recipes: every optimizer of the seeds as a short chain of atoms.

One table (:data:`REGISTRY`) drives :func:`recipe`, :class:`~landscape.optim.PseudoUpdates`' default
set, the tests and ``landscape recipes``. Hyperparameters carry the seeds' names: ``beta`` (momentum),
``beta1``/``beta2``/``eps`` (Adam, Lion, Generalized SignSGD), ``clip`` (fraction of coordinates
clipped), ``per_tensor`` (scope of the clipping or normalisation), ``alpha`` (value/norm-clipping
threshold), and Adafactor's ``decay_rate``, ``eps1``, ``eps2``, ``d``, ``relative_step``.

Where the seeds leave room, the choices made here:

* Adam is Kingma & Ba's bias-corrected rule with ε outside the root (``torch.optim.Adam``'s), not
  Algorithm 6's shorthand ``m/√(v+ε)``; Cesista's (2025) identity needs the bias correction.
* Numerator-only clipping (``adam_clip``, ``adafactor_clip``) follows App. B.2's text: the second
  moment sees the raw gradient (Algorithm 6's box writes ĝ² there).
* Adafactor has no first moment (Algorithms 7-8 have none) and, by default, a fixed learning rate in
  place of α_t (App. B.2 allows both); ``relative_step=True`` folds ``max(ε₂, RMS(x))·min(10⁻², 1/√t)``
  into the direction, which is exactly ``torch.optim.Adafactor(lr=1e-2)`` up to where ε₁ enters.
* ``gensignsgd``: Crawshaw et al. (2022) tune β2 by grid search and state no default; 0.5 satisfies Theorem 1's
  ``√β2 < β1`` with margin. ε = 0 as in Algorithm 1 (0/0 := 0).
* ``adam_valueclip``/``adam_normclip``: Cesista (2025) takes α → 0; the defaults (1e-6 per coordinate, 1e-3
  for the whole-model norm) clip essentially every coordinate / every step of a typical network.
  When all coordinates are clipped, v̂ = α² exactly, so ε only rescales the direction.
* ``lion_clip_update`` clips the interpolation ``β1 m + (1−β1) g`` in place of taking its sign.
* Clipping and normalisation act over all coordinates of the model unless ``per_tensor=True``;
  ``normsgd`` is per tensor by definition (Algorithm 4).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from landscape.optim._atoms import (
    _check_beta,
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
    trace,
)
from landscape.optim._core import Transform, chain

__all__ = ["REGISTRY", "RecipeSpec", "describe_recipes", "format_recipes", "recipe", "recipe_names"]


@dataclass(frozen=True)
class RecipeSpec:
    """A named recipe: its rule in words, where it comes from, and a builder whose keyword defaults
    are the seeds' hyperparameters."""

    name: str
    rule: str
    source: str
    build: Callable[..., Transform]

    @property
    def defaults(self) -> MappingProxyType:
        sig = inspect.signature(self.build)
        return MappingProxyType({k: p.default for k, p in sig.parameters.items()})

    def __call__(self, **overrides: Any) -> Transform:
        unknown = sorted(set(overrides) - set(self.defaults))
        if unknown:
            raise TypeError(
                f"recipe {self.name!r} has no hyperparameter {', '.join(map(repr, unknown))}; "
                f"valid: {', '.join(self.defaults) or '(none)'}"
            )
        tx = self.build(**{**self.defaults, **overrides})
        return Transform(init=tx.init, update=tx.update, atoms=tx.atoms, name=self.name)


REGISTRY: dict[str, RecipeSpec] = {}


def _register(name: str, rule: str, source: str) -> Callable[[Callable[..., Transform]], Callable[..., Transform]]:
    def deco(fn: Callable[..., Transform]) -> Callable[..., Transform]:
        REGISTRY[name] = RecipeSpec(name=name, rule=rule, source=source, build=fn)
        return fn

    return deco


# --- SGD family (Pan & Li 2023, Algorithms 3-5) ---------------------------------------------------------


@_register("sgd", "m = βm + (1−β)g; u = m", "Pan & Li 2023, Alg. 3")
def _sgd(beta=0.9):
    return chain(trace(beta))


@_register("sgd_clip", "as sgd on clip(g), the top `clip` fraction of |g| clipped to τ", "Pan & Li 2023, Alg. 3, App. B.2")
def _sgd_clip(beta=0.9, clip=0.1, per_tensor=False):
    return chain(clip_top(clip, per_tensor), trace(beta))


@_register("normsgd", "m = βm + (1−β)g; u = m/‖m‖·√numel per tensor", "Pan & Li 2023, Alg. 4")
def _normsgd(beta=0.9):
    return chain(trace(beta), normalize_rms())


@_register("normsgd_clip", "as normsgd on clip(g)", "Pan & Li 2023, Alg. 4, App. B.2")
def _normsgd_clip(beta=0.9, clip=0.1, per_tensor=False):
    return chain(clip_top(clip, per_tensor), trace(beta), normalize_rms())


@_register("signsgd", "m = βm + (1−β)g; u = sign(m)", "Pan & Li 2023, Alg. 5")
def _signsgd(beta=0.9):
    return chain(trace(beta), sign())


# --- Adam (Pan & Li 2023, Algorithm 6) --------------------------------------------------------------------


@_register("adam", "u = m̂/(√v̂ + ε), m, v EMAs of g, g² (bias-corrected)", "Pan & Li 2023, Alg. 6")
def _adam(beta1=0.9, beta2=0.999, eps=1e-8):
    return chain(scale_by_adam(beta1, beta2, eps))


@_register("adam_clip", "Adam with clip(g) in m only, raw g² in v", "Pan & Li 2023, Alg. 6, App. B.2")
def _adam_clip(beta1=0.9, beta2=0.999, eps=1e-8, clip=0.5, per_tensor=False):
    return chain(clip_top(clip, per_tensor), scale_by_adam(beta1, beta2, eps, second_moment_of="raw"))


@_register("adam_clip_update", "u = clip(Adam update)", "Pan & Li 2023, App. B.2")
def _adam_clip_update(beta1=0.9, beta2=0.999, eps=1e-8, clip=0.5, per_tensor=False):
    return chain(scale_by_adam(beta1, beta2, eps), clip_top(clip, per_tensor))


# --- Adafactor (Pan & Li 2023, Algorithms 7 and 8) -------------------------------------------------------


def _adafactor_tail(d, relative_step, eps2):
    return [clip_by_block_rms(d)] + ([scale_by_relative_step(eps2)] if relative_step else [])


@_register(
    "adafactor",
    "U = G/√V̂ (V̂ = RC/1ᵀR for matrices, EMA of G²+ε₁ for vectors, β̂ = 1 − t^decay_rate); u = U/max(1, RMS(U)/d)",
    "Pan & Li 2023, Alg. 7, 8",
)
def _adafactor(decay_rate=-0.8, eps1=1e-30, d=1.0, relative_step=False, eps2=1e-3):
    return chain(scale_by_factored_rms(decay_rate, eps1), *_adafactor_tail(d, relative_step, eps2))


@_register("adafactor_clip", "Adafactor with clip(G) in the numerator only", "Pan & Li 2023, Alg. 7, 8, App. B.2")
def _adafactor_clip(decay_rate=-0.8, eps1=1e-30, d=1.0, relative_step=False, eps2=1e-3, clip=0.5, per_tensor=False):
    return chain(
        clip_top(clip, per_tensor),
        scale_by_factored_rms(decay_rate, eps1, second_moment_of="raw"),
        *_adafactor_tail(d, relative_step, eps2),
    )


# --- Lion (Pan & Li 2023, Algorithm 9) --------------------------------------------------------------------


@_register("lion", "u = sign(β1 m + (1−β1)g); m = β2 m + (1−β2)g", "Pan & Li 2023, Alg. 9")
def _lion(beta1=0.9, beta2=0.99):
    return chain(lion_momentum(beta1, beta2), sign())


@_register("lion_clip_update", "u = clip(β1 m + (1−β1)g) instead of the sign", "Pan & Li 2023, Alg. 9, App. B.2")
def _lion_clip_update(beta1=0.9, beta2=0.99, clip=0.5, per_tensor=False):
    return chain(lion_momentum(beta1, beta2), clip_top(clip, per_tensor))


# --- Crawshaw et al. 2022, -----------------------------------------------------------------------------------------


@_register("gensignsgd", "m = β1 m + (1−β1)g; v = β2 v + (1−β2)m²; u = m/(√v + ε)", "Crawshaw et al. 2022, Alg. 1")
def _gensignsgd(beta1=0.9, beta2=0.5, eps=0.0):
    return chain(trace(beta1), scale_by_rms(_check_beta("beta2", beta2), eps))


# --- smoothed SignSGD / NormSGD (Cesista 2025) ----------------------------------------------------


@_register("smoothed_signsgd", "m = βm + (1−β)sign(g); u = m", "Cesista 2025, “Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD”, Def. 1")
def _smoothed_signsgd(beta=0.9):
    return chain(sign(), trace(beta))


@_register("smoothed_normsgd", "m = βm + (1−β)g/‖g‖; u = m", "Cesista 2025, “Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD”, Def. 2")
def _smoothed_normsgd(beta=0.9, per_tensor=False):
    return chain(normalize(per_tensor), trace(beta))


@_register("adam_valueclip", "Adam on clamp(g, −α, α)", "Cesista 2025, “Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD”")
def _adam_valueclip(beta1=0.9, beta2=0.999, eps=1e-8, alpha=1e-6):
    return chain(clip_value(alpha), scale_by_adam(beta1, beta2, eps))


@_register("adam_normclip", "Adam on g·min(1, α/‖g‖)", "Cesista 2025, “Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD”")
def _adam_normclip(beta1=0.9, beta2=0.999, eps=1e-8, alpha=1e-3, per_tensor=False):
    return chain(clip_norm(alpha, per_tensor), scale_by_adam(beta1, beta2, eps))


# --------------------------------------------------------------------------------------------------


def recipe_names() -> list[str]:
    """Every registered recipe name, in the registry's order (DESIGN.md's table)."""
    return list(REGISTRY)


def recipe(name: str, **overrides: Any) -> Transform:
    """Build the named recipe with the seeds' defaults, optionally overriding hyperparameters.

    Args:
        name: one of :func:`recipe_names`.
        **overrides: hyperparameters, named as in the seeds (see :func:`describe_recipes`).

    Returns:
        A :class:`~landscape.optim.Transform` (a chain of atoms).

    Raises:
        KeyError: unknown name (the message lists the valid ones).
        TypeError: unknown hyperparameter for this recipe (the message lists the valid ones).
        ValueError: a hyperparameter out of range (e.g. ``beta`` outside ``[0, 1)``).

    Example:
        >>> import landscape as ls
        >>> ls.optim.recipe("sgd_clip", clip=0.001)
        Transform(sgd_clip: chain(clip_top(clip=0.001,per_tensor=False), trace(beta=0.9)))
    """
    spec = REGISTRY.get(name)
    if spec is None:
        raise KeyError(f"unknown recipe {name!r}; valid recipes: {', '.join(REGISTRY)}")
    return spec(**overrides)


def describe_recipes() -> list[dict[str, Any]]:
    """One dict per recipe: ``name``, ``rule`` (the formula in words), ``source`` (the work it comes
    from, cited by authors and year: :mod:`landscape.references`) and ``defaults`` (hyperparameter
    -> default)."""
    from landscape.references import translate

    return [
        {"name": s.name, "rule": s.rule, "source": translate(s.source), "defaults": dict(s.defaults)}
        for s in REGISTRY.values()
    ]


def format_recipes() -> str:
    """The text ``landscape recipes`` prints: every recipe with its rule, source and defaults."""
    rows = describe_recipes()
    width = max(len(r["name"]) for r in rows)
    lines = []
    for r in rows:
        lines.append(f"{r['name']:<{width}}  {r['rule']}")
        defaults = ", ".join(f"{k}={v!r}" for k, v in r["defaults"].items())
        lines.append(f"{'':<{width}}  [{r['source']}]  {defaults}")
    return "\n".join(lines)
