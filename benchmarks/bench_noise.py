"""Cost of one gradient-noise (K) measurement on SimpleCNN, against a plain SGD step.

Variants, each in a fresh subprocess so peak memory (``ru_maxrss`` above the set-up's)
is its own:
  sgd          one torch.optim.SGD step, batch 128 (the unit)
  microbatch   the paper's setting: L = 20 micro-batch gradients of M = 128, + spectrum
  per_example  exact per-example gradients (torch.func) of 1,000 probe examples, + spectrum
  sketched     per-example gradients of 1,000 examples through a CountSketch to 4,096 dims,
               applied chunk by chunk (the (N, D) rows are never formed)

    python benchmarks/bench_noise.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("sgd", "microbatch", "per_example", "sketched")


def child(variant: str, repeat: int) -> None:
    import torch
    from common import setup, sgd_step
    from torch import nn

    from sgdbreak import Probe, covariance_spectrum
    from sgdbreak.estimators.noise import CountSketch
    from sgdbreak.estimators.samples import per_example_gradients

    model, x, y, px, py = setup(probe_size=2560)
    crit = nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    g = torch.Generator().manual_seed(0)

    def sgd():
        sgd_step(model, opt, x, y, g)

    probe = Probe(model, crit, (px, py))
    dim = sum(p.numel() for p in model.parameters())
    sketch = CountSketch(dim, 4096, seed=0)

    def microbatch():
        s = probe.gradient_samples(num_samples=20, batch_size=128, generator=g)
        return covariance_spectrum(s, k=5, scale=128)

    def per_example(sk=None):
        model.eval()  # SimpleCNN has no BN; eval only to be explicit
        # With a sketch, each chunk of 100 rows is sketched as soon as it is computed.
        s = per_example_gradients(model, crit, px[:1000], py[:1000], chunk_size=100, sketch=sk)
        return covariance_spectrum(s, k=5)

    fn = {"sgd": sgd, "microbatch": microbatch, "per_example": per_example,
          "sketched": lambda: per_example(sketch)}[variant]
    sgd()  # warm-up (allocator, threads)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
    print(json.dumps({"variant": variant, "seconds": statistics.median(times), "peak_mb": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--child", choices=VARIANTS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.repeat)
        return
    rows = {}
    for variant in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--repeat",
                              str(args.repeat if variant != "sgd" else 10)],
                             capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    sgd = rows["sgd"]
    print(f"SimpleCNN (28x28 MNIST, 271k params); plain torch.optim.SGD step (batch 128): "
          f"{sgd['seconds'] * 1e3:.1f} ms, peak +{sgd['peak_mb']:.0f} MB")
    print(f"{'variant':>12} {'seconds':>8} {'x SGD step':>10} {'peak MB':>8} {'x SGD peak':>10}")
    for v in VARIANTS[1:]:
        r = rows[v]
        print(f"{v:>12} {r['seconds']:>8.2f} {r['seconds'] / sgd['seconds']:>10.1f} {r['peak_mb']:>8.0f} "
              f"{r['peak_mb'] / max(sgd['peak_mb'], 1):>10.1f}")


if __name__ == "__main__":
    main()
