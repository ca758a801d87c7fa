r"""Scaling study from ``benchmarks/convergence.py`` results: does a method's speedup grow or shrink with the target?

Reads convergence JSON files (paths or quoted globs; other JSON files are skipped with a note) and writes:

* a markdown table, one row per target shape (and method settings): non-embedding parameters, depth, size ratio to
  the teacher (non-embedding), the learning rate the comparison ran at, the seeds, and the method's step speedup and
  final-loss gap (method minus baseline; negative = better) as means with t-based 95% confidence intervals;
* an S_stop-sensitivity table (``--method let`` and ``let+salt``) wherever runs of one target, learning rate and
  settings but LET's ``stop_fraction`` ran at several values of it (e.g. ``--vary stop_fraction=0.25,0.5``);
* with ``--png``, a figure with two panels: step speedup and final-loss gap against the target/teacher size ratio,
  points labelled by depth, error bars the 95% CIs.

Rows pool every file's records of the same target shape, schedule (but its LR), context length, teacher and method
settings; a run found in two files (an LR sweep's baseline beside the comparison's) counts once, and is refused if
the two disagree. The method's runs are those at its base settings (the run named after the method; in files written before ``--methods`` existed,
``let``). Each row uses one learning rate: of the learning rates the method ran at, the one where the baseline's
mean final validation loss is lowest. A note says so when the baseline did better at a learning rate the method did
not run at (sweep it there too). Non-embedding parameter counts come from the target's shape (``letkit.models``).

The scaling study in benchmarks/RESULTS.md and docs/scaling.png (one file set per target depth)::

    R=benchmarks/results/demo
    python benchmarks/scaling.py $R/default_lr_seed0.json $R/default_lr_seeds12.json $R/default_seeds34.json \
        "$R/deep6_*.json" "$R/scale12_*.json" --png docs/scaling.png
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from letkit.atomic import atomic_write, atomic_write_bytes
from letkit.demo import METHOD_LABELS, METHODS, ModelShape, build_model, mean_ci95
from letkit.models import count_parameters


@dataclasses.dataclass
class Run:
    """One training run of a convergence file, with what the study needs to group it."""

    method: str  # "baseline" or one of METHODS
    base: bool  # the method at its base settings (the run named after the method)
    settings: dict[str, Any]  # {"let": {...} or None, "kd": {...} or None}
    seed: int
    lr: float
    final_val_loss: float
    comparison: dict[str, Any] | None
    shape: tuple[int, int, int, int]  # hidden, layers, heads, intermediate
    steps: int
    teacher_parameters: int
    target_parameters: int
    setup: str  # everything else two runs must share to be pooled: the schedule but its LR, the context, the teacher
    source: str  # the file it came from

    @property
    def group(self) -> tuple:
        """Runs of one group differ only in seed, learning rate, method and settings."""
        return self.shape, self.steps, self.teacher_parameters, self.setup


def expand(patterns: Sequence[str]) -> list[Path]:
    """Paths and globs -> the sorted, distinct files; a pattern matching nothing is an error."""
    files: set[Path] = set()
    for pattern in patterns:
        matches = glob.glob(pattern, recursive=True) if glob.has_magic(pattern) else [pattern]
        matches = [m for m in matches if Path(m).is_file()]
        if not matches:
            raise SystemExit(f"scaling: {pattern!r} matches no file")
        files.update(Path(m) for m in matches)
    return sorted(files)


def variant_settings(report: dict[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """``(method, {"let": ..., "kd": ...})`` of the run ``name``; files from before ``--methods`` list LET settings only."""
    if name == "baseline":
        return "baseline", {"let": None, "kd": None}
    variant = report["variants"][name]
    if "method" in variant:
        return variant["method"], {"let": variant["let"], "kd": variant["kd"]}
    return "let", {"let": variant, "kd": None}


def non_embedding_parameters(shape: dict[str, int], config: dict[str, Any]) -> int:
    """Non-embedding parameters of the demo's target of this shape (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        model = build_model(ModelShape(**shape), config["vocab_size"], config["seq_len"], seed=0)
    return count_parameters(model, non_embedding=True)


