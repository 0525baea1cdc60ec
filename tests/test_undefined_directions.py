"""A direction with no direction (all zeros, or non-finite) is recorded as undefined, with the reason,
and the other directions are measured as if it were absent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.measure import MeasureSettings, measure_step
from tests._models import MLP

SETTINGS = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=3, hist_bins=8, chunk=2)


def _setup():
    torch.manual_seed(0)
    model = MLP(3, 5, 2).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    p = obj.params()
    g = obj.grad()
    gen = torch.Generator().manual_seed(1)
    dirs = {"sgd": g, "zero": {n: torch.zeros_like(v) for n, v in p.items()}, "rand": tree.randn_like(p, gen),
            "inf": {n: torch.full_like(v, math.inf) for n, v in p.items()}}
    return obj, p, dirs, tree.axpy(-0.05, g, p)


def test_an_all_zero_direction_is_undefined_with_the_reason_and_the_others_are_measured():
    obj, p, dirs, x_next = _setup()
    rows = measure_step(obj, 5, p, dirs, x_next=x_next, settings=SETTINGS)
    alone = measure_step(obj, 5, p, {k: dirs[k] for k in ("sgd", "rand")}, x_next=x_next, settings=SETTINGS)
    sharp = {r["direction"]: r for r in rows["sharpness"]}
    assert list(sharp) == ["sgd", "zero", "rand", "inf"]
    z = sharp["zero"]
    assert math.isnan(z["sharpness"]) and math.isnan(z["raw"]) and z["ratio_to_sgd"] is None
    assert z["undefined"] == z["ratio_note"] == "direction has norm 0 (all coordinates zero)"
    assert z["update_norm"] == 0.0
    assert "non-finite" in sharp["inf"]["undefined"]
    ref = {r["direction"]: r for r in alone["sharpness"]}
    for name in ("sgd", "rand"):
        assert sharp[name]["sharpness"] == ref[name]["sharpness"]
        assert sharp[name]["ratio_to_sgd"] == ref[name]["ratio_to_sgd"]
        assert sharp[name].get("undefined") is None
    # the sgd direction's sharpness against the dense float64 Hessian
    x, y = obj.batches[0]
    flat = torch.cat([p[n].reshape(-1) for n in obj.names])

    def f(v):
        return F.mse_loss(torch.func.functional_call(obj.model, tree.unflatten(v, p), (x,)), y)

    H = torch.func.hessian(f)(flat)
    u = torch.cat([dirs["sgd"][n].reshape(-1) for n in obj.names])
    u = u / u.norm()
    assert sharp["sgd"]["raw"] == pytest.approx(float(u @ H @ u), rel=1e-10)
    lines = {r["direction"]: r for r in rows["lines"]}
    assert lines["zero"]["undefined"] == z["undefined"] and lines["zero"]["s"].size == 0
    assert math.isnan(lines["zero"]["best_step"])
    np.testing.assert_array_equal(lines["rand"]["loss"], {r["direction"]: r for r in alone["lines"]}["rand"]["loss"])
    hist = {r["direction"]: r for r in rows["histograms"]}
    assert hist["zero"]["zeros"] == tree.numel(p) and hist["zero"]["sparsity"] == 1.0
    assert "inf" not in hist  # no histogram of non-finite values
    cos = {(r["a"], r["b"]): r["cosine"] for r in rows["cosine"]}
    assert math.isnan(cos[("sgd", "zero")]) and math.isnan(cos[("zero", "rand")])
    assert cos[("sgd", "rand")] == pytest.approx({(r["a"], r["b"]): r["cosine"] for r in alone["cosine"]}[("sgd", "rand")],
                                                rel=1e-12)
    assert any("'zero' not measured" in e["message"] for e in rows["_events"])


def test_an_undefined_reference_says_so_in_the_ratio_note():
    obj, p, dirs, x_next = _setup()
    rows = measure_step(obj, 5, p, {"sgd": dirs["zero"], "rand": dirs["rand"]}, settings=SETTINGS)
    r = {r["direction"]: r for r in rows["sharpness"]}["rand"]
    assert r["ratio_to_sgd"] is None and r["ratio_note"].startswith("sgd is undefined at this step")
    assert math.isfinite(r["sharpness"])


def test_a_probe_run_with_an_all_zero_recipe_records_it_and_report_and_figures_say_so(tmp_path):
    from landscape.models import TinyCausalLM, lm_loss
    from landscape.plots import save_figures
    from landscape.report import report
    from landscape.store import load_run

    torch.manual_seed(0)
    model = TinyCausalLM(11, width=8, depth=1, heads=2, context=6)
    gen = torch.Generator().manual_seed(0)
    probe_batch = (torch.randint(0, 11, (3, 6), generator=gen), torch.randint(0, 11, (3, 6), generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = ls.Probe(model, lm_loss, probe_batch, tmp_path / "run", every=2, recipes=["sgd", "signsgd", "adam"],
                     settings=MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2,
                                              hist_bins=8, chunk=2))
    probe.attach(opt)
    real = probe._pseudo.directions

    def zero_signsgd(names=None):  # as adam_clip on a GPT-2 whose unused rows have zero gradient
        out = real(names)
        if "signsgd" in out:
            out["signsgd"] = {k: torch.zeros_like(v) for k, v in out["signsgd"].items()}
        return out

    probe._pseudo.directions = zero_signsgd
    for _ in range(3):
        x = torch.randint(0, 11, (3, 6), generator=gen)
        loss = lm_loss(model, (x, torch.roll(x, -1, 1)))
        loss.backward()
        opt.step()
        opt.zero_grad()
    probe.close()
    assert probe.last_error is None
    run = load_run(tmp_path / "run")
    rows = run.rows("sharpness", direction="signsgd")
    assert len(rows) == 2 and all(r["undefined"] == "direction has norm 0 (all coordinates zero)" for r in rows)
    assert all(math.isfinite(r["sharpness"]) for r in run.rows("sharpness") if r["direction"] != "signsgd")
    assert any("'signsgd' not measured" in e["message"] for e in run.events())
    text = report(run, "md")
    assert "signsgd" in text and "undefined" in text and "norm 0" in text
    for fmt in ("latex", "csv", "json"):
        report(run, fmt)
    paths = save_figures(run, tmp_path / "fig")
    assert paths
    from landscape.plots import landscape_lines

    ax = landscape_lines(run, directions="all")
    labels = [h.get_label() for h in ax.lines]
    assert "signsgd: undefined (direction has norm 0 (all coordinates zero))" in labels
