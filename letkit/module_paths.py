"""Finding a model's transformer blocks, final norm and submodules by path, and the hidden state in what a module
returns, for any ``nn.Module``."""

from __future__ import annotations

import difflib
from collections.abc import Mapping

from torch import Tensor, nn

FINAL_NORM_NAMES = ("final_norm", "norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)`` with an error that lists the closest valid module paths."""
    names = [name for name, _ in model.named_modules() if name]
    if path not in names:
        close = difflib.get_close_matches(path, names, n=8, cutoff=0.4) or names[:8]
        raise ValueError(f"module path {path!r} does not exist in {type(model).__name__}; closest valid paths: {close}")
    return model.get_submodule(path)


def _as_block_list(module: nn.Module) -> nn.ModuleList | None:
    if isinstance(module, nn.ModuleDict):
        return nn.ModuleList(module.values())
    return module if isinstance(module, nn.ModuleList) else None


def find_block_list(model: nn.Module, path: str | None = None) -> tuple[str, nn.ModuleList]:
    """The model's list of transformer blocks and its path.

    With ``path`` given, that submodule (it must be an ``nn.ModuleList``). Otherwise the outermost non-empty
    ``nn.ModuleList`` whose entries all share one type: ``blocks`` in letkit's models, ``model.layers`` in
    transformers' Llama, ``gpt_neox.layers``, ``model.decoder.layers``, ``transformer.h``, ... Lists nested in
    another candidate's entries (a mixture-of-experts block's ``experts``) are never chosen, and lists of leaf
    modules (e.g. ``nn.Linear`` heads) only when there is no list of composite blocks. When several candidates
    remain (an encoder and a decoder, a vision tower and a language model), a ValueError lists them: pass
    ``block_list=`` (the argument of :class:`~letkit.TeacherFeatureExtractor` and :class:`~letkit.LETObjective`).
    An ``nn.ModuleDict`` of blocks (torchtitan's ``layers``) counts as the list of its values, in order.
    """
    interface_blocks = getattr(model, "blocks", None)  # letkit's model interface (may alias a nested list)
    if path is None and isinstance(interface_blocks, nn.ModuleList):
        path = next((name for name, module in model.named_modules() if module is interface_blocks), None)
    if path is not None:
        blocks = _as_block_list(get_submodule(model, path))
        if blocks is None:
            raise ValueError(f"block list {path!r} must be an nn.ModuleList (or nn.ModuleDict), got "
                             f"{type(get_submodule(model, path)).__name__}")
        return path, blocks
    candidates = [
        (name, blocks)
        for name, blocks in ((name, _as_block_list(module)) for name, module in model.named_modules())
        if blocks is not None and len(blocks) > 0 and len({type(m) for m in blocks}) == 1
    ]
    outermost = [(name, m) for name, m in candidates if not any(name.startswith(other + ".") for other, _ in candidates)]
    composite = [(name, m) for name, m in outermost if any(True for _ in m[0].children())]
    plausible = composite or outermost
    if len(plausible) == 1:
        return plausible[0]
    if not plausible:
        raise ValueError(
            f"could not find a list of transformer blocks (an nn.ModuleList) in {type(model).__name__}: "
            "pass the block list's module path as block_list="
        )
    described = ", ".join(f"{name!r} ({len(m)} x {type(m[0]).__name__})" for name, m in plausible)
    raise ValueError(
        f"{type(model).__name__} has several lists of blocks that could be its transformer blocks: {described}. "
        f"Pass the one to use as block_list=, e.g. block_list={plausible[0][0]!r}"
    )


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


def module_output_tensor(output: object) -> Tensor | None:
    """The hidden state in what a module returned: the tensor itself, or the first item of a tuple/list when that
    is a tensor (transformers' blocks return ``(hidden_states, ...)``); None for anything else."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    return output if isinstance(output, Tensor) else None


def describe_output(output: object) -> str:
    """A short description of a module's return value for error messages (``"a dict with keys ['x', 'aux']"``)."""
    if output is None:
        return "None"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {list(output)[:8]}"
    if isinstance(output, (tuple, list)):
        items = ", ".join(type(item).__name__ for item in output[:4]) + (", ..." if len(output) > 4 else "")
        return f"a {type(output).__name__} of ({items})"
    return f"a {type(output).__name__}"
