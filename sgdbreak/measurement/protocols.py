"""What the monitor expects of the objects users plug into it, as ``typing.Protocol``s.

* :class:`Quantity`: what to measure (``name`` and ``compute(ctx)``).
* :class:`Trigger`: when to measure (``trigger(step) -> bool``).
* :class:`Logger`: where records and events go.

Optional methods each may add (``observe``, ``on_skip``, ``state_dict``, ``setup``,
``after_record``, ``log_config`` …) are listed in the docstrings of
:mod:`sgdbreak.measurement.quantities` and :mod:`sgdbreak.measurement.triggers`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .quantities import MeasurementContext

__all__ = ["Logger", "Quantity", "Trigger"]


@runtime_checkable
class Quantity(Protocol):
    """Anything the monitor can measure: a name and ``compute(ctx) -> {key: value}``."""

    name: str

    def compute(self, ctx: MeasurementContext) -> Mapping[str, float]: ...


@runtime_checkable
class Trigger(Protocol):
    """Decides after each optimizer step (``step`` steps completed) whether to measure."""

    def __call__(self, step: int) -> bool: ...


@runtime_checkable
class Logger(Protocol):
    """Receives every record and event of a monitor, and is closed at the end of the run."""

    def log_measurement(self, record: Mapping[str, Any]) -> None: ...

    def log_event(self, event: Mapping[str, Any]) -> None: ...

    def close(self) -> Any: ...
