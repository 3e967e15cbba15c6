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
    # the README's `sgdbreak report runs/break_even/*`: the glob also matches summary.json
    from sgdbreak.integrations.cli import main as cli

    assert cli(["report", *sorted(str(p) for p in tmp_path.iterdir()), "--formats", "png"]) == 0
    captured = capsys.readouterr()
    assert f"skipping {tmp_path / 'summary.json'}: a file, not a run directory" in captured.err
    assert captured.out.count("== ") == 2 and "incomplete" not in captured.out
    assert (tmp_path / "lr_0.5" / "breakeven.png").exists()


def test_recipe_reports_each_learning_rate_to_its_own_tracker_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    wandb.teardown()  # an earlier test's wandb session would keep its own WANDB_DIR
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


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--lr", "nan"], "--lr: must be a finite positive number, got 'nan'"),
        (["--lr", "0.1", "inf"], "--lr: must be a finite positive number, got 'inf'"),
        (["--lr", "-1"], "--lr: must be a finite positive number, got '-1'"),
        (["--num-examples", "0"], "--num-examples: must be a positive integer, got '0'"),
        (["--cheap-every", "0"], "--cheap-every: must be a positive integer, got '0'"),
        (["--measure-every", "-1"], "--measure-every: must be a positive integer or 'adaptive'"),
        (["--measure-every", "0"], "--measure-every: must be a positive integer or 'adaptive'"),
        (["--momentum", "1.5"], "--momentum: must be a number in [0, 1), got '1.5'"),
        (["--momentum", "nan"], "--momentum: must be a number in [0, 1), got 'nan'"),
        (["--batch-size", "0"], "--batch-size: must be a positive integer, got '0'"),
        (["--max-steps", "2.5"], "--max-steps: must be a positive integer, got '2.5'"),
        (["--probe-fraction", "nan"], "--probe-fraction: must be a number in (0, 1], got 'nan'"),
    ],
)
def test_recipe_rejects_bad_values_with_a_usage_error(bad, message, capsys):
    recipe = load_recipe()
    with pytest.raises(SystemExit) as exc:
        recipe.parse_args(bad)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage:") and message in err, err


def test_recipe_measure_every_accepts_an_explicit_adaptive():
    recipe = load_recipe()
    assert recipe.parse_args(["--measure-every", "adaptive"]).measure_every is None
    assert recipe.parse_args(["--measure-every", "7"]).measure_every == 7
    assert recipe.parse_args([]).measure_every is None


def test_recipe_rejects_a_batch_larger_than_the_data(tmp_path, capsys):
    recipe = load_recipe()
    argv = ["--dataset", "digits", "--num-examples", "100", "--batch-size", "100000",
            "--output-dir", str(tmp_path), "--no-progress"]
    with pytest.raises(SystemExit) as exc:
        recipe.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--batch-size 100000 is larger than the 100 training examples" in err
    assert not list(tmp_path.iterdir()), "nothing is written before the check"
    with pytest.raises(SystemExit) as exc:
        recipe.main(["--dataset", "digits", "--num-examples", "5000", "--output-dir", str(tmp_path)])
    assert exc.value.code == 2
    assert "--num-examples 5000: --dataset digits has only 1797 examples" in capsys.readouterr().err


@pytest.mark.parametrize("warmup", ["auto", "linear:6"])
def test_recipe_warmup_drives_the_learning_rate(tmp_path, capsys, warmup):
    recipe = load_recipe()
    argv = [*SMALL[:SMALL.index("--lr")], "--lr", "5.0", *SMALL[SMALL.index("--measure-every"):]]
    assert recipe.main([*argv, "--warmup", warmup, "--output-dir", str(tmp_path)]) == 0
    run_dir = tmp_path / "lr_5"
    config = json.loads((run_dir / "config.json").read_text())
    records = [json.loads(line) for line in (run_dir / "measurements.jsonl").read_text().splitlines()]
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in records if "lr" in r]
    assert config["warmup"] == warmup and lrs and max(lrs) <= 5.0
    if warmup == "auto":
        start = next(e for e in events if e["event"] == "warmup_start")
        assert start["lr"] < 5.0 and start["edge_lr"] > 0
        from sgdbreak.integrations.cli import main as cli

        assert cli(["report", str(run_dir), "--formats", "png"]) == 0
        assert (run_dir / "breakeven_lr.png").exists()
    else:
        assert lrs[0] == pytest.approx(5.0 * 2 / 6)  # measured after step 1, lr of step 2


def test_recipe_rejects_a_bad_warmup(capsys):
    recipe = load_recipe()
    with pytest.raises(SystemExit) as info:
        recipe.parse_args(["--warmup", "linear:0"])
    assert info.value.code == 2 and "linear:N" in capsys.readouterr().err
