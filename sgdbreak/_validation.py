"""Argument checks shared by every module: one message style, one rule for types.

A value of the wrong type raises ``TypeError``; a value of the right type outside its
range raises ``ValueError``. Both name the argument (with its owner where one is given,
e.g. ``"Sharpness: k"``) and the value received.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any, TypeVar

__all__ = ["choice", "integer", "optional_integer", "real"]

T = TypeVar("T")


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools refused), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(value)


def optional_integer(name: str, value: Any, minimum: int | None = None) -> int | None:
    """None, or :func:`integer`."""
    return None if value is None else integer(name, value, minimum)


def real(name: str, value: Any, *, positive: bool = False) -> float:
    """``value`` as a finite float (bools refused), > 0 when ``positive``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if positive and x <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return x


def choice(name: str, value: T, choices: Iterable[Any]) -> T:
    """``value`` if it is one of ``choices``."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")
    return value
