"""The probe inside a Hugging Face ``Trainer``: ``pip install 'landscape[hf]'``.

    from landscape.integrations.transformers import LandscapeCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[LandscapeCallback("runs/exp", every=50)])
    trainer.train()

At ``on_train_begin`` the callback attaches a :class:`landscape.Probe` to the trainer's own
optimizer (the ``torch.optim.Optimizer`` inside accelerate's wrapper): its step hooks read the
gradients the optimizer is about to use (after the Trainer's gradient clipping) and feed them to
the pseudo-update recipes, and every ``every`` steps measure on a fixed probe batch. The training
loss of each step is recorded from the model's output ``loss`` during that step's forward passes.

Probe batch: the user's, or the first ``probe_size`` examples of the training dataset collated by
the trainer's own collator (indexed directly, under a forked RNG, so the data order and any random
collation of the training run are unchanged).

Under DDP (``torchrun`` / ``accelerate launch``) the callback runs on every rank, as the Trainer runs
every callback: the probe divides its recipes among the ranks and rank 0 alone writes the run folder
(see :mod:`landscape.distributed`); the default probe batch (the dataset's first examples) is the same
on every rank; ``on_save`` gathers every rank's recipe states into rank 0's ``landscape_probe.pt``.

The training is unchanged: the probe evaluates functionally, restores modes, flags and RNG state,
and never writes parameters or gradients.

Trackers: each measurement's scalars go through the Trainer's own ``log`` (at the end of the step it
measured), so they reach every integration ``report_to`` configured (TensorBoard, W&B, MLflow...) and
``trainer.state.log_history``, under the tags of :mod:`landscape.sinks` with the Trainer's ``train/``
prefix (``train/landscape/sharpness/adam``); the update histograms go to the ``TensorBoardCallback``'s
writer, when there is one. ``log_to_trainer=False`` switches this off; ``sinks=[...]`` adds more.
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "landscape.integrations.transformers needs Hugging Face transformers: pip install 'landscape[hf]'"
    ) from None

from landscape.integrations import copy_batch
from landscape.probe import Probe
from landscape.sinks import Sink, TensorBoardSink

__all__ = ["PROBE_STATE_FILE", "LandscapeCallback", "model_loss"]

#: The probe's state, saved in each ``checkpoint-<step>/`` folder the Trainer writes.
PROBE_STATE_FILE = "landscape_probe.pt"


def model_loss(model: nn.Module, batch: Mapping[str, Any]) -> Tensor:
    """The default ``loss_fn``: ``model(**batch).loss`` (the batch must hold ``labels``)."""
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no loss for the probe batch: include 'labels' in it, or pass loss_fn=...")
    return loss


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    """The real ``torch.optim.Optimizer`` inside accelerate's ``AcceleratedOptimizer`` (and similar)."""
    opt = optimizer
    while hasattr(opt, "optimizer") and isinstance(opt.optimizer, torch.optim.Optimizer):
        opt = opt.optimizer
    if not isinstance(opt, torch.optim.Optimizer):
        raise TypeError(f"LandscapeCallback: the trainer's optimizer is a {type(optimizer).__name__}, not a torch optimizer")
    return opt


def _running_trainer(callback: Any) -> Any:
    """The ``transformers.Trainer`` whose callbacks include ``callback``, from the call stack (the
    Trainer hands its callbacks no reference to itself); ``None`` when not found."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer) and callback in getattr(owner.callback_handler, "callbacks", ()):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


class _TrainerLogSink(Sink):
    """Queues each measurement's scalars for ``Trainer.log`` at the end of the step (the callback
    flushes them in ``on_step_end``); histograms go to the ``TensorBoardCallback``'s writer."""

    name = "Trainer.log"

    def __init__(self, callback: LandscapeCallback) -> None:
        self.callback = callback

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        self.callback._logs.append(dict(scalars))

    def write_histogram(self, step: int, tag: str, edges: np.ndarray, counts: np.ndarray) -> None:
        trainer = self.callback.trainer
        for cb in getattr(getattr(trainer, "callback_handler", None), "callbacks", ()):
            writer = getattr(cb, "tb_writer", None) if type(cb).__name__ == "TensorBoardCallback" else None
            if writer is not None:
                TensorBoardSink(writer).write_histogram(step, f"train/{tag}", edges, counts)


