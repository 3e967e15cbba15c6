"""Reliability: no false break-even, no lost event, no silent wrong-scale measurement.

Each test reproduces a failure found by trying the library as a user would (issue 9).
"""

import copy
import json
import math
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sgdbreak
from sgdbreak import BreakEvenDetector, BreakEvenMonitor, BreakEvenSGD, Probe
from sgdbreak.integrations.rundir import RunLog, read_run


def mlp(seed=0, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, width), nn.Tanh(), nn.Linear(width, 3))


def data(n=96, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def train(model, opt, x, y, steps, batch=16):
    for step in range(steps):
        i = step * batch % len(x)
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + batch]), y[i:i + batch]).backward()
        opt.step()


def fires_at_first_full_measurement():
    return BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",),
                             stability_threshold=1e-9)


# --------------------------------------------------------------------------- 1. loss scale


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_non_mean_reduction_is_refused_at_construction(reduction):
    x, y = data()
    with pytest.raises(ValueError, match="reduction='mean'"):
        Probe(mlp(), nn.CrossEntropyLoss(reduction=reduction), (x, y))


def test_a_summing_callable_is_refused_by_the_repeated_batch_check():
    x, y = data()
    with pytest.raises(ValueError, match="sum over examples"):
        Probe(mlp(), lambda out, t: F.cross_entropy(out, t, reduction="sum"), (x, y))
    with pytest.raises(ValueError, match="scalar"):
        Probe(mlp(), lambda out, t: F.cross_entropy(out, t, reduction="none"), (x, y))


def test_mean_losses_pass_the_check_including_weighted_and_smoothed():
    x, y = data()
    for criterion in (nn.CrossEntropyLoss(), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 0.5])),
                      nn.CrossEntropyLoss(label_smoothing=0.1),
                      lambda out, t: F.cross_entropy(out, t)):
        Probe(mlp(), criterion, (x, y))


def test_a_sum_loss_never_reports_break_even():
    """The reported case: sum reduction scaled λ1^H by the chunk size and fired at step 5."""
    x, y = data()
    model = mlp()
    with pytest.raises(ValueError):
        BreakEvenSGD(model.parameters(), lr=0.05,
                     probe=Probe(model, nn.CrossEntropyLoss(reduction="sum"), (x[:64], y[:64])))


# --------------------------------------------------------------------------- 2. tiny lr


@pytest.mark.parametrize("measure_every", [None, "default"])
def test_tiny_learning_rate_gives_no_false_break_even(measure_every):
    x, y = data(256)
    model = mlp(width=32)
    probe = Probe(model, nn.CrossEntropyLoss(), (x[:128], y[:128]))
    opt = BreakEvenSGD(model.parameters(), lr=1e-7, probe=probe, cheap_every=1,
                       measure_every=measure_every)
    train(model, opt, x, y, 60)
    assert not opt.break_even.reached
    cheap = [r for r in opt.history if "update_sharpness_error" in r]
    assert len(cheap) == 60
    # The step is below float32 resolution: the curvature is not resolved and not used.
    assert all("stability_ratio_update" not in r and "update_sharpness" not in r for r in cheap)
    assert all(r["update_sharpness_error"] > 1e3 for r in cheap)


def test_normal_learning_rate_resolves_the_cheap_signal():
    x, y = data(256)
    model = mlp(width=32)
    probe = Probe(model, nn.CrossEntropyLoss(), (x[:128], y[:128]))
    opt = BreakEvenSGD(model.parameters(), lr=0.5, probe=probe, cheap_every=1, measure_every=10)
    train(model, opt, x, y, 20)
    resolved = [r for r in opt.history if "update_sharpness" in r]
    assert len(resolved) == 20
    for r in resolved:
        assert r["update_sharpness_error"] <= 0.1 * abs(r["update_sharpness"])
    assert any("stability_ratio_update" in r for r in resolved)


