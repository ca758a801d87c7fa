"""Fused alignment loss for the parameter-free projections: ``identity`` and ``interpolate``.

Each Triton program owns a few whole tokens (rows). It resamples the target rows to the teacher's width on
the fly (a two-tap gather per output dimension, ``align_corners=True`` as in
:func:`letkit.losses.interpolation_taps`, no dense interpolation matrix), reduces the row statistics the
loss needs, and writes each token's loss and the gradient with respect to the *target* row. The gradient of the interpolation is its adjoint,
evaluated as a gather too: input dim ``i`` collects ``coef(j, i) * dL/dz_j`` from the contiguous range of
output dims ``j`` whose taps touch it, recomputing ``z_j`` (cheap, the row is cache-resident) instead of
storing ``dL/dz``. Nothing of size tokens x d_teacher is materialised.

The same row kernel, with the identity projection, is the loss stage of the linear projector
(:mod:`letkit.kernels.fused_linear_alignment`), where it reads the projected chunk.

The custom op ``letkit::fused_interpolate_alignment`` returns the loss and the gradient (opaque to
``torch.compile``: no graph break); backward only scales the gradient in place (see
:func:`letkit.kernels.alignment_common.hand_over_gradients`). One autograd path, eager and compiled alike.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from letkit.kernels.alignment_common import (
    COS_EPS,
    COSINE,
    LN_EPS,
    LOSS_CODES,
    SL1_BETA,
    SMOOTH_L1,
    hand_over_gradients,
    token_weights,
)
from letkit.losses import interpolation_taps

MAX_ROW_BLOCK = 1024
"""Widest feature tile a program holds at once; wider rows are processed in a loop."""
ROW_TILE_ELEMENTS = 2048
"""Target size of a program's (tokens x features) tile: narrow rows are batched, up to 16 per program."""


@triton.jit
def _elementwise_grad(z, t, KIND: tl.constexpr, c0, c1, c2, c3, c4, c5):
    # dL/dz up to the per-token factor applied by the caller; c0..c5 are the (tokens, 1) row statistics of KIND.
    if KIND == COSINE:
        grad = c0 * t + c1 * z
    elif KIND == SMOOTH_L1:
        a = (z - c0) * c1
        diff = a - (t - c2) * c3
        q = tl.where(tl.abs(diff) < SL1_BETA, diff / SL1_BETA, tl.where(diff > 0, 1.0, -1.0))
        grad = q - c4 - a * c5
    else:  # mse
        grad = z - t
    return grad


