"""Every registered recipe against its seed formula (tests/optim/_reference.py), driven by the registry:
alone through its pure Transform, and all together through PseudoUpdates (shared states)."""

from __future__ import annotations

import math

import pytest
import torch

import landscape.optim as lo
from tests.optim._reference import REFERENCES, make_reference

NAMES = lo.recipe_names()

# shapes: a matrix, a 3-D tensor (Adafactor factors its last two dims), a vector and a scalar
SHAPES = {"w": (7, 5), "conv": (2, 3, 4), "b": (5,), "s": ()}

# non-default hyperparameters per recipe, to check that overrides reach the math
OVERRIDES = {
    "sgd": {"beta": 0.5},
    "sgd_clip": {"clip": 0.3, "per_tensor": True},
    "normsgd": {"beta": 0.0},
    "normsgd_clip": {"clip": 0.02},
    "signsgd": {"beta": 0.7},
    "adam": {"beta1": 0.8, "beta2": 0.9, "eps": 1e-3},
    "adam_clip": {"clip": 0.2, "per_tensor": True},
    "adam_clip_update": {"clip": 0.05},
    "adafactor": {"decay_rate": -0.5, "d": 0.5, "eps1": 1e-3},
    "adafactor_clip": {"clip": 0.1, "per_tensor": True},
    "lion": {"beta1": 0.5, "beta2": 0.9},
    "lion_clip_update": {"clip": 0.25},
    "gensignsgd": {"beta2": 0.9, "eps": 1e-2},
    "smoothed_signsgd": {"beta": 0.5},
    "smoothed_normsgd": {"per_tensor": True},
    "adam_valueclip": {"alpha": 0.5},
    "adam_normclip": {"alpha": 2.0, "per_tensor": True},
}


def random_grads(step: int, dtype=torch.float64) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1000 + step)
    # heavy-tailed scales per coordinate so that clipping, signs and norms all matter
    return {
        n: torch.randn(s, generator=gen, dtype=dtype) * torch.exp(torch.randn(s, generator=gen, dtype=dtype))
        for n, s in SHAPES.items()
    }


def assert_tree_close(actual, expected, rtol, atol, what):
    assert actual.keys() == expected.keys(), what
    for k in expected:
        a, e = actual[k], expected[k]
        assert a.shape == e.shape, f"{what} {k}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        if not torch.allclose(a.double(), e.double(), rtol=rtol, atol=atol):
            diff = (a.double() - e.double()).abs()
            i = int(diff.reshape(-1).argmax())
            raise AssertionError(
                f"{what} {k}: max |diff| {float(diff.max()):.3g} at flat index {i}: "
                f"got {float(a.reshape(-1)[i]):.10g}, expected {float(e.reshape(-1)[i]):.10g}"
            )


def test_every_recipe_has_a_reference_and_design_names():
    design = {
        "sgd", "sgd_clip", "normsgd", "normsgd_clip", "signsgd", "adam", "adam_clip", "adam_clip_update",
        "adafactor", "adafactor_clip", "lion", "lion_clip_update", "gensignsgd", "smoothed_signsgd",
        "smoothed_normsgd", "adam_valueclip", "adam_normclip",
    }  # fmt: skip
    assert set(NAMES) == design
    assert set(REFERENCES) == design
    assert set(OVERRIDES) == design


@pytest.mark.parametrize("name", NAMES)
def test_defaults_are_the_seeds(name):
    _, hp = REFERENCES[name]
    defaults = dict(lo.REGISTRY[name].defaults)
    for k, v in hp.items():
        if k == "clip_update":
            continue
        assert defaults[k] == v, f"{name}: default {k}={defaults[k]!r}, the seed says {v!r}"


