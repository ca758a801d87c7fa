"""Alignment losses: the L_align term of LET, with the projector folded in.

    L_align = sum_t m_t * loss(P(h_target[t]), h_teacher[t]) / max(1, sum_t m_t),   m_t in {0, 1} (the token mask)

The projection P maps target features (d_target) into the teacher's space (d_teacher):

* ``"identity"``    -- no projection; the dims must already be equal.
* ``"interpolate"`` -- parameter-free 1-D linear interpolation along the hidden dimension
  (the paper's choice), see :func:`interpolate_features`.
* ``"linear"``      -- learned ``h @ weight.T + bias`` with ``weight`` of shape (d_teacher, d_target).

Per-token losses (computed in float32 whatever the input dtype):

* ``"cosine"``    -- ``1 - a.b / (max(|a|, eps) * max(|b|, eps))`` (the paper's), eps = 1e-8.
* ``"smooth_l1"`` -- mean over dims of SmoothL1(beta=1) between layer-normalised (no affine,
  eps = 1e-5) ``a`` and ``b``: scale-free like cosine, but not bounded.
* ``"mse"``       -- mean over dims of ``(a - b)**2``.

Two backends compute the same quantity: ``"torch"`` (reference, any device) and ``"triton"``
(fused projection + loss kernels from :mod:`letkit.kernels`); ``"auto"`` picks Triton on CUDA when it
is available and takes the inputs' dtypes (float32/bfloat16, see :func:`fused_dtype_error`), torch otherwise.
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_KINDS = ("cosine", "smooth_l1", "mse")
PROJECTIONS = ("identity", "interpolate", "linear")
BACKENDS = ("auto", "torch", "triton")

COSINE_EPS = 1e-8
LAYER_NORM_EPS = 1e-5
SMOOTH_L1_BETA = 1.0


def interpolation_taps(d_in: int, d_out: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Taps of 1-D linear interpolation from ``d_in`` to ``d_out`` samples (``align_corners=True``).

    Output sample ``j`` sits at input position ``x_j = j * (d_in - 1) / (d_out - 1)`` and equals
    ``(1 - w_j) * in[lo_j] + w_j * in[hi_j]``. Returns ``(lo, hi, w)`` (int64, int64, float32), each of
    length ``d_out``. The end points map onto each other, so a linear signal stays exactly linear.
    """
    if d_in < 1 or d_out < 1:
        raise ValueError(f"interpolation needs positive sizes, got d_in={d_in}, d_out={d_out}")
    if d_out == 1:
        position = torch.zeros(1, dtype=torch.float64, device=device)
    else:
        position = torch.arange(d_out, dtype=torch.float64, device=device) * ((d_in - 1) / (d_out - 1))
    lo = position.floor().long().clamp_(max=d_in - 1)
    hi = (lo + 1).clamp_(max=d_in - 1)
    w = (position - lo).float()
    return lo, hi, w


def interpolate_features(x: Tensor, size: int) -> Tensor:
    """Resample the last dimension of ``x`` to ``size`` by 1-D linear interpolation (align_corners=True).

    The result has ``x``'s dtype, like the learned projectors' outputs: reduced-precision inputs are interpolated
    in float32 and rounded once at the end (the alignment losses upcast to float32 themselves). When
    ``size == x.shape[-1]`` this is the identity.
    """
    d_in = x.shape[-1]
    if size == d_in:
        return x
    lo, hi, w = interpolation_taps(d_in, size, x.device)
    compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    h = x.to(compute_dtype)
    w = w.to(compute_dtype)
    return (h.index_select(-1, lo) * (1 - w) + h.index_select(-1, hi) * w).to(x.dtype)


def per_token_loss(projected: Tensor, teacher: Tensor, kind: str) -> Tensor:
    """Per-token alignment loss of already-projected target features vs teacher features (no reduction)."""
    if kind == "cosine":
        dot = (projected * teacher).sum(-1)
        norms = projected.norm(dim=-1).clamp_min(COSINE_EPS) * teacher.norm(dim=-1).clamp_min(COSINE_EPS)
        return 1 - dot / norms
    if kind == "smooth_l1":
        d = projected.shape[-1]
        a = F.layer_norm(projected, (d,), eps=LAYER_NORM_EPS)
        b = F.layer_norm(teacher, (d,), eps=LAYER_NORM_EPS)
        return F.smooth_l1_loss(a, b, beta=SMOOTH_L1_BETA, reduction="none").mean(-1)
    if kind == "mse":
        return (projected - teacher).pow(2).mean(-1)
    raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


