"""Matrix-free eigensolvers and trace estimators against operators with chosen spectra."""

import numpy as np
import pytest
import scipy.sparse.linalg as spla
import torch
from hypothesis import given
from hypothesis import strategies as st

from sgdbreak.errors import NonFiniteMeasurement
from sgdbreak.estimators.linalg import (
    as_linear_operator,
    hutchinson_trace,
    lanczos,
    power_iteration,
)
from sgdbreak.testing import symmetric_matrix_with_spectrum
from sgdbreak.testing.strategies import spectra


def op(A):
    return lambda v: A @ v


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


SPECTRA = {
    "large_gap": [10.0, 1.0, 0.9, 0.5] + [0.1] * 46,
    "clustered_top": [1.0, 0.9999, 0.9998, 0.5] + list(np.linspace(-0.4, 0.4, 46)),
    "negative_dominant": [0.9, 0.5, 0.2, -3.0, -2.5] + list(np.linspace(-0.5, 0.1, 45)),
    "rank_deficient": [2.0, 1.0] + [0.0] * 48,
    "all_negative": list(np.linspace(-5.0, -0.5, 50)),
}


@pytest.mark.parametrize("name", sorted(SPECTRA))
@pytest.mark.parametrize("k", [1, 3])
def test_lanczos_largest_algebraic(name, k):
    ev = torch.tensor(SPECTRA[name], dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(1))
    res = lanczos(op(A), 50, k, tol=1e-10, max_matvecs=200, dtype=torch.float64, generator=gen(2))
    expected = torch.sort(ev, descending=True).values[:k]
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-6, atol=1e-8)
    # Ritz vectors are eigenvectors.
    for lam, v in zip(res.eigenvalues, res.eigenvectors):
        assert torch.linalg.norm(A @ v - lam * v) < 1e-4


def test_lanczos_largest_magnitude_and_smallest():
    ev = torch.tensor(SPECTRA["negative_dominant"], dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(3))
    lm = lanczos(op(A), 50, 1, which="LM", tol=1e-10, max_matvecs=200, dtype=torch.float64, generator=gen())
    sa = lanczos(op(A), 50, 2, which="SA", tol=1e-10, max_matvecs=200, dtype=torch.float64, generator=gen())
    assert lm.eigenvalues.item() == pytest.approx(-3.0, rel=1e-8)
    torch.testing.assert_close(sa.eigenvalues, torch.tensor([-3.0, -2.5], dtype=torch.float64))


def test_lanczos_budget_reports_not_converged():
    ev = torch.linspace(0, 1, 300, dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen())
    res = lanczos(op(A), 300, 1, tol=1e-12, max_matvecs=5, dtype=torch.float64, generator=gen())
    assert not res.converged and res.num_matvecs == 5


def test_lanczos_is_reproducible_with_generator():
    A = symmetric_matrix_with_spectrum(torch.linspace(-1, 2, 40), generator=gen())
    a = lanczos(op(A), 40, 2, tol=1e-4, dtype=torch.float64, generator=gen(7))
    b = lanczos(op(A), 40, 2, tol=1e-4, dtype=torch.float64, generator=gen(7))
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs


def test_thick_restart_bounds_basis_and_still_converges():
    ev = torch.tensor([5.0, 4.0] + list(np.linspace(-1, 1, 98)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(4))
    res = lanczos(op(A), 100, 2, tol=1e-9, max_matvecs=300, max_basis=8, dtype=torch.float64, generator=gen())
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4.0], dtype=torch.float64))


