"""``ReplicaNoise``: gradient noise from the replica and micro-step gradients training computes anyway.

Under data parallelism every process computes its own batch gradient before DDP averages
them; with gradient accumulation every micro-step does too. Those gradients are free
samples: ``Tr K`` and the noise scale by the two-batch estimator (AdaScale, AdaptDL) and
``lambda1_K`` from their Gram matrix. Works on one process with accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..estimators.noise import NoiseScaleTracker, covariance_spectrum, two_batch_noise_scale
from .collectives import CommunicationStats, _Collectives, _unwrap_model, check_world_size

__all__ = ["ReplicaNoise"]


def _flat_grads(params: list[Tensor]) -> Tensor:
    return torch.cat([
        (p.grad.detach() if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params
    ])


class ReplicaNoise:
    """Gradient noise of the training batches from the replicas' own gradients.

    On a synchronising step each of the ``P`` processes has computed ``A`` micro-step
    gradients (``A`` = gradient-accumulation steps), each the mean over ``b`` training
    examples: ``P·A`` free samples of a batch-``b`` gradient, whose mean is the
    all-reduced gradient (batch ``B = P·A·b``). From them, every synchronising step:

    * two-batch estimator (McCandlish et al. 2018, App. A.1; AdaScale / AdaptDL use the
      same per-replica vs all-reduced norms): with ``S = mean ‖g_i‖²`` (batch ``b``) and
      ``G = ‖ḡ‖²`` (batch ``B``), ``trace_K_replica = (S − G)/(1/b − 1/B)`` and
      ``grad_norm_sq_replica = (B·G − b·S)/(B − b)``, unbiased; ``gns_replica`` = ratio
      of their exponential moving averages (:class:`~sgdbreak.estimators.noise.NoiseScaleTracker`).
      Costs one all-reduce of a scalar.
    * spectrum (every ``spectrum_every`` synchronising steps): the ``P·A`` gradients are
      all-gathered and :func:`~sgdbreak.covariance_spectrum` with ``scale=b`` gives
      ``lambda1_K_replica`` etc. Its trace equals ``trace_K_replica`` exactly.

    Units: per-example (scaled by ``b``), of the *training distribution* (not the probe):
    comparable to the monitor's ``lambda1_K`` / ``trace_K`` up to that difference.
    ``replica_batch_size`` (``b``) and ``replica_num_samples`` (``P·A``) are logged. With
    ``L = P·A`` samples, eigenvalues other than the trace carry the bias of
    ``docs/noise.md`` (large for small ``L``).

    On one process the same estimator runs on the ``A`` accumulation micro-batches: split
    a batch into ``A >= 2`` micro-batches and the numbers mean the same thing. It needs
    ``P·A >= 2`` samples.

    Call :meth:`after_backward` on every process right after each ``backward`` (every
    micro-step, before ``optimizer.step`` / ``zero_grad`` and gradient clipping). The
    accumulated gradient must be the mean of the micro-step gradients, as
    ``accelerator.backward`` makes it (it divides the loss by ``A``). With several
    processes the model must be the DDP module (``accelerator.prepare(model)``): a
    communication hook keeps this process's gradient before DDP averages it (a model
    that already has a communication hook cannot take this one; without an
    ``accelerator``, run the non-synchronising micro-steps under ``model.no_sync()``).
    Non-finite gradients (e.g. a step the fp16 scaler skips) are skipped on every process.

    Example (one process, two micro-batches):
        >>> model = nn.Linear(3, 2)
        >>> noise = ReplicaNoise(model, batch_size=8, accumulation_steps=2)
        >>> for _ in range(2):
        ...     (model(torch.randn(8, 3)).pow(2).mean() / 2).backward()
        ...     record = noise.after_backward()
        >>> record["replica_num_samples"], "trace_K_replica" in record
        (2, True)

    Args:
        model: the (DDP-wrapped, with several processes) model.
        batch_size: ``b``, examples per process per micro-step.
        accumulation_steps: ``A``; default ``accelerator.gradient_accumulation_steps`` or 1.
        accelerator: an ``accelerate.Accelerator`` (synchronising steps, fp16 scaler).
        process_group: torch.distributed group (default: the world).
        spectrum_every: compute the spectrum every n synchronising steps (None: never).
        k: number of ``eig_K_replica_i`` entries.
        sketch: optional linear map applied to each gradient before gathering (e.g.
            :class:`~sgdbreak.estimators.noise.CountSketch`) to cut the ``P·A·D`` gather to ``P·A·m``.
        beta: EMA decay of the noise-scale tracker.
        grad_scaler: a ``torch.amp.GradScaler`` whose scale divides the gradients
            (default ``accelerator.scaler``).
        params: the parameters (default: those of the model requiring grad).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int,
        accumulation_steps: int | None = None,
        accelerator=None,
        process_group=None,
        spectrum_every: int | None = 1,
        k: int = 5,
        sketch: Callable[[Tensor], Tensor] | None = None,
        beta: float = 0.95,
        grad_scaler=None,
        params: Iterable[Tensor] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        for name, value in (("batch_size", batch_size), ("k", k)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if spectrum_every is not None and (isinstance(spectrum_every, bool)
                                           or not isinstance(spectrum_every, int) or spectrum_every < 1):
            raise ValueError(f"spectrum_every must be a positive int or None, got {spectrum_every!r}")
        if accumulation_steps is None:
            accumulation_steps = getattr(accelerator, "gradient_accumulation_steps", 1) if accelerator else 1
        if isinstance(accumulation_steps, bool) or not isinstance(accumulation_steps, int) or accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be a positive int, got {accumulation_steps!r}")
        self._comm = _Collectives(process_group)
        check_world_size(accelerator=accelerator, process_group=process_group)
        self.world_size = self._comm.size
        if self.world_size * accumulation_steps < 2:
            raise ValueError(
                "replica noise needs at least two gradient samples per step: run 2+ processes or "
                f"split each batch into accumulation_steps >= 2 micro-batches (got P={self.world_size}, "
                f"A={accumulation_steps})")
        self.batch_size, self.accumulation_steps = batch_size, accumulation_steps
        self.accelerator, self.spectrum_every, self.k, self.sketch = accelerator, spectrum_every, k, sketch
        self.grad_scaler = grad_scaler if grad_scaler is not None else getattr(accelerator, "scaler", None)
        module = _unwrap_model(model, None)
        self.params: list[Tensor] = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
        if not self.params:
            raise ValueError("no parameter requires grad")
        self.tracker = NoiseScaleTracker(beta)
        self.step = 0
        self.num_skipped = 0
        self.history: list[dict[str, float]] = []
        self._captured: dict[int, Tensor] = {}
        self._reset_cycle()
        if self.world_size > 1:
            if not isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError(
                    "with several processes ReplicaNoise needs the DDP-wrapped model "
                    "(model = accelerator.prepare(model)) to see each replica's gradient before "
                    f"DDP averages it; got {type(model).__name__}")
            model.register_comm_hook(process_group, self._comm_hook)

    # ------------------------------------------------------------------ protocol
    def _comm_hook(self, state, bucket):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        for p, g in zip(bucket.parameters(), bucket.gradients()):
            self._captured[id(p)] = g.detach().clone()
        return allreduce_hook(state, bucket)

    def _reset_cycle(self) -> None:
        self._micro = 0
        self._previous: Tensor | None = None
        self._sum_sq = 0.0
        self._rows: list[Tensor] = []

    def _wants_spectrum(self) -> bool:
        return self.spectrum_every is not None and (self.step + 1) % self.spectrum_every == 0

    def _is_sync(self) -> bool:
        if self.accelerator is not None:
            return bool(self.accelerator.sync_gradients)
        return self._micro % self.accumulation_steps == 0

    def _scale(self) -> float:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return float(self.grad_scaler.get_scale())

    def after_backward(self) -> dict[str, float] | None:
        """Record this micro-step's gradient; on a synchronising step, estimate and return a record."""
        self._micro += 1
        sync = self._is_sync()
        if sync and self.world_size > 1:
            missing = [i for i, p in enumerate(self.params) if id(p) not in self._captured]
            if len(missing) == len(self.params):
                raise RuntimeError(
                    "no gradient passed through DDP's communication hook on this synchronising "
                    "step: call after_backward right after accelerator.backward(loss)")
            current = torch.cat([
                (self._captured[id(p)] if id(p) in self._captured else torch.zeros_like(p)).reshape(-1)
                for p in self.params])
            self._captured.clear()
        else:
            current = _flat_grads(self.params)
        increment = current if self._previous is None else current - self._previous
        self._previous = current.clone()
        sample = increment * (self.accumulation_steps / self._scale())
        self._sum_sq += float(sample.double().pow(2).sum())
        if self._wants_spectrum():
            self._rows.append((self.sketch(sample) if self.sketch is not None else sample).reshape(-1))
        if not sync:
            return None
        try:
            return self._estimate()
        finally:
            self._reset_cycle()

    def _estimate(self) -> dict[str, float] | None:
        n = self._micro
        total = self.world_size * n
        device = self.params[0].device
        small_sq = float(self._comm.mean(torch.tensor([self._sum_sq / n], dtype=torch.float64, device=device)))
        # p.grad now holds the (DDP-averaged) accumulation, (n/A)·ḡ in the scaler's units.
        mean = _flat_grads(self.params).double() * (self.accumulation_steps / n / self._scale())
        big_sq = float(mean.pow(2).sum())
        samples = None
        if self._rows:
            samples = self._comm.gather(torch.stack(self._rows)).reshape(total, -1)
        ok = math.isfinite(small_sq) and math.isfinite(big_sq) and (
            samples is None or bool(torch.isfinite(samples).all()))
        if not ok or total < 2:
            self.num_skipped += 1
            return None
        self.step += 1
        b = self.batch_size
        est = two_batch_noise_scale(small_sq, b, big_sq, b * total)
        self.tracker.update(est.grad_norm_sq, est.trace)
        record: dict[str, float] = {
            "step": self.step,
            "trace_K_replica": est.trace,
            "grad_norm_sq_replica": est.grad_norm_sq,
            "gns_replica": self.tracker.noise_scale,
        }
        if samples is not None:
            spec = covariance_spectrum(samples, k=min(self.k, total - 1), scale=b)
            record.update({
                "lambda1_K_replica": spec.lambda1,
                "lambda_star_K_replica": spec.lambda_star,
                "cond_K_replica": spec.cond,
                "stable_rank_K_replica": spec.stable_rank,
            })
            for i, value in enumerate(spec.eigenvalues.tolist()):
                record[f"eig_K_replica_{i + 1}"] = value
        record = {key: value for key, value in record.items() if math.isfinite(value)}
        record["replica_batch_size"] = b
        record["replica_num_samples"] = total
        self.history.append(record)
        return record

    @property
    def communication(self) -> CommunicationStats:
        """Payload handed to collectives so far (see :class:`CommunicationStats`)."""
        return self._comm.stats

    @property
    def latest(self) -> Mapping[str, float] | None:
        """The last record, or None."""
        return self.history[-1] if self.history else None

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        """Python values only (save at synchronising steps: a half-accumulated step is not kept)."""
        return {"step": self.step, "num_skipped": self.num_skipped,
                "tracker": self.tracker.state_dict(), "history": [dict(r) for r in self.history]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""
        self.step = int(state["step"])
        self.num_skipped = int(state["num_skipped"])
        self.tracker.load_state_dict(dict(state["tracker"]))
        self.history = [dict(r) for r in state["history"]]
        self._reset_cycle()
