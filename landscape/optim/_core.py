"""The machinery under :mod:`landscape.optim`: atoms, their keyed states ("moments"), the evaluator
that runs many chains over one gradient stream computing every distinct state once, and the optax-style
:class:`Transform` / :func:`chain`.

Vocabulary
----------
*stream*
    A tree (``dict[str, Tensor]``) flowing through a chain. The raw gradient is the stream ``"g"``; an
    atom applied to stream ``S`` produces the stream ``"<atom label>(S)"``. Stream keys are strings that
    spell out the whole computation, so two recipes that compute the same thing name it the same way.
*moment*
    A state an atom keeps across steps (an EMA of its input, of its input squared, Adafactor's row and
    column factors). Its key is ``"<kind label>[<source stream key>]"``: the kind of recursion, its
    hyperparameters, and what it is fed. Identical keys are the *same* state, so it is stored and
    updated once however many recipes read it (the EMA of raw ``g`` at β = 0.9 serves ``sgd``,
    ``signsgd``, ``normsgd``, ``gensignsgd`` and Adam's first moment).
*atom*
    One link of a chain: declares its moments and computes its output from its input stream and its
    (already updated) moments. Atoms are frozen dataclasses whose fields are their hyperparameters.

Atoms never modify their input tensors; the evaluator updates moment buffers in place (they are the
evaluator's own), and :meth:`Transform.update` clones the state first so that it stays pure.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

Tree = dict[str, Tensor]
State = dict[str, Any]

RAW = "g"  # the key of the raw-gradient stream
CHUNK = 1 << 18  # coordinates per piece of a chunked elementwise update on CPU (1 MiB of float32)
CHUNK_GPU = 1 << 24  # on a GPU: few kernel launches matter more than cache reuse


def chunk_size(t: Tensor) -> int:
    return CHUNK if t.device.type == "cpu" else CHUNK_GPU


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return repr(float(v))
    return repr(v)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in: float64 stays float64, everything else runs in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------------------------------
# flat storage: one contiguous buffer per tree, leaves are views
# --------------------------------------------------------------------------------------------------


class Layout:
    """Names, shapes and offsets of the leaves of a tree packed into one 1-D buffer. Trees with the
    same ``Layout`` object can be combined with one kernel per op instead of one per leaf."""

    def __init__(self, like: Mapping[str, Tensor], device: torch.device | None = None) -> None:
        self.names = list(like)
        self.shapes = [like[n].shape for n in self.names]
        self.numels = [like[n].numel() for n in self.names]
        self.offsets = [0]
        for k in self.numels:
            self.offsets.append(self.offsets[-1] + k)
        self.total = self.offsets[-1]
        first = like[self.names[0]]
        self.device = first.device if device is None else torch.device(device)
        self.dtype = compute_dtype(first.dtype)

    @staticmethod
    def of(like: Mapping[str, Tensor], device: torch.device | None = None) -> Layout | None:
        """A layout for ``like``, or ``None`` when its leaves compute in several dtypes or (without a
        ``device`` for the buffers) live on several devices; then trees stay per-leaf."""
        if not like:
            return None
        first = next(iter(like.values()))
        dev, dt = first.device, compute_dtype(first.dtype)
        if any(compute_dtype(v.dtype) != dt for v in like.values()):
            return None
        if device is None and any(v.device != dev for v in like.values()):
            return None
        return Layout(like, device)

    def views(self, buf: Tensor) -> dict[str, Tensor]:
        return {
            n: buf[o : o + k].view(shape)
            for n, o, k, shape in zip(self.names, self.offsets, self.numels, self.shapes)
        }

    def pack(self, tree: Mapping[str, Tensor], dtype: torch.dtype | None = None, out: Tensor | None = None) -> Flat:
        """Copy ``tree`` (keyed by this layout's names) into one buffer (``out`` if given)."""
        dtype = dtype or self.dtype
        leaves = [tree[n].reshape(-1) for n in self.names]
        leaves = [v if v.dtype == dtype else v.to(dtype) for v in leaves]
        if out is not None:
            torch.cat(leaves, out=out)
            return Flat(out, self)
        return Flat(torch.cat(leaves), self)

    def zeros(self, dtype: torch.dtype | None = None, *, pin: bool = False) -> Flat:
        """A zero buffer on this layout's device (``pin``: in page-locked host memory, the source and
        target of asynchronous copies from and to a GPU)."""
        if pin:
            return Flat(torch.zeros(self.total, dtype=dtype or self.dtype, pin_memory=True), self)
        return Flat(torch.zeros(self.total, dtype=dtype or self.dtype, device=self.device), self)


class Flat(Mapping):
    """A tree whose leaves are views of one buffer ``buf`` laid out by ``layout``. It reads as an
    ordinary ``Mapping[str, Tensor]`` (views made on first access); atoms that see :class:`Flat`
    inputs of one layout run a single kernel on ``buf``."""

    __slots__ = ("buf", "layout", "_views")

    def __init__(self, buf: Tensor, layout: Layout) -> None:
        self.buf = buf
        self.layout = layout
        self._views: dict[str, Tensor] | None = None

    def _all(self) -> dict[str, Tensor]:
        if self._views is None:
            self._views = self.layout.views(self.buf)
        return self._views

    def __getitem__(self, key: str) -> Tensor:
        return self._all()[key]

    def __iter__(self):
        return iter(self.layout.names)

    def __len__(self) -> int:
        return len(self.layout.names)

    def __contains__(self, key: object) -> bool:
        return key in self._all()


def flat(*trees: Any) -> bool:
    """Whether all ``trees`` are :class:`Flat` with the same layout."""
    first = trees[0]
    return isinstance(first, Flat) and all(isinstance(t, Flat) and t.layout is first.layout for t in trees[1:])


# --------------------------------------------------------------------------------------------------
# scratch buffers reused across steps
# --------------------------------------------------------------------------------------------------


class Workspace:
    """Scratch buffers kept between evaluations and handed out again, keyed by (numel, dtype,
    device). A fresh parameter-sized CPU buffer costs far more than the arithmetic done in it (the
    kernel maps new pages and faults each one in: about 7x a ``lerp_`` over the same memory), so
    :class:`~landscape.optim.PseudoUpdates` keeps its few temporaries (a clipped or signed copy of g,
    a float32 working copy of a bfloat16 state, g² for Adafactor) alive across steps. Holding them
    costs no more memory at the peak than allocating them anew: at most as many as one step needs at
    once."""

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype, torch.device], list[Tensor]] = {}

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        free = self._free.get((numel, dtype, device))
        if free:
            return free.pop()
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, buf: Tensor) -> None:
        self._free.setdefault((buf.numel(), buf.dtype, buf.device), []).append(buf)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for bs in self._free.values() for b in bs)

    def clear(self) -> None:
        self._free.clear()


