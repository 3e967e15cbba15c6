"""λ1^H on SimpleCNN with a 1,000-example probe: cold Lanczos, warm Lanczos, power iteration.

For each method: Hessian-vector products and seconds to reach λ1^H within 1e-3 relative
of a tight reference (residual ≤ 1e-4·λ), and the cost in plain SGD steps (batch 128)
timed in the same run. Also the products after which the estimate was first within the
tolerance (the solver stops later, when its own error estimate says so) and the error of
the first Rayleigh-Ritz value (for the warm start: how far the previous eigenvectors are
from the new top eigenvector after one SGD step). Measured at several points of a short training run, so the warm
start faces the real motion of the top eigenvector after one SGD step.

    python benchmarks/bench_hessian.py [--probe-size 1000] [--points 4] [--lr 0.05] [--warm-after 1 10]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from common import setup, sgd_step, table, time_sgd_steps, timed
from torch import nn

from sgdbreak import Probe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--probe-size", type=int, default=1000)
    ap.add_argument("--points", type=int, default=4, help="training points measured")
    ap.add_argument("--steps-between", type=int, default=40, help="SGD steps between points")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--tol", type=float, default=1e-3)
    ap.add_argument("--warm-after", type=int, nargs="+", default=[1],
                    help="SGD steps between the previous solve and the warm-started one (e.g. 1 10)")
    ap.add_argument("--skip-power", action="store_true", help="skip the (slow) power-iteration baseline")
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()

    model, x, y, px, py = setup(probe_size=args.probe_size)
    model.to(args.device)
    x, y, px, py = (t.to(args.device) for t in (x, y, px, py))
    probe = Probe(model, nn.CrossEntropyLoss(), (px, py))
    sgd = time_sgd_steps(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(0)

    def train_step():
        sgd_step(model, opt, x, y, g)
        opt.zero_grad()  # no gradients held while measuring

    warm_names = {gap: f"warm lanczos (after {gap} step{'s' if gap > 1 else ''})" for gap in args.warm_after}
    rows = {"cold lanczos": [], **{name: [] for name in warm_names.values()}, "cold power (<=100)": []}
    for point in range(args.points):
        for _ in range(args.steps_between if point else 5):
            train_step()
        for i, gap in enumerate(args.warm_after):
            # The previous measurement, as the monitor takes it (tol 1e-3), then `gap` SGD steps.
            previous = probe.hessian_eigenvalues(tol=args.tol, max_hvps=100,
                                                 generator=torch.Generator().manual_seed(9))
            for _ in range(gap):
                train_step()
            # Reference: residual ≤ 1e-4·λ, so the eigenvalue error (~‖r‖²/gap) is far below 1e-3.
            reference = probe.hessian_eigenvalues(tol=1e-4, convergence="residual", max_hvps=150,
                                                  generator=torch.Generator().manual_seed(7)).eigenvalues.item()

            def solve(seed=point, **kwargs):
                return probe.hessian_eigenvalues(tol=args.tol, max_hvps=100,
                                                 generator=torch.Generator().manual_seed(seed), **kwargs)

            runs = {warm_names[gap]: lambda prev=previous: solve(warm_start=prev)}
            if i == 0:  # the cold solves once per point
                runs["cold lanczos"] = solve
                if not args.skip_power:
                    runs["cold power (<=100)"] = lambda: solve(solver="power")
            for name, fn in runs.items():
                res, seconds = timed(fn)
                err = abs(res.eigenvalues.item() - reference) / abs(reference)
                errors = [(n, abs(t - reference) / abs(reference)) for n, t in res.estimates]
                reached = next((n for n, e in errors if e <= args.tol), None)
                rows[name].append({"hvps": res.num_hvps, "seconds": seconds, "err": err, "ref": reference,
                                   "reached": reached, "first": errors[0] if errors else None})
    out = []
    for name, rs in rows.items():
        if not rs:
            continue
        out.append({
            "method": name,
            "median hvps": statistics.median(r["hvps"] for r in rs),
            "max hvps": max(r["hvps"] for r in rs),
            "median s": statistics.median(r["seconds"] for r in rs),
            "x SGD step": statistics.median(r["seconds"] for r in rs) / sgd,
            "max rel err": max(r["err"] for r in rs),
            "within 1e-3": f"{sum(r['err'] <= 1e-3 for r in rs)}/{len(rs)}",
            # Products after which the estimate was first within tol (the solver cannot
            # know this; it stops later, when its error estimate is small enough).
            "median hvps to tol": _median_or_none([r["reached"] for r in rs]),
            # Relative error of the first Rayleigh-Ritz value: for the warm start, how far
            # the previous eigenvectors are from the new top one after the SGD step.
            "median first err": _median_or_none([r["first"][1] for r in rs if r["first"]]),
            "first after hvps": _median_or_none([r["first"][0] for r in rs if r["first"]]),
        })
    hvp = statistics.median(r["seconds"] / r["hvps"] for r in rows["cold lanczos"])
    print(f"SimpleCNN (28x28 MNIST), probe {args.probe_size}, tol {args.tol}, lr {args.lr}; "
          f"plain torch.optim.SGD step (batch 128): {sgd * 1e3:.1f} ms; "
          f"one HVP incl. graph share: {hvp:.2f} s = {hvp / sgd:.1f} SGD steps")
    print("lambda1_H references:", ", ".join(f"{r['ref']:.4g}" for r in rows["cold lanczos"]))
    print(table(out, ["method", "median hvps", "max hvps", "median s", "x SGD step", "max rel err", "within 1e-3",
                      "median hvps to tol", "median first err", "first after hvps"]))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"device": args.device, "probe": args.probe_size, "sgd_step_s": sgd, "hvp_s": hvp,
                       "rows": out}, f, indent=1)


def _median_or_none(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


if __name__ == "__main__":
    main()
