"""letkit models loaded from Hugging Face checkpoints match ``transformers`` hidden state by hidden state, and
letkit models saved with ``save_pretrained`` load in ``transformers`` with the same outputs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from letkit.models import (
    GPT2,
    OPT,
    GPT2Config,
    GPTNeoX,
    GPTNeoXConfig,
    Llama,
    LlamaConfig,
    OPTConfig,
    load_pretrained,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")

VOCAB = 128
TOLERANCE = 1e-5  # max |ours - reference| / max |reference|, float32


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> None:
    """Random values for every parameter, norm weights near 1 and non-zero biases, so that a mapping mistake in
    any tensor shows up."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        is_norm = p.dim() == 1 and ("norm" in name or ".ln_" in name)
        p.copy_(1 + 0.1 * noise if is_norm else 0.1 * noise)


def assert_outputs_match(ours, reference, n_layers: int) -> None:
    assert len(ours.hidden_states) == len(reference.hidden_states) == n_layers + 1
    for i, (a, b) in enumerate(zip(ours.hidden_states, reference.hidden_states)):
        assert a.shape == b.shape, f"hidden_states[{i}]"
        assert rel_err(a, b) < TOLERANCE, f"hidden_states[{i}]: {rel_err(a, b):.2e}"
    assert rel_err(ours.logits, reference.logits) < TOLERANCE


def hf_config(kind: str, **kw):
    """Tiny transformers configs, 2 layers, hidden 64."""
    common = dict(vocab_size=VOCAB, num_hidden_layers=2, num_attention_heads=4)
    if kind == "llama":
        return transformers.LlamaConfig(hidden_size=64, intermediate_size=96, **common, **kw)
    if kind == "qwen2":
        return transformers.Qwen2Config(hidden_size=64, intermediate_size=96, **common, **kw)
    if kind == "mistral":
        return transformers.MistralConfig(hidden_size=64, intermediate_size=96, head_dim=16, **common, **kw)
    if kind == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=64, intermediate_size=96, **common, **kw)
    if kind == "opt":
        return transformers.OPTConfig(hidden_size=64, ffn_dim=96, max_position_embeddings=32, **common, **kw)
    if kind == "gpt2":
        return transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=32, **kw)
    raise AssertionError(kind)


LLAMA3 = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

# (id, transformers config, sequence length, config field that must matter for the result or None)
CASES = [
    ("llama-gqa-untied", hf_config("llama", num_key_value_heads=2), 12, None),
    ("llama-mha-tied-rope-linear", hf_config("llama", tie_word_embeddings=True, rope_theta=500.0,
                                             rope_scaling={"rope_type": "linear", "factor": 2.0}), 12, "rope_scaling"),
    ("llama-rope-dynamic", hf_config("llama", max_position_embeddings=8,
                                     rope_scaling={"rope_type": "dynamic", "factor": 2.0}), 16, "rope_scaling"),
    ("llama3-rope-headdim-biases", hf_config("llama", head_dim=32, attention_bias=True, mlp_bias=True,
                                             rope_theta=500000.0, rope_scaling=dict(LLAMA3)), 12, "rope_scaling"),
    ("qwen2-gqa-tied-qkv-bias", hf_config("qwen2", num_key_value_heads=2, tie_word_embeddings=True), 12, None),
    ("mistral-sliding-window", hf_config("mistral", num_key_value_heads=2, sliding_window=4), 12, "sliding_window"),
    ("pythia-parallel-partial-rotary", hf_config("gpt_neox", rotary_pct=0.25), 12, None),
    ("neox-sequential-full-rotary-nobias", hf_config("gpt_neox", use_parallel_residual=False, rotary_pct=1.0,
                                                     attention_bias=False), 12, "use_parallel_residual"),
    ("opt-prenorm-tied", hf_config("opt"), 12, None),
    ("opt-postnorm-project-in-out", hf_config("opt", do_layer_norm_before=False, word_embed_proj_dim=32), 12, None),
    ("opt-prenorm-project-untied-gelu", hf_config("opt", word_embed_proj_dim=48, tie_word_embeddings=False,
                                                  activation_function="gelu"), 12, None),
    ("gpt2", hf_config("gpt2"), 12, None),
    ("gpt2-inverse-layer-scale-relu", hf_config("gpt2", scale_attn_by_inverse_layer_idx=True, n_inner=96,
                                                activation_function="relu"), 12, None),
]


