"""The atoms recipes are chained from. Each public constructor validates its hyperparameters the way
``torch.optim`` does and returns a one-link :class:`~landscape.optim.Transform`; :func:`chain` joins them.

Formulas (``x`` is the atom's input tree, ``t`` the step count starting at 1, all ops coordinate-wise
unless a norm is named):

============================  ======================================================================
``trace(β)``                  ``m ← βm + (1−β)x``; out ``m``                (seed 002 Alg. 3)
``scale_by_adam(β1, β2, ε)``  ``m ← β1 m + (1−β1)x``, ``v ← β2 v + (1−β2)x²`` (x or raw g);
                              out ``m̂/(√v̂ + ε)``, ``m̂ = m/(1−β1ᵗ)``, ``v̂ = v/(1−β2ᵗ)`` (Alg. 6)
``scale_by_rms(β, ε)``        ``v ← βv + (1−β)x²``; out ``x/(√v + ε)``, 0/0 := 0  (seed 001 Alg. 1)
``scale_by_factored_rms``     Adafactor's ``x/√V̂`` (factored for matrices)  (seed 002 Alg. 7, 8)
``clip_by_block_rms(d)``      per tensor ``x / max(1, RMS(x)/d)``            (Alg. 7, 8)
``scale_by_relative_step``    per tensor ``x·max(ε2, RMS(param))·min(ρ, 1/√t)`` (Alg. 7, 8)
``lion_momentum(β1, β2)``     ``c = β1 m_{t−1} + (1−β1)x``, ``m ← β2 m + (1−β2)x``; out ``c`` (Alg. 9)
``sign()``                    ``sgn(x)``                                     (Alg. 5, seed 000 Def. 1)
``normalize(per_tensor)``     ``x/‖x‖`` (whole model, or per tensor)         (seed 000 Def. 2)
``normalize_rms()``           per tensor ``x/‖x‖·√numel``                    (seed 002 Alg. 4)
``clip_top(k, per_tensor)``   ``sgn(x)·min(|x|, τ)``, τ the k-fraction top |x|  (seed 002 App. B.2)
``clip_value(α)``             ``clamp(x, −α, α)``                            (seed 000)
``clip_norm(α, per_tensor)``  ``x·min(1, α/‖x‖)``                            (seed 000)
============================  ======================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from landscape.optim._core import (
    EMA,
    Atom,
    Ctx,
    EMASquare,
    FactoredSquare,
    Flat,
    MomentKind,
    Transform,
    Tree,
    flat,
    from_atoms,
)

__all__ = [
    "clip_by_block_rms",
    "clip_norm",
    "clip_top",
    "clip_value",
    "lion_momentum",
    "normalize",
    "normalize_rms",
    "scale_by_adam",
    "scale_by_factored_rms",
    "scale_by_relative_step",
    "scale_by_rms",
    "sign",
    "top_k_threshold",
    "trace",
]


# --------------------------------------------------------------------------------------------------
# validation helpers (torch.optim style)
# --------------------------------------------------------------------------------------------------


def _check_beta(name: str, v: float, *, allow_zero: bool = True) -> float:
    v = float(v)
    lo_ok = 0.0 <= v if allow_zero else 0.0 < v
    if not (lo_ok and v < 1.0):
        rng = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"Invalid {name} value: {v} (must be in {rng})")
    return v


def _check_nonneg(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 <= v < math.inf:
        raise ValueError(f"Invalid {name} value: {v} (must be finite and >= 0)")
    return v


def _check_pos(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 < v < math.inf:
        raise ValueError(f"Invalid {name} value: {v} (must be finite and > 0)")
    return v


def _check_fraction(name: str, v: float) -> float:
    v = float(v)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"Invalid {name} value: {v} (a fraction of coordinates, must be in [0, 1])")
    return v


def _check_source(v: str) -> str:
    if v not in ("input", "raw"):
        raise ValueError(f"Invalid second_moment_of value: {v!r} (must be 'input' or 'raw')")
    return v


def _tiny(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).tiny


def _norms(xs: list[Tensor]) -> list[float]:
    """ℓ2 norm of each tensor, accumulated in float64 (one sync)."""
    if not xs:
        return []
    return torch.stack([n.double() for n in torch._foreach_norm(xs)]).cpu().tolist()


# --------------------------------------------------------------------------------------------------
# top-k% threshold
# --------------------------------------------------------------------------------------------------

_BINS = 1 << 15  # bfloat16 patterns of non-negative values: 8 exponent bits and 7 mantissa bits


def _count_top(fraction: float, n: int) -> int:
    """How many coordinates a ``fraction`` clips: ``round(fraction·n)``, at least 1 if fraction > 0."""
    if fraction <= 0.0 or n == 0:
        return 0
    return min(n, max(1, int(math.floor(fraction * n + 0.5))))


_PIECE = 1 << 20  # coordinates per piece of the histogram's passes


def _abs_bits(piece: Tensor) -> Tensor:
    """The bfloat16 bit pattern of |x| (round-to-nearest is symmetric: x's pattern, sign bit cleared)."""
    return piece.to(torch.bfloat16).view(torch.int16).bitwise_and_(0x7FFF)


class _AbsHistogram:
    """|x| of a flat vector binned by its bfloat16 bit pattern (monotone in |x|), so
    that the k-th largest value is found exactly by one ``bincount`` and a ``kthvalue`` within one
    bin (a radix select): O(n), and about 10× faster than ``torch.kthvalue`` on the whole vector.

    ``flat`` may hold signed values, and nothing parameter-sized is allocated: the 16-bit patterns
    are made, counted and compared one cache-sized piece at a time, and |x| is taken of the few
    candidates of one bin only."""

    def __init__(self, flat: Tensor) -> None:
        self.flat = flat
        n = flat.numel()
        self.piece = _PIECE if flat.device.type == "cpu" else max(_PIECE, 1 << 24)  # few launches on a GPU
        if n <= self.piece:
            counts = torch.bincount(_abs_bits(flat), minlength=_BINS)
        else:
            counts = torch.zeros(_BINS, dtype=torch.int64, device=flat.device)
            for o in range(0, n, self.piece):
                counts += torch.bincount(_abs_bits(flat[o : o + self.piece]), minlength=_BINS)
        self.above = counts.flip(0).cumsum(0)  # above[j]: entries in bins >= _BINS - 1 - j

    def kth_largest(self, k: int) -> Tensor:
        n = self.flat.numel()
        if not 1 <= k <= n:
            raise ValueError(f"k={k} out of range for {n} coordinates")
        j = int(torch.searchsorted(self.above, torch.tensor([k], device=self.above.device))[0])
        b = _BINS - 1 - j
        n_above = int(self.above[j - 1]) if j > 0 else 0
        pieces = [self.flat[o : o + self.piece] for o in range(0, n, self.piece)]
        cand = torch.cat([p[_abs_bits(p) == b] for p in pieces]).abs_()
        r = k - n_above
        return torch.kthvalue(cand, cand.numel() - r + 1).values


def top_k_threshold(x: Mapping[str, Tensor], fraction: float, per_tensor: bool = False) -> dict[str, float]:
    """The clipping threshold τ of seed 002 App. B.2: the |x| value that ``fraction`` of the coordinates
    reach (the k-th largest |x|, k = round(fraction·n)), over all coordinates of the tree (default) or
    per tensor. Exact. Returns ``{name: τ}`` (the same τ for every name in the global case; ``inf``
    when nothing is clipped)."""
    return _thresholds(dict(x), _check_fraction("clip", fraction), per_tensor, None)


def _thresholds(x: Tree, fraction: float, per_tensor: bool, cache: dict | None) -> dict[str, float]:
    if per_tensor:
        out = {}
        for name, v in x.items():
            k = _count_top(fraction, v.numel())
            if k == 0:
                out[name] = math.inf
                continue
            flat = v.reshape(-1)
            if flat.numel() <= 4096:
                tau = torch.kthvalue(flat.abs(), flat.numel() - k + 1).values
            else:
                tau = _AbsHistogram(flat).kth_largest(k)
            out[name] = float(tau)
        return out
    n = sum(v.numel() for v in x.values())
    k = _count_top(fraction, n)
    if k == 0:
        return dict.fromkeys(x, math.inf)
    key = ("hist", id(x))
    hit = cache.get(key) if cache is not None else None
    if hit is not None and hit[0] is x:
        hist = hit[1]
    else:
        signed = x.buf if isinstance(x, Flat) else torch.cat([v.reshape(-1) for v in x.values()])
        hist = _AbsHistogram(signed)
        if cache is not None:
            cache[key] = (x, hist)
    tau = float(hist.kth_largest(k))
    return dict.fromkeys(x, tau)


# --------------------------------------------------------------------------------------------------
# atoms
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Trace(Atom):
    beta: float
    name: ClassVar[str] = "trace"
    uses_input: ClassVar[bool] = False

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        return {"m": (EMA(self.beta), "input")}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        return m["m"]


@dataclass(frozen=True, repr=False)
class ScaleByAdam(Atom):
    beta1: float
    beta2: float
    eps: float
    second_moment_of: str = "input"
    name: ClassVar[str] = "scale_by_adam"
    uses_input: ClassVar[bool] = False

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        return {"m": (EMA(self.beta1), "input"), "v": (EMASquare(self.beta2), self.second_moment_of)}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        b1, b2 = self.beta1, self.beta2
        t = ctx.uniform_step()
        if flat(m["m"], m["v"]) and t is not None:
            mb, vb = m["m"].buf, m["v"].buf  # type: ignore[attr-defined]
            denom = vb.sqrt().div_(math.sqrt(1.0 - b2**t))
            if self.eps:
                denom.add_(self.eps)
            else:
                denom.clamp_min_(_tiny(denom.dtype))
            return Flat(torch.div(mb, denom).div_(1.0 - b1**t), m["m"].layout)  # type: ignore[attr-defined]
        names = list(m["m"])
        ms = [m["m"][n] for n in names]
        vs = [m["v"][n] for n in names]
        bc1 = ctx.scalars(names, lambda t: 1.0 - b1**t)
        bc2_sqrt = ctx.scalars(names, lambda t: math.sqrt(1.0 - b2**t))
        denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)
        if self.eps:
            torch._foreach_add_(denom, self.eps)
        else:  # v = 0 only where every input so far was 0, hence m = 0: define 0/0 := 0
            if denom:
                torch._foreach_clamp_min_(denom, _tiny(denom[0].dtype))
        u = torch._foreach_div(ms, denom)
        torch._foreach_div_(u, bc1)
        return dict(zip(names, u))


