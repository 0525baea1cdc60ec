"""Cost of directional sharpness relative to one forward+backward pass.

Prints, on the demo's causal LM (2 layers, width 128, LayerNorm, attention) at 2,048 tokens of real
text, ``time(K directions) / (K × time(one forward+backward))`` for ``ls.directional_sharpness`` with
its default engine (the second-order Taylor sweep through the traced loss, ``method="taylor"``), with
its Hessian-vector-product engine (``method="hvp"``: one retained ``create_graph`` gradient + one
backward per direction) and for alternative HVP schemes, the peak memory of each (measured in a fresh
subprocess), the matrix-multiply FLOPs of one direction relative to one forward+backward (counted by
``torch.utils.flop_counter``: the floor no implementation of that scheme can beat), and the cost of
one point of ``loss_along`` relative to one forward pass. Each method is timed against its baseline
interleaved in the same process; the machine is noisy, so medians of repeats are used.

    python benchmarks/sharpness_cost.py [--directions 16] [--repeats 5] [--width 128] [--depth 2]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import lm_setup, median_time, peak_rss_mib  # noqa: E402

import landscape as ls  # noqa: E402
from landscape import tree  # noqa: E402
from landscape.objective import math_attention  # noqa: E402

SIZE = {"width": 128, "depth": 2}


def make(k):
    model, loss_fn, batch = lm_setup(width=SIZE["width"], depth=SIZE["depth"])
    obj = ls.Objective(model, loss_fn, batch)
    gen = torch.Generator().manual_seed(0)
    dirs = {f"d{i}": tree.randn_like(obj.params(), gen) for i in range(k)}
    return model, loss_fn, batch, obj, dirs


def methods(model, loss_fn, batch, obj, dirs):
    params = dict(model.named_parameters())
    names = list(obj.names)
    leaves = [params[n] for n in names]
    units = [tree.normalize(d)[0] for d in dirs.values()]

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    def forward():
        # In eval mode, as the objective evaluates it.
        model.eval()
        with torch.no_grad():
            loss_fn(model, batch)
        model.train()

    def engine():
        ls.directional_sharpness(obj, dirs, shift="never")

    def engine_hvp():
        ls.directional_sharpness(obj, dirs, shift="never", method="hvp")

    def fresh_double_backward():
        with math_attention():
            for u in units:
                gs = torch.autograd.grad(loss_fn(model, batch), leaves, create_graph=True)
                hv = torch.autograd.grad(gs, leaves, grad_outputs=[u[n] for n in names])
                sum(float((h * u[n]).sum()) for h, n in zip(hv, names))

    def forward_over_reverse():
        p0 = {n: p.detach() for n, p in params.items()}
        inputs, targets = batch

        def loss(q):
            logits = torch.func.functional_call(model, {**p0, **q}, (inputs,))
            return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

        with math_attention():
            for u in units:
                _, hv = torch.func.jvp(torch.func.grad(loss), ({n: p0[n] for n in names},), ({n: u[n] for n in names},))
                float(tree.dot(hv, u))

    def batched_backward():
        with math_attention():
            gs = torch.autograd.grad(loss_fn(model, batch), leaves, create_graph=True)
            outs = [torch.stack([u[n] for u in units]) for n in names]
            hv = torch.autograd.grad(gs, leaves, grad_outputs=outs, is_grads_batched=True)
            [float(sum((h[i] * u[n]).sum() for h, n in zip(hv, names))) for i, u in enumerate(units)]

    def line_point():
        obj.losses_along(units[0], [0.1])

    def line_8():
        obj.losses_along(units[0], [0.0125 * (i + 1) for i in range(8)])

    return {
        "forward+backward": fwd_bwd,
        "forward": forward,
        "taylor sweep (default)": engine,
        "hvp engine (retained graph)": engine_hvp,
        "fresh double backward": fresh_double_backward,
        "forward-over-reverse": forward_over_reverse,
        "is_grads_batched": batched_backward,
        "loss_along point": line_point,
        "loss_along 8-point line": line_8,
    }


def child(name, k, repeats):
    """Times ``name`` and its baseline in the same process, interleaved (the machine is noisy)."""
    model, loss_fn, batch, obj, dirs = make(k)
    table = methods(model, loss_fn, batch, obj, dirs)
    fn = table[name]
    cheap = name in ("forward+backward", "forward", "loss_along point", "loss_along 8-point line")
    base_name = "forward" if name.startswith("loss_along") else "forward+backward"
    base = table[base_name]
    rss0 = peak_rss_mib()
    fn()
    peak = peak_rss_mib() - rss0
    flop_ratio = per_direction_flops(name, model, loss_fn, batch, obj, dirs)
    per = 8 if name == "loss_along 8-point line" else 1 if cheap else k
    ratios = []
    if cheap:
        # Each call takes milliseconds and the machine's noise is ±15% at that scale: alternate single
        # calls of the method and its baseline many times and compare the medians.
        base()
        fn()
        tbs, tms = [], []
        for _ in range(6 * repeats):
            tbs.append(median_time(base, repeats=1, warmup=0))
            tms.append(median_time(fn, repeats=1, warmup=0))
        tbs.sort()
        tms.sort()
        ratios.append(tms[len(tms) // 2] / (per * tbs[len(tbs) // 2]))
    for _ in range(0 if cheap else repeats):
        tb = median_time(base, repeats=3, warmup=1)
        tm = median_time(fn, repeats=1, warmup=0)
        tb2 = median_time(base, repeats=3, warmup=0)
        ratios.append(tm / (per * (tb + tb2) / 2))
    ratios.sort()
    trace = None
    if name.startswith("taylor"):
        # The one-time cost of recording the loss, paid once per Objective (a probe keeps one for the run).
        fresh = ls.Objective(model, loss_fn, batch, check_determinism=False)
        t0 = time.perf_counter()
        assert fresh.taylor_support() is None
        trace = (time.perf_counter() - t0) / median_time(base, repeats=3, warmup=0)
    print(json.dumps({"ratio": ratios[len(ratios) // 2], "peak_mib": peak, "trace": trace, "flop_ratio": flop_ratio}))


def _flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten

    def addmm_(self_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    def baddbmm_(self_shape, a_shape, b_shape, *args, **kwargs):
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]

    # The in-place forms the Taylor sweep uses cost what the out-of-place ones do.
    custom = {aten.addmm_: addmm_, aten.baddbmm_: baddbmm_}
    with FlopCounterMode(display=False, custom_mapping=custom) as counter:
        fn()
    return counter.get_total_flops()


def per_direction_flops(name, model, loss_fn, batch, obj, dirs):
    """FLOPs (matrix products, as torch.utils.flop_counter counts them) of one more direction, relative
    to one forward+backward: the floor for that scheme whatever the implementation."""
    if name not in ("taylor sweep (default)", "hvp engine (retained graph)"):
        return None

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        with math_attention():
            loss_fn(model, batch).backward()
        model.zero_grad(set_to_none=True)

    base = _flops(fwd_bwd)
    two = dict(list(dirs.items())[:2])
    one = dict(list(dirs.items())[:1])
    method = "taylor" if name.startswith("taylor") else "hvp"
    f2 = _flops(lambda: obj.directional_derivatives(list(two.values()), method=method))
    f1 = _flops(lambda: obj.directional_derivatives(list(one.values()), method=method))
    return (f2 - f1) / base


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--directions", type=int, default=16)
    ap.add_argument("--width", type=int, default=128, help="model width (the issue's benchmark: 128)")
    ap.add_argument("--depth", type=int, default=2, help="transformer blocks (the issue's benchmark: 2)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    SIZE.update(width=a.width, depth=a.depth)
    if a.child:
        child(a.child, a.directions, a.repeats)
        return
    names = a.only or [
        "forward+backward",
        "forward",
        "taylor sweep (default)",
        "hvp engine (retained graph)",
        "fresh double backward",
        "forward-over-reverse",
        "is_grads_batched",
        "loss_along point",
        "loss_along 8-point line",
    ]
    res = {}
    for n in names:
        out = subprocess.run(
            [sys.executable, __file__, "--child", n, "--directions", str(a.directions), "--repeats", str(a.repeats),
             "--width", str(a.width), "--depth", str(a.depth)],
            capture_output=True,
            text=True,
        )
        if out.returncode:
            res[n] = None
            print(f"{n}: failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        res[n] = json.loads(out.stdout.strip().splitlines()[-1])
    k = a.directions
    print(f"\ncausal LM, {a.depth} layers, width {a.width}, 2,048 tokens; K = {k} directions; "
          f"median of {a.repeats} interleaved repeats")
    print(f"{'method':28s} {'time / (K x fwd+bwd)':>22s} {'peak MiB over setup':>20s} {'matmul FLOPs / dir':>19s}")
    for n in names:
        r = res.get(n)
        if r is None or n in ("forward", "forward+backward") or n.startswith("loss_along"):
            continue
        fl = "" if r.get("flop_ratio") is None else f"{r['flop_ratio']:.2f}"
        print(f"{n:28s} {r['ratio']:22.2f} {r['peak_mib']:20.1f} {fl:>19s}")
    print("(matmul FLOPs / dir: what one more direction adds, over one forward+backward: the floor of the scheme)")
    t = (res.get("taylor sweep (default)") or {}).get("trace")
    if t is not None:
        print(f"one-time trace of the loss (once per Objective): {t:.1f} x fwd+bwd")
    if res.get("loss_along point"):
        print(f"\nloss_along, a call with one point / one forward pass: {res['loss_along point']['ratio']:.2f}")
    if res.get("loss_along 8-point line"):
        print(f"loss_along, per point of an 8-point line / one forward pass: {res['loss_along 8-point line']['ratio']:.2f}")


if __name__ == "__main__":
    main()
