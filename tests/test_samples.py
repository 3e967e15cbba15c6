"""Tests of sgdbreak.estimators.samples: micro-batch and per-example gradient samples."""

import pytest
import torch
from torch import nn

from sgdbreak.estimators.noise import CountSketch, covariance_spectrum
from sgdbreak.estimators.samples import (
    draw_batches,
    full_gradient,
    microbatch_gradients,
    per_example_gradients,
)
from sgdbreak.testing import per_example_gradients_by_loop, tiny_problem


def _flat(grads):
    return torch.cat([g.reshape(-1) for g in grads])


def _mlp(seed=0, dtype=torch.float64):
    return tiny_problem("mlp", hidden=7, seed=seed, dtype=dtype).model


def _data(n=23, seed=1, dtype=torch.float64):
    problem = tiny_problem("mlp", num_examples=n, data_seed=seed, dtype=dtype)
    return problem.inputs, problem.targets


# --- micro-batch gradients ---------------------------------------------------------------


def _recording_loss(model, x, y, calls):
    crit = nn.CrossEntropyLoss()

    def loss_of_indices(idx):
        calls.append(idx.clone())
        return crit(model(x[idx]), y[idx])

    return loss_of_indices


def test_microbatch_rows_match_autograd_of_each_batch_loss():
    model, (x, y) = _mlp(), _data()
    params = list(model.parameters())
    calls = []
    out = microbatch_gradients(
        _recording_loss(model, x, y, calls),
        params,
        23,
        batch_size=4,
        num_samples=5,
        generator=torch.Generator().manual_seed(0),
    )
    assert out.shape == (5, sum(p.numel() for p in params)) and out.dtype == torch.float64
    assert len(calls) == 5
    crit = nn.CrossEntropyLoss()
    for row, idx in zip(out, calls, strict=True):
        expected = _flat(torch.autograd.grad(crit(model(x[idx]), y[idx]), params))
        torch.testing.assert_close(row, expected, rtol=0, atol=0)
    # L * M = 20 <= N = 23: batches are disjoint subsets of range(N), each without repeats.
    seen = torch.cat(calls)
    assert seen.unique().numel() == 20 and int(seen.min()) >= 0 and int(seen.max()) < 23


def test_microbatch_draws_independent_batches_when_they_cannot_be_disjoint():
    batches = draw_batches(10, 4, 6, torch.Generator().manual_seed(0))  # 24 > 10
    assert batches.shape == (6, 4) and batches.dtype == torch.int64
    assert all(b.unique().numel() == 4 for b in batches)
    assert int(batches.max()) < 10
    assert torch.cat(list(batches)).unique().numel() < 24  # overlaps are allowed
    disjoint = draw_batches(10, 3, 3, torch.Generator().manual_seed(0))
    assert disjoint.unique().numel() == 9


