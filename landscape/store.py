"""The run store: one measurement run = one folder holding ``run.sqlite``.

A probe writes rows while the model trains; plots, reports and the user read them, during the run
or after it. The store is a single SQLite database (standard library :mod:`sqlite3`) in WAL journal
mode, so that

* every :meth:`RunStore.write` (or every :meth:`RunStore.transaction` block) is one atomic commit,
  made durable with ``synchronous=FULL``;
* readers (:func:`load_run`, a read-only ``file:...?mode=ro`` connection) see every committed row
  while the writer is still running, and never block it;
* a writer killed with SIGKILL (or a power cut) loses at most the transaction it was in: every
  committed row stays readable, and the run can be reopened to append (resume);
* a run folder has one writer at a time: :class:`RunStore` holds an advisory lock on
  ``RUN/writer.lock`` (``flock``) for its whole lifetime, taken before the database is opened or
  created. A second writer (another process, or a second probe in the same process) is refused at
  once with :class:`RunLockedError`, naming the holder (pid, host, command, since when); it never
  touches the database. The operating system releases the lock when the holder exits, however it
  exits (SIGKILL included), so a crashed run can be resumed at once.

All table schemas are declared in one place, :data:`TABLES`. Writers validate every row against it
(an unknown table or column, a missing required column or a value of the wrong type raises
:class:`SchemaError` naming the table and column). Array-valued columns (kind ``ARRAY``) are stored
as JSON text and given back as :class:`numpy.ndarray`; free-form ``JSON`` columns are given back as
Python objects.

Missing values, deliberately:

* ``REAL`` columns hold ``inf``/``-inf`` natively. SQLite turns NaN into NULL, so a NULL in a
  ``REAL`` column reads back as ``nan`` when the column is not nullable by design (a computation
  that gave NaN), and as ``None`` in :meth:`Run.rows` when it is nullable (``ratio_to_sgd``,
  ``best_step``...: "not applicable"); NaN written to a nullable column therefore reads back as
  ``None``. :meth:`Run.columns` and :meth:`Run.df` give ``nan`` for both.
* Arrays and JSON values keep NaN and ±inf exactly (written as Python's ``json`` tokens ``NaN``,
  ``Infinity``, ``-Infinity``).
* Non-nullable columns of other kinds refuse ``None``.

Example:
    >>> import tempfile, pathlib
    >>> from landscape.store import RunStore, load_run
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "run"
    >>> with RunStore(folder, settings={"every": 10}, meta={"recipes": ["sgd", "adam"]}) as store:
    ...     store.write("sharpness", [{"step": 0, "direction": "sgd", "sharpness": 2.0, "raw": 2.0,
    ...         "shifted": False, "grad_correlation": 0.5, "update_norm": 1.0, "loss": 3.0}])
    >>> run = load_run(folder)
    >>> run.rows("sharpness")[0]["sharpness"], run.steps()
    (2.0, [0])

Adding a table: append a :class:`Table` to ``_TABLE_LIST`` below (columns, primary key, a docstring
for each). Opening an existing run for writing creates missing tables and adds missing columns
(as nullable ``ALTER TABLE ... ADD COLUMN``), so old runs can be resumed; reading an old run that
lacks the table gives no rows, and a declared column missing from an old table reads as missing
values. Then paste the output of ``python -m landscape.store`` (:func:`schema_markdown`) over the
tables section of ``docs/store_schema.md`` and ``README.md`` (``python -m landscape.store
docs/store_schema.md README.md`` does both); a test checks they agree.
"""

from __future__ import annotations

import json
import math
import operator
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DB_NAME",
    "LOCK_NAME",
    "WriterLock",
    "SCHEMA_VERSION",
    "Column",
    "Table",
    "TABLES",
    "RunStore",
    "Run",
    "load_run",
    "schema_markdown",
    "StoreError",
    "SchemaError",
    "RunMismatchError",
    "NotARunError",
    "NoDataError",
    "RunLockedError",
    "DamagedRunError",
]

DB_NAME = "run.sqlite"
#: The advisory lock file of a run folder's one writer (holds the holder's pid, host and command).
LOCK_NAME = "writer.lock"
#: Bumped when a change to :data:`TABLES` is not a pure addition (stored in ``PRAGMA user_version``).
SCHEMA_VERSION = 1

KINDS = ("INTEGER", "REAL", "TEXT", "BOOL", "JSON", "ARRAY")
_SQL_TYPE = {"INTEGER": "INTEGER", "REAL": "REAL", "TEXT": "TEXT", "BOOL": "INTEGER", "JSON": "TEXT",
             "ARRAY": "TEXT"}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# --------------------------------------------------------------------------------------------------
# errors


class StoreError(Exception):
    """Base class of every error raised by the run store."""


class SchemaError(StoreError, ValueError):
    """A row does not fit the declared schema (unknown table/column, missing value, wrong type)."""


class RunMismatchError(StoreError, ValueError):
    """An existing run folder was opened with different measurement settings."""


class NotARunError(StoreError, FileNotFoundError):
    """The path is not a run folder (no ``run.sqlite`` in it)."""


class NoDataError(StoreError, LookupError):
    """The run has no rows for what was asked (a table, a step, a direction)."""


class RunLockedError(StoreError, RuntimeError):
    """Another writer (a probe, ``landscape analyze``...) holds the run folder."""


class DamagedRunError(StoreError, ValueError):
    """The run store holds a value it cannot have written (malformed JSON, a wrong type): it was
    damaged or edited by hand."""


# --------------------------------------------------------------------------------------------------
# the writer lock


def _holder_text(info: Any, folder: Path) -> str:
    if not isinstance(info, dict):
        return "another writer (its details could not be read)"
    same = info.get("pid") == os.getpid() and info.get("host") == socket.gethostname()
    who = ("a writer in this same process (pid {pid}): a Probe or RunStore on this folder that is still open; "
           "close() it first").format(**info) if same else (
        f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        + (f", `{info['command']}`" if info.get("command") else "")
    )
    since = f", since {info['since']}" if info.get("since") else ""
    return who + since


