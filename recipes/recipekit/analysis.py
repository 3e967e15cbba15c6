"""After the grid: per-epoch tables, figures, trajectory distances, correlations.

Functions of run directories (``sgdbreak.read_run``), shared by the recipes' ``analyze``.
Figures use matplotlib's object API (no pyplot state), imported lazily.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sgdbreak.integrations.rundir import read_run
from sgdbreak.integrations.summaries import series_values

from .grid import fmt

__all__ = [
    "comparison_figure",
    "new_figure",
    "per_epoch_table",
    "series",
    "spearman",
    "trajectory_projection",
]


def series(run_dir: Path, key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of ``key`` (derived keys too) where both are finite."""
    run = read_run(run_dir)
    values = series_values(run.records, key)
    pts = [(r.get("step"), v) for r, v in zip(run.records, values, strict=True)
           if v is not None and r.get("step") is not None]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts, strict=True)
    return np.asarray(steps, dtype=float), np.asarray(vals, dtype=float)


def per_epoch_table(runs: Sequence[tuple], keys: Sequence[str], path: Path | None = None) -> list[dict]:
    """Each quantity per epoch: mean over the epoch's measurements, then mean over seeds.

    Rows are ``{"model", "lr", "batch_size", "epoch", key: value, "seeds": n}``, epoch
    ``e`` holding steps in ``((e − 1)·steps_per_epoch, e·steps_per_epoch]``. Written to
    ``path`` as CSV and printed.
    """
    cells: dict[tuple, list[dict]] = defaultdict(list)
    for spec, run_dir, _summary in runs:
        run = read_run(run_dir)
        per = run.config.get("steps_per_epoch") or 1
        rows: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for key in keys:
            for rec, value in zip(run.records, series_values(run.records, key), strict=True):
                if value is not None and rec.get("step") is not None:
                    rows[max(1, math.ceil(rec["step"] / per))][key].append(value)
        cells[(spec.model, spec.lr, run.config.get("batch_size", spec.batch_size))].append(
            {e: {k: float(np.mean(v)) for k, v in d.items()} for e, d in rows.items()})
    table = []
    for (model, lr, bs), seeds in cells.items():
        for epoch in sorted({e for s in seeds for e in s}):
            row: dict[str, Any] = {"model": model, "lr": lr, "batch_size": bs, "epoch": epoch}
            for key in keys:
                vals = [s[epoch][key] for s in seeds if epoch in s and key in s[epoch]]
                row[key] = float(np.mean(vals)) if vals else None
            row["seeds"] = len(seeds)
            table.append(row)
    if path is not None and table:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
    print(f"\nper epoch (mean over the epoch's measurements, then over seeds){f'; written to {path}' if path else ''}")
    header = ["model", "lr", "S", "epoch", *keys]
    lines = [header] + [[r["model"], fmt(r["lr"], "g"), str(r["batch_size"]), str(r["epoch"]),
                         *(fmt(r[k]) for k in keys)] for r in table]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(v.rjust(w) for v, w in zip(line, widths, strict=True)))
    return table


def new_figure(rows: int, cols: int, size: tuple[float, float] = (4.0, 3.0)):
    """A matplotlib Figure (Agg canvas, no pyplot) and its axes as a flat list."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - matplotlib is in the recipes extra
        raise ImportError("the recipes' figures need matplotlib: pip install 'sgdbreak[plots]'") from err
    fig = Figure(figsize=(size[0] * cols, size[1] * rows), constrained_layout=True)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def save(fig, stem: Path) -> list[str]:
    """Write ``stem``.png and .pdf; returns the paths."""
    paths = []
    for suffix in ("png", "pdf"):
        path = stem.with_suffix(f".{suffix}")
        fig.savefig(path, dpi=120)
        paths.append(str(path))
    return paths


def comparison_figure(runs: Sequence[tuple], stem: Path, keys: Sequence[str] = (
        "lambda1_K", "stable_rank_K", "lambda1_H", "top5_ratio_H"), *, window: int = 5) -> list[str]:
    """Smoothed curves of ``keys`` against epoch, one line per (model, η, S), first seed only."""
    from sgdbreak.integrations.summaries import moving_average

    first_seed = min(spec.seed for spec, _, _ in runs)
    chosen = [(spec, d) for spec, d, _ in runs if spec.seed == first_seed]
    keys = [k for k in keys if any(series(d, k)[1].size for _, d in chosen)]  # panels with data only
    if not keys:
        return []
    fig, axes = new_figure(1, len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for spec, run_dir in chosen:
            steps, vals = series(run_dir, key)
            if vals.size == 0:
                continue
            per = read_run(run_dir).config.get("steps_per_epoch") or 1
            models = {s.model for s, _ in chosen}
            label = (f"{spec.model} " if len(models) > 1 else "") + f"η={spec.lr:g} S={spec.batch_size}"
            ax.plot(steps / per, moving_average(vals, min(window, vals.size)), label=label)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        if key in ("lambda1_K", "lambda1_H"):
            ax.set_yscale("log")
    axes[0].legend(fontsize=7)
    return save(fig, stem)


def spearman(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Spearman rank correlation (None with fewer than 3 pairs or a constant series)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def trajectory_projection(*trajectories: np.ndarray) -> list[np.ndarray]:
    """Project parameter trajectories (T_i, D) onto the top-2 principal axes of all their points."""
    stacked = np.concatenate(trajectories, axis=0).astype(np.float64)
    center = stacked.mean(axis=0)
    _, _, vt = np.linalg.svd(stacked - center, full_matrices=False)
    axes = vt[:2].T
    return [(t - center) @ axes for t in trajectories]
