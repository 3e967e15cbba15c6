"""Hypothesis strategies for property-testing curvature and gradient-noise estimators.

Each strategy draws an input together with the answer it must give (a spectrum, a
covariance, a dense Hessian), so a property test reads "estimate ≈ known". Sizes are
bounded so that a dense oracle costs milliseconds, seeds are drawn by Hypothesis (torch's
global RNG is never used), and everything shrinks towards small, readable cases: few
dimensions, round values, seeds 0, diagonal operators, the first model kind and loss.

Needs Hypothesis (``pip install 'sgdbreak[testing]'``); ``import sgdbreak`` never imports it.

Example:
    >>> from hypothesis import given, settings
    >>> from sgdbreak import lanczos
    >>> from sgdbreak.testing import assert_eigenvalues_close
    >>> from sgdbreak.testing.strategies import spectra, symmetric_operators
    >>> @settings(deadline=None)
    ... @given(symmetric_operators(spectra(structure="gap")))
    ... def test_lanczos_finds_the_top(op):
    ...     res = lanczos(op, op.dim, tol=1e-10, max_matvecs=op.dim + 2, dtype=op.dtype)
    ...     assert_eigenvalues_close(res, op.eigenvalues[:1], atol=1e-9 * op.scale)
    >>> test_lanczos_finds_the_top()
"""

from __future__ import annotations

try:
    from hypothesis import HealthCheck, settings
    from hypothesis import strategies as st
    from hypothesis.errors import InvalidArgument
    from hypothesis.extra.numpy import arrays
except ImportError as _error:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "sgdbreak.testing.strategies needs Hypothesis: pip install 'sgdbreak[testing]'"
    ) from _error

import math
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor

from .oracles import random_orthogonal
from .problems import KINDS, LOSSES, TinyProblem, tiny_problem

__all__ = [
    "CI_PROFILE",
    "PROFILE",
    "STRUCTURES",
    "KnownOperator",
    "KnownSamples",
    "register_profiles",
    "sample_matrices",
    "samples_with_covariance",
    "spectra",
    "symmetric_operators",
    "tiny_problems",
]

STRUCTURES = ("generic", "gap", "cluster", "repeated", "negative_dominant", "rank_deficient")
"""Spectrum structures of :func:`spectra`, simplest first (shrinking goes that way)."""

PROFILE = "sgdbreak"
CI_PROFILE = "sgdbreak-ci"

_SEEDS = st.integers(0, 2**32 - 1)


# --- settings ----------------------------------------------------------------------------


def register_profiles(*, max_examples: int = 25) -> None:
    """Register Hypothesis profiles that fit torch: ``"sgdbreak"`` and ``"sgdbreak-ci"``.

    ``"sgdbreak"``: no deadline (the first torch call in a process, autograd's warm-up and
    a dense Hessian take longer than Hypothesis's 200 ms), ``max_examples`` examples (torch
    examples cost milliseconds, not microseconds) and the ``too_slow`` health check off.
    ``"sgdbreak-ci"``: the same, derandomized, so CI runs are reproducible.

    Registering loads nothing; load one in a ``conftest.py``::

        register_profiles()
        settings.load_profile("sgdbreak")

    or run ``pytest --hypothesis-profile=sgdbreak`` after registering.
    """
    settings.register_profile(  # explicit derandomize: unset, it inherits the loaded profile's
        PROFILE,
        deadline=None,
        max_examples=max_examples,
        derandomize=False,
        suppress_health_check=[HealthCheck.too_slow],
    )
    settings.register_profile(CI_PROFILE, parent=settings.get_profile(PROFILE), derandomize=True)


# --- spectra -----------------------------------------------------------------------------


def _floats(low: float, high: float) -> st.SearchStrategy[float]:
    return st.floats(low, high, allow_nan=False, allow_infinity=False, allow_subnormal=False)


def _sizes(min_dim: int, max_dim: int, at_least: int) -> st.SearchStrategy[int]:
    return st.integers(max(min_dim, at_least), max_dim)


def _generic(draw, lo, hi, min_dim, max_dim, gap, width):
    return draw(st.lists(_floats(lo, hi), min_size=min_dim, max_size=max_dim, unique=True))


def _gap(draw, lo, hi, min_dim, max_dim, gap, width):
    rest = draw(st.lists(_floats(lo, hi - gap), min_size=max(min_dim, 2) - 1, max_size=max_dim - 1))
    return [draw(_floats(min(hi, max(rest) + gap), hi)), *rest]


