"""Rotary position embeddings (RoPE) with the rope-scaling variants used by Llama-family checkpoints.

``rope_scaling`` follows the Hugging Face config dict: ``None`` (plain RoPE) or ``{"rope_type": ..., ...}`` with
* ``"linear"``: ``factor`` (positions divided by ``factor``),
* ``"dynamic"``: ``factor`` (NTK-aware base growth once the sequence exceeds ``max_position_embeddings``),
* ``"llama3"``: ``factor``, ``low_freq_factor``, ``high_freq_factor``, ``original_max_position_embeddings``.
The cos/sin tables are recomputed in every forward (a [T, rotary_dim] outer product, negligible next to the
matmuls); keeping no buffers lets models be built on the meta device and materialised with ``to_empty``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def check_rope_scaling(rope_scaling: dict[str, Any] | None) -> None:
    """Raise ValueError unless ``rope_scaling`` is None or a supported, complete scaling dict."""
    if rope_scaling is None:
        return
    if not isinstance(rope_scaling, dict):
        raise TypeError(f"rope_scaling must be a dict or None, got {type(rope_scaling).__name__}")
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in _REQUIRED_KEYS:
        raise ValueError(f"rope_scaling['rope_type']={rope_type!r} is not supported; supported: {list(_REQUIRED_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS[rope_type] if k not in rope_scaling]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}: {rope_scaling}")


def rope_scaling_from_hf(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` from a Hugging Face config dict, old (``rope_theta`` + ``rope_scaling``
    with ``type``) or new (``rope_parameters``) style."""
    params = dict(hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", hf_config.get("rope_theta", hf_config.get("rotary_emb_base", 10000.0))))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    return theta, {"rope_type": rope_type, **params}


def inverse_frequencies(
    rotary_dim: int,
    *,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    seq_len: int,
    max_position_embeddings: int,
    device: torch.device | None = None,
) -> Tensor:
    """The ``rotary_dim // 2`` rotation frequencies (float32) for a sequence of ``seq_len`` tokens."""
    rope_type = rope_scaling["rope_type"] if rope_scaling else "default"
    exponents = torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim
    if rope_type == "dynamic" and seq_len > max_position_embeddings:
        factor = rope_scaling["factor"]
        theta = theta * ((factor * seq_len / max_position_embeddings) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    elif rope_type == "llama3":
        # Long wavelengths (beyond the original context) are slowed down by `factor`, short ones kept, and the band
        # in between interpolated smoothly.
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        context = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
        scaled = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen < context / high, inv_freq, torch.where(wavelen > context / low, inv_freq / factor, scaled))
    return inv_freq


def rotary_cos_sin(
    seq_len: int,
    rotary_dim: int,
    *,
    theta: float,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [seq_len, rotary_dim] for positions 0 .. seq_len-1, computed in float32, cast to ``dtype``."""
    inv_freq = inverse_frequencies(
        rotary_dim,
        theta=theta,
        rope_scaling=rope_scaling,
        seq_len=seq_len,
        max_position_embeddings=max_position_embeddings,
        device=device,
    )
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first ``cos.shape[-1]`` features of ``x`` [..., T, head_dim] (rotate-half convention of Hugging
    Face checkpoints); the remaining features (partial rotary, GPT-NeoX) pass through."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat((-second, first), dim=-1) * sin
    return torch.cat((rotated, rest), dim=-1) if rest.shape[-1] else rotated
