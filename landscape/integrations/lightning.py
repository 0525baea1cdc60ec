"""The probe inside a PyTorch Lightning ``Trainer``: ``pip install 'landscape[lightning]'``.

    from landscape.integrations.lightning import LandscapeCallback

    trainer = L.Trainer(max_steps=1000, callbacks=[LandscapeCallback("runs/exp", every=50)])
    trainer.fit(module, train_loader)

The callback reads the gradients of the trainer's own optimizer (``trainer.optimizers[0]``) each
optimizer step, after the backward pass and before the step (Lightning's
``on_before_optimizer_step``), feeds them to the pseudo-update recipes, and measures every
``every`` steps on a fixed probe batch: by default a copy of the first training batch the trainer
fetches (nothing extra is drawn from the data loader, so the data order is unchanged).

Lightning runs the forward and backward passes *inside* ``optimizer.step(closure)``, so a plain
:meth:`landscape.Probe.attach` step pre-hook would see the previous step's gradients; the callback
uses the probe's manual form (:meth:`landscape.Probe.observe`) from ``on_before_optimizer_step``
instead. The measurement of step ``t`` completes when step ``t + 1``'s gradients arrive (or at the
end of training), when the real update ``x_t − x_{t+1}`` is known.

Under DDP (``Trainer(strategy="ddp", devices=N)``) the callback runs on every rank, as Lightning runs
every callback: the probe divides its recipes among the ranks and rank 0 alone writes the run folder
(see :mod:`landscape.distributed`); the default probe batch is rank 0's first batch on every rank, and
the callback's checkpoint state is gathered on rank 0, the rank that saves the checkpoint.

The training is unchanged: the probe evaluates functionally, restores modes, flags and RNG state,
and never writes parameters or gradients.

Trackers: each measurement's scalars also go to the trainer's own loggers (``trainer.loggers``:
TensorBoard, W&B, MLflow, CSV... through their ``log_metrics``), and its update histograms to a
``TensorBoardLogger``'s histogram panel, with the tags of :mod:`landscape.sinks`; nothing to configure
twice. ``log_to_trainer=False`` switches this off; ``sinks=[...]`` adds more.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - depends on the installed extras
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
    except ImportError:
        raise ImportError(
            "landscape.integrations.lightning needs PyTorch Lightning: pip install 'landscape[lightning]'"
        ) from None

from landscape.integrations import copy_batch
from landscape.probe import Probe

__all__ = ["LandscapeCallback", "training_step_loss"]


@contextlib.contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """``self.log`` / ``self.log_dict`` are no-ops inside (a measurement is not a training step)."""
    saved = {k: module.__dict__[k] for k in ("log", "log_dict") if k in module.__dict__}
    object.__setattr__(module, "log", lambda *a, **k: None)
    object.__setattr__(module, "log_dict", lambda *a, **k: None)
    try:
        yield
    finally:
        for k in ("log", "log_dict"):
            module.__dict__.pop(k, None)
        module.__dict__.update(saved)


def training_step_loss(module: nn.Module, batch: Any) -> Tensor:
    """The default ``loss_fn``: the module's own ``training_step(batch, 0)`` (its ``"loss"`` entry when it
    returns a dict), with logging switched off. Pass your own ``loss_fn`` when ``training_step`` has
    other side effects (counters, manual optimization)."""
    with _quiet(module):
        out = module.training_step(batch, 0)  # type: ignore[operator]
    if isinstance(out, Mapping):
        out = out.get("loss")
    if not isinstance(out, Tensor):
        raise TypeError(
            f"training_step returned {type(out).__name__}, not a loss tensor (or a dict with 'loss'): "
            "pass loss_fn=... to LandscapeCallback"
        )
    return out


class LandscapeCallback(pl.Callback):
    """Attach seed 002's measurements to a Lightning training run.

    Args:
        out: the run folder (an existing run with the same settings is resumed).
        loss_fn: ``loss_fn(module, batch) -> scalar`` on the probe batch (default:
            :func:`training_step_loss`).
        probe_batch: the fixed probe batch (moved to the module's device). Default: a copy of the
            first training batch.
        every: measure every this many optimizer steps (and the first).
        optimizer_index: which of ``trainer.optimizers`` is probed.
        log_to_trainer: also write each measurement to ``trainer.loggers`` (see :mod:`landscape.sinks`;
            a logger that fails is switched off alone, training goes on).
        **probe_kwargs: passed to :class:`landscape.Probe` (``recipes``, ``settings``, ``mode``,
            ``include``, ``state_dtype``, ``meta``...).

    Attributes:
        probe: the :class:`landscape.Probe` once training started (``None`` before).
    """

    def __init__(
        self,
        out: str | Path,
        *,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        probe_batch: Any = None,
        every: int = 50,
        optimizer_index: int = 0,
        log_to_trainer: bool = True,
        **probe_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.out = Path(out)
        self.loss_fn = loss_fn or training_step_loss
        self.probe_batch = probe_batch
        self.every = every
        self.optimizer_index = optimizer_index
        self.log_to_trainer = log_to_trainer
        self.probe_kwargs = probe_kwargs
        self.probe: Probe | None = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._loss: float | None = None
        self._restored: dict[str, Any] | None = None

    # Lightning saves a callback's state_dict() in every checkpoint and hands it back on
    # trainer.fit(..., ckpt_path=...): the probe resumes at that checkpoint's step, on its trajectory.
    def state_dict(self) -> dict[str, Any]:
        if self.probe is None or self.probe.disabled is not None or self.probe._pseudo is None:
            return {}
        return {"probe": self.probe.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict.get("probe") if state_dict else None

    def _optimizer_of(self, trainer: pl.Trainer) -> torch.optim.Optimizer:
        opts = trainer.optimizers
        if not opts or self.optimizer_index >= len(opts):
            raise RuntimeError(f"LandscapeCallback: the trainer has {len(opts)} optimizer(s), no index {self.optimizer_index}")
        opt = opts[self.optimizer_index]
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):  # LightningOptimizer
            opt = opt.optimizer
        return opt

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.probe is not None:
            return
        opt = self._optimizer_of(trainer)
        self._optimizer = opt
        hyper = {k: v for k, v in opt.param_groups[0].items() if k != "params"}
        hyper = {k: v if isinstance(v, (int, float, str, bool, type(None))) else list(v) if isinstance(v, tuple) else repr(v)
                 for k, v in hyper.items()}
        kwargs = dict(self.probe_kwargs)
        meta = {"optimizer": {"class": type(opt).__name__, "hyperparameters": hyper}, "integration": "lightning",
                **dict(kwargs.pop("meta", None) or {})}
        kwargs.setdefault("trained_name", f"{type(opt).__name__.lower()} (trained)")
        if self.log_to_trainer:
            from landscape.sinks import LoggerSink

            user = kwargs.pop("sinks", None)
            user = [user] if user is not None and not isinstance(user, (list, tuple)) else list(user or [])
            kwargs["sinks"] = user + [LoggerSink(lg) for lg in trainer.loggers]
        if self.probe_batch is not None:
            source = self.probe_batch
        else:  # under DDP each rank's first batch differs (DistributedSampler): rank 0's is every rank's
            from landscape.distributed import same_on_every_rank

            source = same_on_every_rank(copy_batch(batch, "cpu"))
        probe_batch = copy_batch(source, pl_module.device)
        if self._restored is None and trainer.global_step:  # the callback joins a run already in progress
            kwargs.setdefault("start_step", trainer.global_step)
        self.probe = Probe(pl_module, self.loss_fn, probe_batch, self.out, every=self.every, meta=meta, **kwargs)
        if self._restored is not None:
            self.probe.load_state_dict(self._restored)

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        if self.probe is not None:  # summed over accumulated micro-batches (Lightning scales each one)
            self._loss = (self._loss or 0.0) + float(loss.detach())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.probe is None:
            return
        inner = optimizer
        while not isinstance(inner, torch.optim.Optimizer) and hasattr(inner, "optimizer"):
            inner = inner.optimizer
        if inner is not self._optimizer:
            return
        loss, self._loss = self._loss, None
        self.probe.observe(None, loss=loss, optimizer=inner)

    def _close(self) -> None:
        if self.probe is not None:
            self.probe.close()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()
