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
every mode, flag and RNG state, and keeps no autograd graph.
"""

from __future__ import annotations

import hashlib
import math
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
from landscape.measure import MeasureSettings, measure_step
from landscape.objective import Include, NonFiniteError, Objective
from landscape.optim import PseudoUpdates, recipe_names
from landscape.store import RunStore

__all__ = ["Probe", "ProbeHandle", "batch_fingerprint"]

_STATE_FILE = "pseudo_state.pt"


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
            uses 1,024 samples fixed at the start).
        out: the run folder. An existing run with the same settings is resumed (appended to); one
            with different settings is refused.
        every: measure every this many optimizer steps (the first step is measured too).
        recipes: pseudo-update recipe names (default: every recipe of ``landscape.optim``).
        mode: ``"eval"`` or ``"train"`` module mode for the measurements.
        include: restrict the measured parameters (names or predicate); the recipes still see every
            trained parameter.
        settings: a :class:`~landscape.measure.MeasureSettings` (lines, histograms, smoothness...).
        state_dtype: storage dtype of the recipe states (e.g. ``torch.bfloat16`` halves their memory).
        trained_name: the name of the real optimizer's direction (default: ``"<class> (trained)"``).
        save_state: keep the recipe states in the run folder after each measurement so a resumed run
            continues with the same momenta.
        meta: more metadata for the run store.
        check_determinism: refuse a probe loss that differs between two evaluations.

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
        trained_name: str | None = None,
        save_state: bool = True,
        meta: Mapping[str, Any] | None = None,
        check_determinism: bool = True,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
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
        self._extra_meta = dict(meta or {})
        self._fingerprint = batch_fingerprint(probe_batch)
        self._store: RunStore | None = None
        self._pseudo: PseudoUpdates | None = None
        self._names: list[str] = []  # trained parameter names, in model order
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: ProbeHandle | None = None
        self.step = 0  # optimizer steps seen (the number of the step in progress while it runs)
        self._pending: dict[str, Any] | None = None
        self._pending_loss: float | None = None
        self._step_rows: list[dict[str, Any]] = []
        self._measurements = 0
        self.timings = {"tracking": 0.0, "measurement": 0.0}
        self.last_error: str | None = None

    # ------------------------------------------------------------------ setup
    def _trained_params(self, optimizer: torch.optim.Optimizer | None) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        if optimizer is None:
            return {n: p for n, p in named.items() if p.requires_grad}
        by_id = {id(p): n for n, p in named.items()}
        chosen: dict[str, Tensor] = {}
        foreign = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                n = by_id.get(id(p))
                if n is None:
                    foreign += 1
                else:
                    chosen[n] = p
        if foreign:
            warnings.warn(f"{foreign} optimizer parameter(s) do not belong to the probed model; they are ignored", stacklevel=3)
        if not chosen:
            raise ValueError("the optimizer trains none of the model's parameters")
        return {n: chosen[n] for n in named if n in chosen}

    def _open(self, optimizer: torch.optim.Optimizer | None) -> None:
        params = self._trained_params(optimizer)
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
            **self._extra_meta,
        }
        self._store = RunStore(self.out, settings=settings, meta=meta)
        self._pseudo = PseudoUpdates(
            {n: p.detach() for n, p in params.items()}, self.recipes, state_dtype=self._state_dtype
        )
        run = self._store.run()
        done = run.steps("steps")
        if done:
            self.step = max(done)
            state_file = self.out / _STATE_FILE
            if state_file.exists():
                saved = torch.load(state_file, weights_only=True)
                self._pseudo.load_state_dict(saved["pseudo"])
                self._measurements = int(saved.get("measurements", 0))
                if int(saved.get("step", self.step)) != self.step:
                    self._store.log_event(
                        self.step,
                        "warning",
                        f"recipe states were saved at step {saved.get('step')}, the run's last step is {self.step}: "
                        "the pseudo-update momenta continue from the saved step",
                    )
            self._store.log_event(self.step, "resume", f"resumed after step {self.step}")

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
        pre = optimizer.register_step_pre_hook(lambda opt, args, kwargs: self._before_step())
        post = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_step())
        self._handle = ProbeHandle([pre, post])
        return self._handle

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
        if self._pending is not None:
            self._after_step()
        if loss is not None:
            self.log_loss(loss)
        self._before_step(grads)

    def _grads(self, grads: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        if grads is None:
            return {n: named[n].grad if named[n].grad is not None else torch.zeros_like(named[n]) for n in self._names}
        missing = [n for n in self._names if n not in grads]
        if missing:
            raise KeyError(f"observe: gradients missing for {missing[:5]}")
        return {n: grads[n] for n in self._names}

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
        row = {"step": self.step, "loss": self._pending_loss, "lr": self._lr(), "status": "ok", "reason": None}
        self._pending_loss = None
        try:
            gnorm = float(tree.norm(g))
            self._pseudo.observe(g)
        except ValueError as e:
            row.update(status="skipped", reason=str(e).splitlines()[0], grad_norm=float("nan"))
            self._record_step(row)
            self._store.log_event(self.step, "skip", f"step {self.step} skipped: {e}")
            self._pending = None
            self.timings["tracking"] += time.perf_counter() - t0
            return
        row["grad_norm"] = gnorm
        due = self.step == 1 or self.step % self.every == 0
        self._pending = {"row": row, "x_t": self._snapshot() if due else None}
        self.timings["tracking"] += time.perf_counter() - t0

    def _snapshot(self) -> dict[str, Tensor]:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach().clone() for n in self._names}

    def _after_step(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        self._record_step(pending["row"])
        if pending["x_t"] is None:
            return
        t0 = time.perf_counter()
        try:
            self._measure(pending["row"]["step"], pending["x_t"])
        except (NonFiniteError, ValueError, RuntimeError) as e:
            self.last_error = f"{type(e).__name__}: {e}"
            self._flush_steps()
            self._store.log_event(pending["row"]["step"], "measurement-failed", self.last_error)
            warnings.warn(f"landscape probe: measurement at step {pending['row']['step']} failed: {e}", stacklevel=2)
        finally:
            self.timings["measurement"] += time.perf_counter() - t0

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

    def _measure(self, step: int, x_t: dict[str, Tensor]) -> None:
        assert self._pseudo is not None and self._store is not None
        x_next = self._snapshot()
        dirs = self._pseudo.directions()
        real = tree.sub(x_t, x_next)
        names = self.objective.names
        if float(tree.norm({n: real[n] for n in names})) > 0:
            dirs[self.trained_name] = real
        else:
            self._store.log_event(step, "warning", "the optimizer did not move the measured parameters this step")
        at = {n: x_t[n] for n in names}
        rows = measure_step(
            self.objective,
            step,
            at,
            dirs,
            x_next={n: x_next[n] for n in names},
            settings=self.settings,
            measurement_index=self._measurements,
            preconditioners=self._preconditioners(),
        )
        self._measurements += 1
        rows.pop("_grad", None)
        for event in rows.pop("_events", []):
            self._store.log_event(step, "warning", event["message"])
        self.last_timings = rows.pop("_timings", [{}])[0]
        with self._store.transaction():
            self._flush_steps()
            for table, table_rows in rows.items():
                if table_rows:
                    self._store.write(table, table_rows)
        self._save_state()

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
        if isinstance(self._optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            try:
                P = adam_preconditioner(self._optimizer, self.model)
                out[str(self.trained_name)] = {n: P[n] for n in names}
            except (ValueError, KeyError):
                pass
        return out or None

    def _save_state(self) -> None:
        if self.save_state and self._pseudo is not None and self._pseudo.step:
            tmp = self.out / (_STATE_FILE + ".tmp")
            torch.save({"pseudo": self._pseudo.state_dict(), "measurements": self._measurements, "step": self.step}, tmp)
            tmp.replace(self.out / _STATE_FILE)

    # ------------------------------------------------------------------ lifetime
    def close(self) -> None:
        """Finish a pending manual-form step, detach the hooks, flush and close the store."""
        if self._pending is not None and self._handle is None:
            self._after_step()  # manual form: the last step's update is in the parameters now
        self._pending = None
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self._store is not None:
            self._flush_steps()
            self._save_state()
            self._store.close()
            self._store = None

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Probe(out={str(self.out)!r}, every={self.every}, recipes={len(self.recipes)}, step={self.step})"


def _isfinite(x: float | None) -> bool:
    return x is not None and math.isfinite(x)
