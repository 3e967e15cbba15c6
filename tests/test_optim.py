"""BreakEvenSGD: bit-for-bit torch.optim.SGD, measurements, hooks and exact resumption."""

import copy
import io
import math

import pytest
import torch
from torch import nn

from sgdbreak import BreakEvenDetector, BreakEvenMonitor, BreakEvenSGD, Probe
from sgdbreak.measurement.triggers import Every


def make_model(seed=0, bn=True):
    torch.manual_seed(seed)
    layers = [nn.Conv2d(1, 4, 3, padding=1)]
    if bn:
        layers.append(nn.BatchNorm2d(4))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Dropout(0.1), nn.Linear(4 * 4 * 4, 3)]
    return nn.Sequential(*layers)


def make_data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


CONFIGS = {
    "plain": dict(lr=0.1),
    "momentum": dict(lr=0.05, momentum=0.9),
    "nesterov": dict(lr=0.05, momentum=0.9, nesterov=True),
    "weight_decay": dict(lr=0.1, weight_decay=5e-3),
    "dampening": dict(lr=0.05, momentum=0.5, dampening=0.3),
    "maximize": dict(lr=0.01, maximize=True),
    "foreach_off": dict(lr=0.1, momentum=0.9, foreach=False),
}


def param_groups(model, two_groups):
    if not two_groups:
        return model.parameters()
    params = list(model.parameters())
    return [{"params": params[:2], "lr": 0.02}, {"params": params[2:]}]


def train(opt_cls, config, *, steps=25, two_groups=False, closure=False, scheduler=None, probe_kwargs=None):
    model = make_model()
    x, y = make_data()
    kwargs = dict(config)
    if probe_kwargs is not None:
        kwargs.update(probe=Probe(model, nn.CrossEntropyLoss(), (x[:24], y[:24])), **probe_kwargs)
    opt = opt_cls(param_groups(model, two_groups), **kwargs)
    sched = scheduler(opt) if scheduler else None
    torch.manual_seed(123)  # dropout masks: measurement must not consume the global RNG
    for step in range(steps):
        idx = torch.arange(step % 3 * 16, step % 3 * 16 + 16)

        def loss_closure(idx=idx):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            return loss

        if closure:
            opt.step(loss_closure)
        else:
            loss_closure()
            opt.step()
        if sched:
            sched.step()
    return model, opt


def fires_at_first_measurement():
    """A detector whose stability rule fires on the first full measurement."""
    return BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9)


def full_batch_steps(model, opt, x, y, steps):
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def assert_same_model(a, b):
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb), na


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_bit_for_bit_without_probe(name):
    ref, _ = train(torch.optim.SGD, CONFIGS[name])
    ours, opt = train(BreakEvenSGD, CONFIGS[name])
    assert_same_model(ref, ours)
    assert isinstance(opt, torch.optim.SGD) and opt.latest is None and opt.history == []


@pytest.mark.parametrize("name", ["plain", "nesterov", "dampening", "weight_decay"])
def test_measuring_does_not_change_the_trajectory(name):
    ref, ref_opt = train(torch.optim.SGD, CONFIGS[name])
    ours, opt = train(BreakEvenSGD, CONFIGS[name], probe_kwargs=dict(measure_every=4, cheap_every=3))
    assert_same_model(ref, ours)
    assert len(opt.history) >= 6 and any("lambda1_H" in r for r in opt.history)
    torch.testing.assert_close(opt.state_dict()["state"], ref_opt.state_dict()["state"], rtol=0, atol=0)


@pytest.mark.parametrize("two_groups, closure", [(True, False), (False, True), (True, True)])
def test_groups_and_closures(two_groups, closure):
    ref, _ = train(torch.optim.SGD, CONFIGS["momentum"], two_groups=two_groups, closure=closure)
    ours, _ = train(BreakEvenSGD, CONFIGS["momentum"], two_groups=two_groups, closure=closure,
                    probe_kwargs=dict(measure_every=5))
    assert_same_model(ref, ours)


@pytest.mark.parametrize("scheduler", [
    lambda opt: torch.optim.lr_scheduler.StepLR(opt, 5, gamma=0.5),
    lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=30),
])
def test_torch_schedulers_compose(scheduler):
    ref, _ = train(torch.optim.SGD, CONFIGS["momentum"], scheduler=scheduler)
    ours, opt = train(BreakEvenSGD, CONFIGS["momentum"], scheduler=scheduler, probe_kwargs=dict(measure_every=5))
    assert_same_model(ref, ours)
    # The stability ratio uses the lr in force at the measurement.
    rec = [r for r in opt.history if "lambda1_H" in r][-1]
    # (OneCycleLR also cycles the momentum: the record holds the one in force.)
    assert rec["stability_ratio"] == pytest.approx(rec["lr"] * rec["lambda1_H"] / (2 + 2 * rec["momentum"]), rel=1e-9)


