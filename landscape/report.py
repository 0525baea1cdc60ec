"""Tables from a run store: Markdown, LaTeX (booktabs), tidy CSV and JSON.

Following Pan & Li 2023, Table 1 (and Tables 4-7): for every measured step, one row per direction with
its directional sharpness, its ratio to SGD's and its gradient projection gᵀû; a δ-shifted sharpness
is marked with a dagger (†), a negative reported sharpness with a double dagger (‡), and both are
explained in a footnote (with the raw values). The ratio to SGD is defined only where SGD's
reported sharpness is positive; elsewhere it is left out, with the reason, and the summary's medians
say how many steps they exclude. A summary gives, per direction, the median ratio to SGD over the
measured steps, and every column is defined under its table; a header gives the run's metadata
(model size, optimizer, recipes, steps). When the run has smoothness rows, short smoothness
tables follow (Crawshaw et al. 2022, §5.2; Pan & Li 2023, Table 8).

Besides the full report, the paper's own layouts (``table=``): ``"step"`` is Table 1 (one step, every
direction: sharpness and ratio to SGD), ``"trajectory"`` is Tables 4-7 (the ratio to SGD of every
direction at every measured step, grouped by step); :func:`compare` puts the same directions measured
on different runs (the SGD and the Adam trajectory) side by side.

Example:
    >>> from landscape.store import load_run
    >>> from landscape.report import report
    >>> print(report(load_run("runs/tiny"), fmt="md"))                # doctest: +SKIP
    >>> print(report(load_run("runs/tiny"), fmt="latex", table="step"))  # Table 1 at the last step  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from landscape import _directions as dirs
from landscape._names import REPORT_FORMATS, REPORT_TABLES
from landscape._ratio import ratio_to_reference
from landscape.references import cite
from landscape.store import NoDataError, Run

__all__ = ["REPORT_FORMATS", "REPORT_TABLES", "CSV_COLUMNS", "REFERENCE", "compare", "compare_records",
           "equivalences", "ratio_exclusions", "report", "sharpness_records", "summary"]


#: Columns of the CSV report, in order (one row per measured step and direction).
CSV_COLUMNS = (
    "step", "direction", "sharpness", "ratio_to_sgd", "shifted", "grad_correlation", "raw", "shifted_value",
    "update_norm", "best_step", "predicted_reduction", "loss", "line_best_step", "line_best_loss",
    "line_reduction", "ratio_note",
)

#: The direction ratios are taken against.
REFERENCE = "sgd"

DAGGER_NOTE = ("δ-shifted sharpness ûᵀ∇²f(x − δû)û, the Hessian a distance δ toward the step "
               f"({cite('pan2023', 'App. B.3')}), reported instead of the raw ûᵀ∇²f(x)û, which is negative")
DDAGGER_NOTE = ("negative reported sharpness: the curvature along û is negative (after the δ-shift where marked †), "
                "so the quadratic model along û has no minimum")
#: What each column of the summary table means (Markdown; the LaTeX report has the same text).
SUMMARY_DEFINITIONS = (
    ("ratio to SGD", "S(u)/S(u_sgd) at the same step, the median over the steps where SGD's reported sharpness "
                     "is > 0 (\"steps\" counts them; a ratio of two negative sharpnesses is not \"flatter\")"),
    ("sharpness", "S(u) = ûᵀ∇²f(x)û with û = u/‖u‖₂ on the probe batch, median over the measured steps; the "
                  "δ-shifted ûᵀ∇²f(x − δû)û where the raw value is negative"),
    ("negative", "measured steps whose reported sharpness is < 0"),
    ("δ-shifted", "measured steps whose reported sharpness is the δ-shifted value"),
    ("gᵀû", "gradient projection: the component of the probe-batch gradient g = ∇f(x) along the unit update "
            "direction û, median over the steps; positive means the step x − η·u descends. A projection, not "
            "a correlation coefficient"),
)


# -- data ------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _direction_rank(run: Run) -> dict[str, int]:
    return {d: i for i, d in enumerate(run.directions)}


def sharpness_records(run: Run, steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One dict per (step, direction): the ``sharpness`` row plus the measured landscape-line
    optimum (``line_best_step``, ``line_best_loss``, ``line_reduction``; None without a line),
    ordered by step, then by the run's direction order.

    ``ratio_to_sgd`` follows the rule of :func:`landscape.measure.ratio_to_reference` whatever wrote
    the run: it is ``None`` where SGD's reported sharpness at that step is not > 0, with the reason in
    ``ratio_note`` (runs written before that rule stored a ratio there; it is dropped on reading).

    Raises:
        NoDataError: a requested step was not measured.
    """
    measured = run.steps("sharpness")
    if steps is not None:
        unknown = [s for s in steps if s not in measured]
        if unknown:
            raise NoDataError(
                f"step(s) {', '.join(map(str, unknown))} not measured in run {run.path}; "
                f"measured steps: {', '.join(map(str, measured)) or 'none'}"
            )
        wanted = set(steps)
    rank = _direction_rank(run)
    lines = {(r["step"], r["direction"]): r for r in run.rows("lines")}
    rows = run.rows("sharpness")
    reference = {r["step"]: r["sharpness"] for r in rows if r["direction"] == REFERENCE}
    has_reference = bool(reference)
    out = []
    for r in rows:
        if steps is not None and r["step"] not in wanted:
            continue
        line = lines.get((r["step"], r["direction"]))
        ratio, note = r["ratio_to_sgd"], r.get("ratio_note")
        if has_reference:
            checked, why = ratio_to_reference(r["sharpness"], reference.get(r["step"]), REFERENCE)
            if checked is None:
                ratio, note = None, note or why
        elif ratio is None and note is None:
            note = f"no {REFERENCE} direction in this run"
        out.append({
            **r,
            "ratio_to_sgd": ratio,
            "ratio_note": note,
            "line_best_step": line["best_step"] if line else None,
            "line_best_loss": line["best_loss"] if line else None,
            "line_reduction": line["reduction"] if line else None,
        })
    out.sort(key=lambda r: (r["step"], rank.get(r["direction"], len(rank)), r["direction"]))
    return out


