"""The `landscape` command line: exit codes, outputs, one-line errors; one real subprocess call."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from landscape.cli import app
from landscape.plots import FIGURE_NAMES
from landscape.report import CSV_COLUMNS
from landscape.store import load_run
from tests._synthetic import write_synthetic_run

runner = CliRunner()


@pytest.fixture
def run_dir(tmp_path) -> Path:
    return write_synthetic_run(tmp_path / "run", measured=(0, 50), recipes=("sgd", "sgd_clip", "adam"))


def one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output and "Traceback" not in result.stderr
    assert ": error: " in lines[0]
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_commands_and_options():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "plot" in result.stdout and "report" in result.stdout
    result = runner.invoke(app, ["plot", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--format", "--every-step", "--only", "png|pdf|svg"):
        assert option in result.stdout
    result = runner.invoke(app, ["report", "--help"])
    assert all(o in result.stdout for o in ("--format", "--output", "--step", "md|latex|csv"))


def test_no_arguments_prints_help():
    result = runner.invoke(app, [])
    assert "Usage" in result.stdout and "report" in result.stdout


def test_report_to_stdout_and_to_a_file(run_dir, tmp_path):
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("# landscape report: `run`") and "## Step 50" in result.stdout
    out = tmp_path / "deep" / "table.tex"
    result = runner.invoke(app, ["report", str(run_dir), "--format", "latex", "--output", str(out), "--step", "50"])
    assert result.exit_code == 0 and result.stdout == ""
    text = out.read_text(encoding="utf-8")
    assert r"\toprule" in text and "step 50" in text and "step 0 " not in text
    result = runner.invoke(app, ["report", str(run_dir), "-f", "csv", "-s", "0", "-s", "50"])
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 2 * 4


def test_plot_writes_every_figure_with_data_into_run_figures(tmp_path):
    run_dir = write_synthetic_run(tmp_path / "run", measured=(0,), recipes=("sgd", "adam"), smoothness=False)
    result = runner.invoke(app, ["plot", str(run_dir), "--format", "svg"])
    assert result.exit_code == 0, result.output
    written = [Path(line) for line in result.stdout.splitlines()]
    from landscape.curvature_plots import CURVATURE_FIGURE_NAMES  # the synthetic run measured no curvature

    no_smoothness = [n for n in FIGURE_NAMES if "smoothness" not in n and n not in CURVATURE_FIGURE_NAMES]
    assert [p.name for p in written] == [f"{n}.svg" for n in no_smoothness]
    assert all(p.parent == run_dir / "figures" and p.stat().st_size > 0 for p in written)


def test_plot_out_and_only(run_dir, tmp_path):
    result = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "f"), "--only", "sharpness_ratio"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == [str(tmp_path / "f" / "sharpness_ratio.png")]
    assert (tmp_path / "f" / "sharpness_ratio.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["report", "{tmp}/missing"], ["landscape report: error:", "missing", "does not exist"]),
        (["plot", "{tmp}/missing"], ["landscape plot: error:", "missing"]),
        (["report", "{tmp}"], ["not a landscape run", "has no run.sqlite"]),
        (["report", "{run}", "--step", "7"], ["step(s) 7 not measured", "measured steps: 0, 50"]),
        (["report", "{run}", "--format", "html"], ["--format", "html"]),
        (["plot", "{run}", "--only", "nope"], ["--only", "nope"]),
        (["report", "{run}", "--bogus"], ["No such option: --bogus"]),
        (["report"], ["Missing argument"]),
        (["frobnicate"], ["No such command 'frobnicate'"]),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, args, fragments):
    args = [a.format(tmp=tmp_path, run=run_dir) for a in args]
    one_line_error(runner.invoke(app, args), *fragments)


def test_an_empty_run_plots_nothing_but_succeeds(tmp_path):
    from landscape.store import RunStore

    RunStore(tmp_path / "empty", settings={}).close()
    result = runner.invoke(app, ["plot", str(tmp_path / "empty")])
    assert result.exit_code == 0 and result.stdout == "" and "no measurements yet" in result.stderr
    assert load_run(tmp_path / "empty").steps() == []


def test_installed_console_script(run_dir):
    exe = shutil.which("landscape", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if exe is None:
        pytest.skip("the `landscape` console script is not installed (pip install -e .)")
    ok = subprocess.run([exe, "report", str(run_dir), "--format", "csv"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines()[0] == ",".join(CSV_COLUMNS)


def test_top_level_cli_script_runs_the_same_app(run_dir):
    root = Path(__file__).resolve().parents[1]
    source = (root / "cli.py").read_text()
    assert "from landscape.cli import main" in source and '__name__ == "__main__"' in source


# -- the first hour --------------------------------------------------------------------------------


def test_version():
    from landscape import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"landscape {__version__}"


def test_the_command_line_starts_without_torch_scipy_or_matplotlib():
    """`landscape --help` answers at once: importing the CLI (and the package) imports none of them."""
    code = ("import sys\nfrom landscape.cli import main\nsys.argv = ['landscape', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'matplotlib', 'scipy') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "Usage" in out.stdout and out.stdout.strip().splitlines()[-1] == "HEAVY []"
    import landscape

    assert landscape.Probe.__name__ == "Probe" and "Probe" in dir(landscape)  # the lazy names still resolve
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        landscape.nope  # noqa: B018


def test_plot_options_directions_layers_width_json(run_dir, tmp_path):
    import json

    result = runner.invoke(app, ["plot", str(run_dir), "-o", str(tmp_path / "f"), "--only", "sharpness_ratio",
                                 "--only", "coordinate_smoothness", "--directions", "adam,sgd_clip",
                                 "--layers", "embed.*", "--width", "single", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout)["figures"]
    assert [Path(f["path"]).name for f in figures] == ["sharpness_ratio.png", "coordinate_smoothness.png"]
    assert all("run run" in f["caption"] for f in figures)
    one_line_error(runner.invoke(app, ["plot", str(run_dir), "--directions", "adamw"]), "'adamw' not in run")
    one_line_error(runner.invoke(app, ["plot", str(run_dir), "--width", "triple"]), "--width")


def test_report_tables_and_json(run_dir):
    import json

    result = runner.invoke(app, ["report", str(run_dir), "--table", "step", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["step"] == 50 and [r["direction"] for r in data["rows"]] == load_run(run_dir).directions
    result = runner.invoke(app, ["report", str(run_dir), "-t", "trajectory", "-d", "adam"])
    assert result.exit_code == 0 and "| 0 | adam |" in result.stdout and "| 50 | adam |" in result.stdout
    one_line_error(runner.invoke(app, ["report", str(run_dir), "-t", "step", "-s", "0", "-s", "50"]), "one step")


def test_compare_table_and_figure(tmp_path):
    a = write_synthetic_run(tmp_path / "sgd_run", measured=(0, 50), recipes=("sgd", "adam"), seed=1)
    b = write_synthetic_run(tmp_path / "adam_run", measured=(0, 50), recipes=("sgd", "adam"), seed=2)
    figure = tmp_path / "cmp" / "compare.pdf"
    result = runner.invoke(app, ["compare", str(a), str(b), "--label", "SGD", "--label", "Adam", "--figure", str(figure)])
    assert result.exit_code == 0, result.output
    assert "| Algorithm | SGD | Adam |" in result.stdout and "| adam |" in result.stdout
    assert figure.read_bytes().startswith(b"%PDF") and figure.with_suffix(".txt").exists()
    one_line_error(runner.invoke(app, ["compare", str(a)]), "two or more runs")
    one_line_error(runner.invoke(app, ["compare", str(a), str(b), "--figure", str(tmp_path / "x.jpg")]), ".png, .pdf, .svg")


def test_recipes_as_json_cite_the_works():
    import json

    result = runner.invoke(app, ["recipes", "--format", "json"])
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} >= {"sgd", "adam", "smoothed_signsgd"}
    assert all("seed" not in r["source"] for r in rows)
    assert "seed 00" not in runner.invoke(app, ["recipes"]).stdout


def _demo_like_run(path: Path, cfg) -> Path:
    """A synthetic run that says it is a finished demo made with ``cfg``."""
    from dataclasses import asdict

    from landscape.store import RunStore

    write_synthetic_run(path, measured=(0, 2), recipes=("sgd", "adam"), smoothness=False)
    run = load_run(path)
    with RunStore(path, settings=run.settings) as store:
        store.set_meta("demo", asdict(cfg))
    return path


def test_demo_folders_are_named_after_the_options():
    from landscape.demo import DemoConfig, demo_folder

    assert demo_folder(DemoConfig()) == Path("runs/demo")
    assert demo_folder(DemoConfig(optimizer="sgd", steps=600)) == Path("runs/demo-sgd-steps600")
    assert demo_folder(DemoConfig(seed=3, every=30), root="x") == Path("x/demo-every30-seed3")
    assert demo_folder(DemoConfig(width=32)) == Path("runs/demo-width32")


def test_a_finished_demo_is_not_trained_again(tmp_path):
    from landscape.demo import DemoConfig

    cfg = DemoConfig(steps=2, every=2)
    out = _demo_like_run(tmp_path / "demo", cfg)
    result = runner.invoke(app, ["demo", "--out", str(out), "--steps", "2", "--every", "2"])
    assert result.exit_code == 0, result.output
    assert f"{out} is a finished demo (2 steps, 2 measured); nothing to train." in result.stdout
    assert "files, written now)" in result.stdout  # they were missing: drawn, not trained
    assert (out / "figures" / "sharpness_ratio.png").exists() and (out / "report.md").exists()
    assert "](figures/sharpness_ratio.png)" in (out / "report.md").read_text(encoding="utf-8")
    again = runner.invoke(app, ["demo", "--out", str(out), "--steps", "2", "--every", "2", "--json"])
    import json

    data = json.loads(again.stdout)
    assert data["finished"] and not data["trained"] and data["report"] == str(out / "report.md")
    # other options for the same folder: refused before anything starts, naming the difference
    one_line_error(runner.invoke(app, ["demo", "--out", str(out), "--steps", "5", "--every", "2"]),
                   "other options", "steps=2 there, 5 asked")


def test_analyze_names_the_optimizer_and_says_what_it_measures(tmp_path):
    import json

    from tests.specs import tiny_lm

    tiny_lm.train(tmp_path / "ck", steps=2, formats=("pt",))
    out = tmp_path / "run"
    result = runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(tmp_path / "ck"), "--out",
                                 str(out), "-r", "sgd", "-r", "adam", "--threads", "1", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["measured"] == [0, 1, 2]
    run = load_run(out)
    assert run.meta["optimizer"]["class"] == "Adam"  # from the optimizer state's parameter-group keys
    log = result.stderr.splitlines()  # not a terminal: a line per measurement, with the time left
    starts = [line for line in log if "measuring 3 directions at step" in line]
    assert len(starts) == 2 and starts[0].startswith("landscape analyze: checkpoint 0/3")  # the last has no next step
    assert any("measuring 2 directions at step 2" in line for line in log)
    one_line_error(runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(tmp_path / "ck"),
                                       "--out", str(tmp_path / "r2"), "-r", "nope"]), "unknown recipe(s) nope")
    one_line_error(runner.invoke(app, ["analyze", "--spec", "tests.specs.tiny_lm:build", str(tmp_path / "ck"),
                                       "--out", str(tmp_path / "r3"), "--threads", "zero"]), "--threads")
