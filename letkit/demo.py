"""``letkit demo``: Late-to-Early Training against standard training, end to end on one CPU.

The pipeline, each stage cached under the cache directory (keyed by content hashes, written atomically so an
interrupted run leaves nothing half-written):

1. **Corpus** -- text files (default: the running Python's own standard library, real text every Python has) or a
   pre-tokenised token file (``.npy``, or raw ``.bin`` of uint16/uint32). Contiguous split: the first 95% of the
   characters (tokens) train, the last 5% validate.
2. **Tokenizer** -- a byte-level BPE trained on the training split, or a given ``tokenizer.json``, or the teacher's.
3. **Teacher** -- a small Llama-style model pretrained on the corpus and saved in Hugging Face layout
   (``letkit.models.save_pretrained``), or any checkpoint :meth:`TeacherFeatureExtractor.from_pretrained` loads.
   With ``cross_tokenizer`` (``--cross-tokenizer``) the teacher may use its own tokenizer: each target window is
   decoded to text, re-tokenized for the teacher and the features aligned by character spans
   (:func:`letkit.data.tokenize_for_teacher`); ``teacher_vocab_size`` pretrains such a teacher on a smaller BPE.
4. **Two targets**, each with >= 10x the teacher's non-embedding parameters, from the same initialisation, on the
   same batches in the same order, with the same AdamW + warmup/cosine LR schedule for the same number of steps:
   the *baseline* (next-token NLL only) and *LET* (:class:`letkit.LETObjective`).
5. **Report** -- validation curves, where LET reaches the baseline's final validation loss (linearly interpolated
   between evaluations), step and wall-clock speedups (the teacher's forward passes are part of LET's clock; the
   teacher's pretraining is reported separately), ``metrics.json`` and a PNG of the curves.

Entry points: :func:`run_demo` (what ``letkit demo`` runs) and the stages it is built from, which
``benchmarks/convergence.py`` reuses for its multi-seed study and ablations.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import math
import os
import platform
import sysconfig
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from letkit.atomic import atomic_directory, atomic_write, atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from letkit.objective import LETObjective
from letkit.optim import warmup_cosine_lr, weight_decay_groups
from letkit.projector import LayerMappingProjector
from letkit.schedulers import LinearDecay
from letkit.teacher import TeacherFeatureExtractor
from letkit.token_alignment import ALIGNMENT_MODES as ALIGN_MODES, TokenAlignment, same_tokenizer
from letkit.token_alignment.encoding import _check_tokenizer

EOS_TOKEN = "<|endoftext|>"
CACHE_FORMAT = "letkit-demo-cache-v1"
TEACHER_INFO_FILE = "letkit_demo_teacher.json"
BIN_DTYPES = ("uint16", "uint32")
# A teacher pretrained on its own (smaller) vocabulary reads a target window's text as more tokens than the target;
# its context is the average number of its tokens per window times this margin, so few windows are cut.
TEACHER_CONTEXT_MARGIN = 1.25

Log = Callable[[str], None]


class DemoError(ValueError):
    """A bad input to the demo (corpus, tokenizer, teacher, settings), with a message saying what and why."""


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class ModelShape:
    """Shape of a Llama-style model built with ``letkit.models.from_preset`` (vocabulary and context come from the data)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass
