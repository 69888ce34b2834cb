"""Value checks shared by the library. Messages name the PARAMETER (`batch_size=0`); the CLI
turns parameter names into its flags (`--batch-size 0`), so flag names live in `cli/` only."""

from __future__ import annotations

import math
import numbers

from .errors import BadInput


def check_positive(name: str, value, *, integer: bool = False, zero_ok: bool = False) -> None:
    """A finite number > 0 (>= 0 with `zero_ok`), an integer with `integer`; bools are refused."""
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if zero_ok else value > 0) and (not integer or float(value).is_integer()))
    if not ok:
        kind = "an integer" if integer else "a number"
        raise BadInput(f"{name}={value!r} is not allowed; it must be {kind} {'>=' if zero_ok else '>'} 0")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise BadInput(f"{name}={value!r} is unknown; choose one of {', '.join(map(str, choices))}")


def check_fraction(name: str, value, *, low: float = 0.0, high: float = 1.0, closed: bool = False) -> None:
    """A number in (low, high), or [low, high] with `closed`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and (
        low <= value <= high if closed else low < value < high)
    if not ok:
        bounds = f"[{low:g}, {high:g}]" if closed else f"({low:g}, {high:g})"
        raise BadInput(f"{name}={value!r} is not allowed; it must be in {bounds}")