def _cluster(draw, lo, hi, min_dim, max_dim, gap, width):
    n = draw(_sizes(min_dim, max_dim, 2))
    size = draw(st.integers(2, n))
    top = draw(_floats(lo + width, hi))
    members = [top] + [top - draw(_floats(0.0, width)) for _ in range(size - 1)]
    rest = draw(st.lists(_floats(lo, top - width), min_size=n - size, max_size=n - size))
    return members + rest


def _repeated(draw, lo, hi, min_dim, max_dim, gap, width):
    n = draw(_sizes(min_dim, max_dim, 2))
    times = draw(st.integers(2, n))
    value = draw(_floats(lo, hi))
    others = draw(
        st.lists(
            _floats(lo, hi).filter(lambda x: x != value), min_size=n - times, max_size=n - times
        )
    )
    return [value] * times + others


def _negative_dominant(draw, lo, hi, min_dim, max_dim, gap, width):
    magnitude = draw(_floats(gap + max(0.0, -hi), -lo))
    bound = magnitude - gap
    upper = min(hi, bound)
    lower = min(max(lo, -bound), upper)  # equal bounds when rounding would cross them
    others = draw(
        st.lists(_floats(lower, upper), min_size=max(min_dim, 1) - 1, max_size=max_dim - 1)
    )
    return [-magnitude, *others]


def _rank_deficient(draw, lo, hi, min_dim, max_dim, gap, width):
    n = draw(_sizes(min_dim, max_dim, 2))
    rank = draw(st.integers(1, n - 1))
    sides = [s for s, ok in ((_floats(gap, hi), hi >= gap), (_floats(lo, -gap), lo <= -gap)) if ok]
    nonzero = draw(st.lists(st.one_of(*sides), min_size=rank, max_size=rank))
    return nonzero + [0.0] * (n - rank)


_BUILDERS = {
    "generic": _generic,
    "gap": _gap,
    "cluster": _cluster,
    "repeated": _repeated,
    "negative_dominant": _negative_dominant,
    "rank_deficient": _rank_deficient,
}


def _unusable(
    kind: str, lo: float, hi: float, max_dim: int, gap: float, width: float
) -> str | None:
    """Why ``kind`` cannot be drawn with these bounds, or None."""
    if kind in ("gap", "cluster", "repeated", "rank_deficient") and max_dim < 2:
        return "needs max_dim >= 2"
    if kind == "negative_dominant" and gap + max(0.0, -hi) > -lo:
        return "needs min_value <= -min_gap * (max_value - min_value): room for a dominant negative"
    if kind == "rank_deficient" and not (lo <= 0 <= hi and (hi >= gap or lo <= -gap)):
        return "needs 0 in [min_value, max_value] and room for values min_gap * span away from 0"
    return None


