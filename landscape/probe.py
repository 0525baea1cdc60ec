"""The probe: seed 002's analysis of a real training run, in two lines of the user's loop.

    probe = ls.Probe(model, loss_fn, probe_batch, out="runs/name", every=50)
    probe.attach(optimizer)          # or: with ls.Probe(...) as probe: probe.attach(optimizer); ...

Each optimizer step, a step pre-hook reads the gradients the optimizer is about to use and feeds them
to the pseudo-update recipes (every optimizer of the seeds, on the *same* trajectory: seed 002
App. B.3). Every ``every`` steps, a post-hook measures on the fixed probe batch, at the point ``x_t``
before the step: the directional sharpness of every recipe's direction and of the real optimizer's
own step ``x_t − x_{t+1}``, the landscape lines, histograms, cosine similarities, and the local
smoothness along the real step. Rows go to a crash-safe run store as soon as they are measured.

The probe never changes training: it reads gradients and parameters, evaluates functionally, restores
every mode, flag and RNG state, and keeps no autograd graph. It never stops training either: a failure
of its own (a full disk, a recipe that cannot handle a gradient, a measurement that raises) is recorded
as an event, warned about once on stderr, and only what failed is switched off (a failed measurement is
skipped; a failure to track or to write turns the probe off for the rest of the run).

Resume: the recipe states (and ``extra_state``) are saved in a state file at every measurement and at
:meth:`Probe.close`, and the run store's commit of that step names the file, so the committed rows and
the states always describe the same step. Re-opening the folder continues from that step, and refuses
when the optimizer it is attached to is elsewhere on its trajectory (a different step count), rather
than continue with stale momenta. Step rows committed after the saved step (a kill between two
measurements) are dropped, and the probe says so. For resume from your own training checkpoints, save
:meth:`Probe.state_dict` in them and call :meth:`Probe.load_state_dict` before :meth:`Probe.attach`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from landscape import tree
from landscape._version import __version__
from landscape.distributed import (
    CollectiveError,
    DistributedError,
    Group,
    assign_recipes,
    dtensor_parameters,
    full_tensor,
    plain_replica,
    unwrap,
)
from landscape.measure import MeasureSettings, measure_step
from landscape.objective import Include, Objective
from landscape.optim import PseudoUpdates, recipe_names
from landscape.points import atomic_save
from landscape.sinks import SinkSet
from landscape.store import RunMismatchError, RunStore, load_run

__all__ = ["Probe", "ProbeHandle", "ResumeError", "batch_fingerprint", "saved_state"]

_STATE_FILE = "pseudo_state.pt"  # written by landscape before the state pointer (read on resume)
_STATE_PREFIX = "probe_state-"
_STATE_FORMAT = "landscape.probe/2"


class ResumeError(RunMismatchError):
    """A run folder cannot be resumed on this trajectory (the optimizer is at another step, or the
    recipe states are missing)."""


def _state_file_name(step: int, rank: int | None = None, world: int | None = None) -> str:
    """``probe_state-<step>.pt``; under torch.distributed each rank's own ``probe_state-<step>.rank<r>of<w>.pt``."""
    if rank is None:
        return f"{_STATE_PREFIX}{step:012d}.pt"
    return f"{_STATE_PREFIX}{step:012d}.rank{rank}of{world}.pt"


def _text(e: BaseException) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:300]


class _PeerDisabled(DistributedError):
    """Another rank's probe switched itself off: every rank follows (no collective is waited for again)."""


class _NullStore:
    """The run store of a rank other than 0: rows are rank 0's to write; events are kept and sent to rank
    0 at the next commit."""

    def __init__(self) -> None:
        self._t0 = time.perf_counter()
        self.events: list[tuple[int | None, str, str]] = []
        self.closed = False

    def write(self, table: str, rows: Any) -> int:
        return len(rows) if isinstance(rows, list) else 1

    def log_event(self, step: int | None, kind: str, message: str) -> None:
        self.events.append((step, kind, message))

    def take_events(self) -> list[tuple[int | None, str, str]]:
        out, self.events = self.events, []
        return out

    @contextlib.contextmanager
    def transaction(self) -> Any:
        yield self

    def set_meta(self, key: str, value: Any) -> None:
        pass

    def truncate_after(self, step: int) -> dict[str, int]:
        return {}

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    def close(self) -> None:
        self.closed = True


class _NoRecipes:
    """The recipe states of a rank that holds none (more ranks than recipes): counts steps only."""

    names: list[str] = []

    def __init__(self) -> None:
        self.step = 0

    def observe(self, grads: Mapping[str, Tensor], *, background: bool = False) -> None:
        self.step += 1

    def directions(self, names: Iterable[str] | None = None) -> dict[str, dict[str, Tensor]]:
        return {}

    def state_bytes(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "moments": {}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.step = int(state["step"])


def saved_state(out: str | Path) -> dict[str, Any] | None:
    """The probe state a run folder's store points to (``{"step", "measurements", "pseudo", "extra",
    ...}``), or ``None`` when the folder has no committed state. Reads only; for scripts that must
    restore their own training state (``extra_state``) before attaching a probe to the folder."""
    out = Path(out)
    try:
        run = load_run(out)
        pointer = run.meta.get("probe_state")
    except Exception:  # noqa: BLE001 - no run there (yet)
        return None
    if not isinstance(pointer, dict) or "file" not in pointer:
        return None
    path = out / str(pointer["file"])
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=True, map_location="cpu")
    return state if int(state.get("step", -1)) == int(pointer.get("step", -2)) else None


def _optimizer_steps(optimizer: torch.optim.Optimizer) -> int | None:
    """How many steps ``optimizer`` has taken, where its state says: the ``step`` entry the Adam family
    (and most of torch.optim) keeps; 0 for a built-in optimizer with no state yet; else ``None``."""
    any_state = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p)
            if st:
                any_state = True
                if "step" in st:
                    try:
                        return int(st["step"])
                    except (TypeError, ValueError, RuntimeError):
                        return None
    if any_state:
        return None
    keeps_state = type(optimizer).__module__.startswith("torch.optim") and not (
        isinstance(optimizer, torch.optim.SGD) and not optimizer.param_groups[0].get("momentum", 0)
    ) and not isinstance(optimizer, torch.optim.LBFGS)
    return 0 if keeps_state else None


