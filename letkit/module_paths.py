"""Finding a model's transformer blocks, final norm and submodules by path, for any ``nn.Module``."""

from __future__ import annotations

import difflib

from torch import nn

FINAL_NORM_NAMES = ("final_norm", "norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the closest valid module paths."""
    names = [name for name, _ in model.named_modules() if name]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=8, cutoff=0.4) or names[:8]
        raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}; closest valid paths: {close}")
    return model.get_submodule(path)


def find_block_list(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its path.

    With ``path`` given, that submodule (it must be an ``nn.ModuleList``). Otherwise the longest
    ``nn.ModuleList`` whose entries all share one type: ``blocks`` in letkit's models, ``model.layers``
    in transformers' Llama, ``gpt_neox.layers``, ``model.decoder.layers``, ``transformer.h``, ...
    """
    interface_blocks = getattr(model, "blocks", None)  # letkit's model interface (may alias a nested list)
    if path is None and isinstance(interface_blocks, nn.ModuleList):
        path = next((name for name, module in model.named_modules() if module is interface_blocks), None)
    if path is not None:
        blocks = get_submodule(model, path)
        if not isinstance(blocks, nn.ModuleList):
            raise ValueError(f"block list {path!r} must be an nn.ModuleList, got {type(blocks).__name__}")
        return path, blocks
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"could not find a list of transformer blocks (an nn.ModuleList) in {type(model).__name__}: "
            "pass the block list's module path explicitly"
        )
    return max(candidates, key=lambda c: len(c[1]))


def find_final_norm(model: nn.Module, block_list_path: str) -> list[str]:
    """Candidate paths of the model's final normalisation (applied after the last block).

    letkit's model interface names it ``final_norm`` (``nn.Identity`` when the architecture has none:
    then there is no candidate). Otherwise: the modules named like ``norm``/``ln_f``/``final_layer_norm``/
    ``final_layernorm``/``norm_f`` outside the block list. An empty list means the model has none.
    """
    final_norm = getattr(model, "final_norm", None)
    if isinstance(final_norm, nn.Module):
        if isinstance(final_norm, nn.Identity):
            return []
        return [name for name, module in model.named_modules() if module is final_norm][:1]
    return [
        name
        for name, module in model.named_modules()
        if name.rsplit(".", 1)[-1] in FINAL_NORM_NAMES
        and not name.startswith(block_list_path + ".")
        and not isinstance(module, nn.Identity)
    ]