# --------------------------------------------------------------------------------------------------
# context of one evaluation
# --------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What an atom may read besides its input: the step count ``t`` (1 for the first gradient; an int,
    or one int per parameter name when parameters were stepped unevenly), the current parameters (only
    atoms with ``needs_params``) and a per-evaluation cache (e.g. the |g| histogram shared by two
    clipping fractions of the same stream)."""

    step: int | Mapping[str, int]
    params: Mapping[str, Tensor] | None = None
    cache: dict[Any, Any] = field(default_factory=dict)
    workspace: Workspace | None = None  # scratch buffers for temporaries (observe only)
    taken: dict[int, Tensor] = field(default_factory=dict)  # data_ptr -> buffer taken in this evaluation

    def empty(self, like: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """A 1-D buffer of ``like``'s size for a temporary: from the workspace (given back by the
        evaluator when the temporary's last reader is done) or, without one, a new tensor."""
        dtype = dtype or like.dtype
        if self.workspace is None:
            return torch.empty(like.numel(), dtype=dtype, device=like.device)
        buf = self.workspace.take(like.numel(), dtype, like.device)
        self.taken[buf.data_ptr()] = buf
        return buf

    def give_back(self, buf: Tensor) -> None:
        """Return a buffer taken by :meth:`empty` (a no-op for anything else)."""
        if self.workspace is not None and self.taken.pop(buf.data_ptr(), None) is not None:
            self.workspace.give(buf)

    def give_back_all(self, keep: Tensor | None = None) -> None:
        for ptr, buf in list(self.taken.items()):
            if keep is None or ptr != keep.data_ptr():
                self.give_back(buf)

    def step_of(self, name: str) -> int:
        return self.step if isinstance(self.step, int) else int(self.step[name])

    def uniform_step(self) -> int | None:
        if isinstance(self.step, int):
            return self.step
        values = set(self.step.values())
        return int(values.pop()) if len(values) == 1 else None

    def scalars(self, names: Sequence[str], fn: Callable[[int], float]) -> float | list[float]:
        """``fn(t)`` once if every leaf has the same step, else one value per leaf (for ``_foreach``)."""
        t = self.uniform_step()
        if t is not None:
            return fn(t)
        return [fn(self.step_of(n)) for n in names]

    def param(self, name: str) -> Tensor:
        if self.params is None or name not in self.params:
            raise ValueError(
                f"this recipe reads the parameters (e.g. Adafactor's relative step size) but parameter "
                f"{name!r} was not given: pass params to update()"
            )
        return self.params[name]