def spectra(
    *,
    min_dim: int = 1,
    max_dim: int = 12,
    min_value: float = -10.0,
    max_value: float = 10.0,
    structure: str | Iterable[str] | None = None,
    min_gap: float = 0.1,
    cluster_width: float = 1e-3,
) -> st.SearchStrategy[list[float]]:
    """Eigenvalue lists with a chosen structure, sorted in descending order.

    Estimators fail on particular spectra, not random ones: a top eigenvalue inside a
    cluster stalls gap-based stopping, a negative eigenvalue larger in magnitude than the
    top one sends power iteration to the wrong end, exact repeats and zeros break code that
    divides by gaps or norms. Each draw picks one structure (``span = max_value −
    min_value``; every value lies in ``[min_value, max_value]``):

    - ``"generic"``: distinct values (possibly very close: near-degenerate).
    - ``"gap"``: λ1 − λ2 >= ``min_gap·span`` (up to one rounding): easy for any solver.
    - ``"cluster"``: the top 2..n values lie within ``cluster_width·span`` of each other;
      the rest are below the cluster.
    - ``"repeated"``: one value repeated exactly, 2..n times.
    - ``"negative_dominant"``: λ_min < 0 and every other |λ| <= |λ_min| − ``min_gap·span``:
      the largest *magnitude* is negative.
    - ``"rank_deficient"``: at least one exact 0 and at least one value with
      |λ| >= ``min_gap·span``; every non-zero value is that far from 0.

    Args:
        min_dim, max_dim: bounds on the number of eigenvalues (structures that need two
            values draw at least two).
        min_value, max_value: bounds on every eigenvalue (``min_value=0`` for PSD spectra).
        structure: one name of :data:`STRUCTURES` or several; default: all those the bounds
            allow (``negative_dominant`` needs room below 0, ``rank_deficient`` needs 0).
        min_gap: separation for ``gap``, ``negative_dominant`` and ``rank_deficient``, as a
            fraction of ``span`` in (0, 1).
        cluster_width: width of a ``cluster`` as a fraction of ``span`` in (0, 1).

    Returns:
        A strategy for ``list[float]``, descending: readable and exact in a falsifying
        example; ``torch.tensor(ev, dtype=torch.float64)`` makes a tensor.
    """
    if not (isinstance(min_dim, int) and isinstance(max_dim, int) and 1 <= min_dim <= max_dim):
        raise InvalidArgument(
            f"need integers 1 <= min_dim <= max_dim, got min_dim={min_dim!r}, max_dim={max_dim!r}"
        )
    if not (math.isfinite(min_value) and math.isfinite(max_value) and min_value < max_value):
        raise InvalidArgument(
            f"need finite min_value < max_value, got {min_value!r}, {max_value!r}"
        )
    for name, value in (("min_gap", min_gap), ("cluster_width", cluster_width)):
        if not 0 < value < 1:
            raise InvalidArgument(
                f"{name} must be in (0, 1) (a fraction of max_value - min_value), got {value!r}"
            )
    lo, hi = float(min_value), float(max_value)
    gap, width = min_gap * (hi - lo), cluster_width * (hi - lo)
    if structure is None:
        kinds = tuple(k for k in STRUCTURES if _unusable(k, lo, hi, max_dim, gap, width) is None)
    else:
        kinds = (structure,) if isinstance(structure, str) else tuple(structure)
        if not kinds:
            raise InvalidArgument("structure is empty: name at least one of STRUCTURES")
        for kind in kinds:
            if kind not in _BUILDERS:
                raise InvalidArgument(f"unknown structure {kind!r}; choose from {STRUCTURES}")
            why = _unusable(kind, lo, hi, max_dim, gap, width)
            if why is not None:
                raise InvalidArgument(
                    f"structure {kind!r} {why}; got min_value={lo}, max_value={hi}, "
                    f"max_dim={max_dim}, min_gap={min_gap}"
                )

    @st.composite
    def draw_spectrum(draw):
        kind = draw(st.sampled_from(kinds))
        values = _BUILDERS[kind](draw, lo, hi, min_dim, max_dim, gap, width)
        return sorted((float(v) for v in values), reverse=True)

    return draw_spectrum()


# --- operators with a known spectrum ------------------------------------------------------


class KnownOperator:
    """A symmetric operator with a known eigendecomposition, as a matvec and a dense matrix.

    Call it (or :meth:`matvec`) on a vector of length :attr:`dim`; it counts the calls in
    :attr:`num_matvecs`, so a test can check the cost an estimator reports.

    Attributes:
        eigenvalues: float64 tensor (dim,), descending.
        eigenvectors: (dim, dim) tensor, row i the unit eigenvector of ``eigenvalues[i]``.
        matrix: the dense symmetric (dim, dim) matrix ``Qᵀ diag(λ) Q``, in ``dtype``.
        dim, dtype: the operator's side and dtype.
        scale: max |λ|, the spectral scale to set absolute tolerances against (0 for 0).
        num_matvecs: calls so far.
    """

    def __init__(
        self, eigenvalues: list[float], *, seed: int, rotated: bool, dtype: torch.dtype
    ) -> None:
        self.eigenvalues = torch.tensor(eigenvalues, dtype=torch.float64)
        n = self.eigenvalues.numel()
        if rotated:
            Q = random_orthogonal(n, generator=torch.Generator().manual_seed(seed)).T
        else:
            Q = torch.eye(n, dtype=torch.float64)
        dense = Q.T @ torch.diag(self.eigenvalues) @ Q
        self.matrix = (0.5 * (dense + dense.T)).to(dtype)
        self.eigenvectors = Q.to(dtype)
        self.dim, self.dtype = n, dtype
        self.scale = float(self.eigenvalues.abs().max())
        self.num_matvecs = 0
        self._repr = (
            f"KnownOperator({eigenvalues!r}, seed={seed}, rotated={rotated}, dtype={dtype})"
        )

    def matvec(self, v: Tensor) -> Tensor:
        """``A v`` for a vector of length ``dim``."""
        self.num_matvecs += 1
        return self.matrix @ v

    __call__ = matvec

    def __repr__(self) -> str:
        return self._repr


