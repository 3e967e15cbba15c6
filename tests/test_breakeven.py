"""Tests of sgdbreak.measurement.breakeven: stability formulas against simulation, the detector on streams."""

import copy
import dataclasses
import io
import itertools
import json
import math
import random
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from sgdbreak.measurement.breakeven import (
    BreakEvenDetector,
    eq1_lhs,
    stability_ratio,
    stability_threshold,
)

# --------------------------------------------------------------------------- formulas


def _simulate_torch_form(lr, lam, momentum, dampening, nesterov, weight_decay, steps):
    """|θ_T| of torch.optim.SGD's update on f(θ) = λθ²/2 from θ_0 = 1 (pure Python)."""
    theta, buf = 1.0, None
    for _ in range(steps):
        g = lam * theta + weight_decay * theta
        if momentum != 0.0:
            buf = g if buf is None else momentum * buf + (1.0 - dampening) * g
            d = g + momentum * buf if nesterov else buf
        else:
            d = g
        theta -= lr * d
        if abs(theta) > 1e12:
            break
    return abs(theta)


def test_threshold_known_values():
    assert stability_threshold() == 2.0
    assert stability_threshold(0.9) == pytest.approx(3.8)
    assert stability_threshold(0.9, dampening=0.9) == pytest.approx(38.0)
    assert stability_threshold(0.9, nesterov=True) == pytest.approx(3.8 / 2.8)
    assert stability_threshold(0.0, nesterov=True) == 2.0
    assert stability_threshold(0.0, dampening=0.5) == 2.0  # torch ignores it without momentum


