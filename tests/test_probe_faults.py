"""The probe's promises under faults: it never stops training, and a resume continues the same
trajectory or refuses. Real processes, real files, real signals."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from landscape.demo import DemoConfig, run_demo
from landscape.models import lm_loss
from landscape.probe import Probe, ResumeError, saved_state
from landscape.store import load_run
from tests.test_probe import CTX, FAST, RECIPES, VOCAB, make, train

ROOT = Path(__file__).resolve().parents[1]


def _run_script(code: str, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


# -- a failure of the probe's own never stops training ---------------------------------------------

DISK_FULL = """
    import resource, signal, sys, torch
    from tests.test_probe import make, train, FAST, RECIPES
    from landscape.probe import Probe
    from landscape.models import lm_loss

    out, how = sys.argv[1], sys.argv[2]

    def run(probed):
        model, pb, gen = make()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        probe = None
        if probed:
            probe = Probe(model, lm_loss, pb, out=out, every=1, recipes=RECIPES, settings=FAST)
            probe.attach(opt)
        train(model, opt, gen, 30, probe)
        if probe is not None:
            probe.close()
        return model, probe

    reference, _ = run(False)
    if how == "rlimit":  # no tmpfs to fill: every file write past 300 KB fails (EFBIG), as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, resource.RLIM_INFINITY))
    model, probe = run(True)
    same = all(torch.equal(a, b) for a, b in zip(reference.parameters(), model.parameters()))
    print("identical" if same else "DIFFERENT", probe.step, probe.disabled, sep="|")
"""


def _small_disk(tmp_path: Path) -> tuple[Path, str]:
    """A 300 KB tmpfs when this machine lets us mount one, else a 300 KB file-size limit."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if shutil.which("mount") and os.geteuid() == 0:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)], capture_output=True)
        if ok.returncode == 0:
            return mnt, "tmpfs"
    return mnt, "rlimit"


def test_a_full_disk_switches_the_probe_off_and_training_goes_on(tmp_path):
    mnt, how = _small_disk(tmp_path)
    try:
        res = _run_script(DISK_FULL, str(mnt / "run"), how)
    finally:
        if how == "tmpfs":
            subprocess.run(["umount", str(mnt)], capture_output=True)
    assert res.returncode == 0, res.stderr[-3000:]
    same, steps, disabled = res.stdout.strip().splitlines()[-1].split("|")
    assert same == "identical" and steps != "0"  # the run finished, bit-identical to the run without a probe
    assert disabled.startswith("writing failed at step")
    assert any(w in disabled for w in ("full", "space", "I/O", "too large")), disabled
    warned = [line for line in res.stderr.splitlines() if "landscape probe:" in line]
    assert len(warned) == 1 and "the probe is off for the rest of this run, training goes on" in warned[0]
    assert "Traceback" not in res.stderr


def test_a_failing_measurement_is_skipped_and_the_next_one_runs(tmp_path):
    model, pb, gen = make()
    calls = {"n": 0, "fail": False}

    def flaky_loss(m, batch):
        calls["n"] += 1
        if calls["fail"]:
            raise RuntimeError("the user's loss broke once")
        return lm_loss(m, batch)

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with Probe(model, flaky_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(1, 7):
                calls["fail"] = step == 4  # the measurement of step 4 raises
                train(model, opt, gen, 1, probe)
        calls["fail"] = False
        assert probe.disabled is None
    run = load_run(tmp_path / "run")
    assert run.steps() == [1, 2, 6] and run.steps("steps") == list(range(1, 7))
    failed = [e for e in run.events() if e["kind"] == "measurement-failed"]
    assert len(failed) == 1 and failed[0]["step"] == 4 and "the user's loss broke once" in failed[0]["message"]
    assert sum("landscape probe: measurement failed" in str(w.message) for w in caught) == 1


class SparseLM(nn.Module):
    def __init__(self, sparse: bool) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8, sparse=sparse)
        self.head = nn.Linear(8, VOCAB)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


def sparse_loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))


def test_sparse_embedding_gradients_are_measured_like_dense_ones(tmp_path):
    results = {}
    for sparse in (True, False):
        torch.manual_seed(0)
        model = SparseLM(sparse)
        gen = torch.Generator().manual_seed(0)
        pb = (torch.randint(0, VOCAB, (4, CTX), generator=gen), torch.randint(0, VOCAB, (4, CTX), generator=gen))
        # SGD keeps sparse gradients sparse; the dense twin gets the same numbers densely
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        out = tmp_path / f"run-{sparse}"
        with Probe(model, sparse_loss, pb, out=out, every=2, recipes=["sgd", "adam", "signsgd"], settings=FAST) as probe:
            probe.attach(opt)
            for _ in range(5):
                x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
                loss = sparse_loss(model, (x, torch.roll(x, -1, 1)))
                loss.backward()
                if sparse:
                    assert model.embed.weight.grad.is_sparse
                opt.step()
                opt.zero_grad()
        assert probe.disabled is None
        results[sparse] = load_run(out).columns("sharpness")
    for col in ("sharpness", "grad_correlation", "update_norm"):
        np.testing.assert_allclose(results[True][col], results[False][col], rtol=1e-5)