@pytest.mark.parametrize("overridden", [False, True], ids=["defaults", "overrides"])
@pytest.mark.parametrize("name", NAMES)
def test_transform_matches_seed_formula(name, overridden):
    hp = OVERRIDES[name] if overridden else {}
    tx = lo.recipe(name, **hp)
    ref = make_reference(name, **hp)
    params = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    state = tx.init(params)
    for t in range(1, 6):
        g = random_grads(t)
        g_before = {k: v.clone() for k, v in g.items()}
        u, state = tx.update(g, state, params)
        assert_tree_close(u, ref.step(g), rtol=1e-9, atol=1e-12, what=f"{name} step {t}")
        assert all(torch.equal(g[k], g_before[k]) for k in g), "update() modified the gradients"


@pytest.mark.parametrize("storage", ["flat", "per_tensor"])
def test_all_recipes_together_match_seed_formulas(storage, monkeypatch):
    """The shared states of PseudoUpdates give every recipe exactly its own formula, both with one
    contiguous buffer per state (parameters on one device and dtype) and with per-tensor storage
    (the fallback for mixed devices/dtypes)."""
    if storage == "per_tensor":
        import landscape.optim.pseudo as pseudo

        monkeypatch.setattr(pseudo.Layout, "of", staticmethod(lambda like: None))
    params = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    pu = lo.PseudoUpdates(params)
    refs = {n: make_reference(n) for n in NAMES}
    for t in range(1, 6):
        g = random_grads(t)
        pu.observe(g)
        expected = {n: r.step(g) for n, r in refs.items()}
        got = pu.directions()
        for n in NAMES:
            assert_tree_close(got[n], expected[n], rtol=1e-9, atol=1e-12, what=f"{n} step {t}")


def test_adafactor_relative_step_matches_seed():
    """Algorithms 7-8 with α_t = max(ε₂, RMS(x_{t−1}))·min(10⁻², 1/√t) folded into the direction."""
    gen = torch.Generator().manual_seed(3)
    params = {n: torch.randn(s, generator=gen, dtype=torch.float64) for n, s in SHAPES.items()}
    params["b"] = torch.full((5,), 1e-5, dtype=torch.float64)  # RMS below ε₂: α uses ε₂
    tx = lo.recipe("adafactor", relative_step=True)
    ref = make_reference("adafactor", relative_step=True, params=params)
    state = tx.init(params)
    for t in range(1, 5):
        g = random_grads(t)
        u, state = tx.update(g, state, params)
        assert_tree_close(u, ref.step(g), rtol=1e-9, atol=1e-14, what=f"step {t}")


def test_float32_close_to_float64_reference():
    params = {n: torch.zeros(s) for n, s in SHAPES.items()}
    pu = lo.PseudoUpdates(params, ["adam", "lion_clip_update", "adafactor_clip", "gensignsgd"])
    refs = {n: make_reference(n) for n in pu.names}
    for t in range(1, 4):
        g = random_grads(t)
        pu.observe({k: v.float() for k, v in g.items()})
        got = pu.directions()
        for n, r in refs.items():
            e = r.step(g)
            assert all(v.dtype == torch.float32 for v in got[n].values())
            assert_tree_close(got[n], e, rtol=1e-4, atol=1e-6, what=f"{n} float32 step {t}")


# --- the registry's public face ----------------------------------------------------------------------


def test_unknown_recipe_lists_valid_names():
    with pytest.raises(KeyError, match="valid recipes: sgd, sgd_clip"):
        lo.recipe("sgdd")


def test_unknown_override_lists_valid_hyperparameters():
    with pytest.raises(TypeError, match=r"no hyperparameter 'beta1'.*valid: beta, clip, per_tensor"):
        lo.recipe("sgd_clip", beta1=0.9)


