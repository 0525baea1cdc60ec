"""Reports: the numbers printed are the stored numbers, shifted values are flagged, formats parse."""

from __future__ import annotations

import csv
import io
import json
import math
import re

import numpy as np
import pytest

from landscape import report as rp
from landscape.report import CSV_COLUMNS, report, sharpness_records, summary
from landscape.store import NoDataError, RunStore, load_run
from tests._synthetic import write_synthetic_run


def md_section(text: str, title: str) -> list[list[str]]:
    """Rows (cells) of the first Markdown table under the heading ``## {title}``."""
    part = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in part.splitlines() if line.startswith("|")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows[2:]]


# -- data helpers ----------------------------------------------------------------------------------


def test_sharpness_records_join_lines_and_follow_direction_order(synthetic_run):
    run = synthetic_run
    records = sharpness_records(run)
    assert len(records) == 3 * len(run.directions)
    assert [r["direction"] for r in records[: len(run.directions)]] == run.directions
    lines = {(r["step"], r["direction"]): r for r in run.rows("lines")}
    for r in records:
        line = lines[(r["step"], r["direction"])]
        assert (r["line_best_step"], r["line_reduction"]) == (line["best_step"], line["reduction"])
    assert {r["step"] for r in sharpness_records(run, steps=[50])} == {50}


def test_summary_medians_ignore_nan(synthetic_run):
    run = synthetic_run
    rows = {s["direction"]: s for s in summary(run)}
    c = run.columns("sharpness")
    for d, s in rows.items():
        m = c["direction"] == d
        assert s["median_ratio_to_sgd"] == pytest.approx(np.nanmedian(c["ratio_to_sgd"][m]))
        assert s["n_steps"] == 3 and s["n_shifted"] == int(c["shifted"][m].sum())
    assert rows["sgd"]["median_ratio_to_sgd"] == 1.0
    assert rows["adam"]["n_shifted"] == 1 and rows["lion"]["n_shifted"] == 1
    assert not math.isnan(rows["gensignsgd"]["median_sharpness"])  # one NaN step ignored


# -- markdown --------------------------------------------------------------------------------------


def test_markdown_header_and_per_step_tables(synthetic_run):
    run = synthetic_run
    text = report(run, "md")
    header = dict(md_section("\n## top\n" + text.split("\n", 2)[2], "top"))
    assert header["model"] == "TinyLM, 1,234,567 parameters (1,200,000 measured)"
    assert header["optimizer"].startswith("AdamW(lr=0.001")
    assert header["recipes"].startswith("17: sgd, sgd_clip,")
    assert header["measured steps"] == "3: 0, 50, 100"
    assert header["training steps"] == "101 (1 skipped)"
    assert header["trained direction"] == "adam (trained)"
    for step in (0, 50, 100):
        table = md_section(text, f"Step {step}")
        assert [row[0] for row in table] == run.directions
        stored = {r["direction"]: r for r in run.rows("sharpness", step=step)}
        for direction, sharp, ratio, corr in table:
            r = stored[direction]
            marks = ("†" if r["shifted"] else "") + ("‡" if r["sharpness"] < 0 else "")
            assert sharp == rp._md_num(r["sharpness"]) + marks
            assert ratio == rp._md_num(r["ratio_to_sgd"]) and corr == rp._md_num(r["grad_correlation"])
    assert md_section(text, "Step 0")[run.directions.index("gensignsgd")][1] == "–"  # NaN


def test_markdown_marks_shifted_values_with_a_dagger_and_footnote(synthetic_run):
    text = report(synthetic_run, "md")
    step50 = {row[0]: row for row in md_section(text, "Step 50")}
    assert step50["adam"][1] == "0.0021†"
    assert sum("†" in row[1] for row in step50.values()) == 1
    part = text.split("## Step 50\n", 1)[1].split("\n## ", 1)[0]
    assert "† δ-shifted sharpness ûᵀ∇²f(x − δû)û" in part and "(δ = 0.01)" in part and "adam -0.0013" in part
    assert "‡" not in part  # the shifted value is positive
    assert "†" not in text.split("## Step 0\n", 1)[1].split("\n## ", 1)[0]
    step100 = {row[0]: row for row in md_section(text, "Step 100")}
    assert step100["lion"][1] == "-5.000e-04†‡" and step100["lion"][2].startswith("-")  # SGD > 0: ratio kept
    part = text.split("## Step 100\n", 1)[1].split("\n## ", 1)[0]
    assert "‡ negative reported sharpness" in part and part.count("‡") == 2  # the mark and its note


