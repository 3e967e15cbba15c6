"""Conjecture verdicts on recorded runs: peaks not yet passed, divergence, seeds, the L cap."""

from __future__ import annotations

import math

import pytest

from sgdbreak.integrations.cli import compare_runs, main, over_seeds
from sgdbreak.integrations.rundir import RunLog, read_run
from sgdbreak.integrations.summaries import peak_passed, series_values, summarize

BASE = {"model": "simplecnn", "batch_size": 128, "dataset": "mnist"}


def bump(i: int, top: int = 15) -> float:
    """A peak at record ``top`` (flat for 7 records) falling to ~0 on both sides."""
    return 1.0 if abs(i - top) <= 3 else math.exp(-(((abs(i - top) - 3) / 4) ** 2))


def write_run(run_dir, config, *, K, H=None, SR=5.0, n=40, top=15, samples=20, diverge_at=None):
    """A run of ``n`` records whose λ1^K (and λ1^H) peak at record ``top`` with height K (H)."""
    H = K * 10 if H is None else H
    with RunLog(run_dir, config) as log:
        for i in range(n):
            log.log_measurement({"step": 10 * i, "lambda1_K": K * bump(i, top), "lambda1_H": H * bump(i, top),
                                 "trace_K": K * bump(i, top) * SR, "stable_rank_K": SR * (0.5 + 0.5 * bump(i, top)),
                                 "noise_num_samples": samples})
            log.log_measurement({"step": 10 * i, "train_accuracy": min(1.0, 0.05 * i)})
        if diverge_at is not None:
            log.log_event({"event": "diverged", "step": diverge_at})
    return run_dir


def checks_by_quantity(pair):
    return {c["quantity"]: c for c in pair["checks"]}


def compare(*dirs):
    return compare_runs([(d.name, read_run(d)) for d in dirs])


# ----------------------------------------------------------------------------- summaries


def test_peak_passed_needs_a_fall_after_the_smoothed_peak():
    assert peak_passed([1, 2, 3, 4, 5, 6, 7, 8], window=3) is False  # still rising
    assert peak_passed([1, 2, 8, 8, 8, 7.5, 7.6, 7.7], window=3) is False  # within 10 % of the peak
    assert peak_passed([1, 2, 8, 8, 8, 5, 4, 4], window=3) is True
    # a maximum at the start is no peak along the trajectory (flat, or falling from init)
    assert peak_passed([5, 5, 5, 4, 3, 3], window=3) is False
    assert peak_passed([1.0, 0.9, 1.1, 0.95, 0.85, 0.9, 1.0], window=1) is False
    assert peak_passed([3.0], window=1) is False
    with pytest.raises(ValueError, match="drop must be in"):
        peak_passed([1, 2], drop=1.5)


def test_summarize_reports_passed_peaks_derived_ratios_and_accuracy_at_the_peak():
    records = [{"step": 10 * i, "lambda1_H": 1.0 + i, "top5_sum_H": 3.0 * (1.0 + i), "lambda1_K": 5.0 * bump(i, 8),
                "noise_num_samples": 10} for i in range(20)]
    records += [{"step": 0, "train_accuracy": 0.1}, {"step": 200, "train_accuracy": 0.9}]
    s = summarize(records, window=3)
    assert s["peak_passed_lambda1_K"] is True and s["peak_passed_lambda1_H"] is False
    assert s["max_top5_ratio_H"] == pytest.approx(3.0)
    assert series_values(records, "top5_ratio_H")[0] == pytest.approx(3.0)
    step = s["step_of_max_lambda1_K_smoothed"]
    assert s["train_accuracy_at_max_lambda1_K"] == pytest.approx(0.1 + 0.8 * step / 200)
    assert s["noise_num_samples"] == 10
    assert s["stable_rank_K_at_max_lambda1_K"] is None  # not logged here
    assert "max_bn_gamma_norm" not in s  # extra keys only when logged


# ----------------------------------------------------------------------------- verdicts


def test_complete_runs_past_their_peaks_agree_or_disagree(tmp_path):
    big = write_run(tmp_path / "big", {**BASE, "lr": 0.1, "seed": 0}, K=1.0)
    small = write_run(tmp_path / "small", {**BASE, "lr": 0.01, "seed": 0}, K=3.0, H=5.0)
    pair = compare(big, small)["pairs"][0]
    checks = checks_by_quantity(pair)
    assert pair["noisier"] == "big"
    assert checks["lambda1_K"]["verdict"] == "agrees"  # 1 < 3
    assert checks["lambda1_H"]["verdict"] == "disagrees"  # 10 > 5
    assert checks["lambda1_K"]["note"] is None


def test_a_run_cut_before_its_peak_is_inconclusive_not_disagrees(tmp_path):
    # The case: η = 0.01 found break-even late and was cut while λ1^K still rose;
    # η = 0.1 peaked (at 1.0) and fell. The cut run's 0.6 so far can only grow: inconclusive.
    big = write_run(tmp_path / "big", {**BASE, "lr": 0.1, "seed": 0}, K=1.0)
    cut = write_run(tmp_path / "cut", {**BASE, "lr": 0.01, "seed": 0}, K=3.0, n=9, top=15)
    assert read_run(cut).complete
    checks = checks_by_quantity(compare(big, cut)["pairs"][0])
    k = checks["lambda1_K"]
    assert k["noisier_value"] > k["other_value"]  # would read "disagrees"
    assert k["verdict"] == "inconclusive"
    assert "cut has not passed a peak by step 80" in k["note"]
    # When the cut run is already above the other's final peak, more steps cannot change it.
    low = write_run(tmp_path / "low", {**BASE, "lr": 0.1, "seed": 1}, K=0.01)
    cut_high = write_run(tmp_path / "cut_high", {**BASE, "lr": 0.01, "seed": 1}, K=3.0, n=9)
    k = checks_by_quantity(compare(low, cut_high)["pairs"][0])["lambda1_K"]
    assert k["verdict"] == "agrees" and k["note"].endswith("its peak can only grow")


