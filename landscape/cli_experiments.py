"""``landscape race`` and ``landscape export``: commands registered on :data:`landscape.cli.app`
(this module is imported at the bottom of :mod:`landscape.cli`). They only parse, call the library
(:mod:`landscape.race`, :mod:`landscape.sinks`) and print."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from landscape.cli import CLIError, RunArg, app

__all__ = ["export", "other_demo", "race", "race_progress"]


@app.command()
def export(
    run: RunArg,
    tensorboard: Annotated[Path, typer.Option(
        "--tensorboard", file_okay=False, show_default=False,
        help="Folder to write TensorBoard event files into (created; refused if it already holds event files).")],
) -> None:
    """Replay a finished run into an experiment tracker's files.

    A probe run or a checkpoint analysis: every measured step's scalars (tags
    landscape/sharpness/<direction>, landscape/ratio_to_sgd/<direction>, ... as the live sinks write
    them) and update histograms, plus the training loss and learning rate of every step. An
    optimizer race: one TensorBoard run per training run (<recipe>_lr<lr>_seed<seed>) with its
    race/train_loss and race/probe_loss. Then: tensorboard --logdir DIR.
    """
    from landscape.sinks import export_tensorboard
    from landscape.store import load_run

    try:
        paths = export_tensorboard(load_run(run), tensorboard)
    except (FileExistsError, ImportError) as e:
        raise CLIError(str(e)) from None
    typer.echo(f"{len(paths)} event file(s) in {tensorboard}")


class SelectBy(str, Enum):
    probe = "probe"
    train = "train"


def _names(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _race_summary_lines(run_path: Path) -> list[str]:
    from landscape.race import race_summary
    from landscape.store import load_run

    lines = []
    for r in race_summary(load_run(run_path)):
        ci = r["final_train_ci"]
        lr = "diverged" if r["lr"] is None else f"{r['lr']:g}" + (" (edge of grid)" if r["at_edge"] else "")
        lines.append(f"  {r['recipe']:<12s} lr {lr:<20s} final training loss {r['final_train_loss']:.4f}"
                     + (f" ± {ci:.2g}" if ci == ci else "") + f"  probe loss {r['final_probe_loss']:.4f}"
                     + f"  ({r['n_seeds']} seed{'s' * (r['n_seeds'] != 1)})")
    return lines


def race_progress(label: str) -> tuple[Any, Any]:
    """A rich progress bar on stderr (off when stderr is not a terminal) and its callback."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    console = Console(stderr=True)
    bar = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    task = bar.add_task("", total=None)

    def progress(done: int, total: int, what: str) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total, description=what)

    return bar, progress


