"""Figures of break-even measurements, in the style of the paper's figures 2-5.

:func:`plot_run` draws one run (λ1^H against its stability threshold 2(1+β)/η, λ1^K,
Tr K/λ1^K, α*) and :func:`plot_comparison` overlays several runs that differ in learning
rate or batch size (Jastrzebski et al. 2020, Conjectures 1 and 2). Both mark the
break-even point and write PNG and PDF.

matplotlib is imported lazily. Figures are built as ``matplotlib.figure.Figure`` objects
rendered by the Agg (PNG) and PDF canvases, never through ``pyplot``: no display is
needed, the global backend is left alone and nothing accumulates in pyplot's registry.

Examples:
    >>> import tempfile
    >>> from sgdbreak import RunLog
    >>> from sgdbreak.integrations.plots import plot_run
    >>> with tempfile.TemporaryDirectory() as d:
    ...     with RunLog(d, {"lr": 0.1}) as log:
    ...         for s in range(10):
    ...             log.log_measurement({"step": s, "lr": 0.1, "momentum": 0.0,
    ...                                  "lambda1_H": 1.0 + s, "lambda1_K": 0.1 * s + 0.1})
    ...     result = plot_run(d, f"{d}/figure")
    ...     [p.suffix for p in result.paths]
    ['.png', '.pdf']
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..measurement import breakeven as be
from .rundir import Run, read_run
from .summaries import moving_average

__all__ = [
    "PANELS",
    "PlotResult",
    "edge_sharpness",
    "plot_batch_size",
    "plot_comparison",
    "plot_learning_rate",
    "plot_run",
    "run_label",
]

#: Panel keys and their axis labels, in drawing order.
PANELS = {
    "lambda1_H": r"$\lambda_1^H$",
    "lambda1_K": r"$\lambda_1^K$",
    "stable_rank_K": r"$\mathrm{Tr}\,K / \lambda_1^K$",
    "trace_K": r"$\mathrm{Tr}\,K$",
    "alpha_star": r"$\alpha^*$",
}
_RUN_PANELS = ("lambda1_H", "lambda1_K", "stable_rank_K", "alpha_star")
_COMPARISON_PANELS = ("lambda1_H", "lambda1_K", "stable_rank_K", "trace_K")
_LOG_SCALE = ("lambda1_H", "lambda1_K", "trace_K")


class PlotResult(NamedTuple):
    """A rendered figure and the files it was written to (empty without a stem)."""

    figure: Any
    paths: list[Path]


def _as_run(run: Run | str | os.PathLike) -> Run:
    if isinstance(run, Run):
        return run
    if isinstance(run, (str, os.PathLike)):
        return read_run(run)
    raise TypeError(f"expected a Run or a run directory, got {type(run).__name__}")


def edge_sharpness(run: Run, x: str = "step") -> tuple[np.ndarray, np.ndarray]:
    """λ1^H at the edge of stability per record: the dashed line of the figures.

    Read from the records' ``edge_sharpness`` (threshold/η − weight decay, written by the
    monitor with the optimizer's Nesterov, dampening and weight decay), so the line and the
    logged ``stability_ratio`` agree. Records of older runs without it fall back to
    :func:`sgdbreak.measurement.breakeven.stability_threshold` of their ``lr`` and ``momentum``;
    records with neither (Adam's edge is on λ1_PH, ``edge_sharpness_PH``; other optimizers
    have none) get no line.
    Records without a positive ``lr`` are skipped; the learning rate may change mid-run.
    """
    xs, ys = [], []
    for rec in run.records:
        lr, xv, edge = rec.get("lr"), rec.get(x), rec.get("edge_sharpness")
        if not isinstance(lr, (int, float)) or lr <= 0 or not isinstance(xv, (int, float)):
            continue
        if not isinstance(edge, (int, float)):
            beta = rec.get("momentum")
            if not isinstance(beta, (int, float)):
                continue  # not SGD (Adam, others): SGD's line would be wrong
            edge = be.stability_threshold(beta) / lr
        xs.append(float(xv))
        ys.append(float(edge))
    return np.asarray(xs), np.asarray(ys)


def _event_x(run: Run, event: dict, x: str) -> float | None:
    """Position of an event's step on the ``x`` axis (interpolated for ``x != "step"``)."""
    step = event.get("step")
    if not isinstance(step, (int, float)):
        return None
    if x == "step":
        return float(step)
    steps, xs = run.series(x, x="step")
    if steps.size == 0:
        return None
    return float(np.interp(step, steps, xs))


