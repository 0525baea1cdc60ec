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