def test_microbatch_is_reproducible_with_a_generator():
    model, (x, y) = _mlp(), _data()

    def draw(seed):
        return microbatch_gradients(_recording_loss(model, x, y, []), model.parameters(), 23,
                                    batch_size=3, num_samples=4, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(7), draw(7), draw(8)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_microbatch_leaves_p_grad_alone_and_zero_fills_unused_params():
    model, (x, y) = _mlp(), _data()
    unused = nn.Parameter(torch.ones(4, dtype=torch.float64))
    params = [*model.parameters(), unused]
    sentinel = [torch.full_like(p, 7.0) for p in params[:2]]
    params[0].grad, params[1].grad = sentinel[0].clone(), sentinel[1].clone()
    out = microbatch_gradients(
        _recording_loss(model, x, y, []), params, 23, batch_size=5, num_samples=3
    )
    assert torch.equal(params[0].grad, sentinel[0]) and torch.equal(params[1].grad, sentinel[1])
    assert all(p.grad is None for p in params[2:])
    assert torch.all(out[:, -4:] == 0) and torch.any(out[:, :-4] != 0)


def test_microbatch_sketch_is_applied_to_each_gradient():
    model, (x, y) = _mlp(), _data()
    dim = sum(p.numel() for p in model.parameters())
    sketch = CountSketch(dim, 16, seed=0)
    kwargs = {"batch_size": 4, "num_samples": 3}
    dense = microbatch_gradients(
        _recording_loss(model, x, y, []),
        model.parameters(),
        23,
        generator=torch.Generator().manual_seed(1),
        **kwargs,
    )
    small = microbatch_gradients(
        _recording_loss(model, x, y, []),
        model.parameters(),
        23,
        generator=torch.Generator().manual_seed(1),
        sketch=sketch,
        **kwargs,
    )
    assert small.shape == (3, 16)
    torch.testing.assert_close(small, sketch(dense))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"batch_size": 24, "num_samples": 2}, ValueError, "exceeds num_examples=23"),
        ({"batch_size": 0, "num_samples": 2}, ValueError, "batch_size"),
        ({"batch_size": 2, "num_samples": 0}, ValueError, "num_samples"),
        ({"batch_size": 2.0, "num_samples": 2}, TypeError, "batch_size"),
    ],
)
def test_microbatch_bad_sizes(kwargs, error, match):
    model, (x, y) = _mlp(), _data()
    with pytest.raises(error, match=match):
        microbatch_gradients(_recording_loss(model, x, y, []), model.parameters(), 23, **kwargs)


def test_microbatch_bad_losses_and_params():
    model, (x, y) = _mlp(), _data()
    frozen = torch.ones(3)
    with pytest.raises(ValueError, match=r"params\[0\].*does not require grad"):
        microbatch_gradients(lambda idx: x[idx].sum(), [frozen], 23, batch_size=2, num_samples=2)
    with pytest.raises(TypeError, match="scalar"):
        microbatch_gradients(
            lambda idx: model(x[idx]), model.parameters(), 23, batch_size=2, num_samples=2
        )

    def nan_on_second(idx, calls=[]):  # noqa: B006 - counts calls
        calls.append(0)
        scale = float("nan") if len(calls) == 2 else 1.0
        return scale * nn.functional.cross_entropy(model(x[idx]), y[idx])

    with pytest.raises(ValueError, match=r"gradient samples \[1\] are not finite"):
        microbatch_gradients(nan_on_second, model.parameters(), 23, batch_size=2, num_samples=3)


def test_full_gradient_matches_autograd():
    model, (x, y) = _mlp(), _data()
    params = list(model.parameters())

    def loss_fn():
        return nn.functional.cross_entropy(model(x), y)

    torch.testing.assert_close(
        full_gradient(loss_fn, params), _flat(torch.autograd.grad(loss_fn(), params))
    )
    assert all(p.grad is None for p in params)


# --- per-example gradients ---------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_per_example_matches_a_python_loop(chunk_size):
    model, (x, y) = _mlp(), _data()
    crit = nn.CrossEntropyLoss()
    out = per_example_gradients(model, crit, x, y, chunk_size=chunk_size)
    expected = per_example_gradients_by_loop(model, crit, x, y)
    assert out.shape == expected.shape == (23, 5 * 7 + 7 + 7 * 3 + 3)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    # Their mean is the full-batch gradient of the mean loss.
    full = full_gradient(lambda: crit(model(x), y), model.parameters())
    torch.testing.assert_close(out.mean(0), full, rtol=1e-10, atol=1e-12)


def test_per_example_sketch_is_applied_chunk_by_chunk():
    model, (x, y) = _mlp(), _data()
    crit = nn.CrossEntropyLoss()
    dim = sum(p.numel() for p in model.parameters())
    sketch = CountSketch(dim, 16, seed=0)
    seen = []

    def recording(rows):
        seen.append(rows.shape[0])
        return sketch(rows)

    dense = per_example_gradients(model, crit, x, y, chunk_size=5)
    small = per_example_gradients(model, crit, x, y, chunk_size=5, sketch=recording)
    assert small.shape == (23, 16) and seen == [5, 5, 5, 5, 3]  # never all 23 rows at once
    torch.testing.assert_close(small, sketch(dense), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="sketch must map"):
        per_example_gradients(model, crit, x, y, sketch=lambda rows: rows.sum(0))


