""":class:`LogitDistillation`: the logit-distillation objective (SALT, RKD) for any target model, weighted by a
lambda schedule; the teacher runs only while lambda > 0."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from letkit.distillation.loss import (
    DEFAULT_CHUNK_SIZE,
    check_temperature,
    logit_distillation_loss,
    shared_vocab_size,
)
from letkit.losses import check_mask
from letkit.module_paths import get_submodule
from letkit.objective import TeacherObjective
from letkit.schedulers import LambdaSchedule
from letkit.target_capture import TargetCapture
from letkit.teacher import TeacherFeatureExtractor
from letkit.validation import check_int

@dataclass
class DistillationOutput:
    """What one logit-distillation step computed.

    ``loss`` is ``lm_loss + lambda_ * distill_loss`` (just ``lambda_ * distill_loss`` when no ``lm_loss`` was
    given); ``distill_loss`` is ``T^2 * mean KL``, None on steps where the teacher did not run (lambda = 0).
    """

    loss: Tensor
    lm_loss: Tensor | None
    distill_loss: Tensor | None
    lambda_: float


def _logits_of(output: Any) -> Tensor:
    """The logits in a model's forward output: the output itself, or its ``.logits`` (transformers)."""
    if isinstance(output, Tensor):
        return output
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model's forward returned {type(output).__name__}, not logits: logit distillation needs a model whose "
        "forward returns its logits (a tensor, or an output with .logits)"
    )


