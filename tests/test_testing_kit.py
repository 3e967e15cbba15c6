"""The public testing kit: each strategy draws what it documents, oracles and assertions hold."""

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import find, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

from sgdbreak import covariance_spectrum, hessian_eigenvalues
from sgdbreak.estimators.samples import per_example_gradients
from sgdbreak.testing import (
    adam_preconditioner,
    assert_eigenpairs,
    assert_eigenvalues_close,
    assert_spectrum_close,
    gradient_covariance,
    per_example_covariance,
    per_example_gradients_by_loop,
    preconditioned_hessian,
    tiny_problem,
)
from sgdbreak.testing.strategies import (
    CI_PROFILE,
    PROFILE,
    STRUCTURES,
    KnownOperator,
    register_profiles,
    sample_matrices,
    samples_with_covariance,
    spectra,
    symmetric_operators,
    tiny_problems,
)

ROOT = Path(__file__).resolve().parents[1]
SPAN, GAP, WIDTH = 20.0, 0.1 * 20.0, 1e-3 * 20.0  # the defaults of spectra()
ROUND = 1e-12 * SPAN


# --- spectra -----------------------------------------------------------------------------


@pytest.mark.parametrize("structure", STRUCTURES)
@given(data=st.data())
def test_spectra_have_the_structure_they_name(structure, data):
    ev = data.draw(spectra(structure=structure))
    assert isinstance(ev, list) and all(isinstance(v, float) for v in ev)
    assert ev == sorted(ev, reverse=True) and all(-10.0 <= v <= 10.0 for v in ev)
    assert 1 <= len(ev) <= 12
    if structure == "generic":
        assert len(set(ev)) == len(ev)
    elif structure == "gap":
        assert len(ev) >= 2 and ev[0] - ev[1] >= GAP - ROUND
    elif structure == "cluster":
        assert len(ev) >= 2 and ev[0] - ev[1] <= WIDTH + ROUND
    elif structure == "repeated":
        assert max(Counter(ev).values()) >= 2
    elif structure == "negative_dominant":
        assert ev[-1] < 0 and all(abs(v) <= -ev[-1] - GAP + ROUND for v in ev[:-1])
    else:
        zeros = sum(v == 0 for v in ev)
        assert 1 <= zeros < len(ev) and all(abs(v) >= GAP for v in ev if v != 0)


@given(spectra(min_dim=3, max_dim=5, min_value=0.0, max_value=1.0))
def test_spectra_respect_bounds_and_default_to_the_structures_the_bounds_allow(ev):
    assert 3 <= len(ev) <= 5 and all(0.0 <= v <= 1.0 for v in ev)


def test_spectra_refuse_what_they_cannot_draw():
    with pytest.raises(InvalidArgument, match="negative_dominant.*min_value"):
        spectra(min_value=0.0, structure="negative_dominant")
    with pytest.raises(InvalidArgument, match="unknown structure 'gaps'"):
        spectra(structure="gaps")
    with pytest.raises(InvalidArgument, match="max_dim >= 2"):
        spectra(max_dim=1, structure="gap")
    with pytest.raises(InvalidArgument, match="min_gap"):
        spectra(min_gap=1.5)


# --- operators and samples with known answers ------------------------------------------


@given(symmetric_operators(), st.integers(0, 2**16))
def test_operators_matvec_is_the_matrix_and_the_spectrum_is_known(op, seed):
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(op(v), op.matrix @ v) and op.num_matvecs == 1
    assert torch.equal(op.matrix, op.matrix.T)
    assert_spectrum_close(torch.linalg.eigvalsh(op.matrix), op.eigenvalues, rtol=1e-12)
    assert_eigenpairs(
        op.matrix,
        SimpleNamespace(eigenvalues=op.eigenvalues, eigenvectors=op.eigenvectors),
        rtol=1e-12,
        atol=1e-300,
    )


FIND = settings(database=None, max_examples=1000)


