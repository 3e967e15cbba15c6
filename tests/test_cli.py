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

from sgdbreak.cli import compare_runs, main
from sgdbreak.tracking import RunLog, read_run

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
        [sys.executable, "-m", "sgdbreak.cli", "summary", runs["A"], runs["B"]],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("total: 4 agree, 0 disagree, 0 tie, 0 missing")
