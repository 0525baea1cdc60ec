"""The probe under ``torch.distributed``: one process per rank, every rank running the same code.

    torchrun --nproc_per_node 4 train.py     # Probe(...) and probe.attach(optimizer) on every rank

What is divided (:class:`~landscape.Probe` does it when a process group is initialised):

- **Recipe states** are sharded by recipe: :func:`assign_recipes` gives each rank a subset of the
  recipes, keeping the recipes that share a state (the raw-gradient EMA serves ``sgd``, ``normsgd``,
  ``signsgd``...) on one rank where that balances, so each rank holds about 1/world of the states'
  bytes (a state needed on two ranks is held twice). DDP has already averaged the gradients, so every
  rank observes the same gradients and its own recipes evolve exactly as in one process.
- **The measurement**: each rank measures its own recipes' directions (sharpness, lines, histograms,
  per-layer decompositions); the trained step ``x_t − x_{t+1}`` is measured on the least loaded rank;
  smoothness, robust smoothness, eigenvalues, traces and densities on rank 0. A rank never holds all
  its directions: they are computed from the recipe states ``MeasureSettings.chunk`` at a time, as in
  one process. The cosines between directions on different ranks come from :meth:`Group.gram`, in
  lockstep rounds over pairs of chunks: each round gathers one chunk of every rank, one piece of at
  most 2²² coordinates per ``all_gather``, so a rank holds about two chunks of its own directions and
  ``world × chunk`` copies of one piece (plus the trained step, already materialised, on its rank).
  The rows are gathered on rank 0, where the ratios to SGD are computed.
- **The run store** is opened and written by rank 0 alone; each rank saves its recipe states in its
  own file (``probe_state-<step>.rank<r>of<world>.pt``), and rank 0's commit names them all.

FSDP2 (``fully_shard``): the probe measures on :func:`plain_replica`, a plain copy of the model with
the full parameters (so the model must fit on one device); each step every rank gathers the full
averaged gradient (``full_tensor()``) for its own recipes, sharded by recipe as under DDP.

No hang: the ranks check at ``attach`` that every rank runs the probe with the same settings (through
the process group's key-value store, not a collective, so a rank without a probe is named instead of
waited for), and every later failure (a measurement that raises on one rank, a state file one rank
cannot write, a resume with another world size) is exchanged in the next collective and raised, or
recorded, on every rank alike.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from landscape.measure import DirectionSource

__all__ = ["CollectiveError", "DistributedError", "Group", "assign_recipes", "dtensor_parameters", "full_tensor", "plain_replica",
           "same_on_every_rank", "unwrap"]


class DistributedError(RuntimeError):
    """The ranks of a distributed job disagree (a probe on some ranks only, other settings on one rank),
    or one rank failed: raised on every rank that runs the probe."""


class CollectiveError(DistributedError):
    """A collective of the probe failed (a rank died, left or timed out): the probe switches off on this
    rank and tries no collective again."""


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` / ``DataParallel`` (their ``.module``), so that
    parameter names carry no ``module.`` prefix and a distributed run's store matches a one-process one."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def dtensor_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters that are ``DTensor``s (FSDP2's ``fully_shard``, tensor parallelism)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    return [n for n, p in model.named_parameters() if isinstance(p, DTensor)]


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a ``DTensor`` (``full_tensor()``, a collective over its mesh); ``t`` otherwise."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return t
    return t.full_tensor() if isinstance(t, DTensor) else t


def plain_replica(model: nn.Module) -> nn.Module:
    """A plain copy of an FSDP2 (``fully_shard``) model: the same classes without FSDP's mixin, hooks or
    state, each parameter a full ``nn.Parameter`` gathered with ``full_tensor()`` (a collective: every
    rank calls it), buffers shared. The model itself is not touched. The probe measures on it, so the
    model must fit on one device.

    Raises:
        DistributedError: a module that cannot be copied this way (then nothing was changed).
    """
    from torch.distributed.fsdp import FSDPModule

    def copy(m: nn.Module) -> nn.Module:
        cls: type = type(m)
        if isinstance(m, FSDPModule):
            plain = [b for b in cls.__bases__ if not issubclass(b, FSDPModule)]
            if len(plain) != 1 or not issubclass(plain[0], nn.Module):
                raise DistributedError(f"landscape probe: cannot find the module class under FSDP's {cls.__name__}")
            cls = plain[0]
        new = cls.__new__(cls)
        state = {}
        for k, v in m.__dict__.items():
            if k.startswith("_composable") or "fsdp" in k.lower():
                continue  # FSDP's own state
            state[k] = type(v)() if "hook" in k and isinstance(v, dict) else v
        state["_parameters"] = {
            n: None if p is None else nn.Parameter(full_tensor(p.detach()).clone(), requires_grad=p.requires_grad)
            for n, p in m._parameters.items()
        }
        state["_buffers"] = dict(m._buffers)
        state["_modules"] = {n: None if c is None else copy(c) for n, c in m._modules.items()}
        new.__dict__.update(state)
        return new

    try:
        replica = copy(model)
    except DistributedError:
        raise
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"landscape probe: could not build a plain replica of the FSDP2 model to measure on "
                               f"({type(e).__name__}: {e}); nothing was changed") from e
    left = dtensor_parameters(replica)
    if left:
        raise DistributedError(f"landscape probe: the replica still has DTensor parameters {left[:3]}")
    return replica


def _state_sets(params: Mapping[str, Tensor], recipes: Sequence[str], state_dtype: torch.dtype | None
                ) -> tuple[dict[str, set[str]], dict[str, int]]:
    """``({recipe: its state keys}, {state key: bytes})`` of a PseudoUpdates on ``params``, built on the
    meta device (no memory)."""
    from landscape.optim import PseudoUpdates

    meta = {n: torch.empty(p.shape, dtype=p.dtype, device="meta") for n, p in params.items()}
    report = PseudoUpdates(meta, list(recipes), state_dtype=state_dtype).state_report()
    needs: dict[str, set[str]] = {r: set() for r in recipes}
    size: dict[str, int] = {}
    for row in report:
        size[row["key"]] = int(row["bytes"])
        for r in row["used_by"]:
            needs.setdefault(r, set()).add(row["key"])
    return needs, size


def assign_recipes(
    params: Mapping[str, Tensor], recipes: Sequence[str], world: int, *, state_dtype: torch.dtype | None = None
) -> list[list[str]]:
    """Divide ``recipes`` among ``world`` ranks so that each rank's distinct state bytes are balanced.

    A rank holds the union of the states its recipes read, so a state shared by two recipes costs once
    when they are on one rank and twice when they are split. The recipes linked by shared states form
    groups; a group is kept whole unless it alone exceeds 1/world of the bytes, when its recipes are
    placed one by one. Greedy, heaviest first (longest processing time), deterministic (every rank
    computes the same answer): each item goes to the rank whose bytes *after* adding it are smallest
    (ties: the rank that already holds more of its states, then the lower rank).

    Returns:
        ``world`` lists of recipe names, each in the order of ``recipes``.
    """
    if world < 1:
        raise ValueError(f"world must be ≥ 1, got {world}")
    recipes = list(recipes)
    needs, size = _state_sets(params, recipes, state_dtype)
    # groups: recipes connected through a shared state (union-find)
    parent = {r: r for r in recipes}

    def find(r: str) -> str:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    for key in size:
        users = [r for r in recipes if key in needs[r]]
        for u in users[1:]:
            parent[find(u)] = find(users[0])
    groups: dict[str, list[str]] = {}
    for r in recipes:
        groups.setdefault(find(r), []).append(r)
    total = sum(size.values())

    def cost(items: Iterable[str]) -> int:
        return sum(size[k] for k in set().union(*(needs[r] for r in items)))

    items: list[list[str]] = []
    for members in groups.values():
        if len(members) > 1 and cost(members) * world > total:
            items += [[r] for r in members]
        else:
            items.append(members)
    items.sort(key=lambda it: (-cost(it), recipes.index(it[0])))
    held: list[set[str]] = [set() for _ in range(world)]
    load = [0] * world
    chosen: dict[str, int] = {}
    for it in items:
        need = set().union(*(needs[r] for r in it))
        best = min(range(world), key=lambda k: (load[k] + sum(size[s] for s in need - held[k]), -len(need & held[k]), k))
        for r in it:
            chosen[r] = best
        held[best] |= need
        load[best] = sum(size[s] for s in held[best])
    return [[r for r in recipes if chosen[r] == k] for k in range(world)]


def same_on_every_rank(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (a broadcast; ``obj`` itself without a process group): e.g. the
    first training batch as the probe batch, which a ``DistributedSampler`` makes differ per rank. Give
    CPU tensors (the callbacks copy the batch to the CPU first)."""
    group = Group.current()
    if group is None:
        return obj
    box = [obj]
    try:
        group._dist.broadcast_object_list(box, src=0)
    except Exception as e:  # noqa: BLE001
        raise DistributedError(f"landscape probe: broadcasting the probe batch from rank 0 failed: {e}") from e
    return box[0]


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=repr)


