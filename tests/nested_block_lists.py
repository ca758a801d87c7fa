"""Test models whose block lists are nested or several: mixture-of-experts blocks, encoder and decoder lists."""

from __future__ import annotations

import torch
from torch import nn


class Experts(nn.Module):
    """A mixture-of-experts block: its ``experts`` list is longer than the model's list of blocks."""

    def __init__(self, dim: int, count: int) -> None:
        super().__init__()
        self.router = nn.Linear(dim, count)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.router(x).softmax(-1)
        return x + sum(w.unsqueeze(-1) * expert(x) for w, expert in zip(weights.unbind(-1), self.experts))


class Stack(nn.Module):
    """Embeddings, then the lists of :class:`Experts` blocks named in ``lists`` applied in order; ``leaf_lists`` adds
    unused lists of ``nn.Linear`` (e.g. extra heads)."""

    def __init__(self, lists: dict[str, int], leaf_lists: dict[str, int] | None = None, dim: int = 8, experts: int = 6) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, dim)
        self.order = list(lists)
        for name, count in lists.items():
            setattr(self, name, nn.ModuleList(Experts(dim, experts) for _ in range(count)))
        for name, count in (leaf_lists or {}).items():
            setattr(self, name, nn.ModuleList(nn.Linear(dim, dim) for _ in range(count)))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for name in self.order:
            for block in getattr(self, name):
                x = block(x)
        return x
