"""Every GPU figure letkit promises, from one unattended command (benchmarks/RESULTS.md reads its output).

Stages, in this order; each row goes to the JSON as soon as it is measured (estimates are for one H200, cold caches):

  peaks                measured device peaks, a 8192^3 bf16 matmul and a 4 GiB device-to-device copy, beside the
                       data-sheet ones (letkit.hardware); the kernel rooflines use the measured ones         ~10 s
  kernels_headline     fused linear+cosine, 16,384 tokens, 2048 -> 576, bf16, fwd+bwd, every provider of
                       benchmarks/kernels.py (bf16 torch.compile is the baseline, then eager, Liger, fp32)   ~90 s
  kernels_interpolate  interpolate+cosine at 2048 -> 576 and 4096 -> 2048, 16,384 tokens                     ~50 s
  model_step           letkit's Llama vs transformers' LlamaForCausalLM, 1.4b preset, bf16, 4 x 2048 tokens ~50 s
  let_overhead         examples/pretrain_fsdp.py at the 1.4b preset on one GPU: baseline (--teacher.path none) vs
                       LET (--teacher.path random:smollm-135m); steady-state s/step, tokens/s, MFU, peak
                       memory, overhead while the teacher runs and after S_stop                           ~190 s
  correctness          the kernel tests that need CUDA (tests/test_fused_*.py -k cuda) against float64     ~45 s
  kernels_grid         the rest of benchmarks/kernels.py's default grid, case by case, while time remains

Expected run time on one H200: about 7 minutes. ``--time-budget`` (default 420 s) starts no stage (and no grid case)
whose estimate would run past it; a stage already running is not cut short. Results: ``gpu_suite_<gpu>_<date>.json``
(rewritten atomically after every row, so a run stopped at any point keeps everything measured so far) and
``.md`` (the tables) in ``--out-dir``, each with the GPU, torch/triton versions, date and command.

Preparation, on a machine with network, in the repository root (liger-kernel is pure Python; the GPU image has
torch 2.11, triton 3.6 and transformers 5.17, which cover its requirements):

  echo /.whl/ >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
      -d .whl liger-kernel==0.8.5

On the GPU machine (offline), one line:

  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; python3 -m pip install -q --no-build-isolation --no-deps -e . && python3 benchmarks/gpu_suite.py --out-dir $OUT

CPU smoke test of every stage on tiny shapes (what CI runs): python benchmarks/gpu_suite.py --device cpu --smoke

Not a stage: the torchtitan integration's first real run (letkit.integrations.torchtitan; its Trainer cannot run on
CPU). The GPU image has no torchtitan, so carry it in: add torchtitan==0.3.0 and those of its requirements the image
lacks (``pip show torchtitan``: datasets, torchdata, tyro, spmd_types, torch_checkpointing, ... never torch) to the
``pip download`` line above, and copy a torchtitan 0.3.0 source checkout's ``tests/assets``
(its tokenizer and the c4_test data, which its debug config reads by relative path) to ``.tt/tests/assets``; then,
with the time the suite leaves, after the install line above:

  cd .tt && torchrun --standalone --nproc_per_node=1 -m torchtitan.train --module letkit.integrations.torchtitan \\
      --config llama3_debugmodel_let --let.teacher_path random:tiny
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO / "benchmarks" / "results" / "gpu"
OVERRUN_GRACE_S = 60.0
"""How long an isolated stage may run past the time budget before it is stopped (its rows so far are kept)."""
ROW_PREFIX = "@gpu_suite_row "
"""Marks a result row on an isolated stage's stdout."""


@dataclass(frozen=True)
class Stage:
    """One stage: ``run(suite)`` yields result rows (JSON-serialisable dicts); ``estimate_s`` is its expected time on
    one H200. An ``isolated`` stage runs in a process of its own, so a crash (a CUDA error poisons the process's
    context) or a hang loses only that stage, and the time budget can stop it."""

    name: str
    estimate_s: float
    run: Callable[[Suite], Iterator[dict]]
    isolated: bool = True


