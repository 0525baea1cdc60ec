"""Hazards found in PyTorch 2.13 that the curvature engine must avoid (DESIGN.md, "Hazards")."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.models import TinyCausalLM, lm_loss
from tests._models import TinyTransformer, classification_loss, dense_hessian


def _independent_grad(model, loss_fn, batch, names, point):
    """Plain autograd on a deep copy whose parameters are overwritten with ``point``."""
    m = copy.deepcopy(model).eval()
    with torch.no_grad():
        for n, q in m.named_parameters():
            q.copy_(point[n])
    params = dict(m.named_parameters())
    gs = torch.autograd.grad(loss_fn(m, batch), [params[n] for n in names])
    return torch.cat([g.reshape(-1) for g in gs])


@pytest.mark.parametrize("method", ["func", "revrev"])
def test_layer_norm_second_derivatives_match_finite_differences(method):
    """Our double-backward HVP agrees with float64 central differences of an independently computed
    gradient through LayerNorm, including the LayerNorm-weight rows, where torch.func's vmap-based
    Hessians (``hessian`` = forward-over-reverse, and ``jacrev(jacrev)``) are wrong on torch 2.13."""
    torch.manual_seed(2)
    model = TinyTransformer().double()
    x, y = torch.randint(0, 5, (2, 5)), torch.randint(0, 5, (2, 5))
    obj = ls.Objective(model, classification_loss, (x, y))
    p = obj.params()
    v = tree.randn_like(p, torch.Generator().manual_seed(0))
    h = 1e-5
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        gp = _independent_grad(model, classification_loss, (x, y), obj.names, tree.axpy(h, v, p))
        gm = _independent_grad(model, classification_loss, (x, y), obj.names, tree.axpy(-h, v, p))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    fd = (gp - gm) / (2 * h)
    ours = tree.flatten(obj.hvp(v), obj.names)
    torch.testing.assert_close(ours, fd, rtol=1e-6, atol=1e-8)
    loss_of_output = lambda o: F.cross_entropy(o.reshape(-1, 5), y.reshape(-1))  # noqa: E731
    ref = dense_hessian(model, loss_of_output, x, obj.names)
    torch.testing.assert_close(ref @ tree.flatten(v, obj.names), fd, rtol=1e-6, atol=1e-8)
    vmapped = dense_hessian(model, loss_of_output, x, obj.names, method=method)
    err = float((vmapped @ tree.flatten(v, obj.names) - fd).abs().max())
    if err < 1e-6:  # pragma: no cover - an upstream fix
        pytest.skip(f"torch.func ({method}) through layer_norm agrees with finite differences on this torch")
    assert err > 1e-3  # documents the upstream problem the engine avoids


def test_fused_cpu_attention_has_no_double_backward():
    """Plain double backward through F.scaled_dot_product_attention picks the fused CPU flash kernel,
    which has no second derivative; the Objective runs it under the math backend and succeeds."""
    torch.manual_seed(0)
    model = TinyCausalLM(11, width=16, depth=1, heads=2, context=8)
    batch = (torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))
    params = list(model.parameters())
    gs = torch.autograd.grad(lm_loss(model, batch), params, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        torch.autograd.grad(gs, params, grad_outputs=[torch.ones_like(p) for p in params])
    obj = ls.Objective(model, lm_loss, batch)
    v, _ = tree.normalize(tree.randn_like(obj.params(), torch.Generator().manual_seed(0)))
    hv = obj.hvp(v)
    assert tree.is_finite(hv) and float(tree.norm(hv)) > 0
    # and it agrees with float64 finite differences of the gradient
    obj64 = ls.Objective(model, lm_loss, batch, dtype=torch.float64)
    v64 = tree.to(v, torch.float64)
    x = obj64.params()
    fd = tree.scale(tree.sub(obj64.grad(tree.axpy(1e-5, v64, x)), obj64.grad(tree.axpy(-1e-5, v64, x))), 0.5e5)
    torch.testing.assert_close(tree.flatten(obj64.hvp(v64)), tree.flatten(fd), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(tree.flatten(hv).double(), tree.flatten(fd), rtol=2e-3, atol=2e-4)


def test_embedding_padding_idx_is_a_constant_for_autograd():
    """``nn.Embedding(padding_idx=p)``: autograd gives row p no gradient although the loss depends on it
    (the row is meant to stay fixed in training). Finite differences see the dependence; both engines
    follow autograd, so every derivative the tool reports is of the function the optimizers see."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(5, 3, padding_idx=1).double()
    with torch.no_grad():
        emb.weight[1].normal_()  # a non-zero padding row, as after loading a checkpoint
    idx = torch.tensor([[0, 1, 2, 1]])

    def loss(m, b):
        return (torch.tanh(m(b)) ** 2).sum()

    obj = ls.Objective(emb, loss, idx)
    u = {"weight": torch.zeros(5, 3, dtype=torch.float64)}
    u["weight"][1] = torch.tensor([1.0, -0.5, 0.2], dtype=torch.float64)  # moves only the padding row
    x = obj.params()
    h = 1e-4
    f = [obj.loss(tree.axpy(s, u, x)) for s in (-h, 0.0, h)]
    fd_first = (f[2] - f[0]) / (2 * h)
    assert abs(fd_first) > 1e-3  # the loss does depend on the padding row ...
    for method in ("taylor", "hvp"):
        _, g, s, used = obj.directional_derivatives([u], method=method)
        assert used == method and g == [0.0] and s == [0.0]  # ... but autograd's derivatives do not
    assert torch.all(obj.grad()["weight"][1] == 0)
