"""Logit distillation from a small frozen teacher: the SALT and RKD baselines the LET paper compares with.

    L_total(s) = L_NLL + lambda(s) * L_KD
    L_KD       = T^2 * mean over tokens of KL(softmax(z_teacher / T) || softmax(z_target / T))

``T`` is the temperature. The ``T^2`` factor is Hinton et al.'s (2015) convention: the gradient of ``KL`` with
respect to the target's logits scales like ``1 / T^2`` as ``T`` grows, so ``T^2 * KL`` keeps the
distillation term's gradients on the same scale whatever ``T`` is (as ``T -> inf`` its gradient tends to the
difference of the mean-centred logits divided by the vocabulary size, not to 0). ``KL`` is used rather than the
cross-entropy with the teacher's soft labels: both have the same gradients, and ``KL`` is 0 when the target
matches the teacher.

Where the baselines come from:

* **SALT** (Rawat et al. 2024, *A Little Help Goes a Long Way: Efficient LLM Training by Leveraging Small
  LMs*, arXiv:2410.18779): a two-stage recipe, knowledge distillation from the small LM's soft labels in the
  early phase of training, then standard next-token training. Here: a schedule that ends early, e.g.
  ``ConstantWeight(w, stop_step=n_kd)`` (an abrupt switch) or ``LinearDecay(w, stop_step=n_kd)``. The SALT_DS
  variant's data selection by the small model is not part of this objective.
* **RKD**, the LET paper's (Zhao et al., ICLR 2026) other baseline, read as *reverse* knowledge distillation:
  the same logit distillation from the smaller model, for the whole run ("reverse" because the teacher is
  smaller than the student; the KL keeps its usual teacher-to-student direction). Here: ``ConstantWeight(w,
  stop_step=total_steps)``. The paper's own wording of RKD was not available to check (only its abstract and
  summaries); this reading fits its framing of both baselines as uses of the small model's predictions. It is
  not relational KD (Park et al. 2019), which distils distances between samples' embeddings.

A loss written as ``(1 - w) * L_NLL + w * L_KD`` (a mixing weight) equals ``(1 - w) * (L_NLL + lambda * L_KD)``
with ``lambda = w / (1 - w)``: the same objective up to an overall factor.

Memory: the teacher runs only to its final hidden state ``[tokens, d_teacher]``; its LM head is applied per
chunk of ``chunk_size`` tokens inside the loss, and the backward pass recomputes each chunk instead of keeping
anything of size ``[tokens, vocab]`` between forward and backward. See :class:`LogitDistillation` for the
figures.

The package holds the loss, :func:`logit_distillation_loss` (:mod:`letkit.distillation.loss`), and the objective
that runs the teacher and weights the loss by a schedule, :class:`LogitDistillation`
(:mod:`letkit.distillation.objective`).
"""

from letkit.distillation.loss import DEFAULT_CHUNK_SIZE, logit_distillation_loss
from letkit.distillation.objective import DistillationOutput, LogitDistillation

__all__ = ["DEFAULT_CHUNK_SIZE", "DistillationOutput", "LogitDistillation", "logit_distillation_loss"]