@dataclass
class Suite:
    """What the stages share: the arguments, the device, the clock, and the results written after every row."""

    args: argparse.Namespace
    json_path: Path | None
    markdown_path: Path | None
    started: float = field(default_factory=time.monotonic)
    payload: dict = field(default_factory=dict)

    @property
    def device(self) -> str:
        return self.args.device

    @property
    def smoke(self) -> bool:
        return self.args.smoke

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def time_left(self) -> float:
        return self.args.time_budget - self.elapsed()

    def record(self, stage: str, row: dict) -> None:
        self.payload["rows"].append({"stage": stage, **row})
        self.save()

    def save(self) -> None:
        from letkit.atomic import atomic_write_bytes, atomic_write_json

        atomic_write_json(self.json_path, self.payload)
        atomic_write_bytes(self.markdown_path, markdown(self.payload).encode())


# ------------------------------------------------------------------------------------------------------ stages


def load_benchmark(name: str):
    """A sibling script of this file (benchmarks/<name>.py) as a module."""
    spec = importlib.util.spec_from_file_location(f"letkit_benchmark_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def run_peaks(suite: Suite) -> Iterator[dict]:
    import torch

    from letkit.hardware import datasheet_peaks

    n, copy_bytes, repeats = (256, 2**24, 3) if suite.smoke else (8192, 2**32, 10)
    device = torch.device(suite.device)

    def seconds_per_call(fn) -> float:
        for _ in range(3):
            fn()
        if device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            stop.record()
            torch.cuda.synchronize()
            return start.elapsed_time(stop) / 1e3 / repeats
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats

    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    matmul_flops = 2 * n**3 / seconds_per_call(lambda: torch.mm(a, b))
    del a, b
    source = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_rate = 2 * copy_bytes / seconds_per_call(lambda: target.copy_(source))  # bytes read + bytes written
    del source, target
    sheet = datasheet_peaks(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    yield {
        "bf16_matmul_flops": matmul_flops,
        "copy_bytes_per_s": copy_rate,
        "datasheet": None if sheet is None else {"name": sheet[0], "bf16_flops": sheet[1], "bytes_per_s": sheet[2]},
        "method": f"{n}^3 bf16 torch.mm and a {copy_bytes / 2**30:.3g} GiB device-to-device copy (bytes read + written), "
        f"mean of {repeats} after 3 warm-ups, CUDA events",
    }


def kernel_stage(cases: Callable[[bool], list[tuple]], providers: Callable[[bool], list[str]], budgeted: bool = False):
    """A stage running benchmarks/kernels.py's cases ``(projection, kind, tokens, d_target, d_teacher)``; with
    ``budgeted`` each case starts only if its estimate fits in the time left."""

    def run(suite: Suite) -> Iterator[dict]:
        import torch

        bench = load_benchmark("kernels")
        argv = ["--device", suite.device, "--dtype", "bf16", "--providers", *providers(suite.smoke)]
        args = bench.parse_args(argv + (["--smoke"] if suite.smoke else []))
        flops, bandwidth, _ = bench.gpu_peaks(torch, args)
        peaks = suite.args.peaks or (flops, bandwidth)
        timer = bench.make_timer(torch, args)
        for projection, kind, tokens, d_target, d_teacher in cases(suite.smoke):
            if budgeted and not suite.smoke and suite.time_left() < GRID_CASE_ESTIMATE_S:
                yield {"status": f"stopped: {suite.time_left():.0f} s left, a case takes ~{GRID_CASE_ESTIMATE_S} s"}
                return
            case = bench.Case(projection, kind, tokens, d_target, d_teacher, "bf16")
            print(f"  {case.label}", file=sys.stderr, flush=True)
            yield from bench.run_case(torch, args, case, timer, peaks)

    return run


GRID_CASE_ESTIMATE_S = 20
HEADLINE = ("linear", "cosine", 16384, 2048, 576)
INTERPOLATE = [("interpolate", "cosine", 16384, 2048, 576), ("interpolate", "cosine", 16384, 4096, 2048)]
SMOKE_LINEAR, SMOKE_INTERPOLATE = ("linear", "cosine", 48, 40, 24), ("interpolate", "cosine", 48, 40, 24)


def grid_cases(smoke: bool) -> list[tuple]:
    """benchmarks/kernels.py's default grid minus the cases of the earlier stages, larger shapes first."""
    if smoke:
        return [("linear", "mse", 48, 24, 40)]
    done = {HEADLINE, *INTERPOLATE}
    grid = [
        (projection, "cosine", tokens, d_target, d_teacher)
        for d_target, d_teacher in [(4096, 2048), (2048, 576)]
        for projection in ("linear", "interpolate")
        for tokens in (16384, 32768, 8192)
    ]
    return [case for case in grid if case not in done]


def run_model_step(suite: Suite) -> Iterator[dict]:
    import torch

    bench = load_benchmark("model_step")
    if suite.smoke:
        argv = ["--device", "cpu", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "2", "--heads", "4",
                "--kv-heads", "2", "--vocab", "128", "--batch", "2", "--seq", "16", "--steps", "2", "--warmup", "1"]
    else:
        argv = ["--preset", "1.4b", "--device", suite.device, "--dtype", "bfloat16", "--batch", "4", "--seq", "2048",
                "--steps", "10", "--warmup", "2"]
    result = bench.measure(bench.parse_args(argv))
    result["command"] = "python benchmarks/model_step.py " + " ".join(argv)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    yield result


def let_runs(smoke: bool) -> dict[str, Any]:
    """Arguments of the two examples/pretrain_fsdp.py runs and the steps that make up each steady-state window."""
    if smoke:  # the tiny config (CPU, fp32, no compile) and its own small random teacher, as few steps as give each window one
        return dict(common=["--config", "tiny"], teacher="", baseline_steps=2, let_steps=3, stop_step=1, warmup=0, settle=0)
    # The preset's micro-batch (8 x 2048 tokens) with one micro-step per step instead of its 8: the same work per
    # micro-step, so the same overhead ratio, in an eighth of the time.
    return dict(
        common=["--config", "1.4b", "--data.path", "random:49152", "--data.grad_accum", "1"], teacher="random:smollm-135m",
        baseline_steps=12, let_steps=20, stop_step=10, warmup=4, settle=2,
    )


def train(arguments: list[str], run_dir: Path, timeout: float) -> tuple[list[dict], str | None]:
    """Run examples/pretrain_fsdp.py (a world of one); its per-step metrics records and an error, if it failed."""
    command = [sys.executable, str(REPO / "examples" / "pretrain_fsdp.py"), *arguments, "--train.run_dir", str(run_dir),
               "--checkpoint.every", "0", "--checkpoint.export", "false", "--log.every", "1", "--optim.warmup_steps", "1"]
    print("  " + " ".join(command[1:]), file=sys.stderr, flush=True)
    error = None
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if result.returncode != 0:
            error = f"exit {result.returncode}: " + (result.stderr or result.stdout)[-1500:]
    except subprocess.TimeoutExpired:
        error = f"stopped after {timeout:.0f} s (time budget)"
    metrics = run_dir / "metrics.jsonl"
    records = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
    return [r for r in records if "event" not in r], error


def steady_state(records: list[dict], first: int, last: int | None = None) -> dict | None:
    """Medians over the records of steps ``first..last`` (1-based, inclusive), or None when there are none."""
    window = [r for r in records if r["step"] >= first and (last is None or r["step"] <= last)]
    if not window:
        return None
    mfu = [r["mfu"] for r in window if r.get("mfu") is not None]
    return {
        "steps": [window[0]["step"], window[-1]["step"]],
        "s_per_step": statistics.median(r["step_time_s"] for r in window),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in window),
        "mfu": statistics.median(mfu) if mfu else None,
        "peak_memory_gib": max(r["peak_memory_gib"] for r in window),
    }


def run_let_overhead(suite: Suite) -> Iterator[dict]:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the training subprocess needs the memory the earlier stages cached
    plan = let_runs(suite.smoke)
    windows = {}
    with tempfile.TemporaryDirectory(prefix="letkit-gpu-suite-") as scratch:
        runs = {
            "baseline": ([*plan["common"], "--teacher.path", "none", "--train.steps", str(plan["baseline_steps"])], None),
            "let": ([*plan["common"], *(["--teacher.path", plan["teacher"]] if plan["teacher"] else []),
                     "--train.steps", str(plan["let_steps"]), "--teacher.stop_step", str(plan["stop_step"])], plan["stop_step"]),
        }
        for name, (arguments, stop_step) in runs.items():
            # Stopped before the parent stops this stage (OVERRUN_GRACE_S), so the steps measured so far are reported.
            timeout = 600.0 if suite.smoke else max(1.0, suite.time_left() + OVERRUN_GRACE_S / 2)
            records, error = train(arguments, Path(scratch) / name, timeout)
            row = {"run": name, "arguments": " ".join(arguments), "error": error}
            if stop_step is None:
                row["steady"] = windows["baseline"] = steady_state(records, plan["warmup"] + 1)
            else:
                row["while_teacher"] = windows["teacher"] = steady_state(records, plan["warmup"] + 1, stop_step)
                row["after_stop"] = windows["after"] = steady_state(records, stop_step + 1 + plan["settle"] + 1)
            row = {key: value for key, value in row.items() if value is not None}
            yield row
    baseline = windows.get("baseline")
    summary = {"run": "overhead", "windows": {key: value["steps"] if value else None for key, value in windows.items()}}
    for phase in ("teacher", "after"):
        if baseline and windows.get(phase):
            summary[f"overhead_{phase}_pct"] = 100 * (windows[phase]["s_per_step"] / baseline["s_per_step"] - 1)
    yield summary


def run_correctness(suite: Suite) -> Iterator[dict]:
    """The kernel tests that need CUDA (compiled kernels on ragged shapes, masks, every loss) against float64."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_fused_linear_alignment.py",
               "tests/test_fused_interpolate_alignment.py", "-k", "cuda"]
    row = {"command": " ".join(["python", *command[1:]])}
    try:
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO,
                                timeout=None if suite.smoke else max(1.0, suite.time_left() + OVERRUN_GRACE_S / 2))
    except subprocess.TimeoutExpired:
        yield {**row, "returncode": None, "summary": "stopped at the time budget", "failures": []}
        return
    lines = result.stdout.strip().splitlines()
    yield {**row, "returncode": result.returncode, "summary": lines[-1] if lines else "",
           "failures": [line for line in lines if line.startswith(("FAILED", "ERROR"))]}


STAGES: list[Stage] = [
    Stage("peaks", 10, run_peaks),
    Stage("kernels_headline", 90, kernel_stage(
        lambda smoke: [SMOKE_LINEAR if smoke else HEADLINE],
        lambda smoke: ["compile", "eager", "fused", "liger", "eager_fp32", *([] if smoke else ["compile_fp32"])],
    )),
    Stage("kernels_interpolate", 50, kernel_stage(
        lambda smoke: [SMOKE_INTERPOLATE] if smoke else INTERPOLATE,
        lambda smoke: ["eager", "fused"] if smoke else ["compile", "eager", "fused"],
    )),
    Stage("model_step", 50, run_model_step),
    Stage("let_overhead", 190, run_let_overhead),
    Stage("correctness", 45, run_correctness),
    Stage("kernels_grid", GRID_CASE_ESTIMATE_S, kernel_stage(
        grid_cases, lambda smoke: ["eager", "fused"] if smoke else ["compile", "eager", "fused"], budgeted=True,
    )),
]
"""The suite, in order. A new stage is one more entry: a name, an estimate in seconds on one H200, and a function
``run(suite)`` yielding result rows (plain dicts, JSON-serialisable)."""


NOTES = {
    "kernels": "rows of benchmarks/kernels.py (its docstring and notes() explain the columns): median do_bench times of "
    "fwd and fwd+bwd; speed goals against 'compile' (torch.compile of the user's bf16 code), memory against 'eager'; "
    "rooflines use the peaks stage's measured matmul rate and copy bandwidth when it ran, else the data sheet's",
    "model_step": "benchmarks/model_step.py: interleaved training steps (forward, fp32 cross-entropy, backward), medians",
    "let_overhead": "examples/pretrain_fsdp.py, a world of one; step_time_s/tokens_per_s/mfu/peak_memory_gib from its "
    "metrics.jsonl (MFU counts the target's FLOPs only), medians over the windows named in each row; overhead = LET "
    "window s/step / baseline s/step - 1",
}


# -------------------------------------------------------------------------------------------------- the runner


def environment(args: argparse.Namespace) -> dict:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):  # the GPU machine's copy may have no .git
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO, timeout=10).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else f"{platform.processor() or 'cpu'} (CPU)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "git_commit": commit or None,
        "smoke": args.smoke,
        "time_budget_s": args.time_budget,
    }


def run_in_child(suite: Suite, stage: Stage) -> Iterator[dict]:
    """Run ``stage`` in a child process (``--child``), yielding its rows as it prints them; the child is stopped
    ``OVERRUN_GRACE_S`` after the time budget (not in smoke runs)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", stage.name, "--device", suite.device,
               "--time-budget", str(max(1.0, suite.time_left()))]
    if suite.smoke:
        command.append("--smoke")
    if suite.args.peaks:
        command += ["--peaks", *map(str, suite.args.peaks)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=REPO)
    stopped = threading.Event()

    def stop() -> None:
        stopped.set()
        child.kill()

    deadline = None if suite.smoke else threading.Timer(max(1.0, suite.time_left() + OVERRUN_GRACE_S), stop)
    if deadline is not None:
        deadline.start()
    try:
        for line in child.stdout:
            if line.startswith(ROW_PREFIX):
                yield json.loads(line[len(ROW_PREFIX):])
            else:
                sys.stdout.write(line)
        returncode = child.wait()
    finally:
        if deadline is not None:
            deadline.cancel()
        if child.poll() is None:
            child.kill()
            child.wait()
    if stopped.is_set():
        raise TimeoutError(f"stopped {OVERRUN_GRACE_S:.0f} s past the time budget")
    if returncode != 0:
        raise RuntimeError(f"the stage's process exited with {returncode} (its stderr is in the log)")


