"""The edge-of-stability learning rate (suggest_lr) and BreakEvenWarmup."""

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR, StepLR

from sgdbreak import (
    BreakEvenAdam,
    BreakEvenMonitor,
    BreakEvenSGD,
    BreakEvenWarmup,
    Probe,
    suggest_lr,
)
from sgdbreak.testing import model_hessian


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


@pytest.mark.parametrize("kwargs, threshold", [({}, 2.0), ({"momentum": 0.9}, 3.8),
                                               ({"momentum": 0.9, "nesterov": True}, 3.8 / 2.8)])
def test_suggest_lr_is_threshold_over_the_exact_sharpness(kwargs, threshold):
    x, y = data()
    model = mlp()
    est = suggest_lr(model, nn.CrossEntropyLoss(), (x, y), tol=1e-8, max_hvps=200, **kwargs)
    lam = float(torch.linalg.eigvalsh(model_hessian(model, nn.CrossEntropyLoss(), x, y))[-1])
    assert est.sharpness == pytest.approx(lam, rel=1e-6)
    assert est.edge_lr == pytest.approx(threshold / lam, rel=1e-6)
    assert est.lr == pytest.approx(0.9 * est.edge_lr) and est.converged and est.sharpness_key == "lambda1_H"
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("factor, stable", [(0.95, True), (1.05, False)])
def test_the_suggested_edge_separates_stable_from_unstable_gradient_descent(factor, stable):
    """On a quadratic loss (linear least squares) full-batch GD is stable iff η < 2/λ1^H."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.randn(64, 1, generator=g)
    model = nn.Linear(5, 1)
    est = suggest_lr(model, nn.MSELoss(), (x, y), tol=1e-10, max_hvps=100)
    opt = torch.optim.SGD(model.parameters(), lr=factor * est.edge_lr)
    losses = []
    for _ in range(400):
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert (losses[-1] < losses[0]) is stable


def monitored(lr=1.0, momentum=0.0, seed=0, **monitor):
    x, y = data()
    model = mlp(seed)
    opt = BreakEvenSGD(model.parameters(), lr=lr, momentum=momentum,
                       probe=Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])),
                       **{"measure_every": 2, "cheap_every": 1, **monitor})
    return model, opt, x, y


def train(model, opt, sched, x, y, steps, start=0, calls=1):
    lrs = []
    for step in range(start, start + steps):
        i = step * 16 % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
        opt.step()
        for _ in range(calls):
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_warmup_starts_below_the_edge_and_never_runs_ahead_of_the_ramp():
    model, opt, x, y = monitored(lr=50.0)
    edge = suggest_lr(copy.deepcopy(model), nn.CrossEntropyLoss(), (x[:48], y[:48])).edge_lr
    sched = BreakEvenWarmup(opt, margin=0.8, rise_steps=5)
    start_lr = opt.param_groups[0]["lr"]
    assert start_lr == pytest.approx(min(0.1 * 50.0, 0.8 * edge), rel=1e-3)
    start = opt.monitor.events[0]
    assert start["event"] == "warmup_start" and start["target_lr"] == 50.0
    lrs = train(model, opt, sched, x, y, 20)
    assert max(lrs) <= 50.0
    handoff = next((e for e in opt.monitor.events if e["event"] == "warmup_handoff"), None)
    end = handoff["step"] if handoff else 20
    for t, lr in enumerate(lrs[:end], start=1):  # never ahead of the ramp: tenfold per 5 steps
        assert lr <= 0.1 * 50.0 * 10 ** (t / 5) * (1 + 1e-9)
    # After every certified full measurement the rate is at most margin times its edge.
    for record in [r for r in opt.history if r["step"] < end and "stability_ratio" in r]:
        next_lr = lrs[record["step"] - 1]  # set by sched.step() after that optimizer step
        assert next_lr <= 0.8 * record["lr"] / record["stability_ratio"] * (1 + 1e-9)
    assert max(lrs[:end]) > start_lr  # it does rise as the edge allows
    if handoff:  # the target is stable, or break-even passed: at most that rate from then on
        expected = 50.0 if handoff["reason"] == "target" else handoff["fraction"] * 50.0
        assert handoff["lr"] == pytest.approx(expected) and max(lrs[end - 1:]) <= handoff["lr"] * (1 + 1e-12)


def test_a_reachable_target_is_reached_by_the_ramp_then_the_after_schedule_runs_from_its_start():
    model, opt, x, y = monitored(lr=1e-3)
    after = CosineAnnealingLR(opt, T_max=10)
    sched = BreakEvenWarmup(opt, after=after, rise_steps=10)
    assert sched.phase == "warmup" and opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    lrs = train(model, opt, sched, x, y, 20)
    assert lrs[:9] == pytest.approx([1e-4 * 10 ** (t / 10) for t in range(1, 10)])
    handoff = [e for e in opt.monitor.events if e["event"] == "warmup_handoff"]
    assert handoff and handoff[0]["reason"] == "target" and handoff[0]["step"] in (10, 11)
    end = handoff[0]["step"]
    reference = CosineAnnealingLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), T_max=10)
    expected = [1e-3]
    for _ in range(20 - end):
        reference.optimizer.step()
        reference.step()
        expected.append(reference.get_last_lr()[0])
    assert lrs[end - 1:] == pytest.approx(expected)


def test_start_fraction_one_starts_at_the_target_when_it_is_below_the_edge():
    model, opt, x, y = monitored(lr=1e-3)
    sched = BreakEvenWarmup(opt, after=StepLR(opt, 100), start_fraction=1.0)
    assert sched.phase == "guarded" and opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    assert [e["event"] for e in opt.monitor.events][:2] == ["warmup_start", "warmup_handoff"]


def test_hand_over_when_the_edge_allows_the_target():
    """A target just above the initial edge: the rate climbs to it as the sharpness falls."""
    model, opt, x, y = monitored(lr=1.0)
    edge = suggest_lr(copy.deepcopy(model), nn.CrossEntropyLoss(), (x[:48], y[:48])).edge_lr
    for group in opt.param_groups:
        group["lr"] = 1.02 * edge
    sched = BreakEvenWarmup(opt, after=StepLR(opt, 100), margin=0.99, start_fraction=1.0, rise_steps=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.99 * edge, rel=1e-3)
    lrs = train(model, opt, sched, x, y, 60)
    handoff = [e for e in opt.monitor.events if e["event"] == "warmup_handoff"]
    assert handoff, "a target just above the edge is reached, or break-even passes"
    assert handoff[0]["lr"] <= 1.02 * edge * (1 + 1e-9) and lrs[-1] <= handoff[0]["lr"] * (1 + 1e-12)
    assert all(lr <= 1.02 * edge * (1 + 1e-9) for lr in lrs)


def fit_other_labels(loss_rise=2.0, steps=60):
    """Training the probe's inputs towards other labels: the probe loss rises below the edge."""
    x, y = data()
    model = mlp()
    probe = Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48]))
    opt = BreakEvenSGD(model.parameters(), lr=2.0, probe=probe, measure_every=2, cheap_every=None)
    sched = BreakEvenWarmup(opt, rise_steps=10, loss_rise=loss_rise)
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x[:48]), (y[:48] + 1) % 3).backward()
        opt.step()
        sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return opt, sched, lrs


