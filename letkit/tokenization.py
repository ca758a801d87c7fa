"""Cross-tokenizer alignment: give each target token the teacher feature for the same text, causally.

LET pulls the target's layer-k state at position t towards the teacher's last-layer feature "for the
same token". With a shared tokenizer that is position t of both. With different tokenizers the two
token sequences cut the text at different places, and we align them through the character spans that
`tokenizers` reports for every token (character indices into the original string, also for byte-level
BPE; the tests check this, multi-byte characters and emoji included).

Conventions: "content" tokens carry text. Special tokens added by a post-processor (BOS, CLS, SEP,
EOS; `tokenizers` reports them with offsets (0, 0)) and padding are marked with offsets (-1, -1): they
never receive a feature and never give one. An added token written in the text itself (a literal
"<|endoftext|>") is content with its real span.

The rule, per sequence:

* Teacher token j spans characters [a_j, b_j). The teacher is causal, so its feature at j depends on
  teacher tokens 0..j: its *reach* is R_j = max(b_i : i <= j, i content).
* Target token t spans [s_t, e_t). Its *safe end* is min(e_t, s_n), n the next target content token:
  every byte-level piece of a split multi-byte character reports the whole character, so a piece
  that the next token continues has only read the text before that character. The target's *reach*
  is K_t = max(safe end of u : u <= t, u content), or -1 if there is none; K_{-1} = -1.
* Teacher token j is *available* to target position t iff  K_{t-1} < R_j <= K_t: each teacher token
  goes to the first target position that has read all the text its feature depends on. The available
  tokens of t are the content tokens of a contiguous range [lo_t, hi_t]; ranges are disjoint. When
  the target's tokens tile the text (byte-level BPE), K_{t-1} is where token t starts, so these are
  the teacher tokens that overlap t's span and end no later than its end; with a target that skips
  whitespace (WordPiece), a teacher token ending in the skipped gap goes to the next target token.
* mode="last": t receives the feature of hi_t, the last available teacher token.
  mode="mean": t receives the mean of the features of its available teacher content tokens.
* t is valid (``mask``) iff it is a content token with at least one available teacher token.

No future leak: a valid position t only receives features with R_j <= K_t, text the target itself has
read at t (for monotone offsets K_t <= e_t: nothing that ends after target token t's end).

What offsets cannot express, documented rather than hidden:

* Offsets must cover each token's whole text. ``processors.ByteLevel(trim_offsets=True)`` and
  ``RobertaProcessing(trim_offsets=True)`` drop spaces from spans, so a token such as "\\n   " reports
  an end before its spaces and its feature would leak them. :func:`encode_for_alignment` refuses such
  tokenizers; set ``trim_offsets=False`` (the usual setting of byte-level LLM tokenizers).
* Character offsets cannot tell how many bytes of a split character a piece has read, so such a
  piece gets at most a teacher token that ended before the character. With identical tokenizers
  the rule is therefore the identity on every token that ends on a character boundary; callers that
  check :func:`same_tokenizer` once skip all of this and use position t of both.
* Subword tokenizers choose boundaries from a whole pre-tokenized word, so where a teacher token ends
  may reflect characters after it in the same word. The target has the same property for its own
  tokens; offsets cannot remove it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import numpy as np
import torch
from tokenizers import Encoding, Tokenizer
from torch import Tensor

__all__ = [
    "AlignMode",
    "CrossTokenizerBatch",
    "TokenAlignment",
    "align_tokens",
    "encode_for_alignment",
    "same_tokenizer",
]

AlignMode = Literal["last", "mean"]
_MODES = ("last", "mean")


@dataclass(frozen=True)
class TokenAlignment:
    """Which teacher tokens feed each target position (see the module docstring for the rule).

    Attributes:
        lo: [B, T] int64, first available teacher content token of target position t (inclusive).
        hi: [B, T] int64, last available teacher content token (inclusive). For ``mode="last"``
            lo == hi, the one teacher token used. Both are 0 where ``mask`` is False.
        mask: [B, T] bool, True where target position t receives a teacher feature.
        teacher_to_target: [B, S] int64, the target position that teacher token j contributes to
            under this mode, -1 if none (special, padding, unused by "last", or beyond the target).
        mode: "last" or "mean".
    """

    lo: Tensor
    hi: Tensor
    mask: Tensor
    teacher_to_target: Tensor
    mode: AlignMode

    @property
    def target_length(self) -> int:
        return self.mask.shape[1]

    @property
    def teacher_length(self) -> int:
        return self.teacher_to_target.shape[1]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenAlignment:
        """Return a copy with every tensor on ``device``."""
        moved = {
            f.name: getattr(self, f.name).to(device, non_blocking=non_blocking)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(self, **moved)

    def gather(self, teacher_features: Tensor) -> Tensor:
        """Map teacher features [B, S, d] to target positions: returns [B, T, d], zeros where ``~mask``.

        "mean" sums each target's teacher tokens with one ``index_add`` (the ranges are disjoint),
        accumulating in float32 for bf16/fp16 features (no cumulative-sum cancellation), and returns
        the features' dtype.
        """
        if not isinstance(teacher_features, Tensor) or not teacher_features.is_floating_point():
            raise TypeError(
                "teacher_features must be a floating-point tensor, got "
                f"{type(teacher_features).__name__} {getattr(teacher_features, 'dtype', '')}"
            )
        batch, teacher_len = self.teacher_to_target.shape
        if teacher_features.dim() != 3 or tuple(teacher_features.shape[:2]) != (batch, teacher_len):
            raise ValueError(
                f"teacher_features must have shape [B={batch}, S={teacher_len}, d] to match the "
                f"alignment, got {tuple(teacher_features.shape)}"
            )
        if teacher_features.device != self.mask.device:
            raise ValueError(
                f"teacher_features is on {teacher_features.device} but the alignment is on "
                f"{self.mask.device}; call alignment.to(device) first"
            )
        dim = teacher_features.shape[-1]
        target_len = self.target_length
        rows = teacher_features.reshape(batch * teacher_len, dim)
        if teacher_len == 0:
            return teacher_features.new_zeros(batch, target_len, dim)
        if self.mode == "last":
            row_base = torch.arange(batch, device=self.mask.device).unsqueeze(1) * teacher_len
            picked = rows.index_select(0, (self.hi + row_base).reshape(-1)).view(batch, target_len, dim)
            return picked.masked_fill_(~self.mask.unsqueeze(-1), 0)
        acc_dtype = torch.float32 if teacher_features.element_size() < 4 else teacher_features.dtype
        slots = batch * target_len  # one extra slot collects every teacher token that is not used
        row_base = torch.arange(batch, device=self.mask.device).unsqueeze(1) * target_len
        owner = torch.where(self.teacher_to_target >= 0, self.teacher_to_target + row_base, slots).reshape(-1)
        sums = torch.zeros(slots + 1, dim, dtype=acc_dtype, device=teacher_features.device)
        sums.index_add_(0, owner, rows.to(acc_dtype))
        counts = torch.bincount(owner, minlength=slots + 1).clamp_(min=1).to(acc_dtype)
        mean = sums[:slots] / counts[:slots].unsqueeze(-1)
        return mean.view(batch, target_len, dim).to(teacher_features.dtype)


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


def _as_offsets(offsets: np.ndarray | Tensor, name: str) -> Tensor:
    if isinstance(offsets, np.ndarray):
        if not np.issubdtype(offsets.dtype, np.integer):
            raise TypeError(f"{name} must hold integers, got numpy dtype {offsets.dtype}")
        offsets = torch.from_numpy(offsets)
    elif isinstance(offsets, Tensor):
        if offsets.is_floating_point() or offsets.is_complex() or offsets.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {offsets.dtype}")
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(offsets).__name__}")
    if offsets.dim() != 3 or offsets.shape[-1] != 2:
        raise ValueError(f"{name} must have shape [B, T, 2] (start, end), got {tuple(offsets.shape)}")
    offsets = offsets.to(torch.int64)
    start, end = offsets.unbind(-1)
    if bool(((start < 0) != (end < 0)).any()):
        raise ValueError(f"{name}: special/padding tokens must have both start and end = -1")
    if bool((start > end).any()):
        bad = (start > end).nonzero()[0].tolist()
        raise ValueError(f"{name}: start > end at [batch, position] = {bad}: {offsets[bad[0], bad[1]].tolist()}")
    return offsets


def _reverse_cummin(values: Tensor) -> Tensor:
    return values.flip(1).cummin(1).values.flip(1)


def align_tokens(
    target_offsets: np.ndarray | Tensor,
    teacher_offsets: np.ndarray | Tensor,
    *,
    mode: AlignMode = "last",
) -> TokenAlignment:
    """Build the causal alignment from teacher tokens to target tokens (rule: module docstring).

    Args:
        target_offsets: [B, T, 2] integer character spans (start, end) of the target tokens, -1 for
            special and padding tokens. numpy or torch; the result lives on its device.
        teacher_offsets: [B, S, 2], same convention, spans into the same texts.
        mode: "last" or "mean".

    Spans must cover each token's whole text (see the module docstring on ``trim_offsets``) and a
    sequence must not end inside a character that the next, cut-off, token continues
    (:func:`encode_for_alignment` lowers the end of such a last token to the character's start).

    Fully vectorised: a few cumulative max/min and two batched ``searchsorted`` calls.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    target = _as_offsets(target_offsets, "target_offsets")
    teacher = _as_offsets(teacher_offsets, "teacher_offsets").to(target.device)
    if target.shape[0] != teacher.shape[0]:
        raise ValueError(
            "target_offsets and teacher_offsets must have the same batch size, got "
            f"{tuple(target.shape)} and {tuple(teacher.shape)}"
        )
    batch, target_len, _ = target.shape
    teacher_len = teacher.shape[1]
    device = target.device
    target_content = target[..., 0] >= 0
    teacher_content = teacher[..., 0] >= 0
    if target_len == 0 or teacher_len == 0:
        zeros = torch.zeros(batch, target_len, dtype=torch.int64, device=device)
        return TokenAlignment(
            lo=zeros,
            hi=zeros.clone(),
            mask=torch.zeros(batch, target_len, dtype=torch.bool, device=device),
            teacher_to_target=torch.full((batch, teacher_len), -1, dtype=torch.int64, device=device),
            mode=mode,
        )

    target_positions = torch.arange(target_len, device=device).expand(batch, target_len)
    next_content = _reverse_cummin(torch.where(target_content, target_positions, target_len))
    next_content = torch.cat([next_content[:, 1:], next_content.new_full((batch, 1), target_len)], dim=1)
    never = torch.full((batch, 1), torch.iinfo(torch.int64).max, dtype=torch.int64, device=device)
    safe_end = torch.minimum(target[..., 1], torch.cat([target[..., 0], never], dim=1).gather(1, next_content))
    target_reach = torch.where(target_content, safe_end, -1).cummax(1).values.contiguous()
    previous_reach = torch.cat([target_reach.new_full((batch, 1), -1), target_reach[:, :-1]], dim=1)
    teacher_reach = torch.where(teacher_content, teacher[..., 1], -1).cummax(1).values.contiguous()

    range_lo = torch.searchsorted(teacher_reach, previous_reach.contiguous(), right=True)  # in [0, S]
    range_hi = torch.searchsorted(teacher_reach, target_reach, right=True) - 1  # in [-1, S-1]
    positions = torch.arange(teacher_len, device=device).expand(batch, teacher_len)
    last_content = torch.where(teacher_content, positions, -1).cummax(1).values
    first_content = _reverse_cummin(torch.where(teacher_content, positions, teacher_len))
    lo = torch.cat([first_content, first_content.new_full((batch, 1), teacher_len)], 1).gather(1, range_lo)
    hi = torch.cat([last_content.new_full((batch, 1), -1), last_content], 1).gather(1, range_hi + 1)
    mask = target_content & (lo <= hi)
    hi = torch.where(mask, hi, 0)
    lo = hi if mode == "last" else torch.where(mask, lo, 0)

    if mode == "last":
        teacher_to_target = torch.full((batch, teacher_len + 1), -1, dtype=torch.int64, device=device)
        teacher_to_target.scatter_(1, torch.where(mask, hi, teacher_len), torch.where(mask, target_positions, -1))
        teacher_to_target = teacher_to_target[:, :teacher_len].contiguous()
    else:
        owner = torch.searchsorted(target_reach, teacher_reach)  # first t with K_t >= R_j
        teacher_to_target = torch.where(teacher_content & (owner < target_len), owner, -1)
    return TokenAlignment(lo=lo, hi=hi, mask=mask, teacher_to_target=teacher_to_target, mode=mode)


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
    for name, tokenizer in (("a", a), ("b", b)):
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"{name} must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    if a is b:
        return True
    state_a, state_b = json.loads(a.to_str()), json.loads(b.to_str())
    keys = ("model", "added_tokens", "normalizer", "pre_tokenizer", "post_processor")
    return all(state_a.get(key) == state_b.get(key) for key in keys)


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


def _pad(rows: list[np.ndarray], fill: int, tail: tuple[int, ...] = ()) -> np.ndarray:
    out = np.full((len(rows), max((len(r) for r in rows), default=0), *tail), fill, dtype=np.int64)
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
    for name, value, allow_none in (
        ("max_length", max_length, False),
        ("teacher_max_length", teacher_max_length, True),
    ):
        if value is None and allow_none:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
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
