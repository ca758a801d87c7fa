"""LET pretraining of a Llama-style target with FSDP2, launched with torchrun.

    torchrun --nproc_per_node=8 examples/pretrain_fsdp.py --config 1.4b --data.path data/shards \\
        --teacher.path checkpoints/SmolLM-135M

Needs PyTorch >= 2.6 (FSDP2's public ``torch.distributed.fsdp.fully_shard``). What it does, in code order:

* Config: a TOML file (``--config tiny|1.4b|7b`` or a path) whose every field can be overridden on the command
  line as ``--section.field value``; ``--help`` lists them all with their current values.
* Target: ``letkit.models.from_preset`` built on the meta device; each block gets activation checkpointing,
  ``torch.compile`` and ``fully_shard`` (FSDP2, bf16 compute / fp32 reduce via ``MixedPrecisionPolicy``), then
  the root; ``to_empty`` + ``init_weights`` materialise only this rank's shards.
* Teacher: a frozen, replicated bf16 copy on every rank (``TeacherFeatureExtractor.from_pretrained``, or
  ``random:<shape>`` for a randomly initialised one), pulled into ``LETObjective`` with a layer map (L2E by
  default, ``--teacher.layer_map``) and a lambda schedule (any of ``letkit.SCHEDULES``, ``--teacher.schedule``); a
  learned projector is sharded like the target. The teacher is freed at S_stop (``--teacher.stop_step``) and never
  even loaded by a run resumed after S_stop. Its tokenizer must be the data's, unless ``--teacher.alignment
  last|mean`` (cross-tokenizer LET): then a background thread decodes each window to text, re-tokenizes it for
  the teacher and aligns the two (``TeacherTokenizedLoader``).
* Run directory: rank 0 holds an exclusive lock on ``run_dir`` (``letkit.checkpointing.RunDirLock``) for the whole
  run, so a second run there is refused; a lock left behind by a crashed run on this host is taken over.
* Loop: ``train_step`` is one optimizer step, to copy into your own loop: gradient accumulation (gradients
  reduce-scattered once per optimizer step, in the last micro-step's backward), clipping of the sharded gradients,
  AdamW with warmup + cosine LR, lambda(step). Rank 0 prints a progress line and appends metrics to
  ``<run_dir>/metrics.jsonl``, and to TensorBoard or Weights & Biases with ``--log.tensorboard true`` /
  ``--log.wandb true`` (optional packages).
* Evaluation (off by default): every ``--eval.every`` steps, the validation loss on ``--eval.windows`` token windows
  held out of training (the last ones of the shards), and with ``--eval.tasks`` / ``--eval.task_files``
  lm-evaluation-harness scores of a temporary bf16 export of the current weights, computed on rank 0
  (``letkit.evaluation.evaluate_checkpoint``; ``--eval.limit`` keeps it short). Records go to metrics.jsonl
  (``{"step": ..., "eval": {...}}``) and the TensorBoard / W&B sinks (``eval/...``).
* Checkpoints (``<run_dir>/checkpoints/step_XXXXXXX``, ``letkit.checkpointing``): model, optimizer and projector
  through ``torch.distributed.checkpoint`` (DCP); LR and lambda schedules, data position, RNG states and each
  file's size and SHA-256 in ``trainer_state.json``. A checkpoint is written under a ``.tmp`` name and renamed
  once complete; a run resumes from the newest checkpoint whose files all match what was written, skipping
  interrupted, damaged or altered ones with a warning, and ``checkpoint.keep`` counts only such intact
  checkpoints. A resume on another number of ranks (so another number of tokens per step) is warned about and
  recorded in metrics.jsonl. DCP's ``.metadata`` is a pickle: only resume from checkpoints your own runs wrote.
  ``letkit export`` turns any of them into a Hugging Face checkpoint directory.
* Export: at the end, rank 0 gathers the model and writes ``<run_dir>/final_model`` (bf16 safetensors, Hugging Face
  layout, with the data's ``tokenizer.json`` when it has one) for ``letkit.models.load_pretrained`` -- e.g. as the
  teacher of a larger run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import inspect
import json
import logging
import math
import os
import re
import resource
import shutil
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from tokenizers import Tokenizer

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip install tomli
    import tomli as tomllib

from letkit import (LOSS_KINDS, PROJECTOR_KINDS, SCHEDULES, LambdaSchedule, LayerMap, LETObjective,
                    TeacherFeatureExtractor, check_teacher_compatibility)
from letkit.atomic import atomic_write_bytes, atomic_write_json, remove_stale_temporaries
from letkit.checkpointing import (find_checkpoint, load_checkpoint, locked_run_dir, prune_checkpoints,
                                  save_checkpoint)
from letkit.data import ShardedTokenLoader
from letkit.evaluation import evaluate_checkpoint, local_choice_task
from letkit.hardware import datasheet_peaks
from letkit.models import PRESETS, Llama, LlamaConfig, from_preset, resolve_pretrained, save_pretrained
from letkit.optim import warmup_cosine_lr, weight_decay_groups
from letkit.token_alignment import ALIGNMENT_MODES, TeacherTokenizedLoader

log = logging.getLogger("pretrain")
CONFIG_DIR = Path(__file__).parent / "configs"
DEFAULT_CONFIG = "tiny"


# ----------------------------------------------------------------------------------------------------- config


def _keyword_arguments(cls: type) -> str:
    return ", ".join(p.name for p in inspect.signature(cls).parameters.values() if p.kind is p.KEYWORD_ONLY)


@dataclass
class ModelConfig:
    preset: str = field(default="tiny", metadata={"help": "letkit.models preset of the target (tiny, 125m, 1.4b, 7b)"})
    vocab_size: int = field(default=0, metadata={"help": "0: the data's vocabulary size"})


@dataclass
class TeacherConfig:
    path: str = field(default="none", metadata={
        "help": "teacher checkpoint dir, or hub name (org/name) read offline from the Hugging Face cache; "
                "'random:<shape>[,field=value...]' for a random one (shapes: "
                "smollm-135m or a letkit.models preset); 'none' trains the baseline without LET"})
    layer_map: str = field(default="L2E", metadata={"help": "comma-separated LayerMap specs (L2E, L2M, 0.25, ...)"})
    projector: str = field(default="interpolate", metadata={"help": "interpolate (paper), linear or mlp"})
    loss: str = field(default="cosine", metadata={"help": "cosine (paper), smooth_l1 or mse"})
    alignment: str = field(default="same", metadata={
        "help": "same: the data is tokenized with the teacher's tokenizer; last or mean: cross-tokenizer LET, the "
                "teacher re-tokenizes the text of each window (needs a teacher checkpoint with a tokenizer.json)"})
    schedule: str = field(default="linear", metadata={
        "help": f"lambda schedule, one of letkit.SCHEDULES {sorted(SCHEDULES)} (linear: the paper's), built from "
                "lambda0, stop_step and schedule_args"})
    schedule_args: str = field(default="", metadata={
        "help": "the schedule's keyword arguments, comma-separated key=value (e.g. step_size=500,gamma=0.5); "
                + "; ".join(f"{name}: {_keyword_arguments(cls)}" for name, cls in SCHEDULES.items())})
    lambda0: float = field(default=0.1, metadata={"help": "alignment weight at step 0"})
    stop_step: int = field(default=10_000, metadata={"help": "S_stop: lambda reaches 0 and the teacher is freed"})


@dataclass
class DataConfig:
    path: str = field(default="", metadata={
        "help": "token shards from python -m letkit.data; 'random:<vocab_size>' for uniform random tokens (benchmarks)"})
    seq_len: int = 2048
    micro_batch_size: int = field(default=4, metadata={"help": "sequences per GPU per micro-step"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    seed: int = field(default=0, metadata={"help": "data shuffling seed"})


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final LR of the cosine decay, as a fraction of lr"})
    warmup_steps: int = 2000
    weight_decay: float = field(default=0.1, metadata={"help": "applied to matrices only (not norms or biases)"})
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = field(default=1.0, metadata={"help": "max global grad norm"})


@dataclass
class TrainConfig:
    run_dir: str = field(default="runs/tiny", metadata={"help": "checkpoints/ and metrics.jsonl go here"})
    steps: int = field(default=100, metadata={"help": "total optimizer steps (sets the LR schedule)"})
    stop_at: int = field(default=0, metadata={"help": "end this run after this step, with a checkpoint (0: steps)"})
    seed: int = 0
    mixed_precision: str = field(default="bf16", metadata={"help": "bf16 (params all-gathered in bf16) or fp32"})
    activation_checkpointing: bool = field(default=True, metadata={"help": "recompute each block in backward"})
    compile: bool = field(default=True, metadata={"help": "torch.compile each block"})
    shard_group: int = field(default=0, metadata={
        "help": "ranks that shard the model among themselves, replicated across groups (HSDP; e.g. 8 = one node); "
                "0: all ranks (FSDP)"})


@dataclass
class CheckpointConfig:
    every: int = field(default=1000, metadata={"help": "save every this many steps and at the end (0: never)"})
    keep: int = field(default=3, metadata={"help": "complete checkpoints to keep (0: all)"})
    resume: bool = field(default=True, metadata={"help": "resume from the newest complete checkpoint in run_dir"})
    export: bool = field(default=True, metadata={"help": "at the end, save the model (bf16) to <run_dir>/final_model "
                                                         "for letkit.models.load_pretrained"})


@dataclass
class EvalConfig:
    every: int = field(default=0, metadata={"help": "evaluate every this many steps and at the last step (0: never)"})
    windows: int = field(default=64, metadata={
        "help": "token windows (data.seq_len + 1 tokens) for the validation loss, held out of training when eval.every "
                "> 0: the last ones of the shards. Changing it (or turning evaluation on or off) changes the training "
                "data, so a resume must keep it"})
    tasks: str = field(default="", metadata={
        "help": "comma-separated lm-evaluation-harness tasks or groups (e.g. letkit_paper9), scored on rank 0 while "
                "the other ranks wait; needs lm-eval (pip install 'letkit[eval]') and the data's tokenizer.json"})
    task_files: str = field(default="", metadata={
        "help": "comma-separated local multiple-choice JSONL files scored like tasks (see letkit eval --task-file)"})
    limit: int = field(default=0, metadata={"help": "items per lm-eval task (0: all); a quick look, not a comparable score"})
    num_fewshot: int = field(default=1, metadata={"help": "in-context examples per lm-eval question (the paper: 1)"})
    batch_size: int = field(default=8, metadata={"help": "lm-eval batch size"})


@dataclass
class LogConfig:
    every: int = 10
    peak_tflops: float = field(default=0.0, metadata={"help": "per-GPU peak for MFU; 0: known GPUs' bf16 dense peak"})
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard in <run_dir>/tensorboard"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (files in <run_dir>/wandb)"})
    wandb_mode: str = field(default="offline", metadata={"help": "offline (upload later: wandb sync) or online"})
    wandb_project: str = "letkit"


# the optional package each setting needs when turned on
OPTIONAL_PACKAGES = {"log.tensorboard": "tensorboard", "log.wandb": "wandb", "eval.tasks": "lm_eval",
                     "eval.task_files": "lm_eval"}


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def load_config(argv: list[str] | None = None) -> Config:
    """Config from ``--config`` (a name in examples/configs/ or a TOML path), then ``--section.field`` overrides."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=DEFAULT_CONFIG)
    known, _ = pre.parse_known_args(argv)
    path = Path(known.config) if known.config.endswith(".toml") else CONFIG_DIR / f"{known.config}.toml"
    if not path.is_file():
        raise ValueError(f"--config {known.config!r}: no such file {str(path)!r} (configs: "
                         f"{sorted(p.stem for p in CONFIG_DIR.glob('*.toml'))})")
    cfg = Config()
    for section, values in tomllib.loads(path.read_text()).items():
        if section not in {f.name for f in dataclasses.fields(Config)} or not isinstance(values, dict):
            raise ValueError(f"{path}: unknown section [{section}]")
        part = getattr(cfg, section)
        for key, value in values.items():
            if key not in {f.name for f in dataclasses.fields(part)}:
                raise ValueError(f"{path}: unknown key {key!r} in [{section}]")
            default = getattr(part, key)
            if not isinstance(value, type(default)) and not (isinstance(default, float) and isinstance(value, int)):
                raise ValueError(f"{path}: [{section}] {key} = {value!r} should be a {type(default).__name__}")
            setattr(part, key, type(default)(value))

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="config name in examples/configs/ or a .toml path (default: %(default)s)")
    for section in dataclasses.fields(Config):
        group = parser.add_argument_group(f"[{section.name}]")
        for f in dataclasses.fields(getattr(cfg, section.name)):
            value = getattr(getattr(cfg, section.name), f.name)
            kind = _parse_bool if isinstance(value, bool) else type(value)
            help_text = f.metadata.get("help", "")
            group.add_argument(f"--{section.name}.{f.name}", type=kind, default=value, metavar=type(value).__name__.upper(),
                               help=f"{help_text} (default: %(default)s)" if help_text else "(default: %(default)s)")
    args = vars(parser.parse_args(argv))
    for key, value in args.items():
        if "." in key:
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
    check_config(cfg)
    return cfg


