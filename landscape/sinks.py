"""Experiment trackers: the probe's numbers in TensorBoard, Weights & Biases or MLflow.

The run store stays the source of truth; a *sink* receives a copy of each measurement's scalars (and
update histograms) once its rows are committed::

    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter("runs/tb")
    probe = ls.Probe(model, loss_fn, probe_batch, out="runs/adam", every=50, sinks=[writer])
    # also: sinks=[wandb.run], sinks=[mlflow.active_run()], sinks=[my_function]

Anything in ``sinks=[...]`` goes through :func:`as_sink`: a ``torch.utils.tensorboard`` (or
``tensorboardX``) ``SummaryWriter``, a ``wandb`` run, an MLflow ``ActiveRun`` (or the ``mlflow`` module
itself: its active run), an object with a Lightning-style ``log_metrics(metrics, step)``, a function
``fn(step, scalars, histograms)``, or a :class:`Sink`. None of these libraries is imported by
``landscape``: a sink touches its library only through the object it was given (``pip install
'landscape[tensorboard]'``, ``[wandb]``, ``[mlflow]`` for the libraries themselves).

Tags (stable; ``<d>`` is the direction name made tag-safe by :func:`tag_name`, e.g. ``adam``,
``adam_clip``, ``adam_trained`` for ``adam (trained)``):

=====================================  ==========================================================
``landscape/sharpness/<d>``            reported directional sharpness ûᵀ∇²f(x)û (δ-shifted where negative)
``landscape/ratio_to_sgd/<d>``         S(u)/S(u_sgd), when defined (SGD's sharpness > 0)
``landscape/grad_projection/<d>``      gradient projection gᵀû (positive: the step descends)
``landscape/best_step/<d>``            quadratic-model best step G/S, when S > 0
``landscape/line_best_step/<d>``       the best step measured on the landscape line
``landscape/line_reduction/<d>``       ℓ(0) − min ℓ on the landscape line
``landscape/probe_loss``               f(x) on the probe batch
``landscape/l_hat``                    local smoothness L̂_t along the real step (Crawshaw et al. 2022, §5.2)
``landscape/probe_grad_norm``          ‖∇f(x_t)‖ on the probe batch (L̂_t's x-axis)
``landscape/top_eig``                  top Hessian eigenvalue, when measured (``robust_every``)
``landscape/robust_ratio``             L/ℓ of the robust smoothness, when measured
``landscape/update_log10_abs/<d>``     histogram of log10|u_i| (Pan & Li 2023, Fig. 1): TensorBoard's
                                       histogram panel, a ``wandb.Histogram``
=====================================  ==========================================================

The step is the probe's step number, as in the run store (step ``s`` is the point before the ``s``-th
optimizer step). A value that is missing (an undefined ratio) or not finite is left out.

Failures never stop training (the probe's rule): a sink that raises is switched off for the rest of
the run, the failure is recorded in the run's ``events`` table (kind ``sink-failure``) and warned about
once; the other sinks and the run store go on.
"""

from __future__ import annotations

import math
import re
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "MLflowSink",
    "LoggerSink",
    "FunctionSink",
    "SinkSet",
    "as_sink",
    "tag_name",
    "measurement_scalars",
    "measurement_histograms",
    "export_tensorboard",
]

#: ``{tag: (edges, counts)}``: a histogram of log10|u_i| (``len(edges) == len(counts) + 1``).
Histograms = Mapping[str, tuple[np.ndarray, np.ndarray]]

PREFIX = "landscape"


def tag_name(direction: str) -> str:
    """A direction name as a tag component every tracker accepts: runs of characters other than
    letters, digits, ``_``, ``.`` and ``-`` become one ``_`` (``"adam (trained)"`` -> ``"adam_trained"``)."""
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", str(direction)).strip("_") or "_"


def _finite(value: Any) -> float | None:
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def measurement_scalars(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, float]:
    """The tracker scalars of one measurement: ``{tag: value}`` from its store rows (``{table: rows}``,
    as :func:`~landscape.measure.measure_step` returns them or :meth:`~landscape.store.Run.rows` reads
    them). Missing and non-finite values are left out. See the module docstring for the tags."""
    out: dict[str, float] = {}

    def put(tag: str, value: Any) -> None:
        x = _finite(value)
        if x is not None:
            out[f"{PREFIX}/{tag}"] = x

    sharp = list(rows.get("sharpness") or [])
    for r in sharp:
        d = tag_name(r["direction"])
        put(f"sharpness/{d}", r.get("sharpness"))
        put(f"ratio_to_sgd/{d}", r.get("ratio_to_sgd"))
        put(f"grad_projection/{d}", r.get("grad_correlation"))
        put(f"best_step/{d}", r.get("best_step"))
    if sharp:
        put("probe_loss", sharp[0].get("loss"))
    for r in rows.get("lines") or []:
        d = tag_name(r["direction"])
        put(f"line_best_step/{d}", r.get("best_step"))
        put(f"line_reduction/{d}", r.get("reduction"))
    for r in rows.get("smoothness") or []:
        put("l_hat", r.get("l_hat"))
        put("probe_grad_norm", r.get("grad_norm"))
    for r in rows.get("robust") or []:
        put("top_eig", r.get("top_eig"))
        put("robust_ratio", r.get("ratio"))
    return out