@dataclass(frozen=True, repr=False)
class ScaleByRMS(Atom):
    beta: float
    eps: float
    name: ClassVar[str] = "scale_by_rms"

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        return {"v": (EMASquare(self.beta), "input")}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        if flat(x, m["v"]):
            denom = m["v"].buf.sqrt()  # type: ignore[attr-defined]
            denom = denom.add_(self.eps) if self.eps else denom.clamp_min_(_tiny(denom.dtype))
            return Flat(torch.div(x.buf, denom), x.layout)  # type: ignore[attr-defined]
        names = list(x)
        denom = torch._foreach_sqrt([m["v"][n] for n in names])
        if self.eps:
            torch._foreach_add_(denom, self.eps)
        elif denom:  # v = 0 only where x = 0 (v >= (1-β)x²): 0/0 := 0
            torch._foreach_clamp_min_(denom, _tiny(denom[0].dtype))
        return dict(zip(names, torch._foreach_div([x[n] for n in names], denom)))


@dataclass(frozen=True, repr=False)
class ScaleByFactoredRMS(Atom):
    decay_rate: float
    eps1: float
    second_moment_of: str = "input"
    name: ClassVar[str] = "scale_by_factored_rms"

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        return {"v": (FactoredSquare(self.decay_rate, self.eps1), self.second_moment_of)}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        v = m["v"]
        out: Tree = {}
        for name, g in x.items():
            if g.dim() >= 2:
                r = v[f"{name}::row"]
                c = v[f"{name}::col"]
                vhat = r * (c / r.sum(dim=-2, keepdim=True))  # V̂ = R·C / 1ᵀR
            else:
                vhat = v[name]
            out[name] = g / vhat.sqrt().clamp_min_(_tiny(vhat.dtype))
        return out


