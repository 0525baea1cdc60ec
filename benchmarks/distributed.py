"""The probe under DDP against one process: recipe-state bytes per rank, per-step tracking time and
one measurement's time, printed as ratios measured in one run (two gloo ranks on this machine's CPUs).

    python benchmarks/distributed.py [--world 2] [--width 256] [--steps 12]

Each rank holds only its recipes' states (landscape.distributed.assign_recipes) and tracks only them,
so both figures should fall to about 1/world of the one-process ones (plus the DDP step's own cost,
which is not the probe's). On a machine with fewer cores than ranks the time ratios are pessimistic.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(width: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))


def run(out: Path, width: int, steps: int, rank: int, world: int) -> dict:
    import torch
    import torch.nn.functional as F

    import landscape as ls

    model = build(width)
    train_model = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_model = DDP(model)
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(steps, 64, 64, generator=g), torch.randint(0, 10, (steps, 64), generator=g)
    probe_batch = (torch.randn(256, 64, generator=g), torch.randint(0, 10, (256,), generator=g))

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    opt = torch.optim.AdamW(train_model.parameters(), lr=1e-3)
    probe = ls.Probe(train_model, loss_fn, probe_batch, out, every=steps, settings=ls.MeasureSettings(lines=False))
    probe.attach(opt)
    per = 64 // world
    t0 = time.perf_counter()
    for i in range(steps):
        loss = loss_fn(train_model, (xs[i, rank * per:(rank + 1) * per], ys[i, rank * per:(rank + 1) * per]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    wall = time.perf_counter() - t0
    state = probe._pseudo.state_bytes() if probe._pseudo is not None else 0
    timings = dict(probe.timings)
    probe.close()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"state_bytes": state, "param_bytes": params, "tracking_per_step": timings["tracking"] / steps,
            "measurement": timings["measurement"], "wall": wall, "disabled": probe.disabled}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rank-of", help=argparse.SUPPRESS)
    a = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    if a.rank_of:  # a rank started below
        import torch.distributed as dist

        dist.init_process_group("gloo")
        res = run(Path(a.rank_of) / "run", a.width, a.steps, dist.get_rank(), dist.get_world_size())
        (Path(a.rank_of) / f"rank{dist.get_rank()}.json").write_text(json.dumps(res))
        dist.destroy_process_group()
        return
    with tempfile.TemporaryDirectory() as tmp:
        one = run(Path(tmp) / "one", a.width, a.steps, 0, 1)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(a.world),
               "PYTHONPATH": str(ROOT)}
        procs = [subprocess.Popen([sys.executable, __file__, "--width", str(a.width), "--steps", str(a.steps),
                                   "--rank-of", tmp], env={**env, "RANK": str(r)}) for r in range(a.world)]
        for p in procs:
            p.wait()
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(a.world)]
    print(f"model: {one['param_bytes'] / 2**20:.2f} MiB of parameters, 17 recipes, {a.world} gloo ranks vs one process")
    print(f"recipe states, one process: {one['state_bytes'] / one['param_bytes']:.2f}x the parameter bytes")
    for r, res in enumerate(ranks):
        print(f"rank {r}: states {res['state_bytes'] / one['state_bytes']:.3f} of the one-process bytes, "
              f"tracking per step {res['tracking_per_step'] / one['tracking_per_step']:.2f}x, "
              f"measurement {res['measurement'] / one['measurement']:.2f}x the one-process time"
              + (f" (probe off: {res['disabled']})" if res["disabled"] else ""))
    print(f"largest rank / (one process / world): states {max(r['state_bytes'] for r in ranks) * a.world / one['state_bytes']:.2f}")


if __name__ == "__main__":
    main()
