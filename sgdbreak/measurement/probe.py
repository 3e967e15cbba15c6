"""The probe: the fixed set of examples on which curvature and noise are measured.

The paper measures on a random 5 % of the training set. A :class:`Probe` holds those
examples, builds loss closures for the estimators (the mean loss over all probe
examples, in chunks), draws gradient samples for the noise spectrum, and guarantees that
measuring leaves the model as it found it: module ``training`` flags and buffers
(BatchNorm running statistics) are restored after every measurement.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import NonFiniteMeasurement
from ..estimators.hessian import (
    HessianEigenResult,
    HessianOperator,
    HessianTraceResult,
    check_params,
    eigenvalues_of_operator,
    evaluate_loss,
    flatten,
    unflatten,
)
from ..estimators.linalg import hutchinson_trace
from . import batches as B

__all__ = ["ChunkedHessianOperator", "CriterionLoss", "Probe", "call_model"]

_BATCHNORM_MODES = ("train", "eval")


_MEAN_REDUCTIONS = ("mean", "batchmean")


def _is_batchnorm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def call_model(model: nn.Module, inputs: Tensor) -> Tensor:
    """The default ``forward``: ``model(inputs)`` (a module-level function, so probes pickle)."""
    return model(inputs)


def _describe_part(part: Any) -> str:
    """dtype and per-example shape of a tensor, or the structure of a nested part of a batch."""
    if isinstance(part, Tensor):
        return f"{part.dtype}, shape {tuple(part.shape[1:])} per example"
    return B.describe(part)


def _twice_differentiable_attention() -> contextlib.AbstractContextManager:
    """Scaled dot-product attention by its math kernel, which autograd can differentiate twice."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3: no kernel choice
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _rng_devices(params: list[Tensor]) -> list[int]:
    """CUDA devices whose generators a measurement must leave untouched."""
    return sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})


class CriterionLoss:
    """The short form's ``loss_fn``: ``criterion(forward(model, inputs), targets)`` on ``(inputs, targets)``.

    A class rather than a closure so that probes pickle.
    """

    def __init__(self, criterion: Callable[[Any, Any], Tensor],
                 forward: Callable[[nn.Module, Any], Any] = call_model):
        self.criterion = criterion
        self.forward = forward

    def __call__(self, model: nn.Module, batch: Any) -> Tensor:
        inputs, targets = batch
        return self.criterion(self.forward(model, inputs), targets)

    def __repr__(self) -> str:
        return f"CriterionLoss({self.criterion!r})"


def _pairs(batches: list[Any]) -> list[tuple[Any, Any]]:
    """The short form's batches as ``(inputs, targets)`` tuples (a DataLoader yields lists)."""
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, (tuple, list)) or len(b) != 2:
            raise TypeError(
                f"batch {i} must be a pair (inputs, targets) with a criterion, got "
                f"{type(b).__name__}{'' if not isinstance(b, (tuple, list)) else f' of {len(b)}'}; "
                "for other batches pass Probe(model, data=..., loss_fn=fn) with "
                "fn(model, batch) -> mean loss")
        out.append(tuple(b))
    return out