@given(
    momentum=st.sampled_from([0.0, 0.3, 0.5, 0.9, 0.95]),
    dampening=st.sampled_from([0.0, 0.5, 0.9]),
    nesterov=st.booleans(),
    weight_decay=st.sampled_from([0.0, 0.5]),
    lam=st.floats(0.1, 100.0),
)
def test_threshold_is_the_edge_of_the_pytorch_recursion(
    momentum, dampening, nesterov, weight_decay, lam
):
    if nesterov:
        dampening = 0.0
    kwargs = dict(dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
    lr_edge = 1.0 / stability_ratio(1.0, lam, momentum, **kwargs)
    assert stability_ratio(lr_edge, lam, momentum, **kwargs) == pytest.approx(1.0)
    below = _simulate_torch_form(
        0.97 * lr_edge, lam, momentum, dampening, nesterov, weight_decay, 3000
    )
    above = _simulate_torch_form(
        1.03 * lr_edge, lam, momentum, dampening, nesterov, weight_decay, 3000
    )
    assert below < 1e-3
    assert above > 1e3


@pytest.mark.parametrize(
    "momentum, dampening, nesterov, weight_decay",
    [
        (0.0, 0.0, False, 0.0),
        (0.9, 0.0, False, 1e-1),
        (0.9, 0.5, False, 0.0),
        (0.9, 0.0, True, 0.2),
    ],
)
def test_threshold_matches_torch_optim_sgd(momentum, dampening, nesterov, weight_decay):
    lam = 4.0
    lr_edge = 1.0 / stability_ratio(
        1.0, lam, momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay
    )
    final = {}
    for factor in (0.97, 1.03):
        theta = torch.ones(1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.SGD(
            [theta],
            lr=factor * lr_edge,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            weight_decay=weight_decay,
        )
        for _ in range(1500):
            opt.zero_grad()
            (0.5 * lam * theta**2).sum().backward()
            opt.step()
        final[factor] = abs(theta.item())
    assert final[0.97] < 1e-3
    assert final[1.03] > 1e3


def test_stability_ratio_values():
    assert stability_ratio(0.1, 20.0) == pytest.approx(1.0)
    assert stability_ratio(0.1, 19.0, weight_decay=1.0) == pytest.approx(1.0)
    assert stability_ratio(0.1, 38.0, 0.9) == pytest.approx(1.0)
    assert stability_ratio(0.1, -4.0) == pytest.approx(-0.2)
    assert stability_ratio(0.0, 5.0) == 0.0


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda: stability_threshold(1.0), "momentum"),
        (lambda: stability_threshold(-0.1), "momentum"),
        (lambda: stability_threshold(0.5, dampening=1.0), "dampening"),
        (lambda: stability_threshold(0.5, dampening=0.1, nesterov=True), "nesterov"),
        (lambda: stability_threshold(float("nan")), "momentum"),
        (lambda: stability_ratio(-0.1, 1.0), "lr"),
        (lambda: stability_ratio(0.1, float("inf")), "lambda1_H"),
        (lambda: stability_ratio(0.1, 1.0, weight_decay=-1.0), "weight_decay"),
        (lambda: eq1_lhs(0.1, 1.0, -1.0, dataset_size=10, batch_size=2), "curvature_variance"),
        (lambda: eq1_lhs(0.1, 1.0, 1.0, dataset_size=1, batch_size=1), "dataset_size"),
        (lambda: eq1_lhs(0.1, 1.0, 1.0, dataset_size=10, batch_size=0), "batch_size"),
        (lambda: eq1_lhs(0.1, 1.0, 1.0, dataset_size=10, batch_size=11), "batch_size"),
        (lambda: eq1_lhs(-0.1, 1.0, 1.0, dataset_size=10, batch_size=2), "lr"),
    ],
)
def test_formula_bad_input(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_formula_bad_types():
    with pytest.raises(TypeError, match="dataset_size"):
        eq1_lhs(0.1, 1.0, 1.0, dataset_size=10.0, batch_size=2)
    with pytest.raises(TypeError, match="nesterov"):
        stability_threshold(0.5, nesterov=1)


def test_eq1_known_values():
    # Full batch: no noise term, edge at ηλ = 2 as for the stability ratio.
    assert eq1_lhs(0.1, 20.0, 5.0, dataset_size=50, batch_size=50) == pytest.approx(1.0)
    # S = 1: the noise term is s²η².
    assert eq1_lhs(0.1, 10.0, 4.0, dataset_size=50, batch_size=1) == pytest.approx(0.04)
    assert eq1_lhs(0.1, 10.0, 4.0, dataset_size=5, batch_size=2) == pytest.approx(
        0.04 * 3 / (2 * 4)
    )


@given(
    curvatures=st.lists(st.floats(-5.0, 20.0), min_size=2, max_size=7),
    lr=st.floats(0.0, 1.0),
    data=st.data(),
)
def test_eq1_is_the_exact_second_moment_factor(curvatures, lr, data):
    """E over all batches drawn without replacement of (1 − η·mean curvature)²."""
    n = len(curvatures)
    s = data.draw(st.integers(1, n))
    mean = sum(curvatures) / n
    variance = sum((h - mean) ** 2 for h in curvatures) / n
    batches = list(itertools.combinations(curvatures, s))
    expected = sum((1.0 - lr * sum(b) / s) ** 2 for b in batches) / len(batches)
    got = eq1_lhs(lr, mean, variance, dataset_size=n, batch_size=s)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


# --------------------------------------------------------------------------- helpers


def _feed(detector, records):
    """Feeds records, returns the list of firings per record."""
    return [detector.update(r) for r in records]


def _ema(values, smoothing):
    out, s = [], None
    for x in values:
        s = x if s is None else smoothing * s + (1.0 - smoothing) * x
        out.append(s)
    return out


def _bump(steps, peak_step, height, width, base=1.0, noise=0.0, seed=0):
    rng = random.Random(seed)
    return [
        (base + height * math.exp(-(((t - peak_step) / width) ** 2)))
        * (1.0 + noise * rng.uniform(-1, 1))
        for t in range(steps)
    ]


# --------------------------------------------------------------------------- threshold rules


RAMP = [0.2, 0.4, 0.6, 0.8, 0.95, 1.05, 1.2, 1.4, 1.6]  # crosses 1 at index 5


def test_stability_crossing_step():
    det = BreakEvenDetector(rules=("stability",))
    fired = _feed(det, [{"step": 10 * i, "stability_ratio": r} for i, r in enumerate(RAMP)])
    assert [len(f) for f in fired] == [0] * 5 + [1, 0, 0, 0]
    res = det.result
    assert (res.reached, res.step, res.detected_at, res.rule) == (True, 50, 50, "stability")
    assert res.evidence["stability"]["stability_ratio"] == 1.05
    assert res.evidence["stability"]["step"] == 50


def test_stability_confirm_delays_detection_not_step():
    det = BreakEvenDetector(rules=("stability",), confirm=3)
    _feed(det, [{"step": 10 * i, "stability_ratio": r} for i, r in enumerate(RAMP)])
    assert (det.result.step, det.result.detected_at) == (50, 70)


def test_one_record_spike_does_not_fire_with_confirm():
    values = [0.5, 0.6, 3.0, 0.6, 0.7, 1.1, 0.9, 1.2, 1.3, 1.1]
    det = BreakEvenDetector(rules=("stability",), confirm=2)
    fired = _feed(det, [{"step": i, "stability_ratio": v} for i, v in enumerate(values)])
    assert [i for i, f in enumerate(fired) if f] == [8]
    assert (det.result.step, det.result.detected_at) == (7, 8)


def test_run_counts_only_records_carrying_the_key():
    records = [
        {"step": 0, "stability_ratio": 1.5},
        {"step": 1, "loss": 2.0},
        {"step": 2, "stability_ratio": 1.5},
    ]
    det = BreakEvenDetector(rules=("stability",), confirm=2)
    _feed(det, records)
    assert (det.result.step, det.result.detected_at) == (0, 2)


def test_stability_keys_are_independent_and_earliest_start_wins():
    records = [
        {"step": 0, "stability_ratio_update": 1.2, "stability_ratio": 0.5},
        {"step": 1, "stability_ratio_update": 1.3, "stability_ratio": 1.1},
        {"step": 2, "stability_ratio_update": 1.3, "stability_ratio": 1.1},
    ]
    det = BreakEvenDetector(rules=("stability",), confirm=2)
    fired = _feed(det, records)
    assert fired[1][0].step == 0
    assert "stability_ratio_update" in det.result.evidence["stability"]
    assert fired[2] == []


def test_stability_threshold_parameter():
    det = BreakEvenDetector(rules=("stability",), stability_threshold=1.5)
    _feed(det, [{"step": 10 * i, "stability_ratio": r} for i, r in enumerate(RAMP)])
    assert det.result.step == 80


def test_eq1_crossing():
    values = [0.3, 0.9, 0.99, 1.01, 0.98, 1.02, 1.04]
    det = BreakEvenDetector(rules=("eq1",), confirm=2)
    _feed(
        det, [{"step": 5 * i, "eq1_lhs": v, "stability_ratio": 9.0} for i, v in enumerate(values)]
    )
    res = det.result
    assert (res.rule, res.step, res.detected_at) == ("eq1", 25, 30)
    assert res.evidence["eq1"]["eq1_lhs"] == 1.02
    assert set(res.evidence) == {"eq1"}  # stability disabled


def test_each_rule_fires_once():
    det = BreakEvenDetector(rules=("stability",))
    fired = _feed(det, [{"step": i, "stability_ratio": v} for i, v in enumerate([2.0, 0.1, 2.0])])
    assert [len(f) for f in fired] == [1, 0, 0]
    assert len(det.firings) == 1


# --------------------------------------------------------------------------- peak rule


def test_peak_clean_with_no_smoothing_is_exact():
    values = [1.0, 1.0, 2.0, 5.0, 9.0, 8.0, 7.5, 7.0, 6.0, 5.0, 4.0]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), smoothing=0.0, patience=2)
    fired = _feed(det, [{"step": 3 * i, "lambda1_H": v} for i, v in enumerate(values)])
    # 0.8 * 9 = 7.2: records 7.0 (index 7) and 6.0 (index 8) confirm.
    assert [i for i, f in enumerate(fired) if f] == [8]
    ev = det.result.evidence["peak_lambda1_H"]
    assert (det.result.rule, det.result.step, det.result.detected_at) == ("peak_lambda1_H", 12, 24)
    assert ev["smoothed_peak"] == 9.0 and ev["raw_max"] == 9.0 and ev["min_before_peak"] == 1.0


