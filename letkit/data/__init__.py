"""Pretraining data: text files -> token shards on disk (:mod:`letkit.data.shards`, ``letkit tokenize``) -> a
distributed, resumable batch loader (:mod:`letkit.data.loader`)."""

import warnings
from typing import Any

from letkit.data.loader import ShardedTokenLoader, WindowPermutation
from letkit.data.shards import find_sources, load_index, main, token_dtype, tokenize_corpus

__all__ = ["ShardedTokenLoader", "WindowPermutation", "find_sources", "load_index", "main", "token_dtype",
           "tokenize_corpus"]

_MOVED_TO_TOKEN_ALIGNMENT = ("TeacherTokenizedLoader", "decode_with_offsets", "tokenize_for_teacher")


def __getattr__(name: str) -> Any:
    """Deprecated aliases of the cross-tokenizer names that moved to :mod:`letkit.token_alignment`."""
    if name in _MOVED_TO_TOKEN_ALIGNMENT:
        import letkit.token_alignment

        warnings.warn(f"letkit.data.{name} moved to letkit.token_alignment.{name}; this alias will be removed",
                      DeprecationWarning, stacklevel=2)
        return getattr(letkit.token_alignment, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