class Probe:
    """A fixed measurement set and the loss closures built on it.

    Two ways to say what the loss is. The general form, for batches of any structure:
    ``Probe(model, data=batches, loss_fn=fn)`` with ``fn(model, batch) -> scalar``, the
    mean loss over the examples of ``batch`` (a Hugging Face model: ``lambda m, b:
    m(**b).loss``). The short form, for ``(inputs, targets)`` pairs:
    ``Probe(model, criterion, data)``, which is the general form with
    ``loss_fn = criterion(forward(model, inputs), targets)`` (:class:`CriterionLoss`).

    Args:
        model: the network being trained.
        criterion: (short form) a loss with mean reduction, ``criterion(outputs, targets)
            -> scalar`` (e.g. ``nn.CrossEntropyLoss()``); data batches are then
            ``(inputs, targets)`` pairs.
        data: one batch or a list / DataLoader of batches; it is materialised once (the
            probe is fixed). A batch is any structure of tensors (tuples, lists, dicts,
            nested) whose tensors all hold the examples along dim 0; batches are
            concatenated along dim 0 and split into chunks and micro-batches the same
            way. A tensor, tuple, mapping or list of tensors is one batch; any other list
            or iterable is a sequence of batches (see :mod:`sgdbreak.measurement.batches`).
        loss_fn: (general form, keyword) ``loss_fn(model, batch) -> scalar``: the *mean*
            loss over the batch's examples, with autograd (checked at construction by
            evaluating a batch repeated twice). Every measurement calls it on sub-batches
            of the probe: chunks, micro-batches, single examples for per-example gradients.
        chunk_size: examples per forward pass. The probe loss is the mean over all
            examples, evaluated chunk by chunk. In BatchNorm train mode each chunk
            normalises with its own batch statistics: set it to the training batch size
            to measure what SGD sees. Default 256: on this project's CPU a SimpleCNN
            Hessian-vector product on 1,000 examples took 1.95 s in chunks of 256 against
            3.28 s in one chunk (``benchmarks/bench_probe_chunks.py``).
        batchnorm: "train" (default; batch statistics, what SGD sees) or "eval"
            (running statistics). Dropout is always off while measuring.
        keep_graph: keep the gradient graph of every chunk for the whole measurement
            (fast: each Hessian-vector product is one double-backward pass). With False,
            each product rebuilds one chunk's graph at a time: memory of one chunk,
            about twice the time.
        forward: (short form) ``forward(model, inputs) -> outputs`` for models that do
            not take a single tensor (default ``model(inputs)``).
        params: the parameters to measure (default: those of ``model`` requiring grad).

    Attributes:
        data: the probe's examples as one batch (the structure passed, concatenated).
        batch_loss: the ``loss_fn(model, batch)`` every measurement evaluates.
        inputs, targets, criterion, forward: the short form's (None in the general form).

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
        >>> probe = Probe(model, nn.CrossEntropyLoss(), (torch.randn(32, 4), torch.randint(0, 3, (32,))))
        >>> probe.hessian_eigenvalues(k=1).eigenvalues.shape
        torch.Size([1])
        >>> batch = {"x": torch.randn(32, 4), "y": torch.randint(0, 3, (32,))}
        >>> probe = Probe(model, data=batch, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["y"]))
        >>> probe.num_examples
        32
    """

    def __init__(
        self,
        model: nn.Module,
        criterion: Callable[[Any, Any], Tensor] | None = None,
        data: Any = None,
        *,
        loss_fn: Callable[[nn.Module, Any], Tensor] | None = None,
        chunk_size: int | None = 256,
        batchnorm: str = "train",
        keep_graph: bool = True,
        forward: Callable[[nn.Module, Any], Any] | None = None,
        params: Iterable[Tensor] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if (criterion is None) == (loss_fn is None):
            raise TypeError(
                "pass either a criterion (short form: Probe(model, criterion, (inputs, targets))) "
                "or loss_fn= (Probe(model, data=batches, loss_fn=fn), fn(model, batch) -> mean "
                "loss), " + ("not both" if criterion is not None else "got neither"))
        if criterion is not None and not callable(criterion):
            raise TypeError(f"criterion must be callable, got {type(criterion).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
        if loss_fn is not None and forward is not None:
            raise TypeError("forward= belongs to the short form (with a criterion); with loss_fn= "
                            "call the model inside loss_fn")
        if data is None:
            raise TypeError("data is required: a batch or a list / DataLoader of batches")
        if batchnorm not in _BATCHNORM_MODES:
            raise ValueError(f"batchnorm must be one of {_BATCHNORM_MODES}, got {batchnorm!r}")
        self.model = model
        self.params = check_params(
            [p for p in model.parameters() if p.requires_grad] if params is None else params
        )
        self.criterion = criterion
        self.forward: Callable[[nn.Module, Any], Any] | None = None
        self.batch_loss: Callable[[nn.Module, Any], Tensor]
        found = B.as_batches(data)
        if criterion is not None:
            self.forward = fwd = forward or call_model
            self.batch_loss = CriterionLoss(criterion, fwd)
            found = _pairs(found)
        elif loss_fn is not None:
            self.batch_loss = loss_fn
        batch, _ = B.concat_batches(found)
        self.data: Any = self._local_batch(batch)
        self.inputs: Any = self.data[0] if criterion is not None else None
        self.targets: Any = self.data[1] if criterion is not None else None
        self.num_examples = B.num_examples(self.data)
        # Examples this process holds and evaluates (a DistributedProbe: its shard).
        self.local_num_examples = self.num_examples
        if chunk_size is None:
            chunk_size = self.num_examples
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.chunk_size = min(chunk_size, self.num_examples)
        self.batchnorm = batchnorm
        self.keep_graph = bool(keep_graph)
        self.dim = sum(p.numel() for p in self.params)
        self.has_batchnorm = any(_is_batchnorm(m) for m in model.modules())
        # Reduction across processes (set by DistributedProbe); identity here.
        self.reduce_mean: Callable[[Tensor], Tensor] | None = None
        self._check_loss_contract()
        self.single_example_batches = self._can_measure_one_example()
        self._check_chunks()

    def _local_batch(self, batch: Any) -> Any:
        """The examples this process holds (all of them here; a shard for DistributedProbe)."""
        return batch

    # ------------------------------------------------------------------ validation
    def _can_measure_one_example(self) -> bool:
        """Whether a batch of one example can be evaluated (not by train-mode BatchNorm1d)."""
        if not (self.has_batchnorm and self.batchnorm == "train"):
            return True
        with self.measuring(), torch.no_grad():
            try:
                self._local_loss(torch.arange(1))
            except (ValueError, RuntimeError):
                return False
        return True

    def _check_chunks(self) -> None:
        """A chunk of one example that BatchNorm cannot normalise: refuse it now, not mid-run."""
        if self.single_example_batches:
            return
        last = self.local_num_examples % self.chunk_size
        if self.local_num_examples == 1 or last == 1:
            raise ValueError(
                f"train-mode BatchNorm cannot normalise a batch of one example, but "
                f"{self.local_num_examples} probe examples in chunks of {self.chunk_size} leave one "
                "alone: change chunk_size or the probe size, or use batchnorm='eval'")

    def _check_loss_contract(self) -> None:
        """Refuse, before training starts, a loss whose scale or graph cannot be trusted.

        One forward and backward on up to two probe examples checks that the data fits the
        model, that the loss is a scalar *mean* over examples (repeating the batch must not
        change it: a sum would scale λ1^H by the chunk size and λ1^K by M²), and that the
        loss depends on ``params``.
        """
        what = "criterion" if self.criterion is not None else "loss_fn"
        reduction = getattr(self.criterion, "reduction", "mean")
        if isinstance(reduction, str) and reduction not in _MEAN_REDUCTIONS:
            raise ValueError(
                f"criterion has reduction={reduction!r}; sgdbreak measures the mean loss over "
                f"examples: use reduction='mean' (e.g. {type(self.criterion).__name__}())")
        idx = torch.arange(min(2, self.local_num_examples))
        with self.measuring(), torch.enable_grad():
            try:
                once = self._local_loss(idx)  # local: no collective while constructing
                twice = self._local_loss(torch.cat([idx, idx]))
            except (RuntimeError, TypeError, ValueError, IndexError, KeyError, AttributeError) as err:
                if self.criterion is not None:
                    takes = (f"the inputs ({_describe_part(self.inputs)}) and targets "
                             f"({_describe_part(self.targets)}) are what the model (parameters "
                             f"{self.params[0].dtype}) and criterion take")
                else:
                    takes = (f"the batch ({B.describe(self.data)}, per probe) is what the model "
                             f"(parameters {self.params[0].dtype}) and loss_fn take")
                raise ValueError(
                    f"the probe cannot evaluate the loss on its own data ({type(err).__name__}: "
                    f"{err}). Check that {takes}") from err
            if not isinstance(once, Tensor) or once.numel() != 1:
                shape = tuple(once.shape) if isinstance(once, Tensor) else type(once).__name__
                hint = (" (a model output? return its .loss)" if hasattr(once, "loss")
                        else " (reduction='mean')")
                raise ValueError(f"{what} must return a scalar mean loss tensor, got {shape}: "
                                 f"use a mean-reduced loss{hint}")
            a, b = float(once.detach()), float(twice.detach())
            # A forward that draws random numbers (functional dropout) cannot match exactly:
            # then only refuse a loss closer to a sum than to a mean.
            random_forward = float(self._local_loss(idx).detach()) != a
            tolerance = abs(b - 2 * a) if random_forward else 1e-3 * abs(a) + 1e-6
            if math.isfinite(a) and math.isfinite(b) and abs(b - a) > tolerance:
                hint = " (it looks like a sum over examples)" if abs(b - 2 * a) <= 1e-3 * abs(a) else ""
                raise ValueError(
                    f"{what} is not a mean over examples{hint}: the loss of a batch repeated "
                    f"twice is {b:.6g}, not {a:.6g}. sgdbreak's λ1^H and K are those of the mean "
                    "loss: use reduction='mean' or divide by the batch size")
            if not once.requires_grad:
                raise ValueError("the probe loss does not depend on params with autograd; pass "
                                 "the parameters of `model` that require grad")
            grads = torch.autograd.grad(once, self.params, allow_unused=True)
        unused = sum(g is None for g in grads)
        if unused == len(grads):
            raise ValueError(
                "none of the probe's params reach the loss (are they another model's?): pass "
                "params of `model` (default: all of its parameters that require grad)")
        if unused:
            warnings.warn(
                f"{unused} of the probe's {len(grads)} parameter tensors do not affect the loss on "
                "the probe (unused layers?); their curvature and noise are measured as 0",
                RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ state safety
    @contextlib.contextmanager
    def measuring(self) -> Iterator[None]:
        """Measurement mode; everything it changes is restored after.

        Dropout off and BatchNorm per ``batchnorm``; sparse embeddings give dense gradients
        (Hessian-vector products need them); ``scaled_dot_product_attention`` uses its math
        kernel (the fused flash / memory-efficient kernels have no second derivative, so a
        transformer's Hessian-vector products would fail); the global random number generators (CPU and
        the parameters' CUDA devices) are forked, so a forward pass that draws random
        numbers does not change the training trajectory.
        """
        modes = [(m, m.training) for m in self.model.modules()]
        sparse = [m for m in self.model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        with torch.random.fork_rng(devices=_rng_devices(self.params)), _twice_differentiable_attention():
            try:
                self.model.eval()
                if self.batchnorm == "train":
                    for m in self.model.modules():
                        if _is_batchnorm(m):
                            m.train()
                for m in sparse:
                    m.sparse = False
                yield
            finally:
                for m, mode in modes:
                    m.training = mode
                for m in sparse:
                    m.sparse = True
                with torch.no_grad():
                    for b, saved in buffers:
                        b.copy_(saved)

    # ------------------------------------------------------------------ losses
    @property
    def device(self) -> torch.device:
        return self.params[0].device

    def chunks(self) -> list[Tensor]:
        """Positions, among the examples held here, of the chunks the loss is evaluated in."""
        return list(torch.arange(self.local_num_examples).split(self.chunk_size))

    def _local_loss(self, positions: Tensor) -> Tensor:
        """Mean loss over ``positions`` of the examples held here (graph built)."""
        return self.loss_of_indices(positions)

    def loss_of_indices(self, indices: Tensor) -> Tensor:
        """Mean loss over the probe examples at ``indices`` (graph built; no mode changes)."""
        return self.batch_loss(self.model, B.to_device(B.select(self.data, indices), self.device))

    def loss(self) -> Tensor:
        """Mean loss over the examples held here (chunk losses weighted by chunk size).

        The whole probe on one process; a shard's share for a :class:`DistributedProbe`.
        """
        total = None
        for idx in self.chunks():
            part = self._local_loss(idx) * (len(idx) / self.local_num_examples)
            total = part if total is None else total + part
        if total is None:  # chunks() is never empty: the probe holds at least one example
            raise RuntimeError("the probe holds no examples")
        return total

    def loss_value(self, indices: Tensor | None = None) -> float:
        """Mean loss (no graph) over ``indices`` or the whole probe, reduced across processes."""
        with torch.no_grad():
            loss = self.loss() if indices is None else self.loss_of_indices(indices)
            loss = loss.detach().reshape(1)
        if self.reduce_mean is not None:
            loss = self.reduce_mean(loss)
        return float(loss)

    def loss_fn(self) -> Callable[[], Tensor]:
        """A zero-argument closure for the estimators (call it inside :meth:`measuring`)."""
        return self.loss

    # ------------------------------------------------------------------ curvature
    def hessian_operator(self, *, hvp: str = "autograd") -> HessianOperator | ChunkedHessianOperator:
        """The Hessian of the probe loss as an operator (call inside :meth:`measuring`)."""
        if hvp == "autograd" and not self.keep_graph and self.chunk_size < self.num_examples:
            return ChunkedHessianOperator(self)
        return HessianOperator(self.loss, self.params, method=hvp, reduce=self.reduce_mean)

    def hessian_eigenvalues(self, k: int = 1, *, hvp: str = "autograd", **kwargs: Any) -> HessianEigenResult:
        """Top-k Hessian eigenvalues of the probe loss (see :func:`sgdbreak.hessian_eigenvalues`)."""
        with self.measuring():
            op = self.hessian_operator(hvp=hvp)
            return eigenvalues_of_operator(op, op.dim, k, dtype=op.dtype, device=op.device,
                                           loss=float(op.loss), **kwargs)

    def hessian_trace(self, *, num_samples: int = 20, method: str = "hutchinson", hvp: str = "autograd",
                      generator: torch.Generator | None = None) -> HessianTraceResult:
        """Tr(H) of the probe loss (see :func:`sgdbreak.hessian_trace`)."""
        with self.measuring():
            op = self.hessian_operator(hvp=hvp)
            res = hutchinson_trace(op, op.dim, num_samples=num_samples, method=method,
                                   dtype=op.dtype, device=op.device, generator=generator)
        return HessianTraceResult(res.value, res.stderr, res.num_matvecs, float(op.loss))

    def curvature_variance(self, direction: Tensor, *, num_groups: int = 8,
                           generator: torch.Generator | None = None) -> float:
        """s² = Var_i[vᵀH_i v]: spread of per-example curvature along ``direction`` (Eq. 1).

        The probe is split into ``num_groups`` random groups of m examples; each group's
        Rayleigh quotient q_g = vᵀH_g v (one product) has variance s²/m, so
        s² ≈ m · Var_g(q_g). Costs ``num_groups`` Hessian-vector products on small groups.
        """
        if not isinstance(num_groups, int) or num_groups < 2:
            raise ValueError(f"num_groups must be an int >= 2, got {num_groups!r}")
        if num_groups > self.num_examples:
            raise ValueError(f"num_groups={num_groups} exceeds the probe size {self.num_examples}")
        v = direction.reshape(-1).to(dtype=self.params[0].dtype, device=self.device)
        if v.numel() != self.dim:
            raise ValueError(f"direction must have {self.dim} entries, got {v.numel()}")
        v = v / v.norm()
        m = self.num_examples // num_groups
        perm = torch.randperm(self.num_examples, generator=generator)
        groups = [perm[g * m : (g + 1) * m] for g in range(num_groups)]
        with self.measuring():
            q = self._group_rayleigh_quotients(v, groups)
        return float(m * q.var(unbiased=True))

    def _group_rayleigh_quotients(self, v: Tensor, groups: list[Tensor]) -> Tensor:
        """vᵀH_g v for the mean loss of each group of probe indices (float64, CPU)."""
        return torch.tensor([
            HessianOperator(functools.partial(self.loss_of_indices, idx), self.params).rayleigh_quotient(v)
            for idx in groups
        ], dtype=torch.float64)

    # ------------------------------------------------------------------ gradients
    def gradient(self) -> Tensor:
        """The mean gradient of the probe loss, flat (``p.grad`` untouched)."""
        with self.measuring():
            total = torch.zeros(self.dim, dtype=self.params[0].dtype, device=self.device)
            for idx in self.chunks():
                loss = evaluate_loss(functools.partial(self.loss_of_indices, idx))
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                total += flatten(grads, self.params) * (len(idx) / self.num_examples)
        return self.reduce_mean(total) if self.reduce_mean is not None else total

    def gradient_samples(self, *, method: str = "microbatch", num_samples: int = 20,
                         batch_size: int = 128, generator: torch.Generator | None = None,
                         sketch=None) -> Tensor:
        """Gradient samples for the noise spectrum K, as rows of an (L, D) tensor.

        ``method="microbatch"`` (the paper's, default; every layer type): L gradients of
        mean losses over random batches of ``batch_size`` probe examples; their covariance
        is K / batch_size. ``method="per_example"``: exact per-example gradients of every
        probe example (``torch.func``); refused for BatchNorm in train mode, where a
        per-example gradient has no meaning. ``sketch``: a linear map applied to each
        gradient (micro-batch) or chunk of gradients (per-example) as soon as it exists,
        so the (L, D) samples are never formed.
        """
        from ..estimators import samples

        with self.measuring():
            if method == "microbatch":
                return samples.microbatch_gradients(
                    self.loss_of_indices, self.params, self.num_examples, batch_size=batch_size,
                    num_samples=num_samples, generator=generator, sketch=sketch,
                )
            if method == "per_example":
                if self.has_batchnorm and self.batchnorm == "train":
                    raise ValueError(
                        "per-example gradients are undefined with train-mode BatchNorm (batch "
                        "statistics): use method='microbatch' or Probe(..., batchnorm='eval')"
                    )
                return samples.per_example_loss_gradients(
                    self.model, self.batch_loss, B.to_device(self.data, self.device),
                    params=self.params, chunk_size=self.chunk_size, sketch=sketch,
                )
        raise ValueError(f"method must be 'microbatch' or 'per_example', got {method!r}")


class ChunkedHessianOperator:
    """Hessian of a probe's loss, one chunk's graph at a time (bounded memory).

    H v = Σ_c (n_c / N) H_c v; each product rebuilds every chunk's gradient graph in turn
    and frees it, so memory is that of one chunk.
    """

    def __init__(self, probe: Probe):
        self.probe = probe
        self.params = probe.params
        self.dim = probe.dim
        self.dtype = self.params[0].dtype
        self.device = probe.device
        self.num_matvecs = 0
        self.reduce = probe.reduce_mean
        self.gradient: Tensor | None = None
        self.loss = torch.tensor(probe.loss_value())
        if not torch.isfinite(self.loss):
            raise NonFiniteMeasurement(f"loss is not finite ({self.loss.item()}); nothing was measured")

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matvec(self, v: Tensor) -> Tensor:
        if v.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {tuple(v.shape)}")
        self.num_matvecs += 1
        out = torch.zeros_like(v)
        vs = unflatten(v.to(self.dtype), self.params)
        probe = self.probe
        for idx in probe.chunks():
            with torch.enable_grad():
                loss = probe._local_loss(idx)
                grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
                dot = sum((g * u).sum() for g, u in zip(grads, vs) if g is not None)
            if not isinstance(dot, Tensor) or not dot.requires_grad:
                continue
            hv = torch.autograd.grad(dot, self.params, allow_unused=True)
            out += flatten(hv, self.params) * (len(idx) / probe.local_num_examples)
        return self.reduce(out) if self.reduce is not None else out
