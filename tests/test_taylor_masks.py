"""The Taylor sweep on the batches real fine-tuning uses: padded, with attention masks.

Values computed from the probe batch alone (Hugging Face's mask handling branches on the mask and calls
``.item()`` on it) are read at trace time (:class:`landscape.taylor._BatchConstants`). Every case
is checked against ``method="hvp"`` (double backward, itself held to dense Hessians and finite differences
in test_curvature.py) in float64; ``method="taylor"`` raises if the sweep cannot run, so each case also
proves it ran. The Hugging Face models are built from tiny configs: nothing is downloaded."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import tree
from landscape.taylor import UnsupportedGraph

D = torch.float64


def check(obj, rtol=1e-9, n=2):
    """Both engines on ``n`` random directions: the same ∇f·v and vᵀ∇²f·v to float64 rounding."""
    gen = torch.Generator().manual_seed(0)
    vs = [tree.randn_like(obj.params(), gen) for _ in range(n)]
    lt, g1, s1, used_t = obj.directional_derivatives(vs, method="taylor")
    lh, g2, s2, used_h = obj.directional_derivatives(vs, method="hvp")
    assert (used_t, used_h) == ("taylor", "hvp")
    assert lt == pytest.approx(lh, rel=1e-12)
    scale_g, scale_s = max(map(abs, g2)), max(map(abs, s2))
    assert scale_s > 0, "the case must have curvature to test anything"
    for a, b in zip(g1, g2):
        assert a == pytest.approx(b, rel=rtol, abs=rtol * scale_g)
    for a, b in zip(s1, s2):
        assert a == pytest.approx(b, rel=rtol, abs=rtol * scale_s)


def constants(obj):
    """The constant tensors of every recording of ``obj``."""
    (graphs,) = obj._taylor_cache.values()
    return [[t for k, t in g.gm.named_buffers() if k.startswith("_tensor_constant")] for g in graphs]


# ---------------------------------------------------------------------------------------------- plain torch
class BatchBranches(nn.Module):
    """Python control flow and ``.item()`` on the batch: lengths, a mask test, a data-dependent slice."""

    def __init__(self):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(4, 3, dtype=D)
        self.w = nn.Parameter(torch.randn(3, generator=gen, dtype=D))
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(3, 4, generator=gen, dtype=D))

    def forward(self, b):
        x, mask = b["x"], b["mask"]
        n = int(mask.sum(1).max())  # .item() on the batch
        h = torch.tanh(self.lin(x[:, :n]))
        if (mask[:, :n] == 0).any():  # a branch on the batch
            h = h.masked_fill(mask[:, :n, None] == 0, 0.0)
        keep = mask[:, :n].nonzero()  # a data-dependent shape
        return (h[keep[:, 0], keep[:, 1]] * self.w).pow(2).sum() / mask.sum()


def _branch_batch():
    gen = torch.Generator().manual_seed(1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    return {"x": torch.randn(3, 6, 4, generator=gen, dtype=D), "mask": mask}


def test_branches_and_item_on_the_batch_are_constants():
    obj = ls.Objective(BatchBranches(), lambda m, b: m(b), _branch_batch())
    assert obj.taylor_support() is None
    check(obj, rtol=1e-11)


def test_control_flow_on_parameters_still_falls_back_with_the_reason():
    class OnParams(BatchBranches):
        def forward(self, b):
            return super().forward(b) * (2.0 if float(self.w.sum()) > 0 else 1.0)

    obj = ls.Objective(OnParams(), lambda m, b: m(b), _branch_batch())
    with pytest.warns(RuntimeWarning, match="Taylor sweep cannot be used"):
        reason = obj.taylor_support()
    assert "could not be traced" in reason and "depends on the parameters" in reason


def test_a_batch_tensor_written_into_between_uses_is_replayed_in_order():
    class Rewrites(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=D))

        def forward(self, x):
            m = x.clone()
            first = torch.tanh(self.p + m).sum()  # (add saves no input for autograd)
            m.mul_(3.0)  # the same storage, new values
            if m.sum() > 0:  # read after the write
                return first + torch.sin(self.p + m).sum()
            return first

    obj = ls.Objective(Rewrites(), lambda m, b: m(b), torch.tensor([1.0, 2.0, -1.0], dtype=D))
    assert obj.taylor_support() is None
    check(obj, rtol=1e-12)


class WritesParams(nn.Module):
    """Parameter values written in place into a tensor built from the batch (``variant`` says how)."""

    def __init__(self, variant):
        super().__init__()
        self.p = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=D))
        self.variant = variant

    def forward(self, x):
        if self.variant == "batch":
            x.add_(self.p)  # into the batch itself
            return (torch.exp(x) ** 2).sum()
        buf = torch.zeros(3, dtype=D) + x
        if self.variant == "fresh":
            buf.add_(self.p)
            return (torch.exp(buf) ** 2).sum()
        view = buf[:2]
        buf.add_(self.p)  # buf, and the view of it, now hold values that depend on p
        if view.sum() > 0:  # a branch on a parameter value, through an alias
            return (torch.exp(view) ** 2).sum()
        return (torch.exp(buf) ** 2).sum()


def test_parameter_values_written_into_a_tensor_from_the_batch():
    x = torch.tensor([1.0, 2.0, -1.0], dtype=D)
    # A fresh tensor written once is recorded like any other value.
    obj = ls.Objective(WritesParams("fresh"), lambda m, b: m(b), x)
    assert obj.taylor_support() is None
    check(obj, rtol=1e-12)
    # An alias of it is no constant: reading its value is control flow on the parameters.
    obj = ls.Objective(WritesParams("read"), lambda m, b: m(b), x)
    with pytest.warns(RuntimeWarning, match="Taylor sweep cannot be used"):
        assert "depends on the parameters" in obj.taylor_support()
    # Written into the batch itself: refused (its other aliases would be constants).
    obj = ls.Objective(WritesParams("batch"), lambda m, b: m(b), x.clone(), check_determinism=False)
    with pytest.warns(RuntimeWarning, match="in place"):
        assert "in place" in obj.taylor_support()
    with pytest.raises(UnsupportedGraph, match="in place"):
        obj.directional_derivatives([obj.params()], method="taylor")


class PerLayerMask(nn.Module):
    """Each layer converts the mask to an additive float bias itself, as some models do."""

    def __init__(self, width=8, depth=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(nn.Linear(width, width, dtype=D) for _ in range(depth))

    def forward(self, b):
        x, mask = b["x"], b["mask"]
        for lin in self.layers:
            bias = (1.0 - mask[:, :, None].to(x.dtype)) * torch.finfo(x.dtype).min
            if not bool((mask == 0).any()):  # a branch on the mask, as Hugging Face's
                bias = None
            x = torch.softmax(lin(x) + bias, dim=1) * x
        return (x**2).sum()


def stored_beyond_the_batch(obj, batch):
    """Elements of the recordings' tensor constants that are not the batch's own tensors."""
    ptrs = {t.untyped_storage().data_ptr() for t in (batch.values() if isinstance(batch, dict) else batch)}
    return sum(t.numel() for c in constants(obj) for t in c if t.untyped_storage().data_ptr() not in ptrs)


def test_the_recording_stores_nothing_computed_from_the_batch():
    """The masks are recomputed at each evaluation (as the model computes them), not kept with the
    recording for the Objective's lifetime: its only tensors are references to the batch."""
    b = {"x": torch.randn(4, 16, 8, dtype=D), "mask": (torch.arange(16) < torch.tensor([[16], [9], [5], [12]])).long()}
    obj = ls.Objective(PerLayerMask(depth=3), lambda m, b: m(b), b)
    assert obj.taylor_support() is None
    check(obj, rtol=1e-10)
    assert stored_beyond_the_batch(obj, b) == 0