class LandscapeCallback(TrainerCallback):
    """Attach seed 002's measurements to a Hugging Face ``Trainer`` run.

    Args:
        out: the run folder (an existing run with the same settings is resumed).
        loss_fn: ``loss_fn(model, batch) -> scalar`` on the probe batch (default: :func:`model_loss`).
        probe_batch: the fixed probe batch (a dict of tensors; moved to the model's device). Default:
            the first ``probe_size`` training examples, collated by the trainer's collator.
        probe_size: examples in the default probe batch (default: ``per_device_train_batch_size``).
        every: measure every this many optimizer steps (and the first).
        log_to_trainer: also log each measurement through the Trainer (``Trainer.log``, hence every
            ``report_to`` integration); a failure there is switched off alone, training goes on.
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
        probe_size: int | None = None,
        every: int = 50,
        log_to_trainer: bool = True,
        **probe_kwargs: Any,
    ) -> None:
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        if probe_size is not None and probe_size < 1:
            raise ValueError(f"probe_size must be positive, got {probe_size!r}")
        self.out = Path(out)
        self.loss_fn = loss_fn or model_loss
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.every = every
        self.probe_kwargs = probe_kwargs
        self.log_to_trainer = log_to_trainer
        self.probe: Probe | None = None
        self.trainer: Any = None  # the Trainer running this callback, found at on_train_begin
        self._logs: list[dict[str, float]] = []  # measurements waiting for the end of their step
        self._hook: Any = None
        self._recording = False
        self._losses: list[float] = []

    # ------------------------------------------------------------------ probe batch
    def _default_probe_batch(self, args: Any, dataloader: Any) -> Any:
        dataset = getattr(dataloader, "dataset", None)
        collate = getattr(dataloader, "collate_fn", None)
        if dataset is None or collate is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise ValueError(
                "LandscapeCallback cannot take a probe batch from this training data (not an indexable dataset): "
                "pass probe_batch=..."
            )
        n = min(self.probe_size or args.per_device_train_batch_size, len(dataset))
        with torch.random.fork_rng(devices=[]):  # a random collator (masking...) must not move the run's RNG
            return collate([dataset[i] for i in range(n)])

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.probe is not None:
            return
        model: nn.Module = kwargs["model"]
        opt = _unwrap(kwargs["optimizer"])
        source = self.probe_batch if self.probe_batch is not None else self._default_probe_batch(args, kwargs.get("train_dataloader"))
        device = next(model.parameters()).device
        probe_kwargs = dict(self.probe_kwargs)
        meta = {"integration": "transformers", "model_type": getattr(getattr(model, "config", None), "model_type", None),
                **dict(probe_kwargs.pop("meta", None) or {})}
        if self.log_to_trainer:
            self.trainer = _running_trainer(self)
            if self.trainer is not None:
                user = probe_kwargs.pop("sinks", None)
                user = [user] if user is not None and not isinstance(user, (list, tuple)) else list(user or [])
                probe_kwargs["sinks"] = user + [_TrainerLogSink(self)]
            else:
                warnings.warn("LandscapeCallback: the Trainer running this callback was not found, so the measurements "
                              "are not logged through it (they are in the run store)", RuntimeWarning, stacklevel=2)
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROBE_STATE_FILE
        if state.global_step and not saved.is_file():  # the callback joins a run already in progress
            probe_kwargs.setdefault("start_step", state.global_step)
        self.probe = Probe(model, self.loss_fn, copy_batch(source, device), self.out, every=self.every, meta=meta,
                           **probe_kwargs)
        if state.global_step and saved.is_file():  # resumed from checkpoint-<step>: the probe's state saved there by on_save
            self.probe.load_state_dict(torch.load(saved, weights_only=True, map_location="cpu"))
        self.probe.attach(opt)
        self._hook = model.register_forward_hook(self._record_loss)

    def _record_loss(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (self._recording and module.training and torch.is_grad_enabled()):
            return
        loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
        if isinstance(loss, Tensor) and loss.numel() == 1:
            self._losses.append(float(loss.detach()))

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recording = True
        self._losses = []

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._recording = False
        if self.probe is not None and self._losses:
            self.probe.log_loss(sum(self._losses) / len(self._losses))
        self._losses = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush_logs()

    def _flush_logs(self) -> None:
        """``Trainer.log`` each measurement completed during this step (the step the Trainer logs under,
        ``state.global_step``, is then the probe's step)."""
        logs, self._logs = self._logs, []
        if self.trainer is None:
            return
        for entry in logs:
            try:
                self.trainer.log(dict(entry))
            except Exception as e:  # noqa: BLE001 - never stop training for a tracker
                self.trainer = None
                if self.probe is not None:
                    for sink in self.probe.sinks.sinks:
                        if isinstance(sink, _TrainerLogSink):
                            self.probe.sinks.disable(sink, "Trainer.log", e, event=self.probe._sink_event)
                return

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the probe's state beside the Trainer's own in ``checkpoint-<step>/``, so that
        ``trainer.train(resume_from_checkpoint=...)`` resumes the probe at that step too."""
        probe = self.probe
        if probe is None or probe.disabled is not None or probe._pseudo is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if probe.step != state.global_step:
            return
        # under DDP state_dict() gathers every rank's recipe states on rank 0 (a collective: every rank
        # calls it); rank 0 alone writes the file, which every rank reads back on a resume
        group = probe._group
        try:
            saved = probe.state_dict()
            if (group is None or group.rank == 0) and folder.is_dir():
                torch.save(saved, folder / PROBE_STATE_FILE)
        except Exception as e:  # noqa: BLE001 - never stop training for the probe
            probe._fail("saving the probe state with the checkpoint", e, disable=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._flush_logs()
        self.close()

    def close(self) -> None:
        """Detach the probe and the loss hook, flush and close the run store (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.probe is not None:
            self.probe.close()
