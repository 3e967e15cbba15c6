"""R1: trajectories of a small-η and a large-η run from the same start, with λ1^K along them.

The paper's Figure 1 (Jastrzebski et al. 2020): SimpleCNN runs with η = 0.01 and η = 0.1
follow the same path at first and separate when the small-η run enters the region of high
λ1^K (the spectral norm of the gradient covariance). Both runs of a seed start from the
same weights and see the same batches, so their parameter distance ‖θ_small(t) − θ_large(t)‖
measures only the effect of η. The large-η run moves faster along the same path, so the
recipe also measures how far each point of the small-η run is from the large-η *path*
(nearest snapshot). Per seed it prints both distances at the end, the separation step
(the path distance first reaches half its maximum) and the step where the small-η run's
smoothed λ1^K first reaches half of its peak; ``trajectories.png`` shows both trajectories projected
on their top-2 principal axes, coloured by λ1^K, and the distance against the step.

Run:
    python recipes/trajectories.py --lrs 0.01,0.1 --max-steps 300 --seeds 0,1,2
    accelerate launch recipes/trajectories.py

Our choices: parameter space (the paper embeds test predictions with UMAP), PCA for the
2-D view, a snapshot every ``--snapshot-every`` steps, only λ1^K measured (no Hessian: cheaper).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # recipekit, also when imported from elsewhere

import numpy as np  # noqa: E402
import torch  # noqa: E402
from recipekit import Column, Recipe  # noqa: E402
from recipekit import main as run_recipe  # noqa: E402
from recipekit.analysis import new_figure, save, series, trajectory_projection  # noqa: E402
from recipekit.args import positive_int  # noqa: E402
from recipekit.grid import print_table  # noqa: E402

SNAPSHOTS = "trajectory.npz"


class Snapshots:
    """Hook: the flattened parameters (float32) at step 0 and every ``every`` steps."""

    def __init__(self, every: int) -> None:
        self.every = every
        self.steps: list[int] = []
        self.params: list[np.ndarray] = []

    def _take(self, step: int, model: torch.nn.Module) -> None:
        flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in model.parameters()])
        self.steps.append(step)
        self.params.append(flat.numpy().copy())

    def on_start(self, model, run_dir) -> None:
        self._take(0, model)

    def on_step(self, step: int, model) -> None:
        if step % self.every == 0:
            self._take(step, model)

    def on_end(self, run_dir: Path) -> None:
        np.savez_compressed(run_dir / SNAPSHOTS, steps=np.asarray(self.steps), params=np.stack(self.params))


def add_arguments(parser) -> None:
    parser.add_argument("--snapshot-every", type=positive_int, default=5,
                        help="keep the parameters every n steps (default %(default)s)")


def check(parser, args) -> None:
    if len(args.lr) < 2:
        parser.error("--lrs: give at least two learning rates (the smallest and largest are compared)")


def _half_peak_step(steps: np.ndarray, values: np.ndarray, window: int = 5) -> float | None:
    from sgdbreak.integrations.summaries import moving_average

    if values.size == 0:
        return None
    smooth = moving_average(values, min(window, values.size))
    above = np.nonzero(smooth >= 0.5 * smooth.max())[0]
    return float(steps[above[0]]) if above.size else None


def analyze(runs, args, out: Path) -> dict:
    small, large = min(args.lr), max(args.lr)
    pairs = {}
    for spec, run_dir, _ in runs:
        if spec.lr in (small, large):
            pairs.setdefault((spec.model, spec.batch_size, spec.seed), {})[spec.lr] = run_dir
    rows, drawn = [], None
    for (model, bs, seed), dirs in pairs.items():
        if len(dirs) < 2:
            continue
        a, b = (np.load(dirs[lr] / SNAPSHOTS) for lr in (small, large))
        n = min(len(a["steps"]), len(b["steps"]))
        steps = a["steps"][:n]
        distance = np.linalg.norm(a["params"][:n].astype(np.float64) - b["params"][:n], axis=1)
        path = path_distance(a["params"][:n], b["params"][:n])
        final = float(path[-1])
        sep = steps[np.nonzero(path >= 0.5 * path.max())[0][0]] if path.max() > 0 else None
        k_steps, k_vals = series(dirs[small], "lambda1_K")
        kl_steps, kl_vals = series(dirs[large], "lambda1_K")
        rows.append({"model": model, "batch_size": bs, "seed": seed, "final_distance": float(distance[-1]),
                     "final_path_distance": final,
                     "separation_step": None if sep is None else int(sep),
                     "small_lr_half_peak_K_step": _half_peak_step(k_steps, k_vals),
                     "small_lr_peak_K": float(k_vals.max()) if k_vals.size else None,
                     "large_lr_peak_K": float(kl_vals.max()) if kl_vals.size else None})
        if drawn is None and not args.no_figures:
            drawn = _figure(out / "trajectories", a["params"][:n], b["params"][:n], steps, distance, path,
                            (k_steps, k_vals), (kl_steps, kl_vals), small, large)
    print(f"\nR1 trajectories: η = {small:g} vs η = {large:g} from the same start (parameter distances at the end)")
    from recipekit.grid import Column as C

    print_table(rows, [C("model", "model", "s"), C("S", "batch_size", "d"), C("seed", "seed", "d"),
                       C("‖Δθ‖ same step", "final_distance"), C("to the other path", "final_path_distance"),
                       C("separation step", "separation_step", "d"),
                       C(f"η={small:g}: λ1^K ½-peak step", "small_lr_half_peak_K_step", "g"),
                       C(f"max λ1^K η={small:g}", "small_lr_peak_K"), C(f"max λ1^K η={large:g}", "large_lr_peak_K")])
    if drawn:
        print(f"figure: {', '.join(drawn)}")
    return {"pairs": rows, "figure": drawn}


def path_distance(small: np.ndarray, large: np.ndarray) -> np.ndarray:
    """For each snapshot of the small-η run, its distance to the nearest point of the large-η path.

    The large-η run moves about η_large/η_small times faster, so the distance at equal steps
    grows from the first step even when both follow one path; the distance to the other
    *path* stays small while the small-η run follows it and grows when they separate.
    """
    a, b = small.astype(np.float64), large.astype(np.float64)
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.sqrt(np.clip(sq, 0.0, None)).min(axis=1)


def _figure(stem, ta, tb, steps, distance, path, k_small, k_large, small, large) -> list[str]:
    from matplotlib.colors import LogNorm

    pa, pb = trajectory_projection(ta, tb)
    fig, (ax1, ax2) = new_figure(1, 2, size=(5.0, 4.0))
    kz = [np.interp(steps, *k) if k[1].size else np.full(len(steps), np.nan) for k in (k_small, k_large)]
    finite = np.concatenate([k[np.isfinite(k)] for k in kz])
    norm = LogNorm(vmin=max(finite.min(), 1e-6), vmax=finite.max()) if finite.size and finite.min() > 0 else None
    for proj, kv, marker, lr in ((pa, kz[0], "o", small), (pb, kz[1], "s", large)):
        ax1.plot(proj[:, 0], proj[:, 1], color="0.7", lw=0.8, zorder=1)
        sc = ax1.scatter(proj[:, 0], proj[:, 1], c=kv, cmap="viridis", norm=norm, marker=marker, s=14,
                         label=f"η={lr:g}", zorder=2)
    fig.colorbar(sc, ax=ax1, label=r"$\lambda_1^K$")
    ax1.scatter([pa[0, 0]], [pa[0, 1]], marker="*", color="red", s=80, label="start", zorder=3)
    ax1.set_xlabel("PC 1")
    ax1.set_ylabel("PC 2")
    ax1.legend(fontsize=7)
    ax1.set_title("trajectories (top-2 principal axes)")
    ax2.plot(steps, distance, color="black", label="at the same step")
    ax2.plot(steps, path, color="tab:red", label=f"η={small:g} run to the η={large:g} path")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_xlabel("step")
    ax2.set_ylabel("parameter distance")
    twin = ax2.twinx()
    for (s, v), lr, style in ((k_small, small, "--"), (k_large, large, ":")):
        if v.size:
            twin.plot(s, v, style, label=rf"$\lambda_1^K$ η={lr:g}")
    twin.set_yscale("log")
    twin.set_ylabel(r"$\lambda_1^K$")
    twin.legend(fontsize=7, loc="upper left")
    ax2.set_title("distance and λ1^K along training")
    return save(fig, stem)


RECIPE = Recipe(
    name="trajectories",
    description=__doc__.split("\n\n")[0],
    defaults=dict(output_dir="runs/trajectories", lrs=(0.01, 0.1), max_steps=300, measurements=("noise",),
                  measure_every=5),
    columns=(
        Column("max λ1^K", "max_lambda1_K_smoothed"),
        Column("max TrK/λ1K", "max_stable_rank_K_smoothed"),
        Column("acc@peak λ1K", "train_accuracy_at_max_lambda1_K", ".2f"),
    ),
    add_arguments=add_arguments,
    check=check,
    hooks=lambda spec, args: [Snapshots(args.snapshot_every)],
    analyze=analyze,
)


def main(argv=None) -> int:
    return run_recipe(RECIPE, argv)


if __name__ == "__main__":
    sys.exit(main())
