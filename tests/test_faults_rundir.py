"""Fault injection for run directories: kills mid-write, torn and truncated files, resumes.

A short synthetic stream of records and events (as a monitor and a recipe log them) is
written through :class:`RunLog`, the writer "crashes" somewhere, the run resumes from a
checkpoint at an earlier step, and the run directory must then equal the uninterrupted
run's exactly: no record or event duplicated, none lost.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgdbreak.integrations.rundir import RunLog, read_run

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


def stream(num_steps: int = STEPS):
    """``(kind, item)`` pairs of an uninterrupted run, in logged order.

    One measurement per step (step 3's is skipped: an event instead of a record), an
    accuracy record every 4 steps at the same step as a measurement, and break-even found
    at step 7 but detected at step 9 (its event comes after step 9's record).
    """
    for s in range(1, num_steps + 1):
        if s == 3:
            yield "event", {"event": "skipped", "step": 3, "reason": "non-finite loss"}
        else:
            yield "record", {"step": s, "lambda1_H": 1.0 + math.sin(s), "note": "x" * 40}
        if s == 9:
            evidence = {"stability": {"stability_ratio": 1.02}}
            yield "event", {"event": "break_even", "step": 7, "detected_at": 9,
                            "rule": "stability", "evidence": evidence}
        if s % 4 == 0:
            yield "record", {"step": s, "epoch": s / 4, "train_accuracy": s / 100}


def step_of(item: dict) -> int:
    """The step at which an item is logged (an event's detection step)."""
    return item.get("detected_at", item["step"])


def write(log: RunLog, items) -> None:
    for kind, item in items:
        (log.log_measurement if kind == "record" else log.log_event)(item)


def crash(log: RunLog) -> None:
    """Abandon a RunLog as a killed process would: files flushed, never closed."""
    for f in log._files.values():
        f.close()


def reference(tmp_path: Path, num_steps: int = STEPS):
    run_dir = tmp_path / "reference"
    with RunLog(run_dir, {"lr": 0.1}) as log:
        write(log, stream(num_steps))
    return read_run(run_dir)


def assert_same_run(run, ref) -> None:
    assert run.records == ref.records
    assert run.events == ref.events
    assert run.summary == ref.summary
    assert run.complete


def resume(run_dir: Path, j: int, *, explicit: bool = True, num_steps: int = STEPS) -> None:
    """Resume from a checkpoint at step ``j`` and log the rest of the stream."""
    kwargs = {"resume_step": j} if explicit else {}
    with RunLog(run_dir, {"lr": 0.1}, mode="a", **kwargs) as log:
        write(log, ((k, it) for k, it in stream(num_steps) if step_of(it) > j))


def step_boundaries() -> list[tuple[int, int]]:
    """(k, number of items logged through step k) for k = 0 .. STEPS."""
    items = list(stream())
    return [(k, sum(step_of(it) <= k for _, it in items)) for k in range(STEPS + 1)]


@pytest.mark.filterwarnings("ignore:.*already holds steps:RuntimeWarning")
@pytest.mark.parametrize("explicit", [True, False], ids=["resume_step", "idempotent"])
def test_crash_after_every_step_and_resume_from_every_earlier_step(tmp_path, explicit):
    ref = reference(tmp_path)
    for k, count in step_boundaries():
        for j in range(k + 1):
            run_dir = tmp_path / f"{explicit}_{k}_{j}"
            log = RunLog(run_dir, {"lr": 0.1})
            write(log, list(stream())[:count])
            crash(log)
            assert not read_run(run_dir).complete
            resume(run_dir, j, explicit=explicit)
            assert_same_run(read_run(run_dir), ref)


def intact_through(run_dir: Path) -> int:
    """The last step whose items all survived in the (damaged) run directory."""
    run = read_run(run_dir)
    records = [it for kind, it in stream() if kind == "record"]
    events = [it for kind, it in stream() if kind == "event"]
    present = [it for it in records[: len(run.records)]] + events[: len(run.events)]
    assert run.records == records[: len(run.records)] and run.events == events[: len(run.events)]
    last = 0
    for s in range(1, STEPS + 1):
        if all(it in present for _, it in stream() if step_of(it) == s):
            last = s
        else:
            break
    return last


@settings(max_examples=60)
@given(data=st.data())
def test_torn_or_truncated_files_then_resume_from_any_intact_step(tmp_path_factory, data):
    tmp_path = tmp_path_factory.mktemp("faults")
    ref = reference(tmp_path)
    items = list(stream())
    written = data.draw(st.integers(0, len(items)), label="items written before the crash")
    run_dir = tmp_path / "run"
    log = RunLog(run_dir, {"lr": 0.1})
    write(log, items[:written])
    crash(log)
    # The kill (or a lost page cache) cuts each file somewhere: mid-line or between lines.
    for name in ("measurements.jsonl", "events.jsonl"):
        path = run_dir / name
        size = path.stat().st_size
        cut = data.draw(st.integers(0, size), label=f"bytes of {name} kept")
        with open(path, "r+b") as f:
            f.truncate(cut)
    j = data.draw(st.integers(0, intact_through(run_dir)), label="checkpoint step")
    resume(run_dir, j)
    assert_same_run(read_run(run_dir), ref)


@pytest.mark.filterwarnings("ignore:.*already holds steps:RuntimeWarning")
def test_resume_twice_and_from_a_finished_run(tmp_path):
    ref = reference(tmp_path)
    run_dir = tmp_path / "run"
    log = RunLog(run_dir, {"lr": 0.1})
    write(log, [x for x in stream() if step_of(x[1]) <= 10])
    crash(log)
    log = RunLog(run_dir, {"lr": 0.1}, mode="a", resume_step=6)
    write(log, [x for x in stream() if 6 < step_of(x[1]) <= 8])
    crash(log)
    resume(run_dir, 5)
    assert_same_run(read_run(run_dir), ref)
    # resuming a closed run from an earlier checkpoint replays to the same run directory
    resume(run_dir, 4)
    assert_same_run(read_run(run_dir), ref)
    resume(run_dir, 4, explicit=False)
    assert_same_run(read_run(run_dir), ref)


CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_faults_rundir import stream, write
    from sgdbreak.integrations.rundir import RunLog
    log = RunLog(sys.argv[1], {"lr": 0.1})
    for i, item in enumerate(stream(10**9)):
        write(log, [item])
        if i == 200:
            print("ready", flush=True)
    """
)


def test_sigkill_while_logging_then_resume_gives_the_uninterrupted_run(tmp_path, sigkill_when_ready):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(run_dir), str(REPO / "tests")],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    sigkill_when_ready(proc)
    killed = read_run(run_dir)
    assert not killed.complete
    last = max(r["step"] for r in killed.records)
    end = last + 20
    ref = reference(tmp_path, end)
    assert killed.records == ref.records[: len(killed.records)]
    # a checkpoint a few steps back; the killed step may be torn, so stay before it
    j = last - 5
    resume(run_dir, j, num_steps=end)
    assert_same_run(read_run(run_dir), ref)
