"""The probe under torch.distributed: two gloo processes on CPU, started by the test, against a one-process
run on the same global batches and probe batch (see landscape/distributed.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from landscape.store import load_run

WORKER = Path(__file__).with_name("_dist_worker.py")
ROOT = WORKER.parents[1]

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(scenario: str, folder: Path, world: int = 2, timeout: float = 120) -> tuple[list[dict], float, list[str]]:
    """Start ``world`` ranks of the worker like torchrun does; returns their results, the seconds until
    the last one ended, and their stderr."""
    port = _free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    procs = [subprocess.Popen([sys.executable, str(WORKER), scenario, str(folder)], env={**env, "RANK": str(r),
                              "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    errs = []
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            errs.append(err)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    seconds = time.monotonic() - t0
    results = []
    for r in range(world):
        f = folder / f"result-{r}.json"
        assert f.is_file(), f"rank {r} wrote no result:\n{errs[r][-3000:]}"
        results.append(json.loads(f.read_text()))
    for r, res in enumerate(results):
        assert "crash" not in res, f"rank {r}: {res.get('traceback')}\n{errs[r][-3000:]}"
    return results, seconds, errs


def _rel(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-12))) if a.size else 0.0


# ---------------------------------------------------------------------------------------------- sharding
def test_assign_recipes_balances_bytes_and_keeps_shared_states_together():
    from landscape.distributed import assign_recipes
    from landscape.optim import PseudoUpdates, recipe_names

    params = dict(torch.nn.Linear(20, 10).named_parameters())
    recipes = list(recipe_names())
    full = PseudoUpdates(params, recipes).state_bytes()
    assert assign_recipes(params, recipes, 1) == [recipes]
    for world in (2, 3, 4):
        parts = assign_recipes(params, recipes, world)
        assert sorted(r for p in parts for r in p) == sorted(recipes)  # each recipe on exactly one rank
        assert parts == assign_recipes(params, recipes, world)  # every rank computes the same split
        per_rank = [PseudoUpdates(params, p).state_bytes() if p else 0 for p in parts]
        print(f"world {world}: state bytes per rank / one process = {[round(b / full, 3) for b in per_rank]}")
        # the largest indivisible group of recipes bounds the balance: ≤ 1.25 × the ideal 1/world
        assert max(per_rank) <= 1.25 * full / world
    parts = assign_recipes(params, recipes, 2)
    # the raw-gradient EMA and Adam's v serve sgd, adam, adam_clip...: those recipes share one rank
    assert {"sgd", "adam", "adam_clip", "adam_clip_update", "normsgd", "signsgd"} <= set(parts[0])


# ------------------------------------------------------------------------------------- two gloo processes
@pytest.fixture(scope="module")
def ddp(tmp_path_factory):
    """The one-process reference, then the two-rank run (scenario ``ddp`` of tests/_dist_worker.py)."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from tests import _dist_worker as worker

    folder = tmp_path_factory.mktemp("ddp")
    worker.single(folder / "ref")
    shutil.copytree(folder / "ref", folder / "single")  # the folder the two ranks try to resume
    results, seconds, _ = _launch("ddp", folder)
    print(f"two-rank scenarios: {seconds:.1f} s")
    return folder, results, worker


# At the first measured step the two stores differ only by the float32 rounding of DDP's all-reduce
# (g₀ + g₁)/2 against the one-process mean over the global batch (~1e-7 relative).
FIRST_STEP_RTOL = 5e-6
# Later steps: that rounding is carried by the states. Unclipped recipes and the trained step keep it at
# ~1e-6; a top-k% clipping threshold or a sign that flips with it (the *_clip recipes, Lion's and Adam's
# clipped updates) can move a coordinate in or out of the clipped set and amplify it (4e-3 was measured
# for adafactor_clip after 6 steps on a GPT-2; 2e-6 on this model).
LATER_RTOL_UNCLIPPED = 2e-5
LATER_RTOL_CLIPPED = 5e-3
# The lines' points after the first two (s* and 2.5·s*) are placed by the bracketing search: a parabola's
# vertex through three losses that differ by ~1e-4 near a flat minimum moves by (loss rounding)/(their
# spread), so a 1e-7 difference in the losses moves a refined point by up to ~1e-4 relative (measured: 1e-4
# for the trained step, whose direction is a difference of two float32 points, 2e-5 for adam); the losses
# themselves are held to LATER_RTOL_*.
LINE_POINTS_RTOL = 1e-3
# Near a flat minimum that rounding can also flip the search's stopping test (seen with one OpenMP thread:
# adafactor_clip at step 4 ended with 6 points against 7). The lines then share their first points and
# their lowest loss, and their best steps agree to the 5% the search promises against a dense grid.
LINE_BEST_RTOL = 0.05


