"""What ``letkit.losses`` does around the fused kernels: the teacher finiteness check and the choice of backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from letkit.losses import check_teacher_finite, fused_dtype_error, resolve_backend


class RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func)
        return func(*args, **(kwargs or {}))


def test_finiteness_check_of_device_features_never_reads_a_value_back():
    """Off the CPU the check must be queued on the device: a host read (``aten._local_scalar_dense``, what
    ``bool()``/``.item()`` run, a host-device sync on CUDA) is what made check_finite=True slower than False.
    Meta tensors hold no values, so any host read fails on them."""
    teacher = torch.empty(4, 3, 8, device="meta")
    with RecordOps() as recorded:
        check_teacher_finite(teacher)
    assert torch.ops.aten._local_scalar_dense.default not in recorded.ops
    assert torch.ops.aten._assert_async.msg in recorded.ops


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_finiteness_check_on_cpu_raises_a_value_error_at_once(bad):
    teacher = torch.randn(2, 5, 8)
    check_teacher_finite(teacher)
    teacher[1, 2, 3] = bad
    with pytest.raises(ValueError, match="teacher features contain 1 non-finite values"):
        check_teacher_finite(teacher)


def test_float16_gradients_are_refused_by_the_kernels_and_auto_picks_torch():
    """The fused kernels compute gradients in the forward pass, before GradScaler's loss scale is known: float16
    gradients of a mean over many tokens would underflow there (1.5e-2 relative error at 16k tokens, measured).
    They refuse float16 for what they differentiate; backend='auto' sends such inputs to the torch reference."""
    pytest.importorskip("triton")
    from letkit.kernels import fused_alignment_loss

    half, single = torch.randn(4, 8).half(), torch.randn(4, 8)
    weight = torch.randn(6, 8)
    for arguments, name in [((half, single), "target"), ((single, torch.randn(4, 6)), "weight")]:
        extra = {"projection": "linear", "weight": weight.half()} if name == "weight" else {}
        with pytest.raises(TypeError, match=f"{name} has dtype torch.float16: .*GradScaler.*backend='torch'"):
            fused_alignment_loss(*arguments, "cosine", **extra)
        assert fused_dtype_error(*arguments, **{k: v for k, v in extra.items() if k == "weight"}) is not None

    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, fused_dtype_error(half, single)) == "torch"
    assert resolve_backend("auto", cuda, fused_dtype_error(single, single)) == "triton"
    # an only-read float16 teacher is fine for the kernels
    assert fused_dtype_error(single, half) is None and fused_dtype_error(single.bfloat16(), half) is None
    assert resolve_backend("auto", torch.device("cpu"), None) == "torch"