def _torch_alignment_loss(
    target: Tensor, teacher: Tensor, kind: str, projection: str, weight: Tensor | None, bias: Tensor | None, mask: Tensor | None
) -> Tensor:
    compute_dtype = torch.float64 if target.dtype == torch.float64 else torch.float32
    h = target.to(compute_dtype)
    if projection == "linear":
        h = F.linear(h, weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype))
    elif projection == "interpolate":
        h = interpolate_features(h, teacher.shape[-1])
    teacher = teacher.to(compute_dtype)
    if mask is not None:  # masked tokens (e.g. padding) must not reach the loss, not even as NaN
        kept = mask != 0
        dropped = ~kept.unsqueeze(-1)
        h, teacher = h.masked_fill(dropped, 0), teacher.masked_fill(dropped, 0)
    losses = per_token_loss(h, teacher, kind)
    if mask is None:
        return losses.mean() if losses.numel() else losses.sum()
    keep = kept.to(compute_dtype)
    return (losses * keep).sum() / keep.sum().clamp_min(1)


FUSED_GRAD_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes the fused kernels take for ``target``, ``weight`` and ``bias`` (what they differentiate). Not float16:
the kernels compute the gradients in the forward pass, before GradScaler's loss scale is known (it arrives with
backward), so float16 gradients of small per-token losses would underflow."""
FUSED_TEACHER_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes the fused kernels take for ``teacher`` (only read)."""


def fused_dtype_error(target: Tensor, teacher: Tensor, weight: Tensor | None = None, bias: Tensor | None = None) -> str | None:
    """Why the fused kernels cannot take these inputs' dtypes (a message naming the argument), or None if they can."""
    named = [("target", target, FUSED_GRAD_DTYPES), ("teacher", teacher, FUSED_TEACHER_DTYPES),
             ("weight", weight, FUSED_GRAD_DTYPES), ("bias", bias, FUSED_GRAD_DTYPES)]
    for name, tensor, supported in named:
        if tensor is None or tensor.dtype in supported:
            continue
        if tensor.dtype == torch.float16:
            return (
                f"{name} has dtype torch.float16: the fused alignment kernels compute gradients in the forward pass, "
                "before GradScaler's loss scale is known, where float16 gradients would underflow. Use bfloat16, or "
                "backend='torch' for float16 (backend='auto' picks it)"
            )
        return (
            f"{name} has dtype {tensor.dtype}; the fused alignment kernels support {', '.join(map(str, supported))} "
            "(use backend='torch' for other dtypes)"
        )
    return None


