"""Cost of tracking every recipe's pseudo-update on a real run, in time and memory.

On the demo's causal LM (2 layers, width 128, 4 heads, character vocabulary of KJV text) at a batch of
16 × 128 = 2,048 tokens, prints (measures, does not assert):

* the time of ``PseudoUpdates.observe`` for the full default set (17 recipes), relative to one training
  step (forward + backward + ``torch.optim.Adam`` step), medians of interleaved repeats; the same for
  bfloat16 state storage;
* state memory as a multiple of parameter memory: one buffer per recipe state (no sharing), the
  distinct states actually stored, and the bfloat16 variant;
* the effect of bfloat16 storage on the measured directional sharpness of every recipe after a short
  Adam run (or, if ``landscape.directional_sharpness`` is missing, on the directions themselves).

    python benchmarks/tracker_overhead.py [--repeats 15] [--steps 40] [--no-sharpness]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from landscape.data import CharCorpus, kjv_text
from landscape.models import TinyCausalLM, lm_loss
from landscape.optim import PseudoUpdates


def setup(seed: int = 0, batch: int = 16, context: int = 128):
    torch.manual_seed(seed)
    corpus = CharCorpus(kjv_text()[:400_000])
    model = TinyCausalLM(corpus.vocab, width=128, depth=2, heads=4, context=context)
    gen = torch.Generator().manual_seed(seed)
    return corpus, model, gen, (batch, context)


def flat(tree):
    return torch.cat([v.reshape(-1).double() for v in tree.values()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=40, help="training steps before the sharpness comparison")
    ap.add_argument("--no-sharpness", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    corpus, model, gen, (batch, context) = setup()
    data = corpus.batch(batch, context, gen)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    named = dict(model.named_parameters())
    n_params = sum(p.numel() for p in named.values())
    param_bytes = sum(p.numel() * p.element_size() for p in named.values())
    print(f"model: TinyCausalLM width 128, depth 2, vocab {corpus.vocab}: {n_params:,} parameters "
          f"in {len(named)} tensors; batch {batch}x{context} = {batch * context:,} tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = lm_loss(model, data)
        loss.backward()
        opt.step()
        return loss

    pu32 = PseudoUpdates(model.named_parameters())
    pu16 = PseudoUpdates(model.named_parameters(), state_dtype=torch.bfloat16)
    for _ in range(3):  # warm-up
        train_step()
        grads = {n: p.grad for n, p in named.items()}
        pu32.observe(grads)
        pu16.observe(grads)

    t_train, t_obs32, t_obs16 = [], [], []
    for _ in range(args.repeats):  # interleaved so that machine noise hits all three alike
        t = time.perf_counter()
        train_step()
        t_train.append(time.perf_counter() - t)
        grads = {n: p.grad for n, p in named.items()}
        t = time.perf_counter()
        pu32.observe(grads)
        t_obs32.append(time.perf_counter() - t)
        t = time.perf_counter()
        pu16.observe(grads)
        t_obs16.append(time.perf_counter() - t)
    med = statistics.median
    tr, o32, o16 = med(t_train), med(t_obs32), med(t_obs16)
    print(f"\ntime, median (and minimum) of {args.repeats} interleaved repeats:")
    print(f"  training step (forward+backward+Adam)    {tr * 1e3:7.1f} ms ({min(t_train) * 1e3:6.1f})")
    print(f"  observe, {len(pu32.names)} recipes, float32 states   {o32 * 1e3:7.1f} ms ({min(t_obs32) * 1e3:6.1f})"
          f"  = {o32 / tr:6.1%} of a step ({min(t_obs32) / min(t_train):.1%})   target <= 5%")
    print(f"  observe, {len(pu16.names)} recipes, bfloat16 states  {o16 * 1e3:7.1f} ms ({min(t_obs16) * 1e3:6.1f})"
          f"  = {o16 / tr:6.1%} of a step ({min(t_obs16) / min(t_train):.1%})")
    t = time.perf_counter()
    pu32.directions()
    print(f"  directions() for all recipes (once per measurement, not per step) {(time.perf_counter() - t) * 1e3:.1f} ms")

    report = pu32.state_report()
    distinct = pu32.state_bytes()
    naive = sum(r["bytes"] * len(r["used_by"]) for r in report)
    naive_no_g = sum(r["bytes"] * len(r["used_by"]) for r in report if not r["key"].startswith("g "))
    full_size = [r for r in report if r["bytes"] == param_bytes]
    print(f"\nstate memory (parameters: {param_bytes / 2**20:.2f} MiB float32):")
    print(f"  one buffer per recipe state (no sharing)         {naive_no_g / param_bytes:6.2f} x parameters"
          f"   (+ a last-gradient copy for each of the {len(next(r for r in report if r['key'].startswith('g '))['used_by'])} "
          f"recipes that read it: {naive / param_bytes:.2f} x)")
    print(f"  distinct states, stored once (state_bytes)        {distinct / param_bytes:6.2f} x parameters"
          f"   ({len(full_size)} full-size buffers + Adafactor's factors)")
    print(f"  distinct states, bfloat16 storage                 {pu16.state_bytes() / param_bytes:6.2f} x parameters")
    print("  the distinct states and the recipes that read them:")
    for r in report:
        print(f"    {r['bytes'] / param_bytes:5.2f} x  {r['key']:<64} {', '.join(r['used_by'])}")

    # --- effect of bfloat16 storage on what is measured --------------------------------------------------
    for _ in range(args.steps):
        data = corpus.batch(batch, context, gen)
        train_step()
        grads = {n: p.grad for n, p in named.items()}
        pu32.observe(grads)
        pu16.observe(grads)
    d32, d16 = pu32.directions(), pu16.directions()
    print(f"\nbfloat16 vs float32 states after {pu32.step} observed steps of an Adam run:")
    import landscape

    if args.no_sharpness or not hasattr(landscape, "directional_sharpness"):
        print(f"  {'recipe':<18} {'max |Δu|/max|u|':>16} {'cosine':>10}")
        for name in pu32.names:
            a, b = flat(d32[name]), flat(d16[name])
            rel = float((a - b).abs().max() / a.abs().max())
            cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
            print(f"  {name:<18} {rel:16.3g} {cos:10.6f}")
        return

    probe = corpus.batch(batch, context, torch.Generator().manual_seed(123), split="probe")
    obj = landscape.Objective(model, lm_loss, probe)
    t = time.perf_counter()
    s32 = landscape.directional_sharpness(obj, d32, shift="never")
    s16 = landscape.directional_sharpness(obj, d16, shift="never")
    elapsed = time.perf_counter() - t
    print(f"  directional sharpness on a fixed probe batch of {batch * context:,} tokens ({elapsed:.1f} s):")
    print(f"  {'recipe':<18} {'S float32':>12} {'S bfloat16':>12} {'rel. diff':>10} {'ratio to sgd f32/bf16':>22} {'cos(u)':>9}")
    worst = 0.0
    for name in pu32.names:
        a, b = s32[name].value, s16[name].value
        rel = abs(b - a) / abs(a)
        worst = max(worst, rel)
        r32, r16 = a / s32["sgd"].value, b / s16["sgd"].value
        cos = float(torch.nn.functional.cosine_similarity(flat(d32[name]), flat(d16[name]), dim=0))
        print(f"  {name:<18} {a:12.5g} {b:12.5g} {rel:10.2%} {r32:11.4g}/{r16:<10.4g} {cos:9.6f}")
    print(f"  largest relative change of a sharpness: {worst:.2%}")


if __name__ == "__main__":
    main()
