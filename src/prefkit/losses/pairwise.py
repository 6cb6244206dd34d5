"""Reference-based pairwise preference losses (DPO and its family).

Every loss here takes a :class:`~prefkit.losses.base.PairLogps` with reference log-probs and
keyword-only hyper-parameters, and returns a :class:`~prefkit.losses.base.LossOutput` whose
``loss`` is ``[B]`` and unreduced, with the standard pairwise metrics
(``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``).

Notation used in the ``Formula:`` lines (all per example):

- ``pi_w``, ``pi_l``: summed policy log-probs of the chosen (w) and rejected (l) completion;
- ``ref_w``, ``ref_l``: the same under the reference model;
- ``lr_w = pi_w - ref_w``, ``lr_l = pi_l - ref_l``: log-ratios; ``h = lr_w - lr_l``;
- ``|y_w|``, ``|y_l|``: completion token counts; ``sigma``: the logistic function.

Unless a docstring says otherwise the logged rewards are ``beta * lr_w`` and ``beta * lr_l``,
which is what TRL's ``DPOTrainer`` logs for every ``loss_type``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefkit.losses._divergence import DIVERGENCES, check_divergence, f_score
from prefkit.losses.auxiliary import chosen_nll
from prefkit.losses.base import LossOutput, PairLogps, pair_metrics, register_loss, require_reference

# --------------------------------------------------------------------------------------------
# helpers


def _number(name: str, value: object, loss: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"loss {loss!r}: {name} must be a number, got {value!r}")  # noqa: TRY004
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"loss {loss!r}: {name} must be finite, got {value}")
    return value


def _positive(name: str, value: object, loss: str) -> float:
    value = _number(name, value, loss)
    if value <= 0:
        raise ValueError(f"loss {loss!r}: {name} must be > 0, got {value}")
    return value


def _in_range(name: str, value: object, loss: str, lo: float, hi: float, *, lo_open=False, hi_open=True):
    value = _number(name, value, loss)
    ok_lo = value > lo if lo_open else value >= lo
    ok_hi = value < hi if hi_open else value <= hi
    if not (ok_lo and ok_hi):
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"loss {loss!r}: {name} must lie in {interval}, got {value}")
    return value


def _logratios(b: PairLogps, loss: str) -> tuple[Tensor, Tensor]:
    """``(pi_w - ref_w, pi_l - ref_l)``, after checking the reference is there."""
    require_reference(b, loss)
    return b.policy_chosen - b.ref_chosen, b.policy_rejected - b.ref_rejected


def _require_tokens(b: PairLogps, loss: str, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if getattr(b, f) is None]
    if missing:
        raise ValueError(
            f"loss {loss!r} needs per-token tensors {missing}, but the batch has none "
            "(it is registered with needs_tokens=True)"
        )


def _out(loss: Tensor, beta: float, lr_w: Tensor, lr_l: Tensor, **extra: Tensor) -> LossOutput:
    metrics = pair_metrics(beta * lr_w, beta * lr_l)
    metrics.update({k: v.detach() for k, v in extra.items()})
    return LossOutput(loss=loss, metrics=metrics)


def _smoothed_logistic(logits: Tensor, label_smoothing: float) -> Tensor:
    """``-(1 - eps) * log sigma(z) - eps * log sigma(-z)``: BCE against a soft label ``1 - eps``."""
    out = -F.logsigmoid(logits)
    if label_smoothing:
        out = (1.0 - label_smoothing) * out - label_smoothing * F.logsigmoid(-logits)
    return out


def _safe_len(n: Tensor) -> Tensor:
    return n.clamp(min=1.0)


# --------------------------------------------------------------------------------------------
# DPO and its label-noise variants


@register_loss("dpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def dpo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Direct Preference Optimization.

    Formula: loss = -log sigma(beta * h), h = (pi_w - ref_w) - (pi_l - ref_l)

    Paper: Rafailov, Sharma, Mitchell, Ermon, Manning, Finn (2023), "Direct Preference
    Optimization: Your Language Model is Secretly a Reward Model", arXiv:2305.18290.

    Hyper-parameters:
        beta: strength of the implicit KL penalty to the reference (> 0). Published default
            0.1 (the paper's main setting; also TRL's default).

    TRL: ``loss_type="sigmoid"``, same ``beta``. Identical numerics and logged rewards.
    """
    beta = _positive("beta", beta, "dpo")
    lr_w, lr_l = _logratios(b, "dpo")
    loss = -F.logsigmoid(beta * (lr_w - lr_l))
    return _out(loss, beta, lr_w, lr_l)