def test_per_example_params_subset_in_given_order_and_p_grad_untouched():
    model, (x, y) = _mlp(), _data()
    crit = nn.CrossEntropyLoss()
    chosen = [model[2].weight, model[0].bias]
    model[0].weight.grad = torch.full_like(model[0].weight, 3.0)
    out = per_example_gradients(model, crit, x, y, params=chosen, chunk_size=4)
    expected = per_example_gradients_by_loop(model, crit, x, y, params=chosen)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)
    assert torch.all(model[0].weight.grad == 3.0)
    assert all(p.grad is None for p in chosen)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        per_example_gradients(model, crit, x, y, params=[nn.Parameter(torch.ones(2))])


def test_per_example_custom_forward_and_tuple_inputs():
    model, (x, y) = _mlp(), _data(n=9)
    crit = nn.CrossEntropyLoss()

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, a, b):
            return self.net(a + 0.5 * b)

    two = TwoInputs()
    b = torch.linspace(-1, 1, 45, dtype=torch.float64).reshape(9, 5)
    out = per_example_gradients(two, crit, (x, b), y)
    torch.testing.assert_close(out, per_example_gradients_by_loop(model, crit, x + 0.5 * b, y))
    custom = per_example_gradients(model, crit, x, y, forward=lambda m, inp: m(2.0 * inp))
    torch.testing.assert_close(custom, per_example_gradients_by_loop(model, crit, 2.0 * x, y))


def _bn_model():
    return tiny_problem("batchnorm", seed=0).model


def test_per_example_refuses_train_mode_batchnorm_clearly():
    model, (x, y) = _bn_model(), _data()
    with pytest.raises(ValueError, match=r"BatchNorm in train mode.*'1'.*microbatch_gradients"):
        per_example_gradients(model, nn.CrossEntropyLoss(), x, y)


def test_per_example_eval_batchnorm_matches_loop_and_leaves_buffers_and_mode():
    model, (x, y) = _bn_model(), _data()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-1, 1, generator=gen)
        model[1].running_var.uniform_(0.5, 2, generator=gen)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crit = nn.CrossEntropyLoss()
    out = per_example_gradients(model, crit, x, y, chunk_size=8)
    torch.testing.assert_close(out, per_example_gradients_by_loop(model, crit, x, y))
    assert not model.training and not model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_per_example_bad_inputs():
    model, (x, y) = _mlp(), _data()
    crit = nn.CrossEntropyLoss()
    with pytest.raises(ValueError, match="batch dimension"):
        per_example_gradients(model, crit, x, y[:-1])
    with pytest.raises(TypeError, match="nn.Module"):
        per_example_gradients(lambda t: t, crit, x, y)
    with pytest.raises(ValueError, match="chunk_size"):
        per_example_gradients(model, crit, x, y, chunk_size=0)


# --- statistics against a closed form ----------------------------------------------------


