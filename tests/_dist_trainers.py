"""The trainer callbacks under DDP: one rank of a two-process gloo job on CPU, started like torchrun
(RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK in the environment) by tests/test_distributed_trainers.py.

    python tests/_dist_trainers.py {lightning|hf} FOLDER {probed|plain}

Each rank writes FOLDER/<trainer>-<mode>-result-<rank>.json: the trained parameters, the probe's state.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import torch
from torch import nn

from landscape.measure import MeasureSettings

RECIPES = ["sgd", "adam", "signsgd", "lion"]
FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=10, coord_per_layer=4)
STEPS = 4


def lightning(folder: Path, probed: bool) -> dict:
    import lightning as L

    from landscape.integrations.lightning import LandscapeCallback

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-2)

    L.seed_everything(0, verbose=False)
    module = Module()
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)
    cb = LandscapeCallback(folder / "lightning-run", every=2, recipes=RECIPES, settings=FAST) if probed else None
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[cb] if cb is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    out = {"params": [p.detach().tolist() for p in module.parameters()], "world": trainer.world_size}
    if cb is not None:
        out["disabled"] = cb.probe.disabled if cb.probe is not None else "no probe"
        out["recipes"] = cb.probe._shards[trainer.global_rank] if cb.probe is not None else None
    return out


class Tokens(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        ids = torch.randint(0, 50, (16,), generator=g)
        return {"input_ids": ids, "labels": ids}


def hf(folder: Path, probed: bool) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from landscape.integrations.transformers import LandscapeCallback

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    args = TrainingArguments(output_dir=str(folder / f"hf-out-{probed}"), max_steps=STEPS, per_device_train_batch_size=4,
                             learning_rate=5e-3, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True, ddp_backend="gloo")
    cb = LandscapeCallback(folder / "hf-run", every=2, recipes=RECIPES, settings=FAST) if probed else None
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=[cb] if cb is not None else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    out = {"params": [p.detach().tolist() for p in model.parameters()], "world": args.world_size}
    if cb is not None:
        out["disabled"] = cb.probe.disabled if cb.probe is not None else "no probe"
    return out


def main() -> None:
    which, folder, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    rank = int(os.environ["RANK"])
    try:
        result = {"lightning": lightning, "hf": hf}[which](folder, mode == "probed")
    except BaseException as e:  # noqa: BLE001 - reported to the test
        result = {"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
    (folder / f"{which}-{mode}-result-{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
