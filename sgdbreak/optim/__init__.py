"""Optimizers and schedulers that measure and act: ``BreakEvenSGD`` (``sgd``), the
schedulers that read the monitor (``schedulers``) and optimizer unwrapping (``wrappers``).
"""

from .schedulers import MonitoredLR
from .sgd import BreakEvenSGD
from .wrappers import unwrap_optimizer

__all__ = ["BreakEvenSGD", "MonitoredLR", "unwrap_optimizer"]
