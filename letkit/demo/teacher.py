"""The teacher: a given checkpoint, or the demo's own small model pretrained on the corpus and cached (keyed by the
corpus, tokenizer and pretraining settings)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from letkit.atomic import atomic_directory, atomic_write_json
from letkit.demo.cache import CACHE_FORMAT, content_hash
from letkit.demo.config import DemoConfig, DemoError, Log
from letkit.demo.tokens import TokenData, prepare_data
from letkit.demo.train import RunSpec, build_model, train_lockstep
from letkit.models import count_parameters, save_pretrained
from letkit.teacher import TeacherFeatureExtractor

TEACHER_INFO_FILE = "letkit_demo_teacher.json"
# A teacher pretrained on its own (smaller) vocabulary reads a target window's text as more tokens than the target;
# its context is the average number of its tokens per window times this margin, so few windows are cut.
TEACHER_CONTEXT_MARGIN = 1.25


class ForwardClock:
    """Adds up the wall-clock seconds of a module's forward passes (a teacher's, for the report).

    Hooks on the module time every forward, however it is called (through :class:`TeacherFeatureExtractor`, whose
    early stop ends the forward with an exception, or through an objective's own extractor of the same model). The
    module holds the clock, not the other way round, so the clock does not keep a released teacher alive.
    """

    def __init__(self, module: nn.Module) -> None:
        self.seconds = 0.0
        self._started: float | None = None
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop, always_call=True)

    def _start(self, module: nn.Module, args: Any) -> None:
        self._started = time.perf_counter()

    def _stop(self, module: nn.Module, args: Any, output: Any) -> None:
        self.seconds += time.perf_counter() - self._started


def open_teacher(path: str | os.PathLike) -> TeacherFeatureExtractor:
    """Load a teacher checkpoint directory, turning load failures into DemoErrors."""
    if not Path(path).is_dir():
        raise DemoError(f"--teacher {str(path)!r} is not a checkpoint directory (config.json + *.safetensors)")
    try:
        return TeacherFeatureExtractor.from_pretrained(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DemoError(f"cannot load --teacher {str(path)!r}: {e}") from e


@dataclass
class TeacherInfo:
    """The teacher a demo run uses: its checkpoint directory, whether it was ``provided`` (``--teacher``) or the
    demo's own (then ``cached`` when reused, with its pretraining seconds and validation loss), and its size."""

    path: str
    provided: bool
    cached: bool
    pretrain_seconds: float | None
    val_loss: float | None
    non_embedding_parameters: int
    hidden_size: int
    num_layers: int


def teacher_cache_key(config: DemoConfig, data: TokenData) -> str:
    """The cache key of the teacher pretrained on ``data`` with ``config``'s teacher settings."""
    spec = {"shape": dataclasses.asdict(config.teacher_shape), "schedule": dataclasses.asdict(config.teacher_schedule),
            "seq_len": config.seq_len, "seed": config.teacher_seed, "eval_sequences": config.eval_sequences}
    return content_hash(CACHE_FORMAT, "teacher", data.key, json.dumps(spec, sort_keys=True))[:20]


def pretrain_teacher(config: DemoConfig, data: TokenData, cache_root: Path, *, log: Log = print) -> TeacherInfo:
    """The demo's teacher: reuse the cached one for this corpus/tokenizer/config, or pretrain and cache it."""
    path = cache_root / "teachers" / teacher_cache_key(config, data)
    info_file = path / TEACHER_INFO_FILE
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        return TeacherInfo(**{**info, "path": str(path), "cached": True})
    model = build_model(config.teacher_shape, data.vocab_size, config.seq_len, config.teacher_seed)
    log(f"teacher: pretraining {count_parameters(model, non_embedding=True) / 1e6:.2f}M non-embedding parameters "
        f"for {config.teacher_schedule.steps} steps (cached afterwards in {path})")
    [run] = train_lockstep([RunSpec("teacher", model)], data, config.teacher_schedule, seq_len=config.seq_len,
                           data_seed=config.teacher_seed, eval_every=config.teacher_schedule.steps,
                           eval_sequences=config.eval_sequences, desc="teacher", progress=config.progress)
    info = TeacherInfo(str(path), False, False, run.train_seconds, run.final_val_loss,
                       count_parameters(model, non_embedding=True), config.teacher_shape.hidden_size,
                       config.teacher_shape.num_layers)
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
    """The :class:`TeacherInfo` of a provided teacher loaded from ``path``."""
    config = getattr(teacher.model, "config", None)
    return TeacherInfo(path, True, False, None, None, count_parameters(teacher.model, non_embedding=True),
                       getattr(config, "hidden_size", -1), teacher.num_layers)