def _median(values: list[Any]) -> float:
    finite = [float(v) for v in values if _finite(v)]
    return float(np.median(finite)) if finite else math.nan


def summary(run: Run, steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Per direction, over the measured steps.

    Keys: ``median_ratio_to_sgd`` (over the steps where the ratio is defined, i.e. SGD's reported
    sharpness > 0), ``n_ratio`` (those steps), ``ratio_excluded`` (``[(step, reason), ...]`` of the
    others), ``median_sharpness``, ``median_grad_correlation`` (= ``median_grad_projection``, gᵀû),
    ``n_steps``, ``n_shifted`` and ``n_negative`` (reported sharpness < 0). Medians ignore NaN.
    """
    records = sharpness_records(run, steps)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["direction"], []).append(r)
    rank = _direction_rank(run)
    out = []
    for d, rs in sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        ratios = [r["ratio_to_sgd"] for r in rs if _finite(r["ratio_to_sgd"])]
        proj = _median([r["grad_correlation"] for r in rs])
        out.append({
            "direction": d,
            "median_ratio_to_sgd": _median(ratios),
            "n_ratio": len(ratios),
            "ratio_excluded": [(r["step"], r["ratio_note"] or "missing") for r in rs if not _finite(r["ratio_to_sgd"])],
            "median_sharpness": _median([r["sharpness"] for r in rs]),
            "median_grad_correlation": proj,
            "median_grad_projection": proj,
            "n_steps": len(rs),
            "n_shifted": sum(bool(r["shifted"]) for r in rs),
            "n_negative": sum(_finite(r["sharpness"]) and r["sharpness"] < 0 for r in rs),
        })
    return out


def ratio_exclusions(rows: Sequence[dict[str, Any]]) -> str:
    """One sentence saying which steps the ratio medians of :func:`summary` rows leave out and why
    (empty when none is left out). Steps SGD makes undefined are the same for every direction and
    are named once; a direction's own missing values (a non-finite sharpness) are named with it."""
    if not rows:
        return ""
    common = set.intersection(*({s for s, _ in r["ratio_excluded"]} for r in rows))
    reasons: dict[str, list[int]] = {}
    for r in rows:
        for step, why in r["ratio_excluded"]:
            if step in common:
                why = why.split(" (")[0]  # "sgd sharpness ≤ 0 (-2.38)": group the steps by the reason alone
                reasons.setdefault(why, [])
                if step not in reasons[why]:
                    reasons[why].append(step)
    parts = []
    n_total = max(r["n_steps"] for r in rows)
    if common:
        detail = "; ".join(f"{why} at step{'s' * (len(st) > 1)} {', '.join(map(str, sorted(st)))}"
                           for why, st in reasons.items())
        parts.append(f"The ratio medians exclude {len(common)} of {n_total} measured step"
                     f"{'s' * (n_total != 1)} where the ratio to SGD is undefined ({detail})")
    own = [(r["direction"], [s for s, _ in r["ratio_excluded"] if s not in common]) for r in rows]
    own = [(d, st) for d, st in own if st]
    if own:
        parts.append("a direction's own non-finite values are left out too (" + "; ".join(
            f"{d}: step{'s' * (len(st) > 1)} {', '.join(map(str, st))}" for d, st in own) + ")")
    return ("; ".join(parts) + ".") if parts else ""


def _find(settings: Any, keys: Sequence[str]) -> Any:
    """The first value stored under one of ``keys`` at any depth of ``settings``."""
    if isinstance(settings, dict):
        for k in keys:
            if k in settings and not isinstance(settings[k], dict):
                return settings[k]
        for v in settings.values():
            found = _find(v, keys)
            if found is not None:
                return found
    return None


# -- number formatting -----------------------------------------------------------------------------


def _md_num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "−∞"
    x = float(x)
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}"
    return f"{x:.{digits - 1}e}"


def _tex_num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "--"
    if isinstance(x, float) and math.isinf(x):
        return r"$\infty$" if x > 0 else r"$-\infty$"
    x = float(x)
    if x == 0 or (1e-3 <= abs(x) < 1e5):
        return f"{x:.{digits}g}"
    mantissa, exponent = f"{x:.{digits - 1}e}".split("e")
    return rf"${mantissa} \times 10^{{{int(exponent)}}}$"


_TEX_ESCAPES = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{",
    "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
}


def tex_escape(text: str) -> str:
    """Escape LaTeX special characters in plain text (direction names, model names...); line breaks
    and other whitespace runs become one space (a stored name cannot end a line, a comment or a
    paragraph in the output)."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in " ".join(str(text).split()))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


#: torch.optim implementation switches, left out of the optimizer line when off.
_IMPLEMENTATION_FLAGS = ("foreach", "capturable", "differentiable", "fused", "maximize")


def _boring(key: str, value: Any) -> bool:
    return value is None or (key in _IMPLEMENTATION_FLAGS and value is False)


def _short(value: Any) -> str:
    """A setting's value, in full (lists and dicts included) and compact."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _from_checkpoints(run: Run) -> bool:
    """Whether ``landscape analyze`` wrote the run (one ``steps`` row per checkpoint)."""
    source = run.meta.get("source")
    return (isinstance(source, dict) and source.get("kind") == "checkpoints") or \
        run.settings.get("source") == "checkpoints"


