"""Hub names resolved offline through a Hugging Face cache that the tests lay out as `hf download` does, and the
paper's teacher configs (examples/configs/) loading their teachers by hub name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from test_fsdp_example import load_example
from test_models_loading import VOCAB, rel_err, tiny_hf_llama

from letkit import TeacherFeatureExtractor
from letkit.models import CheckpointError, GPTNeoX, Llama, OPT, hub_cache_dir, load_pretrained, resolve_pretrained

transformers = pytest.importorskip("transformers")

def commit_hash(seed: int) -> str:
    return hashlib.sha1(str(seed).encode()).hexdigest()


def cache_model(cache: Path, name: str, source: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Lay the files of checkpoint directory ``source`` out in ``cache`` as `hf download` does: content-addressed
    blobs, a snapshot of relative symlinks to them, and ``refs/<ref>`` files holding the commit."""
    repo = cache / f"models--{name.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for file in source.iterdir():
        blob = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, repo / "blobs" / blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache that $HF_HUB_CACHE points at."""
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def two_revisions(tmp_path, hub_cache):
    """org/tiny in the cache: main (sharded, with a tokenizer.json) and tag v1 (another model, one file)."""
    from tokenizers import Tokenizer, models

    main, v1 = tiny_hf_llama(), tiny_hf_llama(num_hidden_layers=3, seed=1)
    main.save_pretrained(tmp_path / "main", safe_serialization=True, max_shard_size="20KB")
    Tokenizer(models.WordLevel({"<unk>": 0, "a": 1}, "<unk>")).save(str(tmp_path / "main" / "tokenizer.json"))
    v1.save_pretrained(tmp_path / "v1", safe_serialization=True)
    cache_model(hub_cache, "org/tiny", tmp_path / "main", commit_hash(0))
    cache_model(hub_cache, "org/tiny", tmp_path / "v1", commit_hash(1), refs=("v1",))
    return main, v1


def test_hub_name_loads_from_the_cache_by_revision(two_revisions, hub_cache):
    main, v1 = two_revisions
    assert len(list((hub_cache / "models--org--tiny" / "snapshots" / commit_hash(0)).glob("*.safetensors"))) > 2
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        for reference, kwargs in ((main, {}), (main, {"revision": "main"}), (v1, {"revision": "v1"}),
                                  (v1, {"revision": commit_hash(1)})):
            loaded = load_pretrained("org/tiny", **kwargs)
            assert rel_err(loaded.model(ids), reference(ids).logits) < 1e-5
            teacher = TeacherFeatureExtractor.from_pretrained("org/tiny", **kwargs)
            expected = reference(ids, output_hidden_states=True).hidden_states[-1]
            assert rel_err(teacher(ids)[0], expected) < 1e-5
    assert load_pretrained("org/tiny").tokenizer.encode("a").ids == [1]
    assert resolve_pretrained("org/tiny", revision="v1") == hub_cache / "models--org--tiny" / "snapshots" / commit_hash(1)


def test_a_local_directory_comes_first(two_revisions, tmp_path, monkeypatch):
    local = tmp_path / "work" / "org" / "tiny"
    tiny_hf_llama(seed=2).save_pretrained(local, safe_serialization=True)
    monkeypatch.chdir(tmp_path / "work")
    assert resolve_pretrained("org/tiny") == Path("org/tiny")
    with pytest.raises(ValueError, match="revision='v1' applies to hub names, but 'org/tiny' is a local directory"):
        resolve_pretrained("org/tiny", revision="v1")


@pytest.mark.parametrize("env, cache", [
    ({"HF_HUB_CACHE": "a", "HF_HOME": "b"}, "a"),
    ({"HF_HOME": "b", "XDG_CACHE_HOME": "c"}, "b/hub"),
    ({"XDG_CACHE_HOME": "c"}, "c/huggingface/hub"),
    ({}, "home/.cache/huggingface/hub"),
])
def test_cache_location_follows_the_environment(tmp_path, monkeypatch, env, cache):
    for name in ("HF_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, str(tmp_path / value))
    assert hub_cache_dir() == tmp_path / cache
    tiny_hf_llama().save_pretrained(tmp_path / "source", safe_serialization=True)
    snapshot = cache_model(tmp_path / cache, "org/tiny", tmp_path / "source", commit_hash(0))
    assert resolve_pretrained("org/tiny") == snapshot


def test_what_is_not_in_the_cache_says_where_it_looked_and_how_to_download(two_revisions, hub_cache):
    with pytest.raises(FileNotFoundError, match=rf"'org/missing' is not a local directory, and the Hugging Face cache "
                                                rf"{hub_cache} has no models--org--missing .*run `hf download "
                                                r"org/missing` \(or `huggingface-cli download \.\.\.`\)"):
        load_pretrained("org/missing")
    cached = ", ".join(f"'{c}'" for c in sorted([commit_hash(0), commit_hash(1)]))
    with pytest.raises(FileNotFoundError, match=rf"no revision 'v2' .*cached snapshots: \[{cached}\]\)\. Run `hf "
                                                r"download org/tiny --revision v2`"):
        TeacherFeatureExtractor.from_pretrained("org/tiny", revision="v2")
    with pytest.raises(FileNotFoundError, match=rf"{commit_hash(7)} has no config\.json \(not downloaded, or the "
                                                r"download is incomplete\)"):
        load_pretrained("org/tiny", revision=commit_hash(7))
    (hub_cache / "models--org--tiny" / "snapshots" / commit_hash(1) / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="download is incomplete"):
        load_pretrained("org/tiny", revision="v1")

    (hub_cache / "models--org--tiny" / "refs" / "main").write_text("../../../../etc")
    with pytest.raises(CheckpointError, match=r"refs/main should hold a 40-hex commit hash, got '\.\./\.\./\.\./\.\./etc'"):
        load_pretrained("org/tiny")
    for revision in ("../v1", "/v1", "v1/../../x", ""):
        with pytest.raises(ValueError, match="revision must be a branch, tag or commit name"):
            load_pretrained("org/tiny", revision=revision)
    for name in ("a/b/c", "org/../tiny", "org--tiny", "-org/tiny"):
        with pytest.raises(FileNotFoundError, match="is not a directory, nor a hub model name of the form 'org/name'"):
            load_pretrained(name)


def test_fsdp_example_takes_a_teacher_by_hub_name(two_revisions, tmp_path):
    example = load_example()
    cpu = torch.device("cpu")
    teacher = example.build_teacher("org/tiny", VOCAB, cpu, seed=0, seq_len=16)
    assert teacher.num_layers == 2 and isinstance(teacher.model, Llama)
    data_tokenizer = tmp_path / "main" / "tokenizer.json"
    teacher = example.build_teacher("org/tiny", VOCAB, cpu, seed=0, seq_len=16, data_tokenizer_file=data_tokenizer,
                                    alignment="last")
    assert teacher.tokenizer.encode("a").ids == [1]
    with pytest.raises(ValueError, match=r"data.seq_len=4096 is longer than the teacher 'org/tiny' supports \(max_position_embeddings=2048\)"):
        example.build_teacher("org/tiny", VOCAB, cpu, seed=0, seq_len=4096)  # read from the cached config.json
    with pytest.raises(FileNotFoundError, match="models--org--missing"):
        example.build_teacher("org/missing", VOCAB, cpu, seed=0, seq_len=16)


# The teachers of the paper: their config.json on the hub (the fields letkit reads, as published), and the config in
# examples/configs/ that uses each. The tests shrink the sizes (SHRUNK) and keep every other field.
HUB_CONFIGS = {
    "HuggingFaceTB/SmolLM-135M": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "rope_scaling": None, "tie_word_embeddings": True, "attention_bias": False, "bos_token_id": 0,
        "eos_token_id": 0, "initializer_range": 0.02, "pretraining_tp": 1, "torch_dtype": "float32",
    },
    "EleutherAI/pythia-160m": {
        "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox", "vocab_size": 50304, "hidden_size": 768,
        "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "gelu",
        "max_position_embeddings": 2048, "layer_norm_eps": 1e-05, "rotary_emb_base": 10000, "rotary_pct": 0.25,
        "use_parallel_residual": True, "tie_word_embeddings": False, "bos_token_id": 0, "eos_token_id": 0,
        "initializer_range": 0.02, "torch_dtype": "float16",
    },
    "facebook/opt-125m": {
        "architectures": ["OPTForCausalLM"], "model_type": "opt", "vocab_size": 50272, "hidden_size": 768,
        "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 2048,
        "word_embed_proj_dim": 768, "do_layer_norm_before": True, "_remove_final_layer_norm": False,
        "activation_function": "relu", "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 1, "prefix": "</s>",
        "init_std": 0.02, "torch_dtype": "float16",
    },
    "meta-llama/Llama-3.2-1B": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "hidden_act": "silu", "max_position_embeddings": 131072, "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0, "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                                                 "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "initializer_range": 0.02, "pretraining_tp": 1, "torch_dtype": "bfloat16",
    },
}
SHRUNK = {  # head_dim 64 as in all four, so the rotary frequencies are the published ones
    "HuggingFaceTB/SmolLM-135M": dict(hidden_size=192, intermediate_size=256, num_attention_heads=3,
                                      num_key_value_heads=1),
    "EleutherAI/pythia-160m": dict(hidden_size=128, intermediate_size=256, num_attention_heads=2),
    "facebook/opt-125m": dict(hidden_size=128, ffn_dim=256, num_attention_heads=2, word_embed_proj_dim=128),
    "meta-llama/Llama-3.2-1B": dict(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                    num_key_value_heads=1),
}
TEACHER_CONFIGS = [  # (examples/configs name, target preset, teacher, letkit class of the teacher)
    ("1.4b-smollm-135m", "1.4b", "HuggingFaceTB/SmolLM-135M", Llama),
    ("1.4b-pythia-160m", "1.4b", "EleutherAI/pythia-160m", GPTNeoX),
    ("1.4b-opt-125m", "1.4b", "facebook/opt-125m", OPT),
    ("7b-llama-3.2-1b", "7b", "meta-llama/Llama-3.2-1B", Llama),
]


@pytest.mark.parametrize("config_name, preset, hub_name, family_class", TEACHER_CONFIGS)
def test_paper_teacher_configs_load_their_teacher_by_hub_name(tmp_path, hub_cache, config_name, preset, hub_name,
                                                              family_class):
    example = load_example()
    cfg = example.load_config(["--config", config_name])
    published = HUB_CONFIGS[hub_name]
    assert (cfg.model.preset, cfg.teacher.path, cfg.teacher.alignment) == (preset, hub_name, "same")
    assert cfg.data.seq_len <= published["max_position_embeddings"]
    assert cfg.train.run_dir == f"runs/{config_name}"

    hf_config = {**published, **SHRUNK[hub_name], "vocab_size": VOCAB, "num_hidden_layers": 2}
    reference_config = transformers.AutoConfig.for_model(**json.loads(json.dumps(hf_config)))  # a copy: it gets edited
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(reference_config, dtype=torch.float32).eval()
    reference.save_pretrained(tmp_path / "checkpoint", safe_serialization=True)
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps(hf_config))  # the fields as the hub spells them
    cache_model(hub_cache, hub_name, tmp_path / "checkpoint", commit_hash(0))

    teacher = example.build_teacher(cfg.teacher.path, VOCAB, torch.device("cpu"), seed=0, seq_len=cfg.data.seq_len)
    assert type(teacher.model) is family_class  # native, not through transformers
    assert teacher.model.config.tie_word_embeddings == published.get("tie_word_embeddings", family_class is OPT)
    if published.get("rope_scaling"):
        assert teacher.model.config.rope_scaling == published["rope_scaling"]
    ids = torch.randint(0, VOCAB, (2, 12))
    with torch.no_grad():
        expected = reference(ids, output_hidden_states=True).hidden_states[-1]
        assert rel_err(teacher(ids)[0], expected) < 1e-5
