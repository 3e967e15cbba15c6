"""The run monitor: when to measure, the records, break-even, and checkpoints.

:class:`BreakEvenMonitor` is the one stateful object of sgdbreak. After each optimizer
step its triggers decide whether to measure; it then runs its quantities
(:mod:`sgdbreak.measurement.quantities`: what is measured, each with its own settings and state) on a
:class:`~sgdbreak.Probe`, merges their entries into one record, feeds the record to the
break-even detector, loggers and hooks, and checkpoints all of it. ``BreakEvenSGD`` owns
one; any torch optimizer can use one through :meth:`BreakEvenMonitor.attach`. Schedulers
read ``monitor.latest`` / ``monitor.break_even``.
"""

from __future__ import annotations

import copy
import inspect
import math
import numbers
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .. import _validation as V
from ..errors import NonFiniteMeasurement
from . import breakeven as be
from . import quantities as q
from . import update_rules as ur
from .probe import Probe
from .quantities import MeasurementContext
from .triggers import Adaptive, DenseUntilBreakEven, as_trigger

__all__ = ["DEFAULT_MEASUREMENTS", "MEASUREMENTS", "BreakEvenMonitor", "quantities_from_settings"]

MEASUREMENTS = ("hessian", "trace", "noise", "curvature_variance", "alpha_star", "bn_gamma_norm")
"""Names accepted by the ``measurements=`` shorthand (see :func:`quantities_from_settings`)."""
DEFAULT_MEASUREMENTS = ("hessian", "noise", "bn_gamma_norm")

_SETTINGS = ("measurements", "hessian_k", "hessian_tol", "max_hvps", "trace_samples", "noise_method",
             "noise_samples", "noise_batch_size", "noise_k", "curvature_groups", "dataset_size",
             "batch_size", "cheap_examples", "cold_restart_every")


def quantities_from_settings(
    *,
    measurements: Iterable[str] = DEFAULT_MEASUREMENTS,
    hessian_k: int = 1,
    hessian_tol: float = 1e-3,
    max_hvps: int = 30,
    trace_samples: int = 10,
    noise_method: str = "microbatch",
    noise_samples: int = 20,
    noise_batch_size: int | None = None,
    noise_k: int = 5,
    curvature_groups: int = 8,
    dataset_size: int | None = None,
    batch_size: int | None = None,
    cheap_examples: int = 128,
    cold_restart_every: int | None = None,
) -> list[Any]:
    """The quantities named by the flat settings of sgdbreak 0.1 (still accepted by the monitor).

    ``measurements`` picks from :data:`MEASUREMENTS`; the cheap signal is always included
    (the monitor's ``cheap_every`` decides whether it runs). ``curvature_variance`` needs
    ``dataset_size`` and ``batch_size`` (N and S of Eq. 1).
    """
    chosen = tuple(measurements)
    unknown = set(chosen) - set(MEASUREMENTS)
    if unknown:
        raise ValueError(f"unknown measurements {sorted(unknown)}; choose from {MEASUREMENTS}")
    if "curvature_variance" in chosen and (dataset_size is None or batch_size is None):
        raise ValueError("measuring curvature_variance (Eq. 1) needs dataset_size and batch_size")
    out: list[Any] = [q.UpdateSharpness(cheap_examples)]
    if "hessian" in chosen:
        out.append(q.Sharpness(hessian_k, tol=hessian_tol, max_hvps=max_hvps,
                               cold_restart_every=cold_restart_every))
    if "trace" in chosen:
        out.append(q.HessianTrace(trace_samples))
    if "curvature_variance" in chosen:
        assert dataset_size is not None and batch_size is not None  # checked above
        out.append(q.CurvatureVariance(dataset_size=dataset_size, batch_size=batch_size,
                                       groups=curvature_groups))
    if "noise" in chosen:
        out.append(q.GradientNoise(noise_method, samples=noise_samples, batch_size=noise_batch_size,
                                   k=noise_k))
    if "alpha_star" in chosen:
        out.append(q.AlphaStar(cheap_examples))
    if "bn_gamma_norm" in chosen:
        out.append(q.BatchNormGamma())
    return out