@app.command()
def race(
    spec: Annotated[str, typer.Option(
        "--spec", show_default=False,
        help="package.module:function (or path/to/file.py:function) returning (model, loss_fn, probe_batch, "
             "train_batches), as for `landscape analyze`; called once per seed, with torch seeded.")],
    out: Annotated[Path, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Run folder (resumed when it holds a race with the same settings: finished runs are skipped).")],
    recipes: Annotated[str, typer.Option(
        "--recipes", help="Comma-separated recipes to race (`landscape recipes`).")] = "sgd,sgd_clip,adam,adam_clip",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Optimizer steps per training run.")] = 200,
    lr_grid: Annotated[list[str] | None, typer.Option(
        "--lr-grid", show_default=False,
        help="Learning rates to try: '1e-3,3e-3' for every recipe, or 'adam=1e-4,3e-4' for one (repeatable). "
             "[default: by the recipe's update scale: 0.1,0.3,1,3 for sgd/sgd_clip, 3e-4..1e-2 for the others]")
    ] = None,
    seeds: Annotated[str, typer.Option(
        "--seeds", help="Comma-separated seeds; the first tunes the learning rates, the others train at the "
                        "chosen ones (95% confidence bands from two seeds on).")] = "0",
    probe_every: Annotated[int, typer.Option(
        "--probe-every", min=1, help="Record the probe-batch loss every this many steps (and after the last).")] = 10,
    select: Annotated[SelectBy, typer.Option(
        "--select", help="What picks the learning rate: probe (final probe-batch loss) or train (mean training "
                         "loss over the last 10% of the steps).")] = SelectBy.probe,
) -> None:
    """Race optimizers: train the spec's model with each recipe from the same initialisation, on the
    same batches, each at its best learning rate from a grid (Pan & Li 2023, Fig. 6, Crawshaw et al. 2022, Table 1).

    Writes loss curves to OUT; `landscape plot OUT` draws them (one line per recipe, a recipe and its
    clipped variant in one hue) and `landscape report OUT` tabulates the final losses (± 95% CI over the
    seeds) and the chosen learning rates. Re-running resumes; more seeds or rates add only what is new.
    """
    from landscape.analyze import SpecError
    from landscape.race import RaceError, parse_lr_grid
    from landscape.race import race as run_race

    names = _names(recipes)
    try:
        seed_list = [int(s) for s in _names(seeds)]
    except ValueError:
        raise CLIError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    bar, progress = race_progress("race")
    try:
        grid = parse_lr_grid(lr_grid, names)
        result = run_race(spec, out, recipes=names, steps=steps, lr_grid=grid, seeds=seed_list,
                          probe_every=probe_every, select=SelectBy(select).value, progress=progress)
    except (SpecError, RaceError) as e:
        raise CLIError(str(e)) from None
    finally:
        bar.stop()
    typer.echo(f"{len(result.trained)} training run(s)" + (f", {len(result.already)} already finished" if result.already
                                                          else "") + f": {out}")
    for line in _race_summary_lines(out):
        typer.echo(line)
    typer.echo(f"then: landscape plot {out}; landscape report {out}")


def other_demo(out: Path | None, *, steps: int, every: int, seed: int, fmt: str, race: bool, task: str) -> None:
    """``landscape demo --race`` and ``landscape demo --task cnn`` (called by the ``demo`` command)."""
    from landscape.plots import save_figures
    from landscape.report import ratio_exclusions, summary
    from landscape.report import report as make_report
    from landscape.store import load_run

    if race and task != "lm":
        raise CLIError("--race races on the demo's text: drop --task cnn")
    if race:
        from landscape.demo_race import run_race_demo

        out = Path("runs/demo_race") if out is None else out
        bar, progress = race_progress("race")
        try:
            result = run_race_demo(out, steps=steps, seeds=(seed, seed + 1, seed + 2), progress=progress)
        finally:
            bar.stop()
        run = load_run(out)
        paths = save_figures(run, out / "figures", fmt)
        (out / "report.md").write_text(make_report(run, "md"), encoding="utf-8")
        typer.echo(f"{len(result.trained)} training run(s)"
                   + (f", {len(result.already)} already finished" if result.already else "") + f": {out}")
        for line in _race_summary_lines(out):
            typer.echo(line)
        typer.echo(f"figures: {out / 'figures'} ({len(paths)} files); report: {out / 'report.md'}")
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from landscape.demo_cnn import DATASET, CNNDemoConfig, run_cnn_demo

    out = Path("runs/demo_cnn") if out is None else out
    columns = [TextColumn("[bold]training"), BarColumn(), TextColumn("step {task.completed}/{task.total}"),
               TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("measurements {task.fields[meas]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    try:
        with Progress(*columns, transient=False) as bar:
            job = bar.add_task("train", total=steps, loss=float("nan"), meas=0)
            result = run_cnn_demo(out, CNNDemoConfig(steps=steps, every=every, seed=seed),
                                  on_step=lambda step, loss, n: bar.update(job, completed=step, loss=loss, meas=n))
    except ImportError as e:
        raise CLIError(str(e)) from None
    run = load_run(out)
    paths = save_figures(run, out / "figures", fmt)
    (out / "report.md").write_text(make_report(run, "md"), encoding="utf-8")
    t = result["timings"]
    typer.echo(f"{DATASET}; SmallResNet trained {steps} steps by SGD with momentum in {result['seconds']:.0f} s "
               f"(tracking {t['tracking']:.1f} s, measurement {t['measurement']:.1f} s); final training loss "
               f"{result['final_loss']:.3f}, held-out accuracy {result['probe_accuracy']:.3f}")
    rows = summary(run)
    if rows:
        typer.echo("median sharpness ratio to SGD over the measured steps where SGD's sharpness is > 0:")
        for r in rows:
            typer.echo(f"  {r['direction']:<20s} {r['median_ratio_to_sgd']:10.4g}   ({r['n_ratio']}/{r['n_steps']} steps)")
        excluded = ratio_exclusions(rows)
        if excluded:
            typer.echo(excluded)
    typer.echo(f"figures: {out / 'figures'} ({len(paths)} files); report: {out / 'report.md'}")
