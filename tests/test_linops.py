"""The curvature operators against independent float64 references: dense Hessians from
``torch.autograd.functional.hessian``, dense Gauss–Newton matrices ``Jᵀ H_ℓ J`` from its reverse-mode
Jacobian, closed forms, and central finite differences through LayerNorm and attention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.linops import GGNOperator, HessianOperator, curvature_operator, group_names
from landscape.models import TinyCausalLM, lm_loss
from tests._models import CASES, cached_dense, classification_loss, dense_of


def assert_close(actual, expected, rtol, atol=0.0, what=""):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    bad = ~np.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = [f"  at {tuple(i)}: got {a[tuple(i)]!r}, expected {e[tuple(i)]!r}, ratio {a[tuple(i)] / e[tuple(i)]!r}"
                for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} entries differ\n" + "\n".join(rows))


def _offsets(model, names):
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    return np.cumsum([0] + sizes)


class CountingLoss:
    def __init__(self):
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return classification_loss(model, batch)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_hessian_operator_against_dense(case):
    model, batch, _, _ = CASES[case]()
    obj = ls.Objective(model, classification_loss, batch)
    H = cached_dense(case, "hessian")
    gen = torch.Generator().manual_seed(0)
    vs = [tree.randn_like(obj.params(), gen) for _ in range(3)]
    with HessianOperator(obj) as op:
        for v, hv in zip(vs, op.matvecs(vs)):
            assert_close(tree.flatten(hv, obj.names), H @ tree.flatten(v, obj.names), 1e-9, 1e-12, "H v")
        quad = op.quadratic_forms(vs)
        assert_close(quad, [float(tree.flatten(v, obj.names) @ H @ tree.flatten(v, obj.names)) for v in vs], 1e-9,
                     1e-12, "vᵀHv")
        # a diagonal block H[B, B] v_B, B = the first layer
        block = group_names(obj.names, "layer")
        names = next(iter(block.values()))
        off = _offsets(model, obj.names)
        idx = np.concatenate([np.arange(off[obj.names.index(n)], off[obj.names.index(n) + 1]) for n in names])
        hb = tree.flatten(op.matvec(vs[0], names), names)
        vb = tree.flatten({n: vs[0][n] for n in names}, names)
        assert_close(hb, H[np.ix_(idx, idx)] @ vb, 1e-9, 1e-12, "H[B,B] v_B")
        assert op.n_products == 3 + 3 + 1
    with pytest.raises(RuntimeError, match="closed"):
        op.matvec(vs[0])


def test_hessian_operator_keeps_one_graph_and_releases_it():
    model, batch, _, _ = CASES["mlp"]()
    loss = CountingLoss()
    obj = ls.Objective(model, loss, batch, check_determinism=False)
    v = tree.randn_like(obj.params(), torch.Generator().manual_seed(0))
    op = HessianOperator(obj)
    for _ in range(5):
        op.matvec(v)
    assert loss.calls == 1  # one forward and one create_graph gradient for five products
    assert op._graphs is not None
    op.close()
    assert op._graphs is None
    # micro-batches: by default rebuilt at every call (their point is to bound memory), same values
    x, y = batch
    micro = ls.MicroBatches([(x[:3], y[:3]), (x[3:], y[3:])])
    obj_mb = ls.Objective(model, loss, micro, check_determinism=False)
    loss.calls = 0
    with HessianOperator(obj_mb) as op_mb, HessianOperator(ls.Objective(model, classification_loss, batch)) as op1:
        for _ in range(2):
            assert_close(tree.flatten(op_mb.matvec(v), obj.names), tree.flatten(op1.matvec(v), obj.names), 1e-12,
                         1e-14, "micro-batches")
    assert loss.calls == 4
    with HessianOperator(obj_mb, graph="keep") as op_keep:
        loss.calls = 0
        op_keep.matvec(v)
        op_keep.matvec(v)
        assert loss.calls == 2


@pytest.mark.parametrize("jvp", ["reverse", "forward"])
@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_ggn_operator_against_dense_jt_hl_j(case, jvp):
    model, batch, _, _ = CASES[case]()
    obj = ls.Objective(model, classification_loss, batch)
    G = cached_dense(case, "ggn")
    gen = torch.Generator().manual_seed(1)
    vs = [tree.randn_like(obj.params(), gen) for _ in range(3)]
    with GGNOperator(obj, jvp=jvp) as op:
        for v, gv in zip(vs, op.matvecs(vs)):
            assert_close(tree.flatten(gv, obj.names), G @ tree.flatten(v, obj.names), 1e-9, 1e-12, "G v")
        flat = [tree.flatten(v, obj.names) for v in vs]
        assert_close(op.quadratic_forms(vs), [float(f @ G @ f) for f in flat], 1e-9, 1e-12, "vᵀGv")
        loss, grad = op.loss_and_grad()
        ref_loss, ref_grad = obj.loss_and_grad()
        assert loss == pytest.approx(ref_loss, rel=1e-13)
        assert_close(tree.flatten(grad, obj.names), tree.flatten(ref_grad, obj.names), 1e-11, 1e-14, "Jᵀ∂ℓ/∂z")
        if jvp == "reverse" and case == "mlp":
            dense = dense_of(op)
            # symmetric positive semi-definite (cross-entropy is convex in the logits)
            assert_close(dense, dense.T, 1e-10, 1e-12, "Gᵀ = G")
            w = torch.linalg.eigvalsh(0.5 * (dense + dense.T))
            assert float(w.min()) >= -1e-12 * float(w.abs().max())
    assert float(torch.linalg.eigvalsh(G).min()) >= -1e-12 * float(torch.linalg.eigvalsh(G).abs().max())
    # ... and not the Hessian: the dropped term Σ ∂ℓ/∂z ∇²z is not zero for these nonlinear models
    assert float((cached_dense(case, "hessian") - G).abs().max()) > 1e-4


def test_ggn_equals_hessian_for_a_linear_model_with_squared_error():
    torch.manual_seed(0)
    X, Y = torch.randn(9, 4, dtype=torch.float64), torch.randn(9, 3, dtype=torch.float64)
    model = torch.nn.Linear(4, 3).double()
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (X, Y))
    with HessianOperator(obj) as h, GGNOperator(obj) as g:
        Hd, Gd = dense_of(h), dense_of(g)
    assert_close(Gd, Hd, 1e-12, 1e-14, "GGN = Hessian (linear + MSE)")
    # the closed form for the weights: 2/(n·d_out) · I ⊗ XᵀX
    n, d_out = X.shape[0], 3
    ref = torch.kron(torch.eye(d_out, dtype=torch.float64), 2 * X.T @ X / (n * d_out))
    assert_close(Gd[:12, :12], ref, 1e-12, 1e-14, "2·I⊗XᵀX / (n·d_out)")


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_layer_norm_and_attention_against_central_finite_differences(curvature):
    """The hazard: LayerNorm weights, where torch.func's vmapped Hessians and nested forward mode go
    wrong on torch 2.13. Checked on a causal LM in float64 against central differences: ``vᵀHv`` of
    the loss, and ``vᵀGv = (Jv)ᵀ H_ℓ (Jv)`` with ``Jv`` from central differences of the logits."""
    torch.manual_seed(0)
    model = TinyCausalLM(vocab=11, width=16, depth=1, heads=2, context=6).double()
    batch = (torch.randint(0, 11, (3, 6)), torch.randint(0, 11, (3, 6)))
    obj = ls.Objective(model, lm_loss, batch)
    x = obj.params()
    gen = torch.Generator().manual_seed(4)
    # a direction living on the LayerNorm weights only, and a generic one
    ln = {n: (torch.randn(p.shape, generator=gen, dtype=torch.float64) if "ln" in n else torch.zeros_like(p))
          for n, p in x.items()}
    dirs = {"layernorm": ln, "random": tree.randn_like(x, gen)}
    h = 1e-4

    def logits(point):
        with torch.no_grad():
            return torch.func.functional_call(model, point, (batch[0],))

    def loss_at(point):
        with torch.no_grad():
            return float(lm_loss(lambda i: torch.func.functional_call(model, point, (i,)), batch))

    for name, v in dirs.items():
        v, _ = tree.normalize(v)
        if curvature == "hessian":
            f = [loss_at(tree.axpy(s, v, x)) for s in (-h, 0.0, h)]
            expected = (f[0] - 2 * f[1] + f[2]) / h**2
            with HessianOperator(obj) as op:
                got = op.quadratic_forms([v])[0]
            assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), name
        else:
            z0 = logits(x)
            jv = (logits(tree.axpy(h, v, x)) - logits(tree.axpy(-h, v, x))) / (2 * h)
            Hl = torch.autograd.functional.hessian(
                lambda z: F.cross_entropy(z.reshape(-1, 11), batch[1].reshape(-1)), z0.reshape(-1))
            expected = float(jv.reshape(-1) @ Hl @ jv.reshape(-1))
            for jvp in ("reverse", "forward"):
                with GGNOperator(obj, jvp=jvp) as op:
                    got = op.quadratic_forms([v])[0]
                assert got == pytest.approx(expected, rel=1e-6, abs=1e-9), (name, jvp)


def test_ggn_split_is_checked_and_the_model_left_unchanged():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    # splitting at fc1 leaves fc2's parameters after the split: not a Gauss–Newton matrix of f
    with pytest.raises(ValueError, match="after the output"):
        GGNOperator(obj, output="fc1").matvec(obj.params())
    with pytest.raises(ValueError, match="no submodule"):
        GGNOperator(obj, output="fc9")
    with pytest.raises(ValueError, match="jvp"):
        GGNOperator(obj, jvp="sideways")
    # restricted to fc2, the split at fc2's output is clean and gives the fc2 block of the GGN
    part = ls.Objective(model, classification_loss, batch, include=["fc2.weight", "fc2.bias"])
    with GGNOperator(part, output=model.fc2) as g2, GGNOperator(part) as g:
        assert_close(dense_of(g2), dense_of(g), 1e-12, 1e-14, "split at the head")
    assert not model._forward_hooks and not model.fc1._forward_hooks and not model.fc2._forward_hooks
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    with pytest.raises(ValueError, match="curvature"):
        curvature_operator(obj, "fisher")


def test_directional_sharpness_and_robust_smoothness_on_the_ggn():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    G = cached_dense("mlp", "ggn")
    gen = torch.Generator().manual_seed(2)
    dirs = {"a": tree.randn_like(obj.params(), gen), "b": tree.randn_like(obj.params(), gen)}
    res = ls.directional_sharpness(obj, dirs, curvature="ggn", shift="never")
    g = tree.flatten(obj.grad(), obj.names)
    for k, v in dirs.items():
        u = tree.flatten(v, obj.names)
        u = u / u.norm()
        assert res[k].raw == pytest.approx(float(u @ G @ u), rel=1e-10)
        assert res[k].grad_correlation == pytest.approx(float(g @ u), rel=1e-10)
    always = ls.directional_sharpness(obj, {"a": dirs["a"]}, curvature="ggn", shift="always", delta=0.1)["a"]
    x = obj.params()
    u, _ = tree.normalize(dirs["a"])
    with GGNOperator(obj, at=tree.axpy(-0.1, u, x)) as shifted:  # x − δû, toward the step
        assert always.shifted_value == pytest.approx(shifted.quadratic_forms([u])[0], rel=1e-12)
    rb = ls.robust_smoothness(obj, curvature="ggn", row_norms="exact", eps=0.1, spectrum="norm", tol=1e-10)
    w = torch.linalg.eigvalsh(G)
    assert rb.top_eig == pytest.approx(float(w.abs().max()), rel=1e-8)
    rows = torch.linalg.norm(G, dim=1)
    assert_close(tree.flatten(rb.row_norms, obj.names), rows, 1e-9, 1e-12, "GGN row norms")

