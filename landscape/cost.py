"""What a measurement costs, counted rather than timed: matrix-multiply FLOPs in units of one
forward+backward pass of the probe batch, per phase of :func:`~landscape.measure.measure_step`.

Counting uses ``torch.utils.flop_counter.FlopCounterMode``, which counts the FLOPs of every matrix
product, convolution and attention kernel run while it is active (the backward's products included;
elementwise operations are not counted). One forward+backward of a model made of such products costs
3 units of its forward (the backward's two products per forward product), so a forward-only pass
counts 1/3 of a forward+backward, measured, not assumed. Model calls are counted too (a forward
pre-hook on the model), split into calls with and without autograd recording.

    >>> from landscape.cost import MeasurementCost      # doctest: +SKIP
    >>> with MeasurementCost(objective, at=x_t) as cost:
    ...     rows = measure_step(objective, step, x_t, dirs, progress=cost.progress)
    >>> cost.total, cost.phases                          # fwd+bwd equivalents
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["MeasurementCost", "count_flops"]


def count_flops(fn: Callable[[], Any]) -> int:
    """Matrix-multiply FLOPs of ``fn()``."""
    with FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


class MeasurementCost:
    """Counts a measurement's FLOPs per phase, in forward+backward passes of the objective at ``at``.

    Use as a context manager around :func:`~landscape.measure.measure_step`, passing
    :meth:`progress` as its ``progress`` (a ``then`` callback is called too). On entry one
    forward+backward (:meth:`Objective.loss_and_grad`) and one forward (:meth:`Objective.loss`) are
    counted as the units (outside the measurement's count).

    Attributes:
        unit: FLOPs of one forward+backward.
        forward_ratio: FLOPs of one forward / :attr:`unit`.
        phases: ``{phase: forward+backward equivalents}`` after exit (phases as measure_step names
            them: ``"sharpness"``, ``"lines"``, ``"histograms and cosines"``, ``"smoothness"``...;
            ``"trace (once per objective)"``: the first measurement records the loss for the Taylor
            sweep before its first phase).
        total: their sum.
        calls: ``{"grad": n, "no_grad": n}`` model calls (Taylor sweeps do not call the model).
    """

    def __init__(self, objective: Any, at: Mapping[str, Tensor] | None = None,
                 then: Callable[[str, int, int], None] | None = None) -> None:
        self.objective = objective
        self.at = at
        self.then = then
        self.unit = count_flops(lambda: objective.loss_and_grad(at))
        if self.unit <= 0:
            raise ValueError("the objective's forward+backward has no matrix products to count")
        self.forward_ratio = count_flops(lambda: objective.loss(at)) / self.unit
        self.phases: dict[str, float] = {}
        self.calls = {"grad": 0, "no_grad": 0}
        self.total = 0.0
        self._phase = "trace (once per objective)"
        self._mark = 0
        self._fc: FlopCounterMode | None = None
        self._hook: Any = None

    def _close_phase(self) -> None:
        assert self._fc is not None
        now = int(self._fc.get_total_flops())
        self.phases[self._phase] = self.phases.get(self._phase, 0.0) + (now - self._mark) / self.unit
        self._mark = now

    def progress(self, phase: str, done: int = 0, total: int = 0) -> None:
        """The ``progress`` callback of measure_step: attributes the FLOPs so far to the last phase."""
        if self._fc is not None and phase != self._phase:
            self._close_phase()
            self._phase = phase
        if self.then is not None:
            self.then(phase, done, total)

    def __enter__(self) -> MeasurementCost:
        def count(module: Any, args: Any) -> None:
            self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1

        self._hook = self.objective.model.register_forward_pre_hook(count)
        self._fc = FlopCounterMode(display=False)
        self._fc.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self._close_phase()
        finally:
            assert self._fc is not None
            self._fc.__exit__(*exc)
            self._fc = None
            self._hook.remove()
        if not self.phases.get("trace (once per objective)"):
            self.phases.pop("trace (once per objective)", None)
        self.total = float(sum(self.phases.values()))
