"""Allowed ranges of settings, written as short text and checked without importing torch.

A range is one of:

- ``"> 0"``, ``">= 0"``, ``"< 1"``, ``"<= 1"``: a finite number on one side of a bound;
- ``"[0, 0.5)"``, ``"(0, 1]"``, ...: a finite number in an interval (brackets include the bound);
- ``"any"``: any finite number;
- ``"one of a, b, c"``: one of these words;
- ``"true or false"``: a boolean.

The loss registry declares each hyper-parameter's range this way (``register_loss(..., ranges=...)``)
and the configuration check (`prefkit.train.settings`) reads the same declarations, so a bad value is
refused when the configuration is read, before torch is imported.
"""

from __future__ import annotations

import math
import re
from numbers import Real
from typing import Any

__all__ = ["check_range", "describe_range", "range_problem"]

_ONE_SIDED = re.compile(r"^(>=|<=|>|<)\s*(-?[\d.eE+-]+|inf)$")
_INTERVAL = re.compile(r"^([\[(])\s*(-?[\d.eE+-]+|-inf)\s*,\s*(-?[\d.eE+-]+|inf)\s*([\])])$")


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_range(text: str) -> None:
    """Raise ``ValueError`` when ``text`` is not a range this module understands."""
    t = text.strip()
    if t in ("any", "true or false") or t.startswith("one of ") or _ONE_SIDED.match(t) or _INTERVAL.match(t):
        return
    raise ValueError(f"not a range: {text!r} (expected e.g. '> 0', '[0, 0.5)', 'any', 'one of a, b')")


def describe_range(text: str) -> str:
    """What a value in ``text`` is, in words: ``"a finite number > 0"``, ``"one of a, b"``."""
    t = text.strip()
    if t == "any":
        return "a finite number"
    if t == "true or false":
        return "true or false"
    if t.startswith("one of "):
        return t
    if _INTERVAL.match(t):
        return f"a finite number in {t}"
    return f"a finite number {t}"


def range_problem(value: Any, text: str) -> str | None:
    """None when ``value`` lies in the range ``text``; otherwise ``"expected ..., got ..."``."""
    t = text.strip()
    got = f"got {value!r}"
    if t == "true or false":
        return None if isinstance(value, bool) else f"expected true or false, {got}"
    if t.startswith("one of "):
        choices = [c.strip() for c in t[len("one of ") :].split(",")]
        return None if value in choices else f"expected {t}, {got}"
    if not _is_number(value) or not math.isfinite(float(value)):
        return f"expected {describe_range(t)}, {got}"
    x = float(value)
    if t == "any":
        return None
    m = _ONE_SIDED.match(t)
    if m:
        op, bound = m.group(1), float(m.group(2))
        ok = {">": x > bound, ">=": x >= bound, "<": x < bound, "<=": x <= bound}[op]
    else:
        m = _INTERVAL.match(t)
        if m is None:
            raise ValueError(f"not a range: {text!r}")
        lo, hi = float(m.group(2)), float(m.group(3))
        ok_lo = x >= lo if m.group(1) == "[" else x > lo
        ok_hi = x <= hi if m.group(4) == "]" else x < hi
        ok = ok_lo and ok_hi
    return None if ok else f"expected {describe_range(t)}, {got}"
