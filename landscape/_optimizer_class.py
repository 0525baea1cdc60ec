"""Which ``torch.optim`` class wrote an optimizer state: a saved ``state_dict`` stores no class name,
but every class has its own set of parameter-group keys (SGD: ``momentum``, ``dampening``,
``nesterov``; Adam: ``betas``, ``amsgrad``; NAdam: ``momentum_decay``; ...). ``landscape analyze``
uses this to name the optimizer of a checkpoint run.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any

__all__ = ["optimizer_class_from_state"]

#: Switches that say how a class computes, not what: left out of the comparison (older torch
#: versions lack some of them).
_IMPLEMENTATION = frozenset(("foreach", "capturable", "differentiable", "fused", "maximize",
                             "decoupled_weight_decay", "params"))


@functools.cache
def _signatures() -> dict[str, tuple[frozenset[str], dict[str, Any]]]:
    """``{class name: (parameter-group keys, default group)}`` of every ``torch.optim`` optimizer."""
    import torch

    out: dict[str, tuple[frozenset[str], dict[str, Any]]] = {}
    for name, cls in vars(torch.optim).items():
        if not (inspect.isclass(cls) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
            continue
        group = None
        for shape in ((2, 2), (2,)):
            try:
                group = cls([torch.nn.Parameter(torch.zeros(shape))], lr=0.1).param_groups[0]
                break
            except Exception:  # noqa: BLE001 - an optimizer that needs other arguments or shapes
                continue
        if group is not None:
            out[name] = (frozenset(group) - {"params"}, dict(group))
    return out


def _unique(matches: list[str], hyperparameters: Mapping[str, Any]) -> str | None:
    if len(matches) > 1 and "decoupled_weight_decay" in hyperparameters:
        flag = bool(hyperparameters["decoupled_weight_decay"])
        matches = [m for m in matches if bool(_signatures()[m][1].get("decoupled_weight_decay", False)) == flag]
    if len(matches) == 1:
        return matches[0]
    return " or ".join(sorted(matches)) if matches else None


def optimizer_class_from_state(hyperparameters: Mapping[str, Any]) -> str | None:
    """The ``torch.optim`` class whose parameter groups have these keys, or ``None``.

    Tried in order: the same keys; the same keys once implementation switches (``foreach``,
    ``fused``, ``decoupled_weight_decay``...) are set aside, for a state saved by another torch
    version; the one class whose keys contain these with the fewest left over (a reader may have
    dropped values it could not store, such as Adafactor's ``eps`` pair).

    Args:
        hyperparameters: the first parameter group of a saved optimizer state (its keys matter).

    Returns:
        The class name (``"AdamW"``), ``"Adam or AdamW"`` when the keys cannot tell them apart (a
        state from a torch without ``decoupled_weight_decay``), or ``None`` when no class matches
        (a custom optimizer).
    """
    keys = frozenset(hyperparameters) - {"params"}
    if not keys or "lr" not in keys:
        return None
    sigs = _signatures()
    exact = [n for n, (sig, _) in sigs.items() if sig == keys]
    if exact:
        return _unique(exact, hyperparameters)
    defining = keys - _IMPLEMENTATION
    loose = [n for n, (sig, _) in sigs.items() if sig - _IMPLEMENTATION == defining]
    if loose:
        return _unique(loose, hyperparameters)
    supersets = [(len(sig - keys), n) for n, (sig, _) in sigs.items() if sig >= keys]
    if supersets:
        fewest = min(k for k, _ in supersets)
        names = [n for k, n in supersets if k == fewest]
        if len(names) == 1 and fewest <= 2:
            return names[0]
    return None
