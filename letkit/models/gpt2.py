"""GPT-2 decoder, as a teacher loaded from Hugging Face checkpoints.

Pre-LayerNorm blocks, learned absolute positions, fused q/k/v projection, tanh-approximated GELU, LM head tied to
the token embedding. Checkpoints store every projection in the transposed ``Conv1D`` layout ``[in, out]``; the
mapping at the bottom transposes them into ``nn.Linear`` weights ``[out, in]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from letkit.models.base import (
    ModelOutput,
    TensorMapping,
    activation,
    check_config_fields,
    init_normal_weights,
    same,
    transposed,
)


@dataclass
class GPT2Config:
    """Shape and options of a GPT-2 model; Hugging Face's ``n_embd``/``n_layer``/... under readable names."""

    vocab_size: int = 50257
    hidden_size: int = 768  # n_embd
    num_hidden_layers: int = 12  # n_layer
    num_attention_heads: int = 12  # n_head
    max_position_embeddings: int = 1024  # n_positions
    intermediate_size: int | None = None  # n_inner; None: 4 * hidden_size
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    scale_attn_weights: bool = True  # scores / sqrt(head_dim)
    scale_attn_by_inverse_layer_idx: bool = False  # scores of block i further / (i + 1)
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_config_fields(self)
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        activation(self.activation_function)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> GPT2Config:
        """Config from a Hugging Face ``config.json`` dict."""
        if hf.get("add_cross_attention", False):
            raise ValueError("config.json add_cross_attention=true: GPT-2 with cross-attention is not supported")
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["n_embd"],
            num_hidden_layers=hf["n_layer"],
            num_attention_heads=hf["n_head"],
            max_position_embeddings=hf.get("n_positions", 1024),
            intermediate_size=hf.get("n_inner"),
            activation_function=hf.get("activation_function", "gelu_new"),
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
            scale_attn_weights=hf.get("scale_attn_weights", True),
            scale_attn_by_inverse_layer_idx=hf.get("scale_attn_by_inverse_layer_idx", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        """Hugging Face ``config.json`` keys (model_type gpt2)."""
        return {
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_embd": self.hidden_size,
            "n_layer": self.num_hidden_layers,
            "n_head": self.num_attention_heads,
            "n_positions": self.max_position_embeddings,
            "n_inner": self.intermediate_size,
            "activation_function": self.activation_function,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "scale_attn_weights": self.scale_attn_weights,
            "scale_attn_by_inverse_layer_idx": self.scale_attn_by_inverse_layer_idx,
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
        }


class Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.scale = (config.hidden_size // config.num_attention_heads) ** -0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            self.scale /= layer_idx + 1
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv_proj(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class GPT2(nn.Module):
    """GPT-2 causal LM with the interface described in :mod:`letkit.models.base`."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.pos_embed = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Linear/Embedding weights ~ N(0, initializer_range), biases 0, LayerNorms 1/0."""
        init_normal_weights(self, self.config.initializer_range)

    def forward(self, input_ids: Tensor, *, output_hidden_states: bool = False) -> Tensor | ModelOutput:
        """Logits [B, T, V] for ``input_ids`` [B, T]; a :class:`ModelOutput` if ``output_hidden_states``."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, seq] with seq <= max_position_embeddings="
                f"{self.config.max_position_embeddings}, got shape {tuple(input_ids.shape)}"
            )
        x = self.embed(input_ids) + self.pos_embed(torch.arange(input_ids.shape[1], device=input_ids.device))
        hidden_states = [x]
        for block in self.blocks:
            x = block(x)
            hidden_states.append(x)
        x = self.final_norm(x)
        logits = self.lm_head(x)
        if not output_hidden_states:
            return logits
        hidden_states[-1] = x
        return ModelOutput(logits, tuple(hidden_states))


def hf_checkpoint_mapping(model: GPT2) -> list[TensorMapping]:
    """Where each parameter of ``model`` lives in a Hugging Face ``GPT2LMHeadModel`` checkpoint."""
    top = {"embed": "transformer.wte", "pos_embed": "transformer.wpe", "final_norm": "transformer.ln_f",
           "lm_head": "lm_head"}
    in_block = {"attn_norm": "ln_1", "attn.qkv_proj": "attn.c_attn", "attn.o_proj": "attn.c_proj",
                "mlp_norm": "ln_2", "mlp.up_proj": "mlp.c_fc", "mlp.down_proj": "mlp.c_proj"}
    mappings = []
    for name, param in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        if not module.startswith("blocks."):
            mappings.append(same(name, f"{top[module]}.{kind}"))
            continue
        _, i, sub = module.split(".", 2)
        hf_name = f"transformer.h.{i}.{in_block[sub]}.{kind}"
        is_conv1d_weight = kind == "weight" and param.dim() == 2
        mappings.append(transposed(name, hf_name) if is_conv1d_weight else same(name, hf_name))
    return mappings
