r"""Convergence study for ``letkit demo``: LR sweeps, multi-seed speedups, one-at-a-time ablations, and the paper's
comparison of LET with logit distillation from the same teacher (SALT, RKD, LET+SALT).

Every (seed, learning rate) group trains the baseline and every method's runs (``--methods``, each at its base
settings and at each ``--vary`` value that applies to it) *in lockstep* on the same batches from the same
initialisation (see :func:`letkit.demo.train_lockstep`), so wall-clock numbers within a group share the machine's
background load. Each run is compared with the baseline of its own group.

The commands behind RESULTS.md (JSON copies, each with its full config, in benchmarks/results/demo/). The --quick
commands pass lambda0, S_stop and the layer map explicitly, so they reproduce the same runs even if the presets'
LET defaults change; the default preset's LR sweep uses that preset's LET settings (when it ran: lambda0 3,
S_stop = all steps, L2M, interpolate)::

    # the 3-block default's LR sweep (baseline and the demo's LET at each LR; repeated with --seed 1 --seeds 2)
    python benchmarks/convergence.py --preset default --target-shape 192,3,4,512 --threads 2 --lr 1.5e-3,2e-3,3e-3 \
        --out default_lr_seed0.json
    # the 6-block default (before it was the default, hence --target-shape): the baseline's LR sweep (also run
    # with --seed 1 --seeds 2 --lr 1e-3,2e-3), then baseline, LET (L2M) and L2E at lr 1.5e-3 (also --seed 1 --seeds 2)
    python benchmarks/convergence.py --preset default --threads 2 --target-shape 192,6,4,512 --no-let-base \
        --lr 7.5e-4,1e-3,2e-3 --out deep6_baseline_lr_seed0.json
    python benchmarks/convergence.py --preset default --threads 2 --target-shape 192,6,4,512 --vary layer_map=L2E \
        --out deep6_seed0.json
    # --quick's LR sweep: baseline and LET (lambda0 1, S_stop = half the steps, L2E) at three LRs
    python benchmarks/convergence.py --preset quick --threads 1 --lr 1e-3,2e-3,4e-3 --lambda0 1 \
        --stop-fraction 0.5 --layer-map L2E --out quick_lr.json
    # one-at-a-time ablations around lambda0 3, S_stop = half, L2E, interpolate, at the baseline's best LR
    python benchmarks/convergence.py --preset quick --threads 1 --lr 1e-3 --lambda0 3 --stop-fraction 0.5 \
        --layer-map L2E --vary lambda0=0.1 --vary stop_fraction=1.0 --vary layer_map=L2M \
        --vary projector=linear,teacher_interpolate --out quick_ablate.json
    # L2E vs L2M at lambda0 3, S_stop = all steps, on two fresh seeds
    python benchmarks/convergence.py --preset quick --threads 1 --seed 1 --seeds 2 --lr 1e-3 --lambda0 3 \
        --stop-fraction 1.0 --layer-map L2E --vary layer_map=L2M --out quick_combo.json

The comparison with logit distillation, for example every method at its base settings, and the distillation methods
also at two other KD weights and a second temperature::

    python benchmarks/convergence.py --preset default --threads 2 --methods let,salt,rkd,let+salt \
        --vary kd_weight=0.1,1 --vary temperature=2 --out methods_seed0.json

``--teacher DIR``, ``--tokenizer FILE``, ``--cross-tokenizer [last|mean]`` and ``--teacher-vocab-size N`` work as in
``letkit demo`` (the same :func:`letkit.demo.prepare`): a provided teacher, or cross-tokenizer LET (which logit
distillation cannot use: it needs one shared vocabulary).

Methods (``--methods``, comma-separated): ``baseline`` (always run), ``let``, ``salt`` (logit distillation for the
first ``kd_stop_fraction`` of the steps), ``rkd`` (for all of them), ``let+salt`` (both terms). A run is named
``METHOD`` at the base settings and ``METHOD KEY=VALUE`` for a variant.

Variant keys (``--vary KEY=V1,V2``), each applied to the methods that have the setting: LET's ``lambda0``,
``stop_fraction``, ``layer_map`` (L2E/L2M/L2L), ``projector`` (interpolate, linear, mlp, and
``teacher_interpolate``: the teacher's features interpolated *up* to the target's width and compared there, instead
of letkit's P mapping the target's features *down* to the teacher's width); logit distillation's ``kd_weight``,
``temperature`` and ``kd_stop_fraction`` (SALT's; RKD distils for the whole run).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any

import torch

from letkit.atomic import atomic_write_json
from letkit.demo import (
    METHODS,
    DemoConfig,
    DemoError,
    KDSettings,
    LETSettings,
    ModelShape,
    compare_runs,
    mean_ci95,
    method_settings,
    prepare,
    preset,
    target_run,
    train_lockstep,
)
from letkit.losses import AlignmentLoss, interpolate_features
from letkit.projector import LayerMappingProjector
from letkit.token_alignment import ALIGNMENT_MODES

# --vary KEY -> (the settings it changes: "let" or "kd", the field there, its type)
VARIANT_KEYS = {
    "lambda0": ("let", "lambda0", float),
    "stop_fraction": ("let", "stop_fraction", float),
    "layer_map": ("let", "layer_map", str),
    "projector": ("let", "projector", str),
    "kd_weight": ("kd", "weight", float),
    "temperature": ("kd", "temperature", float),
    "kd_stop_fraction": ("kd", "stop_fraction", float),
}


class TeacherSideInterpolation(LayerMappingProjector):
    """Alignment in the *target's* space: the teacher's features are interpolated up to the target's width.

    letkit's ``"interpolate"`` projector does the opposite (P maps the target's features down to the teacher's
    width, the paper's ``cos(P(h_M), h_T)``); this is the variant the feasibility probe used.
    """

    def __init__(self, target_dim: int, teacher_dim: int) -> None:
        super().__init__([target_dim], [teacher_dim], "interpolate")

    def alignment_loss(self, target_features, teacher_features, loss_fn: AlignmentLoss, mask=None):
        losses = [loss_fn(s, interpolate_features(t, s.shape[-1]), projection="identity", mask=mask)
                  for s, t in zip(target_features, teacher_features)]
        return sum(losses) / len(losses)


@dataclasses.dataclass
class Variant:
    """One run of a lockstep group besides the baseline: ``method`` with these LET and distillation settings (None
    for a part the method does not have)."""

    method: str
    let: LETSettings | None
    kd: KDSettings | None


def parse_methods(spec: str) -> list[str]:
    """``"baseline,let,salt"`` -> ``["let", "salt"]`` (the baseline always runs)."""
    methods = [m for m in spec.split(",") if m != "baseline"]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or len(set(methods)) != len(methods):
        raise SystemExit(f"--methods {spec!r}: expected distinct names from {('baseline', *METHODS)}")
    return methods


def parse_variants(methods: list[str], let: LETSettings, kd: KDSettings, specs: list[str], *,
                   include_base: bool = True) -> dict[str, Variant]:
    """One run per method at the base settings (``include_base``), and per ``--vary`` spec (``"KEY=V1,V2"``) one run
    per value for each method that has that setting, differing from its base in that setting only."""
    variants = {}
    for method in methods:
        if include_base:
            variants[method] = Variant(method, *method_settings(method, let, kd))
    for spec in specs:
        key, _, values = spec.partition("=")
        if key not in VARIANT_KEYS or not values:
            raise SystemExit(f"--vary {spec!r}: expected KEY=V1,V2 with KEY in {sorted(VARIANT_KEYS)}")
        part, field, kind = VARIANT_KEYS[key]
        # RKD distils for the whole run: SALT's stop does not apply to it
        takers = [m for m in methods if dict(zip(("let", "kd"), method_settings(m, let, kd)))[part] is not None
                  and not (m == "rkd" and key == "kd_stop_fraction")]
        if not takers:
            raise SystemExit(f"--vary {spec!r}: none of the methods {methods} has {key!r}")
        for value in values.split(","):
            changed = {"let": let, "kd": kd}
            changed[part] = dataclasses.replace(changed[part], **{field: kind(value)})
            for method in takers:
                variants[f"{method} {key}={value}"] = Variant(method, *method_settings(method, **changed))
    return variants


def parse_shape(spec: str) -> ModelShape:
    """``"192,6,4,512"`` -> ModelShape(hidden_size=192, num_layers=6, num_heads=4, intermediate_size=512)."""
    try:
        hidden, layers, heads, intermediate = (int(v) for v in spec.split(","))
    except ValueError:
        raise SystemExit(f"--target-shape {spec!r}: expected four integers HIDDEN,LAYERS,HEADS,INTERMEDIATE") from None
    if min(hidden, layers, heads, intermediate) < 1 or hidden % heads:
        raise SystemExit(f"--target-shape {spec!r}: sizes must be >= 1 and HIDDEN divisible by HEADS")
    return ModelShape(hidden_size=hidden, num_layers=layers, num_heads=heads, intermediate_size=intermediate)


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (variant, lr): mean speedups with 95% CIs and the mean final-loss difference over seeds."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["lr"]), []).append(r)
    rows = []
    for (variant, lr), rs in groups.items():
        row = {"variant": variant, "method": rs[0]["method"], "lr": lr, "seeds": [r["seed"] for r in rs],
               "final_val_loss": mean_ci95([r["final_val_loss"] for r in rs])}
        if variant != "baseline":
            for key in ("step_speedup", "wall_speedup", "wall_speedup_load_matched", "final_val_loss_delta"):
                row[key] = mean_ci95([r["comparison"][key] for r in rs])
            row["reached"] = sum(r["comparison"]["reached"] for r in rs)
        rows.append(row)
    return rows


def format_summary(rows: list[dict[str, Any]]) -> str:
    def fmt(stat: dict[str, Any] | None, spec: str) -> str:
        if stat is None:
            return "-"
        ci = f" [{stat['ci95'][0]:{spec}}, {stat['ci95'][1]:{spec}}]" if stat["ci95"] else ""
        return f"{stat['mean']:{spec}}{ci}"

    lines = [f"{'variant':<32} {'lr':>7} {'n':>2} {'final val':>22} {'step speedup':>18} {'wall speedup':>18} "
             f"{'wall, load-matched':>18} {'reached':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<32} {r['lr']:>7.2g} {len(r['seeds']):>2} {fmt(r['final_val_loss'], '.3f'):>22} "
                     f"{fmt(r.get('step_speedup'), '.2f'):>18} {fmt(r.get('wall_speedup'), '.2f'):>18} "
                     f"{fmt(r.get('wall_speedup_load_matched'), '.2f'):>18} {r.get('reached', '-'):>7}")
    return "\n".join(lines)


def check_variants(config: DemoConfig, variants: dict[str, Variant]) -> None:
    """Raise a DemoError naming the first setting ``letkit demo`` would refuse: in ``config``, or in a variant."""
    config.validate()
    for name, variant in variants.items():
        try:
            dataclasses.replace(config, method=variant.method, let=variant.let or config.let,
                                kd=variant.kd or config.kd).validate()
        except DemoError as e:
            raise DemoError(f"{name}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=("quick", "default"), default="quick",
                        help="letkit demo's preset: models, data, schedules, LET settings (default: %(default)s)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds, each a group per LR (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="first seed (default: %(default)s)")
    parser.add_argument("--lr", default=None, help="comma-separated peak LRs (default: the preset's)")
    parser.add_argument("--methods", default="let", metavar="M1,M2",
                        help=f"methods compared with the baseline, from {', '.join(METHODS)} (default: %(default)s)")
    parser.add_argument("--vary", action="append", default=[], metavar="KEY=V1,V2",
                        help="variants of the methods that have KEY (repeatable; keys above)")
    parser.add_argument("--no-let-base", action="store_true",
                        help="leave out the methods' runs at their base settings: only the baseline and the variants")
    parser.add_argument("--lambda0", type=float, help="override the preset's lambda0 (the base of the variants)")
    parser.add_argument("--stop-fraction", type=float, help="override the preset's S_stop / steps")
    parser.add_argument("--layer-map", help="override the preset's layer map (L2E, L2M, L2L)")
    parser.add_argument("--kd-weight", type=float,
                        help=f"override the distillation weight (default: {KDSettings().weight:g})")
    parser.add_argument("--kd-temperature", type=float,
                        help=f"override the distillation temperature (default: {KDSettings().temperature:g})")
    parser.add_argument("--kd-stop-fraction", type=float,
                        help=f"override SALT's distillation phase / steps (default: {KDSettings().stop_fraction:g})")
    parser.add_argument("--steps", type=int, help="override the target's steps")
    parser.add_argument("--target-shape", metavar="HIDDEN,LAYERS,HEADS,INTERMEDIATE",
                        help="override the target's shape, e.g. 192,6,4,512 (default: the preset's)")
    parser.add_argument("--teacher", metavar="DIR",
                        help="teacher checkpoint directory (HF layout), as letkit demo --teacher (default: the demo's "
                             "pretrained and cached teacher)")
    parser.add_argument("--teacher-steps", type=int, metavar="N",
                        help="pretrain the demo's teacher for N steps instead of the preset's (fewer: a weaker teacher, "
                             "cached apart)")
    parser.add_argument("--tokenizer", metavar="FILE",
                        help="the target's tokenizer.json, as letkit demo --tokenizer (default: the teacher's, else a "
                             "byte-level BPE trained on the corpus)")
    parser.add_argument("--cross-tokenizer", nargs="?", const="last", choices=ALIGNMENT_MODES,
                        metavar="|".join(ALIGNMENT_MODES),
                        help="cross-tokenizer LET, as letkit demo --cross-tokenizer (default when given: last)")
    parser.add_argument("--teacher-vocab-size", type=int, metavar="N",
                        help="pretrain the teacher on its own byte-level BPE of N tokens (implies --cross-tokenizer)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", required=True, help="JSON file (rewritten after every group)")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)

    config = preset(args.preset, seeds=args.seeds, progress=args.progress, threads=args.threads,
                    cache_dir=args.cache_dir, teacher=args.teacher, tokenizer=args.tokenizer,
                    cross_tokenizer=args.cross_tokenizer,
                    teacher_vocab_size=args.teacher_vocab_size)
    if args.teacher_steps is not None:
        if args.teacher is not None:
            parser.error(f"--teacher-steps {args.teacher_steps} pretrains the demo's teacher; --teacher {args.teacher} "
                         "provides one: pass one of them")
        config.teacher_schedule = dataclasses.replace(config.teacher_schedule, steps=args.teacher_steps)
    if args.steps:
        config.target_schedule = dataclasses.replace(config.target_schedule, steps=args.steps)
    if args.target_shape:
        config.target_shape = parse_shape(args.target_shape)
    overrides = {"lambda0": args.lambda0, "stop_fraction": args.stop_fraction, "layer_map": args.layer_map}
    config.let = dataclasses.replace(config.let, **{k: v for k, v in overrides.items() if v is not None})
    overrides = {"weight": args.kd_weight, "temperature": args.kd_temperature, "stop_fraction": args.kd_stop_fraction}
    config.kd = dataclasses.replace(config.kd, **{k: v for k, v in overrides.items() if v is not None})
    methods = parse_methods(args.methods)
    variants = parse_variants(methods, config.let, config.kd, args.vary, include_base=not args.no_let_base)
    lrs = [float(x) for x in args.lr.split(",")] if args.lr else [config.target_schedule.lr]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    try:
        check_variants(config, variants)
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        prepared = prepare(config, log=log)
    except DemoError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data, teacher = prepared.data, prepared.teacher
    if not teacher.provided:
        log(f"teacher {teacher.path}: val loss {teacher.val_loss:.3f}, {teacher.non_embedding_parameters} "
            f"non-embedding params, pretraining {teacher.pretrain_seconds:.0f}s")

    out = Path(args.out)
    records: list[dict[str, Any]] = []
    report = {"command": " ".join(["python", "benchmarks/convergence.py", *(argv if argv is not None else sys.argv[1:])]),
              "config": dataclasses.asdict(config), "teacher": dataclasses.asdict(teacher),
              "environment": {"torch": torch.__version__, "threads": torch.get_num_threads()},
              "variants": {k: dataclasses.asdict(v) for k, v in variants.items()}, "records": records}
    t_start = time.perf_counter()
    for seed in range(args.seed, args.seed + args.seeds):
        for lr in lrs:
            specs = [target_run(config, data, seed, name="baseline", lr=lr)]
            for name, variant in variants.items():
                let, projector = variant.let, None
                if let is not None and let.projector == "teacher_interpolate":
                    projector = TeacherSideInterpolation(config.target_shape.hidden_size, teacher.hidden_size)
                    let = dataclasses.replace(let, projector="interpolate")
                specs.append(target_run(config, data, seed, name=name, let=let, kd=variant.kd,
                                        teacher_path=teacher.path, lr=lr, projector=projector))
            results = train_lockstep(specs, data, config.target_schedule, seq_len=config.seq_len, data_seed=seed,
                                     eval_every=config.eval_every, eval_sequences=config.eval_sequences,
                                     desc=f"seed {seed} lr {lr:g}", progress=args.progress)
            baseline = results[0]
            for result in results:
                method = variants[result.name].method if result is not baseline else "baseline"
                record = {"seed": seed, "lr": lr, "variant": result.name, "method": method,
                          "final_val_loss": result.final_val_loss,
                          "train_seconds": result.train_seconds, "teacher_forward_seconds": result.teacher_forward_seconds,
                          "aligned_fraction": result.aligned_fraction,
                          "teacher_tokenize_seconds": result.teacher_tokenize_seconds,
                          "curve": [dataclasses.asdict(p) for p in result.curve]}
                if result is not baseline:
                    record["comparison"] = compare_runs(baseline, result)
                records.append(record)
            report["summary"] = summarise(records)
            report["elapsed_seconds"] = time.perf_counter() - t_start
            atomic_write_json(out, report)
            log(f"seed {seed} lr {lr:g} done ({report['elapsed_seconds']:.0f}s)\n" + format_summary(report["summary"]))
    print(format_summary(report["summary"]))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