def run_label(run: Run, others: Sequence[Run] = ()) -> str:
    """A label from the config keys whose values differ among ``[run, *others]``.

    Falls back to the directory name when no config key differs.
    """
    configs = [run.config, *(o.config for o in others)]
    keys = sorted({k for c in configs for k in c})
    differing = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]
    parts = [f"{k}={run.config[k]}" for k in differing if k in run.config]
    return ", ".join(parts) if parts else run.name


def _setup_axis(ax: Any, key: str, x: str, values: list[np.ndarray]) -> None:
    ax.set_ylabel(PANELS[key])
    ax.set_xlabel(x)
    if key in _LOG_SCALE:
        all_values = np.concatenate(values) if values else np.array([])
        if all_values.size and np.all(all_values > 0):
            ax.set_yscale("log")
    ax.grid(True, alpha=0.3)


def _save(fig: Any, out_path_stem: str | os.PathLike | None, formats: Sequence[str]) -> list[Path]:
    if out_path_stem is None:
        return []
    stem = Path(out_path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_name(f"{stem.name}.{fmt}")
        fig.savefig(path, format=fmt, dpi=150)
        paths.append(path)
    return paths


def _new_figure(n_panels: int) -> tuple[Any, list[Any]]:
    from matplotlib.figure import Figure

    # Fixed margins in inches instead of constrained layout: same look for these simple
    # panels at less than half the rendering time.
    width, height, gap, left, right = 4.0 * n_panels, 3.4, 0.95, 0.85, 0.2
    axis_width = (width - left - right - (n_panels - 1) * gap) / n_panels
    fig = Figure(figsize=(width, height))
    fig.subplots_adjust(
        left=left / width,
        right=1 - right / width,
        bottom=0.6 / height,
        top=1 - 0.45 / height,
        wspace=gap / axis_width,
    )
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def plot_run(
    run: Run | str | os.PathLike,
    out_path_stem: str | os.PathLike | None = None,
    *,
    x: str = "step",
    window: int = 5,
    formats: Sequence[str] = ("png", "pdf"),
) -> PlotResult:
    """Plot one run: λ1^H with 2(1+β)/η, λ1^K, Tr K/λ1^K and α*, with break-even marked.

    Each panel shows the raw measurements (faint) and their centered moving average
    (``window`` points). Panels without data are left out (α* is often not measured).

    Args:
        run: A :class:`~sgdbreak.integrations.rundir.Run` or a run directory.
        out_path_stem: Write ``<stem>.png`` and ``<stem>.pdf`` (one per ``formats``); ``None``
            writes nothing.
        x: Record key for the horizontal axis (``"step"`` or ``"epoch"``).
        window: Moving-average window.
        formats: File formats to write.

    Returns:
        :class:`PlotResult` ``(figure, paths)``.

    Raises:
        ValueError: if the run has none of the plotted quantities.
    """
    run = _as_run(run)
    series = {key: run.series(key, x=x) for key in _RUN_PANELS}
    keys = [k for k in _RUN_PANELS if series[k][0].size]
    if not keys:
        raise ValueError(
            f"run {run.run_dir} has no {', '.join(_RUN_PANELS)} measurements against {x!r}"
        )
    fig, axes = _new_figure(len(keys))
    event = run.break_even
    event_x = _event_x(run, event, x) if event else None
    for ax, key in zip(axes, keys, strict=True):
        xs, ys = series[key]
        ax.plot(xs, ys, "o", ms=2.5, alpha=0.35, color="C0", label="measured")
        ax.plot(xs, moving_average(ys, window), "-", color="C0", lw=1.6, label="smoothed")
        plotted = [ys]
        if key == "lambda1_H":
            sx, sy = edge_sharpness(run, x=x)
            if sx.size:
                ax.step(
                    sx, sy, where="post", ls="--", color="k", lw=1.0, label=r"$2(1+\beta)/\eta$"
                )
                plotted.append(sy)
        if key == "alpha_star":
            ax.axhline(2.0, ls=":", color="gray", lw=1.0, label=r"$\alpha^* = 2$")
        if event_x is not None:
            ax.axvline(
                event_x, color="C3", ls="-.", lw=1.2, label=f"break-even ({(event or {}).get('rule')})"
            )
        _setup_axis(ax, key, x, plotted)
    axes[0].legend(fontsize=7)
    fig.suptitle(run_label(run), fontsize=10)
    paths = _save(fig, out_path_stem, formats)
    return PlotResult(fig, paths)


def plot_comparison(
    runs: Sequence[Run | str | os.PathLike],
    labels: Sequence[str] | None = None,
    out_path_stem: str | os.PathLike | None = None,
    *,
    x: str = "step",
    window: int = 5,
    formats: Sequence[str] = ("png", "pdf"),
) -> PlotResult:
    """Overlay several runs (e.g. different η or S), as in the paper's figures 2-5.

    Panels λ1^H, λ1^K, Tr K/λ1^K and Tr K (those with data in some run) show each run's
    smoothed curve in its own colour, with its break-even point as a dotted vertical line
    and, on the λ1^H panel, its threshold 2(1+β)/η dashed.

    Args:
        runs: Runs or run directories.
        labels: One label per run; default from the config keys that differ
            (:func:`run_label`).
        out_path_stem: Write ``<stem>.png``/``.pdf``; ``None`` writes nothing.
        x: Record key for the horizontal axis.
        window: Moving-average window.
        formats: File formats to write.

    Returns:
        :class:`PlotResult` ``(figure, paths)``.
    """
    loaded = [_as_run(r) for r in runs]
    if not loaded:
        raise ValueError("plot_comparison needs at least one run")
    if labels is None:
        labels = [run_label(r, [o for o in loaded if o is not r]) for r in loaded]
    elif len(labels) != len(loaded):
        raise ValueError(f"got {len(labels)} labels for {len(loaded)} runs")
    series = [{key: r.series(key, x=x) for key in _COMPARISON_PANELS} for r in loaded]
    keys = [k for k in _COMPARISON_PANELS if any(s[k][0].size for s in series)]
    if not keys:
        raise ValueError(f"none of the runs has {', '.join(_COMPARISON_PANELS)} measurements")
    fig, axes = _new_figure(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        plotted = []
        for i, (run, label, s) in enumerate(zip(loaded, labels, series, strict=True)):
            color = f"C{i % 10}"
            xs, ys = s[key]
            if xs.size:
                ax.plot(xs, ys, "-", color=color, lw=0.6, alpha=0.25)
                ax.plot(xs, moving_average(ys, window), "-", color=color, lw=1.6, label=label)
                plotted.append(ys)
            if key == "lambda1_H":
                sx, sy = edge_sharpness(run, x=x)
                if sx.size:
                    ax.step(sx, sy, where="post", ls="--", color=color, lw=0.8)
                    plotted.append(sy)
            event = run.break_even
            event_x = _event_x(run, event, x) if event else None
            if event_x is not None:
                ax.axvline(event_x, color=color, ls=":", lw=1.2)
        _setup_axis(ax, key, x, plotted)
    axes[0].legend(fontsize=7, title="dotted: break-even", title_fontsize=7)
    paths = _save(fig, out_path_stem, formats)
    return PlotResult(fig, paths)


def plot_learning_rate(
    run: Run | str | os.PathLike,
    out_path_stem: str | os.PathLike | None = None,
    *,
    x: str = "step",
    formats: Sequence[str] = ("png", "pdf"),
) -> PlotResult:
    """The learning rate in force against the edge-of-stability rate, η_edge = η / stability ratio.

    The edge comes from every record with a converged ``stability_ratio`` (threshold/λ1^H
    for SGD, the preconditioned λ1^PH for Adam); a run driven by
    :class:`~sgdbreak.BreakEvenWarmup` stays below it until its hand-off, marked with
    break-even. Log scale.

    Raises:
        ValueError: if the run has no records with a learning rate.
    """
    run = _as_run(run)
    lr_x, lrs = run.series("lr", x=x)
    if not lr_x.size:
        raise ValueError(f"run {run.run_dir} has no records with a learning rate against {x!r}")
    edge_x, edges = [], []
    for rec in run.records:
        lr, ratio, xv = rec.get("lr"), rec.get("stability_ratio"), rec.get(x)
        converged = rec.get("hessian_converged", rec.get("preconditioned_converged", 1.0))
        if (isinstance(lr, (int, float)) and isinstance(ratio, (int, float)) and isinstance(xv, (int, float))
                and ratio > 0 and converged):
            edge_x.append(float(xv))
            edges.append(lr / ratio)
    fig, (ax,) = _new_figure(1)
    ax.step(lr_x, lrs, where="post", color="C0", lw=1.6, label=r"$\eta_t$")
    if edges:
        ax.plot(edge_x, edges, "o--", ms=3, color="k", lw=1.0, label=r"$\eta_{edge}$ = threshold / $\lambda_1$")
    for event in run.events:
        if event.get("event") in ("break_even", "warmup_handoff"):
            ex = _event_x(run, event, x)
            if ex is not None:
                ax.axvline(ex, color="C3" if event["event"] == "break_even" else "C2", ls=":",
                           label=event["event"].replace("_", " "))
    values = np.concatenate([lrs, np.asarray(edges)]) if edges else lrs
    if np.all(values > 0):
        ax.set_yscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel("learning rate")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return PlotResult(fig, _save(fig, out_path_stem, formats))


def plot_batch_size(
    run: Run | str | os.PathLike,
    out_path_stem: str | os.PathLike | None = None,
    *,
    x: str = "step",
    formats: Sequence[str] = ("png", "pdf"),
) -> PlotResult:
    """The batch size S over the run (log scale) and the learning-rate factor, with break-even.

    Reads the ``batch_size`` / ``lr_factor`` records that
    :class:`~sgdbreak.BatchSizeController` logs at its start and at every change (a step
    function, drawn to the run's last record).

    Raises:
        ValueError: if the run has no ``batch_size`` records.
    """
    run = _as_run(run)
    xs, sizes = run.series("batch_size", x=x)
    if not xs.size:
        raise ValueError(f"run {run.run_dir} has no batch_size records against {x!r}")
    end = max([float(r[x]) for r in run.records if isinstance(r.get(x), (int, float))] + [float(xs[-1])])
    fx, factors = run.series("lr_factor", x=x)
    fig, (ax,) = _new_figure(1)
    ax.step(np.append(xs, end), np.append(sizes, sizes[-1]), where="post", color="C0", lw=1.8, label="S")
    ax.set_yscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel("batch size S")
    ax.grid(True, alpha=0.3)
    event = run.break_even
    event_x = _event_x(run, event, x) if event else None
    if event_x is not None:
        ax.axvline(event_x, color="C3", ls="-.", lw=1.2, label="break-even")
    if fx.size:
        twin = ax.twinx()
        twin.step(np.append(fx, end), np.append(factors, factors[-1]), where="post", color="C1", ls="--",
                  lw=1.2, label="lr factor")
        twin.set_ylabel("learning-rate factor")
        handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
        ax.legend(handles, [h.get_label() for h in handles], fontsize=8, loc="upper left")
    else:
        ax.legend(fontsize=8)
    return PlotResult(fig, _save(fig, out_path_stem, formats))
