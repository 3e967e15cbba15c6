"""Run by ``accelerate launch --multi_gpu --num_processes 2 ...`` in tests/test_distributed.py.

Checks the documented CPU launch: ``ACCELERATE_USE_CPU=true`` and a plain ``Accelerator()``
connect two processes, which then measure the same λ1^H on a split probe.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_common as C  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from sgdbreak import DistributedProbe, check_world_size  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    accelerator = Accelerator()
    size = check_world_size(accelerator=accelerator)
    probe = DistributedProbe(C.mlp(), C.CRITERION, C.probe_data(), split=True, accelerator=accelerator)
    eig = probe.hessian_eigenvalues(k=1, tol=1e-10, max_hvps=200, generator=torch.Generator().manual_seed(11))
    out = {"world_size": size, "num_processes": accelerator.num_processes,
           "lambda1_H": float(eig.eigenvalues[0]), "main": accelerator.is_main_process}
    Path(sys.argv[1], f"rank{accelerator.process_index}.json").write_text(json.dumps(out))
    # Without this, gloo can abort one process at interpreter exit ("terminate called
    # without an active exception"), about one launch in eight on this machine.
    accelerator.end_training()
