"""Token-level preference losses: DPO's margin assembled from per-token terms.

DPO scores a completion by its summed log-ratio ``sum_t (log pi - log pi_ref)(y_t)``. Token-level methods change
what each token contributes: a weight per token, and a term for how far the policy's whole next-token
distribution has moved from the reference's at each position (the full-vocabulary KL, which the log-prob engine
computes chunk by chunk: ``PairLogps.chosen_kl`` / ``rejected_kl``, filled for losses registered with
``needs_kl=True``). `token_dpo` is the one place this is assembled; a token-level method is a function that
computes its weights (or none) and calls it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from prefkit.losses.base import LossOutput, PairLogps, pair_metrics, register_loss, require_reference

__all__ = ["mapo", "sequence_kl", "sparsepo", "tdpo1", "tdpo2", "token_dpo", "weighted_log_ratios"]

_TOKENS = ("policy_chosen_tokens", "policy_rejected_tokens", "ref_chosen_tokens", "ref_rejected_tokens")


def _need(b: PairLogps, loss: str, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if getattr(b, f) is None]
    if missing:
        raise ValueError(
            f"loss {loss!r} needs {missing}, but the batch has none (token-level losses need per-token log-probs "
            "and, with needs_kl, the reference's per-token KL: the plain layout without share_prompt, packing or "
            "precompute_ref_logps)"
        )


def weighted_log_ratios(
    b: PairLogps, w_chosen: Tensor | None = None, w_rejected: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """``(sum_t w_t (pi - ref)(y_w,t), sum_t w_t (pi - ref)(y_l,t))`` over each completion's tokens, ``[B]`` each;
    weights ``[B, T]`` in the per-token layout (None: 1 on every token, i.e. DPO's log-ratios)."""
    require_reference(b, "token-level")
    out = []
    for pol, ref, mask, w in (
        (b.policy_chosen_tokens, b.ref_chosen_tokens, b.chosen_mask, w_chosen),
        (b.policy_rejected_tokens, b.ref_rejected_tokens, b.rejected_mask, w_rejected),
    ):
        ratio = (pol - ref) * mask
        out.append((ratio if w is None else ratio * w).sum(-1))
    return out[0], out[1]


def sequence_kl(
    b: PairLogps, w_chosen: Tensor | None = None, w_rejected: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The sequential KL of each completion, ``sum_t w_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t))``, ``[B]`` each."""
    out = []
    for kl, mask, w in ((b.chosen_kl, b.chosen_mask, w_chosen), (b.rejected_kl, b.rejected_mask, w_rejected)):
        kl = kl * mask
        out.append((kl if w is None else kl * w).sum(-1))
    return out[0], out[1]


def token_dpo(
    b: PairLogps,
    *,
    beta: float,
    loss: str,
    alpha: float = 0.0,
    detach_chosen_kl: bool = False,
    weights: tuple[Tensor, Tensor] | None = None,
    kl_weights: tuple[Tensor, Tensor] | None = None,
) -> LossOutput:
    """``-log sigma(beta * (h - alpha * (KL_l - KL_w)))``: DPO on weighted token log-ratios
    (`weighted_log_ratios`), minus ``alpha`` times the gap between the rejected and chosen sequential KL
    (`sequence_kl`, the chosen one detached with ``detach_chosen_kl``). ``alpha = 0`` with no weights is ``dpo``.
    Logged rewards: ``beta * (log-ratio + KL)`` per side (TDPO's reading of the implicit reward); metrics
    ``kl/chosen`` and ``kl/rejected`` (per example)."""
    if not beta > 0:
        raise ValueError(f"loss {loss!r}: beta must be > 0, got {beta}")
    if not alpha >= 0:
        raise ValueError(f"loss {loss!r}: alpha must be >= 0, got {alpha}")
    _need(b, loss, (*_TOKENS, "chosen_mask", "rejected_mask"))
    lr_w, lr_l = weighted_log_ratios(b, *(weights or (None, None)))
    metrics: dict[str, Tensor] = {}
    delta = lr_w.new_zeros(lr_w.shape)
    kl_w = kl_l = None
    if alpha:
        _need(b, loss, ("chosen_kl", "rejected_kl"))
        kl_w, kl_l = sequence_kl(b, *(kl_weights or (None, None)))
        delta = alpha * (kl_l - (kl_w.detach() if detach_chosen_kl else kl_w))
    out = -F.logsigmoid(beta * (lr_w - lr_l - delta))
    if kl_w is not None:
        metrics = pair_metrics(beta * (lr_w + kl_w), beta * (lr_l + kl_l))
        metrics["kl/chosen"], metrics["kl/rejected"] = kl_w.detach(), kl_l.detach()
    else:
        metrics = pair_metrics(beta * lr_w, beta * lr_l)
    return LossOutput(loss=out, metrics=metrics)


@register_loss("tdpo1", kind="pairwise", needs_tokens=True, needs_kl=True, ranges={"beta": "> 0"})
def tdpo1(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """TDPO1: DPO with the difference of the two completions' sequential KL divergences in the margin.

    Formula: loss = -log sigma(beta * h - beta * (SeqKL_l - SeqKL_w)),
    SeqKL = sum_t KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t))

    Paper: Zeng, Liu, Ma, Yang, Zhang, Wang (2024), "Token-level Direct Preference Optimization", ICML 2024,
    arXiv:2404.11999 (TDPO1).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1, the paper's.

    The KL is over the whole vocabulary at every completion position (the engine's ``kl_to``, chunked; the
    reference scores the batch first). TRL: none. Needs the plain layout: no share_prompt, packing or
    precompute_ref_logps. Logged rewards are ``beta * (log-ratio + SeqKL)``, as the paper's code logs them.
    """
    return token_dpo(b, beta=beta, alpha=1.0, loss="tdpo1")


@register_loss("tdpo2", kind="pairwise", needs_tokens=True, needs_kl=True, ranges={"beta": "> 0", "alpha": ">= 0"})
def tdpo2(b: PairLogps, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """TDPO2: TDPO1 with the KL gap scaled by alpha and the chosen completion's KL held fixed (no gradient), so
    the loss pulls the rejected completion's distribution back towards the reference without pushing the chosen
    one's away.

    Formula: loss = -log sigma(beta * h - alpha * beta * (SeqKL_l - sg(SeqKL_w))), sg = stop-gradient

    Paper: Zeng, Liu, Ma, Yang, Zhang, Wang (2024), "Token-level Direct Preference Optimization", ICML 2024,
    arXiv:2404.11999 (TDPO2, the variant the paper recommends).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.
        alpha: weight of the KL gap (>= 0; 0 is DPO); default 0.5, the paper's.

    As ``tdpo1``: full-vocabulary KL, plain layout only; TRL: none.
    """
    return token_dpo(b, beta=beta, alpha=alpha, detach_chosen_kl=True, loss="tdpo2")


_MASKS = ("chosen_weights", "rejected_weights", "chosen_kl_weights", "rejected_kl_weights")


def _masked_tdpo(b: PairLogps, *, beta: float, loss: str, l1_reward: float = 0.0, l1_kl: float = 0.0) -> LossOutput:
    """TDPO1 with the batch's token masks on the log-ratios and on the KL terms, plus the masks' L1 norms."""
    _need(b, loss, _MASKS)
    rw = (b.chosen_weights, b.rejected_weights)
    kl = (b.chosen_kl_weights, b.rejected_kl_weights)
    out = token_dpo(b, beta=beta, alpha=1.0, weights=rw, kl_weights=kl, loss=loss)
    masks = (b.chosen_mask, b.rejected_mask)
    norm_rw = sum((w * m).sum(-1) for w, m in zip(rw, masks))  # the masks are >= 0: their L1 norms
    norm_kl = sum((w * m).sum(-1) for w, m in zip(kl, masks))
    loss_value = out.loss + l1_reward * norm_rw + l1_kl * norm_kl
    tokens = b.chosen_mask.sum(-1) + b.rejected_mask.sum(-1)
    zero = sum(((w == 0) * m).sum(-1) for w, m in zip(rw, masks))
    metrics = dict(out.metrics)
    metrics["mask/reward_mean"] = (norm_rw / tokens.clamp(min=1)).detach()
    metrics["mask/kl_mean"] = (norm_kl / tokens.clamp(min=1)).detach()
    metrics["mask/reward_sparsity"] = (zero / tokens.clamp(min=1)).detach()
    return LossOutput(loss=loss_value, metrics=metrics)


@register_loss(
    "sparsepo",
    kind="pairwise",
    needs_tokens=True,
    needs_kl=True,
    token_masks="learned",
    ranges={
        "beta": "> 0",
        "l1_reward": ">= 0",
        "l1_kl": ">= 0",
        "independent": "true or false",
        "mask_dropout": "[0, 1)",
    },
)
def sparsepo(
    b: PairLogps,
    *,
    beta: float = 0.1,
    l1_reward: float = 0.0,
    l1_kl: float = 0.0,
    independent: bool = False,
    mask_dropout: float = 0.01,
) -> LossOutput:
    """SparsePO: TDPO1 with learned per-token masks on the log-ratios (m_u) and on the sequential KL (m_d), made
    sparse by ReLU and optional L1 penalties.

    Formula: loss = -log sigma(beta * (sum_t m_u (pi - ref)(y_w,t) - sum_t m_u (pi - ref)(y_l,t) + sum_t m_d KL_t(y_w)
    - sum_t m_d KL_t(y_l))) + l1_reward * (|m_u(y_w)|_1 + |m_u(y_l)|_1) + l1_kl * (|m_d(y_w)|_1 + |m_d(y_l)|_1),
    KL_t = KL(pi_ref(.|x, y_<t) || pi(.|x, y_<t)), masks m >= 0 from the reference's hidden states

    Paper: Christopoulou, Cardenas, Lampouras, Bou-Ammar, Wang (2024), "SparsePO: Controlling Preference Alignment
    of LLMs via Sparse Token Masks", arXiv:2410.05102.

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1 (the paper's HH setting; 0.8 for IMDB and TL;DR).
        l1_reward, l1_kl: L1 weights on the reward and KL masks (>= 0); default 0, the code's default (0.001 each
            in the paper's HH "common" run).
        independent: one mask network for the reward term and another for the KL term (the paper's
            "sparse-indp"); default false, one mask for both ("sparse-common").
        mask_dropout: dropout inside the mask network; default 0.01, the code's default.

    The masks are `prefkit.models.token_masks.SparseTokenMask` on the reference's hidden states of every layer
    (its ``mask_model="simple_all"``), trained with the policy: the trainer attaches the network to the policy as
    ``prefkit_token_mask`` (so the optimizer, checkpoints and exact resume carry it) and saves it beside the final
    model as ``token_mask.safetensors``. The code's separate mask weight decay (0.01) is not reproduced: the mask
    takes the run's ``weight_decay``. Refused with LoRA and under several processes (DDP cannot reduce the gradients
    of a mask used outside the policy's forward; ``mapo`` runs there). As ``tdpo1``: full-vocabulary KL, plain layout
    only. TRL: none. Logged: ``mask/reward_mean`` and ``mask/kl_mean`` (mean weight per token),
    ``mask/reward_sparsity`` (the share of completion tokens with weight 0).
    """
    return _masked_tdpo(b, beta=beta, loss="sparsepo", l1_reward=l1_reward, l1_kl=l1_kl)


@register_loss(
    "mapo", kind="pairwise", needs_tokens=True, needs_kl=True, token_masks="activations", ranges={"beta": "> 0"}
)
def mapo(b: PairLogps, *, beta: float = 0.1) -> LossOutput:
    """MaPO: TDPO1 with one parameter-free mask per token, from the reference's activations, on both the log-ratios
    and the sequential KL (SparsePO's activation-mask baseline).

    Formula: loss = -log sigma(beta * (sum_t m (pi - ref)(y_w,t) - sum_t m (pi - ref)(y_l,t) + sum_t m KL_t(y_w)
    - sum_t m KL_t(y_l))), m = mean over layers of minmax(znorm(mean_h(hidden state))) over the completion

    Paper: Christopoulou, Cardenas, Lampouras, Bou-Ammar, Wang (2024), "SparsePO: Controlling Preference Alignment
    of LLMs via Sparse Token Masks", arXiv:2410.05102 (MaPO, the activation-based masks).

    Hyper-parameters:
        beta: as in DPO (> 0); default 0.1.

    The mask is `prefkit.models.token_masks.activation_mask` on the reference's decoder-layer outputs (the paper
    also hooks attention and MLP internals with ``activation_hook="all"``; prefkit reads the residual stream, which
    every causal LM exposes). As ``tdpo1``: full-vocabulary KL, plain layout only; TRL: none.
    """
    return _masked_tdpo(b, beta=beta, loss="mapo")
