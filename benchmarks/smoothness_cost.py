"""Cost of the smoothness measurements, in units of one gradient (forward + backward) on the probe batch.

Run: ``python benchmarks/smoothness_cost.py [--width 64] [--depth 2] [--batch 16]``. Printed, never
asserted. The model is the reference TinyCausalLM on random tokens; the step is a real Adam step.
Timings on a shared, loaded machine swing by 2-5x: compare ratios from one quiet run only.
"""

from __future__ import annotations

import argparse
import time

import torch

from landscape import tree
from landscape.models import TinyCausalLM, lm_loss
from landscape.objective import Objective
from landscape.smoothness import coordinate_smoothness, fit_l0_l1, local_smoothness, robust_smoothness


def timed(fn, repeat: int = 1):
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    return out, (time.perf_counter() - t0) / repeat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()

    torch.manual_seed(0)
    vocab = 65
    model = TinyCausalLM(vocab, width=args.width, depth=args.depth, heads=4, context=args.context)
    tokens = torch.randint(0, vocab, (args.batch, args.context + 1))
    batch = (tokens[:, :-1], tokens[:, 1:])
    obj = Objective(model, lm_loss, batch)
    d = tree.numel(obj.params())
    print(
        f"TinyCausalLM width={args.width} depth={args.depth}: {d} parameters, probe batch {args.batch}x{args.context}"
    )

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_t = obj.params()
    obj.grad(), obj.hvps([x_t])  # warm-up: first calls pay one-off costs
    g_t, t_grad = timed(lambda: obj.grad(), repeat=3)
    lm_loss(model, batch).backward()
    opt.step()
    x_next = obj.params()

    res, t_local = timed(lambda: local_smoothness(obj, x_t, x_next, grad_t=g_t))
    _, t_coord = timed(lambda: coordinate_smoothness(obj, x_t, x_next, per_layer=16, grad_t=g_t))
    rob, t_rob = timed(lambda: robust_smoothness(obj, at=x_t, n_samples=args.samples))
    _, t_hvp = timed(lambda: obj.hvps([g_t] * 8, at=x_t))

    print(f"gradient:                   {t_grad * 1e3:8.1f} ms  (1.0)")
    print(
        f"local_smoothness (5 γ):     {t_local * 1e3:8.1f} ms  ({t_local / t_grad:.1f}x)  L̂={res.l_hat:.4g}"
    )
    print(f"coordinate_smoothness:      {t_coord * 1e3:8.1f} ms  ({t_coord / t_grad:.1f}x)")
    print(f"8 batched HVPs:             {t_hvp * 1e3:8.1f} ms  ({t_hvp / t_grad / 8:.1f}x per HVP)")
    print(
        f"robust_smoothness:          {t_rob * 1e3:8.1f} ms  ({t_rob / t_grad:.1f}x, {rob.n_hvps} HVPs)  "
        f"L={rob.top_eig:.4g} ℓ={rob.l_robust:.4g} L/ℓ={rob.ratio:.3g} ε={rob.eps:.4f} "
        f"converged={rob.converged}"
    )
    _, t_fit = timed(
        lambda: fit_l0_l1(torch.rand(10_000).numpy(), torch.rand(10_000).numpy(), outliers=0.001)
    )
    print(f"fit_l0_l1 (10k samples, 10 outliers): {t_fit * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
