"""Losses of pairwise judges (kind ``"judge"``): preference models that score a pair directly.

The batch is a `prefkit.losses.base.PreferenceLogits`: the judge's logit that the chosen
response beats the rejected one (for prefkit's GPM, ``s(chosen > rejected) / beta``), and an
optional per-pair margin from the data.
"""

from __future__ import annotations

import torch.nn.functional as F

from prefkit.losses.base import LossOutput, PreferenceLogits, register_loss


@register_loss("gpm", kind="judge", needs_reference=False, ranges={"use_margin": "true or false"})
def gpm(b: PreferenceLogits, *, use_margin: bool = False) -> LossOutput:
    """General preference model loss: negative log-likelihood of the observed preference.

    Formula: loss = -log sigma(s(y_w > y_l | x) / beta - m), s = <R v_w, v_l> with R skew-symmetric;
    the judge's logit is s / beta (GeneralPreferenceModel.compare divides by its config.beta);
    m = margin if use_margin else 0

    Paper: Zhang, Zhang, Yuan, Gu (2024), "Beyond Bradley-Terry Models: A General Preference Model
    for Language Model Alignment", arXiv:2410.02197.

    Hyper-parameters:
        use_margin: subtract each pair's ``margin`` from the logit (as ``bt`` does). Default False.

    Metrics: ``rewards/margins`` (the logit: a judge has no per-response reward) and
    ``rewards/accuracies`` (1 when the logit is > 0 strictly).
    """
    if not isinstance(use_margin, bool):
        raise ValueError(f"loss 'gpm': use_margin must be true or false, got {use_margin!r}")
    logits = b.logits
    if use_margin:
        if b.margin is None:
            raise ValueError("loss 'gpm': use_margin=True, but the batch has no margin")
        logits = logits - b.margin.to(logits.dtype)
    detached = b.logits.detach()
    metrics = {"rewards/margins": detached, "rewards/accuracies": (detached > 0).to(detached.dtype)}
    return LossOutput(loss=-F.logsigmoid(logits), metrics=metrics)
