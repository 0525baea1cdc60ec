"""The optimizer race (landscape.race): curves checked against independent training loops (torch.optim.Adam,
a hand-written EMA-momentum SGD), the learning-rate choice against the grid's own minimum, the 95%
interval against its closed form, resume against an uninterrupted race, and the figures' artists
against the stored curves."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from landscape.cli import app
from landscape.race import RaceError, choose_learning_rates, parse_lr_grid, race, race_summary, t_interval
from landscape.store import load_run
from tests.specs import race_mlp

SPEC = "tests.specs.race_mlp:build"
GRID = {"sgd": [0.3, 1.0, 3.0], "adam": [3e-3, 1e-2, 3e-2]}
STEPS = 12
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _reference(recipe: str, lr: float, seed: int, steps: int = STEPS, probe_every: int = 5):
    """An independent training loop: torch.optim.Adam for 'adam', m = 0.9m + 0.1g, x ← x − ηm for 'sgd'."""
    torch.manual_seed(seed)
    model, loss_fn, probe, train = race_mlp.build()
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999), eps=1e-8) if recipe == "adam" else None
    moms = [torch.zeros_like(p) for p in params]
    losses, probes = [], {}

    def probe_loss():
        with torch.no_grad():
            return float(loss_fn(model, probe))

    probes[0] = probe_loss()
    for step in range(1, steps + 1):
        loss = loss_fn(model, train[(step - 1) % len(train)])
        losses.append(float(loss.detach()))
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            with torch.no_grad():
                for p, m in zip(params, moms):
                    m.mul_(0.9).add_(p.grad, alpha=0.1)
                    p.sub_(lr * m)
                    p.grad = None
        if step % probe_every == 0 or step == steps:
            probes[step] = probe_loss()
    return losses, probes


@pytest.fixture(scope="module")
def raced(tmp_path_factory):
    out = tmp_path_factory.mktemp("race") / "run"
    result = race(SPEC, out, recipes=["sgd", "adam"], steps=STEPS, lr_grid=GRID, seeds=[0, 1], probe_every=5)
    return result, load_run(out)


def _curve(run, recipe, lr, seed, column):
    rows = [r for r in run.rows("race_curves", recipe=recipe, seed=seed) if r["lr"] == lr]
    return {r["step"]: r[column] for r in rows if r[column] is not None}


def test_each_run_equals_an_independent_training_loop(raced):
    _, run = raced
    for recipe in ("sgd", "adam"):
        for lr in GRID[recipe]:
            losses, probes = _reference(recipe, lr, seed=0)
            got = _curve(run, recipe, lr, 0, "train_loss")
            np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)], losses, rtol=1e-5, atol=1e-7)
            got_p = _curve(run, recipe, lr, 0, "probe_loss")
            assert sorted(got_p) == [0, 5, 10, 12]
            np.testing.assert_allclose([got_p[s] for s in sorted(probes)], [probes[s] for s in sorted(probes)],
                                       rtol=1e-5, atol=1e-7)


def test_the_chosen_rate_is_the_grid_minimum_and_only_it_trains_on_the_other_seeds(raced):
    result, run = raced
    for recipe in ("sgd", "adam"):
        finals = {lr: _reference(recipe, lr, seed=0)[1][STEPS] for lr in GRID[recipe]}
        best = min(finals, key=finals.get)
        assert result.chosen[recipe] == best
        seed1 = [r["lr"] for r in run.rows("race_runs", recipe=recipe, seed=1)]
        assert seed1 == [best]
    # same initialisation for every recipe of a seed, another one for another seed
    starts = {(r["recipe"], r["lr"], r["seed"]): r["probe_loss"] for r in run.rows("race_curves", step=0)}
    seed0 = {v for (_, _, s), v in starts.items() if s == 0}
    seed1 = {v for (_, _, s), v in starts.items() if s == 1}
    assert len(seed0) == 1 and len(seed1) == 1 and seed0 != seed1
    assert result.diverged == [] and len(result.trained) == 6 + 2


def test_the_summary_interval_is_students_t_over_the_seeds(raced):
    _, run = raced
    for s in race_summary(run):
        finals = [r["final_train_loss"] for r in run.rows("race_runs", recipe=s["recipe"]) if r["lr"] == s["lr"]]
        x = np.asarray(finals)
        assert s["final_train_loss"] == pytest.approx(x.mean())
        assert s["final_train_ci"] == pytest.approx(12.706204736174707 * x.std(ddof=1) / math.sqrt(2))  # t(0.975, 1)
        # the final training loss is the mean over the last 10% of the steps (here: the last one)
        last = _curve(run, s["recipe"], s["lr"], 0, "train_loss")[STEPS]
        assert run.rows("race_runs", recipe=s["recipe"], seed=0, lr=s["lr"])[0]["final_train_loss"] == last
    mean, half = t_interval([1.0, 2.0, 3.0])
    assert (mean, half) == pytest.approx((2.0, 4.302652729911275 / math.sqrt(3)))
    assert math.isnan(t_interval([1.0])[1])


def test_report_and_figures_read_back(raced, tmp_path):
    from landscape.race_plots import race_curves
    from landscape.report import report

    _, run = raced
    text = report(run, "md")
    assert "| sgd |" in text and "## Learning-rate sweep (seed 0)" in text
    s = {r["recipe"]: r for r in race_summary(run)}
    assert f"{s['adam']['lr']:.4g}" in text and "±" in text
    assert report(run, "csv").splitlines()[0] == "recipe,lr,seed,status,steps,final_train_loss,final_probe_loss,score,chosen"
    assert "\\begin{tabular}" in report(run, "latex")
    ax = race_curves(run, "probe_loss", smooth=1)
    lines = {line.get_label().split(" ")[0]: line for line in ax.lines}
    assert set(lines) == {"sgd", "adam"}
    for recipe, line in lines.items():
        lr = s[recipe]["lr"]
        a, b = _curve(run, recipe, lr, 0, "probe_loss"), _curve(run, recipe, lr, 1, "probe_loss")
        np.testing.assert_allclose(line.get_ydata(), [(a[k] + b[k]) / 2 for k in sorted(a)])
    assert len(ax.collections) == 2  # one confidence band per recipe
    assert lines["sgd"].get_color() != lines["adam"].get_color()
    result = runner.invoke(app, ["plot", str(run.path), "--out", str(tmp_path / "fig")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "fig").iterdir()) == ["race_lr_sweep.png", "race_probe_loss.png",
                                                                   "race_train_loss.png"]


def test_a_killed_race_resumes_per_run_and_equals_the_uninterrupted_one(raced, tmp_path):
    _, full = raced
    out = tmp_path / "run"
    ticks = [0]

    def stop(done, total, what):
        ticks[0] += 1
        if ticks[0] == STEPS + 5:  # in the middle of the second run
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        race(SPEC, out, recipes=["sgd", "adam"], steps=STEPS, lr_grid=GRID, seeds=[0, 1], probe_every=5, progress=stop)
    assert len(load_run(out).rows("race_runs")) == 1  # the first run is committed, the second is not
    result = race(SPEC, out, recipes=["sgd", "adam"], steps=STEPS, lr_grid=GRID, seeds=[0, 1], probe_every=5)
    assert result.already == [("sgd", 0.3, 0)] and len(result.trained) == 7
    resumed = load_run(out)
    strip = [{k: v for k, v in r.items()} for r in resumed.rows("race_curves")]
    assert strip == full.rows("race_curves")
    more = race(SPEC, out, recipes=["sgd", "adam"], steps=STEPS, lr_grid=GRID, seeds=[0, 1, 2], probe_every=5)
    assert sorted(more.trained) == [("adam", more.chosen["adam"], 2), ("sgd", more.chosen["sgd"], 2)]


def test_batches_that_differ_between_runs_are_refused(tmp_path):
    with pytest.raises(RaceError, match="gave batch 1 of seed 0 differently to sgd .lr 1. than to the first run"):
        race("tests.specs.race_mlp:own_generator_loader", tmp_path / "a", recipes=["sgd"], steps=3,
             lr_grid=[0.3, 1.0])
    with pytest.raises(RaceError, match="probe batch of seed 1 differs"):
        race("tests.specs.race_mlp:seeded_probe_batch", tmp_path / "b", recipes=["sgd"], steps=2, lr_grid=[1.0],
             seeds=[0, 1])


def test_a_diverging_rate_scores_inf_and_is_not_chosen(tmp_path):
    result = race("tests.specs.race_mlp:regression", tmp_path / "run", recipes=["sgd"], steps=40, lr_grid=[0.3, 1e3])
    assert result.chosen == {"sgd": 0.3} and result.diverged == [("sgd", 1e3, 0)]
    rows = {r["lr"]: r for r in load_run(tmp_path / "run").rows("race_runs")}
    assert rows[1e3]["status"] == "diverged" and rows[1e3]["score"] == math.inf
    chosen = choose_learning_rates(rows.values(), 0)["sgd"]
    assert chosen["diverged"] == [1e3] and chosen["at_edge"]


def test_lr_grid_parsing():
    grid = parse_lr_grid(["1e-3,3e-3", "adam=1e-4, 1e-2"], ["sgd", "adam"])
    assert grid == {"sgd": [1e-3, 3e-3], "adam": [1e-4, 1e-2]}
    assert parse_lr_grid(None, ["sgd", "adam"]) == {"sgd": [0.1, 0.3, 1.0, 3.0], "adam": [3e-4, 1e-3, 3e-3, 1e-2]}
    with pytest.raises(RaceError, match="'lion' is not one of the racing recipes"):
        parse_lr_grid(["lion=1e-3"], ["sgd"])
    with pytest.raises(RaceError, match="must be positive"):
        parse_lr_grid(["0,1"], ["sgd"])


@pytest.mark.parametrize("args, fragment", [
    (["--recipes", "sgd,nope"], "unknown recipes ['nope']"),
    (["--lr-grid", "sgd=abc"], "is not a comma-separated list of numbers"),
    (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
    (["--spec", "tests.specs.race_mlp:no_train_batches"], "must return train_batches"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, fragment):
    base = {"--spec": SPEC, "--out": str(tmp_path / "run"), "--steps": "2", "--recipes": "sgd", "--lr-grid": "1"}
    for i in range(0, len(args), 2):
        base[args[i]] = args[i + 1]
    result = runner.invoke(app, ["race", *[x for kv in base.items() for x in kv]])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("landscape race: error:") and fragment in lines[0], result.output
    assert not (tmp_path / "run").exists()


def test_cli_race_prints_the_chosen_rates(tmp_path):
    result = runner.invoke(app, ["race", "--spec", SPEC, "--out", str(tmp_path / "run"), "--steps", "4",
                                 "--recipes", "sgd,adam", "--lr-grid", "sgd=0.3,1", "--lr-grid", "adam=1e-2"])
    assert result.exit_code == 0, result.output
    assert "3 training run(s)" in result.output and "adam         lr 0.01" in result.output
