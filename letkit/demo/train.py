"""Training in lockstep: several runs on the same batches, one step of each in turn, with validation curves.

A run is a model and an optional list of auxiliary objectives, each adding its term to the model's next-token loss
(:class:`letkit.demo.methods.LETAlignment` is LET's, :class:`letkit.demo.methods.DistillationTerm` logit
distillation's). A run without any is the plain baseline.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from letkit.demo.config import ModelShape, TrainSchedule
from letkit.demo.tokens import TokenData
from letkit.models import from_preset
from letkit.optim import weight_decay_groups


def build_model(shape: ModelShape, vocab_size: int, seq_len: int, seed: int) -> nn.Module:
    """A freshly initialised Llama-style model (``letkit.models.from_preset("tiny", ...)`` with these overrides)."""
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


class AuxiliaryObjective(Protocol):
    """A term that a training method adds to a run's next-token loss (LET's alignment term, say).

    Called once per training step, after the model's forward pass, with the step, the batch's input ids
    ``[B, T]``, the model's logits and the loss so far; returns that loss with its term added. Its
    ``parameters()`` (a learned projector, say) train alongside the model's. The attributes are read for the
    report: ``name``, the term's name in :attr:`EvalPoint.weights`; ``lambda_``, its weight at the last step; the
    seconds spent in teacher forward passes and in re-tokenizing batches for the teacher (both on the run's clock);
    and ``aligned_fraction``, the fraction of target positions that received a teacher feature (None unless
    cross-tokenizer).
    """

    name: str
    lambda_: float
    teacher_forward_seconds: float
    teacher_tokenize_seconds: float
    aligned_fraction: float | None

    def parameters(self) -> Iterator[nn.Parameter]: ...

    def __call__(self, step: int, inputs: Tensor, logits: Tensor, loss: Tensor) -> Tensor: ...


@dataclass
class RunSpec:
    """A model to train in a :func:`train_lockstep` group: next-token NLL plus its auxiliary ``objectives`` (none:
    the baseline). ``lr`` overrides the schedule's peak learning rate (for LR sweeps)."""

    name: str
    model: nn.Module
    objectives: Sequence[AuxiliaryObjective] = field(default_factory=list)
    lr: float | None = None


@dataclass
class EvalPoint:
    """One validation of a run: after ``step`` steps and ``seconds`` of training; ``train_loss`` is the smoothed
    training loss (None before the first step); ``weights`` each auxiliary objective's weight at the last step, by
    its name (e.g. ``{"let": 2.5, "kd": 0.5}``; empty for the baseline)."""

    step: int
    seconds: float
    val_loss: float
    train_loss: float | None
    weights: dict[str, float] = field(default_factory=dict)


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
        """The validation loss at the end of training."""
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


class _Trainer:
    """Optimizer, clock and validation curve of one run."""

    def __init__(self, spec: RunSpec, schedule: TrainSchedule) -> None:
        self.spec = spec
        self.schedule = dataclasses.replace(schedule, lr=spec.lr) if spec.lr is not None else schedule
        params = [p for p in spec.model.parameters() if p.requires_grad]
        for objective in spec.objectives:
            params += list(objective.parameters())
        self.params = params
        self.optimizer = torch.optim.AdamW(weight_decay_groups(params, self.schedule.weight_decay),
                                           lr=self.schedule.lr, betas=(0.9, 0.95))
        self.seconds, self.smoothed = 0.0, None
        self.curve: list[EvalPoint] = []

    @property
    def weights(self) -> dict[str, float]:
        return {objective.name: objective.lambda_ for objective in self.spec.objectives}

    def step(self, step: int, inputs: Tensor, targets: Tensor) -> None:
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = self.schedule.lr_at(step)
        logits = self.spec.model(inputs)
        loss = lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        for objective in self.spec.objectives:
            loss = objective(step, inputs, logits, loss)
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
        self.curve.append(EvalPoint(step, self.seconds, val, self.smoothed, self.weights))

    def result(self, seq_len: int) -> RunResult:
        s, objectives = self.schedule, self.spec.objectives
        aligned = [o.aligned_fraction for o in objectives if o.aligned_fraction is not None]
        return RunResult(self.spec.name, self.curve, s.steps, self.seconds, s.steps * s.batch_size * seq_len / self.seconds,
                         sum((o.teacher_forward_seconds for o in objectives), 0.0),
                         aligned[0] if aligned else None,
                         sum((o.teacher_tokenize_seconds for o in objectives), 0.0))


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
                                        + "".join(f" {name} weight {w:.2f}" for name, w in t.weights.items()))
            bar.set_postfix(postfix, refresh=False)
    bar.close()
    return [trainer.result(seq_len) for trainer in trainers]
