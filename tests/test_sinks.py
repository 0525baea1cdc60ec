"""Experiment-tracker sinks (landscape.sinks), with the real libraries, offline.

The reference for every value a tracker received is the run store of the same probe (the source of
truth): each test reads the tracker's own files back (TensorBoard event files through
``tensorboard.backend.event_processing``, a wandb offline run's ``.wandb`` transaction log, an MLflow
file store) and compares them with the stored rows.
"""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from landscape.measure import MeasureSettings
from landscape.probe import Probe
from landscape.sinks import (
    FunctionSink,
    Sink,
    SinkSet,
    TensorBoardSink,
    as_sink,
    measurement_histograms,
    measurement_scalars,
    tag_name,
)
from landscape.store import load_run

FAST = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=2, hist_bins=8,
                       robust_every=2, robust_samples=2)
RECIPES = ["sgd", "adam", "signsgd"]


def _has(*modules: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in modules)


needs_tb = pytest.mark.skipif(not _has("tensorboard"), reason="needs tensorboard (pip install 'landscape[tensorboard]')")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def _loss(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _train(tmp_path, sinks=None, steps=6, every=2, name="run"):
    """A probed run; returns (model, run)."""
    model = _model()
    gen = torch.Generator().manual_seed(1)
    probe_batch = (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, _loss, probe_batch, out=tmp_path / name, every=every, recipes=RECIPES, settings=FAST,
               sinks=sinks) as probe:
        probe.attach(opt)
        for _ in range(steps):
            batch = (torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            loss = _loss(model, batch)
            loss.backward()
            probe.log_loss(loss)
            opt.step()
            opt.zero_grad()
    return model, load_run(tmp_path / name)


def _expected(run):
    """{step: {tag: value}} and {step: {tag: (edges, counts)}} computed from the run store."""
    scalars, hists = {}, {}
    for step in run.steps():
        rows = {t: run.rows(t, step=step) for t in ("sharpness", "lines", "histograms", "smoothness", "robust")}
        scalars[step] = measurement_scalars(rows)
        hists[step] = measurement_histograms(rows)
    return scalars, hists


def _tb_scalars(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    scalars = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    hists = {tag: {e.step: e.histogram_value for e in acc.Histograms(tag)} for tag in acc.Tags()["histograms"]}
    return scalars, hists


def _assert_tb_matches_store(folder, run, prefix=""):
    got, got_h = _tb_scalars(folder)
    want, want_h = _expected(run)
    tags = {t for per in want.values() for t in per}
    assert tags and {f"{prefix}{t}" for t in tags} <= set(got), sorted({f"{prefix}{t}" for t in tags} - set(got))[:5]
    for step, per in want.items():
        for tag, value in per.items():
            assert got[f"{prefix}{tag}"][step] == pytest.approx(value, rel=1e-6, abs=1e-30), (tag, step)
    for step, per in want_h.items():
        for tag, (edges, counts) in per.items():
            h = got_h[f"{prefix}{tag}"][step]
            assert list(h.bucket) == [float(c) for c in counts], (tag, step)
            np.testing.assert_allclose(h.bucket_limit, edges[1:], rtol=1e-6)
            assert h.num == counts.sum() and h.min == pytest.approx(edges[0])
    return got


# ------------------------------------------------------------------------------------------ the tags


def test_tags_are_the_documented_ones():
    rows = {
        "sharpness": [
            {"direction": "sgd", "sharpness": 2.0, "ratio_to_sgd": 1.0, "grad_correlation": 0.5, "best_step": 0.25,
             "loss": 1.5},
            {"direction": "adam (trained)", "sharpness": -1.0, "ratio_to_sgd": None, "grad_correlation": float("nan"),
             "best_step": None, "loss": 1.5},
        ],
        "lines": [{"direction": "sgd", "best_step": 0.3, "reduction": 0.1}],
        "smoothness": [{"l_hat": 7.0, "grad_norm": 2.0}],
        "robust": [{"top_eig": 9.0, "ratio": 3.0}],
        "histograms": [{"direction": "sgd", "edges": np.linspace(-3, 0, 4), "counts": np.array([1, 0, 2])},
                       {"direction": "adam (trained)", "edges": np.zeros(4), "counts": np.zeros(3, dtype=np.int64)}],
    }
    assert measurement_scalars(rows) == {
        "landscape/sharpness/sgd": 2.0, "landscape/ratio_to_sgd/sgd": 1.0, "landscape/grad_projection/sgd": 0.5,
        "landscape/best_step/sgd": 0.25, "landscape/sharpness/adam_trained": -1.0, "landscape/probe_loss": 1.5,
        "landscape/line_best_step/sgd": 0.3, "landscape/line_reduction/sgd": 0.1, "landscape/l_hat": 7.0,
        "landscape/probe_grad_norm": 2.0, "landscape/top_eig": 9.0, "landscape/robust_ratio": 3.0,
    }  # the undefined ratio, the missing best step and the NaN projection are left out
    hists = measurement_histograms(rows)
    assert list(hists) == ["landscape/update_log10_abs/sgd"]  # an all-zero update has no histogram
    assert tag_name("adam (trained)") == "adam_trained" and tag_name("checkpoint step") == "checkpoint_step"
    assert tag_name("adam_clip_update") == "adam_clip_update"


def test_importing_landscape_imports_no_tracker():
    code = (
        "import sys, landscape, landscape.sinks, landscape.race, landscape.race_plots, landscape.demo_cnn, landscape.cli\n"
        "bad = [m for m in ('tensorboard', 'torch.utils.tensorboard', 'tensorboardX', 'wandb', 'mlflow', 'sklearn')"
        " if m in sys.modules]\n"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_as_sink_refuses_what_it_cannot_write_to_in_one_line(tmp_path):
    with pytest.raises(TypeError, match="cannot write to a object; pass a torch.utils.tensorboard SummaryWriter"):
        as_sink(object())
    with pytest.raises(TypeError, match="cannot write to a int"):
        Probe(_model(), _loss, (torch.randn(2, 4), torch.tensor([0, 1])), out=tmp_path / "r", sinks=[3])
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------------------ failures


def test_a_failing_sink_is_switched_off_alone_and_training_goes_on(tmp_path):
    calls = {"bad": 0}
    got = {}

    def bad(step, scalars, histograms):
        calls["bad"] += 1
        raise OSError("tracker unreachable")

    def good(step, scalars, histograms):
        got[step] = dict(scalars)

    plain, _ = _train(tmp_path, name="plain")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed, run = _train(tmp_path, sinks=[bad, good])
    for a, b in zip(plain.parameters(), probed.parameters()):
        assert torch.equal(a, b)  # training unchanged
    assert calls["bad"] == 1  # switched off after its first failure
    mine = [w for w in caught if "sink" in str(w.message)]
    assert len(mine) == 1 and "tracker unreachable" in str(mine[0].message), [str(w.message) for w in caught]
    events = [e for e in run.events() if e["kind"] == "sink-failure"]
    assert len(events) == 1 and events[0]["step"] == 1 and "OSError: tracker unreachable" in events[0]["message"]
    want, _ = _expected(run)
    assert got == want  # the good sink got every measurement, equal to the store
    assert run.steps() == [1, 2, 4, 6]  # and the store everything


def test_sink_set_reports_flush_failures_and_never_raises():
    class Broken(Sink):
        name = "broken"

        def write_scalars(self, step, scalars):
            pass

        def flush(self):
            raise RuntimeError("disk gone")

    events = []
    sinks = SinkSet([Broken()])
    with pytest.warns(RuntimeWarning, match="sink broken failed .close.: RuntimeError: disk gone"):
        sinks.close(lambda kind, message: events.append((kind, message)))
    assert events and events[0][0] == "sink-failure" and not sinks
    sinks.close()  # closing twice is a no-op


# ------------------------------------------------------------------------------------------ TensorBoard


@needs_tb
def test_probe_to_tensorboard_reads_back_equal_to_the_store(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tmp_path / "tb"))
    _, run = _train(tmp_path, sinks=[writer])
    writer.close()
    got = _assert_tb_matches_store(tmp_path / "tb", run)
    assert sorted(got["landscape/sharpness/adam_trained"]) == [1, 2, 4, 6]
    assert sorted(got["landscape/top_eig"]) == [1, 4]  # robust_every=2: the 1st and 3rd measurements
    assert "landscape/l_hat" in got


@needs_tb
def test_export_replays_a_run_into_tensorboard_and_refuses_to_do_it_twice(tmp_path):
    from typer.testing import CliRunner

    from landscape.cli import app

    _, run = _train(tmp_path)
    result = CliRunner().invoke(app, ["export", str(run.path), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    got = _assert_tb_matches_store(tmp_path / "tb", run)
    losses = run.columns("steps")["loss"]
    assert [got["landscape/train_loss"][s] for s in range(1, 7)] == pytest.approx(list(losses), rel=1e-6)
    again = CliRunner().invoke(app, ["export", str(run.path), "--tensorboard", str(tmp_path / "tb")])
    assert again.exit_code == 2 and "already holds TensorBoard event files" in again.output
    assert len(again.output.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ wandb


def _wandb_records(run_dir: Path):
    """The records of a wandb offline run's ``.wandb`` file (LevelDB log format: 7-byte file header
    ``:W&B`` + magic + version, 32 KiB blocks, each record ``crc32 (4) | length (2) | type (1)``)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    records = []
    for raw in out:
        r = pb.Record()
        r.ParseFromString(raw)
        records.append(r)
    return records


@pytest.mark.skipif(not _has("wandb"), reason="needs wandb (pip install 'landscape[wandb]')")
@pytest.mark.parametrize("user_logs", [True, False], ids=["beside-the-users-steps", "alone"])
def test_probe_to_wandb_offline_reads_back_equal_to_the_store(tmp_path, monkeypatch, user_logs):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    wb = wandb.init(project="landscape-test", dir=str(tmp_path), mode="offline")
    model = _model()
    gen = torch.Generator().manual_seed(1)
    probe_batch = (torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with Probe(model, _loss, probe_batch, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST,
               sinks=[wb]) as probe:
        probe.attach(opt)
        for i in range(6):
            batch = (torch.randn(8, 4, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            loss = _loss(model, batch)
            loss.backward()
            opt.step()
            opt.zero_grad()
            if user_logs:
                wb.log({"my_loss": float(loss.detach())}, step=i)  # the user's own logging, with explicit steps
    run_dir = Path(wb.dir).parent
    wb.finish()
    run = load_run(tmp_path / "run")
    # wandb's service process may still be writing the file after finish() returns (seen under load:
    # no history record yet): wait until the records stop changing, for at most 60 s
    import time

    records, deadline = _wandb_records(run_dir), time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = _wandb_records(run_dir)
        done = any(r.WhichOneof("record_type") == "exit" for r in again)
        if len(again) == len(records) and done:
            break
        records = again
    history = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in r.history.item:  # a histogram's fields come as nested keys (tag, "bins"), (tag, "values")
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = row
                for k in parents:
                    node = node.setdefault(k, {})
                node[leaf] = json.loads(item.value_json)
            history.append(row)
    mine = {int(h["landscape/step"]): h for h in history if "landscape/step" in h}
    want, want_h = _expected(run)
    assert sorted(mine) == run.steps() == [1, 2, 4, 6]
    for step, per in want.items():
        for tag, value in per.items():
            assert mine[step][tag] == pytest.approx(value, rel=1e-12), (tag, step)
        for tag, (edges, counts) in want_h[step].items():
            assert mine[step][tag]["values"] == list(counts) and mine[step][tag]["bins"] == pytest.approx(list(edges))
    user = [h["my_loss"] for h in history if "my_loss" in h]
    assert len(user) == (6 if user_logs else 0)  # none of the user's logs was dropped for a step conflict


# ------------------------------------------------------------------------------------------ MLflow


@pytest.mark.skipif(not _has("mlflow"), reason="needs mlflow (pip install 'landscape[mlflow]')")
def test_probe_to_mlflow_file_store_reads_back_equal_to_the_store(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind a flag
    uri = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run() as active:
            _, run = _train(tmp_path, sinks=[active])
        client = mlflow.MlflowClient(uri)
        want, _ = _expected(run)
        for step, per in want.items():
            for tag, value in per.items():
                history = {m.step: m.value for m in client.get_metric_history(active.info.run_id, tag)}
                assert history[step] == pytest.approx(value, rel=1e-12), (tag, step)
        assert len(client.get_metric_history(active.info.run_id, "landscape/sharpness/adam")) == 4
    finally:
        mlflow.set_tracking_uri(None)


# ------------------------------------------------------------------------------------------ trainers


@needs_tb
@pytest.mark.skipif(not _has("lightning"), reason="needs lightning")
def test_lightning_callback_logs_through_the_trainers_loggers(tmp_path):
    import logging

    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from landscape.integrations.lightning import LandscapeCallback

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def training_step(self, batch, batch_idx):
            return _loss(self.net, batch)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    gen = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(48, 4, generator=gen), torch.randint(0, 3, (48,), generator=gen))
    tb = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    csv = CSVLogger(str(tmp_path), name="csv", version=0)
    cb = LandscapeCallback(tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
    trainer = L.Trainer(max_steps=5, accelerator="cpu", devices=1, logger=[tb, csv], enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[cb], log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=8))
    run = load_run(tmp_path / "run")
    assert run.steps() == [1, 2, 4]
    got = _assert_tb_matches_store(tmp_path / "tb" / "version_0", run)
    assert "landscape/update_log10_abs/sgd" in _tb_scalars(tmp_path / "tb" / "version_0")[1]
    assert sorted(got["landscape/sharpness/sgd"]) == run.steps()
    header = (tmp_path / "csv" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "landscape/sharpness/sgd" in header and "landscape/ratio_to_sgd/adam" in header


@needs_tb
@pytest.mark.skipif(not _has("transformers", "accelerate"), reason="needs transformers and accelerate")
def test_hf_callback_logs_through_the_trainers_report_to_integrations(tmp_path, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments
    from transformers.utils import logging as hf_logging

    from landscape.integrations.transformers import LandscapeCallback

    class TokenData(torch.utils.data.Dataset):
        def __init__(self):
            self.ids = torch.randint(0, 50, (24, 12), generator=torch.Generator().manual_seed(0))

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    hf_logging.set_verbosity_error()
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf_out"), max_steps=4, per_device_train_batch_size=4, learning_rate=5e-3,
        report_to=["tensorboard"], use_cpu=True, save_strategy="no",
        logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True,
    )
    cb = LandscapeCallback(tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[cb])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    assert cb.trainer is trainer
    run = load_run(tmp_path / "run")
    assert run.steps() == [1, 2, 4]
    folder = next(p.parent for p in (tmp_path / "tb").rglob("events.out.tfevents.*"))
    got = _assert_tb_matches_store(folder, run, prefix="train/")
    assert sorted(got["train/landscape/sharpness/adamw_trained"]) == [1, 2, 4]  # the Trainer's step = the probe's
    logged = [h for h in trainer.state.log_history if "landscape/sharpness/sgd" in h]
    assert [h["step"] for h in logged] == [1, 2, 4]
    assert not math.isnan(logged[0]["landscape/sharpness/sgd"])


def test_tensorboard_sink_refuses_a_non_writer():
    with pytest.raises(TypeError, match="TensorBoardSink needs a SummaryWriter"):
        TensorBoardSink(object())
    assert isinstance(as_sink(lambda step, scalars, histograms: None), FunctionSink)
