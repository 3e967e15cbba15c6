"""Brute-force references: dense Hessians and matrices with chosen spectra (small problems only)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor, nn


def exact_hessian(loss_fn: Callable[[], Tensor], params: Iterable[Tensor]) -> Tensor:
    """Dense D×D Hessian of a loss closure, one gradient-of-gradient row at a time."""
    params = list(params)
    loss = loss_fn()
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    rows = []
    for j in range(flat.numel()):
        if not flat[j].requires_grad:
            rows.append(torch.zeros_like(flat))
            continue
        row = torch.autograd.grad(flat[j], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, params)]))
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
    flat0 = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if p.requires_grad])
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}

    def f(flat: Tensor) -> Tensor:
        parts = torch.split(flat, sizes)
        state = {n: t.view(s) for n, t, s in zip(names, parts, shapes)}
        state.update({n: b.clone() for n, b in buffers.items()})
        return criterion(torch.func.functional_call(model, state, (inputs,)), targets)

    train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())
    if not train_bn:
        H = torch.func.hessian(f)(flat0).double()
    else:
        # torch.func's transforms give wrong second derivatives through train-mode
        # BatchNorm in torch 2.13 (off by ~5 % against finite differences), so take the
        # rows with plain autograd: row j = ∇(∂f/∂θ_j).
        flat = flat0.clone().requires_grad_(True)
        grad = torch.autograd.grad(f(flat), flat, create_graph=True)[0]
        H = torch.stack([torch.autograd.grad(grad[j], flat, retain_graph=True)[0] for j in range(flat.numel())])
        H = H.double()
    return 0.5 * (H + H.T)


def symmetric_matrix_with_spectrum(eigenvalues, *, generator: torch.Generator | None = None,
                                   dtype: torch.dtype = torch.float64) -> Tensor:
    """A dense symmetric matrix Q diag(λ) Qᵀ with a random orthogonal Q."""
    ev = torch.as_tensor(eigenvalues, dtype=dtype)
    n = ev.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=dtype, generator=generator))
    A = Q @ torch.diag(ev) @ Q.T
    return 0.5 * (A + A.T)
