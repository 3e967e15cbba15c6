"""Adam and AdamW: the preconditioned sharpness against dense oracles, Adam's edge of
stability by iterating torch's Adam, BreakEvenAdam/AdamW bit for bit, and optimizers
without a known threshold (no stability ratio, no SGD line)."""

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from sgdbreak import (
    BreakEvenAdam,
    BreakEvenAdamW,
    BreakEvenDetector,
    BreakEvenMonitor,
    BreakEvenSGD,
    CurvatureVariance,
    PreconditionedSharpness,
    Probe,
    Sharpness,
    UpdateSharpness,
)
from sgdbreak.measurement import update_rules
from sgdbreak.measurement.breakeven import adam_stability_threshold
from sgdbreak.measurement.triggers import Every
from sgdbreak.testing import adam_preconditioner, assert_eigenvalues_close, tiny_problem

# --------------------------------------------------------------------------- helpers


def problem_probe(seed=0, **kwargs):
    problem = tiny_problem("mlp", features=4, hidden=5, outputs=3, num_examples=24, seed=seed, **kwargs)
    return problem, Probe(problem.model, problem.criterion, (problem.inputs, problem.targets))


def adam_steps(problem, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        problem.loss().backward()
        opt.step()


def exact(k=3):
    """A solve tight enough to meet a dense oracle within 1e-6."""
    return PreconditionedSharpness(k, tol=1e-10, max_hvps=200)


def dense_oracle(problem, opt, *, group_lr=None):
    """P^{-1/2}(H + wd_coupled)P^{-1/2} from the exact Hessian and torch's state (per group)."""
    H = problem.hessian()
    scales, shifts = [], []
    for group in opt.param_groups:
        states = [opt.state[p] for p in group["params"]]
        v = [s["max_exp_avg_sq"] if group["amsgrad"] else s["exp_avg_sq"] for s in states]
        P = adam_preconditioner(v, states[0]["step"], betas=group["betas"], eps=group["eps"])
        lr_ratio = group["lr"] / (group_lr or opt.param_groups[0]["lr"])
        scales.append((lr_ratio / P).sqrt())
        wd = 0.0 if group["decoupled_weight_decay"] else group["weight_decay"]
        shifts.append(torch.full_like(P, wd))
    d, w = torch.cat(scales), torch.cat(shifts)
    A = d[:, None] * (H + torch.diag(w)) * d[None, :]
    return torch.linalg.eigvalsh(0.5 * (A + A.T)).flip(0)


def measure_now(monitor):
    return monitor.measure(full=True)


# --------------------------------------------------------------------------- dense oracle

ORACLE_CONFIGS = {
    "adam": (torch.optim.Adam, dict(lr=0.02)),
    "betas": (torch.optim.Adam, dict(lr=0.02, betas=(0.5, 0.9), eps=1e-3)),
    "amsgrad": (torch.optim.Adam, dict(lr=0.05, amsgrad=True)),
    "coupled_wd": (torch.optim.Adam, dict(lr=0.02, weight_decay=0.3)),
    "adamw": (torch.optim.AdamW, dict(lr=0.02, weight_decay=0.3)),
}


@pytest.mark.parametrize("name", sorted(ORACLE_CONFIGS))
def test_preconditioned_sharpness_matches_the_dense_oracle(name):
    cls, kwargs = ORACLE_CONFIGS[name]
    problem, probe = problem_probe(seed=3)
    opt = cls(problem.params, **kwargs)
    adam_steps(problem, opt, 4)
    monitor = BreakEvenMonitor(probe, quantities=[exact()], optimizer=opt)
    record = measure_now(monitor)
    want = dense_oracle(problem, opt)[:3]
    assert record["preconditioned_converged"] == 1.0
    assert_eigenvalues_close([record[f"eig_PH_{i}"] for i in (1, 2, 3)], want, rtol=1e-6, atol=1e-9,
                             name="eig_PH")
    assert record["lambda1_PH"] == record["eig_PH_1"]
    beta1, wd = opt.param_groups[0]["betas"][0], opt.param_groups[0]["weight_decay"]
    lr = kwargs["lr"]
    threshold = (2 + 2 * beta1) / (1 - beta1)
    if cls is torch.optim.AdamW:
        threshold = (2 - lr * wd) * (1 + beta1) / (1 - beta1)
    assert record["stability_ratio"] == pytest.approx(lr * record["lambda1_PH"] / threshold, rel=1e-12)
    assert record["edge_sharpness_PH"] == pytest.approx(threshold / lr, rel=1e-12)
    assert "edge_sharpness" not in record


def test_before_the_first_step_p_is_what_the_first_step_uses():
    problem, probe = problem_probe(seed=1)
    betas, eps, wd = (0.8, 0.99), 1e-6, 0.1
    opt = torch.optim.Adam(problem.params, lr=0.01, betas=betas, eps=eps, weight_decay=wd)
    got = measure_now(BreakEvenMonitor(probe, quantities=[exact()], optimizer=opt))
    assert len(opt.state) == 0
    theta = torch.cat([p.detach().reshape(-1) for p in problem.params])
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(problem.loss(), problem.params)])
    seen = grad + wd * theta  # the gradient Adam's coupled decay sees
    P = adam_preconditioner((1 - betas[1]) * seen**2, 1, betas=betas, eps=eps)  # v_1 = (1 − β2)·g²
    A = P.rsqrt()[:, None] * (problem.hessian() + wd * torch.eye(len(P))) * P.rsqrt()[None, :]
    want = torch.linalg.eigvalsh(A).flip(0)[:3]
    assert_eigenvalues_close([got[f"eig_PH_{i}"] for i in (1, 2, 3)], want, rtol=1e-6, atol=1e-9)
    # ... which is the state torch's first step creates.
    problem.loss().backward()
    opt.step()
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in problem.params])
    torch.testing.assert_close(v, (1 - betas[1]) * seen**2, rtol=1e-12, atol=0)