@dataclass(frozen=True, repr=False)
class ClipByBlockRMS(Atom):
    d: float
    name: ClassVar[str] = "clip_by_block_rms"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        names = list(x)
        xs = [x[n] for n in names]
        norms = _norms(xs)
        factors = [1.0 / max(1.0, (nm / math.sqrt(max(t.numel(), 1))) / self.d) for nm, t in zip(norms, xs)]
        return dict(zip(names, torch._foreach_mul(xs, factors))) if xs else {}


@dataclass(frozen=True, repr=False)
class ScaleByRelativeStep(Atom):
    eps2: float
    rho: float
    name: ClassVar[str] = "scale_by_relative_step"
    needs_params: ClassVar[bool] = True

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        names = list(x)
        ps = [ctx.param(n).detach() for n in names]
        p_norms = _norms([p.to(x[n].dtype) for p, n in zip(ps, names)])
        factors = [
            max(self.eps2, nm / math.sqrt(max(p.numel(), 1))) * min(self.rho, 1.0 / math.sqrt(ctx.step_of(n)))
            for nm, p, n in zip(p_norms, ps, names)
        ]
        return dict(zip(names, torch._foreach_mul([x[n] for n in names], factors))) if names else {}


@dataclass(frozen=True, repr=False)
class LionMomentum(Atom):
    beta1: float
    beta2: float
    name: ClassVar[str] = "lion_momentum"

    def moments(self) -> dict[str, tuple[MomentKind, str]]:
        return {"m": (EMA(self.beta2), "input")}

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        # the moment is already m_t = β2 m_{t−1} + (1−β2) x_t, so
        # c_t = β1 m_{t−1} + (1−β1) x_t = a·m_t + (1−a)·x_t with a = β1/β2 (exact algebra; the EMA of
        # x at β2 is then an ordinary shared state and no m_{t−1} copy is kept)
        assert x is not None
        a = self.beta1 / self.beta2
        if flat(x, m["m"]):
            return Flat(torch.lerp(x.buf, m["m"].buf, a), x.layout)  # type: ignore[attr-defined]
        names = list(x)
        return dict(zip(names, torch._foreach_lerp([x[n] for n in names], [m["m"][n] for n in names], a)))


