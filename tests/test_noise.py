"""Tests of sgdbreak.estimators.noise: covariance spectrum, noise scale, g_top5_ratio, CountSketch."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from sgdbreak.errors import NonFiniteMeasurement
from sgdbreak.estimators import noise
from sgdbreak.estimators.noise import (
    CountSketch,
    NoiseScaleTracker,
    covariance_spectrum,
    g_top5_ratio,
    gradient_noise_scale,
    noise_metrics,
    two_batch_noise_scale,
)
from sgdbreak.testing import gradient_covariance
from sgdbreak.testing.strategies import sample_matrices


def _samples(num, dim, seed=0, dtype=torch.float64):
    """Samples with a spread spectrum (column scales from 3 down to 0.05) and a mean."""
    gen = torch.Generator().manual_seed(seed)
    scales = torch.logspace(math.log10(3.0), math.log10(0.05), dim, dtype=torch.float64)
    x = torch.randn(num, dim, generator=gen, dtype=torch.float64) * scales
    return (x + torch.randn(dim, generator=gen, dtype=torch.float64)).to(dtype)


def _explicit(samples, scale=1.0):
    """Oracle: the D x D covariance formed explicitly (the kit's), eigenvalues by numpy."""
    cov = gradient_covariance(samples, scale=scale).numpy()
    evals, evecs = np.linalg.eigh(cov)
    return cov, evals[::-1].copy(), evecs[:, ::-1].copy()


# --- against the explicit covariance ---------------------------------------------------


@pytest.mark.parametrize("num,dim", [(6, 40), (12, 12), (2, 3), (30, 5), (9, 8)])
@pytest.mark.parametrize("scale", [1.0, 128])
def test_matches_explicit_covariance(num, dim, scale):
    x = _samples(num, dim, seed=num * 100 + dim)
    spec = covariance_spectrum(x, scale=scale)
    _, evals, _ = _explicit(x, scale)
    rank = min(num - 1, dim)
    assert spec.eigenvalues.dtype == torch.float64
    assert spec.eigenvalues.shape == (num - 1,)
    np.testing.assert_allclose(spec.eigenvalues[:rank].numpy(), evals[:rank], rtol=1e-8)
    assert torch.all(spec.eigenvalues[rank:] == 0)
    assert spec.trace == pytest.approx(evals.sum(), rel=1e-8)
    assert spec.lambda1 == pytest.approx(evals[0], rel=1e-8)
    assert spec.lambda_star == pytest.approx(evals[rank - 1], rel=1e-8)
    assert spec.stable_rank == pytest.approx(evals.sum() / evals[0], rel=1e-8)
    assert spec.cond == pytest.approx(evals[rank - 1] / evals[0], rel=1e-8)
    assert spec.num_samples == num and spec.scale == scale
    assert spec.eigenvectors is None


@pytest.mark.parametrize("num,dim", [(7, 25), (20, 6)])
def test_eigenvectors_are_orthonormal_eigenvectors_of_explicit_covariance(num, dim):
    x = _samples(num, dim, seed=3)
    k = min(num - 1, dim)
    spec = covariance_spectrum(x, k=k, return_eigenvectors=True)
    cov, _, _ = _explicit(x)
    vecs = spec.eigenvectors.numpy()
    assert vecs.shape == (k, dim)
    np.testing.assert_allclose(vecs @ vecs.T, np.eye(k), atol=1e-10)
    residual = cov @ vecs.T - vecs.T * spec.eigenvalues.numpy()
    assert np.abs(residual).max() <= 1e-10 * spec.lambda1


def test_topk_is_a_prefix_and_trace_counts_everything():
    x = _samples(10, 50)
    full = covariance_spectrum(x, return_eigenvectors=True)
    top = covariance_spectrum(x, k=3, return_eigenvectors=True)
    assert torch.equal(top.eigenvalues, full.eigenvalues[:3])
    assert torch.allclose(top.eigenvectors, full.eigenvectors[:3])
    assert top.trace == full.trace and top.lambda_star == full.lambda_star
    assert top.trace == pytest.approx(float(full.eigenvalues.sum()), rel=1e-10)


def test_float32_samples_give_float64_spectrum_and_float32_vectors():
    x = _samples(8, 30, dtype=torch.float32)
    spec = covariance_spectrum(x, k=4, return_eigenvectors=True)
    _, evals, _ = _explicit(x)
    np.testing.assert_allclose(spec.eigenvalues.numpy(), evals[:4], rtol=1e-8)
    assert spec.eigenvectors.dtype == torch.float32


@pytest.mark.parametrize("num,dim", [(5, 37), (40, 7)])
def test_chunking_does_not_change_the_result(monkeypatch, num, dim):
    x = _samples(num, dim, seed=11)
    whole = covariance_spectrum(x, return_eigenvectors=True)
    monkeypatch.setattr(noise, "_CHUNK_ELEMENTS", 3 * num)  # 3-column chunks
    chunked = covariance_spectrum(x, return_eigenvectors=True)
    torch.testing.assert_close(chunked.eigenvalues, whole.eigenvalues, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(chunked.eigenvectors, whole.eigenvectors, rtol=1e-9, atol=1e-12)


def test_identical_samples_give_zero_and_nan_ratios():
    x = torch.full((5, 4), 0.1, dtype=torch.float32)
    spec = covariance_spectrum(x, return_eigenvectors=True)
    assert torch.all(spec.eigenvalues == 0)
    assert spec.trace == 0 and spec.lambda1 == 0 and spec.lambda_star == 0
    assert math.isnan(spec.stable_rank) and math.isnan(spec.cond)
    assert torch.all(spec.eigenvectors == 0)


def test_rank_deficient_samples_have_zero_eigenvectors_past_the_rank():
    # 6 samples on a 2-D affine subspace of R^10: rank 2 < L - 1 = 5.
    gen = torch.Generator().manual_seed(0)
    basis = torch.randn(2, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(6, 2, generator=gen, dtype=torch.float64) @ basis + 1.0
    spec = covariance_spectrum(x, return_eigenvectors=True)
    assert torch.all(spec.eigenvalues[2:] <= 1e-12 * spec.lambda1)
    assert spec.cond <= 1e-12
    assert torch.all(spec.eigenvectors[2:] == 0)
    assert torch.linalg.vector_norm(spec.eigenvectors[:2], dim=1).sub(1).abs().max() < 1e-12


# --- invariants (Hypothesis) -------------------------------------------------------------

def _close(a, b, ref):
    return torch.allclose(a, b, rtol=0, atol=1e-9 * (ref + 1e-12))


@given(sample_matrices(), arrays(np.float64, 12, elements=st.floats(-100, 100)))
def test_adding_a_common_vector_changes_nothing(x, shift):
    shifted = x + torch.from_numpy(shift[: x.shape[1]])
    a, b = covariance_spectrum(x), covariance_spectrum(shifted)
    assert _close(a.eigenvalues, b.eigenvalues, a.lambda1 + 1.0)
    assert b.trace == pytest.approx(a.trace, rel=1e-9, abs=1e-9)


@given(sample_matrices(), st.floats(-50, 50).filter(lambda c: abs(c) > 1e-3))
def test_scaling_samples_scales_eigenvalues_quadratically(x, c):
    a, b = covariance_spectrum(x), covariance_spectrum(c * x)
    assert _close(b.eigenvalues, c**2 * a.eigenvalues, c**2 * a.lambda1)


@given(sample_matrices(), st.randoms(use_true_random=False))
def test_permuting_samples_changes_nothing(x, rnd):
    order = list(range(x.shape[0]))
    rnd.shuffle(order)
    a, b = covariance_spectrum(x), covariance_spectrum(x[order])
    assert _close(a.eigenvalues, b.eigenvalues, a.lambda1)


@given(sample_matrices(), st.floats(0.01, 1000))
def test_spectrum_is_nonnegative_descending_with_rank_at_most_l_minus_1(x, scale):
    num, dim = x.shape
    spec = covariance_spectrum(x, scale=scale, return_eigenvectors=True)
    ev = spec.eigenvalues
    assert ev.shape == (num - 1,)
    assert torch.all(ev >= 0)
    assert torch.all(ev[:-1] >= ev[1:])
    assert torch.all(ev[min(num - 1, dim) :] == 0)
    assert spec.trace == pytest.approx(float(ev.sum()), rel=1e-9, abs=1e-9 * scale)
    _, ref, _ = _explicit(x, scale)
    rank = min(num - 1, dim)
    assert np.allclose(ev[:rank].numpy(), ref[:rank], rtol=0, atol=1e-9 * (ref[0] + 1e-12))
    # Eigenvectors: unit and orthogonal where the eigenvalue is resolved, else zero rows.
    vecs = spec.eigenvectors
    resolved = ev > 1e-6 * spec.lambda1
    sub = vecs[resolved]
    assert torch.allclose(sub @ sub.T, torch.eye(sub.shape[0], dtype=sub.dtype), atol=1e-8)
    cov = torch.from_numpy(_explicit(x, scale)[0])
    residual = cov @ sub.T - sub.T * ev[resolved]
    if sub.numel():
        assert residual.abs().max() <= 1e-8 * spec.lambda1


@given(st.integers(2, 6), st.integers(1, 9), st.floats(-1e3, 1e3))
def test_identical_samples_always_give_zero(num, dim, value):
    x = torch.full((num, dim), value, dtype=torch.float64)
    spec = covariance_spectrum(x)
    assert torch.all(spec.eigenvalues == 0) and spec.trace == 0


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "samples,kwargs,error,match",
    [
        ([[1.0, 2.0], [3.0, 4.0]], {}, TypeError, "torch.Tensor"),
        (torch.zeros(1, 5), {}, ValueError, "at least 2"),
        (torch.zeros(5), {}, ValueError, "2-D"),
        (torch.zeros(3, 4, 5), {}, ValueError, "2-D"),
        (torch.zeros(3, 4, dtype=torch.int64), {}, TypeError, "floating"),
        (torch.randn(4, 6), {"k": 4}, ValueError, "L - 1 = 3"),
        (torch.randn(4, 6), {"k": 0}, ValueError, "got k=0"),
        (torch.randn(4, 6), {"k": 2.0}, TypeError, "integer"),
        (torch.randn(4, 6), {"scale": 0.0}, ValueError, "scale"),
        (torch.randn(4, 6), {"scale": -3}, ValueError, "scale"),
    ],
)
def test_bad_input_is_refused_clearly(samples, kwargs, error, match):
    with pytest.raises(error, match=match):
        covariance_spectrum(samples, **kwargs)


def test_non_finite_rows_are_named():
    x = torch.randn(6, 4)
    x[2, 1] = float("nan")
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"rows \[2, 4\]"):
        covariance_spectrum(x)


# --- g_top5_ratio ------------------------------------------------------------------------


def test_g_top5_ratio_of_gradient_in_span_is_one_and_orthogonal_part_counts():
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(30, 6, generator=gen, dtype=torch.float64))
    span, other = q[:, :5].T, q[:, 5]
    inside = span.T @ torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0], dtype=torch.float64)
    assert g_top5_ratio(inside, span) == pytest.approx(1.0, abs=1e-12)
    g = inside + 2.0 * other
    expected = float(torch.linalg.vector_norm(g) / torch.linalg.vector_norm(inside))
    assert g_top5_ratio(g, span) == pytest.approx(expected, rel=1e-12)
    # The same span given by scaled, mixed, duplicated and zero vectors: same answer.
    mixed = (
        torch.tensor(
            [
                [2.0, 1, 0, 0, 0],
                [0, 3.0, 1, 0, 0],
                [0, 0, 1, 1, 1],
                [0, 0, 0, 5.0, 0],
                [1, 1, 1, 1, 7.0],
            ],
            dtype=torch.float64,
        )
        @ span
    )
    messy = torch.cat([mixed, mixed[:1] * 3, torch.zeros(1, 30, dtype=torch.float64)])
    assert g_top5_ratio(g, messy) == pytest.approx(expected, rel=1e-9)
    assert g_top5_ratio(g.float(), messy.float()) == pytest.approx(expected, rel=1e-5)