def _flag(quantity: Any, name: str) -> bool:
    return bool(getattr(quantity, name, False))


class BreakEvenMonitor:
    """Tracks curvature and gradient noise along a run and detects break-even.

    *What* is measured is a list of quantities (:mod:`sgdbreak.measurement.quantities`); *when* is two
    triggers (:mod:`sgdbreak.measurement.triggers`); the detector, loggers and hooks consume one flat
    record per measurement.

    Args:
        probe: the measurement set (:class:`~sgdbreak.Probe`).
        quantities: what to measure (default :func:`~sgdbreak.default_quantities`: the
            cheap signal, λ1^H, the noise spectrum, ‖γ‖; bound to Adam/AdamW, a monitor
            built without ``quantities=`` adds :class:`~sgdbreak.PreconditionedSharpness`
            after λ1^H, with its settings). Any object
            with a ``name`` and ``compute(ctx)`` works; names must be unique.
        measure_every: trigger for full measurements (every quantity): an int (every n
            steps), a callable ``step -> bool`` or None. Default
            :class:`~sgdbreak.measurement.triggers.Adaptive` (dense while λ1^H moves, sparse after).
        cheap_every: trigger for the cheap quantities alone (``cheap = True``: the update
            sharpness). Default :class:`~sgdbreak.measurement.triggers.DenseUntilBreakEven`: every 10
            steps until break-even is detected, every 50 after. Cheap quantities also run
            with every full measurement (to stay calibrated); None turns them off.
        detector: a :class:`~sgdbreak.measurement.breakeven.BreakEvenDetector` (default: all rules,
            the threshold rules needing two consecutive confirmations).
        loggers: objects with ``log_measurement(record)``, ``log_event(event)``, ``close()``.
        optimizer: the optimizer whose ``param_groups[group]`` gives lr and momentum
            (``BreakEvenSGD`` and :meth:`attach` set it).
        group: index of that parameter group.
        steps_per_epoch: adds ``epoch`` to records.
        seed: seeds the measurement generator (random starts, micro-batches, subsets); the
            global RNG is never touched, so training is identical with and without measuring.
        **settings: the flat settings of sgdbreak 0.1 (``measurements=``, ``hessian_tol=``,
            ``noise_samples=``, ``dataset_size=``, …), turned into quantities by
            :func:`quantities_from_settings`; not together with ``quantities=``.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        quantities: Iterable[Any] | None = None,
        measure_every: Any = "default",
        cheap_every: Any = "default",
        detector: be.BreakEvenDetector | None = None,
        loggers: Iterable[Any] = (),
        optimizer: torch.optim.Optimizer | None = None,
        group: int = 0,
        steps_per_epoch: int | None = None,
        seed: int = 0,
        **settings: Any,
    ):
        if not isinstance(probe, Probe):
            raise TypeError(f"probe must be a sgdbreak.Probe, got {type(probe).__name__}")
        unknown = sorted(set(settings) - set(_SETTINGS))
        if unknown:
            raise TypeError(f"BreakEvenMonitor got unexpected keyword arguments {unknown}")
        if quantities is not None and settings:
            raise TypeError(f"pass either quantities= or the settings {sorted(settings)}, not both")
        group, seed = V.integer("group", group, 0), V.integer("seed", seed, 0)
        steps_per_epoch = V.optional_integer("steps_per_epoch", steps_per_epoch, 1)
        self.probe = probe
        self.optimizer: torch.optim.Optimizer | None = None
        self.measure_trigger = Adaptive() if measure_every == "default" else as_trigger(measure_every)
        self.cheap_trigger = (DenseUntilBreakEven() if cheap_every == "default"
                              else as_trigger(cheap_every, "cheap_every"))
        self._observe_modes = tuple(_observe_mode(t) for _, t in self._triggers())
        self.quantities = list(quantities_from_settings(**settings) if quantities is None
                               else quantities)
        self._defaults = quantities is None  # chosen by sgdbreak: λ1_PH joins λ1^H under Adam (bind)
        self._seed = seed
        self._check_quantities(seed)
        _check_processes(probe)
        self.steps_per_epoch = steps_per_epoch
        self.detector = detector if detector is not None else be.BreakEvenDetector(confirm=2)
        self.loggers = list(loggers)
        self.group = group
        self.generator = torch.Generator().manual_seed(seed)

        self.step = 0
        self.history: list[dict[str, float]] = []
        self.events: list[dict[str, Any]] = []
        self.num_measurements = 0
        self.skipped: dict[str, int] = {}
        self._warned: set[str] = set()
        self._before: list[Tensor] | None = None
        self._measurement_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._break_even_hooks: OrderedDict[int, Callable] = OrderedDict()
        self._attached: list[RemovableHandle] = []
        self._processes_checked = False
        if optimizer is not None:
            self.bind(optimizer)

    def _check_quantities(self, seed: int) -> None:
        names = []
        for quantity in self.quantities:
            name = getattr(quantity, "name", None)
            if not isinstance(name, str) or not name or not callable(getattr(quantity, "compute", None)):
                raise TypeError(f"a quantity needs a non-empty str `name` and a `compute(ctx)` method, "
                                f"got {quantity!r}")
            names.append(name)
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"quantity names must be unique, repeated: {repeated}")
        for quantity in self.quantities:
            setup = getattr(quantity, "setup", None)
            if setup is not None:
                setup(self.probe, seed)

    def quantity(self, name: str) -> Any:
        """The quantity called ``name`` (e.g. ``"sharpness"`` for its warm-start vectors)."""
        for quantity in self.quantities:
            if quantity.name == name:
                return quantity
        raise KeyError(f"no quantity {name!r}; this monitor measures {[q.name for q in self.quantities]}")

    def _selected(self, full: bool) -> list[Any]:
        """Quantities of a full measurement, or of a cheap one (cheap ones off without a trigger)."""
        cheap_on = self.cheap_trigger is not None
        if full:
            return [q for q in self.quantities if cheap_on or not _flag(q, "cheap")]
        return [q for q in self.quantities if cheap_on and _flag(q, "cheap")]

    # ------------------------------------------------------------------ public views
    @property
    def latest(self) -> Mapping[str, float] | None:
        """The last record (full measurement or cheap signal), or None before the first."""
        return self.history[-1] if self.history else None

    @property
    def latest_full(self) -> Mapping[str, float] | None:
        """The last record holding ``lambda1_H`` or ``lambda1_PH`` (a full curvature measurement)."""
        for record in reversed(self.history):
            if "lambda1_H" in record or "lambda1_PH" in record:
                return record
        return None

    @property
    def break_even(self) -> be.BreakEvenResult:
        """The detector's conclusion: ``.reached``, ``.step``, ``.rule``, ``.evidence``."""
        return self.detector.result

    def as_dict(self) -> dict[str, float]:
        """A flat ``dict[str, float]`` for loggers: the latest values of every key."""
        out: dict[str, float] = {}
        for record in self.history:
            out.update(record)
        result = self.break_even
        out["break_even_reached"] = float(result.reached)
        if result.reached and result.step is not None:
            out["break_even_step"] = float(result.step)
        return out

    # ------------------------------------------------------------------ hooks
    def register_measurement_hook(self, fn: Callable[[Mapping[str, float]], None]) -> RemovableHandle:
        """Call ``fn(record)`` after every record; returns a removable handle."""
        handle = RemovableHandle(self._measurement_hooks)
        self._measurement_hooks[handle.id] = fn
        return handle

    def register_break_even_hook(self, fn: Callable[[be.BreakEvenResult], None]) -> RemovableHandle:
        """Call ``fn(result)`` once, when break-even is detected; returns a removable handle."""
        handle = RemovableHandle(self._break_even_hooks)
        self._break_even_hooks[handle.id] = fn
        return handle

    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Read lr and momentum from ``optimizer`` after checking it fits the probe.

        Refused: a ``group`` index the optimizer does not have, ``maximize=True`` (the
        stability of ascent is that of the *negated* loss: give the probe a criterion that
        returns it and keep ``maximize=False``; the update is the same), an optimizer
        that updates none of the probe's parameters (it would measure an untrained model),
        and one a quantity's ``bind`` refuses (:class:`~sgdbreak.PreconditionedSharpness`
        needs Adam). An optimizer other than SGD, Adam and AdamW is measured with one
        ``RuntimeWarning``: it has no stability ratio, edge or stability/Eq. 1 rule
        (:mod:`sgdbreak.measurement.update_rules`).
        """
        groups = optimizer.param_groups
        if not 0 <= self.group < len(groups):
            raise ValueError(f"group={self.group}, but the optimizer has {len(groups)} parameter "
                             f"group(s): pass group= in [0, {len(groups) - 1}]")
        if groups[self.group].get("maximize", False):
            raise ValueError(
                "maximize=True is not supported with measurements: sgdbreak measures the loss the "
                "optimizer minimises. Give the probe a criterion returning the negated objective "
                "and use maximize=False (the update is identical)")
        updated = {id(p) for g in groups for p in g["params"]}
        inside = sum(id(p) in updated for p in self.probe.params)
        if inside == 0:
            raise ValueError(
                "the optimizer updates none of the probe's parameters, so the measurements would "
                "follow a model that does not train: build the probe on the model whose "
                "parameters the optimizer updates")
        for quantity in self.quantities:
            if hasattr(quantity, "bind"):
                quantity.bind(optimizer, self.group)
        if inside < len(self.probe.params):
            warnings.warn(
                f"the optimizer updates {inside} of the probe's {len(self.probe.params)} parameter "
                "tensors; λ1^H and K include the others: pass Probe(..., params=<the optimized "
                "parameters>) to measure only what is trained", RuntimeWarning, stacklevel=3)
        rule = ur.stability_rule(optimizer)
        if rule is None:
            self._warn_once(
                f"no-rule:{type(optimizer).__name__}",
                f"sgdbreak knows the edge of stability of SGD, Adam and AdamW, not of "
                f"{type(optimizer).__name__}: measurements continue without stability_ratio, "
                "edge_sharpness and the detector's stability and Eq. 1 rules")
        elif rule == ur.ADAM and getattr(self, "_defaults", False):
            self._add_preconditioned_sharpness(optimizer)
        self.optimizer = optimizer

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=4)

    def _add_preconditioned_sharpness(self, optimizer: torch.optim.Optimizer) -> None:
        """Default quantities under Adam: λ1_PH after λ1^H (once; a checkpoint finds it by name)."""
        names = [quantity.name for quantity in self.quantities]
        if "sharpness" not in names or "preconditioned_sharpness" in names:
            return
        sharpness = self.quantities[names.index("sharpness")]
        quantity = q.PreconditionedSharpness(tol=sharpness.tol, max_hvps=sharpness.max_hvps,
                                             cold_restart_every=sharpness.cold_restart_every)
        quantity.setup(self.probe, self._seed)
        try:
            quantity.bind(optimizer, self.group)
        except ValueError as err:
            self._warn_once("no-preconditioned", f"{err}; measuring without it")
            return
        self.quantities.insert(names.index("sharpness") + 1, quantity)

    def attach(self, optimizer: torch.optim.Optimizer) -> BreakEvenMonitor:
        """Measure around ``optimizer.step()`` of any torch optimizer via step hooks."""
        self.bind(optimizer)
        self._attached = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step()),
            optimizer.register_step_post_hook(  # torch ignores what a post-hook returns
                lambda opt, args, kwargs: self.after_step()),  # type: ignore[arg-type]
        ]
        return self

    def detach(self) -> None:
        """Remove the hooks installed by :meth:`attach`."""
        for handle in self._attached:
            handle.remove()
        self._attached = []

    # ------------------------------------------------------------------ step protocol
    def _wants(self, trigger, step: int) -> bool:
        return trigger is not None and bool(trigger(step))

    def before_step(self) -> None:
        """Snapshot parameters when the coming step's measurement needs the update."""
        if not self._processes_checked:
            _check_processes(self.probe)  # before the first update: nothing is lost
            self._processes_checked = True
        nxt = self.step + 1
        runs = ([] if not self._wants(self.measure_trigger, nxt) else self._selected(True)) or \
            ([] if not self._wants(self.cheap_trigger, nxt) else self._selected(False))
        needs_update = any(_flag(q, "needs_update") for q in runs)
        self._before = [p.detach().clone() for p in self.probe.params] if needs_update else None

    def after_step(self) -> dict[str, float] | None:
        """Count the step and measure if a trigger fires; returns the new record or None."""
        self.step += 1
        before, self._before = self._before, None
        full = self._wants(self.measure_trigger, self.step)
        if not (full or self._wants(self.cheap_trigger, self.step)):
            return None
        return self.measure(full=full, before=before)

    # ------------------------------------------------------------------ measuring
    def _hyper(self) -> dict[str, Any]:
        return ur.hyperparameters(self.optimizer, self.group)

    def measure(self, *, full: bool = True, before: list[Tensor] | None = None) -> dict[str, float] | None:
        """Measure now (at ``self.step``) and process the record. Returns it, or None if skipped.

        Args:
            full: run every quantity (else only the cheap ones).
            before: parameters before the last step (for quantities that need the update).
        """
        start = time.perf_counter()
        hyper = self._hyper()
        record: dict[str, float] = {"step": self.step}
        if self.steps_per_epoch:
            record["epoch"] = self.step / self.steps_per_epoch
        for key in ("lr", "momentum"):
            if key in hyper:
                record[key] = hyper[key]
        record.update(ur.edge_entries(hyper))  # the figures' edge, from the ratio's formula
        selected = self._selected(full)
        ctx = MeasurementContext(step=self.step, probe=self.probe, optimizer=self.optimizer, hyper=hyper,
                                 generator=self.generator, before=before, full=full)
        try:
            with self.probe.measuring():
                for i, quantity in enumerate(selected):
                    if not any(_flag(later, "uses_hessian") for later in selected[i:]):
                        ctx.release_hessian_operator()  # free the graph as early as possible
                    _merge(record, ctx.record, quantity, quantity.compute(ctx))
                ctx.release_hessian_operator()
        except NonFiniteMeasurement as err:
            self._skip(str(err))
            return None
        if ctx.loss is not None:
            record["loss"] = ctx.loss
            record["num_hvps"] = ctx.num_hvps
        if full:
            self.num_measurements += 1
        bad = [k for k, v in record.items() if not math.isfinite(v)]
        for key in bad:
            record.pop(key)
            self._skip(f"non-finite {key}", record_event=False)
        record["measure_seconds"] = time.perf_counter() - start
        self._process(record)
        return record

    def _skip(self, reason: str, *, record_event: bool = True) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"sgdbreak: measurement at step {self.step} skipped: {reason}", RuntimeWarning,
                          stacklevel=3)
        if not record_event:
            return
        event = {"event": "skipped", "step": self.step, "reason": reason}
        self.events.append(event)
        _call_all([(f"trigger {t!r}", lambda t=t: t.on_skip(self.step))
                   for t in (self.measure_trigger, self.cheap_trigger) if hasattr(t, "on_skip")]
                  + self._logger_calls(event))

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Add an event (a skip, a policy's phase change) to ``events`` and give it to every logger.

        The event is kept even if a logger raises (the first exception is raised after all
        loggers ran). It needs an ``"event"`` name and a ``"step"``.
        """
        if not isinstance(event, Mapping) or not isinstance(event.get("event"), str) or "step" not in event:
            raise ValueError(f"an event is a mapping with an 'event' name and a 'step', got {event!r}")
        event = dict(event)
        self.events.append(event)
        _call_all(self._logger_calls(event))

    def _logger_calls(self, event: Mapping[str, Any]) -> list[tuple[str, Callable[[], Any]]]:
        return [(f"logger {lg!r}", partial(lg.log_event, event)) for lg in self.loggers]

    def _process(self, record: dict[str, float]) -> None:
        """Update the state first, then tell everyone; a failing consumer loses nothing.

        The record enters the history and a new break-even event enters ``events`` before
        any trigger, logger or hook runs; each of those runs even if an earlier one raised,
        and the first exception is raised after all of them.
        """
        for quantity in self.quantities:
            after_record = getattr(quantity, "after_record", None)
            if after_record is not None:
                after_record(record)
        reached_before = self.detector.result.reached
        self.detector.update(record)
        self.history.append(record)
        result = self.detector.result
        event = result.to_event() if result.reached and not reached_before else None
        if event is not None:
            self.events.append(event)
        calls: list[tuple[str, Callable[[], Any]]] = [(f"trigger {t!r}", partial(_observe, t, mode, record, result.reached))
                 for (_, t), mode in zip(self._triggers(), self._observe_modes)]
        calls += [(f"logger {lg!r}", partial(lg.log_measurement, record)) for lg in self.loggers]
        calls += [(f"measurement hook {fn!r}", partial(fn, record))
                  for fn in list(self._measurement_hooks.values())]
        if event is not None:
            calls += self._logger_calls(event)
            calls += [(f"break-even hook {fn!r}", partial(fn, result))
                      for fn in list(self._break_even_hooks.values())]
        _call_all(calls)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; tensors and Python values only."""
        triggers = {name: trigger.state_dict() for name, trigger in self._triggers()
                    if hasattr(trigger, "state_dict")}
        quantities = {quantity.name: quantity.state_dict() for quantity in self.quantities
                      if hasattr(quantity, "state_dict")}
        return {
            "step": self.step,
            "history": [dict(r) for r in self.history],
            "events": [dict(e) for e in self.events],
            "quantities": quantities,
            "num_measurements": self.num_measurements,
            "skipped": dict(self.skipped),
            "generator": self.generator.get_state(),
            "detector": self.detector.state_dict(),
            "triggers": triggers,
        }

    def _triggers(self) -> list[tuple[str, Any]]:
        return [("measure", self.measure_trigger), ("cheap", self.cheap_trigger)]

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (into a monitor built with the same settings).

        Everything is checked before anything changes: a state that does not fit raises a
        ``ValueError`` naming what differs and leaves the monitor as it was.
        """
        self.prepare_load(state)()

    def prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Validate a :meth:`state_dict` without changing anything; returns the loader.

        Lets an owner (``BreakEvenSGD``) check the monitor state before it loads its own,
        so a bad checkpoint never leaves it half loaded. Reads the states of sgdbreak 0.1
        too (warm-start vectors and calibration at the top level).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"monitor state must be a mapping, got {type(state).__name__}")
        try:
            step = int(state["step"])
            history = [dict(r) for r in state["history"]]
            events = [dict(e) for e in state["events"]]
            num_measurements = int(state["num_measurements"])
            skipped = dict(state["skipped"])
            generator = state["generator"].cpu()  # Accelerate may move optimizer state to GPU
            detector_state = state["detector"]
            trigger_states = dict(state["triggers"])
            quantity_states = (dict(state["quantities"]) if "quantities" in state else {
                "sharpness": {"warm_vectors": state["warm_vectors"], "num_solves": num_measurements},
                "update_sharpness": {"calibration": state["calibration"]}})
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"malformed sgdbreak monitor state ({type(err).__name__}: {err})") from err
        # Each part loads into a copy first: it raises there if it does not fit.
        copy.deepcopy(self.detector).load_state_dict(detector_state)
        parts = [(t, trigger_states[name]) for name, t in self._triggers()
                 if name in trigger_states and hasattr(t, "load_state_dict")]
        parts += [(q, quantity_states[q.name]) for q in self.quantities
                  if q.name in quantity_states and hasattr(q, "load_state_dict")]
        for part, part_state in parts:
            try:
                copy.copy(part).load_state_dict(part_state)
            except (KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"malformed sgdbreak state for {part!r} ({type(err).__name__}: {err})") from err
        torch.Generator().set_state(generator)

        def load() -> None:
            self.step, self.history, self.events = step, history, events
            self.num_measurements, self.skipped = num_measurements, skipped
            self.generator.set_state(generator)
            self.detector.load_state_dict(detector_state)
            for part, part_state in parts:
                part.load_state_dict(part_state)

        return load

    # ------------------------------------------------------------------ copies
    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles keep every measurement but no logger, hook or step hook.

        Loggers own files and tracker runs that a copy must not write to twice; hooks belong
        to the caller of the original. A copy of an attached monitor attaches itself to the
        copied optimizer.
        """
        state = self.__dict__.copy()
        state.update(loggers=[], _measurement_hooks=OrderedDict(), _break_even_hooks=OrderedDict(),
                     _attached=[], _was_attached=bool(self._attached))
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        was_attached = state.pop("_was_attached", False)
        self.__dict__.update(state)
        if was_attached and self.optimizer is not None:
            self.attach(self.optimizer)

    def close(self) -> None:
        """Close the loggers (writes summaries)."""
        for logger in self.loggers:
            logger.close()


def _merge(record: dict[str, float], seen: dict[str, float], quantity: Any, entries: Any) -> None:
    """Add a quantity's entries to the record (and to what later quantities see)."""
    if not isinstance(entries, Mapping):
        raise TypeError(f"quantity {quantity.name!r}: compute() must return a mapping of record keys "
                        f"to numbers, got {type(entries).__name__}")
    for key, value in entries.items():
        if not isinstance(key, str) or key in record:
            raise ValueError(f"quantity {quantity.name!r} returns the key {key!r}, which is not a new "
                             "string key of the record")
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"quantity {quantity.name!r}: record[{key!r}] must be a real number, "
                            f"got {value!r}")
        record[key] = seen[key] = float(value)


