"""The lab's true rewards as online-training rewards (``reward: lab`` in an ``online:`` config).

Registered in the ``prefkit.rewards`` entry point group (pyproject.toml), so `prefkit.online.rewards`
builds it by name without importing the lab.
"""

from __future__ import annotations

from prefkit.lab.reasoning import ArithmeticWorld
from prefkit.lab.world import PRESETS, make_world

__all__ = ["lab_reward"]


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
