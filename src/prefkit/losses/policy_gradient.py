"""Policy-gradient losses over sampled completions (kind ``policy``): the GRPO family.

Each takes a `PolicyLogps` batch: per-token log-probs of the policy being trained (``logps``, with
gradient), of the policy that sampled the completions (``old_logps``; None means on-policy, i.e.
``logps.detach()``), optionally of the reference (``ref_logps``), one advantage per completion (or per
token) and the completion mask. As every prefkit loss, the result is **per example**: ``loss[i]`` is
completion ``i``'s share, defined so that the trainer's plain mean over the batch is the paper's
reduction (a mean of per-sequence means for GRPO; the sum over all tokens divided by the batch's token
count for DAPO, BNPO and CISPO; divided by ``B * max_completion_length`` for Dr. GRPO).

Notation: ``r_t = exp(logp_t - old_logp_t)`` the token's importance ratio, ``A`` the advantage,
``m_t`` the mask, ``clip(x, a, b) = min(max(x, a), b)``. The KL term ``beta * KL_t`` to the reference
is added per token when ``beta > 0``, with the estimator `kl_estimate` names (``k3`` by default, as in
GRPO and TRL). Metrics per example: ``kl`` (mean over the completion's tokens, when beta > 0),
``clip_fraction`` (share of its tokens whose ratio was clipped in the direction that stops the
gradient), ``ratio`` (mean token ratio).
"""

from __future__ import annotations

import torch
from torch import Tensor

from prefkit.losses.base import LossOutput, PolicyLogps, register_loss

