"""`landscape analyze`: saved checkpoints measured exactly as the probe measures a live run, resume
after a failure, the spec function, and every bad input as one line on stderr with exit code 2."""

from __future__ import annotations

import csv
import io
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from landscape.analyze import REAL_DIRECTION, Spec, SpecError, analyze, as_spec, load_spec
from landscape.checkpoints import CheckpointError
from landscape.cli import app
from landscape.measure import MeasureSettings
from landscape.models import lm_loss
from landscape.probe import Probe
from landscape.store import load_run
from tests.specs import tiny_lm

ROOT = Path(__file__).resolve().parents[1]
FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8)
RECIPES = ["sgd", "adam", "signsgd"]
R_ARGS = [a for r in RECIPES for a in ("-r", r)]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _one_thread():
    """Two torch threads on a shared 2-core machine are slower than one (and the models are tiny)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> Path:
    """x_0 ... x_6 of a 6-step Adam run, in .pt, Lightning .ckpt and .safetensors."""
    folder = tmp_path_factory.mktemp("ckpts")
    tiny_lm.train(folder, steps=6)
    return folder


def pt_copy(ckpts: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in sorted(ckpts.glob("*.pt")):
        shutil.copy(f, dest / f.name)
    return dest


def sharpness(run) -> dict[tuple[int, str], float]:
    return {(r["step"], r["direction"]): r["sharpness"] for r in run.rows("sharpness")}


def one_line_error(result, *fragments: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert lines[0].startswith("landscape analyze: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ------------------------------------------------------------------------------------------ semantics


def test_per_step_checkpoints_reproduce_the_probe(tmp_path):
    """Checkpoints saved every step, each fed its own training batch: analyze's recipe states are the
    probe's, so every measurement agrees. The probe numbers the step about to be taken (t + 1) at the
    point the checkpoint after t steps holds."""
    steps = 5
    model = tiny_lm.make_model()
    probe_batch = tiny_lm.probe_batch()
    batches = tiny_lm.train_batches(steps + 1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    folder = tmp_path / "ck"
    folder.mkdir()
    with Probe(model, lm_loss, probe_batch, out=tmp_path / "probe", every=1, recipes=RECIPES, settings=FAST) as probe:
        probe.attach(opt)
        for t in range(steps + 1):
            torch.save({"model": model.state_dict(), "step": t}, folder / f"ckpt_{t}.pt")
            if t == steps:
                break
            lm_loss(model, batches[t]).backward()
            opt.step()
            opt.zero_grad()
    spec = Spec(tiny_lm.make_model(seed=7), lm_loss, probe_batch, batches)
    result = analyze(spec, [folder], tmp_path / "analyze", recipes=RECIPES, settings=FAST)
    assert result.measured == list(range(steps + 1)) and not result.failed

    probe_run, run = load_run(tmp_path / "probe"), load_run(tmp_path / "analyze")
    p, a = sharpness(probe_run), sharpness(run)
    for t in range(steps):
        for d in RECIPES:
            assert a[(t, d)] == pytest.approx(p[(t + 1, d)], rel=1e-5), (t, d)
        assert a[(t, REAL_DIRECTION)] == pytest.approx(p[(t + 1, "adam (trained)")], rel=1e-5), t
    ps = {r["step"]: r["l_hat"] for r in probe_run.rows("smoothness")}
    for r in run.rows("smoothness"):
        assert r["l_hat"] == pytest.approx(ps[r["step"] + 1], rel=1e-5)
    pl = {(r["step"], r["direction"]): r["loss"] for r in probe_run.rows("lines")}
    for r in run.rows("lines", step=2):
        np.testing.assert_allclose(r["loss"], pl[(3, r["direction"] if r["direction"] != REAL_DIRECTION else "adam (trained)")], rtol=1e-5)


def test_every_the_last_checkpoint_and_the_metadata(tmp_path, ckpts):
    result = analyze("tests.specs.tiny_lm:build", [str(ckpts / "*.pt")], tmp_path / "run", every=2,
                     recipes=RECIPES, settings=FAST)
    assert result.measured == [0, 2, 4, 6]
    assert [s for s, _ in result.checkpoints] == list(range(7))
    run = load_run(tmp_path / "run")
    assert run.steps() == [0, 2, 4, 6]
    assert run.steps("steps") == list(range(7))  # every checkpoint fed the recipes
    assert run.steps("smoothness") == [0, 2, 4]  # the last checkpoint has no next one
    assert {r["direction"] for r in run.rows("sharpness", step=6)} == set(RECIPES)
    assert {r["direction"] for r in run.rows("sharpness", step=4)} == set(RECIPES) | {REAL_DIRECTION}
    assert run.directions == RECIPES + [REAL_DIRECTION]
    meta = run.meta
    assert meta["trained_direction"] == REAL_DIRECTION and meta["recipes"] == RECIPES
    assert meta["model"]["class"] == "TinyCausalLM" and meta["optimizer"]["hyperparameters"]["lr"] == 0.01
    assert meta["settings"]["gradient"] == {"source": "train_batches", "batches_per_checkpoint": 1}
    assert meta["source"]["spec"] == "tests.specs.tiny_lm:build" and len(meta["source"]["checkpoints"]) == 7
    steps = run.columns("steps")
    assert np.all(np.isfinite(steps["loss"])) and np.all(steps["grad_norm"] > 0)
    assert np.allclose(steps["lr"], 0.01)  # read from the optimizer state in each .pt


def test_gradients_from_the_train_batches_or_the_probe_batch(tmp_path, ckpts):
    model, _, probe_batch, batches = tiny_lm.build()
    first = sorted(ckpts.glob("ckpt_00[01].pt"))
    res = analyze(Spec(model, lm_loss, probe_batch, batches), first, tmp_path / "a", recipes=["sgd"], settings=FAST,
                  grad_batches=2)
    x0 = torch.load(first[0], weights_only=True)["model"]
    model.load_state_dict(x0)
    with torch.no_grad():
        expected = (float(lm_loss(model.eval(), batches[0])) + float(lm_loss(model, batches[1]))) / 2
    assert load_run(res.out).rows("steps")[0]["loss"] == pytest.approx(expected, rel=1e-6)

    res = analyze(tiny_lm.build_probe_only(), first, tmp_path / "b", recipes=["sgd"], settings=FAST)
    run = load_run(res.out)
    assert run.settings["gradient"] == {"source": "probe_batch"}
    assert run.rows("steps")[0]["loss"] == pytest.approx(run.rows("sharpness", step=0)[0]["loss"], rel=1e-6)


def test_a_one_shot_generator_of_batches_that_runs_out(tmp_path, ckpts):
    model, _, probe_batch, batches = tiny_lm.build()
    spec = Spec(model, lm_loss, probe_batch, (b for b in batches[:2]))
    with pytest.raises(SpecError, match="train_batches ran out after 2 batches and cannot be restarted"):
        analyze(spec, [str(ckpts / "*.pt")], tmp_path / "run", recipes=["sgd"], settings=FAST, every=3)


def test_a_failure_half_way_keeps_the_measurements_and_a_rerun_resumes_exactly(tmp_path, ckpts):
    good = pt_copy(ckpts, tmp_path / "good")
    analyze("tests.specs.tiny_lm:build", [good], tmp_path / "reference", recipes=RECIPES, settings=FAST)

    bad = pt_copy(ckpts, tmp_path / "bad")
    obj = torch.load(bad / "ckpt_003.pt", weights_only=True)
    obj["model"]["blocks.0.fc1.weight"][0, 0] = float("nan")
    torch.save(obj, bad / "ckpt_003.pt")
    with pytest.raises(CheckpointError, match=r"ckpt_003.pt \(step 3\) has non-finite weights .*'blocks.0.fc1.weight'"):
        analyze("tests.specs.tiny_lm:build", [bad], tmp_path / "run", recipes=RECIPES, settings=FAST)
    assert load_run(tmp_path / "run").steps() == [0, 1]  # step 2 needs x_3 for its real step

    shutil.copy(good / "ckpt_003.pt", bad / "ckpt_003.pt")
    result = analyze("tests.specs.tiny_lm:build", [bad], tmp_path / "run", recipes=RECIPES, settings=FAST)
    assert result.already == [0, 1] and result.measured == [2, 3, 4, 5, 6]
    resumed, reference = sharpness(load_run(tmp_path / "run")), sharpness(load_run(tmp_path / "reference"))
    assert resumed.keys() == reference.keys()
    for key, value in reference.items():  # the recipes' states were rebuilt from x_0 and x_1's gradients
        assert resumed[key] == pytest.approx(value, rel=1e-9), key
    again = analyze("tests.specs.tiny_lm:build", [bad], tmp_path / "run", recipes=RECIPES, settings=FAST)
    assert again.measured == [] and again.already == list(range(7))


# ------------------------------------------------------------------------------------------ the spec


def test_spec_forms():
    model, loss_fn, pb, tb = tiny_lm.build()
    assert as_spec((model, loss_fn, pb)).train_batches is None
    assert as_spec([model, loss_fn, pb, tb]).train_batches is tb
    assert as_spec({"model": model, "loss_fn": loss_fn, "probe_batch": pb}).model is model
    assert as_spec(Spec(model, loss_fn, pb)).probe_batch is pb
    assert load_spec("tests.specs.tiny_lm:build_dict").source == "tests.specs.tiny_lm:build_dict"
    assert isinstance(load_spec(f"{ROOT / 'tests' / 'specs' / 'tiny_lm.py'}:build"), Spec)
    with pytest.raises(SpecError, match=r"unknown keys \['optimizer'\]"):
        as_spec({"model": model, "loss_fn": loss_fn, "probe_batch": pb, "optimizer": None})
    with pytest.raises(SpecError, match="train_batches must be an iterable of batches"):
        as_spec((model, loss_fn, pb, {"input": 1}))


# ------------------------------------------------------------------------------------------ the command


@pytest.mark.parametrize("pattern", ["*.pt", "*.ckpt", "*.safetensors"])
def test_cli_measures_each_format(tmp_path, ckpts, pattern):
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / pattern),
                                 "--out", str(out), "--every", "3", *R_ARGS])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"7 checkpoint(s), steps 0..6; measured 3: {out}"
    assert load_run(out).steps() == [0, 3, 6]


def test_cli_engine_option_gives_the_same_sharpness(tmp_path, ckpts):
    runs = {}
    for engine in ("hvp", "taylor"):
        out = tmp_path / engine
        result = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / "*.pt"),
                                     "--out", str(out), "--every", "3", "--engine", engine, *R_ARGS])
        assert result.exit_code == 0, result.output
        runs[engine] = {(r["step"], r["direction"]): r["sharpness"] for r in load_run(out).rows("sharpness")}
    assert runs["hvp"].keys() == runs["taylor"].keys() and runs["hvp"]
    for key, value in runs["hvp"].items():
        assert runs["taylor"][key] == pytest.approx(value, rel=1e-4, abs=1e-7), key
    bad = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / "*.pt"),
                              "--out", str(tmp_path / "x"), "--engine", "fast"])
    assert bad.exit_code != 0


def test_cli_measures_hf_save_pretrained_folders(tmp_path):
    pytest.importorskip("transformers")
    from tests.specs import tiny_gpt2

    tiny_gpt2.train(tmp_path / "ck", steps=2)
    result = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_gpt2:build", str(tmp_path / "ck"),
                                 "--out", str(tmp_path / "run"), *R_ARGS])
    assert result.exit_code == 0, result.output
    run = load_run(tmp_path / "run")
    assert run.steps() == [0, 1, 2] and run.steps("smoothness") == [0, 1]
    assert run.meta["model"]["class"] == "GPT2LMHeadModel"


def test_cli_help_explains_the_command():
    result = runner.invoke(app, ["analyze", "--help"])
    assert result.exit_code == 0
    for text in ("--spec", "--out", "--every", "--order", "--recipe", "--grad-batches", "--trust-checkpoints", "--engine",
                 "step|name|mtime", "save_pretrained", "resumes", "progress"):
        assert text in result.stdout, text


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _variant(ckpts: Path, folder: Path, change) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    obj = torch.load(ckpts / "ckpt_000.pt", weights_only=True)
    change(obj["model"])
    torch.save(obj, folder / "ckpt_000.pt")
    shutil.copy(ckpts / "ckpt_001.pt", folder / "ckpt_001.pt")
    return folder


BAD_INPUTS = {
    "missing file": (lambda ck, tmp: [str(tmp / "nope.pt")], "build", ["checkpoint not found", "nope.pt"]),
    "empty glob": (lambda ck, tmp: [str(tmp / "zz*.pt")], "build", ["no checkpoint matches"]),
    "unknown format": (lambda ck, tmp: [str(_write(tmp / "notes.txt", b"x"))], "build", ["unknown checkpoint format '.txt'"]),
    "no module": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "tests.specs.nope:build",
                  ["cannot import spec module 'tests.specs.nope'"]),
    "broken module": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "tests.specs.broken:build",
                      ["failed to import: ImportError: this spec module is broken on purpose"]),
    "no function": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_nothing", ["has no function 'build_nothing'"]),
    "not callable": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "not_callable", ["is a int, not a function"]),
    "bad reference": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "tests.specs.tiny_lm", ["--spec must look like"]),
    "spec raises": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_raises",
                    ["raised RuntimeError: the spec could not find its data"]),
    "wrong type": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_wrong_type", ["must return (model, loss_fn", "returned a int"]),
    "too short": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_too_short", ["returned a tuple of length 2"]),
    "not a module": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_not_a_module", ["must be a torch.nn.Module, got str"]),
    "bad loss": (lambda ck, tmp: [str(ck / "ckpt_000.pt")], "build_bad_loss", ["loss_fn(model, probe_batch) failed"]),
    "truncated": (lambda ck, tmp: [str(_write(tmp / "t_1.pt", (ck / "ckpt_001.pt").read_bytes()[:2000]))], "build",
                  ["t_1.pt: corrupt or truncated"]),
    "garbage safetensors": (lambda ck, tmp: [str(_write(tmp / "g_1.safetensors", b"\x10" * 64))], "build",
                            ["g_1.safetensors: corrupt or truncated safetensors"]),
    "missing key": (lambda ck, tmp: [str(_variant(ck, tmp / "m", lambda sd: sd.pop("ln_f.bias")))], "build",
                    ["ckpt_000.pt (step 0) does not fit the model", "missing keys ['ln_f.bias']"]),
    "unexpected key": (lambda ck, tmp: [str(_variant(ck, tmp / "u", lambda sd: sd.update(extra=torch.ones(1))))], "build",
                       ["unexpected keys ['extra']"]),
    "mis-shaped": (lambda ck, tmp: [str(ck / "ckpt_000.pt"), str(ck / "ckpt_001.pt")], "build_wider",
                   ["mis-shaped 'tok.weight' is (13, 16) in the checkpoint but (13, 32) in the model"]),
    "non-finite": (lambda ck, tmp: [str(_variant(ck, tmp / "n", lambda sd: sd["pos.weight"].fill_(float("inf"))))], "build",
                   ["non-finite weights (NaN or inf) in ['pos.weight']"]),
    "duplicate steps": (lambda ck, tmp: [str(ck / "ckpt_002.pt"), str(ck / "epoch=0-step=2.ckpt")], "build",
                        ["two checkpoints have step 2"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, ckpts, case):
    paths, spec, fragments = BAD_INPUTS[case]
    spec = spec if ":" in spec or "." in spec else f"tests.specs.tiny_lm:{spec}"
    result = runner.invoke(app, ["analyze", "--spec", spec, *paths(ckpts, tmp_path), "--out", str(tmp_path / "run"),
                                 "-r", "sgd"])
    one_line_error(result, *fragments)


def test_cli_rerun_with_other_settings_is_refused(tmp_path, ckpts):
    args = ["analyze", "--spec", "tests.specs.tiny_lm:build", str(ckpts / "*.pt"), "--out", str(tmp_path / "run"), "-r", "sgd"]
    assert runner.invoke(app, [*args, "--every", "6"]).exit_code == 0
    one_line_error(runner.invoke(app, [*args, "--every", "3"]), "different settings", "every: 6 (stored) != 3 (new)")


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_end_to_end_with_the_installed_command(tmp_path):
    """A script trains and saves checkpoints; the installed `landscape` measures them and reports every
    step and recipe; a malicious pickle is refused and leaves no trace."""
    exe = shutil.which("landscape")
    if exe is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "-e", str(ROOT), "--no-deps", "-q"], check=True)
        exe = shutil.which("landscape")
    assert exe, "the landscape console script is not installed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)

    ck = tmp_path / "ck"
    done = run(sys.executable, "-m", "tests.specs.tiny_lm", str(ck), "4")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run"
    done = run(exe, "analyze", "--spec", "tests.specs.tiny_lm:build", str(ck / "ckpt_*.pt"), "--out", str(out),
               "--every", "2", *R_ARGS)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"5 checkpoint(s), steps 0..4; measured 3: {out}"
    done = run(exe, "report", str(out), "--format", "csv")
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    assert {(int(r["step"]), r["direction"]) for r in rows} == {
        (s, d) for s in (0, 2, 4) for d in RECIPES + ([REAL_DIRECTION] if s < 4 else [])
    }

    marker = tmp_path / "pwned"
    with open(tmp_path / "evil_1.pt", "wb") as f:
        pickle.dump({"model": {"w": torch.zeros(1)}, "step": _Payload(marker)}, f, protocol=2)
    done = run(exe, "analyze", "--spec", "tests.specs.tiny_lm:build", str(tmp_path / "evil_1.pt"), "--out",
               str(tmp_path / "evil_run"))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert "refused to load" in done.stderr and "system" in done.stderr and "--trust-checkpoints" in done.stderr
    assert not marker.exists() and not (tmp_path / "evil_run").exists()
