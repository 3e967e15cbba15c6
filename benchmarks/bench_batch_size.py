"""BreakEvenBatchSampler (the batch-size controller) against fixed batch sizes, on real data.

For each data set, learning-rate rule and seed it trains, for the same budget of examples
(epochs) and with the same epoch permutations:

* ``fixed S`` for S in {S0, 4·S0, 16·S0} (small, medium, large), the learning rate scaled
  from the base rate at S0 by the same rule as the controller (``linear``: η0·S/S0,
  ``sqrt``: η0·√(S/S0));
* ``controller``: :class:`sgdbreak.BreakEvenBatchSampler` with ``batch_size=S0``,
  ``max_batch_size=16·S0`` and the rule, nothing tuned (library defaults: smoothing 0.5,
  edge margin 0.9, the monitor's default cadence and detector);
* ``plain``: plain ``torch.optim.SGD`` at S0 without a monitor (seed 0 only), for the
  wall-time ratio.

Every monitored run carries the library's default monitor (adaptive full measurements of
λ1^H and the noise spectrum on a 256-example probe, the cheap signal), so max λ1^H, max λ1^K
and the break-even step are measured the same way for all. Test accuracy is evaluated every
``--eval-every`` epochs; "steps/examples to target" are those of the first evaluation at or
above the target accuracy (None if never).

    python benchmarks/bench_batch_size.py --datasets digits
    python benchmarks/bench_batch_size.py --datasets mnist --epochs 6
    python benchmarks/bench_batch_size.py --datasets digits --seeds 0 --quick   # smoke test

Writes ``benchmarks/results/batch_size_<datasets>.json`` (every run, with its S over steps,
and the summary rows) and prints the table.
"""

from __future__ import annotations

import argparse
import json
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
from sgdbreak.optim.batch_size import lr_factor  # noqa: E402
from sgdbreak.workloads import datasets, models  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {  # S0, base lr at S0 (SGD, momentum 0.9), target test accuracy, epochs
    "digits": {"batch": 16, "lr": 0.1, "target": 0.97, "epochs": 20},
    "mnist": {"batch": 16, "lr": 0.02, "target": 0.9, "epochs": 3, "train": 2000},
}


def load(name: str, seed: int):
    """Train/test tensors and a fresh model for ``seed``."""
    if name == "digits":
        x, y = datasets.load_digits()
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(100))
        x, y = x[order], y[order]
        torch.manual_seed(seed)
        return models.MLP(64, (128, 128), activation="tanh"), (x[:1397], y[:1397]), (x[1397:], y[1397:])
    x, y = datasets.load_mnist_embedded()
    torch.manual_seed(seed)
    m = SETTINGS["mnist"]["train"]  # reduced for the shared 2-core machine (of the 5,000 embedded images)
    return models.SimpleCNN(1, 10, 28, init="glorot"), (x[:m], y[:m]), (x[4000:], y[4000:])


def accuracy(model: nn.Module, data) -> float:
    model.eval()
    with torch.no_grad():
        out = sum(int((model(data[0][i:i + 500]).argmax(1) == data[1][i:i + 500]).sum())
                  for i in range(0, len(data[0]), 500))
    model.train()
    return out / len(data[0])