def test_groups_with_other_learning_rates_count_at_their_own_step_size():
    problem, probe = problem_probe(seed=2)
    params = problem.params
    opt = torch.optim.Adam([{"params": params[:2]}, {"params": params[2:], "lr": 0.002}], lr=0.02)
    adam_steps(problem, opt, 3)
    record = measure_now(BreakEvenMonitor(probe, quantities=[exact()], optimizer=opt))
    assert_eigenvalues_close([record[f"eig_PH_{i}"] for i in (1, 2, 3)], dense_oracle(problem, opt)[:3],
                             rtol=1e-6, atol=1e-9)


def test_parameters_the_optimizer_does_not_update_are_left_out():
    problem, probe = problem_probe(seed=2)
    params = problem.params
    opt = torch.optim.Adam(params[:2], lr=0.02)
    adam_steps(problem, opt, 3)
    with pytest.warns(RuntimeWarning, match="updates 2 of the probe's 4"):
        monitor = BreakEvenMonitor(probe, quantities=[exact()], optimizer=opt)
    record = measure_now(monitor)
    H = problem.hessian()
    n = sum(p.numel() for p in params[:2])
    states = [opt.state[p] for p in params[:2]]
    P = adam_preconditioner([s["exp_avg_sq"] for s in states], 3, betas=(0.9, 0.999), eps=1e-8)
    A = P.rsqrt()[:, None] * H[:n, :n] * P.rsqrt()[None, :]
    assert record["lambda1_PH"] == pytest.approx(torch.linalg.eigvalsh(A)[-1].item(), rel=1e-6)


@given(seed=st.integers(0, 10_000), beta1=st.floats(0.0, 0.95), eps=st.sampled_from([1e-8, 1e-4, 1e-1]),
       steps=st.integers(1, 5), amsgrad=st.booleans())
def test_property_lambda1_ph_is_the_top_eigenvalue_of_p_inverse_h(seed, beta1, eps, steps, amsgrad):
    problem, probe = problem_probe(seed=seed)
    opt = torch.optim.Adam(problem.params, lr=0.01, betas=(beta1, 0.99), eps=eps, amsgrad=amsgrad)
    adam_steps(problem, opt, steps)
    record = measure_now(BreakEvenMonitor(probe, quantities=[exact(1)], optimizer=opt))
    want = dense_oracle(problem, opt)[0].item()
    assert record["lambda1_PH"] == pytest.approx(want, rel=1e-6, abs=1e-9)


# --------------------------------------------------------------------------- the threshold


@given(beta1=st.floats(0.0, 0.99), decay=st.floats(0.0, 0.5), side=st.sampled_from([0.999, 1.001]))
def test_property_threshold_is_where_the_linear_recurrence_turns_unstable(beta1, decay, side):
    """Adam with a frozen P along an eigenvector of P^{-1/2}HP^{-1/2} (eigenvalue λ, a = ηλ):
    y ← c·y − a·u, u ← β1·u + (1 − β1)·y, c = 1 − η·wd (AdamW's decoupled decay)."""
    c = 1.0 - decay
    a = side * adam_stability_threshold(beta1, lr=1.0, decoupled_weight_decay=decay)
    step = np.array([[c - (1 - beta1) * a, -beta1], [(1 - beta1) * a, beta1]])
    radius = np.abs(np.linalg.eigvals(step)).max()
    assert (radius > 1) == (side > 1)


