"""Llama-style decoder: Llama 1/2/3, TinyLlama, SmolLM, Mistral and Qwen2 checkpoints, and letkit's default target.

Block: ``x = x + attn(rmsnorm(x)); x = x + swiglu(rmsnorm(x))`` with rotary positions, grouped-query attention
(``num_key_value_heads < num_attention_heads``) through ``scaled_dot_product_attention(is_causal=True,
enable_gqa=...)``, optional q/k/v bias (Qwen2), optional sliding window (Mistral) and optional tied embeddings.
q/k/v and gate/up are fused into one matmul each; the checkpoint mapping at the bottom splits them into the
Hugging Face tensors.

Initialisation (for training a target from scratch, GPT-2 / nanoGPT recipe): every Linear and Embedding weight
~ N(0, initializer_range=0.02), except the projections that write into the residual stream (``attn.o_proj``,
``mlp.down_proj``), which get std ``initializer_range / sqrt(2 * num_hidden_layers)`` so the residual stream's
variance does not grow with depth; biases 0, RMSNorm weights 1.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from letkit.models.base import ModelOutput, TensorMapping, check_config_fields, fused, same
from letkit.models.rope import apply_rotary, check_rope_scaling, rope_scaling_from_hf, rotary_cos_sin


@dataclass
class LlamaConfig:
    """Shape and options of a Llama-style model; field names follow Hugging Face's ``LlamaConfig``."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: = num_attention_heads (multi-head attention)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # see letkit.models.rope
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: attend to the last `sliding_window` tokens (self included)
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_config_fields(self)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
                    " (or pass head_dim)"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)  # our own copy: callers' dicts get mutated elsewhere

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaConfig:
        """Config from a Hugging Face ``config.json`` dict of model_type llama, mistral or qwen2."""
        model_type = hf.get("model_type", "llama")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}: {model_type} models here use silu (SwiGLU)")
        theta, scaling = rope_scaling_from_hf(hf)
        if scaling and scaling["rope_type"] == "llama3":
            scaling.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
        if model_type == "qwen2":
            if hf.get("use_sliding_window", False):
                raise ValueError("config.json use_sliding_window=true: Qwen2 sliding-window layers are not supported")
            qkv_bias, o_bias, sliding_window = True, False, None
        else:
            qkv_bias = o_bias = bool(hf.get("attention_bias", False))
            sliding_window = hf.get("sliding_window") if model_type == "mistral" else None
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            num_key_value_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            sliding_window=sliding_window,
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        """Hugging Face ``config.json`` keys: model_type llama, or qwen2 / mistral where those options are used."""
        if self.qkv_bias and not self.o_bias:
            model_type, arch = "qwen2", "Qwen2ForCausalLM"
            if self.sliding_window is not None or self.head_dim * self.num_attention_heads != self.hidden_size:
                raise ValueError(
                    "qkv_bias without o_bias is saved as Qwen2, which supports neither sliding_window="
                    f"{self.sliding_window} nor head_dim={self.head_dim} != hidden_size / num_attention_heads"
                )
        elif self.o_bias and not self.qkv_bias:
            raise ValueError("o_bias=True with qkv_bias=False has no Hugging Face equivalent")
        elif self.sliding_window is not None:
            if self.qkv_bias:
                raise ValueError("sliding_window with attention biases has no Hugging Face equivalent")
            model_type, arch = "mistral", "MistralForCausalLM"
        else:
            model_type, arch = "llama", "LlamaForCausalLM"
        if self.mlp_bias and model_type != "llama":
            raise ValueError(f"mlp_bias=True cannot be saved as {model_type} (needed for the other options)")
        hf = {
            "model_type": model_type,
            "architectures": [arch],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }
        if model_type == "qwen2":
            hf.update(use_sliding_window=False, sliding_window=None)
        elif model_type == "mistral":
            hf.update(sliding_window=self.sliding_window)
        else:
            hf.update(attention_bias=self.qkv_bias, mlp_bias=self.mlp_bias)
        return hf


