"""``landscape race``: the convergence experiment of the seeds, as one command.

Seed 002 (Fig. 6) trains the same transformer with each optimizer and its clipped variant and finds
that the clipped ones train faster; Crawshaw et al. 2022, (Table 1, Figs. 4-5) compares final losses with 95%
confidence intervals over 5 seeds, each optimizer at its best learning rate from a grid search. This
module runs that experiment on the user's own model::

    $ landscape race --spec myproject.spec:build --recipes sgd,sgd_clip,adam,adam_clip \\
          --steps 500 --lr-grid sgd=0.1,0.3,1 --lr-grid adam=3e-4,1e-3,3e-3 --seeds 0,1,2 --out runs/race
    $ landscape plot runs/race          # race_train_loss (Fig. 6), race_probe_loss, race_lr_sweep
    $ landscape report runs/race        # final losses ± 95% CI and the chosen learning rates

What it does, for the spec of ``landscape analyze`` (:func:`landscape.analyze.load_spec`: the model,
the loss, the probe batch and the training batches):

1. For each seed, torch's RNG is seeded and the spec function called, so the model's initialisation
   belongs to the seed; that initial state is kept and every training run of the seed starts from it.
2. Every run of a seed re-seeds torch's RNG and takes the spec's ``train_batches`` in order
   (restarting the iterable when it runs out), so every recipe sees **the same batches** (checked:
   the batches' fingerprints must agree between the runs of a seed, else the race stops with the
   cause) and the same dropout masks. The optimizer is :class:`landscape.optim.RecipeOptimizer`,
   ``x ← x − η·u`` with ``u`` the recipe's update.
3. On the first seed, each recipe trains at every learning rate of its grid; the chosen rate has the
   lowest *score*: the probe-batch loss after the last step (``select="probe"``, the default), or the
   mean training loss over the last 10% of the steps (``select="train"``). A run whose loss becomes
   non-finite stops and scores +inf. A chosen rate at the edge of its grid is flagged (widen the grid).
4. The other seeds train each recipe at its chosen rate only.

Every run is committed to the run store in one transaction when it finishes (tables ``race_runs``
and ``race_curves``), so a killed race resumes at the run it was in: re-running the same command
skips the finished runs, and adding seeds, recipes or learning rates to a finished race trains only
what is new.
"""

from __future__ import annotations

import copy
import hashlib
import math
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from landscape._version import __version__
from landscape.analyze import Spec, SpecError, _Batches, _LazyStore, _model_signature, as_spec, load_spec
from landscape.optim import RecipeOptimizer, recipe_names
from landscape.probe import batch_fingerprint
from landscape.store import DB_NAME, Run, RunStore

__all__ = [
    "DEFAULT_RACE_RECIPES",
    "RaceError",
    "RaceResult",
    "choose_learning_rates",
    "default_lr_grid",
    "parse_lr_grid",
    "race",
    "race_report",
    "race_summary",
    "t_interval",
]

#: The recipes of Pan & Li 2023, Fig. 6's comparison: each optimizer and its clipped variant.
DEFAULT_RACE_RECIPES = ("sgd", "sgd_clip", "adam", "adam_clip")

#: Default grids by the scale of a recipe's update: the gradient's (SGD with momentum as an EMA, so
#: η = 1 is ``torch.optim.SGD(lr=0.1, momentum=0.9)``), about one per coordinate (Adam, sign methods,
#: Adafactor, Lion, normalised SGD), or one for the whole model (smoothed NormSGD).
_GRADIENT_SCALE = ("sgd", "sgd_clip")
_MODEL_SCALE = ("smoothed_normsgd",)
_GRIDS = {"gradient": (0.1, 0.3, 1.0, 3.0), "coordinate": (3e-4, 1e-3, 3e-3, 1e-2), "model": (0.1, 0.3, 1.0, 3.0)}

SELECT = ("probe", "train")

#: ``progress(completed_steps, total_steps, description)``.
ProgressFn = Callable[[int, int, str], None]


class RaceError(ValueError):
    """A race cannot run as asked (bad recipes, grids or seeds; batches that differ between runs)."""


def default_lr_grid(recipe: str) -> list[float]:
    """The default learning-rate grid of ``recipe``, by the scale of its update (see the module
    docstring); pass your own with ``lr_grid`` / ``--lr-grid``."""
    kind = "gradient" if recipe in _GRADIENT_SCALE else "model" if recipe in _MODEL_SCALE else "coordinate"
    return list(_GRIDS[kind])