class Quadratic(nn.Module):
    """Loss (2/3)·Σ h_i θ_i²/2 with MSELoss on 3 outputs: Hessian diag(2h/3), for any inputs."""

    def __init__(self, h):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros(len(h), dtype=torch.float64))
        self.register_buffer("root", torch.as_tensor(h, dtype=torch.float64).sqrt())

    def forward(self, inputs):
        return (self.root * self.theta).expand(inputs.shape[0], -1)


def quadratic_run(margin, *, beta1=0.9, decoupled_wd=0.0, steps=1500):
    """torch's Adam/AdamW on a quadratic where ε ≫ √v̂, so P = (1 − β1^t)·ε is frozen.

    A warm-up of zero-gradient steps (θ = 0) takes β1^t to 0 without moving anything;
    then λ1_PH is measured, lr is set so that η·λ1_PH = margin·threshold, θ is moved to
    1e-10 (its gradients, ~1e-10, leave P = ε to 1e-10) and training continues. Returns
    the measured record and max|θ|/1e-10 over the run.
    """
    model = Quadratic([1.0, 0.3, 0.05])
    data = (torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4, 3, dtype=torch.float64))
    probe = Probe(model, nn.MSELoss(), data)
    cls = BreakEvenAdamW if decoupled_wd else BreakEvenAdam
    opt = cls(model.parameters(), lr=1.0, betas=(beta1, 0.999), eps=1.0, weight_decay=decoupled_wd,
              probe=probe, measure_every=None, cheap_every=None, quantities=[exact(1)])

    def step():
        opt.zero_grad()
        nn.functional.mse_loss(*[model(data[0]), data[1]]).backward()
        opt.step()

    for _ in range(3000):
        step()
    lam = opt.monitor.measure()["lambda1_PH"]
    assert lam == pytest.approx((2 / 3) / (1 - beta1**3000), rel=1e-9)  # h_max/P, P = (1 − β1^t)ε
    c_free = adam_stability_threshold(beta1)
    # Solve η·λ = margin·(1 + c)(1 + β1)/(1 − β1) with c = 1 − η·wd for η.
    opt.param_groups[0]["lr"] = margin * c_free / (lam + margin * c_free * decoupled_wd / 2)
    record = opt.monitor.measure()
    with torch.no_grad():
        model.theta.fill_(1e-10)
    growth = 1.0
    for _ in range(steps):
        step()
        growth = max(growth, model.theta.detach().abs().max().item() / 1e-10)
    return record, growth


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9, 0.99])
def test_torch_adam_is_stable_just_below_the_edge_and_diverges_just_above(beta1):
    below, grew_below = quadratic_run(0.97, beta1=beta1)
    above, grew_above = quadratic_run(1.03, beta1=beta1)
    assert below["stability_ratio"] == pytest.approx(0.97, rel=1e-9)
    assert above["stability_ratio"] == pytest.approx(1.03, rel=1e-9)
    assert grew_below < 10 and grew_above > 1e4


def test_adamw_decoupled_decay_lowers_the_edge():
    wd = 0.004  # η·wd ≈ 0.15 at the edge: threshold 1.85/2 of Adam's
    below, grew_below = quadratic_run(0.97, decoupled_wd=wd)
    above, grew_above = quadratic_run(1.03, decoupled_wd=wd)
    assert above["stability_ratio"] == pytest.approx(1.03, rel=1e-9)
    lr = above["lr"]
    assert above["edge_sharpness_PH"] == pytest.approx((2 - lr * wd) * 19 / lr, rel=1e-12)
    assert lr * wd > 0.1 and grew_below < 10 and grew_above > 1e4
    assert lr * above["lambda1_PH"] / adam_stability_threshold(0.9) < 0.97  # Adam's edge would miss it


# --------------------------------------------------------------------------- which threshold


def cnn_problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 4 * 4, 3))
    g = torch.Generator().manual_seed(seed + 1)
    return model, (torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 3, (48,), generator=g))


