"""Cost of one full measurement of the probe, counted in forward+backward passes of the probe batch.

Trains the demo (``landscape demo``: a 2-layer causal LM of width 96 on KJV text, probe batch 12 × 64,
Adam) with the probe attached at its default settings (17 recipes and the trained step: 18
directions; sharpness with the δ-shift where negative, lines, histograms, cosines, local and
coordinate smoothness) and prints, for each measurement:

* its matrix-multiply FLOPs per phase (sharpness, lines, geometry = histograms and cosines,
  smoothness) and in total, in units of one forward+backward of the probe batch, against the
  target of 60 (``torch.utils.flop_counter``; a forward-only pass is measured at 1/3 of a
  forward+backward on this model, so a line point costs 1/3), and the points of every line;
* the calls of the model's forward (with and without autograd; the Taylor sweep replays a traced
  graph and does not call it);
* for the last measurement, its time divided by the time of one forward+backward of the probe batch
  (``Objective.loss_and_grad``), medians of interleaved repeats.

``--gpt2-small`` counts one measurement of GPT-2 small instead (``transformers.GPT2Config()``, 124M
parameters, probe batch 4 × 128 random tokens, AdamW, every recipe): counting only (slow on a CPU),
with progress on stderr.

    OMP_NUM_THREADS=1 python benchmarks/measure_cost.py [--steps 1,60,120] [--repeats 3] [--line-batch 0]
    OMP_NUM_THREADS=1 python benchmarks/measure_cost.py --gpt2-small [--state-dtype bfloat16] [--chunk 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import landscape.probe as probe_module
from landscape.cost import MeasurementCost
from landscape.measure import MeasureSettings, measure_step

TARGET = 60.0
PHASES = ("sharpness", "lines", "histograms and cosines", "smoothness")


def counting_measure(results: list[dict], timed_step: int | None, repeats: int, verbose: bool):
    """A stand-in for the probe's measure_step that counts (and, at ``timed_step``, times) it."""

    def wrapped(objective, step, at, directions, **kw):
        user_progress = kw.pop("progress", None)

        def tell(phase, done, total):
            if verbose:
                print(f"  step {step}: {phase} {done}/{total}", file=sys.stderr, flush=True)
            if user_progress is not None:
                user_progress(phase, done, total)

        t0 = time.perf_counter()
        with MeasurementCost(objective, at=at, then=tell) as cost:
            rows = measure_step(objective, step, at, directions, progress=cost.progress, **kw)
        seconds = time.perf_counter() - t0
        # the lines measured (a direction measured once with another repeats that one's line)
        lines = {r["direction"]: len(r["s"]) - 1 for r in rows.get("lines", []) if not r.get("measured_as")}
        same = [f"{r['direction']} as {r['measured_as']}" for r in rows["sharpness"] if r.get("measured_as")]
        entry = {"step": step, "cost": cost, "lines": lines, "seconds": seconds, "same": same,
                 "shifted": sum(bool(r["shifted"]) for r in rows["sharpness"]),
                 "directions": len(rows["sharpness"]), "engine": rows["_engine"][0]["engine"]}
        if step == timed_step and repeats > 0:
            fb, ms, phase_times = [], [], []
            for _ in range(repeats):
                fb.append(statistics.median(_time(lambda: objective.loss_and_grad(at)) for _ in range(5)))
                t1 = time.perf_counter()
                again = measure_step(objective, step, at, directions, **kw)
                ms.append(time.perf_counter() - t1)
                phase_times.append(again["_timings"][0])
            entry["phase_times"] = {k: statistics.median(t.get(k, 0.0) for t in phase_times) / statistics.median(fb)
                                    for k in ("sharpness", "lines", "geometry", "smoothness")}
            entry["time_ratio"] = statistics.median(ms) / statistics.median(fb)
            entry["fwd_bwd_seconds"] = statistics.median(fb)
            entry["measure_seconds"] = statistics.median(ms)
        results.append(entry)
        return rows

    return wrapped


