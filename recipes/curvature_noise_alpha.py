"""R2: λ1^K against λ1^H and against α* along training, for a small and a large η.

The paper's Figure 2 and §4 (Jastrzebski et al. 2020): early in training λ1^K (gradient
noise) and λ1^H (sharpness) rise and fall together, and α*, the number of last steps one
can repeat before the loss rises by 20 % (a line search along the update), is
anti-correlated with λ1^K and falls to about 2 near break-even. Per run the recipe prints
the Spearman correlations of λ1^K with λ1^H and with α* (over the whole run and up to the
λ1^K peak), α* at the (raw) λ1^K peak and the smallest α*, and draws ``curvature_noise_alpha.png`` (λ1^K vs λ1^H, α* vs λ1^K).

Run:
    python recipes/curvature_noise_alpha.py --lrs 0.02,0.2 --seeds 0,1,2
    accelerate launch recipes/curvature_noise_alpha.py

Our choices: α* on 128 probe examples (doubling then bisection, rise 1.2 as in the paper),
measured at every full measurement, with λ1^H and λ1^K on the same 5 % probe.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipekit, also when imported from elsewhere

import numpy as np  # noqa: E402
from recipekit import Column, Recipe  # noqa: E402
from recipekit import main as run_recipe  # noqa: E402
from recipekit.analysis import new_figure, save, spearman  # noqa: E402
from recipekit.grid import print_table  # noqa: E402

from sgdbreak.integrations.rundir import read_run  # noqa: E402
from sgdbreak.integrations.summaries import _number  # noqa: E402


def _joint(run_dir: Path, *keys: str) -> np.ndarray:
    """(n, 1 + len(keys)) array of step and ``keys`` over records logging all of them."""
    rows = []
    for rec in read_run(run_dir).records:
        vals = [_number(rec.get(k)) for k in ("step", *keys)]
        if all(v is not None for v in vals):
            rows.append(vals)
    return np.asarray(rows, dtype=float).reshape(-1, 1 + len(keys))


def correlations(run_dir: Path) -> dict:
    """Spearman ρ(λ1^K, λ1^H) and ρ(λ1^K, α*), over the run and up to the λ1^K peak; min α*."""
    kh = _joint(run_dir, "lambda1_K", "lambda1_H")
    ka = _joint(run_dir, "lambda1_K", "alpha_star")
    out = {"rho_K_H": spearman(kh[:, 1], kh[:, 2]), "rho_K_alpha": spearman(ka[:, 1], ka[:, 2])}
    if kh.size:
        peak = int(np.argmax(kh[:, 1]))
        out["rho_K_H_early"] = spearman(kh[: peak + 1, 1], kh[: peak + 1, 2])
    if ka.size:
        peak = int(np.argmax(ka[:, 1]))
        out["rho_K_alpha_early"] = spearman(ka[: peak + 1, 1], ka[: peak + 1, 2])
        out["alpha_star_at_max_lambda1_K"] = float(ka[peak, 2])
        out["step_of_max_lambda1_K"] = int(ka[peak, 0])
        finite = ka[np.isfinite(ka[:, 2])]
        if finite.size:
            i = int(np.argmin(finite[:, 2]))
            out["min_alpha_star"], out["step_of_min_alpha_star"] = float(finite[i, 2]), int(finite[i, 0])
    return out


def analyze(runs, args, out: Path) -> dict:
    rows = []
    for spec, run_dir, _ in runs:
        rows.append({"lr": spec.lr, "batch_size": spec.batch_size, "seed": spec.seed, "model": spec.model,
                     **correlations(run_dir)})
    print("\nR2: Spearman correlations along training (early = up to the λ1^K peak)")
    print_table(rows, [Column("model", "model", "s"), Column("lr", "lr", "g"), Column("seed", "seed", "d"),
                       Column("ρ(λ1K,λ1H)", "rho_K_H", ".2f"), Column("early", "rho_K_H_early", ".2f"),
                       Column("ρ(λ1K,α*)", "rho_K_alpha", ".2f"), Column("early", "rho_K_alpha_early", ".2f"),
                       Column("α* at λ1K peak", "alpha_star_at_max_lambda1_K", ".3g"),
                       Column("(step)", "step_of_max_lambda1_K", "d"),
                       Column("min α*", "min_alpha_star", ".3g"), Column("at step", "step_of_min_alpha_star", "d")])
    figure = None
    if not args.no_figures:
        fig, (ax1, ax2) = new_figure(1, 2, size=(4.5, 3.8))
        first = min(spec.seed for spec, _, _ in runs)
        for spec, run_dir, _ in runs:
            if spec.seed != first:
                continue
            kh, ka = _joint(run_dir, "lambda1_K", "lambda1_H"), _joint(run_dir, "lambda1_K", "alpha_star")
            label = f"η={spec.lr:g} S={spec.batch_size}"
            ax1.plot(kh[:, 2], kh[:, 1], "o-", ms=3, lw=0.6, label=label)
            ax2.plot(ka[:, 1], ka[:, 2], "o-", ms=3, lw=0.6, label=label)
        ax1.set(xscale="log", yscale="log", xlabel=r"$\lambda_1^H$", ylabel=r"$\lambda_1^K$", title="λ1^K vs λ1^H")
        ax2.set(xscale="log", yscale="log", xlabel=r"$\lambda_1^K$", ylabel=r"$\alpha^*$", title="α* vs λ1^K")
        ax2.axhline(2.0, color="0.5", ls="--", lw=0.8)
        ax1.legend(fontsize=7)
        figure = save(fig, out / "curvature_noise_alpha")
        print(f"figure: {', '.join(figure)}")
    return {"runs": rows, "figure": figure}


RECIPE = Recipe(
    name="curvature_noise_alpha",
    description=__doc__.split("\n\n")[0],
    defaults=dict(output_dir="runs/curvature_noise_alpha", lrs=(0.02, 0.2), max_steps=300,
                  measurements=("hessian", "noise", "alpha_star")),
    columns=(
        Column("max λ1^K", "max_lambda1_K_smoothed"),
        Column("max λ1^H", "max_lambda1_H_smoothed"),
        Column("acc@peak λ1K", "train_accuracy_at_max_lambda1_K", ".2f"),
    ),
    analyze=analyze,
)


def main(argv=None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
