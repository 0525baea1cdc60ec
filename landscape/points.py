"""Parameter points kept in a run folder: the probe's ``save_points=``, read by ``landscape plane``.

A saved point is the model's full state at the measured point ``x_t`` of a step (the parameters
before the step, the buffers as the measurement used them) and, optionally, the update directions
the probe measured there (every recipe's pseudo-update and the trained optimizer's own step
``x_t − x_{t+1}``). One file per step, ``RUN/points/step_00000100.pt``, written crash-safely: to a
temporary file in the same folder, flushed to disk, then renamed over the final name, so a reader
(or a resumed run) sees either the whole file or none of it.

The file is a plain ``torch.save`` dict of tensors, ``{"step", "state_dict", "directions",
"meta"}``, readable with ``torch.load(..., weights_only=True)``; because it holds a ``state_dict``
entry and a ``step``, ``landscape analyze`` and ``landscape plane --spec ... RUN/points/`` read the
folder as checkpoints too.

Example:
    >>> from landscape.points import load_point, saved_steps
    >>> saved_steps("runs/adam")                                   # doctest: +SKIP
    [1, 100, 200]
    >>> point = load_point("runs/adam", 100)                       # doctest: +SKIP
    >>> sorted(point.directions)[:2], point.state_dict["fc.weight"].shape   # doctest: +SKIP
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["POINTS_DIR", "SavedPoint", "load_point", "point_path", "save_point", "saved_steps", "state_at"]

#: Sub-folder of a run folder that holds the saved points.
POINTS_DIR = "points"
_NAME = re.compile(r"^step_(\d+)\.pt$")


@dataclass
class SavedPoint:
    """One saved point.

    Attributes:
        step: the step (the probe's step counter: the point is ``x_t`` before step ``t``).
        state_dict: the model's state at the point (parameters and buffers, CPU tensors).
        directions: ``{name: {parameter: tensor}}``, the update directions ``u`` measured there
            (``x_t − η·u`` is a step along ``u``); empty when they were not saved.
        meta: what else was saved (e.g. ``trained_direction``).
        path: the file.
    """

    step: int
    state_dict: dict[str, Tensor]
    directions: dict[str, dict[str, Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def point_path(run: str | Path, step: int) -> Path:
    """The file of the point saved at ``step`` in run folder ``run``."""
    return Path(run) / POINTS_DIR / f"step_{int(step):08d}.pt"


def state_at(model: nn.Module, params: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``model.state_dict()`` with the parameters in ``params`` replaced (detached copies), tied
    entries included: a key whose tensor *is* a replaced parameter (``head.weight`` tied to
    ``tok.weight``) gets the same value, so loading the result never mixes two points."""
    by_ptr = {(p.data_ptr(), tuple(p.shape)): n for n, p in model.named_parameters()}
    out: dict[str, Tensor] = {}
    for key, value in model.state_dict().items():
        name = by_ptr.get((value.data_ptr(), tuple(value.shape))) if value.numel() else None
        source = params[name] if name is not None and name in params else value
        out[key] = source.detach().to("cpu", copy=True)
    return out


def save_point(
    run: str | Path,
    step: int,
    state_dict: Mapping[str, Tensor],
    directions: Mapping[str, Mapping[str, Tensor]] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write one point crash-safely (temporary file, ``fsync``, atomic rename) and return its path.

    Args:
        run: the run folder (``points/`` is created in it).
        step: the step the point belongs to.
        state_dict: the model's state at the point (see :func:`state_at`).
        directions: update directions measured there, ``{name: {parameter: tensor}}``.
        meta: JSON-like extra information (strings, numbers, lists).
    """
    path = point_path(run, step)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "step": int(step),
        "state_dict": {k: v.detach().to("cpu") for k, v in state_dict.items()},
        "directions": {str(n): {k: v.detach().to("cpu") for k, v in d.items()} for n, d in (directions or {}).items()},
        "meta": dict(meta or {}),
    }
    atomic_save(payload, path)
    return path


def part_path(run: str | Path, step: int, rank: int) -> Path:
    """The file holding rank ``rank``'s directions of the point of ``step`` (torch.distributed: each rank
    saves the directions of the recipes it holds; rank 0's :func:`point_path` file names the parts)."""
    return Path(run) / POINTS_DIR / f"step_{int(step):08d}.rank{int(rank)}.pt"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` crash-safely: a temporary file beside it, flushed to disk, renamed
    over ``path``, and the rename made durable (POSIX; harmless where directories cannot be opened)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_point_part(run: str | Path, step: int, rank: int, directions: Mapping[str, Mapping[str, Tensor]]) -> Path:
    """Write rank ``rank``'s directions of the point of ``step`` (crash-safely, like :func:`save_point`)."""
    path = part_path(run, step, rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"step": int(step), "rank": int(rank),
               "directions": {str(n): {k: v.detach().to("cpu") for k, v in d.items()} for n, d in directions.items()}}
    atomic_save(payload, path)
    return path


def saved_steps(run: str | Path) -> list[int]:
    """Sorted steps that have a saved point in run folder ``run`` (none: ``[]``)."""
    folder = Path(run) / POINTS_DIR
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def load_point(run: str | Path, step: int) -> SavedPoint:
    """Read the point saved at ``step`` (``weights_only=True``: tensors and plain containers only).

    Raises:
        FileNotFoundError: no point was saved at that step (the message lists the saved steps).
    """
    path = point_path(run, step)
    if not path.is_file():
        steps = saved_steps(run)
        shown = ", ".join(map(str, steps[:20])) + (", ..." if len(steps) > 20 else "")
        hint = (f"saved steps: {shown}" if steps else
                "this run saved no points (create the probe with save_points=[...] to keep some)")
        raise FileNotFoundError(f"step {step} has no saved point in {Path(run) / POINTS_DIR}; {hint}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    directions = {n: dict(d) for n, d in obj.get("directions", {}).items()}
    meta = dict(obj.get("meta", {}))
    for rank in meta.get("part_ranks", []):  # saved under torch.distributed: the other ranks' directions
        part = part_path(run, step, rank)
        if not part.is_file():
            raise FileNotFoundError(
                f"the point of step {step} in {Path(run) / POINTS_DIR} is incomplete: rank {rank}'s directions "
                f"({part.name}) are missing (still being written, or that rank stopped before writing them)")
        got = torch.load(part, map_location="cpu", weights_only=True)
        directions.update({n: dict(d) for n, d in got["directions"].items()})
    order = meta.get("direction_order")
    if order:
        directions = {n: directions[n] for n in order if n in directions} | {
            n: d for n, d in directions.items() if n not in order}
    return SavedPoint(step=int(obj["step"]), state_dict=dict(obj["state_dict"]), directions=directions, meta=meta,
                      path=path)
