"""Stochastic Lanczos quadrature against the dense float64 spectrum: its density, smoothed with the
same kernel, against the dense eigenvalues' smoothed density; its first moment against the trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import landscape as ls
from landscape import tree
from tests._models import CASES, cached_dense, classification_loss


def smoothed(eigs: np.ndarray, t: np.ndarray, sigma: float) -> np.ndarray:
    z = (t[:, None] - eigs[None, :]) / sigma
    return (np.exp(-0.5 * z * z) / (sigma * math.sqrt(2 * math.pi))).mean(axis=1)


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_slq_from_the_standard_basis_is_the_dense_smoothed_density(curvature):
    """Σᵢ eᵢᵀ g(A) eᵢ = tr g(A), and a Lanczos run exhausting the Krylov space of eᵢ is an exact Gauss
    rule: started from every basis vector, SLQ reproduces the dense smoothed density."""
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    A = cached_dense("mlp", curvature)
    eigs = torch.linalg.eigvalsh(A).numpy()
    like = obj.params()
    d = A.shape[0]
    basis = [tree.unflatten(torch.eye(d, dtype=torch.float64)[i], like) for i in range(d)]
    dens = ls.spectral_density(obj, start=basis, steps=d, curvature=curvature)
    assert dens.n_vectors == d and dens.size == d and dens.weights.sum() == pytest.approx(1.0, rel=1e-12)
    t = np.linspace(eigs.min() - 0.1, eigs.max() + 0.1, 400)
    sigma = 0.02 * (eigs.max() - eigs.min())
    _, phi = dens.density(t, sigma)
    np.testing.assert_allclose(phi, smoothed(eigs, t, sigma), rtol=1e-7, atol=1e-9 * phi.max())
    assert dens.trace == pytest.approx(float(eigs.sum()), rel=1e-9, abs=1e-12)
    assert dens.moment(2) == pytest.approx(float((eigs**2).mean()), rel=1e-8)


def test_slq_from_random_vectors_converges():
    model, batch, _, _ = CASES["cnn"]()
    obj = ls.Objective(model, classification_loss, batch)
    A = cached_dense("cnn", "hessian")
    eigs = torch.linalg.eigvalsh(A).numpy()
    d = A.shape[0]
    with ls.HessianOperator(obj) as op:
        dens = ls.spectral_density(op, n_vectors=40, steps=12, seed=1)
        # the first moment of each run is vᵀAv/‖v‖² exactly, whatever the number of steps
        samples = np.array([d * np.sum(dens.weights[dens.run == r] * dens.nodes[dens.run == r]) * dens.n_vectors
                            for r in range(dens.n_vectors)])
    stderr = samples.std(ddof=1) / math.sqrt(len(samples))
    assert dens.trace == pytest.approx(samples.mean(), rel=1e-10)
    assert abs(dens.trace - eigs.sum()) < 4 * stderr
    # nodes are Ritz values: inside [λ_min, λ_max]; the extreme ones converge to them
    lo, hi = dens.support
    assert eigs.min() - 1e-10 <= lo and hi <= eigs.max() + 1e-10
    assert hi == pytest.approx(eigs.max(), rel=1e-6)
    # the smoothed density approaches the dense one (L1 distance, a wide kernel)
    t = np.linspace(eigs.min() - 1, eigs.max() + 1, 2000)
    sigma = 0.05 * (eigs.max() - eigs.min())
    dt = t[1] - t[0]
    l1 = np.sum(np.abs(dens.density(t, sigma)[1] - smoothed(eigs, t, sigma))) * dt
    few = ls.spectral_density(obj, n_vectors=2, steps=12, seed=1)
    l1_few = np.sum(np.abs(few.density(t, sigma)[1] - smoothed(eigs, t, sigma))) * dt
    assert l1 < 0.25 and l1 < l1_few
    assert dens.n_products == 40 * 12
    with pytest.raises(ValueError, match="sigma"):
        dens.density(t, sigma=0)