@dataclass(frozen=True, repr=False)
class Sign(Atom):
    name: ClassVar[str] = "sign"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        if isinstance(x, Flat):
            return Flat(torch.sign(x.buf, out=ctx.empty(x.buf)), x.layout)
        names = list(x)
        return dict(zip(names, torch._foreach_sign([x[n] for n in names])))


@dataclass(frozen=True, repr=False)
class Normalize(Atom):
    per_tensor: bool = False
    name: ClassVar[str] = "normalize"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        if isinstance(x, Flat) and not self.per_tensor:
            total = float(torch.linalg.vector_norm(x.buf))
            return Flat(torch.mul(x.buf, 1.0 / total if total > 0 else 0.0, out=ctx.empty(x.buf)), x.layout)
        names = list(x)
        xs = [x[n] for n in names]
        norms = _norms(xs)
        if self.per_tensor:
            factors = [1.0 / nm if nm > 0 else 0.0 for nm in norms]
        else:
            total = math.sqrt(sum(nm * nm for nm in norms))
            factors = [1.0 / total if total > 0 else 0.0] * len(xs)
        return dict(zip(names, torch._foreach_mul(xs, factors))) if xs else {}


@dataclass(frozen=True, repr=False)
class NormalizeRMS(Atom):
    name: ClassVar[str] = "normalize_rms"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        names = list(x)
        xs = [x[n] for n in names]
        norms = _norms(xs)
        factors = [math.sqrt(t.numel()) / nm if nm > 0 else 0.0 for nm, t in zip(norms, xs)]
        return dict(zip(names, torch._foreach_mul(xs, factors))) if xs else {}


@dataclass(frozen=True, repr=False)
class ClipTop(Atom):
    clip: float
    per_tensor: bool = False
    name: ClassVar[str] = "clip_top"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        taus = _thresholds(x, self.clip, self.per_tensor, ctx.cache)
        if isinstance(x, Flat) and not self.per_tensor:
            tau = next(iter(taus.values()))
            if not math.isfinite(tau):
                return x
            return Flat(torch.clamp(x.buf, -tau, tau, out=ctx.empty(x.buf)), x.layout)
        return {n: (v.clamp(-taus[n], taus[n]) if math.isfinite(taus[n]) else v) for n, v in x.items()}


