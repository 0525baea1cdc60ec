"""Which Hugging Face architectures the Taylor sweep supports, and how well it agrees with HVPs.

Builds tiny random models (nothing is downloaded) of many `transformers` architectures in float64 and
prints, for each, whether ``Objective.taylor_support()`` accepts its loss (else the reason) and the
relative difference of ûᵀHû and of ∇f·û between ``method="taylor"`` and ``method="hvp"``. Hugging Face
upcasts parts of some models (the LM loss, RMSNorm, rotary tables, BLOOM's softmax) to float32 even in
a float64 model, so those agree to float32 rounding; the others to float64 rounding.

The second table feeds the batches fine-tuning uses: padded to the longest sequence (on the right, and
on the left as for generation) with ``attention_mask`` (T5 also with ``decoder_attention_mask``), under
the default (SDPA) and the eager attention implementation. Hugging Face branches on the mask and calls
``.item()`` on it; values computed from the batch alone are constants of the recording, so these trace
like the unpadded ones.

    python docs/taylor_coverage.py
"""

from __future__ import annotations

import logging
import warnings

import torch
import transformers as T

import landscape as ls
from landscape import tree

V = 40


def small(name, **extra):
    """(model, kind) for a tiny config of each architecture (``extra``: more config keywords)."""
    with _extra_config(extra):
        return _small(name)


class _extra_config:
    """Every config built inside gets ``extra`` keywords (the attention implementation, say)."""

    def __init__(self, extra):
        self.extra = extra

    def __enter__(self):
        self.init = T.PretrainedConfig.__init__
        extra, init = self.extra, self.init

        def patched(cfg, *args, **kwargs):
            init(cfg, *args, **{**kwargs, **extra})

        T.PretrainedConfig.__init__ = patched

    def __exit__(self, *exc):
        T.PretrainedConfig.__init__ = self.init


def _small(name):
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=V, n_positions=32, n_embd=16, n_layer=2, n_head=2,
                                              attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)), "lm"
    if name == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=32)), "lm"
    if name == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(vocab_size=V, hidden_size=16, intermediate_size=32,
                                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                    max_position_embeddings=32)), "lm"
    if name == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1,
                                                max_position_embeddings=32)), "lm"
    if name == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                max_position_embeddings=32)), "lm"
    if name == "phi":
        return T.PhiForCausalLM(T.PhiConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, max_position_embeddings=32, resid_pdrop=0.0,
                                            embd_pdrop=0.0, attention_dropout=0.0)), "lm"
    if name == "opt":
        return T.OPTForCausalLM(T.OPTConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, ffn_dim=32,
                                            num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                                            dropout=0.0, attention_dropout=0.0)), "lm"
    if name == "gpt_neox":
        return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32,
                                                    max_position_embeddings=32)), "lm"
    if name == "bloom":
        return T.BloomForCausalLM(T.BloomConfig(vocab_size=V, hidden_size=16, n_layer=2, n_head=2, hidden_dropout=0.0,
                                                attention_dropout=0.0)), "lm"
    if name == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=V, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                       num_heads=2, dropout_rate=0.0, decoder_start_token_id=0)), "s2s"
    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                            num_attention_heads=2, intermediate_size=32,
                                                            max_position_embeddings=32, num_labels=3,
                                                            hidden_dropout_prob=0.0,
                                                            attention_probs_dropout_prob=0.0)), "cls"
    if name == "roberta":
        return T.RobertaForSequenceClassification(T.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2,
                                                                  num_attention_heads=2, intermediate_size=32,
                                                                  max_position_embeddings=40, num_labels=3,
                                                                  hidden_dropout_prob=0.0,
                                                                  attention_probs_dropout_prob=0.0)), "cls"
    if name == "distilbert":
        return T.DistilBertForSequenceClassification(T.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2,
                                                                        hidden_dim=32, max_position_embeddings=32,
                                                                        num_labels=3, dropout=0.0,
                                                                        attention_dropout=0.0)), "cls"
    if name == "vit":
        return T.ViTForImageClassification(T.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16,
                                                       num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                                       num_labels=3, hidden_dropout_prob=0.0,
                                                       attention_probs_dropout_prob=0.0)), "img"
    raise KeyError(name)


