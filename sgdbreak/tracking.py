"""Run logs, summaries and experiment-tracker loggers for break-even measurements.

A *logger* is any object with ``log_measurement(record)``, ``log_event(event)`` and
``close()`` (see ``docs/contracts.md``). This module provides:

- :class:`RunLog`: a crash-safe run directory (``config.json``, ``measurements.jsonl``,
  ``events.jsonl``, ``summary.json``) that can be read while the run is going and
  resumed from a checkpoint without duplicated or lost records;
- :func:`read_run` and :func:`summarize`: read a run directory back and reduce it to the
  peaks the paper compares (Jastrzebski et al. 2020, Conjectures 1 and 2);
- :class:`WandbLogger` and :class:`AccelerateLogger`: the same records in Weights & Biases
  (directly, or through any Accelerate tracker);
- :class:`MultiLogger`: fan one stream out to several loggers.

``wandb`` and ``accelerate`` are imported lazily inside the functions that need them, so
``import sgdbreak.tracking`` costs only the standard library and numpy.

Example:
    >>> import tempfile
    >>> from sgdbreak.tracking import RunLog, read_run
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with RunLog(d, {"lr": 0.1}) as log:
    ...         log.log_measurement({"step": 10, "lambda1_H": 3.0})
    ...     run = read_run(d)
    >>> run.records[0]["lambda1_H"], run.summary["max_lambda1_H"]
    (3.0, 3.0)
"""

from __future__ import annotations

import json
import math
import netrc
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

__all__ = [
    "RUN_FILES",
    "SUMMARY_KEYS",
    "AccelerateLogger",
    "MultiLogger",
    "Run",
    "RunLog",
    "WandbLogger",
    "has_wandb_credentials",
    "is_run_dir",
    "moving_average",
    "read_run",
    "resolve_wandb_mode",
    "stable_rank_series",
    "summarize",
]

CONFIG_FILE = "config.json"
MEASUREMENTS_FILE = "measurements.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"

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

#: Record keys that describe how the measurement was taken (copied into W&B config).
MEASUREMENT_SETTING_KEYS = ("noise_batch_size", "noise_num_samples")

_SPECTRUM_KEY = re.compile(r"^eig_(H|K)_(\d+)$")
_DEFAULT_WANDB_HOST = "https://api.wandb.ai"


# --------------------------------------------------------------------------- JSON helpers


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


def _dumps(obj: Any) -> str:
    return json.dumps(_to_jsonable(obj), allow_nan=False)


def _replace_with(path: Path, write: Any, *, sync: bool = False) -> None:
    """Write ``path`` through ``write(file)`` on a temporary file and ``os.replace``.

    Readers and crashes see the old or the new file, never half of one; on failure the
    temporary file is removed and ``path`` is untouched.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    text = json.dumps(_to_jsonable(obj), indent=2, allow_nan=False) + "\n"
    _replace_with(path, lambda f: f.write(text))


def _parse_record(text: str | bytes) -> dict:
    """Parse one JSON-lines record; raises ``ValueError`` unless it is a JSON object."""
    obj = json.loads(text)
    if not isinstance(obj, dict):
        raise ValueError(f"not a JSON object (a {type(obj).__name__})")
    return obj


def _parse_jsonl(path: Path) -> list[dict]:
    """Parse a JSON-lines file of objects, dropping a torn last line (a crash mid-write).

    Raises:
        ValueError: naming the file and line, if a line other than an unterminated last
            one is not a JSON object.
    """
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append(_parse_record(line))
        except ValueError as err:
            if lineno == len(lines):  # last line without newline: torn write
                break
            reason = err.msg if isinstance(err, json.JSONDecodeError) else err
            raise ValueError(
                f"{path}:{lineno}: {reason}; every line must be one JSON record "
                "(fix or delete that line)"
            ) from None
    return out


def _read_json_object(path: Path) -> dict:
    """Read a JSON file holding one object; errors name the file."""
    try:
        obj = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a JSON object (a {type(obj).__name__})")
    return obj


def _write_jsonl_atomic(path: Path, items: Iterable[Any]) -> None:
    """Replace a JSON-lines file atomically (synced: it replaces records already written)."""
    lines = [json.dumps(item, allow_nan=False) + "\n" for item in items]
    _replace_with(path, lambda f: f.writelines(lines), sync=True)


def _repair_tail(path: Path) -> None:
    """Make a JSON-lines file end with a newline before appending to it.

    A complete last record without its newline gets one; a torn last record is cut off.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1
    try:
        _parse_record(data[cut:])
    except ValueError:
        with open(path, "r+b") as f:
            f.truncate(cut)
    else:
        with open(path, "ab") as f:
            f.write(b"\n")


