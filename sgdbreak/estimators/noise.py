"""Gradient-noise spectrum: the covariance K of gradient samples and the noise scale.

The paper (Jastrzebski et al., ICLR 2020, Sec. 4) tracks the spectrum of the covariance
``K`` of per-example gradients: its top eigenvalue ``lambda1_K`` (Conjecture 1), its
conditioning ``lambda_star_K / lambda1_K`` and ``Tr(K) / lambda1_K`` (Conjecture 2) and
``||g|| / ||g_5||`` (Sec. 4.3). ``K`` is ``D x D`` for ``D`` parameters and is never formed:
from ``L`` gradient samples (rows of an ``(L, D)`` tensor) the non-zero spectrum of their
sample covariance equals that of the small ``L x L`` Gram matrix of the centered rows.

Everything here is a pure function of tensors (no model, no autograd), except the small
:class:`NoiseScaleTracker`, which smooths two-batch noise-scale estimates over a run.
See ``docs/noise.md`` for units (mini-batch vs per-example) and how to read the numbers.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import _validation as V
from ..errors import NonFiniteMeasurement

__all__ = [
    "CountSketch",
    "CovarianceSpectrum",
    "NoiseScaleTracker",
    "TwoBatchNoiseScale",
    "covariance_spectrum",
    "g_top5_ratio",
    "gradient_noise_scale",
    "noise_metrics",
    "two_batch_noise_scale",
]

# float64 working chunks hold at most this many elements (2 MiB: they stay in cache, so
# converting a chunk of the (L, D) sample matrix to float64 costs no extra memory pass,
# and the matrix is never copied whole).
_CHUNK_ELEMENTS = 1 << 18
_EPS64 = torch.finfo(torch.float64).eps


# ---------------------------------------------------------------------------------------
# Covariance spectrum
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CovarianceSpectrum:
    """Spectrum of the sample covariance of gradient samples (see :func:`covariance_spectrum`).

    All eigenvalue-like fields are already multiplied by ``scale``.

    Attributes:
        eigenvalues: Top ``k`` eigenvalues, descending, float64 on the CPU. Entries past the
            rank ``min(L - 1, D)`` of the estimate are exactly 0.
        trace: ``Tr(K)``, the total variance (sum of *all* eigenvalues, not only the top k).
        lambda_star: Smallest non-zero eigenvalue the samples can resolve: the
            ``min(L - 1, D)``-th eigenvalue (``L - 1`` in the usual case ``D >= L - 1``).
        lambda1: Largest eigenvalue ``lambda1_K``.
        stable_rank: ``trace / lambda1`` (between 1 and the rank); nan when ``lambda1 == 0``.
        cond: ``lambda_star / lambda1`` in ``[0, 1]``, larger is better conditioned; nan when
            ``lambda1 == 0``.
        num_samples: ``L``, the number of gradient samples.
        scale: The factor applied to every eigenvalue and the trace.
        eigenvectors: ``(k, D)`` unit eigenvectors in parameter space (samples' dtype and
            device), or None when not requested. Rows whose eigenvalue is at roundoff level
            (at most ``8 L eps lambda1``, in particular past the rank) have no defined
            direction and are zero.
    """

    eigenvalues: Tensor
    trace: float
    lambda_star: float
    lambda1: float
    stable_rank: float
    cond: float
    num_samples: int
    scale: float
    eigenvectors: Tensor | None = None


def _norms64(x: Tensor, dim: int | None = None) -> Tensor:
    """Euclidean norm(s) as float64, computed in ``x``'s dtype (no float64 copy of x).

    Recomputed in float64 only when a result is not finite, so a nan or inf still shows
    and a sum of squares that overflows float32 is not mistaken for one.
    """
    out = torch.linalg.vector_norm(x, dim=dim)
    if not bool(torch.isfinite(out).all()):
        out = torch.linalg.vector_norm(x, dim=dim, dtype=torch.float64)
    return out.to(torch.float64)


def _check_samples(samples: object) -> tuple[int, int]:
    """Type and shape of the (L, D) samples; finiteness is checked on the Gram matrix."""
    if not isinstance(samples, Tensor):
        raise TypeError(
            f"samples must be a torch.Tensor of shape (L, D) with one gradient sample per "
            f"row, got {type(samples).__name__}"
        )
    if samples.dim() != 2:
        raise ValueError(
            f"samples must be 2-D of shape (L, D) with one gradient sample per row, got "
            f"shape {tuple(samples.shape)}"
        )
    if not samples.is_floating_point():
        raise TypeError(f"samples must have a real floating dtype, got {samples.dtype}")
    num, dim = samples.shape
    if num < 2:
        raise ValueError(
            f"need at least 2 gradient samples (rows) to estimate a covariance, got L={num}"
        )
    if dim < 1:
        raise ValueError(f"samples must have at least one column (parameter), got D={dim}")
    return num, dim


def _raise_non_finite(samples: Tensor) -> None:
    """Name the non-finite rows (run only once the Gram matrix came out non-finite)."""
    finite = torch.isfinite(samples).all(dim=1)
    bad = torch.nonzero(~finite).flatten().tolist()
    if not bad:
        raise NonFiniteMeasurement(
            "the samples are finite but their squared norms overflow float64; rescale them"
        )
    shown = ", ".join(str(i) for i in bad[:10]) + (", ..." if len(bad) > 10 else "")
    raise NonFiniteMeasurement(
        f"samples rows [{shown}] contain non-finite values (nan or inf); every gradient "
        f"sample must be finite"
    )


def _helmert_basis(n: int) -> Tensor:
    """Orthonormal ``(n, n - 1)`` basis of the vectors orthogonal to the all-ones vector.

    Projecting the Gram matrix on it centers the samples (its columns sum to zero) and
    removes the null direction that centering creates, so exactly the ``n - 1``
    meaningful eigenvalues remain and a roundoff-level "zero" can never be mistaken for
    ``lambda_star``.
    """
    rows = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    cols = torch.arange(1, n, dtype=torch.float64).unsqueeze(0)
    basis = (rows < cols).to(torch.float64) - cols * (rows == cols).to(torch.float64)
    return basis / torch.sqrt(cols * (cols + 1))


def _relative_chunks(samples: Tensor):
    """Column chunks of the samples in float64, each row minus row 0 (cache-sized).

    Referring rows to row 0 gives exact zeros for identical samples and loses no precision
    when every sample shares a large common vector; centering is done on the small Gram
    matrix (the Helmert basis is orthogonal to the all-ones vector, so it ignores any
    common row).
    """
    num, dim = samples.shape
    step = max(1, _CHUNK_ELEMENTS // num)
    for start in range(0, dim, step):
        stop = min(dim, start + step)
        block = samples[:, start:stop].to(torch.float64, copy=True)
        yield start, stop, block.sub_(samples[0, start:stop].to(torch.float64))


def _gram_eigh(samples: Tensor, gram_dtype: torch.dtype | None = torch.float64):
    """Eigen-decomposition of the centered samples' scatter matrix, in one pass over them.

    Returns ``(evals, trace, lift)``: the ``min(L - 1, D)`` non-zero-capable eigenvalues of
    ``C^T C`` (unnormalised, descending, clamped at 0, float64 CPU), ``||C||_F^2``, and a
    function ``lift(j)`` giving the top ``j`` eigenvectors in parameter space, unnormalised,
    as a ``(j, D)`` tensor in the samples' dtype and device, with their float64 norms.

    ``gram_dtype``: float64 converts cache-sized column chunks (exact products of float32
    samples); None takes the ``(L, D)`` products in the samples' own dtype, one matrix
    product without any copy (relative error about eps·√(D / block) of the Gram entries,
    far below the sampling error of L gradients). The L x L problem is float64 either way.

    Raises:
        NonFiniteMeasurement: a sample is not finite (detected on the Gram matrix, where
            any nan or inf lands; the rows are then named).
    """
    num, dim = samples.shape
    device = samples.device
    native = gram_dtype is None
    if dim >= num:
        # Usual case (D >= L): the L x L Gram matrix of the rows minus row 0 (float64), or
        # of the raw rows (native), reduced to the complement of 1, which centers it.
        if native:
            gram = (samples @ samples.T).to(torch.float64)
        else:
            gram = torch.zeros(num, num, dtype=torch.float64, device=device)
            for _, _, block in _relative_chunks(samples):
                gram.addmm_(block, block.T)
        gram = gram.cpu()
        if not bool(torch.isfinite(gram).all()):
            _raise_non_finite(samples)
        basis = _helmert_basis(num)
        reduced = basis.T @ gram @ basis
        reduced = 0.5 * (reduced + reduced.T)
        trace = float(reduced.diagonal().sum())
        evals, evecs = torch.linalg.eigh(reduced)
        evals = evals.flip(0).clamp_min(0.0)
        if native:
            # Below the rounding of the raw products an eigenvalue is not resolved (identical
            # samples give exact zeros, as on the float64 path).
            floor = 4 * num * torch.finfo(samples.dtype).eps * float(gram.diagonal().max())
            evals = torch.where(evals > floor, evals, 0.0)
            trace = trace if trace > floor else 0.0
        coeffs = (basis @ evecs.flip(1)).to(device)  # (L, L - 1) in sample space

        def lift(j: int) -> tuple[Tensor, Tensor]:
            # The coefficients are orthogonal to the all-ones vector: applied to the raw
            # rows they give the centered combination.
            weights = coeffs[:, :j].T.contiguous()
            if native:
                out = weights.to(samples.dtype) @ samples
                return out, _norms64(out, dim=1).cpu()
            out = torch.empty(j, dim, dtype=samples.dtype, device=device)
            norms = torch.zeros(j, dtype=torch.float64, device=device)
            for start, stop, block in _relative_chunks(samples):
                part = weights @ block
                norms += part.square().sum(dim=1)
                out[:, start:stop] = part
            return out, norms.sqrt().cpu()

    else:
        # Few parameters (D < L): the D x D scatter matrix is the smaller problem.
        cast = samples.to(torch.float64)
        centered = cast - cast[0]
        centered -= centered.mean(dim=0, keepdim=True)
        scatter = (centered.T @ centered).cpu()
        if not bool(torch.isfinite(scatter).all()):
            _raise_non_finite(samples)
        trace = float(scatter.diagonal().sum())
        evals, evecs = torch.linalg.eigh(0.5 * (scatter + scatter.T))
        evals = evals.flip(0).clamp_min(0.0)
        vectors = evecs.flip(1).T.contiguous()  # (D, D) rows are unit eigenvectors

        def lift(j: int) -> tuple[Tensor, Tensor]:
            return vectors[:j].to(device=device, dtype=samples.dtype), torch.ones(j, dtype=torch.float64)

    return evals, trace, lift


def _unit_rows(raw: Tensor, norms: Tensor, evals: Tensor, num: int) -> Tensor:
    """Normalise lifted eigenvectors in place; rows with roundoff-level eigenvalues become zero.

    The sign is fixed so that the entry of largest magnitude is positive (deterministic;
    on a tie between a positive and a negative entry, the positive one). Read off the
    rows' minima and maxima: an ``abs`` copy and ``argmax`` over (k, D) cost a third of
    the noise spectrum at 5.8 M parameters, the two reductions a fifth of that.
    """
    top = float(evals[0]) if evals.numel() else 0.0
    tol = 8.0 * num * _EPS64 * top
    keep = (evals[: raw.shape[0]] > tol) & (norms > 0) & (top > 0)
    low, high = raw.amin(dim=1), raw.amax(dim=1)  # two vectorised passes: faster than aminmax here
    peak = torch.where(high >= -low, high, low).cpu()
    sign = torch.where(peak >= 0, 1.0, -1.0).to(torch.float64)
    factor = torch.where(keep, sign / norms.clamp_min(torch.finfo(torch.float64).tiny), 0.0)
    return raw.mul_(factor.to(device=raw.device, dtype=raw.dtype).unsqueeze(1))


def covariance_spectrum(
    samples: Tensor,
    k: int | None = None,
    *,
    scale: float = 1.0,
    return_eigenvectors: bool = False,
    gram_dtype: torch.dtype | None = torch.float64,
) -> CovarianceSpectrum:
    """Spectrum of the centered sample covariance of gradient samples, via the Gram matrix.

    With ``C`` the ``(L, D)`` matrix of centered samples, the covariance estimate is
    ``K = scale * C^T C / (L - 1)``; its non-zero eigenvalues are those of the small Gram
    matrix ``C C^T / (L - 1)``, decomposed in float64 (the ``D x D`` matrix is never formed,
    except when ``D < L`` where it is the smaller one). Paper: Jastrzebski et al. 2020,
    Sec. 4 (``lambda1_K``, ``lambda_star_K``, ``Tr(K)``).

    Units: the covariance of means of ``M``-example mini-batches is ``K_example / M``, so pass
    ``scale=M`` to report per-example units (and log ``M`` and ``L``).

    Args:
        samples: ``(L, D)`` tensor, one flattened gradient sample per row, ``L >= 2``, finite.
        k: Number of top eigenvalues to return, ``1 <= k <= L - 1``; default ``L - 1``.
        scale: Positive factor applied to every eigenvalue and the trace.
        return_eigenvectors: Also return the top-``k`` eigenvectors in parameter space,
            ``e_i = C^T v_i / ||C^T v_i||`` for Gram eigenvectors ``v_i``.
        gram_dtype: Precision of the ``(L, D)`` products. ``torch.float64`` (default)
            converts cache-sized chunks, so float32 samples give their exact float64
            spectrum. ``None`` multiplies in the samples' dtype: one matrix product, no
            copy, several times faster at large ``D``, with a relative error of the Gram
            entries of about ``eps * sqrt(D / 256)`` of the samples' dtype (and of
            ``eps * ||mean||^2 / spread^2`` when the samples share a common vector much
            larger than their spread), far below the sampling error of ``L`` gradients.
            The ``L x L`` problem is float64 either way.

    Returns:
        A :class:`CovarianceSpectrum`. If all samples are identical every eigenvalue is 0
        and ``stable_rank`` and ``cond`` are nan (undefined).

    Raises:
        TypeError: ``samples`` is not a floating tensor, or ``k``/``scale`` have a bad type.
        ValueError: not 2-D, ``L < 2``, ``k`` out of ``[1, L - 1]``, a non-finite row (named),
            or ``scale <= 0``.

    Example:
        >>> import torch
        >>> g = torch.randn(20, 1000, generator=torch.Generator().manual_seed(0))
        >>> spec = covariance_spectrum(g, k=5, scale=128)
        >>> spec.eigenvalues.shape, spec.num_samples
        (torch.Size([5]), 20)
    """
    num, dim = _check_samples(samples)
    if k is None:
        k = num - 1
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {k!r}")
    k = int(k)
    if not 1 <= k <= num - 1:
        raise ValueError(
            f"k must satisfy 1 <= k <= L - 1 = {num - 1} (L = {num} centered samples span at "
            f"most L - 1 directions), got k={k}"
        )
    scale = V.real("scale", scale, positive=True)

    if gram_dtype is not None and gram_dtype != torch.float64:
        raise ValueError(f"gram_dtype must be torch.float64 or None (the samples' dtype), got {gram_dtype!r}")
    evals, trace, lift = _gram_eigh(samples, gram_dtype)
    rank_cap = evals.numel()  # min(L - 1, D)
    norm = scale / (num - 1)
    padded = torch.zeros(num - 1, dtype=torch.float64)
    padded[:rank_cap] = evals
    lambda1 = float(evals[0]) * norm
    lambda_star = float(evals[rank_cap - 1]) * norm
    trace_k = trace * norm
    ratio_ok = lambda1 > 0
    eigenvectors = None
    if return_eigenvectors:
        j = min(k, rank_cap)
        raw, norms = lift(j)
        eigenvectors = _unit_rows(raw, norms, evals[:j], num)
        if j < k:  # rows past the rank are zero
            eigenvectors = torch.cat([eigenvectors, eigenvectors.new_zeros(k - j, dim)])
    return CovarianceSpectrum(
        eigenvalues=padded[:k] * norm,
        trace=trace_k,
        lambda_star=lambda_star,
        lambda1=lambda1,
        stable_rank=trace_k / lambda1 if ratio_ok else math.nan,
        cond=lambda_star / lambda1 if ratio_ok else math.nan,
        num_samples=num,
        scale=scale,
        eigenvectors=eigenvectors,
    )


# ---------------------------------------------------------------------------------------
# Projection of the gradient on the top eigenvectors of K
# ---------------------------------------------------------------------------------------


def _chunked_products(vectors: Tensor, gradient: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 ``V V^T`` and ``V g`` for ``(k, D)`` V, in column chunks (no float64 copy)."""
    k, dim = vectors.shape
    gram = torch.zeros(k, k, dtype=torch.float64, device=vectors.device)
    proj = torch.zeros(k, dtype=torch.float64, device=vectors.device)
    step = max(1, _CHUNK_ELEMENTS // max(k, 1))
    for start in range(0, dim, step):
        block = vectors[:, start : start + step].to(torch.float64)
        gram.addmm_(block, block.T)
        proj.addmv_(block, gradient[start : start + step].to(torch.float64))
    return gram.cpu(), proj.cpu()


def g_top5_ratio(gradient: Tensor, eigenvectors: Tensor) -> float:
    """``||g|| / ||g_5||``: how much of the gradient lies outside the top eigenvectors of K.

    ``g_5`` is the orthogonal projection of ``g`` on the span of the given vectors (the paper,
    Sec. 4.3, uses the top-5 eigenvectors of K). The vectors need not be orthonormal: they
    are orthonormalised first, and directions that are numerically dependent (or zero rows,
    as :func:`covariance_spectrum` returns for null eigenvalues) are dropped. The ratio is
    ``>= 1``; 1 means the gradient lies in the span; large means the top noise directions
    carry little of the gradient.

    Args:
        gradient: Flat gradient, any shape with ``D`` elements.
        eigenvectors: ``(k, D)`` vectors (or a ``(D,)`` single vector).

    Returns:
        The ratio as a float: ``inf`` when ``g`` is orthogonal to the span (or the span is
        empty), nan when ``g == 0``.

    Example:
        >>> import torch
        >>> g_top5_ratio(torch.tensor([3.0, 4.0]), torch.tensor([[1.0, 0.0]]))
        1.6666666666666667
    """
    if not isinstance(gradient, Tensor) or not isinstance(eigenvectors, Tensor):
        raise TypeError(
            f"gradient and eigenvectors must be tensors, got {type(gradient).__name__} and "
            f"{type(eigenvectors).__name__}"
        )
    g = gradient.reshape(-1)
    vectors = eigenvectors.unsqueeze(0) if eigenvectors.dim() == 1 else eigenvectors
    if vectors.dim() != 2 or vectors.shape[1] != g.numel():
        raise ValueError(
            f"eigenvectors must have shape (k, D) with D = gradient.numel() = {g.numel()}, "
            f"got shape {tuple(eigenvectors.shape)}"
        )
    # Finiteness from the float64 norm and products (a nan or inf lands there): no
    # separate pass over the vectors.
    g_norm = float(_norms64(g))
    gram, proj = _chunked_products(vectors, g)
    if not (math.isfinite(g_norm) and bool(torch.isfinite(gram).all()) and bool(torch.isfinite(proj).all())):
        raise ValueError("gradient and eigenvectors must be finite")
    if g_norm == 0.0:
        return math.nan
    if vectors.shape[0] == 0:
        return math.inf
    # Orthonormal basis of the span: Lambda^{-1/2} W^T V, with V V^T = W Lambda W^T; drop
    # directions below roundoff so dependent or zero vectors cannot inflate g_5.
    lam, w = torch.linalg.eigh(gram)
    keep = lam > lam.max().clamp_min(0) * vectors.shape[0] * 64 * _EPS64
    if not bool(keep.any()):
        return math.inf
    coords = (w[:, keep].T @ proj) / torch.sqrt(lam[keep])
    g5_norm = float(torch.linalg.vector_norm(coords))
    if g5_norm == 0.0:
        return math.inf
    return max(g_norm / g5_norm, 1.0)


# ---------------------------------------------------------------------------------------
# Gradient noise scale (McCandlish et al. 2018)
# ---------------------------------------------------------------------------------------


def _as_float(value: object, name: str) -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def gradient_noise_scale(trace_K: float, grad_norm_sq: float) -> float:  # noqa: N803
    """Simple gradient noise scale ``B_simple = Tr(K) / ||g||^2`` (McCandlish et al. 2018).

    The critical batch size: below it, doubling the batch roughly halves the number of
    steps; above it, larger batches buy little. ``trace_K`` must be in per-example units.

    Args:
        trace_K: ``Tr(K)`` of the per-example gradient covariance.
        grad_norm_sq: ``||g||^2`` of the (full or probe) gradient.

    Returns:
        The ratio; ``inf`` when ``||g||^2 == 0 < Tr(K)``; nan when either input is negative
        (a noisy unbiased estimate that is not yet meaningful), not finite, or both are 0.

    Example:
        >>> gradient_noise_scale(50.0, 0.5)
        100.0
    """
    trace = _as_float(trace_K, "trace_K")
    norm_sq = _as_float(grad_norm_sq, "grad_norm_sq")
    if not (math.isfinite(trace) and math.isfinite(norm_sq)) or trace < 0 or norm_sq < 0:
        return math.nan
    if norm_sq == 0.0:
        return math.inf if trace > 0 else math.nan
    return trace / norm_sq


@dataclass(frozen=True)
class TwoBatchNoiseScale:
    """Unbiased two-batch estimates (McCandlish et al. 2018, App. A.1).

    Attributes:
        grad_norm_sq: Estimate of ``||G||^2``, the squared norm of the true gradient (may be
            negative when noisy).
        trace: Estimate of ``Tr(Sigma)``, per-example gradient variance (may be negative).
        noise_scale: ``trace / grad_norm_sq`` as :func:`gradient_noise_scale` computes it.
        small_batch: ``B_small``.
        big_batch: ``B_big``.
    """

    grad_norm_sq: float
    trace: float
    noise_scale: float
    small_batch: float
    big_batch: float


def _two_batch_estimates(
    small_norm_sq: object, small_batch: object, big_norm_sq: object, big_batch: object
) -> tuple[float, float, float, float]:
    small = V.real("small_batch", small_batch, positive=True)
    big = V.real("big_batch", big_batch, positive=True)
    if not big > small:
        raise ValueError(
            f"big_batch must be larger than small_batch, got small_batch={small_batch!r}, "
            f"big_batch={big_batch!r}"
        )
    s_sq = _as_float(small_norm_sq, "small_norm_sq")
    b_sq = _as_float(big_norm_sq, "big_norm_sq")
    for name, value in (("small_norm_sq", s_sq), ("big_norm_sq", b_sq)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite squared norm >= 0, got {value!r}")
    grad_norm_sq = (big * b_sq - small * s_sq) / (big - small)
    trace = (s_sq - b_sq) / (1.0 / small - 1.0 / big)
    return grad_norm_sq, trace, small, big


def two_batch_noise_scale(
    small_norm_sq: float, small_batch: float, big_norm_sq: float, big_batch: float
) -> TwoBatchNoiseScale:
    """Noise scale from the squared gradient norms at two batch sizes.

    Uses ``E||g_B||^2 = ||G||^2 + Tr(Sigma) / B`` (examples drawn independently):
    ``||G||^2 ~ (B_big ||g_big||^2 - B_small ||g_small||^2) / (B_big - B_small)`` and
    ``Tr(Sigma) ~ (||g_small||^2 - ||g_big||^2) / (1/B_small - 1/B_big)``, both unbiased.
    Their ratio is not: average many estimates (see :class:`NoiseScaleTracker`) before
    dividing. Under data parallelism the per-replica gradient is ``g_small`` and the
    all-reduced gradient ``g_big``.

    Args:
        small_norm_sq: ``||g_small||^2`` of a mean gradient over ``small_batch`` examples.
        small_batch: ``B_small > 0``.
        big_norm_sq: ``||g_big||^2`` of a mean gradient over ``big_batch`` examples.
        big_batch: ``B_big > B_small``.

    Returns:
        A :class:`TwoBatchNoiseScale`.

    Example:
        >>> r = two_batch_noise_scale(1.1, 10, 1.01, 100)
        >>> round(r.grad_norm_sq, 6), round(r.trace, 6)
        (1.0, 1.0)
    """
    grad_norm_sq, trace, small, big = _two_batch_estimates(
        small_norm_sq, small_batch, big_norm_sq, big_batch
    )
    return TwoBatchNoiseScale(
        grad_norm_sq=grad_norm_sq,
        trace=trace,
        noise_scale=gradient_noise_scale(trace, grad_norm_sq),
        small_batch=small,
        big_batch=big,
    )


class NoiseScaleTracker:
    """Exponential moving averages of ``||G||^2`` and ``Tr(Sigma)``; their ratio is ``gns``.

    McCandlish et al. (2018) smooth numerator and denominator separately, then divide: the
    ratio of noisy unbiased estimates is biased and often negative. Averages are
    bias-corrected as in Adam, so early values are usable.

    Args:
        beta: EMA decay in ``[0, 1)``; ``0`` keeps only the last estimate.

    Example:
        >>> t = NoiseScaleTracker(beta=0.9)
        >>> t.update_two_batch(1.1, 10, 1.01, 100)
        True
        >>> round(t.noise_scale, 6)
        1.0
    """

    def __init__(self, beta: float = 0.95) -> None:
        if isinstance(beta, bool) or not isinstance(beta, (int, float, numbers.Real)):  # (int, float): for mypy
            raise TypeError(f"beta must be a real number in [0, 1), got {beta!r}")
        if not 0.0 <= float(beta) < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta!r}")
        self.beta = float(beta)
        self.count = 0
        self.num_skipped = 0
        self._ema_grad_norm_sq = 0.0
        self._ema_trace = 0.0
        self._warned = False

    def update(self, grad_norm_sq: float, trace: float) -> bool:
        """Add one (unbiased) estimate of ``||G||^2`` and ``Tr(Sigma)``.

        Non-finite estimates are skipped (counted in ``num_skipped``, warned about once) so
        they never corrupt the averages.

        Returns:
            True if the estimate was used.
        """
        g_sq = _as_float(grad_norm_sq, "grad_norm_sq")
        tr = _as_float(trace, "trace")
        if not (math.isfinite(g_sq) and math.isfinite(tr)):
            self.num_skipped += 1
            if not self._warned:
                warnings.warn(
                    f"NoiseScaleTracker: skipping a non-finite estimate (grad_norm_sq={g_sq}, "
                    f"trace={tr}); further skips are counted in num_skipped",
                    RuntimeWarning,
                    stacklevel=2,
                )
                self._warned = True
            return False
        b = self.beta
        self._ema_grad_norm_sq = b * self._ema_grad_norm_sq + (1.0 - b) * g_sq
        self._ema_trace = b * self._ema_trace + (1.0 - b) * tr
        self.count += 1
        return True

    def update_two_batch(
        self, small_norm_sq: float, small_batch: float, big_norm_sq: float, big_batch: float
    ) -> bool:
        """Add the two-batch estimates of :func:`two_batch_noise_scale`; see :meth:`update`."""
        grad_norm_sq, trace, _, _ = _two_batch_estimates(
            small_norm_sq, small_batch, big_norm_sq, big_batch
        )
        return self.update(grad_norm_sq, trace)

    def _corrected(self, ema: float) -> float:
        if self.count == 0:
            return math.nan
        return ema / (1.0 - self.beta**self.count)

    @property
    def grad_norm_sq(self) -> float:
        """Smoothed ``||G||^2`` (nan before the first update)."""
        return self._corrected(self._ema_grad_norm_sq)

    @property
    def trace(self) -> float:
        """Smoothed ``Tr(Sigma)`` (nan before the first update)."""
        return self._corrected(self._ema_trace)

    @property
    def noise_scale(self) -> float:
        """Smoothed ``B_simple``; nan before the first update or while an average is < 0."""
        if self.count == 0:
            return math.nan
        return gradient_noise_scale(self.trace, self.grad_norm_sq)

    def state_dict(self) -> dict[str, float | int]:
        """Python numbers only, so ``torch.load(weights_only=True)`` reads it."""
        return {
            "beta": self.beta,
            "count": self.count,
            "num_skipped": self.num_skipped,
            "ema_grad_norm_sq": self._ema_grad_norm_sq,
            "ema_trace": self._ema_trace,
        }

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        """Restore what :meth:`state_dict` returned."""
        expected = {"beta", "count", "num_skipped", "ema_grad_norm_sq", "ema_trace"}
        if not isinstance(state, dict) or set(state) != expected:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"NoiseScaleTracker state must have keys {sorted(expected)}, got {got}"
            )
        beta = float(state["beta"])
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"state beta must be in [0, 1), got {beta!r}")
        self.beta = beta
        self.count = int(state["count"])
        self.num_skipped = int(state["num_skipped"])
        self._ema_grad_norm_sq = float(state["ema_grad_norm_sq"])
        self._ema_trace = float(state["ema_trace"])


