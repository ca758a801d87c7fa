"""The logit-distillation loss, ``T^2 * mean over tokens of KL(softmax(z_teacher / T) || softmax(z_target / T))``,
with the teacher's LM head applied per chunk of tokens: nothing of size ``[tokens, vocab]`` is kept between
forward and backward (the backward pass recomputes each chunk). See :mod:`letkit.distillation` for the
baselines it serves."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from letkit.losses import check_mask
from letkit.validation import check_int

DEFAULT_CHUNK_SIZE = 1024


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float, or a TypeError/ValueError unless it is a finite number > 0."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__} ({temperature!r})")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    return float(temperature)


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


def _token_rows(logits: Tensor, rows: slice) -> Tensor:
    """Rows ``rows`` of ``logits`` seen as ``(tokens, V)``: ``logits`` is either that 2-D view, or a ``(..., V)``
    tensor whose leading dims cannot be merged without a copy (e.g. ``logits[:, :-1]``), of which only these rows are
    gathered."""
    if logits.dim() == 2:
        return logits[rows]
    num_tokens = math.prod(logits.shape[:-1])
    tokens = torch.arange(rows.start, min(rows.stop, num_tokens), device=logits.device)
    return logits[torch.unravel_index(tokens, logits.shape[:-1])]


class _ChunkedDistillationKL(torch.autograd.Function):
    """``T^2 * sum_t w_t * KL_t`` over token chunks; backward recomputes each chunk (nothing ``[N, V]`` is saved,
    and ``target_logits`` is never copied whole: see :func:`_token_rows`)."""

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
        for start in range(0, token_weights.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_p_teacher, log_p_target = _chunk_log_probs(_token_rows(target_logits, rows), teacher_hidden[rows],
                                                           weight, bias, token_weights[rows] > 0, temperature, vocab_size)
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
        padded = target_logits.shape[-1] > vocab_size
        allocate = torch.zeros if padded else torch.empty
        grad = allocate(target_logits.shape, dtype=target_logits.dtype, device=target_logits.device)
        grad_rows = grad.view(-1, grad.shape[-1])
        # d(T^2 KL)/dz_target = T * (softmax(z_target/T) - softmax(z_teacher/T)), times each token's weight
        scale = token_weights * (temperature * grad_output.to(token_weights.dtype))
        for start in range(0, token_weights.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            log_p_teacher, log_p_target = _chunk_log_probs(_token_rows(target_logits, rows), teacher_hidden[rows],
                                                           weight, bias, token_weights[rows] > 0, temperature, vocab_size)
            chunk_grad = log_p_target.exp_().sub_(log_p_teacher.exp_()).mul_(scale[rows, None])
            grad_rows[rows, :vocab_size] = chunk_grad.to(grad.dtype)
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
        temperature: ``T > 0``; see :mod:`letkit.distillation` for the ``T^2`` convention.
        mask: optional ``(...)`` tensor over tokens on the logits' device, bool or holding only 0 and 1;
            True/1 keeps a token. With every token masked the loss is 0. A non-bool mask has its values checked
            (a host-device sync on GPUs; see :func:`letkit.losses.check_mask`).
        vocab_size: the shared vocabulary, when one side's logits are padded beyond it: the KL is taken over
            the first ``vocab_size`` entries of both (padding entries get no gradient). None: the two sizes
            must be equal.
        chunk_size: tokens per chunk; besides the gradient of ``target_logits`` the loss needs about
            ``4.5 * chunk_size * V`` floats, whatever the layout of ``target_logits``: a non-contiguous view such
            as ``logits[:, :-1]`` is read a chunk of rows at a time, never copied whole.
        check_finite: raise a ValueError when the teacher's logits on the unmasked tokens hold NaN/Inf (one
            host-device sync).

    Returns:
        A float32 scalar (float64 for float64 target logits).
    """
    if not all(isinstance(t, Tensor) for t in (target_logits, teacher_hidden, head_weight)):
        raise TypeError("target_logits, teacher_hidden and head_weight must be tensors")
    temperature = check_temperature(temperature)
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
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
    vocab_size = shared_vocab_size(head_weight.shape[0], target_logits.shape[-1], vocab_size)
    compute_dtype = torch.float64 if target_logits.dtype == torch.float64 else torch.float32
    num_tokens = target_logits[..., 0].numel()
    weights = _token_weights(mask, target_logits.shape[:-1], target_logits.device, compute_dtype)
    try:
        token_logits = target_logits.view(num_tokens, target_logits.shape[-1])
    except RuntimeError:  # leading dims that do not merge without a copy, e.g. logits[:, :-1]: see _token_rows
        token_logits = target_logits
    return _ChunkedDistillationKL.apply(
        token_logits,
        teacher_hidden.detach().reshape(num_tokens, teacher_hidden.shape[-1]),
        head_weight.detach(),
        None if head_bias is None else head_bias.detach(),
        weights,
        temperature,
        vocab_size,
        chunk_size,
        check_finite,
    )


def shared_vocab_size(teacher_vocab: int, target_vocab: int, vocab_size: int | None) -> int:
    """The vocabulary the KL is taken over: ``vocab_size``, or the two sides' common size when it is None; a
    ValueError naming the sizes when they do not fit."""
    if vocab_size is None:
        if teacher_vocab != target_vocab:
            raise ValueError(
                f"teacher and target must share a vocabulary (the same tokenizer): the teacher's LM head has "
                f"{teacher_vocab} outputs but the target's logits have {target_vocab}. If one of them is padded beyond "
                "the tokenizer's vocabulary, pass vocab_size=<the tokenizer's size>."
            )
        return teacher_vocab
    vocab_size = check_int("vocab_size", vocab_size, minimum=1)
    if vocab_size > min(teacher_vocab, target_vocab):
        raise ValueError(
            f"vocab_size={vocab_size} is larger than the teacher's ({teacher_vocab}) or the target's ({target_vocab}) "
            "number of logits: both must cover the shared vocabulary"
        )
    return vocab_size

