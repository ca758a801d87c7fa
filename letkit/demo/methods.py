"""The runs the demo compares: a freshly initialised target trained with plain next-token loss (the baseline), or
with auxiliary objectives from the teacher: LET's alignment term (:class:`LETAlignment`), the teacher reading either
the target's token ids or, cross-tokenizer, its own tokenization of the same text (:class:`CrossTokenizerInputs`),
and logit distillation (:class:`DistillationTerm`, the SALT and RKD baselines)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from torch import Tensor, nn

from letkit.demo.config import METHOD_LABELS, DemoConfig, DemoError, KDSettings, LETSettings, method_settings
from letkit.demo.teacher import ForwardClock, open_teacher
from letkit.demo.tokens import TokenData, teacher_positions
from letkit.demo.train import RunResult, RunSpec, build_model, train_lockstep
from letkit.distillation import LogitDistillation
from letkit.objective import LETObjective
from letkit.projector import LayerMappingProjector
from letkit.schedulers import ConstantWeight, LinearDecay
from letkit.token_alignment import ALIGNMENT_MODES, TokenAlignment, same_tokenizer, tokenize_for_teacher


class CrossTokenizerInputs:
    """The teacher's view of a target batch in cross-tokenizer LET, with running counts for the report.

    Calling it on target input ids ``[B, T]`` returns ``(teacher_ids [B, S], alignment)`` from
    :func:`letkit.token_alignment.tokenize_for_teacher`: each row decoded with the target tokenizer, re-tokenized with the
    teacher's (at most ``teacher_max_length`` tokens) and aligned causally with ``mode``. ``aligned_fraction`` is the
    fraction of target positions so far that received a teacher feature; ``seconds`` the time spent here.
    """

    def __init__(self, target_tokenizer: Any, teacher_tokenizer: Any, mode: str,
                 teacher_max_length: int | None = None) -> None:
        if mode not in ALIGNMENT_MODES:
            raise DemoError(f"cross-tokenizer mode must be one of {ALIGNMENT_MODES}, got {mode!r}")
        self.target_tokenizer, self.teacher_tokenizer = target_tokenizer, teacher_tokenizer
        self.mode, self.teacher_max_length = mode, teacher_max_length
        self.aligned = self.positions = 0
        self.seconds = 0.0

    def __call__(self, inputs: Tensor) -> tuple[Tensor, TokenAlignment]:
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


class LETAlignment:
    """LET as an auxiliary objective of a run (see :class:`letkit.demo.train.AuxiliaryObjective`), named ``"let"``:
    adds ``lambda(s) * L_align`` through ``objective``; with ``teacher_inputs`` the teacher reads its own tokens of
    each batch (computed on the run's clock, only while lambda > 0). ``clock`` times the teacher's forward passes."""

    name = "let"

    def __init__(self, objective: LETObjective, teacher_inputs: CrossTokenizerInputs | None = None, *,
                 clock: ForwardClock | None = None) -> None:
        self.objective, self.teacher_inputs, self.clock = objective, teacher_inputs, clock
        self.lambda_ = 0.0

    def parameters(self) -> Iterator[nn.Parameter]:
        """The objective's own parameters (a learned projector's), trained with the target's."""
        return self.objective.parameters()

    def __call__(self, step: int, inputs: Tensor, logits: Tensor, loss: Tensor) -> Tensor:
        cross = {}
        if self.teacher_inputs is not None and self.objective.schedule(step) > 0:
            teacher_ids, alignment = self.teacher_inputs(inputs)
            cross = {"teacher_input_ids": teacher_ids, "token_alignment": alignment}
        out = self.objective(inputs, lm_loss=loss, step=step, **cross)
        self.lambda_ = out.lambda_
        return out.loss

    @property
    def teacher_forward_seconds(self) -> float:
        return self.clock.seconds if self.clock is not None else 0.0

    @property
    def teacher_tokenize_seconds(self) -> float:
        return self.teacher_inputs.seconds if self.teacher_inputs is not None else 0.0

    @property
    def aligned_fraction(self) -> float | None:
        return self.teacher_inputs.aligned_fraction if self.teacher_inputs is not None else None


