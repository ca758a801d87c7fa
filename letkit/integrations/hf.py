"""LET in a Hugging Face ``transformers.Trainer``: :class:`LETTrainer` (``pip install letkit[hf]``).

::

    schedule = letkit.LinearDecay(0.1, stop_step=2000)
    objective = letkit.LETObjective(model, teacher, projector="linear", schedule=schedule)
    trainer = LETTrainer(model=model, args=TrainingArguments(...), train_dataset=dataset, let_objective=objective)
    trainer.train()                                   # or trainer.train(resume_from_checkpoint=True)
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from letkit.atomic import atomic_write_bytes, atomic_write_json
from letkit.integrations.checks import (
    check_projector_in_optimizer,
    check_same_vocabulary,
    warn_if_schedule_outlasts_run,
)
from letkit.objective import LETObjective
from letkit.optim import weight_decay_groups

__all__ = ["LETTrainer", "OBJECTIVE_FILE", "SCHEDULE_FILE"]

OBJECTIVE_FILE = "let_objective.safetensors"
"""The objective's state (a learned projector's weights) in each checkpoint directory."""
SCHEDULE_FILE = "let_schedule.json"
"""The lambda schedule's ``state_dict()`` in each checkpoint directory, checked on resume."""

CROSS_TOKENIZER_KEYS = ("teacher_input_ids", "token_alignment")

_TRAINER_CLIPPING_HOOKS = hasattr(Trainer, "_clip_grad_norm") and hasattr(Trainer, "_get_grad_norm")
"""Whether this transformers' Trainer clips gradients through methods LETTrainer can extend to a learned projector's
(transformers 5.3 and later; before, clipping is inline in the training loop)."""


class _ZeroObjectiveGradients(TrainerCallback):
    """The Trainer zeroes only the model's gradients after each optimizer step; the projector's would pile up."""

    def __init__(self, objective: LETObjective) -> None:
        self.objective = objective

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.objective.zero_grad(set_to_none=True)