def measurement_histograms(rows: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The update histograms of one measurement: ``{"landscape/update_log10_abs/<d>": (edges, counts)}``
    (log10|u_i|, Pan & Li 2023, Fig. 1); updates with no non-zero coordinate are left out."""
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for r in rows.get("histograms") or []:
        counts = np.asarray(r["counts"], dtype=np.int64)
        edges = np.asarray(r["edges"], dtype=np.float64)
        if counts.sum() > 0 and edges.shape == (counts.size + 1,) and np.isfinite(edges).all():
            out[f"{PREFIX}/update_log10_abs/{tag_name(r['direction'])}"] = (edges, counts)
    return out


# ------------------------------------------------------------------------------------------ sinks


class Sink:
    """Where a measurement's numbers go besides the run store. Subclasses override :meth:`write`
    (or :meth:`write_scalars` and :meth:`write_histogram`); :meth:`flush` and :meth:`close` are optional.

    Attributes:
        name: shown in warnings and in the run's ``events`` when the sink fails.
    """

    name = "sink"

    def write(self, step: int, scalars: Mapping[str, float], histograms: Histograms) -> None:
        """Record one measurement: ``scalars`` ``{tag: value}`` and ``histograms`` ``{tag: (edges,
        counts)}`` at the probe's ``step``."""
        if scalars:
            self.write_scalars(step, scalars)
        for tag, (edges, counts) in histograms.items():
            self.write_histogram(step, tag, edges, counts)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        raise NotImplementedError

    def write_histogram(self, step: int, tag: str, edges: np.ndarray, counts: np.ndarray) -> None:
        """Record one histogram (default: dropped; the tracker has no histograms)."""

    def flush(self) -> None:
        """Make what was written visible (called when the probe closes)."""

    def close(self) -> None:
        """Release what the sink opened itself (a writer it created); never the user's objects."""
        self.flush()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


class TensorBoardSink(Sink):
    """Scalars with ``add_scalar`` and histograms with ``add_histogram_raw`` (TensorBoard's histogram
    panel) on a ``SummaryWriter`` of ``torch.utils.tensorboard`` or ``tensorboardX``.

    Args:
        writer: the writer, or a folder: a ``torch.utils.tensorboard.SummaryWriter`` is created there
            (and closed by :meth:`close`).
        walltime: ``walltime(step) -> seconds since the epoch`` for the events (default: now).

    A histogram's ``sum`` and ``sum_squares`` (TensorBoard's mean and spread) are taken at the bin
    centres of log10|u_i|; the counts are exact.
    """

    def __init__(self, writer: Any, *, walltime: Callable[[int], float | None] | None = None) -> None:
        self._owned = False
        if isinstance(writer, (str, Path)):
            writer = _summary_writer(Path(writer))
            self._owned = True
        if not (hasattr(writer, "add_scalar") and hasattr(writer, "add_histogram_raw")):
            raise TypeError(f"TensorBoardSink needs a SummaryWriter, got {type(writer).__name__}")
        self.writer = writer
        self.name = f"TensorBoard {getattr(writer, 'log_dir', None) or getattr(writer, 'logdir', '')}".strip()
        self._walltime = walltime

    def _time(self, step: int) -> float | None:
        return self._walltime(step) if self._walltime is not None else None

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        wall = self._time(step)
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step, walltime=wall)

    def write_histogram(self, step: int, tag: str, edges: np.ndarray, counts: np.ndarray) -> None:
        centres = (edges[:-1] + edges[1:]) / 2
        n = float(counts.sum())
        self.writer.add_histogram_raw(
            tag, min=float(edges[0]), max=float(edges[-1]), num=n, sum=float((centres * counts).sum()),
            sum_squares=float((centres**2 * counts).sum()), bucket_limits=[float(e) for e in edges[1:]],
            bucket_counts=[float(c) for c in counts], global_step=step, walltime=self._time(step),
        )

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.flush()
        if self._owned:
            self.writer.close()


