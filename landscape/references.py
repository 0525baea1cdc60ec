"""The works ``landscape`` implements, in one table, and how every user-facing text cites them.

Figures, tables, ``landscape recipes`` and the run-store documentation cite a work by its authors,
short title and year (``Pan & Li 2023, App. B.3``), never by an internal file number. Add a work here
and cite it with :func:`cite`.

Example:
    >>> from landscape.references import cite, REFERENCES
    >>> cite("pan2023", "Table 1")
    'Pan & Li 2023, Table 1'
    >>> REFERENCES["cesista2025"].title
    'Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD'
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["Reference", "REFERENCES", "cite", "bibliography", "translate"]


@dataclass(frozen=True)
class Reference:
    """One cited work.

    Attributes:
        key: the key used in :func:`cite` (``"pan2023"``).
        authors: the authors as cited in text (``"Pan & Li"``, ``"Crawshaw et al."``).
        full_authors: every author, for a bibliography.
        title: the full title.
        short: a short title for captions.
        year: year of the version implemented.
        kind: ``"paper"`` or ``"blog"``.
        url: where to read it.
        what: what ``landscape`` takes from it.
    """

    key: str
    authors: str
    full_authors: str
    title: str
    short: str
    year: int
    kind: str
    url: str
    what: str

    def __str__(self) -> str:
        return f"{self.authors}, {self.title} ({self.year})"


#: Every work cited, by key.
REFERENCES: dict[str, Reference] = {
    r.key: r
    for r in (
        Reference(
            key="pan2023",
            authors="Pan & Li",
            full_authors="Yan Pan, Yuanzhi Li",
            title="Toward Understanding Why Adam Converges Faster Than SGD for Transformers",
            short="Why Adam converges faster than SGD for transformers",
            year=2023,
            kind="paper",
            url="https://arxiv.org/abs/2306.00204",
            what="directional sharpness of update directions, pseudo-updates on one trajectory, coordinate-wise "
                 "clipping, the δ-shifted sharpness, landscape lines, update histograms, ratio-to-SGD tables, "
                 "robust smoothness",
        ),
        Reference(
            key="crawshaw2022",
            authors="Crawshaw et al.",
            full_authors="Michael Crawshaw, Mingrui Liu, Francesco Orabona, Wei Zhang, Zhenxun Zhuang",
            title="Robustness to Unbounded Smoothness of Generalized SignSGD",
            short="Robustness to unbounded smoothness of generalized signSGD",
            year=2022,
            kind="paper",
            url="https://arxiv.org/abs/2208.11195",
            what="(L0, L1)-smoothness, the local smoothness estimator along the training step, coordinate-wise "
                 "smoothness, generalized signSGD",
        ),
        Reference(
            key="cesista2025",
            authors="Cesista",
            full_authors="Franz Louis Cesista",
            title="Adam with Aggressive Gradient Clipping ≈ Smoothed SignSGD/NormSGD",
            short="Adam with aggressive gradient clipping ≈ smoothed signSGD/normSGD",
            year=2025,
            kind="blog",
            url="",  # a blog post of 2025-07-03; cited by its title
            what="smoothed signSGD and normSGD, and the identity Adam(value-clipped g) → smoothed signSGD/(1−β₁ᵗ)",
        ),
    )
}

#: The project's source documents by number (shared/seeds/00N_*.txt), for :func:`translate`.
_SEEDS = {"000": "cesista2025", "001": "crawshaw2022", "002": "pan2023"}


def cite(key: str, where: str | None = None) -> str:
    """In-text citation ``"<authors> <year>[, <where>]"``; a blog note is cited by its title.

    Args:
        key: a key of :data:`REFERENCES`.
        where: the part cited (``"Table 1"``, ``"App. B.3"``, ``"§5.2"``).

    Raises:
        KeyError: an unknown key, naming the known ones.
    """
    try:
        ref = REFERENCES[key]
    except KeyError:
        raise KeyError(f"unknown reference {key!r}; known: {', '.join(REFERENCES)}") from None
    head = f"{ref.authors} {ref.year}" + (f", “{ref.title}”" if ref.kind == "blog" else "")
    return f"{head}, {where}" if where else head


_SEED_RE = re.compile(r"\bseed (000|001|002)\b")


def translate(text: str) -> str:
    """Replace internal citations (``"seed 002 Alg. 3"``, ``"seed 000"``) by :func:`cite` form.

    Used where text written against the project's numbered source documents reaches a user
    (``landscape recipes``, the run-store documentation).

    Example:
        >>> translate("seed 002 Alg. 3, App. B.2")
        'Pan & Li 2023, Alg. 3, App. B.2'
    """
    def sub(m: re.Match[str]) -> str:
        rest = text[m.end():]
        more = rest[:1] == " " and rest[1:2] not in ("", ",", ";", ")", ".")  # "seed 002 Alg. 3": a comma
        return cite(_SEEDS[m.group(1)]) + ("," if more else "")

    return _SEED_RE.sub(sub, text)


def bibliography() -> str:
    """Every work as one line each: authors (year). Title. URL."""
    return "\n".join(f"{r.full_authors} ({r.year}). {r.title}." + (f" {r.url}" if r.url else f" ({r.kind})")
                     for r in REFERENCES.values())
