"""``observe(..., background=True)``: the gradients copied and checked at once, the recipe states
updated on a side thread. Every reader waits for that update, so every state and direction is the same
as with the update run in place, bit for bit."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from landscape.optim import PseudoUpdates, recipe_names
from tests.optim.test_state_device import _grads, _params


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_background_updates_give_the_same_states_and_directions_bit_for_bit(state_dtype):
    params = _params()
    a = PseudoUpdates(params, state_dtype=state_dtype)
    b = PseudoUpdates(params, state_dtype=state_dtype)
    assert a._layout is not None  # the packed layout, where the update can run apart
    for i, g in enumerate(_grads(params, 6)):
        a.observe(g)
        keep = {n: t.clone() for n, t in g.items()}
        b.observe(g, background=True)
        for t in g.values():  # the caller reuses its gradient buffers at once (zero_grad(set_to_none=False))
            t.zero_()
        for n, t in keep.items():
            g[n].copy_(t)
        if i % 2:
            da, db = a.directions(), b.directions()
            for name in recipe_names():
                for n in params:
                    assert torch.equal(da[name][n], db[name][n]), (i, name, n)
    assert a.step == b.step == 6
    sa, sb = a.state_dict(), b.state_dict()
    for k, tree in sa["moments"].items():
        for n, v in tree.items():
            assert torch.equal(v, sb["moments"][k][n]), (k, n)
    torch.testing.assert_close(a.preconditioner("adam"), b.preconditioner("adam"), rtol=0, atol=0)


def test_the_update_runs_on_another_thread_and_readers_wait_for_it():
    params = _params()
    pu = PseudoUpdates(params, ["sgd", "adam"])
    seen = []
    real = pu._update
    release = threading.Event()

    def slow(raw, t):
        seen.append(threading.current_thread().name)
        release.wait(10)
        real(raw, t)

    pu._update = slow
    g = _grads(params, 1)[0]
    pu.observe(g, background=True)
    time.sleep(0.05)
    assert pu._pending is not None and not pu._pending.done()  # observe returned while the update waits
    threading.Timer(0.2, release.set).start()
    d = pu.directions(["sgd"])  # waits for it
    assert seen and seen[0].startswith("landscape-states") and pu._pending is None
    torch.testing.assert_close(d["sgd"]["w"], 0.1 * g["w"], rtol=1e-6, atol=0)  # m = (1 − β)·g after one step


def test_bad_gradients_are_refused_at_once_and_a_failed_update_is_raised_by_the_next_reader():
    params = _params()
    pu = PseudoUpdates(params, ["sgd", "adam"])
    g = _grads(params, 2)
    bad = {n: t.clone() for n, t in g[0].items()}
    bad["w"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite gradients"):  # in the caller's thread, nothing changed
        pu.observe(bad, background=True)
    assert pu.step == 0
    pu.observe(g[0], background=True)

    def broken(raw, t):
        raise MemoryError("no room for the states")

    pu._update = broken
    pu.observe(g[1], background=True)
    with pytest.raises(RuntimeError, match="background update of the recipe states failed: MemoryError"):
        pu.directions()
    assert pu.step == 1  # the failed step changed nothing; the first one is there


def test_a_probe_with_background_tracking_writes_the_same_store_and_leaves_training_unchanged(tmp_path):
    import numpy as np

    from landscape.models import lm_loss
    from landscape.probe import Probe
    from landscape.store import load_run
    from tests.test_probe import FAST, make, train

    finals = []
    for background in (False, True):
        model, pb, gen = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        with Probe(model, lm_loss, pb, out=tmp_path / str(background), every=4, settings=FAST,
                   background=background) as probe:
            probe.attach(opt)
            train(model, opt, gen, 9, probe)
            assert probe._background is background
        finals.append([p.detach().clone() for p in model.parameters()])
    a, b = load_run(tmp_path / "False"), load_run(tmp_path / "True")
    assert a.steps() == b.steps() == [1, 4, 8] and a.steps("steps") == b.steps("steps")
    for table in ("sharpness", "lines", "smoothness"):
        ca, cb = a.columns(table), b.columns(table)
        for col, va in ca.items():
            if col == "wall":
                continue
            vb = cb[col]
            if isinstance(va, np.ndarray) and va.dtype.kind == "f":
                np.testing.assert_array_equal(va, vb, err_msg=f"{table}.{col}")
    assert all(torch.equal(x, y) for x, y in zip(*finals, strict=True))
    # the saved recipe states too (closing waited for the last background update): a resume continues
    # from the same momenta
    states = []
    for run, folder in ((a, tmp_path / "False"), (b, tmp_path / "True")):
        pointer = run.meta["probe_state"]
        assert pointer["step"] == 9
        states.append(torch.load(folder / pointer["file"], weights_only=True)["pseudo"])
    assert states[0]["step"] == states[1]["step"] == 9
    for k, tree in states[0]["moments"].items():
        for n, v in tree.items():
            assert torch.equal(v, states[1]["moments"][k][n]), (k, n)


@pytest.mark.parametrize("n", [0, 1, 5, 1 << 16, 3 * (1 << 16) + 17, 2_000_003])
def test_the_packed_gradient_norm_matches_float64_and_propagates_nan_and_inf(n):
    from landscape.optim.pseudo import _flat_norm

    gen = torch.Generator().manual_seed(n)
    buf = torch.randn(n, generator=gen) * torch.logspace(-6, 2, max(n, 1))[:n]  # a wide range of magnitudes
    ref = float(buf.double().norm()) if n else 0.0
    assert _flat_norm(buf) == pytest.approx(ref, rel=1e-6, abs=0)
    if n:
        for bad in (float("nan"), float("inf")):
            b = buf.clone()
            b[n // 2] = bad
            assert not (_flat_norm(b) < float("inf"))


def test_observe_keeps_the_gradient_norm_for_the_step_row():
    params = _params()
    pu = PseudoUpdates(params, ["sgd"])
    g = _grads(params, 1)[0]
    pu.observe(g)
    ref = float(torch.cat([t.reshape(-1).double() for t in g.values()]).norm())
    assert pu.grad_norm == pytest.approx(ref, rel=1e-6)


def test_background_is_on_by_default_only_where_a_cpu_core_is_left_idle(tmp_path, monkeypatch):
    import os

    from landscape.models import lm_loss
    from landscape.probe import Probe
    from landscape.store import load_run
    from tests.test_probe import FAST, make

    def chosen(threads, cores, **kw):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        model, pb, _ = make()
        out = tmp_path / f"{threads}-{cores}-{len(kw)}"
        probe = Probe(model, lm_loss, pb, out=out, recipes=["sgd"], settings=FAST, **kw)
        probe.attach(torch.optim.Adam(model.parameters()))
        probe.close()
        assert load_run(out).meta["tracking"] == {"background": probe._background}
        return probe._background

    assert chosen(1, 2) is True  # OMP_NUM_THREADS=1 on two cores: the other core is free
    assert chosen(2, 2) is False  # every core trains: a side thread would only compete
    assert chosen(1, 2, background=False) is False
    assert chosen(2, 2, background=True) is True
    assert chosen(1, 2, state_device="cpu") is False  # the host path of a GPU run: not automatic
