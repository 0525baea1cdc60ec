"""The second-order Taylor sweep (landscape.taylor) against double-backward Hessian-vector products.

Every operator rule is exercised by a small float64 loss and compared, for ∇f·v and vᵀ∇²f·v, with
``method="hvp"`` (torch's own double backward, itself checked against dense Hessians and finite
differences in test_curvature.py). ``method="taylor"`` raises when a rule is missing, so each case
also proves the sweep ran."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import tree
from landscape.curvature import sharpness_and_gradient
from landscape.taylor import RULES, UnsupportedGraph

D = torch.float64


class Fn(nn.Module):
    """A loss ``fn(params, batch)`` with float64 parameters of the given shapes."""

    def __init__(self, fn, shapes, seed=0, positive=False):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.ps = nn.ParameterList()
        for shape in shapes:
            t = torch.randn(shape, generator=gen, dtype=D)
            self.ps.append(nn.Parameter(t.abs() + 0.5 if positive else t))
        self.fn = fn

    def forward(self, batch):
        return self.fn(list(self.ps), batch)


def call(model, batch):
    return model(batch)


def both(obj, n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    vs = [tree.randn_like(obj.params(), gen) for _ in range(n)]
    lt, g1, s1, used = obj.directional_derivatives(vs, method="taylor")
    assert used == "taylor"
    lh, g2, s2, used = obj.directional_derivatives(vs, method="hvp")
    assert used == "hvp"
    return (lt, g1, s1), (lh, g2, s2)


def check(obj, rtol=1e-9, n=3):
    (lt, g1, s1), (lh, g2, s2) = both(obj, n)
    assert lt == pytest.approx(lh, rel=1e-12, abs=1e-14)
    scale_g = max(abs(x) for x in g2) + 1e-300
    scale_s = max(abs(x) for x in s2) + 1e-300
    for a, b in zip(g1, g2):
        assert a == pytest.approx(b, rel=rtol, abs=rtol * scale_g)
    for a, b in zip(s1, s2):
        assert a == pytest.approx(b, rel=rtol, abs=rtol * scale_s)
    assert any(abs(x) > 0 for x in s2), "the case must have curvature to test anything"


X = torch.randn(5, 4, generator=torch.Generator().manual_seed(11), dtype=D)
W = torch.randn(4, 3, generator=torch.Generator().manual_seed(12), dtype=D)

def _inplace_on_views(p, x):
    # Writes into views of fresh tensors (as T5's label shifting does): the base must see them.
    w = torch.ones(5, dtype=D)
    w[1:3] = 2.0
    h = x @ p[0]
    return ((h.sum(1) * w) ** 2).sum() + (torch.tanh(torch.mm(x, p[1]).unsqueeze_(0)) ** 2).sum()


def test_inplace_write_into_a_swept_view_falls_back():
    def fn(p, x):
        h = (x @ p[0]).clone()
        h[:, 0] *= 3.0  # mutates h through a view: no rule, so HVPs
        return (torch.tanh(h) ** 2).sum()

    model = Fn(fn, [(4, 3)])
    obj = ls.Objective(model, call, X)
    assert "copy_" in obj.taylor_support() or "mul_" in obj.taylor_support()
    g = obj.grad()
    _, g1, s1, used = obj.directional_derivatives([g])
    _, g2, s2, _ = obj.directional_derivatives([g], method="hvp")
    assert used == "hvp" and s1 == s2 and g1 == g2


UNARY = {
    "exp": lambda z: torch.exp(z),
    "expm1": lambda z: torch.expm1(z),
    "log": lambda z: torch.log(z * z + 0.5),
    "log1p": lambda z: torch.log1p(z * z),
    "sqrt": lambda z: torch.sqrt(z * z + 1),
    "rsqrt": lambda z: torch.rsqrt(z * z + 1),
    "reciprocal": lambda z: torch.reciprocal(z * z + 1),
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "sin": torch.sin,
    "cos": torch.cos,
    "erf": torch.erf,
    "relu": lambda z: F.relu(z) ** 2,
    "abs": lambda z: torch.abs(z) * z,
    "softplus": F.softplus,
    "softplus_beta": lambda z: F.softplus(3 * z, beta=2.0, threshold=1.0),
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "pow3": lambda z: z**3,
    "pow_half": lambda z: (z * z + 1) ** 0.5,
    "square": lambda z: torch.square(z),
    "leaky_relu": lambda z: F.leaky_relu(z, 0.1) * z,
    "clamp": lambda z: torch.clamp(z, -0.5, 0.7) * z,
    "clamp_min": lambda z: torch.clamp_min(z, 0.1) * z,
    "hardtanh": lambda z: F.hardtanh(z) * z,
}


@pytest.mark.parametrize("name", sorted(UNARY))
def test_elementwise_rules(name):
    f = UNARY[name]
    model = Fn(lambda p, b: (f(b @ p[0] + p[1]) * torch.linspace(0.5, 1.5, 3, dtype=D)).sum(), [(4, 3), (3,)])
    check(ls.Objective(model, call, X))


STRUCTURAL = {
    "softmax": lambda p, x: (torch.softmax(x @ p[0], -1) * W[:3].T[:, :3].sum(0)).sum(),
    "softmax_dim0": lambda p, x: (torch.softmax(x @ p[0], 0) ** 2).sum(),
    "log_softmax": lambda p, x: (F.log_softmax(x @ p[0], -1) * torch.arange(3, dtype=D)).sum(),
    "logsumexp": lambda p, x: torch.logsumexp(x @ p[0], dim=1).pow(2).sum(),
    "logsumexp_keep": lambda p, x: torch.logsumexp(x @ p[0], dim=(0, 1), keepdim=True).sum() ** 2,
    "amax": lambda p, x: (torch.amax(x @ p[0], dim=1) ** 2).sum(),
    "max_dim": lambda p, x: (torch.max(x @ p[0], dim=0).values ** 2).sum(),
    "div_both": lambda p, x: ((x @ p[0]) / (torch.exp(x @ p[1]) + 1)).sum(),
    "div_const_num": lambda p, x: (2.0 / (torch.exp(x @ p[0]) + 1)).sum(),
    "div_tensor_den": lambda p, x: ((x @ p[0]) ** 2 / (x.abs() @ W + 1)).sum(),
    "where": lambda p, x: torch.where(x[:, :3] > 0, (x @ p[0]) ** 2, torch.sin(x @ p[1])).sum(),
    "masked_fill": lambda p, x: torch.softmax((x @ p[0]).masked_fill(x[:, :3] > 0.5, float("-inf")), -1)
    .mul(x[:, :3])
    .sum(),
    "pad": lambda p, x: (F.pad(x @ p[0], (1, 2), value=0.3) ** 2).sum(),
    "cat_stack": lambda p, x: (torch.cat([x @ p[0], x] , 1) ** 2).sum() + torch.stack([x @ p[0], x @ p[1]]).pow(3).sum(),
    "split_chunk_unbind": lambda p, x: sum((t**2).sum() * (i + 1) for i, t in enumerate(torch.split(x @ p[0], [1, 2], 1)))
    + sum((t**3).sum() for t in torch.chunk(x @ p[1], 3, 0))
    + sum((t.exp()).sum() for t in torch.unbind(x @ p[0], 1)),
    "indexing": lambda p, x: ((x @ p[0])[torch.tensor([0, 2, 2])] ** 2).sum()
    + (x @ p[1]).gather(1, torch.tensor([[0], [1], [2], [0], [1]])).pow(3).sum()
    + (x @ p[0]).index_select(0, torch.tensor([4, 1])).exp().sum()
    + (x @ p[0])[1:4, ::2].pow(2).sum(),
    "views": lambda p, x: ((x @ p[0]).T.reshape(-1).flip(0).roll(2) ** 3 * torch.arange(15, dtype=D)).sum()
    + torch.tril((x @ p[1])[:3]).pow(2).sum()
    + (x @ p[0]).repeat(2, 1).unsqueeze(0).squeeze(0).pow(2).mean()
    + (x @ p[0]).transpose(0, 1).contiguous().view(-1).pow(2).sum(),
    "embedding_padding_idx": lambda p, x: (torch.tanh(F.embedding(torch.tensor([[0, 1, 2], [1, 1, 3]]), p[0], padding_idx=1))
    ** 2).sum(),
    "inplace_on_views": lambda p, x: _inplace_on_views(p, x),
    "rsub_neg": lambda p, x: ((1 - x @ p[0]) ** 2).sum() + (-(x @ p[1])).exp().sum() + (3.0 - (x @ p[0])).pow(3).sum(),
    "mse": lambda p, x: F.mse_loss(x @ p[0], torch.tanh(x @ p[1])) + F.mse_loss(x @ p[0], x[:, :3], reduction="sum"),
    "cross_entropy": lambda p, x: F.cross_entropy(x @ p[0], torch.tensor([0, 1, 2, 1, 0]), label_smoothing=0.1),
    "matmul_variants": lambda p, x: (x @ p[0] @ p[1].T).pow(2).sum()
    + (p[0][:, 0] @ p[1][:, 1]) ** 2
    + (x @ p[0][:, 0]).pow(2).sum()
    + torch.addmm(p[1][0], x, p[0], beta=0.5, alpha=2.0).pow(2).sum()
    + torch.baddbmm(p[1][0].expand(2, 5, 3), x.expand(2, 5, 4), p[0].expand(2, 4, 3), alpha=0.7).pow(2).sum()
    + torch.einsum("ij,jk,ik->", x, p[0], x @ p[1]),
}


@pytest.mark.parametrize("name", sorted(STRUCTURAL))
def test_structural_rules(name):
    model = Fn(STRUCTURAL[name], [(4, 3), (4, 3)], seed=1)
    check(ls.Objective(model, call, X))


def test_layer_norm_rules():
    """LayerNorm (where nested forward-mode AD is wrong on torch 2.13): with and without affine
    parameters, fed first-order-only and second-order inputs."""

    def fn(p, x):
        h = x @ p[0]  # first-order input
        a = F.layer_norm(h, (3,), p[1], p[2])
        b = F.layer_norm(h * (x @ p[0]), (3,))  # second-order input, no affine
        c = F.layer_norm(torch.stack([h, h.exp()]), (5, 3))  # two normalised dims
        return (a * torch.arange(3, dtype=D)).pow(2).sum() + b.pow(3).sum() + (c * c.detach().sin()).sum()

    model = Fn(fn, [(4, 3), (3,), (3,)], seed=2)
    check(ls.Objective(model, call, X))


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv1d = nn.Conv1d(3, 2, 2)
        self.fc = nn.Linear(2 * 2, 4)

    def forward(self, x):
        h = torch.tanh(self.bn(self.conv(x)))
        h = F.max_pool2d(h, 2) + F.avg_pool2d(h, 2)
        h = F.adaptive_avg_pool2d(h, (3, 1)).squeeze(-1)
        h = F.softplus(self.conv1d(h))
        return self.fc(h.flatten(1))


def _convnet():
    torch.manual_seed(3)
    model = ConvNet().double()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(4, 2, 6, 6, dtype=D)
    y = torch.tensor([0, 1, 2, 3])
    return model, (x, y)


def ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def test_conv_batchnorm_pooling_rules():
    model, batch = _convnet()
    check(ls.Objective(model, ce, batch))


def test_buffers_are_read_at_every_call():
    """The traced graph takes buffers as inputs: a BatchNorm whose running statistics change between
    measurements gives the new value (not the one recorded at trace time)."""
    model, batch = _convnet()
    obj = ls.Objective(model, ce, batch)
    (_, _, before), _ = both(obj, n=1)
    with torch.no_grad():
        model.bn.running_var.mul_(3.0)
    (_, _, after), (_, _, ref) = both(obj, n=1)
    assert after[0] == pytest.approx(ref[0], rel=1e-9)
    assert after[0] != pytest.approx(before[0], rel=1e-3)


def test_causal_lm_float32_agrees_with_hvp():
    from landscape.models import TinyCausalLM, lm_loss

    torch.manual_seed(0)
    model = TinyCausalLM(vocab=13, width=16, depth=2, heads=2, context=8)
    batch = (torch.randint(0, 13, (4, 8)), torch.randint(0, 13, (4, 8)))
    obj = ls.Objective(model, lm_loss, batch)
    (_, g1, s1), (_, g2, s2) = both(obj, n=3)
    for a, b in zip(s1, s2):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-6)
    for a, b in zip(g1, g2):
        assert a == pytest.approx(b, rel=2e-4, abs=1e-7)


def test_micro_batches_and_include():
    model = Fn(lambda p, b: (torch.tanh(b @ p[0]) ** 2).mean() + p[1].pow(4).sum(), [(4, 3), (3,)], seed=4)
    whole = ls.Objective(model, call, X)
    parts = ls.Objective(model, call, ls.MicroBatches([X[:2], X[2:]]))
    gen = torch.Generator().manual_seed(0)
    vs = [tree.randn_like(whole.params(), gen) for _ in range(2)]
    a = whole.directional_derivatives(vs, method="taylor")
    b = parts.directional_derivatives(vs, method="taylor")
    assert a[0] == pytest.approx(b[0], rel=1e-12)
    for x, y in zip(a[1] + a[2], b[1] + b[2]):
        assert x == pytest.approx(y, rel=1e-10)
    only = ls.Objective(model, call, X, include=["ps.0"])
    check(only)


def test_module_left_untouched():
    model, batch = _convnet()
    model.train(True)
    model.fc.weight.requires_grad_(False)
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    obj = ls.Objective(model, ce, batch, mode="eval")
    ls.directional_sharpness(obj, {"g": obj.grad()}, method="taylor", shift="always")
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in model.modules()] == modes
    assert not model.fc.weight.requires_grad and model.conv.weight.requires_grad
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_unsupported_operator_falls_back_to_hvp():
    assert torch.ops.aten.atan.default not in RULES
    model = Fn(lambda p, b: torch.atan(b @ p[0]).pow(2).sum(), [(4, 3)])
    obj = ls.Objective(model, call, X)
    assert "atan" in obj.taylor_support()
    with pytest.raises(UnsupportedGraph, match="atan"):
        obj.directional_derivatives([obj.params()], method="taylor")
    g = obj.grad()
    auto = ls.directional_sharpness(obj, {"g": g}, shift="never")["g"]
    hvp = ls.directional_sharpness(obj, {"g": g}, shift="never", method="hvp")["g"]
    assert auto.raw == hvp.raw
    assert obj.directional_derivatives([g])[3] == "hvp"


def test_train_mode_batchnorm_falls_back():
    model, batch = _convnet()
    obj = ls.Objective(model, ce, batch, mode="train")
    assert obj.taylor_support() is not None
    g = obj.grad()
    auto = ls.directional_sharpness(obj, {"g": g}, shift="never")["g"]
    hvp = ls.directional_sharpness(obj, {"g": g}, shift="never", method="hvp")["g"]
    assert auto.raw == pytest.approx(hvp.raw, rel=1e-12)


class Branchy(nn.Module):
    """Python control flow on a parameter value."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.1], dtype=D))

    def forward(self, _):
        if self.w.sum() > 0:
            return (self.w**3).sum()
        return (torch.exp(self.w)).sum()


