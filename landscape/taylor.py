"""Second-order Taylor mode: ``gᵀv`` and ``vᵀHv`` of a traced loss in one forward sweep per direction.

Directional sharpness needs only the scalar ``vᵀ∇²f(x)v``, never the vector ``∇²f(x)v``. Along the
line ``x(s) = x + s·v``, every intermediate tensor of the loss has a Taylor expansion
``y(s) = y₀ + y₁·s + y₂·s²/2``; propagating ``(y₁, y₂)`` forward through the computation gives, at the
loss, ``y₁ = ∇f(x)ᵀv`` and ``y₂ = vᵀ∇²f(x)v`` exactly (up to rounding). The primal values ``y₀`` do not
depend on ``v``: they are computed once and shared by every direction.

Why this and not a Hessian-vector product: for a linear layer ``y = xWᵀ`` a forward+backward pass costs
3 matrix products; an HVP by double backward (or forward-over-reverse) costs 6 more per direction, so no
exact HVP can be cheaper than about 2× a forward+backward per direction. The Taylor sweep needs 4
(``y₁ = x₁Wᵀ + xVᵀ``, ``y₂ = x₂Wᵀ + 2x₁Vᵀ``), about 1.33×. PyTorch has no Taylor mode, and nesting
``jvp`` twice recomputes the first-order terms (8 products), and is wrong through ``layer_norm`` on
torch 2.13 (DESIGN.md hazards). So the loss is traced once into an ATen graph
(``make_fx``) and the graph is interpreted with explicit second-order rules for each operator,
written here from the closed-form derivatives.

A graph holding an operator without a rule is *unsupported*: :meth:`TaylorGraph.unsupported` names
the operators, and callers fall back to Hessian-vector products (``Objective`` does so automatically).
The rules are checked against dense float64 Hessians and double-backward HVPs in the tests.

The traced inputs are the measured parameters, the other parameters and the buffers; the probe batch
is a constant. Values computed from the batch alone (attention masks, position tables, label shifting)
are the same at every point, so Python may read them while tracing: ``.item()`` and branches on them,
as Hugging Face models do with ``attention_mask``, are resolved once at trace time, exactly, since the
batch is fixed. The tensor operations on the batch are still recorded and replayed at each evaluation,
so the recording keeps no computed tensor alive (only references to the batch's own tensors).

Limits (documented in the README): the trace records the operations taken at the point where it was
made, so a loss whose Python control flow depends on *parameter or buffer values* is not supported by
this path (use ``method="hvp"``); plain tensor attributes of the model that are not parameters or
buffers are recorded as constants.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TaylorGraph", "UnsupportedGraph"]

aten = torch.ops.aten
Pair = tuple[Tensor | None, Tensor | None]


class UnsupportedGraph(RuntimeError):
    """The traced loss uses operators the Taylor sweep has no rule for."""


# ---------------------------------------------------------------------------------------------- helpers
def _add(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _scale(a: Tensor | None, c: float) -> Tensor | None:
    return None if a is None else (a if c == 1 else a * c)


def _mul_pair(a0: Tensor, a: Pair, b0: Tensor, b: Pair, mul: Callable[[Tensor, Tensor], Tensor] = torch.mul) -> Pair:
    """Coefficients of a bilinear ``mul(a, b)`` (elementwise product, matrix product, convolution...)."""
    a1, a2 = a
    b1, b2 = b
    y1 = _add(None if a1 is None else mul(a1, b0), None if b1 is None else mul(a0, b1))
    y2 = _add(None if a2 is None else mul(a2, b0), None if b2 is None else mul(a0, b2))
    if a1 is not None and b1 is not None:
        y2 = _add(y2, mul(a1, b1) * 2)
    return y1, y2


def _mm_pair(a0: Tensor, a: Pair, b0: Tensor, b: Pair, batched: bool) -> Pair:
    """``a @ b`` (2-D or batched 3-D) with the accumulations fused into ``addmm_`` / ``baddbmm_``."""
    mm = torch.bmm if batched else torch.mm

    def acc(out: Tensor | None, x: Tensor, y: Tensor, alpha: float = 1.0) -> Tensor:
        if out is None:
            r = mm(x, y)
            return r if alpha == 1 else r.mul_(alpha)
        return out.baddbmm_(x, y, alpha=alpha) if batched else out.addmm_(x, y, alpha=alpha)

    a1, a2 = a
    b1, b2 = b
    y1 = y2 = None
    if a1 is not None:
        y1 = acc(y1, a1, b0)
    if b1 is not None:
        y1 = acc(y1, a0, b1)
    if a2 is not None:
        y2 = acc(y2, a2, b0)
    if b2 is not None:
        y2 = acc(y2, a0, b2)
    if a1 is not None and b1 is not None:
        y2 = acc(y2, a1, b1, 2.0)
    return y1, y2


def _chain(d1: Tensor, d2: Tensor | None, x: Pair) -> Pair:
    """``y = φ(x)`` elementwise with ``φ'(x₀) = d1`` and ``φ''(x₀) = d2`` (``None``: zero)."""
    x1, x2 = x
    if x1 is None and x2 is None:
        return None, None
    y1 = None if x1 is None else d1 * x1
    y2 = None
    if x1 is not None and d2 is not None:
        y2 = x1 * x1
        y2.mul_(d2)
    if x2 is not None:
        y2 = d1 * x2 if y2 is None else y2.addcmul_(d1, x2)
    return y1, y2


