"""GPT-NeoX decoder (Pythia family), as a teacher loaded from Hugging Face checkpoints.

Pre-LayerNorm blocks with rotary positions on the first ``rotary_pct`` of each head's features. With
``use_parallel_residual`` (Pythia) attention and MLP both read the block input:
``x = x + attn(ln1(x)) + mlp(ln2(x))``; without it they are sequential. The fused ``query_key_value`` projection
keeps the checkpoint's per-head interleaved layout ``[head0: q k v, head1: q k v, ...]``, so it loads unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from letkit.models.base import ModelOutput, TensorMapping, activation, check_config_fields, init_normal_weights, same
from letkit.models.rope import apply_rotary, check_rope_scaling, rope_scaling_from_hf, rotary_cos_sin


@dataclass
class GPTNeoXConfig:
    """Shape and options of a GPT-NeoX model; field names follow Hugging Face's ``GPTNeoXConfig``."""

    vocab_size: int = 50304
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    max_position_embeddings: int = 2048
    rotary_pct: float = 0.25  # fraction of each head's features that are rotated
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    hidden_act: str = "gelu"
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_config_fields(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise ValueError(f"rotary_pct={self.rotary_pct} gives an odd rotary dimension {self.rotary_dim}")
        activation(self.hidden_act)
        check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)  # our own copy: callers' dicts get mutated elsewhere

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPTNeoXConfig:
        """Config from a Hugging Face ``config.json`` dict (old ``rotary_pct`` or new ``rope_parameters`` keys)."""
        theta, scaling = rope_scaling_from_hf(hf)
        rotary_pct = (hf.get("rope_parameters") or {}).get(
            "partial_rotary_factor", hf.get("partial_rotary_factor", hf.get("rotary_pct", 0.25)))
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rotary_pct=rotary_pct,
            rope_theta=theta,
            rope_scaling=scaling,
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5),
            use_parallel_residual=hf.get("use_parallel_residual", True),
            hidden_act=hf.get("hidden_act", "gelu"),
            attention_bias=hf.get("attention_bias", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        """Hugging Face ``config.json`` keys (model_type gpt_neox)."""
        return {
            "model_type": "gpt_neox",
            "architectures": ["GPTNeoXForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "hidden_act": self.hidden_act,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        qkv = rearrange(self.qkv_proj(x), "b t (h three d) -> three b h t d", three=3, d=self.head_dim)
        q, k = apply_rotary(qkv[0], cos, sin), apply_rotary(qkv[1], cos, sin)
        y = F.scaled_dot_product_attention(q, k, qkv[2], is_causal=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.parallel_residual = config.use_parallel_residual
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        attn = self.attn(self.attn_norm(x), cos, sin)
        if self.parallel_residual:
            return x + attn + self.mlp(self.mlp_norm(x))
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))


class GPTNeoX(nn.Module):
    """GPT-NeoX / Pythia causal LM with the interface described in :mod:`letkit.models.base`."""

    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Linear/Embedding weights ~ N(0, initializer_range), biases 0, LayerNorms 1/0."""
        init_normal_weights(self, self.config.initializer_range)

    def forward(self, input_ids: Tensor, *, output_hidden_states: bool = False) -> Tensor | ModelOutput:
        """Logits [B, T, V] for ``input_ids`` [B, T]; a :class:`ModelOutput` if ``output_hidden_states``."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        x = self.embed(input_ids)
        c = self.config
        cos, sin = rotary_cos_sin(
            input_ids.shape[1], c.rotary_dim, theta=c.rope_theta, rope_scaling=c.rope_scaling,
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


def hf_checkpoint_mapping(model: GPTNeoX) -> list[TensorMapping]:
    """Where each parameter of ``model`` lives in a Hugging Face ``GPTNeoXForCausalLM`` checkpoint."""
    top = {"embed": "gpt_neox.embed_in", "final_norm": "gpt_neox.final_layer_norm", "lm_head": "embed_out"}
    in_block = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                "attn.qkv_proj": "attention.query_key_value", "attn.o_proj": "attention.dense",
                "mlp.up_proj": "mlp.dense_h_to_4h", "mlp.down_proj": "mlp.dense_4h_to_h"}
    mappings = []
    for name, _ in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        if module.startswith("blocks."):
            _, i, sub = module.split(".", 2)
            mappings.append(same(name, f"gpt_neox.layers.{i}.{in_block[sub]}.{kind}"))
        else:
            mappings.append(same(name, f"{top[module]}.{kind}"))
    return mappings
