"""Break-even detection: stability thresholds, paper Eq. 1 and a streaming detector.

The break-even point (Jastrzebski et al., ICLR 2020, Sec. 3) is the first point of a run
where SGD becomes unstable along the sharpest direction of the loss. This module holds
the pure formulas for that edge (the stability threshold of SGD with momentum, Nesterov,
dampening and weight decay; the left-hand side of the paper's Eq. 1) and
:class:`BreakEvenDetector`, a small rule over the stream of measurement records of
``docs/contracts.md``. It is pure Python (no torch import) so it can be tested, replayed
over ``measurements.jsonl`` and checkpointed without a model.

Example:
    >>> det = BreakEvenDetector(rules=("stability",), confirm=2)
    >>> for step, ratio in [(0, 0.5), (10, 1.1), (20, 1.2), (30, 0.9)]:
    ...     _ = det.update({"step": step, "stability_ratio": ratio})
    >>> det.result.reached, det.result.step, det.result.detected_at, det.result.rule
    (True, 10, 20, 'stability')
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import _validation as V

__all__ = [
    "DEFAULT_QUALITY_KEYS",
    "RULES",
    "BreakEvenDetector",
    "BreakEvenResult",
    "RuleFiring",
    "adam_stability_threshold",
    "eq1_lhs",
    "stability_ratio",
    "stability_threshold",
]

RULES = ("stability", "eq1", "peak")
"""Rule families understood by :class:`BreakEvenDetector`."""

_EQ1_KEY = "eq1_lhs"
_STATE_VERSION = 1
# Config keys added after version 1; states saved without them load with the defaults.
_LATER_CONFIG_KEYS = ("quality_keys",)

DEFAULT_QUALITY_KEYS = {
    "stability_ratio": "hessian_converged",
    "eq1_lhs": "hessian_converged",
    "lambda1_H": "hessian_converged",
}
"""Values the detector uses only when their solver certified them (record key -> flag key)."""

# Adam's stability_ratio comes from the preconditioned solve: when a record carries these
# flags (the solve converged; v̂ has warmed up) they must be true too, whatever
# ``quality_keys`` says (kept out of the configuration so checkpoints of earlier versions
# still load).
_ALSO_CERTIFIED_BY = {"stability_ratio": ("preconditioned_converged", "preconditioner_warm")}


# --------------------------------------------------------------------------- validation


def _keys(name: str, value: Any) -> tuple[str, ...]:
    """Normalises a key or an iterable of keys to a non-empty tuple of distinct strings."""
    keys = (value,) if isinstance(value, str) else tuple(value)
    if not keys:
        raise ValueError(f"{name} must name at least one key, got {value!r}")
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ValueError(f"{name} must hold non-empty strings, got {key!r}")
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name} must not repeat a key, got {value!r}")
    return keys


# --------------------------------------------------------------------------- formulas


def stability_threshold(
    momentum: float = 0.0, *, dampening: float = 0.0, nesterov: bool = False
) -> float:
    """Value of η·λ at which SGD on a quadratic with curvature λ becomes unstable.

    Uses the update of ``torch.optim.SGD``: ``v ← βv + (1−τ)g``, then ``θ ← θ − ηv``
    (heavy ball) or ``θ ← θ − η(g + βv)`` (Nesterov). On ``f(θ) = λθ²/2`` with
    ``a = ηλ`` the iterates follow ``z² − (1 + β − (1−τ)a) z + β`` (heavy ball) or
    ``z² − (1+β)(1−a) z + β(1−a)`` (Nesterov); the Jury criterion puts the edge at the
    root ``z = −1``: ``(1−τ)a = 2 + 2β`` and ``a = (2 + 2β)/(1 + 2β)``. Both give 2 for
    β = 0 (plain gradient descent, the paper's η·λ1^H = 2).

    Args:
        momentum: β in [0, 1).
        dampening: τ in [0, 1); torch applies it from the second step on (which does not
            change the asymptotic stability) and ignores it when β = 0.
        nesterov: Nesterov momentum (requires ``dampening == 0``, as in torch).

    Returns:
        The threshold on η·λ (dimensionless).

    Raises:
        ValueError: momentum or dampening out of range, or Nesterov with dampening.

    Example:
        >>> stability_threshold(), stability_threshold(0.9)
        (2.0, 3.8)
    """
    beta = V.real("momentum", momentum)
    tau = V.real("dampening", dampening)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"dampening must be in [0, 1), got {dampening!r}")
    if not isinstance(nesterov, bool):
        raise TypeError(f"nesterov must be a bool, got {nesterov!r}")
    if nesterov:
        if tau != 0.0:
            raise ValueError(
                f"nesterov requires dampening=0 (as torch.optim.SGD), got {dampening!r}"
            )
        return (2.0 + 2.0 * beta) / (1.0 + 2.0 * beta)
    if beta == 0.0:
        return 2.0  # torch ignores dampening without momentum (no momentum buffer)
    return (2.0 + 2.0 * beta) / (1.0 - tau)


def adam_stability_threshold(beta1: float = 0.9, *, lr: float = 0.0,
                             decoupled_weight_decay: float = 0.0) -> float:
    """Value of η·λ1(P⁻¹H) at which Adam with a frozen preconditioner P becomes unstable.

    ``torch.optim.Adam`` steps ``θ ← θ − η P⁻¹ m`` with ``m ← β1 m + (1 − β1) g`` and
    P = (1 − β1^t)·diag(√v̂ + ε) (Cohen et al. 2022): heavy ball with dampening β1 in the
    coordinates y = P^{1/2} θ, where the curvature is P^{-1/2} H P^{-1/2}. The Jury
    criterion puts the edge at ``(2 + 2β1)/(1 − β1)`` (38 for β1 = 0.9). AdamW's decoupled
    decay multiplies θ by c = 1 − η·wd before each step, which moves the edge to
    ``(1 + c)(1 + β1)/(1 − β1)`` (slightly lower).

    Args:
        beta1: β1 in [0, 1).
        lr: η >= 0 (only used with ``decoupled_weight_decay``).
        decoupled_weight_decay: AdamW's wd >= 0 (coupled decay belongs in H instead).

    Example:
        >>> round(adam_stability_threshold(0.9), 9)
        38.0
    """
    beta = V.real("beta1", beta1)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    eta, wd = V.real("lr", lr), V.real("decoupled_weight_decay", decoupled_weight_decay)
    if eta < 0.0 or wd < 0.0:
        raise ValueError(f"lr and decoupled_weight_decay must be >= 0, got {lr!r}, {decoupled_weight_decay!r}")
    c = 1.0 - eta * wd
    if not -1.0 < c <= 1.0:
        raise ValueError(f"lr·decoupled_weight_decay must be in [0, 2), got {eta * wd!r}: the decay "
                         "alone makes the iterates diverge")
    return (1.0 + c) * (1.0 + beta) / (1.0 - beta)


def stability_ratio(
    lr: float,
    lambda1_H: float,
    momentum: float = 0.0,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> float:
    """Step size relative to the edge of stability: ``lr·(λ1 + weight_decay)/threshold``.

    Coupled (torch-style) weight decay adds ``weight_decay·θ`` to the gradient, so it adds
    ``weight_decay`` to every Hessian eigenvalue of the loss the optimizer really follows.
    A ratio of 1 is the edge of stability along the sharpest direction; above 1 the step
    diverges along it (on a quadratic).

    Args:
        lr: learning rate η >= 0.
        lambda1_H: largest Hessian eigenvalue of the (unregularised) loss.
        momentum: β, see :func:`stability_threshold`.
        dampening: τ, see :func:`stability_threshold`.
        nesterov: see :func:`stability_threshold`.
        weight_decay: coupled L2 coefficient >= 0.

    Returns:
        The dimensionless ratio (negative when the sharpest curvature is negative).

    Example:
        >>> stability_ratio(0.1, 20.0)
        1.0
    """
    eta = V.real("lr", lr)
    lam = V.real("lambda1_H", lambda1_H)
    wd = V.real("weight_decay", weight_decay)
    if eta < 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if wd < 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    threshold = stability_threshold(momentum, dampening=dampening, nesterov=nesterov)
    return eta * (lam + wd) / threshold


def eq1_lhs(
    lr: float,
    lambda1_H: float,
    curvature_variance: float,
    *,
    dataset_size: int,
    batch_size: int,
) -> float:
    """Left-hand side of the paper's Eq. 1 (Wu et al. 2018), the SGD stability test.

    ``(1 − ηλ)² + s²η²(N − S)/(S(N − 1))`` is the factor by which one SGD step (plain,
    no momentum) multiplies the second moment of the distance to the minimum along the
    top eigenvector v, with mini-batches of S examples drawn without replacement from N.
    SGD is stable while it is <= 1; break-even is where it first reaches 1.

    Args:
        lr: learning rate η >= 0.
        lambda1_H: λ, the top Hessian eigenvalue (mean of the per-example curvatures).
        curvature_variance: s² >= 0, the population variance over the N examples of
            ``vᵀ H_i v`` (divide by N, not N − 1).
        dataset_size: N > 1.
        batch_size: S with 1 <= S <= N.

    Returns:
        The value of the left-hand side (>= 0).

    Example:
        >>> eq1_lhs(0.1, 20.0, 0.0, dataset_size=100, batch_size=10)
        1.0
    """
    eta = V.real("lr", lr)
    lam = V.real("lambda1_H", lambda1_H)
    s2 = V.real("curvature_variance", curvature_variance)
    n = V.integer("dataset_size", dataset_size, 2)
    s = V.integer("batch_size", batch_size, 1)
    if eta < 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if s2 < 0.0:
        raise ValueError(f"curvature_variance must be >= 0, got {curvature_variance!r}")
    if s > n:
        raise ValueError(f"batch_size must be <= dataset_size={n}, got {batch_size!r}")
    return (1.0 - eta * lam) ** 2 + s2 * eta**2 * (n - s) / (s * (n - 1))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RuleFiring:
    """One rule firing.

    Attributes:
        rule: rule name (``"stability"``, ``"eq1"``, ``"peak_<key>"``).
        step: step the rule attributes the event to (first record of the confirmed run;
            for a peak, the step of the smoothed maximum).
        detected_at: step of the record at which the rule fired.
        evidence: the values behind the firing (always holds ``step`` and ``detected_at``).
    """

    rule: str
    step: int
    detected_at: int
    evidence: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class BreakEvenResult:
    """What the detector has concluded so far.

    Attributes:
        reached: whether break-even was detected.
        step: step of break-even (the firing rule's step), or None.
        detected_at: step of the record at which it was detected, or None.
        rule: name of the rule that detected it, or None.
        evidence: rule name -> evidence of every rule fired so far, including rules that
            fired after break-even.
    """

    reached: bool
    step: int | None
    detected_at: int | None
    rule: str | None
    evidence: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_event(self) -> dict[str, Any]:
        """Returns the ``break_even`` event of ``events.jsonl`` (see docs/contracts.md)."""
        return {
            "event": "break_even",
            "step": self.step,
            "detected_at": self.detected_at,
            "rule": self.rule,
            "evidence": {name: dict(values) for name, values in self.evidence.items()},
        }


# --------------------------------------------------------------------------- detector


def _new_run() -> dict[str, Any]:
    return {"run": 0, "start": None, "start_value": None}


def _new_peak() -> dict[str, Any]:
    return {
        "smoothed": None,  # EMA of the raw series
        "min": None,  # smallest smoothed value so far
        "peak": None,  # candidate peak: max of the smoothed series since the last reset
        "peak_step": None,
        "peak_raw": None,
        "min_before": None,  # smallest smoothed value up to the candidate peak
        "below": 0,  # consecutive records with smoothed <= (1 - peak_drop) * peak
        "raw_max": None,  # max raw value since the last reset
        "raw_max_step": None,
    }


class BreakEvenDetector:
    """Detects the break-even point in a stream of measurement records.

    Rules (each fires at most once; firings after break-even are still recorded):

    * ``"stability"``: a key of ``stability_keys`` is >= ``stability_threshold`` on
      ``confirm`` consecutive records that carry it; step = first of those records.
    * ``"eq1"``: ``eq1_lhs`` >= ``eq1_threshold`` likewise.
    * ``"peak"``: for each key of ``peak_keys`` (rule ``peak_<key>``) an exponential moving
      average ``s ← smoothing·s + (1 − smoothing)·x`` is tracked; a peak is confirmed when
      the smoothed value stays <= ``(1 − peak_drop)·max`` for ``patience`` consecutive
      records and ``max >= min_rise·(smallest smoothed value up to the peak)``, so the
      initial decay of a run is not a peak. Step = the peak's step (retrospective).

    Break-even is the first firing; when several rules fire at one record the one with
    the earliest step wins (ties: order of ``rules``, then of the keys).

    Records are flat mappings with a ``step``; keys a rule does not find are ignored;
    non-finite values are skipped (neither advancing nor breaking a run), counted per key
    and warned about once per key. A value whose quality flag (``quality_keys``, e.g.
    ``hessian_converged`` for ``stability_ratio``) is in the record and false is skipped the
    same way: a rule fires only on measurements accurate enough to support it.

    Example:
        >>> det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_K",), patience=2)
        >>> for step, value in enumerate([1.0, 1.0, 4.0, 8.0, 2.0, 1.0, 1.0]):
        ...     fired = det.update({"step": step, "lambda1_K": value})
        >>> det.result.rule, det.result.step, det.result.detected_at
        ('peak_lambda1_K', 3, 5)
    """

    def __init__(
        self,
        *,
        rules: Iterable[str] | str = RULES,
        stability_keys: Iterable[str] | str = ("stability_ratio", "stability_ratio_update"),
        stability_threshold: float = 1.0,
        eq1_threshold: float = 1.0,
        confirm: int = 1,
        peak_keys: Iterable[str] | str = ("lambda1_H", "lambda1_K"),
        peak_drop: float = 0.2,
        patience: int = 3,
        smoothing: float = 0.5,
        min_rise: float = 2.0,
        quality_keys: Mapping[str, str] | None = None,
    ) -> None:
        """Validates the configuration.

        Args:
            rules: enabled rule families, a subset of :data:`RULES`.
            stability_keys: record keys of stability ratios (1 = edge of stability).
            stability_threshold: level (> 0) a stability ratio must reach.
            eq1_threshold: level (> 0) ``eq1_lhs`` must reach.
            confirm: consecutive records (>= 1) needed by the threshold rules.
            peak_keys: record keys whose peaks are detected.
            peak_drop: relative drop in (0, 1) below the smoothed maximum.
            patience: consecutive records (>= 1) the drop must last.
            smoothing: EMA weight in [0, 1) on the old value (0 = raw series).
            min_rise: factor (>= 1) the peak must rise above the earlier minimum.
            quality_keys: record key -> key of the flag certifying it (default
                :data:`DEFAULT_QUALITY_KEYS`: Lanczos convergence for λ1^H and the ratios
                built on it); ``{}`` uses every value.

        Raises:
            ValueError: an invalid value or an unknown rule, naming the parameter.
        """
        self._rules = _keys("rules", rules)
        for rule in self._rules:
            if rule not in RULES:
                raise ValueError(f"rules: unknown rule {rule!r}; known rules are {RULES}")
        self._stability_keys = _keys("stability_keys", stability_keys)
        self._peak_keys = _keys("peak_keys", peak_keys)
        self._stability_threshold = V.real("stability_threshold", stability_threshold)
        self._eq1_threshold = V.real("eq1_threshold", eq1_threshold)
        if self._stability_threshold <= 0.0:
            raise ValueError(f"stability_threshold must be > 0, got {stability_threshold!r}")
        if self._eq1_threshold <= 0.0:
            raise ValueError(f"eq1_threshold must be > 0, got {eq1_threshold!r}")
        self._confirm = V.integer("confirm", confirm, 1)
        self._patience = V.integer("patience", patience, 1)
        self._peak_drop = V.real("peak_drop", peak_drop)
        if not 0.0 < self._peak_drop < 1.0:
            raise ValueError(f"peak_drop must be in (0, 1), got {peak_drop!r}")
        self._smoothing = V.real("smoothing", smoothing)
        if not 0.0 <= self._smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing!r}")
        self._min_rise = V.real("min_rise", min_rise)
        if self._min_rise < 1.0:
            raise ValueError(f"min_rise must be >= 1, got {min_rise!r}")
        quality = DEFAULT_QUALITY_KEYS if quality_keys is None else quality_keys
        if not isinstance(quality, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in quality.items()):
            raise ValueError(f"quality_keys must map record keys to flag keys, got {quality_keys!r}")
        self._quality_keys = dict(quality)

        used: list[str] = []
        if "stability" in self._rules:
            used += self._stability_keys
        if "eq1" in self._rules:
            used.append(_EQ1_KEY)
        if "peak" in self._rules:
            used += self._peak_keys
        self._used_keys = tuple(dict.fromkeys(used))
        self._reset()

    def _reset(self) -> None:
        self._last_step: int | None = None
        self._nonfinite: dict[str, int] = {}
        self._runs: dict[str, dict[str, dict[str, Any]]] = {
            "stability": {key: _new_run() for key in self._stability_keys},
            "eq1": {_EQ1_KEY: _new_run()},
        }
        self._peaks: dict[str, dict[str, Any]] = {key: _new_peak() for key in self._peak_keys}
        self._firings: list[RuleFiring] = []

    # ------------------------------------------------------------------ public API

    @property
    def rule_names(self) -> tuple[str, ...]:
        """Names of the individual rules this detector can fire, in tie-break order."""
        names: list[str] = []
        for rule in self._rules:
            if rule == "peak":
                names += [f"peak_{key}" for key in self._peak_keys]
            else:
                names.append(rule)
        return tuple(names)

    @property
    def firings(self) -> tuple[RuleFiring, ...]:
        """Every firing so far, in the order detected (the first one is break-even)."""
        return tuple(self._firings)

    @property
    def nonfinite_counts(self) -> dict[str, int]:
        """Number of non-finite values skipped, per record key."""
        return dict(self._nonfinite)

    @property
    def result(self) -> BreakEvenResult:
        """The break-even conclusion so far (a frozen snapshot)."""
        evidence = {f.rule: dict(f.evidence) for f in self._firings}
        if not self._firings:
            return BreakEvenResult(False, None, None, None, evidence)
        first = self._firings[0]
        return BreakEvenResult(True, first.step, first.detected_at, first.rule, evidence)

    def update(self, record: Mapping[str, Any]) -> list[RuleFiring]:
        """Feeds one measurement record.

        Args:
            record: flat mapping with ``step`` and any of the keys the rules read.

        Returns:
            The rules newly fired at this record, earliest step first.

        Raises:
            ValueError: ``step`` missing, not an integer, or smaller than the previous one.
            TypeError: a value the detector reads is not a real number.
        """
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        step = self._parse_step(record)
        finite: dict[str, float] = {}
        nonfinite: list[tuple[str, float]] = []
        for key in self._used_keys:
            if key not in record or not self._certified(record, key):
                continue
            value = record[key]
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(
                    f"record[{key!r}] must be a real number (use .item() on tensors), got {value!r}"
                )
            x = float(value)
            if math.isfinite(x):
                finite[key] = x
            else:
                nonfinite.append((key, x))

        # The record is valid: from here on state changes.
        self._last_step = step
        for key, x in nonfinite:
            count = self._nonfinite.get(key, 0)
            if count == 0:
                warnings.warn(
                    f"BreakEvenDetector: non-finite {key}={x} at step {step} skipped; "
                    "later ones for this key are only counted (nonfinite_counts)",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self._nonfinite[key] = count + 1

        fired_names = {f.rule for f in self._firings}
        new: list[RuleFiring] = []
        for rule in self._rules:
            if rule == "stability" and rule not in fired_names:
                firing = self._update_runs("stability", self._stability_threshold, step, finite)
                if firing is not None:
                    new.append(firing)
            elif rule == "eq1" and rule not in fired_names:
                firing = self._update_runs("eq1", self._eq1_threshold, step, finite)
                if firing is not None:
                    new.append(firing)
            elif rule == "peak":
                for key in self._peak_keys:
                    if f"peak_{key}" not in fired_names and key in finite:
                        firing = self._update_peak(key, step, finite[key])
                        if firing is not None:
                            new.append(firing)
        new.sort(key=lambda f: f.step)  # stable: ties keep the rule order
        self._firings += new
        return new

    # ------------------------------------------------------------------ rules

    def _certified(self, record: Mapping[str, Any], key: str) -> bool:
        """False when the record flags ``key``'s measurement as not certified."""
        return all(_flag_true(record, flag)
                   for flag in (self._quality_keys.get(key), *_ALSO_CERTIFIED_BY.get(key, ())))

    def _parse_step(self, record: Mapping[str, Any]) -> int:
        if "step" not in record:
            raise ValueError("record has no 'step'")
        raw = record["step"]
        if isinstance(raw, bool) or not isinstance(raw, numbers.Real):
            raise ValueError(f"record['step'] must be an integer, got {raw!r}")
        if isinstance(raw, numbers.Integral):
            step = int(raw)
        else:
            value = float(raw)
            if not (math.isfinite(value) and value.is_integer()):
                raise ValueError(f"record['step'] must be an integer, got {raw!r}")
            step = int(value)
        if self._last_step is not None and step < self._last_step:
            raise ValueError(f"out-of-order record: step {step} after step {self._last_step}")
        return step

    def _update_runs(
        self, rule: str, threshold: float, step: int, finite: Mapping[str, float]
    ) -> RuleFiring | None:
        """Advances the consecutive-exceedance runs of a threshold rule."""
        best: tuple[str, dict[str, Any]] | None = None
        for key, run in self._runs[rule].items():
            if key not in finite:
                continue
            value = finite[key]
            if value >= threshold:
                if run["run"] == 0:
                    run["start"], run["start_value"] = step, value
                run["run"] += 1
                if run["run"] >= self._confirm and (
                    best is None or run["start"] < best[1]["start"]
                ):
                    best = (key, run)
            else:
                run.update(_new_run())
        if best is None:
            return None
        key, run = best
        evidence = {
            "step": run["start"],
            "detected_at": step,
            key: run["start_value"],
            "threshold": threshold,
            "confirm": self._confirm,
        }
        return RuleFiring(rule, run["start"], step, evidence)

    def _update_peak(self, key: str, step: int, x: float) -> RuleFiring | None:
        """Advances the smoothed series of ``key`` and confirms its peak."""
        st = self._peaks[key]
        if st["smoothed"] is None:
            st.update(smoothed=x, min=x)
            self._restart_candidate(st, x, step, x)
            return None
        s = self._smoothing * st["smoothed"] + (1.0 - self._smoothing) * x
        st["smoothed"] = s
        new_min = s < st["min"]
        st["min"] = min(st["min"], s)
        if s > st["peak"]:
            st.update(peak=s, peak_step=step, peak_raw=x, min_before=st["min"], below=0)
        elif s <= (1.0 - self._peak_drop) * st["peak"]:
            st["below"] += 1
        else:
            st["below"] = 0
        if x > st["raw_max"]:
            st.update(raw_max=x, raw_max_step=step)

        rose = st["peak"] > 0.0 and st["peak"] >= self._min_rise * st["min_before"]
        if not rose:
            # Still decaying (or flat): a later peak is measured from this new low.
            if new_min:
                self._restart_candidate(st, s, step, x)
            return None
        if st["below"] < self._patience:
            return None
        evidence = {
            "step": st["peak_step"],
            "detected_at": step,
            "smoothed_peak": st["peak"],
            "raw_at_peak": st["peak_raw"],
            "raw_max": st["raw_max"],
            "raw_max_step": st["raw_max_step"],
            "min_before_peak": st["min_before"],
            "smoothed": s,
        }
        return RuleFiring(f"peak_{key}", st["peak_step"], step, evidence)

    @staticmethod
    def _restart_candidate(st: dict[str, Any], s: float, step: int, x: float) -> None:
        st.update(
            peak=s, peak_step=step, peak_raw=x, min_before=s, below=0, raw_max=x, raw_max_step=step
        )

    # ------------------------------------------------------------------ checkpointing

    def _config(self) -> dict[str, Any]:
        return {
            "rules": list(self._rules),
            "stability_keys": list(self._stability_keys),
            "stability_threshold": self._stability_threshold,
            "eq1_threshold": self._eq1_threshold,
            "confirm": self._confirm,
            "peak_keys": list(self._peak_keys),
            "peak_drop": self._peak_drop,
            "patience": self._patience,
            "smoothing": self._smoothing,
            "min_rise": self._min_rise,
            "quality_keys": dict(self._quality_keys),
        }

    def state_dict(self) -> dict[str, Any]:
        """Returns the detector's state as plain Python numbers, strings, lists and dicts.

        Readable by ``torch.load(weights_only=True)`` and by ``json``; holds the
        configuration, which :meth:`load_state_dict` checks.
        """
        return {
            "version": _STATE_VERSION,
            "config": self._config(),
            "last_step": self._last_step,
            "nonfinite": dict(self._nonfinite),
            "runs": {
                rule: {k: dict(v) for k, v in runs.items()} for rule, runs in self._runs.items()
            },
            "peaks": {key: dict(st) for key, st in self._peaks.items()},
            "firings": [
                {
                    "rule": f.rule,
                    "step": f.step,
                    "detected_at": f.detected_at,
                    "evidence": dict(f.evidence),
                }
                for f in self._firings
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restores a state from :meth:`state_dict` of an identically configured detector.

        Raises:
            ValueError: the state is malformed, of another version, or was saved by a
                detector with a different configuration. The detector is unchanged then.
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"state version {state.get('version')!r} is not {_STATE_VERSION}")
        config = self._config()
        saved = state.get("config")
        if not isinstance(saved, Mapping):
            raise ValueError("state has no 'config'")
        differing = sorted(
            k for k in config
            if _plain(saved.get(k, config[k] if k in _LATER_CONFIG_KEYS else None)) != config[k])
        if differing:
            raise ValueError(f"state was saved with a different configuration: {differing}")
        try:
            last_step = state["last_step"]
            nonfinite = {str(k): int(v) for k, v in state["nonfinite"].items()}
            runs = {
                rule: {key: dict(state["runs"][rule][key]) for key in self._runs[rule]}
                for rule in self._runs
            }
            peaks = {key: dict(state["peaks"][key]) for key in self._peaks}
            firings = [
                RuleFiring(
                    str(f["rule"]), int(f["step"]), int(f["detected_at"]), dict(f["evidence"])
                )
                for f in state["firings"]
            ]
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"malformed detector state: {err!r}") from err
        states = [(k, st, _new_run()) for group in runs.values() for k, st in group.items()]
        states += [(k, st, _new_peak()) for k, st in peaks.items()]
        for key, st, template in states:
            if set(st) != set(template):
                raise ValueError(f"malformed detector state for key {key!r}")
        self._last_step = None if last_step is None else int(last_step)
        self._nonfinite = nonfinite
        self._runs = runs
        self._peaks = peaks
        self._firings = firings


def _flag_true(record: Mapping[str, Any], flag: str | None) -> bool:
    """False only when the record holds ``flag`` and it is false (< 0.5)."""
    if flag is None or flag not in record:
        return True
    value = record[flag]
    if isinstance(value, bool):
        return value
    return isinstance(value, numbers.Real) and float(value) >= 0.5


def _plain(value: Any) -> Any:
    """Tuples to lists, so configs survive JSON and torch round trips."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
