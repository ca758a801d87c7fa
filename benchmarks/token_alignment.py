"""Benchmark letkit.token_alignment: building a cross-tokenizer alignment from offsets, and gathering.

Offsets are synthetic but shaped like real ones: both tokenizations tile the same texts (target tokens
1-8 characters, teacher tokens 1-6, so the teacher has more tokens), a BOS special token at position 0,
and some multi-byte characters split into several pieces. Times are medians over --repeats runs.
--encode also times encode_for_alignment end to end (tokenizing with two byte-level BPEs trained here
on generated text, vocab 1000 for the target and 300 for the teacher).

    python benchmarks/token_alignment.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import numpy as np
import torch

from letkit.token_alignment import ALIGNMENT_MODES, align_tokens, encode_for_alignment

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "héllo",
    "wörld",
    "中文",
    "😀",
    "naïve",
    "alignment",
    "teacher",
    "target",
    "token",
    "résumé",
    "ünïcödé",
]


def tile(rng: np.random.Generator, text_length: int, max_piece: int, split_rate: float) -> np.ndarray:
    """Offsets [n, 2] of tokens covering characters [0, text_length), with a leading (-1, -1) special."""
    ends = np.cumsum(rng.integers(1, max_piece + 1, size=text_length))
    ends = ends[ends < text_length]
    ends = np.append(ends, text_length)
    starts = np.concatenate([[0], ends[:-1]])
    offsets = np.stack([starts, ends], axis=1)
    # some tokens end inside a multi-byte character: (s, e) and a second piece (e - 1, e) both report it
    split = rng.random(len(offsets)) < split_rate
    copies = np.where(split, 2, 1)
    offsets = np.repeat(offsets, copies, axis=0)
    second_piece = np.zeros(len(offsets), dtype=bool)
    second_piece[np.cumsum(copies)[split] - 1] = True
    offsets[second_piece, 0] = offsets[second_piece, 1] - 1
    return np.concatenate([[[-1, -1]], offsets])


def batch_offsets(
    rng: np.random.Generator, batch: int, length: int, text_length: int, max_piece: int, split_rate: float
) -> torch.Tensor:
    rows = [tile(rng, text_length, max_piece, split_rate)[:length] for _ in range(batch)]
    out = np.full((batch, max(len(r) for r in rows), 2), -1, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def median_ms(fn, repeats: int, warmup: int, sync) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def generated_texts(rng: np.random.Generator, count: int, words: int) -> list[str]:
    separators = np.array([" ", " ", " ", "  ", "\n", ", ", ". "])
    return [
        "".join(w + s for w, s in zip(rng.choice(WORDS, words), rng.choice(separators, words), strict=True))
        for _ in range(count)
    ]


def byte_level_bpe(vocab_size: int, corpus: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(corpus, trainer)
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--target-len", type=int, default=2048, help="target tokens per row")
    parser.add_argument("--dim", type=int, default=576, help="teacher feature size for gather")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="teacher feature dtype")
    parser.add_argument(
        "--split-rate", type=float, default=0.02, help="fraction of tokens split into two pieces of one character"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--encode", action="store_true", help="also time encode_for_alignment end to end")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rng = np.random.default_rng(args.seed)
    text_length = args.target_len * 5  # ~4.5 characters per target token: every row is cut at --target-len
    target = batch_offsets(rng, args.batch, args.target_len, text_length, 8, args.split_rate)
    teacher = batch_offsets(rng, args.batch, 10 * args.target_len, text_length, 6, args.split_rate)
    # like encode_for_alignment, the teacher reads only the text the kept target tokens cover
    teacher[teacher[..., 1] > target[..., 1].amax(1, keepdim=True)] = -1
    teacher = teacher[:, : int((teacher[..., 0] >= 0).sum(1).max()) + 1].contiguous()
    target, teacher = target.to(device), teacher.to(device)
    features = torch.randn(args.batch, teacher.shape[1], args.dim, dtype=getattr(torch, args.dtype), device=device)

    print(
        f"target offsets {tuple(target.shape)}, teacher offsets {tuple(teacher.shape)}, "
        f"features {tuple(features.shape)} {args.dtype}, device {device}, threads {torch.get_num_threads()}, "
        f"median of {args.repeats}"
    )
    print(f"{'mode':<6} {'align ms':>9} {'gather ms':>10} {'valid targets':>14}")
    for mode in ALIGNMENT_MODES:
        alignment = align_tokens(target, teacher, mode=mode)
        align = median_ms(partial(align_tokens, target, teacher, mode=mode), args.repeats, args.warmup, sync)
        gather = median_ms(partial(alignment.gather, features), args.repeats, args.warmup, sync)
        print(f"{mode:<6} {align:>9.2f} {gather:>10.2f} {alignment.mask.float().mean().item():>13.1%}")

    if args.encode:
        target_tokenizer = byte_level_bpe(1000, generated_texts(rng, 200, 200))
        teacher_tokenizer = byte_level_bpe(300, generated_texts(rng, 200, 200))
        texts = generated_texts(rng, args.batch, args.target_len)  # long enough to be cut at --target-len
        run = partial(encode_for_alignment, texts, target_tokenizer, teacher_tokenizer, max_length=args.target_len)
        batch = run()
        encode = median_ms(run, max(args.repeats // 5, 3), 1, lambda: None)
        print(
            f"encode_for_alignment: target {tuple(batch.target_ids.shape)}, teacher {tuple(batch.teacher_ids.shape)}, "
            f"{encode:.1f} ms, valid targets {batch.alignment.mask.float().mean().item():.1%}"
        )


if __name__ == "__main__":
    main()
