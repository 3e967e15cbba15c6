"""``BreakEvenSGD``: a drop-in ``torch.optim.SGD`` that measures itself.

The update is torch's own (``super().step()``); measurement happens after it, on the
probe, through a :class:`~sgdbreak.measurement.monitor.BreakEvenMonitor`. With ``probe=None`` the
class is ``torch.optim.SGD`` bit for bit, and even with measurement on the parameter
trajectory is unchanged: measuring never touches ``p.grad``, the global RNG, module modes
or buffers, and restores the parameters exactly.
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

__all__ = ["BreakEvenSGD"]

_STATE_KEY = "sgdbreak"


class BreakEvenSGD(torch.optim.SGD):
    """SGD (torch's, unchanged) plus online λ1^H, noise spectrum and break-even detection.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach,
            differentiable, fused: exactly as :class:`torch.optim.SGD`.
        probe: a :class:`~sgdbreak.Probe` to measure on; None turns measurement off.
        measure_every: full-measurement trigger (int steps, a ``step -> bool`` callable,
            None, or the adaptive default); see :class:`~sgdbreak.measurement.monitor.BreakEvenMonitor`.
        **monitor_kwargs: any other :class:`~sgdbreak.measurement.monitor.BreakEvenMonitor` argument
            (``cheap_every``, ``measurements``, ``dataset_size``, ``batch_size``,
            ``loggers``, ``detector``, ``seed``, …).

    Example:
        >>> model = torch.nn.Linear(4, 2)
        >>> data = (torch.randn(64, 4), torch.randint(0, 2, (64,)))
        >>> probe = Probe(model, torch.nn.CrossEntropyLoss(), data)
        >>> opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=probe, measure_every=5)
        >>> for _ in range(5):
        ...     opt.zero_grad()
        ...     torch.nn.functional.cross_entropy(model(data[0]), data[1]).backward()
        ...     _ = opt.step()
        >>> sorted(k for k in opt.latest if k.startswith("lambda1"))
        ['lambda1_H', 'lambda1_H_update', 'lambda1_K']
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        probe: Probe | None = None,
        measure_every: Any = "default",
        **monitor_kwargs: Any,
    ):
        if probe is not None and not isinstance(probe, Probe):
            raise TypeError(f"probe must be a sgdbreak.Probe or None, got {type(probe).__name__}")
        # Validate the monitor settings before torch builds its state (no partial object).
        monitor = None
        if probe is not None:
            monitor = BreakEvenMonitor(probe, measure_every=measure_every, **monitor_kwargs)
        elif monitor_kwargs:
            raise TypeError(f"monitor arguments {sorted(monitor_kwargs)} need a probe")
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self.monitor = monitor
        if monitor is not None:
            monitor.bind(self)  # group index, maximize, the probe's parameters

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        """One SGD step (torch's), then a measurement if a trigger fires."""
        if self.monitor is None:
            return super().step(closure)
        self.monitor.before_step()
        loss = super().step(closure)
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
        """The last full measurement (one holding ``lambda1_H``), or None."""
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
            raise RuntimeError("this BreakEvenSGD has no probe, so it takes no measurements")
        return self.monitor

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.monitor is not None:
            state[_STATE_KEY] = self.monitor.state_dict()
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load torch's SGD state and the measurements; all or nothing.

        The measurement state is checked first, so a checkpoint that does not fit raises
        before anything changes. A plain ``torch.optim.SGD`` checkpoint loads with a warning:
        it has no step count, so the monitor keeps its own.
        """
        state_dict = dict(state_dict)
        monitor_state = state_dict.pop(_STATE_KEY, None)
        if monitor_state is not None and self.monitor is None:
            raise ValueError("the state holds sgdbreak measurements but this optimizer has no probe")
        load_monitor = self.monitor.prepare_load(monitor_state) if monitor_state is not None else None
        super().load_state_dict(state_dict)
        if load_monitor is not None:
            load_monitor()
        elif self.monitor is not None:
            warnings.warn(
                "the checkpoint holds no sgdbreak state (saved by torch.optim.SGD?): the monitor "
                f"keeps its step count ({self.monitor.step}) and history. Set opt.monitor.step to "
                "the number of steps already taken so triggers and records continue from there",
                RuntimeWarning, stacklevel=2)

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        # torch keeps only defaults, state and param_groups; the monitor is ours to keep.
        return {**super().__getstate__(), "monitor": self.monitor}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also called by torch's load_state_dict, without "monitor"
        if "monitor" not in self.__dict__:
            self.monitor = None
