"""Reducing a learned projector's gradients across data-parallel ranks, with nothing for the user to do.

:class:`~letkit.LETObjective` computes the alignment loss through ``projector.alignment_loss`` (the fused
kernels read the projector's weights directly), never through a ``DistributedDataParallel`` forward, so DDP
around the target would leave a learned projector's gradients unreduced and each rank's projector would drift
apart. :func:`projector_alignment_loss`, which LETObjective calls on every step, closes that gap:

* one process, or a projector without trainable parameters (``"interpolate"``): the plain call.
* projector parameters that are DTensors (sharded with FSDP2's ``fully_shard`` or tensor parallelism): the plain
  call; their sharding reduces them (register ``projector.loss`` as an FSDP forward method, as
  examples/pretrain_fsdp.py does).
* a call from inside the forward of a DDP module that holds the projector (the objective is a submodule of
  what DDP wraps, as in Lightning): the plain call; that DDP reduces them.
* otherwise, with an initialised process group of several ranks: the call runs through a
  ``DistributedDataParallel`` of the projector's own over the default process group, built on the first
  call with gradients enabled. Building it broadcasts rank 0's projector weights to every rank; from then on
  every backward all-reduces (averages) the projector's gradients, overlapped with the rest of backward.

Under gradient accumulation the projector's gradients are also reduced on the micro-steps where the target's
DDP is in ``no_sync()``. The sum is the same (the part reduced before is equal on every rank); the cost is one
all-reduce of the projector's gradients per micro-step.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from letkit.losses import AlignmentLoss
from letkit.projector import LayerMappingProjector

__all__ = ["projector_alignment_loss", "replicated_projector"]


class _ProjectorAlignment(nn.Module):
    """What DDP wraps: the projector's parameters, and a forward that is its fused alignment loss.

    It holds the projector itself only weakly, so the projector (and with it the cache entry) can be freed.
    """

    def __init__(self, projector: LayerMappingProjector) -> None:
        super().__init__()
        self.weights = nn.ParameterList(p for p in projector.parameters() if p.requires_grad)
        self._projector = weakref.ref(projector)

    def forward(
        self, target_features: Sequence[Tensor], teacher_features: Sequence[Tensor], loss_fn: AlignmentLoss,
        mask: Tensor | None,
    ) -> Tensor:
        return self._projector().alignment_loss(target_features, teacher_features, loss_fn, mask)


_replicas: weakref.WeakKeyDictionary[LayerMappingProjector, DistributedDataParallel] = weakref.WeakKeyDictionary()


def _reduced_elsewhere(trainable: list[nn.Parameter]) -> bool:
    from torch.distributed.tensor import DTensor  # here, not at import: it is slow to import and only ranks need it

    if any(isinstance(p, DTensor) for p in trainable):
        return True
    outer = DistributedDataParallel._get_active_ddp_module()
    return outer is not None and any(p is trainable[0] for p in outer.module.parameters())


def replicated_projector(projector: LayerMappingProjector) -> DistributedDataParallel | None:
    """The DDP that reduces ``projector``'s gradients: the one built before, else one built now if it is needed
    and gradients are enabled, else None (see the module docstring for when one is needed)."""
    replica = _replicas.get(projector)
    if replica is not None:
        return replica
    trainable = [p for p in projector.parameters() if p.requires_grad]
    if (not trainable or not torch.is_grad_enabled() or not dist.is_available() or not dist.is_initialized()
            or dist.get_world_size() < 2 or _reduced_elsewhere(trainable)):
        return None
    replica = DistributedDataParallel(_ProjectorAlignment(projector))
    _replicas[projector] = replica
    return replica


def projector_alignment_loss(
    projector: LayerMappingProjector,
    target_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    loss_fn: AlignmentLoss,
    mask: Tensor | None = None,
) -> Tensor:
    """``projector.alignment_loss(...)``, through a DDP of the projector's own where its gradients need one."""
    replica = replicated_projector(projector)
    compute = projector.alignment_loss if replica is None else replica
    return compute(target_features, teacher_features, loss_fn, mask)
