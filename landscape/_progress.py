"""Progress in words on long work: the demo, ``landscape analyze`` and the probe (``progress=True``).

In a terminal, one status line is rewritten in place::

    landscape demo: step 120/300 · loss 2.104 · measuring 18 directions at step 120 (lines 4/18) · 0:42, about 1:05 left

Elsewhere (a log file, a CI job, a notebook's captured stderr), one line per measurement, when it
starts, and the notes (``writing figures``)::

    landscape demo: step 120/300 · measuring 18 directions at step 120 · 0:42, about 1:05 left

The time left is a cost model, not a recent speed: the remaining plain steps (training steps, or
checkpoints read) times their mean duration, plus the remaining measurements times the mean
duration of a measurement (the first step and the first measurement, which also pay one-off costs
such as loading the data and recording the loss for the Taylor sweep, count only until others are
known). A measurement costs as much as hundreds of training steps, so a
speed-based estimate jumps by that factor each time one starts; this one does not.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``."""
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress of a job made of plain steps (cheap) and measurements (expensive).

    Args:
        what: the line prefix (``"landscape demo"``).
        total: the number of plain steps (``None``: unknown, no time left shown).
        measured_at: ``measured_at(i)``: whether plain step ``i`` (1-based) is followed by a
            measurement; ``None``: estimated from the fraction seen so far.
        stream: where to write (default: ``sys.stderr`` at the time of writing).
        tty: force the terminal (status line) or log (one line per measurement) form.
        clock: a monotonic clock in seconds (tests pass a fake one).
        enabled: ``False`` writes nothing (the estimates still work).
        unit: the name of a plain step in the status line (``"step"``, ``"checkpoint"``).
        log_at: outside a terminal, write a measurement's line when it ``"start"``s (with the time
            left) or at its ``"end"`` (:meth:`close` text; the probe's form).
    """

    def __init__(self, what: str = "landscape", *, total: int | None = None,
                 measured_at: Callable[[int], bool] | None = None, stream: IO[str] | None = None,
                 tty: bool | None = None, clock: Callable[[], float] = time.monotonic, enabled: bool = True,
                 unit: str = "step", log_at: str = "start") -> None:
        self.what = what
        self.total = total
        self.measured_at = measured_at
        self._stream = stream
        self._tty = tty
        self.clock = clock
        self.enabled = enabled
        self.unit = unit
        self.log_at = log_at
        self.start = clock()
        self.done = 0
        self.loss: float | None = None
        self._last_mark = self.start  # end of the last plain step or measurement
        self._work_time = 0.0
        self._work_n = 0
        self._first_work: tuple[float, int] | None = None
        self._meas_times: list[float] = []
        self._meas_start: float | None = None
        self._meas_label = ""
        self._meas_steps = 0  # plain steps seen that were followed by a measurement
        self._shown = 0.0
        self._line_open = False

    # -- output
    @property
    def stream(self) -> IO[str]:
        return self._stream if self._stream is not None else sys.stderr

    @property
    def tty(self) -> bool:
        if self._tty is not None:
            return self._tty
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def _write(self, text: str, *, status: bool) -> None:
        if not self.enabled:
            return
        try:
            if status and self.tty:
                self.stream.write("\r" + text + "\x1b[K")
                self._line_open = True
            else:
                if self._line_open:
                    self.stream.write("\r\x1b[K")
                    self._line_open = False
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is never worth a crash
            self.enabled = False

    def _status(self, detail: str = "") -> str:
        parts = []
        if self.total:
            parts.append(f"{self.unit} {self.done}/{self.total}")
        elif self.done:
            parts.append(f"{self.unit} {self.done}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        if detail:
            parts.append(detail)
        timing = format_seconds(self.clock() - self.start)
        left = self.eta()
        if left is not None:
            timing += f", about {format_seconds(left)} left"
        elif self.total and self._pending_measurements() and not self._meas_times:
            timing += ", time left known after the first measurement"
        parts.append(timing)
        return f"{self.what}: " + " · ".join(parts)

    def _refresh(self, detail: str = "", force: bool = False) -> None:
        now = self.clock()
        if self.tty and (force or now - self._shown >= 0.2):
            self._shown = now
            self._write(self._status(detail), status=True)

    # -- events
    def step(self, done: int, loss: float | None = None, detail: str = "") -> None:
        """Plain step ``done`` (1-based count) finished; ``loss``: shown when given."""
        now = self.clock()
        if done > self.done:
            self._work_time += now - self._last_mark
            self._work_n += done - self.done
            if self._first_work is None:  # the first one also pays for the start (data, model, imports)
                self._first_work = (self._work_time, self._work_n)
        self._last_mark = now
        self.done = max(self.done, done)
        if loss is not None:
            self.loss = loss
        self._refresh(detail)

    def start_at(self, done: int) -> None:
        """Continue a job after ``done`` plain steps (a resumed run): they count as done, not as
        timed work."""
        self.done = done
        self._last_mark = self.clock()

    def measuring(self, step: int, n_directions: int, phase: str = "", i: int = 0, n: int = 0) -> None:
        """A measurement at ``step`` of ``n_directions`` directions is under way (``phase`` ``i/n``):
        ``measuring 18 directions at step 120 (sharpness 4/18)``."""
        label = f"measuring {n_directions} direction{'s' * (n_directions != 1)} at step {step}"
        self.activity(label, label + (f" ({phase} {i}/{n})" if phase and n else f" ({phase})" if phase else ""))

    def activity(self, label: str, detail: str | None = None) -> None:
        """A measurement described by ``label`` is under way, now at ``detail``; the first call of a
        measurement starts its clock (and, outside a terminal, writes its log line)."""
        first = self._meas_start is None
        if first:
            self._meas_start = self.clock()
            self._work_time += self._meas_start - self._last_mark  # the plain step before it
            self._last_mark = self._meas_start
            self._meas_label = label
            if not self.tty and self.log_at == "start":
                self._write(self._status(label), status=False)
        self._refresh(detail or label, force=first)  # a measurement's start is always shown

    def measured(self) -> float:
        """The measurement under way finished; returns its duration in seconds."""
        if self._meas_start is None:
            return 0.0
        now = self.clock()
        seconds = now - self._meas_start
        self._meas_times.append(seconds)
        self._meas_start = None
        self._meas_steps += 1
        self._last_mark = now
        self._refresh(force=True)
        return seconds

    def note(self, text: str) -> None:
        """A one-off line (``"writing figures"``), in both forms."""
        self._write(f"{self.what}: {text}", status=False)

    def close(self, text: str | None = None) -> None:
        """End the status line, with ``text`` (or the status) as its last form. Outside a terminal
        ``text`` is written only with ``log_at="end"``."""
        if self._line_open:
            self._write(text or self._status(), status=False)
        elif text and (self.tty or self.log_at == "end"):
            self._write(text, status=False)

    # -- estimates
    def _pending_measurements(self) -> int:
        if not self.total:
            return 0
        if self.measured_at is not None:
            return sum(1 for i in range(self.done + 1, self.total + 1) if self.measured_at(i))
        if not self.done:
            return 0
        return round((self.total - self.done) * self._meas_steps / self.done)

    def mean_measurement(self) -> float | None:
        """Seconds per measurement: the mean of the completed ones, the first left out once there
        are others (it pays one-off costs)."""
        times = self._meas_times[1:] if len(self._meas_times) > 1 else self._meas_times
        return sum(times) / len(times) if times else None

    def mean_step(self) -> float | None:
        """Seconds per plain step, measurements excluded; the first step (it also pays for the
        start) left out once there are others."""
        if not self._work_n:
            return None
        if self._first_work is not None and self._work_n > self._first_work[1]:
            t0, n0 = self._first_work
            return (self._work_time - t0) / (self._work_n - n0)
        return self._work_time / self._work_n

    def eta(self) -> float | None:
        """Seconds left: remaining plain steps × their mean + remaining measurements × theirs (the
        one under way counted by what is left of it); ``None`` when unknown."""
        if not self.total:
            return None
        per_step = self.mean_step()
        remaining = self.total - self.done
        if per_step is None:
            return None if remaining else 0.0
        left = remaining * per_step
        pending = self._pending_measurements()
        per_meas = self.mean_measurement()
        if self._meas_start is not None:
            running = self.clock() - self._meas_start
            if per_meas is None:
                return None
            left += max(per_meas - running, 0.0)
        if pending:
            if per_meas is None:
                return None
            left += pending * per_meas
        return left

    # -- as a callback of measure_step
    def phase_callback(self, step: int, n_directions: int) -> Callable[[str, int, int], None]:
        """``callback(phase, i, n)`` for :func:`landscape.measure.measure_step`'s ``progress``."""
        def callback(phase: str, i: int = 0, n: int = 0) -> None:
            self.measuring(step, n_directions, phase, i, n)

        return callback

    def __repr__(self) -> str:
        return f"Progress({self.what!r}, done={self.done}, total={self.total})"


def probe_printer(enabled: Any, stream: IO[str] | None = None) -> Progress | None:
    """The :class:`Progress` a ``Probe(progress=...)`` writes with: ``True`` -> one on stderr,
    a :class:`Progress` -> itself, ``False``/``None`` -> none."""
    if isinstance(enabled, Progress):
        return enabled
    if enabled:
        return Progress("landscape probe", stream=stream, log_at="end")
    return None
