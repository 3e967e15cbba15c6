"""``BreakEvenWarmup``: an early-phase learning rate that rides just below the edge of stability.

Warmup works by letting the sharpness fall until a large target learning rate is stable
(Gilmer et al. 2022; Kalra & Barkeshli 2024); the break-even paper says the learning rate
used before break-even decides the curvature and noise of the rest of training. This
scheduler turns that into a policy with nothing to tune: the learning rate in the
parameter groups is the *target*; until the target is reached or break-even has passed,
the scheduler sets

    η_t = min(target, margin · η_edge),   η_edge = lr / stability_ratio of the latest
                                          certified measurement,

so training stays just below the edge while the sharpness falls, and the rate climbs to
the target as fast as stability allows. Then it hands over to ``after`` (any torch
scheduler), which runs from its own start.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from .. import _validation as V
from ..measurement.monitor import BreakEvenMonitor
from .schedulers import find_monitor
from .suggest import edge_learning_rate
from .wrappers import unwrap_optimizer

__all__ = ["BreakEvenWarmup"]


class BreakEvenWarmup(LRScheduler):
    """Learning rate at ``margin`` of the edge of stability until the target, then ``after``.

    Constructing it measures the edge at the initial weights (one Lanczos solve, nothing
    recorded) and sets every group's lr to ``min(target, margin · η_edge)`` scaled per group
    (all groups get the same fraction of their target). After each optimizer step it reads
    the records the monitor took since the last step:

    * a full measurement with a converged ``stability_ratio`` r at lr η gives η_edge = η/r,
      and the fraction becomes ``margin · η_edge / target`` (up or down);
    * between full measurements the cheap signal's ``stability_ratio_update`` can only
      *lower* it (before break-even): the curvature along the update is at most λ1^H, so
      its edge is an upper bound;
    * two full measurements in a row above the edge (a catapult that does not resolve) or
      a skipped measurement (a non-finite loss) multiply the fraction by ``backoff``.

    When the fraction reaches 1 (the target is stable) ``after`` starts, from its own start
    (without ``after`` the lr is the target), but until break-even has passed the edge
    still caps it: the lr is ``after``'s times ``min(1, margin · η_edge / after's lr)``, so
    progressive sharpening after a transient drop of the sharpness (a catapult) cannot
    push the run over the edge. When break-even has been detected and a later full
    measurement is back below the edge, the cap in force is frozen into ``after``'s base
    learning rates and ``after`` runs free; a target above the edge is never forced on
    the run (event ``warmup_release``). Phase changes are events of
    the monitor (``warmup_start``, ``warmup_backoff``, ``warmup_handoff``); the lr in force
    is in every record.

    Advances at most once per optimizer step (safe under Accelerate's per-process calls);
    ``state_dict`` holds everything, ``after``'s state included.

    Args:
        optimizer: a monitored optimizer (``BreakEvenSGD``, ``BreakEvenAdam(W)``, one with an
            attached monitor via ``monitor=``, or any of them wrapped by Accelerate).
        after: the scheduler to hand over to, built on the same optimizer, or None.
        margin: fraction of the edge to ride at, in (0, 1].
        backoff: factor applied on a non-finite loss or an unresolved catapult, in (0, 1).
        monitor: the run's monitor (default: the one behind ``optimizer``).
        tol, max_hvps: accuracy and budget of the initial edge measurement.

    Example:
        >>> # opt = BreakEvenSGD(model.parameters(), lr=1.0, momentum=0.9, probe=probe)
        >>> # sched = BreakEvenWarmup(opt, after=CosineAnnealingLR(opt, T_max=10_000))
        >>> # for batch in loader: ...; opt.step(); sched.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        after: LRScheduler | None = None,
        margin: float = 0.9,
        backoff: float = 0.5,
        monitor: BreakEvenMonitor | None = None,
        tol: float = 1e-3,
        max_hvps: int = 60,
    ) -> None:
        self.margin = V.real("margin", margin, positive=True)
        self.backoff = V.real("backoff", backoff, positive=True)
        if self.margin > 1 or self.backoff >= 1:
            raise ValueError(f"margin must be in (0, 1] and backoff in (0, 1), got {margin!r}, {backoff!r}")
        if monitor is not None and not isinstance(monitor, BreakEvenMonitor):
            raise TypeError(f"monitor must be a BreakEvenMonitor, got {type(monitor).__name__}")
        self.monitor = monitor if monitor is not None else find_monitor(optimizer)
        if after is not None:
            if not isinstance(after, LRScheduler):
                raise TypeError(f"after must be a torch LR scheduler, got {type(after).__name__}")
            if unwrap_optimizer(after.optimizer) is not unwrap_optimizer(optimizer):
                raise ValueError("after is bound to another optimizer: build it on the same optimizer")
        self.after = after
        targets = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        bad = [t for t in targets if not (math.isfinite(t) and t > 0)]
        if bad:
            raise ValueError(f"target learning rates must be > 0 (the lr in the param groups), got {targets}")
        group = self.monitor.group
        start = edge_learning_rate(self.monitor, margin=self.margin, tol=tol, max_hvps=max_hvps)
        self.fraction = min(1.0, start.lr / targets[group])
        self.edge_lr = start.edge_lr
        self.phase = "warmup"
        self.seen_step = self.monitor.step  # records up to here are not the warmup's
        self.above_edge = 0  # full measurements in a row with stability_ratio >= 1
        self.monitor_step: int | None = None
        self.monitor.log_event({"event": "warmup_start", "step": self.monitor.step, "edge_lr": start.edge_lr,
                                start.sharpness_key: start.sharpness, "lr": self.fraction * targets[group],
                                "target_lr": targets[group], "hessian_converged": float(start.converged)})
        super().__init__(optimizer)  # its first step() sets the starting lr (or hands over)

    # ------------------------------------------------------------------ stepping
    def step(self, epoch: int | None = None) -> None:
        """Advance once per optimizer step; repeated calls within a step do nothing."""
        if epoch is not None:
            raise ValueError("BreakEvenWarmup follows the optimizer's steps; step(epoch) is not supported")
        if self.monitor_step is not None and self.monitor.step == self.monitor_step:
            return
        self.monitor_step = self.monitor.step
        if self.phase == "after":
            self._last_lr = list(self._advance_after())
            return
        if self.phase == "guarded":  # ``after`` runs, capped by the edge until break-even
            uncapped = self._advance_after()
            self._follow_measurements(uncapped[self.monitor.group])
            self._set_lrs([lr * self.fraction for lr in uncapped])
            if self._break_even_settled():
                self._hand_over("break_even", scale=self.fraction, event="warmup_release")
            return
        self._follow_measurements(float(self.base_lrs[self.monitor.group]))
        super().step()
        if self.fraction >= 1.0:
            self.phase = "guarded"
            self._set_lrs(self._advance_after(start=True))
            self.monitor.log_event({"event": "warmup_handoff", "step": self.monitor.step, "reason": "target",
                                    "fraction": 1.0, "lr": self._last_lr[self.monitor.group]})
        elif self._break_even_settled():
            self._hand_over("break_even", scale=self.fraction)

    def _advance_after(self, *, start: bool = False) -> list[float]:
        """``after``'s own (uncapped) learning rates, one step on (its start when ``start``)."""
        if self.after is None:
            return [float(lr) for lr in self.base_lrs]
        if not start:
            for group, lr in zip(self.optimizer.param_groups, self.after.get_last_lr()):
                group["lr"] = lr  # chainable schedulers step from the group's lr
            self.after.step()
        return [float(lr) for lr in self.after.get_last_lr()]

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs):
            group["lr"] = lr
        self._last_lr = list(lrs)

    def get_lr(self) -> list[float | Tensor]:
        return [base * self.fraction for base in self.base_lrs]

    def _follow_measurements(self, group_target: float) -> None:
        """Move the fraction of ``group_target`` to ``margin`` of the edge seen since the last step."""
        records = [r for r in self.monitor.history if r["step"] > self.seen_step]
        events = [e for e in self.monitor.events if e.get("event") == "skipped" and e["step"] > self.seen_step]
        self.seen_step = self.monitor.step
        for record in records:
            ratio = _certified_ratio(record, cheap_ok=not self.monitor.break_even.reached)
            if ratio is None:
                continue
            edge = record["lr"] / ratio if ratio > 0 else math.inf
            # The fraction of group_target at margin of the edge (any fraction of a zero lr is 0).
            allowed = self.margin * edge / group_target if group_target > 0 else math.inf
            if "stability_ratio" not in record:  # the cheap signal: an upper bound on the edge
                self.fraction = min(self.fraction, allowed)
                continue
            self.above_edge = self.above_edge + 1 if ratio >= 1 else 0
            if self.above_edge >= 2:
                self._back_off(record["step"], "catapult does not resolve")
                continue
            self.edge_lr = edge
            self.fraction = min(1.0, allowed)
        if events:
            self._back_off(events[-1]["step"], events[-1].get("reason", "skipped measurement"))

    def _back_off(self, step: float, reason: str) -> None:
        self.fraction *= self.backoff
        self.above_edge = 0
        self.monitor.log_event({"event": "warmup_backoff", "step": step, "reason": reason,
                                "fraction": self.fraction})

    def _break_even_settled(self) -> bool:
        """Break-even detected, and a full measurement after it is back below the edge."""
        result = self.monitor.break_even
        if not result.reached or result.detected_at is None:
            return False
        return any(r["step"] > result.detected_at and 0 <= r.get("stability_ratio", math.inf) < 1
                   for r in self.monitor.history)

    def _hand_over(self, reason: str, scale: float = 1.0, event: str = "warmup_handoff") -> None:
        """``after`` runs free from here, its rates scaled by ``scale`` (the cap in force)."""
        self.phase = "after"
        if self.after is not None:
            self.after.base_lrs = [base * scale for base in self.after.base_lrs]
            lrs = [float(lr) * scale for lr in self.after.get_last_lr()]
            self.after._last_lr = list(lrs)
        else:
            lrs = [float(base) * scale for base in self.base_lrs]
        self._set_lrs(lrs)
        self.monitor.log_event({"event": event, "step": self.monitor.step, "reason": reason,
                                "fraction": self.fraction, "lr": lrs[self.monitor.group]})

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Counters, the fraction and phase, and ``after``'s state; not the monitor or optimizer."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "monitor", "after")}
        state["after"] = None if self.after is None else self.after.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        after = state.pop("after", None)
        if (after is None) != (self.after is None):
            raise ValueError("the state was saved with a different `after` scheduler (present vs absent)")
        if after is not None and self.after is not None:
            self.after.load_state_dict(after)
        self.__dict__.update(state)


def _certified_ratio(record: dict[str, float], *, cheap_ok: bool) -> float | None:
    """A stability ratio the policy may act on: converged Lanczos, or the calibrated cheap signal."""
    if "stability_ratio" in record:
        converged = record.get("hessian_converged", record.get("preconditioned_converged", 1.0))
        return record["stability_ratio"] if converged >= 0.5 else None
    if cheap_ok and "stability_ratio_update" in record:
        return record["stability_ratio_update"]
    return None
