"""``BreakEvenBatchSampler``: a ``torch.utils.data`` batch sampler whose size follows break-even.

For ``DataLoader(dataset, batch_sampler=BreakEvenBatchSampler(...))`` on one process. Each
batch's size is the :class:`~sgdbreak.optim.batch_size.BatchSizeController`'s S when the
DataLoader asks for it (after the previous optimizer step), and the learning rate is
rescaled at the same moment. Epochs are kept whole: an epoch is one pass over the
sampler's order, cut into consecutive batches of the size in force, so no example is
skipped or repeated within an epoch whatever the size changes (the last batch of an epoch
holds what is left, or is dropped with ``drop_last``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import Sampler

from .. import _validation as V
from .batch_size import BatchSizeController

__all__ = ["BreakEvenBatchSampler"]


class BreakEvenBatchSampler(Sampler[list[int]]):
    """Batches of a size that grows after break-even towards the gradient-noise scale.

    Args:
        sampler: a torch ``Sampler`` (or any re-iterable of indices: one epoch per pass; its
            ``set_epoch`` is called if it has one) or a dataset length N (then each epoch is
            a permutation of ``range(N)`` from ``seed + epoch``, or ``range(N)`` without
            ``shuffle``).
        optimizer: a monitored optimizer (see :class:`~sgdbreak.optim.batch_size.BatchSizeController`).
        batch_size: S0, the batch size until break-even (>= 1).
        max_batch_size: upper bound on S (>= S0); sizes are S0·2^j.
        lr_rule: ``"linear"``, ``"sqrt"``, ``"adascale"`` or ``"none"``: how the learning
            rate follows S (documented in :mod:`sgdbreak.optim.batch_size`).
        drop_last: drop an epoch's last batch when it is smaller than the size in force.
        shuffle, seed: for an integer ``sampler`` only.
        **controller_kwargs: ``noise=``, ``smoothing=``, ``edge_margin=``, ``monitor=`` of the controller.

    The controller advances when the DataLoader asks for a batch, so with
    ``num_workers=0`` the size and lr change exactly between optimizer steps. Worker
    processes prefetch index batches: sizes then lag by the prefetched batches and the lr
    changes up to that many steps before the first larger batch arrives.

    ``state_dict`` holds the epoch, the position in it (indices handed out), the order of an
    epoch drawn from a ``Sampler`` and the controller: after ``load_state_dict`` the next
    iteration continues the epoch in progress, exactly (with ``num_workers=0``; with
    workers, batches prefetched at save time count as seen).

    Example:
        >>> # opt = sgdbreak.BreakEvenSGD(model.parameters(), lr=0.05, probe=probe)
        >>> # batches = sgdbreak.BreakEvenBatchSampler(len(train), opt, batch_size=32,
        >>> #                                          max_batch_size=1024, lr_rule="sqrt")
        >>> # loader = DataLoader(train, batch_sampler=batches)
        >>> # for epoch in range(10):
        >>> #     for x, y in loader: opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
    """

    def __init__(
        self,
        sampler: Sampler[int] | Any,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int,
        max_batch_size: int,
        lr_rule: str = "sqrt",
        drop_last: bool = False,
        shuffle: bool = True,
        seed: int = 0,
        **controller_kwargs: Any,
    ) -> None:
        if isinstance(sampler, bool):
            raise TypeError("sampler must be a torch Sampler (or iterable of indices) or a dataset length")
        if isinstance(sampler, int):
            self.length = V.integer("sampler (a dataset length)", sampler, 1)
            self.sampler = None
        elif hasattr(sampler, "__iter__"):
            self.sampler = sampler
            self.length = None  # type: ignore[assignment]  # only read when sampler is None
        else:
            raise TypeError(f"sampler must be a torch Sampler (or iterable of indices) or a dataset length, "
                            f"got {type(sampler).__name__}")
        if not isinstance(drop_last, bool) or not isinstance(shuffle, bool):
            raise TypeError(f"drop_last and shuffle must be bools, got {drop_last!r}, {shuffle!r}")
        self.drop_last, self.shuffle = drop_last, shuffle
        self.seed = V.integer("seed", seed, 0)
        self.controller = BatchSizeController(optimizer, batch_size=batch_size, max_batch_size=max_batch_size,
                                              lr_rule=lr_rule, **controller_kwargs)
        self.epoch = 0
        self.position = 0
        self._order: torch.Tensor | None = None  # the epoch in progress

    # ------------------------------------------------------------------ torch protocol
    @property
    def batch_size(self) -> int:
        """The size of the next batch (the controller's S)."""
        return self.controller.batch_size

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at the next iteration (unless it is the epoch in progress)."""
        epoch = V.integer("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch, self.position, self._order = epoch, 0, None

    def _epoch_order(self) -> torch.Tensor:
        if self.sampler is None:
            if not self.shuffle:
                return torch.arange(self.length)
            return torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(self.epoch)
        return torch.as_tensor([int(i) for i in self.sampler], dtype=torch.int64)

    def __iter__(self) -> Iterator[list[int]]:
        if self._order is not None and self.position >= len(self._order):  # handed out, not closed
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order, self.position = self._epoch_order(), 0
        order = self._order
        while self.position < len(order):
            self.controller.update()
            size = self.controller.batch_size
            left = len(order) - self.position
            if left < size and self.drop_last:
                break
            batch = order[self.position:self.position + size].tolist()
            self.position += len(batch)
            yield batch
        self.epoch, self.position, self._order = self.epoch + 1, 0, None

    def __len__(self) -> int:
        """Batches left in the epoch in progress (or a whole epoch) at the size in force now.

        The size can grow within the epoch, so fewer batches may come: an estimate for
        progress bars.
        """
        total = len(self._order) if self._order is not None else (
            self.length if self.sampler is None else len(self.sampler))  # type: ignore[arg-type]  # sized when len() is asked
        left = total - self.position
        size = self.controller.batch_size
        return left // size if self.drop_last else math.ceil(left / size)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Epoch, position, the order of a sampler's epoch in progress, and the controller."""
        keep_order = self._order is not None and self.sampler is not None
        return {"epoch": self.epoch, "position": self.position,
                "order": self._order.clone() if keep_order and self._order is not None else None,
                "in_progress": self._order is not None,
                "length": self.length, "seed": self.seed, "shuffle": self.shuffle,
                "controller": self.controller.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output; the next iteration continues the saved epoch."""
        if not isinstance(state, Mapping) or "controller" not in state:
            raise ValueError("malformed BreakEvenBatchSampler state (no 'controller')")
        if (state["length"], state["seed"], state["shuffle"]) != (self.length, self.seed, self.shuffle):
            raise ValueError(f"the state was saved for length={state['length']}, seed={state['seed']}, "
                             f"shuffle={state['shuffle']}; this sampler has length={self.length}, "
                             f"seed={self.seed}, shuffle={self.shuffle}")
        self.controller.load_state_dict(state["controller"])
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        if not state["in_progress"]:
            self._order = None
        elif state["order"] is not None:
            self._order = torch.as_tensor(state["order"], dtype=torch.int64).clone()
        else:
            self._order = self._epoch_order()
