"""Run directories, summaries, W&B and Accelerate loggers (sgdbreak.integrations)."""

from __future__ import annotations

import copy
import json
import math
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sgdbreak.integrations.loggers import (
    AccelerateLogger,
    MultiLogger,
    WandbLogger,
    resolve_wandb_mode,
)
from sgdbreak.integrations.rundir import RunLog, read_run
from sgdbreak.integrations.summaries import moving_average, summarize

REPO = Path(__file__).resolve().parents[1]

BREAK_EVEN = {
    "event": "break_even",
    "step": 20,
    "detected_at": 30,
    "rule": "stability",
    "evidence": {"stability": {"stability_ratio": 1.05, "lambda1_H": 21.0}},
}


def make_records(n: int = 6, k: int = 3) -> list[dict]:
    """Records like the monitor's: scalars plus top-k spectra, one every 10 steps."""
    records = []
    for i in range(n):
        rec = {
            "step": 10 * i,
            "lr": 0.1,
            "momentum": 0.9,
            "lambda1_H": 1.0 + i,
            "trace_H": 5.0 + i,
            "lambda1_K": 0.5 * (i + 1),
            "trace_K": 4.0 * (i + 1),
            "stable_rank_K": 8.0,
            "gns": 3.0,
            "noise_batch_size": 128,
            "noise_num_samples": 20,
            "loss": 2.0 - 0.1 * i,
        }
        for j in range(1, k + 1):
            rec[f"eig_H_{j}"] = (1.0 + i) / j
            rec[f"eig_K_{j}"] = 0.5 * (i + 1) / j
        records.append(rec)
    return records


# --------------------------------------------------------------------------- RunLog


def test_runlog_writes_readable_run_directory(tmp_path):
    run_dir = tmp_path / "nested" / "run"
    with RunLog(run_dir, {"lr": 0.1, "batch_size": 128, "dtype": torch.float32}) as log:
        log.log_measurement(
            {
                "step": 0,
                "lambda1_H": np.float64(2.5),
                "num_hvps": np.int64(6),
                "loss": torch.tensor(1.5),
            }
        )
        log.log_measurement({"step": 10, "lambda1_H": float("nan"), "trace_K": float("inf")})
        # readers see each record as soon as it is logged
        assert len(read_run(run_dir).records) == 2
        assert read_run(run_dir).summary is None
        log.log_event(BREAK_EVEN)
    run = read_run(run_dir)
    assert run.config == {"lr": 0.1, "batch_size": 128, "dtype": "torch.float32"}
    assert run.records[0] == {"step": 0, "lambda1_H": 2.5, "num_hvps": 6, "loss": 1.5}
    assert run.records[1] == {"step": 10, "lambda1_H": None, "trace_K": None}
    assert "NaN" not in (run_dir / "measurements.jsonl").read_text()
    assert run.events == [BREAK_EVEN]
    assert run.break_even == BREAK_EVEN
    assert run.summary["num_measurements"] == 2
    assert run.summary["max_lambda1_H"] == 2.5
    assert run.summary["break_even_step"] == 20
    with pytest.raises(RuntimeError, match="closed"):
        log.log_measurement({"step": 20})


def test_runlog_on_non_main_process_creates_nothing(tmp_path):
    run_dir = tmp_path / "run"
    log = RunLog(run_dir, {"lr": 0.1}, main_process=False)
    log.log_measurement({"step": 0, "lambda1_H": 1.0})
    log.log_event(BREAK_EVEN)
    assert log.close() is None
    assert not run_dir.exists()


def test_runlog_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        RunLog(tmp_path / "a", mode="r")
    with pytest.raises(ValueError, match="window"):
        RunLog(tmp_path / "b", smoothing_window=0)
    with RunLog(tmp_path / "c") as log:
        with pytest.raises(TypeError, match="mapping"):
            log.log_measurement([1, 2])
        with pytest.raises(ValueError, match="'event'"):
            log.log_event({"step": 3})


