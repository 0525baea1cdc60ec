"""Tables of the curvature measurements for ``landscape report`` (Markdown, LaTeX): eigenvalues with
residuals, per-block eigenvalues, traces ± standard error, preconditioned sharpness against the
stability threshold, and where each direction's sharpness lives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from landscape.store import Run

__all__ = ["curvature_tables"]

_LABEL = {"hessian": "Hessian", "ggn": "Gauss–Newton"}
_ORDER = {"hessian": 0, "ggn": 1}
Table = tuple[str, list[str], list[list[str]]]

# Markdown text and its LaTeX form (report.py's LaTeX escaper keeps $...$ as math)
_TEX = {
    "‖Av−λv‖": r"$\|Av-\lambda v\|$",
    "λ_max(P⁻¹H)": r"$\lambda_{\max}(P^{-1}H)$",
    "ûᵀAû": r"$\hat u^\top A \hat u$",
    "/η": r"$/\eta$",
    "±": r"$\pm$",
    "%": "%",
}


def _text(tex: bool):
    def t(s: str) -> str:
        if tex:
            for k, v in _TEX.items():
                s = s.replace(k, v)
        return s

    return t


def _curvatures(rows: list[dict[str, Any]]) -> list[str]:
    return sorted(dict.fromkeys(r["curvature"] for r in rows), key=lambda c: _ORDER.get(c, 9))


def _eigen_tables(run: Run, num: Callable[[Any], str], t: Callable[[str], str]) -> list[Table]:
    rows = run.rows("eigenvalues")
    out: list[Table] = []
    for curv in _curvatures(rows):
        whole = [r for r in rows if r["curvature"] == curv and r["block"] == "all"]
        steps = sorted({r["step"] for r in whole})
        table = []
        for s in steps:
            at = [r for r in whole if r["step"] == s]
            top = sorted((r for r in at if r["which"] == "top"), key=lambda r: r["rank"])
            bot = sorted((r for r in at if r["which"] == "bottom"), key=lambda r: r["rank"])
            res = max((r["residual"] for r in at), default=float("nan"))
            table.append([str(s), ", ".join(num(r["value"]) for r in top) or "–",
                          ", ".join(num(r["value"]) for r in bot) or "–", num(res),
                          "yes" if all(r["converged"] for r in at) else "no"])
        if table:
            out.append((f"Eigenvalues of the {_LABEL.get(curv, curv)} (Lanczos)",
                        ["step", "largest", "most negative", t("max residual ‖Av−λv‖"), "converged"], table))
        blocks = [r for r in rows if r["curvature"] == curv and r["block"] != "all"]
        if blocks:
            last = max(r["step"] for r in blocks)
            table = []
            for b in dict.fromkeys(r["block"] for r in blocks if r["step"] == last):
                at = [r for r in blocks if r["step"] == last and r["block"] == b]
                top = [r["value"] for r in sorted(at, key=lambda r: r["rank"]) if r["which"] == "top"]
                bot = [r["value"] for r in sorted(at, key=lambda r: r["rank"]) if r["which"] == "bottom"]
                table.append([b, num(top[0]) if top else "–", num(bot[0]) if bot else "–",
                              num(max(r["residual"] for r in at))])
            out.append((f"Eigenvalues of the {_LABEL.get(curv, curv)} per block, step {last}",
                        ["block", "largest", "most negative", "max residual"], table))
    return out


def _trace_table(run: Run, num: Callable[[Any], str], t: Callable[[str], str]) -> list[Table]:
    rows = sorted(run.rows("trace"), key=lambda r: (r["step"], _ORDER.get(r["curvature"], 9), r["method"]))
    table = [[str(r["step"]), _LABEL.get(r["curvature"], r["curvature"]), r["method"],
              f"{num(r['estimate'])} {t('±')} {num(r['stderr'])}", str(r["n_products"])] for r in rows]
    return [(t("Trace estimates (± 1 standard error)"), ["step", "matrix", "method", "trace", "products"], table)]


def _preconditioned_table(run: Run, num: Callable[[Any], str], t: Callable[[str], str]) -> list[Table]:
    from landscape.stability import stability_multiplier

    rows = run.rows("preconditioned")
    opt = run.meta.get("optimizer") if isinstance(run.meta.get("optimizer"), dict) else {}
    mult = stability_multiplier(str(opt.get("class")), **(opt.get("hyperparameters") or {})) if opt.get("class") else None
    lr = {}
    if run.has("steps"):
        s = run.columns("steps")
        lr = dict(zip(s["step"].tolist(), s["lr"].tolist()))
    header = ["step", "optimizer", t("λ_max(P⁻¹H)"), "residual"]
    threshold = mult is not None and mult[1] == "preconditioned"
    if threshold:
        header += [t(f"threshold {mult[0]:.3g}/η")]
    table = []
    for r in rows:
        row = [str(r["step"]), r["optimizer"], num(r["value"]), num(r["residual"])]
        if threshold:
            eta = lr.get(r["step"], float("nan"))
            row.append(num(mult[0] / eta) if eta and np.isfinite(eta) and eta > 0 else "–")
        table.append(row)
    return [("Preconditioned sharpness (Cohen et al. 2022)", header, table)]


def _layers_table(run: Run, num: Callable[[Any], str], t: Callable[[str], str]) -> list[Table]:
    rows = run.rows("sharpness_layers")
    out: list[Table] = []
    for curv in _curvatures(rows):
        at_curv = [r for r in rows if r["curvature"] == curv]
        last = max(r["step"] for r in at_curv)
        at = [r for r in at_curv if r["step"] == last]
        table = []
        for d in dict.fromkeys(r["direction"] for r in at):
            terms = sorted(((r["contribution"], r["block"]) for r in at if r["direction"] == d),
                           key=lambda t: -abs(t[0]))
            total = sum(c for c, _ in terms)
            share = [f"{b} ({100 * c / total:.0f}%)" if total else b for c, b in terms[:3]]
            table.append([d, num(total)] + share + [""] * (3 - len(share)))
        out.append((t(f"Where the sharpness lives: the largest per-layer terms of ûᵀAû, {_LABEL.get(curv, curv)}, "
                      f"step {last}"), ["direction", t("ûᵀAû"), "1st", "2nd", "3rd"], table))
    return out


def curvature_tables(run: Run, num: Callable[[Any], str]) -> list[Table]:
    """``(title, header, rows)`` of every curvature table the run has data for (``num`` formats a
    number: report.py's Markdown or LaTeX formatter, which also picks the text's form)."""
    t = _text(getattr(num, "__name__", "") == "_tex_num")
    out: list[Table] = []
    if run.has("eigenvalues"):
        out += _eigen_tables(run, num, t)
    if run.has("trace"):
        out += _trace_table(run, num, t)
    if run.has("preconditioned"):
        out += _preconditioned_table(run, num, t)
    if run.has("sharpness_layers"):
        out += _layers_table(run, num, t)
    return out
