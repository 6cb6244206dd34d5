"""Unpaired (thumbs-up / thumbs-down) losses: KTO and BCO.

Both compare the implicit reward ``beta * (log pi(y|x) - log pi_ref(y|x))`` of each completion with
a reference point that depends on more than the example itself: KTO's batch KL estimate z0, BCO's
running mean reward delta. Losses hold no state (DESIGN.md §3), so the trainer keeps that value,
updates it with the pure helpers below (`kto_kl_estimate`, `bco_update_reward_shift`) and passes it
in as ``UnpairedLogps.ref_point``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.auxiliary import check_hparam
from prefkit.losses.base import LossOutput, UnpairedLogps, register_loss, require_reference


def _ref_point(b: UnpairedLogps, loss: str, what: str, like: Tensor) -> Tensor:
    if b.ref_point is None:
        raise ValueError(
            f"loss {loss!r} needs UnpairedLogps.ref_point ({what}), but it is None; the trainer "
            "computes it and passes it in"
        )
    z = torch.as_tensor(b.ref_point, dtype=like.dtype, device=like.device).detach()
    if z.numel() != 1:
        raise ValueError(f"loss {loss!r}: ref_point must be a scalar, got shape {tuple(z.shape)}")
    return z.reshape(())


def _labels(b: UnpairedLogps) -> Tensor:
    return torch.as_tensor(b.label, device=b.policy.device).to(torch.bool)


def kto_kl_estimate(policy_kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point z0: the batch estimate of KL(pi || pi_ref).

    Inputs are the summed log-probs ``[N]`` of *mismatched* prompt/completion pairs (prompt ``i``
    with the completion of example ``(i - 1) % N``, `UnpairedCollator`'s ``kl_*`` rows, which is
    TRL 1.16's pairing) under the policy and the reference. Returns a detached 0-d tensor:
    ``max(0, mean(policy - ref))``.

    Under data parallelism TRL averages the per-process means before clamping; a trainer that
    wants the same number gathers ``(policy_kl_logps - ref_kl_logps).mean()`` from every process,
    averages, and clamps.
    """
    return (policy_kl_logps - ref_kl_logps).detach().mean().clamp(min=0)


@register_loss("kto", kind="unpaired", ranges={"beta": "> 0", "desirable_weight": ">= 0", "undesirable_weight": ">= 0"})
def kto(
    b: UnpairedLogps, *, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
) -> LossOutput:
    """Kahneman-Tversky Optimization: a prospect-theoretic value of each thumbs-up/down completion.

    Formula: r = log pi(y|x) - log pi_ref(y|x); loss = desirable_weight * (1 - sigmoid(beta * (r - z0)))
    if desirable, undesirable_weight * (1 - sigmoid(beta * (z0 - r))) if undesirable

    Paper: Ethayarajh, Xu, Muennighoff, Jurafsky, Kiela (2024), KTO: Model Alignment as Prospect
    Theoretic Optimization, arXiv:2402.01306.

    Hyper-parameters:
    - ``beta`` (0.1): risk aversion, the scale of the implicit reward (TRL's default).
    - ``desirable_weight`` (1.0), ``undesirable_weight`` (1.0): the paper's lambda_D and
      lambda_U. The paper recommends ``lambda_D * n_D / (lambda_U * n_U)`` in ``[1, 4/3]``
      when the classes are imbalanced.

    The reference point z0 comes in as ``b.ref_point`` (computed by the trainer with
    `kto_kl_estimate`, detached); a missing one is an error rather than a silent 0. Passing
    ``ref_point=0`` gives the KL-free variant, which is exactly TRL's ``apo_zero_unpaired``
    (1 - sigma(beta * (0 - r)) = sigma(beta * r) for the undesirable term).

    TRL: ``KTOTrainer`` with ``KTOConfig(loss_type="kto", beta=beta,
    desirable_weight=..., undesirable_weight=...)``; TRL reduces with a plain mean over the
    batch, which is what prefkit's trainer does with unit example weights. Numbers match given
    the same z0, and z0 from `UnpairedCollator`'s KL rows is TRL's ``kl`` on the same batch (same
    pairing).

    Metrics: ``rewards`` = ``beta * r`` per example (TRL's ``rewards/chosen`` / ``rewards/rejected``
    are their means over the desirable / undesirable examples).
    """
    check_hparam("kto", "beta", beta)
    check_hparam("kto", "desirable_weight", desirable_weight, allow_zero=True)
    check_hparam("kto", "undesirable_weight", undesirable_weight, allow_zero=True)
    require_reference(b, "kto")
    z0 = _ref_point(b, "kto", "the KL estimate z0 from kto_kl_estimate", b.policy)
    logratio = b.policy - b.ref
    desirable = _labels(b)
    loss = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratio))),
    )
    return LossOutput(loss=loss, metrics={"rewards": (beta * logratio).detach()})