class WriterLock:
    """An exclusive advisory lock on ``folder/writer.lock`` (``fcntl.flock``; ``msvcrt`` on Windows),
    held until :meth:`release` or the process ends.

    ``flock`` locks belong to an open file description, so a second lock from the same process
    conflicts as well (two probes on one folder in one script are refused too), and the kernel drops
    the lock when the process dies, however it dies.
    """

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK_NAME
        self._file = None

    def acquire(self) -> None:
        f = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 - held for the writer's lifetime
        try:
            locked = self._lock(f)
        except BaseException:
            f.close()
            raise
        if not locked:
            info = None
            for _ in range(20):  # a holder that has just locked writes its details a moment later
                try:
                    f.seek(0)
                    info = json.loads(f.read() or "null")
                except (OSError, ValueError):
                    info = None
                if info is not None:
                    break
                time.sleep(0.025)
            f.close()
            raise RunLockedError(
                f"run folder {self.path.parent} is already being written by {_holder_text(info, self.path.parent)}. "
                "One run folder has one writer: wait for it to finish, or write to another folder"
            )
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso(),
                "command": " ".join(sys.argv)[:500]}
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps(info))
            f.flush()
        except OSError:
            pass  # the details are a courtesy; the lock itself is held
        self._file = f

    @staticmethod
    def _lock(f: Any) -> bool:
        """True when locked; False when another holder has it."""
        try:
            import fcntl
        except ImportError:  # Windows
            import msvcrt

            try:
                f.seek(0)
                msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
                return True
            except OSError:
                return False
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:  # a filesystem without locks (some network mounts)
            warnings.warn(f"landscape: cannot lock {f.name} ({e}); a second writer on this run folder would not be "
                          "detected", RuntimeWarning, stacklevel=4)
            return True

    def release(self) -> None:
        f, self._file = self._file, None
        if f is None:
            return
        try:
            f.seek(0)
            f.truncate()  # no stale holder details once released
        except OSError:
            pass
        finally:
            f.close()  # closing the last descriptor releases the lock


# --------------------------------------------------------------------------------------------------
# schema declarations


@dataclass(frozen=True)
class Column:
    """One column of a table.

    Attributes:
        name: SQL identifier.
        kind: ``INTEGER``, ``REAL``, ``TEXT``, ``BOOL`` (stored INTEGER 0/1, read back ``bool``),
            ``JSON`` (any JSON value, stored as text) or ``ARRAY`` (numbers, stored as JSON text,
            read back as ``np.ndarray`` of ``dtype``).
        nullable: whether ``None`` may be written (and the column omitted from a row).
        doc: one line for the schema documentation.
        dtype: numpy dtype of an ``ARRAY`` column.
        auto: an ``INTEGER PRIMARY KEY AUTOINCREMENT`` column, filled by SQLite when omitted.
    """

    name: str
    kind: str
    nullable: bool = False
    doc: str = ""
    dtype: str = "float64"
    auto: bool = False

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise ValueError(f"column name {self.name!r} is not a plain SQL identifier")
        if self.kind not in KINDS:
            raise ValueError(f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}")

    @property
    def sql_type(self) -> str:
        return _SQL_TYPE[self.kind]

    @property
    def required(self) -> bool:
        """Must be present (and not ``None``) in every written row."""
        return not (self.nullable or self.auto)


@dataclass(frozen=True)
class Table:
    """A table: its columns (in order), primary key and documentation."""

    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...]
    doc: str = ""
    by_name: dict[str, Column] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _IDENT.match(self.name):
            raise ValueError(f"table name {self.name!r} is not a plain SQL identifier")
        by_name = {c.name: c for c in self.columns}
        if len(by_name) != len(self.columns):
            raise ValueError(f"table {self.name!r} declares a column twice")
        for key in self.primary_key:
            if key not in by_name:
                raise ValueError(f"table {self.name!r}: primary key column {key!r} is not declared")
            if by_name[key].nullable:
                raise ValueError(f"table {self.name!r}: primary key column {key!r} cannot be nullable")
        autos = [c.name for c in self.columns if c.auto]
        if autos and tuple(autos) != self.primary_key:
            raise ValueError(f"table {self.name!r}: an auto column must be the whole primary key")
        object.__setattr__(self, "by_name", by_name)

    @property
    def column_names(self) -> list[str]:
        return [c.name for c in self.columns]

    def create_sql(self) -> str:
        parts = []
        for c in self.columns:
            text = f'"{c.name}" {c.sql_type}'
            if c.auto:
                text += " PRIMARY KEY AUTOINCREMENT"
            elif c.required and c.kind != "REAL":  # NaN is stored as NULL, so REAL stays nullable
                text += " NOT NULL"
            parts.append(text)
        if not any(c.auto for c in self.columns):
            parts.append("PRIMARY KEY (" + ", ".join(f'"{k}"' for k in self.primary_key) + ")")
        return f'CREATE TABLE IF NOT EXISTS "{self.name}" ({", ".join(parts)})'


def _c(name: str, kind: str, doc: str = "", **kw: Any) -> Column:
    return Column(name, kind, doc=doc, **kw)


_STEP = _c("step", "INTEGER", "training step (the probe's step counter)")
_DIRECTION = _c("direction", "TEXT", "recipe name (`sgd`, `adam_clip`...) or the trained optimizer's "
                                     "own step (`adam (trained)`)")

_UNDEFINED = _c("undefined", "TEXT", "why the direction was not measured at this step (e.g. `direction has norm 0 "
                                     "(all coordinates zero)`), when it was not: the values are then missing",
                nullable=True)

_MEASURED_AS = _c("measured_as", "TEXT", "the direction whose measurement this row repeats, when this one is the same "
                                         "direction to float rounding (cosine ≥ 1 − `merge_tol`): its values are "
                                         "that direction's (`update_norm` its own)", nullable=True)

