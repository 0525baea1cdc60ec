"""Cost of a 41 × 41 loss plane, in forward passes per grid point.

For the demo's causal LM (width 96, 2 layers, LayerNorm, attention, a probe batch of 12 × 64 tokens of
real text, as ``landscape demo`` measures it) and a tiny one (width 32, 4 × 16 tokens: per-call
overhead dominates there), prints

    time(ls.loss_plane over the whole grid) / (points × time(one plain forward pass))

where the plain forward pass is ``loss_fn(model, batch)`` under ``torch.no_grad()`` in eval mode,
timed interleaved with the grid in the same process (before and after each grid, median over
rounds). Times are CPU times of this process (``time.process_time``, one thread), which a loaded
machine disturbs less than wall-clock times; wall-clock ratios are printed too. For each method:
``auto`` (the default: batched where it is checked equal and faster), ``loop`` (one point per
forward, one functional call per chunk) and ``vmap`` (several points per forward); and the matmul
FLOPs per grid point relative to one forward pass (``torch.utils.flop_counter``: what no
implementation can go below; ``auto`` adds up to four forward passes per grid, its check). The target is
≤ 1.1 forward passes per point.

    OMP_NUM_THREADS=1 python benchmarks/plane_cost.py [--grid 41] [--rounds 3] [--methods auto,loop,vmap]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lm_setup  # noqa: E402

import landscape as ls  # noqa: E402

MODELS = {
    "demo LM": {"width": 96, "depth": 2, "batch": 12, "context": 64},
    "tiny LM": {"width": 32, "depth": 1, "batch": 4, "context": 16},
}


def clocks() -> tuple[float, float]:
    return time.process_time(), time.perf_counter()


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def measure(name: str, size: dict, grid: int, rounds: int, methods: list[str]) -> list[float]:
    model, loss_fn, batch = lm_setup(**size)
    model.eval()
    obj = ls.Objective(model, loss_fn, batch)
    plane = ls.random_plane(obj, seed=0)
    n_params = sum(p.numel() for p in model.parameters())
    points = grid * grid

    def plain(k: int = 1) -> None:
        with torch.no_grad():
            for _ in range(k):
                float(loss_fn(model, batch))

    plain(3)  # warm up
    ls.loss_plane(obj, plane.d1, plane.d2, 3)
    base_flops = flops(plain)
    print(f"\n{name} (width {size['width']}, {size['depth']} layer(s), {size['batch']}×{size['context']} tokens, "
          f"{n_params:,} parameters): {grid}×{grid} grid = {points} points, {rounds} round(s)")
    print(f"  {'method':<7}{'used':<7}{'forwards/point (CPU)':>22}{'(wall)':>9}{'matmul FLOPs/point':>21}")
    out = []
    for method in methods:
        cpu, wall, used = [], [], ""
        for _ in range(rounds):
            c0, w0 = clocks()
            plain(grid)
            c1, w1 = clocks()
            res = ls.loss_plane(obj, plane.d1, plane.d2, grid, method=method)
            c2, w2 = clocks()
            plain(grid)
            c3, w3 = clocks()
            used = res.method
            per_plain_cpu = ((c1 - c0) + (c3 - c2)) / (2 * grid)
            per_plain_wall = ((w1 - w0) + (w3 - w2)) / (2 * grid)
            cpu.append((c2 - c1) / points / per_plain_cpu)
            wall.append((w2 - w1) / points / per_plain_wall)
        # FLOPs counted on a 4 × 4 grid: per point a constant (one forward), plus for "auto" a constant number
        # of extra forwards per grid (the check of the batched values), spread here over the whole grid
        extra = flops(lambda method=method: ls.loss_plane(obj, plane.d1, plane.d2, 4, method=method)) / base_flops - 16
        ratio = statistics.median(cpu)
        out.append(ratio)
        print(f"  {method:<7}{used:<7}{ratio:>22.3f}{statistics.median(wall):>9.3f}{1 + extra / points:>21.4f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, default=41, help="points per axis")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per method (median)")
    parser.add_argument("--methods", default="auto,loop,vmap", help="comma-separated: auto, loop, vmap")
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated: {', '.join(MODELS)}")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    summary = {}
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        ratios = measure(name, MODELS[name], args.grid, args.rounds, methods)
        summary[name] = dict(zip(methods, ratios))
    if all("auto" in s for s in summary.values()):
        worst = max(s["auto"] for s in summary.values())
        print(f"\ntarget: ≤ 1.1 forward passes per point with the default method; worst here {worst:.3f}: "
              + ("met" if worst <= 1.1 else "NOT met"))


if __name__ == "__main__":
    main()
