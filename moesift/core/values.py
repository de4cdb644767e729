"""Value checks and formatting shared by every stage: one integer test, one byte formatter."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import MoesiftError


def is_int(v: Any) -> bool:
    """True for Python and numpy integers, never for booleans."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def check_int(name: str, v: Any, lo: int, hi: int | None = None) -> int:
    """`v` as an int when it is an integer in lo..hi; else one `MoesiftError` naming `name`."""
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in {lo}..{hi}"
        raise MoesiftError(f"{name} must be an integer {rng} (got {repr(v)[:40]})")
    return int(v)


def int_or_none(v: Any) -> int | None:
    """`int(v)`, or None for None."""
    return None if v is None else int(v)


def fmt_bytes(n: int) -> str:
    """Binary units with two decimals: '1.50 GiB', '12.00 MiB', '512 B'."""
    for unit, k in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n} B"