def train(model, data, opt, steps):
    x, y = data
    torch.manual_seed(123)  # dropout masks: measurement must not consume the global RNG
    for step in range(steps):
        idx = torch.arange(step % 3 * 16, step % 3 * 16 + 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()


def always_fires():
    return BreakEvenDetector(rules=("stability", "eq1"), stability_threshold=1e-12, eq1_threshold=1e-12)


@pytest.mark.parametrize("cls, kwargs", [(torch.optim.RMSprop, dict(lr=1e-3, momentum=0.9)),
                                         (torch.optim.Adagrad, dict(lr=1e-2))])
def test_other_optimizers_are_measured_without_any_stability_rule(cls, kwargs):
    model, data = cnn_problem()
    probe = Probe(model, nn.CrossEntropyLoss(), (data[0][:24], data[1][:24]))
    quantities = [UpdateSharpness(16), Sharpness(),
                  CurvatureVariance(dataset_size=48, batch_size=16, groups=4)]
    monitor = BreakEvenMonitor(probe, quantities=quantities, measure_every=Every(2), cheap_every=1,
                               detector=always_fires())
    opt = cls(model.parameters(), **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        monitor.attach(opt)
        monitor.detach()
        monitor.attach(opt)  # a second bind does not warn again
    messages = [str(w.message) for w in caught if "edge of stability" in str(w.message)]
    assert len(messages) == 1 and cls.__name__ in messages[0] and "without stability_ratio" in messages[0]
    train(model, data, opt, 6)
    full = [r for r in monitor.history if "lambda1_H" in r]
    assert len(full) == 3 and "curvature_variance" in full[-1] and "update_sharpness" in monitor.latest
    forbidden = {"stability_ratio", "stability_ratio_update", "eq1_lhs", "edge_sharpness", "edge_sharpness_PH",
                 "momentum"}
    assert all(not forbidden & set(r) for r in monitor.history)
    assert not monitor.break_even.reached
    with pytest.raises(ValueError, match="PreconditionedSharpness.*RMSprop|PreconditionedSharpness.*Adagrad"):
        BreakEvenMonitor(probe, quantities=[PreconditionedSharpness()]).attach(opt)


def test_a_monitor_on_torch_adam_uses_adams_threshold_not_sgds():
    model, data = cnn_problem()
    probe = Probe(model, nn.CrossEntropyLoss(), (data[0][:24], data[1][:24]))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = BreakEvenMonitor(probe, measure_every=Every(3), cheap_every=3).attach(opt)
    assert [q.name for q in monitor.quantities] == ["update_sharpness", "sharpness", "preconditioned_sharpness",
                                                    "gradient_noise", "bn_gamma_norm"]
    train(model, data, opt, 6)
    record = monitor.latest
    assert record["stability_ratio"] == pytest.approx(1e-3 * record["lambda1_PH"] / 38, rel=1e-12)
    assert record["edge_sharpness_PH"] == pytest.approx(38 / 1e-3)
    assert "edge_sharpness" not in record and "stability_ratio_update" not in record
    assert "lambda1_H_update" in record and "momentum" not in record
    # λ1^H alone gives no ratio under Adam.
    only_h = BreakEvenMonitor(probe, quantities=[Sharpness()], optimizer=opt)
    assert "stability_ratio" not in only_h.measure() and only_h.latest_full is not None


def test_sgd_records_are_unchanged():
    model, data = cnn_problem()
    probe = Probe(model, nn.CrossEntropyLoss(), (data[0][:24], data[1][:24]))
    opt = BreakEvenSGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, probe=probe,
                       measure_every=3, cheap_every=3)
    train(model, data, opt, 3)
    record = opt.latest
    assert record["stability_ratio"] == pytest.approx(0.05 * (record["lambda1_H"] + 1e-3) / 3.8)
    assert record["edge_sharpness"] == pytest.approx(3.8 / 0.05 - 1e-3)
    assert "stability_ratio_update" in record and "lambda1_PH" not in record
    assert [q.name for q in opt.monitor.quantities] == ["update_sharpness", "sharpness", "gradient_noise",
                                                        "bn_gamma_norm"]


def test_the_detector_uses_adams_ratio_only_when_lanczos_converged():
    det = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",))
    det.update({"step": 1, "stability_ratio": 2.0, "preconditioned_converged": 0.0})
    assert not det.result.reached
    det.update({"step": 2, "stability_ratio": 2.0, "preconditioned_converged": 1.0})
    assert det.result.reached and det.result.step == 2


def test_the_detector_skips_adams_ratio_while_v_hat_warms_up():
    det = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",))
    for step in (1, 2):
        det.update({"step": step, "stability_ratio": 59.0, "preconditioned_converged": 1.0,
                    "preconditioner_warm": 0.0})
    assert not det.result.reached
    det.update({"step": 3, "stability_ratio": 2.0, "preconditioned_converged": 1.0, "preconditioner_warm": 1.0})
    assert det.result.reached and det.result.step == 3


@pytest.mark.parametrize("beta2, warm_from", [(0.9, 10), (0.99, 100), (0.999, 1000), (1.0, 0)])
def test_preconditioner_warmup_steps_follow_beta2(beta2, warm_from):
    assert update_rules.preconditioner_warmup_steps(beta2) == warm_from


def test_records_flag_the_preconditioner_warm_after_one_over_one_minus_beta2_steps():
    """No break-even from v̂ of a few gradients; Adam's ratio counts from step ⌈1/(1 − β2)⌉ on."""
    model, data = cnn_problem()
    probe = Probe(model, nn.CrossEntropyLoss(), (data[0][:24], data[1][:24]))
    opt = BreakEvenAdam(model.parameters(), lr=0.05, betas=(0.9, 0.8), probe=probe, measure_every=1,
                        cheap_every=None)  # warm from step 5
    train(model, data, opt, 8)
    flags = {r["step"]: r["preconditioner_warm"] for r in opt.history if "lambda1_PH" in r}
    assert flags == {s: float(s >= 5) for s in range(1, 9)}
    cold_over = [r["step"] for r in opt.history if r.get("preconditioner_warm") == 0.0 and r["stability_ratio"] >= 1]
    firings = [f for f in opt.monitor.detector.firings if f.rule == "stability"]
    assert cold_over, "lr 0.05 puts the cold preconditioner's ratio over 1"
    assert all(f.step >= 5 for f in firings)


# --------------------------------------------------------------------------- the optimizers

CONFIGS = {
    "adam": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2)),
    "amsgrad": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2, amsgrad=True)),
    "weight_decay": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2, weight_decay=1e-2)),
    "foreach_off": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2, betas=(0.8, 0.99), foreach=False)),
    "foreach_on": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2, foreach=True)),
    "decoupled": (torch.optim.Adam, BreakEvenAdam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    "adamw": (torch.optim.AdamW, BreakEvenAdamW, dict(lr=1e-2)),
    "adamw_amsgrad": (torch.optim.AdamW, BreakEvenAdamW, dict(lr=1e-2, amsgrad=True, foreach=False)),
}


