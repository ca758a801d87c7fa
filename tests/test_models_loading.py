"""load_pretrained / save_pretrained: sharded checkpoints, base-model checkpoints, tokenizers, the transformers
fallback, and a clear CheckpointError (naming file and tensor) for every kind of broken checkpoint."""

from __future__ import annotations

import json
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from letkit.models import CheckpointError, Llama, LlamaConfig, TransformersModel, load_pretrained, save_pretrained

transformers = pytest.importorskip("transformers")

VOCAB = 96


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_hf_llama(**kw):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, **kw)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture
def llama_dir(tmp_path) -> Path:
    tiny_hf_llama().save_pretrained(tmp_path, safe_serialization=True)
    return tmp_path


def rewrite_weights(directory: Path, edit) -> None:
    """Apply ``edit`` to the checkpoint's tensor dict and write it back."""
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_sharded_checkpoint(tmp_path):
    reference = tiny_hf_llama()
    reference.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "model.safetensors.index.json").exists()

    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        ours = load_pretrained(tmp_path).model(ids, output_hidden_states=True)
        expected = reference(ids, output_hidden_states=True)
    for a, b in zip(ours.hidden_states, expected.hidden_states, strict=True):
        assert rel_err(a, b) < 1e-5

    os.remove(tmp_path / shards[1])
    with pytest.raises(CheckpointError, match=f"lists shard {shards[1]}, which does not exist"):
        load_pretrained(tmp_path)


def test_index_naming_a_tensor_its_shard_lacks(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, f in index["weight_map"].items() if f == shards[0])
    index["weight_map"][name] = shards[1]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"maps tensor {name} to {shards[1]}, which does not contain it"):
        load_pretrained(tmp_path)


def test_missing_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: missing tensor.*model\.layers\.1\.self_attn\.k_proj"):
        load_pretrained(llama_dir)


def test_missing_untied_lm_head(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*'lm_head\.weight'"):
        load_pretrained(llama_dir)


def test_unexpected_tensor(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.mlp\.extra\.weight.*model\.safetensors"):
        load_pretrained(llama_dir)


def test_layer_count_mismatch_is_unexpected_tensors(llama_dir):
    config_path = llama_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["num_hidden_layers"] = 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.1\."):
        load_pretrained(llama_dir)


def test_wrong_shape(llama_dir):
    rewrite_weights(llama_dir, lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(63, 32)}))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.mlp\.up_proj\.weight in .*model\.safetensors "
                                              r"has shape \[63, 32\], expected \[64, 32\]"):
        load_pretrained(llama_dir)


@pytest.mark.parametrize("keep_bytes", [20, -100])
def test_truncated_safetensors_file(llama_dir, keep_bytes):
    path = llama_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:keep_bytes])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a readable safetensors file"):
        load_pretrained(llama_dir)


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickle_only_checkpoint_is_refused_without_unpickling(llama_dir):
    os.remove(llama_dir / "model.safetensors")
    marker = llama_dir / "unpickled"
    (llama_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCodeWhenUnpickled(marker)))
    with pytest.raises(CheckpointError, match=r"only pickle weights \(pytorch_model\.bin\).*safe_serialization=True"):
        load_pretrained(llama_dir)
    assert not marker.exists()


