"""What the trainer-integration tests share: the plain-loop reference they must equal."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from letkit import LETObjective


def named_trainables(target: nn.Module, objective: LETObjective) -> dict[str, nn.Parameter]:
    """The target's and the objective's trainable parameters, the objective's prefixed with ``objective.``."""
    named = {name: p for name, p in target.named_parameters() if p.requires_grad}
    named.update({f"objective.{name}": p for name, p in objective.named_parameters() if p.requires_grad})
    return named


@dataclass
class Trace:
    """Per optimizer step: the total loss (summed over micro-batches of ``loss / micro-batches``), lambda,
    the gradients before the update, and whether the teacher was released."""

    losses: list[float] = field(default_factory=list)
    lambdas: list[float] = field(default_factory=list)
    grads: list[dict[str, Tensor]] = field(default_factory=list)
    released: list[bool] = field(default_factory=list)

    def record_grads(self, target: nn.Module, objective: LETObjective) -> None:
        self.grads.append({name: p.grad.detach().clone() for name, p in named_trainables(target, objective).items()
                           if p.grad is not None})


def plain_loop(
    target: nn.Module,
    objective: LETObjective,
    steps: Sequence[Sequence[Tensor]],
    lm_loss: Callable[[nn.Module, Tensor], Tensor],
    lr: float,
    first_step: int = 0,
) -> Trace:
    """Train with SGD by hand: step ``s`` (counted from ``first_step``) averages ``lm_loss + lambda(s) * L_align``
    over its micro-batches."""
    optimizer = torch.optim.SGD(list(named_trainables(target, objective).values()), lr=lr)
    trace = Trace()
    for step, micro_batches in enumerate(steps, start=first_step):
        total = 0.0
        for ids in micro_batches:
            out = objective(ids, lm_loss=lm_loss(target, ids), step=step)
            (out.loss / len(micro_batches)).backward()
            total += out.loss.item() / len(micro_batches)
        trace.losses.append(total)
        trace.lambdas.append(out.lambda_)
        trace.released.append(objective.finished)
        trace.record_grads(target, objective)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return trace


def assert_grads_close(got: list[dict[str, Tensor]], want: list[dict[str, Tensor]], **tolerance: float) -> None:
    assert len(got) == len(want)
    for step, (g, w) in enumerate(zip(got, want)):
        assert g.keys() == w.keys(), f"step {step}: gradients of {sorted(g.keys() ^ w.keys())} only on one side"
        for name in w:
            torch.testing.assert_close(g[name], w[name], **tolerance, msg=lambda m: f"step {step}, {name}: {m}")
