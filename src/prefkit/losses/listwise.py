"""Listwise policy losses over ``K`` completions of a prompt (kind ``list``, batch `ListLogps`)."""

from __future__ import annotations

from torch import Tensor

from prefkit.losses.base import ListLogps, LossOutput, register_loss

__all__ = ["sppo"]


@register_loss("sppo", kind="list", needs_reference=True, ranges={"beta": "> 0"})
def sppo(b: ListLogps, *, beta: float = 0.1) -> LossOutput:
    """Self-Play Preference Optimization (SPPO) with soft win probabilities: each sampled completion's
    log-ratio is regressed onto its estimated win probability against the sampling policy.

    Formula: loss = mean_k (log pi(y_k|x) - log pi_ref(y_k|x) - (P(y_k > pi_ref | x) - 1/2) / beta)**2

    Paper: Wu, Sun, Yuan, Ji, Yang, Gu (2024), "Self-Play Preference Optimization for Language Model
    Alignment", arXiv:2405.00675 (their eta is 1 / beta; the reference is the previous self-play
    iterate pi_t, the policy that sampled the completions).

    Hyper-parameters:
        beta: 1 / eta (> 0); default 0.1, as `sppo_hard`, which is this loss with P in {0, 1} on pairs.

    ``b.win_prob`` ``[B, K]``: P(y_k > pi_ref | x), estimated by the trainer from a judge or the rewards'
    scores against the prompt's other samples. The per-prompt loss is the mean over its K completions.
    """
    if b.ref is None:
        raise ValueError("loss 'sppo' needs the reference's log-probs (ref)")
    if b.win_prob is None:
        raise ValueError("loss 'sppo' needs each completion's estimated win probability (win_prob)")
    if not beta > 0:
        raise ValueError(f"loss 'sppo': beta must be > 0, got {beta}")
    log_ratio: Tensor = b.policy - b.ref
    target = (b.win_prob.to(log_ratio.dtype) - 0.5) / beta
    loss = ((log_ratio - target) ** 2).mean(dim=1)
    return LossOutput(
        loss=loss, metrics={"log_ratio": log_ratio.detach().mean(dim=1), "win_prob": b.win_prob.float().mean(dim=1)}
    )
