"""Fault injection: consumers that raise, NaN at every stage, and resumption at every step.

Whatever fails, training stays bit-identical to torch's SGD, nothing already measured or
detected is lost, and a resumed run writes the records of the uninterrupted one.
"""

import io
import math
import warnings

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, invariant, precondition, rule
from torch import nn
from torch.nn import functional as F

from sgdbreak import BreakEvenDetector, BreakEvenSGD, Probe
from sgdbreak.estimators.hessian import HessianOperator
from sgdbreak.integrations.rundir import RunLog, read_run

STEPS = 12
MONITOR = dict(measure_every=3, cheap_every=2,
               measurements=("hessian", "noise", "alpha_star", "curvature_variance"),
               dataset_size=96, batch_size=16)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(96, 6, generator=g), torch.randint(0, 3, (96,), generator=g)


X, Y = data()


def model_and_optimizer(*, probe=True, loggers=(), threshold=0.02, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    kwargs = {}
    if probe:
        detector = BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",),
                                     stability_threshold=threshold)
        kwargs = dict(probe=Probe(model, nn.CrossEntropyLoss(), (X[:48], Y[:48])), detector=detector,
                      loggers=list(loggers), **MONITOR)
    opt = BreakEvenSGD(model.parameters(), lr=0.3, momentum=0.5, **kwargs)
    return model, opt


def train_step(model, opt, step):
    i = step * 16 % 96
    opt.zero_grad()
    F.cross_entropy(model(X[i:i + 16]), Y[i:i + 16]).backward()
    opt.step()


