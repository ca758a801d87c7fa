"""Benchmark letkit's fused alignment kernels against eager PyTorch, torch.compile and Liger-Kernel.

Measures, per case (projection, loss, tokens, d_target -> d_teacher, dtype) and provider, the median time of
the forward, of forward+backward (``triton.testing.do_bench``) and the backward as their difference, the
peak extra GPU memory of one forward+backward, the loss/gradient agreement with eager PyTorch, and the
fraction of the roofline (projection GEMM FLOPs vs. the minimal bytes moved) that forward+backward reaches.

    python benchmarks/kernels.py --out benchmarks/kernels_h100.json         # full run on a CUDA GPU
    python benchmarks/kernels.py --device cpu --smoke                        # CPU smoke test of the code paths

Providers: ``fused`` (letkit.kernels), ``eager`` (letkit.losses torch backend), ``compile`` (torch.compile of the torch
backend) and ``liger`` (``LigerFusedLinearCosineSimilarityLoss``, linear+cosine only, when installed).
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
from dataclasses import asdict, dataclass

PROVIDERS = ("fused", "eager", "compile", "liger")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
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
    parser.add_argument("--allow-tf32", action="store_true", help="let float32 matmuls (eager/compile reference) use TF32")
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


def build_providers(torch, case: Case, inputs: dict, names: list[str], notes: dict) -> dict:
    """Closures computing the scalar loss on ``inputs`` for each requested provider that applies to ``case``."""
    from letkit.losses import alignment_loss

    h, teacher, weight = inputs["h"], inputs["teacher"], inputs["weight"]

    def loss_with(backend, h_=h, teacher_=teacher, weight_=weight):
        return alignment_loss(h_, teacher_, case.kind, projection=case.projection, weight=weight_, backend=backend, check_finite=False)

    providers = {}
    for name in names:
        if name == "fused":
            providers[name] = lambda: loss_with("triton")
        elif name == "eager":
            providers[name] = lambda: loss_with("torch")
        elif name == "compile":
            compiled = torch.compile(loss_with)
            providers[name] = lambda: compiled("torch", h, teacher, weight)
        elif name == "liger" and case.projection == "linear" and case.kind == "cosine":
            try:
                from liger_kernel.chunked_loss import LigerFusedLinearCosineSimilarityLoss
            except ImportError as error:
                notes["liger"] = f"skipped: liger-kernel not importable ({error}); pip install --no-deps liger-kernel==0.8.5"
                continue
            notes["liger"] = (
                "LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0, weight_soft_loss=1, beta=1, temperature=1) with "
                "teacher_weight = identity(d_teacher) and all-valid labels: the same mean(1 - cos(h W^T, teacher)); it also "
                "multiplies the teacher by the identity (an extra N x d_teacher^2 GEMM) and computes in the input dtype"
            )
            liger = LigerFusedLinearCosineSimilarityLoss(
                weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0, temperature=1.0, compiled=h.is_cuda
            )
            identity = torch.eye(case.d_teacher, dtype=teacher.dtype, device=teacher.device)
            labels = torch.zeros(case.tokens, dtype=torch.long, device=h.device)
            providers[name] = lambda: liger(h, weight, teacher, identity, labels)
    return providers


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
        for _ in range(max(3, args.rep // 10)):
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


def agreement(torch, fn, reference: dict, leaves) -> dict:
    """Relative difference of the loss and of d(loss)/d(target) from eager PyTorch's."""
    for leaf in leaves:
        leaf.grad = None
    loss = fn()
    loss.backward()
    grad = leaves[0].grad.double()
    return {
        "loss": loss.item(),
        "loss_rel_diff": abs(loss.item() - reference["loss"]) / max(abs(reference["loss"]), 1e-30),
        "grad_rel_diff": ((grad - reference["grad"]).norm() / reference["grad"].norm().clamp_min(1e-30)).item(),
    }