@st.composite
def symmetric_operators(
    draw,
    eigenvalues: st.SearchStrategy[list[float]] | None = None,
    *,
    rotated: bool | None = None,
    dtype: torch.dtype = torch.float64,
) -> KnownOperator:
    """Symmetric operators with eigenvalues drawn from ``eigenvalues`` (default :func:`spectra`).

    The matrix is ``Qᵀ diag(λ) Q`` for a random orthogonal ``Q`` seeded by Hypothesis
    (:func:`sgdbreak.testing.random_orthogonal`) or, when not rotated, ``diag(λ)`` itself.

    Args:
        eigenvalues: a strategy for eigenvalue lists, usually :func:`spectra`.
        rotated: True: always a random basis; False: always diagonal; None (default):
            drawn, shrinking towards the diagonal matrix (the most readable failure).
        dtype: of the matrix and the matvec (the eigenvalues are exact for float64 only;
            float32 rounds them by about 1e-7·scale).

    Returns:
        A strategy for :class:`KnownOperator`.
    """
    values = draw(spectra() if eigenvalues is None else eigenvalues)
    rotate = draw(st.booleans()) if rotated is None else rotated
    seed = draw(_SEEDS) if rotate else 0
    return KnownOperator(values, seed=seed, rotated=rotate, dtype=dtype)


# --- gradient samples ----------------------------------------------------------------------


def sample_matrices(
    *,
    min_samples: int = 2,
    max_samples: int = 8,
    min_dim: int = 1,
    max_dim: int = 12,
    max_abs: float = 10.0,
) -> st.SearchStrategy[Tensor]:
    """Arbitrary ``(L, D)`` float64 gradient-sample matrices, entries in [−max_abs, max_abs].

    No covariance is known: for invariance properties (shift, scale, permutation of the
    samples; non-negative spectrum of rank <= L − 1). Includes identical rows and zeros.
    """
    elements = _floats(-max_abs, max_abs)

    @st.composite
    def draw_matrix(draw):
        num = draw(st.integers(min_samples, max_samples))
        dim = draw(st.integers(min_dim, max_dim))
        return torch.from_numpy(draw(arrays(np.float64, (num, dim), elements=elements)))

    return draw_matrix()


class KnownSamples:
    """Gradient samples (rows) with a known sample covariance.

    Attributes:
        samples: ``(L, D)`` tensor whose centered sample covariance (1/(L − 1),
            :func:`sgdbreak.testing.gradient_covariance`) is ``covariance``.
        covariance: float64 ``(D, D)`` matrix ``U diag(λ) Uᵀ``.
        eigenvalues: float64 ``(L − 1,)``: what :func:`sgdbreak.covariance_spectrum` must
            report, descending, zeros past the rank.
        eigenvectors: float64 ``(r, D)``, unit rows for the r drawn eigenvalues.
        mean: float64 ``(D,)``, the samples' mean (exercises centering).
        trace: Tr(covariance).
    """

    def __init__(
        self,
        eigenvalues: list[float],
        mean: list[float],
        num_samples: int,
        *,
        seed: int,
        dtype: torch.dtype,
    ) -> None:
        num, dim, rank = num_samples, len(mean), len(eigenvalues)
        gen = torch.Generator().manual_seed(seed)
        z = torch.randn(num, rank, dtype=torch.float64, generator=gen)
        z, _ = torch.linalg.qr(z - z.mean(dim=0))  # orthonormal columns orthogonal to ones
        u, _ = torch.linalg.qr(torch.randn(dim, rank, dtype=torch.float64, generator=gen))
        lam = torch.tensor(eigenvalues, dtype=torch.float64)
        centered = math.sqrt(num - 1) * (z * lam.sqrt()) @ u.T
        self.mean = torch.tensor(mean, dtype=torch.float64)
        self.samples = (centered + self.mean).to(dtype)
        cov = (u * lam) @ u.T
        self.covariance = 0.5 * (cov + cov.T)
        self.eigenvalues = torch.zeros(num - 1, dtype=torch.float64)
        self.eigenvalues[:rank] = lam
        self.eigenvectors = u.T.contiguous()
        self.trace = float(lam.sum())
        self._repr = (
            f"KnownSamples(eigenvalues={eigenvalues!r}, mean={mean!r}, num_samples={num}, "
            f"seed={seed}, dtype={dtype})"
        )

    def __repr__(self) -> str:
        return self._repr


