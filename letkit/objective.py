"""LETObjective: the LET loss for any target model, assembled from letkit's blocks.

    L_total(s) = L_NLL + lambda(s) * mean over layer pairs of L_align(P(h_target^k), h_teacher^j)

The target's layer outputs are captured with forward hooks (the user's model code is untouched); the
teacher runs only while lambda(s) > 0 and is released for good once the schedule is done.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from letkit.integrations.ddp import projector_alignment_loss
from letkit.layer_map import LayerMap, PairSpec
from letkit.losses import AlignmentLoss, check_mask
from letkit.module_paths import describe_output, find_block_list, module_output_tensor
from letkit.projector import PROJECTOR_KINDS, LayerMappingProjector
from letkit.schedulers import LambdaSchedule, require_schedule
from letkit.target_capture import OutputExtractor, TargetCapture
from letkit.teacher import TeacherFeatureExtractor
from letkit.token_alignment import TokenAlignment
from letkit.validation import check_int


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


class TeacherObjective(nn.Module):
    """What :class:`LETObjective` and :class:`~letkit.LogitDistillation` share: the required lambda schedule, whose
    ``current_step`` is the one step counter; a frozen teacher that runs only while lambda > 0 and is released
    for good once the schedule is done (None from the start in a run resumed after it); and the
    :class:`TargetCapture` of the target's forward outputs, closed with it.

    Subclasses set ``self.teacher`` and ``self._capture`` and start :meth:`forward` with :meth:`_lambda_at`.
    """

    def __init__(self, target: nn.Module, teacher: TeacherFeatureExtractor | nn.Module | None,
                 schedule: LambdaSchedule | None, *, example: str) -> None:
        super().__init__()
        self.schedule = require_schedule(schedule, objective=type(self).__name__, example=example)
        self.teacher: TeacherFeatureExtractor | None = None
        self._capture: TargetCapture | None = None
        if teacher is None and not self.schedule.is_done():
            raise ValueError(
                f"teacher=None is only for a run at or after the schedule's stop_step (S_stop), but the schedule is at "
                f"step {self.schedule.current_step} < stop_step {self.schedule.stop_step}: pass the teacher"
            )
        if teacher is not None:
            refuse_shared_parameters(target, teacher)

    @property
    def finished(self) -> bool:
        """True once the schedule is done and the teacher and hooks are gone (from the start without a teacher)."""
        return self.teacher is None or self.teacher.released

    def finish(self) -> None:
        """Release the teacher and remove the target hooks (called automatically once lambda is 0 for good)."""
        if self._capture is not None:
            self._capture.close()
        if self.teacher is not None:
            self.teacher.release()

    def _lambda_at(self, step: int | None) -> float:
        """lambda at ``step`` (None: ``schedule.current_step``), which becomes ``schedule.current_step``. At lambda = 0
        what the target's forward captured is dropped and, once the schedule is done, the teacher is released."""
        lam = self.schedule(step)  # checks step
        step = self.schedule.current_step if step is None else step
        if lam > 0.0 and self.finished:
            how = "was built without one" if self.teacher is None else "was released at the end of the schedule"
            raise RuntimeError(f"lambda({step}) = {lam} > 0, but the objective's teacher {how}")
        self.schedule.current_step = step
        if lam == 0.0:
            if self.schedule.is_done(step) and not self.finished:
                self.finish()
            if self._capture is not None:
                self._capture.discard()
        return lam


