"""Plots: the numbers drawn are the stored numbers; styles are consistent; missing data is loud."""

from __future__ import annotations

import sys

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.colors import to_rgb

from landscape import _directions as dirs
from landscape import plots as lp
from landscape._style import BASE_COLORS, run_styles
from landscape.store import NoDataError, RunStore, load_run
from tests._synthetic import RECIPES, write_synthetic_run

PAPER_DEFAULT = [d for d in list(RECIPES) + ["adam (trained)"] if d not in dirs.EXTRA_RECIPES]


def lines_by_label(ax) -> dict:
    return {line.get_label(): line for line in ax.lines}


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
def test_variants_share_the_base_colour_at_a_lower_opacity_and_own_line_style(variant):
    base, var = lp.recipe_style("adam"), lp.recipe_style(variant)
    assert to_rgb(base["color"]) == to_rgb(var["color"])  # the paper's Fig. 2: same colour ...
    assert base["alpha"] == 1.0 and var["alpha"] < 0.8  # ... different opacity
    assert base["linestyle"] == "-" and var["linestyle"] != "-"


def test_every_direction_of_a_run_has_its_own_style():
    directions = list(RECIPES) + ["adam (trained)", "my_opt", "my_opt_clip", "other_opt"]
    styles = run_styles(directions, "adam (trained)")
    keys = {(to_rgb(st["color"]), str(st["linestyle"]), st["alpha"]) for st in styles.values()}
    assert len(keys) == len(directions)
    # recipes of your own get colours no known family uses, one per family, their variants share it
    known = {to_rgb(c) for c in BASE_COLORS.values()}
    assert to_rgb(styles["my_opt"]["color"]) not in known and to_rgb(styles["other_opt"]["color"]) not in known
    assert styles["my_opt"]["color"] == styles["my_opt_clip"]["color"] != styles["other_opt"]["color"]
    assert run_styles(directions, "adam (trained)") == styles  # stable


def test_distinct_bases_trained_in_black_and_unknown_names_stable():
    colors = {lp.recipe_style(b)["color"] for b in ("sgd", "adam", "adafactor", "lion", "signsgd", "normsgd")}
    assert len(colors) == 6
    assert to_rgb(lp.recipe_style("adam (trained)")["color"]) == (0.0, 0.0, 0.0)
    assert to_rgb(lp.recipe_style("my_opt", trained=True)["color"]) == (0.0, 0.0, 0.0)
    assert lp.recipe_style("mystery_opt") == lp.recipe_style("mystery_opt")
    assert lp.recipe_style("mystery_opt_clip")["color"] == lp.recipe_style("mystery_opt")["color"]


def test_paper_style_is_scoped():
    before = mpl.rcParams["pdf.fonttype"], mpl.rcParams["font.size"]
    with lp.paper_style():
        assert mpl.rcParams["pdf.fonttype"] == 42 and mpl.rcParams["font.size"] == 8
    assert (mpl.rcParams["pdf.fonttype"], mpl.rcParams["font.size"]) == before


# -- landscape lines -------------------------------------------------------------------------------


def test_landscape_lines_draw_the_stored_points_and_a_smooth_curve_through_them(synthetic_run):
    run = synthetic_run
    ax = lp.landscape_lines(run)
    assert ax.get_title() == "step 100"  # default: the last measured step
    drawn = lines_by_label(ax)
    rows = run.rows("lines", step=100)
    curves = [line.get_label() for line in ax.lines if line.get_gid() == "curve"]
    assert curves == PAPER_DEFAULT  # the paper's directions and the trained one, in the run's order
    for r in rows:
        if r["direction"] not in curves:
            continue
        line = drawn[r["direction"]]
        points = drawn[f"_points {r['direction']}"]
        np.testing.assert_array_equal(points.get_xdata(), r["s"])  # the measured data, NaN and inf included
        np.testing.assert_array_equal(points.get_ydata(), r["loss"])
        xs, ys = np.asarray(line.get_xdata()), np.asarray(line.get_ydata())
        assert xs.size > 5 * len(r["s"])  # the drawing is dense ...
        finite = np.isfinite(r["loss"])
        for s_, l_ in zip(r["s"][finite], r["loss"][finite]):  # ... and passes through every finite point
            assert ys[np.flatnonzero(xs == s_)[0]] == l_
        best = drawn[f"_best {r['direction']}"]
        assert (best.get_xdata()[0], best.get_ydata()[0]) == (r["best_step"], r["best_loss"])
        assert best.get_color() == line.get_color()
    # sgd explodes: the y axis is capped so the others stay readable, the data are not altered
    sgd = drawn["_points sgd"].get_ydata()
    assert ax.get_ylim()[1] < np.nanmax(sgd[np.isfinite(sgd)])
    assert to_rgb(drawn["adam (trained)"].get_color()) == (0, 0, 0)
    assert drawn["sgd_clip"].get_linestyle() == "--" and drawn["sgd_clip"].get_alpha() < 1
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert lp._BEST_LABEL in legend and lp._POINTS_LABEL in legend  # the markers are explained


