"""measure_step with directions produced a chunk at a time (DirectionSource): the same numbers as with
every direction materialised, and never more than about two chunks of directions alive at once."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import landscape as ls
from landscape import tree
from landscape.measure import DirectionSource, MeasureSettings, measure_step, pseudo_source
from tests._models import MLP

SETTINGS = dict(line_points=4, line_min_before=2, line_max_points=8, coord_per_layer=3, hist_bins=8)


def _setup(k=7, seed=0):
    torch.manual_seed(seed)
    model = MLP(3, 6, 2).double()
    x = torch.randn(16, 3, dtype=torch.float64)
    y = torch.randn(16, 2, dtype=torch.float64)
    obj = ls.Objective(model, lambda m, b: F.mse_loss(m(b[0]), b[1]), (x, y))
    gen = torch.Generator().manual_seed(seed + 1)
    p = obj.params()
    dirs = {f"d{i}": tree.randn_like(p, gen) for i in range(k)}
    dirs["sgd"] = obj.grad()  # the reference, in the middle of a chunk
    x_next = tree.axpy(-0.05, dirs["sgd"], p)
    return obj, p, dirs, x_next


class CountingSource(DirectionSource):
    """Hands out fresh copies and records how many of them are alive at once (weak references)."""

    def __init__(self, dirs):
        self.refs: list[weakref.ref] = []
        self.peak = 0
        self.calls = 0
        super().__init__(list(dirs), self._make)
        self._dirs = dirs

    def _alive(self):
        return sum(r() is not None for r in self.refs)

    def _make(self, names):
        gc.collect()
        self.calls += 1
        out = {}
        for n in names:
            t = {k: v.clone() for k, v in self._dirs[n].items()}
            self.refs.append(weakref.ref(t[next(iter(t))]))
            out[n] = t
        self.peak = max(self.peak, self._alive())
        return out


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunks_give_the_numbers_of_the_materialised_directions_and_bound_the_live_ones(chunk):
    obj, p, dirs, x_next = _setup()
    full = measure_step(obj, 3, p, dirs, x_next=x_next, settings=MeasureSettings(**SETTINGS, chunk=len(dirs)))
    src = CountingSource(dirs)
    lazy = measure_step(obj, 3, p, src, x_next=x_next, settings=MeasureSettings(**SETTINGS, chunk=chunk))
    # at most two chunks of directions were alive at any time (one being measured, one paired with it
    # for the cosines)
    assert src.peak <= 2 * chunk
    assert src.calls > 1
    for table in ("sharpness", "lines", "histograms"):
        assert [r["direction"] for r in lazy[table]] == list(dirs)
        for a, b in zip(full[table], lazy[table]):
            assert a.keys() == b.keys()
            for key in a:
                va, vb = a[key], b[key]
                if isinstance(va, np.ndarray):
                    np.testing.assert_array_equal(va, vb)
                elif isinstance(va, float):
                    assert va == pytest.approx(vb, rel=1e-13, abs=1e-15), (table, key)
                else:
                    assert va == vb, (table, key)
    # the cosines against a dense float64 reference
    flat = {n: torch.cat([u[k].reshape(-1) for k in obj.names]) for n, u in dirs.items()}
    cos = {(r["a"], r["b"]): r["cosine"] for r in lazy["cosine"]}
    assert len(cos) == len(dirs) * (len(dirs) - 1) // 2
    for (a, b), c in cos.items():
        ref = float(flat[a] @ flat[b] / (flat[a].norm() * flat[b].norm()))
        assert c == pytest.approx(ref, rel=1e-12, abs=1e-14)
    assert lazy["smoothness"][0]["l_hat"] == pytest.approx(full["smoothness"][0]["l_hat"], rel=1e-13)


def test_pseudo_source_computes_the_recipes_it_is_asked_for():
    torch.manual_seed(0)
    model = MLP(3, 4, 2)
    pu = ls.PseudoUpdates(model.named_parameters(), ["sgd", "adam", "signsgd"])
    model(torch.randn(8, 3)).square().mean().backward()
    pu.observe({n: p.grad for n, p in model.named_parameters()})
    real = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    src = pseudo_source(pu, {"adam (trained)": real})
    assert src.names == ["sgd", "adam", "signsgd", "adam (trained)"]
    got = src.get(["signsgd", "adam (trained)"])
    assert list(got) == ["signsgd", "adam (trained)"]
    ref = pu.directions(["signsgd"])["signsgd"]
    for n in ref:
        assert torch.equal(got["signsgd"][n], ref[n])
    assert got["adam (trained)"] is real
    with pytest.raises(KeyError, match="unknown directions"):
        src.get(["lion"])
    with pytest.raises(ValueError, match="names of recipes"):
        pseudo_source(pu, {"sgd": real})


def test_a_measurement_leaves_no_tensor_in_a_reference_cycle():
    """Memory is freed chunk after chunk by reference counting, not at the garbage collector's leisure.
    A recursive closure in the Taylor sweep once kept every intermediate value of each δ-shifted point's
    forward pass alive until a collection: one forward's activations more per chunk (GPT-2: +7× the
    parameter bytes after 6 chunks)."""
    obj, p, dirs, x_next = _setup()
    settings = MeasureSettings(**SETTINGS, chunk=1, shift="always")
    measure_step(obj, 3, p, dirs, x_next=x_next, settings=settings)  # records the graph (its trace's own garbage)
    gc.collect()
    gc.disable()
    try:
        rows = measure_step(obj, 4, p, dirs, x_next=x_next, settings=settings)
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        leaked = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert rows["_engine"][0]["engine"] == "taylor"
    assert all(r["shifted"] for r in rows["sharpness"])  # every direction swept at its own point x + δû
    assert leaked == [], f"{len(leaked)} tensors held only by reference cycles: {[tuple(t.shape) for t in leaked[:8]]}"
