"""The ``letkit`` command line: ``letkit demo``, ``letkit tokenize``, ``letkit export`` and ``letkit eval`` (``--help`` on each);
``python -m letkit.cli`` works too."""

from __future__ import annotations

import argparse
import dataclasses
import operator
import sys
from collections.abc import Sequence

from letkit.demo import METHODS, PRESETS, DemoError, format_report, preset, run_demo
from letkit.demo.config import BIN_DTYPES
from letkit.token_alignment import ALIGNMENT_MODES

DEMO_DESCRIPTION = """\
Late-to-Early Training (LET) against standard training, end to end on this machine's CPU.

Pretrains a small teacher on a corpus (cached for the next run), then trains two identical targets with >= 10x the
teacher's non-embedding parameters -- same initialisation, same batches, same LR schedule, same steps -- one with plain
next-token loss (baseline) and one with LET, and reports how many steps and seconds LET needs to reach the baseline's
final validation loss. Default corpus: this Python's own standard library source. No GPU, no downloads.

--method compares the baseline with the paper's other uses of the same teacher instead: SALT (distil its logits
early in the run, then train normally), RKD (distil them for the whole run) or LET+SALT (both terms).
"""

DEMO_EPILOG = """\
examples:
  letkit demo --quick                       # under 3 minutes on 2 cores (2 min 16 s measured)
  letkit demo --seeds 3                     # mean speedup with a 95% confidence interval
  letkit demo --corpus 'docs/**/*.md'       # your own text files (a directory, glob or file)
  letkit demo --corpus tokens.bin --bin-dtype uint32 --tokenizer tokenizer.json
  letkit demo --teacher path/to/checkpoint  # your own teacher (HF layout: config.json + safetensors)
  letkit demo --teacher DIR --tokenizer target.json --cross-tokenizer   # a teacher with another tokenizer
  letkit demo --teacher-vocab-size 512      # cross-tokenizer LET with a teacher pretrained on a 512-token BPE
  letkit demo --method salt --kd-weight 1   # SALT instead of LET: logit distillation for the first 25% of the steps

outputs: a table on stdout, OUT/metrics.json (config, curves, speedups, teacher cost), OUT/demo.png (needs letkit[plot]).
"""