def test_markdown_summary_and_smoothness(synthetic_run):
    text = report(synthetic_run, "md")
    summary_rows = {row[0]: row for row in md_section(text, "Sharpness relative to SGD (median over 3 measured steps)")}
    med = {s["direction"]: s for s in summary(synthetic_run)}
    assert summary_rows["adam_clip"][1] == rp._md_num(med["adam_clip"]["median_ratio_to_sgd"])
    assert summary_rows["adam"][5] == "1/3" and summary_rows["adam"][4] == "0/3"  # shifted, negative
    assert summary_rows["lion"][4] == "1/3" and summary_rows["adam"][2] == "3/3"  # negative; steps in the ratio
    for name in ("ratio to SGD", "sharpness", "negative", "δ-shifted", "gᵀû"):  # every column is defined
        assert f"- **{name}**: " in text
    assert "gradient projection" in text and "not a correlation coefficient" in text
    assert "exclude" not in text  # SGD is positive at every step
    smooth = dict(md_section(text, "Local smoothness along the training steps (Crawshaw et al. 2022, §5.2)"))
    assert smooth["samples"] == "20 (steps 0–95)"
    layers = md_section(text, "Coordinate-wise smoothness per layer (Crawshaw et al. 2022, Fig. 3)")
    assert {row[0] for row in layers} == {"embed.weight", "blocks.0.attn.qkv.weight"}
    robust = md_section(text, "Robust smoothness (Pan & Li 2023, App. D, Table 8)")
    assert [row[0] for row in robust] == ["0", "50", "100"] and robust[1][1] == "170"


