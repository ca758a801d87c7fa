"""benchmarks/kernels.py: the roofline arithmetic, and a CPU smoke run of its code paths (fused via Triton's interpreter)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("kernels_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def test_roofline_counts_projection_gemms_and_minimal_bytes():
    bench = load_benchmark()
    case = bench.Case("linear", "cosine", tokens=16384, d_target=2048, d_teacher=576, dtype="bf16")
    bound = bench.roofline(case, element_bytes=2, peak_flops=989e12, peak_bytes_per_s=3.35e12)
    assert bound["flops"] == 6 * 16384 * 2048 * 576
    assert bound["bytes"] == 2 * (2 * 16384 * 2048 + 16384 * 576 + 2 * 576 * 2048)
    assert bound["roofline_ms"] == pytest.approx(1e3 * bound["flops"] / 989e12)

    interpolate = bench.Case("interpolate", "cosine", tokens=16384, d_target=2048, d_teacher=576, dtype="bf16")
    bound = bench.roofline(interpolate, element_bytes=2, peak_flops=989e12, peak_bytes_per_s=3.35e12)
    assert bound["flops"] == 0 and bound["roofline_ms"] == pytest.approx(1e3 * bound["bytes"] / 3.35e12)


def test_cpu_smoke_run_writes_consistent_results(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "results.json"
    environment = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--providers", "fused", "eager", "--out", str(out)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(out.read_text())["results"]
    assert {(row["case"]["projection"], row["provider"]) for row in rows} == {
        (projection, provider) for projection in ("linear", "interpolate") for provider in ("fused", "eager")
    }
    for row in rows:
        assert "error" not in row, row
        assert row["fwd_bwd_ms"] > 0 and row["loss_rel_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-2


def test_without_cuda_the_gpu_run_exits_with_a_clear_message():
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--device cpu --smoke" in result.stderr
