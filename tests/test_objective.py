"""ls.Objective: functional evaluation that leaves the user's module exactly as it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import tree
from landscape.models import TinyCausalLM, lm_loss
from tests._models import MLP, TinyTransformer, classification_loss


class WithBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.unused = nn.Linear(3, 3)
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        return self.out(self.frozen(torch.relu(self.bn(self.fc(x)))))


def snapshot(model):
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: p.grad for n, p in model.named_parameters()},
    }


def assert_untouched(model, before):
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(p, after["params"][n]), f"parameter {n} changed"
    for n, b in before["buffers"].items():
        assert torch.equal(b, after["buffers"][n]), f"buffer {n} changed"
    assert before["modes"] == after["modes"]
    assert before["flags"] == after["flags"]
    assert all(g is None for g in after["grads"].values()), "a .grad was written"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_module_untouched_after_every_call(mode):
    torch.manual_seed(0)
    model = WithBatchNorm()
    model.train()
    model.out.eval()  # mixed modes must come back exactly
    batch = (torch.randn(8, 4), torch.randint(0, 2, (8,)))
    before = snapshot(model)
    rng = torch.get_rng_state()
    fast = torch.backends.mha.get_fastpath_enabled()
    obj = ls.Objective(model, classification_loss, batch, mode=mode)
    assert "frozen.weight" not in obj.names and "unused.weight" in obj.names
    loss, g = obj.loss_and_grad()
    assert torch.count_nonzero(g["unused.weight"]) == 0
    v = tree.randn_like(g, torch.Generator().manual_seed(0))
    hv = obj.hvp(v)
    assert torch.count_nonzero(hv["unused.weight"]) == 0
    ls.directional_sharpness(obj, {"g": g, "v": v}, shift="always")
    ls.loss_along(obj, g, [0.0, 0.1])
    ls.top_eigenvalues(obj, k=1, tol=1e-3)
    assert_untouched(model, before)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_train_mode_batchnorm_uses_batch_statistics():
    torch.manual_seed(0)
    model = WithBatchNorm()
    batch = (torch.randn(8, 4) * 3 + 1, torch.randint(0, 2, (8,)))
    f_train = ls.Objective(model, classification_loss, batch, mode="train").loss()
    f_eval = ls.Objective(model, classification_loss, batch, mode="eval").loss()
    ref_train = float(classification_loss(copy.deepcopy(model).train(), batch))
    ref_eval = float(classification_loss(copy.deepcopy(model).eval(), batch))
    assert f_train == pytest.approx(ref_train, rel=1e-6)
    assert f_eval == pytest.approx(ref_eval, rel=1e-6)
    assert f_train != pytest.approx(f_eval, rel=1e-3)
    # the line: batch statistics in train mode, running statistics in eval mode, the module untouched
    stats = copy.deepcopy(dict(model.named_buffers()))
    for mode, ref_mode in (("train", True), ("eval", False)):
        obj = ls.Objective(model, classification_loss, batch, mode=mode)
        g = obj.grad()
        line = obj.losses_along(g, [0.0, 0.05, 0.05])
        moved = copy.deepcopy(model).train(ref_mode)
        with torch.no_grad():
            for n, p in moved.named_parameters():
                if n in g:
                    p.sub_(0.05 * g[n])
        assert line[0] == pytest.approx(ref_train if ref_mode else ref_eval, rel=1e-6)
        assert line[1] == line[2] == pytest.approx(float(classification_loss(moved, batch)), rel=1e-6)
    for n, b in model.named_buffers():
        assert torch.equal(b, stats[n]), n


def test_determinism_guard_refuses_dropout_in_train_mode():
    torch.manual_seed(0)
    model = TinyCausalLM(vocab=11, width=16, depth=1, heads=2, context=8, dropout=0.2)
    batch = (torch.randint(0, 11, (4, 8)), torch.randint(0, 11, (4, 8)))
    with pytest.raises(ls.DeterminismError, match="mode='eval'"):
        ls.Objective(model, lm_loss, batch, mode="train")
    obj = ls.Objective(model, lm_loss, batch, mode="eval")
    assert obj.loss() == obj.loss()

    def noisy(m, b):
        return classification_loss(m, b) + 1e-3 * torch.rand(())

    with pytest.raises(ls.DeterminismError, match="loss_fn"):
        ls.Objective(MLP(), noisy, (torch.randn(4, 3), torch.randint(0, 2, (4,))))


def test_micro_batches_equal_the_full_batch():
    torch.manual_seed(0)
    model = MLP().double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randint(0, 2, (10,))
    full = ls.Objective(model, classification_loss, (x, y))
    split = ls.Objective(model, classification_loss, [(x[:3], y[:3]), (x[3:], y[3:])])
    assert len(split.batches) == 2 and split.batches.weights == pytest.approx([0.3, 0.7])
    assert split.loss() == pytest.approx(full.loss(), rel=1e-12)
    for n, g in full.grad().items():
        torch.testing.assert_close(split.grad()[n], g, rtol=1e-12, atol=1e-14)
    v = tree.randn_like(full.params(), torch.Generator().manual_seed(1))
    for n, h in full.hvp(v).items():
        torch.testing.assert_close(split.hvp(v)[n], h, rtol=1e-10, atol=1e-12)
    a = ls.directional_sharpness(full, {"v": v})["v"]
    b = ls.directional_sharpness(split, {"v": v})["v"]
    assert b.raw == pytest.approx(a.raw, rel=1e-10)
    # a list of tensors is one batch, not micro-batches
    assert len(ls.Objective(model, classification_loss, [x, y]).batches) == 1


def test_float64_on_request_leaves_the_model_float32():
    torch.manual_seed(0)
    model = MLP()
    batch = (torch.randn(5, 3), torch.randint(0, 2, (5,)))
    obj = ls.Objective(model, classification_loss, batch, dtype=torch.float64)
    g = obj.grad()
    assert all(t.dtype == torch.float64 for t in g.values())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ref = ls.Objective(model.double(), classification_loss, (batch[0].double(), batch[1])).grad()
    for n in g:
        torch.testing.assert_close(g[n], ref[n], rtol=1e-12, atol=1e-14)


def test_hugging_face_style_dict_batch():
    class Out:
        def __init__(self, loss):
            self.loss = loss

    class DictModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, input, labels):
            return Out(F.cross_entropy(self.fc(input), labels))

    model = DictModel()
    batch = {"input": torch.randn(4, 3), "labels": torch.randint(0, 2, (4,))}
    obj = ls.Objective(model, lambda m, b: m(**b).loss, batch)
    assert obj.loss() == pytest.approx(float(model(**batch).loss), rel=1e-6)
    assert set(obj.grad()) == {"fc.weight", "fc.bias"}


def test_fused_attention_models_work_and_flags_restored():
    """nn.TransformerEncoderLayer / MultiheadAttention and F.scaled_dot_product_attention (float32,
    default kernels): HVPs go through the math backend with the MHA fast path off."""
    torch.manual_seed(0)
    fast = torch.backends.mha.get_fastpath_enabled()
    for model, batch, loss_fn in [
        (TinyTransformer(), (torch.randint(0, 5, (2, 5)), torch.randint(0, 5, (2, 5))), classification_loss),
        (TinyCausalLM(11, width=16, depth=2, heads=2, context=8), (torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))), lm_loss),
    ]:
        obj = ls.Objective(model, loss_fn, batch)
        g = obj.grad()
        res = ls.directional_sharpness(obj, {"g": g})
        assert torch.isfinite(torch.tensor(res["g"].raw))
        # float64 reference of the same quadratic form
        obj64 = ls.Objective(model, loss_fn, batch, dtype=torch.float64)
        ref = ls.directional_sharpness(obj64, {"g": g}, shift="never")["g"].raw
        assert res["g"].raw == pytest.approx(ref, rel=1e-3, abs=1e-5)
    assert torch.backends.mha.get_fastpath_enabled() == fast


def test_clear_errors():
    model = MLP()
    batch = (torch.randn(4, 3), torch.randint(0, 2, (4,)))
    with pytest.raises(ValueError, match="mode"):
        ls.Objective(model, classification_loss, batch, mode="inference")
    with pytest.raises(TypeError, match="scalar"):
        ls.Objective(model, lambda m, b: m(b[0]), batch)
    with pytest.raises(TypeError, match="nn.Module"):
        ls.Objective(lambda x: x, classification_loss, batch)
    bad = (torch.full((4, 3), float("nan")), batch[1])
    with pytest.raises(ls.NonFiniteError, match="nan"):
        ls.Objective(model, classification_loss, bad)
    frozen = MLP().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        ls.Objective(frozen, classification_loss, batch)
    obj = ls.Objective(model, classification_loss, batch)
    with pytest.raises(KeyError, match="missing"):
        obj.loss({"fc1.weight": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="MicroBatches"):
        ls.MicroBatches([])