_TABLE_LIST: tuple[Table, ...] = (
    Table(
        "meta",
        (
            _c("key", "TEXT", "name of the entry"),
            _c("value", "JSON", "its value"),
        ),
        ("key",),
        "Run metadata, one JSON value per key. Keys: `settings` (the measurement-defining configuration "
        "a resumed run must match), `model` {class, n_params, n_measured}, `optimizer` {class, "
        "hyperparameters}, `recipes` [names in order], `trained_direction` (e.g. `adam (trained)`), "
        "`versions` {landscape, torch, python}, `created` (ISO 8601 time, kept on resume), "
        "`mode` (`eval`/`train`).",
    ),
    Table(
        "steps",
        (
            _STEP,
            _c("loss", "REAL", "training loss of the step's batch"),
            _c("grad_norm", "REAL", "l2 norm of the training gradient"),
            _c("lr", "REAL", "learning rate of the first parameter group"),
            _c("status", "TEXT", "`ok` or `skipped`"),
            _c("reason", "TEXT", "why the step was skipped", nullable=True),
            _c("wall", "REAL", "seconds since the run was created"),
        ),
        ("step",),
        "One row per training step the probe saw.",
    ),
    Table(
        "sharpness",
        (
            _STEP,
            _DIRECTION,
            _c("sharpness", "REAL", "reported directional sharpness: `shifted_value` if `shifted`, else `raw`"),
            _c("raw", "REAL", "ûᵀ H û at x, û = u/‖u‖₂"),
            _c("shifted_value", "REAL", "ûᵀ ∇²f(x − δû) û, the Hessian a distance δ toward the step x − η·u "
                                        "(Pan & Li 2023, App. B.3 Eq. 4), when computed", nullable=True),
            _c("shifted", "BOOL", "whether `sharpness` is the δ-shifted value"),
            _c("ratio_to_sgd", "REAL", "sharpness / sharpness of `sgd` at the same step; defined only where "
                                       "`sgd`'s reported sharpness is > 0, else missing (see `ratio_note`)",
               nullable=True),
            _c("ratio_note", "TEXT", "why `ratio_to_sgd` is missing (e.g. `sgd` sharpness ≤ 0), when it is",
               nullable=True),
            _c("grad_correlation", "REAL", "gradient projection gᵀû, g = ∇f(x) (positive = descent for x − s·û); "
                                           "a projection onto the unit direction, not a correlation coefficient"),
            _c("update_norm", "REAL", "‖u‖₂ before normalisation"),
            _c("best_step", "REAL", "quadratic-model best step G/S (when S > 0)", nullable=True),
            _c("predicted_reduction", "REAL", "quadratic-model loss reduction G²/(2S) (when S > 0)",
               nullable=True),
            _c("loss", "REAL", "probe-batch loss f(x) at the measured point"),
            _UNDEFINED,
            _MEASURED_AS,
        ),
        ("step", "direction"),
        "Directional sharpness of every direction at every measured step (Pan & Li 2023, Tables 1, 4-7).",
    ),
    Table(
        "lines",
        (
            _STEP,
            _DIRECTION,
            _c("s", "ARRAY", "step sizes s ≥ 0, normalised by ‖u‖₂: the points are x − s·û"),
            _c("loss", "ARRAY", "f(x − s·û) at each s"),
            _c("best_step", "REAL", "s with the lowest loss"),
            _c("best_loss", "REAL", "the lowest loss on the grid"),
            _c("reduction", "REAL", "loss(0) − best_loss"),
            _UNDEFINED,
            _MEASURED_AS,
        ),
        ("step", "direction"),
        "Loss along each update direction (Pan & Li 2023, Figs. 2-4).",
    ),
    Table(
        "histograms",
        (
            _STEP,
            _DIRECTION,
            _c("edges", "ARRAY", "bin edges of log10|u_i| (len(counts) + 1)"),
            _c("counts", "ARRAY", "number of coordinates in each bin", dtype="int64"),
            _c("sparsity", "REAL", "fraction of coordinates with |u_i| < 1e-3·max_j|u_j| (exact zeros included)"),
            _c("zeros", "INTEGER", "number of coordinates with u_i = 0 exactly (not in any bin)"),
        ),
        ("step", "direction"),
        "Histogram of the update's coordinates on a log scale (Pan & Li 2023, Fig. 1).",
    ),
    Table(
        "cosine",
        (
            _STEP,
            _c("a", "TEXT", "first direction"),
            _c("b", "TEXT", "second direction"),
            _c("cosine", "REAL", "⟨u_a, u_b⟩ / (‖u_a‖ ‖u_b‖)"),
        ),
        ("step", "a", "b"),
        "Cosine similarity between pairs of directions (each unordered pair once, a before b in "
        "direction order).",
    ),
    Table(
        "smoothness",
        (
            _STEP,
            _c("l_hat", "REAL", "L̂_t = max_γ ‖∇f(x_t+γd) − ∇f(x_t)‖ / ‖γd‖, d = x_{t+1} − x_t (Crawshaw et al. 2022, §5.2)"),
            _c("grad_norm", "REAL", "‖∇f(x_t)‖ on the probe batch"),
            _c("step_norm", "REAL", "‖d‖"),
            _c("per_gamma", "JSON", "the ratio for each γ, as {γ: value} or a list"),
        ),
        ("step",),
        "Local smoothness along the real training step (Crawshaw et al. 2022, Fig. 1).",
    ),
    Table(
        "coord_smoothness",
        (
            _STEP,
            _c("layer", "TEXT", "parameter name"),
            _c("ratio", "ARRAY", "|∂_j f(x_{t+1}) − ∂_j f(x_t)| / |x_{t+1,j} − x_{t,j}| for sampled j"),
            _c("min_grad", "ARRAY", "min(|∂_j f(x_t)|, |∂_j f(x_{t+1})|) for the same j"),
        ),
        ("step", "layer"),
        "Coordinate-wise smoothness samples per layer (Crawshaw et al. 2022, Fig. 3).",
    ),
    Table(
        "robust",
        (
            _STEP,
            _c("top_eig", "REAL", "top Hessian eigenvalue L"),
            _c("l_robust", "REAL", "ℓ after removing the ε fraction of coordinates with the largest "
                                   "Hessian row norms"),
            _c("ratio", "REAL", "L / ℓ"),
            _c("eps", "REAL", "fraction of coordinates removed"),
            _c("n_removed", "INTEGER", "number of coordinates removed"),
            _c("n_samples", "INTEGER", "random sign vectors used to estimate the row norms"),
            _c("curvature", "TEXT", "the matrix: `hessian`, or `ggn` (the Gauss–Newton matrix of Pan & Li 2023, App. D); "
                                    "missing (runs before it was recorded): `hessian`", nullable=True),
        ),
        ("step",),
        "Robust smoothness (Pan & Li 2023, App. D, Table 8).",
    ),
    Table(
        "events",
        (
            _c("id", "INTEGER", "increasing event number", auto=True),
            _c("step", "INTEGER", "training step, if the event belongs to one", nullable=True),
            _c("kind", "TEXT", "short category (`resume`, `skip`, `warning`, `engine`: the sharpness engine chosen, or changed, and why...)"),
            _c("message", "TEXT", "human-readable text"),
            _c("wall", "REAL", "seconds since the run was created"),
        ),
        ("id",),
        "Log of notable events (resume, skipped measurements, warnings).",
    ),
    Table(
        "planes",
        (
            _c("name", "TEXT", "name of the plane or line (unique in the run)"),
            _c("kind", "TEXT", "`random` (filter-normalised, Li et al. 2018 §4), `updates` (two update directions), "
                               "`pca` (a trajectory's PCA plane), `interpolate` (a segment between two points) "
                               "or `custom`"),
            _c("dims", "INTEGER", "2 for a plane f(x + α·d₁ + β·d₂), 1 for a line f(x + α·d)"),
            _c("step", "INTEGER", "training step of the centre x, when it has one", nullable=True),
            _c("x_label", "TEXT", "what α measures"),
            _c("y_label", "TEXT", "what β measures (planes only)", nullable=True),
            _c("alphas", "ARRAY", "the α grid"),
            _c("betas", "ARRAY", "the β grid (planes only)", nullable=True),
            _c("explained_variance", "ARRAY", "`pca`: fraction of the trajectory's variance along each axis",
               nullable=True),
            _c("markers", "JSON", "named points in plane coordinates, {name: [α, β]} (e.g. each update's unit "
                                  "step, the endpoints of a segment)"),
            _c("config", "JSON", "what defines the plane (seed, directions, a digest of the centre and the "
                                 "directions, ...): a resumed computation must match it"),
            _c("wall", "REAL", "seconds since the run was created"),
        ),
        ("name",),
        "Loss planes and lines (Li et al. 2018; Goodfellow et al. 2015), one row each; the losses are in "
        "`plane_losses`.",
    ),
    Table(
        "plane_losses",
        (
            _c("name", "TEXT", "the plane (`planes.name`)"),
            _c("objective", "TEXT", "`probe` (the probe batch) or `train` (training batches)"),
            _c("start", "INTEGER", "flat index of the chunk's first grid point: k = i·len(betas) + j for "
                                   "(alphas[i], betas[j]); k = i on a line"),
            _c("loss", "ARRAY", "the loss at grid points start, start + 1, ... (committed chunk by chunk)"),
            _c("fingerprint", "TEXT", "identifies the objective's batch and mode; resuming needs the same"),
        ),
        ("name", "objective", "start"),
        "The loss on the grid of each plane, in chunks of consecutive grid points (a partly computed "
        "grid resumes from the missing points).",
    ),
    Table(
        "plane_trajectory",
        (
            _c("name", "TEXT", "the plane (`planes.name`)"),
            _c("position", "INTEGER", "index of the point along the trajectory"),
            _c("step", "INTEGER", "training step of the point, when known", nullable=True),
            _c("label", "TEXT", "checkpoint or point name", nullable=True),
            _c("alpha", "REAL", "coordinate along the first axis (least-squares projection onto the plane)"),
            _c("beta", "REAL", "coordinate along the second axis (planes only)", nullable=True),
            _c("residual", "REAL", "distance from the point to the plane (0: the point lies in it)"),
            _c("loss", "REAL", "probe loss at the point itself", nullable=True),
        ),
        ("name", "position"),
        "A trajectory (checkpoints, saved points) projected onto a plane or line.",
    ),
    Table(
        "race_runs",
        (
            _c("recipe", "TEXT", "the recipe that trained (`landscape recipes`)"),
            _c("lr", "REAL", "its learning rate η (x ← x − η·u)"),
            _c("seed", "INTEGER", "the seed of the initialisation, the batch order and dropout"),
            _c("status", "TEXT", "`done`, or `diverged` (a non-finite loss stopped it)"),
            _c("steps", "INTEGER", "optimizer steps taken"),
            _c("final_train_loss", "REAL", "mean training loss over the last 10% of the steps"),
            _c("final_probe_loss", "REAL", "probe-batch loss after the last step"),
            _c("score", "REAL", "the learning-rate selection criterion (lower is better; +inf when diverged)"),
            _c("seconds", "REAL", "wall-clock seconds of the training run"),
        ),
        ("recipe", "lr", "seed"),
        "Optimizer race (`landscape race`, Pan & Li 2023, Fig. 6, Crawshaw et al. 2022, Table 1): one row per finished training "
        "run. Each recipe's learning rate is chosen from its grid on the first seed (lowest `score`).",
    ),
    Table(
        "race_curves",
        (
            _c("recipe", "TEXT", "the recipe that trained"),
            _c("lr", "REAL", "its learning rate"),
            _c("seed", "INTEGER", "the seed"),
            _c("step", "INTEGER", "optimizer steps taken (0: the initialisation)"),
            _c("train_loss", "REAL", "loss of the step's training batch at x_{step−1}, before the step "
                                     "(missing at step 0)", nullable=True),
            _c("probe_loss", "REAL", "probe-batch loss at x_step (every `probe_every` steps and the last)",
               nullable=True),
        ),
        ("recipe", "lr", "seed", "step"),
        "Loss curves of the optimizer race, every step of every training run.",
    ),
    # -- curvature (opt-in: MeasureSettings(curvature=CurvatureSettings(...)), landscape.curvature_measure)
    Table(
        "eigenvalues",
        (
            _STEP,
            _c("curvature", "TEXT", "the matrix: `hessian` or `ggn` (Gauss–Newton Jᵀ H_ℓ J)"),
            _c("block", "TEXT", "`all` (the whole matrix) or the block (layer, tensor) of a diagonal block A[B, B]"),
            _c("which", "TEXT", "`top` (largest) or `bottom` (most negative)"),
            _c("rank", "INTEGER", "0 for the largest (top) / smallest (bottom), then 1, 2, ..."),
            _c("value", "REAL", "the eigenvalue (Lanczos Ritz value)"),
            _c("residual", "REAL", "‖Av − λv‖₂ of its unit eigenvector: the eigenvalue is within this of the true one"),
            _c("converged", "BOOL", "every requested residual ≤ tol·‖A‖"),
            _c("n_products", "INTEGER", "matrix-vector products spent on this block"),
        ),
        ("step", "curvature", "block", "which", "rank"),
        "Extreme eigenvalues of the Hessian / Gauss–Newton matrix and of its diagonal blocks, with residuals "
        "(Lanczos; `landscape.eigenvalues`).",
    ),
    Table(
        "trace",
        (
            _STEP,
            _c("curvature", "TEXT", "the matrix: `hessian` or `ggn`"),
            _c("method", "TEXT", "`hutch++` (Meyer et al. 2021) or `hutchinson`"),
            _c("estimate", "REAL", "the trace estimate"),
            _c("stderr", "REAL", "its standard error (Hutch++: of the residual Hutchinson term)"),
            _c("n_products", "INTEGER", "matrix-vector products spent"),
        ),
        ("step", "curvature", "method"),
        "Trace estimates with standard errors (`landscape.hutchpp_trace`, `landscape.hutchinson_trace`).",
    ),
    Table(
        "density",
        (
            _STEP,
            _c("curvature", "TEXT", "the matrix: `hessian` or `ggn`"),
            _c("nodes", "ARRAY", "Gauss quadrature nodes (Lanczos Ritz values) of every run"),
            _c("weights", "ARRAY", "their weights (summing to 1): the density is Σ wⱼ g_σ(t − nodeⱼ)"),
            _c("n_vectors", "INTEGER", "Lanczos runs"),
            _c("steps", "INTEGER", "Lanczos steps per run"),
            _c("n_params", "INTEGER", "the dimension d (d·Σ wⱼ nodeⱼ estimates the trace)"),
        ),
        ("step", "curvature"),
        "Spectral density by stochastic Lanczos quadrature (Ghorbani et al. 2019; `landscape.spectral_density`).",
    ),
    Table(
        "preconditioned",
        (
            _STEP,
            _c("optimizer", "TEXT", "whose preconditioner P: an Adam-family recipe (`adam`) or the trained "
                                    "optimizer (`adam (trained)`)"),
            _c("curvature", "TEXT", "the matrix A of λ_max(P⁻¹A): `hessian`"),
            _c("value", "REAL", "preconditioned sharpness λ_max(P⁻¹A), P = (1−β₁ᵗ)(√v̂ + ε) (Cohen et al. 2022)"),
            _c("residual", "REAL", "‖Bv − λv‖₂ for B = P^{-1/2} A P^{-1/2}"),
            _c("converged", "BOOL", "residual ≤ tol·‖B‖"),
            _c("n_products", "INTEGER", "matrix-vector products spent"),
        ),
        ("step", "optimizer", "curvature"),
        "Preconditioned sharpness of adaptive methods, to compare with their stability threshold "
        "(2 + 2β₁)/((1 − β₁)η) = 38/η (Cohen et al. 2022).",
    ),
    Table(
        "sharpness_layers",
        (
            _STEP,
            _DIRECTION,
            _c("curvature", "TEXT", "the matrix: `hessian` or `ggn`"),
            _c("block", "TEXT", "the layer (or parameter tensor)"),
            _c("contribution", "REAL", "û_bᵀ (A û)_b: the terms of all blocks sum to ûᵀ A û"),
            _c("mass", "REAL", "‖û_b‖²: the share of the unit direction in the block (summing to 1)"),
            _c("diagonal", "REAL", "û_bᵀ A_bb û_b, the block's own curvature (when measured)", nullable=True),
        ),
        ("step", "direction", "curvature", "block"),
        "Exact per-layer decomposition of each direction's sharpness ûᵀAû = Σ_b û_bᵀ(Aû)_b "
        "(`landscape.sharpness_by_layer`).",
    ),
)