def run_case(torch, args, case: Case, timer, peaks: tuple[float, float], notes: dict) -> list[dict]:
    torch._dynamo.reset()  # compile each case afresh (static shapes) instead of hitting the recompile limit
    dtype = getattr(torch, DTYPES[case.dtype])
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    h = torch.randn(case.tokens, case.d_target, generator=generator, device=args.device).to(dtype).requires_grad_()
    teacher = torch.randn(case.tokens, case.d_teacher, generator=generator, device=args.device).to(dtype)
    weight = None
    if case.projection == "linear":
        scale = 1 / math.sqrt(case.d_target)
        weight = (torch.randn(case.d_teacher, case.d_target, generator=generator, device=args.device) * scale).to(dtype).requires_grad_()
    leaves = [x for x in (h, weight) if x is not None]
    inputs = {"h": h, "teacher": teacher, "weight": weight}
    providers = build_providers(torch, case, inputs, args.providers, notes)
    bound = roofline(case, torch.finfo(dtype).bits // 8, *peaks)

    reference = None
    rows = []
    for name, fn in providers.items():
        row = {"case": asdict(case), "label": case.label, "provider": name}
        try:
            for _ in range(2):  # compile / autotune / first-call allocations happen here, outside the timings
                fn().backward()
            if reference is None and "eager" in providers:
                for leaf in leaves:
                    leaf.grad = None
                eager_loss = providers["eager"]()
                eager_loss.backward()
                reference = {"loss": eager_loss.item(), "grad": h.grad.double()}
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
            if reference is not None:
                row.update(agreement(torch, fn, reference, leaves))
        except Exception as error:  # one failing provider (OOM, missing compiler) must not lose the others' numbers
            row["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        rows.append(row)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    eager = next((row for row in rows if row["provider"] == "eager" and "error" not in row), None)
    for row in rows:
        if eager is not None and "error" not in row:
            row["speedup_vs_eager"] = eager["fwd_bwd_ms"] / row["fwd_bwd_ms"]
            if row["peak_extra_mib"] is not None and eager["peak_extra_mib"]:
                row["memory_vs_eager"] = row["peak_extra_mib"] / eager["peak_extra_mib"]
        row["roofline"] = bound
    return rows


def format_table(rows: list[dict]) -> str:
    header = f"{'case':<44} {'provider':<13} {'fwd ms':>8} {'bwd ms':>8} {'f+b ms':>8} {'x eager':>8} {'MiB':>8} {'mem/eag':>8} {'roofl.':>7} {'loss rel':>9} {'grad rel':>9}"
    lines = [header, "-" * len(header)]

    def number(value, spec):
        width = int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()))
        return format(value, spec) if isinstance(value, (int, float)) else "-".rjust(width)

    for row in rows:
        if "error" in row:
            lines.append(f"{row['label']:<44} {row['provider']:<13} ERROR {row['error']}")
            continue
        lines.append(
            f"{row['label']:<44} {row['provider']:<13} {row['forward_ms']:>8.3f} {row['backward_ms']:>8.3f} {row['fwd_bwd_ms']:>8.3f} "
            f"{number(row.get('speedup_vs_eager'), '>8.2f')} {number(row['peak_extra_mib'], '>8.1f')} "
            f"{number(row.get('memory_vs_eager'), '>8.2f')} {100 * row['roofline_fraction']:>6.1f}% "
            f"{number(row.get('loss_rel_diff'), '>9.1e')} {number(row.get('grad_rel_diff'), '>9.1e')}"
        )
    return "\n".join(lines)


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
    notes = {
        "timing": (
            f"median of triton.testing.{'do_bench_cudagraph' if args.cuda_graphs else 'do_bench'}"
            if args.device.startswith("cuda")
            else "CPU wall-clock median: a smoke test of the code paths, not a performance number"
        )
        + "; fused and liger compute gradients in the forward pass, so their 'fwd' includes the gradient work; "
        "bwd = (fwd+bwd) - fwd",
        "memory": "peak allocated above the pre-call baseline during one fwd+bwd, gradients (dh, dW) included",
        "roofline": f"max(GEMM FLOPs / {peak_flops / 1e12:.0f} TFLOP/s, minimal bytes / {peak_bandwidth / 1e12:.2f} TB/s) "
        f"({peak_source}); fraction = roofline time / measured fwd+bwd",
        "reference_precision": f"eager/compile upcast to float32; torch.backends.cuda.matmul.allow_tf32={args.allow_tf32}",
    }
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
        rows.extend(run_case(torch, args, case, timer, (peak_flops, peak_bandwidth), notes))
    print(format_table(rows))
    for key, note in notes.items():
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
            "notes": notes,
            "results": rows,
        }
        atomic_write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