def _preset_default(field: str) -> str:
    """``"default X"``, or ``"default X, --quick Y"`` where the presets differ: a ``--help`` line's default of
    ``field`` (a dotted :class:`letkit.demo.DemoConfig` attribute path, e.g. ``"target_schedule.steps"``)."""
    values = (operator.attrgetter(field)(PRESETS[name]) for name in ("default", "quick"))
    default, quick = (f"{v:g}" if isinstance(v, float) else str(v) for v in values)
    return f"default {default}" if default == quick else f"default {default}, --quick {quick}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="letkit", description="letkit: Late-to-Early Training toolkit.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = commands.add_parser(
        "demo", help="LET vs standard training on your CPU, with a real corpus, plots and an honest speedup",
        description=DEMO_DESCRIPTION, epilog=DEMO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    size = demo.add_argument_group("size")
    size.add_argument("--quick", action="store_true", help="smaller models and fewer steps (under 3 min on 2 cores)")
    size.add_argument("--seeds", type=int, metavar="N",
                      help=f"repeat both runs over N seeds ({_preset_default('seeds')})")
    size.add_argument("--seed", type=int, metavar="S", help=f"first seed ({_preset_default('seed')})")
    size.add_argument("--steps", type=int, metavar="N",
                      help=f"target training steps, S_stop scaling along ({_preset_default('target_schedule.steps')})")
    size.add_argument("--target-layers", type=int, metavar="N",
                      help=f"blocks of the target model ({_preset_default('target_shape.num_layers')})")
    size.add_argument("--teacher-steps", type=int, metavar="N",
                      help=f"teacher pretraining steps ({_preset_default('teacher_schedule.steps')})")
    size.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")

    data = demo.add_argument_group("data and teacher")
    data.add_argument("--corpus", metavar="PATH",
                      help="directory, glob or text file; or pre-tokenised .npy / raw .bin token file "
                           "(default: the Python standard library's top-level *.py files)")
    data.add_argument("--bin-dtype", choices=BIN_DTYPES,
                      help=f"token dtype of a raw .bin corpus ({_preset_default('bin_dtype')})")
    data.add_argument("--tokenizer", metavar="FILE",
                      help="tokenizer.json to use (default: the teacher's, else a byte-level BPE trained on the corpus)")
    data.add_argument("--vocab-size", type=int, metavar="N",
                      help=f"vocabulary of the trained BPE ({_preset_default('vocab_size')})")
    data.add_argument("--teacher", metavar="DIR",
                      help="teacher checkpoint directory (HF layout); default: pretrain one and cache it")
    data.add_argument("--cross-tokenizer", nargs="?", const="last", choices=ALIGNMENT_MODES, metavar="last|mean",
                      help="let the teacher read its own tokenization of each window's text, features aligned by "
                           "character spans: the last teacher token inside each target token, or their mean "
                           "(default when given: last; off by default: teacher and target share one vocabulary)")
    data.add_argument("--teacher-vocab-size", type=int, metavar="N",
                      help="pretrain the teacher on its own byte-level BPE of N tokens (implies --cross-tokenizer)")

    method = demo.add_argument_group("method")
    method.add_argument("--method", choices=METHODS,
                        help="what the second target adds to the next-token loss: LET's alignment term, logit "
                             "distillation from the teacher early on (salt) or for the whole run (rkd), or LET and "
                             f"SALT's terms summed ({_preset_default('method')})")
    method.add_argument("--lr", type=float,
                        help=f"peak learning rate of both runs, the baseline's best in the sweep "
                             f"({_preset_default('target_schedule.lr')})")

    let = demo.add_argument_group("LET (--method let, let+salt)")
    let.add_argument("--lambda0", type=float,
                     help=f"initial alignment weight lambda0 ({_preset_default('let.lambda0')})")
    let.add_argument("--stop-step", type=int, metavar="N", help="S_stop: step where lambda reaches 0 and the teacher is dropped (default: the last step)")
    let.add_argument("--layer-map", choices=("L2E", "L2M", "L2L"),
                     help=f"teacher layer -> target layer ({_preset_default('let.layer_map')})")
    let.add_argument("--projector", choices=("interpolate", "linear", "mlp"),
                     help=f"P: target -> teacher features ({_preset_default('let.projector')})")

    kd = demo.add_argument_group("logit distillation (--method salt, rkd, let+salt): "
                                 "L_NLL + weight * T^2 * KL(teacher || target)")
    kd.add_argument("--kd-weight", type=float, metavar="W",
                    help=f"weight of the distillation term while it is on ({_preset_default('kd.weight')})")
    kd.add_argument("--kd-temperature", type=float, metavar="T",
                    help=f"softmax temperature of both models' logits ({_preset_default('kd.temperature')})")
    kd.add_argument("--kd-stop-step", type=int, metavar="N",
                    help=f"SALT: distil for the first N steps, then train normally (default "
                         f"{PRESETS['default'].kd.stop_fraction * 100:g}%% of the steps; RKD always distils for all of them)")

    io = demo.add_argument_group("outputs")
    io.add_argument("--out", metavar="DIR", help=f"where metrics.json and demo.png go ({_preset_default('out_dir')})")
    io.add_argument("--cache-dir", metavar="DIR",
                    help="tokenizer, token and teacher cache (default $LETKIT_CACHE, $XDG_CACHE_HOME/letkit or ~/.cache/letkit)")
    io.add_argument("--eval-every", type=int, metavar="N",
                    help=f"validation loss every N steps ({_preset_default('eval_every')})")
    io.add_argument("--no-plot", action="store_true", help="skip the PNG")
    io.add_argument("--no-progress", action="store_true", help="no progress bars")

    commands.add_parser(
        "tokenize", add_help=False,
        help="tokenize text files into token shards for pretraining (letkit tokenize --help)",
    )
    _add_export_parser(commands)
    _add_eval_parser(commands)
    return parser


def _add_export_parser(commands) -> None:
    export = commands.add_parser(
        "export", help="a training checkpoint (DCP, any world size) -> a Hugging Face checkpoint directory",
        description="Write the target model of RUN_DIR/checkpoints/step_N (examples/pretrain_fsdp.py) as config.json "
                    "+ model.safetensors + tokenizer.json, loadable by transformers' AutoModelForCausalLM and "
                    "letkit.models.load_pretrained. Nothing appears at OUT_DIR unless the export completes.",
    )
    export.add_argument("checkpoint", metavar="CHECKPOINT", help="a step_N directory of a run's checkpoints/")
    export.add_argument("out_dir", metavar="OUT_DIR", help="the directory to create")
    export.add_argument("--tokenizer", metavar="FILE",
                        help="tokenizer.json to include (default: the one kept with the run's token shards)")
    export.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16",
                        help="dtype of the saved weights (default bfloat16)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")