def _foreach_scale_(tensors: list[Tensor], s: float | list[float]) -> None:
    if isinstance(s, list):
        torch._foreach_mul_(tensors, s)
    elif s != 1.0:
        torch._foreach_mul_(tensors, s)


# --------------------------------------------------------------------------------------------------
# moments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MomentKind:
    """A recursion kept across steps. Subclasses are frozen dataclasses; their fields are the
    hyperparameters and, with the class' ``kind`` name, make the moment's identity."""

    kind: ClassVar[str] = "moment"

    @property
    def label(self) -> str:
        args = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.kind}({args})"

    def leaf_shapes(self, name: str, shape: torch.Size) -> dict[str, torch.Size]:
        """The state leaves kept for one parameter: ``{key: shape}``; the default is one leaf of the
        parameter's own shape under the parameter's name."""
        return {name: shape}

    flat_ok: ClassVar[bool] = True  # one leaf per parameter, same shape: can live in a Flat buffer
    elementwise: ClassVar[bool] = False  # update_flat_ exists: each coordinate from its own input only

    def update_flat_(self, buf: Tensor, x: Tensor, ctx: Ctx) -> None:  # pragma: no cover
        """Update a contiguous piece of a flat state from the same piece of its input (only for
        ``elementwise`` kinds): lets reduced-precision states be updated in cache-sized chunks."""
        raise NotImplementedError

    def init(
        self,
        like: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        layout: Layout | None = None,
        device: torch.device | None = None,
    ) -> Tree:
        if layout is not None and self.flat_ok:
            return layout.zeros(dtype)
        out: Tree = {}
        for name, t in like.items():
            for key, shape in self.leaf_shapes(name, t.shape).items():
                out[key] = torch.zeros(shape, dtype=dtype or compute_dtype(t.dtype), device=device or t.device)
        return out

    def update_(self, state: Tree, x: Mapping[str, Tensor], ctx: Ctx) -> None:  # pragma: no cover
        raise NotImplementedError


@dataclass(frozen=True)
class EMA(MomentKind):
    """``s ← β·s + (1−β)·x`` (``s.lerp_(x, 1−β)``, the op ``torch.optim.Adam`` uses), ``s_0 = 0``."""

    beta: float
    kind: ClassVar[str] = "ema"

    elementwise: ClassVar[bool] = True

    def update_flat_(self, buf: Tensor, x: Tensor, ctx: Ctx) -> None:
        buf.lerp_(x, 1.0 - self.beta)

    def update_(self, state: Tree, x: Mapping[str, Tensor], ctx: Ctx) -> None:
        if flat(state, x):
            state.buf.lerp_(x.buf, 1.0 - self.beta)  # type: ignore[attr-defined]
            return
        names = list(x)
        torch._foreach_lerp_([state[n] for n in names], [x[n] for n in names], 1.0 - self.beta)


