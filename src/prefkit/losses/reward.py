"""Reward-model losses: pairwise Bradley-Terry and two listwise objectives.

They take reward-model scores (`RewardPair`, `RewardList`), not log-probs, and need no
reference model. Per-example and unreduced, like every prefkit loss; the trainer weights and
reduces.

Lists: ``scores`` and ``ranking`` are ``[B, K]``; a list shorter than ``K`` pads its ranking
with ``-1``. Ties (completions sharing a level, from equal ``scores`` in the data) are supported
by ``ranknet`` (a tied pair is no pair) and refused by ``listmle`` (the Plackett-Luce likelihood
is a likelihood of one strict order).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.auxiliary import check_hparam
from prefkit.losses.base import (
    LossOutput,
    RewardList,
    RewardPair,
    has_ties,
    pair_metrics,
    plackett_luce_nll,
    ranking_levels,
    register_loss,
)


@register_loss(
    "bt", kind="reward_pair", needs_reference=False, ranges={"use_margin": "true or false", "center_coef": ">= 0"}
)
def bt(b: RewardPair, *, use_margin: bool = False, center_coef: float = 0.0) -> LossOutput:
    """Bradley-Terry reward-model loss, with optional margin and reward centering.

    Formula: loss = -log sigma(r_w - r_l - m) + center_coef * (r_w + r_l)^2, m = margin if use_margin else 0

    Paper: Bradley & Terry (1952), "Rank Analysis of Incomplete Block Designs: I. The Method of
    Paired Comparisons", Biometrika 39; margin: Touvron et al. (2023), "Llama 2: Open Foundation
    and Fine-Tuned Chat Models", arXiv:2307.09288; centering: Eisenstein et al. (2023), "Helping
    or Herding? Reward Model Ensembles Mitigate but do not Eliminate Reward Hacking",
    arXiv:2312.09244.

    Hyper-parameters:
        use_margin: subtract each pair's ``margin`` from the data (Llama 2's preference-strength
            margin: the chosen reward must beat the rejected one by at least ``m``). Default
            False; a pair without a margin has ``m = 0``.
        center_coef: weight of the penalty that keeps ``r_w + r_l`` near 0 (>= 0; Eisenstein et
            al. use 0.01). Rewards are otherwise determined only up to a constant.

    TRL: ``RewardTrainer`` computes the batch mean of exactly this (it always subtracts the
    ``margin`` column when the dataset has one; ``center_rewards_coefficient`` is
    ``center_coef``).

    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins`` (``r_w - r_l``),
    ``rewards/accuracies`` (1 when ``r_w > r_l`` strictly).
    """
    check_hparam("bt", "center_coef", center_coef, allow_zero=True)
    if not isinstance(use_margin, bool):
        raise ValueError(f"loss 'bt': use_margin must be true or false, got {use_margin!r}")
    diff = b.chosen - b.rejected
    if use_margin:
        if b.margin is None:
            raise ValueError("loss 'bt': use_margin=True, but the batch has no margin")
        diff = diff - b.margin.to(diff.dtype)
    loss = -F.logsigmoid(diff)
    if center_coef:
        loss = loss + center_coef * (b.chosen + b.rejected) ** 2
    return LossOutput(loss=loss, metrics=pair_metrics(b.chosen, b.rejected))


def _levels(b: RewardList) -> Tensor:
    """``[B, K]`` rank level of each completion (0 best), ``-1`` where absent."""
    if b.scores.shape != b.ranking.shape or b.scores.dim() != 2:
        raise ValueError(
            f"scores and ranking must both be [B, K]; got {tuple(b.scores.shape)} and {tuple(b.ranking.shape)}"
        )
    return ranking_levels(b.ranking, b.levels)


def _ordered_pairs(levels: Tensor) -> Tensor:
    """``[B, K, K]`` bool: completion i is strictly better than completion j (both present)."""
    present = levels >= 0
    both = present[:, :, None] & present[:, None, :]
    return both & (levels[:, :, None] < levels[:, None, :])


def _list_metrics(scores: Tensor, pairs: Tensor) -> dict[str, Tensor]:
    """``rewards/accuracies``: share of ordered pairs with the better one scored strictly higher."""
    s = scores.detach()
    correct = (s[:, :, None] > s[:, None, :]) & pairs
    n_pairs = pairs.sum((1, 2)).clamp(min=1).to(s.dtype)
    return {"rewards/accuracies": correct.sum((1, 2)).to(s.dtype) / n_pairs}


@register_loss("ranknet", kind="reward_list", needs_reference=False)
def ranknet(b: RewardList) -> LossOutput:
    """RankNet: Bradley-Terry over every ordered pair of a ranked list.

    Formula: loss = mean over pairs (i better than j) of -log sigma(s_i - s_j)

    Paper: Burges, Shaked, Renshaw, Lazier, Deeds, Hamilton, Hullender (2005), "Learning to Rank
    using Gradient Descent", ICML 2005.

    Every pair of completions at different levels counts once (K(K-1)/2 pairs for a strict
    ranking of K); tied completions make no pair, absent ones (ranking ``-1``) none either. A
    list with no ordered pair (all tied) has loss 0. On a 2-item list it equals ``bt`` without
    margin. Metrics: ``rewards/accuracies`` (share of ordered pairs scored in the right order).
    """
    pairs = _ordered_pairs(_levels(b))
    diff = b.scores[:, :, None] - b.scores[:, None, :]
    pair_loss = torch.where(pairs, -F.logsigmoid(diff), torch.zeros_like(diff))
    n_pairs = pairs.sum((1, 2)).clamp(min=1).to(b.scores.dtype)
    return LossOutput(loss=pair_loss.sum((1, 2)) / n_pairs, metrics=_list_metrics(b.scores, pairs))


@register_loss("listmle", kind="reward_list", needs_reference=False)
def listmle(b: RewardList) -> LossOutput:
    """ListMLE: negative Plackett-Luce log-likelihood of the observed ranking.

    Formula: loss = sum_k [ -s_{pi_k} + logsumexp_{j>=k} s_{pi_j} ]   (pi: the ranking, best first)

    Paper: Xia, Liu, Wang, Zhang, Li (2008), "Listwise Approach to Learning to Rank: Theory and
    Algorithm", ICML 2008; the model: Plackett (1975), "The Analysis of Permutations", Applied
    Statistics 24, and Luce (1959), "Individual Choice Behavior".

    Each term is the log-probability that the k-th best is picked first among those still left.
    Absent completions (ranking ``-1``) are left out. A ranking with ties is an error: the
    likelihood is defined for one strict order (use ``ranknet`` for tied data). On a 2-item list
    it equals ``bt`` without margin. Metrics: ``rewards/accuracies`` as for ``ranknet``.
    """
    levels = _levels(b)
    present = b.ranking >= 0
    if has_ties(levels):
        raise ValueError("loss 'listmle' needs a strict ranking, but a list has tied completions; use 'ranknet'")
    ordered = b.scores.gather(1, b.ranking.clamp(min=0))  # scores best first, garbage where absent
    return LossOutput(loss=plackett_luce_nll(ordered, present), metrics=_list_metrics(b.scores, _ordered_pairs(levels)))