def test_peak_interrupted_drop_restarts_patience():
    values = [1.0, 10.0, 7.0, 7.0, 9.0, 7.0, 7.0, 7.0]  # 9.0 > 8.0 breaks the first drop
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), smoothing=0.0, patience=3)
    fired = _feed(det, [{"step": i, "lambda1_H": v} for i, v in enumerate(values)])
    assert [i for i, f in enumerate(fired) if f] == [7]
    assert det.result.step == 1


def test_peak_drop_boundary_counts_and_new_max_resets_patience():
    # 8.0 == 0.8 * 10 counts as dropped; the new max 20 restarts the count.
    values = [1.0, 10.0, 8.0, 8.0, 20.0, 15.0, 15.0, 16.0]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), smoothing=0.0, patience=3)
    fired = _feed(det, [{"step": i, "lambda1_H": v} for i, v in enumerate(values)])
    assert [i for i, f in enumerate(fired) if f] == [7]
    assert (det.result.step, det.result.detected_at) == (4, 7)


def test_peak_fires_once_per_key():
    values = [1.0, 10.0, 5.0, 1.0, 30.0, 5.0, 1.0]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), smoothing=0.0, patience=1)
    fired = _feed(det, [{"step": i, "lambda1_H": v} for i, v in enumerate(values)])
    assert [i for i, f in enumerate(fired) if f] == [2]


