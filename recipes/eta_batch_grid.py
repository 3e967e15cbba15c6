"""R3/R4: an η grid at fixed S and an S grid at fixed η; λ1^K, Tr K/λ1^K, λ1^H, Tr H/λ1^H per epoch.

The paper's Figures 3 and 4 (Jastrzebski et al. 2020): a larger learning rate η or a
smaller batch size S reaches lower peaks of λ1^K and λ1^H (Conjecture 1) and a larger peak
of Tr K/λ1^K (Conjecture 2). Every combination of ``--lrs`` × ``--batch-sizes`` × ``--seeds``
is one run; the table gives each run's peaks, ``per_epoch.csv`` the four quantities per
epoch (means over the epoch's measurements, then over seeds), and the verdicts say per seed
and over seeds whether the conjectures hold.

Run:
    python recipes/eta_batch_grid.py --lrs 0.01,0.03,0.1 --batch-sizes 128          # R3/R4, η grid
    python recipes/eta_batch_grid.py --lrs 0.1 --batch-sizes 32,128,512 --epochs 4  # S grid
    accelerate launch recipes/eta_batch_grid.py --seeds 0,1,2

Our choices: Tr H/λ1^H uses the paper's proxy, the sum of the top-5 Hessian eigenvalues
(``--hessian-k 5``); the default data is the embedded real MNIST; plain SGD; L = 20.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipekit, also when imported from elsewhere

from recipekit import Column, Recipe  # noqa: E402
from recipekit import main as run_recipe  # noqa: E402
from recipekit.analysis import comparison_figure, per_epoch_table  # noqa: E402

QUANTITIES = ("lambda1_K", "stable_rank_K", "lambda1_H", "top5_ratio_H")


def analyze(runs, args, out: Path) -> dict:
    table = per_epoch_table(runs, QUANTITIES, out / "per_epoch.csv")
    figure = None if args.no_figures else comparison_figure(runs, out / "grid_comparison")
    return {"per_epoch": table, "figure": figure}


RECIPE = Recipe(
    name="eta_batch_grid",
    description=__doc__.split("\n\n")[0],
    defaults=dict(output_dir="runs/eta_batch_grid", lrs=(0.01, 0.03, 0.1), max_steps=300,
                  measurements=("hessian", "noise"), hessian_k=5),
    columns=(
        Column("max λ1^K", "max_lambda1_K_smoothed"),
        Column("max TrK/λ1K", "max_stable_rank_K_smoothed"),
        Column("TrK/λ1K@peak λ1K", "stable_rank_K_at_max_lambda1_K"),
        Column("max λ1^H", "max_lambda1_H_smoothed"),
        Column("max TrH/λ1H", "max_top5_ratio_H_smoothed"),
        Column("acc@peak λ1K", "train_accuracy_at_max_lambda1_K", ".2f"),
    ),
    analyze=analyze,
)


def main(argv=None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