class TrainSchedule:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``; gradient norm clipped to ``grad_clip``."""

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0

    def lr_at(self, step: int) -> float:
        return warmup_cosine_lr(step, peak_lr=self.lr, warmup_steps=self.warmup_steps, total_steps=self.steps,
                                min_lr_ratio=self.min_lr_ratio)


@dataclass
class LETSettings:
    """The LET side of the comparison: lambda(s) = lambda0 * (1 - s / S_stop), S_stop = stop_fraction * steps."""

    lambda0: float
    stop_fraction: float
    layer_map: str = "L2E"
    projector: str = "interpolate"
    loss: str = "cosine"

    def stop_step(self, steps: int) -> int:
        return max(1, round(self.stop_fraction * steps))


@dataclass
class DemoConfig:
    """Everything one ``letkit demo`` run depends on. The presets below are ``--quick`` and the default.

    ``corpus``: None = the standard library's top-level ``*.py`` files; else a directory (all non-hidden files,
    recursively), a glob, a text file, or a token file ``.npy`` / ``.bin`` (``bin_dtype``).
    ``tokenizer``: a ``tokenizer.json``; None = the teacher's tokenizer if ``teacher`` has one, else a byte-level
    BPE of ``vocab_size`` trained on the training split. ``teacher``: a checkpoint directory; None = pretrain one.
    ``cross_tokenizer``: None = the teacher reads the target's token ids (one shared vocabulary); ``"last"`` or
    ``"mean"`` = the teacher reads its own tokenization of each window's text, aligned with that mode (see
    :func:`letkit.tokenization.align_tokens`). ``teacher_vocab_size``: pretrain the teacher on its own byte-level
    BPE of this many tokens (implies ``cross_tokenizer="last"`` unless set).
    """

    teacher_shape: ModelShape
    teacher_schedule: TrainSchedule
    target_shape: ModelShape
    target_schedule: TrainSchedule
    let: LETSettings
    seq_len: int
    eval_every: int
    eval_sequences: int
    corpus: str | None = None
    bin_dtype: str = "uint16"
    tokenizer: str | None = None
    teacher: str | None = None
    vocab_size: int = 2048
    val_fraction: float = 0.05
    seeds: int = 1
    seed: int = 0
    teacher_seed: int = 1234
    cache_dir: str | None = None
    out_dir: str = "runs/demo"
    threads: int | None = None
    progress: bool = True
    plot: bool = True
    cross_tokenizer: str | None = None
    teacher_vocab_size: int | None = None

    @property
    def alignment_mode(self) -> str | None:
        """The cross-tokenizer alignment mode in effect (``teacher_vocab_size`` implies ``"last"``), or None."""
        if self.cross_tokenizer is None and self.teacher_vocab_size is not None:
            return "last"
        return self.cross_tokenizer

    def validate(self) -> None:
        for name in ("seq_len", "eval_every", "eval_sequences", "seeds", "vocab_size"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cross_tokenizer is not None and self.cross_tokenizer not in ALIGN_MODES:
            raise DemoError(f"cross_tokenizer must be one of {ALIGN_MODES} or None, got {self.cross_tokenizer!r}")
        if self.teacher_vocab_size is not None:
            if self.teacher_vocab_size < 257:
                raise DemoError(f"teacher_vocab_size must be >= 257 (256 byte tokens and {EOS_TOKEN}), "
                                f"got {self.teacher_vocab_size}")
            if self.teacher is not None:
                raise DemoError(f"teacher_vocab_size ({self.teacher_vocab_size}) pretrains the demo's own teacher; "
                                f"it cannot be combined with --teacher {self.teacher!r}")
        for which in ("teacher_schedule", "target_schedule"):
            s = getattr(self, which)
            if s.steps < 1 or s.batch_size < 1 or not s.lr > 0 or not 0 <= s.warmup_steps < s.steps:
                raise DemoError(f"{which} needs steps >= 1, batch_size >= 1, lr > 0 and 0 <= warmup_steps < steps, got {s}")
        if not 0 < self.val_fraction < 1:
            raise DemoError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.bin_dtype not in BIN_DTYPES:
            raise DemoError(f"bin_dtype must be one of {BIN_DTYPES}, got {self.bin_dtype!r}")
        if not self.let.lambda0 >= 0 or not 0 < self.let.stop_fraction <= 1:
            raise DemoError(f"LET needs lambda0 >= 0 and 0 < stop_fraction <= 1, got {self.let}")


# Both presets share one teacher (same shape, data and schedule), so the second one reuses the cached teacher.
# LR, lambda0, S_stop and the layer map come from the sweep in benchmarks/convergence.py (see RESULTS.md): the LR is
# the *baseline's* best in a 3-seed sweep of both methods at each preset's length (LET alone would prefer a higher
# one); lambda0 = 3, not the paper's 0.1 (tuned at 1.4B),
# which does nothing at this scale; the target's second of three blocks (L2M) beat its first (L2E) in 3 of 3 seeds.
_TEACHER_SHAPE = ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
_TEACHER_SCHEDULE = TrainSchedule(steps=1000, batch_size=16, lr=3e-3, warmup_steps=50)
_TARGET_SHAPE = ModelShape(hidden_size=192, num_layers=3, num_heads=4, intermediate_size=512)
_LET = LETSettings(lambda0=3.0, stop_fraction=1.0, layer_map="L2M", projector="interpolate", loss="cosine")

PRESETS: dict[str, DemoConfig] = {
    # <= 3 minutes on 2 CPU cores, teacher pretraining included.
    "quick": DemoConfig(
        teacher_shape=_TEACHER_SHAPE,
        teacher_schedule=_TEACHER_SCHEDULE,
        target_shape=_TARGET_SHAPE,
        target_schedule=TrainSchedule(steps=300, batch_size=8, lr=1.5e-3, warmup_steps=15),
        let=_LET,
        seq_len=128,
        eval_every=15,
        eval_sequences=48,
    ),
    # Twice the target's training.
    "default": DemoConfig(
        teacher_shape=_TEACHER_SHAPE,
        teacher_schedule=_TEACHER_SCHEDULE,
        target_shape=_TARGET_SHAPE,
        target_schedule=TrainSchedule(steps=600, batch_size=8, lr=1.5e-3, warmup_steps=30),
        let=_LET,
        seq_len=128,
        eval_every=25,
        eval_sequences=48,
    ),
}


def preset(name: str, **overrides: Any) -> DemoConfig:
    """A copy of preset ``name`` (``"quick"`` or ``"default"``) with top-level fields replaced."""
    if name not in PRESETS:
        raise DemoError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
    return dataclasses.replace(_deep_copy(PRESETS[name]), **overrides)


def _deep_copy(config: DemoConfig) -> DemoConfig:
    return dataclasses.replace(
        config,
        **{f.name: dataclasses.replace(getattr(config, f.name)) for f in dataclasses.fields(config)
           if dataclasses.is_dataclass(getattr(config, f.name))},
    )


def default_cache_dir() -> Path:
    """``$LETKIT_CACHE``, else ``$XDG_CACHE_HOME/letkit``, else ``~/.cache/letkit``."""
    if os.environ.get("LETKIT_CACHE"):
        return Path(os.environ["LETKIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "letkit"


# --------------------------------------------------------------------------------------------------------------------
# Atomic cache
# --------------------------------------------------------------------------------------------------------------------


def _sha256(*parts: bytes | str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Corpus:
    """A corpus split into training and validation parts: text documents, or token ids for pre-tokenised files."""

    description: str
    key: str
    train_docs: list[str] = field(default_factory=list)
    val_docs: list[str] = field(default_factory=list)
    train_tokens: np.ndarray | None = None
    val_tokens: np.ndarray | None = None

    @property
    def pretokenized(self) -> bool:
        return self.train_tokens is not None


def stdlib_corpus_files() -> list[Path]:
    """The running interpreter's top-level standard-library ``*.py`` files, sorted by name."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _read_text(path: Path) -> str | None:
    """The file's text, or None when it is not UTF-8 text (NUL bytes or invalid UTF-8). Unreadable -> DemoError."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DemoError(f"cannot read corpus file {str(path)!r}: {e.strerror or e}") from e
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def load_corpus(spec: str | None, *, val_fraction: float, bin_dtype: str = "uint16", log: Log = print) -> Corpus:
    """Read and split the corpus named by ``spec`` (see :class:`DemoConfig`). Reads only; writes nothing."""
    if spec is None:
        files = stdlib_corpus_files()
        root = Path(sysconfig.get_paths()["stdlib"])
        if not files:
            raise DemoError(f"found no *.py files in the standard library directory {str(root)!r}; pass --corpus")
        description = f"Python {platform.python_version()} standard library ({len(files)} top-level .py files)"
        return _split_text(_read_documents(files, root, skip_binary=True, log=log), description, val_fraction)
    path = Path(spec).expanduser()
    if not _is_glob(spec) and path.suffix in (".npy", ".bin"):
        return _load_token_file(path, val_fraction, bin_dtype)
    if _is_glob(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise DemoError(f"--corpus glob {spec!r} matches no files")
        root, skip_binary = Path(os.path.commonpath([str(f.parent) for f in files])), True
    elif path.is_dir():
        try:
            files = sorted(
                p for p in path.rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
        except OSError as e:
            raise DemoError(f"cannot list corpus directory {spec!r}: {e.strerror or e}") from e
        if not files:
            raise DemoError(f"corpus directory {spec!r} contains no files")
        root, skip_binary = path, True
    elif path.is_file():
        files, root, skip_binary = [path], path.parent, False
    elif not path.exists():
        raise DemoError(f"--corpus {spec!r} does not exist")
    else:
        raise DemoError(f"--corpus {spec!r} is neither a file nor a directory")
    docs = _read_documents(files, root, skip_binary=skip_binary, log=log)
    return _split_text(docs, f"{spec} ({len(docs)} text files)", val_fraction)


def _read_documents(files: Sequence[Path], root: Path, *, skip_binary: bool, log: Log) -> list[tuple[str, str]]:
    docs, binary = [], []
    for f in files:
        text = _read_text(f)
        if text is None:
            if not skip_binary:
                raise DemoError(
                    f"corpus file {str(f)!r} is not UTF-8 text (it contains NUL bytes or invalid UTF-8); a pre-tokenised "
                    "corpus must be a .npy file or a raw .bin token file"
                )
            binary.append(f)
            continue
        docs.append((f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f), text))
    if binary:
        names = ", ".join(str(b) for b in binary[:3]) + (", ..." if len(binary) > 3 else "")
        if not docs:
            raise DemoError(f"the corpus has no text files: all {len(binary)} files are binary (not UTF-8 text): {names}")
        log(f"corpus: skipped {len(binary)} binary (non-UTF-8) files: {names}")
    if not any(text.strip() for _, text in docs):
        raise DemoError(f"the corpus is empty: its {len(docs)} text files contain no text")
    return docs


def _split_text(docs: list[tuple[str, str]], description: str, val_fraction: float) -> Corpus:
    """Split the concatenated documents at the first line break after ``(1 - val_fraction)`` of the characters."""
    key = _sha256(CACHE_FORMAT, "text", str(val_fraction), *(part for name, text in docs for part in (name, text)))
    total = sum(len(text) for _, text in docs)
    cut = math.floor(total * (1 - val_fraction))
    train, val, seen = [], [], 0
    for _, text in docs:
        if seen + len(text) <= cut:
            train.append(text)
        elif seen >= cut:
            val.append(text)
        else:
            newline = text.find("\n", cut - seen)
            at = len(text) if newline < 0 else newline + 1
            train.append(text[:at])
            val.append(text[at:])
        seen += len(text)
    return Corpus(description, key, [t for t in train if t], [t for t in val if t])


def _load_token_file(path: Path, val_fraction: float, bin_dtype: str) -> Corpus:
    if not path.is_file():
        raise DemoError(f"--corpus {str(path)!r} does not exist" if not path.exists() else f"--corpus {str(path)!r} is not a file")
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, allow_pickle=False, mmap_mode="r")
            what = f"{path} (.npy, {tokens.dtype})"
        else:
            tokens = np.fromfile(path, dtype=bin_dtype)
            what = f"{path} (raw .bin, {bin_dtype})"
    except (OSError, ValueError) as e:
        raise DemoError(f"cannot read token file {str(path)!r}: {e}") from e
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DemoError(f"token file {str(path)!r} must hold a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size and tokens.min() < 0:
        raise DemoError(f"token file {str(path)!r} contains negative token ids (min {tokens.min()})")
    tokens = np.array(tokens, dtype=np.int64)
    cut = math.floor(len(tokens) * (1 - val_fraction))
    key = _sha256(CACHE_FORMAT, "tokens", str(val_fraction), tokens.tobytes())
    return Corpus(f"{what}, {len(tokens)} tokens", key, train_tokens=tokens[:cut], val_tokens=tokens[cut:])


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer and token data
# --------------------------------------------------------------------------------------------------------------------


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
    if config.tokenizer is not None:
        tokenizer, source = load_tokenizer_file(config.tokenizer), f"file {config.tokenizer}"
    elif teacher is not None and teacher.tokenizer is not None:
        tokenizer, source = teacher.tokenizer, "the teacher's tokenizer"
    elif not corpus.pretokenized:
        tok_key = _sha256(CACHE_FORMAT, "bpe", corpus.key, str(config.vocab_size))[:20]
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
    tok_hash = _sha256(tokenizer.to_str()) if tokenizer is not None else "none"
    key = _sha256(CACHE_FORMAT, "data", corpus.key, tok_hash)[:20]
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
        check_teacher_vocabulary(teacher, data, config.teacher, cross_tokenizer=config.alignment_mode)
        positions = teacher_positions(teacher)
        # cross-tokenizer: the teacher's tokens of a window are cut at its positions (fewer aligned target tokens)
        cross = config.alignment_mode is not None and not same_tokenizer(teacher.tokenizer, data.tokenizer)
        if not cross and positions is not None and positions < config.seq_len:
            raise DemoError(f"the teacher {config.teacher!r} supports {positions} positions, fewer than seq_len = {config.seq_len}")
    if to_cache is not None:
        atomic_write_bytes(to_cache, tokenizer.to_str().encode())
    if not corpus.pretokenized and not data_dir.is_dir():
        dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
        with atomic_directory(data_dir) as tmp:
            np.save(tmp / "train.npy", train.astype(dtype))
            np.save(tmp / "val.npy", val.astype(dtype))
    return data


# --------------------------------------------------------------------------------------------------------------------
# Models, teacher
# --------------------------------------------------------------------------------------------------------------------


def build_model(shape: ModelShape, vocab_size: int, seq_len: int, seed: int) -> nn.Module:
    """A freshly initialised Llama-style model (``letkit.models.from_preset("tiny", ...)`` with these overrides)."""
    from letkit.models import from_preset

    torch.manual_seed(seed)
    return from_preset(
        "tiny",
        vocab_size=vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=seq_len,
    )


def non_embedding_parameters(model: nn.Module) -> int:
    """Parameters outside the token embedding and the LM head (the usual measure of model size)."""
    skip = {id(p) for name, module in model.named_modules() if isinstance(module, nn.Embedding) for p in module.parameters()}
    head = getattr(model, "lm_head", None)
    if isinstance(head, nn.Module):
        skip |= {id(p) for p in head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


class TimedTeacher(TeacherFeatureExtractor):
    """A :class:`TeacherFeatureExtractor` that adds up the wall-clock seconds of its forward passes."""

    seconds: float = 0.0

    def __call__(self, input_ids: Tensor, **forward_kwargs: Any) -> list[Tensor]:
        t0 = time.perf_counter()
        try:
            return super().__call__(input_ids, **forward_kwargs)
        finally:
            self.seconds += time.perf_counter() - t0


def open_teacher(path: str | os.PathLike) -> TimedTeacher:
    """Load a teacher checkpoint directory as a :class:`TimedTeacher`, turning load failures into DemoErrors."""
    if not Path(path).is_dir():
        raise DemoError(f"--teacher {str(path)!r} is not a checkpoint directory (config.json + *.safetensors)")
    try:
        return TimedTeacher.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"cannot load --teacher {str(path)!r}: {e}") from e


def teacher_vocab_size(teacher: TeacherFeatureExtractor) -> int:
    embeddings = [m for m in teacher.model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings


def teacher_positions(teacher: TeacherFeatureExtractor) -> int | None:
    """The teacher's ``max_position_embeddings`` when its config has one."""
    return getattr(getattr(teacher.model, "config", None), "max_position_embeddings", None)


