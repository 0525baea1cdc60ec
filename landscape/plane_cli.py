"""``landscape plane``: loss planes and lines from a run's saved points or from checkpoints.

Two forms (registered on :data:`landscape.cli.app`, imported at the bottom of :mod:`landscape.cli`):

    landscape plane RUN --step N --directions sgd,adam [--spec module:build]
    landscape plane --spec module:build CHECKPOINT... --kind random|pca|interpolate --out RUN

The first reads the points the probe kept (``Probe(..., save_points=[...])``, see
:mod:`landscape.points`) and needs the spec only to rebuild the model, the loss and the probe batch
(``--spec``, or a ``spec`` entry in the run's metadata). The second reads checkpoints the way
``landscape analyze`` does (:func:`landscape.analyze.load_spec`,
:mod:`landscape.checkpoints`). Both write into a run store (:func:`landscape.planes.measure_plane`:
resumable, re-running the same command finishes an interrupted grid) and then draw the figures from
the store (:mod:`landscape.plane_plots`).
"""

from __future__ import annotations

import itertools
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import typer

from landscape.cli import CLIError, app

__all__ = ["plane"]


class PlaneKind(str, Enum):
    random = "random"
    pca = "pca"
    interpolate = "interpolate"
    updates = "updates"


class BiasMode(str, Enum):
    zero = "zero"
    keep = "keep"
    random = "random"


class Scale(str, Enum):
    unit = "unit"
    norm = "norm"


class Method(str, Enum):
    auto = "auto"
    vmap = "vmap"
    loop = "loop"


class Order(str, Enum):
    step = "step"
    name = "name"
    mtime = "mtime"


class Mode(str, Enum):
    eval = "eval"
    train = "train"


class Format(str, Enum):
    png = "png"
    pdf = "pdf"
    svg = "svg"