def parse_layer_map(text: str) -> LayerMap:
    """``teacher.layer_map``: comma-separated LayerMap specs, a bare number being a fractional target depth."""
    return LayerMap([float(s) if re.fullmatch(r"[0-9.]+", s) else s for s in text.split(",")])


def parse_assignments(items: list[str], option: str) -> dict[str, Any]:
    """``["key=value", ...]`` (values in JSON: numbers, true/false, "strings") as a dict; ValueError naming ``option``."""
    parsed = {}
    for item in items:
        key, equals, value = item.partition("=")
        try:
            if not (equals and key.strip()):
                raise ValueError("expected key=value")
            parsed[key.strip()] = json.loads(value)
        except ValueError as e:
            raise ValueError(f"{option}: {item!r} is not key=value with a JSON value ({e})") from None
    return parsed


def build_schedule(t: TeacherConfig) -> LambdaSchedule:
    """The lambda schedule ``teacher.schedule`` of ``letkit.SCHEDULES``, from lambda0, stop_step and schedule_args."""
    try:
        kwargs = parse_assignments(t.schedule_args.split(",") if t.schedule_args else [], "teacher.schedule_args")
        return SCHEDULES[t.schedule](t.lambda0, t.stop_step, **kwargs)
    except (TypeError, ValueError) as e:  # e.g. "step" without step_size
        raise ValueError(f"teacher.schedule={t.schedule!r} cannot be built from teacher.lambda0={t.lambda0}, "
                         f"teacher.stop_step={t.stop_step} and teacher.schedule_args={t.schedule_args!r} "
                         f"(its keyword arguments: {_keyword_arguments(SCHEDULES[t.schedule])}): {e}") from None


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def check_config(cfg: Config) -> None:
    """ValueError naming the first field with an invalid value; the kinds are letkit's own lists."""
    choices = {"train.mixed_precision": ("bf16", "fp32"), "teacher.schedule": tuple(SCHEDULES),
               "teacher.projector": PROJECTOR_KINDS, "teacher.loss": LOSS_KINDS,
               "teacher.alignment": ("same", *ALIGNMENT_MODES), "log.wandb_mode": ("offline", "online")}
    positive = ("train.steps", "data.seq_len", "data.micro_batch_size", "data.grad_accum", "teacher.stop_step",
                "log.every", "optim.lr", "optim.grad_clip", "eval.windows", "eval.batch_size")
    non_negative = ("train.stop_at", "train.shard_group", "optim.warmup_steps", "checkpoint.every", "checkpoint.keep",
                    "teacher.lambda0", "eval.every", "eval.limit", "eval.num_fewshot")
    for name in (*choices, *positive, *non_negative):
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if name in choices and value not in choices[name]:
            raise ValueError(f"{name} must be one of {choices[name]}, got {value!r}")
        if (name in positive and value <= 0) or (name in non_negative and value < 0):
            raise ValueError(f"{name} must be {'positive' if name in positive else '>= 0'}, got {value!r}")
    for name, package in OPTIONAL_PACKAGES.items():
        section, key = name.split(".")
        value = getattr(getattr(cfg, section), key)
        if value and importlib.util.find_spec(package) is None:
            shown = str(value).lower() if isinstance(value, bool) else repr(value)
            install = "'letkit[eval]'" if section == "eval" else package
            raise ValueError(f"{name}={shown} needs the {package} package, which is not installed: pip install {install}")
    try:
        parse_layer_map(cfg.teacher.layer_map)
    except ValueError as e:
        raise ValueError(f"teacher.layer_map={cfg.teacher.layer_map!r}: {e}") from None
    build_schedule(cfg.teacher)
    check_eval_config(cfg)