def _number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or ``None`` if it is missing or not finite."""
    if value is None or isinstance(value, (str, bool)):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _logged_step(item: Mapping[str, Any]) -> float | None:
    """The step at which a record or event was logged: ``detected_at`` if any, else ``step``.

    A break-even event names an earlier step but is logged when detected, so resuming
    places it by its detection step.
    """
    detected = _number(item.get("detected_at"))
    return detected if detected is not None else _number(item.get("step"))


def _logged_after(item: Mapping[str, Any], step: float) -> bool:
    """Whether ``item`` was logged after ``step`` (items without a step never are)."""
    at = _logged_step(item)
    return at is not None and at > step


def _max_logged_step(items: Iterable[Mapping[str, Any]]) -> float | None:
    steps = [s for s in map(_logged_step, items) if s is not None]
    return max(steps) if steps else None


# --------------------------------------------------------------------------- run directory


@dataclass
class Run:
    """A run directory read back by :func:`read_run`.

    Attributes:
        run_dir: The directory.
        config: Contents of ``config.json`` (``{}`` if absent).
        records: Measurement records in logged order (non-finite values are ``None``).
        events: Events in logged order.
        summary: Contents of ``summary.json``, or ``None`` if the run was not closed (or
            the file is unreadable: :meth:`summarize` recomputes it from the records).
        complete: Whether the writer closed the run (``summary.json`` exists). ``False``
            for a run that was killed or is still going; by default ``summary is not None``.
    """

    run_dir: Path
    config: dict
    records: list[dict]
    events: list[dict]
    summary: dict | None
    complete: bool | None = None

    def __post_init__(self) -> None:
        if self.complete is None:
            self.complete = self.summary is not None

    @property
    def name(self) -> str:
        """The directory name, used as a default label."""
        return self.run_dir.name

    @property
    def break_even(self) -> dict | None:
        """The first ``break_even`` event, or ``None``."""
        return next((e for e in self.events if e.get("event") == "break_even"), None)

    def series(self, key: str, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
        """Return ``(x values, key values)`` over records where both are finite numbers.

        ``key="stable_rank_K"`` falls back to ``trace_K / lambda1_K`` for records without it.
        """
        xs, ys = [], []
        values = stable_rank_series(self.records) if key == "stable_rank_K" else None
        for i, rec in enumerate(self.records):
            xv = _number(rec.get(x))
            yv = values[i] if values is not None else _number(rec.get(key))
            if xv is not None and yv is not None:
                xs.append(xv)
                ys.append(yv)
        return np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)

    def summarize(self, **kwargs: Any) -> dict:
        """Recompute the summary from the records (see :func:`summarize`)."""
        return summarize(self.records, self.events, **kwargs)


#: Files that make a directory a run directory (``summary.json`` alone does not: the
#: recipe writes one next to its run directories).
RUN_FILES = (CONFIG_FILE, MEASUREMENTS_FILE, EVENTS_FILE)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory holding a run's config or record files."""
    path = Path(path)
    return path.is_dir() and any((path / f).exists() for f in RUN_FILES)


