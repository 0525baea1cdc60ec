"""The ``landscape`` command line: a typer app over the library.

Commands only parse their arguments, call the library and save; the work lives in
:mod:`landscape.plots`, :mod:`landscape.report` and friends, imported inside each command: importing
this module imports neither torch, scipy nor matplotlib, so that ``landscape --help`` answers at once
(a test holds it).

Errors: bad input (a missing run folder, an unknown option, a step that was not measured, a run
store error) prints **one line** on stderr, ``landscape <command>: error: <what and how to fix>``,
and exits with status 2; no traceback. Unexpected exceptions (bugs) keep their traceback.

Output: results go to stdout (``--format json`` where a command prints results; ``--json`` for
``plot`` and ``demo``, whose ``--format`` is the figure file type); progress and notes go to stderr.

Adding a command: write a function with ``Annotated[..., typer.Option(...)]`` parameters, decorate
it with ``@app.command()``, and raise :class:`CLIError` (or ``typer.BadParameter``, or let a
:class:`~landscape.store.StoreError` propagate) for bad input. Commands defined in another module register the same way
(``from landscape.cli import app``) as long as that module is imported at the bottom of this one.

Example:
    $ landscape plot runs/tiny --format pdf          # figures into runs/tiny/figures
    $ landscape report runs/tiny --format latex -o table.tex
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from landscape._names import FIGURE_FORMATS, FIGURE_NAMES, FIGURE_WIDTHS, REPORT_FORMATS, REPORT_TABLES
from landscape._version import __version__

__all__ = ["app", "main", "CLIError", "USER_ERRORS"]


class CLIError(Exception):
    """Bad input detected by a command: reported as one line on stderr, exit status 2."""


#: Exceptions that mean "bad input" rather than "bug": one line on stderr, exit status 2. With
#: :class:`landscape.store.StoreError` (added when the run store is imported: it cannot be raised before).
USER_ERRORS: tuple[type[BaseException], ...] = (CLIError,)


def _user_errors() -> tuple[type[BaseException], ...]:
    store = sys.modules.get("landscape.store")
    return USER_ERRORS + ((store.StoreError,) if store is not None else ())


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


#: Options that name where output goes.
_OUTPUT_OPTIONS = ("--out", "-o", "--output")


def _empty_output_option(argv: Sequence[str]) -> str | None:
    """The output option given an empty value, if any (``--out ""`` or ``--out=``)."""
    for i, a in enumerate(argv):
        if a == "--":
            break
        if a in _OUTPUT_OPTIONS and i + 1 < len(argv) and not argv[i + 1].strip():
            return a
        name, eq, value = a.partition("=")
        if eq and name in _OUTPUT_OPTIONS and not value.strip():
            return name
    return None


def _os_error(e: OSError) -> str:
    what = f"{e.filename}" if e.filename else "a file"
    reason = e.strerror or str(e) or type(e).__name__
    return f"cannot write {what}: {reason}" if not isinstance(e, FileNotFoundError) else f"{what}: {reason}"


class _OneLineErrors(TyperGroup):
    """Typer group whose errors are one plain line on stderr (no usage box, no traceback).

    Uses typer's public exception types only (typer >= 0.2x vendors its own click): argument
    errors are ``typer.TyperException`` subclasses with ``format_message()`` and ``exit_code``.
    """

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True, **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        argv = list(sys.argv[1:] if args is None else args)
        prog = prog_name or "landscape"
        sub = next((a for a in argv if not a.startswith("-")), None)
        where = f"{prog} {sub}" if sub in self.commands else prog
        for stream in (sys.stdout, sys.stderr):  # a path that is not valid UTF-8 is shown escaped, not a crash
            with contextlib.suppress(AttributeError, ValueError, io.UnsupportedOperation):
                stream.reconfigure(errors="backslashreplace")
        empty = _empty_output_option(argv)
        if empty is not None:  # Path("") is ".": it would write into the current folder
            typer.echo(f"{where}: error: {empty} must name a path, got an empty string (it would write into the "
                       "current folder)", err=True)
            sys.exit(2)
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.TyperException as e:
            ctx = getattr(e, "ctx", None)
            if type(e).__name__ == "NoArgsIsHelpError" and ctx is not None:  # bare `landscape`: the help
                typer.echo(ctx.get_help())
                sys.exit(e.exit_code)
            where = ctx.command_path if ctx is not None else where
            hint = f" (see '{where} --help')" if ctx is not None else ""
            typer.echo(f"{where}: error: {_one_line(e.format_message())}{hint}", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except Exception as e:
            if isinstance(e, _user_errors()):
                message = _one_line(str(e))
            elif isinstance(e, OSError):  # the machine, not the program: a full disk, a read-only folder, a missing path
                message = _one_line(_os_error(e))
            elif isinstance(e, sqlite3.Error):  # the run store's database (disk full, I/O error)
                message = f"cannot write the run store: {_one_line(str(e))}"
            else:
                raise
            typer.echo(f"{where}: error: {message}", err=True)
            sys.exit(2)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="landscape",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",  # paragraphs of a docstring are re-flowed to the terminal width
    help="Loss-landscape diagnostics for PyTorch optimizers: figures and tables from a run folder.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"landscape {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Loss-landscape diagnostics for PyTorch optimizers: figures and tables from a run folder."""


