"""Hessian estimators and the probe against dense float64 oracles on tiny networks."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sgdbreak import Probe, hessian_eigenvalues, hessian_trace
from sgdbreak.estimators.hessian import HessianOperator
from sgdbreak.testing import exact_hessian, model_hessian, random_orthogonal, tiny_problem
from sgdbreak.testing.strategies import spectra


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tanh_mlp():
    return tiny_problem("mlp", seed=0).model


def avgpool_cnn():
    return tiny_problem("cnn", features=6, hidden=3, seed=1).model


def bn_net():
    return tiny_problem("batchnorm", seed=2).model


def data_for(name, n=24):
    p = tiny_problem("cnn" if name == "cnn" else "mlp", features=6 if name == "cnn" else 5,
                     num_examples=n, data_seed=3)
    return p.inputs, p.targets


NETS = {"mlp": tanh_mlp, "cnn": avgpool_cnn, "bn": bn_net}


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("k", [1, 3])
def test_top_eigenvalues_match_dense_oracle(name, k):
    model = NETS[name]()
    x, y = data_for("cnn" if name == "cnn" else "vec")
    crit = nn.CrossEntropyLoss()
    model.train()
    H = model_hessian(model, crit, x, y)
    expected = torch.linalg.eigvalsh(H).flip(0)[:k]
    res = hessian_eigenvalues(lambda: crit(model(x), y), model.parameters(), k=k, tol=1e-10,
                              max_hvps=H.shape[0] + 5, generator=gen())
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", sorted(NETS))
def test_probe_matches_oracle_and_restores_state(name):
    model = NETS[name]()
    x, y = data_for("cnn" if name == "cnn" else "vec")
    crit = nn.CrossEntropyLoss()
    model.eval()  # the probe must switch BN to batch statistics and restore eval mode
    buffers = [b.clone() for b in model.buffers()]
    params = [p.clone() for p in model.parameters()]
    model.train()
    H = model_hessian(model, crit, x, y)
    model.eval()
    probe = Probe(model, crit, (x, y))
    res = probe.hessian_eigenvalues(k=2, tol=1e-10, max_hvps=200, generator=gen())
    torch.testing.assert_close(res.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6, atol=1e-9)
    assert not model.training and all(not m.training for m in model.modules())
    for a, b in zip(buffers, model.buffers()):
        assert torch.equal(a, b)
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b) and b.grad is None


def test_probe_eval_batchnorm_uses_running_statistics():
    model = bn_net()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    model.eval()
    H = model_hessian(model, crit, x, y)
    res = Probe(model, crit, (x, y), batchnorm="eval").hessian_eigenvalues(tol=1e-10, max_hvps=100, generator=gen())
    assert res.eigenvalues.item() == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)


def test_chunked_probe_is_the_mean_over_chunks():
    model = tanh_mlp()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    H = model_hessian(model, crit, x, y)
    top = torch.linalg.eigvalsh(H)[-1].item()
    for keep in (True, False):
        probe = Probe(model, crit, [(x[:10], y[:10]), (x[10:], y[10:])], chunk_size=7, keep_graph=keep)
        res = probe.hessian_eigenvalues(tol=1e-10, max_hvps=100, generator=gen())
        assert res.eigenvalues.item() == pytest.approx(top, rel=1e-6)


def test_trace_is_unbiased_against_exact_trace():
    model = tanh_mlp()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    exact = torch.trace(exact_hessian(lambda: crit(model(x), y), list(model.parameters()))).item()
    g = gen(4)
    values = torch.tensor([hessian_trace(lambda: crit(model(x), y), model.parameters(), num_samples=5,
                                         generator=g).value for _ in range(150)])
    stderr = values.std() / len(values) ** 0.5
    assert abs(values.mean().item() - exact) < 3 * stderr
    one = hessian_trace(lambda: crit(model(x), y), model.parameters(), num_samples=40, generator=g)
    assert one.num_hvps == 40 and abs(one.value - exact) < 5 * one.stderr


def test_finite_difference_hvp_matches_autograd_on_smooth_net():
    model = tanh_mlp()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    params = list(model.parameters())
    before = [p.clone() for p in params]
    exact = HessianOperator(lambda: crit(model(x), y), params)
    fd = HessianOperator(lambda: crit(model(x), y), params, method="finite_difference")
    v = torch.randn(exact.dim, dtype=torch.float64, generator=gen())
    expected = exact(v)  # before the finite differences bump the parameters' versions
    torch.testing.assert_close(fd(v), expected, rtol=1e-5, atol=1e-7)
    for a, b in zip(before, params):
        assert torch.equal(a, b)


def test_warm_start_after_sgd_step_is_cheaper():
    model = tanh_mlp()
    x, y = data_for("vec", n=64)
    crit = nn.CrossEntropyLoss()
    loss_fn = lambda: crit(model(x), y)  # noqa: E731
    first = hessian_eigenvalues(loss_fn, model.parameters(), tol=1e-8, max_hvps=100, generator=gen())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
    for p in model.parameters():
        p.grad = None
    cold = hessian_eigenvalues(loss_fn, model.parameters(), tol=1e-5, generator=gen(1))
    warm = hessian_eigenvalues(loss_fn, model.parameters(), tol=1e-5, warm_start=first, generator=gen(1))
    assert warm.eigenvalues.item() == pytest.approx(cold.eigenvalues.item(), rel=1e-4)
    assert warm.num_hvps <= 3 and cold.num_hvps >= 2 * warm.num_hvps


@given(st.floats(0.1, 20.0))
def test_scaling_loss_scales_eigenvalues(c):
    model = tanh_mlp()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    a = hessian_eigenvalues(lambda: crit(model(x), y), model.parameters(), k=2, tol=1e-10, max_hvps=100, generator=gen())
    b = hessian_eigenvalues(lambda: c * crit(model(x), y), model.parameters(), k=2, tol=1e-10, max_hvps=100,
                            generator=gen())
    torch.testing.assert_close(b.eigenvalues, c * a.eigenvalues, rtol=1e-6, atol=1e-9)


@given(st.permutations(list(range(24))))
def test_permuting_probe_examples_changes_nothing(perm):
    model = tanh_mlp()
    x, y = data_for("vec")
    crit = nn.CrossEntropyLoss()
    perm = torch.tensor(perm)
    a = Probe(model, crit, (x, y)).hessian_eigenvalues(tol=1e-10, max_hvps=100, generator=gen())
    b = Probe(model, crit, (x[perm], y[perm])).hessian_eigenvalues(tol=1e-10, max_hvps=100, generator=gen())
    assert b.eigenvalues.item() == pytest.approx(a.eigenvalues.item(), rel=1e-8)


@given(spectra(min_dim=2, max_dim=8, min_value=0.01, max_value=50.0))
def test_convex_quadratic_has_its_known_spectrum(spectrum):
    d = len(spectrum)
    g = gen(5)
    Q = random_orthogonal(d, generator=g)
    A = Q @ torch.diag(torch.tensor(spectrum, dtype=torch.float64)) @ Q.T
    w = torch.randn(d, dtype=torch.float64, generator=g, requires_grad=True)
    k = min(2, d)
    res = hessian_eigenvalues(lambda: 0.5 * w @ A @ w, [w], k=k, tol=1e-12, max_hvps=50, generator=gen())
    expected = torch.sort(torch.tensor(spectrum, dtype=torch.float64), descending=True).values[:k]
    assert (res.eigenvalues >= -1e-9).all()
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-7, atol=1e-9)


class TestBadInput:
    def setup_method(self):
        self.w = torch.randn(4, requires_grad=True)
        self.loss_fn = lambda: (self.w ** 2).sum()

    def test_empty_params(self):
        with pytest.raises(ValueError, match="params is empty"):
            hessian_eigenvalues(self.loss_fn, [])

    def test_params_without_grad(self):
        with pytest.raises(ValueError, match="does not require grad"):
            hessian_eigenvalues(self.loss_fn, [torch.randn(4)])

    def test_non_scalar_loss(self):
        with pytest.raises(ValueError, match="scalar"):
            hessian_eigenvalues(lambda: self.w ** 2, [self.w])

    @pytest.mark.parametrize("k", [0, -1, 5])
    def test_bad_k(self, k):
        with pytest.raises(ValueError, match="k"):
            hessian_eigenvalues(self.loss_fn, [self.w], k=k)

    def test_non_finite_loss_modifies_nothing(self):
        before = self.w.detach().clone()
        with pytest.raises(ValueError, match="not finite"):
            hessian_eigenvalues(lambda: (self.w ** 2).sum() * float("inf"), [self.w])
        with pytest.raises(ValueError, match="not finite"):
            hessian_trace(lambda: (self.w ** 2).sum() * float("nan"), [self.w])
        assert torch.equal(before, self.w) and self.w.grad is None

    def test_not_callable(self):
        with pytest.raises(TypeError, match="callable"):
            hessian_eigenvalues(3.0, [self.w])

    def test_probe_bad_data(self):
        with pytest.raises(TypeError, match="batch"):
            Probe(nn.Linear(2, 2), nn.MSELoss(), 5)
        with pytest.raises(ValueError, match="batchnorm"):
            Probe(nn.Linear(2, 2), nn.MSELoss(), (torch.randn(3, 2), torch.randn(3, 2)), batchnorm="frozen")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_matmat_equals_one_product_per_row_batched_or_not(name):
    model = NETS[name]()
    x, y = data_for("cnn" if name == "cnn" else "vec")
    crit = nn.CrossEntropyLoss()
    vectors = torch.randn(3, sum(p.numel() for p in model.parameters()), generator=gen(4))
    rows = {}
    for batched in (False, True):
        op = HessianOperator(lambda: crit(model(x), y), list(model.parameters()), batched=batched)
        rows[batched] = op.matmat(vectors)
        assert op.num_matvecs == 3
    single = HessianOperator(lambda: crit(model(x), y), list(model.parameters()))
    expected = torch.stack([single.matvec(v) for v in vectors])
    for got in rows.values():
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_matmat_falls_back_to_rows_when_batching_fails(monkeypatch):
    model = tanh_mlp()
    x, y = data_for("vec")
    op = HessianOperator(lambda: nn.CrossEntropyLoss()(model(x), y), list(model.parameters()), batched=True)
    real = torch.autograd.grad

    def no_batching(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batching)
    vectors = torch.randn(2, op.dim, generator=gen(5))
    out = op.matmat(vectors)
    assert not op.batched and op.num_matvecs == 2
    torch.testing.assert_close(out, torch.stack([op.matvec(v) for v in vectors]))
    with pytest.raises(ValueError, match="vectors must have shape"):
        op.matmat(torch.ones(op.dim))
