"""Entry point of the fused alignment kernels: validation, flattening of leading dims, dispatch by projection."""

from __future__ import annotations

from torch import Tensor

from letkit.kernels.alignment_common import INTERPRETED
from letkit.kernels.fused_interpolate_alignment import fused_interpolate_alignment
from letkit.kernels.fused_linear_alignment import fused_linear_alignment
from letkit.losses import check_alignment_inputs, fused_dtype_error


def _check_kernel_support(target: Tensor, teacher: Tensor, weight: Tensor | None, bias: Tensor | None) -> None:
    # What the kernels add to check_alignment_inputs (which already checked shapes, devices and the mask).
    dtype_error = fused_dtype_error(target, teacher, weight, bias)
    if dtype_error is not None:
        raise TypeError(dtype_error)
    if target.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(
            f"the fused alignment kernels run on CUDA devices (or any device under TRITON_INTERPRET=1 set before "
            f"importing letkit.kernels), got tensors on {target.device}"
        )
    if target.shape[-1] == 0 or teacher.shape[-1] == 0:
        raise ValueError(f"feature dims must be positive, got target {tuple(target.shape)} and teacher {tuple(teacher.shape)}")


def _as_rows(x: Tensor, width: int) -> Tensor:
    rows = x.reshape(-1, width)
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def fused_alignment_loss(
    target: Tensor,
    teacher: Tensor,
    kind: str = "cosine",
    *,
    projection: str = "identity",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Fused-kernel version of :func:`letkit.losses.alignment_loss` (same arguments and semantics).

    ``target``, ``weight`` and ``bias`` are float32 or bfloat16 and ``teacher`` float32, bfloat16 or float16 (mixed
    is fine; float16 gradients are refused, see :data:`letkit.losses.FUSED_GRAD_DTYPES`); any leading dims of
    ``target`` ``(..., d_target)`` and ``teacher`` ``(..., d_teacher)`` are flattened into tokens. The result is a float32 scalar, differentiable in
    ``target``, ``weight`` and ``bias`` (the teacher is a constant). One deliberate difference from the torch
    reference: masked tokens are skipped, so non-finite values in them do not reach the loss.
    """
    check_alignment_inputs(target, teacher, kind, projection, weight, bias, mask)
    _check_kernel_support(target, teacher, weight, bias)
    target_rows = _as_rows(target, target.shape[-1])
    teacher_rows = _as_rows(teacher.detach(), teacher.shape[-1])
    token_mask = None if mask is None else mask.reshape(-1)
    if projection == "linear":
        return fused_linear_alignment(target_rows, teacher_rows, weight, bias, token_mask, kind)
    return fused_interpolate_alignment(target_rows, teacher_rows, token_mask, kind, interpolate=projection == "interpolate")
