"""Benchmark letkit's fused alignment kernels against what a user would write, torch.compile, and Liger-Kernel.

Measures, per case (projection, loss, tokens, d_target -> d_teacher, dtype) and provider, the median time of
the forward, of forward+backward (``triton.testing.do_bench``) and the backward as their difference, the
peak extra GPU memory of one forward+backward, the loss and gradient errors against a float64 reference,
and the fraction of the roofline (projection GEMM FLOPs vs. the minimal bytes moved) that forward+backward
reaches.

    python benchmarks/kernels.py --out kernels_h200.json          # full run on a CUDA GPU
    python benchmarks/kernels.py --device cpu --smoke             # CPU smoke test of the code paths

Providers (the goals in benchmarks/RESULTS.md are judged against ``compile`` for speed and ``eager`` for memory):

* ``fused``: ``letkit.alignment_loss(..., backend="triton")`` with its defaults (the teacher finiteness check on).
* ``eager``: what a user writes without letkit, in the input dtype, e.g. for linear + cosine
  ``(1 - F.cosine_similarity(F.linear(h, W), t, dim=-1)).mean()`` (interpolation: ``F.interpolate(...,
  mode="linear", align_corners=True)``); bf16 in bf16 out, cuBLAS GEMMs with fp32 accumulation.
* ``compile``: ``torch.compile`` of that same function (the baseline of the speed goals).
* ``liger``: ``LigerFusedLinearCosineSimilarityLoss`` configured to the same quantity (linear + cosine only); its
  row says "not installed" when liger-kernel cannot be imported.
* ``eager_fp32`` / ``compile_fp32``: letkit's torch reference (``backend="torch"``), which computes in float32
  (TF32 off unless ``--allow-tf32``): extra rows, not baselines.
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass

PROVIDERS = ("compile", "eager", "fused", "liger", "compile_fp32", "eager_fp32")
SPEED_BASELINE = "compile"
MEMORY_BASELINE = "eager"
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}
LIGER_WHEEL = "liger-kernel==0.8.5"
CPU_HELP = (
    "no CUDA device: this benchmark measures GPU kernels. For a CPU smoke test of its code paths run\n"
    "    python benchmarks/kernels.py --device cpu --smoke"
)


@dataclass(frozen=True)
class Case:
    projection: str
    kind: str
    tokens: int
    d_target: int
    d_teacher: int
    dtype: str

    @property
    def label(self) -> str:
        return f"{self.projection}+{self.kind} N={self.tokens} {self.d_target}->{self.d_teacher} {self.dtype}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke testing only)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768], help="token counts (batch*seq)")
    parser.add_argument(
        "--shapes", nargs="+", default=["2048x576", "4096x2048"], help="d_target x d_teacher pairs, e.g. 2048x576"
    )
    parser.add_argument("--projections", nargs="+", default=["linear", "interpolate"], choices=["linear", "interpolate", "identity"])
    parser.add_argument("--kinds", nargs="+", default=["cosine"], choices=["cosine", "smooth_l1", "mse"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--chunk-elements", type=int, default=None, help="override fused_linear_alignment.CHUNK_ELEMENTS")
    parser.add_argument("--allow-tf32", action="store_true", help="let float32 matmuls (the *_fp32 providers) use TF32")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for the roofline (default: by GPU name)")
    parser.add_argument("--peak-tbps", type=float, default=None, help="memory bandwidth for the roofline in TB/s (default: by GPU name)")
    parser.add_argument(
        "--cuda-graphs", action="store_true", help="time CUDA-graph replays (GPU time without Python launch overhead) where capturable"
    )
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup in ms")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measuring time in ms")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and few repetitions: checks the code paths, not speed")
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    if args.smoke:
        args.tokens, args.shapes, args.warmup, args.rep = [64], ["64x24", "32x48"], 1, 3
    try:
        args.shapes = [tuple(int(v) for v in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        parser.error(f"--shapes must look like 2048x576, got {args.shapes}")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        parser.error(f"--shapes must be positive d_target x d_teacher pairs, got {args.shapes}")
    if min(args.tokens) < 1:
        parser.error(f"--tokens must be positive, got {args.tokens}")
    return args


def roofline(case: Case, element_bytes: int, peak_flops: float, peak_bytes_per_s: float) -> dict:
    """Lower bound on forward+backward time: projection GEMM FLOPs vs. minimal bytes (read h, teacher, W; write dh, dW)."""
    n, d_in, d_out = case.tokens, case.d_target, case.d_teacher
    linear = case.projection == "linear"
    flops = 3 * 2 * n * d_in * d_out if linear else 0  # forward GEMM + two backward GEMMs
    weight_bytes = 2 * d_out * d_in * element_bytes if linear else 0  # read W, write dW
    moved = (2 * n * d_in + n * d_out) * element_bytes + weight_bytes
    compute_ms, memory_ms = 1e3 * flops / peak_flops, 1e3 * moved / peak_bytes_per_s
    return {"flops": flops, "bytes": moved, "compute_ms": compute_ms, "memory_ms": memory_ms, "roofline_ms": max(compute_ms, memory_ms)}


def gpu_peaks(torch, args) -> tuple[float, float, str]:
    from letkit.hardware import GPU_PEAKS, datasheet_peaks

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    matched = datasheet_peaks(name)
    if matched:
        flops, bandwidth, source = matched[1], matched[2], f"{matched[0]} data sheet"
    else:
        flops, bandwidth, source = *GPU_PEAKS["H100"], "assumed H100 SXM (no match for this device)"
    if args.peak_tflops is not None:
        flops, source = args.peak_tflops * 1e12, "--peak-tflops/--peak-tbps"
    if args.peak_tbps is not None:
        bandwidth, source = args.peak_tbps * 1e12, "--peak-tflops/--peak-tbps"
    return flops, bandwidth, source


def user_loss(case: Case):
    """The alignment loss as a user writes it with plain PyTorch: every op in the input dtype."""
    import torch.nn.functional as F

    def project(h, weight):
        if case.projection == "linear":
            return F.linear(h, weight)
        if case.projection == "interpolate":
            return F.interpolate(h.unsqueeze(1), size=case.d_teacher, mode="linear", align_corners=True).squeeze(1)
        return h

    def loss(h, teacher, weight):
        z = project(h, weight)
        if case.kind == "cosine":
            return (1 - F.cosine_similarity(z, teacher, dim=-1)).mean()
        if case.kind == "mse":
            return F.mse_loss(z, teacher)
        width = (z.shape[-1],)
        return F.smooth_l1_loss(F.layer_norm(z, width), F.layer_norm(teacher, width))

    return loss


def liger_provider(torch, case: Case, h, teacher, weight):
    """``LigerFusedLinearCosineSimilarityLoss`` set to compute ``mean(1 - cos(h W^T, teacher))``, or the reason it cannot run."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearCosineSimilarityLoss
    except ImportError as error:
        return None, f"not installed: liger-kernel is not importable ({error}); carry the {LIGER_WHEEL} wheel"
    # weight_hard_loss=0 skips the cross-entropy part; beta=1 and temperature=1 leave 1 - cos as it is; an
    # identity teacher weight hands the teacher's features through unchanged (an extra N x d_teacher^2 GEMM).
    liger = LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, temperature=1.0, compiled=h.is_cuda)
    identity = torch.eye(case.d_teacher, dtype=teacher.dtype, device=teacher.device)
    labels = torch.zeros(case.tokens, dtype=torch.long, device=h.device)
    return (lambda: liger(h, weight, teacher, identity, labels)), None


