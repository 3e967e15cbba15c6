"""A block of Hessian-vector products: one batched double backward vs one per vector.

``HessianOperator(..., batched=True).matmat`` multiplies a (b, D) block with
``torch.autograd.grad(..., is_grads_batched=True)`` (vmap over the backward graph);
Lanczos uses it for its warm-start block (k + 2 = 3 vectors by default). Timed against
plain ``torch.optim.SGD`` steps (batch 128) of the same model, interleaved, medians.

    python benchmarks/bench_batched_hvp.py [--block 3] [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import setup, sgd_step, sync
from torch import nn

from sgdbreak.estimators.hessian import HessianOperator
from sgdbreak.workloads.models import MLP, SimpleCNN


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--block", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--probe-size", type=int, default=250)
    args = ap.parse_args()
    _, x, y, px, py = setup(probe_size=args.probe_size)
    torch.manual_seed(0)
    models = {"SimpleCNN": SimpleCNN(1, 10, 28), "MLP 784-1024-1024-10": MLP(784, (1024, 1024), 10, activation="relu")}
    for name, model in models.items():
        crit = nn.CrossEntropyLoss()
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the point stays fixed
        gen = torch.Generator().manual_seed(0)
        dim = sum(p.numel() for p in model.parameters())
        block = torch.randn(args.block, dim, generator=gen)
        times = {"sgd": [], "one per vector": [], "batched": []}
        for _ in range(args.repeat):
            for label in times:
                sync()
                start = time.perf_counter()
                if label == "sgd":
                    sgd_step(model, opt, x, y, gen)
                else:
                    op = HessianOperator(lambda m=model, c=crit: c(m(px), py), list(model.parameters()),
                                         batched=label == "batched")
                    sync()
                    start = time.perf_counter()  # the products only, not the graph
                    op.matmat(block)
                sync()
                times[label].append(time.perf_counter() - start)
        step = statistics.median(times["sgd"])
        loop, batched = statistics.median(times["one per vector"]), statistics.median(times["batched"])
        print(f"{name} ({dim:,} parameters), block {args.block}, probe {args.probe_size}: SGD step {step * 1e3:.1f} ms; "
              f"one per vector {loop / step:.1f} steps, batched {batched / step:.1f} steps "
              f"(batched/one-per-vector = {batched / loop:.2f})", flush=True)


if __name__ == "__main__":
    main()