@dataclass(frozen=True)
class EMASquare(MomentKind):
    """``s ← β·s + (1−β)·x²`` (``mul_`` then ``addcmul_``, as ``torch.optim.Adam``), ``s_0 = 0``."""

    beta: float
    kind: ClassVar[str] = "ema_sq"

    elementwise: ClassVar[bool] = True

    def update_flat_(self, buf: Tensor, x: Tensor, ctx: Ctx) -> None:
        buf.mul_(self.beta).addcmul_(x, x, value=1.0 - self.beta)

    def update_(self, state: Tree, x: Mapping[str, Tensor], ctx: Ctx) -> None:
        if flat(state, x):  # in cache-sized chunks: the second op reads what the first just wrote
            sb, xb = state.buf, x.buf  # type: ignore[attr-defined]
            c = chunk_size(sb)
            for o in range(0, sb.numel(), c):
                self.update_flat_(sb[o : o + c], xb[o : o + c], ctx)
            return
        names = list(x)
        s = [state[n] for n in names]
        xs = [x[n] for n in names]
        torch._foreach_mul_(s, self.beta)
        torch._foreach_addcmul_(s, xs, xs, value=1.0 - self.beta)


@dataclass(frozen=True)
class FactoredSquare(MomentKind):
    """Adafactor's second moment (seed 002 Algorithms 7 and 8, after Shazeer & Stern 2018).

    With ``β̂_t = 1 − t^decay_rate``: for a tensor with two or more dimensions (factored over the last
    two), ``R ← β̂R + (1−β̂)·(G² + ε₁)·1`` (row sums, key ``name::row``) and
    ``C ← β̂C + (1−β̂)·1ᵀ·(G² + ε₁)`` (column sums, key ``name::col``); for a vector (or scalar)
    ``V ← β̂V + (1−β̂)·(G² + ε₁)`` (key ``name``).
    """

    decay_rate: float
    eps1: float
    kind: ClassVar[str] = "factored_sq"
    flat_ok: ClassVar[bool] = False

    def leaf_shapes(self, name: str, shape: torch.Size) -> dict[str, torch.Size]:
        if len(shape) >= 2:
            return {f"{name}::row": torch.Size([*shape[:-1], 1]), f"{name}::col": torch.Size([*shape[:-2], 1, shape[-1]])}
        return {name: shape}

    def beta_hat(self, t: int) -> float:
        return 1.0 - float(t) ** self.decay_rate

    def update_(self, state: Tree, x: Mapping[str, Tensor], ctx: Ctx) -> None:
        sq_buf = None
        if isinstance(x, Flat):  # square the whole buffer at once, then reduce per tensor
            sq_buf = torch.mul(x.buf, x.buf, out=ctx.empty(x.buf))
            if self.eps1:
                sq_buf.add_(self.eps1)
            squares: Mapping[str, Tensor] = x.layout.views(sq_buf)
        else:
            names = list(x)
            sq_list = torch._foreach_mul([x[n] for n in names], [x[n] for n in names])
            if self.eps1:
                torch._foreach_add_(sq_list, self.eps1)
            squares = dict(zip(names, sq_list))
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        weights: list[float] = []
        for name, g in x.items():
            sq = squares[name]
            w = float(ctx.step_of(name)) ** self.decay_rate  # 1 − β̂_t
            if g.dim() >= 2:
                dsts += [state[f"{name}::row"], state[f"{name}::col"]]
                srcs += [sq.sum(dim=-1, keepdim=True), sq.sum(dim=-2, keepdim=True)]
                weights += [w, w]
            else:
                dsts.append(state[name])
                srcs.append(sq)
                weights.append(w)
        if len(set(weights)) == 1:
            torch._foreach_lerp_(dsts, srcs, weights[0])
        else:
            for d, s_, w in zip(dsts, srcs, weights):
                d.lerp_(s_, w)
        if sq_buf is not None:
            del squares, srcs
            ctx.give_back(sq_buf)