@given(
    peak_step=st.integers(30, 70),
    height=st.floats(5.0, 50.0),
    width=st.floats(4.0, 12.0),
    seed=st.integers(0, 10_000),
    patience=st.integers(1, 5),
    smoothing=st.sampled_from([0.0, 0.3, 0.5]),
)
def test_peak_with_noise(peak_step, height, width, seed, patience, smoothing):
    values = _bump(120, peak_step, height, width, noise=0.05, seed=seed)
    det = BreakEvenDetector(
        rules=("peak",), peak_keys=("lambda1_K",), patience=patience, smoothing=smoothing
    )
    fired = _feed(det, [{"step": t, "lambda1_K": v} for t, v in enumerate(values)])
    res = det.result
    assert res.reached and res.rule == "peak_lambda1_K"
    # Reference: argmax of the EMA, then the first run of `patience` records below 80 %.
    smooth = _ema(values, smoothing)
    top = max(range(len(smooth)), key=smooth.__getitem__)
    below = [t for t in range(top, len(smooth)) if smooth[t] <= 0.8 * smooth[top]]
    expected_detection = next(
        t for t in below if all(u in below for u in range(t - patience + 1, t + 1))
    )
    assert res.step == top
    assert res.detected_at == expected_detection
    assert [t for t, f in enumerate(fired) if f] == [expected_detection]
    # The smoothed peak lags the true one by at most the EMA lag plus noise.
    assert peak_step - 2 <= res.step <= peak_step + 3
    assert res.detected_at - res.step >= patience
    ev = res.evidence["peak_lambda1_K"]
    assert ev["smoothed_peak"] == pytest.approx(smooth[top])
    assert ev["raw_max"] == pytest.approx(max(values[: expected_detection + 1]))
    assert ev["detected_at"] == res.detected_at


def test_initial_decay_is_not_a_peak():
    values = [10.0 * 0.8**t + 1.0 for t in range(60)]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",))
    _feed(det, [{"step": t, "lambda1_H": v} for t, v in enumerate(values)])
    assert not det.result.reached


def test_peak_after_initial_decay_lower_than_start_is_found():
    decay = [20.0 * 0.7**t + 1.0 for t in range(20)]  # from 21 down to ~1
    bump = _bump(60, 25, 6.0, 5.0)  # up to 7, below the starting 21
    values = decay + bump
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), smoothing=0.0)
    _feed(det, [{"step": t, "lambda1_H": v} for t, v in enumerate(values)])
    assert det.result.step == 20 + 25
    assert det.result.evidence["peak_lambda1_H"]["min_before_peak"] < 1.1


def test_min_rise_filters_small_bumps():
    values = _bump(60, 20, 0.5, 4.0)  # 1 → 1.5 → 1
    records = [{"step": t, "lambda1_H": v} for t, v in enumerate(values)]
    strict = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_H",), peak_drop=0.1)
    _feed(strict, records)
    assert not strict.result.reached
    loose = BreakEvenDetector(
        rules=("peak",), peak_keys=("lambda1_H",), peak_drop=0.1, min_rise=1.2
    )
    _feed(loose, records)
    assert loose.result.reached


