"""The curvature measurements in a run: the probe and ``landscape analyze`` record them at their own
cadence into the run store (the numbers equal the library's at the same point), ``landscape plot``
draws them and ``landscape report`` tabulates them; a quantity that cannot be measured is an event."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import landscape as ls
from landscape.cli import app
from landscape.curvature_measure import CurvatureSettings
from landscape.curvature_plots import (
    edge_of_stability,
    eigenvalues_over_time,
    sharpness_layers_bars,
    spectral_density_plot,
    trace_over_time,
)
from landscape.store import NoDataError, load_run
from tests._models import MLP, classification_loss
from tests.specs import tiny_lm

FAST = dict(lines=False, smoothness=False, coord_per_layer=0, hist_bins=4)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _train(tmp_path, settings, steps=5, loss_fn=classification_loss, every=2, lr=0.05):
    torch.manual_seed(0)
    model = MLP(3, 6, 3).double()
    x, y = torch.randn(32, 3, dtype=torch.float64), torch.randint(0, 3, (32,))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    snapshots = {}
    with ls.Probe(model, loss_fn, (x[:16], y[:16]), out=tmp_path / "run", every=every, recipes=["sgd", "adam"],
                  settings=settings) as probe:
        probe.attach(opt)
        for step in range(1, steps + 1):
            snapshots[step] = {n: p.detach().clone() for n, p in model.named_parameters()}
            loss = loss_fn(model, (x, y))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model, (x[:16], y[:16]), load_run(tmp_path / "run"), snapshots


def test_probe_records_curvature_at_its_cadence_and_plots_and_reports_it(tmp_path):
    cs = CurvatureSettings(curvatures=("hessian", "ggn"), eig_every=1, eig_k=2, eig_bottom=1, eig_by="layer",
                           eig_tol=1e-8, trace_every=2, trace_methods=("hutch++", "hutchinson"), trace_samples=12,
                           density_every=2, density_steps=10, precond_every=1, layers_every=1, layers_diagonal=True)
    model, batch, run, snaps = _train(tmp_path, ls.MeasureSettings(curvature=cs, **FAST))
    measured = run.steps()
    assert measured == [1, 2, 4]
    assert run.steps("eigenvalues") == measured and run.steps("trace") == [1, 4] and run.steps("density") == [1, 4]
    # the numbers are the library's at the measured point
    obj = ls.Objective(model, classification_loss, batch)
    x1 = snaps[1]
    ref = ls.eigenvalues(obj, k=2, bottom=1, at=x1, curvature="ggn", tol=1e-8)
    got = sorted((r["rank"], r["value"]) for r in run.rows("eigenvalues", step=1, curvature="ggn", block="all",
                                                              which="top"))
    np.testing.assert_allclose([v for _, v in got], ref.top, rtol=1e-7)
    blocks = {r["block"] for r in run.rows("eigenvalues", step=1)}
    assert blocks == {"all", "fc1", "fc2"}
    tr = {(r["curvature"], r["method"]): r for r in run.rows("trace", step=1)}
    assert set(tr) == {("hessian", "hutch++"), ("hessian", "hutchinson"), ("ggn", "hutch++"), ("ggn", "hutchinson")}
    assert tr["ggn", "hutch++"]["estimate"] == pytest.approx(ls.hutchpp_trace(obj, 12, at=x1, curvature="ggn").mean,
                                                            rel=1e-9)
    dec = run.rows("sharpness_layers", step=2, curvature="hessian")
    sharp = {r["direction"]: r["raw"] for r in run.rows("sharpness", step=2)}
    for d in sharp:
        terms = [r["contribution"] for r in dec if r["direction"] == d]
        assert sum(terms) == pytest.approx(sharp[d], rel=1e-7, abs=1e-10)
        assert all(r["diagonal"] is not None for r in dec)
    pre = {r["optimizer"]: r["value"] for r in run.rows("preconditioned", step=4)}
    assert set(pre) == {"adam", "adam (trained)"}  # the recipe and the trained Adam: same betas, same P
    assert pre["adam"] == pytest.approx(pre["adam (trained)"], rel=1e-6)

    # figures: the artists carry the stored numbers
    ax = edge_of_stability(run)
    labels = [line.get_label() for line in ax.lines]
    thr = next(line for line in ax.lines if line.get_label().startswith("38/η"))
    np.testing.assert_allclose(thr.get_ydata(), 38 / 0.05)
    lam = next(line for line in ax.lines if line.get_label() == "λ_max (Hessian)")
    top = run.columns("eigenvalues", curvature="hessian", block="all", which="top", rank=0)
    np.testing.assert_allclose(lam.get_ydata(), top["value"][np.argsort(top["step"])])
    assert "λ_max(P⁻¹H), adam (trained)" in labels
    ax = sharpness_layers_bars(run, step=2)
    totals = next(line for line in ax.lines if line.get_label() == "total")
    np.testing.assert_allclose(totals.get_ydata(), [sharp[d] for d in ["sgd", "adam", "adam (trained)"]], rtol=1e-7)
    heights = sum(np.array([p.get_height() for p in c.patches]) for c in ax.containers)
    np.testing.assert_allclose(heights, totals.get_ydata(), rtol=1e-7, atol=1e-12)
    ax = spectral_density_plot(run)
    assert ax.get_yscale() == "log" and {line.get_label() for line in ax.lines} == {"Hessian", "Gauss–Newton"}
    assert len(eigenvalues_over_time(run, curvature="ggn", block="fc1").containers) == 3
    assert len(trace_over_time(run).containers) == 4
    from landscape.plots import save_figures

    files = {p.stem for p in save_figures(run, tmp_path / "figs", "png", only=["edge_of_stability", "eigenvalues",
                                                                               "trace", "spectral_density",
                                                                               "sharpness_layers", "training_loss"])}
    assert {"edge_of_stability", "eigenvalues", "trace", "spectral_density", "sharpness_layers"} <= files
    # each with its caption, as the other figures: what it shows, from which work, at which steps
    caps = {n: (tmp_path / "figs" / f"{n}.txt").read_text() for n in files}
    assert "Cohen et al. 2021" in caps["edge_of_stability"] and "3 measured steps (1–4)" in caps["edge_of_stability"]
    assert "Ghorbani et al. 2019" in caps["spectral_density"] and "step 4" in caps["spectral_density"]
    assert "2 measured steps (1–4)" in caps["trace"] and "step 4" in caps["sharpness_layers"]
    from PIL import Image

    wide = Image.open(tmp_path / "figs" / "edge_of_stability.png").size
    save_figures(run, tmp_path / "single", "png", only=["edge_of_stability"], width="single", captions=False)
    narrow = Image.open(tmp_path / "single" / "edge_of_stability.png").size
    assert narrow[0] < 0.7 * wide[0] and not (tmp_path / "single" / "edge_of_stability.txt").exists()
    from landscape.report import report

    md = report(run, "md")
    for title in ("Eigenvalues of the Hessian (Lanczos)", "Eigenvalues of the Gauss–Newton per block",
                  "Trace estimates", "Preconditioned sharpness", "Where the sharpness lives"):
        assert title in md
    tex = report(run, "latex")
    assert r"$\lambda_{\max}(P^{-1}H)$" in tex and "λ" not in tex


def test_robust_smoothness_on_the_gauss_newton_matrix_as_seed_002_app_d(tmp_path):
    st = ls.MeasureSettings(robust_every=1, robust_samples=4, robust_curvature="ggn", **FAST)
    model, batch, run, snaps = _train(tmp_path, st, steps=1)
    (row,) = run.rows("robust")
    obj = ls.Objective(model, classification_loss, batch)
    ref = ls.robust_smoothness(obj, at=snaps[1], n_samples=4, curvature="ggn", spectrum="norm")
    assert row["curvature"] == "ggn" and row["top_eig"] == pytest.approx(ref.top_eig, rel=1e-6)
    assert st.as_dict()["robust_curvature"] == "ggn"
    with pytest.raises(ValueError, match="robust_curvature"):
        ls.MeasureSettings(robust_curvature="fisher")


def test_off_by_default_and_old_runs_still_resume(tmp_path):
    assert "curvature" not in ls.MeasureSettings().as_dict()
    assert "robust_curvature" not in ls.MeasureSettings().as_dict()
    _, _, run, _ = _train(tmp_path, ls.MeasureSettings(**FAST), steps=2)
    assert not run.has("eigenvalues")
    with pytest.raises(NoDataError, match="CurvatureSettings"):
        edge_of_stability(run)
    with pytest.raises(ValueError, match="curvatures"):
        CurvatureSettings(curvatures=("fisher",))
    with pytest.raises(ValueError, match="eig_every"):
        CurvatureSettings(eig_every=-1)


def test_a_quantity_that_cannot_be_measured_is_an_event_and_the_rest_is_kept(tmp_path):
    def decayed(model, batch):  # weight decay after the model output: no Gauss–Newton split of f
        return classification_loss(model, batch) + 1e-3 * model.fc1.weight.square().sum()

    cs = CurvatureSettings(curvatures=("hessian", "ggn"), eig_every=1)
    _, _, run, _ = _train(tmp_path, ls.MeasureSettings(curvature=cs, **FAST), steps=1, loss_fn=decayed)
    assert {r["curvature"] for r in run.rows("eigenvalues")} == {"hessian"}
    assert run.rows("sharpness")
    messages = [e["message"] for e in run.events() if e["kind"] == "warning"]
    assert any("ggn eig: not measured" in m and "after the output" in m for m in messages), messages


def test_analyze_cli_curvature_options(tmp_path):
    ckpts = tmp_path / "ckpts"
    tiny_lm.train(ckpts, steps=1)
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / "*.pt"), "--out",
                                      str(out), "--every", "2", "-r", "sgd", "-r", "adam", "--curvature-every", "1",
                                      "--ggn"])
    assert result.exit_code == 0, result.output
    run = load_run(out)
    assert run.steps("eigenvalues") == [0] and run.steps("preconditioned") == [0]
    assert {r["curvature"] for r in run.rows("trace")} == {"hessian", "ggn"}
    assert run.settings["measure"]["curvature"]["eig_by"] == "layer"
    bad = CliRunner().invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / "*.pt"), "--out",
                                   str(tmp_path / "x"), "--ggn"])
    assert bad.exit_code == 2 and "--curvature-every" in bad.output
