"""The main-job recipe end to end on a small setting (digits, a few steps, two learning rates)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "break_even.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("recipe_break_even", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SMALL = ["--dataset", "digits", "--num-examples", "400", "--batch-size", "32", "--max-steps", "12",
         "--lr", "0.05", "0.5", "--measure-every", "4", "--cheap-every", "2", "--probe-fraction", "0.1",
         "--no-progress"]


def test_recipe_writes_one_run_per_learning_rate_and_a_comparison(tmp_path, capsys):
    recipe = load_recipe()
    assert recipe.main([*SMALL, "--output-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [run["lr"] for run in summary["runs"]] == [0.05, 0.5]
    for lr in ("0.05", "0.5"):
        run_dir = tmp_path / f"lr_{lr}"
        config = json.loads((run_dir / "config.json").read_text())
        assert config["lr"] == float(lr) and config["processes"] == 1
        records = [json.loads(line) for line in (run_dir / "measurements.jsonl").read_text().splitlines()]
        full = [r for r in records if "lambda1_H" in r]
        assert [r["step"] for r in full] == [4, 8, 12]
        assert all(r["lambda1_H"] > 0 and r["trace_K"] > 0 for r in full)
        assert any("train_accuracy" in r for r in records)
    assert summary["comparison"]["pairs"], "the two learning rates are compared"
    out = capsys.readouterr().out
    assert "Break-even measurement" in out and "Conjecture 1" in out


def test_recipe_reports_each_learning_rate_to_its_own_tracker_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = load_recipe()
    out = tmp_path / "runs"
    assert recipe.main([*SMALL, "--output-dir", str(out), "--report-to", "wandb"]) == 0
    offline = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 2, offline
    assert all(list(d.glob("*.wandb")) for d in offline)


def test_recipe_rejects_bad_arguments():
    recipe = load_recipe()
    for bad in (["--lr", "0"], ["--probe-fraction", "1.5"], ["--max-steps", "0"]):
        with pytest.raises(SystemExit):
            recipe.parse_args(bad)
