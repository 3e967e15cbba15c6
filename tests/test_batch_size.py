"""The batch-size controller and BreakEvenBatchSampler (one process).

The controller's decisions are checked on records fed to a real monitor (exact oracles for
the sizes, the smoothed noise scale and each lr rule); the sampler's epochs by a Hypothesis
property over arbitrary size schedules; the whole loop with a DataLoader, including an
exact resume from ``state_dict``.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

import sgdbreak
from sgdbreak import (
    BatchSizeController,
    BreakEvenBatchSampler,
    BreakEvenDetector,
    BreakEvenSGD,
    Probe,
)
from sgdbreak.optim.batch_size import adascale_gain, lr_factor

N = 96


def data(n: int = N, seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def model_(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def fires_at_first() -> BreakEvenDetector:
    return BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",), stability_threshold=1e-9,
                             confirm=1)


def make_opt(model, *, lr=0.05, measure_every=None, detector=None, measurements=("hessian", "noise"), **kw):
    x, y = data(48, seed=1)
    probe = Probe(model, nn.CrossEntropyLoss(), (x, y))
    return BreakEvenSGD(model.parameters(), lr=lr, momentum=0.5, probe=probe, measure_every=measure_every,
                        cheap_every=None, measurements=measurements, noise_samples=6, hessian_tol=1e-4, max_hvps=12, seed=3,
                        detector=detector or fires_at_first(), **kw)


def feed(monitor, step: int, **entries) -> None:
    """A measurement record at ``step`` (as if measured there), through the monitor's own processing."""
    monitor.step = step
    monitor._process({"step": step, **entries})


class Recorder:
    def __init__(self):
        self.records, self.events = [], []

    def log_measurement(self, record):
        self.records.append(dict(record))

    def log_event(self, event):
        self.events.append(dict(event))

    def close(self):
        pass


# --------------------------------------------------------------------------- decisions


def test_small_batch_until_break_even_then_the_largest_power_of_two_under_the_noise_scale():
    opt = make_opt(model_(), detector=BreakEvenDetector(rules=("stability",), stability_keys=("stability_ratio",),
                                                        stability_threshold=1.0, confirm=1))
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=50, lr_rule="linear", smoothing=0.0,
                              edge_margin=None)
    assert ctl.sizes == [4, 8, 16, 32]
    feed(opt.monitor, 1, trace_K=100.0, gns=1000.0, stability_ratio=0.5)  # huge noise, no break-even
    assert not ctl.update() and ctl.batch_size == 4 and opt.param_groups[0]["lr"] == 0.05
    feed(opt.monitor, 2, trace_K=100.0, gns=20.0, stability_ratio=1.5)  # break-even detected here
    assert opt.monitor.break_even.reached
    assert ctl.update() and ctl.batch_size == 16 and ctl.lr_factor == 4.0  # 16 <= 20 < 32
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)
    assert not ctl.update()  # once per optimizer step
    feed(opt.monitor, 3, trace_K=100.0, gns=1e6)
    assert ctl.update() and ctl.batch_size == 32  # capped by max_batch_size (64 > 50)
    feed(opt.monitor, 4, trace_K=100.0, gns=2.0)
    assert not ctl.update() and ctl.batch_size == 32  # never shrinks; linear factor unchanged
    feed(opt.monitor, 5, loss=1.0)  # a record without noise: no decision
    assert not ctl.update()


def test_noise_scale_is_the_ratio_of_bias_corrected_averages():
    opt = make_opt(model_())
    ctl = BatchSizeController(opt, batch_size=2, max_batch_size=1024, smoothing=0.5)
    pairs = [(10.0, 2.0), (30.0, 1.0), (20.0, 4.0)]  # (trace_K, ‖g‖²)
    for step, (trace, norm) in enumerate(pairs, 1):
        feed(opt.monitor, step, trace_K=trace, gns=trace / norm, stability_ratio=0.1)
        ctl.update()
    weights = [0.25, 0.5, 1.0]
    want = sum(w * t for w, (t, _) in zip(weights, pairs)) / sum(w * n for w, (_, n) in zip(weights, pairs))
    assert ctl.noise_scale == pytest.approx(want, rel=1e-12)
    # Smoothed scale 5, then (0.5·10 + 30)/(0.5·2 + 1) = 17.5, then 7.5: S = 4, 16, and stays 16.
    assert [e["batch_size"] for e in opt.monitor.events if e["event"] == "batch_size_change"] == [4, 16]
    assert ctl.batch_size == 16