def run_suite(suite: Suite, stages: list[Stage]) -> None:
    """Run ``stages`` in order within the time budget; every row and every stage's outcome is saved at once."""
    for stage in stages:
        entry = {"name": stage.name, "estimate_s": stage.estimate_s}
        suite.payload["stages"].append(entry)
        if not suite.smoke and stage.estimate_s > suite.time_left():
            entry["status"] = f"skipped: estimate {stage.estimate_s:.0f} s > {suite.time_left():.0f} s left of the time budget"
            suite.save()
            continue
        print(f"[{suite.elapsed():6.1f} s] {stage.name}", file=sys.stderr, flush=True)
        started = time.monotonic()
        try:
            for row in run_in_child(suite, stage) if stage.isolated else stage.run(suite):
                suite.record(stage.name, row)
                if stage.name == "peaks":
                    suite.args.peaks = (row["bf16_matmul_flops"], row["copy_bytes_per_s"])
            entry["status"] = "done"
        except Exception as error:  # one broken stage must not lose the others' figures
            entry["status"] = f"error: {type(error).__name__}: {error}".splitlines()[0][:500]
        entry["elapsed_s"] = time.monotonic() - started
        suite.save()


def run_child(args: argparse.Namespace) -> int:
    """``--child NAME``: run one stage and print each row on its own line, behind ``ROW_PREFIX``."""
    stage = next(stage for stage in STAGES if stage.name == args.child)
    for row in stage.run(Suite(args, None, None)):
        print(ROW_PREFIX + json.dumps(row), flush=True)
    return 0


