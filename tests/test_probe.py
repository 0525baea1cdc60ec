"""The probe on real (tiny) training runs."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import landscape as ls
from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.probe import Probe
from landscape.store import RunMismatchError, load_run

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=10, coord_per_layer=4)
RECIPES = ["sgd", "signsgd", "adam", "adam_clip"]
VOCAB, CTX = 13, 8


def make(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = TinyCausalLM(VOCAB, width=16, depth=1, heads=2, context=CTX, dropout=dropout)
    gen = torch.Generator().manual_seed(seed)
    probe_batch = (torch.randint(0, VOCAB, (4, CTX), generator=gen), torch.randint(0, VOCAB, (4, CTX), generator=gen))
    return model, probe_batch, gen


def train(model, opt, gen, steps, probe=None):
    for _ in range(steps):
        x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
        loss = lm_loss(model, (x, torch.roll(x, -1, 1)))
        loss.backward()
        if probe is not None:
            probe.log_loss(loss)
        opt.step()
        opt.zero_grad()


def test_training_is_bit_identical_with_and_without_the_probe(tmp_path):
    """Dropout is active in training, so a probe that consumed the global RNG would change it."""
    results = []
    for with_probe in (False, True):
        model, pb, gen = make(dropout=0.1)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        if with_probe:
            with Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST) as probe:
                probe.attach(opt)
                train(model, opt, gen, 7, probe)
        else:
            train(model, opt, gen, 7)
        results.append((model, opt, torch.randint(0, 1000, (3,))))
    (m0, o0, r0), (m1, o1, r1) = results
    for (n, a), b in zip(m0.named_parameters(), m1.parameters()):
        assert torch.equal(a, b), n
        assert a.requires_grad == b.requires_grad
    for s0, s1 in zip(o0.state.values(), o1.state.values()):
        for k in s0:
            assert torch.equal(s0[k], s1[k]), k
    assert torch.equal(r0, r1), "the global RNG stream differs"
    assert m1.training and all(m.training for m in m1.modules())
    run = load_run(tmp_path / "run")
    assert run.steps() == [1, 3, 6]
    assert run.steps("steps") == list(range(1, 8))


def test_adam_pseudo_update_matches_the_real_adam_step(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-8)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=4, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        train(model, opt, gen, 8, probe)
    run = load_run(tmp_path / "run")
    assert run.meta["trained_direction"] == "adam (trained)"
    assert run.directions[-1] == "adam (trained)"
    for step in run.steps():
        rows = {r["direction"]: r for r in run.rows("sharpness", step=step)}
        assert rows["adam (trained)"]["sharpness"] == pytest.approx(rows["adam"]["sharpness"], rel=1e-3, abs=1e-7)
        assert rows["sgd"]["ratio_to_sgd"] == pytest.approx(1.0)
        cos = {(r["a"], r["b"]): r["cosine"] for r in run.rows("cosine", step=step)}
        key = ("adam", "adam (trained)")
        assert cos[key] == pytest.approx(1.0, abs=1e-5)
    # the training losses were logged, measured lines start at the probe loss
    steps = run.rows("steps")
    assert all(np.isfinite(r["loss"]) and r["status"] == "ok" for r in steps)
    for line in run.rows("lines"):
        sh = run.rows("sharpness", step=line["step"], direction=line["direction"])[0]
        assert line["s"][0] == 0 and line["loss"][0] == pytest.approx(sh["loss"], rel=1e-6)
        assert line["best_loss"] == pytest.approx(np.min(line["loss"]))


def test_smoothness_rows_match_a_direct_call(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    points = {}

    def pre(o, a, k):
        points["x_t"] = {n: p.detach().clone() for n, p in model.named_parameters()}

    def post(o, a, k):
        points.setdefault("pairs", []).append((points["x_t"], {n: p.detach().clone() for n, p in model.named_parameters()}))

    opt.register_step_pre_hook(pre)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=["sgd"], settings=FAST) as probe:
        probe.attach(opt)
        opt.register_step_post_hook(post)
        train(model, opt, gen, 4, probe)
    run = load_run(tmp_path / "run")
    obj = ls.Objective(model, lm_loss, pb)
    for row in run.rows("smoothness"):
        x_t, x_next = points["pairs"][row["step"] - 1]
        direct = ls.local_smoothness(obj, x_t, x_next)
        assert row["l_hat"] == pytest.approx(direct.l_hat, rel=1e-5)
        assert row["grad_norm"] == pytest.approx(direct.grad_norm, rel=1e-6)
        assert row["step_norm"] == pytest.approx(direct.step_norm, rel=1e-6)
    assert run.rows("coord_smoothness")


def test_manual_form_and_non_finite_steps_are_skipped(tmp_path):
    model, pb, gen = make()
    params = dict(model.named_parameters())
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST) as probe:
        for step in range(1, 7):
            x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
            loss = lm_loss(model, (x, torch.roll(x, -1, 1)))
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
            if step == 3:
                grads["blocks.0.fc1.weight"] = grads["blocks.0.fc1.weight"].clone()
                grads["blocks.0.fc1.weight"][0, 0] = float("nan")
            probe.observe(grads, loss=loss)
            if step != 3:  # a loop that skips non-finite steps, as GradScaler does
                with torch.no_grad():
                    for n, p in params.items():
                        p.sub_(0.1 * grads[n])
    run = load_run(tmp_path / "run")
    status = {r["step"]: (r["status"], r["reason"]) for r in run.rows("steps")}
    assert status[3][0] == "skipped" and "blocks.0.fc1.weight" in status[3][1]
    assert all(s == "ok" for k, (s, _) in status.items() if k != 3)
    assert run.steps() == [1, 2, 4, 6]
    assert any(e["kind"] == "skip" for e in run.events())
    assert "trained" in run.directions  # the manual form's own step is measured too
    for r in run.rows("sharpness"):
        assert np.isfinite(r["sharpness"])


def test_resume_appends_and_mismatched_settings_are_refused(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    out = tmp_path / "run"
    with Probe(model, lm_loss, pb, out=out, every=3, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        train(model, opt, gen, 4, probe)
    with Probe(model, lm_loss, pb, out=out, every=3, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        assert probe.step == 4 and probe._pseudo.step == 4
        train(model, opt, gen, 3, probe)
    run = load_run(out)
    assert run.steps("steps") == list(range(1, 8))
    assert run.steps() == [1, 3, 6]
    assert any(e["kind"] == "resume" for e in run.events())
    with pytest.raises(RunMismatchError, match="every"):
        Probe(model, lm_loss, pb, out=out, every=5, recipes=RECIPES, settings=FAST).attach(opt)
    other_batch = (pb[0].flip(0), pb[1])
    with pytest.raises(RunMismatchError, match="probe_batch"):
        Probe(model, lm_loss, other_batch, out=out, every=3, recipes=RECIPES, settings=FAST).attach(opt)


def test_probe_errors_are_clear(tmp_path):
    model, pb, gen = make()
    with pytest.raises(ValueError, match="every"):
        Probe(model, lm_loss, pb, out=tmp_path / "r", every=0)
    with pytest.raises(KeyError, match="unknown recipes"):
        Probe(model, lm_loss, pb, out=tmp_path / "r", recipes=["sgd", "adamw2"])
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        Probe(model, lm_loss, pb, out=tmp_path / "r").attach(object())


SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {root!r})
    from tests.test_probe import make, train, FAST, RECIPES
    from landscape.probe import Probe
    from landscape.models import lm_loss
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = Probe(model, lm_loss, pb, out={out!r}, every=1, recipes=RECIPES, settings=FAST)
    probe.attach(opt)
    train(model, opt, gen, 10_000, probe)
    """
)