def check_eval_config(cfg: Config) -> None:
    """Evaluation settings that need no process group: lm-eval only with evaluation on, shards to hold windows out
    of, local task files that parse (each malformed item is named by file and line)."""
    e = cfg.eval
    if (e.tasks or e.task_files) and not e.every:
        raise ValueError(f"eval.tasks={e.tasks!r} / eval.task_files={e.task_files!r} are scored every eval.every steps, "
                         "but eval.every=0 (no evaluation): set eval.every")
    if e.every and cfg.data.path.startswith("random:"):
        raise ValueError(f"eval.every={e.every} evaluates on token windows held out of data.path, but data.path="
                         f"{cfg.data.path!r} is random tokens: use token shards, or eval.every=0")
    with tempfile.TemporaryDirectory() as scratch:
        for task_file in _items(e.task_files):
            local_choice_task(task_file, scratch)


# ---------------------------------------------------------------------------------------------------- models

# Shapes for random teachers (LlamaConfig fields; the vocabulary is the data's), besides letkit.models.PRESETS.
TEACHER_SHAPES: dict[str, dict[str, Any]] = {
    "smollm-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                        num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=2048),
}


def fsdp_kwargs(cfg: Config, mesh: DeviceMesh) -> dict[str, Any]:
    """fully_shard arguments: compute in bf16 (or fp32), reduce gradients in fp32; sharded fp32 master weights."""
    param_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[cfg.train.mixed_precision]
    return dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32))


def build_target(cfg: Config, vocab_size: int, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """The target on the meta device -> AC, compile and fully_shard per block, then the root -> this rank's shards."""
    with torch.device("meta"):
        model = from_preset(cfg.model.preset, vocab_size=vocab_size)
    fsdp = fsdp_kwargs(cfg, mesh)
    for i, block in enumerate(model.blocks):
        if cfg.train.activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)  # the blocks draw no random numbers
        if cfg.train.compile:
            block = torch.compile(block)
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, **fsdp, reshard_after_forward=i < len(model.blocks) - 1)
        model.blocks[i] = block
    fully_shard(model, **fsdp)
    model.to_empty(device=device)
    if device.type == "cpu":
        # DTensor's RNG (different random numbers for each shard) works on CUDA only; on CPU seed each shard
        # differently (else the shards would be copies of each other), and replicas (HSDP) alike.
        warnings.filterwarnings("ignore", message="DTensor random operators may not have complete support")
        torch.manual_seed(cfg.train.seed * 1000 + mesh.get_local_rank(mesh.ndim - 1))
    else:
        torch.manual_seed(cfg.train.seed)
    model.init_weights()
    return model