@pytest.mark.parametrize("lr", [1e-6, 1e-4, 1e-2, 0.3])
def test_update_sharpness_error_bound_holds_against_float64(lr):
    """The recorded error bar covers the true float32 rounding error (oracle: float64)."""
    x, y = data(256)
    model = mlp(width=32)
    probe = Probe(model, nn.CrossEntropyLoss(), (x[:128], y[:128]))
    monitor = BreakEvenMonitor(probe, measure_every=None, cheap_every=1)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    monitor.attach(opt)
    before = None
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        F.cross_entropy(model(x[step * 16:(step + 1) * 16]), y[step * 16:(step + 1) * 16]).backward()
        opt.step()
    record = monitor.latest
    after = [p.detach().clone() for p in model.parameters()]
    m64 = copy.deepcopy(model).double()
    xs, ys = x[:128][monitor.quantity("update_sharpness").indices].double(), y[:128][monitor.quantity("update_sharpness").indices]

    def f64(alpha):
        with torch.no_grad():
            for q, b, a in zip(m64.parameters(), before, after):
                q.copy_(b.double() + alpha * (a.double() - b.double()))
            return float(F.cross_entropy(m64(xs), ys))

    delta_sq = sum(float((a.double() - b.double()).pow(2).sum()) for a, b in zip(after, before))
    exact = (f64(2.0) - 2 * f64(1.0) + f64(0.0)) / delta_sq
    error = record["update_sharpness_error"]
    if "update_sharpness" in record:
        assert abs(record["update_sharpness"] - exact) <= error
        assert abs(record["update_sharpness"] - exact) <= 0.1 * abs(exact) + 1e-12
    else:
        assert error > 0.1 * abs(exact) * 0.5  # refused only when the bound is not small


# --------------------------------------------------------------------------- 3. lost events


class RaisingLogger:
    def __init__(self, on):
        self.on, self.records, self.events = on, [], []

    def log_measurement(self, record):
        self.records.append(record)
        if self.on == "record":
            raise OSError("disk full")

    def log_event(self, event):
        self.events.append(event)
        if self.on == "event":
            raise OSError("disk full")

    def close(self):
        pass


@pytest.mark.parametrize("failing", ["measurement_hook", "logger_record", "logger_event"])
def test_break_even_event_survives_a_failing_consumer(tmp_path, failing):
    x, y = data()
    model = mlp()
    run_log = RunLog(tmp_path / "run")
    bad = RaisingLogger({"logger_record": "record", "logger_event": "event"}.get(failing))
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                       measure_every=2, cheap_every=None, detector=fires_at_first_full_measurement(),
                       loggers=[bad, run_log])
    seen = []
    if failing == "measurement_hook":
        opt.register_measurement_hook(lambda r: (_ for _ in ()).throw(RuntimeError("hook bug")))
    opt.register_break_even_hook(seen.append)
    train(model, opt, x, y, 1)
    with pytest.raises((RuntimeError, OSError)) as info:
        train(model, opt, x, y, 1)
    assert any("sgdbreak: raised by" in note for note in getattr(info.value, "__notes__", []))
    assert opt.break_even.reached
    assert [e["event"] for e in opt.monitor.events] == ["break_even"]
    assert len(seen) == 1 and seen[0].step == 2
    assert len(opt.history) == 1
    run_log.close()
    run = read_run(tmp_path / "run")
    assert run.break_even is not None and run.break_even["step"] == 2
    assert len(run.records) == 1


# --------------------------------------------------------------------------- 4. parameters


def test_probe_params_of_another_model_are_refused():
    x, y = data()
    with pytest.raises(ValueError, match="another model"):
        Probe(mlp(), nn.CrossEntropyLoss(), (x, y), params=mlp(seed=3).parameters())


def test_optimizer_over_another_models_parameters_is_refused():
    x, y = data()
    model, other = mlp(), mlp(seed=3)
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="none of the probe's parameters"):
        BreakEvenSGD(other.parameters(), lr=0.1, probe=probe)
    with pytest.raises(ValueError, match="none of the probe's parameters"):
        BreakEvenMonitor(probe).attach(torch.optim.SGD(other.parameters(), lr=0.1))


def test_partial_overlap_and_unused_parameters_warn():
    x, y = data()
    model = mlp()
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.warns(RuntimeWarning, match="updates 2 of the probe's 4"):
        BreakEvenSGD(list(model[2].parameters()), lr=0.1, probe=probe)
    unused = nn.ModuleDict({"net": mlp(), "head": nn.Linear(3, 3)})
    with pytest.warns(RuntimeWarning, match="2 of the probe's 6 parameter tensors do not affect"):
        Probe(unused, nn.CrossEntropyLoss(), (x, y), forward=lambda m, inp: m["net"](inp))


