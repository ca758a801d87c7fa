"""Tests for letkit.token_alignment: causal cross-tokenizer alignment.

Tokenizers are trained here on a small generated corpus: two byte-level BPEs (vocab 300 with a BOS
post-processor, vocab 1000 with an EOS post-processor) and a BERT-like WordPiece ([CLS] ... [SEP],
lower-casing normalizer). The no-leak test does not trust offsets for the byte-level tokenizers: it
measures what each token has read in bytes from the token strings themselves.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from letkit.token_alignment import (
    ALIGNMENT_MODES,
    CrossTokenizerBatch,
    TokenAlignment,
    align_tokens,
    encode_for_alignment,
    same_tokenizer,
)

SETTINGS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "héllo",
    "wörld",
    "naïve",
    "straße",
    "中文",
    "字符",
    "😀",
    "🎉",
    "👍🏽",
    "résumé",
    "ça",
    "ünïcödé",
    "token",
    "alignment",
    "teacher",
    "target",
]
SEPARATORS = [" ", " ", " ", "  ", "   ", "\n", "\n\n", "\t", " \n  ", ", ", ". "]
POOL = list("abcdefxyz  .,!?\n\t") + ["é", "ß", "中", "文", "😀", "🎉", "\u200d", "ﬁ", "İ", "\u0301", "Ω"]


def _corpus() -> list[str]:
    rng = random.Random(0)
    return ["".join(rng.choice(WORDS) + rng.choice(SEPARATORS) for _ in range(30)) for _ in range(300)]


def _byte_level_bpe(vocab_size: int, template: str, special: str) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=template, special_tokens=[(special, 0)]),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[special]
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def _wordpiece() -> Tokenizer:
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(
        _corpus(), trainers.WordPieceTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]"])
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", tokenizer.token_to_id("[CLS]")), ("[SEP]", tokenizer.token_to_id("[SEP]"))],
    )
    return tokenizer


TOKENIZERS = {
    "bpe300": _byte_level_bpe(300, "<bos> $A", "<bos>"),
    "bpe1000": _byte_level_bpe(1000, "$A <eos>", "<eos>"),
    "wordpiece": _wordpiece(),
}
BYTE_LEVEL = {"bpe300", "bpe1000"}


def _byte_of_alphabet() -> dict[str, int]:
    """Inverse of the byte-level alphabet: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, DEL, NBSP, soft hyphen) for chr(256 + n) in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


BYTE_OF = _byte_of_alphabet()


def _token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    return bytes(BYTE_OF[c] for c in tokenizer.id_to_token(token_id))


def _is_mid_char(offsets: np.ndarray) -> np.ndarray:
    """Content tokens whose next content token starts before their end (pieces of one character)."""
    starts = offsets[:, 0]
    out = np.zeros(len(offsets), dtype=bool)
    content = np.flatnonzero(starts >= 0)
    out[content[:-1]] = starts[content[1:]] < offsets[content[:-1], 1]
    return out


def _text_read(offsets: np.ndarray) -> int:
    """How many characters a target row has read in full: max over content tokens of min(end, next start)."""
    content = offsets[offsets[:, 0] >= 0]
    if len(content) == 0:
        return 0
    return int(np.minimum(content[:, 1], np.append(content[1:, 0], np.iinfo(np.int64).max)).max())


texts_strategy = st.one_of(
    st.text(alphabet=st.sampled_from(POOL), max_size=40),
    st.lists(st.sampled_from(WORDS + SEPARATORS), max_size=12).map("".join),
    st.text(max_size=30),
    st.text(alphabet="abcdefgh", min_size=60, max_size=200),
    st.just(""),
).filter(lambda s: "<bos>" not in s and "<eos>" not in s)
batches = st.lists(texts_strategy, min_size=1, max_size=4)
pairs = st.sampled_from([(t, s) for t in TOKENIZERS for s in TOKENIZERS])


# ----------------------------------------------------------------------------- reference (python loops)