def test_read_run_tolerates_torn_last_line_but_not_corruption(tmp_path):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        for rec in make_records(3):
            log.log_measurement(rec)
    path = tmp_path / "measurements.jsonl"
    path.write_text(path.read_text() + '{"step": 30, "lambda1_')
    assert [r["step"] for r in read_run(tmp_path).records] == [0, 10, 20]
    lines = path.read_text().split("\n")
    lines[1] = lines[1][:20]
    path.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="measurements.jsonl:2"):
        read_run(tmp_path)


def test_read_run_errors_on_missing_or_empty_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_run(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_run(tmp_path)


def test_append_mode_resumes_after_torn_write(tmp_path):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        log.log_measurement({"step": 0, "lambda1_H": 1.0})
    path = tmp_path / "measurements.jsonl"
    path.write_text(path.read_text() + '{"step": 10, "lamb')
    with RunLog(tmp_path, {"seed": 3}, mode="a") as log:
        log.log_measurement({"step": 10, "lambda1_H": 4.0})
    run = read_run(tmp_path)
    assert [r["step"] for r in run.records] == [0, 10]
    assert run.config == {"lr": 0.1, "seed": 3}
    assert run.summary["num_measurements"] == 2
    assert run.summary["max_lambda1_H"] == 4.0
    # mode "w" starts over
    with RunLog(tmp_path, {"lr": 0.2}) as log:
        pass
    assert read_run(tmp_path).records == []


CHILD = textwrap.dedent(
    """
    import sys
    import sgdbreak.integrations.cli, sgdbreak.integrations.plots
    from sgdbreak.integrations.rundir import RunLog
    # integrations must load lazily
    eager = [m for m in ("wandb", "matplotlib", "accelerate") if m in sys.modules]
    log = RunLog(sys.argv[1], {"lr": 0.1})
    step = 0
    while True:
        log.log_measurement({"step": step, "lambda1_H": 1.0 + step, "note": "x" * 200})
        if step == 50:
            print("ready", *eager, flush=True)
        step += 1
    """
)


def test_run_log_survives_sigkill_and_integrations_load_lazily(tmp_path, sigkill_when_ready):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env
    )
    sigkill_when_ready(proc)
    run = read_run(tmp_path)
    assert run.config == {"lr": 0.1}
    assert run.summary is None
    steps = [r["step"] for r in run.records]
    assert len(steps) > 50
    assert steps == list(range(len(steps)))
    assert all(r["lambda1_H"] == 1.0 + r["step"] for r in run.records)


# --------------------------------------------------------------------------- summaries


def test_summarize_smoothed_peaks_resist_spikes():
    # a one-sample spike (10) and a sustained level (3): the smoothed peak is the level
    values = [1.0] * 5 + [10.0] + [1.0] * 5 + [3.0] * 6
    records = [
        {"step": 10 * i, "lambda1_H": v, "lambda1_K": v / 2, "trace_K": 4 * v}
        for i, v in enumerate(values)
    ]
    records[2]["train_accuracy"] = 0.30
    records.append({"step": 170, "epoch": 1.0, "train_accuracy": 0.62})  # not a measurement
    records[4]["lambda1_H"] = None  # non-finite values are stored as null and skipped
    s = summarize(records, [{"event": "skipped", "step": 5}, BREAK_EVEN], window=5)
    assert s["max_lambda1_H"] == 10.0
    assert s["max_lambda1_H_smoothed"] == pytest.approx(3.0)
    assert s["step_of_max_lambda1_H_smoothed"] == 130
    finite = [v for i, v in enumerate(values) if i != 4]
    assert s["q90_lambda1_H"] == pytest.approx(np.quantile(finite, 0.9))
    assert s["max_lambda1_K"] == 5.0
    assert s["max_lambda1_K_smoothed"] == pytest.approx(1.5)
    # stable rank falls back to Tr K / lambda1_K = 8 when not logged
    assert s["max_stable_rank_K"] == pytest.approx(8.0)
    assert s["max_trace_K_smoothed"] == pytest.approx(12.0)
    assert s["final_train_accuracy"] == 0.62
    assert s["num_measurements"] == 17
    assert s["num_records"] == 18
    assert (s["first_step"], s["last_step"]) == (0, 170)
    assert s["break_even_step"] == 20
    assert s["break_even_rule"] == "stability"
    assert s["break_even_detected_at"] == 30
    assert s["break_even_evidence"] == BREAK_EVEN["evidence"]
    assert s["event_counts"] == {"skipped": 1, "break_even": 1}
    json.dumps(s, allow_nan=False)
    # with a short series every point counts
    short = summarize([{"step": 0, "lambda1_H": 1.0}, {"step": 1, "lambda1_H": 5.0}], window=5)
    assert short["max_lambda1_H_smoothed"] == pytest.approx(3.0)


