"""The demo's outputs for people: the result table and the plot of the validation curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from letkit.atomic import atomic_write
from letkit.demo.config import METHOD_LABELS


def format_report(metrics: dict[str, Any]) -> str:
    """The human-readable result table."""
    teacher, runs, summary = metrics["teacher"], metrics["runs"], metrics["summary"]
    method = metrics["method"]
    label = METHOD_LABELS[method]
    lines = ["", f"corpus: {metrics['data']['corpus']}",
             f"teacher: {teacher['non_embedding_parameters'] / 1e6:.2f}M non-embedding params, "
             + (f"provided ({teacher['path']})" if teacher["provided"] else
                f"val loss {teacher['val_loss']:.3f}, pretraining {teacher['pretrain_seconds']:.0f}s"
                + (" (cached: reused, not paid this run)" if teacher["cached"] else "")),
             f"target: {metrics['target']['non_embedding_parameters'] / 1e6:.2f}M non-embedding params "
             f"({metrics['target']['size_ratio']:.1f}x the teacher), {metrics['config']['target_schedule']['steps']} steps",
             f"method: {label} vs the baseline ({describe_method(metrics)})",
             ""]
    header = (f"{'seed':>4} | {'baseline val (ppl)':>18} | {label + ' val (ppl)':>15} | "
              f"{label + ' reaches baseline final':>28} | {'step x':>6} | {'wall x':>6} | {'raw wall x':>10}")
    lines += [header, "-" * len(header)]
    for r in runs:
        b, l, c = r["baseline"], r[method], r["comparison"]
        reach = (f"step {c['crossing_step']:.0f}, {c['crossing_seconds']:.0f}s of {b['train_seconds']:.0f}s"
                 if c["reached"] else "not reached")
        lines.append(f"{r['seed']:>4} | {b['final_val_loss']:>8.3f} ({math.exp(b['final_val_loss']):>6.1f}) | "
                     f"{l['final_val_loss']:>6.3f} ({math.exp(l['final_val_loss']):>6.1f}) | {reach:>28} | "
                     f"{c['step_speedup']:>5.2f}x | {c['wall_speedup_load_matched']:>5.2f}x | {c['wall_speedup']:>9.2f}x")
    lines.append("")
    for name, what in (("step_speedup", "step speedup"),
                       ("wall_speedup_load_matched", "wall-clock speedup (teacher forward included)"),
                       ("wall_speedup", "raw wall-clock speedup")):
        s = summary[name]
        ci = f", 95% CI [{s['ci95'][0]:.2f}, {s['ci95'][1]:.2f}] over {s['n']} seeds" if s["ci95"] else ""
        lines.append(f"{what}: {s['mean']:.2f}x{ci}")
    lines += [
        f"  wall x = step x * (baseline's / {label}'s training seconds over {label}'s steps to the crossing), both runs",
        f"  trained in lockstep; raw wall x = baseline's total seconds / {label}'s seconds to the crossing. The two agree",
        "  on an idle machine; when other programs change the load mid-run, only the first one compares like with like.",
        f"{label}'s final val loss below the baseline's in {summary['better_than_baseline']} of {len(runs)} seeds; "
        f"the teacher's forward passes took {summary['teacher_forward_fraction'] * 100:.1f}% of {label}'s training time",
    ]
    cross = metrics.get("cross_tokenizer") or {}
    if cross.get("active"):
        lines.append(
            f"cross-tokenizer LET ({cross['mode']}): the teacher read its own {cross['teacher_vocab_size']}-token "
            f"vocabulary; {cross['aligned_fraction'] * 100:.1f}% of target positions received a teacher feature; "
            f"re-tokenizing took {cross['teacher_tokenize_fraction'] * 100:.1f}% of LET's training time")
    return "\n".join(lines)


def describe_method(metrics: dict[str, Any]) -> str:
    """The settings of the metrics' method in a few words, e.g. ``"lambda0 3, S_stop 600 (L2M, interpolate)"``."""
    config, target = metrics["config"], metrics["target"]
    parts = []
    if target["stop_step"] is not None:
        let = config["let"]
        parts.append(f"LET lambda0 {let['lambda0']:g}, S_stop {target['stop_step']} ({let['layer_map']}, "
                     f"{let['projector']})")
    if target["kd_stop_step"] is not None:
        kd = config["kd"]
        parts.append(f"KD weight {kd['weight']:g}, temperature {kd['temperature']:g}, "
                     f"until step {target['kd_stop_step']}")
    return "; ".join(parts)


def plot_curves(metrics: dict[str, Any], path: Path) -> bool:
    """Validation loss vs steps and vs wall-clock seconds, every seed. False when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    method = metrics["method"]
    label = METHOD_LABELS[method]
    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    colors = {"baseline": "#555555", method: "#d1495b"}
    labels = {"baseline": "baseline (NLL)", method: label}
    for i, run in enumerate(metrics["runs"]):
        for kind in ("baseline", method):
            curve = run[kind]["curve"]
            for ax, x in zip(axes, ("step", "seconds")):
                ax.plot([p[x] for p in curve[1:]], [p["val_loss"] for p in curve[1:]], color=colors[kind],
                        alpha=1.0 if i == 0 else 0.35, lw=1.8 if i == 0 else 1.0, label=labels[kind] if i == 0 else None)
        c = run["comparison"]
        for ax, key in zip(axes, ("crossing_step", "crossing_seconds")):
            ax.axhline(run["baseline"]["final_val_loss"], color=colors["baseline"], ls=":", lw=0.8)
            if c["reached"]:
                ax.plot([c[key]], [run["baseline"]["final_val_loss"]], "o", color=colors[method], ms=5)
    s, w = metrics["summary"]["step_speedup"], metrics["summary"]["wall_speedup"]
    axes[0].set(xlabel="training step", ylabel="validation loss (nats/token)", title=f"vs steps: {label} {s['mean']:.2f}x")
    m = metrics["summary"]["wall_speedup_load_matched"]
    axes[1].set(xlabel="training wall-clock seconds (teacher forward included)",
                title=f"vs wall-clock: {label} {m['mean']:.2f}x ({w['mean']:.2f}x raw)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"letkit demo, {label} vs baseline: {metrics['data']['corpus']}, {len(metrics['runs'])} seed(s)",
                 fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
    return True
