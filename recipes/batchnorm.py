"""R5: SimpleCNN with and without BatchNorm over η ∈ {0.001, 0.01, 0.1, 1.0}.

The paper's Figure 5 (Jastrzebski et al. 2020): with a small η even a batch-normalized
network stays badly conditioned: ‖g‖/‖g₅‖ (the mini-batch gradient's norm over its part in
the top-5 eigenvectors of K) stays near 1 and Tr K/λ1^K stays low; a large η first shrinks
‖γ‖ (the last BatchNorm layer's scale) and reaches better conditioning; η = 1.0 diverges
without BatchNorm. Per run the table gives the peaks of λ1^H and λ1^K, Tr K/λ1^K,
‖g‖/‖g₅‖ (mean over the last third of the run) and ‖γ‖ at the start, its minimum and at
the end; ``batchnorm.png`` draws ‖g‖/‖g₅‖, ‖γ‖ and Tr K/λ1^K against the step.

Run:
    python recipes/batchnorm.py --lrs 0.001,0.01,0.1,1.0 --seeds 0,1
    accelerate launch recipes/batchnorm.py

Our choices: ‖g‖/‖g₅‖ uses the probe gradient (the paper: a mini-batch gradient); a run
whose training loss stops being finite stops there and is marked diverged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipekit, also when imported from elsewhere

from recipekit import Column, Recipe  # noqa: E402
from recipekit import main as run_recipe  # noqa: E402
from recipekit.analysis import new_figure, save, series  # noqa: E402
from recipekit.grid import print_table  # noqa: E402


def conditioning(run_dir: Path) -> dict:
    """‖g‖/‖g₅‖ over the last third of the run, and ‖γ‖ first / min / last."""
    out: dict = {}
    steps, ratio = series(run_dir, "g_top5_ratio")
    if ratio.size:
        out["g_top5_ratio_late"] = float(ratio[steps >= steps[-1] * 2 / 3].mean())
    _, gamma = series(run_dir, "bn_gamma_norm")
    if gamma.size:
        out.update(gamma_first=float(gamma[0]), gamma_min=float(gamma.min()), gamma_last=float(gamma[-1]))
    _, rank = series(run_dir, "stable_rank_K")
    if rank.size:
        out["stable_rank_K_late"] = float(rank[-max(1, rank.size // 3):].mean())
    return out


def analyze(runs, args, out: Path) -> dict:
    rows = [{"model": s.model, "lr": s.lr, "seed": s.seed, **conditioning(d)} for s, d, _ in runs]
    print("\nR5: conditioning late in the run (last third), and ‖γ‖ of the last BatchNorm layer")
    print_table(rows, [Column("model", "model", "s"), Column("lr", "lr", "g"), Column("seed", "seed", "d"),
                       Column("‖g‖/‖g5‖ late", "g_top5_ratio_late", ".3g"),
                       Column("TrK/λ1K late", "stable_rank_K_late", ".3g"),
                       Column("‖γ‖ start", "gamma_first", ".3g"), Column("‖γ‖ min", "gamma_min", ".3g"),
                       Column("‖γ‖ end", "gamma_last", ".3g")])
    figure = None
    if not args.no_figures:
        keys = ("g_top5_ratio", "stable_rank_K", "bn_gamma_norm", "lambda1_K")
        fig, axes = new_figure(1, len(keys))
        first = min(spec.seed for spec, _, _ in runs)
        chosen = [(spec, run_dir) for spec, run_dir, _ in runs if spec.seed == first]
        for index, (spec, run_dir) in enumerate(chosen):
            for ax, key in zip(axes, keys, strict=True):
                steps, vals = series(run_dir, key)
                if vals.size:  # one colour per run in every panel (‖γ‖ exists only with BN)
                    ax.plot(steps, vals, "-" if spec.model.endswith("-bn") else "--", lw=1, color=f"C{index % 10}",
                            label=f"{'BN' if spec.model.endswith('-bn') else 'no BN'} η={spec.lr:g}")
        for ax, key in zip(axes, keys, strict=True):
            ax.set(xlabel="step", title=key)
        axes[-1].set_yscale("log")
        axes[0].legend(fontsize=6)
        figure = save(fig, out / "batchnorm")
        print(f"figure: {', '.join(figure)}")
    return {"runs": rows, "figure": figure}


RECIPE = Recipe(
    name="batchnorm",
    description=__doc__.split("\n\n")[0],
    defaults=dict(output_dir="runs/batchnorm", lrs=(0.001, 0.01, 0.1, 1.0), max_steps=300,
                  models=("simplecnn", "simplecnn-bn"), measurements=("hessian", "noise", "bn_gamma_norm")),
    columns=(
        Column("max λ1^H", "max_lambda1_H_smoothed"),
        Column("max λ1^K", "max_lambda1_K_smoothed"),
        Column("max TrK/λ1K", "max_stable_rank_K_smoothed"),
        Column("max ‖g‖/‖g5‖", "max_g_top5_ratio_smoothed"),
    ),
    analyze=analyze,
)


def main(argv=None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