def _read_summary(path: Path) -> dict | None:
    """``summary.json``, or ``None`` when absent or unreadable (with a warning naming it)."""
    if not path.exists():
        return None
    try:
        return _read_json_object(path)
    except ValueError as err:
        warnings.warn(
            f"{err}; ignoring it (the summary is recomputed from the records)",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def read_run(run_dir: str | os.PathLike) -> Run:
    """Read a run directory written by :class:`RunLog`, also while it is being written.

    A torn last line (the writer was killed mid-record) is ignored. ``Run.complete`` tells
    whether the run was closed (``summary.json`` exists); an unreadable ``summary.json``
    gives a ``RuntimeWarning`` and ``summary=None``, since the records are what counts.

    Raises:
        FileNotFoundError: if ``run_dir`` does not exist or holds none of the run files.
        ValueError: naming the file, if ``config.json`` is not a JSON object or a
            JSON-lines file is corrupt somewhere other than its last line.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory not found: {path}")
    if not is_run_dir(path):
        raise FileNotFoundError(
            f"{path} is not a run directory (none of {', '.join(RUN_FILES)} found)"
        )
    config_path, summary_path = path / CONFIG_FILE, path / SUMMARY_FILE
    try:
        config = _read_json_object(config_path) if config_path.exists() else {}
    except ValueError as err:
        raise ValueError(f"{err}; fix or remove the file") from None
    return Run(
        run_dir=path,
        config=config,
        records=_parse_jsonl(path / MEASUREMENTS_FILE),
        events=_parse_jsonl(path / EVENTS_FILE),
        summary=_read_summary(summary_path),
        complete=summary_path.exists(),
    )


class RunLog:
    """Logger that writes a run directory, one flushed JSON line per record.

    Every record and event is written and flushed as it arrives (and ``os.fsync``-ed with
    ``fsync=True``), so a crash loses at most the record being written and other processes
    can read the run while it goes. Non-finite floats are written as ``null``.
    ``close()`` writes ``summary.json`` (:func:`summarize`), which also marks the run
    complete. On non-main processes (``main_process=False``) every method is a no-op and
    no file is created, so all ranks can call it unconditionally.

    Resuming (``mode="a"``) after a crash, from a checkpoint at step N: the run directory
    may already hold records of steps after N, which the resumed run logs again. With
    ``resume_step=N`` (or :meth:`truncate_after`) those are dropped first, so the
    directory ends up as if the run had never stopped. Without it, records and events
    at or before the last step already in the directory are not written again (with a
    warning): the first version is kept. Items without a step are always appended.

    Args:
        run_dir: Directory to create (parents included).
        config: The run's configuration, written to ``config.json``.
        main_process: Whether this process writes (pass ``accelerator.is_main_process``).
        mode: ``"w"`` starts a fresh run (existing run files are replaced); ``"a"`` resumes:
            it appends, keeps earlier records for the summary, merges ``config`` and
            removes ``summary.json`` until ``close()`` (the run is running again).
        resume_step: With ``mode="a"``, the step of the checkpoint resumed from: records
            and events logged after it (an event by its ``detected_at``) are removed from
            the files (rewritten atomically) before anything is appended.
        fsync: Also ``os.fsync`` after every line (survives power loss, costs a disk sync).
        smoothing_window: Moving-average window for the summary's smoothed peaks.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        config: Mapping[str, Any] | None = None,
        *,
        main_process: bool = True,
        mode: str = "w",
        resume_step: int | None = None,
        fsync: bool = False,
        smoothing_window: int = 5,
    ) -> None:
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' (new run) or 'a' (resume), got {mode!r}")
        if resume_step is not None:
            if mode != "a":
                raise ValueError("resume_step resumes a run: it needs mode='a'")
            _check_step(resume_step, "resume_step")
        if config is not None and not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping, got {type(config).__name__}")
        _check_window(smoothing_window)
        self.run_dir = Path(run_dir)
        self.main_process = bool(main_process)
        self.fsync = bool(fsync)
        self.smoothing_window = smoothing_window
        self.config: dict = dict(_to_jsonable(dict(config or {})))
        self.records: list[dict] = []
        self.events: list[dict] = []
        self.summary: dict | None = None
        self._files: dict[str, Any] = {}
        self._closed = False
        # Resumed runs: items logged at or before this step are already in the files.
        self._resumed_through: float | None = None
        self._warned_skip = False
        if not self.main_process:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if mode == "a":
            self._load_for_resume()
            if resume_step is not None:
                self.truncate_after(resume_step)
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        _write_json_atomic(self.run_dir / CONFIG_FILE, self.config)
        for name in (MEASUREMENTS_FILE, EVENTS_FILE):
            self._files[name] = open(self.run_dir / name, mode, encoding="utf-8")

    def _load_for_resume(self) -> None:
        """Read back what the run directory holds (torn tails cut) to continue it."""
        for name in (MEASUREMENTS_FILE, EVENTS_FILE):
            _repair_tail(self.run_dir / name)
        try:
            old = read_run(self.run_dir)
        except FileNotFoundError:  # nothing to resume: start fresh
            return
        self.records, self.events = old.records, old.events
        self.config = {**old.config, **self.config}
        self._resumed_through = _max_logged_step(self.records + self.events)

    def truncate_after(self, step: int) -> None:
        """Drop the records and events logged after ``step``, to resume from a checkpoint there.

        Records with ``step <= step`` and events with ``detected_at`` (else ``step``) ``<=
        step`` are kept, as are items without a step; each file is rewritten atomically
        (temporary file, ``os.replace``) and only if something is dropped. Afterwards
        items up to ``step`` are taken as already logged.
        """
        _check_step(step)
        if not self.main_process:
            return
        self._check_open()
        for name, items in ((MEASUREMENTS_FILE, self.records), (EVENTS_FILE, self.events)):
            keep = [x for x in items if not _logged_after(x, step)]
            if len(keep) < len(items):
                self._rewrite(name, keep)
            items[:] = keep
        self._resumed_through = step

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Merge ``config`` into the run's configuration and rewrite ``config.json``."""
        if not self.main_process or self._closed:
            return
        self.config.update(_to_jsonable(dict(config)))
        _write_json_atomic(self.run_dir / CONFIG_FILE, self.config)

    def log_measurement(self, record: Mapping[str, Any]) -> None:
        """Append one measurement record (a flat mapping of glossary names to numbers)."""
        if not isinstance(record, Mapping):
            raise TypeError(f"record must be a mapping, got {type(record).__name__}")
        if not self.main_process:
            return
        self._check_open()
        clean = _to_jsonable(dict(record))
        if self._already_logged(clean, "record"):
            return
        self._write(MEASUREMENTS_FILE, clean)
        self.records.append(clean)

    def log_event(self, event: Mapping[str, Any]) -> None:
        """Append one event, e.g. ``{"event": "break_even", "step": 120, ...}``."""
        if not isinstance(event, Mapping) or "event" not in event:
            raise ValueError(f"event must be a mapping with an 'event' key, got {event!r}")
        if not self.main_process:
            return
        self._check_open()
        clean = _to_jsonable(dict(event))
        if self._already_logged(clean, "event"):
            return
        self._write(EVENTS_FILE, clean)
        self.events.append(clean)

    def close(self) -> dict | None:
        """Write ``summary.json`` and close the files (idempotent). Returns the summary."""
        if not self.main_process or self._closed:
            return self.summary
        self._closed = True
        for f in self._files.values():
            f.close()
        self.summary = summarize(self.records, self.events, window=self.smoothing_window)
        _write_json_atomic(self.run_dir / SUMMARY_FILE, self.summary)
        return self.summary

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunLog for {self.run_dir} is closed")

    def _already_logged(self, item: Mapping[str, Any], kind: str) -> bool:
        """Whether a resumed run replays ``item``: its step is not after the files' last one."""
        step = _logged_step(item)
        if self._resumed_through is None or step is None or step > self._resumed_through:
            return False
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"sgdbreak: {self.run_dir} already holds steps up to "
                f"{self._resumed_through:g}: replayed records and events up to that step "
                f"(first: the {kind} at step {step:g}) are not logged again, the first "
                "version is kept. To replace them instead, resume with "
                "RunLog(..., mode='a', resume_step=<checkpoint step>)",
                RuntimeWarning,
                stacklevel=3,
            )
        return True

    def _rewrite(self, name: str, items: list[dict]) -> None:
        """Atomically replace file ``name`` with ``items``; reopen it if it was open."""
        path = self.run_dir / name
        _write_jsonl_atomic(path, items)
        old = self._files.pop(name, None)
        if old is not None:
            old.close()
            self._files[name] = open(path, "a", encoding="utf-8")

    def _write(self, name: str, obj: Any) -> None:
        f = self._files[name]
        # One write call per line: a reader or a crash sees whole lines only (or a torn tail).
        f.write(json.dumps(obj, allow_nan=False) + "\n")
        f.flush()
        if self.fsync:
            os.fsync(f.fileno())