@pytest.mark.parametrize("rule", ["linear", "sqrt", "adascale", "none"])
def test_each_lr_rule(rule):
    opt = make_opt(model_())
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=64, lr_rule=rule, smoothing=0.0, edge_margin=None)
    trace, norm = 50.0, 2.0  # B = 25: S = 16, s = 4
    feed(opt.monitor, 1, trace_K=trace, gns=trace / norm, stability_ratio=0.1)
    ctl.update()
    assert ctl.batch_size == 16
    sigma2 = trace / 4  # variance of a batch-S0 gradient; AdaScale's (σ² + μ²)/(σ²/s + μ²)
    want = {"linear": 4.0, "sqrt": 2.0, "none": 1.0, "adascale": (sigma2 + norm) / (sigma2 / 4 + norm)}[rule]
    assert ctl.lr_factor == pytest.approx(want, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * want)


def test_adascale_gain_limits_and_follows_the_noise_down():
    assert adascale_gain(8.0, math.inf, 16) == 8.0 and adascale_gain(8.0, 0.0, 16) == 1.0
    assert 1.0 < adascale_gain(8.0, 64.0, 16) < 8.0
    assert lr_factor("adascale", 1.0, 10.0, 4) == 1.0
    opt = make_opt(model_())
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=16, lr_rule="adascale", smoothing=0.0,
                              edge_margin=None)
    feed(opt.monitor, 1, trace_K=32.0, gns=32.0, stability_ratio=0.1)
    ctl.update()
    high = ctl.lr_factor
    feed(opt.monitor, 2, trace_K=32.0, gns=4.0)
    assert ctl.update() and ctl.batch_size == 16 and ctl.lr_factor == pytest.approx(adascale_gain(4.0, 4.0, 4))
    assert ctl.lr_factor < high
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * ctl.lr_factor)


def test_the_edge_caps_raising_the_lr_but_never_lowers_it():
    opt = make_opt(model_())
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=64, lr_rule="linear", smoothing=0.0,
                              edge_margin=0.9)
    # lr 0.05 at ratio 0.1: η_edge = 0.5, cap = 0.9 · 0.5 / 0.05 = 9 < linear 16.
    feed(opt.monitor, 1, trace_K=1e3, gns=1e3, stability_ratio=0.1, lr=0.05, hessian_converged=1.0)
    ctl.update()
    assert ctl.batch_size == 64 and ctl.lr_factor == pytest.approx(9.0)
    # A later (unconverged) measurement is ignored; a converged one below the edge raises it.
    feed(opt.monitor, 2, trace_K=1e3, gns=1e3, stability_ratio=2.0, lr=0.45, hessian_converged=0.0)
    assert not ctl.update()
    feed(opt.monitor, 3, trace_K=1e3, gns=1e3, stability_ratio=0.6, lr=0.45, hessian_converged=1.0)
    assert ctl.update() and ctl.lr_factor == pytest.approx(0.9 * 0.75 / 0.05)  # 13.5
    # Closer to the edge: the cap (10.125) falls below the factor in force, which is kept.
    feed(opt.monitor, 4, trace_K=1e3, gns=1e3, stability_ratio=1.2, lr=0.675, hessian_converged=1.0)
    assert not ctl.update() and ctl.lr_factor == pytest.approx(13.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.675)