def _time(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def report(entry: dict) -> None:
    c = entry["cost"]
    print(f"step {entry['step']}: {entry['directions']} directions ({entry['shifted']} δ-shifted), "
          f"engine {entry['engine']}, one forward = {c.forward_ratio:.3f} forward+backward")
    if entry.get("same"):
        print(f"  measured once with another (the same direction to float rounding): {', '.join(entry['same'])}")
    for phase in PHASES:
        print(f"  {phase:<24} {c.phases.get(phase, 0.0):6.2f} forward+backward")
    others = {k: v for k, v in c.phases.items() if k not in PHASES and v}
    for phase, v in others.items():
        print(f"  {phase:<24} {v:6.2f} forward+backward")
    verdict = "within" if c.total <= TARGET else "OVER"
    print(f"  {'total':<24} {c.total:6.2f} forward+backward (target <= {TARGET:g}: {verdict})")
    pts = list(entry["lines"].values())
    if pts:
        print(f"  line points per measured line: mean {statistics.mean(pts):.2f}, max {max(pts)} "
              f"({sum(pts)} forwards in all)")
    print(f"  model forward calls: {c.calls['grad']} with autograd, {c.calls['no_grad']} without "
          f"(Taylor sweeps replay a traced graph)")
    if "time_ratio" in entry:
        print(f"  time of the measurement / time of one forward+backward: {entry['time_ratio']:.1f} "
              f"({entry['measure_seconds']:.2f} s / {entry['fwd_bwd_seconds'] * 1e3:.1f} ms, medians of interleaved repeats)")
        print("  its phases in time of one forward+backward: "
              + ", ".join(f"{k} {v:.1f}" for k, v in entry["phase_times"].items())
              + " (elementwise work, which the FLOP count leaves out, weighs on a model this small)")


def demo(args) -> None:
    from landscape.demo import DemoConfig, run_demo

    steps = sorted(int(s) for s in args.steps.split(","))
    every = steps[1] if len(steps) > 1 else 60
    if any(s != 1 and s % every for s in steps):
        raise SystemExit(f"--steps must be 1 and multiples of one interval (the probe's `every`), got {steps}")
    cfg = DemoConfig(steps=max(steps), every=every)
    results: list[dict] = []
    probe_module.measure_step = counting_measure(results, steps[-1], args.repeats, args.verbose)
    settings = MeasureSettings(line_batch=args.line_batch, chunk=args.chunk)
    with tempfile.TemporaryDirectory() as tmp:
        run_demo(Path(tmp) / "demo", cfg, settings=settings)
    print(f"demo model (landscape demo: width {cfg.width}, depth {cfg.depth}, probe batch {cfg.probe_size} x "
          f"{cfg.context}), default MeasureSettings (line_batch={args.line_batch}), torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)")
    for entry in results:
        report(entry)
    worst = max(e["cost"].total for e in results)
    print(f"largest measurement: {worst:.2f} forward+backward for {results[0]['directions']} directions "
          f"(target <= {TARGET:g})")


def gpt2_small(args) -> None:
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config()
    model = transformers.GPT2LMHeadModel(config)
    n = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    probe_batch = torch.randint(0, config.vocab_size, (4, 128), generator=gen)

    def loss_fn(m, b):
        return m(input_ids=b, labels=b).loss

    dtype = getattr(torch, args.state_dtype) if args.state_dtype != "float32" else None
    results: list[dict] = []
    probe_module.measure_step = counting_measure(results, None, 0, True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    print(f"GPT-2 small from transformers.GPT2Config(): {n / 1e6:.1f}M parameters, probe batch 4 x 128 random "
          f"tokens, AdamW, states {args.state_dtype}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        probe = probe_module.Probe(model, loss_fn, probe_batch, out=Path(tmp) / "gpt2", every=1,
                                   state_dtype=dtype, save_state=False,
                                   settings=MeasureSettings(line_batch=args.line_batch, chunk=args.chunk))
        probe.attach(opt)
        model.train()
        x = torch.randint(0, config.vocab_size, (4, 128), generator=gen)
        t = time.perf_counter()
        loss_fn(model, x).backward()
        opt.step()  # the probe measures this step (step 1) in its post-hook
        opt.zero_grad()
        print(f"trained one step and measured it in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        if probe.last_error:
            print(f"the probe failed: {probe.last_error}", file=sys.stderr)
        probe.close()
    print(f"GPT-2 small ({n / 1e6:.1f}M parameters), probe batch 4 x 128, default MeasureSettings, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    for entry in results:
        report(entry)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="1,60,120", help="measured steps of the demo run (1 and multiples of one interval)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of the timed (last) measurement")
    ap.add_argument("--line-batch", type=int, default=0, help="MeasureSettings.line_batch (0: automatic)")
    ap.add_argument("--chunk", type=int, default=4, help="MeasureSettings.chunk (directions at a time; no effect on the count)")
    ap.add_argument("--gpt2-small", action="store_true", help="count one measurement of GPT-2 small instead")
    ap.add_argument("--state-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="recipe state dtype for --gpt2-small (bfloat16 keeps it within a 24 GiB machine)")
    ap.add_argument("--verbose", action="store_true", help="print each phase on stderr")
    args = ap.parse_args()
    if args.gpt2_small:
        gpt2_small(args)
    else:
        demo(args)


if __name__ == "__main__":
    main()
