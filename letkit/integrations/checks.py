"""The refusals every trainer integration makes before LET trains on something wrong."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

from tokenizers import Tokenizer
from torch import nn

from letkit.objective import LETObjective
from letkit.schedulers import LambdaSchedule
from letkit.token_alignment import same_tokenizer

__all__ = [
    "check_projector_in_optimizer",
    "check_same_vocabulary",
    "input_embedding_size",
    "warn_if_schedule_outlasts_run",
]


def check_projector_in_optimizer(objective: LETObjective, param_groups: Iterable[dict[str, Any]]) -> None:
    """Raise a ValueError naming the learned projector's trainable parameters that no param group holds."""
    held = {id(p) for group in param_groups for p in group["params"]}
    missing = [name for name, p in objective.named_parameters() if p.requires_grad and id(p) not in held]
    if missing:
        raise ValueError(
            "the LET objective's learned projector has trainable parameters the optimizer was built without: "
            f"{missing}. "
            "They would never be updated: build the optimizer over the model's parameters and the objective's "
            "(objective.parameters())"
        )


def warn_if_schedule_outlasts_run(schedule: LambdaSchedule, max_steps: int) -> None:
    """Warn when the schedule's S_stop lies past the run's last step (lambda never reaches 0, the teacher stays)."""
    if max_steps > 0 and schedule.stop_step > max_steps:
        warnings.warn(
            f"the LET schedule's S_stop ({schedule.stop_step}) is past the run's {max_steps} steps: lambda never "
            f"decays to 0 (it ends at {schedule(max_steps - 1):.4g}) and the teacher runs to the end; set stop_step "
            f"<= {max_steps}",
            UserWarning,
            stacklevel=3,
        )


def _backend_tokenizer(tokenizer: Any) -> Tokenizer | None:
    """The ``tokenizers.Tokenizer`` behind a tokenizer object: itself, a transformers fast tokenizer's
    ``backend_tokenizer``, or a wrapper's ``tokenizer``; None when there is none."""
    candidates = (tokenizer, getattr(tokenizer, "backend_tokenizer", None), getattr(tokenizer, "tokenizer", None))
    for candidate in candidates:
        if isinstance(candidate, Tokenizer):
            return candidate
    return None


def input_embedding_size(model: nn.Module) -> int | None:
    """Rows of ``model``'s input embedding table (``get_input_embeddings()``, else its first module with
    ``num_embeddings``); None when it has none."""
    get_input_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_input_embeddings):
        return getattr(get_input_embeddings(), "num_embeddings", None)
    sizes = (getattr(m, "num_embeddings", None) for m in model.modules())
    return next((size for size in sizes if isinstance(size, int)), None)


def check_same_vocabulary(
    target: nn.Module, objective: LETObjective, data_tokenizer: Any = None, *, opt_out: str = "check_vocabulary=False"
) -> None:
    """Refuse a teacher whose vocabulary differs from the data's, for LET without a token alignment.

    Compares the data's tokenizer with the teacher's (:attr:`TeacherFeatureExtractor.tokenizer`) when both are
    known, else the sizes of the target's and the teacher's input embedding tables. Raises a ValueError that
    names the difference and ``opt_out``, the integration's way to turn the check off.
    """
    ours, theirs = _backend_tokenizer(data_tokenizer), _backend_tokenizer(objective.teacher.tokenizer)
    if ours is not None and theirs is not None:
        if same_tokenizer(ours, theirs):
            return
        problem = (f"the data's tokenizer ({ours.get_vocab_size()} tokens) and the teacher's "
                   f"({theirs.get_vocab_size()} tokens) differ")
    else:
        target_size, teacher_size = input_embedding_size(target), input_embedding_size(objective.teacher.model)
        if target_size is None or teacher_size is None or target_size == teacher_size:
            return
        problem = f"the target embeds {target_size} token ids and the teacher {teacher_size}"
    raise ValueError(
        f"the teacher's vocabulary differs from the data's: {problem}, so the teacher would read the target's token "
        "ids as other tokens. Use a teacher with the data's tokenizer, or cross-tokenizer LET (teacher_input_ids and "
        "token_alignment with every batch, see letkit.encode_for_alignment). If both do use one tokenizer (a table "
        f"padded to a round size), turn this check off with {opt_out}."
    )
