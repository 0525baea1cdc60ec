"""A spec for ``landscape analyze`` on a tiny Hugging Face GPT-2 built from a config (no model hub),
and a loop that saves ``save_pretrained`` checkpoints ``checkpoint-<step>/``."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB, LENGTH = 50, 12


def make_model(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config)


def batch(seed: int, size: int = 4) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (size, LENGTH), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def loss_fn(model, b):
    return model(**b).loss


def build():
    return {"model": make_model(), "loss_fn": loss_fn, "probe_batch": batch(99, 8),
            "train_batches": [batch(i) for i in range(4)]}


def train(out: str | Path, steps: int = 3) -> list[Path]:
    """AdamW for ``steps`` steps; ``save_pretrained`` before each step and after the last."""
    out = Path(out)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    written = []
    for t in range(steps + 1):
        written.append(out / f"checkpoint-{t}")
        model.save_pretrained(written[-1])
        if t < steps:
            loss_fn(model, batch(t)).backward()
            opt.step()
            opt.zero_grad()
    return written
