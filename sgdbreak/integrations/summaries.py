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

__all__ = ["BOOKKEEPING_KEYS", "SUMMARY_KEYS", "moving_average", "stable_rank_series", "summarize"]

#: Quantities whose peaks the paper compares across learning rates and batch sizes.
SUMMARY_KEYS = ("lambda1_H", "lambda1_K", "stable_rank_K", "trace_K")

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


def summarize(
    records: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]] = (),
    *,
    window: int = 5,
    quantile: float = 0.9,
) -> dict:
    """Reduce a run to the peaks compared by the paper's Conjectures 1 and 2.

    For each of :data:`SUMMARY_KEYS` (``stable_rank_K`` is ``Tr K / λ1^K``) it reports the
    raw maximum ``max_<key>``, the maximum of the moving-average-smoothed series
    ``max_<key>_smoothed`` (and its step ``step_of_max_<key>_smoothed``) and the quantile
    ``q90_<key>``: one-sample spikes spoil the raw maximum, the other two are robust. The
    smoothed maximum is taken over complete windows only (over all points when the
    series is shorter than the window): a partial window at either end would average
    fewer points and let a spike through. Missing or non-finite values are skipped. Also
    the first break-even event (``break_even_step``, ``break_even_rule``,
    ``break_even_detected_at``, ``break_even_evidence``; ``None`` without one), the last
    logged ``train_accuracy``, the number of records and of measurements (records with a
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
    for key in SUMMARY_KEYS:
        if key == "stable_rank_K":
            column = stable_rank_series(records)
        else:
            column = [_number(r.get(key)) for r in records]
        pairs = [(s, v) for s, v in zip(steps, column, strict=True) if v is not None]
        values = np.array([v for _, v in pairs], dtype=float)
        if values.size == 0:
            for name in (f"max_{key}", f"max_{key}_smoothed", f"step_of_max_{key}_smoothed"):
                out[name] = None
            out[f"{qname}_{key}"] = None
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
    accuracies = [a for a in (_number(r.get("train_accuracy")) for r in records) if a is not None]
    out["final_train_accuracy"] = accuracies[-1] if accuracies else None
    first = next((e for e in events if e.get("event") == "break_even"), None)
    out["break_even_step"] = first.get("step") if first else None
    out["break_even_detected_at"] = first.get("detected_at") if first else None
    out["break_even_rule"] = first.get("rule") if first else None
    out["break_even_evidence"] = _to_jsonable(first.get("evidence")) if first else None
    out["event_counts"] = dict(Counter(str(e.get("event")) for e in events))
    out["smoothing_window"] = window
    out["quantile"] = quantile
    return out