def build_teacher(spec: str, data_vocab: int, device: torch.device, seed: int, *, seq_len: int,
                  data_tokenizer_sha256: str | None = None, data_tokenizer_file: Path | None = None,
                  alignment: str | None = None) -> TeacherFeatureExtractor:
    """The frozen teacher, replicated on this rank in bf16 (float32 on CPU).

    ``letkit.check_teacher_compatibility`` first judges, from config.json and tokenizer.json and before any weights
    load, whether it can read the data: the data's token ids (the same tokenizer, a vocabulary covering the data's
    ids, a context of ``seq_len`` tokens), or with ``alignment`` (``last`` or ``mean``: cross-tokenizer LET) its own
    tokenization of the data's text.
    """
    if spec.startswith("random:"):
        config = random_teacher_config(spec, data_vocab)
        teacher_config, tokenizer_file = dataclasses.asdict(config), None
    else:
        directory = resolve_pretrained(spec)  # a checkpoint directory, or a hub name in the local cache
        config_file, tokenizer_file = directory / "config.json", directory / "tokenizer.json"
        teacher_config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        tokenizer_file = tokenizer_file if tokenizer_file.is_file() else None
    check_teacher_compatibility(
        teacher_vocab_size=teacher_config.get("vocab_size"), teacher_tokenizer=tokenizer_file,
        teacher_max_positions=teacher_config.get("max_position_embeddings"), data_vocab_size=data_vocab,
        data_tokenizer=data_tokenizer_file, seq_len=seq_len, alignment=alignment,
        data_tokenizer_sha256=data_tokenizer_sha256, teacher_name=spec,
        alignment_option="cross-tokenizer LET (--teacher.alignment last or mean)", seq_len_option="data.seq_len")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if not spec.startswith("random:"):
        return TeacherFeatureExtractor.from_pretrained(spec, dtype=dtype, device=device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + 1)  # the same teacher on every rank, whenever it is built
        with torch.device(device):
            model = Llama(config)
    return TeacherFeatureExtractor(model, dtype=dtype)


def random_teacher_config(spec: str, data_vocab: int) -> LlamaConfig:
    """The shape of ``random:<shape>[,field=value...]`` (a letkit.models preset or TEACHER_SHAPES), the data's vocab."""
    name, *assignments = spec.removeprefix("random:").split(",")
    shapes = {**PRESETS, **TEACHER_SHAPES}
    if name not in shapes:
        raise ValueError(f"teacher.path {spec!r}: unknown random teacher shape {name!r}; shapes: {sorted(shapes)}")
    shape = {**shapes[name], **parse_assignments(assignments, f"teacher.path {spec!r}")}
    return LlamaConfig(**{**shape, "vocab_size": data_vocab})


def restore_lambda_schedule(schedule: LambdaSchedule, teacher_cfg: TeacherConfig, trainer_state: dict[str, Any],
                            checkpoint: Path) -> None:
    """Set ``schedule`` to the checkpoint's step; ValueError naming the fields if the config changed the schedule.

    The step is trainer_state.json's: the training loop's step is the one counter (the objective sets the schedule's
    ``current_step`` from it). A checkpoint of a run without a teacher has no schedule state to compare.
    """
    saved_state = trainer_state.get("lambda_schedule")
    if saved_state:
        saved_cfg = trainer_state.get("config", {}).get("teacher", {})
        changed = [f"teacher.{key}: checkpoint {saved_cfg[key]!r}, config {getattr(teacher_cfg, key)!r}"
                   for key in ("schedule", "lambda0", "stop_step") if key in saved_cfg and saved_cfg[key] != getattr(teacher_cfg, key)]
        if not changed:
            try:
                schedule.load_state_dict(saved_state)  # also compares the other hyperparameters (schedule_args)
            except ValueError as e:
                changed = [str(e)]
        if changed:
            raise ValueError(
                f"cannot resume from {checkpoint}: this run's lambda schedule differs from the one it was trained with "
                f"({'; '.join(changed)}). Resume with the checkpoint's values, or start a new train.run_dir "
                "(or --checkpoint.resume false) to train with another schedule")
    schedule.current_step = trainer_state["step"]


def build_objective(cfg: Config, target: nn.Module, teacher: TeacherFeatureExtractor, schedule: LambdaSchedule,
                    mesh: DeviceMesh) -> LETObjective:
    """LETObjective (sized from the models' configs, nothing run); a learned projector is sharded like the target,
    so its gradients are reduced like the target's."""
    # check_finite=False: no host-device sync per step to check the teacher's features; a NaN/Inf teacher makes
    # the loss non-finite, which the training loop raises on at its next log or checkpoint step (before saving)
    objective = LETObjective(target, teacher, layer_map=parse_layer_map(cfg.teacher.layer_map),
                             projector=cfg.teacher.projector, loss=cfg.teacher.loss, schedule=schedule,
                             block_list="blocks", check_finite=False)
    for projector in objective.projector.projectors:
        if any(True for _ in projector.parameters()):
            fully_shard(projector, **fsdp_kwargs(cfg, mesh))
            register_fsdp_forward_method(projector, "loss")  # the fused loss reads the weights through .loss()
    return objective


# ------------------------------------------------------------------------------------------------------- data


class RandomTokens:
    """Uniform random token batches for throughput benchmarks; same interface as ShardedTokenLoader."""

    def __init__(self, vocab_size: int, seq_len: int, batch_size: int, rank: int, seed: int) -> None:
        self.vocab_size, self.shape, self.rank, self.seed = vocab_size, (batch_size, seq_len + 1), rank, seed
        self.batches = 0

    def __next__(self) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, self.rank, self.batches])
        self.batches += 1
        return torch.from_numpy(rng.integers(0, self.vocab_size, self.shape))

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self.batches}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches = state["batches"]


@dataclass
class Data:
    """This rank's batches, its validation windows and what the data says about its tokenizer."""

    loader: Any  # ShardedTokenLoader or RandomTokens; TeacherTokenizedLoader around it for cross-tokenizer LET
    vocab_size: int
    tokenizer_sha256: str | None  # of the tokenizer.json the data was made with (index.json), if known
    tokenizer_file: Path | None  # the data's copy of that tokenizer.json, if it has one
    validation: torch.Tensor | None = None  # this rank's held-out windows [n, seq_len + 1] (with eval.every)


def held_out_windows(cfg: Config) -> int:
    """Windows held out of training for the validation loss: the last ``eval.windows`` when evaluating, else none."""
    return cfg.eval.windows if cfg.eval.every else 0