# --------------------------------------------------------------------------------------------------
# atoms
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Atom:
    """One link of a chain. Subclasses set ``name`` and implement :meth:`apply` (and :meth:`moments`
    if they keep state). ``uses_input`` is False for atoms whose output depends on their moments only
    (momentum, Adam): then no raw gradient needs keeping to evaluate them later."""

    name: ClassVar[str] = "atom"
    uses_input: ClassVar[bool] = True
    needs_params: ClassVar[bool] = False

    @property
    def label(self) -> str:
        args = ",".join(f"{f.name}={_fmt(getattr(self, f.name))}" for f in dataclasses.fields(self))
        return f"{self.name}({args})" if args else self.name

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        """``{slot: (kind, source)}`` with source ``"input"`` (this atom's input stream) or ``"raw"``
        (the raw gradient, e.g. the second moment of the numerator-only clipped recipes)."""
        return {}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return self.label


# --------------------------------------------------------------------------------------------------
# the evaluator
# --------------------------------------------------------------------------------------------------


class Program:
    """Many chains compiled into one graph of streams and moments keyed by what they compute.

    Args:
        chains: ``{output name: atoms}``.
    """

    def __init__(self, chains: Mapping[str, Sequence[Atom]]) -> None:
        self.streams: dict[str, tuple[Atom, str, dict[str, str]]] = {}
        self.moments: dict[str, tuple[MomentKind, str]] = {}
        self.outputs: dict[str, str] = {}
        self.users: dict[str, list[str]] = {}  # moment key -> output names that read it
        for out_name, atoms in chains.items():
            key = RAW
            for atom in atoms:
                if not isinstance(atom, Atom):
                    raise TypeError(f"chain {out_name!r}: expected atoms, got {type(atom).__name__}")
                slots: dict[str, str] = {}
                for slot, (kind, source) in atom.moments().items():
                    src = key if source == "input" else RAW
                    mkey = f"{kind.label}[{src}]"
                    self.moments.setdefault(mkey, (kind, src))
                    slots[slot] = mkey
                    users = self.users.setdefault(mkey, [])
                    if out_name not in users:
                        users.append(out_name)
                new = f"{atom.label}({key})"
                self.streams.setdefault(new, (atom, key, slots))
                key = new
            self.outputs[out_name] = key
        self.keeps_raw = any(self._reads_raw(k) for k in self.outputs.values())
        self.needs_params = any(a.needs_params for a, _, _ in self.streams.values())

    def _reads_raw(self, skey: str) -> bool:
        """Whether evaluating ``skey`` *after* the update needs the raw gradient of that step."""
        if skey == RAW:
            return True
        atom, inp, _ = self.streams[skey]
        return atom.uses_input and self._reads_raw(inp)

    def raw_readers(self) -> list[str]:
        return [n for n, k in self.outputs.items() if self._reads_raw(k)]

    def init(
        self,
        like: Mapping[str, Tensor],
        dtype: torch.dtype | None = None,
        layout: Layout | None = None,
        device: torch.device | None = None,
    ) -> dict[str, Tree]:
        return {mkey: kind.init(like, dtype, layout, device) for mkey, (kind, _) in self.moments.items()}


