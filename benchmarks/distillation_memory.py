"""Peak memory of logit distillation's loss (forward + backward), measured on CPU and scaled to 16k x 49,152.

Three ways to compute ``T^2 * mean KL(softmax(z_teacher/T) || softmax(z_target/T))`` from the target's logits and
the teacher's final hidden state and LM head:

* ``chunked`` -- :func:`letkit.logit_distillation_loss`: the teacher's logits per chunk of tokens, backward
  recomputes each chunk;
* ``naive``   -- full teacher logits, ``F.kl_div`` on both log-softmaxes, plain autograd;
* ``loop``    -- the same per chunk of tokens, summed, plain autograd (every chunk's tensors saved for backward).

Each (variant, tokens) point runs in a fresh process with glibc's mmap threshold lowered, so freed tensors
leave the resident set at once; the figure is the peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` once the inputs exist) above the resident set with the inputs allocated. It
includes the gradient of the target's logits (tokens x vocab floats, allocated by training anyway). A straight
line ``a + b * tokens`` is fitted per variant and, since every term is proportional to the vocabulary,
scaled by ``--target-vocab / --vocab`` to ``--target-tokens``.

    python benchmarks/distillation_memory.py            # a few minutes, needs ~2 GB free
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from letkit.atomic import atomic_write_json
from letkit.distillation import logit_distillation_loss

VARIANTS = ("chunked", "naive", "loop")


def kl_naive(target_logits, hidden, weight, temperature):
    log_p_teacher = F.log_softmax(F.linear(hidden, weight) / temperature, dim=-1)
    log_p_target = F.log_softmax(target_logits / temperature, dim=-1)
    return temperature**2 * F.kl_div(log_p_target, log_p_teacher, reduction="batchmean", log_target=True)


def kl_loop(target_logits, hidden, weight, temperature, chunk_size):
    total = target_logits.new_zeros(())
    for start in range(0, target_logits.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        log_p_teacher = F.log_softmax(F.linear(hidden[rows], weight) / temperature, dim=-1)
        log_p_target = F.log_softmax(target_logits[rows] / temperature, dim=-1)
        total = total + F.kl_div(log_p_target, log_p_teacher, reduction="sum", log_target=True)
    return temperature**2 * total / target_logits.shape[0]


def _status_kib(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def measure(variant: str, tokens: int, vocab: int, d_teacher: int, chunk_size: int) -> int:
    """Peak resident bytes above the inputs for one forward + backward (run in a fresh process)."""
    torch.manual_seed(0)
    target = torch.randn(tokens, vocab).requires_grad_()
    hidden = torch.randn(tokens, d_teacher)
    weight = torch.randn(vocab, d_teacher) / d_teacher**0.5
    if variant == "chunked":
        loss_fn = lambda: logit_distillation_loss(target, hidden, weight, temperature=2.0, chunk_size=chunk_size)  # noqa: E731
    elif variant == "naive":
        loss_fn = lambda: kl_naive(target, hidden, weight, 2.0)  # noqa: E731
    else:
        loss_fn = lambda: kl_loop(target, hidden, weight, 2.0, chunk_size)  # noqa: E731
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
    baseline = _status_kib("VmRSS")
    loss_fn().backward()
    return (_status_kib("VmHWM") - baseline) * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--d-teacher", type=int, default=576, help="teacher hidden size (SmolLM-135M: 576)")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--target-tokens", type=int, default=16_384)
    parser.add_argument("--target-vocab", type=int, default=49_152)
    parser.add_argument("--output", default="benchmarks/results/distillation_memory.json")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        variant, tokens = args.child
        print(measure(variant, int(tokens), args.vocab, args.d_teacher, args.chunk_size))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    points = {variant: {} for variant in VARIANTS}
    for variant in VARIANTS:
        for tokens in args.tokens:
            command = [sys.executable, __file__, "--child", variant, str(tokens), "--vocab", str(args.vocab),
                       "--d-teacher", str(args.d_teacher), "--chunk-size", str(args.chunk_size)]
            peak = int(subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout)
            points[variant][tokens] = peak
            print(f"{variant:8s} {tokens:6d} tokens x {args.vocab} vocab: {peak / 2**20:8.1f} MiB "
                  f"({peak / (4 * tokens * args.vocab):.2f} float32 tokens x vocab tensors)", flush=True)

    scale = args.target_vocab / args.vocab
    report = {"vocab": args.vocab, "d_teacher": args.d_teacher, "chunk_size": args.chunk_size,
              "peak_bytes": {v: {str(t): b for t, b in p.items()} for v, p in points.items()},
              "scaled_to": {"tokens": args.target_tokens, "vocab": args.target_vocab}, "scaled_peak_gb": {}}
    print(f"\nscaled to {args.target_tokens} tokens x {args.target_vocab} vocab (fit a + b * tokens, times {scale:g}):")
    for variant, by_tokens in points.items():
        xs = torch.tensor(list(by_tokens), dtype=torch.float64)
        ys = torch.tensor(list(by_tokens.values()), dtype=torch.float64)
        slope = ((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum()
        intercept = ys.mean() - slope * xs.mean()
        scaled = float((intercept + slope * args.target_tokens) * scale)
        report["scaled_peak_gb"][variant] = round(scaled / 1e9, 2)
        per_element = float(slope) / args.vocab / 4
        print(f"{variant:8s} {scaled / 1e9:6.1f} GB  ({per_element:.2f} float32 per token x vocab element, "
              f"+ {float(intercept) * scale / 1e9:.2f} GB fixed)")
    atomic_write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