@pytest.mark.parametrize("config, seq_len, decisive_field", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_loaded_checkpoint_matches_transformers(tmp_path, config, seq_len, decisive_field):
    reference = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(reference)
    reference.save_pretrained(tmp_path, safe_serialization=True)

    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, seq_len))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True)
        ours = loaded.model(ids, output_hidden_states=True)
        logits_only = loaded.model(ids)
    assert_outputs_match(ours, expected, config.num_hidden_layers)
    assert torch.equal(logits_only, ours.logits)
    assert loaded.config["model_type"] == config.model_type

    if decisive_field is not None:  # control: the option under test really changes the result
        changed = {"rope_scaling": None, "sliding_window": None, "use_parallel_residual": True}[decisive_field]
        variant = type(loaded.model)(dataclasses.replace(loaded.model.config, **{decisive_field: changed}))
        variant.load_state_dict(loaded.model.state_dict())
        with torch.no_grad():
            assert rel_err(variant(ids), expected.logits) > 1e-3


def _letkit_models():
    return [
        ("llama-target-tiny", Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))),
        ("llama-tied-llama3", Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, tie_word_embeddings=True,
                                                rope_scaling=dict(LLAMA3), rope_theta=500000.0))),
        ("qwen2-style", Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, qkv_bias=True))),
        ("mistral-style", Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                            num_hidden_layers=2, num_attention_heads=4, sliding_window=5))),
        ("gpt-neox", GPTNeoX(GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96,
                                           num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.5))),
        ("opt-postnorm-project", OPT(OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_hidden_layers=2,
                                               num_attention_heads=4, max_position_embeddings=32,
                                               word_embed_proj_dim=32, do_layer_norm_before=False))),
        ("gpt2", GPT2(GPT2Config(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 max_position_embeddings=32))),
    ]


@pytest.mark.parametrize("model", [m for _, m in _letkit_models()], ids=[n for n, _ in _letkit_models()])
def test_saved_checkpoint_loads_in_transformers_and_letkit(tmp_path, model):
    randomize(model.eval(), seed=1)
    save_pretrained(model, tmp_path / "ckpt")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    reloaded = load_pretrained(tmp_path / "ckpt")
    assert dataclasses.asdict(reloaded.model.config) == dataclasses.asdict(model.config)

    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True)
        assert_outputs_match(ours, reference(ids, output_hidden_states=True), model.config.num_hidden_layers)
        again = reloaded.model(ids, output_hidden_states=True)
    for a, b in zip(again.hidden_states, ours.hidden_states):
        assert torch.equal(a, b)


@pytest.mark.parametrize("model", [m for _, m in _letkit_models()], ids=[n for n, _ in _letkit_models()])
def test_block_hooks_and_final_norm_reproduce_hidden_states(model):
    """The interface contract: hooks on blocks capture Tensors equal to hidden_states[1:-1], and final_norm of the
    last block's output is hidden_states[-1]."""
    captured = []
    handles = [b.register_forward_hook(lambda _m, _i, out: captured.append(out)) for b in model.blocks]
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        final = model.final_norm(captured[-1])
    for h in handles:
        h.remove()
    assert all(isinstance(t, torch.Tensor) for t in captured) and len(captured) == len(model.blocks)
    for block_out, hidden in zip(captured[:-1], out.hidden_states[1:-1]):
        assert torch.equal(block_out, hidden)
    assert torch.equal(final, out.hidden_states[-1])
    assert out.logits.shape == (2, 9, VOCAB)
