"""Statistics of the comparison: where a method (LET, say) reaches the baseline's final validation loss, the step and
wall-clock speedups that follow, and means with t-based 95% confidence intervals over seeds."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from letkit.demo.train import EvalPoint, RunResult


def crossing(curve: Sequence[EvalPoint], loss: float) -> tuple[float, float] | None:
    """(step, seconds) where the validation curve first reaches ``loss``, linearly interpolated between the two
    evaluations around the crossing; None if it never does."""
    if curve[0].val_loss <= loss:
        return float(curve[0].step), curve[0].seconds
    for before, after in zip(curve, curve[1:]):
        if after.val_loss <= loss:
            frac = (before.val_loss - loss) / (before.val_loss - after.val_loss)
            return (before.step + frac * (after.step - before.step),
                    before.seconds + frac * (after.seconds - before.seconds))
    return None


def seconds_at(curve: Sequence[EvalPoint], step: float) -> float:
    """Training seconds of a run at a (fractional) ``step``, linearly interpolated between its evaluations."""
    for before, after in zip(curve, curve[1:]):
        if step <= after.step:
            return before.seconds + (step - before.step) / (after.step - before.step) * (after.seconds - before.seconds)
    raise ValueError(f"step {step} is past the run's last evaluation at step {curve[-1].step}")


def compare_runs(baseline: RunResult, let: RunResult) -> dict[str, Any]:
    """Speedups of a method's run ``let`` (LET or another, trained beside the baseline) over the baseline.

    If LET reaches the baseline's final validation loss at step s (after t seconds): step speedup = steps / s and
    wall-clock speedup = baseline seconds / t (>= 1 means LET is faster). If it never does, both are computed the
    other way round -- where the *baseline* reaches LET's final loss, over LET's totals -- and are < 1.

    ``wall_speedup_load_matched`` = step speedup x (baseline seconds / LET seconds over the same first s steps).
    On an idle machine it equals ``wall_speedup``; on a shared one, where the load changes during the run, it
    compares the two runs' step costs over the same stretch of time (they train in lockstep) instead of LET's
    first s steps with all of the baseline's steps.
    """
    reached = crossing(let.curve, baseline.final_val_loss)
    if reached is not None:
        step, seconds = reached
        step_speedup, wall_speedup = baseline.steps / step, baseline.train_seconds / seconds
        cost_ratio = seconds_at(baseline.curve, step) / seconds
    else:
        step, seconds = crossing(baseline.curve, let.final_val_loss)
        step_speedup, wall_speedup = step / let.steps, seconds / let.train_seconds
        cost_ratio = baseline.train_seconds / let.train_seconds
    return {
        "reached": reached is not None,
        "crossing_step": reached[0] if reached else None,
        "crossing_seconds": reached[1] if reached else None,
        "step_speedup": step_speedup,
        "wall_speedup": wall_speedup,
        "wall_speedup_load_matched": step_speedup * cost_ratio,
        "final_val_loss_delta": let.final_val_loss - baseline.final_val_loss,
    }


# Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
        2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical_95(df: int) -> float:
    """Two-sided 95% critical value of Student's t: exact table to 30 degrees of freedom, then the
    Cornish-Fisher expansion around the normal quantile (error < 1e-3)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T95):
        return _T95[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci95(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation and the t-based 95% confidence interval of the mean (None for n = 1)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci95 needs at least one value, got none")
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "std": None, "ci95": None}
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical_95(n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci95": [mean - half, mean + half]}
