"""Measuring on several processes: sharded probes, replica noise and Accelerate glue.

Under data parallelism (``accelerate launch``, ``torchrun``; torch.distributed underneath)
every process holds a copy of the model and a shard of the data. This module makes the
measurements of :mod:`sgdbreak` those of the *global* probe, identical on every process,
at a fraction of the single-process cost, and makes ``BreakEvenSGD`` and its monitor
behave when Accelerate wraps them:

* :class:`DistributedProbe`: a :class:`~sgdbreak.Probe` whose examples are split over the
  processes. Losses, gradients and Hessian-vector products are all-reduced explicitly
  (DDP does not reduce gradients taken with ``torch.autograd.grad``), micro-batch
  gradient samples are computed where their examples live and summed, so every process
  ends with the same estimates, equal to a single process measuring the union.
* :class:`ReplicaNoise`: the gradient noise of the training batches themselves, from the
  per-replica (and per accumulation micro-step) gradients that data parallelism computes
  anyway: ``Tr K`` and the noise scale by the two-batch estimator (AdaScale, AdaptDL)
  and ``lambda1_K`` from the Gram matrix of those gradients. Works on one process with
  gradient accumulation (micro-batches), with the same meaning.
* :func:`prepare_monitor`, :func:`unwrap_optimizer`, :func:`is_main_process`,
  :func:`check_world_size`: the glue for ``accelerator.prepare`` / ``save_state``.

See ``docs/distributed.md`` for launching, what is reduced and what it costs.
"""

from __future__ import annotations

import math
import numbers
import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import _validation as V
from .errors import NonFiniteMeasurement
from .hessian import HessianOperator, flatten
from .noise import NoiseScaleTracker, covariance_spectrum, two_batch_noise_scale
from .probe import ChunkedHessianOperator, Probe, _collect
from .samples import draw_batches

__all__ = [
    "CommunicationStats",
    "DistributedProbe",
    "ReplicaNoise",
    "check_world_size",
    "is_main_process",
    "prepare_monitor",
    "unwrap_optimizer",
]


# --------------------------------------------------------------------------- processes


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


# --------------------------------------------------------------------------- the probe


