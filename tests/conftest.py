"""Shared test helpers: a tiny causal LM that is not one of letkit's models (any nn.Module must work)."""

from __future__ import annotations

import pytest
import torch
from torch import nn


class TinyBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # causal mixing: each position sees the running mean of the past
        h = self.norm(x)
        steps = torch.arange(1, h.shape[1] + 1, device=h.device, dtype=h.dtype)[None, :, None]
        return x + torch.tanh(self.mix(h.cumsum(1) / steps))


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 50, dim: int = 16, layers: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(TinyBlock(dim) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.final_norm(x))


@pytest.fixture
def tiny_lm():
    def make(vocab: int = 50, dim: int = 16, layers: int = 3, seed: int = 0) -> TinyLM:
        torch.manual_seed(seed)
        return TinyLM(vocab, dim, layers)

    return make
