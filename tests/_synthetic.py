"""A realistic fake run written through the store API, for tests of plots, reports and the CLI.

The numbers mimic a small transformer trained with Adam (seed 002 Table 1 ratios), and include the
awkward cases readers must handle: a δ-shifted sharpness, a negative reported sharpness (negative
ratio to SGD), a NaN sharpness, a skipped training step, NaN/inf inside a landscape line; and, on
request (``sgd_negative=``), steps where SGD's own sharpness is negative, so that the ratio to SGD is
undefined there.

Example:
    >>> from tests._synthetic import write_synthetic_run
    >>> from landscape.store import load_run
    >>> run = load_run(write_synthetic_run(tmp_path / "run"))           # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from landscape._ratio import ratio_to_reference
from landscape.store import RunStore

RECIPES: tuple[str, ...] = (
    "sgd", "sgd_clip", "normsgd", "normsgd_clip", "signsgd", "adam", "adam_clip", "adam_clip_update",
    "adafactor", "adafactor_clip", "lion", "lion_clip_update", "gensignsgd", "smoothed_signsgd",
    "smoothed_normsgd", "adam_valueclip", "adam_normclip",
)
TRAINED = "adam (trained)"

# Ratio to SGD of each recipe at step 0 (seed 002 Table 1 where it has one).
_RATIO = {
    "sgd": 1.0, "sgd_clip": 0.060764, "normsgd": 0.083261, "normsgd_clip": 0.020651, "signsgd": 0.009136,
    "adam": 0.029131, "adam_clip": 6.617e-5, "adam_clip_update": 0.021666, "adafactor": 6.916e-6,
    "adafactor_clip": 2.364e-8, "lion": 0.013626, "lion_clip_update": 0.024812, "gensignsgd": 0.02,
    "smoothed_signsgd": 0.004, "smoothed_normsgd": 0.03, "adam_valueclip": 0.004, "adam_normclip": 0.01,
    TRAINED: 0.03,
}
LAYERS = ("embed.weight", "blocks.0.attn.qkv.weight")

SETTINGS = {
    "every": 50,
    "delta": 0.01,
    "shift_policy": "negative",
    "line": {"points": 21, "s_max": 2.0},
    "histogram_bins": 40,
}


def sharpness_value(step: int, direction: str, sgd_negative: Sequence[int] = ()) -> tuple[float, float, float | None, bool]:
    """(reported, raw, shifted_value, shifted) for ``direction`` at ``step`` in the synthetic run."""
    sgd = 8.674583 / (1.0 + step / 50.0)
    if step in sgd_negative:  # every direction negative, still after the shift (as at a demo's first step)
        scale = _RATIO.get(direction, 0.01)
        return -2.0 * scale, -1.0 * scale, -2.0 * scale, True
    raw = sgd * _RATIO.get(direction, 0.01) * (1.0 + 0.1 * np.sin(step + len(direction)))
    if step == 50 and direction == "adam":  # negative raw value, positive after the δ-shift
        return 0.0021, -0.0013, 0.0021, True
    if step == 100 and direction == "lion":  # still negative after the shift: negative ratio
        return -0.0005, -0.0009, -0.0005, True
    if step == 0 and direction == "gensignsgd":  # a measurement that failed
        return float("nan"), float("nan"), None, False
    return float(raw), float(raw), None, False


def write_synthetic_run(
    path: str | Path,
    *,
    measured: Sequence[int] = (0, 50, 100),
    recipes: Sequence[str] = RECIPES,
    trained: str | None = TRAINED,
    smoothness: bool = True,
    seed: int = 0,
    sgd_negative: Sequence[int] = (),
    legacy_ratios: bool = False,
) -> Path:
    """Write a complete fake run into ``path`` through :class:`RunStore`; returns ``path``.

    ``sgd_negative``: steps where every direction's reported sharpness, SGD's included, is negative.
    ``legacy_ratios``: store ``value / sgd`` even where SGD's sharpness is ≤ 0, as runs written before
    the ratio rule did (readers must drop those ratios)."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    directions = list(recipes) + ([trained] if trained else [])
    last = max(measured)
    meta = {
        "model": {"class": "TinyLM", "n_params": 1_234_567, "n_measured": 1_200_000},
        "optimizer": {"class": "AdamW", "hyperparameters": {"lr": 1e-3, "betas": [0.9, 0.999], "weight_decay": 0.1}},
        "recipes": list(recipes),
        "trained_direction": trained,
        "versions": {"landscape": "0.1.0", "torch": "2.13.0", "python": "3.11.2"},
        "mode": "eval",
    }
    with RunStore(path, settings={**SETTINGS, "recipes": list(recipes)}, meta=meta) as store:
        losses = 4.0 * np.exp(-np.arange(last + 1) / 60.0) + 1.0 + 0.03 * rng.standard_normal(last + 1)
        store.write("steps", [
            {"step": t, "loss": float(losses[t]), "grad_norm": float(2.0 / (1 + t / 30)), "lr": 1e-3,
             "status": "skipped" if t == 37 else "ok", "reason": "non-finite loss" if t == 37 else None,
             "wall": 0.1 * t}
            for t in range(last + 1)
        ])
        store.log_event(37, "skip", "step 37 skipped: non-finite loss")
        edges = np.linspace(-12.0, 1.0, 41)
        for step in measured:
            f0 = float(losses[step])
            sharp, lines, hists = [], [], []
            sgd_value = sharpness_value(step, "sgd", sgd_negative)[0]
            for d in directions:
                value, raw, shifted_value, shifted = sharpness_value(step, d, sgd_negative)
                ratio, note = ratio_to_reference(value, sgd_value)
                if legacy_ratios:
                    ratio, note = value / sgd_value, None
                g = 0.5 + 0.3 * rng.random()
                positive = value > 0
                sharp.append({
                    "step": step, "direction": d, "sharpness": value, "raw": raw, "shifted_value": shifted_value,
                    "shifted": shifted, "ratio_to_sgd": ratio, "ratio_note": note, "grad_correlation": g,
                    "update_norm": float(rng.uniform(0.1, 10)), "best_step": g / value if positive else None,
                    "predicted_reduction": g * g / (2 * value) if positive else None, "loss": f0,
                })
                s = np.linspace(0.0, 2.0, 21)
                curv = value if np.isfinite(value) else 1.0
                loss = f0 - g * s + 0.5 * max(curv, 0.05) * s**2 + 0.05 * s**3
                if d == "sgd":
                    loss[-1] = np.inf  # diverged at the largest step
                if d == "gensignsgd":
                    loss[-2] = np.nan
                best = int(np.nanargmin(np.where(np.isfinite(loss), loss, np.nan)))
                lines.append({"step": step, "direction": d, "s": s, "loss": loss, "best_step": float(s[best]),
                              "best_loss": float(loss[best]), "reduction": float(f0 - loss[best])})
                u = rng.lognormal(mean=-6 - _RATIO.get(d, 0.01), sigma=2.0, size=4000)
                u[: 40 if "sign" in d else 0] = 0.0
                nz = u[u > 0]
                counts, _ = np.histogram(np.log10(nz), bins=edges)
                hists.append({"step": step, "direction": d, "edges": edges, "counts": counts,
                              "sparsity": float(np.mean(u < 1e-3 * u.max())), "zeros": int((u == 0).sum())})
            vectors = {d: rng.standard_normal(64) + 2.0 * (d.split("_")[0] == "adam") for d in directions}
            cosine = [
                {"step": step, "a": a, "b": b,
                 "cosine": float(vectors[a] @ vectors[b] / np.linalg.norm(vectors[a]) / np.linalg.norm(vectors[b]))}
                for i, a in enumerate(directions) for b in directions[i + 1:]
            ]
            with store.transaction():  # one measurement = one atomic commit
                store.write("sharpness", sharp)
                store.write("lines", lines)
                store.write("histograms", hists)
                store.write("cosine", cosine)
                if smoothness:
                    store.write("robust", {"step": step, "top_eig": 120.0 + step, "l_robust": 3.0 + step / 100,
                                           "ratio": (120.0 + step) / (3.0 + step / 100), "eps": 0.01,
                                           "n_removed": 12000, "n_samples": 8})
                    store.write("coord_smoothness", [
                        {"step": step, "layer": layer, "ratio": rng.lognormal(2 + k, 1.0, 50),
                         "min_grad": rng.lognormal(-8 + k, 1.5, 50)}
                        for k, layer in enumerate(LAYERS)
                    ])
        if smoothness:
            grad = 2.0 / (1 + np.arange(0, last, 5) / 30)
            store.write("smoothness", [
                {"step": int(t), "l_hat": float(5.0 + 40.0 * gn * rng.uniform(0.5, 1.0)), "grad_norm": float(gn),
                 "step_norm": 1e-3, "per_gamma": {f"{k}/6": float(5 + 40 * gn * (0.5 + k / 12)) for k in range(1, 6)}}
                for t, gn in zip(range(0, last, 5), grad)
            ])
    return path