def strip(records):
    return [{k: v for k, v in r.items() if k != "measure_seconds"} for r in records]


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted run: parameters, records and events after every step."""
    model, opt = model_and_optimizer()
    params, histories = [], []
    for step in range(STEPS):
        train_step(model, opt, step)
        params.append([p.detach().clone() for p in model.parameters()])
        histories.append(strip(opt.history))
    assert opt.break_even.reached and 3 <= opt.break_even.step < STEPS  # an event mid-run
    return params, histories, list(opt.monitor.events)


def plain_sgd_params():
    model, opt = model_and_optimizer(probe=False)
    for step in range(STEPS):
        train_step(model, opt, step)
    return [p.detach() for p in model.parameters()]


# --------------------------------------------------------------------------- raising consumers


class FailsOnce:
    """A logger (or hook) that raises on the n-th call of one kind."""

    def __init__(self, kind, n):
        self.kind, self.n, self.calls = kind, n, {"record": 0, "event": 0}

    def _call(self, kind):
        self.calls[kind] += 1
        if kind == self.kind and self.calls[kind] == self.n:
            raise OSError(f"{kind} {self.n} failed")

    def log_measurement(self, record):
        self._call("record")

    def log_event(self, event):
        self._call("event")

    def close(self):
        pass


@pytest.mark.parametrize("kind, n", [("record", n) for n in range(1, 9)] + [("event", 1)])
def test_a_consumer_failing_at_any_record_loses_nothing(tmp_path, reference, kind, n):
    params, histories, events = reference
    run_log = RunLog(tmp_path / "run")
    failing = FailsOnce(kind, n)
    model, opt = model_and_optimizer(loggers=[failing, run_log])
    raised = 0
    for step in range(STEPS):
        try:
            train_step(model, opt, step)
        except OSError:
            raised += 1
    assert raised == 1
    assert all(torch.equal(a, b) for a, b in zip(params[-1], model.parameters()))
    assert strip(opt.history) == histories[-1]
    assert opt.monitor.events == events
    run_log.close()
    run = read_run(tmp_path / "run")
    assert strip(run.records) == histories[-1]
    assert run.break_even is not None and run.break_even["step"] == events[0]["step"]


@pytest.mark.parametrize("n", [1, 3])
def test_a_failing_measurement_hook_loses_nothing(reference, n):
    _, histories, events = reference
    model, opt = model_and_optimizer()
    calls, seen = [], []

    def hook(record):
        calls.append(record["step"])
        if len(calls) == n:
            raise RuntimeError("user hook bug")

    opt.register_measurement_hook(hook)
    opt.register_break_even_hook(seen.append)
    for step in range(STEPS):
        try:
            train_step(model, opt, step)
        except RuntimeError:
            pass
    assert strip(opt.history) == histories[-1] and opt.monitor.events == events
    assert len(seen) == 1 and len(calls) == len(histories[-1])


# --------------------------------------------------------------------------- NaN at every stage


def _nan_loss(probe):
    original = probe.loss_of_indices
    probe.loss_of_indices = lambda idx: original(idx) * float("nan")


def _nan_hvp(probe):
    original = HessianOperator.matvec

    def matvec(self, v):
        out = original(self, v)
        return out * float("nan") if self.num_matvecs == 2 else out

    return matvec


def _nan_samples(probe):
    original = probe.gradient_samples

    def samples(**kwargs):
        out = original(**kwargs)
        out[1] = float("nan")
        return out

    probe.gradient_samples = samples


def _nan_cheap(probe):
    probe.loss_value = lambda indices=None: float("nan")


def _nan_curvature(probe):
    probe.curvature_variance = lambda *a, **k: float("nan")


STAGES = {"loss": _nan_loss, "hvp": None, "samples": _nan_samples, "cheap": _nan_cheap,
          "curvature_variance": _nan_curvature}


@pytest.mark.parametrize("stage", sorted(STAGES))
@pytest.mark.parametrize("at", [3, 6])
def test_nan_at_any_stage_skips_cleanly(monkeypatch, stage, at):
    expected = plain_sgd_params()
    model, opt = model_and_optimizer(threshold=1e6)  # nothing may fire
    probe = opt.monitor.probe
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(STEPS):
            injected = step + 1 == at
            with monkeypatch.context() as patch:
                if injected and stage == "hvp":
                    patch.setattr(HessianOperator, "matvec", _nan_hvp(probe))
                elif injected:
                    saved = dict(probe.__dict__)
                    STAGES[stage](probe)
                train_step(model, opt, step)
                if injected and stage != "hvp":
                    probe.__dict__.clear()
                    probe.__dict__.update(saved)
    assert all(torch.equal(a, b) for a, b in zip(expected, model.parameters()))
    assert all(math.isfinite(v) for r in opt.history for v in r.values())
    at_injection = [r for r in opt.history if r["step"] == at]
    skipped = [e for e in opt.monitor.events if e["event"] == "skipped"]
    assert skipped or not at_injection or len(at_injection[0]) < len(
        next(r for r in opt.history if r["step"] == at + 3))
    later = [r for r in opt.history if r["step"] > at and "lambda1_H" in r]
    assert later and all(r["lambda1_H"] > 0 for r in later)  # measuring resumed
    assert not opt.break_even.reached


# --------------------------------------------------------------------------- resume at every step


@pytest.mark.parametrize("stop", range(1, STEPS))
def test_resume_after_any_step_gives_the_uninterrupted_run(tmp_path, reference, stop):
    params, histories, events = reference
    model, opt = model_and_optimizer()
    for step in range(stop):
        train_step(model, opt, step)
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, path)
    del model, opt
    ckpt = torch.load(path, weights_only=True)
    model, opt = model_and_optimizer(seed=7)  # other initial weights: all come from the checkpoint
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    assert strip(opt.history) == histories[stop - 1]
    for step in range(stop, STEPS):
        train_step(model, opt, step)
    assert all(torch.equal(a, b) for a, b in zip(params[-1], model.parameters()))
    assert strip(opt.history) == histories[-1]
    assert opt.monitor.events == events


# --------------------------------------------------------------------------- state machine


def _reference_run():
    model, opt = model_and_optimizer()
    params, histories = [[p.detach().clone() for p in model.parameters()]], [[]]
    for step in range(STEPS):
        train_step(model, opt, step)
        params.append([p.detach().clone() for p in model.parameters()])
        histories.append(strip(opt.history))
    return params, histories, list(opt.monitor.events)


class MonitorMachine(RuleBasedStateMachine):
    """Step, checkpoint, and resume (in place or into fresh objects) in any order.

    Invariant: the weights, records and events are those of the uninterrupted run at the
    same step. Measurements happen through the triggers (every 3 steps, cheap every 2).
    """

    checkpoints = Bundle("checkpoints")
    reference = None

    def __init__(self):
        super().__init__()
        if MonitorMachine.reference is None:
            MonitorMachine.reference = _reference_run()
        self.model, self.opt = model_and_optimizer()
        self.step = 0

    @precondition(lambda self: self.step < STEPS)
    @rule()
    def train(self):
        train_step(self.model, self.opt, self.step)
        self.step += 1

    @rule(target=checkpoints)
    def save(self):
        buffer = io.BytesIO()
        torch.save({"model": self.model.state_dict(), "opt": self.opt.state_dict()}, buffer)
        return self.step, buffer.getvalue()

    @rule(checkpoint=checkpoints, fresh=st.booleans())
    def resume(self, checkpoint, fresh):
        step, blob = checkpoint
        state = torch.load(io.BytesIO(blob), weights_only=True)
        if fresh:  # as a new process would: new objects, other initial weights
            self.model, self.opt = model_and_optimizer(seed=11)
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step = step

    @invariant()
    def matches_the_uninterrupted_run(self):
        params, histories, events = MonitorMachine.reference
        assert all(torch.equal(a, b) for a, b in zip(params[self.step], self.model.parameters()))
        assert strip(self.opt.history) == histories[self.step]
        assert self.opt.monitor.events == [e for e in events if e["detected_at"] <= self.step]


MonitorMachine.TestCase.settings = settings(max_examples=10, stateful_step_count=15, deadline=None)
test_monitor_state_machine = MonitorMachine.TestCase
