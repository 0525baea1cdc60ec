"""Hessian-vector products ``∇²f(x)·v`` by double backward through one retained gradient graph.

For each micro-batch the loss and its gradient ``g = ∇f(x)`` are computed once with
``create_graph=True``; each product ``Hv = ∇(gᵀv)`` is then one backward pass through that graph
(``retain_graph=True``), the scheme PyHessian uses. A block product ``H[B, B]·v_B`` backpropagates
``g_Bᵀv_B`` to the block's parameters only, so autograd skips what the block does not need.

Double backward rather than forward mode: forward-over-forward and ``torch.func``'s vmapped Hessians
give wrong second derivatives through ``layer_norm`` on torch 2.13 (README, Hazards); double backward
agrees with float64 finite differences (``tests/test_hazards.py``).

Memory: the retained graph holds the forward activations and the first backward's saved tensors
(measured by ``benchmarks/curvature_cost.py`` with ``track_memory=True``); it lives until
:meth:`~landscape.linops.CurvatureOperator.close`. With several micro-batches the default
(``graph="auto"``) rebuilds the graphs at every :meth:`~landscape.linops.CurvatureOperator.matvecs`
call instead of keeping one per micro-batch, since micro-batches exist to bound memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from landscape.linops._base import CurvatureOperator, _dot

__all__ = ["HessianOperator", "SavedBytes", "second_order"]


class SavedBytes:
    """Counts the bytes of the distinct storages autograd saves for backward inside the context
    (``torch.autograd.graph.saved_tensors_hooks``): the memory a retained graph holds."""

    def __init__(self) -> None:
        self.bytes = 0
        self._seen: set[int] = set()
        self._ctx: Any = None

    def _pack(self, t: Tensor) -> Tensor:
        try:
            s = t.untyped_storage()
            key = s.data_ptr()
            if key not in self._seen and s.nbytes():
                self._seen.add(key)
                self.bytes += s.nbytes()
        except (RuntimeError, NotImplementedError):  # tensors without storage (meta, nested...)
            pass
        return t

    def __enter__(self) -> SavedBytes:
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._ctx.__exit__(*exc)


class HessianOperator(CurvatureOperator):
    """The Hessian ``∇²f(x)`` of the objective.

    Args:
        objective: the measured function.
        at: the point (default: the model's current parameters).
        graph: ``"keep"``: build the ``create_graph`` gradient once and reuse it for every product
            until :meth:`close`; ``"rebuild"``: build it afresh for every :meth:`matvecs` call (its
            vectors still share it); ``"auto"`` (default): keep with one micro-batch, rebuild with several.
        track_memory: measure the bytes the retained graph holds (:attr:`graph_bytes`).

    Example:
        >>> import torch, landscape as ls
        >>> model = torch.nn.Linear(3, 1).double()
        >>> b = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 1, dtype=torch.float64))
        >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), b)
        >>> with ls.HessianOperator(obj) as H:
        ...     hv = H.matvec({n: torch.ones_like(p) for n, p in obj.params().items()})
        >>> sorted(hv) == sorted(obj.names)
        True
    """

    curvature = "hessian"

    def __init__(self, objective: Any, at: Mapping[str, Tensor] | None = None, *, graph: str = "auto",
                 track_memory: bool = False) -> None:
        if graph not in ("auto", "keep", "rebuild"):
            raise ValueError(f"graph must be 'auto', 'keep' or 'rebuild', got {graph!r}")
        super().__init__(objective, at)
        self.keep = graph == "keep" or (graph == "auto" and len(objective.batches) == 1)
        self.track_memory = track_memory
        self.graph_bytes: int | None = None
        self._graphs: list[tuple[float, dict[str, Tensor], dict[str, Tensor | None]]] | None = None
        self._loss: float | None = None
        self._grad: dict[str, Tensor] | None = None

    # ------------------------------------------------------------------ the graph
    def _build_one(self, i: int) -> tuple[float, dict[str, Tensor], dict[str, Tensor | None]]:
        """Loss, leaves and ``create_graph`` gradient of micro-batch ``i``."""
        obj = self.objective
        counter = SavedBytes() if self.track_memory else None
        with obj._context(second_order=True):
            if counter is not None:
                counter.__enter__()
            try:
                leaves = {n: v.detach().requires_grad_(True) for n, v in self.point.items()}
                loss = obj._call(leaves, obj.batches[i])
                gs = torch.autograd.grad(loss, list(leaves.values()), create_graph=True, allow_unused=True)
            finally:
                if counter is not None:
                    counter.__exit__(None, None, None)
        if counter is not None:
            self.graph_bytes = (self.graph_bytes or 0) + counter.bytes
        return float(loss.detach()), leaves, dict(zip(leaves, gs))

    def _graph_iter(self):
        """``(weight, leaves, grads)`` per micro-batch: the kept graphs, or each built in turn (and
        accumulating the loss and gradient the first time)."""
        if self._graphs is not None:
            yield from self._graphs
            return
        obj = self.objective
        first = self._grad is None
        total = 0.0
        grad = {n: torch.zeros_like(v) for n, v in self.point.items()} if first else None
        kept = []
        for i, w in enumerate(obj.batches.weights):
            loss, leaves, grads = self._build_one(i)
            if first:
                total += w * loss
                for n, g in grads.items():
                    if g is not None:
                        grad[n].add_(g.detach(), alpha=w)
            if self.keep:
                kept.append((w, leaves, grads))
            yield w, leaves, grads
            del leaves, grads
        if first:
            obj._check_finite(total, "at this point")
            self._loss, self._grad = total, grad
        if self.keep:
            self._graphs = kept

    def loss_and_grad(self) -> tuple[float, dict[str, Tensor]]:
        """``(f(x), ∇f(x))``, from the graph the products use (built now if needed)."""
        self._check_open()
        if self._grad is None:
            for _ in self._graph_iter():
                pass
        assert self._loss is not None and self._grad is not None
        return self._loss, self._grad

    def _products(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[dict[str, Tensor]]:
        out: list[dict[str, Tensor]] = [{} for _ in vs]
        k = len(vs)
        for w, leaves, grads in self._graph_iter():
            live = [n for n in names if grads[n] is not None and grads[n].requires_grad]
            if not live:
                continue
            inputs = [leaves[n] for n in names]
            for i, v in enumerate(vs):
                prods = torch.autograd.grad(
                    [grads[n] for n in live], inputs, grad_outputs=[v[n] for n in live],
                    retain_graph=self.keep or i < k - 1, allow_unused=True,
                )
                acc = out[i]
                for n, h in zip(names, prods):
                    if h is None:
                        continue
                    if n not in acc:  # the first micro-batch: keep the product itself (no copy)
                        acc[n] = h.mul_(w) if w != 1.0 else h
                    else:
                        acc[n].add_(h, alpha=w)
        for acc in out:
            for n in names:
                if n not in acc:
                    acc[n] = torch.zeros_like(self.point[n])
        return out

    def _quadratic_forms(self, vs: list[dict[str, Tensor]], names: tuple[str, ...]) -> list[float]:
        if not self.keep:  # each micro-batch's graph is built once for all the vectors
            return super()._quadratic_forms(vs, names)
        out = []
        for v in vs:  # one product alive at a time: memory of one vector, not K
            out.append(_dot(v, self._products([v], names)[0], names))
        return out

    def _release(self) -> None:
        self._graphs = None


def second_order(
    objective: Any,
    vs: Sequence[Mapping[str, Tensor]],
    at: Mapping[str, Tensor] | None = None,
    reduce: Callable[[int, dict[str, Tensor]], Any] | None = None,
) -> tuple[float, dict[str, Tensor], list[Any]]:
    """Loss, gradient and Hessian-vector products ``H·vᵢ`` at one point, sharing one ``create_graph``
    gradient per micro-batch (the engine behind :meth:`landscape.Objective.second_order`).

    Args:
        objective: the measured function.
        vs: the vectors, each keyed like ``objective.names``.
        at: the point (default: current parameters).
        reduce: optional ``reduce(i, Hvᵢ) -> value`` applied to each (full, all micro-batches) product;
            its results are returned instead of the products. With a single micro-batch each product is
            reduced as soon as it is computed and not kept, which saves memory.

    Returns:
        ``(loss, grad, results)``.
    """
    single = len(objective.batches) == 1
    with HessianOperator(objective, at, graph="keep" if single else "rebuild") as op:
        if single:
            results = []
            for i, v in enumerate(vs):
                hv = op.matvecs([v])[0]  # one graph for all: built by the first product, kept
                results.append(reduce(i, hv) if reduce is not None else hv)
                del hv
            if not vs:
                op.loss_and_grad()
        else:  # the vectors share each micro-batch's graph, rebuilt once for this call
            hvs = op.matvecs(list(vs)) if vs else []
            if not vs:
                op.loss_and_grad()
            results = [reduce(i, hv) if reduce is not None else hv for i, hv in enumerate(hvs)]
        loss, grad = op.loss_and_grad()
    return loss, grad, results
