"""The lab's true rewards and simulated annotators for online training.

``reward: lab`` in an ``online:`` config is `lab_reward` (entry point group ``prefkit.rewards``);
``judge: {judge: lab, ...}`` is `lab_judge` (entry point group ``prefkit.judges``). Both are registered in
pyproject.toml, so `prefkit.online` builds them by name without importing the lab.
"""

from __future__ import annotations

from prefkit.lab.reasoning import ArithmeticWorld
from prefkit.lab.world import PRESETS, make_world, sigmoid

__all__ = ["lab_judge", "lab_reward"]


def lab_reward(world: str = "default", seed: int = 0, group: str | None = None):
    """The reward protocol's function for a lab world: ``world`` a preference-world preset (its true reward
    ``r(x, y)``, of user group ``group`` or the population) or ``arithmetic`` (1 for the right answer)."""
    if world == "arithmetic":
        if group is not None:
            raise ValueError("the arithmetic world has no user groups (group must be unset)")
        return ArithmeticWorld().reward
    if world not in PRESETS:
        raise ValueError(f"unknown lab world {world!r}; expected arithmetic or one of {', '.join(PRESETS)}")
    the_world = make_world(world, seed)
    if group is not None and group not in the_world.shares:
        raise ValueError(f"world {world!r} has no group {group!r}; its groups: {', '.join(the_world.shares)}")

    def true_reward(prompts, completions, **fields) -> list[float]:
        return [the_world.true_reward(p, c, group) for p, c in zip(prompts, completions)]

    return true_reward


def lab_judge(world: str = "default", seed: int = 0, temperature: float = 1.0, flip: float = 0.0, group=None):
    """A pairwise judge ``(prompts, first, second) -> P(first preferred)`` that is a lab annotator: Bradley-Terry
    on the world's preference logit at ``temperature`` (0: the arg-max, a fair coin on a tie), then each label
    flipped with probability ``flip``: ``P = (1 - flip) * p + flip * (1 - p)``. The trainer draws the label."""
    if world not in PRESETS:
        raise ValueError(f"unknown lab world {world!r}; expected one of {', '.join(PRESETS)}")
    if not temperature >= 0:
        raise ValueError(f"temperature: expected a number >= 0, got {temperature!r}")
    if not 0 <= flip < 0.5:
        raise ValueError(f"flip: expected a probability in [0, 0.5), got {flip!r}")
    the_world = make_world(world, seed)

    def judge(prompts, first, second) -> list[float]:
        out = []
        for p, a, b in zip(prompts, first, second):
            logit = the_world.preference_logit(p, a, b, group)
            prob = (0.5 if logit == 0 else float(logit > 0)) if temperature == 0 else sigmoid(logit / temperature)
            out.append((1 - flip) * prob + flip * (1 - prob))
        return out

    return judge
