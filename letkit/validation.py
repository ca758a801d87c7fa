"""Argument checks shared by letkit's blocks: a wrong type raises a TypeError, a value out of range a ValueError,
each naming the argument and the value it got."""

from __future__ import annotations

import operator
from typing import Literal, overload

import torch


@overload
def check_int(name: str, value: object, *, minimum: int | None = None, optional: Literal[False] = False) -> int: ...


@overload
def check_int(name: str, value: object, *, minimum: int | None = None, optional: bool) -> int | None: ...


def check_int(name: str, value: object, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as a Python int, after checking it is an integer ``>= minimum``.

    Python ints, NumPy integers and 0-d integer tensors are accepted (and returned as a Python int); bools (Python,
    NumPy or torch), floats (even integral ones, or NaN), strings and tensors with dimensions are not.

    Args:
        name: the argument's name, for the messages.
        value: what the caller passed.
        minimum: the smallest value allowed; None for no lower bound.
        optional: also accept None (and return it).

    Raises:
        TypeError: ``value`` is not an integer (nor None, when ``optional``).
        ValueError: ``value`` is smaller than ``minimum``.
    """
    if value is None and optional:
        return None
    or_none = " or None" if optional else ""
    not_a_scalar_int = isinstance(value, torch.Tensor) and (value.dim() != 0 or value.dtype == torch.bool)
    if isinstance(value, bool) or not_a_scalar_int:
        raise TypeError(f"{name} must be an int{or_none}, got {type(value).__name__} ({value!r})")
    try:
        number = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int{or_none}, got {type(value).__name__} ({value!r})") from None
    if minimum is not None and number < minimum:
        raise ValueError(f"{name} must be >= {minimum}{or_none}, got {number}")
    return number
