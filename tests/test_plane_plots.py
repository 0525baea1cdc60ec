"""Figures of planes and lines (landscape.plane_plots), tested by reading the artists back."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import LogNorm
from torch import nn

import landscape as ls
import landscape.plane_plots as pp
from landscape.planes import Plane, load_plane
from landscape.store import NoDataError, RunStore, load_run


class Bowl(nn.Module):
    """f(x) = x₀² + 0.1·x₁² + 1 + c·x₂ (positive near the origin)."""

    def __init__(self, c: float = 0.0) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.zeros(3, dtype=torch.float64))
        self.c = c

    def forward(self, _b=None):
        return self.x[0] ** 2 + 0.1 * self.x[1] ** 2 + 1.0 + self.c * self.x[2]


def e(i):
    v = torch.zeros(3, dtype=torch.float64)
    v[i] = 1.0
    return {"x": v}


@pytest.fixture
def run(tmp_path):
    model = Bowl()
    obj = ls.Objective(model, lambda m, b: m(b), None)
    train = ls.Objective(Bowl(c=0.5), lambda m, b: m(b), None)
    center = obj.params()
    with RunStore(tmp_path / "run", settings={}) as store:
        # f depends on α only through x₀², on β through 0.1·x₁²; different grids on the two axes
        bowl = Plane("custom", e(0), e(1), center=center, x_label="alpha", y_label="beta", step=3,
                     markers={"u": [0.5, 0.0], "v": [0.0, 5.0], "v (same)": [0.01, 5.0]},
                     config={"scale": "unit"})
        ls.measure_plane(store, "bowl", bowl, obj, (np.linspace(-1, 1, 9), np.linspace(-2, 2, 7)))
        pts = [{"x": torch.tensor([a, b, 0.3], dtype=torch.float64)} for a, b in [(-0.8, -1.0), (-0.3, 0.5), (0.0, 0.0)]]
        traj = bowl.with_trajectory(pts, steps=[1, 2, 3], objective=obj)
        ls.measure_plane(store, "traj", traj, obj, (np.linspace(-1, 1, 9), np.linspace(-2, 2, 7)))
        line = ls.interpolation(center, {"x": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}, labels=("a", "b"))
        ls.measure_plane(store, "line", line.with_trajectory(pts, objective=obj), {"probe": obj, "train": train},
                         np.linspace(-0.5, 1.5, 9))
    return load_run(tmp_path / "run")


def test_contour_draws_the_stored_losses_the_right_way_round(run):
    sp = load_plane(run, "bowl")
    ax = pp.plane_contour(run, "bowl", levels=6)
    filled, lines = [c for c in ax.collections if hasattr(c, "levels")][:2]
    assert filled.filled and not lines.filled
    z = sp.losses["probe"]
    assert filled.levels[0] <= np.nanmin(z) and filled.levels[-1] >= np.nanmax(z)
    # f = x₀² + 0.1·x₁² + 1: each contour line is an ellipse, twice as wide along β as along α
    # (√10 for the exact bowl; the grid's linear interpolation only shifts it a little)
    level = lines.levels[len(lines.levels) // 2]
    verts = lines.get_paths()[len(lines.levels) // 2].vertices
    assert len(verts) > 4, level
    width_a, width_b = np.ptp(verts[:, 0]), np.ptp(verts[:, 1])
    assert width_b > 2 * width_a, (level, width_a, width_b)
    # labelled levels
    labels = [t for t in ax.texts if t.get_text() and t.get_text()[0].isdigit()]
    assert labels and all(float(t.get_text()) in {float(f"{v:.3g}") for v in lines.levels} for t in labels)
    # the centre, at the origin
    (centre,) = [ln for ln in ax.lines if ln.get_label().startswith("centre")]
    assert centre.get_label() == "centre (step 3)" and centre.get_xydata().tolist() == [[0.0, 0.0]]
    # markers: arrows from the centre, near-identical ones merged, shortened together to fit the axes
    arrows = {a.get_gid(): a for a in ax.texts if (a.get_gid() or "").startswith("arrow:")}
    assert set(arrows) == {"arrow:u", "arrow:v, v (same)"}
    f = 0.85 * 2.0 / 5.0  # v at β = 5 leaves the β axis (±2): every arrow scaled by 0.34
    np.testing.assert_allclose(arrows["arrow:u"].xy, (0.5 * f, 0.0))
    np.testing.assert_allclose(arrows["arrow:v, v (same)"].xy, (0.0, 5.0 * f))
    assert {t.get_text() for t in ax.texts} >= {"u", "v, v (same)"}
    assert ax.get_xlim() == (-1.0, 1.0) and ax.get_ylim() == (-2.0, 2.0)
    assert ax.get_xlabel() == "alpha" and len(ax.figure.axes) == 2  # and a colour bar


def test_contour_log_scale_trajectory_and_options(run):
    ax = pp.plane_contour(run, "traj", log=True, levels=5, labels=False, colorbar=False)
    filled = next(c for c in ax.collections if getattr(c, "filled", False))
    assert isinstance(filled.norm, LogNorm)
    ratios = filled.levels[1:] / filled.levels[:-1]
    np.testing.assert_allclose(ratios, ratios[0])  # geometrically spaced
    (traj,) = [ln for ln in ax.lines if ln.get_label() == "trajectory"]
    np.testing.assert_allclose(traj.get_xydata(), [[-0.8, -1.0], [-0.3, 0.5], [0.0, 0.0]], atol=1e-12)
    assert {t.get_text() for t in ax.texts} >= {"1", "3"}  # first and last step
    assert len(ax.figure.axes) == 1
    bar = pp.plane_contour(run, "traj", log=True, levels=5).figure.axes[1]
    ticks = [t.get_text() for t in bar.get_yticklabels()]
    assert ticks and all(float(t) > 0 for t in ticks), ticks  # plain numbers, not 1.23×10⁰
    _, mine = plt.subplots()
    assert pp.plane_contour(run, "traj", ax=mine, trajectory=False, markers=False) is mine
    assert not [ln for ln in mine.lines if ln.get_label() == "trajectory"]


def test_log_scale_needs_positive_losses(tmp_path):
    model = Bowl()
    obj = ls.Objective(model, lambda m, b: m(b) - 10.0, None)
    with RunStore(tmp_path / "neg", settings={}) as store:
        ls.measure_plane(store, "neg", Plane("custom", e(0), e(1), center=obj.params()), obj, 5)
    with pytest.raises(ValueError, match="positive"):
        pp.plane_contour(load_run(tmp_path / "neg"), log=True)


def test_surface_is_three_dimensional(run):
    ax = pp.plane_surface(run, "traj")
    assert ax.name == "3d"
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection

    assert any(isinstance(c, Poly3DCollection) for c in ax.collections)
    (traj,) = [ln for ln in ax.lines if ln.get_label() == "trajectory"]
    xs, ys, zs = traj.get_data_3d()
    sp = load_plane(run, "traj")
    np.testing.assert_allclose(zs, sp.trajectory["loss"])
    assert ax.get_zlabel() == "probe loss"
    assert pp.plane_surface(run, "traj", log=True).get_zlabel() == "log₁₀ probe loss"
    with pytest.raises(ValueError, match="3-D axes"):
        pp.plane_surface(run, "traj", ax=plt.subplots()[1])


def test_lines_show_train_and_probe_loss(run):
    sp = load_plane(run, "line")
    ax = pp.plane_lines(run, "line", log=True)
    curves = {ln.get_label(): ln for ln in ax.lines}
    np.testing.assert_allclose(curves["train loss"].get_ydata(), sp.losses["train"])
    np.testing.assert_allclose(curves["probe loss"].get_ydata(), sp.losses["probe"])
    np.testing.assert_allclose(curves["probe loss"].get_xdata(), np.linspace(-0.5, 1.5, 9))
    # f(αe₀) = α² + 1 along the line from 0 to e₀, the train objective adds 0.5·x₂ = 0
    np.testing.assert_allclose(sp.losses["probe"], np.linspace(-0.5, 1.5, 9) ** 2 + 1.0)
    ends = sorted(ln.get_gid() for ln in ax.lines if (ln.get_gid() or "").startswith("marker:"))
    assert ends == ["marker:a", "marker:b"]
    points = curves["points (probe loss)"]
    np.testing.assert_allclose(points.get_ydata(), sp.trajectory["loss"])
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["train loss", "probe loss"]
    only = pp.plane_lines(run, "line", objectives=["probe"])
    assert [ln.get_label() for ln in only.lines if ln.get_label().endswith(" loss")] == ["probe loss"]


def test_wrong_kind_of_figure_or_missing_data_is_clear(run):
    with pytest.raises(ValueError, match="is a line"):
        pp.plane_contour(run, "line")
    with pytest.raises(ValueError, match="is a plane"):
        pp.plane_lines(run, "bowl")
    with pytest.raises(NoDataError, match="no 'train' losses"):
        pp.plane_contour(run, "bowl", objective="train")
    with pytest.raises(NoDataError, match="no plane 'nope'"):
        pp.plane_contour(run, "nope")


def test_save_plane_figures_writes_one_file_per_plane(run, tmp_path):
    paths = pp.save_plane_figures(run, tmp_path / "figs", "svg", surface=True)
    assert [p.name for p in paths] == ["plane_bowl.svg", "plane_bowl_surface.svg", "plane_traj.svg",
                                       "plane_traj_surface.svg", "line_line.svg"]
    assert all(p.stat().st_size > 0 for p in paths)
    assert pp.save_plane_figures(run, tmp_path / "one", "png", names=["line"])[0].name == "line_line.png"
    assert not plt.get_fignums()
