"""load_pretrained / save_pretrained: sharded checkpoints, base-model checkpoints, tokenizers, the transformers
fallback, and a clear CheckpointError (naming file and tensor) for every kind of broken checkpoint."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from letkit.models import (
    CheckpointError,
    GPT2Config,
    GPTNeoXConfig,
    Llama,
    LlamaConfig,
    OPTConfig,
    TransformersModel,
    load_pretrained,
    save_pretrained,
)

transformers = pytest.importorskip("transformers")

VOCAB = 96


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def tiny_hf_llama(num_hidden_layers: int = 2, seed: int = 0, **kw):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=num_hidden_layers, num_attention_heads=4, num_key_value_heads=2,
                                      **kw)
    torch.manual_seed(seed)
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


# ------------------------------------------------------------------------------------------- all-or-nothing loading


def edit_config(directory: Path, **fields) -> None:
    config_path = directory / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **fields}))


def test_transformers_fallback_refuses_missing_tensors(tmp_path):
    tiny_gpt_neo(tmp_path)
    removed = sorted(load_file(tmp_path / "model.safetensors"))[:14]
    rewrite_weights(tmp_path, lambda t: [t.pop(name) for name in removed])
    with pytest.raises(CheckpointError, match=rf"missing tensor\(s\) \[.*{re.escape(removed[0])}.*\(14 in all\)"):
        load_pretrained(tmp_path)


def test_transformers_fallback_refuses_more_layers_than_stored(tmp_path):
    tiny_gpt_neo(tmp_path)
    edit_config(tmp_path, num_layers=3, attention_types=[[["global", "local"], 1], [["global"], 1]],
                attention_layers=["global", "local", "global"])
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) \[.*transformer\.h\.2\."):
        load_pretrained(tmp_path)


def test_transformers_fallback_takes_the_bare_model_of_a_checkpoint_without_lm_head(tmp_path):
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64)
    torch.manual_seed(0)
    reference = transformers.BertModel(config).eval()
    reference.save_pretrained(tmp_path, safe_serialization=True)
    model = load_pretrained(tmp_path).model
    assert type(model.hf_model) is transformers.BertModel
    ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(ids, output_hidden_states=True).hidden_states[-1], reference(ids).last_hidden_state)


def forbid(monkeypatch, block_class) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"built a {block_class.__name__} before checking the config against the checkpoint")

    monkeypatch.setattr(block_class, "__init__", refuse)


def test_huge_layer_count_is_refused_before_building_anything(llama_dir, monkeypatch):
    from letkit.models import llama

    edit_config(llama_dir, num_hidden_layers=10**6)
    forbid(monkeypatch, llama.Block)
    with pytest.raises(CheckpointError, match=r"config\.json asks for 1000000 layers \(num_hidden_layers\), but .*"
                                              r"model\.safetensors holds only 21 tensors"):
        load_pretrained(llama_dir)


def test_huge_layer_count_is_refused_before_building_anything_in_transformers(tmp_path, monkeypatch):
    from transformers.models.gpt_neo import modeling_gpt_neo

    tiny_gpt_neo(tmp_path)
    edit_config(tmp_path, num_layers=10**5, attention_types=[[["global"], 10**5]], attention_layers=["global"] * 10**5)
    forbid(monkeypatch, modeling_gpt_neo.GPTNeoBlock)
    with pytest.raises(CheckpointError, match="asks for 100000 layers"):
        load_pretrained(tmp_path)


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    checkpoint = tmp_path / "ckpt"
    tiny_hf_llama().save_pretrained(checkpoint, safe_serialization=True, max_shard_size="20KB")
    index_path = checkpoint / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name, shard = next(iter(index["weight_map"].items()))
    os.replace(checkpoint / shard, tmp_path / shard)  # a real file, outside
    for outside in (f"../{shard}", str(tmp_path / shard)):
        weight_map = {n: (outside if f == shard else f) for n, f in index["weight_map"].items()}
        index_path.write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(CheckpointError, match=rf"maps tensor {re.escape(name)} to '{re.escape(outside)}', a path "
                                                  r"outside the checkpoint directory"):
            load_pretrained(checkpoint)


def test_symlinked_files_load(tmp_path):
    """The Hugging Face cache's snapshot files are symlinks to blobs elsewhere: they are not path escapes."""
    reference = tiny_hf_llama()
    reference.save_pretrained(tmp_path / "blobs", safe_serialization=True, max_shard_size="20KB")
    (tmp_path / "snapshot").mkdir()
    for file in (tmp_path / "blobs").iterdir():
        (tmp_path / "snapshot" / file.name).symlink_to(Path("..") / "blobs" / file.name)
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert rel_err(load_pretrained(tmp_path / "snapshot").model(ids), reference(ids).logits) < 1e-5