class RMSNorm(nn.Module):
    """x / rms(x) * weight, with the statistics in float32 (as the reference checkpoints were trained)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Written out rather than F.rms_norm: same result, and its autograd is faster on CPU (torch 2.13).
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.num_heads, self.num_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim)
        self.split_sizes = [self.num_heads * self.head_dim, *2 * [self.num_kv_heads * self.head_dim]]
        self.qkv_proj = nn.Linear(config.hidden_size, sum(self.split_sizes), bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        q, k, v = (
            rearrange(t, "b t (h d) -> b h t d", d=self.head_dim) for t in self.qkv_proj(x).split(self.split_sizes, -1)
        )
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        seq_len, window = x.shape[1], self.config.sliding_window
        mask = None
        if window is not None and seq_len > window:
            offset = torch.arange(seq_len, device=x.device)
            offset = offset[:, None] - offset[None, :]
            mask = (offset >= 0) & (offset < window)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class SwiGLU(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Llama-style causal LM. See the module docstring for the architecture and initialisation."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re)initialise every parameter as described in the module docstring (e.g. after ``to_empty``)."""
        std = self.config.initializer_range
        residual_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                is_residual_out = name.endswith(("attn.o_proj", "mlp.down_proj"))
                nn.init.normal_(module.weight, std=residual_std if is_residual_out else std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: Tensor, *, output_hidden_states: bool = False) -> Tensor | ModelOutput:
        """Logits [B, T, V] for ``input_ids`` [B, T]; a :class:`ModelOutput` if ``output_hidden_states``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        c = self.config
        cos, sin = rotary_cos_sin(
            input_ids.shape[1], c.head_dim, theta=c.rope_theta, rope_scaling=c.rope_scaling,
            max_position_embeddings=c.max_position_embeddings, device=x.device, dtype=x.dtype,
        )
        hidden_states = [x]
        for block in self.blocks:
            x = block(x, cos, sin)
            hidden_states.append(x)
        x = self.final_norm(x)
        logits = self.lm_head(x)
        if not output_hidden_states:
            return logits
        hidden_states[-1] = x
        return ModelOutput(logits, tuple(hidden_states))


def hf_checkpoint_mapping(model: Llama) -> list[TensorMapping]:
    """Where each parameter of ``model`` lives in a Hugging Face ``LlamaForCausalLM``-style checkpoint."""
    c = model.config
    q_size, kv_size = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    top = {"embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head"}
    in_block = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                "attn.o_proj": "self_attn.o_proj", "mlp.down_proj": "mlp.down_proj"}
    mappings = []
    for name, _ in model.named_parameters():  # a tied lm_head is listed once, as embed.weight
        module, kind = name.rsplit(".", 1)
        if not module.startswith("blocks."):
            mappings.append(same(name, f"{top[module]}.{kind}"))
            continue
        _, i, sub = module.split(".", 2)
        prefix = f"model.layers.{i}."
        if sub == "attn.qkv_proj":
            names = [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"]
            mappings.append(fused(name, names, [q_size, kv_size, kv_size]))
        elif sub == "mlp.gate_up_proj":
            names = [f"{prefix}mlp.{p}_proj.{kind}" for p in ("gate", "up")]
            mappings.append(fused(name, names, [c.intermediate_size] * 2))
        else:
            mappings.append(same(name, f"{prefix}{in_block[sub]}.{kind}"))
    return mappings


PRESETS: dict[str, dict[str, Any]] = {
    # For tests: GQA (4 query heads share 2 key/value heads), untied embeddings.
    "tiny": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
    # GPT-3-small shapes with a SwiGLU MLP (8/3 * d): 134M parameters, 85M of them non-embedding.
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, max_position_embeddings=2048),
    # 24 x 2048, 16 heads of 128 (Pythia-1.4B depth and width): 1.36B parameters.
    "1.4b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                 num_attention_heads=16, max_position_embeddings=2048),
    # Llama-2-7B shapes: 6.74B parameters.
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, max_position_embeddings=4096),
}
"""Target presets: ``LlamaConfig`` keyword arguments (other fields at their defaults)."""


def from_preset(name: str, **overrides: Any) -> Llama:
    """A freshly initialised target :class:`Llama` of preset ``name`` (``PRESETS``), config fields overridden by
    ``overrides`` (e.g. ``vocab_size=50304``). Build it under ``with torch.device("meta"):`` to allocate nothing,
    or ``torch.device("cuda")`` to initialise directly on the GPU."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {list(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"unknown LlamaConfig field(s) {unknown} in overrides; fields: {sorted(fields)}")
    return Llama(LlamaConfig(**{**PRESETS[name], **overrides}))
