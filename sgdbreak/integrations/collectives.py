"""Processes and collectives: world size checks, the main process, counted all-reduces.

DDP does not reduce gradients taken with ``torch.autograd.grad``: every reduction a
measurement needs (losses, gradients, Hessian-vector products, samples) goes through
:class:`_Collectives`, which also counts the payload (:class:`CommunicationStats`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["CommunicationStats", "check_world_size", "is_main_process"]


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world(process_group=None) -> tuple[int, int]:
    """(world size, rank) of ``process_group``; (1, 0) without torch.distributed."""
    if not _initialized():
        return 1, 0
    return dist.get_world_size(process_group), dist.get_rank(process_group)


def check_world_size(expected: int | None = None, *, accelerator=None, process_group=None) -> int:
    """The number of connected processes, after checking it against the launcher's.

    Catches the two silent launch traps: ``accelerate launch --cpu --num_processes 2``
    starts ONE process, and forgetting ``Accelerator(cpu=True)`` (or
    ``ACCELERATE_USE_CPU=true``) on a machine without GPUs gives processes that run
    unconnected (each believes it is alone, while the launcher set ``WORLD_SIZE``).

    Args:
        expected: the world size the caller needs (e.g. a test's 2); None: no check.
        accelerator: an ``accelerate.Accelerator`` whose ``num_processes`` must agree.
        process_group: the torch.distributed group (default: the world).

    Returns:
        The world size.

    Raises:
        RuntimeError: the launcher, Accelerate, torch.distributed or ``expected`` disagree.
    """
    size, _ = _world(process_group)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    hint = ("on CPU launch with `accelerate launch --multi_gpu --num_processes N ...` and "
            "ACCELERATE_USE_CPU=true (or Accelerator(cpu=True)), or with "
            "`python -m torch.distributed.run --standalone --nproc_per_node N`")
    if process_group is None and launched != size:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but torch.distributed "
            f"connects {size}: the processes run unconnected; {hint}")
    if accelerator is not None and accelerator.num_processes != size:
        raise RuntimeError(
            f"Accelerate reports {accelerator.num_processes} processes but torch.distributed "
            f"connects {size}; {hint}")
    if expected is not None and expected != size:
        raise RuntimeError(f"expected {expected} processes, found {size}; {hint} "
                           "(`accelerate launch --cpu --num_processes N` starts only one)")
    return size


def is_main_process(accelerator=None) -> bool:
    """Whether this process should write files and log (rank 0; True on one process).

    Recipes create loggers and run directories only where this is True; every process
    still measures (the measurements are collective).
    """
    if accelerator is not None:
        return bool(accelerator.is_main_process)
    if _initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class CommunicationStats:
    """Payload this process handed to collectives (not counting the wire protocol).

    A ring all-reduce of ``b`` bytes moves about ``2 (P − 1)/P · b`` bytes per process; an
    all-gather whose output is ``b`` bytes moves ``(P − 1)/P · b``.

    Attributes:
        all_reduce_bytes: bytes of the tensors all-reduced.
        all_gather_bytes: bytes of the gathered outputs.
        calls: number of collectives.
    """

    all_reduce_bytes: int = 0
    all_gather_bytes: int = 0
    calls: int = 0

    def reset(self) -> None:
        """Zero the counters (e.g. before one measurement)."""
        self.all_reduce_bytes = self.all_gather_bytes = self.calls = 0

    def as_dict(self) -> dict[str, int]:
        return {"all_reduce_bytes": self.all_reduce_bytes, "all_gather_bytes": self.all_gather_bytes,
                "calls": self.calls}


class _Collectives:
    """All-reduce / all-gather on a process group, counting the payload."""

    def __init__(self, process_group=None):
        self.group = process_group
        self.size, self.rank = _world(process_group)
        self.stats = CommunicationStats()

    def sum(self, tensor: Tensor) -> Tensor:
        """Sum over processes (a new tensor; the input is untouched)."""
        out = tensor.detach().clone()
        if self.size > 1:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
            self.stats.all_reduce_bytes += out.numel() * out.element_size()
            self.stats.calls += 1
        return out

    def mean(self, tensor: Tensor) -> Tensor:
        """Mean over processes (the ``reduce_mean`` hook of a probe)."""
        out = self.sum(tensor)
        return out / self.size if self.size > 1 else out

    def gather(self, tensor: Tensor, *, count: bool = True) -> Tensor:
        """Stack every process's (equal-shape) tensor along a new first dimension."""
        tensor = tensor.detach().contiguous()
        if self.size == 1:
            return tensor.unsqueeze(0).clone()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        out = torch.stack(parts)
        if count:
            self.stats.all_gather_bytes += out.numel() * out.element_size()
            self.stats.calls += 1
        return out


def _unwrap_model(model: nn.Module, accelerator=None) -> nn.Module:
    if accelerator is not None:
        return accelerator.unwrap_model(model)
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model