# ---------------------------------------------------------------------------------------------- rules
# A rule gets (node, P, C, cache) where P(arg) is the primal value of an argument, C(arg) its pair of
# coefficients (None, None when it does not depend on the direction), and cache a per-node dict that
# lives as long as the primal values (for direction-independent factors). It returns the output pair,
# or a list of pairs for operators returning several tensors.

Rule = Callable[[Node, Callable[[Any], Any], Callable[[Any], Pair], dict], Any]
RULES: dict[Any, Rule] = {}


def _rule(*ops):
    def deco(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn

    return deco


# Operators linear in their first tensor argument, the others being shapes, dims or index tensors.
_LINEAR_FIRST = [
    "permute.default", "transpose.int", "t.default",
    "expand.default", "clone.default", "contiguous.default", "alias.default", "unsqueeze.default",
    "squeeze.default", "squeeze.dim", "squeeze.dims", "sum.default", "sum.dim_IntList", "mean.default",
    "mean.dim", "neg.default", "_to_copy.default", "slice.Tensor", "select.int", "index_select.default",
    "gather.default", "index.Tensor", "repeat.default", "flip.default", "roll.default", "tril.default",
    "triu.default", "diagonal.default", "narrow.default", "mul.Scalar", "div.Scalar", "lift_fresh_copy.default",
    "_unsafe_index.Tensor", "expand_copy.default", "permute_copy.default",
    "unsqueeze_copy.default", "squeeze_copy.dims", "transpose_copy.int", "t_copy.default",
    "avg_pool1d.default", "avg_pool2d.default", "avg_pool3d.default", "_adaptive_avg_pool2d.default",
    "adaptive_avg_pool1d.default", "unfold.default", "pixel_shuffle.default", "movedim.int", "movedim.intlist",
    "flatten.using_ints", "unflatten.int",
]
_LINEAR_FIRST_MULTI = ["split.Tensor", "split_with_sizes.default", "unbind.int", "chunk.default", "tensor_split.indices"]


def _op(name: str):
    pkt, _, overload = name.partition(".")
    packet = getattr(aten, pkt, None)
    return None if packet is None else getattr(packet, overload, None)


def _linear_first(node, P, C, cache):
    a = node.args[0]
    x1, x2 = C(a)
    rest = [P(r) for r in node.args[1:]]
    kw = {k: P(v) for k, v in node.kwargs.items()}
    return tuple(None if x is None else node.target(x, *rest, **kw) for x in (x1, x2))


@_rule(aten.view.default, aten._unsafe_view.default, aten.view_copy.default, aten.reshape.default)
def _view(node, P, C, cache):
    # A coefficient need not share the primal's memory layout, so views become reshapes.
    shape = P(node.args[1])
    return tuple(None if x is None else x.reshape(shape) for x in C(node.args[0]))


def _linear_first_multi(node, P, C, cache):
    y1, y2 = _linear_first(node, P, C, cache)
    n = len(P(node))
    return [(None if y1 is None else y1[i], None if y2 is None else y2[i]) for i in range(n)]


for _name in _LINEAR_FIRST:
    if (_o := _op(_name)) is not None:
        RULES[_o] = _linear_first
for _name in _LINEAR_FIRST_MULTI:
    if (_o := _op(_name)) is not None:
        RULES[_o] = _linear_first_multi


@_rule(aten.detach.default)
def _detach(node, P, C, cache):
    return None, None


@_rule(aten.embedding.default)
def _embedding(node, P, C, cache):
    # PyTorch treats the ``padding_idx`` row as a constant (autograd gives it no gradient, so no
    # optimizer moves it); so does this rule, which keeps both engines on the same function.
    w, idx = node.args[0], P(node.args[1])
    pad = P(node.args[2]) if len(node.args) > 2 else node.kwargs.get("padding_idx", -1)
    out = []
    for x in C(w):
        y = None if x is None else aten.embedding.default(x, idx)
        if y is not None and pad is not None and pad >= 0:
            y = y.masked_fill((idx == pad).unsqueeze(-1), 0.0)
        out.append(y)
    return tuple(out)


@_rule(aten.add.Tensor, aten.sub.Tensor)
def _add_sub(node, P, C, cache):
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    sign = -alpha if node.target is aten.sub.Tensor else alpha
    out0 = P(node)
    res = []
    for x, y in zip(C(a), C(b)):
        y = _scale(y, sign)
        r = _add(x, y)
        if r is not None and r.shape != out0.shape:
            r = r.expand(out0.shape)
        res.append(r)
    return tuple(res)


@_rule(aten.add.Scalar, aten.sub.Scalar)
def _add_scalar(node, P, C, cache):
    return C(node.args[0])


@_rule(aten.rsub.Scalar)
def _rsub_scalar(node, P, C, cache):
    alpha = node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)
    return tuple(_scale(x, -alpha) for x in C(node.args[0]))


@_rule(aten.rsub.Tensor)
def _rsub_tensor(node, P, C, cache):  # other - alpha * self
    a, b = node.args[0], node.args[1]
    alpha = node.kwargs.get("alpha", 1)
    out0 = P(node)
    res = []
    for x, y in zip(C(a), C(b)):
        r = _add(y, _scale(x, -alpha))
        res.append(None if r is None else (r if r.shape == out0.shape else r.expand(out0.shape)))
    return tuple(res)


@_rule(aten.cat.default, aten.stack.default)
def _cat(node, P, C, cache):
    parts = node.args[0]
    rest = [P(r) for r in node.args[1:]]
    out = []
    for k in (0, 1):
        cs = [C(p)[k] for p in parts]
        if all(c is None for c in cs):
            out.append(None)
        else:
            out.append(node.target([c if c is not None else torch.zeros_like(P(p)) for c, p in zip(cs, parts)], *rest))
    return tuple(out)