def test_peak_survives_crash_below_earlier_minimum():
    values = [1.0, 1.0, 5.0, 0.2, 0.1, 0.1, 0.1]
    det = BreakEvenDetector(rules=("peak",), peak_keys=("lambda1_K",), smoothing=0.0)
    _feed(det, [{"step": t, "lambda1_K": v} for t, v in enumerate(values)])
    assert (det.result.step, det.result.detected_at) == (2, 5)


def test_both_peak_keys_and_later_firings_are_recorded():
    h = _bump(80, 30, 10.0, 6.0)
    k = _bump(80, 40, 10.0, 6.0)
    det = BreakEvenDetector(rules=("peak",))
    _feed(
        det,
        [
            {"step": t, "lambda1_H": a, "lambda1_K": b}
            for t, (a, b) in enumerate(zip(h, k, strict=True))
        ],
    )
    res = det.result
    assert res.rule == "peak_lambda1_H"
    assert set(res.evidence) == {"peak_lambda1_H", "peak_lambda1_K"}
    assert res.evidence["peak_lambda1_K"]["step"] > res.step
    assert [f.rule for f in det.firings] == ["peak_lambda1_H", "peak_lambda1_K"]


def test_same_record_firings_earliest_step_wins():
    values = [1.0, 5.0, 10.0, 7.0, 6.0, 5.0]
    ratios = [0.1, 0.1, 0.1, 0.1, 0.1, 1.5]
    records = [
        {"step": t, "lambda1_H": v, "stability_ratio": r}
        for t, (v, r) in enumerate(zip(values, ratios, strict=True))
    ]
    det = BreakEvenDetector(rules=("stability", "peak"), peak_keys=("lambda1_H",), smoothing=0.0)
    fired = _feed(det, records)
    assert [f.rule for f in fired[5]] == ["peak_lambda1_H", "stability"]
    res = det.result
    assert (res.rule, res.step, res.detected_at) == ("peak_lambda1_H", 2, 5)