def test_g_top5_ratio_edge_cases_and_errors():
    e = torch.eye(4)[:2]
    assert g_top5_ratio(torch.tensor([0.0, 0.0, 1.0, 0.0]), e) == math.inf
    assert math.isnan(g_top5_ratio(torch.zeros(4), e))
    assert g_top5_ratio(torch.tensor([3.0, 0.0, 4.0, 0.0]), e[0]) == pytest.approx(5 / 3)
    with pytest.raises(ValueError, match="D = gradient.numel"):
        g_top5_ratio(torch.ones(4), torch.ones(2, 3))
    with pytest.raises(TypeError):
        g_top5_ratio([1.0, 2.0], e)


# --- gradient noise scale ----------------------------------------------------------------


def test_gradient_noise_scale_values():
    assert gradient_noise_scale(50.0, 0.5) == 100.0
    assert gradient_noise_scale(torch.tensor(3.0), torch.tensor(1.5)) == 2.0
    assert gradient_noise_scale(1.0, 0.0) == math.inf
    assert math.isnan(gradient_noise_scale(0.0, 0.0))
    assert math.isnan(gradient_noise_scale(-1.0, 1.0))
    assert math.isnan(gradient_noise_scale(1.0, -1.0))
    assert math.isnan(gradient_noise_scale(float("nan"), 1.0))