def _clipped(direction: str) -> bool:
    return "clip" in direction


def _assert_same_store(folder: Path, name: str) -> None:
    """The store ``folder/name`` written by two ranks against the one-process ``folder/ref``."""
    one, two = load_run(folder / "ref"), load_run(folder / name)
    assert two.settings == one.settings  # the same run, so it resumes and compares like one
    assert two.meta["distributed"]["world"] == 2
    assert one.steps() == two.steps() == [1, 2, 4]
    assert one.steps("steps") == two.steps("steps") == [1, 2, 3, 4, 5]
    assert [r["direction"] for r in two.rows("sharpness", step=1)] == [r["direction"] for r in one.rows("sharpness", step=1)]
    assert _rel([r["grad_norm"] for r in two.rows("steps")], [r["grad_norm"] for r in one.rows("steps")]) < 1e-6
    for step in one.steps():
        worst = {}
        for a, b in zip(two.rows("sharpness", step=step), one.rows("sharpness", step=step), strict=True):
            assert a["direction"] == b["direction"]
            assert (a["ratio_to_sgd"] is None) == (b["ratio_to_sgd"] is None)
            worst[a["direction"]] = max(_rel(a["sharpness"], b["sharpness"]), _rel(a["ratio_to_sgd"] or 0, b["ratio_to_sgd"] or 0),
                                        _rel(a["update_norm"], b["update_norm"]))
        for a, b in zip(two.rows("lines", step=step), one.rows("lines", step=step), strict=True):
            assert a["direction"] == b["direction"]
            if step == 1:
                assert len(a["s"]) == len(b["s"])
                worst[a["direction"]] = max(worst[a["direction"]], _rel(a["loss"], b["loss"]), _rel(a["s"], b["s"]))
            elif len(a["s"]) == len(b["s"]):  # the refined points are vertices of parabolas through nearly equal losses
                worst[a["direction"]] = max(worst[a["direction"]], _rel(a["loss"], b["loss"]))
                assert _rel(a["s"], b["s"]) < LINE_POINTS_RTOL, (step, a["direction"], _rel(a["s"], b["s"]))
            else:  # the search's stopping test flipped on that rounding: the same start, the same minimum
                n = 2  # 0 and the first point, placed before any refinement
                assert _rel(a["s"][:n], b["s"][:n]) < LINE_POINTS_RTOL and _rel(a["loss"][:n], b["loss"][:n]) < LATER_RTOL_CLIPPED
                ia, ib = int(np.argmin(a["loss"])), int(np.argmin(b["loss"]))
                assert _rel(min(a["loss"]), min(b["loss"])) < LATER_RTOL_CLIPPED, (step, a["direction"])
                assert _rel(a["s"][ia], b["s"][ib]) < LINE_BEST_RTOL, (step, a["direction"], a["s"][ia], b["s"][ib])
        (sa,), (sb,) = two.rows("smoothness", step=step), one.rows("smoothness", step=step)
        smooth = max(_rel(sa["l_hat"], sb["l_hat"]), _rel(list(sa["per_gamma"].values()), list(sb["per_gamma"].values())))
        cos_a, cos_b = two.rows("cosine", step=step), one.rows("cosine", step=step)
        assert [(r["a"], r["b"]) for r in cos_a] == [(r["a"], r["b"]) for r in cos_b]
        cos = max(abs(a["cosine"] - b["cosine"]) for a, b in zip(cos_a, cos_b))
        print(f"{name} step {step}: smoothness {smooth:.1e}, cosines {cos:.1e}, worst direction "
              f"{max(worst, key=worst.get)} {max(worst.values()):.1e}")
        if step == 1:
            assert max(worst.values()) < FIRST_STEP_RTOL, worst
            assert smooth < FIRST_STEP_RTOL and cos < FIRST_STEP_RTOL
            hist_a, hist_b = two.rows("histograms", step=1), one.rows("histograms", step=1)
            for a, b in zip(hist_a, hist_b, strict=True):
                assert a["direction"] == b["direction"] and np.abs(np.asarray(a["counts"]) - b["counts"]).sum() <= 2
        else:
            for direction, err in worst.items():
                assert err < (LATER_RTOL_CLIPPED if _clipped(direction) else LATER_RTOL_UNCLIPPED), (step, direction, err)
            assert smooth < LATER_RTOL_UNCLIPPED and cos < LATER_RTOL_CLIPPED
    # each rank saved its own recipe states; rank 0's commit names both
    pointer = two.meta["probe_state"]
    assert pointer["world"] == 2 and pointer["step"] == 5
    assert all((folder / name / f).is_file() for f in pointer["files"]) and len(set(pointer["files"])) == 2