def same_model(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bit_for_bit_with_and_without_measuring(name):
    torch_cls, ours_cls, kwargs = CONFIGS[name]
    ref, data = cnn_problem()
    ref_opt = torch_cls(ref.parameters(), **kwargs)
    train(ref, data, ref_opt, 12)
    plain, _ = cnn_problem()
    plain_opt = ours_cls(plain.parameters(), **kwargs)
    train(plain, data, plain_opt, 12)
    assert same_model(ref, plain) and plain_opt.history == [] and isinstance(plain_opt, torch_cls)
    ours, _ = cnn_problem()
    probe = Probe(ours, nn.CrossEntropyLoss(), (data[0][:24], data[1][:24]))
    opt = ours_cls(ours.parameters(), **kwargs, probe=probe, measure_every=4, cheap_every=3)
    train(ours, data, opt, 12)
    assert same_model(ref, ours)
    torch.testing.assert_close(opt.state_dict()["state"], ref_opt.state_dict()["state"], rtol=0, atol=0)
    full = [r for r in opt.history if "lambda1_PH" in r]
    assert [r["step"] for r in full] == [4, 8, 12] and all("stability_ratio" in r for r in full)


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in history]


def test_save_load_continue_is_identical():
    kwargs = dict(lr=1e-2, weight_decay=1e-2, measure_every=3, cheap_every=2)
    model, data = cnn_problem()
    probe_data = (data[0][:24], data[1][:24])
    whole = BreakEvenAdamW(model.parameters(), probe=Probe(model, nn.CrossEntropyLoss(), probe_data), **kwargs)
    train(model, data, whole, 6)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": whole.state_dict()}, buf)
    pre = whole.monitor.quantity("preconditioned_sharpness").warm_vectors.clone()
    rng = torch.get_rng_state()
    for _ in range(6):  # continue the original
        idx = torch.arange(16)
        whole.zero_grad()
        nn.functional.cross_entropy(model(data[0][idx]), data[1][idx]).backward()
        whole.step()
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model2, _ = cnn_problem(seed=7)
    model2.load_state_dict(ckpt["model"])
    resumed = BreakEvenAdamW(model2.parameters(), probe=Probe(model2, nn.CrossEntropyLoss(), probe_data), **kwargs)
    resumed.load_state_dict(ckpt["opt"])
    assert torch.equal(resumed.monitor.quantity("preconditioned_sharpness").warm_vectors, pre)
    torch.set_rng_state(rng)
    for _ in range(6):
        idx = torch.arange(16)
        resumed.zero_grad()
        nn.functional.cross_entropy(model2(data[0][idx]), data[1][idx]).backward()
        resumed.step()
    assert same_model(model, model2)
    assert strip_time(resumed.history) == strip_time(whole.history)