def test_operators_shrink_to_a_diagonal_matrix_and_rebuild_from_their_repr():
    op = find(symmetric_operators(spectra(min_dim=2)), lambda op: True, settings=FIND)
    assert op.dim == 2 and repr(op).endswith("seed=0, rotated=False, dtype=torch.float64)")
    assert all(v == int(v) for v in op.eigenvalues.tolist())  # round numbers
    assert torch.equal(op.matrix, torch.diag(op.eigenvalues))
    rotated = find(
        symmetric_operators(), lambda op: op.dim > 2 and op.matrix[0, 1] != 0, settings=FIND
    )
    again = eval(repr(rotated), {"KnownOperator": KnownOperator, "torch": torch})  # noqa: S307
    assert torch.equal(again.matrix, rotated.matrix)
    op32 = find(
        symmetric_operators(dtype=torch.float32, rotated=True), lambda op: op.dim > 2, settings=FIND
    )
    assert op32.matrix.dtype == torch.float32 and op32(torch.ones(op32.dim)).dtype == torch.float32


@given(sample_matrices())
def test_sample_matrices_have_the_documented_shapes(x):
    assert x.dtype == torch.float64 and 2 <= x.shape[0] <= 8 and 1 <= x.shape[1] <= 12
    assert x.abs().max() <= 10


@given(samples_with_covariance())
def test_samples_have_the_covariance_they_claim(known):
    num, dim = known.samples.shape
    assert 2 <= num <= 8 and 1 <= dim <= 12 and known.eigenvalues.shape == (num - 1,)
    assert torch.all(known.eigenvalues >= 0)
    rounding = 1e-12 * (1.0 + float(known.eigenvalues.max()) + float(known.mean.abs().max()) ** 2)
    torch.testing.assert_close(
        gradient_covariance(known.samples), known.covariance, rtol=0, atol=rounding
    )
    torch.testing.assert_close(known.samples.mean(dim=0), known.mean, rtol=0, atol=rounding)
    spec = covariance_spectrum(known.samples)
    assert_spectrum_close(
        spec, known.eigenvalues, rtol=0, atol=rounding, name="covariance_spectrum"
    )
    assert spec.trace == pytest.approx(known.trace, rel=0, abs=dim * rounding)


# --- tiny problems -------------------------------------------------------------------------


@given(tiny_problems())
def test_tiny_problems_dense_hessian_matches_lanczos(problem):
    H = problem.hessian()
    assert H.shape == (problem.num_params,) * 2 and torch.equal(H, H.T) and torch.isfinite(H).all()
    assert problem.num_params <= 91
    expected = torch.linalg.eigvalsh(H).flip(0)[:1]
    res = hessian_eigenvalues(
        problem.loss,
        problem.params,
        tol=1e-10,
        max_hvps=problem.num_params + 5,
        generator=torch.Generator().manual_seed(0),
    )
    assert_eigenvalues_close(
        res, expected, rtol=1e-6, atol=1e-9 * float(H.abs().max()), name="lambda1_H"
    )


def test_tiny_problems_leave_the_global_rng_alone_and_rebuild_from_their_repr():
    state = torch.get_rng_state()
    problem = find(tiny_problems(), lambda p: p.num_params > 30, settings=FIND)
    assert torch.equal(torch.get_rng_state(), state)
    again = eval(repr(problem), {"tiny_problem": tiny_problem})  # noqa: S307 - our own repr
    assert repr(again) == repr(problem) and torch.equal(again.inputs, problem.inputs)
    for a, b in zip(problem.params, again.params):
        assert torch.equal(a, b)
    smallest = find(tiny_problems(), lambda p: True, settings=FIND)
    assert repr(smallest) == (
        "tiny_problem('mlp', features=1, hidden=1, outputs=2, num_examples=2, "
        "loss='cross_entropy', seed=0, data_seed=0)"
    )


def test_tiny_problem_matches_seeding_globally():
    torch.manual_seed(2)
    expected = nn.Sequential(
        nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)
    ).double()
    problem = tiny_problem("batchnorm", seed=2, loss="mse")
    for a, b in zip(expected.parameters(), problem.model.parameters()):
        assert torch.equal(a, b)
    assert problem.targets.shape == (24, 3) and problem.targets.dtype == torch.float64
    with pytest.raises(ValueError, match="even"):
        tiny_problem("cnn", features=3)
    with pytest.raises(ValueError, match="outputs must be an int >= 2"):
        tiny_problem(outputs=1)


# --- assertions ----------------------------------------------------------------------------