def test_landscape_lines_options(synthetic_run):
    run = synthetic_run
    ax = lp.landscape_lines(run, step=50, directions=["adam", "sgd"], relative=True, clip_y=False, points=False,
                            explain=False)
    assert [line.get_label() for line in ax.lines] == ["adam", "_best adam", "sgd", "_best sgd"]
    r = run.rows("lines", step=50, direction="adam")[0]
    drawn = lines_by_label(ax)["adam"]
    xs, ys = np.asarray(drawn.get_xdata()), np.asarray(drawn.get_ydata())
    np.testing.assert_allclose(ys[np.isin(xs, r["s"])], r["loss"] - r["loss"][0])
    assert ys[0] == 0.0
    assert ax.get_ylabel() == r"loss $-$ loss(0)"
    ax = lp.landscape_lines(run, step=50, directions="all", x="best")  # every curve's minimum at s/s* = 1
    for line in ax.lines:
        if line.get_label().startswith("_best "):
            assert line.get_xdata()[0] == pytest.approx(1.0)
    assert len([line for line in ax.lines if line.get_gid() == "curve"]) == len(run.directions)
    with pytest.raises(ValueError, match="x must be one of s, best"):
        lp.landscape_lines(run, x="lr")


def test_smooth_curve_is_the_monotone_cubic_through_the_points():
    interpolate = pytest.importorskip("scipy.interpolate")
    rng = np.random.default_rng(0)
    s = np.sort(np.concatenate([[0.0], rng.uniform(0, 3, 11)]))
    loss = 2.0 - s + 0.5 * s**2 + 0.05 * rng.standard_normal(s.size)
    xs, ys = lp.smooth_curve(s, loss)
    assert np.all(np.diff(xs) > 0) and set(s) <= set(xs)
    np.testing.assert_allclose(ys, interpolate.PchipInterpolator(s, loss)(xs), rtol=1e-12, atol=1e-12)
    for k in range(s.size - 1):  # no overshoot: between two points the drawing stays between them
        inside = (xs >= s[k]) & (xs <= s[k + 1])
        assert ys[inside].min() >= min(loss[k], loss[k + 1]) - 1e-12
        assert ys[inside].max() <= max(loss[k], loss[k + 1]) + 1e-12
    # a non-finite loss is a gap, not an interpolated value
    loss[5] = np.inf
    xs, ys = lp.smooth_curve(s, loss)
    gap = np.flatnonzero(np.isnan(ys))
    assert gap.size == 1 and s[4] < xs[gap[0] - 1] + 1e-12 and xs[gap[0] + 1] == s[6]


def test_line_panels_one_per_family_with_their_own_x_axis(synthetic_run):
    run = synthetic_run
    axes = lp.landscape_line_panels(run)
    titles = [ax.get_title() for ax in axes]
    assert titles == ["SGD", "normalized SGD", "signSGD", "Adam", "Adafactor", "Lion"]
    curves = {ax.get_title(): [line.get_label() for line in ax.lines if line.get_gid() == "curve"] for ax in axes}
    assert curves["SGD"] == ["sgd", "sgd_clip"]
    assert curves["Adam"] == ["adam", "adam_clip", "adam_clip_update", "adam (trained)"]  # Adam trained this run
    assert curves["Lion"] == ["lion", "lion_clip_update"]
    adam = {line.get_label(): line for line in axes[3].lines}
    assert adam["adam"].get_color() == adam["adam_clip"].get_color()  # a family: one colour ...
    assert adam["adam_clip"].get_alpha() < adam["adam"].get_alpha()  # ... two opacities
    assert len({ax.get_ylim() for ax in axes}) == 1  # the depths compare across panels
    for ax in axes:  # each x axis ends where its curves leave the y range (at least past the best steps)
        bests = [line.get_xdata()[0] for line in ax.lines if line.get_label().startswith("_best ")]
        assert ax.get_xlim()[1] >= max(bests)
    every = lp.landscape_line_panels(run, directions="all")
    assert [ax.get_title() for ax in every][-3:] == ["generalized signSGD", "smoothed signSGD", "smoothed normSGD"]


