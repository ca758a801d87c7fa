"""Fused Triton kernels for LET's alignment losses (installed as ``letkit.kernels``).

``fused_alignment_loss(target, teacher, kind, *, projection, weight, bias, mask)`` computes the same
quantity as :func:`letkit.losses.alignment_loss` with the projection and the loss fused, forward and
backward, and is what ``letkit.alignment_loss(..., backend="triton")`` calls. ``HAS_FUSED_ALIGNMENT`` is
``False`` when Triton is not installed; this package stays importable then.

Modules: :mod:`.fused_linear_alignment` (learned linear projector), :mod:`.fused_interpolate_alignment`
(identity / parameter-free interpolation), :mod:`.alignment_common` (shared autograd glue).
"""

from __future__ import annotations

import importlib.util

HAS_FUSED_ALIGNMENT: bool = importlib.util.find_spec("triton") is not None

if HAS_FUSED_ALIGNMENT:
    from letkit.kernels.fused_alignment import fused_alignment_loss
else:

    def fused_alignment_loss(*args, **kwargs):
        """Unavailable: the fused alignment kernels need the ``triton`` package."""
        raise RuntimeError("letkit.kernels.fused_alignment_loss needs the `triton` package; use backend='torch'")


__all__ = ["HAS_FUSED_ALIGNMENT", "fused_alignment_loss"]
