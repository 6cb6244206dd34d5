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

import difflib
import inspect
import math
import re
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

__all__ = ["ParamRangeError", "check_range", "describe_range", "range_problem", "resolve_params"]

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


# ---- loss hyper-parameters ------------------------------------------------------------------------
class ParamRangeError(ValueError):
    """A hyper-parameter outside its declared range; ``key`` names it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _suggest(key: str, candidates: Sequence[str], cutoff: float = 0.5) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=cutoff)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_type(loss: str, key: str, value: Any, default: Any) -> Any:
    """Light type check against the published default (configs come from YAML / key=value)."""
    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"loss {loss!r}: {key}: expected true or false, got {value!r}")
        return value
    if isinstance(default, Real):
        if isinstance(value, bool) or not isinstance(value, Real):
            raise TypeError(f"loss {loss!r}: {key}: expected a number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    return value


def resolve_params(
    names: Sequence[str] | str, params: Mapping[str, Any] | None, registry: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Each selected loss's keyword arguments: its defaults updated from ``params`` and checked.

    ``registry`` maps loss names to specs with ``name``, ``kind``, ``hyperparameters`` (name ->
    default) and ``ranges`` (name -> range text): the live `prefkit.losses` registry, or the same
    declarations read from the source without torch (`prefkit.train.settings.loss_catalog`).
    ``params`` holds per-loss dicts under a loss's name and/or shared keys that go to every selected
    loss that accepts them; a per-loss value wins. Raises ``KeyError`` for an unknown loss name,
    ``ValueError`` / ``TypeError`` for everything else (see `prefkit.losses.combine.resolve_loss_params`).
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("no loss selected: give at least one loss name")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"loss {n!r} is listed twice; give it one entry and a weight instead")
        seen.add(n)
        if n not in registry:
            hint = _suggest(str(n), list(registry), cutoff=0.6)
            raise KeyError(f"unknown loss {n!r}.{hint} Run `prefkit losses` for the list.")
    specs = [registry[n] for n in names]
    kinds = {s.kind for s in specs}
    if len(kinds) > 1:
        detail = ", ".join(f"{s.name} ({s.kind})" for s in specs)
        raise ValueError(f"cannot combine losses of different kinds: {detail}; they read different batches")
    selected = {s.name: s for s in specs}
    per_loss: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    for key, value in dict(params or {}).items():
        if key in selected:
            if not isinstance(value, Mapping):
                raise TypeError(f"params[{key!r}] must be a mapping of {key}'s hyper-parameters, got {value!r}")
            per_loss[key] = dict(value)
        elif key in registry and isinstance(value, Mapping):
            raise ValueError(
                f"hyper-parameters given for loss {key!r}, which is not selected (selected: {', '.join(selected)})"
            )
        else:
            shared[key] = value
    all_keys = sorted({k for s in specs for k in s.hyperparameters})
    for key in shared:
        if not any(key in s.hyperparameters for s in specs):
            accepted = ", ".join(all_keys) if all_keys else "none"
            raise ValueError(
                f"hyper-parameter {key!r} is accepted by none of the selected losses "
                f"({', '.join(selected)}).{_suggest(key, all_keys)} Valid: {accepted}."
            )
    resolved: dict[str, dict[str, Any]] = {}
    for spec in specs:
        defaults = dict(spec.hyperparameters)
        own = per_loss.get(spec.name, {})
        for key in own:
            if key not in defaults:
                valid = ", ".join(defaults) if defaults else "none"
                raise ValueError(
                    f"loss {spec.name!r} has no hyper-parameter {key!r}.{_suggest(key, list(defaults))} Valid: {valid}."
                )
        kwargs = dict(defaults)
        for key, value in {**{k: v for k, v in shared.items() if k in defaults}, **own}.items():
            kwargs[key] = _check_type(spec.name, key, value, defaults[key])
            problem = range_problem(kwargs[key], spec.ranges[key]) if key in spec.ranges else None
            if problem:
                raise ParamRangeError(key, f"{key}: {problem} (loss {spec.name!r})")
        missing = [k for k, v in kwargs.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"loss {spec.name!r} needs a value for {', '.join(missing)} (no default)")
        resolved[spec.name] = kwargs
    return resolved
