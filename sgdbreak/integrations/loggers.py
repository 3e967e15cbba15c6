"""Experiment-tracker loggers: Weights & Biases directly or through Accelerate, and fan-out.

A logger is any object with ``log_measurement(record)``, ``log_event(event)`` and
``close()`` (:class:`sgdbreak.protocols.Logger`). ``wandb`` and ``accelerate`` are
imported lazily inside the functions that need them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from collections.abc import Mapping
from typing import Any

from .summaries import _number, _to_jsonable, summarize

__all__ = ["AccelerateLogger", "MultiLogger", "WandbLogger", "resolve_wandb_mode"]

#: Record keys that describe how the measurement was taken (copied into W&B config).
MEASUREMENT_SETTING_KEYS = ("noise_batch_size", "noise_num_samples")

_SPECTRUM_KEY = re.compile(r"^eig_(H|K)_(\d+)$")


def resolve_wandb_mode(mode: str | None = None) -> str:
    """Choose the W&B mode: explicit > ``WANDB_MODE`` > ``WANDB_DISABLED`` > key > offline.

    No credential file is parsed and wandb is not imported: a run is online only when told
    (``mode="online"``, ``WANDB_MODE=online``) or when ``WANDB_API_KEY`` is set; otherwise
    it is ``"offline"`` (upload later with ``wandb sync``), because ``wandb.init`` without
    credentials would fail or prompt in a batch job. ``WANDB_DISABLED=true`` gives
    ``"disabled"``. Use it for Accelerate too:
    ``init_kwargs={"wandb": {"mode": resolve_wandb_mode()}}``.
    """
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def _split_record(record: Mapping[str, Any], spectra: bool) -> tuple[dict, dict]:
    """Split a record into tracker scalars and spectra ``{"H": [...], "K": [...]}``.

    With ``spectra`` the ``eig_H_i``/``eig_K_i`` keys become ``spectrum/H_i`` (one W&B
    section); otherwise they keep their glossary names. ``step`` is left out (it is the
    x-axis); strings pass through, other non-numbers and non-finite values are dropped.
    """
    scalars: dict[str, Any] = {}
    found: dict[str, list[tuple[int, float]]] = {}
    for key, value in record.items():
        if key == "step":
            continue
        plain = _to_jsonable(value)  # numpy/torch scalars -> Python numbers
        if isinstance(plain, str):
            scalars[key] = plain
            continue
        if isinstance(plain, bool):
            plain = int(plain)
        if not isinstance(plain, (int, float)):
            continue  # None (non-finite), lists, nested mappings
        x = plain
        match = _SPECTRUM_KEY.match(key)
        if spectra and match:
            found.setdefault(match.group(1), []).append((int(match.group(2)), float(x)))
            scalars[f"spectrum/{match.group(1)}_{match.group(2)}"] = x
        else:
            scalars[key] = x
    spectra_lists = {kind: [v for _, v in sorted(items)] for kind, items in found.items()}
    return scalars, spectra_lists


def _break_even_fields(event: Mapping[str, Any]) -> dict:
    """Summary fields for a break-even event; evidence flattened to ``a/b/c`` keys."""
    fields = {
        "break_even_step": event.get("step"),
        "break_even_detected_at": event.get("detected_at"),
        "break_even_rule": event.get("rule"),
    }

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                flatten(f"{prefix}/{k}", v)
        else:
            fields[prefix] = _to_jsonable(value)

    flatten("break_even_evidence", event.get("evidence") or {})
    return {k: v for k, v in fields.items() if v is not None}


def _summary_scalars(summary: Mapping[str, Any]) -> dict:
    """The scalar entries of a :func:`summarize` result (for tracker summaries)."""
    skip = ("break_even_", "event_counts")
    return {
        k: v
        for k, v in summary.items()
        if v is not None and not k.startswith(skip) and isinstance(v, (int, float, str))
    }


def _histogram(wandb: Any, values: list[float]) -> Any:
    return wandb.Histogram(values, num_bins=min(64, max(8, len(values))))


class _Bookkeeping:
    """What both tracker loggers remember: records, events and the last logged step.

    W&B refuses steps older than the last one, so markers are logged at
    ``max(step, last step)``; the summary at close is computed from the remembered records.
    """

    def _init_bookkeeping(self) -> None:
        self._last_step: int | None = None
        self._records: list[dict] = []
        self._events: list[dict] = []

    def _remember_record(self, record: Mapping[str, Any], step: int | None) -> None:
        if step is not None:
            self._last_step = step if self._last_step is None else max(self._last_step, step)
        self._records.append(_to_jsonable(dict(record)))

    @staticmethod
    def _check_event(event: Any) -> None:
        if not isinstance(event, Mapping) or "event" not in event:
            raise ValueError(f"event must be a mapping with an 'event' key, got {event!r}")

    def _remember_event(self, event: Mapping[str, Any]) -> bool:
        """Store ``event``; True when it is the first break-even event."""
        self._events.append(_to_jsonable(dict(event)))
        return event["event"] == "break_even" and sum(e.get("event") == "break_even" for e in self._events) == 1

    def _marker_step(self, event: Mapping[str, Any]) -> tuple[int, int] | None:
        """(break-even step, step to log its marker at), or None without a step."""
        step = _number(event.get("step"))
        if step is None:
            return None
        step = int(step)
        at = step if self._last_step is None else max(step, self._last_step)
        self._last_step = at
        return step, at


class WandbLogger(_Bookkeeping):
    """Logger that sends measurements and events to Weights & Biases.

    Scalars are logged under their glossary names at W&B step = ``record["step"]`` (the
    optimizer step). The top-k spectra ``eig_H_i``/``eig_K_i`` are logged as
    ``spectrum/H_i``/``spectrum/K_i`` line series plus a ``wandb.Histogram``
    (``spectrum/H``, ``spectrum/K``); at ``close()`` one ``wandb.plot.line_series`` chart
    per spectrum (``spectrum/H_lines``) puts all k eigenvalues on one plot. A break-even
    event sets ``run.summary`` fields (``break_even_step``, ``break_even_detected_at``,
    ``break_even_rule``, ``break_even_evidence/<rule>/<key>``) and logs a ``break_even``
    marker whose value is the break-even step, at that step if W&B still accepts it,
    otherwise at the latest logged step (W&B steps only increase, and detection comes
    after the break-even step). ``close()`` also writes the :func:`summarize` peaks into
    the run summary, and finishes the run if this logger started it.

    The mode is chosen by :func:`resolve_wandb_mode`: an explicit ``mode=`` wins, then
    ``WANDB_MODE``; with neither and no ``WANDB_API_KEY`` the run is ``"offline"``, with
    a warning that says how to go online (``mode="online"`` uses what ``wandb login``
    saved).

    Args:
        project: W&B project (ignored when ``run`` is given).
        config: Run configuration, including measurement settings; merged into
            ``run.config``. ``noise_batch_size``/``noise_num_samples`` seen in records are
            added as ``measurement/...``.
        run: An existing run to log into (not finished by ``close()``).
        spectra: Log eigenvalue spectra as histograms and ``spectrum/*`` series.
        main_process: ``False`` makes every method a no-op (no ``wandb.init``).
        **init_kwargs: Passed to ``wandb.init`` (``mode``, ``dir``, ``name``, ...).
    """

    def __init__(
        self,
        project: str | None = None,
        *,
        config: Mapping[str, Any] | None = None,
        run: Any = None,
        spectra: bool = True,
        main_process: bool = True,
        **init_kwargs: Any,
    ) -> None:
        self.spectra = bool(spectra)
        self.main_process = bool(main_process)
        self.run: Any = None
        self.mode: str | None = None
        self._owns_run = False
        self._init_bookkeeping()
        self._spectrum_history: dict[str, list[tuple[int, list[float]]]] = {}
        self._settings_logged = False
        self._closed = False
        if not self.main_process:
            return
        import wandb

        self._wandb = wandb
        if run is None:
            explicit = init_kwargs.pop("mode", None)
            self.mode = resolve_wandb_mode(explicit)
            if self.mode == "offline" and not explicit and not os.environ.get("WANDB_MODE"):
                warnings.warn(
                    "sgdbreak: logging to W&B offline (no mode given and no WANDB_API_KEY); "
                    "pass mode='online' or set WANDB_MODE=online to use the key saved by "
                    "`wandb login`, or upload later with `wandb sync`.",
                    stacklevel=2,
                )
            self.run = wandb.init(
                project=project,
                config=_to_jsonable(dict(config or {})),
                mode=self.mode,  # type: ignore[arg-type]  # one of wandb's modes, or what the user asked for
                **init_kwargs,
            )
            self._owns_run = True
        else:
            self.run = run
            self.mode = getattr(getattr(run, "settings", None), "mode", None)
            if config:
                run.config.update(_to_jsonable(dict(config)), allow_val_change=True)
        for key in ("lambda1_H", "lambda1_K", "trace_K", "stable_rank_K", "stability_ratio"):
            self.run.define_metric(key, summary="max,last")

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Merge ``config`` into ``run.config``."""
        if self.run is not None:
            self.run.config.update(_to_jsonable(dict(config)), allow_val_change=True)

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        """Log one measurement record at W&B step ``record["step"]``."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        if self.run is None or self._closed:
            return
        scalars, spectra = _split_record(record, self.spectra)
        step = _number(record.get("step"))
        step = int(step) if step is not None else None
        for kind, values in spectra.items():
            scalars[f"spectrum/{kind}"] = _histogram(self._wandb, values)
            if step is not None:
                self._spectrum_history.setdefault(kind, []).append((step, values))
        if not self._settings_logged:
            settings = {
                f"measurement/{k}": _to_jsonable(record[k])
                for k in MEASUREMENT_SETTING_KEYS
                if k in record
            }
            if settings:
                self.run.config.update(settings, allow_val_change=True)
                self._settings_logged = True
        self.run.log(scalars, step=step)
        self._remember_record(record, step)

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Record an event: break-even in the run summary plus a marker, others counted."""
        self._check_event(event)
        if self.run is None or self._closed:
            return
        first_break_even = self._remember_event(event)
        kind = str(event["event"])
        self.run.summary[f"events/{kind}"] = Counter(str(e.get("event")) for e in self._events)[kind]
        if not first_break_even:
            return
        self.run.summary.update(_break_even_fields(event))
        marker = self._marker_step(event)
        if marker is not None:
            self.run.log({"break_even": marker[0]}, step=marker[1])

    def close(self) -> None:
        """Write the summary peaks and spectrum charts; finish the run if we started it."""
        if self.run is None or self._closed:
            return
        self._closed = True
        if self._records:
            summary = summarize(self._records, self._events)
            self.run.summary.update(_summary_scalars(summary))
        if self.spectra and self._last_step is not None:
            charts = {}
            for kind, history in self._spectrum_history.items():
                k = max(len(v) for _, v in history)
                xs = [s for s, _ in history]
                ys = [[v[i] if i < len(v) else float("nan") for _, v in history] for i in range(k)]
                charts[f"spectrum/{kind}_lines"] = self._wandb.plot.line_series(
                    xs=xs,
                    ys=ys,
                    keys=[f"{kind}_{i + 1}" for i in range(k)],
                    title=f"top-{k} eigenvalues of {kind}",
                    xname="step",
                )
            if charts:
                self.run.log(charts, step=self._last_step)
        if self._owns_run:
            self.run.finish()

    def __enter__(self) -> WandbLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AccelerateLogger(_Bookkeeping):
    """Logger that forwards to ``accelerator.log`` (every Accelerate tracker).

    Works with any tracker the accelerator was given (``log_with="wandb"``, TensorBoard,
    custom ``GeneralTracker``s), on the main process only. Values are the glossary scalars
    at ``step=record["step"]``; spectra go to ``spectrum/H_i`` (with ``spectra=True``) and,
    for a W&B tracker, also as a ``wandb.Histogram``. A break-even event logs a
    ``break_even`` scalar (value: the break-even step; at that step, or at the latest step
    if the tracker already went past it) and, for W&B trackers, the ``break_even_*``
    summary fields. ``close()`` adds the :func:`summarize` peaks to W&B summaries; it does
    not end the trackers (call ``accelerator.end_training()``).

    Args:
        accelerator: An ``accelerate.Accelerator`` whose trackers are initialised.
        spectra: Rename ``eig_*`` to ``spectrum/*`` and log W&B histograms.
    """

    def __init__(self, accelerator: Any, *, spectra: bool = True) -> None:
        self.accelerator = accelerator
        self.spectra = bool(spectra)
        self._init_bookkeeping()
        self._closed = False

    @property
    def _main(self) -> bool:
        return bool(getattr(self.accelerator, "is_main_process", True))

    def _wandb_runs(self) -> list[Any]:
        runs = []
        for tracker in getattr(self.accelerator, "trackers", []):
            if getattr(tracker, "name", None) == "wandb":
                run = getattr(tracker, "tracker", None)
                if run is not None:
                    runs.append(run)
        return runs

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Store ``config`` in every tracker (``store_init_configuration``)."""
        if not self._main:
            return
        for tracker in getattr(self.accelerator, "trackers", []):
            tracker.store_init_configuration(_to_jsonable(dict(config)))

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        """Forward one record to ``accelerator.log(values, step=record["step"])``."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        if not self._main or self._closed:
            return
        scalars, spectra = _split_record(record, self.spectra)
        step = _number(record.get("step"))
        step = int(step) if step is not None else None
        self.accelerator.log(scalars, step=step)
        runs = self._wandb_runs() if spectra else []
        if runs:
            import wandb

            hists = {f"spectrum/{k}": _histogram(wandb, v) for k, v in spectra.items()}
            for run in runs:
                run.log(hists, step=step)
        self._remember_record(record, step)

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Log a break-even marker and W&B summary fields; other events are counted."""
        self._check_event(event)
        if not self._main or self._closed:
            return
        if not self._remember_event(event):
            return
        marker = self._marker_step(event)
        if marker is not None:
            self.accelerator.log({"break_even": marker[0]}, step=marker[1])
        for run in self._wandb_runs():
            run.summary.update(_break_even_fields(event))

    def close(self) -> None:
        """Add the summary peaks to W&B tracker summaries (trackers stay open)."""
        if not self._main or self._closed:
            return
        self._closed = True
        if self._records:
            scalars = _summary_scalars(summarize(self._records, self._events))
            for run in self._wandb_runs():
                run.summary.update(scalars)


class MultiLogger:
    """Send every record and event to several loggers.

    Args:
        *loggers: Loggers, or iterables of loggers (``None`` entries are skipped).
    """

    def __init__(self, *loggers: Any) -> None:
        flat: list[Any] = []
        for item in loggers:
            if item is None:
                continue
            if isinstance(item, (list, tuple)):
                flat.extend(x for x in item if x is not None)
            else:
                flat.append(item)
        for logger in flat:
            missing = [
                m for m in ("log_measurement", "log_event", "close") if not hasattr(logger, m)
            ]
            if missing:
                raise TypeError(f"{logger!r} is not a logger: missing {', '.join(missing)}")
        self.loggers = flat

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Forward to the loggers that have ``log_config``."""
        for logger in self.loggers:
            if hasattr(logger, "log_config"):
                logger.log_config(config)

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        """Forward one record to every logger."""
        for logger in self.loggers:
            logger.log_measurement(record)

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Forward one event to every logger."""
        for logger in self.loggers:
            logger.log_event(event)

    def close(self) -> None:
        """Close every logger, even if one fails (the first error is re-raised)."""
        error: BaseException | None = None
        for logger in self.loggers:
            try:
                logger.close()
            except Exception as err:  # close the others first
                error = error or err
        if error is not None:
            raise error

    def __enter__(self) -> MultiLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
