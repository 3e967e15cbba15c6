"""The batch-size benchmark runs end to end on tiny settings (it is slow at full size)."""

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_batch_size.py"


def test_bench_batch_size_quick(tmp_path):
    out = tmp_path / "batch_size.json"
    subprocess.run([sys.executable, str(BENCH), "--datasets", "digits", "--rules", "sqrt", "--seeds", "0", "--quick",
                    "--output", str(out)], check=True, capture_output=True, text=True, timeout=600)
    data = json.loads(out.read_text())
    assert {r["method"] for r in data["results"]} == {"fixed", "controller", "plain"}
    rows = {r["run"]: r for r in data["rows"]}
    assert set(rows) == {"fixed S=16", "fixed S=256", "controller S0=16"}
    assert all(0.0 <= r["final_accuracy"] <= 1.0 and r["cpu_vs_plain"] > 0 for r in rows.values())
    budget = int(0.5 * 1397)  # --quick: half an epoch of the 1,397 training digits
    for run in data["results"]:
        if run["method"] == "fixed":
            assert run["steps"] == math.ceil(budget / run["size"]) and run["examples"] >= budget
    controller = next(r for r in data["results"] if r["method"] == "controller")
    assert controller["events"][0]["event"] == "batch_size_start" and controller["sizes"][0] == [0, 16]
    assert all(r.get("max_lambda1_H") for r in data["results"] if r["method"] != "plain")
