"""Pseudo-updates: every recipe's state evolved on the real gradients of one training run (seed 002
App. B.3), with each distinct state computed and stored once."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor, nn

from landscape.optim._core import (
    RAW,
    Ctx,
    Evaluation,
    Flat,
    Layout,
    Program,
    Transform,
    Tree,
    Workspace,
    compute_dtype,
    is_finite_all,
    stochastic_round_to_bf16_,
)
from landscape.optim.recipes import recipe, recipe_names

__all__ = ["PseudoUpdates"]

_LAST_GRAD = "g (last gradient)"
_NOISE = 1 << 22  # random 16-bit values drawn per observe for stochastic rounding


def _as_param_dict(params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]]) -> dict[str, Tensor]:
    items = params.items() if isinstance(params, Mapping) else params
    out: dict[str, Tensor] = {}
    for item in items:
        try:
            name, p = item
        except (TypeError, ValueError):
            raise TypeError(
                "params must be a dict[str, Tensor] or an iterable of (name, tensor) pairs such as "
                "model.named_parameters()"
            ) from None
        if not isinstance(name, str) or not isinstance(p, Tensor):
            raise TypeError(f"params: expected (str, Tensor) pairs, got ({type(name).__name__}, {type(p).__name__})")
        if isinstance(p, nn.Parameter) and not p.requires_grad:
            continue  # frozen: never trained, never gets a gradient
        if not p.is_floating_point():
            raise TypeError(f"parameter {name!r} has dtype {p.dtype}; only floating-point parameters can be optimized")
        if name in out:
            raise ValueError(f"parameter name {name!r} appears twice")
        out[name] = p.detach()  # shares storage: reads the live values, never writes them
    if not out:
        raise ValueError("no parameters given (or all have requires_grad=False)")
    return out


def _check_device(device: Any) -> torch.device | None:
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"state_device must be None, a device string such as 'cpu' or a torch.device, got {type(device).__name__}")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"state_device: {device!r} is not a device ({e}); use e.g. 'cpu' or 'cuda:0'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"state_device={device!r} but CUDA is not available in this process")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"state_device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    if dev.type == "meta":
        raise ValueError("state_device='meta' holds no data; use 'cpu' or a GPU")
    return dev


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _flat_norm(buf: Tensor, block: int = 1 << 16) -> float:
    """``‖buf‖₂`` of a flat buffer: in the buffer's dtype over blocks of ``block`` coordinates (each
    a cascade sum, relative error ~1e-7), the blocks' norms combined in float64. Asking ``vector_norm``
    for float64 accumulation instead converts every element first: 0.6 s more per GPT-2 small step on a
    CPU, a quarter of the whole update. NaN and ±inf propagate (so does an overflow of float32 squares,
    above 1.8e19, which the caller then checks per tensor)."""
    n = buf.numel()
    k = n // block
    parts = []
    if k:
        parts.append(torch.linalg.vector_norm(buf[: k * block].view(k, block), dim=1).double())
    if n > k * block:
        parts.append(torch.linalg.vector_norm(buf[k * block:]).double().reshape(1))
    return float(torch.linalg.vector_norm(torch.cat(parts))) if parts else 0.0


class PseudoUpdates:
    """Run many optimizers' states on the gradients of one real training run, and give each one's
    current update direction (seed 002 App. B.3, "pseudo-update steps").

    Every recipe is a chain of atoms whose states are keyed by what they compute (kind,
    hyperparameters, input); a state needed by several recipes is stored and updated once. For the
    default set the raw-gradient EMA at β = 0.9 serves ``sgd``, ``normsgd``, ``signsgd``,
    ``gensignsgd`` and the first moment of ``adam`` and ``adam_clip_update``; the EMA of g² at
    β2 = 0.999 serves ``adam``, ``adam_clip`` and ``adam_clip_update``; Adafactor's factors serve
    both Adafactor recipes; one copy of the last gradient serves the recipes whose direction reads
    the current gradient itself (Adafactor and Lion).

    Memory and time: :meth:`state_bytes` is the sum over the distinct states (13 parameter-sized
    buffers plus Adafactor's factors for the default set, against about 21 with one buffer per recipe
    state; half that with ``state_dtype=torch.bfloat16``). When the parameters share a compute dtype
    (and a device, or ``state_device`` is given) each state is one contiguous buffer and
    :meth:`observe` packs the gradient once (that packed copy becomes the kept last gradient) and runs
    one kernel per operation over it. Besides the states it keeps, between steps, a spare gradient
    buffer (the two alternate) and a workspace of the temporaries one step needs at once (a clipped or
    signed copy of g, Adafactor's g², a small float32 piece of a bfloat16 state): about 2 parameter
    sizes in float32, reused every step, because on CPU a fresh parameter-sized buffer costs more than
    the arithmetic done in it. bfloat16 EMA states are updated in cache-sized pieces. The top-k%
    thresholds are exact and need no parameter-sized copy. ``benchmarks/tracker_overhead.py`` and
    ``benchmarks/scale.py`` (GPT-2 small) measure it against a training step.

    Args:
        params: the model's parameters, a ``dict[str, Tensor]`` or an iterable of ``(name, tensor)``
            such as ``model.named_parameters()`` (frozen ``nn.Parameter``s are left out). Kept by
            reference: read for shapes and by recipes that use the parameters, never written.
        recipes: ``None`` for every registered recipe; a list of names or of named
            :class:`~landscape.optim.Transform`; or a dict ``{name: Transform or recipe name}``.
        state_dtype: storage dtype of the states (default: the parameters' dtype, at least float32).
            ``torch.bfloat16`` halves the memory; arithmetic stays in float32.
        rounding: how float32 results are stored into bfloat16 states: ``"stochastic"`` (default,
            unbiased; with round-to-nearest an EMA whose per-step change is below half a bfloat16 ulp,
            such as v at β2 = 0.999, stops moving) or ``"nearest"``.
        seed: seed of the stochastic-rounding generator.
        state_device: where the states (and the kept last gradient) live: ``None`` (default) for the
            parameters' device, or a device such as ``"cpu"`` to keep them in host memory while the
            model trains on a GPU. :meth:`observe` then copies each gradient to the host once (into
            page-locked memory with non-blocking copies, waited for before use) and the recipes run
            there; :meth:`directions` and :meth:`preconditioner` return tensors on the parameters'
            devices. Costs one device-to-host copy of the gradient per step and host arithmetic.

    Example:
        >>> import torch, landscape as ls
        >>> model = torch.nn.Linear(4, 2)
        >>> pu = ls.PseudoUpdates(model.named_parameters(), ["sgd", "adam", "signsgd"])
        >>> loss = model(torch.randn(8, 4)).square().mean()
        >>> loss.backward()
        >>> pu.observe({n: p.grad for n, p in model.named_parameters()})
        >>> sorted(pu.directions())
        ['adam', 'sgd', 'signsgd']
        >>> pu.step
        1
    """

    def __init__(
        self,
        params: Mapping[str, Tensor] | Iterable[tuple[str, Tensor]],
        recipes: Iterable[str | Transform] | Mapping[str, Transform | str] | None = None,
        *,
        state_dtype: torch.dtype | None = None,
        rounding: str = "stochastic",
        seed: int = 0,
        state_device: str | torch.device | None = None,
    ) -> None:
        self._params = _as_param_dict(params)
        self.state_device = _check_device(state_device)
        self._txs = self._resolve(recipes)
        if state_dtype is not None and (not isinstance(state_dtype, torch.dtype) or not state_dtype.is_floating_point):
            raise ValueError(f"state_dtype must be a floating-point torch.dtype, got {state_dtype!r}")
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding must be 'stochastic' or 'nearest', got {rounding!r}")
        self.state_dtype = state_dtype
        self.rounding = rounding
        self._seed = int(seed)
        self._gens: dict[str, torch.Generator] = {}

        shared = {n: tx.atoms for n, tx in self._txs.items() if tx.atoms is not None}
        self._opaque = {n: tx for n, tx in self._txs.items() if tx.atoms is None}
        self._program = Program(shared)  # type: ignore[arg-type]
        # one contiguous buffer per state when all parameters share a device and compute dtype
        dev = self.state_device
        self._layout = Layout.of(self._params) if dev is None else Layout.of(self._params, dev)
        # page-locked host buffers for the gradient copies when states live on the host, params on a GPU
        self._pin = (
            dev is not None and dev.type == "cpu" and torch.cuda.is_available()
            and any(p.device.type == "cuda" for p in self._params.values())
        )
        self._moments = self._program.init(self._params, state_dtype, self._layout, dev)  # default: float32/64
        self._last_grad: Tree | None = None
        if self._program.keeps_raw:
            if self._layout is not None:
                self._last_grad = self._layout.zeros(state_dtype, pin=self._pin)
            else:
                self._last_grad = {
                    n: torch.zeros_like(p, dtype=state_dtype or compute_dtype(p.dtype), device=dev or p.device)
                    for n, p in self._params.items()
                }
        self._noise: Tensor | None = None
        self._spare: Tensor | None = None  # the packing buffer of the next observe (flat layouts)
        self._workspace = Workspace()  # scratch buffers of observe's temporaries, kept across steps
        like = self._params if dev is None else {n: p.to(dev) for n, p in self._params.items()}
        self._opaque_state = {n: tx.init(like) for n, tx in self._opaque.items()}
        self._opaque_last: dict[str, Tree | None] = dict.fromkeys(self._opaque)
        self._step = 0
        self._pending: Future | None = None  # observe(background=True): the update still running
        # ‖g‖ of the last observed gradient, when the packed layout's finiteness check computed it
        self.grad_norm: float | None = None
        self._worker: ThreadPoolExecutor | None = None

    # construction ------------------------------------------------------------------------------------
    @staticmethod
    def _resolve(recipes: Any) -> dict[str, Transform]:
        if recipes is None:
            return {n: recipe(n) for n in recipe_names()}
        if isinstance(recipes, str):
            raise TypeError(f"recipes must be a list of names, not a single string: use [{recipes!r}]")
        out: dict[str, Transform] = {}
        if isinstance(recipes, Mapping):
            for name, tx in recipes.items():
                out[str(name)] = recipe(tx) if isinstance(tx, str) else tx
        else:
            for item in recipes:
                if isinstance(item, str):
                    out[item] = recipe(item)
                elif isinstance(item, Transform):
                    if not item.name:
                        raise ValueError("an unnamed Transform in a list of recipes: pass a dict {name: transform}")
                    out[item.name] = item
                else:
                    raise TypeError(f"recipes: expected names or Transforms, got {type(item).__name__}")
        if not out:
            raise ValueError("no recipes given")
        for name, tx in out.items():
            if not isinstance(tx, Transform):
                raise TypeError(f"recipe {name!r}: expected a Transform, got {type(tx).__name__}")
        return out

    # properties --------------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The recipe names, in order."""
        return list(self._txs)

    @property
    def step(self) -> int:
        """How many gradients have been observed."""
        self.wait()
        return self._step

    @property
    def params(self) -> dict[str, Tensor]:
        return dict(self._params)

    def __repr__(self) -> str:
        return (
            f"PseudoUpdates({len(self._txs)} recipes, step={self._step}, "
            f"state {self.state_bytes() / 2**20:.2f} MiB in {len(self._moments) + (self._last_grad is not None)} states)"
        )

    # observing ---------------------------------------------------------------------------------------
    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._gens.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._seed)
            self._gens[key] = gen
        return gen

    def _store(self, dst: Tensor, src: Tensor, offset: int = 0) -> None:
        """Write an updated float32 state (a temporary, which may be overwritten) into its storage;
        ``offset``: the coordinate of a flat state where the piece ``dst`` starts (the rounding noise
        of a coordinate does not depend on how the state is cut into pieces)."""
        if dst.dtype == torch.bfloat16 and self.rounding == "stochastic":
            # one draw per observe, shared by every state (each stays unbiased; fresh draws over time)
            if self._noise is None or self._noise.device != dst.device:
                # at most 2^22 values, tiled over larger states (see stochastic_round_to_bf16_)
                n = min(_NOISE, max(dst.numel(), self._layout.total if self._layout is not None else 0))
                self._noise = torch.randint(
                    0, 1 << 16, (n,), dtype=torch.int32, device=dst.device, generator=self._generator(dst.device)
                )
            noise = self._noise
            start = offset % noise.numel()
            if start + dst.numel() <= noise.numel():
                noise = noise[start : start + dst.numel()]
            elif start:
                noise = torch.roll(noise, -start)
            stochastic_round_to_bf16_(dst, src, noise=noise, consume=True)
        else:
            dst.copy_(src)

    def _check_grads(self, grads: Mapping[str, Tensor]) -> None:
        if not isinstance(grads, Mapping):
            raise TypeError(f"grads must be a dict[str, Tensor] keyed like the parameters, got {type(grads).__name__}")
        missing = [n for n in self._params if n not in grads]
        extra = [n for n in grads if n not in self._params]
        if missing or extra:
            raise KeyError(
                f"gradients do not match the parameters: missing {missing}, unexpected {extra} "
                f"(pass one gradient per parameter given to PseudoUpdates)"
            )
        for n, p in self._params.items():
            g = grads[n]
            if g is None:
                raise ValueError(f"the gradient of {n!r} is None (unused in the loss?): pass zeros or leave it out of params")
            if not isinstance(g, Tensor):
                raise TypeError(f"the gradient of {n!r} is a {type(g).__name__}, not a Tensor")
            if g.shape != p.shape:
                raise ValueError(f"the gradient of {n!r} has shape {tuple(g.shape)}, the parameter {tuple(p.shape)}")

    def _pack(self, grads: Mapping[str, Tensor]) -> Flat:
        """The gradients in one contiguous buffer of the layout (compute dtype, state device), written
        into the spare buffer kept from the previous step (the kept gradient of two steps ago) when
        there is one: no new buffer, no page faults. From a GPU into host states the copies go to
        page-locked memory, non-blocking, and are waited for (an event per source device) before
        the buffer is read."""
        lay = self._layout
        assert lay is not None
        out, self._spare = self._spare, None
        if out is None:
            if self._pin:
                out = torch.empty(lay.total, dtype=lay.dtype, pin_memory=True)
            else:
                out = torch.empty(lay.total, dtype=lay.dtype, device=lay.device)
        leaves = [grads[n].detach().reshape(-1) for n in lay.names]
        if all(v.device == out.device for v in leaves):
            for v, o, k in zip(leaves, lay.offsets, lay.numels):  # on CPU a loop of copy_ beats cat(out=)
                out[o : o + k].copy_(v)
            return Flat(out, lay)
        cuda_sources = set()
        for v, o, k in zip(leaves, lay.offsets, lay.numels):
            async_copy = self._pin and v.device.type == "cuda"
            out[o : o + k].copy_(v, non_blocking=async_copy)
            if async_copy:
                cuda_sources.add(v.device)
        for d in cuda_sources:  # the host reads the buffer next: wait for the copies queued on d
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(d))
            event.synchronize()
        return Flat(out, lay)

    def _keep_spare(self, buf: Tensor) -> None:
        # custom transforms may return views of the packed gradient: then it is never overwritten
        if not self._opaque:
            self._spare = buf

    def _check_finite(self, grads: Mapping[str, Tensor], packed: Tensor | None = None) -> None:
        """Raise if any gradient holds a NaN or an infinity. With the packed buffer, one norm decides
        (:func:`_flat_norm`: NaN and ±inf propagate into it) and is kept as :attr:`grad_norm`; only a
        non-finite one, NaN/inf or a mere overflow of float32 squares, pays for the per-tensor check that
        names the culprits."""
        self.grad_norm = None
        if packed is not None:
            norm = _flat_norm(packed)
            if math.isfinite(norm):
                self.grad_norm = norm
                return
        if packed is None and is_finite_all([grads[n] for n in self._params]):
            return
        bad = [n for n in self._params if not bool(torch.isfinite(grads[n]).all())]
        if bad:
            raise ValueError(
                f"non-finite gradients (NaN or inf) in {bad}; nothing was updated. Skip this step "
                f"(as a GradScaler would) or fix the loss."
            )

    @torch.no_grad()
    def observe(self, grads: Mapping[str, Tensor], *, background: bool = False) -> None:
        """Feed the gradients of one training step to every recipe.

        Args:
            grads: ``{name: gradient}`` with exactly the parameters' names and shapes. Not modified.
            background: copy and check the gradients now, then update the states on a side thread
                while the caller goes on (the training loop's next forward and backward). Every other
                method waits for that update first, so the results are the same, bit for bit. Only for
                the packed layout without custom transforms; elsewhere the update runs at once.

        Raises:
            KeyError: missing or unexpected names. ValueError: a wrong shape, a ``None`` gradient, or
            a NaN/inf anywhere (then no state changes). A failure of a background update is raised by
            the next call that waits for it.
        """
        self.wait()
        self._check_grads(grads)
        t = self._step + 1
        raw: Tree
        if self._layout is not None:  # one copy of g into a contiguous buffer; every op then runs on it
            raw = self._pack(grads)
            try:
                self._check_finite(grads, raw.buf)  # type: ignore[attr-defined]
            except ValueError:
                self._keep_spare(raw.buf)  # type: ignore[attr-defined]
                raise
        else:
            self._check_finite(grads)
            dev = self.state_device
            raw = {
                n: grads[n].detach().to(device=dev or grads[n].device, dtype=compute_dtype(grads[n].dtype))
                for n in self._params
            }
        if background and self._layout is not None and not self._opaque:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="landscape-states")
            self._pending = self._worker.submit(self._update, raw, t)
            return
        self._update(raw, t)

    def wait(self) -> None:
        """Wait for a background :meth:`observe` to finish (re-raising its failure, if it failed)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                pending.result()
            except Exception as e:
                raise RuntimeError(f"the background update of the recipe states failed: {type(e).__name__}: {e}") from e

    @torch.no_grad()
    def _update(self, raw: Any, t: int) -> None:
        # opaque (user) transforms first: they are pure, so a failure there changes nothing
        new_opaque = {}
        for name, tx in self._opaque.items():
            u, s = tx.update(dict(raw.items()), self._opaque_state[name], self._params)
            new_opaque[name] = (dict(u), s)
        self._noise = None
        ctx = Ctx(step=t, params=self._params, workspace=self._workspace)
        ev = Evaluation(self._program, self._moments, raw, ctx, update=True, store=self._store)
        try:
            ev.update_all()
        finally:
            ctx.give_back_all()
            self._noise = None
        del ev
        lg = self._last_grad
        if isinstance(lg, Flat) and lg.buf.dtype == raw.buf.dtype:  # type: ignore[attr-defined]
            self._last_grad = raw  # the packed buffer becomes the kept gradient: no copy
            self._keep_spare(lg.buf)  # and the previous one is next step's packing buffer
        elif isinstance(lg, Flat):
            lg.buf.copy_(raw.buf)  # type: ignore[attr-defined]
            self._keep_spare(raw.buf)  # type: ignore[attr-defined]
        elif isinstance(raw, Flat):
            self._keep_spare(raw.buf)
        elif lg is not None:
            for n, v in lg.items():
                v.copy_(raw[n])
        for name, (u, s) in new_opaque.items():
            self._opaque_state[name] = s
            self._opaque_last[name] = u
        self._step = t

    # reading -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def directions(self, names: Iterable[str] | None = None) -> dict[str, dict[str, Tensor]]:
        """The current update direction ``u`` of each recipe (``x ← x − η·u``), after the last
        :meth:`observe`. Fresh tensors in the parameters' dtype: later observes do not change them.

        Args:
            names: a subset of :attr:`names` (default: all).
        """
        self.wait()
        if self._step == 0:
            raise RuntimeError(
                "no gradients observed yet: call .observe(grads) after a backward pass before .directions()"
            )
        wanted = self.names if names is None else list(names)
        unknown = [n for n in wanted if n not in self._txs]
        if unknown:
            raise KeyError(f"unknown recipes {unknown}; this PseudoUpdates has {self.names}")
        raw: Tree | None = None
        lg = self._last_grad
        if isinstance(lg, Flat):
            cdt = compute_dtype(lg.buf.dtype)
            raw = lg if lg.buf.dtype == cdt else Flat(lg.buf.to(cdt), lg.layout)
        elif lg is not None:
            raw = {n: v.to(compute_dtype(v.dtype)) for n, v in lg.items()}
        ev = Evaluation(self._program, self._moments, raw, Ctx(step=self._step, params=self._params), update=False)
        protected = {v.data_ptr() for t in self._moments.values() for v in t.values()}
        if raw is not None:
            protected |= {v.data_ptr() for v in raw.values()}
        seen: set[int] = set()
        out: dict[str, dict[str, Tensor]] = {}
        for name in wanted:
            if name in self._opaque:
                tree = self._opaque_last[name] or {}
            else:
                tree = ev.output(name)
            res = {}
            for k, v in tree.items():
                p = self._params[k]
                if v.device != p.device:  # states on state_device: a fresh copy on the parameter's device
                    v = v.to(device=p.device, dtype=p.dtype)
                else:
                    if v.data_ptr() in protected or id(v) in seen:
                        v = v.clone()
                    v = v.to(p.dtype) if v.dtype != p.dtype else v
                seen.add(id(v))
                res[k] = v
            out[name] = res
        return out

    def direction(self, name: str) -> dict[str, Tensor]:
        """:meth:`directions` for one recipe."""
        return self.directions([name])[name]

    @torch.no_grad()
    def preconditioner(self, name: str, *, bias_correction: bool = True) -> dict[str, Tensor]:
        """The diagonal preconditioner ``P`` of an Adam-family recipe at the current step, with the
        recipe's direction ``u = P⁻¹ m`` for its raw first moment ``m`` (Cohen et al., "Adaptive
        Gradient Methods at the Edge of Stability", 2022, §2):

            P = (1 − β₁ᵗ) · (√(v / (1 − β₂ᵗ)) + ε)

        from the recipe's own second-moment state ``v`` (``bias_correction=False`` drops both
        bias-correction factors: ``P = √v + ε``). Fresh tensors in the parameters' dtype.

        Raises:
            KeyError: an unknown recipe. ValueError: a recipe without an Adam second moment
            (``scale_by_adam`` in its chain), or no gradient observed yet.
        """
        self.wait()
        from landscape.optim._atoms import ScaleByAdam

        if name not in self._txs:
            raise KeyError(f"unknown recipe {name!r}; this PseudoUpdates has {self.names}")
        found = None
        if name in self._program.outputs:
            key = self._program.outputs[name]
            while key in self._program.streams:
                atom, inp, slots = self._program.streams[key]
                if isinstance(atom, ScaleByAdam):
                    found = (atom, slots["v"])
                    break
                key = inp
        if found is None:
            raise ValueError(f"recipe {name!r} has no Adam second moment (scale_by_adam): no preconditioner to read")
        if self._step == 0:
            raise ValueError("no gradients observed yet: the preconditioner is defined after the first observe()")
        atom, mkey = found
        t = self._step
        state = self._moments[mkey]
        out: dict[str, Tensor] = {}
        for n, p in self._params.items():
            v = state[n].to(compute_dtype(state[n].dtype))
            c2 = 1.0 - atom.beta2**t if bias_correction else 1.0
            c1 = 1.0 - atom.beta1**t if bias_correction else 1.0
            out[n] = ((v / c2).sqrt_().add_(atom.eps) * c1).to(device=p.device, dtype=p.dtype)
        return out

    # memory ------------------------------------------------------------------------------------------
    def state_report(self) -> list[dict[str, Any]]:
        """Every distinct stored state: ``key`` (what it computes), ``bytes`` and ``used_by``
        (the recipes that read it)."""
        self.wait()
        rows = []
        for mkey, tree in self._moments.items():
            users = [n for n in self._program.users.get(mkey, [])]
            rows.append({"key": mkey, "bytes": _tensor_bytes(tree), "used_by": users})
        if self._last_grad is not None:
            rows.append({"key": _LAST_GRAD, "bytes": _tensor_bytes(self._last_grad), "used_by": self._program.raw_readers()})
        for name in self._opaque:
            rows.append(
                {
                    "key": f"{name} (custom transform state + last update)",
                    "bytes": _tensor_bytes(self._opaque_state[name]) + _tensor_bytes(self._params),
                    "used_by": [name],
                }
            )
        return rows

    def state_bytes(self) -> int:
        """Bytes held by the states: the sum over distinct states (each shared state counted once)."""
        return sum(r["bytes"] for r in self.state_report())

    # checkpointing -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume: step, every distinct state (copies), the last gradient, custom
        transforms' states and the rounding generators."""
        self.wait()
        return {
            "step": self._step,
            "recipes": {n: repr(tx) for n, tx in self._txs.items()},
            "moments": {k: {n: v.clone() for n, v in t.items()} for k, t in self._moments.items()},
            RAW: None if self._last_grad is None else {n: v.clone() for n, v in self._last_grad.items()},
            "opaque": {n: {"state": self._opaque_state[n], "last": self._opaque_last[n]} for n in self._opaque},
            "rng": {k: g.get_state() for k, g in self._gens.items()},
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output into a ``PseudoUpdates`` built with the same parameters
        and recipes (the storage dtype may differ)."""
        self.wait()
        mine, theirs = set(self._moments), set(state["moments"])
        if mine != theirs:
            raise ValueError(
                f"state_dict does not match these recipes: states only here {sorted(mine - theirs)}, "
                f"only in the state_dict {sorted(theirs - mine)}"
            )
        if set(state.get("opaque", {})) != set(self._opaque):
            raise ValueError("state_dict does not match these recipes' custom transforms")
        for k, tree in self._moments.items():
            src = state["moments"][k]
            if set(src) != set(tree):
                raise ValueError(f"state {k!r}: leaves {sorted(set(src) ^ set(tree))} differ")
            for n, v in tree.items():
                if src[n].shape != v.shape:
                    raise ValueError(f"state {k!r}, {n!r}: shape {tuple(src[n].shape)} != {tuple(v.shape)}")
        if self._last_grad is not None:
            if state.get(RAW) is None:
                raise ValueError("state_dict has no last gradient but these recipes need one")
            for n, v in self._last_grad.items():
                v.copy_(state[RAW][n])
        for k, tree in self._moments.items():
            for n, v in tree.items():
                v.copy_(state["moments"][k][n])
        for n in self._opaque:
            self._opaque_state[n] = state["opaque"][n]["state"]
            self._opaque_last[n] = state["opaque"][n]["last"]
        for k, s in state.get("rng", {}).items():
            self._generator(torch.device(k)).set_state(s)
        self._step = int(state["step"])
