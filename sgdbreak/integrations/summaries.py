"""Summaries of measurement records: the peaks the paper compares, smoothed and robust.

Pure functions of records (plain dicts): :func:`summarize` reduces a run to the maxima of
λ1^H, λ1^K, Tr K/λ1^K and Tr K (raw, moving-average smoothed and 90 % quantile), the
break-even event and the accuracy, for Conjectures 1 and 2 (Jastrzebski et al. 2020).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "BOOKKEEPING_KEYS",
    "DERIVED_KEYS",
    "EXTRA_SUMMARY_KEYS",
    "SUMMARY_KEYS",
    "moving_average",
    "peak_passed",
    "series_values",
    "stable_rank_series",
    "summarize",
]

#: Quantities whose peaks the paper compares across learning rates and batch sizes.
SUMMARY_KEYS = ("lambda1_H", "lambda1_K", "stable_rank_K", "trace_K")

#: More quantities whose peaks are summarised when a run logged them (R4, R5).
EXTRA_SUMMARY_KEYS = ("top5_ratio_H", "trace_ratio_H", "g_top5_ratio", "bn_gamma_norm")

#: Series computed from two logged keys: name -> (numerator, denominator).
DERIVED_KEYS = {
    "stable_rank_K": ("trace_K", "lambda1_K"),  # Tr K / λ1^K, when not logged itself
    "top5_ratio_H": ("top5_sum_H", "lambda1_H"),  # the paper's Tr H / λ1^H (top-5 sum proxy)
    "trace_ratio_H": ("trace_H", "lambda1_H"),  # Tr H / λ1^H with Hutchinson's Tr H
}

#: A smoothed series has passed its peak once it has fallen this fraction below it.
PEAK_DROP = 0.1

#: Keys that a record may hold without being a measurement (e.g. an accuracy-only record).
BOOKKEEPING_KEYS = frozenset(
    {
        "step",
        "epoch",
        "lr",
        "momentum",
        "train_accuracy",
        "test_accuracy",
        "train_loss",
        "test_loss",
    }
)


def _to_jsonable(value: Any) -> Any:
    """Convert a value to plain JSON types; non-finite floats become ``None``.

    Handles numpy and torch scalars/arrays without importing torch.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    item = getattr(value, "item", None)
    if callable(item):
        try:
            return _to_jsonable(item())
        except (ValueError, RuntimeError):  # arrays/tensors with several elements
            pass
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return _to_jsonable(tolist())
    return str(value)


