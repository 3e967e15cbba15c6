"""Two-process run of ``BreakEvenAccumulation`` for tests/test_batch_size_distributed.py.

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 batch_size_worker.py OUT``
with ``ACCELERATE_USE_CPU=true``. Saves ``OUT/rank{r}.pt``: the examples each optimizer step
used on this process, the measurements, the batch-size events and the weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import batch_size_common as C  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from sgdbreak import DistributedProbe, check_world_size, prepare_monitor  # noqa: E402
from sgdbreak.integrations.accumulation import BreakEvenAccumulation  # noqa: E402


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert check_world_size(C.WORLD, accelerator=accelerator) == C.WORLD
    model = C.mlp()
    probe = DistributedProbe(model, C.CRITERION, C.data(C.PROBE, 1), split=True, accelerator=accelerator)
    opt = C.optimizer(model, probe)
    loader = DataLoader(C.Indexed(), batch_size=C.MICRO, sampler=C.EpochPermutation(C.TRAIN))
    model, opt, loader = accelerator.prepare(model, opt, loader)
    monitor = prepare_monitor(accelerator, opt)
    accumulation = BreakEvenAccumulation(accelerator, opt, micro_batch_size=C.MICRO, batch_size=C.S0,
                                         max_batch_size=C.MAX, lr_rule=C.RULE, micro_batches_per_epoch=len(loader))
    steps, current, lrs, accumulation_steps = [], [], [], []
    epoch = 0
    while monitor.step < C.STEPS:
        loader.set_epoch(epoch)
        for x, y, idx in loader:
            with accumulation.accumulate(model):
                current += idx.tolist()
                accelerator.backward(C.CRITERION(model(x), y))
                opt.step()
                opt.zero_grad()
            if accelerator.sync_gradients:
                steps.append(current)
                lrs.append(opt.param_groups[0]["lr"])
                accumulation_steps.append(accumulation.accumulation_steps)
                current = []
            if monitor.step == C.STEPS:
                break
        epoch += 1
    result = {
        "world_size": torch.distributed.get_world_size(), "rank": accelerator.process_index,
        "steps": steps, "lrs": lrs, "accumulation_steps": accumulation_steps, "monitor_step": monitor.step,
        "history": [dict(r) for r in monitor.history], "events": [dict(e) for e in monitor.events],
        "params": [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()],
        "state": accumulation.state_dict(),
    }
    torch.save(result, out_dir / f"rank{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