def test_events_and_logger_records_at_each_change():
    log = Recorder()
    opt = make_opt(model_(), loggers=[log])
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=32, lr_rule="sqrt", micro_batch_size=2,
                              smoothing=0.0, edge_margin=None)
    ctl.update()
    feed(opt.monitor, 1, trace_K=10.0, gns=9.0, stability_ratio=0.1)
    ctl.update()
    events = [e for e in opt.monitor.events if e["event"].startswith("batch_size")]
    assert [e["event"] for e in events] == ["batch_size_start", "batch_size_change"]
    assert events[0] == {"event": "batch_size_start", "step": 0, "reason": "start", "batch_size": 4,
                         "accumulation_steps": 2, "lr_factor": 1.0, "lr": 0.05, "lr_rule": "sqrt",
                         "max_batch_size": 32}
    change = events[1]
    assert (change["step"], change["batch_size"], change["accumulation_steps"]) == (1, 8, 4)
    assert change["lr_factor"] == pytest.approx(math.sqrt(2)) and change["lr"] == pytest.approx(0.05 * math.sqrt(2))
    assert change["noise_scale"] == pytest.approx(9.0) and change["reason"] == "grow"
    sizes = [r for r in log.records if "batch_size" in r]
    assert [(r["step"], r["batch_size"], r["accumulation_steps"]) for r in sizes] == [(0, 4, 2), (1, 8, 4)]
    assert [e["event"] for e in log.events if e["event"].startswith("batch")] == ["batch_size_start",
                                                                                   "batch_size_change"]


def test_replica_noise_as_the_source():
    model = model_()
    opt = make_opt(model, measurements=("hessian",))
    noise = sgdbreak.ReplicaNoise(model, batch_size=4, accumulation_steps=2, beta=0.0)
    ctl = BatchSizeController(opt, batch_size=4, max_batch_size=64, lr_rule="linear", noise=noise,
                              edge_margin=None)
    x, y = data()
    feed(opt.monitor, 1, stability_ratio=0.1)  # break-even, but no noise record yet
    assert not ctl.update()
    for a in range(2):
        (nn.functional.cross_entropy(model(x[4 * a:4 * a + 4]), y[4 * a:4 * a + 4]) / 2).backward()
        noise.after_backward()
    feed(opt.monitor, 2, loss=1.0)
    ctl.update()
    gns = noise.latest["gns_replica"]
    assert ctl.noise_scale == gns
    want = 4
    while want * 2 <= min(gns, 64):
        want *= 2
    assert ctl.batch_size == want


def test_bad_input_is_refused_clearly():
    opt = make_opt(model_())
    for bad in (0, -3):
        with pytest.raises(ValueError, match=r"batch_size must be >= 1"):
            BreakEvenBatchSampler(N, opt, batch_size=bad, max_batch_size=8)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        BreakEvenBatchSampler(N, opt, batch_size=2.5, max_batch_size=8)
    with pytest.raises(ValueError, match=r"max_batch_size must be >= batch_size \(8\), got 4"):
        BreakEvenBatchSampler(N, opt, batch_size=8, max_batch_size=4)
    with pytest.raises(ValueError, match="lr_rule must be one of"):
        BreakEvenBatchSampler(N, opt, batch_size=8, max_batch_size=16, lr_rule="cubic")
    plain = torch.optim.SGD(model_().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="reads break-even and the noise scale from a monitor.*no BreakEvenMonitor"):
        BreakEvenBatchSampler(N, plain, batch_size=8, max_batch_size=16)
    with pytest.raises(ValueError, match="measures no gradient noise"):
        BreakEvenBatchSampler(N, make_opt(model_(), measurements=("hessian",)), batch_size=8, max_batch_size=16)
    with pytest.raises(TypeError, match="sampler must be"):
        BreakEvenBatchSampler(3.5, opt, batch_size=8, max_batch_size=16)
    with pytest.raises(TypeError, match="sampler must be"):
        BreakEvenBatchSampler(True, opt, batch_size=8, max_batch_size=16)
    with pytest.raises(ValueError, match="sampler \\(a dataset length\\) must be >= 1"):
        BreakEvenBatchSampler(0, opt, batch_size=8, max_batch_size=16)
    with pytest.raises(ValueError, match="edge_margin"):
        BreakEvenBatchSampler(N, opt, batch_size=8, max_batch_size=16, edge_margin=1.5)
    with pytest.raises(ValueError, match="multiple of the global micro-batch"):
        BatchSizeController(opt, batch_size=6, max_batch_size=16, micro_batch_size=4)


# --------------------------------------------------------------------------- epochs


@given(n=st.integers(1, 120), s0=st.integers(1, 9), drop_last=st.booleans(), use_sampler=st.booleans(),
       schedule=st.lists(st.integers(0, 3), min_size=1, max_size=40))