def test_missing_step_or_direction_is_named(synthetic_run):
    with pytest.raises(NoDataError, match=r"step 7 has no rows in table 'lines'.*measured steps: 0, 50, 100"):
        lp.landscape_lines(synthetic_run, step=7)
    with pytest.raises(NoDataError, match=r"direction\(s\) 'adamw' not in run.*available: sgd, sgd_clip"):
        lp.landscape_lines(synthetic_run, directions=["adamw"])
    with pytest.raises(NoDataError, match=r"'nothing\*' not in run"):
        lp.sharpness_ratio(synthetic_run, directions=["adam*", "nothing*"])


def test_directions_take_names_patterns_and_all(synthetic_run):
    run = synthetic_run
    ax = lp.sharpness_over_time(run, directions=["adam*", "sgd"])
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_") and line.get_xdata().size]
    assert labels[:6] == ["adam", "adam_clip", "adam_clip_update", "adam_valueclip", "adam_normclip", "adam (trained)"]
    assert labels[6] == "sgd"
    ax = lp.sharpness_over_time(run, directions="all")
    assert {line.get_label() for line in ax.lines} >= set(run.directions)
    assert dirs.select(["a", "b_clip", "c"], "b*,c") == ["b_clip", "c"]


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
    ax = lp.sharpness_ratio(run, directions=[d for d in run.directions if d != "sgd"])
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
    ax = lp.sharpness_ratio(run, directions=[d for d in run.directions if d != "sgd"])
    drawn = lines_by_label(ax)
    for d in run.directions:
        if d != "sgd":  # the stored legacy ratio at step 50 (two negatives) is not drawn
            assert np.isnan(drawn[d].get_ydata()[1]) and np.isfinite(drawn[d].get_ydata()[2])
    assert list(drawn[lp._UNDEFINED_LABEL].get_xdata()) == [50, 50]
    over = lines_by_label(lp.sharpness_over_time(run, directions=["sgd"]))
    assert list(over["_shifted negative sgd"].get_xdata()) == [50] and over["sgd"].get_ydata()[1] == 2.0


# -- histograms and cosines ------------------------------------------------------------------------


def test_update_histograms_normalise_every_direction_the_same_way(synthetic_run):
    run = synthetic_run
    ax = lp.update_histograms(run, step=50, directions="all")
    patches = {p.get_label(): p for p in ax.patches}
    assert list(patches) == run.directions
    norms = {r["direction"]: r["update_norm"] for r in run.rows("sharpness", step=50)}
    for r in run.rows("histograms", step=50):
        values, edges, _ = patches[r["direction"]].get_data()
        n = r["counts"].sum() + r["zeros"]
        rms = norms[r["direction"]] / np.sqrt(n)  # RMS(u) = ‖u‖₂/√n
        np.testing.assert_allclose(edges, r["edges"] - np.log10(rms))
        np.testing.assert_allclose(values, r["counts"] / n)
    assert "RMS" in ax.get_xlabel()
    ax = lp.update_histograms(run, step=50, directions=["signsgd"], density=False, normalize="l2")
    values, edges, _ = ax.patches[0].get_data()
    row = run.rows("histograms", step=50, direction="signsgd")[0]
    np.testing.assert_array_equal(values, row["counts"])
    np.testing.assert_allclose(edges, row["edges"] - np.log10(norms["signsgd"]))
    assert r"\|u\|_2" in ax.get_xlabel()
    ax = lp.update_histograms(run, step=50, directions=["signsgd"], normalize=None, trim=0)
    np.testing.assert_array_equal(ax.patches[0].get_data()[1], row["edges"])


def test_update_histograms_trim_empty_tails(synthetic_run):
    run = synthetic_run
    ax = lp.update_histograms(run, step=50, directions=["sgd"], normalize=None, trim=0)
    row = run.rows("histograms", step=50, direction="sgd")[0]
    full = ax.get_xlim()
    filled = np.flatnonzero(row["counts"])
    lo, hi = row["edges"][filled[0]], row["edges"][filled[-1] + 1]
    assert full[0] <= lo and full[1] >= hi and full[0] > lo - 0.1 * (hi - lo)  # empty outer bins are cut
    frac = row["counts"] / (row["counts"].sum() + row["zeros"])
    ax = lp.update_histograms(run, step=50, directions=["sgd"], normalize=None, trim=0.01)
    kept = np.flatnonzero(frac >= 0.01)
    assert ax.get_xlim()[0] > row["edges"][kept[0]] - 0.1 * (hi - lo) and ax.get_xlim()[0] >= full[0]