@register_loss("rpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "alpha": ">= 0"})
def rpo(b: PairLogps, *, beta: float = 0.1, alpha: float = 1.0) -> LossOutput:
    """RPO: DPO plus the negative log-likelihood of the chosen completion (an SFT term).

    Formula: loss = -log sigma(beta * h) + alpha * (-log pi(y_w|x) / |y_w|)

    Paper: Liu, Lu, Zhang, et al. (2024), "Provably Mitigating Overoptimization in RLHF: Your SFT Loss is
    Implicitly an Adversarial Regularizer", arXiv:2405.16436 (RPO, "regularized preference optimization": the
    SFT term keeps the policy on the chosen data and provably limits over-optimisation). The same objective is
    Pang, Yuan, Cho, He, Sukhbaatar, Weston (2024), "Iterative Reasoning Preference Optimization",
    arXiv:2404.19733, which TRL's former ``rpo_alpha`` cites (their NLL divides by prompt + completion length).

    Hyper-parameters:
        beta: DPO's beta (> 0); default 0.1.
        alpha: weight of the SFT term (>= 0; 0 is DPO); default 1.0, Pang et al.'s value.

    ``rpo`` is exactly ``combine_losses(batch, ["dpo", "sft"], [1.0, alpha], {"dpo": {"beta": beta}})`` as one
    name. TRL: ``DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, alpha])``; its SFT term is one
    token-weighted mean over the batch's chosen tokens where this one is a mean of per-sequence means (see
    ``sft``): equal when the chosen completions have equal lengths.

    Metrics: the DPO reward metrics and ``nll_loss`` (per example).
    """
    beta = _positive("beta", beta, "rpo")
    alpha = _number("alpha", alpha, "rpo")
    if alpha < 0:
        raise ValueError(f"loss 'rpo': alpha must be >= 0, got {alpha}")
    lr_w, lr_l = _logratios(b, "rpo")
    nll = chosen_nll(b)
    loss = -F.logsigmoid(beta * (lr_w - lr_l)) + alpha * nll
    return _out(loss, beta, lr_w, lr_l, nll_loss=nll)


@register_loss("jpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def jpo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """JPO (joint preference optimization): DPO over instruction-response pairs, where the preferred and the
    dispreferred response may answer different instructions.

    Formula: loss = -log sigma(beta * [(pi - ref)(y_w | x_w) - (pi - ref)(y_l | x_l)])

    Paper: Bansal, Suvarna, Bhatt, Peng, Chang, Grover (2024), "Comparing Bad Apples to Good Oranges: Aligning
    Large Language Models via Joint Preference Optimization", arXiv:2404.00530.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.

    The loss is DPO's; what makes it JPO is the data: a pairwise record with ``rejected_prompt`` is a joint
    preference ("response y_w to x_w is better than response y_l to x_l"), and the rejected completion is scored
    after its own prompt. A batch may mix joint and ordinary (conditional) pairs, as the paper trains on both.
    `prefkit.data.convert.joint_pairs` makes joint pairs from thumbs-up/down feedback, which has no two answers
    to one prompt. TRL: none (its DPOTrainer gives both completions one prompt).
    """
    return dpo(b, beta=beta)


@register_loss("dpop", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "lam": ">= 0"})
def dpop(b: PairLogps, *, beta: float = 0.1, lam: float = 50.0) -> LossOutput:
    """DPO-Positive (DPOP): DPO with a penalty, inside the sigmoid, whenever the policy puts less probability on
    the chosen completion than the reference does.

    Formula: loss = -log sigma(beta * (h - lam * max(0, ref_w - pi_w))), h = (pi_w - ref_w) - (pi_l - ref_l)

    Paper: Pal, Karkhanis, Dooley, Roberts, Naidu, White (2024), "Smaug: Fixing Failure Modes of Preference
    Optimisation with DPO-Positive", arXiv:2402.13228 (Eq. 3).

    Hyper-parameters:
        beta: DPO's beta (> 0); default 0.1, as every DPO variant here.
        lam: weight of the penalty (>= 0; 0 is DPO); default 50, the value the paper's fine-tuning runs use as
            its public reimplementations carry it (not re-read from the paper's text here).

    DPO can lower the likelihood of the chosen completion as long as the rejected one falls faster (the paper's
    failure mode on pairs a few tokens apart); the penalty is zero while ``pi_w >= ref_w`` and otherwise grows
    with ``lam``, so the loss stops rewarding that. TRL: none.

    Metrics: the DPO reward metrics and ``penalty`` (``max(0, ref_w - pi_w)``, per example).
    """
    beta = _positive("beta", beta, "dpop")
    lam = _number("lam", lam, "dpop")
    if lam < 0:
        raise ValueError(f"loss 'dpop': lam must be >= 0, got {lam}")
    lr_w, lr_l = _logratios(b, "dpop")
    penalty = (-lr_w).clamp(min=0.0)
    loss = -F.logsigmoid(beta * (lr_w - lr_l - lam * penalty))
    return _out(loss, beta, lr_w, lr_l, penalty=penalty)


@register_loss("step_dpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def step_dpo(b: PairLogps, *, beta: float = 0.4) -> LossOutput:
    """Step-DPO: DPO on one reasoning step, after a shared prefix of correct steps.

    Formula: loss = -log sigma(beta * h), h = (pi - ref)(s_w | x, s_<k) - (pi - ref)(s_l | x, s_<k)

    Paper: Lai, Tian, Chen, Yang, Peng, Jia (2024), "Step-DPO: Step-wise Preference Optimization for
    Long-chain Reasoning of LLMs", arXiv:2406.18629; the pairs may also come from search trees
    (Xie et al. 2024, "Monte Carlo Tree Search Boosts Reasoning via Iterative Preference Learning",
    arXiv:2405.00451).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.4, the paper's value for its 7B-72B models.

    The loss is DPO's; what makes it Step-DPO is the data: the prompt is the problem followed by the correct
    steps so far and the two completions are one correct and one wrong next step
    (`prefkit.data.convert.step_preference_pairs` mines them from stepwise records; `prefkit.online.search.prm_mcts`
    returns them from its tree). Difference from the paper: a prefkit completion ends with EOS, so the
    EOS after each step is scored too.

    TRL: no Step-DPO; ``DPOTrainer`` with ``loss_type="sigmoid"`` on such pairs computes the same numbers.
    """
    return dpo(b, beta=beta)


@register_loss("cdpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"})
def cdpo(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Conservative DPO: DPO against a soft label that assumes a flip rate ``eps``.

    Formula: loss = -(1 - eps) * log sigma(beta * h) - eps * log sigma(-beta * h)

    Paper: Mitchell (2023), "A note on DPO with noisy preferences & relationship to IPO"
    (technical note, https://ericmitchell.ai/cdpo.pdf; no arXiv id).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.
        label_smoothing: ``eps``, the assumed probability that a label is flipped, in [0, 0.5).
            The note fixes no value; 0.1 is the typical value also used for Robust DPO
            (TRL's documentation). ``eps = 0`` is exactly DPO.

    Note that cDPO is biased under label noise (its optimum is a finite margin); see
    ``robust_dpo`` for the unbiased correction.

    TRL 1.16: no longer offers label smoothing on ``loss_type="sigmoid"`` (older TRL did). The
    same batch-mean loss is obtained with ``loss_type=["sigmoid", "robust"]``,
    ``loss_weights=[2 * (1 - eps), -(1 - 2 * eps)]``, ``label_smoothing=eps``; at batch size 1
    it also equals TRL's ``aot`` / ``aot_unpaired`` with ``label_smoothing=eps``.
    """
    beta = _positive("beta", beta, "cdpo")
    eps = _in_range("label_smoothing", label_smoothing, "cdpo", 0.0, 0.5)
    lr_w, lr_l = _logratios(b, "cdpo")
    loss = _smoothed_logistic(beta * (lr_w - lr_l), eps)
    return _out(loss, beta, lr_w, lr_l)


@register_loss(
    "robust_dpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"}
)
def robust_dpo(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """Robust DPO (rDPO): an unbiased estimate of the clean DPO loss under random label flips.

    Formula: loss = ((1 - eps) * L(h) - eps * L(-h)) / (1 - 2 * eps), L(z) = -log sigma(beta * z)

    Paper: Chowdhury, Kini, Natarajan (2024), "Provably Robust DPO: Aligning Language Models
    with Noisy Feedback", arXiv:2403.00409.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.
        label_smoothing: ``eps``, the known flip rate of the labels, in [0, 0.5) (at 0.5 the
            estimator is undefined). Default 0.1, the typical value TRL documents for this loss.
            ``eps = 0`` is exactly DPO.

    The per-example loss can be negative (it is an unbiased correction, not a likelihood).

    TRL: ``loss_type="robust"`` with ``label_smoothing=eps``. Identical numerics. TRL only warns
    for eps outside [0, 0.5); we raise ``ValueError``.
    """
    beta = _positive("beta", beta, "robust_dpo")
    eps = _in_range("label_smoothing", label_smoothing, "robust_dpo", 0.0, 0.5)
    lr_w, lr_l = _logratios(b, "robust_dpo")
    z = beta * (lr_w - lr_l)
    loss = (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)
    return _out(loss, beta, lr_w, lr_l)


@register_loss("lcpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"})
def lcpo(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.1) -> LossOutput:
    """LCPO on DPO: each label weighted by the posterior probability that it is right (the E-step of an EM
    over a latent "this label is correct" variable), then DPO's likelihood of the label and of its reverse mixed
    by that weight (the M-step).

    Formula: loss = -w log sigma(beta * h) - (1 - w) log sigma(-beta * h), w = sg[(1 - eps) sigma(beta * h) /
    ((1 - eps) sigma(beta * h) + eps sigma(-beta * h))]

    Paper: Cao, Xu, Guang, Long, Bakker, Wang, Yu (2025), "Latent Collective Preference Optimization: A General
    Framework for Robust LLM Alignment", arXiv:2509.24159 (LCPO with DPO as the base loss, whose probabilistic
    model is sigma(beta * h)).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.
        label_smoothing: ``eps = 1 - eta``, the prior probability that a label is flipped, in [0, 0.5); default
            0.1. ``eps = 0`` is DPO.

    The weight ``w`` is computed from the current policy and held fixed (no gradient): a label the policy already
    agrees with keeps ``w`` near 1, one it confidently contradicts is down-weighted towards its reverse. Unlike
    ``cdpo`` (a fixed ``w = 1 - eps``) the weight adapts per pair. The paper also re-estimates ``eps`` as the
    mean posterior of a wrong label over the data; here ``eps`` is a setting, and the batch's estimate is logged
    as ``lcpo/flip_estimate`` to compare against it. TRL: none.
    """
    beta = _positive("beta", beta, "lcpo")
    eps = _in_range("label_smoothing", label_smoothing, "lcpo", 0.0, 0.5)
    lr_w, lr_l = _logratios(b, "lcpo")
    z = beta * (lr_w - lr_l)
    with torch.no_grad():  # w = sigma(z + log((1 - eps) / eps)): the posterior that the label is right
        w = torch.ones_like(z) if eps == 0 else torch.sigmoid(z + math.log((1.0 - eps) / eps))
    loss = -w * F.logsigmoid(z) - (1.0 - w) * F.logsigmoid(-z)
    return _out(loss, beta, lr_w, lr_l, **{"lcpo/label_weight": w, "lcpo/flip_estimate": 1.0 - w})


# --------------------------------------------------------------------------------------------
# squared / hinge / classification forms


@register_loss("ipo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def ipo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Identity Preference Optimization (IPO, the Psi-PO objective with identity Psi).

    Formula: loss = (lr_w / |y_w| - lr_l / |y_l| - 1 / (2 * beta))**2

    Paper: Azar, Rowland, Piot, Guo, Calandriello, Valko, Munos (2023), "A General Theoretical
    Paradigm to Understand Learning from Human Preferences", arXiv:2310.12036.

    Hyper-parameters:
        beta: the paper's regulariser ``tau`` (> 0); the target gap is ``1 / (2 * tau)``.
            Default 0.1 (TRL's default; the paper sweeps tau and fixes no single value).

    Length averaging: the log-ratios are divided by the completion token counts (clamped to
    >= 1). The paper writes sequence log-probs; TRL averages per token and reports that the IPO
    authors confirmed their results use this normalised form. We follow TRL here.

    TRL: ``loss_type="ipo"``, ``beta=tau``. Identical numerics; logged rewards are the
    *unnormalised* ``beta * lr`` as in TRL.
    """
    beta = _positive("beta", beta, "ipo")
    lr_w, lr_l = _logratios(b, "ipo")
    gap = lr_w / _safe_len(b.chosen_len) - lr_l / _safe_len(b.rejected_len)
    loss = (gap - 1.0 / (2.0 * beta)) ** 2
    return _out(loss, beta, lr_w, lr_l)


@register_loss("hinge", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def hinge(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """SLiC-style hinge (calibration) loss on reference-normalised likelihoods.

    Formula: loss = max(0, 1 - beta * h)

    Paper: Zhao, Joshi, Liu, Khalman, Saleh, Liu (2023), "SLiC-HF: Sequence Likelihood
    Calibration with Human Feedback", arXiv:2305.10425; the reference-normalised form with
    margin 1/beta is from Liu, Zhao, Joshi, Khalman, Saleh, Liu, Liu (2023), "Statistical
    Rejection Sampling Improves Preference Optimization" (RSO), arXiv:2309.06657.

    Hyper-parameters:
        beta: inverse margin (> 0): the loss is zero once ``h >= 1 / beta``. Default 0.1
            (TRL's default).

    SLiC-HF's own calibration loss uses raw policy log-probs with margin delta and an extra
    SFT regulariser; this is the normalised hinge as RSO and TRL define it.

    TRL: ``loss_type="hinge"``, same ``beta``. Identical numerics.
    """
    beta = _positive("beta", beta, "hinge")
    lr_w, lr_l = _logratios(b, "hinge")
    loss = torch.relu(1.0 - beta * (lr_w - lr_l))
    return _out(loss, beta, lr_w, lr_l)


@register_loss("exo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "label_smoothing": "(0, 0.5)"})
def exo(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 1e-3) -> LossOutput:
    """EXO (efficient exact optimization), pairwise form: reverse KL from the policy's pair
    distribution to a smoothed label distribution.

    Formula: loss = q_w * (log q_w - log(1 - eps)) + q_l * (log q_l - log eps),
    q_w = sigma(beta * h), q_l = sigma(-beta * h)

    Paper: Ji et al. (2024), "Towards Efficient Exact Optimization
    of Language Model Alignment", arXiv:2402.00856 (EXO-pref with K = 2).

    Hyper-parameters:
        beta: the policy temperature ``beta_pi`` (> 0); default 0.1 (TRL's default).
        label_smoothing: ``eps`` > 0, the probability mass the target puts on the rejected
            completion; the paper recommends 1e-3 (our default). Must lie in (0, 0.5).

    TRL: ``loss_type="exo_pair"`` with ``label_smoothing=eps``. Identical numerics (TRL
    raises for eps == 0 too).
    """
    beta = _positive("beta", beta, "exo")
    eps = _in_range("label_smoothing", label_smoothing, "exo", 0.0, 0.5, lo_open=True)
    lr_w, lr_l = _logratios(b, "exo")
    z = beta * (lr_w - lr_l)
    loss = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
        F.logsigmoid(-z) - math.log(eps)
    )
    return _out(loss, beta, lr_w, lr_l)


@register_loss("nca", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def nca(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Noise Contrastive Alignment (NCA), pairwise form.

    Formula: loss = -log sigma(r_w) - 0.5 * log sigma(-r_w) - 0.5 * log sigma(-r_l),
    r = beta * (pi - ref)

    Paper: Chen et al. (2024), "Noise Contrastive Alignment of Language Models with
    Explicit Rewards", arXiv:2402.05369.

    Hyper-parameters:
        beta: reward scale (> 0); default 0.1 (TRL's default).

    Unlike DPO, NCA acts on absolute rewards: the chosen reward is pushed towards the
    stationary point ``r_w = log 2`` (raising ``pi_w`` beyond it increases the loss) and the
    rejected reward is always pushed down.

    TRL: ``loss_type="nca_pair"``, same ``beta``. Identical numerics.
    """
    beta = _positive("beta", beta, "nca")
    lr_w, lr_l = _logratios(b, "nca")
    r_w, r_l = beta * lr_w, beta * lr_l
    loss = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    return _out(loss, beta, lr_w, lr_l)


@register_loss("bco_pair", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "reward_shift": "any"})
def bco_pair(b: PairLogps, *, beta: float = 0.1, reward_shift: float = 0.0) -> LossOutput:
    """Binary Classifier Optimization on paired data: chosen as class 1, rejected as class 0.

    Formula: loss = -log sigma(r_w - delta) - log sigma(-(r_l - delta)), r = beta * (pi - ref)

    Paper: Jung et al. (2024), "Binary Classifier Optimization for Large
    Language Model Alignment", arXiv:2404.04656.

    Hyper-parameters:
        beta: reward scale (> 0); default 0.1 (TRL's default).
        reward_shift: ``delta``. The paper sets it to a running mean of the rewards of both
            classes, which a stateless loss cannot keep; a trainer may pass the current
            estimate here. Default 0.0, which is TRL 1.16's ``bco_pair``.

    TRL 1.16: ``loss_type="bco_pair"`` has no reward shift (older TRL versions kept a running
    mean). With ``reward_shift=0`` our numbers are identical.
    """
    beta = _positive("beta", beta, "bco_pair")
    delta = _number("reward_shift", reward_shift, "bco_pair")
    lr_w, lr_l = _logratios(b, "bco_pair")
    loss = -F.logsigmoid(beta * lr_w - delta) - F.logsigmoid(-(beta * lr_l - delta))
    return _out(loss, beta, lr_w, lr_l)


@register_loss("sppo_hard", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def sppo_hard(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Self-Play Preference Optimization with hard win probabilities (1 for the chosen, 0 for
    the rejected completion).

    Formula: loss = (lr_w - 1 / (2 * beta))**2 + (lr_l + 1 / (2 * beta))**2

    Paper: Wu, Sun, Yuan, Ji, Yang, Gu (2024), "Self-Play Preference Optimization for Language
    Model Alignment", arXiv:2405.00675.

    Hyper-parameters:
        beta: inverse of the paper's step size ``eta`` (``eta = 1 / beta``, > 0); the paper's
            square loss ``(lr - eta * (P - 1/2))**2`` with P in {0, 1} gives the targets
            ``+-1 / (2 * beta)``. Default 0.1 (TRL's default). The reference plays the role of
            the previous self-play iterate ``pi_t``.

    The two squares pull ``lr_w`` to ``+1/(2 beta)`` and ``lr_l`` to ``-1/(2 beta)``; past those
    targets the gradients reverse sign.

    TRL: ``loss_type="sppo_hard"``, same ``beta``. Identical numerics. The paper's main method
    uses soft probabilities from a preference model, which this pairwise form does not cover.
    """
    beta = _positive("beta", beta, "sppo_hard")
    lr_w, lr_l = _logratios(b, "sppo_hard")
    target = 0.5 / beta
    loss = (lr_w - target) ** 2 + (lr_l + target) ** 2
    return _out(loss, beta, lr_w, lr_l)


# --------------------------------------------------------------------------------------------
# distributional (optimal-transport) alignment


@register_loss(
    "aot",
    kind="pairwise",
    needs_reference=True,
    batch_coupled=True,
    ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"},
)
def aot(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, unpaired form: the distribution of chosen log-ratios
    should dominate (first order) the distribution of rejected log-ratios.

    Formula: loss_i = -(1 - eps) * log sigma(beta * d_i) - eps * log sigma(-beta * d_i),
    d = sort(lr_w) - sort(lr_l) (each sorted ascending over the batch)

    Paper: Melnyk et al. (2024), "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882.

    Hyper-parameters:
        beta: scale of the logistic relaxation of the dominance violation (> 0); default 0.1
            (TRL's default).
        label_smoothing: ``eps`` in [0, 0.5); default 0.0 (TRL's default).

    Naming: the paper's headline method aligns *unpaired* positive and negative samples, so
    ``aot`` here is that form; the paired variant is ``aot_pair``. TRL names them the other
    way round: our ``aot`` is TRL's ``loss_type="aot_unpaired"``, our ``aot_pair`` is TRL's
    ``loss_type="aot"``. Numerics identical to TRL's ``aot_unpaired`` with the same ``beta`` and
    ``label_smoothing``.

    Because the batch is sorted, ``loss[i]`` belongs to the i-th sorted position (quantile), not
    to pair i; only its mean over the batch has a meaning, and per-pair weights should not be
    applied. The reward metrics are per pair (unsorted), as TRL logs them.
    """
    beta = _positive("beta", beta, "aot")
    eps = _in_range("label_smoothing", label_smoothing, "aot", 0.0, 0.5)
    lr_w, lr_l = _logratios(b, "aot")
    d = torch.sort(lr_w, dim=0).values - torch.sort(lr_l, dim=0).values
    loss = _smoothed_logistic(beta * d, eps)
    return _out(loss, beta, lr_w, lr_l)


@register_loss(
    "aot_pair",
    kind="pairwise",
    needs_reference=True,
    batch_coupled=True,
    ranges={"beta": "> 0", "label_smoothing": "[0, 0.5)"},
)
def aot_pair(b: PairLogps, *, beta: float = 0.1, label_smoothing: float = 0.0) -> LossOutput:
    """Alignment via Optimal Transport, paired form: the distribution of the policy's
    chosen-minus-rejected log-prob margins should dominate the reference's.

    Formula: loss_i = -(1 - eps) * log sigma(beta * d_i) - eps * log sigma(-beta * d_i),
    d = sort(pi_w - pi_l) - sort(ref_w - ref_l) (each sorted ascending over the batch)

    Paper: Melnyk et al. (2024), "Distributional Preference Alignment of LLMs via Optimal Transport",
    arXiv:2406.05882 (AOT paired).

    Hyper-parameters:
        beta: scale of the logistic relaxation (> 0); default 0.1 (TRL's default).
        label_smoothing: ``eps`` in [0, 0.5); default 0.0 (TRL's default).

    TRL: ``loss_type="aot"`` (TRL's ``aot`` is this paired form; see ``aot`` for the naming).
    Identical numerics. As for ``aot``, ``loss[i]`` is the i-th sorted position, not pair i;
    reward metrics are per pair.
    """
    beta = _positive("beta", beta, "aot_pair")
    eps = _in_range("label_smoothing", label_smoothing, "aot_pair", 0.0, 0.5)
    lr_w, lr_l = _logratios(b, "aot_pair")
    policy_margin = b.policy_chosen - b.policy_rejected
    ref_margin = b.ref_chosen - b.ref_rejected
    d = torch.sort(policy_margin, dim=0).values - torch.sort(ref_margin, dim=0).values
    loss = _smoothed_logistic(beta * d, eps)
    return _out(loss, beta, lr_w, lr_l)


# --------------------------------------------------------------------------------------------
# anchored and discovered objectives


@register_loss("apo_zero", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def apo_zero(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Anchored Preference Optimization, APO-zero: raise the chosen and lower the rejected
    likelihood, each anchored at the reference.

    Formula: loss = 1 - sigma(beta * lr_w) + sigma(beta * lr_l)

    Paper: D'Oosterlinck et al. (2024), "Anchored
    Preference Optimization and Contrastive Revisions: Addressing Underspecification in
    Alignment", arXiv:2408.06266 (Eq. 7).

    Hyper-parameters:
        beta: reward scale (> 0); default 0.1 (the paper's and TRL's value).

    Use when the chosen outputs are better than the model's own. The paper writes
    ``-sigma(r_w) + sigma(r_l)``; the constant 1 (as in TRL) only keeps the loss in [0, 2].

    TRL: ``loss_type="apo_zero"``, same ``beta``. Identical numerics.
    """
    beta = _positive("beta", beta, "apo_zero")
    lr_w, lr_l = _logratios(b, "apo_zero")
    loss = 1.0 - torch.sigmoid(beta * lr_w) + torch.sigmoid(beta * lr_l)
    return _out(loss, beta, lr_w, lr_l)


@register_loss("apo_down", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def apo_down(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Anchored Preference Optimization, APO-down: lower the chosen likelihood, and the
    rejected one more, so the margin still grows.

    Formula: loss = sigma(beta * lr_w) + 1 - sigma(beta * (lr_w - lr_l))

    Paper: D'Oosterlinck et al. (2024), "Anchored
    Preference Optimization and Contrastive Revisions: Addressing Underspecification in
    Alignment", arXiv:2408.06266 (Eq. 8).

    Hyper-parameters:
        beta: reward scale (> 0); default 0.1 (the paper's and TRL's value).

    Use when the model's own outputs are better than the chosen ones. Raising ``pi_l`` always
    raises the loss; raising ``pi_w`` raises it too where ``sigma'(beta lr_w) >
    sigma'(beta h)`` (e.g. near the reference with a positive margin), which is the intended
    downward pull on the chosen completion. The constant 1 (as in TRL) keeps the loss >= 0.

    TRL: ``loss_type="apo_down"``, same ``beta``. Identical numerics.
    """
    beta = _positive("beta", beta, "apo_down")
    lr_w, lr_l = _logratios(b, "apo_down")
    loss = torch.sigmoid(beta * lr_w) + 1.0 - torch.sigmoid(beta * (lr_w - lr_l))
    return _out(loss, beta, lr_w, lr_l)


@register_loss("discopop", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "tau": "> 0"})
def discopop(b: PairLogps, *, beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP: the log-ratio modulated loss (LRML), a blend of the logistic (DPO) and the
    exponential loss gated by the scaled margin.

    Formula: loss = (1 - m) * (-log sigma(z)) + m * exp(-z), z = beta * h, m = sigma(z / tau)

    Paper: Chris Lu, Holt, Fanconi, Chan, Foerster, van der Schaar, Lange (2024), "Discovering
    Preference Optimization Algorithms with and for Large Language Models", arXiv:2406.08414.

    Hyper-parameters:
        beta: (> 0); default 0.1 (TRL's default).
        tau: temperature of the gate (> 0); default 0.05, the paper's recommended value.

    The loss is non-convex and not monotone: in a narrow band around ``z = 0`` (about
    ``|z| < 0.1`` at tau = 0.05) its derivative in ``z`` is positive.

    TRL: ``loss_type="discopop"`` with ``discopop_tau=tau``. Same values wherever TRL's are finite;
    computed in log space, so loss and gradient stay finite where TRL's form gives 0 * inf = NaN
    (``z < -88`` in float32).
    """
    beta = _positive("beta", beta, "discopop")
    tau = _positive("tau", tau, "discopop")
    lr_w, lr_l = _logratios(b, "discopop")
    z = beta * (lr_w - lr_l)
    # In log space: m * exp(-z) = exp(log sigma(z / tau) - z) and 1 - m = exp(log sigma(-z / tau)), so
    # neither side is 0 * inf (NaN in float32 once z < -88) for any margin.
    loss = torch.exp(F.logsigmoid(-z / tau)) * F.softplus(-z) + torch.exp(F.logsigmoid(z / tau) - z)
    return _out(loss, beta, lr_w, lr_l)


# --------------------------------------------------------------------------------------------
# length-aware variants


@register_loss("length_dpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0", "alpha": ">= 0"})
def length_dpo(b: PairLogps, *, beta: float = 0.1, alpha: float = 0.01) -> LossOutput:
    """Length-regularised DPO (R-DPO): DPO with a length term in the margin, so that part of a
    preference for the longer answer is explained by length instead of by the policy.

    Formula: loss = -log sigma(beta * h + alpha * (|y_w| - |y_l|))

    Paper: Park, Rafailov, Ermon, Finn (2024), "Disentangling Length from Quality in Direct
    Preference Optimization", arXiv:2403.19159.

    Hyper-parameters:
        alpha: length-penalty strength (>= 0), per token. The paper derives the term from the
            objective ``r(x, y) - alpha * |y|`` and tunes alpha per dataset, with no single
            default; 0.01 is our default (a common reimplementation choice). ``alpha = 0`` is
            exactly DPO.
        beta: as in DPO (> 0); default 0.1.

    Sign: the paper adds ``+ alpha * (|y_w| - |y_l|)`` inside the sigmoid (from
    ``r = beta * log(pi/pi_ref) + alpha * |y|``): a pair whose chosen answer is longer gets a
    larger logit, hence a smaller gradient, which is what removes the length incentive. We
    follow the paper's sign; ``- alpha * (|y_w| - |y_l|)`` would instead amplify the length bias.

    TRL 1.16: no counterpart.
    """
    beta = _positive("beta", beta, "length_dpo")
    alpha = _number("alpha", alpha, "length_dpo")
    if alpha < 0:
        raise ValueError(f"loss 'length_dpo': alpha must be >= 0, got {alpha}")
    lr_w, lr_l = _logratios(b, "length_dpo")
    logits = beta * (lr_w - lr_l) + alpha * (b.chosen_len - b.rejected_len)
    loss = -F.logsigmoid(logits)
    return _out(loss, beta, lr_w, lr_l)


@register_loss("length_normalized_dpo", kind="pairwise", needs_reference=True, ranges={"beta": "> 0"})
def length_normalized_dpo(b: PairLogps, *, beta: float = 5.0) -> LossOutput:
    """Length-normalised DPO: DPO on per-token average log-ratios.

    Formula: loss = -log sigma(beta * (lr_w / |y_w| - lr_l / |y_l|))

    Paper: Lambert et al. (2024), "Tulu 3: Pushing Frontiers in Open Language Model
    Post-Training", arXiv:2411.15124.

    Hyper-parameters:
        beta: (> 0). Default 5.0, the value Tulu 3 used with this normalised form (per-token
            log-ratios are ~|y| times smaller than summed ones, so beta is correspondingly
            larger). TRL's generic default is 0.1: set ``beta`` explicitly when comparing.

    Token counts are clamped to >= 1. Logged rewards are the unnormalised ``beta * lr`` as in
    TRL.

    TRL: ``loss_type="sigmoid_norm"``, same ``beta``. Identical numerics.
    """
    beta = _positive("beta", beta, "length_normalized_dpo")
    lr_w, lr_l = _logratios(b, "length_normalized_dpo")
    gap = lr_w / _safe_len(b.chosen_len) - lr_l / _safe_len(b.rejected_len)
    loss = -F.logsigmoid(beta * gap)
    return _out(loss, beta, lr_w, lr_l)


def _ld_weighted(tokens: Tensor, mask: Tensor, shared: Tensor, alpha: float) -> Tensor:
    """Sum of token log-probs with weight 1 up to position ``shared`` and ``alpha`` beyond."""
    pos = torch.cumsum(mask, dim=1)  # 1-based index among completion tokens
    head = (pos <= shared.unsqueeze(1)).to(tokens.dtype) * mask
    tail = mask - head
    return (tokens * head).sum(dim=1) + alpha * (tokens * tail).sum(dim=1)


@register_loss(
    "ld_dpo", kind="pairwise", needs_reference=True, needs_tokens=True, ranges={"beta": "> 0", "alpha": "[0, 1]"}
)
def ld_dpo(b: PairLogps, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """Length-desensitised DPO (LD-DPO): token log-probs beyond the shorter completion's length
    (the "public length") are down-weighted by alpha, for policy and reference alike.

    Formula: loss = -log sigma(beta * (lr'_w - lr'_l)), lr' = log' pi - log' pi_ref,
    log' p(y) = sum_{t <= l_p} log p(y_t) + alpha * sum_{t > l_p} log p(y_t),
    l_p = min(|y_w|, |y_l|)

    Paper: Liu, Bai, Han, Weng, Xu, Cao, Wang, Cai (2024), "Length Desensitization in Direct
    Preference Optimization", arXiv:2409.06411.

    Hyper-parameters:
        alpha: weight of the excess tokens, in [0, 1]. ``alpha = 1`` is exactly DPO and
            ``alpha = 0`` drops the excess tokens. The paper tunes alpha per model and gives no
            single default; 0.5 is our default. (TRL's ``ld_alpha`` defaults to None, i.e. 1.)
        beta: as in DPO (> 0); default 0.1.

    Reads ``policy_*_tokens``, ``ref_*_tokens`` and ``*_mask``; lengths are counted from the
    masks. The summed ``policy_*`` / ``ref_*`` fields are not used.

    TRL: ``loss_type="sigmoid"`` with ``ld_alpha=alpha``. Identical numerics, including the
    logged rewards, which TRL also computes from the weighted log-probs. Logged ``logps/chosen``
    and ``logps/rejected`` differ on purpose: TRL logs the LD-weighted log-probs there, while
    ``PreferenceTrainer`` always logs the plain summed completion log-probs, whatever the loss.
    """
    beta = _positive("beta", beta, "ld_dpo")
    alpha = _in_range("alpha", alpha, "ld_dpo", 0.0, 1.0, hi_open=False)
    require_reference(b, "ld_dpo")
    _require_tokens(
        b,
        "ld_dpo",
        (
            "policy_chosen_tokens",
            "policy_rejected_tokens",
            "ref_chosen_tokens",
            "ref_rejected_tokens",
            "chosen_mask",
            "rejected_mask",
        ),
    )
    cm = b.chosen_mask.to(b.policy_chosen_tokens.dtype)
    rm = b.rejected_mask.to(b.policy_rejected_tokens.dtype)
    shared = torch.minimum(cm.sum(dim=1), rm.sum(dim=1))
    lr_w = _ld_weighted(b.policy_chosen_tokens, cm, shared, alpha) - _ld_weighted(
        b.ref_chosen_tokens, cm, shared, alpha
    )
    lr_l = _ld_weighted(b.policy_rejected_tokens, rm, shared, alpha) - _ld_weighted(
        b.ref_rejected_tokens, rm, shared, alpha
    )
    loss = -F.logsigmoid(beta * (lr_w - lr_l))
    return _out(loss, beta, lr_w, lr_l)


# --------------------------------------------------------------------------------------------
# divergence and weighting variants


@register_loss(
    "f_dpo",
    kind="pairwise",
    needs_reference=True,
    ranges={
        "beta": "> 0",
        "divergence": "one of reverse_kl, forward_kl, js_divergence, alpha_divergence",
        "alpha": "[0, 1]",
    },
)
def f_dpo(b: PairLogps, *, beta: float = 0.1, divergence: str = "reverse_kl", alpha: float = 0.5) -> LossOutput:
    """f-DPO: DPO under an f-divergence regulariser; the log-ratio becomes ``f'(pi / pi_ref)``.

    Formula: loss = -log sigma(beta * (f'(u_w) - f'(u_l))), u = pi / pi_ref, with
    f'(u) = log u (reverse_kl), 1 - 1/u (forward_kl), log(2u / (1 + u)) (js_divergence),
    (1 - u**(-alpha)) / alpha (alpha_divergence)

    Paper: Wang, Jiang, Yang, Liu, Chen (2023), "Beyond Reverse KL: Generalizing Direct
    Preference Optimization with Diverse Divergence Constraints", arXiv:2309.16240.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.
        divergence: one of ``reverse_kl`` (default; exactly DPO), ``forward_kl``,
            ``js_divergence``, ``alpha_divergence``.
        alpha: the alpha-divergence coefficient in the paper's parameterisation, in [0, 1];
            default 0.5 (the paper's and TRL's default). ``alpha -> 0`` is reverse KL,
            ``alpha = 1`` is forward KL. Ignored for the other divergences.

    Constant terms of f' cancel in the difference and are dropped. Exponents are clamped
    (at 80 in float32) so the ratio stays finite, as TRL does for the alpha-divergence.

    TRL 1.16: ``loss_type="sigmoid"`` with ``f_divergence_type=divergence``. TRL's
    ``f_alpha_divergence_coef`` uses the opposite parameterisation,
    ``f'(u) = (u**(c - 1) - 1) / (c - 1)``, so our ``alpha`` equals TRL's ``1 - c``; the two
    coincide at the default 0.5. For parity set ``f_alpha_divergence_coef = 1 - alpha``. Logged
    rewards are ``beta * log(pi / pi_ref)`` (not ``beta * f'``), as in TRL.
    """
    beta = _positive("beta", beta, "f_dpo")
    if not isinstance(divergence, str) or divergence not in DIVERGENCES:
        raise ValueError(f"loss 'f_dpo': unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
    try:
        check_divergence(divergence, alpha)
    except ValueError as err:
        raise ValueError(f"loss 'f_dpo': {err}") from None
    lr_w, lr_l = _logratios(b, "f_dpo")
    s_w, s_l = f_score(lr_w, divergence, alpha), f_score(lr_l, divergence, alpha)
    loss = -F.logsigmoid(beta * (s_w - s_l))
    return _out(loss, beta, lr_w, lr_l)


def _wpo_weight(tokens: Tensor, logsumsq: Tensor, mask: Tensor) -> Tensor:
    """``exp(mean_t (log p(y_t) - log sum_v p(v)^2))`` over completion tokens, detached."""
    m = mask.to(tokens.dtype)
    aligned = ((tokens.detach() - logsumsq.detach()) * m).sum(dim=1)
    return torch.exp(aligned / m.sum(dim=1).clamp(min=1.0))


@register_loss("wpo", kind="pairwise", needs_reference=True, needs_tokens=True, ranges={"beta": "> 0"})
def wpo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """Weighted Preference Optimization: the DPO loss of each pair weighted by how likely the
    current policy is to generate both completions (a correction toward on-policy data).

    Formula: loss = w(y_w) * w(y_l) * (-log sigma(beta * h)),
    w(y) = exp((1/|y|) * sum_t (log pi(y_t | ...) - log sum_v pi(v | ...)**2)), w detached

    Paper: Zhou et al. (2024),
    "WPO: Enhancing RLHF with Weighted Preference Optimization", arXiv:2406.11827.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.

    The weight uses the paper's "sampled alignment": each token probability is divided by
    ``sum_v pi(v)^2``, the probability the policy assigns to its own samples at that step. The
    weights carry no gradient (the paper treats them as importance weights). Reads
    ``policy_*_tokens``, ``*_mask`` and ``*_logsumsq``. Extra metrics: ``wpo/chosen_weight``,
    ``wpo/rejected_weight``.

    TRL: ``loss_type="sigmoid"`` with ``use_weighting=True``. Identical numerics.
    """
    beta = _positive("beta", beta, "wpo")
    _require_tokens(
        b,
        "wpo",
        (
            "policy_chosen_tokens",
            "policy_rejected_tokens",
            "chosen_mask",
            "rejected_mask",
            "chosen_logsumsq",
            "rejected_logsumsq",
        ),
    )
    lr_w, lr_l = _logratios(b, "wpo")
    w_c = _wpo_weight(b.policy_chosen_tokens, b.chosen_logsumsq, b.chosen_mask)
    w_r = _wpo_weight(b.policy_rejected_tokens, b.rejected_logsumsq, b.rejected_mask)
    loss = -F.logsigmoid(beta * (lr_w - lr_l)) * (w_c * w_r)
    return _out(loss, beta, lr_w, lr_l, **{"wpo/chosen_weight": w_c, "wpo/rejected_weight": w_r})


__all__ = [
    "aot",
    "aot_pair",
    "apo_down",
    "apo_zero",
    "bco_pair",
    "cdpo",
    "discopop",
    "dpo",
    "dpop",
    "exo",
    "f_dpo",
    "hinge",
    "ipo",
    "jpo",
    "lcpo",
    "ld_dpo",
    "length_dpo",
    "length_normalized_dpo",
    "nca",
    "robust_dpo",
    "rpo",
    "sppo_hard",
    "step_dpo",
    "wpo",
]