def _number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` if it is missing or not finite."""
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None

def _check_step(step: Any, name: str = "step") -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name} must be a non-negative integer step, got {step!r}")


def _check_window(window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")


def moving_average(values: Sequence[float] | np.ndarray, window: int = 5) -> np.ndarray:
    """Centered moving average; near the ends it averages over the points available.

    Centered (not trailing) so that smoothed peaks stay at the step where they happen.

    Args:
        values: The series.
        window: Number of points averaged (1 returns the series unchanged).
    """
    _check_window(window)
    x = np.asarray(values, dtype=float)
    n = x.size
    if n == 0 or window == 1:
        return x.copy()
    left = (window - 1) // 2
    right = window - 1 - left
    idx = np.arange(n)
    lo = np.clip(idx - left, 0, n)
    hi = np.clip(idx + right + 1, 0, n)
    csum = np.concatenate([[0.0], np.cumsum(x)])
    return (csum[hi] - csum[lo]) / (hi - lo)


def stable_rank_series(records: Iterable[Mapping[str, Any]]) -> list[float | None]:
    """``Tr K / λ1^K`` per record: ``stable_rank_K`` if logged, else ``trace_K / lambda1_K``."""
    out: list[float | None] = []
    for rec in records:
        value = _number(rec.get("stable_rank_K"))
        if value is None:
            trace, lam = _number(rec.get("trace_K")), _number(rec.get("lambda1_K"))
            if trace is not None and lam is not None and lam > 0:
                value = trace / lam
        out.append(value)
    return out


def series_values(records: Iterable[Mapping[str, Any]], key: str) -> list[float | None]:
    """``key`` per record (``None`` where missing or not finite); derived keys of
    :data:`DERIVED_KEYS` are computed where the record does not log them (positive
    denominator only)."""
    if key == "stable_rank_K":
        return stable_rank_series(records)
    out: list[float | None] = []
    for rec in records:
        value = _number(rec.get(key))
        if value is None and key in DERIVED_KEYS:
            top, bottom = (_number(rec.get(k)) for k in DERIVED_KEYS[key])
            if top is not None and bottom is not None and bottom > 0:
                value = top / bottom
        out.append(value)
    return out


def peak_passed(values: Sequence[float], window: int = 5, *, drop: float = PEAK_DROP) -> bool:
    """Whether a series has risen to a (smoothed) peak and fallen ``drop`` below it since.

    The peak is the maximum of the moving average over complete windows, as in
    :func:`summarize`; the series has passed it when a later point of the moving average
    (partial windows at the end included) is at most ``(1 − drop)`` times the peak, and
    the moving average started at most that low too. A run cut while its quantity still
    rises has not: its maximum is only a lower bound of the peak it would have reached,
    and comparing it would be unfair (Conjectures 1 and 2 are about the peaks). Nor has a
    series whose maximum is its starting level (flat, or falling from initialisation):
    it has not reached a peak along the trajectory yet.

    Args:
        values: the series in time order (finite numbers).
        window: moving-average window.
        drop: fraction in (0, 1).
    """
    _check_window(window)
    if not 0 < drop < 1:
        raise ValueError(f"drop must be in (0, 1), got {drop!r}")
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return False
    smooth = moving_average(x, window)
    lo, hi = 0, x.size
    if x.size >= window:
        lo, hi = (window - 1) // 2, x.size - (window - 1 - (window - 1) // 2)
    best = lo + int(np.argmax(smooth[lo:hi]))
    peak = smooth[best]
    after = smooth[best + 1:]
    if after.size == 0:
        return False
    threshold = peak * (1 - drop) if peak > 0 else peak * (1 + drop)
    return bool(after.min() <= threshold and smooth[lo] <= threshold)


def _value_at_step(records: Sequence[Mapping[str, Any]], key: str, step: float | None) -> float | None:
    """``key`` at ``step``, linearly interpolated between the records that log it."""
    if step is None:
        return None
    pts = [(s, v) for s, v in ((_number(r.get("step")), _number(r.get(key))) for r in records)
           if s is not None and v is not None]
    if not pts:
        return None
    xs, ys = zip(*pts, strict=True)
    if step < xs[0] or step > xs[-1]:
        return None
    return float(np.interp(step, xs, ys))


def summarize(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    window: int = 5,
    quantile: float = 0.9,
) -> dict:
    """Reduce a run to the peaks compared by the paper's Conjectures 1 and 2.

    For each of :data:`SUMMARY_KEYS` (``stable_rank_K`` is ``Tr K / λ1^K``), and of
    :data:`EXTRA_SUMMARY_KEYS` that the run logged, it reports the
    raw maximum ``max_<key>``, the maximum of the moving-average-smoothed series
    ``max_<key>_smoothed`` (and its step ``step_of_max_<key>_smoothed``) and the quantile
    ``q90_<key>``: one-sample spikes spoil the raw maximum, the other two are robust;
    ``peak_passed_<key>`` says whether the series has fallen back from that smoothed
    maximum (:func:`peak_passed`; if not, the run may have been cut before its peak). The
    smoothed maximum is taken over complete windows only (over all points when the
    series is shorter than the window): a partial window at either end would average
    fewer points and let a spike through. Missing or non-finite values are skipped. Also
    the first break-even event (``break_even_step``, ``break_even_rule``,
    ``break_even_detected_at``, ``break_even_evidence``; ``None`` without one), the last
    logged ``train_accuracy`` and the train accuracy at the smoothed peaks of λ1^H and λ1^K
    (``train_accuracy_at_max_lambda1_H``, interpolated between accuracy records; the paper
    finds the peaks near 60 % on CIFAR-10), ``stable_rank_K_at_max_lambda1_K`` (Tr K/λ1^K
    there, interpolated), ``noise_num_samples`` (L, which caps
    Tr K/λ1^K at L − 1), the number of records and of measurements (records with a
    key outside :data:`BOOKKEEPING_KEYS`, so accuracy-only records do not count) and
    counts of events by type.

    Args:
        records: Measurement records in time order.
        events: Events (see ``docs/contracts.md``).
        window: Moving-average window (points), as in the paper's smoothed curves.
        quantile: Quantile in (0, 1] reported as ``q<100*quantile>_<key>``.
    """
    _check_window(window)
    if not 0 < quantile <= 1:
        raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
    qname = f"q{quantile * 100:g}"
    out: dict[str, Any] = {
        "num_records": len(records),
        "num_measurements": sum(any(k not in BOOKKEEPING_KEYS for k in r) for r in records),
    }
    steps = [_number(r.get("step")) for r in records]
    known_steps = [s for s in steps if s is not None]
    out["first_step"] = int(known_steps[0]) if known_steps else None
    out["last_step"] = int(known_steps[-1]) if known_steps else None
    extra = [k for k in EXTRA_SUMMARY_KEYS if any(v is not None for v in series_values(records, k))]
    for key in (*SUMMARY_KEYS, *extra):
        column = series_values(records, key)
        pairs = [(s, v) for s, v in zip(steps, column, strict=True) if v is not None]
        values = np.array([v for _, v in pairs], dtype=float)
        if values.size == 0:
            for name in (f"max_{key}", f"max_{key}_smoothed", f"step_of_max_{key}_smoothed"):
                out[name] = None
            out[f"{qname}_{key}"] = None
            out[f"peak_passed_{key}"] = None
            continue
        smooth = moving_average(values, window)
        # Peaks are taken where the window is complete: at the ends a partial window
        # would average fewer points and let a single spike back in.
        lo, hi = (0, values.size)
        if values.size >= window:
            lo, hi = (window - 1) // 2, values.size - (window - 1 - (window - 1) // 2)
        best = lo + int(np.argmax(smooth[lo:hi]))
        out[f"max_{key}"] = float(values.max())
        out[f"max_{key}_smoothed"] = float(smooth[best])
        step = pairs[best][0]
        out[f"step_of_max_{key}_smoothed"] = int(step) if step is not None else None
        out[f"{qname}_{key}"] = float(np.quantile(values, quantile))
        out[f"peak_passed_{key}"] = peak_passed(values.tolist(), window)
    accuracies = [a for a in (_number(r.get("train_accuracy")) for r in records) if a is not None]
    out["final_train_accuracy"] = accuracies[-1] if accuracies else None
    for key in ("lambda1_H", "lambda1_K"):
        out[f"train_accuracy_at_max_{key}"] = _value_at_step(
            records, "train_accuracy", out[f"step_of_max_{key}_smoothed"])
    # Conditioning where the noise peaks (the maximum of Tr K/λ1^K is often at initialisation).
    out["stable_rank_K_at_max_lambda1_K"] = _value_at_step(
        records, "stable_rank_K", out["step_of_max_lambda1_K_smoothed"])
    samples = [n for n in (_number(r.get("noise_num_samples")) for r in records) if n is not None]
    out["noise_num_samples"] = int(max(samples)) if samples else None
    first = next((e for e in events if e.get("event") == "break_even"), None)
    out["break_even_step"] = first.get("step") if first else None
    out["break_even_detected_at"] = first.get("detected_at") if first else None
    out["break_even_rule"] = first.get("rule") if first else None
    out["break_even_evidence"] = _to_jsonable(first.get("evidence")) if first else None
    out["event_counts"] = dict(Counter(str(e.get("event")) for e in events))
    out["smoothing_window"] = window
    out["quantile"] = quantile
    return out