class DistributedProbe(Probe):
    """A probe split over processes that measures the global probe, identically everywhere.

    Each process holds an equal shard of the global probe of ``N = P·n`` examples. The
    global example ``g`` lives on process ``g % P`` at position ``g // P`` (a strided
    split: with ``split=True`` every process passes the whole probe and keeps
    ``data[rank::P]``, so global indices are the indices of the data passed). What is
    reduced (see ``docs/distributed.md``):

    * the probe loss, its gradient and every Hessian-vector product: the mean over
      processes of the shard means (equal shards make it the global mean), so λ1^H,
      Tr H, and the warm-started Lanczos of the monitor are the global probe's;
    * losses over a set of global indices (the monitor's cheap signal and α*) and the
      groups of s² (:meth:`curvature_variance`): each process takes its members, sums;
    * micro-batch gradient samples: batches are drawn from the global probe with the
      caller's generator (the same draws on every process, the same as a single-process
      :class:`~sgdbreak.Probe` with that generator); see ``microbatches``.

    ``num_examples`` is the global ``N`` (what the monitor scales with);
    ``local_num_examples``, ``inputs`` and ``targets`` are this process's shard.

    Args:
        model: the network, or its DDP / Accelerate-prepared wrapper (unwrapped here:
            the probe differentiates the module itself, outside DDP's hooks).
        criterion: a mean-reduction loss, as for :class:`~sgdbreak.Probe`.
        data: this process's shard (``split=False``) or the whole probe, identical on
            every process (``split=True``).
        split: keep ``data[rank::P]`` of a global probe.
        uneven: what to do when shards differ in size (or ``N`` is not a multiple of
            ``P`` with ``split``): "error" (default) or "trim" (drop the excess
            examples, with a warning). Equal shards are what make the mean of shard
            means the global mean.
        microbatches: how a micro-batch gradient sample is computed. "global": a batch
            is a uniform random subset of the global probe; each process differentiates
            its members (weighted by their share) and the rows are summed: exactly the
            single-process samples, each process doing 1/P of the work. "local": each
            batch lies in one shard and is computed whole by its owner (row ``j`` by
            process ``j % P``, batches drawn per shard), as needed with train-mode
            BatchNorm, whose statistics must cover the whole micro-batch. "auto"
            (default): "local" for a model with BatchNorm measured in train mode,
            "global" otherwise.
        process_group: torch.distributed group (default: the world).
        accelerator: an ``accelerate.Accelerator``; its process count is checked against
            torch.distributed and its ``unwrap_model`` is used.
        **probe_kwargs: ``chunk_size`` (per process; default the whole shard),
            ``batchnorm``, ``keep_graph``, ``forward``, ``params`` as for
            :class:`~sgdbreak.Probe`.

    Example (run under ``torchrun --nproc_per_node 2``; on one process it is a Probe):
        >>> model = nn.Linear(4, 3)
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> probe = DistributedProbe(model, nn.CrossEntropyLoss(), data, split=True)
        >>> probe.num_examples
        64
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Tensor, Tensor], Tensor],
        data,
        *,
        split: bool = False,
        uneven: str = "error",
        microbatches: str = "auto",
        process_group=None,
        accelerator=None,
        **probe_kwargs: Any,
    ):
        V.choice("uneven", uneven, ("error", "trim"))
        V.choice("microbatches", microbatches, ("auto", "global", "local"))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = _unwrap_model(model, accelerator)
        comm = _Collectives(process_group)
        check_world_size(accelerator=accelerator, process_group=process_group)
        inputs, targets = _collect(data)
        size, rank = comm.size, comm.rank
        if split:
            total = len(inputs)
            if total < size:
                raise ValueError(f"the probe has {total} examples, fewer than the {size} processes")
            if total % size:
                _uneven(uneven, f"the probe's {total} examples do not split evenly over {size} "
                                f"processes", f"drop the last {total % size}")
                total -= total % size
            inputs, targets = inputs[rank:total:size], targets[rank:total:size]
        else:
            # Sizes travel on the parameters' device (NCCL needs CUDA tensors).
            device = next(iter(model.parameters())).device
            sizes = comm.gather(torch.tensor([len(inputs)], device=device), count=False).reshape(-1).tolist()
            if len(set(sizes)) > 1:
                smallest = min(sizes)
                _uneven(uneven, f"probe shards differ in size across processes {sizes}",
                        f"keep the first {smallest} examples of each")
                inputs, targets = inputs[:smallest], targets[:smallest]
        super().__init__(model, criterion, (inputs, targets), **probe_kwargs)
        self.process_group = process_group
        self.world_size, self.rank = size, rank
        self.local_num_examples = len(self.inputs)
        self.num_examples = self.local_num_examples * size
        self._comm = comm
        self.reduce_mean = comm.mean if size > 1 else None
        if microbatches == "auto":
            microbatches = "local" if self.has_batchnorm and self.batchnorm == "train" else "global"
        self.microbatches = microbatches
        self.last_batches: Tensor | None = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ bookkeeping
    @property
    def communication(self) -> CommunicationStats:
        """Payload handed to collectives by this process so far (see :class:`CommunicationStats`)."""
        return self._comm.stats

    def local_indices(self, indices: Tensor) -> Tensor:
        """Positions in this shard of the global ``indices`` that live on this process."""
        idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_examples):
            raise ValueError(f"indices must lie in [0, {self.num_examples}) (global probe), "
                             f"got range [{int(idx.min())}, {int(idx.max())}]")
        return idx[idx % self.world_size == self.rank] // self.world_size

    def check_synchronized(self) -> None:
        """Raise if the model's parameters differ across processes (collective).

        Measurements assume one model: a probe built before ``accelerator.prepare`` sees
        the weights DDP broadcasts at prepare time, but not weights changed on one process
        only (e.g. a checkpoint loaded on rank 0).
        """
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).double() for p in self.params])
            weights = torch.linspace(1.0, 2.0, flat.numel(), dtype=torch.float64, device=flat.device)
            digest = torch.stack([flat.sum(), (flat * flat).sum(), (weights * flat).sum()])
        everyone = self._comm.gather(digest, count=False)
        if not bool((everyone == everyone[0]).all()):
            raise RuntimeError(
                "model parameters differ across processes: measure the model after "
                "accelerator.prepare (DDP broadcasts rank 0's weights) and load checkpoints "
                "on every process")

    def _local_loss(self, local: Tensor) -> Tensor:
        """Mean loss over positions of this shard (graph built)."""
        return Probe.loss_of_indices(self, local)

    def _zero_with_graph(self) -> Tensor:
        # A share of nothing: zero, but differentiable, so every process runs the same code.
        return self.params[0].reshape(-1)[0] * 0.0

    # ------------------------------------------------------------------ losses
    # ``loss()`` (inherited) is this shard's mean loss; its mean over processes is the
    # probe loss.

    def loss_of_indices(self, indices: Tensor) -> Tensor:
        """This process's share of the mean loss over the global ``indices``.

        ``(1/|I|) Σ_{i ∈ I on this process} loss_i`` with a graph; its sum over processes
        (and so the sum of its gradients) is the mean over ``I``. A zero with a graph when
        no member lives here.
        """
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() == 0:
            raise ValueError("indices is empty")
        local = self.local_indices(indices)
        if local.numel() == 0:
            return self._zero_with_graph()
        return self._local_loss(local) * (local.numel() / indices.numel())

    def loss_value(self, indices: Tensor | None = None) -> float:
        """Mean loss (no graph) over the global ``indices`` or the whole probe; same on every process."""
        with torch.no_grad():
            if indices is None:
                value = self.loss().detach().reshape(1)
                return float(self._comm.mean(value))
            value = self.loss_of_indices(indices).detach().reshape(1)
            return float(self._comm.sum(value))

    def _checked_local_loss(self) -> Tensor:
        """The shard loss with its graph, after checking the *global* loss is finite.

        Every process raises together (the check is on the reduced value), so a
        non-finite loss on one shard cannot leave the others waiting in a collective.
        """
        with torch.enable_grad():
            loss = self.loss().reshape(())
        total = self._comm.mean(loss.detach().reshape(1))
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteMeasurement(f"loss is not finite ({float(total)}) on at least one process; "
                             "nothing was measured")
        if not loss.requires_grad:
            raise ValueError("loss does not depend on params with autograd (built under torch.no_grad?)")
        return loss

    # ------------------------------------------------------------------ curvature
    def hessian_operator(self, *, hvp: str = "autograd") -> HessianOperator | ChunkedHessianOperator:
        """The Hessian of the global probe loss, all-reduced (call inside :meth:`measuring`)."""
        if hvp == "autograd" and not self.keep_graph and self.chunk_size < self.local_num_examples:
            return ChunkedHessianOperator(self)
        if hvp == "autograd":
            return HessianOperator(self.loss, self.params, method=hvp, reduce=self.reduce_mean,
                                   loss=self._checked_local_loss())
        self._checked_local_loss()
        return HessianOperator(self.loss, self.params, method=hvp, reduce=self.reduce_mean)

    def _group_rayleigh_quotients(self, v: Tensor, groups: list[Tensor]) -> Tensor:
        """vᵀH_g v of each *global* group: the processes' shares add up (one small all-reduce).

        Groups are drawn from the global probe with the monitor's generator (the same draw
        as a single process, see :meth:`sgdbreak.Probe.curvature_variance`).
        """
        quotients = []
        for idx in groups:
            with torch.enable_grad():
                share = self.loss_of_indices(idx).reshape(())
            # The local share is not checked for finiteness here (the reduced loss is).
            op = HessianOperator(lambda idx=idx: self.loss_of_indices(idx), self.params, loss=share)
            quotients.append(op.rayleigh_quotient(v))
        return self._comm.sum(torch.tensor(quotients, dtype=torch.float64, device=self.device)).cpu()

    # ------------------------------------------------------------------ gradients
    def gradient(self) -> Tensor:
        """The mean gradient of the global probe loss, flat, same on every process."""
        with self.measuring():
            total = torch.zeros(self.dim, dtype=self.params[0].dtype, device=self.device)
            for idx in self.chunks():
                with torch.enable_grad():
                    loss = self._local_loss(idx)
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += flatten(grads, self.params) * (len(idx) / self.local_num_examples)
        total = self._comm.mean(total)
        if not bool(torch.isfinite(total).all()):
            raise NonFiniteMeasurement("the probe gradient is not finite on at least one process")
        return total

    def gradient_samples(self, *, method: str = "microbatch", num_samples: int = 20,
                         batch_size: int = 128, generator: torch.Generator | None = None,
                         sketch=None) -> Tensor:
        """Gradient samples of the global probe, identical on every process, as (L, D) rows.

        ``method="microbatch"``: ``L`` gradients of mean losses over ``M = batch_size``
        global probe examples; their covariance is K/M (per-example units: the factor of
        :func:`sgdbreak.samples.batch_mean_covariance_scale` with the global ``N``, which
        the monitor applies). How a row is computed depends on ``microbatches`` (see the
        class); the global indices of the batches are kept in ``last_batches``.
        Communication: one all-reduce of the ``(L, D)`` rows (``(L, m)`` with a sketch).
        ``method="per_example"``: the ``N`` per-example gradients, all-gathered in global
        order (``N·D`` values, ``N·m`` with a sketch).
        """
        if method == "per_example":
            local = super().gradient_samples(method="per_example", sketch=sketch)
            rows = self._comm.gather(local)  # (P, n, D); global g = s + P·l
            return rows.transpose(0, 1).reshape(self.num_examples, -1)
        if method != "microbatch":
            raise ValueError(f"method must be 'microbatch' or 'per_example', got {method!r}")
        for name, value, low in (("num_samples", num_samples, 1), ("batch_size", batch_size, 1)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
        batches, owners = self._draw(num_samples, batch_size, generator)
        self.last_batches = batches
        width = self.dim if sketch is None else sketch(
            torch.zeros(self.dim, dtype=self.params[0].dtype, device=self.device)).numel()
        out = torch.zeros(num_samples, width, dtype=self.params[0].dtype, device=self.device)
        with self.measuring():
            for j in range(num_samples):
                if owners is not None and owners[j] != self.rank:
                    continue
                local = self.local_indices(batches[j])
                if local.numel() == 0:
                    continue
                with torch.enable_grad():
                    loss = self._local_loss(local) * (local.numel() / batch_size)
                flat = flatten(torch.autograd.grad(loss, self.params, allow_unused=True), self.params)
                out[j] = (sketch(flat) if sketch is not None else flat).reshape(-1)
        out = self._comm.sum(out)
        finite = torch.isfinite(out).all(dim=1)
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise NonFiniteMeasurement(f"gradient samples {bad} are not finite (nan or inf loss or gradient "
                             f"on those batches of {batch_size} examples)")
        return out

    def _draw(self, num_samples: int, batch_size: int,
              generator: torch.Generator | None) -> tuple[Tensor, list[int] | None]:
        """Global indices ``(L, M)`` of the micro-batches, and each row's owner ("local")."""
        if self.microbatches == "global" or self.world_size == 1:
            return draw_batches(self.num_examples, batch_size, num_samples, generator), None
        n, size = self.local_num_examples, self.world_size
        if batch_size > n:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} examples of a shard: with "
                f"microbatches='local' (train-mode BatchNorm) a micro-batch lies in one "
                f"process's shard; lower noise_batch_size")
        # Same disjoint / independent choice as batch_mean_covariance_scale(N, M, L).
        disjoint = num_samples * batch_size <= self.num_examples
        per_shard = [len(range(s, num_samples, size)) for s in range(size)]
        if disjoint and max(per_shard) * batch_size > n:
            disjoint = False
            self._warn_once("overlap", (
                f"{num_samples} micro-batches of {batch_size} split over {size} shards of {n} "
                f"cannot be disjoint within each shard; drawing them independently, so the "
                f"per-example factor (which assumes disjoint batches) is off by about "
                f"{batch_size / n:.1%}: use a number of samples divisible by {size}"))
        batches = torch.empty(num_samples, batch_size, dtype=torch.long)
        for s in range(size):  # every process draws every shard's batches: same RNG state
            rows = list(range(s, num_samples, size))
            if not rows:
                continue
            if disjoint:
                local = draw_batches(n, batch_size, len(rows), generator)
            else:
                local = torch.cat([draw_batches(n, batch_size, 1, generator) for _ in rows])
            batches[rows] = local * size + s
        return batches, [j % size for j in range(num_samples)]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"sgdbreak: {message}", RuntimeWarning, stacklevel=3)