#: Every table of a run, by name. The one place where schemas are declared.
TABLES: dict[str, Table] = {t.name: t for t in _TABLE_LIST}


def _table(name: str) -> Table:
    try:
        return TABLES[name]
    except KeyError:
        raise SchemaError(f"unknown table {name!r}; known tables: {', '.join(TABLES)}") from None


def schema_markdown() -> str:
    """The schema of every table as Markdown (the source of ``docs/store_schema.md``)."""
    out = [
        "Each run is a folder holding `run.sqlite` (SQLite, WAL journal mode). Column kinds: "
        "`ARRAY` and `JSON` are stored as JSON text (arrays come back as numpy arrays); `BOOL` is "
        "INTEGER 0/1. Primary-key columns are in **bold**; *nullable* columns may be missing. "
        "A NaN in a `REAL` column is stored as NULL and reads back as `nan`.",
        "",
    ]
    for t in _TABLE_LIST:
        out.append(f"#### `{t.name}`")
        out.append("")
        out.append(t.doc)
        out.append("")
        out.append("| column | kind | meaning |")
        out.append("|---|---|---|")
        for c in t.columns:
            name = f"**{c.name}**" if c.name in t.primary_key else c.name
            kind = c.kind + (f" ({c.dtype})" if c.kind == "ARRAY" and c.dtype != "float64" else "")
            if c.nullable:
                kind += ", *nullable*"
            if c.auto:
                kind += ", autoincrement"
            out.append(f"| {name} | {kind} | {c.doc} |")
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# encoding / decoding


