"""``BreakEvenAdam`` and ``BreakEvenAdamW``: drop-in ``torch.optim.Adam``/``AdamW`` that measure themselves.

The update is torch's own; the measuring shell is the one of ``BreakEvenSGD``
(:class:`~sgdbreak.optim.monitored.MonitoredOptimizerMixin`). By default the monitor
measures λ1^H and Adam's preconditioned sharpness λ1_PH = λ1(P⁻¹H)
(:class:`~sgdbreak.PreconditionedSharpness`), whose ``stability_ratio`` is η·λ1_PH over
Adam's edge (2 + 2β1)/(1 − β1) (Cohen et al. 2022). ``maximize=True`` is refused with a
probe (see :meth:`~sgdbreak.BreakEvenMonitor.bind`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..measurement.probe import Probe
from .monitored import MonitoredOptimizerMixin, new_monitor

__all__ = ["BreakEvenAdam", "BreakEvenAdamW"]


class BreakEvenAdam(MonitoredOptimizerMixin, torch.optim.Adam):
    """Adam (torch's, unchanged) plus λ1^H, λ1_PH, the noise spectrum and break-even detection.

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, foreach, maximize, capturable, differentiable, fused, decoupled_weight_decay: exactly
            as :class:`torch.optim.Adam`.
        probe: a :class:`~sgdbreak.Probe` to measure on; None turns measurement off.
        measure_every: full-measurement trigger (int steps, a ``step -> bool`` callable,
            None, or the adaptive default); see :class:`~sgdbreak.BreakEvenMonitor`.
        **monitor_kwargs: any other :class:`~sgdbreak.BreakEvenMonitor` argument
            (``cheap_every``, ``quantities``, ``loggers``, ``detector``, ``seed``, …).
            Without ``quantities=`` the monitor measures the cheap signal, λ1^H, λ1_PH,
            the noise spectrum and ‖γ‖: λ1_PH costs a few Hessian-vector products more
            than λ1^H alone (warm-started, on the same graph).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        decoupled_weight_decay: bool = False,
        probe: Probe | None = None,
        measure_every: Any = "default",
        **monitor_kwargs: Any,
    ):
        monitor = new_monitor(probe, measure_every, monitor_kwargs)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable,
                         differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=decoupled_weight_decay)
        self._bind_monitor(monitor)


class BreakEvenAdamW(MonitoredOptimizerMixin, torch.optim.AdamW):
    """AdamW (torch's, unchanged) plus λ1^H, λ1_PH, the noise spectrum and break-even detection.

    The decoupled weight decay is not curvature: it shrinks θ by 1 − η·wd per step, which
    lowers Adam's edge slightly (:func:`~sgdbreak.measurement.breakeven.adam_stability_threshold`).

    Args:
        params, lr, betas, eps, weight_decay, amsgrad, maximize, foreach, capturable, differentiable, fused: exactly
            as :class:`torch.optim.AdamW`.
        probe: a :class:`~sgdbreak.Probe` to measure on; None turns measurement off.
        measure_every: full-measurement trigger (int steps, a ``step -> bool`` callable,
            None, or the adaptive default); see :class:`~sgdbreak.BreakEvenMonitor`.
        **monitor_kwargs: any other :class:`~sgdbreak.BreakEvenMonitor` argument
            (``cheap_every``, ``quantities``, ``loggers``, ``detector``, ``seed``, …).
            Without ``quantities=`` the monitor measures the cheap signal, λ1^H, λ1_PH,
            the noise spectrum and ‖γ‖: λ1_PH costs a few Hessian-vector products more
            than λ1^H alone (warm-started, on the same graph).
    """

    def __init__(
        self,
        params,
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float | torch.Tensor, float | torch.Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
        probe: Probe | None = None,
        measure_every: Any = "default",
        **monitor_kwargs: Any,
    ):
        monitor = new_monitor(probe, measure_every, monitor_kwargs)
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, foreach=foreach, capturable=capturable,
                         differentiable=differentiable, fused=fused)
        self._bind_monitor(monitor)