@st.composite
def samples_with_covariance(
    draw,
    *,
    min_samples: int = 2,
    max_samples: int = 8,
    min_dim: int = 1,
    max_dim: int = 12,
    max_variance: float = 10.0,
    max_mean: float = 10.0,
    structure: str | Iterable[str] | None = None,
    dtype: torch.dtype = torch.float64,
) -> KnownSamples:
    """``(L, D)`` gradient samples built so that their sample covariance is known exactly.

    ``samples = √(L−1) · Z diag(√λ) Uᵀ + mean`` with ``Z`` (L×r) orthonormal columns
    orthogonal to the ones vector and ``U`` (D×r) orthonormal columns, both seeded by
    Hypothesis: the centered rows give ``Cᵀ C/(L − 1) = U diag(λ) Uᵀ`` up to rounding
    (about ``1e-15·(max λ + max|mean|²)`` in float64). The rank r is at most
    ``min(L − 1, D)``; eigenvalues come from :func:`spectra` on ``[0, max_variance]`` (so
    zeros, repeats, clusters and gaps occur; all-zero gives identical samples).

    Args:
        min_samples, max_samples: bounds on L (>= 2).
        min_dim, max_dim: bounds on D.
        max_variance: largest eigenvalue allowed.
        max_mean: bound on each coordinate of the mean (0: centered samples).
        structure: passed to :func:`spectra` (default: every structure a PSD spectrum allows).
        dtype: of ``samples`` (float32 rounds the samples, not the reference covariance).

    Returns:
        A strategy for :class:`KnownSamples`.
    """
    if min_samples < 2 or min_samples > max_samples or min_dim < 1 or min_dim > max_dim:
        raise InvalidArgument(
            f"need 2 <= min_samples <= max_samples and 1 <= min_dim <= max_dim, got "
            f"{min_samples}, {max_samples}, {min_dim}, {max_dim}"
        )
    num = draw(st.integers(min_samples, max_samples))
    dim = draw(st.integers(min_dim, max_dim))
    cap = min(num - 1, dim)
    kinds = structure
    if kinds is None:
        kinds = tuple(
            k
            for k in STRUCTURES
            if _unusable(k, 0.0, max_variance, cap, 0.1 * max_variance, 1e-3 * max_variance) is None
        )
    values = draw(
        spectra(min_dim=1, max_dim=cap, min_value=0.0, max_value=max_variance, structure=kinds)
    )
    mean = (
        draw(st.lists(_floats(-max_mean, max_mean), min_size=dim, max_size=dim))
        if max_mean > 0
        else [0.0] * dim
    )
    return KnownSamples(values, mean, num, seed=draw(_SEEDS), dtype=dtype)


# --- tiny models ---------------------------------------------------------------------------


@st.composite
def tiny_problems(
    draw,
    *,
    kinds: Iterable[str] = KINDS,
    losses: Iterable[str] = LOSSES,
    max_features: int = 4,
    max_hidden: int = 4,
    max_outputs: int = 3,
    max_num_examples: int = 8,
    dtype: torch.dtype = torch.float64,
) -> TinyProblem:
    """Tiny models with data and a loss (:func:`sgdbreak.testing.tiny_problem`), D <= 91.

    Draws the architecture (tanh MLP, CNN with average pooling, MLP with train-mode
    BatchNorm), the loss (cross-entropy or MSE), the sizes and two seeds. With the default
    bounds the dense Hessian (:meth:`TinyProblem.hessian`) takes milliseconds. Shrinks
    towards the first kind and loss, one hidden unit, two examples, seeds 0: a failure
    ends as ``tiny_problem('mlp', features=1, hidden=1, outputs=2, num_examples=2, ...)``.

    Args:
        kinds: architectures to draw from (:data:`sgdbreak.testing.problems.KINDS`).
        losses: losses to draw from (``"cross_entropy"``, ``"mse"``).
        max_features: bound on the input width (the CNN's image side: 2 or 4).
        max_hidden, max_outputs, max_num_examples: bounds on the other sizes.
        dtype: of weights and inputs.

    Returns:
        A strategy for :class:`sgdbreak.testing.TinyProblem`.
    """
    kinds, losses = tuple(kinds), tuple(losses)
    for name, chosen, allowed in (("kinds", kinds, KINDS), ("losses", losses, LOSSES)):
        if not chosen or any(c not in allowed for c in chosen):
            raise InvalidArgument(
                f"{name} must be a non-empty selection of {allowed}, got {chosen!r}"
            )
    kind = draw(st.sampled_from(kinds))
    loss = draw(st.sampled_from(losses))
    if kind == "cnn":
        features = 2 * draw(st.integers(1, max(1, max_features // 2)))
    else:
        features = draw(st.integers(1, max_features))
    hidden = draw(st.integers(1, max_hidden))
    low = 2 if loss == "cross_entropy" else 1
    outputs = draw(st.integers(low, max(low, max_outputs)))
    num_examples = draw(st.integers(2, max(2, max_num_examples)))
    seed, data_seed = draw(_SEEDS), draw(_SEEDS)
    return tiny_problem(
        kind,
        features=features,
        hidden=hidden,
        outputs=outputs,
        num_examples=num_examples,
        loss=loss,
        seed=seed,
        data_seed=data_seed,
        dtype=dtype,
    )
