"""``landscape analyze``: the probe's measurements, after the fact, over saved checkpoints.

A *spec* function tells landscape how to rebuild the measured function::

    # myproject/landscape_spec.py
    def build():
        model = MyModel(**config)                        # any architecture; weights are overwritten
        loss_fn = lambda m, batch: F.cross_entropy(m(batch[0]), batch[1])
        probe_batch = next(iter(probe_loader))           # fixed batch every measurement uses
        train_batches = train_loader                     # optional: gradients for the recipes
        return model, loss_fn, probe_batch, train_batches

    $ landscape analyze --spec myproject.landscape_spec:build runs/ckpts/ --out runs/analysis

What happens, for the checkpoints ``x_0, x_1, ..., x_n`` in training order (see
:func:`landscape.checkpoints.order_checkpoints`):

1. Checkpoint ``k`` is loaded into the model (weights checked: names, shapes, finiteness).
2. Its gradient ``g_k`` is computed: the mean loss of the next ``grad_batches`` batches of the
   spec's ``train_batches`` (taken in order, restarting the iterable when it runs out), or, without
   ``train_batches``, the probe batch. ``g_k`` is fed to every pseudo-update recipe, exactly as the
   probe feeds the real training gradient (Pan & Li 2023, App. B.3).
3. Every ``every``-th checkpoint (the first included) is measured by
   :func:`landscape.measure.measure_step`, as the probe measures: the sharpness and landscape line of
   every recipe's direction and of the real step between checkpoints ``x_k − x_{k+1}`` (the
   direction ``"checkpoint step"``), histograms, cosines, and the local smoothness along
   ``d = x_{k+1} − x_k``. The last checkpoint has no next one: no real direction, no smoothness.
4. Rows go into the same run store as the probe's, under the checkpoint's step, so
   ``landscape plot`` and ``landscape report`` work unchanged.

Sparse checkpoints: the recipes' momenta are then built from one gradient per checkpoint, not one
per training step, so they *approximate* the states the probe would have seen. docs/analyze.md
measures how much this matters on the tiny reference LM.

Step numbers: a checkpoint saved after ``t`` optimizer steps holds ``x_t``; it is measured under
step ``t``. The probe measures the same point under step ``t + 1`` (it numbers the step about to
be taken).

Resume: re-running the same command skips the checkpoints already measured (the store's rows
are committed one measurement at a time, so a run that fails half way keeps what it measured).
The recipes' states are rebuilt by re-observing the gradients of the earlier checkpoints (a
gradient each, no measurement), so a resumed run measures exactly what an uninterrupted one would.
Torch's global RNG is seeded with ``settings.seed`` for the duration of the call (and restored):
a shuffling ``DataLoader`` as ``train_batches`` gives the same batches on every run.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from landscape import tree
from landscape._version import __version__
from landscape.checkpoints import (
    CheckpointError,
    describe_checkpoint,
    find_checkpoints,
    fit_state_dict,
    load_checkpoint,
    order_checkpoints,
)
from landscape.measure import MeasureSettings, measure_step
from landscape.objective import MicroBatches, NonFiniteError, Objective
from landscape.optim import PseudoUpdates, recipe_names
from landscape.probe import batch_fingerprint
from landscape.store import DB_NAME, LOCK_NAME, RunStore, WriterLock

__all__ = ["AnalyzeResult", "REAL_DIRECTION", "Spec", "SpecError", "analyze", "as_spec", "load_spec"]

#: Name of the real step between consecutive checkpoints, ``x_k − x_{k+1}``.
REAL_DIRECTION = "checkpoint step"
SPEC_KEYS = ("model", "loss_fn", "probe_batch", "train_batches")
_SPEC_SHAPE = "(model, loss_fn, probe_batch[, train_batches]) or a dict with those keys"

#: ``progress(completed, total, description)``.
ProgressFn = Callable[[int, int, str], None]


class SpecError(ValueError):
    """The spec cannot be used: it does not import, raises, or returns the wrong thing."""


@dataclass
class Spec:
    """What a spec function returns.

    Attributes:
        model: the model (an ``nn.Module``); its weights are replaced by each checkpoint's.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``.
        probe_batch: the fixed batch (or list of micro-batches) every measurement uses.
        train_batches: optional iterable of training batches whose gradients drive the recipes
            (a list, a ``DataLoader``...). Without it the probe batch's gradient is used.
        source: where the spec came from (``module:function``), for messages and metadata.
    """

    model: nn.Module
    loss_fn: Callable[[nn.Module, Any], Tensor]
    probe_batch: Any
    train_batches: Iterable[Any] | None = None
    source: str = "spec"


def as_spec(value: Any, source: str = "spec") -> Spec:
    """Validate what a spec function returned: a :class:`Spec`, a tuple ``(model, loss_fn,
    probe_batch[, train_batches])`` or a dict with those keys.

    Raises:
        SpecError: naming what is wrong.
    """
    if isinstance(value, Spec):
        parts = {k: getattr(value, k) for k in SPEC_KEYS}
    elif isinstance(value, Mapping):
        unknown = [str(k) for k in value if k not in SPEC_KEYS]
        missing = [k for k in SPEC_KEYS[:3] if k not in value]
        if unknown or missing:
            what = "; ".join(
                p for p in (f"missing keys {missing}" if missing else "", f"unknown keys {unknown}" if unknown else "") if p
            )
            raise SpecError(f"{source} returned a dict with {what}: expected keys {list(SPEC_KEYS)} (train_batches optional)")
        parts = {k: value.get(k) for k in SPEC_KEYS}
    elif isinstance(value, (tuple, list)) and len(value) in (3, 4):
        parts = dict(zip(SPEC_KEYS, value))
        parts.setdefault("train_batches", None)
    else:
        got = f"a {type(value).__name__} of length {len(value)}" if isinstance(value, (tuple, list)) else f"a {type(value).__name__}"
        raise SpecError(f"{source} must return {_SPEC_SHAPE}; it returned {got}")
    if not isinstance(parts["model"], nn.Module):
        raise SpecError(f"{source}: the model must be a torch.nn.Module, got {type(parts['model']).__name__}")
    if not callable(parts["loss_fn"]):
        raise SpecError(f"{source}: loss_fn must be callable as loss_fn(model, batch), got {type(parts['loss_fn']).__name__}")
    tb = parts["train_batches"]
    if tb is not None and (isinstance(tb, (str, bytes, Mapping, Tensor)) or not isinstance(tb, Iterable)):
        raise SpecError(
            f"{source}: train_batches must be an iterable of batches (a list or a DataLoader), got {type(tb).__name__}"
        )
    if not any(p.requires_grad for p in parts["model"].parameters()):
        raise SpecError(f"{source}: the model has no parameters with requires_grad=True")
    return Spec(parts["model"], parts["loss_fn"], parts["probe_batch"], tb, source)


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _import(module: str) -> Any:
    if module.endswith(".py") or os.sep in module or "/" in module:
        path = Path(module)
        if not path.is_file():
            raise SpecError(f"spec file not found: {path}")
        name = f"_landscape_spec_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]}_{path.stem}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise SpecError(f"cannot import spec file {path}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        try:
            spec.loader.exec_module(mod)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        return mod
    return importlib.import_module(module)


def load_spec(ref: str) -> Spec:
    """Import ``package.module:function`` (or ``path/to/file.py:function``), call it, validate it.

    The current folder is importable while the module is imported and the function runs.

    Raises:
        SpecError: a malformed reference, a module that does not import, a missing or failing
            function, or a return value of the wrong shape.
    """
    if not isinstance(ref, str) or ":" not in ref or ref.startswith(":") or ref.endswith(":"):
        raise SpecError(f"--spec must look like 'package.module:function' (or 'path/to/file.py:function'), got {ref!r}")
    module, func_name = ref.rsplit(":", 1)
    with _cwd_on_path():
        try:
            mod = _import(module)
        except SpecError:
            raise
        except ModuleNotFoundError as e:
            if e.name and (module == e.name or module.startswith(e.name + ".")):
                raise SpecError(
                    f"cannot import spec module {module!r}: no module named {e.name!r} (run from the folder that "
                    "contains it, or install it)"
                ) from None
            raise SpecError(f"spec module {module!r} failed to import: ModuleNotFoundError: {e}") from None
        except (Exception, SystemExit) as e:
            raise SpecError(f"spec module {module!r} failed to import: {type(e).__name__}: {e}") from None
        func = getattr(mod, func_name, None)
        if func is None:
            raise SpecError(f"spec module {module!r} has no function {func_name!r}")
        if not callable(func):
            raise SpecError(f"{ref} is a {type(func).__name__}, not a function")
        try:
            value = func()
        except (Exception, SystemExit) as e:
            raise SpecError(f"spec function {ref} raised {type(e).__name__}: {e}") from None
    return as_spec(value, ref)


@dataclass
class AnalyzeResult:
    """What :func:`analyze` did.

    Attributes:
        out: the run folder.
        checkpoints: ``[(step, path)]`` in the order used.
        measured: steps measured by this call.
        already: steps skipped because an earlier run measured them (resume).
        failed: ``{step: reason}`` for measurements that failed (non-finite loss...) or gradients
            that were not finite (the checkpoint was then not fed to the recipes).
        engine: the sharpness engine of the last measurement (``"taylor"`` or ``"hvp"``).
    """

    out: Path
    checkpoints: list[tuple[int, Path]] = field(default_factory=list)
    measured: list[int] = field(default_factory=list)
    already: list[int] = field(default_factory=list)
    failed: dict[int, str] = field(default_factory=dict)
    engine: str | None = None


class _Batches:
    """The spec's ``train_batches``, taken in order and restarted when exhausted."""

    def __init__(self, iterable: Iterable[Any]) -> None:
        self._iterable = iterable
        self._it: Iterator[Any] | None = None
        self.taken = 0

    def take(self, n: int) -> list[Any]:
        out = []
        while len(out) < n:
            if self._it is None:
                self._it = iter(self._iterable)
            try:
                out.append(next(self._it))
                self.taken += 1
            except StopIteration:
                self._it = None
                restarted = iter(self._iterable)
                try:
                    first = next(restarted)
                except StopIteration:
                    if self.taken == 0:
                        raise SpecError("the spec's train_batches is empty") from None
                    raise SpecError(
                        f"the spec's train_batches ran out after {self.taken} batches and cannot be restarted "
                        "(a generator?): return a list or a DataLoader"
                    ) from None
                self._it = restarted
                out.append(first)
                self.taken += 1
        return out


