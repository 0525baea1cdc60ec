"""The second and third demos: the CNN contrast (seed 002 App. E) and the demo race (seed 002 Fig. 6)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from typer.testing import CliRunner

from landscape.cli import app
from landscape.measure import MeasureSettings
from landscape.store import load_run

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8,
                       method="hvp")
needs_sklearn = pytest.mark.skipif(importlib.util.find_spec("sklearn") is None,
                                   reason="needs scikit-learn (pip install 'landscape[cnn]')")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@needs_sklearn
def test_the_digits_are_the_real_dataset():
    from landscape.demo_cnn import digits

    x, y = digits()
    assert x.shape == (1797, 1, 8, 8) and y.shape == (1797,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0 and sorted(set(y.tolist())) == list(range(10))


@needs_sklearn
def test_cnn_demo_trains_the_resnet_by_sgd_momentum_and_resumes_on_the_same_trajectory(tmp_path):
    from landscape.demo_cnn import CNNDemoConfig, SmallResNet, run_cnn_demo

    cfg = CNNDemoConfig(steps=4, every=2, widths=(4, 8), probe_size=32, batch_size=16)
    full = run_cnn_demo(tmp_path / "full", cfg, settings=FAST, recipes=["sgd", "adam"])
    run = load_run(tmp_path / "full")
    assert run.steps() == [1, 2, 4] and run.meta["mode"] == "train"
    assert run.directions == ["sgd", "adam", "sgd (trained)"]
    assert run.meta["optimizer"]["hyperparameters"]["momentum"] == 0.9
    assert run.meta["demo"]["task"] == "cnn" and 0 <= full["probe_accuracy"] <= 1
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in SmallResNet(widths=(4, 8)).modules())
    # an interrupted run continues on the same trajectory: 2 steps, then the remaining 2
    run_cnn_demo(tmp_path / "half", CNNDemoConfig(**{**cfg.__dict__, "steps": 2}), settings=FAST, recipes=["sgd", "adam"])
    run_cnn_demo(tmp_path / "half", cfg, settings=FAST, recipes=["sgd", "adam"])
    a = load_run(tmp_path / "full").columns("sharpness")["sharpness"]
    b = load_run(tmp_path / "half").columns("sharpness")["sharpness"]
    assert list(a) == pytest.approx(list(b), rel=1e-6)


def test_demo_race_and_cnn_options_refuse_each_other(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--race", "--task", "cnn", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and result.output.strip() == "landscape demo: error: --race races on the demo's text: drop --task cnn"


def test_demo_race_spec_gives_every_recipe_the_same_batches_and_each_seed_its_own():
    from landscape.demo_race import RandomWindows, build

    spec = build()
    assert isinstance(spec["train_batches"], RandomWindows)
    windows = RandomWindows(spec["train_batches"].corpus, n=3)
    draws = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        draws.append(torch.cat([b[0] for b in windows]))
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_the_demo_folder_is_ready_for_landscape_plane_without_a_spec(tmp_path):
    """The demo keeps its measured points and a spec.py naming its own options: a plane of SGD's and Adam's
    directions at a measured step needs no --spec, and its centre is the measured point's loss."""
    import numpy as np

    from landscape.demo import DemoConfig, run_demo
    from landscape.planes import load_plane

    cfg = DemoConfig(steps=4, every=2, width=16, depth=1, heads=2, context=16, batch_size=4, probe_size=4,
                     corpus_chars=20_000)
    out = tmp_path / "demo"
    run_demo(out, cfg, settings=MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2))
    assert sorted(p.name for p in (out / "points").glob("*.pt")) == ["step_00000001.pt", "step_00000002.pt",
                                                                     "step_00000004.pt"]
    result = CliRunner().invoke(app, ["plane", str(out), "--step", "2", "--directions", "sgd,adam", "--points", "5", "--no-figures"])
    assert result.exit_code == 0, result.output
    plane = load_plane(load_run(out))
    centre = plane.losses["probe"][list(plane.alphas).index(0.0), list(plane.betas).index(0.0)]
    measured = load_run(out).rows("sharpness", step=2, direction="sgd")[0]["loss"]
    assert np.isclose(centre, measured, rtol=1e-6)
