"""``BreakEvenSGD``: a drop-in ``torch.optim.SGD`` that measures itself.

The update is torch's own (``super().step()``); measurement happens after it, on the
probe, through a :class:`~sgdbreak.measurement.monitor.BreakEvenMonitor`. With ``probe=None`` the
class is ``torch.optim.SGD`` bit for bit, and even with measurement on the parameter
trajectory is unchanged: measuring never touches ``p.grad``, the global RNG, module modes
or buffers, and restores the parameters exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from ..measurement.probe import Probe
from .monitored import MonitoredOptimizerMixin, new_monitor

__all__ = ["BreakEvenSGD"]


class BreakEvenSGD(MonitoredOptimizerMixin, torch.optim.SGD):
    """SGD (torch's, unchanged) plus online λ1^H, noise spectrum and break-even detection.

    Args:
        params, lr, momentum, dampening, weight_decay, nesterov, maximize, foreach, differentiable, fused: exactly
            as :class:`torch.optim.SGD`.
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
        monitor = new_monitor(probe, measure_every, monitor_kwargs)
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                         nesterov=nesterov, maximize=maximize, foreach=foreach,
                         differentiable=differentiable, fused=fused)
        self._bind_monitor(monitor)