@_rule(aten.where.self)
def _where(node, P, C, cache):
    cond, a, b = node.args
    c0 = P(cond)
    out0 = P(node)
    res = []
    for x, y in zip(C(a), C(b)):
        if x is None and y is None:
            res.append(None)
        else:
            res.append(torch.where(c0, x if x is not None else 0.0, y if y is not None else 0.0).expand(out0.shape))
    return tuple(res)


@_rule(aten.masked_fill.Scalar)
def _masked_fill(node, P, C, cache):
    mask = P(node.args[1])
    return tuple(None if x is None else x.masked_fill(mask, 0.0) for x in C(node.args[0]))


@_rule(aten.constant_pad_nd.default)
def _pad(node, P, C, cache):
    pad = node.args[1]
    return tuple(None if x is None else aten.constant_pad_nd.default(x, pad, 0.0) for x in C(node.args[0]))


@_rule(aten.mul.Tensor)
def _mul(node, P, C, cache):
    a, b = node.args[0], node.args[1]
    a0, b0 = P(a), P(b)
    if not isinstance(b, Node):  # mul by a Python scalar recorded as mul.Tensor
        return tuple(_scale(x, b) for x in C(a))
    if not isinstance(a, Node):
        return tuple(_scale(x, a) for x in C(b))
    return _mul_pair(a0, C(a), b0, C(b))


def _reciprocal_pair(b0: Tensor, b: Pair, cache: dict, key: str) -> tuple[Tensor, Pair]:
    """1/b: r' = −b'/b², r'' = 2b'²/b³ − b''/b²."""
    if key not in cache:
        r0 = 1.0 / b0
        cache[key] = (r0, -(r0 * r0), 2 * r0 * r0 * r0)
    r0, d1, d2 = cache[key]
    return r0, _chain(d1, d2, b)


@_rule(aten.div.Tensor)
def _div(node, P, C, cache):
    a, b = node.args[0], node.args[1]
    if node.kwargs.get("rounding_mode") is not None:
        return None, None  # piecewise constant
    if not isinstance(b, Node):
        return tuple(_scale(x, 1.0 / b) for x in C(a))
    b1, b2 = C(b)
    if b1 is None and b2 is None:
        b0 = P(b)
        return tuple(None if x is None else x / b0 for x in C(a))
    r0, r = _reciprocal_pair(P(b), (b1, b2), cache, "recip")
    if not isinstance(a, Node):
        return tuple(_scale(x, a) for x in r)
    return _mul_pair(P(a), C(a), r0, r)


@_rule(aten.mm.default)
def _mm(node, P, C, cache):
    a, b = node.args
    return _mm_pair(P(a), C(a), P(b), C(b), batched=False)


@_rule(aten.bmm.default)
def _bmm(node, P, C, cache):
    a, b = node.args
    return _mm_pair(P(a), C(a), P(b), C(b), batched=True)


@_rule(aten.addmm.default, aten.baddbmm.default)
def _addmm(node, P, C, cache):
    bias, a, b = node.args[:3]
    beta = node.kwargs.get("beta", 1)
    alpha = node.kwargs.get("alpha", 1)
    batched = node.target is aten.baddbmm.default
    y1, y2 = _mm_pair(P(a), C(a), P(b), C(b), batched=batched)
    if alpha != 1:
        y1, y2 = _scale(y1, alpha), _scale(y2, alpha)
    out0 = P(node)
    res = []
    for y, bb in zip((y1, y2), C(bias)):
        if bb is not None and beta != 0:
            bb = _scale(bb, beta)
            y = bb.expand(out0.shape).clone() if y is None else y.add_(bb)
        res.append(y)
    return tuple(res)


@_rule(aten.dot.default, aten.mv.default)
def _dot(node, P, C, cache):
    a, b = node.args
    return _mul_pair(P(a), C(a), P(b), C(b), mul=node.target)


@_rule(aten.convolution.default)
def _conv(node, P, C, cache):
    x, w, bias = node.args[:3]
    rest = node.args[3:]

    def conv(i, k):
        return aten.convolution.default(i, k, None, *rest)

    y1, y2 = _mul_pair(P(x), C(x), P(w), C(w), mul=conv)
    shape = [1, -1] + [1] * (P(node).dim() - 2)
    b1, b2 = C(bias) if bias is not None else (None, None)
    return _add(y1, None if b1 is None else b1.view(shape)), _add(y2, None if b2 is None else b2.view(shape))


# Elementwise functions: (φ'(x₀), φ''(x₀)) from the input x₀ and the output y₀.
def _unary(op, derivs):
    def rule(node, P, C, cache):
        x = C(node.args[0])
        if x == (None, None):
            return None, None
        if "d" not in cache:
            cache["d"] = derivs(P(node.args[0]), P(node), node)
        d1, d2 = cache["d"]
        return _chain(d1, d2, x)

    RULES[op] = rule


