"""The cheap ``observe``: scratch buffers reused across steps, tiled rounding noise, and the chunked
bfloat16 updates. Each is checked against the plain computation it replaces."""

from __future__ import annotations

import pytest
import torch

from landscape.optim import PseudoUpdates
from landscape.optim._atoms import _AbsHistogram
from landscape.optim._core import stochastic_round_to_bf16_


def _mask_round(src: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The textbook stochastic rounding: add the noise to the float32 bits, clear the low 16 bits."""
    bits = src.contiguous().view(torch.int32) + noise
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def test_tiled_noise_equals_the_textbook_rounding():
    gen = torch.Generator().manual_seed(0)
    src = torch.randn(10_003, generator=gen) * torch.logspace(-30, 30, 10_003)
    src[:3] = torch.tensor([0.0, -0.0, 3.0e38])
    noise = torch.randint(0, 1 << 16, (1_000,), dtype=torch.int32, generator=gen)
    tiled = noise.repeat(11)[: src.numel()]
    out = torch.empty(src.shape, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, src.clone(), noise=noise, consume=True)
    assert torch.equal(out.view(torch.int16), _mask_round(src, tiled).view(torch.int16))
    out2 = torch.empty(src.shape, dtype=torch.bfloat16)
    kept = src.clone()
    stochastic_round_to_bf16_(out2, kept, noise=noise)  # not consumed: src untouched
    assert torch.equal(kept, src) and torch.equal(out2.view(torch.int16), out.view(torch.int16))
    strided = torch.empty((src.numel(), 2), dtype=torch.bfloat16)[:, 0]  # a non-contiguous destination
    stochastic_round_to_bf16_(strided, src.clone(), noise=noise, consume=True)
    assert torch.equal(strided.contiguous().view(torch.int16), out.view(torch.int16))


@pytest.mark.parametrize("piece", [1 << 20, 4_096], ids=["one-piece", "many-pieces"])
def test_signed_histogram_finds_the_exact_kth_largest_abs(monkeypatch, piece):
    import landscape.optim._atoms as atoms

    monkeypatch.setattr(atoms, "_PIECE", piece)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(50_000, generator=gen) * torch.logspace(-8, 8, 50_000)
    x[::7] = -x[::7]
    x[5] = -0.0
    ref = x.abs().sort(descending=True).values
    hist = _AbsHistogram(x)
    for k in (1, 17, 5_000, 49_999, 50_000):
        assert float(hist.kth_largest(k)) == float(ref[k - 1])


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_observe_gives_every_scratch_buffer_back_and_reuses_them(state_dtype):
    gen = torch.Generator().manual_seed(2)
    params = {"w": torch.randn(40, 30, generator=gen), "b": torch.randn(30, generator=gen)}
    pu = PseudoUpdates(params, state_dtype=state_dtype)
    sizes = []
    for _ in range(4):
        pu.observe({n: torch.randn(p.shape, generator=gen) for n, p in params.items()})
        sizes.append(pu._workspace.nbytes())
    assert sizes[1] == sizes[2] == sizes[3] > 0  # a steady set of buffers, none leaked, none added
    n = sum(p.numel() for p in params.values())
    assert sizes[-1] <= 4 * 4 * n  # a few parameter-sized temporaries at most (float32)


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_chunked_bfloat16_updates_equal_whole_buffer_updates(monkeypatch, rounding):
    """bf16 EMA states are updated in cache-sized pieces; each coordinate gets the same noise as in
    one whole-buffer update, so the stored bits are identical."""
    import landscape.optim._core as core

    gen = torch.Generator().manual_seed(3)
    params = {"w": torch.randn(700, 500, generator=gen), "b": torch.randn(333, generator=gen)}  # > 1 chunk
    grads = [{n: torch.randn(p.shape, generator=gen) for n, p in params.items()} for _ in range(3)]

    def run():
        pu = PseudoUpdates(params, state_dtype=torch.bfloat16, rounding=rounding)
        for g in grads:
            pu.observe(g)
        return pu.state_dict()["moments"]

    chunked = run()
    monkeypatch.setattr(core.EMA, "elementwise", False)
    monkeypatch.setattr(core.EMASquare, "elementwise", False)
    whole = run()
    assert core.CHUNK < 700 * 500
    for k, tree in whole.items():
        for n, v in tree.items():
            assert torch.equal(v.view(torch.int16), chunked[k][n].view(torch.int16)), (k, n)