def reference_alignment(target_offsets, teacher_offsets, features=None):
    """The rule of the module docstring, written out with loops; features are averaged in float64."""
    target_offsets, teacher_offsets = np.asarray(target_offsets), np.asarray(teacher_offsets)
    batch, target_len, _ = target_offsets.shape
    teacher_len = teacher_offsets.shape[1]
    lo = np.zeros((batch, target_len), np.int64)
    hi = np.zeros((batch, target_len), np.int64)
    mask = np.zeros((batch, target_len), bool)
    owner = np.full((batch, teacher_len), -1, np.int64)
    means = None if features is None else np.zeros((batch, target_len, features.shape[-1]))
    for b in range(batch):
        reach, target_reach = -1, []
        for t in range(target_len):
            start, end = target_offsets[b, t]
            if start >= 0:
                later = [target_offsets[b, u, 0] for u in range(t + 1, target_len) if target_offsets[b, u, 0] >= 0]
                reach = max(reach, min(end, later[0]) if later else end)
            target_reach.append(reach)
        reach, teacher_reach = -1, []
        for j in range(teacher_len):
            if teacher_offsets[b, j, 0] >= 0:
                reach = max(reach, teacher_offsets[b, j, 1])
            teacher_reach.append(reach)
        for t in range(target_len):
            if target_offsets[b, t, 0] < 0:
                continue
            before = target_reach[t - 1] if t > 0 else -1
            available = [
                j
                for j in range(teacher_len)
                if teacher_offsets[b, j, 0] >= 0 and before < teacher_reach[j] <= target_reach[t]
            ]
            if not available:
                continue
            mask[b, t] = True
            lo[b, t], hi[b, t] = available[0], available[-1]
            owner[b, available] = t
            if means is not None:
                means[b, t] = np.mean([features[b, j].astype(np.float64) for j in available], axis=0)
    return lo, hi, mask, owner, means


def _check_against_reference(alignment: TokenAlignment, target_offsets, teacher_offsets, mode: str) -> None:
    _, hi, mask, owner, _ = reference_alignment(target_offsets, teacher_offsets)
    np.testing.assert_array_equal(alignment.mask.numpy(), mask)
    np.testing.assert_array_equal(alignment.hi.numpy(), np.where(mask, hi, 0))
    if mode == "mean":
        np.testing.assert_array_equal(alignment.teacher_to_target.numpy(), owner)
    else:
        used = np.full_like(owner, -1)
        for b, t in zip(*np.nonzero(mask), strict=True):
            used[b, hi[b, t]] = t
        np.testing.assert_array_equal(alignment.teacher_to_target.numpy(), used)


# ----------------------------------------------------------------------------- offsets from `tokenizers`


@SETTINGS
@given(text=texts_strategy, name=st.sampled_from(sorted(BYTE_LEVEL)))
def test_byte_level_offsets_are_character_offsets_into_the_original_text(text, name):
    tokenizer = TOKENIZERS[name]
    encoding = tokenizer.encode(text)
    for token_id, (start, end), special in zip(
        encoding.ids, encoding.offsets, encoding.special_tokens_mask, strict=True
    ):
        if special:
            assert (start, end) == (0, 0)
            continue
        piece = _token_bytes(tokenizer, token_id)
        try:
            assert text[start:end] == piece.decode("utf-8")
        except UnicodeDecodeError:  # a token holding part of a multi-byte character
            assert piece in text[start:end].encode("utf-8")
    total = sum(
        len(_token_bytes(tokenizer, i))
        for i, s in zip(encoding.ids, encoding.special_tokens_mask, strict=True)
        if not s
    )
    assert total == len(text.encode("utf-8"))  # byte-level tokens tile the text


def test_split_character_pieces_all_report_the_whole_character():
    encoding = TOKENIZERS["bpe300"].encode("a😀b")
    content = [o for o, s in zip(encoding.offsets, encoding.special_tokens_mask, strict=True) if not s]
    assert content[0] == (0, 1) and content[-1] == (2, 3)
    assert len(content) > 3 and set(content[1:-1]) == {(1, 2)}


# ----------------------------------------------------------------------------- the rule


