"""Assertions for eigenvalue and spectrum results whose failures say what went wrong.

Each helper raises ``AssertionError`` naming the worst entry (index, value got, value
expected, error and the tolerance it broke) and listing both sides, so a Hypothesis
falsifying example reads on its own. They accept sgdbreak results (anything with
``.eigenvalues``), tensors, NumPy arrays, sequences and plain numbers.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

__all__ = ["assert_eigenpairs", "assert_eigenvalues_close", "assert_spectrum_close"]

_SHOWN = 12


def _values(x, what: str) -> np.ndarray:
    if hasattr(x, "eigenvalues"):
        x = x.eigenvalues
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"{what}: expected eigenvalues (a result with .eigenvalues, a tensor, an array "
            f"or numbers), got {type(x).__name__}"
        ) from error
    return arr.reshape(-1)


def _show(arr: np.ndarray) -> str:
    items = [repr(float(v)) for v in arr[:_SHOWN]]
    if arr.size > _SHOWN:
        items.append(f"... ({arr.size - _SHOWN} more)")
    return "[" + ", ".join(items) + "]"


def _check(
    got: np.ndarray, expected: np.ndarray, allowed: np.ndarray, name: str, rule: str
) -> None:
    error = np.abs(got - expected)
    error = np.where(np.isnan(error), np.inf, error)  # a nan on either side always fails
    bad = error > allowed
    if not bad.any():
        return
    excess = np.where(bad, error - allowed, -np.inf)
    i = int(np.argmax(excess))
    raise AssertionError(
        f"{name} differ at {int(bad.sum())} of {got.size} positions ({rule})\n"
        f"worst: index {i}: got {float(got[i])!r}, expected {float(expected[i])!r}, "
        f"error {float(error[i]):.3g} > allowed {float(allowed[i]):.3g}\n"
        f"got:      {_show(got)}\n"
        f"expected: {_show(expected)}"
    )


def assert_eigenvalues_close(
    actual, expected, *, rtol: float = 1e-6, atol: float = 1e-9, name: str = "eigenvalues"
) -> None:
    """Entry-wise comparison in the given order, each within ``atol + rtol·|expected_i|``.

    For an estimator's top-k against an oracle's top-k: ``assert_eigenvalues_close(result,
    torch.linalg.eigvalsh(H).flip(0)[:k])``. Lengths must agree. The tolerance is
    ``torch.testing.assert_close``'s, so eigenvalues near zero need an ``atol`` on the scale
    of the spectrum.

    Args:
        actual: the estimate: a result with ``.eigenvalues``, a tensor, an array, numbers.
        expected: the reference, same kinds.
        rtol, atol: relative and absolute tolerance.
        name: what the values are, for the message (e.g. ``"lambda1_H"``).

    Raises:
        AssertionError: lengths differ, or some entry is off (the worst one is named).
    """
    got, want = _values(actual, "actual"), _values(expected, "expected")
    if got.shape != want.shape:
        raise AssertionError(
            f"{name}: got {got.size} values, expected {want.size}\n"
            f"got:      {_show(got)}\nexpected: {_show(want)}"
        )
    _check(got, want, atol + rtol * np.abs(want), name, f"rtol={rtol:g}, atol={atol:g}")


def assert_spectrum_close(
    actual, expected, *, rtol: float = 1e-8, atol: float = 0.0, name: str = "spectrum"
) -> None:
    """Whole spectra as multisets, each entry within ``atol + rtol·max|expected|``.

    Both sides are sorted in descending order and the shorter is padded with zeros, so a
    :func:`sgdbreak.covariance_spectrum` (L − 1 values, zeros past the rank) compares
    directly with the D eigenvalues of a dense covariance (some of them roundoff around 0).
    The tolerance scales with the largest eigenvalue because that is the accuracy of every
    eigenvalue of a symmetric matrix computed in floating point: small ones have no
    relative accuracy.

    Args:
        actual: the estimate: a result with ``.eigenvalues``, a tensor, an array, numbers.
        expected: the reference, same kinds.
        rtol: tolerance relative to the spectral scale ``max|expected|``.
        atol: absolute tolerance added to it.
        name: what the values are, for the message.

    Raises:
        AssertionError: some entry is off (the worst one is named).
    """
    got, want = _values(actual, "actual"), _values(expected, "expected")
    size = max(got.size, want.size)
    got = -np.sort(-np.pad(got, (0, size - got.size)))
    want = -np.sort(-np.pad(want, (0, size - want.size)))
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    allowed = np.full(size, atol + rtol * scale)
    _check(
        got,
        want,
        allowed,
        name,
        f"sorted, zero-padded; rtol={rtol:g} of max|expected|={scale:.6g}, atol={atol:g}",
    )


def assert_eigenpairs(
    operator: Tensor | Callable[[Tensor], Tensor],
    result,
    *,
    rtol: float = 1e-6,
    atol: float = 0.0,
    name: str = "eigenpairs",
) -> None:
    """Each returned pair (λ_i, v_i) is an eigenpair: unit ``v_i`` and a small residual.

    Checks ``|‖v_i‖ − 1| <= 1e-6`` and ``‖A v_i − λ_i v_i‖ <= atol + rtol·scale`` with
    ``scale = max|λ(A)|`` for a dense ``A``, else the largest ``|λ_i|`` returned. Compares no
    vector with an oracle's: eigenvectors are defined only up to sign (and rotation within
    a repeated eigenvalue), the residual is not.

    Args:
        operator: dense symmetric matrix ``A`` or a matvec ``v ↦ A v``.
        result: has ``.eigenvalues`` (k,) and ``.eigenvectors`` (k, D), one vector per row.
        rtol, atol: residual tolerance relative to the spectral scale, and absolute.
        name: what the pairs are, for the message.

    Raises:
        AssertionError: a vector is not unit or a residual is too large (the worst is named).
    """
    values = torch.as_tensor(_values(result, "result"))
    vectors = result.eigenvectors.detach().double().cpu()
    if vectors.dim() != 2 or vectors.shape[0] != values.numel():
        raise AssertionError(
            f"{name}: {values.numel()} eigenvalues but eigenvectors of shape "
            f"{tuple(vectors.shape)} (expected one row per eigenvalue)"
        )
    if isinstance(operator, Tensor):
        A = operator.detach().double().cpu()
        scale = float(torch.linalg.eigvalsh(0.5 * (A + A.T)).abs().max()) if A.numel() else 0.0
        products = vectors @ A.T
    else:
        scale = float(values.abs().max()) if values.numel() else 0.0
        like = result.eigenvectors
        products = torch.stack([operator(v).detach().double().cpu() for v in like])
    norms = torch.linalg.vector_norm(vectors, dim=1).numpy()
    _check(
        norms,
        np.ones_like(norms),
        np.full(norms.size, 1e-6),
        f"{name}: norms of the eigenvectors",
        "unit vectors within 1e-6",
    )
    residuals = torch.linalg.vector_norm(products - values[:, None] * vectors, dim=1).numpy()
    _check(
        residuals,
        np.zeros_like(residuals),
        np.full(residuals.size, atol + rtol * scale),
        f"{name}: residuals ‖A v − λ v‖",
        f"rtol={rtol:g} of the spectral scale {scale:.6g}, atol={atol:g}",
    )