def _summary_writer(folder: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError(
            "writing TensorBoard event files needs the tensorboard package: pip install 'landscape[tensorboard]'"
        ) from None
    return SummaryWriter(str(folder))


class WandbSink(Sink):
    """``run.log`` on a Weights & Biases run: the measurement's scalars, its histograms as
    ``wandb.Histogram``, and ``landscape/step``, declared (``define_metric``) as the x-axis of every
    ``landscape/*`` metric.

    The values join the run's current history row (``commit=False``, no ``step=``), so they never
    conflict with the steps the training loop logs with (wandb drops a log whose step is behind the
    run's): the loop's next log commits them. When nothing committed that row before the next
    measurement (a loop that logs rarely, or not at all), the sink commits it first.

    Args:
        run: the run (default: ``wandb.run``, the active one, at the first write).
    """

    name = "wandb"

    def __init__(self, run: Any = None) -> None:
        self._run = run
        self._defined = False
        self._pending: int | None = None  # the run's step our last values are waiting at

    def _get(self) -> Any:
        if self._run is None:
            import wandb

            if wandb.run is None:
                raise RuntimeError("no active wandb run: call wandb.init() first, or pass WandbSink(run)")
            self._run = wandb.run
        if not self._defined:
            self._run.define_metric(f"{PREFIX}/step")
            self._run.define_metric(f"{PREFIX}/*", step_metric=f"{PREFIX}/step")
            self._defined = True
        return self._run

    def write(self, step: int, scalars: Mapping[str, float], histograms: Histograms) -> None:
        run = self._get()
        data: dict[str, Any] = {f"{PREFIX}/step": int(step), **scalars}
        if histograms:
            import wandb

            for tag, (edges, counts) in histograms.items():
                data[tag] = wandb.Histogram(np_histogram=(np.asarray(counts), np.asarray(edges)))
        if self._pending is not None and run.step == self._pending:  # our last values are still uncommitted
            run.log({}, commit=True)
        run.log(data, commit=False)
        self._pending = run.step

    def flush(self) -> None:
        """Commit our last values when nothing else has (the probe is closing)."""
        if self._run is not None and self._pending is not None and self._run.step == self._pending:
            self._run.log({}, commit=True)
            self._pending = None


class MLflowSink(Sink):
    """``log_batch`` of the measurement's scalars into an MLflow run, at the probe's step (MLflow has no
    histograms: they are left out).

    Args:
        run_id: the run (default: the active run's, ``mlflow.active_run()``, at the first write).
        client: an ``mlflow.MlflowClient`` (default: one for the current tracking URI).
    """

    name = "MLflow"

    def __init__(self, run_id: str | None = None, client: Any = None) -> None:
        self.run_id = run_id
        self._client = client

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        import mlflow
        from mlflow.entities import Metric

        if self.run_id is None:
            active = mlflow.active_run()
            if active is None:
                raise RuntimeError("no active MLflow run: call mlflow.start_run() first, or pass MLflowSink(run_id)")
            self.run_id = active.info.run_id
        if self._client is None:
            self._client = mlflow.MlflowClient()
        now = int(time.time() * 1000)
        metrics = [Metric(key=k, value=float(v), timestamp=now, step=int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
            self._client.log_batch(self.run_id, metrics=metrics[i : i + 1000])


class LoggerSink(Sink):
    """A logger with ``log_metrics(metrics, step)`` (every PyTorch Lightning logger); histograms go to
    its ``experiment`` when that is a TensorBoard ``SummaryWriter`` (``TensorBoardLogger``).

    Args:
        logger: the logger.
    """

    def __init__(self, logger: Any) -> None:
        if not callable(getattr(logger, "log_metrics", None)):
            raise TypeError(f"LoggerSink needs an object with log_metrics(metrics, step), got {type(logger).__name__}")
        self.logger = logger
        self.name = f"logger {type(logger).__name__}"

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.logger.log_metrics(dict(scalars), step=int(step))

    def write_histogram(self, step: int, tag: str, edges: np.ndarray, counts: np.ndarray) -> None:
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_histogram_raw"):
            TensorBoardSink(experiment).write_histogram(step, tag, edges, counts)


class FunctionSink(Sink):
    """``fn(step, scalars, histograms)`` for each measurement."""

    def __init__(self, fn: Callable[[int, Mapping[str, float], Histograms], Any]) -> None:
        self.fn = fn
        self.name = getattr(fn, "__qualname__", None) or repr(fn)

    def write(self, step: int, scalars: Mapping[str, float], histograms: Histograms) -> None:
        self.fn(step, scalars, histograms)


def _module_of(obj: Any) -> str:
    return type(obj).__module__ or ""


def as_sink(obj: Any) -> Sink:
    """A :class:`Sink` for ``obj``: a :class:`Sink` as is; a ``SummaryWriter``
    (``torch.utils.tensorboard`` or ``tensorboardX``); a ``wandb`` run; an MLflow ``ActiveRun`` or the
    ``mlflow`` module (its active run); an object with ``log_metrics(metrics, step)``; a function
    ``fn(step, scalars, histograms)``.

    Raises:
        TypeError: anything else (the message lists what is accepted).
    """
    if isinstance(obj, Sink):
        return obj
    module = _module_of(obj)
    if module.startswith(("torch.utils.tensorboard", "tensorboardX")) and hasattr(obj, "add_scalar"):
        return TensorBoardSink(obj)
    if module.startswith("wandb") and callable(getattr(obj, "log", None)):
        return WandbSink(obj)
    if getattr(obj, "__name__", None) == "mlflow" and type(obj).__name__ == "module":
        return MLflowSink()
    if module.startswith("mlflow") and hasattr(obj, "info") and hasattr(obj.info, "run_id"):
        return MLflowSink(obj.info.run_id)
    if callable(getattr(obj, "log_metrics", None)):
        return LoggerSink(obj)
    if callable(obj) and not isinstance(obj, type):
        return FunctionSink(obj)
    raise TypeError(
        f"sinks: cannot write to a {type(obj).__name__}; pass a torch.utils.tensorboard SummaryWriter, a wandb run, "
        "an MLflow run (mlflow.active_run()), a logger with log_metrics(metrics, step), a landscape.sinks.Sink, or a "
        "function fn(step, scalars, histograms)"
    )


class SinkSet:
    """The probe's sinks, with its failure rule: a sink that raises is switched off (the others go on),
    the failure is reported through ``event(kind, message)`` and warned about once.

    Args:
        sinks: anything :func:`as_sink` accepts (converted at once: a wrong object is the caller's
            error, raised here).
    """

    def __init__(self, sinks: Iterable[Any] | None = None) -> None:
        if sinks is not None and (isinstance(sinks, (str, bytes, Path)) or not isinstance(sinks, Iterable)):
            sinks = [sinks]
        self.sinks: list[Sink] = [as_sink(s) for s in (sinks or [])]
        self.failed: dict[int, str] = {}  # index -> why it was switched off
        self.closed = False

    def __bool__(self) -> bool:
        return not self.closed and any(i not in self.failed for i in range(len(self.sinks)))

    def active(self) -> list[Sink]:
        return [s for i, s in enumerate(self.sinks) if i not in self.failed]

    def _fail(self, i: int, what: str, step: int | None, e: BaseException,
              event: Callable[[str, str], None] | None) -> None:
        first = " ".join(str(e).split())[:300]
        where = f" at step {step}" if step is not None else ""
        message = f"sink {self.sinks[i].name} failed{where} ({what}): {type(e).__name__}: {first}"
        self.failed[i] = message
        if event is not None:
            try:
                event("sink-failure", message)
            except Exception:  # noqa: BLE001 - the store may be what failed
                pass
        warnings.warn(f"landscape probe: {message}; that sink is off for the rest of this run, the run store and "
                      "training go on", RuntimeWarning, stacklevel=4)

    def disable(self, sink: Sink, what: str, error: BaseException, *, step: int | None = None,
                event: Callable[[str, str], None] | None = None) -> None:
        """Switch ``sink`` off after ``error`` raised by it during ``what`` (recorded, warned once), for
        failures seen outside :meth:`publish` (a callback that delivers a sink's values later)."""
        for i, s in enumerate(self.sinks):
            if s is sink and i not in self.failed:
                self._fail(i, what, step, error, event)

    def publish(self, step: int, rows: Mapping[str, Sequence[Mapping[str, Any]]],
                event: Callable[[str, str], None] | None = None) -> None:
        """Write one committed measurement to every working sink. Never raises."""
        if not self:
            return
        try:
            scalars = measurement_scalars(rows)
            histograms = measurement_histograms(rows)
        except Exception as e:  # noqa: BLE001 - a malformed row must not stop training either
            for i in range(len(self.sinks)):
                if i not in self.failed:
                    self._fail(i, "reading the measurement", step, e, event)
            return
        for i, sink in enumerate(self.sinks):
            if i in self.failed:
                continue
            try:
                sink.write(step, scalars, histograms)
            except Exception as e:  # noqa: BLE001
                self._fail(i, "write", step, e, event)

    def flush(self, event: Callable[[str, str], None] | None = None) -> None:
        """Flush every working sink. Never raises."""
        for i, sink in enumerate(self.sinks):
            if i not in self.failed:
                try:
                    sink.flush()
                except Exception as e:  # noqa: BLE001
                    self._fail(i, "flush", None, e, event)

    def close(self, event: Callable[[str, str], None] | None = None) -> None:
        """Flush every working sink and close what the sinks opened themselves (once). Never raises."""
        if self.closed:
            return
        self.closed = True
        for i, sink in enumerate(self.sinks):
            if i not in self.failed:
                try:
                    sink.close()
                except Exception as e:  # noqa: BLE001
                    self._fail(i, "close", None, e, event)


# ------------------------------------------------------------------------------------------ replay

#: The tables whose rows make a measurement's tracker values.
_MEASUREMENT_TABLES = ("sharpness", "lines", "histograms", "smoothness", "robust")


def export_tensorboard(run: Any, folder: str | Path) -> list[Path]:
    """Replay a finished run (a probe run, a checkpoint analysis or an optimizer race) into
    TensorBoard event files in ``folder``, with the tags of the live sinks.

    A probe or ``analyze`` run gives one event file: every measured step's scalars and histograms,
    plus ``landscape/train_loss`` and ``landscape/lr`` of every training step the probe saw. A race
    (``landscape race``) gives one sub-folder per training run, ``<recipe>_lr<lr>_seed<seed>``, with
    ``race/train_loss`` and ``race/probe_loss``, which TensorBoard overlays as runs. Events carry the
    run's own wall-clock times where the store has them.

    Args:
        run: a :class:`~landscape.store.Run` (or its folder).
        folder: where to write; refused when it already holds event files (a replay into them would
            show every value twice).

    Returns:
        The event files written.

    Raises:
        FileExistsError: ``folder`` already holds TensorBoard event files.
        ImportError: the ``tensorboard`` package is not installed.
    """
    from landscape.store import Run, load_run

    if not isinstance(run, Run):
        run = load_run(run)
    folder = Path(folder)
    if folder.exists() and any(folder.rglob("events.out.tfevents.*")):
        raise FileExistsError(f"{folder} already holds TensorBoard event files: remove them or export to another folder")
    with run.snapshot():
        if run.has("race_runs"):
            return _export_race(run, folder)
        return _export_measurements(run, folder)


def _created(run: Any) -> float | None:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(run.meta.get("created"))).timestamp()
    except (TypeError, ValueError):
        return None


def _event_files(folder: Path) -> list[Path]:
    return sorted(folder.rglob("events.out.tfevents.*"))


def _export_measurements(run: Any, folder: Path) -> list[Path]:
    created = _created(run)
    steps_rows = run.rows("steps") if run.has("steps") else []
    wall = {r["step"]: r["wall"] for r in steps_rows if _finite(r.get("wall")) is not None}

    def walltime(step: int) -> float | None:
        return created + wall[step] if created is not None and step in wall else None

    by_step: dict[int, dict[str, list[dict[str, Any]]]] = {}
    for table in _MEASUREMENT_TABLES:
        for r in run.rows(table):
            by_step.setdefault(int(r["step"]), {}).setdefault(table, []).append(r)
    sink = TensorBoardSink(folder, walltime=walltime)
    try:
        for r in steps_rows:
            scalars = {k: v for k, v in ((f"{PREFIX}/train_loss", _finite(r.get("loss"))),
                                         (f"{PREFIX}/lr", _finite(r.get("lr")))) if v is not None}
            if scalars:
                sink.write_scalars(int(r["step"]), scalars)
        for step in sorted(by_step):
            rows = by_step[step]
            sink.write(step, measurement_scalars(rows), measurement_histograms(rows))
    finally:
        sink.close()
    return _event_files(folder)


def _export_race(run: Any, folder: Path) -> list[Path]:
    curves: dict[tuple[str, float, int], list[dict[str, Any]]] = {}
    for r in run.rows("race_curves"):
        curves.setdefault((r["recipe"], r["lr"], r["seed"]), []).append(r)
    for (recipe, lr, seed), rows in curves.items():
        sink = TensorBoardSink(folder / f"{tag_name(recipe)}_lr{lr:g}_seed{seed}")
        try:
            for r in rows:
                scalars = {k: v for k, v in (("race/train_loss", _finite(r.get("train_loss"))),
                                             ("race/probe_loss", _finite(r.get("probe_loss")))) if v is not None}
                if scalars:
                    sink.write_scalars(int(r["step"]), scalars)
        finally:
            sink.close()
    return _event_files(folder)
