"""The whole demo: :func:`prepare` (data and teacher), then the baseline and the method (LET by default) per seed,
then the metrics and report."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from letkit.atomic import atomic_write_json, remove_stale_temporaries
from letkit.demo.cache import CACHE_FORMAT, default_cache_dir
from letkit.demo.compare import compare_runs, mean_ci95
from letkit.demo.config import METHOD_LABELS, DemoConfig, DemoError, Log, method_settings
from letkit.demo.methods import compare_seed
from letkit.demo.report import plot_curves
from letkit.demo.teacher import TeacherInfo, describe_teacher, open_teacher, prepare_teacher_data, pretrain_teacher
from letkit.demo.tokens import TokenData, prepare_data
from letkit.demo.train import RunResult, build_model, validation_windows
from letkit.models import count_parameters

OUTPUT_FILES = ("metrics.json", "demo.png")


@dataclass
class Prepared:
    """What the runs need, from :func:`prepare`: the target's token data, the teacher (its checkpoint directory
    and facts) and the teacher's tokenizer (None when it has none)."""

    data: TokenData
    teacher: TeacherInfo
    teacher_tokenizer: Any


def prepare(config: DemoConfig, *, log: Log = print) -> Prepared:
    """Validate ``config``, then corpus -> tokenizer -> token ids, and the teacher: ``config.teacher``, or the demo's
    own pretrained on the corpus (on its own BPE with ``teacher_vocab_size``). Everything is cached under
    ``config.cache_dir`` (default :func:`default_cache_dir`); leftovers of interrupted runs are removed first."""
    config.validate()
    cache_root = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    removed = remove_stale_temporaries(cache_root)
    if removed:
        log(f"cache: removed {len(removed)} leftovers of interrupted runs")
    provided = open_teacher(config.teacher) if config.teacher is not None else None
    data = prepare_data(config, cache_root, teacher=provided, log=log)
    log(f"data: {data.corpus}; tokenizer: {data.tokenizer_source}; {len(data.train)} training / "
        f"{len(data.val)} validation tokens, vocabulary {data.vocab_size}")
    if provided is not None:
        teacher, teacher_tokenizer = describe_teacher(config.teacher, provided), provided.tokenizer
    elif config.teacher_vocab_size is not None:
        teacher_config, teacher_data = prepare_teacher_data(config, data, cache_root, log=log)
        teacher = pretrain_teacher(teacher_config, teacher_data, cache_root, log=log)
        teacher_tokenizer = teacher_data.tokenizer
    else:
        teacher, teacher_tokenizer = pretrain_teacher(config, data, cache_root, log=log), data.tokenizer
    log(f"teacher: {teacher.path} ({'provided' if teacher.provided else 'cached' if teacher.cached else 'pretrained'})")
    return Prepared(data, teacher, teacher_tokenizer)


def check_output_dir(out_dir: str | os.PathLike) -> None:
    """Raise a :class:`DemoError` now, before any training, if the demo's outputs could not be written into
    ``out_dir``: it (or the nearest of its parents that exists) is not a writable directory, or one of the output
    files is a directory. Creates nothing."""
    out = Path(out_dir).expanduser()
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "is an existing file" if existing == out else f"is below the file {str(existing)!r}"
        raise DemoError(f"--out {str(out_dir)!r} {where}; it must be a directory (for {' and '.join(OUTPUT_FILES)})")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = " is" if existing == out else f": its parent {str(existing)!r} is"
        raise DemoError(f"--out {str(out_dir)!r}{where} not writable")
    for name in OUTPUT_FILES:
        if (out / name).is_dir():
            raise DemoError(f"--out {str(out_dir)!r}: {str(out / name)!r} is a directory, where the demo writes a file")


def run_demo(config: DemoConfig, *, log: Log = print) -> dict[str, Any]:
    """Run the full comparison described in :mod:`letkit.demo`; returns (and writes) the metrics."""
    config.validate()
    check_output_dir(config.out_dir)
    threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run_demo(config, log)
    finally:
        torch.set_num_threads(threads)


