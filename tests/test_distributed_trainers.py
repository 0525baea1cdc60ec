"""The Lightning and Hugging Face callbacks inside a two-process DDP job (gloo, CPU), started as torchrun
starts its ranks: each trainer finds the job in the environment and runs DDP; the callback's probe on
every rank divides the recipes, and rank 0 alone writes the store. Training is the same with and without
the callback."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from landscape.store import load_run
from tests.test_distributed import _free_port

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "_dist_trainers.py"
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _run(which: str, folder: Path, mode: str, world: int = 2, timeout: float = 240) -> list[dict]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "GROUP_RANK": "0", "NODE_RANK": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT), "TORCHELASTIC_RUN_ID": "landscape-test"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), which, str(folder), mode],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    errs = []
    try:
        for p in procs:
            errs.append(p.communicate(timeout=timeout)[1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    results = []
    for r in range(world):
        f = folder / f"{which}-{mode}-result-{r}.json"
        assert f.is_file(), f"rank {r} wrote no result:\n{errs[r][-3000:]}"
        res = json.loads(f.read_text())
        assert "crash" not in res, f"rank {r}: {res['traceback']}\n{errs[r][-2000:]}"
        results.append(res)
    return results


def _check(which: str, folder: Path) -> None:
    plain = _run(which, folder, "plain")
    probed = _run(which, folder, "probed")
    assert [r["world"] for r in probed] == [2, 2]
    assert all(r["disabled"] is None for r in probed), [r["disabled"] for r in probed]
    # DDP keeps the replicas equal, and the callback changed nothing of training
    assert probed[0]["params"] == probed[1]["params"] == plain[0]["params"]
    run = load_run(folder / f"{which}-run")
    assert run.meta["distributed"]["world"] == 2
    assert run.steps("steps") == [1, 2, 3, 4] and run.steps() == [1, 2, 4]
    directions = {r["direction"] for r in run.rows("sharpness", step=2)}
    assert set(run.meta["recipes"]) <= directions and any(d.endswith("(trained)") for d in directions)
    assert all(r["sharpness"] == r["sharpness"] for r in run.rows("sharpness"))  # measured, not NaN
    assert not list(folder.glob(f"{which}-run/*.tmp"))


@pytest.mark.skipif(importlib.util.find_spec("lightning") is None, reason="needs lightning")
def test_lightning_callback_under_ddp(tmp_path):
    _check("lightning", tmp_path)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_hf_callback_under_ddp(tmp_path):
    _check("hf", tmp_path)
