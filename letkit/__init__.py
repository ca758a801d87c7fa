"""letkit: composable PyTorch blocks for Late-to-Early Training (LET).

LET (Zhao et al., ICLR 2026) speeds up LLM pretraining by pulling an *early* layer of the young target
model towards the *late* (last-layer) features of a small, frozen, already pretrained teacher, with a
weight lambda(s) that decays to zero at step S_stop, after which the teacher is dropped::

    L = L_NLL + lambda(s) * mean_tokens(1 - cos(P(h_target^k), h_teacher^last))

The blocks, each usable on its own:

* :class:`TeacherFeatureExtractor` -- frozen teacher, hidden states of chosen layers.
* :class:`LayerMap` -- which teacher layer aligns with which target layer ("L2E", ...).
* :class:`LayerMappingProjector` -- P: interpolation (paper), linear or MLP.
* :func:`alignment_loss` / :class:`AlignmentLoss` -- cosine (paper), smooth-L1, MSE; torch or Triton.
* :class:`LinearDecay` (paper), :class:`CosineDecay`, :class:`StepDecay`, :class:`ExponentialDecay` -- lambda(s).
* :class:`LETObjective` -- all of the above for any target model, via forward hooks.
* :class:`LogitDistillation` / :func:`logit_distillation_loss` -- the SALT and RKD baselines (KL to the teacher's
  logits), weighted e.g. by :class:`ConstantWeight`.
* :func:`encode_for_alignment` / :class:`TokenAlignment` -- cross-tokenizer LET (teacher with its own tokenizer),
  :func:`check_teacher_compatibility` -- whether a teacher can read the data (:mod:`letkit.token_alignment`).
"""

from letkit.distillation import DistillationOutput, LogitDistillation, logit_distillation_loss
from letkit.layer_map import STRATEGIES, LayerMap
from letkit.losses import BACKENDS, LOSS_KINDS, PROJECTIONS, AlignmentLoss, alignment_loss, interpolate_features
from letkit.objective import LETObjective, LETOutput
from letkit.projector import PROJECTOR_KINDS, LayerMappingProjector
from letkit.schedulers import SCHEDULES, ConstantWeight, CosineDecay, ExponentialDecay, LambdaSchedule, LinearDecay, StepDecay
from letkit.teacher import TeacherFeatureExtractor
from letkit.token_alignment import (
    ALIGNMENT_MODES,
    CrossTokenizerBatch,
    TeacherTokenizedLoader,
    TokenAlignment,
    align_tokens,
    check_teacher_compatibility,
    encode_for_alignment,
    same_tokenizer,
    tokenize_for_teacher,
)

__version__ = "0.1.0"

__all__ = [
    "ALIGNMENT_MODES",
    "AlignmentLoss",
    "CrossTokenizerBatch",
    "BACKENDS",
    "ConstantWeight",
    "CosineDecay",
    "DistillationOutput",
    "ExponentialDecay",
    "LETObjective",
    "LETOutput",
    "LOSS_KINDS",
    "LambdaSchedule",
    "LayerMap",
    "LayerMappingProjector",
    "LinearDecay",
    "LogitDistillation",
    "PROJECTIONS",
    "PROJECTOR_KINDS",
    "SCHEDULES",
    "STRATEGIES",
    "StepDecay",
    "TeacherFeatureExtractor",
    "TeacherTokenizedLoader",
    "TokenAlignment",
    "align_tokens",
    "alignment_loss",
    "check_teacher_compatibility",
    "encode_for_alignment",
    "interpolate_features",
    "logit_distillation_loss",
    "same_tokenizer",
    "tokenize_for_teacher",
]