def test_result_is_frozen_and_gives_the_event():
    det = BreakEvenDetector(rules=("stability",))
    assert det.result == det.result
    assert not det.result.reached and det.result.step is None
    det.update({"step": 3, "stability_ratio": 1.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        det.result.step = 4
    event = det.result.to_event()
    assert event["event"] == "break_even" and event["step"] == 3 and event["rule"] == "stability"
    json.dumps(event)
    det.result.evidence["stability"]["step"] = 99  # a snapshot: does not touch the detector
    assert det.result.evidence["stability"]["step"] == 3


# --------------------------------------------------------------------------- bad values


def test_nonfinite_values_are_skipped_and_warned_once():
    values = [1.0, 1.0, 2.0, 4.0, 8.0, 10.0, 8.0, 6.0, 5.0, 4.0, 3.0, 2.0]
    clean = [{"step": t, "lambda1_H": v, "stability_ratio": v / 8} for t, v in enumerate(values)]
    dirty = copy.deepcopy(clean)
    bad_steps = {2: math.nan, 5: math.inf, 7: -math.inf, 9: math.nan}
    for t, bad in bad_steps.items():
        dirty.insert(
            dirty.index(next(r for r in dirty if r["step"] == t)) + 1,
            {"step": t, "lambda1_H": bad, "stability_ratio": bad},
        )
    config = dict(rules=("stability", "peak"), confirm=2, peak_keys=("lambda1_H",))
    ref = BreakEvenDetector(**config)
    ref_fired = _feed(ref, clean)
    det = BreakEvenDetector(**config)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dirty_fired = _feed(det, dirty)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 2
    assert any("lambda1_H" in m for m in messages) and any("stability_ratio" in m for m in messages)
    assert det.nonfinite_counts == {"lambda1_H": 4, "stability_ratio": 4}
    assert det.result == ref.result
    assert [f for f in dirty_fired if f] == [f for f in ref_fired if f]
    ref_state, det_state = ref.state_dict(), det.state_dict()
    ref_state.pop("nonfinite"), det_state.pop("nonfinite")
    assert det_state == ref_state


def test_nonfinite_neither_breaks_nor_advances_a_run():
    det = BreakEvenDetector(rules=("stability",), confirm=3)
    with pytest.warns(RuntimeWarning, match="stability_ratio"):
        fired = _feed(
            det,
            [{"step": t, "stability_ratio": v} for t, v in enumerate([1.2, math.nan, 1.2, 1.2])],
        )
    assert [bool(f) for f in fired] == [False, False, False, True]
    assert det.result.step == 0


def test_out_of_order_steps_are_rejected_without_changing_state():
    det = BreakEvenDetector(rules=("stability",), confirm=2)
    det.update({"step": 10, "stability_ratio": 1.5})
    before = det.state_dict()
    with pytest.raises(ValueError, match="out-of-order"):
        det.update({"step": 9, "stability_ratio": 1.5})
    assert det.state_dict() == before
    det.update({"step": 10, "stability_ratio": 1.5})  # equal steps are allowed
    assert (det.result.step, det.result.detected_at) == (10, 10)


@pytest.mark.parametrize(
    "record, error, match",
    [
        ({"stability_ratio": 1.0}, ValueError, "step"),
        ({"step": 1.5}, ValueError, "step"),
        ({"step": math.nan}, ValueError, "step"),
        ({"step": "3"}, ValueError, "step"),
        ({"step": 1, "stability_ratio": "1.0"}, TypeError, "stability_ratio"),
        ({"step": 1, "lambda1_H": None}, TypeError, "lambda1_H"),
    ],
)
def test_bad_records(record, error, match):
    det = BreakEvenDetector()
    before = det.state_dict()
    with pytest.raises(error, match=match):
        det.update(record)
    assert det.state_dict() == before


def test_float_integral_step_and_ignored_keys():
    det = BreakEvenDetector(rules=("eq1",))
    det.update({"step": 4.0, "eq1_lhs": 1.0, "loss": "not read", "stability_ratio": "ignored"})
    assert det.result.step == 4 and isinstance(det.result.step, int)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(rules=("stability", "bogus")), "bogus"),
        (dict(rules=()), "rules"),
        (dict(stability_keys=()), "stability_keys"),
        (dict(peak_keys=("lambda1_H", "lambda1_H")), "peak_keys"),
        (dict(stability_threshold=0.0), "stability_threshold"),
        (dict(stability_threshold=math.inf), "stability_threshold"),
        (dict(eq1_threshold=-1.0), "eq1_threshold"),
        (dict(confirm=0), "confirm"),
        (dict(patience=0), "patience"),
        (dict(peak_drop=0.0), "peak_drop"),
        (dict(peak_drop=1.0), "peak_drop"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(smoothing=-0.1), "smoothing"),
        (dict(min_rise=0.5), "min_rise"),
        (dict(min_rise=math.nan), "min_rise"),
    ],
)
def test_bad_config(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BreakEvenDetector(**kwargs)


def test_bad_config_types():
    with pytest.raises(TypeError, match="confirm"):
        BreakEvenDetector(confirm=2.0)
    with pytest.raises(TypeError, match="patience"):
        BreakEvenDetector(patience=True)


def test_single_string_rule_and_rule_names():
    det = BreakEvenDetector(rules="peak", peak_keys="lambda1_K")
    assert det.rule_names == ("peak_lambda1_K",)
    assert BreakEvenDetector().rule_names == (
        "stability",
        "eq1",
        "peak_lambda1_H",
        "peak_lambda1_K",
    )


def test_detector_module_imports_only_the_standard_library():
    import ast

    import sgdbreak.measurement.breakeven

    tree = ast.parse(open(sgdbreak.measurement.breakeven.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    assert roots <= set(sys.stdlib_module_names), roots - set(sys.stdlib_module_names)


# --------------------------------------------------------------------------- checkpointing

_finite = st.floats(0.0, 2.0)
_value = st.one_of(_finite, _finite, _finite, st.sampled_from([math.nan, math.inf]))
_record = st.fixed_dictionaries(
    {"dstep": st.integers(0, 3)},
    optional={
        "stability_ratio": _value,
        "stability_ratio_update": _value,
        "eq1_lhs": _value,
        "lambda1_H": st.one_of(st.floats(0.1, 10.0), st.just(math.nan)),
        "lambda1_K": st.floats(0.1, 10.0),
    },
)
_config = st.fixed_dictionaries(
    {
        "confirm": st.integers(1, 3),
        "patience": st.integers(1, 3),
        "smoothing": st.sampled_from([0.0, 0.5, 0.8]),
        "peak_drop": st.sampled_from([0.1, 0.2, 0.5]),
        "min_rise": st.sampled_from([1.0, 1.5, 2.0]),
        "stability_threshold": st.sampled_from([1.0, 1.5]),
        "eq1_threshold": st.sampled_from([1.0, 1.8]),
    }
)


def _records(raw):
    out, step = [], 0
    for r in raw:
        step += r["dstep"]
        rec = {k: v for k, v in r.items() if k != "dstep"}
        rec["step"] = step
        out.append(rec)
    return out


@given(raw=st.lists(_record, min_size=1, max_size=40), config=_config, data=st.data())
def test_state_dict_round_trip_mid_stream(raw, config, data):
    records = _records(raw)
    split = data.draw(st.integers(0, len(records)))
    with_json = data.draw(st.booleans())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = BreakEvenDetector(**config)
        whole_fired = _feed(whole, records)

        first = BreakEvenDetector(**config)
        resumed_fired = _feed(first, records[:split])
        state = first.state_dict()
        state = json.loads(json.dumps(state)) if with_json else copy.deepcopy(state)
        second = BreakEvenDetector(**config)
        second.load_state_dict(state)
        resumed_fired += _feed(second, records[split:])
    assert resumed_fired == whole_fired
    assert second.result == whole.result
    assert second.state_dict() == whole.state_dict()
    assert second.nonfinite_counts == whole.nonfinite_counts


def test_state_dict_round_trip_at_every_split():
    h = _bump(60, 25, 8.0, 5.0, noise=0.05, seed=1)
    k = _bump(60, 30, 8.0, 5.0, noise=0.05, seed=2)
    records = [
        {"step": 2 * t, "lambda1_H": a, "lambda1_K": b, "stability_ratio": a / 6, "eq1_lhs": b / 7}
        for t, (a, b) in enumerate(zip(h, k, strict=True))
    ]
    config = dict(confirm=2, patience=3)
    whole = BreakEvenDetector(**config)
    whole_fired = _feed(whole, records)
    assert len(whole.firings) == 4
    for split in range(len(records) + 1):
        first = BreakEvenDetector(**config)
        fired = _feed(first, records[:split])
        second = BreakEvenDetector(**config)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        fired += _feed(second, records[split:])
        assert fired == whole_fired, split
        assert second.result == whole.result


def test_state_dict_loads_with_torch_weights_only():
    det = BreakEvenDetector(confirm=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        _feed(
            det,
            [
                {"step": t, "stability_ratio": v, "lambda1_H": math.nan}
                for t, v in enumerate([0.5, 1.2, 1.3, 0.2])
            ],
        )
    assert det.result.reached
    buffer = io.BytesIO()
    torch.save(det.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = BreakEvenDetector(confirm=2)
    other.load_state_dict(state)
    assert other.result == det.result and other.nonfinite_counts == {"lambda1_H": 4}


def test_state_dict_is_a_copy():
    det = BreakEvenDetector(rules=("stability",), confirm=2)
    det.update({"step": 0, "stability_ratio": 1.5})
    state = det.state_dict()
    state["runs"]["stability"]["stability_ratio"]["run"] = 0
    det.update({"step": 1, "stability_ratio": 1.5})
    assert det.result.step == 0


def test_load_state_dict_rejects_mismatch_and_garbage():
    det = BreakEvenDetector(confirm=2)
    det.update({"step": 0, "stability_ratio": 1.5})
    state = det.state_dict()
    fresh = BreakEvenDetector(confirm=3)
    with pytest.raises(ValueError, match="confirm"):
        fresh.load_state_dict(state)
    broken = copy.deepcopy(state)
    del broken["peaks"]["lambda1_H"]
    target = BreakEvenDetector(confirm=2)
    before = target.state_dict()
    with pytest.raises(ValueError, match="malformed"):
        target.load_state_dict(broken)
    with pytest.raises(ValueError, match="version"):
        target.load_state_dict({**state, "version": 99})
    assert target.state_dict() == before