# --------------------------------------------------------------------------- 5. processes


def test_plain_probe_on_several_processes_is_refused(monkeypatch):
    x, y = data()
    model = mlp()
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y))
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=probe, measure_every=1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="DistributedProbe"):
        opt.step()
    # Refused before the update: nothing changed.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(RuntimeError, match="DistributedProbe"):
        BreakEvenMonitor(probe)


# --------------------------------------------------------------------------- 6. copies


def _measured_optimizer(**kwargs):
    x, y = data()
    model = mlp()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, momentum=0.9,
                       probe=Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])),
                       measure_every=3, cheap_every=2, **kwargs)
    train(model, opt, x, y, 5)
    return model, opt, x, y


def test_deepcopy_keeps_the_monitor_bound_to_the_copy():
    model, opt, x, y = _measured_optimizer()
    bundle = copy.deepcopy({"model": model, "opt": opt})
    model2, opt2 = bundle["model"], bundle["opt"]
    # torch's own test_deepcopy_copies_all_public_attrs, for our class
    public = {k for k in opt.__dict__ if not k.startswith("_")}
    assert public == {k for k in opt2.__dict__ if not k.startswith("_")}
    assert opt2.monitor is not opt.monitor and opt2.monitor.optimizer is opt2
    assert all(p is q for p, q in zip(opt2.monitor.probe.params, model2.parameters()))
    assert opt2.history == opt.history
    train(model, opt, x, y, 6)
    train(model2, opt2, x, y, 6)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    strip = [{k: v for k, v in r.items() if k != "measure_seconds"} for r in opt.history]
    assert strip == [{k: v for k, v in r.items() if k != "measure_seconds"} for r in opt2.history]


def test_pickle_round_trip_keeps_measuring():
    model, opt, x, y = _measured_optimizer(loggers=[RaisingLogger(None)])
    opt.register_measurement_hook(lambda r: None)  # not picklable: copies drop hooks and loggers
    model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.monitor.loggers == [] and opt2.monitor.optimizer is opt2
    n = len(opt2.history)
    train(model2, opt2, x, y, 6)
    assert len(opt2.history) > n


def test_deepcopy_of_an_attached_monitor_attaches_to_the_copied_optimizer():
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = BreakEvenMonitor(Probe(model, nn.CrossEntropyLoss(), (x, y)), measure_every=2,
                               cheap_every=None).attach(opt)
    monitor2 = copy.deepcopy(monitor)
    model2 = monitor2.probe.model
    train(model2, monitor2.optimizer, x, y, 2)
    assert len(monitor2.history) == 1 and monitor.history == []


# --------------------------------------------------------------------------- 8. sparse


def test_sparse_embedding_gradients_are_measured():
    torch.manual_seed(0)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(20, 8, sparse=True)
            self.out = nn.Linear(8, 3)

        def forward(self, tokens):
            return self.out(torch.tanh(self.emb(tokens).mean(1)))

    tokens = torch.randint(0, 20, (64, 5), generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 3, (64,), generator=torch.Generator().manual_seed(3))
    models = [Bag(), None]
    models[1] = copy.deepcopy(models[0])
    ref = torch.optim.SGD(models[0].parameters(), lr=0.5)
    opt = BreakEvenSGD(models[1].parameters(), lr=0.5, measure_every=2, cheap_every=1,
                       probe=Probe(models[1], nn.CrossEntropyLoss(), (tokens, labels)))
    for o, m in ((ref, models[0]), (opt, models[1])):
        for step in range(6):
            o.zero_grad()
            F.cross_entropy(m(tokens[step * 8:(step + 1) * 8]), labels[step * 8:(step + 1) * 8]).backward()
            o.step()
    assert all(torch.equal(a, b) for a, b in zip(models[0].parameters(), models[1].parameters()))
    assert models[1].emb.sparse  # restored after measuring
    full = opt.latest_full
    assert full is not None and math.isfinite(full["lambda1_H"]) and full["lambda1_H"] > 0


# --------------------------------------------------------------------------- 9. loading


