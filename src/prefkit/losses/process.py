"""Process reward-model losses: one prediction per reasoning step (`StepScores`).

A process reward model (PRM) reads a logit at the end of every step of a solution; its training
signal is the step labels (hard: correct / wrong; soft: the probability that the step is correct,
e.g. a Monte-Carlo estimate). The loss of a solution is the mean over its steps, so every solution
weighs the same however many steps it has; the trainer weights and reduces over solutions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prefkit.losses.auxiliary import check_hparam
from prefkit.losses.base import LossOutput, StepScores, UnpairedLogps, register_loss, require_reference


def per_example_mean(values: torch.Tensor, example: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``[B]`` means of the ``[S]`` per-step ``values`` over the steps of each example (0 for an example
    without steps)."""
    total = values.new_zeros(batch_size).index_add(0, example, values)
    count = values.new_zeros(batch_size).index_add(0, example, torch.ones_like(values))
    return total / count.clamp(min=1)


@register_loss("prm_bce", kind="process", needs_reference=False, ranges={"pos_weight": "> 0"})
def prm_bce(b: StepScores, *, pos_weight: float = 1.0) -> LossOutput:
    """Step-level binary cross-entropy of a process reward model, averaged over each solution's steps.

    Formula: loss = mean_k [ -w y_k log sigma(z_k) - (1 - y_k) log(1 - sigma(z_k)) ], y_k in [0, 1], w = pos_weight

    Paper: Lightman et al. (2023), "Let's Verify Step by Step", arXiv:2305.20050 (hard labels);
    Wang et al. (2024), "Math-Shepherd: Verify and Reinforce LLMs Step-by-step without Human
    Annotations", ACL (soft labels: the Monte-Carlo estimate of reaching the right answer).

    Hyper-parameters:
        pos_weight: weight of the "correct" term (> 0; 1 is plain cross-entropy). Step data is usually
            dominated by correct steps; a weight below 1 counters that.

    TRL: ``PRMTrainer`` (experimental) trains a token classifier with plain cross-entropy over the
    labelled separator tokens of the batch, i.e. a mean over steps rather than over solutions;
    with solutions of equal step counts the two agree.

    Metrics: ``steps/accuracy`` (the sign of the logit against ``y > 0.5``, mean over the solution's
    steps), ``steps/probability`` (mean ``sigma(z)``), ``steps/label`` (mean ``y``).
    """
    if not pos_weight > 0:
        raise ValueError(f"loss 'prm_bce': pos_weight must be > 0, got {pos_weight!r}")
    dtype = torch.promote_types(b.logits.dtype, torch.float32)  # float32, or float64 for float64 logits
    z, y = b.logits.to(dtype), b.labels.to(dtype)
    per_step = -(pos_weight * y * F.logsigmoid(z) + (1.0 - y) * F.logsigmoid(-z))
    with torch.no_grad():
        correct = ((z > 0) == (y > 0.5)).float()
        metrics = {
            "steps/accuracy": per_example_mean(correct, b.example, b.batch_size),
            "steps/probability": per_example_mean(torch.sigmoid(z), b.example, b.batch_size),
            "steps/label": per_example_mean(y, b.example, b.batch_size),
        }
    return LossOutput(per_example_mean(per_step, b.example, b.batch_size), metrics)


@register_loss("implicit_prm_ce", kind="unpaired", ranges={"beta": "> 0"})
def implicit_prm_ce(b: UnpairedLogps, *, beta: float = 0.05) -> LossOutput:
    """Cross-entropy on the outcome of the implicit reward: trains a policy whose log-ratio to its reference is
    an outcome reward model, and with it an implicit process reward model (`prefkit.eval.implicit.ImplicitPRM`).

    Formula: r = beta * (log pi(y|x) - log pi_ref(y|x)); loss = -l log sigmoid(r) - (1 - l) log sigmoid(-r), l = label

    Paper: Yuan et al. (2024), "Free Process Rewards without Process Labels", arXiv:2412.01981 (their
    cross-entropy objective; with it the partial sums of r over a solution's tokens are q-values, the
    log-odds of success from each prefix).

    Hyper-parameters:
    - ``beta`` (0.05): reward scale (the paper's value).

    Unlike ``bco`` there is no reward shift: the label is read against ``r = 0``. Data: unpaired records,
    ``label`` true for a solution with the right outcome.

    Metrics: ``rewards`` = ``r`` per example.
    """
    check_hparam("implicit_prm_ce", "beta", beta)
    require_reference(b, "implicit_prm_ce")
    rewards = beta * (b.policy - b.ref)
    label = b.label.to(torch.bool)
    loss = torch.where(label, -F.logsigmoid(rewards), -F.logsigmoid(-rewards))
    return LossOutput(loss=loss, metrics={"rewards": rewards.detach()})