def test_assert_eigenvalues_close_names_the_worst_pair():
    assert_eigenvalues_close(torch.tensor([3.0, 1.0]), [3.0, 1.0 + 1e-7], rtol=1e-6)
    result = SimpleNamespace(eigenvalues=torch.tensor([3.0, 0.9, 0.10001], dtype=torch.float64))
    with pytest.raises(
        AssertionError,
        match=r"(?s)differ at 2 of 3 positions.*"
        r"worst: index 1: got 0\.9, expected 1\.0, error 0\.1 > allowed 1e-06",
    ):
        assert_eigenvalues_close(result, np.array([3.0, 1.0, 0.1]), rtol=1e-6, atol=0)
    with pytest.raises(AssertionError, match=r"lambda1_H: got 1 values, expected 2"):
        assert_eigenvalues_close(2.0, [2.0, 1.0], name="lambda1_H")
    with pytest.raises(AssertionError, match=r"worst: index 0: got nan, expected 2\.0, error inf"):
        assert_eigenvalues_close([float("nan"), 1.0], [2.0, 1.0])
    with pytest.raises(TypeError, match="actual: expected eigenvalues"):
        assert_eigenvalues_close(object(), [1.0])


def test_assert_spectrum_close_pads_sorts_and_scales_the_tolerance():
    x = torch.randn(5, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    dense = torch.linalg.eigvalsh(gradient_covariance(x))  # 9 values, ascending, 5 of them ~0
    assert_spectrum_close(covariance_spectrum(x), dense, rtol=1e-10)
    with pytest.raises(
        AssertionError,
        match=r"(?s)rtol=1e-08 of max\|expected\|=4.*"
        r"worst: index 1: got 2\.0, expected 1\.0, error 1 > allowed 4e-08",
    ):
        assert_spectrum_close([4.0, 2.0], [1.0, 4.0, 0.0])


def test_assert_eigenpairs_checks_residuals_and_norms():
    A = torch.diag(torch.tensor([2.0, 1.0], dtype=torch.float64))
    good = SimpleNamespace(
        eigenvalues=torch.tensor([2.0, 1.0]), eigenvectors=torch.eye(2, dtype=torch.float64)
    )
    assert_eigenpairs(A, good)
    assert_eigenpairs(lambda v: A @ v, good)
    swapped = SimpleNamespace(
        eigenvalues=torch.tensor([2.0, 1.0]), eigenvectors=torch.eye(2).flip(0)
    )
    with pytest.raises(AssertionError, match=r"residuals.*\n.*worst: index 0: got 1\.0"):
        assert_eigenpairs(A, swapped)
    long = SimpleNamespace(eigenvalues=torch.tensor([2.0]), eigenvectors=2 * torch.eye(2)[:1])
    with pytest.raises(AssertionError, match="norms of the eigenvectors"):
        assert_eigenpairs(A, long)


# --- oracles -------------------------------------------------------------------------------


@given(sample_matrices(), st.floats(0.5, 200))
def test_gradient_covariance_is_numpy_cov(x, scale):
    expected = scale * np.cov(x.numpy(), rowvar=False, ddof=1).reshape(x.shape[1], x.shape[1])
    rounding = 1e-12 * scale * float(x.abs().max()) ** 2  # centering cancels up to eps·max|x|
    np.testing.assert_allclose(
        gradient_covariance(x, scale=scale).numpy(), expected, rtol=1e-10, atol=rounding
    )


def test_per_example_covariance_is_the_paper_k():
    problem = tiny_problem("cnn", features=4, hidden=2, num_examples=7)
    model, crit, x, y = problem.model, problem.criterion, problem.inputs, problem.targets
    K = per_example_covariance(model, crit, x, y)
    rows = per_example_gradients_by_loop(model, crit, x, y)
    torch.testing.assert_close(
        rows, per_example_gradients(model, crit, x, y), rtol=1e-10, atol=1e-12
    )
    # K has 1/N; covariance_spectrum's sample covariance has 1/(N - 1).
    spec = covariance_spectrum(rows, scale=6 / 7)
    assert_spectrum_close(spec, torch.linalg.eigvalsh(K), rtol=1e-10)
    assert spec.trace == pytest.approx(float(torch.trace(K)), rel=1e-10)
    full = torch.autograd.grad(problem.loss(), problem.params)
    torch.testing.assert_close(
        rows.mean(dim=0), torch.cat([g.reshape(-1) for g in full]), rtol=1e-10, atol=1e-12
    )


def test_preconditioned_hessian_matches_torch_adam():
    problem = tiny_problem("mlp", features=3, hidden=4, outputs=2, num_examples=16, seed=4)
    params, lr, betas, eps = problem.params, 0.05, (0.9, 0.99), 1e-8
    opt = torch.optim.Adam(params, lr=lr, betas=betas, eps=eps)
    for _ in range(5):
        opt.zero_grad()
        problem.loss().backward()
        opt.step()
    before = torch.cat([p.detach().reshape(-1) for p in params])
    opt.zero_grad()
    problem.loss().backward()
    opt.step()
    state = [opt.state[p] for p in params]
    step = state[0]["step"]
    assert float(step) == 6
    P = adam_preconditioner([s["exp_avg_sq"] for s in state], step, betas=betas, eps=eps)
    # Adam's step is -lr P^{-1} m_t: the preconditioner is the one torch.optim.Adam applies.
    m = torch.cat([s["exp_avg"].reshape(-1) for s in state])
    after = torch.cat([p.detach().reshape(-1) for p in params])
    torch.testing.assert_close(after - before, -lr * m / P, rtol=1e-9, atol=1e-14)

    H = problem.hessian()
    PH = preconditioned_hessian(H, [s["exp_avg_sq"] for s in state], step, betas=betas, eps=eps)
    assert torch.equal(PH, PH.T)
    top = torch.linalg.eigvalsh(PH)[-1].item()
    eig = np.linalg.eigvals(H.numpy() / P.numpy()[:, None])  # P^{-1} H, not symmetric
    assert np.abs(eig.imag).max() <= 1e-8 * np.abs(eig.real).max()
    assert top == pytest.approx(eig.real.max(), rel=1e-8)
    flat = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state])
    assert torch.equal(preconditioned_hessian(H, flat, int(step), betas=betas, eps=eps), PH)