def test_summarize_without_data_gives_none():
    s = summarize([{"step": 0, "lambda1_H": None}], [])
    assert s["max_lambda1_H"] is None
    assert s["max_lambda1_K_smoothed"] is None
    assert s["break_even_step"] is None
    assert s["final_train_accuracy"] is None
    with pytest.raises(ValueError, match="quantile"):
        summarize([], quantile=0)


@given(
    st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=30),
    st.integers(1, 8),
)
def test_moving_average_matches_direct_definition(values, window):
    left = (window - 1) // 2
    right = window - 1 - left
    expected = [np.mean(values[max(0, i - left) : i + right + 1]) for i in range(len(values))]
    np.testing.assert_allclose(moving_average(values, window), expected, rtol=1e-9, atol=1e-6)


# --------------------------------------------------------------------------- W&B mode


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for var in (
        "WANDB_API_KEY",
        "WANDB_IDENTITY_TOKEN_FILE",
        "WANDB_MODE",
        "WANDB_DISABLED",
        "WANDB_BASE_URL",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    return tmp_path / "netrc"


def test_wandb_mode_resolution(no_credentials, monkeypatch):
    """Explicit > WANDB_MODE > WANDB_DISABLED > WANDB_API_KEY > offline; no file is parsed."""
    assert resolve_wandb_mode() == "offline"
    assert resolve_wandb_mode("disabled") == "disabled"
    no_credentials.write_text("machine api.wandb.ai login user password abc123\n")
    assert resolve_wandb_mode() == "offline"  # a saved key is used only when asked to
    assert resolve_wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_wandb_mode() == "offline"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.delenv("WANDB_API_KEY")
    assert resolve_wandb_mode() == "disabled"
    code = ("import sys; from sgdbreak.integrations.loggers import resolve_wandb_mode; "
            "resolve_wandb_mode(); assert 'wandb' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)  # resolving never imports wandb


# --------------------------------------------------------------------------- .wandb reader

_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


class _Truncated(Exception):
    """The file ends inside a record: wandb-core is still writing it."""


def read_wandb_file(path: Path) -> list:
    """Parse a ``run-*.wandb`` file into ``wandb_internal_pb2.Record`` messages.

    Format (LevelDB-log-like): a 7-byte header ``:W&B`` + magic 0xBEE1 + version 0, then
    32 KiB blocks of chunks with a 7-byte header (crc32 of type byte + data, length,
    type FULL/FIRST/MIDDLE/LAST); a block tail shorter than a header is padding.
    """
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pending, pos = [], None, 7
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:
            pos += left
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += left
            continue
        if pos + 7 + length > len(data):
            raise _Truncated(f"record at byte {pos} runs past the end of {path}")
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad crc at byte {pos}"
        pos += 7 + length
        if kind == _FULL:
            payload = chunk
        elif kind == _FIRST:
            pending = chunk
            continue
        elif kind == _MIDDLE:
            pending += chunk
            continue
        else:
            assert kind == _LAST, kind
            payload, pending = pending + chunk, None
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        records.append(record)
    return records


def _items(items) -> dict:
    """``{key: value}`` from protobuf items; nested keys joined with '.'."""
    return {(".".join(i.nested_key) or i.key): json.loads(i.value_json) for i in items}


def wandb_contents(root: Path) -> dict:
    """History rows by step, merged summary and merged config of the one offline run under root."""
    files = list(root.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    # run.finish() can return before wandb-core has flushed the file: wait for the
    # exit record (written when the run ends) and a complete last record.
    deadline = time.monotonic() + 30
    while True:
        try:
            records = read_wandb_file(files[0])
        except _Truncated:
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            break
        assert time.monotonic() < deadline, "the .wandb file never got its exit record"
        time.sleep(0.1)
    history, summary, config = {}, {}, {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = _items(record.history.item)
            history.setdefault(row["_step"], {}).update(row)
        elif kind == "summary":
            summary.update(_items(record.summary.update))
        elif kind == "config":
            config.update(_items(record.config.update))
        elif kind == "run":
            config.update(_items(record.run.config.update))
    config = {
        k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in config.items()
    }
    return {"history": history, "summary": summary, "config": config}


def _silence_wandb(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_CONSOLE", "off")


def test_wandb_offline_run_contains_measurements_spectra_and_break_even(tmp_path, monkeypatch):
    _silence_wandb(monkeypatch, tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    records = make_records(6, k=3)
    with WandbLogger(
        "sgdbreak-test", config={"lr": 0.1, "batch_size": 128}, dir=str(tmp_path)
    ) as logger:
        assert logger.mode == "offline"
        for rec in records[:3]:
            logger.log_measurement(rec)
        logger.log_event({"event": "skipped", "step": 25, "reason": "non-finite loss"})
        for rec in records[3:]:
            logger.log_measurement(rec)
        logger.log_event(BREAK_EVEN)  # break-even at step 20, detected after step 50
    out = wandb_contents(tmp_path)
    history, summary, config = out["history"], out["summary"], out["config"]
    assert sorted(history) == [0, 10, 20, 30, 40, 50]
    for rec in records:
        row = history[rec["step"]]
        for key in (
            "lambda1_H",
            "trace_H",
            "lambda1_K",
            "trace_K",
            "stable_rank_K",
            "gns",
            "lr",
            "loss",
        ):
            assert row[key] == pytest.approx(rec[key]), key
        for j in (1, 2, 3):
            assert row[f"spectrum/H_{j}"] == pytest.approx(rec[f"eig_H_{j}"])
            assert row[f"spectrum/K_{j}"] == pytest.approx(rec[f"eig_K_{j}"])
        for kind in ("H", "K"):
            assert row[f"spectrum/{kind}._type"] == "histogram"
            assert sum(row[f"spectrum/{kind}.values"]) == 3
    # the marker carries the break-even step; W&B cannot go back, so it sits at step 50
    assert history[50]["break_even"] == 20
    assert "spectrum/H_lines_table._type" in history[50]
    assert summary["break_even_step"] == 20
    assert summary["break_even_detected_at"] == 30
    assert summary["break_even_rule"] == "stability"
    assert summary["break_even_evidence/stability/stability_ratio"] == 1.05
    assert summary["events/skipped"] == 1
    assert summary["max_lambda1_H"] == 6.0
    assert summary["lambda1_H"] == {"max": 6.0, "last": 6.0}
    assert config["lr"] == 0.1
    assert config["batch_size"] == 128
    assert config["measurement/noise_batch_size"] == 128
    assert config["measurement/noise_num_samples"] == 20


def test_wandb_falls_back_to_offline_without_credentials(tmp_path, monkeypatch, no_credentials):
    _silence_wandb(monkeypatch, tmp_path)
    with pytest.warns(UserWarning, match="offline"):
        logger = WandbLogger("sgdbreak-test", spectra=False, dir=str(tmp_path))
    assert logger.mode == "offline"
    logger.log_measurement({"step": 3, "lambda1_H": 2.0, "eig_H_1": 2.0})
    logger.close()
    history = wandb_contents(tmp_path)["history"]
    assert history[3]["lambda1_H"] == 2.0
    assert history[3]["eig_H_1"] == 2.0  # spectra=False keeps glossary names
    assert not any(k.startswith("spectrum/") for k in history[3])


def test_wandb_logger_on_non_main_process_does_nothing(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setattr(wandb, "init", lambda **_: pytest.fail("wandb.init called"))
    logger = WandbLogger("p", main_process=False, dir=str(tmp_path))
    logger.log_measurement(make_records(1)[0])
    logger.log_event(BREAK_EVEN)
    logger.close()
    assert logger.run is None


# --------------------------------------------------------------------------- Accelerate


def _recording_tracker():
    from accelerate.tracking import GeneralTracker

    class RecordingTracker(GeneralTracker):
        name = "recording"
        requires_logging_directory = False

        def __init__(self):
            super().__init__()
            self.logged, self.config = [], {}

        @property
        def tracker(self):
            return self

        def store_init_configuration(self, values):
            self.config.update(values)

        def log(self, values, step=None, **kwargs):
            self.logged.append((step, dict(values)))

    return RecordingTracker()


def test_accelerate_logger_forwards_to_trackers(tmp_path, monkeypatch):
    from accelerate import Accelerator

    _silence_wandb(monkeypatch, tmp_path)
    recorder = _recording_tracker()
    accelerator = Accelerator(cpu=True, log_with=[recorder, "wandb"])
    accelerator.init_trackers(
        "sgdbreak-test",
        config={"lr": 0.1},
        init_kwargs={"wandb": {"mode": "offline", "dir": str(tmp_path)}},
    )
    logger = AccelerateLogger(accelerator)
    records = make_records(3, k=2)
    for rec in records:
        logger.log_measurement(rec)
    logger.log_event(BREAK_EVEN)
    logger.close()
    accelerator.end_training()

    assert recorder.config == {"lr": 0.1}
    steps = [s for s, _ in recorder.logged]
    assert steps == [0, 10, 20, 20]
    assert recorder.logged[1][1]["lambda1_H"] == 2.0
    assert recorder.logged[1][1]["spectrum/K_2"] == pytest.approx(0.5)
    assert all(isinstance(v, (int, float)) for _, row in recorder.logged for v in row.values())
    assert recorder.logged[-1][1] == {"break_even": 20}

    out = wandb_contents(tmp_path)
    assert out["history"][10]["lambda1_K"] == 1.0
    assert out["history"][10]["spectrum/H._type"] == "histogram"
    assert out["history"][20]["break_even"] == 20
    assert out["summary"]["break_even_rule"] == "stability"
    assert out["summary"]["max_lambda1_H"] == 3.0


class _NotMain:
    is_main_process = False
    trackers = ()

    def log(self, *args, **kwargs):
        pytest.fail("logged on a non-main process")


def test_accelerate_logger_is_silent_off_main_process():
    logger = AccelerateLogger(_NotMain())
    logger.log_measurement(make_records(1)[0])
    logger.log_event(BREAK_EVEN)
    logger.close()


# --------------------------------------------------------------------------- MultiLogger


class _ListLogger:
    def __init__(self, fail_close=False):
        self.records, self.events, self.closed, self.fail_close = [], [], False, fail_close

    def log_measurement(self, record):
        self.records.append(record)

    def log_event(self, event):
        self.events.append(event)

    def close(self):
        self.closed = True
        if self.fail_close:
            raise OSError("disk full")


def test_multilogger_forwards_and_closes_all(tmp_path):
    a, b = _ListLogger(fail_close=True), _ListLogger()
    run_log = RunLog(tmp_path)
    multi = MultiLogger([a, None], b, run_log)
    multi.log_measurement({"step": 1, "lambda1_H": 2.0})
    multi.log_event(BREAK_EVEN)
    with pytest.raises(OSError, match="disk full"):
        multi.close()
    assert a.closed and b.closed
    assert a.records == b.records == [{"step": 1, "lambda1_H": 2.0}]
    assert b.events == [BREAK_EVEN]
    assert read_run(tmp_path).summary["max_lambda1_H"] == 2.0
    with pytest.raises(TypeError, match="not a logger"):
        MultiLogger(object())


def test_non_finite_values_never_reach_json(tmp_path):
    with RunLog(tmp_path) as log:
        log.log_measurement({"step": 0, "x": [1.0, math.nan], "y": {"z": -math.inf}})
    assert read_run(tmp_path).records == [{"step": 0, "x": [1.0, None], "y": {"z": None}}]


# --------------------------------------------------------------------------- resuming and reading killed runs


def _train(opt, model, x, y, steps):
    for step in steps:
        idx = torch.arange(step % 3 * 16, step % 3 * 16 + 16)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def _optimizer(run_log, seed=0):
    from sgdbreak import BreakEvenDetector, BreakEvenSGD, Probe

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 1, 4, 4, generator=g), torch.randint(0, 3, (48,), generator=g)
    # fires on the first full measurement (step 2), so the event is in the replayed range
    detector = BreakEvenDetector(
        rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9
    )
    opt = BreakEvenSGD(
        model.parameters(), lr=0.1, probe=Probe(model, torch.nn.CrossEntropyLoss(), (x, y)),
        measure_every=2, cheap_every=None, measurements=("hessian",), detector=detector,
        loggers=[run_log],
    )
    return model, opt, x, y


def _without_time(records):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in records]


@pytest.mark.filterwarnings("ignore:.*already holds steps:RuntimeWarning")
@pytest.mark.parametrize("resume_step", [None, 0, 6])
def test_breakevensgd_resumed_from_an_older_checkpoint_logs_each_step_once(tmp_path, resume_step):
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    model, opt, x, y = _optimizer(RunLog(ref_dir))
    _train(opt, model, x, y, range(20))
    opt.monitor.close()
    # the interrupted run: checkpoint at step 6 (or 0), killed after step 14
    ckpt_step = 6 if resume_step is None else resume_step
    model, opt, x, y = _optimizer(RunLog(run_dir))
    _train(opt, model, x, y, range(ckpt_step))
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(opt, model, x, y, range(ckpt_step, 14))
    log = RunLog(run_dir, mode="a", resume_step=resume_step)
    model, opt, x, y = _optimizer(log)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert opt.monitor.step == ckpt_step
    _train(opt, model, x, y, range(ckpt_step, 20))
    opt.monitor.close()
    ref, run = read_run(ref_dir), read_run(run_dir)
    assert [r["step"] for r in run.records] == list(range(2, 21, 2))
    assert _without_time(run.records) == _without_time(ref.records)
    assert [e["event"] for e in run.events] == ["break_even"]
    assert run.events == ref.events


def test_resume_skips_records_already_in_the_run_directory_with_a_warning(tmp_path):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        for step in (1, 2, 3):
            log.log_measurement({"step": step, "lambda1_H": float(step)})
        log.log_event({"event": "skipped", "step": 2, "reason": "x"})
    log = RunLog(tmp_path, mode="a")
    with pytest.warns(RuntimeWarning, match=r"already holds steps up to 3.*resume_step"):
        log.log_measurement({"step": 2, "lambda1_H": 20.0})
    log.log_event({"event": "skipped", "step": 2, "reason": "x"})
    log.log_measurement({"step": 3, "train_accuracy": 0.5})
    log.log_measurement({"step": 4, "lambda1_H": 4.0})
    log.log_event({"note": "no step", "event": "custom"})
    log.close()
    run = read_run(tmp_path)
    assert [(r["step"], r.get("lambda1_H")) for r in run.records] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert [e["event"] for e in run.events] == ["skipped", "custom"]
    assert run.summary["num_records"] == 4


def test_resume_step_truncates_atomically_and_only_when_asked(tmp_path, monkeypatch):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        for step in range(1, 6):
            log.log_measurement({"step": step})
        log.log_event({"event": "break_even", "step": 2, "detected_at": 4})
        log.log_event({"event": "skipped", "step": 3})
        log.log_event({"event": "custom"})  # no step: kept
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ValueError, match="mode='a'"):
        RunLog(tmp_path, mode="w", resume_step=3)
    with pytest.raises(ValueError, match="resume_step"):
        RunLog(tmp_path, mode="a", resume_step=-1)

    def failing_replace(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        RunLog(tmp_path, mode="a", resume_step=3)
    monkeypatch.undo()
    for name in ("measurements.jsonl", "events.jsonl", "config.json"):
        assert (tmp_path / name).read_bytes() == before[name], name
    assert not list(tmp_path.glob("*.tmp"))
    log = RunLog(tmp_path, mode="a", resume_step=3)
    assert not (tmp_path / "summary.json").exists(), "a resumed run is not complete"
    assert not read_run(tmp_path).complete
    assert [r["step"] for r in read_run(tmp_path).records] == [1, 2, 3]
    assert [e["event"] for e in read_run(tmp_path).events] == ["skipped", "custom"]
    log.truncate_after(2)
    assert [r["step"] for r in log.records] == [1, 2]
    log.log_measurement({"step": 3, "lambda1_H": 9.0})
    log.close()
    run = read_run(tmp_path)
    assert run.complete and run.summary["max_lambda1_H"] == 9.0
    assert [r["step"] for r in run.records] == [1, 2, 3]
    with pytest.raises(RuntimeError, match="closed"):
        log.truncate_after(1)


def test_read_run_rejects_lines_that_are_not_objects(tmp_path):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        log.log_measurement({"step": 1})
    path = tmp_path / "measurements.jsonl"
    path.write_text(path.read_text() + "[1, 2]\n" + '{"step": 2}\n')
    with pytest.raises(ValueError, match=r"measurements.jsonl:2: .*not a JSON object"):
        read_run(tmp_path)
    # a last line without its newline that is not an object counts as torn
    path.write_text('{"step": 1}\n3')
    assert read_run(tmp_path).records == [{"step": 1}]
    with RunLog(tmp_path, mode="a") as log:
        log.log_measurement({"step": 2})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_read_run_names_a_corrupt_config_and_recomputes_a_corrupt_summary(tmp_path):
    with RunLog(tmp_path, {"lr": 0.1}) as log:
        log.log_measurement({"step": 1, "lambda1_H": 2.0})
    (tmp_path / "summary.json").write_text('{"max_lambda1_H": ')
    with pytest.warns(RuntimeWarning, match=rf"{tmp_path / 'summary.json'}.*not valid JSON"):
        run = read_run(tmp_path)
    assert run.summary is None and run.complete
    assert run.summarize()["max_lambda1_H"] == 2.0
    (tmp_path / "summary.json").write_text("[]")
    with pytest.warns(RuntimeWarning, match="not a JSON object"):
        read_run(tmp_path)
    for text in ("{lr: 0.1}", "[0.1]"):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=rf"{tmp_path / 'config.json'}: .*fix or remove"):
            read_run(tmp_path)
        with pytest.raises(ValueError, match="config.json"):
            RunLog(tmp_path, mode="a")


def test_killed_run_is_incomplete_and_a_directory_with_only_a_summary_is_no_run(tmp_path):
    log = RunLog(tmp_path / "run", {"lr": 0.1})
    log.log_measurement({"step": 1})
    assert not read_run(tmp_path / "run").complete
    log.close()
    assert read_run(tmp_path / "run").complete
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        read_run(tmp_path)