def test_bad_bytes_and_types_in_json_files(llama_dir, tmp_path):
    config_path = llama_dir / "config.json"
    config_text = config_path.read_text()
    config_path.write_bytes(b'{"model_type": "llama", "name": "\xff\xfe"}')
    with pytest.raises(CheckpointError, match=r"config\.json is not UTF-8 text"):
        load_pretrained(llama_dir)
    config_path.write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"config\.json must hold a JSON object, got a list"):
        load_pretrained(llama_dir)
    config_path.write_text(config_text)

    sharded = tmp_path / "sharded"
    tiny_hf_llama().save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = sorted(index["weight_map"].values())
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"index\.json: 'weight_map' must be an object mapping tensor names to "
                                              r"shard file names, got list"):
        load_pretrained(sharded)


@pytest.mark.parametrize("field, value, message", [
    ("rms_norm_eps", -1, "rms_norm_eps must be a positive, finite number, got -1"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps must be a positive, finite number, got nan"),
    ("max_position_embeddings", -5, "max_position_embeddings must be >= 1, got -5"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
    ("hidden_size", 32.0, "hidden_size must be an int, got float (32.0)"),
])
def test_invalid_config_values_name_file_and_field(llama_dir, field, value, message):
    edit_config(llama_dir, **{field: value})
    with pytest.raises(CheckpointError, match=rf"config\.json: {re.escape(message)}"):
        load_pretrained(llama_dir)


WRONG_VALUES = {
    "int": st.one_of(st.integers(max_value=0), st.booleans(), st.floats(allow_nan=True), st.text(max_size=3)),
    "float": st.one_of(st.floats(max_value=0.0, allow_nan=False), st.sampled_from([float("nan"), float("inf")]),
                       st.booleans(), st.text(max_size=3)),
    "bool": st.one_of(st.integers(), st.text(max_size=3), st.floats()),
    "str": st.one_of(st.integers(), st.booleans(), st.floats()),
}


@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_every_config_field_refuses_values_of_the_wrong_kind(data):
    config_class = data.draw(st.sampled_from([LlamaConfig, GPTNeoXConfig, OPTConfig, GPT2Config]))
    fields = {f.name: f.type.split("|")[0].strip() for f in dataclasses.fields(config_class)}
    name = data.draw(st.sampled_from(sorted(n for n, kind in fields.items() if kind in WRONG_VALUES)))
    value = data.draw(WRONG_VALUES[fields[name]])
    numeric = {"int": (int,), "float": (int, float)}.get(fields[name], ())
    error = ValueError if isinstance(value, numeric) and not isinstance(value, bool) else TypeError  # range vs type
    with pytest.raises(error, match=rf"^{name} must be .*, got (\w+ \()?{re.escape(repr(value))}\)?$"):
        config_class(**{name: value})


@pytest.mark.parametrize("family", ["gpt_neox", "opt", "gpt2"])
def test_invalid_config_values_in_other_families(tmp_path, family):
    make = {"gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
                vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)),
            "opt": lambda: transformers.OPTForCausalLM(transformers.OPTConfig(
                vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4)),
            "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
                vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=4))}
    make[family]().save_pretrained(tmp_path, safe_serialization=True)
    load_pretrained(tmp_path)
    heads = {"gpt_neox": "num_attention_heads", "opt": "num_attention_heads", "gpt2": "n_head"}[family]
    edit_config(tmp_path, **{heads: 0})
    with pytest.raises(CheckpointError, match=r"config\.json: num_attention_heads must be >= 1, got 0"):
        load_pretrained(tmp_path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(llama_dir, tmp_path, bad):
    def poison(tensors):
        tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad

    rewrite_weights(llama_dir, poison)
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.down_proj\.weight in .*model\.safetensors "
                                              r"holds 1 NaN/Inf value\(s\) of 2048: the checkpoint is corrupt"):
        load_pretrained(llama_dir)

    tiny_gpt_neo(tmp_path)
    rewrite_weights(tmp_path, lambda t: t["transformer.h.0.ln_1.weight"].__setitem__(0, bad))
    with pytest.raises(CheckpointError, match=r"parameter transformer\.h\.0\.ln_1\.weight loaded from .* holds 1 "
                                              r"NaN/Inf value"):
        load_pretrained(tmp_path)


KILLED_SAVE = """
import os, signal, sys
from letkit.models import Llama, LlamaConfig, hub

def die_midway(tensors, path, **kwargs):
    with open(path, "wb") as f:
        f.write(b"half a checkpoint")
    os.kill(os.getpid(), signal.SIGKILL)

hub.save_file = die_midway
hub.save_pretrained(Llama(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2)), sys.argv[1])
"""


def test_save_cleans_up_after_a_killed_save(tmp_path):
    result = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(tmp_path / "ckpt")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".") and leftovers[0].is_dir(), leftovers
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        in_progress = tmp_path / f".tmp-other-{sleeper.pid}-abc123"  # a save another live process is writing
        in_progress.mkdir()
        model = Llama(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2))
        save_pretrained(model, tmp_path / "ckpt")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([in_progress.name, "ckpt"])
    finally:
        sleeper.kill()
        sleeper.wait()
    assert load_pretrained(tmp_path / "ckpt").family == "llama"
