"""LET inside the trainers people already run; each submodule imports its framework only when it is imported.

* :mod:`letkit.integrations.hf` -- :class:`~letkit.integrations.hf.LETTrainer`, a ``transformers.Trainer``
  (``pip install letkit[hf]``).
* :mod:`letkit.integrations.lightning` -- :class:`~letkit.integrations.lightning.LETMixin` for a
  ``lightning.LightningModule`` (``pip install letkit[lightning]``).
* :mod:`letkit.integrations.torchtitan` -- a torchtitan ``Trainer`` with a ``let`` config section
  (``pip install letkit[torchtitan]``).
* :mod:`letkit.integrations.ddp` -- how a learned projector's gradients are reduced under DDP (used by
  :class:`~letkit.LETObjective` itself: nothing to call).

``import letkit`` imports none of transformers, lightning or torchtitan.
"""
