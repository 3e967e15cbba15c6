"""Brute-force references (small problems only): dense Hessians, matrices with chosen
spectra, gradient covariances and Adam's preconditioned Hessian.

Each oracle takes the slow, obvious route (a dense matrix, a Python loop over examples,
float64) so that it shares no code path with the estimators it checks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "adam_preconditioner",
    "exact_hessian",
    "gradient_covariance",
    "model_hessian",
    "per_example_covariance",
    "per_example_gradients_by_loop",
    "preconditioned_hessian",
    "random_orthogonal",
    "symmetric_matrix_with_spectrum",
]


def _flat(grads, params) -> Tensor:
    """Concatenated flat gradients, zeros for parameters the loss does not use."""
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def exact_hessian(loss_fn: Callable[[], Tensor], params: Iterable[Tensor]) -> Tensor:
    """Dense D×D Hessian of a loss closure, one gradient-of-gradient row at a time."""
    params = list(params)
    loss = loss_fn()
    flat = _flat(torch.autograd.grad(loss, params, create_graph=True, allow_unused=True), params)
    rows = []
    for j in range(flat.numel()):
        if not flat[j].requires_grad:
            rows.append(torch.zeros_like(flat))
            continue
        row = torch.autograd.grad(flat[j], params, retain_graph=True, allow_unused=True)
        rows.append(_flat(row, params))
    H = torch.stack(rows).double()
    return 0.5 * (H + H.T)


def model_hessian(model: nn.Module, criterion: Callable, inputs: Tensor, targets: Tensor) -> Tensor:
    """Dense Hessian of ``criterion(model(inputs), targets)`` w.r.t. all trainable parameters.

    Uses ``torch.func.hessian`` on a function of the flattened parameter vector, an
    independent path from the Hessian-vector products under test (with train-mode
    BatchNorm: autograd rows, see below). Buffers are copies: the model is not changed.
    """
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [p.shape for n, p in model.named_parameters() if p.requires_grad]
    sizes = [s.numel() for s in shapes]
    flat0 = torch.cat(
        [p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad]
    )
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def f(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        state = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        state.update({n: b.clone() for n, b in buffers.items()})
        return criterion(torch.func.functional_call(model, state, (inputs,)), targets)

    train_bn = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )
    if not train_bn:
        H = torch.func.hessian(f)(flat0).double()
    else:
        # torch.func's transforms give wrong second derivatives through train-mode
        # BatchNorm in torch 2.13 (off by ~5 % against finite differences), so take the
        # rows with plain autograd: row j = ∇(∂f/∂θ_j).
        flat = flat0.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(flat), flat, create_graph=True)[0]
        H = torch.stack(
            [torch.autograd.grad(grad[j], flat, retain_graph=True)[0] for j in range(flat.numel())]
        )
        H = H.double()
    return 0.5 * (H + H.T)


def random_orthogonal(
    n: int, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """An n×n orthogonal matrix: the Q factor of a Gaussian matrix drawn from ``generator``."""
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=generator))
    return Q


def symmetric_matrix_with_spectrum(
    eigenvalues, *, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64
) -> Tensor:
    """A dense symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q (see random_orthogonal)."""
    ev = torch.as_tensor(eigenvalues, dtype=dtype)
    Q = random_orthogonal(ev.numel(), generator=generator, dtype=dtype)
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)


# --- gradient noise ----------------------------------------------------------------------


def gradient_covariance(samples: Tensor, *, scale: float = 1.0) -> Tensor:
    """Dense D×D sample covariance of gradient samples, float64.

    ``scale · Cᵀ C / (L − 1)`` with ``C`` the rows of ``samples`` minus their mean: the
    matrix whose spectrum :func:`sgdbreak.covariance_spectrum` reports (same centering,
    same 1/(L − 1) normalisation, same ``scale``).

    Args:
        samples: ``(L, D)`` tensor, one gradient sample per row, ``L >= 2``.
        scale: factor applied to the covariance (``M`` for means of ``M``-example batches).
    """
    if not isinstance(samples, Tensor) or samples.dim() != 2 or samples.shape[0] < 2:
        shape = tuple(samples.shape) if isinstance(samples, Tensor) else type(samples).__name__
        raise ValueError(f"samples must be an (L, D) tensor with L >= 2, got {shape}")
    x = samples.detach().double().cpu()
    centered = x - x.mean(dim=0)
    cov = scale * (centered.T @ centered) / (x.shape[0] - 1)
    return 0.5 * (cov + cov.T)


def _example(inputs, i: int):
    if isinstance(inputs, (tuple, list)):
        return tuple(t[i : i + 1] for t in inputs)
    return (inputs[i : i + 1],)


def per_example_gradients_by_loop(
    model: nn.Module,
    criterion: Callable,
    inputs,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """``(N, D)`` per-example gradients, one autograd call per example (in the model's dtype).

    Row ``i`` is the gradient of ``criterion(model(inputs[i:i+1]), targets[i:i+1])`` with
    respect to ``params`` (default: the trainable parameters), flattened and concatenated
    in order. ``inputs`` may be a tensor or a tuple of tensors (passed as positional
    arguments). A one-example forward cannot use train-mode BatchNorm: put such models in
    eval mode first. ``p.grad`` is not touched.
    """
    params = [p for p in model.parameters() if p.requires_grad] if params is None else list(params)
    rows = []
    for i in range(targets.shape[0]):
        loss = criterion(model(*_example(inputs, i)), targets[i : i + 1])
        rows.append(_flat(torch.autograd.grad(loss, params, allow_unused=True), params))
    return torch.stack(rows)


def per_example_covariance(
    model: nn.Module,
    criterion: Callable,
    inputs,
    targets: Tensor,
    *,
    params: Sequence[Tensor] | None = None,
) -> Tensor:
    """The paper's gradient covariance K = 1/N Σ (g_i − g)(g_i − g)ᵀ, dense D×D in float64.

    ``g_i`` are the per-example gradients of :func:`per_example_gradients_by_loop` and ``g``
    their mean (for a mean-reduced ``criterion``, the full-batch gradient). Note the 1/N of
    the paper's population covariance over the N examples: the sample covariance of the
    same rows (:func:`gradient_covariance`, 1/(N − 1)) is larger by N/(N − 1).
    """
    g = per_example_gradients_by_loop(model, criterion, inputs, targets, params=params).double()
    centered = g - g.mean(dim=0)
    cov = centered.T @ centered / g.shape[0]
    return 0.5 * (cov + cov.T)


# --- Adam's preconditioned Hessian -------------------------------------------------------


def _flat_state(exp_avg_sq) -> Tensor:
    if isinstance(exp_avg_sq, Tensor):
        return exp_avg_sq.detach().reshape(-1).double().cpu()
    return torch.cat([torch.as_tensor(t).detach().reshape(-1).double().cpu() for t in exp_avg_sq])


def adam_preconditioner(exp_avg_sq, step, *, betas: tuple[float, float], eps: float) -> Tensor:
    """Diagonal of Adam's preconditioner P_t = (1 − β1^t)·diag(√v̂_t + ε), float64, flat.

    Adam's step is θ_{t+1} = θ_t − η m̂_t / (√v̂_t + ε) with m̂_t = m_t/(1 − β1^t) and
    v̂_t = v_t/(1 − β2^t); written as θ_{t+1} = θ_t − η P_t⁻¹ m_t it is preconditioned
    momentum SGD (Cohen et al. 2022, "Adaptive gradient methods at the edge of stability").

    Args:
        exp_avg_sq: ``v_t``: ``optimizer.state[p]["exp_avg_sq"]`` for one parameter, or a
            sequence of them (flattened and concatenated in order: pass them in the order
            of the Hessian's parameters). With ``amsgrad=True`` pass ``max_exp_avg_sq``.
        step: ``t >= 1``: ``optimizer.state[p]["step"]`` (a tensor or a number).
        betas: the group's ``(β1, β2)``.
        eps: the group's ``ε``.
    """
    t = float(step)
    if not (t >= 1 and math.isfinite(t)):
        raise ValueError(
            f"step must be a finite number >= 1 (Adam's state after a step), got {step!r}"
        )
    beta1, beta2 = (float(b) for b in betas)
    v_hat = _flat_state(exp_avg_sq) / (1 - beta2**t)
    p = (1 - beta1**t) * (v_hat.sqrt() + float(eps))
    if not bool(torch.all(p > 0)):
        raise ValueError(
            "the preconditioner has zero entries (v_t = 0 and eps = 0): P^{-1/2} is undefined"
        )
    return p


def preconditioned_hessian(
    H: Tensor,
    exp_avg_sq,
    step,
    *,
    betas: tuple[float, float],
    eps: float,
) -> Tensor:
    """Dense P^{-1/2} H P^{-1/2} for Adam's P (:func:`adam_preconditioner`), float64.

    Symmetric and similar to P⁻¹H, so its top eigenvalue is the preconditioned sharpness
    λ1(P⁻¹H), which settles near (2 + 2β1)/((1 − β1)η) at Adam's edge of stability
    (Cohen et al. 2022). Fed straight from a ``torch.optim.Adam``::

        state = [opt.state[p] for p in params]
        group = opt.param_groups[0]
        PH = preconditioned_hessian(H, [s["exp_avg_sq"] for s in state], state[0]["step"],
                                    betas=group["betas"], eps=group["eps"])

    Args:
        H: dense D×D Hessian over the same parameters, in the same order, as ``exp_avg_sq``.
        exp_avg_sq, step, betas, eps: Adam's state and settings, see :func:`adam_preconditioner`.
    """
    p = adam_preconditioner(exp_avg_sq, step, betas=betas, eps=eps)
    if H.dim() != 2 or H.shape[0] != H.shape[1] or H.shape[0] != p.numel():
        raise ValueError(
            f"H must be {p.numel()}×{p.numel()} to match exp_avg_sq, got {tuple(H.shape)}"
        )
    s = p.rsqrt()
    A = s[:, None] * H.detach().double().cpu() * s[None, :]
    return 0.5 * (A + A.T)
