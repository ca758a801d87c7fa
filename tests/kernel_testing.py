"""Shared setup of the fused-kernel tests: Triton's CPU interpreter, poisoned allocations, relative error.

Without CUDA the kernels run under Triton's CPU interpreter, which must be switched on before
``letkit.kernels`` is imported: test modules import this one first.
"""

import contextlib
import math
import os
from unittest import mock

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest

pytest.importorskip("triton")

from letkit.kernels import alignment_common

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu" and not alignment_common.INTERPRETED:
    raise RuntimeError("letkit.kernels was imported without TRITON_INTERPRET=1 before the kernel tests; run them on their own")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


@contextlib.contextmanager
def poisoned_allocations():
    """Fill every buffer the op allocates with torch.empty/empty_like with NaN, so unwritten elements show."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor.fill_(-7)

    with mock.patch("torch.empty", lambda *a, **k: poison(real_empty(*a, **k))), mock.patch(
        "torch.empty_like", lambda *a, **k: poison(real_empty_like(*a, **k))
    ):
        yield


def relative_error(actual, expected):
    expected = expected.double()
    scale = expected.norm()
    if scale == 0:
        return actual.double().norm().item()
    return ((actual.double() - expected).norm() / scale).item()
