"""benchmarks/kernels.py: the roofline arithmetic, and the message without a GPU (its code paths run in the CPU smoke
run of benchmarks/gpu_suite.py, tests/test_gpu_suite.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernels.py"


def test_roofline_counts_projection_gemms_and_minimal_bytes(benchmark_script):
    bench = benchmark_script("kernels")
    case = bench.Case("linear", "cosine", tokens=16384, d_target=2048, d_teacher=576, dtype="bf16")
    bound = bench.roofline(case, element_bytes=2, peak_flops=989e12, peak_bytes_per_s=3.35e12)
    assert bound["flops"] == 6 * 16384 * 2048 * 576
    assert bound["bytes"] == 2 * (2 * 16384 * 2048 + 16384 * 576 + 2 * 576 * 2048)
    assert bound["roofline_ms"] == pytest.approx(1e3 * bound["flops"] / 989e12)

    interpolate = bench.Case("interpolate", "cosine", tokens=16384, d_target=2048, d_teacher=576, dtype="bf16")
    bound = bench.roofline(interpolate, element_bytes=2, peak_flops=989e12, peak_bytes_per_s=3.35e12)
    assert bound["flops"] == 0 and bound["roofline_ms"] == pytest.approx(1e3 * bound["bytes"] / 3.35e12)


def test_baselines_are_measured_before_the_rows_compared_to_them(benchmark_script):
    bench = benchmark_script("kernels")
    order = list(bench.PROVIDERS)
    assert order.index(bench.SPEED_BASELINE) < order.index("fused") and order.index(bench.MEMORY_BASELINE) < order.index("fused")


def test_without_cuda_the_gpu_run_exits_with_a_clear_message():
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, str(SCRIPT)], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "no CUDA device" in result.stderr and "--device cpu --smoke" in result.stderr