def _run_demo(config: DemoConfig, log: Log) -> dict[str, Any]:
    t_start = time.perf_counter()
    prepared = prepare(config, log=log)
    data, teacher, teacher_tokenizer = prepared.data, prepared.teacher, prepared.teacher_tokenizer

    target = build_model(config.target_shape, data.vocab_size, config.seq_len, 0)
    target_size = count_parameters(target, non_embedding=True)
    if target_size < 10 * teacher.non_embedding_parameters:
        log(f"note: the target has only {target_size / teacher.non_embedding_parameters:.1f}x the teacher's "
            "non-embedding parameters (LET's setting is a teacher >= 10x smaller)")
    # each seed's runs are stored under "baseline" and the method's name ("let", "salt", "rkd", "let+salt")
    method, label = config.method, METHOD_LABELS[config.method]
    let, kd = method_settings(method, config.let, config.kd)
    runs = []
    for i in range(config.seeds):
        seed = config.seed + i
        baseline, run = compare_seed(config, data, teacher.path, seed)
        runs.append({"seed": seed, "baseline": _run_dict(baseline), method: _run_dict(run),
                     "comparison": compare_runs(baseline, run)})
        c = runs[-1]["comparison"]
        log(f"seed {seed}: baseline {baseline.final_val_loss:.3f}, {label} {run.final_val_loss:.3f}, "
            f"step speedup {c['step_speedup']:.2f}x, wall-clock speedup {c['wall_speedup']:.2f}x")

    method_seconds = sum(r[method]["train_seconds"] for r in runs)
    aligned = [r[method]["aligned_fraction"] for r in runs if r[method]["aligned_fraction"] is not None]
    if config.alignment_mode is not None and not aligned:
        log("cross-tokenizer: teacher and target share one tokenizer, so the teacher read the target's tokens")
    windows = validation_windows(data.val, config.seq_len, config.eval_sequences)
    metrics = {
        "letkit_demo": CACHE_FORMAT,
        "config": dataclasses.asdict(config),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "platform": platform.platform()},
        "data": {"corpus": data.corpus, "tokenizer": data.tokenizer_source, "vocab_size": data.vocab_size,
                 "train_tokens": len(data.train), "val_tokens": len(data.val),
                 "val_tokens_evaluated": int(windows[:, 1:].numel())},
        "teacher": dataclasses.asdict(teacher),
        "cross_tokenizer": {
            "mode": config.alignment_mode,
            "active": bool(aligned),
            "teacher_vocab_size": teacher_tokenizer.get_vocab_size() if teacher_tokenizer is not None else None,
            "aligned_fraction": sum(aligned) / len(aligned) if aligned else None,
            "teacher_tokenize_fraction": sum(r[method]["teacher_tokenize_seconds"] for r in runs) / method_seconds,
        },
        "method": method,
        "target": {"non_embedding_parameters": target_size, "size_ratio": target_size / teacher.non_embedding_parameters,
                   "stop_step": let.stop_step(config.target_schedule.steps) if let else None,
                   "kd_stop_step": kd.stop_step(config.target_schedule.steps) if kd else None},
        "runs": runs,
        "summary": {
            "step_speedup": mean_ci95([r["comparison"]["step_speedup"] for r in runs]),
            "wall_speedup": mean_ci95([r["comparison"]["wall_speedup"] for r in runs]),
            "wall_speedup_load_matched": mean_ci95([r["comparison"]["wall_speedup_load_matched"] for r in runs]),
            "final_val_loss_delta": mean_ci95([r["comparison"]["final_val_loss_delta"] for r in runs]),
            "better_than_baseline": sum(r["comparison"]["final_val_loss_delta"] < 0 for r in runs),
            "teacher_forward_fraction": sum(r[method]["teacher_forward_seconds"] for r in runs) / method_seconds,
        },
        "total_seconds": time.perf_counter() - t_start,
    }
    out_dir = Path(config.out_dir).expanduser()
    plot_path = out_dir / "demo.png"
    if config.plot and plot_curves(metrics, plot_path):
        metrics["plot"] = str(plot_path)
    else:
        metrics["plot"] = None
        if config.plot:
            log("plot: skipped (matplotlib is not installed: pip install 'letkit[plot]')")
    atomic_write_json(out_dir / "metrics.json", metrics)
    return metrics


def _run_dict(run: RunResult) -> dict[str, Any]:
    return {"final_val_loss": run.final_val_loss, "final_perplexity": math.exp(run.final_val_loss), "steps": run.steps,
            "train_seconds": run.train_seconds, "tokens_per_second": run.tokens_per_second,
            "teacher_forward_seconds": run.teacher_forward_seconds,
            "aligned_fraction": run.aligned_fraction, "teacher_tokenize_seconds": run.teacher_tokenize_seconds,
            "curve": [dataclasses.asdict(p) for p in run.curve]}
