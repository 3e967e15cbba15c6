"""Tests of sgdbreak.integrations.plots on recorded (synthetic) run directories."""

from __future__ import annotations

import math

import numpy as np
import pytest

from sgdbreak.integrations.plots import edge_sharpness, plot_comparison, plot_run
from sgdbreak.integrations.rundir import RunLog, read_run


def write_run(run_dir, *, lr, scale=1.0, n=40, alpha=True, break_even_step=150):
    """A run whose λ1^H and λ1^K peak at step 150; lr drops 10x at step 300."""
    with RunLog(run_dir, {"lr": lr, "batch_size": 128, "model": "simplecnn"}) as log:
        for i in range(n):
            step = 10 * i
            bump = math.exp(-(((i - 15) / 6) ** 2))
            rec = {
                "step": step,
                "epoch": step / 100,
                "lr": lr if step < 300 else lr / 10,
                "momentum": 0.9,
                "lambda1_H": scale * (1.0 + 20.0 * bump),
                "lambda1_K": scale * (0.1 + 3.0 * bump),
                "trace_K": scale * (1.0 + 30.0 * bump),
            }
            if alpha:
                rec["alpha_star"] = 10.0 - 8.0 * bump
            log.log_measurement(rec)
        if break_even_step is not None:
            log.log_event(
                {
                    "event": "break_even",
                    "step": break_even_step,
                    "detected_at": break_even_step + 20,
                    "rule": "stability",
                    "evidence": {"stability": {"stability_ratio": 1.1}},
                }
            )
    return run_dir


def _vertical_lines_at(ax, x):
    return [
        line
        for line in ax.get_lines()
        if len(line.get_xdata()) == 2 and np.allclose(np.asarray(line.get_xdata(), float), x)
    ]


def _check_files(paths):
    assert [p.suffix for p in paths] == [".png", ".pdf"]
    png, pdf = paths
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_run_writes_figure_with_panels_and_markers(tmp_path):
    run_dir = write_run(tmp_path / "run", lr=0.1)
    fig, paths = plot_run(run_dir, tmp_path / "figs" / "run")
    _check_files(paths)
    axes = fig.get_axes()
    labels = [ax.get_ylabel() for ax in axes]
    assert labels == [
        r"$\lambda_1^H$",
        r"$\lambda_1^K$",
        r"$\mathrm{Tr}\,K / \lambda_1^K$",
        r"$\alpha^*$",
    ]
    for ax in axes:
        assert len(_vertical_lines_at(ax, 150.0)) == 1, ax.get_ylabel()
    assert axes[0].get_yscale() == "log"
    # the stability line follows the per-record lr: 2(1+0.9)/0.1 = 38, then 380
    (threshold,) = [ln for ln in axes[0].get_lines() if ln.get_label() == r"$2(1+\beta)/\eta$"]
    assert set(np.round(threshold.get_ydata(), 6)) == {38.0, 380.0}
    # the Tr K / lambda1_K panel is computed from trace_K / lambda1_K
    xs, ys = read_run(run_dir).series("stable_rank_K")
    np.testing.assert_allclose(axes[2].get_lines()[0].get_ydata(), ys)


def test_plot_run_against_epoch_without_alpha(tmp_path):
    run = read_run(write_run(tmp_path / "run", lr=0.1, alpha=False))
    fig, paths = plot_run(run, None, x="epoch")
    assert paths == []
    axes = fig.get_axes()
    assert len(axes) == 3
    assert all(ax.get_xlabel() == "epoch" for ax in axes)
    assert len(_vertical_lines_at(axes[0], 1.5)) == 1  # step 150 = epoch 1.5


def test_plot_run_rejects_runs_without_data(tmp_path):
    with RunLog(tmp_path / "empty") as log:
        log.log_measurement({"step": 0, "loss": 2.3})
    with pytest.raises(ValueError, match="no lambda1_H"):
        plot_run(tmp_path / "empty")
    with pytest.raises(TypeError, match="Run or a run directory"):
        plot_run(42)


