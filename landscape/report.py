"""Tables from a run store: Markdown, LaTeX (booktabs) and tidy CSV.

Following seed 002 Table 1 (and Tables 4-7): for every measured step, one row per direction with
its directional sharpness, its ratio to SGD's and its gradient correlation; a δ-shifted sharpness
is marked with a dagger and explained in a footnote (with the raw value). A summary gives, per
direction, the median ratio to SGD over the measured steps; a header gives the run's metadata
(model size, optimizer, recipes, steps). When the run has smoothness rows, short smoothness
tables follow (seed 001 §5.2, seed 002 Table 8).

Example:
    >>> from landscape.store import load_run
    >>> from landscape.report import report
    >>> print(report(load_run("runs/tiny"), fmt="md"))                # doctest: +SKIP
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from landscape.store import NoDataError, Run

__all__ = ["REPORT_FORMATS", "CSV_COLUMNS", "report", "sharpness_records", "summary"]

#: Formats :func:`report` produces.
REPORT_FORMATS = ("md", "latex", "csv")

#: Columns of the CSV report, in order (one row per measured step and direction).
CSV_COLUMNS = (
    "step", "direction", "sharpness", "ratio_to_sgd", "shifted", "grad_correlation", "raw", "shifted_value",
    "update_norm", "best_step", "predicted_reduction", "loss", "line_best_step", "line_best_loss",
    "line_reduction",
)

DAGGER_NOTE = "δ-shifted sharpness ûᵀ∇²f(x + δû)û (seed 002 App. B.3) reported instead of the raw ûᵀHû"


# -- data ------------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, (int, float)) and math.isfinite(x)


def _direction_rank(run: Run) -> dict[str, int]:
    return {d: i for i, d in enumerate(run.directions)}


def sharpness_records(run: Run, steps: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """One dict per (step, direction): the ``sharpness`` row plus the measured landscape-line
    optimum (``line_best_step``, ``line_best_loss``, ``line_reduction``; None without a line),
    ordered by step, then by the run's direction order.

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
    out = []
    for r in run.rows("sharpness"):
        if steps is not None and r["step"] not in wanted:
            continue
        line = lines.get((r["step"], r["direction"]))
        out.append({
            **r,
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
    """Per direction, over the measured steps: ``median_ratio_to_sgd``, ``median_sharpness``,
    ``median_grad_correlation`` (NaN-ignoring medians), ``n_steps`` and ``n_shifted``."""
    records = sharpness_records(run, steps)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault(r["direction"], []).append(r)
    rank = _direction_rank(run)
    return [
        {
            "direction": d,
            "median_ratio_to_sgd": _median([r["ratio_to_sgd"] for r in rs]),
            "median_sharpness": _median([r["sharpness"] for r in rs]),
            "median_grad_correlation": _median([r["grad_correlation"] for r in rs]),
            "n_steps": len(rs),
            "n_shifted": sum(bool(r["shifted"]) for r in rs),
        }
        for d, rs in sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0]))
    ]


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
    """Escape LaTeX special characters in plain text (direction names, model names...)."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


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
    """A setting's value, short enough for a header line."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        if len(value) > 4:
            return f"[{len(value)} items]"
        return "[" + ", ".join(_short(v) for v in value) + "]"
    return str(value)


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
        out.append(("optimizer", f"{optimizer.get('class', '?')}({args})"))
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
        status = run.columns("steps")["status"]
        skipped = int(np.sum(status == "skipped"))
        out.append(("training steps", f"{len(status)}" + (f" ({skipped} skipped)" if skipped else "")))
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
        tables.append(("Local smoothness along the training steps (seed 001 §5.2)", ["quantity", "value"], rows))
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
        tables.append(("Coordinate-wise smoothness per layer (seed 001 Fig. 3)", header, rows))
    if run.has("robust"):
        rows = [[str(r["step"]), num(r["top_eig"]), num(r["l_robust"]), num(r["ratio"]), num(r["eps"]),
                 _int(r["n_removed"])] for r in run.rows("robust")]
        tables.append(("Robust smoothness (seed 002 App. D, Table 8)",
                       ["step", "top eigenvalue L", "robust ℓ", "L / ℓ", "ε", "removed"], rows))
    from landscape.curvature_report import curvature_tables

    tables += curvature_tables(run, num)
    return tables


# -- markdown --------------------------------------------------------------------------------------


