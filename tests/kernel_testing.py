"""Shared helpers of the fused-kernel tests: the device, poisoned allocations, relative error.

Without CUDA the kernels run under Triton's CPU interpreter, switched on by tests/conftest.py.
"""

import contextlib
import math
from unittest import mock

import pytest
import torch

pytest.importorskip("triton")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
LOSS_ATOL = 1e-6
"""Absolute slack of a loss value: 1 - cos of nearly parallel features has float32 rounding errors of ~1e-7."""


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


def assert_gradient_close(actual, expected, tolerance, torch_path=None):
    """Norm-wise relative error ``|actual - expected| / |expected| <= tolerance``, or, when given letkit's torch path's
    gradient on the same inputs (``torch_path``, float32 math), no more than 10x its error: a gradient that is a
    cancellation of much larger terms (cosine of nearly parallel features) is beyond any float32 relative bound."""
    expected = expected.double()
    error = (actual.double() - expected).norm().item()
    allowed = tolerance * expected.norm().item()
    if torch_path is not None:
        allowed = max(allowed, 10 * (torch_path.double() - expected).norm().item())
    assert error <= allowed, f"gradient error {error:.3e} > allowed {allowed:.3e} (|expected| = {expected.norm().item():.3e})"


def ill_conditioned(kind, projection, d_target, d_teacher, has_bias=False):
    """Whether the exact target gradient is a pure cancellation (0, or O(layer-norm eps)) for some inputs.

    Cosine sees only the direction of the projection, layer norm only its standardised shape: a 1-dim teacher
    space, an interpolated single feature (a constant vector) or two features (a ramp), or a bias-free linear
    map of a single feature leave them (nearly) nothing to change; layer norm of two features is +-1 up to
    O(eps / difference^2). Any float32 implementation returns cancellation noise there, which no relative
    bound accepts; those cases are checked with absolute bounds in ``test_flat_losses_have_near_zero_gradients``.
    """
    if kind == "mse":
        return False
    if d_teacher == 1 or kind == "smooth_l1" and d_teacher == 2:
        return True
    if projection == "interpolate":
        return d_target == 1 or kind == "smooth_l1" and d_target == 2
    return projection == "linear" and d_target == 1 and not has_bias
