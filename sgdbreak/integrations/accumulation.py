"""``BreakEvenAccumulation``: the batch-size controller on several processes, by gradient accumulation.

Under Accelerate the per-process micro-batch ``b`` stays fixed (no re-sharding, no new
DataLoader) and the global batch ``S = P·A·b`` grows through the number ``A`` of
gradient-accumulation steps: the controller's S is turned into ``A = S/(P·b)`` at each
optimizer-step boundary by setting ``accelerator.gradient_accumulation_steps``. The
monitor sits inside the optimizer's ``step``, which Accelerate calls only on synchronising
micro-steps, so it counts optimizer steps, not micro-steps.

Use :meth:`BreakEvenAccumulation.accumulate` where ``accelerator.accumulate`` would go::

    accumulation = BreakEvenAccumulation(accelerator, optimizer, micro_batch_size=b,
                                         batch_size=S0, max_batch_size=S_max,
                                         micro_batches_per_epoch=len(loader))
    for x, y in loader:
        with accumulation.accumulate(model):
            accelerator.backward(loss_fn(model(x), y))
            optimizer.step(); optimizer.zero_grad()

With ``micro_batches_per_epoch`` (``len`` of the prepared DataLoader: micro-batches per
process per epoch) the last step of an epoch takes the micro-batches that are left, and its gradient is their mean (``accelerator.backward`` divides by that
count), exactly as a single process with a smaller last batch; without it Accelerate
ends the step at the end of the data with a gradient scaled by (micro-steps taken)/A.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from .. import _validation as V
from ..optim.batch_size import BatchSizeController

__all__ = ["BreakEvenAccumulation"]


class BreakEvenAccumulation:
    """Gradient-accumulation steps that follow the batch-size controller, under Accelerate.

    Args:
        accelerator: the ``accelerate.Accelerator``.
        optimizer: the (prepared) monitored optimizer.
        micro_batch_size: ``b``, examples per process per micro-step (the DataLoader's batch).
        batch_size: S0, the global batch before break-even; a multiple of ``P·b``.
        max_batch_size: upper bound on the global batch.
        lr_rule: as for :class:`~sgdbreak.optim.batch_size.BatchSizeController`.
        micro_batches_per_epoch: micro-batches per process per epoch (``len`` of the prepared
            DataLoader): each epoch's last step is then the mean over the micro-batches left;
            None: Accelerate's own end-of-data step.
        noise: a :class:`~sgdbreak.ReplicaNoise` to read ``gns_replica`` from (its
            ``accumulation_steps`` is kept equal to A), or None for the monitor's ``gns``.
        **controller_kwargs: ``smoothing=``, ``edge_margin=``, ``monitor=`` of the controller.

    ``state_dict`` holds the controller and the position in the epoch; save at a
    synchronising step (as Accelerate's ``save_state`` expects) and register this object
    with ``accelerator.register_for_checkpointing``.
    """

    def __init__(self, accelerator: Any, optimizer: torch.optim.Optimizer, *, micro_batch_size: int,
                 batch_size: int, max_batch_size: int, lr_rule: str = "sqrt", micro_batches_per_epoch: int | None = None,
                 noise: Any = None, **controller_kwargs: Any) -> None:
        self.accelerator = accelerator
        self.processes = int(accelerator.num_processes)
        self.micro_batch_size = V.integer("micro_batch_size", micro_batch_size, 1)
        self.controller = BatchSizeController(
            optimizer, batch_size=batch_size, max_batch_size=max_batch_size, lr_rule=lr_rule,
            micro_batch_size=self.processes * self.micro_batch_size, noise=noise, **controller_kwargs)
        self.noise = noise
        self.micro_batches_per_epoch = V.optional_integer("micro_batches_per_epoch", micro_batches_per_epoch, 1)
        self.position = 0  # micro-batches taken in the epoch in progress
        self.micro_step = 0  # micro-steps taken in the optimizer step in progress
        self.steps = self.controller.accumulation_steps  # A of the step in progress

    @property
    def batch_size(self) -> int:
        """The global batch S of the next optimizer step."""
        return self.controller.batch_size

    @property
    def accumulation_steps(self) -> int:
        """A of the optimizer step in progress (fewer at an epoch's end)."""
        return self.steps

    @contextlib.contextmanager
    def accumulate(self, *models: torch.nn.Module) -> Iterator[None]:
        """``accelerator.accumulate(*models)`` with A set at the start of each optimizer step."""
        if self.micro_step == 0:
            self.controller.update()
            steps = self.controller.accumulation_steps
            if self.micro_batches_per_epoch is not None:
                steps = min(steps, self.micro_batches_per_epoch - self.position)
            self.steps = steps
            self.accelerator.gradient_accumulation_steps = steps
            self.accelerator.step = 0  # the next sync comes after `steps` micro-steps
            if self.noise is not None:
                self.noise.accumulation_steps = steps
        with self.accelerator.accumulate(*models):
            yield
        self.position += 1
        if self.micro_batches_per_epoch is not None and self.position >= self.micro_batches_per_epoch:
            self.position = 0
        self.micro_step = 0 if self.accelerator.sync_gradients else self.micro_step + 1

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """The controller and the epoch position (call at a synchronising step)."""
        if self.micro_step:
            raise RuntimeError("save the accumulation state at a synchronising step (after optimizer.step())")
        return {"controller": self.controller.state_dict(), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.controller.load_state_dict(state["controller"])
        self.position = int(state["position"])
        self.micro_step = 0
        self.steps = self.controller.accumulation_steps
