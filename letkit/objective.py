"""LETObjective: the LET loss for any target model, assembled from letkit's blocks.

    L_total(s) = L_NLL + lambda(s) * mean over layer pairs of L_align(P(h_target^k), h_teacher^j)

The target's layer outputs are captured with forward hooks (the user's model code is untouched); the
teacher runs only while lambda(s) > 0 and is released for good once the schedule is done.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from letkit.layer_map import LayerMap, PairSpec
from letkit.losses import AlignmentLoss
from letkit.module_paths import find_block_list
from letkit.projector import LayerMappingProjector
from letkit.schedulers import LambdaSchedule, LinearDecay
from letkit.teacher import TeacherFeatureExtractor
from letkit.token_alignment import TokenAlignment


@dataclass
class LETOutput:
    """What one LET step computed.

    ``loss`` is ``lm_loss + lambda_ * align_loss`` (just ``lambda_ * align_loss`` when no ``lm_loss`` was
    given); ``align_loss`` is None on steps where the teacher did not run (lambda = 0).
    """

    loss: Tensor
    lm_loss: Tensor | None
    align_loss: Tensor | None
    lambda_: float
    step: int


class LETObjective(nn.Module):
    """Late-to-Early Training objective for any target ``nn.Module``.

    Args:
        target: the model being trained. Its blocks are found automatically (or give ``target_block_list``).
        teacher: a :class:`TeacherFeatureExtractor`, or a plain frozen ``nn.Module`` to wrap in one. The
            layer map decides which of its layers are used.
        layer_map: a :class:`LayerMap` or anything its constructor takes (default ``"L2E"``).
        projector: a :class:`LayerMappingProjector`, or its kind (``"interpolate"``, ``"linear"``,
            ``"mlp"``). With a kind, the feature sizes are discovered by running both models once on a
            two-token input.
        loss: an :class:`AlignmentLoss` or its kind (``"cosine"``, ``"smooth_l1"``, ``"mse"``).
        schedule: the lambda schedule (default: the paper's ``LinearDecay(0.1, stop_step=10_000)``; pass
            your own S_stop).
        target_block_list: module path of the target's block list, when automatic discovery is wrong.
        check_finite: raise a ValueError on any step where the teacher's features hold NaN/Inf (a broken
            teacher, or one overflowing in its dtype) instead of training on them. The check reads a flag back
            from the device: one host-device sync per step on GPUs; pass False to skip it where the loss is
            checked anyway. Applies when ``loss`` is a kind; an :class:`AlignmentLoss` keeps its own setting.

    Typical use, inside any training loop::

        logits = model(input_ids)                                   # hooks capture layer k
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        out = objective(input_ids, lm_loss=lm_loss, step=step)      # runs the teacher while lambda > 0
        out.loss.backward()

    Projector parameters (for learned projectors) are this module's parameters: give
    ``objective.parameters()`` to the optimizer alongside the model's. Under data parallelism a learned
    projector needs its gradients synchronised like the model's: shard it with ``fully_shard`` and
    ``register_fsdp_forward_method(projector, "loss")`` as examples/pretrain_fsdp.py does (DDP's reducer is
    bypassed because the fused loss calls ``projector.loss``). The lambda schedule's state is not part of
    this module's ``state_dict()``: checkpoint ``objective.schedule.state_dict()`` or pass ``step=``.
    """

    def __init__(
        self,
        target: nn.Module,
        teacher: TeacherFeatureExtractor | nn.Module,
        *,
        layer_map: LayerMap | PairSpec | Sequence[PairSpec] = "L2E",
        projector: LayerMappingProjector | str = "interpolate",
        loss: AlignmentLoss | str = "cosine",
        schedule: LambdaSchedule | None = None,
        target_block_list: str | None = None,
        check_finite: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(loss, AlignmentLoss) and loss.check_finite and not check_finite:
            raise ValueError("check_finite=False has no effect on the AlignmentLoss passed as loss (it has "
                             "check_finite=True): pass AlignmentLoss(..., check_finite=False) or a loss kind")
        if not isinstance(teacher, TeacherFeatureExtractor):
            teacher = TeacherFeatureExtractor(teacher)
        self.teacher = teacher
        self.layer_map = layer_map if isinstance(layer_map, LayerMap) else LayerMap(layer_map)
        self.loss_fn = loss if isinstance(loss, AlignmentLoss) else AlignmentLoss(loss, check_finite=check_finite)
        self.schedule = schedule if schedule is not None else LinearDecay(0.1, stop_step=10_000)
        self.target_block_list_path, target_blocks = find_block_list(target, target_block_list)
        self.pairs = self.layer_map.resolve(teacher.num_layers, len(target_blocks))
        teacher.select_layers([t for t, _ in self.pairs])
        self.target_layers = [s for _, s in self.pairs]
        self._captured: dict[int, Tensor] = {}
        self._hooks = [
            target_blocks[k].register_forward_hook(self._capture_hook(k, target_blocks[k]))
            for k in sorted(set(self.target_layers))
        ]
        if isinstance(projector, str):
            projector = self._build_projector(target, projector)
        self.projector = projector

    def _capture_hook(self, layer: int, block: nn.Module):
        def capture(module: nn.Module, args: Any, output: Any) -> None:
            if module is not block:  # a deep copy of the target (EMA, eval copy) carries this hook along
                return
            self._captured[layer] = output[0] if isinstance(output, (tuple, list)) else output

        return capture

    def _build_projector(self, target: nn.Module, kind: str) -> LayerMappingProjector:
        parameter = next(target.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        probe = torch.zeros(1, 2, dtype=torch.long, device=device)
        was_training = target.training
        # eager and in eval mode: the probe must neither mark a compiled target's shapes dynamic nor run dropout
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            target.eval()
            target(probe)
        target.train(was_training)
        target_dims = [self._captured[k].shape[-1] for k in self.target_layers]
        self._captured.clear()
        teacher_dims = self.teacher.feature_dims(probe.to(_device_of(self.teacher.model, device)))
        return LayerMappingProjector(target_dims, teacher_dims, kind).to(device)

    @property
    def finished(self) -> bool:
        """True once the schedule is done and the teacher and hooks are gone."""
        return self.teacher.released

    def finish(self) -> None:
        """Release the teacher and remove the target hooks (called automatically once lambda is 0 for good)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._captured.clear()
        self.teacher.release()

    def forward(
        self,
        input_ids: Tensor,
        *,
        lm_loss: Tensor | None = None,
        step: int | None = None,
        mask: Tensor | None = None,
        teacher_input_ids: Tensor | None = None,
        token_alignment: TokenAlignment | None = None,
    ) -> LETOutput:
        """Combine the LM loss with the alignment term for the target forward pass that just ran.

        Args:
            input_ids: the ``[B, T]`` token ids the target was just run on; the teacher reads the same
                unless the teacher has its own tokenizer.
            lm_loss: the target's language-modelling loss; None to get only ``lambda * L_align``.
            step: training step for the schedule (default: ``schedule.current_step``).
            mask: optional ``[B, T]`` token mask (True/nonzero = align this token), e.g. padding.
            teacher_input_ids, token_alignment: cross-tokenizer LET (see :mod:`letkit.token_alignment`):
                the ``[B, S]`` teacher tokenisation of the same texts and the alignment that gives each
                target position the teacher feature for the same text, causally; positions without one
                are masked out. Leave both None when target and teacher share a tokenizer.
        """
        step = self.schedule.current_step if step is None else step
        lam = self.schedule(step)
        if lam == 0.0:
            if self.schedule.is_done(step) and not self.finished:
                self.finish()
            self._captured.clear()
            total = lm_loss if lm_loss is not None else torch.zeros((), device=input_ids.device)
            return LETOutput(total, lm_loss, None, 0.0, step)
        if self.finished:
            raise RuntimeError(
                f"lambda({step}) = {lam} > 0, but the teacher was already released at the end of the schedule"
            )
        missing = [k for k in self.target_layers if k not in self._captured]
        if missing:
            raise RuntimeError(
                f"no target features captured for target layers {missing}: run the target model's forward pass on "
                "this batch before calling the objective"
            )
        target_features = [self._captured[k] for k in self.target_layers]
        self._captured.clear()
        if target_features[0].shape[:2] != input_ids.shape[:2]:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} is not the batch the target just ran on "
                f"(its layer-{self.target_layers[0]} features are {tuple(target_features[0].shape)})"
            )
        if (teacher_input_ids is None) != (token_alignment is None):
            raise ValueError("cross-tokenizer LET needs both teacher_input_ids and token_alignment (or neither)")
        teacher_ids = input_ids if teacher_input_ids is None else teacher_input_ids
        teacher_features = self.teacher(teacher_ids.to(_device_of(self.teacher.model, input_ids.device)))
        teacher_features = [f.to(input_ids.device) for f in teacher_features]
        if token_alignment is not None:
            expected = (tuple(input_ids.shape[:2]), tuple(teacher_input_ids.shape[:2]))
            got = (tuple(token_alignment.mask.shape), (token_alignment.mask.shape[0], token_alignment.teacher_length))
            if got != expected:
                raise ValueError(
                    f"token_alignment covers target {got[0]} and teacher {got[1]} tokens, but input_ids is "
                    f"{tuple(input_ids.shape)} and teacher_input_ids is {tuple(teacher_input_ids.shape)}"
                )
            token_alignment = token_alignment.to(input_ids.device)
            teacher_features = [token_alignment.gather(f) for f in teacher_features]
            mask = token_alignment.mask if mask is None else token_alignment.mask & mask.bool()
        align = self.projector.alignment_loss(target_features, teacher_features, self.loss_fn, mask)
        total = lam * align if lm_loss is None else lm_loss + lam * align
        return LETOutput(total, lm_loss, align, lam, step)


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default
