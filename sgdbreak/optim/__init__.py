"""Optimizers and schedulers that measure and act: ``BreakEvenSGD`` (``sgd``),
``BreakEvenAdam``/``BreakEvenAdamW`` (``adam``; the shared shell in ``monitored``), the
schedulers that read the monitor (``schedulers``) and optimizer unwrapping (``wrappers``).
"""

from .adam import BreakEvenAdam, BreakEvenAdamW
from .schedulers import MonitoredLR
from .sgd import BreakEvenSGD
from .suggest import EdgeEstimate, edge_learning_rate, suggest_lr
from .warmup import BreakEvenWarmup
from .wrappers import unwrap_optimizer

__all__ = ["BreakEvenAdam", "BreakEvenAdamW", "BreakEvenSGD", "BreakEvenWarmup", "EdgeEstimate", "MonitoredLR",
           "edge_learning_rate", "suggest_lr", "unwrap_optimizer"]
