"""Optimizers and schedulers that measure and act: ``BreakEvenSGD`` (``sgd``),
``BreakEvenAdam``/``BreakEvenAdamW`` (``adam``; the shared shell in ``monitored``), the
schedulers that read the monitor (``schedulers``), the batch-size controller and its batch
sampler (``batch_size``, ``batch_sampler``) and optimizer unwrapping (``wrappers``).
"""

from .adam import BreakEvenAdam, BreakEvenAdamW
from .batch_sampler import BreakEvenBatchSampler
from .batch_size import BatchSizeController
from .schedulers import MonitoredLR
from .sgd import BreakEvenSGD
from .suggest import EdgeEstimate, edge_learning_rate, suggest_lr
from .warmup import BreakEvenWarmup
from .wrappers import unwrap_optimizer

__all__ = ["BatchSizeController", "BreakEvenAdam", "BreakEvenAdamW", "BreakEvenBatchSampler", "BreakEvenSGD", "BreakEvenWarmup", "EdgeEstimate", "MonitoredLR",
           "edge_learning_rate", "suggest_lr", "unwrap_optimizer"]