def _int(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


# -- metadata header -------------------------------------------------------------------------------


def _metadata(run: Run) -> list[tuple[str, str]]:
    """(label, plain-text value) pairs describing the run."""
    meta = run.meta
    out: list[tuple[str, str]] = [("run", str(run.path))]
    model = meta.get("model")
    if isinstance(model, dict):
        text = str(model.get("class", "?"))
        if "n_params" in model:
            text += f", {_int(model['n_params'])} parameters"
            if "n_measured" in model and model["n_measured"] != model["n_params"]:
                text += f" ({_int(model['n_measured'])} measured)"
        out.append(("model", text))
    optimizer = meta.get("optimizer")
    if isinstance(optimizer, dict):
        hp = optimizer.get("hyperparameters") or {}
        args = ", ".join(f"{k}={_short(v)}" for k, v in hp.items() if not _boring(k, v)) \
            if isinstance(hp, dict) else str(hp)
        name = optimizer.get("class") or "unknown optimizer"
        how = f" ({optimizer['class_source']})" if optimizer.get("class_source") else ""
        out.append(("optimizer", f"{name}({args}){how}"))
    if meta.get("trained_direction"):
        out.append(("trained direction", str(meta["trained_direction"])))
    recipes = meta.get("recipes")
    if recipes:
        out.append(("recipes", f"{len(recipes)}: " + ", ".join(map(str, recipes))))
    measured = run.steps("sharpness")
    if measured:
        shown = ", ".join(map(str, measured)) if len(measured) <= 12 else \
            f"{measured[0]}, {measured[1]}, ..., {measured[-1]}"
        out.append(("measured steps", f"{len(measured)}: {shown}"))
    if run.has("steps"):
        cols = run.columns("steps")
        status = cols["status"]
        skipped = int(np.sum(status == "skipped"))
        note = f" ({skipped} skipped)" if skipped else ""
        if _from_checkpoints(run):  # one row per checkpoint: the steps covered are the span of their steps
            first, last = int(cols["step"].min()), int(cols["step"].max())
            out.append(("training steps", f"{last - first} covered (steps {first}–{last}), "
                                          f"{len(status)} checkpoint{'s' * (len(status) != 1)}{note}"))
        else:
            if meta.get("start_step"):  # a probe attached to a run in progress
                steps = cols["step"]
                note += (f" (steps {int(steps.min())}–{int(steps.max())}: attached after {int(meta['start_step'])} "
                         "steps, recipe states from zero there)" if len(steps) else "")
            out.append(("training steps", f"{len(status)}{note}"))
    for key in ("mode", "created"):
        if meta.get(key):
            out.append((key, str(meta[key])))
    versions = meta.get("versions")
    if isinstance(versions, dict):
        out.append(("versions", ", ".join(f"{k} {v}" for k, v in versions.items())))
    settings = {k: v for k, v in _flat(meta.get("settings") or {}).items()
                if k.rsplit(".", 1)[-1] not in ("recipes", "trained_direction") and v != {}}
    if settings:
        out.append(("settings", ", ".join(f"{k}={_short(v)}" for k, v in settings.items())))
    return out


# -- smoothness ------------------------------------------------------------------------------------


def _fit(x: np.ndarray, y: np.ndarray):
    try:
        from landscape.smoothness import fit_l0_l1
    except ImportError:
        return None
    ok = np.isfinite(x) & np.isfinite(y) & (x >= 0) & (y >= 0)
    if ok.sum() < 2:
        return None
    return fit_l0_l1(x[ok], y[ok])


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 2 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])