def test_add_param_group_and_zero_grad_behave_like_sgd():
    model = make_model()
    extra = nn.Parameter(torch.ones(3))
    opt = BreakEvenSGD(list(model.parameters()), lr=0.1)
    opt.add_param_group({"params": [extra], "lr": 0.5})
    extra.grad = torch.ones(3)
    opt.step()
    assert torch.equal(extra.detach(), torch.full((3,), 0.5))
    opt.zero_grad()
    assert extra.grad is None


def test_records_have_glossary_keys_and_stability_ratio():
    _, opt = train(BreakEvenSGD, CONFIGS["momentum"], probe_kwargs=dict(measure_every=5, cheap_every=2))
    full = [r for r in opt.history if "lambda1_H" in r]
    assert [r["step"] for r in full] == [5, 10, 15, 20, 25]
    for r in full:
        for key in ("lambda1_H", "lambda1_K", "trace_K", "stable_rank_K", "gns", "stability_ratio", "loss",
                    "update_sharpness", "noise_batch_size", "bn_gamma_norm"):
            assert key in r, key
        assert r["stability_ratio"] == pytest.approx(0.05 * r["lambda1_H"] / 3.8)
    cheap_only = [r for r in opt.history if "lambda1_H" not in r]
    assert cheap_only and all("update_sharpness" in r for r in cheap_only)
    assert opt.latest is opt.history[-1]
    assert opt.latest_full is full[-1]


def test_lambda1_matches_direct_estimate():
    model, opt = train(BreakEvenSGD, CONFIGS["plain"], steps=10,
                       probe_kwargs=dict(measure_every=10, cheap_every=None, hessian_tol=1e-6, max_hvps=200))
    direct = opt.monitor.probe.hessian_eigenvalues(tol=1e-8, max_hvps=300)
    assert opt.latest["lambda1_H"] == pytest.approx(direct.eigenvalues.item(), rel=1e-4)


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in history]


def test_save_load_continue_is_identical():
    probe_kwargs = dict(measure_every=3, cheap_every=2, measurements=("hessian", "noise", "alpha_star"))
    full_model, full_opt = train(BreakEvenSGD, CONFIGS["momentum"], steps=20, probe_kwargs=probe_kwargs)

    # Interrupted: 10 steps, checkpoint through bytes with weights_only=True, then resume.
    model = make_model()
    x, y = make_data()
    opt = BreakEvenSGD(model.parameters(), **CONFIGS["momentum"], probe=Probe(model, nn.CrossEntropyLoss(),
                       (x[:24], y[:24])), **probe_kwargs)
    torch.manual_seed(123)

    def run(model, opt, steps):
        for step in steps:
            idx = torch.arange(step % 3 * 16, step % 3 * 16 + 16)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()

    run(model, opt, range(10))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "rng": torch.get_rng_state()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model2 = make_model(seed=5)
    model2.load_state_dict(ckpt["model"])
    opt2 = BreakEvenSGD(model2.parameters(), **CONFIGS["momentum"], probe=Probe(model2, nn.CrossEntropyLoss(),
                        (x[:24], y[:24])), **probe_kwargs)
    opt2.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    run(model2, opt2, range(10, 20))
    assert_same_model(full_model, model2)
    assert strip_time(opt2.history) == strip_time(full_opt.history)
    assert opt2.break_even == full_opt.break_even


def test_hooks_fire_and_are_removable():
    model = make_model(bn=False)
    x, y = make_data()
    seen, fired = [], []
    detector = fires_at_first_measurement()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                       measure_every=2, cheap_every=None, measurements=("hessian",), detector=detector)
    handle = opt.register_measurement_hook(seen.append)
    opt.register_break_even_hook(fired.append)
    for _ in range(6):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if len(seen) == 2:
            handle.remove()
    assert len(seen) == 2 and len(opt.history) == 3
    assert len(fired) == 1 and fired[0].reached and fired[0].step == 2
    assert opt.break_even.rule == "stability"
    assert opt.monitor.events[0]["event"] == "break_even"