def batch_fingerprint(batch: Any) -> str:
    """A short hash of every tensor in ``batch`` (shape, dtype and values): identifies a probe batch."""
    h = hashlib.sha256()

    def visit(obj: Any) -> None:
        if isinstance(obj, Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(obj, Mapping):
            for k in sorted(obj, key=str):
                h.update(str(k).encode())
                visit(obj[k])
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                visit(item)
        else:
            h.update(repr(obj).encode())

    visit(batch)
    return h.hexdigest()[:16]


class ProbeHandle:
    """Returned by :meth:`Probe.attach`; ``remove()`` detaches the hooks (the run store stays open)."""

    def __init__(self, handles: list[Any]) -> None:
        self._handles = handles

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class Probe:
    """Attach seed 002's measurements to a real training run.

    Args:
        model: the model being trained.
        loss_fn: ``loss_fn(model, batch) -> scalar`` evaluated on ``probe_batch``.
        probe_batch: a fixed batch (or list of micro-batches) every measurement uses (seed 002 B.3
            uses 1,024 samples fixed at the start). Its tensors are moved to the model's device if they
            are elsewhere (a CPU batch for a model on a GPU), once.
        out: the run folder. An existing run with the same settings is resumed (appended to); one
            with different settings is refused.
        every: measure every this many optimizer steps (the first step is measured too).
        recipes: pseudo-update recipe names (default: every recipe of ``landscape.optim``).
        mode: ``"eval"`` or ``"train"`` module mode for the measurements.
        include: restrict the measured parameters (names or predicate); the recipes still see every
            trained parameter.
        settings: a :class:`~landscape.measure.MeasureSettings` (lines, histograms, smoothness...).
        state_dtype: storage dtype of the recipe states (e.g. ``torch.bfloat16`` halves their memory).
        state_device: where the recipe states live (default: the parameters' device). ``"cpu"`` keeps
            them in host memory while the model trains on a GPU: each step's gradient is copied to the
            host with pinned, non-blocking copies, and directions return to the GPU when measured
            (see :class:`~landscape.optim.PseudoUpdates`).
        trained_name: the name of the real optimizer's direction (default: ``"<class> (trained)"``).
        save_state: keep the recipe states in the run folder at each measurement (and at close) so a
            resumed run continues with the same momenta. Without it a folder cannot be resumed.
        meta: more metadata for the run store.
        check_determinism: refuse a probe loss that differs between two evaluations.
        extra_state: ``extra_state() -> dict`` of tensors and plain values saved in the same state
            file as the recipe states (and so for the same step), e.g. the model's and optimizer's
            ``state_dict()`` and a data generator's state; :func:`saved_state` reads it back before a
            resume, and :attr:`restored_extra_state` holds it after one.
        save_points: steps whose point ``x_t`` (the model's state before the step) is kept in
            ``out/points/`` with the update directions there (:mod:`landscape.points`), for
            ``landscape plane``: an iterable of steps or a predicate ``step -> bool``. Default: none.
        save_directions: which directions a saved point keeps: ``True`` (every recipe and the
            trained step), ``False`` (none: parameters only, e.g. for a PCA trajectory) or names.
        progress: say what the probe is doing on stderr: in a terminal a status line while it
            measures (``measuring 18 directions at step 120 (lines 4/18)``), elsewhere one line per
            measurement. Off by default (the probe is quiet in your loop).
        sinks: experiment trackers that also receive each measurement's scalars and histograms once
            its rows are committed: TensorBoard ``SummaryWriter`` objects, ``wandb`` runs, MLflow runs, functions (see
            :mod:`landscape.sinks` for the tags). A sink that fails is switched off alone.
        start_step: attaching to a run already in progress, with a new ``out`` folder: the optimizer
            steps taken before. Default: the optimizer's own step count (Adam's ``step``; 0 for a fresh
            optimizer); pass it for an optimizer that keeps none (plain SGD). Steps are then numbered as
            the optimizer's, the first one seen is measured, and the recipes' states start from zero
            there. Ignored when ``out`` holds a run to resume.
        background: update the recipe states on a side thread, overlapping the next forward and
            backward pass: the gradients are copied and checked in the step hook, the states updated
            while training goes on (the probe waits for them before it measures or saves, so every
            number is the same, bit for bit). It helps where training leaves a CPU core idle. Default
            (``None``): on when the trained parameters are on the CPU, the states too, and torch uses
            fewer threads than the process has cores; off on a GPU (the kernels would still queue on
            the training stream) and under torch.distributed.

    Under torch.distributed (``torchrun``; DDP or FSDP2) create and attach the probe on every rank with
    the same arguments: the recipes are divided among the ranks and rank 0 alone writes ``out`` (see
    :mod:`landscape.distributed`). ``model`` may be the DDP-wrapped model or its inner module.

    Example:
        >>> probe = ls.Probe(model, loss_fn, probe_batch, out="runs/adam", every=50)   # doctest: +SKIP
        >>> with probe:                                                                 # doctest: +SKIP
        ...     probe.attach(optimizer)
        ...     for batch in loader:
        ...         loss = loss_fn(model, batch); loss.backward()
        ...         probe.log_loss(loss)        # optional: the training loss of this step
        ...         optimizer.step(); optimizer.zero_grad()
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[[nn.Module, Any], Tensor],
        probe_batch: Any,
        out: str | Path,
        *,
        every: int = 50,
        recipes: Iterable[str] | None = None,
        mode: str = "eval",
        include: Include = None,
        settings: MeasureSettings | None = None,
        state_dtype: torch.dtype | None = None,
        state_device: str | torch.device | None = None,
        trained_name: str | None = None,
        save_state: bool = True,
        meta: Mapping[str, Any] | None = None,
        check_determinism: bool = True,
        extra_state: Callable[[], Any] | None = None,
        save_points: Iterable[int] | Callable[[int], bool] | None = None,
        save_directions: bool | Iterable[str] = True,
        progress: bool | Any = False,
        sinks: Iterable[Any] | None = None,
        start_step: int | None = None,
        background: bool | None = None,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if start_step is not None and (isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0):
            raise ValueError(f"start_step must be a non-negative integer (optimizer steps already taken), got {start_step!r}")
        # torch.distributed: checked before anything of the model is touched (see landscape.distributed)
        self._group = Group.current()
        model = unwrap(model)  # DDP's / DataParallel's inner module: names without the "module." prefix
        self._fsdp: nn.Module | None = None  # the sharded model (FSDP2), whose gradients the probe reads
        if dtensor_parameters(model):
            # FSDP2 (fully_shard): measured on a plain replica with the full parameters (landscape.distributed)
            self._fsdp = model
            model = plain_replica(model)
        if self._fsdp is not None and save_points is not None:
            raise ValueError("save_points is not available with FSDP2 (fully_shard) yet: save points in a DDP or "
                             "one-process run")
        if self._group is not None and self._group.rank != 0:
            progress = False  # rank 0 speaks for the job
        self._keep = _keep_rule(save_points)
        self._keep_directions = save_directions if isinstance(save_directions, bool) else list(save_directions)
        self.model = model
        self.loss_fn = loss_fn
        self.every = every
        self.settings = settings or MeasureSettings()
        self.recipes = list(recipes) if recipes is not None else list(recipe_names())
        unknown = [r for r in self.recipes if r not in recipe_names()]
        if unknown:
            raise KeyError(f"unknown recipes {unknown}; available: {list(recipe_names())}")
        self.objective = Objective(model, loss_fn, probe_batch, mode=mode, include=include, check_determinism=check_determinism)
        self.out = Path(out)
        self.trained_name = trained_name
        self.save_state = save_state
        self._state_dtype = state_dtype
        from landscape.optim.pseudo import _check_device

        self._state_device = _check_device(state_device)  # a bad device fails here, not at attach
        self._extra_meta = dict(meta or {})
        self._fingerprint = batch_fingerprint(probe_batch)
        self._store: RunStore | None = None
        self._pseudo: PseudoUpdates | None = None
        self._names: list[str] = []  # trained parameter names, in model order
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: ProbeHandle | None = None
        self.step = 0  # optimizer steps seen (the number of the step in progress while it runs)
        self._start_step = start_step
        # the recipe states updated on a side thread while training goes on (one process only); None:
        # decided when the run opens (_auto_background)
        self._background: bool | None = None if background is None else bool(background) and self._group is None
        self._first_step = 1  # the first step this probe records (after the steps a mid-run attach skipped)
        self._pending: dict[str, Any] | None = None
        self._pending_loss: float | None = None
        self._step_rows: list[dict[str, Any]] = []
        self._measurements = 0
        self.timings = {"tracking": 0.0, "measurement": 0.0}
        self.last_error: str | None = None
        self.disabled: str | None = None  # why the probe switched itself off (None while it works)
        self._warned: set[str] = set()
        self._extra_state = extra_state
        self._loaded_state: Mapping[str, Any] | None = None  # from load_state_dict, applied when the run opens
        self.restored_extra_state: Any = None
        self.engine: str | None = None  # the sharpness engine of the last measurement ("taylor", "hvp")
        from landscape._progress import Progress, probe_printer

        self._progress = probe_printer(progress)
        self._own_progress = self._progress is not None and not isinstance(progress, Progress)
        self.sinks = SinkSet(sinks)  # trackers fed after each commit (landscape.sinks)
        self._left = False  # distributed: this rank no longer meets the others in collectives
        self._due_pending = False  # distributed, switched off: the others will wait for this rank at this step
        self._synced_step = -1  # distributed: the last step whose measurement the ranks met for
        self._trained_rank = 0
        self._shards: list[list[str]] = []

    # ------------------------------------------------------------------ setup
    def _trained_params(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        if optimizer is None:
            return {n: p for n, p in named.items() if p.requires_grad}
        # FSDP2: the optimizer holds the sharded model's parameters; the replica's have the same names
        by_id = {id(p): n for n, p in (self._fsdp or self.model).named_parameters()}
        chosen: dict[str, Tensor] = {}
        foreign = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                n = by_id.get(id(p))
                if n is None:
                    foreign += 1
                else:
                    chosen[n] = named[n]
        if foreign:
            warnings.warn(f"{foreign} optimizer parameter(s) do not belong to the probed model; they are ignored", stacklevel=3)
        if not chosen:
            raise ValueError("the optimizer trains none of the model's parameters")
        return {n: chosen[n] for n in named if n in chosen}

    def _auto_background(self, params: Mapping[str, Tensor]) -> bool:
        """``background=None``: a side thread for the states where it can run beside training."""
        if self._group is not None or self._state_device is not None:
            return False
        if any(p.device.type != "cpu" for p in params.values()):
            return False
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        return torch.get_num_threads() < cores

    def _open(self, optimizer: torch.optim.Optimizer | None) -> None:
        params = self._trained_params(optimizer)
        if self._background is None:
            self._background = self._auto_background(params)
        self._names = list(params)
        missing = [n for n in self.objective.names if n not in params]
        if missing:
            raise ValueError(
                f"measured parameters {missing[:5]} are not trained by the optimizer; pass include= to "
                "restrict the measurement to trained parameters"
            )
        if self.trained_name is None:
            self.trained_name = f"{type(optimizer).__name__.lower()} (trained)" if optimizer is not None else "trained"
        model_sig = hashlib.sha256(
            "".join(f"{n}{tuple(p.shape)}{p.dtype}" for n, p in self.model.named_parameters()).encode()
        ).hexdigest()[:16]
        settings = {
            "every": self.every,
            "recipes": self.recipes,
            "mode": self.objective.mode,
            "measured": list(self.objective.names) if len(self.objective.names) <= 64 else hashlib.sha256(
                "|".join(self.objective.names).encode()
            ).hexdigest()[:16],
            "probe_batch": self._fingerprint,
            "model": model_sig,
            "trained_direction": self.trained_name,
            "state_dtype": str(self._state_dtype) if self._state_dtype else None,
            "measure": self.settings.as_dict(),
        }
        hyper = {}
        if optimizer is not None:
            hyper = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
            hyper = {k: (v if isinstance(v, (int, float, str, bool, type(None))) else list(v) if isinstance(v, tuple) else repr(v)) for k, v in hyper.items()}
        n_params = sum(p.numel() for p in self.model.parameters())
        n_measured = sum(p.numel() for n, p in self.model.named_parameters() if n in self.objective.names)
        meta = {
            "model": {"class": type(self.model).__name__, "n_params": n_params, "n_measured": n_measured},
            "optimizer": {"class": type(optimizer).__name__ if optimizer is not None else None, "hyperparameters": hyper},
            "recipes": self.recipes,
            "trained_direction": self.trained_name,
            "versions": {"landscape": __version__, "torch": torch.__version__, "python": platform.python_version()},
            "mode": self.objective.mode,
            "command": " ".join(sys.argv),
            "tracking": {"background": bool(self._background)},
            **self._extra_meta,
        }
        if self._group is not None:
            self._open_distributed(params, settings, meta, optimizer)
            return
        self._store = RunStore(self.out, settings=settings, meta=meta)
        try:
            self._pseudo = PseudoUpdates(
                {n: p.detach() for n, p in params.items()}, self.recipes, state_dtype=self._state_dtype,
                state_device=self._state_device,
            )
            self._resume(optimizer)
        except BaseException:
            self._store.close()
            self._store = None
            self._pseudo = None
            raise

    def _open_distributed(self, params: Mapping[str, Tensor], settings: dict[str, Any], meta: dict[str, Any],
                          optimizer: torch.optim.Optimizer | None) -> None:
        """Under torch.distributed: check every rank runs the same probe, divide the recipes among the
        ranks, open the store on rank 0 only, and resume each rank's shard. A failure on any rank raises on
        every rank (landscape.distributed)."""
        g = self._group
        assert g is not None
        shards = assign_recipes(params, self.recipes, g.world, state_dtype=self._state_dtype)
        counts = [len(x) for x in shards]
        # the trained step goes where the fewest directions are (rank 0 when it holds no recipe)
        self._trained_rank = 0 if not shards[0] else min(range(g.world), key=lambda k: (counts[k], -k))
        self._shards = shards
        g.handshake({"settings": settings, "world": g.world, "recipes_by_rank": shards, "trained": self._names})
        meta = {**meta, "distributed": {"world": g.world, "backend": g.backend, "recipes_by_rank": shards,
                                        "trained_direction_rank": self._trained_rank}}
        self._store = g.agree(lambda: RunStore(self.out, settings=settings, meta=meta) if g.rank == 0 else _NullStore(),
                              "opening the run store")
        try:
            mine = shards[g.rank]
            local = {n: p.detach() for n, p in params.items()}
            self._pseudo = g.agree(
                lambda: PseudoUpdates(local, mine, state_dtype=self._state_dtype) if mine else _NoRecipes(),
                "building the recipe states")
            self._resume_distributed(optimizer)
        except BaseException:
            self._store.close()
            self._store = None
            self._pseudo = None
            raise

    def _world_error(self, saved: int, what: str) -> ResumeError:
        g = self._group
        now = g.world if g is not None else 1
        return ResumeError(
            f"run folder {self.out}: {what} written by {saved} process(es), but this job has {now}: the recipe "
            f"states are divided among the ranks, so the run resumes only with the same world size. Resume it "
            f"with {saved} process(es) (torchrun --nproc_per_node {saved}), or write to a new out folder"
        )

    def _resume_distributed(self, optimizer: torch.optim.Optimizer | None) -> None:
        """:meth:`_resume` under torch.distributed: rank 0 reads the folder, every rank loads its own state
        file; a refusal on any rank (another world size, a missing file, another optimizer step) is raised
        on every rank."""
        g = self._group
        assert g is not None and self._store is not None and self._pseudo is not None

        def read() -> dict[str, Any] | None:
            if g.rank != 0:
                return None
            run = self._store.run()  # type: ignore[union-attr]
            pointer = run.meta.get("probe_state")
            return {"done": len(run.steps("steps")), "pointer": pointer if isinstance(pointer, dict) else None,
                    "legacy": (self.out / _STATE_FILE).is_file()}

        info = g.all_gather_object(g.agree(read, "reading the run folder"))[0]

        def load() -> tuple[Mapping[str, Any], str] | None:
            pointer = info["pointer"]
            state: Mapping[str, Any] | None = None
            source = ""
            if self._loaded_state is not None:
                loaded = self._loaded_state
                saved = int(loaded.get("world", 1))
                if saved != g.world:
                    raise self._world_error(saved, "the state_dict given to load_state_dict was")
                shards = loaded.get("shards")
                if shards is None:
                    raise ResumeError(
                        f"load_state_dict on rank {g.rank} was given the stub Probe.state_dict() returns on ranks "
                        "other than 0: give every rank the state_dict() rank 0 returned (it holds every rank's part)")
                state = {**loaded, "pseudo": shards[g.rank]}
                source = "the state_dict given to load_state_dict"
            elif pointer is not None and "file" in pointer:
                saved = int(pointer.get("world", 1))
                if saved != g.world:
                    raise self._world_error(saved, "its recipe states were")
                path = self.out / str(pointer["files"][g.rank])
                if not path.is_file():
                    raise ResumeError(
                        f"run folder {self.out}: the recipe states of rank {g.rank}, {path.name} (step "
                        f"{pointer.get('step')}), are missing, so it cannot be resumed on the same trajectory; "
                        "write to a new out folder")
                state, source = torch.load(path, weights_only=True, map_location="cpu"), path.name
            elif info["legacy"] and info["done"]:
                raise self._world_error(1, "its recipe states were")
            if state is None:
                if info["done"]:
                    raise ResumeError(
                        f"run folder {self.out} holds {info['done']} training steps but no saved recipe states, so it "
                        "cannot be resumed on the same trajectory; write to a new out folder")
                return {"start": self._starting_step(optimizer)}
            self._check_optimizer_step(optimizer, int(state["step"]))
            self._pseudo.load_state_dict(state["pseudo"])  # type: ignore[union-attr]
            return state, source

        loaded = g.agree(load, "resuming the run folder")
        if isinstance(loaded, dict):  # a new folder
            starts = {int(x) for x in g.all_gather_object(loaded["start"])}
            if len(starts) != 1:
                raise ResumeError(f"the ranks' optimizers have taken different numbers of steps ({sorted(starts)}): "
                                  "attach the probe at the same step on every rank")
            self._start_at(loaded["start"])
            return
        state, source = loaded
        step = int(state["step"])
        self._measurements = int(state.get("measurements", 0))
        self.restored_extra_state = state.get("extra")
        self.step = step
        if g.rank == 0:
            dropped = self._store.truncate_after(step)
            message = f"resumed after step {step} on {g.world} ranks: recipe states and {self._measurements} measurement(s)"
            if sum(dropped.values()):
                message += f"; dropped {dropped.get('steps', 0)} step row(s) recorded after step {step}"
            self._store.log_event(step, "resume", message)
            print(f"landscape: {self.out}: {message}", file=sys.stderr)

    def _resume(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Continue a run folder from its saved state, or refuse (see the module docstring)."""
        assert self._store is not None and self._pseudo is not None
        run = self._store.run()
        done = run.steps("steps")
        pointer = run.meta.get("probe_state")
        state: Mapping[str, Any] | None = None
        source = ""
        if self._loaded_state is not None:
            state, source = self._loaded_state, "the state_dict given to load_state_dict"
            if int(state.get("world", 1)) != 1:
                raise self._world_error(int(state["world"]), "the state_dict given to load_state_dict was")
        elif isinstance(pointer, dict) and "file" in pointer:
            if int(pointer.get("world", 1)) != 1:
                raise self._world_error(int(pointer["world"]), "its recipe states were")
            path = self.out / str(pointer["file"])
            if not path.is_file():
                raise ResumeError(
                    f"run folder {self.out}: its recipe states {path.name} (step {pointer.get('step')}) are missing, "
                    "so it cannot be resumed on the same trajectory; write to a new out folder"
                )
            state, source = torch.load(path, weights_only=True, map_location="cpu"), path.name
        elif (self.out / _STATE_FILE).is_file() and done:  # written by an older landscape
            state, source = torch.load(self.out / _STATE_FILE, weights_only=True, map_location="cpu"), _STATE_FILE
            if int(state.get("step", -1)) != max(done):
                raise ResumeError(
                    f"run folder {self.out}: its recipe states were saved at step {state.get('step')} but it recorded "
                    f"steps up to {max(done)} (an older landscape saved them apart), so a resume would continue "
                    "with stale momenta; write to a new out folder"
                )
        if state is None:
            if done:
                raise ResumeError(
                    f"run folder {self.out} holds {len(done)} training steps but no saved recipe states (it was "
                    "written with save_state=False, or stopped before its first measurement), so it cannot be "
                    "resumed on the same trajectory; write to a new out folder"
                )
            self._start_at(self._starting_step(optimizer))
            return
        step = int(state["step"])
        self._check_optimizer_step(optimizer, step)
        self._pseudo.load_state_dict(state["pseudo"])
        self._measurements = int(state.get("measurements", 0))
        self.restored_extra_state = state.get("extra")
        self.step = step
        dropped = self._store.truncate_after(step)
        n_dropped = sum(dropped.values())
        message = (
            f"resumed after step {step}: recipe states and {self._measurements} measurement(s) from {source}"
            + (f"; dropped {dropped.get('steps', 0)} step row(s) and {n_dropped - dropped.get('steps', 0)} other row(s) "
               f"recorded after step {step}" if n_dropped else "")
        )
        self._store.log_event(step, "resume", message)
        print(f"landscape: {self.out}: {message}", file=sys.stderr)

    def _starting_step(self, optimizer: torch.optim.Optimizer | None) -> int:
        """A new run folder: the optimizer steps taken before the probe was attached, from ``start_step``
        or the optimizer's own step count (0 for a fresh optimizer, or one that keeps no count)."""
        taken = _optimizer_steps(optimizer) if optimizer is not None else None
        if self._start_step is None:
            return taken or 0
        if taken is not None and taken != self._start_step:
            raise ValueError(
                f"start_step={self._start_step}, but the optimizer has taken {taken} steps: pass the number of steps "
                "the optimizer has taken (or leave start_step out to take it from the optimizer)")
        return self._start_step

    def _start_at(self, start: int) -> None:
        """Begin a new run folder after ``start`` steps of training the probe did not see: the step rows are
        numbered as the optimizer's steps, the first step seen is measured, and the recipe states start from
        zero there (their momenta hold only the gradients seen from then on)."""
        if not start:
            return
        self.step = start
        self._first_step = start + 1
        if self._store is not None:
            self._store.set_meta("start_step", start)
            self._store.log_event(start, "attach", (
                f"attached after {start} optimizer steps: steps are numbered from {start + 1}, which is measured; "
                "the recipes' states start from zero there, so their momenta hold only the gradients seen since"))

    def _check_optimizer_step(self, optimizer: torch.optim.Optimizer | None, step: int) -> None:
        if optimizer is None:
            return
        taken = _optimizer_steps(optimizer)
        if taken is None:
            if step:
                warnings.warn(
                    f"landscape probe: resuming {self.out} after step {step}; {type(optimizer).__name__} keeps no step "
                    "count, so the probe cannot check that training resumed from the same step", stacklevel=4
                )
            return
        if taken != step:
            what = "a new optimizer" if taken == 0 else f"an optimizer that has taken {taken} steps"
            raise ResumeError(
                f"run folder {self.out} continues a trajectory whose probe state is at step {step}, but it is being "
                f"attached to {what}: the measurements would mix two trajectories. Resume training from its "
                f"checkpoint of step {step}, load the probe's state_dict() saved with your checkpoint "
                "(Probe.load_state_dict), or write to a new out folder"
            )

    def attach(self, optimizer: torch.optim.Optimizer) -> ProbeHandle:
        """Register step hooks on ``optimizer`` (any ``torch.optim.Optimizer``). Returns a handle whose
        ``remove()`` detaches them; :meth:`close` also does, and flushes the store."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handle is not None:
            raise RuntimeError("this probe is already attached; close() it first")
        self._optimizer = optimizer
        if self._store is None:
            self._open(optimizer)
        pre = optimizer.register_step_pre_hook(self._pre_hook)
        post = optimizer.register_step_post_hook(self._post_hook)
        self._handle = ProbeHandle([pre, post])
        return self._handle

    def _post_hook(self, optimizer: Any, args: tuple, kwargs: dict) -> None:
        self._guarded(self._after_step)
        self._announce_if_due()

    # A rank whose probe switched itself off on its own (a recipe failed on its gradients) keeps counting
    # steps and tells the others at the next point where they wait for it (a measurement or close), so
    # that they switch off too instead of waiting in a collective.
    def _count_disabled_step(self) -> None:
        if self._group is not None and not self._left:
            self.step += 1
            self._due_pending = self._is_due(self.step)
            if self._fsdp is not None:  # the others gather the gradients (and at a due step x_t): join them
                try:
                    self._grads(None)
                    if self._due_pending:
                        self._snapshot()
                except Exception:  # noqa: BLE001 - the others are gone
                    self._left = True

    def _announce_if_due(self) -> None:
        if self._group is not None and self.disabled is not None and not self._left and self._due_pending:
            self._announce()

    def _announce(self) -> None:
        self._left = True
        self._due_pending = False
        try:
            self._group.all_gather_object({"disabled": self.disabled})  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - the others may be gone already
            pass

    def _is_due(self, step: int) -> bool:
        return step == self._first_step or step % self.every == 0

    def _sync(self, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The first exchange of every point where the ranks meet (a measurement, a commit): raises
        :class:`_PeerDisabled` on every rank when one rank's probe has switched itself off."""
        assert self._group is not None
        out = self._group.all_gather_object({"disabled": None, **payload})
        off = [(r, p["disabled"]) for r, p in enumerate(out) if p.get("disabled")]
        if off:
            r, why = off[0]
            raise _PeerDisabled(f"the probe of rank {r} switched itself off ({why})")
        return out

    def _pre_hook(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self.disabled is not None:
            self._count_disabled_step()
            return None
        # torch passes the step's own args, the optimizer first: step(self, closure=None)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self._guarded(self._before_step, stage="tracking")
            return None
        # step(closure) (LBFGS, ...): the gradients of x_t exist only once the closure has run; its first
        # call evaluates at x_t, before the optimizer moves anything.
        first = [True]

        def closure_then_read() -> Any:
            loss = closure()
            if first[0]:
                first[0] = False
                if self._pending_loss is None and isinstance(loss, (Tensor, float, int)):
                    self.log_loss(loss)
                self._guarded(self._before_step, stage="tracking")
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_read}
        return (args[0], closure_then_read, *args[2:]), kwargs

    # ------------------------------------------------------------------ failures never stop training
    def _guarded(self, fn: Callable[..., Any], *args: Any, stage: str = "writing") -> Any:
        """Run one of the probe's own steps; a failure is recorded and switches the probe off instead of
        propagating into the user's ``optimizer.step()``."""
        if self.disabled is not None:
            return None
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the user's training must go on
            self._fail(stage, e, disable=True)
            return None

    def _fail(self, stage: str, e: BaseException, *, disable: bool) -> None:
        first = " ".join(str(e).split())[:300]
        message = f"{stage} failed at step {self.step}: {type(e).__name__}: {first}"
        self.last_error = message
        if disable:
            self.disabled = message
            if self._group is not None:
                # agreed on every rank (a _sync or Group.agree failure), or a collective that failed: no
                # rank waits for this one again. Otherwise it tells the others at the next meeting point.
                self._left = isinstance(e, DistributedError) or "agreed" in getattr(e, "__dict__", {})
                self._due_pending = self._is_due(self.step) and self._synced_step != self.step
            self._pending = None
            self._step_rows = []
            self._pseudo = None  # give the recipe states' memory back
        try:
            if self._store is not None:
                self._store.log_event(self.step, "probe-failure" if disable else "measurement-failed", message)
        except Exception:  # noqa: BLE001 - the store may be what failed (a full disk)
            pass
        if stage not in self._warned:
            self._warned.add(stage)
            tail = ("; the probe is off for the rest of this run, training goes on" if disable else
                    "; this measurement is skipped, training goes on")
            warnings.warn(f"landscape probe: {message}{tail}", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ the loop
    def log_loss(self, loss: float | Tensor) -> None:
        """Record the training loss of the step about to be taken (optional)."""
        self._pending_loss = float(loss.detach()) if isinstance(loss, Tensor) else float(loss)

    def observe(
        self,
        grads: Mapping[str, Tensor] | None = None,
        loss: float | Tensor | None = None,
        *,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Manual form, for loops without a ``torch.optim`` step hook: call once per step after the
        backward pass and before the parameters change. ``grads`` default to the parameters'
        ``.grad``. ``optimizer`` (optional): the optimizer the loop steps; its hyperparameters and
        trained parameters are recorded when the run opens and its learning rate at every step. The
        step's measurement completes at the next call (or at :meth:`close`), when the real update
        ``x_t − x_{t+1}`` is known."""
        if optimizer is not None:
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(f"observe: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
            if self._optimizer is None:
                self._optimizer = optimizer
        if self._store is None:
            self._open(optimizer)
        if self.disabled is not None:
            self._announce_if_due()
            self._count_disabled_step()
            return
        if grads is not None:  # the caller's mistakes are the caller's: checked before anything else
            missing = [n for n in self._names if n not in grads]
            if missing:
                raise KeyError(f"observe: gradients missing for {missing[:5]}")
        if self._pending is not None:
            self._guarded(self._after_step)
        if loss is not None:
            self.log_loss(loss)
        self._guarded(self._before_step, grads, stage="tracking")

    def _grads(self, grads: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        if self._fsdp is not None and grads is None:  # FSDP2: each sharded gradient gathered (a collective)
            live = dict(self._fsdp.named_parameters())
            return {n: full_tensor(live[n].grad) if live[n].grad is not None else torch.zeros_like(self._params_of(n))
                    for n in self._names}
        named = dict(self.model.named_parameters())
        if grads is None:
            out = {n: named[n].grad if named[n].grad is not None else torch.zeros_like(named[n]) for n in self._names}
        else:
            out = {n: grads[n] for n in self._names}
        # sparse gradients (nn.Embedding(sparse=True)): the recipes' states are dense anyway
        return {n: g.to_dense() if g.layout != torch.strided else g for n, g in out.items()}

    def _lr(self) -> float | None:
        if self._optimizer is None:
            return None
        lr = self._optimizer.param_groups[0].get("lr")
        return float(lr) if isinstance(lr, (int, float)) or torch.is_tensor(lr) else None

    def _before_step(self, grads: Mapping[str, Tensor] | None = None) -> None:
        t0 = time.perf_counter()
        self.step += 1
        assert self._pseudo is not None
        g = self._grads(grads)
        x_t = None
        if self._fsdp is not None and self._is_due(self.step):  # its collectives before anything can fail
            x_t = self._snapshot()
        row = {"step": self.step, "loss": self._pending_loss, "lr": self._lr(), "status": "ok", "reason": None}
        self._pending_loss = None
        due = self._is_due(self.step)
        keep = self._keep(self.step)
        try:
            self._pseudo.observe(g, background=bool(self._background) and not (due or keep))
            # the norm observe's finiteness check computed on its packed copy of g (one pass fewer)
            gnorm = getattr(self._pseudo, "grad_norm", None)
            if gnorm is None:
                gnorm = float(tree.norm(g))
        except ValueError as e:
            row.update(status="skipped", reason=str(e).splitlines()[0], grad_norm=float("nan"))
            self._record_step(row)
            self._store.log_event(self.step, "skip", f"step {self.step} skipped: {e}")
            self._pending = None
            self.timings["tracking"] += time.perf_counter() - t0
            return
        row["grad_norm"] = gnorm
        if x_t is None and (due or keep):
            x_t = self._snapshot()
        self._pending = {"row": row, "x_t": x_t, "due": due, "keep": keep}
        self.timings["tracking"] += time.perf_counter() - t0

    def _params_of(self, name: str) -> Tensor:
        return dict(self.model.named_parameters())[name]

    def _snapshot(self) -> dict[str, Tensor]:
        if self._fsdp is not None:  # FSDP2: the full parameters, gathered (a collective)
            live = dict(self._fsdp.named_parameters())
            return {n: full_tensor(live[n]).detach().clone() for n in self._names}
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().clone() for n in self._names}

    def _after_step(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._record_step(pending["row"])
        if pending["x_t"] is None:
            return
        if pending["keep"]:
            self._keep_point(pending["row"]["step"], pending["x_t"])
        if not pending["due"]:
            return
        t0 = time.perf_counter()
        step = pending["row"]["step"]
        try:
            try:
                if self._group is None:
                    rows = self._measure(step, pending["x_t"])
                else:
                    rows = self._measure_distributed(step, pending["x_t"])
            except (_PeerDisabled, CollectiveError) as e:  # every rank switches off; no collective again
                self._fail("the probe on another rank" if isinstance(e, _PeerDisabled) else "a collective", e, disable=True)
                return
            except Exception as e:  # noqa: BLE001 - a failed measurement is skipped, training goes on
                self._fail("measurement", e, disable=False)
                rows = {}
            self._commit(rows)  # a failure to write propagates to _guarded: the probe switches off
            if rows:
                self.sinks.publish(step, rows, self._sink_event)  # committed rows only; never raises
        finally:
            self.timings["measurement"] += time.perf_counter() - t0

    def _sink_event(self, kind: str, message: str) -> None:
        if self._store is not None:
            self._store.log_event(self.step, kind, message)

    def _record_step(self, row: dict[str, Any]) -> None:
        assert self._store is not None
        row = {k: (float("nan") if k in ("loss", "lr", "grad_norm") and v is None else v) for k, v in row.items()}
        row["wall"] = self._store.elapsed()
        self._step_rows.append(row)
        if len(self._step_rows) >= 50:
            self._flush_steps()

    def _flush_steps(self) -> None:
        if self._step_rows and self._store is not None:
            self._store.write("steps", self._step_rows)
            self._step_rows = []

    def _measure(self, step: int, x_t: dict[str, Tensor]) -> dict[str, list[dict[str, Any]]]:
        assert self._pseudo is not None and self._store is not None
        from landscape.measure import pseudo_source

        x_next = self._snapshot()
        real = tree.sub(x_t, x_next)
        names = self.objective.names
        extra = {}
        if float(tree.norm({n: real[n] for n in names})) > 0:
            extra[self.trained_name] = real
        else:
            self._store.log_event(step, "warning", "the optimizer did not move the measured parameters this step")
        # The recipes' directions are computed from their states a chunk at a time while measuring
        # (MeasureSettings.chunk), never all at once.
        dirs = pseudo_source(self._pseudo, extra)
        at = {n: x_t[n] for n in names}
        progress = self._progress
        if progress is not None:
            progress.measuring(step, len(dirs))
        try:
            rows = measure_step(
                self.objective,
                step,
                at,
                dirs,
                x_next={n: x_next[n] for n in names},
                settings=self.settings,
                measurement_index=self._measurements,
                progress=progress.phase_callback(step, len(dirs)) if progress is not None else None,
                preconditioners=self._preconditioners(),
            )
        finally:
            if progress is not None:
                seconds = progress.measured()
                if self._own_progress:
                    progress.close(f"{progress.what}: measured {len(dirs)} directions at step {step} in {seconds:.1f} s")
        self._measurements += 1
        rows.pop("_grad", None)
        for event in rows.pop("_events", []):
            self._store.log_event(step, "warning", event["message"])
        self.last_timings = rows.pop("_timings", [{}])[0]
        return rows

    # ------------------------------------------------------------------ torch.distributed
    def _rank_settings(self) -> MeasureSettings:
        """This rank's part of the measurement: its directions everywhere; cosines by collectives (so off
        in measure_step); smoothness, robust smoothness, eigenvalues, traces and densities on rank 0."""
        g = self._group
        assert g is not None
        st = dataclasses.replace(self.settings, cosine=False)
        if g.rank != 0:
            curv = st.curvature
            if curv is not None:
                curv = dataclasses.replace(curv, eig_every=0, trace_every=0, density_every=0)
            st = dataclasses.replace(st, smoothness=False, robust_every=0, curvature=curv)
        return st

    def _measure_distributed(self, step: int, x_t: dict[str, Tensor]) -> dict[str, list[dict[str, Any]]]:
        """:meth:`_measure` with the directions divided among the ranks (landscape.distributed); returns
        the merged rows on rank 0 and ``{}`` elsewhere. A failure on any rank raises on every rank."""
        g = self._group
        assert g is not None and self._pseudo is not None and self._store is not None
        from landscape.measure import DirectionSource, pseudo_source

        names = self.objective.names
        self._sync({})  # a rank that switched off says so here, before any other collective
        self._synced_step = step
        x_next = self._snapshot()
        # The rank's recipes' directions are computed from their states a chunk at a time
        # (MeasureSettings.chunk), by the cross-rank Gram matrix and by measure_step alike, never all at
        # once; the trained step (already materialised as x_t − x_{t+1}) joins them on its rank.
        source = DirectionSource([], lambda wanted: {})
        err = None
        try:
            extra: dict[str, dict[str, Tensor]] = {}
            if g.rank == self._trained_rank:
                real = tree.sub(x_t, x_next)
                if float(tree.norm({n: real[n] for n in names})) > 0:
                    extra[str(self.trained_name)] = {n: real[n] for n in names}
                else:
                    self._store.log_event(step, "warning", "the optimizer did not move the measured parameters this step")
            source = pseudo_source(self._pseudo, extra)
        except Exception as e:  # noqa: BLE001 - told to every rank below
            err = _text(e)
        status = self._group.all_gather_object({"error": err, "names": list(source.names)})
        failed = [(r, p["error"]) for r, p in enumerate(status) if p["error"]]
        if failed:
            raise DistributedError(f"the directions of rank {failed[0][0]} could not be computed: {failed[0][1]}")
        owner = {n: r for r, p in enumerate(status) for n in p["names"]}
        order = [n for n in [*self.recipes, str(self.trained_name)] if n in owner]
        cosine: list[dict[str, Any]] = []
        if self.settings.cosine and len(order) > 1:
            gram = torch.from_numpy(g.gram(source, order, owner, {n: x_t[n] for n in names}, chunk=self.settings.chunk))
            norms = gram.diag().sqrt()
            cos = (gram / (norms[:, None] * norms[None, :]).clamp_min(1e-300)).numpy()
            cosine = [{"step": step, "a": a, "b": b, "cosine": float(cos[i, j])}
                      for i, a in enumerate(order) for j, b in enumerate(order) if i < j]
        progress = self._progress
        rows: dict[str, Any] = {}
        err = None
        if len(source) or g.rank == 0:
            if progress is not None:
                progress.measuring(step, len(order))
            try:
                rows = measure_step(
                    self.objective, step, {n: x_t[n] for n in names}, source, x_next={n: x_next[n] for n in names},
                    settings=self._rank_settings(), measurement_index=self._measurements,
                    progress=progress.phase_callback(step, len(source)) if progress is not None else None,
                    preconditioners=self._preconditioners(),
                )
            except Exception as e:  # noqa: BLE001 - told to every rank below
                err = _text(e)
            finally:
                if progress is not None:
                    seconds = progress.measured()
                    if self._own_progress:
                        progress.close(f"{progress.what}: measured {len(order)} directions on {g.world} ranks at "
                                       f"step {step} in {seconds:.1f} s")
        rows.pop("_grad", None)
        self.last_timings = rows.pop("_timings", [{}])[0]
        results = g.all_gather_object({"error": err, "rows": rows if g.rank else {}})
        results[g.rank]["rows"] = rows
        failed = [(r, p["error"]) for r, p in enumerate(results) if p["error"]]
        if failed:
            raise DistributedError(f"the measurement failed on rank {failed[0][0]} of {g.world}: {failed[0][1]}")
        self._measurements += 1
        if g.rank != 0:
            return {}
        return self._merge(results, order, cosine)

    def _merge(self, results: list[dict[str, Any]], order: list[str], cosine: list[dict[str, Any]]
               ) -> dict[str, list[dict[str, Any]]]:
        """Rank 0: every rank's rows in one measurement's tables, in the order of a one-process run, with
        the ratios to SGD computed over the gathered sharpness."""
        from landscape._ratio import ratio_to_reference

        assert self._store is not None
        merged: dict[str, list[dict[str, Any]]] = {}
        for r, res in enumerate(results):
            for table, table_rows in res["rows"].items():
                if table == "_events":
                    for event in table_rows:
                        self._store.log_event(event["step"], "warning", event["message"] if r == 0 else f"rank {r}: {event['message']}")
                elif table == "_engine":
                    if r == 0:
                        merged["_engine"] = table_rows
                else:
                    merged.setdefault(table, []).extend(table_rows)
        index = {n: i for i, n in enumerate(order)}
        for table_rows in merged.values():
            key = "direction" if table_rows and "direction" in table_rows[0] else (
                "optimizer" if table_rows and "optimizer" in table_rows[0] else None)
            if key is not None:
                table_rows.sort(key=lambda row: index.get(row[key], len(index)))
        ref = next((row["sharpness"] for row in merged.get("sharpness", []) if row["direction"] == "sgd"), None)
        for row in merged.get("sharpness", []):
            row["ratio_to_sgd"], row["ratio_note"] = ratio_to_reference(row["sharpness"], ref, "sgd")
        if cosine:
            merged["cosine"] = cosine
        return merged

    def _shard_state(self) -> dict[str, Any]:
        """This rank's part of :meth:`state_dict` (its recipes' states), as saved in its own state file."""
        g = self._group
        assert g is not None and self._pseudo is not None
        return {
            "format": _STATE_FORMAT, "step": self.step, "measurements": self._measurements,
            "pseudo": self._pseudo.state_dict(), "extra": self._extra_state() if self._extra_state is not None else None,
            "rank": g.rank, "world": g.world, "recipes": list(self._pseudo.names),
        }

    def _commit_distributed(self, rows: Mapping[str, list[dict[str, Any]]]) -> None:
        """:meth:`_commit` under torch.distributed: every rank writes its own state file, then rank 0's
        store commit names them all; the old files go once that commit is known on every rank."""
        g = self._group
        assert g is not None and self._store is not None
        name, err = None, None
        if self.save_state and self._pseudo is not None and self._pseudo.step:
            name = _state_file_name(self.step, g.rank, g.world)
            try:
                self.out.mkdir(parents=True, exist_ok=True)  # on a node without rank 0's file system
                atomic_save(self._shard_state(), self.out / name)
            except Exception as e:  # noqa: BLE001 - told to every rank below
                err = _text(e)
        events = self._store.take_events() if isinstance(self._store, _NullStore) else []
        status = self._sync({"error": err, "file": name, "events": events})
        failed = [(r, p["error"]) for r, p in enumerate(status) if p["error"]]
        if failed:
            raise DistributedError(f"rank {failed[0][0]} could not save its recipe states: {failed[0][1]}")
        files = [p["file"] for p in status]
        rows = dict(rows)
        engine = rows.pop("_engine", [None])[0]

        def write() -> None:
            if g.rank != 0:
                return
            store = self._store
            assert isinstance(store, RunStore)
            with store.transaction():
                for r, p in enumerate(status):
                    for step, kind, message in p["events"]:
                        store.log_event(step, kind, f"rank {r}: {message}")
                if engine is not None and engine["engine"] != self.engine:
                    store.log_event(self.step, "engine", engine["message"])
                    self.engine = engine["engine"]
                if self._step_rows:
                    store.write("steps", self._step_rows)
                for table, table_rows in rows.items():
                    if table_rows:
                        store.write(table, table_rows)
                if name is not None:
                    store.set_meta("probe_state", {"file": files[0], "files": files, "world": g.world,
                                                   "step": self.step, "measurements": self._measurements})

        g.agree(write, "writing the run store")
        self._step_rows = []
        if name is not None:
            for old in self.out.glob(f"{_STATE_PREFIX}*.rank{g.rank}of{g.world}.pt"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    def _commit(self, rows: Mapping[str, list[dict[str, Any]]]) -> None:
        """One atomic unit: the step rows so far, ``rows``, and (with ``save_state``) the recipe states of
        this step. The state file is written first; the store's commit then names it, so a kill at any
        point leaves committed rows and a state of the same step (an unnamed newer file is ignored)."""
        if self._group is not None:
            self._commit_distributed(rows)
            return
        assert self._store is not None
        name = None
        if self.save_state and self._pseudo is not None and self._pseudo.step:
            name = _state_file_name(self.step)
            atomic_save(self.state_dict(), self.out / name)
        rows = dict(rows)
        engine = rows.pop("_engine", [None])[0]
        with self._store.transaction():
            if engine is not None and engine["engine"] != self.engine:  # an event when first chosen, or changed
                self._store.log_event(self.step, "engine", engine["message"])
                self.engine = engine["engine"]
            if self._step_rows:
                self._store.write("steps", self._step_rows)
            for table, table_rows in rows.items():
                if table_rows:
                    self._store.write(table, table_rows)
            if name is not None:
                self._store.set_meta("probe_state", {"file": name, "step": self.step, "measurements": self._measurements})
        self._step_rows = []
        if name is not None:
            for old in self.out.glob(f"{_STATE_PREFIX}*.pt"):
                if old.name != name:
                    old.unlink(missing_ok=True)

    # ------------------------------------------------------------------ state for your own checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The probe's resumable state at the current step: recipe states, counters and
        ``extra_state()``. Save it with your training checkpoints (it holds tensors: ``torch.save``), and
        give it to :meth:`load_state_dict` when training resumes from that checkpoint.

        Under torch.distributed this is a collective (call it on every rank): rank 0 gets every rank's
        recipe states (``"shards"``, the one-process memory for a moment), the other ranks a stub without
        them; save rank 0's and give that same dict to every rank's :meth:`load_state_dict`."""
        if self._pseudo is None:
            raise RuntimeError("the probe has no state yet (attach it first) or switched itself off")
        if self._group is not None:
            g = self._group
            parts: list[Any] | None = [None] * g.world if g.rank == 0 else None
            g._dist.gather_object(self._pseudo.state_dict(), parts, dst=0)
            return {
                "format": _STATE_FORMAT, "step": self.step, "measurements": self._measurements, "world": g.world,
                "recipes_by_rank": self._shards, "shards": parts,
                "extra": self._extra_state() if self._extra_state is not None else None,
            }
        return {
            "format": _STATE_FORMAT,
            "step": self.step,
            "measurements": self._measurements,
            "pseudo": self._pseudo.state_dict(),
            "extra": self._extra_state() if self._extra_state is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from :meth:`state_dict` (saved with a training checkpoint) instead of the folder's own
        last state. Call before :meth:`attach` / the first :meth:`observe`; rows the folder recorded after
        ``state["step"]`` are dropped when the run opens (they belong to the trajectory being replaced)."""
        if self._store is not None:
            raise RuntimeError("load_state_dict must be called before attach() / the first observe()")
        if not isinstance(state, Mapping) or "pseudo" not in state or "step" not in state:
            raise ValueError("load_state_dict needs the dict Probe.state_dict() returned")
        self._loaded_state = state

    def _keep_point(self, step: int, x_t: dict[str, Tensor]) -> None:
        """Save ``x_t`` (and the directions there) to ``out/points/`` (save_points=)."""
        from landscape.points import save_point, save_point_part, state_at

        assert self._pseudo is not None and self._store is not None
        g = self._group
        lead = g is None or g.rank == 0  # under DDP each rank saves its own recipes' directions, rank 0 the rest
        dirs: dict[str, dict[str, Tensor]] = {}
        if self._keep_directions is not False:
            # Only the recipes kept are computed (the file holds them all at once).
            wanted = list(self.recipes) if self._keep_directions is True else list(self._keep_directions)
            dirs = self._pseudo.directions([n for n in wanted if n in self._pseudo.names])
            if g is not None and g.rank != 0:
                try:
                    save_point_part(self.out, step, g.rank, dirs)
                except OSError as e:
                    warnings.warn(f"landscape probe: could not save rank {g.rank}'s directions of step {step}: {e}",
                                  stacklevel=3)
                return
            if self._keep_directions is True or self.trained_name in wanted:
                real = tree.sub(x_t, self._snapshot())
                if float(tree.norm(real)) > 0:
                    dirs[self.trained_name] = real
            if self._keep_directions is not True and g is None:
                dirs = {n: dirs[n] for n in self._keep_directions if n in dirs}
        elif not lead:
            return
        meta: dict[str, Any] = {"trained_direction": self.trained_name, "measured": list(self.objective.names)}
        if g is not None and self._keep_directions is not False:
            order = (list(self.recipes) + [self.trained_name] if self._keep_directions is True
                     else list(self._keep_directions))
            meta.update(part_ranks=[r for r in range(1, g.world) if self._shards[r]], direction_order=order)
        try:
            path = save_point(self.out, step, state_at(self.model, x_t), dirs, meta=meta)
        except OSError as e:
            self._store.log_event(step, "warning", f"could not save the point of step {step}: {e}")
            warnings.warn(f"landscape probe: could not save the point of step {step}: {e}", stacklevel=3)
            return
        self._store.log_event(step, "point", f"saved {path.name} ({len(dirs)} directions)")

    def _preconditioners(self) -> dict[str, dict[str, Tensor]] | None:
        """``P`` of the Adam-family recipes asked for and of a trained ``torch.optim.Adam``/``AdamW``,
        when the preconditioned sharpness is due at this measurement."""
        cs = self.settings.curvature
        if cs is None or not cs.due("precond", self._measurements) or self._pseudo is None:
            return None
        from landscape.stability import adam_preconditioner

        names = self.objective.names
        out: dict[str, dict[str, Tensor]] = {}
        for recipe in cs.precond_recipes:
            if recipe in self._pseudo.names:
                try:
                    P = self._pseudo.preconditioner(recipe)
                except ValueError:
                    continue
                out[recipe] = {n: P[n] for n in names}
        trained_here = self._fsdp is None and (self._group is None or self._group.rank == self._trained_rank)
        if trained_here and isinstance(self._optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            try:
                P = adam_preconditioner(self._optimizer, self.model)
                out[str(self.trained_name)] = {n: P[n] for n in names}
            except (ValueError, KeyError):
                pass
        return out or None


    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Finish a pending manual-form step, detach the hooks, commit the last steps (and the recipe
        states, for a resume) and close the store. Never raises for a failure of its own (it warns)."""
        if self._pending is not None and self._handle is None:
            self._guarded(self._after_step)  # manual form: the last step's update is in the parameters now
        self._pending = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._store is not None:
            if self.disabled is None:
                if self._pseudo is not None:  # a background update: finished (or its failure reported)
                    self._guarded(self._pseudo.wait, stage="tracking")
                self._guarded(self._commit, {})
            if self.disabled is not None and self._group is not None and not self._left:
                self._announce()  # the others meet this rank in close's commit (or a pending measurement)
            self.sinks.close(self._sink_event)
            self._store.close()
            self._store = None
        self.sinks.close()  # (no-op when closed above)

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Probe(out={str(self.out)!r}, every={self.every}, recipes={len(self.recipes)}, step={self.step})"


def _keep_rule(save_points: Iterable[int] | Callable[[int], bool] | None) -> Callable[[int], bool]:
    if save_points is None:
        return lambda step: False
    if callable(save_points):
        return lambda step: bool(save_points(step))
    steps = set()
    for s in save_points:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ValueError(f"save_points must hold positive step numbers (the probe counts from 1), got {s!r}")
        steps.add(s)
    return steps.__contains__


def _isfinite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