def test_a_diverged_run_gives_inconclusive_verdicts(tmp_path):
    big = write_run(tmp_path / "big", {**BASE, "lr": 1.0, "seed": 0}, K=1.0, diverge_at=50)
    small = write_run(tmp_path / "small", {**BASE, "lr": 0.1, "seed": 0}, K=3.0)
    pair = compare(big, small)["pairs"][0]
    assert {c["verdict"] for c in pair["checks"]} == {"inconclusive"}
    assert "big diverged at step 50" in pair["checks"][0]["note"]


def test_seeds_are_counted_and_their_means_compared(tmp_path):
    dirs = []
    for seed, (k_big, k_small) in enumerate([(1.0, 3.0), (1.0, 2.0), (4.0, 3.0)]):
        dirs.append(write_run(tmp_path / f"big{seed}", {**BASE, "lr": 0.1, "seed": seed}, K=k_big))
        dirs.append(write_run(tmp_path / f"small{seed}", {**BASE, "lr": 0.01, "seed": seed}, K=k_small))
    result = compare(*dirs)
    assert len(result["pairs"]) == 3  # one per seed: other seeds are not paired
    [group] = result["over_seeds"]
    assert group["seeds"] == [0, 1, 2] and group["noisier_value"] == 0.1
    k = next(c for c in group["checks"] if c["quantity"] == "lambda1_K")
    assert (k["agree"], k["seeds"], k["counts"]) == (2, 3, {"agrees": 2, "disagrees": 1})
    assert k["noisier_mean"] == pytest.approx(2.0, rel=0.02) and k["other_mean"] == pytest.approx(8 / 3, rel=0.02)
    assert k["verdict"] == "agrees"
    assert over_seeds([]) == []


def test_one_inconclusive_seed_makes_the_mean_verdict_inconclusive(tmp_path):
    dirs = [write_run(tmp_path / "big0", {**BASE, "lr": 0.1, "seed": 0}, K=1.0),
            write_run(tmp_path / "small0", {**BASE, "lr": 0.01, "seed": 0}, K=3.0),
            write_run(tmp_path / "big1", {**BASE, "lr": 0.1, "seed": 1}, K=1.0),
            write_run(tmp_path / "small1", {**BASE, "lr": 0.01, "seed": 1}, K=3.0, n=9)]
    k = next(c for c in compare(*dirs)["over_seeds"][0]["checks"] if c["quantity"] == "lambda1_K")
    assert k["counts"] == {"agrees": 1, "inconclusive": 1} and k["verdict"] == "inconclusive"
    assert any("small1 has not passed a peak" in n for n in k["notes"])


def test_batch_size_grid_with_epochs_pairs_despite_different_step_counts(tmp_path):
    small_s = write_run(tmp_path / "s32", {**BASE, "lr": 0.1, "seed": 0, "batch_size": 32, "total_steps": 400,
                                           "steps_per_epoch": 100}, K=1.0)
    big_s = write_run(tmp_path / "s128", {**BASE, "lr": 0.1, "seed": 0, "batch_size": 128, "total_steps": 100,
                                          "steps_per_epoch": 25}, K=3.0)
    [pair] = compare(small_s, big_s)["pairs"]
    assert pair["varied"] == "batch_size" and pair["noisier"] == "s32"
    assert checks_by_quantity(pair)["lambda1_K"]["verdict"] == "agrees"


def test_tr_k_over_lambda1_k_near_l_minus_1_is_flagged(tmp_path):
    big = write_run(tmp_path / "big", {**BASE, "lr": 0.1, "seed": 0}, K=1.0, SR=4.5, samples=6)
    small = write_run(tmp_path / "small", {**BASE, "lr": 0.01, "seed": 0}, K=3.0, SR=2.0, samples=6)
    checks = checks_by_quantity(compare(big, small)["pairs"][0])
    note = checks["stable_rank_K"]["note"]
    assert note.startswith("capped by L: big 4.5 of at most L - 1 = 5")
    assert "small" not in note  # 2.0 is far from 5
    assert checks["lambda1_K"]["note"] is None  # only Tr K/λ1^K is capped by L


def test_summary_command_prints_seed_counts_before_the_totals(tmp_path, capsys):
    dirs = []
    for seed in (0, 1):
        dirs.append(write_run(tmp_path / f"big{seed}", {**BASE, "lr": 0.1, "seed": seed}, K=1.0))
        dirs.append(write_run(tmp_path / f"small{seed}", {**BASE, "lr": 0.01, "seed": seed}, K=3.0, SR=4.0))
    assert main(["summary", *map(str, dirs)]) == 0
    out = capsys.readouterr().out
    assert "over seeds 0, 1: lr 0.1 vs 0.01 (batch_size=128, model=simplecnn; larger lr is noisier)" in out
    assert "  C1 max lambda1_K        2/2 seeds agree (2 agrees); mean 1 vs 3, expected lower: agrees" in out
    assert out.strip().endswith("total: 8 agree, 0 disagree, 0 tie, 0 missing")
