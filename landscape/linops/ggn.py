"""The generalized Gauss–Newton matrix ``G = Jᵀ H_ℓ J`` (Schraudolph 2002; Martens 2020, §6).

The loss is split at the output ``z`` of a module (by default the model itself): ``f(x) = ℓ(z(x))``
with ``J = ∂z/∂x`` and ``H_ℓ = ∂²ℓ/∂z²``. Then ``∇²f = G + Σₖ (∂ℓ/∂zₖ) ∇²zₖ``: the Gauss–Newton
matrix drops the second term, so for a convex ``ℓ`` (cross-entropy on logits, squared error) it is
positive semi-definite, and for a model linear in its parameters it equals the Hessian. Seed 002
(App. D) computes its robust smoothness on this matrix, with ``z`` the logits of BERT.

Each product ``G·v = Jᵀ (H_ℓ (J v))`` reuses one graph per micro-batch, built by one forward pass
whose output ``z`` is swapped (by a forward hook) for a leaf ``z̃``, so the loss part ``ℓ(z̃)`` and the
network part ``z(x)`` are separate graphs:

* ``J v``: ``jvp="reverse"`` (default) differentiates ``Jᵀu`` (built once, with ``create_graph``,
  for a dummy ``u``) with respect to ``u`` — a double backward, exact, and free of forward-mode AD;
  ``jvp="forward"`` pushes ``v`` through a fresh forward pass with dual numbers
  (``torch.autograd.forward_ad``, a single jvp, which agrees with float64 references through
  ``layer_norm``; only *nested* forward mode is wrong there on torch 2.13).
* ``H_ℓ w``: a double backward through the small loss graph ``ℓ(z̃)``.
* ``Jᵀ y``: a vector-Jacobian product through the retained network graph.

``vᵀGv = (Jv)ᵀ H_ℓ (Jv)`` needs no ``Jᵀ`` (used for directional sharpness).

The split must be clean: if the loss uses a measured parameter after ``z`` (a head outside the
output module, tied weights used twice), the matrix would not be a Gauss–Newton matrix of ``f``
and construction raises, naming the parameters; pass ``output=`` a module whose output everything
after it depends on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad as fwAD

from landscape.linops._base import CurvatureOperator

__all__ = ["GGNOperator"]


def _replace_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """``obj`` with every tensor ``t`` replaced by ``fn(t)`` (tensors, tuples, lists, dicts and
    dict-like outputs such as Hugging Face's ``ModelOutput``)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_replace_tensors(v, fn) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_replace_tensors(v, fn) for v in obj)
    if isinstance(obj, Mapping):
        out = obj.copy() if hasattr(obj, "copy") else dict(obj)
        for k in list(obj.keys()):
            out[k] = _replace_tensors(obj[k], fn)
        return out
    return obj


class _Stop(Exception):
    """Raised by the forward hook once every output tangent is captured (the rest of the loss is
    not needed for ``J v``)."""


def _zeros(ts: list[Tensor | None], like: list[Tensor]) -> list[Tensor]:
    return [t if t is not None else torch.zeros_like(r) for t, r in zip(ts, like)]


class GGNOperator(CurvatureOperator):
    """The generalized Gauss–Newton matrix ``Jᵀ H_ℓ J`` of the objective (see the module docstring).

    Args:
        objective: the measured function.
        at: the point (default: the model's current parameters).
        output: where the loss is split: a submodule of the model (or its dotted name, as in
            ``model.get_submodule``), default the model itself. Its forward output (a tensor, or a
            tuple/dict of tensors such as a Hugging Face ``ModelOutput``) is ``z``; the loss must
            depend on the measured parameters only through it.
        jvp: ``"reverse"`` (default) or ``"forward"``: how ``J v`` is computed (see above).
        graph: ``"keep"``, ``"rebuild"`` or ``"auto"`` (as :class:`~landscape.linops.HessianOperator`).

    Raises:
        ValueError: the output module produced no tensor depending on the parameters, or the loss
            uses measured parameters after it.
    """

    curvature = "ggn"

    def __init__(self, objective: Any, at: Mapping[str, Tensor] | None = None, *,
                 output: nn.Module | str | None = None, jvp: str = "reverse", graph: str = "auto") -> None:
        if jvp not in ("reverse", "forward"):
            raise ValueError(f"jvp must be 'reverse' or 'forward', got {jvp!r}")
        if graph not in ("auto", "keep", "rebuild"):
            raise ValueError(f"graph must be 'auto', 'keep' or 'rebuild', got {graph!r}")
        super().__init__(objective, at)
        model = objective.model
        if output is None:
            module = model
        elif isinstance(output, str):
            try:
                module = model.get_submodule(output)
            except AttributeError:
                raise ValueError(f"output={output!r}: the model has no submodule of that name") from None
        elif isinstance(output, nn.Module):
            if not any(m is output for m in model.modules()):
                raise ValueError("output must be a submodule of the objective's model")
            module = output
        else:
            raise TypeError(f"output must be a module, its dotted name or None, got {type(output).__name__}")
        self.module = module
        self.jvp = jvp
        self.keep = graph == "keep" or (graph == "auto" and len(objective.batches) == 1)
        self._graphs: list[dict[str, Any]] | None = None
        self._loss: float | None = None
        self._grad: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ the graphs
    def _build_one(self, i: int) -> dict[str, Any]:
        obj = self.objective
        zs: list[Tensor] = []
        zts: list[Tensor] = []

        def capture(t: Tensor) -> Tensor:
            if t.is_floating_point() and t.requires_grad:
                zs.append(t)
                zt = t.detach().requires_grad_(True)
                zts.append(zt)
                return zt
            return t

        handle = self.module.register_forward_hook(lambda mod, args, out: _replace_tensors(out, capture))
        try:
            with obj._context(second_order=True):
                leaves = {n: v.detach().requires_grad_(True) for n, v in self.point.items()}
                loss = obj._call(leaves, obj.batches[i])
        finally:
            handle.remove()
        where = "the model" if self.module is obj.model else f"module {type(self.module).__name__}"
        if not zs:
            raise ValueError(
                f"the Gauss–Newton split found no output of {where} that depends on the measured parameters: "
                "pass output= the module whose output (logits) the loss is computed from"
            )
        names = list(leaves)
        firsts = torch.autograd.grad(loss, zts + [leaves[n] for n in names], create_graph=True, allow_unused=True)
        dl, after = list(firsts[: len(zts)]), firsts[len(zts):]
        used = [n for n, g in zip(names, after) if g is not None]
        if used:
            raise ValueError(
                f"loss_fn uses measured parameters {used[:4]}{' ...' if len(used) > 4 else ''} after the output of "
                f"{where}, so f is not ℓ(z(x)) there: pass output= a module whose output the rest of the loss "
                "depends on alone (e.g. the model, not its body)"
            )
        live_dl = [j for j, d in enumerate(dl) if d is not None and d.requires_grad]
        g = torch.autograd.grad(zs, [leaves[n] for n in names],
                                grad_outputs=_zeros([d.detach() if d is not None else None for d in dl], zs),
                                retain_graph=True, allow_unused=True)
        graph: dict[str, Any] = {
            "loss": float(loss.detach()), "leaves": leaves, "zs": zs, "zts": zts, "dl": dl, "live_dl": live_dl,
            "grad": {n: (t if t is not None else torch.zeros_like(self.point[n])) for n, t in zip(names, g)},
        }
        if self.jvp == "reverse":
            us = [torch.zeros_like(z, requires_grad=True) for z in zs]
            jtu = torch.autograd.grad(zs, [leaves[n] for n in names], grad_outputs=us, create_graph=True,
                                      retain_graph=True, allow_unused=True)
            graph["us"] = us
            graph["jtu"] = dict(zip(names, jtu))
        return graph

    def _graph_iter(self):
        if self._graphs is not None:
            yield from self._graphs
            return
        obj = self.objective
        first = self._grad is None
        total = 0.0
        grad = {n: torch.zeros_like(v) for n, v in self.point.items()} if first else None
        kept = []
        for i, w in enumerate(obj.batches.weights):
            graph = self._build_one(i)
            graph["w"] = w
            if first:
                total += w * graph["loss"]
                for n, t in graph["grad"].items():
                    grad[n].add_(t, alpha=w)
            if self.keep:
                kept.append(graph)
            yield graph
            del graph
        if first:
            obj._check_finite(total, "at this point")
            self._loss, self._grad = total, grad
        if self.keep:
            self._graphs = kept

    def loss_and_grad(self) -> tuple[float, dict[str, Tensor]]:
        """``(f(x), ∇f(x))`` (the gradient as ``Jᵀ ∂ℓ/∂z``), from the products' graphs."""
        self._check_open()
        if self._grad is None:
            for _ in self._graph_iter():
                pass
        assert self._loss is not None and self._grad is not None
        return self._loss, self._grad

    # ------------------------------------------------------------------ the three factors
    def _jv(self, graph: dict[str, Any], i: int, v: dict[str, Tensor], names: tuple[str, ...]) -> list[Tensor]:
        zs = graph["zs"]
        if self.jvp == "reverse":
            jtu = graph["jtu"]
            live = [n for n in names if jtu[n] is not None and jtu[n].requires_grad]
            if not live:
                return [torch.zeros_like(z) for z in zs]
            out = torch.autograd.grad([jtu[n] for n in live], graph["us"], grad_outputs=[v[n] for n in live],
                                      retain_graph=True, allow_unused=True)
            return _zeros(list(out), zs)
        return self._forward_jv(i, v, names, len(zs))

    def _forward_jv(self, i: int, v: dict[str, Tensor], names: tuple[str, ...], count: int) -> list[Tensor]:
        obj = self.objective
        tangents: list[Tensor] = []

        def capture(t: Tensor) -> Tensor:
            if t.is_floating_point():
                tan = fwAD.unpack_dual(t).tangent
                if tan is not None:
                    tangents.append(tan.detach())
                    if len(tangents) == count:
                        raise _Stop
            return t

        handle = self.module.register_forward_hook(lambda mod, args, out: _replace_tensors(out, capture))
        try:
            with fwAD.dual_level(), torch.no_grad(), obj._context(second_order=True):
                point = {n: (fwAD.make_dual(p, v[n]) if n in names else p) for n, p in self.point.items()}
                try:
                    obj._call(point, obj.batches[i])
                except _Stop:
                    pass
        finally:
            handle.remove()
        if len(tangents) != count:
            raise RuntimeError(f"forward-mode J·v captured {len(tangents)} output tangents, expected {count}: "
                               "the forward pass changed between calls; use jvp='reverse'")
        return tangents

    def _hl(self, graph: dict[str, Any], w: list[Tensor]) -> list[Tensor]:
        zts, dl, live = graph["zts"], graph["dl"], graph["live_dl"]
        if not live:
            return [torch.zeros_like(z) for z in zts]
        out = torch.autograd.grad([dl[j] for j in live], zts, grad_outputs=[w[j] for j in live],
                                  retain_graph=True, allow_unused=True)
        return _zeros(list(out), zts)

    def _jtv(self, graph: dict[str, Any], y: list[Tensor], names: tuple[str, ...]) -> dict[str, Tensor]:
        leaves = graph["leaves"]
        out = torch.autograd.grad(graph["zs"], [leaves[n] for n in names], grad_outputs=y, retain_graph=True,
                                  allow_unused=True)
        return {n: (t if t is not None else torch.zeros_like(self.point[n])) for n, t in zip(names, out)}

    # ------------------------------------------------------------------ products
    def _products(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[dict[str, Tensor]]:
        out = [{n: torch.zeros_like(self.point[n]) for n in names} for _ in vs]
        for i, graph in enumerate(self._graph_iter()):
            w = graph["w"]
            for j, v in enumerate(vs):
                gv = self._jtv(graph, self._hl(graph, self._jv(graph, i, v, names)), names)
                for n in names:
                    out[j][n].add_(gv[n], alpha=w)
        return out

    def _quadratic_forms(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[float]:
        out = [0.0] * len(vs)
        for i, graph in enumerate(self._graph_iter()):
            w = graph["w"]
            for j, v in enumerate(vs):
                jv = self._jv(graph, i, v, names)
                hjv = self._hl(graph, jv)
                out[j] += w * float(sum(torch.sum(a.double() * b.double()) for a, b in zip(jv, hjv)))
        return out

    def _release(self) -> None:
        self._graphs = None
