"""Tokenizer and token ids: the corpus tokenised with a trained byte-level BPE, a given ``tokenizer.json`` or the
teacher's, cached; and whether a given teacher can read what LET will feed it."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from letkit.atomic import atomic_directory, atomic_write_bytes
from letkit.demo.cache import CACHE_FORMAT, content_hash
from letkit.demo.config import EOS_TOKEN, DemoConfig, DemoError, Log
from letkit.demo.corpus import load_corpus
from letkit.teacher import TeacherFeatureExtractor
from letkit.token_alignment import check_teacher_compatibility, same_tokenizer


def train_bpe_tokenizer(docs: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` with ``vocab_size`` entries (``<|endoftext|>`` included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer)
    return tokenizer


def load_tokenizer_file(path: str | os.PathLike) -> Any:
    """The ``tokenizers.Tokenizer`` saved at ``path``; a missing or malformed file is a :class:`DemoError`."""
    from tokenizers import Tokenizer

    if not Path(path).is_file():
        raise DemoError(f"--tokenizer {str(path)!r} does not exist or is not a file")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise DemoError(f"--tokenizer {str(path)!r} is not a tokenizers tokenizer.json: {e}") from e


def encode_documents(tokenizer: Any, docs: Sequence[str]) -> np.ndarray:
    """Token ids of the documents, each followed by ``<|endoftext|>`` when the tokenizer has that token."""
    eos = tokenizer.token_to_id(EOS_TOKEN)
    pieces = []
    for encoding in tokenizer.encode_batch(list(docs), add_special_tokens=False):
        pieces.append(np.asarray(encoding.ids, dtype=np.int64))
        if eos is not None:
            pieces.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


@dataclass
class TokenData:
    """Tokenised training/validation splits and the tokenizer they came from (None for a pre-tokenised corpus)."""

    train: Tensor
    val: Tensor
    vocab_size: int
    tokenizer: Any
    tokenizer_source: str
    key: str
    corpus: str


def prepare_data(
    config: DemoConfig, cache_root: Path, *, teacher: TeacherFeatureExtractor | None = None, log: Log = print
) -> TokenData:
    """Corpus -> tokenizer -> token ids, cached. Everything (the vocabulary of a given ``teacher`` included) is
    validated before anything is written to the cache."""
    corpus = load_corpus(config.corpus, val_fraction=config.val_fraction, bin_dtype=config.bin_dtype, log=log)
    tokenizer, source, to_cache = None, "none (pre-tokenised corpus)", None
    requested_vocab = None  # set when the demo trains the BPE, which may learn fewer tokens than asked for
    if config.tokenizer is not None:
        tokenizer, source = load_tokenizer_file(config.tokenizer), f"file {config.tokenizer}"
    elif teacher is not None and teacher.tokenizer is not None:
        tokenizer, source = teacher.tokenizer, "the teacher's tokenizer"
    elif not corpus.pretokenized:
        requested_vocab = config.vocab_size
        tok_key = content_hash(CACHE_FORMAT, "bpe", corpus.key, str(config.vocab_size))[:20]
        tok_path = cache_root / "tokenizers" / f"{tok_key}.json"
        if tok_path.is_file():
            tokenizer, source = load_tokenizer_file(tok_path), f"byte-level BPE (cached: {tok_path})"
        else:
            t0 = time.perf_counter()
            tokenizer = train_bpe_tokenizer(corpus.train_docs, config.vocab_size)
            source, to_cache = f"byte-level BPE trained in {time.perf_counter() - t0:.1f}s ({tok_path})", tok_path
    if tokenizer is None and config.alignment_mode is not None:
        raise DemoError("cross-tokenizer LET decodes the target's token windows to text, which needs their tokenizer: "
                        "pass --tokenizer with a pre-tokenised corpus")
    tok_hash = content_hash(tokenizer.to_str()) if tokenizer is not None else "none"
    key = content_hash(CACHE_FORMAT, "data", corpus.key, tok_hash)[:20]
    data_dir = cache_root / "data" / key
    if corpus.pretokenized:
        train, val = corpus.train_tokens, corpus.val_tokens
    elif (data_dir / "train.npy").is_file() and (data_dir / "val.npy").is_file():
        train = np.load(data_dir / "train.npy", allow_pickle=False).astype(np.int64)
        val = np.load(data_dir / "val.npy", allow_pickle=False).astype(np.int64)
    else:
        train, val = encode_documents(tokenizer, corpus.train_docs), encode_documents(tokenizer, corpus.val_docs)
    vocab_size = tokenizer.get_vocab_size() if tokenizer is not None else int(max(train.max(initial=0), val.max(initial=0))) + 1
    need = config.seq_len + 1
    if len(train) < need or len(val) < need:
        raise DemoError(
            f"the corpus is too small: {len(train)} training and {len(val)} validation tokens, but one sequence needs "
            f"seq_len + 1 = {need} tokens in each split (about {math.ceil(need / config.val_fraction)} tokens in all)"
        )
    largest = int(max(train.max(), val.max()))
    if largest >= vocab_size:
        raise DemoError(f"the corpus has token id {largest}, outside the tokenizer's vocabulary of {vocab_size} tokens")
    data = TokenData(torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(val)),
                     vocab_size, tokenizer, source, key, corpus.description)
    if teacher is not None:
        check_teacher_reads_data(teacher, data, config)
    if requested_vocab is not None and vocab_size < requested_vocab:
        log(f"tokenizer: the corpus yields only {vocab_size} of the {requested_vocab} BPE tokens asked for "
            "(vocab_size); training with that smaller vocabulary")
    if to_cache is not None:
        atomic_write_bytes(to_cache, tokenizer.to_str().encode())
    if not corpus.pretokenized and not data_dir.is_dir():
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        with atomic_directory(data_dir) as tmp:
            np.save(tmp / "train.npy", train.astype(dtype))
            np.save(tmp / "val.npy", val.astype(dtype))
    return data


def teacher_vocab_size(teacher: TeacherFeatureExtractor) -> int:
    """Rows of the teacher's (first) token embedding table: the largest vocabulary it can read."""
    embeddings = [m for m in teacher.model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings


def teacher_positions(teacher: TeacherFeatureExtractor) -> int | None:
    """The teacher's ``max_position_embeddings`` when its config has one."""
    return getattr(getattr(teacher.model, "config", None), "max_position_embeddings", None)


def check_teacher_reads_data(teacher: TeacherFeatureExtractor, data: TokenData, config: DemoConfig) -> None:
    """Raise a :class:`DemoError` unless the teacher ``config.teacher`` can read what LET will feed it
    (:func:`letkit.token_alignment.check_teacher_compatibility`): the target's token ids, or with
    ``config.alignment_mode`` and a tokenizer of its own, its own tokenization of each window's text."""
    cross = config.alignment_mode is not None and (
        teacher.tokenizer is None or data.tokenizer is None or not same_tokenizer(teacher.tokenizer, data.tokenizer))
    try:
        check_teacher_compatibility(
            teacher_vocab_size=teacher_vocab_size(teacher), teacher_tokenizer=teacher.tokenizer,
            teacher_max_positions=teacher_positions(teacher), data_vocab_size=data.vocab_size,
            data_tokenizer=data.tokenizer, seq_len=config.seq_len, alignment=config.alignment_mode if cross else None,
            teacher_name=config.teacher, alignment_option="--cross-tokenizer")
    except ValueError as e:
        raise DemoError(str(e)) from e