def _json_default(value: Any) -> Any:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: Any) -> str:
    text = json.dumps(value, default=_json_default, allow_nan=True, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a path that is not valid UTF-8: keep it exactly, escaped
        text = json.dumps(value, default=_json_default, allow_nan=True, ensure_ascii=True)
    return text


def _normalise_json(value: Any, what: str) -> Any:
    """``value`` as it will read back (tuples become lists, numpy scalars Python numbers...)."""
    try:
        return json.loads(_dumps(value))
    except (TypeError, ValueError) as e:
        raise SchemaError(f"{what} must be JSON-serialisable: {e}") from None


def _encode(table: Table, col: Column, value: Any) -> Any:
    where = f"table {table.name!r}, column {col.name!r}"
    if value is None:
        if col.required:
            hint = " (write float('nan') for a value that could not be computed)" if col.kind == "REAL" else ""
            raise SchemaError(f"{where}: None given but the column is not nullable{hint}")
        return None
    kind = col.kind
    try:
        if kind == "REAL":
            if isinstance(value, str):
                raise TypeError
            return float(value)
        if kind == "INTEGER":
            if isinstance(value, float) and value.is_integer():
                return int(value)
            return operator.index(value)
        if kind == "BOOL":
            if isinstance(value, (bool, np.bool_)) or value in (0, 1):
                return int(bool(value))
            raise TypeError
        if kind == "TEXT":
            if not isinstance(value, str):
                raise TypeError
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:  # e.g. a message naming a path that is not valid UTF-8
                value = value.encode("utf-8", "backslashreplace").decode("utf-8")
            return value
        if kind == "JSON":
            return _dumps(value)
        # ARRAY
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        arr = np.asarray(value)
        if arr.dtype == object or arr.dtype.kind not in "biuf":
            raise TypeError
        return json.dumps(arr.astype(col.dtype).tolist(), allow_nan=True)
    except (TypeError, ValueError):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise SchemaError(f"{where}: expected {kind}, got {type(value).__name__} {shown}") from None


def _decode(col: Column | None, value: Any, *, nullable_as_none: bool = True) -> Any:
    if col is None:  # a column written by a newer version of landscape
        return value
    if value is None:
        if col.kind == "REAL" and (not col.nullable or not nullable_as_none):
            return math.nan
        return None
    kind = col.kind
    if kind == "REAL":
        return float(value)
    if kind == "INTEGER":
        return int(value)
    if kind == "BOOL":
        return bool(value)
    if kind == "JSON":
        return json.loads(value)
    if kind == "ARRAY":
        return np.asarray(json.loads(value), dtype=col.dtype)
    return value


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


class _Absent:
    def __repr__(self) -> str:
        return "<absent>"


_ABSENT = _Absent()


def _settings_diff(old: Any, new: Any) -> list[tuple[str, Any, Any]]:
    a, b = _flatten(old), _flatten(new)
    diffs = []
    for key in list(a) + [k for k in b if k not in a]:
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va is not vb and va != vb:
            diffs.append((key or "<settings>", va, vb))
    return diffs


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _epoch(iso: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(iso)).timestamp()
    except ValueError:
        return None


def _db_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == DB_NAME else path / DB_NAME


# --------------------------------------------------------------------------------------------------
# writing


class RunStore:
    """Writer of one run folder: creates it, or reopens it to append (resume).

    Args:
        path: the run folder (created, parents included, if missing).
        settings: the measurement-defining configuration (probe settings, recipes...), JSON-serialisable.
            Reopening a run with different settings raises :class:`RunMismatchError`.
        meta: more metadata to store (see the ``meta`` table), e.g. ``{"recipes": [...],
            "model": {...}}``. On resume it overwrites the stored keys, except ``created``.
        writer_lock: a :class:`WriterLock` on ``path`` the caller already holds (it becomes the
            store's, released by :meth:`close`); by default the store takes its own.

    Every :meth:`write` is one transaction; group several writes into one atomic commit with
    :meth:`transaction`. Thread-safe (one lock). Use as a context manager or call :meth:`close`.

    Example:
        >>> store = RunStore(folder, settings={"every": 10})             # doctest: +SKIP
        >>> with store.transaction():                                     # doctest: +SKIP
        ...     store.write("sharpness", rows)
        ...     store.write("lines", line_rows)
    """

    def __init__(self, path: str | Path, *, settings: Mapping[str, Any], meta: Mapping[str, Any] | None = None,
                 writer_lock: WriterLock | None = None):
        if not isinstance(settings, Mapping):
            raise TypeError(f"settings must be a dict, got {type(settings).__name__}")
        meta = dict(meta or {})
        if "settings" in meta:
            raise ValueError("pass the settings as settings=..., not inside meta")
        self.path = Path(path)
        if self.path.exists() and not self.path.is_dir():
            raise NotADirectoryError(f"run folder {self.path} exists and is not a folder")
        self.settings: dict[str, Any] = _normalise_json(dict(settings), "settings")
        meta = {k: _normalise_json(v, f"meta[{k!r}]") for k, v in meta.items()}
        self._lock = threading.RLock()
        self._depth = 0
        self._conn: sqlite3.Connection | None = None
        db = self.path / DB_NAME
        self.path.mkdir(parents=True, exist_ok=True)
        # One writer per folder, decided before the database is touched: a second writer never opens,
        # creates or half-creates it.
        if writer_lock is not None:  # taken earlier by the caller (a store created lazily), now ours
            self._writer = writer_lock
        else:
            self._writer = WriterLock(self.path)
            self._writer.acquire()
        try:
            existed = db.exists()
            conn = sqlite3.connect(str(db), timeout=30.0, isolation_level=None, check_same_thread=False)
            self._conn = conn
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            if existed and self._has_any_table():
                self._open_existing(meta)
            else:  # new, or a file left by a creator that died before its first commit
                self._create(meta)
        except BaseException:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._writer.release()
            raise

    # -- opening

    def _create(self, meta: dict[str, Any]) -> None:
        self._start = time.time()
        meta.setdefault("created", _now_iso())
        with self.transaction():
            self._migrate()
            self._conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            self._put_meta({"settings": self.settings, **meta})

    def _open_existing(self, meta: dict[str, Any]) -> None:
        rows = self._conn.execute(
            "SELECT value FROM meta WHERE key='settings'"
        ).fetchall() if self._has_table("meta") else []
        if not rows:
            raise NotARunError(f"{self.path / DB_NAME} exists but is not a landscape run (no settings stored)")
        old = json.loads(rows[0][0])
        diffs = _settings_diff(old, self.settings)
        if diffs:
            lines = "; ".join(f"{k}: {a!r} (stored) != {b!r} (new)" for k, a, b in diffs)
            raise RunMismatchError(
                f"run folder {self.path} was measured with different settings: {lines}. "
                "Resuming would mix incomparable measurements; choose a new --out folder."
            )
        created = self._conn.execute("SELECT value FROM meta WHERE key='created'").fetchone()
        start = _epoch(json.loads(created[0])) if created else None
        self._start = start if start is not None else time.time()
        meta.pop("created", None)
        with self.transaction():
            self._migrate()
            self._put_meta(meta)
            self.log_event(None, "resume", f"reopened for writing at {_now_iso()}")

    def _has_any_table(self) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' LIMIT 1").fetchone() is not None

    def _has_table(self, name: str) -> bool:
        return self._conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)
        ).fetchone() is not None

    def _migrate(self) -> None:
        for t in _TABLE_LIST:
            if not self._has_table(t.name):
                self._conn.execute(t.create_sql())
                continue
            present = {r[1] for r in self._conn.execute(f'PRAGMA table_info("{t.name}")')}
            for c in t.columns:
                if c.name not in present:
                    self._conn.execute(f'ALTER TABLE "{t.name}" ADD COLUMN "{c.name}" {c.sql_type}')

    def _put_meta(self, meta: Mapping[str, Any]) -> None:
        if meta:
            self._conn.executemany(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                [(str(k), _dumps(v)) for k, v in meta.items()],
            )

    # -- writing

    def _check_open(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"the run store {self.path} is closed")
        return self._conn

    @contextmanager
    def transaction(self) -> Iterator[RunStore]:
        """Group writes into one atomic commit (nestable; an exception rolls the block back)."""
        with self._lock:
            conn = self._check_open()
            name = f"sp{self._depth}"
            conn.execute(f"SAVEPOINT {name}")
            self._depth += 1
            try:
                yield self
            except BaseException:
                self._depth -= 1
                conn.execute(f"ROLLBACK TO {name}")
                conn.execute(f"RELEASE {name}")
                raise
            else:
                self._depth -= 1
                conn.execute(f"RELEASE {name}")  # the outermost RELEASE commits

    def write(self, table: str, rows: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> int:
        """Insert (or replace, by primary key) rows into ``table`` in one transaction.

        Args:
            table: a name in :data:`TABLES`.
            rows: a list of ``{column: value}`` dicts (or one dict). Nullable columns may be
                omitted. Arrays may be lists, numpy arrays or tensors.

        Returns:
            The number of rows written.

        Raises:
            SchemaError: unknown table or column, a required column missing, a wrong type.
        """
        t = _table(table)
        if isinstance(rows, Mapping):
            rows = [rows]
        names = [c.name for c in t.columns if not c.auto]
        auto = [c.name for c in t.columns if c.auto]
        if any(a in row for row in rows for a in auto):
            names += auto
        records = []
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise SchemaError(f"table {table!r}: row {i} is a {type(row).__name__}, not a dict")
            unknown = [k for k in row if k not in t.by_name]
            if unknown:
                raise SchemaError(
                    f"table {table!r}: unknown column(s) {', '.join(map(repr, unknown))}; "
                    f"columns are {', '.join(t.column_names)}"
                )
            missing = [c.name for c in t.columns if c.required and c.name not in row]
            if missing:
                raise SchemaError(f"table {table!r}: row {i} is missing column(s) {', '.join(map(repr, missing))}")
            records.append(tuple(_encode(t, t.by_name[n], row.get(n)) for n in names))
        if not records:
            return 0
        sql = (f'INSERT OR REPLACE INTO "{t.name}" (' + ", ".join(f'"{n}"' for n in names)
               + ") VALUES (" + ", ".join("?" * len(names)) + ")")
        with self.transaction():
            self._conn.executemany(sql, records)
        return len(records)

    def set_meta(self, key: str, value: Any) -> None:
        """Store ``value`` (JSON-serialisable) under ``key`` in the ``meta`` table."""
        if key == "settings":
            raise ValueError("the settings of a run are fixed when it is created")
        value = _normalise_json(value, f"meta[{key!r}]")
        with self.transaction():
            self._put_meta({key: value})

    def truncate_after(self, step: int) -> dict[str, int]:
        """Delete every row recorded for a step after ``step`` (all tables with a step column but the
        ``events`` log), in one transaction: a resume that continues from ``step`` replaces them.

        Returns:
            ``{table: rows deleted}`` for the tables that lost rows.
        """
        out: dict[str, int] = {}
        with self.transaction():
            for t in _TABLE_LIST:
                if t.name == "events" or "step" not in t.by_name or not self._has_table(t.name):
                    continue
                n = self._conn.execute(f'DELETE FROM "{t.name}" WHERE step > ?', (int(step),)).rowcount
                if n:
                    out[t.name] = n
        return out

    def log_event(self, step: int | None, kind: str, message: str) -> None:
        """Append a row to the ``events`` table (``wall`` is filled in)."""
        self.write("events", {"step": step, "kind": kind, "message": message, "wall": self.elapsed()})

    def elapsed(self) -> float:
        """Seconds since the run was created (across resumes): the value for ``wall`` columns."""
        return time.time() - self._start

    def run(self) -> Run:
        """A reader of this run (sees everything committed so far)."""
        return load_run(self.path)

    def close(self) -> None:
        """Close the database (idempotent). Uncommitted work is rolled back."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._writer.release()

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunStore({str(self.path)!r}{', closed' if self.closed else ''})"


# --------------------------------------------------------------------------------------------------
# reading


#: The documented ``meta`` keys whose type readers rely on: (key, types, in words).
_META_TYPES = (
    ("settings", dict, "an object"), ("model", dict, "an object"), ("optimizer", dict, "an object"),
    ("recipes", list, "a list"), ("trained_direction", str, "a string"), ("versions", dict, "an object"),
    ("mode", str, "a string"), ("created", str, "a string"),
)


def load_run(path: str | Path) -> Run:
    """Open a run folder for reading (read-only; works while a writer is active or after it died).

    Args:
        path: the run folder (or its ``run.sqlite``).

    Raises:
        NotARunError: (a :class:`FileNotFoundError`) when there is no run there.
    """
    db = _db_file(path)
    if not db.is_file():
        folder = db.parent
        why = "does not exist" if not folder.exists() else f"has no {DB_NAME}"
        raise NotARunError(f"not a landscape run: {folder} {why}")
    run = Run(db.parent)
    run.meta  # noqa: B018  (fail now, with a clear message, if this is not a run database)
    return run


class Run:
    """Read-only view of a run folder. Every call reads what is committed at that moment; wrap
    several calls in :meth:`snapshot` to read them as of one instant.

    Attributes:
        path: the run folder.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._uri = (self.path / DB_NAME).resolve().as_uri() + "?mode=ro"
        self._snapshot: sqlite3.Connection | None = None

    def _open(self) -> sqlite3.Connection:
        try:
            return sqlite3.connect(self._uri, uri=True, timeout=30.0, isolation_level=None)
        except sqlite3.OperationalError as e:
            raise NotARunError(f"cannot open {self.path / DB_NAME}: {e}") from None

    def _query(self, sql: str, params: Sequence[Any] = ()) -> tuple[list[str], list[tuple]]:
        conn = self._snapshot or self._open()
        try:
            cur = conn.execute(sql, tuple(params))
            names = [d[0] for d in cur.description] if cur.description else []
            return names, cur.fetchall()
        except sqlite3.DatabaseError as e:
            raise NotARunError(f"{self.path / DB_NAME} is not a readable landscape run: {e}") from None
        finally:
            if conn is not self._snapshot:
                conn.close()

    @contextmanager
    def snapshot(self) -> Iterator[Run]:
        """Read several tables as of one instant: inside the block every read sees the same
        committed state, even while a writer keeps committing (one read transaction).

        Example:
            >>> with run.snapshot():                                      # doctest: +SKIP
            ...     steps, lines = run.steps(), run.rows("lines")          # consistent with each other
        """
        if self._snapshot is not None:  # nested: already inside one
            yield self
            return
        conn = self._open()
        try:
            conn.execute("BEGIN")
            conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchall()  # starts the read transaction
        except sqlite3.DatabaseError as e:
            conn.close()
            raise NotARunError(f"{self.path / DB_NAME} is not a readable landscape run: {e}") from None
        self._snapshot = conn
        try:
            yield self
        finally:
            self._snapshot = None
            conn.execute("ROLLBACK")
            conn.close()

    def _exists(self, table: str) -> bool:
        _, rows = self._query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,))
        return bool(rows)

    # -- metadata

    def _damaged(self, what: str) -> DamagedRunError:
        return DamagedRunError(f"the run store {self.path / DB_NAME} is damaged: {what}")

    @property
    def meta(self) -> dict[str, Any]:
        """Every ``meta`` entry, decoded (the documented keys checked for their types).

        Raises:
            DamagedRunError: an entry that is not valid JSON, or a documented key of the wrong type.
        """
        if not self._exists("meta"):
            raise NotARunError(f"{self.path / DB_NAME} is not a landscape run (no meta table)")
        _, rows = self._query("SELECT key, value FROM meta ORDER BY key")
        out = {}
        for k, v in rows:
            try:
                out[k] = json.loads(v)
            except (TypeError, ValueError):
                shown = repr(v) if len(repr(v)) <= 40 else repr(v)[:37] + "..."
                raise self._damaged(f"meta entry {k!r} is not valid JSON ({shown})") from None
        for key, types, name in _META_TYPES:
            if key in out and out[key] is not None and not isinstance(out[key], types):
                raise self._damaged(f"meta entry {key!r} should be {name}, found {type(out[key]).__name__}")
        for key in ("recipes",):
            if isinstance(out.get(key), list) and not all(isinstance(x, str) for x in out[key]):
                raise self._damaged(f"meta entry {key!r} should be a list of names")
        return out

    @property
    def settings(self) -> dict[str, Any]:
        """The measurement-defining configuration the run was created with."""
        return self.meta.get("settings") or {}

    @property
    def trained_direction(self) -> str | None:
        """The name of the trained optimizer's own direction (e.g. ``"adam (trained)"``), if any."""
        return self.meta.get("trained_direction")

    @property
    def directions(self) -> list[str]:
        """Every direction: ``meta["recipes"]`` in order, the trained direction, then any other
        direction found in the ``sharpness``, ``lines`` or ``histograms`` tables."""
        meta = self.meta
        out = list(meta.get("recipes") or [])
        trained = meta.get("trained_direction")
        if trained and trained not in out:
            out.append(trained)
        for table in ("sharpness", "lines", "histograms"):
            if self._exists(table):
                _, rows = self._query(f'SELECT direction FROM "{table}" GROUP BY direction ORDER BY MIN(rowid)')
                out += [d for (d,) in rows if d not in out]
        return out

    # -- rows

    def _select(self, table: str, where: Mapping[str, Any]) -> tuple[Table, list[str], list[tuple]]:
        t = _table(table)
        for key in where:
            if key not in t.by_name:
                raise SchemaError(f"table {table!r} has no column {key!r}; columns are {', '.join(t.column_names)}")
        if not self._exists(table):
            return t, t.column_names, []
        clause = " AND ".join(f'"{k}" = ?' for k in where)
        params = [_encode(t, t.by_name[k], v) for k, v in where.items()]
        order = ", ".join(f'"{k}"' for k in t.primary_key)
        sql = f'SELECT * FROM "{table}"' + (f" WHERE {clause}" if clause else "") + f" ORDER BY {order}"
        names, rows = self._query(sql, params)
        missing = [c for c in t.column_names if c not in names]  # an older run
        if missing:
            rows = [r + (None,) * len(missing) for r in rows]
            names = names + missing
        return t, names, rows

    def _decode(self, table: str, col: Column | None, value: Any, **kw: Any) -> Any:
        try:
            if col is not None and value is not None and col.kind in ("INTEGER", "BOOL") and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
            return _decode(col, value, **kw)
        except (TypeError, ValueError, OverflowError):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise self._damaged(
                f"table {table!r}, column {col.name if col else '?'!r} holds {shown}, not {col.kind if col else '?'}"
            ) from None

    def rows(self, table: str, **where: Any) -> list[dict[str, Any]]:
        """Rows of ``table`` as dicts (arrays as numpy arrays), ordered by primary key.

        Keyword arguments filter on equality, e.g. ``run.rows("lines", step=100)``.

        Raises:
            DamagedRunError: a stored value that does not fit its column.
        """
        t, names, rows = self._select(table, where)
        cols = [t.by_name.get(n) for n in names]
        return [{n: self._decode(table, c, v) for n, c, v in zip(names, cols, r)} for r in rows]

    def columns(self, table: str, **where: Any) -> dict[str, np.ndarray]:
        """Column-wise view of :meth:`rows`: ``REAL`` as float arrays (``nan`` for missing),
        ``INTEGER`` as int64 (float64 with ``nan`` if some are missing), ``BOOL`` as bool, others as
        object arrays (``ARRAY`` cells hold numpy arrays)."""
        t, names, rows = self._select(table, where)
        out: dict[str, np.ndarray] = {}
        for j, name in enumerate(names):
            col = t.by_name.get(name)
            values = [self._decode(table, col, r[j], nullable_as_none=False) for r in rows]
            kind = col.kind if col is not None else None
            if kind == "REAL":
                out[name] = np.array(values, dtype=np.float64)
            elif kind in ("INTEGER", "BOOL") and None not in values:
                out[name] = np.array(values, dtype=np.int64 if kind == "INTEGER" else bool)
            elif kind == "INTEGER":
                out[name] = np.array([math.nan if v is None else v for v in values], dtype=np.float64)
            else:
                arr = np.empty(len(values), dtype=object)
                arr[:] = values
                out[name] = arr
        return out

    def df(self, table: str, **where: Any):
        """:meth:`rows` as a :class:`pandas.DataFrame` (missing ``REAL`` values as NaN)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Run.df needs pandas: pip install 'landscape[pandas]' (or pip install pandas)") from None
        t, names, _ = self._select(table, where)
        cols = self.columns(table, **where)
        return pd.DataFrame({n: cols[n] for n in names})

    def steps(self, table: str = "sharpness") -> list[int]:
        """Sorted distinct steps that have rows in ``table``."""
        t = _table(table)
        if "step" not in t.by_name:
            raise SchemaError(f"table {table!r} has no step column")
        if not self._exists(table):
            return []
        _, rows = self._query(f'SELECT DISTINCT step FROM "{table}" WHERE step IS NOT NULL ORDER BY step')
        return [self._decode(table, t.by_name["step"], s) for (s,) in rows]

    def has(self, table: str) -> bool:
        """Whether ``table`` has at least one row."""
        _table(table)
        if not self._exists(table):
            return False
        _, rows = self._query(f'SELECT 1 FROM "{table}" LIMIT 1')
        return bool(rows)

    def events(self) -> list[dict[str, Any]]:
        """The ``events`` log, oldest first."""
        return self.rows("events")

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run a read-only SQL query; rows as dicts of raw SQLite values (JSON left as text)."""
        names, rows = self._query(sql, params)
        return [dict(zip(names, r)) for r in rows]

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"


if __doc__ is not None:
    __doc__ += "\nTables\n------\n\n" + schema_markdown()


def update_schema_docs(*paths: str | Path) -> list[Path]:
    """Replace the ``### Tables`` section of each Markdown file (up to its next ``##``/``###``
    heading, or the end) with :func:`schema_markdown`; returns the files changed."""
    changed = []
    for path in map(Path, paths):
        text = path.read_text(encoding="utf-8")
        lines = text.split("\n")
        try:
            start = lines.index("### Tables") + 1
        except ValueError:
            raise ValueError(f"{path} has no '### Tables' heading") from None
        end = next((i for i in range(start, len(lines)) if lines[i].startswith(("## ", "### "))), len(lines))
        new = "\n".join(lines[:start] + [""] + schema_markdown().split("\n") + lines[end:])
        if new != text:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    # python -m landscape.store: print the tables section; with file names (docs/store_schema.md
    # README.md), rewrite their "### Tables" sections in place.
    if len(sys.argv) > 1:
        for changed in update_schema_docs(*sys.argv[1:]):
            print(f"updated {changed}")
    else:
        print(schema_markdown())