@pytest.mark.parametrize("grow", [False, True])
def test_basis_buffers_hold_rows_in_order_whether_preallocated_or_grown(grow):
    from sgdbreak.estimators.linalg import _Basis

    rows = torch.randn(7, 5, dtype=torch.float64, generator=gen(3))
    basis = _Basis(5, 7, torch.float64, "cpu", initial=2, grow=grow)
    assert basis._v.shape[0] == (2 if grow else 7)  # CPU default: preallocated (lazy pages)
    for chunk in (rows[:1], rows[1:4], rows[4:]):  # grows past the initial capacity when growing
        for x in chunk:
            basis.stage().copy_(x)
        if basis.size + basis.staged < 7:
            basis.stage().fill_(9.0)
            basis.unstage()  # a rejected vector leaves no trace
        basis.pending_images.copy_(2 * basis.pending)
        assert basis.commit() == len(chunk)
    assert torch.equal(basis.V, rows) and torch.equal(basis.AV, 2 * rows)
    with pytest.raises(RuntimeError, match="full"):
        basis.stage()
    basis.replace(rows[5:], 3 * rows[5:])
    assert torch.equal(basis.V, rows[5:]) and torch.equal(basis.AV, 3 * rows[5:])
    assert basis.staged == 0 and basis.stage().shape == (5,)


