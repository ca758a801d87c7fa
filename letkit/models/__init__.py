"""Model architectures for letkit: the Llama-style target (with presets) and teacher families loaded from
Hugging Face checkpoints. All models share the interface described in :mod:`letkit.models.base`."""

from __future__ import annotations

from torch import nn

from letkit.models.base import ModelOutput, materialize
from letkit.models.gpt2 import GPT2, GPT2Config
from letkit.models.gpt_neox import GPTNeoX, GPTNeoXConfig
from letkit.models.checkpoint_files import CheckpointError
from letkit.models.hub import PretrainedModel, TransformersModel, load_pretrained, save_pretrained
from letkit.models.hub_cache import hub_cache_dir, resolve_pretrained
from letkit.models.llama import PRESETS, Llama, LlamaConfig, from_preset
from letkit.models.opt import OPT, OPTConfig


def count_parameters(model: nn.Module, non_embedding: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once); works on the meta device.

    With ``non_embedding=True`` the token and position embedding tables and an untied LM head (the output
    embedding) are left out, as in scaling-law parameter counts.
    """
    excluded = set()
    if non_embedding:
        excluded = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None:
            excluded |= {id(p) for p in lm_head.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in excluded)


__all__ = [
    "GPT2",
    "GPT2Config",
    "GPTNeoX",
    "GPTNeoXConfig",
    "Llama",
    "LlamaConfig",
    "OPT",
    "OPTConfig",
    "PRESETS",
    "CheckpointError",
    "ModelOutput",
    "PretrainedModel",
    "TransformersModel",
    "count_parameters",
    "from_preset",
    "hub_cache_dir",
    "load_pretrained",
    "materialize",
    "resolve_pretrained",
    "save_pretrained",
]
