"""Score transforms of f-DPO (Wang et al., 2023): f'(u) evaluated at u = pi / pi_ref.

For an f-divergence regulariser the optimal policy satisfies
``r(x, y) = beta * f'(pi(y|x) / pi_ref(y|x)) + const``, so every DPO-style loss that only uses
the chosen-minus-rejected reward difference can swap the log-ratio ``log u`` for ``f'(u)``.
Additive constants of ``f'`` cancel in that difference and are dropped here.

Private helper of ``prefkit.losses.pairwise``; not part of the public API.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp() arguments are clamped below these values so the score stays finite in the input dtype
# (the ratio pi/pi_ref would otherwise overflow for very negative log-ratios).
_EXP_CAP = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0, torch.float64: 700.0}


def check_divergence(divergence: str, alpha: float) -> None:
    """Raise ``ValueError`` for an unknown divergence or an alpha outside ``[0, 1]``."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown f-divergence {divergence!r}; expected one of {DIVERGENCES}")
    if divergence == "alpha_divergence":
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1] for the alpha-divergence, got {alpha}")


def _neg_power(logratio: Tensor, a: float) -> Tensor:
    """``u**(-a) = exp(-a * log u)``, computed in float32 or wider with a clamped exponent."""
    work = logratio if logratio.dtype == torch.float64 else logratio.float()
    cap = _EXP_CAP.get(logratio.dtype, 80.0)
    return torch.exp(torch.clamp(-a * work, max=cap)).to(logratio.dtype)


def f_score(logratio: Tensor, divergence: str, alpha: float = 0.5) -> Tensor:
    """``f'(u)`` (up to an additive constant) from ``logratio = log u``.

    - ``reverse_kl``: ``f(u) = u log u``, ``f'(u) = log u + 1`` -> ``log u``
    - ``forward_kl``: ``f(u) = -log u``, ``f'(u) = -1/u`` -> ``1 - 1/u``
    - ``js_divergence``: ``f'(u) = log(2u / (1 + u)) = log 2 + logsigmoid(log u)``
    - ``alpha_divergence`` (paper's parameterisation, ``alpha`` in (0, 1)):
      ``f'(u) = (1 - u**(-alpha)) / alpha``; ``alpha -> 0`` gives reverse KL (``log u``) and
      ``alpha = 1`` gives forward KL (``1 - 1/u``).
    """
    check_divergence(divergence, alpha)
    if divergence == "reverse_kl":
        return logratio
    if divergence == "forward_kl":
        return 1.0 - _neg_power(logratio, 1.0)
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratio)
    a = float(alpha)
    if a < 1e-6:  # limit alpha -> 0 of (1 - u^-alpha) / alpha is log u
        return logratio
    return (1.0 - _neg_power(logratio, a)) / a