# ---------------------------------------------------------------------------------------
# Flat measurement record
# ---------------------------------------------------------------------------------------


def noise_metrics(
    samples: Tensor, gradient: Tensor | None, *, batch_size: int, k: int = 5,
    scale: float | None = None, gram_dtype: torch.dtype | None = torch.float64,
) -> dict[str, float]:
    """The noise part of a measurement record (docs/contracts.md), in per-example units.

    Args:
        samples: ``(L, D)`` mini-batch gradients, each the mean over ``batch_size``
            examples (per-example gradients: ``batch_size=1``).
        gradient: The gradient ``g`` for ``gns`` and ``g_top5_ratio`` (the paper uses a
            mini-batch gradient; a probe or full gradient is better for ``gns``). None uses
            the mean of the samples, whose ``||g||^2`` is biased up by ``Tr(K) / (L M)``.
        batch_size: ``M``, examples per sample; eigenvalues are multiplied by ``M``.
        scale: overrides the factor ``M`` (e.g. the finite-population factor of
            :func:`sgdbreak.estimators.samples.batch_mean_covariance_scale` for batches drawn from a
            small probe).
        k: Number of spectrum entries ``eig_K_1 .. eig_K_k``; capped at ``L - 1``.
        gram_dtype: as in :func:`covariance_spectrum` (None: products in the samples' dtype).

    Returns:
        ``lambda1_K``, ``lambda_star_K``, ``trace_K``, ``cond_K``, ``stable_rank_K``, ``gns``,
        ``g_top5_ratio`` (top ``min(5, L - 1)`` eigenvectors), ``eig_K_1..k``,
        ``noise_batch_size`` (M) and ``noise_num_samples`` (L). Non-finite values are left out.

    Example:
        >>> import torch
        >>> g = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
        >>> rec = noise_metrics(g, g.mean(0), batch_size=32, k=3)
        >>> rec["noise_batch_size"], rec["noise_num_samples"], "eig_K_3" in rec
        (32, 8, True)
    """
    num, dim = _check_samples(samples)
    if isinstance(batch_size, bool) or not isinstance(batch_size, numbers.Integral):
        raise TypeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if gradient is None:
        gradient = samples.mean(dim=0)
    if not isinstance(gradient, Tensor) or gradient.numel() != dim:
        raise ValueError(
            f"gradient must be a tensor with D = {dim} elements (one per column of samples), "
            f"got {gradient if not isinstance(gradient, Tensor) else tuple(gradient.shape)}"
        )
    k_eff = min(int(k), num - 1)
    n_vec = min(5, num - 1)
    spec = covariance_spectrum(
        samples, k=max(k_eff, n_vec), scale=batch_size if scale is None else scale,
        return_eigenvectors=True, gram_dtype=gram_dtype,
    )
    grad_flat = gradient.reshape(-1)
    grad_norm_sq = float(_norms64(grad_flat)) ** 2
    record: dict[str, float] = {
        "lambda1_K": spec.lambda1,
        "lambda_star_K": spec.lambda_star,
        "trace_K": spec.trace,
        "cond_K": spec.cond,
        "stable_rank_K": spec.stable_rank,
        "gns": gradient_noise_scale(spec.trace, grad_norm_sq),
        "g_top5_ratio": g_top5_ratio(grad_flat, spec.eigenvectors[:n_vec]),
    }
    for i in range(k_eff):
        record[f"eig_K_{i + 1}"] = float(spec.eigenvalues[i])
    out = {key: value for key, value in record.items() if math.isfinite(value)}
    out["noise_batch_size"] = int(batch_size)
    out["noise_num_samples"] = int(num)
    return out