def _first_hyperparameters(ordered: list[tuple[int, Any]], trust: bool) -> dict[str, Any]:
    """The optimizer hyperparameters stored in the first pickle-format checkpoint, if any (the
    optimizer's class is not stored in a state_dict)."""
    first = next((c for _, c in ordered if c.format in ("pytorch", "lightning")), None)
    return load_checkpoint(first.path, trust=trust).hyperparameters if first is not None else {}


def _optimizer_meta(hyper: dict[str, Any]) -> dict[str, Any]:
    """The run's ``optimizer`` metadata: the class a checkpoint's optimizer state names by its
    parameter-group keys (a ``state_dict`` stores no class name), else ``"unknown"``."""
    from landscape._optimizer_class import optimizer_class_from_state

    name = optimizer_class_from_state(hyper) if hyper else None
    meta: dict[str, Any] = {"class": name or "unknown", "hyperparameters": hyper}
    if name:
        meta["class_source"] = "from the parameter-group keys of the checkpoint's optimizer state"
    return meta


def _model_signature(model: nn.Module) -> str:
    return hashlib.sha256("".join(f"{n}{tuple(p.shape)}{p.dtype}" for n, p in model.named_parameters()).encode()).hexdigest()[:16]


def analyze(
    spec: Spec | str,
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    every: int = 1,
    order: str = "step",
    recipes: Iterable[str] | None = None,
    settings: MeasureSettings | None = None,
    mode: str = "eval",
    grad_batches: int = 1,
    trust: bool = False,
    check_determinism: bool = True,
    progress: ProgressFn | None = None,
    meta: Mapping[str, Any] | None = None,
) -> AnalyzeResult:
    """Measure saved checkpoints as the probe measures a live run (see the module docstring).

    Args:
        spec: a :class:`Spec` (or anything :func:`as_spec` accepts), or ``"module:function"``.
        checkpoints: files, folders or glob patterns (:func:`landscape.checkpoints.find_checkpoints`).
        out: the run folder; an existing one made with the same settings is resumed.
        every: measure every this many checkpoints in order, starting with the first. Every
            checkpoint still feeds its gradient to the recipes.
        order: ``"step"``, ``"name"`` or ``"mtime"`` (:func:`landscape.checkpoints.order_checkpoints`).
        recipes: pseudo-update recipe names (default: all).
        settings: what each measurement computes.
        mode: module mode (``"eval"`` / ``"train"``) for the measurements and the gradients.
        grad_batches: training batches averaged into each checkpoint's gradient.
        trust: allow full pickles (``torch.load(weights_only=False)``): only for files you trust.
        check_determinism: refuse a probe loss that differs between two evaluations.
        progress: called as ``progress(completed, total, description)`` while working.
        meta: more run metadata.

    Returns:
        An :class:`AnalyzeResult`.

    Raises:
        SpecError, CheckpointError (:class:`ValueError` subclasses): bad input, named in one line.
        landscape.store.RunMismatchError: ``out`` holds a run made with other settings.

    Example:
        >>> res = analyze("myproject.spec:build", ["ckpts/"], "runs/analysis", every=5)  # doctest: +SKIP
        >>> res.measured                                                                   # doctest: +SKIP
        [0, 500, 1000]
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"every must be a positive integer, got {every!r}")
    if not isinstance(grad_batches, int) or isinstance(grad_batches, bool) or grad_batches < 1:
        raise ValueError(f"grad_batches must be a positive integer, got {grad_batches!r}")
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    recipe_list = list(recipes) if recipes is not None else list(recipe_names())
    unknown = [r for r in recipe_list if r not in recipe_names()]
    if unknown or not recipe_list:
        raise ValueError(f"unknown recipes {unknown}; available: {', '.join(recipe_names())}")
    st = settings or MeasureSettings()
    spec = load_spec(spec) if isinstance(spec, str) else as_spec(spec, getattr(spec, "source", "spec"))

    ordered = order_checkpoints([describe_checkpoint(p, trust=trust) for p in find_checkpoints(checkpoints)], order)
    result = AnalyzeResult(out=Path(out), checkpoints=[(s, c.path) for s, c in ordered])

    model = spec.model
    try:
        objective = Objective(model, spec.loss_fn, spec.probe_batch, mode=mode, check_determinism=check_determinism)
    except Exception as e:  # the user's loss_fn or batch
        raise SpecError(f"{spec.source}: loss_fn(model, probe_batch) failed: {type(e).__name__}: {e}") from None
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}

    grad_source = (
        {"source": "train_batches", "batches_per_checkpoint": grad_batches}
        if spec.train_batches is not None
        else {"source": "probe_batch"}
    )
    names = list(objective.names)
    run_settings = {
        "source": "checkpoints",
        "every": every,
        "order": order,
        "gradient": grad_source,
        "recipes": recipe_list,
        "mode": mode,
        "measured": names if len(names) <= 64 else hashlib.sha256("|".join(names).encode()).hexdigest()[:16],
        "probe_batch": batch_fingerprint(spec.probe_batch),
        "model": _model_signature(model),
        "trained_direction": REAL_DIRECTION,
        "state_dtype": None,
        "measure": st.as_dict(),
    }
    n_params = sum(p.numel() for p in model.parameters())
    run_meta = {
        "model": {"class": type(model).__name__, "n_params": n_params,
                  "n_measured": sum(p.numel() for n, p in model.named_parameters() if n in objective.names)},
        "optimizer": _optimizer_meta(_first_hyperparameters(ordered, trust)),
        "recipes": recipe_list,
        "trained_direction": REAL_DIRECTION,
        "versions": {"landscape": __version__, "torch": torch.__version__, "python": platform.python_version()},
        "mode": mode,
        "command": " ".join(sys.argv),
        "source": {
            "kind": "checkpoints",
            "spec": spec.source,
            "order": order,
            "gradient": grad_source,
            "checkpoints": [{"step": s, "path": str(c.path), "format": c.format} for s, c in ordered],
        },
        **dict(meta or {}),
    }

    # A new run folder is created at the first write, not now: input that turns out bad at the first
    # checkpoint (a spec that does not fit it) leaves nothing behind to refuse the corrected command.
    store: RunStore | _LazyStore
    if (Path(out) / DB_NAME).is_file():
        store = RunStore(out, settings=run_settings, meta=run_meta)
        run = store.run()
        done, have_rows = set(run.steps("sharpness")), set(run.steps("steps"))
    else:
        store = _LazyStore(Path(out), run_settings, run_meta)
        done, have_rows = set(), set()
    try:
        due = [k for k in range(len(ordered)) if k % every == 0]
        todo = [k for k in due if ordered[k][0] not in done]
        result.already = [ordered[k][0] for k in due if ordered[k][0] in done]
        if done:
            store.log_event(None, "resume", f"analyze: {len(result.already)} checkpoint(s) already measured, {len(todo)} to go")
        if not todo:
            if progress is not None:
                progress(len(ordered), len(ordered), "every checkpoint already measured")
            return result
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(st.seed)
            _run(spec, objective, trained, ordered, due, todo, store, have_rows, result, recipe_list, st,
                 grad_batches, trust, progress)
    finally:
        store.close()
    return result


class _LazyStore:
    """A :class:`RunStore` made at its first write. The folder's writer lock is taken at once (a second
    writer is still refused immediately); when nothing was ever written, :meth:`close` removes the lock
    file and the folder it made."""

    def __init__(self, path: Path, settings: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        self.path = path
        self._settings, self._meta = settings, meta
        missing = []
        p = path
        while not p.exists():
            missing.append(p)
            p = p.parent
        path.mkdir(parents=True, exist_ok=True)
        self._made = missing  # folders this call created, deepest first
        self._lock = WriterLock(path)
        try:
            self._lock.acquire()
        except BaseException:
            self._remove_made()
            raise
        self._store: RunStore | None = None
        self._t0 = time.time()

    def _get(self) -> RunStore:
        if self._store is None:
            self._store = RunStore(self.path, settings=self._settings, meta=self._meta, writer_lock=self._lock)
        return self._store

    def write(self, table: str, rows: Any) -> int:
        return self._get().write(table, rows)

    def log_event(self, step: int | None, kind: str, message: str) -> None:
        self._get().log_event(step, kind, message)

    def transaction(self) -> Any:
        return self._get().transaction()

    def elapsed(self) -> float:
        return self._store.elapsed() if self._store is not None else time.time() - self._t0

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            return
        self._lock.release()
        with contextlib.suppress(OSError):
            (self.path / LOCK_NAME).unlink()
        self._remove_made()

    def _remove_made(self) -> None:
        for folder in self._made:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty


def _run(
    spec: Spec,
    objective: Objective,
    trained: dict[str, Tensor],
    ordered: list[tuple[int, Any]],
    due: list[int],
    todo: list[int],
    store: RunStore | _LazyStore,
    have_rows: set[int],
    result: AnalyzeResult,
    recipes: list[str],
    st: MeasureSettings,
    grad_batches: int,
    trust: bool,
    progress: ProgressFn | None,
) -> None:
    model = spec.model
    names = list(objective.names)
    pseudo = PseudoUpdates({n: p.detach() for n, p in trained.items()}, recipes)
    batches = _Batches(spec.train_batches) if spec.train_batches is not None else None
    last = max(todo)
    todo_set = set(todo)
    total = last + 1
    step_rows: list[dict[str, Any]] = []

    def load(k: int) -> tuple[dict[str, Tensor], float | None]:
        step, ck = ordered[k]
        loaded = load_checkpoint(ck.path, trust=trust)
        return fit_state_dict(model, loaded.state_dict, f"checkpoint {ck.path} (step {step})"), loaded.lr

    def gradient() -> tuple[float, dict[str, Tensor]]:
        if batches is None:
            return objective.loss_and_grad()
        group = batches.take(grad_batches)
        try:
            obj = Objective(model, spec.loss_fn, MicroBatches(group, weights=[1.0] * len(group)), mode=objective.mode,
                            include=list(trained), check_determinism=False)
            return obj.loss_and_grad()
        except NonFiniteError:
            raise
        except Exception as e:  # the user's loss_fn on a training batch
            raise SpecError(f"{spec.source}: loss_fn(model, train_batch) failed: {type(e).__name__}: {e}") from None

    def flush() -> None:
        if step_rows:
            store.write("steps", step_rows)
            step_rows.clear()

    try:
        current = load(0)
        for k in range(total):
            step, ck = ordered[k]
            if progress is not None:
                progress(k, total, f"{'measuring' if k in todo_set else 'reading'} step {step}")
            state, lr = current
            with torch.no_grad():
                model.load_state_dict(state, strict=True)
            x_k = {n: p.detach().clone() for n, p in model.named_parameters() if n in objective.names}
            row: dict[str, Any] = {"step": step, "lr": lr if lr is not None else math.nan, "status": "ok", "reason": None}
            try:
                loss, g = gradient()
                row.update(loss=loss, grad_norm=float(tree.norm(g)))
                pseudo.observe({n: g[n] for n in trained})  # ValueError (nothing changed) on NaN/inf
            except (SpecError, CheckpointError):
                raise
            except (NonFiniteError, ValueError) as e:
                reason = str(e).splitlines()[0]
                row.update(status="skipped", reason=reason)
                row.setdefault("loss", math.nan)
                row.setdefault("grad_norm", math.nan)
                result.failed[step] = f"gradient: {reason}"
                store.log_event(step, "skip", f"checkpoint step {step}: gradient not used: {reason}")
            row["wall"] = store.elapsed()
            if step not in have_rows:
                step_rows.append(row)
            current = load(k + 1) if k + 1 < len(ordered) else None
            if k in todo_set and row["status"] == "ok":
                x_next = None
                if current is not None:
                    nxt = current[0]
                    x_next = {n: nxt[n].to(device=x_k[n].device, dtype=x_k[n].dtype) for n in names}
                phases = _phases(progress, k, total, step) if progress is not None else None
                _measure(objective, pseudo, step, x_k, x_next, st, due.index(k), store, step_rows, result, phases)
            elif len(step_rows) >= 50:
                flush()
        if progress is not None:
            progress(total, total, "done")
    finally:
        flush()


def _phases(progress: ProgressFn, k: int, total: int, step: int) -> Callable[[int], Callable[[str, int, int], None]]:
    """``for_count(directions)`` -> the ``progress`` callback of :func:`measure_step`, reporting
    ``measuring 18 directions at step 20 (lines 4/18)`` through ``progress(k, total, text)``."""
    def for_count(count: int) -> Callable[[str, int, int], None]:
        def tell(phase: str, done: int, of: int) -> None:
            detail = f" ({phase} {done}/{of})" if of else f" ({phase})"
            progress(k, total, f"measuring {count} directions at step {step}{detail}")
        return tell
    return for_count
def _preconditioners(pseudo: PseudoUpdates, st: MeasureSettings, index: int, names: list[str]
                     ) -> dict[str, dict[str, Tensor]] | None:
    """``P`` of the Adam-family recipes asked for, when the preconditioned sharpness is due."""
    cs = st.curvature
    if cs is None or not cs.due("precond", index):
        return None
    out = {}
    for recipe in cs.precond_recipes:
        if recipe in pseudo.names:
            try:
                P = pseudo.preconditioner(recipe)
            except ValueError:
                continue
            out[recipe] = {n: P[n] for n in names}
    return out or None


def _measure(
    objective: Objective,
    pseudo: PseudoUpdates,
    step: int,
    x_k: dict[str, Tensor],
    x_next: dict[str, Tensor] | None,
    st: MeasureSettings,
    index: int,
    store: RunStore | _LazyStore,
    step_rows: list[dict[str, Any]],
    result: AnalyzeResult,
    phases: Callable[[int], Callable[[str, int, int], None]] | None = None,
) -> None:
    names = list(objective.names)
    dirs = pseudo.directions()
    if x_next is not None:
        real = tree.sub({n: x_k[n] for n in names}, x_next)
        if float(tree.norm(real)) > 0:
            dirs[REAL_DIRECTION] = real
        else:
            store.log_event(step, "warning", f"checkpoint step {step} has the same measured weights as the next one")
            x_next = None
    try:
        rows = measure_step(objective, step, x_k, dirs, x_next=x_next, settings=st, measurement_index=index,
                            progress=phases(len(dirs)) if phases is not None else None,
                            preconditioners=_preconditioners(pseudo, st, index, names))
    except NonFiniteError as e:
        reason = f"{type(e).__name__}: {e}"
        result.failed[step] = reason
        store.log_event(step, "measurement-failed", reason)
        warnings.warn(f"landscape analyze: measurement at step {step} failed: {e}", stacklevel=3)
        return
    rows.pop("_grad", None)
    rows.pop("_timings", None)
    engine = rows.pop("_engine")[0]
    for event in rows.pop("_events", []):
        store.log_event(step, "warning", event["message"])
    with store.transaction():
        if engine["engine"] != result.engine:  # an event when the engine is first chosen, or changes
            store.log_event(step, "engine", engine["message"])
            result.engine = engine["engine"]
        if step_rows:
            store.write("steps", step_rows)
            step_rows.clear()
        for table, table_rows in rows.items():
            if table_rows:
                store.write(table, table_rows)
    result.measured.append(step)
