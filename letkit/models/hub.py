"""Load Hugging Face checkpoints as letkit models (and save letkit models as such checkpoints), without
``transformers`` and without ever unpickling a file.

A checkpoint is a local directory with ``config.json`` and ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``), optionally ``tokenizer.json``; or a hub name (``org/name``) already in the local
Hugging Face cache (:func:`resolve_pretrained`; nothing is ever downloaded). ``config.json``'s ``model_type`` picks
the family: llama / mistral / qwen2 -> :mod:`letkit.models.llama`, gpt_neox -> :mod:`letkit.models.gpt_neox`,
opt -> :mod:`letkit.models.opt`, gpt2 -> :mod:`letkit.models.gpt2`. Every other model_type is loaded with
``transformers`` (if installed) and wrapped in :class:`TransformersModel`.

Loading is all-or-nothing, in both paths: a missing, unexpected or wrongly shaped tensor, a NaN/Inf weight, an
unreadable file, a config that does not fit the weights, or an index naming a file outside the directory raises
:class:`CheckpointError` naming the file and the tensor or field. The config is checked against the checkpoint's
tensor list before any module is built, so a config.json asking for a billion layers fails at once.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from letkit.atomic import atomic_directory, remove_stale_temporaries
from letkit.models import gpt2, gpt_neox, llama, opt
from letkit.models.base import ModelOutput, TensorMapping, materialize
from letkit.models.checkpoint_files import (
    CONFIG_NAME,
    TOKENIZER_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    SafetensorsReader,
    check_finite_weights,
    name_listing,
    read_json,
)
from letkit.models.hub_cache import resolve_pretrained


@dataclass(frozen=True)
class Family:
    """How one architecture family is read from / written to Hugging Face checkpoints."""

    name: str
    config_cls: type
    model_cls: type[nn.Module]
    mapping: Callable[[Any], list[TensorMapping]]
    base_prefix: str  # prefix of the base model's tensors in a *ForCausalLM checkpoint ("model." ...)
    head: str  # the LM head tensor
    ignored: str | None = None  # regex of checkpoint buffers that hold no weights (causal masks, rotary caches)


_LLAMA = Family("llama", llama.LlamaConfig, llama.Llama, llama.hf_checkpoint_mapping, "model.", "lm_head.weight",
                r"rotary_emb\.inv_freq$")
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gpt_neox": Family("gpt_neox", gpt_neox.GPTNeoXConfig, gpt_neox.GPTNeoX, gpt_neox.hf_checkpoint_mapping,
                       "gpt_neox.", "embed_out.weight", r"attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
    "opt": Family("opt", opt.OPTConfig, opt.OPT, opt.hf_checkpoint_mapping, "model.", "lm_head.weight"),
    "gpt2": Family("gpt2", gpt2.GPT2Config, gpt2.GPT2, gpt2.hf_checkpoint_mapping, "transformer.", "lm_head.weight",
                   r"attn\.(bias|masked_bias)$"),
}
"""Hugging Face ``model_type`` -> letkit family loaded without ``transformers``."""


@dataclass
class PretrainedModel:
    """What :func:`load_pretrained` returns.

    Attributes:
        model: the model, in eval mode, with the interface of :mod:`letkit.models.base`.
        tokenizer: ``tokenizers.Tokenizer`` from ``tokenizer.json``, or None if the directory has none.
        config: the raw ``config.json`` dict.
        family: the letkit family ("llama", "gpt_neox", "opt", "gpt2"), or "transformers" for the fallback.
    """

    model: nn.Module
    tokenizer: Any
    config: dict[str, Any]
    family: str


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    revision: str | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> PretrainedModel:
    """Load the checkpoint in directory ``path``, or hub model ``path`` from the local cache (see the module
    docstring).

    Args:
        path: local checkpoint directory, or a hub name (``"org/name"``) already downloaded into the Hugging Face
            cache (:func:`resolve_pretrained`).
        revision: for hub names: branch, tag or commit (None: ``main``).
        dtype: parameter dtype; None keeps float32 whatever the checkpoint stores.
        device: where the parameters live; None means CPU. Tensors are copied one at a time, so peak host memory
            stays near one tensor when loading onto a GPU.

    Raises:
        FileNotFoundError: ``path`` is neither a directory nor a cached hub model, or has no config.json or weights.
        CheckpointError: only pickle weights (``*.bin``...), an unreadable, corrupt or truncated file, a missing /
            unexpected / mis-shaped / non-finite tensor, a shard path outside the directory, or an invalid or
            unsupported config.
    """
    directory = resolve_pretrained(path, revision=revision)
    config_path = directory / CONFIG_NAME
    if not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
    hf_config = read_json(config_path)
    if not isinstance(hf_config, dict):
        raise CheckpointError(f"{config_path} must hold a JSON object, got a {type(hf_config).__name__}")
    if not isinstance(hf_config.get("model_type"), str):
        raise CheckpointError(f"{config_path} has no model_type (a string), got {hf_config.get('model_type')!r}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {dtype!r}")
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    reader = SafetensorsReader(directory)
    family = FAMILIES.get(hf_config["model_type"])
    if family is None:
        model = _load_with_transformers(directory, hf_config, reader, dtype, device)
    else:
        model = _load_family(family, directory, hf_config, reader, dtype, device)
    family_name = family.name if family else "transformers"
    return PretrainedModel(model.eval(), _load_tokenizer(directory), hf_config, family_name)


def save_pretrained(model: nn.Module, path: str | os.PathLike[str], *, tokenizer: Any = None) -> Path:
    """Write ``model`` as a Hugging Face checkpoint directory: ``config.json`` (HF keys; model_type llama for the
    target), ``model.safetensors`` (HF tensor names, tied LM head stored once) and, if given, ``tokenizer.json``.

    The directory is written under a temporary name next to ``path`` and renamed into place
    (:func:`letkit.atomic.atomic_directory`), so ``path`` never holds a half-written checkpoint; temporaries that
    killed saves left in the same parent directory are removed first. ``path`` must not exist yet (or be an empty
    directory). ``model`` may be wrapped by ``torch.compile``. Returns the checkpoint directory.
    """
    model = getattr(model, "_orig_mod", model)  # unwrap torch.compile
    target = Path(path)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"save_pretrained path={str(target)!r} exists and is not an empty directory")
    if tokenizer is not None and not hasattr(tokenizer, "to_str"):
        raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
    family = None if isinstance(model, TransformersModel) else _family_of(model)
    remove_stale_temporaries(target.parent, recursive=False)
    with atomic_directory(target) as tmp:
        if family is None:
            model.hf_model.save_pretrained(tmp, safe_serialization=True)
        else:
            dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
            hf_config = {**model.config.to_hf(), "torch_dtype": dtype}
            tensors = {}
            for m in family.mapping(model):
                param = model.get_parameter(m.name).detach()
                tensors.update((name, t.contiguous().cpu()) for name, t in zip(m.hf_names, m.split(param)))
            save_file(tensors, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            (tmp / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            (tmp / TOKENIZER_NAME).write_text(tokenizer.to_str())
            _write_tokenizer_config(tmp, tokenizer, model)
    return target


def _write_tokenizer_config(directory: Path, tokenizer: Any, model: nn.Module) -> None:
    """``tokenizer_config.json`` (and ``generation_config.json``) naming the end-of-text token, which
    transformers' AutoTokenizer cannot infer from ``tokenizer.json`` and lm-evaluation-harness needs."""
    from letkit.data.shards import EOS_CANDIDATES

    eos = next((t for t in EOS_CANDIDATES if tokenizer.token_to_id(t) is not None), None)
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    max_positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if max_positions:
        config["model_max_length"] = max_positions
    if eos is not None:
        config.update(eos_token=eos, bos_token=eos)
        generation = {"bos_token_id": tokenizer.token_to_id(eos), "eos_token_id": tokenizer.token_to_id(eos)}
        (directory / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _family_of(model: nn.Module) -> Family:
    for family in FAMILIES.values():
        if type(model) is family.model_cls:
            return family
    raise TypeError(f"save_pretrained supports {sorted({f.model_cls.__name__ for f in FAMILIES.values()})} and "
                    f"TransformersModel, got {type(model).__name__}")


def _load_family(
    family: Family,
    directory: Path,
    hf_config: dict[str, Any],
    reader: SafetensorsReader,
    dtype: torch.dtype,
    device: torch.device,
) -> nn.Module:
    config_path = directory / CONFIG_NAME
    try:
        config = family.config_cls.from_hf(hf_config)
    except KeyError as e:
        raise CheckpointError(f"{config_path} lacks key {e} needed for model_type {family.name}") from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{config_path}: {e}") from e
    reader.check_layer_count(config.num_hidden_layers, config_path)
    with torch.device("meta"):
        model = family.model_cls(config).to(dtype)
    mappings = family.mapping(model)

    # Checkpoints of the bare base model (GPT-2's original files, OPTModel...) lack the *ForCausalLM prefix.
    if not any(name.startswith(family.base_prefix) for name in reader.files):
        for name in [n for n in reader.files if n != family.head]:
            reader.rename(name, family.base_prefix + name)

    needed = {hf_name: m.name for m in mappings for hf_name in m.hf_names}
    tied_head = family.head not in needed and family.head in reader.files
    missing = [name for name in needed if name not in reader.files]
    if missing:
        raise CheckpointError(
            f"{reader.description}: missing tensor(s) {name_listing(missing)} needed for the {family.name} config in "
            f"{config_path}"
        )
    unexpected = [n for n in reader.files if n not in needed and not (tied_head and n == family.head)
                  and not (family.ignored and re.search(family.ignored, n))]
    if unexpected:
        raise CheckpointError(
            f"unexpected tensor(s) {name_listing(unexpected)} in {reader.description}: the checkpoint does not match its "
            f"{CONFIG_NAME} (model_type {hf_config.get('model_type')!r})"
        )
    for m in mappings:
        for hf_name, expected in zip(m.hf_names, m.split(model.get_parameter(m.name))):
            if reader.shape(hf_name) != tuple(expected.shape):
                raise CheckpointError(
                    f"tensor {hf_name} in {reader.files[hf_name]} has shape {list(reader.shape(hf_name))}, expected "
                    f"{list(expected.shape)} from {config_path}"
                )

    materialize(model, device)
    with torch.no_grad():
        for m in mappings:
            model.get_parameter(m.name).copy_(m.join([reader.get(name) for name in m.hf_names]))
    if tied_head:
        embed_name = next(m.hf_names[0] for m in mappings if m.name == "embed.weight")
        if not torch.equal(reader.get(family.head), reader.get(embed_name)):
            raise CheckpointError(
                f"{reader.files[family.head]} has a {family.head} that differs from {embed_name}, but "
                f"{CONFIG_NAME} says tie_word_embeddings=true"
            )
    return model


def _load_tokenizer(directory: Path) -> Any:
    if not (directory / TOKENIZER_NAME).is_file():
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(directory / TOKENIZER_NAME))


