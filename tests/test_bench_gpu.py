"""The GPU benchmark entry point runs its reduced (CPU) version end to end.

The reduced version is what CI keeps working between GPU runs: the same scripts and
JSON/Markdown outputs as on CUDA, on a small model for one epoch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

GPU = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu.py"


@pytest.mark.slow
def test_gpu_benchmark_reduced_version_writes_json_and_markdown(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU), "--out", str(tmp_path), "--reduced", "--device", "cpu"],
                          capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] == "cpu" and results["reduced"]
    bench = results["benchmarks"]
    assert set(bench) == {"overhead_tiny", "hessian", "scaling"}
    assert all(entry["status"] == "ok" for entry in bench.values())
    overhead = bench["overhead_tiny"]["result"]
    default = next(r for r in overhead["rows"] if r["variant"] == "default")
    assert default["same params"] is True  # measuring never changes training
    assert default["full"] >= 1 and default["hvps"] >= 1 and default["x own training"] > 1
    hessian = {r["method"]: r for r in bench["hessian"]["result"]["rows"]}
    assert hessian["warm lanczos (after 1 step)"]["max rel err"] <= 1e-2
    scaling = bench["scaling"]["result"]
    assert [r["model"] for r in scaling] == ["cnn-4", "mlp-64"]
    for r in scaling:
        assert r["full_x_step"] > 0 and r["hvps_warm"] >= 1 and r["noise_x_physical"] > 0
    md = (tmp_path / "results.md").read_text()
    assert "| variant | seconds | × SGD |" in md and "| model | params |" in md
