"""Auxiliary terms that are added to a preference loss by weight (`prefkit.losses.combine`).

Also home of the small length-normalisation helpers the reference-free losses share, so that
`sft`, `cpo` and `orpo` compute the negative log-likelihood of the chosen completion in exactly
one way.
"""

from __future__ import annotations

import math

from torch import Tensor

from prefkit.losses.base import LossOutput, PairLogps, register_loss


def check_hparam(loss: str, name: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"loss {loss!r}: {name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"loss {loss!r}: {name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def mean_token_logp(logp_sum: Tensor, n_tokens: Tensor) -> Tensor:
    """Average per-token log-prob of a completion: ``logp_sum / n_tokens``.

    Token counts below 1 (an empty completion, which the tokenizer never produces because it
    appends EOS) are treated as 1 so the result stays finite.
    """
    return logp_sum / n_tokens.to(logp_sum.dtype).clamp(min=1.0)


def chosen_nll(b: PairLogps) -> Tensor:
    """Length-averaged negative log-likelihood of each chosen completion, ``[B]``."""
    return -mean_token_logp(b.policy_chosen, b.chosen_len)


@register_loss("sft", kind="pairwise", needs_reference=False)
def sft(b: PairLogps) -> LossOutput:
    """Supervised fine-tuning term: negative log-likelihood of the chosen completion.

    Formula: loss = -log pi(y_w|x) / |y_w|   (per-token average over the chosen completion)

    Paper: Pang, Yuan, Cho, He, Sukhbaatar, Weston (2024), Iterative Reasoning Preference
    Optimization, arXiv:2404.19733.

    RPO is ``dpo + alpha * sft`` (``alpha = 1`` in the paper), registered as the loss ``rpo``. ``sft`` has no
    hyper-parameters of its own; its weight is given where it is combined:
    ``combine_losses(batch, ["dpo", "sft"], [1.0, alpha], params)`` is RPO, and TRL's
    ``DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha])`` its counterpart.
    Only the chosen completion is scored; ``rejected`` and reference log-probs are ignored.

    Normalisation. The value is a per-sequence mean (each example's summed log-prob over its
    own token count), so the trainer's batch mean is a *mean of per-sequence means*. TRL's
    ``DPOTrainer(loss_type="sft")`` instead takes one token-weighted mean over every chosen
    token of the batch, ``sum_i(-logp_i) / sum_i |y_w,i|``. Both agree when all chosen
    completions have the same length; otherwise TRL's number is reproduced by reducing this
    loss with weights proportional to ``chosen_len``. RPO's paper divides the NLL by the
    prompt-plus-completion length; prefkit (like TRL) scores completion tokens only.

    Metrics: ``nll_loss`` (per example, equal to the loss). No reward metrics: an SFT term
    defines no implicit reward.

    Unpaired data: ``sft`` is registered for the pairwise kind only (one kind per registry
    entry); it is not available with ``kto`` / ``bco``.
    """
    nll = chosen_nll(b)
    return LossOutput(loss=nll, metrics={"nll_loss": nll.detach()})
