"""Lanczos bookkeeping: a warm solve's time beyond its Hessian-vector products.

For an MLP 784-w-w-10 on the embedded MNIST images (probe 250), one warm λ1^H solve at
tol 1e-3 one SGD step after the previous one. The products are timed inside the solve
(the operator's ``matvec`` is wrapped), so "bookkeeping" is exactly the rest: projections,
residuals, Gram-Schmidt, buffers. Reported in plain ``torch.optim.SGD`` steps (batch 128)
of the same model timed in the same run, and as a share of the products' time (goal of
issue 14: ≤ 30 %). Medians over ``--repeat`` solves.

    python benchmarks/bench_lanczos_bookkeeping.py [--widths 256 1024 2048] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import setup, table, time_sgd_steps
from torch import nn

from sgdbreak import Probe
from sgdbreak.estimators import hessian as H


def mlp(width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, 10))


class TimedOperator:
    """Wraps a Hessian operator's ``matvec`` and adds up the seconds spent in it."""

    def __init__(self, op):
        self.op, self.seconds = op, 0.0

    def __call__(self, v):
        start = time.perf_counter()
        out = self.op.matvec(v)
        self.seconds += time.perf_counter() - start
        return out


def measure(width: int, repeat: int, x, y, px, py) -> dict:
    model = mlp(width)
    step = time_sgd_steps(model, x, y)
    probe = Probe(model, nn.CrossEntropyLoss(), (px, py))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    rows = []
    previous = probe.hessian_eigenvalues(tol=1e-3, generator=torch.Generator().manual_seed(1))
    for _ in range(repeat):
        idx = torch.randint(0, len(x), (128,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        opt.zero_grad()
        with probe.measuring():
            op = probe.hessian_operator()
            timed = TimedOperator(op)
            start = time.perf_counter()
            previous = H.eigenvalues_of_operator(timed, op.dim, 1, warm_start=previous, dtype=op.dtype)
            total = time.perf_counter() - start
        rows.append((total, timed.seconds, previous.num_hvps))
    total, products, hvps = (statistics.median(r[i] for r in rows) for i in range(3))
    return {"width": width, "params": sum(p.numel() for p in model.parameters()), "hvps": hvps,
            "solve (SGD steps)": total / step, "products (SGD steps)": products / step,
            "bookkeeping / products": (total - products) / products}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 2048])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    _, x, y, px, py = setup(probe_size=250)
    rows = [measure(w, args.repeat, x, y, px, py) for w in args.widths]
    print(table(rows, ["width", "params", "hvps", "solve (SGD steps)", "products (SGD steps)",
                       "bookkeeping / products"]))


if __name__ == "__main__":
    main()
