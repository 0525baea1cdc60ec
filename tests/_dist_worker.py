"""One rank of the distributed tests (tests/test_distributed.py starts two of these, torchrun-style:
RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) and the one-process reference.

    python tests/_dist_worker.py SCENARIO FOLDER      # writes FOLDER/result-<rank>.json

Scenarios: ``ddp`` (the equivalence run, a resume of a one-process folder, a measurement that fails on
rank 1, FSDP2), ``rank0-only`` (the probe on rank 0 only).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import traceback
import warnings
import weakref
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import landscape as ls  # noqa: E402
from landscape.measure import MeasureSettings  # noqa: E402

STEPS = 5
EVERY = 2
GLOBAL = 8  # samples of a global batch; rank r trains on its half


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def loss_fn(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def data() -> tuple[list[tuple[torch.Tensor, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(GLOBAL, 3, generator=g), torch.randint(0, 3, (GLOBAL,), generator=g)) for _ in range(STEPS)]
    probe = (torch.randn(16, 3, generator=g), torch.randint(0, 3, (16,), generator=g))
    return batches, probe


def settings() -> MeasureSettings:
    return MeasureSettings(line_max_points=12, coord_per_layer=4)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return Net()


def train(model: nn.Module, out: Path | None, rank: int = 0, world: int = 1, steps: int = STEPS,
          probe_model: nn.Module | None = None, opt: torch.optim.Optimizer | None = None, start: int = 0,
          **probe_kwargs) -> tuple[list[float], ls.Probe | None]:
    """AdamW steps ``start..steps-1`` on the global batches (this rank's slice of each), with a probe on
    ``out``."""
    batches, probe_batch = data()
    opt = opt or torch.optim.AdamW(model.parameters(), lr=0.05)
    probe = None
    if out is not None:
        probe = ls.Probe(probe_model if probe_model is not None else model, loss_fn, probe_batch, out, every=EVERY,
                         settings=settings(), **probe_kwargs)
        probe.attach(opt)
    losses = []
    per = GLOBAL // world
    for x, y in batches[start:steps]:
        loss = loss_fn(model, (x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    if probe is not None:
        probe.close()
    return losses, probe


def single(folder: Path) -> None:
    """The one-process reference (also used by the test process itself)."""
    train(make_model(), folder)


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)}


def scenario_ddp(folder: Path, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    result: dict = {}
    # 1. the equivalence run: the probe given the DDP-wrapped model, on every rank
    model = make_model()
    ddp = DDP(model)
    _, probe = train(ddp, folder / "ddp", rank, world, probe_model=ddp)
    assert probe is not None
    result["recipes"] = probe._shards[rank]
    result["state_bytes"] = probe._pseudo.state_bytes() if probe._pseudo is not None else None  # type: ignore[union-attr]
    result["disabled"] = probe.disabled
    result["params"] = {n: p.detach().tolist() for n, p in model.named_parameters()}
    # 2. a one-process folder resumed by two ranks: refused on both
    try:
        model2 = DDP(make_model())
        train(model2, folder / "single", rank, world, steps=1, probe_model=model2)
        result["resume_single"] = None
    except Exception as e:  # noqa: BLE001
        result["resume_single"] = _error(e)
    # 3. a measurement that raises on rank 1 at step 2: skipped on both ranks, training goes on
    import landscape.probe as lp

    real = lp.measure_step
    calls = []

    def failing(objective, step, *args, **kwargs):
        calls.append(step)
        if rank == 1 and step == 2:
            raise RuntimeError("injected failure on rank 1")
        return real(objective, step, *args, **kwargs)

    lp.measure_step = failing
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, probe3 = train(DDP(make_model()), folder / "fail", rank, world)
        result["fail_warnings"] = [str(w.message) for w in caught if "landscape probe" in str(w.message)]
        result["fail_disabled"] = probe3.disabled if probe3 is not None else "none"
    finally:
        lp.measure_step = real
    # 4. a two-rank run stopped after step 3 and resumed by two ranks on the same folder
    model4 = DDP(make_model())
    opt4 = torch.optim.AdamW(model4.parameters(), lr=0.05)
    train(model4, folder / "resumed", rank, world, steps=3, probe_model=model4, opt=opt4)
    train(model4, folder / "resumed", rank, world, steps=STEPS, probe_model=model4, opt=opt4, start=3)
    # 9. attached after 2 steps of DDP training, to a new folder: the steps numbered from the optimizer's
    model9 = DDP(make_model())
    opt9 = torch.optim.AdamW(model9.parameters(), lr=0.05)
    train(model9, None, rank, world, steps=2, opt=opt9)
    train(model9, folder / "midrun", rank, world, probe_model=model9, opt=opt9, start=2)
    # 10. save_points under DDP: each rank saves its own recipes' directions, rank 0 the point's state
    model10 = DDP(make_model())
    train(model10, folder / "points", rank, world, probe_model=model10, save_points=[2, 4])
    # 5. the recipes of rank 1 fail on a gradient at step 3: both probes switch off, training goes on
    model5 = DDP(make_model())
    opt5 = torch.optim.AdamW(model5.parameters(), lr=0.05)
    batches, probe_batch = data()
    probe5 = ls.Probe(model5, loss_fn, probe_batch, folder / "off", every=EVERY, settings=settings())
    probe5.attach(opt5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches):
            if rank == 1 and i == 3:
                probe5._pseudo.observe = lambda g, **kw: (_ for _ in ()).throw(RuntimeError("injected recipe failure"))
            loss_fn(model5, (x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])).backward()
            opt5.step()
            opt5.zero_grad()
        probe5.close()
    result["off"] = {"disabled": probe5.disabled, "warnings": [str(w.message) for w in caught if "landscape" in str(w.message)],
                     "steps_trained": i + 1}
    # 7. the manual form (probe.observe before each step, as the Lightning callback calls it)
    model7 = DDP(make_model())
    opt7 = torch.optim.AdamW(model7.parameters(), lr=0.05)
    probe7 = ls.Probe(model7, loss_fn, probe_batch, folder / "manual", every=EVERY, settings=settings())
    for x, y in batches:
        loss_fn(model7, (x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])).backward()
        probe7.observe(optimizer=opt7)
        opt7.step()
        opt7.zero_grad()
    probe7.close()
    result["manual_disabled"] = probe7.disabled
    # 8. directions a chunk at a time: Group.gram on its own, then a probe with chunk=1
    t0 = time.perf_counter()
    result["gram"] = scenario_gram(rank, world)
    t1 = time.perf_counter()
    result["chunked"] = chunked_probe(folder / "chunked", rank, world)
    result["seconds_chunks"] = [t1 - t0, time.perf_counter() - t1]  # printed by the test, never compared
    # 6. FSDP2: the probe reads the sharded gradients and measures on a plain replica; training goes on
    # exactly as without the probe
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError as e:
        result["fsdp"] = {"unavailable": str(e)}
        return result
    fsdp: dict = {}
    plain = make_model()
    fully_shard(plain.fc1)
    fully_shard(plain)
    fsdp["plain"], _ = train(plain, None, rank, world)
    probed = make_model()
    fully_shard(probed.fc1)  # nested: one parameter group per layer, and the root
    fully_shard(probed)
    try:
        fsdp["after"], probe6 = train(probed, folder / "fsdp", rank, world)
        fsdp["probe"] = None
        fsdp["disabled"] = probe6.disabled if probe6 is not None else "none"
        fsdp["state_bytes"] = probe6._pseudo.state_bytes() if probe6 is not None and probe6._pseudo is not None else None
    except Exception as e:  # noqa: BLE001
        fsdp["probe"] = _error(e)
        fsdp["traceback"] = traceback.format_exc()
    fsdp["params_equal"] = all(torch.equal(a.full_tensor(), b.full_tensor())
                               for a, b in zip(plain.parameters(), probed.parameters(), strict=True))
    # an embedding (the layer that failed with "got mixed torch.Tensor and DTensor" before)
    runs = []
    for with_probe in (False, True):
        torch.manual_seed(0)
        emb = Tokens()
        fully_shard(emb.emb)
        fully_shard(emb)
        opt = torch.optim.AdamW(emb.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(3)
        idx, y = torch.randint(0, 7, (4, 5), generator=g), torch.randint(0, 7, (4, 5), generator=g)
        probe = None
        if with_probe:
            probe = ls.Probe(emb, token_loss, (idx, y), folder / "fsdp-emb", every=2, recipes=["sgd", "adam", "lion"],
                             settings=settings())
            probe.attach(opt)
        losses = []
        for _ in range(3):
            loss = token_loss(emb, (idx[rank * 2:(rank + 1) * 2], y[rank * 2:(rank + 1) * 2]))
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(loss.detach()))
        if probe is not None:
            probe.close()
            fsdp["emb_disabled"] = probe.disabled
        runs.append((losses, [p.full_tensor() for p in emb.parameters()]))
    fsdp["emb_losses_equal"] = runs[0][0] == runs[1][0]
    fsdp["emb_params_equal"] = all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))
    result["fsdp"] = fsdp
    return result


class Counting:
    """Wraps a ``directions(names)`` function: hands out fresh copies, records how many of them are alive
    at once (weak references, without a garbage collection: a copy kept alive by a reference cycle
    counts as alive), and keeps a float64 flat copy of each direction's first instance."""

    def __init__(self, directions, names) -> None:
        self.real, self.names = directions, list(names)
        self.refs: list[weakref.ref] = []
        self.peak = self.calls = 0
        self.flat: dict[str, torch.Tensor] = {}

    def __call__(self, wanted=None):
        self.calls += 1
        out = {}
        for n, u in self.real(wanted).items():
            t = {k: v.detach().clone() for k, v in u.items()}
            self.refs.append(weakref.ref(t[next(iter(t))]))
            self.flat.setdefault(n, torch.cat([t[k].reshape(-1).double() for k in self.names]))
            out[n] = t
        self.peak = max(self.peak, sum(r() is not None for r in self.refs))
        return out


def scenario_gram(rank: int, world: int) -> dict:
    """Group.gram over directions owned unevenly (one rank with more chunks than the other, or none), in
    pieces small enough to cut a tensor and pack two, against the dense float64 Gram matrix."""
    import numpy as np

    import landscape.distributed as ld
    from landscape.measure import DirectionSource

    g = ld.Group()
    like = {"w": torch.zeros(3, 5), "b": torch.zeros(4), "v": torch.zeros(2, 3)}
    gen = torch.Generator().manual_seed(5)
    every = {f"d{i}": {k: torch.randn(t.shape, generator=gen) for k, t in like.items()} for i in range(7)}
    every["d4"] = {k: torch.zeros_like(t) for k, t in like.items()}  # norm 0: NaN rows, as in one process
    order = list(every)
    flat = torch.stack([torch.cat([every[n][k].reshape(-1).double() for k in like]) for n in order])
    dense = (flat @ flat.T).numpy()
    dense[4, :] = dense[:, 4] = np.nan
    out: dict = {"worst": 0.0, "peaks": [], "nan_rows_ok": True, "cases": 0}
    real_piece = ld._PIECE
    ld._PIECE = 7  # w is cut into 7 + 7 + 1, the 1 packed with b and part of v
    try:
        for owned in ({"d0": 0, "d1": 1, "d2": 0, "d3": 0, "d4": 1, "d5": 0, "d6": 0}, dict.fromkeys(order, 0)):
            mine = [n for n in order if owned[n] == rank]
            for chunk in (1, 2, 3):
                counting = Counting(lambda names: {n: every[n] for n in names}, list(like))
                got = g.gram(DirectionSource(mine, counting), order, owned, like, chunk=chunk)
                ok = ~np.isnan(dense)
                out["nan_rows_ok"] &= bool((np.isnan(got) == ~ok).all())
                out["worst"] = max(out["worst"], float(np.max(np.abs(got[ok] - dense[ok]) / np.abs(dense[ok]).clip(1e-300))))
                out["peaks"].append([counting.peak, chunk])
                out["cases"] += 1
    finally:
        ld._PIECE = real_piece
    return out


def chunked_probe(out: Path, rank: int, world: int) -> dict:
    """A DDP probe with MeasureSettings(chunk=1) measuring step 1: the most of this rank's directions
    alive at once, and (rank 0) its cosines against a dense float64 Gram matrix of the same directions."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    import landscape.distributed as ld

    model = DDP(make_model())
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    batches, probe_batch = data()
    probe = ls.Probe(model, loss_fn, probe_batch, out, every=EVERY, settings=dataclasses.replace(settings(), chunk=1))
    probe.attach(opt)
    names = list(probe.objective.names)
    counting = Counting(probe._pseudo.directions, names)
    probe._pseudo.directions = counting
    x, y = batches[0]
    before = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    loss_fn(model, (x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4])).backward()
    opt.step()  # measures step 1
    after = dict(model.module.named_parameters())
    flat = dict(counting.flat)
    flat[str(probe.trained_name)] = torch.cat([(before[n] - after[n].detach()).reshape(-1).double() for n in names])
    local = len(probe._pseudo.names)
    probe.close()
    res = {"peak": counting.peak, "calls": counting.calls, "local": local, "disabled": probe.disabled}
    every = ld.Group().all_gather_object({n: v.numpy() for n, v in flat.items()})
    if rank == 0:
        from landscape.store import load_run

        vec = {n: torch.from_numpy(v) for part in every for n, v in part.items()}
        rows = load_run(out).rows("cosine", step=1)
        res["pairs"], res["directions"] = len(rows), len(vec)
        res["worst"] = max(abs(r["cosine"] - float(vec[r["a"]] @ vec[r["b"]] / (vec[r["a"]].norm() * vec[r["b"]].norm())))
                           for r in rows)
    return res


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 7)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(idx)))


def token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    idx, y = batch
    return F.cross_entropy(model(idx).reshape(-1, 7), y.reshape(-1))


def scenario_rank0_only(folder: Path, rank: int, world: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = DDP(make_model())
    if rank == 0:
        try:
            train(model, folder / "rank0", rank, world, steps=1)
            return {"error": None}
        except Exception as e:  # noqa: BLE001
            return {"error": _error(e)}
    try:
        train(model, None, rank, world, steps=1)  # waits in DDP's all-reduce for rank 0's step
        return {"error": None}
    except Exception as e:  # noqa: BLE001 - rank 0 left
        return {"error": _error(e)}


def main() -> None:
    scenario, folder = sys.argv[1], Path(sys.argv[2])
    if scenario == "single":
        single(folder)
        return
    import torch.distributed as dist

    timeout = timedelta(seconds=float(os.environ.get("LANDSCAPE_TEST_TIMEOUT", "20")))
    dist.init_process_group("gloo", timeout=timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        fn = {"ddp": scenario_ddp, "rank0-only": scenario_rank0_only}[scenario]
        result = fn(folder, rank, world)
    except Exception as e:  # noqa: BLE001 - reported to the test
        result = {"crash": _error(e), "traceback": traceback.format_exc()}
    (folder / f"result-{rank}.json").write_text(json.dumps(result))
    if scenario != "rank0-only":
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
