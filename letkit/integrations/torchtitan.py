"""LET in torchtitan (0.3): a ``Trainer`` with a ``let`` config section (``pip install letkit[torchtitan]``).

torchtitan 0.3 configures a run with a Python config-registry function (no TOML files any more) picked by
``--module`` and ``--config``; this module is such a registry::

    torchrun --nproc_per_node=8 -m torchtitan.train --module letkit.integrations.torchtitan \\
        --config llama3_8b_let --let.teacher_path checkpoints/SmolLM-135M --let.stop_step 2000

:class:`LETTrainer` is torchtitan's ``Trainer`` plus the teacher: after the model is built and parallelised it
hooks the model's early block, and it wraps the trainer's loss so that every micro-batch adds
``lambda(step) * L_align`` weighted like torchtitan's own loss (a sum over tokens divided by the step's global
token count), which FSDP then sums over ranks. :func:`with_let` turns any torchtitan ``Trainer.Config`` into
one of LET. Limits: data parallelism only (FSDP / HSDP / DDP: no tensor, context or pipeline parallelism), no
CUDA graphs, the paper's parameter-free ``"interpolate"`` projector (torchtitan's optimizer is built from the
model alone, so a learned projector would never train), no cross-tokenizer alignment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import spmd_types as spmd
import torch
from torch import Tensor, nn
from torchtitan.components.loss import IGNORE_INDEX, BaseLoss
from torchtitan.trainer import Trainer

from letkit.integrations.checks import check_same_vocabulary, input_embedding_size, warn_if_schedule_outlasts_run
from letkit.objective import LETObjective
from letkit.schedulers import LinearDecay
from letkit.teacher import TeacherFeatureExtractor

__all__ = ["LETConfig", "LETLoss", "LETTrainer", "build_objective", "llama3_8b_let", "llama3_debugmodel_let",
           "with_let"]

RANDOM_TEACHER = "random:"


@dataclass(kw_only=True, slots=True)
class LETConfig:
    """The ``let`` section of :class:`LETTrainer.Config` (``--let.<field>`` on the command line)."""

    teacher_path: str = ""
    """The teacher's checkpoint directory (Hugging Face layout, the data's tokenizer), or ``random:<letkit preset>``
    (e.g. ``random:tiny``) for a randomly initialised teacher with the target's vocabulary, for smoke tests."""
    teacher_dtype: str = "bfloat16"
    """dtype the teacher runs in."""
    lambda0: float = 0.1
    """lambda at step 0 (the paper's 0.1)."""
    stop_step: int = 1000
    """S_stop: lambda decays linearly to 0 there, and the teacher is released."""
    layer_map: str = "L2E"
    """Teacher-to-target layer pairing (a strategy such as L2E / L2M, or a depth fraction)."""
    loss: str = "cosine"
    """Alignment loss: cosine (paper), smooth_l1 or mse."""
    check_vocabulary: bool = True
    """Refuse a teacher whose tokenizer (or embedding table size) differs from the data's."""


def build_objective(
    config: LETConfig, model: nn.Module, device: torch.device, tokenizer: Any = None
) -> LETObjective:
    """The LET objective on ``model`` (its hooks installed) with the teacher ``config`` names, on ``device``.

    Checks the teacher's vocabulary against ``tokenizer`` (or the model's embedding size) unless turned off.
    """
    dtype = getattr(torch, config.teacher_dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"let.teacher_dtype must name a torch dtype, got {config.teacher_dtype!r}")
    if config.teacher_path.startswith(RANDOM_TEACHER):
        from letkit.models import from_preset

        preset = config.teacher_path[len(RANDOM_TEACHER):]
        teacher = TeacherFeatureExtractor(from_preset(preset, vocab_size=input_embedding_size(model)), dtype=dtype,
                                          device=device)
    elif config.teacher_path:
        teacher = TeacherFeatureExtractor.from_pretrained(config.teacher_path, dtype=dtype, device=device)
    else:
        raise ValueError("let.teacher_path is empty: give the teacher's checkpoint directory (or random:<preset>)")
    layer_map: str | float = config.layer_map
    try:
        layer_map = float(config.layer_map)
    except ValueError:
        pass
    # the target's width given: without a config.hidden_size LETObjective would measure it with a probe forward,
    # which torchtitan's FlexAttention refuses without the attention masks its Trainer builds
    target_width = next(m.embedding_dim for m in model.modules() if isinstance(m, nn.Embedding))
    objective = LETObjective(model, teacher, layer_map=layer_map, projector="interpolate", loss=config.loss,
                             schedule=LinearDecay(config.lambda0, stop_step=config.stop_step),
                             target_dims=target_width, check_finite=False)
    if config.check_vocabulary:
        check_same_vocabulary(model, objective, tokenizer, opt_out="--let.check_vocabulary False")
    return objective


