"""Callbacks that attach the probe to existing trainers (optional extras).

* :mod:`landscape.integrations.lightning`: ``LandscapeCallback`` for PyTorch Lightning
  (``pip install 'landscape[lightning]'``).
* :mod:`landscape.integrations.transformers`: ``LandscapeCallback`` for the Hugging Face ``Trainer``
  (``pip install 'landscape[hf]'``).

Import the submodule you need; importing :mod:`landscape` (or this package) never imports Lightning
or transformers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

__all__: list[str] = []


def copy_batch(batch: Any, device: Any = None) -> Any:
    """A detached copy of every tensor in ``batch`` (dicts, lists, tuples, named tuples kept),
    optionally moved to ``device``: a probe batch the training loop cannot change afterwards."""
    if isinstance(batch, Tensor):
        out = batch.detach().clone()
        return out.to(device) if device is not None else out
    if isinstance(batch, Mapping) or (hasattr(batch, "items") and hasattr(batch, "keys")):  # dict, BatchEncoding
        return {k: copy_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(copy_batch(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(copy_batch(v, device) for v in batch)
    return batch