def load_runs(files: Sequence[Path], *, log=print) -> list[Run]:
    """Every run of the convergence files; files that are not convergence results are skipped with a note."""
    runs, sizes = [], {}
    for path in files:
        try:
            report = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SystemExit(f"scaling: cannot read {str(path)!r}: {e}") from None
        if not isinstance(report, dict) or not {"records", "variants", "config", "teacher"} <= set(report):
            log(f"scaling: skipped {path} (not a benchmarks/convergence.py result)")
            continue
        config = report["config"]
        shape = config["target_shape"]
        key = tuple(shape[k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size"))
        if key not in sizes:
            sizes[key] = non_embedding_parameters(shape, config)
        schedule = {k: v for k, v in config["target_schedule"].items() if k != "lr"}
        setup = json.dumps({"schedule": schedule, "seq_len": config["seq_len"], "teacher": report["teacher"]["path"]},
                           sort_keys=True)
        for record in report["records"]:
            method, settings = variant_settings(report, record["variant"])
            runs.append(Run(method, record["variant"] == method, settings, record["seed"], record["lr"],
                            record["final_val_loss"], record.get("comparison"), key, schedule["steps"],
                            report["teacher"]["non_embedding_parameters"], sizes[key], setup, str(path)))
    return distinct_runs(runs)


def distinct_runs(runs: Sequence[Run]) -> list[Run]:
    """Each run once. The same run (group, method, settings, seed and LR) in two files -- an LR sweep's baseline
    beside the comparison's, or a rerun -- is kept once when both files agree on its final loss (the demo is
    deterministic), and refused by name when they do not: pooling both would count one seed twice."""
    kept: dict[tuple, Run] = {}
    for run in runs:
        key = (run.group, run.method, _settings_key(run.settings), run.seed, run.lr)
        first = kept.setdefault(key, run)
        if first is not run and not math.isclose(first.final_val_loss, run.final_val_loss, rel_tol=1e-9):
            raise SystemExit(f"scaling: the {run.method} run of seed {run.seed} at lr {run.lr:g} (target "
                             f"{','.join(map(str, run.shape))}) is in both {first.source} (final loss "
                             f"{first.final_val_loss:.6f}) and {run.source} ({run.final_val_loss:.6f}): "
                             "pass only one of them")
    return list(kept.values())


def _settings_key(settings: dict[str, Any], *, without_stop_fraction: bool = False) -> str:
    if without_stop_fraction and settings["let"] is not None:
        settings = {**settings, "let": {**settings["let"], "stop_fraction": None}}
    return json.dumps(settings, sort_keys=True)


def choose_lr(runs: Sequence[Run], baselines: Sequence[Run], *, log=print, what: str = "") -> float:
    """Of the learning rates ``runs`` trained at, the one with the lowest mean baseline final validation loss."""
    def baseline_loss(lr: float) -> float:
        losses = [b.final_val_loss for b in baselines if b.lr == lr]
        return sum(losses) / len(losses) if losses else math.inf

    chosen = min({r.lr for r in runs}, key=baseline_loss)
    best = min({b.lr for b in baselines}, key=baseline_loss, default=chosen)
    if baseline_loss(best) < baseline_loss(chosen):
        log(f"note: {what}: the baseline did better at lr {best:g} ({baseline_loss(best):.4f}) than at lr {chosen:g} "
            f"({baseline_loss(chosen):.4f}), where the method ran; run the method at lr {best:g} too")
    return chosen


def scaling_rows(runs: Sequence[Run], method: str, *, log=print) -> list[dict[str, Any]]:
    """One row per group of runs (:attr:`Run.group`) and method settings: the method's base runs at the chosen LR."""
    groups: dict[tuple, list[Run]] = {}
    for run in runs:
        if run.method == method and run.base and run.comparison is not None:
            groups.setdefault((run.group, _settings_key(run.settings)), []).append(run)
    rows = []
    for (group, _), members in groups.items():
        first = members[0]
        baselines = [r for r in runs if r.method == "baseline" and r.group == group]
        lr = choose_lr(members, baselines, log=log, what=f"target {','.join(map(str, first.shape))}")
        chosen = sorted((r for r in members if r.lr == lr), key=lambda r: r.seed)
        rows.append({
            "shape": first.shape, "depth": first.shape[1], "steps": first.steps,
            "non_embedding_parameters": first.target_parameters,
            "teacher_parameters": first.teacher_parameters,
            "size_ratio": first.target_parameters / first.teacher_parameters,
            "settings": first.settings, "lr": lr, "seeds": [r.seed for r in chosen],
            "step_speedup": mean_ci95([r.comparison["step_speedup"] for r in chosen]),
            "final_loss_gap": mean_ci95([r.comparison["final_val_loss_delta"] for r in chosen]),
        })
    return sorted(rows, key=lambda row: (row["size_ratio"], row["depth"], row["lr"]))


def stop_fraction_rows(runs: Sequence[Run], method: str) -> list[dict[str, Any]]:
    """Speedup and final-loss gap per LET ``stop_fraction`` (S_stop / steps), for each group of runs (:attr:`Run.group`),
    learning rate and method settings but the stop fraction that ran at two or more stop fractions."""
    groups: dict[tuple, dict[float, list[Run]]] = {}
    for run in runs:
        if run.method == method and run.comparison is not None and run.settings["let"] is not None:
            key = (run.group, run.lr, _settings_key(run.settings, without_stop_fraction=True))
            groups.setdefault(key, {}).setdefault(run.settings["let"]["stop_fraction"], []).append(run)
    table = []
    for by_fraction in groups.values():
        if len(by_fraction) < 2:
            continue
        for fraction, members in sorted(by_fraction.items()):
            members.sort(key=lambda r: r.seed)
            first = members[0]
            table.append({
                "shape": first.shape, "non_embedding_parameters": first.target_parameters, "lr": first.lr,
                "steps": first.steps, "stop_fraction": fraction, "stop_step": max(1, round(fraction * first.steps)),
                "settings": first.settings, "seeds": [r.seed for r in members],
                "step_speedup": mean_ci95([r.comparison["step_speedup"] for r in members]),
                "final_loss_gap": mean_ci95([r.comparison["final_val_loss_delta"] for r in members]),
            })
    return table


def _stat(stat: dict[str, Any], spec: str, suffix: str = "") -> str:
    ci = f" [{stat['ci95'][0]:{spec}}, {stat['ci95'][1]:{spec}}]" if stat["ci95"] else ""
    return f"{stat['mean']:{spec}}{suffix}{ci}"


def describe_settings(settings: dict[str, Any]) -> str:
    """LET and distillation settings in a few words."""
    parts = []
    if settings["let"]:
        let = settings["let"]
        parts.append(f"LET lambda0 {let['lambda0']:g}, S_stop {let['stop_fraction']:g} of steps, {let['layer_map']}, "
                     f"{let['projector']}")
    if settings["kd"]:
        kd = settings["kd"]
        parts.append(f"KD weight {kd['weight']:g}, T {kd['temperature']:g}, for {kd['stop_fraction']:g} of steps")
    return "; ".join(parts)


def format_markdown(rows: Sequence[dict[str, Any]], stop_rows: Sequence[dict[str, Any]], method: str) -> str:
    """The scaling table, and the S_stop-sensitivity table when there is one."""
    label = METHOD_LABELS[method]
    lines = [f"Scaling: {label} vs the baseline (means over seeds, 95% CI in brackets; loss gap = {label} minus "
             "baseline final validation loss, nats/token)", "",
             "| target (hidden, layers, heads, ffn) | non-embedding params | depth | size / teacher | steps | "
             "baseline LR | seeds | step speedup | final-loss gap | settings |",
             "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {', '.join(map(str, r['shape']))} | {r['non_embedding_parameters'] / 1e6:.2f}M | {r['depth']} | "
                     f"{r['size_ratio']:.1f}x | {r['steps']} | {r['lr']:g} | {len(r['seeds'])} "
                     f"({', '.join(map(str, r['seeds']))}) | {_stat(r['step_speedup'], '.2f', 'x')} | "
                     f"{_stat(r['final_loss_gap'], '+.3f')} | {describe_settings(r['settings'])} |")
    if stop_rows:
        lines += ["", f"S_stop sensitivity: {label} with LET's S_stop at a fraction of the run", "",
                  "| target (hidden, layers, heads, ffn) | non-embedding params | steps | LR | S_stop / steps | S_stop | "
                  "seeds | step speedup | final-loss gap | other settings |",
                  "|---|---:|---:|---:|---:|---:|---|---|---|---|"]
        for r in stop_rows:
            others = describe_settings(r["settings"]).replace(f"S_stop {r['stop_fraction']:g} of steps, ", "")
            lines.append(f"| {', '.join(map(str, r['shape']))} | {r['non_embedding_parameters'] / 1e6:.2f}M | "
                         f"{r['steps']} | {r['lr']:g} | {r['stop_fraction']:g} | {r['stop_step']} | "
                         f"{len(r['seeds'])} ({', '.join(map(str, r['seeds']))}) | {_stat(r['step_speedup'], '.2f', 'x')} | "
                         f"{_stat(r['final_loss_gap'], '+.3f')} | {others} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict[str, Any]], method: str, path: Path) -> None:
    """Step speedup and final-loss gap against the target/teacher size ratio, labelled by depth, 95% CI error bars."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise SystemExit("scaling: --png needs matplotlib (pip install 'letkit[plot]')") from None
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    label = METHOD_LABELS[method]
    for ax, key, ylabel, reference in ((axes[0], "step_speedup", "step speedup to the baseline's final loss", 1.0),
                                       (axes[1], "final_loss_gap", f"final val loss, {label} - baseline (nats)", 0.0)):
        ax.axhline(reference, color="#555555", ls=":", lw=0.8)
        for r in rows:
            stat = r[key]
            err = ([[stat["mean"] - stat["ci95"][0]], [stat["ci95"][1] - stat["mean"]]] if stat["ci95"] else None)
            ax.errorbar([r["size_ratio"]], [stat["mean"]], yerr=err, fmt="o", color="#d1495b", capsize=3)
            ax.annotate(f"{r['depth']} blocks", (r["size_ratio"], stat["mean"]), textcoords="offset points",
                        xytext=(6, 4), fontsize=8)
        ratios = sorted({r["size_ratio"] for r in rows})
        ax.set(xscale="log", xlabel="target / teacher non-embedding parameters", ylabel=ylabel,
               xlim=(min(ratios) / 1.3, max(ratios) * 1.3))
        ax.set_xticks(ratios, [f"{ratio:.1f}x" for ratio in ratios])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    fig.suptitle(f"{label} vs baseline by target size (mean over seeds, 95% CI)", fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE_OR_GLOB", help="convergence JSON files (quote globs)")
    parser.add_argument("--method", choices=METHODS, default="let",
                        help="the method compared with the baseline (default: %(default)s)")
    parser.add_argument("--markdown", metavar="FILE.md", help="also write the tables here")
    parser.add_argument("--png", metavar="FILE.png", help="write the figure here (needs matplotlib)")
    args = parser.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    runs = load_runs(expand(args.files), log=log)
    rows = scaling_rows(runs, args.method, log=log)
    if not rows:
        print(f"scaling: no {args.method} runs at their base settings in these files", file=sys.stderr)
        return 2
    text = format_markdown(rows, stop_fraction_rows(runs, args.method), args.method)
    print(text, end="")
    if args.markdown:
        atomic_write_bytes(args.markdown, text.encode())
    if args.png:
        plot(rows, args.method, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