class LogitDistillation(TeacherObjective):
    """Logit distillation from a frozen teacher into any target ``nn.Module``, weighted by a lambda schedule.

    SALT and RKD (see :mod:`letkit.distillation`) in one line each::

        salt = LogitDistillation(model, small_lm, schedule=letkit.ConstantWeight(0.5, stop_step=n_kd), temperature=1.0)
        rkd = LogitDistillation(model, small_lm, schedule=letkit.ConstantWeight(0.5, stop_step=total_steps))

    Called like :class:`letkit.LETObjective`, after the target's forward pass (a forward hook on ``target``
    keeps a reference to the logits it returned, as :class:`letkit.target_capture.TargetCapture` describes)::

        logits = model(input_ids)
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        out = distill(input_ids, lm_loss=lm_loss, step=step)      # runs the teacher while lambda > 0
        out.loss.backward()

    LET and logit distillation combine as two objectives on the same forward pass, their losses summed
    (``let(input_ids, lm_loss=lm_loss, step=step).loss + distill(input_ids, step=step).loss``); both may use
    the same teacher model, and each releases only its own reference to it.

    Position ``t``'s target logits are compared with the teacher's at ``t``: both predict token ``t + 1`` from
    tokens ``<= t``, so no shift is needed; mask the last position of each sequence yourself if you want it out.

    Args:
        target: the model being trained; its forward must return its logits ``[B, T, V]`` (a tensor, or an
            output with ``.logits``).
        teacher: a :class:`TeacherFeatureExtractor` or a plain frozen ``nn.Module`` (a causal LM whose forward
            returns its logits). This objective builds its own extractor of the teacher's final hidden state
            around the same model (a given extractor's layer choice is left alone; its block list, tokenizer and
            ``stop_early`` are kept and its causality check, or opt-out, stands). It must not share parameters
            with ``target``. None only when ``schedule`` is already done (a run resumed at or after its
            ``stop_step``): the objective is then finished from the start, needs no teacher and returns the LM loss.
        schedule: the lambda schedule, required: when distillation ends is yours to choose (SALT: the end of its
            distillation phase, RKD: the run's length). The teacher is released once ``schedule.is_done(step)``.
            Its ``current_step`` is the objective's step counter (see :meth:`forward`); its state is not part of
            this module's ``state_dict()``: checkpoint ``objective.schedule.state_dict()``.
        temperature: ``T > 0`` (default 1).
        lm_head: module path of the teacher's LM head (an ``nn.Linear``-like module with ``weight``
            ``(V, d)`` and optional ``bias``). Default: ``get_output_embeddings()`` when the model has it
            (transformers), else the module named ``lm_head``. On construction the teacher is run once on an
            8-token probe to check that ``lm_head(final hidden state)`` reproduces its own logits (a model that
            scales or soft-caps its logits after the head is refused).
        vocab_size: the shared vocabulary when the teacher's head or the target's logits are padded beyond the
            tokenizer's size (e.g. rounded up to a multiple of 64): the KL is taken over the first
            ``vocab_size`` entries of both, renormalised, and the padding entries get no gradient. Default None:
            the two sizes must be equal, and a mismatch raises a ValueError naming both.
        chunk_size: tokens per chunk of the loss (default 1024).
        check_finite: raise a ValueError on any step where the teacher's logits hold NaN/Inf.

    Memory of the loss's forward + backward at 16,384 tokens x 49,152 vocabulary, float32 target logits, default
    chunk_size: measured by benchmarks/distillation_memory.py as the peak resident set on CPU above the inputs,
    at 2,048-8,192 tokens x 8,192 vocabulary, fitted as ``a + b * tokens`` and scaled linearly in tokens and
    vocabulary (results in benchmarks/results/distillation_memory.json):

    * this objective: **4.1 GB** = the gradient of the target's logits (3.2 GB; one float32 per token x vocabulary
      entry, which training allocates anyway, cross-entropy's gradient being added into it) + ~0.9 GB of per-chunk
      work (about 4.5 float32 ``chunk_size x vocab`` tensors; halve ``chunk_size`` to halve it). Nothing of size
      tokens x vocabulary is kept between forward and backward;
    * the naive version (full teacher logits, ``F.kl_div`` on both log-softmaxes, autograd): **16.2 GB**, five
      float32 tokens x vocabulary tensors;
    * a plain chunked loop under autograd: **11.9 GB** (3.7 per entry), since every chunk's log-probabilities
      stay saved for backward; hence the backward pass here recomputes each chunk.

    The teacher adds its final hidden state (16,384 x 576 floats for SmolLM-135M: 38 MB).
    """

    def __init__(
        self,
        target: nn.Module,
        teacher: TeacherFeatureExtractor | nn.Module | None,
        *,
        schedule: LambdaSchedule | None = None,
        temperature: float = 1.0,
        lm_head: str | None = None,
        vocab_size: int | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        check_finite: bool = True,
    ) -> None:
        super().__init__(target, teacher, schedule, example="letkit.ConstantWeight(0.5, stop_step=...)")
        self.temperature = check_temperature(temperature)
        self.chunk_size = check_int("chunk_size", chunk_size, minimum=1)
        self.check_finite = check_finite
        self.vocab_size = check_int("vocab_size", vocab_size, minimum=1, optional=True)
        if teacher is None:
            self.lm_head_path: str | None = None
            return
        if isinstance(teacher, TeacherFeatureExtractor):
            # its constructor ran the causality check, or its user turned the check off: neither is redone
            teacher = TeacherFeatureExtractor(teacher.model, [-1], block_list=teacher.block_list_path,
                                              stop_early=teacher.stop_early, tokenizer=teacher.tokenizer,
                                              check_causal=False)
        else:
            teacher = TeacherFeatureExtractor(teacher, [-1])
        self.teacher = teacher
        self.lm_head_path = _find_lm_head(teacher.model, lm_head)
        teacher_vocab = self._head().weight.shape[0]
        if self.vocab_size is not None and self.vocab_size > teacher_vocab:
            raise ValueError(f"vocab_size={vocab_size} is larger than the teacher's LM head ({teacher_vocab} outputs)")
        self._check_head_reproduces_logits()
        self._capture = TargetCapture(target, {None: (target, _logits_of)}, what="logits")

    def _head(self) -> nn.Module:
        return self.teacher.model.get_submodule(self.lm_head_path)

    def _check_head_reproduces_logits(self) -> None:
        head = self._head()
        probe = torch.arange(8, device=head.weight.device)[None] % head.weight.shape[0]
        with torch.inference_mode():
            logits = _logits_of(self.teacher.model(probe)).float()
        (hidden,) = self.teacher(probe)
        recomputed = F.linear(hidden, head.weight, head.bias).float()
        tolerance = 1e-4 if head.weight.dtype in (torch.float32, torch.float64) else 1e-2
        error = ((recomputed - logits).abs().max() / logits.abs().max().clamp_min(1e-6)).item()
        if not error <= tolerance:
            raise ValueError(
                f"the teacher's LM head {self.lm_head_path!r} applied to its final hidden state does not reproduce its "
                f"logits (relative difference {error:.3g}): the model changes its logits after the head (scaling, "
                "soft-capping) or the head is another module; pass lm_head=<module path>, or a model whose logits are "
                "lm_head(final hidden state)"
            )

    def forward(
        self, input_ids: Tensor, *, lm_loss: Tensor | None = None, step: int | None = None, mask: Tensor | None = None
    ) -> DistillationOutput:
        """Combine the LM loss with the distillation term for the target forward pass that just ran.

        The contract is :meth:`letkit.LETObjective.forward`'s: ``step=`` sets ``schedule.current_step``, the one
        step counter, and leaving it out uses it; with gradient accumulation, call the objective once per
        micro-batch right after its target forward, with the optimizer's step. The logits are those of the
        latest target forward in this call's grad mode, so an evaluation forward under ``torch.no_grad()`` in
        between does not replace the training forward's. Every argument is checked before the teacher runs, and a refused call leaves
        the captured outputs for a corrected one.

        Args:
            input_ids: the ``[B, T]`` token ids the target was just run on; the teacher reads the same.
            lm_loss: the target's language-modelling loss; None to get only ``lambda * L_KD``.
            step: the training (optimizer) step; sets ``schedule.current_step``.
            mask: optional ``[B, T]`` token mask on the logits' device, bool or 0/1 (True/1 = distil this
                token), e.g. padding.

        Raises:
            RuntimeError: lambda > 0 but no target forward ran in this grad mode since the last call, or the
                logits carry no gradient under grad mode (the objective would not train the target), or the
                teacher is gone.
            ValueError: the captured logits are not those of ``input_ids`` (another batch ran through the target
                since), a bad mask, a vocabulary mismatch, or NaN/Inf teacher logits (with ``check_finite``).
        """
        lam = self._lambda_at(step)
        if lam == 0.0:
            total = lm_loss if lm_loss is not None else torch.zeros((), device=input_ids.device)
            return DistillationOutput(total, lm_loss, None, 0.0)
        (logits,) = self._capture.get(input_ids).values()
        head = self._head()
        if mask is not None:
            check_mask(mask, tuple(logits.shape[:-1]), logits.device, of="logits")
            mask = mask != 0  # checked once: as bools the loss need not check its values again
        shared_vocab_size(head.weight.shape[0], logits.shape[-1], self.vocab_size)
        self._capture.discard()  # every argument is valid: the logits are used now
        (hidden,) = self.teacher(input_ids.to(head.weight.device))
        distill = logit_distillation_loss(
            logits,
            hidden.to(logits.device),
            head.weight.to(logits.device),
            None if head.bias is None else head.bias.to(logits.device),
            temperature=self.temperature,
            mask=mask,
            vocab_size=self.vocab_size,
            chunk_size=self.chunk_size,
            check_finite=self.check_finite,
        )
        total = lam * distill if lm_loss is None else lm_loss + lam * distill
        return DistillationOutput(total, lm_loss, distill, lam)

    def extra_repr(self) -> str:
        return (
            f"temperature={self.temperature}, vocab_size={self.vocab_size}, chunk_size={self.chunk_size}, "
            f"teacher={self.teacher!r}"
        )


def _find_lm_head(model: nn.Module, path: str | None) -> str:
    if path is not None:
        head = get_submodule(model, path)
    else:
        output_embeddings = getattr(model, "get_output_embeddings", None)
        head = output_embeddings() if callable(output_embeddings) else getattr(model, "lm_head", None)
        if not isinstance(head, nn.Module):
            raise ValueError(
                f"could not find the LM head of the teacher {type(model).__name__} (no get_output_embeddings() and no "
                "module named 'lm_head'): pass lm_head=<module path>"
            )
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"the teacher's LM head must have a 2-D weight (V, d) like nn.Linear, got {type(head).__name__}")
    if getattr(head, "bias", None) is not None and not isinstance(head.bias, Tensor):
        raise ValueError(f"the teacher's LM head bias must be a tensor or None, got {type(head.bias).__name__}")
    return path if path is not None else next(name for name, module in model.named_modules() if module is head)
