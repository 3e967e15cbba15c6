"""``BatchSizeController``: a batch size that follows break-even and the gradient-noise scale.

The paper's second lever is the batch size S: before break-even a small S (a large η/S)
leads to lower λ1^H and λ1^K; after it, the gradient noise decides how large a batch still
pays off. The critical batch size is about the simple noise scale
``B = Tr K / ‖g‖²`` (McCandlish et al. 2018; the monitor's ``gns``), and growing the batch
can replace decaying the learning rate (Smith et al. 2018). The controller:

* keeps ``S = S0`` until the monitor has detected break-even;
* then, at each new noise measurement, sets S to the largest size ``S0·2^j`` that is at
  most both the smoothed noise scale and ``max_batch_size`` (if that is larger than S):
  the sizes are powers-of-two multiples of S0, and S never shrinks;
* rescales the learning rate of every parameter group by a factor ``f`` of its value at
  ``S0``, chosen by ``lr_rule`` with ``s = S/S0``:

  - ``"linear"``: ``f = s`` (Goyal et al. 2017);
  - ``"sqrt"``: ``f = √s`` (the variance of the update stays that of S0);
  - ``"adascale"``: the AdaScale gain (Johnson et al. 2020) from the same noise statistics,
    ``f = (σ² + μ²)/(σ²/s + μ²)`` with σ² = Tr K/S0 the variance of an S0-batch gradient
    and μ² = ‖g‖², i.e. ``f = (B/S0 + 1)/(B/S + 1)`` with B the smoothed noise scale:
    ``f → s`` when noise dominates (B ≫ S), ``f → 1`` when it does not (B ≪ S0); it is
    re-evaluated at each noise measurement;
  - ``"none"``: ``f = 1`` (the learning rate is left to the user's schedule);

  and, with ``edge_margin`` (default 0.9), the factor is never *raised* above
  ``edge_margin · η_edge / η0`` where ``η_edge = lr / stability_ratio`` of the latest
  converged full measurement: growing the batch must not push the run over the edge of
  stability (the rule's factor is reached later, when a measurement allows it).

It changes no data loader itself: :class:`~sgdbreak.BreakEvenBatchSampler` (one process)
and :class:`~sgdbreak.integrations.accumulation.BreakEvenAccumulation` (several processes,
gradient accumulation) read ``batch_size`` / ``accumulation_steps`` from it. Every change
is an event of the monitor (``batch_size_start``, ``batch_size_change``: step, S,
accumulation steps, lr factor, lr, noise scale) and a record ``{step, batch_size,
accumulation_steps, lr_factor}`` for the monitor's loggers (so run directories and W&B show
S over steps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from .. import _validation as V
from ..estimators.noise import NoiseScaleTracker
from ..measurement.monitor import BreakEvenMonitor
from .schedulers import find_monitor
from .warmup import _certified_ratio

__all__ = ["LR_RULES", "BatchSizeController", "adascale_gain", "lr_factor"]

LR_RULES = ("linear", "sqrt", "adascale", "none")
"""Learning-rate rules accepted by ``lr_rule``."""


def adascale_gain(scale: float, noise_scale: float, base_batch_size: float) -> float:
    """AdaScale's gain ``(σ² + μ²)/(σ²/s + μ²)`` written with the noise scale B = Tr K/‖g‖².

    With σ² = Tr K/S0 (variance of a batch-S0 gradient) and μ² = ‖g‖²,
    the gain is ``(B/S0 + 1)/(B/(s·S0) + 1)``, in ``[1, s]``.

    Args:
        scale: ``s = S/S0 >= 1``.
        noise_scale: B in examples (``inf``: pure noise, the gain is s).
        base_batch_size: S0.

    Example:
        >>> round(adascale_gain(4.0, 1e12, 32), 6), adascale_gain(4.0, 0.0, 32)
        (4.0, 1.0)
    """
    if math.isinf(noise_scale):
        return float(scale)
    ratio = noise_scale / base_batch_size
    return (ratio + 1.0) / (ratio / scale + 1.0)


def lr_factor(rule: str, scale: float, noise_scale: float | None = None,
              base_batch_size: float | None = None) -> float:
    """The learning-rate factor of ``rule`` at ``s = S/S0`` (see the module docstring)."""
    if rule == "linear":
        return float(scale)
    if rule == "sqrt":
        return math.sqrt(scale)
    if rule == "none" or scale == 1:
        return 1.0
    if rule == "adascale":
        if noise_scale is None or base_batch_size is None or not noise_scale >= 0:
            return 1.0  # no noise measured: no evidence for a larger step
        return adascale_gain(scale, noise_scale, base_batch_size)
    raise ValueError(f"lr_rule must be one of {list(LR_RULES)}, got {rule!r}")


class BatchSizeController:
    """Batch size S and learning-rate factor from break-even and the smoothed noise scale.

    Call :meth:`update` once after each optimizer step (repeated calls within a step do
    nothing; :class:`~sgdbreak.BreakEvenBatchSampler` calls it before each batch). It reads
    the monitor's records since the last call.

    Args:
        optimizer: a monitored optimizer (``BreakEvenSGD``, ``BreakEvenAdam(W)``, one with an
            attached monitor, or any of them wrapped by Accelerate); its param groups' lr at
            construction is the lr at S0.
        batch_size: S0, the global batch before break-even (>= 1).
        max_batch_size: upper bound on S (>= S0).
        lr_rule: ``"linear"``, ``"sqrt"``, ``"adascale"`` or ``"none"``.
        micro_batch_size: the global size of one accumulation micro-step (processes × per-process
            micro-batch) when S is reached by gradient accumulation; S0 must be a multiple of it.
            None: one step per batch (``accumulation_steps`` is 1).
        noise: where the noise scale comes from: None, the monitor's ``gns`` records (needs a
            :class:`~sgdbreak.GradientNoise` quantity), smoothed by an EMA of ``trace_K`` and
            ``‖g‖²`` (decay ``smoothing``); or a :class:`~sgdbreak.ReplicaNoise`, whose
            already-smoothed ``gns_replica`` is read.
        smoothing: EMA decay for the monitor's noise measurements, in [0, 1).
        edge_margin: cap on raising the lr, as a fraction of the edge of stability; None: no cap.
        monitor: the run's monitor (default: the one behind ``optimizer``).

    Example:
        >>> # opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=probe)
        >>> # ctl = BatchSizeController(opt, batch_size=32, max_batch_size=1024, lr_rule="sqrt")
        >>> # ...; opt.step(); ctl.update(); next_batch_size = ctl.batch_size
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        *,
        batch_size: int,
        max_batch_size: int,
        lr_rule: str = "sqrt",
        micro_batch_size: int | None = None,
        noise: Any = None,
        smoothing: float = 0.5,
        edge_margin: float | None = 0.9,
        monitor: BreakEvenMonitor | None = None,
    ) -> None:
        self.base_batch_size = V.integer("batch_size", batch_size, 1)
        self.max_batch_size = V.integer("max_batch_size", max_batch_size)
        if self.max_batch_size < self.base_batch_size:
            raise ValueError(f"max_batch_size must be >= batch_size ({batch_size}), got {max_batch_size!r}")
        self.lr_rule = V.choice("lr_rule", lr_rule, LR_RULES)
        self.micro_batch_size = V.optional_integer("micro_batch_size", micro_batch_size, 1)
        if self.micro_batch_size is not None and self.base_batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({batch_size}) must be a multiple of the global micro-batch "
                             f"({micro_batch_size}: processes × per-process micro-batch)")
        smoothing = V.real("smoothing", smoothing)
        if not 0 <= smoothing < 1:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        if edge_margin is not None:
            edge_margin = V.real("edge_margin", edge_margin, positive=True)
            if edge_margin > 1:
                raise ValueError(f"edge_margin must be in (0, 1] or None, got {edge_margin!r}")
        self.edge_margin = edge_margin
        if monitor is not None and not isinstance(monitor, BreakEvenMonitor):
            raise TypeError(f"monitor must be a BreakEvenMonitor, got {type(monitor).__name__}")
        try:
            self.monitor = monitor if monitor is not None else find_monitor(optimizer)
        except ValueError as err:
            raise ValueError(f"the batch-size controller reads break-even and the noise scale from a "
                             f"monitor: {err}") from None
        self.optimizer = optimizer
        self.noise = noise
        if noise is None and not any(getattr(q, "name", None) == "gradient_noise"
                                     for q in self.monitor.quantities):
            raise ValueError("the monitor measures no gradient noise (gns): add sgdbreak.GradientNoise() "
                             "to its quantities (or 'noise' to measurements=), or pass noise=ReplicaNoise(...)")
        if noise is not None and not hasattr(noise, "history"):
            raise TypeError(f"noise must be None or a ReplicaNoise (with .history), got {type(noise).__name__}")
        self.tracker = NoiseScaleTracker(smoothing)
        self.batch_size = self.base_batch_size
        self.lr_factor = 1.0
        self.base_lr = float(optimizer.param_groups[self.monitor.group]["lr"])
        self.edge_lr: float | None = None
        self.noise_scale = math.nan
        self.seen_step = self.monitor.step  # monitor records up to here are not ours
        self.seen_noise = len(noise.history) if noise is not None else 0
        self.monitor_step: int | None = None
        self.started = False
        self.num_changes = 0

    # ------------------------------------------------------------------ reading
    @property
    def accumulation_steps(self) -> int:
        """Micro-steps per optimizer step (1 without ``micro_batch_size``)."""
        return 1 if self.micro_batch_size is None else self.batch_size // self.micro_batch_size

    @property
    def sizes(self) -> list[int]:
        """The batch sizes the controller may choose: S0·2^j up to ``max_batch_size``."""
        out = [self.base_batch_size]
        while out[-1] * 2 <= self.max_batch_size:
            out.append(out[-1] * 2)
        return out

    def _new_noise(self) -> bool:
        """Fold the noise measurements since the last call into the estimate; any new?"""
        if self.noise is not None:
            records = self.noise.history[self.seen_noise:]
            self.seen_noise = len(self.noise.history)
            values = [r["gns_replica"] for r in records if "gns_replica" in r]
            if values:
                self.noise_scale = float(values[-1])
            return bool(values)
        found = False
        for record in self._records:
            trace, gns = record.get("trace_K"), record.get("gns")
            if trace is None or gns is None or not gns > 0:
                continue
            found = self.tracker.update(trace / gns if math.isfinite(gns) else 0.0, trace) or found
        if found:
            self.noise_scale = self.tracker.noise_scale
        return found

    def _follow_edge(self) -> None:
        for record in self._records:
            if "stability_ratio" not in record or "lr" not in record:
                continue
            ratio = _certified_ratio(record, cheap_ok=False)
            if ratio is not None and ratio > 0:
                self.edge_lr = record["lr"] / ratio

    # ------------------------------------------------------------------ deciding
    def update(self) -> bool:
        """Read the monitor's new records; grow S and rescale the lr if due. Returns whether anything changed."""
        if self.monitor_step is not None and self.monitor.step == self.monitor_step:
            return False
        self.monitor_step = self.monitor.step
        self._records = [r for r in self.monitor.history if r["step"] > self.seen_step]
        self.seen_step = self.monitor.step
        if not self.started:
            self.started = True
            self._log("batch_size_start", reason="start")
        fresh = self._new_noise()
        self._follow_edge()
        if not (fresh and self.monitor.break_even.reached):
            return False
        size = self.batch_size
        while size * 2 <= self.max_batch_size and self.noise_scale >= size * 2:
            size *= 2
        factor = self._factor(size)
        if size == self.batch_size and math.isclose(factor, self.lr_factor, rel_tol=1e-12):
            return False
        reason = "grow" if size != self.batch_size else "lr"
        self.batch_size = size
        self._set_factor(factor)
        self.num_changes += 1
        self._log("batch_size_change", reason=reason)
        return True

    def _factor(self, size: int) -> float:
        rule = lr_factor(self.lr_rule, size / self.base_batch_size, self.noise_scale, self.base_batch_size)
        if self.edge_margin is None or self.edge_lr is None or self.base_lr <= 0:
            return rule
        cap = self.edge_margin * self.edge_lr / self.base_lr
        return min(rule, max(self.lr_factor, cap))

    def _set_factor(self, factor: float) -> None:
        ratio = factor / self.lr_factor
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * ratio  # multiplicative: composes with chainable schedulers
        self.lr_factor = factor

    def _log(self, name: str, *, reason: str) -> None:
        step = self.monitor.step
        lr = float(self.optimizer.param_groups[self.monitor.group]["lr"])
        event = {"event": name, "step": step, "reason": reason, "batch_size": self.batch_size,
                 "accumulation_steps": self.accumulation_steps, "lr_factor": self.lr_factor, "lr": lr,
                 "lr_rule": self.lr_rule}
        if math.isfinite(self.noise_scale):
            event["noise_scale"] = self.noise_scale
        if name == "batch_size_start":
            event["max_batch_size"] = self.max_batch_size
        self.monitor.log_event(event)
        record = {"step": step, "batch_size": self.batch_size, "accumulation_steps": self.accumulation_steps,
                  "lr_factor": self.lr_factor}
        for logger in self.monitor.loggers:
            logger.log_measurement(record)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Python numbers only (``torch.load(weights_only=True)`` reads it); not the monitor or optimizer."""
        return {"batch_size": self.batch_size, "lr_factor": self.lr_factor, "base_lr": self.base_lr,
                "edge_lr": self.edge_lr, "noise_scale": self.noise_scale, "seen_step": self.seen_step,
                "seen_noise": self.seen_noise, "monitor_step": self.monitor_step, "started": self.started,
                "num_changes": self.num_changes, "tracker": self.tracker.state_dict(),
                "settings": self._settings()}

    def _settings(self) -> dict[str, Any]:
        return {"base_batch_size": self.base_batch_size, "max_batch_size": self.max_batch_size,
                "lr_rule": self.lr_rule, "micro_batch_size": self.micro_batch_size}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output into a controller built with the same settings."""
        if not isinstance(state, Mapping) or "settings" not in state:
            raise ValueError("malformed batch-size controller state (no 'settings')")
        if dict(state["settings"]) != self._settings():
            raise ValueError(f"the state was saved with settings {dict(state['settings'])}, this controller "
                             f"has {self._settings()}")
        self.tracker.load_state_dict(dict(state["tracker"]))
        self.batch_size = int(state["batch_size"])
        self.lr_factor = float(state["lr_factor"])
        self.base_lr = float(state["base_lr"])
        self.edge_lr = None if state["edge_lr"] is None else float(state["edge_lr"])
        self.noise_scale = float(state["noise_scale"])
        self.seen_step = int(state["seen_step"])
        self.seen_noise = int(state["seen_noise"])
        self.monitor_step = None if state["monitor_step"] is None else int(state["monitor_step"])
        self.started = bool(state["started"])
        self.num_changes = int(state["num_changes"])

    def __repr__(self) -> str:
        return (f"BatchSizeController(batch_size={self.batch_size}, base={self.base_batch_size}, "
                f"max={self.max_batch_size}, lr_rule={self.lr_rule!r}, lr_factor={self.lr_factor:.4g})")
