"""BreakEvenWarmup against what users do today, on real data, over several seeds.

For each data set, optimizer and *target* learning rate (a ×3 grid over two decades
around the largest stable constant rate) it trains:

(a) ``constant``: the target from the first step;
(b) ``linear``: linear warmup to the target over L steps, the best of ``--warmup-lengths``
    per target (chosen on final test accuracy, i.e. tuned with hindsight);
(c) ``auto``: :class:`sgdbreak.BreakEvenWarmup` (margin 0.9, nothing tuned), constant
    target after the hand-off.

Every run carries the same sparse monitor (full measurement every ``steps // 8`` steps, no
cheap signal) for max λ1^H (or λ1^PH) and the break-even step; (c) adds its own cadence.
Reported per (data, optimizer, target): mean and min final test accuracy over seeds, runs
that diverged, max sharpness, break-even step, wall seconds, and for (c) its wall time
over plain ``torch.optim`` training with the same target measured in the same run.

    python benchmarks/bench_warmup.py                     # digits MLP and MNIST SimpleCNN
    python benchmarks/bench_warmup.py --datasets digits --optimizers sgd --seeds 0 --quick

Writes ``benchmarks/results/warmup.json`` and, with matplotlib, ``warmup.png``
(accuracy against target lr).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import markdown_table, pyplot  # noqa: E402

import sgdbreak  # noqa: E402
from sgdbreak.workloads import datasets, models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

LR_GRIDS = {  # ×3 over two decades around the edge at initialization
    ("digits", "sgd"): [0.01, 0.03, 0.1, 0.3, 1.0, 3.0],
    ("mnist", "sgd"): [0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
    ("digits", "adamw"): [3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1],
    ("mnist", "adamw"): [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2],
}


def load(name: str, seed: int):
    """Train/test tensors and a fresh model for ``seed``."""
    if name == "digits":
        x, y = datasets.load_digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100))
        x, y = x[order], y[order]
        train, test = (x[:1397], y[:1397]), (x[1397:], y[1397:])
        torch.manual_seed(seed)
        model = models.MLP(64, (128, 128), activation="tanh")
        with torch.no_grad():  # N(0, 4/fan_in): the catapult regime (see ../shared/DESIGN.md)
            for layer in model.modules():
                if isinstance(layer, nn.Linear):
                    layer.weight.normal_(0.0, 2.0 / math.sqrt(layer.in_features))
                    layer.bias.zero_()
        return model, train, test, 32
    x, y = datasets.load_mnist_embedded()
    train, test = (x[:4000], y[:4000]), (x[4000:], y[4000:])
    torch.manual_seed(seed)
    return models.SimpleCNN(1, 10, 28, init="glorot"), train, test, 64


def make_optimizer(kind: str, params, lr: float):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        out = sum(int((model(data[0][i:i + 500]).argmax(1) == data[1][i:i + 500]).sum())
                  for i in range(0, len(data[0]), 500))
    model.train()
    return out / len(data[0])


def run(dataset: str, kind: str, method: str, target: float, seed: int, steps: int,
        warmup: int | None = None, measure: bool = True) -> dict:
    model, train, test, batch = load(dataset, seed)
    opt = make_optimizer(kind, model.parameters(), target)
    monitor = None
    if measure:
        probe_idx = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))[:256]
        probe = sgdbreak.Probe(model, nn.CrossEntropyLoss(), (train[0][probe_idx], train[1][probe_idx]))
        cadence = dict(measure_every=max(1, steps // 8), cheap_every=None)
        if method == "auto":
            cadence = {}  # the library default: adaptive full measurements and the cheap signal
        quantities = None
        if kind == "adamw" and hasattr(sgdbreak, "PreconditionedSharpness"):
            quantities = [sgdbreak.UpdateSharpness(), sgdbreak.PreconditionedSharpness(), sgdbreak.GradientNoise()]
        monitor = sgdbreak.BreakEvenMonitor(probe, quantities=quantities, seed=seed, **cadence)
        monitor.attach(opt)
    if method == "auto":
        sched = sgdbreak.BreakEvenWarmup(opt, monitor=monitor)
    elif method == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    else:
        sched = None
    gen = torch.Generator().manual_seed(seed + 1000)
    start = time.perf_counter()
    diverged = False
    for _ in range(steps):
        idx = torch.randint(0, len(train[0]), (batch,), generator=gen)
        opt.zero_grad()
        loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
        if not torch.isfinite(loss):
            diverged = True
            break
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    wall = time.perf_counter() - start
    acc = 0.1 if diverged else accuracy(model, test)
    diverged = diverged or not all(torch.isfinite(p).all() for p in model.parameters()) or acc <= 0.15
    out = {"dataset": dataset, "optimizer": kind, "method": method, "target": target, "seed": seed, "steps": steps,
           "warmup": warmup, "test_accuracy": acc, "diverged": diverged, "seconds": wall}
    if monitor is not None:
        key = "lambda1_PH" if any("lambda1_PH" in r for r in monitor.history) else "lambda1_H"
        values = [r[key] for r in monitor.history if key in r]
        out["max_sharpness"] = max(values) if values else None
        out["sharpness_key"] = key
        out["break_even_step"] = monitor.break_even.step
        if method == "auto":
            handoff = [e for e in monitor.events if e["event"] == "warmup_handoff"]
            out["handoff_step"] = handoff[0]["step"] if handoff else None
            out["start_lr"] = monitor.events[0]["lr"]
    return out


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["dataset"], r["optimizer"], r["target"]) for r in results})
    for dataset, kind, target in keys:
        group = [r for r in results if (r["dataset"], r["optimizer"], r["target"]) == (dataset, kind, target)]
        by = {}
        for method in ("constant", "linear", "auto"):
            runs = [r for r in group if r["method"] == method]
            if method == "linear" and runs:  # best warmup length in hindsight
                lengths = sorted({r["warmup"] for r in runs})
                best = max(lengths, key=lambda w: statistics.mean(
                    r["test_accuracy"] for r in runs if r["warmup"] == w))
                runs = [r for r in runs if r["warmup"] == best]
            if runs:
                by[method] = runs
        row = {"dataset": dataset, "optimizer": kind, "target": target}
        for method, runs in by.items():
            accs = [r["test_accuracy"] for r in runs]
            row[f"{method}_acc"] = statistics.mean(accs)
            row[f"{method}_min"] = min(accs)
            row[f"{method}_div"] = sum(r["diverged"] for r in runs)
            sharp = [r["max_sharpness"] for r in runs if r.get("max_sharpness") is not None]
            row[f"{method}_sharp"] = max(sharp) if sharp else None
            be = [r["break_even_step"] for r in runs if r.get("break_even_step") is not None]
            row[f"{method}_be"] = statistics.median(be) if be else None
            row[f"{method}_sec"] = statistics.mean(r["seconds"] for r in runs)
            if method == "linear":
                row["linear_L"] = runs[0]["warmup"]
        plain = [r for r in group if r["method"] == "plain"]
        if plain and "auto" in by:
            row["auto_vs_plain"] = row["auto_sec"] / statistics.mean(r["seconds"] for r in plain)
        rows.append(row)
    return rows


COLUMNS = ["dataset", "optimizer", "target", "constant_acc", "constant_div", "linear_acc", "linear_L",
           "linear_div", "auto_acc", "auto_min", "auto_div", "constant_sharp", "linear_sharp", "auto_sharp",
           "constant_be", "auto_be", "auto_sec", "auto_vs_plain"]


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)


def figure(rows: list[dict], path: Path) -> None:
    plt = pyplot()
    if plt is None:
        return
    panels = sorted({(r["dataset"], r["optimizer"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (dataset, kind) in zip(axes[0], panels):
        sub = [r for r in rows if (r["dataset"], r["optimizer"]) == (dataset, kind)]
        for method, style in (("constant", "o-"), ("linear", "s--"), ("auto", "^-")):
            xs = [r["target"] for r in sub if f"{method}_acc" in r]
            ax.plot(xs, [r[f"{method}_acc"] for r in sub if f"{method}_acc" in r], style, label=method)
        ax.set_xscale("log")
        targets = sorted({r["target"] for r in sub})  # the grid itself as ticks, no crowded minor labels
        ax.set_xticks(targets, [f"{t:g}" for t in targets])
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel("target learning rate")
        ax.set_ylabel("final test accuracy (mean over seeds)")
        ax.set_title(f"{dataset}, {kind}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits,mnist")
    parser.add_argument("--optimizers", default="sgd,adamw")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default 600 digits, 300 mnist)")
    parser.add_argument("--warmup-lengths", default=None, help="comma list (default steps/20, steps/5, steps/2)")
    parser.add_argument("--lrs", default=None, help="override the target grid (comma list)")
    parser.add_argument("--methods", default="constant,linear,auto",
                        help="which of constant,linear,auto to run (plain always runs with auto or constant)")
    parser.add_argument("--reuse", default=None,
                        help="a previous result JSON: its runs of the methods not run now are kept "
                             "(same data, seeds and steps: those methods do not depend on sgdbreak's policy)")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--output", default=str(RESULTS / "warmup.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = set(args.methods.split(","))
    if not methods <= {"constant", "linear", "auto"}:
        parser.error(f"--methods: unknown {sorted(methods - {'constant', 'linear', 'auto'})}")
    results = []
    settings = {}  # dataset -> (steps, warmup lengths): reused runs must match them
    for dataset in args.datasets.split(","):
        steps = args.steps or (40 if args.quick else {"digits": 600, "mnist": 300}[dataset])
        lengths = ([int(w) for w in args.warmup_lengths.split(",")] if args.warmup_lengths
                   else sorted({max(1, steps // 20), max(1, steps // 5), max(1, steps // 2)}))
        settings[dataset] = (steps, lengths)
        for kind in args.optimizers.split(","):
            grid = [float(v) for v in args.lrs.split(",")] if args.lrs else LR_GRIDS[(dataset, kind)]
            if args.quick:
                grid = grid[1::3]
            for target in grid:
                for seed in seeds:
                    jobs = [("constant", None), ("auto", None)] + [("linear", w) for w in lengths]
                    for method, warmup in [job for job in jobs if job[0] in methods]:
                        r = run(dataset, kind, method, target, seed, steps, warmup)
                        results.append(r)
                        print(f"{dataset} {kind} lr={target:g} seed={seed} {method}{'' if warmup is None else warmup}: "
                              f"acc={r['test_accuracy']:.3f} div={r['diverged']} {r['seconds']:.1f}s", flush=True)
                    if seed == seeds[0]:
                        results.append(run(dataset, kind, "plain", target, seed, steps, measure=False))
    if args.reuse:
        kept = [r for r in json.loads(Path(args.reuse).read_text())["results"]
                if r["method"] not in methods | {"plain"} and r["seed"] in seeds
                and r["dataset"] in args.datasets.split(",") and r["optimizer"] in args.optimizers.split(",")
                and (not args.lrs or r["target"] in {float(v) for v in args.lrs.split(",")})]
        for r in kept:  # runs saved before "steps" was recorded are taken on trust
            steps, lengths = settings[r["dataset"]]
            if r.get("steps", steps) != steps or (r["method"] == "linear" and r["warmup"] not in lengths):
                parser.error(f"--reuse: {args.reuse} has a {r['dataset']} {r['method']} run with steps="
                             f"{r.get('steps')} warmup={r['warmup']}, this run uses steps={steps} "
                             f"warmup lengths {lengths}: rerun those methods or match the settings")
        print(f"reused {len(kept)} runs of {sorted({r['method'] for r in kept})} from {args.reuse}")
        results += kept
    rows = summarize(results)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "results": results, "rows": rows}, indent=1))
    print(markdown(rows))
    figure(rows, out.with_suffix(".png"))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
