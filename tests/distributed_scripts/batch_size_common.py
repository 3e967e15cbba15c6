"""The batch-size run shared by the two-process worker and the single-process reference.

Two processes with a fixed per-process micro-batch of ``MICRO`` examples and a changing
number of accumulation steps (``BreakEvenAccumulation``), against one process drawing
batches of the global size from ``BreakEvenBatchSampler``: the same examples per step,
so the same measurements, decisions and weights.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset, Sampler

from sgdbreak import BreakEvenDetector, BreakEvenSGD

WORLD = 2
MICRO = 4  # per-process micro-batch b
S0 = WORLD * MICRO  # global batch before break-even (A = 1)
MAX = 64
TRAIN = 192
PROBE = 48
STEPS = 16  # optimizer steps (two epochs and a bit at the sizes reached)
LR = 0.1
RULE = "sqrt"
CRITERION = nn.CrossEntropyLoss()


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 24), nn.Tanh(), nn.Linear(24, 3)).double()


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


class Indexed(Dataset):
    def __init__(self):
        self.x, self.y = data(TRAIN, 2)

    def __len__(self):
        return TRAIN

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


class EpochPermutation(Sampler[int]):
    """A seeded permutation per epoch (``set_epoch``), the same on every process."""

    def __init__(self, n: int, seed: int = 5):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist())

    def __len__(self):
        return self.n


def optimizer(model: nn.Module, probe, **settings) -> BreakEvenSGD:
    detector = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",),
                                 stability_threshold=1e-9, confirm=1)  # break-even at the first measurement
    settings = {"measure_every": 3, "hessian_tol": 1e-10, "max_hvps": 60, **settings}
    return BreakEvenSGD(model.parameters(), lr=LR, momentum=0.5, probe=probe, cheap_every=None,
                        measurements=("hessian", "noise"), noise_samples=6, seed=3, detector=detector, **settings)
