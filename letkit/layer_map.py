"""Which teacher layer aligns with which target layer.

The paper's ablation names strategies by ``<teacher depth>2<target depth>`` with depths L (late),
M (middle) and E (early): ``"L2E"`` (the paper's best and letkit's default) pulls the target's early
layer towards the teacher's last layer. A :class:`LayerMap` turns such a spec into concrete
``(teacher_layer, target_layer)`` block indices once the two depths are known.

Depths resolve over each model's block list (``n`` blocks, indices ``0 .. n-1``):
L = ``n - 1`` (for the teacher: its final hidden state, see :class:`~letkit.TeacherFeatureExtractor`),
M = ``round(middle * (n - 1))``, E = ``round(early * (n - 1))``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Union

from letkit.validation import check_int

STRATEGIES = ("L2E", "L2M", "L2L", "M2E", "M2M", "M2L")
_PAIR_SPEC_FORMS = (f"a strategy name ({', '.join(STRATEGIES)}), a float target depth in [0, 1] or a (teacher_layer, "
                    "target_layer) tuple of int indices or float depths")

LayerRef = Union[int, float]
"""A block index (negative counts from the end) or a fractional depth in [0, 1] (a float)."""

PairSpec = Union[str, float, tuple[LayerRef, LayerRef]]


def resolve_layer(ref: LayerRef, num_layers: int, *, what: str) -> int:
    """Resolve an int index (negatives from the end) or a float fractional depth to ``0 .. num_layers-1``."""
    if isinstance(ref, bool) or not isinstance(ref, (int, float)):
        raise TypeError(f"{what} layer must be an int index or a float depth in [0, 1], got {ref!r}")
    if isinstance(ref, float):
        if not 0.0 <= ref <= 1.0:
            raise ValueError(f"{what} fractional depth must be in [0, 1], got {ref}")
        return round(ref * (num_layers - 1))
    if not -num_layers <= ref < num_layers:
        raise ValueError(f"{what} layer index {ref} is out of range for {num_layers} layers (valid: {-num_layers} .. {num_layers - 1})")
    return ref % num_layers


def _is_layer_ref(ref: object) -> bool:
    return isinstance(ref, (int, float)) and not isinstance(ref, bool)


def _int_hint(spec: object) -> str:
    """For a bare int (ambiguous: which model's index?), how to write what was probably meant."""
    if isinstance(spec, int) and not isinstance(spec, bool):
        return f" (for target block {spec} aligned with the teacher's last layer, pass the pair (-1, {spec}))"
    return ""


class LayerMap:
    """A set of (teacher layer, target layer) pairs, resolved against the two models' depths.

    Args:
        spec: one spec or a sequence of specs. A spec is a strategy name (``"L2E"``, ``"L2M"``,
            ``"L2L"``, ``"M2E"``, ``"M2M"``, ``"M2L"``), a float fractional target depth (the teacher
            side is then its last layer: ``0.25`` = teacher last -> target at 25% depth), or an explicit
            ``(teacher_layer, target_layer)`` pair of int indices (negative allowed) or float depths. A tuple
            is always one pair: several specs go in a list, e.g. ``["L2E", "L2M"]``.
        early: fractional depth that "E" means (default 0.0: the target's first block).
        middle: fractional depth that "M" means (default 0.5).

    Example:
        >>> LayerMap("L2E").resolve(num_teacher_layers=12, num_target_layers=24)
        [(11, 0)]
        >>> LayerMap(["L2E", (-1, 0.5)]).resolve(12, 24)
        [(11, 0), (11, 12)]
    """

    def __init__(self, spec: PairSpec | Sequence[PairSpec] = "L2E", *, early: float = 0.0, middle: float = 0.5) -> None:
        if isinstance(spec, (str, float, tuple)):
            specs = [spec]
        elif isinstance(spec, Iterable):
            specs = list(spec)
        else:
            raise TypeError(f"LayerMap spec must be {_PAIR_SPEC_FORMS}, or a list of these; got {spec!r}{_int_hint(spec)}")
        if not specs:
            raise ValueError("LayerMap needs at least one pair spec")
        for depth, name in ((early, "early"), (middle, "middle")):
            if not 0.0 <= depth <= 1.0:
                raise ValueError(f"{name} must be a fractional depth in [0, 1], got {depth}")
        self.early = float(early)
        self.middle = float(middle)
        self.pairs: list[tuple[LayerRef, LayerRef]] = [self._pair(s) for s in specs]

    def _pair(self, spec: PairSpec) -> tuple[LayerRef, LayerRef]:
        depth = {"L": 1.0, "M": self.middle, "E": self.early}
        if isinstance(spec, str):
            if spec.upper() not in STRATEGIES:
                raise ValueError(f"unknown layer mapping strategy {spec!r}; valid: {', '.join(STRATEGIES)}")
            teacher, target = spec.upper().split("2")
            return depth[teacher], depth[target]
        if isinstance(spec, float):
            return 1.0, spec
        if isinstance(spec, tuple):
            if len(spec) == 2 and all(_is_layer_ref(ref) for ref in spec):
                return spec
            if all(isinstance(ref, str) for ref in spec):
                raise TypeError(
                    f"LayerMap spec {spec!r} is a tuple, which is one (teacher_layer, target_layer) pair of int "
                    f"indices or float depths; for several strategies pass a list: {list(spec)!r}"
                )
        raise TypeError(f"a layer mapping spec must be {_PAIR_SPEC_FORMS}; got {spec!r}{_int_hint(spec)}")

    def resolve(self, num_teacher_layers: int, num_target_layers: int) -> list[tuple[int, int]]:
        """Concrete ``(teacher_block_index, target_block_index)`` pairs, each index non-negative."""
        num_teacher_layers = check_int("num_teacher_layers", num_teacher_layers, minimum=1)
        num_target_layers = check_int("num_target_layers", num_target_layers, minimum=1)
        return [
            (resolve_layer(t, num_teacher_layers, what="teacher"), resolve_layer(s, num_target_layers, what="target"))
            for t, s in self.pairs
        ]

    def __repr__(self) -> str:
        return f"LayerMap({self.pairs!r}, early={self.early}, middle={self.middle})"
