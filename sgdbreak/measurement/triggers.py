"""When to measure: plain ``step -> bool`` callables, separate from what is measured.

A trigger is any callable taking the number of completed optimizer steps and returning
whether to measure after that step. Triggers may also define ``observe(record)`` to
adapt to measurements (the monitor also passes ``break_even_reached=`` when the method
accepts it), ``on_skip(step)`` to hear of a measurement that was skipped (a non-finite
loss), and ``state_dict`` / ``load_state_dict`` to resume exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import _validation as V
from .protocols import Trigger

__all__ = ["Adaptive", "DenseUntilBreakEven", "Every", "LogSpaced", "PerEpoch", "Trigger", "as_trigger"]



class Every:
    """Fire every ``n`` steps (steps n, 2n, …, shifted by ``offset``)."""

    def __init__(self, n: int, *, offset: int = 0):
        self.n = V.integer("n", n, 1)
        self.offset = offset

    def __call__(self, step: int) -> bool:
        return step >= self.offset and (step - self.offset) % self.n == 0

    def __repr__(self) -> str:
        return f"Every({self.n}, offset={self.offset})"


class DenseUntilBreakEven:
    """Fire every ``every`` steps until break-even is detected, then every ``after`` steps.

    The monitor's default for the cheap signal: between full measurements it is what
    detects break-even early; once break-even is past, it is only logged (and, with large
    steps, spikes), so it runs ``after / every`` times less often.
    """

    def __init__(self, every: int = 10, after: int = 50):
        self.every = V.integer("every", every, 1)
        self.after = V.integer("after", after, 1)
        self.settled = False

    def __call__(self, step: int) -> bool:
        return step >= 1 and step % (self.after if self.settled else self.every) == 0

    def observe(self, record: Mapping[str, float], *, break_even_reached: bool = False) -> None:
        self.settled = self.settled or break_even_reached

    def state_dict(self) -> dict[str, Any]:
        return {"settled": self.settled}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.settled = bool(state["settled"])

    def __repr__(self) -> str:
        return f"DenseUntilBreakEven(every={self.every}, after={self.after})"


class LogSpaced:
    """Fire at roughly ``per_decade`` log-spaced steps per decade (1, 2, 3, 5, 7, 10, …).

    Dense early, sparse later: early training changes fastest (break-even comes early).
    """

    def __init__(self, per_decade: int = 8, *, start: int = 1):
        self.per_decade = V.integer("per_decade", per_decade, 1)
        self.start = V.integer("start", start, 1)

    def __call__(self, step: int) -> bool:
        if step < self.start:
            return False
        if step == self.start:
            return True
        i = math.floor(self.per_decade * math.log10(step / self.start))
        prev = math.floor(self.per_decade * math.log10((step - 1) / self.start))
        return i > prev

    def __repr__(self) -> str:
        return f"LogSpaced({self.per_decade}, start={self.start})"


class PerEpoch:
    """Fire ``times`` times per epoch of ``steps_per_epoch`` steps (at epoch ends by default)."""

    def __init__(self, steps_per_epoch: int, *, times: int = 1):
        self.steps_per_epoch = V.integer("steps_per_epoch", steps_per_epoch, 1)
        self.times = V.integer("times", times, 1)

    def __call__(self, step: int) -> bool:
        if step < 1:
            return False
        marks = {round(self.steps_per_epoch * (j + 1) / self.times) for j in range(self.times)}
        return (step - 1) % self.steps_per_epoch + 1 in marks

    def __repr__(self) -> str:
        return f"PerEpoch({self.steps_per_epoch}, times={self.times})"


class Adaptive:
    """Measure densely while the measurements change fast, sparsely once they settle.

    After each full measurement the interval shrinks by ``factor`` when λ1^H moved by more
    than ``change`` (relative) since the previous one, and grows by ``factor`` otherwise,
    within [``min_every``, ``max_every``]. A cheap-signal alarm (``stability_ratio_update``
    at or above ``alarm``) brings the next measurement forward to ``min_every`` steps
    until break-even has been detected (``observe`` sees the monitor's records). After
    break-even the interval grows by ``settled_factor`` at every measurement: λ1^H then
    hovers noisily near 2/η and would otherwise keep the cadence dense. ``key``: the record
    key (or keys, the first present is used) whose change drives the interval: λ1^H, else
    the preconditioned λ1^PH of an Adam monitor that does not measure λ1^H.
    """

    def __init__(
        self,
        *,
        first: int = 1,
        min_every: int = 10,
        max_every: int = 1000,
        factor: float = 2.0,
        settled_factor: float = 4.0,
        change: float = 0.25,
        alarm: float | None = 0.5,
        key: str | tuple[str, ...] = ("lambda1_H", "lambda1_PH"),
    ):
        self.first = V.integer("first", first, 1)
        self.min_every = V.integer("min_every", min_every, 1)
        self.max_every = V.integer("max_every", max_every, 1)
        if self.max_every < self.min_every:
            raise ValueError(f"max_every={max_every} must be >= min_every={min_every}")
        for name, value in (("factor", factor), ("settled_factor", settled_factor)):
            if not value > 1:
                raise ValueError(f"{name} must be > 1, got {value!r}")
        if not change > 0:
            raise ValueError(f"change must be > 0, got {change!r}")
        self.factor, self.settled_factor = float(factor), float(settled_factor)
        self.change, self.alarm = float(change), alarm
        self.key = (key,) if isinstance(key, str) else tuple(key)  # the first one a record has
        self.interval = float(self.min_every)
        self.next_step = self.first
        self.previous: float | None = None
        self.settled = False

    def __call__(self, step: int) -> bool:
        return step >= self.next_step

    def observe(self, record: Mapping[str, float], *, break_even_reached: bool = False) -> None:
        """Adapt the interval to a new record (full measurement or cheap signal)."""
        step = int(record["step"])
        self.settled = self.settled or break_even_reached
        key = next((k for k in self.key if k in record), None)
        if key is not None:
            value = float(record[key])
            if self.settled:
                # Past break-even λ1^H hovers noisily near 2/η: back off regardless.
                self.interval = min(self.max_every, self.interval * self.settled_factor)
            elif self.previous is not None and self.previous != 0:
                moved = abs(value - self.previous) / abs(self.previous)
                scale = 1 / self.factor if moved > self.change else self.factor
                self.interval = min(self.max_every, max(self.min_every, self.interval * scale))
            self.previous = value
            self.next_step = step + max(1, round(self.interval))
        alarm = record.get("stability_ratio_update")
        if (
            self.alarm is not None
            and not self.settled
            and alarm is not None
            and alarm >= self.alarm
        ):
            self.next_step = min(self.next_step, step + self.min_every)

    def on_skip(self, step: int) -> None:
        """A measurement at ``step`` was skipped (e.g. a non-finite loss): back off.

        Without this a trigger that fires until it sees a record would retry on every step;
        each skip in a row doubles (``factor``) the wait, up to ``max_every``.
        """
        self.interval = min(self.max_every, max(self.min_every, self.interval * self.factor))
        self.next_step = step + max(1, round(self.interval))

    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "next_step": self.next_step,
            "previous": self.previous,
            "settled": self.settled,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.interval = float(state["interval"])
        self.next_step = int(state["next_step"])
        self.previous = None if state["previous"] is None else float(state["previous"])
        self.settled = bool(state["settled"])

    def __repr__(self) -> str:
        return (f"Adaptive(min_every={self.min_every}, max_every={self.max_every}, factor={self.factor}, "
                f"settled_factor={self.settled_factor})")


def as_trigger(value, name: str = "measure_every") -> Trigger | None:
    """Normalise an int (every n steps), a callable trigger or None (never)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a trigger callable or None, got {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"{name} must be a positive number of steps, got {value}")
        return Every(value)
    if callable(value):
        return value
    raise TypeError(
        f"{name} must be an int, a trigger callable or None, got {type(value).__name__}"
    )