def test_missing_files_and_bad_config(tmp_path, llama_dir):
    with pytest.raises(FileNotFoundError, match="local checkpoint directory"):
        load_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path / "empty")

    with pytest.raises(TypeError, match="dtype must be a torch.dtype or None, got 'bf16'"):
        load_pretrained(llama_dir, dtype="bf16")
    config = json.loads((llama_dir / "config.json").read_text())
    (llama_dir / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "model_type"}))
    with pytest.raises(CheckpointError, match="config.json has no model_type"):
        load_pretrained(llama_dir)
    (llama_dir / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json is not valid JSON"):
        load_pretrained(llama_dir)
    del config["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="config.json lacks key 'hidden_size'"):
        load_pretrained(llama_dir)


def test_tied_checkpoint_with_stored_lm_head(tmp_path):
    reference = tiny_hf_llama(tie_word_embeddings=True)
    reference.save_pretrained(tmp_path, safe_serialization=True)
    embedding = load_file(tmp_path / "model.safetensors")["model.embed_tokens.weight"]
    rewrite_weights(tmp_path, lambda t: t.update({"lm_head.weight": embedding.clone()}))
    model = load_pretrained(tmp_path).model
    assert model.lm_head.weight is model.embed.weight

    rewrite_weights(tmp_path, lambda t: t.update({"lm_head.weight": embedding + 1}))
    with pytest.raises(CheckpointError, match="lm_head.weight that differs from model.embed_tokens.weight"):
        load_pretrained(tmp_path)


def test_base_model_checkpoint_with_buffers(tmp_path):
    """Original GPT-2 files: base-model names (no ``transformer.`` prefix) plus causal-mask buffers."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16)
    torch.manual_seed(0)
    reference = transformers.GPT2LMHeadModel(config).eval()
    reference.transformer.save_pretrained(tmp_path, safe_serialization=True)
    rewrite_weights(tmp_path, lambda t: t.update({"h.0.attn.bias": torch.ones(1, 1, 16, 16, dtype=torch.bool)}))
    assert "h.0.ln_1.weight" in load_file(tmp_path / "model.safetensors")

    loaded = load_pretrained(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        assert rel_err(loaded.model(ids), reference(ids).logits) < 1e-5
    assert loaded.family == "gpt2"


def test_dtype_device_and_tie_after_loading(tmp_path):
    tiny_hf_llama(tie_word_embeddings=True).save_pretrained(tmp_path, safe_serialization=True)
    model = load_pretrained(tmp_path, dtype=torch.bfloat16, device="cpu").model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is model.embed.weight
    assert not model.training
    assert model(torch.randint(0, VOCAB, (1, 5))).dtype == torch.bfloat16


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[UNK]", "hello", "world", "let"])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2))
    save_pretrained(model, tmp_path / "ckpt", tokenizer=tokenizer)
    loaded = load_pretrained(tmp_path / "ckpt")
    assert loaded.tokenizer.encode("hello let world x").ids == [1, 3, 2, 0]
    assert load_pretrained(tmp_path / "ckpt").family == "llama"

    with pytest.raises(TypeError, match="tokenizer must be a tokenizers.Tokenizer"):
        save_pretrained(model, tmp_path / "other", tokenizer="gpt2")


def test_save_is_atomic_and_refuses_to_overwrite(tmp_path):
    model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2))
    (tmp_path / "ckpt").mkdir()  # an empty directory is fine
    save_pretrained(torch.compile(model), tmp_path / "ckpt")  # wrapper is unwrapped (nothing is compiled)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    with pytest.raises(FileExistsError, match="exists and is not an empty directory"):
        save_pretrained(model, tmp_path / "ckpt")

    with pytest.raises(TypeError, match="save_pretrained supports"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "linear")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def tiny_gpt_neo(tmp_path):
    config = transformers.GPTNeoConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4,
                                       attention_types=[[["global", "local"], 1]], max_position_embeddings=32,
                                       window_size=4)
    torch.manual_seed(0)
    reference = transformers.GPTNeoForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    return reference


def test_transformers_fallback_for_other_model_types(tmp_path):
    reference = tiny_gpt_neo(tmp_path)
    loaded = load_pretrained(tmp_path)
    model = loaded.model
    assert loaded.family == "transformers" and isinstance(model, TransformersModel)
    assert model.blocks is model.hf_model.transformer.h and model.final_norm is model.hf_model.transformer.ln_f

    captured = []
    model.blocks[-1].register_forward_hook(lambda _m, _i, out: captured.append(out))
    ids = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        expected = reference(ids, output_hidden_states=True)
        last = captured[-1][0] if isinstance(captured[-1], tuple) else captured[-1]
        assert torch.equal(model.final_norm(last), out.hidden_states[-1])
        assert rel_err(model(ids), expected.logits) < 1e-5
    assert len(out.hidden_states) == 3
    for a, b in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert rel_err(a, b) < 1e-5

    save_pretrained(model, tmp_path / "resaved")
    assert load_pretrained(tmp_path / "resaved").family == "transformers"


def test_other_model_types_without_transformers(tmp_path, monkeypatch):
    tiny_gpt_neo(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(CheckpointError, match=r"model_type 'gpt_neo'.*\['gpt2', 'gpt_neox', 'llama', 'mistral', "
                                              r"'opt', 'qwen2'\]"):
        load_pretrained(tmp_path)
