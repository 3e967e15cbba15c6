"""Two exact Hessian-vector products on SimpleCNN, in plain SGD steps timed in the same run.

* ``double backward``: the gradient graph built once (``create_graph=True``) and a backward
  pass through it per product, as :class:`sgdbreak.estimators.hessian.HessianOperator` does;
* ``forward-over-reverse``: ``torch.func.jvp`` of ``torch.func.grad`` (no stored graph, the
  forward and backward passes redone with tangents for every product).

Also the probe gradient and the graph itself, for scale. Medians of ``--repeat`` calls on
the 250-example probe; the two products are checked to agree.

    python benchmarks/bench_hvp_methods.py [--probe-size 250] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import setup, time_sgd_steps
from torch import nn
from torch.func import functional_call, grad, jvp


def median_seconds(fn, repeat: int):
    times, out = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return out, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-size", type=int, default=250)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    model, x, y, px, py = setup(probe_size=args.probe_size)
    step = time_sgd_steps(model, x, y)
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    v = [torch.randn_like(p) for p in params]

    def loss():
        return nn.functional.cross_entropy(model(px), py)

    _, t_grad = median_seconds(lambda: torch.autograd.grad(loss(), params), args.repeat)
    _, t_graph = median_seconds(lambda: torch.autograd.grad(loss(), params, create_graph=True), args.repeat)
    graph = torch.autograd.grad(loss(), params, create_graph=True)
    hv_double, t_double = median_seconds(
        lambda: torch.autograd.grad(graph, params, grad_outputs=v, retain_graph=True), args.repeat)

    def loss_of(weights):
        return nn.functional.cross_entropy(functional_call(model, weights, (px,)), py)

    primal = {n: p.detach() for n, p in zip(names, params)}
    tangent = dict(zip(names, v))
    hv_fwd, t_fwd = median_seconds(lambda: jvp(grad(loss_of), (primal,), (tangent,))[1], args.repeat)
    worst = max(float((a - hv_fwd[n]).abs().max() / a.abs().max()) for a, n in zip(hv_double, names))
    print(f"SimpleCNN, probe {args.probe_size}, {torch.get_num_threads()} thread(s); plain torch.optim.SGD step "
          f"(batch 128): {step * 1e3:.1f} ms")
    for label, seconds in (("probe gradient", t_grad), ("gradient graph (create_graph)", t_graph),
                           ("HVP, double backward (graph kept)", t_double),
                           ("HVP, forward-over-reverse (torch.func)", t_fwd)):
        print(f"  {label:40s} {seconds * 1e3:8.1f} ms = {seconds / step:5.2f} SGD steps")
    print(f"  largest relative difference between the two products: {worst:.1e}")


if __name__ == "__main__":
    main()