def test_failed_load_leaves_the_optimizer_untouched():
    model, opt, x, y = _measured_optimizer()
    state = opt.state_dict()
    other_model = mlp()
    other = BreakEvenSGD(other_model.parameters(), lr=0.1, momentum=0.9,
                         probe=Probe(other_model, nn.CrossEntropyLoss(), (x[:48], y[:48])),
                         measure_every=3, cheap_every=2, detector=BreakEvenDetector(confirm=5))
    train(other_model, other, x, y, 2)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="different configuration"):
        other.load_state_dict(state)
    after = other.state_dict()
    assert after["sgdbreak"]["step"] == before["sgdbreak"]["step"] == 2
    assert len(after["sgdbreak"]["history"]) == len(before["sgdbreak"]["history"])
    torch.testing.assert_close(after["state"], before["state"], rtol=0, atol=0)


def test_warm_vectors_of_another_width_are_refused_before_loading():
    model, opt, x, y = _measured_optimizer()
    state = opt.state_dict()
    wide = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 3))
    other = BreakEvenSGD(wide.parameters(), lr=0.1, momentum=0.9, measure_every=3, cheap_every=2,
                         probe=Probe(wide, nn.CrossEntropyLoss(), (x[:48], y[:48])))
    sgd_state = copy.deepcopy(other.state_dict()["state"])
    state["state"], state["param_groups"] = other.state_dict()["state"], other.state_dict()["param_groups"]
    with pytest.raises(ValueError, match="another model"):
        other.load_state_dict(state)
    assert other.monitor.step == 0 and other.state_dict()["state"] == sgd_state


def test_plain_sgd_checkpoint_loads_with_a_warning():
    model, opt, x, y = _measured_optimizer()
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="no sgdbreak state"):
        opt.load_state_dict(plain.state_dict())
    assert opt.monitor.step == 5


# --------------------------------------------------------------------------- 10. retries


def test_skipped_measurements_back_off_under_the_default_trigger():
    x, y = data()
    x_probe = x[:48].clone()
    x_probe[0, 0] = float("nan")
    model = mlp()
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x_probe, y[:48])),
                       cheap_every=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(model, opt, x, y, 200)
    skipped = [e for e in opt.monitor.events if e["event"] == "skipped"]
    assert 3 <= len(skipped) <= 8, len(skipped)
    assert not opt.break_even.reached


# --------------------------------------------------------------------------- 11. global RNG