def test_plot_comparison_overlays_runs(tmp_path):
    runs = [
        write_run(tmp_path / "lr0.01", lr=0.01, scale=3.0, break_even_step=200),
        write_run(tmp_path / "lr0.1", lr=0.1, scale=1.0, break_even_step=150),
        write_run(tmp_path / "lr0.3", lr=0.3, scale=0.5, break_even_step=None),
    ]
    fig, paths = plot_comparison(runs, None, tmp_path / "cmp")
    _check_files(paths)
    axes = fig.get_axes()
    assert len(axes) == 4
    assert axes[3].get_ylabel() == r"$\mathrm{Tr}\,K$"
    legend = [t.get_text() for t in axes[0].get_legend().get_texts()]
    assert legend == ["lr=0.01", "lr=0.1", "lr=0.3"]
    for ax in axes:
        assert len(_vertical_lines_at(ax, 200.0)) == 1
        assert len(_vertical_lines_at(ax, 150.0)) == 1
    # one stability line per run on the lambda1_H panel
    dashed = [ln for ln in axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == 3
    assert set(np.round(dashed[0].get_ydata(), 6)) == {380.0, 3800.0}
    with pytest.raises(ValueError, match="labels"):
        plot_comparison(runs, ["only one"])


def test_edge_sharpness_skips_records_without_lr_and_reads_the_logged_edge(tmp_path):
    with RunLog(tmp_path) as log:
        log.log_measurement({"step": 0, "lr": 0.5, "momentum": 0.0})
        log.log_measurement({"step": 1})
        log.log_measurement({"step": 2, "lr": 0.25, "momentum": 0.5})
        log.log_measurement({"step": 3, "lr": 0.25, "momentum": 0.5, "edge_sharpness": 4.75})
        # Not SGD (no momentum, no edge_sharpness: Adam, RMSprop, ...): no SGD line.
        log.log_measurement({"step": 4, "lr": 0.25, "edge_sharpness_PH": 152.0})
        log.log_measurement({"step": 5, "lr": 0.25})
    xs, ys = edge_sharpness(read_run(tmp_path))
    np.testing.assert_allclose(xs, [0, 2, 3])
    np.testing.assert_allclose(ys, [4.0, 12.0, 4.75])


@pytest.mark.parametrize("config", [dict(momentum=0.9, nesterov=True), dict(momentum=0.5, dampening=0.5),
                                    dict(momentum=0.9, weight_decay=0.1), dict()])
def test_the_dashed_line_agrees_with_the_logged_stability_ratio(config):
    """One formula: at λ1^H = edge_sharpness the logged stability_ratio would be exactly 1."""
    import torch
    from torch import nn

    from sgdbreak import BreakEvenSGD, Probe, stability_ratio

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                       measure_every=1, cheap_every=None, **config)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    record = opt.latest
    edge = record["edge_sharpness"]
    kwargs = {k: v for k, v in config.items() if k != "momentum"}
    assert stability_ratio(0.1, edge, config.get("momentum", 0.0), **kwargs) == pytest.approx(1.0)
    wd = config.get("weight_decay", 0.0)
    assert record["stability_ratio"] == pytest.approx((record["lambda1_H"] + wd) / (edge + wd))


def test_learning_rate_figure_draws_the_rate_and_the_certified_edge(tmp_path):
    from sgdbreak.integrations.plots import plot_learning_rate

    with RunLog(tmp_path) as log:
        log.log_event({"event": "warmup_start", "step": 0, "lr": 0.1})
        log.log_measurement({"step": 1, "lr": 0.1, "stability_ratio": 0.5, "hessian_converged": 1.0})
        log.log_measurement({"step": 2, "lr": 0.2, "stability_ratio": 4.0, "hessian_converged": 0.0})
        log.log_measurement({"step": 3, "lr": 0.2, "stability_ratio": 0.8, "hessian_converged": 1.0})
    result = plot_learning_rate(read_run(tmp_path), tmp_path / "lr", formats=("png",))
    lines = result.figure.axes[0].get_lines()
    edge = [ln for ln in lines if ln.get_linestyle() == "--"]
    np.testing.assert_allclose(edge[0].get_ydata(), [0.2, 0.25])  # the unconverged record is left out
    assert (tmp_path / "lr.png").exists()
    with RunLog(tmp_path / "empty") as log:
        log.log_measurement({"step": 1, "lambda1_H": 2.0})
    with pytest.raises(ValueError, match="learning rate"):
        plot_learning_rate(read_run(tmp_path / "empty"))