def test_value_dependent_control_flow_uses_hvps():
    model = Branchy()
    obj = ls.Objective(model, call, None)
    assert "could not be traced" in obj.taylor_support()
    e = {"w": torch.tensor([1.0, 0.0], dtype=D)}
    assert ls.directional_sharpness(obj, {"e": e}, shift="never")["e"].raw == pytest.approx(6 * 0.3, rel=1e-12)
    other = {"w": torch.tensor([-0.5, -0.1], dtype=D)}
    res = ls.directional_sharpness(obj, {"e": e}, at=other, shift="never")["e"]
    assert res.raw == pytest.approx(math.exp(-0.5), rel=1e-12)


class Scaled(nn.Module):
    """A plain tensor attribute (not a parameter or buffer) is recorded as a constant by the trace."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.1], dtype=D))
        self.scale = torch.tensor(2.0, dtype=D)

    def forward(self, _):
        return self.scale * (self.w**3).sum()


class Stale(Scaled):
    """... and one that changes at every call can never be recorded."""

    def forward(self, _):
        self.scale = self.scale + 1.0
        return super().forward(_)


def test_stale_recording_is_detected():
    model = Scaled()
    obj = ls.Objective(model, call, None)
    e = {"w": torch.tensor([1.0, 0.0], dtype=D)}
    assert ls.directional_sharpness(obj, {"e": e}, method="taylor")["e"].raw == pytest.approx(2 * 6 * 0.3, rel=1e-12)
    model.scale = torch.tensor(5.0, dtype=D)  # the recording is stale: it is made again
    assert ls.directional_sharpness(obj, {"e": e}, method="taylor")["e"].raw == pytest.approx(5 * 6 * 0.3, rel=1e-12)
    stale = ls.Objective(Stale(), call, None, check_determinism=False)
    assert "does not reproduce" in stale.taylor_support()
    assert stale.directional_derivatives([e])[3] == "hvp"
    with pytest.raises(UnsupportedGraph, match="does not reproduce"):
        stale.directional_derivatives([e], method="taylor")
    # A recording that goes stale and cannot be made again: a warning, and HVPs for this call.
    model.__class__ = Stale
    with pytest.warns(RuntimeWarning, match="does not reproduce"):
        _, _, (second,), used = obj.directional_derivatives([e])
    assert used == "hvp" and second == pytest.approx(float(model.scale) * 6 * 0.3, rel=1e-12)


def test_trace_is_cached():
    model = Fn(lambda p, b: torch.tanh(b @ p[0]).pow(2).sum(), [(4, 3)])
    obj = ls.Objective(model, call, X)
    obj.directional_derivatives([obj.params()], method="taylor")
    graphs = obj._taylor_graphs(obj._point(None))
    obj.directional_derivatives([obj.params()], method="taylor")
    assert obj._taylor_graphs(obj._point(None)) is graphs
    assert len(obj._taylor_cache) == 1


def test_bad_method_refused():
    model = Fn(lambda p, b: p[0].pow(2).sum(), [(3,)])
    obj = ls.Objective(model, call, None)
    with pytest.raises(ValueError, match="method"):
        ls.directional_sharpness(obj, {"a": obj.params()}, method="fast")
    with pytest.raises(ValueError, match="method"):
        obj.directional_derivatives([obj.params()], method="fast")


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "t5"])
def test_hugging_face_models(arch):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt2":
            cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                          attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
            model = transformers.GPT2LMHeadModel(cfg)
        elif arch == "llama":
            cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
            model = transformers.LlamaForCausalLM(cfg)
        elif arch == "t5":
            cfg = transformers.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                        dropout_rate=0.0, decoder_start_token_id=0)
            model = transformers.T5ForConditionalGeneration(cfg)
        else:
            cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=16, num_labels=3,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
            model = transformers.BertForSequenceClassification(cfg)
    model = model.double().eval()
    ids = torch.randint(0, 40, (2, 8))
    labels = {"bert": torch.randint(0, 3, (2,)), "t5": torch.randint(1, 40, (2, 5))}.get(arch, ids)
    obj = ls.Objective(model, lambda m, b: m(**b).loss, {"input_ids": ids, "labels": labels})
    assert obj.taylor_support() is None
    # Hugging Face upcasts parts of these models (the loss, RMSNorm) to float32 even in float64, so the
    # two engines agree to float32 rounding, not float64.
    check(obj, rtol=5e-5, n=2)


def test_measure_step_engines_agree_and_settings_exclude_the_engine():
    from landscape.measure import MeasureSettings, measure_step
    from landscape.models import TinyCausalLM, lm_loss

    torch.manual_seed(0)
    model = TinyCausalLM(vocab=13, width=16, depth=1, heads=2, context=8).double()
    batch = (torch.randint(0, 13, (4, 8)), torch.randint(0, 13, (4, 8)))
    obj = ls.Objective(model, lm_loss, batch)
    x = obj.params()
    g = obj.grad()
    dirs = {"sgd": g, "sign": tree.map(torch.sign, g)}
    rows = {}
    for method in ("taylor", "hvp"):
        st = MeasureSettings(method=method, lines=False, smoothness=False, coord_per_layer=0, cosine=False)
        rows[method] = measure_step(obj, 0, x, dirs, settings=st)["sharpness"]
    for a, b in zip(rows["taylor"], rows["hvp"]):
        assert a["direction"] == b["direction"]
        assert a["sharpness"] == pytest.approx(b["sharpness"], rel=1e-9)
        assert a["grad_correlation"] == pytest.approx(b["grad_correlation"], rel=1e-9)
    assert MeasureSettings(method="hvp").as_dict() == MeasureSettings().as_dict()
    with pytest.raises(ValueError, match="method"):
        MeasureSettings(method="fast")


def test_float64_objective_of_a_float32_model():
    from landscape.models import TinyCausalLM, lm_loss

    torch.manual_seed(1)
    model = TinyCausalLM(vocab=13, width=16, depth=1, heads=2, context=8)  # float32
    batch = (torch.randint(0, 13, (3, 8)), torch.randint(0, 13, (3, 8)))
    obj = ls.Objective(model, lm_loss, batch, dtype=torch.float64)
    check(obj, rtol=1e-9, n=2)
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize(
    "f",
    [
        lambda z: torch.clamp(z, -0.5, 0.5) * z,
        lambda z: F.hardtanh(z, -0.5, 0.5) * z,
        lambda z: torch.relu(z - 0.5) * z,
        lambda z: torch.abs(z - 0.5) * z,
        lambda z: torch.amax(torch.cat([z, 1.0 - z], 1), 1) * z[:, 0],
    ],
    ids=["clamp", "hardtanh", "relu", "abs", "amax_tie"],
)
def test_kinks_follow_autograd_at_the_boundary(f):
    """Exactly at a kink the derivative is a convention: the sweep uses autograd's, so both engines
    report the same number there."""
    x = torch.tensor([[1.0], [0.5]], dtype=D)
    model = Fn(lambda p, b: f(b @ p[0]).sum(), [(1, 1)])
    with torch.no_grad():
        model.ps[0].fill_(0.5)
    obj = ls.Objective(model, call, x)
    v = [{"ps.0": torch.ones(1, 1, dtype=D)}]
    _, g1, s1, _ = obj.directional_derivatives(v, method="taylor")
    _, g2, s2, _ = obj.directional_derivatives(v, method="hvp")
    assert g1[0] == pytest.approx(g2[0], rel=1e-12) and s1[0] == pytest.approx(s2[0], rel=1e-12, abs=1e-15)


def test_a_rule_failing_at_run_time_falls_back(monkeypatch):
    """A rule bug must cost speed, not a crash or a wrong number: HVPs from then on, with a warning."""

    def broken(node, P, C, cache):
        raise RuntimeError("simulated rule failure")

    monkeypatch.setitem(RULES, torch.ops.aten.tanh.default, broken)
    model = Fn(lambda p, b: torch.tanh(b @ p[0]).pow(2).sum(), [(4, 3)])
    obj = ls.Objective(model, call, X)
    assert obj.taylor_support() is None  # the rule exists; it fails only when run
    g = obj.grad()
    with pytest.warns(RuntimeWarning, match="simulated rule failure"):
        _, g1, s1, used = obj.directional_derivatives([g])
    _, g2, s2, _ = obj.directional_derivatives([g], method="hvp")
    assert used == "hvp" and s1 == s2 and g1 == g2
    assert "simulated rule failure" in obj.taylor_support()  # remembered: no second warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert obj.directional_derivatives([g])[3] == "hvp"
    with pytest.raises(UnsupportedGraph, match="simulated"):
        obj.directional_derivatives([g], method="taylor")


class Detachable(nn.Module):
    """A flag that changes what is detached changes the derivatives but not the loss."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor([0.3, -0.2], dtype=D))
        self.b = nn.Parameter(torch.tensor([0.5, 0.1], dtype=D))
        self.freeze_a = False

    def forward(self, _):
        a = self.a.detach() if self.freeze_a else self.a
        return (torch.exp(a) * self.b).sum() + (a**2).sum()


