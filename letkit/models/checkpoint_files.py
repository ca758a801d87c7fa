"""Reading a Hugging Face checkpoint directory safely: its file names, its JSON files, and its safetensors weights
(one file or shards listed in an index), never unpickling anything. :mod:`letkit.models.hub` builds models from
what this module reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
TOKENIZER_NAME = "tokenizer.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded completely and safely."""


def read_json(path: Path) -> Any:
    """The JSON value in ``path``; CheckpointError naming the file if it is not UTF-8 JSON."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def _find_weight_files(directory: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The safetensors files of the checkpoint and, if sharded, the index's tensor -> file map."""
    index_path = directory / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(
            isinstance(name, str) and isinstance(file, str) for name, file in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: 'weight_map' must be an object mapping tensor names to shard file names, got "
                f"{type(weight_map).__name__ if weight_map is not None else 'none'}"
            )
        for name, file in weight_map.items():
            # Checked on the name, not the resolved path: shards may be symlinks (the Hugging Face cache's are).
            shard = Path(file)
            if shard.is_absolute() or ".." in shard.parts:
                raise CheckpointError(
                    f"{index_path} maps tensor {name} to {file!r}, a path outside the checkpoint directory "
                    f"{directory}: refused (shard names must be relative and stay inside it)"
                )
        return [directory / name for name in sorted(set(weight_map.values()))], weight_map
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME], None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} has only pickle weights ({', '.join(pickles)}) and letkit never unpickles files (loading "
            "a pickle can run arbitrary code). Convert once, in an environment you trust: "
            f"`transformers.AutoModelForCausalLM.from_pretrained({str(directory)!r}).save_pretrained(OUT_DIR, "
            "safe_serialization=True)`, or `safetensors.torch.save_file(torch.load(FILE, weights_only=True), "
            "'model.safetensors')`"
        )
    raise FileNotFoundError(f"no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} in {directory}")


class SafetensorsReader:
    """Lazy, read-only view of one checkpoint's tensors spread over one or more safetensors files (only the
    headers are read up front)."""

    def __init__(self, directory: Path) -> None:
        files, weight_map = _find_weight_files(directory)
        index_path = directory / WEIGHTS_INDEX_NAME
        self.handles: dict[str, Any] = {}  # tensor name -> open safe_open handle
        self.files: dict[str, Path] = {}  # tensor name -> file
        self.stored_names: dict[str, str] = {}  # tensor name -> name inside the file (see `rename`)
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index_path} lists shard {file.name}, which does not exist in {file.parent}")
            try:
                handle = safe_open(file, framework="pt")
            except Exception as e:  # safetensors raises its own SafetensorError (and OSError)
                raise CheckpointError(f"{file} is not a readable safetensors file (truncated or corrupt?): {e}") from e
            for name in handle.keys():
                if name in self.files:
                    raise CheckpointError(f"tensor {name} is stored twice, in {self.files[name]} and {file}")
                self.handles[name], self.files[name], self.stored_names[name] = handle, file, name
        for name, file_name in (weight_map or {}).items():
            if self.files.get(name) != directory / file_name:
                raise CheckpointError(f"{index_path} maps tensor {name} to {file_name}, which does not contain it")
        self.description = ", ".join(str(f) for f in files)

    def check_layer_count(self, num_layers: int, config_path: Path) -> None:
        """CheckpointError unless the checkpoint can hold ``num_layers`` blocks (each stores at least one tensor):
        run before building the model, whose module tree grows with the layer count whatever the device."""
        if num_layers > len(self.files):
            raise CheckpointError(
                f"{config_path} asks for {num_layers} layers (num_hidden_layers), but {self.description} holds only "
                f"{len(self.files)} tensors, at least one per layer: the config does not match the weights"
            )

    def rename(self, old: str, new: str) -> None:
        """Look tensor ``old`` up as ``new`` from now on (its name inside the file stays)."""
        for table in (self.handles, self.files, self.stored_names):
            table[new] = table.pop(old)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name``, read from the file's header."""
        return tuple(self.handles[name].get_slice(self.stored_names[name]).get_shape())

    def get(self, name: str) -> Tensor:
        """The tensor ``name``; CheckpointError if it cannot be read or holds NaN/Inf values."""
        try:
            tensor = self.handles[name].get_tensor(self.stored_names[name])
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {self.stored_names[name]} from {self.files[name]}: {e}") from e
        check_finite_weights(tensor, f"tensor {self.stored_names[name]} in {self.files[name]}")
        return tensor


def check_finite_weights(tensor: Tensor, what: str) -> None:
    """CheckpointError naming ``what`` (the tensor and its file) if the floating ``tensor`` holds NaN/Inf."""
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(f"{what} holds {bad} NaN/Inf value(s) of {tensor.numel()}: the checkpoint is corrupt")


def name_listing(names: list[str]) -> str:
    """The first few of ``names`` and how many there are, for error messages."""
    return f"{names[:8]}{' ...' if len(names) > 8 else ''} ({len(names)} in all)"

