"""Projectors P that map target features (d_target) into the teacher's feature space (d_teacher).

One projector per aligned (teacher layer, target layer) pair:

* ``"interpolate"`` -- parameter-free 1-D linear interpolation along the hidden dimension (the paper's).
* ``"linear"``      -- a learned ``nn.Linear(d_target, d_teacher)`` (asked for by the paper's reviewers).
* ``"mlp"``         -- a learned two-layer SiLU MLP, as REPA-style representation alignment uses.

A projector hands the alignment loss its *last linear map* rather than its output, so the fused
kernels can compute projection and loss in one pass without materialising projected features.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from letkit.losses import AlignmentLoss, interpolate_features
from letkit.validation import check_int

PROJECTOR_KINDS = ("interpolate", "linear", "mlp")


class InterpolationProjector(nn.Module):
    """Parameter-free projector: resamples the hidden dimension from ``d_in`` to ``d_out`` (identity if equal)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.d_in, self.d_out = d_in, d_out

    def forward(self, x: Tensor) -> Tensor:
        return interpolate_features(x, self.d_out)

    def loss(self, target: Tensor, teacher: Tensor, loss_fn: AlignmentLoss, mask: Tensor | None = None) -> Tensor:
        """``loss_fn(P(target), teacher)`` with P fused into the loss; the method every projector provides.

        Args:
            target: target features ``(..., d_in)``.
            teacher: teacher features ``(..., d_out)`` over the same tokens.
            loss_fn: the :class:`~letkit.AlignmentLoss` to apply.
            mask: optional ``(...)`` token mask, nonzero/True keeps a token.

        Returns:
            The scalar alignment loss (float32, float64 for float64 inputs).
        """
        projection = "identity" if self.d_in == self.d_out else "interpolate"
        return loss_fn(target, teacher, projection=projection, mask=mask)

    def extra_repr(self) -> str:
        return f"{self.d_in} -> {self.d_out}"


class LinearProjector(nn.Linear):
    """Learned linear projector ``h @ W.T + b``."""

    def loss(self, target: Tensor, teacher: Tensor, loss_fn: AlignmentLoss, mask: Tensor | None = None) -> Tensor:
        """``loss_fn(target @ W.T + b, teacher)``, the projection fused into the loss (see
        :meth:`InterpolationProjector.loss` for the arguments)."""
        return loss_fn(target, teacher, projection="linear", weight=self.weight, bias=self.bias, mask=mask)


class MLPProjector(nn.Module):
    """Learned ``Linear -> SiLU -> Linear`` projector; its last layer is fused into the loss."""

    def __init__(self, d_in: int, d_out: int, hidden: int) -> None:
        super().__init__()
        self.fc_in = nn.Linear(d_in, hidden)
        self.act = nn.SiLU()
        self.fc_out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(self.act(self.fc_in(x)))

    def loss(self, target: Tensor, teacher: Tensor, loss_fn: AlignmentLoss, mask: Tensor | None = None) -> Tensor:
        """``loss_fn(fc_out(SiLU(fc_in(target))), teacher)``, ``fc_out`` fused into the loss (see
        :meth:`InterpolationProjector.loss` for the arguments)."""
        hidden = self.act(self.fc_in(target))
        return loss_fn(hidden, teacher, projection="linear", weight=self.fc_out.weight, bias=self.fc_out.bias, mask=mask)


class LayerMappingProjector(nn.Module):
    """One projector per aligned layer pair, and the pair-averaged alignment loss.

    Args:
        target_dims: hidden size of each pair's target layer.
        teacher_dims: hidden size of each pair's teacher layer (same length as ``target_dims``).
        kind: ``"interpolate"`` (paper, no parameters), ``"linear"`` or ``"mlp"``.
        mlp_hidden: hidden width of the ``"mlp"`` projectors (default ``max(d_target, d_teacher)`` per pair); pass
            the projector built with it to :class:`~letkit.LETObjective` as ``projector=``.

    ``projector(target_features)`` returns the projected features; :meth:`alignment_loss` computes
    ``mean over pairs of loss_fn(P_i(target_i), teacher_i)`` with the projection fused into the loss, through
    each pair's ``projectors[i].loss(target_i, teacher_i, loss_fn, mask)`` (same argument order).
    """

    def __init__(
        self,
        target_dims: Sequence[int],
        teacher_dims: Sequence[int],
        kind: str = "interpolate",
        *,
        mlp_hidden: int | None = None,
    ) -> None:
        super().__init__()
        target_dims, teacher_dims = list(target_dims), list(teacher_dims)
        if kind not in PROJECTOR_KINDS:
            raise ValueError(f"kind must be one of {PROJECTOR_KINDS}, got {kind!r}")
        if len(target_dims) != len(teacher_dims) or not target_dims:
            raise ValueError(
                f"target_dims and teacher_dims need one entry per layer pair, got {target_dims} and {teacher_dims}"
            )
        target_dims = [check_int(f"target_dims[{i}]", d, minimum=1) for i, d in enumerate(target_dims)]
        teacher_dims = [check_int(f"teacher_dims[{i}]", d, minimum=1) for i, d in enumerate(teacher_dims)]
        if mlp_hidden is not None and kind != "mlp":
            raise ValueError(f"mlp_hidden is the hidden width of kind='mlp' projectors, got kind={kind!r}")
        mlp_hidden = check_int("mlp_hidden", mlp_hidden, minimum=1, optional=True)
        self.kind = kind
        self.target_dims, self.teacher_dims = target_dims, teacher_dims
        if kind == "interpolate":
            projectors = [InterpolationProjector(s, t) for s, t in zip(target_dims, teacher_dims)]
        elif kind == "linear":
            projectors = [LinearProjector(s, t) for s, t in zip(target_dims, teacher_dims)]
        else:
            projectors = [MLPProjector(s, t, mlp_hidden or max(s, t)) for s, t in zip(target_dims, teacher_dims)]
        self.projectors = nn.ModuleList(projectors)

    def _check(self, features: Sequence[Tensor], dims: list[int], what: str) -> None:
        if len(features) != len(dims):
            raise ValueError(f"expected {len(dims)} {what} feature tensors (one per layer pair), got {len(features)}")
        for i, (f, d) in enumerate(zip(features, dims)):
            if f.shape[-1] != d:
                raise ValueError(
                    f"projector pair {i} was built for {what} dim {d}, but the {what} features have shape {tuple(f.shape)}"
                )

    def forward(self, target_features: Sequence[Tensor]) -> list[Tensor]:
        self._check(target_features, self.target_dims, "target")
        return [p(f) for p, f in zip(self.projectors, target_features)]

    def alignment_loss(
        self,
        target_features: Sequence[Tensor],
        teacher_features: Sequence[Tensor],
        loss_fn: AlignmentLoss,
        mask: Tensor | None = None,
    ) -> Tensor:
        """Mean over layer pairs of the alignment loss, projection fused into the loss."""
        self._check(target_features, self.target_dims, "target")
        self._check(teacher_features, self.teacher_dims, "teacher")
        losses = [p.loss(s, t, loss_fn, mask) for p, s, t in zip(self.projectors, target_features, teacher_features)]
        return sum(losses) / len(losses)
