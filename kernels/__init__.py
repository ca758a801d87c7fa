"""Fused Triton kernels for LET's alignment losses (installed as ``letkit.kernels``).

``HAS_FUSED_ALIGNMENT`` says whether this build provides ``fused_alignment_loss``; until it does,
``letkit.alignment_loss(..., backend="triton")`` raises a clear error and ``"auto"`` uses torch.
"""

HAS_FUSED_ALIGNMENT = False
