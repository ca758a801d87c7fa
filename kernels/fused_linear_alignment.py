"""Fused alignment loss with the learned linear projector ``z = h @ weight.T + bias``.

Tokens are processed in chunks, so the extra memory is O(chunk x d_teacher), never O(tokens x d_teacher):

1. ``_linear_projection_kernel`` (Triton, ``tl.dot`` tiles with float32 accumulation -- tensor cores for
   bf16) computes the chunk's ``z`` tile by tile and adds the bias. For ``mse``, whose gradient is
   elementwise, its epilogue also reads the teacher tile and writes the loss and ``dL/dz`` directly, so
   ``z`` is never stored. For ``cosine``/``smooth_l1``, which need whole-row statistics, ``z`` goes to a
   float32 chunk buffer (cache-resident at the default chunk size) and
2. the row kernel of :mod:`letkit.kernels.fused_interpolate_alignment` turns it into per-token losses and
   ``dL/dz`` (in the GEMM dtype, so the next GEMMs run on tensor cores).
3. ``dL/dh = dL/dz @ weight`` and ``dL/dW += dL/dz.T @ h`` (float32 accumulator), ``dL/db += sum dL/dz`` with
   cuBLAS on the chunk.

Gradients are produced in the forward pass by the custom op ``letkit::fused_linear_alignment`` (opaque to
``torch.compile``: no graph break); backward only scales them in place (see
:func:`letkit.kernels.alignment_common.hand_over_gradients`). One autograd path, eager and compiled alike.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from letkit.kernels.alignment_common import (
    INTERPRETED,
    TL_DTYPES,
    accumulate_weight_grad,
    hand_over_gradients,
    token_weights,
)
from letkit.kernels.fused_interpolate_alignment import launch_row_alignment

CHUNK_ELEMENTS = 1 << 22
"""Target size (rows x d_teacher) of one token chunk: 16 MiB of float32 projections plus ``dL/dz``."""

_GEMM_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps, num_stages=stages)
    for bm, bn, bk, warps, stages in [
        (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3),
        (256, 128, 64, 8, 3),
        (128, 128, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (64, 64, 64, 4, 5),
    ]
]
# The Triton CPU interpreter cannot autotune (and is slow): one small tile shape that exercises partial tiles.
_INTERPRETER_GEMM_CONFIG = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
_LOSS_SLOT = 16
"""Columns per partial-loss slot of the fused MSE epilogue; divides every config's ``BLOCK_N``."""
assert all(config.kwargs["BLOCK_N"] % _LOSS_SLOT == 0 for config in _GEMM_CONFIGS + [triton.Config(_INTERPRETER_GEMM_CONFIG)])