def check_teacher_vocabulary(
    teacher: TeacherFeatureExtractor, data: TokenData, teacher_path: str, *, cross_tokenizer: str | None = None
) -> None:
    """Check that the teacher can read what LET will feed it.

    Without ``cross_tokenizer`` the teacher reads the target's token ids unchanged, so both must share one
    vocabulary. With it, the teacher reads its own tokenization of each window's text: it needs its own tokenizer,
    whose ids must fit its embeddings, with offsets that cover each token's whole text.
    """
    teacher_tok = teacher.tokenizer
    size = teacher_vocab_size(teacher)
    if cross_tokenizer is not None:
        if teacher_tok is None:
            raise DemoError(f"cross-tokenizer LET re-tokenizes the text for the teacher, but the teacher "
                            f"{teacher_path!r} has no tokenizer.json")
        try:
            _check_tokenizer(teacher_tok, "the teacher's tokenizer")
        except (TypeError, ValueError) as e:
            raise DemoError(f"cannot align with the teacher {teacher_path!r}: {e}") from e
        if teacher_tok.get_vocab_size() > size:
            raise DemoError(f"the teacher {teacher_path!r} has {size} token embeddings but its own tokenizer has "
                            f"{teacher_tok.get_vocab_size()} tokens")
        return
    if teacher_tok is not None and data.tokenizer is not None and teacher_tok is not data.tokenizer:
        if teacher_tok.get_vocab() != data.tokenizer.get_vocab():
            raise DemoError(
                f"the teacher {teacher_path!r} uses a different tokenizer ({teacher_tok.get_vocab_size()} tokens) "
                f"than the target ({data.tokenizer_source}, {data.vocab_size} tokens). Pass --cross-tokenizer to let "
                "the teacher read its own tokenization of the same text (features aligned by character spans), or "
                "drop --tokenizer to train the target on the teacher's tokenizer."
            )
    if data.vocab_size > size:
        raise DemoError(
            f"the teacher {teacher_path!r} has {size} token embeddings but the target vocabulary has {data.vocab_size} "
            "tokens: their vocabularies are incompatible. A teacher with its own tokenizer.json can read its own "
            "tokenization of the same text with --cross-tokenizer."
        )


