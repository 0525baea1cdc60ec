"""Plots: the numbers drawn are the stored numbers; styles are consistent; missing data is loud."""

from __future__ import annotations

import colorsys
import sys

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from landscape import plots as lp
from landscape.store import NoDataError, RunStore, load_run
from tests._synthetic import write_synthetic_run


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.lines}


def hls(color) -> tuple[float, float, float]:
    return colorsys.rgb_to_hls(*to_rgb(color))


def hue_distance(a, b) -> float:
    """Distance between the hues of two colours on the hue circle (red is near 0 and near 1)."""
    d = abs(hls(a)[0] - hls(b)[0])
    return min(d, 1.0 - d)


@pytest.fixture
def small_run(tmp_path):
    """Three recipes and the trained direction, two measured steps: quick to save."""
    return load_run(write_synthetic_run(tmp_path / "small", measured=(0, 50), recipes=("sgd", "sgd_clip", "adam")))


@pytest.fixture
def empty_run(tmp_path):
    RunStore(tmp_path / "empty", settings={}, meta={"recipes": ["sgd"]}).close()
    return load_run(tmp_path / "empty")


# -- style -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "base", "suffix"),
    [("adam", "adam", ""), ("adam_clip", "adam", "_clip"), ("adam_clip_update", "adam", "_clip_update"),
     ("lion_clip_update", "lion", "_clip_update"), ("adam_valueclip", "adam", "_valueclip"),
     ("adam_normclip", "adam", "_normclip"), ("smoothed_signsgd", "smoothed_signsgd", ""), ("_clip", "_clip", "")],
)
def test_split_recipe(name, base, suffix):
    assert lp.split_recipe(name) == (base, suffix)


@pytest.mark.parametrize("variant", ["adam_clip", "adam_clip_update", "adam_valueclip", "adam_normclip"])
def test_variants_share_the_base_hue_lighter_and_dashed(variant):
    base, var = lp.recipe_style("adam"), lp.recipe_style(variant)
    assert hue_distance(base["color"], var["color"]) < 0.02
    assert hls(var["color"])[1] > hls(base["color"])[1] + 0.1  # lighter
    assert base["linestyle"] == "-" and var["linestyle"] != "-"


def test_distinct_bases_trained_in_black_and_unknown_names_stable():
    colors = {lp.recipe_style(b)["color"] for b in ("sgd", "adam", "adafactor", "lion", "signsgd", "normsgd")}
    assert len(colors) == 6
    assert to_rgb(lp.recipe_style("adam (trained)")["color"]) == (0.0, 0.0, 0.0)
    assert to_rgb(lp.recipe_style("my_opt", trained=True)["color"]) == (0.0, 0.0, 0.0)
    assert lp.recipe_style("mystery_opt") == lp.recipe_style("mystery_opt")
    assert hue_distance(lp.recipe_style("mystery_opt_clip")["color"], lp.recipe_style("mystery_opt")["color"]) < 0.02


def test_paper_style_is_scoped():
    before = mpl.rcParams["pdf.fonttype"], mpl.rcParams["font.size"]
    with lp.paper_style():
        assert mpl.rcParams["pdf.fonttype"] == 42 and mpl.rcParams["font.size"] == 8
    assert (mpl.rcParams["pdf.fonttype"], mpl.rcParams["font.size"]) == before


# -- landscape lines -------------------------------------------------------------------------------


def test_landscape_lines_draw_the_stored_curves(synthetic_run):
    run = synthetic_run
    ax = lp.landscape_lines(run)
    assert ax.get_title() == "step 100"  # default: the last measured step
    drawn = lines_by_label(ax)
    rows = run.rows("lines", step=100)
    assert [line.get_label() for line in ax.lines if not line.get_label().startswith("_")] == run.directions
    for r in rows:
        line = drawn[r["direction"]]
        np.testing.assert_array_equal(line.get_xdata(), r["s"])
        np.testing.assert_array_equal(line.get_ydata(), r["loss"])  # NaN and inf included
        best = drawn[f"_best {r['direction']}"]
        assert (best.get_xdata()[0], best.get_ydata()[0]) == (r["best_step"], r["best_loss"])
        assert best.get_color() == line.get_color()
    # sgd explodes: the y axis is capped so the others stay readable, the data are not altered
    assert ax.get_ylim()[1] < np.nanmax(drawn["sgd"].get_ydata()[np.isfinite(drawn["sgd"].get_ydata())])
    assert to_rgb(drawn["adam (trained)"].get_color()) == (0, 0, 0)
    assert drawn["sgd_clip"].get_linestyle() == "--"


