"""Argument checks shared by the public entry points; each raises a ValueError naming the value."""

from __future__ import annotations

import numbers
from typing import Any


def is_int(value: Any) -> bool:
    """An integer that is not a bool (``True`` is an ``int`` to Python, never a size to us)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int, or ``ValueError("NAME must be a positive int, got ...")``."""
    if not is_int(value) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def int_or_none(name: str, value: Any) -> int | None:
    """``value`` when it is None or an int, else ``ValueError("NAME must be an int or None, ...")``."""
    if value is not None and not is_int(value):
        raise ValueError(f"{name} must be an int or None, got {value!r}")
    return value


def boolean(name: str, value: Any) -> bool:
    """``value`` when it is a bool, else ``ValueError("NAME must be a bool, got ...")``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value
