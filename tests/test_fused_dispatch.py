"""What ``letkit.losses`` does around the fused kernels: the teacher finiteness check and the choice of backend."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from letkit.losses import check_teacher_finite


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
