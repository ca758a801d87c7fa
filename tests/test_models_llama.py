"""The Llama target: presets and parameter counts (on the meta device), initialisation, config validation,
RoPE against a float64 complex-rotation reference, causality, and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from letkit.models import PRESETS, LlamaConfig, count_parameters, from_preset, materialize
from letkit.models.rope import apply_rotary, rotary_cos_sin


def expected_llama_parameters(c: LlamaConfig) -> int:
    """Closed-form count: per layer q,k,v,o + gate,up,down + two norms; embeddings, final norm, LM head."""
    d, f = c.hidden_size, c.intermediate_size
    attn = d * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    return c.num_hidden_layers * per_layer + c.vocab_size * d + d + head


@pytest.mark.parametrize("name, low, high", [("1.4b", 1.3e9, 1.5e9), ("7b", 6.5e9, 7.0e9), ("125m", 1.0e8, 1.5e8)])
def test_preset_sizes_on_meta_device(name, low, high):
    with torch.device("meta"):
        model = from_preset(name)
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    assert low <= n <= high
    assert n == expected_llama_parameters(model.config)
    embeddings = model.config.vocab_size * model.config.hidden_size * 2  # untied presets
    assert count_parameters(model, non_embedding=True) == n - embeddings


def test_7b_preset_has_llama2_7b_shapes():
    with torch.device("meta"):
        model = from_preset("7b")
    assert count_parameters(model) == 6_738_415_616  # the published parameter count of Llama-2-7B


def test_tied_embeddings_counted_once():
    model = from_preset("tiny", tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed.weight
    assert count_parameters(model) == expected_llama_parameters(model.config)
    assert count_parameters(model, non_embedding=True) == count_parameters(model) - 256 * 64


def test_from_preset_overrides_and_errors():
    model = from_preset("tiny", vocab_size=100, num_attention_heads=8, num_key_value_heads=8)
    assert model.config.vocab_size == 100 and model.config.head_dim == 8
    assert set(PRESETS) >= {"tiny", "125m", "1.4b", "7b"}
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        from_preset("huge")
    with pytest.raises(TypeError, match=r"unknown LlamaConfig field\(s\) \['n_layers'\]"):
        from_preset("tiny", n_layers=3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(hidden_size=60, num_attention_heads=8), "hidden_size=60 is not divisible by num_attention_heads=8"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (dict(num_hidden_layers=0), "num_hidden_layers must be >= 1, got 0"),
        (dict(head_dim=7), "head_dim=7 must be even"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"rope_scaling\['rope_type'\]='yarn' is not supported"),
        (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "lacks .*low_freq_factor"),
        (dict(sliding_window=0), "sliding_window must be >= 1 or None, got 0"),
    ],
)
def test_config_validation(kwargs, message):
    base = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    with pytest.raises(ValueError, match=message):
        LlamaConfig(**{**base, **kwargs})


def test_forward_rejects_bad_input_shape():
    model = from_preset("tiny")
    with pytest.raises(ValueError, match=r"input_ids must be \[batch, seq\], got shape \(5,\)"):
        model(torch.zeros(5, dtype=torch.long))


def test_initialisation_statistics():
    torch.manual_seed(0)
    model = from_preset("tiny", hidden_size=256, intermediate_size=512, num_hidden_layers=8, vocab_size=512)
    residual_std = 0.02 / math.sqrt(2 * 8)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
            continue
        expected = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
        assert abs(p.std().item() / expected - 1) < 0.05, name
        assert abs(p.mean().item()) < 0.05 * expected, name


def test_materialize_keeps_tied_weights_and_init_weights_fills_them():
    with torch.device("meta"):
        model = from_preset("tiny", tie_word_embeddings=True)
    materialize(model, "cpu")
    assert model.lm_head.weight is model.embed.weight and not model.embed.weight.is_meta
    model.init_weights()
    assert torch.isfinite(model(torch.randint(0, 256, (1, 4)))).all()


@settings(max_examples=25, deadline=None)
@given(seq=st.integers(1, 24), heads=st.sampled_from([1, 2, 4]), half_dim=st.integers(1, 8),
       theta=st.floats(10.0, 1e6), factor=st.floats(1.0, 8.0), seed=st.integers(0, 2**16))
def test_rotary_matches_complex_rotation_float64(seq, heads, half_dim, theta, factor, seed):
    """RoPE (rotate-half layout) rotates the feature pairs (i, i + d/2) by position * theta^(-2i/d) / factor."""
    dim = 2 * half_dim
    x = torch.randn(2, heads, seq, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    cos, sin = rotary_cos_sin(seq, dim, theta=theta, rope_scaling={"rope_type": "linear", "factor": factor},
                              max_position_embeddings=seq, device=torch.device("cpu"), dtype=torch.float64)
    ours = apply_rotary(x, cos, sin)

    freqs = theta ** (-torch.arange(half_dim, dtype=torch.float64) * 2 / dim) / factor
    angles = torch.arange(seq, dtype=torch.float64)[:, None] * freqs
    rotated = torch.complex(x[..., :half_dim], x[..., half_dim:]) * torch.polar(torch.ones_like(angles), angles)
    expected = torch.cat((rotated.real, rotated.imag), dim=-1)
    # cos/sin are computed in float32 (like the reference implementations), hence the tolerance
    torch.testing.assert_close(ours, expected, atol=1e-5 * seq, rtol=1e-5)


_CAUSAL_MODEL = from_preset("tiny").eval()


@settings(max_examples=10, deadline=None)
@given(seq=st.integers(2, 16), position=st.data(), seed=st.integers(0, 2**16))
def test_causal_future_tokens_do_not_change_the_past(seq, position, seed):
    t = position.draw(st.integers(1, seq - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (2, seq), generator=gen)
    changed = ids.clone()
    changed[:, t:] = torch.randint(0, 256, (2, seq - t), generator=gen)
    with torch.no_grad():
        a, b = _CAUSAL_MODEL(ids), _CAUSAL_MODEL(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)


def test_torch_compile_tiny_preset():
    torch.manual_seed(0)
    model = from_preset("tiny").eval()
    ids = torch.randint(0, 256, (2, 16))
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no graph breaks anywhere in the forward
    with torch.no_grad():
        out = compiled(ids, output_hidden_states=True)
        expected = model(ids, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