def _smoothness_tables(run: Run, num: Callable[[Any], str]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the smoothness tables the run has data for."""
    tables = []
    if run.has("smoothness"):
        c = run.columns("smoothness")
        x, y = c["grad_norm"], c["l_hat"]
        fit = _fit(x, y)
        rows = [
            ["samples", f"{len(y)} (steps {c['step'].min()}–{c['step'].max()})"],
            ["median L̂", num(_median(list(y)))],
            ["max L̂", num(float(np.nanmax(y)) if np.isfinite(y).any() else math.nan)],
            ["median ‖∇f‖", num(_median(list(x)))],
            ["Pearson corr(L̂, ‖∇f‖)", num(fit.pearson if fit is not None else _pearson(x, y))],
        ]
        if fit is not None:
            rows.append(["envelope L̂ ≤ L0 + L1·‖∇f‖", f"L0 = {num(fit.l0)}, L1 = {num(fit.l1)} "
                                                      f"(covers {100 * fit.covered:.0f}%)"])
        tables.append((f"Local smoothness along the training steps ({cite('crawshaw2022', '§5.2')})", ["quantity", "value"], rows))
    if run.has("coord_smoothness"):
        per_layer: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for r in run.rows("coord_smoothness"):
            xs, ys = per_layer.setdefault(r["layer"], ([], []))
            xs.append(np.ravel(r["min_grad"]))
            ys.append(np.ravel(r["ratio"]))
        rows = []
        for layer, (xs, ys) in per_layer.items():
            x, y = np.concatenate(xs), np.concatenate(ys)
            fit = _fit(x, y)
            row = [layer, str(len(y)), num(_median(list(y)))]
            if fit is not None:
                row += [num(fit.l0), num(fit.l1)]
            rows.append(row)
        header = ["layer", "samples", "median ratio"]
        if rows and len(rows[0]) > 3:
            header += ["L0", "L1"]
        tables.append((f"Coordinate-wise smoothness per layer ({cite('crawshaw2022', 'Fig. 3')})", header, rows))
    if run.has("robust"):
        rows = [[str(r["step"]), num(r["top_eig"]), num(r["l_robust"]), num(r["ratio"]), num(r["eps"]),
                 _int(r["n_removed"])] for r in run.rows("robust")]
        tables.append((f"Robust smoothness ({cite('pan2023', 'App. D, Table 8')})",
                       ["step", "top eigenvalue L", "robust ℓ", "L / ℓ", "ε", "removed"], rows))
    from landscape.curvature_report import curvature_tables

    tables += curvature_tables(run, num)
    return tables


# -- markdown --------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    def esc(cell: str) -> str:  # one line per row, whatever a stored name holds
        return " ".join(str(cell).split()).replace("|", r"\|")

    out = ["| " + " | ".join(map(esc, header)) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return out


def _marks(r: dict[str, Any], dagger: str = "†", ddagger: str = "‡") -> str:
    """† for a δ-shifted value, ‡ for a negative one."""
    return (dagger if r["shifted"] else "") + (ddagger if _finite(r["sharpness"]) and r["sharpness"] < 0 else "")


def _step_notes(rows: list[dict[str, Any]], delta: Any, num: Callable[[Any], str], name: Callable[[str], str],
                dagger: str, ddagger: str, dagger_note: str, ddagger_note: str,
                text: Callable[[str], str] = str) -> list[str]:
    """The footnotes of one step's table: shifted values (with their raw values), negative values, and
    undefined ratios (with why)."""
    notes = []
    shifted = [r for r in rows if r["shifted"]]
    if shifted:
        raw = "; ".join(f"{name(r['direction'])} {num(r['raw'])}" for r in shifted)
        notes.append(f"{dagger} {dagger_note}{delta}. Raw values: {raw}.")
    negative = [r for r in rows if _finite(r["sharpness"]) and r["sharpness"] < 0]
    if negative:
        notes.append(f"{ddagger} {ddagger_note}: " + ", ".join(name(r["direction"]) for r in negative) + ".")
    undefined: dict[str, list[str]] = {}
    for r in rows:
        if not _finite(r["ratio_to_sgd"]):
            undefined.setdefault(r["ratio_note"] or "missing", []).append(r["direction"])
    if undefined:
        reasons = "; ".join(
            (text(why) if len(ds) == len(rows) else f"{', '.join(map(name, ds))}: {text(why)}")
            for why, ds in undefined.items()
        )
        notes.append(f"{text('Ratio to SGD undefined')} ({reasons}).")
    repeats: dict[str, list[str]] = {}
    for r in rows:
        if r.get("measured_as"):
            repeats.setdefault(r["measured_as"], []).append(r["direction"])
    if repeats:
        same = "; ".join(f"{', '.join(map(name, ds))} as {name(rep)}" for rep, ds in repeats.items())
        notes.append(f"{text('Measured once (the same direction to float rounding, own norm)')}: {same}.")
    return notes


def _markdown(run: Run, steps: Sequence[int] | None, figures: dict[str, str] | None = None) -> str:
    figures = figures or {}

    def show(*names: str) -> list[str]:
        links = [_md_figure(name, figures[name]) for name in names if name in figures]
        return ["", *links] if links else []

    out = [f"# landscape report: `{run.path.name}`", ""]
    out += _md_table(["", ""], [[k, v] for k, v in _metadata(run)], "ll")
    out += show("training_loss")
    records = sharpness_records(run, steps)
    delta = _find(run.settings, ("delta", "shift_delta"))
    d_text = f" (δ = {delta})" if delta is not None else ""
    if not records:
        out += ["", "_No sharpness measurements yet._", ""]
    else:
        n_steps = len({r["step"] for r in records})
        rows = summary(run, steps)
        out += ["", f"## Sharpness relative to SGD (median over {n_steps} measured step{'s' * (n_steps != 1)})", ""]
        out += _md_table(
            ["direction", "ratio to SGD", "steps", "sharpness", "negative", "δ-shifted", "gᵀû"],
            [[s["direction"], _md_num(s["median_ratio_to_sgd"]), f"{s['n_ratio']}/{s['n_steps']}",
              _md_num(s["median_sharpness"]), f"{s['n_negative']}/{s['n_steps']}",
              f"{s['n_shifted']}/{s['n_steps']}", _md_num(s["median_grad_projection"])] for s in rows],
            "lrrrrrr",
        )
        excluded = ratio_exclusions(rows)
        if excluded:
            out += ["", excluded]
        out += [""] + [f"- **{k}**: {v}{d_text if k == 'sharpness' else ''}." for k, v in SUMMARY_DEFINITIONS]
        same = _equivalence_text(run, steps)
        if same:
            out += ["", same]
        out += show("sharpness_ratio", "sharpness_over_time")
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r)
        last = max(by_step)
        for step, step_rows in by_step.items():
            out += ["", f"## Step {step}", ""]
            out += _md_table(
                ["direction", "sharpness", "ratio to SGD", "gᵀû"],
                [[r["direction"], _md_num(r["sharpness"]) + _marks(r),
                  _md_num(r["ratio_to_sgd"]), _md_num(r["grad_correlation"])] for r in step_rows],
                "lrrr",
            )
            notes = _step_notes(step_rows, d_text, _md_num, str, "†", "‡", DAGGER_NOTE, DDAGGER_NOTE)
            if notes:
                out += [""] + [note + "  " if i < len(notes) - 1 else note for i, note in enumerate(notes)]
            if step == last:
                out += show("landscape_lines", "update_histograms", "cosine_heatmap")
            else:
                out += show(*(f"{n}_step{step}" for n in ("landscape_lines", "update_histograms", "cosine_heatmap")))
    smooth = _smoothness_tables(run, _md_num)
    for i, (title, header, rows_) in enumerate(smooth):
        out += ["", f"## {title}", ""]
        out += _md_table(header, rows_, "l" + "r" * (len(header) - 1))
        if i == len(smooth) - 1:
            out += show("smoothness", "coordinate_smoothness")
    return "\n".join(out) + "\n"


# -- LaTeX -----------------------------------------------------------------------------------------


def _tex_table(caption: str, header: list[str], rows: list[list[str]], align: str, note: str = "") -> list[str]:
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}",
           rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    out += [" & ".join(row) + r" \\" for row in rows]
    out += [r"\bottomrule", r"\end{tabular}"]
    if note:  # below the table, wrapped to the text width (a one-line multicolumn would overflow the page)
        out += [r"\par\smallskip", r"\begin{minipage}{0.95\linewidth}\footnotesize\raggedright", note, r"\end{minipage}"]
    out.append(r"\end{table}")
    return out


_TEX_DAGGER = (r"$\delta$-shifted sharpness $\hat u^\top \nabla^2 f(x - \delta \hat u)\, \hat u$, the Hessian a "
               r"distance $\delta$ toward the step, reported instead of the raw $\hat u^\top \nabla^2 f(x)\, \hat u$, "
               r"which is negative")
_TEX_DDAGGER = (r"negative reported sharpness: the curvature along $\hat u$ is negative (after the "
                r"$\delta$-shift where marked $^\dagger$), so the quadratic model has no minimum")
_TEX_DEFINITIONS = (
    r"Ratio: $S(u)/S(u_{\mathrm{sgd}})$ at the same step, median over the steps where SGD's sharpness is "
    r"$> 0$ (Steps counts them). Sharpness: $S(u) = \hat u^\top \nabla^2 f(x)\, \hat u$, "
    r"$\hat u = u/\|u\|_2$, median; $\delta$-shifted $\hat u^\top \nabla^2 f(x - \delta \hat u)\, \hat u$ where "
    r"the raw value is negative. Neg., Shifted: steps with a negative, a $\delta$-shifted reported value. "
    r"$g^\top \hat u$: gradient projection on the unit direction (positive: the step descends), not a "
    r"correlation coefficient."
)


def _latex(run: Run, steps: Sequence[int] | None) -> str:
    out = [f"% landscape report: {_tex_comment(run.path.name)}", "% Requires \\usepackage{booktabs}."]
    out += [f"% {_tex_comment(k)}: {_tex_comment(v)}" for k, v in _metadata(run)]
    meta = run.meta
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    optimizer = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else {}
    parts = []
    if model.get("class"):
        size = f" with {_int(model['n_params'])} parameters" if "n_params" in model else ""
        parts.append(tex_escape(model["class"]) + size)
    if optimizer.get("class"):
        parts.append(f"trained with {tex_escape(optimizer['class'])}")
    context = f" ({', '.join(parts)})" if parts else ""
    records = sharpness_records(run, steps)
    delta = _find(run.settings, ("delta", "shift_delta"))
    d_text = rf" ($\delta = {tex_escape(delta)}$)" if delta is not None else ""
    if records:
        n_steps = len({r["step"] for r in records})
        rows = summary(run, steps)
        note = _TEX_DEFINITIONS
        excluded = ratio_exclusions(rows)
        if excluded:
            note = _tex_text(excluded) + " " + note
        out += [""] + _tex_table(
            f"Directional sharpness relative to SGD, median over {n_steps} measured "
            f"step{'s' * (n_steps != 1)}{context}.",
            ["Direction", "Ratio to SGD", "Steps", "Sharpness", "Neg.", "Shifted", r"$g^\top \hat u$"],
            [[tex_escape(s["direction"]), _tex_num(s["median_ratio_to_sgd"]), f"{s['n_ratio']}/{s['n_steps']}",
              _tex_num(s["median_sharpness"]), f"{s['n_negative']}/{s['n_steps']}",
              f"{s['n_shifted']}/{s['n_steps']}", _tex_num(s["median_grad_projection"])] for s in rows],
            "lrrrrrr",
            note,
        )
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r)
        for step, step_rows in by_step.items():
            notes = _step_notes(step_rows, d_text, _tex_num, tex_escape, r"$^\dagger$", r"$^\ddagger$",
                                _TEX_DAGGER, _TEX_DDAGGER, text=_tex_text)
            out += [""] + _tex_table(
                f"Directional sharpness at step {step}{context}.",
                ["Direction", "Sharpness", "Ratio to SGD", r"$g^\top \hat u$"],
                [[tex_escape(r["direction"]), _tex_num(r["sharpness"]) + _marks(r, r"$^\dagger$", r"$^\ddagger$"),
                  _tex_num(r["ratio_to_sgd"]), _tex_num(r["grad_correlation"])] for r in step_rows],
                "lrrr",
                " ".join(notes),
            )
    for title, header, rows_ in _smoothness_tables(run, _tex_num):
        out += [""] + _tex_table(
            _tex_text(title) + ".",
            [_tex_text(h) for h in header],
            [[_tex_text(c) for c in row] for row in rows_],
            "l" + "r" * (len(header) - 1),
        )
    return "\n".join(out) + "\n"


def _tex_comment(text: Any) -> str:
    """Text safe inside a LaTeX ``%`` comment line: no line breaks (a newline would end the comment and
    let the rest be typeset or executed)."""
    return " ".join(str(text).split())


_TEX_SYMBOLS = {"L̂": r"$\hat L$", "‖∇f‖": r"$\|\nabla f\|$", "ℓ": r"$\ell$", "ε": r"$\varepsilon$",
                "≤": r"$\le$", "·": r"$\cdot$", "–": "--", "§": r"\S{}", "L0": "$L_0$", "L1": "$L_1$"}


def _tex_text(cell: str) -> str:
    """Escape a cell, keeping already-formatted math (``$...$``) and mapping a few symbols."""
    parts = cell.split("$")
    out = []
    for i, part in enumerate(parts):
        if i % 2:  # inside $...$ produced by _tex_num
            out.append(f"${part}$")
            continue
        text = tex_escape(part)
        for sym, tex in _TEX_SYMBOLS.items():
            text = text.replace(sym, tex)
        out.append(text)
    return "".join(out)


# -- CSV -------------------------------------------------------------------------------------------


def _csv_cell(x: Any) -> Any:
    if x is None:
        return ""
    if isinstance(x, bool):
        return int(x)
    if isinstance(x, float):
        return "" if math.isnan(x) else repr(x)
    return x


def _csv(run: Run, steps: Sequence[int] | None) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in sharpness_records(run, steps):
        writer.writerow([_csv_cell(r.get(c)) for c in CSV_COLUMNS])
    return buf.getvalue()


# -- identical directions -------------------------------------------------------------------------


def equivalences(run: Run, steps: Sequence[int] | None = None) -> list[dirs.Group]:
    """Directions of the run that are one direction in its data (cosine ≈ 1 and the same sharpness at
    every measured step; :func:`landscape._directions.equivalent_groups`): the figures draw each group
    once, named ``adam ≡ adam (trained)``."""
    if not run.has("cosine"):
        return []
    wanted = None if steps is None else set(steps)
    cos = [r for r in run.rows("cosine") if wanted is None or r["step"] in wanted]
    sharp = [r for r in run.rows("sharpness") if wanted is None or r["step"] in wanted]
    names = list(dict.fromkeys(r["direction"] for r in sorted(
        sharp, key=lambda r: _direction_rank(run).get(r["direction"], 1 << 30))))
    return dirs.equivalent_groups(names, cos, sharp)


def _equivalence_text(run: Run, steps: Sequence[int] | None) -> str:
    groups = equivalences(run, steps)
    if not groups:
        return ""
    parts = []
    for g in groups:
        gap = 1 - g.min_cosine
        cos = f"1 − {gap:.0e}" if gap > 0 else "1"
        same = "the same sharpness" if g.max_rel_diff < 1e-4 else f"sharpness within {100 * g.max_rel_diff:.2g}%"
        parts.append(f"{g.label} (cosine ≥ {cos}, {same})")
    return ("Directions that are the same up to a positive factor at every measured step, named once in the "
            "figures: " + "; ".join(parts) + ".")


# -- figures the report links ----------------------------------------------------------------------

_IMAGE_SUFFIXES = (".png", ".svg", ".jpg")
_FIGURE_TITLES = {
    "training_loss": "training loss", "sharpness_ratio": "sharpness ratio to SGD",
    "sharpness_over_time": "directional sharpness over training", "landscape_lines": "loss along each update direction",
    "update_histograms": "update histograms", "cosine_heatmap": "cosine similarities",
    "smoothness": "local smoothness", "coordinate_smoothness": "coordinate-wise smoothness",
}


def _figure_links(figures: str | Path | None, base: str | Path | None) -> dict[str, str]:
    """``{figure stem: link}`` for the figure files in ``figures`` (an image format preferred),
    relative to ``base`` (the folder the report is written to)."""
    if figures is None:
        return {}
    folder = Path(figures)
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".png", ".svg", ".pdf", ".jpg"):
            continue
        old = found.get(path.stem)
        if old is None or (old.suffix not in _IMAGE_SUFFIXES and path.suffix in _IMAGE_SUFFIXES):
            found[path.stem] = path
    start = Path(base) if base is not None else Path.cwd()
    return {stem: Path(os.path.relpath(p.resolve(), start.resolve())).as_posix() for stem, p in found.items()}


def _md_figure(stem: str, link: str) -> str:
    base = stem.split("_step")[0]
    title = _FIGURE_TITLES.get(base, base.replace("_", " "))
    if "_step" in stem:
        title += f", step {stem.rsplit('_step', 1)[1]}"
    if Path(link).suffix in _IMAGE_SUFFIXES:
        return f"![{title}]({link})"
    return f"Figure: [{title}]({link})"


# -- Pan & Li 2023's own layouts: Table 1 (one step) and Tables 4-7 (the trajectory) -------------


def _pick_directions(run: Run, records: list[dict[str, Any]], directions: Any) -> list[dict[str, Any]]:
    if directions is None:
        return records
    present = list(dict.fromkeys(r["direction"] for r in records))
    try:
        chosen = dirs.select(present, directions, trained=run.trained_direction, where=f"run {run.path}")
    except LookupError as e:
        raise NoDataError(str(e)) from None
    rank = {d: i for i, d in enumerate(chosen)}
    return sorted((r for r in records if r["direction"] in rank), key=lambda r: (r["step"], rank[r["direction"]]))


def _step_table(run: Run, fmt: str, steps: Sequence[int] | None, directions: Any) -> str:
    measured = run.steps("sharpness")
    if not measured:
        raise NoDataError(f"run {run.path} has no rows in table 'sharpness'")
    if steps and len(steps) > 1:
        raise ValueError(f"table='step' is one step (Pan & Li 2023, Table 1); got steps {list(steps)}: use "
                         "table='trajectory' for several")
    step = steps[0] if steps else measured[-1]
    rows = _pick_directions(run, sharpness_records(run, [step]), directions)
    delta = _find(run.settings, ("delta", "shift_delta"))
    ctx = _tex_context(run)
    if fmt == "json":
        return _json({"table": "step", "step": step, "run": str(run.path), "columns": list(_STEP_KEYS),
                      "rows": [{k: r.get(k) for k in _STEP_KEYS} for r in rows]})
    if fmt == "csv":
        return _csv_rows(rows, _STEP_KEYS)
    if fmt == "md":
        d_text = f" (δ = {delta})" if delta is not None else ""
        out = [f"## Directional sharpness at step {step}: `{run.path.name}`", ""]
        out += _md_table(["Algorithm", "Sharpness", "Ratio to SGD"],
                         [[r["direction"], _md_num(r["sharpness"]) + _marks(r), _md_num(r["ratio_to_sgd"])]
                          for r in rows], "lrr")
        notes = _step_notes(rows, d_text, _md_num, str, "†", "‡", DAGGER_NOTE, DDAGGER_NOTE)
        out += [""] + [note + "  " if i < len(notes) - 1 else note for i, note in enumerate(notes)] if notes else []
        return "\n".join(out) + "\n"
    d_text = rf" ($\delta = {tex_escape(delta)}$)" if delta is not None else ""
    notes = _step_notes(rows, d_text, _tex_num, tex_escape, r"$^\dagger$", r"$^\ddagger$", _TEX_DAGGER,
                        _TEX_DDAGGER, text=_tex_text)
    out = [f"% landscape: {_tex_comment(run.path)}, step {step}", "% Requires \\usepackage{booktabs}."]
    out += _tex_table(
        f"The directional sharpness of the update direction of each optimization algorithm at step {step}{ctx}, "
        "and its ratio to SGD's.",
        ["Algorithm", "Sharpness", "Ratio to SGD"],
        [[tex_escape(r["direction"]), _tex_num(r["sharpness"]) + _marks(r, r"$^\dagger$", r"$^\ddagger$"),
          _tex_num(r["ratio_to_sgd"])] for r in rows],
        "lrr", " ".join(notes))
    return "\n".join(out) + "\n"


_STEP_KEYS = ("step", "direction", "sharpness", "ratio_to_sgd", "shifted", "raw", "ratio_note")
_TRAJECTORY_KEYS = ("step", "direction", "ratio_to_sgd", "sharpness", "shifted", "ratio_note")


def _trajectory_table(run: Run, fmt: str, steps: Sequence[int] | None, directions: Any) -> str:
    records = _pick_directions(run, sharpness_records(run, steps), directions)
    if not records:
        raise NoDataError(f"run {run.path} has no rows in table 'sharpness'")
    if fmt == "json":
        return _json({"table": "trajectory", "run": str(run.path), "columns": list(_TRAJECTORY_KEYS),
                      "rows": [{k: r.get(k) for k in _TRAJECTORY_KEYS} for r in records]})
    if fmt == "csv":
        return _csv_rows(records, _TRAJECTORY_KEYS)
    by_step: dict[int, list[dict[str, Any]]] = {}
    for r in records:
        by_step.setdefault(r["step"], []).append(r)
    undefined = [s for s, rs in by_step.items() if all(not _finite(r["ratio_to_sgd"]) for r in rs)]
    note = ""
    if undefined:
        note = (f"The ratio to SGD is undefined at step{'s' * (len(undefined) > 1)} "
                f"{', '.join(map(str, undefined))}, where SGD's sharpness is not positive.")
    if fmt == "md":
        out = [f"## Ratio of directional sharpness to SGD along the trajectory: `{run.path.name}`", ""]
        table = []
        for step, rs in by_step.items():
            for i, r in enumerate(rs):
                table.append([str(step) if i == 0 else "", r["direction"],
                              _md_num(r["ratio_to_sgd"]) + ("†" if r["shifted"] else "")])
        out += _md_table(["Step", "Algorithm", "Ratio"], table, "llr")
        shifted = any(r["shifted"] for r in records)
        if shifted:
            out += ["", "† the ratio's sharpness is the δ-shifted ûᵀ∇²f(x − δû)û (the raw value is negative)."]
        if note:
            out += ["", note]
        return "\n".join(out) + "\n"
    body: list[str] = []
    first = True
    for step, rs in by_step.items():
        if not first:
            body.append(r"\midrule")
        first = False
        for i, r in enumerate(rs):
            body.append(" & ".join([str(step) if i == 0 else "", tex_escape(r["direction"]),
                                    _tex_num(r["ratio_to_sgd"]) + (r"$^\dagger$" if r["shifted"] else "")]) + r" \\")
    notes = []
    if any(r["shifted"] for r in records):
        notes.append(r"$^\dagger$ the ratio's sharpness is the $\delta$-shifted value.")
    if note:
        notes.append(_tex_text(note))
    out = [f"% landscape: {_tex_comment(run.path)}", "% Requires \\usepackage{booktabs}.",
           r"\begin{table}[t]", r"\centering", r"\small",
           rf"\caption{{Ratio of directional sharpness of each optimization algorithm to SGD's along the "
           rf"trajectory{_tex_context(run)}.}}",
           r"\begin{tabular}{llr}", r"\toprule", r"Step & Algorithm & Ratio \\", r"\midrule", *body, r"\bottomrule",
           r"\end{tabular}"]
    if notes:
        out += [r"\par\smallskip", r"\begin{minipage}{0.95\linewidth}\footnotesize\raggedright", " ".join(notes),
                r"\end{minipage}"]
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def _tex_context(run: Run) -> str:
    meta = run.meta
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    optimizer = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else {}
    parts = []
    if model.get("class"):
        size = f" with {_int(model['n_params'])} parameters" if "n_params" in model else ""
        parts.append(tex_escape(model["class"]) + size)
    if optimizer.get("class") and optimizer.get("class") != "unknown":
        parts.append(f"trained with {tex_escape(optimizer['class'])}")
    return f" ({', '.join(parts)})" if parts else ""


# -- JSON ------------------------------------------------------------------------------------------


def _plain(x: Any) -> Any:
    """JSON-ready: NaN and ±inf become null, numpy scalars and arrays Python values."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return _plain(x.tolist())
    if isinstance(x, np.generic):
        return _plain(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, Path):
        return str(x)
    return x


def _json(value: Any) -> str:
    return json.dumps(_plain(value), indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def _full_json(run: Run, steps: Sequence[int] | None) -> str:
    records = sharpness_records(run, steps)
    rows = summary(run, steps) if records else []
    by_step: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_step.setdefault(str(r["step"]), []).append({k: r.get(k) for k in CSV_COLUMNS if k != "step"})
    smooth = [{"title": t, "header": h, "rows": rs} for t, h, rs in _smoothness_tables(run, lambda x: x)]
    return _json({
        "run": str(run.path),
        "metadata": dict(_metadata(run)),
        "meta": run.meta,
        "summary": [{**s, "ratio_excluded": [list(e) for e in s["ratio_excluded"]]} for s in rows],
        "ratio_exclusions": ratio_exclusions(rows) if rows else "",
        "equivalent_directions": [{"members": list(g.members), "exact": g.exact, "min_cosine": g.min_cosine,
                                   "max_rel_diff": g.max_rel_diff} for g in equivalences(run, steps)],
        "steps": by_step,
        "smoothness": smooth,
    })


def _csv_rows(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow([_csv_cell(r.get(c)) for c in columns])
    return buf.getvalue()


# -- comparing runs --------------------------------------------------------------------------------


def compare_records(runs: Sequence[Run], *, directions: Any = None, labels: Sequence[str] | None = None,
                    step: int | None = None) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str], list[str]]:
    """Each run's ratio to SGD of every direction: ``({(label, direction): record}, labels, directions)``.

    A record holds ``ratio`` (the median over the steps where the ratio is defined, or the ratio at
    ``step``), ``min`` and ``max`` over those steps, ``n`` (those steps) and ``n_steps`` (measured).
    Directions are the union over the runs in their order (``directions`` selects as in the plots).

    Raises:
        ValueError: fewer than two runs, labels of the wrong length or repeated.
        NoDataError: a run without sharpness rows, or ``step`` not measured in a run.
    """
    if len(runs) < 2:
        raise ValueError(f"compare needs two or more runs, got {len(runs)}")
    labels = list(labels) if labels else [r.path.name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"{len(labels)} label(s) for {len(runs)} runs: give one label per run")
    if len(set(labels)) != len(labels):
        labels = [str(r.path) for r in runs] if len({str(r.path) for r in runs}) == len(runs) else \
            [f"{label} ({i + 1})" for i, label in enumerate(labels)]
    records: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[str] = []
    for run, label in zip(runs, labels):
        if not run.has("sharpness"):
            raise NoDataError(f"run {run.path} has no rows in table 'sharpness'")
        recs = sharpness_records(run, [step] if step is not None else None)
        per: dict[str, list[dict[str, Any]]] = {}
        for r in recs:
            per.setdefault(r["direction"], []).append(r)
        for d, rs in per.items():
            ratios = [r["ratio_to_sgd"] for r in rs if _finite(r["ratio_to_sgd"])]
            records[(label, d)] = {
                "ratio": (float(np.median(ratios)) if ratios else None),
                "min": min(ratios) if ratios else None, "max": max(ratios) if ratios else None,
                "n": len(ratios), "n_steps": len(rs),
                "steps": [r["step"] for r in rs],
            }
            if d not in order:
                order.append(d)
    present = order
    try:
        names = dirs.select(present, directions, trained=None, where="the runs")
    except LookupError as e:
        raise NoDataError(str(e)) from None
    return records, labels, names


def compare(runs: Sequence[Run], fmt: str = "md", *, directions: Any = None, labels: Sequence[str] | None = None,
            step: int | None = None) -> str:
    """The same directions measured on different runs side by side (Pan & Li 2023 compare the SGD and
    the Adam trajectory, Tables 4-7): one row per direction, one column per run, each cell the
    median ratio to SGD over the run's measured steps (with how many steps it covers), or the ratio
    at ``step``.

    Args:
        runs: two or more runs.
        fmt: ``"md"``, ``"latex"``, ``"csv"`` (tidy: run, direction, ratio, min, max, n, n_steps) or
            ``"json"``.
        directions: which directions (default: every direction, in the runs' order).
        labels: one per run (default: the run folders' names).
        step: the ratio at this step of every run instead of the median.
    """
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    records, labels, names = compare_records(runs, directions="all" if directions is None else directions,
                                             labels=labels, step=step)
    what = "median over the measured steps where it is defined" if step is None else f"at step {step}"
    if fmt == "json":
        return _json({"table": "compare", "value": "ratio_to_sgd", "what": what, "step": step,
                      "runs": [{"label": lab, "path": str(r.path)} for lab, r in zip(labels, runs)],
                      "rows": [{"direction": d, **{lab: records.get((lab, d)) for lab in labels}} for d in names]})
    if fmt == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["run", "direction", "ratio_to_sgd", "min", "max", "n", "n_steps"])
        for d in names:
            for lab in labels:
                rec = records.get((lab, d))
                if rec is not None:
                    writer.writerow([lab, d] + [_csv_cell(rec[k]) for k in ("ratio", "min", "max", "n", "n_steps")])
        return buf.getvalue()

    def cell(lab: str, d: str, num: Callable[[Any], str]) -> str:
        rec = records.get((lab, d))
        if rec is None:
            return num(None)
        return num(rec["ratio"]) + (f" ({rec['n']}/{rec['n_steps']})" if step is None else "")

    if fmt == "md":
        out = [f"## Ratio of directional sharpness to SGD, {what}", ""]
        out += _md_table(["Algorithm", *labels], [[d, *(cell(lab, d, _md_num) for lab in labels)] for d in names],
                         "l" + "r" * len(labels))
        out += ["", "Runs: " + "; ".join(f"{lab} = `{r.path}` ({_context_text(r)})" for lab, r in zip(labels, runs))
                + "." + (" In parentheses: the steps the median covers / the steps measured." if step is None else "")]
        return "\n".join(out) + "\n"
    out = ["% landscape compare: " + _tex_comment(", ".join(f"{lab} = {r.path}" for lab, r in zip(labels, runs))),
           "% Requires \\usepackage{booktabs}."]
    out += _tex_table(
        f"Ratio of directional sharpness of each optimization algorithm to SGD's, {tex_escape(what)}, on "
        + ", ".join(f"{tex_escape(lab)} ({tex_escape(_context_text(r))})" for lab, r in zip(labels, runs)) + ".",
        ["Algorithm", *(tex_escape(lab) for lab in labels)],
        [[tex_escape(d), *(_tex_text(cell(lab, d, _tex_num)) for lab in labels)] for d in names],
        "l" + "r" * len(labels))
    return "\n".join(out) + "\n"