class TransformersModel(nn.Module):
    """A ``transformers`` causal LM (for model types letkit has no file for) behind the letkit model interface.

    ``blocks`` is the model's ModuleList of ``num_hidden_layers`` decoder layers; ``final_norm`` its final norm
    (looked up under the usual names, ``nn.Identity()`` if none). Unlike letkit blocks, a ``transformers`` layer
    may return a tuple whose first element is the hidden state.
    """

    _FINAL_NORM_NAMES = ("norm", "final_layer_norm", "final_layernorm", "ln_f", "norm_f", "decoder.final_layer_norm")

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf_model = hf_model
        self.config = hf_model.config
        num_layers = getattr(self.config, "num_hidden_layers", None)
        block_lists = [m for m in hf_model.modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
        if not block_lists:
            raise ValueError(
                f"cannot find the {num_layers} transformer blocks (num_hidden_layers) of {type(hf_model).__name__}"
            )
        base = getattr(hf_model, "base_model", hf_model)
        norms = [base.get_submodule(n) for n in self._FINAL_NORM_NAMES if _has_submodule(base, n)]
        # Plain attributes, not submodules: they already live inside hf_model (no duplicate state_dict entries).
        object.__setattr__(self, "blocks", block_lists[0])
        object.__setattr__(self, "final_norm", norms[0] if norms else nn.Identity())

    def forward(self, input_ids: Tensor, *, output_hidden_states: bool = False) -> Tensor | ModelOutput | None:
        """Logits [B, T, V] (None for a model without LM head); a :class:`ModelOutput` if
        ``output_hidden_states``."""
        out = self.hf_model(input_ids=input_ids, output_hidden_states=output_hidden_states, use_cache=False)
        logits = getattr(out, "logits", None)
        if not output_hidden_states:
            return logits
        return ModelOutput(logits, tuple(out.hidden_states))


def _has_submodule(module: nn.Module, name: str) -> bool:
    try:
        return module.get_submodule(name) is not None
    except AttributeError:
        return False


def _load_with_transformers(
    directory: Path, hf_config: dict[str, Any], reader: SafetensorsReader, dtype: torch.dtype, device: torch.device
) -> TransformersModel:
    model_type = hf_config["model_type"]
    config_path = directory / CONFIG_NAME
    try:
        import transformers
    except ImportError:
        raise CheckpointError(
            f"{config_path} has model_type {model_type!r}; without transformers installed letkit loads "
            f"only {sorted(FAMILIES)}"
        ) from None
    try:
        config = transformers.AutoConfig.from_pretrained(directory)
    except Exception as e:  # transformers' config classes raise assorted errors of their own
        raise CheckpointError(f"{config_path}: transformers {transformers.__version__} cannot read it: {e}") from e
    num_layers = getattr(config, "num_hidden_layers", None)
    if isinstance(num_layers, int):
        reader.check_layer_count(num_layers, config_path)
    # A causal LM if the checkpoint holds one completely; else the bare model (a checkpoint saved without its LM
    # head, e.g. an encoder's). Whatever transformers would initialise randomly is refused.
    failures = []
    for auto_class in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        try:
            # dtype at load time (not .to(dtype) afterwards), so transformers keeps buffers such as rotary inv_freq
            # in fp32
            hf_model, info = auto_class.from_pretrained(
                directory, config=config, use_safetensors=True, dtype=dtype, output_loading_info=True
            )
        except ValueError as e:  # no model class of this kind for the model type
            failures.append(f"{auto_class.__name__}: {e}")
            continue
        problems = [f"{kind.removesuffix('_keys')} tensor(s) {name_listing(sorted(map(str, info[kind])))}"
                    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info.get(kind)]
        problems += [str(message) for message in info.get("error_msgs") or ()]
        if not problems:
            break
        failures.append(f"as {type(hf_model).__name__}: {', '.join(problems)}")
    else:
        raise CheckpointError(
            f"{reader.description} does not hold exactly the weights of the {model_type} model described by "
            f"{config_path} (transformers would fill the gaps with random values): {'; '.join(failures)}"
        )
    for name, param in hf_model.named_parameters():
        check_finite_weights(param.detach(), f"parameter {name} loaded from {directory}")
    return TransformersModel(hf_model.to(device=device))