def bco_update_reward_shift(
    old_delta: Tensor | float,
    old_count: int,
    rewards_chosen: Tensor | None,
    rewards_rejected: Tensor | None,
) -> tuple[Tensor, int]:
    """BCO's reward shift delta: the running mean of every implicit reward seen so far.

    Returns ``(new_delta, new_count)``: the mean over all ``old_count + n`` rewards, where the
    ``n`` new ones are ``rewards_chosen`` and ``rewards_rejected`` (``beta * (log pi - log
    pi_ref)`` of this batch's desirable and undesirable examples; either may be empty or
    ``None``). Start from ``(0.0, 0)``. The result is detached; the trainer stores both values
    (and checkpoints them) and passes ``new_delta`` to `bco` as ``ref_point``.

    This is an exact cumulative mean weighted by example count, like TRL's ``RunningMoments``
    used by ``BCOTrainer``, not an exponential moving average. To reproduce TRL: update *before*
    computing the loss (TRL's delta already includes the current batch), and only in training
    steps (TRL leaves it unchanged in evaluation). Under data parallelism TRL merges every
    process's rewards into one update.
    """
    parts = [r.detach().reshape(-1) for r in (rewards_chosen, rewards_rejected) if r is not None]
    new = torch.cat(parts) if parts else torch.zeros(0)
    out_dtype = new.dtype if new.is_floating_point() else torch.float32
    old = torch.as_tensor(old_delta).detach().to(device=new.device, dtype=torch.float64).reshape(())
    n = new.numel()
    if n == 0:
        return old.to(out_dtype), int(old_count)
    total = int(old_count) + n
    mean = old + (new.to(torch.float64).mean() - old) * (n / total)
    return mean.to(out_dtype), total


@register_loss("bco", kind="unpaired", ranges={"beta": "> 0"})
def bco(b: UnpairedLogps, *, beta: float = 0.1) -> LossOutput:
    """Binary Classifier Optimization: logistic regression of "desirable" on the shifted implicit reward.

    Formula: r = beta * (log pi(y|x) - log pi_ref(y|x)); loss = -log sigmoid(r - delta) if desirable,
    -log sigmoid(-(r - delta)) if undesirable

    Paper: Jung, Han, Nam, On (2024), Binary Classifier Optimization for Large Language Model
    Alignment, arXiv:2404.04656.

    Hyper-parameters:
    - ``beta`` (0.1): reward scale (TRL's ``BCOConfig`` default).

    ``delta`` is the reward shift, the running mean of all implicit rewards seen in training,
    passed in as ``b.ref_point`` and updated by the trainer with `bco_update_reward_shift`
    before this call. A missing one is an error.

    Not implemented: the paper's underlying-distribution matching (UDM), which reweights
    undesirable examples by a prompt density ratio from a separately trained embedding
    classifier. It is optional in the paper and in TRL (``match_underlying_distribution=False``
    by default); the trainer's per-example weights are the place to apply such ratios.

    TRL: ``BCOTrainer`` (removed from TRL by 1.16; in the last releases that had it,
    ``BCOConfig(beta=beta, match_underlying_distribution=False)``), mean over the batch. Its
    DPO ``loss_type="bco_pair"`` is the paired form and is not this loss.

    Metrics: ``rewards`` = ``r`` per example.
    """
    check_hparam("bco", "beta", beta)
    require_reference(b, "bco")
    delta = _ref_point(b, "bco", "the running reward mean delta from bco_update_reward_shift", b.policy)
    rewards = beta * (b.policy - b.ref)
    shifted = rewards - delta
    loss = torch.where(_labels(b), -F.logsigmoid(shifted), -F.logsigmoid(-shifted))
    return LossOutput(loss=loss, metrics={"rewards": rewards.detach()})
