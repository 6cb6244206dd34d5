"""A critic for PPO: a value per token from a causal LM's backbone and a linear head.

`ValueModel` holds a transformer backbone (the decoder stack of a ``...ForCausalLM``, without its LM head)
and ``head``: ``V = head(h)``, one number per position. The value of the state before completion token
``t`` is read at position ``t - 1`` (as a causal LM's logits for token ``t`` are): `ValueModel.token_values`
returns them in the layout of the completion mask. `build_value_model` starts one from a policy (a copy of
its backbone, the head at zero, so every initial value is 0) or from a saved one-label reward model (its
backbone and score head: Secrets of RLHF initialise the critic from the reward model).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

__all__ = ["SharedValueHead", "ValueModel", "build_value_model"]


def _backbone(model: nn.Module) -> nn.Module:
    """The decoder stack of a causal LM or a sequence classifier (``base_model``)."""
    inner = getattr(model, "base_model", None)
    if inner is None or inner is model:
        raise ValueError(f"{type(model).__name__} exposes no base_model (its decoder stack) to build a critic on")
    return inner


class ValueModel(nn.Module):
    """Backbone + linear value head; ``forward(input_ids, attention_mask) -> [N, T]`` values."""

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)

    def token_values(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        """``[N, T]``: at each completion position ``t`` the value read at ``t - 1``, else 0."""
        values = self(input_ids, attention_mask)
        out = torch.zeros_like(values)
        out[:, 1:] = values[:, :-1]
        return out * completion_mask.to(out.dtype)


class SharedValueHead(nn.Module):
    """A value head on the policy's own backbone: ``V = head(h)`` from the hidden states of the policy's forward
    (the log-prob engine hands them over), so the critic shares the backbone and the policy's backward trains
    both (the value loss weighted by ``vf_coef``). The head starts at zero."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.head = nn.Linear(hidden_size, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.zero_()

    def token_values_from(self, hidden: Tensor, completion_mask: Tensor) -> Tensor:
        """``[N, T]``: at each completion position ``t`` the value read from ``hidden[:, t - 1]``, else 0."""
        values = self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
        out = torch.zeros_like(values)
        out[:, 1:] = values[:, :-1]
        return out * completion_mask.to(out.dtype)


def build_value_model(policy: nn.Module, reward_model: nn.Module | None = None) -> ValueModel:
    """A critic from ``reward_model`` (its backbone and its one-output score head) when given, else from a copy
    of ``policy``'s backbone with a zero head."""
    source = reward_model if reward_model is not None else policy
    backbone = copy.deepcopy(_backbone(source))
    hidden = source.config.get_text_config().hidden_size
    critic = ValueModel(backbone, hidden).to(next(backbone.parameters()).dtype)
    with torch.no_grad():
        head = getattr(reward_model, "score", None) if reward_model is not None else None
        if isinstance(head, nn.Linear) and head.out_features == 1:
            critic.head.weight.copy_(head.weight)
            critic.head.bias.copy_(head.bias if head.bias is not None else torch.zeros(1))
        else:
            critic.head.weight.zero_()
            critic.head.bias.zero_()
    return critic.train().requires_grad_(True)