def test_landscape_lines_options(synthetic_run):
    run = synthetic_run
    ax = lp.landscape_lines(run, step=50, directions=["adam", "sgd"], relative=True, clip_y=False)
    assert [line.get_label() for line in ax.lines] == ["adam", "_best adam", "sgd", "_best sgd"]
    r = run.rows("lines", step=50, direction="adam")[0]
    np.testing.assert_allclose(lines_by_label(ax)["adam"].get_ydata(), r["loss"] - r["loss"][0])
    assert lines_by_label(ax)["adam"].get_ydata()[0] == 0.0
    assert ax.get_ylabel() == r"loss $-$ loss(0)"


def test_missing_step_or_direction_is_named(synthetic_run):
    with pytest.raises(NoDataError, match=r"step 7 has no rows in table 'lines'.*measured steps: 0, 50, 100"):
        lp.landscape_lines(synthetic_run, step=7)
    with pytest.raises(NoDataError, match=r"direction\(s\) 'adamw' not in run.*available: sgd, sgd_clip"):
        lp.landscape_lines(synthetic_run, directions=["adamw"])


@pytest.mark.parametrize(
    "fn",
    [lp.landscape_lines, lp.sharpness_ratio, lp.sharpness_over_time, lp.update_histograms, lp.cosine_heatmap,
     lp.training_loss, lp.smoothness_scatter, lp.coordinate_smoothness],
)
def test_every_plot_uses_and_returns_the_given_axes(small_run, fn):
    fig, ax = plt.subplots()
    assert fn(small_run, ax=ax) is ax
    assert ax.has_data()
    assert fn(small_run).figure is not fig  # ax=None: a new figure


@pytest.mark.parametrize(
    "fn",
    [lp.landscape_lines, lp.sharpness_ratio, lp.sharpness_over_time, lp.update_histograms, lp.cosine_heatmap,
     lp.training_loss, lp.smoothness_scatter, lp.coordinate_smoothness],
)
def test_every_plot_refuses_an_empty_run(empty_run, fn):
    with pytest.raises(NoDataError, match="empty"):
        fn(empty_run)


# -- sharpness over training -----------------------------------------------------------------------


def test_sharpness_ratio_plots_abs_ratio_with_negative_markers(synthetic_run):
    run = synthetic_run
    ax = lp.sharpness_ratio(run)
    assert ax.get_yscale() == "log"
    drawn = lines_by_label(ax)
    assert "sgd" not in drawn  # it is the reference line y = 1
    np.testing.assert_array_equal(drawn["sgd (= 1)"].get_ydata(), [1, 1])
    cols = run.columns("sharpness")
    for d in run.directions:
        if d == "sgd":
            continue
        m = cols["direction"] == d
        np.testing.assert_array_equal(drawn[d].get_xdata(), cols["step"][m])
        np.testing.assert_array_equal(drawn[d].get_ydata(), np.abs(cols["ratio_to_sgd"][m]))
    # gensignsgd's NaN at step 0 is a gap; lion's negative (δ-shifted) ratio at step 100 an open triangle
    assert np.isnan(drawn["gensignsgd"].get_ydata()[0])
    neg = drawn["_shifted negative lion"]
    assert list(neg.get_xdata()) == [100] and neg.get_markerfacecolor() == "white" and neg.get_marker() == "^"
    assert neg.get_ydata()[0] == pytest.approx(-run.rows("sharpness", step=100, direction="lion")[0]["ratio_to_sgd"])
    pos = drawn["_shifted adam"]  # positive after the shift: a filled triangle
    assert list(pos.get_xdata()) == [50] and pos.get_markerfacecolor() == drawn["adam"].get_color()
    assert lp._NEGATIVE_LABEL in drawn and lp._SHIFTED_LABEL in drawn
    assert lp._UNDEFINED_LABEL not in drawn  # SGD is positive at every step
    assert [t.get_text() for t in ax.get_legend().get_texts()][-1] == "sgd (= 1)"


