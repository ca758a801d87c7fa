"""One training step (forward + cross-entropy + backward) of letkit's Llama vs transformers' LlamaForCausalLM with
the same config and weights, timed side by side in one process (steps interleaved, median of N).

    python benchmarks/model_step.py                                  # CPU-sized config (d=256, 4 layers, GQA)
    python benchmarks/model_step.py --preset 1.4b --device cuda --dtype bfloat16 --batch 4 --seq 2048
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from letkit.models import Llama, LlamaConfig, count_parameters, from_preset
from letkit.models.llama import hf_checkpoint_mapping


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help="letkit preset (tiny, 125m, 1.4b, 7b); default: the CPU config below")
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU); default: torch's choice")
    return p.parse_args(argv)


def build_models(args: argparse.Namespace) -> tuple[Llama, torch.nn.Module]:
    import transformers

    torch.manual_seed(0)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    with device:
        if args.preset:
            ours = from_preset(args.preset)
        else:
            ours = Llama(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden_size,
                                     intermediate_size=args.intermediate_size, num_hidden_layers=args.layers,
                                     num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                     max_position_embeddings=max(args.seq, 2048)))
        ours = ours.to(dtype)
        theirs = transformers.LlamaForCausalLM(
            transformers.LlamaConfig(**ours.config.to_hf(), attn_implementation="sdpa", use_cache=False)
        ).to(dtype)
    state = {}
    for m in hf_checkpoint_mapping(ours):
        state.update(zip(m.hf_names, m.split(ours.get_parameter(m.name).detach())))
    if ours.config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    theirs.load_state_dict(state, strict=True)
    return ours.train(), theirs.train()


def measure(args: argparse.Namespace) -> dict:
    """Interleaved training steps of both models; per model the median/min/max seconds per step, tokens/s, the last
    loss and (on CUDA) the peak memory of a step, and the letkit / transformers ratios."""
    ours, theirs = build_models(args)
    device = torch.device(args.device)
    vocab = ours.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq + 1), device=device)
    inputs, targets = ids[:, :-1], ids[:, 1:]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step(model, get_logits) -> tuple[float, float, float | None]:
        sync()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        loss = F.cross_entropy(get_logits(model).flatten(0, 1).float(), targets.flatten())
        loss.backward()
        sync()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        model.zero_grad(set_to_none=True)
        return elapsed, loss.item(), peak

    runners = {
        "letkit": (ours, lambda m: m(inputs)),
        "transformers": (theirs, lambda m: m(input_ids=inputs, use_cache=False).logits),
    }
    times: dict[str, list[float]] = {name: [] for name in runners}
    losses: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    for i in range(args.warmup + args.steps):
        # Interleaved, alternating which goes first, so that load from other processes hits both alike.
        for name in (list(runners) if i % 2 == 0 else list(reversed(runners))):
            model, get_logits = runners[name]
            elapsed, losses[name], peak = step(model, get_logits)
            if i >= args.warmup:
                times[name].append(elapsed)
                peaks[name] = peak if peaks.get(name) is None else max(peaks[name], peak)

    tokens = args.batch * args.seq
    c = ours.config
    result = {
        "config": f"{args.preset or 'custom'} d={c.hidden_size} layers={c.num_hidden_layers} heads={c.num_attention_heads}"
                  f"/{c.num_key_value_heads} ffn={c.intermediate_size} vocab={c.vocab_size}",
        "parameters": count_parameters(ours), "batch": args.batch, "seq": args.seq, "dtype": args.dtype,
        "device": args.device, "steps": args.steps,
    }
    for name, model_times in times.items():
        median = statistics.median(model_times)
        result[name] = {"median_s": median, "min_s": min(model_times), "max_s": max(model_times),
                        "tokens_per_s": tokens / median, "loss": losses[name], "peak_memory_gib": peaks[name]}
    result["ratio_of_medians"] = result["letkit"]["median_s"] / result["transformers"]["median_s"]
    result["median_of_ratios"] = statistics.median(a / b for a, b in zip(times["letkit"], times["transformers"]))
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(f"config: {result['config']} params={result['parameters'] / 1e6:.1f}M | batch={args.batch} seq={args.seq} "
          f"{args.dtype} on {args.device}, torch {torch.__version__}, threads={torch.get_num_threads()}")
    for name in ("letkit", "transformers"):
        r = result[name]
        print(f"{name:>13}: median {r['median_s'] * 1e3:8.1f} ms/step  ({r['tokens_per_s']:,.0f} tok/s)  loss {r['loss']:.5f}"
              f"  [min {r['min_s'] * 1e3:.1f}, max {r['max_s'] * 1e3:.1f} ms over {args.steps} steps]")
    print(f"ratio letkit / transformers: {result['ratio_of_medians']:.3f} (medians), "
          f"{result['median_of_ratios']:.3f} (median of the {args.steps} per-step ratios)")


if __name__ == "__main__":
    main()
