"""OPT decoder (Meta's OPT family), as a teacher loaded from Hugging Face checkpoints.

Learned absolute positions stored with an offset of 2 (a fairseq legacy: rows 0 and 1 of the table are never used
for positions 0 .. T-1). ``do_layer_norm_before`` selects pre-norm blocks (all sizes except 350m) or post-norm
blocks (``x = ln(x + attn(x))``, OPT-350m), which have no final LayerNorm. When ``word_embed_proj_dim !=
hidden_size`` (OPT-350m) token embeddings are ``project_in`` to the model width and the last hidden state is
``project_out`` back before the tied LM head; ``final_norm`` then includes ``project_out``, so that
``final_norm(last block output)`` is exactly the final hidden state, as for every letkit model.
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
    fused,
    init_normal_weights,
    same,
)

POSITION_OFFSET = 2


@dataclass
class OPTConfig:
    """Shape and options of an OPT model; field names follow Hugging Face's ``OPTConfig``."""

    vocab_size: int = 50272
    hidden_size: int = 768
    ffn_dim: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 2048
    word_embed_proj_dim: int | None = None  # None: = hidden_size (no project_in / project_out)
    do_layer_norm_before: bool = True
    remove_final_layer_norm: bool = False
    activation_function: str = "relu"
    enable_bias: bool = True
    layer_norm_elementwise_affine: bool = True
    tie_word_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_config_fields(self)
        if self.word_embed_proj_dim is None:
            self.word_embed_proj_dim = self.hidden_size
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads={self.num_attention_heads}"
            )
        activation(self.activation_function)

    @property
    def has_final_layer_norm(self) -> bool:
        return self.do_layer_norm_before and not self.remove_final_layer_norm

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> OPTConfig:
        """Config from a Hugging Face ``config.json`` dict."""
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            ffn_dim=hf["ffn_dim"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            word_embed_proj_dim=hf.get("word_embed_proj_dim"),
            do_layer_norm_before=hf.get("do_layer_norm_before", True),
            remove_final_layer_norm=hf.get("_remove_final_layer_norm", False),
            activation_function=hf.get("activation_function", "relu"),
            enable_bias=hf.get("enable_bias", True),
            layer_norm_elementwise_affine=hf.get("layer_norm_elementwise_affine", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            init_std=hf.get("init_std", 0.02),
        )

    def to_hf(self) -> dict[str, Any]:
        """Hugging Face ``config.json`` keys (model_type opt)."""
        return {
            "model_type": "opt",
            "architectures": ["OPTForCausalLM"],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "ffn_dim": self.ffn_dim,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "word_embed_proj_dim": self.word_embed_proj_dim,
            "do_layer_norm_before": self.do_layer_norm_before,
            "_remove_final_layer_norm": self.remove_final_layer_norm,
            "activation_function": self.activation_function,
            "enable_bias": self.enable_bias,
            "layer_norm_elementwise_affine": self.layer_norm_elementwise_affine,
            "tie_word_embeddings": self.tie_word_embeddings,
            "init_std": self.init_std,
        }


def _layer_norm(config: OPTConfig) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine)


class Attention(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.enable_bias)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.enable_bias)

    def forward(self, x: Tensor) -> Tensor:
        q, k, v = rearrange(self.qkv_proj(x), "b t (three h d) -> three b h t d", three=3, h=self.num_heads)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.act = activation(config.activation_function)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class Block(nn.Module):
    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.pre_norm = config.do_layer_norm_before
        self.attn_norm = _layer_norm(config)
        self.attn = Attention(config)
        self.mlp_norm = _layer_norm(config)
        self.mlp = MLP(config)

    def forward(self, x: Tensor) -> Tensor:
        if self.pre_norm:
            x = x + self.attn(self.attn_norm(x))
            return x + self.mlp(self.mlp_norm(x))
        x = self.attn_norm(x + self.attn(x))
        return self.mlp_norm(x + self.mlp(x))


class FinalNorm(nn.Module):
    """OPT's map from the last block to the LM head: final LayerNorm (pre-norm models), then project_out (when
    word_embed_proj_dim != hidden_size)."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.norm = _layer_norm(config) if config.has_final_layer_norm else nn.Identity()
        self.project_out = (
            nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False)
            if config.word_embed_proj_dim != config.hidden_size
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.project_out(self.norm(x))


class OPT(nn.Module):
    """OPT causal LM with the interface described in :mod:`letkit.models.base`."""

    def __init__(self, config: OPTConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.word_embed_proj_dim)
        self.project_in = (
            nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False)
            if config.word_embed_proj_dim != config.hidden_size
            else nn.Identity()
        )
        self.pos_embed = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))
        has_final = config.has_final_layer_norm or config.word_embed_proj_dim != config.hidden_size
        self.final_norm = FinalNorm(config) if has_final else nn.Identity()
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.init_weights()

    def init_weights(self) -> None:
        """Linear/Embedding weights ~ N(0, init_std), biases 0, LayerNorms 1/0."""
        init_normal_weights(self, self.config.init_std)

    def forward(self, input_ids: Tensor, *, output_hidden_states: bool = False) -> Tensor | ModelOutput:
        """Logits [B, T, V] for ``input_ids`` [B, T]; a :class:`ModelOutput` if ``output_hidden_states``."""
        if input_ids.dim() != 2 or input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(
                f"input_ids must be [batch, seq] with seq <= max_position_embeddings="
                f"{self.config.max_position_embeddings}, got shape {tuple(input_ids.shape)}"
            )
        positions = torch.arange(input_ids.shape[1], device=input_ids.device) + POSITION_OFFSET
        x = self.project_in(self.embed(input_ids)) + self.pos_embed(positions)
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


def hf_checkpoint_mapping(model: OPT) -> list[TensorMapping]:
    """Where each parameter of ``model`` lives in a Hugging Face ``OPTForCausalLM`` checkpoint."""
    d = model.config.hidden_size
    top = {"embed": "embed_tokens", "project_in": "project_in", "pos_embed": "embed_positions",
           "final_norm.norm": "final_layer_norm", "final_norm.project_out": "project_out"}
    in_block = {"attn_norm": "self_attn_layer_norm", "attn.o_proj": "self_attn.out_proj",
                "mlp_norm": "final_layer_norm", "mlp.up_proj": "fc1", "mlp.down_proj": "fc2"}
    mappings = []
    for name, _ in model.named_parameters():
        module, kind = name.rsplit(".", 1)
        if module == "lm_head":
            mappings.append(same(name, f"lm_head.{kind}"))
        elif not module.startswith("blocks."):
            mappings.append(same(name, f"model.decoder.{top[module]}.{kind}"))
        else:
            _, i, sub = module.split(".", 2)
            prefix = f"model.decoder.layers.{i}."
            if sub == "attn.qkv_proj":
                mappings.append(fused(name, [f"{prefix}self_attn.{p}_proj.{kind}" for p in "qkv"], [d, d, d]))
            else:
                mappings.append(same(name, f"{prefix}{in_block[sub]}.{kind}"))
    return mappings
