"""Typed errors, so callers act on what went wrong instead of matching message text."""

from __future__ import annotations

__all__ = ["NonFiniteMeasurement"]


class NonFiniteMeasurement(ValueError):
    """A loss, gradient, product or sample was nan or inf: nothing was measured.

    The monitor catches it and records a ``skipped`` event (training is never affected);
    direct calls of the estimators see it raised. A subclass of ``ValueError`` so code
    written against earlier versions keeps working.
    """
