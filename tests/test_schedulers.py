import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from letkit import ConstantWeight, CosineDecay, ExponentialDecay, LinearDecay, StepDecay
from letkit.schedulers import SCHEDULES


def make(name, lambda0=0.5, stop_step=100, **kw):
    if name == "step":
        kw.setdefault("step_size", 10)
    return SCHEDULES[name](lambda0, stop_step, **kw)


def test_linear_is_the_papers_formula():
    s = LinearDecay(0.1, stop_step=1000)
    for step in [0, 1, 250, 999, 1000, 5000]:
        assert s(step) == pytest.approx(0.1 * max(0, (1000 - step) / 1000))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_boundaries(name):
    s = make(name)
    assert s(0) == pytest.approx(0.5)
    assert s(99) > 0
    assert s(100) == 0.0 and s(10**6) == 0.0
    assert not s.is_done(99) and s.is_done(100)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_warmup_and_hold(name):
    s = make(name, warmup_steps=10, hold_steps=5)
    assert s(0) == 0.0
    assert s(5) == pytest.approx(0.25)
    assert s(10) == pytest.approx(0.5) and s(14) == pytest.approx(0.5)
    if name == "constant":
        assert s(50) == 0.5 and s(99) == 0.5 and s(100) == 0.0
    else:
        assert 0 < s(50) < 0.5 and s(100) == 0.0


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(list(SCHEDULES)), stop=st.integers(2, 500), warmup_frac=st.floats(0, 0.5), hold_frac=st.floats(0, 0.4))
def test_monotone_after_warmup(name, stop, warmup_frac, hold_frac):
    warmup, hold = int(warmup_frac * stop), int(hold_frac * stop)
    s = make(name, stop_step=stop, warmup_steps=warmup, hold_steps=hold)
    values = [s(i) for i in range(stop + 3)]
    up = values[: warmup + 1]
    down = values[warmup:]
    assert all(a <= b + 1e-12 for a, b in zip(up, up[1:]))
    assert all(a >= b - 1e-12 for a, b in zip(down, down[1:]))
    assert all(0 <= v <= 0.5 + 1e-12 for v in values)


def test_constant_weight_is_constant_until_stop():
    s = ConstantWeight(0.7, stop_step=5, warmup_steps=2)
    assert [s(i) for i in range(7)] == pytest.approx([0.0, 0.35, 0.7, 0.7, 0.7, 0.0, 0.0])
    assert not s.is_done(4) and s.is_done(5)


def test_specific_shapes():
    assert CosineDecay(1.0, 100)(50) == pytest.approx(0.5)
    assert StepDecay(1.0, 100, step_size=25, gamma=0.5)(60) == pytest.approx(0.25)
    assert ExponentialDecay(1.0, 100, final_ratio=0.01)(50) == pytest.approx(0.1)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_state_dict_round_trip_mid_run(name):
    s = make(name, warmup_steps=3)
    for _ in range(37):
        s.step()
    restored = make(name, warmup_steps=3)
    restored.load_state_dict(s.state_dict())
    future = []
    for _ in range(80):
        future.append((s(), restored(), s.is_done(), restored.is_done()))
        s.step()
        restored.step()
    assert all(a == b and c == d for a, b, c, d in future)
    assert restored.current_step == 117 and future[0][0] == make(name, warmup_steps=3)(37)


def test_load_state_dict_rejects_unknown_keys_and_changed_hyperparameters():
    with pytest.raises(ValueError, match="does not know.*'gamma'"):
        LinearDecay(1.0, 10).load_state_dict({"gamma": 0.5})
    saved = LinearDecay(1.0, 10).state_dict()
    with pytest.raises(ValueError, match="different hyperparameters \\(stop_step: saved 10 vs 20\\)"):
        LinearDecay(1.0, 20).load_state_dict(saved)