def _add_eval_parser(commands) -> None:
    from letkit.evaluation import PAPER_TASK_GROUP, PAPER_TASKS

    evaluate = commands.add_parser(
        "eval", help="downstream-task accuracy of a checkpoint with lm-evaluation-harness (pip install 'letkit[eval]')",
        description=f"Score a Hugging Face checkpoint directory (a run's final_model/ or a `letkit export`ed step) "
                    f"with lm-evaluation-harness. The default task group {PAPER_TASK_GROUP} holds "
                    f"{', '.join(PAPER_TASKS)}, 1-shot; their data comes from the Hugging Face hub (or its cache).",
    )
    evaluate.add_argument("model_dir", metavar="MODEL_DIR", help="config.json + model.safetensors + tokenizer.json")
    evaluate.add_argument("--tasks", default=None, metavar="T1,T2",
                          help=f"comma-separated lm-eval task or group names (default {PAPER_TASK_GROUP}, unless "
                               "--task-file is given)")
    evaluate.add_argument("--task-file", action="append", default=[], metavar="FILE.jsonl",
                          help='a local multiple-choice task: JSONL lines {"context": str, "choices": [str, ...], '
                               '"label": int} (repeatable; no hub needed)')
    evaluate.add_argument("--num-fewshot", type=int, default=1, metavar="K", help="in-context examples (default 1)")
    evaluate.add_argument("--batch-size", type=int, default=8, metavar="N", help="default 8")
    evaluate.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    evaluate.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float32 (default auto)")
    evaluate.add_argument("--limit", type=int, default=None, metavar="N",
                          help="only the first N items per task (a quick look, not a comparable score)")
    evaluate.add_argument("--include-path", action="append", default=[], metavar="DIR",
                          help="extra directory of lm-eval task configs (repeatable)")
    evaluate.add_argument("--output", metavar="FILE.json", help="write the scores as JSON (atomically)")


def export_main(args: argparse.Namespace) -> int:
    """``letkit export``."""
    import torch

    from letkit.export import export_checkpoint
    from letkit.models.hub import CheckpointError

    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, tokenizer=args.tokenizer,
                                dtype=getattr(torch, args.dtype), overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"letkit export: error: {e}", file=sys.stderr)
        return 2
    has_tokenizer = (out / "tokenizer.json").is_file()
    print(f"exported {args.checkpoint} -> {out}" + ("" if has_tokenizer else
          " (no tokenizer.json: pass --tokenizer FILE to include one; evaluation needs it)"))
    return 0


def eval_main(args: argparse.Namespace) -> int:
    """``letkit eval``."""
    import tempfile

    from letkit.atomic import atomic_write_json
    from letkit.evaluation import PAPER_TASK_GROUP, evaluate_checkpoint, local_choice_task

    try:
        with tempfile.TemporaryDirectory(prefix="letkit-eval-tasks-") as local_dir:
            tasks = [local_choice_task(path, local_dir) for path in args.task_file]
            if args.tasks or not tasks:
                tasks += (args.tasks or PAPER_TASK_GROUP).split(",")
            scores = evaluate_checkpoint(args.model_dir, tasks, num_fewshot=args.num_fewshot,
                                         batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                                         limit=args.limit, include_paths=[local_dir, *args.include_path])
    except (ValueError, ImportError) as e:
        print(f"letkit eval: error: {e}", file=sys.stderr)
        return 2
    for task, metrics in scores["results"].items():
        shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if not k.endswith("_stderr"))
        print(f"{task}: {shown}")
    if args.output:
        atomic_write_json(args.output, scores)
        print(f"scores: {args.output}")
    return 0