class Evaluation:
    """One pass of a :class:`Program`: lazily computes streams (memoised by key) and, when
    ``update=True``, brings every moment up to date first, each exactly once.

    Args:
        program: the compiled chains.
        moments: ``{moment key: state tree}``; updated in place when ``update`` is True.
        raw: the raw gradients of this step (compute dtype), or ``None`` if no output reads them.
        ctx: step count, parameters, cache.
        update: update the moments with ``raw`` (True) or only read them (False).
        store: ``store(dst, src, offset)`` writes an updated compute-dtype leaf (or the piece of a
            flat state starting at coordinate ``offset``) back into a storage leaf of another dtype
            (rounding); used only when the moment dtypes differ from the compute dtype.
    """

    def __init__(
        self,
        program: Program,
        moments: dict[str, Tree],
        raw: Mapping[str, Tensor] | None,
        ctx: Ctx,
        *,
        update: bool,
        store: Callable[[Tensor, Tensor, int], None] | None = None,
    ) -> None:
        self.program = program
        self.moments = moments
        self.ctx = ctx
        self.update = update
        self.store = store
        self.memo: dict[str, Tree] = {}
        if raw is not None:
            self.memo[RAW] = raw if isinstance(raw, Flat) else dict(raw)
        self.done: set[str] = set()

    # streams -------------------------------------------------------------------------------------
    def stream(self, skey: str) -> Tree:
        hit = self.memo.get(skey)
        if hit is not None:
            return hit
        if skey == RAW:
            raise RuntimeError("the raw gradient is needed here but was not kept")
        atom, inp, slots = self.program.streams[skey]
        if self.update:
            for mkey in slots.values():
                self.update_moment(mkey)
        m = {slot: self._read(mkey) for slot, mkey in slots.items()}
        x = self.stream(inp) if atom.uses_input else None
        out = atom.apply(x, m, self.ctx)
        self.memo[skey] = out
        return out

    def _read(self, mkey: str) -> Tree:
        state = self.moments[mkey]
        if isinstance(state, Flat):
            cdt = compute_dtype(state.buf.dtype)
            if state.buf.dtype == cdt:
                return state
            if self.update:  # a temporary: copy_ into a scratch buffer (a fresh .to() faults its pages in)
                return Flat(self.ctx.empty(state.buf, cdt).copy_(state.buf), state.layout)
            return Flat(state.buf.to(cdt), state.layout)
        out: Tree = {}
        for k, v in state.items():
            cdt = compute_dtype(v.dtype)
            out[k] = v if v.dtype == cdt else v.to(cdt)
        return out

    # moments -------------------------------------------------------------------------------------
    def update_moment(self, mkey: str) -> None:
        if mkey in self.done:
            return
        kind, src = self.program.moments[mkey]
        x = self.stream(src)
        state = self.moments[mkey]
        store = self.store or (lambda dst, src_, offset=0: dst.copy_(src_))
        if isinstance(state, Flat):
            cdt = compute_dtype(state.buf.dtype)
            if state.buf.dtype == cdt:
                kind.update_(state, x, self.ctx)
            elif kind.elementwise and flat(state, x):
                # reduced-precision storage, piece by piece: convert, update and round one cache-sized
                # chunk at a time (no parameter-sized float32 copy of the state, about half the traffic)
                sb, xb = state.buf, x.buf  # type: ignore[attr-defined]
                c = chunk_size(sb)
                work = self.ctx.empty(sb[:c], cdt)
                for o in range(0, sb.numel(), c):
                    piece = sb[o : o + c]
                    w = work[: piece.numel()].copy_(piece)
                    kind.update_flat_(w, xb[o : o + c], self.ctx)
                    store(piece, w, o)
                self.ctx.give_back(work)
            else:  # reduced-precision storage: compute in float32, store back once
                buf = self.ctx.empty(state.buf, compute_dtype(state.buf.dtype)).copy_(state.buf)
                work = Flat(buf, state.layout)
                kind.update_(work, x, self.ctx)
                store(state.buf, work.buf, 0)  # may overwrite work.buf (a temporary)
                self.ctx.give_back(buf)
        elif all(v.dtype == compute_dtype(v.dtype) for v in state.values()):
            kind.update_(state, x, self.ctx)
        else:
            work = {k: v.to(compute_dtype(v.dtype)) for k, v in state.items()}
            kind.update_(work, x, self.ctx)
            for k, v in work.items():
                store(state[k], v, 0)
        self.done.add(mkey)

    def update_all(self) -> None:
        """Update every moment, grouped by source stream so that a temporary stream (a clipped or
        signed copy of g) can be dropped as soon as all the moments fed by it are done."""
        by_source: dict[str, list[str]] = {}
        for mkey, (_, src) in self.program.moments.items():
            by_source.setdefault(src, []).append(mkey)
        for src, mkeys in by_source.items():
            for mkey in mkeys:
                self.update_moment(mkey)
            if src != RAW:  # a temporary (or a float32 copy of a state): give its buffer back
                self._drop(src)
        self.ctx.cache.clear()

    def _drop(self, skey: str) -> None:
        """Forget a temporary stream; its scratch buffer goes back unless another stream shares it."""
        tree = self.memo.pop(skey, None)
        if isinstance(tree, Flat) and not any(isinstance(t, Flat) and t.buf is tree.buf for t in self.memo.values()):
            self.ctx.give_back(tree.buf)

    def output(self, name: str) -> Tree:
        return self.stream(self.program.outputs[name])


