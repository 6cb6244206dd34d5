"""Group-robust (MaxMin) reduction of per-example preference losses over user groups.

A preference loss gives one value per example (`prefkit.losses.base.LossOutput.loss`, unreduced). The
plain objective averages them, so a group that supplies 80 % of the pairs decides 80 % of the gradient.
The MaxMin objective trains for the worst-off group instead:

- MaxMin-RLHF (Chakraborty et al. 2024): ``max_pi min_g F_g(pi)``, ``F_g`` group g's KL-regularised
  expected reward; the policy step follows the group whose objective is lowest.
- Its reward-free form, Group Robust Preference Optimization (Ramesh et al. 2024):
  ``min_pi max_{alpha in simplex} sum_g alpha_g L_g(pi)``, ``L_g`` the mean DPO (or any pairwise) loss of
  group g's pairs, solved by alternating an exponentiated-gradient (mirror ascent) step on ``alpha``,
  ``alpha_g <- alpha_g * exp(eta * L_g) / Z``, with a gradient step on the policy for
  ``sum_g alpha_g L_g``. As ``eta`` grows, ``alpha`` tends to the one-hot on the worst group (the
  MaxMin-RLHF step; `prefkit.models.mixture.maxmin_weights`).

Here: per-group sums and means from per-example losses and group indices (`group_loss_sums`,
`group_mean_losses`), the exponentiated-gradient update (`exponentiated_gradient_step`) and the weighted
objective (`group_robust_objective`). Pure functions over tensors; the trainer keeps ``alpha`` as state
(`prefkit.train.trainer.PreferenceTrainer`, config ``group_robust``).

Groups absent from a batch have no loss there. They are marked by ``present = counts > 0``: their
entry of the group means is 0 (not a loss), they add nothing to the objective (as in the authors'
implementation), and the update keeps their weight exactly: the present groups share out their own
total weight by the exponentiated-gradient rule. (The authors' code instead treats an absent group's
loss as 0, so its weight shrinks whenever it is missing from a batch; with small batches that is
most batches for a rare group, the very group the method is for.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "exponentiated_gradient_step",
    "group_loss_sums",
    "group_mean_losses",
    "group_robust_objective",
]


def _check_groups(values: Tensor, groups: Tensor, n_groups: int) -> None:
    if isinstance(n_groups, bool) or not isinstance(n_groups, int) or n_groups < 1:
        raise ValueError(f"n_groups must be a positive int, got {n_groups!r}")
    if values.ndim != 1 or groups.shape != values.shape:
        raise ValueError(
            f"values and groups must be 1-D of one shape, got {tuple(values.shape)} and {tuple(groups.shape)}"
        )
    if groups.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"groups must hold integer group indices, got dtype {groups.dtype}")
    if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= n_groups):
        raise ValueError(f"group indices must lie in [0, {n_groups}), got {sorted(set(groups.tolist()))}")


def group_loss_sums(losses: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """``(sums [G], counts [G])``: the sum of ``losses`` over each group's examples and their number.

    Formula: S_g = sum_{i: groups_i = g} loss_i;  n_g = #{i: groups_i = g}

    Paper: Ramesh et al. (2024), Group Robust Preference Optimization in Reward-free RLHF,
    arXiv:2405.20304 (the group losses of its Algorithm 1, per batch).

    ``losses`` ``[B]`` (gradients flow into ``sums``), ``groups`` ``[B]`` integer indices in
    ``[0, n_groups)``. Sums and counts (rather than means) add up over processes or micro-batches.
    ``counts`` has the dtype of ``losses``.
    """
    _check_groups(losses, groups, n_groups)
    groups = groups.to(device=losses.device, dtype=torch.long)
    sums = losses.new_zeros(n_groups).index_add(0, groups, losses)
    counts = losses.new_zeros(n_groups).index_add(0, groups, torch.ones_like(losses))
    return sums, counts


def group_mean_losses(losses: Tensor, groups: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """``(means [G], counts [G])``: each group's mean loss over its examples in the batch.

    Formula: L_g = (1 / n_g) sum_{i: groups_i = g} loss_i   (L_g = 0 where n_g = 0: g is absent)

    Paper: Ramesh et al. (2024), Group Robust Preference Optimization in Reward-free RLHF,
    arXiv:2405.20304.

    A group absent from the batch (``counts[g] == 0``) gets mean 0, which is no loss: pass
    ``present = counts > 0`` to `exponentiated_gradient_step` and `group_robust_objective`.
    """
    sums, counts = group_loss_sums(losses, groups, n_groups)
    return sums / counts.clamp(min=1), counts


def _check_alpha(alpha: Tensor) -> None:
    if alpha.ndim != 1 or alpha.numel() == 0:
        raise ValueError(f"alpha must be a non-empty [G] tensor, got shape {tuple(alpha.shape)}")
    if not bool(torch.isfinite(alpha).all()) or bool((alpha < 0).any()) or abs(float(alpha.sum()) - 1.0) > 1e-4:
        raise ValueError(f"alpha must lie on the probability simplex (entries >= 0, sum 1), got {alpha.tolist()}")


def _check_present(present: Tensor, like: Tensor, name: str) -> None:
    if present.dtype != torch.bool or present.shape != like.shape:
        raise ValueError(f"present must be a bool tensor of the shape of {name} {tuple(like.shape)}")


def exponentiated_gradient_step(alpha: Tensor, group_losses: Tensor, present: Tensor, step_size: float) -> Tensor:
    """One exponentiated-gradient (mirror ascent) step of the group weights ``alpha`` on the simplex.

    Formula: alpha'_g = alpha_g * exp(eta * L_g) / sum_h alpha_h * exp(eta * L_h)
      (sums over the present groups, times their total weight sum_{h present} alpha_h; absent g: alpha'_g = alpha_g)

    Paper: Ramesh et al. (2024), Group Robust Preference Optimization in Reward-free RLHF,
    arXiv:2405.20304 (Algorithm 1, the alpha update).

    ``alpha`` ``[G]`` on the simplex, ``group_losses`` ``[G]`` (e.g. from `group_mean_losses`; used
    detached), ``present`` ``[G]`` bool. The present group with the highest loss gains weight; an absent
    group keeps its weight. With every group present this is the plain update. Computed as a softmax
    of ``log alpha + eta * L`` (no overflow for large ``eta * L``), in ``alpha``'s dtype.
    ``step_size = 0`` (or no group present) returns ``alpha`` unchanged.
    """
    _check_alpha(alpha)
    _check_present(present, alpha, "alpha")
    if group_losses.shape != alpha.shape:
        raise ValueError(f"group_losses {tuple(group_losses.shape)} and alpha {tuple(alpha.shape)} must match")
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not math.isfinite(step_size):
        raise ValueError(f"step_size must be a finite number, got {step_size!r}")
    if step_size < 0:
        raise ValueError(f"step_size must be >= 0, got {step_size}")
    losses = group_losses.detach().to(device=alpha.device, dtype=alpha.dtype)
    present = present.to(alpha.device)
    if not bool(torch.isfinite(losses[present]).all()):
        raise ValueError(f"group losses must be finite, got {losses.tolist()}")
    new = alpha.clone()
    if bool(present.any()):
        kept = alpha[present]
        new[present] = kept.sum() * torch.softmax(kept.log() + step_size * losses[present], dim=0)
    return new


def size_adjusted_losses(group_losses: Tensor, group_sizes: Tensor, c: float) -> Tensor:
    """Group losses plus a generalization adjustment that favours small groups, for alpha's update.

    Formula: L~_g = L_g + C / sqrt(N_g)   (N_g: group g's number of training examples; C >= 0)

    Paper: Sagawa, Koh, Hashimoto, Liang (2020), Distributionally Robust Neural Networks for Group Shifts,
    arXiv:1911.08731 (group adjustments, Section 3.3); the optional adjustment of Group Robust Preference
    Optimization's alpha update (Ramesh et al. 2024, arXiv:2405.20304).

    A small group's mean training loss underestimates its held-out loss more than a large group's does;
    the adjustment gives it the benefit of the doubt. ``C = 0`` returns the losses unchanged. Only the
    weights' update uses the adjusted losses; the objective keeps ``L_g``.
    """
    if group_sizes.shape != group_losses.shape:
        raise ValueError(f"group_sizes {tuple(group_sizes.shape)} and group_losses {tuple(group_losses.shape)} differ")
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (0 <= c < float("inf")):
        raise ValueError(f"the adjustment C must be a finite number >= 0, got {c!r}")
    if bool((group_sizes <= 0).any()):
        raise ValueError(f"group sizes must be positive, got {group_sizes.tolist()}")
    sizes = group_sizes.to(device=group_losses.device, dtype=group_losses.dtype)
    return group_losses + c / sizes.sqrt()


def group_robust_objective(group_losses: Tensor, alpha: Tensor, present: Tensor) -> Tensor:
    """The alpha-weighted sum of the present groups' losses: the policy's objective for fixed ``alpha``.

    Formula: objective = sum_{g present} alpha_g * L_g

    Paper: Ramesh et al. (2024), Group Robust Preference Optimization in Reward-free RLHF,
    arXiv:2405.20304 (Algorithm 1, the policy step); with alpha one-hot on the worst group, the
    MaxMin step of Chakraborty et al. (2024), MaxMin-RLHF, arXiv:2402.08925.

    ``group_losses`` ``[G]`` carries the gradient; ``alpha`` ``[G]`` is a constant (detached).
    Absent groups add nothing (their ``group_losses`` entry is not used, even if it is not finite).
    """
    _check_present(present, group_losses, "group_losses")
    if alpha.shape != group_losses.shape:
        raise ValueError(f"alpha {tuple(alpha.shape)} and group_losses {tuple(group_losses.shape)} must match")
    weights = alpha.detach().to(device=group_losses.device, dtype=group_losses.dtype)
    present = present.to(group_losses.device)
    return (weights[present] * group_losses[present]).sum()
