"""``letkit export``: a DCP training checkpoint of examples/pretrain_fsdp.py -> a Hugging Face checkpoint directory.

The result (``config.json``, ``model.safetensors``, ``tokenizer.json``) loads with
``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` and :func:`letkit.models.load_pretrained`, so any
step of a run can be evaluated (``letkit eval``) or serve as the teacher of a larger run.

The checkpoint may come from any number of ranks: DCP reassembles the shards in one process, no process group
needed. Only the target model's tensors are read (not the optimizer state, not a learned projector). DCP keeps its
index in ``.metadata``, a pickle: export only checkpoints you (or your own jobs) wrote.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from letkit.checkpointing import checkpoint_problem
from letkit.models import from_preset, save_pretrained
from letkit.models.hub import CheckpointError

__all__ = ["export_checkpoint"]

TARGET_PREFIX = "model.model."
"""Where examples/pretrain_fsdp.py's checkpoints keep the target: state ``"model"`` of ModuleDict entry ``"model"``."""


def export_checkpoint(
    checkpoint: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    tokenizer: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.bfloat16,
    overwrite: bool = False,
) -> Path:
    """Write the target model of a training checkpoint (``RUN_DIR/checkpoints/step_N``) to ``out_dir`` in Hugging
    Face layout.

    Args:
        checkpoint: a complete DCP checkpoint directory written by examples/pretrain_fsdp.py.
        out_dir: the directory to create. It appears only once complete: an interrupted export leaves nothing
            under that name (only a hidden ``.tmp-*`` sibling, removed by the next export into the same parent).
        tokenizer: the ``tokenizer.json`` to ship; default: the copy kept with the run's token shards
            (``<data.path>/tokenizer.json`` from the run's config), if it exists.
        dtype: dtype of the saved weights (training keeps float32 master weights).
        overwrite: replace an existing ``out_dir`` (atomically: the old one is removed only after the new one is
            in place). Without it an existing ``out_dir`` is refused.

    Returns:
        ``out_dir``.

    Raises:
        CheckpointError: the checkpoint is incomplete, damaged (a file's size or SHA-256 differs from what
            trainer_state.json recorded at save time: the error names the file), or its tensors do not fit the
            model its config describes; FileExistsError: ``out_dir`` exists and ``overwrite`` is False.

    Memory: the whole model is assembled in float32 on the CPU (4 bytes per parameter: ~5.5 GB for 1.4B).
    """
    import torch.distributed.checkpoint as dcp

    from letkit.atomic import remove_stale_temporaries, replace_directory

    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"out_dir {str(out_dir)!r} exists: pass overwrite=True (--overwrite) to replace it")
    trainer_state = _read_trainer_state(checkpoint)
    try:
        metadata = dcp.FileSystemReader(str(checkpoint)).read_metadata()
    except Exception as e:  # noqa: BLE001 - DCP raises assorted errors (pickle, EOF, assertions) on a damaged index
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: cannot read its DCP index .metadata ({e!r})") from e
    stored = {k.removeprefix(TARGET_PREFIX): v for k, v in metadata.state_dict_metadata.items() if k.startswith(TARGET_PREFIX)}
    model = _build_target(checkpoint, trainer_state, stored)
    state = model.state_dict()
    _check_tensors(checkpoint, state, stored)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load({"model": {"model." + name: t for name, t in state.items()}}, checkpoint_id=str(checkpoint),
                     no_dist=True)
    except Exception as e:  # noqa: BLE001 - a damaged shard surfaces as one of several error types
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: reading its tensors failed ({e!r})") from e
    tok = _tokenizer(trainer_state, tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir.parent, recursive=False)  # its siblings: the parent may hold other live trees
    staging = out_dir.with_name(f".tmp-{out_dir.name}-{os.getpid()}-new")
    save_pretrained(model.to(dtype), staging, tokenizer=tok)
    replace_directory(staging, out_dir)
    return out_dir


def _read_trainer_state(checkpoint: Path) -> dict:
    if not checkpoint.is_dir():
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is not a directory")
    problem = checkpoint_problem(checkpoint)  # every file's size and SHA-256, before DCP reads (unpickles) any
    if problem:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} is incomplete or damaged: {problem}")
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    try:
        state["config"]["model"]["preset"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: trainer_state.json is not from "
                              f"examples/pretrain_fsdp.py (no config.model.preset: {e!r})") from e
    if "sha256" not in state:
        warnings.warn(f"checkpoint {str(checkpoint)!r} records no checksums (an older letkit wrote it): only its file "
                      "sizes were checked", stacklevel=3)
    return state


def _build_target(checkpoint: Path, trainer_state: dict, stored: dict) -> nn.Module:
    preset = trainer_state["config"]["model"]["preset"]
    embed = stored.get("embed.weight")
    if embed is None:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r} holds no target model tensors "
                              f"(no {TARGET_PREFIX}embed.weight)")
    try:
        return from_preset(preset, vocab_size=embed.size[0])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(checkpoint)!r}: cannot build its model (preset {preset!r}): {e}") from e


def _check_tensors(checkpoint: Path, state: dict, stored: dict) -> None:
    missing = sorted(set(state) - set(stored))
    unexpected = sorted(set(stored) - set(state))
    mismatched = [f"{k}: checkpoint {tuple(stored[k].size)}, model {tuple(state[k].shape)}"
                  for k in sorted(set(state) & set(stored)) if tuple(stored[k].size) != tuple(state[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"checkpoint {str(checkpoint)!r} does not hold the model its config describes: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}, "
            f"shape mismatches {mismatched[:5]}")


def _tokenizer(trainer_state: dict, tokenizer: str | os.PathLike | None):
    from tokenizers import Tokenizer

    if tokenizer is None:
        data_path = str(trainer_state["config"].get("data", {}).get("path", ""))
        if not data_path or data_path.startswith("random:") or not (Path(data_path) / "tokenizer.json").is_file():
            return None
        tokenizer = Path(data_path) / "tokenizer.json"
    try:
        return Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # noqa: BLE001 - the tokenizers library raises a bare Exception on bad files
        raise ValueError(f"tokenizer {str(tokenizer)!r} is not a readable tokenizer.json: {e}") from e
