"""PseudoUpdates: seed 000's identities, shared state and its memory, refusal of bad gradients,
reduced-precision storage, checkpointing."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import landscape.optim as lo
from landscape.optim._core import stochastic_round_to_bf16_

SHAPES = {"emb": (40, 8), "w": (8, 8), "conv": (2, 3, 4), "b": (8,)}


def make_params(dtype=torch.float32):
    return {n: torch.zeros(s, dtype=dtype) for n, s in SHAPES.items()}


def grads(step, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(step)
    return {n: (torch.randn(s, generator=gen, dtype=torch.float64) * scale).to(dtype) for n, s in SHAPES.items()}


def numel(shape):
    return math.prod(shape)


# --- seed 000 and seed 001 identities ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype, rtol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
def test_adam_valueclip_tiny_alpha_is_smoothed_signsgd_over_bias_correction(dtype, rtol):
    """Seed 000: with ε = 0 and α below every |g_i|, Adam on clip_[−α,α](g) has m = α·M^sssgd and
    v = α²(1 − β2ᵗ), so U_t = M_t^sssgd/(1 − β1ᵗ)."""
    beta1 = 0.9
    pu = lo.PseudoUpdates(
        make_params(dtype),
        {"vc": lo.recipe("adam_valueclip", eps=0.0, alpha=1e-8, beta1=beta1), "ss": lo.recipe("smoothed_signsgd", beta=beta1)},
    )
    for t in range(1, 9):
        g = grads(t, dtype)
        assert min(float(v.abs().min()) for v in g.values()) > 1e-8
        pu.observe(g)
        d = pu.directions()
        for n in SHAPES:
            expected = d["ss"][n] / (1 - beta1**t)
            assert torch.allclose(d["vc"][n], expected, rtol=rtol, atol=0), (t, n)


def test_adam_normclip_tiny_alpha_tracks_smoothed_normsgd_direction():
    """Seed 000: with aggressive norm clipping, U_t = M_t^snsgd / ((1−β1ᵗ) S_t); with gradients of
    constant coordinate-wise scale (isotropic), S_t ≈ const and the directions align."""
    pu = lo.PseudoUpdates(make_params(torch.float64), {"nc": lo.recipe("adam_normclip", alpha=1e-6, eps=0.0), "sn": "smoothed_normsgd"})
    for t in range(1, 30):
        pu.observe(grads(t, torch.float64))
    d = pu.directions()
    a = torch.cat([v.reshape(-1) for v in d["nc"].values()])
    b = torch.cat([v.reshape(-1) for v in d["sn"].values()])
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.9


def test_gensignsgd_beta2_zero_is_signsgd_with_momentum():
    """Seed 001 §4: Algorithm 1 with β2 = 0 recovers SignSGD with momentum (Signum)."""
    pu = lo.PseudoUpdates(make_params(), {"gen0": lo.recipe("gensignsgd", beta2=0.0), "sign": "signsgd"})
    for t in range(1, 6):
        g = grads(t)
        g["b"][:3] = 0.0  # zeros: sign(0) = 0 on both sides
        pu.observe(g)
        d = pu.directions()
        for n in SHAPES:
            assert torch.equal(d["gen0"][n], d["sign"][n]), n
    assert pu.state_report()[0]["used_by"] == ["gen0", "sign"]  # one shared momentum


# --- shared state and memory ----------------------------------------------------------------------------


def test_state_bytes_is_the_sum_over_distinct_states():
    """Counted by hand for the default set: full-size states are the EMAs of g (β=0.9, 0.99), of
    clip_10%(g), clip_50%(g), sign(g), g/‖g‖, clip_value(g), clip_norm(g) (β=0.9), of g², clip_value(g)²,
    clip_norm(g)² (β2=0.999), of m² (gensignsgd's v), and the last gradient (read by Adafactor's and
    Lion's directions): 13. Adafactor adds row+column factors for tensors with ≥ 2 dims and a full
    V for vectors."""
    params = make_params()
    pu = lo.PseudoUpdates(params)
    n_params = sum(numel(s) for s in SHAPES.values())
    factored = 0
    for s in SHAPES.values():
        factored += numel(s[:-1]) + numel(s[:-2]) * s[-1] if len(s) >= 2 else numel(s)
    expected = (13 * n_params + factored) * 4
    assert pu.state_bytes() == expected
    report = pu.state_report()
    assert len(report) == 14
    assert sum(r["bytes"] for r in report) == expected
    # one buffer per recipe state would repeat every shared state for each of its users
    naive = sum(r["bytes"] * len(r["used_by"]) for r in report)
    assert naive > 1.5 * expected
    by_key = {r["key"]: r["used_by"] for r in report}
    assert by_key["ema(beta=0.9)[g]"] == ["sgd", "normsgd", "signsgd", "adam", "adam_clip_update", "gensignsgd"]
    assert by_key["ema_sq(beta=0.999)[g]"] == ["adam", "adam_clip", "adam_clip_update"]
    # the memory is really allocated once: distinct storage for every state leaf
    ptrs = [v.data_ptr() for t in pu._moments.values() for v in t.values()]
    assert len(set(ptrs)) == len(ptrs)
    pu.observe(grads(1))
    assert pu.state_bytes() == expected  # the kept gradient is swapped, not accumulated


def test_subset_keeps_only_what_it_needs():
    pu = lo.PseudoUpdates(make_params(), ["sgd", "signsgd", "normsgd"])
    assert pu.state_bytes() == sum(numel(s) for s in SHAPES.values()) * 4  # one momentum, no raw g


def test_shared_momentum_is_the_bias_uncorrected_adam_first_moment():
    pu = lo.PseudoUpdates(make_params(torch.float64), ["sgd", "adam"])
    assert len(pu.state_report()) == 2  # m (shared) and v
    for t in range(1, 4):
        pu.observe(grads(t, torch.float64))
    m = pu.directions()["sgd"]
    v = pu._moments["ema_sq(beta=0.999)[g]"]
    for n in SHAPES:
        expected = (m[n] / (1 - 0.9**3)) / (torch.sqrt(v[n] / (1 - 0.999**3)) + 1e-8)
        assert torch.allclose(pu.directions()["adam"][n], expected, rtol=1e-12)


# --- inputs and refusal -------------------------------------------------------------------------------------


def test_directions_before_observe_raise():
    pu = lo.PseudoUpdates(make_params())
    with pytest.raises(RuntimeError, match=r"no gradients observed yet.*observe"):
        pu.directions()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_refused_and_nothing_changes(bad):
    pu = lo.PseudoUpdates(make_params())  # the default set: the kept last gradient must survive too
    pu.observe(grads(1))
    before = copy.deepcopy(pu.state_dict())
    dirs_before = pu.directions()
    g = grads(2)
    g["w"][3, 4] = bad
    g["conv"][0, 1, 2] = bad
    with pytest.raises(ValueError, match=r"non-finite.*\['w', 'conv'\]"):
        pu.observe(g)
    assert pu.step == 1
    after = pu.state_dict()
    for n, v in before["g"].items():
        assert torch.equal(after["g"][n], v), n
    for k, tree in before["moments"].items():
        for n, v in tree.items():
            assert torch.equal(after["moments"][k][n], v), (k, n)
    for k, tree in pu.directions().items():
        for n, v in tree.items():
            assert torch.equal(v, dirs_before[k][n])


def test_huge_finite_gradients_are_not_refused():
    """The fast finiteness check is a sum over the packed gradient; a sum that merely overflows is
    re-checked tensor by tensor and accepted."""
    pu = lo.PseudoUpdates({"a": torch.zeros(4), "b": torch.zeros(4)}, ["sgd"])
    pu.observe({"a": torch.full((4,), 3e38), "b": torch.full((4,), 3e38)})
    assert pu.step == 1


def test_missing_extra_and_misshapen_gradients():
    pu = lo.PseudoUpdates(make_params(), ["sgd"])
    g = grads(1)
    del g["b"]
    g["bias"] = torch.zeros(8)
    with pytest.raises(KeyError, match=r"missing \['b'\], unexpected \['bias'\]"):
        pu.observe(g)
    g = grads(1)
    g["w"] = torch.zeros(4, 4)
    with pytest.raises(ValueError, match=r"'w' has shape \(4, 4\), the parameter \(8, 8\)"):
        pu.observe(g)
    g = grads(1)
    g["w"] = None
    with pytest.raises(ValueError, match="None"):
        pu.observe(g)
    assert pu.step == 0


def test_named_parameters_input_and_frozen_parameters():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    pu = lo.PseudoUpdates(model.named_parameters(), ["adam"])
    assert "0.bias" not in pu.params and "0.weight" in pu.params
    model(torch.randn(5, 3)).sum().backward()
    pu.observe({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert set(pu.directions()["adam"]) == {"0.weight", "1.weight", "1.bias"}


def test_constructor_validation():
    with pytest.raises(KeyError, match="valid recipes"):
        lo.PseudoUpdates(make_params(), ["nope"])
    with pytest.raises(TypeError, match="single string"):
        lo.PseudoUpdates(make_params(), "sgd")
    with pytest.raises(ValueError, match="state_dtype"):
        lo.PseudoUpdates(make_params(), state_dtype=torch.int8)
    with pytest.raises(ValueError, match="rounding"):
        lo.PseudoUpdates(make_params(), rounding="up")


def test_observe_does_not_touch_grads_and_directions_are_fresh():
    pu = lo.PseudoUpdates(make_params())
    g = grads(1)
    g0 = {k: v.clone() for k, v in g.items()}
    pu.observe(g)
    assert all(torch.equal(g[k], g0[k]) for k in g)
    d1 = pu.directions()
    snapshot = {k: {n: v.clone() for n, v in t.items()} for k, t in d1.items()}
    d1["sgd"]["w"].add_(100.0)  # a caller mutating a direction must not corrupt the state
    pu.observe(grads(2))
    for k, t in d1.items():
        for n, v in t.items():
            if (k, n) != ("sgd", "w"):
                assert torch.equal(v, snapshot[k][n]), (k, n)
    ref = lo.PseudoUpdates(make_params())
    ref.observe(grads(1))
    ref.observe(grads(2))
    assert torch.equal(pu.directions()["sgd"]["w"], ref.directions()["sgd"]["w"])


# --- reduced precision ----------------------------------------------------------------------------------------


def test_bfloat16_storage_halves_memory_and_stays_close():
    full = lo.PseudoUpdates(make_params())
    half = lo.PseudoUpdates(make_params(), state_dtype=torch.bfloat16)
    assert half.state_bytes() * 2 == full.state_bytes()
    assert all(v.dtype == torch.bfloat16 for t in half._moments.values() for v in t.values())
    for t in range(1, 21):
        g = grads(t)
        full.observe(g)
        half.observe(g)
    df, dh = full.directions(), half.directions()
    for name in full.names:
        a = torch.cat([v.reshape(-1) for v in df[name].values()])
        b = torch.cat([v.reshape(-1) for v in dh[name].values()])
        assert b.dtype == torch.float32
        cos = float(torch.nn.functional.cosine_similarity(a, b, dim=0))
        assert cos > 0.98, f"{name}: cosine {cos:.4f}"


def test_stochastic_rounding_is_unbiased():
    x = torch.full((200_000,), 1.0 + 2.0**-10)  # a quarter of the way between two bf16 neighbours
    out = torch.empty_like(x, dtype=torch.bfloat16)
    stochastic_round_to_bf16_(out, x, torch.Generator().manual_seed(0))
    vals = set(out.float().unique().tolist())
    assert vals == {1.0, 1.0 + 2.0**-7}
    assert abs(float(out.double().mean()) - float(x[0])) < 2e-5
    neg = torch.empty_like(out)
    stochastic_round_to_bf16_(neg, -x, torch.Generator().manual_seed(0))
    assert torch.equal(neg, -out)


def test_bfloat16_ema_at_beta2_0999_needs_stochastic_rounding():
    """v ← 0.999 v + 0.001 g² moves v by 0.1% per step, below half a bfloat16 ulp (0.2–0.4%) once v is
    near its target: round-to-nearest freezes it far too low, stochastic rounding tracks it."""
    params = {"x": torch.zeros(2000)}
    g = {"x": torch.full((2000,), 0.5)}  # g² = 0.25
    exact = 0.25 * (1 - 0.999**1500)
    results = {}
    for rounding in ("nearest", "stochastic"):
        pu = lo.PseudoUpdates(params, ["adam"], state_dtype=torch.bfloat16, rounding=rounding)
        for _ in range(1500):
            pu.observe(g)
        results[rounding] = float(pu._moments["ema_sq(beta=0.999)[g]"]["x"].float().mean())
    assert abs(results["stochastic"] - exact) < 0.01 * exact
    assert results["nearest"] < 0.6 * exact


# --- checkpointing ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("state_dtype", [None, torch.bfloat16])
def test_state_dict_resume_is_exact(state_dtype, tmp_path):
    a = lo.PseudoUpdates(make_params(), state_dtype=state_dtype)
    for t in range(1, 4):
        a.observe(grads(t))
    torch.save(a.state_dict(), tmp_path / "pu.pt")
    b = lo.PseudoUpdates(make_params(), state_dtype=state_dtype)
    b.load_state_dict(torch.load(tmp_path / "pu.pt", weights_only=True))
    assert b.step == 3
    for t in range(4, 7):
        a.observe(grads(t))
        b.observe(grads(t))
    da, db = a.directions(), b.directions()
    for k in da:
        for n in da[k]:
            assert torch.equal(da[k][n], db[k][n]), (k, n)


def test_load_state_dict_refuses_other_recipes():
    a = lo.PseudoUpdates(make_params(), ["sgd", "adam"])
    b = lo.PseudoUpdates(make_params(), ["sgd", "lion"])
    with pytest.raises(ValueError, match="does not match these recipes"):
        b.load_state_dict(a.state_dict())
