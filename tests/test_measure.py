"""measure_step: the rows of one measurement, on closed-form objectives."""

from __future__ import annotations

import pytest
import torch

import landscape as ls
from landscape.measure import MeasureSettings, measure_step
from tests._models import call_loss
from tests.test_curvature import Cubic

OFF = dict(lines=False, cosine=False, smoothness=False, coord_per_layer=0)


def _rows(x0, directions, **settings):
    model = Cubic(torch.tensor(x0, dtype=torch.float64))
    obj = ls.Objective(model, call_loss, None)
    rows = measure_step(obj, 7, obj.params(), directions, settings=MeasureSettings(**{**OFF, **settings}))
    return {r["direction"]: r for r in rows["sharpness"]}


def test_ratio_to_sgd_is_missing_with_a_reason_where_sgd_is_not_positive():
    # f'' along ±e₀ is x₀ (negative here, and still negative after any shift with shift="never");
    # along e₁ it is 1 + x₁.
    e0 = {"x": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}
    e1 = {"x": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}
    rows = _rows([-0.5, 0.3, -0.2], {"sgd": e0, "other": e1}, shift="never")
    assert rows["sgd"]["sharpness"] == pytest.approx(-0.5, rel=1e-12)
    for r in rows.values():
        assert r["ratio_to_sgd"] is None and r["ratio_note"] == "sgd sharpness ≤ 0 (-0.5)"
    # against a positive SGD sharpness the ratio is kept, a negative one included
    rows = _rows([-0.5, 0.3, -0.2], {"sgd": e1, "neg": e0}, shift="never")
    assert rows["neg"]["ratio_to_sgd"] == pytest.approx(-0.5 / 1.3, rel=1e-12) and rows["neg"]["ratio_note"] is None
    assert rows["sgd"]["ratio_to_sgd"] == 1.0
    # the shifted SGD value decides: x₀ = −0.004 is negative at x and positive at x − δû along û = −e₀
    rows = _rows([-0.004, 0.3, -0.2], {"sgd": {"x": -e0["x"]}, "other": e1})
    assert rows["sgd"]["shifted"] and rows["sgd"]["sharpness"] == pytest.approx(0.006, rel=1e-9)
    assert rows["other"]["ratio_to_sgd"] == pytest.approx(1.3 / 0.006, rel=1e-9)


def test_no_reference_direction_gives_missing_ratios_with_the_reason():
    e1 = {"x": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}
    rows = _rows([-0.5, 0.3, -0.2], {"other": e1})
    assert rows["other"]["ratio_to_sgd"] is None and "no sgd" in rows["other"]["ratio_note"]