def test_lbfgs_step_with_a_closure_records_the_gradient_of_step_one(tmp_path):
    model, pb, gen = make()
    x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
    batch = (x, torch.roll(x, -1, 1))
    g1 = torch.autograd.grad(lm_loss(model, batch), list(model.parameters()))
    g1_norm = float(torch.sqrt(sum((g.double() ** 2).sum() for g in g1)))
    opt = torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=3)

    def closure():
        opt.zero_grad()
        loss = lm_loss(model, batch)
        loss.backward()
        return loss

    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=["sgd", "adam"], settings=FAST) as probe:
        probe.attach(opt)
        for _ in range(3):
            opt.step(closure)
    run = load_run(tmp_path / "run")
    steps = run.rows("steps")
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert steps[0]["grad_norm"] == pytest.approx(g1_norm, rel=1e-5)  # the gradient at x_0, after the closure ran
    assert np.isfinite(steps[0]["loss"])
    assert run.steps() == [1, 2]
    assert "lbfgs (trained)" in run.directions


# -- resume continues the same trajectory or refuses -------------------------------------------------

KILLED = """
    import sys, time, torch
    from tests.test_probe import make, FAST, RECIPES, VOCAB, CTX
    from landscape.probe import Probe, saved_state
    from landscape.models import lm_loss

    out, steps, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = saved_state(out)
    if state is not None:  # a resume: the training state saved with the probe's, for the same step
        model.load_state_dict(state["extra"]["model"])
        opt.load_state_dict(state["extra"]["optimizer"])
        gen.set_state(state["extra"]["gen"])
    extra = lambda: {"model": model.state_dict(), "optimizer": opt.state_dict(), "gen": gen.get_state()}
    probe = Probe(model, lm_loss, pb, out=out, every=4, recipes=RECIPES, settings=FAST, extra_state=extra)
    probe.attach(opt)
    for _ in range(probe.step, steps):
        x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
        loss = lm_loss(model, (x, torch.roll(x, -1, 1)))
        loss.backward()
        probe.log_loss(loss)
        opt.step()
        opt.zero_grad()
        print(probe.step, flush=True)
        time.sleep(pause)
    probe.close()
    print("done", flush=True)
"""


def test_a_killed_run_resumes_on_the_same_trajectory(tmp_path):
    ref = _run_script(KILLED, str(tmp_path / "ref"), "14", "0")
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED), str(out), "14", "0.05"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        while True:  # kill it two steps after its second measurement: between two measurements
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-2000:]
            if line.strip() == "6":
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    before = load_run(out)
    assert before.steps() == [1, 4] and saved_state(out)["step"] == 4
    resumed = _run_script(KILLED, str(out), "14", "0")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed after step 4: recipe states and 2 measurement(s)" in resumed.stderr
    a, b = load_run(tmp_path / "ref"), load_run(out)
    assert a.steps() == b.steps() == [1, 4, 8, 12]
    assert a.steps("steps") == b.steps("steps") == list(range(1, 15))
    ca, cb = a.columns("sharpness"), b.columns("sharpness")
    assert list(ca["direction"]) == list(cb["direction"])
    for col in ("sharpness", "update_norm", "grad_correlation", "loss"):  # the momenta continued exactly
        np.testing.assert_allclose(cb[col], ca[col], rtol=1e-6, err_msg=col)
    np.testing.assert_allclose(b.columns("steps")["loss"], a.columns("steps")["loss"], rtol=1e-6)
    assert [f.name for f in out.glob("probe_state-*.pt")] == ["probe_state-000000000014.pt"]  # old ones removed


def test_resume_refuses_an_optimizer_at_another_step(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        train(model, opt, gen, 4, probe)
    fresh = torch.optim.Adam(model.parameters(), lr=1e-2)
    with pytest.raises(ResumeError, match="probe state is at step 4, but it is being attached to a new optimizer"):
        Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST).attach(fresh)
    train(model, opt, gen, 2)  # the real optimizer moved on without the probe: 6 steps
    with pytest.raises(ResumeError, match="an optimizer that has taken 6 steps"):
        Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST).attach(opt)
    assert load_run(tmp_path / "run").steps("steps") == [1, 2, 3, 4]  # a refusal changes nothing