@dataclass
class TeacherInfo:
    path: str
    provided: bool
    cached: bool
    pretrain_seconds: float | None
    val_loss: float | None
    non_embedding_parameters: int
    hidden_size: int
    num_layers: int


def teacher_cache_key(config: DemoConfig, data: TokenData) -> str:
    spec = {"shape": dataclasses.asdict(config.teacher_shape), "schedule": dataclasses.asdict(config.teacher_schedule),
            "seq_len": config.seq_len, "seed": config.teacher_seed, "eval_sequences": config.eval_sequences}
    return _sha256(CACHE_FORMAT, "teacher", data.key, json.dumps(spec, sort_keys=True))[:20]


def pretrain_teacher(config: DemoConfig, data: TokenData, cache_root: Path, *, log: Log = print) -> TeacherInfo:
    """The demo's teacher: reuse the cached one for this corpus/tokenizer/config, or pretrain and cache it."""
    from letkit.models import save_pretrained

    path = cache_root / "teachers" / teacher_cache_key(config, data)
    info_file = path / TEACHER_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        return TeacherInfo(**{**info, "path": str(path), "cached": True})
    model = build_model(config.teacher_shape, data.vocab_size, config.seq_len, config.teacher_seed)
    log(f"teacher: pretraining {non_embedding_parameters(model) / 1e6:.2f}M non-embedding parameters "
        f"for {config.teacher_schedule.steps} steps (cached afterwards in {path})")
    [run] = train_lockstep([RunSpec("teacher", model)], data, config.teacher_schedule, seq_len=config.seq_len,
                           data_seed=config.teacher_seed, eval_every=config.teacher_schedule.steps,
                           eval_sequences=config.eval_sequences, desc="teacher", progress=config.progress)
    info = TeacherInfo(str(path), False, False, run.train_seconds, run.final_val_loss, non_embedding_parameters(model),
                       config.teacher_shape.hidden_size, config.teacher_shape.num_layers)
    with atomic_directory(path) as tmp:
        save_pretrained(model, tmp, tokenizer=data.tokenizer)
        atomic_write_json(tmp / TEACHER_INFO_FILE, {k: v for k, v in dataclasses.asdict(info).items() if k != "path"})
    return info


def prepare_teacher_data(
    config: DemoConfig, data: TokenData, cache_root: Path, *, log: Log = print
) -> tuple[DemoConfig, TokenData]:
    """For ``teacher_vocab_size``: the teacher's own token data and the config to pretrain it with.

    The teacher's tokenizer is a byte-level BPE of ``teacher_vocab_size`` tokens trained on the same training split
    (cached like the target's). Its context is the average number of its tokens per target window of ``seq_len``
    tokens, times ``TEACHER_CONTEXT_MARGIN``, so that it has been trained on as much text as LET will show it.
    """
    own = dataclasses.replace(config, vocab_size=config.teacher_vocab_size, tokenizer=None, teacher=None,
                              cross_tokenizer=None, teacher_vocab_size=None)
    teacher_data = prepare_data(own, cache_root, log=log)
    if teacher_data.tokenizer is None:
        raise DemoError("--teacher-vocab-size trains the teacher's tokenizer on the corpus text, but a pre-tokenised "
                        "corpus has none; pass a text corpus or --teacher with a checkpoint that has a tokenizer")
    seq_len = math.ceil(config.seq_len * len(teacher_data.train) / len(data.train) * TEACHER_CONTEXT_MARGIN)
    if len(teacher_data.val) < seq_len + 1:
        raise DemoError(f"the corpus is too small: the teacher's tokenizer makes {len(teacher_data.val)} validation "
                        f"tokens, fewer than one teacher window of {seq_len + 1}")
    log(f"teacher data: {teacher_data.tokenizer_source}; vocabulary {teacher_data.vocab_size}, "
        f"context {seq_len} tokens (the target's: {config.seq_len})")
    return dataclasses.replace(own, seq_len=seq_len), teacher_data


