"""Quantities: what the monitor measures, as objects with their own settings and state."""

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import sgdbreak
from sgdbreak import (
    AlphaStar,
    BatchNormGamma,
    BreakEvenDetector,
    BreakEvenMonitor,
    BreakEvenSGD,
    CurvatureVariance,
    GradientNoise,
    HessianTrace,
    Probe,
    Sharpness,
    UpdateSharpness,
    default_quantities,
)
from sgdbreak.integrations.rundir import RunLog, read_run
from sgdbreak.measurement.monitor import quantities_from_settings


def setup(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16)] + ([nn.BatchNorm1d(16)] if bn else []) + [nn.Tanh(), nn.Linear(16, 3)]
    model = nn.Sequential(*layers)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)
    return model, x, y


def run(quantities=None, steps=9, bn=False, loggers=(), **settings):
    model, x, y = setup(bn=bn)
    kwargs = dict(settings) if quantities is None else {"quantities": quantities}
    opt = BreakEvenSGD(model.parameters(), lr=0.2, momentum=0.5, measure_every=3, cheap_every=2,
                       probe=Probe(model, nn.CrossEntropyLoss(), (x[:48], y[:48])), loggers=list(loggers),
                       **kwargs)
    for step in range(steps):
        i = step * 16 % 96
        opt.zero_grad()
        F.cross_entropy(model(x[i:i + 16]), y[i:i + 16]).backward()
        opt.step()
    return opt


def strip(history):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in history]


def test_default_quantities_give_the_default_records():
    default = run(bn=True)
    explicit = run(default_quantities(), bn=True)
    assert strip(default.history) == strip(explicit.history)
    keys = set().union(*map(set, default.history))
    for key in ("lambda1_H", "eig_H_1", "hessian_converged", "stability_ratio", "lambda1_K", "trace_K",
                "gns", "update_sharpness", "update_sharpness_error", "bn_gamma_norm", "loss", "num_hvps",
                "noise_batch_size", "lr", "momentum", "step"):
        assert key in keys, key


def test_flat_settings_equal_the_explicit_quantities():
    settings = dict(measurements=("hessian", "trace", "noise", "curvature_variance", "alpha_star",
                                  "bn_gamma_norm"), hessian_k=2, trace_samples=4, noise_samples=6,
                    dataset_size=96, batch_size=16, cheap_examples=32)
    quantities = [UpdateSharpness(32), Sharpness(2), HessianTrace(4),
                  CurvatureVariance(dataset_size=96, batch_size=16), GradientNoise(samples=6),
                  AlphaStar(32), BatchNormGamma()]
    a, b = run(**settings), run(quantities)
    assert strip(a.history) == strip(b.history)
    assert {"trace_H", "eig_H_2", "curvature_variance", "eq1_lhs", "alpha_star"} <= set(a.latest_full)
    assert [type(q) for q in quantities_from_settings(**settings)] == [type(q) for q in quantities]


class GradientNorm:
    """A user quantity: the probe gradient norm, and what the context offers."""

    name = "gradient_norm"

    def __init__(self):
        self.seen = []

    def compute(self, ctx):
        self.seen.append((ctx.step, ctx.optimizer, ctx.params, ctx.full, "lambda1_H" in ctx.record))
        return {"grad_norm": float(ctx.gradient().norm())}


def test_a_user_quantity_reaches_records_detector_and_run_directory(tmp_path):
    mine = GradientNorm()
    log = RunLog(tmp_path / "run")
    opt = run([*default_quantities(), mine], loggers=[log])
    log.close()
    full = [r for r in opt.history if "lambda1_H" in r]
    assert all("grad_norm" in r for r in full) and len(mine.seen) == len(full)
    step, optimizer, params, is_full, after_sharpness = mine.seen[0]
    assert step == 3 and optimizer is opt and params == opt.monitor.probe.params and is_full and after_sharpness
    # The gradient is the probe's mean gradient (shared from the Hessian operator's graph).
    assert full[-1]["grad_norm"] == pytest.approx(float(opt.monitor.probe.gradient().norm()), rel=1e-5)
    assert [r["grad_norm"] for r in read_run(tmp_path / "run").records if "grad_norm" in r] == \
        [r["grad_norm"] for r in full]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("grad_norm",))
    for record in opt.history:
        det.update(record)  # the detector reads user keys like any other


