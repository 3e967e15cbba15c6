"""Two-process worker for tests/test_distributed.py (launched with torch.distributed.run).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 worker.py OUT``
with ``ACCELERATE_USE_CPU=true``. Runs every scenario on both processes and saves
``OUT/rank{r}.pt`` (plain Python values and tensors); the test compares them with each
other and with single-process references.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dist_common as C  # noqa: E402
from accelerate import Accelerator  # noqa: E402

from sgdbreak import (  # noqa: E402  # noqa: E402
    BreakEvenDetector,
    BreakEvenSGD,
    DistributedProbe,
    MonitoredLR,
    Probe,
    ReplicaNoise,
    check_world_size,
    is_main_process,
    noise_metrics,
    prepare_monitor,
)


def dict_loss(model, batch):
    return C.CRITERION(model(batch["x"]), batch["y"])


def probe_scenario(rank: int) -> dict:
    """Every probe measurement of a split probe (global and local micro-batches)."""
    out: dict = {}
    model = C.mlp()
    probe = DistributedProbe(model, C.CRITERION, C.probe_data(), split=True)
    assert probe.world_size == C.WORLD and probe.local_num_examples == C.PROBE_SIZE // C.WORLD
    gen = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    probe.communication.reset()
    out["loss"] = probe.loss_value()
    out["loss_subset"] = probe.loss_value(torch.tensor([0, 3, 5, 8, 9, 40]))
    out["gradient"] = probe.gradient()
    eig = probe.hessian_eigenvalues(k=3, tol=1e-10, max_hvps=200, generator=gen())
    out["eig_H"] = eig.eigenvalues
    out["eig_comm"] = probe.communication.as_dict() | {"num_hvps": eig.num_hvps}
    out["trace_H"] = probe.hessian_trace(num_samples=8, generator=gen()).value
    out["s2"] = probe.curvature_variance(eig.eigenvectors[0], num_groups=6, generator=gen())
    samples = probe.gradient_samples(num_samples=6, batch_size=5, generator=gen())
    out["samples"] = samples
    out["noise"] = noise_metrics(samples, out["gradient"], batch_size=5, k=5)
    out["per_example"] = probe.gradient_samples(method="per_example")
    chunked = DistributedProbe(model, C.CRITERION, C.probe_data(), split=True, chunk_size=5,
                               keep_graph=False)
    out["eig_H_chunked"] = chunked.hessian_eigenvalues(k=1, tol=1e-10, max_hvps=200,
                                                      generator=gen()).eigenvalues
    own = C.probe_data()
    shard = DistributedProbe(model, C.CRITERION, (own[0][rank::2], own[1][rank::2]))
    out["loss_shards"] = shard.loss_value()

    x, y = C.probe_data()
    size = 24 if rank == 0 else 23
    mine = (x[rank::2][:size], y[rank::2][:size])
    try:
        DistributedProbe(model, C.CRITERION, mine)
        out["uneven_error"] = ""
    except ValueError as err:
        out["uneven_error"] = str(err)
    trimmed = DistributedProbe(model, C.CRITERION, mine, uneven="trim")
    out["trimmed_sizes"] = (trimmed.local_num_examples, trimmed.num_examples)
    try:
        DistributedProbe(model, C.CRITERION, (x[:47], y[:47]), split=True)
        out["split_error"] = ""
    except ValueError as err:
        out["split_error"] = str(err)

    # The same probe as a dict batch with a loss_fn (the general form), split the same way.
    x, y = C.probe_data()
    as_dict = DistributedProbe(model, data={"x": x, "y": y}, loss_fn=dict_loss, split=True)
    out["dict_eig_H"] = as_dict.hessian_eigenvalues(k=3, tol=1e-10, max_hvps=200, generator=gen()).eigenvalues
    out["dict_samples"] = as_dict.gradient_samples(num_samples=6, batch_size=5, generator=gen())
    out["dict_per_example"] = as_dict.gradient_samples(method="per_example")

    bn = C.bn_net()
    bn_probe = DistributedProbe(bn, C.CRITERION, C.probe_data(), split=True)
    assert bn_probe.microbatches == "local"
    out["bn_eig_H"] = bn_probe.hessian_eigenvalues(k=1, tol=1e-10, max_hvps=200,
                                                   generator=gen()).eigenvalues
    out["bn_samples"] = bn_probe.gradient_samples(num_samples=6, batch_size=4, generator=gen())
    out["bn_batches"] = bn_probe.last_batches
    out["bn_running_mean"] = bn[1].running_mean.clone()
    return out


def ddp_run(accelerator: Accelerator, steps: int, accum: int, *, save_dir: str | None = None,
            resume_from: str | None = None, skip_at: int | None = None) -> dict:
    """Train with DDP through accelerator.prepare; returns measurements and weights."""
    rank = accelerator.process_index
    model = C.mlp()
    probe = DistributedProbe(model, C.CRITERION, C.probe_data(), split=True, accelerator=accelerator)
    opt = BreakEvenSGD(model.parameters(), lr=C.LR, probe=probe, **C.monitor_kwargs())
    model, opt = accelerator.prepare(model, opt)
    scaler = None
    if skip_at is not None:
        from accelerate.optimizer import AcceleratedOptimizer

        scaler = torch.amp.GradScaler("cpu")
        opt = AcceleratedOptimizer(opt.optimizer, device_placement=False, scaler=scaler)
    monitor = prepare_monitor(accelerator, opt)
    noise = ReplicaNoise(model, batch_size=C.LOCAL_BATCH, accelerator=accelerator, grad_scaler=scaler)
    accelerator.register_for_checkpointing(noise)
    start = 0
    if resume_from is not None:
        accelerator.load_state(resume_from)
        start = monitor.step
    x, y = C.train_data()
    skipped = []
    for step in range(start, steps):
        parts = C.micro_batches(step, accelerator.num_processes, accum)
        for a in range(accum):
            with accelerator.accumulate(model):
                idx = parts[(a, rank)]
                loss = C.CRITERION(model(x[idx]), y[idx])
                if step == skip_at and rank == 0:
                    loss = loss * float("inf")
                if scaler is not None:
                    scaler.scale(loss).backward()
                else:
                    accelerator.backward(loss)
                noise.after_backward()
                opt.step()
                opt.zero_grad()
        if scaler is not None:
            skipped.append(bool(opt.step_was_skipped))
        if save_dir is not None and step + 1 == C.SAVE_AT:
            accelerator.save_state(save_dir)
            accelerator.wait_for_everyone()
    inner = opt.optimizer
    return {
        "history": [dict(r) for r in inner.history],
        "events": [dict(e) for e in monitor.events],
        "break_even_step": inner.break_even.step,
        "monitor_step": monitor.step,
        "noise": [dict(r) for r in noise.history],
        "noise_step": noise.step,
        "noise_skipped": noise.num_skipped,
        "noise_comm": noise.communication.as_dict(),
        "params": [p.detach().clone() for p in accelerator.unwrap_model(model).parameters()],
        "skipped": skipped,
    }


def scheduler_run(accelerator: Accelerator) -> dict:
    """MonitoredLR through accelerator.prepare: AcceleratedScheduler calls step() once per
    process on every training step; the schedule must still advance once per step."""
    model = C.mlp()
    probe = DistributedProbe(model, C.CRITERION, C.probe_data(), split=True, accelerator=accelerator)
    detector = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9)
    opt = BreakEvenSGD(model.parameters(), lr=C.LR, probe=probe, measure_every=2, cheap_every=None,
                       measurements=("hessian",), hessian_tol=1e-8, seed=3, detector=detector)
    sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.5)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    x, y = C.train_data()
    lrs = []
    for step in range(C.SKIP_STEPS):
        idx = C.micro_batches(step, accelerator.num_processes, 1)[(0, accelerator.process_index)]
        opt.zero_grad()
        accelerator.backward(C.CRITERION(model(x[idx]), y[idx]))
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return {"lrs": lrs, "last_epoch": sched.scheduler.last_epoch,
            "detected_at": opt.optimizer.break_even.detected_at}


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    assert check_world_size(C.WORLD, accelerator=accelerator) == C.WORLD
    assert accelerator.num_processes == C.WORLD
    rank = accelerator.process_index
    result: dict = {"world_size": torch.distributed.get_world_size(), "rank": rank,
                    "main": is_main_process(accelerator), "env_world": int(os.environ["WORLD_SIZE"])}
    result["probe"] = probe_scenario(rank)

    ckpt = str(out_dir / "checkpoint")
    result["train"] = ddp_run(accelerator, C.STEPS, 1, save_dir=ckpt)
    result["resumed"] = ddp_run(Accelerator(cpu=True), C.STEPS, 1, resume_from=ckpt)
    result["skip"] = ddp_run(Accelerator(cpu=True), C.SKIP_STEPS, 1, skip_at=C.SKIP_AT)
    accumulating = Accelerator(cpu=True, gradient_accumulation_steps=2)
    assert accumulating.gradient_accumulation_steps == 2
    result["accumulate"] = ddp_run(accumulating, C.ACCUM_STEPS, 2)
    result["scheduler"] = scheduler_run(Accelerator(cpu=True))

    # A plain Probe on several processes is refused as soon as the monitor exists.
    model = C.mlp()
    try:
        BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, C.CRITERION, C.probe_data()))
        result["plain_probe_refused"] = False
    except RuntimeError as err:
        result["plain_probe_refused"] = "DistributedProbe" in str(err)
    model = accelerator.prepare(C.mlp())

    wrapped = DistributedProbe(model, C.CRITERION, C.probe_data(), split=True)
    result["unwraps_ddp"] = (type(model).__name__ == "DistributedDataParallel"
                             and wrapped.model is model.module)

    torch.save(result, out_dir / f"rank{rank}.pt")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: no gloo abort at exit


if __name__ == "__main__":
    main()
