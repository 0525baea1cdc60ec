"""Memory and per-step cost of the probe on GPT-2 small (124M parameters), the size people train.

GPT-2 small is built from ``transformers.GPT2Config()`` (random weights), trained with AdamW on a
batch of 4 × 128 random tokens. Every configuration runs in a fresh subprocess, so each peak RSS
(``VmHWM``) is that configuration's own. Prints (measures, does not assert):

* peak RSS of plain training and of probed training (the real ``Probe`` attached to the optimizer,
  tracking only: all 17 recipes' states updated at every step, no measurement);
* the probe's extra memory as a multiple of the parameter bytes, against the targets: at most the
  distinct recipe states + 3 with float32 states, half the states + 3 with bfloat16 states;
* per-step tracking time as a fraction of a training step (forward + backward + AdamW, without the
  probe's share), medians over interleaved steps: each step's tracking is timed inside that step;
* the wall-clock overhead: whole steps with the probe on against steps with its hooks bypassed, in
  alternating blocks of steps in the same process (what a background update costs the training it
  overlaps, which the hook's own timing cannot see);
* the same for the levers: ``state_dtype=torch.bfloat16``, ``recipes=`` (a few recipes),
  ``background=True`` (the states updated on a side thread) and ``include=`` (measured parameters
  only: no effect on tracking, it is a measurement lever);
* with ``--measure``: one full measurement (the probe's first step) in a subprocess watched for
  memory (killed above ``--max-rss-gib``), its peak RSS and its time in training steps.

    OMP_NUM_THREADS=1 python benchmarks/scale.py [--steps 5] [--measure] [--small]

``--small`` uses GPT-2 with n_embd 64 (3.4M parameters) to try the script quickly. ``--device cuda``
runs the same on a GPU (``benchmarks/gpu.py`` wraps it and adds GPU memory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()

CONFIGS = {  # name: Probe keyword arguments (None: plain training); background spelled out (its default depends on the threads)
    "plain": None,
    "probe fp32": {"background": False},
    "probe bf16": {"state_dtype": "bfloat16", "background": False},
    "probe recipes=4": {"recipes": ["sgd", "adam", "signsgd", "lion"], "background": False},
    "probe recipes=4 bf16": {"recipes": ["sgd", "adam", "signsgd", "lion"], "state_dtype": "bfloat16", "background": False},
    "probe include=attn": {"include": "attn", "background": False},
    "probe state_device=cpu": {"state_device": "cpu", "background": False},
    "probe fp32 background": {"background": True},
    "probe bf16 background": {"state_dtype": "bfloat16", "background": True},
}
DEFAULT = ["plain", "probe fp32", "probe bf16", "probe recipes=4", "probe recipes=4 bf16", "probe fp32 background",
           "probe bf16 background"]


def peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# ------------------------------------------------------------------------------------------ child
def build(small: bool, batch: int, context: int, device: str, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=2) if small else GPT2Config()
    cfg.n_positions = max(context, 128) if small else cfg.n_positions
    model = GPT2LMHeadModel(cfg).to(device)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device)
    probe_batch = torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device)
    return model, data, probe_batch


def gpt2_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


def _include(spec):
    if spec is None:
        return None
    return lambda name: spec in name


def child(args) -> dict:
    import torch

    import landscape as ls

    torch.set_num_threads(args.threads)
    device = args.device
    model, data, probe_batch = build(args.small, args.batch, args.context, device)
    n_params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kw = CONFIGS[args.child]
    counted: list[dict] = []
    if args.measure_child:  # the configuration that fits this machine: bfloat16 states, one direction at a time
        sys.path.insert(0, str(HERE.parent))
        from measure_cost import counting_measure

        import landscape.probe as probe_module

        kw = {"state_dtype": args.measure_dtype, "settings": ls.MeasureSettings(chunk=args.measure_chunk)}
        probe_module.measure_step = counting_measure(counted, None, 0, False)
    probe = None
    out = tempfile.mkdtemp(prefix="landscape-scale-")
    cuda = device.startswith("cuda")
    waits = [0.0]
    if cuda:  # the backward's kernels finish before the probe's hook starts: their time is training's
        opt.register_step_pre_hook(lambda o, a, k: torch.cuda.synchronize())
    if kw is not None:
        kw = dict(kw)
        if kw.get("state_dtype") not in (None, "float32"):
            kw["state_dtype"] = getattr(torch, kw["state_dtype"])
        else:
            kw.pop("state_dtype", None)
        if "include" in kw:
            kw["include"] = _include(kw["include"])
        probe = ls.Probe(model, gpt2_loss, probe_batch, out=out, every=10**9, save_state=False, **kw)
        probe.attach(opt)
        if not args.measure_child:
            probe.step = 1  # tracking only: the probe measures its first step, so start it past that
    observe_t = [0.0]
    if probe is not None and probe._pseudo is not None:  # PseudoUpdates.observe's share of the tracking
        pu_observe = probe._pseudo.observe

        def timed_observe(grads, **kw):
            t = time.perf_counter()
            try:
                return pu_observe(grads, **kw)
            finally:
                if cuda:
                    torch.cuda.synchronize()
                observe_t[0] += time.perf_counter() - t

        probe._pseudo.observe = timed_observe
    if cuda:  # and the probe's own queued kernels are waited for and counted as tracking

        def wait_for_probe(o, a, k):
            t = time.perf_counter()
            torch.cuda.synchronize()
            waits[0] += time.perf_counter() - t

        opt.register_step_pre_hook(wait_for_probe)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        sync()
        t0 = time.perf_counter()
        before = (probe.timings["tracking"] if probe is not None else 0.0) + waits[0]
        loss = gpt2_loss(model, data)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        total = time.perf_counter() - t0
        tracking = (probe.timings["tracking"] + waits[0] - before) if probe is not None else 0.0
        return total - tracking, tracking

    res: dict = {"config": args.child, "n_params": n_params, "param_bytes": param_bytes}
    if args.measure_child:
        step()  # step 1: tracked, then measured in the optimizer's post-step hook
        measured = probe.timings["measurement"]
        train, _ = step()  # step 2: not measured; its time (without tracking) is the unit
        res.update(measure_s=measured, step_s=train, error=probe.last_error, peak_rss=peak_rss_bytes())
        if counted:
            cost = counted[0]["cost"]
            res.update(passes=cost.total, phases=dict(cost.phases), directions=counted[0]["directions"])
        probe.close()
        return res
    train_t, track_t, obs_t = [], [], []
    for i in range(args.warmup + args.steps):
        o0 = observe_t[0]
        a, b = step()
        if i >= args.warmup:
            train_t.append(a)
            track_t.append(b)
            obs_t.append(observe_t[0] - o0)
    res.update(train_s=statistics.median(train_t), tracking_s=statistics.median(track_t), peak_rss=peak_rss_bytes(),
               observe_s=statistics.median(obs_t))
    res["fractions"] = [b / a for a, b in zip(train_t, track_t)]
    if probe is not None and probe._pseudo is not None:
        # The wall-clock cost, which also holds what the hook's own timing cannot see (a background update
        # slowing the next forward and backward): blocks of steps with the probe on and blocks with its
        # hooks bypassed, alternating in this process; the first step of each block is left out (it may
        # overlap the previous block's last background update).
        active = [True]
        real_before, real_after = probe._before_step, probe._after_step
        probe._before_step = lambda grads=None: real_before(grads) if active[0] else None
        probe._after_step = lambda: real_after() if active[0] else None
        totals: dict[bool, list[float]] = {True: [], False: []}
        for block in range(2 * args.wall_blocks):
            active[0] = block % 2 == 1
            for k in range(3):
                a, b = step()
                if k:
                    totals[active[0]].append(a + b)
        probe._pseudo.wait()
        res["wall_on_s"] = statistics.median(totals[True])
        res["wall_off_s"] = statistics.median(totals[False])
    if probe is not None:
        pu = probe._pseudo
        if pu is None:
            res["error"] = probe.disabled
        else:
            res["state_bytes"] = pu.state_bytes()
            res["scratch_bytes"] = pu._workspace.nbytes() + (
                pu._spare.numel() * pu._spare.element_size() if pu._spare is not None else 0
            )
            res["n_recipes"] = len(pu.names)
        probe.close()
    if cuda:
        res["cuda_peak"] = torch.cuda.max_memory_allocated()
    return res


# ------------------------------------------------------------------------------------------ parent
def run_child(name: str, args, measure: bool = False) -> dict:
    cmd = [sys.executable, str(HERE), "--child", name, "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--wall-blocks", str(args.wall_blocks),
           "--batch", str(args.batch), "--context", str(args.context), "--threads", str(args.threads),
           "--device", args.device]
    if args.small:
        cmd.append("--small")
    if measure:
        cmd += ["--measure-child", "--measure-dtype", args.measure_dtype, "--measure-chunk", str(args.measure_chunk)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    limit = args.max_rss_gib * 2**30
    t0 = time.time()
    peak_seen = 0
    while proc.poll() is None:
        rss = current_rss_bytes(proc.pid)
        peak_seen = max(peak_seen, rss)
        if rss > limit or time.time() - t0 > args.timeout:
            proc.kill()
            proc.wait()
            why = f"RSS {rss / 2**30:.1f} GiB > {args.max_rss_gib} GiB" if rss > limit else f"over {args.timeout} s"
            return {"config": name, "killed": why, "peak_seen": peak_seen, "seconds": time.time() - t0}
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"config": name, "failed": (stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(lines[-1])


def gib(b: float) -> str:
    return f"{b / 2**30:6.2f} GiB"


def print_table(results: dict, gpu: bool = False) -> dict:
    """The figures of every configuration; returns the plain run's result (the baseline)."""
    base = results.get("plain", {})
    pb = next((r["param_bytes"] for r in results.values() if "param_bytes" in r), None)
    if not pb:
        print("no configuration finished")
        return base
    n = next(r["n_params"] for r in results.values() if "n_params" in r)
    print(f"\nparameters: {n:,} ({pb / 2**20:.0f} MiB float32)")
    print(f"\n{'configuration':<24} {'peak RSS':>10} {'extra':>8} {'target':>8} {'states':>7} {'scratch':>8} "
          f"{'step':>8} {'tracking':>9} {'fraction':>9} {'observe':>8} {'wall':>7}" + (f" {'GPU peak':>10} {'GPU extra':>9}" if gpu else ""))
    for name, r in results.items():
        if "peak_rss" not in r:
            print(f"{name:<24} {r.get('killed') or r.get('failed')}")
            continue
        probed = "peak_rss" in base and name != "plain"
        extra = (r["peak_rss"] - base["peak_rss"]) / pb if probed else None
        states = r.get("state_bytes", 0) / pb
        target = states + 3  # state_bytes() is already halved with bfloat16 storage
        blank = ""
        cells = [
            f"{name:<24}", f"{gib(r['peak_rss']):>10}",
            f"{extra:7.2f}x" if probed else f"{blank:>8}",
            f"{target:7.2f}x" if probed else f"{blank:>8}",
            f"{states:6.2f}x" if probed else f"{blank:>7}",
            f"{r.get('scratch_bytes', 0) / pb:7.2f}x" if probed else f"{blank:>8}",
            f"{r['train_s'] * 1e3:6.0f}ms",
            f"{r['tracking_s'] * 1e3:7.0f}ms" if probed else f"{blank:>9}",
            f"{r['tracking_s'] / r['train_s']:8.1%}" if probed else f"{blank:>9}",
            f"{r['observe_s'] / r['train_s']:7.1%}" if probed else f"{blank:>8}",
            f"{r['wall_on_s'] / r['wall_off_s'] - 1:6.1%}" if probed and "wall_on_s" in r else f"{blank:>7}",
        ]
        if gpu:
            cells.append(f"{gib(r.get('cuda_peak', 0)):>10}")
            g_extra = (r.get("cuda_peak", 0) - base.get("cuda_peak", 0)) / pb if probed else None
            cells.append(f"{g_extra:8.2f}x" if g_extra is not None else f"{blank:>9}")
        print(" ".join(cells))
    print("\n  extra: (peak RSS − plain peak RSS) / parameter bytes. target: distinct recipe states + 3 (the states")
    print("  column is state_bytes(); with bfloat16 storage it is already half the float32 states). scratch: the")
    print("  probe's reused temporaries (the spare gradient buffer + workspace). tracking: the Probe's time inside")
    print("  each optimizer step (gradient norm + every recipe's update), median over the timed steps; fraction:")
    print("  tracking / (step without tracking), target <= 5%. observe: PseudoUpdates.observe alone / step (the")
    print("  rest of the tracking is the Probe's float64 gradient norm and its step row). wall: the whole step with")
    print("  the probe on / with its hooks bypassed − 1, medians over alternating blocks of steps in one process")
    print("  (what a background update costs the training it overlaps is in it; the hook's own timing cannot see")
    print("  that). target <= 5%." + (" GPU columns: torch.cuda.max_memory_allocated." if gpu else ""))
    return base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed training steps per configuration")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--wall-blocks", type=int, default=3, help="blocks of 3 steps per mode for the wall-clock overhead")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--small", action="store_true", help="GPT-2 with n_embd 64, 2 layers (a quick try)")
    ap.add_argument("--configs", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    ap.add_argument("--measure", action="store_true", help="also run one full Probe measurement (watched for memory)")
    ap.add_argument("--max-rss-gib", type=float, default=16.0, help="kill a configuration above this RSS")
    ap.add_argument("--timeout", type=float, default=900.0, help="kill a configuration after this many seconds")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--measure-child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--measure-dtype", default="bfloat16", choices=["float32", "bfloat16"],
                    help="recipe-state dtype of the --measure run")
    ap.add_argument("--measure-chunk", type=int, default=1, help="MeasureSettings.chunk of the --measure run")
    args = ap.parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: CUDA is not available in this process (no GPU, or a CPU-only torch)")

    import torch

    names = args.configs or DEFAULT
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        sys.exit(f"unknown configurations {unknown}; choose from {list(CONFIGS)}")
    print(f"GPT-2 {'(n_embd 64, 2 layers)' if args.small else 'small'} from its config, AdamW, batch "
          f"{args.batch}x{args.context} random tokens, device {args.device}, {args.threads} thread(s), torch "
          f"{torch.__version__}; each configuration in a fresh process, {args.warmup} warm-up + {args.steps} timed steps",
          flush=True)
    results = {}
    for name in names:
        t = time.time()
        results[name] = r = run_child(name, args)
        status = r.get("killed") or r.get("failed") or r.get("error") or "ok"
        print(f"  ran {name:<24} in {time.time() - t:6.1f} s: {status}", flush=True)
    base = print_table(results, gpu=args.device.startswith("cuda"))
    if args.measure:
        print(f"\none full measurement (all recipes, {args.measure_dtype} states, MeasureSettings(chunk="
              f"{args.measure_chunk})), its own process:", flush=True)
        r = run_child("probe fp32", args, measure=True)
        pb = next((x["param_bytes"] for x in results.values() if "param_bytes" in x), 1)
        if "killed" in r:
            print(f"  did not finish: killed ({r['killed']}) after {r['seconds']:.0f} s; highest RSS seen "
                  f"{gib(r['peak_seen'])}")
        elif "failed" in r:
            print(f"  failed: {r['failed']}")
        else:
            extra = (r["peak_rss"] - base["peak_rss"]) / pb if "peak_rss" in base else float("nan")
            print(f"  peak RSS {gib(r['peak_rss'])} ({extra:.2f}x parameter bytes above plain training); "
                  f"{r['measure_s']:.1f} s = {r['measure_s'] / r['step_s']:.1f} training steps"
                  + (f"; error: {r['error']}" if r.get("error") else ""))
            if "passes" in r:
                phases = ", ".join(f"{k} {v:.1f}" for k, v in r["phases"].items() if v)
                print(f"  {r['directions']} directions in {r['passes']:.1f} forward+backward passes of the probe batch "
                      f"(target <= 60): {phases}")


if __name__ == "__main__":
    main()
