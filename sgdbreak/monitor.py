"""The run monitor: when and what to measure, warm starts, history and break-even.

:class:`BreakEvenMonitor` is the one stateful object of sgdbreak. It decides after each
optimizer step whether to measure (triggers), measures on a :class:`~sgdbreak.Probe`
(λ1^H by warm-started Lanczos, the noise spectrum K, s² for Eq. 1, α*, ‖γ‖, and a cheap
forward-only sharpness along the actual update), feeds the records to the break-even
detector and to loggers, and checkpoints all of it. ``BreakEvenSGD`` owns one; any torch
optimizer can use one through :meth:`BreakEvenMonitor.attach`. Schedulers and batch
samplers read ``monitor.latest`` / ``monitor.break_even``.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from . import breakeven as be
from .errors import NonFiniteMeasurement
from .hessian import HessianOperator, eigenvalues_of_operator
from .linalg import hutchinson_trace
from .probe import Probe
from .triggers import Adaptive, DenseUntilBreakEven, as_trigger

MEASUREMENTS = ("hessian", "trace", "noise", "curvature_variance", "alpha_star", "bn_gamma_norm")
DEFAULT_MEASUREMENTS = ("hessian", "noise", "bn_gamma_norm")

# The cheap signal's curvature is trusted (calibrated, fed to the detector) only when its
# error bound is at most this fraction of its value.
UPDATE_SHARPNESS_MAX_RELATIVE_ERROR = 0.1
# Rounding of one evaluated loss, in machine epsilons of max(|loss|, 1): measured errors of
# float32 mean cross-entropies against float64 were below 1 (MLPs, 128 examples); the floor
# of 1 covers a small loss computed as a difference of larger logits.
_LOSS_ROUNDING_EPS = 16.0


class BreakEvenMonitor:
    """Tracks curvature and gradient noise along a run and detects break-even.

    Args:
        probe: the measurement set (:class:`~sgdbreak.Probe`).
        optimizer: the optimizer whose ``param_groups[group]`` gives lr and momentum
            (optional; ``BreakEvenSGD`` and :meth:`attach` set it).
        measure_every: trigger for full measurements: an int (every n steps), a callable
            ``step -> bool`` (see :mod:`sgdbreak.triggers`) or None. Default
            :class:`~sgdbreak.triggers.Adaptive` (dense while λ1^H moves, sparse after).
        cheap_every: trigger for the cheap signal (three forward passes on
            ``cheap_examples`` probe examples along the actual update: ``update_sharpness``
            and ``critical_sharpness``, calibrated against λ1^H into
            ``stability_ratio_update``). Default
            :class:`~sgdbreak.triggers.DenseUntilBreakEven`: every 10 steps until
            break-even is detected, every 50 after; an int n means every n steps
            throughout; None disables it.
        measurements: which full measurements to take, from
            ``("hessian", "trace", "noise", "curvature_variance", "alpha_star", "bn_gamma_norm")``.
            ``curvature_variance`` (s², Eq. 1) needs ``dataset_size`` and ``batch_size``.
        hessian_k: number of top Hessian eigenvalues (``eig_H_1..k``).
        hessian_tol: relative accuracy of λ1^H.
        max_hvps: product budget per Lanczos measurement.
        trace_samples: Hutchinson probes for ``trace_H`` (when "trace" is measured).
        noise_method: "microbatch" (the paper's) or "per_example".
        noise_samples: L, number of gradient samples.
        noise_batch_size: M, examples per micro-batch (default ``min(128, N_probe // L)``:
            disjoint batches). K is reported in per-example units with the finite-population
            factor of :func:`sgdbreak.samples.batch_mean_covariance_scale`.
        noise_k: number of ``eig_K_i`` entries logged.
        curvature_groups: groups for s² (one small product each).
        dataset_size, batch_size: N and S of Eq. 1 (never guessed).
        cheap_examples: probe examples used by the cheap signal and α*.
        steps_per_epoch: adds ``epoch`` to records.
        detector: a :class:`~sgdbreak.breakeven.BreakEvenDetector` (default: all rules,
            the cheap-signal ratio needing two consecutive confirmations).
        loggers: objects with ``log_measurement(record)``, ``log_event(event)``, ``close()``.
        group: index of the parameter group whose lr / momentum define stability.
        cold_restart_every: take a cold (random) Lanczos start every n measurements
            (guards against a warm start missing a new top eigenvector); None = never.
        seed: seeds the measurement generator (random starts, micro-batches); the global
            RNG is never touched, so training is identical with and without measuring.
    """

    def __init__(
        self,
        probe: Probe,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        measure_every: Any = "default",
        cheap_every: Any = "default",
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
        steps_per_epoch: int | None = None,
        detector: be.BreakEvenDetector | None = None,
        loggers: Iterable[Any] = (),
        group: int = 0,
        cold_restart_every: int | None = None,
        seed: int = 0,
    ):
        if not isinstance(probe, Probe):
            raise TypeError(f"probe must be a sgdbreak.Probe, got {type(probe).__name__}")
        self.probe = probe
        self.optimizer: torch.optim.Optimizer | None = None
        self.measure_trigger = Adaptive() if measure_every == "default" else as_trigger(measure_every)
        self.cheap_trigger = (DenseUntilBreakEven() if cheap_every == "default"
                              else as_trigger(cheap_every, "cheap_every"))
        self.measurements = tuple(measurements)
        unknown = set(self.measurements) - set(MEASUREMENTS)
        if unknown:
            raise ValueError(f"unknown measurements {sorted(unknown)}; choose from {MEASUREMENTS}")
        for name, value, low in [("hessian_k", hessian_k, 1), ("max_hvps", max_hvps, 1),
                                 ("trace_samples", trace_samples, 2), ("noise_samples", noise_samples, 2),
                                 ("noise_k", noise_k, 1), ("curvature_groups", curvature_groups, 2),
                                 ("cheap_examples", cheap_examples, 1), ("group", group, 0)]:
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        if not (isinstance(hessian_tol, (int, float)) and hessian_tol > 0):
            raise ValueError(f"hessian_tol must be > 0, got {hessian_tol!r}")
        if noise_method not in ("microbatch", "per_example"):
            raise ValueError(f"noise_method must be 'microbatch' or 'per_example', got {noise_method!r}")
        if "curvature_variance" in self.measurements and (dataset_size is None or batch_size is None):
            raise ValueError("measuring curvature_variance (Eq. 1) needs dataset_size and batch_size")
        for name, value in [("dataset_size", dataset_size), ("batch_size", batch_size),
                            ("steps_per_epoch", steps_per_epoch), ("noise_batch_size", noise_batch_size),
                            ("cold_restart_every", cold_restart_every)]:
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")
        if dataset_size is not None and batch_size is not None and batch_size > dataset_size:
            raise ValueError(f"batch_size={batch_size} exceeds dataset_size={dataset_size}")
        self.hessian_k, self.hessian_tol, self.max_hvps = hessian_k, float(hessian_tol), max_hvps
        self.trace_samples = trace_samples
        self.noise_method, self.noise_samples, self.noise_k = noise_method, noise_samples, noise_k
        n = probe.num_examples
        # Default: disjoint micro-batches (L·M ≤ N) of at most the paper's 128.
        self.noise_batch_size = noise_batch_size or max(1, min(128, n // noise_samples))
        if self.noise_batch_size >= n:
            raise ValueError(f"noise_batch_size={self.noise_batch_size} must be smaller than the probe size {n}")
        self.curvature_groups = min(curvature_groups, n)
        if not probe.single_example_batches:
            _check_batchnorm_batches(
                noise_batch_size=self.noise_batch_size if noise_method == "microbatch" else None,
                cheap_examples=min(cheap_examples, n),
                curvature_group_size=(n // self.curvature_groups
                                      if "curvature_variance" in self.measurements else None))
        _check_processes(probe)
        self.dataset_size, self.batch_size = dataset_size, batch_size
        self.steps_per_epoch = steps_per_epoch
        self.detector = detector if detector is not None else be.BreakEvenDetector(confirm=2)
        self.loggers = list(loggers)
        self.group = group
        self.cold_restart_every = cold_restart_every
        self.generator = torch.Generator().manual_seed(seed)
        cheap = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: min(cheap_examples, n)]
        self.cheap_indices = cheap.sort().values

        self.step = 0
        self.history: list[dict[str, float]] = []
        self.events: list[dict[str, Any]] = []
        self.warm_vectors: Tensor | None = None
        self.calibration: float | None = None  # EMA of lambda1_H / update_sharpness
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

    # ------------------------------------------------------------------ public views
    @property
    def latest(self) -> Mapping[str, float] | None:
        """The last record (full measurement or cheap signal), or None before the first."""
        return self.history[-1] if self.history else None

    @property
    def latest_full(self) -> Mapping[str, float] | None:
        """The last record holding ``lambda1_H`` (a full curvature measurement)."""
        for record in reversed(self.history):
            if "lambda1_H" in record:
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
        if result.reached:
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
        returns it and keep ``maximize=False``; the update is the same), and an optimizer
        that updates none of the probe's parameters (it would measure an untrained model).
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
        if inside < len(self.probe.params):
            warnings.warn(
                f"the optimizer updates {inside} of the probe's {len(self.probe.params)} parameter "
                "tensors; λ1^H and K include the others: pass Probe(..., params=<the optimized "
                "parameters>) to measure only what is trained", RuntimeWarning, stacklevel=3)
        self.optimizer = optimizer

    def attach(self, optimizer: torch.optim.Optimizer) -> BreakEvenMonitor:
        """Measure around ``optimizer.step()`` of any torch optimizer via step hooks."""
        self.bind(optimizer)
        self._attached = [
            optimizer.register_step_pre_hook(lambda opt, args, kwargs: self.before_step()),
            optimizer.register_step_post_hook(lambda opt, args, kwargs: self.after_step()),
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
        """Snapshot parameters when the coming step will be measured (the update is needed)."""
        if not self._processes_checked:
            _check_processes(self.probe)  # before the first update: nothing is lost
            self._processes_checked = True
        nxt = self.step + 1
        # Full measurements also take the cheap signal (to calibrate it) and α* needs Δ.
        needs_update = self._wants(self.cheap_trigger, nxt) or (
            self._wants(self.measure_trigger, nxt)
            and (self.cheap_trigger is not None or "alpha_star" in self.measurements))
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
        if self.optimizer is None:
            return {}
        g = self.optimizer.param_groups[self.group]
        out = {"lr": float(g["lr"])}
        for key in ("momentum", "dampening", "weight_decay"):
            if key in g:
                out[key] = float(g[key])
        out["nesterov"] = bool(g.get("nesterov", False))
        return out

    def measure(self, *, full: bool = True, before: list[Tensor] | None = None) -> dict[str, float] | None:
        """Measure now (at ``self.step``) and process the record. Returns it, or None if skipped.

        Args:
            full: take the full measurement set (else only the cheap signal).
            before: parameters before the last step (for the cheap signal and α*).
        """
        start = time.perf_counter()
        hyper = self._hyper()
        record: dict[str, float] = {"step": self.step}
        if self.steps_per_epoch:
            record["epoch"] = self.step / self.steps_per_epoch
        for key in ("lr", "momentum"):
            if key in hyper:
                record[key] = hyper[key]
        try:
            if before is not None:
                record.update(self._cheap_signal(before, hyper))
            if full:
                record.update(self._full(before, hyper))
        except NonFiniteMeasurement as err:
            self._skip(str(err))
            return None
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
        calls = [(f"trigger {t!r}", lambda t=t: t.on_skip(self.step))
                 for t in (self.measure_trigger, self.cheap_trigger) if hasattr(t, "on_skip")]
        calls += [(f"logger {lg!r}", lambda lg=lg: lg.log_event(event)) for lg in self.loggers]
        _call_all(calls)

    def _process(self, record: dict[str, float]) -> None:
        """Update the state first, then tell everyone; a failing consumer loses nothing.

        The record enters the history and a new break-even event enters ``events`` before
        any trigger, logger or hook runs; each of those runs even if an earlier one raised,
        and the first exception is raised after all of them.
        """
        self._update_calibration(record)
        reached_before = self.detector.result.reached
        self.detector.update(record)
        self.history.append(record)
        result = self.detector.result
        event = result.to_event() if result.reached and not reached_before else None
        if event is not None:
            self.events.append(event)
        calls = [(f"trigger {t!r}", lambda t=t: _observe(t, record, result.reached))
                 for t in (self.measure_trigger, self.cheap_trigger)]
        calls += [(f"logger {lg!r}", lambda lg=lg: lg.log_measurement(record)) for lg in self.loggers]
        calls += [(f"measurement hook {fn!r}", lambda fn=fn: fn(record))
                  for fn in list(self._measurement_hooks.values())]
        if event is not None:
            calls += [(f"logger {lg!r}", lambda lg=lg: lg.log_event(event)) for lg in self.loggers]
            calls += [(f"break-even hook {fn!r}", lambda fn=fn: fn(result))
                      for fn in list(self._break_even_hooks.values())]
        _call_all(calls)

    def _full(self, before: list[Tensor] | None, hyper: Mapping[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        probe = self.probe
        gradient = None
        with probe.measuring():
            if "hessian" in self.measurements or "trace" in self.measurements:
                op = probe.hessian_operator()
                out["loss"] = float(op.loss)
                gradient = getattr(op, "gradient", None)
                if "hessian" in self.measurements:
                    out.update(self._hessian(op, hyper))
                if "trace" in self.measurements:
                    tr = hutchinson_trace(op, op.dim, num_samples=self.trace_samples, dtype=op.dtype,
                                          device=op.device, generator=self.generator)
                    out["trace_H"] = tr.value
                    out["trace_H_stderr"] = tr.stderr
                out["num_hvps"] = op.num_matvecs
                del op
        # Eq. 1 is the stability of a step along positive curvature; λ1^H <= 0 is no break-even.
        if ("curvature_variance" in self.measurements and self.warm_vectors is not None
                and out.get("lambda1_H", 0.0) > 0):
            s2 = probe.curvature_variance(self.warm_vectors[0], num_groups=self.curvature_groups,
                                          generator=self.generator)
            out["curvature_variance"] = s2  # a non-finite s² is dropped from the record below
            if "lr" in hyper and math.isfinite(s2):
                out["eq1_lhs"] = be.eq1_lhs(hyper["lr"] * (1 - hyper.get("dampening", 0.0)), out["lambda1_H"], s2,
                                            dataset_size=self.dataset_size, batch_size=self.batch_size)
        if "noise" in self.measurements:
            out.update(self._noise(gradient))
        if "alpha_star" in self.measurements and before is not None:
            out["alpha_star"] = self._alpha_star(before)
        if "bn_gamma_norm" in self.measurements:
            gamma = last_batchnorm_weight(probe.model)
            if gamma is not None:
                out["bn_gamma_norm"] = float(gamma.detach().double().norm())
        self.num_measurements += 1
        return out

    def _hessian(self, op: HessianOperator, hyper: Mapping[str, Any]) -> dict[str, float]:
        cold = self.cold_restart_every is not None and self.num_measurements % self.cold_restart_every == 0
        res = eigenvalues_of_operator(
            op, op.dim, self.hessian_k, tol=self.hessian_tol, max_hvps=self.max_hvps,
            warm_start=None if cold else self.warm_vectors, generator=self.generator,
            dtype=op.dtype, device=op.device,
        )
        self.warm_vectors = res.start_vectors.detach().clone()
        out = {"lambda1_H": float(res.eigenvalues[0]), "hessian_converged": float(res.converged)}
        for i, value in enumerate(res.eigenvalues.tolist()):
            out[f"eig_H_{i + 1}"] = value
        if self.hessian_k >= 5:
            out["top5_sum_H"] = float(res.eigenvalues[:5].sum())
        if "lr" in hyper:
            out["stability_ratio"] = self._ratio(out["lambda1_H"], hyper)
        return out

    def _ratio(self, sharpness: float, hyper: Mapping[str, Any]) -> float:
        return be.stability_ratio(
            hyper["lr"], sharpness, hyper.get("momentum", 0.0), dampening=hyper.get("dampening", 0.0),
            nesterov=hyper.get("nesterov", False), weight_decay=hyper.get("weight_decay", 0.0),
        )

    def _noise(self, gradient: Tensor | None) -> dict[str, float]:
        from .noise import noise_metrics
        from .samples import batch_mean_covariance_scale

        probe = self.probe
        samples = probe.gradient_samples(method=self.noise_method, num_samples=self.noise_samples,
                                         batch_size=self.noise_batch_size, generator=self.generator)
        if gradient is None:
            gradient = probe.gradient()
        if self.noise_method == "per_example":
            return noise_metrics(samples, gradient, batch_size=1, k=self.noise_k)
        scale = batch_mean_covariance_scale(probe.num_examples, self.noise_batch_size, self.noise_samples)
        return noise_metrics(samples, gradient, batch_size=self.noise_batch_size, k=self.noise_k, scale=scale)

    # ------------------------------------------------------------------ forward-only signals
    def _losses_along(self, before: list[Tensor], alphas: Iterable[float]) -> list[float]:
        """Cheap-batch losses at θ_t + α·Δ, Δ = θ_{t+1} − θ_t; parameters restored exactly."""
        params = self.probe.params
        after = [p.detach().clone() for p in params]
        out = []
        try:
            with self.probe.measuring():
                for alpha in alphas:
                    with torch.no_grad():
                        for p, b, a in zip(params, before, after):
                            p.copy_(_point_along(b, a, alpha))
                    out.append(self.probe.loss_value(self.cheap_indices))
        finally:
            with torch.no_grad():
                for p, a in zip(params, after):
                    p.copy_(a)
        return out

    def _cheap_signal(self, before: list[Tensor], hyper: Mapping[str, Any]) -> dict[str, float]:
        """Curvature along the actual update from three forward passes (no backward).

        With f(α) = L(θ_t + αΔ) on a fixed cheap batch, the points α = 0, 1, 2 give the
        secant curvature ``update_sharpness`` = (f(2) − 2f(1) + f(0))/‖Δ‖² (a Rayleigh
        quotient of H along Δ for a quadratic, so ≤ λ1^H) and the critical sharpness
        λ_c = 2/η_c, η_c = α_c·η the smallest step at which the loss rises back to f(0)
        (Kalra et al.). ``update_sharpness`` is calibrated against the last λ1^H.
        """
        f0, f1, f2 = self._losses_along(before, (0.0, 1.0, 2.0))
        params = self.probe.params
        delta_sq = sum(float((p.detach().double() - b.double()).pow(2).sum()) for p, b in zip(params, before))
        out: dict[str, float] = {}
        if delta_sq == 0:
            return out
        curvature = f2 - 2 * f1 + f0  # = 2b in f(α) = f0 + aα + bα²
        error = self._curvature_error(before, (f0, f1, f2), delta_sq, hyper.get("lr", 0.0))
        out["update_sharpness_error"] = error / delta_sq
        if not error <= UPDATE_SHARPNESS_MAX_RELATIVE_ERROR * abs(curvature):
            return out  # rounding could make up the value (tiny steps, low precision): not used
        out["update_sharpness"] = curvature / delta_sq
        slope = f1 - f0 - curvature / 2
        if "lr" in hyper and slope < 0 < curvature and hyper["lr"] > 0:
            alpha_c = -2 * slope / curvature
            out["critical_sharpness"] = 2.0 / (alpha_c * hyper["lr"])
        if out["update_sharpness"] > 0 and "lr" in hyper:
            scale = self.calibration if self.calibration is not None else 1.0
            out["lambda1_H_update"] = scale * out["update_sharpness"]
            out["stability_ratio_update"] = self._ratio(out["lambda1_H_update"], hyper)
        return out

    def _curvature_error(self, before: list[Tensor], losses: tuple[float, float, float],
                         delta_sq: float, lr: float) -> float:
        """Bound on the rounding error of f(2) − 2f(1) + f(0), in loss units.

        Two sources: each loss is rounded (a few machine epsilons of max(|f|, 1) over a
        forward pass, bounded generously), and θ_t + 2Δ is rounded to the parameters' dtype, which
        moves the third point off the line by e and f(2) by up to ‖g‖·‖e‖ (g the gradient:
        the training step's ``p.grad`` when every probe parameter has one, else ‖Δ‖/lr).
        """
        params = self.probe.params
        eps = torch.finfo(params[0].dtype).eps
        rounding = _LOSS_ROUNDING_EPS * eps * sum(w * max(abs(f), 1.0) for f, w in zip(losses, (1, 2, 1)))
        off_line_sq = 0.0
        for p, b in zip(params, before):
            exact = b.double() + 2 * (p.detach().double() - b.double())
            off_line_sq += float((_point_along(b, p.detach(), 2.0).double() - exact).pow(2).sum())
        grads = [p.grad for p in params]
        if all(g is not None for g in grads):
            grad_sq = sum(float(_dense(g).double().pow(2).sum()) for g in grads)
        else:
            grad_sq = delta_sq / lr**2 if lr > 0 else math.inf
        return rounding + math.sqrt(grad_sq * off_line_sq)

    def _alpha_star(self, before: list[Tensor], *, rise: float = 1.2, max_alpha: float = 1024.0) -> float:
        """α*: smallest α with L(θ_t − α(θ_t − θ_{t+1})) ≥ 1.2 L(θ_t) (paper §4), by doubling then bisection."""
        base = self._losses_along(before, (0.0,))[0]
        target = rise * base
        lo, hi = 0.0, 1.0
        while self._losses_along(before, (hi,))[0] < target:
            lo, hi = hi, hi * 2
            if hi > max_alpha:
                return float("inf")
        for _ in range(6):
            mid = 0.5 * (lo + hi)
            if self._losses_along(before, (mid,))[0] >= target:
                hi = mid
            else:
                lo = mid
        return hi

    def _update_calibration(self, record: Mapping[str, float]) -> None:
        # update_sharpness is only recorded when resolved above rounding (see _cheap_signal).
        if "lambda1_H" in record and record.get("update_sharpness", 0) > 0:
            ratio = record["lambda1_H"] / record["update_sharpness"]
            self.calibration = ratio if self.calibration is None else 0.5 * self.calibration + 0.5 * ratio

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly; tensors and Python values only."""
        trig = {}
        for name, trigger in (("measure", self.measure_trigger), ("cheap", self.cheap_trigger)):
            if hasattr(trigger, "state_dict"):
                trig[name] = trigger.state_dict()
        return {
            "step": self.step,
            "history": [dict(r) for r in self.history],
            "events": [dict(e) for e in self.events],
            "warm_vectors": self.warm_vectors,
            "calibration": self.calibration,
            "num_measurements": self.num_measurements,
            "skipped": dict(self.skipped),
            "generator": self.generator.get_state(),
            "detector": self.detector.state_dict(),
            "triggers": trig,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output (into a monitor built with the same settings).

        Everything is checked before anything changes: a state that does not fit raises a
        ``ValueError`` naming what differs and leaves the monitor as it was.
        """
        self.prepare_load(state)()

    def prepare_load(self, state: Mapping[str, Any]) -> Callable[[], None]:
        """Validate a :meth:`state_dict` without changing anything; returns the loader.

        Lets an owner (``BreakEvenSGD``) check the monitor state before it loads its own,
        so a bad checkpoint never leaves it half loaded.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"monitor state must be a mapping, got {type(state).__name__}")
        try:
            step = int(state["step"])
            history = [dict(r) for r in state["history"]]
            events = [dict(e) for e in state["events"]]
            wv = state["warm_vectors"]
            calibration = state["calibration"]
            num_measurements = int(state["num_measurements"])
            skipped = dict(state["skipped"])
            generator = state["generator"].cpu()  # Accelerate may move optimizer state to GPU
            detector_state = state["detector"]
            trigger_states = dict(state["triggers"])
        except (KeyError, TypeError, AttributeError, ValueError) as err:
            raise ValueError(f"malformed sgdbreak monitor state ({type(err).__name__}: {err})") from err
        if wv is not None:
            if not isinstance(wv, Tensor) or wv.dim() != 2 or wv.shape[1] != self.probe.dim:
                shape = tuple(wv.shape) if isinstance(wv, Tensor) else type(wv).__name__
                raise ValueError(
                    f"the state's warm-start vectors have shape {shape} but the probe measures "
                    f"{self.probe.dim} parameters: the checkpoint belongs to another model")
            wv = wv.to(device=self.probe.device, dtype=self.probe.params[0].dtype)
        copy.deepcopy(self.detector).load_state_dict(detector_state)  # raises if it does not fit
        triggers = [(t, trigger_states[name]) for name, t in
                    (("measure", self.measure_trigger), ("cheap", self.cheap_trigger))
                    if name in trigger_states and hasattr(t, "load_state_dict")]
        for trigger, trigger_state in triggers:
            copy.deepcopy(trigger).load_state_dict(trigger_state)
        torch.Generator().set_state(generator)

        def load() -> None:
            self.step, self.history, self.events = step, history, events
            self.warm_vectors, self.calibration = wv, calibration
            self.num_measurements, self.skipped = num_measurements, skipped
            self.generator.set_state(generator)
            self.detector.load_state_dict(detector_state)
            for trigger, trigger_state in triggers:
                trigger.load_state_dict(trigger_state)

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


def _point_along(before: Tensor, after: Tensor, alpha: float) -> Tensor:
    """θ_t + α(θ_{t+1} − θ_t) in the parameters' dtype; the end points exactly."""
    if alpha == 0.0:
        return before
    if alpha == 1.0:
        return after
    return before + alpha * (after - before)


def _dense(tensor: Tensor) -> Tensor:
    """The stored values of a (possibly sparse) gradient, for norms."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


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


def _check_batchnorm_batches(*, noise_batch_size: int | None, cheap_examples: int,
                             curvature_group_size: int | None) -> None:
    """Train-mode BatchNorm needs >= 2 examples in every batch a measurement forms."""
    for name, size in (("noise_batch_size", noise_batch_size), ("cheap_examples", cheap_examples),
                       ("examples per curvature group (probe size // curvature_groups)",
                        curvature_group_size)):
        if size is not None and size < 2:
            raise ValueError(
                f"{name} is {size}, but train-mode BatchNorm cannot normalise a batch of one "
                "example: use a larger probe or value, or Probe(..., batchnorm='eval')")


def _check_processes(probe: Probe) -> None:
    """Refuse a plain Probe on several processes: each would measure its own shard."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    size = dist.get_world_size()
    if size > 1 and getattr(probe, "world_size", None) is None:
        raise RuntimeError(
            f"{size} processes share this run but the probe is a plain Probe: each process would "
            "measure its own data, and triggers, the detector and any policy could act "
            "differently per process. Use sgdbreak.distributed.DistributedProbe (pass the "
            "same probe data on every process with split=True, or each process's shard) and "
            "call sgdbreak.distributed.prepare_monitor after accelerator.prepare")


def _observe(trigger, record: Mapping[str, float], reached: bool) -> None:
    """Show a trigger the new record, and whether break-even is reached if it asks."""
    observe = getattr(trigger, "observe", None)
    if observe is None:
        return
    try:
        wants = "break_even_reached" in inspect.signature(observe).parameters
    except (TypeError, ValueError):
        wants = False
    if wants:
        observe(record, break_even_reached=reached)
    else:
        observe(record)


def last_batchnorm_weight(model: nn.Module) -> Tensor | None:
    """The scale vector γ of the last BatchNorm layer (the paper's ‖γ‖), or None."""
    gamma = None
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            gamma = m.weight
    return gamma

