"""Cold λ1^H solves: random start blocks against the probe gradient plus random vectors.

The monitor's first measurement is a cold Lanczos solve. At SimpleCNN's initialization the
top two Hessian eigenvalues nearly coincide, and a solve from random vectors may settle on
the second: its residual is small too, so no stopping test can tell. Early in training
the gradient lies mostly in the top Hessian eigenspace, so a start block holding it sees
the top eigenvector from the first product. For several training points (SGD steps at
``--lr`` from the initialization) and seeds: products per solve at ``--tol`` and the
relative error against the largest of a tight k = 5 solve and every solve's value (Ritz
values are lower bounds on λ1, so the largest is the best reference there is).

    python benchmarks/bench_cold_start.py [--model simplecnn|mlp] [--steps 0 40] [--seeds 8]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import setup, sgd_step, table
from torch import nn

from sgdbreak import Probe
from sgdbreak.estimators.linalg import lanczos
from sgdbreak.workloads.models import MLP

STARTS = {  # name: (use the probe gradient, random vectors)
    "random, 1 vector": (False, 1),
    "random, 3 vectors": (False, 3),
    "gradient + 1 random": (True, 1),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="simplecnn", choices=["simplecnn", "mlp"],
                    help="SimpleCNN, or an MLP 784-1024-1024-10")
    ap.add_argument("--probe-size", type=int, default=250)
    ap.add_argument("--steps", type=int, nargs="+", default=[0, 40], help="training points: SGD steps done")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    model, x, y, px, py = setup(probe_size=args.probe_size)
    if args.model == "mlp":
        torch.manual_seed(0)
        model = MLP(784, (1024, 1024), 10, activation="relu")
    probe = Probe(model, nn.CrossEntropyLoss(), (px, py))
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(0)
    rows, done = [], 0
    for point in sorted(args.steps):
        for _ in range(point - done):
            sgd_step(model, opt, x, y, gen)
        done = point
        with probe.measuring():
            op = probe.hessian_operator()
            gradient = op.gradient
            ref = lanczos(op, op.dim, 5, tol=1e-6, max_matvecs=100, generator=torch.Generator().manual_seed(0))
            runs: dict[str, list[tuple[int, float]]] = {}
            for name, (with_gradient, randoms) in STARTS.items():
                runs[name] = []
                for seed in range(1, args.seeds + 1):
                    res = lanczos(op, op.dim, 1, tol=args.tol, max_matvecs=60, generator=torch.Generator().manual_seed(seed),
                                  init=gradient if with_gradient else None,
                                  block_size=randoms + (1 if with_gradient else 0))
                    runs[name].append((res.num_matvecs, res.eigenvalues[0].item()))
        top = max([ref.eigenvalues[0].item()] + [value for r in runs.values() for _, value in r])
        eigs = ref.eigenvalues.tolist()
        print(f"step {point}: lambda1 {top:.5g}, reference top 5 ({ref.num_matvecs} products) "
              + ", ".join(f"{e:.4g}" for e in eigs) + f"; gap (λ1 − λ2)/λ1 = {(eigs[0] - eigs[1]) / eigs[0]:.2%}",
              flush=True)
        for name, r in runs.items():
            errors = [abs(value / top - 1) for _, value in r]
            rows.append({"step": point, "start": name, "median HVPs": statistics.median(n for n, _ in r),
                         "max HVPs": max(n for n, _ in r), "median rel. error": statistics.median(errors),
                         "max rel. error": max(errors), "off by > 10×tol": sum(e > 10 * args.tol for e in errors),
                         "seeds": len(r)})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