class LETObjective(TeacherObjective):
    """Late-to-Early Training objective for any target ``nn.Module``.

    Building it runs neither model when the feature sizes are known: from ``target_dims`` / ``teacher_dims``,
    or else from each model's ``config.hidden_size`` (letkit's and transformers' models have one). Only a
    model with neither is run once on a two-token input to measure them.

    Args:
        target: the model being trained. Its blocks are found automatically (or give ``block_list``).
        teacher: a :class:`TeacherFeatureExtractor`, or a plain frozen ``nn.Module`` to wrap in one (wrapping
            runs the extractor's causality probe; pass an extractor built with ``check_causal=False`` to skip
            it). It must not share parameters with ``target``. The layer map decides which of its layers are
            used. None only when ``schedule`` is already done (a run resumed at or after S_stop): the objective
            is then finished from the start, needs no teacher and returns the LM loss.
        schedule: the lambda schedule, required: S_stop (``stop_step``) is the knob the paper leaves open, e.g.
            ``letkit.LinearDecay(0.1, stop_step=20_000)`` for the paper's schedule. Its ``current_step`` is the
            objective's step counter (see :meth:`forward`).
        layer_map: a :class:`LayerMap` or anything its constructor takes (default ``"L2E"``).
        projector: a :class:`LayerMappingProjector`, or its kind (``"interpolate"``, ``"linear"``, ``"mlp"``)
            to build one for the sizes below.
        loss: an :class:`AlignmentLoss` or its kind (``"cosine"``, ``"smooth_l1"``, ``"mse"``).
        target_dims, teacher_dims: hidden size of each pair's target / teacher layer (an int for all pairs, or
            one per pair), for building the projector from its kind. Default: the model's
            ``config.hidden_size``; pass them when that is not the size of the aligned layers. Without a
            teacher, a learned projector (``"linear"``, ``"mlp"``) needs ``teacher_dims`` (it is rebuilt so a
            checkpoint's state loads); an ``"interpolate"`` one holds no state and is not built
            (``objective.projector`` is None).
        block_list: module path of the target's block list, when automatic discovery is wrong or ambiguous
            (the same argument as :class:`TeacherFeatureExtractor`'s for the teacher).
        check_finite: fail on any step where the teacher's features hold NaN/Inf (a broken teacher, or one
            overflowing in its dtype) instead of training on them: a ValueError on CPU; on GPUs a device-side
            assertion that fails the run at its next synchronisation and never syncs the host, so it does not
            slow the step down. Applies when ``loss`` is a kind; an :class:`AlignmentLoss` keeps its own setting.
        target_block_list: deprecated alias of ``block_list``.

    Typical use, inside any training loop::

        logits = model(input_ids)                                   # hooks capture layer k
        lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
        out = objective(input_ids, lm_loss=lm_loss, step=step)      # runs the teacher while lambda > 0
        out.loss.backward()

    Projector parameters (for learned projectors) are this module's parameters: give
    ``objective.parameters()`` to the optimizer alongside the model's. Under DDP a learned projector's gradients
    are all-reduced like the model's without anything to do (:mod:`letkit.integrations.ddp`); under FSDP2 shard
    it with ``fully_shard`` and ``register_fsdp_forward_method(projector, "loss")`` as examples/pretrain_fsdp.py
    does. The lambda schedule's state is not part of this module's ``state_dict()``: checkpoint
    ``objective.schedule.state_dict()``.
    """

    def __init__(
        self,
        target: nn.Module,
        teacher: TeacherFeatureExtractor | nn.Module | None,
        *,
        schedule: LambdaSchedule | None = None,
        layer_map: LayerMap | PairSpec | Sequence[PairSpec] = "L2E",
        projector: LayerMappingProjector | str = "interpolate",
        loss: AlignmentLoss | str = "cosine",
        target_dims: int | Sequence[int] | None = None,
        teacher_dims: int | Sequence[int] | None = None,
        block_list: str | None = None,
        check_finite: bool = True,
        target_block_list: str | None = None,
    ) -> None:
        super().__init__(target, teacher, schedule, example="letkit.LinearDecay(0.1, stop_step=...)")
        if target_block_list is not None:
            warnings.warn("LETObjective(target_block_list=...) is deprecated: pass block_list=... (the teacher's name "
                          "for it too)", DeprecationWarning, stacklevel=2)
            if block_list is not None and block_list != target_block_list:
                raise ValueError(f"block_list={block_list!r} and its deprecated alias target_block_list="
                                 f"{target_block_list!r} disagree: pass only block_list")
            block_list = target_block_list
        if isinstance(loss, AlignmentLoss) and loss.check_finite and not check_finite:
            raise ValueError("check_finite=False has no effect on the AlignmentLoss passed as loss (it has "
                             "check_finite=True): pass AlignmentLoss(..., check_finite=False) or a loss kind")
        self.layer_map = layer_map if isinstance(layer_map, LayerMap) else LayerMap(layer_map)
        self.loss_fn = loss if isinstance(loss, AlignmentLoss) else AlignmentLoss(loss, check_finite=check_finite)
        if isinstance(projector, str):
            if projector not in PROJECTOR_KINDS:
                raise ValueError(f"projector must be a LayerMappingProjector or one of {PROJECTOR_KINDS}, got {projector!r}")
        elif not isinstance(projector, LayerMappingProjector):
            raise TypeError(f"projector must be a LayerMappingProjector or one of {PROJECTOR_KINDS}, got "
                            f"{type(projector).__name__}")
        elif target_dims is not None or teacher_dims is not None:
            raise ValueError("target_dims/teacher_dims size a projector built from its kind; the "
                             "LayerMappingProjector passed as projector has its own sizes: pass one or the other")
        if teacher is None:
            self.block_list_path: str | None = None
            self.pairs: list[tuple[int, int]] = []
            self.target_layers: list[int] = []
            num_pairs = len(self.layer_map.pairs)
        else:
            if not isinstance(teacher, TeacherFeatureExtractor):
                teacher = TeacherFeatureExtractor(teacher)
            self.teacher = teacher
            self.block_list_path, target_blocks = find_block_list(target, block_list)
            self.pairs = self.layer_map.resolve(teacher.num_layers, len(target_blocks))
            teacher.select_layers([t for t, _ in self.pairs])
            self.target_layers = [s for _, s in self.pairs]
            num_pairs = len(self.pairs)
        if not isinstance(projector, str) and len(projector.target_dims) != num_pairs:
            raise ValueError(f"the projector has {len(projector.target_dims)} layer pairs, but the layer map "
                             f"{self.layer_map.pairs} has {num_pairs}")
        if self.teacher is not None:
            self._capture = TargetCapture(
                target,
                {k: (target_blocks[k], _block_hidden_state(k, target_blocks[k], self.block_list_path))
                 for k in sorted(set(self.target_layers))},
                what="features",
            )
        if isinstance(projector, str):
            try:
                projector = self._build_projector(target, projector, num_pairs, target_dims, teacher_dims)
            except BaseException:
                if self._capture is not None:  # an objective that was never built must not leave hooks on the target
                    self._capture.close()
                raise
        self.projector: LayerMappingProjector | None = projector

    def _build_projector(
        self,
        target: nn.Module,
        kind: str,
        num_pairs: int,
        target_dims: int | Sequence[int] | None,
        teacher_dims: int | Sequence[int] | None,
    ) -> LayerMappingProjector | None:
        parameter = next(target.parameters(), None)
        device = parameter.device if parameter is not None else torch.device("cpu")
        target_dims = _dims("target_dims", target_dims, num_pairs) or _dims_from_config(target, num_pairs)
        if self.teacher is None:
            teacher_dims = _dims("teacher_dims", teacher_dims, num_pairs)
            if kind == "interpolate":
                return None  # it holds no state, so there is nothing for a checkpoint to restore
            if teacher_dims is None:
                raise ValueError(f"without a teacher, pass teacher_dims= (and target_dims= unless target.config."
                                 f"hidden_size has it) so the {kind} projector is rebuilt and a checkpoint's state loads "
                                 "into it")
            if target_dims is None:
                raise ValueError(f"without a teacher, pass target_dims= ({type(target).__name__} has no "
                                 "config.hidden_size)")
            return LayerMappingProjector(target_dims, teacher_dims, kind).to(device)
        teacher_dims = _dims("teacher_dims", teacher_dims, num_pairs) or _dims_from_config(self.teacher.model, num_pairs)
        probe = torch.zeros(1, 2, dtype=torch.long, device=device)
        if target_dims is None:
            was_training = target.training
            # eager and in eval mode: the probe must neither mark a compiled target's shapes dynamic nor run dropout
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                target.eval()
                target(probe)
                features = self._capture.get(probe)
                self._capture.discard()
            target.train(was_training)
            target_dims = [features[k].shape[-1] for k in self.target_layers]
        if teacher_dims is None:
            teacher_dims = self.teacher.feature_dims(probe.to(_device_of(self.teacher.model, device)))
        return LayerMappingProjector(target_dims, teacher_dims, kind).to(device)

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

        The step counter is ``self.schedule.current_step``, the only one: passing ``step=`` sets it, leaving it
        out uses it (advance it with ``objective.schedule.step()`` once per optimizer step). A step is an
        optimizer step: with gradient accumulation, call the objective once per micro-batch, right after that
        micro-batch's target forward, with the same ``step`` (lambda and the teacher's release depend on the step
        only, so repeated calls at one step agree). The target features come from the latest forward run in the
        same grad mode as this call: an evaluation forward under ``torch.no_grad()`` in between does not replace
        the training forward's features. Every argument is checked before the teacher runs, and a refused call leaves
        the captured outputs for a corrected one.

        Args:
            input_ids: the ``[B, T]`` token ids the target was just run on; the teacher reads the same
                unless the teacher has its own tokenizer.
            lm_loss: the target's language-modelling loss; None to get only ``lambda * L_align``.
            step: the training (optimizer) step; sets ``schedule.current_step``.
            mask: optional ``[B, T]`` token mask, bool or 0/1 (True/1 = align this token), e.g. padding.
            teacher_input_ids, token_alignment: cross-tokenizer LET (see :mod:`letkit.token_alignment`):
                the ``[B, S]`` teacher tokenisation of the same texts and the alignment that gives each
                target position the teacher feature for the same text, causally; positions without one
                are masked out. Leave both None when target and teacher share a tokenizer.

        Raises:
            RuntimeError: lambda > 0 but no target forward ran in this grad mode since the last call, or the
                features carry no gradient under grad mode (LET would not train the target), or the teacher
                is gone.
            ValueError: the captured features are not those of ``input_ids`` (another batch ran through the
                target since), or bad masks / cross-tokenizer inputs.
        """
        if (teacher_input_ids is None) != (token_alignment is None):
            raise ValueError("cross-tokenizer LET needs both teacher_input_ids and token_alignment (or neither)")
        if token_alignment is not None:
            expected = (tuple(input_ids.shape[:2]), tuple(teacher_input_ids.shape[:2]))
            got = (tuple(token_alignment.mask.shape), (token_alignment.mask.shape[0], token_alignment.teacher_length))
            if got != expected:
                raise ValueError(
                    f"token_alignment covers target {got[0]} and teacher {got[1]} tokens, but input_ids is "
                    f"{tuple(input_ids.shape)} and teacher_input_ids is {tuple(teacher_input_ids.shape)}"
                )
        lam = self._lambda_at(step)
        if lam == 0.0:
            total = lm_loss if lm_loss is not None else torch.zeros((), device=input_ids.device)
            return LETOutput(total, lm_loss, None, 0.0)
        captured = self._capture.get(input_ids)
        target_features = [captured[k] for k in self.target_layers]
        device = target_features[0].device
        if mask is not None:
            check_mask(mask, tuple(target_features[0].shape[:-1]), device)
            mask = mask != 0  # checked once: as bools the losses need not check its values again
        self._capture.discard()  # every argument is valid: the features are used now
        teacher_ids = input_ids if teacher_input_ids is None else teacher_input_ids
        teacher_features = self.teacher(teacher_ids.to(_device_of(self.teacher.model, device)))
        teacher_features = [f.to(device) for f in teacher_features]
        if token_alignment is not None:
            token_alignment = token_alignment.to(device)
            teacher_features = [token_alignment.gather(f) for f in teacher_features]
            mask = token_alignment.mask if mask is None else token_alignment.mask & mask
        align = projector_alignment_loss(self.projector, target_features, teacher_features, self.loss_fn, mask)
        total = lam * align if lm_loss is None else lm_loss + lam * align
        return LETOutput(total, lm_loss, align, lam)


def _block_hidden_state(layer: int, block: nn.Module, block_list_path: str) -> OutputExtractor:
    def hidden_state(output: Any) -> Tensor:
        hidden = module_output_tensor(output)
        if hidden is None:
            raise TypeError(
                f"target block {layer} ({block_list_path}.{layer}, {type(block).__name__}) returned "
                f"{describe_output(output)}, not a tensor or a tuple/list whose first item is one: LET aligns the "
                "hidden state a block returns; pass block_list= naming a list of blocks that return it"
            )
        return hidden

    return hidden_state


def refuse_shared_parameters(target: nn.Module, teacher: TeacherFeatureExtractor | nn.Module) -> None:
    """ValueError when the teacher (a model, or a :class:`TeacherFeatureExtractor`'s model) shares parameters with
    ``target``: freezing the teacher would freeze the target. Call it before wrapping a model in an extractor."""
    wrapped = isinstance(teacher, TeacherFeatureExtractor)
    model = teacher.model if wrapped else teacher
    if not isinstance(model, nn.Module):  # not a model: TeacherFeatureExtractor's constructor names its type
        return
    teacher_parameters = {id(p) for p in model.parameters()}
    shared = [name for name, p in target.named_parameters() if id(p) in teacher_parameters]
    if shared:
        frozen = (" The TeacherFeatureExtractor already froze them (requires_grad=False): set it back on the target."
                  if wrapped else "")
        raise ValueError(
            f"the teacher shares {len(shared)} parameters with the target (e.g. {shared[:3]}): the teacher is a separate "
            f"frozen model, and freezing it would freeze the target. Pass another model, or copy.deepcopy(target).{frozen}"
        )


def _dims(name: str, dims: int | Sequence[int] | None, num_pairs: int) -> list[int] | None:
    if dims is None:
        return None
    if isinstance(dims, str) or not isinstance(dims, Sequence):
        return [check_int(name, dims, minimum=1)] * num_pairs
    if len(dims) != num_pairs:
        raise ValueError(f"{name} must be a positive int or {num_pairs} of them (one per layer pair), got {dims!r}")
    return [check_int(f"{name}[{i}]", d, minimum=1) for i, d in enumerate(dims)]


def _dims_from_config(model: nn.Module, num_pairs: int) -> list[int] | None:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    return [size] * num_pairs if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _device_of(module: nn.Module, default: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else default
