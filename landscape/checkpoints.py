"""Reading saved checkpoints safely: the formats ``landscape analyze`` accepts.

Formats (chosen by the file name; a folder holding ``config.json`` and weights is a Hugging Face
``save_pretrained`` folder):

============== ============================================ =======================================
format         files                                        where the weights are
============== ============================================ =======================================
``pytorch``    ``.pt``, ``.pth``, ``.bin``                  a ``state_dict``, or a dict holding one
                                                            under ``model`` / ``state_dict`` /
                                                            ``model_state_dict`` / ``module``
``lightning``  ``.ckpt``                                    ``checkpoint["state_dict"]``
``safetensors`` ``.safetensors``                            the file itself
``hf``         folder with ``config.json`` +                ``model.safetensors`` (or its shards),
               ``model.safetensors`` or ``pytorch_model.bin`` else ``pytorch_model.bin`` (or shards)
============== ============================================ =======================================

Safety: pickle-based files are read with ``torch.load(..., weights_only=True)`` unless the caller
passes ``trust=True``. That unpickler only rebuilds tensors and plain containers; a pickle that
would import anything else (``os.system``, a user class...) is refused *before* anything runs, and
:class:`UnsafeCheckpointError` names what it would have imported (found by reading the pickle's
opcodes with :mod:`pickletools`, which executes nothing). Safetensors files hold no code at all.

The step of a checkpoint comes from its metadata when it has one (``global_step`` of a Lightning
checkpoint, a ``step`` / ``global_step`` entry of a ``.pt`` dict or of the safetensors header,
``global_step`` in a Hugging Face ``trainer_state.json``), else from its name (``step=100``,
``step_100``, ``checkpoint-100``, or the last number in the name).

Every problem with a checkpoint raises :class:`CheckpointError`, a one-line message that names the
file and what is wrong with it (missing, corrupt or truncated, unsafe, missing / unexpected /
mis-shaped keys, non-finite weights).

Hostile or damaged files are refused, never followed: only regular files are read (a symlink to
``/dev/zero`` or a FIFO named ``.pt`` is refused before it is opened, a symlink loop is named), JSON
side files (``config.json``, shard indexes, ``trainer_state.json``) are read up to
:data:`MAX_JSON_BYTES`, the pickle stream of a ``torch.save`` file up to :data:`MAX_PICKLE_BYTES`,
every member of a ``torch.save`` zip is checked against its CRC before its weights are used, a shard
index may only name files inside its own folder, a step must be an integer in ``[0, 2⁶³)``, and the
weights must be dense CPU tensors whose dtypes match the model's (an int64 tensor for a float
parameter is refused, not cast). Paths that are not valid UTF-8 are read through Python file objects.
"""

from __future__ import annotations

import errno
import glob
import io
import json
import math
import os
import pickletools
import re
import stat
import warnings
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "MAX_JSON_BYTES",
    "MAX_PICKLE_BYTES",
    "MAX_STEP",
    "ORDERS",
    "Checkpoint",
    "CheckpointError",
    "LoadedCheckpoint",
    "UnsafeCheckpointError",
    "checkpoint_format",
    "describe_checkpoint",
    "find_checkpoints",
    "fit_state_dict",
    "load_checkpoint",
    "order_checkpoints",
    "step_from_name",
]