@triton.jit
def _linear_projection_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    teacher_ptr,
    token_weight_ptr,
    denom_ptr,
    loss_part_ptr,
    n_rows,
    rows_bucket,
    d_in,
    d_out,
    stride_h,
    stride_w,
    stride_out,
    stride_teacher,
    stride_loss_part,
    HAS_BIAS: tl.constexpr,
    FUSE_MSE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    LOSS_SLOT: tl.constexpr,
):
    # Grouped tile order: GROUP_M row tiles share each weight tile while it is in L2.
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(n_rows, BLOCK_M)
    tiles_n = tl.cdiv(d_out, BLOCK_N)
    group = pid // (GROUP_M * tiles_n)
    first_m = group * GROUP_M
    group_rows = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * tiles_n)) % group_rows
    pid_n = (pid % (GROUP_M * tiles_n)) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < d_out
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None]

    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k in range(0, d_in, BLOCK_K):
        k_ok = (k + ks) < d_in
        h = tl.load(h_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(h.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=INPUT_PRECISION)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]

    tile_ok = row_ok[:, None] & col_ok[None, :]
    if FUSE_MSE:
        t = tl.load(
            teacher_ptr + rows.to(tl.int64)[:, None] * stride_teacher + cols[None, :], mask=tile_ok, other=0.0
        ).to(tl.float32)
        diff = tl.where(tile_ok, acc - t, 0.0)
        if HAS_MASK:
            weight = tl.load(token_weight_ptr + rows, mask=row_ok, other=0.0)
        else:
            weight = tl.where(row_ok, 1.0, 0.0)
        scale = weight / tl.load(denom_ptr)
        keep = weight != 0.0
        partial_loss = tl.where(keep, tl.sum(diff * diff, axis=1) * (scale / d_out), 0.0)
        # Every launch writes every slot of its rows -- the tile's sum into its first slot, 0 into the others --
        # so no slot keeps a value from another launch (autotuning runs each config on these same buffers).
        slots = pid_n * (BLOCK_N // LOSS_SLOT) + tl.arange(0, BLOCK_N // LOSS_SLOT)
        slot_values = tl.where((slots % (BLOCK_N // LOSS_SLOT) == 0)[None, :], partial_loss[:, None], 0.0)
        slot_ok = row_ok[:, None] & (slots < tl.cdiv(d_out, LOSS_SLOT))[None, :]
        tl.store(loss_part_ptr + rows.to(tl.int64)[:, None] * stride_loss_part + slots[None, :], slot_values, mask=slot_ok)
        if COMPUTE_GRAD:
            grad = tl.where(keep[:, None], diff * (scale * (2.0 / d_out))[:, None], 0.0)
            out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
            tl.store(out_ptrs, grad.to(out_ptr.dtype.element_ty), mask=tile_ok)
    else:
        out_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_out + cols[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=tile_ok)


# Tuned per power-of-two bucket of the row count (not per count: each new key compiles and times every config).
_linear_projection_tuned = triton.autotune(
    configs=_GEMM_CONFIGS, key=["rows_bucket", "d_in", "d_out", "HAS_BIAS", "FUSE_MSE", "COMPUTE_GRAD"]
)(_linear_projection_kernel)


def _launch_projection(h, weight, bias, out, *, teacher=None, weights=None, denom=None, loss_part=None, compute_grad=False):
    n_rows, d_in = h.shape
    d_out = weight.shape[0]
    fuse_mse = teacher is not None
    gemm_dtype = weight.dtype
    if INTERPRETED:
        # The interpreter multiplies bf16 dot operands as raw bits (triton-lang/triton#11584); bf16 x bf16
        # products are exact in fp32, so upcasting changes nothing but the speed.
        dot_dtype, kernel, meta = tl.float32, _linear_projection_kernel, dict(_INTERPRETER_GEMM_CONFIG)
    else:
        dot_dtype, kernel, meta = TL_DTYPES[gemm_dtype], _linear_projection_tuned, {}
    tf32 = gemm_dtype == torch.float32 and h.is_cuda and torch.backends.cuda.matmul.allow_tf32

    def grid(meta):
        return (triton.cdiv(n_rows, meta["BLOCK_M"]) * triton.cdiv(d_out, meta["BLOCK_N"]),)

    kernel[grid](
        h,
        weight,
        bias,
        out,
        teacher,
        weights,
        denom,
        loss_part,
        n_rows,
        triton.next_power_of_2(n_rows),
        d_in,
        d_out,
        h.stride(0),
        weight.stride(0),
        out.stride(0) if out is not None else 0,
        teacher.stride(0) if fuse_mse else 0,
        loss_part.stride(0) if fuse_mse else 0,
        HAS_BIAS=bias is not None,
        FUSE_MSE=fuse_mse,
        HAS_MASK=weights is not None,
        COMPUTE_GRAD=compute_grad,
        DOT_DTYPE=dot_dtype,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        LOSS_SLOT=_LOSS_SLOT,
        **meta,
    )


def _chunk_rows(n_tokens: int, d_out: int) -> int:
    # Balanced chunks of at most ~CHUNK_ELEMENTS / d_out rows, in whole 128-row GEMM tiles when that large.
    cap = max(1, CHUNK_ELEMENTS // d_out)
    if cap >= 128:
        cap -= cap % 128
    rows = triton.cdiv(n_tokens, max(1, triton.cdiv(n_tokens, cap)))
    return min(triton.cdiv(rows, 128) * 128, cap) if rows > 128 else max(1, rows)


@torch.library.custom_op("letkit::fused_linear_alignment", mutates_args=())
def _linear_alignment_op(
    target: Tensor,
    teacher: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    mask: Tensor | None,
    kind: str,
    need_target_grad: bool,
    need_weight_grad: bool,
    need_bias_grad: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(loss, dL/dtarget, dL/dweight, dL/dbias)`` for ``(tokens, d)`` inputs; gradients nobody asked for are
    empty placeholders. Not differentiable itself: :class:`_LinearAlignmentFunction` makes the loss a graph node.

    As under autocast, the projection GEMMs run in the activations' (``target``'s) dtype with float32
    accumulation: a float32 weight with bf16 activations is rounded to bf16 once and every GEMM runs on tensor
    cores. Losses and ``dL/dz`` are computed in float32; the weight's and bias's gradients are accumulated and
    returned in float32 (cast to their parameters' dtype in backward, after the scale).
    """
    n_tokens, d_in = target.shape
    d_out = weight.shape[0]
    device = target.device
    gemm_dtype = target.dtype
    weight_g = weight.to(gemm_dtype).contiguous()
    bias = None if bias is None else bias.contiguous()
    need_bias_grad = need_bias_grad and bias is not None
    compute_grad = need_target_grad or need_weight_grad or need_bias_grad
    weights, denom = token_weights(mask, n_tokens, device)
    fuse_mse = kind == "mse"

    grad_target = target.new_empty(target.shape if need_target_grad else (0,))
    grad_weight = torch.zeros(weight.shape if need_weight_grad else (0,), dtype=torch.float32, device=device)
    grad_bias = torch.zeros(d_out if need_bias_grad else 0, dtype=torch.float32, device=device)
    if fuse_mse:
        # Partial sums per (token, slot of _LOSS_SLOT columns), all written by the kernel.
        losses = torch.empty(n_tokens, triton.cdiv(d_out, _LOSS_SLOT), dtype=torch.float32, device=device)
    else:
        losses = torch.empty(n_tokens, dtype=torch.float32, device=device)

    chunk = min(_chunk_rows(n_tokens, d_out), n_tokens)
    projected = None if fuse_mse else torch.empty(chunk, d_out, dtype=torch.float32, device=device)
    grad_projected = torch.empty(chunk, d_out, dtype=gemm_dtype, device=device) if compute_grad else None
    for start in range(0, n_tokens, max(chunk, 1)):
        stop = min(start + chunk, n_tokens)
        h = target[start:stop]
        g = None if grad_projected is None else grad_projected[: stop - start]
        chunk_weights = None if weights is None else weights[start:stop]
        if fuse_mse:
            _launch_projection(
                h, weight_g, bias, g, teacher=teacher[start:stop], weights=chunk_weights, denom=denom,
                loss_part=losses[start:stop], compute_grad=compute_grad,
            )
        else:
            z = projected[: stop - start]
            _launch_projection(h, weight_g, bias, z)
            launch_row_alignment(
                z, teacher[start:stop], kind, interpolate=False, weights=chunk_weights, denom=denom,
                loss_out=losses[start:stop], grad_out=g,
            )
        if need_target_grad:
            torch.mm(g, weight_g, out=grad_target[start:stop])
        if need_weight_grad:
            accumulate_weight_grad(grad_weight, g, h)
        if need_bias_grad:
            grad_bias += g.sum(0, dtype=torch.float32)
    return losses.sum(), grad_target, grad_weight, grad_bias


@_linear_alignment_op.register_fake
def _(target, teacher, weight, bias, mask, kind, need_target_grad, need_weight_grad, need_bias_grad):
    need_bias_grad = need_bias_grad and bias is not None
    return (
        target.new_empty((), dtype=torch.float32),
        target.new_empty(target.shape if need_target_grad else (0,)),
        target.new_empty(weight.shape if need_weight_grad else (0,), dtype=torch.float32),
        target.new_empty(weight.shape[0] if need_bias_grad else 0, dtype=torch.float32),
    )


class _LinearAlignmentFunction(torch.autograd.Function):
    """The op's loss as a graph node whose backward scales the forward-computed gradients in place."""

    @staticmethod
    def forward(ctx, target, teacher, weight, bias, mask, kind, need_target_grad, need_weight_grad, need_bias_grad):
        loss, grad_target, grad_weight, grad_bias = _linear_alignment_op(
            target, teacher, weight, bias, mask, kind, need_target_grad, need_weight_grad, need_bias_grad
        )
        ctx.requested = (need_target_grad, need_weight_grad, need_bias_grad and bias is not None)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(grad_target, grad_weight, grad_bias)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grad_target, grad_weight, grad_bias = hand_over_gradients(ctx, grad_loss)
        return (
            grad_target,
            None,
            None if grad_weight is None else grad_weight.to(ctx.weight_dtype),
            None if grad_bias is None else grad_bias.to(ctx.bias_dtype),
            None,
            None,
            None,
            None,
            None,
        )


def fused_linear_alignment(
    target: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None, mask: Tensor | None, kind: str
) -> Tensor:
    """Alignment loss of ``target @ weight.T + bias`` vs ``teacher`` for ``(tokens, d)`` inputs, differentiable in
    ``target``, ``weight`` and ``bias``; the same path runs eagerly and under ``torch.compile``."""
    grad_enabled = torch.is_grad_enabled()
    need_target_grad = grad_enabled and target.requires_grad
    need_weight_grad = grad_enabled and weight.requires_grad
    need_bias_grad = grad_enabled and bias is not None and bias.requires_grad
    return _LinearAlignmentFunction.apply(
        target, teacher, weight, bias, mask, kind, need_target_grad, need_weight_grad, need_bias_grad
    )