def test_ddp_store_equals_one_process_run(ddp):
    folder, results, _ = ddp
    _assert_same_store(folder, "ddp")
    assert not any(r["disabled"] for r in results)


def test_ddp_manual_form_store_equals_one_process_run(ddp):
    folder, results, _ = ddp
    assert not any(r["manual_disabled"] for r in results)
    _assert_same_store(folder, "manual")


def test_cross_rank_gram_in_chunks_equals_the_dense_float64_gram(ddp):
    _, results, _ = ddp
    print(f"seconds of the chunk scenarios per rank (Group.gram, the chunk=1 probe): {[r['seconds_chunks'] for r in results]}")
    for r in results:
        gram = r["gram"]
        print(f"Group.gram: worst relative difference to the dense float64 Gram {gram['worst']:.1e}, "
              f"(live directions, chunk) {gram['peaks']}")
        assert gram["cases"] == 6 and gram["nan_rows_ok"]  # the norm-0 direction's row and column are NaN
        assert gram["worst"] < 1e-12
        # at most two chunks of the rank's own directions alive at once (its chunk a and its chunk b)
        assert all(peak <= 2 * chunk for peak, chunk in gram["peaks"])
        assert any(peak == 2 * chunk for peak, chunk in gram["peaks"])  # the counting sees the pairs


def test_ddp_with_chunk_1_holds_two_directions_at_once_and_its_cosines_are_exact(ddp):
    from landscape.optim import recipe_names

    _, results, _ = ddp
    for rank, r in enumerate(results):
        ch = r["chunked"]
        print(f"rank {rank}: {ch['local']} recipes, at most {ch['peak']} of their directions alive at once "
              f"({ch['calls']} chunks produced)")
        assert ch["disabled"] is None
        assert ch["local"] >= 3  # one chunk at a time could not be told from all at once otherwise
        assert ch["peak"] <= 2
    k = len(recipe_names()) + 1  # the recipes and the trained step
    assert results[0]["chunked"]["directions"] == k and results[0]["chunked"]["pairs"] == k * (k - 1) // 2
    print(f"cross-rank cosines against a dense float64 Gram: worst {results[0]['chunked']['worst']:.1e}")
    assert results[0]["chunked"]["worst"] < 1e-12


def test_ddp_state_memory_is_divided_among_ranks(ddp):
    from landscape.optim import PseudoUpdates, recipe_names

    _, results, worker = ddp
    full = PseudoUpdates(dict(worker.make_model().named_parameters()), list(recipe_names())).state_bytes()
    per_rank = [r["state_bytes"] for r in results]
    print(f"recipe state bytes: one process {full}, per rank {per_rank} ({[round(b / full, 3) for b in per_rank]})")
    assert sorted(results[0]["recipes"] + results[1]["recipes"]) == sorted(recipe_names())
    assert sum(per_rank) == full  # no state held twice for this split
    assert max(per_rank) <= 0.6 * full


