"""Tiny models with data and a loss whose dense Hessian costs milliseconds.

:func:`tiny_problem` builds one deterministically from seeds; the Hypothesis strategy
:func:`sgdbreak.testing.strategies.tiny_problems` draws its arguments. Activations are
tanh (smooth), so finite differences, double backward and dense oracles agree, and the
CNN pools by averaging (max pooling has kinks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .oracles import model_hessian

__all__ = ["KINDS", "LOSSES", "TinyProblem", "tiny_problem"]

KINDS = ("mlp", "cnn", "batchnorm")
"""Architectures of :func:`tiny_problem`, simplest first."""

LOSSES = ("cross_entropy", "mse")
"""Losses of :func:`tiny_problem` (both mean-reduced)."""


@dataclass(frozen=True, repr=False, eq=False)
class TinyProblem:
    """A model with its data and a mean-reduced loss.

    Attributes:
        model: the network, in train mode.
        inputs: ``(N, features)`` or, for the CNN, ``(N, 1, side, side)``.
        targets: class indices ``(N,)`` for cross-entropy, ``(N, outputs)`` for MSE.
        criterion: ``nn.CrossEntropyLoss()`` or ``nn.MSELoss()``.
        spec: the arguments that rebuild it with :func:`tiny_problem` (also its repr).
    """

    model: nn.Module
    inputs: Tensor
    targets: Tensor
    criterion: Callable[[Tensor, Tensor], Tensor]
    spec: str

    def __repr__(self) -> str:
        return f"tiny_problem({self.spec})"

    def loss(self) -> Tensor:
        """``criterion(model(inputs), targets)``: the zero-argument loss closure estimators take."""
        return self.criterion(self.model(self.inputs), self.targets)

    @property
    def params(self) -> list[Tensor]:
        """The trainable parameters, in ``model.parameters()`` order."""
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def num_params(self) -> int:
        """D, the Hessian's side."""
        return sum(p.numel() for p in self.params)

    def hessian(self) -> Tensor:
        """Dense D×D Hessian of :meth:`loss`, float64 (:func:`sgdbreak.testing.model_hessian`)."""
        return model_hessian(self.model, self.criterion, self.inputs, self.targets)


def _network(kind: str, features: int, hidden: int, outputs: int) -> nn.Module:
    if kind == "mlp":
        return nn.Sequential(nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, outputs))
    if kind == "batchnorm":
        return nn.Sequential(
            nn.Linear(features, hidden),
            nn.BatchNorm1d(hidden),
            nn.Tanh(),
            nn.Linear(hidden, outputs),
        )
    half = features // 2
    return nn.Sequential(
        nn.Conv2d(1, hidden, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(hidden * half * half, outputs),
    )


def tiny_problem(
    kind: str = "mlp",
    *,
    features: int = 5,
    hidden: int = 6,
    outputs: int = 3,
    num_examples: int = 24,
    loss: str = "cross_entropy",
    seed: int = 0,
    data_seed: int | None = None,
    dtype: torch.dtype = torch.float64,
) -> TinyProblem:
    """Build a tiny model, its data and its loss from seeds.

    The architectures (tanh everywhere):

    - ``"mlp"``: Linear(features, hidden) → Tanh → Linear(hidden, outputs).
    - ``"cnn"``: Conv2d(1, hidden, 3, padding=1) → Tanh → AvgPool2d(2) → Flatten →
      Linear(hidden·(features/2)², outputs), on 1×features×features images.
    - ``"batchnorm"``: the MLP with BatchNorm1d(hidden) after the first layer (train mode:
      batch statistics, so examples interact).

    Weights get PyTorch's default initialisation after ``torch.manual_seed(seed)`` inside
    ``torch.random.fork_rng``: the same values as seeding globally, but the caller's global
    RNG is neither read nor advanced. Inputs are standard normal and targets uniform class
    indices (cross-entropy) or standard normal (MSE), drawn in that order from a
    ``torch.Generator`` seeded with ``data_seed``.

    Args:
        kind: one of :data:`KINDS`.
        features: input width; for the CNN the image side (even).
        hidden: hidden width, or the CNN's channels.
        outputs: classes (>= 2 for cross-entropy) or regression outputs.
        num_examples: N (>= 2 for BatchNorm in train mode).
        loss: ``"cross_entropy"`` or ``"mse"``.
        seed: seeds the weights.
        data_seed: seeds inputs and targets (default ``seed + 1``: other numbers than the
            weights').
        dtype: of the weights and inputs (float64 where results meet dense oracles).

    Example:
        >>> p = tiny_problem("mlp", features=2, hidden=3, outputs=2, num_examples=4)
        >>> p.num_params, p.hessian().shape
        (17, torch.Size([17, 17]))
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    for name, value, low in (
        ("features", features, 1),
        ("hidden", hidden, 1),
        ("outputs", outputs, 2 if loss == "cross_entropy" else 1),
        ("num_examples", num_examples, 2 if kind == "batchnorm" else 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(
                f"{name} must be an int >= {low} for kind={kind!r}, loss={loss!r}; got {value!r}"
            )
    if kind == "cnn" and features % 2:
        raise ValueError(f"features (the image side) must be even for the CNN, got {features}")
    data_seed = seed + 1 if data_seed is None else data_seed

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = _network(kind, features, hidden, outputs).to(dtype)
    gen = torch.Generator().manual_seed(data_seed)
    shape = (num_examples, 1, features, features) if kind == "cnn" else (num_examples, features)
    inputs = torch.randn(shape, generator=gen, dtype=dtype)
    criterion: nn.Module
    if loss == "cross_entropy":
        targets = torch.randint(0, outputs, (num_examples,), generator=gen)
        criterion = nn.CrossEntropyLoss()
    else:
        targets = torch.randn(num_examples, outputs, generator=gen, dtype=dtype)
        criterion = nn.MSELoss()
    spec = (
        f"{kind!r}, features={features}, hidden={hidden}, outputs={outputs}, "
        f"num_examples={num_examples}, loss={loss!r}, seed={seed}, data_seed={data_seed}"
    )
    if dtype != torch.float64:
        spec += f", dtype={dtype}"
    return TinyProblem(
        model=model.train(), inputs=inputs, targets=targets, criterion=criterion, spec=spec
    )