@dataclass(frozen=True, repr=False)
class ClipValue(Atom):
    alpha: float
    name: ClassVar[str] = "clip_value"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        if isinstance(x, Flat):
            return Flat(torch.clamp(x.buf, -self.alpha, self.alpha, out=ctx.empty(x.buf)), x.layout)
        return {n: v.clamp(-self.alpha, self.alpha) for n, v in x.items()}


@dataclass(frozen=True, repr=False)
class ClipNorm(Atom):
    alpha: float
    per_tensor: bool = False
    name: ClassVar[str] = "clip_norm"

    def apply(self, x: Tree | None, m: Mapping[str, Tree], ctx: Ctx) -> Tree:
        assert x is not None
        if isinstance(x, Flat) and not self.per_tensor:
            total = float(torch.linalg.vector_norm(x.buf))
            factor = min(1.0, self.alpha / total) if total > 0 else 1.0
            return Flat(torch.mul(x.buf, factor, out=ctx.empty(x.buf)), x.layout)
        names = list(x)
        xs = [x[n] for n in names]
        norms = _norms(xs)
        if self.per_tensor:
            factors = [min(1.0, self.alpha / nm) if nm > 0 else 1.0 for nm in norms]
        else:
            total = math.sqrt(sum(nm * nm for nm in norms))
            factors = [min(1.0, self.alpha / total) if total > 0 else 1.0] * len(xs)
        return dict(zip(names, torch._foreach_mul(xs, factors))) if xs else {}


# --------------------------------------------------------------------------------------------------
# public constructors
# --------------------------------------------------------------------------------------------------


def trace(beta: float = 0.9) -> Transform:
    """Momentum as an exponential moving average: ``m_t = β·m_{t−1} + (1−β)·x_t``, ``m_0 = 0``; the
    output is ``m_t`` (seed 002 Algorithm 3; no bias correction).

    Note ``torch.optim.SGD(momentum=β, dampening=0)`` keeps ``b_t = β·b_{t−1} + g_t = m_t/(1−β)``.
    """
    return from_atoms([Trace(_check_beta("beta", beta))])


def scale_by_adam(beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8, *, second_moment_of: str = "input") -> Transform:
    """Adam's scaling (Kingma & Ba; seed 002 Algorithm 6): ``m_t = β1·m + (1−β1)·x``,
    ``v_t = β2·v + (1−β2)·y²``, output ``m̂/(√v̂ + ε)`` with ``m̂ = m/(1−β1ᵗ)``, ``v̂ = v/(1−β2ᵗ)``.

    ``y`` is the atom's input (``second_moment_of="input"``) or the raw gradient (``"raw"``), the
    latter for seed 002's numerator-only clipping (App. B.2). ε sits outside the square root, as in
    ``torch.optim.Adam``; with ``eps=0``, 0/0 is defined as 0.
    """
    return from_atoms(
        [ScaleByAdam(_check_beta("beta1", beta1), _check_beta("beta2", beta2), _check_nonneg("eps", eps), _check_source(second_moment_of))]
    )


def scale_by_rms(beta: float = 0.999, eps: float = 0.0) -> Transform:
    """Divide by the root of an EMA of the input's square: ``v_t = β·v_{t−1} + (1−β)·x_t²``, output
    ``x_t/(√v_t + ε)`` (0/0 := 0). After :func:`trace` this is seed 001's Generalized SignSGD
    (Algorithm 1, ``u = m/√v`` with ``v`` from ``m²``, no bias correction); β = 0 gives ``sign(x)``."""
    return from_atoms([ScaleByRMS(_check_beta("beta", beta), _check_nonneg("eps", eps))])


def scale_by_factored_rms(decay_rate: float = -0.8, eps1: float = 1e-30, *, second_moment_of: str = "input") -> Transform:
    """Adafactor's second-moment scaling (seed 002 Algorithms 7 and 8; Shazeer & Stern 2018).

    With ``β̂_t = 1 − t^decay_rate``: a tensor with two or more dims is factored over its last two,
    ``R_t = β̂R + (1−β̂)(G²+ε₁)·1`` (row sums), ``C_t = β̂C + (1−β̂)·1ᵀ(G²+ε₁)`` (column sums),
    ``V̂ = R·C/(1ᵀR)``; a vector keeps ``V̂_t = β̂V̂ + (1−β̂)(G²+ε₁)``. Output ``x/√V̂``.
    ``G`` is the input or (``second_moment_of="raw"``) the raw gradient: seed 002 clips only the
    numerator ``x``.
    """
    if not float(decay_rate) <= 0.0:
        raise ValueError(f"Invalid decay_rate value: {decay_rate} (must be <= 0; β̂_t = 1 − t^decay_rate)")
    return from_atoms([ScaleByFactoredRMS(float(decay_rate), _check_nonneg("eps1", eps1), _check_source(second_moment_of))])


