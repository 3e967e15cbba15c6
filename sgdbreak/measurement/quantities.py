"""What the monitor measures: quantities that own their settings and share the step's work.

A quantity is any object with a ``name`` and ``compute(ctx) -> Mapping[str, float]``
(:class:`Quantity`); the monitor calls it when a trigger fires and merges its entries into
the record that the detector, loggers and run directory see. ``ctx``
(:class:`MeasurementContext`) gives the step, the probe, the optimizer, the parameters and
the work a measurement shares: the Hessian operator of the probe loss with its gradient
graph (built once, freed when no later quantity needs it), the probe gradient, the top
Hessian eigenvector, and the parameters before the last update.

Optional attributes a quantity may define (the built-ins do):

* ``cheap = True``: also runs on the monitor's cheap trigger (forward passes only);
* ``needs_update = True``: needs ``ctx.before`` (θ_t, so the update Δ = θ_{t+1} − θ_t);
* ``uses_hessian = True``: calls ``ctx.hessian_operator()`` (so it is kept until then);
* ``setup(probe, seed)``: check settings against the probe, fix random subsets;
* ``bind(optimizer, group)``: check the optimizer (the monitor calls it when it binds one);
* ``after_record(record)``: see the finished record (e.g. to calibrate against λ1^H);
* ``state_dict()`` / ``load_state_dict(state)``: checkpointed with the monitor.

Example: a quantity of your own, added to the defaults::

    class GradientNorm:
        name = "gradient_norm"

        def compute(self, ctx):
            return {"grad_norm": float(ctx.gradient().norm())}

    BreakEvenSGD(params, lr=0.1, probe=probe,
                 quantities=[*sgdbreak.default_quantities(), GradientNorm()])
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..estimators.hessian import eigenvalues_of_operator
from ..estimators.linalg import hutchinson_trace
from . import breakeven as be
from . import update_rules as ur
from .probe import Probe
from .protocols import Quantity

__all__ = [
    "AlphaStar",
    "BatchNormGamma",
    "CurvatureVariance",
    "GradientNoise",
    "HessianTrace",
    "MeasurementContext",
    "PreconditionedSharpness",
    "Quantity",
    "Sharpness",
    "UpdateSharpness",
    "default_quantities",
    "last_batchnorm_weight",
]

# The cheap signal's curvature is trusted (calibrated, fed to the detector) only when its
# error bound is at most this fraction of its value.
UPDATE_SHARPNESS_MAX_RELATIVE_ERROR = 0.1
# Rounding of one evaluated loss, in machine epsilons of max(|loss|, 1): measured errors of
# float32 mean cross-entropies against float64 were below 1 (MLPs, 128 examples); the floor
# of 1 covers a small loss computed as a difference of larger logits.
_LOSS_ROUNDING_EPS = 16.0


# --------------------------------------------------------------------------- context


@dataclass
class MeasurementContext:
    """One measurement's inputs and shared work, handed to every quantity in turn.

    Attributes:
        step: optimizer steps completed.
        probe: the :class:`~sgdbreak.Probe` measured on.
        optimizer: the monitored optimizer (or None).
        hyper: the measured parameter group's settings and its update ``rule``
            (:func:`sgdbreak.measurement.update_rules.hyperparameters`; empty without an
            optimizer).
        generator: the monitor's generator: draw random numbers from it only, so a run
            resumes exactly and the global RNG is never touched.
        before: parameters before the last update (quantities with ``needs_update``), or None.
        full: whether this is a full measurement (else only cheap quantities run).
        record: entries so far (earlier quantities' values; read, do not write).
        top_eigenvector: the top Hessian eigenvector, once :class:`Sharpness` has run.
    """

    step: int
    probe: Probe
    optimizer: torch.optim.Optimizer | None
    hyper: Mapping[str, Any]
    generator: torch.Generator
    before: list[Tensor] | None = None
    full: bool = True
    record: dict[str, float] = field(default_factory=dict)
    top_eigenvector: Tensor | None = None
    _operator: Any = None
    _gradient: Tensor | None = None
    num_hvps: int = 0
    loss: float | None = None

    @property
    def params(self) -> list[Tensor]:
        """The measured parameters (the probe's, which the optimizer updates)."""
        return self.probe.params

    def hessian_operator(self):
        """The Hessian of the probe loss as an operator, built once per measurement."""
        if self._operator is None:
            op = self.probe.hessian_operator()
            self._operator = op
            self.loss = float(op.loss)
            if getattr(op, "gradient", None) is not None:
                self._gradient = op.gradient
        return self._operator

    def release_hessian_operator(self) -> None:
        """Free the operator's graph (the monitor calls it once no quantity needs it)."""
        if self._operator is not None:
            self.num_hvps += self._operator.num_matvecs
            self._operator = None

    def gradient(self) -> Tensor:
        """The mean probe gradient, flat (from the operator's graph when it exists)."""
        if self._gradient is None:
            self._gradient = self.probe.gradient()
        return self._gradient

    @property
    def rule(self) -> str | None:
        """The update's stability rule: ``"sgd"``, ``"adam"`` or None (none known).

        From ``hyper["rule"]``, else from the optimizer; a context without either (built
        by hand with SGD's settings, as in sgdbreak 0.1) counts as SGD.
        """
        if "rule" in self.hyper:
            return self.hyper["rule"]
        return ur.stability_rule(self.optimizer) if self.optimizer is not None else ur.SGD

    def stability_ratio(self, sharpness: float) -> float | None:
        """η·(λ1^H + wd)/threshold under SGD; None for another update or without a learning rate."""
        return ur.sgd_ratio({**self.hyper, "rule": self.rule}, sharpness)

    def preconditioned_stability_ratio(self, sharpness: float) -> float | None:
        """η·λ1_PH/threshold under Adam; None for another update or without a learning rate."""
        return ur.adam_ratio({**self.hyper, "rule": self.rule}, sharpness)


# --------------------------------------------------------------------------- validation


def _needs_two(quantity: str, name: str, size: int, probe: Probe) -> None:
    """Train-mode BatchNorm1d cannot normalise a batch of one example."""
    if size < 2 and not probe.single_example_batches:
        raise ValueError(
            f"{quantity}: {name} gives batches of {size} example, but train-mode BatchNorm cannot "
            "normalise a batch of one: use a larger probe or value, or Probe(..., batchnorm='eval')")


def _warm_vectors(owner: str, state: Mapping[str, Any], probe: Probe) -> Tensor | None:
    """The warm-start block of a checkpoint, checked against the probe's width."""
    wv = state["warm_vectors"]
    if wv is None:
        return None
    if not isinstance(wv, Tensor) or wv.dim() != 2 or wv.shape[1] != probe.dim:
        shape = tuple(wv.shape) if isinstance(wv, Tensor) else type(wv).__name__
        raise ValueError(
            f"{owner}: the state's warm-start vectors have shape {shape} but the probe "
            f"measures {probe.dim} parameters: the checkpoint belongs to another model")
    return wv.to(device=probe.device, dtype=probe.params[0].dtype)


def _subset(probe: Probe, examples: int, seed: int) -> Tensor:
    """A fixed random subset of the probe (sorted indices), the same for every quantity."""
    n = probe.num_examples
    chosen = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))[: min(examples, n)]
    return chosen.sort().values


