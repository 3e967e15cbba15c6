"""Which update an optimizer applies: the one place that decides which edge of stability applies.

* ``"sgd"``: :class:`torch.optim.SGD` and subclasses. Edge on η·(λ1^H + wd) at
  :func:`~sgdbreak.measurement.breakeven.stability_threshold` (momentum, dampening, Nesterov).
* ``"adam"``: :class:`torch.optim.Adam`, :class:`torch.optim.AdamW` and subclasses (with
  ``amsgrad`` too: its preconditioner uses ``max_exp_avg_sq``). Edge on η·λ1(P⁻¹H) at
  :func:`~sgdbreak.measurement.breakeven.adam_stability_threshold` (Cohen et al. 2022).
* None: any other optimizer. Its runs are measured, but no record gets a stability ratio
  or an edge, so the detector's stability and Eq. 1 rules never fire on them: SGD's
  threshold says nothing about another update.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import NonFiniteMeasurement
from . import breakeven as be

__all__ = ["ADAM", "SGD", "adam_scaling", "adam_steps_taken", "edge_entries", "hyperparameters",
           "inner_optimizer", "preconditioner_warmup_steps", "stability_rule"]

SGD = "sgd"
ADAM = "adam"


def inner_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside Accelerate's ``AcceleratedOptimizer`` wrappers."""
    for _ in range(8):
        if type(optimizer).__name__ != "AcceleratedOptimizer" or not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return optimizer


def stability_rule(optimizer: torch.optim.Optimizer | None) -> str | None:
    """``"sgd"``, ``"adam"`` or None (no stability threshold known) for ``optimizer``."""
    inner = inner_optimizer(optimizer) if optimizer is not None else None
    if isinstance(inner, torch.optim.SGD):
        return SGD
    if isinstance(inner, torch.optim.Adam):  # AdamW is a subclass
        return ADAM
    return None


def hyperparameters(optimizer: torch.optim.Optimizer | None, group: int = 0) -> dict[str, Any]:
    """The measured group's settings that a stability ratio needs, with ``rule`` and ``group``.

    SGD: ``lr``, ``momentum``, ``dampening``, ``weight_decay``, ``nesterov``. Adam:
    ``lr``, ``beta1``, ``weight_decay`` and ``decoupled_weight_decay`` (True for AdamW).
    Other optimizers: ``lr`` only (when the group has one). Empty without an optimizer.
    """
    if optimizer is None:
        return {}
    g = optimizer.param_groups[group]
    rule = stability_rule(optimizer)
    out: dict[str, Any] = {"rule": rule, "group": group}
    if "lr" in g:
        out["lr"] = float(g["lr"])
    if rule == SGD:
        for key in ("momentum", "dampening", "weight_decay"):
            out[key] = float(g.get(key, 0.0))
        out["nesterov"] = bool(g.get("nesterov", False))
    elif rule == ADAM:
        out["beta1"] = float(g["betas"][0])
        out["weight_decay"] = float(g.get("weight_decay", 0.0))
        out["decoupled_weight_decay"] = bool(g.get("decoupled_weight_decay", False))
    return out


def sgd_ratio(hyper: dict[str, Any], lambda1_H: float) -> float | None:
    """η·(λ1^H + wd)/threshold under SGD; None for another update or without a learning rate."""
    if hyper.get("rule", SGD) != SGD or "lr" not in hyper:
        return None
    return be.stability_ratio(hyper["lr"], lambda1_H, hyper.get("momentum", 0.0),
                              dampening=hyper.get("dampening", 0.0), nesterov=hyper.get("nesterov", False),
                              weight_decay=hyper.get("weight_decay", 0.0))


def adam_threshold(hyper: dict[str, Any]) -> float:
    """Adam's edge on η·λ1_PH for the group (AdamW's decoupled decay included)."""
    decoupled = hyper["weight_decay"] if hyper.get("decoupled_weight_decay") else 0.0
    return be.adam_stability_threshold(hyper["beta1"], lr=hyper["lr"], decoupled_weight_decay=decoupled)


def adam_ratio(hyper: dict[str, Any], lambda1_PH: float) -> float | None:
    """η·λ1_PH/threshold under Adam; None for another update or without a learning rate."""
    if hyper.get("rule") != ADAM or "lr" not in hyper:
        return None
    return hyper["lr"] * lambda1_PH / adam_threshold(hyper)


