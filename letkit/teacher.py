"""The frozen teacher: run a pretrained model and return the hidden states of chosen layers."""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from typing import Any, Union

import torch
from torch import Tensor, nn

from letkit.module_paths import describe_output, find_block_list, find_final_norm, get_submodule, module_output_tensor

LayerSelector = Union[int, str]
"""A block index over the model's block list (negative counts from the end) or a module path."""


class _AllLayersCaptured(Exception):
    """Raised from a hook to skip the rest of the teacher's forward pass (e.g. its LM head)."""


class TeacherFeatureExtractor:
    """Runs a frozen teacher and returns the hidden states of the requested layers.

    The model passed in is modified *in place*, not copied: construction calls ``model.requires_grad_(False)``
    and ``model.eval()`` on it, and ``dtype`` / ``device`` convert it with ``model.to(...)``. Pass
    ``copy.deepcopy(model)`` to keep training or using the original as it was. :meth:`release` drops this
    object's reference; the memory is freed once no other reference to the model remains.

    The teacher always runs under ``torch.inference_mode``; the features come back as ordinary tensors (no
    autograd history) that a loss may save for backward.

    Args:
        model: any ``nn.Module`` whose forward takes token ids (letkit's models, transformers' models, ...).
        layers: which hidden states to return, in this order. An int indexes the model's block list
            (negatives from the end); a str is a module path whose output is captured. The last block
            (``-1``) means the model's *final hidden state*: the output of its final norm when it has
            one (what transformers returns as ``hidden_states[-1]``); pass the block's module path to
            get the pre-norm output instead.
        block_list: module path of the transformer block list (found automatically when None).
        dtype, device: optional placement of the teacher (e.g. ``torch.bfloat16``, ``"cuda"``), applied to
            ``model`` in place.
        stop_early: skip the rest of the forward pass once every requested layer has been computed.
        tokenizer: the teacher's tokenizer, kept for callers that need it (e.g. cross-tokenizer LET).
        check_causal: verify once, on an 8-token probe, that the requested features at a position do not
            depend on later tokens, and refuse the teacher otherwise. A bidirectional encoder (BERT and
            its family) sees the future: pulling a causal target towards its features would train the
            target on information it cannot have at inference time.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[LayerSelector] = (-1,),
        *,
        block_list: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        stop_early: bool = True,
        tokenizer: Any = None,
        check_causal: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model.requires_grad_(False).eval()
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
        self._model: nn.Module | None = model
        self.block_list_path, self._blocks = find_block_list(model, block_list)
        self._final_norm_paths = find_final_norm(model, self.block_list_path)
        self.stop_early = stop_early
        self.tokenizer = tokenizer
        self.select_layers(layers)
        if check_causal:
            self._check_causal()

    def _check_causal(self) -> None:
        parameter = next(self.model.parameters(), None)
        device = parameter.device if parameter is not None else None
        probe = torch.zeros(1, 8, dtype=torch.long, device=device)
        changed_last = probe.clone()
        changed_last[0, -1] = 1
        for layer, before, after in zip(self.layers, self(probe), self(changed_last)):
            before, after = before[:, :-1].float(), after[:, :-1].float()
            # relative to each position's own norm, so a few huge activations cannot hide a leak elsewhere
            drift = ((before - after).norm(dim=-1) / before.norm(dim=-1).clamp_min(1e-6)).max().item()
            if drift > 1e-3:
                raise ValueError(
                    f"the teacher {type(self.model).__name__} is not causal: its layer {layer!r} features at earlier "
                    f"positions change (by up to {drift:.3g} of their norm) when only the last token changes. A bidirectional "
                    "teacher (e.g. a BERT-family encoder) sees future tokens, and aligning a causal target to it "
                    "leaks them. Use a causal (decoder-only) teacher, or pass check_causal=False if you know better."
                )

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        layers: Sequence[LayerSelector] = (-1,),
        *,
        revision: str | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        stop_early: bool = True,
        check_causal: bool = True,
    ) -> TeacherFeatureExtractor:
        """Load a Hugging Face-layout checkpoint directory (config.json + safetensors), or a hub name such as
        ``"HuggingFaceTB/SmolLM-135M"`` already in the local Hugging Face cache (``revision``: its branch, tag or
        commit), as a teacher.

        Supported families load natively (no transformers needed); see :func:`letkit.models.load_pretrained`.
        """
        from letkit.models import load_pretrained

        loaded = load_pretrained(path, revision=revision, dtype=dtype, device=device)
        return cls(loaded.model, layers, stop_early=stop_early, tokenizer=loaded.tokenizer, check_causal=check_causal)

    @property
    def num_layers(self) -> int:
        """Number of blocks in the teacher's block list."""
        return len(self._blocks)

    @property
    def released(self) -> bool:
        """True once :meth:`release` dropped the model; calling the extractor then raises."""
        return self._model is None

    @property
    def model(self) -> nn.Module:
        """The frozen teacher module (the one passed in); RuntimeError once released."""
        if self._model is None:
            raise RuntimeError("the teacher was released (release() was called): it cannot run any more")
        return self._model

    def select_layers(self, layers: Sequence[LayerSelector]) -> None:
        """Choose which hidden states calls return (same rules as the constructor's ``layers``)."""
        if isinstance(layers, (int, str)):
            layers = [layers]
        if not layers:
            raise ValueError("layers must name at least one layer")
        modules = []
        n = self.num_layers
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, str)):
                raise TypeError(f"a layer is an int block index or a str module path, got {layer!r}")
            if isinstance(layer, str):
                modules.append(get_submodule(self.model, layer))
                continue
            if not -n <= layer < n:
                raise ValueError(
                    f"teacher layer index {layer} does not exist: the block list {self.block_list_path!r} has {n} blocks "
                    f"(valid indices {-n} .. {n - 1}), or pass a module path"
                )
            if layer % n == n - 1 and len(self._final_norm_paths) > 1:
                raise ValueError(
                    f"teacher layer {layer} means the final hidden state, but {type(self.model).__name__} has several "
                    f"final-norm candidates {self._final_norm_paths}: pass the module path of the one to use"
                )
            if layer % n == n - 1 and self._final_norm_paths:
                modules.append(self.model.get_submodule(self._final_norm_paths[0]))
            else:
                modules.append(self._blocks[layer])
        self.layers = list(layers)
        self._modules = modules

    def feature_dims(self, input_ids: Tensor) -> list[int]:
        """Hidden size of each requested layer (runs the teacher once on ``input_ids``)."""
        return [f.shape[-1] for f in self(input_ids)]

    def __call__(self, input_ids: Tensor, **forward_kwargs: Any) -> list[Tensor]:
        """Hidden states ``[B, T, d]`` of the requested layers for ``input_ids`` ``[B, T]``."""
        model = self.model
        captured: dict[int, Tensor] = {}
        wanted = {id(m) for m in self._modules}

        def capture(module: nn.Module, args: Any, output: Any) -> None:
            hidden = module_output_tensor(output)
            if hidden is None:
                layers = [layer for layer, m in zip(self.layers, self._modules) if m is module]
                path = next(name for name, m in model.named_modules() if m is module)
                raise TypeError(
                    f"teacher layer {layers[0]!r} (module {path!r}, {type(module).__name__}) returned "
                    f"{describe_output(output)}, not a tensor or a tuple/list whose first item is one: pass the module "
                    f"path of the submodule whose output is the hidden state instead, e.g. layers=[{path + '.<child>'!r}]"
                )
            captured[id(module)] = hidden
            if self.stop_early and wanted.issubset(captured):
                raise _AllLayersCaptured

        handles = [m.register_forward_hook(capture) for m in set(self._modules)]
        try:
            with torch.inference_mode():
                model(input_ids, **forward_kwargs)
        except _AllLayersCaptured:
            pass
        finally:
            for h in handles:
                h.remove()
        missing = [layer for layer, m in zip(self.layers, self._modules) if id(m) not in captured]
        if missing:
            raise RuntimeError(f"the teacher's forward pass never ran the modules of layers {missing}")
        # Inference tensors cannot be saved for backward; a clone outside inference mode is an ordinary tensor.
        return [captured[id(m)].clone() for m in self._modules]

    def release(self) -> None:
        """Drop the teacher model and free its memory (LET is done with it after S_stop)."""
        if self._model is None:
            return
        self._model = None
        self._blocks = nn.ModuleList()
        self._modules = []
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def __repr__(self) -> str:
        state = "released" if self.released else type(self._model).__name__
        return f"TeacherFeatureExtractor({state}, layers={self.layers}, blocks={self.block_list_path!r})"