FigureFormat = Enum("FigureFormat", {f: f for f in FIGURE_FORMATS}, type=str)
FigureName = Enum("FigureName", {f: f for f in FIGURE_NAMES}, type=str)
FigureWidth = Enum("FigureWidth", {f: f for f in FIGURE_WIDTHS}, type=str)
ReportFormat = Enum("ReportFormat", {f: f for f in REPORT_FORMATS}, type=str)
ReportTable = Enum("ReportTable", {f: f for f in REPORT_TABLES}, type=str)


class TextFormat(str, Enum):
    text = "text"
    json = "json"


RunArg = Annotated[
    Path,
    typer.Argument(exists=True, file_okay=False, dir_okay=True, readable=True, show_default=False,
                   help="Run folder written by the probe (it holds run.sqlite)."),
]
DirectionsOpt = Annotated[list[str] | None, typer.Option(
    "--directions", "-d", show_default=False,
    help="Directions to show: names or shell patterns ('adam*'), comma-separated or repeated, or 'all'. "
         "[default: the paper's families (SGD, normalized SGD, signSGD, Adam, Adafactor, Lion, their clipped "
         "variants) and the trained direction]")]
ThreadsOpt = Annotated[str, typer.Option(
    "--threads", show_default=True,
    help="Intra-op (OpenMP) threads for torch on the CPU: a number, or auto (the cores idle now: the CPUs "
         "this process may use minus the load average; on a busy machine more threads are slower). "
         "OMP_NUM_THREADS, when set, wins over auto.")]


def _directions(values: list[str] | None) -> list[str] | str | None:
    if not values:
        return None
    parts = [p.strip() for v in values for p in v.split(",") if p.strip()]
    return "all" if parts == ["all"] else parts


def _print_json(value: Any) -> None:
    from landscape.report import _plain

    typer.echo(json.dumps(_plain(value), indent=2, ensure_ascii=False))


def _threads(threads: str) -> str:
    from landscape._threads import apply_threads

    try:
        return apply_threads(threads)
    except ValueError as e:
        raise CLIError(f"--threads: {e}") from None