# --------------------------------------------------------------------------- curvature


class _WarmLanczos:
    """Top-k eigenvalues by Lanczos warm-started from the previous solve's Ritz vectors.

    Shared by :class:`Sharpness` (the Hessian) and :class:`PreconditionedSharpness`
    (P^{-1/2}HP^{-1/2}): settings, the warm-start block in ``state_dict`` (its width
    checked on load) and the solve itself.
    """

    uses_hessian = True

    def __init__(self, k: int, tol: float, max_hvps: int, cold_restart_every: int | None):
        owner = type(self).__name__
        self.k = V.integer(f"{owner}: k", k, 1)
        self.tol = V.real(f"{owner}: tol", tol, positive=True)
        self.max_hvps = V.integer(f"{owner}: max_hvps", max_hvps, 1)
        self.cold_restart_every = V.optional_integer(f"{owner}: cold_restart_every", cold_restart_every, 1)
        self.warm_vectors: Tensor | None = None
        self.num_solves = 0

    def setup(self, probe: Probe, seed: int) -> None:
        self._probe = probe

    def _solve(self, matvec: Any, ctx: MeasurementContext) -> Any:
        op = ctx.hessian_operator()
        cold = self.cold_restart_every is not None and self.num_solves % self.cold_restart_every == 0
        res = eigenvalues_of_operator(
            matvec, op.dim, self.k, tol=self.tol, max_hvps=self.max_hvps,
            warm_start=None if cold else self.warm_vectors, generator=ctx.generator,
            dtype=op.dtype, device=op.device,
        )
        self.num_solves += 1
        self.warm_vectors = res.start_vectors.detach().clone()
        return res

    def state_dict(self) -> dict[str, Any]:
        return {"warm_vectors": self.warm_vectors, "num_solves": self.num_solves}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.warm_vectors = _warm_vectors(type(self).__name__, state, self._probe)
        self.num_solves = int(state["num_solves"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, tol={self.tol}, max_hvps={self.max_hvps})"


class Sharpness(_WarmLanczos):
    """λ1^H (``lambda1_H``, ``eig_H_1..k``, ``top5_sum_H`` for k >= 5) and, under SGD, ``stability_ratio``.

    Warm-started Lanczos on the probe's Hessian: the previous solve's Ritz vectors start the
    next one (a few products instead of a cold solve's 10-15). Records
    ``hessian_converged`` so that the detector uses only certified values.

    Args:
        k: number of top eigenvalues.
        tol: relative accuracy of λ1^H.
        max_hvps: product budget per solve.
        cold_restart_every: start from a random block every n solves (guards against a
            warm start missing a new top eigenvector); None = never.
    """

    name = "sharpness"

    def __init__(self, k: int = 1, *, tol: float = 1e-3, max_hvps: int = 30,
                 cold_restart_every: int | None = None):
        super().__init__(k, tol, max_hvps, cold_restart_every)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        res = self._solve(ctx.hessian_operator(), ctx)
        assert self.warm_vectors is not None  # set by the solve
        ctx.top_eigenvector = self.warm_vectors[0]
        out = {"lambda1_H": float(res.eigenvalues[0]), "hessian_converged": float(res.converged)}
        for i, value in enumerate(res.eigenvalues.tolist()):
            out[f"eig_H_{i + 1}"] = value
        if self.k >= 5:
            out["top5_sum_H"] = float(res.eigenvalues[:5].sum())
        ratio = ctx.stability_ratio(out["lambda1_H"])
        if ratio is not None:
            out["stability_ratio"] = ratio
        return out


class PreconditionedSharpness(_WarmLanczos):
    """Adam's preconditioned sharpness λ1(P⁻¹H) (``lambda1_PH``, ``eig_PH_1..k``) and ``stability_ratio``.

    Warm-started Lanczos on the symmetric P^{-1/2} H P^{-1/2} (similar to P⁻¹H: the same
    eigenvalues), P = (1 − β1^t)·diag(√v̂_t + ε) from the optimizer's state after step t
    (``max_exp_avg_sq`` with ``amsgrad``); the Hessian products come from the shared
    operator. Adam's edge is η·λ1_PH = (2 + 2β1)/(1 − β1), 38 for β1 = 0.9 (Cohen et al.
    2022), so ``stability_ratio`` = η·λ1_PH/threshold; ``preconditioned_converged``
    certifies it for the detector, and so does ``preconditioner_warm`` (1 once Adam has
    taken ⌈1/(1 − β2)⌉ steps, :func:`~sgdbreak.measurement.update_rules.preconditioner_warmup_steps`):
    with a v̂ from a few gradients the ratio is recorded but no break-even is read off it.

    Conventions (:func:`sgdbreak.measurement.update_rules.adam_scaling`): with Adam's
    coupled ``weight_decay`` the operator is P^{-1/2}(H + wd·I)P^{-1/2}, the Hessian the
    update follows; AdamW's decoupled decay is not curvature and lowers the threshold
    instead (:func:`~sgdbreak.measurement.breakeven.adam_stability_threshold`). Groups
    with another lr count at their lr relative to the measured group's; parameters the
    optimizer does not update are left out. Before the first step P is the one Adam's
    first step will use: v̂ = g² of the probe gradient, t = 1.

    Needs a :class:`torch.optim.Adam` or :class:`torch.optim.AdamW` (or a subclass, e.g.
    :class:`~sgdbreak.BreakEvenAdam`); other optimizers raise ``ValueError``.

    Args:
        k: number of top eigenvalues.
        tol: relative accuracy of λ1_PH.
        max_hvps: product budget per solve.
        cold_restart_every: start from a random block every n solves; None = never.
    """

    name = "preconditioned_sharpness"

    def __init__(self, k: int = 1, *, tol: float = 1e-3, max_hvps: int = 30,
                 cold_restart_every: int | None = None):
        super().__init__(k, tol, max_hvps, cold_restart_every)

    def bind(self, optimizer: torch.optim.Optimizer, group: int) -> None:
        """Refuse an optimizer that is not Adam, or groups of the probe with different β1."""
        _require_adam(ur.stability_rule(optimizer), optimizer)
        inner = ur.inner_optimizer(optimizer)
        probe_ids = {id(p) for p in self._probe.params}
        betas = {float(g["betas"][0]) for g in inner.param_groups
                 if any(id(p) in probe_ids for p in g["params"])}
        if len(betas) > 1:
            raise ValueError(
                f"PreconditionedSharpness: the probe's parameters are in groups with different β1 "
                f"{sorted(betas)}; Adam's edge (2 + 2β1)/(1 − β1) needs one β1: measure one group "
                "(Probe(..., params=...)) or leave this quantity out")

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        _require_adam(ctx.rule, ctx.optimizer)
        assert ctx.optimizer is not None  # checked by _require_adam
        op = ctx.hessian_operator()
        d, w = ur.adam_scaling(ctx.optimizer, ctx.params, ctx.hyper.get("group", 0), ctx.gradient)
        shift = (w * d * d).to(dtype=op.dtype, device=op.device)
        d = d.to(dtype=op.dtype, device=op.device)

        def matvec(v: Tensor) -> Tensor:
            return d * op(d * v) + shift * v

        res = self._solve(matvec, ctx)
        out = {"lambda1_PH": float(res.eigenvalues[0]), "preconditioned_converged": float(res.converged)}
        beta2 = ur.inner_optimizer(ctx.optimizer).param_groups[ctx.hyper.get("group", 0)]["betas"][1]
        out["preconditioner_warm"] = float(
            ur.adam_steps_taken(ctx.optimizer, ctx.params) >= ur.preconditioner_warmup_steps(beta2))
        for i, value in enumerate(res.eigenvalues.tolist()):
            out[f"eig_PH_{i + 1}"] = value
        ratio = ctx.preconditioned_stability_ratio(out["lambda1_PH"])
        if ratio is not None:
            out["stability_ratio"] = ratio
        return out


def _require_adam(rule: str | None, optimizer: Any) -> None:
    if optimizer is None or rule != ur.ADAM:
        what = "no optimizer" if optimizer is None else type(optimizer).__name__
        raise ValueError(
            f"PreconditionedSharpness measures Adam's preconditioned sharpness from the optimizer's "
            f"state, but the monitor has {what}: use torch.optim.Adam/AdamW (or sgdbreak.BreakEvenAdam"
            "/BreakEvenAdamW), or Sharpness for λ1^H")


class HessianTrace:
    """Tr H (``trace_H``, ``trace_H_stderr``) by Hutchinson's estimator with ``samples`` probes."""

    name = "hessian_trace"
    uses_hessian = True

    def __init__(self, samples: int = 10):
        self.samples = V.integer("HessianTrace: samples", samples, 2)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        op = ctx.hessian_operator()
        tr = hutchinson_trace(op, op.dim, num_samples=self.samples, dtype=op.dtype, device=op.device,
                              generator=ctx.generator)
        return {"trace_H": tr.value, "trace_H_stderr": tr.stderr}

    def __repr__(self) -> str:
        return f"HessianTrace(samples={self.samples})"


class CurvatureVariance:
    """s² along the top eigenvector (``curvature_variance``) and the paper's Eq. 1 (``eq1_lhs``).

    Needs :class:`Sharpness` earlier in the list (its eigenvector), and the training set
    size N and batch size S of Eq. 1, which are never guessed. ``eq1_lhs`` is computed only
    for λ1^H > 0: Eq. 1 is the stability of a step along positive curvature.

    Args:
        dataset_size, batch_size: N and S.
        groups: random probe groups for s² (one small product each).
    """

    name = "curvature_variance"

    def __init__(self, *, dataset_size: int, batch_size: int, groups: int = 8):
        self.dataset_size = V.integer("CurvatureVariance: dataset_size", dataset_size, 1)
        self.batch_size = V.integer("CurvatureVariance: batch_size", batch_size, 1)
        if batch_size > dataset_size:
            raise ValueError(f"CurvatureVariance: batch_size={batch_size} exceeds dataset_size={dataset_size}")
        self.groups = V.integer("CurvatureVariance: groups", groups, 2)

    def setup(self, probe: Probe, seed: int) -> None:
        self.groups = min(self.groups, probe.num_examples)
        _needs_two("CurvatureVariance", "groups (probe size // groups)", probe.num_examples // self.groups,
                   probe)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        lam = ctx.record.get("lambda1_H", 0.0)
        if ctx.top_eigenvector is None or not lam > 0:
            return {}
        s2 = ctx.probe.curvature_variance(ctx.top_eigenvector, num_groups=self.groups,
                                          generator=ctx.generator)
        out = {"curvature_variance": s2}  # a non-finite s² is dropped by the monitor
        if "lr" in ctx.hyper and math.isfinite(s2) and ctx.rule == ur.SGD:  # Eq. 1 is SGD's
            eta = ctx.hyper["lr"] * (1 - ctx.hyper.get("dampening", 0.0))
            out["eq1_lhs"] = be.eq1_lhs(eta, lam, s2, dataset_size=self.dataset_size,
                                        batch_size=self.batch_size)
        return out

    def __repr__(self) -> str:
        return (f"CurvatureVariance(dataset_size={self.dataset_size}, batch_size={self.batch_size}, "
                f"groups={self.groups})")


# --------------------------------------------------------------------------- noise


class GradientNoise:
    """The gradient-noise spectrum K: ``lambda1_K``, ``trace_K``, conditioning, ``gns``, …

    Args:
        method: "microbatch" (the paper's: L mean gradients of M-example batches, K in
            per-example units with the finite-population factor) or "per_example".
        samples: L, the number of gradient samples.
        batch_size: M (default ``min(128, N_probe // L)``: disjoint batches).
        k: number of ``eig_K_i`` entries.
        gram_dtype: precision of the (L, D) Gram product
            (:func:`~sgdbreak.estimators.noise.covariance_spectrum`): None (default) in the
            gradients' dtype, one matrix product (docs/overhead.md); ``torch.float64`` for
            the exact float64 spectrum of float32 samples.
    """

    name = "gradient_noise"

    def __init__(self, method: str = "microbatch", *, samples: int = 20, batch_size: int | None = None,
                 k: int = 5, gram_dtype: torch.dtype | None = None):
        if method not in ("microbatch", "per_example"):
            raise ValueError(f"GradientNoise: method must be 'microbatch' or 'per_example', got {method!r}")
        self.method = method
        self.samples = V.integer("GradientNoise: samples", samples, 2)
        self.batch_size = V.optional_integer("GradientNoise: batch_size", batch_size)
        self.k = V.integer("GradientNoise: k", k, 1)
        if gram_dtype is not None and gram_dtype != torch.float64:
            raise ValueError(f"GradientNoise: gram_dtype must be torch.float64 or None, got {gram_dtype!r}")
        self.gram_dtype = gram_dtype

    def setup(self, probe: Probe, seed: int) -> None:
        n = probe.num_examples
        self.batch_size = self.batch_size or max(1, min(128, n // self.samples))
        if self.batch_size >= n:
            raise ValueError(f"GradientNoise: batch_size={self.batch_size} must be smaller than the "
                             f"probe size {n}")
        if self.method == "microbatch":
            _needs_two("GradientNoise", f"batch_size={self.batch_size}", self.batch_size, probe)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        from ..estimators.noise import noise_metrics
        from ..estimators.samples import batch_mean_covariance_scale

        probe, batch_size = ctx.probe, self.batch_size
        assert batch_size is not None  # resolved by setup()
        samples = probe.gradient_samples(method=self.method, num_samples=self.samples,
                                         batch_size=batch_size, generator=ctx.generator)
        gradient = ctx.gradient()
        if self.method == "per_example":
            return noise_metrics(samples, gradient, batch_size=1, k=self.k, gram_dtype=self.gram_dtype)
        scale = batch_mean_covariance_scale(probe.num_examples, batch_size, self.samples)
        return noise_metrics(samples, gradient, batch_size=batch_size, k=self.k, scale=scale,
                             gram_dtype=self.gram_dtype)

    def __repr__(self) -> str:
        return (f"GradientNoise({self.method!r}, samples={self.samples}, batch_size={self.batch_size}, "
                f"k={self.k})")


# --------------------------------------------------------------------------- along the update


def point_along(before: Tensor, after: Tensor, alpha: float) -> Tensor:
    """θ_t + α(θ_{t+1} − θ_t) in the parameters' dtype; the end points exactly."""
    if alpha == 0.0:
        return before
    if alpha == 1.0:
        return after
    return before + alpha * (after - before)


def losses_along(probe: Probe, indices: Tensor, before: list[Tensor], alphas) -> list[float]:
    """Losses on ``indices`` at θ_t + α·Δ, Δ = θ_{t+1} − θ_t; parameters restored exactly."""
    params = probe.params
    after = [p.detach().clone() for p in params]
    out = []
    try:
        with probe.measuring():
            for alpha in alphas:
                with torch.no_grad():
                    for p, b, a in zip(params, before, after):
                        p.copy_(point_along(b, a, alpha))
                out.append(probe.loss_value(indices))
    finally:
        with torch.no_grad():
            for p, a in zip(params, after):
                p.copy_(a)
    return out


def _dense(tensor: Tensor) -> Tensor:
    """The stored values of a (possibly sparse) gradient, for norms."""
    return tensor.coalesce().values() if tensor.is_sparse else tensor


class UpdateSharpness:
    """The cheap signal: curvature along the update just taken, from three forward passes.

    With f(α) = L(θ_t + αΔ) on ``examples`` fixed probe examples, ``update_sharpness`` =
    (f(2) − 2f(1) + f(0))/‖Δ‖² (a Rayleigh quotient of H along Δ on a quadratic, so
    ≤ λ1^H) and ``critical_sharpness`` = 2/η_c, η_c the step at which the loss rises back
    to f(0) (Kalra et al.). ``update_sharpness_error`` bounds its float rounding error; the
    value and what is built on it are recorded only when the bound is at most 10 % of it.
    ``lambda1_H_update`` rescales it by the ratio λ1^H / update_sharpness of the full
    measurements (an EMA), and ``stability_ratio_update`` is its stability ratio (under
    SGD only: the update's curvature is that of H, while Adam's edge is on P⁻¹H).
    """

    name = "update_sharpness"
    cheap = True
    needs_update = True

    def __init__(self, examples: int = 128):
        self.examples = V.integer("UpdateSharpness: examples", examples, 1)
        self.calibration: float | None = None  # EMA of lambda1_H / update_sharpness

    def setup(self, probe: Probe, seed: int) -> None:
        self.indices = _subset(probe, self.examples, seed)
        _needs_two("UpdateSharpness", f"examples={len(self.indices)}", len(self.indices), probe)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        before = ctx.before
        if before is None:
            return {}
        f0, f1, f2 = losses_along(ctx.probe, self.indices, before, (0.0, 1.0, 2.0))
        params = ctx.params
        delta_sq = sum(float((p.detach().double() - b.double()).pow(2).sum()) for p, b in zip(params, before))
        out: dict[str, float] = {}
        if delta_sq == 0:
            return out
        curvature = f2 - 2 * f1 + f0  # = 2b in f(α) = f0 + aα + bα²
        error = self._curvature_error(params, before, (f0, f1, f2), delta_sq, ctx.hyper.get("lr", 0.0))
        out["update_sharpness_error"] = error / delta_sq
        if not error <= UPDATE_SHARPNESS_MAX_RELATIVE_ERROR * abs(curvature):
            return out  # rounding could make up the value (tiny steps, low precision): not used
        out["update_sharpness"] = curvature / delta_sq
        slope = f1 - f0 - curvature / 2
        lr = ctx.hyper.get("lr")
        if lr is not None and slope < 0 < curvature and lr > 0:
            alpha_c = -2 * slope / curvature
            out["critical_sharpness"] = 2.0 / (alpha_c * lr)
        if out["update_sharpness"] > 0 and lr is not None:
            scale = self.calibration if self.calibration is not None else 1.0
            out["lambda1_H_update"] = scale * out["update_sharpness"]
            ratio = ctx.stability_ratio(out["lambda1_H_update"])
            if ratio is not None:
                out["stability_ratio_update"] = ratio
        return out

    @staticmethod
    def _curvature_error(params: list[Tensor], before: list[Tensor], losses: tuple[float, float, float],
                         delta_sq: float, lr: float) -> float:
        """Bound on the rounding error of f(2) − 2f(1) + f(0), in loss units.

        Two sources: each loss is rounded (a few machine epsilons of max(|f|, 1) over a
        forward pass, bounded generously), and θ_t + 2Δ is rounded to the parameters'
        dtype, which moves the third point off the line by e and f(2) by up to ‖g‖·‖e‖
        (g the gradient: the training step's ``p.grad`` when every probe parameter has
        one, else ‖Δ‖/lr).
        """
        eps = torch.finfo(params[0].dtype).eps
        rounding = _LOSS_ROUNDING_EPS * eps * sum(w * max(abs(f), 1.0) for f, w in zip(losses, (1, 2, 1)))
        off_line_sq = 0.0
        for p, b in zip(params, before):
            exact = b.double() + 2 * (p.detach().double() - b.double())
            off_line_sq += float((point_along(b, p.detach(), 2.0).double() - exact).pow(2).sum())
        grads = [p.grad for p in params]
        grad_sq: float
        if all(g is not None for g in grads):
            grad_sq = sum(float(_dense(g).double().pow(2).sum()) for g in grads if g is not None)
        else:
            grad_sq = delta_sq / lr**2 if lr > 0 else math.inf
        return rounding + math.sqrt(grad_sq * off_line_sq)

    def after_record(self, record: Mapping[str, float]) -> None:
        """Calibrate against λ1^H (update_sharpness is only recorded when resolved)."""
        if "lambda1_H" in record and record.get("update_sharpness", 0) > 0:
            ratio = record["lambda1_H"] / record["update_sharpness"]
            self.calibration = ratio if self.calibration is None else 0.5 * self.calibration + 0.5 * ratio

    def state_dict(self) -> dict[str, Any]:
        return {"calibration": self.calibration}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        calibration = state["calibration"]
        self.calibration = None if calibration is None else float(calibration)

    def __repr__(self) -> str:
        return f"UpdateSharpness(examples={self.examples})"


class AlphaStar:
    """α* (``alpha_star``): smallest α with L(θ_t − α(θ_t − θ_{t+1})) ≥ 1.2·L(θ_t) (paper §4).

    Doubling then bisection along the last update, on ``examples`` fixed probe examples
    (the same subset as :class:`UpdateSharpness` for the same seed).
    """

    name = "alpha_star"
    needs_update = True

    def __init__(self, examples: int = 128, *, rise: float = 1.2, max_alpha: float = 1024.0):
        self.examples = V.integer("AlphaStar: examples", examples, 1)
        self.rise = V.real("AlphaStar: rise", rise)
        self.max_alpha = V.real("AlphaStar: max_alpha", max_alpha)
        if self.rise <= 1 or self.max_alpha < 1:
            raise ValueError(f"AlphaStar: rise must be > 1 and max_alpha >= 1, got {rise!r}, {max_alpha!r}")

    def setup(self, probe: Probe, seed: int) -> None:
        self.indices = _subset(probe, self.examples, seed)
        _needs_two("AlphaStar", f"examples={len(self.indices)}", len(self.indices), probe)

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        before = ctx.before
        if before is None:
            return {}

        def loss(alpha: float) -> float:
            return losses_along(ctx.probe, self.indices, before, (alpha,))[0]

        target = self.rise * loss(0.0)
        lo, hi = 0.0, 1.0
        while loss(hi) < target:
            lo, hi = hi, hi * 2
            if hi > self.max_alpha:
                return {"alpha_star": float("inf")}
        for _ in range(6):
            mid = 0.5 * (lo + hi)
            if loss(mid) >= target:
                hi = mid
            else:
                lo = mid
        return {"alpha_star": hi}

    def __repr__(self) -> str:
        return f"AlphaStar(examples={self.examples})"


# --------------------------------------------------------------------------- weights


def last_batchnorm_weight(model: nn.Module) -> Tensor | None:
    """The scale vector γ of the last BatchNorm layer (the paper's ‖γ‖), or None."""
    gamma = None
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            gamma = m.weight
    return gamma


class BatchNormGamma:
    """‖γ‖ of the last BatchNorm layer (``bn_gamma_norm``); nothing for a model without one."""

    name = "bn_gamma_norm"

    def compute(self, ctx: MeasurementContext) -> dict[str, float]:
        gamma = last_batchnorm_weight(ctx.probe.model)
        return {} if gamma is None else {"bn_gamma_norm": float(gamma.detach().double().norm())}

    def __repr__(self) -> str:
        return "BatchNormGamma()"


def default_quantities(rule: str | None = "sgd") -> list[Quantity]:
    """What the monitor measures by default: the cheap signal, λ1^H, the noise spectrum, ‖γ‖.

    With ``rule="adam"`` :class:`PreconditionedSharpness` follows :class:`Sharpness` (its
    λ1_PH gives Adam's ``stability_ratio``; it shares the Hessian graph, so it costs its
    own few Hessian-vector products only). Add your own with
    ``quantities=[*sgdbreak.default_quantities(), MyQuantity()]``.
    """
    rule = V.choice("rule", rule, (ur.SGD, ur.ADAM, None))
    curvature: list[Quantity] = [Sharpness()]
    if rule == ur.ADAM:
        curvature.append(PreconditionedSharpness())
    return [UpdateSharpness(), *curvature, GradientNoise(), BatchNormGamma()]