def test_hand_worked_example():
    # text "hello world": target "hel|lo| world", teacher "hello| wor|ld"
    target = torch.tensor([[[-1, -1], [0, 3], [3, 5], [5, 11]]])
    teacher = torch.tensor([[[0, 5], [5, 9], [9, 11], [-1, -1]]])
    last = align_tokens(target, teacher, mode="last")
    assert last.mask.tolist() == [[False, False, True, True]]
    assert last.hi.tolist() == [[0, 0, 0, 2]]
    assert last.teacher_to_target.tolist() == [[2, -1, 3, -1]]
    mean = align_tokens(target, teacher, mode="mean")
    assert mean.hi.tolist() == [[0, 0, 0, 2]]
    assert mean.teacher_to_target.tolist() == [[2, 3, 3, -1]]
    features = torch.arange(4.0).view(1, 4, 1)
    assert mean.gather(features).flatten().tolist() == [0.0, 0.0, 0.0, 1.5]
    assert last.gather(features).flatten().tolist() == [0.0, 0.0, 0.0, 2.0]


def test_target_piece_of_a_character_gets_nothing_from_a_teacher_that_read_the_whole_character():
    # "a😀": target splits the emoji in two pieces, the teacher reads it in one token.
    target = torch.tensor([[[0, 1], [1, 2], [1, 2]]])
    teacher = torch.tensor([[[0, 1], [1, 2]]])
    alignment = align_tokens(target, teacher)
    assert alignment.mask.tolist() == [[True, False, True]]
    assert alignment.hi.tolist() == [[0, 0, 1]]


offsets_rows = st.integers(1, 12).flatmap(
    lambda n: st.lists(
        st.one_of(
            st.just((-1, -1)), st.tuples(st.integers(0, 15), st.integers(0, 4)).map(lambda p: (p[0], p[0] + p[1]))
        ),
        min_size=n,
        max_size=n,
    )
)