def _md_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    def esc(cell: str) -> str:
        return str(cell).replace("|", r"\|")

    out = ["| " + " | ".join(map(esc, header)) + " |",
           "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    out += ["| " + " | ".join(map(esc, row)) + " |" for row in rows]
    return out


def _markdown(run: Run, steps: Sequence[int] | None) -> str:
    out = [f"# landscape report: `{run.path.name}`", ""]
    out += _md_table(["", ""], [[k, v] for k, v in _metadata(run)], "ll")
    records = sharpness_records(run, steps)
    delta = _find(run.settings, ("delta", "shift_delta"))
    if not records:
        out += ["", "_No sharpness measurements yet._", ""]
    else:
        n_steps = len({r["step"] for r in records})
        out += ["", f"## Sharpness relative to SGD (median over {n_steps} measured step{'s' * (n_steps != 1)})", ""]
        out += _md_table(
            ["direction", "ratio to SGD", "sharpness", "grad. corr.", "shifted"],
            [[s["direction"], _md_num(s["median_ratio_to_sgd"]), _md_num(s["median_sharpness"]),
              _md_num(s["median_grad_correlation"]), f"{s['n_shifted']}/{s['n_steps']}"]
             for s in summary(run, steps)],
            "lrrrr",
        )
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r)
        for step, rows in by_step.items():
            out += ["", f"## Step {step}", ""]
            out += _md_table(
                ["direction", "sharpness", "ratio to SGD", "grad. corr."],
                [[r["direction"], _md_num(r["sharpness"]) + ("†" if r["shifted"] else ""),
                  _md_num(r["ratio_to_sgd"]), _md_num(r["grad_correlation"])] for r in rows],
                "lrrr",
            )
            shifted = [r for r in rows if r["shifted"]]
            if shifted:
                raw = "; ".join(f"{r['direction']} {_md_num(r['raw'])}" for r in shifted)
                d = f" (δ = {delta})" if delta is not None else ""
                out += ["", f"† {DAGGER_NOTE}{d}. Raw values: {raw}."]
    for title, header, rows in _smoothness_tables(run, _md_num):
        out += ["", f"## {title}", ""]
        out += _md_table(header, rows, "l" + "r" * (len(header) - 1))
    return "\n".join(out) + "\n"


# -- LaTeX -----------------------------------------------------------------------------------------


def _tex_table(caption: str, header: list[str], rows: list[list[str]], align: str, note: str = "") -> list[str]:
    out = [r"\begin{table}[t]", r"\centering", r"\small", rf"\caption{{{caption}}}",
           rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(header) + r" \\", r"\midrule"]
    out += [" & ".join(row) + r" \\" for row in rows]
    out.append(r"\bottomrule")
    if note:
        out.append(rf"\multicolumn{{{len(align)}}}{{l}}{{\footnotesize {note}}} \\")
    out += [r"\end{tabular}", r"\end{table}"]
    return out


def _latex(run: Run, steps: Sequence[int] | None) -> str:
    out = [f"% landscape report: {run.path.name}", "% Requires \\usepackage{booktabs}."]
    out += [f"% {k}: {v}" for k, v in _metadata(run)]
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
    if records:
        n_steps = len({r["step"] for r in records})
        out += [""] + _tex_table(
            f"Directional sharpness relative to SGD, median over {n_steps} measured "
            f"step{'s' * (n_steps != 1)}{context}.",
            ["Direction", "Ratio to SGD", "Sharpness", "Grad.\\ corr.", "Shifted"],
            [[tex_escape(s["direction"]), _tex_num(s["median_ratio_to_sgd"]), _tex_num(s["median_sharpness"]),
              _tex_num(s["median_grad_correlation"]), f"{s['n_shifted']}/{s['n_steps']}"] for s in summary(run, steps)],
            "lrrrr",
        )
        by_step: dict[int, list[dict[str, Any]]] = {}
        for r in records:
            by_step.setdefault(r["step"], []).append(r)
        for step, rows in by_step.items():
            shifted = [r for r in rows if r["shifted"]]
            note = ""
            if shifted:
                d = rf" ($\delta = {delta}$)" if delta is not None else ""
                raw = "; ".join(f"{tex_escape(r['direction'])} {_tex_num(r['raw'])}" for r in shifted)
                note = (r"$^\dagger$ $\delta$-shifted sharpness $\hat u^\top \nabla^2 f(x + \delta \hat u)\, \hat u$"
                        rf"{d} reported instead of the raw $\hat u^\top H \hat u$: {raw}.")
            out += [""] + _tex_table(
                f"Directional sharpness at step {step}{context}.",
                ["Direction", "Sharpness", "Ratio to SGD", "Grad.\\ corr."],
                [[tex_escape(r["direction"]), _tex_num(r["sharpness"]) + (r"$^\dagger$" if r["shifted"] else ""),
                  _tex_num(r["ratio_to_sgd"]), _tex_num(r["grad_correlation"])] for r in rows],
                "lrrr",
                note,
            )
    for title, header, rows in _smoothness_tables(run, _tex_num):
        out += [""] + _tex_table(
            _tex_text(title) + ".",
            [_tex_text(h) for h in header],
            [[_tex_text(c) for c in row] for row in rows],
            "l" + "r" * (len(header) - 1),
        )
    return "\n".join(out) + "\n"


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


# -- entry point -----------------------------------------------------------------------------------


def report(run: Run, fmt: str = "md", *, steps: Sequence[int] | None = None) -> str:
    """The run's tables as text.

    Args:
        run: the run (possibly still being written: the report covers what is committed).
        fmt: ``"md"`` (Markdown: metadata header, median ratio to SGD per direction, one table per
            measured step, smoothness tables), ``"latex"`` (the same tables, booktabs, names
            escaped, metadata as comments) or ``"csv"`` (tidy: one row per (step, direction),
            columns :data:`CSV_COLUMNS`, empty cells for missing values, ``shifted`` as 0/1).
        steps: only these measured steps (default: all).

    Returns:
        The report text, ending with a newline.

    Raises:
        ValueError: unknown ``fmt``.
        NoDataError: a requested step was not measured.
    """
    makers = {"md": _markdown, "latex": _latex, "csv": _csv}
    if fmt not in makers:
        raise ValueError(f"fmt must be one of {', '.join(REPORT_FORMATS)}, got {fmt!r}")
    with run.snapshot():  # one consistent state even while the run is still writing
        return makers[fmt](run, steps)