def markdown(payload: dict) -> str:
    """The suite's tables, one section per stage that produced rows."""
    env = payload["environment"]
    lines = [
        f"# letkit GPU suite: {env['device']}", "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, Python {env['python']}, {env['date']}, "
        f"commit {env['git_commit']}", "", f"    {env['command']}", "",
        "| stage | estimate s | elapsed s | status |", "|---|---|---|---|",
    ]
    lines += [f"| {s['name']} | {s['estimate_s']:.0f} | {s.get('elapsed_s', 0):.1f} | {s.get('status', 'running')} |" for s in payload["stages"]]
    rows = payload["rows"]
    by_stage = {}
    for row in rows:
        by_stage.setdefault(row["stage"], []).append(row)
    for stage, stage_rows in by_stage.items():
        lines += ["", f"## {stage}", ""]
        if stage == "peaks":
            row = stage_rows[0]
            sheet = row.get("datasheet") or {}
            lines += [
                "| | measured | data sheet |", "|---|---|---|",
                f"| bf16 matmul TFLOP/s | {row['bf16_matmul_flops'] / 1e12:.1f} | {_scaled(sheet.get('bf16_flops'), 1e12)} |",
                f"| copy TB/s (read + write) | {row['copy_bytes_per_s'] / 1e12:.2f} | {_scaled(sheet.get('bytes_per_s'), 1e12, '.2f')} |",
                "", row["method"],
            ]
        elif stage.startswith("kernels"):
            lines.append(load_benchmark("kernels").format_table([r for r in stage_rows if "provider" in r]))
            lines += [r["status"] for r in stage_rows if "provider" not in r]
        elif stage == "model_step":
            for r in stage_rows:
                lines += [
                    f"{r['config']}, {r['parameters'] / 1e6:.0f}M parameters, batch {r['batch']} x {r['seq']}, {r['dtype']}, "
                    f"median of {r['steps']} interleaved steps", "",
                    "| model | s/step | tokens/s | peak GiB |", "|---|---|---|---|",
                ]
                lines += [f"| {name} | {r[name]['median_s']:.4f} | {r[name]['tokens_per_s']:,.0f} | {_scaled(r[name]['peak_memory_gib'], 1)} |"
                          for name in ("letkit", "transformers")]
                lines += ["", f"letkit / transformers: {r['ratio_of_medians']:.3f} (medians), {r['median_of_ratios']:.3f} (per-step)"]
        elif stage == "let_overhead":
            lines += ["| run | phase | steps | s/step | tokens/s | MFU | peak GiB |", "|---|---|---|---|---|---|---|"]
            for r in stage_rows:
                for phase in ("steady", "while_teacher", "after_stop"):
                    w = r.get(phase)
                    if w:
                        mfu = "-" if w["mfu"] is None else f"{100 * w['mfu']:.1f}%"
                        lines.append(f"| {r['run']} | {phase} | {w['steps'][0]}-{w['steps'][1]} | {w['s_per_step']:.4f} | "
                                     f"{w['tokens_per_s']:,.0f} | {mfu} | {w['peak_memory_gib']:.1f} |")
                if r.get("error"):
                    lines.append(f"| {r['run']} | error | {r['error'][:200]!r} | | | | |")
            for r in stage_rows:
                if r["run"] == "overhead":
                    lines += ["", "LET step overhead vs baseline: " + ", ".join(
                        f"{phase} {r[f'overhead_{phase}_pct']:+.1f}%" for phase in ("teacher", "after") if f"overhead_{phase}_pct" in r)]
        else:
            lines += ["```", *(json.dumps(r) for r in stage_rows), "```"]
    return "\n".join(lines) + "\n"