class DistillationTerm:
    """Logit distillation (SALT, RKD) as an auxiliary objective of a run, named ``"kd"``: adds
    ``lambda(s) * T^2 * KL(teacher || target)`` through ``objective``, which drops the teacher when its schedule
    ends. ``clock`` times the teacher's forward passes (its LM head runs inside the loss, on the run's clock)."""

    name = "kd"
    teacher_tokenize_seconds = 0.0
    aligned_fraction = None

    def __init__(self, objective: LogitDistillation, *, clock: ForwardClock | None = None) -> None:
        self.objective, self.clock = objective, clock
        self.lambda_ = 0.0

    def parameters(self) -> Iterator[nn.Parameter]:
        """The objective's own parameters (logit distillation has none)."""
        return self.objective.parameters()

    def __call__(self, step: int, inputs: Tensor, logits: Tensor, loss: Tensor) -> Tensor:
        out = self.objective(inputs, lm_loss=loss, step=step)
        self.lambda_ = out.lambda_
        return out.loss

    @property
    def teacher_forward_seconds(self) -> float:
        return self.clock.seconds if self.clock is not None else 0.0


def target_run(
    config: DemoConfig,
    data: TokenData,
    seed: int,
    *,
    name: str,
    let: LETSettings | None = None,
    kd: KDSettings | None = None,
    teacher_path: str | None = None,
    lr: float | None = None,
    projector: LayerMappingProjector | None = None,
) -> RunSpec:
    """A freshly initialised target (the same weights for the same ``seed``): the baseline without ``let`` and
    ``kd``; with ``let``, LET's alignment term; with ``kd``, logit distillation (:func:`method_settings` gives both
    for a method); each with its own copy of the teacher at ``teacher_path``, dropped when its schedule ends. With
    ``config.alignment_mode`` and a teacher whose tokenizer differs from ``data.tokenizer``, LET is cross-tokenizer
    (:class:`CrossTokenizerInputs`). ``projector`` replaces the projector kind named in ``let`` (for ablations
    beyond the named kinds)."""
    model = build_model(config.target_shape, data.vocab_size, config.seq_len, seed)
    steps = config.target_schedule.steps
    objectives: list[LETAlignment | DistillationTerm] = []
    if let is not None:
        teacher = open_teacher(teacher_path)
        teacher_inputs = None
        if config.alignment_mode is not None and not same_tokenizer(teacher.tokenizer, data.tokenizer):
            teacher_inputs = CrossTokenizerInputs(data.tokenizer, teacher.tokenizer, config.alignment_mode,
                                                  teacher_positions(teacher))
        objective = LETObjective(model, teacher, layer_map=let.layer_map,
                                 projector=let.projector if projector is None else projector, loss=let.loss,
                                 schedule=LinearDecay(let.lambda0, stop_step=let.stop_step(steps)))
        # the clock starts after building the objective, which may have run the teacher once to read its feature size
        objectives.append(LETAlignment(objective, teacher_inputs, clock=ForwardClock(teacher.model)))
    if kd is not None:
        teacher = open_teacher(teacher_path)
        # the target's logits cover the data's vocabulary; a provided teacher's may be padded beyond it
        objective = LogitDistillation(model, teacher, schedule=ConstantWeight(kd.weight, stop_step=kd.stop_step(steps)),
                                      temperature=kd.temperature, vocab_size=data.vocab_size)
        objectives.append(DistillationTerm(objective, clock=ForwardClock(teacher.model)))
    return RunSpec(name, model, objectives, lr)


def compare_seed(config: DemoConfig, data: TokenData, teacher_path: str, seed: int) -> tuple[RunResult, RunResult]:
    """The baseline and ``config.method`` (named by its label, e.g. ``"SALT"``) from the same initialisation,
    trained in lockstep on the same batches."""
    let, kd = method_settings(config.method, config.let, config.kd)
    label = METHOD_LABELS[config.method]
    runs = [target_run(config, data, seed, name="baseline"),
            target_run(config, data, seed, name=label, let=let, kd=kd, teacher_path=teacher_path)]
    desc = f"seed {seed}" if config.seeds > 1 else f"baseline + {label}"
    return tuple(train_lockstep(runs, data, config.target_schedule, seq_len=config.seq_len, data_seed=seed,
                                eval_every=config.eval_every, eval_sequences=config.eval_sequences, desc=desc,
                                progress=config.progress))