# ---------------------------------------------------------------------------------------
# Memory-aware path: CountSketch projection of gradients
# ---------------------------------------------------------------------------------------


class CountSketch:
    """Random linear map ``R^D -> R^m`` that preserves inner products in expectation.

    Each coordinate ``i`` is sent to bucket ``h(i)`` (uniform in ``[0, m)``) with a random
    sign ``s(i)``: ``(S x)_b = sum_{i: h(i) = b} s(i) x_i`` (Charikar et al. 2002). Storage
    is ``O(D)`` (one int64 bucket and one sign per coordinate), applying it costs ``O(D)``
    per vector, and it is linear, so centering commutes with it: the covariance spectrum
    of sketched samples estimates that of the originals without forming ``(L, D)``.

    Error: for any fixed ``x, y``, ``E <Sx, Sy> = <x, y>`` and
    ``Var <Sx, Sy> = (||x||^2 ||y||^2 + <x, y>^2 - 2 sum_i x_i^2 y_i^2) / m
    <= 2 ||x||^2 ||y||^2 / m``. For the Gram matrix ``G`` of ``L`` centered samples this
    gives ``E ||G_S - G||_F^2 <= 2 Tr(G)^2 / m``, so by Weyl every eigenvalue moves by at
    most ``sqrt(2 / m) Tr(K)`` in root-mean-square: choose ``m >> 2 stable_rank^2`` for a
    small relative error on ``lambda1``. Eigenvectors of sketched samples live in the
    sketch space; sketch the gradient with the same object before :func:`g_top5_ratio`.

    Args:
        dim: ``D``, the length of the vectors to sketch.
        sketch_dim: ``m``, the length of the sketched vectors.
        seed: Seed of the ``torch.Generator`` that draws buckets and signs (same seed, same
            sketch on every process).
        device: Where buckets and signs are stored (the device of the gradients).

    Example:
        >>> import torch
        >>> s = CountSketch(10_000, 512, seed=0)
        >>> s(torch.randn(3, 10_000)).shape
        torch.Size([3, 512])
    """

    def __init__(
        self, dim: int, sketch_dim: int, *, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        for name, value in (("dim", dim), ("sketch_dim", sketch_dim), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"{name} must be an integer, got {value!r}")
        if dim < 1 or sketch_dim < 1:
            raise ValueError(
                f"dim and sketch_dim must be >= 1, got dim={dim}, sketch_dim={sketch_dim}"
            )
        self.dim = int(dim)
        self.sketch_dim = int(sketch_dim)
        self.seed = int(seed)
        gen = torch.Generator().manual_seed(self.seed)
        self.buckets = torch.randint(0, self.sketch_dim, (self.dim,), generator=gen).to(device)
        signs = torch.randint(0, 2, (self.dim,), generator=gen, dtype=torch.int8) * 2 - 1
        self.signs = signs.to(device)

    def __repr__(self) -> str:
        return f"CountSketch(dim={self.dim}, sketch_dim={self.sketch_dim}, seed={self.seed})"

    def __call__(self, x: Tensor) -> Tensor:
        """Sketch the last dimension of ``x`` (``(..., D) -> (..., m)``), in x's dtype."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"CountSketch expects a floating tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(
                f"CountSketch expects tensors whose last dimension is dim={self.dim}, got "
                f"shape {tuple(x.shape)}"
            )
        buckets = self.buckets.to(x.device)
        signs = self.signs.to(device=x.device, dtype=x.dtype)
        out = x.new_zeros(*x.shape[:-1], self.sketch_dim)
        return out.index_add_(x.dim() - 1, buckets, x * signs)