def test_two_batch_estimates_recover_expected_norms_exactly():
    # E||g_B||^2 = |G|^2 + tr/B: feeding the expectations back must give |G|^2 and tr.
    g_sq, tr = 2.5, 40.0
    res = two_batch_noise_scale(g_sq + tr / 8, 8, g_sq + tr / 256, 256)
    assert res.grad_norm_sq == pytest.approx(g_sq, rel=1e-12)
    assert res.trace == pytest.approx(tr, rel=1e-12)
    assert res.noise_scale == pytest.approx(tr / g_sq, rel=1e-12)
    assert (res.small_batch, res.big_batch) == (8.0, 256.0)


def test_two_batch_estimates_are_unbiased_statistically():
    # Mean gradients of B i.i.d. examples g_i = G + xi_i with Cov(xi) = diag(var).
    gen = torch.Generator().manual_seed(0)
    dim, trials, small, big = 20, 4000, 4, 32
    true_g = torch.linspace(-0.3, 0.3, dim, dtype=torch.float64)
    std = torch.linspace(0.2, 1.5, dim, dtype=torch.float64)
    noise_s = torch.randn(trials, dim, generator=gen, dtype=torch.float64) * std / small**0.5
    noise_b = torch.randn(trials, dim, generator=gen, dtype=torch.float64) * std / big**0.5
    s_sq = ((true_g + noise_s) ** 2).sum(1)
    b_sq = ((true_g + noise_b) ** 2).sum(1)
    est = [
        two_batch_noise_scale(float(a), small, float(b), big)
        for a, b in zip(s_sq, b_sq, strict=True)
    ]
    g_hat = torch.tensor([r.grad_norm_sq for r in est])
    t_hat = torch.tensor([r.trace for r in est])
    for values, truth in ((g_hat, float(true_g @ true_g)), (t_hat, float((std**2).sum()))):
        stderr = float(values.std()) / trials**0.5
        assert abs(float(values.mean()) - truth) < 4 * stderr
        assert 4 * stderr < 0.1 * truth  # the check is sharp enough to catch a wrong factor


