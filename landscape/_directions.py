"""Which directions a figure or table shows, how they group into optimizer families, and which of
them are the same direction (named once).

No torch, no matplotlib: the report and the command line use this too.

- :func:`select` turns a ``directions=`` argument (``None``: the paper's families; ``"all"``; names
  or shell patterns such as ``"adam*"``) into the directions of a run, in the run's order.
- :func:`family` names the optimizer family of a direction (``adam_clip`` -> ``adam``; the trained
  direction -> the family of the trained optimizer when it has one).
- :func:`equivalent_groups` finds directions that are the same up to a positive factor, from the
  data: the cosine table says cos(u_a, u_b) ≈ 1 at every measured step and their sharpness agrees
  (``adam`` and ``adam (trained)`` when Adam trains; ``smoothed_signsgd`` and ``adam_valueclip``,
  equal up to the factor 1/(1 − β₁ᵗ) of Cesista 2025).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "PAPER_RECIPES", "EXTRA_RECIPES", "FAMILY_NAMES", "Group", "select", "family", "family_label",
    "equivalent_groups", "group_label",
]

#: The update directions of Pan & Li 2023 (Table 1 and Figs. 2-4): SGD, normalized SGD, signSGD, Adam,
#: Adafactor and Lion, with their coordinate-wise clipped variants.
PAPER_RECIPES = (
    "sgd", "sgd_clip", "normsgd", "normsgd_clip", "signsgd", "adam", "adam_clip", "adam_clip_update",
    "adafactor", "adafactor_clip", "lion", "lion_clip_update",
)
#: Recipes from the other works (generalized signSGD of Crawshaw et al. 2022; the smoothed methods and
#: clipped Adam of Cesista 2025): measured, but shown only when asked for (``directions="all"``).
EXTRA_RECIPES = ("gensignsgd", "smoothed_signsgd", "smoothed_normsgd", "adam_valueclip", "adam_normclip")

#: Display name of each family (the base recipe), in the order panels are drawn.
FAMILY_NAMES: dict[str, str] = {
    "sgd": "SGD",
    "normsgd": "normalized SGD",
    "signsgd": "signSGD",
    "adam": "Adam",
    "adafactor": "Adafactor",
    "lion": "Lion",
    "gensignsgd": "generalized signSGD",
    "smoothed_signsgd": "smoothed signSGD",
    "smoothed_normsgd": "smoothed normSGD",
}

#: Suffixes marking a variant of a base recipe, longest first.
VARIANT_SUFFIXES = ("_clip_update", "_valueclip", "_normclip", "_clip")

#: torch.optim classes (lower case) whose step is a direction of a family here.
_OPTIMIZER_FAMILY = {"sgd": "sgd", "adam": "adam", "adamw": "adam", "nadam": "adam", "radam": "adam",
                     "adafactor": "adafactor", "lion": "lion", "signsgd": "signsgd"}
TRAINED_SUFFIX = " (trained)"


def split_recipe(name: str) -> tuple[str, str]:
    """``"adam_clip_update"`` -> ``("adam", "_clip_update")``; a base recipe -> ``(name, "")``."""
    for suffix in VARIANT_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def select(present: Sequence[str], directions: str | Iterable[str] | None, *, trained: str | None = None,
           where: str = "the run") -> list[str]:
    """The directions to show, in the order of ``present`` (the run's direction order).

    Args:
        present: the directions the data has, in order.
        directions: ``None`` (default): every direction but the recipes of :data:`EXTRA_RECIPES`
            (the paper's families, the trained direction and any recipe of your own), or all of
            ``present`` when that leaves none; ``"all"``; a name; or names and shell patterns
            (``"adam*"``, ``"*_clip"``), kept in the order given.
        trained: the run's trained direction (always kept by the default).
        where: names the data in the error message.

    Raises:
        LookupError: a name or pattern that matches nothing, naming what is available.
    """
    present = list(dict.fromkeys(present))
    if directions is None:
        chosen = [d for d in present if d not in EXTRA_RECIPES or d == trained]
        return chosen or present
    if isinstance(directions, str):
        if directions == "all":
            return present
        directions = [directions]
    out: list[str] = []
    unknown = []
    for item in directions:
        for part in (p.strip() for p in str(item).split(",")):
            if not part:
                continue
            if part == "all":
                matched = present
            elif part in present:
                matched = [part]
            else:
                matched = [d for d in present if fnmatch.fnmatchcase(d, part)]
            if not matched:
                unknown.append(part)
            out.extend(d for d in matched if d not in out)
    if unknown:
        raise LookupError(f"direction(s) {', '.join(map(repr, unknown))} not in {where}; "
                          f"available: {', '.join(present)}")
    return out


def family(name: str, *, trained: str | None = None, optimizer_class: str | None = None) -> str:
    """The family (base recipe) of a direction.

    A recipe's family is its base (``adam_clip_update`` -> ``adam``). The trained direction
    (``"adam (trained)"``, or ``analyze``'s ``"checkpoint step"``) belongs to the family of the
    optimizer that trained the model when that is one (Adam, AdamW -> ``adam``; SGD -> ``sgd``),
    else to a family of its own, named after it.
    """
    if name == trained or name.endswith(TRAINED_SUFFIX):
        for candidate in (name.removesuffix(TRAINED_SUFFIX), optimizer_class):
            if candidate and candidate.lower() in _OPTIMIZER_FAMILY:
                return _OPTIMIZER_FAMILY[candidate.lower()]
        return name
    return split_recipe(name)[0]


def family_label(base: str) -> str:
    """``"adam"`` -> ``"Adam"``; an unknown family keeps its name."""
    return FAMILY_NAMES.get(base, base)


@dataclass(frozen=True)
class Group:
    """Directions that are the same up to a positive factor.

    Attributes:
        members: the directions, in the run's order (the first one's style draws the group).
        exact: every pair has 1 − cos ≤ 1e-6 at every step considered (``≡``), else ``≈``.
        min_cosine: the smallest cosine between two members over the steps considered.
        max_rel_diff: the largest relative difference of their sharpness over those steps.
        steps: the steps considered.
    """

    members: tuple[str, ...]
    exact: bool
    min_cosine: float
    max_rel_diff: float
    steps: tuple[int, ...]

    @property
    def label(self) -> str:
        return group_label(self.members, self.exact)


def group_label(members: Sequence[str], exact: bool = True) -> str:
    """``"adam ≡ adam (trained)"`` (identical) or ``"smoothed_signsgd ≈ adam_valueclip"``."""
    return (" ≡ " if exact else " ≈ ").join(members)


def equivalent_groups(
    names: Sequence[str],
    cosines: Iterable[dict[str, Any]],
    sharpness: Iterable[dict[str, Any]] = (),
    *,
    steps: Iterable[int] | None = None,
    min_cosine: float = 0.998,
    exact_tol: float = 1e-6,
    rtol: float = 0.02,
) -> list[Group]:
    """Groups of ``names`` that are one direction, detected from the stored data.

    Two directions are equivalent when, at every step considered where both were measured, their
    cosine similarity is ≥ ``min_cosine`` (the cosine table) and their reported sharpness agrees to
    ``rtol`` relative (the sharpness table, where both are finite). A group is formed greedily in
    the order of ``names`` and every pair in it is equivalent (no chains). Only groups of two or
    more are returned.

    Args:
        names: candidate directions, in display order.
        cosines: rows ``{"step", "a", "b", "cosine"}``.
        sharpness: rows ``{"step", "direction", "sharpness"}``.
        steps: only these steps (default: every step with a cosine row).
        min_cosine: the cosine above which two directions count as one.
        exact_tol: ``1 − cos`` below which (at every step, with sharpness equal to 1e-4) the group
            is marked identical (``≡``) rather than approximately equal (``≈``).
        rtol: relative tolerance on the sharpness.
    """
    wanted = set(steps) if steps is not None else None
    pair_cos: dict[frozenset[str], dict[int, float]] = {}
    seen_steps: set[int] = set()
    name_set = set(names)
    for r in cosines:
        if wanted is not None and r["step"] not in wanted:
            continue
        if r["a"] in name_set and r["b"] in name_set and r["a"] != r["b"]:
            pair_cos.setdefault(frozenset((r["a"], r["b"])), {})[r["step"]] = float(r["cosine"])
            seen_steps.add(r["step"])
    if not pair_cos:
        return []
    sharp: dict[tuple[int, str], float] = {}
    measured: dict[str, set[int]] = {}
    for r in sharpness:
        if r["step"] in seen_steps and r["direction"] in name_set:
            measured.setdefault(r["direction"], set()).add(r["step"])
            v = r.get("sharpness")
            if v is not None and math.isfinite(v):
                sharp[(r["step"], r["direction"])] = float(v)

    def compare(a: str, b: str) -> tuple[bool, bool, float, float]:
        cos = pair_cos.get(frozenset((a, b)))
        if not cos:
            return False, False, math.nan, math.nan
        both = (measured.get(a, set()) & measured.get(b, set())) if measured else set(cos)
        if both - set(cos):  # measured together at a step without a cosine: no evidence there
            return False, False, math.nan, math.nan
        values = [cos[s] for s in cos if not measured or s in both]
        if not values or not all(math.isfinite(c) for c in values):
            return False, False, math.nan, math.nan
        lowest = min(values)
        rel = 0.0
        for s in cos:
            sa, sb = sharp.get((s, a)), sharp.get((s, b))
            if sa is not None and sb is not None:
                scale = max(abs(sa), abs(sb))
                rel = max(rel, abs(sa - sb) / scale if scale > 0 else 0.0)
        ok = lowest >= min_cosine and rel <= rtol
        return ok, ok and 1 - lowest <= exact_tol and rel <= 1e-4, lowest, rel

    groups: list[Group] = []
    used: set[str] = set()
    ordered = list(dict.fromkeys(names))
    for i, a in enumerate(ordered):
        if a in used:
            continue
        members, exact, low, rel = [a], True, 1.0, 0.0
        for b in ordered[i + 1:]:
            if b in used:
                continue
            checks = [compare(m, b) for m in members]
            if all(c[0] for c in checks):
                members.append(b)
                exact &= all(c[1] for c in checks)
                low = min([low] + [c[2] for c in checks])
                rel = max([rel] + [c[3] for c in checks])
        if len(members) > 1:
            used.update(members)
            groups.append(Group(tuple(members), exact, low, rel, tuple(sorted(seen_steps))))
    return groups
