"""PPO's critic-side objectives (pure functions over per-token tensors; no model code): generalized advantage
estimation, advantage whitening and the clipped value loss.

Tensors are ``[B, T]`` in the layout of the completion mask ``mask`` (1 on completion tokens, which are
contiguous in each row); positions outside the mask are ignored and come back as 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gae", "masked_moments", "value_loss", "whiten"]


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
) -> tuple[Tensor, Tensor]:
    """Generalized advantage estimation over each row's completion tokens: ``(advantages, returns)``.

    Formula: delta_t = r_t + gamma * V_{t+1} - V_t (V after the last token = 0);
    A_t = delta_t + gamma * lam * A_{t+1}; returns R_t = A_t + V_t.

    Paper: Schulman, Moritz, Levine, Jordan, Abbeel (2016), "High-Dimensional Continuous Control Using
    Generalized Advantage Estimation", arXiv:1506.02438. gamma = 1, lam = 0.95 are the RLHF defaults
    (Ouyang et al. 2022; TRL's PPO).
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values and mask must be [B, T] of one shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    advantages = torch.zeros_like(v)
    next_value = torch.zeros_like(v[:, 0])
    next_adv = torch.zeros_like(v[:, 0])
    for t in range(v.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        adv = delta + gamma * lam * next_adv
        keep = m[:, t]
        advantages[:, t] = adv * keep
        # outside the completion the recursion passes through unchanged (prompt and padding positions)
        next_value = torch.where(keep > 0, v[:, t], next_value)
        next_adv = torch.where(keep > 0, adv, next_adv)
    return advantages, (advantages + v) * m


def masked_moments(x: Tensor, mask: Tensor) -> Tensor:
    """``[count, sum, sum of squares]`` of the masked entries (summable across processes)."""
    m = mask.to(x.dtype)
    return torch.stack([m.sum(), (x * m).sum(), (x * x * m).sum()])


def whiten(
    x: Tensor, mask: Tensor, *, shift_mean: bool = True, eps: float = 1e-8, moments: Tensor | None = None
) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (``shift_mean=False`` adds the mean back), 0
    elsewhere: PPO's advantage whitening (Schulman et al. 2017; Ziegler et al. 2019). The mean and the
    unbiased variance come from ``moments`` (`masked_moments`, e.g. summed over processes) when given."""
    m = mask.to(x.dtype)
    count, total, squares = masked_moments(x, mask) if moments is None else moments.to(x.dtype)
    n = count.clamp(min=1.0)
    mean = total / n
    var = ((squares - n * mean * mean) / (n - 1).clamp(min=1.0)).clamp(min=0.0)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, clip: float = 0.2) -> Tensor:
    """PPO's clipped value loss, the mean over completion tokens.

    Formula: L_V = 0.5 * mean_t max((V_t - R_t)^2, (clip(V_t, V_old_t - c, V_old_t + c) - R_t)^2)

    Paper: Schulman et al. (2017), "Proximal Policy Optimization Algorithms", arXiv:1707.06347, as the RLHF
    implementations use it (Ziegler et al. 2019; Zheng et al. 2023, "Secrets of RLHF in Large Language
    Models Part I: PPO", arXiv:2307.04964). ``clip`` None: the unclipped squared error.
    """
    m = mask.to(values.dtype)
    unclipped = (values - returns) ** 2
    if clip is None:
        per_token = unclipped
    else:
        clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
        per_token = torch.max(unclipped, (clipped_values - returns) ** 2)
    return 0.5 * (per_token * m).sum() / m.sum().clamp(min=1.0)