@pytest.mark.parametrize(
    "args,match",
    [
        ((1.0, 8, 1.0, 8), "larger"),
        ((1.0, 0, 1.0, 8), "small_batch"),
        ((-1.0, 8, 1.0, 16), "small_norm_sq"),
        ((1.0, 8, float("nan"), 16), "big_norm_sq"),
    ],
)
def test_two_batch_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        two_batch_noise_scale(*args)


def test_tracker_smooths_numerator_and_denominator_separately():
    tracker = NoiseScaleTracker(beta=0.5)
    assert math.isnan(tracker.noise_scale) and math.isnan(tracker.trace)
    tracker.update(1.0, 10.0)
    tracker.update(3.0, 2.0)
    # EMA with bias correction: (0.25*1 + 0.5*3)/0.75 and (0.25*10 + 0.5*2)/0.75.
    assert tracker.grad_norm_sq == pytest.approx(1.75 / 0.75)
    assert tracker.trace == pytest.approx(3.5 / 0.75)
    assert tracker.noise_scale == pytest.approx(3.5 / 1.75)  # not the mean of 10 and 2/3
    assert tracker.count == 2


def test_tracker_skips_non_finite_and_round_trips_state():
    tracker = NoiseScaleTracker(beta=0.9)
    tracker.update_two_batch(1.1, 10, 1.01, 100)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        assert tracker.update(float("nan"), 1.0) is False
    assert tracker.update(float("inf"), 1.0) is False  # warned once only
    assert tracker.num_skipped == 2 and tracker.count == 1
    state = tracker.state_dict()
    assert all(type(v) in (int, float) for v in state.values())
    clone = NoiseScaleTracker(beta=0.1)
    clone.load_state_dict(state)
    assert clone.state_dict() == state
    for t in (tracker, clone):
        t.update(2.0, 5.0)
    assert clone.noise_scale == tracker.noise_scale
    with pytest.raises(ValueError, match="keys"):
        clone.load_state_dict({"beta": 0.5})
    with pytest.raises(ValueError, match="beta"):
        NoiseScaleTracker(beta=1.0)


# --- noise_metrics -----------------------------------------------------------------------


