"""``state_device``: recipe states kept on another device than the parameters (host memory while the
model trains on a GPU). On CPU the host path must give exactly the default's directions; the pinned
(page-locked, non-blocking) copies exist only with CUDA and are skipped cleanly without it."""

from __future__ import annotations

import pytest
import torch

from landscape.optim import PseudoUpdates, recipe_names

SHAPES = {"emb": (11, 6), "w": (6, 5), "b": (5,), "conv": (3, 2, 2, 2)}


def _params(dtypes=None):
    gen = torch.Generator().manual_seed(0)
    dtypes = dtypes or {}
    return {n: torch.randn(s, generator=gen, dtype=dtypes.get(n, torch.float32)) for n, s in SHAPES.items()}


def _grads(params, steps):
    gen = torch.Generator().manual_seed(1)
    return [{n: torch.randn(p.shape, generator=gen).to(p.dtype) * (1 + i) for n, p in params.items()} for i in range(steps)]


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mixed", [False, True], ids=["flat", "per-leaf"])
def test_cpu_state_device_gives_identical_directions(state_dtype, mixed):
    if mixed and state_dtype is not None:
        pytest.skip("bfloat16 storage with float64 parameters is not supported (with or without state_device)")
    params = _params({"b": torch.float64} if mixed else None)  # float64 + float32: no common flat buffer
    a = PseudoUpdates(params, state_dtype=state_dtype)
    b = PseudoUpdates(params, state_dtype=state_dtype, state_device="cpu")
    assert (a._layout is None) == mixed and (b._layout is None) == mixed
    assert b.state_device == torch.device("cpu") and a.state_device is None
    for g in _grads(params, 4):
        a.observe(g)
        b.observe(g)
    da, db = a.directions(), b.directions()
    assert sorted(da) == sorted(recipe_names())
    for name in da:
        for n, p in params.items():
            assert db[name][n].dtype == p.dtype and db[name][n].device == p.device
            assert torch.equal(da[name][n], db[name][n]), (name, n)
    for k, tree in a.state_dict()["moments"].items():
        for n, v in tree.items():
            assert torch.equal(v, b.state_dict()["moments"][k][n]), (k, n)
    torch.testing.assert_close(a.preconditioner("adam"), b.preconditioner("adam"), rtol=0, atol=0)


def test_two_gradient_buffers_alternate_and_directions_stay_fresh():
    params = _params()
    pu = PseudoUpdates(params, ["sgd", "lion"], state_device="cpu")
    gs = _grads(params, 4)
    pu.observe(gs[0])
    before = pu.directions()
    ptrs = []
    for g in gs[1:]:
        pu.observe(g)
        ptrs.append(pu._last_grad.buf.data_ptr())
        for n in params:
            assert torch.equal(pu._last_grad[n], g[n])
    assert ptrs[0] == ptrs[2] != ptrs[1]  # the kept gradient and a spare, swapped each step: no new buffer
    again = PseudoUpdates(params, ["sgd", "lion"])
    again.observe(gs[0])
    for name, tree in again.directions().items():  # what was returned before did not change
        for n, v in tree.items():
            assert torch.equal(before[name][n], v)


def test_a_non_finite_gradient_changes_nothing_even_with_in_place_reuse():
    params = _params()
    pu = PseudoUpdates(params, ["sgd", "lion", "adafactor"], state_device="cpu")
    gs = _grads(params, 2)
    pu.observe(gs[0])
    snap = pu.state_dict()
    bad = {n: v.clone() for n, v in gs[1].items()}
    bad["w"][1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        pu.observe(bad)
    after = pu.state_dict()
    for n, v in snap["g"].items():
        assert torch.equal(after["g"][n], v), n
    for k, tree in snap["moments"].items():
        for n, v in tree.items():
            assert torch.equal(after["moments"][k][n], v), (k, n)


@pytest.mark.parametrize(
    "device, err, match",
    [
        ("gpu0", ValueError, "not a device"),
        ("meta", ValueError, "meta"),
        (3.5, TypeError, "state_device must be"),
    ],
)
def test_bad_state_devices_are_refused(device, err, match):
    with pytest.raises(err, match=match):
        PseudoUpdates(_params(), ["sgd"], state_device=device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_state_device_without_cuda_is_refused_and_nothing_is_pinned():
    with pytest.raises(ValueError, match="CUDA is not available"):
        PseudoUpdates(_params(), ["sgd"], state_device="cuda")
    pu = PseudoUpdates(_params(), ["sgd", "lion"], state_device="cpu")
    assert pu._pin is False  # pin_memory needs CUDA: the host path uses ordinary memory
    assert not pu._last_grad.buf.is_pinned()
    pu.observe(_grads(_params(), 1)[0])


def test_probe_passes_state_device_and_refuses_a_bad_one(tmp_path):
    from landscape.models import TinyCausalLM, lm_loss
    from landscape.probe import Probe

    model = TinyCausalLM(13, width=8, depth=1, heads=2, context=4)
    batch = (torch.randint(0, 13, (2, 4)), torch.randint(0, 13, (2, 4)))
    with pytest.raises(ValueError, match="not a device"):
        Probe(model, lm_loss, batch, out=tmp_path / "bad", state_device="host")
    probe = Probe(model, lm_loss, batch, out=tmp_path / "run", recipes=["sgd"], state_device="cpu")
    probe.observe({n: torch.ones_like(p) for n, p in model.named_parameters()})
    assert probe._pseudo.state_device == torch.device("cpu")
    probe.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_params_with_host_states_match_gpu_states():  # pragma: no cover - run on a GPU machine
    params = {n: p.cuda() for n, p in _params().items()}
    a = PseudoUpdates(params)
    b = PseudoUpdates(params, state_device="cpu")
    assert b._pin and b._last_grad.buf.is_pinned()
    for g in _grads(_params(), 3):
        g = {n: v.cuda() for n, v in g.items()}
        a.observe(g)
        b.observe(g)
    da, db = a.directions(), b.directions()
    for name in da:
        for n in params:
            assert db[name][n].device == params[n].device
            torch.testing.assert_close(db[name][n], da[name][n], rtol=1e-5, atol=1e-6)
