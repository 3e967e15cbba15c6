"""Hessian-vector product cost on SimpleCNN by probe chunk size, in plain SGD steps.

Backs the default ``Probe(chunk_size=256)``: the probe loss is evaluated chunk by chunk,
and smaller chunks can be faster per example on a CPU (cache-sized activations).

    python benchmarks/bench_probe_chunks.py [--probe-size 1000] [--chunks 1000 512 256 128]
"""

from __future__ import annotations

import argparse

import torch
from common import setup, table, time_sgd_steps, timed
from torch import nn

from sgdbreak import Probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-size", type=int, default=1000)
    ap.add_argument("--chunks", type=int, nargs="+", default=[1000, 512, 256, 128])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    model, x, y, px, py = setup(probe_size=args.probe_size)
    sgd = time_sgd_steps(model, x, y)
    v = torch.randn(sum(p.numel() for p in model.parameters()), generator=torch.Generator().manual_seed(0))
    rows = []
    for chunk in args.chunks:
        probe = Probe(model, nn.CrossEntropyLoss(), (px, py), chunk_size=chunk)
        with probe.measuring():
            op, graph = timed(probe.hessian_operator)
            _, hvp = timed(lambda op=op: op(v), repeat=args.repeat)
        rows.append({"chunk_size": chunk, "graph s": graph, "graph x SGD": graph / sgd,
                     "HVP s": hvp, "HVP x SGD": hvp / sgd})
    print(f"SimpleCNN (28x28 MNIST), probe {args.probe_size}; plain torch.optim.SGD step (batch 128): "
          f"{sgd * 1e3:.1f} ms")
    print(table(rows, ["chunk_size", "graph s", "graph x SGD", "HVP s", "HVP x SGD"]))


if __name__ == "__main__":
    main()
