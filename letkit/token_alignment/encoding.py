"""Tokenizing for cross-tokenizer LET: the same text for both tokenizers, and their causal alignment.

* :func:`encode_for_alignment`: raw texts -> both tokenizations and the :class:`TokenAlignment` between them.
* :func:`tokenize_for_teacher`: target token rows (e.g. windows of pretokenized data) -> decoded back to text
  (:func:`decode_with_offsets`), re-tokenized for the teacher, aligned.
* :func:`same_tokenizer`: whether two tokenizers make the same ids, so that none of this is needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch import Tensor

from letkit.token_alignment.alignment import ALIGNMENT_MODES, AlignMode, TokenAlignment, align_tokens
from letkit.validation import check_int


@dataclass(frozen=True)
class CrossTokenizerBatch:
    """A batch tokenized by both tokenizers, right-padded, with the alignment between them.

    Attributes:
        target_ids: [B, T] int64, padded with 0.
        target_attention_mask: [B, T] bool, True on real tokens (special tokens included).
        teacher_ids: [B, S] int64, padded with 0.
        teacher_attention_mask: [B, S] bool.
        target_offsets: [B, T, 2] int64 character spans used for the alignment, -1 on special and
            padding tokens.
        teacher_offsets: [B, S, 2] int64, same convention.
        alignment: the :class:`TokenAlignment` from teacher to target positions.
    """

    target_ids: Tensor
    target_attention_mask: Tensor
    teacher_ids: Tensor
    teacher_attention_mask: Tensor
    target_offsets: Tensor
    teacher_offsets: Tensor
    alignment: TokenAlignment

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CrossTokenizerBatch:
        """Return a copy with every tensor (and the alignment) on ``device``."""
        moved = {f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)}
        return replace(self, **moved)


def _state(component: object) -> object:
    return None if component is None else json.loads(component.__getstate__())


def _trims_offsets(state: object) -> bool:
    if isinstance(state, dict):
        return state.get("trim_offsets") is True or any(_trims_offsets(v) for v in state.values())
    if isinstance(state, list):
        return any(_trims_offsets(v) for v in state)
    return False


def _check_tokenizer(tokenizer: object, name: str) -> None:
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"{name} must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if _trims_offsets(_state(tokenizer.post_processor)):
        raise ValueError(
            f"{name} trims token offsets (post-processor with trim_offsets=true), so a token ending in "
            "spaces reports an end before them and its feature would leak them; set trim_offsets=False, "
            "e.g. tokenizer.post_processor = tokenizers.processors.ByteLevel(trim_offsets=False)"
        )


def same_tokenizer(a: Tokenizer, b: Tokenizer) -> bool:
    """True when ``a`` and ``b`` turn every text into the same ids and offsets.

    Compares model (vocabulary, merges), added tokens, normalizer, pre-tokenizer and post-processor;
    decoder, padding and truncation settings are ignored. Serialises both tokenizers, so call it once
    at setup: when True, feed the target's ids to the teacher and use position t of both.
    """
    return not tokenizer_differences(a, b)


def tokenizer_differences(a: Tokenizer, b: Tokenizer) -> list[str]:
    """The components in which ``a`` and ``b`` differ, of those :func:`same_tokenizer` compares (empty: the same)."""
    for name, tokenizer in (("a", a), ("b", b)):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"{name} must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if a is b:
        return []
    state_a, state_b = json.loads(a.to_str()), json.loads(b.to_str())
    keys = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")
    return [key for key in keys if state_a.get(key) != state_b.get(key)]


def _content_tokens(encoding: Encoding) -> tuple[np.ndarray, np.ndarray]:
    """ids [n] and offsets [n, 2] of an encoding without its padding, -1 offsets on special tokens."""
    real = np.asarray(encoding.attention_mask, dtype=bool)
    ids = np.asarray(encoding.ids, dtype=np.int64)[real]
    offsets = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)[real]
    offsets[np.asarray(encoding.special_tokens_mask, dtype=bool)[real]] = -1
    return ids, offsets


def _truncate_target(offsets: np.ndarray, max_length: int) -> tuple[np.ndarray, int]:
    """Keep the first ``max_length`` tokens; return their offsets and the text length they have read.

    When the first dropped content token starts inside the last kept content token's span (both are
    pieces of one multi-byte character), the kept token has read only the text before that character:
    its end is lowered to the dropped token's start.
    """
    kept = offsets[:max_length].copy()
    content = np.flatnonzero(kept[:, 0] >= 0)
    if content.size == 0:
        return kept, 0
    dropped_starts = offsets[max_length:, 0]
    dropped_starts = dropped_starts[dropped_starts >= 0]
    if dropped_starts.size:
        last = content[-1]
        kept[last, 1] = min(kept[last, 1], dropped_starts[0])
    next_starts = np.append(kept[content[1:], 0], np.iinfo(np.int64).max)
    return kept, int(np.minimum(kept[content, 1], next_starts).max())


def _pad(rows: list[np.ndarray], fill: int, tail: tuple[int, ...] = (), min_length: int = 0) -> np.ndarray:
    out = np.full((len(rows), max([min_length, *(len(r) for r in rows)]), *tail), fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _lengths_to_mask(rows: list[np.ndarray]) -> Tensor:
    lengths = [len(row) for row in rows]
    return torch.arange(max(lengths, default=0)) < torch.tensor(lengths, dtype=torch.int64)[:, None]


def encode_for_alignment(
    texts: Sequence[str],
    target_tokenizer: Tokenizer,
    teacher_tokenizer: Tokenizer,
    *,
    max_length: int,
    mode: AlignMode = "last",
    teacher_max_length: int | None = None,
) -> CrossTokenizerBatch:
    """Tokenize ``texts`` with both tokenizers and align teacher tokens to target positions.

    The target encoding (special tokens included, as its post-processor adds them) keeps its first
    ``max_length`` tokens, so a trailing EOS/SEP is dropped when the text is cut. The teacher encodes
    only the text the kept target tokens have read (``text[:cut]``), so no teacher token covers text
    beyond the target; its encoding keeps its first ``teacher_max_length`` tokens when given (target
    positions whose teacher tokens were cut are then masked). Both are right-padded with id 0 to the
    longest row. Tokenizers with padding enabled are fine (their padding is removed); the target
    tokenizer must not truncate by itself and neither may trim offsets (ValueError).

    Args:
        texts: the batch's raw texts.
        target_tokenizer: tokenizer of the model being trained.
        teacher_tokenizer: tokenizer of the frozen teacher.
        max_length: maximum number of target tokens per row.
        mode: "last" or "mean" (see :func:`align_tokens`).
        teacher_max_length: maximum number of teacher tokens per row, None for no limit.
    """
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
    not_str = [i for i, text in enumerate(texts) if not isinstance(text, str)]
    if not_str:
        raise TypeError(f"texts must all be str; texts[{not_str[0]}] is {type(texts[not_str[0]]).__name__}")
    max_length = check_int("max_length", max_length, minimum=1)
    teacher_max_length = check_int("teacher_max_length", teacher_max_length, minimum=1, optional=True)
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"mode must be one of {ALIGNMENT_MODES}, got {mode!r}")
    _check_tokenizer(target_tokenizer, "target_tokenizer")
    _check_tokenizer(teacher_tokenizer, "teacher_tokenizer")
    if target_tokenizer.truncation is not None:
        raise ValueError(
            f"target_tokenizer has truncation enabled ({target_tokenizer.truncation}); disable it "
            "(tokenizer.no_truncation()) and pass max_length, which cuts without splitting a character"
        )

    target_ids, target_offsets, teacher_texts = [], [], []
    for text, encoding in zip(texts, target_tokenizer.encode_batch(list(texts)), strict=True):
        ids, offsets = _content_tokens(encoding)
        offsets, cut = _truncate_target(offsets, max_length)
        target_ids.append(ids[:max_length])
        target_offsets.append(offsets)
        teacher_texts.append(text[:cut])
    teacher_ids, teacher_offsets = [], []
    for encoding in teacher_tokenizer.encode_batch(teacher_texts):
        ids, offsets = _content_tokens(encoding)
        teacher_ids.append(ids[:teacher_max_length])
        teacher_offsets.append(offsets[:teacher_max_length])

    target_offsets_t = torch.from_numpy(_pad(target_offsets, -1, (2,)))
    teacher_offsets_t = torch.from_numpy(_pad(teacher_offsets, -1, (2,)))
    return CrossTokenizerBatch(
        target_ids=torch.from_numpy(_pad(target_ids, 0)),
        target_attention_mask=_lengths_to_mask(target_ids),
        teacher_ids=torch.from_numpy(_pad(teacher_ids, 0)),
        teacher_attention_mask=_lengths_to_mask(teacher_ids),
        target_offsets=target_offsets_t,
        teacher_offsets=teacher_offsets_t,
        alignment=align_tokens(target_offsets_t, teacher_offsets_t, mode=mode),
    )


def decode_with_offsets(ids: Sequence[int] | np.ndarray, tokenizer: Tokenizer) -> tuple[str, np.ndarray]:
    """The text of token ``ids`` (special tokens written out) and each token's character span ``[start, end)`` in it.

    Decoded incrementally (``tokenizers.decoders.DecodeStream``), so the spans tile the text and follow the
    tokenizer's decoder (leading spaces, byte-level pieces). A token that ends inside a multi-byte character has
    no text of its own yet and gets the span ``(-1, -1)``; the token completing the character spans all of it.
    """
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=False)
    offsets = np.full((len(ids), 2), -1, dtype=np.int64)
    pieces, length = [], 0
    for t, token in enumerate(ids):
        piece = stream.step(tokenizer, int(token))
        if piece:
            pieces.append(piece)
            offsets[t] = (length, length + len(piece))
            length += len(piece)
    return "".join(pieces), offsets


def tokenize_for_teacher(
    inputs: Tensor,
    target_tokenizer: Tokenizer,
    teacher_tokenizer: Tokenizer,
    *,
    mode: AlignMode = "last",
    teacher_max_length: int | None = None,
) -> tuple[Tensor, TokenAlignment]:
    """The teacher's tokenization of target token rows, and the causal alignment between the two.

    Each row of ``inputs`` [B, T] is decoded back to text with the target tokenizer (:func:`decode_with_offsets`),
    the texts are encoded with the teacher tokenizer (its special tokens, e.g. a BOS, included but never aligned),
    cut to ``teacher_max_length`` tokens (None: no limit) and right-padded with id 0 (at least one column).
    Returns ``(teacher_ids [B, S], alignment)``, the alignment from :func:`align_tokens` with ``mode``.
    """
    if not isinstance(inputs, Tensor) or inputs.dim() != 2 or inputs.is_floating_point() or inputs.is_complex():
        raise ValueError(f"inputs must be a [B, T] tensor of token ids, got {type(inputs).__name__} "
                         f"{tuple(getattr(inputs, 'shape', ()))} {getattr(inputs, 'dtype', '')}")
    teacher_max_length = check_int("teacher_max_length", teacher_max_length, minimum=1, optional=True)
    decoded = [decode_with_offsets(row, target_tokenizer) for row in inputs.tolist()]
    ids, offsets = [], []
    for encoding in teacher_tokenizer.encode_batch([text for text, _ in decoded]):
        row_ids, row_offsets = _content_tokens(encoding)  # the tokenizer's own padding, if any, is dropped
        ids.append(row_ids[:teacher_max_length])
        offsets.append(row_offsets[:teacher_max_length])
    target_offsets = torch.from_numpy(np.stack([row_offsets for _, row_offsets in decoded]))
    teacher_offsets = torch.from_numpy(_pad(offsets, -1, (2,), min_length=1))
    alignment = align_tokens(target_offsets, teacher_offsets, mode=mode)
    return torch.from_numpy(_pad(ids, 0, min_length=1)), alignment
