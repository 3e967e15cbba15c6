"""Hessian-vector products and the public curvature estimators.

``hessian_eigenvalues`` (λ1^H, top-k) and ``hessian_trace`` (Tr H) take a zero-argument
loss closure and the parameters; they never touch ``p.grad``, parameter values (finite
differences restore them bit for bit), module modes or buffers (see :class:`sgdbreak.Probe`
for BatchNorm statistics).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import NonFiniteMeasurement
from .linalg import EigenResult, hutchinson_trace, lanczos, power_iteration

__all__ = ["HessianEigenResult", "HessianOperator", "HessianTraceResult", "check_params", "eigenvalues_of_operator",
           "evaluate_loss", "flatten", "hessian_eigenvalues", "hessian_trace", "unflatten"]

LossFn = Callable[[], Tensor]


def check_params(params: Iterable[Tensor]) -> list[Tensor]:
    """Validate and listify parameters: non-empty, tensors, all requiring grad."""
    if isinstance(params, Tensor):
        params = [params]
    try:
        params = list(params)
    except TypeError:
        raise TypeError(f"params must be an iterable of tensors, got {type(params).__name__}") from None
    if not params:
        raise ValueError("params is empty: pass the model's parameters (e.g. model.parameters())")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if not p.requires_grad:
            raise ValueError(f"params[{i}] (shape {tuple(p.shape)}) does not require grad")
    return params


def evaluate_loss(loss_fn: LossFn) -> Tensor:
    """Call ``loss_fn`` and check that it gives a finite scalar with a graph."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a zero-argument callable, got {type(loss_fn).__name__}")
    with torch.enable_grad():
        loss = loss_fn()
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss_fn must return a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    loss = loss.reshape(())
    if not torch.isfinite(loss):
        raise NonFiniteMeasurement(f"loss is not finite ({loss.item()}); nothing was measured")
    if not loss.requires_grad:
        raise ValueError("loss does not depend on params with autograd (built under torch.no_grad?)")
    return loss


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one vector; ``None`` entries become zeros shaped as ``like``."""
    return torch.cat([
        (t if t is not None else torch.zeros_like(p)).reshape(-1) for t, p in zip(tensors, like)
    ])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into tensors shaped as ``like``."""
    out, i = [], 0
    for p in like:
        n = p.numel()
        out.append(vector[i : i + n].view_as(p))
        i += n
    return out


