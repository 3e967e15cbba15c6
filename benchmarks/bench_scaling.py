"""Cost of one full measurement vs model size and probe size, as ratios to a training step.

For each model (three widths of a SimpleCNN-shaped net and an MLP 784-w-w-10 up to
≥ 5 M parameters, on the embedded MNIST images) and probe size, in a fresh subprocess
(so its peak memory is its own), interleaving plain ``torch.optim.SGD`` steps (batch 128)
with measurements and taking medians:

* ``full``: one warm full measurement (λ1^H by warm Lanczos at tol 1e-3 and the noise
  spectrum, L = 20 micro-batches), in SGD steps, with its Hessian-vector products;
* ``hvp``: one bare Hessian-vector product, in SGD steps; ``bookkeeping``: the Lanczos
  solve's time beyond its products, as a fraction of the products' time;
* ``noise / physical``: the noise spectrum (samples + spectrum + ‖g‖/‖g5‖) against its
  physical cost, the L gradient samples plus one L×L Gram product in the samples' dtype;
* ``lambda1_H`` of the first measured point (the same parameters for every probe size, and
  nested probes: what the probe size changes);
* with ``--chunk-size N --rebuild-graph``: the probe in chunks of N with one chunk's graph
  at a time, rebuilt for every product (``Probe(keep_graph=False)``: less memory, slower);
* peak memory of a measurement and of a training step above what was held before it:
  CUDA ``max_memory_allocated``, or on CPU the resident set sampled every millisecond
  (coarse: the allocator may reuse pages it kept).

    python benchmarks/bench_scaling.py [--quick] [--json out.json] [--device cuda] [--chunk-size 64 --rebuild-graph]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

MODELS = {
    # name: (kind, width); cnn-4 and mlp-64 only for the quick (CI) run
    "cnn-4": ("cnn", 4), "mlp-64": ("mlp", 64),
    "cnn-16": ("cnn", 16), "cnn-32": ("cnn", 32), "cnn-64": ("cnn", 64),
    "mlp-256": ("mlp", 256), "mlp-1024": ("mlp", 1024), "mlp-2048": ("mlp", 2048),
}
QUICK = ("cnn-4", "mlp-64")


def build(kind: str, width: int):
    """A SimpleCNN-shaped net with ``width`` channels in its first conv, or an MLP."""
    from torch import nn

    from sgdbreak.workloads.models import MLP

    if kind == "mlp":
        return MLP(784, (width, width), 10, activation="relu")
    return nn.Sequential(
        nn.Conv2d(1, width, 3), nn.ReLU(), nn.Conv2d(width, 2 * width, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 12 * 12, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


class PeakMeter:
    """Peak memory of a block of code above what was held when it began.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` at the start. CPU: the
    process's resident set sampled every millisecond by a thread (after ``malloc_trim``
    returns freed pages), minus the resident set at the start.
    """

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        import threading

        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.start = self.peak = _rss()
        self.running = True

        def sample():
            while self.running:
                self.peak = max(self.peak, _rss())
                time.sleep(0.001)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.start
        else:
            self.running = False
            self.thread.join()
            self.bytes = max(self.peak, _rss()) - self.start
        return False


def _rss() -> int:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(name: str, probe_size: int, repeat: int, device_name: str, chunk_size: int = 256,
          keep_graph: bool = True) -> dict:
    import torch
    from common import setup
    from torch import nn

    from sgdbreak import Probe
    from sgdbreak.estimators.linalg import lanczos
    from sgdbreak.estimators.noise import noise_metrics
    from sgdbreak.measurement import quantities as q
    from sgdbreak.measurement.monitor import BreakEvenMonitor

    device = torch.device(device_name)
    torch.manual_seed(0)
    _, x, y, px, py = setup(probe_size=probe_size)
    x, y = x.to(device), y.to(device)
    model = build(*MODELS[name]).to(device)
    dim = sum(p.numel() for p in model.parameters())
    probe = Probe(model, nn.CrossEntropyLoss(), (px.to(device), py.to(device)), chunk_size=chunk_size,
                  keep_graph=keep_graph)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)

    def sgd(n=1):
        _sync(device)
        t = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(0, len(x), (128,), generator=gen).to(device)
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return (time.perf_counter() - t) / n

    def timed(fn):
        _sync(device)
        t = time.perf_counter()
        out = fn()
        _sync(device)
        return out, time.perf_counter() - t

    sharp, noise = q.Sharpness(), q.GradientNoise()
    mon = BreakEvenMonitor(probe, quantities=[sharp, noise], measure_every=None, cheap_every=None, seed=0)
    sgd(3)
    with PeakMeter(device) as meter:
        sgd(1)
    train_peak = meter.bytes
    mon.measure()  # cold solve, warm-up
    sgd(1)
    with PeakMeter(device) as meter:
        rec = mon.measure()
    measure_peak = meter.bytes
    # Same parameters for every probe size (nothing random has been drawn from ``gen`` by
    # a measurement yet) and nested probes: this column shows what the probe size changes.
    lambda1 = rec["lambda1_H"]
    rows: dict[str, list[float]] = {k: [] for k in ("sgd", "full", "hvps", "hvp", "solve", "samples", "spectrum",
                                                     "gram")}
    rows["hvps"].append(rec["num_hvps"])

    def pieces(rows):
        """One bare product, a warm solve, the noise samples, spectrum and Gram, timed."""
        op = probe.hessian_operator()
        v = torch.randn(dim, generator=gen).to(device)
        op.matvec(v)
        rows["hvp"].append(statistics.median(timed(lambda: op.matvec(v))[1] for _ in range(3)))
        res, t_solve = timed(lambda: lanczos(op, dim, 1, tol=1e-3, max_matvecs=30, init=sharp.warm_vectors,
                                             dtype=v.dtype, device=device))
        rows["solve"].append((t_solve, res.num_matvecs))
        samples, t_samples = timed(lambda: probe.gradient_samples(num_samples=noise.samples,
                                                                  batch_size=noise.batch_size, generator=gen))
        g = probe.gradient()
        rows["samples"].append(t_samples)
        rows["spectrum"].append(timed(lambda: noise_metrics(samples, g, batch_size=noise.batch_size,
                                                            gram_dtype=None))[1])
        rows["gram"].append(timed(lambda: samples @ samples.T)[1])

    for _ in range(repeat):
        rows["sgd"].append(sgd(3))
        rec, t_full = timed(mon.measure)
        rows["full"].append(t_full)
        rows["hvps"].append(rec["num_hvps"])
        sgd(1)
        pieces(rows)

    step = statistics.median(rows["sgd"])
    hvp = statistics.median(rows["hvp"])
    book = statistics.median((t - n * hvp) / (n * hvp) for t, n in rows["solve"])
    noise_s = statistics.median(rows["samples"]) + statistics.median(rows["spectrum"])
    physical = statistics.median(rows["samples"]) + statistics.median(rows["gram"])
    return {
        "model": name, "params": dim, "probe": probe_size, "device": device.type, "lambda1_H": lambda1,
        "chunk_size": probe.chunk_size, "keep_graph": keep_graph,
        "sgd_step_s": step,
        "full_s": statistics.median(rows["full"]), "full_x_step": statistics.median(rows["full"]) / step,
        "hvps_warm": statistics.median(rows["hvps"][1:]), "hvps_first_warm": rows["hvps"][0],
        "hvp_x_step": hvp / step, "bookkeeping": book,
        "noise_x_step": noise_s / step, "noise_x_physical": noise_s / physical,
        "train_peak_mb": train_peak / 2**20, "measure_peak_mb": measure_peak / 2**20,
        "measure_x_train_memory": measure_peak / train_peak if train_peak > 0 else None,
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "cpu resident-set growth",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[m for m in MODELS if m not in QUICK], choices=list(MODELS))
    ap.add_argument("--probe-sizes", nargs="+", type=int, default=[125, 250, 500, 1000],
                    help="probe sizes swept on the middle CNN")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cuda" if _cuda() else "cpu")
    ap.add_argument("--quick", action="store_true", help="two small models, probe 100, one repeat (CI)")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--chunk-size", type=int, default=256, help="the probe's chunk_size (examples per pass)")
    ap.add_argument("--rebuild-graph", action="store_true",
                    help="Probe(keep_graph=False): one chunk's graph at a time, rebuilt for every product "
                         "(less memory, slower)")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        out = child(args.child[0], int(args.child[1]), args.repeat, args.device, args.chunk_size,
                    not args.rebuild_graph)
        print("RESULT " + json.dumps(out))
        return
    if args.quick:
        args.models, args.probe_sizes, args.repeat = list(QUICK), [], 1
    base = 100 if args.quick else 250
    jobs = [(m, base) for m in args.models] + [("cnn-32", n) for n in args.probe_sizes if n != base]
    rows = []
    for name, size in jobs:
        cmd = [sys.executable, __file__, "--child", name, str(size), "--repeat", str(args.repeat),
               "--device", args.device, "--chunk-size", str(args.chunk_size)] + (["--rebuild-graph"] * args.rebuild_graph)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"{name} (probe {size}) failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(line[len("RESULT "):]))
        r = rows[-1]
        print(f"{name:9s} D={r['params']:>9,d} probe {size:4d}: step {r['sgd_step_s'] * 1e3:7.1f} ms, "
              f"full {r['full_x_step']:6.1f} steps ({r['hvps_warm']:.0f} HVPs), HVP {r['hvp_x_step']:5.2f} steps, "
              f"bookkeeping {r['bookkeeping']:+.0%}, noise {r['noise_x_step']:5.1f} steps = "
              f"{r['noise_x_physical']:.2f}x physical, memory {r['measure_peak_mb']:.0f} MB vs step "
              f"{r['train_peak_mb']:.0f} MB, lambda1_H {r['lambda1_H']:.4g}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    """The rows as a Markdown table (ratios to the SGD step of the same model)."""
    head = ("| model | params | probe | SGD step (ms) | full measurement (× step) | warm HVPs | HVP (× step) "
            "| Lanczos bookkeeping | noise (× step) | noise (× physical) | peak MB measure / step | λ1^H |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        mem = r["measure_x_train_memory"]
        lines.append(
            f"| {r['model']} | {r['params']:,} | {_probe_label(r)} | {r['sgd_step_s'] * 1e3:.1f} | {r['full_x_step']:.1f} "
            f"| {r['hvps_warm']:.0f} | {r['hvp_x_step']:.2f} | {r['bookkeeping']:+.0%} | {r['noise_x_step']:.1f} "
            f"| {r['noise_x_physical']:.2f} | {r['measure_peak_mb']:.0f} / {r['train_peak_mb']:.0f}"
            f"{f' ({mem:.1f}×)' if mem else ''} | {r.get('lambda1_H', float('nan')):.4g} |")
    return "\n".join(lines)


def _probe_label(r: dict) -> str:
    """The probe size, with its chunking when not the default (chunks of 256, graph kept)."""
    chunk, keep = r.get("chunk_size", 256), r.get("keep_graph", True)
    if keep and chunk >= min(256, r["probe"]):
        return str(r["probe"])
    return f"{r['probe']} (chunks of {chunk}{'' if keep else ', graph rebuilt per product'})"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.path.insert(0, __import__("os").path.dirname(__file__))
    main()