def test_histograms_default_to_the_directions_of_the_papers_figure_1(small_run, tmp_path):
    assert lp._fig1_directions(small_run) == ["sgd", "adam", "adam (trained)"]  # not sgd_clip
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("lion",), trained=None, smoothness=False))
    assert lp._fig1_directions(run) is None  # none of SGD/Adam/Adafactor: every direction


def test_cosine_heatmap_shows_one_triangle(synthetic_run):
    run = synthetic_run
    ax = lp.cosine_heatmap(run, step=0, directions="all")
    matrix = np.asarray(np.ma.filled(ax.images[0].get_array(), np.nan), dtype=float)
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    assert cols == run.directions[:-1] and rows == run.directions[1:]
    assert np.isnan(matrix[np.triu_indices(len(rows), k=1)]).all()  # the upper triangle is blank
    stored = {frozenset((r["a"], r["b"])): r["cosine"] for r in run.rows("cosine", step=0)}
    for i, a in enumerate(rows):
        for j, b in enumerate(cols[: i + 1]):
            assert matrix[i, j] == stored[frozenset((a, b))]
    n = len(run.directions)
    assert len(ax.texts) == n * (n - 1) // 2
    assert ax.images[0].get_clim() == (-1.0, 1.0)  # some cosines are negative: the diverging scale


def test_cosine_heatmap_is_sequential_when_every_value_is_positive(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("sgd", "adam", "adam_clip")))
    rows = run.rows("cosine", step=0)
    with RunStore(run.path, settings=run.settings) as store:
        store.write("cosine", [{**r, "cosine": abs(r["cosine"])} for r in rows])
    ax = lp.cosine_heatmap(run)
    assert ax.images[0].get_clim() == (0.0, 1.0) and ax.images[0].get_cmap().name == "viridis"


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
    ax = lp.smoothness_scatter(run, robust=False)
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


def test_envelopes_are_robust_to_one_outlier(tmp_path):
    pytest.importorskip("landscape.smoothness")
    from landscape.smoothness import fit_l0_l1

    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0, 50)))
    rows = run.rows("coord_smoothness", layer="embed.weight")
    x = np.concatenate([r["min_grad"] for r in rows])
    y = np.concatenate([r["ratio"] for r in rows])
    clean = fit_l0_l1(x, y)
    with RunStore(run.path, settings=run.settings) as store:  # one sample 1000x above the rest
        r0 = rows[0]
        ratio = r0["ratio"].copy()
        ratio[0] = 1000 * y.max()
        store.write("coord_smoothness", [{**r0, "ratio": ratio}])
    ax = lp.coordinate_smoothness(run, layer="embed.weight")
    envelope = next(line for line in ax.lines if line.get_gid() == "envelope")
    xs = envelope.get_xdata()
    others = np.delete(np.concatenate([ratio, np.concatenate([r["ratio"] for r in rows[1:]])]), 0)
    assert np.allclose(others, np.delete(y, 0))
    without = fit_l0_l1(np.delete(x, 0), np.delete(y, 0))  # the envelope of the data without the outlier
    np.testing.assert_allclose(envelope.get_ydata(), without.l0 + without.l1 * xs, rtol=1e-9)
    assert "1 sample above" in envelope.get_label()
    assert clean.l0 + clean.l1 * xs.max() < 100 * y.max()


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


@pytest.mark.parametrize(("name", "kind"), [
    ("tok.weight", "embedding"), ("transformer.wte.weight", "embedding"), ("bert.embeddings.word_embeddings.weight", "embedding"),
    ("blocks.0.qkv.weight", "attention"), ("transformer.h.0.attn.c_proj.weight", "attention"),
    ("model.layers.3.self_attn.q_proj.weight", "attention"), ("blocks.1.proj.bias", "attention"),
    ("transformer.h.0.mlp.c_proj.weight", "MLP"), ("blocks.0.fc1.weight", "MLP"), ("model.layers.0.mlp.down_proj.weight", "MLP"),
    ("blocks.0.ln1.weight", "norm"), ("transformer.ln_f.bias", "norm"), ("model.norm.weight", "norm"),
    ("model.layers.0.input_layernorm.weight", "norm"), ("lm_head.weight", "head"), ("classifier.bias", "head"),
    ("weird.thing", "other"),
])
def test_layer_kinds(name, kind):
    assert lp.layer_kind(name) == kind


