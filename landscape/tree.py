"""Helpers for the one pytree convention of ``landscape``: ``dict[str, Tensor]``.

Parameters, gradients, update directions and Hessian-vector products are all dictionaries keyed by
parameter name (the names of ``model.named_parameters()``). Every helper here is pure: it returns new
tensors and never modifies its inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import Tensor

Tree = dict[str, Tensor]

__all__ = [
    "Tree",
    "add",
    "axpy",
    "check_same_keys",
    "clone",
    "dot",
    "flatten",
    "is_finite",
    "map",
    "nonfinite_names",
    "norm",
    "normalize",
    "numel",
    "nbytes",
    "rademacher_like",
    "randn_like",
    "scale",
    "sub",
    "to",
    "unflatten",
    "zeros_like",
]


def check_same_keys(a: Mapping[str, Tensor], b: Mapping[str, Tensor], what: str = "trees") -> None:
    """Raise ``KeyError`` naming the keys that differ between two trees."""
    if a.keys() != b.keys():
        missing = sorted(set(a) - set(b))
        extra = sorted(set(b) - set(a))
        raise KeyError(f"{what} have different keys: only in first {missing}, only in second {extra}")


def map(fn: Callable[..., Tensor], tree: Mapping[str, Tensor], *rest: Mapping[str, Tensor]) -> Tree:  # noqa: A001
    """Apply ``fn`` leaf-wise: ``{k: fn(tree[k], *(r[k] for r in rest))}``."""
    for r in rest:
        check_same_keys(tree, r)
    return {k: fn(v, *(r[k] for r in rest)) for k, v in tree.items()}


def add(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    return map(torch.add, a, b)


def sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tree:
    return map(torch.sub, a, b)


def scale(a: Mapping[str, Tensor], s: float | Tensor) -> Tree:
    return {k: v * s for k, v in a.items()}


def axpy(alpha: float | Tensor, x: Mapping[str, Tensor], y: Mapping[str, Tensor]) -> Tree:
    """Return ``y + alpha * x`` leaf-wise."""
    return map(lambda xv, yv: yv.add(xv, alpha=alpha) if not isinstance(alpha, Tensor) else yv + alpha * xv, x, y)


def zeros_like(a: Mapping[str, Tensor]) -> Tree:
    return {k: torch.zeros_like(v) for k, v in a.items()}


def clone(a: Mapping[str, Tensor]) -> Tree:
    """Detached copies of every leaf."""
    return {k: v.detach().clone() for k, v in a.items()}


def to(a: Mapping[str, Tensor], dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> Tree:
    return {k: v.to(dtype=dtype, device=device) for k, v in a.items()}


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """Inner product over all coordinates of all leaves, as a 0-dim tensor (float64 accumulation)."""
    check_same_keys(a, b)
    total = torch.zeros((), dtype=torch.float64)
    for k, v in a.items():
        total = total + torch.sum(v.double() * b[k].double()).cpu()
    return total


def norm(a: Mapping[str, Tensor]) -> Tensor:
    """Euclidean norm over all coordinates of all leaves (float64 accumulation)."""
    # per leaf ‖v‖ accumulated in float64 without a float64 copy of the leaf (that copy cost a GPT-2
    # small training step's gradient 0.7 s on a CPU), then the root of the sum of their squares
    total = torch.zeros((), dtype=torch.float64)
    for v in a.values():
        if v.numel():
            total = total + torch.linalg.vector_norm(v.detach(), dtype=torch.float64).cpu() ** 2
    return total.sqrt()


def normalize(a: Mapping[str, Tensor]) -> tuple[Tree, float]:
    """Return ``(a / ‖a‖₂, ‖a‖₂)``. Raises ``ValueError`` for a zero or non-finite tree."""
    n = float(norm(a))
    if not math.isfinite(n) or n == 0.0:
        raise ValueError(f"cannot normalise a direction with norm {n}: it must be finite and non-zero")
    return {k: v / n for k, v in a.items()}, n


def numel(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in a.values())


def nbytes(a: Mapping[str, Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in a.values())


def is_finite(a: Mapping[str, Tensor]) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in a.values())


def nonfinite_names(a: Mapping[str, Tensor]) -> list[str]:
    """Names of the leaves holding a NaN or an infinity."""
    return [k for k, v in a.items() if not bool(torch.isfinite(v).all())]


def flatten(a: Mapping[str, Tensor], names: Iterable[str] | None = None) -> Tensor:
    """Concatenate the leaves (in ``names`` order, default insertion order) into one 1-D tensor."""
    keys = list(a) if names is None else list(names)
    if not keys:
        return torch.zeros(0)
    return torch.cat([a[k].reshape(-1) for k in keys])


def unflatten(vec: Tensor, like: Mapping[str, Tensor]) -> Tree:
    """Inverse of :func:`flatten`: split ``vec`` into leaves shaped like ``like`` (its order)."""
    total = numel(like)
    if vec.numel() != total:
        raise ValueError(f"vector has {vec.numel()} entries, the tree has {total}")
    out: Tree = {}
    i = 0
    for k, v in like.items():
        out[k] = vec[i : i + v.numel()].reshape(v.shape).to(dtype=v.dtype, device=v.device)
        i += v.numel()
    return out


def randn_like(a: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tree:
    """Standard normal leaves shaped like ``a`` (drawn on CPU from ``generator``, then moved)."""
    return {
        k: torch.randn(v.shape, generator=generator, dtype=v.dtype if v.is_floating_point() else torch.float32).to(v.device)
        for k, v in a.items()
    }


def rademacher_like(a: Mapping[str, Tensor], generator: torch.Generator | None = None) -> Tree:
    """Random ±1 leaves shaped like ``a`` (drawn on CPU from ``generator``, then moved)."""
    return {
        k: torch.randint(0, 2, v.shape, generator=generator, dtype=v.dtype).mul_(2).sub_(1).to(v.device)
        for k, v in a.items()
    }
