"""TensorBoard logger: records as scalars, the H and K spectra as histograms, events as text.

Writes through ``torch.utils.tensorboard.SummaryWriter``, which needs the ``tensorboard``
package (``pip install 'sgdbreak[tensorboard]'``); it is imported when a logger is built,
not when this module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .loggers import _Bookkeeping, _break_even_fields, _split_record, _summary_scalars
from .summaries import _number, _to_jsonable, summarize

__all__ = ["TensorBoardLogger"]

_EXTRA_HINT = "TensorBoardLogger needs the tensorboard package: pip install 'sgdbreak[tensorboard]'"


def _summary_writer() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``, or an ImportError naming the extra."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:  # torch raises this when tensorboard is missing
        raise ImportError(f"{_EXTRA_HINT} ({err})") from err
    return SummaryWriter


def _markdown(fields: Mapping[str, Any]) -> str:
    """A two-column Markdown table (TensorBoard's text plugin renders Markdown)."""
    rows = ["| key | value |", "|---|---|"]
    rows += [f"| {key} | {json.dumps(_to_jsonable(value))} |" for key, value in fields.items()]
    return "\n".join(rows)


class TensorBoardLogger(_Bookkeeping):
    """Logger that writes a monitor's records and events to TensorBoard event files.

    Every numeric entry of a record becomes a scalar under its glossary name at global
    step ``record["step"]`` (the optimizer step); with ``spectra=True`` the top-k
    eigenvalues ``eig_H_i``/``eig_K_i`` are logged as ``spectrum/H_i``/``spectrum/K_i``
    scalars plus one histogram per record (``spectrum/H``, ``spectrum/K``). The first
    break-even event writes a ``break_even`` scalar (value: the break-even step, at that
    step) and a ``break_even`` text with the rule and evidence; every other event (a
    skip, a warmup phase change) is a text under ``events/<name>``. ``close()`` writes
    the :func:`~sgdbreak.integrations.summaries.summarize` peaks as a ``summary`` text,
    then flushes, and closes the writer if this logger opened it.

    Implements :class:`sgdbreak.measurement.protocols.Logger`.

    Args:
        log_dir: directory of the event files (ignored when ``writer`` is given; default
            SummaryWriter's ``runs/<date>_<host>``).
        writer: an existing ``SummaryWriter`` (e.g. Lightning's ``logger.experiment``);
            flushed but not closed by ``close()``.
        config: run configuration, written once as a ``config`` text.
        spectra: log the eigenvalue spectra as histograms and ``spectrum/*`` scalars.
        prefix: prepended to every tag (e.g. ``"sgdbreak/"``).
        main_process: ``False`` makes every method a no-op (no files are written), for
            the non-main processes of a distributed run.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any = None,
        config: Mapping[str, Any] | None = None,
        spectra: bool = True,
        prefix: str = "",
        main_process: bool = True,
    ) -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        self.spectra = bool(spectra)
        self.prefix = prefix
        self.main_process = bool(main_process)
        self.writer: Any = None
        self._owns_writer = False
        self._closed = False
        self._init_bookkeeping()
        if not self.main_process:
            return
        if writer is None:
            self.writer = _summary_writer()(log_dir=None if log_dir is None else str(log_dir))
            self._owns_writer = True
        else:
            if not callable(getattr(writer, "add_scalar", None)):
                raise TypeError(f"writer must be a SummaryWriter (with add_scalar), got {type(writer).__name__}")
            self.writer = writer
        if config:
            self.log_config(config)

    @property
    def log_dir(self) -> str | None:
        """The directory the event files go to (None on a non-main process)."""
        return None if self.writer is None else self.writer.get_logdir()

    def _active(self) -> bool:
        return self.writer is not None and not self._closed

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Write ``config`` as a ``config`` text (a Markdown table)."""
        if self._active():
            self.writer.add_text(f"{self.prefix}config", _markdown(dict(config)), 0)

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        """Write one record's scalars (and spectra histograms) at step ``record["step"]``."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        if not self._active():
            return
        scalars, spectra = _split_record(record, self.spectra)
        step = _number(record.get("step"))
        step = int(step) if step is not None else None
        for key, value in scalars.items():
            if not isinstance(value, str):
                self.writer.add_scalar(f"{self.prefix}{key}", value, step)
        if self.spectra:
            import numpy as np

            for kind, values in spectra.items():
                self.writer.add_histogram(f"{self.prefix}spectrum/{kind}", np.asarray(values), step)
        self._remember_record(record, step)

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Break-even: a ``break_even`` scalar and text; any other event: ``events/<name>`` text."""
        self._check_event(event)
        if not self._active():
            return
        first_break_even = self._remember_event(event)
        name = str(event["event"])
        step = _number(event.get("step"))
        step = int(step) if step is not None else None
        if name == "break_even":
            if not first_break_even:
                return
            self.writer.add_scalar(f"{self.prefix}break_even", step if step is not None else -1, step)
            self.writer.add_text(f"{self.prefix}break_even", _markdown(_break_even_fields(event)), step)
            return
        fields = {k: v for k, v in event.items() if k != "event"}
        self.writer.add_text(f"{self.prefix}events/{name}", _markdown(fields), step)

    def close(self) -> None:
        """Write the summary peaks, flush; close the writer if this logger opened it."""
        if not self._active():
            return
        self._closed = True
        if self._records:
            summary = _summary_scalars(summarize(self._records, self._events))
            self.writer.add_text(f"{self.prefix}summary", _markdown(summary), self._last_step or 0)
        self.writer.flush()
        if self._owns_writer:
            self.writer.close()

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
