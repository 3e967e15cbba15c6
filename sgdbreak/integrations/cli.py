"""Command line: ``sgdbreak report`` and ``sgdbreak summary`` on run directories.

``report`` prints each run's peaks (raw, smoothed, 90 % quantile), its break-even point
and final accuracy, and writes its figure. ``summary`` checks the paper's Conjectures 1
and 2 (Jastrzebski et al. 2020) on every pair of runs that differ only in learning rate
or batch size: a larger η or a smaller S should reach lower λ1^K and λ1^H (Conjecture 1),
a larger Tr K/λ1^K and a smaller Tr K (Conjecture 2). Maxima are taken on the smoothed
series because one-sample spikes spoil the raw ones.

Arguments are run directories, or directories holding run directories (one level down);
files and other directories among them are skipped with a note, so ``runs/*`` works when
``runs`` also holds a ``summary.json``. A run without ``summary.json`` was killed or is
still running: both commands say so, and a Conjecture check that such a run could still
overturn is ``inconclusive``.

Example:
    $ sgdbreak report runs/lr0.1 runs/lr0.01 --out figures
    $ sgdbreak summary runs/*
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any, TypeGuard

from .rundir import RUN_FILES, Run, is_run_dir, read_run

__all__ = [
    "CHECKS",
    "DEFAULT_IGNORED_CONFIG_KEYS",
    "FIGURE_FORMATS",
    "compare_runs",
    "main",
    "over_seeds",
    "over_seeds_lines",
    "summary_lines",
]

#: Figure formats ``--formats`` accepts (matplotlib writes them without extra tools).
FIGURE_FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp")

INCOMPLETE = "incomplete: no summary.json (killed or still running)"

#: Config keys that name outputs rather than change the experiment; not compared.
DEFAULT_IGNORED_CONFIG_KEYS = (
    "run_dir",
    "out_dir",
    "output_dir",
    "log_dir",
    "data_dir",
    "name",
    "run_name",
    "wandb_project",
    "wandb_run_name",
    # derived from batch_size (recipes write them): a batch-size grid must still pair up
    "steps_per_epoch",
    "total_steps",
)

#: (conjecture, quantity, label, expected direction for the noisier run: -1 lower, +1 higher)
CHECKS = (
    (1, "lambda1_K", "max lambda1_K", -1),
    (1, "lambda1_H", "max lambda1_H", -1),
    (2, "stable_rank_K", "max Tr K/lambda1_K", +1),
    (2, "trace_K", "max Tr K", -1),
)

_VARIED = ("lr", "batch_size")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _note(text: str) -> None:
    print(f"sgdbreak: {text}", file=sys.stderr)


def _run_dirs(paths: Iterable[str]) -> list[str]:
    """The run directories named by ``paths``, in order and without repeats.

    A directory that is not a run directory stands for the run directories directly
    inside it; files and directories without runs are skipped with a note.

    Raises:
        FileNotFoundError: if a path does not exist, or no run directory is found.
    """
    found: list[str] = []
    for text in paths:
        path = Path(text)
        if not path.exists():
            raise FileNotFoundError(f"run directory not found: {text}")
        if is_run_dir(path):
            found.append(text)
        elif not path.is_dir():
            _note(f"skipping {text}: a file, not a run directory")
        else:
            inside = sorted(str(p) for p in path.iterdir() if is_run_dir(p))
            if inside:
                _note(f"{text} is not a run directory: reading the {len(inside)} run directories inside it")
            else:
                _note(
                    f"skipping {text}: it is not a run directory (none of "
                    f"{', '.join(RUN_FILES)}) and holds none"
                )
            found.extend(inside)
    if not found:
        raise FileNotFoundError("no run directories among the arguments")
    seen: set[Path] = set()
    unique = []
    for text in found:
        if Path(text).resolve() not in seen:
            seen.add(Path(text).resolve())
            unique.append(text)
    return unique


def _load(paths: Iterable[str]) -> list[tuple[str, Run]]:
    """Read the run directories named by ``paths``; reader warnings become notes."""
    runs = []
    for path in _run_dirs(paths):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append((path, read_run(path)))
        for warning in caught:
            _note(f"warning: {warning.message}")
    return runs


# --------------------------------------------------------------------------- report


def _report_lines(label: str, run: Run, summary: dict) -> list[str]:
    cfg = ", ".join(f"{k}={run.config[k]}" for k in _VARIED if k in run.config)
    lines = [f"== {label}" + (f"  ({cfg})" if cfg else "")]
    if not run.complete:
        lines.append(f"  {INCOMPLETE}")
    qname = f"q{summary['quantile'] * 100:g}"
    lines.append(f"  {'quantity':<20}{'max':>11}{'smoothed':>11}{qname:>11}{'at step':>9}")
    names = {
        "lambda1_H": "lambda1_H",
        "lambda1_K": "lambda1_K",
        "stable_rank_K": "Tr K/lambda1_K",
        "trace_K": "Tr K",
    }
    for key, name in names.items():
        lines.append(
            f"  {name:<20}{_fmt(summary[f'max_{key}']):>11}"
            f"{_fmt(summary[f'max_{key}_smoothed']):>11}{_fmt(summary[f'{qname}_{key}']):>11}"
            f"{_fmt(summary[f'step_of_max_{key}_smoothed']):>9}"
        )
    if summary["break_even_step"] is None:
        lines.append("  break-even: not detected")
    else:
        lines.append(
            f"  break-even: step {summary['break_even_step']} "
            f"(rule: {summary['break_even_rule']}, detected at {_fmt(summary['break_even_detected_at'])})"
        )
        evidence = summary.get("break_even_evidence") or {}
        for rule, values in evidence.items():
            if isinstance(values, dict):
                text = ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())
            else:
                text = _fmt(values)
            lines.append(f"    evidence {rule}: {text}")
    if summary["final_train_accuracy"] is not None:
        lines.append(f"  final train_accuracy: {_fmt(summary['final_train_accuracy'])}")
    steps = (
        f" (steps {summary['first_step']}-{summary['last_step']})"
        if summary["first_step"] is not None
        else ""
    )
    lines.append(
        f"  measurements: {summary['num_measurements']} in {summary['num_records']} records{steps}"
    )
    return lines


def _figure_stems(runs: list[tuple[str, Run]], out: str | None) -> list[Path]:
    if out is None:
        return [run.run_dir / "breakeven" for _, run in runs]
    names = [run.name for _, run in runs]
    unique = len(set(names)) == len(names)
    return [
        Path(out) / (f"{name}_breakeven" if unique else f"{i}_{name}_breakeven")
        for i, name in enumerate(names)
    ]


def _cmd_report(args: argparse.Namespace) -> int:
    runs = _load(args.run_dirs)
    summaries = [run.summarize(window=args.window) for _, run in runs]
    if args.json:
        out = {
            label: {**summary, "complete": run.complete}
            for (label, run), summary in zip(runs, summaries, strict=True)
        }
        print(json.dumps(out, indent=2))
    plots: Any = None
    if not args.no_plots:
        try:
            from . import plots
        except ImportError as err:  # matplotlib is an optional dependency
            print(f"figures skipped: {err} (pip install 'sgdbreak[plots]')", file=sys.stderr)
    stems = _figure_stems(runs, args.out)
    for (label, run), summary, stem in zip(runs, summaries, stems, strict=True):
        if not args.json:
            print("\n".join(_report_lines(label, run, summary)))
        if plots is not None:
            try:
                result = plots.plot_run(
                    run, stem, x=args.x, window=args.window, formats=args.formats
                )
            except ValueError as err:
                print(f"  figure skipped: {err}", file=sys.stderr)
            else:
                result.figure.clear()
                if not args.json:
                    print(f"  figure: {', '.join(str(p) for p in result.paths)}")
            if any(e.get("event") == "warmup_start" for e in run.events):
                result = plots.plot_learning_rate(run, f"{stem}_lr", x=args.x, formats=args.formats)
                result.figure.clear()
                if not args.json:
                    print(f"  learning-rate figure: {', '.join(str(p) for p in result.paths)}")
            if any(e.get("event") == "batch_size_start" for e in run.events):
                result = plots.plot_batch_size(run, f"{stem}_batch", x=args.x, formats=args.formats)
                result.figure.clear()
                if not args.json:
                    print(f"  batch-size figure: {', '.join(str(p) for p in result.paths)}")
        if not args.json:
            print()
    if plots is not None and args.out is not None and len(runs) > 1:
        try:
            result = plots.plot_comparison(
                [r for _, r in runs],
                None,
                Path(args.out) / "comparison",
                x=args.x,
                window=args.window,
                formats=args.formats,
            )
        except ValueError as err:
            print(f"comparison figure skipped: {err}", file=sys.stderr)
        else:
            result.figure.clear()
            if not args.json:
                print(f"comparison figure: {', '.join(str(p) for p in result.paths)}")
    return 0


# --------------------------------------------------------------------------- summary


def _other_config(run: Run, ignore: Sequence[str]) -> dict:
    skip = set(_VARIED) | set(ignore)
    return {k: v for k, v in run.config.items() if k not in skip}


def _config_diff(a: dict, b: dict) -> list[str]:
    return sorted(
        k
        for k in set(a) | set(b)
        if json.dumps(a.get(k), sort_keys=True) != json.dumps(b.get(k), sort_keys=True)
    )


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Peak:
    """A run's smoothed maximum of one quantity and what it says about the final one.

    ``bound`` is ``"final"`` for a complete run past its peak; ``"lower"`` for a run whose
    maximum can only grow with more records (incomplete, or complete but cut before its
    peak: not fallen back from it, see :func:`~sgdbreak.integrations.summaries.peak_passed`)
    with at least ``window`` values (the maximum is over complete windows); ``"unknown"``
    for fewer values, or a run that diverged. ``why`` says which of these it is.
    """

    label: str
    value: float | None
    bound: str
    why: str | None = None


def _diverged(run: Run) -> dict | None:
    return next((e for e in run.events if e.get("event") == "diverged"), None)


def _peak(label: str, run: Run, summary: dict, quantity: str, window: int) -> _Peak:
    value = summary[f"max_{quantity}_smoothed"]
    diverged = _diverged(run)
    if diverged is not None:
        return _Peak(label, value, "unknown", f"{label} diverged at step {diverged.get('step')}")
    enough = len(run.series(quantity)[1]) >= window
    if not run.complete:
        return _Peak(label, value, "lower" if enough else "unknown", f"{label} incomplete")
    if value is not None and summary.get(f"peak_passed_{quantity}") is False:
        last = summary.get("last_step")
        return _Peak(label, value, "lower" if enough else "unknown",
                     f"{label} has not passed a peak by step {last}")
    return _Peak(label, value, "final")


def _check(noisier: _Peak, other: _Peak, direction: int) -> tuple[str, str | None]:
    """Verdict and note for one check of the noisier run's peak against the other's.

    With final peaks: ``agrees``, ``disagrees``, ``tie`` or ``missing``. A peak that is
    only a lower bound (an incomplete run, or one cut before its peak) can still grow, so
    a verdict stands only when the *smaller* peak is final: the larger can only grow,
    which keeps the order. Otherwise it is ``inconclusive``, as it is when a run has not
    logged the quantity yet or diverged.
    """
    peaks = (noisier, other)
    still_open = "; ".join(p.why or p.label for p in peaks if p.bound != "final")
    note = still_open or None
    if any(p.value is None for p in peaks):
        final_missing = any(p.value is None and p.bound == "final" for p in peaks)
        return ("missing", None) if final_missing else ("inconclusive", note)
    if noisier.value == other.value:
        return ("tie", None) if note is None else ("inconclusive", note)
    verdict = "agrees" if (noisier.value - other.value) * direction > 0 else "disagrees"  # type: ignore[operator]  # no None: returned above
    if note is None:
        return verdict, None
    smaller = min(peaks, key=lambda p: p.value)  # type: ignore[arg-type, return-value]  # no None: returned above
    if smaller.bound != "final" or any(p.bound == "unknown" for p in peaks):
        return "inconclusive", note
    return verdict, f"{note}; its peak can only grow"


#: Tr K/λ1^K is at most L − 1 (L gradient samples); above this fraction of it the cap shows.
L_CAP_FRACTION = 0.8


def _cap_note(quantity: str, peaks: Sequence[_Peak], summaries: dict) -> str | None:
    """A note when a Tr K/λ1^K peak is near its ceiling L − 1 (L = noise samples)."""
    if quantity != "stable_rank_K":
        return None
    near = []
    for peak in peaks:
        samples = summaries[peak.label].get("noise_num_samples")
        if samples and samples > 1 and peak.value is not None and peak.value >= L_CAP_FRACTION * (samples - 1):
            near.append(f"{peak.label} {peak.value:.3g} of at most L - 1 = {samples - 1}")
    if not near:
        return None
    return "capped by L: " + ", ".join(near) + " (use more --noise-samples)"


def compare_runs(
    runs: Sequence[tuple[str, Run]],
    *,
    window: int = 5,
    ignore: Sequence[str] = DEFAULT_IGNORED_CONFIG_KEYS,
) -> dict:
    """Check Conjectures 1 and 2 on every pair of runs differing only in ``lr`` or ``batch_size``.

    Two runs are compared when their ``config.json`` agree on every key except ``lr``,
    ``batch_size`` and ``ignore``, and differ in exactly one of ``lr``/``batch_size``. The
    *noisier* run is the one with the larger ``lr`` or the smaller ``batch_size``; each
    check of :data:`CHECKS` compares smoothed maxima (:func:`~sgdbreak.integrations.summaries.summarize`).

    Args:
        runs: ``(label, run)`` pairs.
        window: Moving-average window for the smoothed maxima.
        ignore: Config keys that do not count as differences.

    A run without ``summary.json`` (killed or still running, ``Run.complete`` False) is
    compared on what it logged so far; a check it could still overturn is
    ``"inconclusive"`` (see ``docs/tracking.md``).

    Returns:
        ``{"pairs": [...], "not_compared": [...], "incomplete": [...], "totals": {...}}``.
        Each pair has ``a``, ``b``, ``varied``, ``noisier`` and ``checks``
        (``conjecture``, ``quantity``, ``noisier_value``, ``other_value``, ``expected``,
        ``verdict``: ``"agrees"``, ``"disagrees"``, ``"tie"``, ``"missing"`` or
        ``"inconclusive"``, and ``note``: which runs are incomplete, or ``None``).
    """
    summaries = {label: run.summarize(window=window) for label, run in runs}
    runs_by_label = dict(runs)
    others = {label: _other_config(run, ignore) for label, run in runs}
    pairs: list[dict[str, Any]] = []
    notes: list[dict[str, Any]] = []
    partnered: set[str] = set()
    usable = []
    for label, run in runs:
        if not any(_is_number(run.config.get(k)) for k in _VARIED):
            notes.append({"run": label, "reason": "config.json has no numeric lr or batch_size"})
        else:
            usable.append((label, run))
    for (la, ra), (lb, rb) in combinations(usable, 2):
        if _config_diff(others[la], others[lb]):
            continue
        varied = [k for k in _VARIED if ra.config.get(k) != rb.config.get(k)]
        if len(varied) != 1:
            reason = "same lr and batch_size" if not varied else "differ in both lr and batch_size"
            notes.append({"run": f"{la} vs {lb}", "reason": reason})
            partnered.update((la, lb))
            continue
        key = varied[0]
        va, vb = ra.config.get(key), rb.config.get(key)
        if not (_is_number(va) and _is_number(vb)):
            notes.append({"run": f"{la} vs {lb}", "reason": f"{key} is not numeric in both"})
            continue
        partnered.update((la, lb))
        a_noisier = va > vb if key == "lr" else va < vb
        noisy, quiet = (la, lb) if a_noisier else (lb, la)
        checks = []
        for conjecture, quantity, name, direction in CHECKS:
            noisy_peak = _peak(noisy, runs_by_label[noisy], summaries[noisy], quantity, window)
            quiet_peak = _peak(quiet, runs_by_label[quiet], summaries[quiet], quantity, window)
            verdict, note = _check(noisy_peak, quiet_peak, direction)
            cap = _cap_note(quantity, (noisy_peak, quiet_peak), summaries)
            if cap is not None:
                note = cap if note is None else f"{note}; {cap}"
            checks.append(
                {
                    "conjecture": conjecture,
                    "quantity": quantity,
                    "name": name,
                    "expected": "lower" if direction < 0 else "higher",
                    "noisier_value": noisy_peak.value,
                    "other_value": quiet_peak.value,
                    "verdict": verdict,
                    "note": note,
                }
            )
        fixed = {k: v for k, v in others[la].items() if k != "seed"}
        fixed["batch_size" if key == "lr" else "lr"] = ra.config.get(
            "batch_size" if key == "lr" else "lr"
        )
        pairs.append(
            {
                "a": la,
                "b": lb,
                "varied": key,
                "noisier": noisy,
                "other": quiet,
                "noisier_value": runs_by_label[noisy].config.get(key),
                "other_value": runs_by_label[quiet].config.get(key),
                "seed": ra.config.get("seed"),
                "fixed": fixed,
                "checks": checks,
            }
        )
    for label, _ in usable:
        if label in partnered:
            continue
        diffs = [_config_diff(others[label], others[o]) for o, _ in usable if o != label]
        reason = (
            "the only run with lr/batch_size"
            if not diffs
            else "other config keys differ from every other run: " + ", ".join(min(diffs, key=len))  # type: ignore[arg-type]  # lists of str
        )
        notes.append({"run": label, "reason": reason})
    verdicts = [c["verdict"] for p in pairs for c in p["checks"]]
    kinds = ("agrees", "disagrees", "tie", "missing", "inconclusive")
    totals = {v: verdicts.count(v) for v in kinds}
    incomplete = [label for label, run in runs if not run.complete]
    return {
        "window": window,
        "pairs": pairs,
        "over_seeds": over_seeds(pairs),
        "not_compared": notes,
        "incomplete": incomplete,
        "totals": totals,
    }


def over_seeds(pairs: Sequence[dict]) -> list[dict]:
    """Group the pairs of :func:`compare_runs` that differ only in their seed, per check.

    Each group is one comparison (``varied``, ``noisier_value`` vs ``other_value`` with the
    rest of the config ``fixed``) repeated over seeds. Per check it counts the seeds'
    verdicts and compares the means over seeds of the smoothed maxima: ``verdict`` is
    ``"agrees"``/``"disagrees"``/``"tie"`` on the means when no seed is inconclusive or
    missing, ``"missing"`` when no seed logged it, else ``"inconclusive"``.

    Returns:
        ``[{"varied", "noisier_value", "other_value", "fixed", "seeds", "checks": [
        {"conjecture", "quantity", "name", "expected", "counts", "agree", "seeds",
        "noisier_mean", "other_mean", "verdict", "notes"}]}]``.
    """
    groups: dict[str, dict] = {}
    for pair in pairs:
        key = json.dumps(
            [pair["varied"], pair["noisier_value"], pair["other_value"], pair["fixed"]],
            sort_keys=True,
            default=str,
        )
        group = groups.setdefault(
            key,
            {
                "varied": pair["varied"],
                "noisier_value": pair["noisier_value"],
                "other_value": pair["other_value"],
                "fixed": pair["fixed"],
                "seeds": [],
                "pairs": [],
            },
        )
        group["seeds"].append(pair.get("seed"))
        group["pairs"].append(pair)
    out = []
    for group in groups.values():
        checks = []
        for i, (conjecture, quantity, name, direction) in enumerate(CHECKS):
            per_seed = [p["checks"][i] for p in group["pairs"]]
            verdicts = [c["verdict"] for c in per_seed]
            counts = {v: verdicts.count(v) for v in dict.fromkeys(verdicts)}
            values = [(c["noisier_value"], c["other_value"]) for c in per_seed]
            means = None
            if all(a is not None and b is not None for a, b in values):
                means = tuple(sum(v[j] for v in values) / len(values) for j in (0, 1))
            if all(v == "missing" for v in verdicts):
                verdict = "missing"
            elif means is None or any(v in ("inconclusive", "missing") for v in verdicts):
                verdict = "inconclusive"
            elif means[0] == means[1]:
                verdict = "tie"
            else:
                verdict = "agrees" if (means[0] - means[1]) * direction > 0 else "disagrees"
            notes = sorted({c["note"] for c in per_seed if c.get("note")})
            checks.append(
                {
                    "conjecture": conjecture,
                    "quantity": quantity,
                    "name": name,
                    "expected": "lower" if direction < 0 else "higher",
                    "counts": counts,
                    "agree": counts.get("agrees", 0),
                    "seeds": len(per_seed),
                    "noisier_mean": None if means is None else means[0],
                    "other_mean": None if means is None else means[1],
                    "verdict": verdict,
                    "notes": notes,
                }
            )
        out.append({k: v for k, v in group.items() if k != "pairs"} | {"checks": checks})
    return out


def over_seeds_lines(groups: Sequence[dict]) -> list[str]:
    """The text of :func:`over_seeds`: per comparison, how many seeds agree."""
    lines = []
    for group in groups:
        key = group["varied"]
        what = "larger lr" if key == "lr" else "smaller batch_size"
        fixed = group["fixed"]
        at = "batch_size" if key == "lr" else "lr"
        extra = f", model={fixed['model']}" if "model" in fixed else ""
        lines.append(
            f"over seeds {', '.join(_fmt(s) for s in group['seeds'])}: {key} {_fmt(group['noisier_value'])} "
            f"vs {_fmt(group['other_value'])} ({at}={_fmt(fixed.get(at))}{extra}; {what} is noisier)"
        )
        for c in group["checks"]:
            counts = ", ".join(f"{n} {v}" for v, n in c["counts"].items())
            lines.append(
                f"  C{c['conjecture']} {c['name']:<20} {c['agree']}/{c['seeds']} seeds agree ({counts}); "
                f"mean {_fmt(c['noisier_mean'])} vs {_fmt(c['other_mean'])}, expected "
                f"{c['expected']}: {c['verdict']}"
            )
            for note in c["notes"]:
                lines.append(f"      note: {note}")
    return lines


def summary_lines(result: dict, runs: dict[str, Run]) -> list[str]:
    """The text of ``sgdbreak summary`` for a :func:`compare_runs` result."""
    return _summary_lines(result, runs)


def _summary_lines(result: dict, runs: dict[str, Run]) -> list[str]:
    lines = [
        f"Conjectures 1 and 2 on smoothed maxima (moving-average window {result['window']});",
        "each check: noisier run (larger lr or smaller batch_size) vs the other",
        "",
    ]
    for label in result.get("incomplete", []):
        lines.append(f"{label}: {INCOMPLETE}")
    if result.get("incomplete"):
        lines.append("")
    if not result["pairs"]:
        lines.append("no pair of runs differs only in lr or batch_size")
    for pair in result["pairs"]:
        key = pair["varied"]
        direction = "larger lr" if key == "lr" else "smaller batch_size"
        a, b = pair["a"], pair["b"]
        lines.append(
            f"{a} ({key}={runs[a].config[key]}) vs {b} ({key}={runs[b].config[key]}): "
            f"{direction} in {pair['noisier']}"
        )
        for check in pair["checks"]:
            note = f" ({check['note']})" if check.get("note") else ""
            lines.append(
                f"  Conjecture {check['conjecture']}  {check['name']:<20} "
                f"{_fmt(check['noisier_value'])} vs {_fmt(check['other_value'])}  "
                f"expected {check['expected']}: {check['verdict']}{note}"
            )
        lines.append("")
    if result["not_compared"]:
        lines.append("not compared:")
        for note in result["not_compared"]:
            lines.append(f"  {note['run']}: {note['reason']}")
        lines.append("")
    if result.get("over_seeds"):
        lines.extend(over_seeds_lines(result["over_seeds"]))
        lines.append("")
    t = result["totals"]
    total = f"total: {t['agrees']} agree, {t['disagrees']} disagree, {t['tie']} tie, {t['missing']} missing"
    if t.get("inconclusive"):
        total += f", {t['inconclusive']} inconclusive"
    lines.append(total)
    return lines


def _cmd_summary(args: argparse.Namespace) -> int:
    runs = _load(args.run_dirs)
    ignore = tuple(DEFAULT_IGNORED_CONFIG_KEYS) + tuple(args.ignore or ())
    result = compare_runs(runs, window=args.window, ignore=ignore)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print("\n".join(_summary_lines(result, dict(runs))))
    return 0


# --------------------------------------------------------------------------- entry point


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _formats(text: str) -> tuple[str, ...]:
    formats = tuple(f.strip().lstrip(".").lower() for f in text.split(",") if f.strip())
    if not formats:
        raise argparse.ArgumentTypeError("give at least one format, e.g. png,pdf")
    unknown = [f for f in formats if f not in FIGURE_FORMATS]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown figure format {', '.join(unknown)}; choose from {', '.join(FIGURE_FORMATS)}"
        )
    return formats


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sgdbreak", description="Inspect break-even measurements in sgdbreak run directories."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    report = sub.add_parser("report", help="per-run peaks, break-even point and figures")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="write figures here (default: into each run directory)")
    report.add_argument("--no-plots", action="store_true", help="do not write figures")
    report.add_argument("--x", default="step", help="x axis of the figures: step or epoch")
    report.add_argument(
        "--formats", type=_formats, default=("png", "pdf"), help="figure formats (default: png,pdf)"
    )
    report.add_argument("--window", type=_positive_int, default=5, help="moving-average window")
    report.add_argument("--json", action="store_true", help="print the summaries as JSON")
    report.set_defaults(func=_cmd_report)
    summary = sub.add_parser("summary", help="check Conjectures 1 and 2 across runs")
    summary.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    summary.add_argument("--window", type=_positive_int, default=5, help="moving-average window")
    summary.add_argument(
        "--ignore",
        action="append",
        metavar="KEY",
        help="config key that may differ between compared runs (repeatable; "
        f"always ignored: {', '.join(DEFAULT_IGNORED_CONFIG_KEYS)})",
    )
    summary.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    summary.set_defaults(func=_cmd_summary)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (2 for unreadable run directories)."""
    args = _parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:
        print(f"sgdbreak {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