def _context_text(run: Run) -> str:
    meta = run.meta
    optimizer = meta.get("optimizer") if isinstance(meta.get("optimizer"), dict) else {}
    steps = run.steps("sharpness")
    opt = optimizer.get("class") if optimizer.get("class") not in (None, "unknown") else "unknown optimizer"
    return f"{opt} trajectory, {len(steps)} measured step{'s' * (len(steps) != 1)}"


# -- entry point -----------------------------------------------------------------------------------


def report(run: Run, fmt: str = "md", *, steps: Sequence[int] | None = None, table: str = "full",
           directions: Any = None, figures: str | Path | None = None, link_base: str | Path | None = None) -> str:
    """The run's tables as text.

    Args:
        run: the run (possibly still being written: the report covers what is committed).
        fmt: ``"md"`` (Markdown: metadata header, median ratio to SGD per direction, one table per
            measured step, smoothness tables), ``"latex"`` (the same tables, booktabs, names
            escaped, metadata as comments), ``"csv"`` (tidy: one row per (step, direction),
            columns :data:`CSV_COLUMNS`, empty cells for missing values, ``shifted`` as 0/1) or
            ``"json"`` (the same content as one JSON document; missing values are null).
        steps: only these measured steps (default: all; ``table="step"``: the last one).
        table: ``"full"`` (the report above), ``"step"`` (Pan & Li 2023, Table 1: every direction's
            sharpness and ratio to SGD at one step) or ``"trajectory"`` (Tables 4-7: the ratio to SGD
            of every direction at every measured step, grouped by step).
        directions: which directions the ``step`` and ``trajectory`` tables list (default: all).
        figures: a folder of saved figures (:func:`landscape.plots.save_figures`): the Markdown
            report links the figures it describes, under the tables they illustrate.
        link_base: the folder the report will be written to; links are relative to it (default:
            the current folder).

    Returns:
        The report text, ending with a newline.

    Raises:
        ValueError: unknown ``fmt`` or ``table``.
        NoDataError: a requested step was not measured.
    """
    if fmt not in REPORT_FORMATS:
        raise ValueError(f"fmt must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    if table not in REPORT_TABLES:
        raise ValueError(f"table must be one of {', '.join(REPORT_TABLES)}, got {table!r}")
    with run.snapshot():  # one consistent state even while the run is still writing
        if run.has("race_runs"):  # an optimizer race (landscape race) has tables of its own
            from landscape.race import race_report

            return race_report(run, fmt)
        if table == "step":
            return _step_table(run, fmt, steps, directions)
        if table == "trajectory":
            return _trajectory_table(run, fmt, steps, directions)
        if fmt == "md":
            return _markdown(run, steps, _figure_links(figures, link_base))
        makers = {"latex": _latex, "csv": _csv, "json": _full_json}
        return makers[fmt](run, steps)