@app.command()
def plot(
    run: RunArg,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Folder to write the figures into (created). [default: RUN/figures]")] = None,
    fmt: Annotated[FigureFormat, typer.Option(
        "--format", "-f", help="File format: png (raster), pdf or svg (vector, fonts embedded).")] = "png",
    every_step: Annotated[bool, typer.Option(
        "--every-step", help="Also write the per-step figures (lines, histograms, cosines) of every measured step.")] = False,
    only: Annotated[list[FigureName] | None, typer.Option(
        "--only", show_default=False, help="Write only this figure (repeat for several). [default: all]")] = None,
    directions: DirectionsOpt = None,
    layers: Annotated[list[str] | None, typer.Option(
        "--layers", show_default=False,
        help="Layers of the coordinate-wise smoothness figure: names or shell patterns ('blocks.0.*'), "
             "comma-separated or repeated, or 'all'. [default: a page-sized choice, a few of each kind]")] = None,
    width: Annotated[FigureWidth, typer.Option(
        "--width", help="double: wide figures span a two-column paper's text width; single: every figure "
                        "fits one column.")] = "double",
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures written (path, caption) as JSON.")] = False,
) -> None:
    """Write every figure the run has data for, with a one-line caption beside each.

    One file per figure, its caption in NAME.txt (and in the file's metadata). Training loss,
    sharpness and sharpness ratio to SGD over training, loss along each update direction (one panel
    per optimizer family), update histograms and cosine similarities (last measured step), and the
    smoothness scatters when measured. Prints the paths written.
    """
    from landscape.plots import save_figures
    from landscape.store import load_run

    folder = out if out is not None else run / "figures"
    try:
        paths = save_figures(load_run(run), folder, FigureFormat(fmt).value,
                             every_step=every_step, only=[FigureName(n).value for n in only] if only else None,
                             directions=_directions(directions), layers=_directions(layers),
                             width=FigureWidth(width).value)
    except OSError as e:
        raise CLIError(f"cannot write figures into {folder}: {e.strerror or e}") from None
    if not paths:
        typer.echo(f"no figures written: {run} has no measurements yet", err=True)
    if as_json:
        _print_json({"figures": [{"path": str(p), "caption": p.with_suffix(".txt").read_text(encoding="utf-8").strip()
                                  if p.with_suffix(".txt").exists() else ""} for p in paths]})
        return
    for path in paths:
        typer.echo(str(path))


@app.command()
def report(
    run: RunArg,
    fmt: Annotated[ReportFormat, typer.Option(
        "--format", "-f",
        help="md: Markdown tables; latex: booktabs tables; csv: tidy, one row per (step, direction); json.")] = "md",
    table: Annotated[ReportTable, typer.Option(
        "--table", "-t",
        help="full: the whole report; step: Pan & Li's Table 1 (one step, every direction: sharpness, ratio "
             "to SGD); trajectory: their Tables 4-7 (the ratio to SGD of every direction at every step).")] = "full",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="Write to this file instead of standard output.")] = None,
    step: Annotated[list[int] | None, typer.Option(
        "--step", "-s", show_default=False,
        help="Only this measured step (repeat for several). [default: every measured step; --table step: "
             "the last one]")] = None,
    directions: DirectionsOpt = None,
    figures: Annotated[Path | None, typer.Option(
        "--figures", file_okay=False, show_default=False,
        help="Folder of saved figures the Markdown report links. [default: RUN/figures when it exists]")] = None,
) -> None:
    """Tabulate the run (md, latex, csv, json), or print one of the paper's tables.

    Per measured step, each direction's sharpness, ratio to SGD (Pan & Li 2023, Table 1) and gradient
    projection gᵀû, the median ratio per direction, run metadata, and the smoothness measurements when
    present; or, with --table, the paper's Table 1 (one step) or Tables 4-7 (the trajectory)."""
    from landscape.report import report as make_report
    from landscape.store import load_run

    fig_dir = figures if figures is not None else (run / "figures" if (run / "figures").is_dir() else None)
    base = output.parent if output is not None else Path.cwd()
    try:
        text = make_report(load_run(run), ReportFormat(fmt).value, steps=step or None,
                           table=ReportTable(table).value, directions=_directions(directions),
                           figures=fig_dir, link_base=base)
    except ValueError as e:
        if type(e) is ValueError:  # bad combination of options (NoDataError is a StoreError)
            raise CLIError(str(e)) from None
        raise
    if output is None:
        typer.echo(text, nl=False)
        return
    _write_text(output, text)


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(
        exists=True, file_okay=False, dir_okay=True, readable=True, show_default=False, metavar="RUN...",
        help="Two or more run folders: the same directions measured on different trajectories.")],
    label: Annotated[list[str] | None, typer.Option(
        "--label", "-l", show_default=False, help="A name for each run, in order. [default: the folder names]")] = None,
    step: Annotated[int | None, typer.Option(
        "--step", "-s", show_default=False,
        help="Compare at this step (measured in every run). [default: each run's median over its steps]")] = None,
    fmt: Annotated[ReportFormat, typer.Option("--format", "-f", help="Table format.")] = "md",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False, help="Write the table to this file.")] = None,
    figure: Annotated[Path | None, typer.Option(
        "--figure", dir_okay=False, show_default=False,
        help="Also draw the comparison into this file (.png, .pdf or .svg).")] = None,
    directions: DirectionsOpt = None,
) -> None:
    """Compare runs: each direction's ratio to SGD on every trajectory, side by side.

    Pan & Li compare the SGD trajectory with the Adam trajectory: the same directions measured on
    different runs, as a table and, with --figure, a figure."""
    from landscape.report import compare as make_compare
    from landscape.store import load_run

    loaded = [load_run(r) for r in runs]
    chosen = _directions(directions)
    try:
        text = make_compare(loaded, ReportFormat(fmt).value, directions=chosen, labels=label or None, step=step)
    except ValueError as e:
        if type(e) is ValueError:
            raise CLIError(str(e)) from None
        raise
    if figure is not None:
        suffix = figure.suffix.lstrip(".")
        if suffix not in FIGURE_FORMATS:
            raise CLIError(f"--figure {figure}: the file name must end in {', '.join('.' + f for f in FIGURE_FORMATS)}")
        from matplotlib.figure import Figure

        from landscape.plots import _save, compare_ratios, figsize, paper_style

        with paper_style():
            fig = Figure(figsize=figsize("single", 1.0), layout="constrained")
            ax = compare_ratios(loaded, ax=fig.add_subplot(), directions=chosen, labels=label or None, step=step)
            fig.set_size_inches(figsize("single", 0.3 + 0.12 * len(ax.get_yticks())))
            figure.parent.mkdir(parents=True, exist_ok=True)
            caption = ("Ratio of directional sharpness to SGD's of each update direction, "
                       + ("median over the measured steps" if step is None else f"at step {step}") + ", on "
                       + ", ".join(f"{r.path.name}" for r in loaded) + ".")
            _save(fig, figure, suffix, caption)
            figure.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        typer.echo(str(figure), err=True)
    if output is None:
        typer.echo(text, nl=False)
        return
    _write_text(output, text)