def test_noise_metrics_record_is_in_per_example_units():
    x = _samples(12, 40, dtype=torch.float32)
    grad = _samples(1, 40, seed=5)[0].float()
    rec = noise_metrics(x, grad, batch_size=16, k=5)
    spec = covariance_spectrum(x, scale=16, return_eigenvectors=True)
    expected_keys = {
        "lambda1_K",
        "lambda_star_K",
        "trace_K",
        "cond_K",
        "stable_rank_K",
        "gns",
        "g_top5_ratio",
        "noise_batch_size",
        "noise_num_samples",
    }
    assert set(rec) == expected_keys | {f"eig_K_{i}" for i in range(1, 6)}
    assert rec["lambda1_K"] == pytest.approx(16 * covariance_spectrum(x).lambda1, rel=1e-12)
    assert rec["lambda_star_K"] == spec.lambda_star and rec["trace_K"] == spec.trace
    assert rec["eig_K_3"] == float(spec.eigenvalues[2])
    assert rec["gns"] == pytest.approx(spec.trace / float(grad.double() @ grad.double()), rel=1e-6)
    assert rec["g_top5_ratio"] == pytest.approx(g_top5_ratio(grad, spec.eigenvectors[:5]))
    assert rec["noise_batch_size"] == 16 and rec["noise_num_samples"] == 12
    assert all(isinstance(v, float | int) for v in rec.values())


def test_noise_metrics_caps_k_and_drops_non_finite_values():
    x = torch.ones(3, 10)  # identical samples: cond, stable rank, g_top5_ratio undefined
    rec = noise_metrics(x, None, batch_size=4, k=5)
    assert set(rec) == {
        "lambda1_K",
        "lambda_star_K",
        "trace_K",
        "gns",
        "eig_K_1",
        "eig_K_2",
        "noise_batch_size",
        "noise_num_samples",
    }
    assert all(math.isfinite(v) for v in rec.values())
    assert rec["gns"] == 0.0 and rec["lambda1_K"] == 0.0
    with pytest.raises(ValueError, match="D = 10"):
        noise_metrics(x, torch.ones(9), batch_size=4)
    with pytest.raises(ValueError, match="batch_size"):
        noise_metrics(x, None, batch_size=0)


# --- CountSketch -------------------------------------------------------------------------


def test_count_sketch_is_linear_seeded_and_shaped():
    s = CountSketch(1000, 64, seed=3)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 1000, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(s(2 * x - y), 2 * s(x) - s(y))
    assert s(torch.stack([x, y])).shape == (2, 64)
    torch.testing.assert_close(s(torch.stack([x, y]))[1], s(y))
    assert torch.equal(CountSketch(1000, 64, seed=3)(x), s(x))
    assert not torch.equal(CountSketch(1000, 64, seed=4)(x), s(x))
    assert s(x.float()).dtype == torch.float32
    # Every coordinate lands in exactly one bucket with sign +-1: norms of one-hot preserved.
    eye = s(torch.eye(1000, dtype=torch.float64))
    assert torch.all(eye.abs().sum(1) == 1)
    with pytest.raises(ValueError, match="dim=1000"):
        s(torch.randn(999))
    with pytest.raises(ValueError, match="sketch_dim"):
        CountSketch(10, 0)


def test_count_sketch_inner_products_unbiased_with_documented_variance():
    gen = torch.Generator().manual_seed(1)
    dim, m, trials = 2000, 64, 500
    # Non-zero means, as real gradients have: without random signs the collisions of
    # same-sign coordinates would bias the estimate.
    x = torch.randn(dim, generator=gen, dtype=torch.float64) + 0.3
    y = 0.6 * x + torch.randn(dim, generator=gen, dtype=torch.float64) * torch.linspace(0, 2, dim)
    y = y + 0.2
    exact = float(x @ y)
    var = (float(x @ x) * float(y @ y) + exact**2 - 2 * float((x**2 * y**2).sum())) / m
    est = torch.tensor(
        [
            float(CountSketch(dim, m, seed=i)(x) @ CountSketch(dim, m, seed=i)(y))
            for i in range(trials)
        ],
        dtype=torch.float64,
    )
    assert abs(float(est.mean()) - exact) < 4 * (var / trials) ** 0.5
    assert 0.75 < float(est.var()) / var < 1.3
    assert var <= 2 * float(x @ x) * float(y @ y) / m  # the documented simple bound