class LETLoss:
    """Wraps a torchtitan loss: ``loss(pred, labels, global_valid_tokens)`` plus this micro-batch's share of
    ``lambda(step) * L_align``, i.e. ``lambda * L_align * valid_tokens / global_valid_tokens`` (the alignment loss is
    a mean over the micro-batch's tokens whose label is not ignored).

    The token ids come from a forward pre-hook on ``model``; ``step`` is read from ``current_step()`` (0-based)
    on every call. Keeps the alignment losses since :meth:`pop_metrics` for logging.
    """

    def __init__(self, loss_fn: BaseLoss, objective: LETObjective, model: nn.Module, current_step: Any) -> None:
        self.loss_fn, self.objective, self.current_step = loss_fn, objective, current_step
        self._input_ids: Tensor | None = None
        self._align_losses: list[Tensor] = []
        self._lambda = objective.schedule(0)
        model.register_forward_pre_hook(self._keep_input_ids)

    def _keep_input_ids(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._input_ids = args[0] if args else None

    def __call__(
        self, pred: Tensor, labels: Tensor, global_valid_tokens: Tensor | None = None, **kwargs: Any
    ) -> tuple[Tensor, dict[str, Tensor]]:
        loss, metrics = self.loss_fn(pred, labels, global_valid_tokens, **kwargs)
        if self.objective.finished:
            return loss, metrics
        if self._input_ids is None or self._input_ids.shape[:2] != labels.shape[:2]:
            raise RuntimeError("LETLoss found no token ids of this batch: the model's forward pass must run first")
        valid = labels != IGNORE_INDEX
        out = self.objective(self._input_ids, step=self.current_step(), mask=valid)
        self._input_ids, self._lambda = None, out.lambda_
        if out.align_loss is None:
            return loss, metrics
        self._align_losses.append(out.align_loss.detach())
        share = valid.sum() / global_valid_tokens if global_valid_tokens is not None else 1.0
        with spmd.no_typecheck():  # a per-rank term, as torchtitan's own loss is before the sum over ranks
            return loss + out.loss * share, metrics

    def pop_metrics(self) -> dict[str, float]:
        """``let/lambda`` of the latest step, and ``let/align_loss`` (this rank's mean since the last call) while
        the teacher runs."""
        metrics = {"let/lambda": self._lambda}
        if self._align_losses:
            metrics["let/align_loss"] = torch.stack(self._align_losses).float().mean().item()
            self._align_losses = []
        return metrics


class LETTrainer(Trainer):
    """torchtitan's ``Trainer`` with LET (see the module docstring)."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        let: LETConfig = field(default_factory=LETConfig)
        """Late-to-Early Training: the teacher and the schedule."""

    def __init__(self, config: Config) -> None:
        unsupported = {name: getattr(config.parallelism, name) for name in
                       ("tensor_parallel_degree", "context_parallel_degree", "pipeline_parallel_degree")
                       if getattr(config.parallelism, name) != 1}
        if unsupported:
            raise ValueError(f"LETTrainer supports data parallelism only (FSDP, HSDP, DDP), got {unsupported}: the "
                             "teacher's features must cover each rank's whole sequences")
        if not config.training.disable_cuda_graphs:
            raise ValueError("LET's teacher forward and lambda schedule cannot be captured in a CUDA graph: set "
                             "--training.disable_cuda_graphs")
        super().__init__(config)
        model = self.model_parts[0]
        self.let_objective = build_objective(config.let, model, self.device, self.tokenizer)
        warn_if_schedule_outlasts_run(self.let_objective.schedule, config.training.steps)
        # torchtitan's Trainer.step counts from 1, LET's steps from 0
        self.loss_fn = LETLoss(self.loss_fn, self.let_objective, model, lambda: self.step - 1)
        log = self.metrics_processor.log

        def log_with_let(*args: Any, extra_metrics: dict[str, Any] | None = None, **kwargs: Any) -> Any:
            return log(*args, extra_metrics={**(extra_metrics or {}), **self.loss_fn.pop_metrics()}, **kwargs)

        self.metrics_processor.log = log_with_let


def with_let(config: Trainer.Config, let: LETConfig | None = None) -> LETTrainer.Config:
    """``config`` (any torchtitan ``Trainer.Config``) as a :class:`LETTrainer.Config`, with CUDA graphs off."""
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(Trainer.Config)}
    let_config = LETTrainer.Config(**fields, let=let or LETConfig())
    let_config.training.disable_cuda_graphs = True
    return let_config


def llama3_debugmodel_let() -> LETTrainer.Config:
    """torchtitan's ``llama3_debugmodel`` with LET (S_stop at step 5 of its 10)."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    return with_let(llama3_debugmodel(), LETConfig(stop_step=5))


def llama3_8b_let() -> LETTrainer.Config:
    """torchtitan's ``llama3_8b`` with LET (the teacher must use Llama 3's tokenizer: ``--let.teacher_path``)."""
    from torchtitan.models.llama3.config_registry import llama3_8b

    return with_let(llama3_8b())