def _uneven(mode: str, problem: str, remedy: str) -> None:
    if mode == "error":
        raise ValueError(
            f"{problem}; the global probe mean is the mean of shard means only for equal "
            f"shards: pass equal shards, or uneven='trim' to {remedy}")
    warnings.warn(f"sgdbreak: {problem}; trimming: {remedy}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- replica noise


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
      of their exponential moving averages (:class:`~sgdbreak.noise.NoiseScaleTracker`).
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
            :class:`~sgdbreak.noise.CountSketch`) to cut the ``P·A·D`` gather to ``P·A·m``.
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
        self.params = [p for p in module.parameters() if p.requires_grad] if params is None else list(params)
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


# --------------------------------------------------------------------------- Accelerate glue


def unwrap_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` wrappers."""
    seen = 0
    while type(optimizer).__name__ == "AcceleratedOptimizer" and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
        seen += 1
        if seen > 8:
            break
    return optimizer


def prepare_monitor(accelerator, optimizer=None, *, monitor=None, check: bool = True):
    """Make a run monitor behave under Accelerate; call after ``accelerator.prepare``.

    * finds the monitor (``BreakEvenSGD.monitor``, or ``monitor=`` for one attached to
      another optimizer) and, if it was attached to the ``AcceleratedOptimizer`` wrapper,
      moves its hooks to the inner optimizer (the wrapper calls the inner ``step`` only on
      synchronising steps, and not at all when the fp16 scaler skips a step, so
      measurements follow real updates);
    * registers a monitor that the optimizer's ``state_dict`` does not carry with
      ``accelerator.register_for_checkpointing`` (``BreakEvenSGD`` keeps it under the key
      ``"sgdbreak"``, so ``save_state`` / ``load_state`` already restore it);
    * with several processes: checks the probe is a :class:`DistributedProbe` (otherwise
      the processes would measure different probes and disagree) and that the weights
      agree, and drops loggers on processes other than the main one (with a warning:
      create them only where :func:`is_main_process`).

    Returns:
        The monitor.
    """
    from .monitor import BreakEvenMonitor

    inner = unwrap_optimizer(optimizer) if optimizer is not None else None
    if monitor is None:
        monitor = getattr(inner, "monitor", None)
        if monitor is None:
            raise ValueError("no monitor: pass a BreakEvenSGD with a probe, or monitor=")
    if not isinstance(monitor, BreakEvenMonitor):
        raise TypeError(f"monitor must be a BreakEvenMonitor, got {type(monitor).__name__}")
    size = check_world_size(accelerator=accelerator) if check else accelerator.num_processes
    if optimizer is not None and monitor.optimizer is not None and monitor.optimizer is not inner:
        if unwrap_optimizer(monitor.optimizer) is inner:
            monitor.detach()
            monitor.attach(inner)
    carried = inner is not None and getattr(inner, "monitor", None) is monitor
    if not carried:
        accelerator.register_for_checkpointing(monitor)
    if size > 1:
        if not isinstance(monitor.probe, DistributedProbe):
            raise ValueError(
                f"{size} processes but the probe is a plain Probe: each process would measure "
                "its own data and the measurements (and triggers) would disagree; use "
                "sgdbreak.distributed.DistributedProbe")
        if check:
            monitor.probe.check_synchronized()
        if monitor.loggers and not accelerator.is_main_process:
            warnings.warn("sgdbreak: dropping the monitor's loggers on a non-main process; create "
                          "loggers only where sgdbreak.distributed.is_main_process()",
                          RuntimeWarning, stacklevel=2)
            monitor.loggers = []
    return monitor
