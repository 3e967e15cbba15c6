"""R6: an LSTM and an MLP, to see whether the conclusions carry over beyond the CNN.

The paper's §5 (Jastrzebski et al. 2020) repeats the η and S comparisons on an LSTM (IMDB),
an MLP (FashionMNIST), DenseNet and BERT, and finds the same ordering: a larger η (or a
smaller S) reaches lower peaks of λ1^K and λ1^H and a better conditioned K. Without a text
data set the LSTM reads MNIST row by row (28 steps of 28 pixels); with ``--dataset imdb
--data-dir DIR`` it is the paper's LSTM on IMDB; ``--dataset fashion-mnist --data-dir DIR``
gives the paper's MLP setting. Conjecture 1 and 2 verdicts are given per model.

Run:
    python recipes/other_models.py --models lstm,mlp --lrs 0.1,1.0 --seeds 0,1,2
    accelerate launch recipes/other_models.py --dataset fashion-mnist --data-dir data --models mlp

Our choices: LSTM with 64 hidden units reading rows (the last hidden state classifies), the
MLP 784-200-200-10 with tanh and Glorot init, plain SGD; default η larger than the CNN's
(both models are far flatter at initialisation).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipekit, also when imported from elsewhere

from recipekit import Column, Recipe  # noqa: E402
from recipekit import main as run_recipe  # noqa: E402
from recipekit.analysis import comparison_figure  # noqa: E402


def analyze(runs, args, out: Path) -> dict:
    if args.no_figures:
        return {}
    paths = comparison_figure(runs, out / "other_models", keys=("lambda1_K", "stable_rank_K", "lambda1_H"))
    print(f"figure: {', '.join(paths)}")
    return {"figure": paths}


RECIPE = Recipe(
    name="other_models",
    description=__doc__.split("\n\n")[0],
    defaults=dict(output_dir="runs/other_models", lrs=(0.1, 1.0), max_steps=300, models=("lstm", "mlp"),
                  measurements=("hessian", "noise")),
    columns=(
        Column("max λ1^K", "max_lambda1_K_smoothed"),
        Column("max TrK/λ1K", "max_stable_rank_K_smoothed"),
        Column("max λ1^H", "max_lambda1_H_smoothed"),
        Column("acc@peak λ1K", "train_accuracy_at_max_lambda1_K", ".2f"),
    ),
    analyze=analyze,
)


def main(argv=None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