def build_data(cfg: Config, rank: int, world: int) -> Data:
    """Token shards (``data.path``) or uniform random tokens (``random:<vocab_size>``), this rank's part; with
    evaluation, training reads all but the last ``eval.windows`` windows and this rank validates on its share of
    those (whole micro-batches; the same number on every rank)."""
    d, held_out = cfg.data, held_out_windows(cfg)
    if d.path.startswith("random:"):
        vocab = int(d.path.removeprefix("random:"))
        return Data(RandomTokens(vocab, d.seq_len, d.micro_batch_size, rank, d.seed), vocab, None, None)
    loader = ShardedTokenLoader(d.path, seq_len=d.seq_len, batch_size=d.micro_batch_size, rank=rank, world_size=world,
                                seed=d.seed, windows=slice(None, -held_out) if held_out else slice(None))
    data = Data(loader, loader.vocab_size, loader.index.get("tokenizer_sha256"), loader.tokenizer_file)
    if held_out:
        per_rank = held_out // world // d.micro_batch_size * d.micro_batch_size
        if per_rank == 0:
            raise ValueError(f"eval.windows={held_out} is less than one micro-batch per rank ({world} ranks x "
                             f"data.micro_batch_size={d.micro_batch_size}): hold out at least {world * d.micro_batch_size}")
        data.validation = next(ShardedTokenLoader(d.path, seq_len=d.seq_len, batch_size=per_rank, rank=rank,
                                                  world_size=world, shuffle=False, windows=slice(-held_out, None)))
    if (cfg.eval.tasks or cfg.eval.task_files) and data.tokenizer_file is None:
        raise ValueError(f"eval.tasks / eval.task_files score an export of the model, which needs the data's "
                         f"tokenizer.json, but data.path={d.path!r} has none (python -m letkit.data copies it there)")
    return data


def check_held_out(cfg: Config, trainer_state: dict[str, Any], checkpoint: Path) -> None:
    """ValueError if this run would hold out other windows than the checkpoint's run (other training data)."""
    saved, held_out = trainer_state.get("held_out_windows", 0), held_out_windows(cfg)
    if saved != held_out:
        raise ValueError(
            f"cannot resume from {checkpoint}: its run held out the last {saved} token windows for validation, this "
            f"one would hold out {held_out} (eval.every={cfg.eval.every}, eval.windows={cfg.eval.windows}), so it "
            f"would train on other data. Resume with " + ("--eval.every 0" if saved == 0 else
                                                         f"--eval.every N --eval.windows {saved}")
            + ", or start a new train.run_dir")


# ---------------------------------------------------------------------------------------------- checkpoints