def _write_text(output: Path, text: str) -> None:
    try:
        if not output.parent.is_dir():
            output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
    except OSError as e:
        raise CLIError(f"cannot write {output}: {e.strerror or e}") from None
    typer.echo(str(output), err=True)


class DemoOptimizer(str, Enum):
    adam = "adam"
    sgd = "sgd"


class DemoTask(str, Enum):
    lm = "lm"
    cnn = "cnn"


@app.command()
def demo(
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Run folder. [default: runs/demo, or a folder named after the options you change, e.g. "
             "runs/demo-sgd-steps600]")] = None,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps.")] = 300,
    every: Annotated[int, typer.Option("--every", min=1, help="Measure every this many steps (and the first).")] = 60,
    optimizer: Annotated[DemoOptimizer, typer.Option("--optimizer", help="The optimizer that trains the model.")] = DemoOptimizer.adam,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the model, the batches and the probe batch.")] = 0,
    fmt: Annotated[FigureFormat, typer.Option("--format", "-f", help="Figure format.")] = "png",
    threads: ThreadsOpt = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON (progress stays on stderr).")] = False,
    task: Annotated[DemoTask, typer.Option(
        "--task", help="lm: the transformer LM; cnn: a small ResNet on scikit-learn's digits images, trained by "
                       "SGD with momentum (Pan & Li 2023, App. E's contrast; --optimizer does not apply; default --out "
                       "runs/demo_cnn).")] = DemoTask.lm,
    race: Annotated[bool, typer.Option(
        "--race", help="Instead, race sgd, sgd_clip, adam, adam_clip on the demo's text (Pan & Li 2023, Fig. 6): each "
                       "at its best learning rate of 3 or 4, over 3 seeds from --seed (default --out runs/demo_race).")
    ] = False,
) -> None:
    """Train a small transformer LM with the probe attached; write figures and a report.

    The model learns the King James Bible (character level); figures go to OUT/figures and a report
    to OUT/report.md. Every recipe of `landscape recipes` follows the same real gradients; every --every steps each
    direction's sharpness, landscape line, histogram and the local smoothness are measured on a
    fixed probe batch. About a minute on 2 CPU cores with the defaults. Changing an option writes a
    new run folder; re-running a finished demo only says where its figures are.
    """
    if race or task != DemoTask.lm:  # the other demos (landscape/cli_experiments.py)
        from landscape.cli_experiments import other_demo

        other_demo(out, steps=steps, every=every, seed=seed, fmt=FigureFormat(fmt).value, race=race,
                   task=DemoTask(task).value)
        return
    from landscape.demo import DemoConfig, demo_folder, demo_status

    cfg = DemoConfig(steps=steps, every=every, optimizer=DemoOptimizer(optimizer).value, seed=seed)
    out = out if out is not None else demo_folder(cfg)
    status = demo_status(out, cfg)
    if status.kind == "different":
        diffs = ", ".join(f"{k}={old!r} there, {new!r} asked" for k, old, new in status.differences)
        raise CLIError(f"{out} holds a demo run with other options ({diffs}); choose another --out (or leave "
                       "--out out: every set of options gets its own folder), or remove the folder")
    if status.kind == "other":
        raise CLIError(f"{out} holds a landscape run that is not a demo; choose another --out")
    fmt_value = FigureFormat(fmt).value
    if status.kind == "finished":
        _finished_demo(out, status, fmt_value, as_json)
        return
    _run_demo(out, cfg, status, fmt_value, threads, as_json)