def test_linear_gaussian_model_covariance_matches_closed_form():
    """Linear regression with MSE at a fixed w = w* + delta.

    With x ~ N(0, S), y = x^T w* + eps, eps ~ N(0, sigma^2) and loss (x^T w - y)^2, the
    per-example gradient is 2 x (x^T delta - eps), whose covariance is
    K = 4 [S delta delta^T S + (delta^T S delta + sigma^2) S].
    """
    gen = torch.Generator().manual_seed(1)
    n, s = 20000, torch.tensor([1.5, 1.0, 0.7, 0.4], dtype=torch.float64)
    delta = torch.tensor([0.5, -0.3, 0.2, 0.4], dtype=torch.float64)
    sigma = 0.5
    w_star = torch.randn(4, generator=gen, dtype=torch.float64)
    x = torch.randn(n, 4, generator=gen, dtype=torch.float64) * s
    y = (x @ w_star + sigma * torch.randn(n, generator=gen, dtype=torch.float64))[:, None]
    model = nn.Linear(4, 1, bias=False).double()
    with torch.no_grad():
        model.weight.copy_(w_star + delta)
    cov_x = torch.diag(s**2)
    true_k = 4 * (
        cov_x @ torch.outer(delta, delta) @ cov_x + (delta @ cov_x @ delta + sigma**2) * cov_x
    )
    true_evals, true_vecs = torch.linalg.eigh(true_k)
    true_evals, true_vecs = true_evals.flip(0), true_vecs.flip(1)
    crit = nn.MSELoss()

    def check(spec, rows, scale):
        # Perturbation theory: eigenvalue i moves by dK_ii + sum_j dK_ij^2 / (l_i - l_j) + ...
        # with dK_ij = mean of (v_i^T c)(v_j^T c) minus its expectation; use 4 standard
        # errors for the first-order term and (4 standard errors)^2 in the second.
        c = (rows - rows.mean(0)) * scale**0.5
        m = rows.shape[0]
        proj = c @ true_vecs
        var = (proj[:, :, None] * proj[:, None, :]).var(0) / m  # Var of dK_ij
        dist = (true_evals[:, None] - true_evals[None, :]).abs().fill_diagonal_(float("inf"))
        tol = 4 * var.diagonal().sqrt() + (16 * var / dist).sum(1)
        assert torch.all((spec.eigenvalues[:4] - true_evals).abs() <= tol), (spec.eigenvalues, tol)
        assert torch.all(tol < 0.35 * true_evals)  # sharp enough to see a wrong factor
        trace_se = float((c.norm(dim=1) ** 2).std()) / m**0.5
        assert abs(spec.trace - float(true_k.trace())) <= 4 * trace_se

    per_ex = per_example_gradients(model, crit, x, y, chunk_size=4096)
    check(covariance_spectrum(per_ex, k=4), per_ex, 1)

    m_batch = 10
    mini = microbatch_gradients(
        lambda idx: crit(model(x[idx]), y[idx]),
        model.parameters(),
        n,
        batch_size=m_batch,
        num_samples=1000,
        generator=torch.Generator().manual_seed(2),
    )
    check(covariance_spectrum(mini, k=4, scale=m_batch), mini, m_batch)
    # Without the factor M the estimate is far off: the units matter.
    assert covariance_spectrum(mini, k=1).lambda1 < 0.2 * float(true_evals[0])


@pytest.mark.parametrize("batch_size, num_samples", [(4, 5), (12, 40)])  # disjoint, independent
def test_batch_mean_covariance_scale_recovers_population_trace(batch_size, num_samples):
    from sgdbreak.estimators.samples import batch_mean_covariance_scale, draw_batches

    g = torch.Generator().manual_seed(0)
    n = 24
    per_example = torch.randn(n, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7)
    population_trace = per_example.var(dim=0, unbiased=False).sum().item()
    scale = batch_mean_covariance_scale(n, batch_size, num_samples)
    traces = []
    for _ in range(3000):
        idx = draw_batches(n, batch_size, num_samples, generator=g)
        means = per_example[idx].mean(dim=1)
        traces.append(means.var(dim=0, unbiased=True).sum().item() * scale)
    traces = torch.tensor(traces)
    assert abs(traces.mean().item() - population_trace) < 4 * traces.std().item() / len(traces) ** 0.5
    # The naive factor M is measurably biased in the independent case.
    if num_samples * batch_size > n:
        naive = traces.mean().item() / scale * batch_size
        assert abs(naive - population_trace) > 0.3 * population_trace