_SQRT_2PI = math.sqrt(2 * math.pi)
_unary(aten.exp.default, lambda x, y, n: (y, y))
_unary(aten.expm1.default, lambda x, y, n: (y + 1, y + 1))
_unary(aten.log.default, lambda x, y, n: (1 / x, -1 / (x * x)))
_unary(aten.log1p.default, lambda x, y, n: (1 / (1 + x), -1 / ((1 + x) * (1 + x))))
_unary(aten.sqrt.default, lambda x, y, n: (0.5 / y, -0.25 / (y * y * y)))
_unary(aten.rsqrt.default, lambda x, y, n: (-0.5 * y * y * y, 0.75 * y**5))
_unary(aten.reciprocal.default, lambda x, y, n: (-(y * y), 2 * y * y * y))
_unary(aten.tanh.default, lambda x, y, n: (1 - y * y, -2 * y * (1 - y * y)))
_unary(aten.sigmoid.default, lambda x, y, n: (y * (1 - y), y * (1 - y) * (1 - 2 * y)))
_unary(aten.sin.default, lambda x, y, n: (torch.cos(x), -y))
_unary(aten.cos.default, lambda x, y, n: (-torch.sin(x), -y))
_unary(aten.erf.default, lambda x, y, n: (2 / math.sqrt(math.pi) * torch.exp(-x * x), -4 / math.sqrt(math.pi) * x * torch.exp(-x * x)))
_unary(aten.relu.default, lambda x, y, n: ((x > 0).to(x.dtype), None))
_unary(aten.abs.default, lambda x, y, n: (torch.sign(x), None))
_unary(aten.softplus.default, lambda x, y, n: _softplus_derivs(x, n))
_unary(aten.silu.default, lambda x, y, n: _silu_derivs(x))
_unary(aten.gelu.default, lambda x, y, n: _gelu_derivs(x, n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")))
_unary(aten.pow.Tensor_Scalar, lambda x, y, n: _pow_derivs(x, n.args[1]))
_unary(aten.leaky_relu.default, lambda x, y, n: (torch.ones_like(x).masked_fill_(x <= 0, n.args[1] if len(n.args) > 1 else 0.01), None))
# At the boundaries, the derivative autograd uses: clamp's includes them, hardtanh's excludes them.
_unary(aten.clamp.default, lambda x, y, n: (_clamp_mask(x, *(list(n.args[1:]) + [None, None])[:2]), None))
_unary(aten.clamp_min.default, lambda x, y, n: (_clamp_mask(x, n.args[1], None), None))
_unary(aten.clamp_max.default, lambda x, y, n: (_clamp_mask(x, None, n.args[1]), None))
_unary(
    aten.hardtanh.default,
    lambda x, y, n: (_clamp_mask(x, *(list(n.args[1:]) + [-1.0, 1.0])[:2], inclusive=False), None),
)


def _clamp_mask(x: Tensor, lo, hi, inclusive: bool = True) -> Tensor:
    m = torch.ones_like(x)
    if lo is not None:
        m = m * ((x >= lo) if inclusive else (x > lo))
    if hi is not None:
        m = m * ((x <= hi) if inclusive else (x < hi))
    return m


def _softplus_derivs(x: Tensor, node: Node):
    beta = node.args[1] if len(node.args) > 1 else 1
    threshold = node.args[2] if len(node.args) > 2 else 20
    s = torch.sigmoid(beta * x)
    linear = beta * x > threshold
    return torch.where(linear, 1.0, s), torch.where(linear, 0.0, beta * s * (1 - s))


def _silu_derivs(x: Tensor):
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s)), s * (1 - s) * (2 + x * (1 - 2 * s))


def _gelu_derivs(x: Tensor, approximate: str):
    if approximate == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (x + 0.044715 * x**3)
        di = c * (1 + 3 * 0.044715 * x * x)
        ddi = c * 6 * 0.044715 * x
        t = torch.tanh(inner)
        sech2 = 1 - t * t
        d1 = 0.5 * (1 + t) + 0.5 * x * sech2 * di
        d2 = sech2 * di + 0.5 * x * (-2 * t * sech2 * di * di + sech2 * ddi)
        return d1, d2
    phi = torch.exp(-0.5 * x * x) / _SQRT_2PI
    return 0.5 * (1 + torch.erf(x / math.sqrt(2))) + x * phi, phi * (2 - x * x)


def _pow_derivs(x: Tensor, p: float):
    if p == 0:
        return torch.zeros_like(x), None
    if p == 1:
        return torch.ones_like(x), None
    if p == 2:
        return 2 * x, torch.full_like(x, 2.0)
    return p * x ** (p - 1), p * (p - 1) * x ** (p - 2)


@_rule(aten._softmax.default, *([aten._safe_softmax.default] if hasattr(aten, "_safe_softmax") else []))
def _softmax(node, P, C, cache):
    # With a = x₁ − ⟨p, x₁⟩:  p₁ = p⊙a,  p₂ = p⊙(a² + x₂ − ⟨p, x₂⟩ − ⟨p, a²⟩).
    x1, x2 = C(node.args[0])
    if x1 is None and x2 is None:
        return None, None
    p = P(node)
    dim = node.args[1]
    y1 = None
    if x1 is not None:
        a = x1 - (p * x1).sum(dim, keepdim=True)
        y1 = p * a
        inner = a.mul_(a)
        inner.sub_((p * inner).sum(dim, keepdim=True))
    if x2 is not None:
        t = x2 - (p * x2).sum(dim, keepdim=True)
        inner = t if x1 is None else inner.add_(t)
    return y1, inner.mul_(p)


@_rule(aten._log_softmax.default)
def _log_softmax(node, P, C, cache):
    x1, x2 = C(node.args[0])
    if x1 is None and x2 is None:
        return None, None
    dim = node.args[1]
    if "p" not in cache:
        cache["p"] = P(node).exp()
    p = cache["p"]
    y1 = y2 = None
    if x1 is not None:
        m1 = (p * x1).sum(dim, keepdim=True)
        y1 = x1 - m1
        y2 = -((p * x1 * x1).sum(dim, keepdim=True) - m1 * m1)
    if x2 is not None:
        t = x2 - (p * x2).sum(dim, keepdim=True)
        y2 = t if y2 is None else t + y2
    return y1, y2


