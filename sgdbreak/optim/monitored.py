"""The measuring shell shared by ``BreakEvenSGD``, ``BreakEvenAdam`` and ``BreakEvenAdamW``.

:class:`MonitoredOptimizerMixin` goes before a torch optimizer in the bases; the update is
the torch class's own ``step`` and the mixin adds the monitor around it: the views of the
measurements, hooks, checkpointing (all or nothing) and copies that keep the monitor.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

from ..measurement.breakeven import BreakEvenResult
from ..measurement.monitor import BreakEvenMonitor
from ..measurement.probe import Probe

__all__ = ["MonitoredOptimizerMixin", "STATE_KEY"]

STATE_KEY = "sgdbreak"
"""Key of the measurement state inside the optimizer's ``state_dict``."""


def new_monitor(probe: Probe | None, measure_every: Any, monitor_kwargs: dict[str, Any]
                ) -> BreakEvenMonitor | None:
    """The monitor of a measuring optimizer, checked before torch builds its state (no partial object)."""
    if probe is not None and not isinstance(probe, Probe):
        raise TypeError(f"probe must be a sgdbreak.Probe or None, got {type(probe).__name__}")
    if probe is None:
        if monitor_kwargs:
            raise TypeError(f"monitor arguments {sorted(monitor_kwargs)} need a probe")
        return None
    return BreakEvenMonitor(probe, measure_every=measure_every, **monitor_kwargs)


class MonitoredOptimizerMixin:
    """Measures around the torch optimizer's ``step``; put it first in the bases.

    Subclasses build the monitor with :func:`new_monitor` before calling the torch
    constructor, then call :meth:`_bind_monitor`. With no probe the class is the torch
    optimizer bit for bit; with one the trajectory is still unchanged (measuring never
    touches ``p.grad``, the global RNG, module modes or buffers, and restores the
    parameters exactly).
    """

    monitor: BreakEvenMonitor | None

    def _bind_monitor(self, monitor: BreakEvenMonitor | None) -> None:
        self.monitor = monitor
        if monitor is not None:
            monitor.bind(self)  # type: ignore[arg-type]  # the mixin always comes with a torch Optimizer; group index, maximize, the probe's parameters, the quantities

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step of the torch optimizer, then a measurement if a trigger fires."""
        if self.monitor is None:
            return super().step(closure)  # type: ignore[misc]
        self.monitor.before_step()
        loss = super().step(closure)  # type: ignore[misc]
        with torch.enable_grad():
            self.monitor.after_step()
        return loss

    # ------------------------------------------------------------------ measurements
    @property
    def latest(self) -> Mapping[str, float] | None:
        """The last measurement record (glossary keys plus ``step``), or None."""
        return None if self.monitor is None else self.monitor.latest

    @property
    def latest_full(self) -> Mapping[str, float] | None:
        """The last full measurement (one holding ``lambda1_H`` or ``lambda1_PH``), or None."""
        return None if self.monitor is None else self.monitor.latest_full

    @property
    def history(self) -> list[dict[str, float]]:
        """All measurement records so far."""
        return [] if self.monitor is None else self.monitor.history

    @property
    def break_even(self) -> BreakEvenResult:
        """``.reached``, ``.step``, ``.rule`` and ``.evidence`` of the break-even detector."""
        if self.monitor is None:
            return BreakEvenResult(False, None, None, None, {})
        return self.monitor.break_even

    def register_break_even_hook(self, fn: Callable[[BreakEvenResult], None]) -> RemovableHandle:
        """Call ``fn(result)`` when break-even is detected."""
        return self._require_monitor().register_break_even_hook(fn)

    def register_measurement_hook(self, fn: Callable[[Mapping[str, float]], None]) -> RemovableHandle:
        """Call ``fn(record)`` after every measurement."""
        return self._require_monitor().register_measurement_hook(fn)

    def _require_monitor(self) -> BreakEvenMonitor:
        if self.monitor is None:
            raise RuntimeError(f"this {type(self).__name__} has no probe, so it takes no measurements")
        return self.monitor

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        if self.monitor is not None:
            state[STATE_KEY] = self.monitor.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load the torch optimizer's state and the measurements; all or nothing.

        The measurement state is checked first, so a checkpoint that does not fit raises
        before anything changes. A plain torch checkpoint loads with a warning: it has no
        step count, so the monitor keeps its own.
        """
        state_dict = dict(state_dict)
        monitor_state = state_dict.pop(STATE_KEY, None)
        if monitor_state is not None and self.monitor is None:
            raise ValueError("the state holds sgdbreak measurements but this optimizer has no probe")
        load_monitor = self._require_monitor().prepare_load(monitor_state) if monitor_state is not None else None
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if load_monitor is not None:
            load_monitor()
        elif self.monitor is not None:
            torch_name = next(c for c in type(self).__mro__ if c.__module__.startswith("torch.")).__name__
            warnings.warn(
                f"the checkpoint holds no sgdbreak state (saved by torch.optim.{torch_name}?): the "
                f"monitor keeps its step count ({self.monitor.step}) and history. Set "
                "opt.monitor.step to the number of steps already taken so triggers and records "
                "continue from there", RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the monitor is ours to keep.
        return {**super().__getstate__(), "monitor": self.monitor}  # type: ignore[misc]

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # type: ignore[misc]  # also called by torch's load_state_dict
        if "monitor" not in self.__dict__:
            self.monitor = None
