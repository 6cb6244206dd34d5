"""Preference losses: pure functions over log-probs / rewards, one registry (DESIGN.md §3)."""

# Importing the loss modules registers their losses.
from prefkit.losses import (  # noqa: E402,F401
    advantages,
    auxiliary,
    listwise,
    pairwise,
    policy_gradient,
    preference_models,
    process,
    reference_free,
    reward,
    token_level,
    unpaired,
    variational,
)
from prefkit.losses.base import (
    KINDS,
    ListLogps,
    LossOutput,
    LossSpec,
    PairLogps,
    PolicyLogps,
    PreferenceLogits,
    RewardList,
    RewardPair,
    StepScores,
    UnpairedLogps,
    get_loss,
    list_losses,
    register_loss,
)

__all__ = [
    "KINDS",
    "ListLogps",
    "LossOutput",
    "LossSpec",
    "PairLogps",
    "PolicyLogps",
    "PreferenceLogits",
    "RewardList",
    "RewardPair",
    "StepScores",
    "UnpairedLogps",
    "get_loss",
    "list_losses",
    "register_loss",
]