class NoisyForward(nn.Module):
    """A forward pass that draws random numbers in every mode (functional dropout)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 3)

    def forward(self, inp):
        return self.b(F.dropout(torch.tanh(self.a(inp)), 0.2, training=True))


def test_measuring_does_not_consume_the_global_rng():
    x, y = data()

    def run(measure):
        torch.manual_seed(0)
        model = NoisyForward()
        kwargs = {}
        if measure:
            kwargs = dict(probe=Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])), measure_every=2,
                          cheap_every=1, measurements=("hessian", "noise", "alpha_star"))
        opt = BreakEvenSGD(model.parameters(), lr=0.1, **kwargs)
        torch.manual_seed(1)
        train(model, opt, x, y, 8)
        return model, torch.get_rng_state()

    (ref, ref_rng), (ours, our_rng) = run(False), run(True)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), ours.parameters()))
    assert torch.equal(ref_rng, our_rng)


# --------------------------------------------------------------------------- 12. early errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.int64])
def test_inputs_that_do_not_fit_the_model_are_refused_at_construction(dtype):
    x, y = data()
    with pytest.raises(ValueError, match="cannot evaluate the loss"):
        Probe(mlp(), nn.CrossEntropyLoss(), (x.to(dtype), y))


def test_batchnorm1d_chunk_of_one_example_is_refused_at_construction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = data(33)
    with pytest.raises(ValueError, match="chunk_size"):
        Probe(model, nn.CrossEntropyLoss(), (x, y), chunk_size=16)
    probe = Probe(model, nn.CrossEntropyLoss(), (x[:32], y[:32]), chunk_size=16)
    with pytest.raises(ValueError, match="GradientNoise: batch_size=1"):
        BreakEvenMonitor(probe, noise_batch_size=1)
    with pytest.raises(ValueError, match="UpdateSharpness: examples=1"):
        BreakEvenMonitor(probe, quantities=[sgdbreak.UpdateSharpness(examples=1)])
    # Two-dimensional BatchNorm normalises one image over its pixels: allowed.
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 36, 3))
    Probe(conv, nn.CrossEntropyLoss(), (torch.randn(33, 1, 8, 8), torch.randint(0, 3, (33,))), chunk_size=16)


def test_group_out_of_range_is_refused_at_construction():
    x, y = data()
    model = mlp()
    with pytest.raises(ValueError, match="group=3"):
        BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)), group=3)


# --------------------------------------------------------------------------- 14. maximize


def test_maximize_is_refused_with_the_equivalent_fix():
    x, y = data()
    model = mlp()
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y))
    with pytest.raises(ValueError, match="maximize"):
        BreakEvenSGD(model.parameters(), lr=0.1, maximize=True, probe=probe)
    with pytest.raises(ValueError, match="maximize"):
        BreakEvenMonitor(probe).attach(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))
    # The documented fix: minimise the negated objective; the update is the same bits.
    a, b = mlp(), mlp()
    ref = torch.optim.SGD(a.parameters(), lr=0.1, maximize=True)
    opt = BreakEvenSGD(b.parameters(), lr=0.1, measure_every=2,
                       probe=Probe(b, lambda out, t: -F.cross_entropy(out, t), (x, y)))
    for _ in range(4):
        for o, m, sign in ((ref, a, 1.0), (opt, b, -1.0)):
            o.zero_grad()
            (sign * F.cross_entropy(m(x[:16]), y[:16])).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


# --------------------------------------------------------------------------- detector by design


def test_unconverged_lanczos_never_fires_the_stability_or_peak_rules():
    det = BreakEvenDetector(patience=1, confirm=1)
    for step, lam in enumerate([1.0, 50.0, 200.0, 20.0, 10.0, 5.0]):
        det.update({"step": step, "lambda1_H": lam, "stability_ratio": lam / 10,
                    "eq1_lhs": lam / 5, "hessian_converged": 0.0})
    assert not det.result.reached
    det.update({"step": 10, "lambda1_H": 30.0, "stability_ratio": 3.0, "hessian_converged": 1.0})
    assert det.result.reached and det.result.rule == "stability" and det.result.step == 10


def test_quality_keys_can_be_turned_off_and_are_checkpointed():
    det = BreakEvenDetector(quality_keys={})
    det.update({"step": 1, "stability_ratio": 3.0, "hessian_converged": 0.0})
    assert det.result.reached
    state = json.loads(json.dumps(det.state_dict()))
    with pytest.raises(ValueError, match="quality_keys"):
        BreakEvenDetector().load_state_dict(state)
    # A state saved before quality_keys existed loads with the defaults.
    old = dict(state, config={k: v for k, v in state["config"].items() if k != "quality_keys"})
    fresh = BreakEvenDetector()
    fresh.load_state_dict(old)
    assert fresh.result.reached
    with pytest.raises(ValueError, match="quality_keys"):
        BreakEvenDetector(quality_keys={"stability_ratio": 1})


def test_non_positive_sharpness_gives_no_eq1_value():
    x, y = data()
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    # A concave loss: λ1^H <= 0, where Eq. 1's left-hand side exceeds 1 without any break-even.
    probe = Probe(model, lambda out, t: -F.cross_entropy(out, t), (x, y))
    opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=probe, measure_every=1, cheap_every=None,
                       measurements=("hessian", "curvature_variance"), dataset_size=96, batch_size=16)
    for _ in range(3):
        opt.zero_grad()
        (-F.cross_entropy(model(x[:16]), y[:16])).backward()
        opt.step()
    assert all(r["lambda1_H"] < 1e-6 for r in opt.history)
    assert not any("eq1_lhs" in r and r["lambda1_H"] <= 0 for r in opt.history)
    assert not opt.break_even.reached


def test_non_finite_measurement_is_a_typed_error():
    assert issubclass(sgdbreak.NonFiniteMeasurement, ValueError)
    with pytest.raises(sgdbreak.NonFiniteMeasurement):
        sgdbreak.hessian_eigenvalues(lambda: torch.tensor(float("nan"), requires_grad=True) * 1.0,
                                     [torch.zeros(2, requires_grad=True)])
