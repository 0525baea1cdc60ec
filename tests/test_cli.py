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
