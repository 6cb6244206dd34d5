"""Weighted sums of registered losses, and validation of their hyper-parameters.

``combine_losses(batch, ["dpo", "sft"], [1.0, 1.0], {"dpo": {"beta": 0.1}})`` is RPO. The trainer
calls `resolve_loss_params` once, before training starts, so a misspelt key fails at once with a
suggestion instead of after the first forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from prefkit.losses.base import LossOutput, get_loss, list_losses
from prefkit.ranges import resolve_params


def resolve_loss_params(names: Sequence[str], params: Mapping[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    """Full keyword arguments for each selected loss: its defaults, updated from ``params``.

    ``params`` holds per-loss dicts under a loss's name (``{"dpo": {"beta": 0.2}}``) and/or
    shared keys (``{"beta": 0.2}``), which go to every selected loss that accepts them. A
    per-loss value wins over a shared one. Errors (``KeyError`` / ``ValueError`` / ``TypeError``):
    an unknown loss name, a loss listed twice, losses of different kinds, per-loss params for a
    loss that is not selected, a key no selected loss accepts (naming the closest valid one),
    a value of the wrong type, and a value outside the loss's declared range. The rules live in
    `prefkit.ranges.resolve_params`, which the configuration check also runs before torch loads.
    """
    return resolve_params(names, params, {s.name: s for s in list_losses()})


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
