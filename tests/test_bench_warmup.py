"""The warmup benchmark runs end to end on tiny settings (it is slow at full size)."""

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_warmup.py"


def test_bench_warmup_quick(tmp_path):
    out = tmp_path / "warmup.json"
    subprocess.run([sys.executable, str(BENCH), "--datasets", "digits", "--optimizers", "sgd,adamw", "--seeds", "0",
                    "--quick", "--output", str(out)], check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    methods = {r["method"] for r in data["results"]}
    assert methods == {"constant", "linear", "auto", "plain"}
    rows = data["rows"]
    assert {r["optimizer"] for r in rows} == {"sgd", "adamw"}
    assert all(0.0 <= r["auto_acc"] <= 1.0 and r["auto_vs_plain"] > 0 for r in rows)
    assert any(r.get("sharpness_key") == "lambda1_PH" for r in data["results"] if r["optimizer"] == "adamw")


def test_bench_warmup_reuse_refuses_runs_of_other_settings(tmp_path):
    """--reuse keeps the runs of methods not rerun, but only when steps and warmup lengths match."""
    first = tmp_path / "first.json"
    quick = [sys.executable, str(BENCH), "--datasets", "digits", "--optimizers", "sgd", "--seeds", "0", "--quick"]
    subprocess.run([*quick, "--output", str(first)], check=True, capture_output=True, text=True, timeout=600)
    again = tmp_path / "again.json"
    ok = subprocess.run([*quick, "--methods", "auto", "--reuse", str(first), "--output", str(again)],
                        capture_output=True, text=True, timeout=600)
    assert ok.returncode == 0, ok.stderr
    kept = {r["method"] for r in json.loads(again.read_text())["results"]}
    assert {"constant", "linear", "auto"} <= kept
    bad = subprocess.run([*quick, "--steps", "30", "--methods", "auto", "--reuse", str(first), "--output",
                          str(tmp_path / "bad.json")], capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "--reuse" in bad.stderr and "steps=40" in bad.stderr