def edge_entries(hyper: dict[str, Any]) -> dict[str, float]:
    """The record's edge of stability: ``edge_sharpness`` (λ1^H at SGD's edge) or
    ``edge_sharpness_PH`` (λ1_PH at Adam's edge); nothing for other updates or lr <= 0."""
    rule, lr = hyper.get("rule"), hyper.get("lr", 0.0)
    if not lr > 0:
        return {}
    if rule == SGD:
        threshold = be.stability_threshold(hyper.get("momentum", 0.0), dampening=hyper.get("dampening", 0.0),
                                           nesterov=hyper.get("nesterov", False))
        return {"edge_sharpness": threshold / lr - hyper.get("weight_decay", 0.0)}
    if rule == ADAM:
        return {"edge_sharpness_PH": adam_threshold(hyper) / lr}
    return {}


def preconditioner_warmup_steps(beta2: float) -> int:
    """Steps after which Adam's v̂ is an average worth a stability analysis: ⌈1/(1 − β2)⌉.

    Before that v̂ rests on a few squared gradients (v̂ = g² after one step), so coordinates
    with small early gradients get a huge 1/√v̂ and λ1(P⁻¹H) is 1e5–1e8 on MNIST nets,
    while Adam's actual step there is bounded by about η (m̂/√v̂ ≈ ±1): the linearised
    edge does not describe the update yet. 1,000 steps for β2 = 0.999; 0 for β2 = 1.
    """
    beta2 = float(beta2)
    return math.ceil(1.0 / (1.0 - beta2) - 1e-6) if beta2 < 1 else 0


def adam_steps_taken(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> int:
    """Adam's step count t for ``params`` (the smallest over those with state; 0 before any)."""
    inner = inner_optimizer(optimizer)
    steps = [int(float(inner.state[p]["step"])) for p in params if "step" in inner.state.get(p, {})]
    return min(steps) if steps else 0


def adam_scaling(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], group: int,
                 gradient: Callable[[], Tensor]) -> tuple[Tensor, Tensor]:
    """Flat float64 ``(d, w)`` with d = √(η_i/η)·P^{-1/2} and w the coupled weight decay.

    The step of Adam linearised at θ is y ← y − η·A·y (with momentum) for y = P^{1/2}θ and
    A = D^{1/2}(H + diag(w))D^{1/2}, D = diag(η_i/(η·P_i)): ``η_i`` is each parameter's
    group lr, η the measured group's, so groups with other learning rates count at their
    own step size. P = (1 − β1^t)·diag(√v̂_t + ε) from each parameter's optimizer state
    (``max_exp_avg_sq`` with ``amsgrad``). A parameter without state yet (before its first
    step) gets what Adam's first step would use: v̂ = g² from the probe gradient (plus the
    coupled decay wd·θ) with t = 1. A parameter the optimizer does not update gets d = 0
    (it does not move, so it cannot be unstable).

    Raises:
        NonFiniteMeasurement: P has zero entries (ε = 0 and v = 0) or non-finite ones.
    """
    inner = inner_optimizer(optimizer)
    where = {id(p): g for g in inner.param_groups for p in g["params"]}
    lr = float(inner.param_groups[group]["lr"])
    flat_grad: Tensor | None = None
    offset, ds, ws = 0, [], []
    for p in params:
        n = p.numel()
        g = where.get(id(p))
        if g is None:
            ds.append(torch.zeros(n, dtype=torch.float64, device=p.device))
            ws.append(torch.zeros(n, dtype=torch.float64, device=p.device))
            offset += n
            continue
        beta1, beta2 = (float(b) for b in g["betas"])
        wd = float(g.get("weight_decay", 0.0))
        coupled = 0.0 if g.get("decoupled_weight_decay", False) else wd
        state = inner.state.get(p, {})
        if "exp_avg_sq" in state:
            v = state["max_exp_avg_sq"] if g.get("amsgrad", False) else state["exp_avg_sq"]
            t = float(state["step"])
            v_hat = v.detach().reshape(-1).double() / (1 - beta2**t)
        else:
            if flat_grad is None:
                flat_grad = gradient()
            grad = flat_grad[offset:offset + n].double() + coupled * p.detach().reshape(-1).double()
            t, v_hat = 1.0, grad.square()
        precond = (1 - beta1**t) * (v_hat.sqrt() + float(g["eps"]))
        scale = float(g["lr"]) / lr if lr > 0 else 1.0
        ds.append((scale / precond).sqrt())
        ws.append(torch.full((n,), coupled, dtype=torch.float64, device=p.device))
        offset += n
    d, w = torch.cat(ds), torch.cat(ws)
    if not bool(torch.isfinite(d).all()):
        raise NonFiniteMeasurement(
            "Adam's preconditioner has zero or non-finite entries (eps = 0 where v = 0?): "
            "P^{-1/2} is undefined")
    return d, w