#: File suffixes read as checkpoints, with their format.
CHECKPOINT_SUFFIXES: dict[str, str] = {
    ".pt": "pytorch",
    ".pth": "pytorch",
    ".bin": "pytorch",
    ".ckpt": "lightning",
    ".safetensors": "safetensors",
}
#: How checkpoints can be ordered: by the step in their metadata or name, by natural name order,
#: by modification time.
ORDERS = ("step", "name", "mtime")

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module")
_STEP_KEYS = ("global_step", "step", "iteration", "iter", "num_updates")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.")
#: The largest JSON side file read (config.json, a shard index, trainer_state.json).
MAX_JSON_BYTES = 64 * 2**20
#: The largest pickle stream read from a checkpoint (tensors are stored beside it in a torch.save zip).
MAX_PICKLE_BYTES = 1 * 2**30
#: Steps are stored as SQLite integers: [0, 2**63).
MAX_STEP = 2**63 - 1
#: Modules whose globals the weights-only unpickler may legitimately meet (torch's own types).
_SAFE_MODULES = ("torch", "collections", "builtins", "_codecs", "numpy")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, unreadable, unsafe, or does not fit the model."""


class UnsafeCheckpointError(CheckpointError):
    """Unpickling the file would import (and so could run) arbitrary code; it was not loaded."""


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint found on disk (nothing loaded yet but its metadata).

    Attributes:
        path: the file (or Hugging Face folder).
        format: ``pytorch``, ``lightning``, ``safetensors`` or ``hf``.
        step: the step from the metadata, else from the name, else ``None``.
        step_source: ``"metadata"``, ``"name"`` or ``None``.
        mtime: modification time (of the weights file for a folder).
    """

    path: Path
    format: str
    step: int | None
    step_source: str | None
    mtime: float


@dataclass
class LoadedCheckpoint:
    """A checkpoint's weights and what its metadata says.

    Attributes:
        state_dict: ``{key: tensor}`` on the CPU, as stored (not yet matched to a model).
        step: the step in the metadata (``None`` if it has none).
        lr: the learning rate of the first parameter group, when the file holds optimizer state.
        format: the format read.
        hyperparameters: the first parameter group's hyperparameters, when the file holds
            optimizer state.
    """

    state_dict: dict[str, Tensor]
    step: int | None = None
    lr: float | None = None
    format: str = ""
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# finding and ordering


_KINDS = ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"))