def test_micro_batches_with_different_masks_get_their_own_recordings():
    model = PerLayerMask(depth=2)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 10, 8, generator=gen, dtype=D)
    mask = (torch.arange(10) < torch.tensor([[10], [4], [7], [2]])).long()
    whole = ls.Objective(model, lambda m, b: m(b), {"x": x, "mask": mask})
    parts = ls.Objective(model, lambda m, b: m(b), ls.MicroBatches([{"x": x[:2], "mask": mask[:2]},
                                                                     {"x": x[2:, :7], "mask": mask[2:, :7]}],
                                                                    weights=[1.0, 1.0]))
    assert parts.taylor_support() is None
    first, second = constants(parts)
    assert {tuple(t.shape) for t in first} != {tuple(t.shape) for t in second}  # two recordings, two masks
    u = tree.randn_like(whole.params(), torch.Generator().manual_seed(0))
    _, (g1,), (s1,), used = parts.directional_derivatives([u], method="taylor")
    _, (g2,), (s2,), _ = whole.directional_derivatives([u], method="hvp")
    # (x**2).sum() is a sum over samples: the two micro-batches (weights 1/2 each) give half the whole.
    assert used == "taylor" and 2 * s1 == pytest.approx(s2, rel=1e-11) and 2 * g1 == pytest.approx(g2, rel=1e-11)