def test_a_run_killed_with_sigkill_keeps_its_measurements(tmp_path):
    out = tmp_path / "killed"
    root = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT.format(root=root, out=str(out))])
    try:
        deadline = time.time() + 120
        n = 0
        while time.time() < deadline:
            db = out / "run.sqlite"
            if db.exists():
                try:
                    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as c:
                        n = c.execute("SELECT COUNT(DISTINCT step) FROM sharpness").fetchone()[0]
                except sqlite3.OperationalError:
                    n = 0
            if n >= 3:
                break
            time.sleep(0.2)
        assert n >= 3, "the run did not measure in time"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    run = load_run(out)
    steps = run.steps()
    assert len(steps) >= 3
    for s in steps:  # every committed step is complete: one row per direction
        assert len(run.rows("sharpness", step=s)) == len(RECIPES) + 1
        assert len(run.rows("lines", step=s)) == len(RECIPES) + 1
    from typer.testing import CliRunner

    from landscape.cli import app

    res = CliRunner().invoke(app, ["report", str(out), "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert len(res.output.strip().splitlines()) - 1 == len(steps) * (len(RECIPES) + 1)


def test_two_probes_on_one_folder_are_refused_and_leave_the_first_intact(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST) as first:
        first.attach(opt)
        train(model, opt, gen, 3, first)
        second = Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
        opt2 = torch.optim.Adam(model.parameters(), lr=1e-2)
        with pytest.raises(ls.store.RunLockedError, match="already being written by a writer in this same process"):
            second.attach(opt2)
        assert not opt2._optimizer_step_pre_hooks  # nothing was hooked
        train(model, opt, gen, 2, first)
    run = load_run(tmp_path / "run")
    assert [r["step"] for r in run.rows("steps")] == [1, 2, 3, 4, 5] and run.steps() == [1, 2, 4]