def build_providers(torch, case: Case, inputs: dict, names: list[str]) -> tuple[dict, dict]:
    """``(closures computing the scalar loss on inputs, {provider: why it has no closure})`` for ``case``."""
    from letkit.losses import alignment_loss

    h, teacher, weight = inputs["h"], inputs["teacher"], inputs["weight"]

    def letkit_loss(backend, h_, teacher_, weight_):
        return alignment_loss(h_, teacher_, case.kind, projection=case.projection, weight=weight_, backend=backend)

    users = user_loss(case)
    providers, skipped = {}, {}
    for name in names:
        if name == "fused":
            providers[name] = lambda: letkit_loss("triton", h, teacher, weight)
        elif name == "eager":
            providers[name] = lambda: users(h, teacher, weight)
        elif name == "compile":
            compiled_user = torch.compile(users)
            providers[name] = lambda: compiled_user(h, teacher, weight)
        elif name == "eager_fp32":
            providers[name] = lambda: letkit_loss("torch", h, teacher, weight)
        elif name == "compile_fp32":
            compiled_reference = torch.compile(letkit_loss)
            providers[name] = lambda: compiled_reference("torch", h, teacher, weight)
        elif name == "liger":
            if case.projection != "linear" or case.kind != "cosine":
                continue
            providers[name], reason = liger_provider(torch, case, h, teacher, weight)
            if reason is not None:
                del providers[name]
                skipped[name] = reason
    return providers, skipped


