"""The run directory: a crash-safe record of one run, and reading it back.

:class:`RunLog` writes ``config.json``, ``measurements.jsonl``, ``events.jsonl`` (one
flushed JSON line per record or event) and ``summary.json`` at close; it is a logger
(``log_measurement``, ``log_event``, ``close``) and resumes from a checkpoint without
duplicated or lost records. :func:`read_run` reads a directory back, also while it is
written or after its writer was killed (see ``docs/contracts.md``).

Examples:
    >>> import tempfile
    >>> from sgdbreak import RunLog, read_run
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with RunLog(d, {"lr": 0.1}) as log:
    ...         log.log_measurement({"step": 10, "lambda1_H": 3.0})
    ...     run = read_run(d)
    >>> run.records[0]["lambda1_H"], run.summary["max_lambda1_H"]
    (3.0, 3.0)
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .summaries import (
    _check_step,
    _check_window,
    _number,
    _to_jsonable,
    stable_rank_series,
    summarize,
)

__all__ = ["RUN_FILES", "Run", "RunLog", "is_run_dir", "read_run"]

CONFIG_FILE = "config.json"
MEASUREMENTS_FILE = "measurements.jsonl"
EVENTS_FILE = "events.jsonl"
SUMMARY_FILE = "summary.json"


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
