"""Pieces shared by the model families: the output type, activations and the checkpoint-name mapping type.

Every letkit model class follows one interface (the teacher feature extractor and the LET objective rely on it):

* ``model.blocks``: ``nn.ModuleList`` of the transformer blocks, in order. A block's forward returns a plain
  ``Tensor`` [B, T, D], so a forward hook on a block captures that block's output.
* ``model.final_norm``: the module that maps the last block's output to the final hidden state fed to the LM head
  (RMSNorm / LayerNorm; ``nn.Identity()`` where the architecture has none, e.g. OPT post-norm).
* ``model.config``: the family's config dataclass.
* ``model(input_ids, output_hidden_states=False)`` returns logits [B, T, V]; with ``output_hidden_states=True`` a
  :class:`ModelOutput` whose ``hidden_states`` follow the ``transformers`` convention: ``num_layers + 1`` entries, the
  embedding output, then the output of blocks 0 .. L-2, then ``final_norm(output of block L-1)``.
  Causal LM only: no padding mask, positions 0 .. T-1.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from letkit.validation import check_int


@dataclass
class ModelOutput:
    """Logits and per-layer hidden states of one forward pass.

    Attributes:
        logits: [B, T, V] (``None`` only for a ``transformers`` base model without an LM head).
        hidden_states: ``num_layers + 1`` tensors [B, T, D]: embedding output, outputs of blocks 0 .. L-2,
            and ``final_norm`` applied to the output of the last block.
    """

    logits: Tensor | None
    hidden_states: tuple[Tensor, ...]


def check_config_fields(config: Any) -> None:
    """TypeError (wrong type) or ValueError (out of range) naming the first field of the config dataclass
    ``config`` whose value is not of its kind; integer fields are stored as Python ints.

    In every family's config, an ``int`` field is a size or a count (an int >= 1, never a bool; see
    :func:`letkit.validation.check_int`), a ``float`` field an epsilon, a rotary base, a fraction or an init std (a
    positive, finite number), a ``bool`` a bool and a ``str`` a str; a field annotated ``... | None`` may also be
    None.
    """
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kind, *rest = (part.strip() for part in str(f.type).split("|"))
        optional = rest == ["None"]
        if kind == "int":
            setattr(config, f.name, check_int(f.name, value, minimum=1, optional=optional))
            continue
        if value is None and optional:
            continue
        error: type[Exception] = TypeError
        if kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
            expected = "a positive, finite number"
        elif kind == "float" and not (math.isfinite(value) and value > 0):
            expected, error = "a positive, finite number", ValueError
        elif kind == "bool" and not isinstance(value, bool):
            expected = "true or false"
        elif kind == "str" and not isinstance(value, str):
            expected = "a string"
        else:
            continue
        raise error(f"{f.name} must be {expected}{' or None' if optional else ''}, got {value!r}")


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


# Hugging Face activation names used by the supported checkpoints.
ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation function called ``name`` in Hugging Face configs; ValueError if unknown."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class TensorMapping:
    """Where one letkit parameter is stored in a Hugging Face checkpoint.

    Attributes:
        name: the letkit parameter name (``model.named_parameters()``).
        hf_names: the checkpoint tensors it is built from (several for fused projections).
        join: checkpoint tensors -> letkit tensor.
        split: letkit tensor -> checkpoint tensors (inverse of ``join``; also gives their expected shapes).
    """

    name: str
    hf_names: tuple[str, ...]
    join: Callable[[Sequence[Tensor]], Tensor]
    split: Callable[[Tensor], Sequence[Tensor]]


def same(name: str, hf_name: str) -> TensorMapping:
    """A parameter stored unchanged under another name."""
    return TensorMapping(name, (hf_name,), lambda ts: ts[0], lambda t: (t,))


def transposed(name: str, hf_name: str) -> TensorMapping:
    """A Linear weight stored as [in, out] (GPT-2's Conv1D layout)."""
    return TensorMapping(name, (hf_name,), lambda ts: ts[0].t(), lambda t: (t.t(),))


def fused(name: str, hf_names: Sequence[str], sizes: Sequence[int]) -> TensorMapping:
    """A fused projection whose rows (dim 0) are the concatenation of separately stored tensors."""
    sizes = tuple(sizes)
    return TensorMapping(name, tuple(hf_names), lambda ts: torch.cat(list(ts), dim=0), lambda t: t.split(sizes, dim=0))


def materialize(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Allocate (uninitialised) storage for a model built on the meta device, keeping tied parameters tied.

    ``nn.Module.to_empty`` alone gives tied weights (e.g. ``lm_head.weight is embed.weight``) separate storage.
    Call the model's ``init_weights()`` or load weights afterwards. Returns ``model``.
    """
    first_name: dict[int, str] = {}
    ties = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first_name:
            ties.append((name, first_name[id(param)]))
        else:
            first_name[id(param)] = name
    model.to_empty(device=device)
    for name, source in ties:
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
    return model


@torch.no_grad()
def init_normal_weights(model: nn.Module, std: float) -> None:
    """GPT-2-style init: Linear/Embedding weights ~ N(0, std), biases 0, LayerNorm weights 1."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
        if isinstance(module, (nn.Linear, nn.LayerNorm)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.LayerNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
