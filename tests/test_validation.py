"""letkit.validation.check_int, and the arguments across letkit that take a count or a size through it."""

import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from letkit import LayerMap, LayerMappingProjector, LinearDecay, StepDecay, logit_distillation_loss
from letkit.data import WindowPermutation, token_dtype
from letkit.models import LlamaConfig
from letkit.validation import check_int


@given(value=st.integers(-10**30, 10**30), minimum=st.integers(-100, 100))
def test_python_ints_pass_or_fail_on_the_minimum_alone(value, minimum):
    if value >= minimum:
        assert check_int("x", value, minimum=minimum) == value
    else:
        with pytest.raises(ValueError, match=rf"^x must be >= {minimum}, got {value}$"):
            check_int("x", value, minimum=minimum)


@pytest.mark.parametrize("value", [np.int64(7), np.uint8(7), np.int32(7), torch.tensor(7), np.array(7),
                                   torch.tensor(7, dtype=torch.int16)])
def test_numpy_and_0d_torch_integers_come_back_as_python_ints(value):
    checked = check_int("x", value, minimum=1)
    assert checked == 7 and type(checked) is int


@pytest.mark.parametrize("value", [True, False, np.bool_(True), torch.tensor(True), np.array(True), 3.0, float("nan"),
                                   np.float64(3.0), torch.tensor(3.0), torch.tensor([3]), np.array([3]), "3", None, [3]])
def test_anything_but_an_integer_is_a_type_error_naming_argument_and_value(value):
    with pytest.raises(TypeError, match=rf"^count must be an int, got {type(value).__name__} \({re.escape(repr(value))}\)$"):
        check_int("count", value, minimum=1)


def test_optional_accepts_none_and_says_so_in_its_messages():
    assert check_int("limit", None, minimum=1, optional=True) is None
    with pytest.raises(ValueError, match=r"^limit must be >= 1 or None, got 0$"):
        check_int("limit", 0, minimum=1, optional=True)
    with pytest.raises(TypeError, match=r"^limit must be an int or None, got float \(1.5\)$"):
        check_int("limit", 1.5, minimum=1, optional=True)
    assert check_int("offset", -(10**20)) == -(10**20)  # no minimum: any integer


def _distillation_loss(**kwargs):
    g = torch.Generator().manual_seed(0)
    logits, hidden, weight = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 4, generator=g), torch.randn(5, 4, generator=g)
    return logit_distillation_loss(logits, hidden, weight, **kwargs)


SIZE_ARGUMENTS = {
    "stop_step": lambda n: LinearDecay(0.1, stop_step=n),
    "step_size": lambda n: StepDecay(0.1, 10, step_size=n),
    "target_dims[0]": lambda n: LayerMappingProjector([n], [4], "linear"),
    "mlp_hidden": lambda n: LayerMappingProjector([6], [4], "mlp", mlp_hidden=n),
    "num_target_layers": lambda n: LayerMap("L2E").resolve(4, n),
    "chunk_size": lambda n: _distillation_loss(chunk_size=n),
    "vocab_size": lambda n: _distillation_loss(vocab_size=n),
    "n": lambda n: WindowPermutation(n, 0),
    "num_hidden_layers": lambda n: LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=n,
                                               num_attention_heads=2),
}


@pytest.mark.parametrize("name", SIZE_ARGUMENTS)
def test_every_size_argument_takes_numpy_and_torch_ints_and_refuses_bools_and_zero_alike(name):
    build = SIZE_ARGUMENTS[name]
    build(np.int64(3))
    build(torch.tensor(3))
    with pytest.raises(TypeError, match=rf"^{re.escape(name)} must be an int( or None)?, got bool \(True\)$"):
        build(True)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)} must be >= 1( or None)?, got 0$"):
        build(0)


def test_checked_sizes_are_stored_as_python_ints():
    config = LlamaConfig(vocab_size=32, hidden_size=np.int64(16), intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2)
    assert type(config.hidden_size) is int
    assert type(LinearDecay(0.1, np.int64(10)).stop_step) is int
    assert token_dtype(np.int64(70_000)) == np.uint32