def test_every_example_exactly_once_per_epoch_whatever_the_sizes(n, s0, drop_last, use_sampler, schedule):
    opt = make_opt(model_())
    source = RandomSampler(range(n), generator=torch.Generator().manual_seed(n)) if use_sampler else n
    sampler = BreakEvenBatchSampler(source, opt, batch_size=s0, max_batch_size=8 * s0, drop_last=drop_last)
    ctl = sampler.controller
    k = 0
    for _ in range(3):
        seen, sizes = [], []
        for batch in sampler:
            seen += batch
            sizes.append((len(batch), ctl.batch_size))
            ctl.batch_size = s0 * 2 ** schedule[k % len(schedule)]  # the next batch's size changes
            k += 1
        assert len(seen) == len(set(seen)) and set(seen) <= set(range(n))
        if drop_last:
            assert n - len(seen) < ctl.batch_size  # only a tail smaller than the size in force is left
        else:
            assert sorted(seen) == list(range(n))
        assert all(got == want for got, want in sizes[:-1]) and all(got <= want for got, want in sizes)


def test_integer_sampler_draws_a_fresh_permutation_per_epoch_and_set_epoch_picks_one():
    opt = make_opt(model_())
    a = BreakEvenBatchSampler(20, opt, batch_size=20, max_batch_size=20, seed=5)
    first, second = next(iter(a)), next(iter(a))
    assert sorted(first) == sorted(second) == list(range(20)) and first != second
    assert first == torch.randperm(20, generator=torch.Generator().manual_seed(5)).tolist()
    a.set_epoch(0)
    assert next(iter(a)) == first
    plain = BreakEvenBatchSampler(10, opt, batch_size=4, max_batch_size=4, shuffle=False)
    assert list(plain) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] and len(plain) == 3


def test_breaking_out_continues_the_epoch_in_progress():
    opt = make_opt(model_())
    sampler = BreakEvenBatchSampler(10, opt, batch_size=3, max_batch_size=3, seed=1)
    it = iter(sampler)
    head = [next(it), next(it)]
    del it
    assert len(sampler) == 2  # 4 examples left: batches of 3 and 1
    rest = list(sampler)
    assert sorted(sum(head + rest, [])) == list(range(10)) and sampler.epoch == 1


# --------------------------------------------------------------------------- the whole loop


