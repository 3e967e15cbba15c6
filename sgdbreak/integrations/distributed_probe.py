"""``DistributedProbe``: the global probe, split over processes, measured identically everywhere."""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..errors import NonFiniteMeasurement
from ..estimators.hessian import HessianOperator, flatten
from ..estimators.samples import draw_batches
from ..measurement import batches as B
from ..measurement.probe import ChunkedHessianOperator, Probe
from .collectives import CommunicationStats, _Collectives, _unwrap_model, check_world_size

__all__ = ["DistributedProbe"]


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
    ``local_num_examples`` and ``data`` (``inputs`` and ``targets`` in the short form) are
    this process's shard.

    Args:
        model: the network, or its DDP / Accelerate-prepared wrapper (unwrapped here:
            the probe differentiates the module itself, outside DDP's hooks).
        criterion: a mean-reduction loss (the short form, batches ``(inputs, targets)``),
            as for :class:`~sgdbreak.Probe`.
        data: this process's shard (``split=False``) or the whole probe, identical on
            every process (``split=True``): batches of any structure of tensors, split
            along dim 0, as for :class:`~sgdbreak.Probe`.
        loss_fn: (keyword, instead of ``criterion``) ``loss_fn(model, batch) -> scalar``
            mean loss, as for :class:`~sgdbreak.Probe`.
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
        criterion: Callable[[Any, Any], Tensor] | None = None,
        data: Any = None,
        *,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
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
        self._comm = comm
        self.process_group = process_group
        self.world_size, self.rank = comm.size, comm.rank
        self._split, self._uneven = bool(split), uneven
        # Probe.__init__ collects the data and asks _local_batch for this process's shard.
        super().__init__(model, criterion, data, loss_fn=loss_fn, **probe_kwargs)
        self.local_num_examples = B.num_examples(self.data)
        self.num_examples = self.local_num_examples * self.world_size
        self.reduce_mean = comm.mean if self.world_size > 1 else None
        if microbatches == "auto":
            microbatches = "local" if self.has_batchnorm and self.batchnorm == "train" else "global"
        self.microbatches = microbatches
        self.last_batches: Tensor | None = None
        self._warned: set[str] = set()

    def _local_batch(self, batch: Any) -> Any:
        """This process's shard: ``batch[rank::P]`` with ``split``, else ``batch`` (sizes checked)."""
        size, rank = self.world_size, self.rank
        total = B.num_examples(batch)
        if self._split:
            if total < size:
                raise ValueError(f"the probe has {total} examples, fewer than the {size} processes")
            if total % size:
                _uneven(self._uneven, f"the probe's {total} examples do not split evenly over "
                                      f"{size} processes", f"drop the last {total % size}")
                total -= total % size
            return B.select(batch, slice(rank, total, size))
        # Sizes travel on the parameters' device (NCCL needs CUDA tensors).
        sizes = self._comm.gather(torch.tensor([total], device=self.params[0].device),
                                  count=False).reshape(-1).tolist()
        if len(set(sizes)) > 1:
            smallest = min(sizes)
            _uneven(self._uneven, f"probe shards differ in size across processes {sizes}",
                    f"keep the first {smallest} examples of each")
            return B.select(batch, slice(0, smallest))
        return batch

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
            op = HessianOperator(functools.partial(self.loss_of_indices, idx), self.params, loss=share)
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
        :func:`sgdbreak.estimators.samples.batch_mean_covariance_scale` with the global ``N``, which
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