@_rule(aten.logsumexp.default)
def _logsumexp(node, P, C, cache):
    x1, x2 = C(node.args[0])
    dims = node.args[1]
    keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if "p" not in cache:
        cache["p"] = torch.exp(P(node.args[0]) - _keep(P(node), dims, keep))
    p = cache["p"]
    y1 = y2 = None
    if x1 is not None:
        m1 = (p * x1).sum(dims, keepdim=True)
        y1 = m1
        y2 = (p * x1 * x1).sum(dims, keepdim=True) - m1 * m1
    if x2 is not None:
        y2 = _add(y2, (p * x2).sum(dims, keepdim=True))
    if not keep:
        y1 = None if y1 is None else _squeeze_dims(y1, dims)
        y2 = None if y2 is None else _squeeze_dims(y2, dims)
    return y1, y2


def _keep(t: Tensor, dims, keep: bool) -> Tensor:
    if keep:
        return t
    for d in sorted(_norm_dims(dims, t.dim() + len(_as_list(dims)))):
        t = t.unsqueeze(d)
    return t


def _as_list(dims) -> list[int]:
    return [dims] if isinstance(dims, int) else list(dims)


def _norm_dims(dims, ndim: int) -> list[int]:
    return [d % ndim for d in _as_list(dims)]


def _squeeze_dims(t: Tensor, dims) -> Tensor:
    for d in sorted(_norm_dims(dims, t.dim()), reverse=True):
        t = t.squeeze(d)
    return t


@_rule(aten.amax.default, aten.amin.default)
def _amax(node, P, C, cache):
    # Piecewise linear: the derivative follows the selected entries (ties share equally, as in autograd).
    x = node.args[0]
    dims = node.args[1] if len(node.args) > 1 else list(range(P(x).dim()))
    keep = node.args[2] if len(node.args) > 2 else False
    if "w" not in cache:
        y = _keep(P(node), dims, keep)
        sel = (P(x) == y).to(P(x).dtype)
        cache["w"] = sel / sel.sum(dims, keepdim=True)
    w = cache["w"]
    return tuple(None if t is None else (t * w).sum(dims, keepdim=keep) for t in C(x))


@_rule(aten.max.dim, aten.min.dim)
def _max_dim(node, P, C, cache):
    x, dim = node.args[0], node.args[1]
    keep = node.args[2] if len(node.args) > 2 else False
    idx = P(node)[1]
    gidx = idx if keep else idx.unsqueeze(dim)
    vals = [None if t is None else (t.gather(dim, gidx) if keep else t.gather(dim, gidx).squeeze(dim)) for t in C(x)]
    return [tuple(vals), (None, None)]


@_rule(aten.max_pool2d_with_indices.default, aten.max_pool1d_with_indices.default, aten.max_pool3d_with_indices.default)
def _max_pool(node, P, C, cache):
    idx = P(node)[1]
    out = []
    for t in C(node.args[0]):
        if t is None:
            out.append(None)
            continue
        flat = t.flatten(-idx.dim() + 2 if idx.dim() > 2 else -1)
        out.append(flat.gather(-1, idx.flatten(-idx.dim() + 2 if idx.dim() > 2 else -1)).view(idx.shape))
    return [tuple(out), (None, None)]


@_rule(aten.native_layer_norm.default)
def _layer_norm(node, P, C, cache):
    # n = (x − μ)·r with r = (v + ε)^(−1/2), v = mean((x − μ)²); M is the mean over the normalised dims.
    # With tₖ = r₀·(xₖ − M xₖ) and b = M(n₀ t₁) (M n₀ = 0 makes the centring of t inside M free):
    #   n₁ = t₁ − b·n₀
    #   n₂ = t₂ − 2b·t₁ + n₀·(3b² − M(t₁²) − M(n₀ t₂))
    x, shape, w, b = node.args[:4]
    dims = tuple(range(-len(shape), 0))
    out0, mean0, rstd0 = P(node)
    x1, x2 = C(x)
    if "n0" not in cache:
        cache["n0"] = (P(x) - mean0) * rstd0
    n0 = cache["n0"]
    n1 = n2 = None
    if x1 is not None:
        t1 = (x1 - x1.mean(dims, keepdim=True)).mul_(rstd0)
        bb = (n0 * t1).mean(dims, keepdim=True)
        n1 = torch.addcmul(t1, n0, bb, value=-1.0)
        coef = 3 * bb * bb - (t1 * t1).mean(dims, keepdim=True)
        if x2 is not None:
            t2 = (x2 - x2.mean(dims, keepdim=True)).mul_(rstd0)
            coef = coef - (n0 * t2).mean(dims, keepdim=True)
            n2 = t2.addcmul_(t1, bb, value=-2.0)
        else:
            n2 = t1.mul(bb).mul_(-2.0)
        n2.addcmul_(n0, coef)
    elif x2 is not None:
        t2 = (x2 - x2.mean(dims, keepdim=True)).mul_(rstd0)
        n2 = t2.addcmul_(n0, (n0 * t2).mean(dims, keepdim=True), value=-1.0)
    w0 = P(w) if w is not None else None
    w1, w2 = C(w) if w is not None else (None, None)
    b1, b2 = C(b) if b is not None else (None, None)
    y1 = None if n1 is None else (n1 * w0 if w0 is not None else n1)
    y2 = None if n2 is None else (n2.mul_(w0) if w0 is not None else n2)
    if w1 is not None:
        y1 = n0 * w1 if y1 is None else y1.addcmul_(n0, w1)
        if n1 is not None:
            y2 = n1.mul(w1).mul_(2.0) if y2 is None else y2.addcmul_(n1, w1, value=2.0)
    if w2 is not None:
        y2 = n0 * w2 if y2 is None else y2.addcmul_(n0, w2)
    if b1 is not None:
        y1 = b1.expand(out0.shape).clone() if y1 is None else y1.add_(b1)
    if b2 is not None:
        y2 = b2.expand(out0.shape).clone() if y2 is None else y2.add_(b2)
    return [(y1, y2), (None, None), (None, None)]