def test_steps_recorded_after_the_last_saved_state_are_dropped_on_resume(tmp_path, capsys):
    model, pb, gen = make()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # plain SGD keeps no state: no step count to check
    out = tmp_path / "run"
    probe = Probe(model, lm_loss, pb, out=out, every=100, recipes=RECIPES, settings=FAST)
    probe.attach(opt)
    train(model, opt, gen, 60, probe)  # measured at step 1; 50 step rows flushed on the way
    probe._store.close()  # as a kill would leave it: no close(), so no state saved after step 1
    probe._handle.remove()
    assert load_run(out).steps("steps")[-1] == 51 and saved_state(out)["step"] == 1
    model2, pb2, _ = make()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match="cannot check that training resumed from the same step"):
        with Probe(model2, lm_loss, pb2, out=out, every=100, recipes=RECIPES, settings=FAST) as again:
            again.attach(opt2)
            assert again.step == 1
    assert "dropped 50 step row(s)" in capsys.readouterr().err
    assert load_run(out).steps("steps") == [1]


def test_a_folder_without_saved_states_is_not_resumed(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST,
               save_state=False) as probe:
        probe.attach(opt)
        train(model, opt, gen, 3, probe)
    with pytest.raises(ResumeError, match="holds 3 training steps but no saved recipe states"):
        Probe(model, lm_loss, pb, out=tmp_path / "run", every=3, recipes=RECIPES, settings=FAST).attach(opt)


DEMO = """
    import sys
    from landscape.demo import DemoConfig, run_demo
    from landscape.measure import MeasureSettings
    cfg = DemoConfig(steps=12, every=4, width=16, depth=1, heads=2, context=16, batch_size=4, probe_size=4,
                     corpus_chars=20_000)
    settings = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2)
    stop = int(sys.argv[2])

    def on_step(step, loss, measured):
        print(step, measured, flush=True)
        if step == stop:
            import os, signal
            os.kill(os.getpid(), signal.SIGKILL)

    res = run_demo(sys.argv[1], cfg, on_step=on_step, settings=settings)
    print("resumed_from", res["resumed_from"], flush=True)
"""


def test_a_killed_demo_resumes_model_optimizer_and_data_order(tmp_path):
    ref = _run_script(DEMO, str(tmp_path / "ref"), "0")
    assert ref.returncode == 0, ref.stderr[-2000:]
    killed = _run_script(DEMO, str(tmp_path / "demo"), "6")
    assert killed.returncode == -signal.SIGKILL
    again = _run_script(DEMO, str(tmp_path / "demo"), "0")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resumed_from 4" in again.stdout and "resumed after step 4" in again.stderr
    a, b = load_run(tmp_path / "ref"), load_run(tmp_path / "demo")
    assert a.steps("steps") == b.steps("steps") == list(range(1, 13)) and a.steps() == b.steps() == [1, 4, 8, 12]
    np.testing.assert_allclose(b.columns("steps")["loss"], a.columns("steps")["loss"], rtol=1e-6)
    np.testing.assert_allclose(b.columns("sharpness")["sharpness"], a.columns("sharpness")["sharpness"], rtol=1e-6)


def test_demo_without_training_state_is_refused_not_restarted(tmp_path):
    cfg = DemoConfig(steps=2, every=4, width=16, depth=1, heads=2, context=16, batch_size=4, probe_size=4,
                     corpus_chars=20_000)
    from landscape.measure import MeasureSettings

    settings = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2)
    run_demo(tmp_path / "demo", cfg, settings=settings)
    state = saved_state(tmp_path / "demo")
    state["extra"] = None  # as an older landscape left it
    torch.save(state, next((tmp_path / "demo").glob("probe_state-*.pt")))
    with pytest.raises(RuntimeError, match="without its training state"):
        run_demo(tmp_path / "demo", cfg, settings=settings)
    with sqlite3.connect(tmp_path / "demo" / "run.sqlite") as c:  # nothing was written by the refusal
        assert c.execute("SELECT MAX(step) FROM steps").fetchone()[0] == 2


def test_close_is_quiet_after_the_probe_switched_off(tmp_path):
    model, pb, gen = make()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
    probe.attach(opt)
    train(model, opt, gen, 2, probe)
    probe._store._conn.close()  # the store becomes unusable under the probe
    with pytest.warns(RuntimeWarning, match="the probe is off"):
        train(model, opt, gen, 2, probe)
    assert probe.disabled is not None and probe._pseudo is None
    probe.close()  # no exception
