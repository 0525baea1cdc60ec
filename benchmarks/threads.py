"""Wall time of the demo and of ``landscape analyze`` with 1 vs N intra-op (OpenMP) threads, under load.

Runs are interleaved in one process (``torch.set_num_threads`` between runs: 1, N, N, 1, 1, N, ...),
with ``--load`` busy processes (pure-Python loops, as another job on the machine would be) running
the whole time, and prints each ratio time(N threads) / time(1 thread) and their median, with the
load average. Absolute times are not comparable across machines; the ratios are the point.

    OMP_NUM_THREADS=1 python benchmarks/threads.py [--threads 2] [--load 1] [--reps 2]

(``OMP_NUM_THREADS`` only sets the starting value; the script sets the thread count for each run.)
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from landscape.analyze import analyze
from landscape.data import CharCorpus, kjv_text
from landscape.demo import DemoConfig, run_demo
from landscape.models import TinyCausalLM, lm_loss

CONTEXT = 32


def spec():
    corpus = CharCorpus(kjv_text()[:300_000])
    model = TinyCausalLM(corpus.vocab, width=64, depth=2, heads=4, context=CONTEXT)
    probe_batch = corpus.batch(16, CONTEXT, torch.Generator().manual_seed(1), split="probe")
    gen = torch.Generator().manual_seed(0)
    return model, lm_loss, probe_batch, [corpus.batch(16, CONTEXT, gen) for _ in range(20)]


def make_checkpoints(folder: Path, steps: int = 16, every: int = 8) -> list[Path]:
    corpus = CharCorpus(kjv_text()[:300_000])
    torch.manual_seed(0)
    model = TinyCausalLM(corpus.vocab, width=64, depth=2, heads=4, context=CONTEXT)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for step in range(steps + 1):
        if step % every == 0:
            paths.append(folder / f"ckpt_{step:05d}.pt")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, paths[-1])
        loss = lm_loss(model, corpus.batch(16, CONTEXT, gen))
        loss.backward()
        opt.step()
        opt.zero_grad()
    return paths


def timed(fn) -> float:
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2, help="the thread count compared with 1")
    ap.add_argument("--load", type=int, default=1, help="busy processes running meanwhile")
    ap.add_argument("--reps", type=int, default=2, help="pairs of runs per workload")
    ap.add_argument("--demo-steps", type=int, default=40)
    ap.add_argument("--demo-every", type=int, default=20)
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.load)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a timeout's SIGTERM still stops the busy loops
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            ckpts = make_checkpoints(tmp / "ckpts")
            counter = iter(range(10_000))

            def demo() -> None:
                run_demo(tmp / f"demo{next(counter)}", DemoConfig(steps=args.demo_steps, every=args.demo_every))

            def analysis() -> None:
                analyze(spec(), [str(p) for p in ckpts], tmp / f"analyze{next(counter)}")

            for name, fn in (("demo", demo), ("analyze", analysis)):
                torch.set_num_threads(1)
                fn()  # warm-up: imports, corpus, the Taylor recording's first use
                ratios = []
                order = []
                for rep in range(args.reps):
                    order += [1, args.threads] if rep % 2 == 0 else [args.threads, 1]
                times: dict[int, list[float]] = {1: [], args.threads: []}
                for n in order:
                    torch.set_num_threads(n)
                    times[n].append(timed(fn))
                ratios = [b / a for a, b in zip(times[1], times[args.threads])]
                load = os.getloadavg()[0]
                print(f"{name:8s} time({args.threads} threads) / time(1 thread): "
                      + ", ".join(f"{r:.2f}" for r in ratios) + f"  median {statistics.median(ratios):.2f}"
                      + f"  (load average {load:.1f} on {os.cpu_count()} CPUs, {args.load} busy process(es) added)", flush=True)
    finally:
        for p in busy:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