def test_resume_with_another_world_size_is_refused_on_every_rank(ddp):
    import landscape as ls
    from landscape.probe import ResumeError

    folder, results, worker = ddp
    for r in results:  # a one-process folder resumed by two ranks
        assert r["resume_single"]["type"] == "ResumeError", r["resume_single"]
        assert "written by 1 process(es), but this job has 2" in r["resume_single"]["message"]
    batches, probe_batch = worker.data()
    model = worker.make_model()
    probe = ls.Probe(model, worker.loss_fn, probe_batch, folder / "ddp", every=worker.EVERY, settings=worker.settings())
    with pytest.raises(ResumeError, match=r"written by 2 process\(es\), but this job has 1"):
        probe.attach(torch.optim.AdamW(model.parameters(), lr=0.05))


def test_a_measurement_failing_on_one_rank_is_skipped_on_every_rank(ddp):
    folder, results, _ = ddp
    for r in results:
        assert r["fail_disabled"] is None  # the probe goes on
        assert any("failed on rank 1 of 2: RuntimeError: injected failure" in w for w in r["fail_warnings"]), r["fail_warnings"]
    run = load_run(folder / "fail")
    assert run.steps() == [1, 4]  # step 2 skipped by both ranks, the next measurement made by both
    assert any(e["kind"] == "measurement-failed" and "rank 1" in e["message"] for e in run.events())


def test_a_two_rank_run_resumed_by_two_ranks_continues_the_same_trajectory(ddp):
    folder, _, _ = ddp
    one, resumed = load_run(folder / "ref"), load_run(folder / "resumed")
    assert resumed.steps() == one.steps() == [1, 2, 4] and resumed.steps("steps") == [1, 2, 3, 4, 5]
    assert any(e["kind"] == "resume" and "after step 3 on 2 ranks" in e["message"] for e in resumed.events())
    for a, b in zip(resumed.rows("sharpness", step=4), one.rows("sharpness", step=4), strict=True):
        assert a["direction"] == b["direction"]
        tol = LATER_RTOL_CLIPPED if _clipped(a["direction"]) else LATER_RTOL_UNCLIPPED
        assert _rel(a["sharpness"], b["sharpness"]) < tol, a["direction"]


def test_a_two_rank_probe_attached_mid_run_equals_a_one_process_one(ddp):
    folder, _, worker = ddp
    model = worker.make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    worker.train(model, None, steps=2, opt=opt)
    worker.train(model, folder / "ref-midrun", opt=opt, start=2)
    one, two = load_run(folder / "ref-midrun"), load_run(folder / "midrun")
    assert one.meta["start_step"] == two.meta["start_step"] == 2
    assert one.steps("steps") == two.steps("steps") == [3, 4, 5] and one.steps() == two.steps() == [3, 4]
    for step in (3, 4):
        for a, b in zip(two.rows("sharpness", step=step), one.rows("sharpness", step=step), strict=True):
            assert a["direction"] == b["direction"]
            tol = LATER_RTOL_CLIPPED if _clipped(a["direction"]) else LATER_RTOL_UNCLIPPED
            assert _rel(a["sharpness"], b["sharpness"]) < tol, (step, a["direction"])


def test_points_saved_by_two_ranks_load_as_one_process_points(ddp):
    from landscape.points import load_point, part_path, saved_steps

    folder, _, worker = ddp
    worker.train(worker.make_model(), folder / "ref-points", save_points=[2, 4])
    assert saved_steps(folder / "points") == saved_steps(folder / "ref-points") == [2, 4]
    for step in (2, 4):
        one, two = load_point(folder / "ref-points", step), load_point(folder / "points", step)
        assert part_path(folder / "points", step, 1).is_file()  # rank 1's recipes, in their own file
        assert list(two.directions) == list(one.directions)  # every recipe and the trained step, in order
        assert two.state_dict.keys() == one.state_dict.keys()
        for k, v in one.state_dict.items():
            torch.testing.assert_close(two.state_dict[k], v, rtol=1e-5, atol=1e-7)
        for name, u in one.directions.items():
            a = torch.cat([t.reshape(-1).double() for t in two.directions[name].values()])
            b = torch.cat([t.reshape(-1).double() for t in u.values()])
            tol = LATER_RTOL_CLIPPED if _clipped(name) or name.startswith(("lion", "signsgd")) else LATER_RTOL_UNCLIPPED
            assert float((a - b).norm() / b.norm()) < tol, (step, name, float((a - b).norm() / b.norm()))
    # a missing part is named, not silently dropped
    part_path(folder / "points", 2, 1).rename(folder / "moved.pt")
    with pytest.raises(FileNotFoundError, match="rank 1's directions"):
        load_point(folder / "points", 2)
    (folder / "moved.pt").rename(part_path(folder / "points", 2, 1))


