"""The function being measured: a model, a loss and a fixed probe batch, evaluated functionally.

:class:`Objective` turns ``(model, loss_fn, batch)`` into ``f(x)`` for a parameter point ``x`` given as
``dict[str, Tensor]`` keyed like ``model.named_parameters()``, and evaluates the loss, the gradient,
Hessian-vector products and the loss along a line there without touching the module: parameters,
buffers, training modes, ``requires_grad`` flags and the global RNG state are exactly as before after
every call.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

__all__ = ["DeterminismError", "DirectionalDerivatives", "MicroBatches", "NonFiniteError", "Objective", "math_attention"]

LossFn = Callable[[nn.Module, Any], Tensor]
Include = Iterable[str] | Callable[[str, Tensor], bool] | None


class DeterminismError(RuntimeError):
    """The loss differs between two evaluations at the same parameters."""


class NonFiniteError(ValueError):
    """The loss (or a derivative) is NaN or infinite at the point asked for."""


class MicroBatches(list):
    """A probe batch split into micro-batches whose losses are averaged with weights.

    ``f(x) = Σᵢ wᵢ·loss_fn(model, batchᵢ)`` with ``wᵢ = nᵢ / Σⱼ nⱼ`` where ``nᵢ`` is the sample count of
    micro-batch ``i`` (the leading dimension of its first tensor) unless ``weights`` are given. For a
    ``loss_fn`` that averages over samples this equals the loss on the concatenated batch, so a probe
    batch too large for memory can be split without changing the value.

    Args:
        batches: the micro-batches, each one in the form ``loss_fn`` takes.
        weights: optional relative weights (normalised to sum to one).
    """

    def __init__(self, batches: Iterable[Any], weights: Sequence[float] | None = None) -> None:
        super().__init__(batches)
        if not len(self):
            raise ValueError("MicroBatches needs at least one micro-batch")
        if weights is None:
            weights = [float(_sample_count(b)) for b in self]
        if len(weights) != len(self):
            raise ValueError(f"{len(weights)} weights for {len(self)} micro-batches")
        total = float(sum(weights))
        if not total > 0 or any(w < 0 for w in weights):
            raise ValueError(f"micro-batch weights must be non-negative with a positive sum, got {list(weights)}")
        self.weights = [float(w) / total for w in weights]


def _first_tensor(obj: Any) -> Tensor | None:
    if isinstance(obj, Tensor):
        return obj
    if isinstance(obj, Mapping):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        for item in obj:
            t = _first_tensor(item)
            if t is not None:
                return t
    return None


def _sample_count(batch: Any) -> int:
    t = _first_tensor(batch)
    if t is None or t.dim() == 0:
        raise ValueError(
            "cannot count the samples of a micro-batch without a tensor with a leading batch dimension; "
            "pass MicroBatches(batches, weights=[...])"
        )
    return int(t.shape[0])


def _as_micro_batches(batch: Any) -> MicroBatches:
    """One batch, or a list of micro-batches (a ``MicroBatches``, or a plain list whose items are all
    containers: a list of tensors such as ``[inputs, targets]`` is one batch)."""
    if isinstance(batch, MicroBatches):
        return batch
    if isinstance(batch, list) and batch and all(isinstance(b, (Mapping, tuple, list)) for b in batch):
        return MicroBatches(batch)
    return MicroBatches([batch], weights=[1.0])


def _convert_floats(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(dtype) if obj.is_floating_point() else obj
    if isinstance(obj, Mapping):
        return type(obj)({k: _convert_floats(v, dtype) for k, v in obj.items()}) if isinstance(obj, dict) else {
            k: _convert_floats(v, dtype) for k, v in obj.items()
        }
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_convert_floats(v, dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_convert_floats(v, dtype) for v in obj)
    return obj


def _model_device(model: nn.Module) -> torch.device | None:
    """The one device all of ``model``'s parameters live on, or ``None`` (several, or none, or meta)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return None
    (device,) = devices
    return None if device.type == "meta" else device


