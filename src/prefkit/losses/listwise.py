"""Listwise policy losses over ``K`` completions of a prompt (kind ``list``, batch `ListLogps`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.base import (
    ListLogps,
    LossOutput,
    has_ties,
    plackett_luce_nll,
    ranking_levels,
    register_loss,
)

__all__ = ["lipo", "pl_dpo", "pro", "sppo"]


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
    _refuse_ties(b, "pl_dpo")
    rewards = beta * (b.policy - b.ref)
    ordered = rewards.gather(1, b.ranking.clamp(min=0))  # best first; garbage where absent
    loss = plackett_luce_nll(ordered, present)
    with torch.no_grad():
        low = torch.finfo(ordered.dtype).min
        last = present.sum(1) - 1
        best, worst = ordered[:, 0], ordered.gather(1, last[:, None]).squeeze(1)
        members = ranking_levels(b.ranking) >= 0
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


def _refuse_ties(b: ListLogps, loss: str) -> None:
    """A Plackett-Luce style loss models one strict order: a list with tied completions is an error."""
    if b.levels is not None and has_ties(b.levels):
        raise ValueError(
            f"loss {loss!r} needs a strict ranking, but a list has tied completions (lipo takes ties; or convert the "
            "lists to pairs with `prefkit data convert --to pairwise`)"
        )


def _list_scores(b: ListLogps, members: Tensor, loss: str) -> Tensor:
    """``[B]`` bool: which lists carry graded scores (``members`` ``[B, K]``: the completions each list has); a
    list with some but not all of them is an error."""
    if b.scores is None:
        return torch.zeros(members.shape[0], dtype=torch.bool, device=members.device)
    finite = torch.isfinite(b.scores) & members
    has = finite.any(1)
    if bool((has & (finite != members).any(1)).any()):
        raise ValueError(f"loss {loss!r}: a list has scores for some of its completions but not all")
    return has


@register_loss(
    "pro", kind="list", needs_reference=False, ranges={"sft_weight": ">= 0", "dynamic_temperature": "true or false"}
)
def pro(b: ListLogps, *, sft_weight: float = 0.05, dynamic_temperature: bool = True) -> LossOutput:
    """Preference Ranking Optimization (PRO): the best completion against all worse ones, then the second best
    against those below it, and so on, on length-normalised log-likelihoods; plus an SFT term on the best.

    Formula: loss = sum_{k<n} [logsumexp(s_k t_k, {s_i t_ki}_{i>k}) - s_k t_k] + sft_weight (n-1)^2 (-s_1),
    s = log pi(y|x) / |y|, t_ki = r_k - r_i, t_k = max_{i>k} t_ki

    Paper: Song, Yu, Li, Yu, Huang, Li, Wang (2024), "Preference Ranking Optimization for Human Alignment",
    AAAI 2024, arXiv:2306.17492 (``1 / T^i_k = r_k - r_i`` is the dynamic temperature,
    ``1 / T^k_k = max_{i>k} 1 / T^i_k``; the SFT weight ``beta = 0.05 (l - 1)^2`` for a ranking of length l).

    Hyper-parameters:
        sft_weight: weight of the SFT term before the ``(n - 1)^2`` factor (>= 0); default 0.05, the paper's.
        dynamic_temperature: scale each score by the reward gaps ``r_k - r_i`` (true or false); default true. It
            needs the records' ``scores`` (a reward model's, as in the paper); a list without scores, or false,
            uses temperature 1: then the ranking term is the Plackett-Luce likelihood of the order (listmle).

    Reference-free: ``s`` is the policy's mean token log-prob. ``n`` counts a list's present completions. Ties
    are refused (the paper ranks strictly; ``lipo`` takes tied lists). TRL: none.

    Metrics: ``rank_loss`` and ``sft_loss`` (per list), ``logps/best_mean`` (``s_1``), ``rewards/accuracies``
    (1 when the best completion has the highest ``s``).
    """
    if not sft_weight >= 0:
        raise ValueError(f"loss 'pro': sft_weight must be >= 0, got {sft_weight}")
    _refuse_ties(b, "pro")
    present = b.ranking >= 0
    s = b.policy / b.length.clamp(min=1.0)
    idx = b.ranking.clamp(min=0)
    ordered = s.gather(1, idx)  # best first
    n = present.sum(1)
    members = ranking_levels(b.ranking) >= 0
    has_scores = _list_scores(b, members, "pro") if dynamic_temperature else torch.zeros_like(n, dtype=torch.bool)
    if bool(has_scores.any()):
        r = torch.nan_to_num(b.scores.to(s.dtype).gather(1, idx), nan=0.0)
        k = torch.arange(s.shape[1], device=s.device)
        later = (k[None, :] > k[:, None])[None] & present[:, None, :]  # [B, k, i]: i > k, i present
        gaps = r[:, :, None] - r[:, None, :]  # t_ki = r_k - r_i
        if bool(((gaps < 0) & later & has_scores[:, None, None]).any()):
            raise ValueError("loss 'pro': a list's scores disagree with its ranking (a worse completion scores higher)")
        low = torch.finfo(s.dtype).min
        has_later = later.any(-1)
        t_pos = torch.where(has_later, torch.where(later, gaps, low).amax(-1), 0.0)  # [B, k]; 0 on the last
        head = ordered * t_pos
        tail = torch.where(later, ordered[:, None, :] * gaps, low)
        lse = torch.logsumexp(torch.cat([head[:, :, None], tail], dim=-1), dim=-1)
        scored_terms = torch.where(has_later, lse - head, torch.zeros_like(head)).sum(1)
        rank = torch.where(has_scores, scored_terms, plackett_luce_nll(ordered, present))
    else:
        rank = plackett_luce_nll(ordered, present)
    sft = -ordered[:, 0]
    loss = rank + sft_weight * (n - 1).to(s.dtype) ** 2 * sft
    with torch.no_grad():
        picked = torch.where(members, s, torch.finfo(s.dtype).min).argmax(1)
        metrics = {
            "rank_loss": rank.detach(),
            "sft_loss": sft.detach(),
            "logps/best_mean": ordered[:, 0].detach(),
            "rewards/accuracies": (picked == b.ranking[:, 0]).to(s.dtype),
        }
    return LossOutput(loss=loss, metrics=metrics)


@register_loss("lipo", kind="list", needs_reference=True, ranges={"beta": "> 0"})
def lipo(b: ListLogps, *, beta: float = 0.1) -> LossOutput:
    """LiPO-lambda: every pair of a list with different labels, DPO's logistic loss weighted by the LambdaLoss
    weight (how much swapping the two would change the list's NDCG under the policy's current order).

    Formula: loss = sum_{psi_i > psi_j} -Delta_ij log sigma(s_i - s_j), s = beta * (log pi(y|x) - log pi_ref(y|x)),
    Delta_ij = |G_i - G_j| |1/D(tau_i) - 1/D(tau_j)|, G = 2^psi - 1, D(tau) = log2(1 + tau)

    Paper: Liu, Qin, Wu, Shen, Khalman, Joshi, Zhao, Saleh, Baumgartner, Liu, Liu, Wang (2024), "LiPO: Listwise
    Preference Optimization through Learning-to-Rank", arXiv:2402.01878 (Sec. 4, LiPO-lambda; the weight is
    LambdaLoss's, Wang et al. 2018, "The LambdaLoss Framework for Ranking Metric Optimization", CIKM).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.

    ``tau_i`` is the 1-based position of completion i when the list is sorted by ``s`` (detached, as LambdaLoss
    treats the weight). Labels ``psi``: the records' graded ``scores`` where a list has them; otherwise each
    completion's share of the list's other completions it beats (a tie counts a half), the hard form of the
    average win rates the paper uses as labels. Pairs with equal labels contribute nothing, which is how the
    paper handles ties. The discount is NDCG's ``log2``; the paper writes ``log``, which scales every weight by
    the same ``ln 2``. TRL: none.

    Metrics: ``rewards/best`` and ``rewards/worst`` (``s`` of the first and last ranked completion),
    ``rewards/accuracies`` (share of the labelled pairs the policy orders correctly), ``lambda_weight`` (mean
    weight over the labelled pairs).
    """
    if b.ref is None:
        raise ValueError("loss 'lipo' needs the reference's log-probs (ref)")
    if not beta > 0:
        raise ValueError(f"loss 'lipo': beta must be > 0, got {beta}")
    present = b.ranking >= 0
    levels = ranking_levels(b.ranking, b.levels)
    members = levels >= 0
    s = beta * (b.policy - b.ref)
    dtype = s.dtype
    # labels: graded scores, else the share of the others each completion beats (ties a half)
    has_scores = _list_scores(b, members, "lipo")
    both = members[:, :, None] & members[:, None, :]
    beats = ((levels[:, :, None] < levels[:, None, :]) & both).to(dtype)
    ties = ((levels[:, :, None] == levels[:, None, :]) & both).to(dtype)
    others = (members.sum(1, keepdim=True) - 1).clamp(min=1).to(dtype)
    share = (beats.sum(-1) + 0.5 * (ties.sum(-1) - 1).clamp(min=0)) / others
    psi = share
    if b.scores is not None:
        psi = torch.where(has_scores[:, None], torch.nan_to_num(b.scores.to(dtype), nan=0.0), share)
    # lambda weights from the policy's current order (detached)
    with torch.no_grad():
        low = torch.finfo(dtype).min
        masked = torch.where(members, s, low)
        order = masked.argsort(1, descending=True)
        position = torch.empty_like(order).scatter_(
            1, order, torch.arange(1, order.shape[1] + 1, device=s.device).expand_as(order)
        )
        inv_discount = 1.0 / torch.log2(1.0 + position.to(dtype))
        gain = torch.pow(2.0, psi.detach()) - 1.0
        gaps = (inv_discount[:, :, None] - inv_discount[:, None, :]).abs()
        weight = (gain[:, :, None] - gain[:, None, :]).abs() * gaps
        better = (psi[:, :, None] > psi[:, None, :]) & both
        weight = torch.where(better, weight, torch.zeros_like(weight))
    pair_loss = -F.logsigmoid(s[:, :, None] - s[:, None, :])
    loss = (weight * pair_loss).sum((1, 2))
    with torch.no_grad():
        pairs = better.sum((1, 2)).clamp(min=1).to(dtype)
        right = ((s[:, :, None] > s[:, None, :]) & better).sum((1, 2)).to(dtype)
        last = present.sum(1) - 1
        ordered = s.gather(1, b.ranking.clamp(min=0))
        metrics = {
            "rewards/best": ordered[:, 0],
            "rewards/worst": ordered.gather(1, last[:, None]).squeeze(1),
            "rewards/accuracies": right / pairs,
            "lambda_weight": weight.sum((1, 2)) / pairs,
        }
    return LossOutput(loss=loss, metrics=metrics)