def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise RaceError(f"{what}: {text!r} is not a comma-separated list of numbers") from None
    bad = [v for v in values if not (math.isfinite(v) and v > 0)]
    if not values or bad:
        raise RaceError(f"{what}: learning rates must be positive numbers, got {text!r}")
    return sorted(set(values))


def parse_lr_grid(specs: Sequence[str] | None, recipes: Sequence[str]) -> dict[str, list[float]]:
    """The grid of every recipe from ``--lr-grid`` texts: ``"1e-3,3e-3"`` sets every recipe's grid,
    ``"adam=1e-4,3e-4"`` one recipe's (later texts win); recipes not named keep :func:`default_lr_grid`.

    Raises:
        RaceError: a malformed list, a non-positive rate, or a recipe that is not racing.
    """
    grid = {r: default_lr_grid(r) for r in recipes}
    for text in specs or []:
        name, eq, values = text.partition("=")
        if not eq:
            for r in recipes:
                grid[r] = _floats(text, "--lr-grid")
            continue
        name = name.strip()
        if name not in grid:
            raise RaceError(f"--lr-grid {text!r}: {name!r} is not one of the racing recipes ({', '.join(recipes)})")
        grid[name] = _floats(values, f"--lr-grid {name}")
    return grid


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t confidence interval of the mean (Crawshaw et al. 2022, Table 1 and
    Figs. 4-5: 95% over 5 seeds): ``t_{(1+c)/2, n−1} · s/√n`` with ``s`` the sample standard deviation;
    the half-width is ``nan`` for fewer than two values."""
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size < 2:
        return float(x.mean()), float("nan")
    from scipy.stats import t

    return float(x.mean()), float(t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))


@dataclass
class RaceResult:
    """What :func:`race` did.

    Attributes:
        out: the run folder.
        chosen: ``{recipe: learning rate}`` chosen on the first seed.
        trained: ``(recipe, lr, seed)`` of the runs trained by this call.
        already: the runs a previous call had finished (resume).
        diverged: the runs (of this call or earlier) whose loss became non-finite.
    """

    out: Path
    chosen: dict[str, float] = field(default_factory=dict)
    trained: list[tuple[str, float, int]] = field(default_factory=list)
    already: list[tuple[str, float, int]] = field(default_factory=list)
    diverged: list[tuple[str, float, int]] = field(default_factory=list)


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


class _Trainer:
    """Training runs of one seed: the spec built under that seed, its initial state, its batches."""

    def __init__(self, spec: Spec, seed: int, init_state: Mapping[str, Any] | None = None) -> None:
        self.spec = spec
        self.seed = seed
        self.init_state = init_state if init_state is not None else copy.deepcopy(spec.model.state_dict())
        self.fingerprints: list[str] | None = None  # of the batches the first run of this seed took

    def _probe_loss(self) -> float:
        model = self.spec.model
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                return float(self.spec.loss_fn(model, self.spec.probe_batch))
        finally:
            model.train(was)

    def train(self, recipe: str, lr: float, steps: int, probe_every: int, select: str,
              tick: Callable[[float], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        model = self.spec.model
        model.load_state_dict(self.init_state)
        params = [p for p in model.parameters() if p.requires_grad]
        curves: list[dict[str, Any]] = []
        train_losses: list[float] = []
        prints: list[str] = []
        status = "done"
        t0 = time.perf_counter()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        was = model.training
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            batches = _Batches(self.spec.train_batches)
            opt = RecipeOptimizer(params, recipe, lr=lr)
            curves.append({"step": 0, "train_loss": None, "probe_loss": self._probe_loss()})
            model.train()
            try:
                for step in range(1, steps + 1):
                    (batch,) = batches.take(1)
                    prints.append(batch_fingerprint(batch))
                    if self.fingerprints is not None and (len(self.fingerprints) < step
                                                          or self.fingerprints[step - 1] != prints[-1]):
                        raise RaceError(
                            f"{self.spec.source}: train_batches gave batch {step} of seed {self.seed} differently to "
                            f"{recipe} (lr {lr:g}) than to the first run of that seed, so the recipes would not race on "
                            "the same batches. Return a list of batches, or a DataLoader that shuffles with torch's "
                            "global RNG (no generator= of its own)"
                        )
                    loss = self.spec.loss_fn(model, batch)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        status = "diverged"
                        curves.append({"step": step, "train_loss": value, "probe_loss": None})
                        break
                    loss.backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    train_losses.append(value)
                    row = {"step": step, "train_loss": value, "probe_loss": None}
                    if step % probe_every == 0 or step == steps:
                        row["probe_loss"] = self._probe_loss()
                        if not math.isfinite(row["probe_loss"]):
                            status = "diverged"
                            curves.append(row)
                            break
                    curves.append(row)
                    tick(value)
            finally:
                opt.zero_grad(set_to_none=True)
                model.train(was)
        if self.fingerprints is None and status == "done":
            self.fingerprints = prints
        tail = train_losses[-max(1, steps // 10):] if status == "done" else []
        final_train = float(np.mean(tail)) if tail else float("nan")
        final_probe = curves[-1]["probe_loss"] if status == "done" else float("nan")
        score = (final_probe if select == "probe" else final_train) if status == "done" else float("inf")
        run_row = {
            "recipe": recipe, "lr": lr, "seed": self.seed, "status": status, "steps": len(train_losses),
            "final_train_loss": final_train, "final_probe_loss": final_probe,
            "score": score if math.isfinite(score) else float("inf"), "seconds": time.perf_counter() - t0,
        }
        digest = hashlib.sha256("".join(prints).encode()).hexdigest()[:16]
        for r in curves:
            r.update(recipe=recipe, lr=lr, seed=self.seed)
        return curves, {**run_row, "_batches": digest}


def choose_learning_rates(rows: Iterable[Mapping[str, Any]], seed: int) -> dict[str, dict[str, Any]]:
    """Each recipe's chosen learning rate from ``race_runs`` rows of ``seed``: the lowest score (ties:
    the smaller rate).

    Returns:
        ``{recipe: {"lr", "score", "grid": [...], "at_edge": bool, "diverged": [lrs]}}``; ``lr`` is
        ``None`` when every rate diverged.
    """
    by_recipe: dict[str, list[Mapping[str, Any]]] = {}
    for r in rows:
        if r["seed"] == seed:
            by_recipe.setdefault(r["recipe"], []).append(r)
    out: dict[str, dict[str, Any]] = {}
    for recipe, rs in by_recipe.items():
        rs = sorted(rs, key=lambda r: r["lr"])
        grid = [r["lr"] for r in rs]
        ok = [r for r in rs if r["status"] == "done" and _finite(r["score"])]
        best = min(ok, key=lambda r: (r["score"], r["lr"])) if ok else None
        out[recipe] = {
            "lr": best["lr"] if best else None,
            "score": best["score"] if best else float("inf"),
            "grid": grid,
            "at_edge": bool(best) and len(grid) > 1 and best["lr"] in (grid[0], grid[-1]),
            "diverged": [r["lr"] for r in rs if r["status"] != "done"],
        }
    return out


def _build(spec: Any, seed: int) -> Spec:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(spec, str):
            return load_spec(spec)
        if callable(spec) and not isinstance(spec, torch.nn.Module):
            name = f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', 'spec')}"
            try:
                value = spec()
            except Exception as e:
                raise SpecError(f"spec function {name} raised {type(e).__name__}: {e}") from None
            return as_spec(value, name)
        return as_spec(spec, getattr(spec, "source", "spec"))


def race(
    spec: str | Callable[[], Any] | Spec,
    out: str | Path,
    *,
    recipes: Sequence[str] = DEFAULT_RACE_RECIPES,
    steps: int = 200,
    lr_grid: Mapping[str, Sequence[float]] | Sequence[float] | None = None,
    seeds: Sequence[int] = (0,),
    probe_every: int = 10,
    select: str = "probe",
    progress: ProgressFn | None = None,
    meta: Mapping[str, Any] | None = None,
) -> RaceResult:
    """Race ``recipes`` on the spec's model: each at its best learning rate from its grid (chosen on the
    first seed), from the same initialisation and on the same batches, over several seeds (see the
    module docstring).

    Args:
        spec: ``"module:function"`` (or ``"path/file.py:function"``), a function returning what a spec
            returns (called once per seed, under that seed), or a :class:`~landscape.analyze.Spec`
            (one initialisation: the seeds then vary only the batch order and dropout). It must give
            ``train_batches``.
        out: the run folder (resumed when it holds a race with the same settings).
        recipes: recipe names (``landscape recipes``).
        steps: optimizer steps per run.
        lr_grid: one grid for every recipe, or ``{recipe: grid}`` (others keep
            :func:`default_lr_grid`).
        seeds: the seeds; the first one tunes the learning rates.
        probe_every: the probe-batch loss is recorded every this many steps (and after the last).
        select: ``"probe"`` (final probe-batch loss) or ``"train"`` (mean training loss over the last
            10% of the steps) chooses the learning rate.
        progress: ``progress(completed_steps, total_steps, description)``.
        meta: more run metadata.

    Returns:
        A :class:`RaceResult`.

    Raises:
        SpecError, RaceError: bad input, in one line.
        landscape.store.RunMismatchError: ``out`` holds a run made with other settings.

    Example:
        >>> res = race("landscape.demo_race:build", "runs/race", steps=100, seeds=[0, 1])   # doctest: +SKIP
        >>> res.chosen                                                                     # doctest: +SKIP
        {'sgd': 1.0, 'sgd_clip': 3.0, 'adam': 0.003, 'adam_clip': 0.003}
    """
    recipes = list(recipes)
    unknown = [r for r in recipes if r not in recipe_names()]
    if unknown or not recipes:
        raise RaceError(f"unknown recipes {unknown}; available: {', '.join(recipe_names())}")
    if len(set(recipes)) != len(recipes):
        raise RaceError(f"recipes must be distinct, got {recipes}")
    for name, value in (("steps", steps), ("probe_every", probe_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RaceError(f"{name} must be a positive integer, got {value!r}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds) or any(s < 0 for s in seeds):
        raise RaceError(f"seeds must be distinct non-negative integers, got {seeds}")
    if select not in SELECT:
        raise RaceError(f"select must be one of {SELECT}, got {select!r}")
    if lr_grid is None:
        grid = {r: default_lr_grid(r) for r in recipes}
    elif isinstance(lr_grid, Mapping):
        extra = [k for k in lr_grid if k not in recipes]
        if extra:
            raise RaceError(f"lr_grid names recipes that are not racing: {extra}")
        grid = {r: _floats(",".join(map(str, lr_grid.get(r, default_lr_grid(r)))), f"lr_grid[{r!r}]") for r in recipes}
    else:
        grid = {r: _floats(",".join(map(str, lr_grid)), "lr_grid") for r in recipes}

    first = _build(spec, seeds[0])
    if first.train_batches is None:
        raise SpecError(f"{first.source}: a race trains, so the spec must return train_batches (the 4th value)")
    source = first.source
    fingerprint = batch_fingerprint(first.probe_batch)
    settings = {
        "kind": "race", "spec": source, "steps": steps, "probe_every": probe_every, "select": select,
        "tune_seed": seeds[0], "model": _model_signature(first.model), "probe_batch": fingerprint,
    }
    model = first.model
    run_meta = {
        "model": {"class": type(model).__name__, "n_params": sum(p.numel() for p in model.parameters()),
                  "n_measured": sum(p.numel() for p in model.parameters() if p.requires_grad)},
        "recipes": recipes,
        "race": {"recipes": recipes, "lr_grid": grid, "seeds": seeds},
        "versions": {"landscape": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
        **dict(meta or {}),
    }
    result = RaceResult(out=Path(out))
    store: RunStore | _LazyStore
    if (Path(out) / DB_NAME).is_file():
        store = RunStore(out, settings=settings, meta=run_meta)
        existing = store.run().rows("race_runs")
    else:
        store = _LazyStore(Path(out), settings, run_meta)
        existing = []
    done = {(r["recipe"], r["lr"], r["seed"]): r for r in existing}
    digests: dict[int, str] = {}  # seed -> the batch digest its runs share (this call)

    tune = [(r, lr, seeds[0]) for r in recipes for lr in grid[r]]
    n_todo = sum(1 for k in tune if k not in done)
    chosen_now = choose_learning_rates(done.values(), seeds[0])
    n_todo += sum(1 for s in seeds[1:] for r in recipes
                  if r not in chosen_now or (r, chosen_now[r]["lr"], s) not in done)  # an upper bound
    total = max(1, n_todo * steps)
    completed = [0]

    def run_one(trainer: _Trainer, recipe: str, lr: float) -> None:
        key = (recipe, lr, trainer.seed)
        if key in done:
            result.already.append(key)
            return
        label = f"{recipe} lr={lr:g} seed={trainer.seed}"
        base = completed[0]

        def tick(loss: float) -> None:
            completed[0] += 1
            if progress is not None:
                progress(completed[0], total, f"{label} loss {loss:.3f}")

        curves, row = trainer.train(recipe, lr, steps, probe_every, select, tick)
        completed[0] = base + steps
        digest = row.pop("_batches")
        if row["status"] == "done":
            if digests.setdefault(trainer.seed, digest) != digest:
                raise RaceError(f"{source}: train_batches gave different batches to the runs of seed {trainer.seed}")
        with store.transaction():
            store.write("race_curves", curves)
            store.write("race_runs", row)
        done[key] = row
        result.trained.append(key)

    tuner = _Trainer(first, seeds[0])
    try:
        if done:
            store.log_event(None, "resume", f"race: {len(done)} training run(s) already finished")
        trainers = {seeds[0]: tuner}
        for recipe in recipes:
            for lr in grid[recipe]:
                run_one(trainers[seeds[0]], recipe, lr)
        chosen = choose_learning_rates(done.values(), seeds[0])
        for seed in seeds[1:]:
            spec_s = _build(spec, seed) if not isinstance(spec, Spec) else first
            if batch_fingerprint(spec_s.probe_batch) != fingerprint:
                raise RaceError(
                    f"{source}: the probe batch of seed {seed} differs from seed {seeds[0]}'s (it is drawn from "
                    "torch's global RNG?), so the probe losses of the seeds would not compare: build it with its "
                    "own torch.Generator"
                )
            trainer = _Trainer(spec_s, seed, tuner.init_state if spec_s is first else None)
            for recipe in recipes:
                lr = chosen[recipe]["lr"]
                if lr is not None:
                    run_one(trainer, recipe, lr)
        if progress is not None:
            progress(total, total, "done")
    finally:
        first.model.load_state_dict(tuner.init_state)  # the spec's model as it was given
        store.close()
    result.chosen = {r: c["lr"] for r, c in choose_learning_rates(done.values(), seeds[0]).items() if r in recipes}
    result.diverged = [k for k, r in done.items() if r["status"] != "done"]
    return result


# ------------------------------------------------------------------------------------------ reading


def race_summary(run: Run) -> list[dict[str, Any]]:
    """Per recipe (in the race's order): the chosen learning rate, its grid and whether it is at the
    grid's edge, the diverged rates, and the final training and probe losses at the chosen rate over
    the seeds (mean and 95% Student-t half-width, Crawshaw et al. 2022, Table 1)."""
    rows = run.rows("race_runs")
    if not rows:
        return []
    tune_seed = int(run.settings.get("tune_seed", min(r["seed"] for r in rows)))
    chosen = choose_learning_rates(rows, tune_seed)
    order = list((run.meta.get("race") or {}).get("recipes") or [])
    order += [r for r in chosen if r not in order]
    out = []
    for recipe in order:
        if recipe not in chosen:
            continue
        c = chosen[recipe]
        at = [r for r in rows if r["recipe"] == recipe and r["lr"] == c["lr"] and r["status"] == "done"]
        train_mean, train_ci = t_interval([r["final_train_loss"] for r in at])
        probe_mean, probe_ci = t_interval([r["final_probe_loss"] for r in at])
        out.append({
            "recipe": recipe, "lr": c["lr"], "grid": c["grid"], "at_edge": c["at_edge"], "diverged": c["diverged"],
            "n_seeds": len(at), "seeds": sorted(r["seed"] for r in at),
            "final_train_loss": train_mean, "final_train_ci": train_ci,
            "final_probe_loss": probe_mean, "final_probe_ci": probe_ci,
        })
    return out


def _num(x: Any, digits: int = 4) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


def _pm(mean: float, ci: float, tex: bool = False) -> str:
    if math.isnan(mean):
        return "–"
    if math.isnan(ci):
        return _num(mean)
    return f"{_num(mean)} $\\pm$ {_num(ci, 2)}" if tex else f"{_num(mean)} ± {_num(ci, 2)}"


def race_report(run: Run, fmt: str = "md") -> str:
    """The race's tables: the final losses at each recipe's chosen learning rate (mean ± 95% CI over the
    seeds) and the learning-rate sweep of the first seed. ``fmt``: ``"md"``, ``"latex"`` or ``"csv"``
    (tidy: one row per training run)."""
    from landscape.report import tex_escape

    summary = race_summary(run)
    rows = run.rows("race_runs")
    s = run.settings
    crit = ("probe-batch loss after the last step" if s.get("select") == "probe"
            else "mean training loss over the last 10% of the steps")
    if fmt == "csv":
        import csv
        import io

        chosen = {r["recipe"]: r["lr"] for r in summary}
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        cols = ["recipe", "lr", "seed", "status", "steps", "final_train_loss", "final_probe_loss", "score", "chosen"]
        w.writerow(cols)
        for r in rows:
            w.writerow([*(("" if isinstance(r[c], float) and math.isnan(r[c]) else r[c]) for c in cols[:-1]),
                        int(chosen.get(r["recipe"]) == r["lr"])])
        return buf.getvalue()
    n_seeds = max((r["n_seeds"] for r in summary), default=0)
    head = ["recipe", "learning rate", "final training loss", "final probe loss", "seeds"]
    body = [[r["recipe"], _num(r["lr"]) + (" ⚠" if r["at_edge"] else ""),
             _pm(r["final_train_loss"], r["final_train_ci"], fmt == "latex"),
             _pm(r["final_probe_loss"], r["final_probe_ci"], fmt == "latex"), str(r["n_seeds"])] for r in summary]
    tune = int(s.get("tune_seed", 0))
    sweep_head = ["recipe", "learning rate", "status", "final training loss", "final probe loss"]
    rank = {r["recipe"]: i for i, r in enumerate(summary)}
    sweep = [[r["recipe"], _num(r["lr"]), r["status"], _num(r["final_train_loss"]), _num(r["final_probe_loss"])]
             for r in sorted(rows, key=lambda r: (rank.get(r["recipe"], len(rank)), r["lr"])) if r["seed"] == tune]
    notes = [
        f"{s.get('steps')} steps per run; each recipe's learning rate is the one of its grid with the lowest {crit} "
        f"on seed {tune}; the other seeds train at that rate. Final training loss: the mean over the last 10% of "
        "the steps. ± is the half-width of the 95% Student-t interval of the mean over the seeds (Crawshaw et al. 2022, Table 1)"
        + (", shown from two seeds on" if n_seeds < 2 else "") + ".",
    ]
    edges = [r["recipe"] for r in summary if r["at_edge"]]
    if edges:
        notes.append(f"⚠ chosen at the edge of its grid ({', '.join(edges)}): a wider grid may find a better rate.")
    diverged = [f"{r['recipe']} at {', '.join(_num(x) for x in r['diverged'])}" for r in summary if r["diverged"]]
    if diverged:
        notes.append(f"Diverged (non-finite loss): {'; '.join(diverged)}.")
    if fmt == "md":
        out = [f"# landscape race: `{run.path.name}`", "", f"spec `{s.get('spec')}`, "
               f"{run.meta.get('model', {}).get('n_params', '?')} parameters", "",
               "## Final losses at each recipe's chosen learning rate (Pan & Li 2023, Fig. 6, Crawshaw et al. 2022, Table 1)", ""]
        out += _md(head, body) + [""] + notes
        out += ["", f"## Learning-rate sweep (seed {tune})", ""] + _md(sweep_head, sweep)
        return "\n".join(out) + "\n"
    if fmt == "latex":
        def tex(cells: list[str]) -> str:
            return " & ".join(c if "$" in c else tex_escape(c).replace("⚠", r"$^\dagger$") for c in cells) + r" \\"

        out = [r"\begin{table}[t]", r"\centering", r"\caption{Optimizer race: final losses at each recipe's chosen "
               r"learning rate (mean $\pm$ 95\% CI over the seeds).}", r"\begin{tabular}{lrrrr}", r"\toprule",
               tex(head), r"\midrule", *[tex(b) for b in body], r"\bottomrule", r"\end{tabular}",
               *[f"% {n}".replace("\n", " ") for n in notes], r"\end{table}", "",
               r"\begin{table}[t]", r"\centering", f"\\caption{{Learning-rate sweep (seed {tune}).}}",
               r"\begin{tabular}{lrlrr}", r"\toprule", tex(sweep_head), r"\midrule", *[tex(b) for b in sweep],
               r"\bottomrule", r"\end{tabular}", r"\end{table}"]
        return "\n".join(out) + "\n"
    raise ValueError(f"fmt must be one of md, latex, csv, got {fmt!r}")


def _md(head: list[str], body: list[list[str]]) -> list[str]:
    def cell(c: str) -> str:
        return " ".join(str(c).split()).replace("|", "\\|")

    return ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
            *["| " + " | ".join(cell(c) for c in row) + " |" for row in body]]
