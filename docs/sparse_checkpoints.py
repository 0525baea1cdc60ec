"""How much do sparse checkpoints change the pseudo-update directions `landscape analyze` measures?

Trains the tiny reference LM (TinyCausalLM on the King James Bible, character level) with Adam for
200 steps, saving every step. Then measures, at steps 20, 40, ..., 200, the sharpness of every
recipe's direction three ways:

* ``dense``: all 201 per-step checkpoints, each fed the exact training batch of its step. The
  recipe states are then exactly the probe's (the probe measures the same points one step number
  later: it numbers the step about to be taken).
* ``sparse-1``: every 20th checkpoint only, each fed the training batch of its step: one gradient
  per checkpoint, so each momentum has seen 20x fewer gradients, spread over 20x more steps.
* ``sparse-8``: the same checkpoints, each fed the mean gradient of 8 training batches.

and prints, per recipe, the median over the measured steps of the relative difference
``|S_sparse - S_dense| / |S_dense|`` of the sharpness and of the ratio to SGD. The numbers quoted in
docs/analyze.md come from::

    OMP_NUM_THREADS=1 python docs/sparse_checkpoints.py            # about a minute on one core
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from landscape.analyze import Spec, analyze
from landscape.data import CharCorpus, kjv_text
from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.optim import recipe_names
from landscape.store import load_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--sparse", type=int, default=20, help="keep every this many checkpoints")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.out or Path(tempfile.mkdtemp(prefix="sparse_ckpt_"))
    ckdir = work / "checkpoints"
    ckdir.mkdir(parents=True, exist_ok=True)

    torch.manual_seed(args.seed)
    corpus = CharCorpus(kjv_text()[:300_000])
    gen = torch.Generator().manual_seed(args.seed)
    batches = [corpus.batch(16, 32, gen) for _ in range(args.steps + 8)]  # the last 7 only for sparse-8
    probe_batch = corpus.batch(16, 32, torch.Generator().manual_seed(args.seed + 1), split="probe")

    def new_model() -> TinyCausalLM:
        torch.manual_seed(args.seed)
        return TinyCausalLM(corpus.vocab, width=64, depth=2, heads=4, context=32)

    t0 = time.perf_counter()
    model = new_model()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for t in range(args.steps + 1):
        torch.save({"model": model.state_dict(), "step": t}, ckdir / f"ckpt_{t:04d}.pt")
        if t == args.steps:
            break
        loss = lm_loss(model, batches[t])
        loss.backward()
        opt.step()
        opt.zero_grad()
    print(f"trained {args.steps} steps (final training loss {float(loss.detach()):.3f}) in {time.perf_counter() - t0:.0f} s")

    settings = MeasureSettings(lines=False, smoothness=False, cosine=False, coord_per_layer=0)
    every = args.sparse
    sparse_steps = list(range(0, args.steps + 1, every))
    all_ck = [ckdir / f"ckpt_{t:04d}.pt" for t in range(args.steps + 1)]
    sparse_ck = [all_ck[t] for t in sparse_steps]
    runs = {
        "dense": (all_ck, batches[: args.steps + 1], 1, every),
        "sparse-1": (sparse_ck, [batches[t] for t in sparse_steps], 1, 1),
        "sparse-8": (sparse_ck, [batches[t + j] for t in sparse_steps for j in range(8)], 8, 1),
    }
    rows = {}
    for name, (cks, train, k, measure_every) in runs.items():
        t0 = time.perf_counter()
        spec = Spec(new_model(), lm_loss, probe_batch, train, source=f"sparse_checkpoints:{name}")
        res = analyze(spec, cks, work / name, every=measure_every, settings=settings, grad_batches=k)
        print(f"{name}: measured steps {res.measured[0]}..{res.measured[-1]} in {time.perf_counter() - t0:.0f} s")
        rows[name] = {(r["step"], r["direction"]): r for r in load_run(work / name).rows("sharpness")}

    steps = [t for t in sparse_steps if t > 0]
    print(f"\nmedian over steps {steps[0]}..{steps[-1]} of |sparse - dense| / |dense|")
    print(f"{'recipe':<20s} {'sharp. sparse-1':>15s} {'sharp. sparse-8':>15s} {'ratio sparse-1':>15s} {'ratio sparse-8':>15s}")
    overall: dict[str, list[float]] = {"s1": [], "s8": [], "r1": [], "r8": []}
    for recipe in recipe_names():
        vals = {}
        for tag, run in (("1", "sparse-1"), ("8", "sparse-8")):
            ds = [rows["dense"][(t, recipe)] for t in steps]
            ss = [rows[run][(t, recipe)] for t in steps]
            vals["s" + tag] = statistics.median(abs(s["sharpness"] - d["sharpness"]) / abs(d["sharpness"]) for s, d in zip(ss, ds))
            ratios = [
                abs(s["ratio_to_sgd"] - d["ratio_to_sgd"]) / abs(d["ratio_to_sgd"])
                for s, d in zip(ss, ds)
                if s["ratio_to_sgd"] is not None and d["ratio_to_sgd"]
            ]
            vals["r" + tag] = statistics.median(ratios) if ratios else float("nan")
        for key, v in vals.items():
            overall[key].append(v)
        print(f"{recipe:<20s} {vals['s1']:>15.1%} {vals['s8']:>15.1%} {vals['r1']:>15.1%} {vals['r8']:>15.1%}")
    med = {k: statistics.median(v) for k, v in overall.items()}
    print(f"{'median (recipes)':<20s} {med['s1']:>15.1%} {med['s8']:>15.1%} {med['r1']:>15.1%} {med['r8']:>15.1%}")
    print("\nmedian over the steps of the ratio to SGD (the report's summary), dense vs sparse")
    print(f"{'recipe':<20s} {'dense':>8s} {'sparse-1':>9s} {'sparse-8':>9s}")
    medians: dict[str, list[float]] = {"dense": [], "sparse-1": [], "sparse-8": []}
    for recipe in recipe_names():
        for run in medians:
            medians[run].append(statistics.median(rows[run][(t, recipe)]["ratio_to_sgd"] for t in steps))
        print(f"{recipe:<20s} {medians['dense'][-1]:8.3f} {medians['sparse-1'][-1]:9.3f} {medians['sparse-8'][-1]:9.3f}")
    for run in ("sparse-1", "sparse-8"):
        rel = [abs(s - d) / abs(d) for s, d in zip(medians[run], medians["dense"]) if d]
        print(f"{run}: median relative difference of the median ratios {statistics.median(rel):.1%}, "
              f"Spearman rank correlation with dense {_spearman(medians[run], medians['dense']):.2f}")
    print("\nstep   sgd dense   sgd sparse-1   adam dense   adam sparse-1   (sharpness)")
    for t in steps:
        print(f"{t:4d} {rows['dense'][(t, 'sgd')]['sharpness']:11.4g} {rows['sparse-1'][(t, 'sgd')]['sharpness']:14.4g} "
              f"{rows['dense'][(t, 'adam')]['sharpness']:12.4g} {rows['sparse-1'][(t, 'adam')]['sharpness']:15.4g}")
    print(f"\nwork folder: {work}")


def _spearman(a: list[float], b: list[float]) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


if __name__ == "__main__":
    main()