class HessianOperator:
    """v ↦ H v for the Hessian of a loss closure with respect to ``params``.

    ``method="autograd"`` (default) builds the gradient graph once and reuses it for every
    product (double backward, exact). ``method="finite_difference"`` computes
    (∇L(θ+εv) − ∇L(θ−εv)) / 2ε with two gradient evaluations per product; use it only for
    layers without double backward (e.g. cuDNN RNNs): it is *wrong* on ReLU / max-pool
    networks, whose kinks make the difference quotient differ from the true Hessian.

    Args:
        loss_fn: zero-argument closure returning a scalar loss built with autograd.
        params: tensors requiring grad.
        method: "autograd" or "finite_difference".
        fd_epsilon: relative step for finite differences (scaled by 1 + ‖θ‖).
        reduce: optional callable applied to every product (e.g. an all-reduce mean across
            processes, see :mod:`sgdbreak.integrations.distributed_probe`).
        loss: a loss already evaluated from ``loss_fn`` (saves one forward pass).
        batched: let :meth:`matmat` multiply a block of vectors in one batched double
            backward (the Lanczos start block, Hutchinson probes); False: one at a time.
    """

    def __init__(
        self,
        loss_fn: LossFn,
        params: Iterable[Tensor],
        *,
        method: str = "autograd",
        fd_epsilon: float | None = None,
        reduce: Callable[[Tensor], Tensor] | None = None,
        loss: Tensor | None = None,
        batched: bool = False,
    ):
        if method not in ("autograd", "finite_difference"):
            raise ValueError(f"method must be 'autograd' or 'finite_difference', got {method!r}")
        self.params = check_params(params)
        self.loss_fn = loss_fn
        self.method = method
        self.reduce = reduce
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        self.num_matvecs = 0
        self.batched = batched
        loss = evaluate_loss(loss_fn) if loss is None else loss
        self.loss = loss.detach() if reduce is None else reduce(loss.detach().reshape(1)).reshape(())
        if method == "autograd":
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            # The loss gradient comes for free with the graph (used for noise scales).
            self.gradient: Tensor | None = flatten([g.detach() if g is not None else None for g in grads],
                                                   self.params)
            if reduce is not None:
                self.gradient = reduce(self.gradient)
            self._pairs = [(g, p) for g, p in zip(grads, self.params) if g is not None and g.requires_grad]
        else:
            self.gradient = None
            eps = fd_epsilon if fd_epsilon is not None else torch.finfo(self.dtype).eps ** (1 / 3)
            norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in self.params))
            self._step = eps * (1.0 + norm)

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def matvec(self, v: Tensor) -> Tensor:
        """Hessian-vector product for a flat vector ``v`` of length ``dim``."""
        if v.shape != (self.dim,):
            raise ValueError(f"vector must have shape ({self.dim},), got {tuple(v.shape)}")
        v = v.to(dtype=self.dtype, device=self.device)
        self.num_matvecs += 1
        out = self._autograd(v) if self.method == "autograd" else self._finite_difference(v)
        return self.reduce(out) if self.reduce is not None else out

    def _autograd(self, v: Tensor) -> Tensor:
        vs = unflatten(v, self.params)
        if not self._pairs:
            return torch.zeros_like(v)
        index = {id(p): i for i, p in enumerate(self.params)}
        grads = [g for g, _ in self._pairs]
        outs = [vs[index[id(p)]] for _, p in self._pairs]
        hv = torch.autograd.grad(grads, self.params, grad_outputs=outs, retain_graph=True, allow_unused=True)
        return flatten([h.detach() if h is not None else None for h in hv], self.params)

    def matmat(self, vectors: Tensor) -> Tensor:
        """Hessian products for the rows of ``vectors`` (b, dim), as rows.

        With autograd, one batched double backward (``is_grads_batched``, vmap over the
        backward graph) instead of b of them; layers without a batching rule fall back to
        one product per row (remembered, so the batched call is tried once).
        """
        if vectors.dim() != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"vectors must have shape (b, {self.dim}), got {tuple(vectors.shape)}")
        vectors = vectors.to(dtype=self.dtype, device=self.device)
        if self.method != "autograd" or not self._pairs or not self.batched or vectors.shape[0] == 1:
            return torch.stack([self.matvec(v) for v in vectors])
        index = {id(p): i for i, p in enumerate(self.params)}
        grads = [g for g, _ in self._pairs]
        outs = []
        start = 0
        for p in self.params:
            n = p.numel()
            outs.append(vectors[:, start : start + n].reshape(-1, *p.shape))
            start += n
        try:
            hv = torch.autograd.grad(grads, self.params, grad_outputs=[outs[index[id(p)]] for _, p in self._pairs],
                                     retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            self.batched = False  # no batching rule for some layer: one product per row
            return torch.stack([self.matvec(v) for v in vectors])
        self.num_matvecs += vectors.shape[0]
        rows = torch.cat([
            (h.detach() if h is not None else torch.zeros(vectors.shape[0], *p.shape, dtype=self.dtype,
                                                          device=self.device)).reshape(vectors.shape[0], -1)
            for h, p in zip(hv, self.params)
        ], dim=1)
        if self.reduce is not None:
            rows = torch.stack([self.reduce(row) for row in rows])
        return rows

    def _gradient_at(self, v: Tensor, scale: float) -> Tensor:
        saved = [p.detach().clone() for p in self.params]
        try:
            with torch.no_grad():
                for p, d in zip(self.params, unflatten(v, self.params)):
                    p.add_(d, alpha=scale)
            loss = evaluate_loss(self.loss_fn)
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            return flatten([g.detach() if g is not None else None for g in grads], self.params)
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def _finite_difference(self, v: Tensor) -> Tensor:
        norm = float(v.norm())
        if norm == 0:
            return torch.zeros_like(v)
        h = self._step / norm
        return (self._gradient_at(v, h) - self._gradient_at(v, -h)) / (2 * h)

    def rayleigh_quotient(self, v: Tensor) -> float:
        """vᵀHv / vᵀv, one product."""
        v = v.to(dtype=self.dtype, device=self.device)
        return float((v.double() @ self.matvec(v).double()) / (v.double() @ v.double()))


@dataclass(frozen=True)
class HessianEigenResult(EigenResult):
    """Top Hessian eigenpairs (see :class:`sgdbreak.estimators.linalg.EigenResult`).

    Attributes:
        loss: the loss value at which the Hessian was taken.
    """

    loss: float = float("nan")

    @property
    def num_hvps(self) -> int:
        """Hessian-vector products spent (same as ``num_matvecs``)."""
        return self.num_matvecs


@dataclass(frozen=True)
class HessianTraceResult:
    """Stochastic estimate of Tr(H): ``value`` ± ``stderr`` from ``num_hvps`` products."""

    value: float
    stderr: float
    num_hvps: int
    loss: float


def _warm_start_vectors(warm_start, dim: int):
    if warm_start is None:
        return None
    if isinstance(warm_start, EigenResult):
        return warm_start.start_vectors
    if isinstance(warm_start, Tensor) or isinstance(warm_start, Sequence):
        return warm_start
    raise TypeError(
        f"warm_start must be a previous result, a tensor of vectors or None, got {type(warm_start).__name__}"
    )


def _check_k(k, dim: int) -> None:
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if k > dim:
        raise ValueError(f"k={k} is larger than the number of parameters ({dim})")


def eigenvalues_of_operator(
    operator: Callable[[Tensor], Tensor],
    dim: int,
    k: int = 1,
    *,
    solver: str = "lanczos",
    which: str = "LA",
    tol: float = 1e-3,
    max_hvps: int = 100,
    warm_start=None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device="cpu",
    loss: float = float("nan"),
    **solver_kwargs,
) -> HessianEigenResult:
    """Run the chosen eigensolver on a Hessian operator and wrap the result."""
    if solver not in ("lanczos", "power"):
        raise ValueError(f"solver must be 'lanczos' or 'power', got {solver!r}")
    _check_k(k, dim)
    init = _warm_start_vectors(warm_start, dim)
    run = lanczos if solver == "lanczos" else power_iteration
    res = run(operator, dim, k, which=which, tol=tol, max_matvecs=max_hvps, init=init,
              dtype=dtype, device=device, generator=generator, **solver_kwargs)
    return HessianEigenResult(res.eigenvalues, res.eigenvectors, res.residuals, res.num_matvecs,
                              res.converged, res.error_bounds, res.restart_vectors, res.estimates,
                              loss=loss)


def hessian_eigenvalues(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    k: int = 1,
    *,
    solver: str = "lanczos",
    which: str = "LA",
    tol: float = 1e-3,
    max_hvps: int = 100,
    warm_start=None,
    hvp: str = "autograd",
    generator: torch.Generator | None = None,
    **solver_kwargs,
) -> HessianEigenResult:
    """Top-k eigenvalues of the Hessian of ``loss_fn`` (λ1^H and the ``topk_H`` spectrum).

    Lanczos on Hessian-vector products (paper §3; the paper reports k = 5). Pass the
    previous result as ``warm_start`` to re-measure in a few products during training.

    Args:
        loss_fn: zero-argument closure returning a scalar loss built with autograd.
        params: tensors requiring grad (e.g. ``model.parameters()``).
        k: number of eigenvalues (descending for ``which="LA"``).
        solver: "lanczos" (default) or "power" (baseline; unreliable early in training,
            when the Hessian has negative eigenvalues as large as the top one).
        which: "LA" largest algebraic (default), "LM" largest magnitude, "SA" smallest.
        tol: relative accuracy of the eigenvalues.
        max_hvps: budget of Hessian-vector products.
        warm_start: a previous :class:`HessianEigenResult`, or a (m, D) tensor of vectors.
        hvp: "autograd" (exact, default) or "finite_difference" (see :class:`HessianOperator`).
        generator: seeds the random start vector.
        **solver_kwargs: passed to :func:`sgdbreak.estimators.linalg.lanczos` (``max_basis``,
            ``convergence``).

    Returns:
        :class:`HessianEigenResult` with ``eigenvalues`` (float64), ``eigenvectors`` (k, D),
        ``residuals``, ``num_hvps``, ``converged``, ``loss``.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> loss_fn = lambda: torch.nn.functional.mse_loss(model(x), y)
        >>> res = hessian_eigenvalues(loss_fn, model.parameters(), k=2, tol=1e-6)
        >>> res.eigenvalues.shape
        torch.Size([2])
    """
    params = check_params(params)
    _check_k(k, sum(p.numel() for p in params))  # before any forward pass
    op = HessianOperator(loss_fn, params, method=hvp)
    return eigenvalues_of_operator(
        op, op.dim, k, solver=solver, which=which, tol=tol, max_hvps=max_hvps,
        warm_start=warm_start, generator=generator, dtype=op.dtype, device=op.device,
        loss=float(op.loss), **solver_kwargs,
    )


def hessian_trace(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    *,
    num_samples: int = 20,
    method: str = "hutchinson",
    hvp: str = "autograd",
    generator: torch.Generator | None = None,
) -> HessianTraceResult:
    """Tr(H) by Hutchinson's estimator with Rademacher probes (or Hutch++).

    Unbiased; ``stderr`` is the standard error of the mean over probes, so the exact trace
    lies within a few ``stderr`` of ``value``. The paper also reports the sum of the top-5
    eigenvalues as a proxy; see ``top5_sum_H`` in the monitor.

    Args:
        loss_fn: zero-argument closure returning a scalar loss.
        params: tensors requiring grad.
        num_samples: number of Hessian-vector products.
        method: "hutchinson" or "hutch++" (better when a few eigenvalues dominate).
        hvp: "autograd" or "finite_difference".
        generator: seeds the probes.
    """
    params = check_params(params)
    op = HessianOperator(loss_fn, params, method=hvp)
    res = hutchinson_trace(op, op.dim, num_samples=num_samples, method=method,
                           dtype=op.dtype, device=op.device, generator=generator)
    return HessianTraceResult(res.value, res.stderr, res.num_matvecs, float(op.loss))
