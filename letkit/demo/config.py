"""Settings of one ``letkit demo`` run: model shapes, schedules, the compared method's settings (LET, logit
distillation), the presets, and their checks."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from letkit.optim import warmup_cosine_lr
from letkit.token_alignment import ALIGNMENT_MODES

EOS_TOKEN = "<|endoftext|>"
BIN_DTYPES = ("uint16", "uint32")
# A byte-level BPE holds the 256 byte tokens and <|endoftext|> before any merge.
MIN_BPE_VOCAB = 257

METHODS = ("let", "salt", "rkd", "let+salt")
"""The methods the demo compares with the baseline (``--method``)."""
METHOD_LABELS = {"let": "LET", "salt": "SALT", "rkd": "RKD", "let+salt": "LET+SALT"}

Log = Callable[[str], None]
"""Where the stages send their progress lines (``print`` by default)."""


class DemoError(ValueError):
    """A bad input to the demo (corpus, tokenizer, teacher, settings), with a message saying what and why."""


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
        """The learning rate at 0-based ``step``."""
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
        """S_stop for a run of ``steps`` steps (at least 1)."""
        return _stop_step(self.stop_fraction, steps)


@dataclass
class KDSettings:
    """Logit distillation from the teacher (:class:`letkit.LogitDistillation`), the SALT and RKD baselines:
    ``L_NLL + weight * T^2 * KL(teacher || target)`` at temperature T, the weight constant until the stop step,
    then 0 and the teacher dropped. SALT (Rawat et al. 2024) distils for the first ``stop_fraction`` of the steps;
    RKD for all of them (see :func:`method_settings`).

    ``weight`` 5 is the best of {0.1, 0.5, 2, 5, 10} for both SALT and RKD on the default preset (final validation
    loss, seed 0; benchmarks/RESULTS.md); temperature 1 and SALT's stop at 25% of the run (as in Rawat et al.) were
    not swept.
    """

    weight: float = 5.0
    temperature: float = 1.0
    stop_fraction: float = 0.25

    def stop_step(self, steps: int) -> int:
        """The first step without distillation, for a run of ``steps`` steps (at least 1)."""
        return _stop_step(self.stop_fraction, steps)


def _stop_step(fraction: float, steps: int) -> int:
    return max(1, round(fraction * steps))


def method_settings(method: str, let: LETSettings, kd: KDSettings) -> tuple[LETSettings | None, KDSettings | None]:
    """``(LET settings, distillation settings)`` of ``method`` (one of :data:`METHODS`), None for a part it does not
    have: LET is ``let``; SALT is ``kd``; RKD is ``kd`` for the whole run; LET+SALT is both, their terms summed."""
    if method not in METHODS:
        raise DemoError(f"method must be one of {METHODS}, got {method!r}")
    parts = method.split("+")
    distillation = {"salt": kd, "rkd": dataclasses.replace(kd, stop_fraction=1.0)}
    return (let if "let" in parts else None,
            next((distillation[part] for part in parts if part in distillation), None))


@dataclass
class DemoConfig:
    """Everything one ``letkit demo`` run depends on. The presets below are ``--quick`` and the default.

    ``corpus``: None = the standard library's top-level ``*.py`` files; else a directory (all non-hidden files,
    recursively), a glob, a text file, or a token file ``.npy`` / ``.bin`` (``bin_dtype``).
    ``tokenizer``: a ``tokenizer.json``; None = the teacher's tokenizer if ``teacher`` has one, else a byte-level
    BPE of ``vocab_size`` trained on the training split. ``teacher``: a checkpoint directory; None = pretrain one.
    ``method``: what the second run adds to the next-token loss, one of :data:`METHODS` (``let`` with ``let``'s
    settings, ``salt`` / ``rkd`` with ``kd``'s, ``let+salt`` with both; see :func:`method_settings`).
    ``cross_tokenizer``: None = the teacher reads the target's token ids (one shared vocabulary); ``"last"`` or
    ``"mean"`` = the teacher reads its own tokenization of each window's text, aligned with that mode (see
    :func:`letkit.token_alignment.align_tokens`). ``teacher_vocab_size``: pretrain the teacher on its own byte-level
    BPE of this many tokens (implies ``cross_tokenizer="last"`` unless set). ``threads``: torch CPU threads
    (None = torch's choice).
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
    method: str = "let"
    kd: KDSettings = field(default_factory=KDSettings)

    @property
    def alignment_mode(self) -> str | None:
        """The cross-tokenizer alignment mode in effect (``teacher_vocab_size`` implies ``"last"``), or None."""
        if self.cross_tokenizer is None and self.teacher_vocab_size is not None:
            return "last"
        return self.cross_tokenizer

    def validate(self) -> None:
        """Raise a :class:`DemoError` naming the first setting that is out of range."""
        for name in ("seq_len", "eval_every", "eval_sequences", "seeds"):
            if getattr(self, name) < 1:
                raise DemoError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise DemoError(f"threads must be >= 1 (or unset for torch's choice), got {self.threads}")
        if self.vocab_size < MIN_BPE_VOCAB:
            raise DemoError(f"vocab_size must be >= {MIN_BPE_VOCAB} (256 byte tokens and {EOS_TOKEN}), "
                            f"got {self.vocab_size}")
        if self.cross_tokenizer is not None and self.cross_tokenizer not in ALIGNMENT_MODES:
            raise DemoError(f"cross_tokenizer must be one of {ALIGNMENT_MODES} or None, got {self.cross_tokenizer!r}")
        if self.teacher_vocab_size is not None:
            if self.teacher_vocab_size < MIN_BPE_VOCAB:
                raise DemoError(f"teacher_vocab_size must be >= {MIN_BPE_VOCAB} (256 byte tokens and {EOS_TOKEN}), "
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
        kd = self.kd
        if not 0 <= kd.weight < math.inf or not 0 < kd.temperature < math.inf or not 0 < kd.stop_fraction <= 1:
            raise DemoError(f"logit distillation needs a finite weight >= 0, a finite temperature > 0 and "
                            f"0 < stop_fraction <= 1, got {kd}")
        _, distillation = method_settings(self.method, self.let, kd)  # refuses an unknown method
        if distillation is not None and self.alignment_mode is not None:
            raise DemoError(f"method {self.method!r} distils the teacher's logits into the target's over one shared "
                            "vocabulary, so the teacher must read the target's tokens: it cannot be combined with "
                            "cross-tokenizer LET (--cross-tokenizer, --teacher-vocab-size)")


# Both presets share one teacher (same shape, data and schedule), so the second one reuses the cached teacher.
# Target shape, LR, lambda0, S_stop and the layer map come from benchmarks/convergence.py (see RESULTS.md): the LR is
# the *baseline's* best in a 3-seed sweep at each preset's shape and length (LET alone would prefer a higher one);
# lambda0 = 3, not the paper's 0.1 (tuned at 1.4B), which does nothing at this scale; the target's middle block
# (L2M) beat its first (L2E). The default's 6-block target shows the effect more clearly than 3 blocks (2.1x vs
# 1.6x, 3 seeds): the deeper model starts slower and the teacher's features make up for it. --quick keeps 3 blocks
# to stay within 3 minutes.
_TEACHER_SHAPE = ModelShape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=192)
_TEACHER_SCHEDULE = TrainSchedule(steps=1000, batch_size=16, lr=3e-3, warmup_steps=50)
_LET = LETSettings(lambda0=3.0, stop_fraction=1.0, layer_map="L2M", projector="interpolate", loss="cosine")

PRESETS: dict[str, DemoConfig] = {
    # <= 3 minutes on 2 CPU cores, teacher pretraining included.
    "quick": DemoConfig(
        teacher_shape=_TEACHER_SHAPE,
        teacher_schedule=_TEACHER_SCHEDULE,
        target_shape=ModelShape(hidden_size=192, num_layers=3, num_heads=4, intermediate_size=512),
        target_schedule=TrainSchedule(steps=300, batch_size=8, lr=1.5e-3, warmup_steps=15),
        let=_LET,
        seq_len=128,
        eval_every=15,
        eval_sequences=48,
    ),
    # Twice the depth and twice the training: <= 15 minutes for one seed, teacher pretraining included.
    "default": DemoConfig(
        teacher_shape=_TEACHER_SHAPE,
        teacher_schedule=_TEACHER_SCHEDULE,
        target_shape=ModelShape(hidden_size=192, num_layers=6, num_heads=4, intermediate_size=512),
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
    config = PRESETS[name]
    nested = {f.name: dataclasses.replace(getattr(config, f.name)) for f in dataclasses.fields(config)
              if dataclasses.is_dataclass(getattr(config, f.name))}
    return dataclasses.replace(config, **{**nested, **overrides})

