"""Schedules for LET's alignment weight lambda(s).

Every schedule has the same shape: an optional linear warmup from 0 to ``lambda0`` over
``warmup_steps``, an optional hold at ``lambda0`` for ``hold_steps``, then a decay that reaches 0 at
``stop_step`` (S_stop), after which lambda is 0 for good and the teacher can be dropped.

With no warmup and no hold, :class:`LinearDecay` is the paper's
``lambda(s) = lambda0 * max(0, (S_stop - s) / S_stop)``.

Schedules are pure functions of the step (``schedule(step)``) and also keep a step counter like
torch's LR schedulers (``.step()``, ``.current_step``, ``state_dict()`` / ``load_state_dict()``).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from letkit.validation import check_int


class LambdaSchedule:
    """Base class: warmup, hold, then a decay ``decay(progress)`` from 1 at progress 0 to 0 at progress 1."""

    def __init__(self, lambda0: float, stop_step: int, *, warmup_steps: int = 0, hold_steps: int = 0) -> None:
        stop_step = check_int("stop_step", stop_step, minimum=1)
        if isinstance(lambda0, bool) or not isinstance(lambda0, numbers.Real):
            raise TypeError(f"lambda0 must be a float, got {type(lambda0).__name__} ({lambda0!r})")
        if not math.isfinite(lambda0) or lambda0 < 0:
            raise ValueError(f"lambda0 must be finite and >= 0, got {lambda0}")
        warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        hold_steps = check_int("hold_steps", hold_steps, minimum=0)
        if warmup_steps + hold_steps >= stop_step:
            raise ValueError(
                f"warmup_steps + hold_steps must be shorter than stop_step: {warmup_steps} + {hold_steps} >= {stop_step}"
            )
        self.lambda0 = float(lambda0)
        self.stop_step = stop_step
        self.warmup_steps = warmup_steps
        self.hold_steps = hold_steps
        self._current_step = 0

    @property
    def current_step(self) -> int:
        """The schedule's step counter: the step :meth:`__call__` and :meth:`is_done` use when given none, advanced
        by :meth:`step` and set by :class:`~letkit.LETObjective` from its ``step=`` argument."""
        return self._current_step

    @current_step.setter
    def current_step(self, value: int) -> None:
        self._current_step = check_int("current_step", value, minimum=0)

    def decay(self, elapsed: int, length: int) -> float:
        """Decay factor ``elapsed`` steps into a decay phase of ``length`` steps: 1 at 0, approaching 0 at ``length``."""
        raise NotImplementedError

    def _resolve_step(self, step: int | None) -> int:
        return self._current_step if step is None else check_int("step", step, minimum=0)

    def __call__(self, step: int | None = None) -> float:
        """lambda at ``step`` (an int >= 0; default: the schedule's own ``current_step``)."""
        step = self._resolve_step(step)
        if step >= self.stop_step:
            return 0.0
        if step < self.warmup_steps:
            return self.lambda0 * step / self.warmup_steps
        decay_start = self.warmup_steps + self.hold_steps
        if step < decay_start:
            return self.lambda0
        return self.lambda0 * self.decay(step - decay_start, self.stop_step - decay_start)

    def step(self) -> None:
        """Advance the internal step counter by one."""
        self._current_step += 1

    def is_done(self, step: int | None = None) -> bool:
        """True once lambda is 0 for good (``step >= stop_step``): the teacher is no longer needed."""
        return self._resolve_step(step) >= self.stop_step

    def _hyperparameters(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        """The schedule's class name, step counter and hyperparameters (``lambda0``, ``stop_step``, ...), all plain
        values (JSON-safe), for :meth:`load_state_dict` to restore and check."""
        return {"schedule": type(self).__name__, "current_step": self._current_step, **self._hyperparameters()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the step counter. The schedule class and hyperparameters must equal this schedule's: a resumed
        run whose config changed the schedule, S_stop or lambda0 gets an error, not a silently different schedule
        (to change them on purpose, build the new schedule and set ``current_step``). States saved before the class
        name was recorded (no ``"schedule"`` key) are checked on their hyperparameters only."""
        saved_class = state_dict.get("schedule", type(self).__name__)
        if saved_class != type(self).__name__:
            raise ValueError(f"the saved state is of a {saved_class}, not of this {type(self).__name__}: build a "
                             f"{saved_class} with the saved hyperparameters to resume it")
        hyperparameters = self._hyperparameters()
        unknown = set(state_dict) - set(hyperparameters) - {"schedule", "current_step"}
        if unknown:
            raise ValueError(f"state_dict has keys this {type(self).__name__} does not know: {sorted(unknown)}")
        if "current_step" not in state_dict:
            raise ValueError(f"state_dict has no 'current_step' (keys: {sorted(state_dict)})")
        changed = {k: (state_dict[k], v) for k, v in hyperparameters.items() if k in state_dict and state_dict[k] != v}
        if changed:
            described = ", ".join(f"{k}: saved {saved!r} vs {now!r}" for k, (saved, now) in changed.items())
            raise ValueError(f"the saved {type(self).__name__} has different hyperparameters ({described})")
        self.current_step = state_dict["current_step"]

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in {**self._hyperparameters(), "current_step": self._current_step}.items())
        return f"{type(self).__name__}({args})"


def require_schedule(schedule: object, *, objective: str, example: str) -> LambdaSchedule:
    """``schedule`` when it is a :class:`LambdaSchedule`, else a TypeError naming ``objective`` and showing
    ``example`` (e.g. ``"letkit.LinearDecay(0.1, stop_step=...)"``). An objective's schedule is never defaulted:
    when the teacher's term ends is the knob the user must choose."""
    if schedule is None:
        raise TypeError(
            f"{objective} needs schedule=, e.g. schedule={example}: stop_step, the step at which the teacher is dropped "
            "(S_stop, which the LET paper leaves open), is yours to choose, so letkit does not guess it"
        )
    if not isinstance(schedule, LambdaSchedule):
        raise TypeError(f"schedule must be a letkit LambdaSchedule (e.g. {example.split('(')[0]}), got "
                        f"{type(schedule).__name__}")
    return schedule


class LinearDecay(LambdaSchedule):
    """Linear decay to 0 at ``stop_step`` (the paper's schedule)."""

    def decay(self, elapsed: int, length: int) -> float:
        return 1.0 - elapsed / length


class CosineDecay(LambdaSchedule):
    """Half-cosine decay to 0 at ``stop_step``: gentle at the start and at the end."""

    def decay(self, elapsed: int, length: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * elapsed / length))


class ConstantWeight(LambdaSchedule):
    """``lambda0`` (after the optional warmup) until ``stop_step``, then 0: no decay (``SCHEDULES["constant"]``).

    The logit-distillation baselines (:mod:`letkit.distillation`): RKD with ``stop_step`` = the run's length,
    SALT's abrupt switch to plain training with ``stop_step`` = the end of its distillation phase. For LET, an
    abrupt stop at S_stop instead of the paper's linear fade.
    """

    def decay(self, elapsed: int, length: int) -> float:
        return 1.0


class StepDecay(LambdaSchedule):
    """Piecewise constant: multiplied by ``gamma`` every ``step_size`` steps of the decay phase, 0 at ``stop_step``."""

    def __init__(
        self,
        lambda0: float,
        stop_step: int,
        *,
        step_size: int,
        gamma: float = 0.5,
        warmup_steps: int = 0,
        hold_steps: int = 0,
    ) -> None:
        super().__init__(lambda0, stop_step, warmup_steps=warmup_steps, hold_steps=hold_steps)
        step_size = check_int("step_size", step_size, minimum=1)
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma must be in [0, 1], got {gamma}")
        self.step_size = step_size
        self.gamma = float(gamma)

    def decay(self, elapsed: int, length: int) -> float:
        return self.gamma ** (elapsed // self.step_size)


class ExponentialDecay(LambdaSchedule):
    """Exponential decay from ``lambda0`` towards ``lambda0 * final_ratio`` at ``stop_step``, then 0."""

    def __init__(
        self,
        lambda0: float,
        stop_step: int,
        *,
        final_ratio: float = 0.01,
        warmup_steps: int = 0,
        hold_steps: int = 0,
    ) -> None:
        super().__init__(lambda0, stop_step, warmup_steps=warmup_steps, hold_steps=hold_steps)
        if not 0 < final_ratio < 1:
            raise ValueError(f"final_ratio must be in (0, 1), got {final_ratio}")
        self.final_ratio = float(final_ratio)

    def decay(self, elapsed: int, length: int) -> float:
        return self.final_ratio ** (elapsed / length)


SCHEDULES: dict[str, type[LambdaSchedule]] = {
    "linear": LinearDecay,
    "cosine": CosineDecay,
    "constant": ConstantWeight,
    "step": StepDecay,
    "exponential": ExponentialDecay,
}