def test_a_rising_probe_loss_backs_off_and_caps_the_rate():
    opt, sched, lrs = fit_other_labels()
    backoffs = [e for e in opt.monitor.events if e["event"] == "warmup_backoff"]
    assert backoffs and backoffs[0]["reason"] == "the probe loss keeps rising"
    step, ceiling = backoffs[0]["step"], backoffs[0]["fraction"] * 2.0
    assert max(lrs[step - 1:]) <= ceiling * (1 + 1e-9) < lrs[step - 2]
    assert sched.limit == pytest.approx(backoffs[0]["fraction"])


def test_without_the_loss_guard_a_rising_loss_is_not_acted_on():
    opt, _, _ = fit_other_labels(loss_rise=None)
    assert not any(e.get("reason") == "the probe loss keeps rising" for e in opt.monitor.events)


def test_repeated_step_calls_advance_once_per_optimizer_step():
    a = monitored(lr=20.0)
    b = monitored(lr=20.0)
    lrs_a = train(a[0], a[1], BreakEvenWarmup(a[1]), a[2], a[3], 12)
    lrs_b = train(b[0], b[1], BreakEvenWarmup(b[1]), b[2], b[3], 12, calls=3)
    assert lrs_a == lrs_b
    assert all(torch.equal(p, q) for p, q in zip(a[0].parameters(), b[0].parameters()))


