"""How many intra-op (OpenMP) threads the command line gives torch on the CPU.

Torch starts one thread per physical core. On a machine other jobs also use, those threads wait
for each other at every parallel region (OpenMP barriers spin, then sleep) and a small model's work
is split finer than it gains: on a 2-core machine with a load average of 4 to 7 from other jobs,
2 threads made the demo 1.4× to 11× and ``landscape analyze`` 19× slower than 1 thread
(``benchmarks/threads.py``). On an idle machine more threads help larger models.

``--threads auto`` (the default of ``landscape demo`` and ``landscape analyze``) therefore uses the
cores that are idle now: the CPUs this process may use (affinity, cgroup quota) minus the 1-minute
load average, at least 1 and at most torch's own default. An explicit ``OMP_NUM_THREADS`` (or
``--threads N``) wins.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "choose_threads", "apply_threads"]


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def choose_threads(threads: int | str | None = "auto", *, torch_default: int | None = None,
                   cpus: int | None = None, load: float | None = None,
                   environ: dict[str, str] | None = None) -> tuple[int | None, str]:
    """The thread count to use and why.

    Args:
        threads: ``"auto"`` / ``None`` (idle cores, see the module docstring) or a positive count.
        torch_default: torch's default thread count (default: ``torch.get_num_threads()``).
        cpus, load, environ: for tests (default: :func:`available_cpus`, the 1-minute load average,
            ``os.environ``).

    Returns:
        ``(count, reason)``; ``count`` is ``None`` when the environment already decides
        (``OMP_NUM_THREADS`` set) and nothing should be changed.

    Raises:
        ValueError: a count that is not a positive integer.
    """
    env = os.environ if environ is None else environ
    if threads not in (None, "auto"):
        try:
            n = int(threads)
        except (TypeError, ValueError):
            raise ValueError(f"threads must be 'auto' or a positive integer, got {threads!r}") from None
        if n < 1:
            raise ValueError(f"threads must be 'auto' or a positive integer, got {threads!r}")
        return n, f"{n} thread{'s' * (n > 1)} (--threads)"
    if env.get("OMP_NUM_THREADS"):
        return None, f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}"
    if torch_default is None:
        import torch

        torch_default = torch.get_num_threads()
    cpus = available_cpus() if cpus is None else cpus
    load = _load() if load is None else load
    idle = max(1, min(cpus, torch_default, int(math.floor(cpus - load + 0.5))))
    return idle, f"{idle} thread{'s' * (idle > 1)}: {cpus} CPU{'s' * (cpus > 1)}, load average {load:.1f}"


def apply_threads(threads: int | str | None = "auto") -> str:
    """Set torch's intra-op thread count by :func:`choose_threads`; returns the reason."""
    n, why = choose_threads(threads)
    if n is not None:
        import torch

        torch.set_num_threads(n)
    return why
