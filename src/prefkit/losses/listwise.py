"""Listwise policy losses over ``K`` completions of a prompt (kind ``list``, batch `ListLogps`)."""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.losses.base import ListLogps, LossOutput, plackett_luce_nll, register_loss

__all__ = ["pl_dpo", "sppo"]


@register_loss("pl_dpo", kind="list", needs_reference=True, ranges={"beta": "> 0"})
def pl_dpo(b: ListLogps, *, beta: float = 0.1) -> LossOutput:
    """DPO over a full ranking: the Plackett-Luce likelihood of the observed order under the implicit reward.

    Formula: loss = sum_k [ -beta h_{tau_k} + logsumexp_{j >= k} beta h_{tau_j} ], h = log pi(y|x) - log pi_ref(y|x)

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), "Direct Preference Optimization: Your
    Language Model is Secretly a Reward Model", arXiv:2305.18290, appendix A.3 (DPO under the Plackett-Luce
    model); ``tau`` is the ranking, best first.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.

    Each term is the log-probability that the k-th best completion is picked first among those left, with
    rewards ``beta * h``; on a 2-item list it is ``dpo``. Absent completions (ranking ``-1``) are left out. A
    ranking with ties is an error: the Plackett-Luce likelihood is that of one strict order (the paper's
    model); rank tied data with pairs (``prefkit data convert --to pairwise``) instead.

    TRL: none (its DPOTrainer takes pairs only).

    Metrics: ``rewards/best`` and ``rewards/worst`` (``beta * h`` of the first and last ranked completion),
    ``rewards/margins`` (their difference), ``rewards/accuracies`` (1 when the best has the highest reward).
    """
    if b.ref is None:
        raise ValueError("loss 'pl_dpo' needs the reference's log-probs (ref)")
    if not beta > 0:
        raise ValueError(f"loss 'pl_dpo': beta must be > 0, got {beta}")
    present = b.ranking >= 0
    if b.levels is not None:
        levels = torch.where(b.levels >= 0, b.levels, -1 - torch.arange(b.levels.shape[1], device=b.levels.device))
        if bool((levels[:, :, None] == levels[:, None, :]).sum(-1).gt(1).any()):
            raise ValueError("loss 'pl_dpo' needs a strict ranking, but a list has tied completions")
    rewards = beta * (b.policy - b.ref)
    ordered = rewards.gather(1, b.ranking.clamp(min=0))  # best first; garbage where absent
    loss = plackett_luce_nll(ordered, present)
    with torch.no_grad():
        low = torch.finfo(ordered.dtype).min
        last = present.sum(1) - 1
        best, worst = ordered[:, 0], ordered.gather(1, last[:, None]).squeeze(1)
        members = torch.zeros_like(present).scatter(1, b.ranking.clamp(min=0), present)  # by completion index
        picked = torch.where(members, rewards, low).argmax(1)
        metrics = {
            "rewards/best": best,
            "rewards/worst": worst,
            "rewards/margins": best - worst,
            "rewards/accuracies": (picked == b.ranking[:, 0]).float(),
        }
    return LossOutput(loss=loss, metrics=metrics)


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