def test_resume_is_exact_including_the_after_schedule():
    full_model, opt, x, y = monitored(lr=20.0)
    sched = BreakEvenWarmup(opt, after=CosineAnnealingLR(opt, T_max=50))
    full = train(full_model, opt, sched, x, y, 16)
    full_phase = sched.phase

    model, opt, x, y = monitored(lr=20.0)
    sched = BreakEvenWarmup(opt, after=CosineAnnealingLR(opt, T_max=50))
    first = train(model, opt, sched, x, y, 8)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model2, opt2, _, _ = monitored(lr=20.0, seed=5)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2 = BreakEvenWarmup(opt2, after=CosineAnnealingLR(opt2, T_max=50))
    sched2.load_state_dict(state["sched"])
    for group, lr in zip(opt2.param_groups, state["opt"]["param_groups"]):
        group["lr"] = lr["lr"]
    rest = train(model2, opt2, sched2, x, y, 8, start=8)
    assert first + rest == full
    assert all(torch.equal(p, q) for p, q in zip(full_model.parameters(), model2.parameters()))
    assert sched2.phase == full_phase


def test_non_finite_loss_backs_off():
    model, opt, x, y = monitored(lr=20.0, cheap_every=None)
    sched = BreakEvenWarmup(opt)
    train(model, opt, sched, x, y, 2)
    before = sched.fraction
    probe = opt.monitor.probe
    probe.inputs[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, sched, x, y, 2, start=2)
    backoffs = [e for e in opt.monitor.events if e["event"] == "warmup_backoff"]
    # Halved (after at most the two steps' rise), then rising again no faster than the ramp.
    assert backoffs and before * 0.5 <= backoffs[0]["fraction"] <= before * 0.5 * sched.growth ** 2
    assert sched.fraction <= backoffs[0]["fraction"] * sched.growth ** 2 * (1 + 1e-9)


def test_works_with_an_attached_monitor_and_any_torch_scheduler():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=10.0, momentum=0.9)
    monitor = BreakEvenMonitor(Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])), measure_every=3).attach(opt)
    sched = BreakEvenWarmup(opt, monitor=monitor, after=StepLR(opt, 5))
    lrs = train(model, opt, sched, x, y, 6)
    assert all(math.isfinite(lr) and lr < 10.0 for lr in lrs)


class TestBadInput:
    def test_no_monitor(self):
        model = mlp()
        with pytest.raises(ValueError, match="no BreakEvenMonitor"):
            BreakEvenWarmup(torch.optim.SGD(model.parameters(), lr=0.1))

    def test_target_must_be_positive(self):
        model, opt, _, _ = monitored(lr=0.0)
        with pytest.raises(ValueError, match="target learning rates must be > 0"):
            BreakEvenWarmup(opt)

    def test_after_on_another_optimizer(self):
        model, opt, _, _ = monitored()
        other = torch.optim.SGD(mlp().parameters(), lr=0.1)
        with pytest.raises(ValueError, match="another optimizer"):
            BreakEvenWarmup(opt, after=StepLR(other, 5))

    @pytest.mark.parametrize("kwargs", [dict(margin=0.0), dict(margin=1.5), dict(backoff=1.0),
                                        dict(start_fraction=0.0), dict(start_fraction=2.0),
                                        dict(rise_steps=0), dict(loss_rise=1.0), dict(loss_rise=math.nan)])
    def test_margin_and_backoff(self, kwargs):
        model, opt, _, _ = monitored()
        with pytest.raises(ValueError):
            BreakEvenWarmup(opt, **kwargs)

    def test_step_epoch(self):
        model, opt, _, _ = monitored()
        with pytest.raises(ValueError, match="step\\(epoch\\)"):
            BreakEvenWarmup(opt).step(3)


def test_break_even_hands_over_at_the_rate_reached_and_scales_after():
    """A target far above the edge is never forced on the run after break-even."""
    model, opt, x, y = monitored(lr=1e4)
    after = CosineAnnealingLR(opt, T_max=40)
    sched = BreakEvenWarmup(opt, after=after)
    lrs = train(model, opt, sched, x, y, 40)
    handoff = [e for e in opt.monitor.events if e["event"] == "warmup_handoff"]
    assert handoff and handoff[0]["reason"] == "break_even"
    reached = handoff[0]["lr"]
    assert reached < 1e4 and after.base_lrs == [pytest.approx(reached)]
    end = handoff[0]["step"]
    assert max(lrs[end:]) <= reached * (1 + 1e-9) and lrs[-1] < reached  # cosine decays from there


# --------------------------------------------------------------------------- Adam / AdamW


def adam_monitored(lr=0.5, betas=(0.9, 0.999), seed=0):
    x, y = data()
    model = mlp(seed)
    opt = BreakEvenAdam(model.parameters(), lr=lr, betas=betas,
                        probe=Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])), measure_every=2, cheap_every=1)
    return model, opt, x, y