def training_state(trainable: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state for DCP: this rank's shards, keyed by unwrapped parameter names."""
    options = StateDictOptions(flatten_optimizer_state_dict=True)
    model_state, optim_state = get_state_dict(trainable, optimizer, options=options)
    return {"model": model_state, "optim": optim_state}


def resume_training_state(path: Path, trainable: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model and optimizer shards from checkpoint ``path`` in place; returns its trainer_state.json."""
    state = training_state(trainable, optimizer)
    trainer_state = load_checkpoint(path, state)
    set_state_dict(trainable, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(flatten_optimizer_state_dict=True))
    return trainer_state


def export_model(model: nn.Module, path: Path | None, tokenizer: Tokenizer | None) -> None:
    """Gather the full model on rank 0's CPU and save it to ``path`` (bf16, Hugging Face layout, with the data's
    tokenizer when known) with save_pretrained. Collective; ``path`` is rank 0's."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        with torch.device("meta"):
            plain = Llama(model.config)
        plain.load_state_dict(full, assign=True)
        save_pretrained(plain.to(torch.bfloat16), path, tokenizer=tokenizer)
    dist.barrier()


# -------------------------------------------------------------------------------------------------- metrics

def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6 * (parameters in matmuls) + 12 * layers * heads * head_dim * seq_len (attention).

    The input embedding is a lookup, not a matmul; with tied embeddings its matrix still counts once, as the LM head.
    """
    c = model.config
    matmul_params = sum(p.numel() for p in model.parameters())
    if not c.tie_word_embeddings:
        matmul_params -= model.embed.weight.numel()
    return 6 * matmul_params + 12 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * seq_len


def peak_flops(device: torch.device, override_tflops: float) -> float | None:
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    peaks = datasheet_peaks(torch.cuda.get_device_name(device))
    return peaks[1] if peaks else None


def memory_gib(device: torch.device) -> tuple[float, float]:
    """(allocated now, peak allocated) on the GPU; (RSS, peak RSS) of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30, torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    with open("/proc/self/statm") as f:
        rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    return rss, peak


class TensorBoardSink:
    """Records' numbers as TensorBoard scalars ``<section>/<name>`` in ``<run_dir>/tensorboard``."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, values: dict[str, float], section: str) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"{section}/{key}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """Records' numbers as a Weights & Biases run (training's by name, the others ``<section>/<name>`` (files in ``<run_dir>/wandb``; offline mode by default: upload
    later with ``wandb sync``). Reruns in the same run_dir continue one W&B run, whose id is kept in
    ``<run_dir>/wandb_run_id``."""

    def __init__(self, run_dir: Path, project: str, mode: str, config: dict[str, Any]) -> None:
        import wandb

        id_file = run_dir / "wandb_run_id"
        if not id_file.is_file():
            atomic_write_bytes(id_file, uuid.uuid4().hex[:16].encode())
        self.run = wandb.init(project=project, mode=mode, dir=str(run_dir), id=id_file.read_text().strip(),
                              resume="allow", name=run_dir.name, config=config)

    def log(self, step: int, values: dict[str, float], section: str) -> None:
        self.run.log(values if section == "train" else {f"{section}/{k}": v for k, v in values.items()}, step=step)

    def close(self) -> None:
        self.run.finish()


class MetricsLog:
    """Rank 0's progress lines and records: all go to ``<run_dir>/metrics.jsonl``, the numbers of step and evaluation
    records also to the sinks the config turns on (TensorBoard, W&B). A no-op on other ranks."""

    def __init__(self, run_dir: Path, cfg: Config, enabled: bool) -> None:
        self.enabled, self.file, self.sinks = enabled, None, []
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "metrics.jsonl", "a")
        if cfg.log.tensorboard:
            self.sinks.append(TensorBoardSink(run_dir))
        if cfg.log.wandb:
            self.sinks.append(WandbSink(run_dir, cfg.log.wandb_project, cfg.log.wandb_mode, dataclasses.asdict(cfg)))

    def step(self, step: int, **values: Any) -> None:
        """A step's record; its numbers (not None) go to the sinks too (section ``train``)."""
        if self.enabled:
            self._write({"step": step, **values})
            self._to_sinks(step, values, "train")

    def evaluation(self, step: int, values: dict[str, float]) -> None:
        """An evaluation's record, ``{"step": step, "eval": values}``; its numbers go to the sinks too (``eval``)."""
        if self.enabled:
            self._write({"step": step, "eval": values})
            self._to_sinks(step, values, "eval")

    def _to_sinks(self, step: int, values: dict[str, Any], section: str) -> None:
        for sink in self.sinks:
            sink.log(step, {k: v for k, v in values.items() if isinstance(v, (int, float))}, section)

    def event(self, name: str, step: int, **fields: Any) -> None:
        if self.enabled:
            self._write({"event": name, "step": step, **fields})

    def _write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def info(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.info(message, *args)

    def warning(self, message: str, *args: Any) -> None:
        if self.enabled:
            log.warning(message, *args)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
        if self.file is not None:
            self.file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------- setup


def setup_distributed() -> torch.device:
    """The process group: torchrun's (``env://``), or for a plain ``python pretrain_fsdp.py`` a world of one on an
    in-memory store (no port to pick, so none another process could take first)."""
    single = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **single)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo", **single)
    return device


def build_mesh(shard_group: int, device: torch.device) -> DeviceMesh:
    """1-D mesh: FSDP over all ranks. 2-D (replicate, shard): HSDP, all-gathers stay within a group of
    ``shard_group`` ranks (e.g. a node) and only the gradient all-reduce crosses groups."""
    world = dist.get_world_size()
    shard_group = shard_group or world
    if world % shard_group:
        raise ValueError(f"train.shard_group={shard_group} does not divide the world size {world}")
    if shard_group == world:
        return init_device_mesh(device.type, (world,))
    return init_device_mesh(device.type, (world // shard_group, shard_group), mesh_dim_names=("replicate", "shard"))


def setup_let(cfg: Config, model: nn.Module, data: Data, mesh: DeviceMesh, device: torch.device,
              trainer_state: dict[str, Any], checkpoint: Path | None, metrics: MetricsLog):
    """The lambda schedule (at the checkpoint's step) and, unless S_stop has passed, the teacher and LETObjective.

    Returns ``(schedule, objective)``, both None for a run without a teacher; ``data.loader`` is wrapped for
    cross-tokenizer LET. The schedule is restored before the teacher loads, so a changed schedule fails fast and a
    run resumed after S_stop never loads the teacher.
    """
    if cfg.teacher.path == "none":
        return None, None
    schedule = build_schedule(cfg.teacher)
    if checkpoint is not None:
        restore_lambda_schedule(schedule, cfg.teacher, trainer_state, checkpoint)
    if schedule.is_done():
        metrics.info("step %d >= S_stop = %d: LET is over, the teacher is not loaded", schedule.current_step,
                     schedule.stop_step)
        return schedule, None
    teacher = build_teacher(cfg.teacher.path, data.vocab_size, device, cfg.train.seed, seq_len=cfg.data.seq_len,
                            data_tokenizer_sha256=data.tokenizer_sha256, data_tokenizer_file=data.tokenizer_file,
                            alignment=None if cfg.teacher.alignment == "same" else cfg.teacher.alignment)
    objective = build_objective(cfg, model, teacher, schedule, mesh)
    del teacher  # the objective holds the only reference, so releasing it frees the memory
    if cfg.teacher.alignment != "same":
        max_positions = getattr(getattr(objective.teacher.model, "config", None), "max_position_embeddings", None)
        data.loader = TeacherTokenizedLoader(data.loader, Tokenizer.from_file(str(data.tokenizer_file)),
                                             objective.teacher.tokenizer, mode=cfg.teacher.alignment,
                                             teacher_max_length=max_positions)
    metrics.info("teacher %s: %d layers, pairs (teacher, target) %s, projector %s, memory %.2f GiB", cfg.teacher.path,
                 objective.teacher.num_layers, objective.pairs, cfg.teacher.projector, memory_gib(device)[0])
    return schedule, objective


def build_optimizer(o: OptimConfig, trainable: nn.Module, total_steps: int, device: torch.device):
    """AdamW (weight decay on matrices only) and its warmup + cosine LR schedule."""
    params = [p for p in trainable.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(weight_decay_groups(params, o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2),
                                  eps=o.eps, fused=device.type == "cuda")
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        warmup_cosine_lr, peak_lr=1.0, warmup_steps=o.warmup_steps, total_steps=total_steps,
        min_lr_ratio=o.min_lr_ratio))
    return optimizer, lr_scheduler


def release_teacher(objective: LETObjective, data: Data, step: int, device: torch.device, metrics: MetricsLog) -> None:
    """S_stop: free the teacher and remove its hooks (and stop the re-tokenizing thread of cross-tokenizer LET)."""
    before = memory_gib(device)[0]
    objective.finish()
    if isinstance(data.loader, TeacherTokenizedLoader):
        data.loader = data.loader.close()
    after = memory_gib(device)[0]
    metrics.info("S_stop = %d steps done: teacher released, memory %.2f -> %.2f GiB", step, before, after)
    metrics.event("teacher_released", step, memory_before_gib=before, memory_after_gib=after)


def report_resume(metrics: MetricsLog, checkpoint: Path, trainer_state: dict[str, Any], world: int,
                  tokens_per_step: int, d: DataConfig) -> None:
    """Record the resume; warn when the global batch changed with the number of ranks (or the data settings)."""
    saved_world, saved_tokens = trainer_state["world_size"], trainer_state.get("tokens_per_step")
    if saved_tokens is None:  # a checkpoint of a version that did not record it: from its config
        saved = trainer_state["config"]["data"]
        saved_tokens = saved_world * saved["micro_batch_size"] * saved["grad_accum"] * saved["seq_len"]
    if "sha256" not in trainer_state:
        metrics.warning("%s records no checksums (an older version of this script wrote it): only its file sizes "
                        "were checked", checkpoint)
    metrics.event("resume", trainer_state["step"], checkpoint=str(checkpoint), world_size=world,
                  tokens_per_step=tokens_per_step, checkpoint_world_size=saved_world,
                  checkpoint_tokens_per_step=saved_tokens)
    if (saved_world, saved_tokens) == (world, tokens_per_step):
        return
    per_accum_step = world * d.micro_batch_size * d.seq_len
    keep = (f"; --data.grad_accum {saved_tokens // per_accum_step} keeps the checkpoint's {saved_tokens}"
            if saved_tokens % per_accum_step == 0 else "")
    metrics.warning(
        "%s was written by %d ranks at %d tokens per step; this run has %d ranks and %d tokens per step (ranks x "
        "data.micro_batch_size x data.grad_accum x data.seq_len)%s. The LR and lambda schedules count steps, so they "
        "now pass over %.3gx the tokens per step%s", checkpoint, saved_world, saved_tokens, world, tokens_per_step,
        keep, tokens_per_step / saved_tokens, "; RNG states not restored" if saved_world != world else "")


# ------------------------------------------------------------------------------------------------ train step


def set_gradient_sync(trainable: nn.Module, enabled: bool) -> None:
    """Turn the reduce-scatter of gradients in backward on or off for every FSDP module (target and projector)."""
    for module in trainable.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


@dataclass
class StepResult:
    losses: torch.Tensor  # [loss, lm loss, align loss] summed over this rank's micro-batches (not reduced)
    has_align: bool  # whether an alignment loss was computed (LET ran this step)
    grad_norm: torch.Tensor  # before clipping
    lr: float
    lambda_: float


def train_step(model: nn.Module, objective: LETObjective | None, trainable: nn.Module,
               optimizer: torch.optim.Optimizer, lr_scheduler, loader, *, step: int, grad_accum: int, grad_clip: float,
               device: torch.device) -> StepResult:
    """One optimizer step: ``grad_accum`` micro-batches of forward and backward of the LM loss (plus, while LET runs,
    lambda(step) * the alignment loss), gradient clipping, AdamW, then the LR schedule advances.

    ``step`` is the one step counter: the objective sets its lambda schedule's ``current_step`` from it. Gradients
    are reduce-scattered only in the last micro-step's backward: the earlier ones accumulate this rank's unsharded
    gradients locally, so there is one reduction per optimizer step, not one per micro-step.
    """
    optimizer.zero_grad(set_to_none=True)
    sums = torch.zeros(3, device=device)
    has_align, lambda_ = False, 0.0
    for micro in range(grad_accum):
        set_gradient_sync(trainable, micro == grad_accum - 1)
        batch, teacher_inputs = next(loader), {}
        if isinstance(batch, tuple):  # cross-tokenizer LET: the teacher's own tokens and the alignment
            batch, teacher_ids, alignment = batch
            teacher_inputs = dict(teacher_input_ids=teacher_ids.to(device), token_alignment=alignment.to(device))
        batch = batch.to(device)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = model(inputs)
        lm_loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss, align = lm_loss, None
        if objective is not None:
            out = objective(inputs, lm_loss=lm_loss, step=step, **teacher_inputs)
            loss, align, lambda_ = out.loss, out.align_loss, out.lambda_
        (loss / grad_accum).backward()
        sums += torch.stack([loss.detach(), lm_loss.detach(), align.detach() if align is not None else loss.new_zeros(())])
        has_align |= align is not None
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable.parameters(), grad_clip, foreach=True)
    optimizer.step()
    lr = lr_scheduler.get_last_lr()[0]
    lr_scheduler.step()
    return StepResult(sums, has_align, grad_norm, lr, lambda_)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def validation_loss(model: nn.Module, windows: torch.Tensor, micro_batch_size: int, device: torch.device) -> float:
    """Mean next-token NLL over every rank's held-out ``windows`` (collective; each rank has as many)."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # NLL, tokens
    for chunk in windows.split(micro_batch_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1])
        sums[0] += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum")
        sums[1] += chunk[:, 1:].numel()
    model.train(was_training)
    dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


LM_EVAL_WAIT = timedelta(hours=24)
"""How long the other ranks wait for rank 0's lm-evaluation-harness run (on a CPU process group: a GPU collective
would time out within minutes)."""


def lm_eval_scores(model: nn.Module, tokenizer_file: Path, e: EvalConfig, run_dir: Path, device: torch.device,
                   wait_group: dist.ProcessGroup) -> dict[str, float]:
    """lm-evaluation-harness scores of the current weights, as ``{"<task>/<metric>": value}`` on rank 0 ({} on the
    others; collective): the model is gathered into a temporary bf16 Hugging Face export (like final_model) in
    run_dir, which rank 0 scores with ``letkit.evaluation.evaluate_checkpoint`` while the other ranks wait."""
    scratch = None
    if dist.get_rank() == 0:
        remove_stale_temporaries(run_dir, recursive=False)  # what killed evaluations left behind
        scratch = Path(tempfile.mkdtemp(prefix=f".tmp-eval_model-{os.getpid()}-", dir=run_dir))
    scores = {}
    try:
        export_model(model, None if scratch is None else scratch / "model", Tokenizer.from_file(str(tokenizer_file)))
        if scratch is not None:
            tasks = _items(e.tasks) + [local_choice_task(f, scratch / "tasks") for f in _items(e.task_files)]
            # lm-eval seeds torch's global RNG: keep the training's (checkpointed) RNG state as it was
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                result = evaluate_checkpoint(scratch / "model", tasks, num_fewshot=e.num_fewshot, batch_size=e.batch_size,
                                             device=str(device), dtype="bfloat16", limit=e.limit or None,
                                             include_paths=[scratch / "tasks"])
            scores = {f"{task}/{metric}": value for task, values in result["results"].items()
                      for metric, value in values.items()}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    dist.barrier(group=wait_group)
    return scores


def evaluate(cfg: Config, model: nn.Module, data: Data, run_dir: Path, device: torch.device,
             wait_group: dist.ProcessGroup | None) -> dict[str, float]:
    """The validation loss on the held-out windows, and lm-eval scores when ``eval.tasks`` / ``eval.task_files`` are
    set (``wait_group``); collective."""
    values = {"val_loss": validation_loss(model, data.validation, cfg.data.micro_batch_size, device)}
    if wait_group is not None:
        values.update(lm_eval_scores(model, data.tokenizer_file, cfg.eval, run_dir, device, wait_group))
    return values


# ----------------------------------------------------------------------------------------------------- train


def train(cfg: Config) -> None:
    """Set up (process group, run directory lock, resume point, data, target, teacher, optimizer), then train."""
    device = setup_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = build_mesh(cfg.train.shard_group, device)
    run_dir, ckpt_dir = Path(cfg.train.run_dir), Path(cfg.train.run_dir) / "checkpoints"
    c, d = cfg.train, cfg.data
    with locked_run_dir(run_dir), MetricsLog(run_dir, cfg, enabled=rank == 0) as metrics:
        checkpoint, skipped = find_checkpoint(ckpt_dir) if cfg.checkpoint.resume else (None, [])
        trainer_state = json.loads((checkpoint / "trainer_state.json").read_text()) if checkpoint else {}
        if checkpoint:
            check_held_out(cfg, trainer_state, checkpoint)
        start_step = trainer_state.get("step", 0)

        data = build_data(cfg, rank, world)
        vocab_size = cfg.model.vocab_size or data.vocab_size
        if vocab_size < data.vocab_size:
            raise ValueError(f"model.vocab_size={vocab_size} is smaller than the data's vocabulary ({data.vocab_size})")
        model = build_target(cfg, vocab_size, mesh, device)
        schedule, objective = setup_let(cfg, model, data, mesh, device, trainer_state, checkpoint, metrics)
        trainable = nn.ModuleDict({"model": model})
        if objective is not None and any(True for _ in objective.parameters()):
            trainable["projector"] = objective.projector
        optimizer, lr_scheduler = build_optimizer(cfg.optim, trainable, c.steps, device)
        tokens_per_step = world * d.micro_batch_size * d.grad_accum * d.seq_len
        if checkpoint:
            trainer_state = resume_training_state(checkpoint, trainable, optimizer)
            lr_scheduler.load_state_dict(trainer_state["lr_scheduler"])
            data.loader.load_state_dict(trainer_state["data"])
            metrics.info("resumed from %s (step %d)", checkpoint, start_step)
            report_resume(metrics, checkpoint, trainer_state, world, tokens_per_step, d)
        # lm-eval runs on rank 0 alone, for long: the others wait on a CPU group with a timeout to match
        wait_group = (dist.new_group(backend="gloo", timeout=LM_EVAL_WAIT) if cfg.eval.tasks or cfg.eval.task_files
                      else None)

        n_params = sum(p.numel() for p in model.parameters())
        flops = flops_per_token(model, d.seq_len)
        peak = peak_flops(device, cfg.log.peak_tflops)
        metrics.info("target %s: %.2fM parameters, %d ranks, %d tokens/step, %.3g FLOPs/token", cfg.model.preset,
                     n_params / 1e6, world, tokens_per_step, flops)
        if rank == 0:
            atomic_write_json(run_dir / "config.json", dataclasses.asdict(cfg), indent=1)

        tokens_seen = trainer_state.get("tokens_seen", 0)
        end = min(c.stop_at or c.steps, c.steps)
        last_log_time, last_log_step = time.perf_counter(), start_step
        for step in range(start_step, end):
            if objective is not None and schedule.is_done(step):
                release_teacher(objective, data, step, device, metrics)
                objective = None
            result = train_step(model, objective, trainable, optimizer, lr_scheduler, data.loader, step=step,
                                grad_accum=d.grad_accum, grad_clip=cfg.optim.grad_clip, device=device)
            tokens_seen += tokens_per_step
            done = step + 1

            log_now = done % cfg.log.every == 0 or done == end
            checkpoint_now = cfg.checkpoint.every > 0 and (done % cfg.checkpoint.every == 0 or done == end)
            eval_now = cfg.eval.every > 0 and (done % cfg.eval.every == 0 or done == c.steps)
            if not (log_now or checkpoint_now or eval_now):
                continue
            dist.all_reduce(result.losses)
            loss, lm_loss, align_loss = (result.losses / (world * d.grad_accum)).tolist()
            if log_now:
                grad_norm = result.grad_norm.full_tensor() if isinstance(result.grad_norm, DTensor) else result.grad_norm
                now = time.perf_counter()
                step_time = (now - last_log_time) / (done - last_log_step)
                tokens_per_s = tokens_per_step / step_time
                last_log_time, last_log_step = now, done
                mfu = flops * tokens_per_s / world / peak if peak else None
                mem, mem_peak = memory_gib(device)
                align_loss = align_loss if result.has_align else None
                metrics.info(
                    "step %6d/%d | loss %.4f | lm %.4f | align %s | lambda %.4f | lr %.2e | gnorm %.3f | %.2fs/step "
                    "| %.0f tok/s | mfu %s | mem %.1f GiB (peak %.1f)", done, c.steps, loss, lm_loss,
                    "-" if align_loss is None else f"{align_loss:.4f}", result.lambda_, result.lr, grad_norm.item(),
                    step_time, tokens_per_s, "-" if mfu is None else f"{mfu:.1%}", mem, mem_peak)
                metrics.step(done, loss=loss, lm_loss=lm_loss, align_loss=align_loss, lambda_=result.lambda_,
                             lr=result.lr, grad_norm=grad_norm.item(), tokens_seen=tokens_seen, step_time_s=step_time,
                             tokens_per_s=tokens_per_s, mfu=mfu, memory_gib=mem, peak_memory_gib=mem_peak)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {done}; stopping before it is checkpointed")
            if checkpoint_now:
                # the schedule's state at the step to resume at (its counter stops once the teacher is released)
                lambda_state = None if schedule is None else {**schedule.state_dict(), "current_step": done}
                state = {"tokens_seen": tokens_seen, "tokens_per_step": tokens_per_step,
                         "lr_scheduler": lr_scheduler.state_dict(), "data": data.loader.state_dict(),
                         "lambda_schedule": lambda_state, "held_out_windows": held_out_windows(cfg),
                         "config": dataclasses.asdict(cfg)}
                started = time.perf_counter()
                path = save_checkpoint(ckpt_dir, done, training_state(trainable, optimizer), state)
                metrics.info("saved %s in %.1fs", path, time.perf_counter() - started)
                metrics.event("checkpoint", done, path=str(path))
                skipped = [p for p in skipped if p != path]  # a damaged checkpoint of this step was replaced
                if rank == 0:
                    for old in prune_checkpoints(ckpt_dir, done, cfg.checkpoint.keep, skipped):
                        metrics.info("deleted %s (checkpoint.keep=%d)", old, cfg.checkpoint.keep)
            if eval_now:
                started = time.perf_counter()
                values = evaluate(cfg, model, data, run_dir, device, wait_group)
                metrics.info("eval at step %d: %s (%.1fs)", done, " | ".join(f"{k} {v:.4g}" for k, v in values.items()),
                             time.perf_counter() - started)
                metrics.evaluation(done, values)
                last_log_time += time.perf_counter() - started  # evaluation time is not training step time
        if isinstance(data.loader, TeacherTokenizedLoader):
            data.loader.close()
        final = run_dir / "final_model"
        if cfg.checkpoint.export and end == c.steps and not final.exists():
            export_model(model, final, Tokenizer.from_file(str(data.tokenizer_file)) if data.tokenizer_file else None)
            metrics.info("exported the model to %s", final)
        dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    cfg = load_config(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout)
    train(cfg)


if __name__ == "__main__":
    main()
