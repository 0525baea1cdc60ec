"""The probe batch goes to the model's device: a CPU batch for a model on a GPU is moved there once."""

from __future__ import annotations

from collections import namedtuple

import pytest
import torch
from torch import nn

from landscape.objective import MicroBatches, Objective, _model_device, _to_device

Pair = namedtuple("Pair", "x y")


def test_every_tensor_of_a_nested_batch_is_moved_and_the_structure_kept():
    meta = torch.device("meta")  # a second device on any machine: the move itself, without the values
    batch = {"ids": torch.arange(6).view(2, 3), "pair": Pair(torch.ones(2), [torch.zeros(3), 7]), "name": "b"}
    out = _to_device(batch, meta)
    assert out["ids"].device == meta and out["ids"].dtype == torch.int64 and out["ids"].shape == (2, 3)
    assert isinstance(out["pair"], Pair) and out["pair"].x.device == meta
    assert isinstance(out["pair"].y, list) and out["pair"].y[0].device == meta and out["pair"].y[1] == 7
    assert out["name"] == "b"
    assert batch["ids"].device.type == "cpu"  # the caller's batch is left as it was
    # already there: the very same objects, no copy
    assert _to_device(batch, torch.device("cpu")) is batch


def test_the_model_device_is_the_one_device_of_its_parameters():
    assert _model_device(nn.Linear(2, 2)) == torch.device("cpu")
    assert _model_device(nn.Linear(2, 2, device="meta")) is None
    two = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta"))
    assert _model_device(two) is None  # split over devices: left to the user's loss_fn


def test_a_cpu_objective_keeps_the_batch_and_its_micro_batch_weights():
    model = nn.Linear(3, 1)
    x = torch.randn(4, 3)
    mb = MicroBatches([(x[:1], x[:1, :1]), (x[1:], x[1:, :1])])
    obj = Objective(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), mb)
    assert obj.batches is mb and obj.batches.weights == [0.25, 0.75]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_probe_on_a_cuda_model_takes_a_cpu_batch(tmp_path):
    import landscape as ls
    from landscape.models import lm_loss
    from tests.test_probe import FAST, RECIPES, make

    model, pb, gen = make()
    model = model.cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    probe = ls.Probe(model, lm_loss, pb, out=tmp_path / "run", every=2, recipes=RECIPES, settings=FAST)
    assert all(t.is_cuda for t in probe.objective.batches[0])
    probe.attach(opt)
    for _ in range(3):
        x = torch.randint(0, 13, (4, 8), generator=gen).cuda()
        lm_loss(model, (x, torch.roll(x, -1, 1))).backward()
        opt.step()
        opt.zero_grad()
    probe.close()
    assert probe.last_error is None
    assert ls.load_run(tmp_path / "run").steps() == [1, 2]
