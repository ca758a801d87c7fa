"""Hub names resolved offline through a Hugging Face cache that the tests lay out as `hf download` does."""

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
from letkit.models import CheckpointError, Llama, hub_cache_dir, load_pretrained, resolve_pretrained

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
                                    cross_tokenizer=True)
    assert teacher.tokenizer.encode("a").ids == [1]
    with pytest.raises(FileNotFoundError, match="models--org--missing"):
        example.build_teacher("org/missing", VOCAB, cpu, seed=0, seq_len=16)
