"""``letkit eval``: downstream-task scores of a checkpoint with EleutherAI's lm-evaluation-harness.

The paper compares LET with its baselines by the average 1-shot accuracy over nine tasks. This module runs
lm-evaluation-harness (``pip install 'letkit[eval]'``) on a Hugging Face checkpoint directory — a run's
``final_model/`` or any ``letkit export``-ed step — and returns the scores per task. ``letkit_paper9`` names the
nine zero/few-shot tasks commonly reported for 0.1-7B models (ARC-Easy/Challenge, HellaSwag, PIQA, WinoGrande,
BoolQ, OpenBookQA, SciQ, LAMBADA-OpenAI); the paper's own list of nine is not restated here, so compare our
numbers with its table only task by task.

Local multiple-choice tasks need no hub: a JSONL file of ``{"context": str, "choices": [str, ...], "label": int}``
lines (:func:`local_choice_task`) becomes a task named after the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from letkit.atomic import atomic_write_json
from letkit.validation import check_int

__all__ = ["PAPER_TASKS", "PAPER_TASK_GROUP", "evaluate_checkpoint", "local_choice_task"]

PAPER_TASK_GROUP = "letkit_paper9"
PAPER_TASKS = ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "boolq", "openbookqa", "sciq",
               "lambada_openai")
TASKS_DIR = Path(__file__).parent / "eval_tasks"
"""lm-evaluation-harness task configs shipped with letkit (the ``letkit_paper9`` group)."""


def local_choice_task(items: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write an lm-evaluation-harness task for a local multiple-choice JSONL file; returns the task's name.

    Each line of ``items`` is ``{"context": str, "choices": [str, ...], "label": int}`` (the index of the right
    choice); the model scores each ``context + " " + choice`` by log-likelihood (metric ``acc``). The task config
    goes to ``out_dir`` (pass it as an include path); the name is ``local_<file stem>``.

    Raises:
        ValueError: naming the file and line of the first malformed item (bad JSON, missing or mistyped field,
            fewer than two choices, a label out of range) or an empty file.
    """
    items = Path(items).resolve()
    try:
        lines = items.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"task file {str(items)!r} cannot be read: {e}") from e
    count = 0
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"task file {str(items)!r}, line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not JSON ({e})") from e
        if not isinstance(item, dict) or not isinstance(item.get("context"), str):
            raise ValueError(f'{where}: expected an object with a string "context", got {line[:80]!r}')
        choices = item.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ValueError(f'{where}: "choices" must be a list of at least two strings, got {choices!r}')
        label = item.get("label")
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
            raise ValueError(f'{where}: "label" must be an int index into the {len(choices)} choices, got {label!r}')
        count += 1
    if count == 0:
        raise ValueError(f"task file {str(items)!r} holds no items")
    name = "local_" + "".join(c if c.isalnum() else "_" for c in items.stem)
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(items)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "{{context}}",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "label",
        "target_delimiter": " ",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    atomic_write_json(Path(out_dir) / f"{name}.yaml", config)  # JSON is valid YAML
    return name


def evaluate_checkpoint(
    model_dir: str | os.PathLike,
    tasks: Sequence[str] = (PAPER_TASK_GROUP,),
    *,
    num_fewshot: int = 1,
    batch_size: int = 8,
    device: str | None = None,
    dtype: str = "auto",
    limit: int | None = None,
    include_paths: Sequence[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Score a Hugging Face checkpoint directory on lm-evaluation-harness tasks.

    Args:
        model_dir: ``config.json`` + ``model.safetensors`` + ``tokenizer.json`` (``letkit export`` writes these).
        tasks: lm-evaluation-harness task or group names (``"letkit_paper9"``: the paper-like nine-task set).
            The standard tasks download their data from the Hugging Face hub once (or read its cache).
        num_fewshot: in-context examples per question (the paper reports 1-shot).
        batch_size, device, dtype: as lm-evaluation-harness's ``hf`` model takes them (device: ``cuda`` when
            available, else ``cpu``).
        limit: evaluate only the first ``limit`` items of each task (a quick look; not a comparable score).
        include_paths: extra directories of task configs (e.g. from :func:`local_choice_task`).

    Returns:
        ``{"results": {task: {metric: value}}, "config": {...}}`` with lm-evaluation-harness's metric names
        (``"acc"``, ``"acc_stderr"``, ``"acc_norm"``, ...; its ``,none`` filter suffix removed).
    """
    model_dir = Path(model_dir)
    missing = [name for name in ("config.json", "tokenizer.json") if not (model_dir / name).is_file()]
    if missing:
        raise ValueError(f"model_dir {str(model_dir)!r} has no {' or '.join(missing)}: evaluate a Hugging Face "
                         "checkpoint directory with its tokenizer (letkit export RUN/checkpoints/step_N OUT_DIR)")
    num_fewshot = check_int("num_fewshot", num_fewshot, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    limit = check_int("limit", limit, minimum=1, optional=True)
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError("letkit eval needs lm-evaluation-harness: pip install 'letkit[eval]'") from e
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    task_manager = TaskManager(include_path=[str(TASKS_DIR), *map(str, include_paths)])
    unknown = [t for t in tasks if t not in task_manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: lm-evaluation-harness has no such task or group "
                         "(lm_eval --tasks list shows them; local files need local_choice_task / --task-file)")
    output = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "device": device},
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        limit=limit,
        task_manager=task_manager,
    )
    results = {
        task: {key.removesuffix(",none"): value for key, value in metrics.items()
               if key not in ("alias", "name", "sample_len") and isinstance(value, (int, float))}
        for task, metrics in output["results"].items()
    }
    return {"results": results, "config": {"model_dir": str(model_dir), "tasks": list(tasks),
                                           "num_fewshot": num_fewshot, "limit": limit, "device": device,
                                           "dtype": dtype, "lm_eval": lm_eval.__version__}}
