"""The Lightning and Hugging Face callbacks, with the real libraries on tiny models built from configs:
the run store fills, and training is bit-identical with and without the callback."""

from __future__ import annotations

import logging
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from landscape.measure import MeasureSettings
from landscape.store import load_run

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8)
RECIPES = ["sgd", "adam", "signsgd"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Two torch threads on a shared 2-core machine are slower than one (and the tests are tiny)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_importing_landscape_imports_neither_library():
    code = (
        "import sys, landscape, landscape.integrations, landscape.analyze, landscape.checkpoints, landscape.cli\n"
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------ Lightning

try:
    import lightning as L
except ImportError:  # pragma: no cover - the [lightning] extra is not installed
    L = None
needs_lightning = pytest.mark.skipif(L is None, reason="needs lightning (pip install 'landscape[lightning]')")


class TinyModule(L.LightningModule if L is not None else nn.Module):
    """A small MLP classifier with dropout (so a probe that moved the RNG would change training)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _lightning_fit(callbacks, steps=7, seed=0):
    L.seed_everything(seed, verbose=False)
    module = TinyModule()
    gen = torch.Generator().manual_seed(seed)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=gen), torch.randint(0, 3, (64,), generator=gen))
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(seed))
    trainer = L.Trainer(
        max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, callbacks=callbacks,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)
    return module, torch.randint(0, 10**6, (4,))


@pytest.fixture
def quiet_lightning():
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    yield
    for lg, level in zip(loggers, levels):
        lg.setLevel(level)


@needs_lightning
def test_lightning_callback_fills_the_store_and_leaves_training_bit_identical(tmp_path, quiet_lightning):
    from landscape.integrations.lightning import LandscapeCallback

    plain, rng_plain = _lightning_fit([])
    cb = LandscapeCallback(tmp_path / "run", every=3, recipes=RECIPES, settings=FAST)
    probed, rng_probed = _lightning_fit([cb])
    for (name, a), b in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(rng_plain, rng_probed), "the global RNG stream differs"

    run = load_run(tmp_path / "run")
    assert run.steps("steps") == list(range(1, 8))
    assert run.steps() == [1, 3, 6]
    assert run.directions == RECIPES + ["adamw (trained)"]
    assert run.meta["optimizer"]["class"] == "AdamW" and run.meta["integration"] == "lightning"
    losses = run.columns("steps")["loss"]
    assert all(0 < v < 10 for v in losses), losses
    assert list(run.columns("steps")["lr"]) == [1e-2] * 7  # read from the trainer's optimizer at every step
    assert run.meta["optimizer"]["hyperparameters"]["lr"] == 1e-2
    assert run.steps("smoothness") == [1, 3, 6]
    # the probe measured the point before each step: the trained direction is the real AdamW step
    sharp = {r["direction"]: r for r in run.rows("sharpness", step=3)}
    assert sharp["adamw (trained)"]["update_norm"] > 0


@needs_lightning
def test_lightning_callback_with_a_user_probe_batch_and_loss(tmp_path, quiet_lightning):
    from landscape.integrations.lightning import LandscapeCallback

    gen = torch.Generator().manual_seed(5)
    batch = (torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    calls = []

    def loss_fn(module, b):
        calls.append(1)
        return nn.functional.cross_entropy(module.net(b[0]), b[1])

    cb = LandscapeCallback(tmp_path / "run", loss_fn=loss_fn, probe_batch=batch, every=2, recipes=["sgd"], settings=FAST)
    _lightning_fit([cb], steps=2)
    run = load_run(tmp_path / "run")
    assert run.steps() == [1, 2] and calls
    L.seed_everything(0, verbose=False)
    initial = TinyModule().eval()  # the parameters before the first step, as _lightning_fit builds them
    with torch.no_grad():
        expected = float(loss_fn(initial, batch))
    assert run.rows("sharpness", step=1, direction="sgd")[0]["loss"] == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------------------------------ transformers

def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_hf = pytest.mark.skipif(not _has("transformers", "accelerate"),
                              reason="needs transformers and accelerate (pip install 'landscape[hf]')")


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=48, length=12, vocab=50, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_train(tmp_path, callbacks, steps=5, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf_out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", seed=seed,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(seed=seed), callbacks=callbacks)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    return model, torch.randint(0, 10**6, (4,))


@needs_hf
def test_hf_callback_fills_the_store_and_leaves_training_bit_identical(tmp_path):
    from landscape.integrations.transformers import LandscapeCallback

    plain, rng_plain = _hf_train(tmp_path, [])
    cb = LandscapeCallback(tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
    probed, rng_probed = _hf_train(tmp_path, [cb])
    for (name, a), b in zip(plain.named_parameters(), probed.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(rng_plain, rng_probed), "the global RNG stream differs"
    assert probed.training  # modes restored (dropout on in GPT-2)

    run = load_run(tmp_path / "run")
    assert run.steps("steps") == [1, 2, 3, 4, 5]
    assert run.steps() == [1, 2, 4]
    assert run.directions == RECIPES + ["adamw (trained)"]
    assert run.meta["integration"] == "transformers"
    losses = run.columns("steps")["loss"]
    assert all(2 < v < 6 for v in losses), losses  # ≈ ln(50) for an untrained 50-token model
    rows = {r["direction"]: r for r in run.rows("sharpness", step=2)}
    assert set(rows) == set(run.directions)
    assert all(torch.isfinite(torch.tensor(r["sharpness"])) for r in rows.values())
    assert cb._hook is None  # the loss hook is removed at the end of training


# ------------------------------------------------------------------------------------------ resume


@needs_hf
def test_hf_resume_from_a_checkpoint_continues_the_probe_on_the_same_trajectory(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from landscape.integrations.transformers import PROBE_STATE_FILE, LandscapeCallback

    hf_logging.set_verbosity_error()

    def fit(out, hf_out, resume=None, probed=True):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32,
                                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        args = TrainingArguments(
            output_dir=str(hf_out), max_steps=6, per_device_train_batch_size=4, learning_rate=5e-3, report_to=[],
            use_cpu=True, save_strategy="steps", save_steps=3, logging_strategy="no", seed=0,
            dataloader_num_workers=0, disable_tqdm=True,
        )
        cb = LandscapeCallback(out, every=2, recipes=RECIPES, settings=FAST) if probed else None
        trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[cb] if probed else [])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.train(resume_from_checkpoint=resume)
        return cb

    fit(tmp_path / "ref", tmp_path / "hf_ref")
    fit(tmp_path / "run", tmp_path / "hf")  # a first run that went on to step 6 ...
    assert (tmp_path / "hf" / "checkpoint-3" / PROBE_STATE_FILE).is_file()
    fit(tmp_path / "run", tmp_path / "hf", resume=str(tmp_path / "hf" / "checkpoint-3"))  # ... resumed at step 3
    a, b = load_run(tmp_path / "ref"), load_run(tmp_path / "run")
    assert b.steps("steps") == a.steps("steps") == list(range(1, 7)) and b.steps() == a.steps() == [1, 2, 4, 6]
    assert any("resumed after step 3" in e["message"] for e in b.events())
    ca, cb_ = a.columns("sharpness"), b.columns("sharpness")
    torch.testing.assert_close(torch.tensor(cb_["sharpness"]), torch.tensor(ca["sharpness"]), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(torch.tensor(cb_["update_norm"]), torch.tensor(ca["update_norm"]), rtol=1e-4, atol=0)
    # the callback joining a run resumed from a checkpoint written without it: a new folder from step 4
    fit(None, tmp_path / "plain", probed=False)
    fit(tmp_path / "joined", tmp_path / "plain", resume=str(tmp_path / "plain" / "checkpoint-3"))
    c = load_run(tmp_path / "joined")
    assert c.steps("steps") == [4, 5, 6] and c.steps() == [4, 6] and c.meta["start_step"] == 3
    for step in (4, 6):  # the real step is the trained optimizer's own: as the whole run measured it
        (ra,) = [r for r in a.rows("sharpness", step=step) if r["direction"].endswith("(trained)")]
        (rc,) = [r for r in c.rows("sharpness", step=step) if r["direction"].endswith("(trained)")]
        torch.testing.assert_close(rc["sharpness"], ra["sharpness"], rtol=1e-4, atol=1e-7)


@needs_lightning
def test_lightning_resume_from_a_checkpoint_continues_the_probe_on_the_same_trajectory(tmp_path, quiet_lightning):
    from landscape.integrations.lightning import LandscapeCallback

    def fit(out, ckdir, steps, resume=None, probed=True):
        L.seed_everything(0, verbose=False)
        module = TinyModule()
        module.net[2].p = 0.0  # no dropout: the resumed RNG stream need not match
        gen = torch.Generator().manual_seed(0)
        data = torch.utils.data.TensorDataset(torch.randn(24, 6, generator=gen), torch.randint(0, 3, (24,), generator=gen))
        loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)  # 3 steps an epoch
        ck = L.pytorch.callbacks.ModelCheckpoint(dirpath=ckdir, every_n_train_steps=3, save_top_k=-1)
        cb = [LandscapeCallback(out, every=2, recipes=RECIPES, settings=FAST)] if probed else []
        trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, callbacks=[*cb, ck],
                            enable_progress_bar=False, enable_model_summary=False, deterministic=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(module, loader, ckpt_path=resume)

    fit(tmp_path / "ref", tmp_path / "ck_ref", 6)
    fit(tmp_path / "run", tmp_path / "ck", 6)
    resume = next((tmp_path / "ck").glob("*step=3.ckpt"))
    fit(tmp_path / "run", tmp_path / "ck", 6, resume=str(resume))
    a, b = load_run(tmp_path / "ref"), load_run(tmp_path / "run")
    assert b.steps("steps") == a.steps("steps") == list(range(1, 7)) and b.steps() == a.steps() == [1, 2, 4, 6]
    assert any("resumed after step 3" in e["message"] for e in b.events())
    ca, cb_ = a.columns("sharpness"), b.columns("sharpness")
    torch.testing.assert_close(torch.tensor(cb_["sharpness"]), torch.tensor(ca["sharpness"]), rtol=1e-5, atol=1e-8)
    # the callback joining a run resumed from a checkpoint written without it: a new folder from step 4
    fit(None, tmp_path / "ck_plain", 6, probed=False)
    resume = next((tmp_path / "ck_plain").glob("*step=3.ckpt"))
    fit(tmp_path / "joined", tmp_path / "ck_plain", 6, resume=str(resume))
    c = load_run(tmp_path / "joined")
    assert c.steps("steps") == [4, 5, 6] and c.steps() == [4, 6] and c.meta["start_step"] == 3
    for step in (4, 6):
        (ra,) = [r for r in a.rows("sharpness", step=step) if r["direction"].endswith("(trained)")]
        (rc,) = [r for r in c.rows("sharpness", step=step) if r["direction"].endswith("(trained)")]
        torch.testing.assert_close(rc["sharpness"], ra["sharpness"], rtol=1e-5, atol=1e-8)
