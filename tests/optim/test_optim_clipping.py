"""Top-k% coordinate clipping (seed 002 App. B.2): exact fraction at the threshold, signs kept,
idempotent, global and per-tensor scope; the fast threshold against a full sort."""

from __future__ import annotations

import math

import pytest
import torch

import landscape.optim as lo
from landscape.optim._atoms import _AbsHistogram, _count_top


def heavy_tree(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"emb": (300, 16), "w": (16, 16), "b": (16,), "s": ()}  # emb > 4096: histogram path
    return {
        n: (torch.randn(s, generator=gen) * torch.exp(3 * torch.randn(s, generator=gen))).to(dtype)
        for n, s in shapes.items()
    }


def clip(tree, frac, per_tensor=False):
    tx = lo.clip_top(frac, per_tensor)
    u, _ = tx.update(tree, tx.init(tree))
    return u


def sort_threshold(values, frac):
    flat = torch.cat([v.reshape(-1) for v in values]).abs()
    k = _count_top(frac, flat.numel())
    return float(torch.sort(flat, descending=True).values[k - 1])


@pytest.mark.parametrize("frac", [0.001, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_exact_fraction_at_threshold_global(frac):
    x = heavy_tree()
    n = sum(v.numel() for v in x.values())
    k = _count_top(frac, n)
    tau = sort_threshold(list(x.values()), frac)
    y = clip(x, frac)
    at = sum(int((v.abs() == tau).sum()) for v in y.values())
    assert at == k  # continuous random values: no ties
    assert max(float(v.abs().max()) for v in y.values()) == tau


@pytest.mark.parametrize("frac", [0.01, 0.1, 0.5])
def test_exact_fraction_at_threshold_per_tensor(frac):
    x = heavy_tree(1)
    y = clip(x, frac, per_tensor=True)
    for name in x:
        tau = sort_threshold([x[name]], frac)
        assert int((y[name].abs() == tau).sum()) == _count_top(frac, x[name].numel()), name
        assert float(y[name].abs().max()) == tau


@pytest.mark.parametrize("per_tensor", [False, True])
def test_signs_kept_magnitudes_shrink_and_idempotent(per_tensor):
    x = heavy_tree(2)
    y = clip(x, 0.1, per_tensor)
    z = clip(y, 0.1, per_tensor)
    for name in x:
        assert torch.equal(torch.sign(y[name]), torch.sign(x[name]))
        assert bool((y[name].abs() <= x[name].abs()).all())
        assert torch.equal(z[name], y[name]), f"clipping twice changed {name}"


def test_below_threshold_untouched_and_input_not_modified():
    x = heavy_tree(3)
    before = {k: v.clone() for k, v in x.items()}
    tau = sort_threshold(list(x.values()), 0.1)
    y = clip(x, 0.1)
    for name in x:
        assert torch.equal(x[name], before[name])
        small = x[name].abs() < tau
        assert torch.equal(y[name][small], x[name][small])


def test_clip_zero_is_identity_and_one_is_scaled_sign():
    x = heavy_tree(4)
    y0 = clip(x, 0.0)
    assert all(torch.equal(y0[k], x[k]) for k in x)
    y1 = clip(x, 1.0)
    tau = min(float(v.abs().min()) for v in x.values())
    for k in x:
        assert torch.equal(y1[k], torch.sign(x[k]) * tau)


def test_ties_all_reach_the_threshold():
    x = {"a": torch.tensor([5.0, -5.0, 5.0, 1.0, 0.0, -2.0, 5.0, 3.0, 0.5, 0.25])}
    y = clip(x, 0.2)  # k = 2, τ = 5: all four ±5 sit at τ (ties), the rest untouched
    assert torch.equal(y["a"], x["a"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_threshold_equals_full_sort(dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(30_000, generator=gen) * torch.exp(4 * torch.randn(30_000, generator=gen))
    x[:100] = 0.0  # zeros
    x[100:300] = 1.5  # a big tie
    x[300:310] = 1e-40  # subnormal float32
    x = x.to(dtype)
    flat = x.abs().to(torch.float32 if dtype == torch.bfloat16 else dtype)
    hist = _AbsHistogram(flat)
    srt = torch.sort(flat, descending=True).values
    for k in [1, 2, 17, 200, 250, 3000, 15_000, 29_700, 29_899, 29_900, 29_901, 30_000]:
        assert float(hist.kth_largest(k)) == float(srt[k - 1]), k


def test_threshold_over_many_tensors_equals_sort():
    x = heavy_tree(6, torch.float64)
    for frac in (0.003, 0.25, 0.75):
        taus = lo.top_k_threshold(x, frac)
        assert set(taus.values()) == {sort_threshold(list(x.values()), frac)}


def test_signsgd_is_sgd_with_threshold_100_percent():
    """Seed 002 §5: signSGD is SGD with clipping threshold 100% (up to the scalar τ, per tensor)."""
    x = heavy_tree(7)
    y = clip(x, 1.0, per_tensor=True)
    for k in x:
        tau = float(x[k].abs().min())
        assert torch.equal(y[k], torch.sign(x[k]) * tau)


def test_count_top_rounding():
    assert _count_top(0.1, 1000) == 100
    assert _count_top(0.001, 10) == 1  # at least one coordinate once clip > 0
    assert _count_top(0.0, 10) == 0
    assert _count_top(1.0, 7) == 7
    assert _count_top(0.25, 10) == 3  # round half up: 2.5 -> 3
    assert math.isinf(lo.top_k_threshold({"a": torch.ones(3)}, 0.0)["a"])
