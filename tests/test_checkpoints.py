"""Reading checkpoints: every format, the step in metadata or name, key matching, and refusing what
is unsafe, corrupt or does not fit, with messages that name the problem."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pickle
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from landscape.checkpoints import (
    CheckpointError,
    UnsafeCheckpointError,
    describe_checkpoint,
    find_checkpoints,
    fit_state_dict,
    load_checkpoint,
    order_checkpoints,
    step_from_name,
)
from tests.specs import tiny_lm

needs_safetensors = pytest.mark.skipif(importlib.util.find_spec("safetensors") is None, reason="needs safetensors")
needs_hf = pytest.mark.skipif(
    importlib.util.find_spec("transformers") is None or importlib.util.find_spec("safetensors") is None,
    reason="needs transformers and safetensors",
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.out = nn.Linear(4, 2)


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ names and steps


@pytest.mark.parametrize(
    ("name", "step"),
    [
        ("epoch=1-step=250.ckpt", 250),
        ("ckpt_0040.pt", 40),
        ("model_step_7.pth", 7),
        ("global_step300.bin", 300),
        ("checkpoint-1500", 1500),
        ("iter_12.safetensors", 12),
        ("run3_epoch2_iteration9.pt", 9),
        ("weights_v2_18.pt", 18),
        ("last.pt", None),
    ],
)
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_find_checkpoints_expands_folders_globs_and_hf_folders(tmp_path):
    sd = state(Net())
    for name in ("a_1.pt", "a_2.pth", "b_3.ckpt", "notes.txt"):
        torch.save(sd, tmp_path / name) if name != "notes.txt" else (tmp_path / name).write_text("x")
    hf = tmp_path / "checkpoint-9"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    torch.save(sd, hf / "pytorch_model.bin")
    (tmp_path / "empty").mkdir()
    found = find_checkpoints([tmp_path])
    assert [p.name for p in found] == ["a_1.pt", "a_2.pth", "b_3.ckpt", "checkpoint-9"]
    assert [p.name for p in find_checkpoints([str(tmp_path / "a_*")])] == ["a_1.pt", "a_2.pth"]
    assert find_checkpoints([hf]) == [hf]
    assert len(find_checkpoints([tmp_path / "a_1.pt", str(tmp_path / "a_*")])) == 2  # duplicates dropped
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        find_checkpoints([tmp_path / "nope.pt"])
    with pytest.raises(CheckpointError, match=r"no checkpoint matches '.*zz\*'"):
        find_checkpoints([str(tmp_path / "zz*")])
    with pytest.raises(CheckpointError, match="no checkpoints in folder .*empty"):
        find_checkpoints([tmp_path / "empty"])
    with pytest.raises(CheckpointError, match="unknown checkpoint format '.txt'"):
        find_checkpoints([tmp_path / "notes.txt"])


def _described(tmp_path, files: dict[str, dict]) -> list:
    out = []
    for i, (name, obj) in enumerate(files.items()):
        torch.save(obj, tmp_path / name)
        os.utime(tmp_path / name, (time.time() - 100 + i, time.time() - 100 + i))
        out.append(describe_checkpoint(tmp_path / name))
    return out


def test_ordering_by_step_name_and_mtime(tmp_path):
    sd = state(Net())
    cks = _described(tmp_path, {"c.pt": {"model": sd, "step": 5}, "a_10.pt": {"model": sd}, "b_2.pt": sd})
    assert [(c.step, c.step_source) for c in cks] == [(5, "metadata"), (10, "name"), (2, "name")]
    assert [(s, c.path.name) for s, c in order_checkpoints(cks, "step")] == [(2, "b_2.pt"), (5, "c.pt"), (10, "a_10.pt")]
    # by name: the steps do not increase along that order, so the checkpoints are numbered by position
    assert [(s, c.path.name) for s, c in order_checkpoints(cks, "name")] == [(0, "a_10.pt"), (1, "b_2.pt"), (2, "c.pt")]
    assert [c.path.name for _, c in order_checkpoints(cks, "mtime")] == ["c.pt", "a_10.pt", "b_2.pt"]
    natural = _described(tmp_path, {"x_10.pt": sd, "x_9.pt": sd})
    assert [(s, c.path.name) for s, c in order_checkpoints(natural, "name")] == [(9, "x_9.pt"), (10, "x_10.pt")]


def test_ordering_refuses_duplicates_and_unknown_steps(tmp_path):
    sd = state(Net())
    dup = _described(tmp_path, {"epoch=0-step=4.ckpt": {"state_dict": sd, "global_step": 4}, "last.ckpt": {"state_dict": sd, "global_step": 4}})
    with pytest.raises(CheckpointError, match="two checkpoints have step 4: .*epoch=0-step=4.ckpt and .*last.ckpt"):
        order_checkpoints(dup, "step")
    nostep = _described(tmp_path, {"final.pt": sd})
    with pytest.raises(CheckpointError, match="cannot tell the step of .*final.pt.*--order name or --order mtime"):
        order_checkpoints(nostep, "step")
    assert order_checkpoints(nostep, "mtime")[0][0] == 0
    with pytest.raises(CheckpointError, match="unknown order 'size'"):
        order_checkpoints(nostep, "size")


# ------------------------------------------------------------------------------------------ formats


@pytest.mark.parametrize("layout", ["state_dict", "model", "state_dict_key", "model_state_dict"])
def test_pytorch_layouts(tmp_path, layout):
    net = Net()
    sd = state(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.25, momentum=0.9)
    obj = {
        "state_dict": sd,
        "model": {"model": sd, "step": 12, "optimizer": opt.state_dict()},
        "state_dict_key": {"state_dict": sd, "global_step": 12},
        "model_state_dict": {"model_state_dict": sd, "iteration": 12},
    }[layout]
    torch.save(obj, tmp_path / "w.pt")
    loaded = load_checkpoint(tmp_path / "w.pt")
    assert same(loaded.state_dict, sd)
    assert loaded.step == (None if layout == "state_dict" else 12)
    if layout == "model":
        assert loaded.lr == 0.25 and loaded.hyperparameters["momentum"] == 0.9 and "params" not in loaded.hyperparameters


def test_the_legacy_non_zip_format(tmp_path):
    sd = state(Net())
    torch.save({"model": sd, "step": 4}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert describe_checkpoint(tmp_path / "old.pt").step == 4  # not memory-mappable: read in full
    assert same(load_checkpoint(tmp_path / "old.pt").state_dict, sd)


def test_a_dict_without_a_state_dict_is_named(tmp_path):
    torch.save({"weights": {"a": 1}, "epoch": 3}, tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"holds a dict with keys \['weights', 'epoch'\] but no state_dict"):
        load_checkpoint(tmp_path / "w.pt")


def test_lightning_checkpoint_from_a_real_trainer(tmp_path):
    L = pytest.importorskip("lightning")

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.05) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.model = Net()

        def training_step(self, batch, i):
            return self.model.out(self.model.fc(batch[0])).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    torch.manual_seed(0)
    module = Module()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(8, 3)), batch_size=4)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, loader)
    trainer.save_checkpoint(tmp_path / "epoch=0-step=2.ckpt")
    ck = describe_checkpoint(tmp_path / "epoch=0-step=2.ckpt")  # weights_only=True reads it
    assert (ck.format, ck.step, ck.step_source) == ("lightning", 2, "metadata")
    loaded = load_checkpoint(ck.path)
    assert loaded.lr == 0.05
    net = Net()
    fitted = fit_state_dict(net, loaded.state_dict)  # the module's 'model.' prefix is removed
    assert same(fitted, state(module.model))


@needs_safetensors
def test_safetensors_with_and_without_a_step(tmp_path):
    from safetensors.torch import save_file

    sd = state(Net())
    save_file(sd, tmp_path / "a.safetensors", metadata={"step": "30"})
    save_file(sd, tmp_path / "weights_step_7.safetensors")
    assert describe_checkpoint(tmp_path / "a.safetensors").step == 30
    assert describe_checkpoint(tmp_path / "weights_step_7.safetensors").step_source == "name"
    loaded = load_checkpoint(tmp_path / "a.safetensors")
    assert same(loaded.state_dict, sd) and loaded.step == 30 and loaded.format == "safetensors"


@needs_hf
@pytest.mark.parametrize("sharded", [False, True])
def test_hf_save_pretrained_folder_with_tied_weights(tmp_path, sharded):
    from tests.specs import tiny_gpt2

    model = tiny_gpt2.make_model(seed=3)
    folder = tmp_path / "checkpoint-40"
    model.save_pretrained(folder, max_shard_size="8KB" if sharded else "5GB")
    assert (folder / "model.safetensors.index.json").exists() == sharded
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 41}))
    ck = describe_checkpoint(folder)
    assert (ck.format, ck.step, ck.step_source) == ("hf", 41, "metadata")
    loaded = load_checkpoint(folder)
    assert "lm_head.weight" not in loaded.state_dict  # tied to the token embedding: stored once
    fresh = tiny_gpt2.make_model(seed=4)
    fitted = fit_state_dict(fresh, loaded.state_dict)
    assert same(fitted, state(model))


# ------------------------------------------------------------------------------------------ key matching


def test_fit_state_dict_strips_or_adds_one_prefix():
    net = Net()
    sd = state(net)
    assert same(fit_state_dict(net, {f"module.{k}": v for k, v in sd.items()}), sd)
    wrapper = nn.Sequential()
    wrapper.add_module("model", Net())
    assert same(fit_state_dict(wrapper, sd), {f"model.{k}": v for k, v in sd.items()})


def test_fit_state_dict_names_missing_unexpected_and_misshaped_keys():
    net = Net()
    sd = state(net)
    missing = {k: v for k, v in sd.items() if k != "out.bias"}
    with pytest.raises(CheckpointError, match=r"ck.pt does not fit the model: missing keys \['out.bias'\]"):
        fit_state_dict(net, missing, "ck.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['extra.weight'\]"):
        fit_state_dict(net, {**sd, "extra.weight": torch.zeros(1)})
    bad = {**sd, "fc.weight": torch.zeros(5, 3)}
    with pytest.raises(CheckpointError, match=r"mis-shaped 'fc.weight' is \(5, 3\) in the checkpoint but \(4, 3\) in the model"):
        fit_state_dict(net, bad)
    nan = {**sd, "bn.running_var": torch.full((4,), float("nan"))}
    with pytest.raises(CheckpointError, match=r"non-finite weights \(NaN or inf\) in \['bn.running_var'\]"):
        fit_state_dict(net, nan)


def test_fit_state_dict_accepts_a_missing_tied_twin():
    model = tiny_lm.make_model()
    sd = {k: v for k, v in state(model).items() if k != "head.weight"}
    fitted = fit_state_dict(model, sd)
    assert torch.equal(fitted["head.weight"], fitted["tok.weight"])
    untied = nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="missing keys"):
        fit_state_dict(untied, {"weight": torch.zeros(2, 2)})


# ------------------------------------------------------------------------------------------ safety


class _Payload:
    """Unpickling this runs ``os.system`` (touches a marker file)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("how", ["torch.save", "pickle-2", "pickle-5"])
def test_a_pickle_that_would_run_code_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(2)}, "x": _Payload(marker)}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(how[-1]))
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil.pt: unpickling it would import (posix|os)\.system"):
        describe_checkpoint(path)
    with pytest.raises(UnsafeCheckpointError, match="--trust-checkpoints"):
        load_checkpoint(path)
    assert not marker.exists()


def test_trust_allows_a_full_pickle(tmp_path):
    sd = state(Net())
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1), "step": 3}, tmp_path / "full.pt")
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_checkpoint(tmp_path / "full.pt")
    loaded = load_checkpoint(tmp_path / "full.pt", trust=True)
    assert same(loaded.state_dict, sd) and loaded.step == 3


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_and_truncated_files(tmp_path, damage):
    path = tmp_path / "w.pt"
    torch.save({"model": state(Net()), "step": 1}, path)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint " * 20, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"cannot read .*w.pt: corrupt or truncated"):
        describe_checkpoint(path)


@needs_safetensors
def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(state(Net()), path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"cannot read .*w.safetensors: corrupt or truncated safetensors file"):
        describe_checkpoint(path)