def _scaled(value, unit, spec=".1f") -> str:
    return "-" if value is None else format(value / unit, spec)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --smoke: a test of the code paths)")
    parser.add_argument("--smoke", action="store_true", help="every stage on tiny shapes, no time budget: checks the code, not speed")
    parser.add_argument("--time-budget", type=float, default=420.0, help="seconds; no stage starts that would run past it")
    parser.add_argument("--stages", nargs="+", choices=[stage.name for stage in STAGES], default=None,
                        help="run only these stages (in the suite's order)")
    parser.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR, help=f"where the JSON and markdown go (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--child", choices=[stage.name for stage in STAGES], help=argparse.SUPPRESS)  # one stage, rows on stdout
    parser.add_argument("--peaks", type=float, nargs=2, default=None, help=argparse.SUPPRESS)  # measured FLOP/s, bytes/s
    args = parser.parse_args(argv)
    if args.device.startswith("cpu") and not args.smoke:
        parser.error("--device cpu measures nothing worth keeping; add --smoke to test the code paths")
    if args.time_budget <= 0:
        parser.error(f"--time-budget must be positive, got {args.time_budget}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # The fused kernels only run on CPU under Triton's interpreter, which must be on before they are imported.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: the suite measures GPUs. Test its code paths with: python benchmarks/gpu_suite.py --device cpu --smoke",
              file=sys.stderr)
        return 2
    if args.child:
        return run_child(args)
    env = environment(args)
    slug = "cpu-smoke" if args.smoke else "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    stem = f"gpu_suite_{slug}_{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    suite = Suite(args, args.out_dir / f"{stem}.json", args.out_dir / f"{stem}.md")
    suite.payload.update(environment=env, notes=NOTES, stages=[], rows=[])
    stages = [stage for stage in STAGES if args.stages is None or stage.name in args.stages]
    run_suite(suite, stages)
    print(markdown(suite.payload))
    print(f"wrote {suite.json_path} and {suite.markdown_path} in {suite.elapsed():.0f} s", file=sys.stderr)
    return 0 if all(stage["status"] == "done" for stage in suite.payload["stages"]) else 1


if __name__ == "__main__":
    sys.exit(main())