def make_timer(torch, args):
    """``timer(fn, leaves) -> median ms``; with --cuda-graphs, replays a captured graph (no launch overhead) when capturable."""
    if args.device.startswith("cuda"):
        from triton.testing import do_bench, do_bench_cudagraph

        def cuda_median_ms(fn, leaves):
            if args.cuda_graphs:
                try:
                    return do_bench_cudagraph(fn, rep=args.rep, grad_to_none=leaves, return_mode="median")
                except Exception as error:  # e.g. a host sync inside fn: fall back to eager launches, say so
                    print(f"  CUDA graph capture failed ({type(error).__name__}), timing eager launches", file=sys.stderr)
                    torch.cuda.synchronize()
            return do_bench(fn, warmup=args.warmup, rep=args.rep, grad_to_none=leaves, return_mode="median")

        return cuda_median_ms

    def cpu_median_ms(fn, leaves):
        samples = []
        for _ in range(max(1, args.rep // 10)):
            for leaf in leaves:
                leaf.grad = None
            start = time.perf_counter()
            fn()
            samples.append(1e3 * (time.perf_counter() - start))
        return statistics.median(samples)

    return cpu_median_ms


def peak_extra_mib(torch, fn, leaves) -> float | None:
    """Peak memory above what was allocated before one forward+backward (gradients included), in MiB."""
    if not torch.cuda.is_available() or not leaves[0].is_cuda:
        return None
    for leaf in leaves:
        leaf.grad = None
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn().backward()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def relative_error(torch, actual, expected) -> float:
    return ((actual.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def float64_reference(torch, case: Case, inputs: dict) -> dict:
    """Loss and gradients (target, weight) of letkit's torch reference in float64: the ground truth of every row."""
    from letkit.losses import alignment_loss

    h = inputs["h"].detach().double().requires_grad_()
    weight = None if inputs["weight"] is None else inputs["weight"].detach().double().requires_grad_()
    loss = alignment_loss(h, inputs["teacher"].double(), case.kind, projection=case.projection, weight=weight, backend="torch")
    loss.backward()
    return {"loss": loss.item(), "grad": h.grad, "weight_grad": None if weight is None else weight.grad}


def agreement(torch, fn, reference: dict, leaves) -> dict:
    """Relative errors of the loss and of the gradients of target (and weight) against the float64 reference."""
    for leaf in leaves:
        leaf.grad = None
    loss = fn()
    loss.backward()
    errors = {
        "loss": loss.item(),
        "loss_rel_err": abs(loss.item() - reference["loss"]) / max(abs(reference["loss"]), 1e-30),
        "grad_rel_err": relative_error(torch, leaves[0].grad, reference["grad"]),
    }
    if reference["weight_grad"] is not None:
        errors["weight_grad_rel_err"] = relative_error(torch, leaves[1].grad, reference["weight_grad"])
    return errors


def make_inputs(torch, args, case: Case) -> dict:
    dtype = getattr(torch, DTYPES[case.dtype])
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    h = torch.randn(case.tokens, case.d_target, generator=generator, device=args.device).to(dtype).requires_grad_()
    teacher = torch.randn(case.tokens, case.d_teacher, generator=generator, device=args.device).to(dtype)
    weight = None
    if case.projection == "linear":
        scale = 1 / math.sqrt(case.d_target)
        weight = (torch.randn(case.d_teacher, case.d_target, generator=generator, device=args.device) * scale).to(dtype).requires_grad_()
    return {"h": h, "teacher": teacher, "weight": weight}


def run_case(torch, args, case: Case, timer, peaks: tuple[float, float]) -> Iterator[dict]:
    """One row per provider in ``args.providers`` that applies to ``case``, yielded as soon as it is measured (a row
    with ``error`` or ``status`` when it cannot run); rows after a baseline's carry their ratio to it."""
    torch._dynamo.reset()  # compile each case afresh (static shapes) instead of hitting the recompile limit
    inputs = make_inputs(torch, args, case)
    leaves = [x for x in (inputs["h"], inputs["weight"]) if x is not None]
    providers, skipped = build_providers(torch, case, inputs, args.providers)
    bound = roofline(case, torch.finfo(inputs["h"].dtype).bits // 8, *peaks)
    reference = float64_reference(torch, case, inputs)

    for name, reason in skipped.items():
        yield {"case": asdict(case), "label": case.label, "provider": name, "status": reason, "roofline": bound}
    measured = {}
    for name, fn in providers.items():
        row = {"case": asdict(case), "label": case.label, "provider": name}
        try:
            for _ in range(1 if args.smoke else 2):  # compile / autotune / first-call allocations, outside the timings
                fn().backward()
            forward_ms = timer(fn, leaves)
            total_ms = timer(lambda: fn().backward(), leaves)
            row.update(
                forward_ms=forward_ms,
                backward_ms=total_ms - forward_ms,
                fwd_bwd_ms=total_ms,
                peak_extra_mib=peak_extra_mib(torch, fn, leaves),
                roofline_ms=bound["roofline_ms"],
                roofline_fraction=bound["roofline_ms"] / total_ms,
            )
            row.update(agreement(torch, fn, reference, leaves))
            measured[name] = row
            compare_to_baselines(row, measured)
        except Exception as error:  # one failing provider (OOM, missing compiler) must not lose the others' numbers
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        row["roofline"] = bound
        yield row
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def compare_to_baselines(row: dict, measured: dict) -> None:
    """Add ``speedup_vs_compile`` (fwd+bwd time of the speed baseline / the row's) and ``memory_vs_eager`` when those
    baselines were measured (``PROVIDERS`` lists them first)."""
    speed, memory = measured.get(SPEED_BASELINE), measured.get(MEMORY_BASELINE)
    if speed is not None:
        row[f"speedup_vs_{SPEED_BASELINE}"] = speed["fwd_bwd_ms"] / row["fwd_bwd_ms"]
    if memory is not None and row["peak_extra_mib"] is not None and memory["peak_extra_mib"]:
        row[f"memory_vs_{MEMORY_BASELINE}"] = row["peak_extra_mib"] / memory["peak_extra_mib"]


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows."""
    header = [
        "case", "provider", "fwd ms", "bwd ms", "fwd+bwd ms", f"x {SPEED_BASELINE}", "extra MiB", f"mem / {MEMORY_BASELINE}",
        "roofline", "loss rel err", "grad rel err",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def number(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    for row in rows:
        if "fwd_bwd_ms" not in row:
            lines.append(f"| {row['label']} | {row['provider']} | {row.get('error') or row.get('status')} |" + " |" * (len(header) - 3))
            continue
        lines.append(
            f"| {row['label']} | {row['provider']} | {row['forward_ms']:.3f} | {row['backward_ms']:.3f} | {row['fwd_bwd_ms']:.3f} "
            f"| {number(row.get(f'speedup_vs_{SPEED_BASELINE}'), '.2f')} | {number(row['peak_extra_mib'], '.1f')} "
            f"| {number(row.get(f'memory_vs_{MEMORY_BASELINE}'), '.2f')} | {100 * row['roofline_fraction']:.1f}% "
            f"| {number(row.get('loss_rel_err'), '.1e')} | {number(row.get('grad_rel_err'), '.1e')} |"
        )
    return "\n".join(lines)


def notes(args, peaks: tuple[float, float], peak_source: str) -> dict:
    """What the columns mean, for the JSON and the printed table."""
    return {
        "timing": (
            f"median of triton.testing.{'do_bench_cudagraph' if args.cuda_graphs else 'do_bench'}"
            if args.device.startswith("cuda")
            else "CPU wall-clock median: a smoke test of the code paths, not a performance number"
        )
        + "; fused and liger compute gradients in the forward pass, so their 'fwd' includes the gradient work; "
        "bwd = (fwd+bwd) - fwd",
        "baselines": f"speed goals are judged against '{SPEED_BASELINE}' (torch.compile of the user's code in the input "
        f"dtype), memory against '{MEMORY_BASELINE}' (the same code run eagerly); *_fp32 rows are letkit's float32 "
        f"torch reference (TF32 {'on' if args.allow_tf32 else 'off'})",
        "memory": "peak allocated above the pre-call baseline during one fwd+bwd, gradients (dh, dW) included",
        "roofline": f"max(GEMM FLOPs / {peaks[0] / 1e12:.0f} TFLOP/s, minimal bytes / {peaks[1] / 1e12:.2f} TB/s) "
        f"({peak_source}); fraction = roofline time / measured fwd+bwd",
        "errors": "relative to letkit's torch reference in float64 on the same (rounded) inputs; grad = d loss / d target",
        "liger": "LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0, weight_soft_loss=1, beta=1, temperature=1) with "
        "teacher_weight = identity(d_teacher) and all-valid labels: mean(1 - cos(h W^T, teacher)), in the input dtype",
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        # The fused kernels only run on CPU under Triton's interpreter, which must be on before they are imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(CPU_HELP, file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = args.allow_tf32
    from letkit.atomic import atomic_write_json
    from letkit.kernels import fused_linear_alignment

    if args.chunk_elements is not None:
        fused_linear_alignment.CHUNK_ELEMENTS = args.chunk_elements
    peak_flops, peak_bandwidth, peak_source = gpu_peaks(torch, args)
    timer = make_timer(torch, args)
    cases = [
        Case(projection, kind, tokens, d_target, d_teacher, args.dtype)
        for projection in args.projections
        for kind in args.kinds
        for d_target, d_teacher in args.shapes
        for tokens in args.tokens
        if not (projection == "identity" and d_target != d_teacher)
    ]
    rows = []
    for case in cases:
        print(f"running {case.label} ...", file=sys.stderr, flush=True)
        rows.extend(run_case(torch, args, case, timer, (peak_flops, peak_bandwidth)))
    column_notes = notes(args, (peak_flops, peak_bandwidth), peak_source)
    print(format_table(rows))
    for key, note in column_notes.items():
        print(f"note[{key}]: {note}")
    if args.out:
        import triton

        payload = {
            "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
            "torch": torch.__version__,
            "triton": triton.__version__,
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
            "chunk_elements": fused_linear_alignment.CHUNK_ELEMENTS,
            "smoke": args.smoke,
            "notes": column_notes,
            "results": rows,
        }
        atomic_write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