def test_preconditioned_hessian_bad_input():
    v = torch.ones(3)
    with pytest.raises(ValueError, match="step must be"):
        adam_preconditioner(v, 0, betas=(0.9, 0.999), eps=1e-8)
    with pytest.raises(ValueError, match="zero entries"):
        adam_preconditioner(torch.zeros(3), 1, betas=(0.9, 0.999), eps=0.0)
    with pytest.raises(ValueError, match="H must be 3×3"):
        preconditioned_hessian(torch.eye(2), v, 1, betas=(0.9, 0.999), eps=1e-8)


# --- packaging: optional Hypothesis, profiles ------------------------------------------------


def _python(code):
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )


def test_hypothesis_stays_optional():
    code = (
        "import sys\n"
        "import sgdbreak, sgdbreak.testing\n"
        "assert 'hypothesis' not in sys.modules, 'import sgdbreak imported hypothesis'\n"
        "sys.modules['hypothesis'] = None  # as if it were not installed\n"
        "try:\n"
        "    import sgdbreak.testing.strategies\n"
        "except ImportError as error:\n"
        "    print(error)\n"
    )
    out = _python(code)
    assert out.returncode == 0, out.stderr
    assert (
        out.stdout.strip()
        == "sgdbreak.testing.strategies needs Hypothesis: pip install 'sgdbreak[testing]'"
    )


def test_strategies_are_reachable_as_an_attribute():
    import sgdbreak.testing

    assert sgdbreak.testing.strategies.spectra is spectra


def test_register_profiles_fit_torch():
    register_profiles(max_examples=7)
    profile, ci = settings.get_profile(PROFILE), settings.get_profile(CI_PROFILE)
    assert profile.deadline is None and profile.max_examples == 7 and not profile.derandomize
    assert ci.deadline is None and ci.max_examples == 7 and ci.derandomize
    register_profiles()
    assert settings.get_profile(PROFILE).max_examples == 25


# --- docs/testing.md runs --------------------------------------------------------------------


def test_docs_testing_examples_run():
    text = (ROOT / "docs" / "testing.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    namespace = {}
    previous = settings.get_current_profile_name()
    try:
        for block in blocks:
            exec(compile(block, "docs/testing.md", "exec"), namespace)  # noqa: S102 - our own docs
        tests = [f for name, f in namespace.items() if name.startswith("test_") and callable(f)]
        assert len(tests) == 3
        for test in tests:
            test()
    finally:
        settings.load_profile(previous)