class Indexed(Dataset):
    """(x, y, index): lets the test see which examples each batch held."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i], i


def train(model, opt, sampler, steps, seen=None):
    x, y = data()
    loader = DataLoader(Indexed(x, y), batch_sampler=sampler)
    taken = 0
    while taken < steps:
        for xb, yb, idx in loader:
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            if seen is not None:
                ctl = sampler.controller
                seen.append((sampler.epoch, idx.tolist(), opt.param_groups[0]["lr"], ctl.batch_size,
                             ctl.lr_factor))
            taken += 1
            if taken == steps:
                break
    return seen


def build(seed=0):
    model = model_(seed)
    opt = make_opt(model, lr=0.05, measure_every=3)
    sampler = BreakEvenBatchSampler(N, opt, batch_size=4, max_batch_size=32, lr_rule="sqrt", seed=7)
    return model, opt, sampler


def test_dataloader_run_grows_the_batch_and_keeps_every_epoch_whole():
    model, opt, sampler = build()
    seen = train(model, opt, sampler, 14, [])
    sizes = [size for *_, size, _ in seen]
    assert sizes[0] == 4 and max(sizes) > 4, sizes  # grew after break-even (detected at step 3)
    assert opt.monitor.step == 14  # optimizer steps, whatever the batch size
    epochs = [e for e, *_ in seen]
    for epoch in set(epochs):
        got = sum((b for e, b, *_ in seen if e == epoch), [])
        assert len(got) == len(set(got))
        if epoch < epochs[-1]:
            assert sorted(got) == list(range(N))
    for _, batch, lr, size, factor in seen:
        assert len(batch) <= size and lr == pytest.approx(0.05 * factor)
        assert 1.0 <= factor <= math.sqrt(size / 4) + 1e-12
    changes = [e for e in opt.monitor.events if e["event"] == "batch_size_change"]
    assert changes and all(e["step"] >= opt.monitor.break_even.detected_at for e in changes)


def test_resume_from_state_dict_is_exact():
    model, opt, sampler = build()
    train(model, opt, sampler, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sampler": sampler.state_dict()}, buffer)
    want = train(model, opt, sampler, 8, [])
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    model2, opt2, sampler2 = build(seed=1)  # other initial weights: everything comes from the state
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    sampler2.load_state_dict(state["sampler"])
    got = train(model2, opt2, sampler2, 8, [])
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters()))
    assert opt2.monitor.events == opt.monitor.events
    assert sampler2.controller.state_dict() == sampler.controller.state_dict()
    with pytest.raises(ValueError, match="saved for length=96"):
        BreakEvenBatchSampler(50, opt2, batch_size=4, max_batch_size=32).load_state_dict(state["sampler"])
    with pytest.raises(ValueError, match="settings"):
        BreakEvenBatchSampler(N, opt2, batch_size=4, max_batch_size=64, seed=7).load_state_dict(state["sampler"])


def test_resume_with_a_torch_sampler_keeps_the_epoch_order():
    def make():
        model = model_()
        opt = make_opt(model, measure_every=2)
        source = RandomSampler(range(N), generator=torch.Generator().manual_seed(3))
        return model, opt, BreakEvenBatchSampler(source, opt, batch_size=4, max_batch_size=4)

    model, opt, sampler = make()
    train(model, opt, sampler, 5)
    state = sampler.state_dict()
    assert state["order"] is not None and state["position"] == 20
    rest = list(sampler)
    _, _, other = make()
    other.load_state_dict(state)
    assert list(other) == rest


def test_run_directory_figure_and_report_show_s_over_steps(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from sgdbreak import RunLog, read_run
    from sgdbreak.integrations.cli import main
    from sgdbreak.integrations.plots import plot_batch_size

    model = model_()
    with RunLog(tmp_path / "run", {"lr": 0.05}) as log:
        opt = make_opt(model, lr=0.05, measure_every=3, loggers=[log])
        sampler = BreakEvenBatchSampler(N, opt, batch_size=4, max_batch_size=32, lr_rule="sqrt", seed=7)
        train(model, opt, sampler, 8)
    run = read_run(tmp_path / "run")
    logged = [(r["step"], r["batch_size"], r["lr_factor"]) for r in run.records if "batch_size" in r]
    changes = [(e["step"], e["batch_size"], e["lr_factor"]) for e in run.events if e["event"].startswith("batch_size")]
    assert logged == changes and len(logged) >= 2 and logged[0] == (0, 4, 1.0)
    result = plot_batch_size(run, tmp_path / "batch", formats=("png",))
    line = result.figure.axes[0].get_lines()[0]
    np.testing.assert_array_equal(line.get_ydata(), [s for _, s, _ in logged] + [logged[-1][1]])
    assert line.get_xdata()[-1] == max(r["step"] for r in run.records)
    assert (tmp_path / "batch.png").exists()
    assert main(["report", str(tmp_path / "run"), "--formats", "png"]) == 0
    assert "batch-size figure" in capsys.readouterr().out and (tmp_path / "run" / "breakeven_batch.png").exists()
    with pytest.raises(ValueError, match="no batch_size records"):
        with RunLog(tmp_path / "empty") as log:
            log.log_measurement({"step": 1, "lambda1_H": 2.0})
        plot_batch_size(tmp_path / "empty")


def test_recipe_batch_size_policy_logs_the_controller_and_refuses_warmup(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "recipes" / "break_even.py"
    spec = importlib.util.spec_from_file_location("recipe_break_even_bs", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    argv = ["--dataset", "digits", "--num-examples", "200", "--batch-size", "8", "--max-steps", "3", "--lr", "0.5",
            "--measure-every", "50", "--cheap-every", "100", "--measure", "hessian", "noise", "--probe-fraction", "0.1",
            "--no-progress", "--batch-size-policy", "sqrt", "--output-dir", str(tmp_path)]
    assert recipe.main(argv) == 0
    run_dir = tmp_path / "lr_0.5"
    config = json.loads((run_dir / "config.json").read_text())
    events = [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (run_dir / "measurements.jsonl").read_text().splitlines()]
    assert config["batch_size_policy"] == "sqrt"
    start = next(e for e in events if e["event"] == "batch_size_start")
    assert (start["batch_size"], start["accumulation_steps"], start["max_batch_size"], start["lr_rule"]) == (
        8, 1, 128, "sqrt")
    assert {"step": 0, "batch_size": 8, "accumulation_steps": 1, "lr_factor": 1.0} in records
    assert max(r["step"] for r in records) == 3  # optimizer steps (the final accuracy record)
    with pytest.raises(SystemExit) as info:
        recipe.main([*argv[:-2], "--warmup", "auto", "--output-dir", str(tmp_path)])
    assert info.value.code == 2 and "--warmup none" in capsys.readouterr().err


# --------------------------------------------------------------------------- accumulation, one process


def _accumulation_run(epochs, state=None, save_after=None):
    """One process, micro-batch 4, S = 4·A: epochs of BreakEvenAccumulation under Accelerate."""
    import sys
    from pathlib import Path

    accelerate = pytest.importorskip("accelerate")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "distributed_scripts"))
    import batch_size_common as C

    from sgdbreak.integrations.accumulation import BreakEvenAccumulation

    accelerator = accelerate.Accelerator(cpu=True)
    model = C.mlp()
    opt = C.optimizer(model, Probe(model, C.CRITERION, C.data(C.PROBE, 1)), measure_every=4, hessian_tol=1e-4,
                      max_hvps=15)
    loader = DataLoader(C.Indexed(), batch_size=4, sampler=C.EpochPermutation(C.TRAIN))
    model, popt, loader = accelerator.prepare(model, opt, loader)
    accumulation = BreakEvenAccumulation(accelerator, popt, micro_batch_size=4, batch_size=4, max_batch_size=32,
                                         lr_rule="linear", micro_batches_per_epoch=len(loader))
    first = 0
    if state is not None:
        model.load_state_dict(state["model"])
        popt.load_state_dict(state["opt"])
        accumulation.load_state_dict(state["accumulation"])
        first = state["epoch"]
    steps, current, saved = [], [], None
    for epoch in range(first, epochs):
        loader.set_epoch(epoch)
        for x, y, idx in loader:
            with accumulation.accumulate(model):
                current += idx.tolist()
                accelerator.backward(C.CRITERION(model(x), y))
                popt.step()
                popt.zero_grad()
            if accelerator.sync_gradients:
                steps.append((current, accumulation.accumulation_steps, popt.param_groups[0]["lr"]))
                current = []
        if epoch + 1 == save_after:
            buffer = io.BytesIO()
            torch.save({"model": model.state_dict(), "opt": popt.state_dict(),
                        "accumulation": accumulation.state_dict(), "epoch": epoch + 1}, buffer)
            buffer.seek(0)
            saved = torch.load(buffer, weights_only=True)
    return steps, opt, [p.detach().clone() for p in model.parameters()], saved


def test_accumulation_on_one_process_counts_optimizer_steps_and_resumes_exactly():
    steps, opt, params, saved = _accumulation_run(2, save_after=1)
    assert opt.monitor.step == len(steps)  # optimizer steps, not micro-steps
    counts = [a for _, a, _ in steps]
    assert max(counts) > 1 and all(len(idx) == 4 * a for idx, a, _ in steps)
    changes = [e for e in opt.monitor.events if e["event"] == "batch_size_change"]
    assert changes and all(e["accumulation_steps"] * 4 == e["batch_size"] for e in changes)
    for e in changes:  # the linear rule, unless the edge held it back
        assert 1 <= e["lr_factor"] <= e["batch_size"] / 4 and e["lr"] == pytest.approx(0.1 * e["lr_factor"])
    assert {lr for *_, lr in steps} == {0.1} | {e["lr"] for e in changes}
    # Resume at the end of epoch 1 from state_dicts: the rest is identical.
    rest, opt2, params2, _ = _accumulation_run(2, state=saved)
    assert rest == steps[len(steps) - len(rest):]
    assert all(torch.equal(a, b) for a, b in zip(params, params2))
    assert opt2.monitor.events == opt.monitor.events