def describe_teacher(path: str, teacher: TeacherFeatureExtractor) -> TeacherInfo:
    config = getattr(teacher.model, "config", None)
    return TeacherInfo(path, True, False, None, None, non_embedding_parameters(teacher.model),
                       getattr(config, "hidden_size", -1), teacher.num_layers)


# --------------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EvalPoint:
    step: int
    seconds: float
    val_loss: float
    train_loss: float | None
    lambda_: float


@dataclass
class RunResult:
    """One training run: validation curve (training wall-clock seconds exclude the evaluations) and totals.
    Cross-tokenizer LET also records the fraction of target positions that received a teacher feature and the
    seconds spent re-tokenizing batches for the teacher (part of ``train_seconds``)."""

    name: str
    curve: list[EvalPoint]
    steps: int
    train_seconds: float
    tokens_per_second: float
    teacher_forward_seconds: float = 0.0
    aligned_fraction: float | None = None
    teacher_tokenize_seconds: float = 0.0

    @property
    def final_val_loss(self) -> float:
        return self.curve[-1].val_loss


def validation_windows(val: Tensor, seq_len: int, count: int) -> Tensor:
    """``count`` (or as many as fit) evenly spaced, non-overlapping windows of ``seq_len + 1`` validation tokens."""
    n = min(count, len(val) // (seq_len + 1))
    starts = torch.linspace(0, len(val) - seq_len - 1, n).long() if n > 1 else torch.zeros(1, dtype=torch.long)
    return torch.stack([val[s:s + seq_len + 1] for s in starts.tolist()])


@torch.no_grad()
def evaluate(model: nn.Module, windows: Tensor, batch_size: int) -> float:
    """Mean next-token NLL of ``model`` over the validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        logits = model(chunk[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return total / count


def _optimizer(params: Sequence[nn.Parameter], schedule: TrainSchedule) -> torch.optim.Optimizer:
    return torch.optim.AdamW(weight_decay_groups(params, schedule.weight_decay), lr=schedule.lr, betas=(0.9, 0.95))


class CrossTokenizerInputs:
    """The teacher's view of a target batch in cross-tokenizer LET, with running counts for the report.

    Calling it on target input ids ``[B, T]`` returns ``(teacher_ids [B, S], alignment)`` from
    :func:`letkit.data.tokenize_for_teacher`: each row decoded with the target tokenizer, re-tokenized with the
    teacher's (at most ``teacher_max_length`` tokens) and aligned causally with ``mode``. ``aligned_fraction`` is the
    fraction of target positions so far that received a teacher feature; ``seconds`` the time spent here.
    """

    def __init__(self, target_tokenizer: Any, teacher_tokenizer: Any, mode: str,
                 teacher_max_length: int | None = None) -> None:
        if mode not in ALIGN_MODES:
            raise DemoError(f"cross-tokenizer mode must be one of {ALIGN_MODES}, got {mode!r}")
        self.target_tokenizer, self.teacher_tokenizer = target_tokenizer, teacher_tokenizer
        self.mode, self.teacher_max_length = mode, teacher_max_length
        self.aligned = self.positions = 0
        self.seconds = 0.0

    def __call__(self, inputs: Tensor) -> tuple[Tensor, TokenAlignment]:
        from letkit.token_alignment import tokenize_for_teacher

        t0 = time.perf_counter()
        teacher_ids, alignment = tokenize_for_teacher(inputs, self.target_tokenizer, self.teacher_tokenizer,
                                                      mode=self.mode, teacher_max_length=self.teacher_max_length)
        self.aligned += int(alignment.mask.sum())
        self.positions += alignment.mask.numel()
        self.seconds += time.perf_counter() - t0
        return teacher_ids, alignment

    @property
    def aligned_fraction(self) -> float | None:
        return self.aligned / self.positions if self.positions else None


@dataclass
class RunSpec:
    """A model to train in a :func:`train_lockstep` group: plain next-token NLL, or LET with ``objective``.
    ``lr`` overrides the schedule's peak learning rate (for LR sweeps); ``teacher_inputs`` makes LET cross-tokenizer
    (the teacher reads its own tokens of each batch, computed on LET's clock while lambda > 0)."""

    name: str
    model: nn.Module
    objective: LETObjective | None = None
    lr: float | None = None
    teacher_inputs: CrossTokenizerInputs | None = None


class _Trainer:
    """Optimizer, clock and validation curve of one run."""

    def __init__(self, spec: RunSpec, schedule: TrainSchedule) -> None:
        self.spec = spec
        self.schedule = dataclasses.replace(schedule, lr=spec.lr) if spec.lr is not None else schedule
        params = [p for p in spec.model.parameters() if p.requires_grad]
        if spec.objective is not None:
            params += list(spec.objective.parameters())
        self.params = params
        self.optimizer = _optimizer(params, self.schedule)
        self.seconds, self.smoothed, self.lambda_ = 0.0, None, 0.0
        self.curve: list[EvalPoint] = []

    def step(self, step: int, inputs: Tensor, targets: Tensor) -> None:
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(step)
        logits = self.spec.model(inputs)
        loss = lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        if self.spec.objective is not None:
            cross = {}
            if self.spec.teacher_inputs is not None and self.spec.objective.schedule(step) > 0:
                teacher_ids, alignment = self.spec.teacher_inputs(inputs)
                cross = {"teacher_input_ids": teacher_ids, "token_alignment": alignment}
            out = self.spec.objective(inputs, lm_loss=lm_loss, step=step, **cross)
            loss, self.lambda_ = out.loss, out.lambda_
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.schedule.grad_clip)
        self.optimizer.step()
        self.seconds += time.perf_counter() - t0
        value = lm_loss.item()
        if not math.isfinite(value):
            raise RuntimeError(f"{self.spec.name}: the training loss is {value} at step {step}; lower the learning rate")
        self.smoothed = value if self.smoothed is None else 0.9 * self.smoothed + 0.1 * value

    def evaluate(self, step: int, windows: Tensor) -> None:
        val = evaluate(self.spec.model, windows, self.schedule.batch_size)
        self.curve.append(EvalPoint(step, self.seconds, val, self.smoothed, self.lambda_))

    def result(self, seq_len: int) -> RunResult:
        s, teacher = self.schedule, self.spec.objective.teacher if self.spec.objective is not None else None
        cross = self.spec.teacher_inputs
        return RunResult(self.spec.name, self.curve, s.steps, self.seconds, s.steps * s.batch_size * seq_len / self.seconds,
                         teacher.seconds if isinstance(teacher, TimedTeacher) else 0.0,
                         cross.aligned_fraction if cross is not None else None,
                         cross.seconds if cross is not None else 0.0)


def train_lockstep(
    runs: Sequence[RunSpec],
    data: TokenData,
    schedule: TrainSchedule,
    *,
    seq_len: int,
    data_seed: int,
    eval_every: int,
    eval_sequences: int,
    desc: str = "train",
    progress: bool = True,
) -> list[RunResult]:
    """Train the runs on the same random training windows (order fixed by ``data_seed``), one step of each in turn.

    Interleaving the runs step by step means background load on the machine (other processes, thermal throttling)
    hits all of them alike, so their wall-clock times stay comparable. Each run's clock counts only its own training
    steps, not the evaluations (every ``eval_every`` steps and at the end, on fixed validation windows).
    """
    from tqdm.auto import tqdm

    trainers = [_Trainer(spec, schedule) for spec in runs]
    windows = validation_windows(data.val, seq_len, eval_sequences)
    generator = torch.Generator().manual_seed(data_seed)
    offsets = torch.arange(seq_len + 1)
    for trainer in trainers:
        trainer.spec.model.train()
        trainer.evaluate(0, windows)
    bar = tqdm(range(schedule.steps), desc=desc, disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        starts = torch.randint(0, len(data.train) - seq_len, (schedule.batch_size,), generator=generator)
        batch = data.train[starts[:, None] + offsets]
        for trainer in trainers:
            trainer.step(step, batch[:, :-1], batch[:, 1:])
        done = step + 1
        if done % eval_every == 0 or done == schedule.steps:
            for trainer in trainers:
                trainer.evaluate(done, windows)
        if progress:
            postfix = {}
            for t in trainers:
                postfix[t.spec.name] = (f"loss {t.smoothed:.3f} val {t.curve[-1].val_loss:.3f} "
                                        f"{done * schedule.batch_size * seq_len / t.seconds:.0f} tok/s"
                                        + (f" lambda {t.lambda_:.2f}" if t.spec.objective is not None else ""))
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    return [trainer.result(seq_len) for trainer in trainers]


ProjectorFactory = Callable[[int, int], LayerMappingProjector]
"""Builds a projector from (target hidden size, teacher hidden size); for ablations beyond the named kinds."""


def target_run(
    config: DemoConfig,
    data: TokenData,
    seed: int,
    *,
    name: str,
    let: LETSettings | None = None,
    teacher_path: str | None = None,
    lr: float | None = None,
    make_projector: ProjectorFactory | None = None,
) -> RunSpec:
    """A freshly initialised target (the same weights for the same ``seed``): the baseline without ``let``,
    LET with ``let`` and the teacher at ``teacher_path``. With ``config.alignment_mode`` and a teacher whose
    tokenizer differs from ``data.tokenizer``, LET is cross-tokenizer (:class:`CrossTokenizerInputs`)."""
    model = build_model(config.target_shape, data.vocab_size, config.seq_len, seed)
    if let is None:
        return RunSpec(name, model, None, lr)
    teacher = open_teacher(teacher_path)
    teacher_inputs = None
    if config.alignment_mode is not None and not same_tokenizer(teacher.tokenizer, data.tokenizer):
        teacher_inputs = CrossTokenizerInputs(data.tokenizer, teacher.tokenizer, config.alignment_mode,
                                              teacher_positions(teacher))
    projector: LayerMappingProjector | str = let.projector
    if make_projector is not None:
        projector = make_projector(config.target_shape.hidden_size, teacher_hidden_size(teacher))
    schedule = LinearDecay(let.lambda0, stop_step=let.stop_step(config.target_schedule.steps))
    objective = LETObjective(model, teacher, layer_map=let.layer_map, projector=projector, loss=let.loss, schedule=schedule)
    teacher.seconds = 0.0  # building the objective ran the teacher once to read its feature size
    return RunSpec(name, model, objective, lr, teacher_inputs)


def compare_seed(config: DemoConfig, data: TokenData, teacher_path: str, seed: int) -> tuple[RunResult, RunResult]:
    """Baseline and LET (``config.let``) from the same initialisation, trained in lockstep on the same batches."""
    baseline = target_run(config, data, seed, name="baseline")
    let = target_run(config, data, seed, name="LET", let=config.let, teacher_path=teacher_path)
    desc = f"seed {seed}" if config.seeds > 1 else "baseline + LET"
    return tuple(train_lockstep([baseline, let], data, config.target_schedule, seq_len=config.seq_len, data_seed=seed,
                                eval_every=config.eval_every, eval_sequences=config.eval_sequences, desc=desc,
                                progress=config.progress))


def teacher_hidden_size(teacher: TeacherFeatureExtractor) -> int:
    return teacher.feature_dims(torch.zeros(1, 2, dtype=torch.long))[0]


# --------------------------------------------------------------------------------------------------------------------
# Speedups and statistics
# --------------------------------------------------------------------------------------------------------------------


def crossing(curve: Sequence[EvalPoint], loss: float) -> tuple[float, float] | None:
    """(step, seconds) where the validation curve first reaches ``loss``, linearly interpolated between the two
    evaluations around the crossing; None if it never does."""
    if curve[0].val_loss <= loss:
        return float(curve[0].step), curve[0].seconds
    for before, after in zip(curve, curve[1:]):
        if after.val_loss <= loss:
            frac = (before.val_loss - loss) / (before.val_loss - after.val_loss)
            return (before.step + frac * (after.step - before.step),
                    before.seconds + frac * (after.seconds - before.seconds))
    return None


def seconds_at(curve: Sequence[EvalPoint], step: float) -> float:
    """Training seconds of a run at a (fractional) ``step``, linearly interpolated between its evaluations."""
    for before, after in zip(curve, curve[1:]):
        if step <= after.step:
            return before.seconds + (step - before.step) / (after.step - before.step) * (after.seconds - before.seconds)
    raise ValueError(f"step {step} is past the run's last evaluation at step {curve[-1].step}")


def compare_runs(baseline: RunResult, let: RunResult) -> dict[str, Any]:
    """Speedups of LET over the baseline.

    If LET reaches the baseline's final validation loss at step s (after t seconds): step speedup = steps / s and
    wall-clock speedup = baseline seconds / t (>= 1 means LET is faster). If it never does, both are computed the
    other way round -- where the *baseline* reaches LET's final loss, over LET's totals -- and are < 1.

    ``wall_speedup_load_matched`` = step speedup x (baseline seconds / LET seconds over the same first s steps).
    On an idle machine it equals ``wall_speedup``; on a shared one, where the load changes during the run, it
    compares the two runs' step costs over the same stretch of time (they train in lockstep) instead of LET's
    first s steps with all of the baseline's steps.
    """
    reached = crossing(let.curve, baseline.final_val_loss)
    if reached is not None:
        step, seconds = reached
        step_speedup, wall_speedup = baseline.steps / step, baseline.train_seconds / seconds
        cost_ratio = seconds_at(baseline.curve, step) / seconds
    else:
        step, seconds = crossing(baseline.curve, let.final_val_loss)
        step_speedup, wall_speedup = step / let.steps, seconds / let.train_seconds
        cost_ratio = baseline.train_seconds / let.train_seconds
    return {
        "reached": reached is not None,
        "crossing_step": reached[0] if reached else None,
        "crossing_seconds": reached[1] if reached else None,
        "step_speedup": step_speedup,
        "wall_speedup": wall_speedup,
        "wall_speedup_load_matched": step_speedup * cost_ratio,
        "final_val_loss_delta": let.final_val_loss - baseline.final_val_loss,
    }


# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t: exact table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal quantile (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the t-based 95% confidence interval of the mean (None for n = 1)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical_95(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def format_report(metrics: dict[str, Any]) -> str:
    """The human-readable result table."""
    teacher, runs, summary = metrics["teacher"], metrics["runs"], metrics["summary"]
    lines = ["", f"corpus: {metrics['data']['corpus']}",
             f"teacher: {teacher['non_embedding_parameters'] / 1e6:.2f}M non-embedding params, "
             + (f"provided ({teacher['path']})" if teacher["provided"] else
                f"val loss {teacher['val_loss']:.3f}, pretraining {teacher['pretrain_seconds']:.0f}s"
                + (" (cached: reused, not paid this run)" if teacher["cached"] else "")),
             f"target: {metrics['target']['non_embedding_parameters'] / 1e6:.2f}M non-embedding params "
             f"({metrics['target']['size_ratio']:.1f}x the teacher), {metrics['config']['target_schedule']['steps']} steps",
             ""]
    header = (f"{'seed':>4} | {'baseline val (ppl)':>18} | {'LET val (ppl)':>15} | {'LET reaches baseline final':>28} | "
              f"{'step x':>6} | {'wall x':>6} | {'raw wall x':>10}")
    lines += [header, "-" * len(header)]
    for r in runs:
        b, l, c = r["baseline"], r["let"], r["comparison"]
        reach = (f"step {c['crossing_step']:.0f}, {c['crossing_seconds']:.0f}s of {b['train_seconds']:.0f}s"
                 if c["reached"] else "not reached")
        lines.append(f"{r['seed']:>4} | {b['final_val_loss']:>8.3f} ({math.exp(b['final_val_loss']):>6.1f}) | "
                     f"{l['final_val_loss']:>6.3f} ({math.exp(l['final_val_loss']):>6.1f}) | {reach:>28} | "
                     f"{c['step_speedup']:>5.2f}x | {c['wall_speedup_load_matched']:>5.2f}x | {c['wall_speedup']:>9.2f}x")
    lines.append("")
    for name, label in (("step_speedup", "step speedup"),
                        ("wall_speedup_load_matched", "wall-clock speedup (teacher forward included)"),
                        ("wall_speedup", "raw wall-clock speedup")):
        s = summary[name]
        ci = f", 95% CI [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] over {s['n']} seeds" if s["ci95"] else ""
        lines.append(f"{label}: {s['mean']:.2f}x{ci}")
    lines += [
        "  wall x = step x * (baseline's / LET's training seconds over LET's steps to the crossing), both runs trained",
        "  in lockstep; raw wall x = baseline's total seconds / LET's seconds to the crossing. The two agree on an idle",
        "  machine; when other programs change the load mid-run, only the first one compares like with like.",
        f"LET's final val loss below the baseline's in {summary['let_better']} of {len(runs)} seeds; "
        f"the teacher's forward passes took {summary['teacher_forward_fraction'] * 100:.1f}% of LET's training time",
    ]
    cross = metrics.get("cross_tokenizer") or {}
    if cross.get("active"):
        lines.append(
            f"cross-tokenizer LET ({cross['mode']}): the teacher read its own {cross['teacher_vocab_size']}-token "
            f"vocabulary; {cross['aligned_fraction'] * 100:.1f}% of target positions received a teacher feature; "
            f"re-tokenizing took {cross['teacher_tokenize_fraction'] * 100:.1f}% of LET's training time")
    return "\n".join(lines)


def plot_curves(metrics: dict[str, Any], path: Path) -> bool:
    """Validation loss vs steps and vs wall-clock seconds, every seed. False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"baseline": "#555555", "let": "#d1495b"}
    labels = {"baseline": "baseline (NLL)", "let": "LET"}
    for i, run in enumerate(metrics["runs"]):
        for kind in ("baseline", "let"):
            curve = run[kind]["curve"]
            for ax, x in zip(axes, ("step", "seconds")):
                ax.plot([p[x] for p in curve[1:]], [p["val_loss"] for p in curve[1:]], color=colors[kind],
                        alpha=1.0 if i == 0 else 0.35, lw=1.8 if i == 0 else 1.0, label=labels[kind] if i == 0 else None)
        c = run["comparison"]
        for ax, key in zip(axes, ("crossing_step", "crossing_seconds")):
            ax.axhline(run["baseline"]["final_val_loss"], color=colors["baseline"], ls=":", lw=0.8)
            if c["reached"]:
                ax.plot([c[key]], [run["baseline"]["final_val_loss"]], "o", color=colors["let"], ms=5)
    s, w = metrics["summary"]["step_speedup"], metrics["summary"]["wall_speedup"]
    axes[0].set(xlabel="training step", ylabel="validation loss (nats/token)", title=f"vs steps: LET {s['mean']:.2f}x")
    m = metrics["summary"]["wall_speedup_load_matched"]
    axes[1].set(xlabel="training wall-clock seconds (teacher forward included)",
                title=f"vs wall-clock: LET {m['mean']:.2f}x ({w['mean']:.2f}x raw)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"letkit demo: {metrics['data']['corpus']}, {len(metrics['runs'])} seed(s)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True


# --------------------------------------------------------------------------------------------------------------------
# The whole demo
# --------------------------------------------------------------------------------------------------------------------


def run_demo(config: DemoConfig, *, log: Log = print) -> dict[str, Any]:
    """Run the full comparison described in the module docstring; returns (and writes) the metrics."""
    config.validate()
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, log: Log) -> dict[str, Any]:
    cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    out_dir = Path(config.out_dir).expanduser()
    removed = remove_stale_temporaries(cache_root)
    if removed:
        log(f"cache: removed {len(removed)} leftovers of interrupted runs")
    t_start = time.perf_counter()

    provided = open_teacher(config.teacher) if config.teacher is not None else None
    data = prepare_data(config, cache_root, teacher=provided, log=log)
    log(f"data: {data.corpus}; tokenizer: {data.tokenizer_source}; {len(data.train)} training / "
        f"{len(data.val)} validation tokens, vocabulary {data.vocab_size}")
    teacher_tokenizer = data.tokenizer
    if provided is not None:
        teacher = describe_teacher(config.teacher, provided)
        teacher_tokenizer = provided.tokenizer
        del provided
    elif config.teacher_vocab_size is not None:
        teacher_config, teacher_data = prepare_teacher_data(config, data, cache_root, log=log)
        teacher = pretrain_teacher(teacher_config, teacher_data, cache_root, log=log)
        teacher_tokenizer = teacher_data.tokenizer
    else:
        teacher = pretrain_teacher(config, data, cache_root, log=log)
    log(f"teacher: {teacher.path} ({'provided' if teacher.provided else 'cached' if teacher.cached else 'pretrained'})")

    target_size = non_embedding_parameters(build_model(config.target_shape, data.vocab_size, config.seq_len, 0))
    if target_size < 10 * teacher.non_embedding_parameters:
        log(f"note: the target has only {target_size / teacher.non_embedding_parameters:.1f}x the teacher's "
            "non-embedding parameters (LET's setting is a teacher >= 10x smaller)")
    runs = []
    for i in range(config.seeds):
        seed = config.seed + i
        baseline, let = compare_seed(config, data, teacher.path, seed)
        runs.append({"seed": seed, "baseline": _run_dict(baseline), "let": _run_dict(let),
                     "comparison": compare_runs(baseline, let)})
        c = runs[-1]["comparison"]
        log(f"seed {seed}: baseline {baseline.final_val_loss:.3f}, LET {let.final_val_loss:.3f}, "
            f"step speedup {c['step_speedup']:.2f}x, wall-clock speedup {c['wall_speedup']:.2f}x")

    let_seconds = sum(r["let"]["train_seconds"] for r in runs)
    aligned = [r["let"]["aligned_fraction"] for r in runs if r["let"]["aligned_fraction"] is not None]
    if config.alignment_mode is not None and not aligned:
        log("cross-tokenizer: teacher and target share one tokenizer, so the teacher read the target's tokens")
    metrics = {
        "letkit_demo": CACHE_FORMAT,
        "config": dataclasses.asdict(config),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "platform": platform.platform()},
        "data": {"corpus": data.corpus, "tokenizer": data.tokenizer_source, "vocab_size": data.vocab_size,
                 "train_tokens": len(data.train), "val_tokens": len(data.val),
                 "val_tokens_evaluated": int(validation_windows(data.val, config.seq_len, config.eval_sequences)[:, 1:].numel())},
        "teacher": dataclasses.asdict(teacher),
        "cross_tokenizer": {
            "mode": config.alignment_mode,
            "active": bool(aligned),
            "teacher_vocab_size": teacher_tokenizer.get_vocab_size() if teacher_tokenizer is not None else None,
            "aligned_fraction": sum(aligned) / len(aligned) if aligned else None,
            "teacher_tokenize_fraction": sum(r["let"]["teacher_tokenize_seconds"] for r in runs) / let_seconds,
        },
        "target": {"non_embedding_parameters": target_size, "size_ratio": target_size / teacher.non_embedding_parameters,
                   "stop_step": config.let.stop_step(config.target_schedule.steps)},
        "runs": runs,
        "summary": {
            "step_speedup": mean_ci95([r["comparison"]["step_speedup"] for r in runs]),
            "wall_speedup": mean_ci95([r["comparison"]["wall_speedup"] for r in runs]),
            "wall_speedup_load_matched": mean_ci95([r["comparison"]["wall_speedup_load_matched"] for r in runs]),
            "final_val_loss_delta": mean_ci95([r["comparison"]["final_val_loss_delta"] for r in runs]),
            "let_better": sum(r["comparison"]["final_val_loss_delta"] < 0 for r in runs),
            "teacher_forward_fraction": sum(r["let"]["teacher_forward_seconds"] for r in runs) / let_seconds,
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    plot_path = out_dir / "demo.png"
    if config.plot and plot_curves(metrics, plot_path):
        metrics["plot"] = str(plot_path)
    else:
        metrics["plot"] = None
        if config.plot:
            log("plot: skipped (matplotlib is not installed: pip install 'letkit[plot]')")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _run_dict(run: RunResult) -> dict[str, Any]:
    return {"final_val_loss": run.final_val_loss, "final_perplexity": math.exp(run.final_val_loss), "steps": run.steps,
            "train_seconds": run.train_seconds, "tokens_per_second": run.tokens_per_second,
            "teacher_forward_seconds": run.teacher_forward_seconds,
            "aligned_fraction": run.aligned_fraction, "teacher_tokenize_seconds": run.teacher_tokenize_seconds,
            "curve": [dataclasses.asdict(p) for p in run.curve]}