NAMES = ["gpt2", "llama", "mistral", "qwen2", "gemma", "phi", "opt", "gpt_neox", "bloom", "t5", "bert", "roberta",
         "distilbert", "vit"]


def batch_for(kind):
    ids = torch.randint(1, V, (2, 8))
    if kind == "lm":
        return {"input_ids": ids, "labels": ids}
    if kind == "s2s":
        return {"input_ids": ids, "labels": torch.randint(1, V, (2, 5))}
    if kind == "cls":
        return {"input_ids": ids, "labels": torch.randint(0, 3, (2,))}
    return {"pixel_values": torch.randn(2, 3, 8, 8, dtype=torch.float64), "labels": torch.randint(0, 3, (2,))}


MASK = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0]])


def padded_batch_for(kind, side, pad_id):
    """A padded batch with its attention mask (labels -100 at the padding), padded on ``side``."""
    mask = MASK if side == "right" else MASK.flip(1)
    ids = torch.randint(2, V, mask.shape).masked_fill(mask == 0, pad_id)
    if kind == "lm":
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if kind == "s2s":
        dec = MASK[:, :5].flip(0)
        labels = torch.randint(2, V, dec.shape).masked_fill(dec == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "decoder_attention_mask": dec}
    if kind == "cls":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (3,))}
    return None


def compare(obj):
    """Relative differences of ûᵀHû and ∇f·û between the two engines along one random direction."""
    u = tree.randn_like(obj.params(), torch.Generator().manual_seed(0))
    _, g1, s1, _ = obj.directional_derivatives([u], method="taylor")
    _, g2, s2, _ = obj.directional_derivatives([u], method="hvp")
    return abs(s1[0] - s2[0]) / abs(s2[0]), abs(g1[0] - g2[0]) / abs(g2[0])


def masked():
    """The second table: padded batches with attention masks."""
    print()
    print("padded batches with attention_mask (T5: and decoder_attention_mask); rel. diff of uᵀHu / ∇f·u")
    print(f"{'architecture':14s} {'attention':10s} {'right padding':>22s} {'left padding':>22s}")
    fallbacks = []
    for name in NAMES:
        for impl in ("sdpa", "eager"):
            model, kind = small(name, attn_implementation=impl)
            model = model.double().eval()
            pad = getattr(model.config, "pad_token_id", None) or 0
            cells = []
            for side in ("right", "left"):
                batch = padded_batch_for(kind, side, pad)
                if batch is None:
                    cells.append("(no mask)")
                    continue
                try:
                    obj = ls.Objective(model, lambda m, b: m(**b).loss, batch)
                except ls.NonFiniteError:  # the model's own loss, before any engine runs
                    cells.append("loss is NaN")
                    fallbacks.append(f"{name} ({impl}, {side} padding): the model's own loss is NaN on this batch")
                    continue
                reason = obj.taylor_support()
                if reason is not None:
                    cells.append("falls back")
                    fallbacks.append(f"{name} ({impl}, {side} padding): {reason}")
                    continue
                ds, dg = compare(obj)
                cells.append(f"{ds:.1e} / {dg:.1e}")
            print(f"{name:14s} {impl:10s} {cells[0]:>22s} {cells[1]:>22s}")
    for line in fallbacks:
        print("  ", line)


def main():
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    print(f"{'architecture':14s} {'taylor sweep':14s} {'rel. diff uᵀHu':>15s} {'rel. diff ∇f·u':>15s}")
    for name in NAMES:
        model, kind = small(name)
        model = model.double().eval()
        obj = ls.Objective(model, lambda m, b: m(**b).loss, batch_for(kind))
        reason = obj.taylor_support()
        if reason is not None:
            print(f"{name:14s} {'falls back':14s} {reason}")
            continue
        ds, dg = compare(obj)
        print(f"{name:14s} {'supported':14s} {ds:15.1e} {dg:15.1e}")
    masked()


if __name__ == "__main__":
    main()
