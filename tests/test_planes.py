"""Loss planes and lines (landscape.planes): closed forms, filter normalisation, PCA exactness,
batched == one-at-a-time evaluation, the model left untouched, the run store (resume), and the
probe's saved points (landscape.points)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import landscape as ls
from landscape import tree
from landscape.planes import PlaneError, list_planes, load_plane
from landscape.store import NoDataError, RunMismatchError, RunStore, load_run
from tests._models import CNN, MLP, TinyTransformer, classification_loss, loss_at_copy

METHODS = ("loop", "vmap", "auto")


# -- a quadratic f(x) = ½ xᵀAx over two parameter tensors --------------------------------------------


class HalfQuadratic(nn.Module):
    """f(x) = ½ xᵀAx with x = (u, W.flatten()): two parameter tensors, one of them a matrix."""

    def __init__(self, A: torch.Tensor, u0: torch.Tensor, w0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", A)
        self.u = nn.Parameter(u0.clone())
        self.W = nn.Parameter(w0.clone())

    def forward(self, _batch=None) -> torch.Tensor:
        x = torch.cat([self.u, self.W.reshape(-1)])
        return 0.5 * x @ self.A @ x


def quadratic(seed=0):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    A = m @ m.T + torch.eye(10, dtype=torch.float64)
    model = HalfQuadratic(A, torch.randn(4, generator=gen, dtype=torch.float64),
                          torch.randn(2, 3, generator=gen, dtype=torch.float64))
    return model, A, gen


def flat(t):
    return torch.cat([t["u"], t["W"].reshape(-1)])


def rand_dir(model, gen):
    return {n: torch.randn(p.shape, generator=gen, dtype=p.dtype) for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("at_zero", [True, False])
def test_plane_on_a_quadratic_equals_the_closed_form(method, at_zero):
    model, A, gen = quadratic()
    obj = ls.Objective(model, lambda m, b: m(b), None)
    d1, d2 = rand_dir(model, gen), rand_dir(model, gen)
    center = {n: torch.zeros_like(p) if at_zero else p.detach() for n, p in model.named_parameters()}
    alphas, betas = np.linspace(-1.5, 1.0, 7), np.linspace(-0.5, 2.0, 5)
    grid = ls.loss_plane(obj, d1, d2, (alphas, betas), at=center, method=method, chunk=4)
    assert grid.loss.shape == (7, 5)
    c, v1, v2 = flat(center), flat(d1), flat(d2)
    for i, a in enumerate(alphas):
        for j, b in enumerate(betas):
            x = c + a * v1 + b * v2  # at the origin: ½(αd₁ + βd₂)ᵀA(αd₁ + βd₂)
            np.testing.assert_allclose(grid.loss[i, j], float(0.5 * x @ A @ x), rtol=1e-12, atol=1e-12)
    line = ls.loss_line(obj, d1, alphas, at=center, method=method)
    expected = [float(0.5 * (c + a * v1) @ A @ (c + a * v1)) for a in alphas]
    np.testing.assert_allclose(line.loss, expected, rtol=1e-12, atol=1e-12)


def test_grid_arguments_are_validated():
    model, _, gen = quadratic()
    obj = ls.Objective(model, lambda m, b: m(b), None)
    d = rand_dir(model, gen)
    assert ls.loss_plane(obj, d, d, 3).alphas.tolist() == [-1.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="at least 2 points"):
        ls.loss_plane(obj, d, d, 1)
    with pytest.raises(ValueError, match="strictly increasing"):
        ls.loss_line(obj, d, [0.0, 1.0, 0.5])
    with pytest.raises(ValueError, match="method"):
        ls.loss_line(obj, d, 3, method="fast")
    with pytest.raises(ValueError, match="chunk"):
        ls.loss_line(obj, d, 3, chunk=0)
    with pytest.raises(KeyError, match="direction 1 lacks"):
        ls.loss_line(obj, {"u": d["u"]}, 3)


# -- filter normalisation (Li et al. 2018 §4) ---------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self, gen: torch.Generator) -> None:
        super().__init__()
        c_in, c_out, k = (int(torch.randint(1, 5, (1,), generator=gen)) for _ in range(3))
        self.conv = nn.Conv2d(c_in, c_out, k + 1)
        self.bn = nn.BatchNorm2d(c_out)
        self.tconv = nn.ConvTranspose2d(c_out, 2, 2)
        self.emb = nn.Embedding(int(torch.randint(2, 9, (1,), generator=gen)), 3)
        self.fc = nn.Linear(3, int(torch.randint(1, 7, (1,), generator=gen)))
        self.ln = nn.LayerNorm(3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
            self.fc.weight[0].zero_()  # a filter of zero weights gets a zero direction


@pytest.mark.parametrize("seed", range(6))
def test_filter_normalised_directions_have_the_filter_norms_of_the_weights(seed):
    model = Mixed(torch.Generator().manual_seed(seed))
    w = {n: p.detach() for n, p in model.named_parameters()}
    state = torch.get_rng_state()
    for biases in ls.planes.BIAS_MODES:
        d = ls.random_direction(w, seed=seed, biases=biases)
        assert d.keys() == w.keys()
        for n, p in w.items():
            if p.dim() >= 2:  # per filter: an output channel of a conv, a row of a linear / embedding weight
                torch.testing.assert_close(d[n].flatten(1).norm(dim=1), p.flatten(1).norm(dim=1), rtol=1e-6, atol=0)
            elif biases == "zero":
                assert torch.count_nonzero(d[n]) == 0, n
            elif biases == "keep":
                assert torch.equal(d[n], p), n
            else:
                torch.testing.assert_close(d[n].norm(), p.norm(), rtol=1e-6, atol=0)
        assert torch.count_nonzero(d["fc.weight"][0]) == 0
        assert not torch.equal(d["conv.weight"] / d["conv.weight"].norm(), w["conv.weight"] / w["conv.weight"].norm())
    again = ls.random_direction(w, seed=seed)
    other = ls.random_direction(w, seed=seed + 100)
    assert all(torch.equal(a, b) for a, b in zip(again.values(), ls.random_direction(w, seed=seed).values()))
    assert not torch.equal(again["conv.weight"], other["conv.weight"])
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"


def test_filter_normalize_is_pure_and_checks_its_input():
    w = {"a": torch.randn(3, 2), "b": torch.randn(3)}
    d = {"a": torch.randn(3, 2), "b": torch.randn(3)}
    d_copy = tree.clone(d)
    out = ls.filter_normalize(d, w)
    assert all(torch.equal(d[k], d_copy[k]) for k in d) and out["a"] is not d["a"]
    with pytest.raises(ValueError, match="biases"):
        ls.filter_normalize(d, w, biases="ignore")
    with pytest.raises(KeyError, match="lacks"):
        ls.filter_normalize({"a": d["a"]}, w)
    plane = ls.random_plane(w, seed=3)
    assert plane.kind == "random" and plane.config == {"seed": 3, "biases": "zero"}
    assert not torch.equal(plane.d1["a"], plane.d2["a"])


# -- PCA of a trajectory (Li et al. 2018 §7) ----------------------------------------------------------


def planar_trajectory(n=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = {"w": (4, 5), "b": (7,)}
    size = 27
    q, _ = torch.linalg.qr(torch.randn(size, 2, generator=gen, dtype=torch.float64))
    p1, p2 = q[:, 0], q[:, 1]
    c0 = torch.randn(size, generator=gen, dtype=torch.float64)
    ab = torch.randn(n, 2, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0], dtype=torch.float64)

    def split(v):
        return {"w": v[:20].reshape(shapes["w"]), "b": v[20:]}

    points = [split(c0 + a * p1 + b * p2) for a, b in ab]
    return points, (p1, p2), ab, split


def test_pca_recovers_a_planar_trajectory_exactly():
    points, (p1, p2), ab, split = planar_trajectory()
    plane = ls.pca_plane(points, steps=list(range(len(points))))
    e1, e2 = tree.flatten(plane.d1, ["w", "b"]), tree.flatten(plane.d2, ["w", "b"])
    # orthonormal, spanning the true plane
    torch.testing.assert_close(torch.stack([e1 @ e1, e2 @ e2, e1 @ e2]),
                               torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), atol=1e-12, rtol=0)
    for p in (p1, p2):
        assert abs(float((p @ e1) ** 2 + (p @ e2) ** 2) - 1.0) < 1e-12
    # every point is the centre plus its projected coordinates, exactly
    t = plane.trajectory
    c = tree.flatten(plane.center, ["w", "b"])
    assert torch.equal(c, tree.flatten(points[-1], ["w", "b"]))
    np.testing.assert_allclose(t.coords[-1], [0.0, 0.0], atol=1e-12)
    for i, pt in enumerate(points):
        rebuilt = c + t.coords[i, 0] * e1 + t.coords[i, 1] * e2
        torch.testing.assert_close(rebuilt, tree.flatten(pt, ["w", "b"]), atol=1e-11, rtol=0)
    np.testing.assert_allclose(t.residuals, 0.0, atol=1e-10)
    # the coordinates are the true ones up to a rotation or reflection: pairwise distances agree
    dist = np.linalg.norm(t.coords[:, None] - t.coords[None], axis=-1)
    true = ab.numpy()
    np.testing.assert_allclose(dist, np.linalg.norm(true[:, None] - true[None], axis=-1), atol=1e-11)
    # explained variance: the singular values of the centred true coordinates (an independent SVD)
    s = np.linalg.svd(true - true.mean(0), compute_uv=False)
    np.testing.assert_allclose(plane.explained_variance, s**2 / (s**2).sum(), rtol=1e-10)
    assert abs(plane.explained_variance.sum() - 1.0) < 1e-12
    assert t.coords[0, 0] <= 0 and t.coords[0, 1] <= 0  # oriented: the trajectory starts lower left


def test_pca_of_a_general_trajectory_matches_numpy_svd():
    gen = torch.Generator().manual_seed(1)
    points = [{"w": torch.randn(3, 4, generator=gen, dtype=torch.float64) * (1 + i)} for i in range(6)]
    plane = ls.pca_plane(points)
    x = np.stack([p["w"].numpy().ravel() for p in points])
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    np.testing.assert_allclose(plane.explained_variance, (s**2 / (s**2).sum())[:2], rtol=1e-10)
    for k, d in enumerate((plane.d1, plane.d2)):
        assert abs(abs(float(d["w"].numpy().ravel() @ vt[k])) - 1.0) < 1e-10
    coords, res = plane.project(points)  # the generic least-squares projection agrees with PCA's own
    np.testing.assert_allclose(coords, plane.trajectory.coords, atol=1e-10)
    np.testing.assert_allclose(res, plane.trajectory.residuals, atol=1e-10)


def test_pca_refuses_degenerate_trajectories():
    points, _, _, split = planar_trajectory(n=4)
    with pytest.raises(PlaneError, match="at least 3"):
        ls.pca_plane(points[:2])
    with pytest.raises(PlaneError, match="the same"):
        ls.pca_plane([points[0]] * 3)
    base, step = tree.flatten(points[0], ["w", "b"]), tree.flatten(points[1], ["w", "b"])
    with pytest.raises(PlaneError, match="line"):
        ls.pca_plane([split(base + t * (step - base)) for t in (0.0, 0.5, 2.0)])


# -- update planes and interpolations -----------------------------------------------------------------


@pytest.mark.parametrize("scale", ["unit", "norm"])
def test_update_plane_is_orthogonal_and_marks_both_updates(scale):
    gen = torch.Generator().manual_seed(2)
    u1 = {"a": torch.randn(4, 3, generator=gen, dtype=torch.float64), "b": torch.randn(3, generator=gen, dtype=torch.float64)}
    u2 = {k: 0.3 * v + torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in u1.items()}
    plane = ls.update_plane(u1, u2, names=("sgd", "adam"), scale=scale)
    d1, d2 = tree.flatten(plane.d1), tree.flatten(plane.d2)
    v1, v2 = tree.flatten(u1), tree.flatten(u2)
    assert abs(float(d1 @ d2)) < 1e-12
    if scale == "unit":
        assert abs(float(d1.norm()) - 1) < 1e-12 and abs(float(d2.norm()) - 1) < 1e-12
        torch.testing.assert_close(d1, -v1 / v1.norm())
        targets = {"sgd": -v1 / v1.norm(), "adam": -v2 / v2.norm()}  # the unit step along each update
    else:
        torch.testing.assert_close(d1, -v1)
        assert abs(float(d2.norm()) - float(v2.norm())) < 1e-10
        targets = {"sgd": -v1, "adam": -v2}  # the whole update
    for name, target in targets.items():
        a, b = plane.markers[name]
        torch.testing.assert_close(a * d1 + b * d2, target, atol=1e-12, rtol=0)
    cos = float(v1 @ v2 / (v1.norm() * v2.norm()))
    assert abs(plane.config["cosine"] - cos) < 1e-12
    with pytest.raises(PlaneError, match="parallel"):
        ls.update_plane(u1, tree.scale(u1, 2.0))
    with pytest.raises(PlaneError, match="norm 0"):
        ls.update_plane(tree.zeros_like(u1), u2)


def test_interpolation_matches_the_checkpoints_at_its_ends():
    torch.manual_seed(0)
    model = MLP()
    batch = (torch.randn(16, 3), torch.randint(0, 2, (16,)))
    obj = ls.Objective(model, classification_loss, batch)
    a = {n: p.detach().clone() for n, p in model.named_parameters()}
    b = {n: v + 0.3 * torch.randn_like(v) for n, v in a.items()}
    line = ls.interpolation(a, b, labels=("x0", "x1"))
    assert line.dims == 1 and line.markers == {"x0": [0.0], "x1": [1.0]}
    np.testing.assert_allclose(line.grid, np.linspace(-0.5, 1.5, 41))
    grid = ls.loss_line(obj, line.d1, [-0.5, 0.0, 0.5, 1.0, 1.5], at=line.center)
    for alpha, value in zip(grid.alphas, grid.loss):
        point = {n: (1 - alpha) * a[n] + alpha * b[n] for n in a}
        np.testing.assert_allclose(value, loss_at_copy(model, classification_loss, batch, point), rtol=1e-5)
    traj = line.with_trajectory([a, b, {n: 0.5 * (a[n] + b[n]) for n in a}], steps=[0, 10, 5], objective=obj)
    np.testing.assert_allclose(traj.trajectory.coords[:, 0], [0.0, 1.0, 0.5], atol=1e-6)
    np.testing.assert_allclose(traj.trajectory.residuals, 0.0, atol=1e-5)
    np.testing.assert_allclose(traj.trajectory.loss[1], loss_at_copy(model, classification_loss, batch, b), rtol=1e-6)
    with pytest.raises(PlaneError, match="same point"):
        ls.interpolation(a, a)


# -- batched evaluation == one point at a time ---------------------------------------------------------


def _cases():
    torch.manual_seed(0)
    yield "mlp", MLP(), classification_loss, (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    yield "cnn", CNN(), classification_loss, (torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,)))
    yield "transformer", TinyTransformer(), classification_loss, (torch.randint(0, 5, (3, 4)), torch.randint(0, 5, (3, 4)))
    from landscape.models import TinyCausalLM, lm_loss

    lm = TinyCausalLM(13, width=16, depth=1, heads=2, context=8)
    x = torch.randint(0, 13, (6, 8))
    yield "causal_lm", lm, lm_loss, ls.MicroBatches([(x[:4], x.roll(-1, 1)[:4]), (x[4:], x.roll(-1, 1)[4:])])


@pytest.mark.parametrize("case", list(_cases()), ids=lambda c: c[0])
def test_batched_evaluation_equals_one_point_at_a_time(case):
    _, model, loss_fn, batch = case
    obj = ls.Objective(model, loss_fn, batch)
    plane = ls.random_plane(obj, seed=1, biases="random")
    grid = np.linspace(-1, 1, 5)
    batched = ls.loss_plane(obj, plane.d1, plane.d2, grid, method="vmap", chunk=7)
    looped = ls.loss_plane(obj, plane.d1, plane.d2, grid, method="loop")
    auto = ls.loss_plane(obj, plane.d1, plane.d2, grid)
    assert batched.method == "vmap" and looped.method == "loop" and auto.method in ("vmap", "loop")
    np.testing.assert_allclose(batched.loss, looped.loss, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(auto.loss, looped.loss, rtol=1e-5, atol=1e-6)
    # an evaluation independent of landscape's machinery: a deep copy with the parameters overwritten
    for i, j in [(0, 0), (1, 3), (2, 2), (4, 1)]:
        point = {n: plane.center[n] + grid[i] * plane.d1[n] + grid[j] * plane.d2[n] for n in plane.d1}
        if isinstance(batch, ls.MicroBatches):
            ref = sum(w * loss_at_copy(model, loss_fn, b, point) for w, b in zip(batch.weights, batch))
        else:
            ref = loss_at_copy(model, loss_fn, batch, point)
        np.testing.assert_allclose(looped.loss[i, j], ref, rtol=1e-5)
        np.testing.assert_allclose(batched.loss[i, j], ref, rtol=1e-5)
    assert looped.loss[2, 2] == obj.loss()  # the centre, exactly


def test_auto_falls_back_to_one_point_at_a_time_when_vmap_cannot_batch():
    model, _, gen = quadratic()

    def item_loss(m, b):  # .item() cannot run under vmap
        return m(b) * (1.0 + 0.0 * float(m.u.sum().item()))

    obj = ls.Objective(model, item_loss, None)
    d = rand_dir(model, gen)
    auto = ls.loss_line(obj, d, 9)
    assert auto.method == "loop" and "batched evaluation failed" in auto.note
    np.testing.assert_allclose(auto.loss, ls.loss_line(obj, d, 9, method="loop").loss, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="method='vmap' cannot evaluate"):
        ls.loss_line(obj, d, 9, method="vmap")


# -- nothing in the user's model changes --------------------------------------------------------------


class Frozen(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(2 * 3 * 3, 3)
        self.fc.bias.requires_grad_(False)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


def snapshot(model):
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            {n: m.training for n, m in model.named_modules()},
            {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()},
            torch.get_rng_state())


def test_the_model_is_untouched_by_every_call(tmp_path):
    torch.manual_seed(0)
    model = Frozen()
    model.train()
    model.bn.eval()
    batch = (torch.randn(4, 1, 5, 5), torch.randint(0, 3, (4,)))
    classification_loss(model.eval(), batch).backward()  # leave gradients on some parameters
    model.train()
    model.bn.eval()
    model.conv.weight.grad = None
    before = snapshot(model)
    obj = ls.Objective(model, classification_loss, batch)
    center = obj.params()
    gen = torch.Generator().manual_seed(1)  # not the global RNG, which is checked
    others = [{n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in center.items()} for _ in range(3)]
    random = ls.random_plane(obj, seed=0)
    planes = [random, ls.update_plane(random.d1, random.d2, center=center),
              ls.pca_plane(others + [center], objective=obj), ls.interpolation(center, others[0])]
    planes.append(planes[-1].with_trajectory(others, objective=obj))
    for method in METHODS:
        ls.loss_plane(obj, random.d1, random.d2, 3, method=method)
        ls.loss_line(obj, random.d1, 3, method=method, at=others[1])
    with RunStore(tmp_path / "run", settings={}) as store:
        for i, plane in enumerate(planes):
            ls.measure_plane(store, f"p{i}", plane, obj, 3)
    after = snapshot(model)
    assert before[0].keys() == after[0].keys()
    for k in before[0]:
        assert torch.equal(before[0][k], after[0][k]), k  # parameters and BatchNorm buffers, bit for bit
    assert before[1] == after[1]  # every module's mode
    for n in before[2]:
        rg, g = before[2][n]
        rg2, g2 = after[2][n]
        assert rg == rg2 and ((g is None and g2 is None) or torch.equal(g, g2)), n
    assert torch.equal(before[3], after[3]), "the global RNG state changed"


# -- the run store: resumable, refuses mismatches ------------------------------------------------------


class Counting:
    def __init__(self, fail_after=None):
        self.calls = 0
        self.fail_after = fail_after

    def __call__(self, model, batch):
        self.calls += 1
        return classification_loss(model, batch)


def test_measure_plane_resumes_an_interrupted_grid_and_refuses_mismatches(tmp_path):
    torch.manual_seed(0)
    model = MLP()
    batch = (torch.randn(8, 3), torch.randint(0, 2, (8,)))
    loss_fn = Counting()
    obj = ls.Objective(model, loss_fn, batch)
    plane = ls.random_plane(obj, seed=0).with_trajectory([obj.params()], steps=[7], labels=["here"], objective=obj)
    grid = np.linspace(-1, 1, 6)
    reference = ls.loss_plane(obj, plane.d1, plane.d2, grid, method="loop").loss

    class Stop(Exception):
        pass

    def interrupt(done, total, what):
        if done >= 12:
            raise Stop

    with RunStore(tmp_path / "run", settings={"x": 1}) as store:
        with pytest.raises(Stop):
            ls.measure_plane(store, "r", plane, obj, grid, method="loop", chunk=6, progress=interrupt)
    run = load_run(tmp_path / "run")
    partial = load_plane(run, "r")
    assert np.isfinite(partial.losses["probe"]).sum() == 12 and not partial.complete()
    loss_fn.calls = 0
    seen = []
    with RunStore(tmp_path / "run", settings={"x": 1}) as store:
        out = ls.measure_plane(store, "r", plane, obj, grid, method="loop", chunk=6,
                                progress=lambda d, t, w: seen.append((d, t)))
    assert loss_fn.calls == 36 - 12  # only the missing points
    assert seen[0] == (12, 36) and seen[-1] == (36, 36)
    np.testing.assert_array_equal(out["probe"].loss, reference)
    stored = load_plane(load_run(tmp_path / "run"), "r")
    assert stored.complete() and stored.kind == "random" and stored.dims == 2
    np.testing.assert_array_equal(stored.alphas, grid)
    assert stored.trajectory["label"].tolist() == ["here"] and stored.trajectory["step"].tolist() == [7]
    np.testing.assert_allclose(stored.trajectory["loss"], [obj.loss()])
    assert stored.config["seed"] == 0 and len(stored.config["digest"]) == 16
    # a finished grid costs nothing to ask for again
    loss_fn.calls = 0
    with RunStore(tmp_path / "run", settings={"x": 1}) as store:
        ls.measure_plane(store, "r", plane, obj, grid)
        assert loss_fn.calls == 0
        with pytest.raises(RunMismatchError, match="alphas"):
            ls.measure_plane(store, "r", plane, obj, np.linspace(-2, 2, 6))
        with pytest.raises(RunMismatchError, match="digest, seed"):
            ls.measure_plane(store, "r", ls.random_plane(obj, seed=1), obj, grid)
        other = ls.Objective(model, loss_fn, (batch[0] * 2, batch[1]))
        with pytest.raises(RunMismatchError, match="another batch"):
            ls.measure_plane(store, "r", plane, other, grid)
        ls.measure_plane(store, "line", ls.interpolation(obj.params(), plane.d1), {"probe": obj, "train": other}, 5)
    run = load_run(tmp_path / "run")
    assert list_planes(run) == ["r", "line"]
    line = load_plane(run)
    assert line.name == "line" and set(line.losses) == {"probe", "train"} and line.losses["train"].shape == (5,)
    with pytest.raises(NoDataError, match="its planes: r, line"):
        load_plane(run, "nope")


# -- the probe's saved points ---------------------------------------------------------------------------


def _train(save_points, tmp_path, steps=4, **kw):
    from landscape.measure import MeasureSettings
    from landscape.models import TinyCausalLM, lm_loss

    torch.manual_seed(0)
    model = TinyCausalLM(13, width=16, depth=1, heads=2, context=8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    pb = (torch.randint(0, 13, (4, 8), generator=gen), torch.randint(0, 13, (4, 8), generator=gen))
    before_step = []
    fast = MeasureSettings(line_points=4, line_min_before=2, line_max_points=8, smoothness=False, cosine=False,
                           method="hvp")
    with ls.Probe(model, lm_loss, pb, out=tmp_path / "run", every=50, recipes=["sgd", "adam"], settings=fast,
                  save_points=save_points, **kw) as probe:
        probe.attach(opt)
        for _ in range(steps):
            x = torch.randint(0, 13, (4, 8), generator=gen)
            lm_loss(model, (x, x.roll(-1, 1))).backward()
            before_step.append({n: p.detach().clone() for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
    return model, before_step


def test_probe_saves_the_points_it_is_asked_for(tmp_path):
    from landscape.checkpoints import describe_checkpoint, load_checkpoint
    from landscape.points import load_point, saved_steps

    plain, _ = _train(None, tmp_path / "a")
    model, xs = _train([2, 3], tmp_path / "b")
    for (n, p), q in zip(plain.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n  # saving points does not change training
    run = tmp_path / "b" / "run"
    assert saved_steps(run) == [2, 3] and not list((run / "points").glob("*.tmp"))
    for step in (2, 3):
        point = load_point(run, step)
        x_t = xs[step - 1]  # the probe's step t is the t-th optimizer step: x_t is before it
        for n, v in x_t.items():
            assert torch.equal(point.state_dict[n], v), n
        assert torch.equal(point.state_dict["head.weight"], x_t["tok.weight"])  # tied entries follow
        assert sorted(point.directions) == ["adam", "adam (trained)", "sgd"]
        trained = point.directions["adam (trained)"]
        for n in x_t:
            assert torch.equal(trained[n], x_t[n] - xs[step][n] if step < 4 else trained[n]), n
        assert point.meta["trained_direction"] == "adam (trained)"
        assert describe_checkpoint(point.path).step == step  # readable as a checkpoint, weights_only
        assert load_checkpoint(point.path).state_dict.keys() == point.state_dict.keys()
    assert any(e["kind"] == "point" for e in load_run(run).events())
    with pytest.raises(FileNotFoundError, match="saved steps: 2, 3"):
        load_point(run, 4)
    _, _ = _train(lambda s: s == 4, tmp_path / "c", save_directions=False)
    assert saved_steps(tmp_path / "c" / "run") == [4] and load_point(tmp_path / "c" / "run", 4).directions == {}
    with pytest.raises(ValueError, match="positive step"):
        _train([0], tmp_path / "d")


def test_save_point_is_crash_safe(tmp_path, monkeypatch):
    from landscape import points

    sd = {"w": torch.ones(3)}
    path = points.save_point(tmp_path, 5, sd)
    good = path.read_bytes()

    def broken(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(points.torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        points.save_point(tmp_path, 5, {"w": torch.zeros(3)})
    assert path.read_bytes() == good  # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert torch.equal(points.load_point(tmp_path, 5).state_dict["w"], torch.ones(3))


def test_state_at_replaces_tied_entries(tmp_path):
    from landscape.models import TinyCausalLM
    from landscape.points import state_at

    model = TinyCausalLM(7, width=8, depth=1, heads=2, context=4)
    x = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters()}
    state = state_at(model, x)
    assert torch.equal(state["head.weight"], x["tok.weight"]) and state.keys() == model.state_dict().keys()
    state["tok.weight"].add_(1)  # copies: the model is not aliased
    assert not torch.equal(model.tok.weight, state["tok.weight"])
    copy.deepcopy(state)