def triton_backend_available(device: torch.device) -> bool:
    """Whether the fused Triton kernels can run on ``device`` (CUDA, or any device under TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    from letkit.kernels import HAS_FUSED_ALIGNMENT

    if not HAS_FUSED_ALIGNMENT:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, device: torch.device, dtype_error: str | None = None) -> str:
    """Turn ``"auto" | "torch" | "triton"`` into the backend that will run on ``device``.

    ``"auto"`` resolves to ``"triton"`` on CUDA when the kernels are available and take the inputs' dtypes
    (``dtype_error``, from :func:`fused_dtype_error`, is None), and to ``"torch"`` otherwise; an explicit
    ``"triton"`` that cannot run on ``device`` raises a ``RuntimeError`` saying why (and the kernels refuse
    dtypes they do not take with a ``TypeError``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return "torch"
    if backend == "auto":
        return "triton" if device.type == "cuda" and dtype_error is None and triton_backend_available(device) else "torch"
    if not triton_backend_available(device):
        raise RuntimeError(
            f"backend='triton' is not available for tensors on {device}: the fused kernels need the `triton` package, "
            "letkit.kernels' fused alignment ops, and a CUDA device (or TRITON_INTERPRET=1 for the slow CPU interpreter). "
            "Use backend='torch' or 'auto'."
        )
    return "triton"


def check_alignment_inputs(
    target: Tensor,
    teacher: Tensor,
    kind: str,
    projection: str,
    weight: Tensor | None,
    bias: Tensor | None,
    mask: Tensor | None,
) -> None:
    """Raise a ValueError/TypeError naming the argument and its value for inputs :func:`alignment_loss` cannot
    take (shared with the fused kernels' entry point, so both backends refuse the same inputs)."""
    if not isinstance(target, Tensor) or not isinstance(teacher, Tensor):
        raise TypeError(f"target and teacher must be tensors, got {type(target).__name__} and {type(teacher).__name__}")
    if kind not in LOSS_KINDS:
        raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
    if projection not in PROJECTIONS:
        raise ValueError(f"projection must be one of {PROJECTIONS}, got {projection!r}")
    for name, features in (("target", target), ("teacher", teacher)):
        if not features.is_floating_point():
            raise TypeError(f"{name} features must be a floating-point tensor, got dtype {features.dtype}")
    if target.device != teacher.device:
        raise ValueError(f"target and teacher features must be on one device, got target on {target.device} and "
                         f"teacher on {teacher.device}")
    if target.dim() < 1 or teacher.dim() < 1:
        raise ValueError(f"target and teacher need a feature dimension, got shapes {tuple(target.shape)} and {tuple(teacher.shape)}")
    if target.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            "target and teacher features must cover the same tokens (same batch and sequence length): "
            f"target {tuple(target.shape)} vs teacher {tuple(teacher.shape)}"
        )
    d_target, d_teacher = target.shape[-1], teacher.shape[-1]
    if projection == "linear":
        if weight is None:
            raise ValueError("projection='linear' needs weight of shape (d_teacher, d_target)")
        if tuple(weight.shape) != (d_teacher, d_target):
            raise ValueError(
                f"weight must have shape (d_teacher, d_target) = ({d_teacher}, {d_target}) for target {tuple(target.shape)} "
                f"and teacher {tuple(teacher.shape)}, got {tuple(weight.shape)}"
            )
        if bias is not None and tuple(bias.shape) != (d_teacher,):
            raise ValueError(f"bias must have shape ({d_teacher},), got {tuple(bias.shape)}")
        for name, tensor in (("weight", weight), ("bias", bias)):
            if tensor is not None and tensor.device != target.device:
                raise ValueError(f"{name} must be on the target features' device, got target on {target.device} and "
                                 f"{name} on {tensor.device}")
    else:
        if weight is not None or bias is not None:
            raise ValueError(f"weight/bias are only used with projection='linear', got projection={projection!r}")
        if projection == "identity" and d_target != d_teacher:
            raise ValueError(
                f"projection='identity' needs equal feature dims, got target dim {d_target} and teacher dim {d_teacher}: "
                "use projection='interpolate' or 'linear'"
            )
    if mask is not None:
        check_mask(mask, tuple(target.shape[:-1]), target.device)