def test_default_layers_are_a_page_of_each_kind():
    layers = ["tok.weight", "pos.weight"] + [f"blocks.{i}.{m}.{p}" for i in range(6)
                                              for m in ("ln1", "qkv", "proj", "ln2", "fc1", "fc2") for p in ("weight", "bias")]
    layers += ["ln_f.weight", "ln_f.bias", "head.weight"]
    chosen = lp.default_layers(layers)
    assert len(chosen) == 9 and not any(c.endswith("bias") for c in chosen)
    kinds = [lp.layer_kind(c) for c in chosen]
    assert kinds == sorted(kinds, key=lp.LAYER_KINDS.index)  # grouped by kind, in the kinds' order
    assert set(kinds) == {"embedding", "attention", "MLP", "norm", "head"}
    assert "blocks.0.qkv.weight" in chosen and "blocks.5.proj.weight" in chosen  # the first and the last


def test_coordinate_grid_takes_layers_and_shares_one_colour_bar(synthetic_run):
    run = synthetic_run
    fig = plt.figure(figsize=(6.8, 3))
    axes = lp.coordinate_smoothness_grid(run, fig)
    assert [ax.get_title().split("\n")[0] for ax in axes] == ["embedding: embed.weight",
                                                               "attention: blocks.0.attn.qkv.weight"]
    assert all("$L_0$ = " in ax.get_title() for ax in axes)  # the fitted numbers under the layer's name
    assert all(not ax.get_legend() for ax in axes) and len(fig.legends) == 1  # one explanation for all
    assert len(lp.coordinate_smoothness_grid(run, plt.figure(), layers=["blocks.*"])) == 1
    with pytest.raises(NoDataError, match="layer.*'nope' not in run"):
        lp.coordinate_smoothness_grid(run, plt.figure(), layers="nope")


# -- identical directions are named once ------------------------------------------------------------

SAME = (("adam", "adam (trained)", 1e-12, 0.0), ("smoothed_signsgd", "adam_valueclip", 1e-3, 0.003))


@pytest.fixture
def same_run(tmp_path):
    """adam ≡ adam (trained); smoothed_signsgd ≈ adam_valueclip (cos 0.999, sharpness 0.3% apart)."""
    return load_run(write_synthetic_run(tmp_path / "same", same=SAME))


def test_equivalent_groups_from_the_data(same_run):
    run = same_run
    groups = dirs.equivalent_groups(run.directions, run.rows("cosine"), run.rows("sharpness"))
    assert [(g.members, g.exact) for g in groups] == [
        (("smoothed_signsgd", "adam_valueclip"), False), (("adam", "adam (trained)"), True)] or \
        [(g.members, g.exact) for g in groups] == [
        (("adam", "adam (trained)"), True), (("smoothed_signsgd", "adam_valueclip"), False)]
    labels = {g.label for g in groups}
    assert labels == {"adam ≡ adam (trained)", "smoothed_signsgd ≈ adam_valueclip"}
    # the same cosine with a sharpness 10% apart is not the same direction
    sharp = [{**r, "sharpness": r["sharpness"] * 1.1} if r["direction"] == "adam_valueclip" else r
             for r in run.rows("sharpness")]
    groups = dirs.equivalent_groups(run.directions, run.rows("cosine"), sharp)
    assert {g.label for g in groups} == {"adam ≡ adam (trained)"}
    # one step below the cosine threshold is enough to keep them apart
    cos = [{**r, "cosine": 0.99} if {r["a"], r["b"]} == {"adam", "adam (trained)"} and r["step"] == 50 else r
           for r in run.rows("cosine")]
    assert "adam ≡ adam (trained)" not in {g.label for g in dirs.equivalent_groups(run.directions, cos, sharp)}