# --------------------------------------------------------------------------- summaries


def _check_step(step: Any, name: str = "step") -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{name} must be a non-negative integer step, got {step!r}")


def _check_window(window: Any) -> None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, got {window!r}")


def moving_average(values: Sequence[float], window: int = 5) -> np.ndarray:
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


# --------------------------------------------------------------------------- W&B helpers


def _netrc_path() -> Path:
    if os.environ.get("NETRC"):
        return Path(os.environ["NETRC"]).expanduser()
    for name in ("~/.netrc", "~/_netrc"):
        path = Path(name).expanduser()
        if path.exists():
            return path
    return Path("~/.netrc").expanduser()


def has_wandb_credentials(base_url: str | None = None) -> bool:
    """Whether W&B credentials are configured, checked without importing wandb.

    Credentials are: a non-empty ``WANDB_API_KEY`` or ``WANDB_IDENTITY_TOKEN_FILE``, or a
    ``.netrc`` entry (``$NETRC``, ``~/.netrc`` or ``~/_netrc``, where ``wandb login`` saves
    the key) for the host of ``base_url`` (default ``$WANDB_BASE_URL`` or api.wandb.ai).
    An unreadable ``.netrc`` counts as no credentials.
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    url = base_url or os.environ.get("WANDB_BASE_URL") or _DEFAULT_WANDB_HOST
    host = urlsplit(url if "//" in url else f"//{url}").hostname or url
    path = _netrc_path()
    try:
        auth = netrc.netrc(os.fspath(path)).authenticators(host) if path.exists() else None
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(auth and auth[2])


def resolve_wandb_mode(mode: str | None = None) -> str:
    """Choose the W&B mode: explicit > ``WANDB_MODE`` > online with credentials > offline.

    ``WANDB_DISABLED=true`` gives ``"disabled"``. Without credentials (see
    :func:`has_wandb_credentials`) and with no mode set, ``wandb.init`` would fail or
    prompt; this returns ``"offline"`` instead (sync later with ``wandb sync``). Use it for
    Accelerate too: ``init_kwargs={"wandb": {"mode": resolve_wandb_mode()}}``.
    """
    if mode:
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    return "online" if has_wandb_credentials() else "offline"


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
    ``WANDB_MODE``; with neither and no credentials the run falls back to ``"offline"``
    with a warning instead of failing.

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
                    "sgdbreak: no W&B credentials found (WANDB_API_KEY or .netrc); "
                    "logging offline. Upload later with `wandb sync`.",
                    stacklevel=2,
                )
            self.run = wandb.init(
                project=project,
                config=_to_jsonable(dict(config or {})),
                mode=self.mode,
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