def test_markdown_without_smoothness_or_measurements(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", measured=(0,), recipes=("sgd", "adam"), smoothness=False))
    text = report(run, "md")
    assert "## Step 0" in text and "smoothness" not in text.lower().replace("settings", "")
    RunStore(tmp_path / "empty", settings={}).close()
    empty = report(load_run(tmp_path / "empty"), "md")
    assert "No sharpness measurements yet" in empty
    assert report(load_run(tmp_path / "empty"), "csv") == ",".join(CSV_COLUMNS) + "\n"


@pytest.mark.parametrize(
    ("x", "md", "tex"),
    [(0.527104, "0.5271", "0.5271"), (1.0, "1", "1"), (6.617e-5, "6.617e-05", r"$6.617 \times 10^{-5}$"),
     (-2.5e7, "-2.500e+07", r"$-2.500 \times 10^{7}$"), (math.nan, "–", "--"), (None, "–", "--"),
     (math.inf, "∞", r"$\infty$"), (0.0, "0", "0")],
)
def test_number_formats(x, md, tex):
    assert rp._md_num(x) == md and rp._tex_num(x) == tex


# -- LaTeX -----------------------------------------------------------------------------------------


def test_latex_is_booktabs_with_escaped_names(synthetic_run):
    text = report(synthetic_run, "latex", steps=[50, 100])
    assert text.count(r"\begin{table}") == text.count(r"\end{table}") == 1 + 2 + 3  # summary, steps, smoothness
    assert text.count(r"\begin{minipage}") == text.count(r"\end{minipage}") == 3  # notes: summary, both steps
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert text.count(rule) == 6
    body = "\n".join(line for line in text.splitlines() if not line.startswith("%"))  # comments: raw metadata
    assert r"adam\_clip\_update & " in body and "adam_clip" not in body.replace(r"\_", "")
    assert r"0.0021$^\dagger$" in text and "\\footnotesize\\raggedright\n$^\\dagger$ $\\delta$-shifted" in text
    assert r"f(x - \delta \hat u)" in text and r"-5.000 \times 10^{-4}$$^\dagger$$^\ddagger$" in text
    assert r"$\delta = 0.01$" in text
    for line in text.splitlines():
        if line.startswith("%"):
            continue
        outside_math = re.sub(r"\$[^$]*\$", "", line).replace(" & ", " ")  # drop math and column separators
        assert not re.search(r"(?<!\\)[_%&#]", outside_math), line  # every special character escaped
        assert line.count("{") - line.count(r"\{") == line.count("}") - line.count(r"\}"), line
    assert "% model: TinyLM, 1,234,567 parameters" in text
    assert "Directional sharpness at step 50 (TinyLM with 1,234,567 parameters, trained with AdamW)." in text


def test_tex_escape():
    assert rp.tex_escape(r"a_b & c%d $e #f {g} ~h ^i \j") == (
        r"a\_b \& c\%d \$e \#f \{g\} \textasciitilde{}h \textasciicircum{}i \textbackslash{}j"
    )


# -- CSV -------------------------------------------------------------------------------------------


def test_csv_is_tidy_and_exact(synthetic_run):
    run = synthetic_run
    text = report(run, "csv")
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 3 * len(run.directions)
    stored = {(r["step"], r["direction"]): r for r in run.rows("sharpness")}
    for row in rows:
        r = stored[(int(row["step"]), row["direction"])]
        for col in ("sharpness", "raw", "ratio_to_sgd", "grad_correlation", "update_norm", "best_step", "loss"):
            value = r[col]
            if value is None or (isinstance(value, float) and math.isnan(value)):
                assert row[col] == ""
            else:
                assert float(row[col]) == value  # full precision
        assert row["shifted"] == str(int(r["shifted"]))
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(io.StringIO(text))
    assert list(df.columns) == list(CSV_COLUMNS) and df["sharpness"].isna().sum() == 1
    assert df["shifted"].sum() == 2


def test_bad_arguments(synthetic_run):
    with pytest.raises(ValueError, match="md, latex, csv, json"):
        report(synthetic_run, "html")
    with pytest.raises(NoDataError, match=r"step\(s\) 7 not measured.*measured steps: 0, 50, 100"):
        report(synthetic_run, "md", steps=[7])


# -- the ratio to SGD where SGD's sharpness is not positive ----------------------------------------


def test_ratio_is_undefined_where_sgd_is_not_positive(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", sgd_negative=(50,)))
    records = sharpness_records(run, steps=[50])
    assert all(r["ratio_to_sgd"] is None and r["ratio_note"].startswith("sgd sharpness ≤ 0") for r in records)
    stored = run.rows("sharpness", step=50)
    assert all(r["ratio_to_sgd"] is None and "≤ 0" in r["ratio_note"] for r in stored)
    rows = {s["direction"]: s for s in summary(run)}
    c = run.columns("sharpness")
    for d, s in rows.items():
        m = (c["direction"] == d) & (c["step"] != 50)
        assert s["n_ratio"] == 2 - (d == "gensignsgd") and [st for st, _ in s["ratio_excluded"]][-1] == 50
        assert s["median_ratio_to_sgd"] == pytest.approx(np.nanmedian(c["sharpness"][m] / c["sharpness"][
            (c["direction"] == "sgd") & (c["step"] != 50)]))
    assert rows["adam"]["n_negative"] == 1 and rows["sgd"]["n_negative"] == 1
    text = report(run, "md")
    assert "The ratio medians exclude 1 of 3 measured steps where the ratio to SGD is undefined " \
           "(sgd sharpness ≤ 0 at step 50)" in text
    assert "gensignsgd: step 0" in text  # its own NaN is named with it
    step50 = {row[0]: row for row in md_section(text, "Step 50")}
    assert all(row[2] == "–" and row[1].endswith("†‡") for row in step50.values())
    assert "Ratio to SGD undefined (sgd sharpness ≤ 0 (-2))." in text
    tex = report(run, "latex")
    assert r"sgd sharpness $\le$ 0 (-2)" in tex and "exclude 1 of 3" in tex
    csv_rows = [r for r in csv.DictReader(io.StringIO(report(run, "csv"))) if r["step"] == "50"]
    assert all(r["ratio_to_sgd"] == "" and r["ratio_note"].startswith("sgd sharpness") for r in csv_rows)


def test_ratios_stored_by_older_runs_against_a_negative_sgd_are_dropped(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", sgd_negative=(50,), legacy_ratios=True))
    assert run.rows("sharpness", step=50, direction="adam")[0]["ratio_to_sgd"] == pytest.approx(1.0 * 0.029131 / 1.0)
    adam = [r for r in sharpness_records(run) if r["direction"] == "adam"]
    assert [r["ratio_to_sgd"] is None for r in adam] == [False, True, False]
    assert adam[1]["ratio_note"].startswith("sgd sharpness ≤ 0")
    assert {s["direction"]: s for s in summary(run)}["adam"]["n_ratio"] == 2


# -- the paper's own layouts: Table 1 (one step) and Tables 4-7 (the trajectory) -----------------


def test_step_table_is_table_1_of_the_paper(synthetic_run):
    run = synthetic_run
    text = report(run, "md", table="step")  # the last measured step
    assert text.startswith("## Directional sharpness at step 100")
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == ["Algorithm", "Sharpness", "Ratio to SGD"]
    stored = {r["direction"]: r for r in sharpness_records(run, [100])}
    assert [r[0] for r in rows[1:]] == run.directions  # every direction
    for name, sharp, ratio in rows[1:]:
        r = stored[name]
        assert sharp == rp._md_num(r["sharpness"]) + rp._marks(r) and ratio == rp._md_num(r["ratio_to_sgd"])
    assert "‡ negative reported sharpness" in text  # lion at step 100, still negative after the shift
    tex = report(run, "latex", table="step", steps=[50])
    assert tex.count(r"\toprule") == 1 and r"Algorithm & Sharpness & Ratio to SGD \\" in tex
    assert "at step 50 (TinyLM with 1,234,567 parameters, trained with AdamW)" in tex and r"0.0021$^\dagger$" in tex
    rows = list(csv.DictReader(io.StringIO(report(run, "csv", table="step", steps=[50]))))
    assert [r["direction"] for r in rows] == run.directions and all(r["step"] == "50" for r in rows)
    assert float(rows[run.directions.index("adam")]["sharpness"]) == 0.0021
    data = json.loads(report(run, "json", table="step", steps=[0]))
    assert data["table"] == "step" and data["step"] == 0 and len(data["rows"]) == len(run.directions)
    gensign = next(r for r in data["rows"] if r["direction"] == "gensignsgd")
    assert gensign["sharpness"] is None  # NaN -> null: strict JSON
    with pytest.raises(ValueError, match="one step"):
        report(run, "md", table="step", steps=[0, 50])
    only = report(run, "md", table="step", directions=["adam*"])
    assert "| sgd |" not in only and "| adam_clip |" in only


def test_trajectory_table_is_tables_4_to_7_of_the_paper(synthetic_run):
    run = synthetic_run
    text = report(run, "md", table="trajectory", directions=["sgd", "adam", "adam_clip"])
    rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == ["Step", "Algorithm", "Ratio"]
    assert [r[0] for r in rows[1:]] == ["0", "", "", "50", "", "", "100", "", ""]  # the step once per group
    records = {(r["step"], r["direction"]): r for r in sharpness_records(run)}
    step = None
    for s_, name, ratio in rows[1:]:
        step = int(s_) if s_ else step
        r = records[(step, name)]
        assert ratio == rp._md_num(r["ratio_to_sgd"]) + ("†" if r["shifted"] else "")
    tex = report(run, "latex", table="trajectory")
    assert tex.count(r"\midrule") == 1 + 2  # under the header, then between the three steps
    assert r"Step & Algorithm & Ratio \\" in tex
    tidy = list(csv.DictReader(io.StringIO(report(run, "csv", table="trajectory"))))
    assert len(tidy) == 3 * len(run.directions) and tuple(tidy[0]) == rp._TRAJECTORY_KEYS
    data = json.loads(report(run, "json", table="trajectory"))
    assert [(r["step"], r["direction"]) for r in data["rows"]] == [(r["step"], r["direction"]) for r in sharpness_records(run)]


def test_trajectory_notes_steps_where_the_ratio_is_undefined(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", sgd_negative=(50,)))
    text = report(run, "md", table="trajectory")
    assert "undefined at step 50, where SGD's sharpness is not positive" in text


def test_json_report_holds_the_same_numbers(synthetic_run):
    run = synthetic_run
    data = json.loads(report(run, "json"))
    med = {s["direction"]: s for s in summary(run)}
    for s in data["summary"]:
        expected = med[s["direction"]]["median_ratio_to_sgd"]
        assert (s["median_ratio_to_sgd"] is None and math.isnan(expected)) or s["median_ratio_to_sgd"] == expected
    stored = {(r["step"], r["direction"]): r for r in run.rows("sharpness")}
    for step, rows in data["steps"].items():
        for r in rows:
            value = stored[(int(step), r["direction"])]["sharpness"]
            assert r["sharpness"] == value or (r["sharpness"] is None and math.isnan(value))
    assert data["metadata"]["model"].startswith("TinyLM") and data["meta"]["optimizer"]["class"] == "AdamW"
    assert [t["title"] for t in data["smoothness"]][0].startswith("Local smoothness")


# -- metadata ----------------------------------------------------------------------------------------


def test_settings_are_shown_in_full(tmp_path):
    settings = {"every": 5, "recipes": list("abcdefgh"), "measured": [f"layer{i}.weight" for i in range(28)],
                "measure": {"gammas": [1 / 6, 2 / 6, 3 / 6, 4 / 6, 5 / 6]}}
    RunStore(tmp_path / "r", settings=settings, meta={"recipes": ["sgd"]}).close()
    header = dict(md_section("\n## top\n" + report(load_run(tmp_path / "r"), "md").split("\n", 2)[2], "top"))
    assert "items]" not in header["settings"]
    assert "layer0.weight" in header["settings"] and "layer27.weight" in header["settings"]
    assert "measure.gammas=[0.1667, 0.3333, 0.5, 0.6667, 0.8333]" in header["settings"]


def test_a_checkpoint_run_counts_the_training_steps_it_covers(tmp_path):
    meta = {"source": {"kind": "checkpoints"}, "recipes": ["sgd"],
            "optimizer": {"class": "AdamW", "hyperparameters": {"lr": 1e-3},
                          "class_source": "from the parameter-group keys of the checkpoint's optimizer state"}}
    with RunStore(tmp_path / "r", settings={"source": "checkpoints"}, meta=meta) as store:
        store.write("steps", [{"step": s, "loss": 1.0, "grad_norm": 1.0, "lr": 1e-3, "status": "ok", "reason": None,
                               "wall": 0.0} for s in range(0, 201, 20)])
    header = dict(md_section("\n## top\n" + report(load_run(tmp_path / "r"), "md").split("\n", 2)[2], "top"))
    assert header["training steps"] == "200 covered (steps 0–200), 11 checkpoints"
    assert header["optimizer"] == "AdamW(lr=0.001) (from the parameter-group keys of the checkpoint's optimizer state)"


# -- identical directions, figures, citations --------------------------------------------------------


def test_report_names_identical_directions(tmp_path):
    run = load_run(write_synthetic_run(tmp_path / "r", same=(("adam", "adam (trained)", 1e-12, 0.0),)))
    text = report(run, "md")
    assert "named once in the figures: adam ≡ adam (trained) (cosine ≥ 1 − 1e-12" in text
    data = json.loads(report(run, "json"))
    assert data["equivalent_directions"] == [{"members": ["adam", "adam (trained)"], "exact": True,
                                              "min_cosine": pytest.approx(1 - 1e-12), "max_rel_diff": 0.0}]


def test_markdown_links_the_figures_it_describes(tmp_path):
    from landscape.plots import save_figures

    small_run = load_run(write_synthetic_run(tmp_path / "small", measured=(0, 50), recipes=("sgd", "adam")))
    figures = small_run.path / "figures"
    save_figures(small_run, figures, only=["sharpness_ratio", "landscape_lines", "training_loss"], every_step=True)
    text = report(small_run, "md", figures=figures, link_base=small_run.path)
    links = re.findall(r"!\[([^\]]+)\]\(([^)]+)\)", text)
    assert ("sharpness ratio to SGD", "figures/sharpness_ratio.png") in links
    assert ("loss along each update direction", "figures/landscape_lines.png") in links
    assert ("loss along each update direction, step 0", "figures/landscape_lines_step0.png") in links
    assert all((small_run.path / link).exists() for _, link in links)
    ratio_at = text.index("figures/sharpness_ratio.png")
    assert text.index("## Sharpness relative to SGD") < ratio_at < text.index("## Step 0")  # under its table
    assert "![" not in report(small_run, "md")  # no folder given: no links


def test_no_internal_document_numbers_reach_a_user(synthetic_run):
    from landscape.optim import format_recipes
    from landscape.references import REFERENCES, cite, translate
    from landscape.store import schema_markdown

    texts = [report(synthetic_run, f, table=t) for f in ("md", "latex", "csv", "json") for t in ("full", "step", "trajectory")]
    texts += [format_recipes(), schema_markdown()]
    heads = ("Pan & Li 2023", r"Pan \& Li 2023", "Crawshaw et al. 2022", "Cesista 2025")
    for text in texts:
        assert "seed 00" not in text and "Seed 00" not in text
        for m in re.finditer(r"\b(Alg|Def|Table|App|Fig)s?\. ", text):  # every part cited names its work
            assert any(h in text[max(0, m.start() - 110):m.start()] for h in heads), text[max(0, m.start() - 110):m.end()]
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for doc in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:  # what a user reads first
        assert not re.search(r"\b[Ss]eeds? 00\d", doc.read_text(encoding="utf-8")), doc.name
    assert "Pan & Li 2023, Alg. 3" in format_recipes()
    assert "Cesista 2025, “Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD”, Def. 1" in format_recipes()
    assert set(REFERENCES) == {"pan2023", "crawshaw2022", "cesista2025"}
    assert cite("pan2023", "App. B.3") == "Pan & Li 2023, App. B.3" and translate("seed 001 §5.2") == "Crawshaw et al. 2022, §5.2"
    with pytest.raises(KeyError, match="known: pan2023"):
        cite("nobody1999")


# -- comparing runs ----------------------------------------------------------------------------------


def test_compare_puts_runs_side_by_side(tmp_path):
    a = load_run(write_synthetic_run(tmp_path / "sgd_traj", measured=(0, 50, 100), seed=1))
    b = load_run(write_synthetic_run(tmp_path / "adam_traj", measured=(0, 50), recipes=("sgd", "adam", "lion"), seed=2))
    text = rp.compare([a, b], "md", labels=["SGD traj.", "Adam traj."])
    rows = {r[0]: r for r in ([c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
                              if line.startswith("| "))}
    assert rows["Algorithm"] == ["Algorithm", "SGD traj.", "Adam traj."]
    for run, col in ((a, 1), (b, 2)):
        for s in summary(run):
            assert rows[s["direction"]][col] == f"{rp._md_num(s['median_ratio_to_sgd'])} ({s['n_ratio']}/{s['n_steps']})"
    assert rows["adam_clip"][2] == "–"  # not measured on the second run
    tidy = list(csv.DictReader(io.StringIO(rp.compare([a, b], "csv"))))
    assert {r["run"] for r in tidy} == {"sgd_traj", "adam_traj"} and len(tidy) == len(a.directions) + 4
    at = json.loads(rp.compare([a, b], "json", step=50))
    assert at["step"] == 50 and at["rows"][0]["direction"] == "sgd"
    tex = rp.compare([a, b], "latex")
    assert r"\toprule" in tex and "sgd\\_traj" in tex
    with pytest.raises(ValueError, match="two or more runs"):
        rp.compare([a], "md")
    with pytest.raises(ValueError, match="one label per run"):
        rp.compare([a, b], "md", labels=["x"])
    with pytest.raises(NoDataError, match="step"):
        rp.compare([a, b], "md", step=100)
