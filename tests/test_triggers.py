"""Measurement triggers: which steps fire, adaptation, state, bad input."""

import pytest

from sgdbreak.measurement.triggers import (
    Adaptive,
    DenseUntilBreakEven,
    Every,
    LogSpaced,
    PerEpoch,
    as_trigger,
)


def fired(trigger, n=100):
    return [s for s in range(n + 1) if trigger(s)]


def test_every_and_offset():
    assert fired(Every(10), 35) == [0, 10, 20, 30]
    assert fired(Every(10, offset=5), 35) == [5, 15, 25, 35]


def test_log_spaced_is_dense_early_and_sparse_late():
    # floor(4 log10 s) increases: 4 steps a decade.
    assert fired(LogSpaced(4), 1000) == [1, 2, 4, 6, 10, 18, 32, 57, 100, 178, 317, 563, 1000]
    assert fired(LogSpaced(1, start=5), 600) == [5, 50, 500]


def test_per_epoch():
    assert fired(PerEpoch(10), 30) == [10, 20, 30]
    assert fired(PerEpoch(10, times=2), 20) == [5, 10, 15, 20]


def test_adaptive_shrinks_while_moving_and_grows_when_settled():
    trig = Adaptive(first=1, min_every=10, max_every=80, factor=2.0, change=0.25)
    assert not trig(0) and trig(1)  # fires from next_step on until a measurement is observed
    trig.observe({"step": 1, "lambda1_H": 1.0})
    assert trig.next_step == 11
    trig.observe({"step": 11, "lambda1_H": 1.01})  # settled: interval doubles
    assert trig.next_step == 11 + 20
    trig.observe({"step": 31, "lambda1_H": 2.0})  # moved by 100 %: interval halves
    assert trig.next_step == 31 + 10
    for step in (41, 61, 101, 181):
        trig.observe({"step": step, "lambda1_H": 2.0})
    assert trig.interval == 80  # capped at max_every


def test_adaptive_alarm_brings_measurement_forward_until_break_even():
    trig = Adaptive(min_every=10, max_every=1000)
    trig.observe({"step": 1, "lambda1_H": 1.0})
    trig.observe({"step": 11, "lambda1_H": 1.0})
    trig.observe({"step": 31, "lambda1_H": 1.0})
    assert trig.next_step == 71
    trig.observe({"step": 35, "stability_ratio_update": 0.7})
    assert trig.next_step == 45
    trig.observe({"step": 45, "lambda1_H": 1.0}, break_even_reached=True)
    interval = trig.interval
    trig.observe({"step": 50, "stability_ratio_update": 3.0})
    assert trig.next_step > 50 + 10  # no alarm after break-even
    trig.observe({"step": trig.next_step, "lambda1_H": 10.0})  # a jump no longer shrinks it
    assert trig.interval == min(1000, interval * trig.settled_factor) == 640


def test_dense_until_break_even_thins_out_after_detection_and_resumes():
    trig = DenseUntilBreakEven(every=10, after=50)
    assert fired(trig, 60) == [10, 20, 30, 40, 50, 60]
    trig.observe({"step": 60, "lambda1_H": 1.0})
    assert trig(70)
    trig.observe({"step": 70}, break_even_reached=True)
    assert fired(trig, 200)[-3:] == [100, 150, 200] and not trig(110)
    trig.observe({"step": 80}, break_even_reached=False)  # stays settled
    assert not trig(110)
    resumed = DenseUntilBreakEven(every=10, after=50)
    resumed.load_state_dict(trig.state_dict())
    assert fired(resumed, 300) == fired(trig, 300)
    for bad in ({"every": 0}, {"after": -5}):
        with pytest.raises(ValueError):
            DenseUntilBreakEven(**bad)
    with pytest.raises(ValueError, match="settled_factor"):
        Adaptive(settled_factor=1.0)


def test_adaptive_state_round_trip():
    a = Adaptive()
    for step, value in [(1, 1.0), (11, 3.0), (16, 3.1)]:
        a.observe({"step": step, "lambda1_H": value})
    b = Adaptive()
    b.load_state_dict(a.state_dict())
    assert fired(a, 300) == fired(b, 300)


@pytest.mark.parametrize("bad", [0, -1])
def test_as_trigger_rejects_non_positive(bad):
    with pytest.raises(ValueError, match="measure_every"):
        as_trigger(bad)


def test_as_trigger_types():
    assert as_trigger(None) is None
    assert fired(as_trigger(5), 10) == [0, 5, 10]
    with pytest.raises(TypeError):
        as_trigger(True)
    with pytest.raises(TypeError):
        as_trigger("often")


@pytest.mark.parametrize("kwargs", [dict(min_every=0), dict(min_every=10, max_every=5), dict(factor=1.0),
                                    dict(change=0)])
def test_adaptive_bad_config(kwargs):
    with pytest.raises(ValueError):
        Adaptive(**kwargs)


def test_adaptive_follows_the_preconditioned_sharpness_when_no_lambda1_H_is_measured():
    trig = Adaptive(min_every=10)
    trig.observe({"step": 1, "lambda1_PH": 100.0})
    assert not trig(5) and trig(11)
    only_h = Adaptive(min_every=10, key="lambda1_H")
    only_h.observe({"step": 1, "lambda1_PH": 100.0})
    assert only_h(5)  # that key never appears: it keeps firing
