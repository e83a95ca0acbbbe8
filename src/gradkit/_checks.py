"""Argument checks shared across gradkit, with torch-style ``Invalid <name> value`` messages."""

from __future__ import annotations

import math
from typing import Any


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name} value: {value!r} (must be a positive integer)")


def check_positive(name: str, value: float) -> None:
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"Invalid {name} value: {value} (must be a positive number)")
