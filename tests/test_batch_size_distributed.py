"""The accumulation path of the batch-size controller on 2 CPU processes equals one process.

``tests/distributed_scripts/batch_size_worker.py`` runs under
``python -m torch.distributed.run --standalone --nproc_per_node 2`` (gloo, a free port):
a fixed per-process micro-batch and ``BreakEvenAccumulation`` changing Accelerate's
gradient-accumulation steps. The reference here is one process with
``BreakEvenBatchSampler`` drawing the global batches from the same epoch permutations.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from sgdbreak import BreakEvenBatchSampler, Probe

SCRIPTS = Path(__file__).resolve().parent / "distributed_scripts"
sys.path.insert(0, str(SCRIPTS))
import batch_size_common as C  # noqa: E402


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true", PYTHONPATH=str(SCRIPTS.parents[1]))
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("batch_size_two_processes")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(C.WORLD),
               str(SCRIPTS / "batch_size_worker.py"), str(out)]
    proc = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300, cwd=SCRIPTS.parents[1])
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(C.WORLD)]
    assert [(r["world_size"], r["rank"]) for r in results] == [(C.WORLD, 0), (C.WORLD, 1)]
    return results


def reference():
    model = C.mlp()
    opt = C.optimizer(model, Probe(model, C.CRITERION, C.data(C.PROBE, 1)))
    sampler = BreakEvenBatchSampler(C.EpochPermutation(C.TRAIN), opt, batch_size=C.S0, max_batch_size=C.MAX,
                                    lr_rule=C.RULE)
    loader = DataLoader(C.Indexed(), batch_sampler=sampler)
    steps, lrs = [], []
    while opt.monitor.step < C.STEPS:
        for x, y, idx in loader:
            opt.zero_grad()
            C.CRITERION(model(x), y).backward()
            opt.step()
            steps.append(idx.tolist())
            lrs.append(opt.param_groups[0]["lr"])
            if opt.monitor.step == C.STEPS:
                break
    return model, opt, steps, lrs


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)


def sizes(events):
    return [(e["event"], e["step"], e["batch_size"], e["lr_factor"]) for e in events
            if e["event"].startswith("batch_size")]


@pytest.mark.distributed
def test_accumulation_on_two_processes_equals_the_batch_sampler_on_one(ranks):
    a, b = ranks
    model, opt, steps, lrs = reference()
    # The monitor counts optimizer steps, not micro-steps; both processes agree on everything.
    assert a["monitor_step"] == b["monitor_step"] == opt.monitor.step == C.STEPS
    assert sizes(a["events"]) == sizes(b["events"]) and a["lrs"] == b["lrs"]
    # Each optimizer step used the same examples as the single process's batch.
    assert len(a["steps"]) == len(steps) == C.STEPS
    for t, want in enumerate(steps):
        assert sorted(a["steps"][t] + b["steps"][t]) == sorted(want), t
        assert a["accumulation_steps"][t] * C.S0 == len(want)  # A·P·b is the global batch, tails included
    # The batch grew, changed A, and an epoch ended in a smaller step.
    got = sizes(a["events"])
    assert got == sizes(opt.monitor.events) and len(got) >= 2
    assert max(a["accumulation_steps"]) > 1
    assert any(len(s) < size for s, size in zip(steps, [None] + [len(s) for s in steps[:-1]]) if size)
    for x, y in zip(a["lrs"], lrs):
        assert close(x, y)
    want_records = opt.monitor.history
    assert [r["step"] for r in a["history"]] == [r["step"] for r in want_records]
    for g, w in zip(a["history"], want_records):
        for key in set(w) - {"measure_seconds"}:
            assert close(g[key], w[key]), (g["step"], key, g[key], w[key])
    for got_p, want_p in zip(a["params"], model.parameters()):
        assert torch.allclose(got_p, want_p.detach(), rtol=1e-6, atol=1e-9)
    assert a["state"]["controller"] == b["state"]["controller"]
