"""Cost of distributed measurements per process with 1 and 2 processes, against plain SGD.

Run ``python benchmarks/bench_distributed.py`` (CPU, gloo). It launches itself with
``python -m torch.distributed.run --standalone --nproc_per_node P`` for each P, and in
every run times, per process: a plain data-parallel ``torch.optim.SGD`` step (global
batch 64, so 64/P per process, DDP with P > 1), one Hessian-vector product on the split
probe (from a 10-product Lanczos), the micro-batch noise samples (L = 16, M = 16), a full
monitor measurement (λ1^H + noise spectrum), and :class:`ReplicaNoise` on a training step
(P = 1: two accumulation micro-batches). It counts the payload each process hands to
collectives per measurement. Times are medians over repeats, the slowest process's.

Model: the paper's SimpleCNN at 8×8 inputs (74,602 parameters), probe of 512 examples.
On a shared 2-core machine the numbers move by tens of percent between runs: read the
ratios, and rerun before drawing conclusions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

PROBE_SIZE = 512
GLOBAL_BATCH = 64
NOISE_SAMPLES = 16
NOISE_BATCH = 16
HVPS = 10


def _median_time(fn, repeats: int) -> dict[str, float]:
    """Median wall-clock and CPU seconds of ``fn()`` (CPU time shows the work a process does
    even when the machine is shared)."""
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"wall": statistics.median(wall), "cpu": statistics.median(cpu)}


def worker(out_dir: Path, repeats: int) -> None:
    """One process of a run: time everything and write rank{r}.json."""
    import torch.distributed as dist

    from sgdbreak import BreakEvenMonitor
    from sgdbreak.integrations.collectives import check_world_size
    from sgdbreak.integrations.distributed_probe import DistributedProbe
    from sgdbreak.integrations.replica_noise import ReplicaNoise
    from sgdbreak.workloads.models import SimpleCNN

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    size = check_world_size()
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = SimpleCNN(1, 10, 8)
    dim = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(PROBE_SIZE + 4096, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (PROBE_SIZE + 4096,), generator=g)
    criterion = nn.CrossEntropyLoss()
    probe = DistributedProbe(model, criterion, (x[:PROBE_SIZE], y[:PROBE_SIZE]), split=True)
    local = GLOBAL_BATCH // size
    out: dict = {"world_size": size, "dim": dim, "local_batch": local}

    # Plain data-parallel SGD step (the unit of cost).
    train_model = nn.parallel.DistributedDataParallel(model) if size > 1 else model
    sgd = torch.optim.SGD(model.parameters(), lr=1e-4)
    cursor = [0]

    def sgd_step():
        start = PROBE_SIZE + (cursor[0] * GLOBAL_BATCH) % 4096 + rank * local
        cursor[0] += 1
        sgd.zero_grad()
        criterion(train_model(x[start : start + local]), y[start : start + local]).backward()
        sgd.step()

    sgd_step()
    out["sgd_step"] = _median_time(sgd_step, 10 * repeats)

    def lanczos():
        probe.communication.reset()
        res = probe.hessian_eigenvalues(k=1, tol=1e-14, max_hvps=HVPS,
                                        generator=torch.Generator().manual_seed(2))
        out["hvp_count"] = res.num_hvps
        out["lanczos_comm"] = probe.communication.as_dict()

    out["lanczos"] = _median_time(lanczos, repeats)
    out["hvp"] = {k: v / out["hvp_count"] for k, v in out["lanczos"].items()}

    def noise():
        probe.communication.reset()
        probe.gradient_samples(num_samples=NOISE_SAMPLES, batch_size=NOISE_BATCH,
                               generator=torch.Generator().manual_seed(3))
        out["noise_comm"] = probe.communication.as_dict()

    out["noise"] = _median_time(noise, repeats)
    local_probe = DistributedProbe(model, criterion, (x[:PROBE_SIZE], y[:PROBE_SIZE]), split=True,
                                   microbatches="local")
    out["noise_local"] = _median_time(lambda: local_probe.gradient_samples(
        num_samples=NOISE_SAMPLES, batch_size=NOISE_BATCH, generator=torch.Generator().manual_seed(3)), repeats)

    monitor = BreakEvenMonitor(probe, measure_every=1, cheap_every=None, measurements=("hessian", "noise"),
                               max_hvps=HVPS, hessian_tol=1e-14, noise_samples=NOISE_SAMPLES,
                               noise_batch_size=NOISE_BATCH, seed=4)

    def measure():
        probe.communication.reset()
        monitor.measure(full=True)
        out["measure_comm"] = probe.communication.as_dict()

    out["measure"] = _median_time(measure, repeats)

    # Replica noise on a training step: P = 2 replicas, or A = 2 micro-batches on one process.
    replica_net = SimpleCNN(1, 10, 8)
    replica_model = nn.parallel.DistributedDataParallel(replica_net) if size > 1 else replica_net
    accum = 1 if size > 1 else 2
    per = GLOBAL_BATCH // (size * accum)
    replica_opt = torch.optim.SGD(replica_model.parameters(), lr=1e-4)
    replica = None

    def replica_step():
        replica_opt.zero_grad()
        for a in range(accum):
            start = PROBE_SIZE + (a * size + rank) * per
            loss = criterion(replica_model(x[start : start + per]), y[start : start + per]) / accum
            loss.backward()
            if replica is not None:
                replica.after_backward()
        replica_opt.step()

    replica_step()
    out["replica_plain_step"] = _median_time(replica_step, 5 * repeats)
    # Registers DDP's communication hook: from here on every step keeps the local gradient.
    replica = ReplicaNoise(replica_model, batch_size=per, accumulation_steps=accum)
    replica_step()
    replica.communication.reset()
    out["replica_step"] = _median_time(replica_step, 5 * repeats)
    out["replica_comm"] = {k: v // (5 * repeats) for k, v in replica.communication.as_dict().items()}

    (out_dir / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


def launch(processes: int, repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(processes), __file__, "--worker", tmp, "--repeats", str(repeats)]
        subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        return [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(processes)]


def _slowest(results: list[dict], key: str, clock: str) -> float:
    return max(r[key][clock] for r in results)


def report(runs: dict[int, list[dict]]) -> str:
    sizes = sorted(runs)
    first = runs[sizes[0]][0]
    lines = [
        f"SimpleCNN 8x8, D = {first['dim']:,} parameters; probe {PROBE_SIZE} examples split over P "
        f"processes; SGD global batch {GLOBAL_BATCH}; noise L = {NOISE_SAMPLES}, M = {NOISE_BATCH}; "
        f"Lanczos {HVPS} products. Seconds per process (the slowest process), median; "
        "'wall' is elapsed time, 'cpu' the process's own CPU time.",
    ]
    rows = [("plain SGD step", "sgd_step"), ("one HVP (split probe)", "hvp"),
            ("noise samples, global micro-batches", "noise"),
            ("noise samples, local micro-batches", "noise_local"),
            ("full measurement (lambda1_H + noise)", "measure"),
            ("training step without ReplicaNoise", "replica_plain_step"),
            ("training step with ReplicaNoise", "replica_step")]
    for clock in ("wall", "cpu"):
        lines += ["", f"{clock} time:", "",
                  "| quantity | " + " | ".join(f"P={p} s" for p in sizes) + " | "
                  + " | ".join(f"P={p} / P={sizes[0]}" for p in sizes[1:]) + " | "
                  + " | ".join(f"P={p} x SGD step" for p in sizes) + " |",
                  "|---" * (3 * len(sizes)) + "|"]
        for label, key in rows:
            t = {p: _slowest(runs[p], key, clock) for p in sizes}
            sgd = {p: _slowest(runs[p], "sgd_step", clock) for p in sizes}
            cells = [f"{t[p]:.4f}" for p in sizes]
            cells += [f"{t[p] / t[sizes[0]]:.2f}" for p in sizes[1:]]
            cells += [f"{t[p] / sgd[p]:.1f}" for p in sizes]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Payload per process per measurement (bytes handed to collectives):", "",
              "| measurement | P | all-reduce bytes | all-gather bytes | collectives | in units of D float32 |",
              "|---|---|---|---|---|---|"]
    for p in sizes:
        if p == 1:
            continue
        r = runs[p][0]
        for label, key in ((f"Lanczos ({HVPS} HVPs)", "lanczos_comm"), ("noise samples", "noise_comm"),
                           ("full measurement", "measure_comm"), ("ReplicaNoise step", "replica_comm")):
            c = r[key]
            units = (c["all_reduce_bytes"] + c["all_gather_bytes"]) / (4 * r["dim"])
            lines.append(f"| {label} | {p} | {c['all_reduce_bytes']:,} | {c['all_gather_bytes']:,} | "
                         f"{c['calls']} | {units:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.repeats)
        return
    runs = {p: launch(p, args.repeats) for p in args.processes}
    print(report(runs))


if __name__ == "__main__":
    main()
