"""``landscape demo --race``: Pan & Li's Fig. 6 on the demo's text, in a few minutes on a laptop CPU.

A small causal transformer LM (2 layers, width 64, context 64) is trained on the King James Bible
(character level, the text of ``landscape demo``) by SGD, SGD with coordinate-wise clipping, Adam and
Adam with clipping, each at its best learning rate from a 3- or 4-point grid, from the same initialisation
and on the same batches, over 3 seeds. :func:`build` is an ordinary spec, so the same race runs with
``landscape race --spec landscape.demo_race:build``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from landscape.data import CharCorpus, kjv_text
from landscape.models import TinyCausalLM, lm_loss
from landscape.race import DEFAULT_RACE_RECIPES, ProgressFn, RaceResult, race

__all__ = ["DEMO_LR_GRID", "SPEC", "build", "run_race_demo"]

#: The spec of the demo race.
SPEC = "landscape.demo_race:build"
#: Learning rates tried per recipe (the first seed picks the best).
#: The clipped variants get one more point where their best rate first fell at the grid's edge.
DEMO_LR_GRID = {"sgd": [0.3, 1.0, 3.0], "sgd_clip": [0.1, 0.3, 1.0, 3.0], "adam": [1e-3, 3e-3, 1e-2],
                "adam_clip": [1e-3, 3e-3, 1e-2, 3e-2]}

WIDTH, DEPTH, HEADS, CONTEXT, BATCH, PROBE, CHARS = 64, 2, 4, 64, 16, 32, 1_000_000


class RandomWindows:
    """Training batches: ``n`` random windows of the corpus per pass, in an order drawn from torch's
    global RNG when the pass starts (so a seeded race gives every recipe the same batches, and each seed
    its own)."""

    def __init__(self, corpus: CharCorpus, n: int = 10_000) -> None:
        self.corpus, self.n = corpus, n

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,))))
        for _ in range(self.n):
            yield self.corpus.batch(BATCH, CONTEXT, gen)


def build() -> dict[str, Any]:
    """The demo race's spec: the model (initialised from torch's RNG, i.e. the race's seed), the loss,
    a fixed probe batch from the held-out end of the text, and the training batches."""
    corpus = CharCorpus(kjv_text()[:CHARS])
    model = TinyCausalLM(corpus.vocab, width=WIDTH, depth=DEPTH, heads=HEADS, context=CONTEXT)
    probe_batch = corpus.batch(PROBE, CONTEXT, torch.Generator().manual_seed(12345), split="probe")
    return {"model": model, "loss_fn": lm_loss, "probe_batch": probe_batch, "train_batches": RandomWindows(corpus)}


def run_race_demo(out: str | Path, *, steps: int = 200, seeds: tuple[int, ...] = (0, 1, 2),
                  progress: ProgressFn | None = None) -> RaceResult:
    """Run the demo race into ``out`` (resumed when it exists)."""
    return race(SPEC, out, recipes=DEFAULT_RACE_RECIPES, steps=steps, lr_grid=DEMO_LR_GRID, seeds=seeds,
                probe_every=10, progress=progress, meta={"demo": "race"})
