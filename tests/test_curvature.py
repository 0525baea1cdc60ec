"""Curvature against independent references: closed forms, dense float64 Hessians from
``torch.func.hessian``, and central finite differences of an independently evaluated loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.models import TinyCausalLM, lm_loss
from tests._models import (
    CNN,
    MLP,
    Quadratic,
    TinyTransformer,
    call_loss,
    classification_loss,
    dense_hessian,
    loss_at_copy,
)

torch.set_default_dtype(torch.float32)

# Both engines are checked against every reference: the Taylor sweep (default) and double-backward HVPs.
METHODS = pytest.mark.parametrize("method", ["taylor", "hvp"])


def assert_close(actual, expected, rtol, atol=0.0, what=""):
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    bad = ~np.isclose(a, e, rtol=rtol, atol=atol)
    if bad.any():
        idx = np.argwhere(bad)[:5]
        rows = [f"  at {tuple(i)}: got {a[tuple(i)]!r}, expected {e[tuple(i)]!r}, ratio {a[tuple(i)] / e[tuple(i)]!r}" for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.size} entries differ\n" + "\n".join(rows))


def seed_quadratic(d=10):
    A = torch.eye(d, dtype=torch.float64)
    A[0, 0] = 100.0
    x0 = torch.linspace(-1, 1, d, dtype=torch.float64)
    model = Quadratic(A, x0)
    return model, A, ls.Objective(model, call_loss, None)


# ----------------------------------------------------------------------------- closed forms
@METHODS
def test_seed_quadratic_sharpness_closed_form(method):
    d = 10
    model, A, obj = seed_quadratic(d)
    H = 2 * A
    x = model.x.detach()
    g = 2 * A @ x
    gen = torch.Generator().manual_seed(1)
    rand = torch.randn(d, generator=gen, dtype=torch.float64)
    dirs = {"e1": torch.eye(d, dtype=torch.float64)[0] * 3.0, "ones": torch.ones(d, dtype=torch.float64), "rand": rand}
    res = ls.directional_sharpness(obj, {k: {"x": v} for k, v in dirs.items()}, method=method)
    assert res["e1"].value == pytest.approx(200.0, rel=1e-12)
    assert res["ones"].value == pytest.approx(2 * (100 + d - 1) / d, rel=1e-12)
    u = rand / rand.norm()
    assert res["rand"].value == pytest.approx(float(u @ H @ u), rel=1e-12)
    for k, v in dirs.items():
        uhat = v / v.norm()
        assert res[k].grad_correlation == pytest.approx(float(g @ uhat), rel=1e-12, abs=1e-14)
        assert res[k].update_norm == pytest.approx(float(v.norm()), rel=1e-12)
        assert not res[k].shifted
        assert res[k].loss == pytest.approx(float(x @ A @ x), rel=1e-12)
    # quadratic model: f(x - s û) = f - sG + ½ s² S exactly for a quadratic, so s* and the reduction are exact
    r = res["rand"]
    line = ls.loss_along(obj, {"x": rand}, [0.0, r.best_step])
    assert line[0] - line[1] == pytest.approx(r.predicted_reduction, rel=1e-10)


@METHODS
def test_linear_model_summed_mse_kronecker_hessian(method):
    torch.manual_seed(0)
    n, d_in, d_out = 7, 4, 3
    X = torch.randn(n, d_in, dtype=torch.float64)
    Y = torch.randn(n, d_out, dtype=torch.float64)
    model = torch.nn.Linear(d_in, d_out, bias=False).double()
    obj = ls.Objective(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(), (X, Y))
    H = torch.kron(torch.eye(d_out, dtype=torch.float64), 2 * X.T @ X)  # row-major flattening of W (out, in)
    for seed in range(3):
        v = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        hv = ls.hvp(obj, {"weight": v})["weight"]
        assert_close(hv.reshape(-1), H @ v.reshape(-1), rtol=1e-12, atol=1e-12, what="H v")
        s = ls.directional_sharpness(obj, {"v": {"weight": v}}, method=method)["v"]
        u = v.reshape(-1) / v.norm()
        assert s.raw == pytest.approx(float(u @ H @ u), rel=1e-12)


# ----------------------------------------------------------------------------- dense Hessians
def _mlp_case():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 2, (6,))
    return model, (x, y), lambda out: F.cross_entropy(out, y), x


def _cnn_case():
    torch.manual_seed(1)
    model = CNN().double()
    x, y = torch.randn(4, 1, 5, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    return model, (x, y), lambda out: F.cross_entropy(out, y), x


def _transformer_case():
    torch.manual_seed(2)
    model = TinyTransformer().double()
    x, y = torch.randint(0, 5, (2, 5)), torch.randint(0, 5, (2, 5))
    return model, (x, y), lambda out: F.cross_entropy(out.reshape(-1, 5), y.reshape(-1)), x


@METHODS
@pytest.mark.parametrize("case", [_mlp_case, _cnn_case, _transformer_case], ids=["mlp", "cnn", "transformer"])
def test_against_dense_hessian(case, method):
    model, batch, loss_of_output, inputs = case()
    obj = ls.Objective(model, classification_loss, batch)
    H = dense_hessian(model, loss_of_output, inputs, obj.names)
    like = obj.params()
    gen = torch.Generator().manual_seed(0)
    vs = [tree.randn_like(like, gen) for _ in range(3)]
    hvs = obj.hvps(vs)
    for v, hv in zip(vs, hvs):
        assert_close(tree.flatten(hv, obj.names), H @ tree.flatten(v, obj.names), rtol=1e-8, atol=1e-10, what="H v")
    res = ls.directional_sharpness(obj, {f"v{i}": v for i, v in enumerate(vs)}, shift="never", method=method)
    g = tree.flatten(obj.grad(), obj.names)
    for i, v in enumerate(vs):
        u = tree.flatten(v, obj.names)
        u = u / u.norm()
        assert res[f"v{i}"].raw == pytest.approx(float(u @ H @ u), rel=1e-8, abs=1e-12)
        assert res[f"v{i}"].grad_correlation == pytest.approx(float(g @ u), rel=1e-9, abs=1e-14)
    # Lanczos eigenvalues against eigvalsh
    evals = torch.linalg.eigvalsh(H).numpy()[::-1]
    top = ls.top_eigenvalues(obj, k=2, tol=1e-10)
    assert_close(top, evals[:2], rtol=1e-6, atol=1e-9, what="top eigenvalues")


def test_include_restricts_to_a_hessian_block():
    model, batch, loss_of_output, inputs = _mlp_case()
    full = ls.Objective(model, classification_loss, batch)
    names = list(full.names)
    H = dense_hessian(model, loss_of_output, inputs, names)
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    offsets = np.cumsum([0] + sizes)
    part = ls.Objective(model, classification_loss, batch, include=["fc2.weight"])
    assert part.names == ("fc2.weight",)
    i = names.index("fc2.weight")
    block = H[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]]
    v = torch.randn(block.shape[0], dtype=torch.float64)
    hv = part.hvp({"fc2.weight": v.reshape(2, 5)})["fc2.weight"]
    assert_close(hv.reshape(-1), block @ v, rtol=1e-9, atol=1e-12, what="block H v")
    pred = ls.Objective(model, classification_loss, batch, include=lambda n, p: n.endswith("bias"))
    assert pred.names == ("fc1.bias", "fc2.bias")
    with pytest.raises(KeyError, match="fc3.weight"):
        ls.Objective(model, classification_loss, batch, include=["fc3.weight"])


# ----------------------------------------------------------------------------- finite differences
@METHODS
def test_causal_lm_against_central_finite_differences(method):
    """Small causal transformer LM (LayerNorm, attention) in float64: sharpness and gradient correlation
    against central finite differences of the loss along û, evaluated on an independent model copy."""
    torch.manual_seed(0)
    model = TinyCausalLM(vocab=11, width=16, depth=2, heads=2, context=8).double()
    batch = (torch.randint(0, 11, (3, 8)), torch.randint(0, 11, (3, 8)))
    obj = ls.Objective(model, lm_loss, batch)
    g = obj.grad()
    gen = torch.Generator().manual_seed(3)
    dirs = {"grad": g, "rand": tree.randn_like(g, gen), "sign": tree.map(torch.sign, g)}
    res = ls.directional_sharpness(obj, dirs, shift="never", method=method)
    x = obj.params()
    h = 1e-4  # float64: rounding ~1e-16/h² and truncation ~h² both far below the tolerance
    for name, u in dirs.items():
        uhat, _ = tree.normalize(u)
        f = [loss_at_copy(model, lm_loss, batch, tree.axpy(-s, uhat, x)) for s in (-h, 0.0, h)]
        fd_s = (f[0] - 2 * f[1] + f[2]) / h**2
        fd_g = (f[0] - f[2]) / (2 * h)  # d/ds f(x - s û) at 0 is -G
        assert res[name].raw == pytest.approx(fd_s, rel=1e-5, abs=1e-6), name
        assert res[name].grad_correlation == pytest.approx(fd_g, rel=1e-6, abs=1e-9), name
        assert res[name].loss == pytest.approx(f[1], rel=1e-12)
    # loss_along agrees with the independent evaluation
    steps = [0.0, 0.05, 0.3]
    line = ls.loss_along(obj, dirs["rand"], steps)
    uhat, _ = tree.normalize(dirs["rand"])
    expected = [loss_at_copy(model, lm_loss, batch, tree.axpy(-s, uhat, x)) for s in steps]
    assert_close(line, expected, rtol=1e-12, what="loss along û")


# ----------------------------------------------------------------------------- shifted fallback
class Cubic(torch.nn.Module):
    """f(x) = Σ xᵢ³ / 6 + ½ Σ_{i>0} xᵢ²: along e₀, f'' = x₀."""

    def __init__(self, x0):
        super().__init__()
        self.x = torch.nn.Parameter(x0)

    def forward(self, _=None):
        return (self.x**3).sum() / 6 + 0.5 * (self.x[1:] ** 2).sum()


@METHODS
def test_shifted_fallback_is_taken_toward_the_step(method):
    """Seed 002 App. B.3: the shifted Hessian is taken a distance δ toward the step x − η·u, at x − δû.

    Along û = −e₀ the curvature of the cubic is f''(x₀ − s) for a step s: at x₀ = −0.004 it is
    negative at x (−0.004), positive at x − δû (x₀ + δ = 0.006) and more negative at x + δû
    (x₀ − δ = −0.014). Only the first side is the seed's.
    """
    model = Cubic(torch.tensor([-0.004, 0.3, -0.2], dtype=torch.float64))
    obj = ls.Objective(model, call_loss, None)
    u = {"x": torch.tensor([-2.0, 0.0, 0.0], dtype=torch.float64)}  # the step x − η·u moves x₀ up
    default = ls.directional_sharpness(obj, {"u": u}, method=method)["u"]
    assert default.raw == pytest.approx(-0.004, rel=1e-12)
    assert default.shifted and default.shifted_value == pytest.approx(-0.004 + 0.01, rel=1e-10)  # x − δû
    assert default.shifted_value > 0 > default.raw
    assert default.value == default.shifted_value
    assert default.best_step is not None and default.predicted_reduction is not None
    never = ls.directional_sharpness(obj, {"u": u}, shift="never", method=method)["u"]
    assert not never.shifted and never.value == pytest.approx(-0.004, rel=1e-12)
    assert never.shifted_value is None and never.best_step is None and never.predicted_reduction is None
    always = ls.directional_sharpness(obj, {"u": u}, shift="always", delta=0.1, method=method)["u"]
    assert always.shifted and always.value == pytest.approx(-0.004 + 0.1, rel=1e-10)
    # the opposite direction: x − δû is now x₀ − δ, and the shifted value follows it (more negative)
    flipped = ls.directional_sharpness(obj, {"u": tree.scale(u, -1.0)}, method=method)["u"]
    assert flipped.raw == pytest.approx(-0.004, rel=1e-12)
    assert flipped.shifted and flipped.shifted_value == pytest.approx(-0.004 - 0.01, rel=1e-10)
    # a positive direction is not shifted under the default policy
    e1 = {"x": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}
    pos = ls.directional_sharpness(obj, {"u": e1}, method=method)["u"]
    assert not pos.shifted and pos.value == pytest.approx(0.3 + 1.0, rel=1e-12)
    with pytest.raises(ValueError, match="shift"):
        ls.directional_sharpness(obj, {"u": u}, shift="sometimes")


@pytest.mark.parametrize("delta", [-0.01, float("nan"), float("inf")])
def test_shift_delta_is_a_distance(delta):
    model = Cubic(torch.tensor([-0.004, 0.3, -0.2], dtype=torch.float64))
    obj = ls.Objective(model, call_loss, None)
    u = {"x": torch.tensor([-2.0, 0.0, 0.0], dtype=torch.float64)}
    with pytest.raises(ValueError, match="delta"):
        ls.directional_sharpness(obj, {"u": u}, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        ls.MeasureSettings(delta=delta)
    with pytest.raises(TypeError, match="delta"):
        ls.directional_sharpness(obj, {"u": u}, delta="0.01")
    # δ = 0 is allowed: the shifted value is then the raw one, evaluated again
    zero = ls.directional_sharpness(obj, {"u": u}, delta=0.0)["u"]
    assert zero.shifted and zero.shifted_value == pytest.approx(zero.raw, rel=1e-12)


# ----------------------------------------------------------------------------- trace
def test_hutchinson_trace_converges():
    torch.manual_seed(0)
    model, batch, loss_of_output, inputs = _mlp_case()
    obj = ls.Objective(model, classification_loss, batch)
    H = dense_hessian(model, loss_of_output, inputs, obj.names)
    true = float(torch.trace(H))
    est_small = ls.hessian_trace(obj, n=16, seed=0)
    est_big = ls.hessian_trace(obj, n=400, seed=1, batch=50)
    assert est_big.stderr < est_small.stderr
    assert abs(est_big.mean - true) < 4 * est_big.stderr + 1e-9
    # the Rademacher variance is Σ_{i≠j} 2 H_ij²: check the empirical stderr against it
    off = H - torch.diag(torch.diag(H))
    expected_sd = math.sqrt(2 * float((off**2).sum()))
    assert est_big.samples.std(ddof=1) == pytest.approx(expected_sd, rel=0.25)


def test_hutchinson_exact_for_diagonal_hessian():
    model, A, obj = seed_quadratic(6)
    est = ls.hessian_trace(obj, n=3, seed=0)
    assert_close(est.samples, [float(torch.trace(2 * A))] * 3, rtol=1e-12, what="zᵀDz")


def test_bad_directions_are_refused():
    model, A, obj = seed_quadratic(4)
    with pytest.raises(ValueError, match="zero"):
        ls.directional_sharpness(obj, {"z": {"x": torch.zeros(4, dtype=torch.float64)}})
    with pytest.raises(ValueError, match="non-finite"):
        ls.directional_sharpness(obj, {"n": {"x": torch.tensor([1.0, float("nan"), 0, 0], dtype=torch.float64)}})
    with pytest.raises(KeyError, match="lacks"):
        ls.directional_sharpness(obj, {"k": {"y": torch.ones(4)}})
    with pytest.raises(ValueError, match="shape"):
        obj.hvp({"x": torch.ones(5, dtype=torch.float64)})