def test_identical_directions_are_drawn_once_and_named_together(same_run):
    run = same_run
    ax = lp.sharpness_ratio(run, directions="all")
    labels = [line.get_label() for line in ax.lines if not line.get_label().startswith("_")]
    assert "adam ≡ adam (trained)" in labels and "smoothed_signsgd ≈ adam_valueclip" in labels
    assert "adam (trained)" not in labels and "adam_valueclip" not in labels
    drawn = lines_by_label(ax)["adam ≡ adam (trained)"]
    assert drawn.get_color() == lp.recipe_style("adam")["color"]  # the first member's style
    ax = lp.sharpness_ratio(run, directions="all", merge=False)
    assert "adam (trained)" in [line.get_label() for line in ax.lines]
    axes = lp.landscape_line_panels(run)
    adam = next(a for a in axes if a.get_title() == "Adam")
    assert [line.get_label() for line in adam.lines if line.get_gid() == "curve"] == [
        "adam ≡ adam (trained)", "adam_clip", "adam_clip_update"]
    hist = lp.update_histograms(run)
    assert [p.get_label() for p in hist.patches] == ["sgd", "adam ≡ adam (trained)", "adafactor"]


# -- comparing runs -------------------------------------------------------------------------------


def test_compare_ratios_draws_each_runs_median(tmp_path):
    from landscape.report import summary

    a = load_run(write_synthetic_run(tmp_path / "sgd_traj", measured=(0, 50, 100), seed=1))
    b = load_run(write_synthetic_run(tmp_path / "adam_traj", measured=(0, 50), seed=2))
    ax = lp.compare_ratios([a, b], labels=["SGD trajectory", "Adam trajectory"])
    names = [t.get_text() for t in ax.get_yticklabels()]  # the first direction at the top
    assert "sgd" not in names and names[0] == "sgd_clip"
    for run, label in ((a, "SGD trajectory"), (b, "Adam trajectory")):
        line = lines_by_label(ax)[label]
        medians = {s["direction"]: s["median_ratio_to_sgd"] for s in summary(run)}
        order = np.argsort(-np.asarray(line.get_ydata()))
        np.testing.assert_allclose(np.asarray(line.get_xdata())[order], [abs(medians[d]) for d in names])
    assert ax.get_xscale() == "log"


# -- saving ----------------------------------------------------------------------------------------


def test_save_figures_pdf_embeds_truetype_and_a_caption(small_run, tmp_path):
    paths = lp.save_figures(small_run, tmp_path / "figs", fmt="pdf", only=["coordinate_smoothness", "smoothness"])
    assert [p.name for p in paths] == ["smoothness.pdf", "coordinate_smoothness.pdf"]  # FIGURE_NAMES order
    for p in paths:
        data = p.read_bytes()
        assert data.startswith(b"%PDF") and b"/FontFile2" in data and b"/Type3" not in data, p.name
        assert b"/Subject" in data and b"/Title" in data  # the caption in the PDF's metadata
        caption = p.with_suffix(".txt").read_text(encoding="utf-8")
        assert caption.count("\n") == 1 and "run small" in caption and "TinyLM" in caption
    assert plt.get_fignums() == []  # saving leaves no pyplot figure behind


def test_captions_say_what_run_and_step(small_run, tmp_path):
    paths = lp.save_figures(small_run, tmp_path, only=["landscape_lines", "sharpness_ratio"], every_step=True)
    captions = {p.stem: p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in paths}
    assert set(captions) == {"sharpness_ratio", "landscape_lines", "landscape_lines_step0", "landscape_lines_step50"}
    assert "at step 50" in captions["landscape_lines"] and "at step 0" in captions["landscape_lines_step0"]
    assert "2 measured steps (0–50)" in captions["sharpness_ratio"] and "run small" in captions["sharpness_ratio"]
    assert all("seed 00" not in c and "\n" not in c for c in captions.values())
    for name in lp.FIGURE_NAMES:  # every figure has one
        assert "seed 00" not in lp.figure_caption(small_run, name) and "run small" in lp.figure_caption(small_run, name)


@pytest.mark.parametrize("width", ["single", "double"])
def test_figure_widths(small_run, tmp_path, width):
    from matplotlib.image import imread

    paths = lp.save_figures(small_run, tmp_path / width, width=width,
                            only=["sharpness_ratio", "landscape_lines", "cosine_heatmap", "coordinate_smoothness"])
    assert len(paths) == 4
    limit = (lp.COLUMN_WIDTH if width == "single" else lp.TEXT_WIDTH) * 300 + 10  # 300 dpi, a margin's pixels
    for p in paths:
        assert imread(p).shape[1] <= limit, p.name
    with pytest.raises(ValueError, match="width must be one of single, double"):
        lp.save_figures(small_run, tmp_path, width="triple")


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
