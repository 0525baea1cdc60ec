"""A real ``torch.optim.Optimizer`` for any recipe, so the seeds' convergence experiments (Pan & Li 2023
Fig. 6, Crawshaw et al. 2022, Table 1) can be run with exactly the math the pseudo-updates measure."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from landscape.optim._core import Ctx, Evaluation, Program, Transform, compute_dtype
from landscape.optim.recipes import recipe as _recipe

__all__ = ["RecipeOptimizer"]


class RecipeOptimizer(torch.optim.Optimizer):
    """Train with a recipe: ``x ← x − lr·u`` with ``u`` the recipe's update for the current gradients.

    The step runs the same atoms as :class:`~landscape.optim.PseudoUpdates` (no second copy of the
    math). Clipping with a global scope (the default) takes its threshold over every parameter of the
    optimizer, across param groups. States live in ``self.state[p]`` under their state keys (e.g.
    ``"ema(beta=0.9)[g]"``) with a per-parameter ``"step"``, so ``state_dict``/``load_state_dict``
    work as for any ``torch.optim`` optimizer.

    Args:
        params: parameters or param groups, as for any ``torch.optim`` optimizer.
        recipe: a recipe name (see ``landscape recipes``) or a :class:`~landscape.optim.Transform`
            chained from atoms.
        lr: learning rate η.
        weight_decay: L2 coefficient λ. Added to the gradient before the recipe (``g + λx``, the
            ``torch.optim.SGD``/``Adam`` convention) unless ``decoupled_weight_decay``, then
            ``x ← x·(1 − ηλ)`` before the step (the ``AdamW`` convention).
        decoupled_weight_decay: see ``weight_decay``.
        **overrides: hyperparameters of a named recipe (``beta``, ``clip``, ...).

    Example:
        >>> import torch, landscape as ls
        >>> w = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
        >>> opt = ls.optim.RecipeOptimizer([w], "sgd_clip", lr=0.2, clip=0.5)
        >>> for _ in range(100):
        ...     opt.zero_grad()
        ...     (w ** 2).sum().backward()
        ...     opt.step()
        >>> bool(w.abs().max() < 0.05)
        True
    """

    def __init__(
        self,
        params: Any,
        recipe: str | Transform,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        decoupled_weight_decay: bool = False,
        **overrides: Any,
    ) -> None:
        if isinstance(lr, Tensor):
            lr = float(lr)
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if isinstance(recipe, str):
            tx = _recipe(recipe, **overrides)
        elif isinstance(recipe, Transform):
            if overrides:
                raise TypeError(f"hyperparameters {sorted(overrides)} can only be given with a recipe name")
            tx = recipe
        else:
            raise TypeError(f"recipe must be a recipe name or a Transform, got {type(recipe).__name__}")
        if tx.atoms is None:
            raise TypeError(
                "RecipeOptimizer needs a Transform chained from landscape.optim atoms (its states are stored "
                "per parameter); a custom Transform(init, update) can be used with PseudoUpdates"
            )
        defaults = {"lr": lr, "weight_decay": weight_decay, "decoupled_weight_decay": bool(decoupled_weight_decay)}
        super().__init__(params, defaults)
        self.transform = tx
        self._program = Program({"u": tx.atoms})

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("decoupled_weight_decay", False)

    def _init_state(self, key: str, p: Tensor, state: dict[str, Any]) -> None:
        state["step"] = torch.tensor(0.0)
        for mkey, tree in self._program.init({key: p}).items():
            for leaf, v in tree.items():
                state[mkey + leaf[len(key) :]] = v

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One step for every parameter with a gradient."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grads: dict[str, Tensor] = {}
        params: dict[str, Tensor] = {}
        steps: dict[str, int] = {}
        where: dict[str, tuple[dict[str, Any], Tensor]] = {}
        moments: dict[str, dict[str, Tensor]] = {mkey: {} for mkey in self._program.moments}
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RecipeOptimizer does not support sparse gradients")
                key = f"{gi}.{pi}"
                g = p.grad
                if group["weight_decay"] and not group["decoupled_weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if len(state) == 0:
                    self._init_state(key, p, state)
                grads[key] = g.detach().to(compute_dtype(g.dtype))
                params[key] = p
                steps[key] = int(state["step"]) + 1
                where[key] = (group, p)
                for mkey, (kind, _) in self._program.moments.items():
                    for leaf in kind.leaf_shapes(key, p.shape):
                        moments[mkey][leaf] = state[mkey + leaf[len(key) :]]
        if not grads:
            return loss
        ev = Evaluation(self._program, moments, grads, Ctx(step=steps, params=params), update=True)
        ev.update_all()
        u = ev.output("u")
        for key, (group, p) in where.items():
            lr, wd = group["lr"], group["weight_decay"]
            if wd and group["decoupled_weight_decay"]:
                p.mul_(1.0 - lr * wd)
            p.add_(u[key].to(p.dtype), alpha=-lr)
            self.state[p]["step"] += 1
        return loss