@settings(max_examples=200, deadline=None)
@given(stop=st.integers(2, 400), step_size=st.integers(1, 400), hold=st.integers(0, 50), data=st.data())
def test_step_decay_drops_exactly_every_step_size_steps(stop, step_size, hold, data):
    hold = min(hold, stop - 1)
    step = data.draw(st.integers(hold, stop - 1))
    s = StepDecay(1.0, stop, step_size=step_size, gamma=0.5, hold_steps=hold)
    assert s(step) == 0.5 ** ((step - hold) // step_size)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lambda0=0.1, stop_step=0), "stop_step must be >= 1, got 0"),
        (dict(lambda0=0.1, stop_step=-5), "stop_step must be >= 1, got -5"),
        (dict(lambda0=-0.1, stop_step=10), "lambda0 must be finite and >= 0, got -0.1"),
        (dict(lambda0=math.nan, stop_step=10), "lambda0 must be finite"),
        (dict(lambda0=0.1, stop_step=10, warmup_steps=12), r"warmup_steps \+ hold_steps must be shorter than stop_step: 12 \+ 0 >= 10"),
        (dict(lambda0=0.1, stop_step=10, warmup_steps=5, hold_steps=5), "5 \\+ 5 >= 10"),
        (dict(lambda0=0.1, stop_step=10, warmup_steps=-1), "must be >= 0, got -1"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LinearDecay(**kwargs)


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lambda0=math.nan), ValueError, "lambda0 must be finite and >= 0, got nan"),
        (dict(lambda0=-0.5), ValueError, "lambda0 must be finite and >= 0, got -0.5"),
        (dict(lambda0="0.5"), TypeError, "lambda0 must be a float, got str"),
        (dict(stop_step=100.0), TypeError, r"stop_step must be an int, got float \(100.0\)"),
        (dict(stop_step=-3), ValueError, "stop_step must be >= 1, got -3"),
        (dict(warmup_steps=math.nan), TypeError, r"warmup_steps must be an int, got float \(nan\)"),
        (dict(hold_steps=-1), ValueError, "hold_steps must be >= 0, got -1"),
    ],
)
def test_every_schedule_validates_its_arguments(name, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(name, **kwargs)


def test_bad_types_and_steps():
    with pytest.raises(TypeError, match="stop_step must be an int, got float"):
        LinearDecay(0.1, 10.0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        LinearDecay(0.1, 10)(-1)
    with pytest.raises(ValueError, match="step_size must be >= 1, got 0"):
        StepDecay(0.1, 10, step_size=0)
    with pytest.raises(ValueError, match="final_ratio must be in"):
        ExponentialDecay(0.1, 10, final_ratio=0.0)


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: LinearDecay(0.1, 10, warmup_steps=math.nan), r"warmup_steps must be an int, got float \(nan\)"),
        (lambda: LinearDecay(0.1, 10, hold_steps=2.5), r"hold_steps must be an int, got float \(2.5\)"),
        (lambda: StepDecay(0.1, 10, step_size=math.nan), r"step_size must be an int, got float \(nan\)"),
        (lambda: LinearDecay(0.1, 10)(math.nan), r"step must be an int, got float \(nan\)"),
        (lambda: LinearDecay(0.1, 10)(4.0), r"step must be an int, got float \(4.0\)"),
        (lambda: LinearDecay(0.1, 10).is_done(math.nan), r"step must be an int, got float \(nan\)"),
        (lambda: LinearDecay("0.1", 10), r"lambda0 must be a float, got str"),
    ],
)
def test_nan_and_non_integer_steps_are_refused(build, match):
    with pytest.raises(TypeError, match=match):
        build()


def test_integer_steps_of_other_types_are_accepted():
    numpy = pytest.importorskip("numpy")
    import torch

    s = LinearDecay(0.5, 10, warmup_steps=numpy.int64(2))
    assert s(numpy.int64(6)) == s(torch.tensor(6)) == s(6) == pytest.approx(0.25)


def test_negative_current_step_is_refused():
    s = LinearDecay(0.1, 10)
    with pytest.raises(ValueError, match="current_step must be >= 0, got -1"):
        s.current_step = -1
    with pytest.raises(ValueError, match="current_step must be >= 0, got -3"):
        s.load_state_dict({**s.state_dict(), "current_step": -3})
    with pytest.raises(TypeError, match=r"current_step must be an int, got float \(nan\)"):
        s.current_step = math.nan
    assert s.current_step == 0 and s() == pytest.approx(0.1)


def test_a_state_loads_only_into_the_same_schedule_class():
    linear = LinearDecay(0.1, 10)
    linear.step()
    with pytest.raises(ValueError, match="the saved state is of a LinearDecay, not of this CosineDecay"):
        CosineDecay(0.1, 10).load_state_dict(linear.state_dict())
    restored = LinearDecay(0.1, 10)
    restored.load_state_dict(linear.state_dict())
    assert restored.current_step == 1
    legacy = {k: v for k, v in linear.state_dict().items() if k != "schedule"}  # saved before the name was recorded
    restored.load_state_dict(legacy)
    assert restored.current_step == 1