def test_sharpness_ratio_without_sgd_is_no_data(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("adam",), trained=None, smoothness=False))
    for r in run.rows("sharpness"):
        assert r["ratio_to_sgd"] is not None  # the synthetic writer computed it from a phantom sgd ...
    with RunStore(run.path, settings=run.settings) as s:  # ... so drop it, as a real run without sgd has none
        s.write("sharpness", [{**{k: v for k, v in r.items() if k != "ratio_to_sgd"}} for r in run.rows("sharpness")])
    with pytest.raises(NoDataError, match="ratio_to_sgd"):
        lp.sharpness_ratio(run)


def test_sharpness_over_time(synthetic_run):
    run = synthetic_run
    ax = lp.sharpness_over_time(run, directions=["adam", "lion"])
    drawn = lines_by_label(ax)
    for d in ("adam", "lion"):
        c = run.columns("sharpness", direction=d)
        np.testing.assert_array_equal(drawn[d].get_ydata(), np.abs(c["sharpness"]))
    assert "_shifted negative lion" in drawn and "_shifted adam" in drawn and "_negative adam" not in drawn
    assert list(drawn["_shifted adam"].get_xdata()) == [50]


def test_sharpness_ratio_marks_steps_where_it_is_undefined(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", sgd_negative=(50,), legacy_ratios=True))
    ax = lp.sharpness_ratio(run)
    drawn = lines_by_label(ax)
    for d in run.directions:
        if d != "sgd":  # the stored legacy ratio at step 50 (two negatives) is not drawn
            assert np.isnan(drawn[d].get_ydata()[1]) and np.isfinite(drawn[d].get_ydata()[2])
    assert list(drawn[lp._UNDEFINED_LABEL].get_xdata()) == [50, 50]
    over = lines_by_label(lp.sharpness_over_time(run, directions=["sgd"]))
    assert list(over["_shifted negative sgd"].get_xdata()) == [50] and over["sgd"].get_ydata()[1] == 2.0


# -- histograms and cosines ------------------------------------------------------------------------


def test_update_histograms_draw_fractions_of_all_coordinates(synthetic_run):
    run = synthetic_run
    ax = lp.update_histograms(run, step=50)
    patches = {p.get_label(): p for p in ax.patches}
    assert list(patches) == run.directions
    for r in run.rows("histograms", step=50):
        values, edges, _ = patches[r["direction"]].get_data()
        np.testing.assert_array_equal(edges, r["edges"])
        np.testing.assert_allclose(values, r["counts"] / (r["counts"].sum() + r["zeros"]))
    ax = lp.update_histograms(run, step=50, directions=["signsgd"], density=False)
    np.testing.assert_array_equal(ax.patches[0].get_data()[0], run.rows("histograms", step=50, direction="signsgd")[0]["counts"])


def test_saved_histograms_follow_seed_002_figure_1(small_run, tmp_path):
    assert lp._fig1_directions(small_run) == ["sgd", "adam", "adam (trained)"]  # not sgd_clip
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("lion",), trained=None, smoothness=False))
    assert lp._fig1_directions(run) is None  # none of SGD/Adam/Adafactor: every direction


def test_cosine_heatmap_shows_the_symmetric_matrix(synthetic_run):
    run = synthetic_run
    ax = lp.cosine_heatmap(run, step=0)
    matrix = np.asarray(ax.images[0].get_array())
    names = [t.get_text() for t in ax.get_xticklabels()]
    assert names == run.directions == [t.get_text() for t in ax.get_yticklabels()]
    np.testing.assert_array_equal(np.diag(matrix), 1.0)
    np.testing.assert_array_equal(matrix, matrix.T)
    for r in run.rows("cosine", step=0):
        assert matrix[names.index(r["a"]), names.index(r["b"])] == r["cosine"]
    n = len(names)
    assert len(ax.texts) == n * n
    assert ax.images[0].get_clim() == (-1.0, 1.0)


# -- training loss and smoothness ------------------------------------------------------------------


