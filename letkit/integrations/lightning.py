"""LET in a Lightning ``LightningModule``: :class:`LETMixin` (``pip install letkit[lightning]``).

::

    class Model(LETMixin, lightning.LightningModule):
        def __init__(self, model, teacher):
            super().__init__()
            self.model = model
            self.let = letkit.LETObjective(model, teacher, projector="linear",
                                           schedule=letkit.LinearDecay(0.1, stop_step=2000))

        def training_step(self, input_ids, batch_idx):
            logits = self.model(input_ids)
            lm_loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())
            return self.let_loss(input_ids, lm_loss)

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-4)   # self.parameters() holds the projector's

The mixin imports nothing from Lightning: it works with ``lightning.LightningModule`` and
``pytorch_lightning.LightningModule`` alike.
"""

from __future__ import annotations

import math
from typing import Any

import torch.distributed as dist
from torch import Tensor

from letkit.integrations.checks import (
    check_projector_in_optimizer,
    check_same_vocabulary,
    warn_if_schedule_outlasts_run,
)
from letkit.objective import LETObjective
from letkit.token_alignment import TokenAlignment

__all__ = ["LETMixin"]

SCHEDULE_KEY = "let_schedule"
"""Where the lambda schedule's ``state_dict()`` lives in a Lightning checkpoint."""


class LETMixin:
    """Adds LET to a ``LightningModule``: put it first among the bases, assign the
    :class:`~letkit.LETObjective` as an attribute (it becomes a submodule), and return :meth:`let_loss` from
    ``training_step``.

    As a submodule the objective's learned projector is in ``self.parameters()`` (so in the optimizer you build
    from them), moves with the module, and is saved and restored with it in every checkpoint; its gradients are
    reduced by the strategy's DDP. On top of that:

    * the step ``s`` is ``trainer.global_step`` (optimizer steps; every micro-batch of one step shares it), so a
      resumed run continues the schedule where it stopped; the teacher is released at S_stop;
    * the loss is scaled for gradient accumulation by Lightning, the alignment term with it;
    * ``align_loss`` (NaN once the teacher is released) and ``lambda`` are logged with ``self.log`` on every step;
    * outside training (validation, test) :meth:`let_loss` returns the LM loss: the teacher does not run;
    * the schedule's ``state_dict()`` is checkpointed (``on_save_checkpoint``) and checked on resume;
    * the first training step refuses an optimizer without the projector's parameters, warns when S_stop lies past
      the run's last step, and (without a token alignment, unless ``let_check_vocabulary`` is False) refuses a
      teacher whose vocabulary differs from the target's (``let_tokenizer``, when set, is compared with the
      teacher's tokenizer);
    * the teacher is moved to the module's device.

    Override ``on_save_checkpoint`` / ``on_load_checkpoint`` only with a ``super()`` call.
    """

    let_check_vocabulary: bool = True
    """Set False when target and teacher share a tokenizer whose embedding tables differ in size (padding)."""
    let_tokenizer: Any = None
    """The data's tokenizer, if known: compared with the teacher's instead of the embedding sizes."""

    @property
    def let_objective(self) -> LETObjective:
        """The module's one :class:`~letkit.LETObjective` submodule."""
        found = [m for m in self.modules() if isinstance(m, LETObjective)]
        if len(found) != 1:
            raise ValueError(f"a LETMixin module needs exactly one LETObjective among its submodules (assign it as an "
                             f"attribute, e.g. self.let = LETObjective(...)), found {len(found)}")
        return found[0]

    def let_loss(
        self,
        input_ids: Tensor,
        lm_loss: Tensor,
        *,
        mask: Tensor | None = None,
        teacher_input_ids: Tensor | None = None,
        token_alignment: TokenAlignment | None = None,
    ) -> Tensor:
        """``lm_loss + lambda(trainer.global_step) * L_align`` for the target forward pass that just ran, in training;
        ``lm_loss`` otherwise. The arguments are :meth:`LETObjective.forward`'s."""
        if not self.training:
            return lm_loss
        objective = self.let_objective
        if not getattr(self, "_let_checked", False):
            self._check_let_setup(objective, token_alignment is not None)
        out = objective(input_ids, lm_loss=lm_loss, step=self.trainer.global_step, mask=mask,
                        teacher_input_ids=teacher_input_ids, token_alignment=token_alignment)
        self.log("lambda", out.lambda_, on_step=True, on_epoch=False)
        # NaN once the teacher is gone: Lightning would otherwise log the last value again until the epoch ends
        self.log("align_loss", math.nan if out.align_loss is None else out.align_loss.detach(), on_step=True,
                 on_epoch=False)
        if out.align_loss is not None:
            return out.loss
        trainable = [p for p in objective.parameters() if p.requires_grad]
        if trainable and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            # The strategy's DDP expects a gradient for every parameter it holds; once the teacher is gone the
            # projector is unused, so it gets an exact zero instead of a "parameters unused" error.
            return out.loss + sum(p.sum() for p in trainable) * 0.0
        return out.loss

    def _check_let_setup(self, objective: LETObjective, has_token_alignment: bool) -> None:
        trainer = self.trainer
        check_projector_in_optimizer(objective, [g for opt in trainer.optimizers for g in opt.param_groups])
        max_steps = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if isinstance(max_steps, int):
            warn_if_schedule_outlasts_run(objective.schedule, max_steps)
        if not objective.finished:
            objective.teacher.model.to(self.device)
            if self.let_check_vocabulary and not has_token_alignment:
                # the module's first embedding table is the target's (the objective holds none)
                check_same_vocabulary(self, objective, self.let_tokenizer, opt_out="let_check_vocabulary = False")
        self._let_checked = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the lambda schedule's state (its hyperparameters are checked on resume)."""
        super().on_save_checkpoint(checkpoint)
        checkpoint[SCHEDULE_KEY] = self.let_objective.schedule.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the lambda schedule's state; a ValueError if its hyperparameters changed."""
        super().on_load_checkpoint(checkpoint)
        if SCHEDULE_KEY in checkpoint:
            self.let_objective.schedule.load_state_dict(checkpoint[SCHEDULE_KEY])

