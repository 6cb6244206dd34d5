"""Weighted sums of registered losses, and validation of their hyper-parameters.

``combine_losses(batch, ["dpo", "sft"], [1.0, 1.0], {"dpo": {"beta": 0.1}})`` is RPO. The trainer
calls `resolve_loss_params` once, before training starts, so a misspelt key fails at once with a
suggestion instead of after the first forward pass.
"""

from __future__ import annotations

import difflib
import inspect
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

from prefkit.losses.base import LossOutput, LossSpec, get_loss, list_losses
from prefkit.ranges import range_problem


def _specs(names: Sequence[str]) -> list[LossSpec]:
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("no loss selected: give at least one loss name")
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise ValueError(f"loss {n!r} is listed twice; give it one entry and a weight instead")
        seen.add(n)
    specs = [get_loss(n) for n in names]
    kinds = {s.kind for s in specs}
    if len(kinds) > 1:
        detail = ", ".join(f"{s.name} ({s.kind})" for s in specs)
        raise ValueError(f"cannot combine losses of different kinds: {detail}; they read different batches")
    return specs


def _suggest(key: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def _check_value(loss: str, key: str, value: Any, default: Any) -> Any:
    """Light type check against the published default (configs come from YAML / key=value)."""
    if default is inspect.Parameter.empty or default is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise TypeError(f"loss {loss!r}: {key} must be true or false, got {value!r}")
        return value
    if isinstance(default, numbers.Real):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"loss {loss!r}: {key} must be a number, got {value!r}")
        return float(value) if isinstance(default, float) else value
    return value


def resolve_loss_params(names: Sequence[str], params: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Full keyword arguments for each selected loss: its defaults, updated from ``params``.

    ``params`` holds per-loss dicts under a loss's name (``{"dpo": {"beta": 0.2}}``) and/or
    shared keys (``{"beta": 0.2}``), which go to every selected loss that accepts them. A
    per-loss value wins over a shared one. Errors (``ValueError`` / ``TypeError``):
    an unknown loss name, a loss listed twice, losses of different kinds, per-loss params for a
    loss that is not selected, a key no selected loss accepts (naming the closest valid one),
    and a value of the wrong type.
    """
    specs = _specs(names)
    selected = {s.name: s for s in specs}
    params = dict(params or {})

    per_loss: dict[str, dict[str, Any]] = {}
    shared: dict[str, Any] = {}
    registered = {s.name for s in list_losses()}
    for key, value in params.items():
        if key in selected:
            if not isinstance(value, Mapping):
                raise TypeError(f"params[{key!r}] must be a mapping of {key}'s hyper-parameters, got {value!r}")
            per_loss[key] = dict(value)
        elif key in registered and isinstance(value, Mapping):
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
        defaults = spec.hyperparameters
        own = per_loss.get(spec.name, {})
        for key in own:
            if key not in defaults:
                valid = ", ".join(defaults) if defaults else "none"
                raise ValueError(
                    f"loss {spec.name!r} has no hyper-parameter {key!r}.{_suggest(key, list(defaults))} Valid: {valid}."
                )
        kwargs = dict(defaults)
        for key, value in {**{k: v for k, v in shared.items() if k in defaults}, **own}.items():
            kwargs[key] = _check_value(spec.name, key, value, defaults[key])
            problem = range_problem(kwargs[key], spec.ranges[key]) if key in spec.ranges else None
            if problem:
                raise ValueError(f"loss {spec.name!r}: {key}: {problem}")
        missing = [k for k, v in kwargs.items() if v is inspect.Parameter.empty]
        if missing:
            raise ValueError(f"loss {spec.name!r} needs a value for {', '.join(missing)} (no default)")
        resolved[spec.name] = kwargs
    return resolved


def combine_losses(
    batch: Any,
    names: Sequence[str],
    weights: Sequence[float] | None = None,
    params: Mapping[str, Any] | None = None,
) -> LossOutput:
    """Call each named loss with its own hyper-parameters and return the weighted sum.

    ``loss`` is ``sum_k weights[k] * loss_k`` per example (still unreduced). ``metrics`` holds the
    first loss's metrics under their plain names (``rewards/chosen``, ...), every other loss's
    metrics as ``<name>/<metric>``, and each component's unweighted per-example loss as
    ``loss/<name>``. ``weights`` defaults to 1 for every loss; see `resolve_loss_params` for
    ``params`` and for the errors raised.
    """
    if isinstance(names, str):
        names = [names]
    if weights is None:
        weights = [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"got {len(weights)} weights for {len(names)} losses ({', '.join(names)})")
    resolved = resolve_loss_params(names, params)

    total = None
    metrics = {}
    for i, (name, weight) in enumerate(zip(names, weights)):
        out = get_loss(name)(batch, **resolved[name])
        term = out.loss * float(weight)
        total = term if total is None else total + term
        for key, value in out.metrics.items():
            metrics[key if i == 0 else f"{name}/{key}"] = value
        metrics[f"loss/{name}"] = out.loss.detach()
    return LossOutput(loss=total, metrics=metrics)