def test_adams_edge_does_not_cap_the_rate_while_its_second_moment_warms_up():
    """λ1^PH from a v̂ of a few gradients is not a stability bound: the ramp and the guards rule."""
    model, opt, x, y = adam_monitored()
    sched = BreakEvenWarmup(opt, rise_steps=10)
    assert sched.edge_from == 1000  # 1/(1 − β2)
    start = opt.monitor.events[0]
    assert start["lr"] > 0.9 * start["edge_lr"]  # the edge at initialization would have capped it
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    lrs = train(model, opt, sched, x, y, 12)
    assert lrs[:9] == pytest.approx([0.05 * 10 ** (t / 10) for t in range(1, 10)])
    assert lrs[0] > 0.9 * start["edge_lr"]  # the first steps run above the edge at initialization
    assert not [e for e in opt.monitor.events if e["event"] == "warmup_backoff"]


def test_adams_edge_caps_the_rate_once_warmed_up():
    model, opt, x, y = adam_monitored()
    sched = BreakEvenWarmup(opt, rise_steps=10, preconditioner_steps=0)
    start = opt.monitor.events[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(min(0.05, 0.9 * start["edge_lr"]), rel=1e-9)
    lrs = train(model, opt, sched, x, y, 12)
    handoff = next((e["step"] for e in opt.monitor.events if e["event"] == "warmup_handoff"), 12)
    capped = [r for r in opt.history if "stability_ratio" in r and r.get("preconditioned_converged", 1) >= 0.5
              and r["step"] < handoff]
    assert capped
    for record in capped:  # after each certified measurement: at most margin times its edge
        assert lrs[record["step"] - 1] <= 0.9 * record["lr"] / record["stability_ratio"] * (1 + 1e-9)


def test_the_second_moment_warmup_follows_beta2_and_is_not_used_for_sgd():
    assert BreakEvenWarmup(adam_monitored(betas=(0.9, 0.99))[1]).edge_from == 100
    assert BreakEvenWarmup(adam_monitored()[1], preconditioner_steps=7).edge_from == 7
    assert BreakEvenWarmup(monitored()[1]).edge_from == 0
    with pytest.raises(ValueError):
        BreakEvenWarmup(adam_monitored()[1], preconditioner_steps=-1)


def test_adam_resume_is_exact_across_the_second_moment_warmup():
    kwargs = dict(preconditioner_steps=5, rise_steps=4)
    full_model, opt, x, y = adam_monitored()
    full = train(full_model, opt, BreakEvenWarmup(opt, **kwargs), x, y, 12)

    model, opt, x, y = adam_monitored()
    sched = BreakEvenWarmup(opt, **kwargs)
    first = train(model, opt, sched, x, y, 4)
    state = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()})
    model2, opt2, _, _ = adam_monitored(seed=5)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sched2 = BreakEvenWarmup(opt2)  # the defaults: the state restores the rule in force
    sched2.load_state_dict(state["sched"])
    assert sched2.edge_from == 5
    for group, saved in zip(opt2.param_groups, state["opt"]["param_groups"]):
        group["lr"] = saved["lr"]
    rest = train(model2, opt2, sched2, x, y, 8, start=4)
    assert first + rest == full
    assert all(torch.equal(p, q) for p, q in zip(full_model.parameters(), model2.parameters()))


def test_a_break_even_signalled_by_adams_cold_preconditioner_does_not_stop_the_ramp():
    """λ1^PH from v̂ of a few gradients puts the ratio over 1: no stability break-even, the ramp goes on."""
    model, opt, x, y = adam_monitored(lr=20.0)
    # At lr 20 the probe loss is chaotic (its guard fired at step 30 on one CPU and not on
    # another): off here, this test is about the stability rule alone.
    sched = BreakEvenWarmup(opt, rise_steps=40, loss_rise=None)
    lrs = train(model, opt, sched, x, y, 30)
    over = [r for r in opt.history if r.get("stability_ratio", 0.0) >= 1]
    assert over, "the cold preconditioner's ratio exceeds 1"
    assert all(r["preconditioner_warm"] == 0.0 for r in over)
    assert not any(f.rule == "stability" for f in opt.monitor.detector.firings), \
        "the detector reads no break-even off a cold preconditioner"
    assert lrs == pytest.approx([2.0 * 10 ** (t / 40) for t in range(1, 31)])
    assert sched.phase == "warmup" and not any(e["event"] == "warmup_handoff" for e in opt.monitor.events)