# ---------------------------------------------------------------------------------------------- Hugging Face
V = 40
MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])


def _padded(side, pad_id):
    """Token ids padded on ``side`` (``pad_id`` at the padding), the attention mask and LM labels."""
    mask = MASK if side == "right" else MASK.flip(1)
    ids = torch.randint(2, V, mask.shape, generator=torch.Generator().manual_seed(5)).masked_fill(mask == 0, pad_id)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def _lm_loss(m, b):
    # The loss in float64: Hugging Face's own LM loss upcasts the logits to float32 even in a float64 model.
    logits = m(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)


def _float64_rms_norm(self, hidden_states):
    # Llama's and T5's RMSNorm compute in float32 even in a float64 model (Hugging Face's choice for half
    # precision); this is the same function in the input's dtype, so both engines meet float64 rounding.
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    eps = getattr(self, "variance_epsilon", getattr(self, "eps", 1e-6))
    return self.weight * (hidden_states * torch.rsqrt(variance + eps))


def hf_case(arch, side, monkeypatch):
    """(model, loss_fn, batch): a tiny float64 model of ``arch`` and a padded batch with its mask."""
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=V, num_hidden_layers=1, num_attention_heads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if arch == "gpt2":
            model = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                                   attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0))
        elif arch == "llama":
            monkeypatch.setattr(T.models.llama.modeling_llama.LlamaRMSNorm, "forward", _float64_rms_norm)
            model = T.LlamaForCausalLM(T.LlamaConfig(hidden_size=16, intermediate_size=32, num_key_value_heads=1,
                                                     max_position_embeddings=16, **common))
        elif arch == "bert":
            model = T.BertForSequenceClassification(T.BertConfig(
                hidden_size=16, intermediate_size=32, max_position_embeddings=16, num_labels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
        elif arch == "roberta":
            model = T.RobertaForSequenceClassification(T.RobertaConfig(
                hidden_size=16, intermediate_size=32, max_position_embeddings=20, num_labels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common))
        elif arch == "distilbert":
            model = T.DistilBertForSequenceClassification(T.DistilBertConfig(
                vocab_size=V, dim=16, n_layers=1, n_heads=2, hidden_dim=32, max_position_embeddings=16, num_labels=3,
                dropout=0.0, attention_dropout=0.0))
        else:
            monkeypatch.setattr(T.models.t5.modeling_t5.T5LayerNorm, "forward", _float64_rms_norm)
            model = T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                            num_heads=2, dropout_rate=0.0, decoder_start_token_id=0))
    model = model.double().eval()
    pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    ids, mask, lm_labels = _padded(side, pad)
    if arch in ("gpt2", "llama"):
        return model, _lm_loss, {"input_ids": ids, "attention_mask": mask, "labels": lm_labels}
    if arch == "t5":
        # A decoder mask too: the targets are padded (on the right, as a collator pads them).
        dec_mask = MASK[:, :5].flip(0)
        labels = torch.randint(2, V, dec_mask.shape, generator=torch.Generator().manual_seed(6))
        b = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": model._shift_right(labels),
             "decoder_attention_mask": dec_mask, "labels": labels.masked_fill(dec_mask == 0, -100)}

        def s2s_loss(m, b):
            logits = m(**{k: v for k, v in b.items() if k != "labels"}).logits
            return F.cross_entropy(logits.flatten(0, 1), b["labels"].flatten(), ignore_index=-100)

        return model, s2s_loss, b
    labels = torch.tensor([0, 2, 1])
    return model, lambda m, b: m(**b).loss, {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "roberta", "distilbert", "t5"])
def test_hugging_face_padded_batches_with_attention_masks(arch, side, monkeypatch):
    model, loss_fn, batch = hf_case(arch, side, monkeypatch)
    obj = ls.Objective(model, loss_fn, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # supported: no fallback warning
        assert obj.taylor_support() is None
    check(obj, rtol=1e-11)
    assert stored_beyond_the_batch(obj, batch) == 0
    # The mask is honoured (the padding changes nothing the loss sees) where it can be: right padding,
    # with no pad position read by the loss.
    if side == "right" and arch != "t5":
        other = dict(batch, input_ids=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7))
        assert ls.Objective(model, loss_fn, other).loss() == pytest.approx(obj.loss(), rel=1e-12)


