import re

import pytest

from letkit import LayerMap
from letkit.layer_map import STRATEGIES


@pytest.mark.parametrize(
    "strategy, want",
    [("L2E", (11, 0)), ("L2M", (11, 12)), ("L2L", (11, 23)), ("M2E", (6, 0)), ("M2M", (6, 12)), ("M2L", (6, 23))],
)
def test_strategies(strategy, want):
    assert LayerMap(strategy).resolve(12, 24) == [want]


def test_all_strategies_covered():
    assert set(STRATEGIES) == {"L2E", "L2M", "L2L", "M2E", "M2M", "M2L"}


def test_explicit_fractional_and_several_pairs():
    layer_map = LayerMap(["L2E", (-1, 3), (0, -2), 0.25, (0.5, 1.0)], early=0.1)
    assert layer_map.resolve(12, 24) == [(11, 2), (11, 3), (0, 22), (11, 6), (6, 23)]


def test_errors():
    with pytest.raises(ValueError, match="unknown layer mapping strategy 'L2X'; valid: L2E, L2M"):
        LayerMap("L2X")
    with pytest.raises(ValueError, match=r"target layer index 30 is out of range for 24 layers \(valid: -24 .. 23\)"):
        LayerMap([(0, 30)]).resolve(12, 24)
    with pytest.raises(ValueError, match="teacher layer index -13"):
        LayerMap([(-13, 0)]).resolve(12, 24)
    with pytest.raises(ValueError, match="fractional depth must be in"):
        LayerMap(1.5).resolve(12, 24)
    with pytest.raises(ValueError, match="early must be a fractional depth"):
        LayerMap("L2E", early=2.0)
    with pytest.raises(TypeError, match="a layer mapping spec must be"):
        LayerMap([[0, 1]])
    with pytest.raises(ValueError, match="at least one"):
        LayerMap([])


def test_misread_specs_get_clear_errors():
    # a tuple is one (teacher, target) pair: several strategies go in a list
    with pytest.raises(TypeError, match=r"LayerMap spec \('L2E', 'L2M'\) is a tuple, .* pass a list: \['L2E', 'L2M'\]"):
        LayerMap(("L2E", "L2M"))
    assert LayerMap(["L2E", "L2M"]).resolve(12, 24) == [(11, 0), (11, 12)]
    # a bare int says which forms are accepted and how to write a target block index
    with pytest.raises(TypeError, match=r"LayerMap spec must be a strategy name .* got 3 \(.* pass the pair \(-1, 3\)\)"):
        LayerMap(3)
    assert LayerMap((-1, 3)).resolve(12, 24) == [(11, 3)]
    with pytest.raises(TypeError, match=r"a layer mapping spec must be .* got 5 \(.* pass the pair \(-1, 5\)\)"):
        LayerMap(["L2E", 5])
    with pytest.raises(TypeError, match="LayerMap spec must be .* got None"):
        LayerMap(None)
    for bad_pair in [("L2E", 3), (0, 1, 2), (True, 0)]:  # checked when built, not only when resolved
        with pytest.raises(TypeError, match=f"a layer mapping spec must be .* got {re.escape(repr(bad_pair))}"):
            LayerMap(bad_pair)