def test_first_order_cross_check_catches_a_changed_derivative_structure():
    model = Detachable()
    obj = ls.Objective(model, call, None)
    x = obj.params()
    u = {"a": torch.tensor([1.0, 0.5], dtype=D), "b": torch.tensor([0.2, -0.3], dtype=D)}
    res, _, _ = sharpness_and_gradient(obj, {"u": u}, shift="never")
    assert obj.taylor_support() is None
    model.freeze_a = True  # the loss is the same; its derivatives in a are now zero
    with pytest.warns(RuntimeWarning, match="disagrees with autograd"):
        res, _, grad = sharpness_and_gradient(obj, {"u": u}, shift="never")
    ref = ls.directional_sharpness(obj, {"u": u}, shift="never", method="hvp")["u"]
    assert res["u"].raw == ref.raw and res["u"].grad_correlation == ref.grad_correlation
    assert torch.all(grad["a"] == 0)
    assert "disagrees" in obj.taylor_support()
    assert x["a"].equal(model.a.detach())


def test_shifted_sweeps_skip_the_recordings_check_yet_match_the_dense_hessian_there():
    # The δ-shifted sweeps run right after the sweep at x checked the recording against the model: a
    # recording that read no value depending on the point is valid at x − δû too, so they add no
    # forward pass of the model (one per shifted direction before).
    from landscape.curvature import SharpnessMeter
    from tests._models import MLP

    torch.manual_seed(0)
    model = MLP(3, 5, 2).double()
    x, y = torch.randn(16, 3, dtype=D), torch.randn(16, 2, dtype=D)
    obj = ls.Objective(model, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]), (x, y))
    p = obj.params()
    gen = torch.Generator().manual_seed(2)
    dirs = {f"d{i}": tree.randn_like(p, gen) for i in range(4)}
    assert obj.taylor_support() is None
    assert all(g.reads_point_values is False for g in obj._taylor_graphs(p))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with SharpnessMeter(obj, at=p, shift="always", delta=0.05, method="taylor", need_grad=False) as meter:
            res = meter.measure(dirs)
    finally:
        handle.remove()
    assert len(calls) == 1  # the check at x only
    flat = torch.cat([p[n].reshape(-1) for n in obj.names])

    def f(v):
        return torch.nn.functional.mse_loss(torch.func.functional_call(model, tree.unflatten(v, p), (x,)), y)

    for k, u in dirs.items():
        v = torch.cat([u[n].reshape(-1) for n in obj.names])
        v = v / v.norm()
        H = torch.func.hessian(f)(flat - 0.05 * v)
        assert res[k].shifted and res[k].value == pytest.approx(float(v @ H @ v), rel=1e-9)