def test_shared_work_is_done_once_and_the_graph_is_freed_early(monkeypatch):
    calls = {"operator": 0, "gradient": 0}
    original_op, original_grad = Probe.hessian_operator, Probe.gradient

    def counting_op(self, **kwargs):
        calls["operator"] += 1
        return original_op(self, **kwargs)

    def counting_grad(self):
        calls["gradient"] += 1
        return original_grad(self)

    monkeypatch.setattr(Probe, "hessian_operator", counting_op)
    monkeypatch.setattr(Probe, "gradient", counting_grad)

    class OperatorSpy:
        name = "spy"

        def compute(self, ctx):
            self.held = ctx._operator is not None
            return {}

    spy = OperatorSpy()
    opt = run([Sharpness(), HessianTrace(3), GradientNoise(samples=4), GradientNorm(), spy], steps=3)
    assert calls == {"operator": 1, "gradient": 0}  # one graph; its gradient serves the noise
    assert spy.held is False  # no later quantity uses the operator: freed before the rest
    assert opt.latest_full["num_hvps"] >= 3


def test_quantity_state_is_checkpointed_including_user_state():
    class Counter:
        name = "counter"

        def __init__(self):
            self.count = 0

        def compute(self, ctx):
            self.count += 1
            return {"count": float(self.count)}

        def state_dict(self):
            return {"count": self.count}

        def load_state_dict(self, state):
            self.count = int(state["count"])

    opt = run([*default_quantities(), Counter()], steps=6)
    state = opt.state_dict()["sgdbreak"]
    assert state["quantities"]["counter"] == {"count": 2}
    assert state["quantities"]["sharpness"]["warm_vectors"] is not None
    fresh = run([*default_quantities(), Counter()], steps=0)
    fresh.monitor.load_state_dict(state)
    assert fresh.monitor.quantity("counter").count == 2
    assert torch.equal(fresh.monitor.quantity("sharpness").warm_vectors, opt.monitor.quantity("sharpness").warm_vectors)


def test_checkpoints_of_version_0_1_still_load():
    opt = run(steps=6)
    state = copy.deepcopy(opt.state_dict()["sgdbreak"])
    quantities = state.pop("quantities")
    state["warm_vectors"] = quantities["sharpness"]["warm_vectors"]
    state["calibration"] = quantities["update_sharpness"]["calibration"]
    fresh = run(steps=0)
    fresh.monitor.load_state_dict(state)
    assert torch.equal(fresh.monitor.quantity("sharpness").warm_vectors, state["warm_vectors"])
    assert fresh.monitor.quantity("update_sharpness").calibration == state["calibration"]


class TestBadQuantities:
    def probe(self):
        model, x, y = setup()
        return Probe(model, nn.CrossEntropyLoss(), (x, y))

    @pytest.mark.parametrize("make, message", [
        (lambda: Sharpness(0), "Sharpness: k"),
        (lambda: Sharpness(tol=0), "Sharpness: tol"),
        (lambda: HessianTrace(1), "HessianTrace: samples"),
        (lambda: GradientNoise("exact"), "GradientNoise: method"),
        (lambda: GradientNoise(samples=1), "GradientNoise: samples"),
        (lambda: CurvatureVariance(dataset_size=10, batch_size=20), "CurvatureVariance: batch_size"),
        (lambda: UpdateSharpness(0), "UpdateSharpness: examples"),
        (lambda: AlphaStar(rise=1.0), "AlphaStar: rise"),
    ])
    def test_settings_errors_name_the_quantity_and_setting(self, make, message):
        with pytest.raises(ValueError, match=message):
            make()

    def test_settings_checked_against_the_probe_name_the_quantity(self):
        with pytest.raises(ValueError, match="GradientNoise: batch_size=96"):
            BreakEvenMonitor(self.probe(), quantities=[GradientNoise(batch_size=96)])

    def test_names_must_be_unique_and_objects_complete(self):
        with pytest.raises(ValueError, match="unique"):
            BreakEvenMonitor(self.probe(), quantities=[Sharpness(), Sharpness(2)])
        with pytest.raises(TypeError, match="compute"):
            BreakEvenMonitor(self.probe(), quantities=[object()])

    def test_settings_and_quantities_are_exclusive(self):
        with pytest.raises(TypeError, match="not both"):
            BreakEvenMonitor(self.probe(), quantities=[Sharpness()], hessian_tol=1e-2)
        with pytest.raises(TypeError, match="unexpected keyword"):
            BreakEvenMonitor(self.probe(), hessian_tolerance=1e-2)

    @pytest.mark.parametrize("entries, error, message", [
        ([1.0], TypeError, "must return a mapping"),
        ({"lambda1_H": 1.0}, ValueError, "not a new"),
        ({"x": "high"}, TypeError, "real number"),
    ])
    def test_bad_entries_name_the_quantity(self, entries, error, message):
        class Bad:
            name = "bad"

            def compute(self, ctx):
                return entries

        model, x, y = setup()
        opt = BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                           quantities=[Sharpness(), Bad()], measure_every=1)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(error, match=f"quantity 'bad'.*{message}"):
            opt.step()


def test_quantity_protocol_is_runtime_checkable():
    assert isinstance(Sharpness(), sgdbreak.Quantity)
    assert isinstance(GradientNorm(), sgdbreak.Quantity)
    assert not isinstance(object(), sgdbreak.Quantity)
