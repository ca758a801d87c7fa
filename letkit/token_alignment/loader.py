"""Cross-tokenizer LET on token shards: a loader that adds the teacher's tokenization of each batch's text."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import torch
from tokenizers import Tokenizer

from letkit.token_alignment.alignment import ALIGNMENT_MODES, AlignMode, TokenAlignment
from letkit.token_alignment.encoding import tokenize_for_teacher
from letkit.validation import check_int

if TYPE_CHECKING:
    from letkit.data import ShardedTokenLoader


class TeacherTokenizedLoader:
    """Cross-tokenizer LET data: wraps a :class:`letkit.data.ShardedTokenLoader` and adds, to each target batch, the
    teacher's tokenization of the same text and the causal alignment between the two (:func:`tokenize_for_teacher`).

    Each input row (``batch[:, :-1]``) is decoded back to text with the target tokenizer
    (:func:`decode_with_offsets`), the texts are encoded with the teacher tokenizer (its special tokens, e.g. a
    BOS, included but never aligned; a literal ``<|endoftext|>`` written by the target's decoder is read by the
    teacher as whatever its tokenizer makes of that text), cut to ``teacher_max_length`` tokens and right-padded
    with id 0. This runs ``prefetch`` batches ahead in a background thread. ``__next__`` returns
    ``(batch, teacher_ids, alignment)``.

    The state is the wrapped loader's, at the last batch returned (not the prefetched ones), so checkpoints of a
    run with and without the wrapper are interchangeable and resume exactly.

    Args:
        loader: the target-token loader.
        target_tokenizer, teacher_tokenizer: ``tokenizers.Tokenizer`` of the data and of the teacher.
        mode: ``"last"`` or ``"mean"`` (see :func:`align_tokens`).
        teacher_max_length: most teacher tokens per row (e.g. its max_position_embeddings); None: no limit.
        prefetch: batches prepared ahead.
    """

    def __init__(self, loader: ShardedTokenLoader, target_tokenizer: Tokenizer, teacher_tokenizer: Tokenizer, *,
                 mode: AlignMode = "last", teacher_max_length: int | None = None, prefetch: int = 2) -> None:
        if mode not in ALIGNMENT_MODES:
            raise ValueError(f"mode must be one of {ALIGNMENT_MODES}, got {mode!r}")
        teacher_max_length = check_int("teacher_max_length", teacher_max_length, minimum=1, optional=True)
        prefetch = check_int("prefetch", prefetch, minimum=1)
        self.loader, self.target_tokenizer, self.teacher_tokenizer = loader, target_tokenizer, teacher_tokenizer
        self.mode, self.teacher_max_length, self.prefetch = mode, teacher_max_length, prefetch
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="teacher-tokenize")
        self._pending: list[tuple[dict[str, Any], torch.Tensor, Any]] = []  # (loader state after it, batch, future)
        self._state = loader.state_dict()

    @property
    def vocab_size(self) -> int:
        """Vocabulary size of the wrapped (target) data."""
        return self.loader.vocab_size

    def tokenize_for_teacher(self, batch: torch.Tensor) -> tuple[torch.Tensor, TokenAlignment]:
        """``(teacher_ids [B, S], alignment)`` for the inputs ``batch[:, :-1]`` of a target batch."""
        return tokenize_for_teacher(batch[:, :-1], self.target_tokenizer, self.teacher_tokenizer, mode=self.mode,
                                    teacher_max_length=self.teacher_max_length)

    def __iter__(self) -> TeacherTokenizedLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, TokenAlignment]:
        while len(self._pending) < self.prefetch:
            batch = next(self.loader)
            self._pending.append((self.loader.state_dict(), batch, self._executor.submit(self.tokenize_for_teacher, batch)))
        state, batch, future = self._pending.pop(0)
        teacher_ids, alignment = future.result()
        self._state = state
        return batch, teacher_ids, alignment

    def state_dict(self) -> dict[str, Any]:
        """The wrapped loader's state after the last batch returned."""
        return dict(self._state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict` (the prefetched batches are dropped)."""
        self._drop_pending()
        self.loader.load_state_dict(state)
        self._state = self.loader.state_dict()

    def _drop_pending(self) -> None:
        for _, _, future in self._pending:
            future.cancel()
        self._pending.clear()

    def close(self) -> ShardedTokenLoader:
        """Stop the thread; returns the wrapped loader, positioned after the last batch returned."""
        self._drop_pending()
        self._executor.shutdown(wait=True)
        self.loader.load_state_dict(self._state)
        return self.loader
