"""The optimizer pieces every letkit training loop shares: warmup + cosine LR, AdamW weight-decay groups."""

from __future__ import annotations

import math
from collections.abc import Iterable

from torch import nn

__all__ = ["warmup_cosine_lr", "weight_decay_groups"]


def warmup_cosine_lr(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Learning rate at ``step`` (0-based): linear warmup to ``peak_lr`` over ``warmup_steps``, then cosine decay to
    ``min_lr_ratio * peak_lr`` at ``total_steps``, constant after that.

    With ``peak_lr=1.0`` it is the factor for ``torch.optim.lr_scheduler.LambdaLR``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak_lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def weight_decay_groups(params: Iterable[nn.Parameter], weight_decay: float) -> list[dict]:
    """AdamW parameter groups: matrices (embeddings, linear weights) decay; vectors (norms, biases) do not.

    Parameters that do not require grad are left out.
    """
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
