"""Can this teacher read this data? One check, from plain facts, before any weights are loaded."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from tokenizers import Tokenizer

from letkit.token_alignment.alignment import ALIGNMENT_MODES, AlignMode
from letkit.token_alignment.encoding import _check_tokenizer, tokenizer_differences
from letkit.validation import check_int

TokenizerSpec = Tokenizer | str | os.PathLike | None


def _load_tokenizer(spec: TokenizerSpec, name: str) -> tuple[Tokenizer | None, str | None]:
    """``(tokenizer, SHA-256 of its file)`` of a ``tokenizers.Tokenizer``, a tokenizer.json path, or None."""
    if spec is None or isinstance(spec, Tokenizer):
        return spec, None
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"{name} must be a tokenizers.Tokenizer, a tokenizer.json path or None, "
                        f"got {type(spec).__name__}")
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"{name} {str(path)!r} is not a file")
    data = path.read_bytes()
    try:
        tokenizer = Tokenizer.from_str(data.decode())
    except Exception as e:  # tokenizers raises its own exception type for malformed files
        raise ValueError(f"{name} {str(path)!r} is not a tokenizers tokenizer.json ({type(e).__name__}: {e})") from None
    return tokenizer, hashlib.sha256(data).hexdigest()


def check_teacher_compatibility(
    *,
    teacher_vocab_size: int | None,
    teacher_tokenizer: TokenizerSpec,
    teacher_max_positions: int | None,
    data_vocab_size: int,
    data_tokenizer: TokenizerSpec,
    seq_len: int,
    alignment: AlignMode | None = None,
    data_tokenizer_sha256: str | None = None,
    teacher_name: str | None = None,
    alignment_option: str = "cross-tokenizer alignment",
    seq_len_option: str = "seq_len",
) -> None:
    """Raise ValueError, naming the mismatch and the fix, unless LET can feed this data to this teacher.

    Without ``alignment`` the teacher reads the data's token ids unchanged, so:

    * the tokenizers must make the same ids (:func:`same_tokenizer`; files with the same bytes pass without
      parsing). They are compared when both are known, or when the teacher's is a file and only the data's
      ``data_tokenizer_sha256`` is (then only identical bytes pass); otherwise the vocabulary check is all there is;
    * the teacher needs an embedding for every data id: ``data_vocab_size <= teacher_vocab_size``;
    * it needs a position for every token: ``seq_len <= teacher_max_positions``.

    With ``alignment`` (``"last"`` or ``"mean"``) the teacher reads its own tokenization of the data's text, so:

    * both tokenizers must be at hand (the data's decodes the ids back to text) and the teacher's must report
      offsets that cover each token's whole text (no ``trim_offsets``);
    * the teacher needs an embedding for every id of its own tokenizer;
    * positions are not checked: pass ``teacher_max_length=teacher_max_positions`` to
      :func:`tokenize_for_teacher` / :class:`TeacherTokenizedLoader` / :func:`encode_for_alignment`, which cut the
      teacher's tokens there (target positions beyond are masked out of the loss). Callers that skip
      re-tokenizing when :func:`same_tokenizer` holds should pass ``alignment=None`` in that case.

    Facts that are None are not checked (e.g. a config without ``max_position_embeddings``).

    Args:
        teacher_vocab_size: the teacher's number of token embeddings (its config's ``vocab_size``), or None.
        teacher_tokenizer: the teacher's tokenizer (a ``tokenizers.Tokenizer`` or its tokenizer.json), or None.
        teacher_max_positions: the teacher's ``max_position_embeddings``, or None.
        data_vocab_size: the vocabulary size of the data (not of the target, whose embeddings may be padded).
        data_tokenizer: the tokenizer the data was made with (a ``Tokenizer`` or its tokenizer.json), or None.
        seq_len: tokens per training sequence.
        alignment: None (the teacher reads the data's ids) or a cross-tokenizer mode, one of ``ALIGNMENT_MODES``.
        data_tokenizer_sha256: the SHA-256 of the data's tokenizer.json (e.g. from the token shards' index.json),
            for when the file itself is not at hand.
        teacher_name: how messages name the teacher (e.g. its path).
        alignment_option, seq_len_option: how messages name the caller's own settings for cross-tokenizer
            alignment and for seq_len (e.g. ``"--cross-tokenizer"``, ``"data.seq_len"``).
    """
    if alignment is not None and alignment not in ALIGNMENT_MODES:
        raise ValueError(f"alignment must be None or one of {ALIGNMENT_MODES}, got {alignment!r}")
    teacher_vocab_size = check_int("teacher_vocab_size", teacher_vocab_size, minimum=1, optional=True)
    teacher_max_positions = check_int("teacher_max_positions", teacher_max_positions, minimum=1, optional=True)
    data_vocab_size = check_int("data_vocab_size", data_vocab_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if data_tokenizer_sha256 is not None and not (
            isinstance(data_tokenizer_sha256, str) and re.fullmatch(r"[0-9a-f]{64}", data_tokenizer_sha256)):
        raise ValueError(f"data_tokenizer_sha256 must be 64 lowercase hex digits or None, got {data_tokenizer_sha256!r}")
    teacher_tok, teacher_sha256 = _load_tokenizer(teacher_tokenizer, "teacher_tokenizer")
    data_tok, data_file_sha256 = _load_tokenizer(data_tokenizer, "data_tokenizer")
    data_sha256 = data_file_sha256 or data_tokenizer_sha256
    teacher = "the teacher" + (f" {teacher_name!r}" if teacher_name else "")

    if alignment is not None:
        if teacher_tok is None:
            raise ValueError(f"{alignment_option} re-tokenizes the text for the teacher, but {teacher} has no "
                             "tokenizer (tokenizer.json): use a teacher checkpoint that has one")
        if data_tok is None:
            raise ValueError(f"{alignment_option} decodes the data's token ids back to text, but the data's tokenizer "
                             "is not at hand: pass the tokenizer.json the data was made with (letkit tokenize keeps a "
                             "copy in its output directory)")
        _check_tokenizer(teacher_tok, f"the tokenizer of {teacher}")
        own_vocab = teacher_tok.get_vocab_size()
        if teacher_vocab_size is not None and own_vocab > teacher_vocab_size:
            raise ValueError(f"{teacher} has {teacher_vocab_size} token embeddings but its own tokenizer has "
                             f"{own_vocab} tokens: that tokenizer does not belong to this checkpoint")
        return

    read_ids = ("without cross-tokenizer alignment LET feeds the data's token ids to the teacher, so tokenize the "
                f"data with the teacher's tokenizer, or use {alignment_option} to let the teacher read its own "
                "tokenization of the same text")
    if teacher_tok is not None and (teacher_sha256 is None or teacher_sha256 != data_sha256):
        if data_tok is not None:
            differences = tokenizer_differences(teacher_tok, data_tok)
            if differences:
                raise ValueError(
                    f"{teacher} tokenizes differently from the data ({', '.join(differences)} differ; "
                    f"{teacher_tok.get_vocab_size()} vs {data_tok.get_vocab_size()} tokens): {read_ids}")
        elif teacher_sha256 is not None and data_sha256 is not None:
            raise ValueError(
                f"the tokenizer.json {str(teacher_tokenizer)!r} of {teacher} has SHA-256 {teacher_sha256}, but the data "
                f"was tokenized with one of SHA-256 {data_sha256}: {read_ids} (or, if both tokenize alike, pass the "
                "data's tokenizer.json to compare them)")
    if teacher_vocab_size is not None and data_vocab_size > teacher_vocab_size:
        raise ValueError(f"{teacher} has {teacher_vocab_size} token embeddings, fewer than the data's vocabulary of "
                         f"{data_vocab_size} tokens: {read_ids}")
    if teacher_max_positions is not None and seq_len > teacher_max_positions:
        raise ValueError(f"{seq_len_option}={seq_len} is longer than {teacher} supports (max_position_embeddings="
                         f"{teacher_max_positions}): use {seq_len_option} <= {teacher_max_positions} or a teacher with "
                         "a longer context")