@_rule(aten._native_batch_norm_legit_no_training.default, aten.native_batch_norm.default)
def _batch_norm_eval(node, P, C, cache):
    if node.target is aten.native_batch_norm.default:
        x, w, b, rm, rv, _training, _momentum, eps = node.args
    else:
        x, w, b, rm, rv, _momentum, eps = node.args
    if C(rm) != (None, None) or C(rv) != (None, None):
        raise UnsupportedGraph("batch norm statistics that depend on the parameters")
    shape = [1, -1] + [1] * (P(x).dim() - 2)
    if "scale" not in cache:
        cache["inv"] = torch.rsqrt(P(rv) + eps).view(shape)
        cache["n0"] = (P(x) - P(rm).view(shape)) * cache["inv"]
        cache["scale"] = cache["inv"] * (P(w).view(shape) if w is not None else 1.0)
    scale, n0 = cache["scale"], cache["n0"]
    x1, x2 = C(x)
    w1, w2 = C(w) if w is not None else (None, None)
    b1, b2 = C(b) if b is not None else (None, None)
    inv = cache["inv"]
    y1 = _add(None if x1 is None else x1 * scale, None if w1 is None else n0 * w1.view(shape))
    y2 = None if x2 is None else x2 * scale
    if x1 is not None and w1 is not None:
        y2 = _add(y2, 2 * x1 * inv * w1.view(shape))
    if w2 is not None:
        y2 = _add(y2, n0 * w2.view(shape))
    y1 = _add(y1, None if b1 is None else b1.view(shape).expand_as(P(x)))
    y2 = _add(y2, None if b2 is None else b2.view(shape).expand_as(P(x)))
    return [(y1, y2), (None, None), (None, None)]


@_rule(aten.nll_loss_forward.default)
def _nll(node, P, C, cache):
    x = node.args[0]
    rest = [P(a) for a in node.args[1:]]
    out = tuple(None if t is None else aten.nll_loss_forward.default(t, *rest)[0] for t in C(x))
    return [out, (None, None)]


@_rule(aten.mse_loss.default)
def _mse(node, P, C, cache):
    a, b = node.args[0], node.args[1]
    reduction = node.args[2] if len(node.args) > 2 else node.kwargs.get("reduction", 1)
    d0 = P(a) - P(b)
    a1, a2 = C(a)
    b1, b2 = C(b)
    d1 = _add(a1, _scale(b1, -1))
    d2 = _add(a2, _scale(b2, -1))
    # (d²)' = 2 d d',  (d²)'' = 2 d'² + 2 d d''
    y1 = None if d1 is None else 2 * d0 * d1
    y2 = _add(None if d1 is None else 2 * d1 * d1, None if d2 is None else 2 * d0 * d2)
    red = {0: lambda t: t, 1: torch.mean, 2: torch.sum}[reduction]
    return tuple(None if t is None else red(t) for t in (y1, y2))


# Operators whose outputs never depend on the direction (constants, shapes, comparisons, random-free fills).
_CONSTANT = {
    op
    for name in (
        "full_like.default", "zeros_like.default", "ones_like.default", "empty_like.default", "sign.default",
        "floor.default", "ceil.default", "round.default", "trunc.default", "argmax.default", "argmin.default",
        "sym_size.int", "sym_numel.default", "sym_stride.int", "_local_scalar_dense.default",
        "scalar_tensor.default",
    )
    if (op := _op(name)) is not None
}


# ---------------------------------------------------------------------------------------------- the graph
def _mutated(func: Any, args: Sequence[Any], kwargs: dict) -> list[Tensor]:
    """The tensors an operator writes into (its schema's ``Tensor(a!)`` arguments)."""
    schema = getattr(func, "_schema", None)
    if schema is None:
        return []
    out = []
    for i, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        v = kwargs.get(arg.name, args[i] if i < len(args) and not arg.kwarg_only else None)
        if isinstance(v, Tensor):
            out.append(v)
    return out


