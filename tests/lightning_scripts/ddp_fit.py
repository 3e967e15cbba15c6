"""Fit TinyClassifier with BreakEvenCallback under Lightning's DDP strategy on 2 CPU processes.

Run as ``python ddp_fit.py OUT_DIR``; Lightning starts the second process itself. Each
process writes ``rank<r>.json``: world size, probe type and size, the records, and (rank 0)
the exact λ1^H of the final model on the global probe subset.
"""

import json
import sys
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from tiny import TinyClassifier, dataset, loader

from sgdbreak.integrations.lightning import BreakEvenCallback, _probe_batch
from sgdbreak.testing import model_hessian


class RankFile:
    """A logger writing each record's step to ``logged_rank<r>.txt`` of the process it runs on."""

    def __init__(self, out: Path):
        self.out = out

    def log_measurement(self, record):
        with open(self.out / f"logged_rank{torch.distributed.get_rank()}.txt", "a") as f:
            f.write(f"{int(record['step'])}\n")

    def log_event(self, event):
        pass

    def close(self):
        pass


def main(out: Path) -> None:
    torch.set_num_threads(1)
    cb = BreakEvenCallback(probe_size=48, measure_every=2, cheap_every=None, measurements=("hessian",),
                           hessian_tol=1e-8, max_hvps=100, seed=3, loggers=[RankFile(out)])
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=6, logger=False, callbacks=[cb],
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    module = TinyClassifier(lr=0.3)
    trainer.fit(module, loader(batch_size=8))
    rank = trainer.global_rank
    probe = cb.monitor.probe
    result = {"world_size": trainer.world_size, "dist_world_size": torch.distributed.get_world_size(),
              "probe": type(probe).__name__, "probe_examples": probe.num_examples,
              "local_examples": probe.local_num_examples, "step": cb.monitor.step,
              "global_step": trainer.global_step,
              "history": [{k: v for k, v in r.items() if k != "measure_seconds"} for r in cb.monitor.history]}
    if rank == 0:
        x, y = _probe_batch(loader(batch_size=8), 48, 3, multiple_of=2)
        h = model_hessian(module, module.criterion, x, y)
        result["exact_lambda1_H"] = float(torch.linalg.eigvalsh(h)[-1])
        result["dataset_size"] = len(dataset())
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
