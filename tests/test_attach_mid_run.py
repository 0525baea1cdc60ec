"""Attaching the probe to a run already in progress, with a new out folder: the steps are numbered as
the optimizer's, the first step seen is measured, and the recipes' states start from zero there."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from landscape.models import lm_loss
from landscape.probe import Probe, ResumeError
from landscape.store import load_run
from tests.test_probe import FAST, RECIPES, make, train


def _flat_grad(model, batch):
    model.zero_grad()
    lm_loss(model, batch).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    model.zero_grad()
    return g


def test_a_probe_attached_after_five_adam_steps_numbers_and_measures_from_step_six(tmp_path):
    # the reference: one probe from step 0 on the same trajectory (training is bit-identical with a probe)
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, lm_loss, pb, out=tmp_path / "whole", every=3, recipes=RECIPES, settings=FAST) as whole:
        whole.attach(opt)
        train(model, opt, gen, 12, whole)
    ref = load_run(tmp_path / "whole")

    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, gen, 5)  # five steps before anyone looks
    x5 = [p.detach().clone() for p in model.parameters()]
    with Probe(model, lm_loss, pb, out=tmp_path / "mid", every=3, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        assert probe.step == 5
        train(model, opt, gen, 7, probe)
    run = load_run(tmp_path / "mid")
    assert run.steps("steps") == list(range(6, 13))
    assert run.steps() == [6, 9, 12]  # the first step seen, then the schedule's own steps
    assert run.meta["start_step"] == 5
    assert any(e["kind"] == "attach" and "after 5 optimizer steps" in e["message"] for e in run.events())
    from landscape.report import _metadata

    assert ("training steps", "7 (steps 6–12: attached after 5 steps, recipe states from zero there)") in _metadata(run)
    # the training losses and gradient norms are the whole run's from step 6 on
    whole_steps = {r["step"]: r for r in ref.rows("steps")}
    for r in run.rows("steps"):
        np.testing.assert_allclose(r["grad_norm"], whole_steps[r["step"]]["grad_norm"], rtol=1e-6)
        np.testing.assert_allclose(r["loss"], whole_steps[r["step"]]["loss"], rtol=1e-6)
    # the real step is the optimizer's own: the same direction and values as the whole run's
    for step in (6, 9, 12):
        a = {r["direction"]: r for r in run.rows("sharpness", step=step)}
        b = {r["direction"]: r for r in ref.rows("sharpness", step=step)}
        for col in ("sharpness", "update_norm"):
            np.testing.assert_allclose(a["adam (trained)"][col], b["adam (trained)"][col], rtol=1e-6)
    # the recipes' states start at step 6: not the whole run's
    first = {r["direction"]: r for r in run.rows("sharpness", step=6)}
    whole6 = {r["direction"]: r for r in ref.rows("sharpness", step=6)}
    assert abs(whole6["adam"]["sharpness"] - first["adam"]["sharpness"]) > 1e-3 * abs(first["adam"]["sharpness"])
    # the first momenta hold one gradient, g at x_5 on step 6's batch: SGD's direction there is ĝ, its
    # sharpness ĝᵀ∇²f(x_5)ĝ on the probe batch (central differences in float64), Adam's norm ‖g/(|g|+ε)‖
    with torch.no_grad():
        for p, v in zip(model.parameters(), x5, strict=True):
            p.copy_(v)
    g = _flat_grad(model, _batch_at(6))
    adam = g / (g.abs() + 1e-8)
    np.testing.assert_allclose(first["adam"]["update_norm"], float(adam.norm()), rtol=1e-5)
    assert not first["adam"]["shifted"]
    np.testing.assert_allclose(first["adam"]["sharpness"], _fd_sharpness(model, pb, adam / adam.norm()), rtol=1e-5)
    assert not first["sgd"]["shifted"]
    np.testing.assert_allclose(first["sgd"]["sharpness"], _fd_sharpness(model, pb, g / g.norm()), rtol=1e-5)
    assert abs(whole6["sgd"]["sharpness"] - first["sgd"]["sharpness"]) > 1e-3 * abs(first["sgd"]["sharpness"])


def _fd_sharpness(model, batch, u, h=1e-4):
    """uᵀ∇²f(x)u by central differences on a float64 copy of ``model`` in eval mode."""
    import copy

    m = copy.deepcopy(model).double().eval()
    base = [p.detach().clone() for p in m.parameters()]

    def f(t):
        with torch.no_grad():
            i = 0
            for p, b in zip(m.parameters(), base, strict=True):
                p.copy_(b + t * u[i:i + p.numel()].double().view_as(p))
                i += p.numel()
            return float(lm_loss(m, batch))

    return (f(h) - 2 * f(0.0) + f(-h)) / h**2

def _batch_at(step, seed=0):
    """The training batch of optimizer step ``step`` in tests.test_probe.train after make(seed)."""
    _, _, gen = make(seed)
    from tests.test_probe import CTX, VOCAB

    for _ in range(step):
        x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
    return x, torch.roll(x, -1, 1)



def test_a_mid_run_folder_resumes_like_an_uninterrupted_one(tmp_path):
    def run(out, stops):
        model, pb, gen = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        train(model, opt, gen, 4)
        done = 4
        for stop in stops:
            with Probe(model, lm_loss, pb, out=out, every=3, recipes=RECIPES, settings=FAST) as probe:
                probe.attach(opt)
                assert probe.step == done
                train(model, opt, gen, stop - done, probe)
            done = stop
        return load_run(out)

    whole = run(tmp_path / "whole", [13])
    parts = run(tmp_path / "parts", [9, 13])  # the state is saved at step 9's measurement
    assert parts.meta["start_step"] == 4
    assert whole.steps() == parts.steps() == [5, 6, 9, 12]
    assert parts.steps("steps") == list(range(5, 14))
    assert any("resumed after step 9" in e["message"] for e in parts.events())
    for col in ("sharpness", "update_norm"):
        np.testing.assert_allclose(parts.columns("sharpness")[col], whole.columns("sharpness")[col], rtol=1e-6)


def test_start_step_numbers_the_steps_of_an_optimizer_that_keeps_no_count(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD: no state, no step count
    train(model, opt, gen, 7)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=5, recipes=RECIPES, settings=FAST, start_step=7) as probe:
        probe.attach(opt)
        train(model, opt, gen, 4, probe)
    run = load_run(tmp_path / "run")
    assert run.steps("steps") == [8, 9, 10, 11] and run.steps() == [8, 10]
    # without it the probe cannot know: the steps are numbered from 1
    with Probe(model, lm_loss, pb, out=tmp_path / "run2", every=5, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        train(model, opt, gen, 2, probe)
    assert load_run(tmp_path / "run2").steps("steps") == [1, 2]


def test_a_start_step_the_optimizer_contradicts_is_refused_and_bad_values_fail_early(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, gen, 3)
    with pytest.raises(ValueError, match="start_step=5, but the optimizer has taken 3 steps"):
        Probe(model, lm_loss, pb, out=tmp_path / "run", recipes=RECIPES, settings=FAST, start_step=5).attach(opt)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="start_step must be a non-negative integer"):
            Probe(model, lm_loss, pb, out=tmp_path / "bad", recipes=RECIPES, settings=FAST, start_step=bad)
    # a folder holding a run still resumes or refuses as before: the optimizer must be at its saved step
    with Probe(model, lm_loss, pb, out=tmp_path / "ok", every=2, recipes=RECIPES, settings=FAST, start_step=3) as probe:
        probe.attach(opt)
        train(model, opt, gen, 1, probe)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ResumeError, match="probe state is at step 4, but it is being attached to a new optimizer"):
        Probe(model, lm_loss, pb, out=tmp_path / "ok", every=2, recipes=RECIPES, settings=FAST).attach(fresh)


def test_the_manual_form_attached_mid_run_takes_the_step_from_the_optimizer(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    train(model, opt, gen, 6)
    probe = Probe(model, lm_loss, pb, out=tmp_path / "run", every=4, recipes=RECIPES, settings=FAST)
    from tests.test_probe import CTX, VOCAB

    for _ in range(3):
        x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
        lm_loss(model, (x, torch.roll(x, -1, 1))).backward()
        probe.observe(optimizer=opt)
        opt.step()
        opt.zero_grad()
    probe.close()
    run = load_run(tmp_path / "run")
    assert run.steps("steps") == [7, 8, 9] and run.steps() == [7, 8]
