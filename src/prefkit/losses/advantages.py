"""Advantage estimators: rewards of sampled completions -> one advantage per completion.

A registry like the losses': each estimator is a pure function registered by name, taking the rewards
``[N]`` of ``N = prompts * group_size`` completions laid out group by group (the ``group_size`` samples of
one prompt are consecutive) and keyword hyper-parameters, returning ``[N]`` advantages. ``prefkit losses``
lists them with the losses (`list_advantages`).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from prefkit.losses.base import _docstring_field

__all__ = ["AdvantageSpec", "get_advantage", "list_advantages", "register_advantage"]


@dataclass(frozen=True)
class AdvantageSpec:
    name: str
    fn: Callable[..., Tensor]
    formula: str
    citation: str
    needs_groups: bool  # compares completions of one prompt: group_size >= 2

    @property
    def hyperparameters(self) -> dict:
        params = inspect.signature(self.fn).parameters.values()
        return {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def __call__(self, rewards: Tensor, group_size: int, **kwargs) -> Tensor:
        rewards = torch.as_tensor(rewards, dtype=torch.float32) if not isinstance(rewards, Tensor) else rewards
        if rewards.dim() != 1:
            raise ValueError(f"advantage {self.name!r}: rewards must be [N], got shape {tuple(rewards.shape)}")
        if group_size < 1 or rewards.numel() % group_size:
            raise ValueError(
                f"advantage {self.name!r}: {rewards.numel()} rewards do not split into groups of {group_size}"
            )
        if self.needs_groups and group_size < 2:
            raise ValueError(
                f"advantage {self.name!r} compares the completions of one prompt: num_generations must be >= 2, "
                f"got {group_size}"
            )
        if not torch.isfinite(rewards).all():
            raise ValueError(f"advantage {self.name!r}: rewards must be finite, got {rewards.tolist()}")
        return self.fn(rewards, group_size, **kwargs)


_ADVANTAGES: dict[str, AdvantageSpec] = {}


def register_advantage(name: str, *, needs_groups: bool = True):
    """Register ``fn(rewards [N], group_size, **hyper-parameters) -> advantages [N]`` under ``name``; its
    docstring needs ``Formula:`` and ``Paper:`` lines."""

    def deco(fn):
        if name in _ADVANTAGES:
            raise ValueError(f"advantage {name!r} is registered twice")
        formula, citation = _docstring_field(fn.__doc__ or "", "formula"), _docstring_field(fn.__doc__ or "", "paper")
        if not formula or not citation:
            raise ValueError(f"advantage {name!r}: docstring needs 'Formula:' and 'Paper:' lines")
        _ADVANTAGES[name] = AdvantageSpec(name, fn, formula, citation, needs_groups)
        return fn

    return deco


def get_advantage(name: str) -> AdvantageSpec:
    if name not in _ADVANTAGES:
        close = difflib.get_close_matches(name, list(_ADVANTAGES), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown advantage estimator {name!r}.{hint} Known: {', '.join(_ADVANTAGES)}.")
    return _ADVANTAGES[name]


def list_advantages() -> list[AdvantageSpec]:
    return list(_ADVANTAGES.values())


def _groups(rewards: Tensor, group_size: int) -> Tensor:
    return rewards.view(-1, group_size)


@register_advantage("grpo")
def grpo(rewards: Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> Tensor:
    """Group-normalised reward: each completion's reward minus its group's mean, divided by the group's
    standard deviation (Bessel-corrected) plus ``eps``.

    Formula: A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   (scale=False: A_i = r_i - mean(r_group))

    Paper: Shao et al. (2024), "DeepSeekMath: Pushing the Limits of Mathematical Reasoning in Open Language
    Models", arXiv:2402.03300 (outcome supervision, section 4.1.2).

    TRL 1.16: ``scale_rewards="group"`` (``"none"`` for scale=False), the same numbers (its std is
    Bessel-corrected and its eps 1e-4). A group whose rewards are all equal gets advantage 0.
    """
    g = _groups(rewards, group_size)
    centred = g - g.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (g.std(dim=1, keepdim=True, unbiased=True) + eps)
    return centred.reshape(-1)


@register_advantage("dr_grpo")
def dr_grpo(rewards: Tensor, group_size: int) -> Tensor:
    """Dr. GRPO: the group mean-centred reward, not divided by the group's std (which up-weights prompts
    whose rewards barely differ, too easy or too hard ones).

    Formula: A_i = r_i - mean(r_group)

    Paper: Liu et al. (2025), "Understanding R1-Zero-Like Training: A Critical Perspective", arXiv:2503.20783.
    """
    g = _groups(rewards, group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


@register_advantage("rloo")
def rloo(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out: each completion's baseline is the mean reward of the other ``G - 1``
    completions of its prompt.

    Formula: A_i = r_i - (1 / (G - 1)) sum_{j != i} r_j = G / (G - 1) * (r_i - mean(r_group))

    Paper: Ahmadian, Cremer, Gallé, Fadaee, Kreutzer, Pietquin, Üstün, Hooker (2024), "Back to Basics:
    Revisiting REINFORCE Style Optimization for Learning from Human Feedback in LLMs", arXiv:2402.14740;
    the estimator: Kool, van Hoof, Welling (2019), "Buy 4 REINFORCE Samples, Get a Baseline for Free!".
    """
    g = _groups(rewards, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


@register_advantage("reinforce_pp", needs_groups=False)
def reinforce_pp(rewards: Tensor, group_size: int, *, eps: float = 1e-8) -> Tensor:
    """REINFORCE++: the reward normalised over the whole batch (global mean and std), no critic and no
    per-prompt baseline.

    Formula: A_i = (r_i - mean(r_batch)) / (std(r_batch) + eps)

    Paper: Hu (2025), "REINFORCE++: A Simple and Efficient Approach for Aligning Large Language Models",
    arXiv:2501.03262.

    The token-level KL penalty of the paper goes into the reward (or the loss) before this; a batch of one
    completion gets advantage 0.
    """
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)


@register_advantage("reinforce_baseline", needs_groups=False)
def reinforce_baseline(rewards: Tensor, group_size: int, *, baseline: float | None = None) -> Tensor:
    """REINFORCE with a baseline: the reward minus a baseline, the batch's mean reward unless one is given
    (e.g. a running mean the trainer keeps).

    Formula: A_i = r_i - b, b = mean(r_batch) (or the given baseline)

    Paper: Williams (1992), "Simple Statistical Gradient-Following Algorithms for Connectionist
    Reinforcement Learning", Machine Learning 8.
    """
    b = rewards.mean() if baseline is None else torch.as_tensor(baseline, dtype=rewards.dtype)
    return rewards - b
