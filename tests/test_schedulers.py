"""MonitoredLR: a learning rate that reads the monitor, advanced once per optimizer step."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from sgdbreak import BreakEvenDetector, BreakEvenMonitor, BreakEvenSGD, MonitoredLR, Probe
from sgdbreak.optim.schedulers import find_monitor


def setup(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    return model, x, y


def fires_at_first_measurement():
    return BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9)


def make_opt(model, x, y, **kwargs):
    return BreakEvenSGD(model.parameters(), lr=0.1, probe=Probe(model, nn.CrossEntropyLoss(), (x, y)),
                        measure_every=3, cheap_every=None, measurements=("hessian",), **kwargs)


def train(model, opt, sched, x, y, steps, calls_per_step=1):
    lrs = []
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for _ in range(calls_per_step):
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return lrs


def test_lr_follows_break_even_and_the_latest_measurement():
    model, x, y = setup()
    opt = make_opt(model, x, y, detector=fires_at_first_measurement())
    sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # set at construction
    lrs = train(model, opt, sched, x, y, 5)
    # Break-even is detected at the first full measurement (step 3).
    assert lrs == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.1])
    assert opt.break_even.step == 3
    # The monitor's stability ratio uses the lr that was in force.
    assert opt.history[0]["lr"] == pytest.approx(0.01)

    model, x, y = setup()
    opt = make_opt(model, x, y)
    sched = MonitoredLR(opt, lambda m: 1.0 / (1.0 + m.latest_full["lambda1_H"]) if m.latest_full else 1.0)
    lrs = train(model, opt, sched, x, y, 4)
    lam = opt.history[0]["lambda1_H"]
    assert lrs[:2] == pytest.approx([0.1, 0.1]) and lrs[2] == pytest.approx(0.1 / (1 + lam))


def test_repeated_step_calls_advance_once_per_optimizer_step():
    runs = []
    for calls in (1, 3):
        model, x, y = setup()
        opt = make_opt(model, x, y, detector=fires_at_first_measurement())
        sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.1)
        lrs = train(model, opt, sched, x, y, 6, calls_per_step=calls)
        runs.append((lrs, sched.last_epoch, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0] == runs[1][0] and runs[0][1] == runs[1][1] == 6
    assert all(torch.equal(a, b) for a, b in zip(runs[0][2], runs[1][2]))


def test_under_accelerate_prepare_the_per_process_calls_do_not_double_step():
    accelerate = pytest.importorskip("accelerate")
    model, x, y = setup()
    opt = make_opt(model, x, y, detector=fires_at_first_measurement())
    sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.1)
    accelerator = accelerate.Accelerator(cpu=True)
    model, popt, psched = accelerator.prepare(model, opt, sched)
    assert find_monitor(popt) is opt.monitor  # found through Accelerate's wrapper
    lrs = []
    for _ in range(5):
        popt.zero_grad()
        accelerator.backward(nn.functional.cross_entropy(model(x), y))
        popt.step()
        psched.step()
        psched.step()  # as with two processes: AcceleratedScheduler steps num_processes times
        lrs.append(popt.param_groups[0]["lr"])
    assert lrs == pytest.approx([0.01, 0.01, 0.1, 0.1, 0.1]) and sched.last_epoch == 5


def test_state_round_trip_resumes_the_schedule():
    model, x, y = setup()
    opt = make_opt(model, x, y, detector=fires_at_first_measurement())
    sched = MonitoredLR(opt, lambda m: 1.0 if m.break_even.reached else 0.1)
    train(model, opt, sched, x, y, 2)
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict(), "model": model.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    want = train(model, opt, sched, x, y, 3)

    model2, _, _ = setup()
    model2.load_state_dict(state["model"])
    opt2 = make_opt(model2, x, y, detector=fires_at_first_measurement())
    opt2.load_state_dict(state["opt"])
    sched2 = MonitoredLR(opt2, lambda m: 1.0 if m.break_even.reached else 0.1)
    sched2.load_state_dict(state["sched"])
    assert train(model2, opt2, sched2, x, y, 3) == pytest.approx(want)
    assert sched2.last_epoch == sched.last_epoch == 5


def test_monitor_of_a_plain_optimizer_and_bad_input():
    model, x, y = setup()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="no BreakEvenMonitor"):
        MonitoredLR(sgd, lambda m: 1.0)
    monitor = BreakEvenMonitor(Probe(model, nn.CrossEntropyLoss(), (x, y)), measure_every=2, cheap_every=None,
                               measurements=("hessian",)).attach(sgd)
    sched = MonitoredLR(sgd, lambda m: 0.5 if m.latest_full else 1.0, monitor=monitor)
    assert train(model, sgd, sched, x, y, 3) == pytest.approx([0.1, 0.05, 0.05])
    with pytest.raises(TypeError, match="callable"):
        MonitoredLR(sgd, 0.5, monitor=monitor)
    with pytest.raises(TypeError, match="BreakEvenMonitor"):
        MonitoredLR(sgd, lambda m: 1.0, monitor="monitor")
    opt = make_opt(model, x, y)
    for bad in (float("nan"), -1.0, True, "1"):
        with pytest.raises(ValueError, match="finite number"):
            MonitoredLR(opt, lambda m, bad=bad: bad)
    sched = MonitoredLR(opt, lambda m: 1.0)
    with pytest.raises(ValueError, match="step\\(epoch\\)"):
        sched.step(3)