# ---------------------------------------------------------------------------------------------- saying so
class AtanNet(nn.Module):
    """A loss with an operator the sweep has no rule for: ``auto`` uses HVPs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(3, 2)
        self.freeze = False

    def forward(self, x):
        return torch.atan(self.lin(x))


def mse(m, b):
    return ((m(b[0]) - b[1]) ** 2).mean()


def _xy(seed=0, n=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=gen), torch.randn(n, 2, generator=gen)


def test_auto_says_once_that_it_falls_back_and_why():
    obj = ls.Objective(AtanNet(), mse, _xy())
    g = obj.grad()
    with pytest.warns(RuntimeWarning, match=r"Taylor sweep cannot be used .*atan.*Hessian-vector products") as rec:
        ls.directional_sharpness(obj, {"g": g}, shift="never")
    assert len([w for w in rec if "Taylor sweep" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per Objective
        ls.directional_sharpness(obj, {"g": g}, shift="never")
        assert obj.directional_derivatives([g])[3] == "hvp"
        assert "atan" in obj.taylor_support()
        # Asking for HVPs says nothing; nor does a supported loss.
        other = ls.Objective(AtanNet(), mse, _xy())
        ls.directional_sharpness(other, {"g": g}, shift="never", method="hvp")
        ls.directional_sharpness(ls.Objective(nn.Linear(3, 2), mse, _xy()), {"g": ls.Objective(nn.Linear(3, 2), mse, _xy()).grad()})
    # The plain directional_derivatives path warns too.
    with pytest.warns(RuntimeWarning, match="atan"):
        ls.Objective(AtanNet(), mse, _xy()).directional_derivatives([g])


def _engine_events(run):
    return [(e["step"], e["message"]) for e in run.events() if e["kind"] == "engine"]


SETTINGS = ls.MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8)


def _train(model, out, steps=5, freeze_at=None, settings=SETTINGS):
    from landscape.probe import Probe
    from landscape.store import load_run

    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with Probe(model, mse, _xy(), out=out, every=2, recipes=["sgd", "adam"], settings=settings) as probe:
        probe.attach(opt)
        for step in range(steps):
            if step == freeze_at:
                model.freeze = True
            loss = mse(model, _xy(step + 1))
            loss.backward()
            opt.step()
            opt.zero_grad()
    return load_run(out), probe


def test_the_probe_records_the_engine_when_chosen_and_when_it_changes(tmp_path):
    with pytest.warns(RuntimeWarning, match="atan"):
        run, probe = _train(AtanNet(), tmp_path / "atan")
    assert run.steps() == [1, 2, 4]
    ((step, message),) = _engine_events(run)  # one event, at the first measurement
    assert step == 1 and message.startswith("sharpness engine: hvp") and "atan" in message
    assert probe.engine == "hvp"

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run, probe = _train(nn.Sequential(nn.Linear(3, 2), nn.Tanh()), tmp_path / "tanh")
    assert _engine_events(run) == [(1, "sharpness engine: taylor (the second-order Taylor sweep)")]

    run, _ = _train(AtanNet(), tmp_path / "hvp", settings=dataclasses.replace(SETTINGS, method="hvp"))
    assert _engine_events(run) == [(1, "sharpness engine: hvp (Hessian-vector products, as asked)")]


def test_an_engine_change_is_an_event(tmp_path):
    class Tanh(AtanNet):
        def forward(self, x):  # a supported loss whose derivative structure changes at `freeze`
            h = self.lin(x)
            return torch.tanh(h.detach() if self.freeze else h) + (0 * h if self.freeze else 0)

    with pytest.warns(RuntimeWarning, match="disagrees"):
        run, probe = _train(Tanh(), tmp_path / "run", steps=5, freeze_at=3)
    events = _engine_events(run)
    assert [s for s, _ in events] == [1, 4] and "taylor" in events[0][1] and "hvp" in events[1][1]
    assert "disagrees" in events[1][1] and probe.engine == "hvp"


def test_analyze_records_the_engine(tmp_path):
    from landscape.analyze import analyze
    from landscape.store import load_run

    model = AtanNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        torch.save({"model": model.state_dict(), "step": step}, tmp_path / f"ckpt_{step}.pt")
        mse(model, _xy(step + 1)).backward()
        opt.step()
        opt.zero_grad()
    spec = {"model": AtanNet(), "loss_fn": mse, "probe_batch": _xy()}
    with pytest.warns(RuntimeWarning, match="atan"):
        result = analyze(spec, [tmp_path / f"ckpt_{s}.pt" for s in range(3)], tmp_path / "run",
                         recipes=["sgd"], settings=SETTINGS)
    assert result.measured == [0, 1, 2] and result.engine == "hvp"
    ((step, message),) = _engine_events(load_run(tmp_path / "run"))
    assert step == 0 and "hvp" in message and "atan" in message
