"""Lanczos eigenvalues (top and bottom, per block, Hessian and Gauss–Newton, preconditioned) and
their residuals against ``torch.linalg.eigvalsh`` of dense float64 matrices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape as ls
from landscape import tree
from landscape.linops import group_names
from tests._models import CASES, Quadratic, cached_dense, call_loss, classification_loss


def _block_index(model, names, block):
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    off = np.cumsum([0] + sizes)
    return np.concatenate([np.arange(off[names.index(n)], off[names.index(n) + 1]) for n in block])


@pytest.mark.parametrize("case,curvature", [("mlp", "hessian"), ("mlp", "ggn"), ("cnn", "hessian"),
                                            ("transformer", "hessian"), ("transformer", "ggn")])
def test_top_and_bottom_eigenvalues_with_residuals(case, curvature):
    model, batch, _, _ = CASES[case]()
    obj = ls.Objective(model, classification_loss, batch)
    A = cached_dense(case, curvature)
    w, V = torch.linalg.eigh(A)
    res = ls.eigenvalues(obj, k=3, bottom=2, curvature=curvature, tol=1e-9, return_vectors=True)
    assert res.converged and res.curvature == curvature and res.size == A.shape[0]
    norm = float(w.abs().max())
    np.testing.assert_allclose(res.top, w.flip(0)[:3].numpy(), rtol=0, atol=1e-8 * norm)
    np.testing.assert_allclose(res.bottom, w[:2].numpy(), rtol=0, atol=1e-8 * norm)
    # the reported residuals are ‖Av − λv‖ of the returned unit vectors (the Lanczos estimate β|s_m|)
    for lam, r, v in zip(np.concatenate([res.top, res.bottom]), np.concatenate([res.top_residuals, res.bottom_residuals]),
                         res.top_vectors + res.bottom_vectors):
        x = tree.flatten(v, obj.names)
        assert float(x.norm()) == pytest.approx(1.0, abs=1e-10)
        true = float((A @ x - lam * x).norm())
        assert true <= 1e-9 * norm * 1.01 + 1e-13
        assert abs(true - r) <= 1e-9 * norm
    assert res.max_relative_residual <= 1e-9


def test_tolerance_is_honoured_and_pays_only_for_the_digits_asked():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    w = torch.linalg.eigvalsh(cached_dense("mlp", "hessian"))
    norm = float(w.abs().max())
    with ls.HessianOperator(obj) as op:
        loose = ls.eigenvalues(op, k=1, tol=1e-3)
        tight = ls.eigenvalues(op, k=1, tol=1e-10)
        checked = ls.eigenvalues(op, k=1, tol=1e-3, verify=True)
    assert loose.steps < tight.steps
    assert loose.n_products == loose.steps and checked.n_products == checked.steps + 1
    assert loose.max_relative_residual <= 1e-3
    # a Ritz value lies within its residual of an eigenvalue: here the top one
    assert abs(loose.top[0] - float(w[-1])) <= loose.top_residuals[0] + 1e-12
    assert abs(loose.top[0] - float(w[-1])) <= 1e-3 * norm
    assert checked.top_residuals[0] <= 1e-3 * checked.norm * 1.01
    # the gap criterion: the error estimate min(r, r²/δ̂) instead of r, earlier and still within tol here
    with ls.HessianOperator(obj) as op:
        gap = ls.eigenvalues(op, k=1, tol=1e-3, criterion="gap")
    assert gap.steps <= loose.steps and gap.converged
    assert abs(gap.top[0] - float(w[-1])) <= 1e-3 * norm
    with pytest.raises(ValueError, match="criterion"):
        ls.eigenvalues(obj, criterion="vibes")
    # the plain three-term recurrence (no basis: what a large model gets for its top eigenvalue)
    plain = ls.eigenvalues(obj, k=1, tol=1e-8, reorthogonalize=False)
    assert plain.top[0] == pytest.approx(float(w[-1]), rel=1e-9) and plain.converged


def test_per_block_eigenvalues_match_the_dense_blocks():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    names = list(obj.names)
    for curvature in ("hessian", "ggn"):
        A = cached_dense("mlp", curvature)
        out = ls.eigenvalues(obj, k=2, bottom=1, by="layer", curvature=curvature, tol=1e-10)
        blocks = group_names(names, "layer")
        assert list(out) == list(blocks) == ["fc1", "fc2"]
        for b, members in blocks.items():
            idx = _block_index(model, names, members)
            w = torch.linalg.eigvalsh(A[np.ix_(idx, idx)])
            np.testing.assert_allclose(out[b].top, w.flip(0)[:2].numpy(), atol=1e-9 * float(w.abs().max()))
            np.testing.assert_allclose(out[b].bottom, w[:1].numpy(), atol=1e-9 * float(w.abs().max()))
            assert out[b].size == idx.size
    # any grouping: a mapping, a function
    custom = ls.eigenvalues(obj, k=1, by={"weights": ["fc1.weight", "fc2.weight"]}, tol=1e-10)
    idx = _block_index(model, names, ["fc1.weight", "fc2.weight"])
    H = cached_dense("mlp", "hessian")
    assert custom["weights"].top[0] == pytest.approx(float(torch.linalg.eigvalsh(H[np.ix_(idx, idx)])[-1]), rel=1e-9)
    by_kind = ls.eigenvalues(obj, k=1, by=lambda n: n.rsplit(".", 1)[1], tol=1e-10)
    assert sorted(by_kind) == ["bias", "weight"]
    with pytest.raises(KeyError, match="not measured"):
        ls.eigenvalues(obj, by={"x": ["fc3.weight"]})
    with pytest.raises(ValueError, match="k and bottom"):
        ls.eigenvalues(obj, k=0)


def test_repeated_eigenvalues_are_found_with_their_multiplicity():
    """Seed 002's quadratic: H = 2·diag(100, 1, ..., 1). Lanczos from one vector sees the repeated
    eigenvalue once; the restart on the invariant subspace finds its copies."""
    d = 8
    A = torch.eye(d, dtype=torch.float64)
    A[0, 0] = 100.0
    obj = ls.Objective(Quadratic(A, torch.linspace(-1, 1, d, dtype=torch.float64)), call_loss, None)
    res = ls.eigenvalues(obj, k=3, bottom=2, tol=1e-12)
    np.testing.assert_allclose(res.top, [200.0, 2.0, 2.0], rtol=1e-12)
    np.testing.assert_allclose(res.bottom, [2.0, 2.0], rtol=1e-12)
    # the legacy shorthand agrees
    np.testing.assert_allclose(ls.top_eigenvalues(obj, k=2), [200.0, 2.0], rtol=1e-9)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_preconditioned_sharpness_against_dense(curvature):
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    A = cached_dense("mlp", curvature)
    gen = torch.Generator().manual_seed(5)
    P = {n: torch.rand(p.shape, generator=gen, dtype=torch.float64) * 10 + 0.1 for n, p in obj.params().items()}
    p = tree.flatten(P, obj.names)
    dense = A / torch.sqrt(p[:, None] * p[None, :])
    w = torch.linalg.eigvalsh(dense)
    res = ls.preconditioned_sharpness(obj, P, k=2, curvature=curvature, tol=1e-10)
    np.testing.assert_allclose(res.top, w.flip(0)[:2].numpy(), atol=1e-9 * float(w.abs().max()))
    # the eigenvalues of P⁻¹A are those of P^{-1/2} A P^{-1/2}
    ev = np.sort(np.linalg.eigvals((A / p[:, None]).numpy()).real)[::-1]
    np.testing.assert_allclose(res.top, ev[:2], rtol=1e-8)
    with pytest.raises(ValueError, match="positive"):
        ls.preconditioned_sharpness(obj, {n: torch.zeros_like(v) for n, v in P.items()})


def test_float32_dot_products_are_accumulated_in_float64():
    """A float32 BLAS dot over millions of coordinates drifts by ~√d·ε (it moved the top Ritz value of
    all-MiniLM-L6-v2, d = 2.3e7, by 5e-4): Lanczos accumulates its dot products in float64."""
    from landscape.eigen.lanczos import _dot, _dots

    gen = torch.Generator().manual_seed(0)
    d = 3_000_000
    q = torch.rand(2, d, generator=gen)  # positive entries: no cancellation to hide behind
    w = torch.rand(d, generator=gen)
    ref = q.double() @ w.double()
    assert float(((_dots(q, w) - ref) / ref).abs().max()) < 1e-6
    assert _dot(q[0], w) == pytest.approx(float(ref[0]), rel=1e-6)