def test_sketched_samples_estimate_the_spectrum_within_the_documented_error():
    x = _samples(10, 3000, seed=7)
    exact = covariance_spectrum(x)
    m = 1024
    errors = []
    for seed in range(20):
        sk = covariance_spectrum(CountSketch(3000, m, seed=seed)(x))
        errors.append(float((sk.eigenvalues - exact.eigenvalues).abs().max()))
    rms = float(np.sqrt(np.mean(np.square(errors))))
    assert rms <= (2 / m) ** 0.5 * exact.trace
    assert rms > 0  # the sketch is not the identity


def test_probe_per_example_samples_through_a_sketch_never_form_the_dense_rows():
    from torch import nn

    from sgdbreak import Probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(30, 6, dtype=torch.float64), torch.randint(0, 3, (30,))
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y), chunk_size=7)
    sketch = CountSketch(probe.dim, 12, seed=3)
    widths = []

    def recording(rows):
        widths.append(tuple(rows.shape))
        return sketch(rows)

    small = probe.gradient_samples(method="per_example", sketch=recording)
    dense = probe.gradient_samples(method="per_example")
    assert small.shape == (30, 12) and max(w[0] for w in widths) == 7
    torch.testing.assert_close(small, sketch(dense), rtol=1e-10, atol=1e-12)


# --- the native-precision Gram (gram_dtype=None), the monitor's default -------------------


@pytest.mark.parametrize("num,dim", [(8, 300), (20, 4000), (30, 5)])
def test_native_gram_matches_the_float64_spectrum_to_float32_accuracy(num, dim):
    x = _samples(num, dim, seed=num + dim, dtype=torch.float32)
    exact = covariance_spectrum(x, return_eigenvectors=True)
    fast = covariance_spectrum(x, return_eigenvectors=True, gram_dtype=None)
    assert fast.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(fast.eigenvalues, exact.eigenvalues, rtol=0, atol=1e-5 * exact.lambda1)
    assert fast.trace == pytest.approx(exact.trace, rel=1e-5)
    # Same directions (signs fixed the same way) where the eigenvalues are well separated.
    gaps = (exact.eigenvalues[:-1] - exact.eigenvalues[1:]).abs() > 1e-2 * exact.lambda1
    for i in range(min(3, num - 2)):
        if gaps[i] and (i == 0 or gaps[i - 1]):
            torch.testing.assert_close(fast.eigenvectors[i], exact.eigenvectors[i], rtol=0, atol=1e-3)
    rec64 = noise_metrics(x, x.mean(0), batch_size=4)
    rec32 = noise_metrics(x, x.mean(0), batch_size=4, gram_dtype=None)
    assert rec32.keys() == rec64.keys()
    for key, value in rec64.items():
        assert rec32[key] == pytest.approx(value, rel=1e-4, abs=1e-9), key


def test_native_gram_rejects_non_finite_rows_by_name_and_bad_dtype():
    x = _samples(6, 50, dtype=torch.float32)
    x[4, 7] = float("nan")
    for gram_dtype in (None, torch.float64):
        with pytest.raises(NonFiniteMeasurement, match=r"rows \[4\]"):
            covariance_spectrum(x, gram_dtype=gram_dtype)
    with pytest.raises(ValueError, match="gram_dtype"):
        covariance_spectrum(_samples(6, 50), gram_dtype=torch.float16)


def test_spectrum_does_not_modify_float64_samples():
    x = _samples(6, 50)
    copy = x.clone()
    covariance_spectrum(x, return_eigenvectors=True)
    assert torch.equal(x, copy)


def test_native_gram_gives_exact_zeros_for_identical_samples():
    x = torch.full((5, 300), 0.1, dtype=torch.float32) + torch.linspace(0, 1, 300)
    spec = covariance_spectrum(x, return_eigenvectors=True, gram_dtype=None)
    assert torch.all(spec.eigenvalues == 0) and spec.trace == 0
    assert math.isnan(spec.cond) and torch.all(spec.eigenvectors == 0)


def test_noise_eigenvectors_have_their_largest_magnitude_entry_positive():
    raw = torch.tensor([[1.0, -3.0, 2.0], [0.5, 2.0, -1.0], [-2.0, 2.0, 0.0]])
    norms = torch.linalg.vector_norm(raw, dim=1).double()
    out = noise._unit_rows(raw.clone(), norms, torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64), 4)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert out[0, 1] > 0 and out[1, 1] > 0  # flipped / kept
    assert out[2, 1] > 0  # a tie between +2 and -2: the positive entry wins