# --------------------------------------------------------------------------------------------------
# Transform and chain (optax style)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transform:
    """A pure gradient transformation, as in optax: ``init(params) -> state`` and
    ``update(grads, state, params=None) -> (updates, new_state)``. ``updates`` is the direction ``u``
    of ``x ← x − η·u``. Neither function modifies its arguments.

    ``atoms`` is set when the transform is a chain of atoms (every built-in recipe): that is what lets
    :class:`~landscape.optim.PseudoUpdates` share identical states between recipes and what
    :class:`~landscape.optim.RecipeOptimizer` runs. A user-made ``Transform(init, update)`` works
    everywhere except :class:`RecipeOptimizer`, without sharing.

    Example:
        >>> import torch, landscape as ls
        >>> tx = ls.optim.recipe("adam")
        >>> params = {"w": torch.zeros(3)}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": torch.tensor([1.0, -2.0, 0.5])}, state)
        >>> [round(v, 4) for v in u["w"].tolist()]  # Adam's first step is sign(g) (up to ε)
        [1.0, -1.0, 1.0]
    """

    init: Callable[[Mapping[str, Tensor]], State]
    update: Callable[..., tuple[Tree, State]]
    atoms: tuple[Atom, ...] | None = None
    name: str | None = None

    def __repr__(self) -> str:
        if self.atoms is not None:
            inner = ", ".join(a.label for a in self.atoms)
            return f"Transform({self.name + ': ' if self.name else ''}chain({inner}))"
        return f"Transform({self.name or 'custom'})"


def _clone_tree(t: Mapping[str, Tensor]) -> Tree:
    return {k: v.clone() for k, v in t.items()}


def from_atoms(atoms: Sequence[Atom], name: str | None = None) -> Transform:
    """The :class:`Transform` of a chain of atoms. Its state is
    ``{"step": 0-dim int64 tensor, "moments": {moment key: tree}}``."""
    atoms = tuple(atoms)
    program = Program({"u": atoms})

    def init(params: Mapping[str, Tensor]) -> State:
        params = dict(params)
        return {"step": torch.zeros((), dtype=torch.int64), "moments": program.init(params)}

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor] | None = None) -> tuple[Tree, State]:
        moments = {k: _clone_tree(v) for k, v in state["moments"].items()}
        t = int(state["step"]) + 1
        raw = {k: v.detach().to(compute_dtype(v.dtype)) for k, v in grads.items()}
        ev = Evaluation(program, moments, raw, Ctx(step=t, params=params), update=True)
        ev.update_all()
        out = ev.output("u")
        out = {k: v.to(grads[k].dtype) if v.dtype != grads[k].dtype else v for k, v in out.items()}
        return out, {"step": torch.tensor(t, dtype=torch.int64), "moments": moments}

    return Transform(init=init, update=update, atoms=atoms, name=name)


