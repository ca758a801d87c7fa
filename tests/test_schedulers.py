import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from letkit import CosineDecay, ExponentialDecay, LinearDecay, StepDecay
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
        (dict(lambda0=0.1, stop_step=0), "stop_step .* must be positive, got 0"),
        (dict(lambda0=0.1, stop_step=-5), "must be positive, got -5"),
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


def test_bad_types_and_steps():
    with pytest.raises(TypeError, match="stop_step must be an int, got float"):
        LinearDecay(0.1, 10.0)
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        LinearDecay(0.1, 10)(-1)
    with pytest.raises(ValueError, match="step_size must be positive"):
        StepDecay(0.1, 10, step_size=0)
    with pytest.raises(ValueError, match="final_ratio must be in"):
        ExponentialDecay(0.1, 10, final_ratio=0.0)
