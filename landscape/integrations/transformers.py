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

The training is unchanged: the probe evaluates functionally, restores modes, flags and RNG state,
and never writes parameters or gradients.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

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


class LandscapeCallback(TrainerCallback):
    """Attach seed 002's measurements to a Hugging Face ``Trainer`` run.

    Args:
        out: the run folder (an existing run with the same settings is resumed).
        loss_fn: ``loss_fn(model, batch) -> scalar`` on the probe batch (default: :func:`model_loss`).
        probe_batch: the fixed probe batch (a dict of tensors; moved to the model's device). Default:
            the first ``probe_size`` training examples, collated by the trainer's collator.
        probe_size: examples in the default probe batch (default: ``per_device_train_batch_size``).
        every: measure every this many optimizer steps (and the first).
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
        self.probe: Probe | None = None
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
        self.probe = Probe(model, self.loss_fn, copy_batch(source, device), self.out, every=self.every, meta=meta,
                           **probe_kwargs)
        if state.global_step:  # resumed from checkpoint-<step>: the probe's state saved there by on_save
            saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / PROBE_STATE_FILE
            if saved.is_file():
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

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Keep the probe's state beside the Trainer's own in ``checkpoint-<step>/``, so that
        ``trainer.train(resume_from_checkpoint=...)`` resumes the probe at that step too."""
        probe = self.probe
        if probe is None or probe.disabled is not None or probe._pseudo is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir() and probe.step == state.global_step:
            try:
                torch.save(probe.state_dict(), folder / PROBE_STATE_FILE)
            except Exception as e:  # noqa: BLE001 - never stop training for the probe
                probe._fail("saving the probe state with the checkpoint", e, disable=False)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.close()

    def close(self) -> None:
        """Detach the probe and the loss hook, flush and close the run store (idempotent)."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.probe is not None:
            self.probe.close()