def _stat(path: Path) -> os.stat_result | None:
    """``os.stat`` (symlinks followed), ``None`` when nothing is there; a symlink loop is an error."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path} is a symbolic link loop (it never reaches a file)") from None
        if e.errno == errno.ENOTDIR:
            return None
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None


def _regular_file(path: Path) -> Path:
    """``path`` when it is a regular file (after symlinks); else a :class:`CheckpointError` saying what
    it is, before anything is opened (a FIFO would block, /dev/zero never ends)."""
    st = _stat(path)
    if st is None:
        raise CheckpointError(f"checkpoint not found: {path}")
    if not stat.S_ISREG(st.st_mode):
        kind = next((k for test, k in _KINDS if test(st.st_mode)), "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a regular file: checkpoints are read from regular files only")
    return path


def _is_file(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _is_dir(path: Path) -> bool:
    st = _stat(path)
    return st is not None and stat.S_ISDIR(st.st_mode)


def _read_json(path: Path, what: str) -> Any:
    """A JSON side file, size-bounded; :class:`CheckpointError` when it is not valid JSON."""
    _regular_file(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: {what} is {size:,} bytes, more than the {MAX_JSON_BYTES:,} a {what} may have")
    try:
        with open(path, "rb") as f:
            return json.loads(f.read(MAX_JSON_BYTES + 1).decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a valid {what} ({_short(e)})") from None


def _utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _is_hf_folder(path: Path) -> bool:
    return _is_dir(path) and _is_file(path / "config.json") and any(_is_file(path / w) for w in _HF_WEIGHTS)


def _checked_step(step: int | None, path: Path) -> int | None:
    if step is not None and not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"{path}: its step {step} is out of range (a step is an integer in [0, 2^63))")
    return step


def checkpoint_format(path: str | Path) -> str:
    """The format of ``path`` (see the module docstring).

    Raises:
        CheckpointError: not a file or folder of a known format.
    """
    path = Path(path)
    if _is_hf_folder(path):
        config = _read_json(path / "config.json", "config.json")
        if not isinstance(config, dict):
            raise CheckpointError(f"{path / 'config.json'}: not a model configuration (a JSON object expected)")
        return "hf"
    if _is_dir(path):
        raise CheckpointError(
            f"{path} is a folder but not a Hugging Face save_pretrained folder (config.json and "
            "model.safetensors or pytorch_model.bin)"
        )
    fmt = CHECKPOINT_SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise CheckpointError(
            f"{path}: unknown checkpoint format {path.suffix or '(no suffix)'!r}; expected "
            f"{', '.join(CHECKPOINT_SUFFIXES)} or a save_pretrained folder"
        )
    _regular_file(path)
    return fmt


def find_checkpoints(inputs: Sequence[str | Path]) -> list[Path]:
    """Expand checkpoint arguments: files, folders and glob patterns.

    A Hugging Face ``save_pretrained`` folder is one checkpoint. Any other folder contributes its
    files with a checkpoint suffix and its ``save_pretrained`` sub-folders (e.g. a Trainer's
    ``checkpoint-500/``), not deeper. A pattern (``runs/ckpt_*.pt``) is expanded when no file has
    that exact name. Duplicates are dropped.

    Raises:
        CheckpointError: a path that does not exist, a pattern or folder with no checkpoint.
    """
    if not inputs:
        raise CheckpointError("no checkpoints given: pass files, folders or glob patterns")
    found: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if not str(raw).strip():
            raise CheckpointError("an empty checkpoint argument: pass files, folders or glob patterns")
        if os.path.lexists(path):
            candidates = [path]
        elif glob.has_magic(str(raw)):
            candidates = [Path(p) for p in sorted(glob.glob(str(raw)))]
            candidates = [p for p in candidates if _is_hf_folder(p) or p.suffix.lower() in CHECKPOINT_SUFFIXES]
            if not candidates:
                raise CheckpointError(f"no checkpoint matches {str(raw)!r}")
        else:
            raise CheckpointError(f"checkpoint not found: {path}")
        for p in candidates:
            if _is_dir(p) and not _is_hf_folder(p):
                inside = sorted(
                    c
                    for c in p.iterdir()
                    if (c.suffix.lower() in CHECKPOINT_SUFFIXES and os.path.lexists(c) and not _is_dir(c))
                    or _is_hf_folder(c)
                )
                if not inside:
                    raise CheckpointError(
                        f"no checkpoints in folder {p} (looked for {', '.join('*' + s for s in CHECKPOINT_SUFFIXES)} "
                        "and save_pretrained sub-folders)"
                    )
                found.extend(inside)
            else:
                checkpoint_format(p)  # refuse unknown formats now
                found.append(p)
    seen: set[Path] = set()
    out = []
    for p in found:
        _stat(p)  # a symlink loop is named here
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


_NAME_STEP = (
    re.compile(r"(?:^|[^a-z])(?:global_)?step[=_\-]?(\d+)", re.IGNORECASE),
    re.compile(r"checkpoint[=_\-](\d+)", re.IGNORECASE),
    re.compile(r"(?:^|[^a-z])iter(?:ation)?[=_\-]?(\d+)", re.IGNORECASE),
)


def step_from_name(path: str | Path) -> int | None:
    """The step a file name states: ``step=100``, ``step_100``, ``global_step100``,
    ``checkpoint-100``, ``iter_100``, else the last number in the name (``None`` if there is none).

    Example:
        >>> step_from_name("epoch=1-step=250.ckpt"), step_from_name("ckpt_0040.pt"), step_from_name("last.pt")
        (250, 40, None)
    """
    name = Path(path).name
    for suffix in (*CHECKPOINT_SUFFIXES, ".index.json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    for pattern in _NAME_STEP:
        m = pattern.search(name)
        if m:
            return int(m.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def _natural_key(path: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", str(path))]


def describe_checkpoint(path: str | Path, *, trust: bool = False) -> Checkpoint:
    """Format, step and modification time of one checkpoint, reading only its metadata where the
    format allows (safetensors header, memory-mapped ``torch.load``). This already refuses unsafe,
    corrupt and truncated files."""
    path = Path(path)
    fmt = checkpoint_format(path)
    step = _checked_step(_metadata_step(path, fmt, trust), path)
    source = "metadata" if step is not None else None
    if step is None:
        step = _checked_step(step_from_name(path), path)
        source = "name" if step is not None else None
    weights = _hf_weights(path)[0] if fmt == "hf" else path
    return Checkpoint(path=path, format=fmt, step=step, step_source=source, mtime=weights.stat().st_mtime)


def order_checkpoints(checkpoints: Iterable[Checkpoint], order: str = "step") -> list[tuple[int, Checkpoint]]:
    """Put checkpoints in training order and number them.

    Args:
        checkpoints: from :func:`describe_checkpoint`.
        order: ``"step"`` (by the step in the metadata or name; every checkpoint needs one),
            ``"name"`` (natural order: ``ckpt_2`` before ``ckpt_10``) or ``"mtime"`` (oldest first).

    Returns:
        ``[(step, checkpoint)]`` in order. With ``name`` / ``mtime`` the checkpoints keep their own
        steps when every one has a step and they increase along the order; otherwise they are
        numbered by position 0, 1, 2...

    Raises:
        CheckpointError: an unknown order, a checkpoint without a step under ``step``, or two
            checkpoints with the same step.
    """
    cks = list(checkpoints)
    if order not in ORDERS:
        raise CheckpointError(f"unknown order {order!r}; choose one of {', '.join(ORDERS)}")
    if order == "step":
        unknown = [c for c in cks if c.step is None]
        if unknown:
            raise CheckpointError(
                f"cannot tell the step of {unknown[0].path} (no step in its metadata or name); "
                "use --order name or --order mtime"
            )
        by_step: dict[int, Checkpoint] = {}
        for c in cks:
            if c.step in by_step:
                raise CheckpointError(
                    f"two checkpoints have step {c.step}: {by_step[c.step].path} and {c.path}; pass only one of them"
                )
            by_step[c.step] = c
        return sorted(by_step.items())
    if order == "name":
        cks.sort(key=lambda c: _natural_key(c.path))
    else:
        cks.sort(key=lambda c: (c.mtime, _natural_key(c.path)))
    steps = [c.step for c in cks]
    if all(s is not None for s in steps) and all(a < b for a, b in zip(steps, steps[1:])):
        return [(int(c.step), c) for c in cks]  # type: ignore[arg-type]
    return list(enumerate(cks))


# --------------------------------------------------------------------------------------------------
# loading


def _hf_weights(folder: Path) -> list[Path]:
    for name in _HF_WEIGHTS:
        f = folder / name
        if not _is_file(f):
            continue
        if name.endswith(".index.json"):
            index = _read_json(f, "shard index")
            try:
                shards = sorted(set(index["weight_map"].values()))
                if not all(isinstance(s, str) and s for s in shards):
                    raise TypeError("shard names must be non-empty strings")
            except (KeyError, TypeError, AttributeError) as e:
                raise CheckpointError(f"{f}: not a valid shard index ({type(e).__name__}: {e})") from None
            root = folder.resolve()
            for shard in shards:
                target = (folder / shard).resolve()
                if not target.is_relative_to(root) or target == root:
                    raise CheckpointError(
                        f"{f} names the shard {shard!r}, which lies outside the checkpoint folder {folder}: refused "
                        "(an index may only name files inside its own folder)"
                    )
            missing = [s for s in shards if not _is_file(folder / s)]
            if missing:
                raise CheckpointError(f"{folder}: shard {missing[0]} listed in {name} is missing")
            return [_regular_file(folder / s) for s in shards]
        return [_regular_file(f)]
    raise CheckpointError(f"{folder}: no model.safetensors or pytorch_model.bin in this folder")


def _safetensors_error(path: Path, e: BaseException) -> CheckpointError:
    return CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file ({_short(e)})")


def _short(e: BaseException) -> str:
    text = " ".join(str(e).split())
    text = text if len(text) <= 160 else text[:157] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_safetensors(path: Path, *, tensors: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - an optional dependency
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: pip install safetensors") from None
    _regular_file(path)
    try:
        if not _utf8(path):  # the Rust reader takes UTF-8 names only: read the bytes here
            return _read_safetensors_bytes(path, tensors=tensors)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = dict(f.metadata() or {})
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error type (and OSError) for bad files
        raise _safetensors_error(path, e) from None
    return out, meta


def _read_safetensors_bytes(path: Path, *, tensors: bool) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors.torch import load as load_bytes

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"cannot read {path}: corrupt or truncated safetensors file (no header)")
        n = int.from_bytes(head, "little")
        if n > MAX_JSON_BYTES:
            raise CheckpointError(f"cannot read {path}: corrupt safetensors file (a {n:,}-byte header)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except ValueError as e:
            raise _safetensors_error(path, e) from None
        meta = dict(header.get("__metadata__") or {}) if isinstance(header, dict) else {}
        if not tensors:
            return {}, meta
        f.seek(0)
        return dict(load_bytes(f.read())), meta


def _pickle_bytes(path: Path) -> bytes | None:
    """The pickle stream of a ``torch.save`` file (``*/data.pkl`` inside its zip) or of a plain pickle."""
    try:
        with open(path, "rb") as f:
            if zipfile.is_zipfile(f):
                with zipfile.ZipFile(f) as z:
                    names = [n for n in z.namelist() if n.endswith("data.pkl")]
                    if not names or z.getinfo(names[0]).file_size > MAX_PICKLE_BYTES:
                        return None
                    return z.read(names[0])
            f.seek(0)
            data = f.read(MAX_PICKLE_BYTES + 1)
            return data if len(data) <= MAX_PICKLE_BYTES else None
    except (OSError, zipfile.BadZipFile, KeyError, EOFError, ValueError):
        return None


def _pickle_globals(data: bytes) -> list[str] | None:
    """Every ``module.name`` the pickle would import, read from its opcodes without executing any
    (``None`` when the stream is not a valid pickle)."""
    found: list[str] = []
    strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str) and "UNICODE" in op.name:
                strings.append(arg)
    except Exception:
        return None
    return found


def _unsafe(found: Iterable[str]) -> list[str]:
    out = []
    for g in found:
        if g.split(".")[0] not in _SAFE_MODULES and g not in out:
            out.append(g)
    return out


def _verify_zip(path: Path) -> None:
    """Check every member of a ``torch.save`` zip against its CRC (torch's reader does not), and
    bound its pickle stream."""
    try:
        with open(path, "rb") as f:
            if not zipfile.is_zipfile(f):
                return
            with zipfile.ZipFile(f) as z:
                for info in z.infolist():
                    if info.filename.endswith("data.pkl") and info.file_size > MAX_PICKLE_BYTES:
                        raise CheckpointError(
                            f"cannot read {path}: its pickle stream is {info.file_size:,} bytes, more than the "
                            f"{MAX_PICKLE_BYTES:,} a checkpoint's may have"
                        )
                bad = z.testzip()
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: corrupt or truncated file ({_short(e)})") from None
    if bad is not None:
        raise CheckpointError(
            f"cannot read {path}: its member {bad!r} fails its CRC check (the file is corrupt; its weights were not used)"
        )


def _torch_load(path: Path, trust: bool, *, verify: bool = False) -> Any:
    _regular_file(path)
    if verify:
        _verify_zip(path)
    kwargs: dict[str, Any] = {"map_location": "cpu", "weights_only": not trust}
    try:
        with warnings.catch_warnings():  # torch's own warnings (pickle protocol...) would precede our one line
            warnings.simplefilter("ignore")
            if not _utf8(path):  # torch opens names as UTF-8 only: hand it the open file
                with open(path, "rb") as f:
                    return torch.load(f, **kwargs)
            try:
                return torch.load(path, mmap=True, **kwargs)
            except RuntimeError as e:
                if "mmap" not in str(e):  # the legacy (non-zip) format cannot be memory-mapped
                    raise
                return torch.load(path, **kwargs)
    except Exception as e:
        if isinstance(e, CheckpointError):
            raise
        message = str(e)
        if not trust and "Weights only load failed" in message:
            named = re.findall(r"GLOBAL ([\w.]+)", message)
            data = _pickle_bytes(path)
            found = _pickle_globals(data) if data is not None else None
            unsafe = _unsafe(named + (found or []))
            if unsafe:
                shown = ", ".join(unsafe[:3]) + (f" (+{len(unsafe) - 3} more)" if len(unsafe) > 3 else "")
                raise UnsafeCheckpointError(
                    f"refused to load {path}: unpickling it would import {shown}, which could run arbitrary "
                    "code (nothing was run). Re-run with --trust-checkpoints (trust=True) only if you trust "
                    "where the file came from"
                ) from None
            if found is None:
                raise CheckpointError(f"cannot read {path}: corrupt or truncated file (not a readable torch.save or pickle)") from None
            reason = next((ln.strip() for ln in message.splitlines() if "WeightsUnpickler error" in ln or "Unsupported" in ln), "")
            raise CheckpointError(
                f"cannot read {path} with weights_only=True ({reason or 'unsupported content'}); re-run with "
                "--trust-checkpoints only if you trust where the file came from"
            ) from None
        raise CheckpointError(f"cannot read {path}: corrupt or truncated file ({_short(e)})") from None


def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, Tensor) and value.numel() == 1 and not value.is_floating_point():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


def _dict_step(obj: Any) -> int | None:
    if isinstance(obj, Mapping):
        for key in _STEP_KEYS:
            if key in obj and not isinstance(obj[key], (Mapping, list)):
                step = _as_int(obj[key])
                if step is not None:
                    return step
    return None


def _dict_hyperparameters(obj: Any) -> dict[str, Any]:
    """The first parameter group's hyperparameters (JSON-friendly values only) of the optimizer state
    a training checkpoint may hold (Lightning's ``optimizer_states``, or ``optimizer`` /
    ``optimizer_state_dict``)."""
    if not isinstance(obj, Mapping):
        return {}
    candidates = []
    if isinstance(obj.get("optimizer_states"), list) and obj["optimizer_states"]:
        candidates.append(obj["optimizer_states"][0])
    for key in ("optimizer", "optimizer_state_dict", "optim"):
        candidates.append(obj.get(key))
    for c in candidates:
        try:
            group = c["param_groups"][0]
        except (TypeError, KeyError, IndexError):
            continue
        if not isinstance(group, Mapping):
            continue
        out: dict[str, Any] = {}
        for k, v in group.items():
            if k == "params":
                continue
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if isinstance(v, (bool, int, float, str)) or v is None:
                out[str(k)] = v
            elif isinstance(v, (tuple, list)) and all(isinstance(x, (int, float)) for x in v):
                out[str(k)] = list(v)
        return out
    return {}


def _lr(hyper: Mapping[str, Any]) -> float | None:
    lr = hyper.get("lr")
    if isinstance(lr, (int, float)) and not isinstance(lr, bool) and math.isfinite(lr):
        return float(lr)
    return None


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _extract_state_dict(obj: Any, path: Path) -> dict[str, Tensor]:
    if isinstance(obj, nn.Module):  # torch.save(model), trusted
        return dict(obj.state_dict())
    if _is_tensor_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _STATE_KEYS:
            value = obj.get(key)
            if isinstance(value, nn.Module):
                return dict(value.state_dict())
            if _is_tensor_dict(value):
                return dict(value)
        keys = [str(k) for k in list(obj)[:8]]
        raise CheckpointError(
            f"{path} holds a dict with keys {keys} but no state_dict: expected a state_dict, or a dict "
            f"holding one under {' / '.join(repr(k) for k in _STATE_KEYS)}"
        )
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")


def _metadata_step(path: Path, fmt: str, trust: bool) -> int | None:
    if fmt == "safetensors":
        _, meta = _read_safetensors(path, tensors=False)
        return next((s for k in _STEP_KEYS if (s := _as_int(meta.get(k))) is not None), None)
    if fmt == "hf":
        weights = _hf_weights(path)
        for w in weights:  # validate the weights files without reading the tensors
            if w.suffix == ".safetensors":
                _read_safetensors(w, tensors=False)
            else:
                _torch_load(w, trust)
        return _trainer_state_step(path)
    return _dict_step(_torch_load(path, trust))


def load_checkpoint(path: str | Path, *, trust: bool = False) -> LoadedCheckpoint:
    """Read the weights of one checkpoint (CPU tensors), with its step and learning rate if stored.

    Args:
        path: a file or a ``save_pretrained`` folder.
        trust: allow full pickles (``torch.load(weights_only=False)``): only for files you trust.

    Raises:
        UnsafeCheckpointError: a pickle that would import code (only when ``trust`` is false).
        CheckpointError: missing, corrupt or truncated files, no state_dict inside.
    """
    path = Path(path)
    if _stat(path) is None:
        raise CheckpointError(f"checkpoint not found: {path}")
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        sd, meta = _read_safetensors(path, tensors=True)
        step = next((s for k in _STEP_KEYS if (s := _as_int(meta.get(k))) is not None), None)
        return LoadedCheckpoint(sd, step=_checked_step(step, path), format=fmt, extra={"metadata": meta})
    if fmt == "hf":
        sd = {}
        for w in _hf_weights(path):
            if w.suffix == ".safetensors":
                part, _ = _read_safetensors(w, tensors=True)
            else:
                part = _extract_state_dict(_torch_load(w, trust, verify=True), w)
            sd.update(part)
        return LoadedCheckpoint(sd, step=_checked_step(_trainer_state_step(path), path), format=fmt)
    obj = _torch_load(path, trust, verify=True)
    hyper = _dict_hyperparameters(obj)
    return LoadedCheckpoint(_extract_state_dict(obj, path), step=_checked_step(_dict_step(obj), path), lr=_lr(hyper),
                            format=fmt, hyperparameters=hyper)


def _trainer_state_step(folder: Path) -> int | None:
    state = folder / "trainer_state.json"
    if not _is_file(state):
        return None
    try:
        data = _read_json(state, "trainer_state.json")
    except CheckpointError:
        return None
    return _as_int(data.get("global_step")) if isinstance(data, dict) else None


# --------------------------------------------------------------------------------------------------
# matching a state_dict to a model


def _shown(names: Sequence[str], limit: int = 5) -> str:
    text = ", ".join(repr(n) for n in names[:limit])
    return f"[{text}{f', ... +{len(names) - limit} more' if len(names) > limit else ''}]"


def _prefix_fix(keys: set[str], expected: set[str]) -> tuple[str, str] | None:
    """``(strip, add)``: the one key prefix to remove from (or add to) the checkpoint's keys that
    matches the most model keys, when it matches more than the keys as stored."""
    best: tuple[int, tuple[str, str] | None] = (len(keys & expected), None)
    candidates: set[tuple[str, str]] = set()
    for k in keys:
        parts = k.split(".")
        for i in range(1, min(len(parts), 4)):
            candidates.add((".".join(parts[:i]) + ".", ""))
    for e in expected:
        parts = e.split(".")
        for i in range(1, min(len(parts), 4)):
            candidates.add(("", ".".join(parts[:i]) + "."))
    for strip, add in sorted(candidates):
        renamed = {add + k[len(strip):] for k in keys if k.startswith(strip)}
        score = len(renamed & expected)
        if score > best[0]:
            best = (score, (strip, add))
    return best[1]


def fit_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], source: str | Path = "checkpoint") -> dict[str, Tensor]:
    """Match a stored state_dict to ``model`` and check it, without touching the model.

    Keys are taken as stored, or with one common prefix removed or added when that matches more of
    the model's keys (a LightningModule's ``model.``, DDP's ``module.``, ``torch.compile``'s
    ``_orig_mod.``). A key the model ties to another (``lm_head.weight`` tied to the token
    embedding, left out by ``save_pretrained``) may be absent when its twin is present.

    Returns:
        ``{key: tensor}`` with exactly the keys of ``model.state_dict()``.

    Raises:
        CheckpointError: missing, unexpected or mis-shaped keys (each named), or non-finite weights.
    """
    expected = model.state_dict(keep_vars=True)
    sd = dict(state_dict)
    fix = _prefix_fix(set(sd), set(expected))
    note = ""
    if fix is not None:
        strip, add = fix
        sd = {add + k[len(strip):]: v for k, v in sd.items() if k.startswith(strip)} | {
            k: v for k, v in sd.items() if not k.startswith(strip)
        }
        note = f" (after {'removing' if strip else 'adding'} the key prefix {strip or add!r})"
    # tied tensors: keys of the model that share one storage
    groups: dict[tuple[int, tuple[int, ...]], list[str]] = {}
    for k, t in expected.items():
        if t.numel():
            groups.setdefault((t.data_ptr(), tuple(t.shape)), []).append(k)
    twin = {k: [o for o in g if o != k] for g in groups.values() for k in g if len(g) > 1}
    unexpected = [k for k in sd if k not in expected]
    missing = [k for k in expected if k not in sd and not any(o in sd for o in twin.get(k, ()))]
    problems = []
    if missing:
        problems.append(f"missing keys {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_shown(unexpected)}")
    shapes = [
        f"{k!r} is {tuple(v.shape)} in the checkpoint but {tuple(expected[k].shape)} in the model"
        for k, v in sd.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    if shapes:
        problems.append("mis-shaped " + "; ".join(shapes[:3]) + (f" (+{len(shapes) - 3} more)" if len(shapes) > 3 else ""))
    if problems:
        raise CheckpointError(f"{source} does not fit the model{note}: " + "; ".join(problems))
    out = {}
    for k in expected:
        v = sd[k] if k in sd else sd[next(o for o in twin[k] if o in sd)]
        out[k] = v
    odd = [f"{k!r} is a {v.layout} tensor" for k, v in out.items() if v.layout != torch.strided]
    odd += [f"{k!r} is on the {v.device.type} device (no data)" for k, v in out.items()
            if v.layout == torch.strided and v.device.type == "meta"]
    if odd:
        raise CheckpointError(f"{source} does not hold plain dense weights: " + "; ".join(odd[:3])
                              + (f" (+{len(odd) - 3} more)" if len(odd) > 3 else ""))
    kinds = [
        f"{k!r} is {v.dtype} in the checkpoint but {expected[k].dtype} in the model"
        for k, v in out.items()
        if v.is_floating_point() != expected[k].is_floating_point() or v.is_complex() != expected[k].is_complex()
        or (v.dtype == torch.bool) != (expected[k].dtype == torch.bool)
    ]
    if kinds:
        raise CheckpointError(f"{source} has weights of another kind than the model's (not cast): " + "; ".join(kinds[:3])
                              + (f" (+{len(kinds) - 3} more)" if len(kinds) > 3 else ""))
    bad = [k for k, v in out.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{source} has non-finite weights (NaN or inf) in {_shown(bad)}")
    return out
