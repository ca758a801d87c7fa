"""LET in a plain PyTorch loop, built from letkit's blocks directly (no LETObjective, no framework).

Runs on CPU: bytes of the Python standard library's source are the corpus, a tiny Llama-style teacher is
pretrained first (in real use it already exists), then a 4x wider, 2x deeper target (the script prints both
non-embedding parameter counts) trains with LET and, for comparison, without it, from the same initialisation and
data order.

    python examples/minimal_loop.py [--steps 120]
"""

from __future__ import annotations

import argparse
import copy
import pathlib
import sysconfig
import time

import torch
import torch.nn.functional as F

import letkit
from letkit.models import count_parameters, from_preset

SEQ_LEN, BATCH = 64, 8


def load_corpus(max_bytes: int = 2_000_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens (vocab 256) of the stdlib's top-level *.py files; the last 5% is validation."""
    files = sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)[:max_bytes]
    tokens = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
    split = int(0.95 * len(tokens))
    return tokens[:split], tokens[split:]


def batch(tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(tokens) - SEQ_LEN, (BATCH,), generator=generator)
    return torch.stack([tokens[s : s + SEQ_LEN] for s in starts.tolist()])


def lm_loss(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten())


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: torch.Tensor) -> float:
    g = torch.Generator().manual_seed(1234)
    return sum(lm_loss(model, batch(val, g)).item() for _ in range(8)) / 8


def pretrain_teacher(train: torch.Tensor, steps: int) -> torch.nn.Module:
    torch.manual_seed(0)
    teacher = from_preset("tiny", vocab_size=256, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2)
    opt = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = lm_loss(teacher, batch(train, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return teacher


def train_target(target, train, val, steps, teacher=None, lambda0=1.0, stop_step=60):
    """One training run; with a teacher, LET assembled by hand from letkit's blocks."""
    opt_params = list(target.parameters())
    if teacher is not None:
        extractor = letkit.TeacherFeatureExtractor(copy.deepcopy(teacher))
        (teacher_layer, target_layer), = letkit.LayerMap("L2E").resolve(extractor.num_layers, len(target.blocks))
        extractor.select_layers([teacher_layer])
        projector = letkit.LayerMappingProjector([target.config.hidden_size], [teacher.config.hidden_size], "interpolate")
        align = letkit.AlignmentLoss("cosine")
        schedule = letkit.LinearDecay(lambda0, stop_step=stop_step)
        captured = {}
        hook = target.blocks[target_layer].register_forward_hook(lambda m, a, out: captured.update(h=out))
    opt = torch.optim.AdamW(opt_params, lr=2e-3)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        input_ids = batch(train, g)
        loss = lm_loss(target, input_ids)
        if teacher is not None and not schedule.is_done(step):
            (h_teacher,) = extractor(input_ids)
            loss = loss + schedule(step) * projector.alignment_loss([captured.pop("h")], [h_teacher], align)
        elif teacher is not None and not extractor.released:
            hook.remove()
            extractor.release()  # S_stop reached: drop the teacher, plain training from here on
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss.item():.3f}")
    return val_loss(target, val)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=120, help="target training steps (default 120)")
    parser.add_argument("--teacher-steps", type=int, default=120, help="teacher pretraining steps (default 120)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    train, val = load_corpus()
    start = time.perf_counter()
    teacher = pretrain_teacher(train, args.teacher_steps)
    print(f"teacher: val loss {val_loss(teacher, val):.3f} ({time.perf_counter() - start:.0f} s)")

    torch.manual_seed(1)
    target = from_preset("tiny", vocab_size=256, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4)
    baseline = copy.deepcopy(target)
    target_size, teacher_size = (count_parameters(m, non_embedding=True) for m in (target, teacher))
    print(f"target: {target_size:,} non-embedding parameters, {target_size / teacher_size:.1f}x the teacher's {teacher_size:,}")
    print("target with LET:")
    let_val = train_target(target, train, val, args.steps, teacher=teacher)
    print("target, baseline:")
    base_val = train_target(baseline, train, val, args.steps)
    print(f"val loss after {args.steps} steps: LET {let_val:.3f}, baseline {base_val:.3f} ({time.perf_counter() - start:.0f} s total)")


if __name__ == "__main__":
    main()