def chain(*links: Transform | Atom) -> Transform:
    """Compose transforms left to right: ``chain(a, b)`` feeds ``a``'s updates to ``b``.

    Chains of atoms stay atom-based (shareable, trainable). A link without atoms (a user's own
    ``Transform``) makes the result an opaque optax-style chain whose state is the tuple of the
    links' states.
    """
    if all(isinstance(li, Atom) or (isinstance(li, Transform) and li.atoms is not None) for li in links):
        atoms: list[Atom] = []
        for li in links:
            atoms.extend([li] if isinstance(li, Atom) else li.atoms)  # type: ignore[arg-type]
        return from_atoms(atoms)
    txs = [from_atoms([li]) if isinstance(li, Atom) else li for li in links]
    for li in txs:
        if not isinstance(li, Transform):
            raise TypeError(f"chain() takes Transforms or atoms, got {type(li).__name__}")

    def init(params: Mapping[str, Tensor]) -> State:
        return {"links": tuple(tx.init(params) for tx in txs)}

    def update(grads: Mapping[str, Tensor], state: State, params: Mapping[str, Tensor] | None = None) -> tuple[Tree, State]:
        new = []
        u: Mapping[str, Tensor] = grads
        for tx, s in zip(txs, state["links"]):
            u, s = tx.update(u, s, params)
            new.append(s)
        return dict(u), {"links": tuple(new)}

    return Transform(init=init, update=update, atoms=None)


# --------------------------------------------------------------------------------------------------
# storage rounding
# --------------------------------------------------------------------------------------------------


def stochastic_round_to_bf16_(
    dst: Tensor,
    src: Tensor,
    generator: torch.Generator | None = None,
    noise: Tensor | None = None,
    *,
    consume: bool = False,
) -> None:
    """Write float32 ``src`` into bfloat16 ``dst`` with unbiased stochastic rounding: add uniform
    random bits below bfloat16's last mantissa bit, then truncate (exact conversion afterwards).

    Round-to-nearest would freeze an EMA stored in bfloat16 whose per-step change is below half an ulp
    (β₂ = 0.999 moves v by 0.1% per step, bfloat16 resolves 0.4%), so the stored v would never
    decay; stochastic rounding keeps it unbiased.

    ``noise`` (int32 uniform in [0, 2¹⁶)) may be given to share one draw between several buffers of
    one step: each buffer's rounding stays unbiased. It may be shorter than ``src``: it is then tiled
    (coordinates a multiple of its length apart get the same random bits in that step, each one's
    rounding still unbiased), which makes a per-step draw of a few million values enough for a model
    of any size (drawing one per coordinate cost more than all the recipes' arithmetic on CPU).
    ``consume=True`` lets the function overwrite ``src`` (a temporary) instead of allocating.
    """
    owned = consume and src.dtype == torch.float32 and src.is_contiguous()
    src = src.to(torch.float32).contiguous()
    bits = src.view(torch.int32).reshape(-1)
    n = bits.numel()
    if noise is None:
        noise = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=src.device, generator=generator)
    noise = noise.reshape(-1)
    if not owned:
        bits = bits.clone()
    m = noise.numel()
    if m >= n:
        bits.add_(noise[:n])
    else:
        k = n // m
        if k:
            bits[: k * m].view(k, m).add_(noise)
        if n - k * m:
            bits[k * m :].add_(noise[: n - k * m])
    # low 16 bits cleared, the conversion is exact (measured faster on CPU than copying the words'
    # high halves with a strided int16 copy)
    dst.copy_(bits.bitwise_and_(-65536).view(torch.float32).view(dst.shape))


def is_finite_all(tensors: Sequence[Tensor]) -> bool:
    """One reduction over all tensors (max |x| per tensor) instead of one sync per tensor."""
    tensors = [t if t.is_floating_point() else t.float() for t in tensors if t.numel()]
    if not tensors:
        return True
    norms = torch._foreach_norm(tensors, math.inf)  # NaN or inf anywhere -> non-finite max
    return bool(torch.isfinite(torch.stack([n.float().cpu() for n in norms])).all())