def test_a_rank_whose_probe_switches_off_switches_every_rank_off_without_hanging(ddp):
    folder, results, _ = ddp
    for r in results:
        off = r["off"]
        assert off["steps_trained"] == 5  # training went on
        assert off["disabled"] is not None and ("rank 1" in off["disabled"] or r is results[1]), off
        assert "injected recipe failure" in (off["disabled"] + " ".join(off["warnings"])) or r is results[0]
    assert "switched itself off" in results[0]["off"]["disabled"]
    run = load_run(folder / "off")
    assert run.steps() == [1, 2]  # measured until rank 1 failed at step 4, then nothing


def test_fsdp2_store_equals_one_process_run_and_training_is_unchanged(ddp):
    folder, results, _ = ddp
    for r in results:
        fsdp = r["fsdp"]
        assert "unavailable" not in fsdp, fsdp  # fully_shard runs on CPU with gloo in this torch
        assert fsdp["probe"] is None, fsdp.get("traceback")
        assert fsdp["disabled"] is None
        assert fsdp["after"] == fsdp["plain"] and fsdp["params_equal"]  # bit for bit the job without the probe
        assert fsdp["emb_disabled"] is None and fsdp["emb_losses_equal"] and fsdp["emb_params_equal"]
    assert [r["fsdp"]["state_bytes"] for r in results] == [r["state_bytes"] for r in results]  # sharded like DDP
    _assert_same_store(folder, "fsdp")
    assert load_run(folder / "fsdp-emb").steps() == [1, 2]


def test_probe_on_rank_0_only_raises_instead_of_hanging(tmp_path):
    os.environ["LANDSCAPE_TEST_TIMEOUT"] = "5"
    try:
        results, seconds, _ = _launch("rank0-only", tmp_path, timeout=90)
    finally:
        del os.environ["LANDSCAPE_TEST_TIMEOUT"]
    print(f"rank 0 only: both ranks ended after {seconds:.1f} s")
    err = results[0]["error"]
    assert err is not None and err["type"] == "DistributedError", err
    assert "ranks [1] of 2 did not start a probe" in err["message"] and "every rank" in err["message"]
    assert results[1]["error"] is not None  # rank 1's all-reduce ends when rank 0 gives up: no hang
    assert not (tmp_path / "rank0").exists()  # nothing was written


def test_fsdp2_on_one_rank_measures_on_a_replica_like_a_plain_run(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    sys.path.insert(0, str(ROOT))
    from tests import _dist_worker as worker

    worker.single(tmp_path / "ref")
    store = dist.TCPStore("127.0.0.1", _free_port(), 1, True)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        plain = worker.make_model()
        fully_shard(plain)
        losses_plain, _ = worker.train(plain, None)
        model = worker.make_model()
        fully_shard(model)
        losses, probe = worker.train(model, tmp_path / "fsdp")
        assert probe is not None and probe.disabled is None
        assert losses == losses_plain
        assert all(torch.equal(a.full_tensor(), b.full_tensor()) for a, b in zip(plain.parameters(), model.parameters()))
    finally:
        dist.destroy_process_group()
    one, fsdp = load_run(tmp_path / "ref"), load_run(tmp_path / "fsdp")
    assert fsdp.settings == one.settings and fsdp.steps() == one.steps()
    for step in one.steps():
        for a, b in zip(fsdp.rows("sharpness", step=step), one.rows("sharpness", step=step), strict=True):
            assert a["direction"] == b["direction"] and _rel(a["sharpness"], b["sharpness"]) < FIRST_STEP_RTOL
