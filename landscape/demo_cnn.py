"""``landscape demo --task cnn``: the contrast of Pan & Li 2023, App. E (Table 9), on a laptop CPU.

Seed 002 finds that on a transformer the adaptive and clipped methods' update directions are far
flatter than SGD's, and that on a ResNet for image classification they are *not* (their ratio to SGD is
often above one). This demo trains a small ResNet (three residual stages with BatchNorm, global average
pooling) on a real image dataset, scikit-learn's handwritten digits (1,797 8×8 greyscale images of the
UCI ML digits set, shipped inside the ``scikit-learn`` wheel: nothing is downloaded), by SGD with
momentum, with the probe attached: every recipe follows the same real gradients, and every ``every``
steps each direction's sharpness is measured on a fixed batch of held-out images, as in
``landscape demo``.

The probe measures in training mode (``mode="train"``): BatchNorm normalises with the probe batch's
own statistics, so the measured function is the one SGD descends (the running statistics of eval mode
lag behind the weights). With no dropout, that function is deterministic.
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from landscape.measure import MeasureSettings
from landscape.probe import Probe, saved_state

__all__ = ["CNNDemoConfig", "DATASET", "SmallResNet", "classification_loss", "digits", "run_cnn_demo"]

DATASET = "scikit-learn's handwritten digits (load_digits: 1,797 8x8 images, 10 classes)"


@functools.lru_cache(maxsize=1)
def digits() -> tuple[Tensor, Tensor]:
    """scikit-learn's digits as ``(images (1797, 1, 8, 8) float32 in [0, 1], labels (1797,) int64)``."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ImportError("the CNN demo's images ship with scikit-learn: pip install 'landscape[cnn]' "
                          "(or pip install scikit-learn)") from None
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(d.target, dtype=torch.int64)


class _Block(nn.Module):
    """A basic residual block (He et al. 2016): two 3×3 convolutions with BatchNorm, ReLU, and a 1×1
    projection on the shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for small images: a 3×3 stem, stages of basic blocks at ``widths`` (each after the
    first halving the resolution), global average pooling and a linear classifier.

    Args:
        classes: number of classes.
        widths: channels of each stage.
        in_channels: image channels.
    """

    def __init__(self, classes: int = 10, widths: tuple[int, ...] = (16, 32, 64), in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, c = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(_Block(c, w, stride=1 if i == 0 else 2))
            c = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.fc(h.mean(dim=(2, 3)))


def classification_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``model(images)`` against ``labels`` for ``batch = (images, labels)``."""
    x, y = batch
    return F.cross_entropy(model(x), y)


@dataclass
class CNNDemoConfig:
    """Settings of the CNN demo (the defaults take a few minutes on 2 CPU cores)."""

    steps: int = 300
    every: int = 60
    lr: float = 0.05
    momentum: float = 0.9
    seed: int = 0
    batch_size: int = 64
    probe_size: int = 256
    widths: tuple[int, ...] = (16, 32, 64)


def run_cnn_demo(
    out: str | Path,
    cfg: CNNDemoConfig | None = None,
    *,
    on_step: Callable[[int, float, int], None] | None = None,
    settings: MeasureSettings | None = None,
    recipes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Train :class:`SmallResNet` on the digits by SGD with momentum with the probe attached (see the
    module docstring); returns ``{"out", "steps", "final_loss", "seconds", "timings", "resumed_from",
    "probe_accuracy"}``, the same summary as :func:`landscape.demo.run_demo` plus the accuracy on the
    held-out probe images after training. An interrupted run resumes on the same trajectory.

    ``settings`` default to the probe's with Hessian-vector products (``method="hvp"``): the Taylor
    sweep has no rule for train-mode BatchNorm, so ``"auto"`` would fall back to them anyway (and warn).
    ``recipes``: the pseudo-update recipes (default: all).
    """
    cfg = cfg or CNNDemoConfig()
    if cfg.steps < 1 or cfg.every < 1:
        raise ValueError("steps and every must be positive")
    x, y = digits()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))  # a fixed held-out split
    probe_idx, train_idx = order[: cfg.probe_size], order[cfg.probe_size :]
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    probe_batch = (x[probe_idx], y[probe_idx])
    x_train, y_train = x[train_idx], y[train_idx]
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    model = SmallResNet(widths=cfg.widths)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    resumed = saved_state(out)
    if resumed is not None:
        extra = resumed.get("extra")
        if not isinstance(extra, dict) or not {"model", "optimizer", "generator", "rng"} <= set(extra):
            raise RuntimeError(f"{out} holds a run without the CNN demo's training state: remove it or pass another --out")
        model.load_state_dict(extra["model"])
        opt.load_state_dict(extra["optimizer"])
        gen.set_state(extra["generator"])
        torch.set_rng_state(extra["rng"])

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "rng": torch.get_rng_state()}

    meta = {"demo": {"task": "cnn", "dataset": DATASET, "model": "SmallResNet", "n_train": len(train_idx),
                     **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.__dict__.items()}}}
    t0 = time.perf_counter()
    loss = float("nan")
    settings = settings or MeasureSettings(method="hvp")
    with Probe(model, classification_loss, probe_batch, out=out, every=cfg.every, settings=settings, meta=meta,
               mode="train", extra_state=training_state, recipes=recipes) as probe:
        with warnings.catch_warnings():  # the demo restores SGD's state with the probe's: the same step by design
            warnings.filterwarnings("ignore", message=".*keeps no step count.*")
            probe.attach(opt)
        model.train()
        for _ in range(probe.step, cfg.steps):
            idx = torch.randint(0, len(y_train), (cfg.batch_size,), generator=gen)
            loss_t = classification_loss(model, (x_train[idx], y_train[idx]))
            loss_t.backward()
            probe.log_loss(loss_t)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(loss_t.detach())
            if on_step is not None:
                on_step(probe.step, loss, probe._measurements)
        timings = dict(probe.timings)
    model.eval()
    with torch.no_grad():
        accuracy = float((model(probe_batch[0]).argmax(1) == probe_batch[1]).float().mean())
    return {"out": Path(out), "steps": cfg.steps, "final_loss": loss, "seconds": time.perf_counter() - t0,
            "timings": timings, "resumed_from": int(resumed["step"]) if resumed is not None else None,
            "probe_accuracy": accuracy}
