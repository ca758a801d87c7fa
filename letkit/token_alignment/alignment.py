"""The causal alignment rule: give each target token the teacher feature for the same text, causally.

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

from dataclasses import dataclass, fields, replace
from typing import Literal, get_args

import numpy as np
import torch
from torch import Tensor

AlignMode = Literal["last", "mean"]
ALIGNMENT_MODES: tuple[str, ...] = get_args(AlignMode)
"""The cross-tokenizer alignment modes: ``"last"`` teacher token of each target token, or the ``"mean"`` of them."""


@dataclass(frozen=True)
class TokenAlignment:
    """Which teacher tokens feed each target position (see the module docstring for the rule).

    Attributes:
        hi: [B, T] int64, the last available teacher content token of target position t: the one
            ``mode="last"`` uses (``"mean"`` uses every j with ``teacher_to_target[b, j] == t``); 0 where
            ``mask`` is False.
        mask: [B, T] bool, True where target position t receives a teacher feature.
        teacher_to_target: [B, S] int64, the target position that teacher token j contributes to
            under this mode, -1 if none (special, padding, unused by "last", or beyond the target).
        mode: "last" or "mean".
    """

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
    if mode not in ALIGNMENT_MODES:
        raise ValueError(f"mode must be one of {ALIGNMENT_MODES}, got {mode!r}")
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
        return TokenAlignment(
            hi=torch.zeros(batch, target_len, dtype=torch.int64, device=device),
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

    if mode == "last":
        teacher_to_target = torch.full((batch, teacher_len + 1), -1, dtype=torch.int64, device=device)
        teacher_to_target.scatter_(1, torch.where(mask, hi, teacher_len), torch.where(mask, target_positions, -1))
        teacher_to_target = teacher_to_target[:, :teacher_len].contiguous()
    else:
        owner = torch.searchsorted(target_reach, teacher_reach)  # first t with K_t >= R_j
        teacher_to_target = torch.where(teacher_content & (owner < target_len), owner, -1)
    return TokenAlignment(hi=hi, mask=mask, teacher_to_target=teacher_to_target, mode=mode)