def clip_by_block_rms(d: float = 1.0) -> Transform:
    """Adafactor's update clipping, per tensor: ``Û = U / max(1, RMS(U)/d)``,
    ``RMS(U) = ‖U‖_F/√numel`` (seed 002 Algorithms 7 and 8)."""
    return from_atoms([ClipByBlockRMS(_check_pos("d", d))])


def scale_by_relative_step(eps2: float = 1e-3, rho: float = 1e-2) -> Transform:
    """Adafactor's relative step size, per tensor: multiply by ``α_t/η = max(ε₂, RMS(x_{t−1}))·ρ_t``,
    ``ρ_t = min(ρ, 1/√t)`` (seed 002 Algorithms 7 and 8 with ``ρ = 10⁻²``). Reads the parameters."""
    return from_atoms([ScaleByRelativeStep(_check_nonneg("eps2", eps2), _check_pos("rho", rho))])


def lion_momentum(beta1: float = 0.9, beta2: float = 0.99) -> Transform:
    """Lion's interpolation (seed 002 Algorithm 9; Chen et al. 2023), before the sign:
    ``c_t = β1·m_{t−1} + (1−β1)·x_t`` is the output, and the kept momentum is
    ``m_t = β2·m_{t−1} + (1−β2)·x_t``. Follow with :func:`sign` for Lion."""
    return from_atoms([LionMomentum(_check_beta("beta1", beta1), _check_beta("beta2", beta2, allow_zero=False))])


def sign() -> Transform:
    """``sgn(x)`` coordinate-wise (0 stays 0): signSGD (seed 002 Algorithm 5), Lion's update, and
    seed 000's Smoothed SignSGD when placed *before* :func:`trace`."""
    return from_atoms([Sign()])


def normalize(per_tensor: bool = False) -> Transform:
    """``x/‖x‖₂`` over all coordinates of the model (``per_tensor=False``) or per tensor; a zero
    tensor stays zero. Before :func:`trace` this is seed 000's Smoothed NormSGD (Definition 2)."""
    return from_atoms([Normalize(bool(per_tensor))])


def normalize_rms() -> Transform:
    """Per tensor ``x/‖x‖₂·√numel`` (unit RMS): seed 002 Algorithm 4, normalized SGD
    (``v_t = m_t/‖m_t‖₂·√(mn)``)."""
    return from_atoms([NormalizeRMS()])


def clip_top(clip: float, per_tensor: bool = False) -> Transform:
    """Coordinate-wise top-k% clipping (seed 002 App. B.2): ``x̃_i = sgn(x_i)·min(|x_i|, τ)`` where
    τ is the k-th largest ``|x_i|``, ``k = round(clip·n)`` (at least 1 when ``clip > 0``), over all
    ``n`` coordinates of the model (default) or per tensor. So exactly ``k`` coordinates end at ``±τ``
    (ties aside); ``clip=1`` gives ``τ·sgn(x)``, seed 002's "signSGD is SGD with clipping threshold
    100%". The threshold is exact: a radix select over float bit patterns (one ``bincount`` plus a
    ``kthvalue`` inside one bin), about 10× cheaper than a full ``kthvalue``; it holds a flat copy of
    |x| while it runs.
    """
    return from_atoms([ClipTop(_check_fraction("clip", clip), bool(per_tensor))])


def clip_value(alpha: float) -> Transform:
    """Value clipping, ``clip_[−α, α](x)`` coordinate-wise (seed 000)."""
    return from_atoms([ClipValue(_check_pos("alpha", alpha))])


def clip_norm(alpha: float, per_tensor: bool = False) -> Transform:
    """Norm clipping ``x·min(1, α/‖x‖₂)`` with the norm over the whole model (default; as
    ``torch.nn.utils.clip_grad_norm_``) or per tensor (seed 000)."""
    return from_atoms([ClipNorm(_check_pos("alpha", alpha), bool(per_tensor))])
