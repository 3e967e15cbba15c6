"""A recipe = defaults + table columns + analysis; :func:`main` runs its grid and prints the table.

The grid is models × learning rates × batch sizes × seeds, one run directory each. After
the runs, the recipe's ``analyze`` (figures, its own table) and the Conjecture 1 and 2
verdicts per seed and over seeds (``sgdbreak summary``: ``cli.compare_runs``) are printed,
and everything goes to ``<output-dir>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from . import args as A
from .data import DataSetError, load_dataset
from .loop import train_run

__all__ = ["Column", "Recipe", "RunSpec", "fmt", "main", "print_table", "run_name"]


@dataclass(frozen=True)
class RunSpec:
    """One grid point."""

    model: str
    lr: float
    batch_size: int
    seed: int


@dataclass(frozen=True)
class Column:
    """A column of the final table: header, summary key (or a function of the summary), format."""

    header: str
    key: str | Callable[[dict], Any]
    spec: str = ".3g"


@dataclass
class Recipe:
    """What makes one recipe differ from another.

    Attributes:
        name: written into each ``config.json`` (``recipe``) and the tracker project.
        title: the first words of the printed table's heading (default: ``name``).
        description: ``--help`` text (the module docstring).
        defaults: keyword arguments of :func:`recipekit.args.build_parser`.
        columns: the final table's columns after the grid point's own.
        add_arguments: adds recipe-specific options to the parser.
        check: validates the parsed arguments (call ``parser.error`` on a bad combination).
        hooks: ``(spec, args) -> list`` of per-run hooks (see ``loop.train_run``).
        analyze: ``(runs, args, out) -> dict`` after all runs: figures and the recipe's own
            printed table; ``runs`` is a list of ``(spec, run_dir, summary)``.
        config_extra: ``args -> dict`` of extra ``config.json`` entries.
        verdicts: print the Conjecture 1 and 2 verdicts over seeds.
    """

    name: str
    description: str
    defaults: dict
    title: str = ""
    columns: Sequence[Column] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    check: Callable[[argparse.ArgumentParser, argparse.Namespace], None] | None = None
    hooks: Callable[[RunSpec, argparse.Namespace], list] | None = None
    analyze: Callable[[list, argparse.Namespace, Path], dict] | None = None
    config_extra: Callable[[argparse.Namespace], dict] | None = None
    verdicts: bool = True
    run_dir_name: Callable[[RunSpec, argparse.Namespace], str] | None = None
    extra: dict = field(default_factory=dict)

    def parser(self) -> argparse.ArgumentParser:
        parser = A.build_parser(self.description, **self.defaults)
        if self.add_arguments is not None:
            self.add_arguments(parser)
        return parser


def run_name(spec: RunSpec, args: argparse.Namespace) -> str:
    """``[model_]lr_<η>[_bs<S>][_seed<s>]``: the model, S and seed only when the grid varies them."""
    parts = [spec.model] if len(args.models) > 1 else []
    parts.append(f"lr_{spec.lr:g}")
    if len(args.batch_size) > 1:
        parts.append(f"bs{spec.batch_size}")
    if len(args.seed) > 1:
        parts.append(f"seed{spec.seed}")
    return "_".join(parts)


def grid(args: argparse.Namespace) -> list[RunSpec]:
    """Every grid point, models outermost and seeds innermost."""
    return [RunSpec(m, lr, bs, s) for m, lr, bs, s in product(args.models, args.lr, args.batch_size, args.seed)]


def fmt(value: Any, spec: str = ".3g") -> str:
    """A table cell: ``-`` for missing or non-finite values."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        try:
            return format(value, spec)
        except ValueError:
            return format(value, ".3g")
    return str(value)


def print_table(rows: Sequence[dict], columns: Sequence[Column], file=None) -> None:
    """Print ``rows`` (summaries) as an aligned text table."""
    cells = [[c.header for c in columns]]
    for row in rows:
        cells.append([fmt(c.key(row) if callable(c.key) else row.get(c.key), c.spec) for c in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths, strict=True)), file=file or sys.stdout)


#: Columns every recipe's table starts with.
BASE_COLUMNS = (
    Column("model", "model", "s"),
    Column("lr", "lr", "g"),
    Column("S", "batch_size", "d"),
    Column("seed", "seed", "d"),
)

TAIL_COLUMNS = (
    Column("break-even", "break_even_step", "d"),
    Column("train acc", "final_train_accuracy", ".3f"),
    Column("diverged", "diverged_at", "d"),
    Column("sec", "seconds", ".0f"),
)