@triton.jit
def _project(x_rows, lo_ptr, hi_ptr, frac_ptr, dims, dims_ok, tile_ok, INTERPOLATE: tl.constexpr):
    # (tokens, dims) tile of the projected features; x_rows holds one row pointer per token.
    if INTERPOLATE:
        lo = tl.load(lo_ptr + dims, mask=dims_ok, other=0)
        hi = tl.load(hi_ptr + dims, mask=dims_ok, other=0)
        frac = tl.load(frac_ptr + dims, mask=dims_ok, other=0.0)[None, :]
        x_lo = tl.load(x_rows[:, None] + lo[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        x_hi = tl.load(x_rows[:, None] + hi[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        z = x_lo * (1.0 - frac) + x_hi * frac
    else:
        z = tl.load(x_rows[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return z


@triton.jit
def _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE: tl.constexpr):
    # The (tokens, BLOCK_OUT) tile at column `start` of the projected features z and the teacher's t, in fp32, and
    # where it is valid; rows of masked tokens are not read.
    dims = start + out_range
    dims_ok = dims < d_out
    tile_ok = live[:, None] & dims_ok[None, :]
    z = _project(x_rows, lo_ptr, hi_ptr, frac_ptr, dims, dims_ok, tile_ok, INTERPOLATE)
    t = tl.load(t_rows[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    return z, t, tile_ok


@triton.jit
def _row_alignment_kernel(
    x_ptr,
    teacher_ptr,
    lo_ptr,
    hi_ptr,
    frac_ptr,
    adj_first_ptr,
    adj_count_ptr,
    token_weight_ptr,
    denom_ptr,
    loss_ptr,
    grad_ptr,
    n_rows,
    d_in,
    d_out,
    adj_taps,
    stride_x,
    stride_teacher,
    stride_grad,
    KIND: tl.constexpr,
    INTERPOLATE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_OUT: tl.constexpr,
    BLOCK_IN: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = rows < n_rows
    if HAS_MASK:
        weight = tl.load(token_weight_ptr + rows, mask=row_ok, other=0.0)
    else:
        weight = tl.where(row_ok, 1.0, 0.0)
    scale = weight / tl.load(denom_ptr)
    # Masked tokens are never read: they contribute nothing whatever they hold (padding may be garbage).
    live = weight != 0.0
    x_rows = x_ptr + rows.to(tl.int64) * stride_x
    t_rows = teacher_ptr + rows.to(tl.int64) * stride_teacher
    out_range = tl.arange(0, BLOCK_OUT)

    # ---- row statistics and the per-token loss -----------------------------------------------------------
    c0 = tl.zeros([BLOCK_ROWS], tl.float32)
    c1 = tl.zeros([BLOCK_ROWS], tl.float32)
    c2 = tl.zeros([BLOCK_ROWS], tl.float32)
    c3 = tl.zeros([BLOCK_ROWS], tl.float32)
    c4 = tl.zeros([BLOCK_ROWS], tl.float32)
    c5 = tl.zeros([BLOCK_ROWS], tl.float32)
    if KIND == COSINE:
        acc_zt = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_zz = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_tt = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        for start in range(0, d_out, BLOCK_OUT):
            z, t, tile_ok = _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE)
            acc_zt += z * t
            acc_zz += z * z
            acc_tt += t * t
        dot = tl.sum(acc_zt, axis=1)
        norm_z = tl.sqrt(tl.sum(acc_zz, axis=1))
        clamped_z = tl.maximum(norm_z, COS_EPS)
        clamped_t = tl.maximum(tl.sqrt(tl.sum(acc_tt, axis=1)), COS_EPS)
        loss = 1.0 - dot / (clamped_z * clamped_t)
        c0 = -1.0 / (clamped_z * clamped_t)
        # The norm clamp passes gradient only where |z| >= eps (as torch's clamp_min does).
        c1 = tl.where(norm_z >= COS_EPS, dot / (clamped_z * clamped_z * clamped_z * clamped_t), 0.0)
        grad_scale = scale
    elif KIND == SMOOTH_L1:
        acc_z = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_t = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        for start in range(0, d_out, BLOCK_OUT):
            z, t, _ = _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE)
            acc_z += z
            acc_t += t
        c0 = tl.sum(acc_z, axis=1) / d_out
        c2 = tl.sum(acc_t, axis=1) / d_out
        # Centred second pass for the variances: stable even when |mean| >> std.
        acc_z = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_t = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        for start in range(0, d_out, BLOCK_OUT):
            z, t, tile_ok = _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE)
            dz = tl.where(tile_ok, z - c0[:, None], 0.0)
            dt = tl.where(tile_ok, t - c2[:, None], 0.0)
            acc_z += dz * dz
            acc_t += dt * dt
        c1 = 1.0 / tl.sqrt(tl.sum(acc_z, axis=1) / d_out + LN_EPS)
        c3 = 1.0 / tl.sqrt(tl.sum(acc_t, axis=1) / d_out + LN_EPS)
        acc_loss = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_q = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        acc_qa = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        for start in range(0, d_out, BLOCK_OUT):
            z, t, tile_ok = _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE)
            a = (z - c0[:, None]) * c1[:, None]
            diff = a - (t - c2[:, None]) * c3[:, None]
            small = tl.abs(diff) < SL1_BETA
            elem_loss = tl.where(small, 0.5 * diff * diff / SL1_BETA, tl.abs(diff) - 0.5 * SL1_BETA)
            q = tl.where(small, diff / SL1_BETA, tl.where(diff > 0, 1.0, -1.0))
            acc_loss += tl.where(tile_ok, elem_loss, 0.0)
            acc_q += tl.where(tile_ok, q, 0.0)
            acc_qa += tl.where(tile_ok, q * a, 0.0)
        loss = tl.sum(acc_loss, axis=1) / d_out
        c4 = tl.sum(acc_q, axis=1) / d_out
        c5 = tl.sum(acc_qa, axis=1) / d_out
        grad_scale = scale * c1 / d_out
    else:  # mse
        acc_loss = tl.zeros([BLOCK_ROWS, BLOCK_OUT], tl.float32)
        for start in range(0, d_out, BLOCK_OUT):
            z, t, tile_ok = _load_tile(x_rows, t_rows, lo_ptr, hi_ptr, frac_ptr, start, out_range, d_out, live, INTERPOLATE)
            acc_loss += (z - t) * (z - t)
        loss = tl.sum(acc_loss, axis=1) / d_out
        grad_scale = scale * 2.0 / d_out
    tl.store(loss_ptr + rows, tl.where(live, loss * scale, 0.0), mask=row_ok)

    # ---- gradient with respect to the rows that were projected ---------------------------------------------
    if COMPUTE_GRAD:
        grad_scale = tl.where(live, grad_scale, 0.0)[:, None]
        c0 = c0[:, None]
        c1 = c1[:, None]
        c2 = c2[:, None]
        c3 = c3[:, None]
        c4 = c4[:, None]
        c5 = c5[:, None]
        g_rows = grad_ptr + rows.to(tl.int64) * stride_grad
        if INTERPOLATE:
            in_range = tl.arange(0, BLOCK_IN)
            for start in range(0, d_in, BLOCK_IN):
                dims = start + in_range
                dims_ok = dims < d_in
                first = tl.load(adj_first_ptr + dims, mask=dims_ok, other=0)
                count = tl.load(adj_count_ptr + dims, mask=dims_ok, other=0)
                acc = tl.zeros([BLOCK_ROWS, BLOCK_IN], tl.float32)
                for tap in range(0, adj_taps):
                    j = first + tap
                    touches = dims_ok & (tap < count)
                    tile_ok = live[:, None] & touches[None, :]
                    lo = tl.load(lo_ptr + j, mask=touches, other=0)
                    hi = tl.load(hi_ptr + j, mask=touches, other=0)
                    frac = tl.load(frac_ptr + j, mask=touches, other=0.0)
                    x_lo = tl.load(x_rows[:, None] + lo[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                    x_hi = tl.load(x_rows[:, None] + hi[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                    z = x_lo * (1.0 - frac[None, :]) + x_hi * frac[None, :]
                    t = tl.load(t_rows[:, None] + j[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                    g = _elementwise_grad(z, t, KIND, c0, c1, c2, c3, c4, c5)
                    coef = tl.where(lo == dims, 1.0 - frac, 0.0) + tl.where(hi == dims, frac, 0.0)
                    acc += tl.where(tile_ok, coef[None, :] * g, 0.0)
                grad = acc * grad_scale
                tl.store(g_rows[:, None] + dims[None, :], grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & dims_ok[None, :])
        else:
            for start in range(0, d_out, BLOCK_OUT):
                dims = start + out_range
                dims_ok = dims < d_out
                tile_ok = live[:, None] & dims_ok[None, :]
                z = tl.load(x_rows[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                t = tl.load(t_rows[:, None] + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
                grad = tl.where(tile_ok, _elementwise_grad(z, t, KIND, c0, c1, c2, c3, c4, c5) * grad_scale, 0.0)
                tl.store(g_rows[:, None] + dims[None, :], grad.to(grad_ptr.dtype.element_ty), mask=row_ok[:, None] & dims_ok[None, :])


@functools.lru_cache(maxsize=64)
def interpolation_adjoint(d_in: int, d_out: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, int]:
    """Taps of the ``d_in -> d_out`` interpolation and of its adjoint, for the row kernel.

    Returns ``(lo, hi, frac, first, count, max_count)``: output dim ``j`` reads inputs ``lo[j]`` and ``hi[j]``
    with weights ``1 - frac[j]`` and ``frac[j]``; input dim ``i`` is read by the outputs
    ``first[i] <= j < first[i] + count[i]`` (a contiguous range, since ``lo`` and ``hi = lo + 1`` are
    non-decreasing in ``j``); ``max_count`` bounds the adjoint gather loop.
    """
    lo, hi, frac = interpolation_taps(d_in, d_out, device)
    dims = torch.arange(d_in, device=device)
    lo_first, lo_stop = torch.searchsorted(lo, dims), torch.searchsorted(lo, dims, right=True)
    hi_first, hi_stop = torch.searchsorted(hi, dims), torch.searchsorted(hi, dims, right=True)
    lo_empty, hi_empty = lo_first == lo_stop, hi_first == hi_stop
    first = torch.where(lo_empty, hi_first, torch.where(hi_empty, lo_first, torch.minimum(lo_first, hi_first)))
    stop = torch.where(lo_empty, hi_stop, torch.where(hi_empty, lo_stop, torch.maximum(lo_stop, hi_stop)))
    count = stop - first
    i32 = torch.int32
    return lo.to(i32), hi.to(i32), frac.contiguous(), first.to(i32), count.to(i32), int(count.max())


def _feature_block(width: int) -> int:
    return min(triton.next_power_of_2(max(width, 1)), MAX_ROW_BLOCK)


def launch_row_alignment(
    x: Tensor,
    teacher: Tensor,
    kind: str,
    *,
    interpolate: bool,
    weights: Tensor | None,
    denom: Tensor,
    loss_out: Tensor,
    grad_out: Tensor | None,
) -> None:
    """Per-token loss (scaled by ``weight / denom``) into ``loss_out`` and its gradient w.r.t. ``x`` into ``grad_out``.

    ``x`` is ``(tokens, d_in)``, ``teacher`` ``(tokens, d_out)``, both with unit stride along features;
    with ``interpolate=False`` the dims must match. ``grad_out=None`` skips the gradient.
    """
    n_rows, d_in = x.shape
    d_out = teacher.shape[1]
    if n_rows == 0:
        return
    if interpolate:
        lo, hi, frac, first, count, taps = interpolation_adjoint(d_in, d_out, x.device)
    else:
        lo = hi = frac = first = count = None
        taps = 0
    block_out, block_in = _feature_block(d_out), _feature_block(d_in)
    block_rows = max(1, min(16, ROW_TILE_ELEMENTS // max(block_out, block_in)))
    _row_alignment_kernel[(triton.cdiv(n_rows, block_rows),)](
        x,
        teacher,
        lo,
        hi,
        frac,
        first,
        count,
        weights,
        denom,
        loss_out,
        grad_out,
        n_rows,
        d_in,
        d_out,
        taps,
        x.stride(0),
        teacher.stride(0),
        0 if grad_out is None else grad_out.stride(0),
        KIND=LOSS_CODES[kind],
        INTERPOLATE=interpolate,
        HAS_MASK=weights is not None,
        COMPUTE_GRAD=grad_out is not None,
        BLOCK_ROWS=block_rows,
        BLOCK_OUT=block_out,
        BLOCK_IN=block_in,
        num_warps=max(1, min(8, block_rows * max(block_out, block_in) // 256)),
    )


@torch.library.custom_op("letkit::fused_interpolate_alignment", mutates_args=())
def _interpolate_alignment_op(
    target: Tensor, teacher: Tensor, mask: Tensor | None, kind: str, interpolate: bool, need_target_grad: bool
) -> tuple[Tensor, Tensor]:
    """``(loss, dL/dtarget)`` for ``(tokens, d)`` inputs; the gradient is an empty placeholder unless requested.
    Not differentiable itself: :class:`_InterpolateAlignmentFunction` makes the loss a graph node."""
    n_tokens = target.shape[0]
    weights, denom = token_weights(mask, n_tokens, target.device)
    losses = torch.empty(n_tokens, dtype=torch.float32, device=target.device)
    grad = target.new_empty(target.shape if need_target_grad else (0,))
    launch_row_alignment(
        target,
        teacher,
        kind,
        interpolate=interpolate and target.shape[1] != teacher.shape[1],
        weights=weights,
        denom=denom,
        loss_out=losses,
        grad_out=grad if need_target_grad else None,
    )
    return losses.sum(), grad


@_interpolate_alignment_op.register_fake
def _(target, teacher, mask, kind, interpolate, need_target_grad):
    return target.new_empty((), dtype=torch.float32), target.new_empty(target.shape if need_target_grad else (0,))


class _InterpolateAlignmentFunction(torch.autograd.Function):
    """The op's loss as a graph node whose backward scales the forward-computed gradient in place."""

    @staticmethod
    def forward(ctx, target, teacher, mask, kind, interpolate, need_target_grad):
        loss, grad_target = _interpolate_alignment_op(target, teacher, mask, kind, interpolate, need_target_grad)
        ctx.requested = (need_target_grad,)
        ctx.save_for_backward(grad_target)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        (grad_target,) = hand_over_gradients(ctx, grad_loss)
        return grad_target, None, None, None, None, None


def fused_interpolate_alignment(
    target: Tensor, teacher: Tensor, mask: Tensor | None, kind: str, *, interpolate: bool
) -> Tensor:
    """Alignment loss with the identity/interpolation projection for ``(tokens, d)`` inputs, differentiable in
    ``target``; the same path runs eagerly and under ``torch.compile``."""
    need_target_grad = torch.is_grad_enabled() and target.requires_grad
    return _InterpolateAlignmentFunction.apply(target, teacher, mask, kind, interpolate, need_target_grad)
