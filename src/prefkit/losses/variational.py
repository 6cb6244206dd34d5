"""Variational reward-model loss: the negative ELBO of VPL's latent-conditioned Bradley-Terry model.

A user-conditioned reward ``r(x, z)`` scores the chosen and rejected response of each target pair
under a latent ``z`` drawn from the posterior ``q(z | context) = N(mu, diag exp(logvar))`` that an
encoder inferred from the same user's context pairs. The batch is a `LatentRewardPair`: the rewards
plus, for each pair, the ``mu`` and ``logvar`` of the posterior it was scored under.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.auxiliary import check_hparam
from prefkit.losses.base import LossOutput, RewardPair, pair_metrics, register_loss

__all__ = ["LatentRewardPair", "gaussian_kl", "vpl_elbo"]


@dataclass
class LatentRewardPair(RewardPair):
    """`RewardPair` scored under a latent ``z ~ N(mu, diag exp(logvar))``.

    ``mu`` and ``logvar`` are ``[B, D]``: row ``i`` is the posterior that pair ``i``'s ``z`` was
    drawn from. ``pairs_per_latent`` (``[B]`` or a number, default 1) is how many pairs of the
    batch share that posterior (one user's target pairs share one ``q(z | context)``); each pair
    carries ``1 / pairs_per_latent`` of its KL so that the posterior's KL counts once.
    """

    mu: Tensor | None = None
    logvar: Tensor | None = None
    pairs_per_latent: Tensor | float = 1.0


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``[...]`` ``KL(N(mu, diag exp(logvar)) || N(0, I)) = 0.5 * sum_d (exp(logvar) + mu^2 - 1 - logvar)``.

    ``mu`` and ``logvar`` are ``[..., D]``; the sum runs over the last dimension.
    """
    return 0.5 * (logvar.exp() + mu.pow(2) - 1.0 - logvar).sum(dim=-1)


@register_loss("vpl_elbo", kind="reward_pair", needs_reference=False, ranges={"beta_kl": "> 0"})
def vpl_elbo(b: LatentRewardPair, *, beta_kl: float = 1.0) -> LossOutput:
    """Negative ELBO of Variational Preference Learning: Bradley-Terry NLL under a sampled user
    latent plus the weighted KL of the latent's posterior to the standard normal prior.

    Formula: loss = -log sigma(r(x_w, z) - r(x_l, z)) + beta_kl * KL(N(mu, diag exp(logvar)) || N(0, I)) / m,
    z ~ N(mu, diag exp(logvar)), m = pairs sharing the posterior

    Paper: Poddar, Wan, Ivison, Gupta, Jaques (2024), "Personalizing Reinforcement Learning from
    Human Feedback with Variational Preference Learning", arXiv:2408.10075.

    Hyper-parameters:
        ``beta_kl`` (1.0): weight of the KL term (> 0; 1 is the true ELBO). Smaller values let the
            posterior carry more information about the user; too large a value collapses it onto
            the prior (no active latent units; watch the ``kl`` metric).

    The batch must be a `LatentRewardPair` (from `prefkit.models.vpl.VPL`, which draws ``z`` with
    the reparameterisation trick); a plain `RewardPair` has no posterior and is refused. Summed over
    one user's ``m`` target pairs the loss is that user's negative ELBO.

    Metrics: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
    ``bt`` (the Bradley-Terry term), ``kl`` (the full KL of the pair's posterior, not divided by m).
    """
    check_hparam("vpl_elbo", "beta_kl", beta_kl)
    if not isinstance(b, LatentRewardPair) or b.mu is None or b.logvar is None:
        raise ValueError(
            "loss 'vpl_elbo' needs the posterior (mu, logvar) each pair was scored under: a LatentRewardPair "
            "from a user-conditioned model (prefkit.models.vpl.VPL), not a plain RewardPair"
        )
    if b.mu.shape != b.logvar.shape or b.mu.dim() != 2 or b.mu.shape[0] != b.chosen.shape[0]:
        raise ValueError(
            f"loss 'vpl_elbo': mu and logvar must both be [B, D] with B = {b.chosen.shape[0]}; got "
            f"{tuple(b.mu.shape)} and {tuple(b.logvar.shape)}"
        )
    bt = -F.logsigmoid(b.chosen - b.rejected)
    kl = gaussian_kl(b.mu, b.logvar)
    loss = bt + beta_kl * kl / b.pairs_per_latent
    metrics = pair_metrics(b.chosen, b.rejected)
    metrics.update(bt=bt.detach(), kl=kl.detach())
    return LossOutput(loss=loss, metrics=metrics)