@pytest.mark.parametrize(
    "name, bad",
    [
        ("sgd", {"beta": 1.0}),
        ("sgd", {"beta": -0.1}),
        ("adam", {"beta2": 1.5}),
        ("adam", {"eps": -1.0}),
        ("sgd_clip", {"clip": 1.5}),
        ("lion", {"beta2": 0.0}),
        ("adam_valueclip", {"alpha": 0.0}),
        ("adafactor", {"decay_rate": 0.5}),
        ("adafactor", {"d": 0.0}),
        ("gensignsgd", {"beta2": float("nan")}),
    ],
)
def test_out_of_range_hyperparameters_raise(name, bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=f"Invalid {key}"):
        lo.recipe(name, **bad)


def test_describe_and_format_cover_every_recipe():
    rows = lo.describe_recipes()
    assert [r["name"] for r in rows] == NAMES
    text = lo.format_recipes()
    for r in rows:
        assert r["rule"] and r["source"]
        assert r["name"] in text and r["rule"] in text
        for k, v in r["defaults"].items():
            assert f"{k}={v!r}" in text
    assert rows[0]["defaults"] == {"beta": 0.9}


def test_recipe_is_a_short_chain_with_clipping_as_one_more_link():
    plain, clipped = lo.recipe("sgd"), lo.recipe("sgd_clip")
    assert len(plain.atoms) == 1 and len(clipped.atoms) == 2
    assert clipped.atoms[1] == plain.atoms[0]
    assert 1 <= min(len(lo.recipe(n).atoms) for n in NAMES) and max(len(lo.recipe(n).atoms) for n in NAMES) <= 4


def test_custom_chain_from_atoms_equals_recipe():
    custom = lo.chain(lo.clip_top(0.5), lo.scale_by_adam(second_moment_of="raw"))
    built = lo.recipe("adam_clip")
    params = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    s1, s2 = custom.init(params), built.init(params)
    for t in range(1, 4):
        g = random_grads(t)
        u1, s1 = custom.update(g, s1)
        u2, s2 = built.update(g, s2)
        assert_tree_close(u1, u2, rtol=0, atol=0, what="custom chain")


def test_transform_update_is_pure():
    tx = lo.recipe("adam_clip")
    params = {n: torch.zeros(s, dtype=torch.float64) for n, s in SHAPES.items()}
    s0 = tx.init(params)
    g = random_grads(1)
    u1, s1 = tx.update(g, s0)
    u2, s2 = tx.update(g, s0)  # same input state -> same result, and s0 untouched
    assert_tree_close(u1, u2, 0, 0, "repeat")
    assert int(s0["step"]) == 0 and all(float(v.abs().sum()) == 0 for t in s0["moments"].values() for v in t.values())
    assert int(s1["step"]) == 1


def test_opaque_user_transform_chains_with_atoms():
    """A user's own Transform(init, update) composes with atoms (optax-style, no sharing)."""

    def init(params):
        return {}

    def update(grads, state, params=None):
        return {k: 2 * v for k, v in grads.items()}, state

    double = lo.Transform(init, update)
    tx = lo.chain(double, lo.trace(0.5))
    assert tx.atoms is None
    params = {"w": torch.zeros(3, dtype=torch.float64)}
    s = tx.init(params)
    g = {"w": torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)}
    u, s = tx.update(g, s)
    assert torch.allclose(u["w"], g["w"])  # 0.5 * 2g
    pu = lo.PseudoUpdates(params, {"double_trace": tx, "sgd": "sgd"})
    pu.observe(g)
    assert torch.allclose(pu.directions()["double_trace"]["w"], g["w"])


def test_top_k_threshold_public_helper():
    x = {"a": torch.arange(1.0, 11.0), "b": -torch.arange(11.0, 21.0)}
    taus = lo.top_k_threshold(x, 0.1)  # 20 coordinates, k = 2: the 2nd largest |x| = 19
    assert taus == {"a": 19.0, "b": 19.0}
    assert lo.top_k_threshold(x, 0.1, per_tensor=True) == {"a": 10.0, "b": 20.0}
    assert lo.top_k_threshold(x, 0.0) == {"a": math.inf, "b": math.inf}
