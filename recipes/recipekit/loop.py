"""The one training loop of the recipes: SGD with the break-even monitor, one run directory.

Every process trains on its slice of the same shuffled global batch (global batch = S ×
processes); the probe is split across processes (``DistributedProbe``), so measurements are
of the whole probe. The run directory (``sgdbreak.RunLog``) gets the monitor's records, the
train accuracy and a ``diverged`` event if the training loss stops being finite (the run
then stops; the paper's η = 1.0 without BatchNorm does).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import sgdbreak
from sgdbreak.integrations.accelerate import prepare_monitor
from sgdbreak.integrations.distributed_probe import DistributedProbe
from sgdbreak.integrations.loggers import AccelerateLogger, resolve_wandb_mode
from sgdbreak.integrations.rundir import RunLog, read_run
from sgdbreak.integrations.summaries import summarize
from sgdbreak.workloads import datasets

from .data import DataSet, build_model

__all__ = ["accuracy", "make_warmup", "total_steps", "train_run"]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    """Fraction of ``x`` classified as ``y`` (eval mode, restored after)."""
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train(was)
    return correct / len(x)


def make_warmup(spec: str, opt):
    """The learning-rate scheduler of ``--warmup`` (None for 'none')."""
    if spec == "auto":
        return sgdbreak.BreakEvenWarmup(opt)  # measures the edge now: sets the starting lr
    if spec.startswith("linear:"):
        length = int(spec.split(":", 1)[1])
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / length))
    return None


def make_batch_size_policy(args, accelerator, opt, micro_batch: int, micro_batches_per_epoch: int):
    """``--batch-size-policy``: None ('fixed'), or gradient accumulation that follows break-even and the noise."""
    policy = getattr(args, "batch_size_policy", "fixed")
    if policy == "fixed":
        return None
    from sgdbreak.integrations.accumulation import BreakEvenAccumulation

    start = micro_batch * accelerator.num_processes
    return BreakEvenAccumulation(accelerator, opt, micro_batch_size=micro_batch, batch_size=start,
                                 max_batch_size=args.max_batch_size or 16 * start, lr_rule=policy,
                                 micro_batches_per_epoch=micro_batches_per_epoch)


def total_steps(args, steps_per_epoch: int) -> int:
    """``--max-steps``, or ``--epochs`` × steps per epoch."""
    return args.epochs * steps_per_epoch if getattr(args, "epochs", None) else args.max_steps


def _any_process(flag: bool, accelerator) -> bool:
    """Whether ``flag`` holds on any process (all processes must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    torch.distributed.all_reduce(t)
    return bool(t.item() > 0)


def train_run(spec, args, data: DataSet, accelerator, run_dir: Path, *, recipe: str,
              hooks: Sequence[Any] = (), config_extra: dict | None = None) -> dict:
    """Train one grid point and return its summary (with ``lr``, ``seconds``, ``diverged_at``).

    Args:
        spec: the grid point (``model``, ``lr``, ``batch_size``, ``seed``).
        args: the parsed command line (recipekit.args).
        data: the training set.
        accelerator: an ``accelerate.Accelerator``.
        run_dir: where the run directory is written (main process).
        recipe: the recipe's name (in ``config.json``, and the tracker project).
        hooks: objects with optional ``on_start(model, run_dir)``, ``on_step(step, model)``
            and ``on_end(run_dir)``, called on the main process only (e.g. R1's snapshots).
        config_extra: more entries for ``config.json``.
    """
    x, y = data.x, data.y
    torch.manual_seed(spec.seed)
    g = torch.Generator().manual_seed(spec.seed)
    model = build_model(spec.model, data, init=args.init)
    probe_x, probe_y = datasets.random_subset(x, y, args.probe_fraction, generator=torch.Generator().manual_seed(1))
    if accelerator.num_processes > 1:
        probe = DistributedProbe(model, nn.CrossEntropyLoss(), (probe_x, probe_y), split=True, uneven="trim")
    else:
        probe = sgdbreak.Probe(model, nn.CrossEntropyLoss(), (probe_x, probe_y))
    global_batch = spec.batch_size * accelerator.num_processes
    steps_per_epoch = len(x) // global_batch
    steps = total_steps(args, steps_per_epoch)
    config = {"recipe": recipe, "model": spec.model, "lr": spec.lr, "batch_size": global_batch,
              "momentum": args.momentum, "max_steps": args.max_steps if not args.epochs else None,
              "epochs": args.epochs, "total_steps": steps, "steps_per_epoch": steps_per_epoch,
              "seed": spec.seed, "dataset": args.dataset, "num_examples": len(x),
              "probe_size": probe.num_examples, "init": args.init,
              "measure_every": args.measure_every or "adaptive", "cheap_every": args.cheap_every,
              "measurements": list(args.measure), "noise_samples": args.noise_samples,
              "hessian_k": args.hessian_k, "processes": accelerator.num_processes,
              "warmup": getattr(args, "warmup", "none"),
              "batch_size_policy": getattr(args, "batch_size_policy", "fixed"), **(config_extra or {})}
    main = accelerator.is_main_process
    loggers = []
    log = None
    if main:
        log = RunLog(run_dir, config)
        loggers.append(log)
        if args.report_to in ("wandb", "all"):
            loggers.append(AccelerateLogger(accelerator))
        if args.report_to in ("tensorboard", "all"):  # scalars, spectra histograms, break-even text
            from sgdbreak.integrations.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir / "tensorboard", config=config))
    if args.report_to in ("wandb", "all"):
        accelerator.init_trackers(f"sgdbreak-{recipe.replace('_', '-')}", config=config,
                                  init_kwargs={"wandb": {"mode": resolve_wandb_mode(), "name": run_dir.name}})
    opt = sgdbreak.BreakEvenSGD(
        model.parameters(), lr=spec.lr, momentum=args.momentum, probe=probe,
        # A measurement recipe: after break-even it keeps twice the library default's
        # density (the interval doubles instead of growing 4x), so the curves past the peak
        # have enough points for the smoothed summaries.
        measure_every=args.measure_every or sgdbreak.measurement.triggers.Adaptive(settled_factor=2.0),
        cheap_every=args.cheap_every, steps_per_epoch=steps_per_epoch, loggers=loggers, seed=spec.seed,
        measurements=args.measure, dataset_size=len(x), batch_size=global_batch,
        noise_samples=args.noise_samples, hessian_k=args.hessian_k,
    )
    model, opt = accelerator.prepare(model, opt)
    inner = prepare_monitor(accelerator, opt).optimizer
    scheduler = make_warmup(getattr(args, "warmup", "none"), opt)
    policy = make_batch_size_policy(args, accelerator, opt, spec.batch_size, steps_per_epoch)
    hooks = list(hooks) if main else []
    for hook in hooks:
        if hasattr(hook, "on_start"):
            hook.on_start(accelerator.unwrap_model(model), run_dir)
    bar = None
    if main and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc=run_dir.name, file=sys.stderr, dynamic_ncols=True)
    step, start, diverged_at = 0, time.perf_counter(), None
    rank = accelerator.process_index
    every = args.accuracy_every
    acc = accuracy(model, x, y)  # at step 0 too: the accuracy at an early peak is interpolated
    for logger in loggers:
        logger.log_measurement({"step": 0, "epoch": 0.0, "train_accuracy": acc})
    while step < steps and diverged_at is None:
        for xb, yb in datasets.batches(x, y, global_batch, generator=g):
            # Same shuffled global batch on every process; each takes its slice.
            xb = xb[rank * spec.batch_size:(rank + 1) * spec.batch_size].to(accelerator.device)
            yb = yb[rank * spec.batch_size:(rank + 1) * spec.batch_size].to(accelerator.device)
            with policy.accumulate(model) if policy else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(model(xb), yb)
                if _any_process(not math.isfinite(loss.item()), accelerator):
                    diverged_at = step + 1
                    if log is not None:
                        log.log_event({"event": "diverged", "step": diverged_at, "loss": None})
                    break
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            if not accelerator.sync_gradients:
                continue  # a micro-step of --batch-size-policy's gradient accumulation
            if scheduler is not None:
                scheduler.step()
            step += 1
            for hook in hooks:
                if hasattr(hook, "on_step"):
                    hook.on_step(step, accelerator.unwrap_model(model))
            if bar is not None:
                latest = inner.latest
                post = {"loss": f"{loss.item():.3f}"}
                if latest and "lambda1_H" in latest:
                    post["λ1H"] = f"{latest['lambda1_H']:.3g}"
                if latest and "stability_ratio_update" in latest:
                    post["ηλ/2~"] = f"{latest['stability_ratio_update']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            due = step % every == 0 if every else step % steps_per_epoch == 0
            if due or step == steps:
                # On every process, not only where it is logged: a DDP forward can be collective.
                acc = accuracy(model, x, y)
                for logger in loggers:
                    logger.log_measurement({"step": step, "epoch": step / steps_per_epoch, "train_accuracy": acc})
            if step >= steps:
                break
    if bar is not None:
        bar.close()
    for hook in hooks:
        if hasattr(hook, "on_end"):
            hook.on_end(run_dir)
    for logger in loggers:
        logger.close()
    finish_trackers(accelerator)
    # The run directory also holds the accuracy records: summarise from it where it exists.
    summary = read_run(run_dir).summary if main else None
    summary = summary or summarize(inner.history, inner.monitor.events)
    summary.update(lr=spec.lr, batch_size=global_batch, seed=spec.seed, model=spec.model,
                   seconds=time.perf_counter() - start, diverged_at=diverged_at, run_dir=str(run_dir))
    return summary


def finish_trackers(accelerator) -> None:
    """End this run's trackers but keep the process group: the next grid point reuses it."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