@SETTINGS
@given(
    target=st.lists(offsets_rows, min_size=1, max_size=3),
    teacher=st.lists(offsets_rows, min_size=1, max_size=3),
    mode=st.sampled_from(ALIGNMENT_MODES),
    as_numpy=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_on_arbitrary_offsets(target, teacher, mode, as_numpy, seed):
    batch = min(len(target), len(teacher))

    def pad(rows):
        return np.array([r + [(-1, -1)] * (max(map(len, rows)) - len(r)) for r in rows[:batch]], np.int64)

    target_offsets, teacher_offsets = pad(target), pad(teacher)
    convert = np.asarray if as_numpy else torch.from_numpy
    alignment = align_tokens(convert(target_offsets), convert(teacher_offsets), mode=mode)
    _check_against_reference(alignment, target_offsets, teacher_offsets, mode)
    features = np.random.default_rng(seed).standard_normal((batch, teacher_offsets.shape[1], 3))
    _, hi, mask, _, means = reference_alignment(target_offsets, teacher_offsets, features)
    expected = means if mode == "mean" else np.where(mask[..., None], np.take_along_axis(features, hi[..., None], 1), 0)
    np.testing.assert_allclose(alignment.gather(torch.from_numpy(features)).numpy(), expected, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(
    texts=batches,
    pair=pairs,
    mode=st.sampled_from(ALIGNMENT_MODES),
    max_length=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
)
def test_encode_for_alignment_matches_reference_and_mean_is_exact(texts, pair, mode, max_length, seed):
    target_name, teacher_name = pair
    batch = encode_for_alignment(
        texts, TOKENIZERS[target_name], TOKENIZERS[teacher_name], max_length=max_length, mode=mode
    )
    _check_against_reference(batch.alignment, batch.target_offsets, batch.teacher_offsets, mode)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(*batch.teacher_ids.shape, 8, generator=generator, dtype=torch.float32) * 3 + 50
    _, hi, mask, _, means = reference_alignment(batch.target_offsets, batch.teacher_offsets, features.numpy())
    gathered = batch.alignment.gather(features)
    assert gathered.dtype == torch.float32
    if mode == "mean":
        np.testing.assert_allclose(gathered.double().numpy(), means, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(
            gathered[batch.alignment.mask],
            features[torch.nonzero(batch.alignment.mask)[:, 0], batch.alignment.hi[batch.alignment.mask]],
        )
    assert not gathered[~batch.alignment.mask].any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mean_of_half_precision_features_accumulates_in_float32(dtype):
    # One target token covering 64 teacher tokens of about 2000: their sum (~128000) does not fit in
    # float16 (max 65504) and is coarse in bfloat16; accumulated in float32 the mean is the correctly
    # rounded mean, in the features' dtype.
    teacher = torch.tensor([[[i, i + 1] for i in range(64)]])
    target = torch.tensor([[[0, 64]]])
    alignment = align_tokens(target, teacher, mode="mean")
    features = (torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)) * 4 + 2000).to(dtype)
    gathered = alignment.gather(features)
    assert gathered.dtype == dtype
    assert torch.equal(gathered[0, 0], features.double().mean(dim=1)[0].to(dtype))


# ----------------------------------------------------------------------------- no future leak


def _read_bytes(name: str, ids: torch.Tensor, offsets: torch.Tensor, text: str) -> list[int]:
    """For every position, how many bytes of ``text`` tokens 0..t have read (a causal model's reach)."""
    tokenizer, reach, done, out = TOKENIZERS[name], 0, 0, []
    for token_id, (start, end) in zip(ids.tolist(), offsets.tolist(), strict=True):
        if start >= 0:
            if name in BYTE_LEVEL:  # measured from the token's bytes, not from its offsets
                done += len(_token_bytes(tokenizer, token_id))
                reach = max(reach, done)
            else:  # WordPiece keeps characters whole, its offsets are exact
                reach = max(reach, len(text[:end].encode("utf-8")))
        out.append(reach)
    return out


@SETTINGS
@given(
    texts=batches,
    pair=pairs,
    mode=st.sampled_from(ALIGNMENT_MODES),
    max_length=st.integers(1, 48),
    teacher_max_length=st.one_of(st.none(), st.integers(1, 48)),
)
def test_no_target_position_receives_a_teacher_feature_that_read_further(
    texts, pair, mode, max_length, teacher_max_length
):
    target_name, teacher_name = pair
    batch = encode_for_alignment(
        texts,
        TOKENIZERS[target_name],
        TOKENIZERS[teacher_name],
        max_length=max_length,
        mode=mode,
        teacher_max_length=teacher_max_length,
    )
    alignment = batch.alignment
    for b, text in enumerate(texts):
        target_read = _read_bytes(target_name, batch.target_ids[b], batch.target_offsets[b], text)
        teacher_read = _read_bytes(teacher_name, batch.teacher_ids[b], batch.teacher_offsets[b], text)
        for j, t in enumerate(alignment.teacher_to_target[b].tolist()):
            if t >= 0:
                assert alignment.mask[b, t] and j <= alignment.hi[b, t]
                assert teacher_read[j] <= target_read[t], (text, j, t, teacher_read, target_read)
        for t in torch.nonzero(alignment.mask[b]).flatten().tolist():
            assert teacher_read[alignment.hi[b, t]] <= target_read[t]
        # the teacher is never given text beyond what the kept target tokens read
        assert max(teacher_read, default=0) <= max(target_read, default=0)


# ----------------------------------------------------------------------------- identity, padding, truncation


@SETTINGS
@given(texts=batches, name=st.sampled_from(sorted(TOKENIZERS)))
def test_identical_tokenizers_give_the_identity(texts, name):
    tokenizer = TOKENIZERS[name]
    copy = Tokenizer.from_str(tokenizer.to_str())
    assert same_tokenizer(tokenizer, copy)
    for mode in ALIGNMENT_MODES:
        batch = encode_for_alignment(texts, tokenizer, copy, max_length=10_000, mode=mode)
        assert torch.equal(batch.target_ids, batch.teacher_ids)
        alignment = batch.alignment
        for b in range(len(texts)):
            offsets = batch.target_offsets[b].numpy()
            mask, hi, owner = (getattr(alignment, name)[b].numpy() for name in ("mask", "hi", "teacher_to_target"))
            content = offsets[:, 0] >= 0
            mid_char = _is_mid_char(offsets)
            whole = content & ~mid_char
            positions = np.arange(len(offsets))
            # every token that ends on a character boundary gets exactly its own twin ...
            assert mask[whole].all() and (hi[whole] == positions[whole]).all()
            assert (owner[whole] == positions[whole]).all()
            # ... a piece of a character at most an earlier teacher token, special tokens nothing
            assert (hi[mid_char & mask] < positions[mid_char & mask]).all()
            assert not mask[~content].any()
            if name == "wordpiece" or texts[b].isascii():
                assert not mid_char.any()  # whole characters only: the identity on every content token


def test_same_tokenizer_tells_tokenizers_apart():
    assert same_tokenizer(TOKENIZERS["bpe300"], TOKENIZERS["bpe300"])
    assert not same_tokenizer(TOKENIZERS["bpe300"], TOKENIZERS["bpe1000"])
    assert not same_tokenizer(TOKENIZERS["bpe1000"], TOKENIZERS["wordpiece"])
    changed = Tokenizer.from_str(TOKENIZERS["bpe300"].to_str())
    changed.post_processor = processors.ByteLevel(trim_offsets=False)  # no BOS any more
    assert not same_tokenizer(TOKENIZERS["bpe300"], changed)
    padded = Tokenizer.from_str(TOKENIZERS["bpe300"].to_str())
    padded.enable_padding()
    assert same_tokenizer(TOKENIZERS["bpe300"], padded)


@SETTINGS
@given(
    texts=batches,
    pair=pairs,
    max_length=st.integers(1, 24),
    teacher_max_length=st.one_of(st.none(), st.integers(1, 24)),
)
def test_padding_and_truncation(texts, pair, max_length, teacher_max_length):
    target_tokenizer, teacher_tokenizer = TOKENIZERS[pair[0]], TOKENIZERS[pair[1]]
    batch = encode_for_alignment(
        texts, target_tokenizer, teacher_tokenizer, max_length=max_length, teacher_max_length=teacher_max_length
    )
    full = target_tokenizer.encode_batch(texts)
    kept = [min(len(e.ids), max_length) for e in full]
    assert batch.target_ids.shape == (len(texts), max(kept))
    for b, (text, encoding) in enumerate(zip(texts, full, strict=True)):
        n = kept[b]
        assert batch.target_attention_mask[b].tolist() == [True] * n + [False] * (max(kept) - n)
        assert batch.target_ids[b, :n].tolist() == encoding.ids[:n] and not batch.target_ids[b, n:].any()
        offsets = batch.target_offsets[b]
        assert (offsets[n:] == -1).all() and not batch.alignment.mask[b, n:].any()
        specials = torch.tensor(encoding.special_tokens_mask[:n], dtype=torch.bool)
        assert (offsets[:n][specials] == -1).all() and not batch.alignment.mask[b, :n][specials].any()
        expected_offsets = torch.tensor(encoding.offsets[:n]).reshape(-1, 2)
        content = ~specials
        # offsets are the tokenizer's, except a last kept token cut inside a character
        same = (offsets[:n][content] == expected_offsets[content]).all(-1)
        assert same[:-1].all()
        if not same[-1:].all():
            dropped = [o for o, s in zip(encoding.offsets[n:], encoding.special_tokens_mask[n:], strict=True) if not s]
            assert offsets[:n][content][-1].tolist() == [expected_offsets[content][-1, 0].item(), dropped[0][0]]
        # the teacher encodes exactly the text the kept target tokens read
        teacher_encoding = teacher_tokenizer.encode(text[: _text_read(offsets[:n].numpy())])
        m = (
            len(teacher_encoding.ids)
            if teacher_max_length is None
            else min(len(teacher_encoding.ids), teacher_max_length)
        )
        assert batch.teacher_ids[b, :m].tolist() == teacher_encoding.ids[:m]
        assert batch.teacher_attention_mask[b].sum() == m and not batch.teacher_ids[b, m:].any()
        assert (batch.teacher_offsets[b, m:] == -1).all() and (batch.alignment.teacher_to_target[b, m:] == -1).all()


def test_truncation_inside_a_character_stops_before_it():
    tokenizer = TOKENIZERS["bpe300"]
    pieces = [
        o
        for o, s in zip(tokenizer.encode("ab😀").offsets, tokenizer.encode("ab😀").special_tokens_mask, strict=True)
        if not s
    ]
    first_piece = next(i for i, o in enumerate(pieces) if o == (2, 3))
    max_length = 1 + first_piece + 1  # BOS, "ab" tokens, one piece of the emoji
    batch = encode_for_alignment(["ab😀"], tokenizer, TOKENIZERS["wordpiece"], max_length=max_length)
    assert batch.target_offsets[0, -1].tolist() == [2, 2]  # the piece read none of the emoji's characters
    assert not batch.alignment.mask[0, -1]
    assert "😀" not in "".join(TOKENIZERS["wordpiece"].id_to_token(i) for i in batch.teacher_ids[0].tolist())


def test_tokenizer_padding_is_removed():
    padded = Tokenizer.from_str(TOKENIZERS["wordpiece"].to_str())
    padded.enable_padding(pad_id=3, pad_token="[PAD]", length=64)
    texts = ["short", "a somewhat longer text with more words", ""]
    for mode in ALIGNMENT_MODES:
        got = encode_for_alignment(texts, TOKENIZERS["bpe1000"], padded, max_length=32, mode=mode)
        want = encode_for_alignment(texts, TOKENIZERS["bpe1000"], TOKENIZERS["wordpiece"], max_length=32, mode=mode)
        for name in ("target_ids", "teacher_ids", "teacher_attention_mask", "teacher_offsets"):
            assert torch.equal(getattr(got, name), getattr(want, name))
        assert torch.equal(got.alignment.teacher_to_target, want.alignment.teacher_to_target)


@pytest.mark.parametrize("mode", ALIGNMENT_MODES)
def test_empty_texts_and_empty_sequences(mode):
    batch = encode_for_alignment(["", ""], TOKENIZERS["bpe1000"], TOKENIZERS["wordpiece"], max_length=8, mode=mode)
    assert not batch.alignment.mask.any()
    assert batch.alignment.gather(torch.ones(*batch.teacher_ids.shape, 4)).abs().sum() == 0
    empty = encode_for_alignment([], TOKENIZERS["bpe1000"], TOKENIZERS["wordpiece"], max_length=8, mode=mode)
    assert empty.target_ids.shape == (0, 0) and empty.alignment.mask.shape == (0, 0)
    for target_len, teacher_len in ((0, 3), (3, 0), (0, 0)):
        alignment = align_tokens(
            torch.zeros(2, target_len, 2, dtype=torch.long), torch.zeros(2, teacher_len, 2, dtype=torch.long), mode=mode
        )
        assert alignment.mask.shape == (2, target_len) and alignment.teacher_to_target.shape == (2, teacher_len)
        gathered = alignment.gather(torch.ones(2, teacher_len, 5))
        assert gathered.shape == (2, target_len, 5) and not gathered.any()


def test_to_moves_every_tensor():
    batch = encode_for_alignment(
        ["hello world"], TOKENIZERS["bpe300"], TOKENIZERS["bpe1000"], max_length=8, mode="mean"
    )
    moved = batch.to("meta")
    assert isinstance(moved, CrossTokenizerBatch) and moved.alignment.mode == "mean"
    tensors = [moved.target_ids, moved.teacher_offsets, moved.alignment.hi, moved.alignment.teacher_to_target]
    assert all(t.device.type == "meta" for t in tensors)
    assert batch.target_ids.device.type == "cpu"


# ----------------------------------------------------------------------------- errors


def test_bad_offsets_raise_naming_the_argument_and_shapes():
    good = torch.zeros(2, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"same batch size.*\(2, 3, 2\).*\(3, 4, 2\)"):
        align_tokens(good, torch.zeros(3, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"teacher_offsets must have shape \[B, T, 2\].*\(2, 3\)"):
        align_tokens(good, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"target_offsets must have shape \[B, T, 2\].*\(2, 3, 3\)"):
        align_tokens(torch.zeros(2, 3, 3, dtype=torch.long), good)
    with pytest.raises(TypeError, match="target_offsets must hold integers"):
        align_tokens(good.float(), good)
    with pytest.raises(TypeError, match="teacher_offsets must hold integers"):
        align_tokens(good, np.zeros((2, 3, 2)))
    with pytest.raises(TypeError, match="teacher_offsets must be a numpy array or a torch tensor"):
        align_tokens(good, [[[0, 1]]])
    with pytest.raises(ValueError, match=r"target_offsets: start > end at \[batch, position\] = \[1, 2\]: \[5, 4\]"):
        bad = good.clone()
        bad[1, 2] = torch.tensor([5, 4])
        align_tokens(bad, good)
    with pytest.raises(ValueError, match="teacher_offsets: special/padding tokens must have both"):
        bad = good.clone()
        bad[0, 0] = torch.tensor([-1, 3])
        align_tokens(good, bad)
    with pytest.raises(ValueError, match="mode must be one of"):
        align_tokens(good, good, mode="first")


def test_gather_rejects_mismatched_features():
    alignment = align_tokens(torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 5, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[B=2, S=5, d\].*\(2, 4, 8\)"):
        alignment.gather(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match=r"\[B=2, S=5, d\].*\(2, 5\)"):
        alignment.gather(torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        alignment.gather(torch.zeros(2, 5, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="alignment.to"):
        alignment.gather(torch.zeros(2, 5, 8, device="meta"))


def test_encode_for_alignment_rejects_bad_arguments():
    bpe, wordpiece = TOKENIZERS["bpe300"], TOKENIZERS["wordpiece"]
    with pytest.raises(TypeError, match="texts must be a sequence of str"):
        encode_for_alignment("one text", bpe, wordpiece, max_length=4)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        encode_for_alignment(["a", 3], bpe, wordpiece, max_length=4)
    with pytest.raises(ValueError, match="max_length must be >= 1, got 0"):
        encode_for_alignment(["a"], bpe, wordpiece, max_length=0)
    with pytest.raises(ValueError, match="teacher_max_length must be >= 1 or None, got -1"):
        encode_for_alignment(["a"], bpe, wordpiece, max_length=4, teacher_max_length=-1)
    with pytest.raises(ValueError, match="mode must be one of"):
        encode_for_alignment(["a"], bpe, wordpiece, max_length=4, mode="max")
    with pytest.raises(TypeError, match="teacher_tokenizer must be a tokenizers.Tokenizer"):
        encode_for_alignment(["a"], bpe, "gpt2", max_length=4)
    trimming = Tokenizer.from_str(bpe.to_str())
    trimming.post_processor = processors.ByteLevel(trim_offsets=True)
    with pytest.raises(ValueError, match="teacher_tokenizer trims token offsets"):
        encode_for_alignment(["a"], bpe, trimming, max_length=4)
    truncating = Tokenizer.from_str(bpe.to_str())
    truncating.enable_truncation(8)
    with pytest.raises(ValueError, match="target_tokenizer has truncation enabled"):
        encode_for_alignment(["a"], truncating, wordpiece, max_length=4)


def test_old_import_paths_still_work_with_a_deprecation_warning():
    import importlib
    import sys

    import letkit.data
    import letkit.token_alignment

    sys.modules.pop("letkit.tokenization", None)
    with pytest.warns(DeprecationWarning, match="letkit.tokenization is deprecated"):
        old = importlib.import_module("letkit.tokenization")
    assert old.TokenAlignment is TokenAlignment and old.same_tokenizer is same_tokenizer
    assert set(old.__all__) == set(letkit.token_alignment.__all__)
    for name in ("TeacherTokenizedLoader", "decode_with_offsets", "tokenize_for_teacher"):
        with pytest.warns(DeprecationWarning, match=f"letkit.data.{name} moved to letkit.token_alignment.{name}"):
            assert getattr(letkit.data, name) is getattr(letkit.token_alignment, name)
    with pytest.raises(AttributeError, match="module 'letkit.data' has no attribute 'nothing'"):
        letkit.data.nothing
