"""A learned projector under 2-rank gloo DDP: its gradients are reduced like the model's without user code."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from letkit import LETObjective, LinearDecay
from letkit.integrations.ddp import replicated_projector
from letkit.models import from_preset

WORLD, MICRO_STEPS, ROWS, SEQ = 2, 2, 4, 8  # per micro-step, the global batch of ROWS is split over the ranks


def build(projector_seed: int):
    """Target and teacher identical everywhere; the linear projector initialised from ``projector_seed``."""
    torch.manual_seed(0)
    target = from_preset("tiny", num_hidden_layers=3, vocab_size=64)
    teacher = from_preset("tiny", hidden_size=32, num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
    torch.manual_seed(projector_seed)
    objective = LETObjective(target, teacher, projector="linear", schedule=LinearDecay(2.0, stop_step=50))
    return target, objective


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(0, 64, (ROWS, SEQ), generator=generator) for _ in range(MICRO_STEPS)]


def let_loss(target: nn.Module, objective: LETObjective, ids: torch.Tensor) -> torch.Tensor:
    logits = target(ids)
    lm = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return objective(ids, lm_loss=lm, step=3).loss


class TargetWithObjective(nn.Module):
    """The objective inside the module DDP wraps, its loss computed in the DDP forward (as Lightning does)."""

    def __init__(self, target: nn.Module, objective: LETObjective) -> None:
        super().__init__()
        self.target, self.objective = target, objective

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return let_loss(self.target, self.objective, ids)


def has_replica(objective: LETObjective) -> bool:
    with torch.no_grad():  # look up without building one
        return replicated_projector(objective.projector) is not None


def train_step(target, objective, step_loss, rows: slice) -> None:
    """One SGD step over MICRO_STEPS micro-batches; ``step_loss(ids)`` runs forward, ``rows`` picks this rank's rows."""
    optimizer = torch.optim.SGD([*target.parameters(), *objective.parameters()], lr=0.5)
    for ids in batches():
        (step_loss(ids[rows]) / MICRO_STEPS).backward()
    optimizer.step()


def state(target: nn.Module, objective: LETObjective) -> dict[str, torch.Tensor]:
    return {**{f"target.{k}": v for k, v in target.state_dict().items()},
            **{f"objective.{k}": v for k, v in objective.state_dict().items()}}


def rank_main(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    rows = slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)

    # the user's DDP wraps the target only; the first micro-step accumulates under no_sync
    target, objective = build(projector_seed=10 + rank)  # ranks start with different projectors
    ddp_target = DistributedDataParallel(target)
    micro = iter(range(MICRO_STEPS))

    def ddp_loss(ids):
        if next(micro) < MICRO_STEPS - 1:
            with ddp_target.no_sync():
                return let_loss(ddp_target, objective, ids)
        return let_loss(ddp_target, objective, ids)

    train_step(target, objective, ddp_loss, rows)
    replica_built = has_replica(objective)
    save_file(state(target, objective), f"{out_dir}/own_ddp_rank{rank}.safetensors")

    # the objective inside the DDP module: that DDP reduces the projector, no second one is built
    target, objective = build(projector_seed=10 + rank)
    wrapped = DistributedDataParallel(TargetWithObjective(target, objective))
    train_step(target, objective, wrapped, rows)
    outer_built_replica = has_replica(objective)
    save_file(state(target, objective), f"{out_dir}/outer_ddp_rank{rank}.safetensors")
    save_file({"own": torch.tensor(replica_built), "outer": torch.tensor(outer_built_replica)},
              f"{out_dir}/flags_rank{rank}.safetensors")
    dist.destroy_process_group()


def test_learned_projector_is_reduced_across_ranks_like_a_single_process_run(tmp_path):
    mp.spawn(rank_main, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD)

    target, objective = build(projector_seed=10)  # rank 0's projector: DDP broadcasts it
    train_step(target, objective, lambda ids: let_loss(target, objective, ids), slice(None))
    reference = state(target, objective)
    assert any(k.startswith("objective.projector") for k in reference)

    for case in ("own_ddp", "outer_ddp"):
        ranks = [load_file(tmp_path / f"{case}_rank{r}.safetensors") for r in range(WORLD)]
        for name, want in reference.items():
            assert torch.equal(ranks[0][name], ranks[1][name]), f"{case}: {name} differs between the ranks"
            torch.testing.assert_close(ranks[0][name], want, rtol=1e-5, atol=1e-6, msg=f"{case}: {name}")
    flags = [load_file(tmp_path / f"flags_rank{r}.safetensors") for r in range(WORLD)]
    assert all(f["own"].item() for f in flags), "no DDP of the projector's own was built next to the target's DDP"
    assert not any(f["outer"].item() for f in flags), "a second DDP was built inside the DDP that holds the projector"


def test_no_replica_in_a_single_process():
    target, objective = build(projector_seed=0)
    let_loss(target, objective, batches()[0]).backward()
    assert not has_replica(objective)