def test_copies_keep_the_monitor():
    model, data = cnn_problem()
    opt = BreakEvenAdam(model.parameters(), lr=1e-2, probe=Probe(model, nn.CrossEntropyLoss(), data),
                        measure_every=2, cheap_every=None)
    train(model, data, opt, 2)
    clone = pickle.loads(pickle.dumps(opt))
    assert strip_time(clone.history) == strip_time(opt.history)
    assert isinstance(copy.deepcopy(opt).monitor, BreakEvenMonitor)


# --------------------------------------------------------------------------- bad input


class TestBadInput:
    @pytest.mark.parametrize("kwargs, match", [
        (dict(k=0), "PreconditionedSharpness: k must be >= 1"),
        (dict(tol=0.0), "PreconditionedSharpness: tol must be > 0"),
        (dict(max_hvps=0), "PreconditionedSharpness: max_hvps"),
        (dict(cold_restart_every=0), "PreconditionedSharpness: cold_restart_every"),
    ])
    def test_settings(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            PreconditionedSharpness(**kwargs)

    def test_with_sgd_the_quantity_is_refused_when_bound(self):
        problem, probe = problem_probe()
        with pytest.raises(ValueError, match="PreconditionedSharpness.*SGD"):
            BreakEvenSGD(problem.params, lr=0.1, probe=probe, quantities=[PreconditionedSharpness()])

    def test_without_an_optimizer(self):
        _, probe = problem_probe()
        with pytest.raises(ValueError, match="PreconditionedSharpness.*no optimizer"):
            BreakEvenMonitor(probe, quantities=[PreconditionedSharpness()]).measure()

    def test_maximize_is_refused(self):
        problem, probe = problem_probe()
        with pytest.raises(ValueError, match="maximize=True"):
            BreakEvenAdam(problem.params, lr=0.1, maximize=True, probe=probe)
        assert BreakEvenAdamW(problem.params, lr=0.1, maximize=True).defaults["maximize"]  # no probe: torch's

    def test_groups_with_different_beta1(self):
        problem, probe = problem_probe()
        params = problem.params
        with pytest.raises(ValueError, match="different β1"):
            BreakEvenAdam([{"params": params[:2]}, {"params": params[2:], "betas": (0.5, 0.999)}],
                          probe=probe, quantities=[PreconditionedSharpness()])

    def test_a_checkpoint_of_another_model(self):
        problem, probe = problem_probe()
        opt = BreakEvenAdam(problem.params, lr=0.01, probe=probe, measure_every=1, cheap_every=None)
        adam_steps(problem, opt, 1)
        state = opt.state_dict()
        other, other_probe = problem_probe()
        wide = tiny_problem("mlp", features=4, hidden=7, outputs=3, num_examples=24)
        wide_opt = BreakEvenAdam(wide.params, lr=0.01, probe=Probe(wide.model, wide.criterion,
                                                                   (wide.inputs, wide.targets)))
        with pytest.raises(ValueError, match="warm-start vectors have shape"):
            wide_opt.load_state_dict(state)
        assert wide_opt.monitor.step == 0 and len(wide_opt.state) == 0  # all or nothing

    def test_zero_preconditioner_is_skipped_not_raised(self):
        problem, probe = problem_probe()
        opt = torch.optim.Adam(problem.params, lr=0.01, eps=0.0)
        monitor = BreakEvenMonitor(probe, quantities=[PreconditionedSharpness()], optimizer=opt)
        for p in problem.params:  # a state with v = 0 somewhere
            opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                            "exp_avg_sq": torch.zeros_like(p)}
        with pytest.warns(RuntimeWarning, match="preconditioner has zero"):
            assert monitor.measure() is None