class LETTrainer(Trainer):
    """A ``transformers.Trainer`` whose loss is LET's ``L_NLL + lambda(s) * L_align``.

    Everything else is the Trainer's own. On top of it:

    * the step ``s`` is ``state.global_step`` (optimizer steps; every micro-batch of one step shares it), so a
      resumed run continues the schedule where it stopped; the teacher is released at S_stop;
    * the alignment term is scaled for gradient accumulation like the Trainer's LM loss (averaged over the
      micro-batches of a step);
    * a learned projector's parameters join the optimizer the Trainer builds (an optimizer passed in through
      ``optimizers=`` must hold them: otherwise the first step raises), and every checkpoint holds them
      (:data:`OBJECTIVE_FILE`) with the schedule (:data:`SCHEDULE_FILE`); ``train(resume_from_checkpoint=...)``
      loads both. ``max_grad_norm`` clips the model's and the projector's gradients under one total norm, the
      logged ``grad_norm`` (in single-process and DDP runs with transformers 5.3 or later; elsewhere a learned
      projector with ``max_grad_norm > 0`` is refused at construction);
    * ``align_loss`` (mean over the micro-batches since the last log) and ``lambda`` join ``loss`` in the logs;
    * evaluation computes the plain LM loss: the teacher does not run;
    * the objective's projector and the teacher are moved to the Trainer's device with the model.

    Batches may carry ``teacher_input_ids`` and ``token_alignment`` (cross-tokenizer LET, see
    :func:`letkit.encode_for_alignment`; keep them with ``remove_unused_columns=False``); they are taken out before
    the model's forward. The batch's ``attention_mask``, if any, masks padding out of the alignment loss.

    Args:
        let_objective: the :class:`~letkit.LETObjective` built on the ``model`` given to the Trainer.
        check_vocabulary: refuse, on the first step without a token alignment, a teacher whose tokenizer
            (or embedding table size) differs from the data's (``processing_class``) or the model's.
        *args, **kwargs: the ``transformers.Trainer`` arguments.
    """

    def __init__(self, *args: Any, let_objective: LETObjective, check_vocabulary: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(let_objective, LETObjective):
            raise TypeError(f"let_objective must be a letkit.LETObjective, got {type(let_objective).__name__}")
        if self.args.n_gpu > 1:
            raise ValueError(
                f"LETTrainer does not run under torch.nn.DataParallel (n_gpu={self.args.n_gpu}): its model replicas "
                "bypass the objective's hooks. Launch one process per GPU with torchrun (DDP) instead."
            )
        self._let_projector_parameters = [p for p in let_objective.parameters() if p.requires_grad]
        if self.is_deepspeed_enabled and self._let_projector_parameters:
            raise ValueError("LETTrainer cannot hand a learned projector to DeepSpeed's optimizer: use "
                             "projector='interpolate', or DDP / FSDP instead of DeepSpeed")
        unsupported = self._joint_clipping_unsupported()
        if self._let_projector_parameters and (self.args.max_grad_norm or 0) > 0 and unsupported:
            raise ValueError(
                f"max_grad_norm={self.args.max_grad_norm} would clip the model's gradients but not the learned "
                f"projector's: clipping both under one norm {unsupported}. Pass max_grad_norm=0 (no clipping) or "
                "projector='interpolate'"
            )
        self.let_objective = let_objective
        self.check_vocabulary = check_vocabulary
        self.add_callback(_ZeroObjectiveGradients(let_objective))
        if self.place_model_on_device:
            let_objective.to(self.args.device)
            if not let_objective.finished:
                let_objective.teacher.model.to(self.args.device)
        self._let_checked = False
        self._let_align_sum: Tensor | None = None
        self._let_align_count = 0
        self._let_lambda: float | None = None

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the learned projector's parameters added (with the same weight decay
        split) when the Trainer builds it."""
        built_here = self.optimizer is None
        optimizer = super().create_optimizer(*args, **kwargs)
        if built_here:
            for group in weight_decay_groups(self.let_objective.parameters(), self.args.weight_decay):
                if group["params"]:
                    optimizer.add_param_group(group)
        return optimizer

    def _joint_clipping_unsupported(self) -> str | None:
        """Why the model's and a learned projector's gradients cannot be clipped together here, or None."""
        if not _TRAINER_CLIPPING_HOOKS:
            return (f"needs transformers 5.3 or later (transformers {transformers.__version__}'s Trainer clips inside "
                    "its training loop, where LETTrainer cannot add the projector)")
        kind = str(self.accelerator.distributed_type.value)
        if kind != "NO" and not kind.startswith("MULTI_"):  # MULTI_GPU, MULTI_CPU, ...: DDP
            return f"is done for single-process and DDP runs only, not {kind}"
        return None

    def _let_grad_norm(self, model: nn.Module, max_norm: float) -> Tensor:
        """The total norm of the model's and the learned projector's gradients, both clipped to ``max_norm``.

        Under DDP both are already all-reduced here (the projector's by :mod:`letkit.integrations.ddp`, during
        backward), so every rank computes the same norm."""
        return self.accelerator.clip_grad_norm_([*model.parameters(), *self._let_projector_parameters], max_norm)

    def _clip_grad_norm(self, model: nn.Module) -> Any:
        """The Trainer's clipping to ``max_grad_norm`` (transformers >= 5.3), a learned projector's gradients
        included under the same total norm; returns the norm before clipping."""
        if not self._let_projector_parameters:
            return super()._clip_grad_norm(model)
        return self._let_grad_norm(model, self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """The Trainer's logged ``grad_norm`` (transformers >= 5.3); without clipping it also counts a learned
        projector's gradients where they could be clipped together."""
        if grad_norm is None and self._let_projector_parameters and self._joint_clipping_unsupported() is None:
            grad_norm = self._let_grad_norm(model, float("inf"))
        return super()._get_grad_norm(model, grad_norm)

    def _check_let_setup(self, has_token_alignment: bool) -> None:
        check_projector_in_optimizer(self.let_objective, self.optimizer.param_groups)
        warn_if_schedule_outlasts_run(self.let_objective.schedule, self.state.max_steps)
        if self.check_vocabulary and not has_token_alignment and not self.let_objective.finished:
            check_same_vocabulary(self.accelerator.unwrap_model(self.model), self.let_objective, self.processing_class)
        self._let_checked = True

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, Any]:
        """The Trainer's loss plus ``lambda(global_step) * L_align`` in training; the Trainer's loss in evaluation."""
        cross_tokenizer = {k: inputs[k] for k in CROSS_TOKENIZER_KEYS if k in inputs}
        inputs = {k: v for k, v in inputs.items() if k not in CROSS_TOKENIZER_KEYS}
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not self._let_checked:
            self._check_let_setup("token_alignment" in cross_tokenizer)
        lm_loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        out = self.let_objective(inputs["input_ids"], step=self.state.global_step, mask=inputs.get("attention_mask"),
                                 **cross_tokenizer)
        align_term = out.loss
        if self._lm_loss_scaled_for_accumulation(num_items_in_batch):
            # the Trainer will not divide this loss by the accumulation steps: the term must be divided here
            align_term = align_term / self.current_gradient_accumulation_steps
        if out.align_loss is not None:
            detached = out.align_loss.detach().float()
            self._let_align_sum = detached if self._let_align_sum is None else self._let_align_sum + detached
            self._let_align_count += 1
        self._let_lambda = out.lambda_
        loss = lm_loss + align_term
        return (loss, outputs) if return_outputs else loss

    def _lm_loss_scaled_for_accumulation(self, num_items_in_batch: Tensor | int | None) -> bool:
        """Whether the Trainer's loss is already normalised over the whole accumulated batch (the rule of
        ``Trainer.training_step``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        normalised_by_model = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        return normalised_by_model or self.compute_loss_func is not None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's log; training logs also get ``align_loss`` (averaged over micro-batches and processes
        since the last log, when the teacher ran) and ``lambda`` (of the latest step)."""
        if "loss" in logs and self._let_lambda is not None:
            device = self.args.device
            align_sum = torch.zeros((), device=device) if self._let_align_sum is None else self._let_align_sum
            count = torch.tensor(float(self._let_align_count), device=device)
            align_sum, count = self.accelerator.reduce(torch.stack([align_sum.to(device), count]), reduction="sum")
            if count > 0:
                logs["align_loss"] = (align_sum / count).item()
            logs["lambda"] = self._let_lambda
            self._let_align_sum, self._let_align_count = None, 0
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The Trainer's ``save_model``; inside a checkpoint also the LET objective's state and schedule."""
        super().save_model(output_dir, _internal_call)
        if _internal_call and self.args.should_save:
            output_dir = self.args.output_dir if output_dir is None else output_dir
            state = {k: v.detach().cpu().contiguous() for k, v in self.let_objective.state_dict().items()}
            atomic_write_bytes(os.path.join(output_dir, OBJECTIVE_FILE), save(state))
            atomic_write_json(os.path.join(output_dir, SCHEDULE_FILE), self.let_objective.schedule.state_dict())

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        """``Trainer.train``; a resumed run also loads the LET objective's state and checks its schedule."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir) or True  # True: the Trainer's error
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            self._load_let_state(os.fspath(resume_from_checkpoint))
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _load_let_state(self, checkpoint: str) -> None:
        objective_file, schedule_file = (os.path.join(checkpoint, name) for name in (OBJECTIVE_FILE, SCHEDULE_FILE))
        missing = [os.path.basename(path) for path in (objective_file, schedule_file) if not os.path.isfile(path)]
        if missing:
            raise FileNotFoundError(f"checkpoint {checkpoint} has no {missing}: it was not saved by LETTrainer, so the "
                                    "LET objective's state cannot be restored")
        with open(schedule_file) as f:
            self.let_objective.schedule.load_state_dict(json.load(f))
        device = next((p.device for p in self.let_objective.parameters()), torch.device("cpu"))
        self.let_objective.load_state_dict(load_file(objective_file, device=str(device)))
