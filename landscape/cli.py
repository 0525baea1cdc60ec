"""The ``landscape`` command line: a typer app over the library.

Commands only parse their arguments, call the library and save; the work lives in
:mod:`landscape.plots`, :mod:`landscape.report` and friends (imported inside each command, so that
``landscape --help`` stays fast).

Errors: bad input (a missing run folder, an unknown option, a step that was not measured, a run
store error) prints **one line** on stderr, ``landscape <command>: error: <what and how to fix>``,
and exits with status 2; no traceback. Unexpected exceptions (bugs) keep their traceback.

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
import sqlite3
import sys
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from landscape.plots import FIGURE_FORMATS, FIGURE_NAMES
from landscape.report import REPORT_FORMATS
from landscape.store import StoreError

__all__ = ["app", "main", "CLIError", "USER_ERRORS"]


class CLIError(Exception):
    """Bad input detected by a command: reported as one line on stderr, exit status 2."""


#: Exceptions that mean "bad input" rather than "bug": one line on stderr, exit status 2.
USER_ERRORS: tuple[type[BaseException], ...] = (CLIError, StoreError)


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
        except USER_ERRORS as e:
            typer.echo(f"{where}: error: {_one_line(str(e))}", err=True)
            sys.exit(2)
        except OSError as e:  # the machine, not the program: a full disk, a read-only folder, a missing path
            typer.echo(f"{where}: error: {_one_line(_os_error(e))}", err=True)
            sys.exit(2)
        except sqlite3.Error as e:  # the run store's database (disk full, I/O error)
            typer.echo(f"{where}: error: cannot write the run store: {_one_line(str(e))}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="landscape",
    cls=_OneLineErrors,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Loss-landscape diagnostics for PyTorch optimizers: figures and tables from a run folder.",
)

FigureFormat = Enum("FigureFormat", {f: f for f in FIGURE_FORMATS}, type=str)
FigureName = Enum("FigureName", {f: f for f in FIGURE_NAMES}, type=str)
ReportFormat = Enum("ReportFormat", {f: f for f in REPORT_FORMATS}, type=str)

RunArg = Annotated[
    Path,
    typer.Argument(exists=True, file_okay=False, dir_okay=True, readable=True, show_default=False,
                   help="Run folder written by the probe (it holds run.sqlite)."),
]


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
) -> None:
    """Write every figure the run has data for, one file each.

    Training loss, sharpness and sharpness ratio to SGD over training, loss along each update
    direction and update histograms and cosine similarities (last measured step), and the
    smoothness scatters when measured. Prints the paths written.
    """
    from landscape.plots import save_figures
    from landscape.store import load_run

    folder = out if out is not None else run / "figures"
    try:
        paths = save_figures(load_run(run), folder, FigureFormat(fmt).value,
                             every_step=every_step, only=[FigureName(n).value for n in only] if only else None)
    except OSError as e:
        raise CLIError(f"cannot write figures into {folder}: {e.strerror or e}") from None
    if not paths:
        typer.echo(f"no figures written: {run} has no measurements yet", err=True)
    for path in paths:
        typer.echo(str(path))


@app.command()
def report(
    run: RunArg,
    fmt: Annotated[ReportFormat, typer.Option(
        "--format", "-f",
        help="md: Markdown tables; latex: booktabs tables; csv: tidy, one row per (step, direction).")] = "md",
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", dir_okay=False, show_default=False,
        help="Write to this file instead of standard output.")] = None,
    step: Annotated[list[int] | None, typer.Option(
        "--step", "-s", show_default=False,
        help="Only this measured step (repeat for several). [default: every measured step]")] = None,
) -> None:
    """Tabulate the run: per measured step, each direction's sharpness, ratio to SGD (seed 002
    Table 1) and gradient projection gᵀû, the median ratio per direction, run metadata, and the
    smoothness measurements when present."""
    from landscape.report import report as make_report
    from landscape.store import load_run

    text = make_report(load_run(run), ReportFormat(fmt).value, steps=step or None)
    if output is None:
        typer.echo(text, nl=False)
        return
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


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", file_okay=False, help="Run folder (resumed if it exists with the same settings).")] = Path("runs/demo"),
    steps: Annotated[int, typer.Option("--steps", min=1, help="Training steps.")] = 300,
    every: Annotated[int, typer.Option("--every", min=1, help="Measure every this many steps (and the first).")] = 60,
    optimizer: Annotated[DemoOptimizer, typer.Option("--optimizer", help="The optimizer that trains the model.")] = DemoOptimizer.adam,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the model, the batches and the probe batch.")] = 0,
    fmt: Annotated[FigureFormat, typer.Option("--format", "-f", help="Figure format.")] = "png",
) -> None:
    """Train a small causal transformer LM on the King James Bible with the probe attached, then
    write figures (OUT/figures) and a report (OUT/report.md).

    Every recipe of `landscape recipes` follows the same real gradients; every --every steps each
    direction's sharpness, landscape line, histogram and the local smoothness are measured on a
    fixed probe batch. Finishes in a few minutes on 2 CPU cores with the defaults.
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from landscape.demo import DemoConfig, run_demo
    from landscape.plots import save_figures
    from landscape.report import ratio_exclusions, summary
    from landscape.report import report as make_report
    from landscape.store import load_run

    cfg = DemoConfig(steps=steps, every=every, optimizer=DemoOptimizer(optimizer).value, seed=seed)
    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("measurements {task.fields[meas]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("train", total=steps, loss=float("nan"), meas=0)

        def on_step(step: int, loss: float, measured: int) -> None:
            progress.update(task, completed=step, loss=loss, meas=measured)

        result = run_demo(out, cfg, on_step=on_step)
    run = load_run(out)
    paths = save_figures(run, out / "figures", FigureFormat(fmt).value)
    (out / "report.md").write_text(make_report(run, "md"), encoding="utf-8")
    t = result["timings"]
    typer.echo(f"trained {steps} steps in {result['seconds']:.0f} s (tracking {t['tracking']:.1f} s, "
               f"measurement {t['measurement']:.1f} s); final training loss {result['final_loss']:.3f}")
    rows = summary(run)
    if rows:
        typer.echo("median sharpness ratio to SGD over the measured steps where SGD's sharpness is > 0:")
        for r in rows:
            typer.echo(f"  {r['direction']:<20s} {r['median_ratio_to_sgd']:10.4g}   ({r['n_ratio']}/{r['n_steps']} steps)")
        excluded = ratio_exclusions(rows)
        if excluded:
            typer.echo(excluded)
    typer.echo(f"figures: {out / 'figures'} ({len(paths)} files); report: {out / 'report.md'}")


@app.command()
def recipes() -> None:
    """List every pseudo-update recipe with its rule and default hyperparameters."""
    from landscape.optim import format_recipes

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


def _recipe_enum() -> type[Enum]:
    from landscape.optim import recipe_names

    return Enum("RecipeName", {n: n for n in recipe_names()}, type=str)


RecipeName = _recipe_enum()


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
    recipe: Annotated[list[RecipeName] | None, typer.Option(
        "--recipe", "-r", show_default=False,
        help="Pseudo-update recipe to measure (repeat for several). [default: all]")] = None,
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
    checkpoints are skipped. Shows a progress bar on stderr.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from landscape.analyze import SpecError
    from landscape.analyze import analyze as run_analyze
    from landscape.checkpoints import CheckpointError
    from landscape.measure import MeasureSettings

    console = Console(stderr=True)  # stdout keeps the one-line summary; no bar when not a terminal
    bar = Progress(TextColumn("[bold]analyze"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    task = bar.add_task("", total=None)

    def progress(done: int, total: int, what: str) -> None:
        if not bar.live.is_started:  # started at the first checkpoint: input errors come before any bar
            bar.start()
        bar.update(task, completed=done, total=total, description=what)

    try:
        result = run_analyze(
            spec, checkpoints, out, every=every, order=CheckpointOrder(order).value,
            recipes=[RecipeName(r).value for r in recipe] if recipe else None,
            mode=MeasureMode(mode).value, grad_batches=grad_batches, trust=trust_checkpoints, progress=progress,
            settings=MeasureSettings(method=SharpnessEngine(engine).value, curvature=_curvature_settings(curvature_every, ggn)),
        )
    except (SpecError, CheckpointError) as e:
        raise CLIError(str(e)) from None
    finally:
        bar.stop()
    steps = [s for s, _ in result.checkpoints]
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


import landscape.plane_cli  # noqa: E402, F401  (registers `landscape plane`)

if __name__ == "__main__":
    main()
