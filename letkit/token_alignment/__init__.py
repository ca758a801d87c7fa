"""Cross-tokenizer LET: a teacher with its own tokenizer, its features given to the target's tokens causally.

* :mod:`~letkit.token_alignment.alignment`: the rule (:func:`align_tokens`, :class:`TokenAlignment`), from the
  character spans of both tokenizations; ``ALIGNMENT_MODES``.
* :mod:`~letkit.token_alignment.encoding`: tokenizing for both sides, from texts (:func:`encode_for_alignment`)
  or from target token ids (:func:`tokenize_for_teacher`); :func:`same_tokenizer`.
* :mod:`~letkit.token_alignment.loader`: :class:`TeacherTokenizedLoader`, the same for batches of token shards.
* :mod:`~letkit.token_alignment.compatibility`: :func:`check_teacher_compatibility`, whether a teacher can read
  the data, with or without alignment.
"""

from letkit.token_alignment.alignment import ALIGNMENT_MODES, AlignMode, TokenAlignment, align_tokens
from letkit.token_alignment.compatibility import check_teacher_compatibility
from letkit.token_alignment.encoding import (
    CrossTokenizerBatch,
    decode_with_offsets,
    encode_for_alignment,
    same_tokenizer,
    tokenize_for_teacher,
    tokenizer_differences,
)
from letkit.token_alignment.loader import TeacherTokenizedLoader

__all__ = [
    "ALIGNMENT_MODES",
    "AlignMode",
    "CrossTokenizerBatch",
    "TeacherTokenizedLoader",
    "TokenAlignment",
    "align_tokens",
    "check_teacher_compatibility",
    "decode_with_offsets",
    "encode_for_alignment",
    "same_tokenizer",
    "tokenize_for_teacher",
    "tokenizer_differences",
]