def _demo_outputs(out: Path, fmt: str) -> tuple[list[Path], Path]:
    from landscape.plots import save_figures
    from landscape.report import report as make_report
    from landscape.store import load_run

    run = load_run(out)
    paths = save_figures(run, out / "figures", fmt)
    report_path = out / "report.md"
    report_path.write_text(make_report(run, "md", figures=out / "figures", link_base=out), encoding="utf-8")
    return paths, report_path


def _finished_demo(out: Path, status: Any, fmt: str, as_json: bool) -> None:
    figures = out / "figures"
    existing = sorted(figures.glob(f"*.{fmt}")) if figures.is_dir() else []
    report_path = out / "report.md"
    wrote = not existing or not report_path.exists()
    if wrote:  # finished training but stopped before its figures (or another format asked for)
        existing, report_path = _demo_outputs(out, fmt)
    if as_json:
        _print_json({"out": str(out), "finished": True, "trained": False, "steps": status.steps_done,
                     "measured": status.measured, "figures": [str(p) for p in existing], "report": str(report_path)})
        return
    typer.echo(f"{out} is a finished demo ({status.steps_done} steps, {status.measured} measured); nothing to train.")
    typer.echo(f"figures: {figures} ({len(existing)} files{', written now' if wrote else ''}); report: {report_path}")
    typer.echo(f"redraw with `landscape plot {out} --format pdf`; train another with other options or --out DIR.")


def _run_demo(out: Path, cfg: Any, status: Any, fmt: str, threads: str, as_json: bool) -> None:
    from landscape._progress import Progress
    from landscape.demo import run_demo
    from landscape.report import ratio_exclusions, summary
    from landscape.store import load_run

    out.mkdir(parents=True, exist_ok=True)  # an unwritable place fails here, in one line, before any output
    why = _threads(threads)
    progress = Progress("landscape demo", total=cfg.steps, measured_at=lambda i: i == 1 or i % cfg.every == 0)
    if status.kind == "unfinished":
        progress.note(f"continuing the unfinished demo in {out} ({status.steps_done} of {cfg.steps} steps were "
                      "trained; it resumes from its last measurement)")
    progress.note(f"training a small causal transformer on the King James Bible for {cfg.steps} steps, measuring "
                  f"every {cfg.every} steps into {out} ({why})")

    def on_step(step: int, loss: float, measured: int) -> None:
        if progress.done == 0 and step > 1:  # resumed: the steps before this one are not this run's work
            progress.start_at(step - 1)
        progress.step(step, loss)

    result = run_demo(out, cfg, on_step=on_step, progress=progress)
    progress.close()
    progress.note("writing figures and the report")
    paths, report_path = _demo_outputs(out, fmt)
    run = load_run(out)
    rows = summary(run)
    t = result["timings"]
    if as_json:
        _print_json({"out": str(out), "finished": True, "trained": True, "steps": cfg.steps,
                     "seconds": result["seconds"], "timings": t, "final_loss": result["final_loss"],
                     "figures": [str(p) for p in paths], "report": str(report_path),
                     "summary": [{k: r[k] for k in ("direction", "median_ratio_to_sgd", "n_ratio", "n_steps")}
                                 for r in rows]})
        return
    if result.get("resumed_from") is not None:
        typer.echo(f"resumed after step {result['resumed_from']} (model, optimizer and data order restored)")
    typer.echo(f"trained {cfg.steps} steps in {result['seconds']:.0f} s (tracking {t['tracking']:.1f} s, "
               f"measurement {t['measurement']:.1f} s); final training loss {result['final_loss']:.3f}")
    if rows:
        typer.echo("median sharpness ratio to SGD over the measured steps where SGD's sharpness is > 0:")
        for r in rows:
            typer.echo(f"  {r['direction']:<20s} {r['median_ratio_to_sgd']:10.4g}   ({r['n_ratio']}/{r['n_steps']} steps)")
        excluded = ratio_exclusions(rows)
        if excluded:
            typer.echo(excluded)
    typer.echo(f"figures: {out / 'figures'} ({len(paths)} files); report: {report_path}")


