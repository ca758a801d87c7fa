"""benchmarks/gpu_suite.py: the time budget, rows saved as they come, the documented GPU command, and a CPU smoke
run of every stage (so the suite cannot rot between the rare runs on a GPU)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


def test_budget_skips_stages_that_would_overrun_and_every_row_is_saved_at_once(tmp_path, benchmark_script):
    gpu_suite = benchmark_script("gpu_suite")
    args = argparse.Namespace(device="cuda", smoke=False, time_budget=100.0)
    suite = gpu_suite.Suite(args, tmp_path / "suite.json", tmp_path / "suite.md")
    suite.payload.update(environment={key: "-" for key in ("device", "torch", "cuda", "triton", "python", "date", "command", "git_commit")},
                         stages=[], rows=[])
    seen_on_disk = []

    def measure(suite_):
        yield {"value": 1}
        seen_on_disk.append(json.loads(suite_.json_path.read_text())["rows"])  # written before the next row is measured
        yield {"value": 2}

    def broken(suite_):
        yield {"value": 3}
        raise RuntimeError("out of memory")

    stages = [  # run in this process (isolated=False), so that the test can watch the file between rows
        gpu_suite.Stage("measure", 10, measure, isolated=False),
        gpu_suite.Stage("too_long", 1000, lambda suite_: iter([{"never": True}]), isolated=False),
        gpu_suite.Stage("broken", 10, broken, isolated=False),
        gpu_suite.Stage("after_broken", 10, lambda suite_: iter([{"value": 4}]), isolated=False),
    ]
    gpu_suite.run_suite(suite, stages)

    assert seen_on_disk == [[{"stage": "measure", "value": 1}]]
    saved = json.loads(suite.json_path.read_text())
    assert [row.get("value") for row in saved["rows"]] == [1, 2, 3, 4]
    status = {stage["name"]: stage["status"] for stage in saved["stages"]}
    assert status["measure"] == "done" and status["after_broken"] == "done"
    assert status["too_long"].startswith("skipped: estimate 1000 s >")
    assert status["broken"] == "error: RuntimeError: out of memory"
    assert "| too_long | 1000 |" in suite.markdown_path.read_text()


def test_help_shows_the_offline_install_and_the_run_time():
    result = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl" in result.stdout
    assert "python3 -m pip install -q --no-build-isolation --no-deps -e ." in result.stdout
    assert "Expected run time on one H200: about 7 minutes" in result.stdout
    assert "liger-kernel==0.8.5" in result.stdout


def test_cpu_smoke_run_covers_every_stage(tmp_path, benchmark_script):
    pytest.importorskip("triton")
    pytest.importorskip("transformers")
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    command = [sys.executable, str(SCRIPT), "--device", "cpu", "--smoke", "--out-dir", str(tmp_path)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (json_file,) = tmp_path.glob("gpu_suite_cpu-smoke_*.json")
    assert json_file.with_suffix(".md").is_file()
    payload = json.loads(json_file.read_text())
    for key in ("device", "torch", "triton", "date", "command"):
        assert payload["environment"][key]
    gpu_suite = benchmark_script("gpu_suite")
    assert [stage["name"] for stage in payload["stages"]] == [stage.name for stage in gpu_suite.STAGES]
    assert all(stage["status"] == "done" for stage in payload["stages"]), payload["stages"]

    rows = {}
    for row in payload["rows"]:
        rows.setdefault(row["stage"], []).append(row)
    assert rows["peaks"][0]["bf16_matmul_flops"] > 0 and rows["peaks"][0]["copy_bytes_per_s"] > 0
    for stage in ("kernels_headline", "kernels_interpolate", "kernels_grid"):
        for row in rows[stage]:
            if row["provider"] == "liger" and "status" in row:
                assert row["status"].startswith("not installed")  # said, never silently dropped
                continue
            assert "error" not in row, row
            # bf16 inputs: the user's bf16 code rounds the projection, letkit's fused and fp32 paths do not
            assert row["loss_rel_err"] < (1e-2 if row["provider"] in ("eager", "compile", "liger") else 1e-5), row
            assert row["grad_rel_err"] < 2e-2, row
    headline = {row["provider"] for row in rows["kernels_headline"]}
    assert headline == {"compile", "eager", "fused", "liger", "eager_fp32"}
    assert "speedup_vs_compile" in next(row for row in rows["kernels_headline"] if row["provider"] == "fused")
    step = rows["model_step"][0]
    assert step["letkit"]["median_s"] > 0 and abs(step["letkit"]["loss"] - step["transformers"]["loss"]) < 1e-4
    let = {row["run"]: row for row in rows["let_overhead"]}
    assert "error" not in let["baseline"] and "error" not in let["let"], let
    assert let["baseline"]["steady"]["s_per_step"] > 0
    assert let["let"]["while_teacher"]["steps"] == [1, 1] and let["let"]["after_stop"]["steps"] == [3, 3]
    assert "overhead_teacher_pct" in let["overhead"] and "overhead_after_pct" in let["overhead"]
    correctness = rows["correctness"][0]
    assert correctness["returncode"] == 0 and "skipped" in correctness["summary"], correctness  # the CUDA-only tests


def test_an_isolated_stage_past_the_budget_is_stopped_and_keeps_its_rows(tmp_path, monkeypatch, benchmark_script):
    """Isolated stages run in a child process: a hang (or a crash) loses only what that stage had not yet measured."""
    gpu_suite = benchmark_script("gpu_suite")
    monkeypatch.setattr(gpu_suite, "OVERRUN_GRACE_S", 1.0)
    hanging_child = [sys.executable, "-c", f"import time; print({gpu_suite.ROW_PREFIX!r} + '{{\"value\": 1}}', flush=True); time.sleep(120)"]
    real_popen = subprocess.Popen
    monkeypatch.setattr(gpu_suite.subprocess, "Popen", lambda command, **kwargs: real_popen(hanging_child, **kwargs))
    args = argparse.Namespace(device="cuda", smoke=False, time_budget=1.0, peaks=None)
    suite = gpu_suite.Suite(args, tmp_path / "suite.json", tmp_path / "suite.md")
    suite.payload.update(environment={key: "-" for key in ("device", "torch", "cuda", "triton", "python", "date", "command", "git_commit")},
                         stages=[], rows=[])
    gpu_suite.run_suite(suite, [gpu_suite.Stage("hangs", 0.5, None)])
    saved = json.loads(suite.json_path.read_text())
    assert saved["rows"] == [{"stage": "hangs", "value": 1}]
    assert saved["stages"][0]["status"] == "error: TimeoutError: stopped 1 s past the time budget"
    assert saved["stages"][0]["elapsed_s"] < 30