def _call_all(calls: list[tuple[str, Callable[[], Any]]]) -> None:
    """Run every call; raise the first exception after all ran, naming who raised it."""
    first: BaseException | None = None
    for name, call in calls:
        try:
            call()
        except Exception as err:  # re-raised below, after the others ran
            if first is None:
                first = err
                if hasattr(err, "add_note"):
                    err.add_note(f"sgdbreak: raised by {name}; the record and any break-even "
                                 "event were kept and delivered to every other consumer")
    if first is not None:
        raise first


def _check_processes(probe: Probe) -> None:
    """Refuse a plain Probe on several processes: each would measure its own shard."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    size = dist.get_world_size()
    if size > 1 and getattr(probe, "world_size", None) is None:
        raise RuntimeError(
            f"{size} processes share this run but the probe is a plain Probe: each process would "
            "measure its own data, and triggers, the detector and any policy could act "
            "differently per process. Use sgdbreak.DistributedProbe (pass the "
            "same probe data on every process with split=True, or each process's shard) and "
            "call sgdbreak.prepare_monitor after accelerator.prepare")


def _observe_mode(trigger: Any) -> str | None:
    """How a trigger wants records: None (it has no ``observe``), "record", or "flag".

    "flag": its ``observe`` also takes ``break_even_reached=`` (decided once, when the
    monitor is built, not per record).
    """
    observe = getattr(trigger, "observe", None)
    if observe is None:
        return None
    try:
        return "flag" if "break_even_reached" in inspect.signature(observe).parameters else "record"
    except (TypeError, ValueError):
        return "record"


def _observe(trigger: Any, mode: str | None, record: Mapping[str, float], reached: bool) -> None:
    """Show a trigger the new record (and whether break-even is reached, if it asks)."""
    if mode == "flag":
        trigger.observe(record, break_even_reached=reached)
    elif mode == "record":
        trigger.observe(record)
