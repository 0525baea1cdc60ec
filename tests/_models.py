"""Tiny models and independent references shared by the tests."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


class Quadratic(nn.Module):
    """f(x) = xᵀAx with x a parameter (seed 002 §1 uses A₁₁ = 100, Aᵢᵢ = 1)."""

    def __init__(self, A: torch.Tensor, x0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.x = nn.Parameter(x0.clone())

    def forward(self, _batch=None) -> torch.Tensor:
        return self.x @ self.A @ self.x


def call_loss(model, _batch):
    return model(_batch)


class MLP(nn.Module):
    def __init__(self, d_in=3, hidden=5, d_out=2):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(F.softplus(self.conv(x)).flatten(1))


class TinyTransformer(nn.Module):
    """nn.TransformerEncoderLayer (MultiheadAttention, LayerNorm) + a linear head."""

    def __init__(self, vocab=5, width=4, heads=2):
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.enc = nn.TransformerEncoderLayer(width, heads, dim_feedforward=6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(width, vocab)

    def forward(self, idx):
        return self.head(self.enc(self.emb(idx)))


def classification_loss(model, batch):
    x, y = batch
    out = model(x)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def dense_hessian(model: nn.Module, loss_of_output, inputs, names=None, method="autograd") -> torch.Tensor:
    """Dense Hessian of ``loss_of_output(functional_call(model, params, inputs))`` over the flattened
    parameters ``names`` (default: all): an independent reference.

    ``method="autograd"`` (default) is ``torch.autograd.functional.hessian``, one double backward per row.
    ``"func"`` (``torch.func.hessian``) and ``"revrev"`` (``jacrev(jacrev)``) use vmap and give wrong
    LayerNorm-weight rows on torch 2.13 (see test_hazards.py); they are kept to document that."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else list(names)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])

    def f(flat):
        chunks = torch.split(flat, sizes)
        p = dict(params)
        for n, c, s in zip(names, chunks, shapes):
            p[n] = c.reshape(s)
        return loss_of_output(torch.func.functional_call(model, p, (inputs,)))

    was = model.training
    model.eval()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            if method == "func":
                return torch.func.hessian(f)(flat0)
            if method == "revrev":
                return torch.func.jacrev(torch.func.jacrev(f))(flat0)
            return torch.autograd.functional.hessian(f, flat0)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was)


def loss_at_copy(model: nn.Module, loss_fn, batch, point: dict[str, torch.Tensor]) -> float:
    """Loss of a deep copy of ``model`` whose parameters are overwritten with ``point`` (an
    evaluation independent of ``landscape``'s functional machinery)."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        named = dict(m.named_parameters())
        for n, v in point.items():
            named[n].copy_(v)
        return float(loss_fn(m, batch))


# -- tiny float64 cases for the curvature operators (model, batch, loss of the output, inputs) --------
def mlp_case(n=6):
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))
    return model, (x, y), lambda out: F.cross_entropy(out, y), x


def cnn_case():
    torch.manual_seed(1)
    model = CNN().double()
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    return model, (x, y), lambda out: F.cross_entropy(out, y), x


def transformer_case():
    """nn.TransformerEncoderLayer: LayerNorm and attention, where torch.func's Hessians go wrong."""
    torch.manual_seed(2)
    model = TinyTransformer().double()
    x, y = torch.randint(0, 5, (2, 5)), torch.randint(0, 5, (2, 5))
    return model, (x, y), lambda out: F.cross_entropy(out.reshape(-1, 5), y.reshape(-1)), x


CASES = {"mlp": mlp_case, "cnn": cnn_case, "transformer": transformer_case}


def dense_ggn(model: nn.Module, loss_of_output, inputs, names=None) -> torch.Tensor:
    """Dense Gauss–Newton matrix ``Jᵀ H_ℓ J`` in float64, from ``torch.autograd.functional``'s
    reverse-mode Jacobian of the model output and Hessian of the loss in the output: an independent
    reference for the GGN products."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = {n: p.detach() for n, p in model.named_parameters()}
    names = list(params) if names is None else list(names)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    flat0 = torch.cat([params[n].reshape(-1) for n in names])
    was = model.training
    model.eval()
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            out0 = torch.func.functional_call(model, params, (inputs,)).detach()

            def z_of(flat):
                p = dict(params)
                for n, c, s in zip(names, torch.split(flat, sizes), shapes):
                    p[n] = c.reshape(s)
                return torch.func.functional_call(model, p, (inputs,)).reshape(-1)

            J = torch.autograd.functional.jacobian(z_of, flat0)
            Hl = torch.autograd.functional.hessian(lambda z: loss_of_output(z.reshape(out0.shape)), out0.reshape(-1))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
        model.train(was)
    return J.T @ Hl @ J


def dense_of(op) -> torch.Tensor:
    """The dense matrix of a landscape curvature operator, one product per basis vector."""
    view = op.flat()
    eye = torch.eye(view.n, dtype=view.dtype)
    return torch.stack([view.mv(e) for e in eye], dim=1)


_DENSE: dict[tuple[str, str], torch.Tensor] = {}


def cached_dense(case: str, kind: str) -> torch.Tensor:
    """The dense float64 Hessian (``kind="hessian"``) or Gauss–Newton matrix (``"ggn"``) of ``CASES[case]``
    over all its parameters, computed once per test session (the cases are seeded, so deterministic)."""
    key = (case, kind)
    if key not in _DENSE:
        model, _, loss_of_output, inputs = CASES[case]()
        fn = dense_hessian if kind == "hessian" else dense_ggn
        _DENSE[key] = fn(model, loss_of_output, inputs)
    return _DENSE[key]
