"""``BreakEvenWarmup``: an early-phase learning rate that rises as fast as stability allows.

Warmup works by letting the sharpness fall until a large target learning rate is stable
(Gilmer et al. 2022; Kalra & Barkeshli 2024); the break-even paper says the learning rate
used before break-even decides the curvature and noise of the rest of training. This
scheduler turns that into a policy with nothing to tune per target: the learning rate in
the parameter groups is the *target*; until the target is reached or break-even has
passed, the scheduler sets

    η_t = min(target · ramp_t, margin · η_edge, limit),   ramp_t = min(1, start_fraction · 10^(t/rise_steps)),

where η_edge = lr / stability_ratio of the latest certified measurement: training stays
below the edge, and the rate never runs ahead of an exponential ramp, because an edge
measured now does not foresee the sharpening of the next steps. For Adam/AdamW the edge
(from the preconditioned λ1^PH) caps the rate only once the second moment v̂ has warmed up,
after 1/(1 − β2) steps; until then the ramp and the guards rule. Then it hands over to
``after`` (any torch scheduler), which runs from its own start.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler

from .. import _validation as V
from ..measurement import update_rules as ur
from ..measurement.monitor import BreakEvenMonitor
from .schedulers import find_monitor
from .suggest import edge_learning_rate
from .wrappers import unwrap_optimizer

__all__ = ["BreakEvenWarmup"]


class BreakEvenWarmup(LRScheduler):
    """Learning rate below ``margin`` of the edge, rising at most tenfold per ``rise_steps``.

    Constructing it measures the edge at the initial weights (one Lanczos solve, nothing
    recorded) and sets every group's lr to ``min(start_fraction · target, margin · η_edge)``
    (all groups get the same fraction of their target). After each optimizer step it reads
    the records the monitor took since the last step and moves the rate:

    * a full measurement with a converged ``stability_ratio`` r at lr η sets the edge to
      η/r; between full measurements the cheap signal's ``stability_ratio_update`` can only
      *lower* it (before break-even): the curvature along the update is at most λ1^H;
    * the rate is at most a ramp that starts at ``start_fraction`` of the target and rises
      tenfold per ``rise_steps`` steps (the edge measured at initialization says nothing
      of the progressive sharpening to come: on MNIST, jumping to a target 40× below it
      diverged), and at most ``margin`` of the edge;
    * two full measurements in a row above the edge (a catapult that does not resolve) or
      a skipped measurement (a non-finite loss) multiply the rate by ``backoff``, and the
      ramp starts again from there;
    * two full measurements in a row whose probe loss exceeds ``loss_rise`` × the lowest
      one seen multiply it by ``backoff`` and make the result a ceiling: a small batch can
      make training unstable below the full-batch edge, and the loss shows it;
    * for Adam/AdamW the edge (and the catapult rule above) binds only from step
      ``preconditioner_steps`` on (default 1/(1 − β2): 1,000 for β2 = 0.999). Before that
      P = (1 − β1^t)·diag(√v̂ + ε) comes from a few gradients: coordinates whose gradients
      were small so far have a tiny √v̂, and λ1^PH is 10⁵–10⁸ and jumps a thousandfold
      between measurements (MNIST CNN), while Adam's update in those coordinates stays
      bounded and constant-rate runs train well at measured ratios of ~50. Capping by it
      held Adam's rate at 10⁻³ of the target for tens of steps. Meanwhile the ramp, the
      loss guard and the non-finite back-off rule; the edge is still measured and logged.

    When the target is reached ``after`` starts, from its own start (without ``after`` the
    lr is the target), but until break-even has passed the same rules cap it: the lr is
    ``after``'s times a fraction ≤ 1, so progressive sharpening after a transient drop of
    the sharpness (a catapult) cannot push the run over the edge. When break-even has been
    detected and a later full measurement is back below the edge, the cap in force is
    frozen into ``after``'s base learning rates and ``after`` runs free; a target above the
    edge is never forced on the run (event ``warmup_release``). Phase changes are events of
    the monitor (``warmup_start``, ``warmup_backoff``, ``warmup_handoff``); the lr in force
    is in every record.

    Advances at most once per optimizer step (safe under Accelerate's per-process calls);
    ``state_dict`` holds everything, ``after``'s state included.

    Args:
        optimizer: a monitored optimizer (``BreakEvenSGD``, ``BreakEvenAdam(W)``, one with an
            attached monitor via ``monitor=``, or any of them wrapped by Accelerate).
        after: the scheduler to hand over to, built on the same optimizer, or None.
        margin: fraction of the edge to stay below, in (0, 1].
        backoff: factor applied on a non-finite loss, an unresolved catapult or a rising
            loss, in (0, 1).
        monitor: the run's monitor (default: the one behind ``optimizer``).
        start_fraction: the starting rate as a fraction of the target at most, in (0, 1].
        rise_steps: the fewest steps in which the rate may rise tenfold (≥ 1).
        loss_rise: the probe-loss factor that counts as rising (> 1), or None for no loss guard.
        tol, max_hvps: accuracy and budget of the initial edge measurement.
        preconditioner_steps: for optimizers measured by λ1^PH (Adam/AdamW), the steps
            before the edge may cap the rate (≥ 0); None: ``ceil(1/(1 − β2))`` of the
            measured group. Ignored for SGD (its edge binds from the start).

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
        start_fraction: float = 0.1,
        rise_steps: int = 100,
        loss_rise: float | None = 2.0,
        tol: float = 1e-3,
        max_hvps: int = 60,
        preconditioner_steps: int | None = None,
    ) -> None:
        self.margin = V.real("margin", margin, positive=True)
        self.backoff = V.real("backoff", backoff, positive=True)
        if self.margin > 1 or self.backoff >= 1:
            raise ValueError(f"margin must be in (0, 1] and backoff in (0, 1), got {margin!r}, {backoff!r}")
        self.start_fraction = V.real("start_fraction", start_fraction, positive=True)
        if self.start_fraction > 1:
            raise ValueError(f"start_fraction must be in (0, 1], got {start_fraction!r}")
        self.rise_steps = V.integer("rise_steps", rise_steps, 1)
        self.growth = 10.0 ** (1.0 / self.rise_steps)  # the most the lr may rise in one step
        if loss_rise is not None and not (math.isfinite(loss_rise) and loss_rise > 1):
            raise ValueError(f"loss_rise must be > 1 or None, got {loss_rise!r}")
        self.loss_rise = loss_rise
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
        if preconditioner_steps is not None:
            preconditioner_steps = V.integer("preconditioner_steps", preconditioner_steps, 0)
        group = self.monitor.group
        start = edge_learning_rate(self.monitor, margin=self.margin, tol=tol, max_hvps=max_hvps)
        self.edge_lr = start.edge_lr  # the edge the lr is capped by (margin of it)
        self.edge_from = 0 if start.sharpness_key != "lambda1_PH" else _preconditioner_steps(
            optimizer.param_groups[group], preconditioner_steps)
        self.ramp = self.start_fraction  # how far time allows: tenfold per rise_steps, up to 1
        self.fraction = min(self.ramp, start.lr / targets[group]) if self._edge_binds() else self.ramp
        self.phase = "warmup"
        self.seen_step = self.monitor.step  # records up to here are not the warmup's
        self.above_edge = 0  # full measurements in a row with stability_ratio >= 1
        self.lowest_loss = math.inf  # the probe loss the loss guard compares with
        self.loss_high = 0  # full measurements in a row with the loss above loss_rise × lowest_loss
        self.limit = 1.0  # a fraction the rate may not climb above again (set by the loss guard)
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
        steps = 0 if self.monitor_step is None else self.monitor.step - self.monitor_step
        self.monitor_step = self.monitor.step
        if self.phase == "after":
            self._last_lr = list(self._advance_after())
            return
        if self.phase == "guarded":  # ``after`` runs, capped by the edge until break-even
            uncapped = self._advance_after()
            self._follow_measurements()
            self._rise(float(uncapped[self.monitor.group]), steps)
            self._set_lrs([lr * self.fraction for lr in uncapped])
            if self._break_even_settled():
                self._hand_over("break_even", scale=self.fraction, event="warmup_release")
            return
        self._follow_measurements()
        self._rise(float(self.base_lrs[self.monitor.group]), steps)
        super().step()
        if self.fraction >= 1.0:
            self.phase = "guarded"
            self._set_lrs(self._advance_after(start=True))
            self.monitor.log_event({"event": "warmup_handoff", "step": self.monitor.step, "reason": "target",
                                    "fraction": 1.0, "lr": self._last_lr[self.monitor.group]})
        elif self._break_even_settled():
            self._hand_over("break_even", scale=self.fraction)

    def _rise(self, group_target: float, steps: int) -> None:
        """Advance the ramp; the fraction is the lowest of the ramp, ``margin`` of the edge and the limit."""
        self.ramp = min(1.0, self.ramp * self.growth ** steps)
        edge = self.margin * self.edge_lr / group_target if group_target > 0 and self._edge_binds() else math.inf
        self.fraction = min(self.ramp, edge, self.limit)

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

    def _follow_measurements(self) -> None:
        """Move the edge to the certified measurements seen since the last step; back off on trouble."""
        records = [r for r in self.monitor.history if r["step"] > self.seen_step]
        events = [e for e in self.monitor.events if e.get("event") == "skipped" and e["step"] > self.seen_step]
        self.seen_step = self.monitor.step
        for record in records:
            ratio = _certified_ratio(record, cheap_ok=not self.monitor.break_even.reached)
            if ratio is None:
                continue
            edge = record["lr"] / ratio if ratio > 0 else math.inf
            if "stability_ratio" not in record:  # the cheap signal: an upper bound on the edge
                self.edge_lr = min(self.edge_lr, edge)
                continue
            self.edge_lr = edge
            self.above_edge = self.above_edge + 1 if ratio >= 1 and self._edge_binds() else 0
            if self.above_edge >= 2:
                self._back_off(record["step"], "catapult does not resolve")
            elif self._loss_keeps_rising(record.get("loss")):
                self._back_off(record["step"], "the probe loss keeps rising")
                self.limit = self.fraction  # never climb back to a rate at which the loss rose
        if events:
            self._back_off(events[-1]["step"], events[-1].get("reason", "skipped measurement"))

    def _edge_binds(self) -> bool:
        """Whether the measured edge caps the rate now (Adam: once its v̂ has warmed up)."""
        return self.monitor.step >= self.edge_from

    def _loss_keeps_rising(self, loss: float | None) -> bool:
        """Two full measurements in a row whose probe loss exceeds ``loss_rise`` × the lowest seen.

        Stochastic instabilities can ruin training below the full-batch edge (a small batch,
        saturating units); the probe loss is the sign of it that does not depend on λ1^H.
        """
        if self.loss_rise is None or loss is None or not math.isfinite(loss):
            return False
        self.loss_high = self.loss_high + 1 if loss > self.loss_rise * self.lowest_loss else 0
        if self.loss_high >= 2:
            self.lowest_loss, self.loss_high = loss, 0  # the new reference after backing off
            return True
        self.lowest_loss = min(self.lowest_loss, loss)
        return False

    def _back_off(self, step: float, reason: str) -> None:
        self.fraction *= self.backoff
        self.ramp = self.fraction  # the ramp starts again from the rate backed off to
        self.above_edge = 0
        self.monitor.log_event({"event": "warmup_backoff", "step": step, "reason": reason,
                                "fraction": self.fraction})

    def _break_even_settled(self) -> bool:
        """Break-even detected, and a full measurement after it is back below the edge.

        Never while the edge does not bind (Adam's v̂ warming up): there is no cap to
        release, and the detector's stability rule fires on the cold preconditioner's
        λ1^PH (ratio ~60 at the first step on MNIST), which would freeze the ramp.
        """
        if not self._edge_binds():
            return False
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


def _preconditioner_steps(group: dict[str, Any], steps: int | None) -> int:
    """Steps before Adam's preconditioned edge may cap the rate: 1/(1 − β2) unless given."""
    if steps is not None:
        return steps
    return ur.preconditioner_warmup_steps(group.get("betas", (0.9, 0.999))[1])


def _certified_ratio(record: dict[str, float], *, cheap_ok: bool) -> float | None:
    """A stability ratio the policy may act on: converged Lanczos, or the calibrated cheap signal."""
    if "stability_ratio" in record:
        converged = record.get("hessian_converged", record.get("preconditioned_converged", 1.0))
        return record["stability_ratio"] if converged >= 0.5 else None
    if cheap_ok and "stability_ratio_update" in record:
        return record["stability_ratio_update"]
    return None
