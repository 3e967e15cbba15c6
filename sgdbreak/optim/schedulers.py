"""Learning-rate schedulers that read the run's measurements.

:class:`MonitoredLR` sets every group's learning rate to ``base_lr · lr_lambda(monitor)``
where ``monitor`` is the :class:`~sgdbreak.BreakEvenMonitor` of the run, so a schedule
can depend on λ1^H, the noise spectrum or break-even (``monitor.latest_full``,
``monitor.break_even``). It advances at most once per optimizer step, keyed to the
monitor's step counter: ``accelerate``'s ``AcceleratedScheduler`` calls ``step()``
once per process on every training step, and a repeated call must not advance the
schedule again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from ..measurement.monitor import BreakEvenMonitor
from .wrappers import unwrap_optimizer

__all__ = ["MonitoredLR", "find_monitor"]


def find_monitor(optimizer: torch.optim.Optimizer) -> BreakEvenMonitor:
    """The monitor behind ``optimizer`` (``BreakEvenSGD`` itself or wrapped by Accelerate)."""
    monitor = getattr(unwrap_optimizer(optimizer), "monitor", None)
    if isinstance(monitor, BreakEvenMonitor):
        return monitor
    raise ValueError(
        f"{type(optimizer).__name__} has no BreakEvenMonitor: use sgdbreak.BreakEvenSGD with a "
        "probe, or pass monitor= (e.g. BreakEvenMonitor(probe).attach(optimizer))"
    )


class MonitoredLR(LRScheduler):
    """Learning rate ``base_lr · lr_lambda(monitor)``, re-evaluated once per optimizer step.

    Args:
        optimizer: the optimizer (``BreakEvenSGD``, a monitored optimizer, or either
            wrapped by ``accelerator.prepare``).
        lr_lambda: ``monitor -> factor``; a finite factor ≥ 0. It sees the measurements up
            to the optimizer step just taken.
        monitor: the run's monitor; default the one behind ``optimizer``.
        last_epoch: as in :class:`torch.optim.lr_scheduler.LRScheduler`.

    Example:
        >>> # 10x smaller steps until break-even is detected, the full lr after:
        >>> # sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.1)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lr_lambda: Callable[[BreakEvenMonitor], float],
        *,
        monitor: BreakEvenMonitor | None = None,
        last_epoch: int = -1,
    ) -> None:
        if not callable(lr_lambda):
            raise TypeError(f"lr_lambda must be callable, got {type(lr_lambda).__name__}")
        if monitor is not None and not isinstance(monitor, BreakEvenMonitor):
            raise TypeError(f"monitor must be a BreakEvenMonitor, got {type(monitor).__name__}")
        self.lr_lambda = lr_lambda
        self.monitor = monitor if monitor is not None else find_monitor(optimizer)
        self.monitor_step: int | None = None  # monitor step the schedule last advanced at
        super().__init__(optimizer, last_epoch)

    def step(self, epoch: int | None = None) -> None:
        """Advance once per optimizer step; repeated calls within a step do nothing."""
        if epoch is not None:
            raise ValueError("MonitoredLR follows the optimizer's steps; step(epoch) is not supported")
        if self.monitor_step is not None and self.monitor.step == self.monitor_step:
            return
        self.monitor_step = self.monitor.step
        super().step()

    def get_lr(self) -> list[float | Tensor]:
        factor = self.lr_lambda(self.monitor)
        if isinstance(factor, bool) or not isinstance(factor, int | float) or not math.isfinite(factor) or factor < 0:
            raise ValueError(f"lr_lambda must return a finite number >= 0, got {factor!r}")
        return [float(base) * float(factor) for base in self.base_lrs]

    def state_dict(self) -> dict[str, Any]:
        """Counters and base learning rates; not ``lr_lambda`` nor the monitor (saved with the optimizer)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambda", "monitor")}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.__dict__.update(state_dict)
