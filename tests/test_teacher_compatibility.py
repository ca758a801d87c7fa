"""letkit.check_teacher_compatibility: every case of the demo's and the FSDP example's teacher/data checks."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from letkit import check_teacher_compatibility


def word_tokenizer(words: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


DATA = word_tokenizer([f"w{i}" for i in range(11)])  # 12 tokens
OTHER = word_tokenizer([f"x{i}" for i in range(41)])  # 42 tokens


def save(tokenizer: Tokenizer, path, pretty: bool = True):
    tokenizer.save(str(path), pretty=pretty)
    return path


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check(**facts):
    """The check with facts that pass on their own; each test changes what it is about."""
    defaults = dict(teacher_vocab_size=12, teacher_tokenizer=DATA, teacher_max_positions=64, data_vocab_size=12,
                    data_tokenizer=DATA, seq_len=32)
    check_teacher_compatibility(**{**defaults, **facts})


def test_a_shared_tokenizer_passes_as_object_or_file(tmp_path):
    check()
    pretty, compact = save(DATA, tmp_path / "pretty.json"), save(DATA, tmp_path / "compact.json", pretty=False)
    assert pretty.read_bytes() != compact.read_bytes()
    check(teacher_tokenizer=pretty, data_tokenizer=compact)  # other bytes, same tokenization
    check(teacher_tokenizer=str(pretty), data_tokenizer=None, data_tokenizer_sha256=sha256(pretty))  # same bytes
    check(teacher_tokenizer=None, data_tokenizer=None)  # nothing to compare: the sizes are all there is to check
    check(teacher_vocab_size=None, teacher_max_positions=None)  # facts not known are not checked


def test_a_teacher_that_tokenizes_differently_is_refused_without_alignment():
    message = ("the teacher 'ckpt' tokenizes differently from the data (model differ; 42 vs 12 tokens): without "
               "cross-tokenizer alignment LET feeds the data's token ids to the teacher, so tokenize the data with the "
               "teacher's tokenizer, or use --cross-tokenizer to let the teacher read its own tokenization")
    with pytest.raises(ValueError, match=re.escape(message)):
        check(teacher_tokenizer=OTHER, teacher_vocab_size=42, teacher_name="ckpt", alignment_option="--cross-tokenizer")
    normalized = Tokenizer.from_str(DATA.to_str())
    normalized.normalizer = normalizers.Lowercase()  # the same vocabulary, other ids for "W1"
    with pytest.raises(ValueError, match=r"tokenizes differently from the data \(normalizer differ; 12 vs 12 tokens\)"):
        check(teacher_tokenizer=normalized)
    check(teacher_tokenizer=OTHER, teacher_vocab_size=42, alignment="last")  # what alignment is for


def test_only_the_datas_sha256_known(tmp_path):
    """The FSDP example's case: token shards record their tokenizer's SHA-256, the teacher has a tokenizer.json."""
    teacher_file, data_file = save(OTHER, tmp_path / "teacher.json"), save(DATA, tmp_path / "data.json")
    with pytest.raises(ValueError, match=re.escape(
            f"the tokenizer.json {str(teacher_file)!r} of the teacher has SHA-256 {sha256(teacher_file)}, but the data was "
            f"tokenized with one of SHA-256 {sha256(data_file)}: without cross-tokenizer alignment")):
        check(teacher_tokenizer=teacher_file, teacher_vocab_size=42, data_tokenizer=None,
              data_tokenizer_sha256=sha256(data_file))
    compact = save(DATA, tmp_path / "compact.json", pretty=False)  # tokenizes alike, other bytes: only the file tells
    with pytest.raises(ValueError, match="pass the data's tokenizer.json to compare them"):
        check(teacher_tokenizer=compact, data_tokenizer=None, data_tokenizer_sha256=sha256(data_file))
    check(teacher_tokenizer=compact, data_tokenizer=data_file, data_tokenizer_sha256=sha256(data_file))
    check(teacher_tokenizer=DATA, data_tokenizer=None, data_tokenizer_sha256=sha256(data_file))  # an object: no SHA


def test_the_teacher_needs_an_embedding_for_every_data_id():
    with pytest.raises(ValueError, match=re.escape(
            "the teacher has 10 token embeddings, fewer than the data's vocabulary of 12 tokens: without cross-")):
        check(teacher_tokenizer=None, teacher_vocab_size=10)
    check(teacher_tokenizer=None, teacher_vocab_size=12)  # the data's vocabulary, not the target's padded one


def test_the_teacher_needs_a_position_for_every_token():
    with pytest.raises(ValueError, match=re.escape(
            "data.seq_len=65 is longer than the teacher 'random:tiny' supports (max_position_embeddings=64): use "
            "data.seq_len <= 64 or a teacher with a longer context")):
        check(seq_len=65, teacher_name="random:tiny", seq_len_option="data.seq_len")
    check(seq_len=64)
    check(seq_len=65, alignment="mean")  # the teacher's tokens are cut at its positions instead


def test_alignment_needs_both_tokenizers(tmp_path):
    with pytest.raises(ValueError, match=re.escape(
            "--teacher.alignment re-tokenizes the text for the teacher, but the teacher 'ckpt' has no tokenizer")):
        check(teacher_tokenizer=None, alignment="last", teacher_name="ckpt", alignment_option="--teacher.alignment")
    data_file = save(DATA, tmp_path / "data.json")
    with pytest.raises(ValueError, match="decodes the data's token ids back to text, but the data's tokenizer is not"):
        check(teacher_tokenizer=OTHER, teacher_vocab_size=42, data_tokenizer=None,
              data_tokenizer_sha256=sha256(data_file), alignment="mean")


def test_alignment_needs_offsets_that_cover_each_token_and_a_tokenizer_of_the_checkpoint():
    trimming = Tokenizer.from_str(OTHER.to_str())
    trimming.post_processor = processors.ByteLevel(trim_offsets=True)
    with pytest.raises(ValueError, match="the tokenizer of the teacher trims token offsets"):
        check(teacher_tokenizer=trimming, teacher_vocab_size=42, alignment="last")
    with pytest.raises(ValueError, match=re.escape(
            "the teacher has 40 token embeddings but its own tokenizer has 42 tokens: that tokenizer does not belong")):
        check(teacher_tokenizer=OTHER, teacher_vocab_size=40, alignment="last")


@pytest.mark.parametrize("facts, error, message", [
    (dict(alignment="first"), ValueError, "alignment must be None or one of ('last', 'mean'), got 'first'"),
    (dict(data_vocab_size=0), ValueError, "data_vocab_size must be >= 1, got 0"),
    (dict(data_vocab_size=None), TypeError, "data_vocab_size must be an int, got NoneType (None)"),
    (dict(seq_len=True), TypeError, "seq_len must be an int, got bool (True)"),
    (dict(teacher_vocab_size=-1), ValueError, "teacher_vocab_size must be >= 1 or None, got -1"),
    (dict(teacher_max_positions=1.5), TypeError, "teacher_max_positions must be an int or None, got float (1.5)"),
    (dict(data_tokenizer_sha256="abc"), ValueError, "data_tokenizer_sha256 must be 64 lowercase hex digits or None"),
    (dict(teacher_tokenizer=42), TypeError, "teacher_tokenizer must be a tokenizers.Tokenizer, a tokenizer.json path"),
])
def test_bad_facts_are_named(facts, error, message):
    with pytest.raises(error, match=re.escape(message)):
        check(**facts)


def test_unreadable_tokenizer_files_are_named(tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"data_tokenizer {str(tmp_path / 'missing.json')!r} is not a file")):
        check(data_tokenizer=tmp_path / "missing.json")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 12}))
    with pytest.raises(ValueError, match="teacher_tokenizer '.*config.json' is not a tokenizers tokenizer.json"):
        check(teacher_tokenizer=tmp_path / "config.json")