def test_training_loss(synthetic_run):
    run = synthetic_run
    ax = lp.training_loss(run)
    drawn = lines_by_label(ax)
    c = run.columns("steps")
    np.testing.assert_array_equal(drawn["training loss"].get_xdata(), c["step"])
    np.testing.assert_array_equal(drawn["training loss"].get_ydata(), c["loss"])
    assert list(drawn["skipped"].get_xdata()) == [37]
    assert list(drawn["measured"].get_xdata()) == [0, 50, 100]


def test_smoothness_scatter_points_and_envelope(synthetic_run):
    run = synthetic_run
    ax = lp.smoothness_scatter(run)
    c = run.columns("smoothness")
    points = ax.collections[0]
    np.testing.assert_array_equal(points.get_offsets(), np.column_stack([c["grad_norm"], c["l_hat"]]))
    np.testing.assert_array_equal(points.get_array(), c["step"])
    pytest.importorskip("landscape.smoothness")
    from landscape.smoothness import fit_l0_l1

    envelope = [line for line in ax.lines if line.get_gid() == "envelope"]
    assert len(envelope) == 1
    fit = fit_l0_l1(c["grad_norm"], c["l_hat"])
    x = envelope[0].get_xdata()
    np.testing.assert_allclose(envelope[0].get_ydata(), fit.l0 + fit.l1 * x)
    assert np.all(fit.l0 + fit.l1 * c["grad_norm"] >= c["l_hat"] - 1e-9)  # an upper envelope


def test_smoothness_without_the_fit_module_draws_no_envelope(synthetic_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "landscape.smoothness", None)  # import now raises ImportError
    ax = lp.smoothness_scatter(synthetic_run)
    assert len(ax.collections) == 1 and not ax.lines


def test_coordinate_smoothness(synthetic_run):
    run = synthetic_run
    ax = lp.coordinate_smoothness(run)
    rows = run.rows("coord_smoothness", layer="embed.weight")  # the first stored layer
    assert ax.get_title() == "embed.weight" and ax.get_xscale() == "log"
    expected = np.column_stack([np.concatenate([r["min_grad"] for r in rows]), np.concatenate([r["ratio"] for r in rows])])
    np.testing.assert_array_equal(ax.collections[0].get_offsets(), expected)
    np.testing.assert_array_equal(ax.collections[0].get_array(), np.repeat([r["step"] for r in rows], 50))
    ax = lp.coordinate_smoothness(run, layer="blocks.0.attn.qkv.weight", loglog=False, envelope=False)
    assert ax.get_xscale() == "linear" and not ax.lines
    with pytest.raises(NoDataError, match="layer 'nope' not in run.*layers: embed.weight"):
        lp.coordinate_smoothness(run, layer="nope")


# -- saving ----------------------------------------------------------------------------------------


def test_save_figures_pdf_embeds_truetype(small_run, tmp_path):
    paths = lp.save_figures(small_run, tmp_path / "figs", fmt="pdf", only=["coordinate_smoothness", "smoothness"])
    assert [p.name for p in paths] == ["smoothness.pdf", "coordinate_smoothness.pdf"]  # FIGURE_NAMES order
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"%PDF") and b"/FontFile2" in data and b"/Type3" not in data, p.name
    assert plt.get_fignums() == []  # saving leaves no pyplot figure behind


def test_save_figures_skips_what_has_no_data(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0, 10), recipes=("sgd", "adam"), smoothness=False))
    paths = lp.save_figures(run, tmp_path / "svg", fmt="svg", every_step=True,
                            only=["smoothness", "coordinate_smoothness", "landscape_lines"])
    assert [p.name for p in paths] == ["landscape_lines.svg", "landscape_lines_step0.svg", "landscape_lines_step10.svg"]
    assert "<text" in paths[0].read_text()  # svg.fonttype "none": text kept as text
    with pytest.raises(ValueError, match="png, pdf, svg"):
        lp.save_figures(run, tmp_path, fmt="jpg")
    with pytest.raises(ValueError, match="unknown figure.*lines.*figures are training_loss"):
        lp.save_figures(run, tmp_path, only=["lines"])


def test_save_figures_of_an_empty_run_writes_nothing(empty_run, tmp_path):
    assert lp.save_figures(empty_run, tmp_path / "none") == []
