"""The per-layer decomposition ûᵀAû = Σ_b û_bᵀ(Aû)_b: terms against the dense float64 matrix, their
sum against the total, the diagonal parts against the dense diagonal blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import landscape as ls
from landscape import tree
from landscape.linops import group_names
from tests._models import CASES, cached_dense, classification_loss


@pytest.mark.parametrize("case,curvature", [("mlp", "hessian"), ("mlp", "ggn"), ("transformer", "hessian")])
def test_contributions_sum_to_the_sharpness_and_match_the_dense_blocks(case, curvature):
    model, batch, _, _ = CASES[case]()
    obj = ls.Objective(model, classification_loss, batch)
    A = cached_dense(case, curvature)
    names = list(obj.names)
    sizes = [dict(model.named_parameters())[n].numel() for n in names]
    off = np.cumsum([0] + sizes)
    gen = torch.Generator().manual_seed(7)
    dirs = {"g": obj.grad(), "rand": tree.randn_like(obj.params(), gen)}
    out = ls.sharpness_by_layer(obj, dirs, by="layer", curvature=curvature, diagonal=True)
    blocks = group_names(names, "layer")
    sharp = ls.directional_sharpness(obj, dirs, shift="never", method="hvp", curvature=curvature)
    for name, u in dirs.items():
        x = tree.flatten(u, names)
        x = x / x.norm()
        res = out[name]
        assert res.total == pytest.approx(float(x @ A @ x), rel=1e-9, abs=1e-12)
        assert res.total == pytest.approx(sharp[name].raw, rel=1e-9, abs=1e-12)
        assert sum(res.contributions.values()) == pytest.approx(res.total, rel=1e-12, abs=1e-14)
        assert sum(res.mass.values()) == pytest.approx(1.0, rel=1e-12)
        Ax = A @ x
        for b, members in blocks.items():
            idx = np.concatenate([np.arange(off[names.index(n)], off[names.index(n) + 1]) for n in members])
            assert res.contributions[b] == pytest.approx(float(x[idx] @ Ax[idx]), rel=1e-9, abs=1e-12)
            assert res.diagonal[b] == pytest.approx(float(x[idx] @ A[np.ix_(idx, idx)] @ x[idx]), rel=1e-9, abs=1e-12)
            assert res.mass[b] == pytest.approx(float(x[idx] @ x[idx]), rel=1e-12)
        # coupling: each off-diagonal pair counted once in each of its two blocks
        assert sum(res.coupling.values()) == pytest.approx(res.total - sum(res.diagonal.values()), abs=1e-12)


def test_blocks_must_cover_every_parameter_once():
    model, batch, _, _ = CASES["mlp"]()
    obj = ls.Objective(model, classification_loss, batch)
    u = {"g": obj.grad()}
    with pytest.raises(ValueError, match="cover"):
        ls.sharpness_by_layer(obj, u, by={"first": ["fc1.weight"]})
    with pytest.raises(ValueError, match="two blocks"):
        ls.sharpness_by_layer(obj, u, by={"a": ["fc1.weight"], "b": ["fc1.weight"]})
    with pytest.raises(ValueError, match="zero"):
        ls.sharpness_by_layer(obj, {"z": {n: torch.zeros_like(p) for n, p in obj.params().items()}})
    per_tensor = ls.sharpness_by_layer(obj, u, by="tensor")["g"]
    assert list(per_tensor.contributions) == list(obj.names) and per_tensor.diagonal is None
