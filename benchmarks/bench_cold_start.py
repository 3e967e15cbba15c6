"""Cold λ1^H solves at initialization, where the top two Hessian eigenvalues nearly coincide.

SimpleCNN at its Glorot initialization on the embedded MNIST images (probe 250): the
monitor's first measurement is a cold Lanczos solve. For several seeds and start-block
sizes, the products a solve at ``--tol`` takes and its relative error against a tight
reference (k = 5 at tol 1e-6). With a top gap of a few per cent a solve may settle on the
second eigenvalue: its residual is then small too, so no stopping test can tell.

    python benchmarks/bench_cold_start.py [--seeds 8] [--block-sizes 1 3] [--tol 1e-3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import setup, table
from torch import nn

from sgdbreak import Probe
from sgdbreak.estimators.linalg import lanczos


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-size", type=int, default=250)
    ap.add_argument("--seeds", type=int, default=8)
    ap.add_argument("--block-sizes", type=int, nargs="+", default=[1, 3])
    ap.add_argument("--tol", type=float, default=1e-3)
    args = ap.parse_args()
    model, _, _, px, py = setup(probe_size=args.probe_size)
    probe = Probe(model, nn.CrossEntropyLoss(), (px, py))
    rows = []
    with probe.measuring():
        op = probe.hessian_operator()
        ref = lanczos(op, op.dim, 5, tol=1e-6, max_matvecs=100, generator=torch.Generator().manual_seed(0))
        top = ref.eigenvalues.tolist()
        print(f"reference top 5 ({ref.num_matvecs} products): " + ", ".join(f"{t:.4g}" for t in top)
              + f"; gap (λ1 − λ2)/λ1 = {(top[0] - top[1]) / top[0]:.2%}")
        for block in args.block_sizes:
            runs = []
            for seed in range(1, args.seeds + 1):
                res = lanczos(op, op.dim, 1, tol=args.tol, max_matvecs=40, block_size=block,
                              generator=torch.Generator().manual_seed(seed))
                runs.append((res.num_matvecs, abs(res.eigenvalues[0].item() / top[0] - 1)))
            errors = [e for _, e in runs]
            rows.append({"start block": block, "median HVPs": statistics.median(n for n, _ in runs),
                         "max HVPs": max(n for n, _ in runs), "median rel. error": statistics.median(errors),
                         "max rel. error": max(errors), "solves off by > 10×tol": sum(e > 10 * args.tol for e in errors),
                         "seeds": len(runs)})
    print(table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
