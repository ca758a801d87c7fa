"""Logit distillation from a small frozen teacher: the SALT and RKD baselines the LET paper compares with.

    L_total(s) = L_NLL + lambda(s) * L_KD
    L_KD       = T^2 * mean over tokens of KL(softmax(z_teacher / T) || softmax(z_target / T))

``T`` is the temperature. The ``T^2`` factor is Hinton et al.'s (2015) convention: the gradient of ``KL`` with
respect to the target's logits scales like ``1 / T^2`` as ``T`` grows, so ``T^2 * KL`` keeps the
distillation term's gradients on the same scale whatever ``T`` is (as ``T -> inf`` its gradient tends to the
difference of the mean-centred logits divided by the vocabulary size, not to 0). ``KL`` is used rather than the
cross-entropy with the teacher's soft labels: both have the same gradients, and ``KL`` is 0 when the target
matches the teacher.

Where the baselines come from:

* **SALT** (Rawat et al. 2024, *A Little Help Goes a Long Way: Efficient LLM Training by Leveraging Small
  LMs*, arXiv:2410.18779): a two-stage recipe, knowledge distillation from the small LM's soft labels in the
  early phase of training, then standard next-token training. Here: a schedule that ends early, e.g.
  ``ConstantWeight(w, stop_step=n_kd)`` (an abrupt switch) or ``LinearDecay(w, stop_step=n_kd)``. The SALT_DS
  variant's data selection by the small model is not part of this objective.
* **RKD**, the LET paper's (Zhao et al., ICLR 2026) other baseline, read as *reverse* knowledge distillation:
  the same logit distillation from the smaller model, for the whole run ("reverse" because the teacher is
  smaller than the student; the KL keeps its usual teacher-to-student direction). Here: ``ConstantWeight(w,
  stop_step=total_steps)``. The paper's own wording of RKD was not available to check (only its abstract and
  summaries); this reading fits its framing of both baselines as uses of the small model's predictions. It is
  not relational KD (Park et al. 2019), which distils distances between samples' embeddings.

A loss written as ``(1 - w) * L_NLL + w * L_KD`` (a mixing weight) equals ``(1 - w) * (L_NLL + lambda * L_KD)``
with ``lambda = w / (1 - w)``: the same objective up to an overall factor.

Memory: the teacher runs only to its final hidden state ``[tokens, d_teacher]``; its LM head is applied per
chunk of ``chunk_size`` tokens inside the loss, and the backward pass recomputes each chunk instead of keeping
anything of size ``[tokens, vocab]`` between forward and backward. See :class:`LogitDistillation` for the
figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from letkit.losses import check_mask
from letkit.module_paths import get_submodule
from letkit.objective import TeacherObjective
from letkit.schedulers import LambdaSchedule
from letkit.target_capture import TargetCapture
from letkit.teacher import TeacherFeatureExtractor

DEFAULT_CHUNK_SIZE = 1024


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__} ({temperature!r})")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _token_weights(mask: Tensor | None, leading_shape: torch.Size, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Per-token weights ``m_t / max(1, sum m)``: the loss is their weighted sum of per-token KLs."""
    num_tokens = math.prod(leading_shape)
    if mask is None:
        return torch.full((num_tokens,), 1.0 / max(1, num_tokens), device=device, dtype=dtype)
    check_mask(mask, tuple(leading_shape), device, of="logits")
    keep = (mask.reshape(-1) != 0).to(dtype)
    return keep / keep.sum().clamp_min(1)


def _chunk_log_probs(
    target_logits: Tensor,
    teacher_hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    keep: Tensor,
    temperature: float,
    vocab_size: int,
) -> tuple[Tensor, Tensor]:
    """Temperature-scaled log-probabilities of teacher and target over the first ``vocab_size`` entries, for one
    chunk of tokens. Dropped tokens (``keep`` False) are zeroed first, so NaN/Inf there cannot reach the loss.
    In-place steps keep at most three chunk-sized tensors alive."""
    compute_dtype = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    dropped = ~keep[:, None]
    # the teacher's head runs in the teacher's own dtype, as in its own forward pass
    teacher = F.linear(teacher_hidden, weight[:vocab_size], None if bias is None else bias[:vocab_size]).to(compute_dtype)
    log_p_teacher = F.log_softmax(teacher.masked_fill_(dropped, 0).div_(temperature), dim=-1)
    del teacher
    target = target_logits[:, :vocab_size].masked_fill(dropped, 0).to(compute_dtype)
    return log_p_teacher, F.log_softmax(target.div_(temperature), dim=-1)


