"""Accelerate glue: make a monitor behave under ``accelerator.prepare`` and ``save_state``."""

from __future__ import annotations

import warnings

from ..optim.wrappers import unwrap_optimizer
from .collectives import check_world_size
from .distributed_probe import DistributedProbe

__all__ = ["prepare_monitor"]


def prepare_monitor(accelerator, optimizer=None, *, monitor=None, check: bool = True):
    """Make a run monitor behave under Accelerate; call after ``accelerator.prepare``.

    * finds the monitor (``BreakEvenSGD.monitor``, or ``monitor=`` for one attached to
      another optimizer) and, if it was attached to the ``AcceleratedOptimizer`` wrapper,
      moves its hooks to the inner optimizer (the wrapper calls the inner ``step`` only on
      synchronising steps, and not at all when the fp16 scaler skips a step, so
      measurements follow real updates);
    * registers a monitor that the optimizer's ``state_dict`` does not carry with
      ``accelerator.register_for_checkpointing`` (``BreakEvenSGD`` keeps it under the key
      ``"sgdbreak"``, so ``save_state`` / ``load_state`` already restore it);
    * with several processes: checks the probe is a :class:`DistributedProbe` (otherwise
      the processes would measure different probes and disagree) and that the weights
      agree, and drops loggers on processes other than the main one (with a warning:
      create them only where :func:`is_main_process`).

    Returns:
        The monitor.
    """
    from ..measurement.monitor import BreakEvenMonitor

    inner = unwrap_optimizer(optimizer) if optimizer is not None else None
    if monitor is None:
        monitor = getattr(inner, "monitor", None)
        if monitor is None:
            raise ValueError("no monitor: pass a BreakEvenSGD with a probe, or monitor=")
    if not isinstance(monitor, BreakEvenMonitor):
        raise TypeError(f"monitor must be a BreakEvenMonitor, got {type(monitor).__name__}")
    size = check_world_size(accelerator=accelerator) if check else accelerator.num_processes
    if optimizer is not None and monitor.optimizer is not None and monitor.optimizer is not inner:
        if unwrap_optimizer(monitor.optimizer) is inner:
            monitor.detach()
            monitor.attach(inner)
    carried = inner is not None and getattr(inner, "monitor", None) is monitor
    if not carried:
        accelerator.register_for_checkpointing(monitor)
    if size > 1:
        if not isinstance(monitor.probe, DistributedProbe):
            raise ValueError(
                f"{size} processes but the probe is a plain Probe: each process would measure "
                "its own data and the measurements (and triggers) would disagree; use "
                "sgdbreak.DistributedProbe")
        if check:
            monitor.probe.check_synchronized()
        if monitor.loggers and not accelerator.is_main_process:
            warnings.warn("sgdbreak: dropping the monitor's loggers on a non-main process; create "
                          "loggers only where sgdbreak.is_main_process()",
                          RuntimeWarning, stacklevel=2)
            monitor.loggers = []
    return monitor