def test_lanczos_gives_the_same_result_with_growing_buffers(monkeypatch):
    """Growing buffers (the default off CPU) and preallocated ones (CPU) hold the same rows."""
    from sgdbreak.estimators import linalg

    ev = torch.tensor([5.0, 4.9, 4.0] + list(np.linspace(-1, 1, 57)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(6))
    init = torch.randn(3, 60, dtype=torch.float64, generator=gen(8))

    def solve():  # a warm block, thick restarts (max_basis 8) and k = 2
        return lanczos(op(A), 60, 2, tol=1e-9, max_matvecs=200, max_basis=8, init=init,
                       dtype=torch.float64, generator=gen(2))

    kept = init.clone()
    preallocated = solve()
    assert torch.equal(init, kept)  # the warm block is copied into the basis, never written
    basis = linalg._Basis
    monkeypatch.setattr(linalg, "_Basis", lambda *args, **kwargs: basis(*args, **{**kwargs, "grow": True}))
    grown = solve()
    assert preallocated.converged and grown.num_matvecs == preallocated.num_matvecs
    assert torch.equal(grown.eigenvalues, preallocated.eigenvalues)
    torch.testing.assert_close(grown.eigenvalues, ev[:2])


def test_estimates_trace_the_convergence_of_the_top_ritz_value():
    ev = torch.tensor([5.0, 4.0] + list(np.linspace(-1, 1, 98)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(4))
    res = lanczos(op(A), 100, 1, tol=1e-9, max_matvecs=300, max_basis=8, dtype=torch.float64, generator=gen())
    products = [n for n, _ in res.estimates]
    values = [t for _, t in res.estimates]
    assert products == list(range(1, res.num_matvecs + 1))
    # Rayleigh-Ritz on nested subspaces (thick restarts keep the best Ritz vectors): the
    # top Ritz value only grows, stays below λ1 and ends at the returned eigenvalue.
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
    assert max(values) <= 5.0 + 1e-12 and values[-1] == res.eigenvalues[0].item()
    power = power_iteration(op(A), 100, 1, tol=1e-3, dtype=torch.float64, generator=gen())
    assert power.estimates == ()
    # Warm starts begin from the kept Ritz block, or the eigenvectors where none is kept.
    assert res.start_vectors is res.restart_vectors and res.start_vectors.shape == (3, 100)
    assert power.start_vectors is power.eigenvectors


def test_warm_start_needs_far_fewer_products():
    ev = torch.tensor([3.0, 2.7, 2.5] + list(np.linspace(-1.5, 1.5, 197)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(5))
    first = lanczos(op(A), 200, 1, tol=1e-8, dtype=torch.float64, generator=gen())
    E = torch.randn(200, 200, dtype=torch.float64, generator=gen(6)) * 1e-4
    B = A + (E + E.T) / 2
    cold = lanczos(op(B), 200, 1, tol=1e-4, dtype=torch.float64, generator=gen(8))
    warm = lanczos(op(B), 200, 1, tol=1e-4, init=first, dtype=torch.float64, generator=gen(8))
    exact = torch.linalg.eigvalsh(B)[-1]
    assert warm.eigenvalues.item() == pytest.approx(exact.item(), rel=1e-4)
    assert warm.num_matvecs <= 3 and cold.num_matvecs >= 3 * warm.num_matvecs


def test_warm_start_catches_a_swap_of_the_top_eigenvectors():
    # The previous top eigenvector becomes the second: a single-vector warm start would
    # stop on it; the kept Ritz block sees the swap.
    ev = torch.tensor([3.0, 2.9, 2.0] + list(np.linspace(-1, 1, 97)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(13))
    first = lanczos(op(A), 100, 1, tol=1e-8, dtype=torch.float64, generator=gen())
    u = first.eigenvectors[0]
    B = A - 0.2 * torch.outer(u, u)  # old top now at 2.8, below 2.9
    res = lanczos(op(B), 100, 1, tol=1e-4, init=first, dtype=torch.float64, generator=gen())
    assert res.eigenvalues.item() == pytest.approx(torch.linalg.eigvalsh(B)[-1].item(), rel=1e-4)


def test_power_iteration_handles_negative_dominant():
    ev = torch.tensor([1.0, 0.2, -3.0, -0.5], dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen())
    res = power_iteration(op(A), 4, 1, tol=1e-9, max_matvecs=2000, dtype=torch.float64, generator=gen())
    assert res.eigenvalues.item() == pytest.approx(1.0, rel=1e-6)
    lm = power_iteration(op(A), 4, 1, which="LM", tol=1e-9, max_matvecs=2000, dtype=torch.float64, generator=gen())
    assert lm.eigenvalues.item() == pytest.approx(-3.0, rel=1e-6)


def test_power_iteration_deflation_top2():
    ev = torch.tensor([4.0, 2.0, 0.5, 0.1, 0.05], dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen())
    res = power_iteration(op(A), 5, 2, tol=1e-10, max_matvecs=4000, dtype=torch.float64, generator=gen())
    torch.testing.assert_close(res.eigenvalues, torch.tensor([4.0, 2.0], dtype=torch.float64), rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_is_unbiased(method):
    ev = torch.tensor([5.0, 3.0, 1.0] + list(np.linspace(-0.5, 0.5, 37)), dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(9))
    g = gen(10)
    values = [hutchinson_trace(op(A), 40, num_samples=12, method=method, dtype=torch.float64, generator=g).value
              for _ in range(200)]
    values = torch.tensor(values)
    stderr = values.std() / len(values) ** 0.5
    assert abs(values.mean() - ev.sum()) < 3 * stderr + 1e-9


def test_hutchpp_beats_hutchinson_on_decaying_spectrum():
    ev = torch.tensor([100.0, 50.0, 20.0] + [0.01] * 97, dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(11))
    g = gen(12)
    err = {m: torch.tensor([hutchinson_trace(op(A), 100, num_samples=18, method=m, dtype=torch.float64,
                                             generator=g).value - ev.sum().item() for _ in range(30)]).abs().mean()
           for m in ["hutchinson", "hutch++"]}
    assert err["hutch++"] < 0.1 * err["hutchinson"]


def test_trace_stderr_is_calibrated():
    A = symmetric_matrix_with_spectrum(torch.linspace(-1, 3, 30), generator=gen())
    res = hutchinson_trace(op(A), 30, num_samples=50, dtype=torch.float64, generator=gen())
    assert res.stderr > 0 and abs(res.value - torch.trace(A).item()) < 5 * res.stderr


def test_linear_operator_adapter_with_eigsh():
    ev = torch.tensor([3.0, 2.0, 1.0] + [0.1] * 27, dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen())
    vals = spla.eigsh(as_linear_operator(op(A), 30), k=2, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(sorted(vals), [2.0, 3.0], rtol=1e-8)


@given(spectra(min_dim=3, max_dim=12, structure="generic"), st.floats(0.1, 10))
def test_scaling_operator_scales_eigenvalues(ev, c):
    A = symmetric_matrix_with_spectrum(ev, generator=gen())
    # Near-degenerate tops (gap ~ 1e-7) fool gap-based stopping; the residual test is rigorous.
    kw = dict(tol=1e-12, convergence="residual", dtype=torch.float64)
    a = lanczos(op(A), len(ev), 1, generator=gen(), **kw)
    b = lanczos(op(c * A), len(ev), 1, generator=gen(), **kw)
    # tol is relative to the spectral scale max|λ|.
    scale = max(abs(e) for e in ev)
    assert b.eigenvalues.item() == pytest.approx(c * a.eigenvalues.item(), rel=1e-6, abs=1e-9 * c * scale)
    assert a.eigenvalues.item() == pytest.approx(max(ev), rel=1e-6, abs=1e-9 * scale)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"k": 0}, "k must be"), ({"k": 11}, "larger than"), ({"tol": -1.0}, "tol"), ({"which": "XX"}, "which"),
     ({"max_matvecs": 0}, "max_matvecs"), ({"init": torch.ones(3)}, "length 10")],
)
def test_bad_arguments(kwargs, message):
    A = torch.eye(10)
    with pytest.raises(ValueError, match=message):
        lanczos(op(A), 10, **{"k": 1, **kwargs})


def test_non_finite_matvec_is_an_error():
    with pytest.raises(ValueError, match="non-finite"):
        lanczos(lambda v: v * float("nan"), 5)


class _BlockCounting:
    """A matvec with ``matmat``: counts batched calls and the rows they carried."""

    def __init__(self, A):
        self.A, self.calls, self.rows = A, 0, 0

    def __call__(self, v):
        return self.A @ v

    def matmat(self, block):
        self.calls += 1
        self.rows += block.shape[0]
        return block @ self.A


def test_warm_start_block_goes_through_matmat_and_changes_nothing():
    A = symmetric_matrix_with_spectrum(torch.tensor([5.0, 4.0, 3.5] + list(np.linspace(0, 1, 37))), generator=gen(0))
    cold = lanczos(op(A), 40, 2, tol=1e-8, max_matvecs=40, generator=gen(), dtype=torch.float64)
    plain = lanczos(op(A), 40, 2, tol=1e-8, max_matvecs=40, init=cold, dtype=torch.float64)
    counting = _BlockCounting(A)
    batched = lanczos(counting, 40, 2, tol=1e-8, max_matvecs=40, init=cold, dtype=torch.float64)
    assert counting.calls == 1 and counting.rows == cold.start_vectors.shape[0] == 4
    assert batched.num_matvecs == plain.num_matvecs
    torch.testing.assert_close(batched.eigenvalues, plain.eigenvalues, rtol=1e-12, atol=1e-12)


def test_thick_restarts_keep_the_answer():
    ev = torch.tensor(SPECTRA["large_gap"], dtype=torch.float64)
    A = symmetric_matrix_with_spectrum(ev, generator=gen(1))
    res = lanczos(op(A), len(ev), 2, tol=1e-8, max_matvecs=300, max_basis=6, generator=gen(), dtype=torch.float64)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, ev.sort(descending=True).values[:2], rtol=1e-6, atol=1e-9)


def test_inf_in_one_product_is_an_error():
    A = torch.eye(6, dtype=torch.float64)

    def matvec(v):
        out = A @ v
        out[3] = float("inf")
        return out

    with pytest.raises(ValueError, match="non-finite"):
        lanczos(matvec, 6, dtype=torch.float64, generator=gen())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_lanczos_rejects_a_non_finite_warm_start_vector(bad):
    """The init block's finiteness is read off row maxima and minima (no float64 copy)."""
    block = torch.randn(2, 6)
    block[1, 3] = bad
    with pytest.raises(NonFiniteMeasurement, match="init vectors"):
        lanczos(lambda v: v, 6, init=block)


def test_lanczos_accepts_a_huge_finite_warm_start_vector():
    """Entries whose squares overflow float32 are still finite: no false alarm."""
    A = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.5]))
    res = lanczos(lambda v: A @ v, 4, init=torch.tensor([3e38, 1e37, 0.0, 0.0]), tol=1e-6)
    assert res.eigenvalues.item() == pytest.approx(4.0, rel=1e-5)