def run(dataset: str, method: str, rule: str, size: int, seed: int, epochs: float, eval_every: float,
        measure: bool = True) -> dict:
    """One training run; ``method`` is "fixed", "controller" or "plain" (``size`` = S, or S0)."""
    cfg = SETTINGS[dataset]
    s0 = cfg["batch"]
    model, train, test = load(dataset, seed)
    n = len(train[0])
    lr = cfg["lr"] * (1.0 if method == "controller" else lr_factor(rule, size / s0))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    monitor = None
    if measure:
        probe_idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:256]
        probe = sgdbreak.Probe(model, nn.CrossEntropyLoss(), (train[0][probe_idx], train[1][probe_idx]))
        monitor = sgdbreak.BreakEvenMonitor(probe, seed=seed).attach(opt)
    if method == "controller":
        batches = sgdbreak.BreakEvenBatchSampler(n, opt, batch_size=s0, max_batch_size=16 * s0, lr_rule=rule,
                                                 seed=seed, monitor=monitor)
    else:  # the same epoch permutations, a size that never changes
        batches = None
    budget = int(epochs * n)
    eval_examples = max(1, int(eval_every * n))
    examples, step, next_eval, epoch = 0, 0, eval_examples, 0
    curve, sizes = [], [(0, size)]
    start, cpu_start = time.perf_counter(), time.process_time()
    diverged = False
    while examples < budget and not diverged:
        if batches is not None:
            epoch_batches = iter(batches)
        else:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
            epoch_batches = (order[i:i + size].tolist() for i in range(0, n, size))
        for idx in epoch_batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(train[0][idx]), train[1][idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            loss.backward()
            opt.step()
            step += 1
            examples += len(idx)
            if batches is not None and batches.batch_size != sizes[-1][1]:
                sizes.append((step, batches.batch_size))
            if examples >= next_eval or examples >= budget:
                curve.append((step, examples, accuracy(model, test)))
                next_eval += eval_examples
            if examples >= budget:
                break
        epoch += 1
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    final = 0.1 if diverged else accuracy(model, test)
    diverged = diverged or final <= 0.15
    hit = next(((s, e) for s, e, a in curve if a >= cfg["target"]), (None, None))
    out = {"dataset": dataset, "method": method, "rule": rule, "size": size, "seed": seed, "steps": step,
           "examples": examples, "final_accuracy": final, "diverged": diverged, "seconds": wall, "cpu_seconds": cpu,
           "steps_to_target": hit[0], "examples_to_target": hit[1], "curve": curve, "sizes": sizes,
           "target": cfg["target"], "base_lr": cfg["lr"], "lr": lr}
    if monitor is not None:
        h = [r["lambda1_H"] for r in monitor.history if "lambda1_H" in r]
        k = [r["lambda1_K"] for r in monitor.history if "lambda1_K" in r]
        out.update(max_lambda1_H=max(h) if h else None, max_lambda1_K=max(k) if k else None,
                   break_even_step=monitor.break_even.step, num_measurements=monitor.num_measurements)
        if method == "controller":
            out["final_lr_factor"] = batches.controller.lr_factor
            out["events"] = [e for e in monitor.events if e["event"].startswith("batch_size")]
    return out


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def summarize(results: list[dict]) -> list[dict]:
    rows = []
    keys = sorted({(r["dataset"], r["rule"], r["method"], r["size"]) for r in results if r["method"] != "plain"},
                  key=lambda k: (k[0], k[1], k[2] != "fixed", k[3]))
    for dataset, rule, method, size in keys:
        runs = [r for r in results if (r["dataset"], r["rule"], r["method"], r["size"]) == (dataset, rule, method, size)]
        plain = [r for r in results if r["dataset"] == dataset and r["method"] == "plain"]
        reached = [r for r in runs if r["steps_to_target"] is not None]
        row = {"dataset": dataset, "rule": rule, "run": f"fixed S={size}" if method == "fixed" else f"controller S0={size}",
               "seeds": len(runs), "reached": len(reached),
               "steps_to_target": _mean([r["steps_to_target"] for r in reached]),
               "examples_to_target": _mean([r["examples_to_target"] for r in reached]),
               "final_accuracy": _mean([r["final_accuracy"] for r in runs]),
               "min_accuracy": min(r["final_accuracy"] for r in runs),
               "diverged": sum(r["diverged"] for r in runs),
               "steps": _mean([r["steps"] for r in runs]),
               "max_lambda1_H": _mean([r.get("max_lambda1_H") for r in runs]),
               "max_lambda1_K": _mean([r.get("max_lambda1_K") for r in runs]),
               "break_even_step": _mean([r.get("break_even_step") for r in runs]),
               "seconds": _mean([r["seconds"] for r in runs]),
               "cpu_seconds": _mean([r["cpu_seconds"] for r in runs])}
        if method == "controller":
            row["final_S"] = _mean([r["sizes"][-1][1] for r in runs])
            row["final_lr_factor"] = _mean([r.get("final_lr_factor") for r in runs])
        if plain:
            row["cpu_vs_plain"] = row["cpu_seconds"] / statistics.mean(r["cpu_seconds"] for r in plain)
        rows.append(row)
    return rows


COLUMNS = ["dataset", "rule", "run", "reached", "steps_to_target", "examples_to_target", "final_accuracy",
           "min_accuracy", "diverged", "steps", "max_lambda1_H", "max_lambda1_K", "break_even_step", "final_S",
           "final_lr_factor", "seconds", "cpu_seconds", "cpu_vs_plain"]


def markdown(rows: list[dict]) -> str:
    return markdown_table(rows, COLUMNS)


def figure(results: list[dict], path: Path) -> None:
    """Per data set and rule: test accuracy against optimizer steps (seed 0) and the controller's S."""
    plt = pyplot()
    if plt is None:
        return
    panels = sorted({(r["dataset"], r["rule"]) for r in results if r["method"] != "plain"})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.4 * len(panels), 6.4), squeeze=False)
    for col, (dataset, rule) in enumerate(panels):
        runs = [r for r in results if (r["dataset"], r["rule"]) == (dataset, rule)]
        first = min(r["seed"] for r in runs)
        ax = axes[0][col]
        for r in sorted(runs, key=lambda r: (r["method"] != "fixed", r["size"])):
            if r["seed"] != first:
                continue
            label = f"fixed S={r['size']}" if r["method"] == "fixed" else "controller"
            ax.plot([c[0] for c in r["curve"]], [c[2] for c in r["curve"]], "-" if r["method"] == "fixed" else "k-",
                    lw=1.2 if r["method"] == "fixed" else 2.0, label=label)
        ax.axhline(runs[0]["target"], color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(max(0.0, runs[0]["target"] - 0.2), 1.0)
        ax.set_xlabel("optimizer steps")
        ax.set_ylabel(f"test accuracy (seed {first})")
        ax.set_title(f"{dataset}, lr rule {rule}")
        ax.legend(fontsize=7)
        ax = axes[1][col]
        for r in runs:
            if r["method"] != "controller":
                continue
            xs = [step for step, _ in r["sizes"]] + [r["steps"]]
            ys = [size for _, size in r["sizes"]] + [r["sizes"][-1][1]]
            ax.step(xs, ys, where="post", label=f"seed {r['seed']}")
            if r.get("break_even_step") is not None:
                ax.axvline(r["break_even_step"], color="C3", ls=":", lw=0.8)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("optimizer steps (dotted: break-even step)")
        ax.set_ylabel("controller batch size S")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"figure: {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default="digits")
    parser.add_argument("--rules", default="sqrt,linear")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=float, default=None, help="budget in epochs (default per data set)")
    parser.add_argument("--eval-every", type=float, default=0.25, help="test accuracy every this many epochs")
    parser.add_argument("--quick", action="store_true", help="tiny settings, for a smoke test")
    parser.add_argument("--output", default=None)
    parser.add_argument("--replot", default=None, help="only redraw the figure of this result JSON")
    parser.add_argument("--merge", nargs="+", default=None,
                        help="only merge these result JSONs (e.g. one per seed, run in parallel) into --output")
    args = parser.parse_args(argv)
    if args.merge:
        merged = [r for path in args.merge for r in json.loads(Path(path).read_text())["results"]]
        out = Path(args.output)
        out.write_text(json.dumps({"argv": sys.argv[1:], "settings": SETTINGS, "results": merged,
                                   "rows": summarize(merged)}, indent=1, default=str))
        print(markdown(summarize(merged)))
        figure(merged, out.with_suffix(".png"))
        return 0
    if args.replot:
        figure(json.loads(Path(args.replot).read_text())["results"], Path(args.replot).with_suffix(".png"))
        return 0
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.datasets.split(",")
    results = []
    out = Path(args.output or RESULTS / f"batch_size_{'_'.join(names)}.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> list[dict]:  # after every run: a long benchmark that is stopped keeps what it measured
        rows = summarize(results)
        out.write_text(json.dumps({"argv": sys.argv[1:], "settings": SETTINGS, "results": results, "rows": rows},
                                  indent=1, default=str))
        return rows

    for dataset in names:
        epochs = args.epochs or (0.5 if args.quick else SETTINGS[dataset]["epochs"])
        s0 = SETTINGS[dataset]["batch"]
        for rule in args.rules.split(","):
            for seed in seeds:
                jobs = [("fixed", s0 * k) for k in ((1, 16) if args.quick else (1, 4, 16))] + [("controller", s0)]
                for method, size in jobs:
                    r = run(dataset, method, rule, size, seed, epochs, args.eval_every)
                    results.append(r)
                    print(f"{dataset} {rule} seed={seed} {method} S={size}: acc={r['final_accuracy']:.3f} "
                          f"steps={r['steps']} to-target={r['steps_to_target']} final S={r['sizes'][-1][1]} "
                          f"be={r.get('break_even_step')} {r['seconds']:.1f}s ({r['cpu_seconds']:.1f}s CPU)", flush=True)
                    save()
        results.append(run(dataset, "plain", "none", s0, seeds[0], epochs, args.eval_every, measure=False))
    rows = save()
    print(markdown(rows))
    figure(results, out.with_suffix(".png"))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
