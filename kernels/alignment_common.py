"""Pieces shared by the fused alignment ops: loss codes, token weights, the in-place gradient scale, backward.

Both fused ops follow the fused-linear-loss recipe: the loss is a scalar leaf of the graph, so the
forward pass computes the gradients of the loss with respect to its inputs while the intermediates are
still on chip, and backward only multiplies them, in place, by the incoming scalar gradient. Each fused op is a
``torch.library`` custom op computing ``(loss, gradients)`` (opaque to ``torch.compile``, so no graph break)
inside one ``torch.autograd.Function``: the same autograd path runs eagerly and compiled.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from letkit.losses import COSINE_EPS, LAYER_NORM_EPS, SMOOTH_L1_BETA

LOSS_CODES = {"cosine": 0, "smooth_l1": 1, "mse": 2}
TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16}

# Constants of the reference (letkit.losses), as compile-time values for the kernels.
COSINE = tl.constexpr(LOSS_CODES["cosine"])
SMOOTH_L1 = tl.constexpr(LOSS_CODES["smooth_l1"])
COS_EPS = tl.constexpr(COSINE_EPS)
LN_EPS = tl.constexpr(LAYER_NORM_EPS)
SL1_BETA = tl.constexpr(SMOOTH_L1_BETA)

_SCALE_BLOCK = 4096


@triton.jit
def _scale_inplace_kernel(x_ptr, factor_ptr, n_elements, BLOCK: tl.constexpr):
    # Reads the factor on the device, so a backward with grad_output == 1 (the usual case: the
    # alignment term is summed into the training loss) costs no memory traffic and no host sync.
    factor = tl.load(factor_ptr).to(tl.float32)
    if factor != 1.0:
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_bounds = offsets < n_elements
        x = tl.load(x_ptr + offsets, mask=in_bounds).to(tl.float32)
        tl.store(x_ptr + offsets, (x * factor).to(x_ptr.dtype.element_ty), mask=in_bounds)


INTERPRETED: bool = isinstance(_scale_inplace_kernel, InterpretedFunction)
"""Whether the kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""


@torch.library.custom_op("letkit::scale_", mutates_args=("grad",))
def scale_(grad: Tensor, factor: Tensor) -> None:
    """Multiply the contiguous ``grad`` in place by the 1-element tensor ``factor``, read on the device."""
    n = grad.numel()
    if n:
        factor = factor.reshape(1).to(device=grad.device, dtype=torch.float32)
        _scale_inplace_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](grad, factor, n, BLOCK=_SCALE_BLOCK)


def token_weights(mask: Tensor | None, n_tokens: int, device: torch.device) -> tuple[Tensor | None, Tensor]:
    """Per-token float32 weights (``None`` without a mask) and the 1-element denominator ``max(1, sum w)``.

    The denominator stays on the device (no host sync), so the ops are capture- and compile-friendly.
    """
    if mask is None:
        return None, torch.full((1,), float(max(1, n_tokens)), dtype=torch.float32, device=device)
    weights = mask.reshape(-1).to(device=device, dtype=torch.float32).contiguous()
    return weights, weights.sum().clamp_min(1.0).reshape(1)


def hand_over_gradients(ctx, grad_loss: Tensor) -> list[Tensor | None]:
    """The gradients a fused op's forward saved (``ctx.save_for_backward``), scaled in place by ``grad_loss``;
    ``None`` for the placeholders of gradients nobody asked for (``ctx.requested``, one bool per saved tensor).

    They are handed over, not copied, so a second backward through the same graph (``retain_graph=True``)
    would see them scaled twice: it raises instead (eagerly with this message; compiled, with autograd's
    "modified by an inplace operation", since the in-place scale bumps the saved tensors' versions).
    """
    if getattr(ctx, "handed_over", False):
        raise RuntimeError(
            "the fused alignment loss computes its gradients in the forward pass and hands them over on the first "
            "backward; backpropagating through the same graph twice (retain_graph=True) is not supported. "
            "Recompute the loss, or use backend='torch'."
        )
    ctx.handed_over = True
    grads = []
    for grad, requested in zip(ctx.saved_tensors, ctx.requested, strict=True):
        if requested:
            torch.ops.letkit.scale_(grad, grad_loss)
        grads.append(grad if requested else None)
    return grads


def accumulate_weight_grad(grad_weight: Tensor, grad_projected: Tensor, features: Tensor) -> None:
    """``grad_weight += grad_projected.T @ features`` (both in the GEMM dtype) into the float32 ``grad_weight``."""
    if grad_projected.dtype == torch.float32:
        grad_weight.addmm_(grad_projected.t(), features)
    elif grad_projected.is_cuda and _ADDMM_HAS_OUT_DTYPE:
        # bf16 tensor-core GEMM accumulating straight into the fp32 buffer (no fp32 temporaries).
        torch.addmm(grad_weight, grad_projected.t(), features, out_dtype=torch.float32, out=grad_weight)
    else:
        grad_weight.addmm_(grad_projected.t().to(torch.float32), features.to(torch.float32))


_ADDMM_HAS_OUT_DTYPE = "dtype_out" in torch.ops.aten.addmm.overloads()
