"""The edge-of-stability learning rate from one Lanczos solve: ``suggest_lr`` and its core.

The learning rate at which the sharpest direction becomes unstable is
η_edge = threshold / λ (SGD: λ1^H with threshold 2(1+β); Adam: the preconditioned λ1^PH
with threshold (2 + 2β1)/(1 − β1)). It is read off a measurement taken *at lr = 1*: the
stability ratio there is λ/threshold, so η_edge = 1/ratio whatever the optimizer (the
quantity that knows the optimizer computes the ratio). A one-measurement alternative to a
learning-rate range test, and the start of :class:`~sgdbreak.optim.warmup.BreakEvenWarmup`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import _validation as V
from ..measurement.monitor import BreakEvenMonitor
from ..measurement.probe import Probe
from ..measurement.quantities import MeasurementContext, Sharpness

__all__ = ["EdgeEstimate", "edge_learning_rate", "suggest_lr"]


@dataclass(frozen=True)
class EdgeEstimate:
    """Where the edge of stability is, and the numbers behind it.

    Attributes:
        lr: the suggested learning rate, ``margin · edge_lr``.
        edge_lr: the learning rate at which η·λ reaches the threshold (``inf`` when the
            measured curvature is not positive).
        sharpness: λ (``lambda1_H`` for SGD, ``lambda1_PH`` for Adam) at the parameters now.
        sharpness_key: which of the two.
        margin: the fraction of ``edge_lr`` suggested.
        converged: whether Lanczos certified λ to its tolerance.
        num_hvps: Hessian-vector products spent.
    """

    lr: float
    edge_lr: float
    sharpness: float
    sharpness_key: str
    margin: float
    converged: bool
    num_hvps: int


def _edge_quantity(monitor: BreakEvenMonitor, tol: float, max_hvps: int) -> Any:
    """A fresh copy (own warm start) of the monitor's curvature quantity for its optimizer."""
    by_name = {quantity.name: quantity for quantity in monitor.quantities}
    template = by_name.get("preconditioned_sharpness") or by_name.get("sharpness") or Sharpness()
    quantity = type(template)(tol=tol, max_hvps=max_hvps)
    quantity.setup(monitor.probe, 0)
    return quantity


def edge_learning_rate(monitor: BreakEvenMonitor, *, margin: float = 0.9, tol: float = 1e-3,
                       max_hvps: int = 60, seed: int = 0) -> EdgeEstimate:
    """Measure the edge-of-stability learning rate of ``monitor``'s optimizer, now.

    Nothing is recorded and the detector is not fed (the measurement is taken at a
    nominal lr of 1, which must not look like a break-even); the monitor's warm starts
    and generator are untouched. Needs ``monitor.optimizer`` (``bind`` or ``attach``).
    """
    margin = V.real("margin", margin, positive=True)
    if monitor.optimizer is None:
        raise ValueError("the monitor has no optimizer: attach it (or use BreakEvenSGD) first")
    quantity = _edge_quantity(monitor, tol, max_hvps)
    hyper = dict(monitor._hyper(), lr=1.0)
    ctx = MeasurementContext(step=monitor.step, probe=monitor.probe, optimizer=monitor.optimizer, hyper=hyper,
                             generator=torch.Generator().manual_seed(seed))
    with monitor.probe.measuring():
        out = quantity.compute(ctx)
        ctx.release_hessian_operator()
    ratio = out.get("stability_ratio")
    if ratio is None:
        raise ValueError(f"{type(monitor.optimizer).__name__} has no stability threshold sgdbreak knows "
                         "(SGD, Adam and AdamW do): there is no edge-of-stability learning rate")
    key = "lambda1_PH" if "lambda1_PH" in out else "lambda1_H"
    edge = 1.0 / ratio if ratio > 0 else math.inf
    converged = bool(out.get("hessian_converged", out.get("preconditioned_converged", 1.0)))
    return EdgeEstimate(lr=margin * edge, edge_lr=edge, sharpness=float(out[key]), sharpness_key=key,
                        margin=margin, converged=converged, num_hvps=ctx.num_hvps)


def suggest_lr(
    model: nn.Module,
    criterion: Callable,
    data: Any,
    optimizer_cls: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
    *,
    margin: float = 0.9,
    tol: float = 1e-3,
    max_hvps: int = 60,
    seed: int = 0,
    **optimizer_kwargs: Any,
) -> EdgeEstimate:
    """The edge-of-stability learning rate at the model's current weights, from one solve.

    Builds a probe on ``data`` (a batch ``(inputs, targets)`` or a list of batches; a few
    hundred examples of the training set, as for :class:`~sgdbreak.Probe`) and an
    ``optimizer_cls`` over the model's parameters with ``optimizer_kwargs`` (momentum,
    betas, …: they set the threshold), and returns ``margin ·`` the learning rate at which
    the sharpest direction becomes unstable. The model and its gradients are untouched.

    Example:
        >>> model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
        >>> data = (torch.randn(64, 4), torch.randint(0, 3, (64,)))
        >>> est = suggest_lr(model, nn.CrossEntropyLoss(), data, momentum=0.9)
        >>> est.lr < est.edge_lr and est.sharpness_key
        'lambda1_H'
    """
    probe = Probe(model, criterion, data)
    optimizer = optimizer_cls(probe.params, lr=1.0, **optimizer_kwargs)
    monitor = BreakEvenMonitor(probe, optimizer=optimizer, measure_every=None, cheap_every=None, seed=seed)
    return edge_learning_rate(monitor, margin=margin, tol=tol, max_hvps=max_hvps, seed=seed)
