"""Wall time of the demo's training with the probe at its default settings, relative to without.

Both runs train the same model on the same batches (same seed); the probe's time is split into
per-step tracking (reading gradients, updating every recipe's state) and measurement (sharpness,
lines, histograms, smoothness every ``--every`` steps).

    python benchmarks/probe_overhead.py [--steps 300] [--every 60]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from landscape.data import CharCorpus, kjv_text
from landscape.demo import DemoConfig, _optimizer, run_demo
from landscape.models import TinyCausalLM, lm_loss


def train_plain(cfg: DemoConfig) -> float:
    torch.manual_seed(cfg.seed)
    corpus = CharCorpus(kjv_text()[: cfg.corpus_chars])
    gen = torch.Generator().manual_seed(cfg.seed)
    model = TinyCausalLM(corpus.vocab, width=cfg.width, depth=cfg.depth, heads=cfg.heads, context=cfg.context)
    opt = _optimizer(cfg, model)
    t0 = time.perf_counter()
    model.train()
    for _ in range(cfg.steps):
        loss = lm_loss(model, corpus.batch(cfg.batch_size, cfg.context, gen))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=DemoConfig.steps)
    ap.add_argument("--every", type=int, default=DemoConfig.every)
    a = ap.parse_args()
    cfg = DemoConfig(steps=a.steps, every=a.every)
    tmp = Path(tempfile.mkdtemp())
    try:
        plain = train_plain(cfg)
        res = run_demo(tmp / "run", cfg)
        plain2 = train_plain(cfg)  # bracket the probed run: the machine is noisy
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = (plain + plain2) / 2
    t = res["timings"]
    train_only = res["seconds"] - t["tracking"] - t["measurement"]
    n_meas = 1 + cfg.steps // cfg.every
    print(f"demo LM, {cfg.steps} steps, measuring every {cfg.every} ({n_meas} measurements), {torch.get_num_threads()} threads")
    print(f"with probe / without:          {res['seconds'] / base:6.2f}")
    print(f"  training part / without:     {train_only / base:6.2f}")
    print(f"  tracking (per step) / without: {t['tracking'] / base:6.2f}   ({1e3 * t['tracking'] / cfg.steps:.1f} ms per step vs {1e3 * base / cfg.steps:.1f} ms per training step)")
    print(f"  measurement / without:       {t['measurement'] / base:6.2f}   ({t['measurement'] / n_meas:.1f} s per measurement)")


if __name__ == "__main__":
    main()