def check_data(parser: argparse.ArgumentParser, args: argparse.Namespace, num_processes: int):
    """Load ``--dataset`` and check the grid against it; usage errors (exit 2) otherwise."""
    try:
        data = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed[0], download=args.download)
    except DataSetError as err:
        parser.error(str(err))
    if args.num_examples is not None:
        if args.num_examples > len(data.x):
            parser.error(f"--num-examples {args.num_examples}: --dataset {args.dataset} has only {len(data.x)} examples")
        data.x, data.y = data.x[: args.num_examples], data.y[: args.num_examples]
    largest = max(args.batch_size)
    if largest * num_processes > len(data.x):
        per = f" × {num_processes} processes" if num_processes > 1 else ""
        parser.error(f"--batch-size {largest}{per} is larger than the {len(data.x)} training "
                     f"examples of --dataset {args.dataset}; use a smaller --batch-size")
    if data.is_text and any(m != "lstm" for m in args.models):
        parser.error(f"--dataset {args.dataset} is text: only --models lstm reads it")
    return data


def print_verdicts(run_dirs: Sequence[Path]) -> dict:
    """Print ``sgdbreak summary``'s Conjecture 1 and 2 verdicts (per seed and over seeds)."""
    from sgdbreak.integrations.cli import compare_runs, summary_lines
    from sgdbreak.integrations.rundir import read_run

    runs = [(d.name, read_run(d)) for d in run_dirs]
    result = compare_runs(runs)
    print()
    print("\n".join(summary_lines(result, dict(runs))))
    return result


def main(recipe: Recipe, argv: Sequence[str] | None = None) -> int:
    """Parse the command line, run the grid, print the table, analyse; returns the exit code."""
    parser = recipe.parser()
    args = A.normalize(parser.parse_args(argv))
    if recipe.check is not None:
        recipe.check(parser, args)
    from accelerate import Accelerator

    out = Path(args.output_dir)
    name_of = recipe.run_dir_name or run_name
    if args.analyze_only:
        return _analyze_only(recipe, args, parser, out, name_of)
    # TensorBoard goes through sgdbreak's own logger (recipekit.loop); Accelerate tracks W&B only.
    accelerator = Accelerator(log_with="wandb" if args.report_to in ("wandb", "all") else None)
    data = check_data(parser, args, accelerator.num_processes)
    runs = []
    try:
        for spec in grid(args):
            run_dir = out / name_of(spec, args)
            hooks = recipe.hooks(spec, args) if recipe.hooks is not None else []
            extra = recipe.config_extra(args) if recipe.config_extra is not None else None
            summary = train_run(spec, args, data, accelerator, run_dir, recipe=recipe.name, hooks=hooks,
                                config_extra=extra)
            runs.append((spec, run_dir, summary))
    finally:
        accelerator.end_training()  # finish trackers, destroy the process group (gloo can abort at exit otherwise)
    if not accelerator.is_main_process:
        return 0
    world = f"batch {','.join(map(str, args.batch_size))} × {accelerator.num_processes} processes"
    print(f"\n{recipe.title or recipe.name}: {', '.join(args.models)} on {args.dataset} ({len(data.x)} examples, {world})")
    return _report(recipe, args, argv, out, runs)


def _analyze_only(recipe: Recipe, args, parser, out: Path, name_of) -> int:
    """``--analyze-only``: the table, analysis and verdicts of run directories already written."""
    from sgdbreak.integrations.rundir import read_run

    runs = []
    for spec in grid(args):
        run_dir = out / name_of(spec, args)
        if not (run_dir / "config.json").exists():
            parser.error(f"--analyze-only: no run directory {run_dir} (run the grid first, same options)")
        run = read_run(run_dir)
        summary = dict(run.summarize())  # recomputed: the summary keys of this version
        diverged = next((e.get("step") for e in run.events if e.get("event") == "diverged"), None)
        summary.update(lr=spec.lr, batch_size=run.config.get("batch_size", spec.batch_size), seed=spec.seed,
                       model=spec.model, seconds=None, diverged_at=diverged, run_dir=str(run_dir))
        runs.append((spec, run_dir, summary))
    print(f"\n{recipe.title or recipe.name}: {', '.join(args.models)} (run directories under {out})")
    return _report(recipe, args, None, out, runs)


def _report(recipe: Recipe, args, argv, out: Path, runs: list) -> int:
    """The table, the recipe's analysis, the verdicts and ``summary.json``."""
    print_table([s for _, _, s in runs], [*BASE_COLUMNS, *recipe.columns, *TAIL_COLUMNS])
    result: dict[str, Any] = {"recipe": recipe.name, "argv": list(sys.argv[1:] if argv is None else argv),
                              "runs": [s for _, _, s in runs]}
    if recipe.analyze is not None:
        result["analysis"] = recipe.analyze(runs, args, out)
    if recipe.verdicts:
        result["comparison"] = print_verdicts([d for _, d, _ in runs])
    (out / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    print(f"Run directories and summary.json written under {out}/")
    return 0