@app.command()
def recipes(
    fmt: Annotated[TextFormat, typer.Option("--format", "-f", help="text, or json (name, rule, source, defaults).")] = "text",
) -> None:
    """List every pseudo-update recipe: its rule, the work it comes from, its defaults."""
    from landscape.optim import format_recipes
    from landscape.optim.recipes import describe_recipes

    if TextFormat(fmt) is TextFormat.json:
        _print_json(describe_recipes())
        return
    typer.echo(format_recipes())


class CheckpointOrder(str, Enum):
    step = "step"
    name = "name"
    mtime = "mtime"


class MeasureMode(str, Enum):
    eval = "eval"
    train = "train"


class SharpnessEngine(str, Enum):
    auto = "auto"
    taylor = "taylor"
    hvp = "hvp"


@app.command()
def analyze(
    checkpoints: Annotated[list[str], typer.Argument(
        show_default=False, metavar="CHECKPOINT",
        help="Checkpoint files, folders or quoted glob patterns: .pt/.pth/.bin (a state_dict, or a dict holding "
             "one under 'model' or 'state_dict'), Lightning .ckpt, .safetensors, Hugging Face save_pretrained "
             "folders.")],
    spec: Annotated[str, typer.Option(
        "--spec", show_default=False,
        help="package.module:function (or path/to/file.py:function) returning (model, loss_fn, probe_batch"
             "[, train_batches]) or a dict with those keys. The current folder is importable.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Run folder to write (resumed when it exists with the same settings).")],
    every: Annotated[int, typer.Option(
        "--every", min=1, help="Measure every this many checkpoints (the first included); all feed the recipes.")] = 1,
    order: Annotated[CheckpointOrder, typer.Option(
        "--order", help="step: by the step in the metadata or file name; name: natural name order; "
                        "mtime: oldest first.")] = CheckpointOrder.step,
    recipe: Annotated[list[str] | None, typer.Option(
        "--recipe", "-r", show_default=False,
        help="Pseudo-update recipe to measure (repeat for several; `landscape recipes` lists them). "
             "[default: all]")] = None,
    grad_batches: Annotated[int, typer.Option(
        "--grad-batches", min=1,
        help="Training batches averaged into each checkpoint's gradient (taken in order from the spec's "
             "train_batches; without them the probe batch is used).")] = 1,
    mode: Annotated[MeasureMode, typer.Option(
        "--mode", help="Module mode for the measurements and the gradients.")] = MeasureMode.eval,
    trust_checkpoints: Annotated[bool, typer.Option(
        "--trust-checkpoints",
        help="Allow full pickles (torch.load weights_only=False), which can run code: only for files you "
             "trust. By default a pickle that would import anything but tensors is refused unread.")] = False,
    engine: Annotated[SharpnessEngine, typer.Option(
        "--engine",
        help="How directional sharpness is computed: auto (a Taylor sweep through the traced loss where it "
             "supports the model, else Hessian-vector products), taylor, or hvp. The same numbers up to "
             "rounding; taylor is about 1.4x a forward+backward per direction, hvp 2.4x or more.")
    ] = SharpnessEngine.auto,
    threads: ThreadsOpt = "auto",
    fmt: Annotated[TextFormat, typer.Option(
        "--format", "-f", help="text: a one-line summary; json: what was measured, skipped and failed.")] = "text",
    curvature_every: Annotated[int, typer.Option(
        "--curvature-every", min=0,
        help="Every this many measured checkpoints (0: off) also measure the curvature: the largest and most "
             "negative Hessian eigenvalues with residuals (whole model and per layer), a Hutch++ trace with its "
             "standard error, the SLQ spectral density, the preconditioned sharpness of the adam recipe, and where "
             "each direction's sharpness lives layer by layer (tables eigenvalues, trace, density, preconditioned, "
             "sharpness_layers). A few hundred Hessian-vector products per checkpoint.")] = 0,
    ggn: Annotated[bool, typer.Option(
        "--ggn", help="With --curvature-every: the same on the Gauss–Newton matrix Jᵀ H_ℓ J too (the loss split "
                      "at the model's output).")] = False,
) -> None:
    """Measure saved checkpoints as the probe measures a live run.

    For each checkpoint in order, its gradient feeds the pseudo-update
    recipes; every --every checkpoint is measured on the spec's probe batch
    (sharpness and loss line of every recipe's direction and of the step to
    the next checkpoint, histograms, cosines, smoothness along that step)
    into OUT, readable by `landscape plot` and `landscape report`. Momenta
    built from sparse checkpoints approximate the per-step ones (see
    docs/analyze.md). Re-running the same command resumes: measured
    checkpoints are skipped. Shows its progress on stderr (a status line in
    a terminal, a line per measurement elsewhere).
    """
    from landscape._progress import Progress
    from landscape.analyze import SpecError
    from landscape.analyze import analyze as run_analyze
    from landscape.checkpoints import CheckpointError
    from landscape.measure import MeasureSettings
    from landscape.optim import recipe_names

    if recipe:
        unknown = [r for r in recipe if r not in recipe_names()]
        if unknown:
            raise CLIError(f"--recipe: unknown recipe(s) {', '.join(unknown)}; recipes: {', '.join(recipe_names())}")
    why = _threads(threads)
    printer = Progress("landscape analyze", unit="checkpoint")
    state = {"k": -1, "started": False}

    def progress(done: int, total: int, what: str) -> None:
        if not state["started"]:  # the first call comes after the input checks: no output before an error
            state["started"] = True
            printer.note(f"measuring checkpoints into {out} ({why})")
        printer.total = total
        if done != state["k"]:
            if printer._meas_start is not None:
                printer.measured()
            printer.step(done)
            state["k"] = done
        if what.startswith("measuring ") and " directions at step " in what:
            printer.activity(what.split(" (")[0], what)
        else:
            printer.step(done, detail=what)

    try:
        result = run_analyze(
            spec, checkpoints, out, every=every, order=CheckpointOrder(order).value,
            recipes=list(recipe) if recipe else None,
            mode=MeasureMode(mode).value, grad_batches=grad_batches, trust=trust_checkpoints, progress=progress,
            settings=MeasureSettings(method=SharpnessEngine(engine).value, curvature=_curvature_settings(curvature_every, ggn)),
        )
    except (SpecError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    finally:
        printer.close()
    steps = [s for s, _ in result.checkpoints]
    if TextFormat(fmt) is TextFormat.json:
        _print_json({"out": str(out), "checkpoints": [{"step": s, "path": str(p)} for s, p in result.checkpoints],
                     "measured": result.measured, "already": result.already,
                     "failed": {str(k): v for k, v in result.failed.items()}})
        return
    typer.echo(f"{len(steps)} checkpoint(s), steps {steps[0]}..{steps[-1]}; measured {len(result.measured)}"
               + (f", {len(result.already)} already measured" if result.already else "")
               + (f", {len(result.failed)} failed (see the run's events)" if result.failed else "")
               + f": {out}")


def _curvature_settings(every: int, ggn: bool) -> Any:
    """The curvature measurements of ``--curvature-every`` (``None`` when off)."""
    if ggn and not every:
        raise CLIError("--ggn needs --curvature-every N (N ≥ 1)")
    if not every:
        return None
    from landscape.curvature_measure import CurvatureSettings

    return CurvatureSettings(curvatures=("hessian", "ggn") if ggn else ("hessian",), eig_every=every, eig_by="layer",
                             trace_every=every, density_every=every, precond_every=every, layers_every=every)


def main() -> None:
    """Entry point of the ``landscape`` console script."""
    app(prog_name="landscape")


import landscape.cli_experiments  # noqa: E402, F401  (registers `landscape race`, `landscape export`)
import landscape.plane_cli  # noqa: E402, F401  (registers `landscape plane`)

if __name__ == "__main__":
    main()