def test_default_cadence_thins_out_after_break_even():
    model = make_model(bn=False)
    x, y = make_data()
    detector = fires_at_first_measurement()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                       measurements=("hessian",), detector=detector)
    full_batch_steps(model, opt, x, y, 120)
    assert opt.break_even.step == 1
    full = [r["step"] for r in opt.history if "lambda1_H" in r]
    cheap_only = [r["step"] for r in opt.history if "lambda1_H" not in r]
    # Adaptive: next full measurement 10 · 4 steps later, then 160; cheap signal every 50.
    assert full == [1, 41] and cheap_only == [50, 100]
    state = opt.monitor.state_dict()["triggers"]
    assert state["cheap"] == {"settled": True} and state["measure"]["settled"]


def test_user_triggers_observe_records_with_or_without_break_even_flag():
    class Plain:
        def __init__(self):
            self.seen = []

        def __call__(self, step):
            return step % 2 == 0

        def observe(self, record):
            self.seen.append(record["step"])

    class Flagged(Plain):
        def observe(self, record, *, break_even_reached=False):
            self.seen.append((record["step"], break_even_reached))

    model = make_model(bn=False)
    x, y = make_data()
    detector = fires_at_first_measurement()
    plain, flagged = Plain(), Flagged()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                       measure_every=plain, cheap_every=flagged, measurements=("hessian",), detector=detector)
    full_batch_steps(model, opt, x, y, 4)
    assert plain.seen == [2, 4] and flagged.seen == [(2, True), (4, True)]


def test_non_finite_probe_loss_is_skipped_without_corruption():
    model = make_model(bn=False)
    x, y = make_data()
    probe_x = x[:24].clone()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (probe_x, y[:24])),
                       measure_every=1, cheap_every=None, measurements=("hessian",))
    for step in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if step == 2:
            opt.monitor.probe.inputs[0, 0, 0, 0] = float("nan")
            with pytest.warns(RuntimeWarning, match="skipped"):
                opt.step()
            opt.monitor.probe.inputs[0, 0, 0, 0] = 0.0
        else:
            opt.step()
    assert [r["step"] for r in opt.history] == [1, 2, 4]
    assert opt.monitor.events[-1]["event"] == "skipped" and opt.monitor.events[-1]["step"] == 3
    assert all(math.isfinite(v) for r in opt.history for v in r.values())
    assert torch.isfinite(opt.monitor.quantity("sharpness").warm_vectors).all()


def test_monitor_attaches_to_any_optimizer():
    model = make_model(bn=False)
    x, y = make_data()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    monitor = BreakEvenMonitor(Probe(model, nn.CrossEntropyLoss(), (x, y)), measure_every=Every(3), cheap_every=3)
    monitor.attach(opt)
    full_batch_steps(model, opt, x, y, 6)
    assert [r["step"] for r in monitor.history] == [3, 6] and "lambda1_H" in monitor.latest
    assert "update_sharpness" in monitor.latest
    monitor.detach()
    opt.step()
    assert monitor.step == 6


class TestBadInput:
    def test_probe_must_be_a_probe(self):
        model = make_model()
        with pytest.raises(TypeError, match="sgdbreak.Probe"):
            BreakEvenSGD(model.parameters(), lr=0.1, probe=(torch.zeros(1), torch.zeros(1)))

    @pytest.mark.parametrize("every", [0, -3])
    def test_measure_every_must_be_positive(self, every):
        model = make_model()
        probe = Probe(model, nn.CrossEntropyLoss(), make_data())
        with pytest.raises(ValueError, match="measure_every"):
            BreakEvenSGD(model.parameters(), lr=0.1, probe=probe, measure_every=every)

    def test_negative_lr(self):
        model = make_model()
        with pytest.raises(ValueError, match="learning rate"):
            BreakEvenSGD(model.parameters(), lr=-0.1)

    def test_monitor_kwargs_need_probe(self):
        with pytest.raises(TypeError, match="need a probe"):
            BreakEvenSGD(make_model().parameters(), lr=0.1, cheap_every=3)

    def test_unknown_measurement(self):
        model = make_model()
        with pytest.raises(ValueError, match="unknown measurements"):
            BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), make_data()),
                         measurements=("hessian", "magic"))

    def test_eq1_needs_sizes(self):
        model = make_model()
        with pytest.raises(ValueError, match="dataset_size"):
            BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), make_data()),
                         measurements=("hessian", "curvature_variance"))

    def test_loading_measurements_without_probe_fails_cleanly(self):
        model = make_model()
        src = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), make_data()))
        dst = BreakEvenSGD(model.parameters(), lr=0.2)
        before = copy.deepcopy(dst.state_dict())
        with pytest.raises(ValueError, match="no probe"):
            dst.load_state_dict(src.state_dict())
        assert dst.state_dict() == before
