"""Finding the torch optimizer (and its monitor) inside wrappers such as Accelerate's."""

from __future__ import annotations

import torch

__all__ = ["unwrap_optimizer"]


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` wrappers."""
    seen = 0
    while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    return optimizer
