"""`landscape plane`: from a probe's saved points and from checkpoints, into the run store, resumed,
with figures; every bad input one line on stderr with exit code 2; one call of the installed script."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from landscape.cli import app
from landscape.measure import MeasureSettings
from landscape.models import lm_loss
from landscape.planes import list_planes, load_plane
from landscape.points import load_point
from landscape.probe import Probe
from landscape.store import load_run
from tests._models import loss_at_copy
from tests.specs import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
SPEC = "tests.specs.tiny_lm:build"
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory) -> Path:
    """Six Adam steps of the tiny LM with the probe attached, saving the points of steps 1-5."""
    out = tmp_path_factory.mktemp("probe") / "run"
    model = tiny_lm.make_model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    fast = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, smoothness=False, cosine=False,
                           method="hvp")
    with Probe(model, lm_loss, tiny_lm.probe_batch(), out=out, every=50, recipes=["sgd", "adam", "signsgd"],
               settings=fast, save_points=[1, 2, 3, 4, 5]) as probe:
        probe.attach(opt)
        for batch in tiny_lm.train_batches(6):
            lm_loss(model, batch).backward()
            opt.step()
            opt.zero_grad()
    return out


@pytest.fixture
def run_dir(probe_run, tmp_path) -> Path:
    return Path(shutil.copytree(probe_run, tmp_path / "run"))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ckpts")
    tiny_lm.train(folder, steps=4, formats=("pt",))
    return folder


def invoke(*args: str):
    return runner.invoke(app, ["plane", *map(str, args)])


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert lines[0].startswith("landscape plane: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def test_update_plane_from_a_saved_point_resumes_and_draws(run_dir):
    result = invoke(run_dir, "--step", 1, "--directions", "sgd,adam", "--spec", SPEC, "-n", 5, "--surface")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"updates@1:sgd,adam: 5×5 grid, probe loss; 25 point(s) computed: {run_dir}"
    assert [Path(p).name for p in lines[1:]] == ["plane_updates_1_sgd_adam.png", "plane_updates_1_sgd_adam_surface.png"]
    assert all(Path(p).stat().st_size > 0 for p in lines[1:])
    run = load_run(run_dir)
    sp = load_plane(run, "updates@1:sgd,adam")
    assert sp.kind == "updates" and sp.step == 1 and sp.complete()
    assert set(sp.markers) == {"sgd", "adam", "adam (trained)"} and sp.markers["sgd"] == [1.0, 0.0]
    # the grid spans twice the larger quadratic-model best step measured at step 1
    best = max(r["best_step"] for r in run.rows("sharpness", step=1) if r["direction"] in ("sgd", "adam"))
    np.testing.assert_allclose(sp.alphas[[0, -1]], [-2 * best, 2 * best])
    # the centre is the saved point: its loss, evaluated independently
    point = load_point(run_dir, 1)
    model, _, pb, _ = tiny_lm.build()
    center = loss_at_copy(model, lm_loss, pb, {n: point.state_dict[n] for n, _ in model.named_parameters()})
    np.testing.assert_allclose(sp.losses["probe"][2, 2], center, rtol=1e-6)
    again = invoke(run_dir, "--step", 1, "--directions", "sgd,adam", "--spec", SPEC, "-n", 5, "--no-figures")
    assert again.exit_code == 0 and again.stdout.splitlines() == [
        f"updates@1:sgd,adam: 5×5 grid, probe loss; 0 point(s) computed, 25 already stored: {run_dir}"]
    other = invoke(run_dir, "--step", 1, "--directions", "sgd,adam", "--spec", SPEC, "-n", 7, "--no-figures")
    one_line_error(other, "plane 'updates@1:sgd,adam'", "alphas", "differ", "--name")


def test_other_kinds_from_saved_points(run_dir):
    for args, name, shape in [
        (("--kind", "pca"), "pca:1-5", (4, 4)),
        (("--kind", "random", "--step", 3, "--biases", "keep", "--range", "-0.5,0.5"), "random@3:seed0,keep", (4, 4)),
        (("--kind", "interpolate", "--step", 2, "--step", 4), "interpolate:2-4", (4,)),
        (("--step", 2, "-d", "signsgd", "--name", "along"), "along", (4,)),
        (("--step", 2, "-d", "sgd,signsgd", "--scale", "norm", "--range", "-1,1"), "updates@2:sgd,signsgd", (4, 4)),
    ]:
        result = invoke(run_dir, *args, "--spec", SPEC, "-n", 4, "--no-figures")
        assert result.exit_code == 0, (args, result.output)
        sp = load_plane(load_run(run_dir), name)
        assert sp.losses["probe"].shape == shape and sp.complete(), name
    run = load_run(run_dir)
    pca = load_plane(run, "pca:1-5")
    assert pca.trajectory["step"].tolist() == [1, 2, 3, 4, 5] and 0.5 < pca.explained_variance.sum() <= 1 + 1e-9
    np.testing.assert_allclose([pca.trajectory["alpha"][-1], pca.trajectory["beta"][-1]], 0.0, atol=1e-6)  # centre
    rnd = load_plane(run, "random@3:seed0,keep")
    np.testing.assert_allclose(rnd.alphas, np.linspace(-0.5, 0.5, 4))
    assert rnd.step == 3 and rnd.config["biases"] == "keep" and len(rnd.trajectory["step"]) == 5
    line = load_plane(run, "interpolate:2-4")
    assert set(line.losses) == {"probe", "train"} and line.markers == {"step 2": [0.0], "step 4": [1.0]}
    assert line.trajectory["step"].tolist() == [2, 3, 4]  # the saved point between the ends is marked too
    np.testing.assert_allclose(line.trajectory["alpha"][[0, 2]], [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(line.alphas[[0, -1]], [-0.5, 1.5])
    assert set(load_plane(run, "along").losses) == {"probe", "train"}
    assert load_plane(run, "updates@2:sgd,signsgd").config["scale"] == "norm"
    assert len(list_planes(run)) == 5


def test_planes_over_checkpoints(ckpts, tmp_path):
    out = tmp_path / "planes"
    for kind, extra, name in [("pca", (), "pca:0-4"), ("interpolate", (), "interpolate:0-4"),
                              ("random", ("--seed", 3), "random@4:seed3")]:
        result = invoke("--spec", SPEC, ckpts, "--kind", kind, *extra, "--out", out, "-n", 4, "--log")
        assert result.exit_code == 0, (kind, result.output)
        assert result.stdout.startswith(f"{name}: ")
        assert (out / "figures").is_dir()
    run = load_run(out)
    assert run.settings == {"source": "planes"} and run.meta["spec"] == SPEC
    line = load_plane(run, "interpolate:0-4")
    assert line.trajectory["step"].tolist() == [0, 1, 2, 3, 4]
    # the ends of the segment are the checkpoints themselves
    np.testing.assert_allclose(line.trajectory["alpha"][[0, -1]], [0.0, 1.0], atol=1e-6)
    model, _, pb, _ = tiny_lm.build()
    first = torch.load(ckpts / "ckpt_000.pt", weights_only=True)["model"]
    expected = loss_at_copy(model, lm_loss, pb, {n: first[n] for n, _ in model.named_parameters()})
    np.testing.assert_allclose(line.trajectory["loss"][0], expected, rtol=1e-6)
    assert sorted(p.name for p in (out / "figures").iterdir()) == [
        "line_interpolate_0-4.png", "plane_pca_0-4.png", "plane_random_4_seed3.png"]


def _no_directions(run_dir: Path) -> list:
    point = load_point(run_dir, 2)
    torch.save({"step": 2, "state_dict": point.state_dict, "directions": {}, "meta": {}}, point.path)
    return [run_dir, "--step", 2, "-d", "sgd,adam", "--spec", SPEC]


BAD = {
    "no source": (lambda r, c, t: [], ["pass a run folder"]),
    "nothing to draw": (lambda r, c, t: [r, "--step", 2, "--spec", SPEC], ["pass --directions"]),
    "step without point": (lambda r, c, t: [r, "--step", 9, "-d", "sgd,adam", "--spec", SPEC],
                           ["step 9 has no saved point", "saved steps: 1, 2, 3, 4, 5"]),
    "unknown direction": (lambda r, c, t: [r, "--step", 2, "-d", "sgd,lion", "--spec", SPEC],
                          ["direction 'lion' was not saved at step 2", "saved: sgd, adam, signsgd, adam (trained)"]),
    "three directions": (lambda r, c, t: [r, "--step", 2, "-d", "sgd,adam,signsgd", "--spec", SPEC], ["one or two names"]),
    "two steps for directions": (lambda r, c, t: [r, "--step", 2, "--step", 3, "-d", "sgd", "--spec", SPEC],
                                 ["exactly one --step"]),
    "no spec": (lambda r, c, t: [r, "--step", 2, "-d", "sgd,adam"], ["pass --spec module:function"]),
    "bad spec": (lambda r, c, t: [r, "--step", 2, "-d", "sgd,adam", "--spec", "tests.specs.tiny_lm:build_raises"],
                 ["raised RuntimeError"]),
    "wider model": (lambda r, c, t: [r, "--step", 2, "-d", "sgd,adam", "--spec", "tests.specs.tiny_lm:build_wider"],
                    ["does not fit the model", "mis-shaped"]),
    "saved without directions": (lambda r, c, t: _no_directions(r), ["saved without directions"]),
    "out with a run": (lambda r, c, t: [r, "--kind", "pca", "--spec", SPEC, "--out", t / "x"], ["drop --out"]),
    "directions with checkpoints": (lambda r, c, t: [c, "-d", "sgd", "--spec", SPEC, "--out", t / "x"],
                                    ["pass one run folder"]),
    "kind missing": (lambda r, c, t: [c, "--spec", SPEC, "--out", t / "x"], ["pass --directions", "--kind"]),
    "out missing": (lambda r, c, t: [c, "--kind", "pca", "--spec", SPEC], ["--out RUN is required"]),
    "step with checkpoints": (lambda r, c, t: [c, "--kind", "pca", "--step", 1, "--spec", SPEC, "--out", t / "x"],
                              ["--step picks saved points"]),
    "pca of two": (lambda r, c, t: [c / "ckpt_000.pt", c / "ckpt_001.pt", "--kind", "pca", "--spec", SPEC, "--out",
                                    t / "x"], ["--kind pca needs at least 3"]),
    "bad range": (lambda r, c, t: [c, "--kind", "random", "--spec", SPEC, "--out", t / "x", "--range", "1,0"],
                  ["--range needs finite LO < HI"]),
    "unknown kind": (lambda r, c, t: [c, "--kind", "spiral", "--spec", SPEC, "--out", t / "x"], ["--kind", "spiral"]),
    "missing checkpoint": (lambda r, c, t: [t / "nope.pt", "--kind", "random", "--spec", SPEC, "--out", t / "x"],
                           ["checkpoint not found"]),
    "pca of saved points": (lambda r, c, t: [r, "--kind", "pca", "--step", 1, "--step", 2, "--spec", SPEC],
                            ["needs at least 3 saved points"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_exit_code_2(run_dir, ckpts, tmp_path, case):
    args, fragments = BAD[case]
    one_line_error(invoke(*args(run_dir, ckpts, tmp_path)), *fragments)
    assert not (tmp_path / "x").exists()


def test_a_run_without_saved_points_says_how_to_get_them(tmp_path, ckpts):
    out = tmp_path / "empty"
    assert invoke("--spec", SPEC, ckpts, "--kind", "random", "--out", out, "-n", 3, "--no-figures").exit_code == 0
    # the run recorded its spec, so no --spec is needed to read it again
    one_line_error(invoke(out, "--step", 1, "-d", "sgd,adam"), "has no saved points", "save_points=")


def test_help_explains_the_command():
    result = runner.invoke(app, ["plane", "--help"])
    assert result.exit_code == 0
    for text in ("--step", "--directions", "--kind", "--spec", "--out", "--points", "--range", "--surface", "--log",
                 "random|pca|interpolate", "resumes"):
        assert text in result.stdout, text


def test_the_installed_command(run_dir):
    exe = shutil.which("landscape")
    assert exe, "the landscape console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([exe, "plane", str(run_dir), "--step", "2", "-d", "sgd,adam", "--spec", SPEC, "-n", "3",
                           "--format", "svg"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1].endswith("plane_updates_2_sgd_adam.svg")