class Group:
    """The default process group as the probe uses it (rank, world, object collectives, the handshake).

    Attributes:
        rank: this process's rank. world: the number of ranks.
    """

    _probes = 0  # probes opened in this process: names each handshake (the same count on every rank)

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.backend = str(dist.get_backend())

    @classmethod
    def current(cls) -> Group | None:
        """The default process group when one is initialised with more than one rank, else ``None``."""
        try:
            import torch.distributed as dist
        except ImportError:  # pragma: no cover
            return None
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return cls()

    # ------------------------------------------------------------------ collectives
    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * self.world
        try:
            self._dist.all_gather_object(out, obj)
        except Exception as e:  # noqa: BLE001 - a rank died or timed out: no collective is tried again
            raise CollectiveError(f"landscape probe: a collective failed on rank {self.rank} (another rank "
                                   f"failed, left or timed out): {type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
        return out

    def agree(self, fn: Callable[[], Any], what: str) -> Any:
        """Run ``fn()`` on every rank and exchange the outcome: when it raised on any rank, raise on every
        rank (the same exception class for the probe's own errors, else :class:`DistributedError`) with
        the failing ranks named. Returns ``fn()``'s value on this rank."""
        value, failure = None, None
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - exchanged, then raised on every rank
            failure = (type(e).__module__, type(e).__qualname__, " ".join(str(e).split()))
            mine = e
        else:
            mine = None
        outcomes = self.all_gather_object(failure)
        failed = [(r, f) for r, f in enumerate(outcomes) if f is not None]
        if not failed:
            return value
        if mine is not None:  # this rank's own error (it failed too)
            mine.agreed = True  # type: ignore[attr-defined]  # raised on every rank alike
            raise mine
        rank, (module, name, message) = failed[0]
        text = f"{what} failed on rank {rank} of {self.world}: {name}: {message}"
        if len(failed) > 1:
            text += f" (and on ranks {[r for r, _ in failed[1:]]})"
        raise _same_class(module, name, text) from mine

    def handshake(self, config: Mapping[str, Any], timeout: timedelta | None = None) -> None:
        """Check that every rank runs a probe with the same ``config``, through the key-value store of
        the process group (no collective, so a rank without a probe cannot make the others hang: it is
        named once ``timeout`` has passed, default the store's own, that is ``init_process_group``'s).

        Raises:
            DistributedError: on every rank that runs the probe, when a rank has no probe or differs.
        """
        from torch.distributed import distributed_c10d as c10d

        Group._probes += 1
        store = c10d._get_default_store()
        base = f"landscape/probe/{Group._probes}"
        mine = _json(config)
        store.set(f"{base}/{self.rank}", mine)
        keys = [f"{base}/{r}" for r in range(self.world)]
        wait = timeout or store.timeout
        try:
            store.wait(keys, wait)
        except Exception:  # noqa: BLE001 - DistStoreError / RuntimeError on timeout, by torch version
            present = [r for r in range(self.world) if store.check([keys[r]])]
            absent = [r for r in range(self.world) if r not in present]
            raise DistributedError(
                f"landscape probe: ranks {absent} of {self.world} did not start a probe within "
                f"{wait.total_seconds():.0f} s while ranks {present} did. Under torch.distributed every rank "
                "runs the same Probe(...) and probe.attach(optimizer) (rank 0 alone writes the run folder): "
                "do not guard the probe with `if rank == 0`"
            ) from None
        theirs = {r: json.loads(store.get(keys[r]).decode()) for r in range(self.world)}
        ref = theirs[0]
        for r, cfg in theirs.items():
            diff = sorted(k for k in set(ref) | set(cfg) if ref.get(k) != cfg.get(k))
            if diff:
                raise DistributedError(
                    f"landscape probe: rank {r} runs the probe with other {diff} than rank 0 "
                    f"({ {k: cfg.get(k) for k in diff} } against { {k: ref.get(k) for k in diff} }): every rank "
                    "needs the same model, recipes, settings and the same probe batch"
                )

    def gram(self, local: Mapping[str, Mapping[str, Tensor]] | DirectionSource, order: Sequence[str],
             owner: Mapping[str, int], like: Mapping[str, Tensor], *, chunk: int | None = None) -> np.ndarray:
        """``G[i, j] = ⟨u_i, u_j⟩`` (float64) over the directions of every rank, in ``order``.

        Args:
            local: this rank's directions, ``{name: u}`` or a
                :class:`~landscape.measure.DirectionSource` that produces them a chunk at a time.
            order: every rank's directions, in the matrix's order. owner: ``{name: its rank}``.
            like: the parameter tensors (keys, shapes, dtypes, device) of a direction.
            chunk: this rank's directions materialised at a time (default: all of them at once).

        Lockstep rounds over pairs of chunk indices ``a ≤ b`` (every rank issues the same collectives in
        the same order; a rank with fewer chunks sends zeros): in round ``(a, b)`` each rank holds its
        chunk ``a`` and its chunk ``b`` (``b`` from the last down to ``a + 1``, which is then kept as the
        next held chunk), gathers chunk ``b`` of every rank (``all_gather``) one packed piece of at
        most 2²² coordinates at a time (whole tensors packed together, a larger one in slices), and
        accumulates the float64 dot products of its chunk ``a`` against them. Each pair is computed on
        exactly one rank (within ``a = b``, by the lower of the two ranks), so the sum of the ranks'
        partial matrices, exchanged at the end, counts every entry once: it equals the dense float64
        Gram matrix of one process to rounding. Peak memory per rank: two chunks of its directions and
        ``world × chunk`` copies of one piece. A direction with norm 0 or non-finite entries gets NaN
        rows, as in :func:`~landscape.measure.measure_step`.

        A failure to produce a direction on one rank is carried through the remaining rounds (that rank
        sends zeros) and raised as :class:`DistributedError` on every rank.
        """
        from landscape.measure import DirectionSource, direction_problem

        source = DirectionSource.of(local)
        names_of = [[n for n in order if owner[n] == r] for r in range(self.world)]
        size = max(1, int(chunk)) if chunk is not None else max(1, max(len(x) for x in names_of))
        chunks_of = [[x[i:i + size] for i in range(0, len(x), size)] for x in names_of]
        rounds = max(len(c) for c in chunks_of)
        mine = chunks_of[self.rank]
        index = {n: i for i, n in enumerate(order)}
        keys = list(like)
        segments = _segments(like, _PIECE)
        part = torch.zeros(len(order), len(order), dtype=torch.float64)
        undefined: list[str] = []
        failure: str | None = None

        def fetch(c: int) -> dict[str, dict[str, Tensor]]:
            nonlocal failure
            if failure is not None or c >= len(mine):
                return {}
            try:
                got = source.get(mine[c])
                return {n: {k: got[n][k] for k in keys} for n in mine[c]}
            except Exception as e:  # noqa: BLE001 - sent as zeros, then raised on every rank
                failure = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
                return {}

        def rows(tree_of: Mapping[str, Mapping[str, Tensor]], names: Sequence[str], seg: list[tuple[str, int, int]],
                 width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
            out = torch.zeros(width, sum(hi - lo for _, lo, hi in seg), dtype=dtype, device=device)
            for i, n in enumerate(names):
                if n not in tree_of:
                    continue
                at = 0
                for key, lo, hi in seg:
                    out[i, at:at + hi - lo] = tree_of[n][key].detach().reshape(-1)[lo:hi]
                    at += hi - lo
            return out

        # Round order: (a, a), then (a, b) for b from the last chunk down to a + 1, whose chunk is kept as
        # the next rounds' held chunk (so each outer step fetches one chunk fewer, still two alive at once).
        carried: dict[str, dict[str, Tensor]] | None = None
        for a in range(rounds):
            held = fetch(a) if carried is None else carried
            carried = None
            for n, u in held.items():
                if direction_problem(u) is not None:
                    undefined.append(n)
            ids = torch.tensor([index[n] for n in held], dtype=torch.long)
            for b in [a, *range(rounds - 1, a, -1)]:
                other = held if b == a else fetch(b)
                theirs = [c[b] if b < len(c) else [] for c in chunks_of]
                width = max(len(t) for t in theirs)
                blocks = [torch.zeros(len(held), len(t), dtype=torch.float64) for t in theirs]
                for seg, dtype, device in segments:
                    flat = rows(other, mine[b] if b < len(mine) else [], seg, width, dtype, device)
                    parts = [torch.empty_like(flat) for _ in range(self.world)]
                    try:
                        self._dist.all_gather(parts, flat)
                    except Exception as e:  # noqa: BLE001
                        raise CollectiveError(f"landscape probe: all_gather of the directions failed on rank {self.rank}: "
                                               f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from e
                    del flat
                    if not held:
                        continue
                    mat = rows(held, list(held), seg, len(held), dtype, device).double()
                    for s, t in enumerate(theirs):
                        if t and not (b == a and s < self.rank):  # a pair within one chunk index: the lower rank's
                            blocks[s] += (mat @ parts[s][:len(t)].double().T).cpu()
                    del mat
                    del parts
                for s, t in enumerate(theirs):
                    if not held or not t or (b == a and s < self.rank):
                        continue
                    jds = torch.tensor([index[n] for n in t], dtype=torch.long)
                    if b == a and s == self.rank:  # the chunk against itself: both orders at once
                        part[ids[:, None], ids[None, :]] += blocks[s]
                    else:
                        part[ids[:, None], jds[None, :]] += blocks[s]
                        part[jds[:, None], ids[None, :]] += blocks[s].T
                if b == a + 1:
                    carried = other
                del other
            del held
        outcomes = self.all_gather_object({"error": failure, "undefined": undefined, "part": part.numpy()})
        failed = [(r, o["error"]) for r, o in enumerate(outcomes) if o["error"]]
        if failed:
            raise DistributedError(f"the directions of rank {failed[0][0]} of {self.world} could not be computed: "
                                   f"{failed[0][1]}")
        gram = np.zeros((len(order), len(order)), dtype=np.float64)
        for o in outcomes:  # each entry is non-zero in one rank's part only: the sum is exact
            gram += o["part"]
        bad = [index[n] for o in outcomes for n in o["undefined"]]
        gram[bad, :] = np.nan
        gram[:, bad] = np.nan
        return gram

    def __repr__(self) -> str:
        return f"Group(rank={self.rank}, world={self.world}, backend={self.backend!r})"


_PIECE = 1 << 22  # coordinates per direction sent in one all_gather of Group.gram


def _segments(like: Mapping[str, Tensor], piece: int) -> list[tuple[list[tuple[str, int, int]], torch.dtype, torch.device]]:
    """The coordinates of ``like`` cut into pieces of at most ``piece``: each piece a list of
    ``(key, lo, hi)`` slices of the flattened tensors of one dtype and device (small tensors packed
    together, a larger one cut), with that dtype and device."""
    out: list[tuple[list[tuple[str, int, int]], torch.dtype, torch.device]] = []
    seg: list[tuple[str, int, int]] = []
    used = 0
    kind: tuple[torch.dtype, torch.device] | None = None
    for key, ref in like.items():
        n = ref.numel()
        if (ref.dtype, ref.device) != kind and seg:
            out.append((seg, *kind))  # type: ignore[misc]
            seg, used = [], 0
        kind = (ref.dtype, ref.device)
        lo = 0
        while lo < n:
            take = min(n - lo, piece - used)
            seg.append((key, lo, lo + take))
            used += take
            lo += take
            if used == piece:
                out.append((seg, *kind))
                seg, used = [], 0
    if seg:
        out.append((seg, *kind))  # type: ignore[misc]
    return out


def _same_class(module: str, name: str, message: str) -> Exception:
    """An exception of the class ``module.name`` when it is one of the probe's own (or a builtin), with
    ``message``; otherwise :class:`DistributedError`."""
    import builtins
    import importlib

    cls: Any = None
    if module == "builtins":
        cls = getattr(builtins, name, None)
    elif module.startswith("landscape"):
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:
            cls = None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            return cls(message)
        except Exception:  # noqa: BLE001 - a constructor with other arguments
            pass
    return DistributedError(message)
