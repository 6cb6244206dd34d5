"""Reference-free pairwise losses: SimPO, CPO, ORPO.

They read only the policy's summed log-probs and token counts from `PairLogps` (``ref_*`` stay
``None``), so the trainer never runs or caches a reference model for them.

Conventions shared with TRL (so a parity test can compare numbers directly):
- length-averaged log-probs are ``policy_* / *_len`` over completion tokens only;
- ``rewards/chosen`` and ``rewards/rejected`` are ``beta`` times the log-prob the loss itself
  uses (length-averaged for SimPO and ORPO, summed for CPO).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.auxiliary import check_hparam, chosen_nll, mean_token_logp
from prefkit.losses.base import LossOutput, PairLogps, pair_metrics, register_loss


def _smoothed_sigmoid_loss(z: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)``: the logistic loss on ``z`` with a
    probability ``eps`` that the preference label is flipped (conservative DPO style)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    loss = -F.logsigmoid(z)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-z)
    return loss


def _at_least_float32(x: Tensor) -> Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def log1m_exp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, without cancellation at either end.

    Near 0 it uses ``log(-expm1(x))``, for ``x < -log 2`` ``log1p(-exp(x))`` (the split point of
    Maechler, 2012, "Accurately Computing log(1 - exp(-|a|))"). ``x`` is clamped to at most
    ``-eps`` of its dtype, so a completion whose average log-prob is exactly 0 (probability 1)
    gives a large finite value instead of ``-inf`` and NaN gradients.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).eps)
    return torch.where(x < -math.log(2.0), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


@register_loss(
    "simpo",
    kind="pairwise",
    needs_reference=False,
    ranges={"beta": "> 0", "gamma_beta_ratio": "any", "label_smoothing": "[0, 0.5)"},
)
def simpo(
    b: PairLogps, *, beta: float = 2.0, gamma_beta_ratio: float = 0.5, label_smoothing: float = 0.0
) -> LossOutput:
    """Simple Preference Optimization: a length-normalised, reference-free reward with a margin.

    Formula: loss = -log sigmoid(beta/|y_w| log pi(y_w|x) - beta/|y_l| log pi(y_l|x) - gamma),
    gamma = gamma_beta_ratio * beta

    Paper: Meng, Xia, Chen (2024), SimPO: Simple Preference Optimization with a Reference-Free
    Reward, arXiv:2405.14734.

    Hyper-parameters:
    - ``beta`` (2.0): scale of the implicit reward ``beta * mean token log-prob``. The paper
      tunes it in [2, 2.5] for its main models (10 for Gemma-2); 2.0 is the authors' default.
    - ``gamma_beta_ratio`` (0.5): the target reward margin expressed as ``gamma / beta``, the
      way the paper's hyper-parameter tables and the authors' code parametrise it (gamma is
      then 1.0 at beta = 2). 0.5 is the value the authors recommend as a starting point; their
      code's bare default is 0.25.
    - ``label_smoothing`` (0.0): probability that a preference label is flipped (conservative
      loss ``-(1-eps) log sigmoid(z) - eps log sigmoid(-z)``); 0 in the paper.

    TRL: ``CPOTrainer`` with ``CPOConfig(loss_type="simpo", beta=beta,
    simpo_gamma=beta * gamma_beta_ratio, cpo_alpha=0.0, label_smoothing=...)``. TRL takes the
    absolute margin ``simpo_gamma`` (default 0.5) and, with its default ``cpo_alpha=1.0``, adds
    CPO's NLL term (the "CPO-SimPO" variant); pure SimPO needs ``cpo_alpha=0``. The paper's own
    SFT regulariser is ``combine_losses(..., ["simpo", "sft"], [1, w])``.

    Metrics: ``rewards/*`` with rewards ``beta * log pi(y|x) / |y|`` (what TRL logs).
    """
    check_hparam("simpo", "beta", beta)
    avg_w = mean_token_logp(b.policy_chosen, b.chosen_len)
    avg_l = mean_token_logp(b.policy_rejected, b.rejected_len)
    z = beta * ((avg_w - avg_l) - gamma_beta_ratio)
    loss = _smoothed_sigmoid_loss(z, label_smoothing)
    return LossOutput(loss=loss, metrics=pair_metrics(beta * avg_w, beta * avg_l))


@register_loss(
    "cpo",
    kind="pairwise",
    needs_reference=False,
    ranges={"beta": "> 0", "cpo_alpha": ">= 0", "label_smoothing": "[0, 0.5)"},
)
def cpo(b: PairLogps, *, beta: float = 0.1, cpo_alpha: float = 1.0, label_smoothing: float = 0.0) -> LossOutput:
    """Contrastive Preference Optimization: DPO with a uniform reference, plus a BC regulariser.

    Formula: loss = -log sigmoid(beta * (log pi(y_w|x) - log pi(y_l|x))) + cpo_alpha * (-log pi(y_w|x) / |y_w|)

    Paper: Xu, Sharaf, Chen, Tan, Shen, Van Durme, Murray, Kim (2024), Contrastive Preference
    Optimization: Pushing the Boundaries of LLM Performance in Machine Translation,
    arXiv:2401.08417.

    Hyper-parameters:
    - ``beta`` (0.1): temperature of the preference term (paper and TRL: 0.1). The
      preference term uses summed (not length-averaged) log-probs.
    - ``cpo_alpha`` (1.0): weight of the behaviour-cloning NLL of the chosen completion. The
      paper adds the NLL with weight 1; 0 leaves only the preference term. The NLL is part of
      this loss (as in TRL) so that ``cpo`` alone is the paper's objective; the name matches
      TRL's ``CPOConfig.cpo_alpha`` (TRL's separate ``alpha`` is AlphaPO's reward shape, which
      prefkit does not implement here).
    - ``label_smoothing`` (0.0): conservative-label variant of the preference term, as in TRL.

    NLL normalisation. The paper writes the regulariser as ``-log pi(y_w|x)``; its
    implementation, TRL's and prefkit's use a per-token average. prefkit averages per sequence
    (``-log pi(y_w|x) / |y_w|`` per example, then the trainer's mean). TRL's ``CPOTrainer`` takes
    one token-weighted cross-entropy over every chosen token of the batch. The two agree when
    all chosen lengths are equal. To reproduce TRL's number exactly from this loss's output:
    ``mean(loss - cpo_alpha * nll_loss) + cpo_alpha * sum(nll_loss * chosen_len) / sum(chosen_len)``.

    TRL: ``CPOTrainer`` with ``CPOConfig(loss_type="sigmoid", beta=beta, cpo_alpha=cpo_alpha,
    label_smoothing=..., alpha=0.0)``.

    Metrics: ``rewards/*`` with rewards ``beta * log pi(y|x)`` (summed log-probs, as TRL logs
    them) and ``nll_loss`` (the unweighted per-example NLL).
    """
    check_hparam("cpo", "beta", beta)
    check_hparam("cpo", "cpo_alpha", cpo_alpha, allow_zero=True)
    pref = _smoothed_sigmoid_loss(beta * (b.policy_chosen - b.policy_rejected), label_smoothing)
    nll = chosen_nll(b)
    loss = pref + cpo_alpha * nll if cpo_alpha else pref
    metrics = pair_metrics(beta * b.policy_chosen, beta * b.policy_rejected)
    metrics["nll_loss"] = nll.detach()
    return LossOutput(loss=loss, metrics=metrics)


@register_loss("orpo", kind="pairwise", needs_reference=False, ranges={"beta": ">= 0"})
def orpo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Odds Ratio Preference Optimization: SFT plus a log-odds-ratio preference penalty.

    Formula: loss = -log pi(y_w|x)/|y_w| - beta * log sigmoid(log odds(y_w) - log odds(y_l)),
    odds(y) = p/(1-p) with p = exp(log pi(y|x) / |y|) (length-averaged)

    Paper: Hong, Lee, Thorne (2024), ORPO: Monolithic Preference Optimization without Reference
    Model, arXiv:2403.07691.

    Hyper-parameters:
    - ``beta`` (0.1, TRL's default): the paper's lambda, weight of the odds-ratio term relative
      to the NLL (named ``beta`` as in TRL's ``ORPOConfig``; ``alpha`` in the authors' code).
      0 reduces ORPO to ``sft``.

    ``log odds(y) = a - log(1 - exp(a))`` with ``a`` the average token log-prob, computed with a
    cancellation-free ``log(1 - exp(a))`` in at least float32 (TRL upcasts the same way).

    Deviations from TRL (``experimental.orpo.ORPOTrainer``, ``ORPOConfig(beta=beta)``):
    - TRL's NLL term is a cross-entropy over the prompt *and* chosen tokens, token-weighted over
      the batch. prefkit follows the paper (likelihood of the response given the prompt) and
      scores chosen-completion tokens only, averaged per sequence. The odds-ratio term, the
      rewards and ``log_odds_*`` metrics match TRL exactly; TRL's total is
      ``nll_trl - beta * mean(log_odds_ratio)``, so parity compares
      ``loss - nll_loss`` with ``-beta * log_odds_ratio`` and checks ``nll_loss`` separately.
    - An average log-prob of exactly 0 is clamped to ``-eps`` (TRL returns inf there).

    Metrics: ``rewards/*`` with rewards ``beta * log pi(y|x) / |y|`` (TRL's), ``nll_loss``,
    ``log_odds_ratio`` (= ``log sigmoid(log odds(y_w) - log odds(y_l))``) and ``log_odds_chosen``
    (= ``log odds(y_w) - log odds(y_l)``), per example; TRL logs their batch means.
    """
    check_hparam("orpo", "beta", beta, allow_zero=True)
    avg_w = _at_least_float32(mean_token_logp(b.policy_chosen, b.chosen_len))
    avg_l = _at_least_float32(mean_token_logp(b.policy_rejected, b.rejected_len))
    log_odds = (avg_w - avg_l) - (log1m_exp(avg_w) - log1m_exp(avg_l))
    log_ratio = F.logsigmoid(log_odds)
    nll = -avg_w
    loss = nll - beta * log_ratio
    metrics = pair_metrics(beta * avg_w, beta * avg_l)
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = log_ratio.detach()
    metrics["log_odds_chosen"] = log_odds.detach()
    return LossOutput(loss=loss, metrics=metrics)