__all__ = ["KL_ESTIMATORS", "PolicyLogps", "kl_estimate"]

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(logps: Tensor, ref_logps: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from a sample of pi, with ``d = log pi_ref - log pi``:
    ``k1 = -d``, ``k2 = d^2 / 2``, ``k3 = exp(d) - d - 1`` (Schulman, "Approximating KL Divergence", 2020;
    k3 is unbiased and non-negative, GRPO's choice)."""
    d = ref_logps - logps
    if estimator == "k1":
        return -d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {', '.join(KL_ESTIMATORS)}")


def _parts(b: PolicyLogps, loss: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(log_ratio [B, T], advantages [B, 1] or [B, T], mask [B, T] float, old_logps)``."""
    if b.logps.dim() != 2 or b.mask.shape != b.logps.shape:
        raise ValueError(f"loss {loss!r}: logps and mask must be [B, T] of one shape")
    old = b.logps.detach() if b.old_logps is None else b.old_logps
    adv = b.advantages.to(b.logps.dtype)
    if adv.dim() == 1:
        adv = adv.unsqueeze(1)
    return b.logps - old, adv, b.mask.to(b.logps.dtype), old


def _kl_term(b: PolicyLogps, beta: float, estimator: str, loss: str) -> Tensor | None:
    if beta == 0:
        return None
    if b.ref_logps is None:
        raise ValueError(f"loss {loss!r}: beta={beta} needs the reference's per-token log-probs (ref_logps)")
    return kl_estimate(b.logps, b.ref_logps, estimator)


def _clipped_surrogate(log_ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float) -> tuple[Tensor, Tensor]:
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` per token, and where the clip stopped the gradient."""
    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stopped = ((ratio < 1.0 - eps_low) & (adv < 0)) | ((ratio > 1.0 + eps_high) & (adv > 0))
    return per_token, stopped


def _seq_mean(x: Tensor, mask: Tensor) -> Tensor:
    return (x * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _output(per_example: Tensor, per_token_kl: Tensor | None, stopped: Tensor | None, ratio: Tensor, mask: Tensor):
    metrics = {"ratio": _seq_mean(ratio.detach().expand_as(mask), mask)}
    if per_token_kl is not None:
        metrics["kl"] = _seq_mean(per_token_kl.detach(), mask)
    if stopped is not None:
        metrics["clip_fraction"] = _seq_mean(stopped.expand_as(mask).to(mask.dtype), mask)
    return LossOutput(loss=per_example, metrics=metrics)


def _token_level(per_token: Tensor, mask: Tensor) -> Tensor:
    """Completion ``i``'s share of ``sum(per_token * mask) / sum(mask)``: its token sum times ``B / sum(mask)``."""
    return (per_token * mask).sum(-1) * (mask.shape[0] / mask.sum().clamp(min=1.0))


def _ppo_clip(b: PolicyLogps, loss: str, eps_low: float, eps_high: float, beta: float, kl_estimator: str):
    log_ratio, adv, mask, _ = _parts(b, loss)
    per_token, stopped = _clipped_surrogate(log_ratio, adv, eps_low, eps_high)
    kl = _kl_term(b, beta, kl_estimator, loss)
    if kl is not None:
        per_token = per_token + beta * kl
    return per_token, kl, stopped, torch.exp(log_ratio), mask


@register_loss(
    "grpo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_low": "[0, 1)", "epsilon_high": ">= 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def grpo(
    b: PolicyLogps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0, kl_estimator: str = "k3"
) -> LossOutput:
    """Group Relative Policy Optimization: PPO's clipped surrogate per token, averaged over each
    completion's tokens, then over the completions.

    Formula: loss = mean_i [ (1/|y_i|) sum_t -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t ]

    Paper: Shao, Wang, Zhu, Xu, Song, Zhang, Li, Wu, Guo (2024), "DeepSeekMath: Pushing the Limits of
    Mathematical Reasoning in Open Language Models", arXiv:2402.03300.

    Hyper-parameters: ``epsilon_low`` / ``epsilon_high`` (0.2 / 0.2): the clip range; ``beta`` (0.0): the
    weight of the per-token KL to the reference (the paper uses 0.04; TRL 1.16 defaults to 0);
    ``kl_estimator`` (k3): see `kl_estimate`.

    TRL 1.16: ``GRPOTrainer`` with ``loss_type="grpo"``, ``epsilon=epsilon_low``, ``epsilon_high``,
    ``beta``: the same loss on the same tensors (tests/parity).
    """
    per_token, kl, stopped, ratio, mask = _ppo_clip(b, "grpo", epsilon_low, epsilon_high, beta, kl_estimator)
    return _output(_seq_mean(per_token, mask), kl, stopped, ratio, mask)


@register_loss(
    "dapo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_low": "[0, 1)", "epsilon_high": ">= 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def dapo(
    b: PolicyLogps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.28, beta: float = 0.0, kl_estimator: str = "k3"
) -> LossOutput:
    """DAPO: the clipped surrogate with decoupled clip ranges ("clip-higher") and a token-level mean over
    the whole batch, so long completions weigh by their tokens.

    Formula: loss = sum_i sum_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t ] / sum_i |y_i|

    Paper: Yu et al. (2025), "DAPO: An Open-Source LLM Reinforcement Learning System at Scale",
    arXiv:2503.14476.

    Hyper-parameters: ``epsilon_low`` (0.2), ``epsilon_high`` (0.28, the paper's clip-higher value),
    ``beta`` (0.0: DAPO drops the KL term), ``kl_estimator`` (k3).

    TRL 1.16: ``loss_type="dapo"`` with ``epsilon=epsilon_low``, ``epsilon_high``: the same loss for one
    batch (TRL normalises by the tokens of the whole generation batch across accumulation steps; per batch
    it is this). Dynamic sampling and overlong filtering belong to the trainer, not to the loss.
    """
    per_token, kl, stopped, ratio, mask = _ppo_clip(b, "dapo", epsilon_low, epsilon_high, beta, kl_estimator)
    return _output(_token_level(per_token, mask), kl, stopped, ratio, mask)


@register_loss(
    "bnpo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_low": "[0, 1)", "epsilon_high": ">= 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def bnpo(
    b: PolicyLogps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0, kl_estimator: str = "k3"
) -> LossOutput:
    """Batch-normalised policy optimisation: GRPO's clipped surrogate averaged over the tokens of the local
    batch (every token weighs the same, whatever its completion's length).

    Formula: loss = sum_i sum_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t ] / sum_i |y_i|

    Paper: Xiao, Zhang, et al. (2025), "BNPO: Beta Normalization Policy Optimization", arXiv:2506.02864
    (TRL's ``bnpo`` is the token-level normalisation of the local batch).

    Hyper-parameters: as ``grpo``.

    TRL 1.16: ``loss_type="bnpo"``: the same loss on the same tensors.
    """
    per_token, kl, stopped, ratio, mask = _ppo_clip(b, "bnpo", epsilon_low, epsilon_high, beta, kl_estimator)
    return _output(_token_level(per_token, mask), kl, stopped, ratio, mask)


@register_loss(
    "dr_grpo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_low": "[0, 1)", "epsilon_high": ">= 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def dr_grpo(
    b: PolicyLogps, *, epsilon_low: float = 0.2, epsilon_high: float = 0.2, beta: float = 0.0, kl_estimator: str = "k3"
) -> LossOutput:
    """Dr. GRPO ("GRPO done right"): the clipped surrogate summed over tokens and divided by a constant,
    ``B * L_max``, instead of each completion's own length (which biases toward long wrong answers).

    Formula: loss = sum_i sum_t [ -min(r_t A_i, clip(r_t, 1 - eps_low, 1 + eps_high) A_i) + beta KL_t ] / (B L_max)

    Paper: Liu, Chen, Li, Qi, Pang, Du, Lee, Lin (2025), "Understanding R1-Zero-Like Training: A Critical
    Perspective", arXiv:2503.20783.

    Hyper-parameters: as ``grpo``. ``L_max`` is ``batch.max_completion_length`` (the generation limit;
    None: the batch's padded length ``T``). Its advantage is the group mean-centred reward without the std
    (advantage ``dr_grpo``).

    TRL 1.16: ``loss_type="dr_grpo"`` with ``max_completion_length=L_max``: the same loss.
    """
    per_token, kl, stopped, ratio, mask = _ppo_clip(b, "dr_grpo", epsilon_low, epsilon_high, beta, kl_estimator)
    length = b.max_completion_length or mask.shape[1]
    return _output((per_token * mask).sum(-1) / float(length), kl, stopped, ratio, mask)


@register_loss(
    "gspo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_low": "[0, 1)", "epsilon_high": ">= 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def gspo(
    b: PolicyLogps,
    *,
    epsilon_low: float = 3e-4,
    epsilon_high: float = 4e-4,
    beta: float = 0.0,
    kl_estimator: str = "k3",
) -> LossOutput:
    """Group Sequence Policy Optimization: one importance ratio per completion, the geometric mean of its
    token ratios, clipped at the sequence level.

    Formula: s_i = exp((1/|y_i|) sum_t (logp_t - old_logp_t));
    loss = mean_i [ -min(s_i A_i, clip(s_i, 1 - eps_low, 1 + eps_high) A_i) + beta (1/|y_i|) sum_t KL_t ]

    Paper: Zheng, Liu, Li, et al. (2025), "Group Sequence Policy Optimization", arXiv:2507.18071.

    Hyper-parameters: ``epsilon_low`` / ``epsilon_high`` (3e-4 / 4e-4, the paper's: sequence ratios stay
    much closer to 1 than token ratios), ``beta`` (0.0), ``kl_estimator`` (k3). Needs ``[B]`` advantages.

    TRL 1.16: ``loss_type="grpo"`` with ``importance_sampling_level="sequence"``: the same loss.
    """
    log_ratio, adv, mask, _ = _parts(b, "gspo")
    if adv.shape[1] != 1:
        raise ValueError("loss 'gspo': one advantage per completion ([B]); its ratio is per sequence")
    seq_log_ratio = _seq_mean(log_ratio, mask).unsqueeze(1)
    per_seq, stopped = _clipped_surrogate(seq_log_ratio, adv, epsilon_low, epsilon_high)
    kl = _kl_term(b, beta, kl_estimator, "gspo")
    per_token = per_seq.expand_as(mask) if kl is None else per_seq + beta * kl
    return _output(_seq_mean(per_token, mask), kl, stopped, torch.exp(seq_log_ratio), mask)


@register_loss(
    "cispo",
    kind="policy",
    needs_reference=False,
    ranges={"epsilon_high": "> 0", "beta": ">= 0", "kl_estimator": "one of k1, k2, k3"},
)
def cispo(b: PolicyLogps, *, epsilon_high: float = 5.0, beta: float = 0.0, kl_estimator: str = "k3") -> LossOutput:
    """CISPO: REINFORCE on every token with its importance weight clipped and detached, so no token's
    gradient is dropped by clipping (only its weight is capped); token-level mean over the batch.

    Formula: loss = sum_i sum_t [ -sg(min(r_t, eps_high)) A_i logp_t + beta KL_t ] / sum_i |y_i|

    Paper: MiniMax (2025), "MiniMax-M1: Scaling Test-Time Compute Efficiently with Lightning Attention",
    arXiv:2506.13585; eps_max = 5 from Khatri et al. (2025), "The Art of Scaling Reinforcement Learning
    Compute for LLMs" (ScaleRL), arXiv:2510.13786.

    Hyper-parameters: ``epsilon_high`` (5.0): the cap of the importance weight; ``beta`` (0.0),
    ``kl_estimator`` (k3).

    TRL 1.16: ``loss_type="cispo"`` with ``epsilon_high``: the same loss for one batch (normalised as
    ``dapo``).
    """
    log_ratio, adv, mask, _ = _parts(b, "cispo")
    ratio = torch.exp(log_ratio)
    weight = torch.clamp(ratio, max=epsilon_high).detach()
    per_token = -weight * adv * b.logps
    kl = _kl_term(b, beta, kl_estimator, "cispo")
    if kl is not None:
        per_token = per_token + beta * kl
    stopped = (ratio > epsilon_high) & (adv > 0)
    return _output(_token_level(per_token, mask), kl, stopped, ratio, mask)