def check_mask(mask: object, token_shape: tuple[int, ...], device: torch.device, *, of: str = "features") -> None:
    """Raise a TypeError/ValueError naming ``mask`` unless it is a tensor of ``token_shape`` on ``device`` holding
    only True/False or 0/1. ``of`` names the target's tensor the mask selects tokens of (``"logits"`` for logit
    distillation) in the messages.

    A bool mask is accepted as it is. An integer or floating mask has its values checked, which on a GPU costs one
    host-device sync: pass a bool mask to avoid it. The value check is skipped inside ``torch.compile``d code
    (a data-dependent check would break the graph); the losses then keep the tokens whose mask is nonzero.
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor of bools (or of 0s and 1s), got {type(mask).__name__}: "
                        "convert it with torch.as_tensor(mask, dtype=torch.bool)")
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"mask must have the token shape of the {of} {tuple(token_shape)}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the target {of}' device, got target on {device} and mask on {mask.device}")
    if mask.dtype == torch.bool:
        return
    if mask.is_complex():
        raise TypeError(f"mask must be a bool tensor (or hold only 0 and 1), got dtype {mask.dtype}")
    if not torch.compiler.is_compiling():
        outside = mask[(mask != 0) & (mask != 1)]
        if outside.numel():
            raise ValueError(f"mask must hold only 0 and 1 (or be a bool tensor: True keeps a token), got "
                             f"{outside.numel()} other values, e.g. {outside[:4].tolist()}")


_NON_FINITE_TEACHER = (
    "the teacher is broken or overflowed in its dtype. Pass check_finite=False to skip this check."
)


def check_teacher_finite(teacher: Tensor) -> None:
    """Fail when the teacher's features hold NaN/Inf, without ever waiting for the device.

    On CPU this raises a ValueError right away. On any other device (CUDA) the check is queued on the device
    (``torch._assert_async``): no host-device sync, so it costs a reduction over the features and nothing
    else, and a non-finite teacher fails the run at the next synchronisation with a device-side assertion
    (after which the CUDA context is unusable: the process must exit). Skipped inside ``torch.compile``d code.
    """
    if torch.compiler.is_compiling():
        return
    if teacher.device.type != "cpu":
        torch._assert_async(torch.isfinite(teacher).all(), f"teacher features contain NaN/Inf: {_NON_FINITE_TEACHER}")
    elif not bool(torch.isfinite(teacher).all()):
        bad = int((~torch.isfinite(teacher)).sum())
        raise ValueError(f"teacher features contain {bad} non-finite values (NaN/Inf) out of {teacher.numel()}: {_NON_FINITE_TEACHER}")


def alignment_loss(
    target: Tensor,
    teacher: Tensor,
    kind: str = "cosine",
    *,
    projection: str = "identity",
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    mask: Tensor | None = None,
    backend: str = "auto",
    check_finite: bool = True,
) -> Tensor:
    """LET's alignment loss, ``mean over unmasked tokens of loss(P(target), teacher)``.

    Args:
        target: target-model features ``(..., d_target)``; gradients flow into it.
        teacher: teacher features ``(..., d_teacher)`` over the same tokens; treated as a constant.
        kind: ``"cosine"`` (paper), ``"smooth_l1"`` (on layer-normalised features) or ``"mse"``.
        projection: ``"identity"``, ``"interpolate"`` (parameter-free, paper) or ``"linear"``.
        weight, bias: the linear projector, ``(d_teacher, d_target)`` and ``(d_teacher,)``.
        mask: optional ``(...)`` tensor over tokens on the features' device, bool or holding only 0 and 1;
            True/1 keeps a token (e.g. non-padding). With every token masked the loss is 0. Non-bool masks have
            their values checked (a host-device sync on GPUs; see :func:`check_mask`).
        backend: ``"auto"`` (the fused kernels on CUDA for float32/bfloat16 inputs, else torch), ``"torch"``
            or ``"triton"``.
        check_finite: fail if the teacher features hold NaN/Inf (see :func:`check_teacher_finite`): a
            ValueError on CPU; on CUDA a device-side assertion that never syncs the host, so the default
            costs no more than ``check_finite=False`` beyond one reduction. Skipped inside ``torch.compile``d
            code, where a data-dependent check would break the graph.

    Returns:
        A float32 scalar (float64 for float64 inputs).
    """
    check_alignment_inputs(target, teacher, kind, projection, weight, bias, mask)
    if check_finite:
        check_teacher_finite(teacher)
    teacher = teacher.detach()
    if resolve_backend(backend, target.device, fused_dtype_error(target, teacher, weight, bias)) == "triton":
        from letkit.kernels import fused_alignment_loss

        return fused_alignment_loss(target, teacher, kind, projection=projection, weight=weight, bias=bias, mask=mask)
    return _torch_alignment_loss(target, teacher, kind, projection, weight, bias, mask)


class AlignmentLoss(nn.Module):
    """Module form of :func:`alignment_loss`: holds the loss kind, backend and finiteness check.

    ``check_finite`` (default True) is :func:`check_teacher_finite`: on CUDA it runs on the device without a
    host sync, so leaving it on does not slow training down.
    """

    def __init__(self, kind: str = "cosine", *, backend: str = "auto", check_finite: bool = True) -> None:
        super().__init__()
        if kind not in LOSS_KINDS:
            raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.kind = kind
        self.backend = backend
        self.check_finite = check_finite

    def forward(
        self,
        target: Tensor,
        teacher: Tensor,
        *,
        projection: str = "identity",
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return alignment_loss(
            target,
            teacher,
            self.kind,
            projection=projection,
            weight=weight,
            bias=bias,
            mask=mask,
            backend=self.backend,
            check_finite=self.check_finite,
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, backend={self.backend!r}"
