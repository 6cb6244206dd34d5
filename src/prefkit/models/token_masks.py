"""Token masks for token-level preference losses: how much each completion token counts (SparsePO, MaPO).

Both read the *reference* model's hidden states at the positions that predict the completion tokens (the state at
position ``t - 1`` for the token at ``t``), one ``[N, H]`` tensor per decoder layer, and give a weight >= 0 per token:

- `SparseTokenMask` (SparsePO's learned masks, Christopoulou et al. 2024, arXiv:2410.05102; ``mask_model=
  "simple_all"`` of its code): every layer's state through one shared LayerNorm, then per layer a ``Linear(H, 1)``,
  ReLU and dropout; a bias-free ``Linear(L, 1)`` mixes the layers, then ReLU and dropout. Its linear layers start as
  transformers starts a model's (normal, standard deviation the model's ``initializer_range``, zero biases), so the
  masks start near 0 and grow as they learn; one change: the mixer's weights start at their absolute values, since
  with few layers all-negative mixer weights (a quarter of starts with 2 layers) zero every mask, and ReLU keeps
  them at zero with no gradient. Its parameters train with the policy. ``independent``: one network for the reward
  mask and one for the KL mask; else one mask for both.
- `activation_mask` (MaPO, the paper's parameter-free baseline): each layer's state averaged over its hidden
  dimension, z-normalised over the completion's tokens (unbiased standard deviation), min-max rescaled to [0, 1]
  over them, then averaged over the layers. prefkit reads the decoder layers' outputs (the residual stream); the
  paper's ``activation_hook="all"`` also hooks the attention and MLP internals, which are model-specific.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["SparseTokenMask", "activation_mask"]


class _MaskNet(nn.Module):
    def __init__(self, hidden_size: int, num_layers: int, dropout: float, eps: float, init_std: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, eps=eps)
        self.per_layer = nn.ModuleList(nn.Linear(hidden_size, 1) for _ in range(num_layers))
        self.mixer = nn.Linear(num_layers, 1, bias=False)
        self.dropout = nn.Dropout(dropout)
        for linear in (*self.per_layer, self.mixer):  # as transformers initialises a model's linear layers
            nn.init.normal_(linear.weight, std=init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
        with torch.no_grad():  # a mixer with no positive weight would zero every mask for good (ReLU): none starts so
            self.mixer.weight.abs_()

    def forward(self, states: Sequence[Tensor]) -> Tensor:
        scores = [self.dropout(torch.relu(w(self.norm(h)))) for w, h in zip(self.per_layer, states)]
        return self.dropout(torch.relu(self.mixer(torch.cat(scores, dim=-1)))).squeeze(-1)


class SparseTokenMask(nn.Module):
    """SparsePO's learned token masks (module docstring): ``forward(states) -> (reward mask, KL mask)``, each ``[N]``
    for ``N`` tokens, from ``states``: one ``[N, H]`` tensor per layer (``num_layers`` of them)."""

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        *,
        independent: bool = False,
        dropout: float = 0.01,
        eps: float = 1e-5,
        init_std: float = 0.02,
    ):
        super().__init__()
        if not 0 <= dropout < 1:
            raise ValueError(f"mask dropout must be in [0, 1), got {dropout}")
        self.num_layers = num_layers
        self.reward = _MaskNet(hidden_size, num_layers, dropout, eps, init_std)
        self.kl = _MaskNet(hidden_size, num_layers, dropout, eps, init_std) if independent else None

    @property
    def independent(self) -> bool:
        return self.kl is not None

    def forward(self, states: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        if len(states) != self.num_layers:
            raise ValueError(f"the mask reads {self.num_layers} layers' states, got {len(states)}")
        states = [h.to(self.mixer_dtype) for h in states]
        reward = self.reward(states)
        return reward, (self.kl(states) if self.kl is not None else reward)

    @property
    def mixer_dtype(self) -> torch.dtype:
        return self.reward.mixer.weight.dtype


def activation_mask(states: Sequence[Tensor], mask: Tensor) -> Tensor:
    """MaPO's activation mask ``[B, T]`` (module docstring) from per-layer states ``[B, T, H]`` already aligned
    with the tokens they predict, and the completion ``mask`` ``[B, T]`` (1 on completion tokens). A completion
    whose per-layer means are all equal (or with one token) gets weight 1 on every token for that layer."""
    keep = mask.bool()
    count = keep.sum(-1, keepdim=True).clamp(min=1)
    maps = []
    for h in states:
        a = h.float().mean(-1)  # [B, T]
        mean = (a * keep).sum(-1, keepdim=True) / count
        var = (((a - mean) * keep) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
        z = (a - mean) / (var.sqrt() + 1e-12)
        low = torch.where(keep, z, torch.full_like(z, float("inf"))).amin(-1, keepdim=True)
        high = torch.where(keep, z, torch.full_like(z, float("-inf"))).amax(-1, keepdim=True)
        span = high - low
        flat = ~(span > 0)
        scaled = torch.where(flat, torch.ones_like(z), (z - low) / torch.where(flat, torch.ones_like(span), span))
        maps.append(scaled * keep)
    return torch.stack(maps).mean(0)