def demo_config_from_args(args: argparse.Namespace):
    """The :class:`letkit.demo.DemoConfig` that the parsed ``letkit demo`` arguments describe."""
    config = preset("quick" if args.quick else "default")
    overrides = {"seeds": args.seeds, "seed": args.seed, "threads": args.threads, "corpus": args.corpus,
                 "bin_dtype": args.bin_dtype, "tokenizer": args.tokenizer, "vocab_size": args.vocab_size,
                 "teacher": args.teacher, "cross_tokenizer": args.cross_tokenizer,
                 "teacher_vocab_size": args.teacher_vocab_size, "out_dir": args.out, "cache_dir": args.cache_dir,
                 "eval_every": args.eval_every, "method": args.method}
    config = dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})
    config.plot, config.progress = not args.no_plot, not args.no_progress
    if args.steps is not None:
        if args.steps < 1:
            raise DemoError(f"--steps must be >= 1, got {args.steps}")
        warmup = min(config.target_schedule.warmup_steps, args.steps // 10)
        config.target_schedule = dataclasses.replace(config.target_schedule, steps=args.steps, warmup_steps=warmup)
    if args.target_layers is not None:
        if args.target_layers < 1:
            raise DemoError(f"--target-layers must be >= 1, got {args.target_layers}")
        config.target_shape = dataclasses.replace(config.target_shape, num_layers=args.target_layers)
    if args.teacher_steps is not None:
        if args.teacher_steps < 1:
            raise DemoError(f"--teacher-steps must be >= 1, got {args.teacher_steps}")
        warmup = min(config.teacher_schedule.warmup_steps, args.teacher_steps // 10)
        config.teacher_schedule = dataclasses.replace(config.teacher_schedule, steps=args.teacher_steps, warmup_steps=warmup)
    if args.lr is not None:
        config.target_schedule = dataclasses.replace(config.target_schedule, lr=args.lr)
    steps = config.target_schedule.steps
    let_overrides = {"lambda0": args.lambda0, "layer_map": args.layer_map, "projector": args.projector,
                     "stop_fraction": _fraction_of_run("--stop-step", args.stop_step, steps)}
    config.let = dataclasses.replace(config.let, **{k: v for k, v in let_overrides.items() if v is not None})
    kd_overrides = {"weight": args.kd_weight, "temperature": args.kd_temperature,
                    "stop_fraction": _fraction_of_run("--kd-stop-step", args.kd_stop_step, steps)}
    config.kd = dataclasses.replace(config.kd, **{k: v for k, v in kd_overrides.items() if v is not None})
    return config


def _fraction_of_run(option: str, step: int | None, steps: int) -> float | None:
    """``step / steps`` for a stop step given as ``option`` (None when not given), checked to be in 1 .. steps."""
    if step is None:
        return None
    if not 1 <= step <= steps:
        raise DemoError(f"{option} must be in 1 .. {steps} (the target's steps), got {step}")
    return step / steps


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["tokenize"]:
        from letkit.data import main as tokenize_main

        return tokenize_main(argv[1:], prog="letkit tokenize")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "export":
        return export_main(args)
    if args.command == "eval":
        return eval_main(args)
    try:
        config = demo_config_from_args(args)
        metrics = run_demo(config, log=lambda m: print(m, file=sys.stderr, flush=True))
    except DemoError as e:
        print(f"letkit demo: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nletkit demo: interrupted. The cache holds only complete entries; rerun to continue.", file=sys.stderr)
        return 130
    print(format_report(metrics))
    print(f"\nmetrics: {config.out_dir}/metrics.json" + (f"\nplot: {metrics['plot']}" if metrics["plot"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
