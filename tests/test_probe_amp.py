"""Mixed-precision training: bf16 autocast with a ``torch.amp.GradScaler`` (the CPU scaler here; the
CUDA one behaves the same). The probe must see the *unscaled* gradients, and a step the scaler skips
(non-finite gradients: ``optimizer.step()`` is never called) must stay skipped for the probe too."""

from __future__ import annotations

import math

import pytest
import torch

from landscape.measure import MeasureSettings
from landscape.models import TinyCausalLM, lm_loss
from landscape.probe import Probe
from landscape.store import load_run

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=10, coord_per_layer=4)
VOCAB, CTX = 13, 8
SCALE = 2.0**12  # a power of two: unscaling is exact, and scaled gradients would be 4096x too large


def _scaler():
    try:
        return torch.amp.GradScaler("cpu", init_scale=SCALE, growth_interval=1000)
    except Exception as e:  # pragma: no cover - older torch without a CPU scaler
        pytest.skip(f"torch.amp.GradScaler('cpu') unavailable: {e}")


def _reference(grads: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, torch.Tensor]]:
    """sgd (EMA of g at 0.9) and adam (Kingma & Ba with bias correction) in float64, written out."""
    m = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in grads[0].items()}
    v = {n: torch.zeros_like(g, dtype=torch.float64) for n, g in grads[0].items()}
    for g in grads:
        for n in m:
            m[n] = 0.9 * m[n] + 0.1 * g[n].double()
            v[n] = 0.999 * v[n] + 0.001 * g[n].double() ** 2
    t = len(grads)
    adam = {n: (m[n] / (1 - 0.9**t)) / ((v[n] / (1 - 0.999**t)).sqrt() + 1e-8) for n in m}
    return {"sgd": m, "adam": adam}


@pytest.mark.parametrize("explicit_unscale", [False, True], ids=["scaler.step-unscales", "unscale_-first"])
def test_probe_sees_unscaled_gradients_and_skipped_steps_stay_skipped(tmp_path, explicit_unscale):
    torch.manual_seed(0)
    model = TinyCausalLM(VOCAB, width=16, depth=1, heads=2, context=CTX)
    gen = torch.Generator().manual_seed(0)
    pb = (torch.randint(0, VOCAB, (4, CTX), generator=gen), torch.randint(0, VOCAB, (4, CTX), generator=gen))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scaler = _scaler()
    names = [n for n, _ in model.named_parameters()]
    seen: list[dict[str, torch.Tensor]] = []  # the unscaled gradients of the steps actually taken
    skip_at = {3, 5}
    with Probe(model, lm_loss, pb, out=tmp_path / "run", every=100, recipes=["sgd", "adam"], settings=FAST) as probe:
        probe.attach(opt)
        for i in range(1, 8):
            x = torch.randint(0, VOCAB, (4, CTX), generator=gen)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(model, (x, torch.roll(x, -1, 1)))
            if i in skip_at:
                loss = loss * math.inf  # an overflow: the scaler must skip this step
            scaler.scale(loss).backward()
            if explicit_unscale:
                scaler.unscale_(opt)
                grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
            else:  # what unscaling means: the scaled gradient divided by the scale (exact for 2^k)
                s = scaler.get_scale()
                grads = {n: p.grad.detach().double() / s for n, p in model.named_parameters()}
            finite = all(bool(torch.isfinite(g).all()) for g in grads.values())
            assert finite == (i not in skip_at)
            if finite:
                seen.append(grads)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        assert probe.step == 7 - len(skip_at) == len(seen)
        assert opt.state[next(iter(model.parameters()))]["step"] == probe.step
        dirs = probe._pseudo.directions()
    ref = _reference(seen)
    for recipe in ("sgd", "adam"):
        for n in names:
            torch.testing.assert_close(dirs[recipe][n].double(), ref[recipe][n], rtol=2e-5, atol=1e-7, msg=f"{recipe} {n}")
    # scaled gradients would make sgd's direction SCALE times larger: the test can tell them apart
    total = sum(float(ref["sgd"][n].abs().sum()) for n in names)
    assert total > 0
    run = load_run(tmp_path / "run")
    rows = run.rows("steps")
    assert [r["step"] for r in rows] == list(range(1, 8 - len(skip_at)))
    assert all(r["status"] == "ok" for r in rows)
    # the recorded gradient norm is that of the unscaled gradient of the first step
    g1 = math.sqrt(sum(float(seen[0][n].double().square().sum()) for n in names))
    assert rows[0]["grad_norm"] == pytest.approx(g1, rel=1e-5)
    assert run.steps() == [1]
