"""Shared set-up for the benchmarks: SimpleCNN on the embedded MNIST images, timing helpers.

Every benchmark reports its costs as a ratio against plain ``torch.optim.SGD`` training
steps timed in the same process, so numbers from different machines compare.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgdbreak.workloads import datasets, models  # noqa: E402


def setup(num_examples: int = 5000, probe_size: int = 1000, seed: int = 0):
    """SimpleCNN (28×28 MNIST, Glorot init), the data and a random probe subset."""
    torch.manual_seed(seed)
    x, y = datasets.load_mnist_embedded(num_examples, seed=seed)
    model = models.SimpleCNN(1, 10, 28)
    px, py = datasets.random_subset(x, y, probe_size, generator=torch.Generator().manual_seed(seed + 1))
    return model, x, y, px, py


def sgd_step(model: nn.Module, opt: torch.optim.Optimizer, x, y, generator: torch.Generator,
             batch_size: int = 128) -> None:
    """One training step on a random batch: the unit every benchmark is measured in."""
    idx = torch.randint(0, len(x), (batch_size,), generator=generator)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    opt.step()


def sync() -> None:
    """Wait for the GPU (timings of CUDA work are meaningless without it); no-op on CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_sgd_steps(model: nn.Module, x, y, *, batch_size: int = 128, steps: int = 20, lr: float = 0.01) -> float:
    """Median seconds of one plain ``torch.optim.SGD`` step (forward, backward, update)."""
    params = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        sync()
        t = time.perf_counter()
        sgd_step(model, opt, x, y, g, batch_size)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - t)
    with torch.no_grad():
        for p, q in zip(model.parameters(), params):
            p.copy_(q)
    for p in model.parameters():
        p.grad = None
    return statistics.median(times)


def timed(fn, repeat: int = 1):
    """(result of the last call, median seconds)."""
    times, out = [], None
    for _ in range(repeat):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


def pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend, or None (and a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no figure")
        return None
    return plt


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table."""
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    for r in rows:
        lines.append("  ".join(_fmt(r.get(c)).rjust(widths[c]) for c in columns))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A Markdown table of ``columns`` (a missing value is "–"; floats to 3 significant digits)."""
    def fmt(v) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
