"""Fused Triton alignment kernels."""