def _range(text: str | None) -> tuple[float, float] | None:
    if text is None:
        return None
    parts = text.replace(":", ",").split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise CLIError(f"--range must be LO,HI (two numbers, e.g. -1,1), got {text!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise CLIError(f"--range needs finite LO < HI, got {text!r}")
    return lo, hi


def _is_run(path: str) -> bool:
    from landscape.store import DB_NAME

    return Path(path).is_dir() and (Path(path) / DB_NAME).is_file()


def _spec_ref(spec: str | None, run: Any | None) -> str:
    if spec:
        return spec
    if run is not None:
        meta = run.meta
        ref = meta.get("spec") or (meta.get("source") or {}).get("spec")
        if isinstance(ref, str) and ref:
            return ref
    raise CLIError("pass --spec module:function to rebuild the model, loss and probe batch (the run does not record "
                   "one; a probe records it with meta={'spec': 'module:function'})")


def _load_into(model: Any, state: dict[str, Any], source: str) -> dict[str, Any]:
    """Check ``state`` against the model (``fit_state_dict``) and return it matched."""
    from landscape.checkpoints import fit_state_dict

    return fit_state_dict(model, state, source)


def _params(fitted: dict[str, Any], model: Any, names: Any) -> dict[str, Any]:
    named = dict(model.named_parameters())
    return {n: fitted[n].to(device=named[n].device, dtype=named[n].dtype) for n in names}


def _updates_range(run: Any, step: int, dirs: list[str], scale: str, norms: list[float]) -> tuple[float, float]:
    """Half widths (α, β) for an update plane: twice the larger best step of the two directions,
    from the run's sharpness (quadratic model) or lines (measured) rows at that step; 1 otherwise."""
    best: list[float] = []
    for table in ("sharpness", "lines"):
        rows = {r["direction"]: r for r in run.rows(table, step=step)}
        vals = [rows[d].get("best_step") for d in dirs if d in rows]
        vals = [float(v) for v in vals if v is not None and np.isfinite(v) and v > 0]
        if vals:
            best = vals
            break
    r = 2.0 * max(best) if best else 1.0
    if scale == "unit":
        return r, r
    return r / norms[0], r / norms[1]


@app.command()
def plane(
    sources: Annotated[list[str] | None, typer.Argument(
        metavar="RUN | CHECKPOINT...", show_default=False,
        help="A run folder whose probe saved points (with --step), or checkpoint files, folders or quoted glob "
             "patterns (with --kind), read as `landscape analyze` reads them.")] = None,
    spec: Annotated[str | None, typer.Option(
        "--spec", show_default=False,
        help="package.module:function (or path/to/file.py:function) returning (model, loss_fn, probe_batch"
             "[, train_batches]) or a dict with those keys, as for `landscape analyze`. Optional for a RUN that "
             "records one.")] = None,
    step: Annotated[list[int] | None, typer.Option(
        "--step", "-s", show_default=False,
        help="RUN form: the saved point(s) to use (repeat for several). --directions: exactly one; random: the "
             "centre (default: the last saved); pca: the trajectory (default: every saved point); "
             "interpolate: the two ends (default: first and last).")] = None,
    directions: Annotated[str | None, typer.Option(
        "--directions", "-d", show_default=False,
        help="RUN form: one or two update directions saved at --step, comma-separated (e.g. sgd,adam): the plane "
             "they span, orthogonalised (one name: the line along it).")] = None,
    kind: Annotated[PlaneKind | None, typer.Option(
        "--kind", "-k", show_default=False,
        help="random: two filter-normalised random directions at the last point (Li et al. 2018); pca: the "
             "trajectory's top two principal directions; interpolate: the segment from the first point to the "
             "last, extended; updates: the plane of --directions.")] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", file_okay=False, show_default=False,
        help="Run folder to write (checkpoint form; created, or added to). The RUN form writes into RUN.")] = None,
    name: Annotated[str | None, typer.Option(
        "--name", show_default=False, help="Name of the plane in the run (default: from the kind and the points).")] = None,
    points: Annotated[int, typer.Option("--points", "-n", min=2, help="Grid points per axis.")] = 41,
    range_: Annotated[str | None, typer.Option(
        "--range", show_default=False,
        help="LO,HI: the grid of each axis (default: -1,1 for random; -0.5,1.5 for interpolate; the trajectory "
             "with a margin for pca; twice the best step measured at --step for update directions).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random directions.")] = 0,
    biases: Annotated[BiasMode, typer.Option(
        "--biases", help="Random directions on biases and normalisation weights (1-D parameters): zero (Li et "
                         "al.'s --xignore biasbn), keep (the parameter itself) or random (scaled to its norm).")
    ] = BiasMode.zero,
    scale: Annotated[Scale, typer.Option(
        "--scale", help="Update planes: unit (coordinates are distances in parameter space) or norm (in units "
                        "of each update's norm: 1 is the whole update).")] = Scale.unit,
    train_batches: Annotated[int, typer.Option(
        "--train-batches", min=0,
        help="Lines: the training loss curve averages this many of the spec's train_batches (0: none).")] = 4,
    order: Annotated[Order, typer.Option(
        "--order", help="Checkpoint order: step, name or mtime (as `landscape analyze`).")] = Order.step,
    mode: Annotated[Mode, typer.Option("--mode", help="Module mode of the evaluations.")] = Mode.eval,
    method: Annotated[Method, typer.Option(
        "--method", help="auto: several grid points per forward pass (torch.func.vmap) where that is faster, "
                         "checked against one point at a time; vmap; loop.")] = Method.auto,
    fmt: Annotated[Format, typer.Option("--format", "-f", help="Figure format.")] = Format.png,
    surface: Annotated[bool, typer.Option("--surface", help="Also draw planes as 3-D surfaces.")] = False,
    log: Annotated[bool, typer.Option("--log", help="Logarithmic colour (plane) or loss (line) scale.")] = False,
    figures: Annotated[bool, typer.Option(
        "--figures/--no-figures", help="Draw the figures into the run's figures/ folder.")] = True,
    trust_checkpoints: Annotated[bool, typer.Option(
        "--trust-checkpoints",
        help="Allow full pickles (torch.load weights_only=False), which can run code: only for files you trust.")
    ] = False,
) -> None:
    """Loss planes and lines around a training point or over checkpoints.

    RUN --step N --directions a,b: the plane of two update directions the
    probe saved at step N (Probe(save_points=...)), orthogonalised.
    CHECKPOINT... --kind random|pca|interpolate: filter-normalised random
    directions (Li et al. 2018), the trajectory's PCA plane, or the segment
    between the first and last checkpoint (Goodfellow et al. 2015).
    The grid goes into the run store as it is computed (tables planes,
    plane_losses, plane_trajectory): re-running the same command resumes
    an interrupted grid. Figures are drawn from the store into
    RUN/figures. Shows a progress bar on stderr.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from landscape.analyze import SpecError, load_spec
    from landscape.checkpoints import CheckpointError
    from landscape.planes import PlaneError, measure_plane

    srcs = list(sources or [])
    if not srcs:
        raise CLIError("pass a run folder (with --step and --directions or --kind) or checkpoints (with --kind)")
    run_form = len(srcs) == 1 and _is_run(srcs[0])
    kind_ = PlaneKind(kind).value if kind is not None else None
    dir_names = [d.strip() for d in directions.split(",")] if directions is not None else None
    if dir_names is not None:
        if not run_form:
            raise CLIError("--directions reads the directions a probe saved: pass one run folder, not checkpoints")
        if not 1 <= len(dir_names) <= 2 or not all(dir_names):
            raise CLIError(f"--directions takes one or two names separated by a comma, got {directions!r}")
        if kind_ not in (None, "updates"):
            raise CLIError(f"--directions draws the plane of update directions; it cannot be combined with --kind {kind_}")
        kind_ = "updates"
    if kind_ is None:
        raise CLIError("pass --directions (with a run folder and --step) or --kind random|pca|interpolate")
    if kind_ == "updates" and dir_names is None:
        raise CLIError("--kind updates needs --directions NAME[,NAME]")
    if run_form and out is not None:
        raise CLIError("the RUN form writes into RUN itself: drop --out")
    if not run_form and step:
        raise CLIError("--step picks saved points of a run folder; with checkpoints, pass the files to use")
    if not run_form and out is None:
        raise CLIError("--out RUN is required with checkpoints (the run folder the plane is written into)")
    bounds = _range(range_)

    try:
        if run_form:
            job = _from_run(Path(srcs[0]), spec, step, dir_names, kind_, load_spec, mode.value, trust_checkpoints)
        else:
            job = _from_checkpoints(srcs, spec, kind_, load_spec, Order(order).value, mode.value, trust_checkpoints)
        job.update(seed=seed, biases=BiasMode(biases).value, scale=Scale(scale).value)
        plane_, grid, default_name = _build(job, points, bounds, train_batches)
    except (SpecError, CheckpointError, PlaneError) as e:
        raise CLIError(str(e)) from None

    from landscape.store import RunStore, load_run

    folder = Path(srcs[0]) if run_form else out
    assert folder is not None
    if (folder / "run.sqlite").is_file():
        settings = load_run(folder).settings
        meta: dict[str, Any] = {}
    else:
        import platform

        import torch

        from landscape._version import __version__

        settings = {"source": "planes"}
        meta = {"spec": job["spec_ref"], "model": {"class": type(job["model"]).__name__},
                "versions": {"landscape": __version__, "torch": torch.__version__,
                             "python": platform.python_version()}}
    plane_name = name or default_name
    console = Console(stderr=True)
    bar = Progress(TextColumn("[bold]plane"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                   TimeElapsedColumn(), console=console, disable=not console.is_terminal)
    task = bar.add_task("", total=None)

    def progress(done: int, total: int, what: str) -> None:
        if not bar.live.is_started:
            bar.start()
        bar.update(task, completed=done, total=total, description=what)

    store = RunStore(folder, settings=settings, meta=meta)
    try:
        before = _stored_points(store, plane_name)
        grids = measure_plane(store, plane_name, plane_, job["objectives"], grid, method=Method(method).value,
                              progress=progress)
    finally:
        bar.stop()
        store.close()
    shape = "×".join(str(len(g)) for g in (grids["probe"].alphas, grids["probe"].betas) if g is not None)
    computed = sum(g.loss.size for g in grids.values()) - before
    typer.echo(f"{plane_name}: {shape} grid, {', '.join(grids)} loss; {computed} point(s) computed"
               + (f", {before} already stored" if before else "") + f": {folder}")
    if figures:
        from landscape.plane_plots import save_plane_figures

        for path in save_plane_figures(load_run(folder), folder / "figures", Format(fmt).value, names=[plane_name],
                                       surface=surface, log=log):
            typer.echo(str(path))


def _stored_points(store: Any, name: str) -> int:
    return sum(len(r["loss"]) for r in store.run().rows("plane_losses", name=name))


def _from_run(run_dir: Path, spec: str | None, steps: list[int] | None, dir_names: list[str] | None, kind: str,
              load_spec: Any, mode: str, trust: bool) -> dict[str, Any]:
    from landscape.points import load_point, saved_steps
    from landscape.probe import batch_fingerprint
    from landscape.store import load_run

    run = load_run(run_dir)
    saved = saved_steps(run_dir)
    if not saved:
        raise CLIError(f"{run_dir} has no saved points: create the probe with save_points=[...] (steps to keep), "
                       "or pass checkpoints with --kind")
    shown = ", ".join(map(str, saved[:20])) + (", ..." if len(saved) > 20 else "")
    missing = [s for s in (steps or []) if s not in saved]
    if missing:
        raise CLIError(f"step {missing[0]} has no saved point in {run_dir}; saved steps: {shown}")
    if kind == "updates":
        if not steps or len(steps) != 1:
            raise CLIError(f"--directions needs exactly one --step (saved steps: {shown})")
        chosen = list(steps)
    elif kind == "random":
        if steps and len(steps) != 1:
            raise CLIError("--kind random takes one --step (the centre)")
        chosen = list(steps) if steps else [saved[-1]]
    elif kind == "pca":
        chosen = sorted(set(steps)) if steps else saved
        if len(chosen) < 3:
            raise CLIError(f"--kind pca needs at least 3 saved points, got {len(chosen)} (saved steps: {shown})")
    else:
        chosen = list(steps) if steps else [saved[0], saved[-1]]
        if len(chosen) != 2 or chosen[0] == chosen[1]:
            raise CLIError(f"--kind interpolate needs two different saved points (saved steps: {shown})")
    spec_ref = _spec_ref(spec, run)
    sp = load_spec(spec_ref)
    if run.settings.get("probe_batch") not in (None, batch_fingerprint(sp.probe_batch)):
        typer.echo(f"landscape plane: warning: the probe batch of {spec_ref} differs from the one {run_dir} was "
                   "measured on; the plane uses the spec's", err=True)
    if kind == "random":
        wanted = saved  # the trajectory, projected
    elif kind == "interpolate":  # the two ends, and the points saved between them (marked at their loss)
        lo, hi = sorted(chosen)
        forward = 1 if chosen[1] > chosen[0] else -1
        wanted = sorted({*chosen, *(s for s in saved if lo < s < hi)}, key=lambda s: forward * (s - chosen[0]))
    else:
        wanted = chosen
    pts = {s: load_point(run_dir, s) for s in wanted}
    job: dict[str, Any] = {"spec": sp, "spec_ref": spec_ref, "model": sp.model, "kind": kind, "mode": mode, "run": run}
    model = sp.model
    fitted = {s: _load_into(model, p.state_dict, f"saved point {p.path}") for s, p in pts.items()}
    center_step = {"updates": chosen[0], "random": chosen[0], "pca": chosen[-1], "interpolate": chosen[0]}[kind]
    job.update(fitted=fitted, order=list(pts), chosen=chosen, center=center_step,
               labels={s: f"step {s}" for s in pts})
    if kind == "updates":
        point = pts[chosen[0]]
        if not point.directions:
            raise CLIError(f"the point of step {chosen[0]} was saved without directions (save_directions=False)")
        unknown = [d for d in dir_names or [] if d not in point.directions]
        if unknown:
            raise CLIError(f"direction {unknown[0]!r} was not saved at step {chosen[0]}; saved: "
                           f"{', '.join(point.directions)}")
        job.update(directions={d: point.directions[d] for d in point.directions},
                   names=dir_names, trained=point.meta.get("trained_direction"))
    return job


def _from_checkpoints(srcs: list[str], spec: str | None, kind: str, load_spec: Any, order: str, mode: str,
                      trust: bool) -> dict[str, Any]:
    from landscape.checkpoints import (
        describe_checkpoint,
        find_checkpoints,
        load_checkpoint,
        order_checkpoints,
    )

    if kind == "updates":
        raise CLIError("update directions come from a run folder's saved points: pass the run folder and --step")
    ordered = order_checkpoints([describe_checkpoint(p, trust=trust) for p in find_checkpoints(srcs)], order)
    need = {"random": 1, "interpolate": 2, "pca": 3}[kind]
    if len(ordered) < need:
        raise CLIError(f"--kind {kind} needs at least {need} checkpoint(s), got {len(ordered)}")
    spec_ref = _spec_ref(spec, None)
    sp = load_spec(spec_ref)
    model = sp.model
    fitted = {}
    labels = {}
    for s, ck in ordered:
        fitted[s] = _load_into(model, load_checkpoint(ck.path, trust=trust).state_dict, f"checkpoint {ck.path} (step {s})")
        labels[s] = f"step {s}"
    steps = [s for s, _ in ordered]
    center = {"random": steps[-1], "pca": steps[-1], "interpolate": steps[0]}[kind]
    chosen = steps if kind != "interpolate" else [steps[0], steps[-1]]
    return {"spec": sp, "spec_ref": spec_ref, "model": model, "kind": kind, "mode": mode, "run": None,
            "fitted": fitted, "order": steps, "chosen": chosen, "center": center, "labels": labels}


def _build(job: dict[str, Any], n: int, bounds: tuple[float, float] | None, train_batches: int) -> tuple[Any, Any, str]:
    """Load the centre into the model, make the objectives and the plane; return (plane, grid, name)."""
    import torch

    from landscape import tree
    from landscape.analyze import SpecError
    from landscape.objective import MicroBatches, Objective
    from landscape.planes import interpolation, pca_plane, random_plane, update_plane

    sp, model, kind = job["spec"], job["model"], job["kind"]
    center = job["center"]
    with torch.no_grad():
        model.load_state_dict(job["fitted"][center], strict=True)
    try:
        probe = Objective(model, sp.loss_fn, sp.probe_batch, mode=job["mode"])
    except Exception as e:  # the user's loss_fn or batch
        raise SpecError(f"{sp.source}: loss_fn(model, probe_batch) failed: {type(e).__name__}: {e}") from None
    names = list(probe.names)
    pts = {s: _params(job["fitted"][s], model, names) for s in job["order"]}
    chosen = job["chosen"]
    labels = job["labels"]
    lin = np.linspace(bounds[0], bounds[1], n) if bounds is not None else None
    if kind == "updates":
        step = chosen[0]
        dirs = {d: {k: v.to(pts[step][k]) for k, v in u.items() if k in pts[step]} for d, u in job["directions"].items()}
        for d, u in dirs.items():
            miss = [k for k in names if k not in u]
            if miss:
                raise CLIError(f"direction {d!r} lacks measured parameters {miss[:3]}")
        a = job["names"][0]
        if len(job["names"]) == 1:
            u = dirs[a]
            un = float(tree.norm(u))
            if not un > 0:
                raise CLIError(f"direction {a!r} is zero at step {step}")
            from landscape.planes import Plane

            plane = Plane("updates", {k: -v / un for k, v in u.items()}, None, center=pts[step],
                          x_label=f"α: step along −{a} (distance)", y_label=None, step=step,
                          config={"directions": [a], "scale": "unit", "norms": [un]})
            half, _ = _updates_range(job["run"], step, [a], "unit", [un])
            grid = lin if lin is not None else np.linspace(-half, half, n)
            name = f"updates@{step}:{a}"
        else:
            b = job["names"][1]
            plane = update_plane(dirs[a], dirs[b], names=(a, b), scale=job["scale"], center=pts[step], step=step)
            trained = job.get("trained")
            if trained and trained in dirs and trained not in (a, b):
                ut, tn = tree.normalize(dirs[trained])
                coords, _ = plane.project([{k: pts[step][k] - ut[k] for k in names}])
                plane.markers[trained] = [float(c) for c in coords[0]]
            ha, hb = _updates_range(job["run"], step, [a, b], job["scale"], plane.config["norms"])
            grid = (lin, lin) if lin is not None else (np.linspace(-ha, ha, n), np.linspace(-hb, hb, n))
            name = f"updates@{step}:{a},{b}"
    elif kind == "random":
        plane = random_plane(pts[center], seed=job["seed"], biases=job["biases"], step=center)
        others = job["order"]
        if len(others) > 1:
            plane = plane.with_trajectory([pts[s] for s in others], steps=others, labels=[labels[s] for s in others],
                                          objective=probe)
        grid = lin if lin is not None else n
        name = f"random@{center}:seed{job['seed']}" + (f",{job['biases']}" if job["biases"] != "zero" else "")
    elif kind == "pca":
        plane = pca_plane([pts[s] for s in chosen], names=names, steps=chosen, labels=[labels[s] for s in chosen],
                          objective=probe)
        if lin is not None:
            grid = lin
        else:
            ga, gb = plane.grid
            grid = (np.linspace(ga[0], ga[-1], n), np.linspace(gb[0], gb[-1], n))
        name = f"pca:{chosen[0]}-{chosen[-1]}"
    else:
        s0, s1 = chosen
        plane = interpolation(pts[s0], pts[s1], names=names, labels=(labels[s0], labels[s1]), steps=(s0, s1))
        order = job["order"]
        plane = plane.with_trajectory([pts[s] for s in order], steps=order, labels=[labels[s] for s in order],
                                      objective=probe)
        grid = lin if lin is not None else np.linspace(-0.5, 1.5, n)
        name = f"interpolate:{s0}-{s1}"
    objectives = {"probe": probe}
    if plane.dims == 1 and train_batches > 0 and sp.train_batches is not None:
        group = list(itertools.islice(iter(sp.train_batches), train_batches))
        if group:
            try:
                objectives["train"] = Objective(model, sp.loss_fn, MicroBatches(group, weights=[1.0] * len(group)),
                                                mode=job["mode"])
            except Exception as e:
                raise SpecError(f"{sp.source}: loss_fn(model, train_batch) failed: {type(e).__name__}: {e}") from None
    job["objectives"] = objectives
    return plane, grid, name
