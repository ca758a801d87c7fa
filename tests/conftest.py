"""Shared test setup: Triton's CPU interpreter for the fused kernels, a tiny causal LM that is not one of letkit's
models (any nn.Module must work), and a process group of one rank.

Without CUDA the fused kernels run under Triton's interpreter, which is chosen when ``letkit.kernels`` is imported:
``TRITON_INTERPRET=1`` is set here, before any test module is collected, and a session in which ``letkit.kernels``
was imported before this file (a plugin, or ``pytest.main`` from a script that imported it) is refused.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    _kernels = sys.modules.get("letkit.kernels.alignment_common")
    if _kernels is not None and not _kernels.INTERPRETED:
        raise pytest.UsageError(
            "letkit.kernels was imported before tests/conftest.py switched on Triton's CPU interpreter "
            "(TRITON_INTERPRET=1), so its kernels were built for a GPU this machine does not have: "
            "set TRITON_INTERPRET=1 before starting the tests, or do not import letkit.kernels before pytest"
        )


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


@pytest.fixture
def benchmark_script():
    """``load(name)``: the script benchmarks/<name>.py as a module (the benchmarks are scripts, not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"benchmark_{name}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
        return module

    return load


@pytest.fixture
def world_of_one():
    """An in-process gloo process group of one rank (an in-memory store: no port to race for)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()