class _BatchConstants(TorchDispatchMode):
    """Inside ``make_fx``: values computed from the batch alone are read at trace time.

    An operator that reads no traced input (only the batch, factories, plain tensor attributes, or
    results of such operators) gives the same result at every point: it is recorded and replayed as
    usual, but an operator that reads its *values* (``.item()``, ``bool(t)``, ``torch.equal``: what
    Hugging Face's attention-mask handling does) runs eagerly on the values of the trace, so the Python
    branches taken on them are resolved once, exactly as for any fixed batch. What depends on the
    parameters or buffers cannot be read this way (the trace fails, and the loss is measured by HVPs).

    Nothing computed is stored with the recording: the batch-only operations are replayed at each
    evaluation (their results live as long as the ones that depend on the point), and the only tensor
    constants are the batch's own tensors (references, not copies) and literals.
    """

    def __init__(self) -> None:
        super().__init__()
        from torch.fx.experimental.proxy_tensor import get_proxy_mode
        from torch.utils.weak import WeakIdKeyDictionary

        mode = get_proxy_mode()
        if mode is None:  # pragma: no cover - only entered inside make_fx
            raise RuntimeError("batch constants need an active make_fx trace")
        self.tracer = mode.tracer
        self.constant = WeakIdKeyDictionary()  # recorded tensors computed from the batch alone
        # whether the trace read values (or value-dependent shapes) of tensors that depend on the
        # point: then a Python branch on them was frozen at the traced point (see TaylorGraph)
        self.read_point_values = False

    def _traced(self, t: Tensor) -> bool:
        """``t`` depends on the traced inputs."""
        from torch.fx.experimental.proxy_tensor import has_proxy_slot

        return t not in self.constant and has_proxy_slot(t, self.tracer)

    def _now_traced(self, target: Tensor) -> None:
        """``target`` is written values that depend on the point: it and every alias of it are no
        longer batch constants (their values cannot be read at trace time)."""
        ptr = target.untyped_storage().data_ptr()
        for t in list(self.constant.keys()):
            if t.untyped_storage().data_ptr() == ptr:
                del self.constant[t]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing, has_proxy_slot

        kwargs = kwargs or {}
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, Tensor)]
        if any(self._traced(t) for t in tensors):
            if (torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags
                    or func is aten.is_nonzero.default):
                self.read_point_values = True
            for t in _mutated(func, args, kwargs):
                if t in self.constant:
                    self._now_traced(t)
                elif not has_proxy_slot(t, self.tracer):
                    # A batch tensor is no recorded value: its aliases would stay constants.
                    raise UnsupportedGraph(
                        f"the loss writes values that depend on the parameters or buffers into a tensor of the "
                        f"batch, in place ({func})"
                    )
            return func(*args, **kwargs)
        if torch.Tag.data_dependent_output in func.tags or func is aten.is_nonzero.default:
            with disable_proxy_modes_tracing():
                return func(*args, **kwargs)
        out = func(*args, **kwargs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, Tensor):
                self.constant[t] = True
        return out


class TaylorGraph:
    """A loss traced once into an ATen graph, swept in second-order Taylor mode along directions.

    Args:
        fn: ``fn(measured, others) -> scalar loss`` with ``measured`` and ``others`` lists of tensors.
            Called once with real tensors to record the graph (it runs the computation). Tensors it
            reads from elsewhere (its batch) are constants whose values it may read (``.item()``,
            branches) while it is traced (:class:`_BatchConstants`).
        measured: the tensors the directions perturb.
        others: the other tensor inputs (frozen parameters, buffers), read again at every evaluation.
    """

    def __init__(self, fn: Callable[[list[Tensor], list[Tensor]], Tensor], measured: Sequence[Tensor], others: Sequence[Tensor]) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        modes: list[_BatchConstants] = []

        def traced(meas: list[Tensor], rest: list[Tensor]) -> Tensor:
            with _BatchConstants() as mode:
                modes.append(mode)
                return fn(meas, rest)

        with torch.no_grad():
            self.gm: GraphModule = make_fx(traced, tracing_mode="real")(list(measured), list(others))
        # True when the loss read values of tensors that depend on the point while it was traced
        # (``.item()``, ``bool(t)``, ``torch.equal``, value-dependent shapes): the recording then holds
        # the branches taken at the traced point and must be checked against the model at every point.
        # False: the recording is the loss's own dataflow, valid at every point where it was valid once.
        self.reads_point_values = any(m.read_point_values for m in modes)
        self.n_measured = len(measured)
        nodes = list(self.gm.graph.nodes)
        self.placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(self.placeholders) != len(measured) + len(others):
            raise UnsupportedGraph(f"trace has {len(self.placeholders)} inputs, expected {len(measured) + len(others)}")
        out = [n for n in nodes if n.op == "output"][0].args[0]
        out = out[0] if isinstance(out, (list, tuple)) else out
        if not isinstance(out, Node):
            raise UnsupportedGraph("the loss does not depend on the inputs")
        self.output = out
        _functionalize_inplace(nodes)
        # Which nodes depend on the direction (statically), and the plan of rules for them.
        live: set[Node] = set(self.placeholders[: self.n_measured])
        self.plan: list[tuple[Node, Rule | None]] = []
        missing: dict[str, int] = {}
        for n in nodes:
            if n.op != "call_function":
                continue
            deps = [a for a in n.all_input_nodes if a in live]
            if not deps:
                continue
            if n.target is operator.getitem:
                live.add(n)
                self.plan.append((n, None))
                continue
            if n.target in _CONSTANT:
                continue
            val = n.meta.get("val", _MISSING)
            if val is not _MISSING and _non_float(val):
                continue
            if n.target not in RULES or (n.target is aten.native_batch_norm.default and n.args[5]):
                missing[str(n.target)] = missing.get(str(n.target), 0) + 1
                continue
            live.add(n)
            self.plan.append((n, RULES[n.target]))
        self._missing = missing
        if self.output not in live and not missing:
            self._constant = True
        else:
            self._constant = False
        # Free tangent values after their last use.
        last: dict[Node, int] = {}
        for i, (n, _) in enumerate(self.plan):
            for a in n.all_input_nodes:
                last[a] = i
        self._free_after: list[list[Node]] = [[] for _ in self.plan]
        for a, i in last.items():
            if a is not self.output:
                self._free_after[i].append(a)
        # The primal values the sweeps read: the swept nodes and their inputs (the rest is dropped after
        # the primal pass, as autograd drops what no backward formula saved).
        self._keep: set[Node] = {self.output}
        for n, _ in self.plan:
            self._keep.add(n)
            self._keep.update(n.all_input_nodes)

    def unsupported(self) -> dict[str, int]:
        """Operators (with counts) that the direction reaches and that have no second-order rule."""
        return dict(self._missing)

    def primal(self, measured: Sequence[Tensor], others: Sequence[Tensor]) -> Primal:
        """Evaluate the loss at a point, keeping every intermediate value for the sweeps."""
        if self._missing:
            raise UnsupportedGraph(f"no second-order rule for {sorted(self._missing)}")
        env: dict[Node, Any] = {}
        inputs = iter(list(measured) + list(others))
        with torch.no_grad():
            for n in self.gm.graph.nodes:
                if n.op == "placeholder":
                    env[n] = next(inputs)
                elif n.op == "get_attr":
                    env[n] = _fetch_attr(self.gm, n.target)
                elif n.op == "call_function":
                    args = torch.fx.node.map_arg(n.args, lambda a: env[a])
                    kwargs = torch.fx.node.map_arg(n.kwargs, lambda a: env[a])
                    env[n] = n.target(*args, **kwargs)
                elif n.op == "output":
                    break
                else:  # pragma: no cover - make_fx emits no call_module / call_method
                    raise UnsupportedGraph(f"unexpected node {n.op}")
        return Primal(self, {n: v for n, v in env.items() if n in self._keep})