class _ChunkedDistillationKL(torch.autograd.Function):
    """``T^2 * sum_t w_t * KL_t`` over token chunks; backward recomputes each chunk (nothing ``[N, V]`` is saved)."""

    @staticmethod
    def forward(
        ctx: Any,
        target_logits: Tensor,
        teacher_hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        token_weights: Tensor,
        temperature: float,
        vocab_size: int,
        chunk_size: int,
        check_finite: bool,
    ) -> Tensor:
        total = torch.zeros((), device=target_logits.device, dtype=token_weights.dtype)
        non_finite_tokens = torch.zeros((), device=target_logits.device, dtype=torch.long)
        for start in range(0, target_logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_p_teacher, log_p_target = _chunk_log_probs(
                target_logits[rows], teacher_hidden[rows], weight, bias, token_weights[rows] > 0, temperature, vocab_size
            )
            if check_finite:  # one NaN/Inf teacher logit makes its whole row of log-probabilities non-finite
                non_finite_tokens += (~torch.isfinite(log_p_teacher)).any(-1).sum()
            # KL per token: sum over the vocabulary of p_teacher * (log p_teacher - log p_target)
            log_ratio = log_p_teacher - log_p_target
            del log_p_target
            per_token = log_ratio.mul_(log_p_teacher.exp_()).sum(-1)
            total += (per_token * token_weights[rows]).sum()
        if check_finite and not torch.compiler.is_compiling() and bool(non_finite_tokens):
            raise ValueError(
                f"the teacher's logits hold NaN/Inf at {int(non_finite_tokens)} of the {int((token_weights > 0).sum())} "
                "tokens being distilled: the teacher is broken or overflowed in its dtype. Pass check_finite=False to "
                "skip this check."
            )
        ctx.save_for_backward(target_logits, teacher_hidden, weight, bias, token_weights)
        ctx.temperature, ctx.vocab_size, ctx.chunk_size = temperature, vocab_size, chunk_size
        return total * temperature**2

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        target_logits, teacher_hidden, weight, bias, token_weights = ctx.saved_tensors
        temperature, vocab_size, chunk_size = ctx.temperature, ctx.vocab_size, ctx.chunk_size
        # padded vocabulary entries (beyond vocab_size) get a zero gradient
        padded = target_logits.shape[1] > vocab_size
        grad = torch.zeros_like(target_logits) if padded else torch.empty_like(target_logits)
        # d(T^2 KL)/dz_target = T * (softmax(z_target/T) - softmax(z_teacher/T)), times each token's weight
        scale = token_weights * (temperature * grad_output.to(token_weights.dtype))
        for start in range(0, target_logits.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_p_teacher, log_p_target = _chunk_log_probs(
                target_logits[rows], teacher_hidden[rows], weight, bias, token_weights[rows] > 0, temperature, vocab_size
            )
            chunk_grad = log_p_target.exp_().sub_(log_p_teacher.exp_()).mul_(scale[rows, None])
            grad[rows, :vocab_size] = chunk_grad.to(grad.dtype)
        return grad, None, None, None, None, None, None, None, None


def logit_distillation_loss(
    target_logits: Tensor,
    teacher_hidden: Tensor,
    head_weight: Tensor,
    head_bias: Tensor | None = None,
    *,
    temperature: float = 1.0,
    mask: Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    check_finite: bool = True,
) -> Tensor:
    """``T^2 * mean over unmasked tokens of KL(softmax(z_teacher/T) || softmax(z_target/T))``, chunked over tokens.

    The teacher's logits are ``F.linear(teacher_hidden, head_weight, head_bias)``, computed ``chunk_size`` tokens
    at a time (in the teacher's dtype, as its own forward pass would) and never held for all tokens at once.

    Args:
        target_logits: the target's logits ``(..., V_target)``; gradients flow into them.
        teacher_hidden: the teacher's final hidden state ``(..., d_teacher)`` over the same tokens (a constant).
        head_weight, head_bias: the teacher's LM head, ``(V_teacher, d_teacher)`` and ``(V_teacher,)``.
        temperature: ``T > 0``; see the module docstring for the ``T^2`` convention.
        mask: optional ``(...)`` tensor over tokens on the logits' device, bool or holding only 0 and 1;
            True/1 keeps a token. With every token masked the loss is 0. A non-bool mask has its values checked
            (a host-device sync on GPUs; see :func:`letkit.losses.check_mask`).
        vocab_size: the shared vocabulary, when one side's logits are padded beyond it: the KL is taken over
            the first ``vocab_size`` entries of both (padding entries get no gradient). None: the two sizes
            must be equal.
        chunk_size: tokens per chunk; besides the gradient of ``target_logits`` the loss needs about
            ``4.5 * chunk_size * V`` floats.
        check_finite: raise a ValueError when the teacher's logits on the unmasked tokens hold NaN/Inf (one
            host-device sync).

    Returns:
        A float32 scalar (float64 for float64 target logits).
    """
    if not all(isinstance(t, Tensor) for t in (target_logits, teacher_hidden, head_weight)):
        raise TypeError("target_logits, teacher_hidden and head_weight must be tensors")
    temperature = _check_temperature(temperature)
    chunk_size = _check_positive_int("chunk_size", chunk_size)
    if target_logits.dim() < 1 or teacher_hidden.dim() < 1 or target_logits.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(
            "target_logits and teacher_hidden must cover the same tokens (same leading dims): "
            f"got {tuple(target_logits.shape)} and {tuple(teacher_hidden.shape)}"
        )
    if head_weight.dim() != 2 or head_weight.shape[1] != teacher_hidden.shape[-1]:
        raise ValueError(
            f"head_weight must be (V_teacher, d_teacher) with d_teacher = {teacher_hidden.shape[-1]}, "
            f"got {tuple(head_weight.shape)}"
        )
    if head_bias is not None and tuple(head_bias.shape) != (head_weight.shape[0],):
        raise ValueError(f"head_bias must have shape ({head_weight.shape[0]},), got {tuple(head_bias.shape)}")
    vocab_size = _shared_vocab_size(head_weight.shape[0], target_logits.shape[-1], vocab_size)
    compute_dtype = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    num_tokens = target_logits[..., 0].numel()
    weights = _token_weights(mask, target_logits.shape[:-1], target_logits.device, compute_dtype)
    return _ChunkedDistillationKL.apply(
        target_logits.reshape(num_tokens, target_logits.shape[-1]),
        teacher_hidden.detach().reshape(num_tokens, teacher_hidden.shape[-1]),
        head_weight.detach(),
        None if head_bias is None else head_bias.detach(),
        weights,
        temperature,
        vocab_size,
        chunk_size,
        check_finite,
    )


def _shared_vocab_size(teacher_vocab: int, target_vocab: int, vocab_size: int | None) -> int:
    if vocab_size is None:
        if teacher_vocab != target_vocab:
            raise ValueError(
                f"teacher and target must share a vocabulary (the same tokenizer): the teacher's LM head has "
                f"{teacher_vocab} outputs but the target's logits have {target_vocab}. If one of them is padded beyond "
                "the tokenizer's vocabulary, pass vocab_size=<the tokenizer's size>."
            )
        return teacher_vocab
    if _check_positive_int("vocab_size", vocab_size) > min(teacher_vocab, target_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the teacher's ({teacher_vocab}) or the target's ({target_vocab}) "
            "number of logits: both must cover the shared vocabulary"
        )
    return vocab_size


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

    SALT and RKD (see the module docstring) in one line each::

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
        self.temperature = _check_temperature(temperature)
        self.chunk_size = _check_positive_int("chunk_size", chunk_size)
        self.check_finite = check_finite
        if teacher is None:
            self.lm_head_path: str | None = None
            self.vocab_size = None if vocab_size is None else _check_positive_int("vocab_size", vocab_size)
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
        if vocab_size is not None and _check_positive_int("vocab_size", vocab_size) > teacher_vocab:
            raise ValueError(f"vocab_size={vocab_size} is larger than the teacher's LM head ({teacher_vocab} outputs)")
        self.vocab_size = vocab_size
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
        between does not replace the training forward's.

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
        (logits,) = self._capture.take(input_ids).values()
        head = self._head()
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
