"""The one check for durations: seconds, a finite ``int`` or ``float``, never a ``bool``, within bounds.

Every component takes durations in seconds (SPEC.md, "Units") and checks them here, so ``timeout=True``,
``float("nan")`` or ``"1"`` get the same clear error everywhere, naming what the value was for.
"""

from __future__ import annotations

import math

# The longest duration anything accepts, in seconds (~31 years): Redis refuses expiries near 2**63 ms, and a
# bound keeps every backend alike.
MAX_SECONDS = 1e9


def seconds(value: object, what: str, *, allow_zero: bool = False, most: float = MAX_SECONDS) -> float:
    """Return ``value`` as a float number of seconds, or raise naming ``what``.

    Parameters:
      value: the duration given by the caller.
      what: names it in the error, e.g. ``"channel 'orders': timeout"`` or ``"lock 'job': ttl"``.
      allow_zero: accept 0 (e.g. "no wait"); negative values are always refused.
      most: the largest value accepted (seconds).

    Raises:
      TypeError: not an int or float (``bool`` and numeric strings included).
      ValueError: NaN, infinite, negative, zero when not allowed, or above ``most``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds (int or float), got {shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):  # an int is finite, and may be too big for a float
        raise ValueError(f"{what} must be a finite number of seconds, got {shown(value)}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{what} must be {'>= 0' if allow_zero else '> 0'} seconds, got {shown(value)}")
    if value > most:
        raise ValueError(f"{what} must be at most {most:g} seconds, got {shown(value)}")
    return float(value)


def optional_seconds(value: object, what: str, *, allow_zero: bool = False, most: float = MAX_SECONDS) -> float | None:
    """As :func:`seconds`, with ``None`` passed through (meaning "no limit" or "the default", as documented)."""
    return None if value is None else seconds(value, what, allow_zero=allow_zero, most=most)


def count(value: object, what: str, *, least: int = 0, most: int = 1_000_000) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) in ``[least, most]``, else raise naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {shown(value)}")
    if not least <= value <= most:
        raise ValueError(f"{what} must be between {least} and {most}, got {shown(value)}")
    return value


def shown(value: object, longest: int = 40) -> str:
    """``repr(value)``, cut in the middle when longer than ``longest`` (a 400-digit int, say)."""
    text = repr(value)
    return text if len(text) <= longest else f"{text[: longest // 2]}...{text[-longest // 4 :]}"
