"""Models, data and loops shared by the two-process worker and the single-process references.

Imported by ``worker.py`` (under torch.distributed) and by ``tests/test_distributed.py``
(plain, one process): the same builders on both sides make the comparison exact.
"""

from __future__ import annotations

import torch
from torch import nn

from sgdbreak import BreakEvenDetector, BreakEvenSGD, Probe

WORLD = 2
PROBE_SIZE = 48
TRAIN_SIZE = 256
LOCAL_BATCH = 8
LR = 1.2
STEPS = 16
SAVE_AT = 8
ACCUM_STEPS = 4  # synchronising steps of the accumulation scenario (A = 2)
SKIP_STEPS = 6
SKIP_AT = 3  # 0-based step whose loss is made infinite on rank 0
CRITERION = nn.CrossEntropyLoss()


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                         nn.Linear(24, 3)).double()


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 3)).double()


def data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def probe_data():
    return data(PROBE_SIZE, 1)


def train_data():
    return data(TRAIN_SIZE, 2)


def monitor_kwargs() -> dict:
    return dict(
        measure_every=2, cheap_every=1,
        measurements=("hessian", "trace", "noise", "curvature_variance", "alpha_star"),
        dataset_size=TRAIN_SIZE, batch_size=WORLD * LOCAL_BATCH, noise_samples=8,
        hessian_tol=1e-10, max_hvps=80, trace_samples=6, seed=3,
        detector=BreakEvenDetector(confirm=2),
    )


def micro_batches(step: int, world: int, accum: int, batch: int = LOCAL_BATCH) -> dict:
    """Rows of training step ``step``: micro-step ``a`` of process ``r`` gets slice a·P + r."""
    total = world * accum * batch
    rows = (torch.arange(total) + step * total) % TRAIN_SIZE
    return {(a, r): rows[(a * world + r) * batch : (a * world + r + 1) * batch]
            for a in range(accum) for r in range(world)}


def reference_run(steps: int, accum: int, *, skip_at: int | None = None):
    """One process, global batch P·A·b as P·A micro-batches: the DDP run's oracle.

    ``skip_at``: that step's batch is drawn but no update happens (a skipped step).
    """
    from sgdbreak import ReplicaNoise

    model = mlp()
    probe = Probe(model, CRITERION, probe_data())
    opt = BreakEvenSGD(model.parameters(), lr=LR, probe=probe, **monitor_kwargs())
    noise = ReplicaNoise(model, batch_size=LOCAL_BATCH, accumulation_steps=WORLD * accum)
    x, y = train_data()
    for step in range(steps):
        parts = micro_batches(step, WORLD, accum)
        if step == skip_at:
            continue
        for a in range(accum):
            for r in range(WORLD):
                idx = parts[(a, r)]
                loss = CRITERION(model(x[idx]), y[idx]) / (WORLD * accum)
                loss.backward()
                noise.after_backward()
        opt.step()
        opt.zero_grad()
    return model, opt, noise
