"""Tests of the ``sgdbreak`` command line on recorded (synthetic) run directories."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sgdbreak.integrations.cli import compare_runs, main
from sgdbreak.integrations.rundir import RunLog, read_run

REPO = Path(__file__).resolve().parents[1]
CHECK_LINE = re.compile(
    r"^  Conjecture (\d)  (.+?)\s+(\S+) vs (\S+)  expected (lower|higher): (\w+)$"
)


def write_run(run_dir, config, *, H, K, SR, TR, break_even_step=150, accuracy=0.65):
    """A 40-record run whose λ1^H, λ1^K, Tr K/λ1^K and Tr K plateau at H, K, SR, TR."""
    with RunLog(run_dir, config) as log:
        for i in range(40):
            # flat top at steps 120-180, so smoothed and raw peaks agree
            bump = 1.0 if abs(i - 15) <= 3 else math.exp(-(((abs(i - 15) - 3) / 4) ** 2))
            log.log_measurement(
                {
                    "step": 10 * i,
                    "lr": config.get("lr", 0.1),
                    "momentum": 0.0,
                    "lambda1_H": H * bump,
                    "lambda1_K": K * bump,
                    "stable_rank_K": SR * (0.5 + 0.5 * bump),
                    "trace_K": TR * bump,
                }
            )
        # an accuracy-only record, as recipes log at epoch ends
        log.log_measurement({"step": 400, "epoch": 1.0, "train_accuracy": accuracy})
        if break_even_step is not None:
            log.log_event(
                {
                    "event": "break_even",
                    "step": break_even_step,
                    "detected_at": break_even_step + 20,
                    "rule": "stability",
                    "evidence": {"stability": {"stability_ratio": 1.08}},
                }
            )
    return str(run_dir)


@pytest.fixture
def runs(tmp_path):
    base = {"model": "simplecnn", "seed": 0, "out_dir": "ignored"}
    return {
        # larger lr than B: lower K, H, Tr K and higher Tr K/lambda1_K (agrees)
        "A": write_run(
            tmp_path / "A", {**base, "lr": 0.1, "batch_size": 128}, H=10, K=1, SR=14, TR=10
        ),
        "B": write_run(
            tmp_path / "B",
            {**base, "lr": 0.01, "batch_size": 128, "out_dir": "elsewhere"},
            H=30,
            K=3,
            SR=10,
            TR=30,
            break_even_step=None,
        ),
        # larger batch than A: lambda1_H lower (disagrees with Conjecture 1), the rest agrees
        "C": write_run(
            tmp_path / "C", {**base, "lr": 0.1, "batch_size": 512}, H=8, K=2, SR=12, TR=20
        ),
        "D": write_run(
            tmp_path / "D",
            {**base, "lr": 0.1, "batch_size": 128, "model": "resnet32"},
            H=1,
            K=1,
            SR=1,
            TR=1,
        ),
        "E": write_run(tmp_path / "E", {"model": "simplecnn"}, H=1, K=1, SR=1, TR=1),
    }


def test_report_prints_table(runs, capsys):
    assert main(["report", runs["A"], runs["B"], "--no-plots"]) == 0
    out = capsys.readouterr().out
    summary = read_run(runs["A"]).summarize()
    block_a, block_b = out.split("== ")[1:]
    assert block_a.startswith(f"{runs['A']}  (lr=0.1, batch_size=128)")
    line = next(ln for ln in block_a.splitlines() if ln.strip().startswith("lambda1_H"))
    assert line.split() == [
        "lambda1_H",
        "10",
        f"{summary['max_lambda1_H_smoothed']:.4g}",
        f"{summary['q90_lambda1_H']:.4g}",
        "140",
    ]
    line = next(ln for ln in block_a.splitlines() if ln.strip().startswith("Tr K/lambda1_K"))
    assert line.split()[2] == "14"
    assert "break-even: step 150 (rule: stability, detected at 170)" in block_a
    assert "evidence stability: stability_ratio=1.08" in block_a
    assert "final train_accuracy: 0.65" in block_a
    assert "measurements: 40 in 41 records (steps 0-400)" in block_a
    assert "break-even: not detected" in block_b
    assert not list(Path(runs["A"]).glob("*.png"))


def test_report_writes_figures(runs, tmp_path, capsys):
    out_dir = tmp_path / "figures"
    assert main(["report", runs["A"], runs["B"], "--out", str(out_dir), "--formats", "png"]) == 0
    out = capsys.readouterr().out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["A_breakeven.png", "B_breakeven.png", "comparison.png"]
    assert all((out_dir / n).stat().st_size > 1000 for n in names)
    assert f"figure: {out_dir / 'A_breakeven.png'}\n" in out
    assert "comparison figure:" in out
    # without --out the figure goes into the run directory
    assert main(["report", runs["C"], "--formats", "png"]) == 0
    assert (Path(runs["C"]) / "breakeven.png").stat().st_size > 1000
    assert not (Path(runs["C"]) / "breakeven.pdf").exists()


def test_report_json(runs, capsys):
    assert main(["report", runs["C"], "--no-plots", "--json", "--window", "1"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data[runs["C"]]["max_lambda1_H_smoothed"] == pytest.approx(8.0)
    assert data[runs["C"]]["smoothing_window"] == 1


def test_summary_verdicts(runs, capsys):
    args = ["summary", *(runs[k] for k in "ABCDE")]
    assert main(args) == 0
    out = capsys.readouterr().out
    blocks = out.split("\n\n")
    ab = next(b for b in blocks if b.startswith(f"{runs['A']} (lr=0.1) vs {runs['B']} (lr=0.01)"))
    assert f"larger lr in {runs['A']}" in ab
    assert ab.count("agrees") == 4 and "disagrees" not in ab
    ac = next(b for b in blocks if b.startswith(f"{runs['A']} (batch_size=128) vs {runs['C']}"))
    assert f"smaller batch_size in {runs['A']}" in ac
    rows = [CHECK_LINE.match(ln).groups() for ln in ac.splitlines()[1:]]
    assert rows == [
        ("1", "max lambda1_K", "1", "2", "lower", "agrees"),
        ("1", "max lambda1_H", "10", "8", "lower", "disagrees"),
        ("2", "max Tr K/lambda1_K", "14", "12", "higher", "agrees"),
        ("2", "max Tr K", "10", "20", "lower", "agrees"),
    ]
    assert f"{runs['B']} vs {runs['C']}: differ in both lr and batch_size" in out
    assert f"{runs['D']}: other config keys differ from every other run: model" in out
    assert f"{runs['E']}: config.json has no numeric lr or batch_size" in out
    assert out.strip().endswith("total: 7 agree, 1 disagree, 0 tie, 0 missing")


def test_compare_runs_respects_ignore(runs):
    loaded = [(k, read_run(runs[k])) for k in "BD"]
    result = compare_runs(loaded)
    assert result["pairs"] == []
    assert [n["run"] for n in result["not_compared"]] == ["B", "D"]
    result = compare_runs(loaded, ignore=("model", "out_dir"))
    (pair,) = result["pairs"]
    assert (pair["varied"], pair["noisier"], pair["other"]) == ("lr", "D", "B")
    assert result["not_compared"] == []


def test_summary_json_and_out_dir_not_ignored(runs, capsys):
    assert main(["summary", runs["A"], runs["B"], "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["verdict"] for c in data["pairs"][0]["checks"]] == ["agrees"] * 4
    assert data["totals"]["agrees"] == 4


def test_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert f"run directory not found: {tmp_path / 'nope'}" in capsys.readouterr().err
    assert main(["summary", str(tmp_path)]) == 2
    assert "is not a run directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["report"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        main(["report", "x", "--window", "0"])


def test_module_entry_point(runs):
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-m", "sgdbreak.integrations.cli", "summary", runs["A"], runs["B"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("total: 4 agree, 0 disagree, 0 tie, 0 missing")


# --------------------------------------------------------------------------- incomplete runs and arguments


def kill(run_dir) -> str:
    """Make a finished run look killed: no summary.json."""
    (Path(run_dir) / "summary.json").unlink()
    return str(run_dir)


def partial_run(run_dir, config, values):
    """A killed run: λ1 values logged so far, never closed."""
    log = RunLog(run_dir, config)
    for i, v in enumerate(values):
        log.log_measurement(
            {"step": 10 * i, "lambda1_H": v, "lambda1_K": v, "stable_rank_K": v, "trace_K": v}
        )
    for f in log._files.values():
        f.close()
    return str(run_dir)


def verdicts(capsys, *run_dirs):
    assert main(["summary", *run_dirs]) == 0
    out = capsys.readouterr().out
    return [ln.split(": ", 1)[1] for ln in out.splitlines() if ln.startswith("  Conjecture")], out


def test_report_says_a_killed_run_is_incomplete(runs, capsys):
    assert main(["report", kill(runs["B"]), runs["A"], "--no-plots"]) == 0
    block_b, block_a = capsys.readouterr().out.split("== ")[1:]
    assert block_b.splitlines()[1] == "  incomplete: no summary.json (killed or still running)"
    assert "incomplete" not in block_a
    assert main(["report", runs["B"], runs["A"], "--no-plots", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data[runs["B"]]["complete"], data[runs["A"]]["complete"]) == (False, True)


def test_summary_verdicts_on_an_incomplete_run_only_where_its_peak_cannot_overturn_them(runs, capsys):
    # B (the quieter run) killed: its peaks so far can only grow, so "A lower" stands;
    # "A's Tr K/lambda1_K higher" (14 vs 10 so far) could still be overturned.
    checks, out = verdicts(capsys, runs["A"], kill(runs["B"]))
    assert f"{runs['B']}: incomplete: no summary.json (killed or still running)" in out
    note = f"{runs['B']} incomplete"
    assert checks == [
        f"agrees ({note}; its peak can only grow)",
        f"agrees ({note}; its peak can only grow)",
        f"inconclusive ({note})",
        f"agrees ({note}; its peak can only grow)",
    ]
    assert out.strip().endswith("total: 3 agree, 0 disagree, 0 tie, 0 missing, 1 inconclusive")


def test_summary_of_a_noisier_run_killed_before_its_peak_is_inconclusive(tmp_path, runs, capsys):
    base = {"model": "simplecnn", "seed": 0, "out_dir": "ignored", "batch_size": 128}
    # killed early while still rising: its maxima so far are below B's, but may not stay so
    early = partial_run(tmp_path / "early", {**base, "lr": 0.1}, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    checks, out = verdicts(capsys, early, runs["B"])
    assert checks == [f"inconclusive ({early} incomplete)"] * 4
    # already above B's peaks: more records can only raise them, so those verdicts stand
    high = partial_run(tmp_path / "high", {**base, "lr": 0.1}, [40.0, 41, 42, 43, 44, 45])
    checks, out = verdicts(capsys, high, runs["B"])
    assert [c.split(" (")[0] for c in checks] == ["disagrees", "disagrees", "agrees", "disagrees"]
    # fewer values than the smoothing window: its smoothed peak may still go down
    short = partial_run(tmp_path / "short", {**base, "lr": 0.1}, [100.0, 100.0])
    checks, _ = verdicts(capsys, short, runs["B"], "--window", "5")
    assert checks == [f"inconclusive ({short} incomplete)"] * 4
    # both incomplete: nothing can be concluded
    checks, _ = verdicts(capsys, early, kill(runs["B"]))
    assert all(c.startswith("inconclusive") for c in checks)
    result = compare_runs([("early", read_run(early)), ("B", read_run(runs["B"]))])
    assert result["incomplete"] == ["early", "B"]
    assert result["totals"]["inconclusive"] == 4


def test_report_on_a_glob_skips_files_and_reads_parent_directories(runs, tmp_path, capsys):
    parent = tmp_path / "break_even"
    parent.mkdir()
    for name in ("A", "B"):
        Path(runs[name]).rename(parent / f"lr_{name}")
    (parent / "summary.json").write_text('{"runs": []}')
    glob = sorted(str(p) for p in parent.iterdir())  # what the shell gives for runs/break_even/*
    assert main(["report", *glob, "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"skipping {parent / 'summary.json'}: a file, not a run directory" in captured.err
    assert [b.split()[0] for b in captured.out.split("== ")[1:]] == [
        str(parent / "lr_A"),
        str(parent / "lr_B"),
    ]
    # the parent itself stands for the runs inside it (listed once with them)
    assert main(["summary", str(parent), str(parent / "lr_A")]) == 0
    captured = capsys.readouterr()
    assert f"{parent} is not a run directory: reading the 2 run directories inside it" in captured.err
    assert captured.out.strip().endswith("total: 4 agree, 0 disagree, 0 tie, 0 missing")
    # a path that does not exist is still an error
    assert main(["report", *glob, str(tmp_path / "typo"), "--no-plots"]) == 2
    assert f"run directory not found: {tmp_path / 'typo'}" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["summary", str(tmp_path / "empty"), str(parent / "summary.json")]) == 2
    assert "no run directories among the arguments" in capsys.readouterr().err


def test_corrupt_files_are_named_and_a_corrupt_summary_is_recomputed(runs, capsys):
    summary_path = Path(runs["A"]) / "summary.json"
    summary_path.write_text("{not json")
    assert main(["report", runs["A"], "--no-plots"]) == 0
    captured = capsys.readouterr()
    assert f"warning: {summary_path}: not valid JSON" in captured.err
    assert "break-even: step 150" in captured.out and "incomplete" not in captured.out
    config_path = Path(runs["C"]) / "config.json"
    config_path.write_text('{"lr": 0.1,')
    assert main(["summary", runs["A"], runs["C"]]) == 2
    assert f"{config_path}: not valid JSON" in capsys.readouterr().err
    records = Path(runs["B"]) / "measurements.jsonl"
    lines = records.read_text().splitlines(keepends=True)
    records.write_text("".join([lines[0], "42\n", *lines[1:]]))
    assert main(["report", runs["B"], "--no-plots"]) == 2
    assert f"{records}:2: not a JSON object" in capsys.readouterr().err


def test_unknown_figure_format_is_rejected_with_the_choices(runs, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", runs["A"], "--formats", "png,xyz"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown figure format xyz; choose from png, pdf, svg" in err
    assert main(["report", runs["A"], "--formats", "SVG", "--out", str(Path(runs["A"]) / "f")]) == 0
    assert (Path(runs["A"]) / "f" / "A_breakeven.svg").exists()