_MISSING = object()


def _returns_alias(node: Node) -> bool:
    """Whether ``node``'s operator returns a view of one of its inputs (or we cannot tell)."""
    if node.op != "call_function":
        return True
    if node.target is operator.getitem:
        return _returns_alias(node.args[0])
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return True
    return any(r.alias_info is not None for r in schema.returns)


def _functionalize_inplace(nodes: list[Node]) -> None:
    """Replace in-place ATen operators (``squeeze_`` from a 1-D matmul, ``masked_fill_`` in label
    smoothing, ...) by their out-of-place forms where that cannot change the result: when the mutated
    tensor is a fresh result (not a view of another: writing into a view writes its base) that
    nothing else reads. The others stay in place (they are unsupported if the direction reaches them)."""
    for n in nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        packet = n.target.overloadpacket.__name__
        if not packet.endswith("_") or packet.startswith("_") and packet.endswith("__"):
            continue
        base = getattr(aten, packet[:-1], None)
        out_of_place = getattr(base, n.target._overloadname, None) if base is not None else None
        if out_of_place is None or not n.args or not isinstance(n.args[0], Node):
            continue
        mutated = n.args[0]
        if len(mutated.users) != 1 or _returns_alias(mutated):
            continue
        n.target = out_of_place


def _non_float(val: Any) -> bool:
    if isinstance(val, Tensor):
        return not (val.is_floating_point() or val.is_complex())
    if isinstance(val, (list, tuple)):
        return bool(val) and all(_non_float(v) for v in val)
    return isinstance(val, (int, bool)) or val is None


def _fetch_attr(gm: GraphModule, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _fit(out: Any, primal: Any) -> Any:
    """Coefficients with the primal's shape (a rule may return a broadcastable, smaller tensor)."""
    if isinstance(out, list):
        return [_fit(o, p) for o, p in zip(out, primal)]
    if isinstance(primal, Tensor):
        y1, y2 = out
        if y1 is not None and y1.shape != primal.shape:
            y1 = y1.expand(primal.shape)
        if y2 is not None and y2.shape != primal.shape:
            y2 = y2.expand(primal.shape)
        return y1, y2
    return out


def _primal_value(env: Mapping[Node, Any], a: Any) -> Any:
    """A rule's argument ``a`` with its nodes replaced by their primal values."""
    if isinstance(a, Node):
        return env[a]
    if isinstance(a, (list, tuple)):
        return type(a)(_primal_value(env, b) for b in a)
    return a


class Primal:
    """The intermediate values of one traced evaluation; :meth:`along` sweeps directions through them."""

    def __init__(self, graph: TaylorGraph, env: dict[Node, Any]) -> None:
        self.graph = graph
        self.env = env
        self.cache: dict[Node, dict] = {}
        self.loss = env[graph.output]

    def along(self, direction: Sequence[Tensor]) -> tuple[float, float]:
        """``(∇f·v, vᵀ∇²f·v)`` for a direction ``v`` given as one tensor per measured input."""
        g = self.graph
        if g._constant:
            return 0.0, 0.0
        env0 = self.env
        tan: dict[Node, Any] = {}
        for ph, v in zip(g.placeholders[: g.n_measured], direction):
            tan[ph] = (v, None)
        none = (None, None)
        # not a recursive closure: a function in its own closure is a reference cycle, which would keep
        # env0 (every intermediate value of a forward pass) alive after this Primal until the garbage
        # collector runs: one forward's activations per δ-shifted point, piling up chunk after chunk
        P = functools.partial(_primal_value, env0)

        def C(a: Any) -> Pair:
            return tan.get(a, none) if isinstance(a, Node) else none

        with torch.no_grad():
            for i, (n, rule) in enumerate(g.plan):
                if rule is None:  # getitem on a multi-output node
                    src = tan.get(n.args[0])
                    tan[n] = none if src is None else src[n.args[1]]
                else:
                    cache = self.cache.setdefault(n, {})
                    tan[n] = _fit(rule(n, P, C, cache), env0[n])
                for a in g._free_after[i]:
                    tan.pop(a, None)
        y1, y2 = tan.get(g.output, none)
        return (0.0 if y1 is None else float(y1)), (0.0 if y2 is None else float(y2))
