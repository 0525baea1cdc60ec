"""A spec for ``landscape analyze`` on the tiny reference LM, and the training script that makes
its checkpoints in every format.

    landscape analyze --spec tests.specs.tiny_lm:build CKPTS... --out RUN
    python -m tests.specs.tiny_lm OUT_DIR [STEPS]      # trains and saves checkpoints
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from landscape.models import TinyCausalLM, lm_loss

VOCAB, CTX, WIDTH = 13, 8, 16


def make_model(seed: int = 0) -> TinyCausalLM:
    torch.manual_seed(seed)
    return TinyCausalLM(VOCAB, width=WIDTH, depth=1, heads=2, context=CTX)


def make_batch(gen: torch.Generator, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, VOCAB, (size, CTX), generator=gen)
    return x, torch.roll(x, -1, 1)  # predict the next token of a cyclic sequence: learnable


def probe_batch() -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(torch.Generator().manual_seed(123), size=8)


def train_batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [make_batch(gen) for _ in range(n)]


def build():
    """The documented spec: (model, loss_fn, probe_batch, train_batches)."""
    return make_model(), lm_loss, probe_batch(), train_batches(8)


def build_dict():
    return {"model": make_model(), "loss_fn": lm_loss, "probe_batch": probe_batch()}


def build_probe_only():
    return make_model(), lm_loss, probe_batch()


def build_wrong_type():
    return 42


def build_too_short():
    return make_model(), lm_loss


def build_not_a_module():
    return "model", lm_loss, probe_batch()


def build_raises():
    raise RuntimeError("the spec could not find its data")


def build_bad_loss():
    return make_model(), lambda m, b: m(b[0]).sum(-1), probe_batch()


def build_wider():
    torch.manual_seed(0)
    return TinyCausalLM(VOCAB, width=2 * WIDTH, depth=1, heads=2, context=CTX), lm_loss, probe_batch()


not_callable = 3


def train(out: str | Path, steps: int = 6, lr: float = 1e-2, formats=("pt", "ckpt", "safetensors")) -> list[Path]:
    """Train with Adam and save ``x_0 ... x_steps`` once per format, each with its step in metadata.

    ``pt``: ``{"model": state_dict, "step": t}``; ``ckpt``: Lightning's layout (``state_dict`` with
    a ``model.`` prefix, ``global_step``, ``optimizer_states``); ``safetensors``: header metadata
    ``{"step": t}``; ``hf``: not here (see tests/specs/tiny_gpt2.py).
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = make_model()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = train_batches(steps)
    written = []
    for t in range(steps + 1):
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if "pt" in formats:
            written.append(out / f"ckpt_{t:03d}.pt")
            torch.save({"model": sd, "step": t, "optimizer": opt.state_dict()}, written[-1])
        if "ckpt" in formats:
            written.append(out / f"epoch=0-step={t}.ckpt")
            torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "global_step": t, "epoch": 0,
                        "pytorch-lightning_version": "2.6.6", "optimizer_states": [opt.state_dict()]}, written[-1])
        if "safetensors" in formats:
            written.append(out / f"weights_{t}.safetensors")
            untied = {k: v for k, v in sd.items() if k != "head.weight"}  # tied to tok.weight, stored once
            save_file(untied, written[-1], metadata={"step": str(t)})
        if t < steps:
            loss = lm_loss(model, batches[t])
            loss.backward()
            opt.step()
            opt.zero_grad()
    return written


if __name__ == "__main__":
    train(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 6)