def _to_device(obj: Any, device: torch.device) -> Any:
    """``obj`` with every tensor on another device than ``device`` moved there (containers rebuilt,
    tensors already there kept as they are)."""
    if isinstance(obj, Tensor):
        return obj if obj.device == device else obj.to(device)
    if isinstance(obj, Mapping):
        items = {k: _to_device(v, device) for k, v in obj.items()}
        if all(items[k] is v for k, v in obj.items()):
            return obj
        return type(obj)(items) if isinstance(obj, dict) else items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        moved = [_to_device(v, device) for v in obj]
        return obj if all(a is b for a, b in zip(moved, obj)) else type(obj)(*moved)
    if isinstance(obj, (list, tuple)):
        moved = [_to_device(v, device) for v in obj]
        return obj if all(a is b for a, b in zip(moved, obj)) else type(obj)(moved)
    return obj


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Route attention through kernels that support double backward and forward-mode AD.

    PyTorch's fused attention kernels (flash / memory-efficient ``scaled_dot_product_attention`` and the
    ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` fast path) have no double backward.
    Inside this context the math SDPA backend is used and the MHA fast path is off; both are restored
    on exit.
    """
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _agree(traced: float, direct: float) -> bool:
    """The traced loss reproduces the model's own (both finite; or both non-finite alike)."""
    if not (math.isfinite(traced) and math.isfinite(direct)):
        return str(traced) == str(direct)
    return abs(traced - direct) <= 1e-5 * max(1.0, abs(direct))


def _trace_failure(e: Exception) -> str:
    """One line on why ``make_fx`` could not trace the loss."""
    first = str(e).splitlines()[0] if str(e) else ""
    if "_local_scalar_dense" in first or "data-dependent" in first:
        # Values computed from the batch alone are constants of the trace: this one depends on the point.
        return (
            "Python control flow or .item() on a value that depends on the parameters or buffers; "
            f"{type(e).__name__}: {first[:120]}"
        )
    return f"{type(e).__name__}: {first}"


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` as a module so ``torch.func.functional_call`` can swap the
    parameters of ``model`` for the duration of one call."""

    def __init__(self, model: nn.Module, loss_fn: LossFn) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> Tensor:
        return self.loss_fn(self.model, batch)


class Objective:
    """``f(x)``: the loss of ``model`` on a fixed probe batch, as a function of its parameters.

    Args:
        model: the user's module. It is never modified: every evaluation swaps parameters in
            functionally (``torch.func.functional_call``) and restores modes, buffers and RNG state.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``, e.g.
            ``lambda m, b: F.cross_entropy(m(b[0]), b[1])`` or ``lambda m, b: m(**b).loss``.
        batch: the probe batch, or a list of micro-batches (see :class:`MicroBatches`).
        mode: ``"eval"`` (default) or ``"train"``: the module mode during every evaluation. Recorded
            with every result.
        include: which parameters are measured: an iterable of names, or a predicate
            ``(name, param) -> bool``. Default: every parameter with ``requires_grad``. Parameters not
            measured are held fixed at their current values.
        dtype: evaluate in this floating dtype (e.g. ``torch.float64``); default: the model's own.
        check_determinism: evaluate the loss twice at the current parameters (with different RNG
            seeds) and raise :class:`DeterminismError` if they differ by more than ``rtol``.
        rtol: relative tolerance of the determinism check.

    Example:
        >>> import torch, landscape as ls
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
        >>> x, y = torch.randn(32, 4), torch.randn(32, 1)
        >>> obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
        >>> loss, grad = obj.loss_and_grad()
        >>> sorted(grad) == sorted(obj.names)
        True
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: LossFn,
        batch: Any,
        *,
        mode: str = "eval",
        include: Include = None,
        dtype: torch.dtype | None = None,
        check_determinism: bool = True,
        rtol: float = 1e-6,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_fn):
            raise TypeError("loss_fn must be callable as loss_fn(model, batch) -> scalar tensor")
        if mode not in ("eval", "train"):
            raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        self.model = model
        self.loss_fn = loss_fn
        self.mode = mode
        self.dtype = dtype
        self.batches = _as_micro_batches(batch)
        device = _model_device(model)
        if device is not None:  # a probe batch on the CPU for a model on a GPU: moved there once
            moved = [_to_device(b, device) for b in self.batches]
            if any(a is not b for a, b in zip(moved, self.batches)):
                self.batches = MicroBatches(moved, weights=self.batches.weights)
        self._wrapper = _LossModule(model, loss_fn)
        self.names: tuple[str, ...] = self._select(include)
        if not self.names:
            raise ValueError(
                "no parameters to measure: the model has no parameters with requires_grad=True "
                "(or `include` matched none)"
            )
        if check_determinism:
            self.check_deterministic(rtol=rtol)

    # ------------------------------------------------------------------ parameters
    def _select(self, include: Include) -> tuple[str, ...]:
        params = dict(self.model.named_parameters())
        if include is None:
            return tuple(n for n, p in params.items() if p.requires_grad)
        if callable(include):
            return tuple(n for n, p in params.items() if include(n, p))
        wanted = [include] if isinstance(include, str) else list(include)
        unknown = [n for n in wanted if n not in params]
        if unknown:
            raise KeyError(
                f"include names parameters the model does not have: {unknown}; "
                f"available: {list(params)[:20]}{' ...' if len(params) > 20 else ''}"
            )
        wanted_set = set(wanted)
        return tuple(n for n in params if n in wanted_set)

    def params(self) -> dict[str, Tensor]:
        """A detached copy of the model's current measured parameters (in ``dtype`` if given)."""
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().to(dtype=self.dtype or named[n].dtype, copy=True) for n in self.names}

    def _point(self, at: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        if at is None:
            return {n: named[n].detach().to(self.dtype) if self.dtype else named[n].detach() for n in self.names}
        missing = [n for n in self.names if n not in at]
        extra = [n for n in at if n not in named]
        if missing or extra:
            raise KeyError(f"parameter point does not match the objective: missing {missing}, unknown {extra}")
        out = {}
        for n in self.names:
            v = at[n]
            if v.shape != named[n].shape:
                raise ValueError(f"parameter point {n!r} has shape {tuple(v.shape)}, the model's is {tuple(named[n].shape)}")
            out[n] = v.detach().to(self.dtype) if self.dtype else v.detach()
        return out

    def _check_direction(self, v: Mapping[str, Tensor], what: str = "direction") -> None:
        missing = [n for n in self.names if n not in v]
        if missing:
            raise KeyError(f"{what} lacks measured parameters {missing}")
        named = dict(self.model.named_parameters())
        for n in self.names:
            if v[n].shape != named[n].shape:
                raise ValueError(f"{what}[{n!r}] has shape {tuple(v[n].shape)}, the parameter's is {tuple(named[n].shape)}")

    # ------------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def _context(self, second_order: bool = False) -> Iterator[None]:
        modes = {m: m.training for m in self.model.modules()}
        devices = sorted({p.device.index for p in self.model.parameters() if p.is_cuda and p.device.index is not None})
        try:
            with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
                if second_order:
                    stack.enter_context(math_attention())
                else:
                    fastpath = torch.backends.mha.get_fastpath_enabled()
                    torch.backends.mha.set_fastpath_enabled(False)
                    stack.callback(torch.backends.mha.set_fastpath_enabled, fastpath)
                self.model.train(self.mode == "train")
                yield
        finally:
            for m, training in modes.items():
                m.training = training

    def _swap(self, point: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The full parameter/buffer dict for one call: measured entries from ``point``, the rest from
        the module (converted to ``dtype``; buffers copied where the call could update them in place)."""
        swap: dict[str, Tensor] = {}
        for n, p in self.model.named_parameters():
            if n in point:
                swap[n] = point[n]
            elif self.dtype is not None and p.is_floating_point():
                swap[n] = p.detach().to(self.dtype)
            else:
                swap[n] = p.detach()
        train = self.mode == "train"
        for n, b in self.model.named_buffers():
            if self.dtype is not None and b.is_floating_point():
                swap[n] = b.to(self.dtype)  # a new tensor: in-place updates land on it
            elif train:
                swap[n] = b.clone()  # train-mode BatchNorm updates running stats in place
            else:
                swap[n] = b
        return swap

    def _batch(self, i: int) -> Any:
        b = self.batches[i]
        return _convert_floats(b, self.dtype) if self.dtype is not None else b

    def _call_swapped(self, swap: Mapping[str, Tensor], batch: Any) -> Tensor:
        out = torch.func.functional_call(
            self._wrapper, {f"model.{k}": v for k, v in swap.items()}, (batch,), strict=False, tie_weights=True
        )
        if not isinstance(out, Tensor) or out.numel() != 1:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"loss_fn must return a scalar tensor, got {shape}")
        return out.reshape(())

    def _call(self, point: Mapping[str, Tensor], batch: Any) -> Tensor:
        """loss_fn(model, batch) with the measured parameters replaced by ``point``."""
        if self.dtype is not None:
            batch = _convert_floats(batch, self.dtype)
        return self._call_swapped(self._swap(point), batch)

    @staticmethod
    def _check_finite(value: float, where: str) -> None:
        if not math.isfinite(value):
            raise NonFiniteError(f"the loss is {value} {where}; the measurement needs a finite loss")

    def loss(self, at: Mapping[str, Tensor] | None = None) -> float:
        """``f(at)`` (default: the current parameters)."""
        point = self._point(at)
        total = 0.0
        with self._context(), torch.no_grad():
            for w, b in zip(self.batches.weights, self.batches):
                total += w * float(self._call(point, b))
        return total

    def loss_and_grad(self, at: Mapping[str, Tensor] | None = None) -> tuple[float, dict[str, Tensor]]:
        """``(f(at), ∇f(at))``. Parameters the loss does not depend on get a zero gradient."""
        point = self._point(at)
        total = 0.0
        grad = {n: torch.zeros_like(v) for n, v in point.items()}
        with self._context():
            for w, b in zip(self.batches.weights, self.batches):
                leaves = {n: v.requires_grad_(True) for n, v in self._leaves(point).items()}
                loss = self._call(leaves, b)
                gs = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                total += w * float(loss.detach())
                for n, g in zip(leaves, gs):
                    if g is not None:
                        grad[n].add_(g, alpha=w)
        self._check_finite(total, "at this point")
        return total, grad

    def grad(self, at: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``∇f(at)``."""
        return self.loss_and_grad(at)[1]

    @staticmethod
    def _leaves(point: Mapping[str, Tensor]) -> dict[str, Tensor]:
        # Fresh leaf tensors sharing storage with ``point`` (so the caller's tensors and the module's
        # parameters never get requires_grad flipped).
        return {n: v.detach() for n, v in point.items()}

    def second_order(
        self,
        vs: Sequence[Mapping[str, Tensor]],
        at: Mapping[str, Tensor] | None = None,
        reduce: Callable[[int, dict[str, Tensor]], Any] | None = None,
    ) -> tuple[float, dict[str, Tensor], list[Any]]:
        """Loss, gradient and Hessian-vector products ``H·vᵢ`` at one point, sharing work.

        One gradient with ``create_graph=True`` is built per micro-batch; each ``H·vᵢ`` is then one
        backward pass of ``∇f·vᵢ`` through that retained graph (double backward). Double backward is
        used rather than forward-mode AD because forward-over-forward gives wrong second derivatives
        through ``layer_norm`` on torch 2.13. The engine lives in :mod:`landscape.linops.hessian`
        (:func:`~landscape.linops.hessian.second_order`, :class:`~landscape.linops.HessianOperator`).

        Args:
            vs: the vectors, each keyed like :attr:`names`.
            at: the point (default: current parameters).
            reduce: optional ``reduce(i, Hvᵢ) -> value`` applied to each (full, all micro-batches) product;
                when given, its results are returned instead of the products. With a single
                micro-batch the products are not kept, which saves memory.

        Returns:
            ``(loss, grad, results)``.
        """
        from landscape.linops.hessian import second_order

        for i, v in enumerate(vs):
            self._check_direction(v, f"vector {i}")
        return second_order(self, vs, at, reduce)

    # ------------------------------------------------------------------ second directional derivatives
    def directional_derivatives(
        self,
        vs: Sequence[Mapping[str, Tensor]],
        at: Mapping[str, Tensor] | None = None,
        method: str = "auto",
    ) -> tuple[float, list[float], list[float], str]:
        """First and second directional derivatives ``∇f·vᵢ`` and ``vᵢᵀ∇²f·vᵢ`` at one point.

        Args:
            vs: the directions, each keyed like :attr:`names` (used as given, not normalised).
            at: the point (default: current parameters).
            method: ``"taylor"``: a second-order Taylor sweep through the traced loss
                (:mod:`landscape.taylor`; about 4/3 of a forward+backward per direction on matmul-heavy
                models; raises :class:`~landscape.taylor.UnsupportedGraph` if the loss uses an operator
                without a rule); ``"hvp"``: a Hessian-vector product per direction by double backward
                (about 2× or more); ``"auto"`` (default): ``"taylor"`` when the traced loss is supported,
                else ``"hvp"``, with a ``RuntimeWarning`` naming the reason (once per ``Objective``).

        Returns:
            ``(loss, first, second, method_used)``.
        """
        with DirectionalDerivatives(self, at, method) as session:
            return session(vs, stacklevel=3)

    def _try_taylor(
        self, point: Mapping[str, Tensor], vs: Sequence[Mapping[str, Tensor]], keep: dict | None = None,
        trusted: bool = False,
    ) -> tuple[tuple[float, list[float], list[float]] | None, str | None, bool]:
        """``(result, None, False)``, or ``(None, reason, stale)``: ``stale`` when the loss was supported
        when recorded but the sweep failed here (worth a warning: the user's model changed under it).
        ``keep``: a dict in which the primal values of a single micro-batch are kept between calls at
        the same point (:class:`DirectionalDerivatives`). ``trusted``: the recording was checked
        against the model at another point moments ago (in the same measurement)."""
        graphs = self._taylor_graphs(point)
        if isinstance(graphs, str):
            return None, graphs, False
        try:
            swept = self._taylor_sweep(graphs, point, vs, keep, trusted=trusted)
            if swept is None:
                # The recording went stale (a plain tensor attribute of the model changed, say): record
                # again here once.
                self.__dict__.get("_taylor_cache", {}).clear()
                if keep is not None:
                    keep.clear()
                graphs = self._taylor_graphs(point)
                if isinstance(graphs, str):
                    return None, graphs, True
                swept = self._taylor_sweep(graphs, point, vs, keep)
                if swept is None:
                    reason = (
                        "the traced loss no longer reproduces the loss at this point (control flow that depends "
                        "on parameter values?)"
                    )
                    self._disable_taylor(reason)
                    return None, reason, True
        except NonFiniteError:
            raise
        except Exception as e:  # noqa: BLE001 - a rule that cannot handle this case: HVPs from now on
            reason = f"the Taylor sweep failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            cache = self.__dict__.get("_taylor_cache", {})
            for key, value in cache.items():
                if value is graphs:
                    cache[key] = reason
            return None, reason, True
        return swept, None, False

    def _disable_taylor(self, reason: str) -> None:
        """Use HVPs from now on (every recording is replaced by the reason; the caller has warned)."""
        cache = self.__dict__.setdefault("_taylor_cache", {})
        for key in list(cache):
            cache[key] = reason
        self._fallback_told = True

    def _tell_fallback(self, reason: str, stacklevel: int = 2) -> None:
        """Warn, once per ``Objective``, that ``method="auto"`` uses Hessian-vector products, and why."""
        if self.__dict__.get("_fallback_told"):
            return
        self._fallback_told = True
        warnings.warn(
            f"landscape: the Taylor sweep cannot be used for this loss ({reason}); directional sharpness uses "
            "Hessian-vector products instead: the same numbers at about twice the cost. Ask for them explicitly "
            "(method='hvp', MeasureSettings(method='hvp'), `landscape analyze --engine hvp`) to silence this warning.",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )

    def taylor_support(self, at: Mapping[str, Tensor] | None = None) -> str | None:
        """``None`` when the Taylor sweep supports this loss, else the reason it does not.

        The first time the reason is found (per ``Objective``) a ``RuntimeWarning`` says so: with
        ``method="auto"`` the sharpness then comes from Hessian-vector products, at about twice the cost.
        """
        graphs = self._taylor_graphs(self._point(at))
        if isinstance(graphs, str):
            self._tell_fallback(graphs, stacklevel=3)
            return graphs
        return None

    def _taylor_inputs(self, point: Mapping[str, Tensor]) -> tuple[list[str], list[Tensor], list[Tensor]]:
        swap = self._swap(point)
        others = [k for k in swap if k not in point]
        return others, [point[n] for n in self.names], [swap[k] for k in others]

    def _taylor_graphs(self, point: Mapping[str, Tensor]) -> list[Any] | str:
        """One traced graph per micro-batch (cached), or the reason the Taylor sweep cannot be used."""
        from landscape.taylor import TaylorGraph

        others, measured, rest = self._taylor_inputs(point)
        key = (
            self.mode,
            tuple((tuple(t.shape), t.dtype, t.device) for t in measured),
            tuple(others),
            tuple((tuple(t.shape), t.dtype, t.device) for t in rest),
        )
        cache = self.__dict__.setdefault("_taylor_cache", {})
        if key in cache:
            return cache[key]
        graphs: list[Any] = []
        reason: str | None = None
        names = self.names
        def loss_of(batch: Any) -> Callable[[list[Tensor], list[Tensor]], Tensor]:
            def fn(meas: list[Tensor], rest_: list[Tensor]) -> Tensor:
                swap = dict(zip(others, rest_))
                swap.update(zip(names, meas))
                return self._call_swapped(swap, batch)

            return fn

        for i in range(len(self.batches)):
            fn = loss_of(self._batch(i))
            try:
                with self._context(second_order=True):
                    graph = TaylorGraph(fn, measured, rest)
                    missing = graph.unsupported()
                    if missing:
                        reason = "no second-order rule for " + ", ".join(f"{k} (x{v})" for k, v in sorted(missing.items()))
                        break
                    # The trace must reproduce the loss (it would not if the loss branched on tensor values
                    # in a way the recording froze).
                    with torch.no_grad():
                        traced = float(graph.primal(measured, self._taylor_inputs(point)[2]).loss)
                        direct = float(self._call(point, self.batches[i]))
            except Exception as e:  # noqa: BLE001 - any tracing failure means: use HVPs
                reason = f"the loss could not be traced ({_trace_failure(e)})"
                break
            if not _agree(traced, direct):
                reason = f"the traced loss ({traced!r}) does not reproduce the loss ({direct!r})"
                break
            graphs.append(graph)
        result: list[Any] | str = reason if reason is not None else graphs
        cache[key] = result
        return result

    def _taylor_sweep(
        self, graphs: list[Any], point: Mapping[str, Tensor], vs: Sequence[Mapping[str, Tensor]],
        keep: dict | None = None, trusted: bool = False,
    ) -> tuple[float, list[float], list[float]] | None:
        """The sweep, or ``None`` when a recorded graph no longer reproduces the loss at ``point``.
        With ``keep`` and a single micro-batch, the primal (and its check) is computed once and kept
        there for the next call at the same point. ``trusted``: the recording reproduced the loss at
        another point of this measurement, so a recording whose trace read no value that depends on
        the point (:attr:`~landscape.taylor.TaylorGraph.reads_point_values`: it froze no branch) is
        valid here too and the check's forward pass is skipped (the δ-shifted sweeps)."""
        total = 0.0
        firsts = [0.0] * len(vs)
        seconds = [0.0] * len(vs)
        dirs = [[v[n] for n in self.names] for v in vs]
        reuse = keep is not None and len(graphs) == 1
        with self._context(second_order=True):
            for i, (w, graph) in enumerate(zip(self.batches.weights, graphs)):
                if reuse and keep.get("graph") is graph:
                    primal = keep["primal"]
                else:
                    _, measured, rest = self._taylor_inputs(point)
                    primal = graph.primal(measured, rest)
                    # Guard against a trace that froze control flow depending on parameter values: the
                    # recorded graph must give the loss the model gives here (one extra forward pass).
                    if not (trusted and not getattr(graph, "reads_point_values", True)):
                        with torch.no_grad():
                            direct = float(self._call(point, self.batches[i]))
                        if not _agree(float(primal.loss), direct):
                            return None
                    if reuse:
                        keep.update(graph=graph, primal=primal)
                traced = float(primal.loss)
                total += w * traced
                for j, d in enumerate(dirs):
                    d1, d2 = primal.along(d)
                    firsts[j] += w * d1
                    seconds[j] += w * d2
                del primal
        self._check_finite(total, "at this point")
        bad = [i for i, v in enumerate(seconds) if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"the second derivative along direction(s) {bad} is not finite at this point")
        return total, firsts, seconds

    def hvp(self, v: Mapping[str, Tensor], at: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Hessian-vector product ``∇²f(at)·v``."""
        return self.second_order([v], at)[2][0]

    def hvps(self, vs: Sequence[Mapping[str, Tensor]], at: Mapping[str, Tensor] | None = None) -> list[dict[str, Tensor]]:
        """Several Hessian-vector products at one point, sharing one ``create_graph`` gradient."""
        return self.second_order(vs, at)[2]

    def losses_along(
        self, direction: Mapping[str, Tensor], steps: Sequence[float] | np.ndarray, at: Mapping[str, Tensor] | None = None,
        *, batch: int = 1,
    ) -> np.ndarray:
        """``f(at − s·direction)`` for each ``s`` in ``steps`` (forward passes only; the direction is
        used as given, not normalised).

        Args:
            direction: the direction.
            steps: the steps ``s``.
            at: the point (default: current parameters).
            batch: evaluate up to this many steps in one batched forward (``torch.func.vmap`` over
                the parameters stacked along a new leading dimension: ``batch`` copies of the
                measured parameters and ``batch`` forwards' activations at once). A model that
                cannot be vmapped (in-place updates of buffers, data-dependent Python control
                flow...) is evaluated one step at a time, from then on for this objective.
        """
        self._check_direction(direction)
        point = self._point(at)
        names = self.names
        base = [point[n] for n in names]
        d = [direction[n].to(dtype=point[n].dtype, device=point[n].device) for n in names]
        batches = [self._batch(i) for i in range(len(self.batches))]
        # Everything but the measured entries is the same at every point (in eval mode: train mode
        # copies the buffers afresh for each call, as BatchNorm updates them in place).
        fixed = self._swap(point) if self.mode == "eval" else None
        steps = [float(s) for s in steps]
        out = np.empty(len(steps), dtype=np.float64)
        with self._context(), torch.no_grad():
            j = 0
            while j < len(steps):
                group = steps[j:j + max(1, int(batch))]
                vals = None
                if len(group) > 1 and fixed is not None and self.__dict__.get("_vmap_lines") is not False:
                    vals = self._losses_vmapped(base, d, group, fixed, batches)
                if vals is None:
                    vals = []
                    for s in group:
                        moved = torch._foreach_add(base, d, alpha=-s) if s else base
                        swap = dict(fixed) if fixed is not None else self._swap(point)
                        swap.update(zip(names, moved))
                        vals.append(sum(w * float(self._call_swapped(swap, b)) for w, b in zip(self.batches.weights, batches)))
                out[j:j + len(group)] = vals
                j += len(group)
        return out

    def _losses_vmapped(self, base: list[Tensor], d: list[Tensor], steps: list[float], fixed: Mapping[str, Tensor],
                        batches: list[Any]) -> list[float] | None:
        """The losses at ``base − s·d`` for every ``s`` of ``steps`` in one vmapped forward per micro-batch,
        or ``None`` when the model cannot be vmapped (then never tried again for this objective)."""
        names = self.names
        ss = torch.tensor(steps, dtype=base[0].dtype, device=base[0].device)
        try:
            stacked = [b.unsqueeze(0) - ss.view(-1, *([1] * b.dim())).to(b.dtype) * v.unsqueeze(0) for b, v in zip(base, d)]
            total = torch.zeros(len(steps), dtype=torch.float64)
            for w, b in zip(self.batches.weights, batches):
                def one(*moved: Tensor, b: Any = b) -> Tensor:
                    swap = dict(fixed)
                    swap.update(zip(names, moved))
                    return self._call_swapped(swap, b)

                # the fused attention kernels have no batching rule (vmap would loop over them)
                with sdpa_kernel(SDPBackend.MATH):
                    total += w * torch.func.vmap(one)(*stacked).double().cpu()
            del stacked
        except Exception:  # noqa: BLE001 - anything vmap cannot do: one forward per step instead
            self._vmap_lines = False
            return None
        self._vmap_lines = True
        return total.tolist()

    def check_deterministic(self, rtol: float = 1e-6) -> float:
        """Evaluate ``f`` twice at the current parameters under different RNG seeds.

        Raises:
            DeterminismError: if the two values differ by more than ``rtol`` (relative).

        Returns:
            The loss.
        """
        point = self._point(None)
        values = []
        for seed in (0x5EED, 0xC0FFEE):
            with self._context(), torch.no_grad():
                torch.manual_seed(seed)
                values.append(sum(w * float(self._call(point, b)) for w, b in zip(self.batches.weights, self.batches)))
        a, b = values
        self._check_finite(a, "at the current parameters")
        if abs(a - b) > rtol * max(abs(a), abs(b), 1e-12):
            train = self.mode == "train"
            raise DeterminismError(
                f"the loss differs between two evaluations at the same parameters ({a!r} vs {b!r}): the measured "
                "function must be deterministic. "
                + (
                    "mode='train' keeps dropout (and other random layers) active: use mode='eval', or set their "
                    "probability to 0."
                    if train
                    else "Something random runs even in eval mode (dropout called with training=True, random "
                    "augmentation inside loss_fn, ...): make loss_fn deterministic."
                )
                + " Pass check_determinism=False to skip this check."
            )
        return a

    def __repr__(self) -> str:
        n = sum(p.numel() for name, p in self.model.named_parameters() if name in self.names)
        return (
            f"Objective({type(self.model).__name__}, {len(self.names)} tensors / {n:,} parameters measured, "
            f"mode={self.mode!r}, {len(self.batches)} micro-batch(es), dtype={self.dtype})"
        )


class DirectionalDerivatives:
    """``∇f·vᵢ`` and ``vᵢᵀ∇²f·vᵢ`` at one point for directions given a few at a time.

    What a call of :meth:`Objective.directional_derivatives` does, split so that a measurement can
    hold only a few directions at once while sharing the work that does not depend on them: with
    the Taylor sweep and a single micro-batch the primal values (and the check that the recording
    reproduces the loss) are computed once; with Hessian-vector products the ``create_graph``
    gradient is built once. Use as a context manager (what it keeps is released on exit).

    Args:
        objective: the function.
        at: the point (default: current parameters).
        method: ``"auto"``, ``"taylor"`` or ``"hvp"`` (see :meth:`Objective.directional_derivatives`).
    """

    def __init__(self, objective: Objective, at: Mapping[str, Tensor] | None = None, method: str = "auto",
                 *, _trusted: bool = False) -> None:
        if method not in ("auto", "taylor", "hvp"):
            raise ValueError(f"method must be 'auto', 'taylor' or 'hvp', got {method!r}")
        self._trusted = _trusted  # the recording was checked at another point of this measurement
        self.objective = objective
        self.point = objective._point(at)
        self.method = method
        self.used: str | None = None
        self._keep: dict[str, Any] = {}
        self._engine: Any = None

    def __call__(
        self, vs: Sequence[Mapping[str, Tensor]], stacklevel: int = 2
    ) -> tuple[float, list[float], list[float], str]:
        """``(loss, firsts, seconds, method_used)`` for the directions ``vs`` (used as given)."""
        obj = self.objective
        point = self.point
        vs_ = []
        for i, v in enumerate(vs):
            obj._check_direction(v, f"vector {i}")
            vs_.append({n: v[n].to(dtype=point[n].dtype, device=point[n].device) for n in obj.names})
        if self.method != "hvp" and self.used != "hvp":
            swept, reason, stale = obj._try_taylor(point, vs_, self._keep, trusted=self._trusted)
            if swept is not None:
                self.used = "taylor"
                return (*swept, "taylor")
            self._keep.clear()
            if self.method == "taylor":
                from landscape.taylor import UnsupportedGraph

                raise UnsupportedGraph(f"the Taylor sweep does not support this loss: {reason}; use method='hvp'")
            if stale:
                obj._fallback_told = True
                warnings.warn(
                    f"landscape: {reason}; using Hessian-vector products from now on", RuntimeWarning,
                    stacklevel=stacklevel,
                )
            else:
                obj._tell_fallback(reason, stacklevel=stacklevel + 1)
        if self._engine is None:
            from landscape.linops.hessian import HessianOperator

            single = len(obj.batches) == 1
            self._engine = HessianOperator(obj, point, graph="keep" if single else "rebuild")
        self.used = "hvp"
        loss, firsts, seconds = self._engine.directional_derivatives(vs_)
        return loss, firsts, seconds, "hvp"

    def use_hvp(self) -> None:
        """Hessian-vector products from now on (the Taylor sweep disagreed with autograd)."""
        self.method = "hvp"
        self.used = "hvp"
        self._keep.clear()

    def close(self) -> None:
        self._keep.clear()
        if self._engine is not None:
            self._engine.close()
            self._engine = None

    def __enter__(self) -> DirectionalDerivatives:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
